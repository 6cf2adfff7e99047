//! The dashboard (`/`) for branch IT: every device, the buffer against its cap, the
//! backlog and its drain, the upstream link, refusals, drops and quarantine, tapped
//! kiosks, and the last 24 hours of device messages per hour and device profile as a
//! chart. Its figures come from the same reports as `status`, `devices` and the API
//! (`buffer::device_report`, `buffer_report`, `kiosk_health`). Reloads itself every 10 s.

use std::fmt::Write;
use std::sync::atomic::Ordering;

use rusqlite::Connection;

use super::chart::{self, Series};
use super::page::escape;
use super::ApiState;
use crate::buffer::{BufferReport, DeviceRow, Drain, KioskHealth};
use crate::model::{ago, ago_secs, format_ms, DeviceId};

const HOUR_MS: i64 = 3_600_000;

/// What the dashboard shows, read in one go from one connection.
pub(super) struct View {
    now_ms: i64,
    devices: Vec<DeviceRow>,
    kiosks: Vec<(DeviceId, KioskHealth)>,
    report: BufferReport,
    /// (hour bucket, profile, messages) of the last 24 hours.
    hourly: Vec<(i64, String, f64)>,
}

impl View {
    pub fn read(conn: &Connection, kiosks: &[DeviceId], now_ms: i64) -> rusqlite::Result<View> {
        let kiosks = kiosks
            .iter()
            .map(|k| Ok((k.clone(), crate::buffer::kiosk_health(conn, k)?)))
            .collect::<rusqlite::Result<_>>()?;
        let first_hour = (now_ms / HOUR_MS - 23) * HOUR_MS;
        Ok(View {
            now_ms,
            devices: crate::buffer::device_report(conn)?,
            kiosks,
            report: crate::buffer::buffer_report(conn, now_ms)?,
            hourly: crate::buffer::messages_by_hour_and_profile(conn, first_hour)?,
        })
    }
}

/// A figure with its metric name in the DOM.
fn figure(metric: &str, value: impl std::fmt::Display) -> String {
    format!(
        r#"<span data-metric="{metric}">{}</span>"#,
        escape(&value.to_string())
    )
}

fn megabytes(bytes: u64) -> String {
    format!("{:.1} MB", bytes as f64 / 1e6)
}

/// The 24-hour chart: one line per device profile.
fn messages_chart(view: &View) -> String {
    let first_hour = view.now_ms / HOUR_MS - 23;
    let mut profiles: Vec<&str> = view.hourly.iter().map(|(_, p, _)| p.as_str()).collect();
    profiles.sort();
    profiles.dedup();
    let series: Vec<Series> = profiles
        .iter()
        .map(|p| {
            let mut values = vec![Some(0.0); 24];
            for (b, _, n) in view.hourly.iter().filter(|(_, q, _)| q == p) {
                if let Ok(i) = usize::try_from(b / HOUR_MS - first_hour) {
                    if let Some(Some(v)) = values.get_mut(i) {
                        *v += n;
                    }
                }
            }
            Series {
                label: p,
                values,
                faint: false,
            }
        })
        .collect();
    let labels: Vec<String> = (0..24)
        .map(|i| {
            let ms = (first_hour + i) * HOUR_MS;
            format_ms(ms).get(11..13).unwrap_or("").to_owned()
        })
        .collect();
    chart::lines(&series, &labels, 1400, 420, 16)
}

pub(super) fn page(state: &ApiState, view: &View) -> String {
    let now = view.now_ms;
    let r = &view.report;
    let mut devices = String::new();
    for d in view.devices.iter().filter(|d| d.configured) {
        let state_name = if d.online { "online" } else { "offline" };
        let seen = d
            .last_seen_ms
            .map(|ms| ago(now - ms))
            .unwrap_or_else(|| "never".into());
        let rejection = match (&d.last_reject_reason, &d.last_reject_detail) {
            (Some(reason), Some(detail)) => format!("{reason}: {detail}"),
            (Some(reason), None) => reason.clone(),
            _ => "-".into(),
        };
        let id = escape(&d.id);
        let _ = write!(
            devices,
            r#"<tr data-device="{id}"><td>{id}</td><td>{}</td><td class="{state_name}" data-metric="device_state">{state_name}</td><td data-metric="last_seen">{}</td><td data-metric="accepted">{}</td><td data-metric="rejected">{}</td><td data-metric="denied">{}</td><td data-metric="rate_limited">{}</td><td data-metric="last_rejection">{}</td></tr>"#,
            escape(&d.profile),
            escape(&seen),
            d.accepted,
            d.rejected,
            d.denied,
            d.rate_limited,
            escape(&rejection),
        );
    }
    let size = crate::buffer::size_on_disk(&state.database);
    let drain = match r.drain() {
        Drain::Empty => "nothing to send".to_owned(),
        Drain::Stalled => "no deliveries in the last minute: no drain estimate".to_owned(),
        Drain::Draining { per_s, eta_s } => {
            format!("{per_s:.0} msg/s, done in about {}", ago_secs(eta_s))
        }
    };
    let oldest = r
        .oldest_undelivered_ms
        .map(|ms| ago(now - ms))
        .unwrap_or_else(|| "-".into());
    let upstream = match &state.upstream {
        None => "not configured (buffering locally only)".to_owned(),
        Some(u) => {
            let last = match u.last_ack_ms.load(Ordering::Relaxed) {
                0 => "nothing acknowledged yet".to_owned(),
                ms => format!("last acknowledgement {}", ago(now - ms)),
            };
            let up = if u.connected.load(Ordering::Relaxed) {
                "connected"
            } else {
                "disconnected"
            };
            format!(
                "{} ({last}; {} acknowledged since the start)",
                figure("upstream_connected", up),
                u.acknowledged.load(Ordering::Relaxed)
            )
        }
    };
    let list = |rows: Vec<String>| match rows.is_empty() {
        true => "none".to_owned(),
        false => rows.join(", "),
    };
    let refused = list(
        r.refused
            .iter()
            .map(|(d, why, n)| {
                let d = if d.is_empty() { "-" } else { d.as_str() };
                escape(&format!("{d} {why} {n}"))
            })
            .collect(),
    );
    let limited = list(
        r.rate_limited
            .iter()
            .map(|(d, n)| escape(&format!("{d} {n}")))
            .collect(),
    );
    let drops = list(
        r.drops
            .iter()
            .map(|(d, k, n)| escape(&format!("{d}/{k} {n}")))
            .collect(),
    );
    let quarantine = list(
        r.quarantined
            .iter()
            .map(|(d, k, why, n)| escape(&format!("{d}/{k} {why} {n}")))
            .collect(),
    );
    let mut kiosks = String::new();
    for (id, k) in &view.kiosks {
        let _ = write!(
            kiosks,
            r#"<li data-device="{0}"><b>{0}</b>: <span data-metric="kiosk_health">{1}</span></li>"#,
            escape(id),
            escape(&k.describe(now))
        );
    }
    let kiosks = match kiosks.is_empty() {
        true => String::new(),
        false => format!("<section><h2>SIP2 kiosks</h2><ul>{kiosks}</ul></section>"),
    };
    format!(
        r#"<!doctype html><html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width,initial-scale=1">
<meta http-equiv="refresh" content="10">
<title>branch-gateway: {branch}</title><style>{STYLE}</style></head><body>
<header><h1>branch-gateway · {branch}</h1><div>{at} · <a href="/lobby">lobby page</a></div></header>
<section class="cards">
<div class="card"><div class="k">Devices online</div><div class="v">{online} / {configured}</div></div>
<div class="card"><div class="k">Buffer</div><div class="v">{size} <small>of {cap}</small></div></div>
<div class="card"><div class="k">Backlog</div><div class="v">{backlog}</div><div class="k">oldest {oldest}</div></div>
<div class="card"><div class="k">Drain</div><div class="v small">{drain}</div></div>
</section>
<section><h2>Upstream</h2><p>{upstream}</p></section>
<section><h2>Messages per hour and device profile, last 24 h</h2><div class="chart" data-metric="messages_by_hour">{chart}</div></section>
<section><h2>Devices</h2><table><thead><tr><th>Device</th><th>Profile</th><th>State</th><th>Last seen</th><th>Accepted</th><th>Rejected</th><th>Denied</th><th>Limited</th><th>Last rejection</th></tr></thead><tbody>{devices}</tbody></table></section>
{kiosks}
<section><h2>Refusals and drops</h2><ul>
<li>Refused by the broker: <span data-metric="broker_refused">{refused}</span></li>
<li>Over their profile's rate limit: <span data-metric="rate_limited">{limited}</span></li>
<li>Removed by the disk cap: <span data-metric="dropped">{drops}</span></li>
<li>Refused by central, in quarantine: <span data-metric="quarantined">{quarantine}</span></li>
</ul></section>
</body></html>"#,
        branch = escape(&state.branch),
        at = format_ms(now),
        online = figure("devices_online", r.devices_online),
        configured = figure("devices_configured", r.devices_configured),
        size = figure("buffer_bytes", megabytes(size)),
        cap = figure("buffer_cap_bytes", megabytes(state.storage_cap_bytes)),
        backlog = figure("backlog_messages", r.backlog),
        oldest = figure("oldest_undelivered_age", oldest),
        drain = figure("drain", drain),
        chart = messages_chart(view),
    )
}

const STYLE: &str = r#"
:root { color-scheme: dark; }
body { margin: 0; padding: 1.5rem 2rem; background: #2e3440; color: #eceff4;
  font-family: "Noto Sans CJK SC", "WenQuanYi Micro Hei", sans-serif; font-size: 15px; }
a { color: #88c0d0; }
header { display: flex; justify-content: space-between; align-items: baseline; }
h1 { margin: 0 0 1rem; font-size: 1.6rem; }
h2 { font-size: 1.1rem; color: #a0a8b8; margin: 1.5rem 0 .5rem; font-weight: 400; }
.cards { display: grid; grid-template-columns: repeat(4, 1fr); gap: 1rem; }
.card { background: #3b4252; border-radius: .6rem; padding: .8rem 1rem; }
.k { color: #a0a8b8; } .v { font-size: 1.8rem; font-weight: 700; } .v.small { font-size: 1.1rem; }
table { border-collapse: collapse; width: 100%; }
th, td { text-align: left; padding: .3rem .6rem; border-bottom: 1px solid #434c5e; }
td.online { color: #a3be8c; } td.offline { color: #bf616a; font-weight: 700; }
.chart { background: #3b4252; border-radius: .6rem; padding: .5rem; }
.chart svg { width: 100%; height: auto; }
"#;
