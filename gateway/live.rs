//! The branch's live figures: what they are and when they change. One [`Snapshot`] built
//! here feeds the retained MQTT topic `branch/summary/live` (for screens that are MQTT
//! clients) and the lobby page with its live stream (`api`), so both always agree.
//!
//! What is shown comes from the profiles: [`Plan::from_profiles`] keeps only the headline
//! figures whose rollup metrics some loaded profile declares (a branch without reading
//! booths shows no booth figure), and `metrics` lists every declared rollup metric with
//! today's value (0 until something counts). Only branch-wide aggregates are here, never
//! a device's message or a patron datum.
//!
//! [`run`] recomputes the snapshot when a commit happened (the writer's transaction
//! count moved), the number of devices online changed, a reload changed the plan, or a
//! minute passed (midnight, expiring notices), at most once per [`MIN_INTERVAL`], on a read-only connection on the
//! blocking pool. Readers take the newest snapshot from a `watch` channel: one computation
//! serves any number of screens.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use rusqlite::{params, Connection};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::buffer::BufferStats;
use crate::config::profile::Profile;
use crate::summary::{bucket, json_number, Period};

/// Recomputed at most this often (a commit is on the pages within this plus one tick).
pub const MIN_INTERVAL: Duration = Duration::from_millis(500);
/// How often [`run`] looks for a change.
const TICK: Duration = Duration::from_millis(250);
const HOUR_MS: i64 = 3_600_000;
const DAY_MS: i64 = 24 * HOUR_MS;

/// A headline figure: its name (the `data-metric` on the pages, the key in the JSON) and
/// the rollup metrics it is made of.
struct Figure {
    name: &'static str,
    needs: &'static [&'static str],
}

/// The headline figures, in the order the lobby shows them. `occupancy` (people in the
/// building now) is today's `visitors_in - visitors_out` over every gate, never below 0.
const FIGURES: &[Figure] = &[
    Figure {
        name: "visitors_in",
        needs: &["visitors_in"],
    },
    Figure {
        name: "occupancy",
        needs: &["visitors_in", "visitors_out"],
    },
    Figure {
        name: "loans",
        needs: &["loans"],
    },
    Figure {
        name: "returns",
        needs: &["returns"],
    },
    Figure {
        name: "booth_sessions",
        needs: &["booth_sessions"],
    },
];

/// The metric drawn hour by hour, today against the same weekday last week.
const HOURLY: &str = "visitors_in";

/// What this branch's profiles make of the live figures.
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    /// Headline figures whose metrics are declared, in display order.
    pub figures: Vec<&'static str>,
    /// Every rollup metric the profiles declare, sorted.
    pub metrics: Vec<String>,
    /// The hourly chart's metric, if declared.
    pub hourly: Option<&'static str>,
}

impl Plan {
    pub fn from_profiles<'a>(profiles: impl IntoIterator<Item = &'a Profile>) -> Plan {
        let mut metrics: Vec<String> = profiles
            .into_iter()
            .flat_map(|p| p.rollups.iter().map(|r| r.metric.as_str().to_owned()))
            .collect();
        metrics.sort();
        metrics.dedup();
        let declared = |m: &str| metrics.iter().any(|d| d == m);
        Plan {
            figures: FIGURES
                .iter()
                .filter(|f| f.needs.iter().all(|m| declared(m)))
                .map(|f| f.name)
                .collect(),
            hourly: declared(HOURLY).then_some(HOURLY),
            metrics,
        }
    }
}

/// Today's figures so far, as one moment saw them.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Snapshot {
    pub branch: String,
    /// The local date (`YYYY-MM-DD`).
    pub date: String,
    pub at_ms: i64,
    /// The headline figures of the plan, in order.
    pub figures: Vec<(&'static str, f64)>,
    /// Every declared rollup metric: today's value.
    pub metrics: BTreeMap<String, f64>,
    /// Hour by hour (index = local hour of the day).
    pub hourly: Option<Hourly>,
    /// The branch notice in force, if any (its text).
    pub notice: Option<String>,
    pub devices_online: usize,
    pub devices_configured: usize,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Hourly {
    pub metric: &'static str,
    /// Today, per local hour; `None` for hours still to come.
    pub today: Vec<Option<f64>>,
    /// The same weekday a week ago, per local hour.
    pub last_week: Vec<f64>,
}

impl Snapshot {
    /// A headline figure's value (0 when the plan has no such figure).
    pub fn figure(&self, name: &str) -> f64 {
        self.figures
            .iter()
            .find(|(n, _)| *n == name)
            .map_or(0.0, |(_, v)| *v)
    }

    /// The JSON of `branch/summary/live` and of the lobby's stream.
    pub fn to_json(&self) -> serde_json::Value {
        let mut v = serde_json::json!({
            "branch": self.branch,
            "date": self.date,
            "at": crate::model::format_ms(self.at_ms),
            "devices_online": self.devices_online,
            "devices_configured": self.devices_configured,
            "metrics": self.metrics.iter().map(|(k, v)| (k.clone(), json_number(*v))).collect::<serde_json::Map<_, _>>(),
            "notice": self.notice,
        });
        for (name, value) in &self.figures {
            v[*name] = json_number(*value);
        }
        // Kept at the top level since the topic's first version.
        if let Some(out) = self.metrics.get("visitors_out") {
            v["visitors_out"] = json_number(*out);
        }
        if let Some(h) = &self.hourly {
            v["hourly"] = serde_json::json!({
                "metric": h.metric,
                "today": h.today.iter().map(|x| x.map(json_number)).collect::<Vec<_>>(),
                "last_week": h.last_week.iter().map(|x| json_number(*x)).collect::<Vec<_>>(),
            });
        }
        v
    }
}

/// Today's figures at `now_ms`.
pub fn compute(
    conn: &Connection,
    plan: &Plan,
    tz: &jiff::tz::TimeZone,
    branch: &str,
    now_ms: i64,
    devices_online: usize,
) -> rusqlite::Result<Snapshot> {
    let (day_ms, date) = bucket(tz, now_ms, Period::Day);
    let today: BTreeMap<String, f64> = crate::buffer::bucket_figures(conn, "day", day_ms)?
        .into_iter()
        .collect();
    let get = |m: &str| today.get(m).copied().unwrap_or(0.0);
    let figures = plan
        .figures
        .iter()
        .map(|&name| {
            let v = match name {
                "occupancy" => (get("visitors_in") - get("visitors_out")).max(0.0),
                other => get(other),
            };
            (name, v)
        })
        .collect();
    let metrics = plan.metrics.iter().map(|m| (m.clone(), get(m))).collect();
    let hourly = match plan.hourly {
        None => None,
        Some(metric) => {
            let current_hour = hour_of_day(tz, now_ms);
            let today = hours(conn, tz, metric, day_ms)?;
            let (week_ago, _) = bucket(tz, now_ms - 7 * DAY_MS, Period::Day);
            Some(Hourly {
                metric,
                today: today
                    .iter()
                    .enumerate()
                    .map(|(h, v)| (h <= current_hour).then_some(*v))
                    .collect(),
                last_week: hours(conn, tz, metric, week_ago)?,
            })
        }
    };
    let notice = crate::buffer::commands::notice(conn, now_ms)?.map(|(payload, _)| {
        serde_json::from_str::<serde_json::Value>(&payload)
            .ok()
            .and_then(|v| v["text"].as_str().map(str::to_owned))
            .unwrap_or(payload)
    });
    let devices_configured: i64 = conn.query_row(
        "SELECT COUNT(*) FROM devices WHERE configured = 1",
        [],
        |r| r.get(0),
    )?;
    Ok(Snapshot {
        branch: branch.to_owned(),
        date,
        at_ms: now_ms,
        figures,
        metrics,
        hourly,
        notice,
        devices_online,
        devices_configured: devices_configured.try_into().unwrap_or(0),
    })
}

/// The local hour of the day (0-23) of `ms`.
fn hour_of_day(tz: &jiff::tz::TimeZone, ms: i64) -> usize {
    jiff::Timestamp::from_millisecond(ms)
        .map(|t| t.to_zoned(tz.clone()).hour() as usize)
        .unwrap_or(0)
        .min(23)
}

/// `metric` per local hour of the day starting at `day_ms` (a DST day's repeated hour
/// adds up into its hour of the day).
fn hours(
    conn: &Connection,
    tz: &jiff::tz::TimeZone,
    metric: &str,
    day_ms: i64,
) -> rusqlite::Result<Vec<f64>> {
    let (next_day, _) = bucket(tz, day_ms + DAY_MS + 2 * HOUR_MS, Period::Day);
    let mut st = conn.prepare_cached(
        "SELECT bucket_ms, value FROM rollups WHERE scope = '' AND period = 'hour'
           AND metric = ?1 AND bucket_ms >= ?2 AND bucket_ms < ?3",
    )?;
    let mut out = vec![0.0; 24];
    let rows = st.query_map(params![metric, day_ms, next_day], |r| {
        Ok((r.get::<_, i64>(0)?, r.get::<_, f64>(1)?))
    })?;
    for row in rows {
        let (b, v) = row?;
        out[hour_of_day(tz, b)] += v;
    }
    Ok(out)
}

/// What [`run`] reads.
pub struct Inputs {
    pub database: PathBuf,
    pub tz: jiff::tz::TimeZone,
    pub branch: String,
    pub buffer: Arc<BufferStats>,
    pub devices_online: Arc<AtomicUsize>,
}

/// Keep `tx` holding the newest snapshot until `shutdown`, following the plan in force
/// (`plan`: a reload that changes the profiles' rollups sends a new one).
pub async fn run(
    inputs: Inputs,
    mut plan_rx: watch::Receiver<Plan>,
    tx: watch::Sender<Arc<Snapshot>>,
    shutdown: CancellationToken,
) {
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let inputs = Arc::new(inputs);
    let mut conn: Option<Connection> = None;
    let mut seen: Option<(u64, usize, i64, u64)> = None;
    let mut plans = 0u64;
    let mut last = tokio::time::Instant::now() - MIN_INTERVAL;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        let now = crate::model::now_ms();
        let online = inputs.devices_online.load(Ordering::Relaxed);
        if plan_rx.borrow_and_update().has_changed() {
            plans += 1; // a reload changed the profiles' rollups
        }
        let key = (
            inputs.buffer.transactions.load(Ordering::Relaxed),
            online,
            now / 60_000,
            plans,
        );
        if seen == Some(key) || last.elapsed() < MIN_INTERVAL {
            continue;
        }
        let plan = plan_rx.borrow().clone();
        last = tokio::time::Instant::now();
        let (inp, c) = (inputs.clone(), conn.take());
        let done = tokio::task::spawn_blocking(move || {
            let c = match c {
                Some(c) => c,
                None => crate::buffer::open_read_only(&inp.database).ok()?,
            };
            let snap = compute(&c, &plan, &inp.tz, &inp.branch, now, online);
            Some((c, snap))
        })
        .await;
        match done {
            Ok(Some((c, Ok(snap)))) => {
                conn = Some(c);
                seen = Some(key);
                tx.send_replace(Arc::new(snap));
            }
            Ok(Some((_, Err(e)))) => {
                tracing::debug!(error = %e, "cannot read the live figures; trying again");
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn profile(json: &str) -> Profile {
        serde_json::from_str(json).unwrap()
    }

    #[test]
    fn the_plan_shows_only_what_the_profiles_declare() {
        let gate = profile(
            r#"{"name": "g", "description": "", "telemetry": {"max_bytes": 256, "fields": {"a": {"type": "integer"}, "b": {"type": "integer"}}},
                "rollups": [{"metric": "visitors_in", "kind": "telemetry", "op": "sum", "field": "a"},
                            {"metric": "visitors_out", "kind": "telemetry", "op": "sum", "field": "b"}]}"#,
        );
        let plan = Plan::from_profiles([&gate]);
        assert_eq!(plan.figures, ["visitors_in", "occupancy"]);
        assert_eq!(plan.metrics, ["visitors_in", "visitors_out"]);
        assert_eq!(plan.hourly, Some("visitors_in"));
        let none = Plan::from_profiles(std::iter::empty());
        assert!(none.figures.is_empty() && none.hourly.is_none());
    }

    #[test]
    fn the_json_carries_figures_metrics_and_hours() {
        let snap = Snapshot {
            branch: "b".into(),
            date: "2026-12-03".into(),
            at_ms: 0,
            figures: vec![("visitors_in", 12.0), ("occupancy", 3.0)],
            metrics: [("visitors_in".to_owned(), 12.0)].into(),
            hourly: Some(Hourly {
                metric: "visitors_in",
                today: vec![Some(2.0), None],
                last_week: vec![1.0, 4.0],
            }),
            notice: Some("closing".into()),
            devices_online: 2,
            devices_configured: 3,
        };
        let v = snap.to_json();
        assert_eq!(v["visitors_in"], 12);
        assert_eq!(v["occupancy"], 3);
        assert_eq!(v["metrics"]["visitors_in"], 12);
        assert_eq!(v["hourly"]["today"], serde_json::json!([2, null]));
        assert_eq!(v["notice"], "closing");
        assert_eq!(snap.figure("loans"), 0.0);
    }
}
