//! The MQTT 5 connection to central: rumqttc's v5 packet codec and state machine
//! (`rumqttc::v5::mqttbytes`, `rumqttc::v5::MqttState`) over a socket of our own.
//!
//! rumqttc 0.25's v5 `EventLoop` keeps its network private and flushes the socket once per
//! request (`poll()`); this glue writes every queued publish before one flush, like the
//! MQTT 3.1.1 glue in `mod.rs`, and reports what delivery needs that 3.1.1 cannot say:
//! the PUBACK reason code of every row and central's limits from CONNACK (Receive
//! Maximum, Maximum Packet Size, Server Keep Alive).

use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use rumqttc::v5::mqttbytes::v5::{
    ConnAck, Connect, ConnectProperties, ConnectReturnCode, LastWill, Login, Packet, PubAckReason,
    Publish,
};
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::{Event, MqttState, Request};
use rumqttc::Outgoing;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;

use super::delivery::Limits;
use super::{Incoming, LinkEvent};

/// What one MQTT 5 connection needs from the config.
#[derive(Clone)]
pub(super) struct V5Options {
    pub host: String,
    pub port: u16,
    pub tls: Option<Arc<rustls::ClientConfig>>,
    pub client_id: String,
    pub keep_alive: Duration,
    pub max_inflight: u16,
    /// The largest packet we take from central (and tell it so).
    pub max_incoming: u32,
    pub login: Option<(String, String)>,
    /// Retained QoS 1 will: (topic, payload).
    pub will: (String, String),
    pub timeout: Duration,
    /// Take commands and notices from central (a persistent session subscribed to them).
    pub central: Option<Central>,
}

/// Where what central sends the gateway goes, and under which prefix it arrives.
#[derive(Clone)]
pub(super) struct Central {
    pub prefix: String,
    pub tx: mpsc::Sender<crate::model::FromCentral>,
}

/// How long central keeps the gateway's session (and the commands for it) while the link
/// is down: as long as a command may live.
const SESSION_EXPIRY_S: u32 = 7 * 24 * 3600;
/// Publishes from central the gateway takes before it has acknowledged them.
const RECEIVE_MAXIMUM: u16 = 64;

trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

struct Conn {
    io: Box<dyn Io>,
    rbuf: BytesMut,
    wbuf: BytesMut,
    max_in: u32,
    max_out: Option<u32>,
}

impl Conn {
    async fn open(o: &V5Options) -> Result<Conn, String> {
        let tcp = tokio::net::TcpStream::connect((o.host.as_str(), o.port))
            .await
            .map_err(|e| format!("I/O: {e}"))?;
        let _ = tcp.set_nodelay(true);
        let io: Box<dyn Io> = match &o.tls {
            None => Box::new(tcp),
            Some(cfg) => {
                let name = rustls::pki_types::ServerName::try_from(o.host.clone())
                    .map_err(|e| format!("TLS: {e}"))?;
                let s = tokio_rustls::TlsConnector::from(cfg.clone())
                    .connect(name, tcp)
                    .await
                    .map_err(|e| format!("TLS: {e}"))?;
                Box::new(s)
            }
        };
        Ok(Conn {
            io,
            rbuf: BytesMut::with_capacity(16 * 1024),
            wbuf: BytesMut::with_capacity(64 * 1024),
            max_in: o.max_incoming,
            max_out: None,
        })
    }

    /// The next whole packet already read, if any.
    fn buffered(&mut self) -> Result<Option<Packet>, String> {
        match Packet::read(&mut self.rbuf, Some(self.max_in)) {
            Ok(p) => Ok(Some(p)),
            Err(rumqttc::v5::mqttbytes::Error::InsufficientBytes(_)) => Ok(None),
            Err(e) => Err(format!("malformed packet from central: {e}")),
        }
    }

    /// Read more bytes (cancel-safe: `read_buf` loses nothing when dropped).
    async fn fill(&mut self) -> Result<(), String> {
        self.rbuf.reserve(8 * 1024);
        match self.io.read_buf(&mut self.rbuf).await {
            Ok(0) => Err("central closed the connection".into()),
            Ok(_) => Ok(()),
            Err(e) => Err(format!("I/O: {e}")),
        }
    }

    /// The next packet, reading as needed.
    async fn next(&mut self) -> Result<Packet, String> {
        loop {
            if let Some(p) = self.buffered()? {
                return Ok(p);
            }
            self.fill().await?;
        }
    }

    fn queue(&mut self, p: &Packet) -> Result<(), String> {
        p.write(&mut self.wbuf, self.max_out)
            .map(|_| ())
            .map_err(|e| format!("cannot encode: {e}"))
    }

    /// Flush within `timeout` (a stalled socket ends the connection, not the task).
    async fn flush_within(&mut self, timeout: Duration) -> Result<bool, String> {
        match tokio::time::timeout(timeout, self.flush()).await {
            Ok(r) => r.map(|()| true),
            Err(_) => Err("flush timed out".into()),
        }
    }

    async fn flush(&mut self) -> Result<(), String> {
        let r = async {
            self.io.write_all(&self.wbuf).await?;
            self.io.flush().await
        }
        .await;
        self.wbuf.clear();
        r.map_err(|e| format!("I/O: {e}"))
    }
}

/// Handle every whole packet in `rbuf` with `state`, queueing its answers in `wbuf`.
/// Central is as hostile as any peer: a malformed packet, or a PUBLISH with a topic alias
/// (we allow none: rumqttc would remember every alias it is sent, each holding its packet,
/// without a bound), ends the connection.
fn take_packets(
    rbuf: &mut BytesMut,
    max_in: u32,
    state: &mut MqttState,
    wbuf: &mut BytesMut,
    max_out: Option<u32>,
) -> Result<(), String> {
    loop {
        let packet = match Packet::read(rbuf, Some(max_in)) {
            Ok(p) => p,
            Err(rumqttc::v5::mqttbytes::Error::InsufficientBytes(_)) => return Ok(()),
            Err(e) => return Err(format!("malformed packet from central: {e}")),
        };
        match &packet {
            Packet::Publish(p)
                if p.properties
                    .as_ref()
                    .is_some_and(|x| x.topic_alias.is_some()) =>
            {
                return Err("central sent a topic alias (none allowed)".into());
            }
            Packet::Connect(..)
            | Packet::Subscribe(_)
            | Packet::Unsubscribe(_)
            | Packet::PingReq(_)
            | Packet::Auth(_) => return Err("central sent a packet only clients send".into()),
            _ => {}
        }
        if let Some(out) = state
            .handle_incoming_packet(packet)
            .map_err(|e| e.to_string())?
        {
            out.write(wbuf, max_out)
                .map_err(|e| format!("cannot encode: {e}"))?;
        }
    }
}

/// The reason code byte of a PUBACK (MQTT 5 table 3-4).
fn reason_code(r: PubAckReason) -> u8 {
    match r {
        PubAckReason::Success => 0x00,
        PubAckReason::NoMatchingSubscribers => 0x10,
        PubAckReason::UnspecifiedError => 0x80,
        PubAckReason::ImplementationSpecificError => 0x83,
        PubAckReason::NotAuthorized => 0x87,
        PubAckReason::TopicNameInvalid => 0x90,
        PubAckReason::PacketIdentifierInUse => 0x91,
        PubAckReason::QuotaExceeded => 0x97,
        PubAckReason::PayloadFormatInvalid => 0x99,
    }
}

fn v5_publish(p: rumqttc::Publish) -> Publish {
    let qos = match p.qos {
        rumqttc::QoS::AtMostOnce => QoS::AtMostOnce,
        rumqttc::QoS::AtLeastOnce => QoS::AtLeastOnce,
        rumqttc::QoS::ExactlyOnce => QoS::ExactlyOnce,
    };
    Publish {
        dup: false,
        qos,
        retain: p.retain,
        topic: p.topic.into_bytes().into(),
        pkid: 0,
        payload: p.payload,
        properties: None,
    }
}

async fn handshake(o: &V5Options) -> Result<(Conn, ConnAck), String> {
    let mut conn = Conn::open(o).await?;
    let mut props = ConnectProperties::new();
    props.max_packet_size = Some(o.max_incoming);
    props.receive_maximum = Some(RECEIVE_MAXIMUM);
    if o.central.is_some() {
        props.session_expiry_interval = Some(SESSION_EXPIRY_S);
    }
    let connect = Connect {
        keep_alive: o.keep_alive.as_secs().min(u16::MAX as u64) as u16,
        client_id: o.client_id.clone(),
        // With commands: a persistent session, so central keeps what it sends while the
        // link is down.
        clean_start: o.central.is_none(),
        properties: Some(props),
    };
    let will = LastWill::new(
        o.will.0.clone(),
        o.will.1.clone().into_bytes(),
        QoS::AtLeastOnce,
        true,
        None,
    );
    let login = o.login.clone().map(|(u, p)| Login::new(u, p));
    conn.queue(&Packet::Connect(connect, Some(will), login))?;
    conn.flush().await?;
    match conn.next().await? {
        Packet::ConnAck(ack) if ack.code == ConnectReturnCode::Success => Ok((conn, ack)),
        Packet::ConnAck(ack) => Err(format!("central refused the connection: {:?}", ack.code)),
        _ => Err("central answered CONNECT with something else than CONNACK".into()),
    }
}

/// Run one MQTT 5 connection until it fails or the forwarder drops it; events are sent
/// tagged with `generation`, as by the 3.1.1 glue.
pub(super) async fn drive(
    o: V5Options,
    incoming: Incoming,
    generation: u64,
    events: mpsc::Sender<(u64, LinkEvent)>,
    delay: Duration,
) {
    tokio::time::sleep(delay).await;
    let lost = |e: String| LinkEvent::Lost {
        error: e,
        collision: false,
    };
    let (mut conn, connack) = match tokio::time::timeout(o.timeout, handshake(&o)).await {
        Ok(Ok(c)) => c,
        Ok(Err(e)) => {
            let _ = events.send((generation, lost(e))).await;
            return;
        }
        Err(_) => {
            let _ = events
                .send((generation, lost("connect timed out".into())))
                .await;
            return;
        }
    };
    let props = connack.properties.as_ref();
    let receive_max = props.and_then(|p| p.receive_max);
    let max_packet = props.and_then(|p| p.max_packet_size);
    let limits = Limits {
        receive_maximum: receive_max,
        maximum_packet_size: max_packet,
    };
    conn.max_out = max_packet;
    let keep_alive = props
        .and_then(|p| p.server_keep_alive)
        .map(|s| Duration::from_secs(s as u64))
        .unwrap_or(o.keep_alive);
    let window = o.max_inflight.min(receive_max.unwrap_or(u16::MAX).max(1));
    // Manual acknowledgements: central's publishes are acknowledged once stored.
    let mut state = MqttState::new(o.max_inflight, true);
    if let Err(e) = state.handle_incoming_packet(Packet::ConnAck(connack)) {
        let _ = events.send((generation, lost(e.to_string()))).await;
        return;
    }
    state.events.clear();
    if let Some(c) = &o.central {
        let filters = [
            format!("{}/commands/devices/+", c.prefix),
            format!("{}/branch/notices", c.prefix),
        ]
        .map(|f| rumqttc::v5::mqttbytes::v5::Filter::new(f, QoS::AtLeastOnce));
        let subscribe = rumqttc::v5::mqttbytes::v5::Subscribe::new_many(filters, None);
        let sent = match state.handle_outgoing_packet(Request::Subscribe(subscribe)) {
            Ok(Some(packet)) => conn.queue(&packet).map(|_| ()),
            Ok(None) => Ok(()),
            Err(e) => Err(e.to_string()),
        };
        if let Err(e) = sent.and(conn.flush_within(o.timeout).await.map(|_| ())) {
            let _ = events.send((generation, lost(e))).await;
            return;
        }
        state.events.clear();
    }
    // Central's publishes waiting for their commit, in arrival order (acknowledged in it).
    let mut unstored: std::collections::VecDeque<(u16, tokio::sync::oneshot::Receiver<()>)> =
        std::collections::VecDeque::new();
    if events
        .send((generation, LinkEvent::Connected(limits)))
        .await
        .is_err()
    {
        return;
    }
    let Incoming {
        queue: mut requests,
        stop,
    } = incoming;
    let mut ping = tokio::time::interval_at(
        tokio::time::Instant::now() + keep_alive,
        keep_alive.max(Duration::from_secs(1)),
    );
    ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let timeout = o.timeout;
    let mut batch: Vec<rumqttc::Request> = Vec::with_capacity(256);
    loop {
        let room = if state.collision.is_some() {
            0
        } else {
            window.saturating_sub(state.inflight()).min(256) as usize
        };
        let result: Result<bool, String> = tokio::select! {
            r = conn.fill() => match r {
                Ok(()) => {
                    let handled = take_packets(&mut conn.rbuf, conn.max_in, &mut state, &mut conn.wbuf, conn.max_out);
                    match handled {
                        Ok(()) if conn.wbuf.is_empty() => Ok(true),
                        Ok(()) => conn.flush_within(timeout).await,
                        Err(e) => Err(e),
                    }
                }
                Err(e) => Err(e),
            },
            n = requests.recv_many(&mut batch, room.max(1)), if room > 0 => {
                if n == 0 {
                    return;
                }
                let mut outcome = Ok(true);
                for request in batch.drain(..) {
                    let rumqttc::Request::Publish(p) = request else { continue };
                    match state.handle_outgoing_packet(Request::Publish(v5_publish(p))) {
                        Ok(Some(packet)) => {
                            if let Err(e) = conn.queue(&packet) {
                                outcome = Err(e);
                                break;
                            }
                        }
                        Ok(None) => {
                            outcome = Err("packet-id collision".into());
                            break;
                        }
                        Err(e) => {
                            outcome = Err(e.to_string());
                            break;
                        }
                    }
                }
                match outcome {
                    Ok(_) => conn.flush_within(timeout).await,
                    Err(e) => Err(e),
                }
            },
            _ = stop.now.cancelled() => {
                let farewell = stop.farewell.lock().ok().and_then(|mut f| f.take());
                if let Some(p) = farewell {
                    if let Ok(Some(packet)) = state.handle_outgoing_packet(Request::Publish(v5_publish(p))) {
                        let _ = conn.queue(&packet);
                    }
                }
                if let Ok(Some(packet)) = state.handle_outgoing_packet(Request::Disconnect) {
                    let _ = conn.queue(&packet);
                }
                let _ = tokio::time::timeout(timeout, conn.flush()).await;
                Ok(false)
            },
            stored = async { (&mut unstored.front_mut().expect("guarded").1).await }, if !unstored.is_empty() => {
                let (pkid, _) = unstored.pop_front().expect("guarded");
                match stored {
                    // Durable: now central may forget it.
                    Ok(()) if pkid != 0 => {
                        let ack = rumqttc::v5::mqttbytes::v5::PubAck::new(pkid, None);
                        match state.handle_outgoing_packet(Request::PubAck(ack)) {
                            Ok(Some(packet)) => match conn.queue(&packet) {
                                Ok(()) => conn.flush_within(timeout).await,
                                Err(e) => Err(e),
                            },
                            Ok(None) => Ok(true),
                            Err(e) => Err(e.to_string()),
                        }
                    }
                    // QoS 0, or the gateway is stopping: no acknowledgement.
                    _ => Ok(true),
                }
            },
            _ = ping.tick(), if !keep_alive.is_zero() => {
                match state.handle_outgoing_packet(Request::PingReq) {
                    Ok(Some(packet)) => match conn.queue(&packet) {
                        Ok(()) => conn.flush_within(timeout).await,
                        Err(e) => Err(e),
                    },
                    Ok(None) => Ok(true),
                    Err(e) => Err(e.to_string()),
                }
            },
        };
        while let Some(ev) = state.events.pop_front() {
            let ev = match ev {
                Event::Incoming(Packet::Publish(p)) => {
                    let Some(c) = &o.central else { continue };
                    let topic = String::from_utf8_lossy(&p.topic);
                    let topic = topic
                        .strip_prefix(c.prefix.as_str())
                        .and_then(|t| t.strip_prefix('/'))
                        .unwrap_or("")
                        .to_owned();
                    let (stored, rx) = tokio::sync::oneshot::channel();
                    let msg = crate::model::FromCentral {
                        topic,
                        payload: p.payload.to_vec(),
                        stored,
                    };
                    // QoS 0 needs no acknowledgement and does not count (the queue's own
                    // bound holds it).
                    let awaiting = unstored.iter().filter(|(pkid, _)| *pkid != 0).count();
                    if p.qos != QoS::AtMostOnce && awaiting >= usize::from(RECEIVE_MAXIMUM) {
                        let e = "central sent more than its Receive Maximum unacknowledged";
                        let _ = events.send((generation, lost(e.into()))).await;
                        return;
                    }
                    if c.tx.send(msg).await.is_err() {
                        let e = "the command dispatcher stopped";
                        let _ = events.send((generation, lost(e.into()))).await;
                        return;
                    }
                    unstored.push_back((if p.qos == QoS::AtMostOnce { 0 } else { p.pkid }, rx));
                    continue;
                }
                Event::Incoming(Packet::SubAck(ack)) => {
                    use rumqttc::v5::mqttbytes::v5::SubscribeReasonCode as Code;
                    let refused = ack
                        .return_codes
                        .iter()
                        .filter(|c| !matches!(c, Code::Success(_)))
                        .count();
                    if refused > 0 {
                        tracing::warn!(refused, codes = ?ack.return_codes, "central refused the gateway's subscription to commands or notices: none will arrive (check central's ACL)");
                    } else {
                        tracing::info!("subscribed at central to commands and branch notices");
                    }
                    continue;
                }
                Event::Outgoing(Outgoing::Publish(pkid)) => LinkEvent::Sent(pkid),
                Event::Incoming(Packet::PubAck(ack)) => LinkEvent::PubAck {
                    pkid: ack.pkid,
                    reason: reason_code(ack.reason),
                },
                _ => continue,
            };
            if events.send((generation, ev)).await.is_err() {
                return;
            }
        }
        match result {
            Ok(true) => {}
            Ok(false) => return,
            Err(e) => {
                let collision = e == "packet-id collision";
                let _ = events
                    .send((
                        generation,
                        LinkEvent::Lost {
                            error: e,
                            collision,
                        },
                    ))
                    .await;
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2048))]
        /// Whatever central sends, parsing and handling it returns (never panics), and the
        /// read buffer never holds more than one packet's worth past the limit.
        #[test]
        fn any_bytes_from_central_are_handled_without_panic(
            head in prop::sample::select(vec![0x20u8, 0x30, 0x32, 0x34, 0x40, 0x50, 0x62, 0x70, 0x90, 0xb0, 0xd0, 0xe0, 0xf0, 0x00]),
            body in prop::collection::vec(any::<u8>(), 0..300),
            split in 0usize..300,
        ) {
            let mut state = MqttState::new(16, false);
            let mut bytes = vec![head];
            bytes.extend_from_slice(&body);
            let mut rbuf = BytesMut::new();
            let mut wbuf = BytesMut::new();
            let split = split.min(bytes.len());
            for part in [&bytes[..split], &bytes[split..]] {
                rbuf.extend_from_slice(part);
                if take_packets(&mut rbuf, 1024, &mut state, &mut wbuf, Some(1024)).is_err() {
                    break;
                }
            }
        }
    }

    #[test]
    fn a_topic_alias_from_central_ends_the_connection() {
        let mut p = Publish::new("a/b", QoS::AtMostOnce, "x", None);
        p.properties = Some(rumqttc::v5::mqttbytes::v5::PublishProperties {
            topic_alias: Some(1),
            ..Default::default()
        });
        let mut rbuf = BytesMut::new();
        Packet::Publish(p).write(&mut rbuf, None).unwrap();
        let mut state = MqttState::new(16, false);
        let mut wbuf = BytesMut::new();
        let e = take_packets(&mut rbuf, 1024, &mut state, &mut wbuf, None).unwrap_err();
        assert!(e.contains("topic alias"), "{e}");
    }
}
