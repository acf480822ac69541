//! WebSocket tunnels (`/_/tunnel/HOST/PORT`, `/huproxy/NS/HOST/PORT`)
//! through the real binary, to TCP targets on loopback: `patchcord tunnel`
//! carrying stdin and stdout both ways, how either side's end ends the
//! other, refusals (401, 403, 426, 502) before any target is dialed or any
//! upgrade, pings both ways, bytes sent right behind the upgrade request,
//! and threads and descriptors given back.

use std::io::{self, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Child, ChildStdin, ChildStdout, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, mpsc};
use std::thread;
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};
use tungstenite::client::IntoClientRequest;
use tungstenite::handshake::HandshakeError;
use tungstenite::protocol::Role;
use tungstenite::{Message, WebSocket};

use crate::support::*;

// ── helpers ──────────────────────────────────────────────────────────────

/// Requests without a token use `public`, which reaches no target; `ops`
/// reaches every port of 127.0.0.1, `lan` only other hosts.
const FILE: &str = r#"
[tokens.public]
GET = ["/public/**"]

[tokens.ops]
token = "ops-token"
tunnel = ["127.0.0.1:*"]

[tokens.lan]
token = "lan-token"
tunnel = ["*.lan:22", "[::1]:*"]
"#;

const OPS: &str = "ops-token";

/// A `Sec-WebSocket-Key` (RFC 6455 §1.3's example).
const KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";

/// A relay with `FILE` as its access file, and `more` options.
fn relay(name: &str, more: &[&str]) -> Server {
    let file = temp_dir(name).join("access.toml");
    std::fs::write(&file, FILE).expect("write the access file");
    let mut args = vec!["--auth", file.to_str().unwrap()];
    args.extend_from_slice(more);
    Server::start_with(&args)
}

/// The tunnel path to port `port` of 127.0.0.1.
fn path(port: u16) -> String {
    format!("/_/tunnel/127.0.0.1/{port}")
}

/// Counter `name` of `/status`'s object `section` (`tunnels`, `connections`).
fn section(server: &Server, section: &str, name: &str) -> u64 {
    let status = server.status();
    let key = format!("\"{section}\":");
    let at = status
        .find(&key)
        .unwrap_or_else(|| panic!("no {section} in {status}"));
    json_counter(&status[at..], name)
}

/// Counter `name` of `/status`'s `tunnels`.
fn tunnels(server: &Server, name: &str) -> u64 {
    section(server, "tunnels", name)
}

/// Waits until `tunnels.open` is `n`; panics after [`STEP`].
fn wait_open(server: &Server, n: u64) {
    let done = wait_for(*STEP, || tunnels(server, "open") == n);
    assert!(
        done,
        "tunnels.open never became {n}: {}\nlog:\n{}",
        server.status(),
        server.log()
    );
}

/// A GET of `path` asking for a WebSocket, with more header lines `headers`.
fn upgrade_request(path: &str, headers: &[(&str, &str)]) -> Vec<u8> {
    let mut all = vec![
        ("Upgrade", "websocket"),
        ("Connection", "Upgrade"),
        ("Sec-WebSocket-Version", "13"),
        ("Sec-WebSocket-Key", KEY),
    ];
    all.extend_from_slice(headers);
    with_headers("GET", path, &all, b"")
}

/// A WebSocket client on `path` of the relay presenting `token`, over a
/// socket with read and write timeouts of [`STEP`].
fn ws_connect(server: &Server, path: &str, token: &str) -> WebSocket<TcpStream> {
    ws_connect_on(connect(server.addr), server, path, token)
}

/// [`ws_connect`] on a connection of the caller's.
fn ws_connect_on(
    stream: TcpStream,
    server: &Server,
    path: &str,
    token: &str,
) -> WebSocket<TcpStream> {
    let mut request = format!("ws://{}{path}", server.addr)
        .into_client_request()
        .expect("a request");
    request
        .headers_mut()
        .insert("Patch-Token", token.parse().expect("a header value"));
    match tungstenite::client::client(request, stream) {
        Ok((ws, response)) => {
            assert_eq!(response.status(), 101);
            ws
        }
        Err(HandshakeError::Failure(e)) => panic!("upgrade of {path}: {e}"),
        Err(HandshakeError::Interrupted(_)) => panic!("upgrade of {path} interrupted"),
    }
}

/// The next data message on `ws` (pings are answered on the way); panics
/// after [`STEP`].
fn next_data(ws: &mut WebSocket<TcpStream>) -> Vec<u8> {
    let deadline = Instant::now() + *STEP;
    loop {
        assert!(Instant::now() < deadline, "no data message in time");
        match ws.read().expect("a message") {
            Message::Binary(data) => return data.to_vec(),
            Message::Text(text) => return text.as_bytes().to_vec(),
            Message::Ping(_) | Message::Pong(_) | Message::Frame(_) => {
                ws.flush().expect("flush");
            }
            Message::Close(frame) => panic!("closed: {frame:?}"),
        }
    }
}

/// Reads `stream` until it ends, within `limit`: Ok(()) at its end, Err
/// with what happened instead (data, a timeout, an error).
fn read_end(stream: &mut TcpStream, limit: Duration) -> Result<(), String> {
    stream.set_read_timeout(Some(limit)).unwrap();
    let mut buf = [0u8; 4096];
    match stream.read(&mut buf) {
        Ok(0) => Ok(()),
        Ok(n) => Err(format!("{n} more bytes instead of the end")),
        Err(e) => Err(format!("no end within {limit:?}: {e}")),
    }
}

/// A target the test serves itself: each connection the relay makes is
/// taken with [`Target::accept`].
struct Target {
    listener: TcpListener,
}

impl Target {
    fn new() -> Target {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind a target");
        listener.set_nonblocking(true).unwrap();
        Target { listener }
    }

    fn port(&self) -> u16 {
        self.listener.local_addr().unwrap().port()
    }

    /// The next connection from the relay, blocking with timeouts of
    /// [`STEP`]; panics if none comes within [`STEP`].
    fn accept(&self) -> TcpStream {
        let deadline = Instant::now() + *STEP;
        loop {
            match self.listener.accept() {
                Ok((stream, _)) => {
                    stream.set_nonblocking(false).unwrap();
                    stream.set_read_timeout(Some(*STEP)).unwrap();
                    stream.set_write_timeout(Some(*STEP)).unwrap();
                    return stream;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    assert!(
                        Instant::now() < deadline,
                        "the relay never dialed the target"
                    );
                    thread::sleep(Duration::from_millis(5));
                }
                Err(e) => panic!("accept: {e}"),
            }
        }
    }

    /// Whether no connection has come (the relay dials before it answers,
    /// so after an answer a connection would be waiting here).
    fn is_untouched(&self) -> bool {
        matches!(self.listener.accept(), Err(e) if e.kind() == io::ErrorKind::WouldBlock)
    }
}

/// A TCP echo server on 127.0.0.1, a thread per connection; it stops
/// accepting when dropped.
struct Echo {
    port: u16,
    stop: Arc<AtomicBool>,
}

impl Echo {
    fn start() -> Echo {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind the echo server");
        listener.set_nonblocking(true).unwrap();
        let port = listener.local_addr().unwrap().port();
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = Arc::clone(&stop);
        thread::spawn(move || {
            let deadline = Instant::now() + *STEP * 30;
            while !stopped.load(Ordering::Relaxed) && Instant::now() < deadline {
                match listener.accept() {
                    Ok((stream, _)) => {
                        thread::spawn(move || echo(stream));
                    }
                    Err(_) => thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        Echo { port, stop }
    }
}

impl Drop for Echo {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// Sends back what `stream` sends until it ends, errs or is silent for [`STEP`].
fn echo(mut stream: TcpStream) {
    let _ = stream.set_nonblocking(false);
    let _ = stream.set_read_timeout(Some(*STEP));
    let _ = stream.set_write_timeout(Some(*STEP));
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match stream.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                if stream.write_all(&buf[..n]).is_err() {
                    return;
                }
            }
        }
    }
}

/// `patchcord tunnel URL ARGS…` with its stdin, stdout and stderr piped;
/// killed when dropped.
struct Client {
    child: Child,
}

impl Client {
    fn start(url: &str, args: &[&str]) -> Client {
        let child = command()
            .arg("tunnel")
            .arg(url)
            .args(args)
            .env_remove("RUST_LOG")
            .env_remove("PATCHCORD_TOKEN")
            .env_remove("PATCHCORD_KEEPALIVE_SECS")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start patchcord tunnel");
        Client { child }
    }

    fn stdin(&mut self) -> ChildStdin {
        self.child.stdin.take().expect("stdin")
    }

    /// Its stdout, read to the end by a thread.
    fn stdout(&mut self) -> Output {
        Output::read(self.child.stdout.take().expect("stdout"))
    }

    /// Waits up to `limit` for it to end.
    fn wait(&mut self, limit: Duration) -> Option<ExitStatus> {
        wait_child(&mut self.child, limit)
    }

    /// Its stderr, once it has ended.
    fn stderr(&mut self) -> String {
        let mut text = String::new();
        if let Some(mut stderr) = self.child.stderr.take() {
            let _ = stderr.read_to_string(&mut text);
        }
        text
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A child's stdout read to its end by a thread (which ends when the child
/// does: a killed child closes the pipe).
struct Output {
    got: Arc<AtomicUsize>,
    done: mpsc::Receiver<Vec<u8>>,
}

impl Output {
    fn read(mut stdout: ChildStdout) -> Output {
        let got = Arc::new(AtomicUsize::new(0));
        let counted = Arc::clone(&got);
        let (tx, done) = mpsc::channel();
        thread::spawn(move || {
            let mut all = Vec::new();
            let mut buf = vec![0u8; 64 * 1024];
            while let Ok(n) = stdout.read(&mut buf) {
                if n == 0 {
                    break;
                }
                all.extend_from_slice(&buf[..n]);
                counted.store(all.len(), Ordering::Relaxed);
            }
            let _ = tx.send(all);
        });
        Output { got, done }
    }

    /// Waits up to `limit` until `n` bytes have come; whether they have.
    fn wait(&self, n: usize, limit: Duration) -> bool {
        wait_for(limit, || self.got.load(Ordering::Relaxed) >= n)
    }

    /// Everything, once the child has closed its stdout (within [`STEP`]).
    fn finish(self) -> Vec<u8> {
        self.done.recv_timeout(*STEP).expect("stdout ended")
    }
}

/// The relay's open descriptors.
fn descriptors(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("/proc/PID/fd")
        .count()
}

/// The relay's threads.
fn threads(pid: u32) -> u64 {
    status_kib(pid, "Threads")
}

// ── carrying bytes ───────────────────────────────────────────────────────

#[test]
fn patchcord_tunnel_carries_16_mib_each_way_and_exits_0_when_stdin_ends() {
    let server = relay("tunnel-bulk", &[]);
    let echo = Echo::start();
    let len = if is_emulated() { 2 << 20 } else { 16 << 20 };
    let data = pattern(len, 7);
    let sent = Sha256::digest(&data);
    let mut client = Client::start(&server.url(&path(echo.port)), &["--token", OPS]);
    let output = client.stdout();
    let mut stdin = client.stdin();
    // stdin comes back when written, so that it stays open until the echo is in.
    let (tx, written) = mpsc::channel();
    thread::spawn(move || {
        let ok = stdin.write_all(&data).is_ok();
        let _ = tx.send((ok, stdin));
    });
    let all_back = output.wait(len, patience(Duration::from_secs(120)));
    let (ok, stdin) = written.recv_timeout(*STEP).expect("stdin written");
    assert!(ok, "writing stdin failed");
    assert!(
        all_back,
        "{} of {len} bytes came back; log:\n{}",
        output.got.load(Ordering::Relaxed),
        server.log()
    );
    drop(stdin);
    let status = client.wait(*STEP).expect("patchcord tunnel exited");
    assert!(status.success(), "{status:?}: {}", client.stderr());
    let back = output.finish();
    assert_eq!(back.len(), len);
    assert!(Sha256::digest(&back) == sent, "the bytes came back changed");
    wait_open(&server, 0);
    assert_eq!(tunnels(&server, "opened_total"), 1);
    assert_eq!(tunnels(&server, "bytes_to_target_total"), len as u64);
    assert_eq!(tunnels(&server, "bytes_from_target_total"), len as u64);
}

#[test]
fn a_target_that_closes_ends_patchcord_tunnel_after_its_bytes() {
    let server = relay("tunnel-target-close", &[]);
    let target = Target::new();
    let mut client = Client::start(&server.url(&path(target.port())), &["--token", OPS]);
    let output = client.stdout();
    // stdin stays open: only the target's end may end the client.
    let _stdin = client.stdin();
    let bytes = pattern(256 << 10, 3);
    let mut conn = target.accept();
    conn.write_all(&bytes).expect("the target writes");
    drop(conn);
    let closed = Instant::now();
    let status = client
        .wait(patience(Duration::from_secs(5)))
        .expect("patchcord tunnel exited after the target closed");
    let took = closed.elapsed();
    assert!(status.success(), "{status:?}: {}", client.stderr());
    let got = output.finish();
    assert_eq!(got.len(), bytes.len());
    assert!(got == bytes, "the bytes came out changed");
    assert!(took < patience(Duration::from_secs(5)), "{took:?}");
    wait_open(&server, 0);
    assert_eq!(
        tunnels(&server, "bytes_from_target_total"),
        bytes.len() as u64
    );
}

#[test]
fn huproxy_is_an_alias_of_the_tunnel_path() {
    let server = relay("tunnel-huproxy", &[]);
    let echo = Echo::start();
    let url = server.url(&format!("/huproxy/alice/127.0.0.1/{}", echo.port));
    let mut client = Client::start(&url, &["--token", OPS]);
    let output = client.stdout();
    let mut stdin = client.stdin();
    stdin.write_all(b"through huproxy\n").unwrap();
    assert!(output.wait(16, *STEP), "no echo; log:\n{}", server.log());
    drop(stdin);
    let status = client.wait(*STEP).expect("patchcord tunnel exited");
    assert!(status.success(), "{status:?}: {}", client.stderr());
    assert_eq!(output.finish(), b"through huproxy\n");
    // A raw WebSocket client too.
    let mut ws = ws_connect(
        &server,
        &format!("/huproxy/bob/127.0.0.1/{}", echo.port),
        OPS,
    );
    ws.send(Message::binary(b"raw".to_vec())).unwrap();
    assert_eq!(next_data(&mut ws), b"raw");
    assert_eq!(tunnels(&server, "opened_total"), 2);
}

#[test]
fn bytes_behind_the_upgrade_request_are_not_lost() {
    let server = relay("tunnel-early", &[]);
    let echo = Echo::start();
    let payload = b"sent in the same packet as the upgrade";
    let mask = [0x37, 0xfa, 0x21, 0x3d];
    // One masked binary frame, FIN set (RFC 6455 §5.2).
    let mut bytes = upgrade_request(&path(echo.port), &[("Patch-Token", OPS)]);
    bytes.extend_from_slice(&[0x82, 0x80 | payload.len() as u8]);
    bytes.extend_from_slice(&mask);
    bytes.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    let mut stream = connect(server.addr);
    send(&mut stream, &bytes);
    let (status, _) = read_head(&mut stream).expect("an answer");
    assert_eq!(status, 101);
    let mut ws = WebSocket::from_raw_socket(stream, Role::Client, None);
    assert_eq!(next_data(&mut ws), payload);
    assert_eq!(
        tunnels(&server, "bytes_to_target_total"),
        payload.len() as u64
    );
}

// ── ends ─────────────────────────────────────────────────────────────────

#[test]
fn a_killed_patchcord_tunnel_ends_the_target_connection() {
    let server = relay("tunnel-killed", &[]);
    let target = Target::new();
    let mut client = Client::start(&server.url(&path(target.port())), &["--token", OPS]);
    let mut stdin = client.stdin();
    let mut conn = target.accept();
    stdin.write_all(b"hello").unwrap();
    let mut got = [0u8; 5];
    conn.read_exact(&mut got).expect("the target got the bytes");
    assert_eq!(&got, b"hello");
    client.child.kill().expect("SIGKILL");
    read_end(&mut conn, patience(Duration::from_secs(5))).unwrap();
    wait_open(&server, 0);
}

#[test]
fn a_client_that_hangs_up_without_closing_ends_the_target_connection() {
    let server = relay("tunnel-hang-up", &[]);
    let target = Target::new();
    let mut ws = ws_connect(&server, &path(target.port()), OPS);
    let mut conn = target.accept();
    ws.send(Message::binary(b"hi".to_vec())).unwrap();
    let mut got = [0u8; 2];
    conn.read_exact(&mut got).expect("the target got the bytes");
    // No close frame: the socket just goes.
    drop(ws);
    read_end(&mut conn, patience(Duration::from_secs(5))).unwrap();
    wait_open(&server, 0);
}

#[test]
fn a_close_frame_ends_the_target_connection_and_is_answered() {
    let server = relay("tunnel-close-frame", &[]);
    let target = Target::new();
    let mut ws = ws_connect(&server, &path(target.port()), OPS);
    let mut conn = target.accept();
    ws.send(Message::binary(b"bye".to_vec())).unwrap();
    let mut got = [0u8; 3];
    conn.read_exact(&mut got).expect("the target got the bytes");
    ws.close(None).expect("send a close frame");
    // The relay answers the close; then the connection ends.
    let deadline = Instant::now() + *STEP;
    loop {
        assert!(Instant::now() < deadline, "no answer to the close");
        match ws.read() {
            Ok(Message::Close(_)) => {}
            Ok(other) => panic!("{other:?} after the close"),
            Err(tungstenite::Error::ConnectionClosed) => break,
            Err(e) => panic!("{e} instead of a clean close"),
        }
    }
    read_end(&mut conn, patience(Duration::from_secs(5))).unwrap();
    wait_open(&server, 0);
}

// ── pings ────────────────────────────────────────────────────────────────

#[test]
fn a_ping_is_answered_with_a_pong() {
    let server = relay("tunnel-pong", &[]);
    let echo = Echo::start();
    let mut ws = ws_connect(&server, &path(echo.port), OPS);
    ws.send(Message::Ping(b"are you there".to_vec().into()))
        .unwrap();
    let deadline = Instant::now() + *STEP;
    loop {
        assert!(Instant::now() < deadline, "no pong");
        match ws.read().expect("a message") {
            Message::Pong(data) => {
                assert_eq!(&data[..], b"are you there");
                break;
            }
            Message::Ping(_) => {}
            other => panic!("{other:?} instead of a pong"),
        }
    }
    // The ping went to no target.
    ws.send(Message::binary(b"data".to_vec())).unwrap();
    assert_eq!(next_data(&mut ws), b"data");
    assert_eq!(tunnels(&server, "bytes_to_target_total"), 4);
}

#[test]
fn an_idle_tunnel_is_pinged_and_kept_while_the_client_answers() {
    let server = relay("tunnel-pinged", &["--keepalive-secs", "0.3"]);
    let target = Target::new();
    let mut ws = ws_connect(&server, &path(target.port()), OPS);
    let mut conn = target.accept();
    // Five keepalives of silence from the client's side; tungstenite answers
    // each ping.
    ws.get_ref()
        .set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    let mut pings = 0;
    let quiet_until = Instant::now() + Duration::from_millis(1500);
    while Instant::now() < quiet_until {
        match ws.read() {
            Ok(Message::Ping(_)) => {
                pings += 1;
                ws.flush().expect("the pong goes");
            }
            Ok(other) => panic!("{other:?} on an idle tunnel"),
            Err(tungstenite::Error::Io(e))
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) => {}
            Err(e) => panic!("the idle tunnel broke: {e}"),
        }
    }
    assert!(pings >= 2, "{pings} pings in 1.5 s at --keepalive-secs 0.3");
    ws.get_ref().set_read_timeout(Some(*STEP)).unwrap();
    // The tunnel still carries, both ways.
    ws.send(Message::binary(b"still here".to_vec())).unwrap();
    let mut got = [0u8; 10];
    conn.read_exact(&mut got).expect("the target got the bytes");
    assert_eq!(&got, b"still here");
    conn.write_all(b"so am I").unwrap();
    assert_eq!(next_data(&mut ws), b"so am I");
    assert_eq!(tunnels(&server, "open"), 1);
}

#[test]
fn a_client_that_never_answers_pings_is_cut_off() {
    let server = relay("tunnel-no-pong", &["--keepalive-secs", "0.3"]);
    let target = Target::new();
    // A client that upgrades, then neither reads nor writes: only the
    // relay's pings can find it gone.
    let mut stream = connect(server.addr);
    send(
        &mut stream,
        &upgrade_request(&path(target.port()), &[("Patch-Token", OPS)]),
    );
    let (status, _) = read_head(&mut stream).expect("an answer");
    assert_eq!(status, 101);
    let mut conn = target.accept();
    read_end(&mut conn, patience(Duration::from_secs(5))).unwrap();
    wait_open(&server, 0);
    drop(stream);
}

// ── refusals ─────────────────────────────────────────────────────────────

#[test]
fn refusals_come_before_the_target_is_dialed() {
    let server = relay("tunnel-refusals", &[]);
    let target = Target::new();
    let at = path(target.port());
    let ask = |headers: &[(&str, &str)]| request(server.addr, &upgrade_request(&at, headers));
    // No token: public reaches no target.
    let got = ask(&[]);
    assert_eq!(got.status, 401, "{}", got.text());
    assert!(got.header("WWW-Authenticate").is_some());
    // A token no table knows.
    assert_eq!(ask(&[("Patch-Token", "nobody")]).status, 401);
    assert_eq!(
        request(
            server.addr,
            &upgrade_request(&format!("{at}?token=nobody"), &[])
        )
        .status,
        401
    );
    // A known token whose table lists other targets.
    let got = ask(&[("Patch-Token", "lan-token")]);
    assert_eq!(got.status, 403, "{}", got.text());
    let got = ask(&[("Authorization", "Bearer lan-token")]);
    assert_eq!(got.status, 403, "{}", got.text());
    // Allowed, but not a WebSocket upgrade: 426, by curl.
    let out = curl(&["-i", "-H", "Patch-Token: ops-token", &server.url(&at)]);
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(text.starts_with("HTTP/1.1 426"), "{text}");
    assert!(
        text.lines()
            .any(|l| l.to_ascii_lowercase().trim() == "upgrade: websocket"),
        "{text}"
    );
    // The wrong WebSocket version is 426 too.
    let got = request(
        server.addr,
        &with_headers(
            "GET",
            &at,
            &[
                ("Upgrade", "websocket"),
                ("Connection", "Upgrade"),
                ("Sec-WebSocket-Version", "8"),
                ("Sec-WebSocket-Key", KEY),
                ("Patch-Token", OPS),
            ],
            b"",
        ),
    );
    assert_eq!(got.status, 426);
    assert_eq!(got.header("Sec-WebSocket-Version"), Some("13"));
    assert!(target.is_untouched(), "a refused tunnel dialed its target");
    assert_eq!(tunnels(&server, "opened_total"), 0);
    assert_eq!(tunnels(&server, "failed_total"), 0);
    // The same target, allowed and asked properly, is dialed.
    let _ws = ws_connect(&server, &at, OPS);
    let _conn = target.accept();
    assert_eq!(tunnels(&server, "opened_total"), 1);
}

#[test]
fn tunnels_are_off_without_an_access_file() {
    let server = Server::start();
    let target = Target::new();
    for headers in [&[][..], &[("Patch-Token", OPS)][..]] {
        let got = request(server.addr, &upgrade_request(&path(target.port()), headers));
        assert_eq!(got.status, 403, "{}", got.text());
    }
    assert!(target.is_untouched());
}

#[test]
fn an_unreachable_target_is_502_naming_it_before_any_upgrade() {
    let server = relay("tunnel-502", &[]);
    let port = {
        let closed = TcpListener::bind("127.0.0.1:0").unwrap();
        closed.local_addr().unwrap().port()
    };
    let mut stream = connect(server.addr);
    send(
        &mut stream,
        &upgrade_request(&path(port), &[("Patch-Token", OPS)]),
    );
    let got = read_response(&mut stream).expect("an answer");
    assert_eq!(got.status, 502, "{}", got.text());
    assert!(
        got.text().contains(&format!("127.0.0.1:{port}")),
        "{}",
        got.text()
    );
    assert_eq!(got.header("Upgrade"), None);
    assert_eq!(tunnels(&server, "failed_total"), 1);
    assert_eq!(tunnels(&server, "opened_total"), 0);
}

#[test]
fn patchcord_tunnel_exits_1_naming_the_refusal_and_2_for_a_bad_url() {
    let server = relay("tunnel-client-refused", &[]);
    let closed = {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap().port()
    };
    let target = Target::new();
    for (url, token, status) in [
        (server.url(&path(target.port())), "lan-token", "403"),
        (server.url(&path(target.port())), "nobody", "401"),
        (server.url(&path(closed)), OPS, "502"),
    ] {
        let mut client = Client::start(&url, &["--token", token]);
        drop(client.stdin());
        let exit = client.wait(*STEP).expect("patchcord tunnel exited");
        let stderr = client.stderr();
        assert_eq!(exit.code(), Some(1), "{url} {token}: {stderr}");
        assert_eq!(stderr.lines().count(), 1, "{stderr}");
        assert!(stderr.contains(status), "{status}: {stderr}");
    }
    assert!(target.is_untouched());
    for url in ["relay/_/tunnel/x/1", "ftp://127.0.0.1/_/tunnel/x/1"] {
        let mut client = Client::start(url, &[]);
        let exit = client.wait(*STEP).expect("patchcord tunnel exited");
        let stderr = client.stderr();
        assert_eq!(exit.code(), Some(2), "{url}: {stderr}");
        assert_eq!(stderr.lines().count(), 1, "{stderr}");
    }
}

// ── resources ────────────────────────────────────────────────────────────

/// Opens `n` tunnels to `target` at once, then ends them: the even ones
/// by the client (a close frame, or a hang-up), the odd ones by the target.
fn open_and_end(server: &Server, target: &Target, n: usize) {
    let mut pairs: Vec<_> = (0..n)
        .map(|_| {
            let ws = ws_connect(server, &path(target.port()), OPS);
            (ws, target.accept())
        })
        .collect();
    wait_open(server, n as u64);
    for (i, (ws, conn)) in pairs.iter_mut().enumerate() {
        ws.send(Message::binary(vec![i as u8; 1000])).unwrap();
        let mut got = vec![0u8; 1000];
        conn.read_exact(&mut got).expect("the target got the bytes");
        conn.write_all(&got).unwrap();
        assert_eq!(next_data(ws), got);
    }
    for (i, (mut ws, mut conn)) in pairs.into_iter().enumerate() {
        if i % 2 == 1 {
            drop(conn);
            match ws.read() {
                Ok(Message::Close(_)) | Err(tungstenite::Error::ConnectionClosed) => {}
                other => panic!("{other:?} instead of the close"),
            }
            let _ = ws.flush();
        } else {
            if i % 4 == 0 {
                ws.close(None).unwrap();
            }
            drop(ws);
            read_end(&mut conn, *STEP).unwrap();
        }
    }
    wait_open(server, 0);
}

#[test]
fn tunnels_give_back_their_threads_and_descriptors() {
    let server = relay("tunnel-resources", &[]);
    let pid = server.pid();
    let target = Target::new();
    let at_once = 4;
    // Warm-up: the pool grows to what `at_once` tunnels and a /status need.
    open_and_end(&server, &target, at_once);
    let quiet = || {
        wait_for(*STEP, || section(&server, "connections", "open") <= 1);
        // The lowest count over a while: the last /status's socket may
        // still be closing.
        let mut least = usize::MAX;
        for _ in 0..20 {
            least = least.min(descriptors(pid));
            thread::sleep(Duration::from_millis(10));
        }
        least
    };
    let fds_before = quiet();
    let threads_before = threads(pid);
    for _ in 0..3 {
        open_and_end(&server, &target, at_once);
        // Refused and failed tunnels too.
        let closed = {
            let listener = TcpListener::bind("127.0.0.1:0").unwrap();
            listener.local_addr().unwrap().port()
        };
        let got = request(
            server.addr,
            &upgrade_request(&path(closed), &[("Patch-Token", OPS)]),
        );
        assert_eq!(got.status, 502);
        assert_eq!(request(server.addr, &get(&path(target.port()))).status, 401);
    }
    assert_eq!(tunnels(&server, "opened_total"), 4 * at_once as u64);
    let fds_back = wait_for(*STEP, || descriptors(pid) <= fds_before);
    assert!(
        fds_back,
        "descriptors {} > {fds_before} before; {:?}",
        descriptors(pid),
        std::fs::read_dir(format!("/proc/{pid}/fd"))
            .unwrap()
            .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
            .collect::<Vec<_>>()
    );
    // Idle workers wait 30 s for the next connection before they retire,
    // so the pool the warm-up grew serves the later tunnels: 12 more
    // tunnels take no more threads than the warm-up's 4, but for a worker
    // or two a connection may find not yet back in the pool.
    let threads_after = threads(pid);
    assert!(
        threads_after <= threads_before + 2,
        "{threads_after} threads, {threads_before} before"
    );
}

// ── slow peers and shutdown ──────────────────────────────────────────────

#[test]
fn a_slow_reader_keeps_its_tunnel_through_keepalives() {
    // The relay's socket to the client fills and stays full: its pings
    // queue behind the data (a write that would block), and a client
    // that takes bytes, however slowly, is alive.
    let server = relay("tunnel-slow", &["--keepalive-secs", "0.3"]);
    let target = Target::new();
    // A small receive buffer (loopback's grows to 32 MiB): the relay's
    // socket fills as soon as the client pauses.
    let stream = connect(server.addr);
    let small: libc::c_int = 64 * 1024;
    // SAFETY: SO_RCVBUF reads one int from `small`, alive through the call,
    // on a socket this test owns.
    let rc = unsafe {
        libc::setsockopt(
            std::os::fd::AsRawFd::as_raw_fd(&stream),
            libc::SOL_SOCKET,
            libc::SO_RCVBUF,
            (&small as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    assert_eq!(rc, 0, "SO_RCVBUF");
    let mut ws = ws_connect_on(stream, &server, &path(target.port()), OPS);
    let mut conn = target.accept();
    let size = if is_emulated() { 4 << 20 } else { 16 << 20 };
    let data = pattern(size, 7);
    let sent = data.clone();
    let writer = thread::spawn(move || conn.write_all(&sent).map(|()| conn));
    let mut got = Vec::with_capacity(size);
    let deadline = Instant::now() + patience(Duration::from_secs(60));
    while got.len() < size {
        assert!(Instant::now() < deadline, "{} of {size} bytes", got.len());
        let before = got.len();
        got.extend_from_slice(&next_data(&mut ws));
        // About 20 MiB/s: the relay's buffers fill, and it keeps waiting;
        // once, a pause longer than a keepalive: the relay's ping meets a
        // full socket, and waits behind the data.
        let pause = if before < size / 4 && got.len() >= size / 4 {
            500
        } else {
            3
        };
        thread::sleep(Duration::from_millis(pause));
    }
    // Still open (checked at once: a client that stops reading stops
    // answering pings, and is dropped soon after).
    assert_eq!(tunnels(&server, "open"), 1, "{}", server.log());
    assert!(got == data, "the bytes came back changed");
    let _conn = writer.join().unwrap().expect("the target wrote it all");
}

#[test]
fn a_stopping_relay_closes_its_tunnels_and_the_client_exits_0() {
    let mut server = relay("tunnel-stop", &[]);
    let target = Target::new();
    let mut client = Client::start(&server.url(&path(target.port())), &["--token", OPS]);
    let _stdin = client.stdin();
    let _out = client.stdout();
    let _conn = target.accept();
    wait_open(&server, 1);
    server.signal(libc::SIGTERM);
    let status = client
        .wait(patience(Duration::from_secs(5)))
        .expect("patchcord tunnel ended with the relay");
    assert!(status.success(), "{status:?}: {}", client.stderr());
    assert!(server.wait_exit(patience(Duration::from_secs(5))).is_some());
}
