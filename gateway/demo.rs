//! The demo's central system, in-process: a second rumqttd on a free loopback port as the
//! central broker (MQTT 5), and a client of it playing central: it counts everything it
//! receives under the branch's topic prefix and publishes a branch notice (retained).
//! `branch-gateway demo` points the gateway's `[upstream]` at it, so the demo shows
//! forwarding, central's PUBACKs and a notice end to end without anything else installed.
//! Clients reach rumqttd only through a guard that checks every packet they send.

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
    // rumqttd listens on a port of its own; clients reach it only through `guard`.
    let inner = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    let broker_addr: SocketAddr = ([127, 0, 0, 1], inner).into();
    let mut servers = std::collections::HashMap::new();
    servers.insert(
        "central".to_owned(),
        rumqttd::ServerSettings {
            name: "central".into(),
            listen: broker_addr,
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
    while std::net::TcpStream::connect(broker_addr).is_err() {
        if Instant::now() > deadline {
            return Err(std::io::Error::other(
                "the demo's central broker did not start",
            ));
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(guard(listener, broker_addr, shutdown.clone()));
    let received = Arc::new(AtomicU64::new(0));
    use rumqttc::v5::{mqttbytes::v5::Packet, mqttbytes::QoS, AsyncClient, Event, MqttOptions};
    let mut o = MqttOptions::new("demo-central-consumer", "127.0.0.1", addr.port());
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

/// Connections to the central broker at once (its router takes 16).
const MAX_CLIENTS: usize = 16;
/// The largest packet a client may send the central broker (its `max_payload_size`).
const MAX_FRAME: usize = (1 << 20) + 1024;

/// The demo central's front door: rumqttd 0.20's MQTT 5 reader aborts the process on a
/// packet type only servers send, so every packet a client sends is checked by the same
/// first look the gateway's own broker uses ([`crate::broker::frame`]) before rumqttd
/// sees it; a client that sends anything else is cut off. At most [`MAX_CLIENTS`] at once.
async fn guard(listener: tokio::net::TcpListener, broker: SocketAddr, shutdown: CancellationToken) {
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CLIENTS));
    loop {
        let accepted = tokio::select! {
            _ = shutdown.cancelled() => return,
            a = listener.accept() => a,
        };
        let Ok((client, _)) = accepted else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            continue; // dropped: closed at once
        };
        tokio::spawn(async move {
            let _slot = slot;
            if let Ok(server) = tokio::net::TcpStream::connect(broker).await {
                relay(client, server).await;
            }
        });
    }
}

/// Server to client as it comes; client to server one checked packet at a time.
async fn relay(client: tokio::net::TcpStream, server: tokio::net::TcpStream) {
    use crate::broker::frame::{self, Peek};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (mut from_client, mut to_client) = client.into_split();
    let (mut from_server, mut to_server) = server.into_split();
    let down = async {
        let _ = tokio::io::copy(&mut from_server, &mut to_client).await;
    };
    let up = async {
        let mut buf: Vec<u8> = Vec::with_capacity(4096);
        let mut chunk = [0u8; 4096];
        let mut first = true;
        loop {
            match frame::peek(&buf, MAX_FRAME) {
                Ok(Peek::Ready(h)) => {
                    let len = h.frame_len();
                    let ok = if first {
                        h.kind == frame::Kind::Connect
                            && frame::connect_meta(&h, &buf[..len]).is_ok()
                    } else {
                        h.kind != frame::Kind::Connect
                    };
                    if !ok || to_server.write_all(&buf[..len]).await.is_err() {
                        return;
                    }
                    first = false;
                    buf.drain(..len);
                }
                Ok(Peek::Incomplete { .. }) => match from_client.read(&mut chunk).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => buf.extend_from_slice(&chunk[..n]),
                },
                Err(_) => return,
            }
        }
    };
    // Either side ending ends both.
    tokio::select! {
        _ = down => {}
        _ = up => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    static RUMQTTD_PANICS: AtomicUsize = AtomicUsize::new(0);

    /// Packets only a server sends, a CONNECT-less start and garbage never reach rumqttd
    /// (its MQTT 5 reader would panic: `panic = "abort"` ends the demo); the central
    /// broker still takes a proper client afterwards.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn hostile_clients_never_reach_the_central_broker() {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if info
                .location()
                .is_some_and(|l| l.file().contains("rumqttd"))
            {
                RUMQTTD_PANICS.fetch_add(1, Ordering::Relaxed);
            }
            previous(info);
        }));
        let stop = CancellationToken::new();
        let central = start("library/test", stop.clone()).await.unwrap();
        for hostile in [
            &[0x20, 0x02, 0x00, 0x00][..],       // CONNACK
            &[0xb0, 0x03, 0x00, 0x01, 0x00][..], // UNSUBACK
            &[0x90, 0x03, 0x00, 0x01, 0x00][..], // SUBACK
            &[0xd0, 0x00][..],                   // PINGRESP
            &[0xc0, 0x00][..],                   // PINGREQ before CONNECT
            &[0xff, 0xff, 0xff, 0xff, 0xff][..], // garbage
        ] {
            let mut s = tokio::net::TcpStream::connect(central.addr).await.unwrap();
            s.write_all(hostile).await.unwrap();
            let mut buf = [0u8; 16];
            let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
                .await
                .expect("closed within 5 s");
            assert!(
                matches!(n, Ok(0) | Err(_)),
                "{hostile:?} closed without an answer"
            );
        }
        // A real client still gets through, and what it publishes is counted.
        use rumqttc::v5::{mqttbytes::QoS, AsyncClient, Event, MqttOptions};
        let mut o = MqttOptions::new("branch", "127.0.0.1", central.addr.port());
        o.set_keep_alive(Duration::from_secs(30));
        let (client, mut events) = AsyncClient::new(o, 16);
        client
            .publish("library/test/x", QoS::AtLeastOnce, false, "1")
            .await
            .unwrap();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while central.received() == 0 {
            assert!(tokio::time::Instant::now() < deadline, "nothing counted");
            let _: Option<Event> = tokio::time::timeout(Duration::from_millis(50), events.poll())
                .await
                .ok()
                .and_then(Result::ok);
        }
        assert_eq!(RUMQTTD_PANICS.load(Ordering::Relaxed), 0);
        stop.cancel();
    }
}
