//! Simulated devices: MQTT clients that act like the devices a branch config declares, sending
//! telemetry and events built from their profiles, plus a share of deliberately invalid messages.
//! For demos on a machine with no real devices, for end-to-end tests, and as the payload source
//! of the benchmark ([`generate`], [`generate_invalid`] are pure and need no broker).

use std::collections::{HashMap, VecDeque};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use rand::distributions::{Alphanumeric, WeightedIndex};
use rand::prelude::Distribution;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rumqttc::{AsyncClient, Event, LastWill, MqttOptions, Outgoing, Packet, QoS};
use serde_json::{Map, Value};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::config::profile::{FieldSpec, FieldType, KindSpec, UnknownFields};
use crate::config::{Loaded, Password, Profile};
use crate::model::{Kind, RejectReason};

/// How to run the simulated devices.
#[derive(Debug, Clone)]
pub struct SimOptions {
    /// Broker address to connect to (normally loaded.config.broker.listen; 0.0.0.0 means 127.0.0.1).
    pub broker: SocketAddr,
    /// Time acceleration: 1.0 = real time; 10.0 = telemetry and events 10x as often.
    pub speed: f64,
    /// Roughly one message in `invalid_every` is deliberately invalid (0 = never).
    pub invalid_every: u32,
    /// Stop after this long (None = until cancelled).
    pub duration: Option<Duration>,
    /// Only these device ids (empty = every MQTT device of the config whose password is plain text).
    pub only: Vec<String>,
    /// RNG seed for repeatable runs.
    pub seed: u64,
}

/// What a simulation run did; `acked` counts PUBACKs for telemetry and events (not status).
#[derive(Debug, Default, Clone)]
pub struct SimReport {
    /// Devices simulated.
    pub devices: usize,
    /// Valid telemetry and event messages written to the broker.
    pub published_valid: u64,
    /// Deliberately invalid messages written to the broker.
    pub published_invalid: u64,
    /// PUBACKs received for those messages.
    pub acked: u64,
    /// Commands the simulated devices ran (and replied `succeeded` to).
    pub commands: u64,
    /// Devices not simulated: (id, reason).
    pub skipped_devices: Vec<(String, String)>,
}

// ---------------------------------------------------------------------------------------------
// Payload generation (pure)
// ---------------------------------------------------------------------------------------------

/// Share of optional fields included in a generated payload.
const OPTIONAL_SHARE: f64 = 0.7;
/// Attempts before `generate` gives up; the second half leave optional fields out.
const GENERATE_ATTEMPTS: usize = 8;
/// Default string length range when a profile gives none.
const DEFAULT_MIN_LEN: usize = 8;
const DEFAULT_MAX_LEN: usize = 16;
/// Generated strings stay short even when a profile allows long ones.
const LONG_STRING_CAP: usize = 32;

/// One valid payload of `kind` (telemetry or events) for `profile`; `None` if the profile has no such kind.
pub fn generate(profile: &Profile, kind: Kind, rng: &mut impl Rng) -> Option<String> {
    if kind == Kind::Status {
        return Some("online".to_owned());
    }
    let spec = profile.kind(kind)?;
    for attempt in 0..GENERATE_ATTEMPTS {
        // Later attempts leave optional fields out, to fit a tight `max_bytes`.
        let share = if attempt < GENERATE_ATTEMPTS / 2 {
            OPTIONAL_SHARE
        } else {
            0.0
        };
        let Some(obj) = build_object(spec, share, rng) else {
            continue;
        };
        let text = Value::Object(obj).to_string();
        if text.len() <= spec.max_bytes && profile.validate(kind, text.as_bytes()).is_ok() {
            return Some(text);
        }
    }
    None
}

/// A JSON object for `spec`: the event type first (if any), then every required field and
/// each optional one with probability `optional_share`.
fn build_object<R: Rng>(
    spec: &KindSpec,
    optional_share: f64,
    rng: &mut R,
) -> Option<Map<String, Value>> {
    let mut obj = Map::new();
    let mut type_fields = None;
    if let Some(tf) = &spec.type_field {
        let name = pick_type(spec, rng)?;
        obj.insert(tf.clone(), Value::String(name.to_owned()));
        type_fields = spec.types.get(name).map(|t| &t.fields);
    }
    for (name, field) in spec.fields.iter().chain(type_fields.into_iter().flatten()) {
        if !field.required && !rng.gen_bool(optional_share) {
            continue;
        }
        match field_value(field, rng) {
            Some(v) => {
                obj.insert(name.clone(), v);
            }
            None if field.required => return None,
            None => {}
        }
    }
    Some(obj)
}

/// An event type drawn by `weight` (default 1; uniform if every weight is 0).
fn pick_type<'a, R: Rng>(spec: &'a KindSpec, rng: &mut R) -> Option<&'a str> {
    let names: Vec<&'a String> = spec.types.keys().collect();
    let weights = spec.types.values().map(|t| t.weight.unwrap_or(1));
    match WeightedIndex::new(weights) {
        Ok(dist) => names.get(dist.sample(rng)).map(|s| s.as_str()),
        Err(_) => names.choose(rng).map(|s| s.as_str()),
    }
}

/// A value for one field: an example, else an allowed value, else one within the bounds.
fn field_value<R: Rng>(field: &FieldSpec, rng: &mut R) -> Option<Value> {
    if let Some(ex) = field.examples.choose(rng) {
        return Some(ex.clone());
    }
    if let Some(allowed) = &field.allowed {
        return allowed.choose(rng).cloned();
    }
    match field.ty {
        FieldType::Integer => {
            let (lo, hi) = numeric_bounds(field);
            let (lo, hi) = (lo.ceil(), hi.floor());
            if lo > hi {
                return None;
            }
            // `as` saturates: bounds beyond i64 become i64::MIN / i64::MAX.
            Some(Value::from(rng.gen_range(lo as i64..=hi as i64)))
        }
        FieldType::Number => {
            let (lo, hi) = numeric_bounds(field);
            if lo > hi || !lo.is_finite() || !hi.is_finite() {
                return None;
            }
            let x = if lo < hi { rng.gen_range(lo..=hi) } else { lo };
            let scale = if rng.gen_bool(0.5) { 10.0 } else { 100.0 };
            let rounded = (x * scale).round() / scale;
            let x = if (lo..=hi).contains(&rounded) {
                rounded
            } else {
                x
            };
            serde_json::Number::from_f64(x).map(Value::Number)
        }
        FieldType::Boolean => Some(Value::Bool(rng.gen())),
        FieldType::String => {
            let lo = field
                .min_length
                .unwrap_or(DEFAULT_MIN_LEN.min(field.max_length.unwrap_or(DEFAULT_MIN_LEN)));
            let hi = field.max_length.unwrap_or(DEFAULT_MAX_LEN.max(lo));
            if lo > hi {
                return None;
            }
            let hi = hi.min(lo.max(LONG_STRING_CAP));
            let len = rng.gen_range(lo..=hi);
            Some(Value::String(alnum(rng, len)))
        }
        FieldType::Array => {
            let n = field.min_length.unwrap_or(0);
            Some(Value::Array(
                (0..n).map(|_| Value::from(rng.gen_range(0..100))).collect(),
            ))
        }
        FieldType::Object => Some(Value::Object(Map::new())),
    }
}

/// Inclusive bounds for a numeric field; a missing side is 1000 away from the other (or 0).
fn numeric_bounds(field: &FieldSpec) -> (f64, f64) {
    match (field.min, field.max) {
        (Some(lo), Some(hi)) => (lo, hi),
        (Some(lo), None) => (lo, lo + 1000.0),
        (None, Some(hi)) if hi >= 0.0 => (0.0, hi),
        (None, Some(hi)) => (hi - 1000.0, hi),
        (None, None) => (0.0, 1000.0),
    }
}

fn alnum<R: Rng>(rng: &mut R, len: usize) -> String {
    (0..len)
        .map(|_| char::from(rng.sample(Alphanumeric)))
        .collect()
}

/// The flaws `generate_invalid` draws from, uniformly among those the profile allows.
const FLAWS: [RejectReason; 7] = [
    RejectReason::NotJson,
    RejectReason::NotObject,
    RejectReason::MissingField,
    RejectReason::WrongType,
    RejectReason::OutOfRange,
    RejectReason::UnknownField,
    RejectReason::UnknownType,
];

/// One deliberately invalid payload for `profile`, its kind, and the reason validation rejects it with.
pub fn generate_invalid(profile: &Profile, rng: &mut impl Rng) -> (Kind, Vec<u8>, RejectReason) {
    let kinds: Vec<Kind> = [Kind::Telemetry, Kind::Events]
        .into_iter()
        .filter(|k| profile.kind(*k).is_some())
        .collect();
    let Some(&first_kind) = kinds.first() else {
        return (Kind::Telemetry, b"{}".to_vec(), RejectReason::UnknownKind);
    };
    let mut flaws = FLAWS;
    flaws.shuffle(rng);
    for reason in flaws {
        let mut kinds = kinds.clone();
        kinds.shuffle(rng);
        for kind in kinds {
            if let Some(payload) = flawed(profile, kind, reason, rng) {
                return (kind, payload, reason);
            }
        }
    }
    // Nothing else applies (e.g. a profile whose `max_bytes` is tiny): one byte too many.
    let max = profile.kind(first_kind).map_or(0, |s| s.max_bytes);
    (first_kind, vec![b' '; max + 1], RejectReason::TooLarge)
}

/// A change to a valid object that should make it fail.
enum Edit {
    Set(String, Value),
    Remove(String),
}

/// A payload of `kind` that `profile.validate` rejects with exactly `reason`, if one can be made.
fn flawed<R: Rng>(
    profile: &Profile,
    kind: Kind,
    reason: RejectReason,
    rng: &mut R,
) -> Option<Vec<u8>> {
    let spec = profile.kind(kind)?;
    let base = build_object(spec, OPTIONAL_SHARE, rng);
    let rejects =
        |payload: &[u8]| profile.validate(kind, payload).err().map(|r| r.reason) == Some(reason);
    let whole: Option<Vec<Vec<u8>>> = match reason {
        // A message cut short, as from a device that lost its connection mid-write.
        RejectReason::NotJson => {
            let mut candidates = Vec::new();
            if let Some(obj) = &base {
                let text = Value::Object(obj.clone()).to_string();
                let cut = (1..=text.len() / 2)
                    .rev()
                    .find(|i| text.is_char_boundary(*i));
                candidates.extend(cut.map(|cut| text.as_bytes()[..cut].to_vec()));
            }
            candidates.push(b"{".to_vec());
            Some(candidates)
        }
        // A batch of messages where one is expected.
        RejectReason::NotObject => {
            let mut candidates = Vec::new();
            if let Some(obj) = &base {
                candidates.push(
                    Value::Array(vec![Value::Object(obj.clone())])
                        .to_string()
                        .into_bytes(),
                );
            }
            candidates.push(b"[]".to_vec());
            Some(candidates)
        }
        _ => None,
    };
    if let Some(candidates) = whole {
        return candidates.into_iter().find(|p| rejects(p));
    }
    let base = base?;
    let declared = declared_fields(spec, &base);
    let mut edits: Vec<Edit> = Vec::new();
    match reason {
        RejectReason::MissingField => {
            edits.extend(
                declared
                    .iter()
                    .filter(|(_, f)| f.required)
                    .map(|(n, _)| Edit::Remove((*n).clone())),
            );
            edits.extend(spec.type_field.iter().map(|tf| Edit::Remove(tf.clone())));
        }
        RejectReason::WrongType => {
            edits.extend(
                declared
                    .iter()
                    .map(|(n, f)| Edit::Set((*n).clone(), wrong_type(f))),
            );
            edits.extend(
                spec.type_field
                    .iter()
                    .map(|tf| Edit::Set(tf.clone(), Value::from(7))),
            );
        }
        RejectReason::OutOfRange => {
            for (n, f) in &declared {
                edits.extend(
                    out_of_range(f)
                        .into_iter()
                        .map(|v| Edit::Set((*n).clone(), v)),
                );
            }
        }
        RejectReason::UnknownField if spec.unknown_fields == UnknownFields::Reject => {
            let taken = |n: &str| {
                declared.iter().any(|(d, _)| d.as_str() == n)
                    || spec.type_field.as_deref() == Some(n)
            };
            let name = ["debug", "fw_note", "extra"]
                .into_iter()
                .map(str::to_owned)
                .chain((0..).map(|i| format!("extra_{i}")))
                .find(|n| !taken(n))?;
            edits.push(Edit::Set(name, Value::String("on".into())));
        }
        RejectReason::UnknownType => {
            if let Some(tf) = &spec.type_field {
                let name = ["firmware_update", "reboot"]
                    .into_iter()
                    .map(str::to_owned)
                    .chain((0..).map(|i| format!("undeclared_{i}")))
                    .find(|n| !spec.types.contains_key(n))?;
                edits.push(Edit::Set(tf.clone(), Value::String(name)));
            }
        }
        _ => {}
    }
    edits.shuffle(rng);
    edits.into_iter().find_map(|edit| {
        let mut obj = base.clone();
        match edit {
            Edit::Set(n, v) => obj.insert(n, v),
            Edit::Remove(n) => obj.shift_remove(&n),
        };
        let payload = Value::Object(obj).to_string().into_bytes();
        rejects(&payload).then_some(payload)
    })
}

/// The fields `obj` may carry: the kind's common fields plus those of its event type.
fn declared_fields<'a>(
    spec: &'a KindSpec,
    obj: &Map<String, Value>,
) -> Vec<(&'a String, &'a FieldSpec)> {
    let type_fields = spec
        .type_field
        .as_ref()
        .and_then(|tf| obj.get(tf))
        .and_then(Value::as_str)
        .and_then(|t| spec.types.get(t))
        .map(|t| &t.fields);
    spec.fields
        .iter()
        .chain(type_fields.into_iter().flatten())
        .collect()
}

/// A value of the wrong JSON type, the way devices get it wrong (numbers sent as strings...).
fn wrong_type(field: &FieldSpec) -> Value {
    match field.ty {
        FieldType::String => Value::from(42),
        FieldType::Integer => Value::String("42".into()),
        FieldType::Number => Value::String("12.5".into()),
        FieldType::Boolean => Value::String("true".into()),
        FieldType::Object | FieldType::Array => Value::String("n/a".into()),
    }
}

/// Values of the right type that break a bound, a length or the allowed values of `field`.
fn out_of_range(field: &FieldSpec) -> Vec<Value> {
    const SAFE: f64 = 9.0e15; // integers beyond this are not exact as f64
    let mut out = Vec::new();
    let integer = field.ty == FieldType::Integer;
    let numeric = |x: f64| -> Option<Value> {
        if integer {
            (x.abs() < SAFE).then(|| Value::from(x as i64))
        } else {
            serde_json::Number::from_f64(x).map(Value::Number)
        }
    };
    if matches!(field.ty, FieldType::Integer | FieldType::Number) {
        if let Some(hi) = field.max {
            out.extend(numeric(if integer { hi.floor() + 1.0 } else { hi + 1.5 }));
        }
        if let Some(lo) = field.min {
            out.extend(numeric(if integer { lo.ceil() - 1.0 } else { lo - 1.5 }));
        }
    }
    let sized = |n: usize| match field.ty {
        FieldType::String => Some(Value::String("x".repeat(n))),
        FieldType::Array => Some(Value::Array(vec![Value::from(0); n])),
        _ => None,
    };
    if let Some(hi) = field.max_length {
        out.extend(sized(hi + 1));
    }
    if let Some(lo) = field.min_length.filter(|n| *n > 0) {
        out.extend(sized(lo - 1));
    }
    if let Some(allowed) = &field.allowed {
        match field.ty {
            FieldType::String => {
                let v = (0..)
                    .map(|i| {
                        if i == 0 {
                            "unexpected".to_owned()
                        } else {
                            format!("unexpected_{i}")
                        }
                    })
                    .find(|s| !allowed.iter().any(|a| a.as_str() == Some(s)));
                out.extend(v.map(Value::String));
            }
            FieldType::Integer | FieldType::Number => {
                let top = allowed
                    .iter()
                    .filter_map(Value::as_f64)
                    .fold(f64::NEG_INFINITY, f64::max);
                if top.is_finite() {
                    out.extend(numeric(top.floor() + 1.0));
                }
            }
            _ => {}
        }
    }
    out
}

// ---------------------------------------------------------------------------------------------
// Running simulated devices
// ---------------------------------------------------------------------------------------------

/// How long to wait, once stopping, for the last acks, the `offline` status and the disconnect.
const GRACE: Duration = Duration::from_secs(2);
/// Wait between connection attempts; `EventLoop::poll` reconnects on the next call.
const RETRY: Duration = Duration::from_secs(1);
/// Smallest gap between two messages of one device, whatever the speed.
const MIN_GAP: Duration = Duration::from_millis(1);
/// Requests a device may queue in its client while the broker is away; more are dropped.
const REQUEST_QUEUE: usize = 256;
/// MQTT packet size limit both ways (raised for profiles that accept more).
const MAX_PACKET: usize = 64 * 1024;
/// Default telemetry interval when a profile sets none, in seconds.
const DEFAULT_INTERVAL_S: u64 = 60;

/// Mean events per second at speed 1 for a device type.
fn event_rate(profile: &str) -> f64 {
    match profile {
        "self-check-kiosk" => 1.0 / 20.0,
        "gate-counter" => 1.0 / 5.0,
        _ => 1.0 / 40.0,
    }
}

/// A device to simulate. No `Debug`: it holds the device's secret.
struct SimDevice {
    id: String,
    password: String,
    profile: Arc<Profile>,
}

#[derive(Default)]
struct Counters {
    valid: AtomicU64,
    invalid: AtomicU64,
    acked: AtomicU64,
    commands: AtomicU64,
}

/// Run simulated devices against the broker until `shutdown` is cancelled or the duration ends.
pub async fn run(loaded: &Loaded, opts: SimOptions, shutdown: CancellationToken) -> SimReport {
    let mut report = SimReport::default();
    let mut devices = Vec::new();
    for d in &loaded.config.devices {
        if !opts.only.is_empty() && !opts.only.contains(&d.id) {
            continue;
        }
        if d.serial.is_some() {
            // Serial devices are played by `simulate gate-counter --pty`, not over MQTT.
            continue;
        }
        let password = match Password::parse(&d.password) {
            Ok(Password::Plain(p)) => p,
            Ok(Password::None) => continue,
            Ok(Password::Argon2(_)) => {
                report.skipped_devices.push((
                    d.id.clone(),
                    "password is an argon2 hash: the simulator cannot know the secret".into(),
                ));
                continue;
            }
            Err(e) => {
                report
                    .skipped_devices
                    .push((d.id.clone(), format!("password: {e}")));
                continue;
            }
        };
        let Some(profile) = loaded.profiles.get(&d.profile) else {
            report.skipped_devices.push((
                d.id.clone(),
                format!("profile {:?} is not loaded", d.profile),
            ));
            continue;
        };
        devices.push(SimDevice {
            id: d.id.clone(),
            password,
            profile: profile.clone(),
        });
    }
    for id in &opts.only {
        if !loaded.config.devices.iter().any(|d| &d.id == id) {
            report
                .skipped_devices
                .push((id.clone(), "not a device of the config".into()));
        }
    }
    report.devices = devices.len();

    let broker = loopback_if_unspecified(opts.broker);
    let speed = if opts.speed.is_finite() && opts.speed > 0.0 {
        opts.speed
    } else {
        warn!(
            speed = opts.speed,
            "simulation speed must be a positive number; using 1"
        );
        1.0
    };
    info!(
        devices = devices.len(),
        skipped = report.skipped_devices.len(),
        %broker,
        speed,
        invalid_every = opts.invalid_every,
        "simulating devices"
    );
    if devices.is_empty() {
        return report;
    }

    let stop = shutdown.child_token();
    let timer = opts.duration.map(|d| {
        let stop = stop.clone();
        tokio::spawn(async move {
            tokio::select! {
                _ = tokio::time::sleep(d) => stop.cancel(),
                _ = stop.cancelled() => {}
            }
        })
    });
    let counters = Arc::new(Counters::default());
    let handles: Vec<_> = devices
        .into_iter()
        .map(|dev| {
            let seed = opts.seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ fnv1a(dev.id.as_bytes());
            let sim = DeviceSim {
                broker,
                speed,
                invalid_every: opts.invalid_every,
                stop: stop.clone(),
                counters: counters.clone(),
            };
            tokio::spawn(sim.run(dev, seed))
        })
        .collect();
    for h in handles {
        if let Err(e) = h.await {
            warn!(error = %e, "a simulated device task failed");
        }
    }
    // Every device has stopped; this also ends the duration timer.
    stop.cancel();
    if let Some(t) = timer {
        let _ = t.await;
    }
    report.published_valid = counters.valid.load(Ordering::Relaxed);
    report.published_invalid = counters.invalid.load(Ordering::Relaxed);
    report.acked = counters.acked.load(Ordering::Relaxed);
    report.commands = counters.commands.load(Ordering::Relaxed);
    debug!(?report, "simulation stopped");
    report
}

/// `0.0.0.0` / `::` (listen on every interface) become the loopback address of the same family.
fn loopback_if_unspecified(addr: SocketAddr) -> SocketAddr {
    match addr.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => {
            SocketAddr::new(Ipv4Addr::LOCALHOST.into(), addr.port())
        }
        IpAddr::V6(ip) if ip.is_unspecified() => {
            SocketAddr::new(Ipv6Addr::LOCALHOST.into(), addr.port())
        }
        _ => addr,
    }
}

fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// What a queued publish is, so counts and acks are attributed once it is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Sent {
    Valid,
    Invalid,
    Online,
    Offline,
    /// A reply to a command.
    Reply,
}

/// Follows one client's publishes from the request queue to the wire to their PUBACK.
///
/// rumqttc handles requests in order and reports each QoS 1 publish it writes as
/// `Outgoing::Publish(pkid)`, so the queue's front is the publish that event is about. A
/// connection error drops everything queued and in flight (clean session), and so does `reset`.
#[derive(Default)]
struct Tracker {
    queued: VecDeque<Sent>,
    in_flight: HashMap<u16, Sent>,
    offline_written: bool,
    disconnect_requested: bool,
}

impl Tracker {
    fn written(&mut self, pkid: u16, counters: &Counters) {
        let Some(sent) = self.queued.pop_front() else {
            return;
        };
        match sent {
            Sent::Valid => {
                counters.valid.fetch_add(1, Ordering::Relaxed);
            }
            Sent::Invalid => {
                counters.invalid.fetch_add(1, Ordering::Relaxed);
            }
            Sent::Offline => self.offline_written = true,
            Sent::Online | Sent::Reply => {}
        }
        self.in_flight.insert(pkid, sent);
    }

    fn acked(&mut self, pkid: u16, counters: &Counters) {
        if let Some(Sent::Valid | Sent::Invalid) = self.in_flight.remove(&pkid) {
            counters.acked.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn reset(&mut self) {
        self.queued.clear();
        self.in_flight.clear();
        self.offline_written = false;
    }

    /// `offline` is on the wire and everything sent has been acknowledged.
    fn ready_to_disconnect(&self) -> bool {
        self.offline_written
            && self.in_flight.is_empty()
            && self.queued.is_empty()
            && !self.disconnect_requested
    }
}

fn lock(m: &Mutex<Tracker>) -> MutexGuard<'_, Tracker> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Settings shared by every simulated device of a run.
struct DeviceSim {
    broker: SocketAddr,
    speed: f64,
    invalid_every: u32,
    stop: CancellationToken,
    counters: Arc<Counters>,
}

impl DeviceSim {
    /// One device: its event loop and its message schedule, both in this task, until stopped.
    async fn run(self, dev: SimDevice, seed: u64) {
        let status_topic = format!("devices/{}/status", dev.id);
        let commands_filter = format!("devices/{}/commands/#", dev.id);
        let replies_topic = format!("devices/{}/replies", dev.id);
        let host = match self.broker.ip() {
            IpAddr::V4(ip) => ip.to_string(),
            IpAddr::V6(ip) => format!("[{ip}]"),
        };
        let packet = MAX_PACKET.max(dev.profile.max_bytes() + 1024);
        let mut options = MqttOptions::new(format!("sim-{}", dev.id), host, self.broker.port());
        options
            .set_keep_alive(Duration::from_secs(30))
            .set_clean_session(true)
            .set_credentials(dev.id.clone(), dev.password.clone())
            .set_last_will(LastWill::new(
                &status_topic,
                "offline",
                QoS::AtLeastOnce,
                true,
            ))
            .set_max_packet_size(packet, packet);
        let (client, mut eventloop) = AsyncClient::new(options, REQUEST_QUEUE);
        let tracker = Mutex::new(Tracker::default());
        // Signalled once `online` is queued: the schedule starts then, so that status is the
        // device's first message (requests queued before CONNACK would go out ahead of it).
        let online = tokio::sync::Notify::new();
        let enqueue = |topic: &str, payload: Vec<u8>, retain: bool, sent: Sent| {
            let mut t = lock(&tracker);
            match client.try_publish(topic, QoS::AtLeastOnce, retain, payload) {
                Ok(()) => t.queued.push_back(sent),
                Err(_) => debug!(device = %dev.id, "client queue full; message dropped"),
            }
        };

        let connection = async {
            let grace = async {
                self.stop.cancelled().await;
                tokio::time::sleep(GRACE).await;
            };
            tokio::pin!(grace);
            let mut connected = false;
            // One warning per device and run; repeats go to debug (no log flood while the
            // broker is down or keeps refusing).
            let mut warned = false;
            loop {
                let step = tokio::select! {
                    step = eventloop.poll() => step,
                    () = &mut grace => break,
                };
                match step {
                    Ok(Event::Incoming(Packet::ConnAck(_))) => {
                        connected = true;
                        if !self.stop.is_cancelled() {
                            enqueue(&status_topic, b"online".to_vec(), true, Sent::Online);
                            online.notify_one();
                            // A device whose profile declares commands takes them.
                            if !dev.profile.command_names().is_empty() {
                                let _ = client.try_subscribe(&commands_filter, QoS::AtLeastOnce);
                            }
                        }
                    }
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        // A command: done at once (a simulated device has nothing to do).
                        if let Some(reply) = command_reply(&p.payload) {
                            info!(device = %dev.id, topic = %p.topic, "simulated device ran a command");
                            self.counters.commands.fetch_add(1, Ordering::Relaxed);
                            enqueue(&replies_topic, reply, false, Sent::Reply);
                        }
                    }
                    Ok(Event::Outgoing(Outgoing::Publish(pkid))) => {
                        lock(&tracker).written(pkid, &self.counters);
                    }
                    Ok(Event::Incoming(Packet::PubAck(ack))) => {
                        lock(&tracker).acked(ack.pkid, &self.counters);
                    }
                    Ok(Event::Outgoing(Outgoing::Disconnect)) => break,
                    Ok(_) => {}
                    Err(e) => {
                        if connected {
                            // rumqttc dropped what was queued and in flight (clean session).
                            lock(&tracker).reset();
                            connected = false;
                        }
                        if self.stop.is_cancelled() {
                            // The broker publishes the `offline` will for a dropped connection.
                            break;
                        }
                        if warned {
                            debug!(device = %dev.id, error = %e, "simulated device cannot reach the broker");
                        } else {
                            warn!(device = %dev.id, error = %e, "simulated device cannot reach the broker; retrying");
                            warned = true;
                        }
                        tokio::select! {
                            _ = tokio::time::sleep(RETRY) => {}
                            () = &mut grace => break,
                        }
                    }
                }
                let mut t = lock(&tracker);
                if t.ready_to_disconnect() {
                    t.disconnect_requested = client.try_disconnect().is_ok();
                }
            }
        };

        let schedule = async {
            tokio::select! {
                _ = self.stop.cancelled() => {}
                () = online.notified() => {}
            }
            let mut rng = StdRng::seed_from_u64(seed);
            let profile = &dev.profile;
            let telemetry_every = profile.telemetry.as_ref().map(|t| {
                gap(t.interval_s.unwrap_or(DEFAULT_INTERVAL_S).max(1) as f64 / self.speed)
            });
            let event_rate = profile
                .events
                .as_ref()
                .map(|_| event_rate(&profile.name) * self.speed);
            let start = Instant::now();
            let mut inside = 0i64;
            let mut next_telemetry = telemetry_every.map(|p| start + p.mul_f64(rng.gen::<f64>()));
            let mut next_event = event_rate.map(|r| start + exponential(r, &mut rng));
            loop {
                let wake = match (next_telemetry, next_event) {
                    (Some(a), Some(b)) => Some(a.min(b)),
                    (a, b) => a.or(b),
                };
                let sleep = async {
                    match wake {
                        Some(at) => tokio::time::sleep_until(at).await,
                        None => std::future::pending().await,
                    }
                };
                tokio::select! {
                    biased; // stopped before it ever connected: publish nothing
                    _ = self.stop.cancelled() => break,
                    () = sleep => {}
                }
                let now = Instant::now();
                if let (Some(at), Some(every)) = (next_telemetry, telemetry_every) {
                    if at <= now {
                        self.publish(&dev, Kind::Telemetry, &mut rng, &mut inside, &enqueue);
                        // Keep the rhythm, but never burst to catch up after a stall.
                        next_telemetry = Some((at + every).max(now));
                    }
                }
                if let (Some(at), Some(rate)) = (next_event, event_rate) {
                    if at <= now {
                        self.publish(&dev, Kind::Events, &mut rng, &mut inside, &enqueue);
                        next_event = Some(at.max(now) + exponential(rate, &mut rng));
                    }
                }
            }
            enqueue(&status_topic, b"offline".to_vec(), true, Sent::Offline);
        };

        tokio::join!(connection, schedule);
    }

    /// Queue one message of `kind`, or (about one time in `invalid_every`) an invalid one.
    fn publish<R: Rng>(
        &self,
        dev: &SimDevice,
        kind: Kind,
        rng: &mut R,
        inside: &mut i64,
        enqueue: &impl Fn(&str, Vec<u8>, bool, Sent),
    ) {
        if self.invalid_every > 0 && rng.gen_range(0..self.invalid_every) == 0 {
            let (kind, payload, reason) = generate_invalid(&dev.profile, rng);
            debug!(device = %dev.id, %kind, %reason, "sending an invalid message");
            enqueue(
                &format!("devices/{}/{kind}", dev.id),
                payload,
                false,
                Sent::Invalid,
            );
        } else if let Some(payload) = generate(&dev.profile, kind, rng) {
            let payload = people_counted(payload, inside, rng);
            enqueue(
                &format!("devices/{}/{kind}", dev.id),
                payload.into_bytes(),
                false,
                Sent::Valid,
            );
        }
    }
}

/// A gate's telemetry made to count people as a building has them: a few in and out per
/// interval, never more out than are inside, and `occupancy_est` the people inside (so
/// the lobby's "in the building now" follows the visitors instead of a random walk
/// around zero). Any other payload is returned as it is.
fn people_counted<R: Rng>(payload: String, inside: &mut i64, rng: &mut R) -> String {
    let Ok(Value::Object(mut o)) = serde_json::from_str::<Value>(&payload) else {
        return payload;
    };
    if !(o.get("delta_in").is_some_and(Value::is_i64)
        && o.get("delta_out").is_some_and(Value::is_i64))
    {
        return payload;
    }
    let came: i64 = rng.gen_range(0..=14);
    // Leaving grows with the crowd: about 200 people inside per gate is the balance.
    let left = (rng.gen_range(0..=12) + *inside / 200).min(*inside + came);
    *inside += came - left;
    o.insert("delta_in".into(), came.into());
    o.insert("delta_out".into(), left.into());
    if o.contains_key("occupancy_est") {
        o.insert("occupancy_est".into(), (*inside).into());
    }
    Value::Object(o).to_string()
}

/// The `succeeded` reply to a command payload (`{"command_id", "args"}`), if it is one.
fn command_reply(payload: &[u8]) -> Option<Vec<u8>> {
    let v: Value = serde_json::from_slice(payload).ok()?;
    let id = v.get("command_id")?.as_str()?;
    let reply = serde_json::json!({"command_id": id, "status": "succeeded", "detail": "simulated"});
    Some(reply.to_string().into_bytes())
}

/// A period in seconds as a `Duration`, at least `MIN_GAP` and at most a day.
fn gap(seconds: f64) -> Duration {
    Duration::from_secs_f64(seconds.clamp(0.0, 86_400.0)).max(MIN_GAP)
}

/// The wait until the next event of a Poisson process with `rate` events per second.
fn exponential<R: Rng>(rate: f64, rng: &mut R) -> Duration {
    let u: f64 = rng.gen(); // [0, 1)
    gap(-(1.0 - u).ln() / rate)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;
    use std::path::Path;

    use rusqlite::{Connection, OpenFlags};
    use tokio::net::TcpListener;

    use crate::config::Config;

    /// Exercises every field type and constraint the generator handles.
    const INLINE_PROFILE: &str = r#"{
              "name": "gate-counter", "description": "test profile",
              "telemetry": { "max_bytes": 600, "interval_s": 1, "fields": {
                  "uptime_s": {"type": "integer", "min": 0},
                  "count": {"type": "integer", "min": 3, "max": 7},
                  "below": {"type": "integer", "max": -5},
                  "temp_c": {"type": "number", "min": -10.5, "max": 40.25},
                  "ratio": {"type": "number", "min": 0.123, "max": 0.125, "required": false},
                  "ok": {"type": "boolean"},
                  "label": {"type": "string"},
                  "code": {"type": "string", "min_length": 4, "max_length": 4},
                  "short": {"type": "string", "max_length": 3},
                  "mode": {"type": "string", "enum": ["a", "b"]},
                  "level": {"type": "integer", "enum": [16, 32], "required": false},
                  "tags": {"type": "array", "min_length": 2, "max_length": 5},
                  "none": {"type": "array", "required": false},
                  "meta": {"type": "object", "required": false},
                  "fw": {"type": "string", "examples": ["1.2.3", "1.3.0"]}
              }},
              "events": { "max_bytes": 300, "type_field": "event",
                  "fields": {"session_ref": {"type": "string", "min_length": 8, "max_length": 64}},
                  "types": {
                      "often": {"weight": 9, "fields": {"n": {"type": "integer", "min": 1, "max": 3}}},
                      "rare": {"fields": {"why": {"type": "string", "enum": ["x", "y"]},
                                          "note": {"type": "string", "required": false, "max_length": 200}}}
                  }}
            }"#;

    fn inline_profile() -> Profile {
        let p = Profile::from_json(INLINE_PROFILE).unwrap();
        assert_eq!(p.check(), vec![]);
        p
    }

    fn shipped_profiles() -> Vec<(String, Profile)> {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("device-profiles");
        let mut out = Vec::new();
        for entry in std::fs::read_dir(&dir).into_iter().flatten() {
            let path = entry.unwrap().path();
            if path.extension().and_then(|e| e.to_str()) != Some("json") {
                continue;
            }
            let text = std::fs::read_to_string(&path).unwrap();
            let profile =
                Profile::from_json(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            out.push((path.display().to_string(), profile));
        }
        out
    }

    fn check_generates_valid(name: &str, p: &Profile, rng: &mut StdRng) {
        for kind in [Kind::Telemetry, Kind::Events] {
            let Some(spec) = p.kind(kind) else {
                assert_eq!(generate(p, kind, rng), None);
                continue;
            };
            for _ in 0..200 {
                let payload =
                    generate(p, kind, rng).unwrap_or_else(|| panic!("{name}: no {kind} payload"));
                assert!(payload.len() <= spec.max_bytes, "{name} {kind}: {payload}");
                if let Err(r) = p.validate(kind, payload.as_bytes()) {
                    panic!("{name} {kind}: {payload} rejected: {r}");
                }
            }
        }
        assert_eq!(generate(p, Kind::Status, rng).as_deref(), Some("online"));
    }

    fn check_invalid_matches(name: &str, p: &Profile, rng: &mut StdRng) -> Vec<RejectReason> {
        let mut seen = Vec::new();
        for _ in 0..200 {
            let (kind, payload, reason) = generate_invalid(p, rng);
            let text = String::from_utf8_lossy(&payload);
            let got = p.validate(kind, &payload).err().map(|r| r.reason);
            assert_eq!(got, Some(reason), "{name} {kind}: {text}");
            if !seen.contains(&reason) {
                seen.push(reason);
            }
        }
        seen.sort();
        seen
    }

    #[test]
    fn shipped_profiles_generate_valid_payloads() {
        let profiles = shipped_profiles();
        let mut rng = StdRng::seed_from_u64(7);
        for (name, p) in &profiles {
            check_generates_valid(name, p, &mut rng);
        }
    }

    #[test]
    fn shipped_profiles_generate_each_kind_of_invalid_payload() {
        let mut rng = StdRng::seed_from_u64(8);
        for (name, p) in &shipped_profiles() {
            let seen = check_invalid_matches(name, p, &mut rng);
            // Every shipped profile rejects unknown fields; those with typed kinds also
            // see unknown types (the serial counters have none).
            let mut all = FLAWS.to_vec();
            let typed = [&p.telemetry, &p.events]
                .iter()
                .any(|k| k.as_ref().is_some_and(|k| !k.types.is_empty()));
            if !typed {
                all.retain(|r| *r != RejectReason::UnknownType);
            }
            all.sort();
            assert_eq!(seen, all, "{name}");
        }
    }

    #[test]
    fn inline_profile_generates_valid_payloads() {
        let p = inline_profile();
        let mut rng = StdRng::seed_from_u64(1);
        check_generates_valid("inline", &p, &mut rng);
        // Integers stay integers, numbers carry at most 2 decimals (unless the range is narrower).
        for _ in 0..100 {
            let v: Value =
                serde_json::from_str(&generate(&p, Kind::Telemetry, &mut rng).unwrap()).unwrap();
            assert!(
                v["count"].is_i64() && v["uptime_s"].is_i64() && v["below"].as_i64().unwrap() <= -5
            );
            let t = v["temp_c"].as_f64().unwrap();
            assert!(((t * 100.0).round() - t * 100.0).abs() < 1e-6, "{t}");
            assert_eq!(v["tags"].as_array().unwrap().len(), 2);
            assert!(v
                .get("meta")
                .is_none_or(|m| m == &Value::Object(Map::new())));
            assert!(["1.2.3", "1.3.0"].contains(&v["fw"].as_str().unwrap()));
            let label = v["label"].as_str().unwrap();
            assert!(
                (8..=16).contains(&label.len()) && label.chars().all(|c| c.is_ascii_alphanumeric())
            );
        }
    }

    #[test]
    fn inline_profile_generates_each_kind_of_invalid_payload() {
        let p = inline_profile();
        let mut rng = StdRng::seed_from_u64(2);
        let seen = check_invalid_matches("inline", &p, &mut rng);
        let mut all = FLAWS.to_vec();
        all.sort();
        assert_eq!(seen, all);

        // With `drop`, undeclared fields are not an error: that flaw is never produced.
        let mut dropping = p.clone();
        dropping.telemetry.as_mut().unwrap().unknown_fields = UnknownFields::Drop;
        dropping.events.as_mut().unwrap().unknown_fields = UnknownFields::Drop;
        let seen = check_invalid_matches("dropping", &dropping, &mut rng);
        assert!(!seen.contains(&RejectReason::UnknownField), "{seen:?}");
    }

    #[test]
    fn event_types_follow_their_weights() {
        let p = inline_profile();
        let mut rng = StdRng::seed_from_u64(3);
        let often = (0..1000)
            .filter(|_| {
                generate(&p, Kind::Events, &mut rng)
                    .unwrap()
                    .contains(r#""event":"often""#)
            })
            .count();
        assert!((850..=950).contains(&often), "{often}");
    }

    #[test]
    fn tight_max_bytes_drops_optional_fields() {
        let p = Profile::from_json(
            r#"{"name":"t","description":"","telemetry":{"max_bytes":20,"fields":{
                "a":{"type":"integer","min":0,"max":9},
                "pad":{"type":"string","required":false,"min_length":30}}}}"#,
        )
        .unwrap();
        let mut rng = StdRng::seed_from_u64(4);
        for _ in 0..50 {
            let payload = generate(&p, Kind::Telemetry, &mut rng).unwrap();
            assert!(payload.len() <= 20 && !payload.contains("pad"), "{payload}");
        }
        // A required field that cannot fit: no payload rather than an invalid one.
        let impossible = Profile::from_json(
            r#"{"name":"t","description":"","telemetry":{"max_bytes":10,"fields":{
                "pad":{"type":"string","min_length":30}}}}"#,
        )
        .unwrap();
        assert_eq!(generate(&impossible, Kind::Telemetry, &mut rng), None);
        assert_eq!(generate(&impossible, Kind::Events, &mut rng), None);
        let (kind, payload, reason) = generate_invalid(&impossible, &mut rng);
        assert_eq!(
            impossible.validate(kind, &payload).unwrap_err().reason,
            reason
        );
    }

    /// Simulated gates never let out more people than came in, and report who is inside.
    #[test]
    fn gates_count_people_as_a_building_has_them() {
        let mut rng = StdRng::seed_from_u64(7);
        let mut inside = 0i64;
        let (mut came, mut left) = (0i64, 0i64);
        for _ in 0..5_000 {
            let p = people_counted(
                r#"{"delta_in":1999,"delta_out":2000,"occupancy_est":0,"link":"ok"}"#.into(),
                &mut inside,
                &mut rng,
            );
            let v: Value = serde_json::from_str(&p).unwrap();
            came += v["delta_in"].as_i64().unwrap();
            left += v["delta_out"].as_i64().unwrap();
            assert!(left <= came, "never more out than in");
            assert_eq!(v["occupancy_est"].as_i64(), Some(came - left));
            assert_eq!(v["link"], "ok");
        }
        assert!(
            (50..=600).contains(&inside),
            "a crowd of a few hundred: {inside}"
        );
        let other = r#"{"uptime_s":5}"#.to_owned();
        assert_eq!(people_counted(other.clone(), &mut inside, &mut rng), other);
    }

    #[test]
    fn same_seed_same_payloads() {
        let p = inline_profile();
        let draw = |seed| {
            let mut rng = StdRng::seed_from_u64(seed);
            (0..20)
                .map(|i| {
                    let kind = if i % 2 == 0 {
                        Kind::Telemetry
                    } else {
                        Kind::Events
                    };
                    generate(&p, kind, &mut rng).unwrap()
                })
                .collect::<Vec<_>>()
        };
        assert_eq!(draw(5), draw(5));
        assert_ne!(draw(5), draw(6));
    }

    // --- run() against the real gateway, and without one ---------------------------------

    fn loaded(profile: Profile) -> Loaded {
        let toml = format!(
            r#"
            [gateway]
            branch_id = "b1"
            [broker]
            listen = "0.0.0.0:1883"
            [[devices]]
            id = "g1"
            profile = "{name}"
            password = "g1-secret"
            [[devices]]
            id = "g2"
            profile = "{name}"
            password = "{hash}"
            "#,
            name = profile.name,
            hash = Password::hash("g2-secret"),
        );
        let config = Config::parse(&toml).unwrap();
        let mut profiles = BTreeMap::new();
        profiles.insert(profile.name.clone(), Arc::new(profile));
        Loaded {
            path: "test.toml".into(),
            config,
            data_dir: "data".into(),
            profiles_dir: "device-profiles".into(),
            profiles,
            raw: Default::default(),
        }
    }

    fn options(broker: SocketAddr, duration: Option<Duration>) -> SimOptions {
        SimOptions {
            broker,
            speed: 20.0,
            invalid_every: 4,
            duration,
            only: Vec::new(),
            seed: 42,
        }
    }

    /// A branch in `dir` as the gateway loads it: `gateway.toml` on a free loopback port,
    /// the inline profile in `profiles/`, the buffer in `data/`. g1 and g3 have plain
    /// passwords; g2 an argon2 hash, so the simulator cannot be it.
    fn branch(dir: &Path) -> Loaded {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let profiles = dir.join("profiles");
        std::fs::create_dir_all(&profiles).unwrap();
        std::fs::write(profiles.join("gate-counter.json"), INLINE_PROFILE).unwrap();
        let toml = format!(
            r#"
            [gateway]
            branch_id = "b1"
            data_dir = "data"
            profiles_dir = "profiles"
            [broker]
            listen = "127.0.0.1:{port}"
            [storage]
            synchronous = "normal"
            [[devices]]
            id = "g1"
            profile = "gate-counter"
            password = "g1-secret"
            [[devices]]
            id = "g2"
            profile = "gate-counter"
            password = "{hash}"
            [[devices]]
            id = "g3"
            profile = "gate-counter"
            password = "g3-secret"
            "#,
            hash = Password::hash("g2-secret"),
        );
        let path = dir.join("gateway.toml");
        std::fs::write(&path, toml).unwrap();
        crate::config::load(&path).unwrap()
    }

    /// The single number `sql` selects.
    fn count(db: &Connection, sql: &str, params: impl rusqlite::Params) -> u64 {
        let n: i64 = db.query_row(sql, params, |r| r.get(0)).unwrap();
        u64::try_from(n).unwrap()
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn run_publishes_status_telemetry_and_events() {
        let dir = tempfile::tempdir().unwrap();
        let loaded = branch(dir.path());
        let shutdown = CancellationToken::new();
        let figures = Arc::new(crate::app::Figures::default());
        let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
        let mut gateway = tokio::spawn(crate::app::run(
            loaded.clone(),
            shutdown.clone(),
            figures.clone(),
            move |addr| {
                let _ = ready_tx.send(addr);
            },
        ));
        let addr = tokio::select! {
            Ok(addr) = ready_rx => addr,
            r = &mut gateway => panic!("the gateway stopped before it was ready: {r:?}"),
            () = tokio::time::sleep(Duration::from_secs(10)) => panic!("gateway not ready in 10 s"),
        };

        let started = std::time::Instant::now();
        let report = tokio::time::timeout(
            Duration::from_secs(10),
            run(
                &loaded,
                options(addr, Some(Duration::from_millis(1500))),
                CancellationToken::new(),
            ),
        )
        .await
        .expect("the simulation ends");
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "{:?}",
            started.elapsed()
        );

        // Let the gateway take in the last messages and the disconnects, then stop it.
        let expected = report.published_valid + report.published_invalid + 2 * 2; // + online, offline
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let handled = figures.intake.accepted.load(Ordering::Relaxed)
                + figures.intake.rejected.load(Ordering::Relaxed);
            let online = figures.devices_online.load(Ordering::Relaxed);
            if (handled >= expected && online == 0) || Instant::now() >= deadline {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(10), gateway)
            .await
            .expect("the gateway stops within 10 s")
            .expect("the gateway task does not panic")
            .expect("the gateway runs without error");

        assert_eq!(report.devices, 2, "{report:?}");
        assert_eq!(report.skipped_devices.len(), 1, "{report:?}");
        assert_eq!(report.skipped_devices[0].0, "g2");
        assert!(report.skipped_devices[0].1.contains("argon2"));
        // Per device: telemetry every 50 ms and ~4 events a second for 1.5 s.
        assert!(report.published_valid >= 20, "{report:?}");
        assert!(report.published_invalid >= 1, "{report:?}");
        assert_eq!(
            report.acked,
            report.published_valid + report.published_invalid,
            "{report:?}"
        );

        let db = Connection::open_with_flags(
            loaded.database_path(),
            OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .unwrap();
        for id in ["g1", "g3"] {
            let rows: Vec<(String, String)> = db
                .prepare("SELECT kind, payload FROM messages WHERE device = ?1 ORDER BY seq")
                .unwrap()
                .query_map([id], |r| Ok((r.get(0)?, r.get(1)?)))
                .unwrap()
                .collect::<Result<_, _>>()
                .unwrap();
            let pair = |r: Option<&(String, String)>| r.map(|(k, p)| (k.clone(), p.clone()));
            let status = |p: &str| Some(("status".to_owned(), p.to_owned()));
            assert_eq!(pair(rows.first()), status("online"), "{id}");
            assert_eq!(pair(rows.last()), status("offline"), "{id}");
            let statuses = rows.iter().filter(|(k, _)| k == "status").count();
            assert_eq!(statuses, 2, "{id}: {rows:?}");
            for kind in ["telemetry", "events"] {
                assert!(rows.iter().any(|(k, _)| k == kind), "{id}: no {kind}");
            }
            let (reported, online): (Option<String>, bool) = db
                .query_row(
                    "SELECT reported_status, online FROM devices WHERE id = ?1",
                    [id],
                    |r| Ok((r.get(0)?, r.get(1)?)),
                )
                .unwrap();
            assert_eq!(
                (reported.as_deref(), online),
                (Some("offline"), false),
                "{id}"
            );
        }
        let accepted = count(
            &db,
            "SELECT COUNT(*) FROM messages WHERE kind IN ('telemetry', 'events')",
            [],
        );
        assert_eq!(accepted, report.published_valid, "{report:?}");
        let rejected = count(&db, "SELECT COUNT(*) FROM rejected", []);
        assert_eq!(rejected, report.published_invalid, "{report:?}");
        let other_kinds = count(
            &db,
            "SELECT COUNT(*) FROM rejected WHERE kind NOT IN ('telemetry', 'events')",
            [],
        );
        assert_eq!(other_kinds, 0);

        // The argon2 device never connected.
        let g2_rows = count(
            &db,
            "SELECT (SELECT COUNT(*) FROM messages WHERE device = ?1)
                  + (SELECT COUNT(*) FROM rejected WHERE device = ?1)",
            ["g2"],
        );
        assert_eq!(g2_rows, 0);
        let (reported, online): (Option<String>, bool) = db
            .query_row(
                "SELECT reported_status, online FROM devices WHERE id = 'g2'",
                [],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .unwrap();
        assert_eq!((reported, online), (None, false));
    }

    #[tokio::test]
    async fn run_is_bounded_without_a_broker() {
        // A port nobody listens on: connections are refused, retried once a second.
        let addr = TcpListener::bind("127.0.0.1:0")
            .await
            .unwrap()
            .local_addr()
            .unwrap();
        let loaded = loaded(inline_profile());
        let started = std::time::Instant::now();
        let report = run(
            &loaded,
            options(addr, Some(Duration::from_millis(300))),
            CancellationToken::new(),
        )
        .await;
        assert!(
            started.elapsed() < Duration::from_secs(4),
            "{:?}",
            started.elapsed()
        );
        assert_eq!(
            (report.devices, report.published_valid, report.acked),
            (1, 0, 0)
        );

        // Cancellation stops a run without a duration.
        let shutdown = CancellationToken::new();
        let cancel = shutdown.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(200)).await;
            cancel.cancel();
        });
        let started = std::time::Instant::now();
        let report = run(&loaded, options(addr, None), shutdown).await;
        assert!(
            started.elapsed() < Duration::from_secs(4),
            "{:?}",
            started.elapsed()
        );
        assert_eq!(report.devices, 1);
    }

    #[tokio::test]
    async fn only_selects_devices_and_reports_unknown_ids() {
        let loaded = loaded(inline_profile());
        let mut opts = options("127.0.0.1:9".parse().unwrap(), Some(Duration::ZERO));
        opts.only = vec!["g2".into(), "nope".into()];
        let report = run(&loaded, opts, CancellationToken::new()).await;
        assert_eq!(report.devices, 0);
        let ids: Vec<&str> = report
            .skipped_devices
            .iter()
            .map(|(id, _)| id.as_str())
            .collect();
        assert_eq!(ids, vec!["g2", "nope"]);
    }

    #[test]
    fn unspecified_broker_means_loopback() {
        let a = loopback_if_unspecified("0.0.0.0:1883".parse().unwrap());
        assert_eq!(a, "127.0.0.1:1883".parse().unwrap());
        let a = loopback_if_unspecified("[::]:1883".parse().unwrap());
        assert_eq!(a, "[::1]:1883".parse().unwrap());
        let a = loopback_if_unspecified("10.0.0.2:1883".parse().unwrap());
        assert_eq!(a, "10.0.0.2:1883".parse().unwrap());
    }
}
