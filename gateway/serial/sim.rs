//! A simulated gate counter on a pseudo-terminal, for demos and tests on machines with no
//! serial hardware. People come and go; now and then the counter loses power (its totals
//! restart at 0) and the line picks up noise. The pty's far end is linked at a chosen path,
//! like `/dev/serial/by-id/...`, so the gateway opens it like a USB adapter.

use std::path::{Path, PathBuf};
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_serial::SerialPort;
use tokio_util::sync::CancellationToken;

use super::decode::{crc16_modbus, crc8};

/// The wire formats of the three shipped serial counter profiles.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CounterFormat {
    /// `gate-counter-text`: `IN=00123 OUT=00119` lines.
    Text,
    /// `gate-counter-evo`: 15-byte binary frames with CRC-8.
    Evo,
    /// `gate-counter-modbus`: answers Modbus RTU read-holding-registers polls.
    Modbus,
}

impl CounterFormat {
    /// The format a shipped profile expects, by profile name.
    pub fn for_profile(profile: &str) -> Option<CounterFormat> {
        match profile {
            "gate-counter-text" => Some(CounterFormat::Text),
            "gate-counter-evo" => Some(CounterFormat::Evo),
            "gate-counter-modbus" => Some(CounterFormat::Modbus),
            _ => None,
        }
    }
}

/// A counter's state: pure, so tests can predict every frame.
#[derive(Debug, Clone)]
pub struct GateCounter {
    pub format: CounterFormat,
    pub raw_in: u32,
    pub raw_out: u32,
    rng: StdRng,
}

impl GateCounter {
    pub fn new(format: CounterFormat, seed: u64) -> GateCounter {
        GateCounter {
            format,
            raw_in: 0,
            raw_out: 0,
            rng: StdRng::seed_from_u64(seed),
        }
    }

    fn wrap(&self) -> u32 {
        match self.format {
            CounterFormat::Modbus => u32::MAX,
            _ => u32::from(u16::MAX),
        }
    }

    /// Some people pass; about once in 200 steps the counter loses power.
    pub fn step(&mut self) {
        if self.rng.gen_ratio(1, 200) {
            self.raw_in = 0;
            self.raw_out = 0;
            return;
        }
        let (i, o) = (self.rng.gen_range(0..4), self.rng.gen_range(0..4));
        let max = self.wrap();
        self.raw_in = if self.raw_in >= max - i {
            i - (max - self.raw_in) - 1
        } else {
            self.raw_in + i
        };
        self.raw_out = if self.raw_out >= max - o {
            o - (max - self.raw_out) - 1
        } else {
            self.raw_out + o
        };
    }

    /// The current totals as the device sends them.
    pub fn frame(&self) -> Vec<u8> {
        match self.format {
            CounterFormat::Text => {
                format!("IN={:05} OUT={:05}\r\n", self.raw_in, self.raw_out).into_bytes()
            }
            CounterFormat::Evo => evo_frame(1, self.raw_in as u16, self.raw_out as u16),
            CounterFormat::Modbus => modbus_reply(self.raw_in, self.raw_out),
        }
    }

    /// A few random bytes of line noise (never a newline in text mode, so no line is cut).
    pub fn noise(&mut self) -> Vec<u8> {
        let n = self.rng.gen_range(1..6);
        (0..n).map(|_| self.rng.gen_range(0x20u8..0x7f)).collect()
    }
}

/// A `gate-counter-evo` frame: 'PC', sensor id, in - out, in, out (big-endian), CRC-8.
pub fn evo_frame(sensor: u32, raw_in: u16, raw_out: u16) -> Vec<u8> {
    let mut f = vec![0x50, 0x43];
    f.extend_from_slice(&sensor.to_be_bytes());
    f.extend_from_slice(&(i32::from(raw_in) - i32::from(raw_out)).to_be_bytes());
    f.extend_from_slice(&raw_in.to_be_bytes());
    f.extend_from_slice(&raw_out.to_be_bytes());
    f.push(crc8(&f));
    f
}

/// A Modbus RTU reply to read-holding-registers 0-3: IN and OUT as u32, high word first.
pub fn modbus_reply(raw_in: u32, raw_out: u32) -> Vec<u8> {
    let mut f = vec![0x01, 0x03, 0x08];
    f.extend_from_slice(&raw_in.to_be_bytes());
    f.extend_from_slice(&raw_out.to_be_bytes());
    let crc = crc16_modbus(&f);
    f.extend_from_slice(&crc);
    f
}

/// A pseudo-terminal whose device side is linked at `link` (replacing an old link).
pub struct Pty {
    pub master: tokio_serial::SerialStream,
    pub device: PathBuf,
    pub link: PathBuf,
}

impl Pty {
    pub fn open(link: &Path) -> std::io::Result<Pty> {
        let (master, slave) = tokio_serial::SerialStream::pair().map_err(std::io::Error::other)?;
        let device = PathBuf::from(
            slave
                .name()
                .ok_or_else(|| std::io::Error::other("pty has no name"))?,
        );
        // The gateway opens the device side itself (ports are opened exclusively).
        drop(slave);
        // A child process must not inherit the master: it would keep the line "plugged in".
        use std::os::fd::AsRawFd;
        // SAFETY: fcntl on a descriptor this function owns; only sets FD_CLOEXEC.
        unsafe {
            let fd = master.as_raw_fd();
            let flags = libc::fcntl(fd, libc::F_GETFD);
            libc::fcntl(fd, libc::F_SETFD, flags | libc::FD_CLOEXEC);
        }
        if let Some(dir) = link.parent() {
            std::fs::create_dir_all(dir)?;
        }
        match std::fs::symlink_metadata(link) {
            Ok(m) if m.file_type().is_symlink() => std::fs::remove_file(link)?,
            Ok(_) => {
                return Err(std::io::Error::other(format!(
                    "{} exists and is not a link: not replacing it",
                    link.display()
                )))
            }
            Err(_) => {}
        }
        std::os::unix::fs::symlink(&device, link)?;
        Ok(Pty {
            master,
            device,
            link: link.to_path_buf(),
        })
    }
}

/// Play `counter` on `pty` until `stop`: a frame every `interval` (text, evo), or a reply
/// to each poll (modbus); one write in 20 has noise before it.
pub async fn play(
    mut pty: Pty,
    mut counter: GateCounter,
    interval: Duration,
    stop: CancellationToken,
) {
    let mut tick = tokio::time::interval(interval);
    let mut buf = [0u8; 64];
    let mut polled = Vec::new();
    loop {
        let mut out = Vec::new();
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick(), if counter.format != CounterFormat::Modbus => {
                counter.step();
                out = counter.frame();
            }
            r = pty.master.read(&mut buf), if counter.format == CounterFormat::Modbus => {
                let Ok(n) = r else { return };
                if n == 0 { return; }
                polled.extend_from_slice(&buf[..n]);
                if polled.len() >= 8 {
                    polled.clear();
                    counter.step();
                    out = counter.frame();
                }
            }
        }
        if out.is_empty() {
            continue;
        }
        if counter.rng.gen_ratio(1, 20) {
            let mut noisy = counter.noise();
            noisy.extend_from_slice(&out);
            out = noisy;
        }
        if pty.master.write_all(&out).await.is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_wrap_and_reset() {
        let mut c = GateCounter::new(CounterFormat::Text, 1);
        c.raw_in = 65_534;
        c.raw_out = 10;
        let (mut wrapped, mut reset) = (false, false);
        for _ in 0..2000 {
            let before = c.raw_in;
            c.step();
            wrapped |= before > 60_000 && c.raw_in < 10 && c.raw_out != 0;
            reset |= c.raw_in == 0 && c.raw_out == 0;
            assert!(c.raw_in <= 65_535);
        }
        assert!(wrapped && reset);
        assert_eq!(
            GateCounter {
                raw_in: 12,
                raw_out: 3,
                ..c.clone()
            }
            .frame(),
            b"IN=00012 OUT=00003\r\n"
        );
    }
}
