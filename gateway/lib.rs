//! branch-gateway: the edge gateway of a public-library branch.
//!
//! # Layout
//! Dependencies point one way: {`model`, `receipt`} <- `config` <- `summary` (pure arithmetic) <-
//! {`broker`, `intake`, `buffer`, `serial`, `upstream`, `api`, `simulate`} <- `service` <- `app` <-
//! `main`.
//! The middle modules do not call each other; `app` connects them with bounded channels of
//! `model` types.
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
//! - [`buffer`]: SQLite in WAL mode, one writer thread, group commit.
//! - [`serial`]: serial-line devices: open, decode by profile rules, reopen after unplug.
//! - [`upstream`]: forwarding to the central broker, acknowledged row by row.
//! - [`summary`]: rollup arithmetic (what a message adds to which hour and day).
//! - [`simulate`]: realistic device traffic from profiles (demo, tests, benchmarks).
//! - [`burst`]: "once per burst" log limiting.
//! - [`limit`]: token buckets for the per-device rate limits of profiles.
//! - [`api`]: HTTP for the central server: summaries, devices, health, metrics; its own
//!   accept loop with bounded connections, time and requests, and a few shared SQLite readers.
//! - [`service`]: systemd integration: readiness, watchdog (with liveness probes), status.
//! - [`app`]: wiring and ordered shutdown.

pub mod api;
pub mod app;
pub mod broker;
pub mod buffer;
pub mod burst;
pub mod config;
pub mod intake;
pub mod limit;
pub mod model;
pub mod receipt;
pub mod serial;
pub mod service;
pub mod simulate;
pub mod summary;
pub mod upstream;
