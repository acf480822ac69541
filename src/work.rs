//! `patchcord work URL -- CMD`: the job worker on a request/responder
//! channel. Each of `-j N` slots takes the next request (`GET /res/ID`),
//! runs CMD with the request's body streamed into its stdin and its
//! method, path and headers in its environment, and answers on the reply
//! path (`Patch-Reply`) with CMD's stdout, streamed. The status comes from
//! how CMD ended when its output fits [`COMMIT`] bytes (200, 500 with its
//! stderr's last line, a mapped exit status, 504 past `--timeout`), or
//! from a CGI header block; a longer output is sent as it comes, and cut
//! if CMD then fails, so the requester never takes a failure for a 2xx.

use std::ffi::OsString;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::process::ExitStatusExt;
use std::process::{Child, ChildStderr, ChildStdin, ChildStdout};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use crossbeam_channel::{RecvTimeoutError, bounded};

use crate::child;
use crate::cli::WorkArgs;
use crate::client::{Backoff, Client, Failure, Incoming, Relay, Upload};
use crate::error::{ConfigError, Error, Exit};
use crate::mode::envelope;
use crate::sys;

/// Output up to this size is held until CMD ends, so that its status can
/// still say how it ended; past it the answer is committed and streamed.
pub const COMMIT: usize = 64 * 1024;

/// The longest CGI header block, and the longest stderr line kept.
const MAX_CGI_HEAD: usize = 16 * 1024;
const MAX_REASON: usize = 1024;

/// How long a read of a request's body may wait (the relay cuts a stalled
/// requester before).
const BODY_PATIENCE: Duration = Duration::from_secs(120);

/// The most slots.
const MAX_JOBS: usize = 1024;

/// The first and the longest wait before asking the relay again.
const FIRST_WAIT: Duration = Duration::from_millis(250);
const LONGEST_WAIT: Duration = Duration::from_secs(30);

/// `patchcord work`.
pub fn run(args: WorkArgs) -> Result<Exit, Error> {
    let usage = |reason: String| Error::Config(ConfigError::new(reason));
    let relay = Relay::parse(&args.url).map_err(usage)?;
    crate::client::check_token(args.presents.token.as_deref()).map_err(usage)?;
    let path = relay.path().to_owned();
    if !is_responder(&path) {
        return Err(usage(format!(
            "{:?} is not a responder's URL (…/res/ID; requesters use …/req/ID)",
            args.url
        )));
    }
    if args.jobs == 0 || args.jobs > MAX_JOBS {
        return Err(usage(format!("-j {}: from 1 to {MAX_JOBS}", args.jobs)));
    }
    let timeout = args
        .timeout
        .map(|secs| crate::config::seconds("--timeout", secs))
        .transpose()?
        .filter(|t| !t.is_zero());
    let statuses = match &args.status_from_exit {
        Some(map) => parse_status_map(map).map_err(usage)?,
        None => Vec::new(),
    };
    let stop = sys::Flag::on_signals().map_err(Error::Signal)?;
    let worker = Worker {
        relay,
        path,
        token: args.presents.token.clone(),
        argv: args.command.clone(),
        timeout,
        statuses,
        stop: &stop,
        refused: Mutex::new(None),
    };
    log::info!(
        "working on {} with {} slot{}",
        crate::mode::short(&worker.path),
        args.jobs,
        if args.jobs == 1 { "" } else { "s" }
    );
    thread::scope(|scope| {
        for n in 0..args.jobs {
            let worker = &worker;
            let spawned = thread::Builder::new()
                .name(format!("slot {n}"))
                .spawn_scoped(scope, move || worker.slot());
            if let Err(e) = spawned {
                worker.refuse(format!("cannot start slot {n}: {e}"));
            }
        }
    });
    match worker
        .refused
        .into_inner()
        .unwrap_or_else(|p| p.into_inner())
    {
        Some(reason) => Err(Error::Client {
            command: "work",
            reason,
        }),
        None => {
            log::info!("stopped");
            Ok(Exit::Clean)
        }
    }
}

/// Whether `path` names a responder, by the relay's own grammar.
fn is_responder(path: &str) -> bool {
    crate::route::Channel::parse(path.to_owned()).mode == crate::route::Mode::Responder
}

/// `1=404,2=400` → [(1, 404), (2, 400)].
fn parse_status_map(map: &str) -> Result<Vec<(i32, u16)>, String> {
    map.split(',')
        .filter(|pair| !pair.trim().is_empty())
        .map(|pair| {
            let parsed = pair.split_once('=').and_then(|(code, status)| {
                let code: i32 = code.trim().parse().ok()?;
                let status: u16 = status.trim().parse().ok()?;
                ((1..=255).contains(&code) && (200..=599).contains(&status))
                    .then_some((code, status))
            });
            parsed.ok_or_else(|| {
                format!(
                    "--status-from-exit {pair:?}: CODE=STATUS, CODE 1 to 255, STATUS 200 to 599"
                )
            })
        })
        .collect()
}

/// What every slot shares.
struct Worker<'a> {
    relay: Relay,
    /// The responder's path.
    path: String,
    token: Option<String>,
    argv: Vec<OsString>,
    timeout: Option<Duration>,
    statuses: Vec<(i32, u16)>,
    stop: &'a sys::Flag,
    /// Why the worker gave up (a refusal asking again cannot change).
    refused: Mutex<Option<String>>,
}

impl Worker<'_> {
    /// Gives up for `reason` (the first one is kept), stopping every slot.
    fn refuse(&self, reason: String) {
        let mut refused = self.refused.lock().unwrap_or_else(|p| p.into_inner());
        refused.get_or_insert(reason);
        self.stop.raise();
    }

    /// A client of the relay with the token.
    fn client(&self) -> Client {
        Client::new(self.relay.clone()).with_token(self.token.clone())
    }

    // ── a slot's loop: take the next request, answer it ──
    fn slot(&self) {
        let mut client = self.client();
        let mut reply = self.client();
        let mut backoff = Backoff::new(FIRST_WAIT, LONGEST_WAIT);
        let watch = [(self.stop.fd(), libc::POLLIN)];
        while !self.stop.is_raised() {
            let why = match client.open("GET", &self.path, &[], Upload::None, &watch) {
                Err(Failure::Withdrawn(..)) => return,
                Err(Failure::Io(e)) => format!("cannot reach the relay: {e}"),
                Ok(request) if request.head.status == 200 => {
                    backoff.reset();
                    self.job(request, &mut reply);
                    continue;
                }
                // Nobody asked within the relay's wait: ask again.
                Ok(request) if request.head.status == 408 => {
                    let _ = request.skip();
                    continue;
                }
                Ok(request) => {
                    let status = request.head.status;
                    let reason = request.reason();
                    if crate::client::is_final(status) {
                        self.refuse(format!(
                            "the relay refused {}: {status} {reason}",
                            self.path
                        ));
                        return;
                    }
                    format!("the relay answered {status} {reason}")
                }
            };
            if backoff.failures() == 0 {
                log::warn!("{why}; asking again");
            }
            if backoff.sleep(self.stop) {
                return;
            }
        }
    }

    /// Runs CMD for one request and answers it.
    fn job(&self, mut request: Incoming<'_>, reply: &mut Client) {
        let started = Instant::now();
        // A requester's body may come slowly; the relay bounds its stalls.
        request.patience(BODY_PATIENCE);
        let head = &request.head;
        let Some(reply_path) = head.header("Patch-Reply").map(str::to_owned) else {
            log::error!("the relay gave a request without Patch-Reply; is it a patchcord relay?");
            let _ = request.skip();
            return;
        };
        let method = head.header("Patch-Method").unwrap_or("GET").to_owned();
        let uri = head.header("Patch-Uri").unwrap_or("/").to_owned();
        let path = head.header("Patch-Path").unwrap_or("/").to_owned();
        let mut env = vec![
            (
                "PATCHCORD_METHOD".to_owned(),
                child::value(method.as_bytes()),
            ),
            ("PATCHCORD_URI".to_owned(), child::value(uri.as_bytes())),
            ("PATCHCORD_PATH".to_owned(), child::value(path.as_bytes())),
            (
                "PATCHCORD_QUERY".to_owned(),
                child::value(uri.split_once('?').map_or("", |(_, q)| q).as_bytes()),
            ),
            (
                "PATCHCORD_CONTENT_TYPE".to_owned(),
                child::value(head.header("Content-Type").unwrap_or("").as_bytes()),
            ),
        ];
        for (name, value) in &head.headers {
            if envelope::has_prefix(name, "Patch-H-") {
                let name = &name["Patch-H-".len()..];
                env.push((child::header_variable(name), child::value(value)));
            }
        }
        let mut process = match child::spawn(&self.argv, &env, true) {
            Ok(process) => process,
            Err(e) => {
                let reason = format!("cannot run {:?}: {e}", self.argv[0]);
                log::error!("{reason}");
                let _ = request.skip();
                self.send(
                    reply,
                    &reply_path,
                    500,
                    &[],
                    Upload::Bytes(reason.as_bytes()),
                );
                return;
            }
        };
        let (Some(stdin), Some(stdout), Some(stderr)) = (
            process.stdin.take(),
            process.stdout.take(),
            process.stderr.take(),
        ) else {
            log::error!("CMD started without its pipes");
            child::kill_group(process.id());
            let _ = process.wait();
            return;
        };
        let pid = process.id();
        let timed_out = AtomicBool::new(false);
        let cut = AtomicBool::new(false);
        let Ok(reaped) = sys::Flag::new() else {
            log::error!("cannot make a flag; the request goes unanswered");
            child::kill_group(pid);
            let _ = process.wait();
            return;
        };
        let reason = Arc::new(Mutex::new(String::new()));
        let (stderr_done, stderr_ended) = bounded::<()>(1);
        // CMD's stderr is read by a thread that is not waited for: a
        // process CMD started may hold it open long after CMD ended.
        let kept = Arc::clone(&reason);
        let spawned = thread::Builder::new().name("stderr".into()).spawn(move || {
            relay_stderr(stderr, &kept);
            let _ = stderr_done.send(());
        });
        if let Err(e) = spawned {
            log::warn!("cannot start a thread for CMD's stderr: {e}");
        }
        let (finished, watchdog) = bounded::<()>(0);
        let status = thread::scope(|scope| {
            let (request, reaped, cut) = (&mut request, &reaped, &cut);
            scope.spawn(move || feed(request, stdin, reaped, cut, pid));
            if let Some(limit) = self.timeout {
                let timed_out = &timed_out;
                scope.spawn(move || {
                    if let Err(RecvTimeoutError::Timeout) = watchdog.recv_timeout(limit) {
                        timed_out.store(true, Ordering::SeqCst);
                        child::kill_group(pid);
                    }
                });
            }
            let ended = Ended {
                process: &mut process,
                finished: Some(finished),
                reaped,
                timed_out: &timed_out,
                cut,
                stderr_ended,
                reason: &reason,
            };
            self.answer(stdout, ended, reply, &reply_path)
        });
        log::info!(
            "{method} {path:?} → {} in {} ms",
            status.map_or("cut".to_owned(), |s| s.to_string()),
            started.elapsed().as_millis()
        );
    }

    /// Reads CMD's output and answers with it; the status sent, or None
    /// when the answer was cut.
    fn answer(
        &self,
        mut stdout: ChildStdout,
        mut ended: Ended<'_>,
        reply: &mut Client,
        reply_path: &str,
    ) -> Option<u16> {
        let mut held = Vec::with_capacity(16 * 1024);
        // One byte past COMMIT tells an output of exactly COMMIT bytes,
        // which still waits for CMD's end, from a longer one.
        let whole = match read_up_to(&mut stdout, &mut held, COMMIT + 1) {
            Ok(whole) => whole,
            Err(e) => {
                log::warn!("cannot read CMD's output: {e}");
                true
            }
        };
        let cgi = match Cgi::parse(&held, whole) {
            Ok(cgi) => cgi,
            Err(reason) => {
                child::kill_group(ended.process.id());
                let _ = ended.wait();
                let reason = format!("CMD's output: {reason}\n");
                log::warn!("{}", reason.trim_end());
                return self.send(
                    reply,
                    reply_path,
                    500,
                    &[],
                    Upload::Bytes(reason.as_bytes()),
                );
            }
        };
        let body = &held[cgi.length..];
        if whole {
            // CMD's output is all here: how it ended decides the status.
            let exit = ended.wait();
            let (status, body): (u16, Vec<u8>) = match exit {
                Ending::TimedOut => {
                    let secs = self.timeout.unwrap_or_default().as_secs_f64();
                    (504, format!("timed out after {secs} s\n").into_bytes())
                }
                Ending::Cut => (502, b"the request's body was cut\n".to_vec()),
                Ending::Code(0) => (cgi.status.unwrap_or(200), body.to_vec()),
                Ending::Code(code) => match self.statuses.iter().find(|(c, _)| *c == code) {
                    Some(&(_, status)) => (status, body.to_vec()),
                    None => (500, ended.reason(exit)),
                },
                other => (500, ended.reason(other)),
            };
            let plain = [(
                "Content-Type".to_owned(),
                b"text/plain; charset=utf-8".to_vec(),
            )];
            let headers = if matches!(status, 500 | 502 | 504) {
                &plain[..]
            } else {
                &cgi.headers[..]
            };
            return self.send(reply, reply_path, status, headers, Upload::Bytes(&body));
        }
        // Past COMMIT bytes: the answer goes out as it comes.
        let mut rest = Rest {
            held: body,
            stdout,
            ended,
        };
        let sent = self.send(
            reply,
            reply_path,
            cgi.status.unwrap_or(200),
            &cgi.headers,
            Upload::Stream(&mut rest),
        );
        // An answer that broke off (the requester left, the relay went)
        // leaves CMD unwaited: end it, and reap it.
        let Rest {
            stdout, mut ended, ..
        } = rest;
        drop(stdout);
        if let Ok(None) = ended.process.try_wait() {
            child::kill_group(ended.process.id());
            ended.wait();
        }
        sent
    }

    /// POSTs an answer to the reply path; the status sent, or None when
    /// the answer did not reach the relay whole.
    fn send(
        &self,
        reply: &mut Client,
        reply_path: &str,
        status: u16,
        headers: &[(String, Vec<u8>)],
        body: Upload<'_>,
    ) -> Option<u16> {
        let status_text = status.to_string();
        let mut sent: Vec<(&str, &[u8])> = vec![("Patch-Status", status_text.as_bytes())];
        sent.extend(headers.iter().map(|(n, v)| (n.as_str(), v.as_slice())));
        let outcome = reply.open("POST", reply_path, &sent, body, &[]);
        match outcome {
            Ok(answer) => {
                let code = answer.head.status;
                let text = answer.reason();
                match code {
                    200..=299 => Some(status),
                    410 => {
                        log::warn!("the requester had left: {text:?}");
                        None
                    }
                    _ => {
                        log::warn!("the relay refused the answer: {code} {text:?}");
                        None
                    }
                }
            }
            Err(e) => {
                log::warn!("the answer was cut: {e}");
                None
            }
        }
    }
}

/// How CMD ended.
#[derive(Debug, Clone, Copy)]
enum Ending {
    Code(i32),
    Signal(i32),
    TimedOut,
    /// The request's body was cut: CMD was killed, its work is void.
    Cut,
    Lost,
}

impl std::fmt::Display for Ending {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Ending::Code(code) => write!(f, "exit status {code}"),
            Ending::Signal(signal) => write!(f, "killed by signal {signal}"),
            Ending::TimedOut => f.write_str("timed out"),
            Ending::Cut => f.write_str("the request's body was cut"),
            Ending::Lost => f.write_str("could not be waited for"),
        }
    }
}

/// What tells how CMD ended: the process, the watchdog's word, whether
/// the request's body was cut, and its stderr's last line.
struct Ended<'a> {
    process: &'a mut Child,
    /// Dropped once CMD is reaped: the watchdog stands down.
    finished: Option<crossbeam_channel::Sender<()>>,
    /// Raised once CMD is reaped: the feeder stops waiting on its stdin.
    reaped: &'a sys::Flag,
    timed_out: &'a AtomicBool,
    cut: &'a AtomicBool,
    stderr_ended: crossbeam_channel::Receiver<()>,
    reason: &'a Mutex<String>,
}

impl Ended<'_> {
    fn wait(&mut self) -> Ending {
        let status = loop {
            match self.process.wait() {
                Ok(status) => break status,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    log::warn!("cannot wait for CMD: {e}");
                    return Ending::Lost;
                }
            }
        };
        self.finished = None;
        self.reaped.raise();
        if self.cut.load(Ordering::SeqCst) {
            return Ending::Cut;
        }
        match (status.code(), status.signal()) {
            (Some(code), _) => Ending::Code(code),
            (None, Some(_)) if self.timed_out.load(Ordering::SeqCst) => Ending::TimedOut,
            (None, Some(signal)) => Ending::Signal(signal),
            (None, None) => Ending::Lost,
        }
    }

    /// The body of a 500: CMD's stderr's last line, else how it ended.
    fn reason(&self, exit: Ending) -> Vec<u8> {
        // Its stderr ends with it, unless something it started holds it.
        let _ = self.stderr_ended.recv_timeout(Duration::from_millis(200));
        let line = self
            .reason
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let line = if line.is_empty() {
            format!("{exit}")
        } else {
            line
        };
        format!("{line}\n").into_bytes()
    }
}

/// A committed answer's body: what was held, then the rest of stdout;
/// at its end, an error if CMD failed, so the answer is cut.
struct Rest<'a, 'e> {
    held: &'a [u8],
    stdout: ChildStdout,
    ended: Ended<'e>,
}

impl Read for Rest<'_, '_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if !self.held.is_empty() {
            let n = self.held.len().min(buf.len());
            buf[..n].copy_from_slice(&self.held[..n]);
            self.held = &self.held[n..];
            return Ok(n);
        }
        let n = self.stdout.read(buf)?;
        if n > 0 {
            return Ok(n);
        }
        match self.ended.wait() {
            Ending::Code(0) => Ok(0),
            exit => Err(io::Error::other(format!(
                "CMD failed after its answer began ({exit})"
            ))),
        }
    }
}

/// Reads into `held` until it holds `limit` bytes or the end; true at the end.
fn read_up_to(from: &mut impl Read, held: &mut Vec<u8>, limit: usize) -> io::Result<bool> {
    let mut buf = [0u8; 16 * 1024];
    while held.len() < limit {
        let want = buf.len().min(limit - held.len());
        match from.read(&mut buf[..want]) {
            Ok(0) => return Ok(true),
            Ok(n) => held.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(false)
}

/// Streams the request's body into CMD's stdin. If CMD stops reading (or
/// ends, `reaped`, while something it started holds its stdin), the rest
/// is read and dropped, so the request still counts as delivered. A body
/// that breaks off kills CMD and marks the job `cut`: its work is void.
fn feed(
    request: &mut Incoming<'_>,
    stdin: ChildStdin,
    reaped: &sys::Flag,
    cut: &AtomicBool,
    pid: u32,
) {
    let fd = stdin.as_raw_fd();
    let mut stdin = sys::set_nonblocking(fd, true).ok().map(|()| stdin);
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match request.read(&mut buf) {
            Ok(0) => return,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                log::warn!("the request's body was cut: {e}");
                cut.store(true, Ordering::SeqCst);
                child::kill_group(pid);
                return;
            }
        };
        if let Some(pipe) = &mut stdin {
            if !write_until(pipe, &buf[..n], reaped) {
                stdin = None;
            }
        }
    }
}

/// Writes `bytes` to the non-blocking `pipe`, waiting while it is full;
/// false if it broke, or `reaped` was raised while it was full.
fn write_until(pipe: &mut ChildStdin, mut bytes: &[u8], reaped: &sys::Flag) -> bool {
    while !bytes.is_empty() {
        match pipe.write(bytes) {
            Ok(n) => bytes = &bytes[n..],
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                let fds = [
                    (pipe.as_raw_fd(), libc::POLLOUT),
                    (reaped.fd(), libc::POLLIN),
                ];
                if sys::poll(&fds, None).is_err() || reaped.is_raised() {
                    return false;
                }
            }
            Err(_) => return false,
        }
    }
    true
}

/// Copies CMD's stderr to ours, keeping its last non-empty line.
fn relay_stderr(stderr: ChildStderr, last: &Mutex<String>) {
    let mut reader = BufReader::new(stderr);
    let mut line = Vec::new();
    loop {
        line.clear();
        match reader.by_ref().take(64 * 1024).read_until(b'\n', &mut line) {
            Ok(0) | Err(_) => return,
            Ok(_) => {
                let _ = io::stderr().write_all(&line);
                let text = String::from_utf8_lossy(&line);
                let text = text.trim();
                if !text.is_empty() {
                    let mut kept: String = text.chars().take(MAX_REASON).collect();
                    kept.retain(|c| !c.is_control());
                    *last.lock().unwrap_or_else(|p| p.into_inner()) = kept;
                }
            }
        }
    }
}

/// A CGI header block at the start of CMD's output.
#[derive(Debug, Default)]
struct Cgi {
    status: Option<u16>,
    /// Headers for the reply request: Content-Type, and `Patch-H-` ones.
    headers: Vec<(String, Vec<u8>)>,
    /// The block's length, with its empty line.
    length: usize,
}

impl Cgi {
    /// Reads the block if the output starts with `Status:` or
    /// `Content-Type:`; `whole`: the output ends where `held` does.
    fn parse(held: &[u8], whole: bool) -> Result<Cgi, String> {
        let starts = |name: &str| {
            held.len() > name.len() && held[..name.len()].eq_ignore_ascii_case(name.as_bytes())
        };
        if !(starts("Status:") || starts("Content-Type:")) {
            return Ok(Cgi::default());
        }
        let mut cgi = Cgi::default();
        let mut at = 0;
        loop {
            let Some(end) = held[at..].iter().position(|&b| b == b'\n') else {
                if whole {
                    // The output ended inside the block: no body.
                    if at < held.len() {
                        cgi.line(&held[at..])?;
                    }
                    cgi.length = held.len();
                    return Ok(cgi);
                }
                return Err("a header block without its end (an empty line)".to_owned());
            };
            let line = &held[at..at + end];
            let line = line.strip_suffix(b"\r").unwrap_or(line);
            at += end + 1;
            if line.is_empty() {
                cgi.length = at;
                return Ok(cgi);
            }
            if at > MAX_CGI_HEAD {
                return Err("a header block over 16 KiB".to_owned());
            }
            cgi.line(line)?;
        }
    }

    fn line(&mut self, line: &[u8]) -> Result<(), String> {
        let text =
            std::str::from_utf8(line).map_err(|_| "a header that is not UTF-8".to_owned())?;
        let (name, value) = text
            .split_once(':')
            .ok_or_else(|| format!("{text:?} is not a header"))?;
        let (name, value) = (name.trim(), value.trim());
        let is_token = !name.is_empty()
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b));
        if !is_token || value.chars().any(|c| c.is_control() && c != '\t') {
            return Err(format!("{text:?} is not a header"));
        }
        if name.eq_ignore_ascii_case("status") {
            let code = value.split(' ').next().unwrap_or("");
            let status = code
                .parse::<u16>()
                .ok()
                .filter(|s| (200..=599).contains(s))
                .ok_or_else(|| format!("Status: {value:?} is not 200 to 599"))?;
            self.status = Some(status);
        } else if let Some(own) = ["Content-Type", "Content-Encoding", "Content-Disposition"]
            .into_iter()
            .find(|own| name.eq_ignore_ascii_case(own))
        {
            // The answer's own headers, which the relay takes as they are.
            self.headers
                .push((own.to_owned(), value.as_bytes().to_vec()));
        } else if envelope::is_relayed(name) {
            // Others travel by the relay's rule for Patch-H- headers (never
            // framing, cookies or the relay's own).
            self.headers
                .push((format!("Patch-H-{name}"), value.as_bytes().to_vec()));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_responder_paths_are_taken() {
        assert!(is_responder("/res/jobs"));
        assert!(is_responder("/u/alice/res/api"));
        assert!(!is_responder("/req/jobs"));
        assert!(!is_responder("/res"));
        assert!(!is_responder("/jobs"));
        assert!(!is_responder("/pubsub/res/x"));
    }

    #[test]
    fn exit_statuses_map_to_http_statuses() {
        assert_eq!(
            parse_status_map("1=404, 2=400"),
            Ok(vec![(1, 404), (2, 400)])
        );
        assert!(parse_status_map("0=200").is_err());
        assert!(parse_status_map("1=100").is_err());
        assert!(parse_status_map("x").is_err());
    }

    #[test]
    fn a_cgi_block_sets_the_status_and_headers() {
        let out =
            b"Status: 201 Created\r\nContent-Type: text/plain\nX-Id: 7\nSet-Cookie: a=b\n\nmade";
        let cgi = Cgi::parse(out, true).expect("parses");
        assert_eq!(cgi.status, Some(201));
        assert_eq!(&out[cgi.length..], b"made");
        assert_eq!(
            cgi.headers,
            vec![
                ("Content-Type".to_owned(), b"text/plain".to_vec()),
                ("Patch-H-X-Id".to_owned(), b"7".to_vec())
            ]
        );
        assert_eq!(
            Cgi::parse(b"Status: 404", true).expect("parses").status,
            Some(404)
        );
        assert_eq!(
            Cgi::parse(b"plain output\n", true).expect("parses").length,
            0
        );
        assert!(Cgi::parse(b"Status: 99\n\n", true).is_err());
        assert!(Cgi::parse(b"Status: 200\nBad\r\x01: x\n\n", true).is_err());
        assert!(Cgi::parse(b"Status: 200\nX: y", false).is_err());
    }
}
