//! Notifications through the real binary (`/_/notify`, `/_/ntfy`,
//! `/<ns>/_/notify`): every input form, each backend's request as its API
//! expects it (Matrix, ntfy, webhook), partial failure and its 502, no
//! backend (503), namespaces, a hanging backend cut off at
//! `--notify-timeout`, the access file's say, secrets that never leak, a bad
//! `[notify]` table at start, and SIGHUP. The backends are [`Fake`]s: a
//! small HTTP server on 127.0.0.1:0 that records what it is sent.

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, AtomicU16, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::support::*;

/// The tokens of every access file here: `ops` may notify globally and for
/// alice, `admin` anything, `reader` only GET, `alias` only POST on the
/// alias path (which is not the path access rules see).
const TOKENS: &str = r#"
[tokens.ops]
token = "s3cret"
POST = ["/_/notify", "/u/alice/_/notify"]

[tokens.admin]
token = "admin-token"
"*" = ["/**"]

[tokens.reader]
token = "read-only"
GET = ["/**"]

[tokens.alias]
token = "alias-only"
POST = ["/_/ntfy", "/u/alice/_/ntfy"]
"#;

/// curl's header with the `ops` token.
const OPS: &str = "Authorization: Bearer s3cret";

/// curl's header with the `admin` token.
const ADMIN: &str = "Authorization: Bearer admin-token";

/// A recorded request to a [`Fake`].
#[derive(Debug, Clone, PartialEq, Eq)]
struct Seen {
    method: String,
    /// The request target, as sent.
    path: String,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Seen {
    /// The value of header `name` (case-insensitive), if it came once;
    /// panics if it came more than once.
    fn header(&self, name: &str) -> Option<&str> {
        let mut values = self
            .headers
            .iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str());
        let first = values.next();
        assert!(values.next().is_none(), "{name} twice in {self:?}");
        first
    }

    /// The body as JSON.
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("{e}: {:?}", String::from_utf8_lossy(&self.body)))
    }

    /// The body as text.
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// What a [`Fake`] answers: a status, or [`HANG`].
const HANG: u16 = 0;

/// A stand-in for a notification backend: records every request, answers
/// each with its current status (or never, when hanging), keeps a
/// connection open for more (the relay's client pools them). Its threads
/// end when it is dropped, or after a bound in any case.
struct Fake {
    addr: SocketAddr,
    /// Every request so far, in arrival order.
    seen: Arc<Mutex<Vec<Seen>>>,
    /// The status answered from now on; [`HANG`] answers nothing.
    answer: Arc<AtomicU16>,
    /// Set on drop: every thread of this fake ends soon after.
    stop: Arc<AtomicBool>,
}

/// The most connections a fake accepts, and requests it reads on one.
const MAX_CONNECTIONS: usize = 64;
const MAX_REQUESTS: usize = 64;

impl Fake {
    /// A fake that answers `status` (or hangs, with [`HANG`]).
    fn start(status: u16) -> Fake {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind a fake backend");
        listener.set_nonblocking(true).expect("nonblocking");
        let fake = Fake {
            addr: listener.local_addr().expect("its address"),
            seen: Arc::new(Mutex::new(Vec::new())),
            answer: Arc::new(AtomicU16::new(status)),
            stop: Arc::new(AtomicBool::new(false)),
        };
        let (seen, answer, stop) = (
            Arc::clone(&fake.seen),
            Arc::clone(&fake.answer),
            Arc::clone(&fake.stop),
        );
        // However a test ends, nothing here outlives this.
        let deadline = Instant::now() + patience(Duration::from_secs(120));
        thread::spawn(move || {
            let mut accepted = 0;
            while accepted < MAX_CONNECTIONS
                && !stop.load(Ordering::Relaxed)
                && Instant::now() < deadline
            {
                match listener.accept() {
                    Ok((stream, _)) => {
                        accepted += 1;
                        let (seen, answer, stop) =
                            (Arc::clone(&seen), Arc::clone(&answer), Arc::clone(&stop));
                        thread::spawn(move || serve(stream, &seen, &answer, &stop, deadline));
                    }
                    Err(e) if e.kind() == ErrorKind::WouldBlock => {
                        thread::sleep(Duration::from_millis(5));
                    }
                    Err(_) => return,
                }
            }
        });
        fake
    }

    /// `http://127.0.0.1:PORT{path}`.
    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// `127.0.0.1:PORT`, as the relay names its backends.
    fn host(&self) -> String {
        self.addr.to_string()
    }

    /// Answers `status` from now on.
    fn answer(&self, status: u16) {
        self.answer.store(status, Ordering::SeqCst);
    }

    /// The requests so far.
    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }

    /// The only request so far; panics unless there was exactly one.
    fn one(&self) -> Seen {
        let seen = self.seen();
        assert_eq!(seen.len(), 1, "{seen:#?}");
        seen.into_iter().next().unwrap()
    }
}

impl Drop for Fake {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// Serves one connection: request after request, until the peer closes,
/// the fake stops or `deadline` passes.
fn serve(
    mut stream: TcpStream,
    seen: &Mutex<Vec<Seen>>,
    answer: &AtomicU16,
    stop: &AtomicBool,
    deadline: Instant,
) {
    // Short reads, so that an idle pooled connection notices the stop.
    let _ = stream.set_nonblocking(false);
    let _ = stream.set_read_timeout(Some(Duration::from_millis(100)));
    let _ = stream.set_write_timeout(Some(*STEP));
    let is_over = || stop.load(Ordering::Relaxed) || Instant::now() >= deadline;
    let mut buffer = Vec::new();
    let mut chunk = [0u8; 16 * 1024];
    for _ in 0..MAX_REQUESTS {
        let request = loop {
            match parse(&buffer) {
                Parsed::Done(request, used) => {
                    buffer.drain(..used);
                    break request;
                }
                Parsed::Bad(why) => {
                    let body = format!("fake backend: {why}");
                    let _ = write!(
                        stream,
                        "HTTP/1.1 400 Bad\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                        body.len()
                    );
                    return;
                }
                Parsed::Partial => {}
            }
            if is_over() {
                return;
            }
            match stream.read(&mut chunk) {
                Ok(0) => return,
                Ok(n) => buffer.extend_from_slice(&chunk[..n]),
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
                Err(_) => return,
            }
        };
        // A stopped fake is gone: what reaches it now is never answered.
        if is_over() {
            return;
        }
        seen.lock().unwrap().push(request);
        let status = answer.load(Ordering::SeqCst);
        if status == HANG {
            // Never answer; hold the connection until the peer gives up.
            while !is_over() {
                match stream.read(&mut chunk) {
                    Ok(0) => return,
                    Ok(_) => {}
                    Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
                    Err(_) => return,
                }
            }
            return;
        }
        let answer = format!("HTTP/1.1 {status} Fake\r\nContent-Length: 3\r\n\r\n{{}}\n");
        if stream.write_all(answer.as_bytes()).is_err() {
            return;
        }
    }
}

/// What the bytes of a connection so far hold.
enum Parsed {
    Partial,
    /// A whole request, and how many bytes it took.
    Done(Seen, usize),
    Bad(String),
}

/// The first request in `buffer`, with a Content-Length body (the relay's
/// client knows each body's length; a chunked one is refused, so that a
/// test notices).
fn parse(buffer: &[u8]) -> Parsed {
    let mut fields = [httparse::EMPTY_HEADER; 64];
    let mut request = httparse::Request::new(&mut fields);
    let head = match request.parse(buffer) {
        Ok(httparse::Status::Complete(head)) => head,
        Ok(httparse::Status::Partial) => return Parsed::Partial,
        Err(e) => return Parsed::Bad(e.to_string()),
    };
    let headers: Vec<(String, String)> = request
        .headers
        .iter()
        .map(|h| {
            (
                h.name.to_owned(),
                String::from_utf8_lossy(h.value).into_owned(),
            )
        })
        .collect();
    let value = |name: &str| {
        headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.clone())
    };
    if value("transfer-encoding").is_some() {
        return Parsed::Bad("a chunked body".to_owned());
    }
    let length = match value("content-length").map(|v| v.trim().parse::<usize>()) {
        None => 0,
        Some(Ok(n)) if n <= 1 << 20 => n,
        Some(_) => return Parsed::Bad("a bad Content-Length".to_owned()),
    };
    if buffer.len() < head + length {
        return Parsed::Partial;
    }
    let seen = Seen {
        method: request.method.unwrap_or("").to_owned(),
        path: request.path.unwrap_or("").to_owned(),
        headers,
        body: buffer[head..head + length].to_vec(),
    };
    Parsed::Done(seen, head + length)
}

/// `[[notify.matrix]]` for `fake`, with its token and room.
fn matrix(fake: &Fake) -> String {
    format!(
        "[[notify.matrix]]\nhomeserver = \"{}\"\naccess_token = \"syt_secret\"\nroom = \"!room:example.org\"\nrooms = [\"!r:x\", \"!other:example.org\"]\n",
        fake.url("")
    )
}

/// `[[notify.ntfy]]` for `fake`, with a token, a priority and a tag.
fn ntfy(fake: &Fake) -> String {
    format!(
        "[[notify.ntfy]]\nserver = \"{}\"\ntopic = \"alerts\"\ntoken = \"tk_secret\"\npriority = \"high\"\ntags = [\"floppy_disk\"]\n",
        fake.url("")
    )
}

/// `[[notify.webhook]]` for `fake`, at `/hook` with a header of its own.
fn webhook(fake: &Fake) -> String {
    format!(
        "[[notify.webhook]]\nurl = \"{}\"\nheaders = {{ X-Secret = \"wh_secret\" }}\n",
        fake.url("/hook")
    )
}

/// `table` (one of the above) as a backend of namespace `namespace`.
fn under(namespace: &str, table: &str) -> String {
    table.replacen(
        "[[notify.",
        &format!("[[notify.namespace.\"{namespace}\"."),
        1,
    )
}

/// Writes [`TOKENS`] and `backends` to a fresh access file.
fn access_file(name: &str, backends: &str) -> PathBuf {
    let path = temp_dir(&format!("notify-{name}")).join("access.toml");
    std::fs::write(&path, format!("{TOKENS}\n{backends}")).expect("write the access file");
    path
}

/// A relay whose access file is [`TOKENS`] and `backends`, with `more` flags.
fn relay(name: &str, backends: &str, more: &[&str]) -> (Server, PathBuf) {
    let file = access_file(name, backends);
    let mut args = vec!["--auth", file.to_str().unwrap()];
    args.extend_from_slice(more);
    (Server::start_with(&args), file)
}

/// Runs curl with `args` and returns the status and body of the answer.
fn curl_answer(args: &[&str]) -> (u16, String) {
    let mut all = vec!["-w", "\n%{http_code}"];
    all.extend_from_slice(args);
    let output = curl(&all);
    answer_of(&output)
}

/// The status and body of curl's output (run with `-w "\n%{http_code}"`).
fn answer_of(output: &std::process::Output) -> (u16, String) {
    assert!(output.status.success(), "{output:?}");
    let text = String::from_utf8_lossy(&output.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').expect("curl's status line");
    (code.parse().expect("a status"), body.to_owned())
}

/// The body of a relay's answer as JSON.
fn json(body: &str) -> Value {
    serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {body:?}"))
}

/// `/status`'s `notify` counters: (sent_total, failed_total).
fn notify_counters(server: &Server) -> (u64, u64) {
    let status = server.status();
    let at = status
        .find("\"notify\":")
        .unwrap_or_else(|| panic!("no notify in {status}"));
    let notify = &status[at..];
    (
        json_counter(notify, "sent_total"),
        json_counter(notify, "failed_total"),
    )
}

#[test]
fn every_input_form_reaches_the_backends_as_the_same_message() {
    let (m, n, w) = (Fake::start(200), Fake::start(200), Fake::start(200));
    let backends = format!("{}{}{}", matrix(&m), ntfy(&n), webhook(&w));
    let (server, _) = relay("forms", &backends, &[]);
    let url = server.url("/_/notify");
    let json_body = r#"{"title":"Backup","message":"done **ok**","type":"markdown","room":"!r:x"}"#;
    let plain_url = format!("{url}?title=Backup&type=markdown&room=%21r%3Ax");
    let fields = [
        "--data-urlencode",
        "title=Backup",
        "-d",
        "type=markdown",
        "--data-urlencode",
        "room=!r:x",
    ];
    let form = |text: &'static str| {
        let mut args = vec!["-H", OPS];
        args.extend_from_slice(&fields);
        args.extend_from_slice(&["--data-urlencode", text, url.as_str()]);
        args
    };
    let mut query = form("message=done **ok**");
    query.insert(0, "-G");
    let mut query_body = form("body=done **ok**");
    query_body.insert(0, "-G");
    let forms: [(&str, Vec<&str>); 5] = [
        (
            "json",
            vec![
                "-H",
                OPS,
                "-H",
                "Content-Type: application/json",
                "-d",
                json_body,
                &url,
            ],
        ),
        ("form", form("message=done **ok**")),
        ("query message=", query),
        ("query body=", query_body),
        (
            "plain body",
            vec![
                "-H",
                OPS,
                "-H",
                "Content-Type: text/plain",
                "--data-binary",
                "done **ok**",
                &plain_url,
            ],
        ),
    ];
    for (i, (form, args)) in forms.iter().enumerate() {
        let (status, body) = curl_answer(args);
        assert_eq!(status, 200, "{form}: {body}");
        assert_eq!(json(&body)["status"], "sent", "{form}: {body}");
        for fake in [&m, &n, &w] {
            assert_eq!(fake.seen().len(), i + 1, "{form}: {:#?}", fake.seen());
        }
    }
    // What the first form sent is what was asked.
    let hook = w.seen()[0].json();
    assert_eq!(hook["title"], "Backup");
    assert_eq!(hook["message"], "done **ok**");
    assert_eq!(hook["type"], "markdown");
    assert_eq!(hook["room"], "!r:x");
    assert!(
        m.seen()[0].path.contains("/rooms/%21r%3Ax/"),
        "{:?}",
        m.seen()
    );
    // Every other form sent the same requests, but for Matrix's
    // transaction id and the webhook's time.
    let same = |seen: &Seen| {
        let mut seen = seen.clone();
        if seen.path.starts_with("/_matrix/") {
            let (room, _txn) = seen.path.rsplit_once('/').unwrap();
            seen.path = room.to_owned();
        }
        if seen.path == "/hook" {
            let mut object = seen.json();
            object.as_object_mut().unwrap().remove("time");
            seen.body = object.to_string().into_bytes();
        }
        seen
    };
    for fake in [&m, &n, &w] {
        let seen = fake.seen();
        for (form, other) in forms.iter().zip(&seen).skip(1) {
            assert_eq!(same(other), same(&seen[0]), "{}", form.0);
        }
    }
}

#[test]
fn a_message_without_text_or_of_an_unknown_type_is_400_and_reaches_no_backend() {
    let w = Fake::start(200);
    let (server, _) = relay("bad-input", &webhook(&w), &[]);
    let url = server.url("/_/notify");
    for args in [
        vec!["-H", OPS, "-X", "POST", url.as_str()],
        vec!["-H", OPS, "--data-binary", "  \n", url.as_str()],
        vec![
            "-H",
            OPS,
            "-H",
            "Content-Type: application/json",
            "-d",
            r#"{"title":"only a title"}"#,
            url.as_str(),
        ],
        vec![
            "-H",
            OPS,
            "-H",
            "Content-Type: application/json",
            "-d",
            "[1]",
            url.as_str(),
        ],
        vec!["-H", OPS, "-G", "-d", "message=hi", "-d", "type=rtf", &url],
        vec![
            "-H",
            OPS,
            "-G",
            "-d",
            "message=hi",
            "-d",
            "priority=9",
            &url,
        ],
    ] {
        let (status, body) = curl_answer(&args);
        assert_eq!(status, 400, "{args:?}: {body}");
    }
    assert!(w.seen().is_empty(), "{:#?}", w.seen());
    // A method that sends nothing is not a notification.
    let (status, _) = curl_answer(&["-H", OPS, "-X", "DELETE", &url]);
    assert_eq!(status, 405);
    assert!(w.seen().is_empty());
    assert_eq!(notify_counters(&server), (0, 0));
}

#[test]
fn matrix_gets_a_put_with_its_token_a_fresh_txn_and_html_for_markdown() {
    let m = Fake::start(200);
    let (server, _) = relay("matrix", &matrix(&m), &[]);
    let url = server.url("/_/notify");
    let (status, body) = curl_answer(&[
        "-H",
        OPS,
        "-H",
        "Content-Type: application/json",
        "-d",
        r#"{"title":"Backup","message":"**done**","type":"markdown"}"#,
        &url,
    ]);
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        json(&body),
        serde_json::json!({"status": "sent", "backends": [format!("matrix {}", m.host())]})
    );
    // A plain message to another room.
    let (status, body) = curl_answer(&[
        "-H",
        OPS,
        "-G",
        "-d",
        "message=hi",
        "--data-urlencode",
        "room=!other:example.org",
        &url,
    ]);
    assert_eq!(status, 200, "{body}");
    // A room the file does not list is refused, and reaches no backend.
    let (status, body) = curl_answer(&[
        "-H",
        OPS,
        "-G",
        "-d",
        "message=hi",
        "--data-urlencode",
        "room=!elsewhere:example.org",
        &url,
    ]);
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("room"), "{body}");
    let seen = m.seen();
    assert_eq!(seen.len(), 2, "{seen:#?}");
    let prefix = "/_matrix/client/v3/rooms/%21room%3Aexample.org/send/m.room.message/";
    let mut txns = Vec::new();
    for (request, room) in seen
        .iter()
        .zip(["%21room%3Aexample.org", "%21other%3Aexample.org"])
    {
        assert_eq!(request.method, "PUT");
        let prefix = prefix.replace("%21room%3Aexample.org", room);
        let txn = request
            .path
            .strip_prefix(&prefix)
            .unwrap_or_else(|| panic!("{} is not under {prefix}", request.path));
        assert!(
            !txn.is_empty() && txn.bytes().all(|b| b.is_ascii_alphanumeric()),
            "{txn:?}"
        );
        txns.push(txn.to_owned());
        assert_eq!(request.header("Authorization"), Some("Bearer syt_secret"));
        assert!(
            request
                .header("Content-Type")
                .is_some_and(|t| t.starts_with("application/json")),
            "{request:?}"
        );
    }
    assert_ne!(txns[0], txns[1], "two messages, one transaction id");
    let markdown = seen[0].json();
    assert_eq!(markdown["msgtype"], "m.text");
    assert_eq!(markdown["body"], "Backup\n**done**");
    assert_eq!(markdown["format"], "org.matrix.custom.html");
    let html = markdown["formatted_body"].as_str().expect("formatted_body");
    assert!(html.contains("<strong>done</strong>"), "{html}");
    assert!(html.contains("Backup"), "{html}");
    let plain = seen[1].json();
    assert_eq!(plain["msgtype"], "m.text");
    assert_eq!(plain["body"], "hi");
    assert!(plain.get("formatted_body").is_none(), "{plain}");
    assert_eq!(notify_counters(&server), (2, 0));
}

#[test]
fn ntfy_gets_the_text_with_title_priority_tags_and_its_token_as_headers() {
    let n = Fake::start(200);
    let (server, _) = relay("ntfy", &ntfy(&n), &[]);
    let url = server.url("/_/notify");
    let (status, body) = curl_answer(&[
        "-H",
        OPS,
        "-H",
        "Content-Type: application/json",
        "-d",
        r#"{"title":"Backup","message":"**done**","type":"markdown"}"#,
        &url,
    ]);
    assert_eq!(status, 200, "{body}");
    assert_eq!(json(&body)["backends"][0], format!("ntfy {}", n.host()));
    // The request's priority wins over the backend's; its tags add to them.
    let (status, body) = curl_answer(&[
        "-H",
        OPS,
        "-H",
        "Content-Type: application/json",
        "-d",
        r#"{"message":"disk full","priority":"min","tags":["warning"]}"#,
        &url,
    ]);
    assert_eq!(status, 200, "{body}");
    let seen = n.seen();
    assert_eq!(seen.len(), 2, "{seen:#?}");
    for request in &seen {
        assert_eq!(
            (request.method.as_str(), request.path.as_str()),
            ("POST", "/alerts")
        );
        assert_eq!(request.header("Authorization"), Some("Bearer tk_secret"));
    }
    let first = &seen[0];
    assert_eq!(first.text(), "**done**");
    assert_eq!(first.header("Title"), Some("Backup"));
    assert_eq!(first.header("Priority"), Some("4"));
    assert_eq!(first.header("Tags"), Some("floppy_disk"));
    assert_eq!(first.header("Markdown"), Some("yes"));
    let second = &seen[1];
    assert_eq!(second.text(), "disk full");
    assert_eq!(second.header("Title"), None);
    assert_eq!(second.header("Priority"), Some("1"));
    assert_eq!(second.header("Tags"), Some("floppy_disk,warning"));
    assert_eq!(second.header("Markdown"), None);
    assert_eq!(notify_counters(&server), (2, 0));
}

#[test]
fn webhook_gets_a_json_object_and_its_own_headers() {
    let w = Fake::start(204);
    let (server, _) = relay("webhook", &webhook(&w), &[]);
    let (status, body) = curl_answer(&[
        "-H",
        OPS,
        "-d",
        "title=Deploy",
        "--data-urlencode",
        "message=<b>v2</b> is live",
        "-d",
        "type=html",
        &server.url("/_/notify"),
    ]);
    // Any 2xx is a delivery.
    assert_eq!(status, 200, "{body}");
    assert_eq!(json(&body)["backends"][0], format!("webhook {}", w.host()));
    let request = w.one();
    assert_eq!(
        (request.method.as_str(), request.path.as_str()),
        ("POST", "/hook")
    );
    assert_eq!(request.header("X-Secret"), Some("wh_secret"));
    assert!(
        request
            .header("Content-Type")
            .is_some_and(|t| t.starts_with("application/json")),
        "{request:?}"
    );
    let object = request.json();
    assert_eq!(object["title"], "Deploy");
    assert_eq!(object["message"], "<b>v2</b> is live");
    assert_eq!(object["type"], "html");
    assert_eq!(object["namespace"], "");
    assert!(object["time"].as_u64().is_some_and(|t| t > 0), "{object}");
}

#[test]
fn a_refusing_backend_makes_a_502_naming_it_while_the_others_still_get_the_message() {
    let (m, n, w) = (Fake::start(200), Fake::start(200), Fake::start(200));
    let backends = format!("{}{}{}", matrix(&m), ntfy(&n), webhook(&w));
    let (server, _) = relay("partial", &backends, &[]);
    let url = server.url("/_/notify");
    let (status, body) = curl_answer(&["-H", OPS, "-d", "message=first", &url]);
    assert_eq!(status, 200, "{body}");
    assert_eq!(notify_counters(&server), (3, 0));
    w.answer(500);
    let (status, body) = curl_answer(&["-H", OPS, "-d", "message=second", &url]);
    assert_eq!(status, 502, "{body}");
    let answer = json(&body);
    assert_eq!(answer["status"], "failed");
    assert_eq!(
        answer["backends"],
        serde_json::json!([format!("matrix {}", m.host()), format!("ntfy {}", n.host())])
    );
    assert_eq!(
        answer["failed"],
        serde_json::json!([{"backend": format!("webhook {}", w.host()), "status": 500}])
    );
    // Every backend got the second message, the refusing one included.
    assert_eq!(m.seen()[1].json()["body"], "second");
    assert_eq!(n.seen()[1].text(), "second");
    assert_eq!(w.seen()[1].json()["message"], "second");
    assert_eq!(notify_counters(&server), (5, 1));
    // An unreachable backend is a failure with an error instead of a status.
    drop(w);
    let (status, body) = curl_answer(&["-H", OPS, "-d", "message=third", &url]);
    assert_eq!(status, 502, "{body}");
    let failed = &json(&body)["failed"][0];
    assert!(
        failed["backend"].as_str().unwrap().starts_with("webhook "),
        "{body}"
    );
    assert!(
        failed["error"].as_str().is_some_and(|e| !e.is_empty()),
        "{body}"
    );
    assert_eq!(notify_counters(&server), (7, 2));
}

#[test]
fn without_backends_a_notification_is_503() {
    // No access file at all: everyone may notify, and nobody is there.
    let server = Server::start();
    let (status, body) = curl_answer(&["-d", "message=hi", &server.url("/_/notify")]);
    assert_eq!(status, 503, "{body}");
    // An access file without [notify].
    let (server, _) = relay("none", "", &[]);
    let (status, body) = curl_answer(&["-H", OPS, "-d", "message=hi", &server.url("/_/notify")]);
    assert_eq!(status, 503, "{body}");
    // Global backends are not a namespace's.
    let w = Fake::start(200);
    let (server, _) = relay("none-here", &webhook(&w), &[]);
    let (status, body) = curl_answer(&[
        "-H",
        ADMIN,
        "-d",
        "message=hi",
        &server.url("/u/bob/_/notify"),
    ]);
    assert_eq!(status, 503, "{body}");
    assert!(w.seen().is_empty(), "{:#?}", w.seen());
    assert_eq!(notify_counters(&server), (0, 0));
}

#[test]
fn a_namespace_notifies_only_its_own_backends() {
    let (global, alice_ntfy, alice_hook) = (Fake::start(200), Fake::start(200), Fake::start(200));
    let backends = format!(
        "{}{}{}",
        webhook(&global),
        under("/u/alice", &ntfy(&alice_ntfy)),
        under("/u/alice", &webhook(&alice_hook))
    );
    let (server, _) = relay("namespace", &backends, &[]);
    let (status, body) = curl_answer(&[
        "-H",
        OPS,
        "-d",
        "message=for alice",
        &server.url("/u/alice/_/notify"),
    ]);
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        json(&body)["backends"],
        serde_json::json!([
            format!("ntfy {}", alice_ntfy.host()),
            format!("webhook {}", alice_hook.host())
        ])
    );
    assert_eq!(alice_ntfy.one().text(), "for alice");
    assert_eq!(alice_hook.one().json()["namespace"], "/u/alice");
    assert!(global.seen().is_empty(), "{:#?}", global.seen());
    // And the global ones get only global notifications.
    let (status, body) =
        curl_answer(&["-H", OPS, "-d", "message=for all", &server.url("/_/notify")]);
    assert_eq!(status, 200, "{body}");
    assert_eq!(global.one().json()["namespace"], "");
    assert_eq!(alice_ntfy.seen().len(), 1);
    assert_eq!(alice_hook.seen().len(), 1);
    assert_eq!(notify_counters(&server), (3, 0));
}

#[test]
fn a_hanging_backend_is_cut_off_at_the_notify_timeout_without_holding_other_notifications() {
    let (hang, healthy, alice) = (Fake::start(HANG), Fake::start(200), Fake::start(200));
    let backends = format!(
        "{}{}{}",
        webhook(&hang),
        ntfy(&healthy),
        under("/u/alice", &webhook(&alice))
    );
    let (server, _) = relay("hang", &backends, &["--notify-timeout", "3"]);
    let started = Instant::now();
    let held = spawn_curl(&[
        "-w",
        "\n%{http_code}",
        "-H",
        OPS,
        "-d",
        "message=held",
        &server.url("/_/notify"),
    ]);
    assert!(
        wait_for(*STEP, || !hang.seen().is_empty()),
        "the hanging backend never got the message"
    );
    // While that delivery hangs, another notification goes through.
    let (status, body) = curl_answer(&[
        "-H",
        OPS,
        "-d",
        "message=meanwhile",
        &server.url("/u/alice/_/notify"),
    ]);
    assert_eq!(status, 200, "{body}");
    assert_eq!(alice.one().json()["message"], "meanwhile");
    let mut held = held;
    assert!(
        held.try_wait().expect("try_wait").is_none(),
        "the held notification ended before its backend's timeout"
    );
    let output = finish_within(held, patience(Duration::from_secs(8)));
    assert!(started.elapsed() < patience(Duration::from_secs(8)));
    let (status, body) = answer_of(&output);
    assert_eq!(status, 502, "{body}");
    let answer = json(&body);
    assert_eq!(
        answer["backends"],
        serde_json::json!([format!("ntfy {}", healthy.host())])
    );
    let failed = &answer["failed"][0];
    assert_eq!(
        failed["backend"],
        format!("webhook {}", hang.host()),
        "{body}"
    );
    let error = failed["error"].as_str().expect("an error");
    assert!(!error.is_empty() && !error.contains("http://"), "{error}");
    assert_eq!(healthy.one().text(), "held");
    assert_eq!(notify_counters(&server), (2, 1));
}

#[test]
fn a_notification_needs_post_on_its_canonical_path_and_a_refused_one_reaches_no_backend() {
    let (w, alice) = (Fake::start(200), Fake::start(200));
    let backends = format!("{}{}", webhook(&w), under("/u/alice", &webhook(&alice)));
    let (server, _) = relay("tokens", &backends, &[]);
    let notify = server.url("/_/notify");
    let ntfy = server.url("/_/ntfy");
    for (token, method, url, expected) in [
        (None, "POST", &notify, 401),
        (None, "GET", &notify, 401),
        (Some("Authorization: Bearer guess"), "POST", &notify, 401),
        // GET may read everything, and a notification is a send.
        (Some("Authorization: Bearer read-only"), "GET", &notify, 403),
        (
            Some("Authorization: Bearer read-only"),
            "POST",
            &notify,
            403,
        ),
        // The alias is not the path the rules see.
        (Some("Authorization: Bearer alias-only"), "POST", &ntfy, 403),
        // ops may notify globally and for alice, not for bob.
        (Some(OPS), "POST", &server.url("/u/bob/_/notify"), 403),
    ] {
        let mut args = vec!["-d", "message=hi"];
        if method == "GET" {
            args.push("-G");
        }
        if let Some(token) = token {
            args.extend_from_slice(&["-H", token]);
        }
        args.push(url);
        let (status, body) = curl_answer(&args);
        assert_eq!(status, expected, "{token:?} {method} {url}: {body}");
    }
    assert!(w.seen().is_empty(), "{:#?}", w.seen());
    assert!(alice.seen().is_empty(), "{:#?}", alice.seen());
    assert_eq!(notify_counters(&server), (0, 0));
    // The token as a query parameter is a credential, never a field.
    let (status, body) = curl_answer(&["-G", "-d", "token=s3cret", "-d", "message=hi", &notify]);
    assert_eq!(status, 200, "{body}");
    let object = w.one().json();
    assert_eq!(object["message"], "hi");
    assert!(!object.to_string().contains("s3cret"), "{object}");
}

#[test]
fn the_ntfy_alias_goes_where_notify_does_namespace_included() {
    let (w, alice) = (Fake::start(200), Fake::start(200));
    let backends = format!("{}{}", webhook(&w), under("/u/alice", &webhook(&alice)));
    let (server, _) = relay("alias", &backends, &[]);
    let (status, body) = curl_answer(&["-H", OPS, "-d", "message=global", &server.url("/_/ntfy")]);
    assert_eq!(status, 200, "{body}");
    assert_eq!(w.one().json()["message"], "global");
    assert!(alice.seen().is_empty());
    let (status, body) = curl_answer(&[
        "-H",
        OPS,
        "-G",
        "-d",
        "message=alice",
        &server.url("/u/alice/_/ntfy"),
    ]);
    assert_eq!(status, 200, "{body}");
    let object = alice.one().json();
    assert_eq!(
        (&object["message"], &object["namespace"]),
        (&serde_json::json!("alice"), &serde_json::json!("/u/alice"))
    );
    assert_eq!(w.seen().len(), 1);
}

#[test]
fn secrets_never_reach_the_log_or_an_answer() {
    use base64::Engine as _;
    let (m, n, basic, w) = (
        Fake::start(500),
        Fake::start(HANG),
        Fake::start(200),
        Fake::start(401),
    );
    let backends = format!(
        "{}{}[[notify.ntfy]]\nserver = \"{}\"\ntopic = \"private-topic\"\nuser = \"bot\"\npassword = \"pw_secret\"\n{}",
        matrix(&m),
        ntfy(&n),
        basic.url(""),
        webhook(&w)
    );
    let (server, _) = relay("secrets", &backends, &["--notify-timeout", "1"]);
    let (status, body) = curl_answer(&["-H", OPS, "-d", "message=hi", &server.url("/_/notify")]);
    assert_eq!(status, 502, "{body}");
    assert_eq!(
        json(&body)["failed"].as_array().map(Vec::len),
        Some(3),
        "{body}"
    );
    // The secrets did travel, each to its own backend.
    assert_eq!(m.one().header("Authorization"), Some("Bearer syt_secret"));
    assert_eq!(n.one().header("Authorization"), Some("Bearer tk_secret"));
    let pair = base64::engine::general_purpose::STANDARD.encode("bot:pw_secret");
    assert_eq!(
        basic.one().header("Authorization"),
        Some(format!("Basic {pair}").as_str())
    );
    assert_eq!(w.one().header("X-Secret"), Some("wh_secret"));
    // The failures are logged (at warn), and the log is at debug level.
    assert!(
        wait_for(*STEP, || server.log().contains(&m.host())),
        "no log line names the failed backend:\n{}",
        server.log()
    );
    let status = server.status();
    for text in [&body, &server.log(), &status] {
        for secret in [
            "syt_secret",
            "tk_secret",
            "pw_secret",
            &pair,
            "wh_secret",
            "s3cret",
            "private-topic",
            "!room:example.org",
            "room%3Aexample.org",
        ] {
            assert!(!text.contains(secret), "{secret} in {text}");
        }
    }
}

/// Runs patchcord with the access file `text` (bounded: it must exit) and
/// returns its exit code and stderr.
fn refused_start(name: &str, text: &str) -> (PathBuf, Option<i32>, String) {
    let file = temp_dir(&format!("notify-{name}")).join("access.toml");
    std::fs::write(&file, text).expect("write the access file");
    let child = command()
        .args(["--listen", "127.0.0.1:0", "--auth", file.to_str().unwrap()])
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start patchcord");
    let output = finish_within(child, *STEP);
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    (file, output.status.code(), stderr)
}

#[test]
fn a_bad_notify_table_stops_the_relay_at_start_naming_the_file() {
    // A Matrix backend without its room.
    let (file, code, stderr) = refused_start(
        "bad-missing",
        "[[notify.matrix]]\nhomeserver = \"http://127.0.0.1:9\"\naccess_token = \"syt_secret\"\n",
    );
    assert_eq!(code, Some(1), "{stderr}");
    assert!(stderr.contains(file.to_str().unwrap()), "{stderr}");
    assert!(stderr.contains("room"), "{stderr}");
    assert!(!stderr.contains("syt_secret"), "{stderr}");
    // A backend that is not http.
    let (file, code, stderr) = refused_start(
        "bad-scheme",
        "[[notify.ntfy]]\nserver = \"ftp://127.0.0.1\"\ntopic = \"a\"\ntoken = \"tk_secret\"\n",
    );
    assert_eq!(code, Some(1), "{stderr}");
    assert!(stderr.contains(file.to_str().unwrap()), "{stderr}");
    assert!(stderr.contains("server"), "{stderr}");
    assert!(!stderr.contains("tk_secret"), "{stderr}");
    // A backend kind there is none of.
    let (file, code, stderr) = refused_start("bad-kind", "[[notify.pager]]\nurl = \"http://x\"\n");
    assert_eq!(code, Some(1), "{stderr}");
    assert!(stderr.contains(file.to_str().unwrap()), "{stderr}");
}

#[test]
fn sighup_adds_backends_to_a_running_relay() {
    let w = Fake::start(200);
    let (server, file) = relay("sighup", "", &[]);
    let notify = |text: &str| {
        request(
            server.addr,
            &with_headers(
                "POST",
                "/_/notify",
                &[("Authorization", "Bearer s3cret")],
                text.as_bytes(),
            ),
        )
    };
    assert_eq!(notify("before").status, 503);
    std::fs::write(&file, format!("{TOKENS}\n{}", webhook(&w))).unwrap();
    server.signal(libc::SIGHUP);
    let mut last = 0;
    assert!(
        wait_for(*STEP, || {
            last = notify("after").status;
            last != 503
        }),
        "still no backend after SIGHUP"
    );
    assert_eq!(last, 200);
    // The 503s reached nobody; the first success is the one delivery.
    assert_eq!(w.one().json()["message"], "after");
    assert_eq!(notify_counters(&server), (1, 0));
}
