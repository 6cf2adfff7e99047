//! Device profiles: the JSON contract of one device type, and the pure check of a payload
//! against it. No I/O here beyond `Profile::from_json`; `config::load` reads the files.
//!
//! A profile names, per kind (`telemetry`, `events`), the fields a payload may carry, their
//! JSON types, whether they are required, their ranges or allowed values, and a size limit.
//! Events carry a type field (`"event"` by default) that selects one of the declared event
//! types, each with its own fields on top of the kind's common fields.

use std::collections::BTreeMap;

use serde::Deserialize;
use serde_json::Value;

use crate::model::{Kind, RejectReason, Rejection};

/// The largest `max_bytes` a profile may declare; the broker's packet limit is derived from it.
pub const MAX_PAYLOAD_LIMIT: usize = 256 * 1024;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Profile {
    /// Must equal the file name without `.json`.
    pub name: String,
    pub description: String,
    pub telemetry: Option<KindSpec>,
    pub events: Option<KindSpec>,
    /// For devices on a serial line: how their bytes become telemetry.
    #[serde(default)]
    pub serial: Option<super::serial_spec::SerialSpec>,
    /// What this device type contributes to the hourly and daily summaries.
    #[serde(default)]
    pub rollups: Vec<RollupSpec>,
    /// A payload field with the time the reading or event happened (RFC 3339 text or Unix
    /// milliseconds); rollups use it instead of the receive time, so late data lands in
    /// its own (past) hour.
    #[serde(default)]
    pub time_field: Option<String>,
    /// Messages and bytes per second each device of this profile may send (intake
    /// refuses the rest as `rate_limited`); none by default.
    #[serde(default)]
    pub rate_limit: Option<super::rate_limit::RateLimit>,
    /// Commands central may send devices of this profile (see `command_spec`).
    #[serde(default)]
    pub commands: BTreeMap<String, super::command_spec::CommandSpec>,
}

/// One summary metric fed by this profile's messages.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RollupSpec {
    /// The metric's name in summaries (shared across profiles: loans from every kiosk add up).
    pub metric: crate::model::Metric,
    pub kind: RollupKind,
    /// Only messages of this event type (the kind's `type_field` value).
    #[serde(default, rename = "type")]
    pub event_type: Option<String>,
    pub op: RollupOp,
    /// The field the operation reads (not for `count`).
    #[serde(default)]
    pub field: Option<String>,
    /// Only messages whose fields equal these values.
    #[serde(default, rename = "where")]
    pub filter: BTreeMap<String, Value>,
    /// Multiply the field's value (e.g. 0.0166667 turns seconds into minutes).
    #[serde(default)]
    pub scale: Option<f64>,
    /// `metric` and `op` interned, found on first use (then one atomic load per message).
    #[serde(skip)]
    rule: std::sync::OnceLock<crate::model::RuleRef>,
}

impl RollupSpec {
    pub fn rule(&self) -> crate::model::RuleRef {
        *self
            .rule
            .get_or_init(|| crate::model::RuleRef::new(self.metric, self.op))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RollupKind {
    Telemetry,
    Events,
}

pub use crate::model::RollupOp;

/// Metrics every device gets without declaring them.
pub const BUILTIN_METRICS: [&str; 4] =
    ["messages", "rejected", "online_minutes", "offline_episodes"];

/// What to do with a payload field the profile does not declare.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum UnknownFields {
    /// Refuse the message (`unknown_field`): the strict default, so a contract drift is seen.
    #[default]
    Reject,
    /// Accept the message without the field: an allow-list, for devices that send extras.
    Drop,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KindSpec {
    /// Largest accepted payload in bytes.
    pub max_bytes: usize,
    /// Expected interval between messages, in seconds (documentation and the simulator).
    #[serde(default)]
    pub interval_s: Option<u64>,
    #[serde(default)]
    pub unknown_fields: UnknownFields,
    /// Fields every message of this kind may carry.
    #[serde(default)]
    pub fields: BTreeMap<String, FieldSpec>,
    /// For events: the field whose value selects an entry of `types`.
    #[serde(default)]
    pub type_field: Option<String>,
    /// Event types, each with its own fields (added to `fields`).
    #[serde(default)]
    pub types: BTreeMap<String, TypeSpec>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TypeSpec {
    #[serde(default)]
    pub description: Option<String>,
    /// Relative frequency of this type in simulated traffic (default 1).
    #[serde(default)]
    pub weight: Option<u32>,
    #[serde(default)]
    pub fields: BTreeMap<String, FieldSpec>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FieldType {
    String,
    Integer,
    Number,
    Boolean,
    Object,
    Array,
}

impl FieldType {
    fn as_str(self) -> &'static str {
        match self {
            FieldType::String => "string",
            FieldType::Integer => "integer",
            FieldType::Number => "number",
            FieldType::Boolean => "boolean",
            FieldType::Object => "object",
            FieldType::Array => "array",
        }
    }

    fn matches(self, v: &Value) -> bool {
        match self {
            FieldType::String => v.is_string(),
            FieldType::Integer => v.is_i64() || v.is_u64(),
            FieldType::Number => v.is_number(),
            FieldType::Boolean => v.is_boolean(),
            FieldType::Object => v.is_object(),
            FieldType::Array => v.is_array(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FieldSpec {
    #[serde(rename = "type")]
    pub ty: FieldType,
    #[serde(default = "default_true")]
    pub required: bool,
    #[serde(default)]
    pub description: Option<String>,
    /// Inclusive bounds for integers and numbers.
    #[serde(default)]
    pub min: Option<f64>,
    #[serde(default)]
    pub max: Option<f64>,
    /// Length bounds for strings (in characters) and arrays (in items).
    #[serde(default)]
    pub min_length: Option<usize>,
    #[serde(default)]
    pub max_length: Option<usize>,
    /// Allowed values (strings or numbers).
    #[serde(default, rename = "enum")]
    pub allowed: Option<Vec<Value>>,
    /// Sample values for the simulator and the docs; each must pass this field's checks.
    #[serde(default)]
    pub examples: Vec<Value>,
    /// Patron data: removed (`drop`) or replaced by a keyed hash (`hash`) at intake,
    /// before anything is stored, logged or forwarded.
    #[serde(default)]
    pub privacy: Option<Privacy>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Privacy {
    /// The field never leaves the device's message: removed before storage.
    Drop,
    /// Replaced by `HMAC-SHA256(branch secret, value)` in hex: distinct values can be
    /// counted upstream, nobody can be identified without the branch's secret.
    Hash,
}

/// The branch's privacy key (`[privacy] hmac_secret`).
pub type PrivacyKey = [u8];

/// `HMAC-SHA256(key, value)` in lowercase hex.
pub fn privacy_hash(key: &PrivacyKey, value: &str) -> String {
    use hmac::Mac;
    let mut mac =
        hmac::Hmac::<sha2::Sha256>::new_from_slice(key).expect("HMAC accepts any key length");
    mac.update(value.as_bytes());
    hex::encode(mac.finalize().into_bytes())
}

fn default_true() -> bool {
    true
}

/// A semantic problem in a profile, found by [`Profile::check`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProfileProblem {
    /// Where in the file, e.g. `events.types.loan.fields.result`.
    pub path: String,
    pub message: String,
}

impl Profile {
    pub fn from_json(text: &str) -> Result<Profile, serde_json::Error> {
        serde_json::from_str(text)
    }

    pub fn kind(&self, kind: Kind) -> Option<&KindSpec> {
        match kind {
            Kind::Telemetry => self.telemetry.as_ref(),
            Kind::Events => self.events.as_ref(),
            Kind::Status | Kind::Summary | Kind::Command => None,
        }
    }

    /// Largest payload any kind of this profile accepts.
    pub fn max_bytes(&self) -> usize {
        [&self.telemetry, &self.events]
            .into_iter()
            .flatten()
            .map(|k| k.max_bytes)
            .max()
            .unwrap_or(0)
    }

    /// Semantic checks serde cannot express; every problem is reported, not just the first.
    pub fn check(&self) -> Vec<ProfileProblem> {
        let mut problems = Vec::new();
        if self.telemetry.is_none() && self.events.is_none() {
            problems.push(problem("", "a profile needs `telemetry`, `events` or both"));
        }
        for (kind, spec) in [("telemetry", &self.telemetry), ("events", &self.events)] {
            if let Some(spec) = spec {
                spec.check(kind, &mut problems);
            }
        }
        if let Some(serial) = &self.serial {
            serial.check(self.telemetry.as_ref().map(|t| &t.fields), &mut problems);
        }
        for (i, r) in self.rollups.iter().enumerate() {
            self.check_rollup(&format!("rollups[{i}]"), r, &mut problems);
        }
        if let Some(limit) = &self.rate_limit {
            limit.check(self.max_bytes(), &mut problems);
        }
        self.check_commands(&mut problems);
        problems
    }

    fn check_rollup(&self, path: &str, r: &RollupSpec, problems: &mut Vec<ProfileProblem>) {
        let name_ok = !r.metric.is_empty()
            && r.metric.len() <= 64
            && r.metric
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
        if !name_ok || BUILTIN_METRICS.contains(&&*r.metric) {
            problems.push(problem(
                path,
                format!(
                    "metric {:?} must be 1-64 of a-z 0-9 _ and not a built-in one",
                    r.metric
                ),
            ));
        }
        let spec = match r.kind {
            RollupKind::Telemetry => self.telemetry.as_ref(),
            RollupKind::Events => self.events.as_ref(),
        };
        let Some(spec) = spec else {
            problems.push(problem(path, "the profile does not declare this `kind`"));
            return;
        };
        let type_fields = match &r.event_type {
            Some(t) => match spec.types.get(t) {
                Some(ts) => Some(&ts.fields),
                None => {
                    problems.push(problem(path, format!("type {t:?} is not declared")));
                    return;
                }
            },
            None => None,
        };
        let declared = |name: &str| {
            spec.fields
                .get(name)
                .or_else(|| type_fields.and_then(|f| f.get(name)))
        };
        match (&r.field, r.op) {
            (None, RollupOp::Count) => {}
            (Some(_), RollupOp::Count) => problems.push(problem(path, "`count` takes no `field`")),
            (None, _) => problems.push(problem(
                path,
                format!("`{}` needs a `field`", r.op.as_str()),
            )),
            (Some(f), op) => match declared(f) {
                None => problems.push(problem(path, format!("field {f:?} is not declared"))),
                Some(fs) => {
                    let numeric = matches!(fs.ty, FieldType::Integer | FieldType::Number);
                    if op != RollupOp::Distinct && !numeric {
                        problems.push(problem(
                            path,
                            format!("`{}` needs a numeric field", op.as_str()),
                        ));
                    }
                    if fs.privacy == Some(Privacy::Drop) {
                        problems.push(problem(path, format!("field {f:?} is dropped at intake")));
                    }
                }
            },
        }
        for name in r.filter.keys() {
            if declared(name).is_none() && Some(name) != spec.type_field.as_ref() {
                problems.push(problem(
                    path,
                    format!("`where` field {name:?} is not declared"),
                ));
            }
        }
    }

    /// Check one payload of `kind` against this profile. On success returns the payload to
    /// store (undeclared fields removed where the profile says `drop`).
    pub fn validate(&self, kind: Kind, payload: &[u8]) -> Result<String, Rejection> {
        self.validate_with(kind, payload, None)
    }

    /// Whether any field carries a privacy rule (then refused payloads keep no excerpt and
    /// their details quote no value).
    pub fn has_privacy_fields(&self) -> bool {
        [&self.telemetry, &self.events]
            .into_iter()
            .flatten()
            .any(|spec| {
                let types = spec.types.values().flat_map(|t| t.fields.values());
                spec.fields
                    .values()
                    .chain(types)
                    .any(|f| f.privacy.is_some())
            })
    }

    /// Fields this profile marks `hash`, as `kind.path` names (for the config check).
    pub fn hashed_fields(&self) -> Vec<String> {
        let mut out = Vec::new();
        for (kind, spec) in [("telemetry", &self.telemetry), ("events", &self.events)] {
            let Some(spec) = spec else { continue };
            let types = spec.types.values().flat_map(|t| t.fields.iter());
            for (name, f) in spec.fields.iter().chain(types) {
                if f.privacy == Some(Privacy::Hash) {
                    out.push(format!("{kind}.{name}"));
                }
            }
        }
        out
    }

    /// Check a payload and apply the privacy rules: `drop` fields are removed, `hash`
    /// fields replaced by their keyed hash (removed too when no key is given).
    pub fn validate_with(
        &self,
        kind: Kind,
        payload: &[u8],
        key: Option<&PrivacyKey>,
    ) -> Result<String, Rejection> {
        self.validate_parsed(kind, payload, key).map(|v| v.payload)
    }

    /// [`Profile::validate_with`], also handing back the parsed object (as stored), so
    /// intake reads rollup fields without parsing the payload again.
    pub fn validate_parsed(
        &self,
        kind: Kind,
        payload: &[u8],
        key: Option<&PrivacyKey>,
    ) -> Result<Validated, Rejection> {
        if kind == Kind::Status {
            return validate_status(payload).map(|payload| Validated {
                payload,
                fields: None,
            });
        }
        let Some(spec) = self.kind(kind) else {
            return Err(Rejection::new(
                RejectReason::UnknownKind,
                format!("profile `{}` declares no `{kind}`", self.name),
            ));
        };
        spec.validate(payload, key).map_err(|mut r| {
            // A refused message of a profile with patron fields may carry them anywhere
            // (a card number typed into a free-text field): its detail quotes nothing.
            if self.has_privacy_fields() {
                r.withhold_value();
            }
            r
        })
    }
}

/// `devices/ID/status` carries exactly `online` or `offline` (surrounding whitespace allowed).
pub fn validate_status(payload: &[u8]) -> Result<String, Rejection> {
    match std::str::from_utf8(payload).map(str::trim) {
        Ok("online") => Ok("online".to_owned()),
        Ok("offline") => Ok("offline".to_owned()),
        _ => Err(Rejection::new(
            RejectReason::BadStatus,
            "status must be `online` or `offline`",
        )),
    }
}

fn problem(path: &str, message: impl Into<String>) -> ProfileProblem {
    ProfileProblem {
        path: path.to_owned(),
        message: message.into(),
    }
}

impl KindSpec {
    fn check(&self, kind: &str, problems: &mut Vec<ProfileProblem>) {
        if self.max_bytes == 0 || self.max_bytes > MAX_PAYLOAD_LIMIT {
            problems.push(problem(
                &format!("{kind}.max_bytes"),
                format!("must be between 1 and {MAX_PAYLOAD_LIMIT}"),
            ));
        }
        for (name, field) in &self.fields {
            field.check(&format!("{kind}.fields.{name}"), problems);
        }
        match (&self.type_field, self.types.is_empty()) {
            (Some(tf), false) => {
                if self.fields.contains_key(tf) {
                    problems.push(problem(
                        &format!("{kind}.fields.{tf}"),
                        "the type field is implied by `types`; do not declare it in `fields`",
                    ));
                }
            }
            (Some(_), true) => problems.push(problem(
                &format!("{kind}.types"),
                "`type_field` is set but no `types` are declared",
            )),
            (None, false) => problems.push(problem(
                &format!("{kind}.type_field"),
                "`types` are declared but no `type_field` names the field that selects them",
            )),
            (None, true) => {}
        }
        for (tname, t) in &self.types {
            for (name, field) in &t.fields {
                let path = format!("{kind}.types.{tname}.fields.{name}");
                if self.fields.contains_key(name) {
                    problems.push(problem(
                        &path,
                        "already declared in the kind's common `fields`",
                    ));
                }
                field.check(&path, problems);
            }
        }
    }

    fn validate(&self, payload: &[u8], key: Option<&PrivacyKey>) -> Result<Validated, Rejection> {
        if payload.len() > self.max_bytes {
            return Err(Rejection::new(
                RejectReason::TooLarge,
                format!("{} bytes, limit {}", payload.len(), self.max_bytes),
            ));
        }
        // One parse, which also refuses a key repeated in any object (see `strict_json`).
        let value = super::strict_json::parse(payload).map_err(|e| match e {
            super::strict_json::StrictError::Syntax(e) => {
                Rejection::new(RejectReason::NotJson, truncate(&e.to_string(), 120))
            }
            super::strict_json::StrictError::DuplicateKey { key, line, column } => {
                Rejection::quoting(
                    RejectReason::DuplicateKey,
                    "key ",
                    &key,
                    true,
                    &format!(" appears twice in one object (line {line}, column {column})"),
                )
            }
        })?;
        let Value::Object(mut obj) = value else {
            return Err(Rejection::new(
                RejectReason::NotObject,
                format!("payload is a JSON {}, not an object", json_type(&value)),
            ));
        };
        let type_fields = match &self.type_field {
            Some(tf) => {
                let t = match obj.get(tf) {
                    None => {
                        return Err(Rejection::new(
                            RejectReason::MissingField,
                            format!("field `{tf}` is required"),
                        ))
                    }
                    Some(Value::String(s)) => s.as_str(),
                    Some(other) => {
                        return Err(Rejection::new(
                            RejectReason::WrongType,
                            format!("field `{tf}` must be string, got {}", json_type(other)),
                        ))
                    }
                };
                match self.types.get(t) {
                    Some(spec) => Some(&spec.fields),
                    None => {
                        return Err(Rejection::quoting(
                            RejectReason::UnknownType,
                            &format!("`{tf}` = "),
                            t,
                            true,
                            " is not a declared type",
                        ))
                    }
                }
            }
            None => None,
        };
        let declared = |name: &str| -> Option<&FieldSpec> {
            self.fields
                .get(name)
                .or_else(|| type_fields.and_then(|f| f.get(name)))
        };
        for (name, spec) in self.fields.iter().chain(type_fields.into_iter().flatten()) {
            match obj.get(name) {
                None | Some(Value::Null) if spec.required => {
                    return Err(Rejection::new(
                        RejectReason::MissingField,
                        format!("field `{name}` is required"),
                    ))
                }
                None | Some(Value::Null) => {}
                Some(v) => spec.validate(name, v).map_err(|r| match spec.privacy {
                    // A refused patron value must not end up in `rejected` or the logs.
                    Some(_) => Rejection::new(
                        r.reason,
                        format!("field `{name}` failed its checks (value withheld: privacy)"),
                    ),
                    None => r,
                })?,
            }
        }
        let mut dropped = false;
        for (name, spec) in self.fields.iter().chain(type_fields.into_iter().flatten()) {
            let Some(rule) = spec.privacy else { continue };
            match (rule, key, obj.get(name)) {
                (_, _, None) => continue,
                (Privacy::Hash, Some(key), Some(Value::String(v))) => {
                    let hashed = privacy_hash(key, v);
                    obj.insert(name.clone(), Value::String(hashed));
                }
                _ => {
                    obj.remove(name);
                }
            }
            dropped = true;
        }
        let unknown: Vec<String> = obj
            .keys()
            .filter(|k| Some(k.as_str()) != self.type_field.as_deref() && declared(k).is_none())
            .cloned()
            .collect();
        if let Some(first) = unknown.first() {
            match self.unknown_fields {
                UnknownFields::Reject => {
                    return Err(Rejection::quoting(
                        RejectReason::UnknownField,
                        "field ",
                        first,
                        true,
                        " is not in the profile",
                    ))
                }
                UnknownFields::Drop => {
                    for k in &unknown {
                        obj.remove(k);
                    }
                    dropped = true;
                }
            }
        }
        let payload = if dropped {
            // Serializing a map of JSON values cannot fail.
            serde_json::to_string(&obj).unwrap_or_default()
        } else {
            // Store the payload exactly as the device sent it: it parsed as JSON, so it is
            // UTF-8 (`from_utf8` checks ASCII quickly; `lossy` would copy char by char).
            std::str::from_utf8(payload)
                .map(str::to_owned)
                .unwrap_or_else(|_| String::from_utf8_lossy(payload).into_owned())
        };
        Ok(Validated {
            payload,
            fields: Some(obj),
        })
    }
}

/// An accepted payload: the text to store and, for JSON kinds, its top-level fields
/// (after the privacy rules, equal to the stored text).
#[derive(Debug)]
pub struct Validated {
    pub payload: String,
    pub fields: Option<serde_json::Map<String, Value>>,
}

impl FieldSpec {
    /// [`FieldSpec::check`] for other declarations (command arguments).
    pub(crate) fn check_spec(&self, path: &str, problems: &mut Vec<ProfileProblem>) {
        self.check(path, problems)
    }

    /// [`FieldSpec::validate`] for other values (command arguments).
    pub(crate) fn check_value(&self, name: &str, v: &Value) -> Result<(), Rejection> {
        self.validate(name, v)
    }

    fn check(&self, path: &str, problems: &mut Vec<ProfileProblem>) {
        let numeric = matches!(self.ty, FieldType::Integer | FieldType::Number);
        if (self.min.is_some() || self.max.is_some()) && !numeric {
            problems.push(problem(
                path,
                "`min`/`max` apply to integer and number fields only",
            ));
        }
        if let (Some(lo), Some(hi)) = (self.min, self.max) {
            if lo > hi {
                problems.push(problem(path, format!("min {lo} is greater than max {hi}")));
            }
        }
        let sized = matches!(self.ty, FieldType::String | FieldType::Array);
        if (self.min_length.is_some() || self.max_length.is_some()) && !sized {
            problems.push(problem(
                path,
                "`min_length`/`max_length` apply to strings and arrays only",
            ));
        }
        if let (Some(lo), Some(hi)) = (self.min_length, self.max_length) {
            if lo > hi {
                problems.push(problem(
                    path,
                    format!("min_length {lo} is greater than max_length {hi}"),
                ));
            }
        }
        if let Some(allowed) = &self.allowed {
            if allowed.is_empty() {
                problems.push(problem(path, "`enum` must list at least one value"));
            }
            for v in allowed {
                if !self.ty.matches(v) {
                    problems.push(problem(
                        path,
                        format!("enum value {v} is not of type {}", self.ty.as_str()),
                    ));
                }
            }
        }
        if self.privacy == Some(Privacy::Hash) && self.ty != FieldType::String {
            problems.push(problem(
                path,
                "`privacy: hash` applies to string fields only",
            ));
        }
        for ex in &self.examples {
            if let Err(r) = self.validate("example", ex) {
                problems.push(problem(
                    path,
                    format!("example {ex} fails its own checks: {r}"),
                ));
            }
        }
    }

    fn validate(&self, name: &str, v: &Value) -> Result<(), Rejection> {
        if !self.ty.matches(v) {
            return Err(Rejection::new(
                RejectReason::WrongType,
                format!(
                    "field `{name}` must be {}, got {}",
                    self.ty.as_str(),
                    json_type(v)
                ),
            ));
        }
        let out_of_range = |what: String| Err(Rejection::new(RejectReason::OutOfRange, what));
        // The value itself, quoted (bounded; withheld later for privacy profiles).
        let value_is = |after: String| {
            let (text, debug) = match v {
                Value::String(s) => (s.clone(), true),
                other => (other.to_string(), false),
            };
            Err(Rejection::quoting(
                RejectReason::OutOfRange,
                &format!("field `{name}` = "),
                &text,
                debug,
                &after,
            ))
        };
        if let Some(x) = v.as_f64() {
            if let Some(lo) = self.min {
                if x < lo {
                    return value_is(format!(" is below {lo}"));
                }
            }
            if let Some(hi) = self.max {
                if x > hi {
                    return value_is(format!(" is above {hi}"));
                }
            }
        }
        let len = match v {
            Value::String(s) => Some(s.chars().count()),
            Value::Array(a) => Some(a.len()),
            _ => None,
        };
        if let Some(len) = len {
            if let Some(lo) = self.min_length {
                if len < lo {
                    return out_of_range(format!("field `{name}` has length {len}, minimum {lo}"));
                }
            }
            if let Some(hi) = self.max_length {
                if len > hi {
                    return out_of_range(format!("field `{name}` has length {len}, maximum {hi}"));
                }
            }
        }
        if let Some(allowed) = &self.allowed {
            if !allowed.iter().any(|a| a == v || numbers_equal(a, v)) {
                return value_is(" is not one of the allowed values".into());
            }
        }
        Ok(())
    }
}

fn numbers_equal(a: &Value, b: &Value) -> bool {
    matches!((a.as_f64(), b.as_f64()), (Some(x), Some(y)) if x == y)
}

fn json_type(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(n) if n.is_f64() => "number",
        Value::Number(_) => "integer",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

pub use crate::model::truncate;

#[cfg(test)]
mod tests {
    use super::*;

    fn kiosk() -> Profile {
        Profile::from_json(
            r#"{
              "name": "k", "description": "test",
              "telemetry": { "max_bytes": 200, "fields": {
                  "uptime_s": {"type": "integer", "min": 0},
                  "printer": {"type": "string", "enum": ["ok", "paper_out"]},
                  "temp_c": {"type": "number", "required": false, "min": -20, "max": 90}
              }},
              "events": { "max_bytes": 300, "type_field": "event",
                  "fields": {"session_ref": {"type": "string", "max_length": 8}},
                  "types": {
                      "loan": {"fields": {"item": {"type": "string", "min_length": 3}, "ok": {"type": "boolean"}}},
                      "fault": {"fields": {"component": {"type": "string"}}}
                  }}
            }"#,
        )
        .unwrap()
    }

    fn reason(p: &Profile, kind: Kind, payload: &str) -> Option<RejectReason> {
        p.validate(kind, payload.as_bytes()).err().map(|r| r.reason)
    }

    #[test]
    fn shipped_shape_is_consistent() {
        assert_eq!(kiosk().check(), vec![]);
    }

    #[test]
    fn accepts_valid_payloads_verbatim() {
        let p = kiosk();
        let t = r#"{"uptime_s": 5, "printer": "ok"}"#;
        assert_eq!(p.validate(Kind::Telemetry, t.as_bytes()).unwrap(), t);
        let e = r#"{"event":"loan","session_ref":"ab","item":"3123","ok":true}"#;
        assert_eq!(p.validate(Kind::Events, e.as_bytes()).unwrap(), e);
        assert_eq!(p.validate(Kind::Status, b"online\n").unwrap(), "online");
    }

    #[test]
    fn each_reason() {
        use RejectReason::*;
        let p = kiosk();
        let cases = [
            (Kind::Telemetry, "not json", NotJson),
            (Kind::Telemetry, "[1,2]", NotObject),
            (Kind::Telemetry, r#"{"printer":"ok"}"#, MissingField),
            (
                Kind::Telemetry,
                r#"{"uptime_s":"5","printer":"ok"}"#,
                WrongType,
            ),
            (
                Kind::Telemetry,
                r#"{"uptime_s":1.5,"printer":"ok"}"#,
                WrongType,
            ),
            (
                Kind::Telemetry,
                r#"{"uptime_s":-1,"printer":"ok"}"#,
                OutOfRange,
            ),
            (
                Kind::Telemetry,
                r#"{"uptime_s":1,"printer":"on_fire"}"#,
                OutOfRange,
            ),
            (
                Kind::Telemetry,
                r#"{"uptime_s":1,"printer":"ok","temp_c":91}"#,
                OutOfRange,
            ),
            (
                Kind::Telemetry,
                r#"{"uptime_s":1,"printer":"ok","x":1}"#,
                UnknownField,
            ),
            (
                Kind::Events,
                r#"{"session_ref":"a","item":"123","ok":true}"#,
                MissingField,
            ),
            (
                Kind::Events,
                r#"{"event":"dance","session_ref":"a"}"#,
                UnknownType,
            ),
            (Kind::Events, r#"{"event":7,"session_ref":"a"}"#, WrongType),
            (
                Kind::Events,
                r#"{"event":"loan","session_ref":"a","item":"12","ok":true}"#,
                OutOfRange,
            ),
            (
                Kind::Events,
                r#"{"event":"loan","session_ref":"123456789","item":"123","ok":true}"#,
                OutOfRange,
            ),
            (
                Kind::Events,
                r#"{"event":"fault","session_ref":"a","component":"x","item":"1"}"#,
                UnknownField,
            ),
            (Kind::Status, "maybe", BadStatus),
            (
                Kind::Telemetry,
                r#"{"uptime_s":"EVIL","uptime_s":1,"printer":"ok"}"#,
                DuplicateKey,
            ),
        ];
        for (kind, payload, want) in cases {
            assert_eq!(reason(&p, kind, payload), Some(want), "{payload}");
        }
        let big = format!(
            r#"{{"uptime_s":1,"printer":"ok","pad":"{}"}}"#,
            "x".repeat(300)
        );
        assert_eq!(reason(&p, Kind::Telemetry, &big), Some(TooLarge));
    }

    #[test]
    fn repeated_keys_are_refused_at_any_depth() {
        let p = Profile::from_json(
            r#"{"name":"n","description":"","telemetry":{"max_bytes":300,"fields":{
                "n":{"type":"integer"},
                "meta":{"type":"object","required":false},
                "list":{"type":"array","required":false}}}}"#,
        )
        .unwrap();
        let detail = |payload: &str| {
            p.validate(Kind::Telemetry, payload.as_bytes())
                .map_err(|r| (r.reason, r.detail))
        };
        // serde_json alone would keep the last value and accept each of these.
        for payload in [
            r#"{"n":"EVIL","n":1}"#,
            r#"{"n":1,"meta":{"a":1,"a":2}}"#,
            r#"{"n":1,"list":[{"b":{"c":1,"c":"x"}}]}"#,
            r#"{"n":1,"\u006e":2}"#,
        ] {
            assert_eq!(
                detail(payload).err().map(|e| e.0),
                Some(RejectReason::DuplicateKey),
                "{payload}"
            );
        }
        assert_eq!(
            detail(r#"{"n":1,"meta":{"a":1,"a":2}}"#).unwrap_err().1,
            "key \"a\" appears twice in one object (line 1, column 24)"
        );
        // The same key in different objects is no repetition.
        assert!(detail(r#"{"n":1,"meta":{"n":1,"m":{"n":2}},"list":[{"n":1},{"n":2}]}"#).is_ok());
    }

    #[test]
    fn details_quote_values_bounded_and_withhold_them_for_privacy_profiles() {
        let long = "4111111111111111-and-some-more-text-after-it";
        let p = kiosk();
        let r = p
            .validate(
                Kind::Telemetry,
                format!(r#"{{"uptime_s":1,"printer":"{long}"}}"#).as_bytes(),
            )
            .unwrap_err();
        assert_eq!(
            r.detail,
            "field `printer` = \"4111111111111111-and-some-more-t…\" is not one of the allowed values"
        );
        let r = p
            .validate(
                Kind::Telemetry,
                format!(r#"{{"uptime_s":1,"printer":"ok","{long}":1}}"#).as_bytes(),
            )
            .unwrap_err();
        assert_eq!(
            (r.reason, r.detail.as_str()),
            (
                RejectReason::UnknownField,
                "field \"4111111111111111-and-some-more-t…\" is not in the profile"
            )
        );
        let r = p
            .validate(
                Kind::Telemetry,
                br#"{"uptime_s":-4111111111111111,"printer":"ok"}"#,
            )
            .unwrap_err();
        assert_eq!(r.detail, "field `uptime_s` = -4111111111111111 is below 0");

        // The same profile with one privacy-marked field: no detail quotes a value, whichever
        // field carries it.
        let mut private = kiosk();
        private
            .events
            .as_mut()
            .unwrap()
            .fields
            .get_mut("session_ref")
            .unwrap()
            .privacy = Some(Privacy::Drop);
        for (kind, payload, reason) in [
            (
                Kind::Telemetry,
                format!(r#"{{"uptime_s":1,"printer":"{long}"}}"#),
                RejectReason::OutOfRange,
            ),
            (
                Kind::Telemetry,
                format!(r#"{{"uptime_s":1,"printer":"ok","{long}":1}}"#),
                RejectReason::UnknownField,
            ),
            (
                Kind::Telemetry,
                r#"{"uptime_s":-4111111111111111,"printer":"ok"}"#.to_owned(),
                RejectReason::OutOfRange,
            ),
            (
                Kind::Events,
                format!(r#"{{"event":"{long}","session_ref":"a"}}"#),
                RejectReason::UnknownType,
            ),
            (
                Kind::Telemetry,
                format!(r#"{{"uptime_s":1,"printer":"ok","{long}":1,"{long}":2}}"#),
                RejectReason::DuplicateKey,
            ),
        ] {
            let r = private.validate(kind, payload.as_bytes()).unwrap_err();
            assert_eq!(r.reason, reason, "{payload}");
            assert!(r.detail.contains("<withheld>"), "{}", r.detail);
            assert!(!r.detail.contains("411111"), "{}", r.detail);
        }
    }

    #[test]
    fn drop_policy_removes_undeclared_fields() {
        let mut p = kiosk();
        p.telemetry.as_mut().unwrap().unknown_fields = UnknownFields::Drop;
        let out = p
            .validate(
                Kind::Telemetry,
                br#"{"uptime_s":1,"printer":"ok","card":"2123"}"#,
            )
            .unwrap();
        assert_eq!(out, r#"{"uptime_s":1,"printer":"ok"}"#);
    }

    #[test]
    fn check_finds_semantic_problems() {
        let p = Profile::from_json(
            r#"{"name":"x","description":"",
                "events":{"max_bytes":0,"types":{"a":{"fields":{
                   "n":{"type":"string","min":1},
                   "m":{"type":"integer","enum":["x"],"examples":[5]}}}}}}"#,
        )
        .unwrap();
        let paths: Vec<String> = p.check().into_iter().map(|p| p.path).collect();
        assert_eq!(
            paths,
            vec![
                "events.max_bytes",
                "events.type_field",
                "events.types.a.fields.m",
                "events.types.a.fields.m",
                "events.types.a.fields.n",
            ]
        );
    }

    #[test]
    fn unknown_profile_keys_are_errors() {
        let err =
            Profile::from_json(r#"{"name":"x","description":"","telemetri":{}}"#).unwrap_err();
        assert!(
            err.to_string().contains("unknown field `telemetri`"),
            "{err}"
        );
    }
}

#[cfg(test)]
mod shipped {
    use super::*;

    /// Every profile shipped in `device-profiles/` parses, passes `check()` (which also checks
    /// each field's examples against the field) and is named after its file.
    #[test]
    fn shipped_profiles_are_valid() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("device-profiles");
        let mut seen = 0;
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().and_then(|e| e.to_str()) != Some("json") {
                continue;
            }
            let text = std::fs::read_to_string(&path).unwrap();
            let p = Profile::from_json(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            assert_eq!(p.check(), vec![], "{}", path.display());
            assert_eq!(
                Some(p.name.as_str()),
                path.file_stem().and_then(|s| s.to_str())
            );
            seen += 1;
        }
        assert!(
            seen >= 8,
            "expected the five branch device types and three serial counters, found {seen}"
        );
    }
}
