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

use std::collections::{HashMap, VecDeque};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use rand::Rng;
use rumqttc::{AsyncClient, ConnectionError, Event, EventLoop, MqttOptions, Outgoing, Packet, QoS};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::buffer::{BufferStats, Outbox, Write};
use crate::config::UpstreamSection;
use crate::model::{now_ms, Stored};

/// How often acknowledged `seq`s are handed to the writer.
const ACK_FLUSH: Duration = Duration::from_millis(50);
/// How often the backlog is measured (and logged while draining, at most once a minute).
const BACKLOG_EVERY: Duration = Duration::from_secs(5);
const BACKLOG_LOG_EVERY_MS: i64 = 60_000;

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
}

pub struct Forwarder {
    pub settings: UpstreamSection,
    pub branch: String,
    pub database: PathBuf,
    /// Largest envelope the forwarder may send (raises rumqttc's 10 KiB default).
    pub max_packet_bytes: usize,
    pub writer: mpsc::Sender<Write>,
    pub buffer: Arc<BufferStats>,
    pub stats: Arc<UpstreamStats>,
}

/// One message handed to rumqttc and not yet acknowledged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Sent {
    Row(i64),
    /// The gateway's own status publish (no row behind it).
    GatewayStatus,
}

impl Forwarder {
    fn options(&self, started_ms: i64) -> MqttOptions {
        let s = &self.settings;
        // `check()` has validated the URL.
        let addr = s.addr().unwrap_or(crate::config::UpstreamAddr {
            host: "127.0.0.1".into(),
            port: 1883,
        });
        let mut o = MqttOptions::new(&s.client_id, addr.host, addr.port);
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

    fn client(&self, started_ms: i64) -> (AsyncClient, EventLoop) {
        // The request channel holds a whole window, so `try_publish` never finds it full.
        AsyncClient::new(
            self.options(started_ms),
            self.settings.max_inflight as usize + 8,
        )
    }

    /// Run until `shutdown`; then wait briefly for acknowledgements in flight and hand them
    /// to the writer.
    pub async fn run(self, shutdown: CancellationToken) {
        let started_ms = now_ms();
        let window = self.settings.max_inflight as usize;
        let (mut client, mut eventloop) = self.client(started_ms);
        let mut outbox = match tokio::task::block_in_place(|| Outbox::open(&self.database)) {
            Ok(o) => Some(o),
            Err(e) => {
                tracing::error!(error = %e, "forwarder cannot read the buffer; not forwarding");
                return;
            }
        };
        let mut queued: VecDeque<Sent> = VecDeque::new();
        let mut inflight: HashMap<u16, Sent> = HashMap::new();
        let mut acks: Vec<i64> = Vec::new();
        let mut cursor: i64 = 0;
        let mut connected = false;
        let mut caught_up = false;
        let mut failures: u32 = 0;
        let mut ack_tick = tokio::time::interval(ACK_FLUSH);
        let mut backlog_tick = tokio::time::interval(BACKLOG_EVERY);
        let mut last_backlog_log = i64::MIN / 2;
        let addr = self.settings.url.clone();

        loop {
            let room = connected && queued.len() + inflight.len() < window;
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => break,
                ev = eventloop.poll() => match ev {
                    Ok(Event::Incoming(Packet::ConnAck(_))) => {
                        failures = 0;
                        connected = true;
                        caught_up = false;
                        queued.clear();
                        inflight.clear();
                        self.flush_acks(&mut acks).await;
                        cursor = 0;
                        self.stats.connected.store(true, Ordering::Relaxed);
                        self.stats.connects.fetch_add(1, Ordering::Relaxed);
                        tracing::info!(url = %addr, "connected to the central broker; re-sending everything unacknowledged");
                        if client
                            .try_publish(self.status_topic(), QoS::AtLeastOnce, true, self.status_payload("online", started_ms))
                            .is_ok()
                        {
                            queued.push_back(Sent::GatewayStatus);
                        }
                    }
                    Ok(Event::Outgoing(Outgoing::Publish(pkid))) => {
                        if let Some(sent) = queued.pop_front() {
                            inflight.insert(pkid, sent);
                        }
                    }
                    Ok(Event::Incoming(Packet::PubAck(ack))) => {
                        if let Some(Sent::Row(seq)) = inflight.remove(&ack.pkid) {
                            acks.push(seq);
                            self.stats.acknowledged.fetch_add(1, Ordering::Relaxed);
                            self.stats.last_ack_ms.store(now_ms(), Ordering::Relaxed);
                        }
                        if acks.len() >= window {
                            self.flush_acks(&mut acks).await;
                        }
                    }
                    Ok(_) => {}
                    Err(e) => {
                        if connected {
                            tracing::warn!(url = %addr, error = %e, "lost the central broker");
                        } else if failures == 0 || failures.is_power_of_two() {
                            tracing::warn!(url = %addr, error = %e, attempts = failures + 1, "cannot reach the central broker");
                        }
                        connected = false;
                        self.stats.connected.store(false, Ordering::Relaxed);
                        if matches!(e, ConnectionError::MqttState(rumqttc::StateError::CollisionTimeout)) {
                            // rumqttc keeps a stashed collision across reconnects and
                            // livelocks (rumqtt#1014): start over with a new client.
                            (client, eventloop) = self.client(started_ms);
                            self.stats.client_rebuilds.fetch_add(1, Ordering::Relaxed);
                        }
                        failures = failures.saturating_add(1);
                        let delay = backoff(failures, self.settings.reconnect_max_ms);
                        tokio::select! {
                            _ = shutdown.cancelled() => break,
                            _ = tokio::time::sleep(delay) => {}
                        }
                    }
                },
                _ = self.buffer.committed.notified(), if room && caught_up => {
                    caught_up = false;
                }
                // The read runs in the handler, never as a raced future: a cancelled read
                // would lose the outbox connection it borrowed.
                _ = std::future::ready(()), if room && !caught_up => {
                    let limit = window.saturating_sub(queued.len() + inflight.len());
                    let rows = match fetch(&mut outbox, cursor, limit).await {
                        Ok(r) => r,
                        Err(e) => {
                            tracing::error!(error = %e, "cannot read the buffer");
                            tokio::time::sleep(Duration::from_secs(1)).await;
                            continue;
                        }
                    };
                    if rows.is_empty() {
                        caught_up = true;
                    }
                    for row in rows {
                        let topic = row.topic(&self.settings.topic_prefix);
                        let body = row.envelope(&self.branch);
                        if client.try_publish(topic, QoS::AtLeastOnce, false, body).is_err() {
                            break;
                        }
                        queued.push_back(Sent::Row(row.seq));
                        cursor = row.seq;
                        self.stats.published.fetch_add(1, Ordering::Relaxed);
                    }
                }
                _ = ack_tick.tick() => self.flush_acks(&mut acks).await,
                _ = backlog_tick.tick() => {
                    if let Some((n, oldest)) = backlog(&mut outbox).await {
                        self.stats.backlog.store(n, Ordering::Relaxed);
                        self.stats.oldest_undelivered_ms.store(oldest.unwrap_or(0), Ordering::Relaxed);
                        let now = now_ms();
                        if n > 0 && now - last_backlog_log >= BACKLOG_LOG_EVERY_MS {
                            last_backlog_log = now;
                            tracing::info!(
                                backlog = n,
                                oldest_age_s = oldest.map(|o| (now - o) / 1000).unwrap_or(0),
                                connected,
                                "upstream backlog"
                            );
                        }
                    }
                }
            }
        }

        // Shutdown: collect acknowledgements already on their way, briefly.
        let deadline = tokio::time::Instant::now() + Duration::from_millis(500);
        while connected && !inflight.is_empty() {
            match tokio::time::timeout_at(deadline, eventloop.poll()).await {
                Ok(Ok(Event::Incoming(Packet::PubAck(ack)))) => {
                    if let Some(Sent::Row(seq)) = inflight.remove(&ack.pkid) {
                        acks.push(seq);
                    }
                }
                Ok(Ok(Event::Outgoing(Outgoing::Publish(pkid)))) => {
                    if let Some(sent) = queued.pop_front() {
                        inflight.insert(pkid, sent);
                    }
                }
                Ok(Ok(_)) => {}
                _ => break,
            }
        }
        self.flush_acks(&mut acks).await;
        let _ = client.try_disconnect();
    }

    async fn flush_acks(&self, acks: &mut Vec<i64>) {
        if acks.is_empty() {
            return;
        }
        let seqs = std::mem::take(acks);
        let _ = self
            .writer
            .send(Write::Delivered {
                seqs,
                at_ms: now_ms(),
            })
            .await;
    }
}

async fn fetch(
    outbox: &mut Option<Outbox>,
    after: i64,
    limit: usize,
) -> rusqlite::Result<Vec<Stored>> {
    let mut ob = outbox.take().expect("outbox is returned after every use");
    let (ob, rows) = tokio::task::spawn_blocking(move || {
        let rows = ob.next_after(after, limit.max(1));
        (ob, rows)
    })
    .await
    .expect("outbox read does not panic");
    *outbox = Some(ob);
    rows
}

async fn backlog(outbox: &mut Option<Outbox>) -> Option<(i64, Option<i64>)> {
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
