//! The demo's central system, in-process: a second rumqttd on a free loopback port as the
//! central broker (MQTT 3.1.1), and a subscriber to everything under the branch's topic
//! prefix that counts what central receives. `branch-gateway demo` points the gateway's
//! `[upstream]` at it, so the demo shows forwarding end to end without anything else
//! installed.

use std::net::{SocketAddr, TcpListener};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

/// The demo's central broker and what it has received.
pub struct Central {
    pub addr: SocketAddr,
    /// Messages received under the topic prefix (any topic).
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
        v4: Some(servers),
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
    let mut o = rumqttc::MqttOptions::new("demo-central-consumer", "127.0.0.1", port);
    o.set_keep_alive(Duration::from_secs(30));
    o.set_max_packet_size(1 << 20, 1 << 20);
    let (client, mut events) = rumqttc::AsyncClient::new(o, 64);
    let filter = format!("{topic_prefix}/#");
    let count = received.clone();
    tokio::spawn(async move {
        loop {
            let ev = tokio::select! {
                _ = shutdown.cancelled() => return,
                ev = events.poll() => ev,
            };
            match ev {
                Ok(rumqttc::Event::Incoming(rumqttc::Packet::ConnAck(_))) => {
                    let _ = client.subscribe(&filter, rumqttc::QoS::AtLeastOnce).await;
                }
                Ok(rumqttc::Event::Incoming(rumqttc::Packet::Publish(_))) => {
                    count.fetch_add(1, Ordering::Relaxed);
                }
                Ok(_) => {}
                Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
            }
        }
    });
    Ok(Central { addr, received })
}
