//! Wiring only: open the buffer, start the broker and intake, connect them with bounded
//! channels, and stop them in order when `shutdown` fires.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::broker::{Broker, BrokerSettings};
use crate::buffer::{Buffer, BufferOptions, Write};
use crate::config::{Loaded, SharedDevices};
use crate::intake::{IntakeSink, IntakeStats};

use crate::model::{DeviceId, Presence};
use crate::upstream::{Forwarder, UpstreamStats};

/// How often the gateway logs a one-line summary.
const SUMMARY_EVERY: Duration = Duration::from_secs(60);

#[derive(Debug, thiserror::Error)]
pub enum AppError {
    #[error(transparent)]
    Buffer(#[from] crate::buffer::BufferError),
    #[error(transparent)]
    Broker(#[from] crate::broker::BrokerError),
    #[error(transparent)]
    Tls(#[from] crate::upstream::TlsError),
    #[error("{lost} accepted messages could not be committed before the stop (see the buffer errors above)")]
    LostAtStop { lost: u64 },
    #[error(transparent)]
    OpenFiles(#[from] crate::service::OpenFilesError),
    #[error("devices[{device}].sip2: {message}")]
    Sip2 { device: String, message: String },
    #[error("api.listen {listen}: {source}")]
    Api {
        listen: std::net::SocketAddr,
        source: std::io::Error,
    },
}

/// Live figures of a running gateway, shared with the summary log and the demo.
#[derive(Debug, Default)]
pub struct Figures {
    pub intake: Arc<IntakeStats>,
    pub devices_online: Arc<AtomicUsize>,
    pub upstream: Arc<UpstreamStats>,
    pub commands: Arc<crate::commands::CommandStats>,
    /// Where commands can be handed in from inside the process (the demo), as the API does.
    pub command_requests: std::sync::OnceLock<mpsc::Sender<crate::model::CommandRequest>>,
}

/// Run the gateway until `shutdown` is cancelled; then stop intake, commit everything the
/// broker accepted, and return. `ready` is called once devices can connect.
pub async fn run(
    loaded: Loaded,
    shutdown: CancellationToken,
    figures: Arc<Figures>,
    ready: impl FnOnce(std::net::SocketAddr),
) -> Result<(), AppError> {
    // First of all: SIGHUP's default action would end the process.
    let hangup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup());
    let cfg = &loaded.config;
    let devices = SharedDevices::new(loaded.device_table());
    let configured: Vec<(DeviceId, String)> = cfg
        .devices
        .iter()
        .map(|d| (d.id.clone(), d.profile.clone()))
        .collect();

    // Before anything listens: a bad upstream certificate file is a clear error at start.
    let upstream_tls = match &cfg.upstream {
        Some(up) => crate::upstream::tls_config(up)?,
        None => None,
    };
    let db_path = loaded.database_path();
    // Committed rows go straight to the forwarder (see the buffer's design note).
    let (live_tx, live_rx) = match cfg.upstream {
        Some(_) => {
            let (tx, rx) = mpsc::channel(crate::buffer::LIVE_BATCHES);
            (Some(tx), Some(rx))
        }
        None => (None, None),
    };
    // Committed command changes go to the dispatcher.
    let (changes_tx, changes_rx) = mpsc::channel(crate::commands::CHANGES);
    let buffer = tokio::task::block_in_place(|| {
        Buffer::open(
            &db_path,
            BufferOptions {
                synchronous: cfg.storage.synchronous,
                rejected_keep: cfg.storage.rejected_keep,
                queue_capacity: cfg.storage.queue_capacity,
                max_bytes: cfg.storage.max_bytes,
                keep_delivered: cfg.storage.keep_delivered,
                live: live_tx,
                rollup_tz: cfg.gateway.time_zone(),
                rollups: cfg.storage.rollups,
                commands: Some(changes_tx),
            },
            &configured,
        )
    })?;
    let buffer_stats = buffer.stats();
    tracing::info!(
        path = %db_path.display(),
        last_seq = buffer_stats.last_seq.load(Ordering::Relaxed),
        "buffer open"
    );

    let b = &cfg.broker;
    let settings = BrokerSettings {
        listen: b.listen,
        listen_backlog: b.listen_backlog,
        max_connections: b.max_connections,
        max_connections_per_device: b.max_connections_per_device,
        max_pending_per_address: b.max_pending_per_address,
        max_sessions_per_device: b.max_sessions_per_device,
        connect_timeout: Duration::from_millis(b.connect_timeout_ms.into()),
        packet_timeout: Duration::from_millis(b.packet_timeout_ms),
        write_timeout: Duration::from_millis(b.write_timeout_ms),
        // Room for the topic and MQTT 5 properties on top of the largest payload.
        max_packet_bytes: loaded.max_payload().max(1024) + 1024,
        max_subscriptions: b.max_subscriptions,
        max_filter_bytes: b.max_filter_bytes,
        max_filters: b.max_filters,
        max_filters_per_device: b.max_filters_per_device,
        max_login_verifications: b.max_login_verifications,
        login_failure_delay: Duration::from_millis(b.login_failure_delay_ms),
        login_failure_delay_max: Duration::from_millis(b.login_failure_delay_max_ms),
    };
    crate::service::ensure_open_files(
        settings.max_connections,
        cfg.api.as_ref().map_or(0, |a| a.max_fds()),
    )?;
    let sink = Arc::new(IntakeSink::new(
        devices.clone(),
        buffer.sender(),
        buffer_stats.clone(),
        figures.intake.clone(),
    ));
    let (broker, branch_publisher, router_probe) =
        Broker::start(settings.clone(), devices.clone(), sink.clone()).await?;
    let (links_tx, links_rx) = mpsc::channel(crate::model::COMMAND_LINKS);
    broker.shared().report_command_links(links_tx.clone());
    let (central_tx, central_rx) = mpsc::channel(crate::model::FROM_CENTRAL);
    let (api_tx, api_rx) = mpsc::channel(crate::commands::API_REQUESTS);
    let _ = figures.command_requests.set(api_tx.clone());

    let tasks = tokio_util::task::TaskTracker::new();
    let presence = tasks.spawn(record_broker_events(
        broker.shared().clone(),
        buffer.sender(),
        figures.clone(),
        shutdown.clone(),
    ));
    let (serial_done, serial_commands) = start_serial(
        &loaded,
        &db_path,
        &sink,
        &buffer,
        broker.shared().clone(),
        &tasks,
        &shutdown,
    );
    start_sip2(
        &loaded,
        &sink,
        &buffer,
        broker.shared().clone(),
        &tasks,
        &shutdown,
    )
    .await?;
    let forwarder = cfg.upstream.clone().zip(live_rx).map(|(settings, live)| {
        tracing::info!(url = %settings.url, prefix = %settings.topic_prefix, "forwarding to the central broker");
        let forwarder = Forwarder {
            settings,
            branch: cfg.gateway.branch_id.clone(),
            database: db_path.clone(),
            // The envelope adds ~200 bytes of metadata to the largest payload.
            max_packet_bytes: loaded.max_payload().max(1024) + 4096,
            writer: buffer.marks(),
            buffer: buffer_stats.clone(),
            stats: figures.upstream.clone(),
            devices_online: figures.devices_online.clone(),
            tls: upstream_tls.clone(),
            live,
            from_central: Some(central_tx.clone()),
        };
        tasks.spawn(forwarder.run(shutdown.clone()))
    });
    if forwarder.is_none() {
        tracing::info!("no [upstream] configured: buffering and serving locally only");
    }
    drop(central_tx);
    tasks.spawn(
        crate::commands::Dispatcher {
            devices: devices.clone(),
            writer: buffer.sender(),
            buffer: buffer_stats.clone(),
            database: db_path.clone(),
            changes: changes_rx,
            links: links_rx,
            links_tx: links_tx.clone(),
            central: central_rx,
            api: api_rx,
            serial: serial_commands,
            publisher: branch_publisher.clone(),
            max_per_device: cfg.commands.max_per_device,
            stats: figures.commands.clone(),
        }
        .run(shutdown.clone()),
    );
    // Today's live figures, for `branch/summary/live` and the lobby page alike.
    let (plan_tx, plan_rx) = tokio::sync::watch::channel(crate::live::Plan::from_profiles(
        loaded.profiles.values().map(|p| p.as_ref()),
    ));
    let (live_tx, live_figures) =
        tokio::sync::watch::channel(Arc::new(crate::live::Snapshot::default()));
    tasks.spawn(crate::live::run(
        crate::live::Inputs {
            database: db_path.clone(),
            tz: cfg.gateway.time_zone(),
            branch: cfg.gateway.branch_id.clone(),
            buffer: buffer_stats.clone(),
            devices_online: figures.devices_online.clone(),
        },
        plan_rx,
        live_tx,
        shutdown.clone(),
    ));
    if let Some(api) = &cfg.api {
        let listener = tokio::net::TcpListener::bind(api.listen)
            .await
            .map_err(|source| AppError::Api {
                listen: api.listen,
                source,
            })?;
        let state = crate::api::ApiState {
            database: db_path.clone(),
            token: Arc::from(api.token.as_str()),
            tz: cfg.gateway.time_zone(),
            branch: cfg.gateway.branch_id.clone(),
            buffer: buffer_stats.clone(),
            upstream: cfg.upstream.as_ref().map(|_| figures.upstream.clone()),
            intake: figures.intake.clone(),
            devices_online: figures.devices_online.clone(),
            commands: api_tx.clone(),
            live: live_figures.clone(),
            language: cfg.gateway.language,
            storage_cap_bytes: cfg.storage.max_bytes,
            kiosks: cfg
                .devices
                .iter()
                .filter(|d| d.sip2.is_some())
                .map(|d| d.id.clone())
                .collect(),
        };
        tracing::info!(
            listen = %api.listen,
            max_connections = api.max_connections,
            max_requests = api.max_requests,
            readers = api.readers,
            "HTTP API listening"
        );
        let (api, stop) = (api.clone(), shutdown.clone());
        tasks.spawn(async move { crate::api::serve(listener, &api, state, stop).await });
    }
    tasks.spawn(publish_live_summary(
        branch_publisher,
        live_figures.clone(),
        shutdown.clone(),
    ));
    if cfg.upstream.as_ref().is_some_and(|u| u.push_summaries) {
        tasks.spawn(push_hourly_summaries(
            db_path.clone(),
            buffer.sender(),
            cfg.gateway.time_zone(),
            shutdown.clone(),
        ));
    }
    tasks.spawn(maintain_periodically(buffer.sender(), shutdown.clone()));
    tasks.spawn(log_summaries(
        figures.clone(),
        buffer_stats.clone(),
        shutdown.clone(),
    ));
    let status = status_line(
        devices.clone(),
        figures.clone(),
        buffer_stats.clone(),
        cfg.upstream.is_some(),
    );
    tasks.spawn(crate::service::supervise(
        router_probe,
        buffer.sender(),
        buffer_stats.clone(),
        status.clone(),
        shutdown.clone(),
    ));
    tasks.spawn(reload_on_sighup(
        hangup,
        loaded.clone(),
        Reloaded {
            broker: broker.shared().clone(),
            devices: devices.clone(),
            writer: buffer.sender(),
            plan: plan_tx,
        },
        status.clone(),
        shutdown.clone(),
    ));
    tasks.close();

    tracing::info!(
        listen = %settings.listen,
        branch = %cfg.gateway.branch_id,
        devices = cfg.devices.len(),
        max_packet_bytes = settings.max_packet_bytes,
        "gateway ready: devices can connect"
    );
    ready(settings.listen);
    // The broker accepts connections, the buffer is open and the API listens.
    crate::service::notify_ready(&status());

    shutdown.cancelled().await;
    crate::service::notify_stopping();
    buffer_stats.stopping.store(true, Ordering::Relaxed);
    tracing::info!("shutting down: closing device connections, draining intake");
    broker.close_connections();
    // Serial readers stop on `shutdown`; what they decoded is queued before intake closes.
    let _ = stage("serial readers", serial_done).await;
    sink.close();
    drop(broker);
    let _ = stage("presence events", presence).await;
    if let Some(f) = forwarder {
        let _ = stage("forwarder", f).await;
    }
    let closed = stage(
        "buffer writer",
        tokio::task::spawn_blocking(move || buffer.close()),
    )
    .await;
    stage("background tasks", tasks.wait()).await;
    match closed {
        Ok(Ok(())) => tracing::info!(
            committed = buffer_stats.messages_committed.load(Ordering::Relaxed),
            transactions = buffer_stats.transactions.load(Ordering::Relaxed),
            last_seq = buffer_stats.last_seq.load(Ordering::Relaxed),
            "buffer flushed; stopped"
        ),
        Ok(Err(e)) => tracing::error!(error = %e, "buffer did not close cleanly"),
        Err(e) => tracing::error!(error = %e, "buffer close task failed"),
    }
    match buffer_stats.lost_at_stop.load(Ordering::Relaxed) {
        0 => Ok(()),
        lost => Err(AppError::LostAtStop { lost }),
    }
}

/// Await one step of the shutdown; while it takes long, say which one every few seconds,
/// so a stop that systemd ends with SIGKILL leaves a log line naming what hung.
async fn stage<T>(name: &'static str, step: impl std::future::Future<Output = T>) -> T {
    const REPORT_EVERY: Duration = Duration::from_secs(3);
    let started = tokio::time::Instant::now();
    tokio::pin!(step);
    loop {
        match tokio::time::timeout(REPORT_EVERY, &mut step).await {
            Ok(done) => {
                tracing::debug!(
                    stage = name,
                    took_ms = started.elapsed().as_millis() as u64,
                    "shutdown step done"
                );
                return done;
            }
            Err(_) => tracing::warn!(
                stage = name,
                waited_s = started.elapsed().as_secs(),
                "shutdown still waiting"
            ),
        }
    }
}

/// Start one SIP2 tap per tapped kiosk (its listener bound now: a taken port stops the
/// start with a clear error) and the task that hands what they derive to intake (through
/// the kiosk's profile and rate limit, like an MQTT message) and to the counters.
async fn start_sip2(
    loaded: &Loaded,
    sink: &Arc<IntakeSink>,
    buffer: &Buffer,
    board: Arc<crate::broker::Shared>,
    tasks: &tokio_util::task::TaskTracker,
    shutdown: &CancellationToken,
) -> Result<(), AppError> {
    use crate::sip2::{Kiosk, Sip2Event};
    let (events_tx, mut events) = mpsc::channel(crate::sip2::EVENT_QUEUE);
    let mut any = false;
    for d in &loaded.config.devices {
        let Some(section) = &d.sip2 else { continue };
        let fail = |message: String| AppError::Sip2 {
            device: d.id.clone(),
            message,
        };
        let tls = match section.tls {
            false => None,
            true => {
                let roots = crate::config::file::root_store(section.ca_file.as_deref())
                    .map_err(|e| fail(format!("TLS to the ILS: {e}")))?;
                Some(Arc::new(
                    rustls::ClientConfig::builder()
                        .with_root_certificates(roots)
                        .with_no_client_auth(),
                ))
            }
        };
        let listener = tokio::net::TcpListener::bind(section.listen)
            .await
            .map_err(|e| fail(format!("listen {}: {e}", section.listen)))?;
        tracing::info!(device = %d.id, listen = %section.listen, ils = %section.ils, tls = section.tls, "SIP2 tap listening for the kiosk");
        let kiosk = Kiosk {
            device: d.id.clone(),
            section: section.clone(),
            tls,
        };
        tasks.spawn(crate::sip2::run(
            kiosk,
            listener,
            events_tx.clone(),
            shutdown.clone(),
        ));
        any = true;
    }
    drop(events_tx);
    if !any {
        return Ok(());
    }
    let (sink, writer) = (sink.clone(), buffer.sender());
    tasks.spawn(async move {
        // Kiosk connections linked to the ILS, per kiosk: online while there is one.
        let mut linked: HashMap<DeviceId, usize> = HashMap::new();
        let mut tally = tokio::time::interval(Duration::from_secs(1));
        tally.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let ev = tokio::select! {
                ev = events.recv() => match ev {
                    Some(ev) => ev,
                    None => break,
                },
                _ = tally.tick() => {
                    count_sip2_dropped(&writer).await;
                    continue;
                }
            };
            match ev {
                Sip2Event::Link { device, up } => {
                    let n = linked.entry(device.clone()).or_default();
                    let was = *n;
                    *n = if up { was + 1 } else { was.saturating_sub(1) };
                    board.presence.update(&device, up);
                    if (was == 0) == up {
                        let status: &[u8] = if up { b"online" } else { b"offline" };
                        sink.submit_own(format!("devices/{device}/status").as_bytes(), status);
                    }
                }
                Sip2Event::Message {
                    device,
                    kind,
                    payload,
                } => {
                    sink.submit(
                        format!("devices/{device}/{kind}").as_bytes(),
                        payload.as_bytes(),
                        None,
                    );
                }
                Sip2Event::Counted { device, what, n } => {
                    let w = Write::Denied {
                        device,
                        what,
                        count: n,
                        at_ms: crate::model::now_ms(),
                        receipt: None,
                    };
                    let _ = writer.send(w).await;
                }
            }
        }
        count_sip2_dropped(&writer).await;
    });
    Ok(())
}

/// Count what the SIP2 taps dropped on a full queue (see `sip2::offer`), per kiosk.
async fn count_sip2_dropped(writer: &mpsc::Sender<Write>) {
    for (device, n) in crate::sip2::take_dropped() {
        let w = Write::Denied {
            device,
            what: "sip2_events_dropped",
            count: n,
            at_ms: crate::model::now_ms(),
            receipt: None,
        };
        let _ = writer.send(w).await;
    }
}

/// Start one reader per serial device and the task that turns their events into intake
/// messages (telemetry, `online`/`offline` status), presence and counters.
fn start_serial(
    loaded: &Loaded,
    db_path: &std::path::Path,
    sink: &Arc<IntakeSink>,
    buffer: &Buffer,
    board: Arc<crate::broker::Shared>,
    tasks: &tokio_util::task::TaskTracker,
    shutdown: &CancellationToken,
) -> (tokio::task::JoinHandle<()>, crate::serial::Commands) {
    use crate::serial::{decode::CounterState, SerialDevice, SerialEvent};
    let devices: Vec<SerialDevice> = loaded
        .config
        .devices
        .iter()
        .filter_map(|d| {
            let port = d.serial.clone()?;
            let spec = loaded.profiles.get(&d.profile)?.serial.clone()?;
            Some(SerialDevice {
                device: d.id.clone(),
                port,
                spec: Arc::new(spec),
            })
        })
        .collect();
    let mut commands = crate::serial::Commands::default();
    let (events_tx, mut events) = mpsc::channel(crate::serial::EVENT_QUEUE);
    if !devices.is_empty() {
        // Counters resume from each device's newest stored telemetry.
        let stored = tokio::task::block_in_place(|| {
            let conn = crate::buffer::open_read_only(db_path).ok();
            devices
                .iter()
                .map(|d| {
                    conn.as_ref()
                        .and_then(|c| crate::buffer::last_telemetry(c, &d.device).ok().flatten())
                })
                .collect::<Vec<_>>()
        });
        for (dev, last) in devices.into_iter().zip(stored) {
            let counters = CounterState::from_stored(&dev.spec, last.as_deref());
            let (tx, rx) = mpsc::channel(crate::serial::COMMAND_QUEUE);
            commands.insert(dev.device.clone(), dev.spec.clone(), tx);
            tasks.spawn(crate::serial::run(
                dev,
                counters,
                events_tx.clone(),
                rx,
                shutdown.clone(),
            ));
        }
    }
    drop(events_tx);
    let sink = sink.clone();
    let writer = buffer.sender();
    let presence = board;
    let done = tokio::spawn(async move {
        let presence = &presence.presence;
        let mut online: HashMap<DeviceId, bool> = HashMap::new();
        while let Some(ev) = events.recv().await {
            let now = crate::model::now_ms();
            let (device, up, reason) = match ev {
                SerialEvent::Telemetry { device, payload } => {
                    // Through the profile's rate limit like any device message; a refused
                    // line is counted (`rate_limited`), as a refused MQTT publish is.
                    sink.submit(
                        format!("devices/{device}/telemetry").as_bytes(),
                        payload.as_bytes(),
                        None,
                    );
                    continue;
                }
                SerialEvent::Counted { device, what } => {
                    let w = Write::Denied {
                        device,
                        what,
                        count: 1,
                        at_ms: now,
                        receipt: None,
                    };
                    let _ = writer.send(w).await;
                    continue;
                }
                SerialEvent::Online { device } => (device, true, String::new()),
                SerialEvent::Offline { device, reason } => (device, false, reason),
            };
            // Presence changes only: a port that keeps failing to open stays one `offline`.
            let was = online.insert(device.clone(), up);
            if was == Some(up) {
                continue;
            }
            tracing::info!(device = %device, online = up, reason = %reason, "device presence");
            let status: &[u8] = if up { b"online" } else { b"offline" };
            // The gateway's own word on the line, not the device's: never rate-limited.
            sink.submit_own(format!("devices/{device}/status").as_bytes(), status);
            // Recorded with the broker's devices (time online included); a port that
            // never opened is recorded offline once.
            if up || was == Some(true) {
                presence.update(&device, up);
            } else {
                let _ = writer
                    .send(Write::Presence(Presence {
                        device,
                        online: false,
                        at_ms: now,
                        connects: 0,
                        disconnects: 0,
                        online_pieces: Vec::new(),
                        online_recorded_to: None,
                    }))
                    .await;
            }
        }
    });
    (done, commands)
}

/// How often the hourly push checks whether an hour has closed.
const HOUR_CHECK_EVERY: Duration = Duration::from_secs(30);

/// Queue each closed hour's branch summary in the outbox (it goes upstream to
/// `{prefix}/summaries/hour` like any message: at least once, in order). At start the most
/// recent closed hour is queued again (the central side keys summaries by hour); hours
/// missed while the gateway was down come from the pull API.
async fn push_hourly_summaries(
    db: std::path::PathBuf,
    writer: mpsc::Sender<Write>,
    tz: jiff::tz::TimeZone,
    shutdown: CancellationToken,
) {
    use crate::summary::{bucket, Period};
    let mut tick = tokio::time::interval(HOUR_CHECK_EVERY);
    let mut pushed: Option<i64> = None;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        let now = crate::model::now_ms();
        let (current, _) = bucket(&tz, now, Period::Hour);
        let (closed, label) = bucket(&tz, current - 1, Period::Hour);
        if pushed == Some(closed) {
            continue;
        }
        let db2 = db.clone();
        let figures = tokio::task::spawn_blocking(move || {
            let conn = crate::buffer::open_read_only(&db2).ok()?;
            crate::buffer::bucket_figures(&conn, "hour", closed).ok()
        })
        .await
        .ok()
        .flatten();
        let Some(figures) = figures else { continue };
        let metrics: serde_json::Map<String, serde_json::Value> = figures
            .into_iter()
            .map(|(k, v)| (k, crate::summary::json_number(v)))
            .collect();
        let start = jiff::Timestamp::from_millisecond(closed)
            .map(|t| {
                t.to_zoned(tz.clone())
                    .strftime("%Y-%m-%dT%H:%M:%S%:z")
                    .to_string()
            })
            .unwrap_or_default();
        let payload = serde_json::json!({ "hour": label, "start": start, "metrics": metrics });
        let summary = crate::model::Accepted {
            device: String::new(),
            profile: String::new(),
            kind: crate::model::Kind::Summary,
            received_ms: now,
            payload: payload.to_string(),
            rollup_ms: None,
            contributions: Default::default(),
        };
        if writer.send(Write::Accepted(summary, None)).await.is_err() {
            return;
        }
        tracing::info!(hour = %label, "hourly summary queued for upstream");
        pushed = Some(closed);
    }
}

/// Publish each new live snapshot ([`crate::live`]), retained on `branch/summary/live`,
/// for lobby screens that are MQTT clients (they subscribe read-only).
async fn publish_live_summary(
    publisher: crate::broker::BranchPublisher,
    mut live: tokio::sync::watch::Receiver<Arc<crate::live::Snapshot>>,
    shutdown: CancellationToken,
) {
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            changed = live.changed() => if changed.is_err() { return },
        }
        let payload = live.borrow_and_update().to_json().to_string();
        if let Err(e) = publisher
            .publish_retained("branch/summary/live", payload.into_bytes())
            .await
        {
            tracing::warn!(error = %e, "cannot publish the live summary");
        }
    }
}

/// How often the time online of connected devices is recorded (their `online_minutes`
/// grow while they stay connected; after a crash, what follows the last record up to the
/// last commit is added at the next start).
const ONLINE_ACCRUAL_EVERY: Duration = Duration::from_secs(60);

/// Record presence changes and broker refusals in the buffer, both taken from the broker's
/// boards (which count everything and lose nothing; refusals that concern no configured
/// device are counted under the empty device id). Presence is logged at most once per
/// device per 10 s, with the connects and disconnects since the last line. At shutdown,
/// what is pending is written once more and the task ends.
async fn record_broker_events(
    board: Arc<crate::broker::Shared>,
    writer: mpsc::Sender<Write>,
    figures: Arc<Figures>,
    shutdown: CancellationToken,
) {
    // Bounded by the configured devices.
    let mut presence_log = crate::burst::BurstLimiter::new(10_000, 4096);
    let mut unlogged: HashMap<DeviceId, (u64, u64)> = HashMap::new();
    // Tests shorten the period (`BRANCH_GATEWAY_TEST_ACCRUAL_MS`).
    let every = std::env::var("BRANCH_GATEWAY_TEST_ACCRUAL_MS")
        .ok()
        .and_then(|v| v.parse().ok())
        .map_or(ONLINE_ACCRUAL_EVERY, Duration::from_millis);
    let mut accrual = tokio::time::interval(every);
    accrual.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        // (stop, accrue): time online of open connections is recorded on every tick and
        // at the stop, which closes them at the stop time.
        let (stop, accrue) = tokio::select! {
            _ = board.presence.changed.notified() => (false, false),
            _ = board.denials.changed.notified() => (false, false),
            _ = accrual.tick() => (false, true),
            _ = shutdown.cancelled() => (true, true),
        };
        let now = crate::model::now_ms();
        for (device, what, count) in board.denials.take() {
            let w = Write::Denied {
                device: device.unwrap_or_default(),
                what: what.as_str(),
                count,
                at_ms: now,
                receipt: None,
            };
            if writer.send(w).await.is_err() {
                return;
            }
        }
        for change in board.presence.take_changes(accrue) {
            if change.connects > 0 || change.disconnects > 0 {
                let churn = unlogged.entry(change.device.clone()).or_insert((0, 0));
                churn.0 += u64::from(change.connects);
                churn.1 += u64::from(change.disconnects);
                if presence_log.hit(&change.device, now).is_some() {
                    let (connects, disconnects) =
                        unlogged.remove(&change.device).unwrap_or_default();
                    tracing::info!(
                        device = %change.device,
                        online = change.online,
                        connects,
                        disconnects,
                        "device presence"
                    );
                }
            }
            if writer.send(Write::Presence(change)).await.is_err() {
                return;
            }
        }
        figures
            .devices_online
            .store(board.presence.online_count(), Ordering::Relaxed);
        if stop {
            return;
        }
    }
}

/// What a reload changes in the running gateway.
struct Reloaded {
    broker: Arc<crate::broker::Shared>,
    devices: SharedDevices,
    writer: mpsc::Sender<Write>,
    plan: tokio::sync::watch::Sender<crate::live::Plan>,
}

/// `systemctl reload` (SIGHUP): re-read the config file and the profiles. Device changes
/// (added, removed, new password or profile, privacy key) and the profiles' rollups (what
/// the live figures show) take effect at once without
/// touching other connections or the buffer; an invalid file is refused and the running
/// config stays; changes only a restart applies are named in the log.
async fn reload_on_sighup(
    hangup: std::io::Result<tokio::signal::unix::Signal>,
    // What is running: sections needing a restart are compared with this one forever.
    running: Loaded,
    to: Reloaded,
    status: impl Fn() -> String + Send + 'static,
    shutdown: CancellationToken,
) {
    let Reloaded {
        broker,
        devices,
        writer,
        plan,
    } = to;
    let Ok(mut hangup) = hangup else {
        tracing::warn!("cannot listen for SIGHUP: reload unavailable");
        return;
    };
    let Loaded {
        path, raw: started, ..
    } = running;
    let mut applied = started.clone();
    let rollups_at_start = devices.load().rollups;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = hangup.recv() => {}
        }
        crate::service::notify_reloading();
        let load = {
            let path = path.clone();
            // The error names keys and lines, never config text (`config::load`).
            tokio::task::spawn_blocking(move || {
                crate::config::load(&path).map_err(|e| e.to_string())
            })
            .await
        };
        match load {
            Ok(Ok(loaded)) => {
                let raw = loaded.raw.clone();
                let (added, removed, changed) = crate::config::device_changes(&applied, &raw);
                // `[storage]` waits for a restart (named below), `rollups` with it: the
                // writer's setting is fixed at start.
                let mut table = loaded.device_table();
                table.rollups = rollups_at_start;
                devices.store(table);
                // Open connections of removed or changed devices log in again (or not).
                let revoked: Vec<DeviceId> = removed.iter().chain(&changed).cloned().collect();
                broker.revoke(&revoked);
                let list = loaded
                    .config
                    .devices
                    .iter()
                    .map(|d| (d.id.clone(), d.profile.clone()))
                    .collect();
                let _ = writer.send(Write::Configured(list)).await;
                // The live figures follow the profiles' rollups.
                let new_plan =
                    crate::live::Plan::from_profiles(loaded.profiles.values().map(|p| p.as_ref()));
                plan.send_if_modified(|p| {
                    let changed = *p != new_plan;
                    *p = new_plan;
                    changed
                });
                tracing::info!(
                    path = %path.display(),
                    devices = loaded.config.devices.len(),
                    ?added,
                    ?removed,
                    ?changed,
                    "configuration reloaded: device changes in effect"
                );
                let restart = crate::config::needs_restart(&started, &raw);
                if !restart.is_empty() {
                    tracing::warn!(
                        changes = %restart.join(", "),
                        "these changes take effect only after a restart (systemctl restart branch-gateway)"
                    );
                }
                applied = raw;
            }
            Ok(Err(e)) => tracing::error!(
                error = %e,
                "reload refused: the new configuration is invalid; the running one stays"
            ),
            Err(e) => tracing::error!(error = %e, "reload failed"),
        }
        crate::service::notify_ready(&status());
    }
}

/// The one-line health for `systemctl status` (sd_notify `STATUS=`).
fn status_line(
    devices: SharedDevices,
    figures: Arc<Figures>,
    buffer: Arc<crate::buffer::BufferStats>,
    has_upstream: bool,
) -> impl Fn() -> String + Send + Clone + 'static {
    move || {
        let upstream = if !has_upstream {
            "no upstream".to_owned()
        } else {
            let up = &figures.upstream;
            format!(
                "upstream {}, backlog {}",
                if up.connected.load(Ordering::Relaxed) {
                    "connected"
                } else {
                    "disconnected"
                },
                up.backlog.load(Ordering::Relaxed)
            )
        };
        let storage = if buffer.last_commit_failed.load(Ordering::Relaxed) {
            "storage FAILING (see log)"
        } else {
            "storage ok"
        };
        format!(
            "{}/{} devices online, {}, {}",
            figures.devices_online.load(Ordering::Relaxed),
            devices.load().devices.len(),
            upstream,
            storage
        )
    }
}

/// Ask the writer to prune and check the disk cap every 10 s (it also checks after any
/// commit that finds the database over its high-water mark).
async fn maintain_periodically(writer: mpsc::Sender<Write>, shutdown: CancellationToken) {
    let mut tick = tokio::time::interval(Duration::from_secs(10));
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {
                if writer.send(Write::Maintain).await.is_err() {
                    return;
                }
            }
        }
    }
}

async fn log_summaries(
    figures: Arc<Figures>,
    buffer: Arc<crate::buffer::BufferStats>,
    shutdown: CancellationToken,
) {
    let mut tick = tokio::time::interval(SUMMARY_EVERY);
    tick.tick().await;
    let (mut last_acc, mut last_rej) = (0, 0);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        let acc = figures.intake.accepted.load(Ordering::Relaxed);
        let rej = figures.intake.rejected.load(Ordering::Relaxed);
        tracing::info!(
            accepted = acc - last_acc,
            rejected = rej - last_rej,
            devices_online = figures.devices_online.load(Ordering::Relaxed),
            committed_total = buffer.messages_committed.load(Ordering::Relaxed),
            last_seq = buffer.last_seq.load(Ordering::Relaxed),
            commit_errors = buffer.commit_errors.load(Ordering::Relaxed),
            writer_waits = figures.intake.writer_waits.load(Ordering::Relaxed),
            "intake in the last minute"
        );
        (last_acc, last_rej) = (acc, rej);
    }
}
