//! The one entry point: the counters of `/status`, and the request policy
//! every request passes (resumed receives, service workers, the headers
//! that never travel, the headers every response carries, stalled bodies).

use std::process::Command;
use std::thread;
use std::time::Duration;

use crate::support::*;

#[test]
fn status_counts_requests_waiters_and_pairs() {
    let server = Server::start();
    let status = request(server.addr, &get("/status"));
    assert_eq!(status.status, 200);
    assert_eq!(status.header("content-type"), Some("application/json"));
    let json = status.text();
    assert!(json.contains(&format!("\"version\":\"{}\"", env!("CARGO_PKG_VERSION"))));
    assert_eq!(json_counter(&json, "waiters"), 0);
    let mut consumer = connect(server.addr);
    send(&mut consumer, &get("/counted"));
    server.wait_parked(1);
    assert_eq!(server.counter("waiters"), 1);
    let producer = request(server.addr, &post("/counted", b"hello"));
    assert_eq!(producer.status, 200);
    assert_eq!(read_response(&mut consumer).unwrap().text(), "hello");
    let json = server.status();
    assert_eq!(json_counter(&json, "waiters"), 0, "{json}");
    assert_eq!(json_counter(&json, "pairs_total"), 1, "{json}");
    assert_eq!(json_counter(&json, "bytes_relayed_total"), 5, "{json}");
    // The consumer's request is counted once its thread has seen it through.
    server.wait_counter("2xx", 2);
    let timed_out = request(server.addr, &get("/counted?timeout=0"));
    assert_eq!(timed_out.status, 408);
    server.wait_counter("timeouts_total", 1);
}

/// Runs wget with `args` in `dir`, bounded in time and tries.
fn wget(dir: &std::path::Path, args: &[&str]) -> std::process::Output {
    let child = Command::new("wget")
        .args(["-q", "--tries=1", "--timeout=20"])
        .args(args)
        .current_dir(dir)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run wget");
    finish(child)
}

fn has_wget() -> bool {
    let found = Command::new("wget")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !found {
        eprintln!("SKIPPED: wget is not installed (`apt-get install wget`; .ci/run installs it)");
    }
    found
}

#[test]
fn a_resumed_receive_fails_visibly_and_consumes_nothing() {
    if !has_wget() {
        return;
    }
    let server = Server::start();
    let dir = temp_dir("resume");
    let mut producer = connect(server.addr);
    send(
        &mut producer,
        &post("/resume", b"the second message, whole"),
    );
    server.wait_parked(1);
    // wget resuming a cut transfer asks for the rest with Range: it must
    // fail, keeping its partial file, and the message must stay.
    std::fs::write(dir.join("resume"), b"the first mess").unwrap();
    let resumed = wget(&dir, &["-c", &server.url("/resume")]);
    assert_eq!(resumed.status.code(), Some(8), "{resumed:?}");
    assert_eq!(
        std::fs::read(dir.join("resume")).unwrap(),
        b"the first mess"
    );
    let out = dir.join("curl-out");
    std::fs::write(&out, b"partial").unwrap();
    let curl_resumed = curl(&[
        "-f",
        "-C",
        "-",
        "-o",
        out.to_str().unwrap(),
        &server.url("/resume"),
    ]);
    assert_eq!(curl_resumed.status.code(), Some(22), "{curl_resumed:?}");
    let refused = request(
        server.addr,
        b"GET /resume HTTP/1.1\r\nHost: t\r\nRange: bytes=100-\r\n\r\n",
    );
    assert_eq!(refused.status, 409);
    assert_eq!(refused.text().lines().count(), 1);
    // A media player's `bytes=0-` asks for all of it: served whole.
    let whole = request(
        server.addr,
        b"GET /resume HTTP/1.1\r\nHost: t\r\nRange: bytes=0-\r\n\r\n",
    );
    assert_eq!(whole.status, 200);
    assert_eq!(whole.text(), "the second message, whole");
    assert_eq!(read_response(&mut producer).unwrap().status, 200);
    // And a plain wget receives a message whole.
    let mut producer = connect(server.addr);
    send(&mut producer, &post("/resume", b"third"));
    server.wait_parked(2);
    let plain = wget(&dir, &["-O", "third", &server.url("/resume")]);
    assert!(plain.status.success(), "{plain:?}");
    assert_eq!(std::fs::read(dir.join("third")).unwrap(), b"third");
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn service_worker_scripts_are_refused() {
    let server = Server::start();
    let mut producer = connect(server.addr);
    send(&mut producer, &post("/sw.js", b"self.onfetch = steal;"));
    server.wait_parked(1);
    let refused = request(
        server.addr,
        b"GET /sw.js HTTP/1.1\r\nHost: t\r\nService-Worker: script\r\n\r\n",
    );
    assert_eq!(refused.status, 400);
    let got = request(server.addr, &get("/sw.js"));
    assert_eq!(got.text(), "self.onfetch = steal;");
    assert_eq!(read_response(&mut producer).unwrap().status, 200);
}

#[test]
fn headers_that_act_for_the_relays_origin_never_travel() {
    let server = Server::start();
    let mut producer = connect(server.addr);
    send(
        &mut producer,
        b"POST /hdr HTTP/1.1\r\nHost: t\r\nPatch-H-Title: kept\r\n\
          Patch-H-Set-Cookie: session=stolen\r\nPb-H-Service-Worker-Allowed: /\r\n\
          Patch-H-Strict-Transport-Security: max-age=99999999\r\n\
          Pb-H-Clear-Site-Data: \"*\"\r\nPatch-H-Alt-Svc: h2=\"evil:443\"\r\n\
          Patch-H-Access-Control-Allow-Credentials: true\r\n\
          Patch-H-X-Robots-Tag: all\r\nContent-Length: 2\r\n\r\nhi",
    );
    server.wait_parked(1);
    let got = request(server.addr, &get("/hdr"));
    assert_eq!(got.text(), "hi");
    assert_eq!(got.header("title"), Some("kept"));
    for name in [
        "set-cookie",
        "service-worker-allowed",
        "strict-transport-security",
        "clear-site-data",
        "alt-svc",
        "access-control-allow-credentials",
    ] {
        assert!(got.header(name).is_none(), "{name} travelled: {got:?}");
    }
    assert_eq!(got.header("x-robots-tag"), Some("none"));
    assert_eq!(got.header("x-content-type-options"), Some("nosniff"));
    assert_eq!(got.header("access-control-allow-origin"), Some("*"));
    // Every response carries them, refusals and endpoints included.
    for target in ["/_/nothing", "/status"] {
        let answer = request(server.addr, &get(target));
        assert_eq!(answer.header("x-robots-tag"), Some("none"), "{target}");
        assert_eq!(answer.header("x-content-type-options"), Some("nosniff"));
    }
}

#[test]
fn content_encoding_travels_with_the_body() {
    let server = Server::start();
    let dir = temp_dir("gzip");
    let text = "a line of text that compresses\n".repeat(100);
    std::fs::write(dir.join("page.txt"), &text).unwrap();
    let script = r#"gzip -k page.txt
curl -sf -H "Content-Encoding: gzip" -H "Content-Type: text/plain" --data-binary @page.txt.gz "http://$PC/page" &
curl -sf --compressed -o received.txt "http://$PC/page"
wait"#;
    let output = bash(&server, &dir, script);
    assert!(output.status.success(), "{output:?}");
    assert_eq!(
        std::fs::read_to_string(dir.join("received.txt")).unwrap(),
        text
    );
    let mut producer = connect(server.addr);
    send(
        &mut producer,
        b"POST /raw HTTP/1.1\r\nHost: t\r\nContent-Encoding: br\r\nContent-Length: 1\r\n\r\nx",
    );
    server.wait_parked(2);
    let got = request(server.addr, &get("/raw"));
    assert_eq!(got.header("content-encoding"), Some("br"));
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn the_cors_origin_comes_from_the_configuration() {
    let server = Server::start_with(&["--cors-origin", "https://example.org"]);
    for target in ["/status", "/_/x", "/a?timeout=0"] {
        let got = request(server.addr, &get(target));
        assert_eq!(
            got.header("access-control-allow-origin"),
            Some("https://example.org"),
            "{target}"
        );
    }
    let server = Server::start_with(&["--cors-origin", ""]);
    let got = request(server.addr, &get("/status"));
    assert!(got.header("access-control-allow-origin").is_none());
}

#[test]
fn a_producer_whose_body_stalls_gets_408_and_the_consumer_waits_on() {
    let server = Server::start_with(&["--idle-timeout", "1"]);
    let mut consumer = connect(server.addr);
    send(&mut consumer, &get("/stall"));
    server.wait_parked(1);
    let mut producer = connect(server.addr);
    send(
        &mut producer,
        b"POST /stall HTTP/1.1\r\nHost: t\r\nContent-Length: 1000000\r\n\r\n",
    );
    let answer = read_response(&mut producer).expect("an answer, not a dropped connection");
    assert_eq!(answer.status, 408);
    assert!(answer.text().contains("stalled"), "{}", answer.text());
    // The consumer saw nothing and takes the next producer's message.
    thread::sleep(Duration::from_millis(100));
    let sent = request(server.addr, &post("/stall", b"after the stall"));
    assert_eq!(sent.status, 200);
    assert_eq!(
        read_response(&mut consumer).unwrap().text(),
        "after the stall"
    );
}
