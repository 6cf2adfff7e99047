//! The demo's central system, in-process: a second rumqttd on a free loopback port as the
//! central broker (MQTT 5), and a client of it playing central: it counts everything it
//! receives under the branch's topic prefix and publishes a branch notice (retained).
//! `branch-gateway demo` points the gateway's `[upstream]` at it, so the demo shows
//! forwarding, central's PUBACKs and a notice end to end without anything else installed.

use std::net::{SocketAddr, TcpListener};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

/// The branch notice the demo's central publishes (shown on the lobby page).
pub const NOTICE: &str =
    "三楼阅览室今晚 20:00 关闭 · The reading room on floor 3 closes at 20:00 tonight";

/// The demo's central broker and what it has received.
pub struct Central {
    pub addr: SocketAddr,
    /// Messages received under the topic prefix (any topic but its own notice's).
    pub received: Arc<AtomicU64>,
}

impl Central {
    pub fn received(&self) -> u64 {
        self.received.load(Ordering::Relaxed)
    }
}

/// Start the broker (its router and listener run on their own threads for the life of
/// the process: rumqttd has no stop) and the counting subscriber (until `shutdown`).
pub async fn start(topic_prefix: &str, shutdown: CancellationToken) -> std::io::Result<Central> {
    let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    let mut servers = std::collections::HashMap::new();
    servers.insert(
        "central".to_owned(),
        rumqttd::ServerSettings {
            name: "central".into(),
            listen: addr,
            tls: None,
            next_connection_delay_ms: 0,
            connections: rumqttd::ConnectionSettings {
                connection_timeout_ms: 10_000,
                max_payload_size: 1 << 20,
                max_inflight_count: 500,
                auth: None,
                external_auth: None,
                dynamic_filters: true,
            },
        },
    );
    let config = rumqttd::Config {
        id: 0,
        router: rumqttd::RouterConfig {
            max_connections: 16,
            max_outgoing_packet_count: 200,
            // Bounded: at most 4 x 8 MiB of messages kept per filter.
            max_segment_size: 8 * 1024 * 1024,
            max_segment_count: 4,
            custom_segment: None,
            initialized_filters: None,
            shared_subscriptions_strategy: Default::default(),
        },
        v5: Some(servers),
        ..Default::default()
    };
    std::thread::Builder::new()
        .name("demo-central".into())
        .spawn(move || {
            let mut broker = rumqttd::Broker::new(config);
            let _ = broker.start();
        })?;
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(addr).is_err() {
        if Instant::now() > deadline {
            return Err(std::io::Error::other(
                "the demo's central broker did not start",
            ));
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let received = Arc::new(AtomicU64::new(0));
    use rumqttc::v5::{mqttbytes::v5::Packet, mqttbytes::QoS, AsyncClient, Event, MqttOptions};
    let mut o = MqttOptions::new("demo-central-consumer", "127.0.0.1", port);
    o.set_keep_alive(Duration::from_secs(30));
    o.set_max_packet_size(Some(1 << 20));
    let (client, mut events) = AsyncClient::new(o, 64);
    let filter = format!("{topic_prefix}/#");
    let notices = format!("{topic_prefix}/branch/notices");
    let expires = jiff::Timestamp::now() + jiff::SignedDuration::from_hours(8);
    let notice = serde_json::json!({
        "text": NOTICE,
        "level": "info",
        "expires_at": expires.to_string(),
    })
    .to_string();
    let count = received.clone();
    tokio::spawn(async move {
        loop {
            let ev = tokio::select! {
                _ = shutdown.cancelled() => return,
                ev = events.poll() => ev,
            };
            match ev {
                Ok(Event::Incoming(Packet::ConnAck(_))) => {
                    let _ = client.subscribe(&filter, QoS::AtLeastOnce).await;
                    // A branch notice as central publishes one: retained, so the gateway
                    // gets it whenever its subscription starts.
                    let _ = client
                        .publish(&notices, QoS::AtLeastOnce, true, notice.clone())
                        .await;
                }
                Ok(Event::Incoming(Packet::Publish(p))) if p.topic != notices.as_bytes() => {
                    count.fetch_add(1, Ordering::Relaxed);
                }
                Ok(_) => {}
                Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
            }
        }
    });
    Ok(Central { addr, received })
}
