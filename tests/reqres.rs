//! Request/responder channels through the real binary: the three answer
//! forms with curl, answers tied to their own requests under concurrency,
//! methods, ranges, hang-ups on either side, timeouts, and what travels.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;

use crate::support::*;

/// The text of curl's output.
fn stdout(output: &std::process::Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// The value of header `name` in a `curl -D -` dump (any case).
fn dumped<'a>(dump: &'a str, name: &str) -> Option<&'a str> {
    dump.lines().find_map(|line| {
        let (field, value) = line.split_once(':')?;
        field.eq_ignore_ascii_case(name).then(|| value.trim())
    })
}

#[test]
fn simple_form_answers_the_next_requester_and_gets_its_request() {
    let server = Server::start();
    let responder = spawn_curl(&[
        "-D",
        "-",
        "-H",
        "Patch-Status: 201",
        "-H",
        "Patch-H-X-Answer: yes",
        "-H",
        "Content-Type: text/plain",
        "-d",
        "the answer",
        &server.url("/res/site"),
    ]);
    server.wait_parked(1);
    let requester = curl(&[
        "-i",
        "-X",
        "PATCH",
        "-H",
        "Authorization: Basic dXNlcjpwdw==",
        "-H",
        "Patch-Token: relay-secret",
        "-H",
        "X-Custom: 1",
        "--data-binary",
        "the request",
        &server.url("/req/site/a/b.html?q=1&token=relay-secret&x=%20y"),
    ]);
    let answer = stdout(&requester);
    assert!(answer.starts_with("HTTP/1.1 201 Created\r\n"), "{answer}");
    assert_eq!(dumped(&answer, "X-Answer"), Some("yes"), "{answer}");
    assert_eq!(dumped(&answer, "Content-Type"), Some("text/plain"));
    assert!(answer.ends_with("\r\n\r\nthe answer"), "{answer}");
    let got = stdout(&finish(responder));
    assert!(got.starts_with("HTTP/1.1 200 OK\r\n"), "{got}");
    assert_eq!(dumped(&got, "Patch-Method"), Some("PATCH"));
    assert_eq!(dumped(&got, "Pb-Method"), Some("PATCH"));
    // The relay's credential never travels, in the query or a header.
    assert_eq!(
        dumped(&got, "Patch-Uri"),
        Some("/req/site/a/b.html?q=1&x=%20y")
    );
    assert_eq!(
        dumped(&got, "Pb-Uri"),
        Some("/req/site/a/b.html?q=1&x=%20y")
    );
    assert!(!got.contains("relay-secret"), "{got}");
    assert_eq!(dumped(&got, "Patch-Path"), Some("/a/b.html"));
    // Every other header does, Authorization included.
    assert_eq!(
        dumped(&got, "Patch-H-Authorization"),
        Some("Basic dXNlcjpwdw==")
    );
    assert_eq!(dumped(&got, "Pb-H-X-Custom"), Some("1"));
    assert_eq!(dumped(&got, "Patch-H-X-Custom"), Some("1"));
    assert!(dumped(&got, "Patch-H-Content-Length").is_none(), "{got}");
    assert!(got.ends_with("\r\n\r\nthe request"), "{got}");
}

#[test]
fn reply_form_answers_once_through_its_reply_path() {
    let server = Server::start();
    let requester = spawn_curl(&[
        "-i",
        "--data-binary",
        "2+2",
        &server.url("/u/alice/req/calc/sum"),
    ]);
    server.wait_parked(1);
    let got = stdout(&curl(&["-D", "-", &server.url("/u/alice/res/calc")]));
    let reply = dumped(&got, "Patch-Reply")
        .expect("a reply path")
        .to_owned();
    let secret = reply.strip_prefix("/_/reply/").expect("under /_/reply/");
    assert!(
        secret.len() >= 32 && secret.bytes().all(|b| b.is_ascii_hexdigit()),
        "{reply}"
    );
    assert!(got.ends_with("\r\n\r\n2+2"), "{got}");
    let answered = curl(&[
        "-s",
        "-w",
        "%{http_code}",
        "-H",
        "Patch-Status: 202",
        "-H",
        "Patch-H-X-Sum: 4",
        "-d",
        "4",
        &server.url(&reply),
    ]);
    assert_eq!(stdout(&answered), "200");
    let answer = stdout(&finish(requester));
    assert!(answer.starts_with("HTTP/1.1 202 Accepted\r\n"), "{answer}");
    assert_eq!(dumped(&answer, "X-Sum"), Some("4"));
    assert!(answer.ends_with("\r\n\r\n4"), "{answer}");
    // A reply path serves once.
    let again = curl(&["-s", "-w", " %{http_code}", "-d", "5", &server.url(&reply)]);
    assert!(stdout(&again).ends_with(" 410"), "{}", stdout(&again));
    // The secret never reaches the log.
    assert_eq!(server.log_count(secret), 0, "{}", server.log());
    assert_eq!(server.log_count(&secret[..8]), 0, "{}", server.log());
}

#[test]
fn switch_form_answers_through_the_channel_it_names() {
    let server = Server::start();
    let requester = spawn_curl(&["-i", "-d", "ping", &server.url("/u/bob/req/sw/x")]);
    server.wait_parked(1);
    let got = curl(&[
        "-D",
        "-",
        "-d",
        "answers/7f3a",
        &server.url("/u/bob/res/sw?switch=true"),
    ]);
    let got = stdout(&got);
    assert!(got.ends_with("\r\n\r\nping"), "{got}");
    assert!(dumped(&got, "Patch-Reply").is_none(), "{got}");
    // The channel is in the responder's namespace.
    let answered = curl(&[
        "-s",
        "-w",
        "%{http_code}",
        "-H",
        "Patch-Status: 418",
        "-d",
        "pong",
        &server.url("/u/bob/answers/7f3a"),
    ]);
    assert_eq!(stdout(&answered), "200");
    let answer = stdout(&finish(requester));
    assert!(answer.starts_with("HTTP/1.1 418 "), "{answer}");
    assert!(answer.ends_with("\r\n\r\npong"), "{answer}");
}

/// How a looping responder answers in the concurrency test.
#[derive(Clone, Copy)]
enum Form {
    Simple,
    Switch,
    Reply,
}

/// One responder's turn: takes a request and answers it; returns the
/// request's body, and the answer it was sent (for the simple form the
/// answer is chosen before the request is known). None if no requester came.
fn respond_once(addr: SocketAddr, form: Form, turn: &str) -> Option<(String, String)> {
    match form {
        Form::Simple => {
            let answer = format!("answer {turn}");
            let got = request(addr, &post("/res/many?timeout=1", answer.as_bytes()));
            (got.status == 200).then(|| (got.text(), answer))
        }
        Form::Switch => {
            let channel = format!("answers/{turn}");
            let got = request(
                addr,
                &post("/res/many?switch=true&timeout=1", channel.as_bytes()),
            );
            if got.status != 200 {
                return None;
            }
            let answer = format!("answer to {}", got.text());
            let sent = request(addr, &post(&format!("/{channel}"), answer.as_bytes()));
            assert_eq!(sent.status, 200, "{}", sent.text());
            Some((got.text(), answer))
        }
        Form::Reply => {
            let got = request(addr, &get("/res/many?timeout=1"));
            if got.status != 200 {
                return None;
            }
            let reply = got.header("patch-reply").expect("a reply path").to_owned();
            let answer = format!("answer to {}", got.text());
            let sent = request(addr, &post(&reply, answer.as_bytes()));
            assert_eq!(sent.status, 200, "{}", sent.text());
            Some((got.text(), answer))
        }
    }
}

/// Twenty requesters with different bodies on one id, and four looping
/// responders: every requester gets the answer tied to its own request.
fn twenty_requesters(form: Form) {
    const REQUESTERS: usize = 20;
    let server = Server::start();
    let addr = server.addr;
    let answered = Arc::new(AtomicUsize::new(0));
    let pairs = Arc::new(Mutex::new(Vec::new()));
    let responders: Vec<_> = (0..4)
        .map(|r| {
            let answered = Arc::clone(&answered);
            let pairs = Arc::clone(&pairs);
            thread::spawn(move || {
                for turn in 0..200 {
                    if answered.load(Ordering::SeqCst) >= REQUESTERS {
                        return;
                    }
                    if let Some(pair) = respond_once(addr, form, &format!("{r}-{turn}")) {
                        answered.fetch_add(1, Ordering::SeqCst);
                        pairs.lock().unwrap().push(pair);
                    }
                }
                panic!("responder {r} never saw every request answered");
            })
        })
        .collect();
    let requesters: Vec<_> = (0..REQUESTERS)
        .map(|i| {
            thread::spawn(move || {
                let body = format!("request {i}");
                let got = request(addr, &post("/req/many/x", body.as_bytes()));
                assert_eq!(got.status, 200, "{}", got.text());
                (body, got.text())
            })
        })
        .collect();
    let mut received: Vec<(String, String)> =
        requesters.into_iter().map(|r| r.join().unwrap()).collect();
    for responder in responders {
        responder.join().unwrap();
    }
    let mut pairs = pairs.lock().unwrap().clone();
    received.sort();
    pairs.sort();
    // What each responder saw (request, answer) is what each requester got.
    assert_eq!(received, pairs);
    if !matches!(form, Form::Simple) {
        for (request, answer) in &received {
            assert_eq!(answer, &format!("answer to {request}"));
        }
    }
}

#[test]
fn twenty_concurrent_requesters_each_get_their_own_answer_simple_form() {
    twenty_requesters(Form::Simple);
}

#[test]
fn twenty_concurrent_requesters_each_get_their_own_answer_switch_form() {
    twenty_requesters(Form::Switch);
}

#[test]
fn twenty_concurrent_requesters_each_get_their_own_answer_reply_form() {
    twenty_requesters(Form::Reply);
}

#[test]
fn every_method_is_relayed_and_head_gets_no_body() {
    let server = Server::start();
    let addr = server.addr;
    let methods = ["GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"];
    for (i, method) in methods.into_iter().enumerate() {
        let body: &[u8] = match method {
            "POST" | "PUT" | "PATCH" => b"payload",
            _ => b"",
        };
        let mut requester = connect(addr);
        send(
            &mut requester,
            &with_headers(method, "/req/m/item/7", &[("X-Seq", &i.to_string())], body),
        );
        server.wait_parked(2 * i as u64 + 1);
        let got = request(addr, &get("/res/m"));
        assert_eq!(got.header("patch-method"), Some(method), "{got:?}");
        assert_eq!(got.header("patch-path"), Some("/item/7"));
        assert_eq!(got.header("patch-h-x-seq"), Some(i.to_string().as_str()));
        assert_eq!(got.body, body, "{method}");
        let reply = got.header("patch-reply").unwrap();
        let sent = request(addr, &post(reply, format!("answer to {method}").as_bytes()));
        assert_eq!(sent.status, 200);
        if method == "HEAD" {
            let (status, headers) = read_head(&mut requester).unwrap();
            assert_eq!(status, 200);
            let length = headers
                .iter()
                .find(|(n, _)| n.eq_ignore_ascii_case("content-length"));
            assert_eq!(length.map(|(_, v)| v.as_str()), Some("14"));
        } else {
            let answer = read_response(&mut requester).unwrap();
            assert_eq!(answer.text(), format!("answer to {method}"));
        }
        // The requester's connection carries on (HEAD's too: no body came).
        send(&mut requester, &get("/status"));
        assert_eq!(
            read_response(&mut requester).unwrap().status,
            200,
            "{method}"
        );
        server.wait_counter("parked_total", 2 * i as u64 + 2);
    }
}

#[test]
fn a_cors_preflight_on_a_requester_path_allows_every_method() {
    let server = Server::start();
    let got = request(
        server.addr,
        &with_headers(
            "OPTIONS",
            "/req/api/x",
            &[("Access-Control-Request-Method", "PATCH")],
            b"",
        ),
    );
    assert_eq!(got.status, 200);
    let allowed = got.header("access-control-allow-methods").unwrap();
    assert!(
        allowed.contains("PATCH") && allowed.contains("DELETE"),
        "{allowed}"
    );
    // Without it, OPTIONS is a requester like any other.
    let plain = request(
        server.addr,
        &with_headers("OPTIONS", "/req/api/x?timeout=0", &[], b""),
    );
    assert_eq!(plain.status, 408, "{}", plain.text());
}

#[test]
fn a_range_request_is_answered_206_and_curl_takes_the_part() {
    let server = Server::start();
    let addr = server.addr;
    let responder = thread::spawn(move || {
        let got = request(addr, &get("/res/video"));
        let range = got
            .header("patch-h-range")
            .expect("the range travels")
            .to_owned();
        assert_eq!(range, "bytes=2-5");
        let mut answer = with_headers(
            "POST",
            got.header("patch-reply").unwrap(),
            &[
                ("Patch-Status", "206"),
                ("Patch-H-Content-Range", "bytes 2-5/10"),
                ("Patch-H-Accept-Ranges", "bytes"),
                ("Content-Type", "video/mp4"),
            ],
            b"2345",
        );
        let sent = request(addr, &std::mem::take(&mut answer));
        assert_eq!(sent.status, 200);
    });
    let out = curl(&[
        "-s",
        "-r",
        "2-5",
        "-D",
        "-",
        &server.url("/req/video/movie.mp4"),
    ]);
    responder.join().unwrap();
    let out = stdout(&out);
    assert!(out.starts_with("HTTP/1.1 206 Partial Content\r\n"), "{out}");
    assert_eq!(dumped(&out, "Content-Range"), Some("bytes 2-5/10"));
    assert_eq!(dumped(&out, "Content-Type"), Some("video/mp4"));
    assert!(out.ends_with("\r\n\r\n2345"), "{out}");
}

#[test]
fn patch_status_must_be_a_final_status_and_a_bad_one_answers_nobody() {
    let server = Server::start();
    let requester = spawn_curl(&["-s", "-w", " %{http_code}", &server.url("/req/st/x")]);
    server.wait_parked(1);
    for status in ["99", "150", "600", "abc", "2000"] {
        let got = request(
            server.addr,
            &with_headers("POST", "/res/st", &[("Patch-Status", status)], b"garbage"),
        );
        assert_eq!(got.status, 400, "{status}: {}", got.text());
    }
    // Switched and replied answers are checked the same way.
    let got = request(server.addr, &get("/res/st"));
    let reply = got.header("patch-reply").unwrap();
    let bad = request(
        server.addr,
        &with_headers("POST", reply, &[("Patch-Status", "1")], b"garbage"),
    );
    assert_eq!(bad.status, 400);
    let good = request(
        server.addr,
        &with_headers("POST", reply, &[("Patch-Status", "404")], b"right"),
    );
    assert_eq!(good.status, 200);
    assert_eq!(stdout(&finish(requester)), "right 404");
}

#[test]
fn no_content_and_not_modified_answers_carry_no_body() {
    let server = Server::start();
    for (status, reason) in [("204", "No Content"), ("304", "Not Modified")] {
        let mut requester = connect(server.addr);
        send(&mut requester, &get("/req/nb/x"));
        let responder = {
            let addr = server.addr;
            let status = status.to_owned();
            thread::spawn(move || {
                request(
                    addr,
                    &with_headers("POST", "/res/nb", &[("Patch-Status", &status)], b"dropped"),
                )
            })
        };
        assert_eq!(responder.join().unwrap().status, 200);
        let (got, headers) = read_head(&mut requester).unwrap();
        assert_eq!(got.to_string(), status, "{reason}");
        let length = headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case("content-length"));
        if status == "204" {
            assert!(length.is_none(), "{headers:?}");
        }
        // Nothing follows the head: the next response on the connection is
        // the next request's.
        send(&mut requester, &get("/status"));
        assert_eq!(
            read_response(&mut requester).unwrap().status,
            200,
            "{reason}"
        );
    }
}

#[test]
fn a_requester_that_hung_up_is_never_paired() {
    let server = Server::start();
    let gone = {
        let mut stream = connect(server.addr);
        send(&mut stream, &post("/req/hup/x", b"from the one who left"));
        stream
    };
    server.wait_parked(1);
    drop(gone);
    let requester = spawn_curl(&[
        "-s",
        "-d",
        "from the one who stayed",
        &server.url("/req/hup/x"),
    ]);
    server.wait_parked(2);
    let got = curl(&["-s", "-d", "answer", &server.url("/res/hup")]);
    assert_eq!(stdout(&got), "from the one who stayed");
    assert_eq!(stdout(&finish(requester)), "answer");
    server.wait_hangups(1);
}

#[test]
fn a_responder_that_hung_up_is_never_paired() {
    let server = Server::start();
    // One of each kind of wait: watching its socket (a GET), and blind (a
    // POST whose answer is still to be sent).
    for (i, form) in [get("/res/rhup"), post("/res/rhup", b"stale answer")]
        .iter()
        .enumerate()
    {
        let mut stream = connect(server.addr);
        send(&mut stream, form);
        server.wait_parked(i as u64 + 1);
        drop(stream);
    }
    let requester = spawn_curl(&["-s", "-w", " %{http_code}", &server.url("/req/rhup/x")]);
    server.wait_parked(3);
    let got = curl(&["-s", "-d", "fresh answer", &server.url("/res/rhup")]);
    assert_eq!(stdout(&got), "");
    assert_eq!(stdout(&finish(requester)), "fresh answer 200");
}

#[test]
fn an_answer_to_a_requester_that_left_gets_410() {
    let server = Server::start();
    let mut requester = connect(server.addr);
    send(&mut requester, &get("/req/left/x"));
    server.wait_parked(1);
    let got = request(server.addr, &get("/res/left"));
    let reply = got.header("patch-reply").unwrap().to_owned();
    drop(requester);
    server.wait_hangups(1);
    let late = request(server.addr, &post(&reply, b"too late"));
    assert_eq!(late.status, 410, "{}", late.text());
    // And a switched answer to a requester that left waits for the next
    // one on that channel, like any queue send: nothing was delivered.
    let mut requester = connect(server.addr);
    send(&mut requester, &get("/req/left/y"));
    server.wait_parked(3);
    let got = request(server.addr, &post("/res/left?switch=true", b"answers/left"));
    assert_eq!(got.status, 200);
    drop(requester);
    server.wait_hangups(2);
    let late = request(server.addr, &post("/answers/left?timeout=0", b"too late"));
    assert_eq!(late.status, 408, "{}", late.text());
}

#[test]
fn a_responder_that_vanishes_mid_answer_cuts_the_requester() {
    let server = Server::start();
    let mut responder = connect(server.addr);
    // Promises 100000 bytes, sends 5, then leaves once its request came.
    send(
        &mut responder,
        b"POST /res/cut HTTP/1.1\r\nHost: t\r\nContent-Length: 100000\r\n\r\nhello",
    );
    server.wait_parked(1);
    let requester = spawn_curl(&["-s", "-w", " %{http_code}", &server.url("/req/cut/x")]);
    let got = read_response(&mut responder).unwrap();
    assert_eq!(got.header("patch-method"), Some("GET"));
    drop(responder);
    let out = finish(requester);
    // curl saw a 200 head and a body cut short: a transfer error, not success.
    assert!(!out.status.success(), "{out:?}");
    assert_eq!(out.status.code(), Some(18), "{out:?}");
}

#[test]
fn a_responder_that_leaves_before_its_answer_gives_the_requester_502() {
    let server = Server::start();
    let requester = spawn_curl(&["-s", "-w", " %{http_code}", &server.url("/req/early/x")]);
    server.wait_parked(1);
    let mut responder = connect(server.addr);
    send(
        &mut responder,
        b"POST /res/early HTTP/1.1\r\nHost: t\r\nContent-Length: 100\r\n\r\n",
    );
    let got = read_response(&mut responder).unwrap();
    assert_eq!(got.status, 200);
    drop(responder);
    let out = stdout(&finish(requester));
    assert!(out.ends_with(" 502"), "{out}");
}

#[test]
fn an_answer_goes_out_only_once_the_whole_request_reached_the_responder() {
    let server = Server::start();
    let mut responder = connect(server.addr);
    send(&mut responder, &post("/res/strict", b"ok"));
    server.wait_parked(1);
    let dir = temp_dir("reqres-strict");
    std::fs::write(dir.join("big.bin"), pattern(32 << 20, 3)).unwrap();
    let requester = spawn_curl(&[
        "-s",
        "-w",
        " %{http_code}",
        "--data-binary",
        &format!("@{}", dir.join("big.bin").display()),
        &server.url("/req/strict/x"),
    ]);
    // The responder reads the start of the request, then leaves.
    let (status, _) = read_head(&mut responder).unwrap();
    assert_eq!(status, 200);
    drop(responder);
    // Its answer, whole and at hand, never reaches the requester.
    let out = stdout(&finish(requester));
    assert!(out.ends_with(" 502"), "{out}");
    assert!(!out.starts_with("ok"), "{out}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn an_unanswered_reply_gives_the_requester_504() {
    let server = Server::start_with(&["--reply-timeout", "0.5"]);
    let requester = spawn_curl(&["-s", "-w", " %{http_code}", &server.url("/req/slow/x")]);
    server.wait_parked(1);
    let got = request(server.addr, &get("/res/slow"));
    let reply = got.header("patch-reply").unwrap().to_owned();
    let out = stdout(&finish(requester));
    assert!(out.ends_with(" 504"), "{out}");
    assert!(out.contains("--reply-timeout"), "{out}");
    let late = request(server.addr, &post(&reply, b"late"));
    assert_eq!(late.status, 410);
}

#[test]
fn timeouts_give_408_on_every_side_and_consume_nothing() {
    let server = Server::start();
    for path in ["/req/t/x?timeout=0.2", "/res/t?timeout=0.2"] {
        let got = request(server.addr, &get(path));
        assert_eq!(got.status, 408, "{path}: {}", got.text());
    }
    let got = request(server.addr, &post("/res/t?timeout=0.2", b"answer"));
    assert_eq!(got.status, 408);
    let got = request(server.addr, &post("/res/t?switch=true&timeout=0.2", b"a/b"));
    assert_eq!(got.status, 408);
    // Nothing was left behind: a new pair still meets.
    let requester = spawn_curl(&["-s", &server.url("/req/t/x")]);
    server.wait_parked(5);
    assert_eq!(
        stdout(&curl(&["-s", "-d", "ok", &server.url("/res/t")])),
        ""
    );
    assert_eq!(stdout(&finish(requester)), "ok");
}

#[test]
fn delete_on_a_responder_path_ends_its_waiters() {
    let server = Server::start();
    let requester = spawn_curl(&["-s", "-w", " %{http_code}", &server.url("/u/a/req/del/x")]);
    server.wait_parked(1);
    let deleted = curl(&["-s", "-X", "DELETE", &server.url("/u/a/res/del")]);
    assert!(
        stdout(&deleted).contains("1 waiters"),
        "{}",
        stdout(&deleted)
    );
    assert!(stdout(&finish(requester)).ends_with(" 410"));
    // A namespace DELETE reaches responders too; a queue of the same name
    // is another channel.
    let responder = spawn_curl(&["-s", "-w", " %{http_code}", &server.url("/u/a/res/del")]);
    server.wait_parked(2);
    let other = curl(&["-s", "-X", "DELETE", &server.url("/u/a/del")]);
    assert!(stdout(&other).contains("0 waiters"), "{}", stdout(&other));
    let all = curl(&["-s", "-X", "DELETE", &server.url("/u/a")]);
    assert!(stdout(&all).contains("1 waiters"), "{}", stdout(&all));
    assert!(stdout(&finish(responder)).ends_with(" 410"));
}

#[test]
fn bad_responders_are_refused_with_a_reason() {
    let server = Server::start();
    let cases: [(&[u8], u16); 5] = [
        (b"HEAD /res/b HTTP/1.1\r\nHost: t\r\n\r\n", 405),
        (
            b"PATCH /res/b HTTP/1.1\r\nHost: t\r\nContent-Length: 1\r\n\r\nx",
            405,
        ),
        (
            b"POST /res/b?switch=true HTTP/1.1\r\nHost: t\r\nContent-Length: 0\r\n\r\n",
            400,
        ),
        (
            b"POST /res/b?switch=true HTTP/1.1\r\nHost: t\r\nContent-Length: 9\r\n\r\npubsub/x1",
            400,
        ),
        (b"GET /_/reply/0123 HTTP/1.1\r\nHost: t\r\n\r\n", 405),
    ];
    for (raw, status) in cases {
        let mut stream = connect(server.addr);
        send(&mut stream, raw);
        let (got, _) = read_head(&mut stream).unwrap();
        assert_eq!(got, status, "{}", String::from_utf8_lossy(raw));
    }
    let long = "a".repeat(2000);
    let got = request(server.addr, &post("/res/b?switch=true", long.as_bytes()));
    assert_eq!(got.status, 400);
    let unknown = request(server.addr, &post("/_/reply/0123abcd", b"x"));
    assert_eq!(unknown.status, 410, "{}", unknown.text());
    server.assert_serving();
}

#[test]
fn sixteen_mib_each_way_streams_through_the_simple_form() {
    let server = Server::start();
    let dir = temp_dir("reqres-big");
    let request_body = pattern(16 << 20, 7);
    let answer_body = pattern(16 << 20, 11);
    std::fs::write(dir.join("request.bin"), &request_body).unwrap();
    std::fs::write(dir.join("answer.bin"), &answer_body).unwrap();
    let responder = spawn_curl(&[
        "-T",
        dir.join("answer.bin").to_str().unwrap(),
        "-o",
        dir.join("got-request.bin").to_str().unwrap(),
        &server.url("/res/big"),
    ]);
    server.wait_parked(1);
    let requester = curl(&[
        "-T",
        dir.join("request.bin").to_str().unwrap(),
        "-o",
        dir.join("got-answer.bin").to_str().unwrap(),
        &server.url("/req/big/file"),
    ]);
    assert!(requester.status.success(), "{requester:?}");
    assert!(finish(responder).status.success());
    assert!(std::fs::read(dir.join("got-answer.bin")).unwrap() == answer_body);
    assert!(std::fs::read(dir.join("got-request.bin")).unwrap() == request_body);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn shutdown_answers_requesters_and_responders_503() {
    let mut server = Server::start();
    let requester = spawn_curl(&["-s", "-w", " %{http_code}", &server.url("/req/down/x")]);
    let responder = spawn_curl(&["-s", "-w", " %{http_code}", &server.url("/res/other")]);
    server.wait_parked(2);
    server.signal(libc::SIGTERM);
    assert!(stdout(&finish(requester)).ends_with(" 503"));
    assert!(stdout(&finish(responder)).ends_with(" 503"));
    assert!(server.wait_exit(*STEP).is_some());
}
