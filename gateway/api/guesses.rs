//! Wrong tokens by source address: an address that presents [`MAX_FAILURES`] wrong tokens
//! (a bearer token or the login form's) within [`WINDOW_MS`] is refused with 429 for
//! [`BLOCK_MS`] whatever it presents, so guessing the API token from one address runs at
//! a few guesses a minute, not at HTTP speed. The refusal is immediate: it holds no
//! request slot and no connection longer than any other answer.
//!
//! Sans-IO: the server asks [`Guesses::blocked`] before routing a request that presents a
//! token and tells [`Guesses::failed`] when the token was wrong (a bearer token that is
//! not the API's, whatever the answer, or a 401 from the login form). Times are the
//! server's monotonic milliseconds. IPv6 addresses count by
//! their /64 (one host can hold a whole /64). Bounded: at most [`MAX_ADDRESSES`] addresses
//! are tracked; when full, entries past their window go first, then the unblocked one
//! whose last failure is oldest.

use std::collections::HashMap;
use std::net::IpAddr;

/// Wrong tokens an address may present within [`WINDOW_MS`].
pub(crate) const MAX_FAILURES: u32 = 10;
/// The window the failures are counted in.
pub(crate) const WINDOW_MS: i64 = 60_000;
/// How long an address that reached [`MAX_FAILURES`] is refused.
pub(crate) const BLOCK_MS: i64 = 60_000;
/// Addresses tracked at once.
pub(crate) const MAX_ADDRESSES: usize = 1024;

#[derive(Debug, Clone, Copy)]
struct Entry {
    /// Failures since `since_ms`.
    failures: u32,
    since_ms: i64,
    last_ms: i64,
    blocked_until_ms: i64,
}

#[derive(Debug, Default)]
pub(crate) struct Guesses {
    by_source: HashMap<Source, Entry>,
}

/// An IPv4 address, or an IPv6 address's /64.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct Source(u128);

impl From<IpAddr> for Source {
    fn from(ip: IpAddr) -> Source {
        match ip {
            IpAddr::V4(v4) => Source(u128::from(u32::from(v4))),
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => Source(u128::from(u32::from(v4))),
                None => Source((u128::from(v6) >> 64 << 64) | 1 << 32),
            },
        }
    }
}

impl Guesses {
    /// Whether `ip` is refused now; if so, for how many more seconds (at least 1).
    pub(crate) fn blocked(&self, ip: IpAddr, now_ms: i64) -> Option<u64> {
        let e = self.by_source.get(&Source::from(ip))?;
        (e.blocked_until_ms > now_ms).then(|| ((e.blocked_until_ms - now_ms + 999) / 1000) as u64)
    }

    /// `ip` presented a wrong token. Returns true when this failure blocks it.
    pub(crate) fn failed(&mut self, ip: IpAddr, now_ms: i64) -> bool {
        let source = Source::from(ip);
        if !self.by_source.contains_key(&source) && self.by_source.len() >= MAX_ADDRESSES {
            self.forget_one(now_ms);
        }
        let e = self.by_source.entry(source).or_insert(Entry {
            failures: 0,
            since_ms: now_ms,
            last_ms: now_ms,
            blocked_until_ms: i64::MIN,
        });
        if now_ms - e.since_ms >= WINDOW_MS {
            e.failures = 0;
            e.since_ms = now_ms;
        }
        e.failures += 1;
        e.last_ms = now_ms;
        if e.failures >= MAX_FAILURES && e.blocked_until_ms <= now_ms {
            e.blocked_until_ms = now_ms + BLOCK_MS;
            e.failures = 0;
            e.since_ms = now_ms;
            return true;
        }
        false
    }

    /// Room for one more: entries neither blocked nor in a window go first, then the
    /// unblocked one whose last failure is oldest (a blocked one only when all are).
    fn forget_one(&mut self, now_ms: i64) {
        self.by_source
            .retain(|_, e| e.blocked_until_ms > now_ms || now_ms - e.since_ms < WINDOW_MS);
        if self.by_source.len() < MAX_ADDRESSES {
            return;
        }
        if let Some(oldest) = self
            .by_source
            .iter()
            .min_by_key(|(_, e)| (e.blocked_until_ms > now_ms, e.last_ms))
            .map(|(s, _)| *s)
        {
            self.by_source.remove(&oldest);
        }
    }

    #[cfg(test)]
    fn tracked(&self) -> usize {
        self.by_source.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{Ipv4Addr, Ipv6Addr};

    const A: IpAddr = IpAddr::V4(Ipv4Addr::new(192, 168, 1, 7));
    const B: IpAddr = IpAddr::V4(Ipv4Addr::new(192, 168, 1, 8));

    #[test]
    fn the_tenth_wrong_token_in_a_minute_blocks_the_address_for_a_minute() {
        let mut g = Guesses::default();
        for i in 0..MAX_FAILURES - 1 {
            assert!(!g.failed(A, 1_000 + i64::from(i)));
            assert_eq!(g.blocked(A, 1_000 + i64::from(i)), None);
        }
        assert!(g.failed(A, 2_000));
        assert_eq!(g.blocked(A, 2_000), Some(60));
        assert_eq!(g.blocked(A, 61_500), Some(1));
        assert_eq!(g.blocked(A, 62_000), None, "over after BLOCK_MS");
        assert_eq!(g.blocked(B, 2_000), None, "other addresses are not touched");
    }

    #[test]
    fn failures_spread_over_more_than_a_window_never_block() {
        let mut g = Guesses::default();
        for i in 0..100 {
            // Nine a minute.
            assert!(!g.failed(A, i * WINDOW_MS / 9 + 1));
        }
        assert_eq!(g.blocked(A, 100 * WINDOW_MS / 9), None);
    }

    #[test]
    fn an_ipv6_host_counts_by_its_64() {
        let mut g = Guesses::default();
        for i in 0..MAX_FAILURES {
            let ip = IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0, 1, 0, 0, 0, i as u16 + 1));
            g.failed(ip, 1_000);
        }
        let other_host = IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0, 1, 9, 9, 9, 9));
        assert!(g.blocked(other_host, 1_000).is_some());
        let other_net = IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0, 2, 0, 0, 0, 1));
        assert_eq!(g.blocked(other_net, 1_000), None);
        let mapped = IpAddr::V6(Ipv4Addr::new(192, 168, 1, 7).to_ipv6_mapped());
        for _ in 0..MAX_FAILURES {
            g.failed(mapped, 1_000);
        }
        assert!(
            g.blocked(A, 1_000).is_some(),
            "a v4-mapped address is its v4"
        );
    }

    #[test]
    fn the_table_is_bounded_and_keeps_blocked_addresses() {
        let mut g = Guesses::default();
        for _ in 0..MAX_FAILURES {
            g.failed(A, 0);
        }
        for i in 0..(MAX_ADDRESSES as u32 * 3) {
            let ip = IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + i));
            g.failed(ip, 1 + i64::from(i));
            assert!(g.tracked() <= MAX_ADDRESSES);
        }
        assert!(
            g.blocked(A, 5_000).is_some(),
            "the oldest failure, but blocked"
        );
    }
}
