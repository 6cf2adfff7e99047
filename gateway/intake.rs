//! Intake: drain the broker's `devices/#` link, check each message against its device's
//! profile, stamp it with the receive time and hand it to the buffer's writer.
//!
//! Invalid messages are counted per device and reason (in the buffer), stored in the
//! bounded `rejected` table, and logged once per burst. The drain never blocks on anything
//! but the writer's bounded queue.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use rumqttd::Notification;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::broker::IntakeLink;
use crate::buffer::Write;
use crate::burst::BurstLimiter;
use crate::config::{DeviceTable, SharedDevices};
use crate::model::{now_ms, Accepted, DeviceId, Kind, RejectReason, Rejected, Rejection};

/// Bytes of a rejected payload kept for branch IT to look at.
pub const EXCERPT_BYTES: usize = 256;

/// After shutdown is requested, keep draining until the link is quiet this long.
const DRAIN_QUIET: Duration = Duration::from_millis(300);
/// ... but never longer than this.
const DRAIN_MAX: Duration = Duration::from_secs(5);

#[derive(Debug, Default)]
pub struct IntakeStats {
    pub accepted: AtomicU64,
    pub rejected: AtomicU64,
    /// Messages on `devices/X/...` where X is no configured device (possible only
    /// between a reload that removed X and X's disconnection).
    pub unknown_device: AtomicU64,
    /// Times intake found the writer's queue full and had to wait.
    pub writer_waits: AtomicU64,
}

/// What one message became. Pure: no I/O.
#[derive(Debug, PartialEq)]
pub enum Outcome {
    Accepted(Accepted),
    Rejected(Rejected),
    /// Not a device topic or not a configured device: nothing to store.
    Ignored,
}

/// Check one broker message. `received_ms` is the gateway's receive time.
pub fn classify(table: &DeviceTable, topic: &[u8], payload: &[u8], received_ms: i64) -> Outcome {
    let Some((device, kind_name)) = std::str::from_utf8(topic)
        .ok()
        .and_then(|t| t.strip_prefix("devices/"))
        .and_then(|t| t.split_once('/'))
    else {
        return Outcome::Ignored;
    };
    let Some(entry) = table.get(device) else {
        return Outcome::Ignored;
    };
    let result = match Kind::parse(kind_name) {
        Some(kind) => entry
            .profile
            .validate(kind, payload)
            .map(|payload| (kind, payload)),
        None => Err(Rejection::new(
            RejectReason::UnknownKind,
            format!(
                "topic kind {:?} is not telemetry, events or status",
                crate::config::profile::truncate(kind_name, 40)
            ),
        )),
    };
    match result {
        Ok((kind, payload)) => Outcome::Accepted(Accepted {
            device: device.to_owned(),
            kind,
            received_ms,
            payload,
        }),
        Err(rejection) => Outcome::Rejected(Rejected {
            device: device.to_owned(),
            kind: crate::config::profile::truncate(kind_name, 40),
            received_ms,
            rejection,
            excerpt: excerpt(payload),
        }),
    }
}

fn excerpt(payload: &[u8]) -> String {
    let cut = &payload[..payload.len().min(EXCERPT_BYTES)];
    String::from_utf8_lossy(cut).into_owned()
}

pub struct Intake {
    pub link: IntakeLink,
    pub devices: SharedDevices,
    pub writer: mpsc::Sender<Write>,
    pub stats: Arc<IntakeStats>,
}

impl Intake {
    /// Run until `shutdown`, then drain what the broker already accepted and return.
    pub async fn run(mut self, shutdown: CancellationToken) {
        let mut log = BurstLimiter::<(DeviceId, RejectReason)>::new(10_000, 4096);
        loop {
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => break,
                n = self.link.rx.next() => if !self.handle(n, &mut log).await { return },
            }
        }
        // Devices can no longer get acknowledgements (the broker closes them), but what
        // it acknowledged before must reach the buffer.
        let deadline = tokio::time::Instant::now() + DRAIN_MAX;
        loop {
            let quiet = tokio::time::sleep(DRAIN_QUIET);
            tokio::select! {
                _ = quiet => break,
                _ = tokio::time::sleep_until(deadline) => break,
                n = self.link.rx.next() => if !self.handle(n, &mut log).await { break },
            }
        }
    }

    /// Returns false when the link is gone.
    async fn handle(
        &mut self,
        n: Result<Option<Notification>, rumqttd::local::LinkError>,
        log: &mut BurstLimiter<(DeviceId, RejectReason)>,
    ) -> bool {
        match n {
            Ok(Some(Notification::Forward(f))) => {
                let table = self.devices.load();
                let now = now_ms();
                match classify(&table, &f.publish.topic, &f.publish.payload, now) {
                    Outcome::Accepted(m) => {
                        self.stats.accepted.fetch_add(1, Ordering::Relaxed);
                        self.send(Write::Accepted(m)).await;
                    }
                    Outcome::Rejected(r) => {
                        self.stats.rejected.fetch_add(1, Ordering::Relaxed);
                        let key = (r.device.clone(), r.rejection.reason);
                        if let Some(suppressed) = log.hit(&key, now) {
                            tracing::warn!(
                                device = %r.device,
                                kind = %r.kind,
                                reason = r.rejection.reason.as_str(),
                                detail = %r.rejection.detail,
                                suppressed_since_last_report = suppressed,
                                "message rejected"
                            );
                        }
                        self.send(Write::Rejected(r)).await;
                    }
                    Outcome::Ignored => {
                        self.stats.unknown_device.fetch_add(1, Ordering::Relaxed);
                    }
                }
                true
            }
            Ok(Some(Notification::Unschedule)) => {
                // The router paused this link; it must be re-armed or delivery stops.
                self.link.rx.wake().await.is_ok()
            }
            Ok(_) => true,
            Err(e) => {
                tracing::error!(error = %e, "broker link to intake closed");
                false
            }
        }
    }

    async fn send(&mut self, w: Write) {
        match self.writer.try_send(w) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(w)) => {
                self.stats.writer_waits.fetch_add(1, Ordering::Relaxed);
                let _ = self.writer.send(w).await;
            }
            Err(mpsc::error::TrySendError::Closed(_)) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Device, Password, Profile};
    use std::collections::HashMap;

    fn table() -> DeviceTable {
        let profile = Profile::from_json(
            r#"{"name":"p","description":"","telemetry":{"max_bytes":100,"fields":{"n":{"type":"integer"}}}}"#,
        )
        .unwrap();
        let mut devices = HashMap::new();
        devices.insert(
            "k1".to_owned(),
            Device {
                id: "k1".into(),
                profile: Arc::new(profile),
                password: Password::parse("x").unwrap(),
            },
        );
        DeviceTable { devices }
    }

    #[test]
    fn accepts_and_stamps() {
        let out = classify(&table(), b"devices/k1/telemetry", br#"{"n":1}"#, 42);
        assert_eq!(
            out,
            Outcome::Accepted(Accepted {
                device: "k1".into(),
                kind: Kind::Telemetry,
                received_ms: 42,
                payload: r#"{"n":1}"#.into()
            })
        );
        let status = classify(&table(), b"devices/k1/status", b"offline", 1);
        assert!(matches!(
            status,
            Outcome::Accepted(Accepted {
                kind: Kind::Status,
                ..
            })
        ));
    }

    #[test]
    fn rejects_with_reason_and_excerpt() {
        let long = vec![b'x'; 1000];
        let Outcome::Rejected(r) = classify(&table(), b"devices/k1/telemetry", &long, 1) else {
            panic!()
        };
        assert_eq!(r.rejection.reason, RejectReason::TooLarge);
        assert_eq!(r.excerpt.len(), EXCERPT_BYTES);
        let Outcome::Rejected(r) = classify(&table(), b"devices/k1/events", b"{}", 1) else {
            panic!()
        };
        assert_eq!(r.rejection.reason, RejectReason::UnknownKind);
        let Outcome::Rejected(r) = classify(&table(), b"devices/k1/commands", b"{}", 1) else {
            panic!()
        };
        assert_eq!(
            (r.rejection.reason, r.kind.as_str()),
            (RejectReason::UnknownKind, "commands")
        );
    }

    #[test]
    fn ignores_unknown_devices_and_topics() {
        assert_eq!(
            classify(&table(), b"devices/k2/telemetry", b"{}", 1),
            Outcome::Ignored
        );
        assert_eq!(
            classify(&table(), b"other/k1/telemetry", b"{}", 1),
            Outcome::Ignored
        );
        assert_eq!(
            classify(&table(), b"devices/k1", b"{}", 1),
            Outcome::Ignored
        );
    }
}
