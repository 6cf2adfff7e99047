//! Serial devices: one task per configured port reads bytes with tokio-serial, decodes them
//! with the profile's rules ([`decode`]) and reports what happened as [`SerialEvent`]s on a
//! bounded channel; `app` turns those into intake messages, presence and counters.
//!
//! A port that is missing, unplugged (EOF, which tokio-serial then returns on every read)
//! or failing is closed and reopened after a growing, jittered delay (0.5 s to 30 s): never
//! a busy loop. Problems are counted per event and logged at most once per 10 s per port.

pub mod decode;
pub mod sim;

use std::sync::Arc;
use std::time::Duration;

use rand::Rng;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio_serial::SerialPortBuilderExt;
use tokio_util::sync::CancellationToken;

use crate::config::serial_spec::SerialSpec;
use crate::config::{Parity, SerialPortSection};
use crate::model::DeviceId;
use decode::{CounterState, FrameDecoder, FrameProblem};

/// Events waiting for the app (per port).
pub const EVENT_QUEUE: usize = 256;
/// Commands waiting to be written to one port.
pub const COMMAND_QUEUE: usize = 16;
const REOPEN_MIN: Duration = Duration::from_millis(500);
const REOPEN_MAX: Duration = Duration::from_secs(30);
const PROBLEM_LOG_EVERY: Duration = Duration::from_secs(10);

#[derive(Debug, Clone, PartialEq)]
pub enum SerialEvent {
    /// The port is open.
    Online { device: DeviceId },
    /// The port was closed (unplugged, read or write error) or could not be opened.
    Offline { device: DeviceId, reason: String },
    /// A decoded frame as a telemetry payload (JSON object text).
    Telemetry { device: DeviceId, payload: String },
    /// Something was counted: a `FrameProblem` name, `serial_poll_timeout`,
    /// `serial_open_failed`, `serial_command_sent`.
    Counted {
        device: DeviceId,
        what: &'static str,
    },
}

/// One configured serial device.
#[derive(Debug, Clone)]
pub struct SerialDevice {
    pub device: DeviceId,
    pub port: SerialPortSection,
    pub spec: Arc<SerialSpec>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CommandError {
    #[error("device {0} is not a serial device")]
    NotSerial(String),
    #[error("profile of device {device} declares no command `{command}`")]
    Unknown { device: String, command: String },
    #[error("the command queue of device {0} is full")]
    Busy(String),
}

/// Sends commands declared in a device's profile to its port.
#[derive(Debug, Clone, Default)]
pub struct Commands {
    ports: std::collections::HashMap<DeviceId, (Arc<SerialSpec>, mpsc::Sender<Written>)>,
}

/// Bytes for a port, and who to tell once they are written.
/// `(bytes, not after (Unix ms), who to tell once written)`: bytes whose time has passed
/// while the port was closed are not written.
pub type Written = (Vec<u8>, i64, Option<tokio::sync::oneshot::Sender<()>>);

impl Commands {
    pub fn insert(&mut self, device: DeviceId, spec: Arc<SerialSpec>, tx: mpsc::Sender<Written>) {
        self.ports.insert(device, (spec, tx));
    }

    /// The serial devices.
    pub fn devices(&self) -> impl Iterator<Item = &DeviceId> {
        self.ports.keys()
    }

    /// Queue the named command; it is written when the port is open (held while it is
    /// closed, in a queue of [`COMMAND_QUEUE`]).
    pub fn send(&self, device: &str, command: &str) -> Result<(), CommandError> {
        self.send_then(device, command, i64::MAX, None)
    }

    /// [`Commands::send`], telling `written` once the bytes are written to the port.
    pub fn send_then(
        &self,
        device: &str,
        command: &str,
        not_after_ms: i64,
        written: Option<tokio::sync::oneshot::Sender<()>>,
    ) -> Result<(), CommandError> {
        let (spec, tx) = self
            .ports
            .get(device)
            .ok_or_else(|| CommandError::NotSerial(device.to_owned()))?;
        let bytes = spec
            .commands
            .get(command)
            .and_then(|c| c.bytes().ok())
            .ok_or_else(|| CommandError::Unknown {
                device: device.to_owned(),
                command: command.to_owned(),
            })?;
        tx.try_send((bytes, not_after_ms, written))
            .map_err(|_| CommandError::Busy(device.to_owned()))
    }
}

fn open(port: &SerialPortSection) -> Result<tokio_serial::SerialStream, tokio_serial::Error> {
    let data_bits = match port.data_bits {
        5 => tokio_serial::DataBits::Five,
        6 => tokio_serial::DataBits::Six,
        7 => tokio_serial::DataBits::Seven,
        _ => tokio_serial::DataBits::Eight,
    };
    let parity = match port.parity {
        Parity::None => tokio_serial::Parity::None,
        Parity::Odd => tokio_serial::Parity::Odd,
        Parity::Even => tokio_serial::Parity::Even,
    };
    let stop_bits = match port.stop_bits {
        2 => tokio_serial::StopBits::Two,
        _ => tokio_serial::StopBits::One,
    };
    tokio_serial::new(port.path.to_string_lossy(), port.baud)
        .data_bits(data_bits)
        .parity(parity)
        .stop_bits(stop_bits)
        .open_native_async()
}

/// Read one serial device until `shutdown`. `counters` holds the last raw counter values
/// (from the newest stored message) so increments continue across restarts.
pub async fn run(
    dev: SerialDevice,
    mut counters: CounterState,
    events: mpsc::Sender<SerialEvent>,
    mut commands: mpsc::Receiver<Written>,
    shutdown: CancellationToken,
) {
    let id = dev.device.clone();
    let mut decoder = match FrameDecoder::new(dev.spec.clone()) {
        Ok(d) => d,
        Err(e) => {
            tracing::error!(device = %id, error = %e, "serial decoder cannot start");
            return;
        }
    };
    let poll = dev.spec.poll.as_ref().and_then(|p| {
        p.request.bytes().ok().map(|req| {
            (
                req,
                Duration::from_millis(p.interval_ms),
                Duration::from_millis(p.timeout_ms),
            )
        })
    });
    let count = |what: &'static str| {
        let _ = events.try_send(SerialEvent::Counted {
            device: id.clone(),
            what,
        });
    };
    let mut failures: u32 = 0;
    let mut problems = ProblemLog::default();
    loop {
        let mut stream = match open(&dev.port) {
            Ok(s) => s,
            Err(e) => {
                count("serial_open_failed");
                if failures == 0 || failures.is_power_of_two() {
                    tracing::warn!(device = %id, path = %dev.port.path.display(), error = %e, attempts = failures + 1, "cannot open serial port; retrying");
                }
                if failures == 0 {
                    let _ = events
                        .send(SerialEvent::Offline {
                            device: id.clone(),
                            reason: e.to_string(),
                        })
                        .await;
                }
                failures = failures.saturating_add(1);
                if wait_or_stop(reopen_delay(failures), &shutdown).await {
                    return;
                }
                continue;
            }
        };
        tracing::info!(device = %id, path = %dev.port.path.display(), baud = dev.port.baud, "serial port open");
        let _ = events
            .send(SerialEvent::Online { device: id.clone() })
            .await;
        decoder.reset();
        let mut buf = vec![0u8; 1024];
        let mut out = Vec::new();
        let mut poll_tick =
            tokio::time::interval(poll.as_ref().map_or(Duration::from_secs(3600), |p| p.1));
        poll_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut awaiting: Option<tokio::time::Instant> = None;
        let far = tokio::time::Instant::now() + Duration::from_secs(86_400 * 365);
        let reason = loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                r = stream.read(&mut buf) => match r {
                    Ok(0) => break "end of file (unplugged?)".to_owned(),
                    Err(e) => break e.to_string(),
                    Ok(n) => {
                        failures = 0;
                        decoder.push(&buf[..n], &mut out);
                        for d in out.drain(..) {
                            match d {
                                Ok(mut obj) => {
                                    awaiting = None;
                                    counters.apply(&dev.spec, &mut obj);
                                    let payload = serde_json::Value::Object(obj).to_string();
                                    // Telemetry waits for room: it is never dropped here.
                                    if events.send(SerialEvent::Telemetry { device: id.clone(), payload }).await.is_err() {
                                        return;
                                    }
                                }
                                Err(p) => {
                                    count(p.as_str());
                                    problems.note(&id, &p);
                                }
                            }
                        }
                    }
                },
                _ = poll_tick.tick(), if poll.is_some() => {
                    let (req, _, timeout) = poll.as_ref().expect("guarded");
                    if awaiting.is_some() {
                        count("serial_poll_timeout");
                    }
                    if let Err(e) = stream.write_all(req).await {
                        break e.to_string();
                    }
                    awaiting = Some(tokio::time::Instant::now() + *timeout);
                }
                _ = tokio::time::sleep_until(awaiting.unwrap_or(far)), if awaiting.is_some() => {
                    awaiting = None;
                    count("serial_poll_timeout");
                }
                Some((cmd, not_after_ms, written)) = commands.recv() => {
                    if crate::model::now_ms() >= not_after_ms {
                        count("serial_command_expired");
                        continue;
                    }
                    if let Err(e) = stream.write_all(&cmd).await {
                        break e.to_string();
                    }
                    if let Some(w) = written {
                        let _ = w.send(());
                    }
                    count("serial_command_sent");
                    tracing::info!(device = %id, bytes = cmd.len(), "serial command sent");
                }
            }
        };
        drop(stream);
        tracing::warn!(device = %id, path = %dev.port.path.display(), reason = %reason, "serial port closed; reopening");
        let _ = events
            .send(SerialEvent::Offline {
                device: id.clone(),
                reason,
            })
            .await;
        failures = failures.saturating_add(1);
        if wait_or_stop(reopen_delay(failures), &shutdown).await {
            return;
        }
    }
}

/// 0.5 s doubling to 30 s, jittered to 50-100%.
fn reopen_delay(failures: u32) -> Duration {
    let exp = REOPEN_MIN.saturating_mul(1u32 << failures.saturating_sub(1).min(10));
    let capped = exp.min(REOPEN_MAX);
    capped.mul_f64(rand::thread_rng().gen_range(0.5..=1.0))
}

/// Sleep; true when `shutdown` came first.
async fn wait_or_stop(d: Duration, shutdown: &CancellationToken) -> bool {
    tokio::select! {
        _ = shutdown.cancelled() => true,
        _ = tokio::time::sleep(d) => false,
    }
}

/// Logs frame problems at most once per [`PROBLEM_LOG_EVERY`] per port, with a count.
#[derive(Default)]
struct ProblemLog {
    last: Option<tokio::time::Instant>,
    suppressed: u64,
}

impl ProblemLog {
    fn note(&mut self, device: &str, p: &FrameProblem) {
        let now = tokio::time::Instant::now();
        match self.last {
            Some(t) if now - t < PROBLEM_LOG_EVERY => self.suppressed += 1,
            _ => {
                tracing::warn!(
                    device,
                    problem = p.as_str(),
                    suppressed_since_last_report = self.suppressed,
                    "serial data not decoded"
                );
                self.last = Some(now);
                self.suppressed = 0;
            }
        }
    }
}
