//! `branch-gateway`: the command line. Parses arguments, sets up logging, loads the config
//! and hands over to `app::run` (or a tool command).

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};

mod quarantine_cli;
use tokio_util::sync::CancellationToken;

use branch_gateway::model::{ago, ago_secs};
use branch_gateway::{app, buffer, config, model, simulate};

#[derive(Parser)]
#[command(
    name = "branch-gateway",
    version,
    about = "Edge gateway for public-library branches: embedded MQTT broker, device profiles, durable SQLite buffer"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the gateway (broker, intake, buffer) until SIGTERM or SIGINT.
    Run {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Check a config file and every device profile it uses; exit non-zero on any problem.
    CheckConfig {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Show every device: online or offline, last seen, messages accepted and rejected.
    Devices {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// A summary for branch IT: devices, buffer, backlog and drain ETA, upstream, drops, disk.
    Status {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Play realistic traffic as every MQTT device of the config (for a branch with no
    /// devices), or with `gate-counter --pty --link PATH` a serial gate counter on a
    /// pseudo-terminal linked at PATH.
    Simulate {
        /// `gate-counter`: a serial device instead of the config's MQTT devices.
        what: Option<SimulatedDevice>,
        #[arg(long, short, required_unless_present = "what")]
        config: Option<PathBuf>,
        /// Serial: create a pseudo-terminal (the only transport the simulator has).
        #[arg(long, requires = "what")]
        pty: bool,
        /// Serial: where to link the pty, e.g. the `serial.path` of a device in the config.
        #[arg(long, requires = "what")]
        link: Option<PathBuf>,
        /// Serial: the wire format (text lines, binary frames with CRC-8, Modbus RTU replies).
        #[arg(long, value_enum, default_value = "text")]
        format: SerialFormat,
        /// Serial: milliseconds between frames (text and evo; modbus answers polls).
        #[arg(long, default_value_t = 1000)]
        interval_ms: u64,
        /// Time acceleration: 10 = ten times as many messages as real devices send.
        #[arg(long, default_value_t = 1.0)]
        speed: f64,
        /// About one message in N is deliberately invalid (0 = never).
        #[arg(long, default_value_t = 50)]
        invalid_every: u32,
        /// Stop after this many seconds.
        #[arg(long)]
        seconds: Option<u64>,
    },
    /// Run the bundled example branch: the gateway plus simulated devices, printing what flows.
    Demo {
        #[arg(long, short, default_value = "gateway.example.toml")]
        config: PathBuf,
        /// Stop after this many seconds (default: until Ctrl-C).
        #[arg(long)]
        seconds: Option<u64>,
        #[arg(long, default_value_t = 20.0)]
        speed: f64,
    },
    /// Read a device secret from standard input and print its argon2id hash for the config.
    HashPassword,
    /// What central refused: list, retry (rows keep their seq) or drop.
    Quarantine {
        #[command(subcommand)]
        action: quarantine_cli::Action,
    },
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum SimulatedDevice {
    GateCounter,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum SerialFormat {
    Text,
    Evo,
    Modbus,
}

fn main() -> ExitCode {
    limit_malloc_arenas();
    // One process-wide TLS provider (ring), chosen explicitly rather than by feature luck.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let cli = Cli::parse();
    match dispatch(cli.command) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn dispatch(command: Command) -> anyhow::Result<ExitCode> {
    match command {
        Command::CheckConfig { config } => Ok(check_config(&config)),
        Command::HashPassword => {
            let mut secret = String::new();
            std::io::stdin().read_line(&mut secret)?;
            let secret = secret.trim_end_matches(['\r', '\n']);
            anyhow::ensure!(!secret.is_empty(), "no secret on standard input");
            println!("{}", config::Password::hash(secret));
            Ok(ExitCode::SUCCESS)
        }
        Command::Status { config } => {
            let loaded = load(&config)?;
            print_status(&loaded)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Quarantine { action } => {
            let loaded = load(action.config())?;
            quarantine_cli::run(&loaded, action)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Devices { config } => {
            let loaded = load(&config)?;
            print_devices(&loaded)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Run { config } => {
            let loaded = load(&config)?;
            init_logging(&loaded.config.gateway.log_level);
            let runtime = runtime()?;
            let result = runtime.block_on(async {
                let shutdown = CancellationToken::new();
                spawn_signal_handler(shutdown.clone());
                app::run(loaded, shutdown, Default::default(), |_| {}).await
            });
            // Everything accepted is committed by now. Dropping a runtime waits without
            // limit for blocking work still running (a reader query, a held serial
            // reader); it must not keep a stopping service alive.
            runtime.shutdown_timeout(Duration::from_secs(2));
            result?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Simulate {
            what: Some(SimulatedDevice::GateCounter),
            link,
            format,
            interval_ms,
            seconds,
            ..
        } => {
            use branch_gateway::serial::sim;
            init_logging("info");
            let link = link.unwrap_or_else(|| PathBuf::from("./gate-counter.pty"));
            let format = match format {
                SerialFormat::Text => sim::CounterFormat::Text,
                SerialFormat::Evo => sim::CounterFormat::Evo,
                SerialFormat::Modbus => sim::CounterFormat::Modbus,
            };
            runtime()?.block_on(async {
                let shutdown = CancellationToken::new();
                spawn_signal_handler(shutdown.clone());
                stop_after(seconds, &shutdown);
                let pty = sim::Pty::open(&link)?;
                println!(
                    "gate counter on {} (linked at {}); Ctrl-C to stop",
                    pty.device.display(),
                    link.display()
                );
                let counter = sim::GateCounter::new(format, model::now_ms() as u64);
                sim::play(pty, counter, Duration::from_millis(interval_ms), shutdown).await;
                let _ = std::fs::remove_file(&link);
                anyhow::Ok(())
            })?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Simulate {
            config,
            speed,
            invalid_every,
            seconds,
            ..
        } => {
            let config = config.context("--config is required")?;
            let loaded = load(&config)?;
            init_logging(&loaded.config.gateway.log_level);
            let report = runtime()?.block_on(async {
                let shutdown = CancellationToken::new();
                spawn_signal_handler(shutdown.clone());
                let opts = simulate::SimOptions {
                    broker: loaded.config.broker.listen,
                    speed,
                    invalid_every,
                    duration: seconds.map(Duration::from_secs),
                    only: Vec::new(),
                    seed: model::now_ms() as u64,
                };
                simulate::run(&loaded, opts, shutdown).await
            });
            println!(
                "simulated {} devices: {} valid and {} invalid messages published, {} acknowledged",
                report.devices, report.published_valid, report.published_invalid, report.acked
            );
            for (id, why) in &report.skipped_devices {
                println!("skipped {id}: {why}");
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Demo {
            config,
            seconds,
            speed,
        } => {
            let loaded = load(&config)?;
            init_logging("error");
            runtime()?.block_on(demo(loaded, seconds, speed))?;
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// glibc gives every thread that allocates its own malloc arena; connections move between
/// runtime threads, so memory freed on one thread is kept in several arenas. Two arenas
/// keep the resident size near what is live (measured: 70 MiB -> 55 MiB peak under load).
/// And a fixed mmap threshold: glibc otherwise raises it to the size of each large block
/// freed, so argon2's 19 MiB per password check came from the heap and stayed there (a
/// flood of wrong passwords peaked at 127 MiB and kept 51 MiB); above 1 MiB a block is
/// now mapped, and returned when freed.
fn limit_malloc_arenas() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator tuning; called before any other thread exists.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 2);
        libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 20);
    }
}

fn load(path: &Path) -> anyhow::Result<config::Loaded> {
    Ok(config::load(path)?)
}

fn check_config(path: &Path) -> ExitCode {
    match config::load(path) {
        Ok(loaded) => {
            let plural =
                |n: usize, word: &str| format!("{n} {word}{}", if n == 1 { "" } else { "s" });
            let names: Vec<&str> = loaded.profiles.keys().map(String::as_str).collect();
            let profiles = match names.is_empty() {
                true => plural(0, "profile"),
                false => format!("{}: {}", plural(names.len(), "profile"), names.join(", ")),
            };
            println!(
                "{}: ok ({}, {profiles})",
                path.display(),
                plural(loaded.config.devices.len(), "device"),
            );
            for w in loaded.config.warnings() {
                println!("warning: {w}");
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

/// The gateway's own tasks. Device connections run on the broker's runtime
/// ([`branch_gateway::broker::Broker`]), so connections held while SQLite catches up do not
/// take this runtime's threads; only serial readers and last wills wait here.
fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("gateway")
        .build()
        .context("cannot start the async runtime")
}

/// `RUST_LOG` wins over the config's level. rumqttd logs every disconnect as an error;
/// the gateway reports connections itself, so rumqttd is quiet unless asked for. The
/// `sip2` crate is always silent: it logs SIP2 messages whole (patron data).
fn init_logging(level: &str) {
    use tracing_subscriber::EnvFilter;
    let filter = match std::env::var("RUST_LOG") {
        Ok(s) if !s.is_empty() => EnvFilter::new(format!("{s},sip2=off")),
        _ => EnvFilter::new(format!("{level},rumqttd=off,sip2=off")),
    };
    use std::io::IsTerminal;
    if stderr_is_journal() {
        // journald stamps each line itself and reads the level from a `<N>` prefix.
        tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_writer(std::io::stderr)
            .event_format(JournalFormat(
                tracing_subscriber::fmt::format()
                    .without_time()
                    .with_ansi(false),
            ))
            .init();
    } else {
        tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_ansi(std::io::stderr().is_terminal())
            .with_writer(std::io::stderr)
            .init();
    }
}

/// True when systemd connected stderr to the journal: `JOURNAL_STREAM` names the device
/// and inode of our stderr (an inherited variable naming another stream does not count).
fn stderr_is_journal() -> bool {
    use std::os::fd::AsRawFd;
    let Some(stream) = std::env::var_os("JOURNAL_STREAM") else {
        return false;
    };
    let Some((dev, ino)) = stream.to_str().and_then(|s| s.split_once(':')) else {
        return false;
    };
    let mut st = std::mem::MaybeUninit::<libc::stat>::uninit();
    // SAFETY: fstat fills `st` for a valid descriptor; stderr is open for the process.
    if unsafe { libc::fstat(std::io::stderr().as_raw_fd(), st.as_mut_ptr()) } != 0 {
        return false;
    }
    // SAFETY: fstat returned 0, so `st` is initialised.
    let st = unsafe { st.assume_init() };
    dev.parse::<u64>() == Ok(st.st_dev) && ino.parse::<u64>() == Ok(st.st_ino)
}

/// The usual line without a timestamp, prefixed with the syslog priority journald maps to
/// a level: `<3>` error, `<4>` warning, `<6>` info, `<7>` debug and trace.
struct JournalFormat<F>(F);

impl<S, N, F> tracing_subscriber::fmt::FormatEvent<S, N> for JournalFormat<F>
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
    N: for<'a> tracing_subscriber::fmt::FormatFields<'a> + 'static,
    F: tracing_subscriber::fmt::FormatEvent<S, N>,
{
    fn format_event(
        &self,
        ctx: &tracing_subscriber::fmt::FmtContext<'_, S, N>,
        mut writer: tracing_subscriber::fmt::format::Writer<'_>,
        event: &tracing::Event<'_>,
    ) -> std::fmt::Result {
        let priority = match *event.metadata().level() {
            tracing::Level::ERROR => 3,
            tracing::Level::WARN => 4,
            tracing::Level::INFO => 6,
            _ => 7,
        };
        write!(writer, "<{priority}>")?;
        self.0.format_event(ctx, writer, event)
    }
}

fn spawn_signal_handler(shutdown: CancellationToken) {
    tokio::spawn(async move {
        use tokio::signal::unix::{signal, SignalKind};
        let (Ok(mut term), Ok(mut int)) = (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        ) else {
            tracing::error!("cannot install signal handlers");
            return;
        };
        let name = tokio::select! {
            _ = term.recv() => "SIGTERM",
            _ = int.recv() => "SIGINT",
        };
        tracing::info!(signal = name, "stop requested");
        shutdown.cancel();
    });
}

/// The buffer opened read-only for a report (works while the gateway runs).
fn open_buffer(loaded: &config::Loaded) -> anyhow::Result<rusqlite::Connection> {
    let path = loaded.database_path();
    if !path.exists() {
        anyhow::bail!(
            "no buffer database at {} yet: run the gateway once first",
            path.display()
        );
    }
    Ok(buffer::open_read_only(&path)?)
}

fn print_devices(loaded: &config::Loaded) -> anyhow::Result<()> {
    let conn = open_buffer(loaded)?;
    let rows = buffer::device_report(&conn).context("cannot read the devices table")?;
    let now = model::now_ms();
    println!(
        "{:<20} {:<20} {:<8} {:>12} {:>10} {:>9} {:>7} {:>8} {:>9}  LAST REJECTION",
        "DEVICE",
        "PROFILE",
        "STATE",
        "LAST SEEN",
        "ACCEPTED",
        "REJECTED",
        "DENIED",
        "LIMITED",
        "COMMANDS"
    );
    for r in rows {
        let state = match (r.configured, r.online) {
            (false, _) => "removed",
            (true, true) => "online",
            (true, false) => "offline",
        };
        let seen = r
            .last_seen_ms
            .map(|ms| ago(now - ms))
            .unwrap_or_else(|| "never".into());
        let rejection = match (&r.last_reject_reason, &r.last_reject_detail) {
            (Some(reason), Some(detail)) => format!("{reason}: {detail}"),
            _ => "-".into(),
        };
        println!(
            "{:<20} {:<20} {:<8} {:>12} {:>10} {:>9} {:>7} {:>8} {:>9}  {}",
            r.id,
            r.profile,
            state,
            seen,
            r.accepted,
            r.rejected,
            r.denied,
            r.rate_limited,
            format!("{}/{}", r.commands_open, r.commands_succeeded),
            rejection
        );
        // A tapped kiosk: its SC status and ILS link under its row.
        if loaded
            .config
            .devices
            .iter()
            .any(|d| d.id == r.id && d.sip2.is_some())
        {
            let k = buffer::kiosk_health(&conn, &r.id).context("cannot read the buffer")?;
            println!("{:<20} sip2: {}", "", k.describe(now));
        }
    }
    Ok(())
}

fn print_status(loaded: &config::Loaded) -> anyhow::Result<()> {
    let path = loaded.database_path();
    let conn = open_buffer(loaded)?;
    let now = model::now_ms();
    let r = buffer::buffer_report(&conn, now).context("cannot read the buffer")?;
    let cfg = &loaded.config;
    println!("branch      {}", cfg.gateway.branch_id);
    println!(
        "devices     {} online of {} configured (details: branch-gateway devices)",
        r.devices_online, r.devices_configured
    );
    let offline: Vec<String> = buffer::device_report(&conn)
        .context("cannot read the buffer")?
        .into_iter()
        .filter(|d| d.configured && !d.online)
        .map(|d| match d.last_seen_ms {
            Some(ms) => format!("{} (last seen {})", d.id, ago(now - ms)),
            None => format!("{} (never seen)", d.id),
        })
        .collect();
    if !offline.is_empty() {
        println!("offline     {}", offline.join(", "));
    }
    let size = buffer::size_on_disk(&path);
    println!(
        "buffer      {} messages up to seq {}, {:.1} MiB of {:.1} MiB cap ({:.0}%), {} rejected kept",
        r.messages,
        r.last_seq,
        size as f64 / 1048576.0,
        cfg.storage.max_bytes as f64 / 1048576.0,
        100.0 * size as f64 / cfg.storage.max_bytes as f64,
        r.rejected_kept
    );
    match &cfg.upstream {
        None => println!("upstream    none configured: buffering and serving locally only"),
        Some(up) => {
            let last = r
                .last_delivered_ms
                .map(|ms| format!("last acknowledgement {}", ago(now - ms)))
                .unwrap_or_else(|| "nothing acknowledged yet".into());
            println!("upstream    {} ({last})", up.url);
            let oldest = r
                .oldest_undelivered_ms
                .map(|ms| format!(", oldest received {}", ago(now - ms)))
                .unwrap_or_default();
            let eta = match r.drain() {
                buffer::Drain::Empty => "nothing to send".to_owned(),
                buffer::Drain::Stalled => {
                    "no deliveries in the last minute: no drain estimate".to_owned()
                }
                buffer::Drain::Draining { per_s, eta_s } => format!(
                    "draining at {per_s:.0} msg/s, done in about {}",
                    ago_secs(eta_s)
                ),
            };
            println!("backlog     {} undelivered{oldest}; {eta}", r.backlog);
        }
    }
    if r.drops.is_empty() {
        println!("drops       none");
    } else {
        let total: i64 = r.drops.iter().map(|d| d.2).sum();
        let detail: Vec<String> = r
            .drops
            .iter()
            .map(|(d, k, n)| format!("{d}/{k} {n}"))
            .collect();
        println!(
            "drops       {total} undelivered messages removed by the disk cap: {}",
            detail.join(", ")
        );
    }
    let states: Vec<String> = r
        .commands
        .iter()
        .filter(|(_, n)| *n > 0)
        .map(|(s, n)| format!("{} {n}", s.as_str()))
        .collect();
    if states.is_empty() {
        println!("commands    none");
    } else {
        println!("commands    by state: {}", states.join(", "));
    }
    // Tapped kiosks: when each last sent an SC status, how often its ILS link failed.
    for d in cfg.devices.iter().filter(|d| d.sip2.is_some()) {
        let k = buffer::kiosk_health(&conn, &d.id).context("cannot read the buffer")?;
        println!("kiosk       {}: {}", d.id, k.describe(now));
    }
    if r.quarantined.is_empty() {
        println!("quarantine  none");
    } else {
        let total: i64 = r.quarantined.iter().map(|q| q.3).sum();
        let detail: Vec<String> = r
            .quarantined
            .iter()
            .map(|(d, k, why, n)| format!("{d}/{k} {why} {n}"))
            .collect();
        println!(
            "quarantine  {total} messages central refused, kept: {} (branch-gateway quarantine list)",
            detail.join(", ")
        );
    }
    if r.rate_limited.is_empty() {
        println!("limited     none");
    } else {
        let total: i64 = r.rate_limited.iter().map(|d| d.1).sum();
        let detail: Vec<String> = r
            .rate_limited
            .iter()
            .map(|(d, n)| format!("{d} {n}"))
            .collect();
        println!(
            "limited     {total} messages refused for their profile's rate limit (rate_limited): {}",
            detail.join(", ")
        );
    }
    if r.refused.is_empty() {
        println!("refused     none");
    } else {
        // By reason, with the devices concerned ("-": no configured device).
        let total: i64 = r.refused.iter().map(|d| d.2).sum();
        let mut reasons: Vec<(&str, i64, Vec<String>)> = Vec::new();
        for (device, reason, n) in &r.refused {
            let who = if device.is_empty() { "-" } else { device };
            match reasons.last_mut() {
                Some(last) if last.0 == reason => {
                    last.1 += n;
                    last.2.push(format!("{who} {n}"));
                }
                _ => reasons.push((reason, *n, vec![format!("{who} {n}")])),
            }
        }
        let detail: Vec<String> = reasons
            .iter()
            .map(|(reason, n, who)| format!("{reason} {n} ({})", who.join(", ")))
            .collect();
        println!("refused     {total} by the broker: {}", detail.join("; "));
    }
    for (at_ms, kind, detail) in buffer::incidents(&conn, 5).context("cannot read the buffer")? {
        println!(
            "incident    {} ({}): {kind}: {detail}",
            model::format_ms(at_ms),
            ago(now - at_ms)
        );
    }
    Ok(())
}

/// Cancel `shutdown` after `seconds`, if given.
fn stop_after(seconds: Option<u64>, shutdown: &CancellationToken) {
    if let Some(s) = seconds {
        let t = shutdown.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(s)).await;
            t.cancel();
        });
    }
}

/// The gateway and the simulator in one process, printing the flow every few seconds.
async fn demo(mut loaded: config::Loaded, seconds: Option<u64>, speed: f64) -> anyhow::Result<()> {
    let shutdown = CancellationToken::new();
    spawn_signal_handler(shutdown.clone());
    stop_after(seconds, &shutdown);
    // Without an [upstream], a central broker in this process (rumqttd) plays central.
    let central = match loaded.config.upstream {
        Some(_) => None,
        None => {
            let prefix = format!("library/{}", loaded.config.gateway.branch_id);
            let central = branch_gateway::demo::start(&prefix, shutdown.clone())
                .await
                .context("cannot start the demo's central broker")?;
            let section = format!(
                "url = \"mqtt://{}\"\nclient_id = \"{}-demo\"\ntopic_prefix = \"{prefix}\"\nprotocol = \"5\"\n",
                central.addr, loaded.config.gateway.branch_id
            );
            loaded.config.upstream =
                Some(toml::from_str(&section).context("the demo's [upstream]")?);
            Some((central, prefix))
        }
    };
    let figures = Arc::new(app::Figures::default());
    let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
    let gateway = tokio::spawn(app::run(
        loaded.clone(),
        shutdown.clone(),
        figures.clone(),
        move |addr| {
            let _ = ready_tx.send(addr);
        },
    ));
    let addr = match ready_rx.await {
        Ok(a) => a,
        Err(_) => return Ok(gateway.await??),
    };
    println!(
        "branch {:?}: gateway listening on {addr}, buffer {}",
        loaded.config.gateway.branch_id,
        loaded.database_path().display()
    );
    if let Some((central, prefix)) = &central {
        println!(
            "central: a second broker in this process on {0} (MQTT 5); what it receives:\n  mosquitto_sub -V mqttv5 -h 127.0.0.1 -p {1} -t '{prefix}/#' -v\ncentral publishes a branch notice for the lobby: {2:?}",
            central.addr,
            central.addr.port(),
            branch_gateway::demo::NOTICE
        );
    }
    if let Some(api) = &loaded.config.api {
        let base = format!("http://{}", branch_gateway::broker::probe_addr(api.listen));
        println!("lobby page:  {base}/lobby");
        println!("dashboard:   {base}/  (sign in with [api] token from the config)");
        // Today in the branch's time zone, as the summaries count days.
        let today = jiff::Timestamp::now()
            .to_zoned(loaded.config.gateway.time_zone())
            .date();
        println!(
            "pull API:    curl -H \"Authorization: Bearer $TOKEN\" '{base}/api/v1/summaries?period=hour&from={today}&to={}'  (TOKEN: [api] token in {})",
            today.tomorrow().unwrap_or(today),
            loaded.path.display()
        );
    }
    println!(
        "simulating {} devices at {speed}x speed; Ctrl-C to stop\n",
        loaded.config.devices.len()
    );
    let sim_stop = shutdown.child_token();
    let sim = tokio::spawn({
        let loaded = loaded.clone();
        let opts = simulate::SimOptions {
            broker: addr,
            speed,
            invalid_every: 25,
            duration: None,
            only: Vec::new(),
            seed: model::now_ms() as u64,
        };
        async move { simulate::run(&loaded, opts, sim_stop).await }
    });
    // Serial devices of the example branch are played on pseudo-terminals at their paths.
    for d in &loaded.config.devices {
        let (Some(port), Some(format)) = (
            &d.serial,
            branch_gateway::serial::sim::CounterFormat::for_profile(&d.profile),
        ) else {
            continue;
        };
        use branch_gateway::serial::sim;
        match sim::Pty::open(&port.path) {
            Ok(pty) => {
                println!(
                    "serial device {} played by a simulated gate counter on {}",
                    d.id,
                    port.path.display()
                );
                let every = Duration::from_millis((1000.0 / speed.max(0.1)) as u64)
                    .max(Duration::from_millis(10));
                tokio::spawn(sim::play(
                    pty,
                    sim::GateCounter::new(format, model::now_ms() as u64),
                    every,
                    shutdown.child_token(),
                ));
            }
            Err(e) => println!("cannot simulate serial device {}: {e}", d.id),
        }
    }
    // Tapped SIP2 kiosks of the example branch: a simulated ILS where the config points
    // (on this machine) and a simulated kiosk talking to the tap.
    for d in &loaded.config.devices {
        let Some(tap) = &d.sip2 else { continue };
        use branch_gateway::sip2::sim;
        let Some((host, port)) = tap.ils_addr() else {
            continue;
        };
        if host != "127.0.0.1" && host != "localhost" {
            continue; // a real ILS
        }
        match tokio::net::TcpListener::bind(("127.0.0.1", port)).await {
            Ok(l) => {
                tokio::spawn(sim::ils(l, model::now_ms() as u64, shutdown.child_token()));
            }
            Err(e) => {
                println!("cannot simulate the ILS of {} on port {port}: {e}", d.id);
                continue;
            }
        }
        let listen = branch_gateway::broker::probe_addr(tap.listen);
        println!(
            "SIP2 kiosk {} played by a simulated kiosk through the tap on {listen}, against a simulated ILS on 127.0.0.1:{port}",
            d.id
        );
        tokio::spawn(sim::kiosk(
            listen,
            speed,
            model::now_ms() as u64 ^ port as u64,
            shutdown.child_token(),
        ));
    }
    let db = loaded.database_path();
    let mut tick = tokio::time::interval(Duration::from_secs(5));
    tick.tick().await;
    let mut last_seq = 0i64;
    let mut ticks = 0u64;
    let screen = loaded
        .config
        .devices
        .iter()
        .find(|d| d.profile == "lobby-screen" && d.serial.is_none())
        .map(|d| d.id.clone());
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = tick.tick() => {}
        }
        ticks += 1;
        // Every 30 s a command for the lobby screen, as central would send it.
        if let (Some(screen), Some(requests), 1) =
            (&screen, figures.command_requests.get(), ticks % 6)
        {
            let body = serde_json::json!({
                "command_id": format!("demo-{}", model::now_ms()),
                "name": "notice",
                "args": {"text": "The library closes in 15 minutes", "minutes": 15},
            });
            let (answer, _) = tokio::sync::oneshot::channel();
            let request = model::CommandRequest {
                device: screen.clone(),
                body: body.to_string().into_bytes(),
                answer,
            };
            if requests.try_send(request).is_ok() {
                println!("command `notice` sent to {screen}");
            }
        }
        let db = db.clone();
        let since = last_seq;
        let report = tokio::task::spawn_blocking(move || demo_report(&db, since)).await?;
        match report {
            Ok((text, seq)) => {
                print!("{text}");
                if let Some((central, _)) = &central {
                    println!("    central has received {} messages", central.received());
                }
                last_seq = seq;
            }
            Err(e) => println!("(cannot read the buffer: {e})"),
        }
    }
    let _ = sim.await;
    gateway.await??;
    println!("stopped; the buffer keeps everything: try `branch-gateway devices --config <file>`");
    Ok(())
}

fn demo_report(db: &Path, since: i64) -> anyhow::Result<(String, i64)> {
    use std::fmt::Write;
    let conn = buffer::open_read_only(db)?;
    let mut out = String::new();
    let (max_seq, total): (i64, i64) = conn.query_row(
        "SELECT COALESCE(MAX(seq), 0), COUNT(*) FROM messages",
        [],
        |r| Ok((r.get(0)?, r.get(1)?)),
    )?;
    let mut st = conn.prepare(
        "SELECT kind, COUNT(*) FROM messages WHERE seq > ?1 GROUP BY kind ORDER BY kind",
    )?;
    let kinds: Vec<(String, i64)> = st
        .query_map([since], |r| Ok((r.get(0)?, r.get(1)?)))?
        .collect::<Result<_, _>>()?;
    let rejected: i64 = conn.query_row(
        "SELECT COUNT(*) FROM rejected WHERE received_ms > ?1",
        [model::now_ms() - 5000],
        |r| r.get(0),
    )?;
    let online: i64 = conn.query_row(
        "SELECT COUNT(*) FROM devices WHERE online = 1 AND configured = 1",
        [],
        |r| r.get(0),
    )?;
    let kinds = kinds
        .iter()
        .map(|(k, n)| format!("{n} {k}"))
        .collect::<Vec<_>>()
        .join(", ");
    writeln!(
        out,
        "[{}] devices online {online}; last 5 s: {} committed, {rejected} rejected; buffer holds {total} messages up to seq {max_seq}",
        model::format_ms(model::now_ms()),
        if kinds.is_empty() { "0".into() } else { kinds },
    )?;
    let mut st = conn.prepare(
        "SELECT seq, device, kind, payload FROM messages WHERE seq > ?1 AND kind = 'events'
         ORDER BY seq DESC LIMIT 3",
    )?;
    let rows: Vec<(i64, String, String, String)> = st
        .query_map([since], |r| {
            Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?))
        })?
        .collect::<Result<_, _>>()?;
    for (seq, device, kind, payload) in rows.into_iter().rev() {
        writeln!(
            out,
            "    seq {seq:>7} {device:<14} {kind:<9} {}",
            config::profile::truncate(&payload, 90)
        )?;
    }
    let mut st = conn.prepare(
        "SELECT device, reason, detail FROM rejected WHERE received_ms > ?1 ORDER BY id DESC LIMIT 2",
    )?;
    let rows: Vec<(String, String, String)> = st
        .query_map([model::now_ms() - 5000], |r| {
            Ok((r.get(0)?, r.get(1)?, r.get(2)?))
        })?
        .collect::<Result<_, _>>()?;
    for (device, reason, detail) in rows {
        writeln!(out, "    rejected   {device:<14} {reason}: {detail}")?;
    }
    // Each command state in the outbox since the last report, in order.
    let mut st = conn.prepare(
        "SELECT seq, device, payload FROM messages WHERE seq > ?1 AND kind = 'command' ORDER BY seq",
    )?;
    let rows: Vec<(i64, String, String)> = st
        .query_map([since], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?
        .collect::<Result<_, _>>()?;
    for (seq, device, payload) in rows {
        let v: serde_json::Value = serde_json::from_str(&payload).unwrap_or_default();
        writeln!(
            out,
            "    seq {seq:>7} {device:<14} command   {} {} {}",
            v["name"].as_str().unwrap_or(""),
            v["command_id"].as_str().unwrap_or(""),
            v["state"].as_str().unwrap_or("")
        )?;
    }
    Ok((out, max_seq))
}
