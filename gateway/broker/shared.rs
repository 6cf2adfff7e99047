//! State every device connection shares: the device table, intake, logins, the open
//! connections, the router's filters, counters, and what a refusal reports.

use std::collections::{HashMap, HashSet};
use std::net::IpAddr;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};

use tokio_util::sync::CancellationToken;

use super::auth::{Auth, AuthSettings};
use super::presence::PresenceBoard;
use super::registry::{CloseReason, Limits, Registry};
use super::BrokerSettings;
use crate::burst::BurstLimiter;
use crate::config::SharedDevices;
use crate::model::{now_ms, DeviceId, PublishSink};

/// Refusals counted per device (`None`: no configured device) and reason until the app
/// takes them. Bounded: only configured devices' names are ever keys.
#[derive(Debug, Default)]
pub struct DenialBoard {
    counts: Mutex<HashMap<(Option<DeviceId>, Denial), u64>>,
    /// Woken on every refusal.
    pub changed: tokio::sync::Notify,
}

impl DenialBoard {
    fn add(&self, device: Option<&str>, what: Denial) {
        *lock(&self.counts)
            .entry((device.map(str::to_owned), what))
            .or_default() += 1;
        self.changed.notify_one();
    }

    /// Everything counted since the last call.
    pub fn take(&self) -> Vec<(Option<DeviceId>, Denial, u64)> {
        lock(&self.counts)
            .drain()
            .map(|((d, w), n)| (d, w, n))
            .collect()
    }
}

/// Every refusal the broker counts. `connect_*` refuse a connection, `*_denied` a packet;
/// the rest close a connection that broke the protocol or its limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Denial {
    /// CONNECT without user name or password.
    NoCredentials,
    /// CONNECT with a user name that is no configured device (the name is never logged).
    UnknownDevice,
    BadPassword,
    /// A login while the device or the address waits out failed attempts.
    Throttled,
    /// No turn for a password check before the connect deadline.
    LoginBusy,
    /// A last will for another device's topic.
    Will,
    /// The device has its `max_connections_per_device` open.
    DeviceLimit,
    /// A new persistent client id past `max_sessions_per_device`.
    SessionLimit,
    /// An empty client id with a persistent session, or one too long or with `+#/$`.
    ClientId,
    /// A reload removed or changed the device while its login was being checked.
    Revoked,
    /// Not MQTT 3.1.1 or 5, or a CONNECT that breaks the protocol (reserved flag set).
    ConnectRefused,
    /// No complete CONNECT within `connect_timeout_ms`.
    ConnectTimeout,
    /// `max_connections` reached: closed at accept.
    ConnectionsFull,
    /// `max_pending_per_address` connections of one address are not logged in yet.
    AddressLimit,
    /// Not logged in yet, and closed to make room for a newer connection.
    Evicted,
    /// A message for the device larger than its MQTT 5 Maximum Packet Size: not sent.
    DeliveryTooLarge,
    Publish,
    Subscribe,
    /// A filter MQTT does not allow (`a#`, `a+/b`) or over `max_filter_bytes`.
    SubscribeInvalid,
    /// Over `max_subscriptions` on a connection or `max_filters` in the router.
    SubscribeQuota,
    /// A packet over the broker's size limit.
    Oversized,
    /// Bytes that are not MQTT.
    Malformed,
    /// A packet no client may send, out of order, or breaking a rule of the protocol.
    ProtocolError,
    /// A started packet not completed within `packet_timeout_ms`.
    PacketTimeout,
    /// Nothing received for 1.5 times the keep-alive.
    KeepAlive,
    /// Packets to the device not taken within `write_timeout_ms`.
    WriteTimeout,
    /// Not a refusal: a QoS 1 resend (DUP=1) of a message already stored from the same
    /// session, acknowledged without a second row.
    DuplicateResend,
}

impl Denial {
    pub fn as_str(self) -> &'static str {
        match self {
            Denial::NoCredentials => "connect_no_credentials",
            Denial::UnknownDevice => "connect_unknown_device",
            Denial::BadPassword => "connect_bad_password",
            Denial::Throttled => "connect_throttled",
            Denial::LoginBusy => "connect_login_busy",
            Denial::Will => "connect_will_denied",
            Denial::DeviceLimit => "connect_device_limit",
            Denial::SessionLimit => "connect_session_limit",
            Denial::ClientId => "connect_client_id_invalid",
            Denial::Revoked => "connect_revoked",
            Denial::ConnectRefused => "connect_protocol_refused",
            Denial::ConnectTimeout => "connect_timeout",
            Denial::ConnectionsFull => "connect_connections_full",
            Denial::AddressLimit => "connect_address_limit",
            Denial::Evicted => "connect_evicted",
            Denial::DeliveryTooLarge => "delivery_too_large",
            Denial::Publish => "publish_denied",
            Denial::Subscribe => "subscribe_denied",
            Denial::SubscribeInvalid => "subscribe_invalid_denied",
            Denial::SubscribeQuota => "subscribe_quota_denied",
            Denial::Oversized => "packet_too_large",
            Denial::Malformed => "malformed_packet",
            Denial::ProtocolError => "protocol_error",
            Denial::PacketTimeout => "packet_timeout",
            Denial::KeepAlive => "keepalive_timeout",
            Denial::WriteTimeout => "write_timeout",
            Denial::DuplicateResend => "duplicate_resend",
        }
    }
}

/// Process-wide counters of the broker (refusals are in [`Shared::refusals`]).
#[derive(Debug, Default)]
pub struct BrokerStats {
    /// Successful logins.
    pub connections: AtomicU64,
    pub takeovers: AtomicU64,
    pub zero_keepalive: AtomicU64,
    pub accept_errors: AtomicU64,
}

pub struct Shared {
    pub devices: SharedDevices,
    pub sink: Arc<dyn PublishSink>,
    pub presence: PresenceBoard,
    pub stats: BrokerStats,
    /// Refusals per device and reason, until the app records them.
    pub denials: DenialBoard,
    pub(crate) settings: BrokerSettings,
    pub(crate) auth: Auth,
    pub(crate) registry: Arc<Registry>,
    /// Cancelled at shutdown: nothing more is acknowledged to any device.
    pub(crate) closing: CancellationToken,
    /// Every device filter ever passed to the router (it keeps each one's log for good;
    /// the one filter denied subscriptions become is not counted).
    /// With how many each device has brought (bounded by the configured devices).
    filters: Mutex<(HashSet<String>, HashMap<DeviceId, usize>)>,
    /// Connections not yet logged in, per source address.
    pending: Mutex<PendingTable>,
    log: Mutex<BurstLimiter<(Option<DeviceId>, Denial)>>,
    /// Where connections report their command links (set once, by the app).
    pub(crate) command_links:
        std::sync::OnceLock<tokio::sync::mpsc::Sender<crate::model::CommandLink>>,
    /// The number the next logged-in connection is known by to the dispatcher.
    pub(crate) next_connection: AtomicU64,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Shared {
    /// Send command link reports (device ready, gone, acknowledged) to `links`.
    pub fn report_command_links(
        &self,
        links: tokio::sync::mpsc::Sender<crate::model::CommandLink>,
    ) {
        let _ = self.command_links.set(links);
    }

    pub fn new(
        settings: BrokerSettings,
        devices: SharedDevices,
        sink: Arc<dyn PublishSink>,
        helpers: tokio::runtime::Handle,
    ) -> Self {
        let auth = Auth::new(
            devices.clone(),
            helpers,
            AuthSettings {
                max_verifications: settings.max_login_verifications,
                failure_delay_ms: settings.login_failure_delay.as_millis() as i64,
                failure_delay_max_ms: settings.login_failure_delay_max.as_millis() as i64,
            },
        );
        let registry = Registry::new(Limits {
            max_per_device: settings.max_connections_per_device,
            max_sessions: settings.max_sessions_per_device,
        });
        Shared {
            devices,
            sink,
            presence: PresenceBoard::default(),
            stats: BrokerStats::default(),
            denials: DenialBoard::default(),
            settings,
            auth,
            registry,
            closing: CancellationToken::new(),
            filters: Mutex::new((HashSet::new(), HashMap::new())),
            pending: Mutex::new(PendingTable::default()),
            command_links: std::sync::OnceLock::new(),
            next_connection: AtomicU64::new(1),
            log: Mutex::new(BurstLimiter::new(10_000, 4096)),
        }
    }

    /// A reload removed these devices or changed their settings: their open connections
    /// close now and must log in again against the new table.
    pub fn revoke(&self, devices: &[DeviceId]) {
        if devices.is_empty() {
            return;
        }
        self.auth.forget(devices);
        self.registry.close_devices(devices, CloseReason::Revoked);
    }

    /// Count and report a refusal; logged once per burst per device and reason. `detail`
    /// must hold nothing a device chose that could be a secret (no user names).
    pub(crate) fn deny(&self, device: Option<&str>, what: Denial, detail: &str) {
        let key = (device.map(str::to_owned), what);
        if let Some(suppressed) = lock(&self.log).hit(&key, now_ms()) {
            if what == Denial::DuplicateResend {
                tracing::info!(
                    device = device.unwrap_or("-"),
                    reason = what.as_str(),
                    suppressed_since_last_report = suppressed,
                    "resent message already stored: acknowledged, not stored again"
                );
            } else {
                tracing::warn!(
                    device = device.unwrap_or("-"),
                    reason = what.as_str(),
                    detail,
                    suppressed_since_last_report = suppressed,
                    "device refused"
                );
            }
        }
        self.denials.add(device, what);
    }

    /// May `device` give the router `filter`? A known filter always; a new one while fewer
    /// than `max_filters` are known and the device has brought fewer than
    /// `max_filters_per_device` (so one device cannot fill the table for the others).
    pub(crate) fn admit_filter(&self, device: &str, filter: &str) -> bool {
        let mut known = lock(&self.filters);
        let (filters, per_device) = &mut *known;
        if filters.contains(filter) {
            return true;
        }
        let brought = per_device.get(device).copied().unwrap_or(0);
        if filters.len() >= self.settings.max_filters
            || brought >= self.settings.max_filters_per_device
        {
            return false;
        }
        filters.insert(filter.to_owned());
        *per_device.entry(device.to_owned()).or_default() += 1;
        true
    }

    /// Hold a place among the connections not logged in yet: `None` when `addr` has
    /// `max_pending_per_address` of them. When all addresses together have half of
    /// `max_connections`, the oldest of them is closed to make room (silent connections
    /// from many addresses cannot keep devices out: a device's CONNECT comes at once).
    pub(crate) fn pending(self: &Arc<Self>, addr: IpAddr) -> Option<Pending> {
        let mut p = lock(&self.pending);
        let n = p.per_address.get(&addr).copied().unwrap_or(0);
        if n >= self.settings.max_pending_per_address {
            return None;
        }
        if p.waiting.len() >= (self.settings.max_connections / 2).max(1) {
            if let Some((_, oldest)) = p.waiting.pop_first() {
                oldest.cancel();
            }
        }
        *p.per_address.entry(addr).or_default() += 1;
        p.next += 1;
        let id = p.next;
        let evicted = CancellationToken::new();
        p.waiting.insert(id, evicted.clone());
        Some(Pending {
            shared: self.clone(),
            addr,
            id,
            evicted,
        })
    }

    /// Close the oldest connection not logged in yet (all places are taken); whether
    /// there was one.
    pub(crate) fn evict_oldest_pending(&self) -> bool {
        let oldest = lock(&self.pending).waiting.pop_first();
        oldest.map(|(_, t)| t.cancel()).is_some()
    }
}

/// The connections not logged in yet: per address, and all of them oldest first.
#[derive(Default)]
struct PendingTable {
    per_address: HashMap<IpAddr, usize>,
    waiting: std::collections::BTreeMap<u64, CancellationToken>,
    next: u64,
}

/// A connection of `addr` that has not logged in yet; dropped at login or close.
pub(crate) struct Pending {
    shared: Arc<Shared>,
    addr: IpAddr,
    id: u64,
    /// Cancelled when the connection is closed to make room for a newer one.
    pub evicted: CancellationToken,
}

impl Drop for Pending {
    fn drop(&mut self) {
        let mut p = lock(&self.shared.pending);
        p.waiting.remove(&self.id);
        if let Some(n) = p.per_address.get_mut(&self.addr) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                p.per_address.remove(&self.addr);
            }
        }
    }
}
