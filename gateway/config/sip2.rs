//! `sip2 = { listen = "ADDR:PORT", ils = "HOST:PORT", tls = false, ca_file = "..." }` on a
//! self-check kiosk: the kiosk's SIP2 host and port point at `listen`; the gateway passes
//! every byte on to the ILS at `ils` (over TLS with `tls = true`, as stunnel setups do) and
//! derives the kiosk's events from what it sees. One listener is one kiosk.

use std::net::SocketAddr;
use std::path::PathBuf;

use serde::Deserialize;

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Sip2Section {
    /// Where the kiosk connects (its SIP2 server setting).
    pub listen: SocketAddr,
    /// The ILS's SIP2 server, `host:port`.
    pub ils: String,
    /// Speak TLS to the ILS (the kiosk's side stays plain TCP on the branch LAN).
    #[serde(default)]
    pub tls: bool,
    /// CA certificates (PEM) for the ILS's TLS certificate; else the system's roots.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// The kiosk's address(es): a connection from anywhere else is closed at accept (so
    /// the tap is no open path to the ILS for the rest of the LAN). Empty: any address.
    #[serde(default)]
    pub allow: Vec<std::net::IpAddr>,
    /// Kiosk connections at once on this listener (a kiosk reconnecting while its old
    /// connection lingers); past it a new one is closed at accept.
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
}

fn default_max_connections() -> usize {
    2
}

impl Sip2Section {
    /// `(host, port)` of the ILS, if `ils` is `host:port`.
    pub fn ils_addr(&self) -> Option<(String, u16)> {
        let (host, port) = self.ils.rsplit_once(':')?;
        let port: u16 = port.parse().ok()?;
        let host = host.trim_start_matches('[').trim_end_matches(']');
        (!host.is_empty() && port > 0).then(|| (host.to_owned(), port))
    }

    /// Problems as (key under `sip2.`, message).
    pub fn check(&self) -> Vec<(&'static str, String)> {
        let mut out = Vec::new();
        if self.ils_addr().is_none() {
            out.push(("ils", "must be host:port".to_owned()));
        }
        if self.listen.port() == 0 {
            out.push((
                "listen",
                "needs a port the kiosk is configured with".to_owned(),
            ));
        }
        if self.ca_file.is_some() && !self.tls {
            out.push(("ca_file", "only with tls = true".to_owned()));
        }
        if !(1..=16).contains(&self.max_connections) {
            out.push(("max_connections", "must be between 1 and 16".to_owned()));
        }
        out
    }
}
