//! The background WAL checkpoint.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use rusqlite::Connection;

use crate::config::Synchronous;

/// Copies committed WAL frames into the database file on a thread of its own (a PASSIVE
/// checkpoint every [`Checkpointer::EVERY`]), so commits are not held up by it: SQLite's
/// automatic checkpoint runs inside the committing transaction and, with a WAL of tens
/// of MB after a burst, stalled intake for tens of ms. The automatic one stays as a
/// backstop at the WAL limit. Stops (and is joined) when dropped.
pub(super) struct Checkpointer {
    pub(super) stop: Option<std::sync::mpsc::Sender<()>>,
    pub(super) thread: Option<std::thread::JoinHandle<()>>,
}

impl Checkpointer {
    const EVERY: Duration = Duration::from_millis(200);

    pub(super) fn start(
        path: &Path,
        synchronous: Synchronous,
        lock: Arc<std::sync::Mutex<()>>,
    ) -> Checkpointer {
        let (stop, stopped) = std::sync::mpsc::channel::<()>();
        let path = path.to_path_buf();
        let thread = std::thread::Builder::new()
            .name("sqlite-checkpoint".into())
            .spawn(move || Self::run(&path, synchronous, &lock, stopped))
            .map_err(|e| tracing::warn!(error = %e, "cannot start the checkpoint thread; commits checkpoint instead"))
            .ok();
        Checkpointer {
            stop: Some(stop),
            thread,
        }
    }

    pub(super) fn run(
        path: &Path,
        synchronous: Synchronous,
        lock: &std::sync::Mutex<()>,
        stopped: std::sync::mpsc::Receiver<()>,
    ) {
        let conn = match Connection::open(path) {
            Ok(conn) => conn,
            Err(e) => {
                tracing::warn!(error = %e, "checkpoint connection failed; commits checkpoint instead");
                return;
            }
        };
        let sync = match synchronous {
            Synchronous::Full => "FULL",
            Synchronous::Normal => "NORMAL",
        };
        if let Err(e) = conn.pragma_update(None, "synchronous", sync) {
            tracing::warn!(error = %e, "checkpoint connection: cannot set synchronous");
        }
        // A checkpoint copies pages through its own buffer: no page cache worth keeping.
        let _ = conn.pragma_update(None, "cache_size", 16);
        let mut last_error_ms = i64::MIN / 2;
        while let Err(std::sync::mpsc::RecvTimeoutError::Timeout) =
            stopped.recv_timeout(Self::EVERY)
        {
            let _held = lock.lock().unwrap_or_else(|p| p.into_inner());
            if let Err(e) = conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(())) {
                let now = crate::model::now_ms();
                if now - last_error_ms >= 60_000 {
                    last_error_ms = now;
                    tracing::warn!(error = %e, "background checkpoint failed; will retry");
                }
            }
        }
    }
}

impl Drop for Checkpointer {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}
