//! Failed logins slow down: a pure table of consecutive failures per key (a device, a
//! source address) with a growing wait before the next attempt that needs a password
//! check. No I/O and no clock: the caller passes the time.
//!
//! After the n-th consecutive failure a key waits `base × 2^(n-1)`, at most `max`; a
//! success clears the key, and a key quiet for `forget` starts again from zero. While a
//! check of a key runs ([`Throttle::begin`]), the key waits too: concurrent attempts
//! cannot all slip in before the first failure is known. The table
//! holds at most `max_keys` keys: when full, keys whose wait has passed are forgotten
//! first, then the least recently failed one (so a flood of addresses costs bounded
//! memory; the per-device keys still hold).

use std::collections::HashMap;
use std::hash::Hash;

#[derive(Debug, Clone, Copy)]
pub(crate) struct Policy {
    pub base_ms: i64,
    pub max_ms: i64,
    pub forget_ms: i64,
    pub max_keys: usize,
}

#[derive(Debug, Clone, Copy)]
struct Entry {
    failures: u32,
    until_ms: i64,
    last_ms: i64,
    /// A check of this key is running.
    checking: bool,
}

#[derive(Debug)]
pub(crate) struct Throttle<K> {
    policy: Policy,
    entries: HashMap<K, Entry>,
}

impl<K: Hash + Eq + Clone> Throttle<K> {
    pub fn new(policy: Policy) -> Self {
        Throttle {
            policy,
            entries: HashMap::new(),
        }
    }

    /// Milliseconds `key` must still wait (0: an attempt may be checked now).
    pub fn wait_ms(&self, key: &K, now_ms: i64) -> i64 {
        self.entries.get(key).map_or(0, |e| {
            let wait = (e.until_ms - now_ms).max(0);
            if e.checking {
                wait.max(self.policy.base_ms)
            } else {
                wait
            }
        })
    }

    /// A check of `key` starts: until [`Throttle::fail`] or [`Throttle::succeed`], the
    /// key waits.
    pub fn begin(&mut self, key: &K, now_ms: i64) {
        if let Some(e) = self.entries.get_mut(key) {
            e.checking = true;
            return;
        }
        if self.entries.len() >= self.policy.max_keys {
            self.make_room(now_ms);
        }
        self.entries.insert(
            key.clone(),
            Entry {
                failures: 0,
                until_ms: now_ms,
                last_ms: now_ms,
                checking: true,
            },
        );
    }

    /// Record a failed attempt; returns the wait it imposes on the key.
    pub fn fail(&mut self, key: &K, now_ms: i64) -> i64 {
        let forget = self.policy.forget_ms;
        let failures = match self.entries.get(key) {
            Some(e) if now_ms - e.last_ms < forget => e.failures.saturating_add(1),
            _ => 1,
        };
        let wait = self.delay(failures);
        if !self.entries.contains_key(key) && self.entries.len() >= self.policy.max_keys {
            self.make_room(now_ms);
        }
        self.entries.insert(
            key.clone(),
            Entry {
                failures,
                until_ms: now_ms + wait,
                last_ms: now_ms,
                checking: false,
            },
        );
        wait
    }

    /// A check that began ended without a verdict: the key keeps its failures.
    pub fn abandon(&mut self, key: &K) {
        if let Some(e) = self.entries.get_mut(key) {
            e.checking = false;
            if e.failures == 0 {
                self.entries.remove(key);
            }
        }
    }

    /// A successful login clears the key.
    pub fn succeed(&mut self, key: &K) {
        self.entries.remove(key);
    }

    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    fn delay(&self, failures: u32) -> i64 {
        let doublings = failures.saturating_sub(1).min(40);
        self.policy
            .base_ms
            .saturating_mul(1i64 << doublings)
            .min(self.policy.max_ms)
    }

    fn make_room(&mut self, now_ms: i64) {
        let forget = self.policy.forget_ms;
        self.entries
            .retain(|_, e| e.checking || (e.until_ms > now_ms && now_ms - e.last_ms < forget));
        if self.entries.len() >= self.policy.max_keys {
            if let Some(oldest) = self
                .entries
                .iter()
                .min_by_key(|(_, e)| e.last_ms)
                .map(|(k, _)| k.clone())
            {
                self.entries.remove(&oldest);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const POLICY: Policy = Policy {
        base_ms: 100,
        max_ms: 30_000,
        forget_ms: 600_000,
        max_keys: 4,
    };

    #[test]
    fn waits_double_up_to_the_cap() {
        let mut t = Throttle::new(POLICY);
        assert_eq!(t.wait_ms(&"k1", 0), 0);
        let waits: Vec<i64> = (0..12).map(|i| t.fail(&"k1", i)).collect();
        assert_eq!(
            waits,
            [100, 200, 400, 800, 1600, 3200, 6400, 12_800, 25_600, 30_000, 30_000, 30_000]
        );
        assert_eq!(t.wait_ms(&"k1", 11), 30_000);
        assert_eq!(t.wait_ms(&"k1", 30_011), 0);
        assert_eq!(t.wait_ms(&"k2", 11), 0);
        t.succeed(&"k1");
        assert_eq!(t.fail(&"k1", 20), 100);
    }

    #[test]
    fn a_running_check_holds_the_key() {
        let mut t = Throttle::new(POLICY);
        t.begin(&"k", 0);
        assert_eq!(t.wait_ms(&"k", 0), 100);
        assert_eq!(t.wait_ms(&"k", 5_000), 100, "for as long as it runs");
        t.succeed(&"k");
        assert_eq!(t.wait_ms(&"k", 5_000), 0);
        t.begin(&"k", 6_000);
        assert_eq!(t.fail(&"k", 6_050), 100);
        assert_eq!(t.wait_ms(&"k", 6_100), 50);
        assert_eq!(t.wait_ms(&"k", 6_150), 0);
    }

    #[test]
    fn a_quiet_key_starts_again() {
        let mut t = Throttle::new(POLICY);
        for i in 0..5 {
            t.fail(&1, i);
        }
        assert_eq!(t.fail(&1, 700_000), 100);
    }

    #[test]
    fn the_table_is_bounded() {
        let mut t = Throttle::new(POLICY);
        for k in 0..1000 {
            t.fail(&k, k);
            assert!(t.len() <= POLICY.max_keys);
        }
        // The most recent keys are kept.
        assert!(t.wait_ms(&999, 999) > 0);
    }

    proptest! {
        #[test]
        fn wait_never_exceeds_the_cap(ops in proptest::collection::vec((0u8..8, 0i64..100_000, any::<bool>()), 0..200)) {
            let mut t = Throttle::new(POLICY);
            let mut now = 0;
            for (key, step, ok) in ops {
                now += step;
                if ok { t.succeed(&key) } else {
                    let w = t.fail(&key, now);
                    prop_assert!((100..=30_000).contains(&w));
                }
                prop_assert!(t.wait_ms(&key, now) <= 30_000);
                prop_assert!(t.len() <= POLICY.max_keys);
            }
        }
    }
}
