//! The forwarder: sends every buffered message to the central MQTT broker at QoS 1, in
//! `seq` order, and marks it delivered only when its PUBACK arrives.
//!
//! rumqttc's `publish()` only queues (and its queue is dropped on a reconnect without a
//! session), so this task owns delivery: it reads undelivered rows from SQLite after a
//! cursor, keeps at most `max_inflight` of them published-but-unacknowledged, maps each
//! PUBACK to its row through rumqttc's `Outgoing::Publish(pkid)` events (emitted in the
//! order publishes were queued), hands acknowledged `seq`s to the writer in batches, and on
//! every (re)connect rewinds the cursor to the oldest undelivered row. The event loop is
//! polled continuously; after an error the task sleeps a jittered, growing delay, and a
//! `CollisionTimeout` (a rumqttc livelock) rebuilds the client.
//!
//! Both protocols report the same [`LinkEvent`]s: MQTT 3.1.1 through rumqttc's event
//! loop (below), MQTT 5 through `link_v5.rs`, which adds PUBACK reason codes and central's
//! CONNACK limits. What a reason code or a lost connection means for a row is decided by
//! the sans-IO `delivery.rs`.

mod delivery;
mod link_v5;

use delivery::{Delivery, Lane, Limits, Offer, Quarantine, LOSSES_TO_QUARANTINE};

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use rand::Rng;
use rumqttc::{
    ConnectionError, Event, EventLoop, MqttOptions, Outgoing, Packet, Publish, QoS, Request,
};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::buffer::{Backlog, BufferStats, LiveRows, Marks, Outbox, Write};
use crate::config::{Protocol, UpstreamSection};
use crate::model::{now_ms, StoredRef};

/// How often acknowledged `seq`s are handed to the writer.
const ACK_FLUSH: Duration = Duration::from_millis(50);
/// How often the backlog is measured (and logged while draining, at most once a minute).
const BACKLOG_EVERY: Duration = Duration::from_secs(5);
const BACKLOG_LOG_EVERY_MS: i64 = 60_000;
/// How often the gateway's health goes upstream (and once after every connect).
const HEALTH_EVERY: Duration = Duration::from_secs(60);

#[derive(Debug, Default)]
pub struct UpstreamStats {
    pub connected: AtomicBool,
    pub connects: AtomicU64,
    pub published: AtomicU64,
    pub acknowledged: AtomicU64,
    pub client_rebuilds: AtomicU64,
    pub backlog: AtomicI64,
    pub oldest_undelivered_ms: AtomicI64,
    pub last_ack_ms: AtomicI64,
    /// Rows quarantined since the start (refused by central; see `delivery.rs`).
    pub quarantined: AtomicU64,
}

pub struct Forwarder {
    pub settings: UpstreamSection,
    pub branch: String,
    pub database: PathBuf,
    /// Largest envelope the forwarder may send (raises rumqttc's 10 KiB default).
    pub max_packet_bytes: usize,
    pub writer: Marks,
    pub buffer: Arc<BufferStats>,
    pub stats: Arc<UpstreamStats>,
    /// Devices connected now (for the health message).
    pub devices_online: Arc<std::sync::atomic::AtomicUsize>,
    /// Set for `mqtts://`: built by [`tls_config`] before the forwarder starts.
    pub tls: Option<Arc<rustls::ClientConfig>>,
    /// Rows as the writer commits them: live traffic without reading SQLite back.
    pub live: mpsc::Receiver<LiveRows>,
    /// Where commands and notices from central go (MQTT 5 only): with it, the connection
    /// keeps a persistent session subscribed to `{prefix}/commands/devices/+` and
    /// `{prefix}/branch/notices`.
    pub from_central: Option<mpsc::Sender<crate::model::FromCentral>>,
}

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("upstream.{key} {path}: {message}")]
    File {
        key: &'static str,
        path: PathBuf,
        message: String,
    },
    #[error("upstream TLS: {0}")]
    Rustls(#[from] rustls::Error),
    #[error("upstream TLS: no usable root certificates on this system (set upstream.ca_file)")]
    NoRoots,
}

/// The TLS client configuration for an `mqtts://` upstream: roots from `ca_file` or the
/// system store, and the client certificate when configured. `None` for `mqtt://`.
/// A certificate the broker presents that these roots do not sign fails the handshake
/// (logged, retried); there is never a fallback to plain TCP.
pub fn tls_config(s: &UpstreamSection) -> Result<Option<Arc<rustls::ClientConfig>>, TlsError> {
    if !s.addr().map(|a| a.tls).unwrap_or(false) {
        return Ok(None);
    }
    // Regular files of at most 1 MiB (`MAX_PEM_BYTES`): a FIFO or `/dev/zero` named here
    // is refused at start instead of blocking it or filling memory.
    let read = |key: &'static str, path: &PathBuf| -> Result<Vec<u8>, TlsError> {
        crate::config::file::read(path, crate::config::file::MAX_PEM_BYTES).map_err(|e| {
            TlsError::File {
                key,
                path: path.clone(),
                message: e.to_string(),
            }
        })
    };
    let roots = match crate::config::file::root_store(s.ca_file.as_deref()) {
        Ok(r) => r,
        Err(message) => match &s.ca_file {
            Some(path) => {
                return Err(TlsError::File {
                    key: "ca_file",
                    path: path.clone(),
                    message,
                })
            }
            None => return Err(TlsError::NoRoots),
        },
    };
    let builder = rustls::ClientConfig::builder().with_root_certificates(roots);
    let config = match (&s.client_cert, &s.client_key) {
        (Some(cert), Some(key)) => {
            let pem = read("client_cert", cert)?;
            let chain = rustls_pemfile::certs(&mut pem.as_slice())
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| TlsError::File {
                    key: "client_cert",
                    path: cert.clone(),
                    message: e.to_string(),
                })?;
            let pem = read("client_key", key)?;
            let key_der = rustls_pemfile::private_key(&mut pem.as_slice())
                .ok()
                .flatten()
                .ok_or_else(|| TlsError::File {
                    key: "client_key",
                    path: key.clone(),
                    message: "holds no PEM private key".into(),
                })?;
            builder.with_client_auth_cert(chain, key_der)?
        }
        _ => builder.with_no_client_auth(),
    };
    Ok(Some(Arc::new(config)))
}

impl Forwarder {
    fn options(&self, started_ms: i64) -> MqttOptions {
        let s = &self.settings;
        // `check()` has validated the URL.
        let addr = s.addr().unwrap_or(crate::config::UpstreamAddr {
            host: "127.0.0.1".into(),
            port: 1883,
            tls: false,
        });
        let mut o = MqttOptions::new(&s.client_id, addr.host, addr.port);
        if let Some(tls) = &self.tls {
            o.set_transport(rumqttc::Transport::tls_with_config(
                rumqttc::TlsConfiguration::Rustls(tls.clone()),
            ));
        }
        o.set_keep_alive(Duration::from_secs(s.keep_alive_s));
        o.set_clean_session(true);
        o.set_inflight(s.max_inflight);
        o.set_max_packet_size(self.max_packet_bytes, self.max_packet_bytes);
        if let (Some(u), p) = (&s.username, &s.password) {
            o.set_credentials(u, p.clone().unwrap_or_default());
        }
        o.set_last_will(rumqttc::LastWill::new(
            self.status_topic(),
            self.status_payload("offline", started_ms),
            QoS::AtLeastOnce,
            true,
        ));
        o
    }

    fn status_topic(&self) -> String {
        format!("{}/gateway/status", self.settings.topic_prefix)
    }

    fn status_payload(&self, state: &str, started_ms: i64) -> String {
        serde_json::json!({
            "state": state,
            "branch": self.branch,
            "version": env!("CARGO_PKG_VERSION"),
            "started_at": crate::model::format_ms(started_ms),
        })
        .to_string()
    }

    /// `{prefix}/gateway/health`: backlog, drops per device and kind and messages refused
    /// for rate limits per device (totals since the database was created), devices online.
    fn health_payload(&self, rows: &HealthRows) -> String {
        let HealthRows {
            drops,
            rate_limited,
            refused,
            incidents,
            quarantined,
            commands,
            sip2,
        } = rows;
        // device -> counter -> count
        let mut taps = serde_json::Map::new();
        for (device, counter, count) in sip2 {
            let entry = taps
                .entry(device.clone())
                .or_insert_with(|| serde_json::json!({}));
            entry[counter] = serde_json::json!(count);
        }
        let commands: serde_json::Map<String, serde_json::Value> = commands
            .iter()
            .map(|(s, n)| (s.as_str().to_owned(), serde_json::json!(n)))
            .collect();
        // reason -> device -> kind -> count
        let mut quarantine = serde_json::Map::new();
        for (device, kind, reason, count) in quarantined {
            let by_device = quarantine
                .entry(reason.clone())
                .or_insert_with(|| serde_json::json!({}));
            if by_device.get(device).is_none() {
                by_device[device] = serde_json::json!({});
            }
            by_device[device][kind] = serde_json::json!(count);
        }
        // reason -> device ("-": no configured device) -> count
        let mut refusals = serde_json::Map::new();
        for (device, reason, count) in refused {
            let who = if device.is_empty() { "-" } else { device };
            let entry = refusals
                .entry(reason.clone())
                .or_insert_with(|| serde_json::json!({}));
            entry[who] = serde_json::json!(count);
        }
        let rate_limited: serde_json::Map<String, serde_json::Value> = rate_limited
            .iter()
            .map(|(device, n)| (device.clone(), serde_json::json!(n)))
            .collect();
        let mut by_device = serde_json::Map::new();
        for (device, kind, count) in drops {
            let entry = by_device
                .entry(device.clone())
                .or_insert_with(|| serde_json::json!({}));
            entry[kind] = serde_json::json!(count);
        }
        serde_json::json!({
            "branch": self.branch,
            "at": crate::model::format_ms(now_ms()),
            "backlog": self.stats.backlog.load(Ordering::Relaxed),
            "oldest_undelivered_at": match self.stats.oldest_undelivered_ms.load(Ordering::Relaxed) {
                0 => serde_json::Value::Null,
                ms => serde_json::json!(crate::model::format_ms(ms)),
            },
            "dropped": by_device,
            "rate_limited": rate_limited,
            "refused": refusals,
            "quarantined": quarantine,
            "commands": commands,
            "sip2": taps,
            "incidents": incidents
                .iter()
                .map(|(at, kind, detail)| serde_json::json!({
                    "at": crate::model::format_ms(*at),
                    "kind": kind,
                    "detail": detail,
                }))
                .collect::<Vec<_>>(),
            "devices_online": self.devices_online.load(Ordering::Relaxed),
        })
        .to_string()
    }

    /// A fresh connection task (MQTT 5 or 3.1.1, as configured) after `delay`, and the
    /// channel the forwarder queues requests on. The channel holds a whole window, so
    /// `try_send` never finds it full.
    fn connect(
        &self,
        started_ms: i64,
        generation: u64,
        events: mpsc::Sender<(u64, LinkEvent)>,
        delay: Duration,
    ) -> (Requests, tokio::task::JoinHandle<()>) {
        let (tx, rx) = mpsc::channel(self.settings.max_inflight as usize + 8);
        let stop = Stop::default();
        let requests = Requests {
            queue: tx,
            stop: stop.clone(),
        };
        let incoming = Incoming { queue: rx, stop };
        let task = match self.settings.protocol {
            Protocol::V311 => {
                let el = EventLoop::new(self.options(started_ms), 8);
                tokio::spawn(drive(el, incoming, generation, events, delay))
            }
            Protocol::V5 => {
                let addr = self.settings.addr().unwrap_or(crate::config::UpstreamAddr {
                    host: "127.0.0.1".into(),
                    port: 1883,
                    tls: false,
                });
                let s = &self.settings;
                let o = link_v5::V5Options {
                    host: addr.host,
                    port: addr.port,
                    tls: self.tls.clone(),
                    client_id: s.client_id.clone(),
                    keep_alive: Duration::from_secs(s.keep_alive_s),
                    max_inflight: s.max_inflight,
                    max_incoming: 64 * 1024,
                    login: s
                        .username
                        .clone()
                        .map(|u| (u, s.password.clone().unwrap_or_default())),
                    will: (
                        self.status_topic(),
                        self.status_payload("offline", started_ms),
                    ),
                    timeout: Duration::from_secs(5),
                    central: self.from_central.clone().map(|tx| link_v5::Central {
                        prefix: s.topic_prefix.clone(),
                        tx,
                    }),
                };
                tokio::spawn(link_v5::drive(o, incoming, generation, events, delay))
            }
        };
        (requests, task)
    }

    /// Run until `shutdown`; then wait briefly for acknowledgements in flight and hand them
    /// to the writer.
    pub async fn run(mut self, shutdown: CancellationToken) {
        let started_ms = now_ms();
        let window = self.settings.max_inflight as usize;
        let (events_tx, mut events) = mpsc::channel(window + 64);
        // Each connection attempt gets a fresh client (generation): rumqttc would otherwise
        // send requests still in its channel on the next connection, ahead of the rewind,
        // and its PUBACKs would be mapped to the wrong rows.
        let mut generation = 0u64;
        let (mut client, mut driver) =
            self.connect(started_ms, generation, events_tx.clone(), Duration::ZERO);
        let mut outbox = match tokio::task::block_in_place(|| Outbox::open(&self.database)) {
            Ok(o) => Some(o),
            Err(e) => {
                tracing::error!(error = %e, "forwarder cannot read the buffer; not forwarding");
                return;
            }
        };
        let mut delivery = Delivery::new(window);
        // Live rows may be taken from the writer's hand-over only while the live cursor
        // follows it; otherwise they are read from the database.
        let mut caught_up = false;
        let backfill_interval = self
            .settings
            .max_backfill_rate
            .map(|r| Duration::from_secs_f64(1.0 / r as f64));
        let mut backfill_resume = tokio::time::Instant::now();
        let mut failures: u32 = 0;
        let mut ack_tick = tokio::time::interval(ACK_FLUSH);
        let mut backlog_tick = tokio::time::interval(BACKLOG_EVERY);
        let mut health_tick = tokio::time::interval(HEALTH_EVERY);
        let mut health_due = false;
        let mut last_backlog_log = now_ms() - BACKLOG_LOG_EVERY_MS;
        let mut acked_at_log = 0u64;
        // The oldest undelivered row at the last backlog check (a row behind the cursor
        // twice in a row, not in flight, is read again).
        let mut oldest_seen: Option<i64> = None;
        let mut refusals = crate::burst::BurstLimiter::new(60_000, 8);
        let addr = self.settings.url.clone();
        let live_prefix: Arc<str> = self.settings.topic_prefix.as_str().into();
        let backfill_prefix: Arc<str> = format!("{}/backfill", self.settings.topic_prefix).into();
        let branch: Arc<str> = self.branch.as_str().into();

        loop {
            // Refill once half the window is free: one read of many rows, not a read per
            // acknowledgement; a suspect row is sent alone as soon as possible.
            let room = delivery.probe_due().is_some()
                || (delivery.room() > 0 && delivery.in_flight() <= delivery.window() / 2);
            let backfill_due = delivery.backfill_range().is_some();
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => break,
                // Handle every event already queued before looking at anything else: one
                // wake-up per burst of acknowledgements, not one per packet.
                Some(first) = events.recv() => {
                    let mut next = Some(first);
                    let mut handled = 0;
                    while let Some((gen, ev)) = next.take() {
                        match ev {
                            _ if gen != generation => {}
                            LinkEvent::Connected(limits) => {
                                failures = 0;
                                caught_up = false;
                                // Outcomes first: the rewind must read them back as done.
                                self.flush_outcomes(&mut delivery).await;
                                delivery.on_connack(
                                    limits,
                                    self.buffer.last_seq.load(Ordering::Relaxed) as i64,
                                );
                                self.stats.connected.store(true, Ordering::Relaxed);
                                self.stats.connects.fetch_add(1, Ordering::Relaxed);
                                tracing::info!(url = %addr, "connected to the central broker; re-sending everything unacknowledged");
                                if client
                                    .try_publish(self.status_topic(), QoS::AtLeastOnce, true, self.status_payload("online", started_ms))
                                    .is_ok()
                                {
                                    delivery.own_sent();
                                }
                                health_due = true;
                            }
                            LinkEvent::Sent(pkid) => delivery.on_publish_sent(pkid),
                            LinkEvent::PubAck { pkid, reason } => {
                                if let Some((seq, outcome)) = delivery.on_puback(pkid, reason) {
                                    if let Some(q) = outcome {
                                        if let Some(suppressed) = refusals.hit(&q.name(), now_ms()) {
                                            tracing::error!(
                                                seq,
                                                reason = q.name(),
                                                code = reason,
                                                suppressed_since_last_report = suppressed,
                                                "central refused this row: quarantined (branch-gateway quarantine list)"
                                            );
                                        }
                                    }
                                    self.count_outcome(outcome);
                                }
                                if delivery.pending_outcomes() >= window {
                                    self.flush_outcomes(&mut delivery).await;
                                }
                            }
                            LinkEvent::Lost { error: e, collision } => {
                                let was_connected = delivery.connected();
                                if was_connected {
                                    tracing::warn!(url = %addr, error = %e, "lost the central broker");
                                } else if failures == 0 || failures.is_power_of_two() {
                                    tracing::warn!(url = %addr, error = %e, attempts = failures + 1, "cannot reach the central broker");
                                }
                                if let Some(seq) = delivery.on_connection_lost(was_connected) {
                                    self.count_outcome(Some(Quarantine::RefusedByCentral));
                                    if let Some(suppressed) = refusals.hit(&"refused_by_central", now_ms()) {
                                        tracing::error!(
                                            seq,
                                            losses = LOSSES_TO_QUARANTINE,
                                            suppressed_since_last_report = suppressed,
                                            "central dropped the connection each time this row was the oldest unacknowledged: quarantined as refused_by_central (branch-gateway quarantine list)"
                                        );
                                    }
                                }
                                self.stats.connected.store(false, Ordering::Relaxed);
                                if collision {
                                    // The livelock of rumqtt#1014; a fresh client (below) ends it.
                                    tracing::warn!("upstream packet-id collision timeout: client rebuilt");
                                }
                                failures = failures.saturating_add(1);
                                driver.abort();
                                generation += 1;
                                self.stats.client_rebuilds.fetch_add(1, Ordering::Relaxed);
                                let delay = backoff(failures, self.settings.reconnect_max_ms);
                                (client, driver) = self.connect(started_ms, generation, events_tx.clone(), delay);
                            }
                        }
                        handled += 1;
                        if handled < 1024 {
                            next = events.try_recv().ok();
                        }
                    }
                }
                // Rows the writer just committed. A batch that does not follow the cursor
                // means one was missed (channel full): read the database instead. Rows
                // the cursor already passed (backlog, or read from the database) are skipped.
                // Offline, they are dropped here: they wait in SQLite, not in memory.
                Some(batch) = self.live.recv(), if !delivery.connected() || (room && caught_up) => {
                    if !delivery.connected() {
                        continue;
                    }
                    if batch.after > delivery.live_cursor() {
                        caught_up = false;
                        continue;
                    }
                    for row in &batch.rows {
                        let r = row.as_ref();
                        let topic = r.topic(&self.settings.topic_prefix);
                        let envelope = r.envelope(&self.branch);
                        match delivery.offer(Lane::Live, row.seq, packet_bytes(&topic, &envelope)) {
                            Offer::Send => {
                                if !self.publish_ready(&client, topic, envelope) {
                                    caught_up = false;
                                    break;
                                }
                            }
                            Offer::Passed => {}
                            Offer::Quarantined(q) => self.count_outcome(Some(q)),
                            Offer::Later => {
                                caught_up = false;
                                break;
                            }
                        }
                    }
                }
                // A commit whose rows could not be handed over.
                _ = self.buffer.committed.notified(), if room && caught_up => {
                    caught_up = false;
                }
                _ = tokio::time::sleep_until(backfill_resume), if room && backfill_due && backfill_resume > tokio::time::Instant::now() => {}
                // The reads run in the handler, never as a raced future: a cancelled read
                // would lose the outbox connection it borrowed.
                _ = std::future::ready(()), if room && (!caught_up || delivery.probe_due().is_some() || (backfill_due && backfill_resume <= tokio::time::Instant::now())) => {
                    // A suspect row first, alone (on the lane it went out on).
                    if let Some((seq, lane)) = delivery.probe_due() {
                        let prefix = match lane {
                            Lane::Live => live_prefix.clone(),
                            Lane::Backfill => backfill_prefix.clone(),
                        };
                        let rows = match fetch(&mut outbox, seq - 1, seq, 1, prefix, branch.clone()).await {
                            Ok(r) => r,
                            Err(e) => {
                                tracing::error!(error = %e, "cannot read the buffer");
                                tokio::time::sleep(Duration::from_secs(1)).await;
                                continue;
                            }
                        };
                        match rows.into_iter().next() {
                            Some(row) if row.seq == seq => {
                                let bytes = packet_bytes(&row.topic, &row.envelope);
                                match delivery.offer(lane, seq, bytes) {
                                    Offer::Send => {
                                        tracing::info!(seq, "re-sending alone the row central dropped the connection at");
                                        self.publish_ready(&client, row.topic, row.envelope);
                                    }
                                    Offer::Quarantined(q) => self.count_outcome(Some(q)),
                                    Offer::Later | Offer::Passed => {}
                                }
                            }
                            // Delivered meanwhile, or dropped by the disk cap.
                            _ => delivery.forget_suspect(seq),
                        }
                        continue;
                    }
                    // Live rows first.
                    let limit = delivery.room();
                    let live = match fetch(&mut outbox, delivery.live_cursor(), i64::MAX, limit, live_prefix.clone(), branch.clone()).await {
                        Ok(r) => r,
                        Err(e) => {
                            tracing::error!(error = %e, "cannot read the buffer");
                            tokio::time::sleep(Duration::from_secs(1)).await;
                            continue;
                        }
                    };
                    caught_up = live.len() < limit;
                    for row in live {
                        match delivery.offer(Lane::Live, row.seq, packet_bytes(&row.topic, &row.envelope)) {
                            Offer::Send => {
                                if !self.publish_ready(&client, row.topic, row.envelope) {
                                    break;
                                }
                            }
                            Offer::Passed => {}
                            Offer::Quarantined(q) => self.count_outcome(Some(q)),
                            Offer::Later => {
                                caught_up = false;
                                break;
                            }
                        }
                    }
                    // Then the backlog, with what room is left (and within the rate cap).
                    let now = tokio::time::Instant::now();
                    let mut limit = delivery.room();
                    if let Some((after, upto)) = delivery.backfill_range().filter(|_| limit > 0 && backfill_resume <= now) {
                        if let Some(interval) = backfill_interval {
                            let per_tick = ((0.05 / interval.as_secs_f64()) as usize).max(1);
                            limit = limit.min(per_tick);
                            backfill_resume = now + interval * limit as u32;
                        }
                        let rows = match fetch(&mut outbox, after, upto, limit, backfill_prefix.clone(), branch.clone()).await {
                            Ok(r) => r,
                            Err(e) => {
                                tracing::error!(error = %e, "cannot read the buffer");
                                continue;
                            }
                        };
                        if rows.is_empty() {
                            delivery.backfill_finished();
                            if after > 0 {
                                tracing::info!(up_to_seq = upto, "backlog drained");
                            }
                        }
                        for row in rows {
                            match delivery.offer(Lane::Backfill, row.seq, packet_bytes(&row.topic, &row.envelope)) {
                                Offer::Send => {
                                    if !self.publish_ready(&client, row.topic, row.envelope) {
                                        break;
                                    }
                                }
                                Offer::Passed => {}
                                Offer::Quarantined(q) => self.count_outcome(Some(q)),
                                Offer::Later => break,
                            }
                        }
                    }
                }
                _ = ack_tick.tick() => self.flush_outcomes(&mut delivery).await,
                _ = health_tick.tick() => health_due = true,
                _ = std::future::ready(()), if health_due && delivery.room() > 0 => {
                    health_due = false;
                    let Some(rows) = health_rows(&mut outbox).await else {
                        continue;
                    };
                    let topic = format!("{}/gateway/health", self.settings.topic_prefix);
                    if client.try_publish(topic, QoS::AtLeastOnce, false, self.health_payload(&rows)).is_ok() {
                        delivery.own_sent();
                    }
                }
                _ = backlog_tick.tick() => {
                    if let Some(b) = backlog(&mut outbox).await {
                        let (n, oldest) = (b.rows, b.oldest_received_ms);
                        self.stats.backlog.store(n, Ordering::Relaxed);
                        self.stats.oldest_undelivered_ms.store(oldest.unwrap_or(0), Ordering::Relaxed);
                        // A row behind the cursor at two checks running, not in flight
                        // (put back from the quarantine): read the backlog again from it.
                        if let Some(seq) = b.oldest_seq.filter(|s| oldest_seen == Some(*s)) {
                            if delivery.rewind_backfill(seq) {
                                tracing::info!(from_seq = seq, "undelivered rows behind the cursor (put back from the quarantine?): sending them");
                            }
                        }
                        oldest_seen = b.oldest_seq;
                        let now = now_ms();
                        if n > 0 && now - last_backlog_log >= BACKLOG_LOG_EVERY_MS {
                            let acked = self.stats.acknowledged.load(Ordering::Relaxed);
                            let rate = (acked - acked_at_log) as f64 * 1000.0 / (now - last_backlog_log).max(1) as f64;
                            let eta_s = if rate >= 1.0 { Some((n as f64 / rate) as u64) } else { None };
                            (last_backlog_log, acked_at_log) = (now, acked);
                            tracing::info!(
                                backlog = n,
                                oldest_age_s = oldest.map(|o| (now - o) / 1000).unwrap_or(0),
                                connected = delivery.connected(),
                                drain_rate_per_s = rate as u64,
                                eta_s,
                                "upstream backlog"
                            );
                        }
                    }
                }
            }
        }

        // Shutdown: collect acknowledgements already on their way, briefly.
        let deadline = tokio::time::Instant::now() + Duration::from_millis(500);
        while delivery.connected() && delivery.in_flight() > 0 {
            match tokio::time::timeout_at(deadline, events.recv()).await {
                Ok(Some((gen, _))) if gen != generation => {}
                Ok(Some((_, LinkEvent::PubAck { pkid, reason }))) => {
                    if let Some((_, outcome)) = delivery.on_puback(pkid, reason) {
                        self.count_outcome(outcome);
                    }
                }
                Ok(Some((_, LinkEvent::Sent(pkid)))) => delivery.on_publish_sent(pkid),
                Ok(Some((_, LinkEvent::Connected(_)))) => {}
                _ => break,
            }
        }
        self.flush_outcomes(&mut delivery).await;
        // A clean DISCONNECT (the driver sends it) so the broker does not publish the will;
        // the retained status then says so explicitly.
        client.close(
            self.status_topic(),
            self.status_payload("offline", started_ms),
        );
        let _ = tokio::time::timeout(Duration::from_millis(200), async {
            while events.recv().await.is_some() {}
        })
        .await;
        driver.abort();
    }

    /// Queue one envelope; backlog rows go to `{prefix}/backfill/devices/ID/KIND`.
    fn publish_ready(&self, client: &Requests, topic: String, envelope: String) -> bool {
        let ok = client
            .try_publish(topic, QoS::AtLeastOnce, false, envelope)
            .is_ok();
        if ok {
            self.stats.published.fetch_add(1, Ordering::Relaxed);
        }
        ok
    }

    /// Hand the rows' outcomes to the writer: delivered, quarantined.
    async fn flush_outcomes(&self, delivery: &mut Delivery) {
        let o = delivery.take_outcomes();
        let at_ms = now_ms();
        if !o.quarantined.is_empty() {
            let rows = o
                .quarantined
                .iter()
                .map(|&(seq, q)| (seq, q.name()))
                .collect();
            self.writer.send(Write::Quarantined { rows, at_ms }).await;
        }
        if !o.delivered.is_empty() {
            self.writer
                .send(Write::Delivered {
                    seqs: o.delivered,
                    at_ms,
                })
                .await;
        }
    }

    /// Count a row's outcome: delivered (`None`) or quarantined.
    fn count_outcome(&self, outcome: Option<Quarantine>) {
        match outcome {
            None => {
                self.stats.acknowledged.fetch_add(1, Ordering::Relaxed);
                self.stats.last_ack_ms.store(now_ms(), Ordering::Relaxed);
            }
            Some(_) => {
                self.stats.quarantined.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

/// The size of a QoS 1 PUBLISH packet: fixed header (at most 5 bytes), topic (2 + its
/// length), packet id (2) and payload; MQTT 5 properties add at most a few bytes more.
fn packet_bytes(topic: &str, payload: &str) -> usize {
    5 + 2 + topic.len() + 2 + 1 + payload.len()
}

/// What a connection task tells the forwarder (both protocols).
#[derive(Debug)]
enum LinkEvent {
    /// CONNACK: central's limits on this connection (none said over MQTT 3.1.1).
    Connected(Limits),
    /// A publish went out with this packet id (in the order publishes were queued).
    Sent(u16),
    /// Central's PUBACK, with its reason code (always 0x00 over MQTT 3.1.1).
    PubAck { pkid: u16, reason: u8 },
    /// The connection ended (or never came up); `collision`: a packet-id collision, which
    /// a fresh client ends.
    Lost { error: String, collision: bool },
}

/// The forwarder's side of one connection: its request queue, and a way to say goodbye
/// that does not wait behind a full in-flight window.
struct Requests {
    queue: mpsc::Sender<Request>,
    stop: Stop,
}

/// A last QoS 0 publish (the retained "offline" status), then DISCONNECT, sent by the
/// connection's task ahead of anything still queued.
#[derive(Clone, Default)]
struct Stop {
    now: CancellationToken,
    farewell: Arc<std::sync::Mutex<Option<Publish>>>,
}

impl Requests {
    fn try_publish(
        &self,
        topic: String,
        qos: QoS,
        retain: bool,
        payload: String,
    ) -> Result<(), ()> {
        let mut p = Publish::new(topic, qos, payload);
        p.retain = retain;
        self.queue.try_send(Request::Publish(p)).map_err(|_| ())
    }

    /// Publish `payload` on `topic` retained at QoS 0, then disconnect cleanly.
    fn close(&self, topic: String, payload: String) {
        let mut p = Publish::new(topic, QoS::AtMostOnce, payload);
        p.retain = true;
        if let Ok(mut f) = self.stop.farewell.lock() {
            *f = Some(p);
        }
        self.stop.now.cancel();
    }
}

/// The connection task's side of [`Requests`].
struct Incoming {
    queue: mpsc::Receiver<Request>,
    stop: Stop,
}

/// Flush the socket within the connection timeout. (A macro: rumqttc does not export the
/// name of its `Network` type.)
macro_rules! flush {
    ($network:expr, $timeout:expr) => {
        match tokio::time::timeout($timeout, $network.flush()).await {
            Ok(r) => r.map_err(ConnectionError::from),
            Err(_) => Err(ConnectionError::FlushTimeout),
        }
    };
}

fn lost(e: ConnectionError) -> LinkEvent {
    LinkEvent::Lost {
        collision: matches!(
            e,
            ConnectionError::MqttState(rumqttc::StateError::CollisionTimeout)
        ),
        error: e.to_string(),
    }
}

/// Run one MQTT 3.1.1 connection: connect with rumqttc's event loop (never cancelled mid-connect: a
/// dropped `poll()` abandons the half-open connection and makes the broker fire our will),
/// then move packets ourselves with rumqttc's state machine and codec, writing every queued
/// publish before one flush. (`poll()` flushes the socket once per request: one syscall
/// and one timer per message.) Events are forwarded tagged with the generation. Stops at
/// the first error: the forwarder starts a fresh client after a backoff.
async fn drive(
    mut eventloop: EventLoop,
    incoming: Incoming,
    generation: u64,
    events: mpsc::Sender<(u64, LinkEvent)>,
    delay: Duration,
) {
    tokio::time::sleep(delay).await;
    loop {
        match eventloop.poll().await {
            Err(e) => {
                let _ = events.send((generation, lost(e))).await;
                return;
            }
            Ok(Event::Incoming(Packet::ConnAck(_))) => {
                // MQTT 3.1.1 says nothing of central's limits.
                if events
                    .send((generation, LinkEvent::Connected(Limits::default())))
                    .await
                    .is_err()
                {
                    return;
                }
                break;
            }
            Ok(_) => {}
        }
    }
    let timeout = Duration::from_secs(eventloop.network_options.connection_timeout());
    let keep_alive = eventloop.mqtt_options.keep_alive();
    let max_inflight = eventloop.mqtt_options.inflight();
    let Incoming {
        queue: mut requests,
        stop,
    } = incoming;
    let EventLoop { state, network, .. } = &mut eventloop;
    let Some(network) = network.as_mut() else {
        let _ = events
            .send((generation, lost(ConnectionError::RequestsDone)))
            .await;
        return;
    };
    let mut ping = tokio::time::interval_at(
        tokio::time::Instant::now() + keep_alive,
        keep_alive.max(Duration::from_secs(1)),
    );
    // A tick missed while this task waited must not fire twice (a second ping before the
    // first PINGRESP is a rumqttc error).
    ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut batch: Vec<Request> = Vec::with_capacity(256);
    loop {
        let room = if state.collision.is_some() {
            0
        } else {
            max_inflight.saturating_sub(state.inflight()).min(256) as usize
        };
        // Every branch leaves the write buffer flushed, so a `readb` cancelled by another
        // branch loses nothing. Writes and flush together are bounded by the connection
        // timeout: a stalled socket ends the connection, not the task.
        let result: Result<bool, ConnectionError> = tokio::select! {
            r = network.readb(state) => match r {
                Ok(()) => flush!(network, timeout).map(|()| true),
                Err(e) => Err(e.into()),
            },
            n = requests.recv_many(&mut batch, room.max(1)), if room > 0 => {
                if n == 0 {
                    return; // the forwarder dropped this connection
                }
                let send = async {
                    for request in batch.drain(..) {
                        let publish = matches!(request, Request::Publish(_));
                        match state.handle_outgoing_packet(request)? {
                            Some(packet) => network.write(packet).await?,
                            // A packet-id collision (the broker acknowledged out of order):
                            // rumqttc parked the publish without an `Outgoing::Publish`, so
                            // the rows queued after it would be mapped to the wrong ids.
                            // Reconnect; the forwarder re-sends from the outbox.
                            None if publish => return Err(rumqttc::StateError::CollisionTimeout),
                            None => {}
                        }
                    }
                    network.flush().await
                };
                match tokio::time::timeout(timeout, send).await {
                    Ok(r) => r.map(|()| true).map_err(ConnectionError::from),
                    Err(_) => Err(ConnectionError::FlushTimeout),
                }
            },
            _ = stop.now.cancelled() => {
                let farewell = stop.farewell.lock().ok().and_then(|mut f| f.take());
                let send = async {
                    if let Some(p) = farewell {
                        if let Some(packet) = state.handle_outgoing_packet(Request::Publish(p))? {
                            network.write(packet).await?;
                        }
                    }
                    if let Some(packet) =
                        state.handle_outgoing_packet(Request::Disconnect(rumqttc::Disconnect))?
                    {
                        network.write(packet).await?;
                    }
                    network.flush().await
                };
                let _ = tokio::time::timeout(timeout, send).await;
                Ok(false)
            },
            _ = ping.tick(), if !keep_alive.is_zero() => {
                match state.handle_outgoing_packet(Request::PingReq(rumqttc::PingReq)) {
                    Ok(Some(packet)) => match network.write(packet).await {
                        Ok(()) => flush!(network, timeout).map(|()| true),
                        Err(e) => Err(e.into()),
                    },
                    Ok(None) => Ok(true),
                    Err(e) => Err(e.into()),
                }
            },
        };
        while let Some(ev) = state.events.pop_front() {
            let ev = match ev {
                Event::Outgoing(Outgoing::Publish(pkid)) => LinkEvent::Sent(pkid),
                // MQTT 3.1.1 has no reason codes: a PUBACK is a delivery.
                Event::Incoming(Packet::PubAck(ack)) => LinkEvent::PubAck {
                    pkid: ack.pkid,
                    reason: 0,
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
                let _ = events.send((generation, lost(e))).await;
                return;
            }
        }
    }
}

/// A row read back from the buffer, ready to publish.
struct Ready {
    seq: i64,
    topic: String,
    envelope: String,
}

/// Read up to `limit` undelivered rows after `after` (and up to `upto`) and build their
/// topics and envelopes on the blocking pool, straight from the rows.
async fn fetch(
    outbox: &mut Option<Outbox>,
    after: i64,
    upto: i64,
    limit: usize,
    topic_prefix: Arc<str>,
    branch: Arc<str>,
) -> rusqlite::Result<Vec<Ready>> {
    let mut ob = outbox.take().expect("outbox is returned after every use");
    let (ob, rows) = tokio::task::spawn_blocking(move || {
        let rows = ob.next_between(after, upto, limit.max(1), |row: StoredRef<'_>| Ready {
            seq: row.seq,
            topic: row.topic(&topic_prefix),
            envelope: row.envelope(&branch),
        });
        (ob, rows)
    })
    .await
    .expect("outbox read does not panic");
    *outbox = Some(ob);
    rows
}

/// What the health message reports from the database.
struct HealthRows {
    /// Disk-cap drops: (device, kind, count).
    drops: Vec<(String, String, i64)>,
    /// Refused for rate limits: (device, count).
    rate_limited: Vec<(String, i64)>,
    /// Refused by the broker: (device, reason, count).
    refused: Vec<(String, String, i64)>,
    /// Recent incidents: (at_ms, kind, detail).
    incidents: Vec<(i64, String, String)>,
    /// Quarantined: (device, kind, reason, count).
    quarantined: Vec<(String, String, String, i64)>,
    /// Commands per state.
    commands: Vec<(crate::buffer::commands::CommandState, i64)>,
    /// The SIP2 taps' counters: (device, counter, count).
    sip2: Vec<(String, String, i64)>,
}

async fn health_rows(outbox: &mut Option<Outbox>) -> Option<HealthRows> {
    let mut ob = outbox.take()?;
    let (ob, r) = tokio::task::spawn_blocking(move || {
        let r = (|| {
            Ok::<_, rusqlite::Error>(HealthRows {
                drops: ob.drops()?,
                rate_limited: ob.rate_limited()?,
                refused: ob.broker_refusals()?,
                incidents: ob.incidents()?,
                quarantined: ob.quarantined()?,
                commands: ob.commands()?,
                sip2: ob.sip2_counters()?,
            })
        })();
        (ob, r)
    })
    .await
    .ok()?;
    *outbox = Some(ob);
    r.ok()
}

async fn backlog(outbox: &mut Option<Outbox>) -> Option<Backlog> {
    let mut ob = outbox.take()?;
    let (ob, r) = tokio::task::spawn_blocking(move || {
        let r = ob.backlog();
        (ob, r)
    })
    .await
    .ok()?;
    *outbox = Some(ob);
    r.ok()
}

/// Exponential backoff from 100 ms up to `max_ms`, each wait jittered to 50-100% so that
/// many branches do not reconnect in lockstep.
pub fn backoff(failures: u32, max_ms: u64) -> Duration {
    let exp = 100u64.saturating_mul(1u64 << failures.min(16).saturating_sub(1));
    let capped = exp.min(max_ms).max(1);
    let jittered = rand::thread_rng().gen_range(capped / 2..=capped);
    Duration::from_millis(jittered)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_caps_and_jitters() {
        for _ in 0..100 {
            let d1 = backoff(1, 1000).as_millis();
            assert!((50..=100).contains(&d1), "{d1}");
            let d4 = backoff(4, 1000).as_millis();
            assert!((400..=800).contains(&d4), "{d4}");
            let d20 = backoff(20, 1000).as_millis();
            assert!((500..=1000).contains(&d20), "{d20}");
        }
    }
}
