//! TLS to the central broker (Mosquitto with a test CA made here with rcgen): the right
//! CA works; a wrong CA is a clear error in the log and nothing is sent, never a fallback
//! to plain TCP. A broker that requires client certificates accepts the gateway's
//! configured certificate and refuses it without one.

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair, SanType};
use rumqttc::QoS;

struct Pki {
    ca_pem: String,
    server_pem: String,
    server_key: String,
    /// A client certificate the CA signed (for brokers that require one).
    client_pem: String,
    client_key: String,
}

fn make_pki() -> Pki {
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "branch-gateway test CA");
    let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().unwrap()).unwrap();
    let mut server_params = CertificateParams::new(vec!["localhost".to_owned()]).unwrap();
    server_params
        .subject_alt_names
        .push(SanType::IpAddress([127, 0, 0, 1].into()));
    let server_key = KeyPair::generate().unwrap();
    let server = server_params.signed_by(&server_key, &ca).unwrap();
    let mut client_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    client_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "gw-branch-test");
    let client_key = KeyPair::generate().unwrap();
    let client = client_params.signed_by(&client_key, &ca).unwrap();
    Pki {
        ca_pem: ca.pem(),
        server_pem: server.pem(),
        server_key: server_key.serialize_pem(),
        client_pem: client.pem(),
        client_key: client_key.serialize_pem(),
    }
}

/// Mosquitto with a TLS listener (for the gateway) and a plain one (for the consumer).
fn start_tls_central(
    dir: &Path,
    pki: &Pki,
    tls_port: u16,
    plain_port: u16,
    require_client_cert: bool,
) -> Killed {
    std::fs::write(dir.join("ca.pem"), &pki.ca_pem).unwrap();
    std::fs::write(dir.join("server.pem"), &pki.server_pem).unwrap();
    std::fs::write(dir.join("server.key"), &pki.server_key).unwrap();
    let conf = dir.join("central.conf");
    std::fs::write(
        &conf,
        format!(
            "user root\nallow_anonymous true\nlistener {tls_port} 127.0.0.1\ncafile {d}/ca.pem\ncertfile {d}/server.pem\nkeyfile {d}/server.key\n\
             require_certificate {require_client_cert}\nlistener {plain_port} 127.0.0.1\n",
            d = dir.display()
        ),
    )
    .unwrap();
    let child = Killed(
        Command::new("mosquitto")
            .arg("-c")
            .arg(&conf)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    for port in [tls_port, plain_port] {
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "mosquitto did not listen");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    child
}

fn tls_upstream(tls_port: u16, prefix: &str, ca_file: &Path) -> String {
    format!(
        "[upstream]\nurl = \"mqtts://127.0.0.1:{tls_port}\"\nclient_id = \"gw-tls-{tls_port}\"\ntopic_prefix = \"{prefix}\"\npush_summaries = false\nca_file = \"{}\"\n",
        ca_file.display()
    )
}

/// A device's message is acknowledged and buffered; the gateway logs that it cannot reach
/// the central broker, and nothing arrives there.
async fn refused_and_still_buffered(
    branch: &Branch,
    gw: &Gateway,
    id: &str,
    consumer: &mut Consumer,
) {
    let mut c = connect(branch.port, id, &format!("{id}-pw")).await;
    c.telemetry(id, 1).await;
    assert_eq!(c.pubacks(1, Duration::from_secs(10)).await, 1);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !gw.log().contains("cannot reach the central broker") {
        assert!(Instant::now() < deadline, "{}", gw.log());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        tokio::time::timeout(Duration::from_secs(2), consumer.rx.recv())
            .await
            .is_err(),
        "nothing reaches the central broker"
    );
    assert_eq!(
        branch.count("SELECT COUNT(*) FROM messages WHERE delivered_ms IS NULL"),
        1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tls_with_the_right_ca_delivers_and_a_wrong_ca_sends_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let pki = make_pki();
    let (tls_port, plain_port) = (free_port(), free_port());
    let central = start_tls_central(dir.path(), &pki, tls_port, plain_port, false);
    let mut consumer = Consumer::start(plain_port, "library/tls").await;

    // The right CA: messages arrive.
    let ca_file = dir.path().join("ca.pem");
    let branch = Branch::with_extra(
        &[device("t1", "test-sensor")],
        &tls_upstream(tls_port, "library/tls", &ca_file),
    );
    let gw = branch.start();
    let mut c = connect(branch.port, "t1", "t1-pw").await;
    for n in 0..20 {
        c.client
            .publish(
                "devices/t1/telemetry",
                QoS::AtLeastOnce,
                false,
                format!(r#"{{"n":{n},"device":"t1"}}"#),
            )
            .await
            .unwrap();
    }
    assert_eq!(c.pubacks(20, Duration::from_secs(10)).await, 20);
    let mut data = 0;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while data < 20 {
        match tokio::time::timeout_at(deadline, consumer.rx.recv()).await {
            Ok(Some((topic, _))) if topic.contains("/devices/t1/") => data += 1,
            Ok(Some(_)) => {}
            _ => break,
        }
    }
    assert_eq!(data, 20, "all 20 delivered over TLS\n{}", gw.log());
    let (ok, _) = gw.terminate();
    assert!(ok.success());

    // A CA that did not sign the broker's certificate: a clear error, nothing sent.
    let other = make_pki();
    let wrong_ca = dir.path().join("wrong-ca.pem");
    std::fs::write(&wrong_ca, &other.ca_pem).unwrap();
    let branch = Branch::with_extra(
        &[device("t2", "test-sensor")],
        &tls_upstream(tls_port, "library/tls-wrong", &wrong_ca),
    );
    let mut wrong_consumer = Consumer::start(plain_port, "library/tls-wrong").await;
    let gw = branch.start();
    refused_and_still_buffered(&branch, &gw, "t2", &mut wrong_consumer).await;
    let log = gw.log();
    assert!(
        log.contains("UnknownIssuer") || log.contains("invalid peer certificate"),
        "the log names the certificate problem:\n{log}"
    );
    let (ok, _) = gw.terminate();
    assert!(ok.success());

    // A CA file that is not PEM: the gateway refuses to start, naming the key and file.
    let garbage = dir.path().join("garbage.pem");
    std::fs::write(&garbage, "not a certificate").unwrap();
    let branch = Branch::with_extra(
        &[device("t3", "test-sensor")],
        &tls_upstream(tls_port, "library/tls-bad", &garbage),
    );
    let out = run_bounded(
        Command::new(BIN)
            .args(["run", "--config"])
            .arg(branch.config()),
        Duration::from_secs(20),
    );
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("upstream.ca_file") && err.contains("garbage.pem"),
        "{err}"
    );
    drop(central);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_broker_that_requires_client_certificates_accepts_the_configured_one() {
    let dir = tempfile::tempdir().unwrap();
    let pki = make_pki();
    let (tls_port, plain_port) = (free_port(), free_port());
    let central = start_tls_central(dir.path(), &pki, tls_port, plain_port, true);
    std::fs::write(dir.path().join("client.pem"), &pki.client_pem).unwrap();
    std::fs::write(dir.path().join("client.key"), &pki.client_key).unwrap();
    let ca_file = dir.path().join("ca.pem");

    // With the certificate: delivered.
    let mut consumer = Consumer::start(plain_port, "library/mtls").await;
    let upstream = format!(
        "{}client_cert = \"{}\"\nclient_key = \"{}\"\n",
        tls_upstream(tls_port, "library/mtls", &ca_file),
        dir.path().join("client.pem").display(),
        dir.path().join("client.key").display()
    );
    let branch = Branch::with_extra(&[device("m1", "test-sensor")], &upstream);
    let gw = branch.start();
    let mut c = connect(branch.port, "m1", "m1-pw").await;
    for n in 0..10 {
        c.client
            .publish(
                "devices/m1/telemetry",
                QoS::AtLeastOnce,
                false,
                format!(r#"{{"n":{n},"device":"m1"}}"#),
            )
            .await
            .unwrap();
    }
    assert_eq!(c.pubacks(10, Duration::from_secs(10)).await, 10);
    let mut data = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while data.len() < 10 {
        match tokio::time::timeout_at(deadline, consumer.rx.recv()).await {
            // Live or backfill topic, depending on when the link came up.
            Ok(Some((topic, payload))) if topic.ends_with("/devices/m1/telemetry") => {
                let v: serde_json::Value = serde_json::from_str(&payload).unwrap();
                data.push(v["data"]["n"].as_u64().unwrap());
            }
            Ok(Some(_)) => {}
            _ => break,
        }
    }
    // (Order per topic is tested in tests/forwarding.rs; here, that all ten arrive.)
    data.sort_unstable();
    assert_eq!(data, (0..10).collect::<Vec<u64>>(), "{}", gw.log());
    let (ok, _) = gw.terminate();
    assert!(ok.success());

    // Without one: the broker refuses the handshake; logged, nothing sent, still buffered.
    let mut refused_consumer = Consumer::start(plain_port, "library/mtls-none").await;
    let branch = Branch::with_extra(
        &[device("m2", "test-sensor")],
        &tls_upstream(tls_port, "library/mtls-none", &ca_file),
    );
    let gw = branch.start();
    refused_and_still_buffered(&branch, &gw, "m2", &mut refused_consumer).await;
    let (ok, _) = gw.terminate();
    assert!(ok.success());
    drop(central);
}
