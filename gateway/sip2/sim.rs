//! A simulated ILS and simulated SIP2 kiosks, for the demo (and anyone trying the tap
//! without a library system): the kiosks run patron sessions (patron information, a few
//! checkouts, now and then a renewal, end of session), returns and SC status messages; the
//! ILS answers them, refusing some checkouts the way real ones do (a hold for another
//! patron, fines, too many items). Patron ids and names here are made up.

use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

/// A SIP2 timestamp (18 characters), local time unknown: `YYYYMMDD    HHMMSS`.
fn stamp() -> String {
    let now = jiff::Zoned::now();
    now.strftime("%Y%m%d    %H%M%S").to_string()
}

fn due() -> String {
    let due = jiff::Zoned::now() + jiff::SignedDuration::from_hours(21 * 24);
    due.strftime("%Y%m%d    235900").to_string()
}

/// The simulated ILS's answer to one request (`None`: no answer for that message).
pub fn answer(request: &str, rng: &mut impl Rng) -> Option<String> {
    // AA and AB never come first (AO does, right after the fixed fields).
    let field = |code: &str| {
        request
            .split('|')
            .skip(1)
            .find_map(|f| f.strip_prefix(code))
            .unwrap_or("")
            .to_owned()
    };
    let d = stamp();
    let item = field("AB");
    let patron = field("AA");
    Some(match request.get(..2)? {
        "93" => "941".to_owned(),
        "99" => format!("98YYYYNN600003{d}2.00AODEMO|AMDemo City Library|"),
        "63" => format!("64              001{d}000000000000000000000000AODEMO|AA{patron}|AEDemo Patron|BLY|CQY|"),
        "23" => format!("24              001{d}AODEMO|AA{patron}|AEDemo Patron|BLY|CQY|"),
        "11" => match rng.gen_range(0..20) {
            0 => format!("120NUN{d}AODEMO|AA{patron}|AB{item}|AFItem is on hold for another patron|"),
            1 => format!("120NUN{d}AODEMO|AA{patron}|AB{item}|AFPatron has outstanding fines|"),
            2 => format!("120NUN{d}AODEMO|AA{patron}|AB{item}|AFToo many items checked out|"),
            _ => format!("121NUN{d}AODEMO|AA{patron}|AB{item}|AJA demo title|AH{}|CK001|", due()),
        },
        "29" => format!("301YUN{d}AODEMO|AA{patron}|AB{item}|AH{}|CK001|", due()),
        "09" => match rng.gen_range(0..10) {
            0 => format!("101YNY{d}AODEMO|AB{item}|AQDEMO|CLbin2|CK001|CV01|"),
            _ => format!("101YNN{d}AODEMO|AB{item}|AQDEMO|CLbin1|CK001|"),
        },
        "35" => format!("36Y{d}AODEMO|AA{patron}|"),
        _ => return None,
    })
}

/// Serve the simulated ILS on `listener` until `stop`.
pub async fn ils(listener: TcpListener, seed: u64, stop: CancellationToken) {
    let mut n = 0u64;
    loop {
        let accepted = tokio::select! {
            _ = stop.cancelled() => return,
            a = listener.accept() => a,
        };
        let Ok((stream, _)) = accepted else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        n += 1;
        let stop = stop.clone();
        tokio::spawn(async move {
            let mut rng = StdRng::seed_from_u64(seed ^ n);
            let (rx, mut tx) = stream.into_split();
            let mut lines = BufReader::new(rx).split(b'\r');
            loop {
                let line = tokio::select! {
                    _ = stop.cancelled() => return,
                    l = lines.next_segment() => l,
                };
                let Ok(Some(line)) = line else { return };
                let request = String::from_utf8_lossy(&line)
                    .trim_start_matches('\n')
                    .to_owned();
                if let Some(a) = answer(&request, &mut rng) {
                    if tx.write_all(format!("{a}\r").as_bytes()).await.is_err() {
                        return;
                    }
                }
            }
        });
    }
}

/// One simulated kiosk talking to `tap` (its SIP2 server setting) until `stop`: a patron
/// session or a return every few seconds (divided by `speed`), an SC status every minute.
pub async fn kiosk(tap: std::net::SocketAddr, speed: f64, seed: u64, stop: CancellationToken) {
    let mut rng = StdRng::seed_from_u64(seed);
    let pause = |s: f64| Duration::from_secs_f64((s / speed.max(0.1)).max(0.005));
    while !stop.is_cancelled() {
        if let Ok(stream) = TcpStream::connect(tap).await {
            let _ = run_kiosk(stream, &mut rng, &pause, &stop).await;
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
    }
}

async fn run_kiosk(
    stream: TcpStream,
    rng: &mut StdRng,
    pause: &impl Fn(f64) -> Duration,
    stop: &CancellationToken,
) -> std::io::Result<()> {
    let (rx, mut tx) = stream.into_split();
    let mut lines = BufReader::new(rx).split(b'\r');
    let mut exchange = async |request: String| -> std::io::Result<()> {
        tx.write_all(format!("{request}\r").as_bytes()).await?;
        match tokio::time::timeout(Duration::from_secs(10), lines.next_segment()).await {
            Ok(Ok(Some(_))) => Ok(()),
            _ => Err(std::io::Error::other("no answer")),
        }
    };
    exchange("9300CNdemo-kiosk|COdemo-password|CPDEMO|".to_owned()).await?;
    let mut next_status = tokio::time::Instant::now();
    loop {
        if tokio::time::Instant::now() >= next_status {
            exchange("9900302.00".to_owned()).await?;
            next_status = tokio::time::Instant::now() + pause(60.0);
        }
        let d = stamp();
        if rng.gen_bool(0.6) {
            let patron = format!("2900{:010}", rng.gen_range(0..5_000u32));
            exchange(format!("63001{d}          AODEMO|AA{patron}|ADdemo-pin|")).await?;
            for _ in 0..rng.gen_range(1..=3) {
                let item = format!("3900{:08}", rng.gen_range(0..200_000u32));
                exchange(format!("11YN{d}{d}AODEMO|AA{patron}|AB{item}|AC|")).await?;
            }
            if rng.gen_bool(0.2) {
                let item = format!("3900{:08}", rng.gen_range(0..200_000u32));
                exchange(format!("29NN{d}{d}AODEMO|AA{patron}|AB{item}|")).await?;
            }
            exchange(format!("35{d}AODEMO|AA{patron}|")).await?;
        } else {
            let item = format!("3900{:08}", rng.gen_range(0..200_000u32));
            exchange(format!("09N{d}{d}APDEMO|AODEMO|AB{item}|AC|")).await?;
        }
        tokio::select! {
            _ = stop.cancelled() => return Ok(()),
            _ = tokio::time::sleep(pause(rng.gen_range(2.0..8.0))) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every answer of the simulated ILS is one the tap parses, with the request's item.
    #[test]
    fn answers_parse() {
        let mut rng = StdRng::seed_from_u64(1);
        let d = stamp();
        for req in [
            "9300CNa|COb|".to_owned(),
            "9900302.00".to_owned(),
            format!("63001{d}          AODEMO|AAp1|"),
            format!("11YN{d}{d}AODEMO|AAp1|AB3001|AC|"),
            format!("29NN{d}{d}AODEMO|AAp1|AB3001|"),
            format!("09N{d}{d}APDEMO|AODEMO|AB3001|AC|"),
            format!("35{d}AODEMO|AAp1|"),
        ] {
            for _ in 0..20 {
                let a = answer(&req, &mut rng).unwrap();
                let p = super::super::tap::parse(a.as_bytes()).unwrap_or_else(|| panic!("{a}"));
                if ["11", "29", "09"].contains(&&req[..2]) {
                    assert_eq!(p.field("AB").as_deref(), Some("3001"), "{a}");
                }
            }
        }
    }
}
