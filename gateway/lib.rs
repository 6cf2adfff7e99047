//! branch-gateway: the edge gateway of a public-library branch.
//!
//! # Layout
//! Dependencies point one way, each layer using only those before it (checked by reading
//! the `use crate::` lines of each module):
//! 1. `receipt`, `burst`, `limit` (no crate dependencies), `model` (plain data; uses
//!    `receipt`).
//! 2. `config` (uses `model`, `limit`); `summary` (pure rollup arithmetic, uses `config`).
//! 3. The edges: `buffer` (the store), `broker` (the device port), `serial`, `sip2` (the
//!    self-check kiosks' SIP2 tap). None of them
//!    uses another: the broker hands a device's message to a `model::PublishSink` (intake)
//!    and waits on its `receipt`, the buffer settles receipts after commits.
//! 4. The middle: `intake` and `upstream` talk to the buffer only through its command
//!    channels (bounded channels of [`buffer::Write`]: messages in, and delivery marks back
//!    through [`buffer::Marks`], which the writer serves first),
//!    the rows it hands over after a commit (a bounded channel of [`buffer::LiveRows`]), its
//!    read-only [`buffer::Outbox`] and its counters ([`buffer::BufferStats`], where intake
//!    also waits for room when the writer's queue is full). `commands` is the third: it
//!    stores commands through the same channel, learns each committed change on a bounded
//!    channel of [`buffer::commands::CommandRow`]s, hears of device connections through
//!    [`model::CommandLink`]s the broker sends, and hands each command to a connection's
//!    mailbox or a serial port ([`serial::Commands`]); central's commands reach it from
//!    upstream as [`model::FromCentral`], the API's as [`model::CommandRequest`]. They do
//!    not use each other.
//!    `live` turns the buffer's rollups into today's live figures (a `watch` channel of
//!    [`live::Snapshot`]s) and uses nothing else of the middle.
//! 5. `api` reads the buffer's reports on read-only connections of its own, follows the
//!    live figures and shows the counters of intake and upstream (their `*Stats` types
//!    only); its pages (lobby, dashboard) are rendered from the same reports; `service`
//!    probes the broker and the writer for the watchdog.
//! 6. `app` wires everything with bounded channels and stops it in order; `simulate`
//!    drives a whole `app` for the demo, `demo` plays its central; `main` is the command line.
//!
//! - [`model`]: plain data: device ids, message kinds, accepted and rejected messages,
//!   summary contributions.
//! - [`receipt`]: commit receipts: how a device connection learns its messages are
//!   committed, so it acknowledges only what is durable.
//! - [`config`]: the TOML config and the JSON device profiles; bounded reading of regular files
//!   only, strict parsing (errors quote no config text; no repeated JSON keys), then `check()`.
//! - [`broker`]: the device port: rumqttd's router behind our own listener, connection
//!   driver and protocol checks (frames, logins, limits, ACLs, presence).
//! - [`intake`]: validate each device message against its profile and stamp it.
//! - [`buffer`]: SQLite in WAL mode, one writer thread, group commit; what is durable
//!   when is its design note.
//! - [`serial`]: serial-line devices: open, decode by profile rules, reopen after unplug.
//! - [`sip2`]: the transparent SIP2 tap between self-check kiosks and the ILS; what the
//!   traffic means is the sans-IO `sip2/tap.rs`.
//! - [`commands`]: commands from central to devices and the branch notice; which command
//!   goes where and when is the sans-IO `commands/dispatch.rs`.
//! - [`upstream`]: forwarding to the central broker, acknowledged row by row; its delivery
//!   logic is the sans-IO state machine of `upstream/delivery.rs`; the MQTT 5 connection
//!   is `upstream/link_v5.rs`, the MQTT 3.1.1 one rumqttc's event loop driven in `mod.rs`.
//! - [`summary`]: rollup arithmetic (what a message adds to which hour and day).
//! - [`live`]: today's live figures, what they are (from the profiles' rollups) and when
//!   they change: for `branch/summary/live` and the lobby page alike.
//! - [`simulate`]: realistic device traffic from profiles (demo, tests, benchmarks).
//! - [`demo`]: the demo's central system: a second rumqttd in-process, counted.
//! - [`burst`]: "once per burst" log limiting.
//! - [`limit`]: token buckets for the per-device rate limits of profiles.
//! - [`api`]: HTTP for the central server: summaries, devices, health, metrics; the pages
//!   for people: the lobby screen (live by server-sent events) and branch IT's dashboard,
//!   charts drawn as SVG on the server; its own accept loop with bounded connections, time
//!   and requests, and a few shared SQLite readers.
//! - [`service`]: systemd integration: readiness, watchdog (with liveness probes), status.
//! - [`app`]: wiring and ordered shutdown.

pub mod api;
pub mod app;
pub mod broker;
pub mod buffer;
pub mod burst;
pub mod commands;
pub mod config;
pub mod demo;
pub mod intake;
pub mod limit;
pub mod live;
pub mod model;
pub mod receipt;
pub mod serial;
pub mod service;
pub mod simulate;
pub mod sip2;
pub mod summary;
pub mod upstream;
