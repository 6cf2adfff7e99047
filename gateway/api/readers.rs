//! The API's SQLite readers: at most `api.readers` read-only connections, opened when first
//! needed and then kept and shared by every request, each used on the blocking pool.
//!
//! Why kept: a connection closed while the writer holds its lock on the database does not
//! give its file descriptors back (SQLite's unix VFS parks them until the process holds no
//! lock on the file, which with a writer open is never), so one connection per request
//! left a descriptor per request of the largest burst open for good. With a fixed set of
//! connections the count stays at `readers` x 3 (database, WAL, shared memory).
//!
//! A request waits at most `api.reader_wait_ms` for a free reader, then gets a 503. The
//! permit travels with the blocking read, so a request whose client went away still holds
//! its reader until its query ends: never more than `readers` queries run at once.

use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use rusqlite::Connection;
use tokio::sync::Semaphore;

/// Why a read did not happen.
#[derive(Debug)]
pub(crate) enum ReadError {
    /// No reader came free within the wait.
    Busy,
    /// The database could not be opened or the query failed.
    Failed(String),
}

pub(crate) struct Readers {
    path: PathBuf,
    idle: Mutex<Vec<Connection>>,
    permits: Arc<Semaphore>,
    wait: Duration,
    /// Connections open now (at most the pool's size).
    open: AtomicUsize,
}

impl Readers {
    pub(crate) fn new(path: PathBuf, size: usize, wait: Duration) -> Readers {
        Readers {
            path,
            idle: Mutex::new(Vec::with_capacity(size)),
            permits: Arc::new(Semaphore::new(size)),
            wait,
            open: AtomicUsize::new(0),
        }
    }

    /// Read-only connections open now.
    pub(crate) fn open(&self) -> usize {
        self.open.load(Ordering::Relaxed)
    }

    /// Run `f` on a pooled connection on the blocking pool, after waiting at most the
    /// configured time for one.
    pub(crate) async fn read<T: Send + 'static>(
        self: &Arc<Self>,
        f: impl FnOnce(&Connection) -> rusqlite::Result<T> + Send + 'static,
    ) -> Result<T, ReadError> {
        let permit =
            match tokio::time::timeout(self.wait, self.permits.clone().acquire_owned()).await {
                Ok(Ok(permit)) => permit,
                Ok(Err(_closed)) => return Err(ReadError::Busy),
                Err(_elapsed) => return Err(ReadError::Busy),
            };
        let this = self.clone();
        tokio::task::spawn_blocking(move || {
            let _permit = permit;
            let conn = this.take()?;
            let result = f(&conn).map_err(|e| ReadError::Failed(e.to_string()));
            this.idle
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .push(conn);
            result
        })
        .await
        .unwrap_or_else(|e| Err(ReadError::Failed(format!("read task failed: {e}"))))
    }

    /// An idle connection, or a new one (the permit guarantees there is room for it).
    fn take(&self) -> Result<Connection, ReadError> {
        let idle = self
            .idle
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .pop();
        if let Some(conn) = idle {
            return Ok(conn);
        }
        let conn = crate::buffer::open_read_only(&self.path)
            .map_err(|e| ReadError::Failed(e.to_string()))?;
        self.open.fetch_add(1, Ordering::Relaxed);
        Ok(conn)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn database() -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("r.sqlite");
        let c = Connection::open(&path).unwrap();
        c.execute_batch(
            "PRAGMA journal_mode = wal; CREATE TABLE t (x INTEGER); INSERT INTO t VALUES (7);",
        )
        .unwrap();
        (dir, path)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn connections_are_bounded_and_reused() {
        let (_dir, path) = database();
        let readers = Arc::new(Readers::new(path, 2, Duration::from_secs(5)));
        let mut tasks = Vec::new();
        for _ in 0..50 {
            let r = readers.clone();
            tasks.push(tokio::spawn(async move {
                r.read(|c| {
                    std::thread::sleep(Duration::from_millis(2));
                    c.query_row("SELECT x FROM t", [], |row| row.get::<_, i64>(0))
                })
                .await
            }));
        }
        for t in tasks {
            assert_eq!(t.await.unwrap().unwrap(), 7);
        }
        assert_eq!(readers.open(), 2);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_request_waits_at_most_the_wait() {
        let (_dir, path) = database();
        let readers = Arc::new(Readers::new(path, 1, Duration::from_millis(100)));
        let (hold_tx, hold_rx) = std::sync::mpsc::channel::<()>();
        let (started_tx, started_rx) = tokio::sync::oneshot::channel();
        let r = readers.clone();
        let holder = tokio::spawn(async move {
            r.read(move |_| {
                let _ = started_tx.send(());
                let _ = hold_rx.recv_timeout(Duration::from_secs(10));
                Ok(())
            })
            .await
        });
        started_rx.await.unwrap();
        let t = std::time::Instant::now();
        let waited = readers.read(|_| Ok(())).await;
        assert!(matches!(waited, Err(ReadError::Busy)), "{waited:?}");
        assert!(t.elapsed() >= Duration::from_millis(100));
        assert!(t.elapsed() < Duration::from_secs(5));
        hold_tx.send(()).unwrap();
        holder.await.unwrap().unwrap();
        assert!(readers.read(|_| Ok(())).await.is_ok());
        assert_eq!(readers.open(), 1);
    }
}
