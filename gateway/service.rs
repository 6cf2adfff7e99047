//! Running under systemd: readiness, the watchdog and a one-line status, over sd_notify.
//! Outside systemd (no `NOTIFY_SOCKET`) every notification is a no-op, so the same code
//! runs by hand, in the demo and in tests.
//!
//! The watchdog is pinged only while the parts that can die silently are seen working:
//! the async runtime (the pinging task runs on it), rumqttd's router thread (a probe
//! publish must come back through it) and the SQLite writer thread (its heartbeat must be
//! fresh). A writer that keeps failing (a full disk) still beats: that is reported in the
//! status and the log, not answered with a restart loop.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use sd_notify::NotifyState;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::broker::RouterProbe;
use crate::buffer::{BufferStats, Write};

/// Check interval without a watchdog (the status line is still refreshed).
const CHECK_EVERY: Duration = Duration::from_secs(10);
/// Shortest writer silence that counts as stuck, whatever the watchdog period.
const MIN_STALL: Duration = Duration::from_secs(2);

/// A part that stopped responding.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Wedged {
    Router(String),
    Writer { silent_ms: i64 },
}

impl std::fmt::Display for Wedged {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Wedged::Router(why) => write!(f, "embedded broker router: {why}"),
            Wedged::Writer { silent_ms } => {
                write!(f, "SQLite writer: no progress for {} ms", silent_ms)
            }
        }
    }
}

/// The pure decision: which parts are wedged, given the writer's last heartbeat and the
/// router probe's result.
pub fn verdict(
    now_ms: i64,
    writer_heartbeat_ms: i64,
    stall: Duration,
    router: Result<(), String>,
) -> Vec<Wedged> {
    let mut wedged = Vec::new();
    if let Err(why) = router {
        wedged.push(Wedged::Router(why));
    }
    let silent_ms = now_ms - writer_heartbeat_ms;
    if silent_ms > stall.as_millis() as i64 {
        wedged.push(Wedged::Writer { silent_ms });
    }
    wedged
}

/// How often to check and ping: half the watchdog period (systemd's advice), at most
/// every [`CHECK_EVERY`].
pub fn check_interval(watchdog: Option<Duration>) -> Duration {
    match watchdog {
        Some(period) => (period / 2).clamp(Duration::from_millis(50), CHECK_EVERY),
        None => CHECK_EVERY,
    }
}

fn notify(states: &[NotifyState]) {
    if let Err(e) = sd_notify::notify(states) {
        tracing::warn!(error = %e, "cannot notify the service manager");
    }
}

/// `READY=1` with the first status line.
pub fn notify_ready(status: &str) {
    notify(&[NotifyState::Ready, NotifyState::Status(status)]);
}

pub fn notify_reloading() {
    let status = NotifyState::Status("reloading configuration");
    // systemd 253+ wants the monotonic time of the reload with RELOADING=1.
    match NotifyState::monotonic_usec_now() {
        Ok(now) => notify(&[NotifyState::Reloading, now, status]),
        Err(_) => notify(&[NotifyState::Reloading, status]),
    }
}

pub fn notify_stopping() {
    notify(&[
        NotifyState::Stopping,
        NotifyState::Status("stopping: committing what was accepted"),
    ]);
}

/// Check the parts every [`check_interval`]; ping the watchdog only when none is wedged,
/// and refresh the status line. Runs until `shutdown`.
pub async fn supervise(
    mut probe: RouterProbe,
    writer: mpsc::Sender<Write>,
    buffer: Arc<BufferStats>,
    status: impl Fn() -> String + Send,
    shutdown: CancellationToken,
) {
    let watchdog = sd_notify::watchdog_enabled();
    let every = check_interval(watchdog);
    let stall = watchdog.unwrap_or(Duration::from_secs(30)).max(MIN_STALL);
    if let Some(period) = watchdog {
        tracing::info!(
            period_ms = period.as_millis() as u64,
            check_ms = every.as_millis() as u64,
            "systemd watchdog enabled"
        );
    }
    // The first check one interval after start: READY=1 comes first.
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut was_wedged = false;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        // A full queue means the writer has work in hand: its heartbeat tells the rest.
        let _ = writer.try_send(Write::Probe);
        let router = probe
            .round_trip(every.min(Duration::from_secs(5)))
            .await
            .map(|_| ())
            .map_err(|e| e.to_string());
        let wedged = verdict(
            crate::model::now_ms(),
            buffer.heartbeat_ms.load(Ordering::Relaxed),
            stall,
            router,
        );
        if wedged.is_empty() {
            if was_wedged {
                tracing::warn!("all parts respond again: watchdog pings resumed");
                was_wedged = false;
            }
            let line = status();
            if watchdog.is_some() {
                notify(&[NotifyState::Watchdog, NotifyState::Status(&line)]);
            } else {
                notify(&[NotifyState::Status(&line)]);
            }
        } else {
            let what: Vec<String> = wedged.iter().map(|w| w.to_string()).collect();
            if !was_wedged {
                tracing::error!(
                    wedged = %what.join("; "),
                    "a part of the gateway stopped responding: watchdog pings withheld (systemd restarts the service)"
                );
                was_wedged = true;
            }
            notify(&[NotifyState::Status(&format!(
                "not responding: {}",
                what.join("; ")
            ))]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_silent_writer_or_a_failed_probe_is_wedged() {
        let stall = Duration::from_secs(30);
        assert!(verdict(100_000, 90_000, stall, Ok(())).is_empty());
        assert_eq!(
            verdict(100_000, 60_000, stall, Ok(())),
            vec![Wedged::Writer { silent_ms: 40_000 }]
        );
        assert_eq!(
            verdict(100_000, 99_000, stall, Err("timeout".into())),
            vec![Wedged::Router("timeout".into())]
        );
        assert_eq!(verdict(100_000, 0, stall, Err("x".into())).len(), 2);
    }

    #[test]
    fn checks_run_at_half_the_watchdog_period() {
        assert_eq!(check_interval(None), CHECK_EVERY);
        assert_eq!(
            check_interval(Some(Duration::from_secs(30))),
            Duration::from_secs(10)
        );
        assert_eq!(
            check_interval(Some(Duration::from_secs(4))),
            Duration::from_secs(2)
        );
        assert_eq!(
            check_interval(Some(Duration::from_millis(20))),
            Duration::from_millis(50)
        );
    }
}

/// File descriptors kept free beyond the device connections and the HTTP API's own
/// budget: the SQLite writer and the forwarder's readers (each with its WAL and shared
/// memory), serial ports, the upstream link, listeners and the runtimes' own.
pub const FD_HEADROOM: u64 = 128;

#[derive(Debug, thiserror::Error)]
#[error(
    "broker.max_connections {max_connections} and the API's {api} need at least {needed} open files, \
     but the limit is {limit} (raise LimitNOFILE in the systemd unit, or lower broker.max_connections)"
)]
pub struct OpenFilesError {
    pub max_connections: usize,
    pub api: usize,
    pub needed: u64,
    pub limit: u64,
}

/// Raise the soft open-files limit to the hard one, then check that `max_connections`
/// device connections and the API's `api` descriptors fit beside [`FD_HEADROOM`]: a
/// gateway out of descriptors locks out every device and the API, so this is refused at
/// start instead.
pub fn ensure_open_files(max_connections: usize, api: usize) -> Result<u64, OpenFilesError> {
    let needed = (max_connections + api) as u64 + FD_HEADROOM;
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit only read and write the struct passed.
    let limit = unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return Ok(0);
        }
        if lim.rlim_cur < lim.rlim_max {
            let raised = libc::rlimit {
                rlim_cur: lim.rlim_max,
                rlim_max: lim.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                lim.rlim_cur = lim.rlim_max;
            }
        }
        lim.rlim_cur
    };
    if limit < needed {
        return Err(OpenFilesError {
            max_connections,
            api,
            needed,
            limit,
        });
    }
    Ok(limit)
}
