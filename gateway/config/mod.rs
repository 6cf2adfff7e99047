//! The gateway's TOML config and the device profiles it names.
//!
//! Parsing is strict (`deny_unknown_fields`: a typo is an error, never silently ignored);
//! semantics serde cannot see are checked afterwards by [`Config::check`], which reports
//! every problem with the key it concerns. [`load`] does both and loads every profile the
//! devices use, so `check-config` and `run` accept exactly the same files.

pub mod api;
mod broker;
pub mod command_spec;
pub mod file;
pub mod profile;
pub mod rate_limit;
pub mod serial_spec;
pub mod sip2;
pub(crate) mod strict_json;
mod toml_error;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use serde::Deserialize;

use crate::model::DeviceId;
pub use api::{ApiSection, LobbyAccess};
pub use broker::BrokerSection;
pub use profile::Profile;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub gateway: GatewaySection,
    pub broker: BrokerSection,
    #[serde(default)]
    pub storage: StorageSection,
    /// The central system; without it the gateway buffers and serves locally only.
    #[serde(default)]
    pub upstream: Option<UpstreamSection>,
    /// The key for profile fields marked `privacy: hash`.
    #[serde(default)]
    pub privacy: Option<PrivacySection>,
    /// The HTTP API (summaries, devices, health, metrics); off without this section.
    #[serde(default)]
    pub api: Option<ApiSection>,
    /// Commands from central to devices (README "Commands").
    #[serde(default)]
    pub commands: CommandsSection,
    #[serde(default)]
    pub devices: Vec<DeviceSection>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CommandsSection {
    /// Open commands (queued, sent, delivered) a device may have; more are `rejected`
    /// with `queue_full`.
    #[serde(default = "default_max_commands")]
    pub max_per_device: usize,
}

impl Default for CommandsSection {
    fn default() -> Self {
        CommandsSection {
            max_per_device: default_max_commands(),
        }
    }
}

fn default_max_commands() -> usize {
    50
}

#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PrivacySection {
    /// Per-branch secret for HMAC-SHA256 of patron identifiers. Keep it on the branch: with
    /// it, a known card number could be matched to its hash.
    pub hmac_secret: String,
}

impl fmt::Debug for PrivacySection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("PrivacySection { hmac_secret: <redacted> }")
    }
}

#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamSection {
    /// `mqtt://host:port`, or `mqtts://host:port` for TLS (port defaults 1883 / 8883).
    pub url: String,
    pub client_id: String,
    #[serde(default)]
    pub username: Option<String>,
    #[serde(default)]
    pub password: Option<String>,
    /// PEM file of the CA(s) that sign the central broker's certificate (mqtts only);
    /// without it the system's root certificates are used.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// PEM client certificate chain and private key, for brokers that require them.
    #[serde(default)]
    pub client_cert: Option<PathBuf>,
    #[serde(default)]
    pub client_key: Option<PathBuf>,
    /// Every message goes to `{topic_prefix}/devices/ID/KIND`.
    pub topic_prefix: String,
    /// Messages published and not yet acknowledged at any time.
    #[serde(default = "default_max_inflight")]
    pub max_inflight: u16,
    #[serde(default = "default_keep_alive_s")]
    pub keep_alive_s: u64,
    /// Longest wait between reconnect attempts (each wait is jittered to 50-100%).
    #[serde(default = "default_reconnect_max_ms")]
    pub reconnect_max_ms: u64,
    /// Cap on the backlog's drain rate in messages per second (live messages are not
    /// capped); without it the backlog drains as fast as the link takes it.
    #[serde(default)]
    pub max_backfill_rate: Option<u32>,
    /// Send each closed hour's branch summary to `{topic_prefix}/summaries/hour`.
    #[serde(default = "default_push_summaries")]
    pub push_summaries: bool,
    /// The MQTT version spoken to central: `"5"` (reason codes, limits from CONNACK) or
    /// `"3.1.1"` for old centrals (which cannot say they refused a message).
    #[serde(default)]
    pub protocol: Protocol,
}

/// The MQTT version of the upstream connection.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
pub enum Protocol {
    #[default]
    #[serde(rename = "5")]
    V5,
    #[serde(rename = "3.1.1")]
    V311,
}

fn default_push_summaries() -> bool {
    true
}

impl fmt::Debug for UpstreamSection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("UpstreamSection")
            .field("url", &self.url)
            .field("client_id", &self.client_id)
            .field("username", &self.username)
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .field("topic_prefix", &self.topic_prefix)
            .finish_non_exhaustive()
    }
}

/// Where the central broker is, from `upstream.url`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpstreamAddr {
    pub host: String,
    pub port: u16,
    pub tls: bool,
}

impl UpstreamSection {
    pub fn addr(&self) -> Result<UpstreamAddr, String> {
        // Errors and logs name the url: a password in it would be printed.
        let url = url::Url::parse(&self.url).map_err(|e| format!("is not a URL ({e})"))?;
        if !url.username().is_empty() || url.password().is_some() {
            return Err(
                "must not hold credentials: use upstream.username and upstream.password".into(),
            );
        }
        let tls = match url.scheme() {
            "mqtt" => false,
            "mqtts" => true,
            other => return Err(format!("scheme {other:?} is neither mqtt:// nor mqtts://")),
        };
        if !matches!(url.path(), "" | "/") || url.query().is_some() || url.fragment().is_some() {
            return Err("must be only mqtt[s]://host[:port]".into());
        }
        let host = match url.host() {
            Some(url::Host::Ipv6(a)) => a.to_string(),
            Some(h) => h.to_string(),
            None => return Err("must name a host".into()),
        };
        let port = url.port().unwrap_or(if tls { 8883 } else { 1883 });
        if host.is_empty() || port == 0 {
            return Err("must name a host and a port".into());
        }
        Ok(UpstreamAddr { host, port, tls })
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GatewaySection {
    pub branch_id: String,
    /// Where the SQLite buffer lives; relative paths resolve against the config file's folder.
    #[serde(default = "default_data_dir")]
    pub data_dir: PathBuf,
    #[serde(default = "default_profiles_dir")]
    pub profiles_dir: PathBuf,
    /// Log filter (`error`..`trace`, or a tracing directive); `RUST_LOG` wins when set.
    #[serde(default = "default_log_level")]
    pub log_level: String,
    /// The branch's time zone (IANA name): summaries cut hours and days in local time.
    #[serde(default = "default_timezone")]
    pub timezone: String,
    /// The language of the pages' labels (`en` or `zh`).
    #[serde(default)]
    pub language: Language,
}

/// A language the pages are labelled in.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Language {
    #[default]
    En,
    Zh,
}

fn default_timezone() -> String {
    "UTC".into()
}

impl GatewaySection {
    /// The configured time zone (`check()` has verified the name).
    pub fn time_zone(&self) -> jiff::tz::TimeZone {
        jiff::tz::TimeZone::get(&self.timezone).unwrap_or(jiff::tz::TimeZone::UTC)
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StorageSection {
    /// How many rejected messages to keep for branch IT to inspect (oldest go first).
    #[serde(default = "default_rejected_keep")]
    pub rejected_keep: u64,
    /// SQLite `synchronous`: `full` (a commit survives power loss) or `normal` (faster,
    /// the last commits can roll back on power loss).
    #[serde(default)]
    pub synchronous: Synchronous,
    /// Capacity of the queue between intake and the SQLite writer, in messages.
    #[serde(default = "default_queue")]
    pub queue_capacity: usize,
    /// How long delivered messages stay in the buffer (e.g. "7d", "12h").
    #[serde(default = "default_keep_delivered", with = "humantime_serde_compat")]
    pub keep_delivered: std::time::Duration,
    /// Disk cap for the buffer: database file plus its WAL, in bytes.
    #[serde(default = "default_max_bytes")]
    pub max_bytes: u64,
    /// Compute summaries (rollups) as messages are committed. `false` leaves the summaries
    /// API and pushes empty: for a branch that never uses them, or to measure their cost.
    #[serde(default = "default_rollups")]
    pub rollups: bool,
}

fn default_rollups() -> bool {
    true
}

/// `humantime` strings ("7d", "90m") for durations in the config.
mod humantime_serde_compat {
    use serde::{Deserialize, Deserializer};
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<std::time::Duration, D::Error> {
        let s = String::deserialize(d)?;
        // The message names no part of the value (config errors quote no config text).
        humantime::parse_duration(&s)
            .map_err(|_| serde::de::Error::custom("is not a duration like \"7d\" or \"12h\""))
    }
}

impl Default for StorageSection {
    fn default() -> Self {
        StorageSection {
            rejected_keep: default_rejected_keep(),
            synchronous: Synchronous::default(),
            queue_capacity: default_queue(),
            keep_delivered: default_keep_delivered(),
            max_bytes: default_max_bytes(),
            rollups: default_rollups(),
        }
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Synchronous {
    #[default]
    Full,
    Normal,
}

#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeviceSection {
    pub id: DeviceId,
    pub profile: String,
    /// Plain text, or an argon2 PHC string (`$argon2id$...`, see `branch-gateway hash-password`).
    /// For MQTT devices; a serial device has `serial` instead.
    #[serde(default)]
    pub password: String,
    /// The serial line of a device that does not speak MQTT.
    #[serde(default)]
    pub serial: Option<SerialPortSection>,
    /// A self-check kiosk tapped on its SIP2 link to the ILS (no password either).
    #[serde(default)]
    pub sip2: Option<sip2::Sip2Section>,
}

/// `serial = { path = "/dev/serial/by-id/...", baud = 9600, ... }` on a device.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SerialPortSection {
    /// Prefer a stable `/dev/serial/by-id/...` link: a replugged adapter may get a new ttyUSBn.
    pub path: PathBuf,
    pub baud: u32,
    #[serde(default = "default_data_bits")]
    pub data_bits: u8,
    #[serde(default)]
    pub parity: Parity,
    #[serde(default = "default_stop_bits")]
    pub stop_bits: u8,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Parity {
    #[default]
    None,
    Odd,
    Even,
}

fn default_data_bits() -> u8 {
    8
}
fn default_stop_bits() -> u8 {
    1
}

impl fmt::Debug for DeviceSection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DeviceSection")
            .field("id", &self.id)
            .field("profile", &self.profile)
            .field("password", &"<redacted>")
            .field("serial", &self.serial)
            .field("sip2", &self.sip2)
            .finish()
    }
}

fn default_data_dir() -> PathBuf {
    PathBuf::from("./data")
}
fn default_profiles_dir() -> PathBuf {
    PathBuf::from("./device-profiles")
}
fn default_log_level() -> String {
    "info".to_owned()
}
fn default_rejected_keep() -> u64 {
    10_000
}
/// One batch's worth: with 200 devices at full speed, 4,096 held 3 MiB more at the peak
/// (`drain_bench`) for no throughput.
fn default_queue() -> usize {
    2048
}
fn default_max_bytes() -> u64 {
    2 * 1024 * 1024 * 1024
}
fn default_keep_delivered() -> std::time::Duration {
    std::time::Duration::from_secs(7 * 24 * 3600)
}
fn default_max_inflight() -> u16 {
    1024
}
fn default_keep_alive_s() -> u64 {
    30
}
fn default_reconnect_max_ms() -> u64 {
    1000
}

/// One semantic problem: the key it concerns and what is wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub key: String,
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.key, self.message)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{path}: {source}")]
    Read {
        path: PathBuf,
        source: file::FileError,
    },
    #[error("{path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("{path}: {}", list(problems))]
    Invalid {
        path: PathBuf,
        problems: Vec<Problem>,
    },
}

fn list(problems: &[Problem]) -> String {
    let mut s = String::new();
    for (i, p) in problems.iter().enumerate() {
        if i > 0 {
            s.push_str("\n  ");
        }
        s.push_str(&p.to_string());
    }
    s
}

/// A device id is its MQTT username and a topic level: keep it to safe characters.
pub fn valid_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 64
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.')
}

impl Config {
    /// What is allowed but worth a word at `check-config`: settings that lose a guarantee.
    pub fn warnings(&self) -> Vec<Problem> {
        let mut out = Vec::new();
        if let Some(up) = &self.upstream {
            if up.protocol == Protocol::V311 {
                out.push(Problem {
                    key: "upstream.protocol".into(),
                    message: "MQTT 3.1.1 has no reason codes: a message central refuses by \
                              ACL or quota is acknowledged like a delivery and cannot be \
                              detected or quarantined (use \"5\" if central speaks MQTT 5)"
                        .into(),
                });
                out.push(Problem {
                    key: "upstream.protocol".into(),
                    message: "commands and notices from central need MQTT 5: over 3.1.1 \
                              they are taken from the API only"
                        .into(),
                });
            }
        }
        out
    }

    /// Parse a config file's text. An error names the line, column and key, never the
    /// text itself (it may hold a password, the API token or `hmac_secret`).
    pub fn parse(text: &str) -> Result<Config, String> {
        toml::from_str(text).map_err(|e| toml_error::describe(text, &e))
    }

    /// Semantic checks; every problem is reported with its key.
    pub fn check(&self) -> Vec<Problem> {
        let mut problems = Vec::new();
        let mut push = |key: String, message: String| problems.push(Problem { key, message });
        if jiff::tz::TimeZone::get(&self.gateway.timezone).is_err() {
            push(
                "gateway.timezone".into(),
                format!(
                    "{:?} is not an IANA time zone (e.g. \"Asia/Shanghai\")",
                    self.gateway.timezone
                ),
            );
        }
        if !valid_id(&self.gateway.branch_id) {
            push(
                "gateway.branch_id".into(),
                "must be 1-64 characters of A-Z a-z 0-9 - _ .".into(),
            );
        }
        for (key, message) in self.broker.check() {
            push(format!("broker.{key}"), message);
        }
        if !(1..=1000).contains(&self.commands.max_per_device) {
            push(
                "commands.max_per_device".into(),
                "must be between 1 and 1000".into(),
            );
        }
        if !(16..=1_000_000).contains(&self.storage.queue_capacity) {
            push(
                "storage.queue_capacity".into(),
                "must be between 16 and 1000000".into(),
            );
        }
        if self.storage.max_bytes < 1024 * 1024 {
            push(
                "storage.max_bytes".into(),
                "must be at least 1048576 (1 MiB)".into(),
            );
        }
        if tracing_subscriber::EnvFilter::try_new(&self.gateway.log_level).is_err() {
            push(
                "gateway.log_level".into(),
                format!("{:?} is not a log level or filter", self.gateway.log_level),
            );
        }
        if let Some(up) = &self.upstream {
            if let Err(e) = up.addr() {
                push("upstream.url".into(), e);
            }
            if up.client_id.is_empty() || up.client_id.len() > 128 {
                push(
                    "upstream.client_id".into(),
                    "must be 1-128 characters".into(),
                );
            }
            if up.topic_prefix.is_empty()
                || up.topic_prefix.ends_with('/')
                || up.topic_prefix.contains(['+', '#'])
            {
                push(
                    "upstream.topic_prefix".into(),
                    "must be a topic without wildcards or a trailing /".into(),
                );
            }
            if !(1..=1024).contains(&up.max_inflight) {
                push(
                    "upstream.max_inflight".into(),
                    "must be between 1 and 1024".into(),
                );
            }
            if !(5..=3600).contains(&up.keep_alive_s) {
                push(
                    "upstream.keep_alive_s".into(),
                    "must be between 5 and 3600".into(),
                );
            }
            if !(100..=600_000).contains(&up.reconnect_max_ms) {
                push(
                    "upstream.reconnect_max_ms".into(),
                    "must be between 100 and 600000".into(),
                );
            }
            if up.password.is_some() && up.username.is_none() {
                push("upstream.password".into(), "needs upstream.username".into());
            }
            let tls = up.addr().map(|a| a.tls).unwrap_or(false);
            for (key, set) in [
                ("ca_file", up.ca_file.is_some()),
                ("client_cert", up.client_cert.is_some()),
                ("client_key", up.client_key.is_some()),
            ] {
                if set && !tls {
                    push(format!("upstream.{key}"), "needs an mqtts:// url".into());
                }
            }
            if up.max_backfill_rate == Some(0) {
                push(
                    "upstream.max_backfill_rate".into(),
                    "must be at least 1 (leave it out for no cap)".into(),
                );
            }
            if up.client_cert.is_some() != up.client_key.is_some() {
                push(
                    "upstream.client_cert".into(),
                    "client_cert and client_key go together".into(),
                );
            }
        }
        if let Some(a) = &self.api {
            a.check(&mut push);
        }
        if let Some(p) = &self.privacy {
            if p.hmac_secret.len() < 16 {
                push(
                    "privacy.hmac_secret".into(),
                    "must be at least 16 characters (a random per-branch secret)".into(),
                );
            }
        }
        let mut seen = HashSet::new();
        let mut sip2_listens = HashSet::new();
        for (i, d) in self.devices.iter().enumerate() {
            let key = |k: &str| format!("devices[{i}].{k} (id {:?})", d.id);
            if !valid_id(&d.id) {
                push(
                    key("id"),
                    "must be 1-64 characters of A-Z a-z 0-9 - _ .".into(),
                );
            }
            if !seen.insert(d.id.as_str()) {
                push(key("id"), "is used by an earlier device".into());
            }
            if let Some(tap) = &d.sip2 {
                if d.serial.is_some() {
                    push(
                        key("sip2"),
                        "a device is on a serial line or a SIP2 link, not both".into(),
                    );
                }
                if !d.password.is_empty() {
                    push(
                        key("password"),
                        "a SIP2 kiosk does not log in over MQTT: remove it".into(),
                    );
                }
                for (k, message) in tap.check() {
                    push(key(&format!("sip2.{k}")), message);
                }
                if !sip2_listens.insert(tap.listen) {
                    push(
                        key("sip2.listen"),
                        "is used by an earlier kiosk (one listener is one kiosk)".into(),
                    );
                }
                if tap.listen == self.broker.listen {
                    push(key("sip2.listen"), "is the broker's address".into());
                }
            }
            match &d.serial {
                None if d.sip2.is_some() => {}
                None => {
                    if let Err(e) = Password::parse(&d.password) {
                        push(key("password"), e);
                    }
                }
                Some(port) => {
                    if !d.password.is_empty() {
                        push(
                            key("password"),
                            "a serial device does not log in over MQTT: remove it".into(),
                        );
                    }
                    if port.path.as_os_str().is_empty() {
                        push(key("serial.path"), "must not be empty".into());
                    }
                    if !(50..=4_000_000).contains(&port.baud) {
                        push(key("serial.baud"), "must be between 50 and 4000000".into());
                    }
                    if !(5..=8).contains(&port.data_bits) {
                        push(key("serial.data_bits"), "must be 5, 6, 7 or 8".into());
                    }
                    if !(1..=2).contains(&port.stop_bits) {
                        push(key("serial.stop_bits"), "must be 1 or 2".into());
                    }
                }
            }
            if !valid_id(&d.profile) {
                push(key("profile"), "is not a valid profile name".into());
            }
        }
        problems
    }
}

/// Largest argon2 memory cost accepted in a device's hash, in KiB (64 MiB).
pub const MAX_ARGON2_KIB: u32 = 65_536;

/// A device secret as configured: compared in constant time, or verified against argon2.
#[derive(Clone)]
pub enum Password {
    Plain(String),
    Argon2(String),
    /// A serial device: no MQTT login is accepted.
    None,
}

impl fmt::Debug for Password {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Password::Plain(_) => f.write_str("Password::Plain(<redacted>)"),
            Password::Argon2(_) => f.write_str("Password::Argon2(<redacted>)"),
            Password::None => f.write_str("Password::None"),
        }
    }
}

impl Password {
    pub fn parse(s: &str) -> Result<Password, String> {
        if s.is_empty() {
            return Err("must not be empty".into());
        }
        if s.starts_with("$argon2") {
            let hash = argon2::PasswordHash::new(s)
                .map_err(|e| format!("looks like an argon2 hash but does not parse: {e}"))?;
            if hash.salt.is_none() || hash.hash.is_none() {
                return Err("looks like an argon2 hash but has no salt or hash part".into());
            }
            // Each check takes `m` KiB while it runs: bound what one login may cost.
            let params = argon2::Params::try_from(&hash)
                .map_err(|e| format!("argon2 parameters do not parse: {e}"))?;
            if params.m_cost() > MAX_ARGON2_KIB || params.t_cost() > 16 || params.p_cost() > 8 {
                return Err(format!(
                    "argon2 cost is too high for a branch PC: at most m={MAX_ARGON2_KIB} KiB, t=16, p=8 (hash-password makes m=19456, t=2, p=1)"
                ));
            }
            return Ok(Password::Argon2(s.to_owned()));
        }
        Ok(Password::Plain(s.to_owned()))
    }

    /// Constant-time for plain secrets; argon2 is slow by design (tens of ms).
    pub fn verify(&self, given: &[u8]) -> bool {
        use subtle::ConstantTimeEq;
        match self {
            Password::Plain(p) => p.as_bytes().ct_eq(given).into(),
            Password::None => false,
            Password::Argon2(phc) => {
                use argon2::PasswordVerifier;
                match argon2::PasswordHash::new(phc) {
                    Ok(hash) => argon2::Argon2::default()
                        .verify_password(given, &hash)
                        .is_ok(),
                    Err(_) => false,
                }
            }
        }
    }

    /// An argon2id PHC string for `secret`, with a fresh random salt.
    pub fn hash(secret: &str) -> String {
        use argon2::password_hash::{rand_core::OsRng, PasswordHasher, SaltString};
        let salt = SaltString::generate(&mut OsRng);
        argon2::Argon2::default()
            .hash_password(secret.as_bytes(), &salt)
            .map(|h| h.to_string())
            .unwrap_or_default()
    }
}

/// One configured device, as the broker and intake see it.
#[derive(Debug, Clone)]
pub struct Device {
    pub id: DeviceId,
    pub profile: Arc<Profile>,
    pub password: Password,
}

/// The configured devices by id. Shared read-mostly between the broker's protocol wrapper
/// (auth, ACL) and intake (validation).
#[derive(Default)]
pub struct DeviceTable {
    pub devices: HashMap<DeviceId, Device>,
    /// `[privacy] hmac_secret`: the key for fields marked `privacy: hash`.
    pub privacy_key: Option<Arc<[u8]>>,
    /// `[storage] rollups`: whether accepted messages carry rollup contributions.
    pub rollups: bool,
}

impl fmt::Debug for DeviceTable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DeviceTable")
            .field("devices", &self.devices)
            .field(
                "privacy_key",
                &self.privacy_key.as_ref().map(|_| "<redacted>"),
            )
            .field("rollups", &self.rollups)
            .finish()
    }
}

impl DeviceTable {
    pub fn get(&self, id: &str) -> Option<&Device> {
        self.devices.get(id)
    }
}

/// A handle every reader clones; `load()` is a cheap `Arc` clone under a short read lock.
#[derive(Debug, Clone, Default)]
pub struct SharedDevices(Arc<RwLock<Arc<DeviceTable>>>);

impl SharedDevices {
    pub fn new(table: DeviceTable) -> Self {
        SharedDevices(Arc::new(RwLock::new(Arc::new(table))))
    }
    pub fn load(&self) -> Arc<DeviceTable> {
        match self.0.read() {
            Ok(g) => g.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// Swap in a new table (a reload): readers see it at their next `load()`.
    pub fn store(&self, table: DeviceTable) {
        let table = Arc::new(table);
        match self.0.write() {
            Ok(mut g) => *g = table,
            Err(poisoned) => *poisoned.into_inner() = table,
        }
    }
}

/// The raw TOML of a config file, for comparing what a reload changes. Its `Debug` shows
/// no values (they include the secrets).
#[derive(Clone, Default, PartialEq)]
pub struct RawConfig(pub toml::Table);

impl fmt::Debug for RawConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_set().entries(self.0.keys()).finish()
    }
}

/// What a reload cannot apply: the sections (and serial devices, whose readers start
/// with the process) that differ between the running config and the new one.
pub fn needs_restart(running: &RawConfig, new: &RawConfig) -> Vec<String> {
    let (running, new) = (&running.0, &new.0);
    let mut out: Vec<String> = ["gateway", "broker", "storage", "upstream", "api"]
        .into_iter()
        .filter(|key| running.get(*key) != new.get(*key))
        .map(|key| format!("[{key}]"))
        .collect();
    let serial = |t: &toml::Table| -> BTreeMap<String, toml::Value> {
        device_entries(t)
            .into_iter()
            .filter(|(_, v)| v.get("serial").is_some())
            .collect()
    };
    let (a, b) = (serial(running), serial(new));
    let ids: std::collections::BTreeSet<&String> = a.keys().chain(b.keys()).collect();
    for id in ids {
        if a.get(id) != b.get(id) {
            out.push(format!("serial device {id}"));
        }
    }
    out
}

/// Device ids added, removed and changed (profile, password, anything) between two
/// config files.
pub fn device_changes(old: &RawConfig, new: &RawConfig) -> (Vec<String>, Vec<String>, Vec<String>) {
    let (a, b) = (device_entries(&old.0), device_entries(&new.0));
    let added = b.keys().filter(|k| !a.contains_key(*k)).cloned().collect();
    let removed = a.keys().filter(|k| !b.contains_key(*k)).cloned().collect();
    let changed = b
        .iter()
        .filter(|(k, v)| a.get(*k).is_some_and(|old| old != *v))
        .map(|(k, _)| k.clone())
        .collect();
    (added, removed, changed)
}

fn device_entries(t: &toml::Table) -> BTreeMap<String, toml::Value> {
    t.get("devices")
        .and_then(|d| d.as_array())
        .into_iter()
        .flatten()
        .filter_map(|d| Some((d.get("id")?.as_str()?.to_owned(), d.clone())))
        .collect()
}

/// A config file with its paths resolved and the profiles its devices use.
#[derive(Debug, Clone)]
pub struct Loaded {
    pub path: PathBuf,
    pub config: Config,
    pub data_dir: PathBuf,
    pub profiles_dir: PathBuf,
    pub profiles: BTreeMap<String, Arc<Profile>>,
    /// The file as read, for comparing what a reload changes.
    pub raw: RawConfig,
}

impl Loaded {
    pub fn device_table(&self) -> DeviceTable {
        let mut devices = HashMap::new();
        for d in &self.config.devices {
            // `load` has already checked that the password parses and the profile exists.
            let password = match (&d.serial, &d.sip2) {
                (None, None) => Password::parse(&d.password),
                _ => Ok(Password::None),
            };
            if let (Ok(password), Some(profile)) = (password, self.profiles.get(&d.profile)) {
                devices.insert(
                    d.id.clone(),
                    Device {
                        id: d.id.clone(),
                        profile: profile.clone(),
                        password,
                    },
                );
            }
        }
        DeviceTable {
            devices,
            privacy_key: self
                .config
                .privacy
                .as_ref()
                .map(|p| Arc::from(p.hmac_secret.as_bytes())),
            rollups: self.config.storage.rollups,
        }
    }

    /// The SQLite file inside `data_dir`.
    pub fn database_path(&self) -> PathBuf {
        self.data_dir.join("branch-gateway.sqlite")
    }

    /// The largest payload any configured profile accepts (sets the broker's packet limit).
    pub fn max_payload(&self) -> usize {
        self.profiles
            .values()
            .map(|p| p.max_bytes())
            .max()
            .unwrap_or(0)
    }
}

fn resolve(base: &Path, p: &Path) -> PathBuf {
    if p.is_absolute() {
        return p.to_path_buf();
    }
    // Drop `.` components so `./data` next to `./gateway.toml` reads as `data`, not `././data`.
    let mut out: PathBuf = base
        .components()
        .filter(|c| !matches!(c, std::path::Component::CurDir))
        .collect();
    out.extend(
        p.components()
            .filter(|c| !matches!(c, std::path::Component::CurDir)),
    );
    if out.as_os_str().is_empty() {
        out.push(".");
    }
    out
}

/// Read, parse and check a config file and every profile its devices use. Every file is
/// read once, and only if it is a regular file within its limit (see [`file`]).
pub fn load(path: &Path) -> Result<Loaded, ConfigError> {
    let text =
        file::read_text(path, file::MAX_CONFIG_BYTES).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
    let parse_error = |message| ConfigError::Parse {
        path: path.to_path_buf(),
        message,
    };
    let config = Config::parse(&text).map_err(parse_error)?;
    let raw = text
        .parse::<toml::Table>()
        .map(RawConfig)
        .map_err(|e| parse_error(toml_error::describe(&text, &e)))?;
    let problems = config.check();
    if !problems.is_empty() {
        return Err(ConfigError::Invalid {
            path: path.to_path_buf(),
            problems,
        });
    }
    let base = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let mut config = config;
    let mut problems = Vec::new();
    if let Some(up) = config.upstream.as_mut() {
        for (key, file) in [
            ("ca_file", &mut up.ca_file),
            ("client_cert", &mut up.client_cert),
            ("client_key", &mut up.client_key),
        ] {
            if let Some(f) = file {
                *f = resolve(base, f);
                // Read in full when TLS is set up (`upstream::tls_config`), at the same limit.
                match file::check(f, file::MAX_PEM_BYTES) {
                    Ok(()) => {}
                    Err(file::FileError::Io(e)) => problems.push(Problem {
                        key: format!("upstream.{key}"),
                        message: format!("cannot read {}: {e}", f.display()),
                    }),
                    Err(e) => problems.push(Problem {
                        key: format!("upstream.{key}"),
                        message: format!("{}: {e}", f.display()),
                    }),
                }
            }
        }
    }
    let data_dir = resolve(base, &config.gateway.data_dir);
    let profiles_dir = resolve(base, &config.gateway.profiles_dir);
    let mut profiles = BTreeMap::new();
    for (i, d) in config.devices.iter().enumerate() {
        if profiles.contains_key(&d.profile) {
            continue;
        }
        let file = profiles_dir.join(format!("{}.json", d.profile));
        let text = match file::read_text(&file, file::MAX_PROFILE_BYTES) {
            Ok(t) => t,
            Err(e) => {
                let message = match e {
                    file::FileError::Io(e) => format!(
                        "profile {:?}: cannot read {}: {e}",
                        d.profile,
                        file.display()
                    ),
                    e => format!("profile {:?}: {}: {e}", d.profile, file.display()),
                };
                problems.push(Problem {
                    key: format!("devices[{i}].profile (id {:?})", d.id),
                    message,
                });
                continue;
            }
        };
        let profile = match Profile::from_json(&text) {
            Ok(p) => p,
            Err(e) => {
                return Err(ConfigError::Parse {
                    path: file,
                    message: e.to_string(),
                })
            }
        };
        let mut profile_problems: Vec<Problem> = profile
            .check()
            .into_iter()
            .map(|p| Problem {
                key: if p.path.is_empty() {
                    "(top level)".into()
                } else {
                    p.path
                },
                message: p.message,
            })
            .collect();
        if profile.name != d.profile {
            profile_problems.push(Problem {
                key: "name".into(),
                message: format!(
                    "is {:?} but the file is named {:?}",
                    profile.name, d.profile
                ),
            });
        }
        if !profile_problems.is_empty() {
            return Err(ConfigError::Invalid {
                path: file,
                problems: profile_problems,
            });
        }
        profiles.insert(d.profile.clone(), Arc::new(profile));
    }
    if config.privacy.is_none() {
        for (name, p) in &profiles {
            if let Some(field) = p.hashed_fields().first() {
                problems.push(Problem {
                    key: "privacy.hmac_secret".into(),
                    message: format!(
                        "is required: profile {name:?} hashes `{field}` (patron data is never stored in clear)"
                    ),
                });
                break;
            }
        }
    }
    for (i, d) in config.devices.iter().enumerate() {
        // The tap hands a patron session's card number to intake as `events.patron_id`:
        // only a profile that hashes it may take it.
        let hashes_patron = profiles
            .get(&d.profile)
            .map(|p| p.hashed_fields().iter().any(|f| f == "events.patron_id"));
        if d.sip2.is_some() && hashes_patron == Some(false) {
            problems.push(Problem {
                key: format!("devices[{i}].sip2 (id {:?})", d.id),
                message: format!(
                    "profile {:?} does not hash `events.patron_id` (`privacy: hash`): a SIP2 kiosk needs a profile like self-check-kiosk",
                    d.profile
                ),
            });
        }
        let serial_profile = profiles.get(&d.profile).map(|p| p.serial.is_some());
        if d.serial.is_some() && serial_profile == Some(false) {
            problems.push(Problem {
                key: format!("devices[{i}].serial (id {:?})", d.id),
                message: format!(
                    "profile {:?} has no `serial` section: it cannot decode a serial device",
                    d.profile
                ),
            });
        }
    }
    if !problems.is_empty() {
        return Err(ConfigError::Invalid {
            path: path.to_path_buf(),
            problems,
        });
    }
    Ok(Loaded {
        path: path.to_path_buf(),
        config,
        data_dir,
        profiles_dir,
        profiles,
        raw,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"
        [gateway]
        branch_id = "b1"
        [broker]
        listen = "127.0.0.1:1883"
        [[devices]]
        id = "k1"
        profile = "p"
        password = "secret"
    "#;

    #[test]
    fn defaults_apply() {
        let c = Config::parse(MINIMAL).unwrap();
        assert_eq!(c.gateway.data_dir, PathBuf::from("./data"));
        assert_eq!(c.storage.rejected_keep, 10_000);
        assert_eq!(c.storage.synchronous, Synchronous::Full);
        assert!(c.check().is_empty());
    }

    #[test]
    fn unknown_key_names_key_and_line() {
        let text = MINIMAL.replace("listen =", "listne =");
        let err = Config::parse(&text).unwrap_err();
        assert!(err.contains("listne"), "{err}");
        assert!(err.contains("line 5"), "{err}");
    }

    #[test]
    fn semantic_problems_name_their_keys() {
        let text =
            format!("{MINIMAL}\n[[devices]]\nid = \"k1\"\nprofile = \"p\"\npassword = \"\"\n");
        let c = Config::parse(&text).unwrap();
        let keys: Vec<String> = c.check().into_iter().map(|p| p.key).collect();
        assert_eq!(
            keys,
            vec![
                "devices[1].id (id \"k1\")",
                "devices[1].password (id \"k1\")"
            ]
        );
    }

    #[test]
    fn debug_output_shows_no_secret() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("device-profiles")).unwrap();
        std::fs::write(
            dir.path().join("device-profiles/p.json"),
            r#"{"name":"p","description":"","telemetry":{"max_bytes":100}}"#,
        )
        .unwrap();
        let text = MINIMAL.replace("secret", "device-pw-planted")
            + "[api]\nlisten = \"127.0.0.1:8080\"\ntoken = \"api-token-planted-0123\"\n\
               [privacy]\nhmac_secret = \"hmac-secret-planted-0123\"\n\
               [upstream]\nurl = \"mqtt://127.0.0.1:1883\"\nclient_id = \"c\"\ntopic_prefix = \"p\"\n\
               username = \"u\"\npassword = \"upstream-pw-planted\"\n";
        let path = dir.path().join("gateway.toml");
        std::fs::write(&path, text).unwrap();
        let loaded = load(&path).unwrap();
        let shown = format!("{loaded:?} {:?} {:?}", loaded.device_table(), loaded.raw);
        assert!(shown.contains("Loaded"), "{shown}");
        for planted in [
            "device-pw-planted",
            "api-token-planted",
            "hmac-secret-planted",
            "upstream-pw-planted",
        ] {
            assert!(!shown.contains(planted), "{planted} in {shown}");
        }
        // Nor as bytes (the privacy key is held as `[u8]`).
        let bytes = format!("{:?}", b"hmac-secret-planted");
        assert!(!shown.contains(bytes.trim_end_matches(']')), "{shown}");
        // The same secrets with a syntax error next to them: the error names no value.
        let broken = std::fs::read_to_string(&path)
            .unwrap()
            .replace("\"api-token-planted-0123\"", "\"api-token-planted-0123\" x");
        std::fs::write(&path, broken).unwrap();
        let err = load(&path).unwrap_err().to_string();
        assert!(err.contains("line 12, column 34, key `api.token`"), "{err}");
        assert!(!err.contains("planted"), "{err}");
    }

    #[test]
    fn credentials_in_the_upstream_url_are_refused_unquoted() {
        let text = format!(
            "{MINIMAL}\n[upstream]\nurl = \"mqtt://u:pw-in-url@127.0.0.1:x\"\nclient_id = \"c\"\ntopic_prefix = \"p\"\n"
        );
        let c = Config::parse(&text).unwrap();
        let problems = c.check();
        assert_eq!(problems[0].key, "upstream.url");
        assert!(!problems[0].message.contains("pw-in-url"), "{problems:?}");
    }

    #[test]
    fn upstream_urls_with_ipv6_literals_and_default_ports() {
        let up = |url: &str| {
            let text = format!(
                "{MINIMAL}\n[upstream]\nurl = \"{url}\"\nclient_id = \"c\"\ntopic_prefix = \"p\"\n"
            );
            Config::parse(&text).unwrap().upstream.unwrap().addr()
        };
        let a = |host: &str, port, tls| UpstreamAddr {
            host: host.into(),
            port,
            tls,
        };
        assert_eq!(up("mqtts://[fd00::1]"), Ok(a("fd00::1", 8883, true)));
        assert_eq!(up("mqtt://[::1]:1884/"), Ok(a("::1", 1884, false)));
        assert_eq!(
            up("mqtt://central.example"),
            Ok(a("central.example", 1883, false))
        );
        assert_eq!(up("mqtts://10.0.0.2:9000"), Ok(a("10.0.0.2", 9000, true)));
        assert!(up("http://central.example").is_err());
        assert!(up("mqtt://central.example/topic").is_err());
        assert!(up("mqtt://[fd00::1").is_err());
        assert!(up("mqtt://h:0").is_err());
    }

    #[test]
    fn mqtt_3_1_1_upstream_is_allowed_with_a_warning() {
        let text = |proto: &str| {
            format!(
                "{MINIMAL}\n[upstream]\nurl = \"mqtt://h\"\nclient_id = \"c\"\ntopic_prefix = \"p\"\n{proto}"
            )
        };
        let c = Config::parse(&text("")).unwrap();
        assert_eq!(c.upstream.as_ref().unwrap().protocol, Protocol::V5);
        assert!(c.warnings().is_empty());
        let c = Config::parse(&text("protocol = \"3.1.1\"\n")).unwrap();
        assert!(c.check().is_empty());
        assert_eq!(c.warnings()[0].key, "upstream.protocol");
        assert!(Config::parse(&text("protocol = \"4\"\n")).is_err());
    }

    #[test]
    fn passwords_plain_and_argon2() {
        let plain = Password::parse("change-me").unwrap();
        assert!(plain.verify(b"change-me"));
        assert!(!plain.verify(b"change-mE"));
        let hashed = Password::parse(&Password::hash("s3cret")).unwrap();
        assert!(matches!(hashed, Password::Argon2(_)));
        assert!(hashed.verify(b"s3cret"));
        assert!(!hashed.verify(b"s3cre"));
        assert!(Password::parse("$argon2id$garbage").is_err());
        assert_eq!(format!("{plain:?}"), "Password::Plain(<redacted>)");
    }
}
