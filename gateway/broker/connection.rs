//! One device connection: the socket, its deadlines and its router link around a
//! [`Session`]. Thin glue: what a packet means is decided in `session`, `frame`, `auth`
//! and `registry`.
//!
//! Deadlines: the whole CONNECT within `connect_timeout`; once a packet has started, the
//! rest of it within `packet_timeout` (whatever the keep-alive, 0 included); some packet
//! within 1.5 times the keep-alive; everything written to the device within
//! `write_timeout`. The read buffer never holds more than one packet of at most
//! `max_packet_bytes` plus one read, and nothing is read while replies wait to be written.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use rumqttd::local::{LinkRx, LinkTx};
use rumqttd::protocol::{self, v4::V4, v5::V5, Packet, Protocol};
use rumqttd::Notification;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;

use super::auth::Refusal;
use super::encode::{self, code, ConnackProperties, ConnackRefusal};
use super::frame::{self, ConnectError, FrameError, Kind, Peek};
use super::registry::{self, CloseReason, Refused, Ticket};
use super::session::{next_packet, Closing, Env, Next, Session, SessionLimits};
use super::shared::{Denial, Pending, Shared};
use super::Connector;
use crate::model::Capture;
use crate::receipt::{Receipts, WINDOW};

/// Bytes asked of the socket per read.
const READ_CHUNK: usize = 8 * 1024;
/// Replies buffered before they are written out (reading pauses meanwhile).
const WRITE_FLUSH: usize = 64 * 1024;
/// Router notifications handled per wake-up before the socket is looked at again.
const NOTIFICATIONS_PER_TURN: usize = 256;
/// How long a takeover waits for the connection it replaces to finish.
const TAKEOVER_WAIT: Duration = Duration::from_secs(2);
/// How long a refusing CONNACK or a closing DISCONNECT may take to write.
const GOODBYE_WAIT: Duration = Duration::from_secs(1);
/// How long the router may take to register a connection.
const ROUTER_WAIT: Duration = Duration::from_secs(5);
/// Topic aliases a device may set (MQTT 5).
pub(crate) const TOPIC_ALIAS_MAXIMUM: u16 = 16;
/// QoS 2 messages a device may have awaiting PUBREL (MQTT 5: the Receive Maximum).
pub(crate) const RECEIVE_MAXIMUM: u16 = 128;
/// Longest wait honoured for an MQTT 5 will delay.
const MAX_WILL_DELAY: Duration = Duration::from_secs(300);

/// What a session of this connection needs: the gateway's shared parts and the
/// connection's own commit receipts.
struct ConnEnv<'a> {
    shared: &'a Shared,
    receipts: &'a Arc<Receipts>,
}

impl Env for ConnEnv<'_> {
    fn capture(&self, topic: &[u8], payload: &[u8]) -> Capture {
        self.shared
            .sink
            .capture(topic, payload, Some(self.receipts))
    }
    fn deny(&self, device: &str, what: Denial, detail: &str) {
        self.shared.deny(Some(device), what, detail)
    }
    fn admit_filter(&self, device: &str, filter: &str) -> bool {
        self.shared.admit_filter(device, filter)
    }
}

/// Where [`Conn::drain`] stopped.
enum Drained {
    /// No whole packet is left; `started`: part of one has arrived; `took`: at least one
    /// whole packet was handled first.
    Incomplete { started: bool, took: bool },
    /// The replies filled the write buffer: write them, then go on.
    WriteBufferFull,
    /// As many messages as [`WINDOW`] wait for their commit: read nothing more until
    /// some are committed.
    WindowFull,
}

/// A logged-in connection.
struct LoggedIn {
    device: String,
    client_id: String,
    v5: bool,
    keep_alive: Option<Duration>,
    will: Option<(bytes::Bytes, bytes::Bytes, Duration)>,
    ticket: Ticket,
    tx: LinkTx,
    rx: LinkRx,
    session: Session,
    receipts: Arc<Receipts>,
    /// How long a persistent session outlives the connection (`None`: for ever).
    session_expiry: Option<Duration>,
    /// Commands for this connection (one at a time: the dispatcher keeps one in flight).
    commands: tokio::sync::mpsc::Receiver<crate::model::DeviceCommand>,
    commands_tx: tokio::sync::mpsc::Sender<crate::model::DeviceCommand>,
    /// This connection's number for the dispatcher.
    connection: u64,
    /// Whether the dispatcher was told this connection takes commands.
    commands_ready: bool,
}

impl LoggedIn {
    /// Whether the connection must wait for commits before it reads more.
    fn window_full(&self) -> bool {
        self.receipts.uncommitted() >= WINDOW || self.session.unacked() as u64 >= WINDOW
    }

    /// Write the acknowledgements whose messages are committed.
    fn release(&mut self, out: &mut BytesMut) {
        self.session.release(self.receipts.committed(), out);
    }
}

struct Conn {
    shared: Arc<Shared>,
    stream: TcpStream,
    peer: SocketAddr,
    rbuf: BytesMut,
    wbuf: BytesMut,
}

/// Serve one accepted connection to its end. `_place` is its place under
/// `max_connections`, `pending` its place among its address's connections not yet
/// logged in.
pub(crate) async fn serve<P: Send>(
    shared: Arc<Shared>,
    connector: Connector,
    stream: TcpStream,
    peer: SocketAddr,
    pending: Pending,
    _place: P,
) {
    let _ = stream.set_nodelay(true);
    let mut conn = Conn {
        shared,
        stream,
        peer,
        rbuf: BytesMut::with_capacity(1024),
        wbuf: BytesMut::with_capacity(1024),
    };
    if let Some(logged_in) = conn.handshake(pending, &connector).await {
        conn.run(logged_in).await;
    }
}

fn frame_denial(e: FrameError) -> Denial {
    match e {
        FrameError::TooLarge(_) => Denial::Oversized,
        FrameError::Length => Denial::Malformed,
        _ => Denial::ProtocolError,
    }
}

impl Conn {
    /// Read into the buffer until `deadline`; `Err(true)` on timeout, `Err(false)` when
    /// the peer closed or the socket failed.
    async fn read(&mut self, deadline: Option<Instant>) -> Result<(), bool> {
        self.rbuf.reserve(READ_CHUNK);
        let read = self.stream.read_buf(&mut self.rbuf);
        let r = match deadline {
            Some(d) => tokio::time::timeout_at(d, read).await.map_err(|_| true)?,
            None => read.await,
        };
        match r {
            Ok(0) | Err(_) => Err(false),
            Ok(_) => Ok(()),
        }
    }

    /// Whether the peer has already closed, from what has arrived (read without waiting;
    /// anything read is kept for later).
    fn peer_closed(&mut self) -> bool {
        loop {
            self.rbuf.reserve(READ_CHUNK);
            match self.stream.try_read_buf(&mut self.rbuf) {
                Ok(0) => return true,
                Ok(_) if self.rbuf.len() < self.shared.settings.max_packet_bytes * 2 => {}
                Ok(_) => return false,
                Err(e) => return e.kind() != std::io::ErrorKind::WouldBlock,
            }
        }
    }

    async fn flush(&mut self, limit: Duration) -> Result<(), bool> {
        if self.wbuf.is_empty() {
            return Ok(());
        }
        match tokio::time::timeout(limit, self.stream.write_all(&self.wbuf)).await {
            Ok(Ok(())) => {
                self.wbuf.clear();
                Ok(())
            }
            Ok(Err(_)) => Err(false),
            Err(_) => Err(true),
        }
    }

    /// Answer a CONNECT with a refusal and close.
    async fn refuse(&mut self, v5: bool, refusal: ConnackRefusal) {
        self.wbuf.clear();
        encode::connack_refused(&mut self.wbuf, v5, refusal);
        let _ = self.flush(GOODBYE_WAIT).await;
    }

    /// CONNECT, login, the device's place and its router link, CONNACK. `None` when the
    /// connection was refused or ended (already answered and counted).
    async fn handshake(&mut self, pending: Pending, connector: &Connector) -> Option<LoggedIn> {
        let shared = self.shared.clone();
        let settings = &shared.settings;
        let deadline = Instant::now() + settings.connect_timeout;
        let max = settings.max_packet_bytes;
        let header = loop {
            match frame::peek(&self.rbuf, max) {
                Err(e) => {
                    shared.deny(None, frame_denial(e), &e.to_string());
                    return None;
                }
                Ok(Peek::Ready(h)) if h.kind == Kind::Connect => break h,
                Ok(Peek::Ready(_)) => {
                    shared.deny(None, Denial::ProtocolError, "first packet is not CONNECT");
                    return None;
                }
                Ok(Peek::Incomplete { .. }) => {}
            }
            tokio::select! {
                _ = shared.closing.cancelled() => return None,
                _ = pending.evicted.cancelled() => {
                    shared.deny(None, Denial::Evicted, "closed to make room for a newer connection");
                    return None;
                }
                r = self.read(Some(deadline)) => match r {
                    Ok(()) => {}
                    Err(true) => {
                        shared.deny(None, Denial::ConnectTimeout, "");
                        return None;
                    }
                    Err(false) => return None,
                },
            }
        };
        let v5 = match frame::connect_meta(&header, &self.rbuf) {
            Ok(meta) => meta.level == 5,
            Err(e) => {
                shared.deny(None, Denial::ConnectRefused, &e.to_string());
                if let ConnectError::Level(_) = e {
                    self.refuse(false, ConnackRefusal::Version).await;
                }
                return None;
            }
        };
        let decoded = if v5 {
            V5.read_mut(&mut self.rbuf, max)
        } else {
            V4.read_mut(&mut self.rbuf, max)
        };
        let Ok(Packet::Connect(connect, props, will, will_props, login)) = decoded else {
            shared.deny(None, Denial::Malformed, "CONNECT does not parse");
            if v5 {
                self.refuse(true, ConnackRefusal::Malformed).await;
            }
            return None;
        };

        let (username, password) = match &login {
            Some(l) => (Some(l.username.as_str()), l.password.as_str()),
            None => (None, ""),
        };
        // A reload revoking the device while this login is checked refuses it below.
        let revision = username.map_or(0, |u| shared.registry.revision(u));
        let device = match shared
            .auth
            .login(username, password, self.peer.ip(), deadline)
            .await
        {
            Ok(device) => device,
            Err((refusal, hold)) => {
                let (denial, answer, named) = match refusal {
                    Refusal::NoCredentials => {
                        (Denial::NoCredentials, ConnackRefusal::NotAuthorized, false)
                    }
                    Refusal::UnknownDevice => {
                        (Denial::UnknownDevice, ConnackRefusal::BadLogin, false)
                    }
                    Refusal::BadPassword => (Denial::BadPassword, ConnackRefusal::BadLogin, true),
                    Refusal::Throttled => (Denial::Throttled, ConnackRefusal::RateExceeded, true),
                    Refusal::Busy => (Denial::LoginBusy, ConnackRefusal::Busy, true),
                };
                // Only a configured device's name is ever reported; never a user name.
                shared.deny(username.filter(|_| named), denial, "");
                tokio::select! {
                    _ = tokio::time::sleep(hold) => {}
                    _ = shared.closing.cancelled() => return None,
                    _ = pending.evicted.cancelled() => return None,
                }
                self.refuse(v5, answer).await;
                return None;
            }
        };
        // Logged in: no longer one of its address's connections waiting to.
        drop(pending);
        if let Some(w) = &will {
            let allowed = w.topic.len() <= super::session::MAX_TOPIC_BYTES
                && std::str::from_utf8(&w.topic).is_ok_and(|t| super::acl::may_publish(&device, t));
            if !allowed {
                shared.deny(Some(&device), Denial::Will, "will topic not allowed");
                self.refuse(v5, ConnackRefusal::NotAuthorized).await;
                return None;
            }
        }
        if shared.closing.is_cancelled() || self.peer_closed() {
            // A device that has already gone must not take a session over.
            return None;
        }
        // MQTT 5: a session that expires when the connection ends is kept nowhere.
        let expiry = props
            .as_ref()
            .and_then(|p| p.session_expiry_interval)
            .unwrap_or(0);
        let clean = connect.clean_session || (v5 && expiry == 0);
        let opened = match shared
            .registry
            .open(&device, &connect.client_id, clean, revision)
        {
            Ok(o) => o,
            Err(refused) => {
                let (denial, answer, detail) = match refused {
                    Refused::TooManyConnections => (
                        Denial::DeviceLimit,
                        ConnackRefusal::Quota,
                        "max_connections_per_device reached",
                    ),
                    Refused::TooManySessions => (
                        Denial::SessionLimit,
                        ConnackRefusal::Quota,
                        "max_sessions_per_device reached",
                    ),
                    Refused::ClientId => (
                        Denial::ClientId,
                        ConnackRefusal::ClientId,
                        "client id refused",
                    ),
                    Refused::Revoked => (
                        Denial::Revoked,
                        ConnackRefusal::NotAuthorized,
                        "removed or changed by a reload during its login",
                    ),
                };
                shared.deny(Some(&device), denial, detail);
                self.refuse(v5, answer).await;
                return None;
            }
        };
        let ticket = opened.ticket;
        if shared.closing.is_cancelled() {
            // The stop began after the check above: this one was never told to close.
            return None;
        }
        if let Some(previous) = opened.previous {
            shared.stats.takeovers.fetch_add(1, Ordering::Relaxed);
            // The router must see the old connection leave before this one comes. Taken
            // over itself meanwhile (a device reconnecting in a loop), this one gives up.
            tokio::select! {
                done = registry::finished(&previous, TAKEOVER_WAIT) => if !done {
                    tracing::warn!(device = %device, "a taken-over connection is slow to close: refused for now");
                    self.refuse(v5, ConnackRefusal::Unavailable).await;
                    return None;
                },
                _ = ticket.control.closed() => return None,
            }
        }
        // The router only ever holds clean sessions (see `registry`).
        let failed = connector.register(&ticket.router_id, ROUTER_WAIT).await;
        let (tx, rx, _) = match failed {
            Ok(link) => link,
            Err(error) => {
                tracing::error!(device = %device, error, "the broker's router refused a connection");
                self.refuse(v5, ConnackRefusal::Unavailable).await;
                return None;
            }
        };
        let session_present = opened.session_present;
        let connack = ConnackProperties {
            receive_maximum: RECEIVE_MAXIMUM,
            maximum_packet_size: u32::try_from(max).unwrap_or(u32::MAX),
            topic_alias_maximum: TOPIC_ALIAS_MAXIMUM,
            assigned_client_id: (v5 && connect.client_id.is_empty())
                .then(|| ticket.router_id.clone()),
        };
        let (command_tx, command_rx) = tokio::sync::mpsc::channel(2);
        let mut logged_in = LoggedIn {
            session: Session::new(
                &device,
                v5,
                SessionLimits {
                    max_subscriptions: settings.max_subscriptions,
                    max_filter_bytes: settings.max_filter_bytes,
                    receive_maximum: RECEIVE_MAXIMUM,
                    topic_alias_maximum: TOPIC_ALIAS_MAXIMUM,
                    peer_max_packet: props
                        .as_ref()
                        .and_then(|p| p.max_packet_size)
                        .map_or(usize::MAX, |m| m as usize),
                },
            ),
            device,
            client_id: connect.client_id,
            v5,
            keep_alive: (connect.keep_alive > 0)
                .then(|| Duration::from_millis(u64::from(connect.keep_alive) * 1500)),
            // Copies: the packet's bytes are a slice of the read buffer.
            will: will.map(|w| {
                let delay = will_props.and_then(|p| p.delay_interval).unwrap_or(0);
                let delay = Duration::from_secs(u64::from(delay.min(expiry)));
                (
                    bytes::Bytes::copy_from_slice(&w.topic),
                    bytes::Bytes::copy_from_slice(&w.message),
                    delay.min(MAX_WILL_DELAY),
                )
            }),
            ticket,
            tx,
            rx,
            receipts: Receipts::new(),
            session_expiry: (v5 && expiry != u32::MAX)
                .then(|| Duration::from_secs(u64::from(expiry))),
            commands: command_rx,
            commands_tx: command_tx,
            connection: shared.next_connection.fetch_add(1, Ordering::Relaxed),
            commands_ready: false,
        };
        if connect.keep_alive == 0 {
            shared.stats.zero_keepalive.fetch_add(1, Ordering::Relaxed);
        }
        // Online from the moment the CONNACK is decided: the device may act on it as
        // soon as it arrives, and its time online must not start later than that.
        shared.presence.update(&logged_in.device, true);
        encode::connack_ok(&mut self.wbuf, v5, session_present, &connack);
        if self.flush(GOODBYE_WAIT).await.is_err() {
            shared.presence.update(&logged_in.device, false);
            let _ = logged_in.tx.send(disconnect_packet()).await;
            return None;
        }
        shared.stats.connections.fetch_add(1, Ordering::Relaxed);
        // Read only now: a connection taken over has saved its subscriptions.
        if session_present {
            let kept = logged_in.ticket.session_kept();
            if let Some(subscribe) = logged_in.session.restore(kept) {
                let _ = logged_in.tx.send(subscribe).await;
            }
        }
        Some(logged_in)
    }

    /// Decode and handle the whole packets in the read buffer, until it holds none or
    /// the replies fill the write buffer.
    fn drain(
        &mut self,
        li: &mut LoggedIn,
        to_router: &mut Vec<Packet>,
        last_packet: &mut Instant,
    ) -> Result<Drained, Closing> {
        let max = self.shared.settings.max_packet_bytes;
        let mut took = false;
        while self.wbuf.len() < WRITE_FLUSH {
            if li.window_full() {
                return Ok(Drained::WindowFull);
            }
            let (packet, meta) = match next_packet(&mut self.rbuf, li.v5, max)? {
                Next::Incomplete { started } => return Ok(Drained::Incomplete { started, took }),
                Next::Packet(packet, meta) => (packet, meta),
            };
            took = true;
            *last_packet = Instant::now();
            let env = ConnEnv {
                shared: &self.shared,
                receipts: &li.receipts,
            };
            if let Some(p) = li.session.on_device(&env, packet, meta, &mut self.wbuf)? {
                to_router.push(p);
            }
        }
        Ok(Drained::WriteBufferFull)
    }

    /// Handle what the router has for this connection. The link is woken again after an
    /// `Unschedule` only once the whole batch is handled and held no DISCONNECT (a link
    /// the router has dropped must never be woken: rumqttd 0.20 panics on it).
    async fn router_batch(
        &mut self,
        li: &mut LoggedIn,
        first: Result<Option<Notification>, rumqttd::local::LinkError>,
    ) -> Result<(), Closing> {
        let gone = || {
            Closing::violation(
                code::PROTOCOL_ERROR,
                Denial::ProtocolError,
                "closed by the router",
            )
        };
        let mut next = first;
        let mut unscheduled = false;
        for _ in 0..NOTIFICATIONS_PER_TURN {
            match next {
                Ok(Some(Notification::Unschedule)) => unscheduled = true,
                Ok(Some(n)) => {
                    if let Some(packet) = Option::<Packet>::from(n) {
                        let env = ConnEnv {
                            shared: &self.shared,
                            receipts: &li.receipts,
                        };
                        li.session.on_router(&env, packet, &mut self.wbuf)?;
                    }
                }
                Ok(None) => break,
                Err(_) => return Err(gone()),
            }
            next = match li.rx.recv_deadline(std::time::Instant::now()) {
                Err(rumqttd::local::LinkError::RecvTimeout(flume::RecvTimeoutError::Timeout)) => {
                    break
                }
                other => other,
            };
        }
        if unscheduled {
            li.rx.wake().await.map_err(|_| gone())?;
        }
        Ok(())
    }

    async fn run(mut self, mut li: LoggedIn) {
        let shared = self.shared.clone();
        let settings = &shared.settings;
        let mut last_packet = Instant::now();
        let mut started_at: Option<Instant> = None;
        let mut to_router = Vec::new();
        let closing = loop {
            let more = match self.drain(&mut li, &mut to_router, &mut last_packet) {
                Ok(Drained::Incomplete { started, took }) => {
                    // The packet timeout runs from the first byte of the packet now
                    // incomplete, not of one completed since.
                    started_at = match (started, started_at) {
                        (true, Some(t)) if !took => Some(t),
                        (true, _) => Some(Instant::now()),
                        (false, _) => None,
                    };
                    false
                }
                Ok(Drained::WriteBufferFull | Drained::WindowFull) => true,
                Err(c) => break c,
            };
            li.release(&mut self.wbuf);
            report_command_links(&shared, &mut li).await;
            // Still full after what was released: nothing is read until commits advance.
            let window_full = li.window_full();
            // One router event for all of them (its channel is shared by every device).
            if let Some(last) = to_router.pop() {
                li.tx.buffer().extend(to_router.drain(..));
                let _ = li.tx.send(last).await;
            }
            match self.flush(settings.write_timeout).await {
                Ok(()) => {}
                Err(timed_out) => {
                    break Closing {
                        reason: None,
                        denial: timed_out.then_some((Denial::WriteTimeout, "device not reading")),
                        will: true,
                    }
                }
            }
            if more && !window_full {
                // Whole packets may still be buffered: handle them before waiting.
                continue;
            }
            let keep_alive = li.keep_alive.map(|k| last_packet + k);
            let packet = started_at.map(|t| t + settings.packet_timeout);
            let deadline = match (keep_alive, packet) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
            tokio::select! {
                biased;
                reason = li.ticket.control.closed() => {
                    break match reason {
                        CloseReason::Shutdown => Closing::shutdown(),
                        CloseReason::TakenOver => Closing {
                            reason: Some(code::SESSION_TAKEN_OVER),
                            denial: None,
                            will: true,
                        },
                        CloseReason::Revoked => {
                            tracing::info!(
                                device = %li.device,
                                "device removed or changed by a reload: connection closed"
                            );
                            Closing {
                            reason: Some(code::NOT_AUTHORIZED),
                            denial: None,
                            will: false,
                        }
                        }
                    };
                }
                // What is committed meanwhile is acknowledged at the top of the loop.
                _ = li.receipts.advanced() => {}
                r = self.read(deadline), if !window_full => match r {
                    Ok(()) => {}
                    Err(false) => break Closing { reason: None, denial: None, will: true },
                    Err(true) => {
                        let stalled = packet.is_some_and(|p| Some(p) == deadline);
                        break if stalled {
                            Closing::violation(code::KEEP_ALIVE_TIMEOUT, Denial::PacketTimeout, "packet not completed in time")
                        } else {
                            Closing::violation(code::KEEP_ALIVE_TIMEOUT, Denial::KeepAlive, "nothing received within 1.5 x keep-alive")
                        };
                    }
                },
                n = li.rx.next() => {
                    if let Err(c) = self.router_batch(&mut li, n).await {
                        break c;
                    }
                }
                Some(command) = li.commands.recv() => {
                    if let Err(why) = li.session.deliver(&command, &mut self.wbuf) {
                        // Nothing written: the command fails (or expired), the next goes on.
                        if why == "too_large" {
                            shared.deny(Some(&li.device), Denial::DeliveryTooLarge, "command larger than the device's Maximum Packet Size: not sent");
                        }
                        if let Some(links) = shared.command_links.get() {
                            let refused = crate::model::CommandLink::Refused {
                                device: li.device.clone(),
                                connection: li.connection,
                                command_id: command.command_id,
                                why,
                            };
                            let _ = links.send(refused).await;
                        }
                    }
                }
            }
        };
        self.finish(li, closing).await;
    }

    async fn finish(&mut self, mut li: LoggedIn, closing: Closing) {
        let shared = self.shared.clone();
        if let Some(reason) = closing.reason {
            // The gateway closes a connection it can still write to: first acknowledge
            // what commits within the goodbye time (a stop, a takeover), so the device
            // does not send it again.
            let settled = async {
                while li.receipts.uncommitted() > 0 {
                    li.receipts.advanced().await;
                }
            };
            let _ = tokio::time::timeout(GOODBYE_WAIT, settled).await;
            li.release(&mut self.wbuf);
            if li.v5 {
                encode::disconnect(&mut self.wbuf, reason);
            }
            let _ = self.flush(GOODBYE_WAIT).await;
        }
        if let Some((denial, detail)) = closing.denial {
            shared.deny(Some(&li.device), denial, detail);
        }
        ticket_save(&li);
        if li.commands_ready {
            if let Some(links) = shared.command_links.get() {
                let gone = crate::model::CommandLink::Gone {
                    device: li.device.clone(),
                    connection: li.connection,
                };
                let _ = links.send(gone).await;
            }
        }
        let LoggedIn {
            device,
            client_id,
            will,
            ticket,
            mut tx,
            rx,
            ..
        } = li;
        // The router forgets the connection (and keeps a persistent session) before the
        // ticket frees the device's place.
        let _ = tx.send(disconnect_packet()).await;
        drop((tx, rx));
        shared.presence.update(&device, false);
        if let (true, Some((topic, message, delay))) = (closing.will, will) {
            if !shared.closing.is_cancelled() {
                publish_will(shared.clone(), device, client_id, topic, message, delay);
            }
        }
        drop(ticket);
    }
}

/// Tell the dispatcher what changed for commands on this connection: acknowledged
/// commands, and whether it now takes commands (a subscription to them came or went).
async fn report_command_links(shared: &Shared, li: &mut LoggedIn) {
    let Some(links) = shared.command_links.get() else {
        return;
    };
    for (command_id, reason) in li.session.take_acked() {
        let acked = crate::model::CommandLink::Acked {
            device: li.device.clone(),
            connection: li.connection,
            command_id,
            reason,
        };
        let _ = links.send(acked).await;
    }
    let subscribed = li.session.commands_subscribed();
    if subscribed != li.commands_ready {
        li.commands_ready = subscribed;
        let report = if subscribed {
            crate::model::CommandLink::Ready {
                device: li.device.clone(),
                connection: li.connection,
                mailbox: li.commands_tx.clone(),
            }
        } else {
            crate::model::CommandLink::Gone {
                device: li.device.clone(),
                connection: li.connection,
            }
        };
        let _ = links.send(report).await;
    }
}

/// A persistent session keeps its state for the next connection.
fn ticket_save(li: &LoggedIn) {
    let mut kept = li.session.kept(li.receipts.committed());
    kept.expires = li
        .session_expiry
        .and_then(|d| std::time::Instant::now().checked_add(d));
    li.ticket.save_session(kept);
}

fn disconnect_packet() -> Packet {
    Packet::Disconnect(
        protocol::Disconnect {
            reason_code: protocol::DisconnectReasonCode::NormalDisconnection,
        },
        None,
    )
}

/// Hand a device's last will to intake, after its delay unless the same client has
/// connected again meanwhile (a device has at most `max_sessions_per_device` waiting; past
/// that, one is published at once).
fn publish_will(
    shared: Arc<Shared>,
    device: String,
    client_id: String,
    topic: bytes::Bytes,
    message: bytes::Bytes,
    delay: Duration,
) {
    let wait = (!delay.is_zero())
        .then(|| shared.registry.delay_will(&device, &client_id))
        .flatten();
    let Some(cancelled) = wait else {
        shared.sink.capture(&topic, &message, None);
        return;
    };
    tokio::spawn(async move {
        tokio::select! {
            _ = tokio::time::sleep(delay) => {
                shared.sink.capture(&topic, &message, None);
            }
            _ = cancelled.cancelled() => {}
            _ = shared.closing.cancelled() => {}
        }
        shared.registry.will_done(&device, &cancelled);
    });
}
