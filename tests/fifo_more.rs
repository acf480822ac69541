//! The named-pipe bridge (`patchcord fifo`), acceptance tests F14–F26 of
//! the design note (fifo-bridge.md §10): JSON lines, the bash worker, `-b`
//! and a write straight after it, buffered and half-reading readers,
//! partial lines, concurrent writers, a stop while busy, a killed bridge,
//! backpressure, the relay going away, readers that leave while a receive
//! waits, and signals. Each runs the real binary against a real relay on
//! 127.0.0.1, with bash, head and curl as the clients.

use std::ffi::OsStr;
use std::fs;
use std::io::{BufRead, BufReader};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use libc::{SIGINT, SIGKILL, SIGTERM};

use crate::support::*;

/// "Prompt": a bridge exits within this long of SIGINT or SIGTERM.
fn prompt() -> Duration {
    patience(Duration::from_secs(1))
}

/// A bridge run in the foreground, as the test's child. Dropped while it
/// runs, it gets SIGINT, then SIGKILL.
struct Bridge {
    child: Child,
    status: Option<ExitStatus>,
    log: Arc<Mutex<Vec<u8>>>,
    reader: Option<thread::JoinHandle<()>>,
}

impl Bridge {
    /// Starts `patchcord fifo DIR --server http://ADDR ARGS` and waits until
    /// it says it is ready.
    fn start(addr: std::net::SocketAddr, dir: &Path, args: &[&str]) -> Bridge {
        let bridge = Bridge::spawn(addr, dir, args);
        bridge.wait_log("ready: ");
        bridge
    }

    /// Starts the bridge without waiting for it.
    fn spawn(addr: std::net::SocketAddr, dir: &Path, args: &[&str]) -> Bridge {
        let mut child = command()
            .arg("fifo")
            .arg(dir)
            .args(["--server", &format!("http://{addr}")])
            .args(args)
            .env_remove("RUST_LOG")
            .env_remove("PATCHCORD_URL")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start patchcord fifo");
        let stderr = child.stderr.take().expect("stderr");
        let log = Arc::new(Mutex::new(Vec::new()));
        let sink = Arc::clone(&log);
        let echo = std::env::var_os("PATCHCORD_TEST_LOG").is_some();
        let reader = thread::spawn(move || {
            let mut stderr = BufReader::new(stderr);
            let mut line = Vec::new();
            while stderr.read_until(b'\n', &mut line).is_ok_and(|n| n > 0) {
                if echo {
                    eprint!("bridge: {}", String::from_utf8_lossy(&line));
                }
                sink.lock().unwrap().extend_from_slice(&line);
                line.clear();
            }
        });
        Bridge {
            child,
            status: None,
            log,
            reader: Some(reader),
        }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// What the bridge said on stderr so far.
    fn log(&self) -> String {
        String::from_utf8_lossy(&self.log.lock().unwrap()).into_owned()
    }

    /// Waits until the log holds `needle`; fails after [`STEP`].
    fn wait_log(&self, needle: &str) {
        let deadline = Instant::now() + *STEP;
        while !self.log().contains(needle) {
            assert!(
                Instant::now() < deadline,
                "the bridge never said {needle:?}; log:\n{}",
                self.log()
            );
            thread::sleep(Duration::from_millis(5));
        }
    }

    /// Waits until the log holds `needle` `n` times; fails after [`STEP`].
    fn wait_log_count(&self, needle: &str, n: usize) {
        let deadline = Instant::now() + *STEP;
        while self.log().matches(needle).count() < n {
            assert!(
                Instant::now() < deadline,
                "the bridge did not say {needle:?} {n} times; log:\n{}",
                self.log()
            );
            thread::sleep(Duration::from_millis(5));
        }
    }

    fn signal(&mut self, signal: i32) {
        assert!(self.status.is_none(), "the bridge has already exited");
        assert!(
            self.child.try_wait().expect("try_wait").is_none(),
            "the bridge exited early; log:\n{}",
            self.log()
        );
        // SAFETY: kill(2) on our own child, not yet reaped.
        assert_eq!(
            unsafe { libc::kill(self.child.id() as libc::pid_t, signal) },
            0
        );
    }

    /// Waits up to `limit` for the exit; its status, once the log is whole.
    fn wait_exit(&mut self, limit: Duration) -> Option<ExitStatus> {
        if self.status.is_none() {
            let deadline = Instant::now() + limit;
            loop {
                if let Some(status) = self.child.try_wait().expect("try_wait") {
                    self.status = Some(status);
                    break;
                }
                if Instant::now() >= deadline {
                    return None;
                }
                thread::sleep(Duration::from_millis(2));
            }
            if let Some(reader) = self.reader.take() {
                let _ = reader.join();
            }
        }
        self.status
    }

    /// Sends `signal` and expects the exit within [`prompt`]; its code.
    fn stop(&mut self, signal: i32) -> i32 {
        let sent = Instant::now();
        self.signal(signal);
        let status = self.wait_exit(prompt());
        let status = status.unwrap_or_else(|| {
            panic!(
                "still running {:?} after signal {signal}; log:\n{}",
                sent.elapsed(),
                self.log()
            )
        });
        status
            .code()
            .unwrap_or_else(|| panic!("killed by {:?}; log:\n{}", status.signal(), self.log()))
    }
}

impl Drop for Bridge {
    fn drop(&mut self) {
        if self.status.is_none() && self.child.try_wait().ok().flatten().is_none() {
            // SAFETY: kill(2) on our own child, not yet reaped.
            unsafe { libc::kill(self.child.id() as libc::pid_t, SIGINT) };
            if self.wait_exit(Duration::from_secs(3)).is_none() {
                let _ = self.child.kill();
                let _ = self.child.wait();
            }
        }
    }
}

/// A client run in the background (bash, curl): killed if the test ends
/// before it is finished.
struct Background(Option<Child>);

impl Background {
    fn bash(server: &Server, dir: &Path, script: &str) -> Background {
        Background(Some(spawn_bash(server, dir, script)))
    }

    fn curl(args: &[&str]) -> Background {
        Background(Some(spawn_curl(args)))
    }

    fn child(&mut self) -> &mut Child {
        self.0.as_mut().expect("running")
    }

    /// Whether it is still running.
    fn running(&mut self) -> bool {
        self.child().try_wait().expect("try_wait").is_none()
    }

    /// Waits for it as [`finish`] does.
    fn finish(mut self) -> std::process::Output {
        finish(self.0.take().expect("running"))
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        if let Some(mut child) = self.0.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Whether `pid` is a live `patchcord fifo` (not a zombie, not reused).
fn bridge_alive(pid: u32) -> bool {
    let Ok(stat) = fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    let state = stat.rsplit_once(") ").map(|(_, rest)| rest.chars().next());
    let cmdline = fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    state != Some(Some('Z')) && find(&cmdline, b"fifo").is_some()
}

/// Waits up to `limit` for `pid` to be gone; whether it is.
fn wait_gone(pid: u32, limit: Duration) -> bool {
    let deadline = Instant::now() + limit;
    while bridge_alive(pid) {
        if Instant::now() >= deadline {
            return false;
        }
        thread::sleep(Duration::from_millis(2));
    }
    true
}

/// `kill(pid, signal)`.
fn kill(pid: u32, signal: i32) {
    // SAFETY: kill(2) has no memory effects.
    unsafe { libc::kill(pid as libc::pid_t, signal) };
}

/// Bridges started with `-b` by a script (not our children), found by the
/// process ids the script wrote to a file, one a line: when dropped, each
/// still running gets SIGINT, then SIGKILL.
struct Detached(PathBuf);

impl Detached {
    fn pids(&self) -> Vec<u32> {
        fs::read_to_string(&self.0)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.trim().parse().ok())
            .collect()
    }
}

impl Drop for Detached {
    fn drop(&mut self) {
        for pid in self.pids() {
            if bridge_alive(pid) {
                kill(pid, SIGINT);
                if !wait_gone(pid, Duration::from_secs(3)) {
                    kill(pid, SIGKILL);
                }
            }
        }
    }
}

/// A bash function `patchcord` that runs the binary as [`command`] does
/// (through the emulator, if any).
fn patchcord_function() -> String {
    let quote = |word: &OsStr| format!("'{}'", word.to_string_lossy().replace('\'', r"'\''"));
    let command = command();
    let mut words = vec![quote(command.get_program())];
    words.extend(command.get_args().map(quote));
    format!("patchcord() {{ {} \"$@\"; }}\n", words.join(" "))
}

/// One receive with curl (`--fail`): the body.
fn take(server: &Server, channel: &str) -> Vec<u8> {
    let got = curl(&["-f", &server.url(channel)]);
    assert!(
        got.status.success(),
        "curl {channel}: {got:?}\nserver log:\n{}",
        server.log()
    );
    got.stdout
}

/// A receive that must find nothing: 408 after `?timeout=1`.
fn assert_nothing_left(server: &Server, channel: &str) {
    let got = request(server.addr, &get(&format!("{channel}?timeout=1")));
    assert_eq!(got.status, 408, "left in {channel}: {:?}", got.text());
}

/// Waits until the relay holds exactly `n` waiters.
fn wait_waiters(server: &Server, n: u64) {
    let deadline = Instant::now() + *STEP;
    loop {
        let status = server.status();
        if json_counter(&status, "waiters") == n {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "waiters never reached {n}: {status}"
        );
        thread::sleep(Duration::from_millis(5));
    }
}

/// Waits until `path` holds at least `n` lines; its lines.
fn wait_lines(path: &Path, n: usize) -> Vec<String> {
    let deadline = Instant::now() + *STEP;
    loop {
        let text = fs::read_to_string(path).unwrap_or_default();
        let lines: Vec<String> = text.lines().map(String::from).collect();
        if lines.len() >= n {
            return lines;
        }
        assert!(
            Instant::now() < deadline,
            "{} has {} lines, not {n}",
            path.display(),
            lines.len()
        );
        thread::sleep(Duration::from_millis(10));
    }
}

/// Waits until `done` holds; fails after [`STEP`], saying it waited for `what`.
fn wait_until(done: impl Fn() -> bool, what: &str) {
    let deadline = Instant::now() + *STEP;
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        thread::sleep(Duration::from_millis(5));
    }
}

/// Counts the lines `child` prints (a writer prints one per line it wrote,
/// after its write returned): the count, and the thread that keeps it.
fn count_lines(child: &mut Child) -> (Arc<AtomicU64>, thread::JoinHandle<()>) {
    let count = Arc::new(AtomicU64::new(0));
    let counter = Arc::clone(&count);
    let stdout = child.stdout.take().expect("stdout");
    let counting = thread::spawn(move || {
        for _ in BufReader::new(stdout).lines().map_while(Result::ok) {
            counter.fetch_add(1, Ordering::SeqCst);
        }
    });
    (count, counting)
}

/// Asserts a bash run succeeded; its stdout.
fn ok(output: std::process::Output) -> Vec<u8> {
    assert!(
        output.status.success(),
        "{:?}\nstdout: {}\nstderr: {}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    output.stdout
}

fn is_fifo(path: &Path) -> bool {
    fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_fifo())
}

/// The kernel's capacity of the FIFO at `path` (F_GETPIPE_SZ, through a
/// write end opened without waiting: the bridge holds a read end).
fn pipe_capacity(path: &Path) -> usize {
    let file = fs::OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
        .expect("open the FIFO");
    // SAFETY: fcntl on an open descriptor we own; no memory is passed.
    let size = unsafe { libc::fcntl(std::os::fd::AsRawFd::as_raw_fd(&file), libc::F_GETPIPE_SZ) };
    assert!(size > 0, "F_GETPIPE_SZ");
    size as usize
}

const JSON_DOCUMENTS: [&str; 3] = [
    r#"{"text":"line one\nline two\r\n","empty":"","n":1}"#,
    r#"{"quote":"she said \"hi\"\n","path":"C:\\temp\\new\\","tab":"a\tb","nl":"\n"}"#,
    r#"{"unicode":"caf\u00e9 – ☕ é\u2028","nested":{"list":[1,"two\n\n",null,true]},"x":-1.5e3}"#,
];

/// F14 (pipe-io-server's test_json_io): JSON documents whose strings hold
/// escaped newlines go through both ways byte for byte.
#[test]
fn f14_json_with_escaped_newlines_round_trips() {
    let server = Server::start();
    let work = temp_dir("fifo-f14");
    let mut bridge = Bridge::start(
        server.addr,
        &work.join("w"),
        &["--send", "out", "--recv", "in"],
    );
    fs::write(work.join("docs.jsonl"), JSON_DOCUMENTS.join("\n") + "\n").unwrap();
    // FIFO → channel: a bash writer, one printf per document.
    let writer = Background::bash(
        &server,
        &work,
        r#"while IFS= read -r doc; do printf '%s\n' "$doc" > w/send; done < docs.jsonl"#,
    );
    for document in JSON_DOCUMENTS {
        assert_eq!(String::from_utf8_lossy(&take(&server, "/out")), document);
    }
    ok(writer.finish());
    // Channel → FIFO: curl sends each with a trailing newline (as `jq -c`
    // prints it); bash reads it with `read -r`.
    for (i, document) in JSON_DOCUMENTS.iter().enumerate() {
        let file = work.join(format!("doc{i}.json"));
        fs::write(&file, format!("{document}\n")).unwrap();
        let producer = Background::curl(&[
            "-f",
            "--data-binary",
            &format!("@{}", file.display()),
            &server.url("/in"),
        ]);
        let got = ok(bash(
            &server,
            &work,
            r#"IFS= read -r doc < w/recv; printf '%s' "$doc""#,
        ));
        assert_eq!(String::from_utf8_lossy(&got), *document);
        ok(producer.finish());
    }
    assert_eq!(bridge.stop(SIGINT), 0, "{}", bridge.log());
    assert!(
        bridge
            .log()
            .contains("3 sent, 3 received, 0 dropped, 0 undelivered"),
        "{}",
        bridge.log()
    );
}

/// F15 (test_assign_message_handler): the bash worker of the design note
/// (§2), started with `-b`, answers 100 requests through the bridge
/// (`--recv req --send res`), doubling each number; when the bridge stops,
/// its loop ends with end-of-file.
#[test]
fn f15_bash_worker_doubles_a_hundred_numbers() {
    let server = Server::start();
    let work = temp_dir("fifo-f15");
    let _bridges = Detached(work.join("pid"));
    let worker = Background::bash(
        &server,
        &work,
        &format!(
            r#"{patchcord}
do_work() {{ echo "$(( $1 * 2 ))"; }}
pid=$(patchcord fifo -b ./w --server "http://$PC" --recv req --send res 2>bridge.log) || exit 1
echo "$pid" > pid.new && mv pid.new pid
trap 'kill -INT "$pid"' EXIT
trap '' PIPE                       # a dead bridge gives a write error, not a silent death
while IFS= read -r job; do
    printf '%s\n' "$(do_work "$job")" > ./w/send
done < ./w/recv
"#,
            patchcord = patchcord_function()
        ),
    );
    let pid = wait_lines(&work.join("pid"), 1)[0]
        .parse::<u32>()
        .expect("a process id");
    let producer = Background::bash(
        &server,
        &work,
        r#"for i in $(seq 1 100); do curl -sSf --max-time 20 -d "$i" "$PC/req"; done"#,
    );
    let answers = ok(bash(
        &server,
        &work,
        r#"for i in $(seq 1 100); do curl -sSf --max-time 20 "$PC/res"; echo; done"#,
    ));
    let expected: String = (1..=100).map(|i| format!("{}\n", i * 2)).collect();
    assert_eq!(String::from_utf8_lossy(&answers), expected);
    ok(producer.finish());
    // The worker is waiting for request 101: a stop ends its loop.
    kill(pid, SIGINT);
    assert!(wait_gone(pid, prompt()), "the bridge did not stop promptly");
    ok(worker.finish());
    let log = fs::read_to_string(work.join("bridge.log")).unwrap();
    assert!(
        log.contains("stopped: 100 sent, 100 received, 0 dropped, 0 undelivered"),
        "{log}"
    );
    assert!(!work.join("w").exists());
}

/// F16 (test_write_immediately): twenty times, `fifo -b` and at once `echo x
/// > DIR/send`: never ENOENT, never a regular file, and x is delivered.
#[test]
fn f16_a_write_right_after_background_start_is_delivered() {
    const BRIDGES: usize = 20;
    let server = Server::start();
    let work = temp_dir("fifo-f16");
    let bridges = Detached(work.join("pids"));
    let script = format!(
        r#"{patchcord}
for i in $(seq 1 {BRIDGES}); do
    pid=$(patchcord fifo -b "d$i" --server "http://$PC" --send "x$i" 2>"d$i.log")
    echo "$pid" >> pids
    echo "x$i" > "d$i/send"
    [ -p "d$i/send" ] || {{ echo "d$i/send is not a FIFO" >&2; exit 1; }}
done
"#,
        patchcord = patchcord_function()
    );
    ok(bash(&server, &work, &script));
    let pids = bridges.pids();
    assert_eq!(pids.len(), BRIDGES);
    for i in 1..=BRIDGES {
        assert_eq!(
            String::from_utf8_lossy(&take(&server, &format!("/x{i}"))),
            format!("x{i}")
        );
    }
    for (i, pid) in (1..=BRIDGES).zip(pids) {
        kill(pid, SIGINT);
        assert!(wait_gone(pid, prompt()), "bridge {i} did not stop promptly");
        let log = fs::read_to_string(work.join(format!("d{i}.log"))).unwrap();
        assert!(
            log.contains("stopped: 1 sent, 0 received, 0 dropped, 0 undelivered"),
            "bridge {i}: {log}"
        );
        assert!(!work.join(format!("d{i}")).exists(), "d{i} is left");
    }
}

/// F17 (buffered readers): three messages wait; `head -n1 < recv` three
/// times reads three distinct messages, in order (pipe-io-server lost two).
#[test]
fn f17_head_n1_three_times_reads_three_messages_in_order() {
    let server = Server::start();
    let work = temp_dir("fifo-f17");
    let mut bridge = Bridge::start(server.addr, &work.join("w"), &["--recv", "c"]);
    let mut producers = Vec::new();
    for i in 1..=3 {
        producers.push(Background::curl(&[
            "-f",
            "-d",
            &format!("m{i}"),
            &server.url("/c"),
        ]));
        wait_waiters(&server, i);
    }
    let got = ok(bash(
        &server,
        &work,
        "for i in 1 2 3; do head -n1 < w/recv; done",
    ));
    assert_eq!(String::from_utf8_lossy(&got), "m1\nm2\nm3\n");
    for producer in producers {
        ok(producer.finish());
    }
    assert_eq!(bridge.stop(SIGINT), 0, "{}", bridge.log());
    assert!(
        bridge
            .log()
            .contains("0 sent, 3 received, 0 dropped, 0 undelivered")
    );
}

/// F18 (half-read): a reader takes 1,000 bytes of a 200,000-byte message
/// and leaves; the next reader gets all of it.
#[test]
fn f18_a_half_read_message_goes_whole_to_the_next_reader() {
    let server = Server::start();
    let work = temp_dir("fifo-f18");
    let mut bridge = Bridge::start(server.addr, &work.join("w"), &["--recv", "big"]);
    let message: Vec<u8> = pattern(200_000, 18).iter().map(|b| b'a' + b % 26).collect();
    fs::write(work.join("message"), &message).unwrap();
    let producer = Background::curl(&[
        "-f",
        "--data-binary",
        &format!("@{}", work.join("message").display()),
        &server.url("/big"),
    ]);
    wait_waiters(&server, 1);
    ok(bash(&server, &work, "head -c 1000 < w/recv > part"));
    assert_eq!(fs::read(work.join("part")).unwrap(), &message[..1000]);
    ok(bash(&server, &work, "head -n1 < w/recv > whole"));
    let whole = fs::read(work.join("whole")).unwrap();
    assert_eq!(whole.len(), 200_001);
    assert!(whole[..200_000] == message[..] && whole[200_000] == b'\n');
    ok(producer.finish());
    assert_eq!(bridge.stop(SIGINT), 0, "{}", bridge.log());
    assert!(
        bridge
            .log()
            .contains("0 sent, 1 received, 0 dropped, 0 undelivered")
    );
}

/// F19 (partial lines): `printf foo > send` is not a message and is said
/// to wait after a second; `echo bar > send` makes one message, `foobar`.
#[test]
fn f19_a_partial_line_waits_for_its_newline() {
    let server = Server::start();
    let work = temp_dir("fifo-f19");
    let mut bridge = Bridge::start(server.addr, &work.join("w"), &["--send", "c"]);
    let mut consumer = Background::curl(&["-f", &server.url("/c")]);
    wait_waiters(&server, 1);
    ok(bash(&server, &work, "printf foo > w/send"));
    bridge.wait_log(r#"3 bytes without a trailing newline are waiting ("foo")"#);
    assert!(consumer.running(), "foo was sent without its newline");
    ok(bash(&server, &work, "echo bar > w/send"));
    let got = consumer.finish();
    assert!(got.status.success(), "{got:?}");
    assert_eq!(String::from_utf8_lossy(&got.stdout), "foobar");
    assert_eq!(bridge.stop(SIGINT), 0, "{}", bridge.log());
    let log = bridge.log();
    assert_eq!(
        log.matches("without a trailing newline").count(),
        1,
        "{log}"
    );
    assert!(
        log.contains("1 sent, 0 received, 0 dropped, 0 undelivered"),
        "{log}"
    );
}

/// F20 (concurrency): two bash writers, 2,000 lines of 1,000 bytes each,
/// at once; curl receives 4,000 intact messages, each writer's in order.
#[test]
fn f20_two_writers_of_long_lines_never_interleave() {
    const LINES: usize = 2000;
    let server = Server::start();
    let work = temp_dir("fifo-f20");
    let mut bridge = Bridge::start(server.addr, &work.join("w"), &["--send", "c"]);
    let urls: String = (0..2 * LINES)
        .map(|_| format!("url = \"{}\"\n", server.url("/c")))
        .collect();
    fs::write(work.join("urls"), urls).unwrap();
    let consumer = Background::bash(
        &server,
        &work,
        r#"curl -sS --max-time 60 -K urls -w '\n' > got"#,
    );
    // Each line: writer letter, 4-digit number, 995 bytes of its own filler.
    let script = format!(
        r#"write() {{
    local pad i
    pad=$(printf "%0995d" 0 | tr 0 "$1")
    exec 3> w/send
    for ((i = 0; i < {LINES}; i++)); do printf '%s%04d%s\n' "$1" "$i" "$pad" >&3; done
}}
write A & write B & wait"#
    );
    ok(bash(&server, &work, &script));
    ok(consumer.finish());
    let got = fs::read_to_string(work.join("got")).unwrap();
    let lines: Vec<&str> = got.lines().collect();
    assert_eq!(lines.len(), 2 * LINES);
    let mut next = [0usize; 2];
    for line in lines {
        assert_eq!(line.len(), 1000, "a broken line: {line:?}");
        let writer = match &line[..1] {
            "A" => 0,
            "B" => 1,
            other => panic!("no such writer {other:?}: {line:?}"),
        };
        assert_eq!(line[1..5].parse::<usize>().unwrap(), next[writer], "{line}");
        assert!(line[5..].bytes().all(|b| b == line.as_bytes()[0]), "{line}");
        next[writer] += 1;
    }
    assert_eq!(next, [LINES, LINES]);
    assert_eq!(bridge.stop(SIGINT), 0, "{}", bridge.log());
}

/// F21 (stop while busy): a writer that never stops and a slow consumer;
/// SIGINT stops the bridge promptly (pipe-io-server took 9.6 s), and what
/// was received and what was spooled are one run of lines, no gap, no
/// repeat. (What the writer wrote after the bridge's last read is lost
/// with the pipe: a writer that never stops always has some in flight.)
#[test]
fn f21_a_stop_while_busy_is_prompt() {
    let server = Server::start();
    let work = temp_dir("fifo-f21");
    let spool = work.join("spool");
    let mut bridge = Bridge::start(
        server.addr,
        &work.join("w"),
        &[
            "--send",
            "c",
            "--drain-timeout",
            "0.5",
            "--spool",
            spool.to_str().unwrap(),
        ],
    );
    let writer = Background::bash(
        &server,
        &work,
        r#"exec 3> w/send; for ((i = 0; i < 1000000; i++)); do printf 'line %d\n' "$i" >&3; done"#,
    );
    let consumer = Background::bash(
        &server,
        &work,
        r#"while curl -sSf --max-time 20 "$PC/c?timeout=2" >> got; do echo >> got; sleep 0.05; done; exit 0"#,
    );
    wait_lines(&work.join("got"), 5);
    assert_eq!(bridge.stop(SIGINT), 3, "{}", bridge.log());
    ok(consumer.finish());
    let writer = writer.finish();
    assert!(!writer.status.success(), "the writer went on: {writer:?}");
    let got = fs::read_to_string(work.join("got")).unwrap();
    let spooled = fs::read_to_string(&spool).unwrap();
    let all: Vec<&str> = got.lines().chain(spooled.lines()).collect();
    for (i, line) in all.iter().enumerate() {
        assert_eq!(
            *line,
            format!("line {i}"),
            "got:\n{got}\nspooled:\n{spooled}"
        );
    }
    assert!(spooled.lines().count() > 0);
}

/// F21, §8 (no silent loss): a writer that still holds `send` open writes
/// a line while the bridge drains after SIGINT; the drain ends before its
/// deadline. That line must be delivered, or spooled with exit 3: never
/// dropped with exit 0.
#[test]
fn f21_a_line_written_during_the_drain_is_delivered_or_spooled() {
    let server = Server::start();
    let work = temp_dir("fifo-f21-drain");
    let spool = work.join("spool");
    let mut bridge = Bridge::start(
        server.addr,
        &work.join("w"),
        &[
            "--send",
            "c",
            "--drain-timeout",
            "10",
            "--spool",
            spool.to_str().unwrap(),
        ],
    );
    let writer = Background::bash(
        &server,
        &work,
        r#"exec 3> w/send
step() { for i in $(seq 400); do [ -e "$1" ] && return 0; sleep 0.05; done; exit 1; }
printf 'a\n' >&3
step go-b; printf 'b\n' >&3; touch wrote-b
step go-c; printf 'c\n' >&3; touch wrote-c
step done"#,
    );
    wait_waiters(&server, 1); // a, in flight
    bridge.signal(SIGINT);
    wait_until(|| !work.join("w").exists(), "DIR to go");
    fs::write(work.join("go-b"), "").unwrap();
    wait_until(|| work.join("wrote-b").exists(), "b to be written");
    assert_eq!(take(&server, "/c"), b"a");
    wait_waiters(&server, 1); // b, in flight
    fs::write(work.join("go-c"), "").unwrap();
    wait_until(|| work.join("wrote-c").exists(), "c to be written");
    assert_eq!(take(&server, "/c"), b"b");
    // c: still offered (the drain has 10 s), or spooled; never dropped.
    let last = request(server.addr, &get("/c?timeout=2"));
    let status = bridge
        .wait_exit(*STEP)
        .unwrap_or_else(|| panic!("the bridge did not stop; log:\n{}", bridge.log()));
    fs::write(work.join("done"), "").unwrap();
    let _ = writer.finish();
    let spooled = fs::read_to_string(&spool).unwrap_or_default();
    match (last.status, status.code()) {
        (200, Some(0)) => assert_eq!(last.text(), "c"),
        (408, Some(3)) => assert_eq!(spooled, "c\n"),
        other => panic!(
            "c was written while the bridge drained, and is lost: last receive {other:?} \
             {:?}, spool {spooled:?}; log:\n{}",
            last.text(),
            bridge.log()
        ),
    }
}

/// F22 (a dead bridge): after `kill -9`, a restart without --force is
/// refused and says why; with --force it works; after a clean exit,
/// `echo > DIR/send` fails with ENOENT at once.
#[test]
fn f22_a_killed_bridge_needs_force_and_a_stopped_one_fails_writes() {
    let server = Server::start();
    let work = temp_dir("fifo-f22");
    let dir = work.join("w");
    let mut bridge = Bridge::start(server.addr, &dir, &["--send", "c"]);
    let _ = bridge.child.kill();
    bridge.wait_exit(*STEP).expect("killed");
    assert!(
        is_fifo(&dir.join("send")),
        "the killed bridge's FIFO is gone"
    );

    let mut refused = Bridge::spawn(server.addr, &dir, &["--send", "c"]);
    let status = refused
        .wait_exit(*STEP)
        .unwrap_or_else(|| panic!("a stale DIR was taken; log:\n{}", refused.log()));
    let said = refused.log();
    assert_eq!(status.code(), Some(1), "{said}");
    assert!(
        said.contains(&dir.display().to_string())
            && said.contains("did not stop cleanly")
            && said.contains("--force"),
        "{said}"
    );
    assert!(is_fifo(&dir.join("send")), "the refusal deleted a FIFO");
    assert!(dir.join(".lock").is_file(), "the refusal touched DIR");

    let mut bridge = Bridge::start(server.addr, &dir, &["--send", "c", "--force"]);
    ok(bash(&server, &work, "echo again > w/send"));
    assert_eq!(take(&server, "/c"), b"again");
    assert_eq!(bridge.stop(SIGINT), 0, "{}", bridge.log());
    assert!(!dir.exists());

    let late = bash(&server, &work, "echo late > w/send");
    assert_eq!(late.status.code(), Some(1), "{late:?}");
    assert!(
        String::from_utf8_lossy(&late.stderr).contains("No such file or directory"),
        "{late:?}"
    );
    assert!(!dir.exists(), "the write made something");
}

/// F23 (backpressure): with nobody receiving, a writer blocks once about a
/// pipe's capacity is queued; the bridge's memory stays flat; once a
/// receiver takes lines, the writer goes on.
#[test]
fn f23_backpressure_blocks_the_writer_and_memory_stays_flat() {
    const LINE: usize = 1001;
    let server = Server::start();
    let work = temp_dir("fifo-f23");
    let spool = work.join("spool");
    let mut bridge = Bridge::start(
        server.addr,
        &work.join("w"),
        &[
            "--send",
            "c",
            "--drain-timeout",
            "0.5",
            "--spool",
            spool.to_str().unwrap(),
        ],
    );
    let capacity = pipe_capacity(&work.join("w/send"));
    let before = status_kib(bridge.pid(), "VmRSS");
    // 100 MB if nothing held it back; says how many lines it wrote.
    let mut writer = Background::bash(
        &server,
        &work,
        r#"line=$(printf '%01000d' 23); exec 3> w/send
for ((i = 1; i <= 100000; i++)); do printf '%s\n' "$line" >&3; echo "$i"; done"#,
    );
    let (written, counting) = count_lines(writer.child());
    // Blocked: no progress for a second.
    let deadline = Instant::now() + *STEP;
    let mut last = (0, Instant::now());
    let blocked = loop {
        let now = written.load(Ordering::SeqCst);
        if now != last.0 {
            last = (now, Instant::now());
        } else if now > 0 && last.1.elapsed() >= Duration::from_secs(1) {
            break now as usize;
        }
        assert!(Instant::now() < deadline, "the writer never blocked: {now}");
        thread::sleep(Duration::from_millis(20));
    };
    let queued = blocked * LINE;
    assert!(
        queued >= capacity * 3 / 4 && queued <= 2 * capacity + LINE,
        "{queued} bytes queued; the pipe holds {capacity}"
    );
    let rss = status_kib(bridge.pid(), "VmRSS");
    thread::sleep(Duration::from_secs(1));
    let later = status_kib(bridge.pid(), "VmRSS");
    assert!(
        rss <= before + 4096 && later <= rss + 256,
        "RSS {before} KiB at the start, {rss} KiB blocked, {later} KiB a second later"
    );
    assert_eq!(written.load(Ordering::SeqCst) as usize, blocked);
    // A receiver takes 200 lines: the writer goes on.
    let urls: String = (0..200)
        .map(|_| format!("url = \"{}\"\n", server.url("/c")))
        .collect();
    fs::write(work.join("urls"), urls).unwrap();
    ok(bash(
        &server,
        &work,
        r#"curl -sS --max-time 60 -K urls -w '\n' > got"#,
    ));
    let line = format!("{:01000}", 23);
    let got = fs::read_to_string(work.join("got")).unwrap();
    assert_eq!(got, format!("{line}\n").repeat(200));
    let deadline = Instant::now() + *STEP;
    while written.load(Ordering::SeqCst) as usize <= blocked {
        assert!(Instant::now() < deadline, "the writer stayed blocked");
        thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(bridge.stop(SIGINT), 3, "{}", bridge.log());
    let writer = writer.finish();
    assert!(!writer.status.success(), "{writer:?}");
    counting.join().unwrap();
    let spooled = fs::read_to_string(&spool).unwrap();
    assert!(spooled.lines().count() > 0 && spooled.lines().all(|l| l == line));
}

/// F24 (the relay goes away): lines in flight and lines written while the
/// relay is down wait (with backoff) and arrive once it is back on the
/// same port: none lost, none twice. Once after a clean stop (the parked
/// send is answered 503), once after SIGKILL (its connection just ends).
#[test]
fn f24_lines_wait_for_the_relay_and_arrive_once() {
    let first = Server::start();
    let addr = first.addr;
    let work = temp_dir("fifo-f24");
    let mut bridge = Bridge::start(addr, &work.join("w"), &["--send", "c"]);
    let mut server = Some(first);
    let mut next = 1;
    for signal in [SIGTERM, SIGKILL] {
        let up = server.take().unwrap();
        ok(bash(
            &up,
            &work,
            &format!("printf 'line %d\\n' $(seq {next} {}) > w/send", next + 4),
        ));
        for i in next..next + 3 {
            assert_eq!(take(&up, "/c"), format!("line {i}").as_bytes());
        }
        wait_waiters(&up, 1); // the fourth, in flight
        let tried = bridge.log().matches("trying again").count();
        let mut down = up;
        down.signal(signal);
        down.wait_exit(*STEP).expect("the relay stopped");
        drop(down);
        ok(bash_at(
            addr,
            &work,
            &format!(
                "printf 'line %d\\n' $(seq {} {}) > w/send",
                next + 5,
                next + 7
            ),
        ));
        // It has tried, and failed, at least once.
        bridge.wait_log_count("trying again", tried + 1);
        thread::sleep(Duration::from_secs(1));
        // The port is free again (no other socket took it meanwhile).
        wait_until(
            || std::net::TcpListener::bind(addr).is_ok(),
            "the relay's port to be free",
        );
        let mut again = command();
        again.args(["--listen", &addr.to_string(), "--log-level", "debug"]);
        let up = Server::start_command(again);
        assert_eq!(up.addr, addr);
        for i in next + 3..next + 8 {
            assert_eq!(take(&up, "/c"), format!("line {i}").as_bytes());
        }
        assert_nothing_left(&up, "/c");
        next += 8;
        server = Some(up);
    }
    assert_eq!(bridge.stop(SIGINT), 0, "{}", bridge.log());
    assert!(
        bridge
            .log()
            .contains("16 sent, 0 received, 0 dropped, 0 undelivered"),
        "{}",
        bridge.log()
    );
}

/// Runs a bash script as [`bash`] does, for the relay at `addr`.
fn bash_at(addr: std::net::SocketAddr, dir: &Path, script: &str) -> std::process::Output {
    finish(spawn_bash_at(addr, dir, script))
}

/// F25 (cancel safety): a reader leaves while the bridge's receive waits
/// at the relay: the receive is withdrawn, and a message sent afterwards
/// waits for the next reader instead of vanishing. Three times.
#[test]
fn f25_a_reader_that_leaves_withdraws_the_waiting_receive() {
    let server = Server::start();
    let work = temp_dir("fifo-f25");
    let mut bridge = Bridge::start(server.addr, &work.join("w"), &["--recv", "c"]);
    for round in 1..=3 {
        let hangups = server.counter("hangups_total");
        let reader = Background::bash(
            &server,
            &work,
            &format!(
                "exec 4< w/recv; for i in $(seq 400); do [ -e go{round} ] && break; sleep 0.05; done; exec 4<&-"
            ),
        );
        wait_waiters(&server, 1);
        fs::write(work.join(format!("go{round}")), "").unwrap();
        ok(reader.finish());
        server.wait_hangups(hangups + 1);
        wait_waiters(&server, 0);
        let mut producer = Background::curl(&["-f", "-d", &format!("m{round}"), &server.url("/c")]);
        wait_waiters(&server, 1);
        thread::sleep(Duration::from_millis(100));
        assert!(producer.running(), "m{round} went to a reader that left");
        let got = ok(bash(&server, &work, "head -n1 < w/recv"));
        assert_eq!(String::from_utf8_lossy(&got), format!("m{round}\n"));
        ok(producer.finish());
    }
    assert_eq!(bridge.stop(SIGINT), 0, "{}", bridge.log());
    assert!(
        bridge
            .log()
            .contains("0 sent, 3 received, 0 dropped, 0 undelivered")
    );
}

/// F26 (signals): SIGTERM stops like SIGINT (idle: exit 0; a line nobody
/// took: exit 3, spooled); a second SIGINT during the drain stops at once
/// with exit 3, after the drain delivered what it could.
#[test]
fn f26_sigterm_is_sigint_and_a_second_sigint_cuts_the_drain() {
    let server = Server::start();
    let work = temp_dir("fifo-f26");
    let dir = work.join("w");

    let mut idle = Bridge::start(server.addr, &dir, &["--send", "c", "--recv", "d"]);
    assert_eq!(idle.stop(SIGTERM), 0, "{}", idle.log());
    assert!(!dir.exists());

    let spool = work.join("spool-term");
    let mut busy = Bridge::start(
        server.addr,
        &dir,
        &[
            "--send",
            "c",
            "--drain-timeout",
            "0.5",
            "--spool",
            spool.to_str().unwrap(),
        ],
    );
    ok(bash(&server, &work, "echo unread > w/send"));
    wait_waiters(&server, 1);
    assert_eq!(busy.stop(SIGTERM), 3, "{}", busy.log());
    assert_eq!(fs::read_to_string(&spool).unwrap(), "unread\n");
    assert!(!dir.exists());
    assert_nothing_left(&server, "/c");

    let spool = work.join("spool-int");
    let mut draining = Bridge::start(
        server.addr,
        &dir,
        &[
            "--send",
            "c",
            "--drain-timeout",
            "30",
            "--spool",
            spool.to_str().unwrap(),
        ],
    );
    ok(bash(&server, &work, "printf 'l%d\\n' 1 2 3 > w/send"));
    wait_waiters(&server, 1);
    draining.signal(SIGINT);
    let deadline = Instant::now() + prompt();
    while dir.exists() {
        assert!(Instant::now() < deadline, "DIR is still there");
        thread::sleep(Duration::from_millis(5));
    }
    // Draining: still running, and still sending.
    assert!(draining.wait_exit(Duration::from_millis(500)).is_none());
    assert_eq!(take(&server, "/c"), b"l1");
    wait_waiters(&server, 1);
    assert_eq!(draining.stop(SIGINT), 3, "{}", draining.log());
    assert_eq!(fs::read_to_string(&spool).unwrap(), "l2\nl3\n");
    assert_nothing_left(&server, "/c");
}
