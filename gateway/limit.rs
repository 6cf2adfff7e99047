//! Token buckets for per-device rate limits (a profile's `rate_limit`). Pure: the caller
//! passes the time.
//!
//! A bucket holds up to `capacity` tokens and gains `rate` per second; a message takes one
//! token from the message bucket and its payload's bytes from the byte bucket, from both or
//! from neither. A payload larger than the byte bucket costs the whole bucket (the profile
//! check keeps every message a profile accepts within it), so no message waits forever.

use std::time::Instant;

/// One bucket: `tokens` as of `at`.
#[derive(Debug, Clone)]
struct Bucket {
    rate: f64,
    capacity: f64,
    tokens: f64,
    at: Instant,
}

/// Rounding slack: after `1/rate` seconds a token is there, whatever the float error.
const EPSILON: f64 = 1e-9;

impl Bucket {
    fn full((rate, capacity): (f64, f64), now: Instant) -> Bucket {
        Bucket {
            rate,
            capacity,
            tokens: capacity,
            at: now,
        }
    }

    fn refill(&mut self, now: Instant) {
        // `Instant` never goes back, but a caller's `now` may be older than the last one.
        if now > self.at {
            let gained = now.duration_since(self.at).as_secs_f64() * self.rate;
            self.tokens = (self.tokens + gained).min(self.capacity);
            self.at = now;
        }
    }

    fn cost(&self, n: f64) -> f64 {
        n.min(self.capacity)
    }

    fn has(&self, n: f64) -> bool {
        self.tokens + EPSILON >= self.cost(n)
    }

    fn take(&mut self, n: f64) {
        self.tokens = (self.tokens - self.cost(n)).max(0.0);
    }
}

/// One device's buckets: messages and/or payload bytes per second.
#[derive(Debug, Clone)]
pub struct DeviceLimiter {
    messages: Option<Bucket>,
    bytes: Option<Bucket>,
}

impl DeviceLimiter {
    /// Full buckets: `messages` and `bytes` are (rate per second, bucket size).
    pub fn new(
        messages: Option<(f64, f64)>,
        bytes: Option<(f64, f64)>,
        now: Instant,
    ) -> DeviceLimiter {
        DeviceLimiter {
            messages: messages.map(|m| Bucket::full(m, now)),
            bytes: bytes.map(|b| Bucket::full(b, now)),
        }
    }

    /// Whether a message of `payload_bytes` may pass now; if so it is paid for.
    pub fn try_take(&mut self, payload_bytes: usize, now: Instant) -> bool {
        let size = payload_bytes as f64;
        for b in [&mut self.messages, &mut self.bytes].into_iter().flatten() {
            b.refill(now);
        }
        let room = self.messages.as_ref().is_none_or(|b| b.has(1.0))
            && self.bytes.as_ref().is_none_or(|b| b.has(size));
        if room {
            if let Some(b) = &mut self.messages {
                b.take(1.0);
            }
            if let Some(b) = &mut self.bytes {
                b.take(size);
            }
        }
        room
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};
    use std::time::Duration;

    #[test]
    fn a_full_bucket_then_its_rate() {
        let t0 = Instant::now();
        let mut l = DeviceLimiter::new(Some((2.0, 5.0)), None, t0);
        let passed = (0..100).filter(|_| l.try_take(10, t0)).count();
        assert_eq!(passed, 5, "the burst");
        assert!(!l.try_take(10, t0 + Duration::from_millis(499)));
        assert!(
            l.try_take(10, t0 + Duration::from_millis(500)),
            "one every 0.5 s"
        );
        assert!(!l.try_take(10, t0 + Duration::from_millis(500)));
        // A long pause refills no more than the bucket holds.
        let later = t0 + Duration::from_secs(3600);
        assert_eq!((0..100).filter(|_| l.try_take(10, later)).count(), 5);
    }

    #[test]
    fn both_buckets_or_neither() {
        let t0 = Instant::now();
        let mut l = DeviceLimiter::new(Some((1.0, 10.0)), Some((100.0, 1000.0)), t0);
        assert!(l.try_take(600, t0));
        // 400 bytes left: a 500-byte message is refused and takes no message token.
        assert!(!l.try_take(500, t0));
        for _ in 0..9 {
            assert!(l.try_take(40, t0));
        }
        assert!(
            !l.try_take(0, t0),
            "ten messages: the message bucket is empty"
        );
        // Larger than the byte bucket: costs all of it, passes when it is full.
        let mut l = DeviceLimiter::new(None, Some((100.0, 1000.0)), t0);
        assert!(l.try_take(5000, t0));
        assert!(!l.try_take(1, t0));
        assert!(l.try_take(5000, t0 + Duration::from_secs(10)));
    }

    #[test]
    fn time_going_back_changes_nothing() {
        let t0 = Instant::now() + Duration::from_secs(10);
        let mut l = DeviceLimiter::new(Some((1.0, 1.0)), None, t0);
        assert!(l.try_take(1, t0));
        assert!(!l.try_take(1, t0 - Duration::from_secs(5)));
        assert!(l.try_take(1, t0 + Duration::from_secs(1)));
    }

    /// Random arrivals: over any run, what passed is at most the burst plus the rate times
    /// the time elapsed, at least that much when the device sends more than it may (for
    /// whole tokens), and a refused message never leaves the bucket poorer.
    #[test]
    fn never_more_than_burst_plus_rate_times_time() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(6);
        for _ in 0..500 {
            let rate = rng.gen_range(0.5..200.0);
            let burst = rng.gen_range(1..50) as f64;
            let t0 = Instant::now();
            let mut l = DeviceLimiter::new(Some((rate, burst)), None, t0);
            let mut now = t0;
            let mut passed = 0u64;
            for _ in 0..rng.gen_range(1..2000) {
                now += Duration::from_micros(rng.gen_range(0..20_000));
                if l.try_take(1, now) {
                    passed += 1;
                }
                let elapsed = now.duration_since(t0).as_secs_f64();
                let most = burst + rate * elapsed;
                assert!(passed as f64 <= most + 1e-6, "{passed} > {most}");
            }
            // Flooding from here on: exactly the whole tokens there are pass, then none.
            let there = l.messages.as_ref().unwrap().tokens;
            let flood = (0..100).filter(|_| l.try_take(1, now)).count();
            assert_eq!(flood as f64, (there + EPSILON).floor().min(100.0));
        }
    }
}
