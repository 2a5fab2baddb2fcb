//! The health endpoint of a real service process: live while it runs, ready only once it
//! has provisioned its NATS resources and while its connection holds.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use lathe_tests::*;

/// `GET path` on the health endpoint: the status code, or None when nothing listens.
fn get(port: u16, path: &str) -> Option<u16> {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    response.split_whitespace().nth(1)?.parse().ok()
}

fn wait_for(port: u16, path: &str, status: u16, within: Duration) {
    let deadline = Instant::now() + within;
    loop {
        let got = get(port, path);
        if got == Some(status) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{path}: expected {status}, last answer {got:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_follows_provisioning_and_the_nats_connection() {
    let mut s = stack().await;
    let port = lathe_testkit::free_port();
    let addr = format!("127.0.0.1:{port}");
    let mut trainer = spawn_service(
        "lathe-trainer",
        &s.server.url(),
        &[("LATHE_HEALTH_ADDR", &addr)],
    );
    wait_for(port, "/livez", 200, Duration::from_secs(30));
    wait_for(port, "/readyz", 200, Duration::from_secs(30));

    // The server goes away: the service stays live but is no longer ready.
    s.server.stop();
    wait_for(port, "/readyz", 503, Duration::from_secs(30));
    assert_eq!(get(port, "/livez"), Some(200));

    // It comes back: ready again, without a restart of the service.
    s.server.start_again();
    wait_for(port, "/readyz", 200, Duration::from_secs(30));
    assert_eq!(get(port, "/nope"), Some(404));
    trainer.kill().unwrap();
    trainer.wait().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_that_cannot_reach_nats_is_live_but_not_ready() {
    let port = lathe_testkit::free_port();
    let addr = format!("127.0.0.1:{port}");
    // Nothing listens on this NATS port.
    let nowhere = format!("nats://127.0.0.1:{}", lathe_testkit::free_port());
    let mut trainer = spawn_service("lathe-trainer", &nowhere, &[("LATHE_HEALTH_ADDR", &addr)]);
    wait_for(port, "/livez", 200, Duration::from_secs(30));
    assert_eq!(get(port, "/readyz"), Some(503));
    trainer.kill().unwrap();
    trainer.wait().unwrap();
}
