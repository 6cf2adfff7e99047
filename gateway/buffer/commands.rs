//! Commands in the store: one row per `command_id` with its current state, and every
//! change of state also a `command` row in `messages`, in the same transaction, so central
//! learns each state at least once through the outbox like any message.
//!
//! The writer is the only place a state changes ([`transition`]): a change that does not
//! move a command forward (a late PUBACK after its reply, a timeout after a reply that
//! beat it) is no change, so the outbox never carries a state out of order.

use rusqlite::{params, OptionalExtension, Transaction};
use tokio::sync::oneshot;

use crate::model::DeviceId;
use crate::receipt::Receipt;

/// A command's state (README "Commands"); the names are the contract.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CommandState {
    Queued,
    Sent,
    Delivered,
    Succeeded,
    Failed,
    TimedOut,
    Expired,
    Rejected,
}

impl CommandState {
    pub const ALL: [CommandState; 8] = [
        CommandState::Queued,
        CommandState::Sent,
        CommandState::Delivered,
        CommandState::Succeeded,
        CommandState::Failed,
        CommandState::TimedOut,
        CommandState::Expired,
        CommandState::Rejected,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            CommandState::Queued => "queued",
            CommandState::Sent => "sent",
            CommandState::Delivered => "delivered",
            CommandState::Succeeded => "succeeded",
            CommandState::Failed => "failed",
            CommandState::TimedOut => "timed_out",
            CommandState::Expired => "expired",
            CommandState::Rejected => "rejected",
        }
    }

    pub fn parse(s: &str) -> Option<CommandState> {
        CommandState::ALL.into_iter().find(|c| c.as_str() == s)
    }

    /// Nothing happens to the command any more.
    pub fn is_final(self) -> bool {
        !matches!(
            self,
            CommandState::Queued | CommandState::Sent | CommandState::Delivered
        )
    }

    /// May a command in `self` move to `to`? Only forward: queued -> sent -> delivered ->
    /// succeeded | failed | timed_out; queued or sent -> expired; queued -> delivered (a
    /// serial line: written is delivered); sent -> failed (the connection could not take
    /// it). A final state never changes.
    pub fn may_become(self, to: CommandState) -> bool {
        use CommandState::*;
        matches!(
            (self, to),
            (Queued, Sent)
                | (Queued, Delivered)
                | (Queued, Expired)
                | (Sent, Delivered)
                | (Sent, Expired)
                | (Sent, Failed)
                | (Delivered, Succeeded)
                | (Delivered, Failed)
                | (Delivered, TimedOut)
        )
    }
}

/// What a device's reply says (`devices/ID/replies`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplyStatus {
    Succeeded,
    Failed,
    /// Still working: the reply timeout starts again.
    InProgress,
}

impl ReplyStatus {
    pub fn parse(s: &str) -> Option<ReplyStatus> {
        match s {
            "succeeded" => Some(ReplyStatus::Succeeded),
            "failed" => Some(ReplyStatus::Failed),
            "in_progress" => Some(ReplyStatus::InProgress),
            _ => None,
        }
    }
}

/// A command as central or the API sent it, checked against the device's profile.
#[derive(Debug, Clone, PartialEq)]
pub struct NewCommand {
    pub command_id: String,
    pub device: DeviceId,
    /// The device's profile (empty for an unknown device).
    pub profile: String,
    pub name: String,
    /// The `args` object as JSON text.
    pub args: String,
    pub expires_ms: i64,
    /// `None`: the device does not reply (delivered is its last state).
    pub reply_timeout_ms: Option<i64>,
    pub at_ms: i64,
    /// Why it was refused (stored as `rejected` with this reason), if it was.
    pub rejected: Option<String>,
    /// Open commands (queued, sent, delivered) a device may have; past it: `queue_full`.
    pub max_open: usize,
}

/// A command's row.
#[derive(Debug, Clone, PartialEq)]
pub struct CommandRow {
    pub id: i64,
    pub command_id: String,
    pub device: DeviceId,
    pub profile: String,
    pub name: String,
    pub args: String,
    pub state: CommandState,
    pub detail: String,
    pub created_ms: i64,
    pub updated_ms: i64,
    pub expires_ms: i64,
    pub reply_timeout_ms: Option<i64>,
}

impl CommandRow {
    /// Nothing more happens to it: a final state, or delivered without a reply to wait for.
    pub fn is_done(&self) -> bool {
        self.state.is_final()
            || (self.state == CommandState::Delivered && self.reply_timeout_ms.is_none())
    }

    /// The JSON the API answers with.
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "command_id": self.command_id,
            "device": self.device,
            "name": self.name,
            "args": serde_json::from_str::<serde_json::Value>(&self.args).unwrap_or_default(),
            "state": self.state.as_str(),
            "detail": self.detail,
            "created_at": crate::model::format_ms(self.created_ms),
            "updated_at": crate::model::format_ms(self.updated_ms),
            "expires_at": crate::model::format_ms(self.expires_ms),
        })
    }
}

/// A command change for the writer.
#[derive(Debug)]
pub enum CommandOp {
    /// Store a command (or find the one with its `command_id`: never twice); the answer is
    /// its row as committed.
    New(NewCommand, Option<oneshot::Sender<CommandRow>>),
    /// Move a command forward (no change if [`CommandState::may_become`] says no).
    Transition {
        command_id: String,
        to: CommandState,
        detail: String,
        at_ms: i64,
    },
    /// A device's reply, with the receipt its connection waits on to acknowledge it.
    Reply {
        device: DeviceId,
        command_id: String,
        status: ReplyStatus,
        detail: String,
        at_ms: i64,
        receipt: Option<Receipt>,
    },
    /// Every open command (queued, sent, delivered), oldest first, and the newest
    /// command id stored.
    Open(oneshot::Sender<(Vec<CommandRow>, i64)>),
    /// The branch notice for screens, `(payload, expires_ms)` (`None`: cleared); answered
    /// once committed.
    Notice(Option<(String, i64)>, Option<oneshot::Sender<()>>),
}

/// An answer owed to a [`CommandOp`] once its transaction commits.
#[derive(Debug)]
pub(super) enum Answer {
    Row(CommandRow),
    Rows(Vec<CommandRow>, i64),
    Done,
}

/// What one op did: the rows it changed (for the outbox and the dispatcher), the counter
/// it bumps on its device, and its answer.
#[derive(Debug, Default)]
pub(super) struct Applied {
    pub changed: Vec<CommandRow>,
    /// A command sent again (its `command_id` known): its state goes to the outbox again,
    /// nothing changes.
    pub reported: Option<CommandRow>,
    /// Changed without a new state (an `in_progress` reply restarts the reply timeout):
    /// for the dispatcher only, not the outbox.
    pub touched: Option<CommandRow>,
    pub counter: Option<(DeviceId, &'static str)>,
    pub answer: Option<Answer>,
}

/// A command not yet done: queued, sent, or delivered and waiting for its reply (a
/// delivered command that gets no reply is done).
pub const OPEN: &str = "(state IN ('queued', 'sent')
     OR (state = 'delivered' AND reply_timeout_ms IS NOT NULL))";

const COLUMNS: &str = "id, command_id, device, profile, name, args, state, detail, created_ms,
     updated_ms, expires_ms, reply_timeout_ms";

fn row(r: &rusqlite::Row<'_>) -> rusqlite::Result<CommandRow> {
    let state: String = r.get(6)?;
    Ok(CommandRow {
        id: r.get(0)?,
        command_id: r.get(1)?,
        device: r.get(2)?,
        profile: r.get(3)?,
        name: r.get(4)?,
        args: r.get(5)?,
        state: CommandState::parse(&state).unwrap_or(CommandState::Rejected),
        detail: r.get(7)?,
        created_ms: r.get(8)?,
        updated_ms: r.get(9)?,
        expires_ms: r.get(10)?,
        reply_timeout_ms: r.get(11)?,
    })
}

fn by_command_id(tx: &Transaction<'_>, command_id: &str) -> rusqlite::Result<Option<CommandRow>> {
    tx.prepare_cached(&format!(
        "SELECT {COLUMNS} FROM commands WHERE command_id = ?1"
    ))?
    .query_row(params![command_id], row)
    .optional()
}

/// Apply one op inside the batch's transaction.
pub(super) fn apply(tx: &Transaction<'_>, op: &CommandOp) -> rusqlite::Result<Applied> {
    let mut applied = Applied::default();
    match op {
        CommandOp::New(c, _) => {
            if let Some(existing) = by_command_id(tx, &c.command_id)? {
                applied.counter = Some((c.device.clone(), "command_repeated"));
                applied.reported = Some(existing.clone());
                applied.answer = Some(Answer::Row(existing));
                return Ok(applied);
            }
            let (state, detail) = match &c.rejected {
                Some(reason) => (CommandState::Rejected, reason.clone()),
                None => {
                    let open: i64 = tx
                        .prepare_cached(&format!(
                            "SELECT COUNT(*) FROM commands WHERE device = ?1 AND {OPEN}"
                        ))?
                        .query_row(params![c.device], |r| r.get(0))?;
                    if open as usize >= c.max_open {
                        (CommandState::Rejected, "queue_full".to_owned())
                    } else {
                        (CommandState::Queued, String::new())
                    }
                }
            };
            tx.prepare_cached(
                "INSERT INTO commands (command_id, device, profile, name, args, state, detail,
                     created_ms, updated_ms, expires_ms, reply_timeout_ms)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?8, ?9, ?10)",
            )?
            .execute(params![
                c.command_id,
                c.device,
                c.profile,
                c.name,
                // A refused command's arguments are not kept (up to 16 KiB each, and
                // central may send any number).
                if state == CommandState::Rejected {
                    "{}"
                } else {
                    c.args.as_str()
                },
                state.as_str(),
                detail,
                c.at_ms,
                c.expires_ms,
                c.reply_timeout_ms
            ])?;
            let Some(new) = by_command_id(tx, &c.command_id)? else {
                return Ok(applied);
            };
            applied.changed.push(new.clone());
            applied.answer = Some(Answer::Row(new));
        }
        CommandOp::Transition {
            command_id,
            to,
            detail,
            at_ms,
        } => {
            if let Some(r) = move_to(tx, command_id, *to, detail, *at_ms)? {
                applied.changed.push(r);
            }
        }
        CommandOp::Reply {
            device,
            command_id,
            status,
            detail,
            at_ms,
            ..
        } => {
            let current = by_command_id(tx, command_id)?.filter(|r| r.device == *device);
            let Some(current) = current.filter(|r| !r.state.is_final()) else {
                applied.counter = Some((device.clone(), "reply_unmatched"));
                return Ok(applied);
            };
            // A reply proves delivery (its PUBACK may still be on its way to us).
            if current.state != CommandState::Delivered {
                if let Some(r) = move_to(tx, command_id, CommandState::Delivered, "", *at_ms)? {
                    applied.changed.push(r);
                }
            }
            match status {
                ReplyStatus::InProgress => {
                    // The reply timeout runs from `updated_ms`: it starts again.
                    tx.prepare_cached(
                        "UPDATE commands SET updated_ms = ?2, detail = ?3 WHERE command_id = ?1",
                    )?
                    .execute(params![command_id, at_ms, detail])?;
                    applied.touched = by_command_id(tx, command_id)?;
                }
                ReplyStatus::Succeeded | ReplyStatus::Failed => {
                    let to = if *status == ReplyStatus::Succeeded {
                        CommandState::Succeeded
                    } else {
                        CommandState::Failed
                    };
                    if let Some(r) = move_to(tx, command_id, to, detail, *at_ms)? {
                        applied.changed.push(r);
                    }
                }
            }
        }
        CommandOp::Open(_) => {
            let rows = tx
                .prepare_cached(&format!(
                    "SELECT {COLUMNS} FROM commands WHERE {OPEN} ORDER BY id"
                ))?
                .query_map([], row)?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            let newest: i64 =
                tx.query_row("SELECT COALESCE(MAX(id), 0) FROM commands", [], |r| {
                    r.get(0)
                })?;
            applied.answer = Some(Answer::Rows(rows, newest));
        }
        CommandOp::Notice(notice, _) => {
            applied.answer = Some(Answer::Done);
            match notice {
                Some((payload, expires_ms)) => {
                    tx.prepare_cached(
                        "INSERT INTO notice (id, payload, expires_ms) VALUES (1, ?1, ?2)
                     ON CONFLICT(id) DO UPDATE SET payload = excluded.payload,
                         expires_ms = excluded.expires_ms",
                    )?
                    .execute(params![payload, expires_ms])?;
                }
                None => {
                    tx.execute("DELETE FROM notice", [])?;
                }
            }
        }
    }
    Ok(applied)
}

/// Move `command_id` to `to` if it may; the changed row, or `None` for no change.
fn move_to(
    tx: &Transaction<'_>,
    command_id: &str,
    to: CommandState,
    detail: &str,
    at_ms: i64,
) -> rusqlite::Result<Option<CommandRow>> {
    let Some(mut current) = by_command_id(tx, command_id)? else {
        return Ok(None);
    };
    if !current.state.may_become(to) {
        return Ok(None);
    }
    tx.prepare_cached(
        "UPDATE commands SET state = ?2, detail = ?3, updated_ms = ?4 WHERE command_id = ?1",
    )?
    .execute(params![command_id, to.as_str(), detail, at_ms])?;
    current.state = to;
    current.detail = detail.to_owned();
    current.updated_ms = at_ms;
    Ok(Some(current))
}

/// How long a finished command (and so its `command_id`) is kept: a command lives at most
/// seven days, so central sending an id again within them finds it.
pub const KEEP_FINISHED_MS: i64 = 8 * 24 * 3_600_000;
/// Most finished commands kept whatever their age (oldest go first past it), so a central
/// sending endless refused commands cannot fill the disk.
pub const MAX_FINISHED: i64 = 100_000;

/// Forget finished commands past [`KEEP_FINISHED_MS`] or beyond [`MAX_FINISHED`].
pub(super) fn prune(conn: &rusqlite::Connection, now_ms: i64) -> rusqlite::Result<usize> {
    let finished = format!("NOT {OPEN}");
    let old = conn.execute(
        &format!("DELETE FROM commands WHERE {finished} AND updated_ms < ?1"),
        params![now_ms - KEEP_FINISHED_MS],
    )?;
    let over = conn.execute(
        &format!(
            "DELETE FROM commands WHERE {finished} AND id <= (
               SELECT id FROM commands WHERE {finished} ORDER BY id DESC LIMIT 1 OFFSET ?1)"
        ),
        params![MAX_FINISHED],
    )?;
    Ok(old + over)
}

/// The `data` of a command row in the outbox (README "Commands").
pub(super) fn outbox_payload(r: &CommandRow) -> String {
    serde_json::json!({
        "command_id": r.command_id,
        "name": r.name,
        "state": r.state.as_str(),
        "at": crate::model::format_ms(r.updated_ms),
        "detail": r.detail,
    })
    .to_string()
}

/// Commands listed by the API: newest first, `id` below `before` when given.
pub fn list(
    conn: &rusqlite::Connection,
    device: Option<&str>,
    state: Option<CommandState>,
    after: Option<i64>,
    limit: usize,
) -> rusqlite::Result<Vec<CommandRow>> {
    let mut st = conn.prepare_cached(&format!(
        "SELECT {COLUMNS} FROM commands
         WHERE (?1 IS NULL OR device = ?1) AND (?2 IS NULL OR state = ?2) AND id > ?3
         ORDER BY id LIMIT ?4"
    ))?;
    let rows = st
        .query_map(
            params![
                device,
                state.map(CommandState::as_str),
                after.unwrap_or(0),
                limit as i64
            ],
            row,
        )?
        .collect();
    rows
}

/// One command by id, for the API.
pub fn get(conn: &rusqlite::Connection, command_id: &str) -> rusqlite::Result<Option<CommandRow>> {
    conn.prepare_cached(&format!(
        "SELECT {COLUMNS} FROM commands WHERE command_id = ?1"
    ))?
    .query_row(params![command_id], row)
    .optional()
}

/// Commands per state (all states, zeros included), for `status` and `/metrics`.
pub fn counts(conn: &rusqlite::Connection) -> rusqlite::Result<Vec<(CommandState, i64)>> {
    let mut out: Vec<(CommandState, i64)> = CommandState::ALL.iter().map(|s| (*s, 0)).collect();
    let mut st = conn.prepare_cached("SELECT state, COUNT(*) FROM commands GROUP BY state")?;
    let mut rows = st.query([])?;
    while let Some(r) = rows.next()? {
        let state: String = r.get(0)?;
        let n: i64 = r.get(1)?;
        if let Some(slot) = out.iter_mut().find(|(s, _)| s.as_str() == state) {
            slot.1 = n;
        }
    }
    Ok(out)
}

/// The branch notice, if one is set and not expired at `now_ms`.
pub fn notice(conn: &rusqlite::Connection, now_ms: i64) -> rusqlite::Result<Option<(String, i64)>> {
    conn.query_row(
        "SELECT payload, expires_ms FROM notice WHERE id = 1 AND expires_ms > ?1",
        params![now_ms],
        |r| Ok((r.get(0)?, r.get(1)?)),
    )
    .optional()
}

#[cfg(test)]
mod tests {
    use super::CommandState::{self, *};

    /// Only forward moves; a final state never changes.
    #[test]
    fn states_only_move_forward() {
        for from in CommandState::ALL {
            for to in CommandState::ALL {
                if from.is_final() {
                    assert!(!from.may_become(to), "{from:?} -> {to:?}");
                }
                if from == to {
                    assert!(!from.may_become(to));
                }
            }
        }
        assert!(Queued.may_become(Sent) && Sent.may_become(Delivered));
        assert!(Delivered.may_become(Succeeded) && Delivered.may_become(TimedOut));
        assert!(!Delivered.may_become(Expired) && !Sent.may_become(Queued));
        assert!(!Queued.may_become(Succeeded) && !Sent.may_become(TimedOut));
        for s in CommandState::ALL {
            assert_eq!(CommandState::parse(s.as_str()), Some(s));
        }
    }
}
