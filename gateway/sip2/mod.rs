//! Self-check kiosks as they are: a transparent SIP2 tap between each kiosk and the ILS.
//!
//! The kiosk's SIP2 host and port point at the kiosk's `sip2.listen`; for each connection
//! the gateway connects to the ILS (`sip2.ils`, over TLS with `tls = true`) and passes every
//! byte on, unchanged and in order, in both directions, before looking at it: the tap
//! ([`tap`], sans-IO) reads copies and derives the kiosk's events, telemetry and counters,
//! which go to intake like any device message of the kiosk's profile. The gateway never
//! answers in the ILS's place: if the ILS cannot be reached the kiosk's connection is closed
//! (the kiosk goes to its own offline mode). Nothing here logs or stores a SIP2 line.
//!
//! Bounds: `sip2.max_connections` kiosk connections per listener (more are closed at
//! accept), [`tap::MAX_LINE`] bytes of a message held per direction, 16 requests awaiting
//! their response, [`READ_CHUNK`] bytes read at a time.

pub mod sim;
pub(crate) mod tap;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::config::sip2::Sip2Section;
use crate::model::{now_ms, DeviceId};
use tap::{Derived, Tap};

/// Arbitrary bytes through the tap, as a kiosk (first byte odd) or an ILS would send them,
/// split at arbitrary points: for the fuzz target (`fuzz/fuzz_targets/sip2_bytes.rs`).
#[doc(hidden)]
pub fn fuzz_sip2_bytes(data: &[u8]) {
    let mut tap = Tap::default();
    let mut now = 0;
    for chunk in data.chunks(data.first().copied().unwrap_or(1).max(1) as usize) {
        now += 7;
        if chunk[0] % 2 == 1 {
            tap.kiosk_sent(chunk, now);
        } else {
            tap.ils_sent(chunk, now);
        }
    }
    tap.closed(now);
}

/// How long connecting to the ILS may take before the kiosk's connection is closed.
pub const ILS_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// A side that takes nothing of what is written to it for this long ends the connection.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(30);
/// A connection with no byte either way for this long is closed (kiosks send an SC
/// status every few minutes).
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(30 * 60);
/// Bytes read from either side at a time.
const READ_CHUNK: usize = 16 * 1024;

/// What a tap tells the app (which hands it to intake and the counters).
#[derive(Debug, Clone, PartialEq)]
pub enum Sip2Event {
    /// A derived message of the kiosk: `kind` is `events` or `telemetry`, `payload` JSON.
    Message {
        device: DeviceId,
        kind: &'static str,
        payload: String,
    },
    /// A counter of the kiosk, `n` times.
    Counted {
        device: DeviceId,
        what: &'static str,
        n: u64,
    },
    /// A kiosk connection is linked to the ILS (`up`) or ended: the kiosk's presence.
    Link { device: DeviceId, up: bool },
}

/// Events that may wait for the app.
pub const EVENT_QUEUE: usize = 1024;

/// One tapped kiosk.
#[derive(Clone)]
pub struct Kiosk {
    pub device: DeviceId,
    pub section: Sip2Section,
    /// For `tls = true`: built at start from `ca_file` or the system's roots.
    pub tls: Option<Arc<rustls::ClientConfig>>,
}

trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// Serve one kiosk's listener until `shutdown`.
pub async fn run(
    kiosk: Kiosk,
    listener: TcpListener,
    events: mpsc::Sender<Sip2Event>,
    shutdown: CancellationToken,
) {
    let open = Arc::new(AtomicUsize::new(0));
    loop {
        let accepted = tokio::select! {
            _ = shutdown.cancelled() => return,
            a = listener.accept() => a,
        };
        let (stream, peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                tracing::warn!(device = %kiosk.device, error = %e, "SIP2 listener cannot accept; retrying");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let allowed = &kiosk.section.allow;
        if !allowed.is_empty() && !allowed.contains(&peer.ip().to_canonical()) {
            count(&events, &kiosk.device, "sip2_address_denied");
            continue; // dropped: closed
        }
        if open.load(Ordering::Relaxed) >= kiosk.section.max_connections {
            count(&events, &kiosk.device, "sip2_connections_full");
            continue; // dropped: closed
        }
        open.fetch_add(1, Ordering::Relaxed);
        let (kiosk, events, stop, open) = (
            kiosk.clone(),
            events.clone(),
            shutdown.clone(),
            open.clone(),
        );
        tokio::spawn(async move {
            serve(&kiosk, stream, &events, stop).await;
            open.fetch_sub(1, Ordering::Relaxed);
        });
    }
}

/// Hand an event to the app without waiting: forwarding never waits for intake. A full
/// queue drops it, tallied per kiosk (the app counts the tally as `sip2_events_dropped`,
/// [`take_dropped`]) and logged once per burst.
fn offer(events: &mpsc::Sender<Sip2Event>, ev: Sip2Event) {
    let Err(e) = events.try_send(ev) else { return };
    let device = match e.into_inner() {
        Sip2Event::Message { device, .. }
        | Sip2Event::Counted { device, .. }
        | Sip2Event::Link { device, .. } => device,
    };
    let total = {
        let mut d = DROPPED.lock().unwrap_or_else(|p| p.into_inner());
        *d.entry(device).or_default() += 1;
        d.values().sum::<u64>()
    };
    let now = now_ms();
    let last = LAST_DROP_LOG_MS.load(Ordering::Relaxed);
    if now - last >= 10_000
        && LAST_DROP_LOG_MS
            .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
            .is_ok()
    {
        tracing::warn!(dropped_not_yet_counted = total, "SIP2 tap: derived events dropped, intake is not keeping up (the traffic itself passed; counted as sip2_events_dropped)");
    }
}

/// Derived events and counts dropped because the app's queue was full, per kiosk, not
/// yet counted. At most one entry per tapped kiosk.
static DROPPED: std::sync::Mutex<std::collections::BTreeMap<DeviceId, u64>> =
    std::sync::Mutex::new(std::collections::BTreeMap::new());
static LAST_DROP_LOG_MS: std::sync::atomic::AtomicI64 = std::sync::atomic::AtomicI64::new(0);

/// The drops tallied since the last call, per kiosk (for the app to count).
pub fn take_dropped() -> Vec<(DeviceId, u64)> {
    std::mem::take(&mut *DROPPED.lock().unwrap_or_else(|p| p.into_inner()))
        .into_iter()
        .collect()
}

fn count(events: &mpsc::Sender<Sip2Event>, device: &str, what: &'static str) {
    offer(
        events,
        Sip2Event::Counted {
            device: device.to_owned(),
            what,
            n: 1,
        },
    );
}

/// The ILS could not be reached for a kiosk connection: counted, and the link's state in
/// the kiosk's telemetry.
fn link_down(events: &mpsc::Sender<Sip2Event>, device: &str) {
    count(events, device, "sip2_ils_unreachable");
    offer(
        events,
        Sip2Event::Message {
            device: device.to_owned(),
            kind: "telemetry",
            payload: r#"{"sip_link":"down"}"#.to_owned(),
        },
    );
}

async fn connect_ils(kiosk: &Kiosk) -> Result<Box<dyn Io>, String> {
    let (host, port) = kiosk
        .section
        .ils_addr()
        .ok_or_else(|| "ils is not host:port".to_owned())?;
    let tcp = TcpStream::connect((host.as_str(), port))
        .await
        .map_err(|e| e.to_string())?;
    let _ = tcp.set_nodelay(true);
    match &kiosk.tls {
        None => Ok(Box::new(tcp)),
        Some(cfg) => {
            let name = rustls::pki_types::ServerName::try_from(host.clone())
                .map_err(|e| format!("TLS: {e}"))?;
            let s = tokio_rustls::TlsConnector::from(cfg.clone())
                .connect(name, tcp)
                .await
                .map_err(|e| format!("TLS: {e}"))?;
            Ok(Box::new(s))
        }
    }
}

/// One kiosk connection: connect to the ILS, then pass bytes both ways until either side
/// closes.
async fn serve(
    kiosk: &Kiosk,
    kiosk_stream: TcpStream,
    events: &mpsc::Sender<Sip2Event>,
    shutdown: CancellationToken,
) {
    let _ = kiosk_stream.set_nodelay(true);
    let device = kiosk.device.as_str();
    let ils = match tokio::time::timeout(ILS_CONNECT_TIMEOUT, connect_ils(kiosk)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            tracing::warn!(device, error = %e, "ILS unreachable: kiosk connection closed (the kiosk works offline)");
            link_down(events, device);
            return;
        }
        Err(_) => {
            tracing::warn!(
                device,
                timeout_s = ILS_CONNECT_TIMEOUT.as_secs(),
                "ILS did not answer: kiosk connection closed (the kiosk works offline)"
            );
            link_down(events, device);
            return;
        }
    };
    count(events, device, "sip2_connections");
    let link = |up| Sip2Event::Link {
        device: device.to_owned(),
        up,
    };
    // Presence matters more than a derived event: waited for (the app drains quickly).
    let _ = events.send(link(true)).await;
    let (mut kiosk_rx, mut kiosk_tx) = kiosk_stream.into_split();
    let (mut ils_rx, mut ils_tx) = tokio::io::split(ils);
    let mut tap = Tap::default();
    let mut up = vec![0u8; READ_CHUNK];
    let mut down = vec![0u8; READ_CHUNK];
    loop {
        let derived = tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = tokio::time::sleep(IDLE_TIMEOUT) => {
                count(events, device, "sip2_idle_closed");
                break;
            }
            r = kiosk_rx.read(&mut up) => match r {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    // Forward first: the tap never delays the exchange.
                    let write = async {
                        ils_tx.write_all(&up[..n]).await?;
                        ils_tx.flush().await
                    };
                    if !within(write, &shutdown).await {
                        break;
                    }
                    tap.kiosk_sent(&up[..n], now_ms())
                }
            },
            r = ils_rx.read(&mut down) => match r {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if !within(kiosk_tx.write_all(&down[..n]), &shutdown).await {
                        break;
                    }
                    tap.ils_sent(&down[..n], now_ms())
                }
            },
        };
        deliver(device, derived, events);
    }
    deliver(device, tap.closed(now_ms()), events);
    let _ = events.send(link(false)).await;
    let _ = tokio::time::timeout(Duration::from_secs(1), kiosk_tx.shutdown()).await;
    let _ = tokio::time::timeout(Duration::from_secs(1), ils_tx.shutdown()).await;
}

/// A write, given up after [`WRITE_TIMEOUT`] or at shutdown: `true` if it completed.
async fn within(
    write: impl std::future::Future<Output = std::io::Result<()>>,
    shutdown: &CancellationToken,
) -> bool {
    tokio::select! {
        r = tokio::time::timeout(WRITE_TIMEOUT, write) => matches!(r, Ok(Ok(()))),
        _ = shutdown.cancelled() => false,
    }
}

/// Hand what the tap derived to the app, counts merged per kind (a flood of garbage is one
/// event per chunk, not one per line), without waiting.
fn deliver(device: &str, derived: Vec<Derived>, events: &mpsc::Sender<Sip2Event>) {
    let mut counts: Vec<(&'static str, u64)> = Vec::new();
    for d in derived {
        let ev = match d {
            Derived::Count(what) => {
                match counts.iter_mut().find(|(w, _)| *w == what) {
                    Some(c) => c.1 += 1,
                    None => counts.push((what, 1)),
                }
                continue;
            }
            Derived::Event(v) => Sip2Event::Message {
                device: device.to_owned(),
                kind: "events",
                payload: v.to_string(),
            },
            Derived::Telemetry(v) => Sip2Event::Message {
                device: device.to_owned(),
                kind: "telemetry",
                payload: v.to_string(),
            },
        };
        offer(events, ev);
    }
    for (what, n) in counts {
        offer(
            events,
            Sip2Event::Counted {
                device: device.to_owned(),
                what,
                n,
            },
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_queue_drops_events_and_tallies_them_per_kiosk_once() {
        let (tx, mut rx) = mpsc::channel(1);
        let link = |device: &str| Sip2Event::Link {
            device: device.to_owned(),
            up: true,
        };
        offer(&tx, link("kiosk-a"));
        offer(&tx, link("kiosk-a"));
        count(&tx, "kiosk-b", "sip2_unparsed");
        offer(&tx, link("kiosk-a"));
        assert_eq!(rx.try_recv().unwrap(), link("kiosk-a"), "the first passed");
        assert_eq!(
            take_dropped(),
            [("kiosk-a".to_owned(), 2), ("kiosk-b".to_owned(), 1)]
        );
        assert_eq!(take_dropped(), [], "each drop tallied once");
    }
}
