//! Pure decoding of serial bytes into telemetry objects, driven by a profile's `serial`
//! section: no I/O, no clock. Bytes go in as they arrive (split anywhere); complete frames
//! and counted problems come out. Every buffer is capped by the frame length.

use std::collections::HashMap;
use std::sync::Arc;

use serde_json::{Map, Value};

use crate::config::serial_spec::{
    BinaryFraming, ChecksumType, Endian, Framing, IntType, LineFraming, SerialSpec, TextType,
};

const CRC8: crc::Crc<u8> = crc::Crc::<u8>::new(&crc::CRC_8_SMBUS);
const CRC16_MODBUS: crc::Crc<u16> = crc::Crc::<u16>::new(&crc::CRC_16_MODBUS);

/// Why bytes did not become a message. `as_str` names are stable counter names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FrameProblem {
    /// A line longer than the profile allows (discarded up to the next newline).
    TooLong,
    /// A line that does not match the pattern or column count, or is not UTF-8.
    NoMatch,
    /// A field's text does not parse as its declared type.
    BadValue(String),
    /// A binary frame whose checksum is wrong.
    BadChecksum,
    /// Bytes skipped while looking for a frame start.
    Noise(usize),
}

impl FrameProblem {
    pub fn as_str(&self) -> &'static str {
        match self {
            FrameProblem::TooLong => "serial_too_long",
            FrameProblem::NoMatch => "serial_no_match",
            FrameProblem::BadValue(_) => "serial_bad_value",
            FrameProblem::BadChecksum => "serial_bad_checksum",
            FrameProblem::Noise(_) => "serial_noise",
        }
    }
}

pub type Decoded = Result<Map<String, Value>, FrameProblem>;

/// Turns a byte stream into decoded frames.
pub struct FrameDecoder {
    spec: Arc<SerialSpec>,
    regex: Option<regex::Regex>,
    start: Vec<u8>,
    buf: Vec<u8>,
    /// Line mode: the current line is too long and is being skipped.
    skipping: bool,
}

impl FrameDecoder {
    /// `spec` must have passed `SerialSpec::check`.
    pub fn new(spec: Arc<SerialSpec>) -> Result<FrameDecoder, String> {
        let (regex, start) = match &spec.framing {
            Framing::Line(l) => (
                l.pattern
                    .as_deref()
                    .map(regex::Regex::new)
                    .transpose()
                    .map_err(|e| e.to_string())?,
                Vec::new(),
            ),
            Framing::Binary(b) => (None, b.start.bytes()?),
        };
        Ok(FrameDecoder {
            spec,
            regex,
            start,
            buf: Vec::new(),
            skipping: false,
        })
    }

    /// Feed bytes as they were read; decoded frames and problems are appended to `out`.
    pub fn push(&mut self, bytes: &[u8], out: &mut Vec<Decoded>) {
        let spec = self.spec.clone();
        match &spec.framing {
            Framing::Line(l) => self.push_lines(l, bytes, out),
            Framing::Binary(b) => {
                self.buf.extend_from_slice(bytes);
                self.take_frames(b, out);
            }
        }
    }

    /// Forget a partial frame (after the port was closed).
    pub fn reset(&mut self) {
        self.buf.clear();
        self.skipping = false;
    }

    fn push_lines(&mut self, l: &LineFraming, bytes: &[u8], out: &mut Vec<Decoded>) {
        for &b in bytes {
            if b == b'\n' {
                if self.skipping {
                    self.skipping = false;
                } else {
                    let line = std::mem::take(&mut self.buf);
                    let line = line.strip_suffix(b"\r").unwrap_or(&line);
                    if !line.iter().all(|c| c.is_ascii_whitespace()) {
                        out.push(self.decode_line(l, line));
                    }
                }
                self.buf.clear();
            } else if !self.skipping {
                if self.buf.len() >= l.max_bytes {
                    self.buf.clear();
                    self.skipping = true;
                    out.push(Err(FrameProblem::TooLong));
                } else {
                    self.buf.push(b);
                }
            }
        }
    }

    fn decode_line(&self, l: &LineFraming, line: &[u8]) -> Decoded {
        let text = std::str::from_utf8(line).map_err(|_| FrameProblem::NoMatch)?;
        let mut fields: Vec<(&str, &str)> = Vec::new();
        match (&self.regex, &l.csv) {
            (Some(re), _) => {
                let caps = re.captures(text).ok_or(FrameProblem::NoMatch)?;
                for name in l.fields.keys() {
                    let v = caps.name(name).ok_or(FrameProblem::NoMatch)?;
                    fields.push((name, v.as_str()));
                }
            }
            (None, Some(cols)) => {
                let values: Vec<&str> = text.split(',').map(str::trim).collect();
                if values.len() != cols.len() {
                    return Err(FrameProblem::NoMatch);
                }
                for (col, v) in cols.iter().zip(values) {
                    if l.fields.contains_key(col) {
                        fields.push((col, v));
                    }
                }
            }
            (None, None) => return Err(FrameProblem::NoMatch),
        }
        let mut obj = Map::new();
        for (name, raw) in fields {
            let value = match l.fields[name] {
                TextType::Integer => raw.parse::<i64>().map(Value::from).ok(),
                TextType::Number => raw
                    .parse::<f64>()
                    .ok()
                    .filter(|x| x.is_finite())
                    .map(Value::from),
                TextType::String => Some(Value::from(raw)),
            };
            let value = value.ok_or_else(|| FrameProblem::BadValue(name.to_owned()))?;
            obj.insert(name.to_owned(), value);
        }
        Ok(obj)
    }

    fn take_frames(&mut self, b: &BinaryFraming, out: &mut Vec<Decoded>) {
        loop {
            // Skip to the next frame start (a partial start at the end is kept).
            let skip = find_start(&self.buf, &self.start);
            if skip > 0 {
                self.buf.drain(..skip);
                out.push(Err(FrameProblem::Noise(skip)));
            }
            if self.buf.len() < b.length {
                return;
            }
            let frame = &self.buf[..b.length];
            if let Some(c) = &b.checksum {
                let end = b.length - c.algorithm.width();
                let ok = match c.algorithm {
                    ChecksumType::Crc8 => CRC8.checksum(&frame[c.from..end]) == frame[end],
                    ChecksumType::Crc16Modbus => {
                        CRC16_MODBUS.checksum(&frame[c.from..end]).to_le_bytes()
                            == [frame[end], frame[end + 1]]
                    }
                };
                if !ok {
                    // The start may have been noise: resynchronise one byte further on.
                    self.buf.drain(..1);
                    out.push(Err(FrameProblem::BadChecksum));
                    continue;
                }
            }
            let mut obj = Map::new();
            for f in &b.fields {
                let bytes = &frame[f.offset..f.offset + f.ty.width()];
                obj.insert(f.name.clone(), Value::from(read_int(bytes, f.ty, f.endian)));
            }
            self.buf.drain(..b.length);
            out.push(Ok(obj));
        }
    }
}

/// Bytes before the first (possibly partial, at the end) occurrence of `start`.
fn find_start(buf: &[u8], start: &[u8]) -> usize {
    for i in 0..buf.len() {
        let rest = &buf[i..];
        let n = rest.len().min(start.len());
        if rest[..n] == start[..n] {
            return i;
        }
    }
    buf.len()
}

fn read_int(bytes: &[u8], ty: IntType, endian: Endian) -> i64 {
    let mut v: u64 = 0;
    let mut push = |b: u8| v = (v << 8) | u64::from(b);
    match endian {
        Endian::Big => bytes.iter().copied().for_each(&mut push),
        Endian::Little => bytes.iter().rev().copied().for_each(&mut push),
    }
    match ty {
        IntType::I16 => v as u16 as i16 as i64,
        IntType::I32 => v as u32 as i32 as i64,
        _ => v as i64,
    }
}

/// What happened to a running total between two readings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// No earlier reading is known: the increment is 0 (this reading is the baseline).
    First,
    Normal,
    /// The counter passed 2^bits - 1 and started again from 0.
    Wrap,
    /// The counter went back (the device lost power): counted from 0.
    Reset,
}

/// The increment from `prev` to `cur` for a counter of `bits` width. The rule: a reading
/// lower than the one before is a wrap when the previous one was in the top tenth of the
/// range and the new one in the bottom tenth; otherwise a reset to 0 (power loss), so
/// the increment is the new reading. Never negative.
pub fn increment(prev: Option<u64>, cur: u64, bits: u32) -> (u64, Step) {
    let Some(prev) = prev else {
        return (0, Step::First);
    };
    if cur >= prev {
        return (cur - prev, Step::Normal);
    }
    let range = 1u64 << bits;
    if prev > range / 10 * 9 && cur < range / 10 {
        (range - prev + cur, Step::Wrap)
    } else {
        (cur, Step::Reset)
    }
}

/// The last raw value of each counter field of one device.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CounterState {
    pub last: HashMap<String, u64>,
}

impl CounterState {
    /// Start from the raw values of the device's newest stored message (if any), so a
    /// gateway restart does not count the same people twice.
    pub fn from_stored(spec: &SerialSpec, payload: Option<&str>) -> CounterState {
        let mut state = CounterState::default();
        let Some(v) = payload.and_then(|p| serde_json::from_str::<Value>(p).ok()) else {
            return state;
        };
        for name in spec.counters.keys() {
            if let Some(raw) = v.get(name).and_then(Value::as_u64) {
                state.last.insert(name.clone(), raw);
            }
        }
        state
    }

    /// Add each counter's increment field (and `reset`) to a decoded object.
    pub fn apply(&mut self, spec: &SerialSpec, obj: &mut Map<String, Value>) -> Vec<Step> {
        let mut steps = Vec::new();
        if spec.counters.is_empty() {
            return steps;
        }
        let mut reset = false;
        for (name, c) in &spec.counters {
            let Some(cur) = obj.get(name).and_then(Value::as_u64) else {
                continue;
            };
            let cur = cur & ((1u64 << c.bits) - 1);
            let (delta, step) = increment(self.last.get(name).copied(), cur, c.bits);
            self.last.insert(name.clone(), cur);
            reset |= step == Step::Reset;
            obj.insert(c.delta.clone(), Value::from(delta));
            steps.push(step);
        }
        obj.insert("reset".into(), Value::from(reset));
        steps
    }
}

/// CRC-16/MODBUS of `bytes`, low byte first (for simulators and tests).
pub fn crc16_modbus(bytes: &[u8]) -> [u8; 2] {
    CRC16_MODBUS.checksum(bytes).to_le_bytes()
}

/// CRC-8 (polynomial 0x07, init 0) of `bytes`.
pub fn crc8(bytes: &[u8]) -> u8 {
    CRC8.checksum(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(json: &str) -> Arc<SerialSpec> {
        Arc::new(serde_json::from_str(json).unwrap())
    }

    fn text_spec() -> Arc<SerialSpec> {
        spec(
            r#"{"framing": {"type": "line", "max_bytes": 32,
                "pattern": "^IN=(?P<raw_in>\\d{1,5}) OUT=(?P<raw_out>\\d{1,5})$",
                "fields": {"raw_in": "integer", "raw_out": "integer"}},
               "counters": {"raw_in": {"bits": 16, "delta": "in"}, "raw_out": {"bits": 16, "delta": "out"}}}"#,
        )
    }

    fn binary_spec() -> Arc<SerialSpec> {
        spec(
            r#"{"framing": {"type": "binary", "start": {"hex": "50 43"}, "length": 15,
                "checksum": {"type": "crc8"},
                "fields": [{"name": "sensor", "offset": 2, "type": "u32"},
                           {"name": "people", "offset": 6, "type": "i32"},
                           {"name": "raw_in", "offset": 10, "type": "u16"},
                           {"name": "raw_out", "offset": 12, "type": "u16"}]}}"#,
        )
    }

    #[test]
    fn lines_split_anywhere_noise_and_overlong() {
        let mut d = FrameDecoder::new(text_spec()).unwrap();
        let mut out = Vec::new();
        for chunk in [
            &b"IN=0012 OU"[..],
            b"T=0010\r\nnoise\n\nIN=1",
            b"3 OUT=11\n",
        ] {
            d.push(chunk, &mut out);
        }
        d.push(&[b'x'; 40], &mut out);
        d.push(b"yy\nIN=x OUT=1\n\xff\xfe\n", &mut out);
        let got: Vec<_> = out
            .iter()
            .map(|r| match r {
                Ok(o) => format!("{}/{}", o["raw_in"], o["raw_out"]),
                Err(e) => e.as_str().to_owned(),
            })
            .collect();
        assert_eq!(
            got,
            [
                "12/10",
                "serial_no_match",
                "13/11",
                "serial_too_long",
                "serial_no_match",
                "serial_no_match"
            ]
        );
    }

    #[test]
    fn csv_lines() {
        let s = spec(
            r#"{"framing": {"type": "line", "max_bytes": 64, "csv": ["id", "raw_in", "raw_out", "temp"],
                "fields": {"raw_in": "integer", "raw_out": "integer", "temp": "number"}}}"#,
        );
        let mut d = FrameDecoder::new(s).unwrap();
        let mut out = Vec::new();
        d.push(b"G1, 5, 4, 21.5\nG1,5,4\nG1,a,4,1\n", &mut out);
        assert_eq!(
            out[0].as_ref().unwrap(),
            serde_json::json!({"raw_in": 5, "raw_out": 4, "temp": 21.5})
                .as_object()
                .unwrap()
        );
        assert_eq!(out[1], Err(FrameProblem::NoMatch));
        assert_eq!(out[2], Err(FrameProblem::BadValue("raw_in".into())));
    }

    /// The example frame from library-devices notes: ID 1, IN 10, OUT 7.
    fn evo_frame(inn: u16, out: u16) -> Vec<u8> {
        let mut f = vec![0x50, 0x43, 0, 0, 0, 1];
        f.extend_from_slice(&(i32::from(inn) - i32::from(out)).to_be_bytes());
        f.extend_from_slice(&inn.to_be_bytes());
        f.extend_from_slice(&out.to_be_bytes());
        f.push(crc8(&f));
        f
    }

    #[test]
    fn binary_frames_resync_after_noise_and_bad_crc() {
        assert_eq!(
            evo_frame(10, 7),
            [
                0x50,
                0x43,
                0,
                0,
                0,
                1,
                0,
                0,
                0,
                3,
                0,
                0x0A,
                0,
                0x07,
                crc8(&evo_frame(10, 7)[..14])
            ]
        );
        let mut d = FrameDecoder::new(binary_spec()).unwrap();
        let mut out = Vec::new();
        let mut bad = evo_frame(1, 1);
        bad[14] ^= 0xff;
        let mut stream = vec![0x00, 0x50, 0x99];
        stream.extend(evo_frame(10, 7));
        stream.extend(&bad);
        stream.extend(evo_frame(11, 7));
        for chunk in stream.chunks(4) {
            d.push(chunk, &mut out);
        }
        let oks: Vec<_> = out.iter().filter_map(|r| r.as_ref().ok()).collect();
        assert_eq!(oks.len(), 2);
        assert_eq!(oks[0]["raw_in"], 10);
        assert_eq!(oks[0]["people"], 3);
        assert_eq!(oks[1]["raw_in"], 11);
        assert!(out.contains(&Err(FrameProblem::BadChecksum)));
        assert!(out.contains(&Err(FrameProblem::Noise(3))));
    }

    #[test]
    fn modbus_reply_with_crc16() {
        // Read-holding-registers reply from the notes: IN = 123456, OUT = 122718.
        let s = spec(
            r#"{"framing": {"type": "binary", "start": {"hex": "01 03 08"}, "length": 13,
                "checksum": {"type": "crc16-modbus"},
                "fields": [{"name": "raw_in", "offset": 3, "type": "u32"},
                           {"name": "raw_out", "offset": 7, "type": "u32"}]}}"#,
        );
        let reply = [
            0x01, 0x03, 0x08, 0x00, 0x01, 0xE2, 0x40, 0x00, 0x01, 0xDF, 0x5E, 0x1B, 0x52,
        ];
        assert_eq!(
            crc16_modbus(&[0x01, 0x03, 0x00, 0x00, 0x00, 0x04]),
            [0x44, 0x09]
        );
        let mut d = FrameDecoder::new(s).unwrap();
        let mut out = Vec::new();
        d.push(&reply, &mut out);
        let o = out[0].as_ref().unwrap();
        assert_eq!(
            (o["raw_in"].as_u64(), o["raw_out"].as_u64()),
            (Some(123_456), Some(122_718))
        );
    }

    #[test]
    fn increments_across_wraps_and_resets() {
        assert_eq!(increment(None, 500, 16), (0, Step::First));
        assert_eq!(increment(Some(500), 510, 16), (10, Step::Normal));
        assert_eq!(increment(Some(65_530), 4, 16), (10, Step::Wrap));
        assert_eq!(increment(Some(65_535), 0, 16), (1, Step::Wrap));
        assert_eq!(increment(Some(1_000), 3, 16), (3, Step::Reset));
        assert_eq!(increment(Some(65_530), 30_000, 16), (30_000, Step::Reset));
        let s = text_spec();
        let mut state = CounterState::from_stored(&s, Some(r#"{"raw_in": 65530, "raw_out": 7}"#));
        let mut o = serde_json::json!({"raw_in": 2, "raw_out": 3})
            .as_object()
            .unwrap()
            .clone();
        assert_eq!(state.apply(&s, &mut o), vec![Step::Wrap, Step::Reset]);
        assert_eq!(o["in"], 8);
        assert_eq!(o["out"], 3);
        assert_eq!(o["reset"], true);
    }

    /// A cheap stand-in for the fuzz target: arbitrary bytes never panic and never grow
    /// the buffer past one frame.
    #[test]
    fn random_bytes_are_safe() {
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        let mut next = || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for s in [text_spec(), binary_spec()] {
            let mut d = FrameDecoder::new(s).unwrap();
            let mut out = Vec::new();
            for _ in 0..2000 {
                let n = (next() % 64) as usize;
                let bytes: Vec<u8> = (0..n)
                    .map(|_| match next() % 4 {
                        0 => b'\n',
                        1 => 0x50,
                        _ => next() as u8,
                    })
                    .collect();
                d.push(&bytes, &mut out);
                assert!(d.buf.len() <= 40, "{}", d.buf.len());
                out.clear();
            }
        }
    }
}
