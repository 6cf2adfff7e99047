//! The lobby page (`/lobby`): today's figures for the big screens in the lobby, readable
//! across the hall at 1920x1080 and in portrait, in the branch's language. Rendered whole
//! on the server (it works without script); a few lines of script apply each update of
//! the live stream (`/lobby/events`, server-sent events) to the elements that carry a
//! `data-metric`. Only the aggregates of [`crate::live::Snapshot`] are on it.
//!
//! [`Feed`] renders each new snapshot's update once, whatever the number of screens.

use std::sync::Arc;

use tokio::sync::watch;

use super::chart::{self, Series};
use super::page::escape;
use crate::config::Language;
use crate::live::Snapshot;

/// A label in the page's language.
pub(super) fn label(lang: Language, key: &str) -> &'static str {
    let zh = lang == Language::Zh;
    match (key, zh) {
        ("title", false) => "Today at the library",
        ("title", true) => "今日图书馆",
        ("visitors_in", false) => "Visitors today",
        ("visitors_in", true) => "今日到馆人次",
        ("occupancy", false) => "In the building now",
        ("occupancy", true) => "当前在馆人数",
        ("loans", false) => "Loans today",
        ("loans", true) => "今日借书",
        ("returns", false) => "Returns today",
        ("returns", true) => "今日还书",
        ("booth_sessions", false) => "Reading-booth sessions",
        ("booth_sessions", true) => "阅读亭使用次数",
        ("devices_online", false) => "Devices online",
        ("devices_online", true) => "在线设备",
        ("hourly", false) => "Visitors by hour",
        ("hourly", true) => "每小时到馆人次",
        ("today", false) => "Today",
        ("today", true) => "今天",
        ("last_week", false) => "Same day last week",
        ("last_week", true) => "上周同日",
        ("notice", false) => "Notice",
        ("notice", true) => "通知",
        ("updated", false) => "Updated",
        ("updated", true) => "更新于",
        (_, _) => "",
    }
}

/// A figure as shown: whole numbers without decimals.
pub(super) fn number(v: f64) -> String {
    if v.fract() == 0.0 && v.abs() < 9e15 {
        format!("{}", v as i64)
    } else {
        format!("{v:.1}")
    }
}

/// The hourly chart (today against the same weekday last week), or "" without one.
fn hourly_chart(lang: Language, snap: &Snapshot) -> String {
    let Some(h) = &snap.hourly else {
        return String::new();
    };
    let hours: Vec<String> = (0..24).map(|h| format!("{h:02}")).collect();
    chart::lines(
        &[
            Series {
                label: label(lang, "last_week"),
                values: h.last_week.iter().map(|v| Some(*v)).collect(),
                faint: true,
            },
            Series {
                label: label(lang, "today"),
                values: h.today.clone(),
                faint: false,
            },
        ],
        &hours,
        // Drawn small and scaled up by the page: the labels end up large on the screen.
        1200,
        330,
        30,
    )
}

/// The local time of the snapshot, `HH:MM`.
fn clock(snap: &Snapshot, tz: &jiff::tz::TimeZone) -> String {
    jiff::Timestamp::from_millisecond(snap.at_ms)
        .map(|t| t.to_zoned(tz.clone()).strftime("%H:%M").to_string())
        .unwrap_or_default()
}

/// The figures of an update by their metric names.
fn figures(tz: &jiff::tz::TimeZone, snap: &Snapshot) -> serde_json::Map<String, serde_json::Value> {
    let mut figures = serde_json::Map::new();
    for (name, v) in &snap.figures {
        figures.insert((*name).to_owned(), number(*v).into());
    }
    figures.insert(
        "devices_online".into(),
        format!("{} / {}", snap.devices_online, snap.devices_configured).into(),
    );
    figures.insert("updated".into(), clock(snap, tz).into());
    figures
}

/// Which tiles and chart the page has: the headline figures in order, and `+hourly` with
/// the chart. A page that was drawn for another layout (a reload changed the profiles'
/// rollups) loads itself again.
fn layout(snap: &Snapshot) -> String {
    let names: Vec<&str> = snap.figures.iter().map(|(n, _)| *n).collect();
    let chart = if snap.hourly.is_some() { "+hourly" } else { "" };
    format!("{}{chart}", names.join(","))
}

/// One update of the live stream: the page's layout, every figure by its metric name,
/// the notice, and the chart when it changed ("" otherwise: the page keeps the one it
/// has).
fn update(
    layout: &str,
    figures: &serde_json::Map<String, serde_json::Value>,
    notice: &Option<String>,
    chart: &str,
) -> String {
    serde_json::json!({ "layout": layout, "figures": figures, "chart": chart, "notice": notice })
        .to_string()
}

/// The whole page for `snap`.
pub(super) fn page(lang: Language, tz: &jiff::tz::TimeZone, snap: &Snapshot) -> String {
    let l = |k| label(lang, k);
    let mut tiles = String::new();
    for (name, v) in &snap.figures {
        tiles.push_str(&format!(
            r#"<section class="tile"><div class="label">{}</div><div class="value" data-metric="{name}">{}</div></section>"#,
            l(name),
            number(*v)
        ));
    }
    tiles.push_str(&format!(
        r#"<section class="tile small"><div class="label">{}</div><div class="value" data-metric="devices_online">{} / {}</div></section>"#,
        l("devices_online"),
        snap.devices_online,
        snap.devices_configured
    ));
    let chart = match &snap.hourly {
        Some(_) => format!(
            r#"<section class="chart"><h2>{}</h2><div id="chart" data-metric="{}_hourly">{}</div></section>"#,
            l("hourly"),
            snap.hourly.as_ref().map_or("", |h| h.metric),
            hourly_chart(lang, snap)
        ),
        None => String::new(),
    };
    let notice = snap.notice.as_deref().unwrap_or("");
    let lang_tag = match lang {
        Language::En => "en",
        Language::Zh => "zh-CN",
    };
    format!(
        r#"<!doctype html>
<html lang="{lang_tag}"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width,initial-scale=1">
<title>{title}</title>
<style>{STYLE}</style></head>
<body data-layout="{layout}">
<header><h1>{title}</h1><div class="updated">{updated} <span data-metric="updated">{clock}</span></div></header>
<aside id="notice" data-metric="notice"{hidden}><span class="tag">{notice_label}</span> <span id="notice-text">{notice_text}</span></aside>
<main class="tiles">{tiles}</main>
{chart}
<script>{SCRIPT}</script>
</body></html>"#,
        title = l("title"),
        layout = escape(&layout(snap)),
        updated = l("updated"),
        clock = clock(snap, tz),
        hidden = if notice.is_empty() { " hidden" } else { "" },
        notice_label = l("notice"),
        notice_text = escape(notice),
    )
}

/// The page's own script: apply each update of the stream (EventSource reconnects by
/// itself after a restart of the gateway), or load the page again when its layout changed.
const SCRIPT: &str = r#"
const es = new EventSource("/lobby/events" + location.search);
// Load the page again only once it answers (never leave a screen on an error page).
const again = () => fetch(location.href, { cache: "no-store" })
  .then((r) => { if (r.ok) location.reload(); else throw r; })
  .catch(() => setTimeout(again, 5000 + Math.random() * 10000));
es.onmessage = (e) => {
  const d = JSON.parse(e.data);
  if (d.layout !== document.body.dataset.layout) { es.close(); again(); return; }
  for (const [k, v] of Object.entries(d.figures))
    document.querySelectorAll(`[data-metric="${k}"]`).forEach((el) => { el.textContent = v; });
  const chart = document.getElementById("chart");
  if (chart && d.chart) chart.innerHTML = d.chart;
  const n = document.getElementById("notice");
  document.getElementById("notice-text").textContent = d.notice || "";
  n.hidden = !d.notice;
};
"#;

const STYLE: &str = r#"
:root { color-scheme: dark; }
* { box-sizing: border-box; }
html, body { margin: 0; height: 100%; }
body { background: #2e3440; color: #eceff4; overflow: hidden;
  font-family: "Noto Sans CJK SC", "WenQuanYi Micro Hei", "WenQuanYi Zen Hei", "Droid Sans Fallback", sans-serif;
  display: flex; flex-direction: column; padding: 2.5vmin 3vmin; gap: 2vmin; }
header { display: flex; justify-content: space-between; align-items: baseline; }
h1 { font-size: 6vmin; margin: 0; font-weight: 700; }
.updated { font-size: 3vmin; color: #a0a8b8; }
#notice { background: #ebcb8b; color: #2e3440; font-size: 4.5vmin; font-weight: 700;
  padding: 1.5vmin 2.5vmin; border-radius: 1.5vmin; }
#notice[hidden] { display: none; }
#notice .tag { background: #2e3440; color: #ebcb8b; padding: 0 1.5vmin; border-radius: 1vmin; }
.tiles { display: grid; grid-template-columns: repeat(3, 1fr); gap: 2vmin; }
.tile { background: #3b4252; border-radius: 2vmin; padding: 2vmin 2.5vmin; }
.label { font-size: 3.4vmin; color: #a0a8b8; }
.value { font-size: 11vmin; font-weight: 700; line-height: 1.1; color: #88c0d0;
  font-variant-numeric: tabular-nums; }
.tile.small .value { font-size: 8vmin; color: #a3be8c; }
.chart { flex: 1; min-height: 0; background: #3b4252; border-radius: 2vmin; padding: 1.5vmin 2vmin;
  display: flex; flex-direction: column; }
.chart h2 { font-size: 3.4vmin; margin: 0 0 1vmin; font-weight: 400; color: #a0a8b8; }
#chart { flex: 1; min-height: 0; }
#chart svg { width: 100%; height: 100%; }
@media (orientation: portrait) {
  .tiles { grid-template-columns: repeat(2, 1fr); flex: 1; grid-auto-rows: 1fr; }
  .tile { display: flex; flex-direction: column; justify-content: center; }
  .chart { flex: none; }
  #chart svg { height: auto; }
  .value { font-size: 16vmin; }
  .tile.small .value { font-size: 11vmin; }
  h1 { font-size: 7vmin; }
}
"#;

/// Renders each new snapshot's stream update once and hands it to every open stream, and
/// only when what a page shows changed (a commit that moves no lobby figure sends nothing;
/// the chart is drawn and sent only when its hours changed).
pub(super) struct Feed {
    pub rx: watch::Receiver<Arc<String>>,
}

impl Feed {
    /// Follow `live` until it closes (the gateway stops).
    pub fn start(
        mut live: watch::Receiver<Arc<Snapshot>>,
        lang: Language,
        tz: jiff::tz::TimeZone,
    ) -> Feed {
        let snap = live.borrow_and_update().clone();
        let mut shown = (
            figures(&tz, &snap),
            snap.notice.clone(),
            snap.hourly.clone(),
            layout(&snap),
        );
        let first = update(&shown.3, &shown.0, &shown.1, &hourly_chart(lang, &snap));
        let (tx, rx) = watch::channel(Arc::new(first));
        tokio::spawn(async move {
            while live.changed().await.is_ok() {
                let snap = live.borrow_and_update().clone();
                let now = (
                    figures(&tz, &snap),
                    snap.notice.clone(),
                    snap.hourly.clone(),
                    layout(&snap),
                );
                if now == shown {
                    continue;
                }
                let chart = match now.2 == shown.2 {
                    true => String::new(),
                    false => hourly_chart(lang, &snap),
                };
                let text = update(&now.3, &now.0, &now.1, &chart);
                shown = now;
                if tx.send(Arc::new(text)).is_err() {
                    return;
                }
            }
        });
        Feed { rx }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snapshot() -> Snapshot {
        Snapshot {
            branch: "b".into(),
            date: "2026-12-03".into(),
            at_ms: 0,
            figures: vec![("visitors_in", 1234.0), ("loans", 56.0)],
            notice: Some("<b>closing</b> at 9".into()),
            devices_online: 3,
            devices_configured: 4,
            ..Default::default()
        }
    }

    #[test]
    fn every_figure_carries_its_metric_and_the_notice_is_escaped() {
        let html = page(Language::Zh, &jiff::tz::TimeZone::UTC, &snapshot());
        assert!(html.contains(r#"data-metric="visitors_in">1234<"#));
        assert!(html.contains(r#"data-metric="loans">56<"#));
        assert!(html.contains(r#"data-metric="devices_online">3 / 4<"#));
        assert!(html.contains("今日到馆人次"));
        assert!(html.contains("&lt;b&gt;closing&lt;/b&gt; at 9"));
        assert!(!html.contains("<b>closing"));
        assert!(
            !html.contains("http://") && !html.contains("https://"),
            "nothing from elsewhere"
        );
    }

    /// The page says which layout it was drawn for, and so does every update: another
    /// plan (a reload) is another layout.
    #[test]
    fn the_layout_names_the_tiles_and_the_chart() {
        let snap = snapshot();
        let html = page(Language::En, &jiff::tz::TimeZone::UTC, &snap);
        assert!(
            html.contains(r#"<body data-layout="visitors_in,loans">"#),
            "{html}"
        );
        let more = Snapshot {
            figures: vec![("visitors_in", 1.0), ("occupancy", 1.0), ("loans", 2.0)],
            hourly: Some(crate::live::Hourly {
                metric: "visitors_in",
                today: vec![None; 24],
                last_week: vec![0.0; 24],
            }),
            ..snapshot()
        };
        assert_eq!(layout(&more), "visitors_in,occupancy,loans+hourly");
        let u: serde_json::Value = serde_json::from_str(&update(
            &layout(&more),
            &figures(&jiff::tz::TimeZone::UTC, &more),
            &None,
            "",
        ))
        .unwrap();
        assert_eq!(u["layout"], "visitors_in,occupancy,loans+hourly");
    }

    #[test]
    fn every_key_has_both_languages() {
        for key in [
            "title",
            "visitors_in",
            "occupancy",
            "loans",
            "returns",
            "booth_sessions",
            "devices_online",
            "hourly",
            "today",
            "last_week",
            "notice",
            "updated",
        ] {
            assert!(!label(Language::En, key).is_empty(), "{key}");
            assert!(!label(Language::Zh, key).is_empty(), "{key}");
        }
    }
}
