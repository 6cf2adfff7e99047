//! Commands from central to devices, and the branch notice for screens.
//!
//! Central (over the upstream connection, [`FromCentral`]) or the API
//! ([`CommandRequest`]) hands a command in; [`parse`] checks it against the device's
//! profile; the writer stores it (or finds the one with its `command_id`) and only then is
//! central acknowledged. The writer reports every committed change back here; the
//! sans-IO [`dispatch::Dispatch`] decides what goes to which device connection (reported
//! by the broker as [`CommandLink`]s) or serial port, and proposes the next states
//! (sent, delivered, expired, timed out), which the writer records and puts in the outbox.
//! The device's reply comes through intake like any message of the device.
//!
//! Every queue here is bounded: changes ([`CHANGES`]; when full the writer flags a resync
//! and the open commands are read back), link reports ([`crate::model::COMMAND_LINKS`]),
//! central's messages ([`crate::model::FROM_CENTRAL`]), API requests ([`API_REQUESTS`]),
//! and the commands per device (`[commands] max_per_device`, refused as `queue_full`).

pub(crate) mod dispatch;
pub(crate) mod parse;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use crate::broker::BranchPublisher;
use crate::buffer::commands::{CommandOp, CommandRow};
use crate::buffer::{BufferStats, Write};
use crate::config::SharedDevices;
use crate::model::{now_ms, CommandLink, CommandRequest, DeviceCommand, FromCentral};
use dispatch::{Action, Dispatch, SERIAL};

/// Batches of committed changes that may wait for the dispatcher.
pub const CHANGES: usize = 64;
/// API requests that may wait for the dispatcher.
pub const API_REQUESTS: usize = 64;
/// How often expiry and reply timeouts are looked at.
const TICK: Duration = Duration::from_millis(250);
/// Where screens read the branch notice.
pub const NOTICE_TOPIC: &str = "branch/notices";

/// Counters of the dispatcher (the states themselves are counted in the database).
#[derive(Debug, Default)]
pub struct CommandStats {
    /// Bodies from central or the API that could not be stored at all.
    pub unusable: AtomicU64,
    /// Messages from central on a topic that is neither commands nor notices.
    pub unknown_topic: AtomicU64,
    /// Commands handed to a device connection or serial port.
    pub delivered_to_link: AtomicU64,
}

/// The dispatcher's inputs and outputs.
pub struct Dispatcher {
    pub devices: SharedDevices,
    pub writer: mpsc::Sender<Write>,
    pub buffer: Arc<BufferStats>,
    pub database: std::path::PathBuf,
    pub changes: mpsc::Receiver<Vec<CommandRow>>,
    pub links: mpsc::Receiver<CommandLink>,
    /// For serial writes, reported as links are.
    pub links_tx: mpsc::Sender<CommandLink>,
    pub central: mpsc::Receiver<FromCentral>,
    pub api: mpsc::Receiver<CommandRequest>,
    pub serial: crate::serial::Commands,
    pub publisher: BranchPublisher,
    pub max_per_device: usize,
    pub stats: Arc<CommandStats>,
}

/// What handing a command to a connection came to.
enum Handed {
    Yes,
    Busy,
    Gone,
}

struct Glue {
    d: Dispatcher,
    mailboxes: HashMap<u64, mpsc::Sender<DeviceCommand>>,
    log: crate::burst::BurstLimiter<&'static str>,
    /// The notice's expiry, while one is up.
    notice_expires: Option<i64>,
}

impl Dispatcher {
    /// Run until `shutdown`.
    pub async fn run(self, shutdown: CancellationToken) {
        let serial: Vec<String> = self.serial.devices().cloned().collect();
        let mut dispatch = Dispatch::new(serial.clone());
        let mut g = Glue {
            d: self,
            mailboxes: HashMap::new(),
            log: crate::burst::BurstLimiter::new(10_000, 64),
            notice_expires: None,
        };
        g.restore_notice().await;
        if !g.reload(&mut dispatch).await {
            return;
        }
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let actions = tokio::select! {
                _ = shutdown.cancelled() => return,
                Some(rows) = g.d.changes.recv() => {
                    // A batch was dropped before this one (its channel was full): applying
                    // this one could run ahead of it; read everything back instead.
                    if g.d.buffer.commands_resync.swap(false, Ordering::AcqRel) {
                        if !g.reload(&mut dispatch).await {
                            return;
                        }
                        Vec::new()
                    } else {
                        dispatch.on_changes(rows, now_ms())
                    }
                }
                Some(link) = g.d.links.recv() => g.on_link(&mut dispatch, link),
                Some(msg) = g.d.central.recv() => {
                    g.take_central(msg).await;
                    Vec::new()
                }
                Some(req) = g.d.api.recv() => {
                    g.take_api(req).await;
                    Vec::new()
                }
                _ = tick.tick() => {
                    if g.d.buffer.commands_resync.swap(false, Ordering::AcqRel)
                        && !g.reload(&mut dispatch).await
                    {
                        return;
                    }
                    g.expire_notice().await;
                    let now = now_ms();
                    let mut out = Vec::new();
                    for device in &serial {
                        out.extend(dispatch.on_ready(device, SERIAL, now));
                    }
                    out.extend(dispatch.on_tick(now));
                    out
                }
            };
            g.carry_out(&mut dispatch, actions).await;
        }
    }
}

impl Glue {
    /// Read the open commands back from the writer; `false` if the writer is gone.
    async fn reload(&mut self, dispatch: &mut Dispatch) -> bool {
        let (tx, rx) = oneshot::channel();
        if self
            .d
            .writer
            .send(Write::Command(CommandOp::Open(tx)))
            .await
            .is_err()
        {
            return false;
        }
        let Ok((rows, newest)) = rx.await else {
            return false;
        };
        tracing::debug!(open = rows.len(), "commands read back from the buffer");
        let actions = dispatch.reload(rows, newest, now_ms());
        self.carry_out(dispatch, actions).await;
        true
    }

    fn on_link(&mut self, dispatch: &mut Dispatch, link: CommandLink) -> Vec<Action> {
        let now = now_ms();
        match link {
            CommandLink::Ready {
                device,
                connection,
                mailbox,
            } => {
                tracing::debug!(%device, connection, "device connection takes commands");
                self.mailboxes.insert(connection, mailbox);
                dispatch.on_ready(&device, connection, now)
            }
            CommandLink::Gone { device, connection } => {
                tracing::debug!(%device, connection, "device connection takes no commands now");
                self.mailboxes.remove(&connection);
                dispatch.on_gone(&device, connection);
                Vec::new()
            }
            CommandLink::Refused {
                device,
                connection,
                command_id,
                why,
            } => {
                tracing::debug!(%device, connection, %command_id, why, "command refused by the device connection");
                dispatch.on_refused(&device, connection, &command_id, why, now)
            }
            CommandLink::Acked {
                device,
                connection,
                command_id,
                reason,
            } => {
                tracing::debug!(%device, connection, %command_id, reason, "command acknowledged by the device");
                dispatch.on_acked(&device, connection, &command_id, reason, now)
            }
        }
    }

    async fn carry_out(&mut self, dispatch: &mut Dispatch, actions: Vec<Action>) {
        for a in actions {
            match a {
                Action::Move {
                    command_id,
                    to,
                    detail,
                } => {
                    let op = CommandOp::Transition {
                        command_id,
                        to,
                        detail,
                        at_ms: now_ms(),
                    };
                    let _ = self.d.writer.send(Write::Command(op)).await;
                }
                Action::Deliver {
                    device,
                    connection,
                    command,
                } => match self.deliver(&device, connection, &command) {
                    Handed::Yes => {}
                    // Tried again on the next tick.
                    Handed::Busy => dispatch.on_busy(&device, connection),
                    // That connection is gone (its `Gone` is on its way).
                    Handed::Gone => {
                        dispatch.on_gone(&device, connection);
                        self.mailboxes.remove(&connection);
                    }
                },
            }
        }
    }

    /// Hand one command to its connection or port.
    fn deliver(&mut self, device: &str, connection: u64, c: &CommandRow) -> Handed {
        if connection == SERIAL {
            let (tx, rx) = oneshot::channel();
            if let Err(e) = self
                .d
                .serial
                .send_then(device, &c.name, c.expires_ms, Some(tx))
            {
                let key: &'static str = "serial command not queued";
                if let Some(suppressed) = self.log.hit(&key, now_ms()) {
                    tracing::warn!(device, command = %c.name, error = %e, suppressed_since_last_report = suppressed, "serial command not queued; will retry");
                }
                return Handed::Busy;
            }
            let links = self.d.links_tx.clone();
            let (device, command_id) = (device.to_owned(), c.command_id.clone());
            tokio::spawn(async move {
                if rx.await.is_ok() {
                    let acked = CommandLink::Acked {
                        device,
                        connection: SERIAL,
                        command_id,
                        reason: 0,
                    };
                    let _ = links.send(acked).await;
                }
            });
            self.d
                .stats
                .delivered_to_link
                .fetch_add(1, Ordering::Relaxed);
            return Handed::Yes;
        }
        let Some(mailbox) = self.mailboxes.get(&connection) else {
            return Handed::Gone;
        };
        let command = DeviceCommand {
            command_id: c.command_id.clone(),
            expires_ms: c.expires_ms,
            topic: format!("devices/{device}/commands/{}", c.name),
            payload: parse::device_payload(&c.command_id, &c.args),
        };
        let sent = mailbox.try_send(command);
        tracing::debug!(device, connection, command_id = %c.command_id, ok = sent.is_ok(), "command handed to the device connection");
        match sent {
            Ok(()) => {
                self.d
                    .stats
                    .delivered_to_link
                    .fetch_add(1, Ordering::Relaxed);
                Handed::Yes
            }
            Err(mpsc::error::TrySendError::Full(_)) => Handed::Busy,
            Err(mpsc::error::TrySendError::Closed(_)) => Handed::Gone,
        }
    }

    fn unusable(&mut self, source: &'static str, why: &str) {
        self.d.stats.unusable.fetch_add(1, Ordering::Relaxed);
        if let Some(suppressed) = self.log.hit(&source, now_ms()) {
            tracing::warn!(
                source,
                reason = why,
                suppressed_since_last_report = suppressed,
                "command or notice refused: cannot be stored"
            );
        }
    }

    async fn take_central(&mut self, msg: FromCentral) {
        let FromCentral {
            topic,
            payload,
            stored,
        } = msg;
        if topic == "branch/notices" {
            match parse::notice(&payload, now_ms()) {
                Ok(notice) => self.set_notice(notice, Some(stored)).await,
                Err(e) => {
                    self.unusable("central notice", &e.0);
                    let _ = stored.send(());
                }
            }
            return;
        }
        let Some(device) = topic.strip_prefix("commands/devices/") else {
            self.d.stats.unknown_topic.fetch_add(1, Ordering::Relaxed);
            let _ = stored.send(());
            return;
        };
        let (tx, rx) = oneshot::channel();
        match self.new_command(device, &payload, tx).await {
            Ok(()) => {
                tokio::spawn(async move {
                    if rx.await.is_ok() {
                        let _ = stored.send(());
                    }
                });
            }
            Err(e) => {
                self.unusable("central command", &e.0);
                // Acknowledged: sending it again would not make it usable.
                let _ = stored.send(());
            }
        }
    }

    async fn take_api(&mut self, req: CommandRequest) {
        let (tx, rx) = oneshot::channel();
        match self.new_command(&req.device, &req.body, tx).await {
            Ok(()) => {
                tokio::spawn(async move {
                    let answer = match rx.await {
                        Ok(row) => Ok(row.to_json()),
                        Err(_) => Err("the gateway is stopping".to_owned()),
                    };
                    let _ = req.answer.send(answer);
                });
            }
            Err(e) => {
                self.unusable("api command", &e.0);
                let _ = req.answer.send(Err(e.0));
            }
        }
    }

    async fn new_command(
        &mut self,
        device: &str,
        body: &[u8],
        stored: oneshot::Sender<CommandRow>,
    ) -> Result<(), parse::Unusable> {
        let table = self.d.devices.load();
        let c = parse::command(body, device, &table, now_ms(), self.d.max_per_device)?;
        if let Some(reason) = &c.rejected {
            let key: &'static str = "command rejected";
            if let Some(suppressed) = self.log.hit(&key, now_ms()) {
                tracing::warn!(device = %c.device, command = %c.name, reason = %reason, suppressed_since_last_report = suppressed, "command rejected: not sent");
            }
        }
        self.d
            .writer
            .send(Write::Command(CommandOp::New(c, Some(stored))))
            .await
            .map_err(|_| parse::Unusable("the gateway is stopping".into()))
    }

    /// Store and publish (retained) the branch notice, or clear it.
    async fn set_notice(
        &mut self,
        notice: Option<(String, i64)>,
        stored: Option<oneshot::Sender<()>>,
    ) {
        let (tx, rx) = oneshot::channel();
        let op = CommandOp::Notice(notice.clone(), Some(tx));
        if self.d.writer.send(Write::Command(op)).await.is_err() || rx.await.is_err() {
            return;
        }
        if let Some(stored) = stored {
            let _ = stored.send(());
        }
        self.notice_expires = notice.as_ref().map(|n| n.1);
        let payload = notice.map(|n| n.0.into_bytes()).unwrap_or_default();
        match self
            .d
            .publisher
            .publish_retained(NOTICE_TOPIC, payload)
            .await
        {
            Ok(()) => tracing::info!(
                notice = self.notice_expires.is_some(),
                "branch notice {}",
                if self.notice_expires.is_some() {
                    "published"
                } else {
                    "cleared"
                }
            ),
            Err(e) => tracing::warn!(error = %e, "branch notice not published"),
        }
    }

    async fn expire_notice(&mut self) {
        if self.notice_expires.is_some_and(|t| t <= now_ms()) {
            self.set_notice(None, None).await;
        }
    }

    /// Publish the stored notice again after a restart (the broker keeps no retained
    /// message across one).
    async fn restore_notice(&mut self) {
        let path = self.d.database.clone();
        let found = tokio::task::spawn_blocking(move || {
            let conn = crate::buffer::open_read_only(&path).ok()?;
            crate::buffer::commands::notice(&conn, now_ms())
                .ok()
                .flatten()
        })
        .await
        .ok()
        .flatten();
        if let Some((payload, expires)) = found {
            self.notice_expires = Some(expires);
            if let Err(e) = self
                .d
                .publisher
                .publish_retained(NOTICE_TOPIC, payload.into_bytes())
                .await
            {
                tracing::warn!(error = %e, "branch notice not published again");
            }
        }
    }
}
