//! The HTTP API under hostile clients, with the real binary on loopback: slowloris clients
//! are cut at the header timeout while a normal request still gets through; a burst of
//! 400 concurrent requests gets 200s and 503s only, leaving the SQLite descriptors bounded;
//! connections over the limits (total and per source address) are refused and counted; a
//! client that stops reading is cut at the write timeout; a large body is a 413; an
//! address guessing tokens is refused for a minute.

mod common;

use std::time::{Duration, Instant};

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const TOKEN: &str = "limits-test-token-0123456789";

/// A branch with the API on a free port and these `[api]` limits.
fn branch(limits: &str) -> (Branch, u16) {
    let api_port = free_port();
    let branch = Branch::with_extra(
        &[device("k1", "test-sensor")],
        &format!("[api]\nlisten = \"127.0.0.1:{api_port}\"\ntoken = \"{TOKEN}\"\n{limits}\n"),
    );
    (branch, api_port)
}

async fn connect(port: u16) -> TcpStream {
    tokio::time::timeout(
        Duration::from_secs(5),
        TcpStream::connect(("127.0.0.1", port)),
    )
    .await
    .expect("connect within 5 s")
    .expect("connect")
}

/// One response on a keep-alive connection: (status, headers, body). Bounded in time.
async fn exchange(s: &mut TcpStream, request: &str) -> (u16, String, String) {
    s.write_all(request.as_bytes()).await.unwrap();
    tokio::time::timeout(Duration::from_secs(10), read_response(s))
        .await
        .expect("a response within 10 s")
}

async fn read_response(s: &mut TcpStream) -> (u16, String, String) {
    let mut raw = Vec::new();
    let mut buf = [0u8; 4096];
    let head_end = loop {
        if let Some(i) = raw.windows(4).position(|w| w == b"\r\n\r\n") {
            break i;
        }
        let n = s.read(&mut buf).await.unwrap();
        assert!(n > 0, "closed before a complete head: {raw:?}");
        raw.extend_from_slice(&buf[..n]);
    };
    let head = String::from_utf8_lossy(&raw[..head_end]).into_owned();
    let status = head[9..12].parse().unwrap();
    let length: usize = head
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("content-length")
                .then(|| v.trim().parse().unwrap())
        })
        .expect("content-length");
    let mut body = raw[head_end + 4..].to_vec();
    while body.len() < length {
        let n = s.read(&mut buf).await.unwrap();
        assert!(n > 0, "closed inside a body");
        body.extend_from_slice(&buf[..n]);
    }
    (status, head, String::from_utf8(body).unwrap())
}

fn get(path: &str) -> String {
    format!("GET {path} HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer {TOKEN}\r\n\r\n")
}

/// A sample's value in Prometheus text (`name` or `name{labels}`).
fn sample(metrics: &str, series: &str) -> f64 {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("no {series} in:\n{metrics}"))
}

async fn metrics(port: u16) -> String {
    let mut s = connect(port).await;
    let (status, _, body) = exchange(&mut s, &get("/metrics")).await;
    assert_eq!(status, 200, "{body}");
    body
}

/// Wait (at most `limit`) until the server ends the connection: `Some(true)` for EOF,
/// `Some(false)` for a reset, `None` if still open. Bytes the server sends are skipped.
async fn closed_within(s: &mut TcpStream, limit: Duration) -> Option<bool> {
    let deadline = tokio::time::Instant::now() + limit;
    let mut buf = [0u8; 1024];
    loop {
        match tokio::time::timeout_at(deadline, s.read(&mut buf)).await {
            Err(_) => return None,
            Ok(Ok(0)) => return Some(true),
            Ok(Ok(_)) => continue,
            Ok(Err(_)) => return Some(false),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slowloris_clients_are_cut_at_the_header_timeout() {
    const CLIENTS: usize = 200;
    const HEADER_TIMEOUT: Duration = Duration::from_millis(2500);
    let (branch, port) = branch(
        "max_connections = 256\nmax_connections_per_address = 256\nheader_timeout_ms = 2500\n",
    );
    let gw = branch.start();

    // Each client sends one byte of a request head a second (at 0 s, 1 s, 2 s...: never
    // at the 2.5 s deadline), until the server closes, for at most 20 bytes.
    let head = b"GET /api/v1/devices HTTP/1.1\r\nHost: gw\r\nX-Slow: 1\r\n\r\n";
    let (connected_tx, mut connected_rx) = tokio::sync::mpsc::channel(CLIENTS);
    let mut clients = Vec::new();
    for _ in 0..CLIENTS {
        let connected_tx = connected_tx.clone();
        clients.push(tokio::spawn(async move {
            let mut s = connect(port).await;
            let opened = Instant::now();
            s.write_all(&head[..1]).await.unwrap();
            connected_tx.send(()).await.unwrap();
            for byte in &head[1..20] {
                match closed_within(&mut s, Duration::from_secs(1)).await {
                    Some(eof) => return (eof, opened.elapsed()),
                    None => {
                        if s.write_all(std::slice::from_ref(byte)).await.is_err() {
                            return (false, opened.elapsed());
                        }
                    }
                }
            }
            panic!("still open after 19 s");
        }));
    }
    for _ in 0..CLIENTS {
        tokio::time::timeout(Duration::from_secs(10), connected_rx.recv())
            .await
            .expect("every slow client connected")
            .unwrap();
    }
    // While they hold their connections, a normal request is answered at once.
    let asked = Instant::now();
    let mut s = connect(port).await;
    let (status, _, body) = exchange(&mut s, &get("/api/v1/devices")).await;
    let took = asked.elapsed();
    assert_eq!(status, 200, "{body}");
    assert!(took < Duration::from_secs(1), "took {took:?}");
    let (_, _, during) = exchange(&mut s, &get("/metrics")).await;
    assert!(
        clients.iter().all(|c| !c.is_finished()),
        "a slow client was closed before its timeout"
    );
    assert_eq!(
        sample(&during, "branch_gateway_api_connections_open"),
        (CLIENTS + 1) as f64,
        "{during}"
    );
    drop(s);

    let mut eof = 0;
    for c in clients {
        let (clean, after) = tokio::time::timeout(Duration::from_secs(30), c)
            .await
            .expect("slow client done")
            .unwrap();
        assert!(clean, "reset instead of a clean close after {after:?}");
        eof += 1;
        assert!(
            after >= HEADER_TIMEOUT - Duration::from_millis(100)
                && after < HEADER_TIMEOUT + Duration::from_secs(3),
            "closed after {after:?}"
        );
    }
    assert_eq!(eof, CLIENTS);

    let after = metrics(port).await;
    let header_timeouts = "branch_gateway_api_connections_timed_out_total{timeout=\"header\"}";
    assert_eq!(sample(&after, header_timeouts), CLIENTS as f64, "{after}");
    assert_eq!(sample(&after, "branch_gateway_api_connections_open"), 1.0);
    let refused = "branch_gateway_api_connections_refused_total{limit=\"max_connections\"}";
    assert_eq!(sample(&after, refused), 0.0);
    let log = gw.terminate().1;
    assert_eq!(
        log.matches("request head not complete").count(),
        1,
        "one log line for the burst:\n{log}"
    );
}

/// SQLite files the process holds open (database, WAL, shared memory).
fn sqlite_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .filter(|target| {
            let t = target.to_string_lossy();
            t.ends_with(".sqlite") || t.ends_with(".sqlite-wal") || t.ends_with(".sqlite-shm")
        })
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_gets_answers_and_leaves_sqlite_handles_bounded() {
    const BURST: usize = 400;
    const READERS: usize = 4;
    let (branch, port) = branch(&format!(
        "max_connections = 512\nmax_connections_per_address = 512\nmax_requests = 200\nreaders = {READERS}\n"
    ));
    let gw = branch.start();
    let before = sqlite_fds(gw.pid());

    // Connect all first, then send every request at once.
    let mut sockets = Vec::new();
    for _ in 0..BURST {
        sockets.push(connect(port).await);
    }
    let go = std::sync::Arc::new(tokio::sync::Barrier::new(BURST));
    let mut tasks = Vec::new();
    for mut s in sockets {
        let go = go.clone();
        tasks.push(tokio::spawn(async move {
            go.wait().await;
            let (status, head, _) = exchange(&mut s, &get("/api/v1/devices")).await;
            if status == 503 {
                assert!(
                    head.to_ascii_lowercase().contains("retry-after: 1"),
                    "{head}"
                );
            }
            status
        }));
    }
    let (mut ok, mut busy) = (0, 0);
    for t in tasks {
        match tokio::time::timeout(Duration::from_secs(30), t)
            .await
            .expect("every request answered within 30 s")
            .unwrap()
        {
            200 => ok += 1,
            503 => busy += 1,
            other => panic!("status {other}"),
        }
    }
    println!("burst of {BURST}: {ok} x 200, {busy} x 503");
    assert_eq!(ok + busy, BURST);
    assert!(ok >= 1);

    let m = metrics(port).await;
    let refused = sample(
        &m,
        "branch_gateway_api_requests_refused_total{limit=\"max_requests\"}",
    ) + sample(
        &m,
        "branch_gateway_api_requests_refused_total{limit=\"readers\"}",
    );
    assert_eq!(refused, busy as f64, "{m}");
    let after = sqlite_fds(gw.pid());
    println!("SQLite descriptors: {before} before, {after} after");
    // Each reader holds at most three (database, WAL, shared memory); three more for a
    // periodic reader of the gateway's own (the live summary) open at either moment.
    assert!(
        after <= before + 3 * READERS + 3,
        "{after} SQLite descriptors after the burst ({before} before)"
    );
    assert!(sample(&m, "branch_gateway_api_readers_open") <= READERS as f64);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_over_the_limits_are_refused_and_counted() {
    const MAX: usize = 8;
    const EXTRA: usize = 5;
    let (branch, port) = branch(&format!(
        "max_connections = {MAX}\nmax_connections_per_address = 6\nheader_timeout_ms = 30000\nmax_body_bytes = 1024\n"
    ));
    let _gw = branch.start();

    // One keep-alive connection to ask with, then holders up to the per-address limit.
    let mut ask = connect(port).await;
    let (status, _, _) = exchange(&mut ask, &get("/healthz")).await;
    assert_eq!(status, 200);
    let mut holders = Vec::new();
    for _ in 1..6 {
        let mut s = connect(port).await;
        s.write_all(b"GET /he").await.unwrap();
        holders.push(s);
    }
    // From 127.0.0.1 the next one is over the per-address limit; from 127.0.0.2 not.
    let mut s = connect(port).await;
    assert_eq!(read_refusal(&mut s).await, 503);
    for _ in 6..MAX {
        let sock = tokio::net::TcpSocket::new_v4().unwrap();
        sock.bind("127.0.0.2:0".parse().unwrap()).unwrap();
        let mut s = sock
            .connect(format!("127.0.0.1:{port}").parse().unwrap())
            .await
            .unwrap();
        s.write_all(b"GET /he").await.unwrap();
        holders.push(s);
    }
    // Every slot is taken now: each further connection gets a 503 and is closed at once.
    for _ in 0..EXTRA {
        let sock = tokio::net::TcpSocket::new_v4().unwrap();
        sock.bind("127.0.0.2:0".parse().unwrap()).unwrap();
        let mut s = sock
            .connect(format!("127.0.0.1:{port}").parse().unwrap())
            .await
            .unwrap();
        assert_eq!(read_refusal(&mut s).await, 503);
    }
    let (status, _, m) = exchange(&mut ask, &get("/metrics")).await;
    assert_eq!(status, 200);
    assert_eq!(
        sample(
            &m,
            "branch_gateway_api_connections_refused_total{limit=\"max_connections\"}"
        ),
        EXTRA as f64,
        "{m}"
    );
    assert_eq!(
        sample(
            &m,
            "branch_gateway_api_connections_refused_total{limit=\"max_connections_per_address\"}"
        ),
        1.0
    );
    assert_eq!(
        sample(&m, "branch_gateway_api_connections_open"),
        MAX as f64
    );

    // Slots come free as the holders go; a body over the limit is a 413 and the end of
    // the connection (the body is announced, never sent).
    drop(holders);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (_, _, m) = exchange(&mut ask, &get("/metrics")).await;
        if sample(&m, "branch_gateway_api_connections_open") == 1.0 {
            break;
        }
        assert!(Instant::now() < deadline, "slots not given back:\n{m}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut s = connect(port).await;
    let (status, head, body) = exchange(
        &mut s,
        "GET /healthz HTTP/1.1\r\nHost: gw\r\nContent-Length: 2000\r\n\r\n",
    )
    .await;
    assert_eq!(status, 413, "{body}");
    assert!(head.to_ascii_lowercase().contains("connection: close"));
    assert_eq!(
        closed_within(&mut s, Duration::from_secs(5)).await,
        Some(true)
    );
    let (_, _, m) = exchange(&mut ask, &get("/metrics")).await;
    assert_eq!(
        sample(
            &m,
            "branch_gateway_api_requests_refused_total{limit=\"max_body_bytes\"}"
        ),
        1.0
    );
}

/// The refusal an over-limit connection gets: its status, then the close.
async fn read_refusal(s: &mut TcpStream) -> u16 {
    let (status, head, body) = tokio::time::timeout(Duration::from_secs(5), read_response(s))
        .await
        .expect("refused within 5 s");
    assert!(
        head.to_ascii_lowercase().contains("retry-after: 1"),
        "{head}"
    );
    assert_eq!(body, r#"{"error":"too many connections"}"#);
    assert_eq!(
        closed_within(s, Duration::from_secs(5)).await,
        Some(true),
        "closed after the refusal"
    );
    status
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stops_reading_is_cut_at_the_write_timeout() {
    let (branch, port) = branch("write_timeout_ms = 1000\n");
    let _gw = branch.start();
    // A small receive window and requests pipelined without reading a single response.
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.set_recv_buffer_size(4096).unwrap();
    let s = sock
        .connect(format!("127.0.0.1:{port}").parse().unwrap())
        .await
        .unwrap();
    let (mut rx, mut tx) = s.into_split();
    let started = Instant::now();
    let writer = tokio::spawn(async move {
        let request = b"GET /nowhere HTTP/1.1\r\nHost: gw\r\n\r\n".repeat(100);
        // At most 200,000 requests (the server stops reading long before).
        for _ in 0..2000 {
            if tx.write_all(&request).await.is_err() {
                return;
            }
        }
    });
    // Wait until the server gives up on this connection, reading nothing meanwhile.
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut timed_out = 0.0;
    while Instant::now() < deadline {
        let m = metrics(port).await;
        timed_out = sample(
            &m,
            "branch_gateway_api_connections_timed_out_total{timeout=\"write\"}",
        );
        if timed_out > 0.0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(timed_out, 1.0);
    assert!(started.elapsed() >= Duration::from_secs(1));
    // Whatever was in flight drains, then the connection ends.
    let mut buf = vec![0u8; 65536];
    let drained = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match rx.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await;
    assert!(drained.is_ok(), "the connection was not closed");
    writer.abort();
    // Only the metrics request itself stays open (the count drops as the task ends).
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut open = f64::NAN;
    while Instant::now() < deadline {
        open = sample(&metrics(port).await, "branch_gateway_api_connections_open");
        if open == 1.0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(open, 1.0);
}

/// CPU seconds (user + system) the process has used.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // Fields after the command (which is in parentheses): utime and stime are 14 and 15.
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let fields: Vec<&str> = rest.split(' ').collect();
    let ticks: f64 = fields[11].parse::<f64>().unwrap() + fields[12].parse::<f64>().unwrap();
    ticks / 100.0
}

fn set_open_files_limit(pid: u32, soft: u64) -> u64 {
    let mut old = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    let mut new = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain syscalls on valid pointers to rlimit structs.
    unsafe {
        assert_eq!(
            libc::prlimit(pid as i32, libc::RLIMIT_NOFILE, std::ptr::null(), &mut old),
            0
        );
        new.rlim_cur = soft;
        new.rlim_max = old.rlim_max;
        assert_eq!(
            libc::prlimit(pid as i32, libc::RLIMIT_NOFILE, &new, std::ptr::null_mut()),
            0
        );
    }
    old.rlim_cur
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn out_of_descriptors_the_accept_loop_backs_off_and_counts() {
    let (branch, port) = branch("header_timeout_ms = 30000\nmax_connections_per_address = 64\n");
    let gw = branch.start();
    let pid = gw.pid();
    let open_now = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count() as u64;
    // Room for three more descriptors, then forty clients.
    let old = set_open_files_limit(pid, open_now + 3);
    let mut clients = Vec::new();
    for _ in 0..40 {
        let mut s = connect(port).await;
        let _ = s.write_all(b"GET /he").await;
        clients.push(s);
    }
    let (cpu_before, t) = (cpu_seconds(pid), Instant::now());
    tokio::time::sleep(Duration::from_secs(2)).await;
    let cpu = cpu_seconds(pid) - cpu_before;
    let waited = t.elapsed();
    // A spinning loop would use a core for the whole wait.
    assert!(cpu < 0.5, "{cpu} CPU seconds in {waited:?}");
    drop(clients);
    set_open_files_limit(pid, old);
    let m = {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let m = metrics(port).await;
            if sample(&m, "branch_gateway_api_connections_open") == 1.0 {
                break m;
            }
            assert!(Instant::now() < deadline, "connections not closed:\n{m}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    let errors = sample(&m, "branch_gateway_api_accept_errors_total");
    // 100 ms doubling to 1 s: at most 2 + 1 + ... a second, however long it lasted.
    assert!(errors >= 1.0, "{m}");
    assert!(
        errors <= 2.0 + waited.as_secs_f64() + 3.0,
        "{errors} errors"
    );
    let log = gw.terminate().1;
    assert!(
        log.contains("API cannot accept connections") && log.contains("Too many open files"),
        "{log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_keep_alive_and_a_late_head_have_their_own_bounds() {
    let (branch, port) = branch("idle_timeout_ms = 1000\nheader_timeout_ms = 3000\n");
    let _gw = branch.start();
    // Idle after a response: closed at the idle timeout, well before the header timeout.
    let mut idle = connect(port).await;
    let (status, _, _) = exchange(&mut idle, "GET /nowhere HTTP/1.1\r\nHost: gw\r\n\r\n").await;
    assert_eq!(status, 404);
    let t = Instant::now();
    assert_eq!(
        closed_within(&mut idle, Duration::from_secs(10)).await,
        Some(true)
    );
    let took = t.elapsed();
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_millis(2500),
        "idle connection closed after {took:?}"
    );
    // A next request started 0.5 s after a response has the header timeout from then on.
    let mut late = connect(port).await;
    let (status, _, _) = exchange(&mut late, "GET /nowhere HTTP/1.1\r\nHost: gw\r\n\r\n").await;
    assert_eq!(status, 404);
    let t = Instant::now();
    tokio::time::sleep(Duration::from_millis(500)).await;
    late.write_all(b"GET /now").await.unwrap();
    assert_eq!(
        closed_within(&mut late, Duration::from_secs(10)).await,
        Some(true)
    );
    let took = t.elapsed();
    assert!(
        took >= Duration::from_millis(3400) && took < Duration::from_millis(5500),
        "slow second head closed after {took:?}"
    );
    let m = metrics(port).await;
    let series =
        |t: &str| format!("branch_gateway_api_connections_timed_out_total{{timeout=\"{t}\"}}");
    assert_eq!(sample(&m, &series("idle")), 1.0, "{m}");
    assert_eq!(sample(&m, &series("header")), 1.0, "{m}");
    assert_eq!(sample(&m, &series("write")), 0.0, "{m}");
}

/// Ten wrong tokens within a minute (bearer or the login form) and the address is refused
/// with 429 for a minute, whatever token it presents, without any wait; requests that
/// present no token and other addresses are served as before; the refusals are counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_address_guessing_tokens_is_refused_for_a_minute() {
    let (branch, port) = branch("");
    let _gw = branch.start();
    let mut s = connect(port).await;
    let wrong = "GET /api/v1/devices HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer not-the-token-0123456789\r\n\r\n";
    for i in 0..5 {
        let (status, _, _) = exchange(&mut s, wrong).await;
        assert_eq!(status, 401, "wrong token {}", i + 1);
    }
    // The dashboard sends a wrong bearer token to the login form (303): a guess all the same.
    let page =
        "GET / HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer not-the-token-0123456789\r\n\r\n";
    for i in 5..9 {
        let (status, _, _) = exchange(&mut s, page).await;
        assert_eq!(status, 303, "wrong token {}", i + 1);
    }
    let form = "token=wrong&next=";
    let login = format!(
        "POST /login HTTP/1.1\r\nHost: gw\r\nContent-Type: application/x-www-form-urlencoded\r\nContent-Length: {}\r\n\r\n{form}",
        form.len()
    );
    let (status, _, _) = exchange(&mut s, &login).await;
    assert_eq!(status, 401, "the tenth, at the form");
    // Now even the right token is refused from here, at once.
    let asked = Instant::now();
    let (status, head, _) = exchange(&mut s, &get("/api/v1/devices")).await;
    assert_eq!(status, 429, "{head}");
    assert!(asked.elapsed() < Duration::from_millis(500), "no waiting");
    let retry: u64 = head
        .lines()
        .find_map(|l| {
            l.strip_prefix("retry-after: ")
                .or(l.strip_prefix("Retry-After: "))
        })
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("Retry-After in {head}"));
    assert!((55..=60).contains(&retry), "{retry}");
    let (status, _, _) = exchange(&mut s, &login).await;
    assert_eq!(status, 429);
    // Without a token: served.
    let (status, _, _) = exchange(&mut s, "GET /healthz HTTP/1.1\r\nHost: gw\r\n\r\n").await;
    assert_eq!(status, 200);
    // Another address with the right token: served, and the refusals are counted.
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.bind("127.0.0.2:0".parse().unwrap()).unwrap();
    let mut other = sock
        .connect(format!("127.0.0.1:{port}").parse().unwrap())
        .await
        .unwrap();
    let (status, _, metrics) = exchange(&mut other, &get("/metrics")).await;
    assert_eq!(status, 200);
    assert_eq!(
        sample(
            &metrics,
            "branch_gateway_api_requests_refused_total{limit=\"wrong_tokens\"}"
        ),
        2.0
    );
    assert_eq!(
        sample(&metrics, "branch_gateway_page_logins_refused_total"),
        1.0
    );
}

/// Clients that send their request bodies a byte every half second, as many as
/// `max_requests`, are answered 408 and closed at `header_timeout_ms` after their heads;
/// meanwhile other requests are served at once (a body is read before a request slot is
/// taken).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_bodies_are_cut_at_the_header_timeout() {
    const CLIENTS: usize = 4;
    let (branch, port) = branch(&format!(
        "max_requests = {CLIENTS}\nheader_timeout_ms = 2000\n"
    ));
    let _gw = branch.start();
    let mut clients = Vec::new();
    for _ in 0..CLIENTS {
        clients.push(tokio::spawn(async move {
            let mut s = connect(port).await;
            s.write_all(
                b"POST /login HTTP/1.1\r\nHost: gw\r\nContent-Type: application/x-www-form-urlencoded\r\nContent-Length: 40\r\n\r\nt",
            )
            .await
            .unwrap();
            let sent = Instant::now();
            for _ in 0..30 {
                tokio::time::sleep(Duration::from_millis(500)).await;
                if s.write_all(b"o").await.is_err() {
                    break;
                }
                if sent.elapsed() > Duration::from_millis(2400) {
                    break;
                }
            }
            let (status, head, _) = tokio::time::timeout(Duration::from_secs(10), read_response(&mut s))
                .await
                .expect("an answer");
            (status, head, sent.elapsed())
        }));
    }
    // While the slow bodies are pending they hold their connections but no request slot:
    // other requests are served at once.
    tokio::time::sleep(Duration::from_millis(800)).await;
    let mut s = connect(port).await;
    let asked = Instant::now();
    let (status, _, _) = exchange(&mut s, &get("/healthz")).await;
    assert_eq!(status, 200, "no slot is held by a slow body");
    assert!(asked.elapsed() < Duration::from_millis(500));
    for c in clients {
        let (status, head, after) = c.await.unwrap();
        assert_eq!(status, 408, "{head}");
        assert!(
            head.to_ascii_lowercase().contains("connection: close"),
            "{head}"
        );
        assert!(
            after >= Duration::from_millis(1800) && after < Duration::from_secs(4),
            "cut after {after:?}"
        );
    }
    let (status, _, _) = exchange(&mut s, &get("/healthz")).await;
    assert_eq!(status, 200);
    let m = metrics(port).await;
    assert_eq!(
        sample(
            &m,
            "branch_gateway_api_connections_timed_out_total{timeout=\"body\"}"
        ),
        CLIENTS as f64
    );
}
