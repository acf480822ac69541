//! `make bench`: measures a relay from outside, as a user's scripts would see
//! it, and prints one table (scenario, figure, unit). Std only: its own HTTP
//! client on TcpStream, server CPU and memory from /proc.
//!
//! It starts the patchcord built with it on 127.0.0.1:0, or measures any
//! server already running with `--url http://HOST:PORT --pid PID` (so the
//! same tool measures other relays). `--json FILE` writes the figures too;
//! `--smoke` runs every scenario tiny, to keep the harness working in CI.
//! Figures taken under an emulator (qemu) are not performance figures: the
//! harness refuses to run there unless given `--pi`.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::path::Path;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Barrier};
use std::thread;
use std::time::{Duration, Instant};

#[path = "../tests/support/runner.rs"]
mod runner;

const MIB: u64 = 1 << 20;

struct Options {
    url: Option<String>,
    pid: Option<u32>,
    json: Option<String>,
    smoke: bool,
    pi: bool,
    only: Option<String>,
    pairs: Option<usize>,
    prefix: String,
    /// Rendezvous consumers wait this long before each receive, so that
    /// producers are mostly parked first.
    consumer_delay: Duration,
}

fn usage() -> ! {
    eprintln!(
        "usage: relay [--url http://HOST:PORT --pid PID] [--json FILE] [--smoke] [--only NAME] [--pairs N] [--prefix PATH] [--consumer-delay MICROS] [--pi]\n\
         --prefix: where the rendezvous channels are, PATH/LABEL/PAIR (default /bench; /channels for httpipe)\n\
         --consumer-delay: rendezvous consumers wait so long before each receive (producers park first)\n\
         Scenarios: rendezvous, reconnect, stream, backpressure, waiters, fanout, reqres, fifo, listen, work, tunnel, idle"
    );
    std::process::exit(2)
}

/// The next argument, parsed as a T; usage on a missing or bad value.
fn value<T: std::str::FromStr>(args: &mut impl Iterator<Item = String>) -> T {
    args.next()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| usage())
}

fn parse_options() -> Options {
    let mut options = Options {
        url: None,
        pid: None,
        json: None,
        smoke: false,
        pi: false,
        only: None,
        pairs: None,
        prefix: "/bench".to_owned(),
        consumer_delay: Duration::ZERO,
    };
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--url" => options.url = Some(value(&mut args)),
            "--pid" => options.pid = Some(value(&mut args)),
            "--json" => options.json = Some(value(&mut args)),
            "--only" => options.only = Some(value(&mut args)),
            "--pairs" => options.pairs = Some(value(&mut args)),
            "--prefix" => options.prefix = value(&mut args),
            "--consumer-delay" => {
                options.consumer_delay = Duration::from_micros(value(&mut args));
            }
            "--smoke" => options.smoke = true,
            "--pi" => options.pi = true,
            // cargo bench passes --bench to harness=false targets.
            "--bench" => {}
            _ => usage(),
        }
    }
    options
}

/// The server under test.
struct Target {
    addr: SocketAddr,
    pid: u32,
    child: Option<Child>,
    binary: Option<String>,
}

impl Drop for Target {
    fn drop(&mut self) {
        if let Some(child) = &mut self.child {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Starts the patchcord built with this harness, with `extra` options.
fn start_patchcord(extra: &[&str]) -> Target {
    let binary = env!("CARGO_BIN_EXE_patchcord").to_owned();
    // Under an emulator the server starts through it, as this harness did.
    let mut child = runner::through(&runner::cargo_runner(), &binary)
        .args([
            "--listen",
            "127.0.0.1:0",
            "--quiet",
            "--max-connections",
            "30000",
        ])
        .args(extra)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start patchcord");
    let mut line = String::new();
    BufReader::new(child.stdout.take().expect("stdout"))
        .read_line(&mut line)
        .expect("address line");
    let addr = line
        .trim()
        .trim_start_matches("listening on http://")
        .parse()
        .expect("address");
    Target {
        addr,
        pid: child.id(),
        child: Some(child),
        binary: Some(binary),
    }
}

/// Server-side figures read from /proc.
fn proc_status(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

fn rss_kib(pid: u32) -> u64 {
    proc_status(pid, "VmRSS:")
}

fn peak_rss_kib(pid: u32) -> u64 {
    proc_status(pid, "VmHWM:")
}

fn threads(pid: u32) -> u64 {
    proc_status(pid, "Threads:")
}

/// Resets VmHWM so each scenario reports its own peak (Linux ≥ 4.0).
fn reset_peak(pid: u32) {
    let _ = std::fs::write(format!("/proc/{pid}/clear_refs"), "5");
}

/// Server CPU time (user + system) in microseconds.
fn cpu_us(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name, which is in parentheses and may hold spaces.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = fields.get(11).and_then(|f| f.parse().ok()).unwrap_or(0)
        + fields.get(12).and_then(|f| f.parse().ok()).unwrap_or(0);
    // USER_HZ is 100 on every Linux target patchcord runs on.
    ticks * 10_000
}

fn connect(addr: SocketAddr) -> io::Result<TcpStream> {
    let stream = TcpStream::connect_timeout(&addr, Duration::from_secs(10))?;
    stream.set_nodelay(true)?;
    stream.set_read_timeout(Some(Duration::from_secs(60)))?;
    stream.set_write_timeout(Some(Duration::from_secs(60)))?;
    Ok(stream)
}

/// A small keep-alive HTTP/1.1 client: enough to send relay requests and
/// read Content-Length or chunked responses.
struct Client {
    stream: TcpStream,
    buf: Vec<u8>,
    start: usize,
    end: usize,
}

impl Client {
    fn new(addr: SocketAddr) -> io::Result<Client> {
        Ok(Client {
            stream: connect(addr)?,
            buf: vec![0; 64 * 1024],
            start: 0,
            end: 0,
        })
    }

    fn fill(&mut self) -> io::Result<()> {
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        }
        if self.end == self.buf.len() {
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        let n = self.stream.read(&mut self.buf[self.end..])?;
        if n == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        self.end += n;
        Ok(())
    }

    fn line(&mut self) -> io::Result<String> {
        loop {
            if let Some(i) = self.buf[self.start..self.end]
                .iter()
                .position(|&b| b == b'\n')
            {
                let line = String::from_utf8_lossy(&self.buf[self.start..self.start + i])
                    .trim_end()
                    .to_owned();
                self.start += i + 1;
                return Ok(line);
            }
            self.fill()?;
        }
    }

    /// Reads a response, discarding its body; returns (status, body length).
    fn response(&mut self) -> io::Result<(u16, u64)> {
        let (status, length, _) = self.response_with(None)?;
        Ok((status, length))
    }

    /// Reads a response as [`Client::response`] does, and the value of
    /// header `want` (lowercase), if asked for and present.
    fn response_with(&mut self, want: Option<&str>) -> io::Result<(u16, u64, Option<String>)> {
        self.read_response(want, None)
    }

    /// Reads a response; returns its status and its body.
    fn response_body(&mut self) -> io::Result<(u16, Vec<u8>)> {
        let mut body = Vec::new();
        let (status, _, _) = self.read_response(None, Some(&mut body))?;
        Ok((status, body))
    }

    /// Reads a response: its status, body length and header `want`; the
    /// body goes to `body` when given, else is dropped.
    fn read_response(
        &mut self,
        want: Option<&str>,
        mut body: Option<&mut Vec<u8>>,
    ) -> io::Result<(u16, u64, Option<String>)> {
        loop {
            let status_line = self.line()?;
            let status: u16 = status_line
                .split_whitespace()
                .nth(1)
                .and_then(|s| s.parse().ok())
                .unwrap_or(0);
            let mut length = None;
            let mut chunked = false;
            let mut wanted = None;
            loop {
                let line = self.line()?;
                if line.is_empty() {
                    break;
                }
                let lower = line.to_ascii_lowercase();
                if let Some((name, value)) = line.split_once(':') {
                    if want.is_some_and(|w| name.eq_ignore_ascii_case(w)) {
                        wanted = Some(value.trim().to_owned());
                    }
                }
                if let Some(v) = lower.strip_prefix("content-length:") {
                    length = v.trim().parse::<u64>().ok();
                } else if lower.starts_with("transfer-encoding:") && lower.contains("chunked") {
                    chunked = true;
                }
            }
            if (100..200).contains(&status) {
                continue;
            }
            let read = if chunked {
                let mut total = 0;
                loop {
                    let size = u64::from_str_radix(
                        self.line()?.split(';').next().unwrap_or("").trim(),
                        16,
                    )
                    .map_err(|_| io::Error::from(io::ErrorKind::InvalidData))?;
                    self.take(size, body.as_deref_mut())?;
                    self.line()?;
                    if size == 0 {
                        break total;
                    }
                    total += size;
                }
            } else {
                let length = length.unwrap_or(0);
                self.take(length, body.as_deref_mut())?;
                length
            };
            return Ok((status, read, wanted));
        }
    }

    /// Reads `n` body bytes, into `out` when given.
    fn take(&mut self, mut n: u64, mut out: Option<&mut Vec<u8>>) -> io::Result<()> {
        while n > 0 {
            if self.start == self.end {
                self.fill()?;
            }
            let take = (self.end - self.start).min(usize::try_from(n).unwrap_or(usize::MAX));
            if let Some(out) = out.as_deref_mut() {
                out.extend_from_slice(&self.buf[self.start..self.start + take]);
            }
            self.start += take;
            n -= take as u64;
        }
        Ok(())
    }

    fn send(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.stream.write_all(bytes)
    }

    /// Reads a response head; returns its status.
    fn head(&mut self) -> io::Result<u16> {
        let status = self
            .line()?
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        while !self.line()?.is_empty() {}
        Ok(status)
    }

    /// Reads the next chunk of a chunked body into `out`; false at its end.
    fn chunk(&mut self, out: &mut Vec<u8>) -> io::Result<bool> {
        let size = usize::from_str_radix(self.line()?.split(';').next().unwrap_or("").trim(), 16)
            .map_err(|_| io::Error::from(io::ErrorKind::InvalidData))?;
        let mut left = size;
        while left > 0 {
            if self.start == self.end {
                self.fill()?;
            }
            let take = (self.end - self.start).min(left);
            out.extend_from_slice(&self.buf[self.start..self.start + take]);
            self.start += take;
            left -= take;
        }
        self.line()?;
        Ok(size > 0)
    }
}

fn post(path: &str, body: &[u8], close: bool) -> Vec<u8> {
    let connection = if close { "Connection: close\r\n" } else { "" };
    let mut bytes = format!(
        "POST {path} HTTP/1.1\r\nHost: bench\r\n{connection}Content-Length: {}\r\n\r\n",
        body.len()
    )
    .into_bytes();
    bytes.extend_from_slice(body);
    bytes
}

fn get(path: &str, close: bool) -> Vec<u8> {
    let connection = if close { "Connection: close\r\n" } else { "" };
    format!("GET {path} HTTP/1.1\r\nHost: bench\r\n{connection}\r\n").into_bytes()
}

/// One line of the result table.
struct Figure {
    scenario: String,
    name: String,
    value: f64,
    unit: &'static str,
}

struct Report {
    figures: Vec<Figure>,
}

impl Report {
    fn add(&mut self, scenario: &str, name: &str, value: f64, unit: &'static str) {
        println!(
            "{:<34} {:<28} {:>14} {}",
            scenario,
            name,
            format_value(value),
            unit
        );
        let _ = io::stdout().flush();
        self.figures.push(Figure {
            scenario: scenario.to_owned(),
            name: name.to_owned(),
            value,
            unit,
        });
    }

    fn json(&self) -> String {
        let mut out = String::from("[\n");
        for (i, f) in self.figures.iter().enumerate() {
            let comma = if i + 1 < self.figures.len() { "," } else { "" };
            let value = if f.value.is_finite() {
                format!("{}", f.value)
            } else {
                "null".to_owned()
            };
            out.push_str(&format!(
                "  {{\"scenario\": {:?}, \"figure\": {:?}, \"value\": {value}, \"unit\": {:?}}}{comma}\n",
                f.scenario, f.name, f.unit
            ));
        }
        out.push(']');
        out.push('\n');
        out
    }
}

fn format_value(value: f64) -> String {
    if !value.is_finite() {
        "n/a".to_owned()
    } else if value >= 100.0 || value == value.trunc() {
        format!("{value:.0}")
    } else {
        format!("{value:.2}")
    }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// Scenarios 1 and 2: `pairs` producer/consumer pairs on distinct channels
/// exchange 64-byte messages for `duration`.
#[allow(clippy::too_many_arguments)] // one per dimension of the scenario
fn rendezvous(
    report: &mut Report,
    target: &Target,
    prefix: &str,
    consumer_delay: Duration,
    label: &str,
    pairs: usize,
    keep_alive: bool,
    duration: Duration,
) {
    let stop = Arc::new(AtomicBool::new(false));
    let exchanges = Arc::new(AtomicU64::new(0));
    let barrier = Arc::new(Barrier::new(pairs * 2 + 1));
    let body = [b'x'; 64];
    let mut handles = Vec::new();
    for pair in 0..pairs {
        let path = format!("{prefix}/{}/{pair}", slug(label));
        for producer in [true, false] {
            let (stop, exchanges, barrier, path) = (
                stop.clone(),
                exchanges.clone(),
                barrier.clone(),
                path.clone(),
            );
            let addr = target.addr;
            handles.push(thread::spawn(move || -> Vec<Duration> {
                let mut latencies = Vec::new();
                let request = if producer {
                    post(&path, &body, !keep_alive)
                } else {
                    get(&path, !keep_alive)
                };
                let mut client = if keep_alive {
                    Client::new(addr).ok()
                } else {
                    None
                };
                barrier.wait();
                while !stop.load(Ordering::Relaxed) {
                    if !keep_alive {
                        client = Client::new(addr).ok();
                    }
                    let Some(c) = client.as_mut() else { break };
                    if !producer && !consumer_delay.is_zero() {
                        thread::sleep(consumer_delay);
                    }
                    let started = Instant::now();
                    if c.send(&request).is_err() {
                        break;
                    }
                    match c.response() {
                        Ok((200, _)) => {}
                        _ => break,
                    }
                    if !producer {
                        latencies.push(started.elapsed());
                        exchanges.fetch_add(1, Ordering::Relaxed);
                    }
                }
                // Release the partner, which may be parked waiting for us.
                stop.store(true, Ordering::Relaxed);
                latencies
            }));
        }
    }
    barrier.wait();
    let cpu_before = cpu_us(target.pid);
    let started = Instant::now();
    thread::sleep(duration);
    let done = exchanges.load(Ordering::Relaxed);
    let elapsed = started.elapsed();
    let cpu_after = cpu_us(target.pid);
    stop.store(true, Ordering::Relaxed);
    // A client may have sent one last request just as the others stopped;
    // DELETE the channels (answering such waiters 410) until all are done.
    let delete = format!(
        "DELETE {prefix}/{} HTTP/1.1\r\nHost: bench\r\n\r\n",
        slug(label)
    );
    let latencies = finish_clients(target, &delete, handles);
    let scenario = format!("{label} ({pairs} pairs)");
    report_pairs(report, &scenario, done, elapsed, &latencies);
    let per_pair = if done > 0 {
        (cpu_after - cpu_before) as f64 / done as f64
    } else {
        f64::NAN
    };
    report.add(&scenario, "server CPU per pair", per_pair, "us");
}

/// The figures of pairs exchanged: `done` in `elapsed`, and the consumers'
/// `latencies` (sorted).
fn report_pairs(
    report: &mut Report,
    scenario: &str,
    done: u64,
    elapsed: Duration,
    latencies: &[Duration],
) {
    let rate = done as f64 / elapsed.as_secs_f64();
    report.add(scenario, "exchanges per second", rate, "pairs/s");
    let p50 = percentile(latencies, 0.5).as_secs_f64() * 1e3;
    report.add(scenario, "consumer latency p50", p50, "ms");
    let p99 = percentile(latencies, 0.99).as_secs_f64() * 1e3;
    report.add(scenario, "consumer latency p99", p99, "ms");
}

fn slug(label: &str) -> String {
    label.replace(' ', "-")
}

/// Scenario 3: `total` bytes through one channel, with a Content-Length
/// upload or a chunked one.
fn stream(report: &mut Report, target: &Target, total: u64, chunked: bool) {
    reset_peak(target.pid);
    let path = if chunked {
        "/bench/stream/chunked"
    } else {
        "/bench/stream/length"
    };
    let addr = target.addr;
    let consumer = thread::spawn(move || -> io::Result<(u64, Duration)> {
        let mut c = Client::new(addr)?;
        c.send(&get(path, false))?;
        let started = Instant::now();
        let (_, n) = c.response()?;
        Ok((n, started.elapsed()))
    });
    let mut producer = connect(addr).expect("connect");
    let head = if chunked {
        format!("POST {path} HTTP/1.1\r\nHost: bench\r\nTransfer-Encoding: chunked\r\n\r\n")
    } else {
        format!("POST {path} HTTP/1.1\r\nHost: bench\r\nContent-Length: {total}\r\n\r\n")
    };
    let cpu_before = cpu_us(target.pid);
    producer.write_all(head.as_bytes()).expect("head");
    let block = vec![0u8; 256 * 1024];
    let mut sent = 0;
    while sent < total {
        let n = (total - sent).min(block.len() as u64) as usize;
        if chunked {
            producer
                .write_all(format!("{n:x}\r\n").as_bytes())
                .expect("chunk");
            producer.write_all(&block[..n]).expect("body");
            producer.write_all(b"\r\n").expect("chunk end");
        } else {
            producer.write_all(&block[..n]).expect("body");
        }
        sent += n as u64;
    }
    if chunked {
        producer.write_all(b"0\r\n\r\n").expect("last chunk");
    }
    let mut answer = [0u8; 256];
    let _ = producer.read(&mut answer);
    let (received, elapsed) = consumer.join().expect("consumer").expect("consumer io");
    let scenario = format!(
        "stream {} MiB ({})",
        total / MIB,
        if chunked { "chunked" } else { "length" }
    );
    assert_eq!(
        received, total,
        "{scenario}: received {received} of {total} bytes"
    );
    report.add(
        &scenario,
        "throughput",
        total as f64 / MIB as f64 / elapsed.as_secs_f64(),
        "MiB/s",
    );
    report.add(
        &scenario,
        "server peak RSS",
        peak_rss_kib(target.pid) as f64 / 1024.0,
        "MiB",
    );
    let cpu_ms = (cpu_us(target.pid) - cpu_before) as f64 / 1000.0;
    report.add(
        &scenario,
        "server CPU per GiB",
        cpu_ms / (total as f64 / (1024.0 * MIB as f64)),
        "ms",
    );
}

/// Scenario 4: `total` bytes to a consumer that reads at `rate` bytes/s.
fn backpressure(report: &mut Report, target: &Target, total: u64, rate: u64) {
    let addr = target.addr;
    let path = "/bench/backpressure";
    let producer = thread::spawn(move || {
        let mut p = connect(addr).expect("connect");
        let _ = p.write_all(
            format!("POST {path} HTTP/1.1\r\nHost: bench\r\nContent-Length: {total}\r\n\r\n")
                .as_bytes(),
        );
        let block = vec![0u8; 256 * 1024];
        let mut sent = 0;
        while sent < total {
            let n = (total - sent).min(block.len() as u64) as usize;
            if p.write_all(&block[..n]).is_err() {
                break;
            }
            sent += n as u64;
        }
    });
    let mut consumer = connect(addr).expect("connect");
    consumer.write_all(&get(path, false)).expect("get");
    let started = Instant::now();
    let mut received = 0u64;
    let mut buf = vec![0u8; 64 * 1024];
    let mut samples = Vec::new();
    let mut next_sample = Instant::now();
    while received < total {
        // Pace: never ahead of `rate`.
        let allowed = (started.elapsed().as_secs_f64() * rate as f64) as u64 + buf.len() as u64;
        if received >= allowed {
            thread::sleep(Duration::from_millis(2));
            continue;
        }
        match consumer.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => received += n as u64,
        }
        if Instant::now() >= next_sample {
            samples.push(rss_kib(target.pid));
            next_sample += Duration::from_millis(250);
        }
    }
    let _ = producer.join();
    let scenario = format!(
        "backpressure {} MiB at {} MB/s",
        total / MIB,
        rate / 1_000_000
    );
    let max = samples.iter().copied().max().unwrap_or(0);
    let min = samples.iter().copied().min().unwrap_or(0);
    report.add(&scenario, "server RSS max", max as f64 / 1024.0, "MiB");
    report.add(
        &scenario,
        "server RSS growth (max-min)",
        (max - min) as f64 / 1024.0,
        "MiB",
    );
}

/// Scenario 5: `count` idle consumers parked on distinct channels.
fn waiters(report: &mut Report, target: &Target, count: usize) {
    warn_if_open_files_limited();
    let rss_before = rss_kib(target.pid);
    let threads_before = threads(target.pid);
    let mut parked = Vec::with_capacity(count);
    for i in 0..count {
        match connect(target.addr) {
            Ok(mut s) => {
                if s.write_all(&get(&format!("/bench/waiters/{i}"), false))
                    .is_err()
                {
                    break;
                }
                parked.push(s);
            }
            Err(e) => {
                eprintln!("waiters: connection {i} failed: {e}");
                break;
            }
        }
    }
    // Let the server park them all.
    let deadline = Instant::now() + Duration::from_secs(30);
    while threads(target.pid) < threads_before + parked.len() as u64 && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(50));
    }
    thread::sleep(Duration::from_millis(500));
    let rss = rss_kib(target.pid);
    let scenario = format!("waiters ({})", parked.len());
    report.add(&scenario, "server RSS", rss as f64 / 1024.0, "MiB");
    report.add(
        &scenario,
        "server threads",
        threads(target.pid) as f64,
        "threads",
    );
    report.add(
        &scenario,
        "RSS per waiter",
        (rss.saturating_sub(rss_before)) as f64 / parked.len().max(1) as f64,
        "KiB",
    );
    // A full exchange on another channel while they wait.
    let mut worst = Duration::ZERO;
    for i in 0..20 {
        let path = format!("/bench/alongside/{i}");
        let addr = target.addr;
        let producer = thread::spawn(move || {
            let mut p = Client::new(addr).ok()?;
            p.send(&post(&path, b"ping", false)).ok()?;
            p.response().ok()
        });
        let started = Instant::now();
        let mut c = Client::new(target.addr).expect("connect");
        c.send(&get(&format!("/bench/alongside/{i}"), false))
            .expect("send");
        let _ = c.response();
        worst = worst.max(started.elapsed());
        let _ = producer.join();
    }
    report.add(
        &scenario,
        "exchange alongside, worst of 20",
        worst.as_secs_f64() * 1e3,
        "ms",
    );
    // What a Prometheus scrape costs while they wait: 200 scrapes on one
    // keep-alive connection.
    let scrapes = 200;
    let mut c = Client::new(target.addr).expect("connect");
    let cpu_before = cpu_us(target.pid);
    let started = Instant::now();
    let mut bytes = 0;
    for _ in 0..scrapes {
        c.send(&get("/metrics", false)).expect("scrape");
        let (status, length) = c.response().expect("metrics");
        assert_eq!(status, 200, "/metrics");
        bytes = length;
    }
    let elapsed = started.elapsed();
    let cpu = cpu_us(target.pid) - cpu_before;
    report.add(
        &scenario,
        "/metrics scrape, mean",
        elapsed.as_secs_f64() * 1e3 / scrapes as f64,
        "ms",
    );
    report.add(
        &scenario,
        "/metrics server CPU per scrape",
        cpu as f64 / scrapes as f64,
        "us",
    );
    report.add(&scenario, "/metrics size", bytes as f64 / 1024.0, "KiB");
    let _ = c.send(b"DELETE /bench/waiters HTTP/1.1\r\nHost: bench\r\n\r\n");
    let _ = c.response();
    drop(parked);
}

/// Scenario 8: one publisher, `subscribers` streaming subscribers (raw
/// `?persist=true`) on one pubsub channel, 64-byte messages published as
/// fast as one keep-alive connection allows for `duration`. Each message
/// carries its number and send time, so subscribers measure delivery latency
/// and count what they missed (the channel's retention is the server's
/// default).
fn fanout(report: &mut Report, target: &Target, subscribers: usize, duration: Duration) {
    const RECORD: usize = 64;
    let path = "/bench/pubsub/fanout";
    let epoch = Instant::now();
    let ready = Arc::new(Barrier::new(subscribers + 1));
    let mut readers = Vec::new();
    for _ in 0..subscribers {
        let ready = ready.clone();
        let addr = target.addr;
        readers.push(thread::spawn(move || -> (u64, u64, Vec<Duration>) {
            let mut client = Client::new(addr).expect("connect");
            client
                .send(&get(&format!("{path}?persist=true"), false))
                .expect("subscribe");
            let subscribed = client.head().is_ok_and(|status| status == 200);
            ready.wait();
            let (mut received, mut missed, mut next) = (0u64, 0u64, 0u64);
            let mut latencies = Vec::new();
            let mut data = Vec::new();
            while subscribed && client.chunk(&mut data).unwrap_or(false) {
                let whole = data.len() / RECORD * RECORD;
                for record in data[..whole].chunks(RECORD) {
                    let text = String::from_utf8_lossy(record);
                    let mut fields = text.split_whitespace();
                    let seq: u64 = fields.next().and_then(|f| f.parse().ok()).unwrap_or(0);
                    let sent: u64 = fields.next().and_then(|f| f.parse().ok()).unwrap_or(0);
                    let now = epoch.elapsed().as_nanos() as u64;
                    latencies.push(Duration::from_nanos(now.saturating_sub(sent)));
                    missed += seq.saturating_sub(next);
                    next = seq + 1;
                    received += 1;
                }
                data.drain(..whole);
            }
            (received, missed, latencies)
        }));
    }
    ready.wait();
    reset_peak(target.pid);
    let cpu_before = cpu_us(target.pid);
    let started = Instant::now();
    let mut publisher = Client::new(target.addr).expect("connect");
    let mut published = 0u64;
    let mut publish_latencies = Vec::new();
    while started.elapsed() < duration {
        let sent = epoch.elapsed().as_nanos() as u64;
        let mut body = format!("{published} {sent}").into_bytes();
        body.resize(RECORD - 1, b' ');
        body.push(b'\n');
        let t = Instant::now();
        if publisher.send(&post(path, &body, false)).is_err()
            || publisher
                .response()
                .map_or(true, |(status, _)| status != 200)
        {
            break;
        }
        publish_latencies.push(t.elapsed());
        published += 1;
    }
    let elapsed = started.elapsed();
    // Let the subscribers drain, then end their streams.
    thread::sleep(Duration::from_millis(500));
    let cpu = cpu_us(target.pid) - cpu_before;
    let peak = peak_rss_kib(target.pid);
    let mut c = Client::new(target.addr).expect("connect");
    let _ = c.send(format!("DELETE {path} HTTP/1.1\r\nHost: bench\r\n\r\n").as_bytes());
    let _ = c.response();
    let (mut received, mut missed, mut latencies) = (0u64, 0u64, Vec::new());
    for reader in readers {
        if let Ok((r, m, l)) = reader.join() {
            received += r;
            missed += m;
            latencies.extend(l);
        }
    }
    latencies.sort();
    publish_latencies.sort();
    let scenario = format!("fan-out 1 -> {subscribers} (pubsub)");
    let secs = elapsed.as_secs_f64();
    report.add(
        &scenario,
        "messages published per second",
        published as f64 / secs,
        "msg/s",
    );
    report.add(
        &scenario,
        "messages delivered per second",
        received as f64 / secs,
        "msg/s",
    );
    report.add(
        &scenario,
        "missed (fell behind retention)",
        missed as f64,
        "msgs",
    );
    report.add(
        &scenario,
        "publish p99",
        percentile(&publish_latencies, 0.99).as_secs_f64() * 1e3,
        "ms",
    );
    report.add(
        &scenario,
        "delivery p50",
        percentile(&latencies, 0.5).as_secs_f64() * 1e3,
        "ms",
    );
    report.add(
        &scenario,
        "delivery p99",
        percentile(&latencies, 0.99).as_secs_f64() * 1e3,
        "ms",
    );
    report.add(
        &scenario,
        "server CPU per delivery",
        cpu as f64 / received.max(1) as f64,
        "us",
    );
    report.add(&scenario, "peak RSS", peak as f64 / 1024.0, "MiB");
}

/// The harness holds one descriptor per waiter: says how to raise its soft
/// limit when it is below the hard one (std cannot raise it itself).
fn warn_if_open_files_limited() {
    let limits = std::fs::read_to_string("/proc/self/limits").unwrap_or_default();
    if let Some(line) = limits.lines().find(|l| l.starts_with("Max open files")) {
        let fields: Vec<&str> = line.split_whitespace().collect();
        if let (Some(soft), Some(hard)) = (fields.get(3), fields.get(4)) {
            if soft != hard {
                eprintln!(
                    "note: open files soft limit {soft} < hard {hard}; run `ulimit -n {hard}` first for large waiter counts"
                );
            }
        }
    }
}

/// Scenario 7: idle RSS and binary size.
fn idle(report: &mut Report, target: &Target) {
    if target.child.is_some() {
        report.add(
            "idle server",
            "RSS after start",
            rss_kib(target.pid) as f64 / 1024.0,
            "MiB",
        );
    }
    if let Some(binary) = &target.binary {
        let size = std::fs::metadata(binary).map(|m| m.len()).unwrap_or(0);
        report.add(
            "idle server",
            "binary size (stripped)",
            size as f64 / MIB as f64,
            "MiB",
        );
    }
}

/// Scenario 11: the named-pipe bridge beside pipe-io-server 1.0.3, the
/// same bash client against each (benches/fifo.sh); skipped, with a line
/// that says why, without python3 or the package.
fn fifo(report: &mut Report, messages: usize) {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/benches/fifo.sh");
    let output = Command::new("bash")
        .args([
            script,
            env!("CARGO_BIN_EXE_patchcord"),
            &messages.to_string(),
        ])
        .stdin(Stdio::null())
        .stderr(Stdio::inherit())
        .output()
        .expect("run benches/fifo.sh");
    let text = String::from_utf8_lossy(&output.stdout);
    for line in text.lines() {
        let fields: Vec<&str> = line.split('|').collect();
        match fields.as_slice() {
            ["SKIP", why] => println!("fifo: skipped: {why}"),
            [scenario, figure, value, unit] => {
                let unit: &'static str = match *unit {
                    "trips/s" => "trips/s",
                    "msg/s" => "msg/s",
                    "us" => "us",
                    "MiB" => "MiB",
                    _ => "of 3",
                };
                report.add(
                    scenario,
                    figure,
                    value.trim().parse().unwrap_or(f64::NAN),
                    unit,
                );
            }
            _ => {}
        }
    }
    assert!(
        output.status.success(),
        "benches/fifo.sh failed: {:?}",
        output.status
    );
}

/// How a looping responder answers in the req/res scenarios.
#[derive(Clone, Copy)]
enum Form {
    /// `POST /res/<id>` with the answer as its body.
    Simple,
    /// `GET /res/<id>`, then the answer to its `Patch-Reply` path.
    Reply,
    /// `POST /res/<id>?switch=true`, then the answer to the named channel.
    Switch,
}

impl Form {
    fn label(self) -> &'static str {
        match self {
            Form::Simple => "simple",
            Form::Reply => "reply path",
            Form::Switch => "switch",
        }
    }

    /// One round of a keep-alive responder: takes a request, answers it.
    fn respond(
        self,
        c: &mut Client,
        prefix: &str,
        res: &str,
        answers: &str,
        round: u64,
    ) -> io::Result<()> {
        let answer = [b'a'; 64];
        let ok = |status: u16| {
            if status == 200 {
                Ok(())
            } else {
                Err(io::Error::other(format!("status {status}")))
            }
        };
        match self {
            Form::Simple => {
                c.send(&post(res, &answer, false))?;
                ok(c.response()?.0)
            }
            Form::Reply => {
                c.send(&get(res, false))?;
                let (status, _, reply) = c.response_with(Some("patch-reply"))?;
                ok(status)?;
                let reply = reply.ok_or_else(|| io::Error::other("no Patch-Reply"))?;
                c.send(&post(&reply, &answer, false))?;
                ok(c.response()?.0)
            }
            Form::Switch => {
                // The name is taken in the responder's namespace.
                let channel = format!("{answers}/{round}");
                c.send(&post(
                    &format!("{res}?switch=true"),
                    channel.as_bytes(),
                    false,
                ))?;
                ok(c.response()?.0)?;
                c.send(&post(&format!("{prefix}/{channel}"), &answer, false))?;
                ok(c.response()?.0)
            }
        }
    }
}

/// Sends `delete` (a DELETE of the scenario's channels, answering 410 to
/// whoever waits for a partner that stopped) until every client thread is
/// done, for at most 30 s; returns their latencies, sorted.
fn finish_clients(
    target: &Target,
    delete: &str,
    handles: Vec<thread::JoinHandle<Vec<Duration>>>,
) -> Vec<Duration> {
    let give_up = Instant::now() + Duration::from_secs(30);
    while handles.iter().any(|h| !h.is_finished()) && Instant::now() < give_up {
        if let Ok(mut c) = Client::new(target.addr) {
            let _ = c.send(delete.as_bytes());
            let _ = c.response();
        }
        thread::sleep(Duration::from_millis(100));
    }
    let mut latencies: Vec<Duration> = handles
        .into_iter()
        .flat_map(|h| h.join().unwrap_or_default())
        .collect();
    latencies.sort();
    latencies
}

/// Scenario 9: `responders` looping responders answering as many looping
/// requesters, 64-byte bodies each way, on one id, for `duration`.
fn reqres_round_trips(
    report: &mut Report,
    target: &Target,
    prefix: &str,
    form: Form,
    responders: usize,
    duration: Duration,
) {
    let stop = Arc::new(AtomicBool::new(false));
    let trips = Arc::new(AtomicU64::new(0));
    let barrier = Arc::new(Barrier::new(responders * 2 + 1));
    let id = format!("rt-{}", slug(form.label()));
    let res = format!("{prefix}/res/{id}");
    let req = format!("{prefix}/req/{id}/page");
    let mut handles = Vec::new();
    for n in 0..responders {
        for requester in [true, false] {
            let (stop, trips, barrier) = (stop.clone(), trips.clone(), barrier.clone());
            let (res, req, addr) = (res.clone(), req.clone(), target.addr);
            let answers = format!("answers/{n}");
            let prefix = prefix.to_owned();
            handles.push(thread::spawn(move || -> Vec<Duration> {
                let mut latencies = Vec::new();
                let mut client = Client::new(addr).ok();
                barrier.wait();
                let request = post(&req, &[b'q'; 64], false);
                let mut round = 0;
                while !stop.load(Ordering::Relaxed) {
                    let Some(c) = client.as_mut() else { break };
                    round += 1;
                    if !requester {
                        if form.respond(c, &prefix, &res, &answers, round).is_err() {
                            break;
                        }
                        continue;
                    }
                    let started = Instant::now();
                    if c.send(&request).is_err() {
                        break;
                    }
                    match c.response() {
                        Ok((200, 64)) => {}
                        _ => break,
                    }
                    latencies.push(started.elapsed());
                    trips.fetch_add(1, Ordering::Relaxed);
                }
                stop.store(true, Ordering::Relaxed);
                latencies
            }));
        }
    }
    barrier.wait();
    let cpu_before = cpu_us(target.pid);
    let started = Instant::now();
    thread::sleep(duration);
    let done = trips.load(Ordering::Relaxed);
    let elapsed = started.elapsed();
    let cpu_after = cpu_us(target.pid);
    stop.store(true, Ordering::Relaxed);
    // Whoever waits for a partner that stopped is answered 410.
    let delete = format!("DELETE {res} HTTP/1.1\r\nHost: bench\r\n\r\n");
    let latencies = finish_clients(target, &delete, handles);
    let plural = if responders == 1 { "" } else { "s" };
    let scenario = format!("req/res {} ({responders} responder{plural})", form.label());
    report.add(
        &scenario,
        "round trips per second",
        done as f64 / elapsed.as_secs_f64(),
        "trips/s",
    );
    report.add(
        &scenario,
        "requester latency p50",
        percentile(&latencies, 0.5).as_secs_f64() * 1e3,
        "ms",
    );
    let per_trip = if done > 0 {
        (cpu_after - cpu_before) as f64 / done as f64
    } else {
        f64::NAN
    };
    report.add(&scenario, "server CPU per round trip", per_trip, "us");
    assert!(done > 0, "{scenario}: no round trip completed");
}

/// Writes `total` zero bytes to `stream`.
fn write_zeros(stream: &mut TcpStream, total: u64) -> io::Result<()> {
    let block = vec![0u8; 256 * 1024];
    let mut sent = 0;
    while sent < total {
        let n = (total - sent).min(block.len() as u64) as usize;
        stream.write_all(&block[..n])?;
        sent += n as u64;
    }
    Ok(())
}

/// Scenario 10: a `total`-byte request and a `total`-byte answer through
/// one pair (simple form), both with a Content-Length.
fn reqres_big(report: &mut Report, target: &Target, prefix: &str, total: u64) {
    reset_peak(target.pid);
    let addr = target.addr;
    let res = format!("{prefix}/res/big");
    let req = format!("{prefix}/req/big/file");
    let head = |path: &str| {
        format!("POST {path} HTTP/1.1\r\nHost: bench\r\nContent-Length: {total}\r\n\r\n")
    };
    // The responder sends its answer while it reads the request: a reader
    // thread on the same socket.
    let mut responder = connect(addr).expect("connect");
    let reader = responder.try_clone().expect("clone");
    let got_request = thread::spawn(move || -> io::Result<u64> {
        let mut c = Client {
            stream: reader,
            buf: vec![0; 64 * 1024],
            start: 0,
            end: 0,
        };
        Ok(c.response()?.1)
    });
    responder.write_all(head(&res).as_bytes()).expect("head");
    let answer = thread::spawn(move || write_zeros(&mut responder, total));
    // Let the responder park first, so that the figures are the transfer's.
    thread::sleep(Duration::from_millis(100));
    let cpu_before = cpu_us(target.pid);
    let started = Instant::now();
    let mut requester = Client::new(addr).expect("connect");
    requester.send(head(&req).as_bytes()).expect("head");
    write_zeros(&mut requester.stream, total).expect("request body");
    let (status, received) = requester.response().expect("answer");
    let elapsed = started.elapsed();
    let cpu_ms = (cpu_us(target.pid) - cpu_before) as f64 / 1000.0;
    answer.join().expect("answer thread").expect("answer body");
    let request = got_request.join().expect("reader").expect("request");
    let scenario = format!("req/res {} MiB each way", total / MIB);
    assert_eq!(
        (status, received, request),
        (200, total, total),
        "{scenario}: status, answer and request bytes"
    );
    report.add(
        &scenario,
        "throughput (both bodies)",
        2.0 * total as f64 / MIB as f64 / elapsed.as_secs_f64(),
        "MiB/s",
    );
    report.add(
        &scenario,
        "server peak RSS",
        peak_rss_kib(target.pid) as f64 / 1024.0,
        "MiB",
    );
    report.add(
        &scenario,
        "server CPU per GiB",
        cpu_ms / (2.0 * total as f64 / (1024.0 * MIB as f64)),
        "ms",
    );
}

/// A process the harness started for a scenario (a `patchcord listen` or
/// `work`, a bash loop), in a process group of its own: whatever happens,
/// that group is killed (SIGKILL, by its id) when this is dropped, so no
/// child outlives the scenario.
struct Helper {
    child: Child,
    reaped: bool,
}

impl Helper {
    fn spawn(mut command: Command) -> io::Result<Helper> {
        use std::os::unix::process::CommandExt;
        command.process_group(0);
        Ok(Helper {
            child: command.spawn()?,
            reaped: false,
        })
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Whether the process has exited; it is not reaped, so its pid (its
    /// group's id) cannot be reused while the group is killed.
    fn exited(&self) -> bool {
        if self.reaped {
            return true;
        }
        // SAFETY: waitid on our own child with WNOWAIT only reads its state.
        let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
        let found = unsafe {
            libc::waitid(
                libc::P_PID,
                self.child.id(),
                &mut info,
                libc::WEXITED | libc::WNOHANG | libc::WNOWAIT,
            )
        };
        found == 0 && unsafe { info.si_pid() } != 0
    }

    /// Kills the group with `signal`, unless the leader is reaped.
    fn signal_group(&self, signal: libc::c_int) {
        if !self.reaped {
            // SAFETY: kill(2) on the group this harness created.
            unsafe { libc::kill(-(self.child.id() as libc::pid_t), signal) };
        }
    }

    /// SIGTERM to the process, `grace` for it to exit, then SIGKILL to its
    /// group; returns its exit status, and whether it exited by itself.
    fn stop(&mut self, grace: Duration) -> (Option<std::process::ExitStatus>, bool) {
        if self.reaped {
            return (None, true);
        }
        // SAFETY: kill(2) on our own child, not yet reaped.
        unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM) };
        let give_up = Instant::now() + grace;
        while !self.exited() && Instant::now() < give_up {
            thread::sleep(Duration::from_millis(10));
        }
        let by_itself = self.exited();
        self.signal_group(libc::SIGKILL);
        let status = self.child.wait().ok();
        self.reaped = true;
        (status, by_itself)
    }

    /// SIGKILL to the whole group at once.
    fn kill(&mut self) {
        self.signal_group(libc::SIGKILL);
        if !self.reaped {
            let _ = self.child.wait();
            self.reaped = true;
        }
    }
}

impl Drop for Helper {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Whether `program` is an executable file on PATH.
fn on_path(program: &str) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::env::var_os("PATH").is_some_and(|path| {
        std::env::split_paths(&path).any(|dir| {
            std::fs::metadata(dir.join(program))
                .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
    })
}

/// The first of `programs` missing from PATH, said loudly: the scenario is
/// skipped.
fn missing(scenario: &str, programs: &[&str]) -> bool {
    match programs.iter().find(|p| !on_path(p)) {
        Some(program) => {
            println!("{scenario}: SKIPPED: `{program}` is not on PATH");
            eprintln!("relay bench: {scenario}: SKIPPED, `{program}` is not on PATH");
            true
        }
        None => false,
    }
}

/// `patchcord SUBCOMMAND`, through the emulator when the server runs under one.
fn patchcord_command(args: &[&str]) -> Command {
    let mut command = runner::through(&runner::cargo_runner(), env!("CARGO_BIN_EXE_patchcord"));
    command.args(args);
    command
}

/// A relay's options for the listen scenario: every one of `messages`
/// messages stays retained.
fn retain_all(messages: usize) -> Vec<String> {
    [
        "--pubsub-retain-count",
        &(messages + 100).to_string(),
        "--pubsub-retain-bytes",
        "1G",
        "--pubsub-memory",
        "1G",
    ]
    .iter()
    .map(|s| (*s).to_owned())
    .collect()
}

/// Scenario 12: `patchcord listen URL --since all` working through
/// `messages` retained messages (`message NNNNNNNN`, no line break), published
/// first on one keep-alive connection. With `run_true`, CMD is `true` and
/// the cursor goes to `--state FILE` (on tmpfs when /dev/shm is there, so
/// its fsync is not the disk's), polled every 5 ms until it holds the last
/// id; without, it prints each message and a line break to a pipe this
/// harness reads (and checks, line by line) until it has them all.
fn listen(report: &mut Report, target: &Target, messages: usize, run_true: bool, limit: Duration) {
    let path = if run_true {
        "/bench/pubsub/listen-true"
    } else {
        "/bench/pubsub/listen-lines"
    };
    let body = |i: usize| format!("message {i:08}");
    let mut publisher = Client::new(target.addr).expect("connect");
    let (mut first, mut last) = (0u64, 0u64);
    for i in 0..messages {
        publisher
            .send(&post(path, body(i).as_bytes(), false))
            .expect("publish");
        let (status, _, id) = publisher.response_with(Some("patch-id")).expect("publish");
        assert_eq!(status, 200, "listen: publishing message {i}");
        last = id.and_then(|id| id.parse().ok()).expect("Patch-Id");
        if i == 0 {
            first = last;
        }
    }
    assert_eq!(
        last - first + 1,
        messages as u64,
        "listen: ids of the published messages"
    );
    let url = format!("http://{}{path}", target.addr);
    let shm = std::path::Path::new("/dev/shm");
    let dir = if shm.is_dir() {
        shm.to_path_buf()
    } else {
        std::env::temp_dir()
    };
    let state = dir.join(format!(
        "patchcord-bench-listen-{}.state",
        std::process::id()
    ));
    let _ = std::fs::remove_file(&state);
    let state_arg = state.to_string_lossy().into_owned();
    let mut args = vec!["listen", &url, "--since", "all", "--quiet"];
    if run_true {
        args.extend(["--state", &state_arg, "--", "true"]);
    }
    let mut command = patchcord_command(&args);
    command
        .stdin(Stdio::null())
        .stdout(if run_true {
            Stdio::null()
        } else {
            Stdio::piped()
        })
        .stderr(Stdio::inherit());
    let started = Instant::now();
    let mut listener = Helper::spawn(command).expect("start patchcord listen");
    let give_up = started + limit;
    // What it did: how many it handled, how long that took, what went wrong.
    let (handled, elapsed, trouble) = if run_true {
        let want = last.to_string();
        let mut handled = 0;
        let mut trouble = None;
        loop {
            let cursor = std::fs::read_to_string(&state).unwrap_or_default();
            if let Ok(id) = cursor.trim().parse::<u64>() {
                handled = id.saturating_sub(first) + 1;
            }
            if cursor.trim() == want {
                break;
            }
            if listener.exited() {
                trouble = Some("patchcord listen exited".to_owned());
                break;
            }
            if Instant::now() >= give_up {
                trouble = Some(format!("timed out after {} s", limit.as_secs()));
                break;
            }
            thread::sleep(Duration::from_millis(5));
        }
        (handled, started.elapsed(), trouble)
    } else {
        let stdout = listener.child.stdout.take().expect("stdout");
        let (done, finished) = std::sync::mpsc::channel();
        thread::spawn(move || {
            let mut lines = BufReader::with_capacity(64 * 1024, stdout);
            let mut line = Vec::new();
            let mut handled = 0u64;
            let mut wrong = None;
            while (handled as usize) < messages {
                line.clear();
                match lines.read_until(b'\n', &mut line) {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {}
                }
                let expected = format!("message {handled:08}\n");
                if line != expected.as_bytes() && wrong.is_none() {
                    wrong = Some(format!(
                        "line {handled} is {:?}, not {expected:?}",
                        String::from_utf8_lossy(&line)
                    ));
                }
                handled += 1;
            }
            let _ = done.send((handled, started.elapsed(), wrong));
        });
        match finished.recv_timeout(limit) {
            Ok((handled, elapsed, wrong)) if handled == messages as u64 => {
                (handled, elapsed, wrong)
            }
            Ok((handled, elapsed, _)) => (
                handled,
                elapsed,
                Some("its output ended early (patchcord listen exited)".to_owned()),
            ),
            Err(_) => (
                0,
                started.elapsed(),
                Some(format!("timed out after {} s", limit.as_secs())),
            ),
        }
    };
    let cpu = cpu_us(listener.pid());
    let peak = peak_rss_kib(listener.pid());
    let (status, by_itself) = listener.stop(Duration::from_secs(5));
    let _ = std::fs::remove_file(&state);
    let scenario = if run_true {
        format!("listen -- true ({messages} msgs)")
    } else {
        format!("listen, no CMD ({messages} msgs)")
    };
    if let Some(trouble) = trouble {
        panic!("{scenario}: {trouble}; {handled} of {messages} handled");
    }
    if !by_itself || !status.is_some_and(|s| s.success()) {
        eprintln!(
            "relay bench: {scenario}: after SIGTERM patchcord listen {}",
            if by_itself {
                format!("exited with {status:?}, not 0")
            } else {
                "did not exit within 5 s (killed)".to_owned()
            }
        );
    }
    report.add(
        &scenario,
        "messages per second",
        handled as f64 / elapsed.as_secs_f64(),
        "msg/s",
    );
    report.add(
        &scenario,
        "listener CPU per message",
        cpu as f64 / handled.max(1) as f64,
        "us",
    );
    report.add(&scenario, "listener peak RSS", peak as f64 / 1024.0, "MiB");
}

/// The job of the work scenario: one line in, the number plus one out.
const JOB: &str = "read n; echo $((n+1))";

/// The work scenario's baseline: `slots` responders in bash, each a loop of
/// curl on the reply path (GET /res/jobs with its head to a file, the job on
/// the request, its output POSTed to Patch-Reply), as a user would write it
/// without `patchcord work`. Arguments: URL DIR SLOTS JOB.
const CURL_LOOP: &str = r#"
url=$1 dir=$2 slots=$3 job=$4
respond() {
    local head=$dir/head.$1 in=$dir/in.$1 line reply
    while true; do
        # 408 (nobody asked in time): ask again; no relay: do not spin.
        curl -sf -D "$head" -o "$in" "$url/res/jobs" || { [ $? -eq 22 ] || sleep 0.1; continue; }
        reply=
        while IFS= read -r line; do
            case $line in [Pp]atch-[Rr]eply:*) reply=${line#*: }; reply=${reply%$'\r'} ;; esac
        done < "$head"
        sh -c "$job" < "$in" | curl -sf -o /dev/null --data-binary @- "$url$reply"
    done
}
for slot in $(seq "$slots"); do respond "$slot" & done
wait
"#;

/// Who answers in the work scenario.
#[derive(Clone, Copy, PartialEq)]
enum Worker {
    /// `patchcord work URL/res/jobs -j SLOTS -- sh -c JOB`.
    Patchcord,
    /// [`CURL_LOOP`].
    CurlLoop,
}

/// Scenario 13: `jobs` requests (`N\n`, N counting from 0) from
/// `requesters` keep-alive threads to /req/jobs, answered by `slots`
/// responders running `sh -c JOB` (every answer must be `N+1\n`); the
/// time from the first request to the last answer. Returns jobs per second.
fn work(
    report: &mut Report,
    target: &Target,
    worker: Worker,
    jobs: usize,
    requesters: usize,
    slots: usize,
    limit: Duration,
) -> f64 {
    let base = format!("http://{}", target.addr);
    let slots_arg = slots.to_string();
    let dir = std::env::temp_dir().join(format!("patchcord-bench-work-{}", std::process::id()));
    let mut command = match worker {
        Worker::Patchcord => patchcord_command(&[
            "work",
            &format!("{base}/res/jobs"),
            "-j",
            &slots_arg,
            "--quiet",
            "--",
            "sh",
            "-c",
            JOB,
        ]),
        Worker::CurlLoop => {
            std::fs::create_dir_all(&dir).expect("work: temporary directory");
            let mut command = Command::new("bash");
            command.args([
                "-c",
                CURL_LOOP,
                "curl-loop",
                &base,
                &dir.to_string_lossy(),
                &slots_arg,
                JOB,
            ]);
            command
        }
    };
    command
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit());
    let mut responders = Helper::spawn(command).expect("start the responders");
    // Let them start and park, so that the figure is the jobs'.
    thread::sleep(Duration::from_millis(300));
    let label = match worker {
        Worker::Patchcord => format!("work -j {slots} ({jobs} jobs, sh)"),
        Worker::CurlLoop => format!("bash curl loop x{slots} ({jobs} jobs, sh)"),
    };
    assert!(
        !responders.exited(),
        "{label}: the responders exited at once"
    );
    let next = Arc::new(AtomicU64::new(0));
    let answered = Arc::new(AtomicU64::new(0));
    let last_answer = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let wrong = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let started = Instant::now();
    let mut handles = Vec::new();
    for _ in 0..requesters {
        let (next, answered, last_answer, stop, wrong) = (
            next.clone(),
            answered.clone(),
            last_answer.clone(),
            stop.clone(),
            wrong.clone(),
        );
        let addr = target.addr;
        handles.push(thread::spawn(move || -> Vec<Duration> {
            let mut latencies = Vec::new();
            let Ok(mut c) = Client::new(addr) else {
                return latencies;
            };
            while !stop.load(Ordering::Relaxed) {
                let n = next.fetch_add(1, Ordering::Relaxed);
                if n >= jobs as u64 {
                    break;
                }
                let asked = Instant::now();
                let answer = c
                    .send(&post("/req/jobs", format!("{n}\n").as_bytes(), false))
                    .and_then(|()| c.response_body());
                match answer {
                    Ok((200, body)) if body == format!("{}\n", n + 1).as_bytes() => {
                        latencies.push(asked.elapsed());
                        answered.fetch_add(1, Ordering::Relaxed);
                        last_answer
                            .fetch_max(started.elapsed().as_nanos() as u64, Ordering::Relaxed);
                    }
                    Ok((status, body)) => {
                        let mut wrong = wrong.lock().unwrap_or_else(|e| e.into_inner());
                        wrong.push(format!(
                            "job {n}: {status} {:?}",
                            String::from_utf8_lossy(&body)
                        ));
                    }
                    Err(e) => {
                        let mut wrong = wrong.lock().unwrap_or_else(|e| e.into_inner());
                        wrong.push(format!("job {n}: {e}"));
                        break;
                    }
                }
            }
            latencies
        }));
    }
    let give_up = started + limit;
    while handles.iter().any(|h| !h.is_finished())
        && Instant::now() < give_up
        && !responders.exited()
    {
        thread::sleep(Duration::from_millis(5));
    }
    let timed_out = handles.iter().any(|h| !h.is_finished());
    stop.store(true, Ordering::Relaxed);
    // Requesters left waiting (time out, responders gone) are answered 410.
    let latencies = finish_clients(
        target,
        "DELETE /res/jobs HTTP/1.1\r\nHost: bench\r\n\r\n",
        handles,
    );
    let responders_gone = responders.exited();
    match worker {
        Worker::Patchcord => {
            let (status, by_itself) = responders.stop(Duration::from_secs(5));
            if !by_itself || !status.is_some_and(|s| s.success()) {
                eprintln!(
                    "relay bench: {label}: after SIGTERM patchcord work {}",
                    if by_itself {
                        format!("exited with {status:?}, not 0")
                    } else {
                        "did not exit within 5 s (killed)".to_owned()
                    }
                );
            }
        }
        Worker::CurlLoop => responders.kill(),
    }
    let _ = std::fs::remove_dir_all(&dir);
    let done = answered.load(Ordering::Relaxed);
    let elapsed = Duration::from_nanos(last_answer.load(Ordering::Relaxed));
    let wrong = wrong.lock().unwrap_or_else(|e| e.into_inner()).clone();
    if done < jobs as u64 || !wrong.is_empty() {
        let why = if responders_gone {
            "the responders exited; ".to_owned()
        } else if timed_out {
            format!("timed out after {} s; ", limit.as_secs())
        } else {
            String::new()
        };
        panic!(
            "{label}: {why}{done} of {jobs} jobs answered right; {} wrong, first: {:?}",
            wrong.len(),
            wrong.iter().take(3).collect::<Vec<_>>()
        );
    }
    let rate = done as f64 / elapsed.as_secs_f64();
    report.add(&label, "jobs per second", rate, "jobs/s");
    report.add(
        &label,
        "requester latency p50",
        percentile(&latencies, 0.5).as_secs_f64() * 1e3,
        "ms",
    );
    rate
}

/// The tunnel scenario's access file: token `bench-token` reaches every
/// port of 127.0.0.1.
const TUNNEL_ACCESS: &str = "[tokens.bench]\ntoken = \"bench-token\"\ntunnel = [\"127.0.0.1:*\"]\n";

const TUNNEL_TOKEN: &str = "bench-token";

/// What a tunnel target does with a connection.
#[derive(Clone, Copy, PartialEq)]
enum Behaviour {
    /// Sends back what it reads, on a thread of its own.
    Echo,
    /// Keeps it open, silent.
    Hold,
}

/// A TCP target on 127.0.0.1 for the tunnel scenario: an acceptor thread,
/// and per connection an echo thread or nothing. Dropping it shuts every
/// connection down and joins every thread.
struct TcpTarget {
    port: u16,
    /// When it started; `last_received` counts from here.
    epoch: Instant,
    /// Connections accepted.
    accepted: Arc<AtomicU64>,
    /// Bytes the echo threads read, and when the last of them came (ns
    /// after `epoch`).
    received: Arc<AtomicU64>,
    last_received: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    /// A clone of every accepted socket, to shut it down; held by the
    /// acceptor only to push one.
    connections: Arc<std::sync::Mutex<Vec<TcpStream>>>,
    acceptor: Option<thread::JoinHandle<Vec<thread::JoinHandle<()>>>>,
}

impl TcpTarget {
    fn start(behaviour: Behaviour) -> TcpTarget {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("tunnel target: bind");
        listener
            .set_nonblocking(true)
            .expect("tunnel target: non-blocking");
        let port = listener
            .local_addr()
            .expect("tunnel target: address")
            .port();
        let epoch = Instant::now();
        let accepted = Arc::new(AtomicU64::new(0));
        let received = Arc::new(AtomicU64::new(0));
        let last_received = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let connections = Arc::new(std::sync::Mutex::new(Vec::new()));
        let acceptor = {
            let (accepted, received, last_received, stop, connections) = (
                accepted.clone(),
                received.clone(),
                last_received.clone(),
                stop.clone(),
                connections.clone(),
            );
            thread::spawn(move || {
                let mut echoes = Vec::new();
                while !stop.load(Ordering::Relaxed) {
                    let stream = match listener.accept() {
                        Ok((stream, _)) => stream,
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                            thread::sleep(Duration::from_millis(2));
                            continue;
                        }
                        Err(_) => continue,
                    };
                    let set_up = stream
                        .set_nonblocking(false)
                        .and_then(|()| stream.set_read_timeout(Some(Duration::from_secs(60))))
                        .and_then(|()| stream.set_write_timeout(Some(Duration::from_secs(60))))
                        .and_then(|()| stream.try_clone());
                    let Ok(clone) = set_up else { continue };
                    accepted.fetch_add(1, Ordering::Relaxed);
                    connections
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .push(clone);
                    if behaviour == Behaviour::Echo {
                        let (received, last_received) = (received.clone(), last_received.clone());
                        echoes.push(thread::spawn(move || {
                            echo(stream, &received, &last_received, epoch);
                        }));
                    }
                }
                echoes
            })
        };
        TcpTarget {
            port,
            epoch,
            accepted,
            received,
            last_received,
            stop,
            connections,
            acceptor: Some(acceptor),
        }
    }
}

impl Drop for TcpTarget {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        let echoes = self
            .acceptor
            .take()
            .and_then(|a| a.join().ok())
            .unwrap_or_default();
        for stream in self
            .connections
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .drain(..)
        {
            let _ = stream.shutdown(std::net::Shutdown::Both);
        }
        for echo in echoes {
            let _ = echo.join();
        }
    }
}

/// Sends back what `stream` reads until it ends, fails or is silent for
/// its read timeout; counts what it read in `received`, and when in
/// `last_received` (ns after `epoch`).
fn echo(mut stream: TcpStream, received: &AtomicU64, last_received: &AtomicU64, epoch: Instant) {
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        let n = match stream.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(_) => break,
        };
        received.fetch_add(n as u64, Ordering::Relaxed);
        last_received.store(epoch.elapsed().as_nanos() as u64, Ordering::Relaxed);
        if stream.write_all(&buf[..n]).is_err() {
            break;
        }
    }
}

/// `len` pseudo-random bytes (xorshift64).
fn pattern(len: usize) -> Vec<u8> {
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

/// Whether `data`, found at `offset` of a stream that repeats `pattern`,
/// is what that stream holds there.
fn is_pattern_at(pattern: &[u8], offset: u64, data: &[u8]) -> bool {
    let mut at = (offset % pattern.len() as u64) as usize;
    let mut rest = data;
    while !rest.is_empty() {
        let n = rest.len().min(pattern.len() - at);
        if rest[..n] != pattern[at..at + n] {
            return false;
        }
        rest = &rest[n..];
        at = 0;
    }
    true
}

/// Polls `done` every 20 ms for at most `limit`; whether it came true.
fn wait_until(limit: Duration, mut done: impl FnMut() -> bool) -> bool {
    let give_up = Instant::now() + limit;
    loop {
        if done() {
            return true;
        }
        if Instant::now() >= give_up {
            return false;
        }
        thread::sleep(Duration::from_millis(20));
    }
}

/// CPU time (user + system) of this harness's reaped children, in
/// microseconds.
fn children_cpu_us() -> u64 {
    // SAFETY: getrusage fills the rusage it is given, zeroed here.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    if unsafe { libc::getrusage(libc::RUSAGE_CHILDREN, &mut usage) } != 0 {
        return 0;
    }
    let us = |t: libc::timeval| t.tv_sec as u64 * 1_000_000 + t.tv_usec as u64;
    us(usage.ru_utime) + us(usage.ru_stime)
}

/// `tunnels.open` of the relay's /status; None when it cannot be read.
fn tunnels_open(target: &Target) -> Option<u64> {
    let mut c = Client::new(target.addr).ok()?;
    c.send(&get("/status", true)).ok()?;
    let (status, body) = c.response_body().ok()?;
    if status != 200 {
        return None;
    }
    let body = String::from_utf8_lossy(&body);
    let tunnels = &body[body.find("\"tunnels\":")?..];
    let open = &tunnels[tunnels.find("\"open\":")? + "\"open\":".len()..];
    let digits = open.trim_start();
    let end = digits
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(digits.len());
    digits[..end].parse().ok()
}

/// Scenario 14: `total` bytes through one `patchcord tunnel` to an echo
/// target and back, stdin written and stdout read by two threads at once;
/// what comes back is compared with what was sent (a pattern of an odd
/// length, so that a lost, doubled or misplaced message shows). Throughput
/// each way is `total` over the time from the first byte written to the
/// last byte at the target, and to the last byte back. CPU per MiB carried,
/// counting both ways: the relay's from /proc/PID/stat over the transfer
/// (10 ms ticks), the client's from getrusage(RUSAGE_CHILDREN) around its
/// reaping (its whole life, start and close included, to the microsecond).
fn tunnel_throughput(report: &mut Report, target: &Target, total: u64, limit: Duration) {
    const PATTERN_LEN: usize = (1 << 20) - 1;
    let scenario = format!("tunnel {} MiB each way (echo)", total / MIB);
    let echo = TcpTarget::start(Behaviour::Echo);
    let url = format!("http://{}/_/tunnel/127.0.0.1/{}", target.addr, echo.port);
    let mut command = patchcord_command(&["tunnel", &url, "--token", TUNNEL_TOKEN]);
    command
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    let mut client = Helper::spawn(command).expect("start patchcord tunnel");
    // The relay dials the target before it accepts the upgrade: the
    // figures are the transfer's, not the start's.
    let open = wait_until(Duration::from_secs(20), || {
        echo.accepted.load(Ordering::Relaxed) > 0 || client.exited()
    });
    assert!(
        open && !client.exited(),
        "{scenario}: the tunnel did not open (patchcord tunnel {})",
        if client.exited() { "exited" } else { "hangs" }
    );
    let pattern = Arc::new(pattern(PATTERN_LEN));
    let mut stdin = client.child.stdin.take().expect("stdin");
    let mut stdout = client.child.stdout.take().expect("stdout");
    reset_peak(target.pid);
    let cpu_before = cpu_us(target.pid);
    let started = Instant::now();
    let start_ns = started.duration_since(echo.epoch).as_nanos() as u64;
    // stdin comes back from the writer, so that it stays open until the
    // echo is in: its end would end the tunnel.
    let writer = {
        let pattern = pattern.clone();
        thread::spawn(move || -> (io::Result<()>, ChildStdin) {
            let mut sent = 0;
            while sent < total {
                let n = (total - sent).min(pattern.len() as u64) as usize;
                if let Err(e) = stdin.write_all(&pattern[..n]) {
                    return (Err(e), stdin);
                }
                sent += n as u64;
            }
            (Ok(()), stdin)
        })
    };
    let reader = thread::spawn(move || -> (u64, Option<u64>, Duration) {
        let mut buf = vec![0u8; 256 * 1024];
        let (mut got, mut wrong) = (0u64, None);
        while got < total {
            let n = match stdout.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => break,
            };
            if wrong.is_none() && !is_pattern_at(&pattern, got, &buf[..n]) {
                wrong = Some(got);
            }
            got += n as u64;
        }
        (got, wrong, started.elapsed())
    });
    let give_up = started + limit;
    while !reader.is_finished() && Instant::now() < give_up && !client.exited() {
        thread::sleep(Duration::from_millis(5));
    }
    let timed_out = !reader.is_finished() && !client.exited();
    let cpu = cpu_us(target.pid) - cpu_before;
    let client_peak = peak_rss_kib(client.pid());
    let relay_peak = peak_rss_kib(target.pid);
    let to_target = Duration::from_nanos(
        echo.last_received
            .load(Ordering::Relaxed)
            .saturating_sub(start_ns),
    );
    let at_target = echo.received.load(Ordering::Relaxed);
    if timed_out {
        // Its pipes close: the reader and the writer end.
        client.kill();
    }
    let (got, wrong, back) = reader.join().expect("tunnel reader");
    let (written, stdin) = writer.join().expect("tunnel writer");
    drop(stdin);
    let exited = wait_until(Duration::from_secs(5), || client.exited());
    // The only child reaped here is the client.
    let children_before = children_cpu_us();
    let (status, _) = client.stop(Duration::from_secs(1));
    let client_cpu = children_cpu_us().saturating_sub(children_before);
    if timed_out {
        panic!(
            "{scenario}: timed out after {} s; {got} bytes back, {at_target} at the target",
            limit.as_secs()
        );
    }
    assert!(
        got == total && at_target == total && wrong.is_none() && written.is_ok(),
        "{scenario}: {at_target} bytes at the target, {got} of {total} back, first wrong byte at {wrong:?}, writing: {written:?}"
    );
    if !exited || !status.is_some_and(|s| s.success()) {
        eprintln!(
            "relay bench: {scenario}: after its stdin ended patchcord tunnel {}",
            if exited {
                format!("exited with {status:?}, not 0")
            } else {
                "did not exit within 5 s (killed)".to_owned()
            }
        );
    }
    let mib = total as f64 / MIB as f64;
    report.add(
        &scenario,
        "throughput to target",
        mib / to_target.as_secs_f64(),
        "MiB/s",
    );
    report.add(
        &scenario,
        "throughput back",
        mib / back.as_secs_f64(),
        "MiB/s",
    );
    report.add(
        &scenario,
        "relay CPU per MiB carried",
        cpu as f64 / (2.0 * mib),
        "us",
    );
    report.add(
        &scenario,
        "client CPU per MiB carried",
        client_cpu as f64 / (2.0 * mib),
        "us",
    );
    report.add(
        &scenario,
        "relay peak RSS",
        relay_peak as f64 / 1024.0,
        "MiB",
    );
    report.add(
        &scenario,
        "client peak RSS",
        client_peak as f64 / 1024.0,
        "MiB",
    );
}

/// A WebSocket tunnel opened on the relay at `addr` by a raw client,
/// through a socket with [`connect`]'s timeouts.
fn open_tunnel(addr: SocketAddr, url: &str) -> Result<tungstenite::WebSocket<TcpStream>, String> {
    use tungstenite::client::IntoClientRequest;
    use tungstenite::handshake::HandshakeError;
    let stream = connect(addr).map_err(|e| e.to_string())?;
    let mut request = url.into_client_request().map_err(|e| e.to_string())?;
    request.headers_mut().insert(
        "Patch-Token",
        tungstenite::http::HeaderValue::from_static(TUNNEL_TOKEN),
    );
    match tungstenite::client::client(request, stream) {
        Ok((ws, _)) => Ok(ws),
        Err(HandshakeError::Failure(e)) => Err(e.to_string()),
        Err(HandshakeError::Interrupted(_)) => Err("upgrade interrupted".to_owned()),
    }
}

/// Scenario 15: `count` idle tunnels, opened one after another by raw
/// WebSocket clients, to a target that holds its connections silent; the
/// relay's memory and threads with them open. Then each client sends a
/// close frame and reads until its answer, and /status must show no
/// tunnel open within 10 s.
fn tunnel_idle(report: &mut Report, target: &Target, count: usize) {
    warn_if_open_files_limited();
    let hold = TcpTarget::start(Behaviour::Hold);
    let url = format!("ws://{}/_/tunnel/127.0.0.1/{}", target.addr, hold.port);
    let rss_before = rss_kib(target.pid);
    let started = Instant::now();
    let mut open = Vec::with_capacity(count);
    for i in 0..count {
        match open_tunnel(target.addr, &url) {
            Ok(ws) => open.push(ws),
            Err(e) => panic!("tunnel idle: tunnel {i} of {count} did not open: {e}"),
        }
    }
    let opening = started.elapsed();
    let scenario = format!("tunnel idle ({count})");
    let counted = wait_until(Duration::from_secs(10), || {
        tunnels_open(target) == Some(count as u64)
    });
    assert!(
        counted,
        "{scenario}: /status never showed {count} tunnels open (it shows {:?})",
        tunnels_open(target)
    );
    // Let the relay's threads reach their poll.
    thread::sleep(Duration::from_millis(500));
    let rss = rss_kib(target.pid);
    report.add(
        &scenario,
        "opened per second",
        count as f64 / opening.as_secs_f64(),
        "tunnels/s",
    );
    report.add(&scenario, "relay RSS", rss as f64 / 1024.0, "MiB");
    report.add(
        &scenario,
        "RSS per idle tunnel",
        rss.saturating_sub(rss_before) as f64 / count as f64,
        "KiB",
    );
    report.add(
        &scenario,
        "relay threads",
        threads(target.pid) as f64,
        "threads",
    );
    let closing = Instant::now();
    for ws in &mut open {
        let _ = ws.close(None);
        let _ = ws.flush();
    }
    for ws in &mut open {
        let _ = ws.get_ref().set_read_timeout(Some(Duration::from_secs(5)));
        // The answer to our close, maybe behind a ping.
        for _ in 0..4 {
            if ws.read().is_err() {
                break;
            }
        }
    }
    drop(open);
    let closed = wait_until(Duration::from_secs(10), || tunnels_open(target) == Some(0));
    assert!(
        closed,
        "{scenario}: /status still shows {:?} tunnels open 10 s after they were closed",
        tunnels_open(target)
    );
    report.add(
        &scenario,
        "all closed after",
        closing.elapsed().as_secs_f64() * 1e3,
        "ms",
    );
}

/// Whether this harness runs under qemu-user: started through a runner, or
/// built for ARM but seeing an x86 CPU (binfmt_misc with qemu 7, which does
/// not fake /proc/cpuinfo for ARM), or given qemu's QEMU_LD_PREFIX.
/// A fresh store file for a scenario, in the temporary directory.
fn store_path(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "patchcord-bench-store-{}-{name}",
        std::process::id()
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("store: directory");
    dir.join("pubsub.db")
}

/// Pubsub publishing, with or without `--store`: `publishers` keep-alive
/// clients each publish 64-byte messages to a channel of their own, one
/// after the other, for `duration` (the store's writer sees them together).
fn publish(
    report: &mut Report,
    target: &Target,
    kind: &str,
    publishers: usize,
    duration: Duration,
) {
    let scenario = format!("publish, {kind}, {publishers} publishers");
    let ready = Arc::new(Barrier::new(publishers + 1));
    let stop = Arc::new(AtomicBool::new(false));
    let clients: Vec<_> = (0..publishers)
        .map(|i| {
            let (ready, stop, addr) = (ready.clone(), stop.clone(), target.addr);
            thread::spawn(move || -> (Vec<Duration>, u64) {
                let mut client = Client::new(addr).expect("connect");
                let path = format!("/bench/pubsub/publish/{i}");
                let body = [b'x'; 64];
                let (mut latencies, mut failed) = (Vec::new(), 0);
                ready.wait();
                while !stop.load(Ordering::Relaxed) {
                    let t = Instant::now();
                    let ok = client.send(&post(&path, &body, false)).is_ok()
                        && client.response().is_ok_and(|(status, _)| status == 200);
                    if !ok {
                        failed += 1;
                        break;
                    }
                    latencies.push(t.elapsed());
                }
                (latencies, failed)
            })
        })
        .collect();
    ready.wait();
    let cpu_before = cpu_us(target.pid);
    let started = Instant::now();
    thread::sleep(duration);
    stop.store(true, Ordering::Relaxed);
    let mut latencies = Vec::new();
    let mut failed = 0;
    for client in clients {
        let (mine, lost) = client.join().expect("publisher");
        latencies.extend(mine);
        failed += lost;
    }
    let elapsed = started.elapsed().as_secs_f64();
    let cpu = cpu_us(target.pid).saturating_sub(cpu_before) as f64;
    latencies.sort();
    let count = latencies.len() as f64;
    report.add(&scenario, "publishes/s", count / elapsed, "/s");
    report.add(
        &scenario,
        "publish p50",
        percentile(&latencies, 0.5).as_secs_f64() * 1e3,
        "ms",
    );
    report.add(
        &scenario,
        "publish p99",
        percentile(&latencies, 0.99).as_secs_f64() * 1e3,
        "ms",
    );
    report.add(
        &scenario,
        "server CPU per publish",
        cpu / count.max(1.0),
        "µs",
    );
    report.add(&scenario, "failed publishes", failed as f64, "");
}

/// Start-up with `messages` stored messages: they are published (on 100
/// channels) to a relay on a new store, which is stopped; then the time
/// from starting a relay on the file to its `listening on` line, which it
/// prints once everything is read back.
fn store_startup(report: &mut Report, messages: usize, limit: Duration) {
    let scenario = format!("start-up, {messages} stored messages");
    let file = store_path("startup");
    let file_arg = file.to_string_lossy().into_owned();
    let mut args: Vec<String> = vec!["--store".into(), file_arg];
    args.extend(retain_all(messages));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    {
        let target = start_patchcord(&args);
        let writers: Vec<_> = (0..50)
            .map(|i| {
                let addr = target.addr;
                thread::spawn(move || {
                    let mut client = Client::new(addr).expect("connect");
                    for n in (i..messages).step_by(50) {
                        let path = format!("/bench/pubsub/startup/{}", n % 100);
                        let body = format!("{n:0>63}\n");
                        client
                            .send(&post(&path, body.as_bytes(), false))
                            .expect("publish");
                        let (status, _) = client.response().expect("answer");
                        assert_eq!(status, 200, "publish {n}");
                    }
                })
            })
            .collect();
        for writer in writers {
            writer.join().expect("writer");
        }
        let mut target = target;
        if let Some(child) = &mut target.child {
            // SAFETY: kill(2) on our own child's pid has no memory effects.
            unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
            let _ = child.wait();
        }
    }
    let size = std::fs::metadata(&file).map_or(0, |m| m.len());
    let started = Instant::now();
    let target = start_patchcord(&args);
    let took = started.elapsed();
    report.add(&scenario, "start-up", took.as_secs_f64() * 1e3, "ms");
    report.add(&scenario, "file", size as f64 / MIB as f64, "MiB");
    report.add(
        &scenario,
        "RSS after start-up",
        rss_kib(target.pid) as f64 / 1024.0,
        "MiB",
    );
    let mut client = Client::new(target.addr).expect("connect");
    client
        .send(&get("/bench/pubsub/startup/7?after=0&timeout=1", false))
        .expect("receive");
    let (status, _) = client.response().expect("answer");
    assert_eq!(status, 200, "a stored message was served");
    assert!(took < limit, "start-up took {took:?}");
    drop(target);
    let _ = std::fs::remove_dir_all(file.parent().expect("directory"));
}

/// The balancer's configuration as shipped.
const HAPROXY_CONF: &str = include_str!("../contrib/haproxy.cfg");

/// HAProxy, from PATH or where Debian puts it.
fn haproxy_binary() -> Option<std::path::PathBuf> {
    std::env::var_os("PATH")
        .map(|path| {
            std::env::split_paths(&path)
                .map(|d| d.join("haproxy"))
                .collect::<Vec<_>>()
        })
        .unwrap_or_default()
        .into_iter()
        .chain([std::path::PathBuf::from("/usr/sbin/haproxy")])
        .find(|p| p.is_file())
}

/// HAProxy with `contrib/haproxy.cfg` in front of `relays` (the first of
/// its three `server` lines, the others removed); killed when dropped.
struct Balancer {
    child: Child,
    addr: SocketAddr,
    dir: std::path::PathBuf,
}

impl Balancer {
    /// A port for the balancer, free just now (the relays are told it
    /// first: --cluster-url).
    fn free_port() -> u16 {
        std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port()
    }

    fn start(binary: &Path, relays: &[&Target], port: u16) -> Balancer {
        let dir = std::env::temp_dir().join(format!(
            "patchcord-bench-haproxy-{}-{}",
            std::process::id(),
            relays.len()
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("haproxy: directory");
        let mut conf = HAPROXY_CONF.replacen("bind :3000", &format!("bind 127.0.0.1:{port}"), 1);
        for i in 1..=3 {
            let line = format!("server relay{i} 127.0.0.1:{}", 3000 + i);
            let use_server = format!(
                "    use-server relay{i} if {{ var(txn.shard) -m beg /_/reply/relay{i}. }}\n"
            );
            match relays.get(i - 1) {
                Some(relay) => {
                    conf = conf.replacen(&line, &format!("server relay{i} {}", relay.addr), 1)
                }
                None => {
                    conf =
                        conf.replacen(&format!("    {line}\n"), "", 1)
                            .replacen(&use_server, "", 1);
                }
            }
        }
        let file = dir.join("haproxy.cfg");
        std::fs::write(&file, conf).expect("haproxy: config");
        let child = Command::new(binary)
            .args(["-db", "-n", "4000", "-f"])
            .arg(&file)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start haproxy");
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let up = wait_until(Duration::from_secs(10), || {
            Client::new(addr)
                .and_then(|mut c| {
                    c.send(&get("/healthz", false))?;
                    c.response()
                })
                .is_ok_and(|(status, _)| status == 200)
        });
        assert!(up, "haproxy did not start");
        // Its first health checks, a second apart.
        thread::sleep(Duration::from_millis(2500));
        Balancer { child, addr, dir }
    }
}

impl Drop for Balancer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Keep-alive queue pairs, each on a channel of its own, through HAProxy
/// in front of `relays` relays, for `duration`: pairs/s, the consumers'
/// latency, and the CPU per pair of the relays together and of HAProxy.
fn cluster(report: &mut Report, binary: &Path, relays: usize, pairs: usize, duration: Duration) {
    let port = Balancer::free_port();
    let key = std::env::temp_dir().join(format!("patchcord-bench-key-{}", std::process::id()));
    std::fs::write(&key, "bench-key-shared-by-the-relays-32-bytes").expect("key file");
    let key = key.to_string_lossy().into_owned();
    let balancer_url = format!("http://127.0.0.1:{port}");
    let targets: Vec<Target> = (1..=relays)
        .map(|i| {
            start_patchcord(&[
                "--shard-tag",
                &format!("relay{i}"),
                "--secret-key-file",
                &key,
                "--cluster-url",
                &balancer_url,
            ])
        })
        .collect();
    let balancer = Balancer::start(binary, &targets.iter().collect::<Vec<_>>(), port);
    let stop = Arc::new(AtomicBool::new(false));
    let exchanges = Arc::new(AtomicU64::new(0));
    let ready = Arc::new(Barrier::new(2 * pairs + 1));
    let mut consumers = Vec::new();
    let mut producers = Vec::new();
    for i in 0..pairs {
        let path = format!("/bench/cluster/{relays}/{i}?timeout=2");
        let addr = balancer.addr;
        let (stop_c, ready_c, exchanges) = (stop.clone(), ready.clone(), exchanges.clone());
        let receive = path.clone();
        consumers.push(thread::spawn(move || {
            let (stop, ready) = (stop_c, ready_c);
            let mut client = Client::new(addr).expect("connect");
            let mut latencies = Vec::new();
            ready.wait();
            while !stop.load(Ordering::Relaxed) {
                let t = Instant::now();
                if client.send(&get(&receive, false)).is_err() {
                    break;
                }
                match client.response() {
                    Ok((200, _)) => {
                        latencies.push(t.elapsed());
                        exchanges.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(_) => {}
                    Err(_) => break,
                }
            }
            latencies
        }));
        let (stop, ready) = (stop.clone(), ready.clone());
        producers.push(thread::spawn(move || {
            let mut client = Client::new(addr).expect("connect");
            let body = [b'x'; 64];
            ready.wait();
            while !stop.load(Ordering::Relaxed) {
                if client.send(&post(&path, &body, false)).is_err() || client.response().is_err() {
                    break;
                }
            }
        }));
    }
    ready.wait();
    let cpu = |pids: &[u32]| pids.iter().map(|&p| cpu_us(p)).sum::<u64>();
    let relay_pids: Vec<u32> = targets.iter().map(|t| t.pid).collect();
    let (relays_before, haproxy_before) = (cpu(&relay_pids), cpu_us(balancer.child.id()));
    let started = Instant::now();
    let counted_before = exchanges.load(Ordering::Relaxed);
    thread::sleep(duration);
    let done = exchanges.load(Ordering::Relaxed) - counted_before;
    let elapsed = started.elapsed();
    let (relays_after, haproxy_after) = (cpu(&relay_pids), cpu_us(balancer.child.id()));
    stop.store(true, Ordering::Relaxed);
    // Everything ends within its ?timeout=.
    for producer in producers {
        let _ = producer.join();
    }
    let mut latencies: Vec<Duration> = consumers
        .into_iter()
        .flat_map(|c| c.join().unwrap_or_default())
        .collect();
    latencies.sort();
    let scenario = format!("cluster, {relays} relays ({pairs} pairs)");
    report_pairs(report, &scenario, done, elapsed, &latencies);
    let per_pair = |before: u64, after: u64| (after - before) as f64 / done.max(1) as f64;
    report.add(
        &scenario,
        "relays' CPU per pair",
        per_pair(relays_before, relays_after),
        "us",
    );
    report.add(
        &scenario,
        "HAProxy CPU per pair",
        per_pair(haproxy_before, haproxy_after),
        "us",
    );
    switched(
        report,
        balancer.addr,
        &format!("cluster, {relays} relays"),
        duration,
    );
    let _ = std::fs::remove_file(&key);
}

/// Double-clutch round trips, one after the other, through `addr`, for
/// `duration`: a requester, a responder that switches the answer to a
/// channel of its own, and the answer sent there. Behind a balancer with
/// `--cluster-url`, each answer is taken through it.
fn switched(report: &mut Report, addr: SocketAddr, label: &str, duration: Duration) {
    let started = Instant::now();
    let mut latencies = Vec::new();
    let mut n = 0u64;
    while started.elapsed() < duration {
        n += 1;
        let t = Instant::now();
        let requester = thread::spawn(move || {
            let mut c = Client::new(addr).expect("connect");
            c.send(&get(&format!("/bench/switch/{n}/req/x?timeout=5"), false))
                .expect("request");
            c.response_body().expect("answer")
        });
        let mut responder = Client::new(addr).expect("connect");
        let switch = format!("/bench/switch/{n}/res/x?switch=true&timeout=5");
        responder
            .send(&post(&switch, format!("answer{n}").as_bytes(), false))
            .expect("switch");
        let (status, _) = responder.response().expect("switched");
        assert_eq!(status, 200, "switch");
        let mut answer = Client::new(addr).expect("connect");
        let to = format!("/bench/switch/{n}/answer{n}?timeout=5");
        answer.send(&post(&to, b"done", false)).expect("answer");
        let _ = answer.response();
        let (status, body) = requester.join().expect("requester");
        assert_eq!(
            (status, body.as_slice()),
            (200, &b"done"[..]),
            "round trip {n}"
        );
        latencies.push(t.elapsed());
    }
    latencies.sort();
    let scenario = format!("{label}, double clutch");
    let rate = n as f64 / started.elapsed().as_secs_f64();
    report.add(&scenario, "round trips per second", rate, "/s");
    let p50 = percentile(&latencies, 0.5).as_secs_f64() * 1e3;
    report.add(&scenario, "round trip p50", p50, "ms");
}

fn under_emulation() -> bool {
    let arm = matches!(std::env::consts::ARCH, "arm" | "aarch64");
    let x86_cpu = std::fs::read_to_string("/proc/cpuinfo")
        .is_ok_and(|c| c.contains("GenuineIntel") || c.contains("AuthenticAMD"));
    !runner::cargo_runner().is_empty()
        || (arm && x86_cpu)
        || std::env::var_os("QEMU_LD_PREFIX").is_some()
}

fn main() {
    let options = parse_options();
    if under_emulation() && !options.pi {
        eprintln!(
            "relay bench: running under emulation (qemu); figures would mean nothing. Pass --pi to run anyway."
        );
        std::process::exit(2);
    }
    // Each scenario gets a fresh server when the harness starts it, so one
    // scenario's pooled threads do not count in the next one's memory.
    let url = options.url.clone();
    let pid = options.pid;
    let fresh_with = move |extra: &[String]| match (&url, pid) {
        (Some(url), Some(pid)) => {
            let hostport = url.trim_start_matches("http://").trim_end_matches('/');
            let addr = hostport
                .to_socket_addrs()
                .ok()
                .and_then(|mut a| a.next())
                .unwrap_or_else(|| usage());
            Target {
                addr,
                pid,
                child: None,
                binary: None,
            }
        }
        (None, None) => start_patchcord(&extra.iter().map(String::as_str).collect::<Vec<_>>()),
        _ => usage(),
    };
    let fresh = || fresh_with(&[]);
    let wanted = |name: &str| options.only.as_deref().is_none_or(|only| only == name);
    let smoke = options.smoke;
    let mut report = Report {
        figures: Vec::new(),
    };
    println!("{:<34} {:<28} {:>14} unit", "scenario", "figure", "value");
    if wanted("idle") {
        idle(&mut report, &fresh());
    }
    let seconds = Duration::from_millis(if smoke { 300 } else { 3000 });
    if wanted("rendezvous") {
        let counts = match options.pairs {
            Some(n) => vec![n],
            None if smoke => vec![1, 4],
            None => vec![1, 50, 200],
        };
        for pairs in counts {
            rendezvous(
                &mut report,
                &fresh(),
                &options.prefix,
                options.consumer_delay,
                if options.consumer_delay.is_zero() {
                    "keep-alive"
                } else {
                    "keep-alive, producers first"
                },
                pairs,
                true,
                seconds,
            );
        }
    }
    if wanted("reconnect") {
        rendezvous(
            &mut report,
            &fresh(),
            &options.prefix,
            options.consumer_delay,
            "new connection",
            if smoke { 4 } else { 50 },
            false,
            seconds,
        );
    }
    if wanted("stream") {
        let total = if smoke { 16 * MIB } else { 1024 * MIB };
        stream(&mut report, &fresh(), total, false);
        stream(&mut report, &fresh(), total, true);
    }
    if wanted("backpressure") {
        let (total, rate) = if smoke {
            (4 * MIB, 25_000_000)
        } else {
            (256 * MIB, 25_000_000)
        };
        backpressure(&mut report, &fresh(), total, rate);
    }
    if wanted("waiters") {
        for count in if smoke {
            vec![100]
        } else {
            vec![1_000, 10_000]
        } {
            waiters(&mut report, &fresh(), count);
        }
    }
    if wanted("fanout") {
        fanout(&mut report, &fresh(), if smoke { 10 } else { 100 }, seconds);
    }
    if wanted("reqres") {
        for form in [Form::Simple, Form::Reply, Form::Switch] {
            for responders in [1, 20] {
                reqres_round_trips(
                    &mut report,
                    &fresh(),
                    &options.prefix,
                    form,
                    responders,
                    seconds,
                );
            }
        }
        let total = if smoke { 16 * MIB } else { 256 * MIB };
        reqres_big(&mut report, &fresh(), &options.prefix, total);
    }
    if wanted("fifo") {
        fifo(&mut report, if smoke { 100 } else { 2000 });
    }
    let limit = Duration::from_secs(if smoke { 20 } else { 300 });
    if wanted("listen") {
        if options.url.is_some() {
            eprintln!(
                "relay bench: listen: the server given must retain every message published (--pubsub-retain-count, --pubsub-retain-bytes, --pubsub-memory)"
            );
        }
        if !missing("listen -- true", &["true"]) {
            let messages = if smoke { 20 } else { 2000 };
            let target = fresh_with(&retain_all(messages));
            listen(&mut report, &target, messages, true, limit);
        }
        let messages = if smoke { 200 } else { 50_000 };
        let target = fresh_with(&retain_all(messages));
        listen(&mut report, &target, messages, false, limit);
    }
    if wanted("work") && !missing("work", &["sh", "bash", "curl"]) {
        let (jobs, requesters, slots) = (if smoke { 20 } else { 1000 }, 8, 4);
        let ours = work(
            &mut report,
            &fresh(),
            Worker::Patchcord,
            jobs,
            requesters,
            slots,
            limit,
        );
        let theirs = work(
            &mut report,
            &fresh(),
            Worker::CurlLoop,
            jobs,
            requesters,
            slots,
            limit,
        );
        report.add(
            &format!("work vs curl loop ({jobs} jobs)"),
            "jobs/s ratio",
            ours / theirs,
            "x",
        );
    }
    if wanted("tunnel") {
        if options.url.is_some() {
            eprintln!(
                "relay bench: tunnel: the server given must have an access file in which token {TUNNEL_TOKEN:?} reaches 127.0.0.1:*"
            );
        }
        let access = std::env::temp_dir().join(format!(
            "patchcord-bench-tunnel-{}.toml",
            std::process::id()
        ));
        std::fs::write(&access, TUNNEL_ACCESS).expect("tunnel: access file");
        let args = ["--auth".to_owned(), access.to_string_lossy().into_owned()];
        let total = if smoke { 8 * MIB } else { 256 * MIB };
        tunnel_throughput(&mut report, &fresh_with(&args), total, limit);
        tunnel_idle(
            &mut report,
            &fresh_with(&args),
            if smoke { 20 } else { 1000 },
        );
        let _ = std::fs::remove_file(&access);
    }
    if wanted("store") {
        if options.url.is_some() {
            eprintln!(
                "relay bench: store: starts relays of its own (--store FILE); --url is ignored"
            );
        }
        // Memory only, the store, and the store synced at each commit.
        for (kind, sync) in [
            ("memory", None),
            ("--store", Some("normal")),
            ("--store-sync full", Some("full")),
        ] {
            for publishers in [1, 50] {
                let file = store_path(&format!("publish-{publishers}"));
                let file = file.to_string_lossy();
                let target = match sync {
                    Some(sync) => start_patchcord(&["--store", &file, "--store-sync", sync]),
                    None => start_patchcord(&[]),
                };
                publish(&mut report, &target, kind, publishers, seconds);
                drop(target);
                let _ = std::fs::remove_dir_all(Path::new(&*file).parent().expect("directory"));
            }
        }
        store_startup(&mut report, if smoke { 2_000 } else { 100_000 }, limit);
    }
    if wanted("cluster") {
        if options.url.is_some() {
            eprintln!(
                "relay bench: cluster: starts relays and HAProxy of its own; --url is ignored"
            );
        }
        match haproxy_binary() {
            Some(binary) => {
                let pairs = if smoke { 4 } else { 50 };
                // One relay alone first, for comparison.
                let alone = fresh();
                switched(&mut report, alone.addr, "one relay, no balancer", seconds);
                drop(alone);
                for relays in [1, 3] {
                    cluster(&mut report, &binary, relays, pairs, seconds);
                }
            }
            None => {
                println!("cluster: SKIPPED: haproxy is not installed");
                eprintln!("relay bench: cluster: SKIPPED, haproxy is not installed");
            }
        }
    }
    if let Some(path) = &options.json {
        std::fs::write(path, report.json()).expect("write --json file");
    }
}
