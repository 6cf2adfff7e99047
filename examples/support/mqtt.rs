//! MQTT 3.1.1 and 5 packets as raw bytes, for the fuzzer and the attack benchmark (which
//! need packets no client library would send), and a blocking reader of whole packets.
#![allow(dead_code)]

use std::io::Read;
use std::net::TcpStream;
use std::time::{Duration, Instant};

pub fn remaining_length(mut n: usize, out: &mut Vec<u8>) {
    loop {
        let mut b = (n % 128) as u8;
        n /= 128;
        if n > 0 {
            b |= 0x80;
        }
        out.push(b);
        if n == 0 {
            break;
        }
    }
}

pub fn string(s: &[u8], out: &mut Vec<u8>) {
    let len = s.len().min(u16::MAX as usize);
    out.extend_from_slice(&(len as u16).to_be_bytes());
    out.extend_from_slice(&s[..len]);
}

/// A packet from its first byte and body.
pub fn packet(first: u8, body: &[u8]) -> Vec<u8> {
    let mut out = vec![first];
    remaining_length(body.len(), &mut out);
    out.extend_from_slice(body);
    out
}

pub struct Connect<'a> {
    pub v5: bool,
    pub client_id: &'a str,
    pub login: Option<(&'a str, &'a str)>,
    pub keep_alive: u16,
    pub clean: bool,
    /// Will topic and message (QoS 1, not retained).
    pub will: Option<(&'a str, &'a [u8])>,
    /// MQTT 5 CONNECT properties, already encoded.
    pub properties: &'a [u8],
}

pub fn connect(c: &Connect) -> Vec<u8> {
    let mut body = Vec::new();
    string(b"MQTT", &mut body);
    body.push(if c.v5 { 5 } else { 4 });
    let mut flags = 0u8;
    if c.clean {
        flags |= 0x02;
    }
    if c.will.is_some() {
        flags |= 0x04 | 0x08;
    }
    if c.login.is_some() {
        flags |= 0xc0;
    }
    body.push(flags);
    body.extend_from_slice(&c.keep_alive.to_be_bytes());
    if c.v5 {
        remaining_length(c.properties.len(), &mut body);
        body.extend_from_slice(c.properties);
    }
    string(c.client_id.as_bytes(), &mut body);
    if let Some((topic, message)) = c.will {
        if c.v5 {
            body.push(0);
        }
        string(topic.as_bytes(), &mut body);
        string(message, &mut body);
    }
    if let Some((user, pass)) = c.login {
        string(user.as_bytes(), &mut body);
        string(pass.as_bytes(), &mut body);
    }
    packet(0x10, &body)
}

/// A PUBLISH; `properties` (MQTT 5) already encoded, `None` on 3.1.1.
pub fn publish(
    topic: &[u8],
    payload: &[u8],
    qos: u8,
    pkid: u16,
    properties: Option<&[u8]>,
) -> Vec<u8> {
    let mut body = Vec::new();
    string(topic, &mut body);
    if qos > 0 {
        body.extend_from_slice(&pkid.to_be_bytes());
    }
    if let Some(p) = properties {
        remaining_length(p.len(), &mut body);
        body.extend_from_slice(p);
    }
    body.extend_from_slice(payload);
    packet(0x30 | (qos << 1), &body)
}

/// A SUBSCRIBE with one options byte per filter.
pub fn subscribe(pkid: u16, filters: &[(&[u8], u8)], properties: Option<&[u8]>) -> Vec<u8> {
    let mut body = pkid.to_be_bytes().to_vec();
    if let Some(p) = properties {
        remaining_length(p.len(), &mut body);
        body.extend_from_slice(p);
    }
    for (f, options) in filters {
        string(f, &mut body);
        body.push(*options);
    }
    packet(0x82, &body)
}

/// Read one whole packet (first byte, body) within `limit`; `None` on timeout or close.
pub fn read_packet(s: &mut TcpStream, limit: Duration) -> Option<(u8, Vec<u8>)> {
    let deadline = Instant::now() + limit;
    let mut read_exact = |buf: &mut [u8]| -> Option<()> {
        let mut at = 0;
        while at < buf.len() {
            let left = deadline.checked_duration_since(Instant::now())?;
            s.set_read_timeout(Some(left.max(Duration::from_millis(1))))
                .ok()?;
            match s.read(&mut buf[at..]) {
                Ok(0) => return None,
                Ok(n) => at += n,
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    if Instant::now() >= deadline {
                        return None;
                    }
                }
                Err(_) => return None,
            }
        }
        Some(())
    };
    let mut first = [0u8; 1];
    read_exact(&mut first)?;
    let mut len = 0usize;
    let mut shift = 0;
    for _ in 0..4 {
        let mut b = [0u8; 1];
        read_exact(&mut b)?;
        len |= ((b[0] & 0x7f) as usize) << shift;
        if b[0] & 0x80 == 0 {
            let mut body = vec![0u8; len];
            read_exact(&mut body)?;
            return Some((first[0], body));
        }
        shift += 7;
    }
    None
}

/// Connect from `source` (a loopback address) to the gateway's port.
pub fn tcp_from(source: std::net::IpAddr, port: u16) -> std::io::Result<TcpStream> {
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
    socket.bind(&std::net::SocketAddr::new(source, 0).into())?;
    socket.connect_timeout(
        &std::net::SocketAddr::from(([127, 0, 0, 1], port)).into(),
        Duration::from_secs(5),
    )?;
    let s: TcpStream = socket.into();
    s.set_nodelay(true)?;
    Ok(s)
}

/// Close with a reset (no FIN): what a device that loses power mid-packet looks like.
pub fn reset(s: TcpStream) {
    let _ = socket2::SockRef::from(&s).set_linger(Some(Duration::ZERO));
    drop(s);
}
