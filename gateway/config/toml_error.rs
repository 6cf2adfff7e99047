//! TOML errors without the source text.
//!
//! The toml crate's `Display` for an error quotes the offending line, and serde's messages
//! quote the offending value (`invalid type: integer `12345678`, expected a string`): with a
//! password, the API token or `hmac_secret` on that line, `check-config`, `run` and a refused
//! reload would print the secret. An error is reported instead as its position, the key it
//! concerns (found by lexing the file up to the error with the toml crate's own lexer, so a
//! string's content is never taken for a key) and serde's message with any quoted value
//! removed.

use toml_parser::lexer::TokenKind;

/// `line L, column C, key K: message` for a TOML error in `text`.
pub(crate) fn describe(text: &str, err: &toml::de::Error) -> String {
    let message = without_values(err.message().trim_end());
    let Some(span) = err.span() else {
        return message;
    };
    let (line, column) = position(text, span.start);
    match key_at(text, span.start) {
        Some(key) => format!("line {line}, column {column}, key `{key}`: {message}"),
        None => format!("line {line}, column {column}: {message}"),
    }
}

/// 1-based line and column (in characters) of byte `offset`.
fn position(text: &str, offset: usize) -> (usize, usize) {
    let mut offset = offset.min(text.len());
    while !text.is_char_boundary(offset) {
        offset -= 1;
    }
    let before = &text[..offset];
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    (line, before[line_start..].chars().count() + 1)
}

/// serde's messages quote the value they refused: `invalid type: string "hunter2", expected
/// u16` becomes `invalid type: string, expected u16`. Field names (`unknown field
/// `passwrd``, `missing field `id``) are keys, not values, and stay.
fn without_values(message: &str) -> String {
    for prefix in ["invalid type: ", "invalid value: ", "invalid length: "] {
        if let Some(rest) = message.strip_prefix(prefix) {
            // `<what> <quoted value>, expected <what was expected>`: keep `<what>`. The last
            // `, expected` is serde's own (the value comes before it).
            let Some(comma) = rest.rfind(", expected") else {
                return format!("{prefix}(value withheld)");
            };
            let unexpected = &rest[..comma];
            let what = unexpected
                .find(['`', '"'])
                .map_or(unexpected, |q| unexpected[..q].trim_end());
            return format!("{prefix}{what}{}", &rest[comma..]);
        }
    }
    if let Some(rest) = message.strip_prefix("unknown variant ") {
        return match rest.rfind(", expected") {
            Some(comma) => format!("unknown variant{}", &rest[comma..]),
            None => "unknown variant".into(),
        };
    }
    message.to_owned()
}

/// The key the byte `offset` belongs to: the table of the last header before it
/// (`devices[1]` for the second `[[devices]]`) and the last `key =` at a line start.
fn key_at(text: &str, offset: usize) -> Option<String> {
    let tokens: Vec<_> = toml_parser::Source::new(text).lex().collect();
    let raw = |i: usize| {
        let s = tokens[i].span();
        text.get(s.start()..s.end()).unwrap_or("")
    };
    let mut table: Option<String> = None;
    let mut key: Option<String> = None;
    let mut arrays: std::collections::HashMap<String, usize> = Default::default();
    let mut line_start = true;
    let mut i = 0;
    while i < tokens.len() && tokens[i].span().start() <= offset {
        let kind = tokens[i].kind();
        match kind {
            TokenKind::Whitespace | TokenKind::Comment => {}
            TokenKind::Newline => line_start = true,
            TokenKind::LeftSquareBracket if line_start => {
                let array = tokens
                    .get(i + 1)
                    .is_some_and(|t| t.kind() == TokenKind::LeftSquareBracket);
                let (name, next) = dotted(&tokens, i + 1 + usize::from(array), raw);
                let name = name.unwrap_or_default();
                table = Some(match array {
                    true => {
                        let n = arrays.entry(name.clone()).or_insert(0);
                        *n += 1;
                        format!("{name}[{}]", *n - 1)
                    }
                    false => name,
                });
                key = None;
                line_start = false;
                i = next;
                continue;
            }
            TokenKind::Atom | TokenKind::BasicString | TokenKind::LiteralString if line_start => {
                let (name, next) = dotted(&tokens, i, raw);
                if tokens
                    .get(next)
                    .is_some_and(|t| t.kind() == TokenKind::Equals)
                {
                    key = name;
                }
                line_start = false;
                i = next;
                continue;
            }
            _ => line_start = false,
        }
        i += 1;
    }
    let key = key.map(|k| crate::model::truncate(&k, 64));
    match (table, key) {
        (Some(t), Some(k)) if !t.is_empty() => Some(format!("{t}.{k}")),
        (Some(t), None) if !t.is_empty() => Some(t),
        (_, k) => k,
    }
}

/// A dotted key from token `i` on (`a.b`, whitespace around dots allowed); returns it and
/// the index of the first token after it (after whitespace).
fn dotted<'a>(
    tokens: &[toml_parser::lexer::Token],
    mut i: usize,
    raw: impl Fn(usize) -> &'a str,
) -> (Option<String>, usize) {
    let mut parts: Vec<&str> = Vec::new();
    let skip_ws = |i: &mut usize| {
        while tokens
            .get(*i)
            .is_some_and(|t| t.kind() == TokenKind::Whitespace)
        {
            *i += 1;
        }
    };
    loop {
        skip_ws(&mut i);
        match tokens.get(i).map(|t| t.kind()) {
            Some(TokenKind::Atom | TokenKind::BasicString | TokenKind::LiteralString) => {
                parts.push(raw(i));
                i += 1;
            }
            _ => break,
        }
        skip_ws(&mut i);
        if tokens.get(i).is_some_and(|t| t.kind() == TokenKind::Dot) {
            i += 1;
        } else {
            break;
        }
    }
    ((!parts.is_empty()).then(|| parts.join(".")), i)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Doc {
        gateway: Gw,
        #[serde(default)]
        devices: Vec<Dev>,
        api: Option<Api>,
    }
    #[derive(Debug, serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Gw {
        branch_id: String,
        #[serde(default)]
        port: u16,
    }
    #[derive(Debug, serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Dev {
        id: String,
        password: String,
    }
    #[derive(Debug, serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Api {
        token: String,
    }

    fn err(text: &str) -> String {
        let e = toml::from_str::<Doc>(text).unwrap_err();
        describe(text, &e)
    }

    const HEAD: &str = "[gateway]\nbranch_id = \"b\"\n[[devices]]\nid = \"a\"\npassword = \"one-secret\"\n[[devices]]\nid = \"k\"\n";

    #[test]
    fn syntax_errors_name_key_and_line_but_not_the_text() {
        let text = format!("{HEAD}password = \"hunter2-secret \n");
        assert_eq!(
            err(&text),
            "line 8, column 28, key `devices[1].password`: invalid basic string, expected `\"`"
        );
        let text = "[gateway]\nbranch_id = \"b\"\n[api]\ntoken = \"tok-secret-value\" x\n";
        assert_eq!(
            err(text),
            "line 4, column 28, key `api.token`: unexpected key or value, expected newline, `#`"
        );
        // A broken string spilling onto the next line: its rest is no key.
        let text = "[gateway]\nbranch_id = \"b\"\n[api]\ntoken = 'abc\nsecret-rest = x'\n";
        let e = err(text);
        assert!(!e.contains("secret-rest"), "{e}");
        assert!(e.starts_with("line 4, column "), "{e}");
        assert!(e.contains("key `api.token`"), "{e}");
    }

    #[test]
    fn type_errors_lose_their_values() {
        let text = format!("{HEAD}password = 12345678\n");
        assert_eq!(
            err(&text),
            "line 8, column 12, key `devices[1].password`: invalid type: integer, expected a string"
        );
        let text = "[gateway]\nbranch_id = \"b\"\nport = \"s3cr3t-value\"\n";
        assert_eq!(
            err(text),
            "line 3, column 8, key `gateway.port`: invalid type: string, expected u16"
        );
        let text = "[gateway]\nbranch_id = \"b\"\nport = 700000\n";
        assert_eq!(
            err(text),
            "line 3, column 8, key `gateway.port`: invalid value: integer, expected u16"
        );
        let text = "[gateway]\nbranch_id = \"b\"\nport = 1.5\n";
        assert_eq!(
            err(text),
            "line 3, column 8, key `gateway.port`: invalid type: floating point, expected u16"
        );
    }

    #[test]
    fn key_errors_keep_the_key() {
        let text = format!("{HEAD}passwrd = \"x\"\n");
        assert_eq!(
            err(&text),
            "line 8, column 1, key `devices[1].passwrd`: unknown field `passwrd`, expected `id` or `password`"
        );
        assert_eq!(
            err(HEAD),
            "line 6, column 1, key `devices[1]`: missing field `password`"
        );
        let text = format!("{HEAD}password = \"x\"\npassword = \"y\"\n");
        assert_eq!(
            err(&text),
            "line 9, column 1, key `devices[1].password`: duplicate key"
        );
        // Keys inside a multi-line string are text, not keys.
        let text = "[gateway]\nbranch_id = \"\"\"\nfake = 1\n\"\"\"\nport = []\n";
        assert_eq!(
            err(text),
            "line 5, column 8, key `gateway.port`: invalid type: sequence, expected u16"
        );
    }

    #[test]
    fn messages_without_values() {
        for (m, want) in [
            (
                "invalid type: string \"a, expected\", expected u16",
                "invalid type: string, expected u16",
            ),
            (
                "invalid value: integer `-1`, expected u8",
                "invalid value: integer, expected u8",
            ),
            (
                "invalid type: boolean `true`, expected a string",
                "invalid type: boolean, expected a string",
            ),
            (
                "unknown variant `fulll`, expected `full` or `normal`",
                "unknown variant, expected `full` or `normal`",
            ),
            (
                "invalid type: sequence, expected u16",
                "invalid type: sequence, expected u16",
            ),
            ("missing field `id`", "missing field `id`"),
        ] {
            assert_eq!(without_values(m), want, "{m}");
        }
    }
}
