//! A profile's optional per-device rate limit (`"rate_limit"`): how many messages and
//! payload bytes each device of the profile may send per second. Intake enforces it
//! (`crate::limit`); this is the contract and its checks.

use serde::Deserialize;

use super::profile::ProfileProblem;

/// The largest rate or burst accepted (a typo such as `1e30` is refused, not obeyed).
const MAX_RATE: f64 = 1e9;

/// `"rate_limit": {"messages_per_s": 50, "bytes_per_s": 65536}`: for each device of the
/// profile on its own. A message passes when both buckets have room, and then takes from
/// both; beyond them it is refused as `rate_limited`.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimit {
    /// Messages per second, sustained (fractions allowed: 0.5 is one every 2 s).
    #[serde(default)]
    pub messages_per_s: Option<f64>,
    /// Payload bytes per second, sustained.
    #[serde(default)]
    pub bytes_per_s: Option<f64>,
    /// Messages that may come at once after a quiet spell: the bucket's size. Default one
    /// second's worth (at least 1).
    #[serde(default)]
    pub burst_messages: Option<u64>,
    /// Payload bytes that may come at once. Default one second's worth. Must hold the
    /// profile's largest message.
    #[serde(default)]
    pub burst_bytes: Option<u64>,
}

impl RateLimit {
    /// (rate per second, bucket size) of the message bucket, if limited.
    pub fn messages(&self) -> Option<(f64, f64)> {
        let rate = self.messages_per_s?;
        let burst = self
            .burst_messages
            .map_or(rate.ceil().max(1.0), |b| b as f64);
        Some((rate, burst))
    }

    /// (rate per second, bucket size) of the byte bucket, if limited.
    pub fn bytes(&self) -> Option<(f64, f64)> {
        let rate = self.bytes_per_s?;
        Some((rate, self.burst_bytes.map_or(rate.ceil(), |b| b as f64)))
    }

    /// `largest`: the profile's largest `max_bytes`, which must fit in the byte burst.
    pub fn check(&self, largest: usize, problems: &mut Vec<ProfileProblem>) {
        let mut bad = |key: &str, message: String| {
            problems.push(ProfileProblem {
                path: format!("rate_limit.{key}"),
                message,
            })
        };
        if self.messages_per_s.is_none() && self.bytes_per_s.is_none() {
            bad(
                "messages_per_s",
                "a rate limit needs `messages_per_s`, `bytes_per_s` or both".into(),
            );
        }
        for (key, v) in [
            ("messages_per_s", self.messages_per_s),
            ("bytes_per_s", self.bytes_per_s),
        ] {
            if let Some(v) = v {
                if !(v > 0.0 && v <= MAX_RATE) {
                    bad(key, format!("must be more than 0 and at most {MAX_RATE:e}"));
                }
            }
        }
        for (key, burst, rate) in [
            ("burst_messages", self.burst_messages, self.messages_per_s),
            ("burst_bytes", self.burst_bytes, self.bytes_per_s),
        ] {
            if let Some(b) = burst {
                if rate.is_none() {
                    let of = key.trim_start_matches("burst_");
                    bad(key, format!("needs `{of}_per_s`"));
                } else if b == 0 || b as f64 > MAX_RATE {
                    bad(key, format!("must be between 1 and {MAX_RATE:e}"));
                }
            }
        }
        if let Some((_, size)) = self.bytes() {
            if size < largest as f64 {
                let key = if self.burst_bytes.is_some() {
                    "burst_bytes"
                } else {
                    "bytes_per_s"
                };
                bad(
                    key,
                    format!(
                        "the byte burst ({size} B) must hold the profile's largest message \
                         ({largest} B, its `max_bytes`); raise it or set `burst_bytes`"
                    ),
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(json: &str) -> RateLimit {
        serde_json::from_str(json).unwrap()
    }

    fn problems(json: &str, largest: usize) -> Vec<String> {
        let mut p = Vec::new();
        parse(json).check(largest, &mut p);
        p.into_iter()
            .map(|p| format!("{}: {}", p.path, p.message))
            .collect()
    }

    #[test]
    fn bursts_default_to_one_second() {
        let l = parse(r#"{"messages_per_s": 50, "bytes_per_s": 65536}"#);
        assert_eq!(l.messages(), Some((50.0, 50.0)));
        assert_eq!(l.bytes(), Some((65536.0, 65536.0)));
        let l = parse(r#"{"messages_per_s": 0.5}"#);
        assert_eq!(l.messages(), Some((0.5, 1.0)), "at least one message");
        assert_eq!(l.bytes(), None);
        let l = parse(r#"{"messages_per_s": 2, "burst_messages": 40}"#);
        assert_eq!(l.messages(), Some((2.0, 40.0)));
        assert!(problems(r#"{"messages_per_s": 2, "burst_messages": 40}"#, 512).is_empty());
    }

    #[test]
    fn a_profile_checks_its_limit_against_its_largest_message() {
        let profile = |limit: &str| {
            super::super::Profile::from_json(&format!(
                r#"{{"name":"x","description":"","telemetry":{{"max_bytes":100}},
                    "events":{{"max_bytes":2048}},"rate_limit":{limit}}}"#
            ))
            .unwrap()
        };
        let p = profile(r#"{"messages_per_s": 5, "bytes_per_s": 1024}"#);
        let paths: Vec<String> = p.check().into_iter().map(|p| p.path).collect();
        assert_eq!(paths, ["rate_limit.bytes_per_s"]);
        let p = profile(r#"{"messages_per_s": 5, "bytes_per_s": 1024, "burst_bytes": 2048}"#);
        assert_eq!(p.check(), []);
        assert_eq!(p.rate_limit.unwrap().bytes(), Some((1024.0, 2048.0)));
    }

    #[test]
    fn nonsense_is_refused() {
        assert_eq!(
            problems("{}", 100),
            ["rate_limit.messages_per_s: a rate limit needs `messages_per_s`, `bytes_per_s` or both"]
        );
        assert_eq!(problems(r#"{"messages_per_s": 0}"#, 100).len(), 1);
        assert_eq!(problems(r#"{"messages_per_s": -1}"#, 100).len(), 1);
        assert_eq!(problems(r#"{"bytes_per_s": 1e30}"#, 100).len(), 1);
        assert_eq!(
            problems(r#"{"messages_per_s": 5, "burst_bytes": 4096}"#, 100),
            ["rate_limit.burst_bytes: needs `bytes_per_s`"]
        );
        assert_eq!(
            problems(r#"{"messages_per_s": 5, "burst_messages": 0}"#, 100).len(),
            1
        );
        let small = problems(r#"{"bytes_per_s": 1000}"#, 4096);
        assert_eq!(small.len(), 1);
        assert!(
            small[0].starts_with("rate_limit.bytes_per_s: the byte burst (1000 B)"),
            "{small:?}"
        );
        assert!(problems(r#"{"bytes_per_s": 1000, "burst_bytes": 4096}"#, 4096).is_empty());
        let typo = serde_json::from_str::<RateLimit>(r#"{"messages_per_sec": 5}"#).unwrap_err();
        assert!(
            typo.to_string()
                .contains("unknown field `messages_per_sec`"),
            "{typo}"
        );
    }
}
