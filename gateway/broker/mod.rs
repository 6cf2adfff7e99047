//! The embedded MQTT broker devices connect to: rumqttd's router, with the device port,
//! its connections and their protocol written here.
//!
//! rumqttd 0.20's own listener and connection driver (`Server`, `RemoteLink`) are not used:
//! they abort the process on packets a client should never send, leak router state and
//! poison a client id for good when a connection drops before its CONNACK, have no limit
//! per device or address and spin when accept fails. Device bytes go through
//! [`frame`] (a first look, before rumqttd's codec), the codec, then [`session`]; the
//! router is reached through in-process links and sees only subscriptions and what it
//! delivers to devices. Device publishes go to intake ([`PublishSink`]) and are
//! acknowledged by the session; last wills are handed to intake the same way.
//!
//! # Layout
//! `listener` (accept, places) -> `connection` (socket, deadlines, router link) ->
//! {`session` (packets after login), `auth` (logins) -> `throttle`, `registry` (open
//! connections, takeover, router ids)} -> {`frame`, `encode`, `acl`} (pure); `shared`
//! holds what they share, `presence` who is online.

mod acl;
mod auth;
mod connection;
mod encode;
pub mod frame;
mod listener;
mod presence;
mod registry;
mod session;
mod shared;
mod throttle;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use rumqttd::local::{LinkRx, LinkTx};
use rumqttd::{Notification, RouterConfig};
use tokio_util::sync::CancellationToken;

use crate::config::SharedDevices;
use crate::model::PublishSink;
pub use presence::PresenceBoard;
#[doc(hidden)]
pub use session::fuzz_device_bytes;
pub use shared::{BrokerStats, Denial, DenialBoard, Shared};

/// A router link: what the router gives a registered connection.
pub(crate) type Link = (LinkTx, LinkRx, Notification);

/// A registration for the registrar thread: the client id, and where to answer.
type Registration = (String, tokio::sync::oneshot::Sender<Result<Link, String>>);

/// Registers connections with the router (always as clean sessions: see `registry`), one
/// at a time, on a thread of its own: rumqttd's registration waits for the router's
/// answer with a blocking receive, which must not hold the connections' runtime. The
/// router's channel type is private to rumqttd, so it lives inside the thread.
#[derive(Clone)]
pub(crate) struct Connector {
    requests: std::sync::mpsc::SyncSender<Registration>,
}

/// Registrations that may wait for the registrar at once (beyond it: "server busy").
const REGISTRATIONS_QUEUED: usize = 256;

impl Connector {
    fn start(
        register: impl Fn(&str) -> Result<Link, String> + Send + 'static,
    ) -> std::io::Result<Connector> {
        let (requests, queue) = std::sync::mpsc::sync_channel::<Registration>(REGISTRATIONS_QUEUED);
        std::thread::Builder::new()
            .name("router-links".into())
            .spawn(move || {
                for (id, reply) in queue {
                    let _ = reply.send(register(&id));
                }
            })?;
        Ok(Connector { requests })
    }

    /// Register `id` with the router.
    pub(crate) async fn register(&self, id: &str, limit: Duration) -> Result<Link, String> {
        let (reply, answer) = tokio::sync::oneshot::channel();
        self.requests
            .try_send((id.to_owned(), reply))
            .map_err(|_| "too many connections registering at once".to_owned())?;
        match tokio::time::timeout(limit, answer).await {
            Ok(Ok(link)) => link,
            Ok(Err(_)) => Err("the router registrar stopped".to_owned()),
            Err(_) => Err(format!(
                "no answer from the router within {} s",
                limit.as_secs()
            )),
        }
    }
}

/// The broker's limits; every field is a `[broker]` key (see the README's table).
#[derive(Debug, Clone)]
pub struct BrokerSettings {
    pub listen: SocketAddr,
    pub listen_backlog: u32,
    pub max_connections: usize,
    pub max_connections_per_device: usize,
    pub max_pending_per_address: usize,
    pub max_sessions_per_device: usize,
    pub connect_timeout: Duration,
    pub packet_timeout: Duration,
    pub write_timeout: Duration,
    /// Largest MQTT packet accepted from a device (payload plus topic and header).
    pub max_packet_bytes: usize,
    pub max_subscriptions: usize,
    pub max_filter_bytes: usize,
    pub max_filters: usize,
    pub max_filters_per_device: usize,
    pub max_login_verifications: usize,
    pub login_failure_delay: Duration,
    pub login_failure_delay_max: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    #[error("broker.listen {addr}: cannot listen: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("broker.listen {addr}: listener stopped: {message}")]
    Listener { addr: SocketAddr, message: String },
    #[error("embedded broker link: {0}")]
    Link(String),
}

/// Threads device connections may hold while their message waits for room in the
/// writer's queue (intake waits in `block_in_place`). Past this, the broker runtime's
/// worker threads wait too, so all device traffic (accepting, pings, other devices'
/// publishes) pauses until the writer frees room; the waits end together.
/// Measured with 200 devices at full speed (drain_bench): a thread per held connection
/// (185 threads) peaked at 65-67 MiB RSS, 16 at 62 MiB, and buffering a million messages
/// took no longer (4.5-4.8 s against 4.9-5.0 s).
pub const CONNECTION_WAIT_THREADS: usize = 16;

/// A running embedded broker. rumqttd's router has no shutdown:
/// [`Broker::close_connections`] stops acknowledging devices and the process exits
/// afterwards.
///
/// Device connections run on the broker's own runtime: a connection held while SQLite
/// catches up blocks a thread, and when all of the runtime's threads are held only device
/// traffic waits; the gateway's own tasks (forwarder, API, shutdown, watchdog) keep running.
pub struct Broker {
    shared: Arc<Shared>,
    stop_accepting: CancellationToken,
    connections: Option<tokio::runtime::Runtime>,
}

impl Drop for Broker {
    /// Dropped inside the gateway's runtime: the broker's runtime must not wait for its
    /// threads there (a held connection returns when intake closes; the process exits).
    fn drop(&mut self) {
        self.stop_accepting.cancel();
        if let Some(runtime) = self.connections.take() {
            runtime.shutdown_background();
        }
    }
}

/// Publishes the gateway's own messages for in-branch clients under `branch/` (screens
/// subscribe read-only: devices may publish only under their own `devices/ID/`).
/// Clones share one router link.
#[derive(Clone)]
pub struct BranchPublisher {
    /// The link, and its receiving half (kept so the router keeps the link).
    link: Arc<tokio::sync::Mutex<(LinkTx, LinkRx)>>,
}

impl BranchPublisher {
    /// Publish `payload` on `topic` (under `branch/`), retained, at QoS 0 (an empty
    /// payload clears the retained message).
    pub async fn publish_retained(&self, topic: &str, payload: Vec<u8>) -> Result<(), BrokerError> {
        let publish = rumqttd::protocol::Publish::new(
            bytes::Bytes::copy_from_slice(topic.as_bytes()),
            bytes::Bytes::from(payload),
            true,
        );
        self.link
            .lock()
            .await
            .0
            .send(rumqttd::protocol::Packet::Publish(publish, None))
            .await
            .map(|_| ())
            .map_err(|e| BrokerError::Link(e.to_string()))
    }
}

/// The topic of the router liveness probe: only in-process links use it (devices may
/// publish under their own `devices/ID/` only, and subscribe to nothing here).
pub const PROBE_TOPIC: &str = "gateway/probe";

/// An in-process link subscribed to [`PROBE_TOPIC`]: a publish that comes back through
/// the router proves the router thread is alive and routing (rumqttd's router can die
/// while the process lives).
pub struct RouterProbe {
    tx: LinkTx,
    rx: LinkRx,
    sent: u64,
}

impl RouterProbe {
    /// Publish a numbered probe and wait for it to come back; `Err` after `timeout`.
    pub async fn round_trip(&mut self, timeout: Duration) -> Result<Duration, BrokerError> {
        self.sent += 1;
        let token = self.sent.to_string();
        let started = tokio::time::Instant::now();
        let publish = rumqttd::protocol::Publish::new(
            bytes::Bytes::from_static(PROBE_TOPIC.as_bytes()),
            bytes::Bytes::from(token.clone()),
            false,
        );
        let wait = async {
            self.tx
                .send(rumqttd::protocol::Packet::Publish(publish, None))
                .await
                .map_err(|e| BrokerError::Link(e.to_string()))?;
            loop {
                match self.rx.next().await {
                    Ok(Some(rumqttd::Notification::Forward(f))) => {
                        if f.publish.payload.as_ref() == token.as_bytes() {
                            return Ok(started.elapsed());
                        }
                    }
                    Ok(Some(rumqttd::Notification::Unschedule)) => self
                        .rx
                        .wake()
                        .await
                        .map_err(|e| BrokerError::Link(e.to_string()))?,
                    Ok(_) => {}
                    Err(e) => return Err(BrokerError::Link(e.to_string())),
                }
            }
        };
        match tokio::time::timeout(timeout, wait).await {
            Ok(r) => r,
            Err(_) => Err(BrokerError::Link(format!(
                "router did not route a probe within {} ms",
                timeout.as_millis()
            ))),
        }
    }
}

impl Broker {
    /// Start the router and the in-process links, then listen for devices.
    pub async fn start(
        settings: BrokerSettings,
        devices: SharedDevices,
        sink: Arc<dyn PublishSink>,
    ) -> Result<(Broker, BranchPublisher, RouterProbe), BrokerError> {
        let bind_error = |source| BrokerError::Bind {
            addr: settings.listen,
            source,
        };
        let listener =
            listener::bind(settings.listen, settings.listen_backlog).map_err(bind_error)?;
        let router = RouterConfig {
            // Device connections (at most `max_connections`, briefly more during a
            // takeover the old connection is slow to leave) and the gateway's links.
            max_connections: settings.max_connections + 64,
            max_outgoing_packet_count: 1024,
            // Every filter (a device's commands, `branch/#`) carries little traffic.
            max_segment_size: 256 * 1024,
            max_segment_count: 2,
            // Unset: with custom segments rumqttd 0.20 matches filters through a
            // byte slice that panics on a filter starting with a non-ASCII character.
            custom_segment: None,
            initialized_filters: None,
            shared_subscriptions_strategy: Default::default(),
        };
        let router_tx = rumqttd::Router::new(0, router).spawn();
        let link = |id: &str| {
            rumqttd::local::LinkBuilder::new(id, router_tx.clone())
                .clean_session(true)
                .build()
                .map_err(|e| BrokerError::Link(e.to_string()))
        };
        let (branch_tx, branch_rx, _) = link("gateway-branch")?;
        let (mut probe_tx, probe_rx, _) = link("gateway-probe")?;
        probe_tx
            .subscribe(PROBE_TOPIC)
            .map_err(|e| BrokerError::Link(e.to_string()))?;
        let connector = Connector::start(move |id: &str| {
            rumqttd::local::LinkBuilder::new(id, router_tx.clone())
                .clean_session(true)
                .build()
                .map_err(|e| e.to_string())
        })
        .map_err(|e| BrokerError::Link(e.to_string()))?;
        // Password checks block for tens of milliseconds: they run on the gateway's
        // runtime, so connections held by a full writer queue never delay them.
        let helpers = tokio::runtime::Handle::current();
        let shared = Arc::new(Shared::new(settings.clone(), devices, sink, helpers));
        let connections = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .thread_name("devices")
            .max_blocking_threads(CONNECTION_WAIT_THREADS)
            .build()
            .map_err(|e| BrokerError::Listener {
                addr: settings.listen,
                message: format!("cannot start the connections' runtime: {e}"),
            })?;
        let stop_accepting = CancellationToken::new();
        let (stop, accept_shared) = (stop_accepting.clone(), shared.clone());
        let addr = settings.listen;
        connections.spawn(async move {
            if let Err(e) = listener::run(listener, accept_shared, connector, stop).await {
                tracing::error!(listen = %addr, error = %e, "device listener stopped");
            }
        });
        Ok((
            Broker {
                shared,
                stop_accepting,
                connections: Some(connections),
            },
            BranchPublisher {
                link: Arc::new(tokio::sync::Mutex::new((branch_tx, branch_rx))),
            },
            RouterProbe {
                tx: probe_tx,
                rx: probe_rx,
                sent: 0,
            },
        ))
    }

    pub fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }

    /// Stop accepting connections and close every open one, so no device gets another
    /// acknowledgement from this process.
    pub fn close_connections(&self) {
        self.stop_accepting.cancel();
        self.shared.closing.cancel();
        self.shared
            .registry
            .close_all(registry::CloseReason::Shutdown);
    }
}

/// Where to probe a listener: its own address, or loopback for a wildcard one.
pub fn probe_addr(listen: SocketAddr) -> SocketAddr {
    match listen {
        SocketAddr::V4(a) if a.ip().is_unspecified() => {
            SocketAddr::from(([127, 0, 0, 1], a.port()))
        }
        SocketAddr::V6(a) if a.ip().is_unspecified() => {
            SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, a.port()))
        }
        other => other,
    }
}
