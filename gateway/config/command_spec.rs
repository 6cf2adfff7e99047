//! The commands a profile declares (`"commands"` in its JSON): name, typed arguments
//! with the same field rules as telemetry, whether the device replies and how long it
//! may take. A serial profile's `serial.commands` (bytes written to the port) are
//! commands too: without a declaration of their own they take no arguments and get no
//! reply (written is delivered).

use std::collections::BTreeMap;

use serde::Deserialize;
use serde_json::Value;

use super::profile::{FieldSpec, Profile, ProfileProblem};
use crate::model::{RejectReason, Rejection};

/// Longest reply timeout a profile may declare.
pub const MAX_REPLY_TIMEOUT_S: u64 = 3600;
/// The reply timeout when a replying command declares none.
pub const DEFAULT_REPLY_TIMEOUT_S: u64 = 30;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CommandSpec {
    #[serde(default)]
    pub description: Option<String>,
    /// The fields of the command's `args` object (undeclared ones are refused).
    #[serde(default)]
    pub args: BTreeMap<String, FieldSpec>,
    /// The device answers on `devices/ID/replies` (`succeeded` / `failed`).
    #[serde(default)]
    pub reply: bool,
    /// Seconds from delivery to the reply before the command is `timed_out`.
    #[serde(default)]
    pub reply_timeout_s: Option<u64>,
}

/// A command as a device of a profile takes it.
#[derive(Debug, Clone, Copy)]
pub struct Declared<'p> {
    pub spec: Option<&'p CommandSpec>,
    /// Serial bytes: the command is written to the device's port.
    pub serial: bool,
}

impl Declared<'_> {
    /// How long the device may take to reply, or `None` when it does not reply.
    pub fn reply_timeout_ms(&self) -> Option<i64> {
        let spec = self.spec.filter(|s| s.reply && !self.serial)?;
        Some((spec.reply_timeout_s.unwrap_or(DEFAULT_REPLY_TIMEOUT_S) * 1000) as i64)
    }

    /// Check a command's `args` against the declaration.
    pub fn validate_args(&self, args: &serde_json::Map<String, Value>) -> Result<(), Rejection> {
        let empty = BTreeMap::new();
        let fields = self.spec.map_or(&empty, |s| &s.args);
        for (name, spec) in fields {
            match args.get(name) {
                None | Some(Value::Null) if spec.required => {
                    return Err(Rejection::new(
                        RejectReason::MissingField,
                        format!("argument `{name}` is required"),
                    ))
                }
                None | Some(Value::Null) => {}
                Some(v) => spec.check_value(name, v)?,
            }
        }
        if let Some(unknown) = args.keys().find(|k| !fields.contains_key(*k)) {
            return Err(Rejection::quoting(
                RejectReason::UnknownField,
                "argument ",
                unknown,
                true,
                " is not declared",
            ));
        }
        Ok(())
    }
}

impl Profile {
    /// The command `name` as this profile declares it (in `commands`, or as serial bytes).
    pub fn command(&self, name: &str) -> Option<Declared<'_>> {
        let serial = self
            .serial
            .as_ref()
            .is_some_and(|s| s.commands.contains_key(name));
        let spec = self.commands.get(name);
        (spec.is_some() || serial).then_some(Declared { spec, serial })
    }

    /// Every command name this profile declares.
    pub fn command_names(&self) -> Vec<&str> {
        let mut names: Vec<&str> = self.commands.keys().map(String::as_str).collect();
        if let Some(s) = &self.serial {
            names.extend(s.commands.keys().map(String::as_str));
        }
        names.sort_unstable();
        names.dedup();
        names
    }

    pub(super) fn check_commands(&self, problems: &mut Vec<ProfileProblem>) {
        for (name, c) in &self.commands {
            let path = format!("commands.{name}");
            let name_ok = !name.is_empty()
                && name.len() <= 64
                && name
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '-');
            if !name_ok {
                problems.push(ProfileProblem {
                    path: path.clone(),
                    message: "a command name is 1-64 of a-z 0-9 _ -".into(),
                });
            }
            for (arg, f) in &c.args {
                f.check_spec(&format!("{path}.args.{arg}"), problems);
            }
            if let Some(t) = c.reply_timeout_s {
                if !c.reply || t == 0 || t > MAX_REPLY_TIMEOUT_S {
                    problems.push(ProfileProblem {
                        path: format!("{path}.reply_timeout_s"),
                        message: format!(
                            "only with `reply: true`, between 1 and {MAX_REPLY_TIMEOUT_S}"
                        ),
                    });
                }
            }
            let serial = self
                .serial
                .as_ref()
                .is_some_and(|s| s.commands.contains_key(name));
            if serial && (c.reply || !c.args.is_empty()) {
                problems.push(ProfileProblem {
                    path,
                    message: "a serial command is fixed bytes: no `args`, no `reply`".into(),
                });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn profile() -> Profile {
        Profile::from_json(
            r#"{"name":"p","description":"","telemetry":{"max_bytes":100},
                "commands":{
                  "notice":{"args":{"text":{"type":"string","max_length":10},
                                    "minutes":{"type":"integer","min":1,"max":60,"required":false}},
                            "reply":true,"reply_timeout_s":5},
                  "restart":{}}}"#,
        )
        .unwrap()
    }

    #[test]
    fn args_follow_the_field_rules() {
        let p = profile();
        assert!(p.check().is_empty(), "{:?}", p.check());
        let notice = p.command("notice").unwrap();
        assert_eq!(notice.reply_timeout_ms(), Some(5000));
        assert_eq!(p.command("restart").unwrap().reply_timeout_ms(), None);
        assert!(p.command("reboot").is_none());
        let args = |j: &str| serde_json::from_str::<serde_json::Map<String, Value>>(j).unwrap();
        assert!(notice.validate_args(&args(r#"{"text":"closing"}"#)).is_ok());
        assert!(notice
            .validate_args(&args(r#"{"text":"closing","minutes":15}"#))
            .is_ok());
        let reason = |j: &str| notice.validate_args(&args(j)).unwrap_err().reason;
        assert_eq!(reason(r#"{}"#), RejectReason::MissingField);
        assert_eq!(reason(r#"{"text":5}"#), RejectReason::WrongType);
        assert_eq!(
            reason(r#"{"text":"a","minutes":99}"#),
            RejectReason::OutOfRange
        );
        assert_eq!(
            reason(r#"{"text":"a","colour":"red"}"#),
            RejectReason::UnknownField
        );
        assert_eq!(
            reason(r#"{"text":"far too long a notice"}"#),
            RejectReason::OutOfRange
        );
    }

    #[test]
    fn bad_declarations_are_problems() {
        let p = Profile::from_json(
            r#"{"name":"p","description":"","telemetry":{"max_bytes":100},
                "commands":{"Bad Name":{},"x":{"reply_timeout_s":5},"y":{"reply":true,"reply_timeout_s":99999}}}"#,
        )
        .unwrap();
        let paths: Vec<String> = p.check().into_iter().map(|p| p.path).collect();
        assert!(paths.contains(&"commands.Bad Name".to_owned()), "{paths:?}");
        assert!(paths.contains(&"commands.x.reply_timeout_s".to_owned()));
        assert!(paths.contains(&"commands.y.reply_timeout_s".to_owned()));
    }
}
