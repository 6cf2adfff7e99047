//! JSON parsing that refuses an object with the same key twice, at any depth.
//!
//! serde_json keeps the last of repeated keys, so `{"n":"EVIL","n":1}` would validate as
//! `{"n":1}` while the text stored and forwarded still carries the first value. The check
//! is part of the one parse intake does: [`Strict`] builds the same [`serde_json::Value`]
//! serde_json's own visitor builds, with the same map insertion, and fails when an insertion
//! finds the key already there (compared after unescaping, so `"n"` and `"\u006e"` are the
//! same key). Only a payload refused that way is parsed a second time, by the variant that
//! keeps the repeated key's name for the rejection detail (a lookup before each insertion,
//! measurably slower, so never on the path of valid messages).

use std::fmt;

use serde::de::{self, Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::{map::Entry, Map, Number, Value};

/// A JSON value whose objects have unique keys. `NAMED`: the error names the repeated key.
struct Strict<const NAMED: bool>(Value);

/// Why [`parse`] refused a payload.
#[derive(Debug)]
pub enum StrictError {
    /// Not JSON (serde_json's error; its message quotes no input).
    Syntax(serde_json::Error),
    /// An object repeats `key` (unescaped); `line` and `column` locate the repetition.
    DuplicateKey {
        key: String,
        line: usize,
        column: usize,
    },
}

/// Parse `bytes` as one JSON value with unique keys in every object.
pub fn parse(bytes: &[u8]) -> Result<Value, StrictError> {
    match serde_json::from_slice::<Strict<false>>(bytes) {
        Ok(v) => Ok(v.0),
        // The only data error these visitors raise is a repeated key.
        Err(e) if e.is_data() => Err(name_the_repeated_key(bytes)),
        Err(e) => Err(StrictError::Syntax(e)),
    }
}

/// The second parse of a payload refused for a repeated key: which key, and where.
fn name_the_repeated_key(bytes: &[u8]) -> StrictError {
    match serde_json::from_slice::<Strict<true>>(bytes) {
        Err(e) if e.is_data() => {
            // serde_json appends the position to the message, which is the key.
            let (line, column) = (e.line(), e.column());
            let text = e.to_string();
            let suffix = format!(" at line {line} column {column}");
            let key = text.strip_suffix(&suffix).unwrap_or(&text).to_owned();
            StrictError::DuplicateKey { key, line, column }
        }
        // Not reached: both parses see the same bytes.
        Err(e) => StrictError::Syntax(e),
        Ok(_) => StrictError::DuplicateKey {
            key: String::new(),
            line: 0,
            column: 0,
        },
    }
}

impl<'de, const NAMED: bool> Deserialize<'de> for Strict<NAMED> {
    #[inline]
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(StrictVisitor::<NAMED>).map(Strict)
    }
}

struct StrictVisitor<const NAMED: bool>;

impl<'de, const NAMED: bool> Visitor<'de> for StrictVisitor<NAMED> {
    type Value = Value;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("any valid JSON value")
    }

    #[inline]
    fn visit_bool<E>(self, v: bool) -> Result<Value, E> {
        Ok(Value::Bool(v))
    }

    #[inline]
    fn visit_i64<E>(self, v: i64) -> Result<Value, E> {
        Ok(Value::Number(v.into()))
    }

    #[inline]
    fn visit_u64<E>(self, v: u64) -> Result<Value, E> {
        Ok(Value::Number(v.into()))
    }

    #[inline]
    fn visit_f64<E>(self, v: f64) -> Result<Value, E> {
        Ok(Number::from_f64(v).map_or(Value::Null, Value::Number))
    }

    #[inline]
    fn visit_str<E>(self, v: &str) -> Result<Value, E> {
        Ok(Value::String(v.to_owned()))
    }

    #[inline]
    fn visit_string<E>(self, v: String) -> Result<Value, E> {
        Ok(Value::String(v))
    }

    #[inline]
    fn visit_none<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }

    #[inline]
    fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Value, D::Error> {
        Strict::<NAMED>::deserialize(d).map(|v| v.0)
    }

    #[inline]
    fn visit_unit<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let mut items = Vec::new();
        while let Some(Strict::<NAMED>(v)) = seq.next_element()? {
            items.push(v);
        }
        Ok(Value::Array(items))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let mut out = Map::new();
        if NAMED {
            while let Some(key) = map.next_key::<String>()? {
                match out.entry(key) {
                    Entry::Vacant(slot) => {
                        slot.insert(map.next_value::<Strict<NAMED>>()?.0);
                    }
                    Entry::Occupied(seen) => return Err(de::Error::custom(seen.key())),
                }
            }
        } else {
            // As serde_json's own visitor: one insertion, whose result tells a repetition.
            while let Some((key, Strict::<NAMED>(v))) = map.next_entry::<String, _>()? {
                if out.insert(key, v).is_some() {
                    return Err(de::Error::custom("a key appears twice"));
                }
            }
        }
        Ok(Value::Object(out))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dup(text: &str) -> Option<(String, usize, usize)> {
        match parse(text.as_bytes()) {
            Err(StrictError::DuplicateKey { key, line, column }) => Some((key, line, column)),
            _ => None,
        }
    }

    #[test]
    fn builds_what_serde_json_builds() {
        let texts = [
            r#"{"a":1,"b":[1,-2,3.5,"x",null,true,{"c":{}}],"d":{"e":"f\u00e9"},"g":1e400}"#,
            "[]",
            "\"s\"",
            "18446744073709551615",
            "-9223372036854775808",
            r#"{"n":0.1,"m":-0.0}"#,
        ];
        for t in texts {
            let strict = parse(t.as_bytes()).ok();
            let plain: Option<Value> = serde_json::from_str(t).ok();
            assert_eq!(strict, plain, "{t}");
            // Key order is kept (`preserve_order`): serialized back, the same text.
            assert_eq!(
                strict.map(|v| v.to_string()),
                plain.map(|v| v.to_string()),
                "{t}"
            );
        }
    }

    #[test]
    fn repeated_keys_are_refused_at_any_depth() {
        assert_eq!(
            dup(r#"{"raw_in":"EVIL","raw_in":1}"#),
            Some(("raw_in".into(), 1, 25))
        );
        // Inside an object inside an array inside an object.
        assert_eq!(
            dup(r#"{"a":[1,{"b":{"c":1,"c":2}}]}"#).map(|d| d.0),
            Some("c".into())
        );
        // Equal once unescaped.
        assert_eq!(dup(r#"{"n":1,"\u006e":2}"#).map(|d| d.0), Some("n".into()));
        // The same key in sibling objects is fine.
        assert!(parse(br#"{"a":{"k":1},"b":{"k":2},"c":[{"k":1},{"k":2}]}"#).is_ok());
    }

    #[test]
    fn syntax_errors_stay_syntax_errors() {
        for t in ["{", "{\"a\":1,}", "nope", "", "[1 2]", "{\"a\"}"] {
            assert!(
                matches!(parse(t.as_bytes()), Err(StrictError::Syntax(_))),
                "{t}"
            );
        }
        // Nesting deeper than serde_json's limit is an error, never a stack overflow.
        let deep = "[".repeat(100_000);
        assert!(matches!(
            parse(deep.as_bytes()),
            Err(StrictError::Syntax(_))
        ));
    }
}
