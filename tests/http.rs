//! The HTTP layer through the real binary: malformed input gets a clear
//! answer, limits hold, slow clients block nobody.

use std::io::Read;
use std::time::{Duration, Instant};

use crate::support::*;

#[test]
fn bare_lf_in_a_header_is_refused() {
    let server = Server::start();
    let got = request(
        server.addr,
        b"GET /a HTTP/1.1\r\nHost: t\r\nX-A: b\nX-B: c\r\n\r\n",
    );
    assert_eq!(got.status, 400);
    assert_eq!(got.text().lines().count(), 1);
    server.assert_serving();
}

#[test]
fn malformed_requests_get_a_status_and_a_reason() {
    let server = Server::start();
    let cases: &[(&[u8], u16)] = &[
        (b"POST /a HTTP/1.1\r\nHost: t\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n", 400),
        (b"POST /a HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: gzip\r\n\r\n", 400),
        (b"POST /a HTTP/1.1\r\nHost: t\r\nContent-Length: 1x\r\n\r\n", 400),
        (b"POST /a HTTP/1.1\r\nHost: t\r\nContent-Length: 99999999999999999999999999\r\n\r\n", 400),
        (b"GET /a HTTP/1.1\r\nHost: t\r\nX: a\x01b\r\n\r\n", 400),
        (b"GET /a HTTP/1.1\r\n\r\n", 400),
        (b"GARBAGE\r\n\r\n", 400),
        (b"GET /a%2Fb HTTP/1.1\r\nHost: t\r\n\r\n", 400),
        (b"GET /a HTTP/1.1\r\nHost: t\r\nExpect: telepathy\r\n\r\n", 417),
        (b"GET /a HTTP/1.1\r\nHost: t\r\nContent-Length: 2\r\n\r\nhi", 400),
        (b"GET /caf\xe9 HTTP/1.1\r\nHost: t\r\n\r\n", 400),
    ];
    for (raw, status) in cases {
        let got = request(server.addr, raw);
        assert_eq!(got.status, *status, "{}", String::from_utf8_lossy(raw));
        assert!(!got.text().trim().is_empty());
    }
    let raw_byte = request(server.addr, b"GET /caf\xe9 HTTP/1.1\r\nHost: t\r\n\r\n");
    assert!(raw_byte.text().contains("not UTF-8"), "{}", raw_byte.text());
    server.assert_serving();
}

#[test]
fn oversized_heads_get_414_and_431() {
    let server = Server::start();
    let long = format!("GET /{} HTTP/1.1\r\nHost: t\r\n\r\n", "a".repeat(9000));
    assert_eq!(request(server.addr, long.as_bytes()).status, 414);
    let many = format!(
        "GET /a HTTP/1.1\r\nHost: t\r\n{}\r\n",
        "X-A: b\r\n".repeat(101)
    );
    assert_eq!(request(server.addr, many.as_bytes()).status, 431);
    let big = format!(
        "GET /a HTTP/1.1\r\nHost: t\r\nX-A: {}\r\n\r\n",
        "b".repeat(70 * 1024)
    );
    assert_eq!(request(server.addr, big.as_bytes()).status, 431);
    server.assert_serving();
}

#[test]
fn malformed_chunked_body_refuses_the_producer_and_spares_the_consumer() {
    let server = Server::start();
    let mut consumer = connect(server.addr);
    send(&mut consumer, &get("/bad"));
    server.wait_parked(1);
    let got = request(
        server.addr,
        b"POST /bad HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
    );
    assert_eq!(got.status, 400);
    // The consumer saw nothing and waits for the next producer.
    let mut producer = connect(server.addr);
    send(&mut producer, &post("/bad", b"good"));
    assert_eq!(read_response(&mut consumer).unwrap().text(), "good");
}

#[test]
fn slow_header_client_blocks_nobody_and_is_closed() {
    let server = Server::start_with(&["--header-timeout", "1"]);
    let mut slow = connect(server.addr);
    send(&mut slow, b"GET /a HTTP/1.1\r\nHo");
    server.assert_serving();
    let started = Instant::now();
    let mut rest = Vec::new();
    let n = slow.read_to_end(&mut rest).unwrap_or(0);
    assert_eq!(n, 0, "a slow head is closed without an answer");
    assert!(started.elapsed() < patience(Duration::from_secs(5)));
}

#[test]
fn idle_keep_alive_connections_are_closed() {
    let server = Server::start_with(&["--idle-timeout", "0.5"]);
    let mut stream = connect(server.addr);
    send(&mut stream, b"OPTIONS * HTTP/1.1\r\nHost: t\r\n\r\n");
    assert_eq!(read_response(&mut stream).unwrap().status, 200);
    let mut rest = Vec::new();
    assert_eq!(stream.read_to_end(&mut rest).unwrap(), 0);
}

#[test]
fn connections_beyond_the_cap_get_503() {
    // Two waiters, one connection that looks at /status (kept open, so that
    // no closing connection races the count), and a third waiter fill the cap.
    let server = Server::start_with(&["--max-connections", "4"]);
    let mut held = Vec::new();
    for _ in 0..2 {
        let mut stream = connect(server.addr);
        send(&mut stream, &get("/cap"));
        held.push(stream);
    }
    let mut looker = connect(server.addr);
    let deadline = std::time::Instant::now() + *STEP;
    loop {
        send(&mut looker, &get("/status"));
        let status = read_response(&mut looker).unwrap();
        if json_counter(&status.text(), "parked_total") >= 2 {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{}", status.text());
        std::thread::sleep(Duration::from_millis(5));
    }
    let mut third = connect(server.addr);
    send(&mut third, &get("/cap"));
    held.push(third);
    let got = request(server.addr, &get("/cap"));
    assert_eq!(got.status, 503);
    drop(held);
    drop(looker);
    server.wait_hangups(2);
    server.assert_serving();
}

#[test]
fn pipelined_requests_are_answered_in_order() {
    let server = Server::start();
    let mut stream = connect(server.addr);
    send(&mut stream, b"GET /p?timeout=0 HTTP/1.1\r\nHost: t\r\n\r\nOPTIONS * HTTP/1.1\r\nHost: t\r\n\r\nGET /_/nothing HTTP/1.1\r\nHost: t\r\n\r\nGET /healthz HTTP/1.1\r\nHost: t\r\n\r\n");
    assert_eq!(read_response(&mut stream).unwrap().status, 408);
    assert_eq!(read_response(&mut stream).unwrap().status, 200);
    assert_eq!(read_response(&mut stream).unwrap().status, 404);
    assert_eq!(read_response(&mut stream).unwrap().text(), "ok\n");
}
