//! Plain data shared by every module: device ids, message kinds, accepted and rejected
//! messages, presence events. No I/O, no tokio.

use std::fmt;

/// A device's configured id; also its MQTT username and the `ID` in `devices/ID/...`.
pub type DeviceId = String;

/// What a stored message is: the three topics a device publishes to,
/// `devices/ID/{telemetry|events|status}`, and the gateway's own hourly summary.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    Telemetry,
    Events,
    Status,
    /// A closed hour's branch summary, made by the gateway (never sent by a device).
    Summary,
    /// A change of a command's state, made by the gateway (never sent by a device).
    Command,
}

impl Kind {
    /// The kinds a device may send.
    pub const ALL: [Kind; 3] = [Kind::Telemetry, Kind::Events, Kind::Status];

    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Telemetry => "telemetry",
            Kind::Events => "events",
            Kind::Status => "status",
            Kind::Summary => "summary",
            Kind::Command => "command",
        }
    }

    /// A stored kind (including `summary`).
    pub fn parse_stored(s: &str) -> Option<Kind> {
        match s {
            "summary" => Some(Kind::Summary),
            "command" => Some(Kind::Command),
            other => Kind::parse(other),
        }
    }

    /// A device topic's kind (never `summary`).
    pub fn parse(s: &str) -> Option<Kind> {
        match s {
            "telemetry" => Some(Kind::Telemetry),
            "events" => Some(Kind::Events),
            "status" => Some(Kind::Status),
            _ => None,
        }
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a message was not accepted. The `as_str` names are stable: they are stored in
/// SQLite, shown by `branch-gateway devices` and used as metric labels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum RejectReason {
    /// The payload is not valid UTF-8 JSON.
    NotJson,
    /// The payload is JSON but not an object.
    NotObject,
    /// Larger than the profile's `max_bytes` for this kind.
    TooLarge,
    /// `devices/ID/<x>` where `<x>` is not a kind the profile declares.
    UnknownKind,
    /// An event whose type field names no declared event type.
    UnknownType,
    /// A required field is absent.
    MissingField,
    /// A field has the wrong JSON type.
    WrongType,
    /// A value is outside its declared range, length or allowed values.
    OutOfRange,
    /// A field the profile does not declare (profiles reject them unless told to drop them).
    UnknownField,
    /// `devices/ID/status` carried something other than `online` / `offline`.
    BadStatus,
    /// An object in the payload has the same key twice (at any depth): JSON parsers
    /// disagree on which value counts, so the message is not taken.
    DuplicateKey,
}

impl RejectReason {
    pub fn as_str(self) -> &'static str {
        match self {
            RejectReason::NotJson => "not_json",
            RejectReason::NotObject => "not_object",
            RejectReason::TooLarge => "too_large",
            RejectReason::UnknownKind => "unknown_kind",
            RejectReason::UnknownType => "unknown_type",
            RejectReason::MissingField => "missing_field",
            RejectReason::WrongType => "wrong_type",
            RejectReason::OutOfRange => "out_of_range",
            RejectReason::UnknownField => "unknown_field",
            RejectReason::BadStatus => "bad_status",
            RejectReason::DuplicateKey => "duplicate_key",
        }
    }
}

impl fmt::Display for RejectReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Cut `s` to at most `max` characters (on a char boundary), marking a cut with `…`.
pub fn truncate(s: &str, max: usize) -> String {
    match s.char_indices().nth(max) {
        Some((i, _)) => format!("{}…", &s[..i]),
        None => s.to_owned(),
    }
}

/// Characters of a payload value a rejection detail quotes at most (then `…`).
pub const QUOTED_CHARS: usize = 32;

/// What a detail shows instead of a quoted value for a profile with privacy fields.
pub const WITHHELD: &str = "<withheld>";

/// A rejection with the detail branch IT needs to fix the device ("field `result`: ...").
///
/// The detail is stored, logged and shown by `branch-gateway devices`. It quotes at most one
/// value the device sent (a field's value, an event type, a key), always through
/// [`Rejection::quoting`], which bounds it to [`QUOTED_CHARS`] characters and remembers where
/// it is, so [`Rejection::withhold_value`] can replace it for profiles with patron fields.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    pub reason: RejectReason,
    pub detail: String,
    /// The bytes of `detail` that quote a value the device sent.
    quoted: Option<std::ops::Range<usize>>,
}

impl Rejection {
    /// A rejection whose detail quotes nothing the device sent.
    pub fn new(reason: RejectReason, detail: impl Into<String>) -> Self {
        Rejection {
            reason,
            detail: detail.into(),
            quoted: None,
        }
    }

    /// `before` + the device's `value` (cut to [`QUOTED_CHARS`] characters, then `…`) +
    /// `after`. `debug` quotes the value as a string (`"on_fire"`); numbers go without.
    pub fn quoting(
        reason: RejectReason,
        before: &str,
        value: &str,
        debug: bool,
        after: &str,
    ) -> Self {
        let cut = truncate(value, QUOTED_CHARS);
        let shown = match debug {
            true => format!("{cut:?}"),
            false => cut,
        };
        let start = before.len();
        Rejection {
            reason,
            detail: format!("{before}{shown}{after}"),
            quoted: Some(start..start + shown.len()),
        }
    }

    /// Replace the quoted value (if any) by [`WITHHELD`].
    pub fn withhold_value(&mut self) {
        if let Some(range) = self.quoted.take() {
            self.detail.replace_range(range, WITHHELD);
        }
    }
}

impl fmt::Display for Rejection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.reason, self.detail)
    }
}

/// A validated message on its way to the buffer. `seq` is assigned by the buffer's
/// writer when the row is inserted (SQLite AUTOINCREMENT: never reused, even after pruning).
#[derive(Debug, Clone, PartialEq)]
pub struct Accepted {
    pub device: DeviceId,
    /// The device's profile when the message arrived (it goes into the upstream envelope).
    pub profile: String,
    pub kind: Kind,
    /// Milliseconds since the Unix epoch, taken by intake when the message arrived.
    pub received_ms: i64,
    /// The payload as stored: a JSON object's text for telemetry and events,
    /// `online` / `offline` for status.
    pub payload: String,
    /// When the message counts in the summaries (Unix ms: its event time if the profile
    /// names one, else `received_ms`), for the built-in `messages` count; `None` when it
    /// counts in none (rollups off, the gateway's own summaries).
    pub rollup_ms: Option<i64>,
    /// What the message adds to its profile's declared rollups: computed at intake (in
    /// parallel), folded into the rollup tables by the writer in the message's own
    /// transaction. Inline, so the writer frees nothing another thread allocated.
    pub contributions: DeclaredList,
}

/// A buffered message as the forwarder reads it back.
#[derive(Debug, Clone, PartialEq)]
pub struct Stored {
    pub seq: i64,
    pub device: DeviceId,
    pub profile: String,
    pub kind: Kind,
    pub received_ms: i64,
    pub payload: String,
}

impl Stored {
    pub fn as_ref(&self) -> StoredRef<'_> {
        StoredRef {
            seq: self.seq,
            device: &self.device,
            profile: &self.profile,
            kind: self.kind,
            received_ms: self.received_ms,
            payload: &self.payload,
        }
    }

    pub fn topic(&self, prefix: &str) -> String {
        self.as_ref().topic(prefix)
    }

    pub fn envelope(&self, branch: &str) -> String {
        self.as_ref().envelope(branch)
    }
}

/// A buffered message borrowed from a database row: the forwarder builds topic and
/// envelope straight from SQLite's memory, without owned copies of each column.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StoredRef<'a> {
    pub seq: i64,
    pub device: &'a str,
    pub profile: &'a str,
    pub kind: Kind,
    pub received_ms: i64,
    pub payload: &'a str,
}

impl StoredRef<'_> {
    /// `{prefix}/devices/ID/KIND` (or `{prefix}/summaries/hour` for the gateway's hourly
    /// summary; `{prefix}/devices/ID/command` for a command's state): where the central
    /// side receives this message.
    pub fn topic(&self, prefix: &str) -> String {
        if self.kind == Kind::Summary {
            return format!("{prefix}/summaries/hour");
        }
        let kind = self.kind.as_str();
        let mut t = String::with_capacity(prefix.len() + self.device.len() + kind.len() + 10);
        t.push_str(prefix);
        t.push_str("/devices/");
        t.push_str(self.device);
        t.push('/');
        t.push_str(kind);
        t
    }

    /// The upstream envelope (see README "Upstream contract"). The payload is embedded as
    /// received: telemetry and events are JSON objects (validated at intake), status is a
    /// string.
    pub fn envelope(&self, branch: &str) -> String {
        // Built by hand: this runs for every forwarded message and `format!` with a
        // formatted timestamp was a tenth of the forwarder's time.
        let mut e = String::with_capacity(
            110 + branch.len() + self.device.len() + self.profile.len() + self.payload.len(),
        );
        e.push_str(r#"{"seq":"#);
        e.push_str(itoa::Buffer::new().format(self.seq));
        e.push_str(r#","branch":"#);
        push_json_string(&mut e, branch);
        e.push_str(r#","device":"#);
        push_json_string(&mut e, self.device);
        e.push_str(r#","profile":"#);
        push_json_string(&mut e, self.profile);
        e.push_str(r#","kind":""#);
        e.push_str(self.kind.as_str());
        e.push_str(r#"","received_at":""#);
        push_rfc3339_ms(&mut e, self.received_ms);
        e.push_str(r#"","data":"#);
        match self.kind {
            Kind::Status => push_json_string(&mut e, self.payload),
            Kind::Telemetry | Kind::Events | Kind::Summary | Kind::Command => {
                e.push_str(self.payload)
            }
        }
        e.push('}');
        e
    }
}

/// Append `s` as a JSON string literal.
fn push_json_string(out: &mut String, s: &str) {
    let plain = s
        .bytes()
        .all(|b| b >= 0x20 && b != b'"' && b != b'\\' && b < 0x7f);
    if plain {
        out.push('"');
        out.push_str(s);
        out.push('"');
    } else {
        out.push_str(&serde_json::Value::String(s.to_owned()).to_string());
    }
}

/// A message intake refused; kept (truncated) in the bounded `rejected` table.
#[derive(Debug, Clone, PartialEq)]
pub struct Rejected {
    pub device: DeviceId,
    /// The topic's last segment as sent (may be a kind the profile does not know).
    pub kind: String,
    pub received_ms: i64,
    pub rejection: Rejection,
    /// The first bytes of the payload, lossily decoded, for branch IT to look at.
    pub excerpt: String,
}

/// A device went online or offline, with the connections it opened and closed since the
/// last change was recorded (a device may reconnect several times in between).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Presence {
    pub device: DeviceId,
    pub online: bool,
    pub at_ms: i64,
    pub connects: u32,
    pub disconnects: u32,
    /// Time online since the last change recorded, as (from, to) Unix ms pieces in order:
    /// closed connections, and the part of an open one up to now. They add up to the
    /// device's `online_minutes`, each in its own hours.
    pub online_pieces: Vec<(i64, i64)>,
    /// While online: up to when its time online is recorded (the end of the last piece);
    /// after a crash, the rest up to the last moment the gateway was known alive is added.
    pub online_recorded_to: Option<i64>,
}

/// Where the broker hands every allowed device publish, synchronously, before it is
/// acknowledged to the device. An implementation may block (inside `block_in_place`) when
/// its queue is full: that holds the device's connection, which is the backpressure.
pub trait PublishSink: Send + Sync {
    /// What became of one device message; see [`Capture`]. With `receipts`, what is
    /// queued carries the connection's next receipt (see [`crate::receipt`]).
    fn capture(
        &self,
        topic: &[u8],
        payload: &[u8],
        receipts: Option<&std::sync::Arc<crate::receipt::Receipts>>,
    ) -> Capture;
}

/// What intake did with a device message handed to it by the broker or a serial reader.
/// The number is the receipt of what was queued for it (0 when nothing was queued, or
/// without receipts): its acknowledgement waits for that commit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Capture {
    /// Accepted or rejected by its profile (or for no configured device, receipt 0):
    /// it will be committed.
    Taken(u64),
    /// Refused before queueing because the device is over its profile's rate limit;
    /// counted, never stored. MQTT 5 devices get PUBACK reason 0x96 (message rate too high).
    RateLimited(u64),
    /// Not taken: the gateway is stopping. The caller must not acknowledge it.
    Closing,
}

/// A command on its way to one device connection: the broker writes it as a QoS 1
/// PUBLISH on `topic` (`devices/ID/commands/NAME`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceCommand {
    pub command_id: String,
    /// Not written after this (Unix ms): it expired on its way.
    pub expires_ms: i64,
    pub topic: String,
    /// `{"command_id": ..., "args": {...}}`.
    pub payload: Vec<u8>,
}

/// What the broker tells the command dispatcher about a device's connections.
#[derive(Debug)]
pub enum CommandLink {
    /// Connection `connection` of `device` has a subscription to its commands: `mailbox`
    /// takes the next command (one in flight per device).
    Ready {
        device: DeviceId,
        connection: u64,
        mailbox: tokio::sync::mpsc::Sender<DeviceCommand>,
    },
    /// That connection closed or dropped its command subscription.
    Gone { device: DeviceId, connection: u64 },
    /// The connection cannot take this command: `why` is `not_subscribed` (no
    /// subscription matches its topic), `too_large` (over the device's Maximum Packet Size)
    /// or `expired`. Nothing was written.
    Refused {
        device: DeviceId,
        connection: u64,
        command_id: String,
        why: &'static str,
    },
    /// The device acknowledged the command (PUBACK, with its MQTT 5 reason code; 0 on
    /// 3.1.1 and for a serial line's write).
    Acked {
        device: DeviceId,
        connection: u64,
        command_id: String,
        reason: u8,
    },
}

/// How many [`CommandLink`] reports may wait for the dispatcher (connections wait past it).
pub const COMMAND_LINKS: usize = 1024;

/// A message central sent the gateway on its upstream connection (`topic` without the
/// prefix: `commands/devices/ID` or `branch/notices`); `stored` is answered once it is
/// durable, and only then does central get its PUBACK.
#[derive(Debug)]
pub struct FromCentral {
    pub topic: String,
    pub payload: Vec<u8>,
    pub stored: tokio::sync::oneshot::Sender<()>,
}

/// Messages from central that may wait for the dispatcher.
pub const FROM_CENTRAL: usize = 256;

/// A command posted to the HTTP API; answered with the command's JSON (its state), or
/// with why it cannot be stored at all.
#[derive(Debug)]
pub struct CommandRequest {
    pub device: DeviceId,
    pub body: Vec<u8>,
    pub answer: tokio::sync::oneshot::Sender<Result<serde_json::Value, String>>,
}

/// Milliseconds since the Unix epoch from the system clock.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// RFC 3339 UTC with milliseconds, e.g. `2026-11-25T10:15:00.123Z`.
pub fn format_ms(ms: i64) -> String {
    let mut s = String::with_capacity(24);
    push_rfc3339_ms(&mut s, ms);
    s
}

/// Append `ms` (Unix milliseconds) as RFC 3339 UTC with milliseconds. Outside the years
/// 0-9999 the plain number is written instead.
fn push_rfc3339_ms(out: &mut String, ms: i64) {
    let (secs, millis) = (ms.div_euclid(1000), ms.rem_euclid(1000) as u32);
    let Ok(t) = time::OffsetDateTime::from_unix_timestamp(secs) else {
        out.push_str(itoa::Buffer::new().format(ms));
        return;
    };
    let (year, month, day) = t.to_calendar_date();
    if !(0..=9999).contains(&year) {
        out.push_str(itoa::Buffer::new().format(ms));
        return;
    }
    let mut b = *b"0000-00-00T00:00:00.000Z";
    let mut put = |at: usize, width: usize, mut v: u32| {
        for i in (at..at + width).rev() {
            b[i] = b'0' + (v % 10) as u8;
            v /= 10;
        }
    };
    put(0, 4, year as u32);
    put(5, 2, month as u32);
    put(8, 2, day as u32);
    put(11, 2, t.hour() as u32);
    put(14, 2, t.minute() as u32);
    put(17, 2, t.second() as u32);
    put(20, 3, millis);
    out.push_str(std::str::from_utf8(&b).expect("ASCII digits"));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_round_trip() {
        for k in Kind::ALL {
            assert_eq!(Kind::parse(k.as_str()), Some(k));
        }
        assert_eq!(Kind::parse("commands"), None);
    }

    #[test]
    fn envelope_is_exact() {
        let m = Stored {
            seq: 42,
            device: "kiosk-01".into(),
            profile: "self-check-kiosk".into(),
            kind: Kind::Events,
            received_ms: 1_764_065_700_123,
            payload: r#"{"event":"loan","ok":true}"#.into(),
        };
        assert_eq!(m.topic("library/b1"), "library/b1/devices/kiosk-01/events");
        assert_eq!(
            m.envelope("b1"),
            r#"{"seq":42,"branch":"b1","device":"kiosk-01","profile":"self-check-kiosk","kind":"events","received_at":"2025-11-25T10:15:00.123Z","data":{"event":"loan","ok":true}}"#
        );
        let status = Stored {
            kind: Kind::Status,
            payload: "offline".into(),
            ..m
        };
        let v: serde_json::Value = serde_json::from_str(&status.envelope("b\"1")).unwrap();
        assert_eq!(v["data"], "offline");
        assert_eq!(v["branch"], "b\"1");
    }

    #[test]
    fn formats_rfc3339_millis() {
        assert_eq!(format_ms(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(format_ms(1_764_065_700_123), "2025-11-25T10:15:00.123Z");
        assert_eq!(format_ms(-1), "1969-12-31T23:59:59.999Z");
        assert_eq!(format_ms(253_402_300_799_999), "9999-12-31T23:59:59.999Z");
        // Agrees with the `time` crate's formatter across a spread of instants.
        let fmt = time::macros::format_description!(
            "[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:3]Z"
        );
        for i in 0..2000i64 {
            let ms = i * 1_234_567_891 % 4_102_444_800_000;
            let t =
                time::OffsetDateTime::from_unix_timestamp_nanos(ms as i128 * 1_000_000).unwrap();
            assert_eq!(format_ms(ms), t.format(&fmt).unwrap(), "{ms}");
        }
    }
}

/// How a summary metric combines the values it gets (declared in device profiles).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RollupOp {
    Count,
    Sum,
    Min,
    Max,
    /// The value of the newest message in the bucket.
    Last,
    /// How many different values (e.g. hashed patron ids) the bucket saw.
    Distinct,
}

impl RollupOp {
    pub fn as_str(self) -> &'static str {
        match self {
            RollupOp::Count => "count",
            RollupOp::Sum => "sum",
            RollupOp::Min => "min",
            RollupOp::Max => "max",
            RollupOp::Last => "last",
            RollupOp::Distinct => "distinct",
        }
    }
}

/// A summary metric's name, interned for the life of the process: contributions copy one
/// thin pointer (no reference count touched on two threads per message), and equal names
/// share one address, which is what equality and hashing compare.
#[derive(Clone, Copy)]
pub struct Metric(&'static String);

impl Metric {
    pub fn new(name: &str) -> Metric {
        use std::collections::HashMap;
        use std::sync::{LazyLock, Mutex};
        // Bounded by the distinct names profiles ever declare (reloads reuse them).
        static NAMES: LazyLock<Mutex<HashMap<&'static str, &'static String>>> =
            LazyLock::new(Default::default);
        let mut names = NAMES.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(&known) = names.get(name) {
            return Metric(known);
        }
        let leaked: &'static String = Box::leak(Box::new(name.to_owned()));
        names.insert(leaked.as_str(), leaked);
        Metric(leaked)
    }

    pub fn as_str(self) -> &'static str {
        self.0.as_str()
    }
}

impl PartialEq for Metric {
    fn eq(&self, other: &Metric) -> bool {
        std::ptr::eq(self.0, other.0)
    }
}

impl Eq for Metric {}

impl std::hash::Hash for Metric {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        (self.0 as *const String as usize).hash(state);
    }
}

impl PartialOrd for Metric {
    fn partial_cmp(&self, other: &Metric) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Metric {
    fn cmp(&self, other: &Metric) -> std::cmp::Ordering {
        self.as_str().cmp(other.as_str())
    }
}

impl std::ops::Deref for Metric {
    type Target = str;
    fn deref(&self) -> &str {
        self.as_str()
    }
}

impl std::fmt::Debug for Metric {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Debug::fmt(self.as_str(), f)
    }
}

impl std::fmt::Display for Metric {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl<'de> serde::Deserialize<'de> for Metric {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Metric, D::Error> {
        let name = String::deserialize(d)?;
        Ok(Metric::new(&name))
    }
}

impl From<&str> for Metric {
    fn from(name: &str) -> Metric {
        Metric::new(name)
    }
}

/// What one message adds to one summary metric, at a time of its own (the built-in
/// counts, online minutes, recounts).
#[derive(Debug, Clone, PartialEq)]
pub struct Contribution {
    pub metric: Metric,
    pub op: RollupOp,
    /// When it happened (Unix ms): the hour and day are chosen from this.
    pub at_ms: i64,
    pub value: Sample,
}

/// A declared rollup's metric and operation, interned for the life of the process (like
/// [`Metric`]): one thin pointer in each [`Declared`].
#[derive(Clone, Copy)]
pub struct RuleRef(&'static (Metric, RollupOp));

impl RuleRef {
    pub fn new(metric: Metric, op: RollupOp) -> RuleRef {
        use std::collections::HashMap;
        use std::sync::{LazyLock, Mutex};
        // Bounded by the rules profiles ever declare (reloads reuse them).
        type Table = HashMap<(Metric, RollupOp), &'static (Metric, RollupOp)>;
        static RULES: LazyLock<Mutex<Table>> = LazyLock::new(Default::default);
        let mut rules = RULES.lock().unwrap_or_else(|p| p.into_inner());
        let rule = *rules
            .entry((metric, op))
            .or_insert_with(|| Box::leak(Box::new((metric, op))));
        RuleRef(rule)
    }

    pub fn metric(self) -> Metric {
        self.0 .0
    }

    pub fn op(self) -> RollupOp {
        self.0 .1
    }
}

impl std::fmt::Debug for RuleRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.metric(), self.op().as_str())
    }
}

impl PartialEq for RuleRef {
    fn eq(&self, other: &RuleRef) -> bool {
        std::ptr::eq(self.0, other.0)
    }
}

/// What one message adds to one of its profile's declared rollups; the time is the
/// message's own ([`Accepted::rollup_ms`]). 16 bytes and no heap: a message carries up to
/// four inline from intake to the writer, so the writer frees nothing intake allocated.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Declared {
    rule: RuleRef,
    /// The sample's 64 bits: an `f64` for numeric operations, the key for `distinct`.
    bits: u64,
}

impl Declared {
    /// A numeric sample (a `count` is 1).
    pub fn num(rule: RuleRef, x: f64) -> Declared {
        Declared {
            rule,
            bits: x.to_bits(),
        }
    }

    /// A value counted by a `distinct` rule, as its [`distinct_key`].
    pub fn distinct(rule: RuleRef, key: u64) -> Declared {
        Declared { rule, bits: key }
    }

    pub fn metric(&self) -> Metric {
        self.rule.metric()
    }

    pub fn op(&self) -> RollupOp {
        self.rule.op()
    }

    pub fn value(&self) -> Sample {
        match self.op() {
            RollupOp::Distinct => Sample::Distinct(self.bits),
            _ => Sample::Num(f64::from_bits(self.bits)),
        }
    }
}

/// A message's declared contributions: up to four inline (the most any shipped profile
/// applies to one message), more on the heap.
pub type DeclaredList = smallvec::SmallVec<[Declared; 4]>;

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Sample {
    Num(f64),
    /// A value counted by `distinct`, as its [`distinct_key`]: the writer and the database
    /// keep 8 bytes per value instead of the text (which may be a patron's hashed id).
    Distinct(u64),
}

/// The key a `distinct` rollup counts a value by: the 64-bit XXH3 of its text. XXH3's
/// output is fixed by its specification, so keys stored in `rollup_distinct_keys` stay valid
/// across versions; two of a million values share a key with odds of about 1 in 30 million.
pub fn distinct_key(text: &str) -> u64 {
    xxhash_rust::xxh3::xxh3_64(text.as_bytes())
}

/// A duration in seconds for people: `42 s`, `7 min`, `2.5 h`.
pub fn ago_secs(s: i64) -> String {
    match s {
        0..=59 => format!("{s} s"),
        60..=3599 => format!("{} min", s / 60),
        _ => format!("{:.1} h", s as f64 / 3600.0),
    }
}

/// How long ago, for people: `42s ago`, `7m ago`, `3h ago`, `2d ago`.
pub fn ago(ms: i64) -> String {
    let s = ms.max(0) / 1000;
    match s {
        0..=59 => format!("{s}s ago"),
        60..=3599 => format!("{}m ago", s / 60),
        3600..=86399 => format!("{}h ago", s / 3600),
        _ => format!("{}d ago", s / 86400),
    }
}
