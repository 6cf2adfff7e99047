//! Commit receipts: how a device connection learns that its messages are on disk.
//!
//! A device is acknowledged (PUBACK, PUBREC) only for what is durable. Each connection owns
//! one [`Receipts`]; every message intake queues for it carries a [`Receipt`] numbered
//! 1, 2, 3... in the order the connection queued them. The writer, after the transaction
//! holding a batch commits, advances each connection's `committed` to the highest number
//! of that connection in the batch and wakes it once. Since one connection's messages
//! reach the writer's queue in the order it sent them, `committed = n` means all its
//! messages up to `n` are committed: the connection then writes every acknowledgement
//! that waited for a number up to `n`, a whole batch's together.
//!
//! A batch that never commits (the writer gives it up at a stop after failing commits)
//! never advances the numbers: its messages are never acknowledged, and the devices send
//! them again.
//!
//! The distance between `issued` and `committed` is the connection's uncommitted window:
//! a connection stops reading its socket when it reaches [`WINDOW`], so one flooding
//! device cannot fill the writer's queue ahead of the others (QoS 0 messages included).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use tokio::sync::Notify;

/// Messages one connection may have queued for the writer and not yet committed.
pub const WINDOW: u64 = 256;

/// One connection's numbering of its queued messages and how far they are committed.
#[derive(Debug, Default)]
pub struct Receipts {
    issued: AtomicU64,
    committed: AtomicU64,
    changed: Notify,
}

/// The place of one queued message in its connection's numbering.
#[derive(Debug)]
pub struct Receipt {
    of: Arc<Receipts>,
    n: u64,
}

impl Receipts {
    pub fn new() -> Arc<Receipts> {
        Arc::new(Receipts::default())
    }

    /// The next number, for a message about to be queued (by the connection's own task:
    /// numbers are queued in the order they are issued).
    pub fn issue(self: &Arc<Self>) -> Receipt {
        let n = self.issued.fetch_add(1, Ordering::Relaxed) + 1;
        Receipt {
            of: self.clone(),
            n,
        }
    }

    /// The highest number issued.
    pub fn issued(&self) -> u64 {
        self.issued.load(Ordering::Relaxed)
    }

    /// Every message numbered up to this is committed.
    pub fn committed(&self) -> u64 {
        self.committed.load(Ordering::Acquire)
    }

    /// Messages queued and not yet committed.
    pub fn uncommitted(&self) -> u64 {
        self.issued().saturating_sub(self.committed())
    }

    /// Resolves after the next advance of [`Receipts::committed`] (or at once if one
    /// happened since the last wait: a wake-up is never lost).
    pub async fn advanced(&self) {
        self.changed.notified().await
    }
}

impl Receipt {
    pub fn number(&self) -> u64 {
        self.n
    }
}

/// After a commit: advance every connection in `receipts` to its highest number there,
/// waking each once (a batch interleaves many connections; one wake per connection, not
/// per message, keeps the cost of acknowledging after the commit small).
pub fn settle(receipts: impl IntoIterator<Item = Receipt>) {
    let mut highest: foldhash::HashMap<*const Receipts, Receipt> = Default::default();
    for r in receipts {
        match highest.entry(Arc::as_ptr(&r.of)) {
            std::collections::hash_map::Entry::Occupied(mut e) => {
                let l = e.get_mut();
                l.n = l.n.max(r.n);
            }
            std::collections::hash_map::Entry::Vacant(e) => {
                e.insert(r);
            }
        }
    }
    for (_, r) in highest {
        r.settle();
    }
}

impl Receipt {
    fn settle(self) {
        self.of.committed.fetch_max(self.n, Ordering::AcqRel);
        self.of.changed.notify_one();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_commit_advances_each_connection_to_its_highest_number() {
        let (a, b) = (Receipts::new(), Receipts::new());
        let batch = vec![a.issue(), a.issue(), b.issue(), a.issue()];
        let pending = b.issue();
        assert_eq!((a.uncommitted(), b.uncommitted()), (3, 2));
        settle(batch);
        assert_eq!((a.committed(), b.committed()), (3, 1));
        assert_eq!(b.uncommitted(), 1);
        settle([pending]);
        assert_eq!(b.committed(), 2);
    }

    #[tokio::test]
    async fn an_advance_before_the_wait_is_not_lost() {
        let a = Receipts::new();
        settle([a.issue()]);
        tokio::time::timeout(std::time::Duration::from_secs(5), a.advanced())
            .await
            .expect("the wake-up was kept");
    }
}
