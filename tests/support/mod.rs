//! Starting the real binary on 127.0.0.1:0 and talking to it: a raw HTTP
//! client on TcpStream (every socket with timeouts), curl and bash runners,
//! and the server's counters (`/status`), so tests wait for a waiter to be
//! parked instead of sleeping.
//!
//! The binary is started through an emulator when the tests were built for
//! another machine: `PATCHCORD_TEST_RUNNER` (e.g. `qemu-arm-static -L
//! /usr/arm-linux-gnueabihf`), else the `CARGO_TARGET_<TRIPLE>_RUNNER`
//! environment variable for the ARM target this test binary was built for
//! (what `make cross-test` sets; a runner set only in `.cargo/config.toml`
//! or through binfmt_misc is not seen). `PATCHCORD_TEST_LOG=1` echoes its log.

#![allow(dead_code)] // each test module uses a different part of the support

mod runner;
mod running;

pub use running::{Running, wait_for};

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

/// How long any single step of a test may take before it fails; four times
/// as long under an emulator, where everything is several times slower.
pub static STEP: std::sync::LazyLock<Duration> =
    std::sync::LazyLock::new(|| patience(Duration::from_secs(20)));

/// `limit`, or four times `limit` under an emulator.
pub fn patience(limit: Duration) -> Duration {
    if is_emulated() { limit * 4 } else { limit }
}

/// Raises this process's soft limit on open files to the hard limit, once:
/// some tests hold thousands of sockets, and Debian starts at 1024.
fn raise_open_files_limit() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let mut limit = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: getrlimit and setrlimit read or write one rlimit, owned here.
        unsafe {
            if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 {
                limit.rlim_cur = limit.rlim_max.min(1 << 20);
                libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
            }
        }
    });
}

/// A running patchcord, killed when dropped.
pub struct Server {
    child: Child,
    pub addr: SocketAddr,
    log: Arc<Mutex<Vec<String>>>,
}

impl Server {
    /// Starts patchcord with debug logging and default options.
    pub fn start() -> Server {
        Server::start_with(&[])
    }

    /// Starts patchcord with `args` added after `--listen 127.0.0.1:0 --log-level debug`.
    pub fn start_with(args: &[&str]) -> Server {
        let mut command = command();
        command
            .args(["--listen", "127.0.0.1:0", "--log-level", "debug"])
            .args(args);
        Server::start_command(command)
    }

    /// Starts `command` (patchcord with its arguments, which must make it
    /// listen on a port of 127.0.0.1), without the variables that would
    /// change its behaviour, and reads the address it printed.
    pub fn start_command(mut command: Command) -> Server {
        raise_open_files_limit();
        command
            .env_remove("RUST_LOG")
            .env_remove("PORT")
            .env_remove("REQUEST_TIMEOUT")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = command.spawn().expect("start patchcord");
        let stdout = child.stdout.take().expect("stdout");
        let stderr = child.stderr.take().expect("stderr");
        let log = Arc::new(Mutex::new(Vec::new()));
        let sink = Arc::clone(&log);
        let echo = std::env::var_os("PATCHCORD_TEST_LOG").is_some();
        thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if echo {
                    eprintln!("server: {line}");
                }
                sink.lock().unwrap().push(line);
            }
        });
        let (tx, rx) = std::sync::mpsc::channel();
        thread::spawn(move || {
            let mut reader = BufReader::new(stdout);
            let mut line = String::new();
            let _ = reader.read_line(&mut line);
            let _ = tx.send(line);
            // Keep draining so the server never blocks on a full pipe.
            let _ = io::copy(&mut reader, &mut io::sink());
        });
        let line = rx
            .recv_timeout(*STEP)
            .expect("patchcord printed its address");
        let Some(addr) = line.trim().strip_prefix("listening on http://") else {
            // Say why: the server's own words, once it has ended.
            thread::sleep(Duration::from_millis(200));
            let _ = child.kill();
            let _ = child.wait();
            thread::sleep(Duration::from_millis(100));
            panic!(
                "unexpected first line {line:?}; the server said:\n{}",
                log.lock().unwrap().join("\n")
            );
        };
        let addr = addr.parse().expect("an address");
        Server { child, addr, log }
    }

    /// `http://ADDR{path}`.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// The server's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The server's counters: the body of `GET /status`.
    pub fn status(&self) -> String {
        let got = request(self.addr, &get("/status"));
        assert_eq!(got.status, 200, "{}", got.text());
        got.text()
    }

    /// A counter of `/status`: the number after `"name":`, or the sum of the
    /// numbers of the object after it (`parked_total` sums every mode).
    pub fn counter(&self, name: &str) -> u64 {
        json_counter(&self.status(), name)
    }

    /// Waits until counter `name` reaches `n`; panics after [`STEP`].
    pub fn wait_counter(&self, name: &str, n: u64) {
        let deadline = Instant::now() + *STEP;
        loop {
            // At --max-connections, /status is turned away (503) like anyone.
            let got = request(self.addr, &get("/status"));
            let status = got.text();
            if got.status == 200 && json_counter(&status, name) >= n {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {name} to reach {n}: {status}\nlog:\n{}",
                self.log()
            );
            thread::sleep(Duration::from_millis(5));
        }
    }

    /// Waits until `n` waiters (of any mode) have parked since the start.
    pub fn wait_parked(&self, n: u64) {
        self.wait_counter("parked_total", n);
    }

    /// Waits until `n` clients have been found to hang up while waiting.
    pub fn wait_hangups(&self, n: u64) {
        self.wait_counter("hangups_total", n);
    }

    /// Waits until `n` streaming subscriptions have started since the start.
    pub fn wait_streams(&self, n: u64) {
        self.wait_counter("streams_total", n);
    }

    /// How many log lines so far contain `needle`.
    pub fn log_count(&self, needle: &str) -> usize {
        self.log
            .lock()
            .unwrap()
            .iter()
            .filter(|l| l.contains(needle))
            .count()
    }

    /// Waits until `n` log lines contain `needle`; panics after [`STEP`].
    pub fn wait_log(&self, needle: &str, n: usize) {
        let deadline = Instant::now() + *STEP;
        while self.log_count(needle) < n {
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {n} log lines with {needle:?}; log:\n{}",
                self.log()
            );
            thread::sleep(Duration::from_millis(5));
        }
    }

    /// The whole log so far.
    pub fn log(&self) -> String {
        self.log.lock().unwrap().join("\n")
    }

    /// Sends `signal` to the server.
    pub fn signal(&self, signal: i32) {
        // SAFETY: kill(2) on our own child's pid has no memory effects.
        let rc = unsafe { libc::kill(self.child.id() as libc::pid_t, signal) };
        assert_eq!(rc, 0, "kill");
    }

    /// Waits up to `limit` for the server to exit.
    pub fn wait_exit(&mut self, limit: Duration) -> Option<ExitStatus> {
        wait_child(&mut self.child, limit)
    }

    /// Kills the server with SIGKILL and waits until its port is free
    /// again (nothing else takes it meanwhile); returns its address, for
    /// a relay started again in its place.
    pub fn kill_9(mut self) -> SocketAddr {
        let addr = self.addr;
        self.signal(libc::SIGKILL);
        self.wait_exit(*STEP).expect("the relay died");
        drop(self);
        let free = running::wait_for(*STEP, || std::net::TcpListener::bind(addr).is_ok());
        assert!(free, "the relay's port stayed busy");
        addr
    }

    /// Whether the server still answers: one full exchange on a fresh channel.
    pub fn assert_serving(&self) {
        let channel = format!("/alive-{}", std::process::id());
        let mut producer = connect(self.addr);
        send(&mut producer, &post(&channel, b"still here"));
        let got = request(self.addr, &get(&channel));
        assert_eq!((got.status, got.body.as_slice()), (200, &b"still here"[..]));
        assert_eq!(read_response(&mut producer).unwrap().status, 200);
    }
}

/// Counter `name` in the JSON of `/status`: the number after `"name":`, or
/// the sum of the numbers in the object after it.
pub fn json_counter(json: &str, name: &str) -> u64 {
    let key = format!("\"{name}\":");
    let at = json
        .find(&key)
        .unwrap_or_else(|| panic!("no {name} in {json}"))
        + key.len();
    let rest = &json[at..];
    let value = if rest.starts_with('{') {
        &rest[..rest.find('}').expect("object end")]
    } else {
        rest.split([',', '}']).next().unwrap_or("")
    };
    value
        .split([',', ':', '{'])
        .filter_map(|part| part.trim().parse::<u64>().ok())
        .sum()
}

/// A command that runs the patchcord binary, through the emulator if any.
pub fn command() -> Command {
    runner::through(&runner(), env!("CARGO_BIN_EXE_patchcord"))
}

/// The emulator that starts the binary, if any (see the module's comment).
pub fn runner() -> String {
    std::env::var("PATCHCORD_TEST_RUNNER").unwrap_or_else(|_| runner::cargo_runner())
}

/// Whether the binary runs under an emulator (everything several times slower).
pub fn is_emulated() -> bool {
    !runner().is_empty()
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A TCP connection with read and write timeouts of [`STEP`].
pub fn connect(addr: SocketAddr) -> TcpStream {
    let stream = TcpStream::connect_timeout(&addr, *STEP).expect("connect");
    stream.set_read_timeout(Some(*STEP)).unwrap();
    stream.set_write_timeout(Some(*STEP)).unwrap();
    stream.set_nodelay(true).unwrap();
    stream
}

/// Writes all of `bytes`.
pub fn send(stream: &mut TcpStream, bytes: &[u8]) {
    stream.write_all(bytes).expect("send");
}

/// A GET request for `path`.
pub fn get(path: &str) -> Vec<u8> {
    format!("GET {path} HTTP/1.1\r\nHost: test\r\n\r\n").into_bytes()
}

/// A POST request for `path` with `body` and a Content-Length.
pub fn post(path: &str, body: &[u8]) -> Vec<u8> {
    let mut bytes = format!(
        "POST {path} HTTP/1.1\r\nHost: test\r\nContent-Length: {}\r\n\r\n",
        body.len()
    )
    .into_bytes();
    bytes.extend_from_slice(body);
    bytes
}

/// A `method` request for `path` with extra header lines `headers` and
/// `body` (with its Content-Length, unless it is empty and the method is
/// one that usually has none).
pub fn with_headers(method: &str, path: &str, headers: &[(&str, &str)], body: &[u8]) -> Vec<u8> {
    let mut bytes = format!("{method} {path} HTTP/1.1\r\nHost: test\r\n").into_bytes();
    for (name, value) in headers {
        bytes.extend_from_slice(format!("{name}: {value}\r\n").as_bytes());
    }
    if !body.is_empty() || !matches!(method, "GET" | "HEAD" | "DELETE" | "OPTIONS") {
        bytes.extend_from_slice(format!("Content-Length: {}\r\n", body.len()).as_bytes());
    }
    bytes.extend_from_slice(b"\r\n");
    bytes.extend_from_slice(body);
    bytes
}

/// A parsed response.
#[derive(Debug)]
pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Response {
    /// The first value of header `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// The body as text.
    /// The `Patch-Id` of a pubsub answer.
    pub fn patch_id(&self) -> u64 {
        self.header("patch-id")
            .expect("Patch-Id")
            .parse()
            .expect("numeric id")
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// Connects, sends `raw`, reads one response.
pub fn request(addr: SocketAddr, raw: &[u8]) -> Response {
    let mut stream = connect(addr);
    send(&mut stream, raw);
    read_response(&mut stream).expect("a response")
}

/// Reads a response head (skipping 1xx) and its body.
pub fn read_response(stream: &mut TcpStream) -> io::Result<Response> {
    loop {
        let (status, headers) = read_head(stream)?;
        if (100..200).contains(&status) {
            continue;
        }
        let response = Response {
            status,
            headers,
            body: Vec::new(),
        };
        return read_body(stream, response);
    }
}

/// Reads a response head byte by byte (so nothing after it is consumed).
pub fn read_head(stream: &mut TcpStream) -> io::Result<(u16, Vec<(String, String)>)> {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if stream.read(&mut byte)? == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        head.push(byte[0]);
        assert!(head.len() < 65536, "response head too long");
    }
    let mut fields = [httparse::EMPTY_HEADER; 64];
    let mut parsed = httparse::Response::new(&mut fields);
    parsed
        .parse(&head)
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
    let headers = parsed
        .headers
        .iter()
        .map(|h| {
            (
                h.name.to_owned(),
                String::from_utf8_lossy(h.value).into_owned(),
            )
        })
        .collect();
    Ok((parsed.code.unwrap_or(0), headers))
}

fn read_body(stream: &mut TcpStream, mut response: Response) -> io::Result<Response> {
    if let Some(length) = response.header("content-length") {
        // Grow with the bytes that arrive, never with the claim.
        let length: u64 = length
            .parse()
            .map_err(|_| io::Error::from(io::ErrorKind::InvalidData))?;
        stream.take(length).read_to_end(&mut response.body)?;
        if (response.body.len() as u64) < length {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
    } else if response.header("transfer-encoding").is_some() {
        let mut reader = BufReader::new(stream);
        loop {
            let mut line = String::new();
            reader.read_line(&mut line)?;
            let size = usize::from_str_radix(line.trim(), 16)
                .map_err(|_| io::Error::from(io::ErrorKind::InvalidData))?;
            let mut chunk = vec![0; size + 2];
            reader.read_exact(&mut chunk)?;
            if size == 0 {
                break;
            }
            response.body.extend_from_slice(&chunk[..size]);
        }
    } else {
        stream.read_to_end(&mut response.body)?;
    }
    Ok(response)
}

/// curl's `--max-time`: a minute, longer under an emulator.
fn max_time() -> String {
    patience(Duration::from_secs(60)).as_secs().to_string()
}

/// Runs curl with `args` (silent, bounded by --max-time).
pub fn curl(args: &[&str]) -> Output {
    Command::new("curl")
        .args(["-sS", "--max-time", &max_time()])
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run curl")
}

/// Starts curl with `args` in the background.
pub fn spawn_curl(args: &[&str]) -> Child {
    Command::new("curl")
        .args(["-sS", "--max-time", &max_time()])
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start curl")
}

/// Waits for a child, failing the test after [`STEP`] * 3.
pub fn finish(child: Child) -> Output {
    finish_within(child, *STEP * 3)
}

/// Waits for a child, failing the test after `limit`.
pub fn finish_within(mut child: Child, limit: Duration) -> Output {
    let deadline = Instant::now() + limit;
    while child.try_wait().expect("try_wait").is_none() {
        if Instant::now() >= deadline {
            let _ = child.kill();
            panic!("child did not finish in time");
        }
        thread::sleep(Duration::from_millis(5));
    }
    child.wait_with_output().expect("output")
}

/// Runs a bash script with `$PC` set to the server's `host:port`, in `dir`.
pub fn bash(server: &Server, dir: &std::path::Path, script: &str) -> Output {
    finish(spawn_bash(server, dir, script))
}

/// Starts a bash script as [`bash`] does, in the background; its temporary
/// files (`mktemp`) go to `dir`.
pub fn spawn_bash(server: &Server, dir: &std::path::Path, script: &str) -> Child {
    spawn_bash_at(server.addr, dir, script)
}

/// Starts a bash script as [`spawn_bash`] does, for the relay at `addr`.
pub fn spawn_bash_at(addr: SocketAddr, dir: &std::path::Path, script: &str) -> Child {
    Command::new("bash")
        .args(["-euo", "pipefail", "-c", script])
        .env("PC", addr.to_string())
        .env("TMPDIR", dir)
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run bash")
}

/// Reads a chunked response body piece by piece, as a streaming client does.
pub struct Chunks {
    reader: BufReader<TcpStream>,
    /// Bytes received and not yet taken by [`Chunks::until`].
    pub pending: Vec<u8>,
}

impl Chunks {
    /// Reads the head of a streaming response on `stream`; the status and
    /// headers, and the body reader.
    pub fn start(mut stream: TcpStream) -> (Response, Chunks) {
        let (status, headers) = read_head(&mut stream).expect("a response head");
        let response = Response {
            status,
            headers,
            body: Vec::new(),
        };
        assert_eq!(
            response.header("transfer-encoding"),
            Some("chunked"),
            "{response:?}"
        );
        let chunks = Chunks {
            reader: BufReader::new(stream),
            pending: Vec::new(),
        };
        (response, chunks)
    }

    /// The next chunk's data; None at the end of the body.
    pub fn next_chunk(&mut self) -> io::Result<Option<Vec<u8>>> {
        let mut line = String::new();
        if self.reader.read_line(&mut line)? == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        let size = usize::from_str_radix(line.trim(), 16)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, line.clone()))?;
        assert!(size <= 1 << 24, "chunk too large: {size}");
        let mut chunk = vec![0; size + 2];
        self.reader.read_exact(&mut chunk)?;
        if size == 0 {
            return Ok(None);
        }
        chunk.truncate(size);
        Ok(Some(chunk))
    }

    /// Reads until the body received holds `n` occurrences of `separator`,
    /// and returns the bytes up to and including the n-th; the rest stays
    /// pending. Fails at the end of the body or after [`STEP`].
    pub fn until(&mut self, separator: &[u8], n: usize) -> Vec<u8> {
        let deadline = Instant::now() + *STEP;
        loop {
            let mut found = 0;
            let mut at = 0;
            while found < n {
                match find(&self.pending[at..], separator) {
                    Some(i) => {
                        at += i + separator.len();
                        found += 1;
                    }
                    None => break,
                }
            }
            if found == n {
                return self.pending.drain(..at).collect();
            }
            assert!(Instant::now() < deadline, "stream too slow");
            match self.next_chunk().expect("stream readable") {
                Some(chunk) => self.pending.extend_from_slice(&chunk),
                None => panic!(
                    "stream ended with {found} of {n}: {:?}",
                    String::from_utf8_lossy(&self.pending)
                ),
            }
        }
    }
}

/// Where `needle` first occurs in `haystack`.
pub fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// A field of `/proc/PID/status`, in KiB (`VmRSS`, `VmHWM`).
pub fn status_kib(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    status
        .lines()
        .find_map(|line| line.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|value| value.trim().trim_end_matches(" kB").parse().ok())
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"))
}

/// `program` from PATH, else from /usr/sbin, where Debian puts daemons
/// (nginx, haproxy) outside a user's PATH.
pub fn installed(program: &str) -> Option<std::path::PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain([std::path::PathBuf::from("/usr/sbin")])
        .map(|dir| dir.join(program))
        .find(|candidate| candidate.is_file())
}

/// A fresh empty directory under the target directory's tmp.
pub fn temp_dir(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("patchcord-test-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("temp dir");
    dir
}

/// `len` bytes of a fixed pseudo-random pattern (xorshift), so corruption shows.
pub fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// Waits up to `limit` for `child` to end: its status, or None if it runs on.
pub fn wait_child(child: &mut Child, limit: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            return Some(status);
        }
        if Instant::now() >= deadline {
            return None;
        }
        thread::sleep(Duration::from_millis(5));
    }
}
