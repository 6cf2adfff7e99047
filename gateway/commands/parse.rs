//! What central (or the API) sends, checked: a command against its device's profile, a
//! branch notice against its few rules. Pure.

use serde_json::{Map, Value};

use crate::buffer::commands::NewCommand;
use crate::config::DeviceTable;

/// Largest command or notice body taken.
pub(crate) const MAX_BODY: usize = 16 * 1024;
/// `expires_at` when a command or notice has none.
pub(crate) const DEFAULT_TTL_MS: i64 = 3_600_000;
/// The furthest `expires_at` may be.
pub(crate) const MAX_TTL_MS: i64 = 7 * 24 * 3_600_000;
/// Longest `command_id`.
pub(crate) const MAX_COMMAND_ID: usize = 128;

/// A body that cannot even be stored as a rejected command (no usable `command_id`, or no
/// JSON object): the reason, for the log and the API's answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub(crate) struct Unusable(pub String);

fn unusable(s: &str) -> Unusable {
    Unusable(s.to_owned())
}

/// A device id or `command_id` that is safe to store, show and use in a topic.
fn plain(s: &str, max: usize) -> bool {
    !s.is_empty()
        && s.len() <= max
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b':'))
}

fn object(body: &[u8]) -> Result<Map<String, Value>, Unusable> {
    if body.len() > MAX_BODY {
        return Err(Unusable(format!("larger than {MAX_BODY} bytes")));
    }
    match crate::config::strict_json::parse(body) {
        Ok(Value::Object(o)) => Ok(o),
        Ok(_) => Err(unusable("not a JSON object")),
        Err(_) => Err(unusable("not JSON (or a key repeated)")),
    }
}

/// `expires_at` (RFC 3339) as Unix ms: default one hour, at most seven days ahead.
fn expiry(o: &Map<String, Value>, now_ms: i64) -> Result<i64, String> {
    let Some(v) = o.get("expires_at") else {
        return Ok(now_ms + DEFAULT_TTL_MS);
    };
    let at = v
        .as_str()
        .and_then(|s| s.parse::<jiff::Timestamp>().ok())
        .ok_or("expires_at_invalid: not an RFC 3339 time")?
        .as_millisecond();
    if at <= now_ms {
        return Err("already_expired: expires_at is past".into());
    }
    if at > now_ms + MAX_TTL_MS {
        return Err("expires_at_too_late: more than 7 days ahead".into());
    }
    Ok(at)
}

/// A command for `device` as central or the API sent it. `Err`: nothing can be stored;
/// otherwise a command to store, `rejected` set if it must not be sent.
pub(crate) fn command(
    body: &[u8],
    device: &str,
    table: &DeviceTable,
    now_ms: i64,
    max_open: usize,
) -> Result<NewCommand, Unusable> {
    if !plain(device, 64) {
        return Err(unusable("device id not usable"));
    }
    let o = object(body)?;
    let command_id = match o.get("command_id") {
        Some(Value::String(s)) if plain(s, MAX_COMMAND_ID) => s.clone(),
        _ => {
            return Err(Unusable(format!(
                "command_id must be 1-{MAX_COMMAND_ID} of A-Z a-z 0-9 - _ . :"
            )))
        }
    };
    let name = match o.get("name") {
        Some(Value::String(s)) if plain(s, 64) => s.clone(),
        _ => String::new(),
    };
    let args = match o.get("args") {
        None => Map::new(),
        Some(Value::Object(a)) => a.clone(),
        Some(_) => Map::new(),
    };
    let entry = table.get(device);
    let mut c = NewCommand {
        command_id,
        device: device.to_owned(),
        profile: entry.map(|e| e.profile.name.clone()).unwrap_or_default(),
        name: name.clone(),
        args: Value::Object(args.clone()).to_string(),
        expires_ms: now_ms + DEFAULT_TTL_MS,
        reply_timeout_ms: None,
        at_ms: now_ms,
        rejected: None,
        max_open,
    };
    let verdict = (|| -> Result<(i64, Option<i64>), String> {
        if let Some(k) = o
            .keys()
            .find(|k| !matches!(k.as_str(), "command_id" | "name" | "args" | "expires_at"))
        {
            let k: String = k.chars().take(40).collect();
            return Err(format!("unknown_field: {k:?}"));
        }
        if name.is_empty() {
            return Err("name_invalid: a name of 1-64 of A-Z a-z 0-9 - _ . : is required".into());
        }
        if o.get("args").is_some_and(|a| !a.is_object()) {
            return Err("bad_args: args must be an object".into());
        }
        let expires = expiry(&o, now_ms)?;
        let entry = entry.ok_or("unknown_device")?;
        let declared = entry.profile.command(&name).ok_or_else(|| {
            format!(
                "unknown_command: profile `{}` declares no `{name}`",
                entry.profile.name
            )
        })?;
        declared
            .validate_args(&args)
            .map_err(|r| format!("bad_args: {}", r.detail))?;
        Ok((expires, declared.reply_timeout_ms()))
    })();
    match verdict {
        Ok((expires, reply)) => {
            c.expires_ms = expires;
            c.reply_timeout_ms = reply;
        }
        Err(reason) => c.rejected = Some(reason),
    }
    Ok(c)
}

/// A branch notice for screens: `{"text": ..., "level": "info"|"warning", "expires_at":
/// ...}`, republished as `{"text", "level", "expires_at"}`. An empty body or empty text
/// clears the notice (`Ok(None)`).
pub(crate) fn notice(body: &[u8], now_ms: i64) -> Result<Option<(String, i64)>, Unusable> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(None);
    }
    let o = object(body)?;
    if let Some(k) = o
        .keys()
        .find(|k| !matches!(k.as_str(), "text" | "level" | "expires_at"))
    {
        let k: String = k.chars().take(40).collect();
        return Err(Unusable(format!("unknown field {k:?}")));
    }
    let text = match o.get("text") {
        Some(Value::String(s)) if s.chars().count() <= 500 => s.clone(),
        _ => return Err(unusable("text must be a string of at most 500 characters")),
    };
    if text.trim().is_empty() {
        return Ok(None);
    }
    let level = match o.get("level") {
        None => "info",
        Some(Value::String(s)) if s == "info" || s == "warning" => s.as_str(),
        _ => return Err(unusable("level must be info or warning")),
    };
    let expires = expiry(&o, now_ms).map_err(Unusable)?;
    let out = serde_json::json!({
        "text": text,
        "level": level,
        "expires_at": crate::model::format_ms(expires),
    });
    Ok(Some((out.to_string(), expires)))
}

/// What a device gets on `devices/ID/commands/NAME`.
pub(crate) fn device_payload(command_id: &str, args: &str) -> Vec<u8> {
    let args: Value = serde_json::from_str(args).unwrap_or(Value::Object(Map::new()));
    serde_json::json!({ "command_id": command_id, "args": args })
        .to_string()
        .into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Device, Password, Profile};
    use std::collections::HashMap;
    use std::sync::Arc;

    fn table() -> DeviceTable {
        let profile = Profile::from_json(
            r#"{"name":"screen","description":"","telemetry":{"max_bytes":100},
                "commands":{"notice":{"args":{"text":{"type":"string"}},"reply":true}}}"#,
        )
        .unwrap();
        let mut devices = HashMap::new();
        devices.insert(
            "s1".to_owned(),
            Device {
                id: "s1".into(),
                profile: Arc::new(profile),
                password: Password::parse("x").unwrap(),
            },
        );
        DeviceTable {
            devices,
            privacy_key: None,
            rollups: false,
        }
    }

    const NOW: i64 = 1_800_000_000_000;

    fn reason(body: &str, device: &str) -> Option<String> {
        command(body.as_bytes(), device, &table(), NOW, 50)
            .unwrap()
            .rejected
            .map(|r| r.split(':').next().unwrap().to_owned())
    }

    #[test]
    fn commands_are_checked_against_the_profile() {
        let ok = command(
            br#"{"command_id":"a1","name":"notice","args":{"text":"closing"}}"#,
            "s1",
            &table(),
            NOW,
            50,
        )
        .unwrap();
        assert_eq!(ok.rejected, None);
        assert_eq!(ok.expires_ms, NOW + DEFAULT_TTL_MS);
        assert_eq!(ok.reply_timeout_ms, Some(30_000));
        assert_eq!(ok.profile, "screen");
        let base = r#""command_id":"a1","name":"notice","args":{"text":"x"}"#;
        assert_eq!(
            reason(&format!("{{{base}}}"), "nobody").as_deref(),
            Some("unknown_device")
        );
        assert_eq!(
            reason(r#"{"command_id":"a1","name":"reboot"}"#, "s1").as_deref(),
            Some("unknown_command")
        );
        assert_eq!(
            reason(
                r#"{"command_id":"a1","name":"notice","args":{"text":1}}"#,
                "s1"
            )
            .as_deref(),
            Some("bad_args")
        );
        assert_eq!(
            reason(&format!("{{{base},\"x\":1}}"), "s1").as_deref(),
            Some("unknown_field")
        );
        assert_eq!(
            reason(
                &format!("{{{base},\"expires_at\":\"2020-01-01T00:00:00Z\"}}"),
                "s1"
            )
            .as_deref(),
            Some("already_expired")
        );
        assert_eq!(
            reason(
                &format!("{{{base},\"expires_at\":\"2099-01-01T00:00:00Z\"}}"),
                "s1"
            )
            .as_deref(),
            Some("expires_at_too_late")
        );
        for bad in [
            &b"[]"[..],
            b"{",
            br#"{"name":"notice"}"#,
            br#"{"command_id":"a b"}"#,
        ] {
            assert!(command(bad, "s1", &table(), NOW, 50).is_err());
        }
        assert!(command(br#"{"command_id":"a"}"#, "a/b", &table(), NOW, 50).is_err());
    }

    #[test]
    fn notices() {
        let (n, exp) = notice(br#"{"text":"Closing in 15 minutes"}"#, NOW)
            .unwrap()
            .unwrap();
        assert_eq!(exp, NOW + DEFAULT_TTL_MS);
        assert!(n.contains(r#""level":"info""#));
        assert_eq!(notice(b"", NOW).unwrap(), None);
        assert_eq!(notice(br#"{"text":" "}"#, NOW).unwrap(), None);
        assert!(notice(br#"{"text":"x","colour":1}"#, NOW).is_err());
        assert!(notice(br#"{"text":"x","level":"panic"}"#, NOW).is_err());
    }

    proptest::proptest! {
        /// Any bytes as a command or a notice: an answer, never a panic.
        #[test]
        fn any_body_is_answered(body in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..200)) {
            let _ = command(&body, "s1", &table(), NOW, 50);
            let _ = notice(&body, NOW);
        }
    }
}
