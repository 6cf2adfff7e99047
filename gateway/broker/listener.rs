//! The device port: bind with a real backlog, accept, and decide at once whether a new
//! connection may have a place.
//!
//! Policy when a bound is hit (each counted, logged once per burst):
//! - `max_connections` connections open: the new one is closed at accept
//!   (`connect_connections_full`);
//! - `max_pending_per_address` connections of the same address not logged in yet: closed
//!   at accept (`connect_address_limit`);
//! - half of `max_connections` not logged in yet (from any addresses), or all places
//!   taken while some are not logged in: the oldest of those is closed to make room
//!   (`connect_evicted`);
//! - accept fails (out of file descriptors, memory): accepting pauses 50 ms, doubling to
//!   1 s while it keeps failing, instead of spinning.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use super::shared::{Denial, Shared};
use super::Connector;
use crate::burst::BurstLimiter;
use crate::model::now_ms;

/// Bind `addr` with `backlog` pending connections (the kernel caps it at
/// `net.core.somaxconn`).
pub(crate) fn bind(addr: SocketAddr, backlog: u32) -> std::io::Result<std::net::TcpListener> {
    use socket2::{Domain, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    socket.set_reuse_address(true)?;
    socket.bind(&addr.into())?;
    socket.listen(i32::try_from(backlog).unwrap_or(i32::MAX))?;
    socket.set_nonblocking(true)?;
    Ok(socket.into())
}

/// Detect dead peers that never close (a kiosk losing power): probe after 60 s idle,
/// every 10 s, give up after 3.
fn keepalive(stream: &tokio::net::TcpStream) {
    let ka = socket2::TcpKeepalive::new()
        .with_time(Duration::from_secs(60))
        .with_interval(Duration::from_secs(10))
        .with_retries(3);
    let _ = socket2::SockRef::from(stream).set_tcp_keepalive(&ka);
}

/// How long a new connection waits for the place of one closed to make room.
const EVICTION_WAIT: Duration = Duration::from_millis(200);

/// Accept until `stop`.
pub(crate) async fn run(
    listener: std::net::TcpListener,
    shared: Arc<Shared>,
    connector: Connector,
    stop: CancellationToken,
) -> std::io::Result<()> {
    let listener = tokio::net::TcpListener::from_std(listener)?;
    let places = Arc::new(Semaphore::new(shared.settings.max_connections));
    let mut errors = BurstLimiter::new(10_000, 4);
    let mut backoff = Duration::from_millis(50);
    loop {
        let accepted = tokio::select! {
            _ = stop.cancelled() => return Ok(()),
            a = listener.accept() => a,
        };
        let (stream, peer) = match accepted {
            Ok(a) => {
                backoff = Duration::from_millis(50);
                a
            }
            Err(e) => {
                shared.stats.accept_errors.fetch_add(1, Ordering::Relaxed);
                if let Some(suppressed) = errors.hit(&(), now_ms()) {
                    tracing::error!(
                        error = %e,
                        suppressed_since_last_report = suppressed,
                        "cannot accept device connections (open files at the limit?)"
                    );
                }
                tokio::select! {
                    _ = stop.cancelled() => return Ok(()),
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(Duration::from_secs(1));
                continue;
            }
        };
        let place = match places.clone().try_acquire_owned() {
            Ok(p) => p,
            // Full: the oldest connection not logged in yet makes room, if there is one.
            Err(_) if shared.evict_oldest_pending() => {
                match tokio::time::timeout(EVICTION_WAIT, places.clone().acquire_owned()).await {
                    Ok(Ok(p)) => p,
                    _ => {
                        shared.deny(None, Denial::ConnectionsFull, "max_connections reached");
                        continue;
                    }
                }
            }
            Err(_) => {
                shared.deny(None, Denial::ConnectionsFull, "max_connections reached");
                continue;
            }
        };
        let Some(pending) = shared.pending(peer.ip()) else {
            let detail = format!("max_pending_per_address reached by {}", peer.ip());
            shared.deny(None, Denial::AddressLimit, &detail);
            continue;
        };
        keepalive(&stream);
        tokio::spawn(super::connection::serve(
            shared.clone(),
            connector.clone(),
            stream,
            peer,
            pending,
            place,
        ));
    }
}
