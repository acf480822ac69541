//! Queue channels through the real binary: pairing order, hang-ups on either
//! side, streaming, timeouts, DELETE, HEAD.

use std::io::Read;
use std::net::Shutdown;
use std::thread;
use std::time::Duration;

use crate::support::*;

#[test]
fn httpipe_readme_example_with_curl() {
    let server = Server::start();
    let url = server.url("/channels/v1/do_work");
    let producer = spawn_curl(&["-XPOST", &url, "-d", "hello"]);
    server.wait_parked(1);
    let consumer = curl(&["-XGET", &url]);
    assert_eq!(String::from_utf8_lossy(&consumer.stdout), "hello");
    let producer = finish(producer);
    assert!(producer.status.success(), "{producer:?}");
}

#[test]
fn producers_are_served_first_come_first_served() {
    let server = Server::start();
    let mut producers = Vec::new();
    for i in 0..4 {
        let mut stream = connect(server.addr);
        send(
            &mut stream,
            &post("/fifo", format!("message {i}").as_bytes()),
        );
        server.wait_parked(i as u64 + 1);
        producers.push(stream);
    }
    for i in 0..4 {
        let got = request(server.addr, &get("/fifo"));
        assert_eq!(got.text(), format!("message {i}"));
    }
    for mut producer in producers {
        assert_eq!(read_response(&mut producer).unwrap().status, 200);
    }
}

#[test]
fn consumers_are_served_first_come_first_served() {
    let server = Server::start();
    let mut consumers = Vec::new();
    for i in 0..4 {
        let mut stream = connect(server.addr);
        send(&mut stream, &get("/fifo"));
        server.wait_parked(i as u64 + 1);
        consumers.push(stream);
    }
    for i in 0..4 {
        let got = request(
            server.addr,
            &post("/fifo", format!("message {i}").as_bytes()),
        );
        assert_eq!(got.status, 200);
    }
    for (i, mut consumer) in consumers.into_iter().enumerate() {
        assert_eq!(
            read_response(&mut consumer).unwrap().text(),
            format!("message {i}")
        );
    }
}

#[test]
fn two_hundred_parked_producers_are_all_delivered() {
    let server = Server::start();
    let mut producers = Vec::new();
    for i in 0..200 {
        let mut stream = connect(server.addr);
        send(
            &mut stream,
            &post(&format!("/many/{i}"), format!("body {i}").as_bytes()),
        );
        producers.push(stream);
    }
    server.wait_parked(200);
    let mut consumers = Vec::new();
    for i in 0..200 {
        let mut stream = connect(server.addr);
        send(&mut stream, &get(&format!("/many/{i}")));
        consumers.push(stream);
    }
    for (i, mut consumer) in consumers.into_iter().enumerate() {
        assert_eq!(
            read_response(&mut consumer).unwrap().text(),
            format!("body {i}")
        );
    }
    for mut producer in producers {
        assert_eq!(read_response(&mut producer).unwrap().status, 200);
    }
}

#[test]
fn hung_up_consumer_is_never_paired() {
    let server = Server::start();
    let mut gone = connect(server.addr);
    send(&mut gone, &get("/jobs"));
    server.wait_parked(1);
    drop(gone);
    // The producer must skip the dead consumer, park, and reach the fresh one.
    let mut producer = connect(server.addr);
    send(&mut producer, &post("/jobs", b"job 1"));
    server.wait_parked(2);
    let got = request(server.addr, &get("/jobs"));
    assert_eq!(got.text(), "job 1");
    assert_eq!(read_response(&mut producer).unwrap().status, 200);
    assert_eq!(server.counter("hangups_total"), 1, "{}", server.log());
}

#[test]
fn hung_up_producer_never_delivers() {
    let server = Server::start();
    let mut gone = connect(server.addr);
    send(&mut gone, &post("/jobs", b"from a producer that left"));
    server.wait_parked(1);
    drop(gone);
    // The consumer may be offered the dead producer; it must wait on instead.
    let mut consumer = connect(server.addr);
    send(&mut consumer, &get("/jobs"));
    thread::sleep(Duration::from_millis(100));
    let mut producer = connect(server.addr);
    send(&mut producer, &post("/jobs", b"fresh"));
    assert_eq!(read_response(&mut consumer).unwrap().text(), "fresh");
    assert_eq!(read_response(&mut producer).unwrap().status, 200);
}

#[test]
fn parked_waiters_whose_clients_left_are_swept() {
    let server = Server::start();
    let mut consumer = connect(server.addr);
    send(&mut consumer, &get("/swept"));
    let mut producer = connect(server.addr);
    send(&mut producer, &post("/other", b"x"));
    server.wait_parked(2);
    drop(consumer);
    drop(producer);
    // Each waiter checks its own client every 2 s and leaves when it is gone.
    server.wait_hangups(2);
}

#[test]
fn two_mib_body_from_curl_with_expect_arrives_intact() {
    let server = Server::start();
    let dir = temp_dir("two-mib");
    let data = pattern(2 << 20, 7);
    std::fs::write(dir.join("in"), &data).unwrap();
    let url = server.url("/big");
    let producer = spawn_curl(&[
        "-H",
        "Expect: 100-continue",
        "--data-binary",
        &format!("@{}", dir.join("in").display()),
        &url,
    ]);
    server.wait_parked(1);
    let consumer = curl(&[&url]);
    assert!(
        consumer.stdout == data,
        "body differs ({} bytes)",
        consumer.stdout.len()
    );
    assert!(finish(producer).status.success());
}

#[test]
fn continue_is_sent_only_when_a_consumer_arrives() {
    let server = Server::start();
    let mut producer = connect(server.addr);
    send(
        &mut producer,
        b"POST /c HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n",
    );
    server.wait_parked(1);
    producer
        .set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    let mut byte = [0u8; 1];
    assert!(
        producer.read(&mut byte).is_err(),
        "nothing may arrive before a consumer"
    );
    producer.set_read_timeout(Some(*STEP)).unwrap();
    let mut consumer = connect(server.addr);
    send(&mut consumer, &get("/c"));
    let (status, _) = read_head(&mut producer).unwrap();
    assert_eq!(status, 100);
    send(&mut producer, b"hello");
    assert_eq!(read_response(&mut consumer).unwrap().text(), "hello");
    assert_eq!(read_response(&mut producer).unwrap().status, 200);
}

fn sixty_four_mib(name: &str, upload: &[&str]) {
    let server = Server::start();
    let dir = temp_dir(name);
    let data = pattern(64 << 20, 64);
    let input = dir.join("in");
    let output = dir.join("out");
    std::fs::write(&input, &data).unwrap();
    let url = server.url("/stream");
    let script = format!(
        "curl -sS -f --max-time 60 {} '{url}' < '{}'",
        upload.join(" "),
        input.display()
    );
    let producer = std::process::Command::new("bash")
        .args(["-c", &script])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    server.wait_parked(1);
    let consumer = curl(&["-f", "-o", output.to_str().unwrap(), &url]);
    assert!(consumer.status.success(), "{consumer:?}");
    let producer = finish(producer);
    assert!(producer.status.success(), "{producer:?}");
    let got = std::fs::read(&output).unwrap();
    assert_eq!(got.len(), data.len());
    assert!(got == data, "64 MiB body differs");
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn sixty_four_mib_with_content_length_arrives_byte_identical() {
    sixty_four_mib("64-length", &["--data-binary", "@-"]);
}

#[test]
fn sixty_four_mib_chunked_arrives_byte_identical() {
    sixty_four_mib("64-chunked", &["-T", "-"]);
}

#[test]
fn consumer_gone_mid_transfer_gives_the_producer_no_2xx() {
    let server = Server::start();
    let mut consumer = connect(server.addr);
    send(&mut consumer, &get("/cut"));
    server.wait_parked(1);
    let mut producer = connect(server.addr);
    let length = 256u64 << 20;
    send(
        &mut producer,
        format!("POST /cut HTTP/1.1\r\nHost: t\r\nContent-Length: {length}\r\n\r\n").as_bytes(),
    );
    let writer = thread::spawn(move || {
        let chunk = vec![b'x'; 1 << 20];
        for _ in 0..256 {
            if std::io::Write::write_all(&mut producer, &chunk).is_err() {
                break;
            }
        }
        let _ = producer.shutdown(Shutdown::Write);
        read_response(&mut producer).map(|r| r.status)
    });
    let (status, _) = read_head(&mut consumer).unwrap();
    assert_eq!(status, 200);
    let mut some = vec![0u8; 1 << 20];
    consumer.read_exact(&mut some).unwrap();
    drop(consumer);
    let answer = writer.join().unwrap();
    assert!(
        !matches!(answer, Ok(200..=299)),
        "producer was told {answer:?}"
    );
    server.assert_serving();
}

#[test]
fn producer_gone_mid_transfer_cuts_the_consumer() {
    let server = Server::start();
    let mut consumer = connect(server.addr);
    send(&mut consumer, &get("/cut"));
    server.wait_parked(1);
    let mut producer = connect(server.addr);
    send(
        &mut producer,
        b"POST /cut HTTP/1.1\r\nHost: t\r\nContent-Length: 200000000000\r\n\r\npartial body",
    );
    let (status, headers) = read_head(&mut consumer).unwrap();
    assert_eq!(status, 200);
    assert!(headers.contains(&("Content-Length".to_owned(), "200000000000".to_owned())));
    drop(producer);
    let mut rest = Vec::new();
    let _ = consumer.read_to_end(&mut rest);
    assert_eq!(
        rest, b"partial body",
        "the consumer's connection ends after what was sent"
    );
    server.assert_serving();
}

#[test]
fn huge_content_length_then_hang_up_leaves_the_server_serving() {
    let server = Server::start();
    let mut producer = connect(server.addr);
    send(
        &mut producer,
        b"POST /huge HTTP/1.1\r\nHost: t\r\nContent-Length: 200000000000\r\n\r\n",
    );
    server.wait_parked(1);
    drop(producer);
    server.assert_serving();
    let got = request(server.addr, &get("/huge?timeout=0.3"));
    assert_eq!(got.status, 408, "the dead producer must not be delivered");
}

#[test]
fn timeout_gives_408_and_consumes_nothing() {
    let server = Server::start();
    let started = std::time::Instant::now();
    let producer = curl(&[
        "-s",
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}",
        "-d",
        "late",
        &server.url("/t?timeout=0.5"),
    ]);
    assert_eq!(String::from_utf8_lossy(&producer.stdout), "408");
    assert!(started.elapsed() >= Duration::from_millis(500));
    let consumer = request(server.addr, &get("/t?timeout=0.3"));
    assert_eq!(consumer.status, 408);
    assert!(consumer.text().ends_with('\n') && consumer.text().lines().count() == 1);
    let immediate = request(server.addr, &get("/t?timeout=0"));
    assert_eq!(immediate.status, 408);
}

#[test]
fn server_timeout_caps_the_wait() {
    let server = Server::start_with(&["--timeout", "0.3"]);
    let got = request(server.addr, &get("/t?timeout=100"));
    assert_eq!(got.status, 408);
}

#[test]
fn delete_ends_waiters_of_a_channel_and_a_namespace() {
    let server = Server::start();
    let mut waiters = Vec::new();
    for path in ["/channels/v1/a", "/channels/v1/b", "/channels/v2/a"] {
        let mut stream = connect(server.addr);
        send(&mut stream, &get(path));
        waiters.push(stream);
    }
    let mut producer = connect(server.addr);
    send(&mut producer, &post("/channels/v1/a", b"x"));
    // The producer pairs with the first consumer; three waiters remain.
    server.wait_parked(3);
    let _ = read_response(&mut producer);
    let mut solo = connect(server.addr);
    send(&mut solo, &get("/solo"));
    server.wait_parked(4);
    let deleted = request(server.addr, b"DELETE /solo HTTP/1.1\r\nHost: t\r\n\r\n");
    assert_eq!(deleted.status, 200);
    assert_eq!(read_response(&mut solo).unwrap().status, 410);
    let deleted = request(
        server.addr,
        b"DELETE /channels/v1 HTTP/1.1\r\nHost: t\r\n\r\n",
    );
    assert_eq!(deleted.status, 200);
    assert!(
        deleted.text().contains("1 waiters answered 410"),
        "{}",
        deleted.text()
    );
    assert_eq!(read_response(&mut waiters[0]).unwrap().text(), "x");
    assert_eq!(read_response(&mut waiters[1]).unwrap().status, 410);
    // /channels/v2 is not under /channels/v1.
    waiters[2]
        .set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    assert!(read_response(&mut waiters[2]).is_err());
}

#[test]
fn head_is_refused_and_consumes_nothing() {
    let server = Server::start();
    let mut producer = connect(server.addr);
    send(&mut producer, &post("/h1", b"kept"));
    server.wait_parked(1);
    let mut asker = connect(server.addr);
    send(&mut asker, b"HEAD /h1 HTTP/1.1\r\nHost: t\r\n\r\n");
    let (status, headers) = read_head(&mut asker).unwrap();
    assert_eq!(status, 405);
    assert!(headers.contains(&(
        "Allow".to_owned(),
        "GET, POST, PUT, DELETE, OPTIONS".to_owned()
    )));
    // No body follows the head of a HEAD response: the next response comes right after.
    send(&mut asker, b"OPTIONS * HTTP/1.1\r\nHost: t\r\n\r\n");
    assert_eq!(read_response(&mut asker).unwrap().status, 200);
    assert_eq!(request(server.addr, &get("/h1")).text(), "kept");
    assert_eq!(read_response(&mut producer).unwrap().status, 200);
}

#[test]
fn headers_travel_and_mime_overrides() {
    let server = Server::start();
    let mut producer = connect(server.addr);
    send(
        &mut producer,
        b"POST /hdr HTTP/1.1\r\nHost: t\r\nContent-Type: text/csv\r\nContent-Disposition: attachment; filename=\"a.csv\"\r\nPatch-H-Title: Build failed\r\nPb-H-X-Run: 42\r\nPatch-H-Connection: close\r\nPatch-H-Content-Length: 1\r\nContent-Length: 3\r\n\r\na,b",
    );
    server.wait_parked(1);
    let got = request(server.addr, &get("/hdr"));
    assert_eq!(got.header("content-type"), Some("text/csv"));
    assert_eq!(
        got.header("content-disposition"),
        Some("attachment; filename=\"a.csv\"")
    );
    assert_eq!(got.header("title"), Some("Build failed"));
    assert_eq!(got.header("x-run"), Some("42"));
    assert_eq!(got.header("content-length"), Some("3"));
    assert_eq!(got.header("access-control-allow-origin"), Some("*"));
    assert!(got.header("connection").is_none());
    assert_eq!(got.text(), "a,b");
    let mut producer = connect(server.addr);
    send(&mut producer, &post("/hdr", b"{}"));
    server.wait_parked(2);
    let got = request(server.addr, &get("/hdr?mime=application%2Fjson"));
    assert_eq!(got.header("content-type"), Some("application/json"));
}

#[test]
fn get_with_body_parameter_sends() {
    let server = Server::start();
    let producer = spawn_curl(&[&server.url("/q?body=hello+world%21")]);
    server.wait_parked(1);
    let got = request(server.addr, &get("/q"));
    assert_eq!(got.text(), "hello world!");
    assert_eq!(
        got.header("content-type"),
        Some("text/plain; charset=utf-8")
    );
    assert!(finish(producer).status.success());
    let producer = spawn_curl(&[&server.url("/q?method=post&body=second")]);
    server.wait_parked(2);
    assert_eq!(request(server.addr, &get("/q")).text(), "second");
    assert!(finish(producer).status.success());
}

#[test]
fn http_1_0_consumer_of_a_chunked_upload_gets_a_close_delimited_body() {
    let server = Server::start();
    let mut consumer = connect(server.addr);
    send(&mut consumer, b"GET /old HTTP/1.0\r\n\r\n");
    server.wait_parked(1);
    let mut producer = connect(server.addr);
    send(&mut producer, b"POST /old HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n");
    let got = read_response(&mut consumer).unwrap();
    assert_eq!(got.text(), "hello world");
    assert!(got.header("content-length").is_none() && got.header("transfer-encoding").is_none());
    assert_eq!(read_response(&mut producer).unwrap().status, 200);
}

#[test]
fn keep_alive_connections_carry_several_exchanges() {
    let server = Server::start();
    let mut producer = connect(server.addr);
    let mut consumer = connect(server.addr);
    for i in 0..20 {
        send(&mut consumer, &get("/ka"));
        send(&mut producer, &post("/ka", format!("n{i}").as_bytes()));
        assert_eq!(
            read_response(&mut consumer).unwrap().text(),
            format!("n{i}")
        );
        assert_eq!(read_response(&mut producer).unwrap().status, 200);
    }
}

/// A producer parked first is served by the consumer's thread (its message
/// is at hand) and sleeps on; its connection carries the next exchange.
#[test]
fn keep_alive_producers_parked_first_carry_several_exchanges() {
    let server = Server::start();
    let mut producer = connect(server.addr);
    let mut consumer = connect(server.addr);
    for i in 0..20 {
        send(
            &mut producer,
            &post("/ka-first", format!("n{i}").as_bytes()),
        );
        server.wait_parked(i + 1);
        send(&mut consumer, &get("/ka-first"));
        assert_eq!(
            read_response(&mut consumer).unwrap().text(),
            format!("n{i}")
        );
        assert_eq!(read_response(&mut producer).unwrap().status, 200);
    }
    // Both connections are counted as finished, neither as busy.
    server.wait_counter("2xx", 40);
}

/// A consumer that pipelines its next receive behind the first is woken for
/// each answer, and its connection carries on.
#[test]
fn a_consumer_that_pipelines_two_receives_gets_both() {
    let server = Server::start();
    let mut consumer = connect(server.addr);
    let mut both = get("/pipe");
    both.extend_from_slice(&get("/pipe"));
    send(&mut consumer, &both);
    server.wait_parked(1);
    assert_eq!(request(server.addr, &post("/pipe", b"one")).status, 200);
    assert_eq!(read_response(&mut consumer).unwrap().text(), "one");
    server.wait_parked(2);
    assert_eq!(request(server.addr, &post("/pipe", b"two")).status, 200);
    assert_eq!(read_response(&mut consumer).unwrap().text(), "two");
    send(&mut consumer, &get("/pipe?timeout=0"));
    assert_eq!(read_response(&mut consumer).unwrap().status, 408);
}

#[test]
fn options_is_a_cors_preflight() {
    let server = Server::start();
    let got = request(server.addr, b"OPTIONS /jobs HTTP/1.1\r\nHost: t\r\nAccess-Control-Request-Headers: content-type\r\n\r\n");
    assert_eq!(got.status, 200);
    assert_eq!(got.header("access-control-allow-origin"), Some("*"));
    assert_eq!(
        got.header("access-control-allow-headers"),
        Some("content-type")
    );
    assert!(
        got.header("access-control-allow-methods")
            .unwrap()
            .contains("POST")
    );
}

#[test]
fn reserved_paths_are_not_channels() {
    let server = Server::start();
    for path in [
        "/",
        "/healthz",
        "/favicon.ico",
        "/robots.txt",
        "/_/channels",
    ] {
        assert_eq!(request(server.addr, &get(path)).status, 200, "{path}");
    }
    for path in ["/_", "/_/events", "/_/x", "/huproxy", "/huproxy/x/22"] {
        assert_eq!(request(server.addr, &get(path)).status, 404, "{path}");
    }
    // Endpoints now: a notification with no backend, a tunnel without an access file.
    assert_eq!(request(server.addr, &get("/_/notify")).status, 503);
    assert_eq!(request(server.addr, &get("/u/a/_/ntfy")).status, 503);
    assert_eq!(request(server.addr, &get("/_/tunnel/h/22")).status, 403);
    // None of them parked anyone.
    assert_eq!(server.counter("parked_total"), 0);
    assert_eq!(request(server.addr, &get("/a/../b")).status, 400);
}

#[test]
fn producer_that_stopped_waiting_for_continue_and_left_never_delivers() {
    let server = Server::start();
    let mut gone = connect(server.addr);
    // Like curl after its 1 s expect timeout: the body follows without a 100.
    send(
        &mut gone,
        b"POST /e HTTP/1.1\r\nHost: t\r\nContent-Length: 4\r\nExpect: 100-continue\r\n\r\n",
    );
    server.wait_parked(1);
    send(&mut gone, b"lost");
    thread::sleep(Duration::from_millis(50));
    drop(gone);
    let got = request(server.addr, &get("/e?timeout=0.5"));
    assert_eq!(
        got.status, 408,
        "a producer that left must not deliver: {got:?}"
    );
}

#[test]
fn producer_that_left_behind_a_large_unread_body_never_delivers() {
    let server = Server::start();
    let mut gone = connect(server.addr);
    let body = vec![b'x'; 200_000];
    send(&mut gone, &post("/big-gone", &body));
    server.wait_parked(1);
    drop(gone);
    thread::sleep(Duration::from_millis(100));
    // Its hang-up hides behind the unread body, so the consumer's response
    // may already have started: it must end cut (or as 408), never as a 200.
    let mut consumer = connect(server.addr);
    send(&mut consumer, &get("/big-gone?timeout=1"));
    match read_response(&mut consumer) {
        Ok(got) => assert_eq!(
            got.status,
            408,
            "delivered {} bytes of a producer that left",
            got.body.len()
        ),
        Err(cut) => assert_eq!(cut.kind(), std::io::ErrorKind::UnexpectedEof, "{cut}"),
    }
}

#[test]
fn consumer_that_left_behind_a_pipelined_request_is_never_paired() {
    let server = Server::start();
    let mut gone = connect(server.addr);
    send(&mut gone, &get("/pipelined"));
    server.wait_parked(1);
    send(&mut gone, &get("/pipelined-next"));
    thread::sleep(Duration::from_millis(100));
    drop(gone);
    thread::sleep(Duration::from_millis(100));
    let got = request(server.addr, &post("/pipelined?timeout=1", b"hello"));
    assert_eq!(
        got.status, 408,
        "a consumer that left must not be sent the message"
    );
}

#[test]
fn huge_timeout_is_a_long_wait_not_a_crash() {
    let server = Server::start();
    let mut consumer = connect(server.addr);
    send(&mut consumer, &get("/forever?timeout=1e19"));
    server.wait_parked(1);
    let got = request(server.addr, &post("/forever", b"still"));
    assert_eq!(got.status, 200);
    assert_eq!(read_response(&mut consumer).unwrap().text(), "still");
    assert_eq!(server.log_count("panicked"), 0, "{}", server.log());
}
