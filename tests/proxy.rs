//! The documented reverse-proxy configuration, run: `contrib/nginx.conf`,
//! as the README shows it, with nginx (Debian's, on the loopback) in front
//! of patchcord; only its listen port and upstream address are changed.
//! Through it: a queue pair, hang-ups on either side that reach patchcord,
//! a 64 MiB body streamed from sender to receiver that nginx stores
//! nowhere on the way, a chunked body passed on as it comes, an SSE subscription silent for 5 s that then
//! gets a message at once, a request/responder exchange, and
//! `--trust-proxy` telling clients apart by the address nginx appends to
//! `X-Forwarded-For`. Each test has its own patchcord and nginx, so they
//! run side by side and the 5 s of silence set the pace. Without nginx
//! they say SKIP and pass; `.ci/run` installs it.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use crate::support::*;

/// The documented configurations.
const NGINX_CONF: &str = include_str!("../contrib/nginx.conf");
const CADDYFILE: &str = include_str!("../contrib/Caddyfile");

/// The lines of `contrib/nginx.conf` the tests change, and only them.
const LISTEN: &str = "listen 80 ";
const UPSTREAM: &str = "server 127.0.0.1:3000;";
const SERVER_NAME: &str = "server_name relay.example.org;";

/// The test certificates: a CA of their own and a certificate it signed
/// for 127.0.0.1 (made with openssl, valid for a century; the key is for
/// these tests only).
const TLS_DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/tls");

#[test]
fn the_configurations_are_in_the_readme_as_they_are_tested() {
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    assert!(
        readme.contains(&format!("```nginx\n{NGINX_CONF}```\n")),
        "the README must show contrib/nginx.conf verbatim in an nginx fence"
    );
    assert!(
        readme.contains(&format!("```\n{CADDYFILE}```\n")),
        "the README must show contrib/Caddyfile verbatim in a fence"
    );
    // What the running tests cannot show in seconds: waits of hours.
    for name in ["proxy_read_timeout", "proxy_send_timeout"] {
        let value = directive(NGINX_CONF, name).unwrap_or_else(|| panic!("no {name}"));
        assert!(
            seconds(value) >= 3600,
            "{name} {value}: a receiver may wait an hour or more"
        );
    }
    for (name, value) in [
        ("proxy_buffering", "off"),
        ("proxy_request_buffering", "off"),
        ("proxy_http_version", "1.1"),
        ("client_max_body_size", "0"),
        (
            "proxy_set_header X-Forwarded-For",
            "$proxy_add_x_forwarded_for",
        ),
    ] {
        assert_eq!(directive(NGINX_CONF, name), Some(value), "{name}");
    }
    assert!(CADDYFILE.contains("reverse_proxy 127.0.0.1:3000 {"));
}

#[test]
fn queue_pair_meets_through_nginx_and_hang_ups_reach_patchcord() {
    let Some((server, nginx)) = behind_nginx("queue", &[]) else {
        return;
    };
    let url = nginx.url("/jobs");
    // A receiver that leaves while it waits: nginx closes its connection
    // to patchcord, which sees the hang-up and never pairs it.
    let gone = spawn_curl(&[&url]);
    server.wait_parked(1);
    stop(gone);
    server.wait_hangups(1);
    // The same for a sender.
    let gone = spawn_curl(&["-d", "from a sender that left", &url]);
    server.wait_parked(2);
    stop(gone);
    server.wait_hangups(2);

    let producer = spawn_curl(&[
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}",
        "-H",
        "Patch-H-Title: via nginx",
        "-d",
        "hello through nginx",
        &url,
    ]);
    server.wait_parked(3);
    let consumer = curl(&["-i", &url]);
    let got = text(&consumer);
    assert!(got.starts_with("HTTP/1.1 200 OK\r\n"), "{got}");
    assert_eq!(dumped(&got, "Title"), Some("via nginx"), "{got}");
    assert!(got.ends_with("\r\n\r\nhello through nginx"), "{got}");
    let producer = finish(producer);
    assert_eq!(text(&producer), "200", "{producer:?}");
    nginx.assert_nothing_stored();
}

#[test]
fn sixty_four_mib_stream_through_nginx_without_its_disk() {
    let Some((server, nginx)) = behind_nginx("stream", &[]) else {
        return;
    };
    let data = Arc::new(pattern(64 << 20, 80));
    let mut consumer = connect(nginx.addr());
    send(&mut consumer, &get("/stream"));
    server.wait_parked(1);

    // The sender (`curl -T file`: with a Content-Length, so that patchcord
    // does not say X-Accel-Buffering: no, and nginx's own settings count)
    // sends 4 MiB, waits for a word, then sends the rest.
    let (go, wait) = std::sync::mpsc::channel::<()>();
    let sent = Arc::new(AtomicUsize::new(0));
    let producer = {
        let (addr, data, sent) = (nginx.addr(), Arc::clone(&data), Arc::clone(&sent));
        thread::spawn(move || {
            let mut stream = connect(addr);
            let head = format!(
                "PUT /stream HTTP/1.1\r\nHost: relay.example.org\r\nContent-Length: {}\r\n\r\n",
                data.len()
            );
            send(&mut stream, head.as_bytes());
            for (i, piece) in data.chunks(256 << 10).enumerate() {
                if i * (256 << 10) == 4 << 20 {
                    wait.recv_timeout(*STEP).expect("the word to go on");
                }
                send(&mut stream, piece);
                sent.fetch_add(piece.len(), Ordering::Relaxed);
            }
            read_response(&mut stream).expect("the sender's answer")
        })
    };

    // The receiver has bytes while the sender pauses: nginx passed the
    // body on as it came instead of gathering it first.
    let (status, headers) = read_head(&mut consumer).expect("the receiver's head");
    assert_eq!(status, 200, "{headers:?}");
    let mut got = vec![0; data.len()];
    let mut have = consumer.read(&mut got).expect("a first piece");
    assert!(have > 0, "the body ended at once");
    nginx.assert_nothing_stored();

    // The receiver stops reading while the sender goes on: the sender is
    // held back by it, not by nginx's disk, where nothing of it lands.
    go.send(()).unwrap();
    let deadline = Instant::now() + *STEP;
    let mut last = (sent.load(Ordering::Relaxed), Instant::now());
    while last.0 < data.len() && last.1.elapsed() < Duration::from_millis(300) {
        assert!(Instant::now() < deadline, "the sender never settled");
        thread::sleep(Duration::from_millis(10));
        let now = sent.load(Ordering::Relaxed);
        if now != last.0 {
            last = (now, Instant::now());
        }
    }
    nginx.assert_nothing_stored();

    while have < got.len() {
        match consumer.read(&mut got[have..]).expect("the body") {
            0 => panic!("the body ended after {have} bytes"),
            n => have += n,
        }
    }
    let answer = producer.join().expect("the sender");
    assert_eq!(answer.status, 200, "{}", answer.text());
    assert!(got == *data, "64 MiB body differs");
    nginx.assert_nothing_stored();
}

#[test]
fn chunked_sender_streams_through_nginx() {
    let Some((server, nginx)) = behind_nginx("chunked", &[]) else {
        return;
    };
    let mut consumer = connect(nginx.addr());
    send(&mut consumer, &get("/log"));
    server.wait_parked(1);
    // The sender of `tail -f log | curl -T -`: a chunked body, which nginx
    // passes on as it comes only to an HTTP/1.1 upstream. It pauses after
    // its first line, which must reach the receiver meanwhile.
    let mut producer = connect(nginx.addr());
    send(
        &mut producer,
        b"POST /log HTTP/1.1\r\nHost: relay.example.org\r\nTransfer-Encoding: chunked\r\n\r\nb\r\nfirst line\n\r\n",
    );
    let (head, mut body) = Chunks::start(consumer);
    assert_eq!(head.status, 200, "{head:?}");
    assert_eq!(body.until(b"\n", 1), b"first line\n");
    send(&mut producer, b"c\r\nsecond line\n\r\n0\r\n\r\n");
    assert_eq!(body.until(b"\n", 1), b"second line\n");
    assert_eq!(body.next_chunk().expect("the end"), None);
    assert_eq!(read_response(&mut producer).unwrap().status, 200);
    nginx.assert_nothing_stored();
}

#[test]
fn sse_subscription_through_nginx_gets_a_message_after_five_silent_seconds() {
    // Keepalives far apart, so that nothing at all crosses nginx while the
    // channel is silent: the stream must stay open on its own.
    let Some((server, nginx)) = behind_nginx("sse", &["--keepalive-secs", "600"]) else {
        return;
    };
    let url = nginx.url("/pubsub/news");
    let head = nginx.dir.join("sse-head");
    let mut subscriber = spawn_curl(&[
        "-N",
        "-D",
        head.to_str().unwrap(),
        "-H",
        "Accept: text/event-stream",
        &url,
    ]);
    let received = collect(subscriber.stdout.take().unwrap());
    server.wait_streams(1);
    wait_until("the stream's head through nginx", || {
        std::fs::read_to_string(&head).is_ok_and(|h| h.contains("text/event-stream"))
    });

    thread::sleep(Duration::from_secs(5));
    assert!(
        subscriber.try_wait().unwrap().is_none(),
        "the silent stream was ended: {}",
        nginx.error_log()
    );
    let early = String::from_utf8_lossy(&received.lock().unwrap()).into_owned();
    assert_eq!(early, "", "nothing was published yet");

    let published = curl(&["-i", "-d", "after five silent seconds", &url]);
    let at = Instant::now();
    let answer = text(&published);
    assert!(answer.starts_with("HTTP/1.1 200 OK\r\n"), "{answer}");
    assert_eq!(dumped(&answer, "Patch-Subscribers"), Some("1"), "{answer}");
    // At once: nginx holds nothing back (a held event would wait for the
    // next keepalive, ten minutes off).
    let limit = patience(Duration::from_secs(2));
    loop {
        let got = String::from_utf8_lossy(&received.lock().unwrap()).into_owned();
        if got.contains("data: after five silent seconds\n\n") {
            assert!(got.starts_with("id: "), "{got}");
            break;
        }
        assert!(
            at.elapsed() < limit,
            "the event did not arrive within {limit:?}: {got:?}"
        );
        thread::sleep(Duration::from_millis(5));
    }
    stop(subscriber);
}

#[test]
fn request_and_responder_meet_through_nginx() {
    let Some((server, nginx)) = behind_nginx("reqres", &[]) else {
        return;
    };
    let responder = spawn_curl(&[
        "-i",
        "-H",
        "Content-Type: text/plain",
        "-d",
        "the answer",
        &nginx.url("/res/site"),
    ]);
    server.wait_parked(1);
    let requester = curl(&[
        "-i",
        "-X",
        "PUT",
        "--data-binary",
        "the request",
        &nginx.url("/req/site/page.html?q=1"),
    ]);
    let answer = text(&requester);
    assert!(answer.starts_with("HTTP/1.1 200 OK\r\n"), "{answer}");
    assert_eq!(dumped(&answer, "Content-Type"), Some("text/plain"));
    assert!(answer.ends_with("\r\n\r\nthe answer"), "{answer}");

    let responder = finish(responder);
    let request = text(&responder);
    assert!(request.starts_with("HTTP/1.1 200 OK\r\n"), "{request}");
    assert_eq!(dumped(&request, "Patch-Method"), Some("PUT"), "{request}");
    assert_eq!(dumped(&request, "Patch-Path"), Some("/page.html"));
    assert_eq!(
        dumped(&request, "Patch-Uri"),
        Some("/req/site/page.html?q=1")
    );
    // What nginx adds reaches the responder too.
    assert_eq!(dumped(&request, "Patch-H-Host"), Some("127.0.0.1"));
    assert_eq!(
        dumped(&request, "Patch-H-X-Forwarded-For"),
        Some("127.0.0.1")
    );
    assert_eq!(dumped(&request, "Patch-H-X-Forwarded-Proto"), Some("http"));
    assert!(request.ends_with("\r\n\r\nthe request"), "{request}");
}

#[test]
fn trusting_nginx_limits_each_client_and_no_client_can_pose_as_another() {
    let Some((_server, nginx)) = behind_nginx(
        "xff",
        &[
            "--trust-proxy",
            "127.0.0.1",
            "--rate-limit",
            "1/m",
            "--rate-burst",
            "1",
        ],
    ) else {
        return;
    };
    // Clients on 127.0.0.2 and 127.0.0.3; nginx reaches patchcord from
    // 127.0.0.1, the trusted proxy.
    let status = |from: &str, headers: &[&str]| {
        let mut args = vec!["--interface", from, "-o", "/dev/null", "-w", "%{http_code}"];
        args.extend_from_slice(headers);
        let url = nginx.url("/status");
        args.push(&url);
        let got = curl(&args);
        assert!(got.status.success(), "curl from {from}: {got:?}");
        text(&got)
    };
    assert_eq!(status("127.0.0.2", &[]), "200");
    assert_eq!(
        status("127.0.0.2", &[]),
        "429",
        "its own one request a minute"
    );
    // nginx appends the address it saw to what the client claims.
    let spoofed = ["-H", "X-Forwarded-For: 198.51.100.7"];
    assert_eq!(status("127.0.0.2", &spoofed), "429");
    // Another client, its own bucket: without --trust-proxy every request
    // would be nginx's, and this one would be refused as well.
    assert_eq!(status("127.0.0.3", &[]), "200");
}

/// nginx running the documented server block on a free port of the
/// loopback, in front of a patchcord, as one foreground process of this
/// test; killed when dropped.
struct Nginx {
    child: Child,
    port: u16,
    dir: PathBuf,
}

impl Nginx {
    /// Starts `binary` with `upstream` in place of `127.0.0.1:3000`; with
    /// `tls`, it listens for HTTPS with the test certificate (as
    /// `certbot --nginx` would make it).
    fn start(binary: &Path, name: &str, upstream: SocketAddr, tls: bool) -> Nginx {
        for line in [LISTEN, UPSTREAM, SERVER_NAME] {
            assert_eq!(NGINX_CONF.matches(line).count(), 1, "{line:?} once");
        }
        let dir = temp_dir(&format!("nginx-{name}"));
        let log = dir.join("error.log");
        // A port that was free a moment ago may be taken before nginx
        // binds it: then try another.
        for _ in 0..5 {
            let port = free_port();
            let (listen, certificate) = if tls {
                (
                    format!("listen 127.0.0.1:{port} ssl "),
                    format!(
                        "{SERVER_NAME}\n    ssl_certificate {TLS_DIR}/server.pem;\n    ssl_certificate_key {TLS_DIR}/server.key;"
                    ),
                )
            } else {
                (format!("listen 127.0.0.1:{port} "), SERVER_NAME.to_owned())
            };
            let site = NGINX_CONF
                .replacen(LISTEN, &listen, 1)
                .replacen(UPSTREAM, &format!("server {upstream};"), 1)
                .replacen(SERVER_NAME, &certificate, 1);
            std::fs::write(dir.join("site.conf"), site).unwrap();
            std::fs::write(dir.join("nginx.conf"), main_conf(&dir)).unwrap();
            let _ = std::fs::remove_file(&log);
            let mut child = Command::new(binary)
                .arg("-p")
                .arg(&dir)
                .arg("-c")
                .arg(dir.join("nginx.conf"))
                .arg("-e")
                .arg(&log)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("start nginx");
            if answers(&mut child, port, &log) {
                return Nginx { child, port, dir };
            }
            let said = std::fs::read_to_string(&log).unwrap_or_default();
            assert!(said.contains("Address already in use"), "nginx: {said}");
        }
        panic!("no free port for nginx in five tries");
    }

    fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    /// `http://127.0.0.1:PORT{path}`, through nginx.
    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr())
    }

    fn error_log(&self) -> String {
        std::fs::read_to_string(self.dir.join("error.log")).unwrap_or_default()
    }

    /// Fails if nginx stored a request or response body on disk (it says
    /// so in its log: it unlinks the temporary file as it opens it): with
    /// the documented configuration it streams them.
    fn assert_nothing_stored(&self) {
        let log = self.error_log();
        assert!(
            !log.contains("buffered to a temporary file"),
            "nginx stored a body: {log}"
        );
        for temp in ["client_body", "proxy"] {
            let stored = files_under(&self.dir.join(temp));
            assert!(stored.is_empty(), "nginx stored bodies: {stored:?}");
        }
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if !thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// Waits until the nginx just started on `port` answers (a response that
/// nginx sent, its own or patchcord's through it); false if it exited
/// first. Fails after [`STEP`], with nginx's `log`.
fn answers(child: &mut Child, port: u16, log: &Path) -> bool {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let deadline = Instant::now() + *STEP;
    loop {
        if child.try_wait().expect("try_wait").is_some() {
            return false;
        }
        if let Ok(mut stream) = TcpStream::connect_timeout(&addr, Duration::from_millis(200)) {
            stream.set_read_timeout(Some(*STEP)).unwrap();
            stream.set_write_timeout(Some(*STEP)).unwrap();
            send(&mut stream, &get("/status"));
            if let Ok(got) = read_response(&mut stream) {
                if got.header("server").is_some_and(|s| s.starts_with("nginx")) {
                    return true;
                }
            }
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "nginx did not answer: {}",
                std::fs::read_to_string(log).unwrap_or_default()
            );
        }
        thread::sleep(Duration::from_millis(10));
    }
}

/// nginx's main configuration around the documented server block: one
/// foreground process, everything it writes inside `dir` (its log with
/// warnings, such as a body buffered to a file), and Debian's `http`
/// settings from /etc/nginx/nginx.conf (gzip on among them, which the
/// server block turns off).
fn main_conf(dir: &Path) -> String {
    let dir = dir.display();
    format!(
        "daemon off;
master_process off;
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
events {{
    worker_connections 256;
}}
http {{
    sendfile on;
    tcp_nopush on;
    types_hash_max_size 2048;
    default_type application/octet-stream;
    gzip on;
    access_log off;
    client_body_temp_path {dir}/client_body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
    include {dir}/site.conf;
}}
"
    )
}

/// nginx from PATH, else Debian's /usr/sbin/nginx (not in a user's PATH).
fn nginx_binary() -> Option<PathBuf> {
    installed("nginx")
}

/// patchcord started with `args` (and debug logging), and nginx in front;
/// without nginx, None, after a loud SKIP (once, and past the test
/// harness, which would hide it in a test that passes).
fn behind_nginx(name: &str, args: &[&str]) -> Option<(Server, Nginx)> {
    let Some(binary) = nginx_binary() else {
        static SAID: std::sync::Once = std::sync::Once::new();
        SAID.call_once(|| {
            let _ = std::io::stderr().write_all(
                b"SKIP: nginx not installed (.ci/run installs Debian's nginx): tests/proxy.rs runs no proxy\n",
            );
        });
        return None;
    };
    let server = Server::start_with(args);
    let nginx = Nginx::start(&binary, name, server.addr, name.ends_with("-tls"));
    Some((server, nginx))
}

/// A port of 127.0.0.1 that was free just now.
fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind a free port");
    listener.local_addr().unwrap().port()
}

/// Every file under `dir`, in subdirectories too (none if it is missing).
fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let path = entry.path();
        if path.is_dir() {
            found.extend(files_under(&path));
        } else {
            found.push(path);
        }
    }
    found
}

/// Everything `from` yields, gathered by a thread as it comes.
fn collect(mut from: impl Read + Send + 'static) -> Arc<Mutex<Vec<u8>>> {
    let gathered = Arc::new(Mutex::new(Vec::new()));
    let sink = Arc::clone(&gathered);
    thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok(n) = from.read(&mut buf) {
            if n == 0 {
                break;
            }
            sink.lock().unwrap().extend_from_slice(&buf[..n]);
        }
    });
    gathered
}

/// Polls `done` until it holds; fails after [`STEP`].
fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + *STEP;
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        thread::sleep(Duration::from_millis(5));
    }
}

/// Ends a client that is still waiting.
fn stop(mut child: Child) {
    let _ = child.kill();
    let _ = child.wait();
}

/// A command's standard output as text.
fn text(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// The value of header `name` in a `curl -i` dump (any case).
fn dumped<'a>(dump: &'a str, name: &str) -> Option<&'a str> {
    dump.lines().find_map(|line| {
        let (field, value) = line.split_once(':')?;
        field.eq_ignore_ascii_case(name).then(|| value.trim())
    })
}

/// The value of the first `name value;` line of an nginx configuration
/// (comments aside), without its semicolon.
fn directive<'a>(conf: &'a str, name: &str) -> Option<&'a str> {
    conf.lines()
        .map(|line| line.split('#').next().unwrap().trim())
        .find_map(|line| {
            let rest = line.strip_prefix(name)?.strip_prefix(' ')?;
            Some(rest.trim().trim_end_matches(';').trim())
        })
}

/// An nginx time (`90`, `90s`, `30m`, `24h`, `7d`) in seconds.
fn seconds(value: &str) -> u64 {
    let (number, unit) = value.split_at(value.trim_end_matches(char::is_alphabetic).len());
    let number: u64 = number.parse().unwrap_or_else(|_| panic!("a time: {value}"));
    number
        * match unit {
            "" | "s" => 1,
            "m" => 60,
            "h" => 3600,
            "d" => 86400,
            _ => panic!("a time unit nginx knows: {value}"),
        }
}

#[test]
fn a_tunnel_goes_through_nginx() {
    tunnel_through_nginx("tunnel");
}

#[test]
fn a_tunnel_goes_through_nginx_over_https() {
    tunnel_through_nginx("tunnel-tls");
}

/// `patchcord tunnel` through the documented nginx, over HTTPS when `name`
/// ends with `-tls` (the relay's certificate from the test CA, trusted
/// with `--cacert`; without it, refused, since the built-in roots do not
/// know that CA).
fn tunnel_through_nginx(name: &str) {
    let tls = name.ends_with("-tls");
    let dir = temp_dir(&format!("access-{name}"));
    let file = dir.join("access.toml");
    std::fs::write(
        &file,
        "[tokens.laptop]\ntoken = \"laptop-token\"\ntunnel = [\"127.0.0.1:*\"]\n",
    )
    .unwrap();
    let Some((server, nginx)) = behind_nginx(name, &["--auth", file.to_str().unwrap()]) else {
        return;
    };
    let url = |path: &str| {
        let url = nginx.url(path);
        if tls {
            url.replacen("http://", "https://", 1)
        } else {
            url
        }
    };
    if tls {
        // The built-in roots do not know the test CA: refused, one line.
        let refused = command()
            .arg("tunnel")
            .arg(url("/_/tunnel/127.0.0.1/9"))
            .args(["--token", "laptop-token"])
            .env_remove("PATCHCORD_CACERT")
            .stdin(Stdio::null())
            .output()
            .expect("run patchcord tunnel");
        assert_eq!(refused.status.code(), Some(1));
        let said = String::from_utf8_lossy(&refused.stderr);
        assert!(said.contains("certificate"), "{said}");
        assert_eq!(said.lines().count(), 1, "{said}");
    }
    // A target that takes five bytes, answers, and closes.
    let target = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = target.local_addr().unwrap().port();
    let served = thread::spawn(move || {
        let (mut conn, _) = target.accept().unwrap();
        conn.set_read_timeout(Some(*STEP)).unwrap();
        let mut got = [0u8; 5];
        conn.read_exact(&mut got).unwrap();
        conn.write_all(&got.to_ascii_uppercase()).unwrap();
        got
    });
    let mut client = command();
    client
        .arg("tunnel")
        .arg(url(&format!("/_/tunnel/127.0.0.1/{port}")))
        .args(["--token", "laptop-token"]);
    if tls {
        client.arg("--cacert").arg(format!("{TLS_DIR}/ca.pem"));
    }
    let mut client = client
        .env_remove("PATCHCORD_TOKEN")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start patchcord tunnel");
    // stdin stays open: the target's close ends the tunnel.
    let mut stdin = client.stdin.take().unwrap();
    stdin.write_all(b"hello").unwrap();
    let output = finish_within(client, patience(*STEP));
    drop(stdin);
    assert!(
        output.status.success(),
        "{:?}: {}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    assert_eq!(output.stdout, b"HELLO");
    assert_eq!(&served.join().unwrap(), b"hello");
    server.wait_counter("opened_total", 1);
}

#[test]
fn a_notification_reaches_an_https_webhook_that_its_cacert_vouches_for() {
    let dir = temp_dir("access-notify-tls");
    let file = dir.join("access.toml");
    let rules = "[tokens.public]\nPOST = [\"/pubsub/hooked\"]\nGET = [\"/pubsub/hooked\"]\n\
                 [tokens.ops]\ntoken = \"ops-token\"\nPOST = [\"/_/notify\"]\n";
    std::fs::write(&file, rules).unwrap();
    let Some((server, nginx)) = behind_nginx("notify-tls", &["--auth", file.to_str().unwrap()])
    else {
        return;
    };
    // The webhook: the relay's own pubsub channel, through nginx's HTTPS
    // (its port is known only now: the file is read again on SIGHUP).
    let hook = nginx
        .url("/pubsub/hooked")
        .replacen("http://", "https://", 1);
    let notify = |text: &str| {
        let out = curl(&[
            "-s",
            "-H",
            "Patch-Token: ops-token",
            "-d",
            text,
            &server.url("/_/notify"),
        ]);
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let configure = |cacert: &str| {
        std::fs::write(
            &file,
            format!("{rules}[[notify.webhook]]\nurl = \"{hook}\"\n{cacert}"),
        )
        .unwrap();
        server.signal(libc::SIGHUP);
    };
    // Without its CA, the webhook's certificate is refused: 502, saying so.
    configure("");
    let refused = wait_answer(&notify, "\"failed\"");
    assert!(refused.contains("certificate"), "{refused}");
    configure(&format!("cacert = \"{TLS_DIR}/ca.pem\"\n"));
    wait_answer(&notify, "\"sent\"");
    let got = curl(&["-s", &server.url("/pubsub/hooked?after=0")]);
    let got = String::from_utf8_lossy(&got.stdout);
    assert!(got.contains("\"message\":\"try\""), "{got}");
}

/// Sends notifications until one's answer contains `needle` (the relay
/// takes a moment to read its file again), within [`STEP`].
fn wait_answer(notify: &dyn Fn(&str) -> String, needle: &str) -> String {
    let deadline = Instant::now() + *STEP;
    loop {
        let answer = notify("try");
        if answer.contains(needle) {
            return answer;
        }
        assert!(Instant::now() < deadline, "no {needle} in time: {answer}");
        thread::sleep(Duration::from_millis(50));
    }
}
