//! `patchcord fifo DIR`: channels as a pair of named pipes, for any program
//! that can `read` and `printf` lines. Lines written to `DIR/send` are sent
//! to one channel (`send.rs`); messages of another come out of `DIR/recv`
//! (`recv.rs`), strictly one at a time. The supervisor here makes the
//! directory (`dir.rs`), mends it, and on SIGINT/SIGTERM removes it first,
//! drains what was accepted, and spools what could not be delivered.
//! Design notes: reference/fifo-bridge.md of the project's shared notes.

mod dir;
mod recv;
mod send;

use std::ffi::OsString;
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;
use std::process::Command;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use crossbeam_channel::{RecvTimeoutError, bounded, unbounded};
use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
use signal_hook::iterator::Signals;

use crate::cli::FifoArgs;
use crate::error::Exit;
use crate::{client, sys};

/// How long after the drain deadline the pumps may take to finish.
const GIVE_UP: Duration = Duration::from_secs(6);

/// How often the supervisor checks that the FIFOs are still there.
const WATCHDOG: Duration = Duration::from_secs(1);

/// What the pumps and the supervisor share.
pub struct Shared {
    /// Raised on the first signal: stop taking new work.
    pub stop: sys::Flag,
    /// Raised at the drain deadline or on a second signal: give up.
    pub abort: sys::Flag,
    /// The message delimiter: `\n`, or NUL with -z.
    pub delim: u8,
    /// The longest message.
    pub max: usize,
    /// While the recv pump waits in open(2) for a reader: its O_PATH
    /// descriptor of the FIFO it waits on (see [`Shared::release_recv`]).
    recv_waiting: Mutex<Option<RawFd>>,
    spooled: Mutex<Vec<Spooled>>,
    sent: AtomicU64,
    received: AtomicU64,
    dropped: AtomicU64,
}

/// A message that could not be delivered, kept for the spool.
pub struct Spooled {
    bytes: Vec<u8>,
    note: &'static str,
}

impl Spooled {
    pub fn new(bytes: Vec<u8>, note: &'static str) -> Spooled {
        Spooled { bytes, note }
    }
}

impl Shared {
    pub fn spool(&self, message: Spooled) {
        self.spooled
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(message);
    }

    /// A message over --max-message was dropped.
    pub fn dropped(&self, bytes: usize, side: &str) {
        let n = self.dropped.fetch_add(1, Ordering::Relaxed) + 1;
        log::warn!(
            "{side}: a message of {bytes} bytes is over --max-message {}; dropped ({n} so far)",
            self.max
        );
    }

    pub fn count_dropped(&self) {
        self.dropped.fetch_add(1, Ordering::Relaxed);
    }

    pub fn count_sent(&self) {
        self.sent.fetch_add(1, Ordering::Relaxed);
    }

    pub fn count_received(&self) {
        self.received.fetch_add(1, Ordering::Relaxed);
    }

    /// The recv pump is about to wait for a reader on the FIFO that `fd`
    /// (O_PATH, open until the wait is over) refers to, or (None) is done
    /// waiting. False when stopping: it must not wait, as nobody would
    /// release it.
    pub fn recv_waiting(&self, fd: Option<RawFd>) -> bool {
        let mut waiting = self.recv_waiting.lock().unwrap_or_else(|p| p.into_inner());
        if fd.is_some() && self.stop.is_raised() {
            return false;
        }
        *waiting = fd;
        true
    }

    /// Releases the recv pump from its wait for a reader by opening, as a
    /// reader, the very FIFO it waits on: by its descriptor, since its path
    /// may be gone (at stop) or lead to a FIFO made since (the watchdog).
    /// The descriptor is returned; closing it at once is enough.
    pub fn release_recv(&self) -> Option<File> {
        let waiting = self.recv_waiting.lock().unwrap_or_else(|p| p.into_inner());
        let fd = (*waiting)?;
        sys::open(&sys::reopen_path(fd), libc::O_RDONLY | libc::O_NONBLOCK).ok()
    }
}

/// The pumps' waits between tries: 100 ms doubling to 5 s, with jitter.
pub fn backoff() -> client::Backoff {
    client::Backoff::new(Duration::from_millis(100), Duration::from_secs(5))
}

/// A startup error: said on stderr, exit status 1.
#[derive(Debug)]
pub struct Failed(pub String);

impl std::fmt::Display for Failed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Failed {}

/// What ends the supervisor's wait.
enum Event {
    Signal,
    CommandExited(i32),
}

/// `patchcord fifo`.
pub fn run(args: FifoArgs) -> Result<Exit, Failed> {
    if args.send.is_none() && args.recv.is_none() {
        return Err(Failed(
            "give --send CHANNEL, --recv CHANNEL, or both".to_owned(),
        ));
    }
    if args.send.is_some() && args.send == args.recv {
        log::warn!(
            "--send and --recv name the same channel: on a queue the bridge takes its own messages"
        );
    }
    let mode = u32::from_str_radix(args.mode.trim_start_matches("0o"), 8)
        .ok()
        .filter(|m| *m <= 0o777)
        .ok_or_else(|| {
            Failed(format!(
                "--mode {:?} is not octal permission bits",
                args.mode
            ))
        })?;
    let url = args
        .server
        .clone()
        .unwrap_or_else(|| "http://127.0.0.1:3000".to_owned());
    let relay = client::Relay::parse(&url).map_err(Failed)?;
    client::check_token(args.presents.token.as_deref()).map_err(Failed)?;
    for channel in [&args.send, &args.recv].into_iter().flatten() {
        if channel.is_empty() || channel.bytes().any(|b| b <= b' ' || b == b'?' || b == b'#') {
            return Err(Failed(format!(
                "channel {channel:?}: a path without spaces, ? or #"
            )));
        }
    }
    let drain = crate::config::seconds("--drain-timeout", args.drain_timeout)
        .map_err(|e| Failed(e.to_string()))?;
    let max = usize::try_from(args.max_message)
        .map_err(|_| Failed("--max-message is too large here".to_owned()))?;
    let ready = if args.background { background()? } else { None };

    // SIGHUP (the terminal closed) stops it like the others, removing DIR.
    let mut signals = Signals::new([SIGINT, SIGTERM, SIGHUP]).map_err(|e| Failed(e.to_string()))?;
    let shared = Shared {
        stop: sys::Flag::new().map_err(|e| Failed(e.to_string()))?,
        abort: sys::Flag::new().map_err(|e| Failed(e.to_string()))?,
        delim: if args.null { 0 } else { b'\n' },
        max,
        recv_waiting: Mutex::new(None),
        spooled: Mutex::new(Vec::new()),
        sent: AtomicU64::new(0),
        received: AtomicU64::new(0),
        dropped: AtomicU64::new(0),
    };
    let mut names = Vec::new();
    if args.send.is_some() {
        names.push("send");
    }
    if args.recv.is_some() {
        names.push("recv");
    }
    let (dir, send_fifo) = dir::Dir::create(&args.dir, &names, mode, args.force).map_err(Failed)?;
    let spool_to = args.spool.clone();
    let (events_tx, events) = unbounded::<Event>();
    let signal_tx = events_tx.clone();
    thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            for _ in signals.forever() {
                if signal_tx.send(Event::Signal).is_err() {
                    break;
                }
            }
        })
        .map_err(|e| Failed(e.to_string()))?;

    let (more_send, more_send_rx) = bounded::<File>(4);
    let recv_path = dir.fifo("recv");
    let exit = thread::scope(|scope| {
        let shared = &shared;
        let mut pumps = Vec::new();
        if let (Some(channel), Some(fifo)) = (&args.send, send_fifo) {
            let client = client::Client::new(relay.clone()).with_token(args.presents.token.clone());
            pumps.push(scope.spawn(move || send::run(shared, client, channel, fifo, more_send_rx)));
        }
        if let Some(channel) = &args.recv {
            let client = client::Client::new(relay.clone()).with_token(args.presents.token.clone());
            let fifo = recv_path.clone();
            pumps.push(scope.spawn(move || recv::run(shared, client, channel, &fifo)));
        }
        log::info!(
            "{} ready: {}{}{}",
            dir.path.display(),
            args.send
                .as_ref()
                .map(|c| format!("lines to send go to {}", relay.target(c)))
                .unwrap_or_default(),
            if args.send.is_some() && args.recv.is_some() {
                "; "
            } else {
                ""
            },
            args.recv
                .as_ref()
                .map(|c| format!("messages of {} come out of recv", relay.target(c)))
                .unwrap_or_default(),
        );
        say_ready(ready);
        let mut command_status = None;
        let mut command_pid = None;
        if !args.command.is_empty() {
            match start_command(&args.command, &dir, &args, events_tx.clone()) {
                Ok(pid) => command_pid = Some(pid),
                Err(e) => {
                    log::error!("cannot run {:?}: {e}", args.command[0]);
                    command_status = Some(127);
                    let _ = events_tx.send(Event::CommandExited(127));
                }
            }
        }
        // ── the supervisor's loop: mend the directory, wait for the end ──
        loop {
            match events.recv_timeout(WATCHDOG) {
                Err(RecvTimeoutError::Timeout) => mend(shared, &dir, &more_send),
                Err(RecvTimeoutError::Disconnected) | Ok(Event::Signal) => break,
                Ok(Event::CommandExited(code)) => {
                    command_status = Some(code);
                    break;
                }
            }
        }
        // Stop: nothing new is taken, the directory goes first, and what
        // was accepted is delivered until the deadline. A command still
        // running is asked to stop too.
        shared.stop.raise();
        if let (Some(pid), None) = (command_pid, command_status) {
            // SAFETY: kill(2) on the pid of our own child, not yet reaped
            // (its status has not been seen).
            unsafe { libc::kill(pid as libc::pid_t, libc::SIGTERM) };
        }
        let release = shared.release_recv();
        dir.remove();
        let deadline = Instant::now() + drain;
        while pumps.iter().any(|p| !p.is_finished()) {
            if Instant::now() >= deadline {
                shared.abort.raise();
            }
            if Instant::now() >= deadline + GIVE_UP {
                // A pump stuck in a system call: say what is known, and go.
                log::error!("a pump did not stop; exiting without it");
                let spooled =
                    std::mem::take(&mut *shared.spooled.lock().unwrap_or_else(|p| p.into_inner()));
                write_spool(&spooled, spool_to.as_ref(), shared.delim);
                std::process::exit(Exit::Undelivered as i32);
            }
            if let Ok(Event::Signal) = events.recv_timeout(Duration::from_millis(20)) {
                log::warn!("second signal: stopping now");
                shared.abort.raise();
            }
        }
        drop(release);
        for pump in pumps {
            if pump.join().is_err() {
                log::error!("a pump failed; what it held may be lost");
            }
        }
        let spooled =
            std::mem::take(&mut *shared.spooled.lock().unwrap_or_else(|p| p.into_inner()));
        let left = write_spool(&spooled, spool_to.as_ref(), shared.delim);
        log::info!(
            "stopped: {} sent, {} received, {} dropped, {} undelivered",
            shared.sent.load(Ordering::Relaxed),
            shared.received.load(Ordering::Relaxed),
            shared.dropped.load(Ordering::Relaxed),
            left
        );
        if left > 0 {
            Exit::Undelivered
        } else {
            match command_status {
                Some(0) | None => Exit::Clean,
                Some(_) => Exit::Fatal,
            }
        }
    });
    Ok(exit)
}

/// Mends the directory; a send FIFO made again is handed to the pump, and
/// a recv pump waiting for a reader on the FIFO that was replaced is
/// released, to wait on the new one (no reader can reach the old one).
fn mend(shared: &Shared, dir: &dir::Dir, more_send: &crossbeam_channel::Sender<File>) {
    for mended in dir.mend() {
        let name = match &mended {
            dir::Mended::Recreated(name) | dir::Mended::MovedAside(name, ..) => *name,
        };
        if name == "recv" {
            drop(shared.release_recv());
        }
        match &mended {
            dir::Mended::Recreated(name) => {
                log::warn!("{}/{name} was deleted; made again", dir.path.display());
            }
            dir::Mended::MovedAside(name, aside, bytes) => {
                log::warn!(
                    "{}/{name} was a regular file ({bytes} bytes, written while the FIFO was gone): moved to {}; FIFO made again",
                    dir.path.display(),
                    aside.display()
                );
            }
        }
        if name == "send" {
            if let Ok(fifo) = sys::open(&dir.fifo("send"), libc::O_RDWR | libc::O_NONBLOCK) {
                let _ = more_send.try_send(fifo);
            }
        }
    }
}

/// Writes the undelivered messages to `file` (appended, framed as they
/// were written, so `cat FILE > DIR/send` offers them again), or to
/// stderr, one `undelivered:` line each; returns how many.
fn write_spool(spooled: &[Spooled], file: Option<&PathBuf>, delim: u8) -> usize {
    if spooled.is_empty() {
        return 0;
    }
    for message in spooled.iter().filter(|m| !m.note.is_empty()) {
        log::warn!(
            "undelivered message of {} bytes: {}",
            message.bytes.len(),
            message.note
        );
    }
    match file {
        Some(path) => {
            let written = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .mode(0o600)
                .open(path)
                .and_then(|mut f| {
                    for message in spooled {
                        f.write_all(&message.bytes)?;
                        f.write_all(&[delim])?;
                    }
                    f.flush()
                });
            match written {
                Ok(()) => log::warn!(
                    "{} undelivered messages written to {}",
                    spooled.len(),
                    path.display()
                ),
                Err(e) => log::error!("cannot write the spool {}: {e}", path.display()),
            }
        }
        None => {
            let mut err = io::stderr().lock();
            for message in spooled {
                let _ = err.write_all(b"undelivered: ");
                let _ = err.write_all(&message.bytes);
                let _ = err.write_all(b"\n");
            }
        }
    }
    spooled.len()
}

/// `-b`: forks (the process is still single-threaded here); the parent
/// returns once the child's directory is ready, printing its process id,
/// and fails (exit 1) if the child could not start. The child goes on as
/// the bridge, with stdin and stdout on /dev/null so that a `$(...)` that
/// captured the pid is not held open. No exec: under an emulator a
/// re-executed binary would not start.
fn background() -> Result<Option<File>, Failed> {
    let mut fds = [0 as libc::c_int; 2];
    // SAFETY: pipe2 writes two descriptors into the valid `fds`.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(Failed(io::Error::last_os_error().to_string()));
    }
    // SAFETY: both were just created and are owned here.
    let (mut ready, write) = unsafe { (File::from_raw_fd(fds[0]), File::from_raw_fd(fds[1])) };
    let _ = io::stdout().flush();
    // SAFETY: no other thread exists yet (the signal thread and the pumps
    // start later), so the child may go on running Rust code.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(Failed(io::Error::last_os_error().to_string()));
    }
    if pid == 0 {
        drop(ready);
        if let Ok(null) = File::options().read(true).write(true).open("/dev/null") {
            // SAFETY: dup2 onto the standard descriptors of this process.
            unsafe {
                libc::dup2(null.as_raw_fd(), 0);
                libc::dup2(null.as_raw_fd(), 1);
            }
        }
        return Ok(Some(write));
    }
    drop(write);
    let mut said = String::new();
    let _ = ready.read_to_string(&mut said);
    if said.trim() == "ready" {
        println!("{pid}");
        std::process::exit(Exit::Clean as i32);
    }
    let mut status = 0;
    // SAFETY: waitpid on our own child, writing into the valid `status`.
    unsafe { libc::waitpid(pid, &mut status, 0) };
    Err(Failed(format!(
        "the bridge did not start (exit {})",
        libc::WEXITSTATUS(status)
    )))
}

/// Tells a `-b` parent that the directory is ready, and lets it go.
fn say_ready(ready: Option<File>) {
    if let Some(mut file) = ready {
        let _ = file.write_all(b"ready\n");
    }
}

/// Runs `-- CMD` with the FIFOs in its environment; its exit ends the bridge.
fn start_command(
    command: &[OsString],
    dir: &dir::Dir,
    args: &FifoArgs,
    events: crossbeam_channel::Sender<Event>,
) -> io::Result<u32> {
    let mut cmd = Command::new(&command[0]);
    cmd.args(&command[1..]);
    if args.send.is_some() {
        cmd.env("PATCHCORD_SEND", dir.fifo("send"));
    }
    if args.recv.is_some() {
        cmd.env("PATCHCORD_RECV", dir.fifo("recv"));
    }
    let mut child = cmd.spawn()?;
    let pid = child.id();
    thread::Builder::new()
        .name("command".into())
        .spawn(move || {
            let code = match child.wait() {
                Ok(status) => status
                    .code()
                    .unwrap_or_else(|| 128 + status.signal().unwrap_or(0)),
                Err(_) => 1,
            };
            let _ = events.send(Event::CommandExited(code));
        })?;
    Ok(pid)
}
