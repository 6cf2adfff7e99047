//! The `serial` section of a device profile: how a serial device's bytes become messages.
//! Plain data plus its semantic `check()`; the decoding itself is `serial::decode`.

use std::collections::BTreeMap;

use serde::Deserialize;

use super::profile::ProfileProblem;

/// No frame or line may be longer than this, whatever a profile says.
pub const MAX_FRAME_BYTES: usize = 4096;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SerialSpec {
    pub framing: Framing,
    /// For polled devices: a request sent every `interval_ms`; replies are ordinary frames.
    #[serde(default)]
    pub poll: Option<Poll>,
    /// Decoded fields that are running totals; the gateway adds their increments.
    #[serde(default)]
    pub counters: BTreeMap<String, CounterSpec>,
    /// Commands the gateway may send to the device, by name.
    #[serde(default)]
    pub commands: BTreeMap<String, RawBytes>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Framing {
    /// Text lines ending in `\n` (a trailing `\r` is removed); fields come from a regular
    /// expression's named groups or from comma-separated columns.
    Line(LineFraming),
    /// Fixed-length binary frames that begin with `start` and may end with a checksum.
    Binary(BinaryFraming),
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LineFraming {
    /// Longest line accepted; longer ones are discarded up to the next newline.
    pub max_bytes: usize,
    /// A regular expression whose named groups are the fields (matched against the whole line).
    #[serde(default)]
    pub pattern: Option<String>,
    /// Or: the column names of a comma-separated line.
    #[serde(default)]
    pub csv: Option<Vec<String>>,
    /// The type of each extracted field.
    pub fields: BTreeMap<String, TextType>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TextType {
    Integer,
    Number,
    String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BinaryFraming {
    /// The bytes every frame begins with.
    pub start: RawBytes,
    /// Total frame length in bytes, start and checksum included.
    pub length: usize,
    #[serde(default)]
    pub checksum: Option<Checksum>,
    pub fields: Vec<BinaryField>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Checksum {
    #[serde(rename = "type")]
    pub algorithm: ChecksumType,
    /// First byte covered; the checksum covers up to itself and sits at the frame's end.
    #[serde(default)]
    pub from: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ChecksumType {
    /// CRC-8, polynomial 0x07, init 0 (CRC-8/SMBUS): one byte.
    Crc8,
    /// CRC-16/MODBUS: two bytes, low byte first.
    Crc16Modbus,
}

impl ChecksumType {
    pub fn width(self) -> usize {
        match self {
            ChecksumType::Crc8 => 1,
            ChecksumType::Crc16Modbus => 2,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BinaryField {
    pub name: String,
    pub offset: usize,
    #[serde(rename = "type")]
    pub ty: IntType,
    #[serde(default)]
    pub endian: Endian,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum IntType {
    U8,
    U16,
    U32,
    I16,
    I32,
}

impl IntType {
    pub fn width(self) -> usize {
        match self {
            IntType::U8 => 1,
            IntType::U16 | IntType::I16 => 2,
            IntType::U32 | IntType::I32 => 4,
        }
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Endian {
    #[default]
    Big,
    Little,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Poll {
    pub interval_ms: u64,
    pub request: RawBytes,
    /// A request with no frame back within this time counts as a poll timeout.
    pub timeout_ms: u64,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CounterSpec {
    /// The counter's width: it wraps from 2^bits - 1 to 0.
    pub bits: u32,
    /// Name of the field that carries the increment.
    pub delta: String,
}

/// Bytes written as hex (`"01 03 00 00"`) or text (`"R\r\n"`, JSON escapes).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawBytes {
    #[serde(default)]
    pub hex: Option<String>,
    #[serde(default)]
    pub text: Option<String>,
}

impl RawBytes {
    pub fn bytes(&self) -> Result<Vec<u8>, String> {
        match (&self.hex, &self.text) {
            (Some(h), None) => parse_hex(h),
            (None, Some(t)) => Ok(t.as_bytes().to_vec()),
            _ => Err("give exactly one of `hex` or `text`".into()),
        }
    }
}

fn parse_hex(s: &str) -> Result<Vec<u8>, String> {
    let digits: String = s.chars().filter(|c| !c.is_whitespace()).collect();
    if digits.is_empty() || digits.len() % 2 != 0 {
        return Err(format!("`{s}` is not an even number of hex digits"));
    }
    (0..digits.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&digits[i..i + 2], 16).map_err(|_| format!("`{s}` is not hex")))
        .collect()
}

impl SerialSpec {
    /// Semantic checks; `fields` are the telemetry fields the profile declares.
    pub fn check(
        &self,
        telemetry_fields: Option<&BTreeMap<String, super::profile::FieldSpec>>,
        problems: &mut Vec<ProfileProblem>,
    ) {
        let mut push = |path: &str, message: String| {
            problems.push(ProfileProblem {
                path: format!("serial.{path}"),
                message,
            })
        };
        let mut produced: Vec<String> = Vec::new();
        match &self.framing {
            Framing::Line(l) => {
                if l.max_bytes == 0 || l.max_bytes > MAX_FRAME_BYTES {
                    push(
                        "framing.max_bytes",
                        format!("must be between 1 and {MAX_FRAME_BYTES}"),
                    );
                }
                match (&l.pattern, &l.csv) {
                    (Some(p), None) => match regex::Regex::new(p) {
                        Ok(re) => {
                            let groups: Vec<&str> = re.capture_names().flatten().collect();
                            for name in l.fields.keys() {
                                if !groups.contains(&name.as_str()) {
                                    push(
                                        &format!("framing.fields.{name}"),
                                        "has no named group in `pattern`".into(),
                                    );
                                }
                            }
                        }
                        Err(e) => push("framing.pattern", format!("not a regular expression: {e}")),
                    },
                    (None, Some(cols)) => {
                        for name in l.fields.keys() {
                            if !cols.contains(name) {
                                push(
                                    &format!("framing.fields.{name}"),
                                    "is not one of the `csv` columns".into(),
                                );
                            }
                        }
                    }
                    _ => push("framing", "give exactly one of `pattern` or `csv`".into()),
                }
                produced.extend(l.fields.keys().cloned());
            }
            Framing::Binary(b) => {
                match b.start.bytes() {
                    Ok(s) if s.is_empty() || s.len() >= b.length => push(
                        "framing.start",
                        "must be at least one byte and shorter than the frame".into(),
                    ),
                    Ok(_) => {}
                    Err(e) => push("framing.start", e),
                }
                if b.length == 0 || b.length > MAX_FRAME_BYTES {
                    push(
                        "framing.length",
                        format!("must be between 1 and {MAX_FRAME_BYTES}"),
                    );
                }
                let body_end = b.length
                    - b.checksum
                        .as_ref()
                        .map_or(0, |c| c.algorithm.width())
                        .min(b.length);
                if let Some(c) = &b.checksum {
                    if c.from >= body_end {
                        push(
                            "framing.checksum.from",
                            "must be inside the frame, before the checksum".into(),
                        );
                    }
                }
                for (i, f) in b.fields.iter().enumerate() {
                    if f.offset + f.ty.width() > body_end {
                        push(
                            &format!("framing.fields[{i}]"),
                            format!(
                                "`{}` at offset {} does not fit before the checksum",
                                f.name, f.offset
                            ),
                        );
                    }
                    produced.push(f.name.clone());
                }
            }
        }
        if let Some(p) = &self.poll {
            if p.interval_ms < 100 || p.timeout_ms == 0 || p.timeout_ms > p.interval_ms {
                push(
                    "poll",
                    "needs interval_ms >= 100 and 0 < timeout_ms <= interval_ms".into(),
                );
            }
            if let Err(e) = p.request.bytes() {
                push("poll.request", e);
            }
        }
        for (name, c) in &self.counters {
            if !produced.contains(name) {
                push(&format!("counters.{name}"), "is not a decoded field".into());
            }
            if !(8..=32).contains(&c.bits) {
                push(
                    &format!("counters.{name}.bits"),
                    "must be between 8 and 32".into(),
                );
            }
            produced.push(c.delta.clone());
        }
        if !self.counters.is_empty() {
            produced.push("reset".into());
        }
        for (name, c) in &self.commands {
            if let Err(e) = c.bytes() {
                push(&format!("commands.{name}"), e);
            }
        }
        // What the decoder produces must pass the profile's own telemetry checks.
        match telemetry_fields {
            None => push(
                "framing",
                "serial devices send telemetry: declare `telemetry`".into(),
            ),
            Some(fields) => {
                for name in produced {
                    if !fields.contains_key(&name) {
                        push(
                            "framing",
                            format!("produces `{name}`, which `telemetry.fields` does not declare"),
                        );
                    }
                }
            }
        }
    }
}
