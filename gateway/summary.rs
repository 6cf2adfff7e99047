//! Summaries: the pure arithmetic of rollups. No I/O and no tokio: what a message
//! contributes ([`contributions`], from its profile's `rollups`), which local hour and day it
//! falls in ([`bucket`]), and how a batch's contributions combine ([`Pending`]) before the
//! buffer's writer folds them into SQLite in the same transaction as the messages.
//!
//! Every contribution counts for its device and for the branch (scope `""`), per hour and
//! per day in the branch's time zone. A message's time is its profile's `time_field` when
//! it has a plausible one (at most 30 days old, at most 1 hour ahead), else the receive
//! time; late messages therefore reopen past buckets, which the pull API's cursor shows.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::LazyLock;

use serde_json::Value;

use crate::config::profile::{Profile, RollupKind};
pub use crate::model::{distinct_key, Contribution, Declared, DeclaredList, RollupOp, Sample};
use crate::model::{Kind, Metric};

/// The built-in metrics' names, allocated once.
pub static MESSAGES: LazyLock<Metric> = LazyLock::new(|| Metric::new("messages"));
pub static REJECTED: LazyLock<Metric> = LazyLock::new(|| Metric::new("rejected"));
pub static OFFLINE_EPISODES: LazyLock<Metric> = LazyLock::new(|| Metric::new("offline_episodes"));
pub static ONLINE_MINUTES: LazyLock<Metric> = LazyLock::new(|| Metric::new("online_minutes"));

const MAX_PAST_MS: i64 = 30 * 86_400_000;
/// How long a bucket's distinct keys are kept after it starts. No message counts more than
/// [`MAX_PAST_MS`] back and no local day lasts more than 25 hours, so an older bucket cannot change
/// any more: its count stays, the keys behind it are not needed.
pub const DISTINCT_KEPT_MS: i64 = MAX_PAST_MS + 2 * 86_400_000;
const MAX_FUTURE_MS: i64 = 3_600_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Period {
    Hour,
    Day,
}

impl Period {
    pub fn as_str(self) -> &'static str {
        match self {
            Period::Hour => "hour",
            Period::Day => "day",
        }
    }

    pub fn parse(s: &str) -> Option<Period> {
        match s {
            "hour" => Some(Period::Hour),
            "day" => Some(Period::Day),
            _ => None,
        }
    }
}

/// Everything one accepted message (`payload` as stored, after the privacy rules) adds to
/// the summaries: the built-in `messages` count, then its profile's declared rollups.
pub fn contributions(
    profile: &Profile,
    kind: Kind,
    payload: &str,
    received_ms: i64,
) -> Vec<Contribution> {
    let fields: Option<serde_json::Map<String, Value>> = serde_json::from_str(payload).ok();
    let at_ms = rollup_time(profile, fields.as_ref(), received_ms);
    let mut all = vec![count(&MESSAGES, at_ms)];
    all.extend(
        contributions_of(profile, kind, fields.as_ref())
            .into_iter()
            .map(|d| Contribution {
                metric: d.metric(),
                op: d.op(),
                at_ms,
                value: d.value(),
            }),
    );
    all
}

/// When a message counts in the summaries: the profile's `time_field` if it holds a
/// plausible event time, else when the message arrived.
pub fn rollup_time(
    profile: &Profile,
    fields: Option<&serde_json::Map<String, Value>>,
    received_ms: i64,
) -> i64 {
    profile
        .time_field
        .as_deref()
        .and_then(|name| fields.and_then(|f| f.get(name)))
        .and_then(|v| event_time(v, received_ms))
        .unwrap_or(received_ms)
}

/// What a message adds to its profile's declared rollups (not the built-in count), from
/// the payload's top-level fields, already parsed by validation. They count at the
/// message's [`rollup_time`]. Allocates nothing for up to four rules.
pub fn contributions_of(
    profile: &Profile,
    kind: Kind,
    fields: Option<&serde_json::Map<String, Value>>,
) -> DeclaredList {
    let wanted = |k: RollupKind| match k {
        RollupKind::Telemetry => kind == Kind::Telemetry,
        RollupKind::Events => kind == Kind::Events,
    };
    let Some(fields) = fields.filter(|_| profile.rollups.iter().any(|r| wanted(r.kind))) else {
        return DeclaredList::new();
    };
    let mut out = DeclaredList::new();
    let get = |name: &str| -> Option<&Value> { fields.get(name) };
    let type_field = match kind {
        Kind::Telemetry => profile.telemetry.as_ref(),
        Kind::Events => profile.events.as_ref(),
        Kind::Status | Kind::Summary | Kind::Command => None,
    }
    .and_then(|k| k.type_field.as_deref());
    let event_type = type_field.and_then(get);
    for r in profile.rollups.iter().filter(|r| wanted(r.kind)) {
        if let Some(t) = &r.event_type {
            if event_type.and_then(Value::as_str) != Some(t.as_str()) {
                continue;
            }
        }
        if r.filter.iter().any(|(k, want)| get(k) != Some(want)) {
            continue;
        }
        let rule = r.rule();
        let sample = match (r.op, &r.field) {
            (RollupOp::Count, _) => Declared::num(rule, 1.0),
            (RollupOp::Distinct, Some(f)) => match get(f) {
                Some(Value::String(s)) => Declared::distinct(rule, distinct_key(s)),
                Some(Value::Number(n)) => Declared::distinct(rule, distinct_key(&n.to_string())),
                _ => continue,
            },
            (_, Some(f)) => match get(f).and_then(Value::as_f64) {
                Some(x) => Declared::num(rule, x * r.scale.unwrap_or(1.0)),
                None => continue,
            },
            (_, None) => continue,
        };
        out.push(sample);
    }
    out
}

/// A rollup value for JSON: whole numbers as integers, the rest to three decimals.
pub fn json_number(v: f64) -> Value {
    if v.fract() == 0.0 && v.abs() < 9e15 {
        Value::from(v as i64)
    } else {
        Value::from((v * 1000.0).round() / 1000.0)
    }
}

/// A plain count of one at `at_ms` (built-in metrics).
pub fn count(metric: &Metric, at_ms: i64) -> Contribution {
    Contribution {
        metric: *metric,
        op: RollupOp::Count,
        at_ms,
        value: Sample::Num(1.0),
    }
}

/// `online_minutes` for a connection from `since` to `until`, cut at hour boundaries so
/// each piece lands in its own hour (and day). Nothing when the start is unknown.
pub fn online_minutes(
    tz: &jiff::tz::TimeZone,
    since: Option<i64>,
    until: i64,
) -> Vec<Contribution> {
    let mut out = Vec::new();
    let Some(mut from) = since.filter(|s| *s <= until && until - s < MAX_PAST_MS) else {
        return out;
    };
    while from < until {
        let start = bucket_start(tz, from, Period::Hour);
        let end = hour_end(tz, start).min(until);
        out.push(Contribution {
            metric: *ONLINE_MINUTES,
            op: RollupOp::Sum,
            at_ms: from,
            value: Sample::Num((end - from) as f64 / 60_000.0),
        });
        from = end;
    }
    out
}

fn event_time(v: &Value, received_ms: i64) -> Option<i64> {
    let ms = match v {
        Value::String(s) => s.parse::<jiff::Timestamp>().ok()?.as_millisecond(),
        Value::Number(n) => n.as_i64()?,
        _ => return None,
    };
    (received_ms - MAX_PAST_MS..=received_ms + MAX_FUTURE_MS)
        .contains(&ms)
        .then_some(ms)
}

/// The start of the local hour or day that `ms` falls in: (Unix ms, local label such as
/// `2026-11-25T10:00` or `2026-11-25`).
pub fn bucket(tz: &jiff::tz::TimeZone, ms: i64, period: Period) -> (i64, String) {
    let Some(start) = local_start(tz, ms, period) else {
        return (ms, ms.to_string());
    };
    let label = match period {
        Period::Day => start.strftime("%Y-%m-%d").to_string(),
        Period::Hour => start.strftime("%Y-%m-%dT%H:00").to_string(),
    };
    (start.timestamp().as_millisecond(), label)
}

/// Where the local hour that starts at `start` ends: an hour later, or sooner or later
/// where a DST change of less than an hour (Lord Howe's 30 minutes) shortens or stretches it.
pub fn hour_end(tz: &jiff::tz::TimeZone, start: i64) -> i64 {
    const QUARTER: i64 = 900_000;
    // Probe forward by quarter hours from one hour on until the local hour changes: one
    // probe for ordinary hours, at most a few more for a stretched one.
    let mut probe = start + 3_600_000;
    for _ in 0..16 {
        let next = bucket_start(tz, probe, Period::Hour);
        if next > start {
            return next;
        }
        probe += QUARTER;
    }
    start + 3_600_000
}

/// [`bucket`]'s start alone (no label to format).
pub fn bucket_start(tz: &jiff::tz::TimeZone, ms: i64, period: Period) -> i64 {
    local_start(tz, ms, period).map_or(ms, |z| z.timestamp().as_millisecond())
}

fn local_start(tz: &jiff::tz::TimeZone, ms: i64, period: Period) -> Option<jiff::Zoned> {
    let z = jiff::Timestamp::from_millisecond(ms)
        .ok()?
        .to_zoned(tz.clone());
    let start = match period {
        Period::Day => z.start_of_day().ok(),
        Period::Hour => z
            .with()
            .minute(0)
            .second(0)
            .subsec_nanosecond(0)
            .build()
            .ok(),
    };
    Some(start.unwrap_or(z))
}

/// Where an aggregate lives: device (or `""` for the branch), period, bucket, metric.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Key {
    pub scope: String,
    pub period: Period,
    pub bucket_ms: i64,
    pub metric: Metric,
}

/// Combined contributions to one key.
#[derive(Debug, Clone, PartialEq)]
pub struct Agg {
    pub op: RollupOp,
    pub samples: i64,
    /// count and sum: the total; min, max: the extreme; last: the newest value.
    pub value: f64,
    /// `last`: the time of `value`.
    pub last_ms: i64,
    /// `distinct`: the keys ([`distinct_key`]) of the values seen.
    pub distinct: BTreeSet<u64>,
}

impl Agg {
    fn new(op: RollupOp) -> Agg {
        Agg {
            op,
            samples: 0,
            value: match op {
                RollupOp::Min => f64::INFINITY,
                RollupOp::Max => f64::NEG_INFINITY,
                _ => 0.0,
            },
            last_ms: i64::MIN,
            distinct: BTreeSet::new(),
        }
    }

    fn add(&mut self, at_ms: i64, value: Sample) {
        self.samples += 1;
        match (value, self.op) {
            (Sample::Distinct(k), RollupOp::Distinct) => {
                self.distinct.insert(k);
            }
            (Sample::Num(x), RollupOp::Count | RollupOp::Sum) => self.value += x,
            (Sample::Num(x), RollupOp::Min) => self.value = self.value.min(x),
            (Sample::Num(x), RollupOp::Max) => self.value = self.value.max(x),
            (Sample::Num(x), RollupOp::Last) if at_ms >= self.last_ms => {
                self.value = x;
                self.last_ms = at_ms;
            }
            _ => {}
        }
    }

    fn merge(&mut self, o: &Agg) {
        self.samples += o.samples;
        match self.op {
            RollupOp::Count | RollupOp::Sum => self.value += o.value,
            RollupOp::Min => self.value = self.value.min(o.value),
            RollupOp::Max => self.value = self.value.max(o.value),
            RollupOp::Last if o.last_ms >= self.last_ms => {
                self.value = o.value;
                self.last_ms = o.last_ms;
            }
            RollupOp::Last => {}
            RollupOp::Distinct => self.distinct.extend(o.distinct.iter().copied()),
        }
    }
}

/// Fold one sample into a (device, hour)'s metrics: a scan of a few, compared by address.
fn fold_into(
    metrics: &mut Vec<(Metric, Agg)>,
    metric: Metric,
    op: RollupOp,
    at_ms: i64,
    value: Sample,
) {
    match metrics.iter_mut().find(|(m, _)| *m == metric) {
        Some((_, agg)) => agg.add(at_ms, value),
        None => {
            let mut agg = Agg::new(op);
            agg.add(at_ms, value);
            metrics.push((metric, agg));
        }
    }
}

/// A batch's contributions, first combined per device, metric and local hour (cheap: no
/// time-zone work or allocation per message once the hour is known), then expanded to
/// the four keys each one feeds: device and branch, hour and day.
#[derive(Debug, Default)]
pub struct Pending<'a> {
    /// Keyed by (device, hour); a message's contributions (one device, nearly always one
    /// hour) cost one hash lookup, then a scan of a few metrics compared by address.
    hours: foldhash::HashMap<(&'a str, i64), Vec<(Metric, Agg)>>,
    /// The last hour found: [start, end) in Unix ms.
    hour: Option<(i64, i64)>,
}

impl<'a> Pending<'a> {
    pub fn is_empty(&self) -> bool {
        self.hours.is_empty()
    }

    pub fn add(&mut self, tz: &jiff::tz::TimeZone, device: &'a str, c: &Contribution) {
        let metrics = self.slot(tz, device, c.at_ms);
        fold_into(metrics, c.metric, c.op, c.at_ms, c.value);
    }

    /// Add one message: the built-in `messages` count and its declared contributions,
    /// all at `at_ms` (one hash lookup for all of them).
    pub fn add_message(
        &mut self,
        tz: &jiff::tz::TimeZone,
        device: &'a str,
        at_ms: i64,
        declared: &[Declared],
    ) {
        let metrics = self.slot(tz, device, at_ms);
        fold_into(metrics, *MESSAGES, RollupOp::Count, at_ms, Sample::Num(1.0));
        for d in declared {
            fold_into(metrics, d.metric(), d.op(), at_ms, d.value());
        }
    }

    /// Add contributions of one device (the writer adds them one by one or per message).
    #[cfg(test)]
    pub fn add_all(&mut self, tz: &jiff::tz::TimeZone, device: &'a str, cs: &[Contribution]) {
        for c in cs {
            self.add(tz, device, c);
        }
    }

    /// The metrics of `device` in the local hour of `at_ms`. The last hour found, with its
    /// real end ([`hour_end`]), is kept, so nearly every message costs no time-zone work.
    fn slot(
        &mut self,
        tz: &jiff::tz::TimeZone,
        device: &'a str,
        at_ms: i64,
    ) -> &mut Vec<(Metric, Agg)> {
        let start = match self.hour {
            Some((start, end)) if (start..end).contains(&at_ms) => start,
            _ => {
                let start = bucket_start(tz, at_ms, Period::Hour);
                self.hour = Some((start, hour_end(tz, start)));
                start
            }
        };
        self.hours.entry((device, start)).or_default()
    }

    /// Every (scope, period, bucket) this batch changes, with the combined value of each
    /// metric: what one row of `rollup_buckets` receives.
    pub fn expand_buckets(
        self,
        tz: &jiff::tz::TimeZone,
    ) -> foldhash::HashMap<BucketRef<'a>, PendingBucket> {
        let mut days: foldhash::HashMap<i64, i64> = Default::default();
        let mut out: foldhash::HashMap<BucketRef<'a>, PendingBucket> = Default::default();
        for ((device, hour), metrics) in self.hours {
            let day = *days
                .entry(hour)
                .or_insert_with(|| bucket_start(tz, hour, Period::Day));
            for (period, bucket_ms) in [(Period::Hour, hour), (Period::Day, day)] {
                for scope in [device, ""] {
                    let b =
                        out.entry((scope, period, bucket_ms))
                            .or_insert_with(|| PendingBucket {
                                metrics: Vec::with_capacity(metrics.len()),
                            });
                    for (metric, agg) in &metrics {
                        match b.metrics.iter_mut().find(|(m, _)| m == metric) {
                            Some((_, e)) => e.merge(agg),
                            None => b.metrics.push((*metric, agg.clone())),
                        }
                    }
                }
            }
        }
        out
    }

    /// Every (scope, period, bucket, metric) this batch changes, with its combined value:
    /// the per-metric view tests recount against.
    #[cfg(test)]
    pub fn expand(self, tz: &jiff::tz::TimeZone) -> std::collections::HashMap<Key, Agg> {
        let mut out = std::collections::HashMap::new();
        for ((scope, period, bucket_ms), b) in self.expand_buckets(tz) {
            for (metric, agg) in b.metrics {
                let key = Key {
                    scope: scope.to_owned(),
                    period,
                    bucket_ms,
                    metric,
                };
                out.insert(key, agg);
            }
        }
        out
    }
}

/// A bucket a batch changes: device (or `""` for the branch), period, start.
pub type BucketRef<'a> = (&'a str, Period, i64);

/// What a batch adds to one bucket.
#[derive(Debug, Default)]
pub struct PendingBucket {
    pub metrics: Vec<(Metric, Agg)>,
}

/// Fold a batch aggregate into a stored (value, last_ms); `distinct_new` is how many of
/// the batch's distinct values were new to the bucket.
pub fn fold(op: RollupOp, stored: (f64, i64), batch: &Agg, distinct_new: i64) -> (f64, i64) {
    let (value, last_ms) = stored;
    match op {
        RollupOp::Count | RollupOp::Sum => (value + batch.value, last_ms),
        RollupOp::Min => (value.min(batch.value), last_ms),
        RollupOp::Max => (value.max(batch.value), last_ms),
        RollupOp::Last if batch.last_ms >= last_ms => (batch.value, batch.last_ms),
        RollupOp::Last => (value, last_ms),
        RollupOp::Distinct => (value + distinct_new as f64, last_ms),
    }
}

/// One metric of a stored bucket: how it combines, its value, how many contributions it
/// has had, and the time of the newest (for `last`).
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct StoredMetric(pub RollupOp, pub f64, pub i64, pub i64);

/// The metrics of one stored bucket (device or branch, period, start), as kept in one row
/// of `rollup_buckets`: `{"loans": ["sum", 12.0, 12, 1764035200000], ...}`. One row per
/// bucket instead of one per metric: a batch costs one write per device and bucket,
/// however many metrics its profile declares.
pub type BucketMetrics = BTreeMap<String, StoredMetric>;

/// The JSON of a bucket's metrics, written by hand: the writer encodes every changed
/// bucket in every batch, and this is the text `serde_json` writes (a test holds them
/// equal), in a third of the time.
pub fn encode_metrics(metrics: &BucketMetrics) -> String {
    let mut out = String::with_capacity(2 + metrics.len() * 56);
    out.push('{');
    for (i, (name, StoredMetric(op, value, samples, last_ms))) in metrics.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        if name.bytes().all(|b| b >= 0x20 && b != b'"' && b != b'\\') {
            out.push('"');
            out.push_str(name);
            out.push('"');
        } else {
            out.push_str(&serde_json::to_string(name).unwrap_or_default());
        }
        out.push_str(":[\"");
        out.push_str(op.as_str());
        out.push_str("\",");
        if value.is_finite() {
            out.push_str(zmij::Buffer::new().format_finite(*value));
        } else {
            out.push_str("null");
        }
        out.push(',');
        out.push_str(itoa::Buffer::new().format(*samples));
        out.push(',');
        out.push_str(itoa::Buffer::new().format(*last_ms));
        out.push(']');
    }
    out.push('}');
    out
}

/// A stored bucket's metrics, and how many entries were unreadable and left out (none
/// unless the row was damaged): one bad metric must not stop the writer or the API.
pub fn decode_metrics(text: &str) -> (BucketMetrics, usize) {
    // Every row the writer wrote reads in one pass; only a damaged one takes the slow path.
    if let Ok(metrics) = serde_json::from_str::<BucketMetrics>(text) {
        return (metrics, 0);
    }
    let Ok(entries) = serde_json::from_str::<serde_json::Map<String, Value>>(text) else {
        return (BucketMetrics::new(), 1);
    };
    let mut skipped = 0;
    let mut metrics = BucketMetrics::new();
    for (name, entry) in entries {
        match serde_json::from_value::<StoredMetric>(entry) {
            Ok(m) if m.1.is_finite() => {
                metrics.insert(name, m);
            }
            _ => skipped += 1,
        }
    }
    (metrics, skipped)
}

/// Fold a batch aggregate into a bucket's stored metric (`None`: the metric is new to the
/// bucket). `distinct_new` is how many of the batch's distinct values the bucket had not
/// seen. `None` back: nothing to store (a min or max with no numeric sample).
pub fn fold_stored(
    stored: Option<StoredMetric>,
    batch: &Agg,
    distinct_new: i64,
) -> Option<StoredMetric> {
    let batch_last = batch.last_ms.max(0);
    match stored {
        Some(StoredMetric(op, value, samples, last_ms)) => {
            let (folded, _) = fold(op, (value, last_ms), batch, distinct_new);
            // A sum past f64's range stays at its last finite value: JSON has no infinity.
            let value = if folded.is_finite() { folded } else { value };
            Some(StoredMetric(
                op,
                value,
                samples + batch.samples,
                last_ms.max(batch_last),
            ))
        }
        None => {
            let value = match batch.op {
                RollupOp::Distinct => distinct_new as f64,
                _ => batch.value,
            };
            value
                .is_finite()
                .then_some(StoredMetric(batch.op, value, batch.samples, batch_last))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    /// The hand-written encoding is serde_json's text, escapes and `null` included.
    #[test]
    fn hand_encoding_is_serde_json() {
        let mut metrics = BucketMetrics::new();
        let values = [
            0.0,
            -0.0,
            12.0,
            0.1,
            1.0 / 3.0,
            1e300,
            -2.5e-12,
            f64::NAN,
            9e15,
        ];
        let names = [
            "loans",
            "odd \"name\"",
            "tab\there",
            "back\\slash",
            "päss",
            "\u{1}",
        ];
        for (i, v) in values.iter().enumerate() {
            let op = [
                RollupOp::Count,
                RollupOp::Sum,
                RollupOp::Last,
                RollupOp::Distinct,
            ][i % 4];
            let name = format!("{}{i}", names[i % names.len()]);
            metrics.insert(
                name,
                StoredMetric(op, *v, i as i64 * 1000 - 3, -(i as i64) << 40),
            );
            assert_eq!(
                encode_metrics(&metrics),
                serde_json::to_string(&metrics).unwrap()
            );
        }
        assert_eq!(encode_metrics(&BucketMetrics::new()), "{}");
    }

    /// A stored metric folds like the old per-metric upsert: sums add, extremes keep the
    /// extreme, `last` keeps the newest, distinct adds what is new; an extreme without a
    /// numeric sample is not stored.
    #[test]
    fn stored_metrics_fold_and_round_trip() {
        let batch = |op, value, samples, last_ms| Agg {
            samples,
            value,
            last_ms,
            ..Agg::new(op)
        };
        let sum = fold_stored(None, &batch(RollupOp::Sum, 2.5, 2, 10), 0).unwrap();
        assert_eq!(sum, StoredMetric(RollupOp::Sum, 2.5, 2, 10));
        let sum = fold_stored(Some(sum), &batch(RollupOp::Sum, 1.0, 1, 5), 0).unwrap();
        assert_eq!(sum, StoredMetric(RollupOp::Sum, 3.5, 3, 10));
        let last = StoredMetric(RollupOp::Last, 7.0, 1, 100);
        let older = fold_stored(Some(last), &batch(RollupOp::Last, 1.0, 1, 50), 0).unwrap();
        assert_eq!(older, StoredMetric(RollupOp::Last, 7.0, 2, 100));
        let newer = fold_stored(Some(last), &batch(RollupOp::Last, 1.0, 1, 150), 0).unwrap();
        assert_eq!(newer, StoredMetric(RollupOp::Last, 1.0, 2, 150));
        let max = StoredMetric(RollupOp::Max, 9.0, 3, 0);
        let max = fold_stored(Some(max), &batch(RollupOp::Max, 4.0, 1, 0), 0).unwrap();
        assert_eq!(max.1, 9.0);
        let distinct = fold_stored(None, &batch(RollupOp::Distinct, 0.0, 4, 0), 3).unwrap();
        assert_eq!(distinct, StoredMetric(RollupOp::Distinct, 3.0, 4, 0));
        let empty_min = Agg::new(RollupOp::Min);
        assert_eq!(fold_stored(None, &empty_min, 0), None);
        let mut bucket = BucketMetrics::new();
        bucket.insert("temp".into(), newer);
        bucket.insert("loans".into(), sum);
        let text = encode_metrics(&bucket);
        assert_eq!(
            text,
            r#"{"loans":["sum",3.5,3,10],"temp":["last",1.0,2,150]}"#
        );
        assert_eq!(decode_metrics(&text), (bucket, 0));
        // A damaged entry is left out (and counted), the rest still reads.
        let (some, skipped) =
            decode_metrics(r#"{"a": ["sum", 1.0, 1, 0], "b": ["sum", null, 1, 0], "c": 7}"#);
        assert_eq!(some.len(), 1);
        assert_eq!(skipped, 2);
        assert_eq!(decode_metrics("not json"), (BucketMetrics::new(), 1));
        // A sum past f64's range keeps its last finite value.
        let big = StoredMetric(RollupOp::Sum, f64::MAX, 1, 0);
        let kept = fold_stored(Some(big), &batch(RollupOp::Sum, f64::MAX, 1, 0), 0).unwrap();
        assert_eq!(kept, StoredMetric(RollupOp::Sum, f64::MAX, 2, 0));
    }

    fn tz() -> jiff::tz::TimeZone {
        jiff::tz::TimeZone::get("Asia/Shanghai").unwrap()
    }

    #[test]
    fn buckets_follow_local_time() {
        // 2026-11-25T02:30:00Z is 10:30 in Shanghai.
        let ms = 1_795_573_800_000;
        assert_eq!(bucket(&tz(), ms, Period::Hour).1, "2026-11-25T10:00");
        assert_eq!(
            bucket(&tz(), ms, Period::Day),
            (1_795_536_000_000, "2026-11-25".into())
        );
        // 2026-11-25T17:00Z is already the 26th there.
        assert_eq!(
            bucket(&tz(), 1_795_626_000_000, Period::Day).1,
            "2026-11-26"
        );
    }

    /// Lord Howe Island turns its clocks back by 30 minutes: 01:30-02:00 comes twice, and
    /// the second pass belongs to a local hour 90 minutes long. Its contributions are
    /// still counted (once each) and aggregation ends (it once spun forever here).
    #[test]
    fn a_local_hour_longer_than_sixty_minutes_is_aggregated() {
        let (done, finished) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let tz = jiff::tz::TimeZone::get("Australia/Lord_Howe").unwrap();
            // 01:45 at +10:30, the second pass (2025-04-06).
            let at: jiff::Timestamp = "2025-04-05T15:15:00Z".parse().unwrap();
            let ms = at.as_millisecond();
            let contributions = vec![count(&MESSAGES, ms); 3];
            let mut pending = Pending::default();
            pending.add_all(&tz, "d1", &contributions);
            pending.add(&tz, "d1", &count(&MESSAGES, ms + 60_000));
            let _ = done.send(pending.expand(&tz));
        });
        let out = finished
            .recv_timeout(std::time::Duration::from_secs(10))
            .expect("aggregation did not finish");
        let hours: Vec<f64> = out
            .iter()
            .filter(|(k, _)| k.scope == "d1" && k.period == Period::Hour)
            .map(|(_, a)| a.value)
            .collect();
        assert_eq!(hours, vec![4.0]);
        let days: Vec<f64> = out
            .iter()
            .filter(|(k, _)| k.scope.is_empty() && k.period == Period::Day)
            .map(|(_, a)| a.value)
            .collect();
        assert_eq!(days, vec![4.0]);
    }

    /// Lord Howe's 30-minute local hour (02:30-03:00 on 2025-10-05): a message in it and one
    /// ten minutes into the next hour, in one batch, land in their own hours.
    #[test]
    fn a_local_hour_shorter_than_sixty_minutes_ends_on_time() {
        let tz = jiff::tz::TimeZone::get("Australia/Lord_Howe").unwrap();
        let ms = |t: &str| t.parse::<jiff::Timestamp>().unwrap().as_millisecond();
        let mut pending = Pending::default();
        pending.add_message(&tz, "d1", ms("2025-10-04T15:45:00Z"), &[]);
        pending.add_message(&tz, "d1", ms("2025-10-04T16:10:00Z"), &[]);
        let mut hours: Vec<(i64, f64)> = pending
            .expand(&tz)
            .into_iter()
            .filter(|(k, _)| k.scope == "d1" && k.period == Period::Hour)
            .map(|(k, a)| (k.bucket_ms, a.value))
            .collect();
        hours.sort_by_key(|h| h.0);
        assert_eq!(
            hours,
            vec![
                (ms("2025-10-04T15:30:00Z"), 1.0),
                (ms("2025-10-04T16:00:00Z"), 1.0)
            ]
        );
    }

    /// A connection across Lord Howe's 90-minute local hour (DST ends by 30 minutes) and
    /// across its 30-minute one (DST starts): every minute is counted once, each in the
    /// local hour it fell in, and the split ends.
    #[test]
    fn online_minutes_follow_hours_of_any_length() {
        let (done, finished) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let tz = jiff::tz::TimeZone::get("Australia/Lord_Howe").unwrap();
            let ms = |t: &str| t.parse::<jiff::Timestamp>().unwrap().as_millisecond();
            // 2025-04-06 00:00 +11 to 03:00 +10:30: local hours 00 (60 min), 01 (90), 02 (60).
            let long = online_minutes(
                &tz,
                Some(ms("2025-04-05T13:00:00Z")),
                ms("2025-04-05T16:30:00Z"),
            );
            // 2025-10-05 01:00 +10:30 to 04:00 +11: local hours 01 (60), 02 (30: from 02:30), 03 (60).
            let short = online_minutes(
                &tz,
                Some(ms("2025-10-04T14:30:00Z")),
                ms("2025-10-04T17:00:00Z"),
            );
            let _ = done.send((long, short));
        });
        let (long, short) = finished
            .recv_timeout(std::time::Duration::from_secs(10))
            .expect("online minutes did not finish");
        let minutes = |cs: &[Contribution]| -> Vec<f64> {
            cs.iter()
                .map(|c| match c.value {
                    Sample::Num(x) => x,
                    Sample::Distinct(_) => unreachable!(),
                })
                .collect()
        };
        assert_eq!(minutes(&long), vec![60.0, 90.0, 60.0]);
        assert_eq!(minutes(&short), vec![60.0, 30.0, 60.0]);
    }

    #[test]
    fn online_minutes_are_cut_at_hour_boundaries() {
        let utc = jiff::tz::TimeZone::UTC;
        let h = 3_600_000;
        // 10:30 to 12:15: 30 + 60 + 15 minutes, in three hours.
        let parts = online_minutes(&utc, Some(10 * h + h / 2), 12 * h + h / 4);
        let got: Vec<(i64, Sample)> = parts.into_iter().map(|c| (c.at_ms, c.value)).collect();
        assert_eq!(
            got,
            vec![
                (10 * h + h / 2, Sample::Num(30.0)),
                (11 * h, Sample::Num(60.0)),
                (12 * h, Sample::Num(15.0)),
            ]
        );
        assert!(online_minutes(&utc, None, h).is_empty());
        assert!(online_minutes(&utc, Some(2 * h), h).is_empty());
    }

    fn kiosk() -> Profile {
        Profile::from_json(
            r#"{"name":"k","description":"","time_field":"at",
                "events":{"max_bytes":300,"type_field":"event","types":{
                  "loan":{"fields":{"ok":{"type":"boolean"},"at":{"type":"string","required":false}}},
                  "session_end":{"fields":{"duration_s":{"type":"integer"},"patron_id":{"type":"string","required":false}}}}},
                "rollups":[
                  {"metric":"loans","kind":"events","type":"loan","op":"count","where":{"ok":true}},
                  {"metric":"loan_failures","kind":"events","type":"loan","op":"count","where":{"ok":false}},
                  {"metric":"session_minutes","kind":"events","type":"session_end","op":"sum","field":"duration_s","scale":0.5},
                  {"metric":"patrons","kind":"events","type":"session_end","op":"distinct","field":"patron_id"}]}"#,
        )
        .unwrap()
    }

    #[test]
    fn contributions_follow_the_profile() {
        let p = kiosk();
        assert_eq!(p.check(), vec![]);
        let names = |payload: &str| -> Vec<String> {
            contributions(&p, Kind::Events, payload, 1_795_573_800_000)
                .into_iter()
                .map(|c| format!("{}={:?}", c.metric, c.value))
                .collect()
        };
        assert_eq!(
            names(r#"{"event":"loan","ok":true}"#),
            ["messages=Num(1.0)", "loans=Num(1.0)"]
        );
        assert_eq!(
            names(r#"{"event":"loan","ok":false}"#),
            ["messages=Num(1.0)", "loan_failures=Num(1.0)"]
        );
        assert_eq!(
            names(r#"{"event":"session_end","duration_s":120,"patron_id":"ab"}"#),
            [
                "messages=Num(1.0)".to_owned(),
                "session_minutes=Num(60.0)".to_owned(),
                format!("patrons=Distinct({})", distinct_key("ab"))
            ]
        );
        // A number counts by its text: 7 and "7" are one value.
        assert_eq!(
            names(r#"{"event":"session_end","duration_s":60,"patron_id":7}"#)[2],
            format!("patrons=Distinct({})", distinct_key("7"))
        );
        // A plausible event time moves the message to its own hour; an absurd one does not.
        let late = contributions(
            &p,
            Kind::Events,
            r#"{"event":"loan","ok":true,"at":"2026-11-25T01:10:00Z"}"#,
            1_795_573_800_000,
        );
        assert_eq!(late[0].at_ms, 1_795_569_000_000);
        let absurd = contributions(
            &p,
            Kind::Events,
            r#"{"event":"loan","ok":true,"at":"1999-01-01T00:00:00Z"}"#,
            1_795_573_800_000,
        );
        assert_eq!(absurd[0].at_ms, 1_795_573_800_000);
    }

    /// Distinct keys are XXH3-64 with seed 0, whose values the specification fixes: keys
    /// stored by one version must match the keys the next one computes.
    #[test]
    fn distinct_keys_are_stable() {
        assert_eq!(distinct_key(""), 0x2d06_8005_38d3_94c2);
        assert_ne!(distinct_key("p1"), distinct_key("p2"));
    }

    /// Property: however a random stream (late and out-of-order messages, repeated
    /// patrons, both periods) is cut into batches and folded, every aggregate equals a
    /// recount over all messages at once.
    #[test]
    fn batched_rollups_equal_a_recount() {
        let p = kiosk();
        let base = 1_795_573_800_000i64;
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = |n: u64| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed % n
        };
        for _round in 0..50 {
            let mut msgs = Vec::new();
            for _ in 0..(20 + next(200)) {
                let device = format!("k{}", next(3));
                let at = base - (next(72) as i64) * 1_800_000 + next(1_000) as i64;
                let at_text = jiff::Timestamp::from_millisecond(at).unwrap().to_string();
                let payload = match next(3) {
                    0 => format!(
                        r#"{{"event":"loan","ok":{},"at":"{at_text}"}}"#,
                        next(2) == 0
                    ),
                    _ => format!(
                        r#"{{"event":"session_end","duration_s":{},"patron_id":"p{}"}}"#,
                        next(600),
                        next(10)
                    ),
                };
                msgs.push((device, payload));
            }
            // Recount: everything each message contributes, in one batch.
            let mut all = Pending::default();
            for (d, payload) in &msgs {
                for c in &contributions(&p, Kind::Events, payload, base) {
                    all.add(&tz(), d, c);
                }
            }
            let all = all.expand(&tz());
            // Batched: random cuts, folded the way the writer folds them (whole buckets,
            // `fold_stored`, distinct values new to the bucket).
            let mut stored: HashMap<Key, StoredMetric> = HashMap::new();
            let mut seen: HashMap<Key, BTreeSet<u64>> = HashMap::new();
            let mut i = 0;
            while i < msgs.len() {
                let n = 1 + next(40) as usize;
                // Each message as intake computes it and the writer adds it.
                let mut batch = Pending::default();
                for (d, payload) in &msgs[i..(i + n).min(msgs.len())] {
                    let fields: serde_json::Map<String, Value> =
                        serde_json::from_str(payload).unwrap();
                    let at_ms = rollup_time(&p, Some(&fields), base);
                    let declared = contributions_of(&p, Kind::Events, Some(&fields));
                    batch.add_message(&tz(), d, at_ms, &declared);
                }
                for ((scope, period, bucket_ms), b) in batch.expand_buckets(&tz()) {
                    for (metric, a) in &b.metrics {
                        let k = Key {
                            scope: scope.to_owned(),
                            period,
                            bucket_ms,
                            metric: *metric,
                        };
                        let values = seen.entry(k.clone()).or_default();
                        let before = values.len();
                        values.extend(a.distinct.iter().copied());
                        let new = (values.len() - before) as i64;
                        if let Some(m) = fold_stored(stored.get(&k).copied(), a, new) {
                            stored.insert(k, m);
                        }
                    }
                }
                i += n;
            }
            assert_eq!(stored.len(), all.len());
            for (k, a) in &all {
                let StoredMetric(_, value, samples, _) = stored[k];
                assert_eq!(samples, a.samples, "{k:?}");
                let expected = if a.op == RollupOp::Distinct {
                    a.distinct.len() as f64
                } else {
                    a.value
                };
                assert!(
                    (value - expected).abs() < 1e-6,
                    "{k:?}: {value} vs {expected}"
                );
            }
        }
    }
}
