//! "Once per burst" logging: the first occurrence of a key is reported at once, later ones
//! are counted and reported together at most once per window. Pure: the caller passes time.

use std::collections::HashMap;
use std::hash::Hash;

#[derive(Debug)]
pub struct BurstLimiter<K> {
    window_ms: i64,
    max_keys: usize,
    entries: HashMap<K, Entry>,
}

#[derive(Debug, Clone, Copy)]
struct Entry {
    last_report_ms: i64,
    suppressed: u64,
}

impl<K: Hash + Eq + Clone> BurstLimiter<K> {
    /// `max_keys` bounds memory: past it, the map is cleared (keys are then reported afresh).
    pub fn new(window_ms: i64, max_keys: usize) -> Self {
        BurstLimiter {
            window_ms,
            max_keys,
            entries: HashMap::new(),
        }
    }

    /// Returns `Some(n)` when this occurrence should be logged, `n` being how many
    /// occurrences of the key were suppressed since the last report; `None` to stay quiet.
    pub fn hit(&mut self, key: &K, now_ms: i64) -> Option<u64> {
        if let Some(e) = self.entries.get_mut(key) {
            if now_ms - e.last_report_ms >= self.window_ms {
                let n = e.suppressed;
                *e = Entry {
                    last_report_ms: now_ms,
                    suppressed: 0,
                };
                Some(n)
            } else {
                e.suppressed += 1;
                None
            }
        } else {
            if self.entries.len() >= self.max_keys {
                self.entries.clear();
            }
            self.entries.insert(
                key.clone(),
                Entry {
                    last_report_ms: now_ms,
                    suppressed: 0,
                },
            );
            Some(0)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_then_once_per_window() {
        let mut l = BurstLimiter::new(10_000, 16);
        assert_eq!(l.hit(&"a", 0), Some(0));
        for t in 1..100 {
            assert_eq!(l.hit(&"a", t), None);
        }
        assert_eq!(l.hit(&"b", 50), Some(0));
        assert_eq!(l.hit(&"a", 10_000), Some(99));
        assert_eq!(l.hit(&"a", 10_001), None);
    }

    #[test]
    fn bounded_keys() {
        let mut l = BurstLimiter::new(10_000, 2);
        assert_eq!(l.hit(&1, 0), Some(0));
        assert_eq!(l.hit(&2, 0), Some(0));
        assert_eq!(l.hit(&3, 0), Some(0));
        assert_eq!(l.hit(&1, 1), Some(0));
    }
}
