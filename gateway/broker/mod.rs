//! The embedded MQTT broker devices connect to: rumqttd's router and one listener (MQTT
//! 3.1.1 and 5) on our runtime, wrapped by [`protocol::DeviceProtocol`] for auth, ACLs and
//! capture of device publishes.
//!
//! Device publishes reach intake through the wrapper ([`PublishSink`]), not through the
//! router: rumqttd's router keeps a fixed in-memory ring per subscription and lets a slow
//! in-process subscriber fall behind it, skipping messages it already acknowledged
//! (measured: 200 devices bursting lost messages after ~25,000). Last wills are published
//! by the router itself, so an in-process link subscribed to `devices/+/status` (before
//! the listener accepts anyone) receives them.

pub mod acl;
pub mod protocol;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use rumqttd::local::{LinkRx, LinkTx};
use rumqttd::{ConnectionSettings, RouterConfig, ServerSettings};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::config::SharedDevices;
pub use protocol::{BrokerEvent, BrokerStats, Denial, PresenceBoard, Shared};

use crate::model::PublishSink;

/// The filter the in-process link subscribes to: last wills (`offline`) published by the
/// router when a device drops off.
pub const WILL_FILTER: &str = "devices/+/status";

#[derive(Debug, Clone)]
pub struct BrokerSettings {
    pub listen: SocketAddr,
    pub max_connections: usize,
    pub connect_timeout_ms: u16,
    /// Memory for the wills subscription in the router, in bytes.
    pub will_buffer_bytes: usize,
    /// Largest MQTT packet accepted from a device (payload plus topic and header).
    pub max_packet_bytes: usize,
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

/// A running embedded broker. rumqttd has no shutdown: [`Broker::close_connections`]
/// stops acknowledging devices and the process exits afterwards.
///
/// Device connections run on the broker's own runtime: a connection held while SQLite
/// catches up blocks a thread, and when all of the runtime's threads are held only device
/// traffic waits; the gateway's own tasks (forwarder, API, shutdown, watchdog) keep running.
pub struct Broker {
    shared: Arc<Shared>,
    accept: tokio::task::JoinHandle<()>,
    connections: Option<tokio::runtime::Runtime>,
}

impl Drop for Broker {
    /// Dropped inside the gateway's runtime: the broker's runtime must not wait for its
    /// threads there (a held connection returns when intake closes; the process exits).
    fn drop(&mut self) {
        if let Some(runtime) = self.connections.take() {
            runtime.shutdown_background();
        }
    }
}

/// The in-process subscription to `devices/+/status` that carries last wills.
pub struct WillLink {
    /// Kept so the router keeps the subscription.
    _tx: LinkTx,
    rx: LinkRx,
}

/// Publishes the gateway's own messages for in-branch clients under `branch/` (screens
/// subscribe read-only: devices may publish only under their own `devices/ID/`).
pub struct BranchPublisher {
    tx: LinkTx,
    /// Kept so the router keeps the link.
    _rx: LinkRx,
}

impl BranchPublisher {
    /// Publish `payload` on `topic` (under `branch/`), retained, at QoS 0.
    pub async fn publish_retained(
        &mut self,
        topic: &str,
        payload: Vec<u8>,
    ) -> Result<(), BrokerError> {
        let publish = rumqttd::protocol::Publish::new(
            bytes::Bytes::copy_from_slice(topic.as_bytes()),
            bytes::Bytes::from(payload),
            true,
        );
        self.tx
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

/// After shutdown is requested, keep draining wills until the link is quiet this long...
const DRAIN_QUIET: Duration = Duration::from_millis(300);
/// ... but never longer than this.
const DRAIN_MAX: Duration = Duration::from_secs(5);

impl WillLink {
    /// Hand every last will the router publishes to `sink` until `shutdown`, then drain
    /// what the router already published.
    pub async fn run(mut self, sink: Arc<dyn PublishSink>, shutdown: CancellationToken) {
        loop {
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => break,
                n = self.rx.next() => if !self.handle(&*sink, n).await { return },
            }
        }
        let deadline = tokio::time::Instant::now() + DRAIN_MAX;
        loop {
            tokio::select! {
                _ = tokio::time::sleep(DRAIN_QUIET) => break,
                _ = tokio::time::sleep_until(deadline) => break,
                n = self.rx.next() => if !self.handle(&*sink, n).await { break },
            }
        }
    }

    /// Returns false when the link is gone.
    async fn handle(
        &mut self,
        sink: &dyn PublishSink,
        n: Result<Option<rumqttd::Notification>, rumqttd::local::LinkError>,
    ) -> bool {
        match n {
            Ok(Some(rumqttd::Notification::Forward(f))) => {
                sink.capture(&f.publish.topic, &f.publish.payload);
                true
            }
            // The router paused this link; it must be re-armed or delivery stops.
            Ok(Some(rumqttd::Notification::Unschedule)) => self.rx.wake().await.is_ok(),
            Ok(_) => true,
            Err(e) => {
                tracing::error!(error = %e, "broker link for last wills closed");
                false
            }
        }
    }
}

impl Broker {
    /// Start the router, subscribe intake, then start the listener and wait until it
    /// accepts TCP connections.
    pub async fn start(
        settings: BrokerSettings,
        devices: SharedDevices,
        sink: Arc<dyn PublishSink>,
        events: mpsc::Sender<BrokerEvent>,
    ) -> Result<(Broker, WillLink, BranchPublisher, RouterProbe), BrokerError> {
        // Fail early and clearly if the address is taken (rumqttd would only log it).
        std::net::TcpListener::bind(settings.listen).map_err(|source| BrokerError::Bind {
            addr: settings.listen,
            source,
        })?;

        let segment = |total: usize, count: usize| rumqttd::SegmentConfig {
            max_segment_size: (total / count).max(64 * 1024),
            max_segment_count: count,
        };
        let mut custom = HashMap::new();
        custom.insert(
            WILL_FILTER.to_owned(),
            segment(settings.will_buffer_bytes, 4),
        );
        let router = RouterConfig {
            max_connections: settings.max_connections + 8,
            max_outgoing_packet_count: 1024,
            // Every filter (wills, a device's commands, `branch/#`) carries little traffic.
            max_segment_size: 256 * 1024,
            max_segment_count: 2,
            custom_segment: Some(custom),
            initialized_filters: None,
            shared_subscriptions_strategy: Default::default(),
        };
        let router_tx = rumqttd::Router::new(0, router).spawn();

        let (mut tx, rx, _ack) =
            rumqttd::local::LinkBuilder::new("gateway-intake", router_tx.clone())
                .clean_session(true)
                .build()
                .map_err(|e| BrokerError::Link(e.to_string()))?;
        tx.subscribe(WILL_FILTER)
            .map_err(|e| BrokerError::Link(e.to_string()))?;

        let (branch_tx, branch_rx, _) =
            rumqttd::local::LinkBuilder::new("gateway-branch", router_tx.clone())
                .clean_session(true)
                .build()
                .map_err(|e| BrokerError::Link(e.to_string()))?;
        let (mut probe_tx, probe_rx, _) =
            rumqttd::local::LinkBuilder::new("gateway-probe", router_tx.clone())
                .clean_session(true)
                .build()
                .map_err(|e| BrokerError::Link(e.to_string()))?;
        probe_tx
            .subscribe(PROBE_TOPIC)
            .map_err(|e| BrokerError::Link(e.to_string()))?;
        let shared = Arc::new(Shared::new(devices, sink, events));
        let server_settings = ServerSettings {
            name: "devices".to_owned(),
            listen: settings.listen,
            tls: None,
            next_connection_delay_ms: 0,
            connections: ConnectionSettings {
                connection_timeout_ms: settings.connect_timeout_ms,
                max_payload_size: settings.max_packet_bytes,
                max_inflight_count: 100,
                auth: None,
                external_auth: None,
                dynamic_filters: false,
            },
        };
        let mut server = rumqttd::Server::new(
            server_settings,
            router_tx.clone(),
            protocol::DeviceProtocol::new(shared.clone()),
        );
        let connections = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .thread_name("devices")
            .max_blocking_threads(CONNECTION_WAIT_THREADS)
            .build()
            .map_err(|e| BrokerError::Listener {
                addr: settings.listen,
                message: format!("cannot start the connections' runtime: {e}"),
            })?;
        let (failed_tx, mut failed_rx) = tokio::sync::oneshot::channel();
        let accept = connections.spawn(async move {
            if let Err(e) = server.start(rumqttd::LinkType::Remote).await {
                let _ = failed_tx.send(e.to_string());
            }
        });
        // Owned from here on, so an early return stops the runtime without waiting.
        let broker = Broker {
            shared,
            accept,
            connections: Some(connections),
        };
        let probe = probe_addr(settings.listen);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        loop {
            if let Ok(message) = failed_rx.try_recv() {
                return Err(BrokerError::Listener {
                    addr: settings.listen,
                    message,
                });
            }
            if tokio::net::TcpStream::connect(probe).await.is_ok() {
                break;
            }
            if tokio::time::Instant::now() > deadline {
                return Err(BrokerError::Listener {
                    addr: settings.listen,
                    message: "not accepting connections after 5 s".into(),
                });
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        Ok((
            broker,
            WillLink { _tx: tx, rx },
            BranchPublisher {
                tx: branch_tx,
                _rx: branch_rx,
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

    /// Stop accepting connections and close every open one at its next packet, so no
    /// device gets another acknowledgement from this process.
    pub fn close_connections(&self) {
        self.accept.abort();
        self.shared.closing.store(true, Ordering::SeqCst);
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
