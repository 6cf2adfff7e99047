//! Which command goes to which device, and when: the dispatcher's logic without I/O.
//!
//! Per device, its open commands (queued, sent, delivered) in arrival order (`id`), the
//! connection that takes its commands (if any), and the one command in flight. Inputs are
//! the committed changes from the writer, the broker's link reports and the clock; the
//! outputs are [`Action`]s the glue carries out. The writer has the last word on every
//! state ([`CommandState::may_become`]); this only ever proposes forward moves.

use std::collections::{HashMap, HashSet, VecDeque};

use crate::buffer::commands::{CommandRow, CommandState};

/// The "connection" of a serial device: its port, always there (a closed port holds
/// written commands until it opens again).
pub(crate) const SERIAL: u64 = 0;

#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Action {
    /// Write `command` to `device` over `connection` ([`SERIAL`]: its port).
    Deliver {
        device: String,
        connection: u64,
        command: CommandRow,
    },
    /// Ask the writer to move a command on.
    Move {
        command_id: String,
        to: CommandState,
        detail: String,
    },
}

#[derive(Debug, Default)]
struct Device {
    open: VecDeque<CommandRow>,
    /// The connections that take this device's commands, newest last (commands go to the
    /// newest; bounded by the broker's connections per device).
    links: Vec<u64>,
    /// The command written and not yet acknowledged, and over which connection.
    in_flight: Option<(String, u64)>,
}

#[derive(Debug, Default)]
pub(crate) struct Dispatch {
    devices: HashMap<String, Device>,
    /// The newest command `id` known: a `queued` change at or below it is stale (that
    /// command is known, or already finished).
    newest: i64,
}

impl Dispatch {
    /// A dispatcher whose `serial` devices always take commands (over their port).
    pub(crate) fn new(serial: impl IntoIterator<Item = String>) -> Dispatch {
        let mut d = Dispatch::default();
        for device in serial {
            d.devices.entry(device).or_default().links = vec![SERIAL];
        }
        d
    }

    /// Open commands held (bounded by the writer's per-device limit).
    #[cfg(test)]
    pub(crate) fn open(&self) -> usize {
        self.devices.values().map(|d| d.open.len()).sum()
    }

    /// Start again from the writer's open commands (`newest`: the newest command id it
    /// has). A command in flight that is still open stays in flight.
    pub(crate) fn reload(&mut self, rows: Vec<CommandRow>, newest: i64, now: i64) -> Vec<Action> {
        self.newest = self.newest.max(newest);
        for d in self.devices.values_mut() {
            d.open.clear();
        }
        for r in rows {
            self.devices
                .entry(r.device.clone())
                .or_default()
                .open
                .push_back(r);
        }
        for d in self.devices.values_mut() {
            d.open.make_contiguous().sort_by_key(|r| r.id);
            let still = d
                .in_flight
                .as_ref()
                .is_some_and(|(id, _)| d.open.iter().any(|r| &r.command_id == id));
            if !still {
                d.in_flight = None;
            }
        }
        self.pump_all(now)
    }

    /// Changes the writer committed.
    pub(crate) fn on_changes(&mut self, rows: Vec<CommandRow>, now: i64) -> Vec<Action> {
        let mut out = Vec::new();
        let mut touched = HashSet::new();
        for r in rows {
            // A finished command of a device with nothing open here needs no entry (central
            // may name any device: only devices with open commands are kept).
            if r.state.is_final() && !self.devices.contains_key(&r.device) {
                continue;
            }
            let device = self.devices.entry(r.device.clone()).or_default();
            match device.open.iter_mut().find(|o| o.id == r.id) {
                Some(known) if known.state == r.state => {
                    known.updated_ms = r.updated_ms;
                    known.detail = r.detail;
                }
                Some(known) if known.state.may_become(r.state) => *known = r.clone(),
                Some(_) => continue, // an older state than the one known here
                None if r.state == CommandState::Queued && r.id > self.newest => {
                    self.newest = r.id;
                    device.open.push_back(r.clone());
                }
                None => continue,
            }
            if r.state.is_final() {
                device.open.retain(|o| o.id != r.id);
                if device
                    .in_flight
                    .as_ref()
                    .is_some_and(|(id, _)| *id == r.command_id)
                {
                    device.in_flight = None;
                }
            }
            touched.insert(r.device);
        }
        for device in touched {
            self.pump(&device, now, &mut out);
        }
        out
    }

    /// A connection of `device` takes commands now (it replaces any other).
    pub(crate) fn on_ready(&mut self, device: &str, connection: u64, now: i64) -> Vec<Action> {
        let d = self.devices.entry(device.to_owned()).or_default();
        d.links.retain(|c| *c != connection);
        d.links.push(connection);
        if d.in_flight.as_ref().is_some_and(|(_, c)| *c != connection) {
            // Written to a connection that is gone: it goes again on this one.
            d.in_flight = None;
        }
        let mut out = Vec::new();
        self.pump(device, now, &mut out);
        out
    }

    /// That connection is gone (or no longer subscribed).
    pub(crate) fn on_gone(&mut self, device: &str, connection: u64) {
        if let Some(d) = self.devices.get_mut(device) {
            d.links.retain(|c| *c != connection);
            if d.in_flight.as_ref().is_some_and(|(_, c)| *c == connection) {
                d.in_flight = None;
            }
        }
    }

    /// The connection could not take the command it was handed (`why`: see
    /// [`crate::model::CommandLink::Refused`]): it fails (or expired), and the next goes on.
    pub(crate) fn on_refused(
        &mut self,
        device: &str,
        connection: u64,
        command_id: &str,
        why: &str,
        now: i64,
    ) -> Vec<Action> {
        let mut out = Vec::new();
        let Some(d) = self.devices.get_mut(device) else {
            return out;
        };
        if d.in_flight.as_ref() != Some(&(command_id.to_owned(), connection)) {
            return out;
        }
        d.in_flight = None;
        if let Some(c) = d.open.iter_mut().find(|c| c.command_id == command_id) {
            let (to, detail) = match why {
                "expired" => (CommandState::Expired, String::new()),
                "not_subscribed" => (
                    CommandState::Failed,
                    format!("not_subscribed: the device does not subscribe to devices/{device}/commands/{}", c.name),
                ),
                other => (CommandState::Failed, format!("{other}: not deliverable to the device")),
            };
            c.state = to;
            out.push(Action::Move {
                command_id: c.command_id.clone(),
                to,
                detail,
            });
        }
        d.open.retain(|c| !c.state.is_final());
        self.pump(device, now, &mut out);
        out
    }

    /// The connection could not be handed the command now (its mailbox was full): it goes
    /// again on the next tick.
    pub(crate) fn on_busy(&mut self, device: &str, connection: u64) {
        if let Some(d) = self.devices.get_mut(device) {
            if d.in_flight.as_ref().is_some_and(|(_, c)| *c == connection) {
                d.in_flight = None;
            }
        }
    }

    /// The device acknowledged `command_id` (PUBACK `reason`; a serial write: 0).
    pub(crate) fn on_acked(
        &mut self,
        device: &str,
        connection: u64,
        command_id: &str,
        reason: u8,
        now: i64,
    ) -> Vec<Action> {
        let mut out = Vec::new();
        let Some(d) = self.devices.get_mut(device) else {
            return out;
        };
        let expected = (command_id.to_owned(), connection);
        if d.in_flight.as_ref() != Some(&expected) {
            return out; // a late acknowledgement of a command already expired or resent
        }
        d.in_flight = None;
        if let Some(c) = d.open.iter_mut().find(|c| c.command_id == command_id) {
            if c.state.may_become(CommandState::Delivered) {
                c.state = CommandState::Delivered;
                c.updated_ms = now;
                out.push(Action::Move {
                    command_id: c.command_id.clone(),
                    to: CommandState::Delivered,
                    detail: String::new(),
                });
            }
            if reason >= 0x80 {
                c.state = CommandState::Failed;
                out.push(Action::Move {
                    command_id: c.command_id.clone(),
                    to: CommandState::Failed,
                    detail: format!("refused by the device: PUBACK reason 0x{reason:02x}"),
                });
            }
        }
        d.open.retain(|c| !c.state.is_final());
        self.pump(device, now, &mut out);
        out
    }

    /// Expire, time out and deliver what the clock allows.
    pub(crate) fn on_tick(&mut self, now: i64) -> Vec<Action> {
        self.pump_all(now)
    }

    fn pump_all(&mut self, now: i64) -> Vec<Action> {
        let mut out = Vec::new();
        let devices: Vec<String> = self
            .devices
            .iter()
            .filter(|(_, d)| !d.open.is_empty())
            .map(|(k, _)| k.clone())
            .collect();
        for device in devices {
            self.pump(&device, now, &mut out);
        }
        out
    }

    fn pump(&mut self, device: &str, now: i64, out: &mut Vec<Action>) {
        let Some(d) = self.devices.get_mut(device) else {
            return;
        };
        // Not delivered before `expires_at`: expired (a command in flight too: its late
        // PUBACK changes nothing).
        for c in d.open.iter_mut() {
            let undelivered = matches!(c.state, CommandState::Queued | CommandState::Sent);
            if undelivered && c.expires_ms <= now {
                c.state = CommandState::Expired;
                out.push(Action::Move {
                    command_id: c.command_id.clone(),
                    to: CommandState::Expired,
                    detail: String::new(),
                });
                if d.in_flight
                    .as_ref()
                    .is_some_and(|(id, _)| *id == c.command_id)
                {
                    d.in_flight = None;
                }
            }
        }
        d.open.retain(|c| !c.state.is_final());
        while let Some(head) = d.open.front_mut() {
            match head.state {
                CommandState::Delivered => match head.reply_timeout_ms {
                    // No reply expected: delivered is its last state.
                    None => {
                        d.open.pop_front();
                    }
                    Some(t) if now >= head.updated_ms.saturating_add(t) => {
                        out.push(Action::Move {
                            command_id: head.command_id.clone(),
                            to: CommandState::TimedOut,
                            detail: format!("no reply within {} s", t / 1000),
                        });
                        d.open.pop_front();
                    }
                    Some(_) => return, // waiting for its reply
                },
                CommandState::Queued | CommandState::Sent => {
                    let (Some(&connection), None) = (d.links.last(), &d.in_flight) else {
                        return;
                    };
                    d.in_flight = Some((head.command_id.clone(), connection));
                    if head.state == CommandState::Queued {
                        head.state = CommandState::Sent;
                        head.updated_ms = now;
                        out.push(Action::Move {
                            command_id: head.command_id.clone(),
                            to: CommandState::Sent,
                            detail: String::new(),
                        });
                    }
                    out.push(Action::Deliver {
                        device: device.to_owned(),
                        connection,
                        command: head.clone(),
                    });
                    return;
                }
                _ => {
                    d.open.pop_front();
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use CommandState::*;

    fn row(id: i64, device: &str, state: CommandState) -> CommandRow {
        CommandRow {
            id,
            command_id: format!("c{id}"),
            device: device.into(),
            profile: "p".into(),
            name: "notice".into(),
            args: "{}".into(),
            state,
            detail: String::new(),
            created_ms: 0,
            updated_ms: 0,
            expires_ms: 10_000,
            reply_timeout_ms: Some(1_000),
        }
    }

    fn moves(actions: &[Action]) -> Vec<(String, CommandState)> {
        actions
            .iter()
            .filter_map(|a| match a {
                Action::Move { command_id, to, .. } => Some((command_id.clone(), *to)),
                _ => None,
            })
            .collect()
    }

    fn delivered(actions: &[Action]) -> Vec<(String, u64)> {
        actions
            .iter()
            .filter_map(|a| match a {
                Action::Deliver {
                    command,
                    connection,
                    ..
                } => Some((command.command_id.clone(), *connection)),
                _ => None,
            })
            .collect()
    }

    /// One in flight per device, in arrival order, only while connected; the next one
    /// goes when the first is answered.
    #[test]
    fn one_command_in_flight_in_order() {
        let mut d = Dispatch::new([]);
        let a = d.on_changes(vec![row(1, "k1", Queued), row(2, "k1", Queued)], 0);
        assert!(a.is_empty(), "offline: nothing delivered");
        let a = d.on_ready("k1", 7, 0);
        assert_eq!(delivered(&a), vec![("c1".into(), 7)]);
        assert_eq!(moves(&a), vec![("c1".into(), Sent)]);
        let a = d.on_acked("k1", 7, "c1", 0, 5);
        assert_eq!(moves(&a), vec![("c1".into(), Delivered)]);
        assert!(delivered(&a).is_empty(), "waits for c1's reply");
        let mut reply = row(1, "k1", Succeeded);
        reply.updated_ms = 6;
        let a = d.on_changes(vec![reply], 6);
        assert_eq!(delivered(&a), vec![("c2".into(), 7)]);
    }

    /// A connection lost with a command in flight: it goes again on the next one, and the
    /// old connection's late acknowledgement changes nothing.
    #[test]
    fn resent_after_a_reconnect() {
        let mut d = Dispatch::new([]);
        d.on_changes(vec![row(1, "k1", Queued)], 0);
        d.on_ready("k1", 1, 0);
        d.on_gone("k1", 1);
        let a = d.on_ready("k1", 2, 0);
        assert_eq!(delivered(&a), vec![("c1".into(), 2)]);
        assert!(moves(&a).is_empty(), "already sent");
        assert!(d.on_acked("k1", 1, "c1", 0, 1).is_empty());
        assert_eq!(
            moves(&d.on_acked("k1", 2, "c1", 0, 1)),
            vec![("c1".into(), Delivered)]
        );
    }

    #[test]
    fn expiry_and_reply_timeout() {
        let mut d = Dispatch::new([]);
        d.on_changes(vec![row(1, "k1", Queued), row(2, "k1", Queued)], 0);
        assert_eq!(
            moves(&d.on_tick(10_000)),
            vec![("c1".into(), Expired), ("c2".into(), Expired)]
        );
        assert_eq!(d.open(), 0);
        assert!(
            d.on_ready("k1", 1, 10_001).is_empty(),
            "expired: never delivered"
        );
        let mut r = row(3, "k1", Queued);
        r.expires_ms = 100_000;
        d.on_changes(vec![r], 20_000);
        d.on_acked("k1", 1, "c3", 0, 20_000);
        assert!(moves(&d.on_tick(20_999)).is_empty());
        assert_eq!(moves(&d.on_tick(21_000)), vec![("c3".into(), TimedOut)]);
    }

    /// Stale echoes of the writer never move a command back or bring a finished one back.
    #[test]
    fn stale_changes_are_ignored() {
        let mut d = Dispatch::new([]);
        d.on_changes(vec![row(1, "k1", Queued)], 0);
        d.on_ready("k1", 1, 0);
        d.on_acked("k1", 1, "c1", 0, 0);
        // The echoes of sent and delivered arrive late, then the reply.
        assert!(d.on_changes(vec![row(1, "k1", Sent)], 0).is_empty());
        d.on_changes(vec![row(1, "k1", Succeeded)], 0);
        assert_eq!(d.open(), 0);
        assert!(d.on_changes(vec![row(1, "k1", Queued)], 0).is_empty());
        assert_eq!(d.open(), 0, "a finished command never comes back");
    }

    #[test]
    fn a_refused_puback_fails_the_command() {
        let mut d = Dispatch::new([]);
        d.on_changes(vec![row(1, "k1", Queued)], 0);
        d.on_ready("k1", 1, 0);
        let a = d.on_acked("k1", 1, "c1", 0x87, 0);
        assert_eq!(
            moves(&a),
            vec![("c1".into(), Delivered), ("c1".into(), Failed)]
        );
        assert_eq!(d.open(), 0);
    }

    mod model {
        use super::*;
        use proptest::prelude::*;

        #[derive(Debug, Clone)]
        enum Step {
            New { device: u8, ttl: i64, reply: bool },
            Ready { device: u8, connection: u64 },
            Gone { device: u8, connection: u64 },
            Ack { device: u8 },
            Reply { device: u8 },
            Tick { ms: i64 },
        }

        fn step() -> impl Strategy<Value = Step> {
            prop_oneof![
                (0..3u8, 1..5_000i64, any::<bool>()).prop_map(|(device, ttl, reply)| Step::New {
                    device,
                    ttl,
                    reply
                }),
                (0..3u8, 1..4u64)
                    .prop_map(|(device, connection)| Step::Ready { device, connection }),
                (0..3u8, 1..4u64)
                    .prop_map(|(device, connection)| Step::Gone { device, connection }),
                (0..3u8).prop_map(|device| Step::Ack { device }),
                (0..3u8).prop_map(|device| Step::Reply { device }),
                (1..2_000i64).prop_map(|ms| Step::Tick { ms }),
            ]
        }

        /// The writer's side: every command's state, moved only as `may_become` allows.
        #[derive(Default)]
        struct Writer {
            rows: Vec<CommandRow>,
        }

        impl Writer {
            fn apply(&mut self, id: &str, to: CommandState, now: i64) -> Option<CommandRow> {
                let r = self.rows.iter_mut().find(|r| r.command_id == id)?;
                if !r.state.may_become(to) {
                    return None;
                }
                r.state = to;
                r.updated_ms = now;
                Some(r.clone())
            }
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(512))]
            /// Whatever devices, connections, acknowledgements, replies and the clock do: a
            /// command is handed to a device only when every older command of that device
            /// has finished (one in flight, arrival order), never after it expired or
            /// finished, only to a connection that is ready; and every command ends final
            /// once its device is connected, acknowledges and answers long enough.
            #[test]
            fn one_in_flight_in_order_never_expired(steps in prop::collection::vec(step(), 1..120)) {
                let mut d = Dispatch::new([]);
                let mut w = Writer::default();
                let mut now = 0i64;
                let mut next_id = 0i64;
                let mut links: HashMap<String, Vec<u64>> = HashMap::new();
                let mut handed: HashMap<String, (String, u64)> = HashMap::new();
                for s in steps {
                    let mut actions = match s {
                        Step::New { device, ttl, reply } => {
                            next_id += 1;
                            let mut r = row(next_id, &format!("d{device}"), CommandState::Queued);
                            r.expires_ms = now + ttl;
                            r.reply_timeout_ms = reply.then_some(1_000);
                            w.rows.push(r.clone());
                            d.on_changes(vec![r], now)
                        }
                        Step::Ready { device, connection } => {
                            let l = links.entry(format!("d{device}")).or_default();
                            l.retain(|c| *c != connection);
                            l.push(connection);
                            d.on_ready(&format!("d{device}"), connection, now)
                        }
                        Step::Gone { device, connection } => {
                            let dev = format!("d{device}");
                            if let Some(l) = links.get_mut(&dev) {
                                l.retain(|c| *c != connection);
                            }
                            d.on_gone(&dev, connection);
                            Vec::new()
                        }
                        Step::Ack { device } => {
                            let dev = format!("d{device}");
                            match handed.get(&dev).cloned() {
                                Some((id, c)) => d.on_acked(&dev, c, &id, 0, now),
                                None => Vec::new(),
                            }
                        }
                        Step::Reply { device } => {
                            let dev = format!("d{device}");
                            let open = w.rows.iter().find(|r| {
                                r.device == dev
                                    && matches!(r.state, CommandState::Sent | CommandState::Delivered)
                                    && r.reply_timeout_ms.is_some()
                            }).map(|r| r.command_id.clone());
                            let mut changes = Vec::new();
                            if let Some(id) = open {
                                changes.extend(w.apply(&id, CommandState::Delivered, now));
                                changes.extend(w.apply(&id, CommandState::Succeeded, now));
                            }
                            d.on_changes(changes, now)
                        }
                        Step::Tick { ms } => {
                            now += ms;
                            d.on_tick(now)
                        }
                    };
                    // Carry the actions out as the glue and the writer would, feeding the
                    // committed changes back until nothing more happens.
                    while !actions.is_empty() {
                        let mut changes = Vec::new();
                        for a in actions {
                            match a {
                                Action::Move { command_id, to, .. } => {
                                    changes.extend(w.apply(&command_id, to, now));
                                }
                                Action::Deliver { device, connection, command } => {
                                    prop_assert!(links.get(&device).is_some_and(|l| l.contains(&connection)), "not a ready connection");
                                    let me = w.rows.iter().find(|r| r.command_id == command.command_id).unwrap();
                                    prop_assert!(!me.is_done(), "a finished command handed out");
                                    prop_assert!(me.expires_ms > now, "an expired command handed out");
                                    for older in w.rows.iter().filter(|r| r.device == device && r.id < command.id) {
                                        prop_assert!(older.is_done(), "{} before {} finished", command.command_id, older.command_id);
                                    }
                                    handed.insert(device, (command.command_id, connection));
                                }
                            }
                        }
                        actions = d.on_changes(changes, now);
                    }
                }
            }
        }
    }

    /// A connection that cannot take a command (no matching subscription, too large,
    /// expired on its way) fails it once, and the next command goes on: never a loop.
    #[test]
    fn a_refused_command_fails_and_the_next_goes_on() {
        let mut d = Dispatch::new([]);
        d.on_changes(vec![row(1, "k1", Queued), row(2, "k1", Queued)], 0);
        d.on_ready("k1", 1, 0);
        let a = d.on_refused("k1", 1, "c1", "not_subscribed", 0);
        assert_eq!(moves(&a), vec![("c1".into(), Failed), ("c2".into(), Sent)]);
        assert_eq!(delivered(&a), vec![("c2".into(), 1)]);
        assert!(
            d.on_refused("k1", 1, "c1", "not_subscribed", 0).is_empty(),
            "once"
        );
    }

    /// Two connections of one device take commands: one going leaves the other.
    #[test]
    fn a_device_with_two_connections_keeps_the_other() {
        let mut d = Dispatch::new([]);
        d.on_ready("k1", 1, 0);
        d.on_ready("k1", 2, 0);
        d.on_gone("k1", 2);
        let a = d.on_changes(vec![row(1, "k1", Queued)], 0);
        assert_eq!(delivered(&a), vec![("c1".into(), 1)]);
        // A busy mailbox: tried again on the next tick, same connection.
        d.on_busy("k1", 1);
        assert_eq!(delivered(&d.on_tick(1)), vec![("c1".into(), 1)]);
    }

    #[test]
    fn serial_devices_take_commands_over_their_port() {
        let mut d = Dispatch::new(["gate".to_owned()]);
        let mut r = row(1, "gate", Queued);
        r.reply_timeout_ms = None;
        let a = d.on_changes(vec![r], 0);
        assert_eq!(delivered(&a), vec![("c1".into(), SERIAL)]);
        let a = d.on_acked("gate", SERIAL, "c1", 0, 0);
        assert_eq!(moves(&a), vec![("c1".into(), Delivered)]);
        assert_eq!(d.open(), 0, "no reply expected: done");
    }
}
