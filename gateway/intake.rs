//! Intake: check each device message against its device's profile, stamp it with the
//! receive time and hand it to the buffer's writer.
//!
//! Messages arrive from the broker's protocol wrapper (every allowed publish, before it is
//! acknowledged) and from the will link (last wills). Invalid messages are counted per
//! device and reason (in the buffer), stored in the bounded `rejected` table, and logged
//! once per burst. When the writer's queue is full, the calling connection waits: the
//! device's acknowledgements are held back, nothing is dropped.
//!
//! A device whose profile sets a `rate_limit` is checked first, before validation: beyond
//! its token buckets ([`crate::limit`]) a message is refused as `rate_limited` (counted
//! per device, logged once per burst), never queued for storage. Devices of profiles
//! without a limit skip the check entirely.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Instant;

use tokio::sync::mpsc;

use crate::buffer::{BufferStats, Write};
use crate::burst::BurstLimiter;
use crate::config::rate_limit::RateLimit;
use crate::config::{Device, DeviceTable, SharedDevices};
use crate::limit::DeviceLimiter;
use crate::model::{
    now_ms, Accepted, Capture, DeviceId, Kind, PublishSink, RejectReason, Rejected, Rejection,
};
use crate::receipt::{Receipt, Receipts};

/// Bytes of a rejected payload kept for branch IT to look at.
pub const EXCERPT_BYTES: usize = 256;

#[derive(Debug, Default)]
pub struct IntakeStats {
    pub accepted: AtomicU64,
    pub rejected: AtomicU64,
    /// Messages on `devices/X/...` where X is no configured device (possible only
    /// between a reload that removed X and X's disconnection).
    pub unknown_device: AtomicU64,
    /// Times intake found the writer's queue full and had to wait (holding that device).
    pub writer_waits: AtomicU64,
    /// Messages dropped because the queue was full on a runtime that cannot wait
    /// (never in the daemon, which runs a multi-thread runtime).
    pub dropped_full: AtomicU64,
    /// Messages refused because their device was over its profile's `rate_limit`.
    pub rate_limited: AtomicU64,
}

/// What one message became. Pure: no I/O.
#[derive(Debug, PartialEq)]
pub enum Outcome {
    Accepted(Accepted),
    Rejected(Rejected),
    /// A device's reply to a command (`devices/ID/replies`).
    Reply {
        device: DeviceId,
        command_id: String,
        status: crate::buffer::commands::ReplyStatus,
        detail: String,
        at_ms: i64,
    },
    /// Not a device topic or not a configured device: nothing to store.
    Ignored,
}

/// Check one broker message. `received_ms` is the gateway's receive time.
pub fn classify(table: &DeviceTable, topic: &[u8], payload: &[u8], received_ms: i64) -> Outcome {
    match device_topic(table, topic) {
        Some((entry, kind_name)) => classify_for(table, entry, kind_name, payload, received_ms),
        None => Outcome::Ignored,
    }
}

/// The configured device and the kind segment of `devices/ID/KIND`.
fn device_topic<'t, 'a>(table: &'t DeviceTable, topic: &'a [u8]) -> Option<(&'t Device, &'a str)> {
    let (device, kind_name) = std::str::from_utf8(topic)
        .ok()?
        .strip_prefix("devices/")?
        .split_once('/')?;
    Some((table.get(device)?, kind_name))
}

/// [`classify`] for a message of a configured device.
fn classify_for(
    table: &DeviceTable,
    entry: &Device,
    kind_name: &str,
    payload: &[u8],
    received_ms: i64,
) -> Outcome {
    let device = entry.id.as_str();
    if kind_name == "replies" {
        return match parse_reply(payload) {
            Ok((command_id, status, detail)) => Outcome::Reply {
                device: device.to_owned(),
                command_id,
                status,
                detail,
                at_ms: received_ms,
            },
            Err(rejection) => Outcome::Rejected(Rejected {
                device: device.to_owned(),
                kind: "replies".into(),
                received_ms,
                rejection,
                excerpt: excerpt(payload),
            }),
        };
    }
    let result = match Kind::parse(kind_name) {
        Some(kind) => entry
            .profile
            .validate_parsed(kind, payload, table.privacy_key.as_deref())
            .map(|payload| (kind, payload)),
        None => Err({
            let mut r = Rejection::quoting(
                RejectReason::UnknownKind,
                "topic kind ",
                kind_name,
                true,
                " is not telemetry, events or status",
            );
            if entry.profile.has_privacy_fields() {
                r.withhold_value();
            }
            r
        }),
    };
    match result {
        Ok((kind, valid)) => {
            let fields = valid.fields.as_ref();
            let rollup_ms = table
                .rollups
                .then(|| crate::summary::rollup_time(&entry.profile, fields, received_ms));
            Outcome::Accepted(Accepted {
                device: device.to_owned(),
                profile: entry.profile.name.clone(),
                kind,
                received_ms,
                rollup_ms,
                contributions: match rollup_ms {
                    Some(_) => crate::summary::contributions_of(&entry.profile, kind, fields),
                    None => Default::default(),
                },
                payload: valid.payload,
            })
        }
        Err(rejection) => Outcome::Rejected(Rejected {
            device: device.to_owned(),
            kind: crate::config::profile::truncate(kind_name, 40),
            received_ms,
            rejection,
            // A refused message of a profile with patron fields may hold them in clear.
            excerpt: if entry.profile.has_privacy_fields() {
                String::from("(withheld: the profile has privacy fields)")
            } else {
                excerpt(payload)
            },
        }),
    }
}

/// Longest `detail` a reply may carry.
pub const MAX_REPLY_DETAIL: usize = 256;

/// `{"command_id": ..., "status": "succeeded" | "failed" | "in_progress", "detail": ...}`.
fn parse_reply(
    payload: &[u8],
) -> Result<(String, crate::buffer::commands::ReplyStatus, String), Rejection> {
    use crate::buffer::commands::ReplyStatus;
    if payload.len() > 1024 {
        return Err(Rejection::new(
            RejectReason::TooLarge,
            format!("{} bytes, limit 1024", payload.len()),
        ));
    }
    let value = crate::config::strict_json::parse(payload)
        .map_err(|_| Rejection::new(RejectReason::NotJson, "a reply is a JSON object"))?;
    let serde_json::Value::Object(o) = value else {
        return Err(Rejection::new(
            RejectReason::NotObject,
            "a reply is a JSON object",
        ));
    };
    if let Some(k) = o
        .keys()
        .find(|k| !matches!(k.as_str(), "command_id" | "status" | "detail"))
    {
        return Err(Rejection::quoting(
            RejectReason::UnknownField,
            "field ",
            k,
            true,
            " is not part of a reply",
        ));
    }
    let command_id = match o.get("command_id") {
        Some(serde_json::Value::String(s)) if !s.is_empty() && s.len() <= 128 => s.clone(),
        _ => {
            return Err(Rejection::new(
                RejectReason::MissingField,
                "field `command_id` (a string of 1-128 bytes) is required",
            ))
        }
    };
    let status = o
        .get("status")
        .and_then(|s| s.as_str())
        .and_then(ReplyStatus::parse)
        .ok_or_else(|| {
            Rejection::new(
                RejectReason::WrongType,
                "field `status` must be succeeded, failed or in_progress",
            )
        })?;
    let detail = match o.get("detail") {
        None | Some(serde_json::Value::Null) => String::new(),
        Some(serde_json::Value::String(s)) => s.chars().take(MAX_REPLY_DETAIL).collect(),
        Some(_) => {
            return Err(Rejection::new(
                RejectReason::WrongType,
                "field `detail` must be a string",
            ))
        }
    };
    Ok((command_id, status, detail))
}

fn excerpt(payload: &[u8]) -> String {
    let cut = &payload[..payload.len().min(EXCERPT_BYTES)];
    String::from_utf8_lossy(cut).into_owned()
}

/// Intake's end of the broker: validates each device publish and queues it for the
/// writer. Called synchronously from the broker's protocol wrapper for every allowed
/// publish, and from the will link for last wills.
pub struct IntakeSink {
    devices: SharedDevices,
    /// `None` once closed at shutdown (open connections keep the sink itself alive).
    writer: RwLock<Option<mpsc::Sender<Write>>>,
    buffer: Arc<BufferStats>,
    stats: Arc<IntakeStats>,
    log: Mutex<BurstLimiter<(DeviceId, RejectReason)>>,
    limits: Mutex<Limits>,
    last_wait_log_ms: AtomicI64,
    /// Set first by [`IntakeSink::close`]: connections waiting for room give up, so
    /// closing never waits on a writer that cannot commit.
    closing: AtomicBool,
}

impl IntakeSink {
    pub fn new(
        devices: SharedDevices,
        writer: mpsc::Sender<Write>,
        buffer: Arc<BufferStats>,
        stats: Arc<IntakeStats>,
    ) -> Self {
        IntakeSink {
            devices,
            writer: RwLock::new(Some(writer)),
            buffer,
            stats,
            log: Mutex::new(BurstLimiter::new(10_000, 4096)),
            limits: Mutex::new(Limits::default()),
            last_wait_log_ms: AtomicI64::new(i64::MIN / 2),
            closing: AtomicBool::new(false),
        }
    }

    /// Stop queueing (messages arriving later are not stored) and release the writer.
    pub fn close(&self) {
        self.closing.store(true, Ordering::SeqCst);
        if let Ok(mut w) = self.writer.write() {
            *w = None;
        }
    }

    /// Check one device message against its device's rate limit, validate it and queue it
    /// for the writer. [`Capture::Closing`] when it was not queued because intake is
    /// closed (stopping): it must not be acknowledged.
    /// With `receipts` (a device connection's), what is queued carries its next receipt.
    pub fn submit(
        &self,
        topic: &[u8],
        payload: &[u8],
        receipts: Option<&Arc<Receipts>>,
    ) -> Capture {
        self.take(topic, payload, true, receipts)
    }

    /// [`IntakeSink::submit`] for what the gateway itself says about a device (a serial
    /// line's presence): never rate-limited.
    pub fn submit_own(&self, topic: &[u8], payload: &[u8]) -> Capture {
        self.take(topic, payload, false, None)
    }

    fn take(
        &self,
        topic: &[u8],
        payload: &[u8],
        limited: bool,
        receipts: Option<&Arc<Receipts>>,
    ) -> Capture {
        let table = self.devices.load();
        let now = now_ms();
        let Some((entry, kind_name)) = device_topic(&table, topic) else {
            self.stats.unknown_device.fetch_add(1, Ordering::Relaxed);
            return Capture::Taken(0);
        };
        if let (true, Some(limit)) = (limited, &entry.profile.rate_limit) {
            if !self.within_limit(&table, &entry.id, limit, payload.len(), now) {
                return self.refuse(&entry.id, now, receipts);
            }
        }
        let receipt = receipts.map(Receipts::issue);
        let number = receipt.as_ref().map_or(0, Receipt::number);
        let write = match classify_for(&table, entry, kind_name, payload, now) {
            Outcome::Accepted(m) => {
                self.stats.accepted.fetch_add(1, Ordering::Relaxed);
                Write::Accepted(m, receipt)
            }
            Outcome::Rejected(r) => {
                self.stats.rejected.fetch_add(1, Ordering::Relaxed);
                self.log_rejection(&r, now);
                Write::Rejected(r, receipt)
            }
            Outcome::Reply {
                device,
                command_id,
                status,
                detail,
                at_ms,
            } => {
                self.stats.accepted.fetch_add(1, Ordering::Relaxed);
                Write::Command(crate::buffer::commands::CommandOp::Reply {
                    device,
                    command_id,
                    status,
                    detail,
                    at_ms,
                    receipt,
                })
            }
            Outcome::Ignored => {
                // Unreachable (`device_topic` found the device); its receipt is never
                // queued, so nothing may wait for it.
                self.stats.unknown_device.fetch_add(1, Ordering::Relaxed);
                return Capture::Taken(0);
            }
        };
        if self.send(write) {
            Capture::Taken(number)
        } else {
            Capture::Closing
        }
    }

    /// Whether `device` may send a message of `bytes` now (and if so, pay for it).
    fn within_limit(
        &self,
        table: &DeviceTable,
        device: &str,
        limit: &RateLimit,
        bytes: usize,
        now_ms: i64,
    ) -> bool {
        let mut limits = self.limits.lock().unwrap_or_else(|p| p.into_inner());
        limits.forget_removed(table, now_ms);
        limits.try_take(device, limit, bytes, Instant::now())
    }

    /// Count a message refused for its device's rate limit (in the buffer, like every
    /// other refusal) and log it once per burst.
    fn refuse(&self, device: &str, now: i64, receipts: Option<&Arc<Receipts>>) -> Capture {
        self.stats.rate_limited.fetch_add(1, Ordering::Relaxed);
        let report = {
            let mut limits = self.limits.lock().unwrap_or_else(|p| p.into_inner());
            limits.log.hit(&device.to_owned(), now)
        };
        if let Some(suppressed) = report {
            tracing::warn!(
                device = %device,
                suppressed_since_last_report = suppressed,
                "message refused: device over its profile's rate limit (rate_limited)"
            );
        }
        let receipt = receipts.map(Receipts::issue);
        let number = receipt.as_ref().map_or(0, Receipt::number);
        let counted = Write::Denied {
            device: device.to_owned(),
            what: "rate_limited",
            count: 1,
            at_ms: now,
            receipt,
        };
        if self.send(counted) {
            Capture::RateLimited(number)
        } else {
            Capture::Closing
        }
    }

    fn log_rejection(&self, r: &Rejected, now: i64) {
        let key = (r.device.clone(), r.rejection.reason);
        let report = self.log.lock().ok().and_then(|mut l| l.hit(&key, now));
        if let Some(suppressed) = report {
            tracing::warn!(
                device = %r.device,
                kind = %r.kind,
                reason = r.rejection.reason.as_str(),
                // Bounded, and without values for profiles with privacy fields (`Rejection`).
                detail = %r.rejection.detail,
                suppressed_since_last_report = suppressed,
                "message rejected"
            );
        }
    }

    /// Queue for the writer; when the queue is full, wait for room (`block_in_place`
    /// hands the runtime's other tasks to another thread while one is free: device
    /// connections wait on the broker's runtime, whose threads are bounded).
    fn send(&self, w: Write) -> bool {
        let Ok(guard) = self.writer.read() else {
            return false;
        };
        let Some(writer) = guard.as_ref() else {
            return false;
        };
        match writer.try_send(w) {
            Ok(()) => true,
            Err(mpsc::error::TrySendError::Full(w)) => {
                let waits = self.stats.writer_waits.fetch_add(1, Ordering::Relaxed);
                let now = now_ms();
                let last = self.last_wait_log_ms.load(Ordering::Relaxed);
                if now - last >= 10_000
                    && self
                        .last_wait_log_ms
                        .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                        .is_ok()
                {
                    tracing::warn!(
                        waits_so_far = waits + 1,
                        "writer queue full: holding device acknowledgements until SQLite catches up"
                    );
                }
                let blocking = || {
                    // Wait for half the queue to be free (one wake-up per batch), then
                    // queue without ever registering as a per-message waiter.
                    let mut w = w;
                    loop {
                        // Closed, or stopping while commits fail: room may not come back.
                        let closing = || {
                            self.closing.load(Ordering::Relaxed)
                                || (self.buffer.stopping.load(Ordering::Relaxed)
                                    && self.buffer.last_commit_failed.load(Ordering::Relaxed))
                        };
                        self.buffer.room.wait_for_room(writer, closing);
                        if closing() {
                            return false;
                        }
                        match writer.try_send(w) {
                            Err(mpsc::error::TrySendError::Full(back)) => w = back,
                            Ok(()) => return true,
                            Err(mpsc::error::TrySendError::Closed(_)) => return false,
                        }
                    }
                };
                match tokio::runtime::Handle::try_current().map(|h| h.runtime_flavor()) {
                    Ok(tokio::runtime::RuntimeFlavor::MultiThread) => {
                        tokio::task::block_in_place(blocking)
                    }
                    Ok(_) => {
                        // A current-thread runtime cannot wait here without deadlocking;
                        // the daemon never runs one.
                        self.stats.dropped_full.fetch_add(1, Ordering::Relaxed);
                        tracing::error!(
                            "writer queue full on a current-thread runtime: message dropped"
                        );
                        false
                    }
                    Err(_) => blocking(),
                }
            }
            Err(mpsc::error::TrySendError::Closed(_)) => false,
        }
    }
}

impl PublishSink for IntakeSink {
    fn capture(&self, topic: &[u8], payload: &[u8], receipts: Option<&Arc<Receipts>>) -> Capture {
        self.submit(topic, payload, receipts)
    }
}

/// The token buckets of the devices whose profile sets a `rate_limit`, each with the
/// limit it was made for (a reload that changes the limit starts the device afresh).
#[derive(Debug)]
struct Limits {
    buckets: HashMap<DeviceId, (RateLimit, DeviceLimiter)>,
    log: BurstLimiter<DeviceId>,
    /// When devices no longer configured were last forgotten.
    swept_ms: i64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            buckets: HashMap::new(),
            log: BurstLimiter::new(10_000, 4096),
            swept_ms: i64::MIN / 2,
        }
    }
}

impl Limits {
    fn try_take(&mut self, device: &str, limit: &RateLimit, bytes: usize, now: Instant) -> bool {
        let fresh = || DeviceLimiter::new(limit.messages(), limit.bytes(), now);
        match self.buckets.get_mut(device) {
            Some((made_for, bucket)) => {
                if made_for != limit {
                    *made_for = *limit;
                    *bucket = fresh();
                }
                bucket.try_take(bytes, now)
            }
            None => {
                let mut bucket = fresh();
                let ok = bucket.try_take(bytes, now);
                self.buckets.insert(device.to_owned(), (*limit, bucket));
                ok
            }
        }
    }

    /// Bounded by the configured devices: at most once a minute, and only when there are
    /// more buckets than devices, forget those of devices a reload removed.
    fn forget_removed(&mut self, table: &DeviceTable, now_ms: i64) {
        if self.buckets.len() <= table.devices.len() || now_ms - self.swept_ms < 60_000 {
            return;
        }
        self.swept_ms = now_ms;
        self.buckets.retain(|id, _| table.get(id).is_some());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Device, Password, Profile};
    use std::collections::HashMap;

    fn table() -> DeviceTable {
        table_with(
            r#"{"name":"p","description":"","telemetry":{"max_bytes":100,"fields":{"n":{"type":"integer"}}}}"#,
        )
    }

    fn table_with(profile: &str) -> DeviceTable {
        let profile = Profile::from_json(profile).unwrap();
        let mut devices = HashMap::new();
        devices.insert(
            "k1".to_owned(),
            Device {
                id: "k1".into(),
                profile: Arc::new(profile),
                password: Password::parse("x").unwrap(),
            },
        );
        DeviceTable {
            devices,
            privacy_key: Some(Arc::from(&b"branch-secret-0123456789"[..])),
            rollups: true,
        }
    }

    /// A reply is checked by its fixed rule: a well-formed one becomes a reply for the
    /// writer, anything else a rejection with its reason.
    #[test]
    fn replies_are_checked() {
        let t = table();
        let reply = |p: &str| classify(&t, b"devices/k1/replies", p.as_bytes(), 5);
        assert_eq!(
            reply(r#"{"command_id":"c1","status":"succeeded","detail":"ok"}"#),
            Outcome::Reply {
                device: "k1".into(),
                command_id: "c1".into(),
                status: crate::buffer::commands::ReplyStatus::Succeeded,
                detail: "ok".into(),
                at_ms: 5,
            }
        );
        let reason = |p: &str| match reply(p) {
            Outcome::Rejected(r) => r.rejection.reason,
            other => panic!("{other:?}"),
        };
        assert_eq!(reason(r#"{"status":"failed"}"#), RejectReason::MissingField);
        assert_eq!(
            reason(r#"{"command_id":"c1","status":"done"}"#),
            RejectReason::WrongType
        );
        assert_eq!(
            reason(r#"{"command_id":"c1","status":"failed","x":1}"#),
            RejectReason::UnknownField
        );
        assert_eq!(reason("[1]"), RejectReason::NotObject);
        assert_eq!(reason("{"), RejectReason::NotJson);
    }

    proptest::proptest! {
        /// Any bytes as a reply: an outcome, never a panic.
        #[test]
        fn any_reply_bytes_are_classified(body in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..300)) {
            let _ = classify(&table(), b"devices/k1/replies", &body, 0);
        }
    }

    #[test]
    fn privacy_rules_apply_before_storage() {
        let t = table_with(
            r#"{"name":"p","description":"","events":{"max_bytes":300,"type_field":"event","types":{
                "session_end":{"fields":{"n":{"type":"integer"},
                  "patron_id":{"type":"string","required":false,"max_length":20,"privacy":"hash"},
                  "patron_name":{"type":"string","required":false,"privacy":"drop"}}}}}}"#,
        );
        let payload =
            br#"{"event":"session_end","n":1,"patron_id":"21234000000001","patron_name":"Li Wei"}"#;
        let Outcome::Accepted(m) = classify(&t, b"devices/k1/events", payload, 1) else {
            panic!()
        };
        let v: serde_json::Value = serde_json::from_str(&m.payload).unwrap();
        let expected =
            crate::config::profile::privacy_hash(b"branch-secret-0123456789", "21234000000001");
        assert_eq!(v["patron_id"], expected.as_str());
        assert_eq!(expected.len(), 64);
        assert!(v.get("patron_name").is_none());
        assert!(!m.payload.contains("21234000000001") && !m.payload.contains("Li Wei"));
        // A refused message keeps neither the value in its detail nor an excerpt.
        let bad = br#"{"event":"session_end","n":1,"patron_id":"212340000000019999999"}"#;
        let Outcome::Rejected(r) = classify(&t, b"devices/k1/events", bad, 1) else {
            panic!()
        };
        assert!(!r.excerpt.contains("2123400"), "{}", r.excerpt);
        assert!(
            !r.rejection.detail.contains("2123400"),
            "{}",
            r.rejection.detail
        );
    }

    #[test]
    fn a_card_number_in_a_plain_field_of_a_privacy_profile_is_withheld() {
        let t = table_with(
            r#"{"name":"p","description":"","events":{"max_bytes":300,"type_field":"event","types":{
                "session_end":{"fields":{"reason":{"type":"string","enum":["done","timeout"]},
                  "patron_id":{"type":"string","required":false,"privacy":"hash"}}}}}}"#,
        );
        let card = "21234000000777";
        for (topic, payload) in [
            // In a field without a privacy rule, as a key, as an event type, repeated, as
            // the topic's kind.
            (
                "devices/k1/events",
                format!(r#"{{"event":"session_end","reason":"{card}"}}"#),
            ),
            (
                "devices/k1/events",
                format!(r#"{{"event":"session_end","reason":"done","{card}":1}}"#),
            ),
            ("devices/k1/events", format!(r#"{{"event":"{card}"}}"#)),
            (
                "devices/k1/events",
                format!(r#"{{"event":"session_end","reason":"done","{card}":1,"{card}":2}}"#),
            ),
            ("devices/k1/card-21234000000777", "{}".to_owned()),
        ] {
            let Outcome::Rejected(r) = classify(&t, topic.as_bytes(), payload.as_bytes(), 1) else {
                panic!("{payload}")
            };
            assert!(
                r.rejection.detail.contains(crate::model::WITHHELD),
                "{}",
                r.rejection.detail
            );
            assert!(!r.rejection.detail.contains(card), "{}", r.rejection.detail);
            assert!(!r.excerpt.contains(card), "{}", r.excerpt);
        }
    }

    #[test]
    fn a_plain_profile_quotes_at_most_32_characters() {
        let key = "k".repeat(40);
        let payload = format!(r#"{{"n":1,"{key}":1,"{key}":2}}"#);
        let Outcome::Rejected(r) =
            classify(&table(), b"devices/k1/telemetry", payload.as_bytes(), 1)
        else {
            panic!()
        };
        assert_eq!(r.rejection.reason, RejectReason::DuplicateKey);
        assert_eq!(
            r.rejection.detail,
            format!(
                "key \"{}…\" appears twice in one object (line 1, column 94)",
                "k".repeat(32)
            )
        );
        // The excerpt (for branch IT, never logged) keeps the payload's start.
        assert_eq!(r.excerpt, payload);
    }

    #[test]
    fn accepts_and_stamps() {
        let out = classify(&table(), b"devices/k1/telemetry", br#"{"n":1}"#, 42);
        assert_eq!(
            out,
            Outcome::Accepted(Accepted {
                device: "k1".into(),
                profile: "p".into(),
                kind: Kind::Telemetry,
                received_ms: 42,
                payload: r#"{"n":1}"#.into(),
                rollup_ms: Some(42),
                contributions: Default::default(),
            })
        );
        let status = classify(&table(), b"devices/k1/status", b"offline", 1);
        assert!(matches!(
            status,
            Outcome::Accepted(Accepted {
                kind: Kind::Status,
                ..
            })
        ));
    }

    #[test]
    fn rejects_with_reason_and_excerpt() {
        let long = vec![b'x'; 1000];
        let Outcome::Rejected(r) = classify(&table(), b"devices/k1/telemetry", &long, 1) else {
            panic!()
        };
        assert_eq!(r.rejection.reason, RejectReason::TooLarge);
        assert_eq!(r.excerpt.len(), EXCERPT_BYTES);
        let Outcome::Rejected(r) = classify(&table(), b"devices/k1/events", b"{}", 1) else {
            panic!()
        };
        assert_eq!(r.rejection.reason, RejectReason::UnknownKind);
        let Outcome::Rejected(r) = classify(&table(), b"devices/k1/commands", b"{}", 1) else {
            panic!()
        };
        assert_eq!(
            (r.rejection.reason, r.kind.as_str()),
            (RejectReason::UnknownKind, "commands")
        );
    }

    /// A device over its profile's limit is refused before validation and counted once
    /// per message; a device of a profile without a limit and the gateway's own status
    /// for a device are never held back; a reload that changes the limit starts afresh.
    #[test]
    fn rate_limited_devices_are_refused_and_counted() {
        let limited = table_with(
            r#"{"name":"p","description":"","telemetry":{"max_bytes":100,"fields":{"n":{"type":"integer"}}},
                "rate_limit":{"messages_per_s":0.001,"burst_messages":3}}"#,
        );
        let shared = SharedDevices::new(limited);
        let (tx, mut rx) = mpsc::channel(1000);
        let stats = Arc::new(IntakeStats::default());
        let sink = IntakeSink::new(shared.clone(), tx, Arc::default(), stats.clone());
        // Each message queued for the connection carries its next receipt, refusals too.
        let receipts = Receipts::new();
        let outcomes: Vec<Capture> = (0..10)
            .map(|_| sink.capture(b"devices/k1/telemetry", br#"{"n":1}"#, Some(&receipts)))
            .collect();
        assert_eq!(outcomes[..3], [1, 2, 3].map(Capture::Taken));
        assert_eq!(
            outcomes[3..],
            [4, 5, 6, 7, 8, 9, 10].map(Capture::RateLimited)
        );
        // Invalid messages count against the limit too: refused before validation.
        assert_eq!(
            sink.capture(b"devices/k1/telemetry", b"not json", None),
            Capture::RateLimited(0)
        );
        assert_eq!(
            sink.submit_own(b"devices/k1/status", b"offline"),
            Capture::Taken(0)
        );
        assert_eq!(stats.rate_limited.load(Ordering::Relaxed), 8);
        assert_eq!(stats.rejected.load(Ordering::Relaxed), 0);
        let mut writes = Vec::new();
        while let Ok(w) = rx.try_recv() {
            writes.push(w);
        }
        let counted = writes
            .iter()
            .filter(|w| matches!(w, Write::Denied { device, what: "rate_limited", .. } if device == "k1"))
            .count();
        let stored = writes
            .iter()
            .filter(|w| matches!(w, Write::Accepted(..)))
            .count();
        assert_eq!((counted, stored, writes.len()), (8, 4, 12));
        // Without a limit (a reload removed it) nothing is refused.
        shared.store(table());
        for _ in 0..20 {
            assert_eq!(
                sink.capture(b"devices/k1/telemetry", br#"{"n":1}"#, None),
                Capture::Taken(0)
            );
        }
        // A new limit: a full bucket of its own.
        shared.store(table_with(
            r#"{"name":"p","description":"","telemetry":{"max_bytes":100,"fields":{"n":{"type":"integer"}}},
                "rate_limit":{"messages_per_s":0.001,"burst_messages":1}}"#,
        ));
        assert_eq!(
            sink.capture(b"devices/k1/telemetry", br#"{"n":1}"#, None),
            Capture::Taken(0)
        );
        assert_eq!(
            sink.capture(b"devices/k1/telemetry", br#"{"n":1}"#, None),
            Capture::RateLimited(0)
        );
    }

    #[test]
    fn ignores_unknown_devices_and_topics() {
        assert_eq!(
            classify(&table(), b"devices/k2/telemetry", b"{}", 1),
            Outcome::Ignored
        );
        assert_eq!(
            classify(&table(), b"other/k1/telemetry", b"{}", 1),
            Outcome::Ignored
        );
        assert_eq!(
            classify(&table(), b"devices/k1", b"{}", 1),
            Outcome::Ignored
        );
    }
}
