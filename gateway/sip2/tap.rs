//! What the kiosk and the ILS say to each other, turned into the kiosk's events: the SIP2
//! tap's logic without I/O. The glue hands it the bytes of each direction as they pass
//! (already forwarded, unchanged); it splits them into messages (CR-terminated, at most
//! [`MAX_LINE`] bytes), verifies AY/AZ checksums, pairs each response with its request and
//! returns [`Derived`] events, telemetry and counts.
//!
//! Parsing uses the `sip2` crate's message specs and parser, behind two guards: it slices
//! text by byte index (a multi-byte character at a field boundary would panic) and logs a
//! malformed message whole (patron data in the log), so it only ever sees ASCII (each byte
//! over 0x7F becomes `?`, which keeps every byte position) of a message whose code it knows
//! and whose fixed part is complete. Free text (screen messages) is read from the raw bytes.
//!
//! Privacy: nothing here keeps a line. The patron id (AA) goes out only inside a
//! `session_end` event's `patron_id`, which intake replaces by the branch's HMAC before
//! anything is stored (the profile marks it `hash`); PINs, passwords, names, addresses,
//! e-mail, phone and birth date are never read.

use std::collections::VecDeque;

use serde_json::{json, Value};

/// Longest SIP2 message the tap parses (a longer one is still forwarded: `sip2_unparsed`).
pub(crate) const MAX_LINE: usize = 8 * 1024;
/// A patron session with no request of its patron for this long ends as `timeout` (a
/// kiosk that never sends End Patron Session 35).
pub(crate) const SESSION_IDLE_MS: i64 = 5 * 60 * 1000;
/// The most a session's figures say (the profile's bounds): a session is one patron at the
/// kiosk, so a kiosk that never ends one cannot produce a `session_end` the profile refuses.
const SESSION_MAX_COUNT: i64 = 50;
const SESSION_MAX_S: i64 = 3600;

/// A request unanswered for this long is forgotten (and no exchange's latency is more).
pub(crate) const PENDING_MAX_MS: i64 = 60_000;

/// Requests awaiting their response (a kiosk sends one at a time; more are dropped from the
/// front, counted `sip2_unmatched`).
const MAX_PENDING: usize = 16;

/// Splits one direction's bytes into messages.
#[derive(Debug, Default)]
pub(crate) struct Lines {
    buf: Vec<u8>,
    /// The current line passed [`MAX_LINE`]: skipped up to its CR.
    overlong: bool,
}

/// One message of a direction, or one that could not be kept whole.
#[derive(Debug, PartialEq)]
pub(crate) enum Line {
    Message(Vec<u8>),
    Overlong,
}

impl Lines {
    pub(crate) fn push(&mut self, mut bytes: &[u8], out: &mut Vec<Line>) {
        while let Some(cr) = bytes.iter().position(|&b| b == b'\r') {
            let (head, rest) = bytes.split_at(cr);
            bytes = &rest[1..];
            if self.overlong || self.buf.len() + head.len() > MAX_LINE {
                self.overlong = false;
                self.buf.clear();
                out.push(Line::Overlong);
                continue;
            }
            self.buf.extend_from_slice(head);
            let mut line = std::mem::take(&mut self.buf);
            // CR LF (and stray LFs) between messages.
            let start = line.iter().position(|&b| b != b'\n').unwrap_or(line.len());
            line.drain(..start);
            if !line.is_empty() {
                out.push(Line::Message(line));
            }
        }
        if self.overlong || self.buf.len() + bytes.len() > MAX_LINE {
            self.overlong = true;
            self.buf.clear();
        } else {
            self.buf.extend_from_slice(bytes);
        }
    }
}

/// The AY/AZ checksum of a message, if it carries one: whether it is right. The checksum
/// is the two's complement of the 16-bit sum of every byte up to and including `AZ`.
pub(crate) fn checksum_ok(line: &[u8]) -> Option<bool> {
    if line.len() < 6 || &line[line.len() - 6..line.len() - 4] != b"AZ" {
        return None;
    }
    let (head, hex) = line.split_at(line.len() - 4);
    let given = u16::from_str_radix(std::str::from_utf8(hex).ok()?, 16).ok()?;
    let sum = head.iter().fold(0u16, |s, &b| s.wrapping_add(u16::from(b)));
    Some(sum.wrapping_neg() == given)
}

/// A message the tap understood: its code, fixed field values and variable fields (codes
/// and raw values).
#[derive(Debug)]
pub(crate) struct Parsed {
    pub code: &'static str,
    pub fixed: Vec<String>,
    fields: Vec<([u8; 2], Vec<u8>)>,
}

impl Parsed {
    /// A variable field's value (the first), as text: UTF-8, or else GB18030 (which
    /// Chinese ILSs use as often), never failing.
    pub(crate) fn field(&self, code: &str) -> Option<String> {
        self.fields
            .iter()
            .find(|(c, _)| c == code.as_bytes())
            .map(|(_, v)| match std::str::from_utf8(v) {
                Ok(s) => s.to_owned(),
                Err(_) => encoding_rs::GB18030
                    .decode_without_bom_handling(v)
                    .0
                    .into_owned(),
            })
    }

    fn fixed(&self, i: usize) -> &str {
        self.fixed.get(i).map_or("", String::as_str)
    }
}

/// Parse one message (`None`: not a SIP2 message the tap knows, or incomplete).
pub(crate) fn parse(line: &[u8]) -> Option<Parsed> {
    if line.len() < 2 {
        return None;
    }
    let ascii: String = line
        .iter()
        .map(|&b| {
            if b.is_ascii() && b != 0 {
                b as char
            } else {
                '?'
            }
        })
        .collect();
    let spec = sip2::spec::Message::from_code(&ascii[..2])?;
    let fixed_len: usize = spec.fixed_fields.iter().map(|f| f.length).sum();
    if ascii.len() < 2 + fixed_len {
        return None; // the crate would log the whole message
    }
    let msg = sip2::Message::from_sip(&ascii).ok()?;
    let fixed = msg
        .fixed_fields()
        .iter()
        .map(|f| f.value().to_owned())
        .collect();
    let fields = line[2 + fixed_len..]
        .split(|&b| b == b'|')
        .filter(|p| p.len() >= 2)
        .map(|p| ([p[0], p[1]], p[2..].to_vec()))
        .collect();
    Some(Parsed {
        code: spec.code,
        fixed,
        fields,
    })
}

/// What the tap derived, for the kiosk's intake and counters.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Derived {
    /// A payload for `devices/ID/events`.
    Event(Value),
    /// A payload for `devices/ID/telemetry`.
    Telemetry(Value),
    /// A counter of the kiosk (`sip2_unparsed`, `sip2_checksum_errors`, ...).
    Count(&'static str),
}

#[derive(Debug)]
struct Pending {
    code: &'static str,
    at_ms: i64,
    /// Checkout or renewal with `no block = Y`: the kiosk replays an offline transaction.
    no_block: bool,
    /// The patron (AA) of a patron status or information request.
    patron: Option<String>,
    /// SC status: (status code, protocol version).
    status: Option<(i64, String)>,
}

/// A patron session as the kiosk runs it.
#[derive(Debug)]
struct Session {
    reference: String,
    patron: String,
    started_ms: i64,
    /// The last request naming the patron.
    last_ms: i64,
    valid: Option<bool>,
    checkouts_ok: i64,
    checkouts_failed: i64,
    checkins: i64,
    renewals: i64,
}

/// The tap of one kiosk connection.
#[derive(Debug)]
pub(crate) struct Tap {
    kiosk: Lines,
    ils: Lines,
    pending: VecDeque<Pending>,
    session: Option<Session>,
    /// For events outside a patron session (returns): one reference per connection.
    connection_ref: String,
}

/// A random reference (never derived from a card): 32 hex digits.
fn reference() -> String {
    use rand::Rng;
    format!("{:032x}", rand::thread_rng().gen::<u128>())
}

/// The response code that answers a request code.
fn answer_of(request: &str) -> Option<&'static str> {
    Some(match request {
        "93" => "94",
        "99" => "98",
        "11" => "12",
        "09" => "10",
        "29" => "30",
        "23" => "24",
        "63" => "64",
        "35" => "36",
        "17" => "18",
        "37" => "38",
        "15" => "16",
        "19" => "20",
        "25" => "26",
        "65" => "66",
        "01" => "24",
        _ => return None,
    })
}

/// A failure's reason from the ILS's screen message (AF): the profile's reason names.
pub(crate) fn reason(screen: &str) -> &'static str {
    let s = screen.to_lowercase();
    let any = |words: &[&str]| words.iter().any(|w| s.contains(w));
    if any(&["hold", "reserved", "预约"]) {
        "hold_other_patron"
    } else if any(&["lost", "挂失"]) {
        "card_lost"
    } else if any(&[
        "block", "barred", "suspend", "expired", "停用", "冻结", "过期",
    ]) {
        "patron_blocked"
    } else if any(&["too many", "limit", "maximum", "超过", "超出", "上限"]) {
        "too_many_items"
    } else if any(&["fine", "fee", "owe", "debt", "欠款", "罚款", "欠费"]) {
        "fines"
    } else if any(&[
        "not found",
        "unknown item",
        "invalid item",
        "no such",
        "不存在",
        "无此",
    ]) {
        "not_found"
    } else if any(&[
        "wrong branch",
        "another branch",
        "other library",
        "其他馆",
        "非本馆",
    ]) {
        "wrong_branch"
    } else {
        "other"
    }
}

/// A due date (AH) as YYYY-MM-DD when it starts with one (`YYYYMMDD...` or
/// `YYYY-MM-DD...`, the forms ILSs send); other forms are left out.
pub(crate) fn due_date(ah: &str) -> Option<String> {
    let a = ah.trim().as_bytes();
    let digits = |s: &[u8]| s.iter().all(u8::is_ascii_digit);
    let (y, m, d) = if a.len() >= 8 && digits(&a[..8]) {
        (&a[..4], &a[4..6], &a[6..8])
    } else if a.len() >= 10
        && digits(&a[..4])
        && a[4] == b'-'
        && digits(&a[5..7])
        && a[7] == b'-'
        && digits(&a[8..10])
    {
        (&a[..4], &a[5..7], &a[8..10])
    } else {
        return None;
    };
    let text = |s: &[u8]| String::from_utf8_lossy(s).into_owned();
    let (mo, da): (u8, u8) = (text(m).parse().ok()?, text(d).parse().ok()?);
    ((1..=12).contains(&mo) && (1..=31).contains(&da))
        .then(|| format!("{}-{}-{}", text(y), text(m), text(d)))
}

const MEDIA: [&str; 11] = [
    "000", "001", "002", "003", "004", "005", "006", "007", "008", "009", "010",
];
const ALERTS: [&str; 6] = ["00", "01", "02", "03", "04", "99"];

impl Default for Tap {
    fn default() -> Self {
        Tap {
            kiosk: Lines::default(),
            ils: Lines::default(),
            pending: VecDeque::new(),
            session: None,
            connection_ref: reference(),
        }
    }
}

impl Tap {
    /// Bytes the kiosk sent (already passed on to the ILS).
    pub(crate) fn kiosk_sent(&mut self, bytes: &[u8], now_ms: i64) -> Vec<Derived> {
        let mut lines = Vec::new();
        self.kiosk.push(bytes, &mut lines);
        let mut out = Vec::new();
        for line in lines {
            let Some(m) = self.message(line, &mut out) else {
                continue;
            };
            self.request(m, now_ms, &mut out);
        }
        out
    }

    /// Bytes the ILS sent (already passed on to the kiosk).
    pub(crate) fn ils_sent(&mut self, bytes: &[u8], now_ms: i64) -> Vec<Derived> {
        let mut lines = Vec::new();
        self.ils.push(bytes, &mut lines);
        let mut out = Vec::new();
        for line in lines {
            let Some(m) = self.message(line, &mut out) else {
                continue;
            };
            self.response(m, now_ms, &mut out);
        }
        out
    }

    /// The connection closed: a patron session still open ends as `abandoned`.
    pub(crate) fn closed(&mut self, now_ms: i64) -> Vec<Derived> {
        let mut out = Vec::new();
        self.end_session("abandoned", now_ms, &mut out);
        out
    }

    fn message(&mut self, line: Line, out: &mut Vec<Derived>) -> Option<Parsed> {
        let Line::Message(line) = line else {
            out.push(Derived::Count("sip2_unparsed"));
            return None;
        };
        if checksum_ok(&line) == Some(false) {
            out.push(Derived::Count("sip2_checksum_errors"));
        }
        let parsed = parse(&line);
        if parsed.is_none() {
            out.push(Derived::Count("sip2_unparsed"));
        }
        parsed
    }

    fn request(&mut self, m: Parsed, now_ms: i64, out: &mut Vec<Derived>) {
        if answer_of(m.code).is_none() {
            return; // 97 (resend) and the like: nothing to pair
        }
        let patron = m.field("AA").filter(|p| !p.is_empty());
        if self
            .session
            .as_ref()
            .is_some_and(|s| now_ms - s.last_ms >= SESSION_IDLE_MS)
        {
            self.end_session("timeout", now_ms, out);
        }
        // Sessions start and change on the ILS's answer only (see `confirm`): requests
        // alone (anyone can send them) make no session.
        if let Some(p) = &patron {
            if let Some(s) = self.session.as_mut().filter(|s| &s.patron == p) {
                s.last_ms = now_ms;
            }
        }
        self.expire_pending(now_ms, out);
        let status = (m.code == "99").then(|| {
            (
                m.fixed(0).trim().parse().unwrap_or(-1),
                m.fixed(2).trim().to_owned(),
            )
        });
        let no_block = match m.code {
            "11" | "29" => m.fixed(1) == "Y",
            _ => false,
        };
        if self.pending.len() >= MAX_PENDING {
            self.pending.pop_front();
            out.push(Derived::Count("sip2_unmatched"));
        }
        self.pending.push_back(Pending {
            code: m.code,
            at_ms: now_ms,
            no_block,
            patron,
            status,
        });
    }

    /// Requests older than [`PENDING_MAX_MS`] were never answered: forgotten (a later
    /// answer must not pair with them), counted `sip2_unmatched`.
    fn expire_pending(&mut self, now_ms: i64, out: &mut Vec<Derived>) {
        while self
            .pending
            .front()
            .is_some_and(|p| now_ms - p.at_ms > PENDING_MAX_MS)
        {
            self.pending.pop_front();
            out.push(Derived::Count("sip2_unmatched"));
        }
    }

    /// The ILS confirmed `patron` at the kiosk (a valid patron, a checkout or renewal
    /// done): the patron session is theirs, started at `at_ms` (another one ends).
    fn confirm(&mut self, patron: &str, at_ms: i64, now_ms: i64, out: &mut Vec<Derived>) {
        if self.session.as_ref().is_some_and(|s| s.patron != patron) {
            self.end_session("abandoned", now_ms, out);
        }
        if self.session.is_none() {
            self.session = Some(Session {
                reference: reference(),
                patron: patron.to_owned(),
                started_ms: at_ms,
                last_ms: now_ms,
                valid: None,
                checkouts_ok: 0,
                checkouts_failed: 0,
                checkins: 0,
                renewals: 0,
            });
        }
    }

    fn response(&mut self, m: Parsed, now_ms: i64, out: &mut Vec<Derived>) {
        self.expire_pending(now_ms, out);
        // Responses come in the order of their requests: anything before the match was
        // never answered.
        let Some(at) = self
            .pending
            .iter()
            .position(|p| answer_of(p.code) == Some(m.code))
        else {
            out.push(Derived::Count("sip2_unmatched"));
            return;
        };
        for _ in 0..at {
            self.pending.pop_front();
            out.push(Derived::Count("sip2_unmatched"));
        }
        let Some(req) = self.pending.pop_front() else {
            return;
        };
        let latency = (now_ms - req.at_ms).clamp(0, PENDING_MAX_MS);
        let confirmed = match req.code {
            "23" | "63" => m.field("BL").as_deref() == Some("Y"),
            "11" | "29" => m.fixed(0) == "1",
            _ => false,
        };
        if let (true, Some(p)) = (confirmed, req.patron.clone()) {
            self.confirm(&p, req.at_ms, now_ms, out);
        }
        let session_ref = self
            .session
            .as_ref()
            .map_or(self.connection_ref.clone(), |s| s.reference.clone());
        // The profile's bounds (4-32 characters): anything else is not an item id.
        let item = m
            .field("AB")
            .filter(|i| (4..=32).contains(&i.chars().count()));
        let media = m
            .field("CK")
            .filter(|c| MEDIA.contains(&c.as_str()))
            .unwrap_or_else(|| "000".to_owned());
        let due = m.field("AH").and_then(|d| due_date(&d));
        match req.code {
            "93" => out.push(Derived::Count(if m.fixed(0) == "1" {
                "sip2_login_ok"
            } else {
                "sip2_login_failed"
            })),
            "99" => {
                // Counted too: its `last_ms` is when the kiosk last had an SC status
                // answered (kiosk health reads that, not the messages).
                out.push(Derived::Count("sip2_sc_status"));
                let (status, version) = req.status.unwrap_or((-1, String::new()));
                let mut t = json!({
                    "acs_online": m.fixed(0) == "Y",
                    "acs_checkin_ok": m.fixed(1) == "Y",
                    "acs_checkout_ok": m.fixed(2) == "Y",
                    "sip_link": "up",
                    "sip_rtt_ms": latency.min(60_000),
                });
                if (0..=2).contains(&status) {
                    t["sc_status"] = json!(status);
                }
                if !version.is_empty() {
                    t["sip_protocol"] = json!(version);
                }
                out.push(Derived::Telemetry(t));
            }
            "23" | "63" => {
                if let (Some(s), Some(p)) = (self.session.as_mut(), &req.patron) {
                    if &s.patron == p {
                        s.valid = m.field("BL").map(|v| v == "Y").or(s.valid);
                    }
                }
            }
            "11" | "29" | "09" => {
                let ok = m.fixed(0) == "1";
                let (op, event) = match req.code {
                    "11" => ("checkout", "loan"),
                    "29" => ("renew", "renewal"),
                    _ => ("checkin", "return"),
                };
                // Only what names the session's patron is part of it (a return names nobody).
                let mine = |s: &Session| req.patron.as_deref() == Some(s.patron.as_str());
                if let Some(s) = self.session.as_mut().filter(|s| mine(s)) {
                    match (req.code, ok) {
                        ("11", true) => s.checkouts_ok += 1,
                        ("11", false) => s.checkouts_failed += 1,
                        ("29", true) => s.renewals += 1,
                        ("09", true) => s.checkins += 1,
                        _ => {}
                    }
                }
                if ok && item.is_none() {
                    out.push(Derived::Count("sip2_item_unusable"));
                    return;
                }
                let e = if ok {
                    let mut e = json!({
                        "event": event,
                        "session_ref": session_ref,
                        "item_barcode": item.unwrap_or_default(),
                        "media_type": media,
                        "latency_ms": latency,
                    });
                    if req.code == "09" {
                        e["alert"] = json!(m.fixed(3) == "Y");
                        if let Some(a) = m.field("CV").filter(|a| ALERTS.contains(&a.as_str())) {
                            e["alert_type"] = json!(a);
                        }
                        if let Some(bin) = m.field("CL").filter(|b| !b.is_empty()) {
                            e["sort_bin"] = json!(bin.chars().take(32).collect::<String>());
                        }
                    } else {
                        if let Some(d) = due {
                            e["due_date"] = json!(d);
                        }
                        e["offline_replay"] = json!(req.no_block);
                    }
                    if let Some(inst) = m.field("AO").filter(|i| !i.is_empty()) {
                        e["institution"] = json!(inst.chars().take(32).collect::<String>());
                    }
                    e
                } else {
                    let mut e = json!({
                        "event": "failure",
                        "session_ref": session_ref,
                        "op": op,
                        "result": "refused",
                        "reason": reason(&m.field("AF").unwrap_or_default()),
                        "media_type": media,
                        "latency_ms": latency,
                    });
                    if let Some(i) = item {
                        e["item_barcode"] = json!(i);
                    }
                    e
                };
                out.push(Derived::Event(e));
            }
            "35" => {
                let mine = self
                    .session
                    .as_ref()
                    .is_some_and(|s| req.patron.as_deref() == Some(s.patron.as_str()));
                if mine {
                    self.end_session("end_session", now_ms, out);
                }
            }
            _ => {}
        }
    }

    fn end_session(&mut self, why: &str, now_ms: i64, out: &mut Vec<Derived>) {
        let Some(s) = self.session.take() else {
            return;
        };
        let mut e = json!({
            "event": "session_end",
            "session_ref": s.reference,
            "duration_s": ((now_ms - s.started_ms).max(0) / 1000).min(SESSION_MAX_S),
            "checkouts_ok": s.checkouts_ok.min(SESSION_MAX_COUNT),
            "checkouts_failed": s.checkouts_failed.min(SESSION_MAX_COUNT),
            "checkins": s.checkins.min(SESSION_MAX_COUNT),
            "renewals": s.renewals.min(SESSION_MAX_COUNT),
            // Replaced by the branch's HMAC at intake, before anything is stored.
            "patron_id": s.patron,
            "end_reason": why,
        });
        if let Some(v) = s.valid {
            e["patron_valid"] = json!(v);
        }
        out.push(Derived::Event(e));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The checksum example of the 3M guide, and one changed byte.
    #[test]
    fn checksums() {
        assert_eq!(checksum_ok(b"990 402.00AY1AZFCB4"), Some(true));
        assert_eq!(checksum_ok(b"990 402.01AY1AZFCB4"), Some(false));
        assert_eq!(checksum_ok(b"9900302.00"), None);
        assert_eq!(checksum_ok(b"AZ"), None);
        assert_eq!(checksum_ok(b"99AZzzzz"), None);
    }

    #[test]
    fn lines_split_and_bound() {
        let mut l = Lines::default();
        let mut out = Vec::new();
        l.push(b"99003", &mut out);
        l.push(b"02.00\r\n93", &mut out);
        l.push(b"00CNa|\r", &mut out);
        assert_eq!(
            out,
            [
                Line::Message(b"9900302.00".to_vec()),
                Line::Message(b"9300CNa|".to_vec())
            ]
        );
        out.clear();
        l.push(&vec![b'x'; MAX_LINE + 1], &mut out);
        l.push(b"more\r99", &mut out);
        l.push(b"0\r", &mut out);
        assert_eq!(out, [Line::Overlong, Line::Message(b"990".to_vec())]);
    }

    fn day(tap: &mut Tap, exchanges: &[(&str, &str)]) -> Vec<Derived> {
        let mut out = Vec::new();
        for (i, (req, resp)) in exchanges.iter().enumerate() {
            let t = (i as i64) * 1000;
            out.extend(tap.kiosk_sent(format!("{req}\r").as_bytes(), t));
            out.extend(tap.ils_sent(format!("{resp}\r").as_bytes(), t + 40));
        }
        out
    }

    #[test]
    fn a_scripted_session_becomes_events() {
        let d = "20261203    101502";
        let mut tap = Tap::default();
        let out = day(
            &mut tap,
            &[
                ("9300CNkiosk|COsecret|CPBR01|", "941"),
                ("9900302.00", &format!("98YYYYNN600003{d}2.00AOBR01|AMLibrary|")),
                (
                    &format!("63001{d}          AOBR01|AA2123|ADpin|"),
                    &format!("64              001{d}000000000000000000000000AOBR01|AA2123|AEJane Doe|BLY|"),
                ),
                (
                    &format!("11YN{d}{d}AOBR01|AA2123|AB3001|AC|"),
                    &format!("121NUN{d}AOBR01|AA2123|AB3001|AJTitle|AH20261224|CK001|"),
                ),
                (
                    &format!("11YN{d}{d}AOBR01|AA2123|AB3002|AC|"),
                    &format!("120NUN{d}AOBR01|AA2123|AB3002|AFItem is on hold for another patron|"),
                ),
                (
                    &format!("29NY{d}{d}AOBR01|AA2123|AB3003|"),
                    &format!("301YUN{d}AOBR01|AA2123|AB3003|AH20261230|CK001|"),
                ),
                (
                    &format!("09N{d}{d}APBR01|AOBR01|AB3004|AC|"),
                    &format!("101YNY{d}AOBR01|AB3004|AQBR01|CLbin3|CK006|CV01|CYhold-patron|"),
                ),
                (&format!("35{d}AOBR01|AA2123|"), &format!("36Y{d}AOBR01|AA2123|")),
            ],
        );
        let events: Vec<&Value> = out
            .iter()
            .filter_map(|d| match d {
                Derived::Event(e) => Some(e),
                _ => None,
            })
            .collect();
        let kinds: Vec<&str> = events
            .iter()
            .map(|e| e["event"].as_str().unwrap())
            .collect();
        assert_eq!(
            kinds,
            ["loan", "failure", "renewal", "return", "session_end"]
        );
        assert_eq!(events[0]["item_barcode"], "3001");
        assert_eq!(events[0]["due_date"], "2026-12-24");
        assert_eq!(events[0]["media_type"], "001");
        assert_eq!(events[0]["latency_ms"], 40);
        assert_eq!(events[0]["offline_replay"], false);
        assert_eq!(events[1]["reason"], "hold_other_patron");
        assert_eq!(events[2]["offline_replay"], true);
        assert_eq!(events[3]["alert"], true);
        assert_eq!(events[3]["alert_type"], "01");
        assert_eq!(events[3]["sort_bin"], "bin3");
        let end = events[4];
        assert_eq!(end["checkouts_ok"], 1);
        assert_eq!(end["checkouts_failed"], 1);
        assert_eq!(end["renewals"], 1);
        assert_eq!(
            end["checkins"], 0,
            "the return named no patron: not the session's"
        );
        assert_eq!(end["patron_valid"], true);
        assert_eq!(end["end_reason"], "end_session");
        let session = events[0]["session_ref"].as_str().unwrap();
        assert!(events.iter().all(|e| e["session_ref"] == session));
        assert!(out.contains(&Derived::Count("sip2_login_ok")));
        let telemetry = out.iter().find_map(|d| match d {
            Derived::Telemetry(t) => Some(t),
            _ => None,
        });
        let t = telemetry.expect("SC status telemetry");
        assert_eq!(t["sc_status"], 0);
        assert_eq!(t["sip_protocol"], "2.00");
        assert_eq!(t["acs_online"], true);
        assert_eq!(t["sip_rtt_ms"], 40);
        // No PIN, password, name or hold patron anywhere in what was derived.
        let all = format!("{out:?}");
        for secret in ["secret", "pin", "Jane", "hold-patron", "Title"] {
            assert!(!all.contains(secret), "{secret} in {all}");
        }
    }

    /// A kiosk that never ends its sessions: an idle one ends as `timeout`, and no
    /// figure passes the profile's bounds.
    #[test]
    fn sessions_end_by_timeout_and_stay_in_bounds() {
        let d = "20261203    101502";
        let mut tap = Tap::default();
        let mut out = Vec::new();
        for i in 0..60 {
            let t = i * 100;
            out.extend(tap.kiosk_sent(format!("11YN{d}{d}AOBR01|AAp1|AB{i:04}|\r").as_bytes(), t));
            out.extend(tap.ils_sent(format!("121NUN{d}AB{i:04}|CK001|\r").as_bytes(), t + 1));
        }
        out.extend(tap.kiosk_sent(
            format!("11YN{d}{d}AOBR01|AAp1|AB9999|\r").as_bytes(),
            6_000 + SESSION_IDLE_MS,
        ));
        let ends: Vec<&Value> = out
            .iter()
            .filter_map(|d| match d {
                Derived::Event(e) if e["event"] == "session_end" => Some(e),
                _ => None,
            })
            .collect();
        assert_eq!(ends.len(), 1);
        assert_eq!(ends[0]["end_reason"], "timeout");
        assert_eq!(ends[0]["checkouts_ok"], SESSION_MAX_COUNT);
    }

    /// A refusal's screen message in GB18030 (a Chinese ILS) maps to its reason as in UTF-8.
    #[test]
    fn chinese_screen_messages_map_to_reasons() {
        let d = "20261203    101502";
        for (text, want) in [
            ("该书已被其他读者预约", "hold_other_patron"),
            ("您有欠款未缴", "fines"),
        ] {
            for bytes in [
                text.as_bytes().to_vec(),
                encoding_rs::GB18030.encode(text).0.into_owned(),
            ] {
                let mut tap = Tap::default();
                tap.kiosk_sent(format!("11YN{d}{d}AOBR01|AAp1|AB3001|\r").as_bytes(), 0);
                let mut answer = format!("120NUN{d}AOBR01|AB3001|AF").into_bytes();
                answer.extend(&bytes);
                answer.extend(b"|\r");
                let out = tap.ils_sent(&answer, 5);
                let reason = out.iter().find_map(|d| match d {
                    Derived::Event(e) => e["reason"].as_str().map(str::to_owned),
                    _ => None,
                });
                assert_eq!(reason.as_deref(), Some(want), "{text}");
            }
        }
    }

    #[test]
    fn unknown_and_broken_messages_are_counted() {
        let mut tap = Tap::default();
        let out = tap.kiosk_sent("zz\r11\r99é\r".as_bytes(), 0);
        assert_eq!(out, vec![Derived::Count("sip2_unparsed"); 3]);
        let out = tap.ils_sent(b"941\r", 0);
        assert_eq!(out, [Derived::Count("sip2_unmatched")]);
        // Requests nobody answered make no patron session (anyone can send them).
        let d = "20261203    101502";
        let mut tap = Tap::default();
        let out = tap.kiosk_sent(
            format!("23001{d}AOx|AAp1|\r23001{d}AOx|AAp2|\r").as_bytes(),
            0,
        );
        assert!(out.is_empty());
        assert!(tap.closed(1).is_empty());
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(256))]
        /// Any bytes in either direction, split anywhere: counted or derived, never a panic,
        /// and what is buffered stays bounded.
        #[test]
        fn any_bytes_never_panic(
            chunks in proptest::collection::vec(
                (proptest::prelude::any::<bool>(), proptest::collection::vec(
                    proptest::prop_oneof![
                        proptest::prelude::any::<u8>(),
                        proptest::sample::select(b"\r|0123456789YNAABAFAYAZ".to_vec()),
                    ], 0..200)),
                0..30)
        ) {
            let mut tap = Tap::default();
            for (kiosk, bytes) in chunks {
                let mut seeded = b"11".to_vec();
                seeded.extend(bytes);
                if kiosk {
                    tap.kiosk_sent(&seeded, 0);
                } else {
                    tap.ils_sent(&seeded, 0);
                }
                proptest::prop_assert!(tap.kiosk.buf.len() <= MAX_LINE && tap.ils.buf.len() <= MAX_LINE);
                proptest::prop_assert!(tap.pending.len() <= MAX_PENDING);
            }
            tap.closed(1);
        }
    }
}
