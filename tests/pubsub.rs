//! Pubsub channels: publishing without waiting, a copy for every subscriber,
//! retention and cursors that lose nothing, streams (raw, SSE, NDJSON), and
//! subscribers that are slow or gone.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::thread;
use std::time::Duration;

use crate::support::*;

/// Publishes `body` on `path` over `stream` (keep-alive); returns the id.
fn publish_on(stream: &mut TcpStream, path: &str, body: &[u8]) -> u64 {
    send(stream, &post(path, body));
    let response = read_response(stream).expect("publish answered");
    assert_eq!(response.status, 200, "{}", response.text());
    response.patch_id()
}

/// Publishes `body` on `path` on a connection of its own.
fn publish(server: &Server, path: &str, body: &[u8]) -> u64 {
    publish_on(&mut connect(server.addr), path, body)
}

/// Opens a streaming subscription with `extra` request headers.
fn subscribe(server: &Server, target: &str, extra: &str) -> (Response, Chunks) {
    let mut stream = connect(server.addr);
    send(
        &mut stream,
        format!("GET {target} HTTP/1.1\r\nHost: test\r\n{extra}\r\n").as_bytes(),
    );
    Chunks::start(stream)
}

#[test]
fn every_waiting_get_gets_a_copy_with_the_headers() {
    let server = Server::start();
    let waiters: Vec<TcpStream> = (0..2)
        .map(|_| {
            let mut stream = connect(server.addr);
            send(&mut stream, &get("/pubsub/alerts"));
            stream
        })
        .collect();
    server.wait_parked(2);
    let answer = request(
        server.addr,
        b"POST /pubsub/alerts HTTP/1.1\r\nHost: t\r\nPatch-H-Title: Build failed\r\n\
          Patch-H-Patch-Id: 99\r\nPatch-H-Access-Control-Allow-Origin: https://evil\r\n\
          Content-Type: text/plain\r\nContent-Length: 9\r\n\r\ndisk full",
    );
    assert_eq!(answer.status, 200);
    assert_eq!(answer.header("patch-subscribers"), Some("2"));
    assert!(answer.body.is_empty());
    for mut waiter in waiters {
        let got = read_response(&mut waiter).unwrap();
        assert_eq!(got.status, 200);
        assert_eq!(got.text(), "disk full");
        assert_eq!(got.header("title"), Some("Build failed"));
        assert_eq!(got.header("content-type"), Some("text/plain"));
        assert_eq!(got.header("patch-id"), answer.header("patch-id"));
        // The relay's own headers cannot be faked by a publisher.
        for name in ["patch-id", "access-control-allow-origin"] {
            let count = got
                .headers
                .iter()
                .filter(|(n, _)| n.eq_ignore_ascii_case(name));
            assert_eq!(count.count(), 1, "{name}: {:?}", got.headers);
        }
    }
    // Nobody waiting: publishing still returns at once.
    let alone = request(server.addr, &post("/pubsub/alerts", b"x"));
    assert_eq!(alone.header("patch-subscribers"), Some("0"));
    assert_eq!(alone.patch_id(), answer.patch_id() + 1);
}

#[test]
fn queue_paths_with_pubsub_true_and_get_with_body_publish() {
    let server = Server::start();
    let id = request(server.addr, &get("/jobs?pubsub=true&body=hello+world")).patch_id();
    let got = request(
        server.addr,
        &get(&format!("/jobs?pubsub=1&after={}", id - 1)),
    );
    assert_eq!(got.text(), "hello world");
    assert_eq!(
        got.header("content-type"),
        Some("text/plain; charset=utf-8")
    );
    // The queue /jobs is another channel: nothing waits there.
    let queue = request(server.addr, &get("/jobs?timeout=0"));
    assert_eq!(queue.status, 408);
}

#[test]
fn a_get_without_a_message_in_time_is_408_never_an_empty_200() {
    let server = Server::start();
    let got = request(server.addr, &get("/pubsub/quiet?timeout=0.2"));
    assert_eq!(got.status, 408);
    assert!(got.text().contains("no message"));
    // An empty message is a real message.
    let id = publish(&server, "/pubsub/quiet", b"");
    let got = request(
        server.addr,
        &get(&format!("/pubsub/quiet?after={}", id - 1)),
    );
    assert_eq!((got.status, got.body.len()), (200, 0));
    let got = request(server.addr, &get("/pubsub/quiet?after=x"));
    assert_eq!(got.status, 400);
}

#[test]
fn cursors_resume_and_evictions_are_reported_as_missed() {
    let server = Server::start_with(&["--pubsub-retain-count", "3"]);
    let ids: Vec<u64> = (0..10)
        .map(|i| publish(&server, "/pubsub/log", format!("m{i}").as_bytes()))
        .collect();
    for pair in ids.windows(2) {
        assert_eq!(pair[1], pair[0] + 1);
    }
    let at = |after: u64| request(server.addr, &get(&format!("/pubsub/log?after={after}")));
    let got = at(ids[8]);
    assert_eq!(
        (got.text(), got.header("patch-missed")),
        ("m9".into(), None)
    );
    let got = at(ids[0]);
    assert_eq!(got.text(), "m7");
    assert_eq!(got.header("patch-missed"), Some("6"));
    let got = at(0);
    assert_eq!(got.text(), "m7");
    assert_eq!(got.header("patch-missed"), Some("7"));
    // After the newest: wait for the next one.
    let mut waiter = connect(server.addr);
    send(&mut waiter, &get(&format!("/pubsub/log?after={}", ids[9])));
    server.wait_parked(1);
    publish(&server, "/pubsub/log", b"m10");
    assert_eq!(read_response(&mut waiter).unwrap().text(), "m10");
}

#[test]
fn a_cursor_beyond_every_id_given_waits_for_the_next_message() {
    let server = Server::start();
    let mut waiter = connect(server.addr);
    send(&mut waiter, &get("/pubsub/new?after=99999999999999999"));
    server.wait_parked(1);
    let id = publish(&server, "/pubsub/new", b"fresh");
    let got = read_response(&mut waiter).unwrap();
    assert_eq!(
        (got.text(), got.header("patch-missed")),
        ("fresh".into(), None)
    );
    assert_eq!(got.patch_id(), id);
}

#[test]
fn oversized_messages_are_refused_with_413() {
    let server = Server::start_with(&["--pubsub-max-message", "1000"]);
    assert_eq!(
        request(server.addr, &post("/pubsub/big", &[b'x'; 1000])).status,
        200
    );
    assert_eq!(
        request(server.addr, &post("/pubsub/big", &[b'x'; 1001])).status,
        413
    );
    // Refused on its declared length, before the body is asked for.
    let mut stream = connect(server.addr);
    send(
        &mut stream,
        b"POST /pubsub/big HTTP/1.1\r\nHost: t\r\nExpect: 100-continue\r\nContent-Length: 5000000000\r\n\r\n",
    );
    assert_eq!(read_response(&mut stream).unwrap().status, 413);
    // A chunked body is counted as it arrives.
    let mut stream = connect(server.addr);
    let mut body =
        b"POST /pubsub/big HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
    for _ in 0..3 {
        body.extend_from_slice(b"1f4\r\n");
        body.extend_from_slice(&[b'y'; 500]);
        body.extend_from_slice(b"\r\n");
    }
    body.extend_from_slice(b"0\r\n\r\n");
    send(&mut stream, &body);
    let refused = read_response(&mut stream).unwrap();
    assert_eq!(refused.status, 413);
    assert!(refused.text().contains("--pubsub-max-message"));
    // Nothing of them was published.
    let got = request(server.addr, &get("/pubsub/big?after=0"));
    assert_eq!(got.body.len(), 1000);
    assert_eq!(
        request(
            server.addr,
            &get(&format!("/pubsub/big?after={}&timeout=0", got.patch_id()))
        )
        .status,
        408
    );
}

/// The issue's lossless loop: a bash subscriber with a cursor that sleeps
/// 50–200 ms between requests gets all of 500 messages published at random
/// intervals, in order, once each. Retention is raised to hold the backlog
/// of a subscriber that falls 500 behind.
#[test]
fn a_bash_loop_with_a_cursor_loses_nothing() {
    const COUNT: usize = 500;
    let server = Server::start_with(&["--pubsub-retain-count", "1000"]);
    let dir = temp_dir("pubsub-loop");
    let script = format!(
        r#"after=0; n=0
while [ $n -lt {COUNT} ]; do
  msg=$(curl -sf -D head.txt "$PC/pubsub/loop?after=$after") || {{ sleep 0.2; continue; }}
  after=$(grep '^Patch-Id:' head.txt | tr -dc 0-9)
  if grep -q '^Patch-Missed:' head.txt; then echo MISSED >> got.txt; fi
  echo "$msg" >> got.txt; n=$((n + 1))
  sleep $(printf '0.%03d' $((RANDOM % 151 + 50)))
done"#
    );
    let subscriber = spawn_bash(&server, &dir, &script);
    let mut stream = connect(server.addr);
    let mut x = 0x9e37_79b9_u64;
    for i in 0..COUNT {
        publish_on(&mut stream, "/pubsub/loop", format!("msg-{i}").as_bytes());
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        thread::sleep(Duration::from_millis(x % 40));
    }
    let output = finish_within(subscriber, Duration::from_secs(240));
    assert!(output.status.success(), "{output:?}");
    let got = std::fs::read_to_string(dir.join("got.txt")).unwrap();
    let expected: Vec<String> = (0..COUNT).map(|i| format!("msg-{i}")).collect();
    assert_eq!(got.lines().collect::<Vec<_>>(), expected);
}

#[test]
fn patchbay_persist_and_chat() {
    let server = Server::start();
    let (head, mut chat) = subscribe(
        &server,
        "/pubsub/chat?mime=text%2Fevent-stream&persist=true",
        "",
    );
    assert_eq!(head.status, 200);
    assert_eq!(head.header("content-type"), Some("text/event-stream"));
    assert_eq!(head.header("x-accel-buffering"), Some("no"));
    assert_eq!(head.header("cache-control"), Some("no-cache"));
    publish(&server, "/pubsub/chat", b"data: hello\n\n");
    publish(&server, "/pubsub/chat", b"data: two\ndata: lines\n\n");
    assert_eq!(
        chat.until(b"\n\n", 2),
        b"data: hello\n\ndata: two\ndata: lines\n\n"
    );
    // Raw streams add nothing: binary bodies arrive as they were sent.
    let binary = pattern(100_000, 3);
    publish(&server, "/pubsub/chat", &binary);
    while chat.pending.len() < binary.len() {
        let chunk = chat.next_chunk().unwrap().expect("more");
        chat.pending.extend_from_slice(&chunk);
    }
    assert!(chat.pending == binary);
}

#[test]
fn sse_streams_resume_with_last_event_id() {
    let server = Server::start_with(&["--keepalive-secs", "0.3"]);
    let (head, mut events) = subscribe(&server, "/pubsub/feed", "Accept: text/event-stream\r\n");
    assert_eq!(head.header("content-type"), Some("text/event-stream"));
    server.wait_streams(1);
    let first = publish(&server, "/pubsub/feed", b"one\ntwo");
    let mut stream = connect(server.addr);
    send(
        &mut stream,
        b"POST /pubsub/feed HTTP/1.1\r\nHost: t\r\nPatch-H-Title: Hi\r\nPatch-H-Id: 1\r\nContent-Length: 5\r\n\r\nthree",
    );
    assert_eq!(read_response(&mut stream).unwrap().status, 200);
    let got = String::from_utf8(events.until(b"\n\n", 2)).unwrap();
    assert_eq!(
        got,
        format!(
            "id: {first}\ndata: one\ndata: two\n\nid: {}\nTitle: Hi\ndata: three\n\n",
            first + 1
        )
    );
    // Silence brings a keepalive comment.
    assert_eq!(events.until(b"\n\n", 1), b": keepalive\n\n");
    drop(events);
    // Published while the client was away; it comes back as EventSource does.
    publish(&server, "/pubsub/feed", b"four");
    publish(&server, "/pubsub/feed", b"five");
    // EventSource reconnects to the same URL: Last-Event-ID wins over after=.
    let (_, mut events) = subscribe(
        &server,
        "/pubsub/feed?after=0",
        &format!(
            "Accept: text/event-stream\r\nLast-Event-ID: {}\r\n",
            first + 1
        ),
    );
    let got = String::from_utf8(events.until(b"\n\n", 2)).unwrap();
    assert_eq!(
        got,
        format!(
            "id: {}\ndata: four\n\nid: {}\ndata: five\n\n",
            first + 2,
            first + 3
        )
    );
}

#[test]
fn ndjson_streams_carry_text_binary_and_keepalives() {
    let server = Server::start_with(&["--keepalive-secs", "0.3"]);
    let first = publish(&server, "/pubsub/nd", b"say \"hi\"\n");
    publish(&server, "/pubsub/nd", &[0xff, 0x00, 0x10]);
    let (head, mut lines) = subscribe(&server, "/pubsub/nd?format=ndjson&after=0", "");
    assert_eq!(head.header("content-type"), Some("application/x-ndjson"));
    let text = String::from_utf8(lines.until(b"\n", 2)).unwrap();
    let text: Vec<&str> = text.lines().collect();
    assert!(
        text[0].starts_with(&format!("{{\"id\":{first},\"time\":")),
        "{}",
        text[0]
    );
    assert!(
        text[0].ends_with(r#""content_type":"application/octet-stream","body":"say \"hi\"\n"}"#),
        "{}",
        text[0]
    );
    assert!(
        text[1].ends_with(r#""encoding":"base64","body":"/wAQ"}"#),
        "{}",
        text[1]
    );
    assert_eq!(lines.until(b"\n", 1), b"{\"event\":\"keepalive\"}\n");
}

/// 100 streaming subscribers each get every one of 1,000 messages, in order.
/// Retention holds the whole burst, so that a subscriber thread the
/// scheduler leaves behind catches up instead of skipping.
#[test]
fn a_hundred_subscribers_each_get_a_thousand_messages() {
    const SUBSCRIBERS: usize = 100;
    const MESSAGES: usize = 1000;
    let server = Server::start_with(&["--pubsub-retain-count", "1000"]);
    let readers: Vec<_> = (0..SUBSCRIBERS)
        .map(|_| {
            let (_, mut chunks) = subscribe(&server, "/pubsub/fan?persist=true", "");
            thread::spawn(move || chunks.until(b"\n", MESSAGES))
        })
        .collect();
    server.wait_streams(SUBSCRIBERS as u64);
    let mut stream = connect(server.addr);
    for i in 0..MESSAGES {
        send(
            &mut stream,
            &post("/pubsub/fan", format!("{i:04}\n").as_bytes()),
        );
        let answer = read_response(&mut stream).unwrap();
        assert_eq!(answer.header("patch-subscribers"), Some("100"));
    }
    let expected: Vec<u8> = (0..MESSAGES)
        .flat_map(|i| format!("{i:04}\n").into_bytes())
        .collect();
    for reader in readers {
        assert!(reader.join().expect("reader") == expected);
    }
}

/// A subscriber that stops reading: the publisher and another subscriber go
/// on at full pace, and the server's memory stays within the retention caps
/// although 64 MiB are published past the stalled one.
#[test]
fn a_stalled_subscriber_slows_nobody_and_holds_no_memory() {
    let server = Server::start_with(&[
        "--pubsub-retain-bytes",
        "4M",
        "--pubsub-memory",
        "8M",
        "--idle-timeout",
        "120",
    ]);
    let stalled = connect(server.addr);
    (&stalled)
        .write_all(b"GET /pubsub/big?persist=true HTTP/1.1\r\nHost: t\r\n\r\n")
        .unwrap();
    let (_, mut reader) = subscribe(&server, "/pubsub/big?persist=true", "");
    server.wait_streams(2);
    let message = pattern(64 << 10, 5);
    let mut publisher = connect(server.addr);
    for _ in 0..1024 {
        publish_on(&mut publisher, "/pubsub/big", &message);
        let mut got = Vec::new();
        while got.len() < message.len() {
            got.extend_from_slice(&reader.next_chunk().unwrap().expect("more"));
        }
        assert!(got == message);
    }
    let peak = status_kib(server.pid(), "VmHWM");
    // Under qemu-user the figure is the emulator's, with its translation
    // cache: a fixed 16 MiB more is allowed there.
    let limit = if is_emulated() { 48 << 10 } else { 32 << 10 };
    assert!(peak < limit, "peak RSS {peak} KiB");
    // The stalled subscriber was never dropped for being slow: it reads on.
    let mut first = [0u8; 64];
    (&stalled).read_exact(&mut first).unwrap();
    assert!(first.starts_with(b"HTTP/1.1 200 OK"));
}

/// Streams that stopped reading in the middle of a large binary message
/// each hold a small buffer, not the encoded message.
#[test]
fn stalled_streams_of_a_large_message_hold_little_memory() {
    const STREAMS: usize = 50;
    let server = Server::start_with(&["--idle-timeout", "120"]);
    publish(&server, "/pubsub/blob", &pattern(1 << 20, 9));
    let before = status_kib(server.pid(), "VmRSS");
    let stalled: Vec<TcpStream> = (0..STREAMS)
        .map(|_| {
            let mut stream = connect(server.addr);
            send(&mut stream, &get("/pubsub/blob?format=ndjson&after=0"));
            stream
        })
        .collect();
    server.wait_streams(STREAMS as u64);
    // Let each stream write until its socket is full.
    thread::sleep(Duration::from_millis(500));
    let grown = status_kib(server.pid(), "VmRSS").saturating_sub(before);
    assert!(
        grown < 24 << 10,
        "{STREAMS} stalled streams grew RSS by {grown} KiB"
    );
    drop(stalled);
}

#[test]
fn delete_ends_waiters_and_streams_and_drops_messages() {
    let server = Server::start();
    publish(&server, "/ns/pubsub/a", b"kept");
    let mut waiter = connect(server.addr);
    send(&mut waiter, &get("/ns/pubsub/b"));
    let (_, mut stream) = subscribe(&server, "/ns/pubsub/c?format=sse", "");
    server.wait_parked(1);
    server.wait_streams(1);
    let deleted = request(server.addr, b"DELETE /ns HTTP/1.1\r\nHost: t\r\n\r\n");
    assert_eq!(
        deleted.text(),
        "deleted 3 channels; 2 waiters answered 410\n"
    );
    assert_eq!(read_response(&mut waiter).unwrap().status, 410);
    assert_eq!(stream.next_chunk().unwrap(), None);
    let got = request(server.addr, &get("/ns/pubsub/a?after=0&timeout=0"));
    assert_eq!(got.status, 408);
}

#[test]
fn shutdown_answers_waiters_and_ends_streams() {
    let mut server = Server::start();
    let mut waiter = connect(server.addr);
    send(&mut waiter, &get("/pubsub/s"));
    let (_, mut stream) = subscribe(&server, "/pubsub/s?format=ndjson", "");
    server.wait_parked(1);
    server.wait_streams(1);
    server.signal(libc::SIGTERM);
    assert_eq!(read_response(&mut waiter).unwrap().status, 503);
    assert_eq!(stream.next_chunk().unwrap(), None);
    let status = server
        .wait_exit(patience(Duration::from_secs(5)))
        .expect("exited");
    assert!(status.success());
}
