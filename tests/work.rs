//! `patchcord work`, the responder that answers each request with a
//! command's output, through the real binary against a real relay, with
//! curl as the requester: jobs that survive killed workers, how a failing,
//! mapped, CGI or timed-out command answers, a large answer in constant
//! memory, the command's environment, and a stop that finishes its job.

use std::collections::BTreeMap;
use std::fs;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use crate::support::*;

// ── helpers ──────────────────────────────────────────────────────────────

/// `patchcord work URL ARGS…` (options, `--`, the command) started in
/// `dir`, its output in `dir/NAME.out` and `dir/NAME.err`.
fn work(url: &str, dir: &Path, name: &str, args: &[&str]) -> Running {
    Running::patchcord("work", url, dir, name, args)
}

/// A requester's answer as curl got it.
#[derive(Debug)]
struct Answer {
    status: u16,
    /// The header lines of the final response.
    head: String,
    body: Vec<u8>,
}

impl Answer {
    /// The value of header `name` (any case).
    fn header(&self, name: &str) -> Option<&str> {
        self.head.lines().find_map(|line| {
            let (field, value) = line.split_once(':')?;
            field.eq_ignore_ascii_case(name).then(|| value.trim())
        })
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// Parses `curl -i` output: the final response (after any 1xx).
fn parse_answer(output: &[u8]) -> Answer {
    let mut rest = output;
    loop {
        let end = find(rest, b"\r\n\r\n")
            .unwrap_or_else(|| panic!("no head in {:?}", String::from_utf8_lossy(output)));
        let head = String::from_utf8_lossy(&rest[..end]).into_owned();
        let status: u16 = head
            .split(' ')
            .nth(1)
            .and_then(|code| code.parse().ok())
            .unwrap_or_else(|| panic!("no status in {head:?}"));
        rest = &rest[end + 4..];
        if !(100..200).contains(&status) {
            return Answer {
                status,
                head,
                body: rest.to_vec(),
            };
        }
    }
}

/// A request through curl (`ARGS` then the URL): the answer.
fn ask(url: &str, args: &[&str]) -> Answer {
    let out = curl(&[&["-i"], args, &[url]].concat());
    assert!(out.status.success(), "curl {args:?} {url}: {out:?}");
    parse_answer(&out.stdout)
}

/// A request through curl started in the background, in `dir`.
fn ask_later(url: &str, dir: &Path, name: &str, args: &[&str]) -> Running {
    let mut command = Command::new("curl");
    command
        .args(["-sS", "-i", "--max-time"])
        .arg(long().as_secs().to_string())
        .args(args)
        .arg(url);
    Running::start(command, dir, name)
}

/// How long a whole run may take.
fn long() -> Duration {
    *STEP * 3
}

/// Whether a process whose command line matches `pattern` (`pgrep -f`) runs.
fn pgrep(pattern: &str) -> bool {
    Command::new("pgrep")
        .args(["-f", pattern])
        .output()
        .expect("run pgrep")
        .status
        .success()
}

// ── tests ────────────────────────────────────────────────────────────────

#[test]
fn work_jobs_survive_killed_workers() {
    let (jobs, at_once) = if is_emulated() { (40, 8) } else { (200, 20) };
    let server = Server::start_with(&["--reply-timeout", "3"]);
    let dir = temp_dir("work-killed");
    let cmd = [
        "-j",
        "2",
        "--",
        "sh",
        "-c",
        "read -r n || :; sleep 0.05; echo $((n*n))",
    ];
    let mut workers: Vec<Running> = (0..3)
        .map(|i| work(&server.url("/res/jobs"), &dir, &format!("worker{i}"), &cmd))
        .collect();
    server.wait_parked(6);
    // Each job is sent until it is answered (a killed worker's requester
    // gets 504 after the reply timeout, or is cut), `at_once` at a time.
    let feeders = format!(
        r#"job() {{
  local i=$1 out
  for try in $(seq 100); do
    if out=$(curl -sf --max-time 60 -d "$i" "http://$PC/req/jobs"); then
      echo "$i $out" >> results
      return 0
    fi
    echo "$i" >> retried
    sleep 0.2
  done
  echo "$i" >> abandoned
}}
running=0
for i in $(seq {jobs}); do
  if [ "$running" -ge {at_once} ]; then wait -n; running=$((running - 1)); fi
  job "$i" &
  running=$((running + 1))
done
wait"#
    );
    let mut feeding = Running::bash(server.addr, &dir, "feeders", &feeders);
    let results = dir.join("results");
    let count = || {
        fs::read_to_string(&results)
            .unwrap_or_default()
            .lines()
            .count()
    };
    let some = wait_for(long(), || count() >= jobs / 5);
    assert!(some, "{} results; {}", count(), feeding.err_text());
    for worker in &mut workers[..2] {
        worker.signal(libc::SIGKILL);
        worker.wait_exit(*STEP).expect("the worker died");
    }
    let fed = feeding.wait_exit(*STEP * 6);
    assert!(
        fed.is_some_and(|s| s.success()),
        "{fed:?} {} of {jobs} results; {}\nworker: {}",
        count(),
        feeding.err_text(),
        workers[2].err_text()
    );
    assert!(
        !dir.join("abandoned").exists(),
        "abandoned: {}",
        fs::read_to_string(dir.join("abandoned")).unwrap_or_default()
    );
    let mut answered: BTreeMap<u64, Vec<String>> = BTreeMap::new();
    for line in fs::read_to_string(&results).unwrap().lines() {
        let (job, answer) = line.split_once(' ').unwrap_or((line, ""));
        answered
            .entry(job.parse().expect("a job number"))
            .or_default()
            .push(answer.to_owned());
    }
    assert_eq!(answered.len(), jobs, "every job answered");
    for (job, answers) in &answered {
        assert_eq!(answers, &[(job * job).to_string()], "job {job}");
    }
    assert!(workers[2].running(), "{}", workers[2].err_text());
}

#[test]
fn work_answers_500_with_the_last_stderr_line_when_cmd_fails() {
    let server = Server::start();
    let dir = temp_dir("work-500");
    let _worker = work(
        &server.url("/res/x"),
        &dir,
        "worker",
        &[
            "--",
            "sh",
            "-c",
            r#"read -r x || :; case $x in
  loud) echo first >&2; echo "disk full" >&2; echo >&2; echo not-sent; exit 3;;
  silent) exit 4;;
  signal) kill -9 $$;;
esac"#,
        ],
    );
    let url = server.url("/req/x");
    let loud = ask(&url, &["-d", "loud"]);
    assert_eq!(
        (loud.status, loud.text().as_str()),
        (500, "disk full\n"),
        "{loud:?}"
    );
    // Without stderr, one line that says how it ended.
    let silent = ask(&url, &["-d", "silent"]);
    assert_eq!(
        (silent.status, silent.text().as_str()),
        (500, "exit status 4\n"),
        "{silent:?}"
    );
    let signal = ask(&url, &["-d", "signal"]);
    assert_eq!(
        (signal.status, signal.text().as_str()),
        (500, "killed by signal 9\n"),
        "{signal:?}"
    );
}

#[test]
fn work_maps_exit_codes_and_cgi_status() {
    let server = Server::start();
    let dir = temp_dir("work-status");
    let _worker = work(
        &server.url("/res/x"),
        &dir,
        "worker",
        &[
            "--status-from-exit",
            "3=404",
            "--",
            "sh",
            "-c",
            r#"read -r x || :; case $x in
  missing) echo "no such job"; echo why >&2; exit 3;;
  cgi) printf 'Status: 201 Created\nContent-Type: text/plain\nX-Made-By: work\n\nmade';;
  plain) printf 'just text';;
esac"#,
        ],
    );
    let url = server.url("/req/x");
    let missing = ask(&url, &["-d", "missing"]);
    assert_eq!(
        (missing.status, missing.text().as_str()),
        (404, "no such job\n"),
        "{missing:?}"
    );
    let cgi = ask(&url, &["-d", "cgi"]);
    assert_eq!((cgi.status, cgi.text().as_str()), (201, "made"), "{cgi:?}");
    assert_eq!(cgi.header("content-type"), Some("text/plain"), "{cgi:?}");
    assert_eq!(cgi.header("x-made-by"), Some("work"), "{cgi:?}");
    let plain = ask(&url, &["-d", "plain"]);
    assert_eq!(
        (plain.status, plain.text().as_str()),
        (200, "just text"),
        "{plain:?}"
    );
}

#[test]
fn work_timeout_kills_cmd_and_answers_504() {
    let server = Server::start();
    let dir = temp_dir("work-timeout");
    // A duration no other test sleeps, to find this command by.
    let duration = format!("31.{}", std::process::id());
    let pattern = format!("^sleep {}$", duration.replace('.', "\\."));
    let _worker = work(
        &server.url("/res/slow"),
        &dir,
        "worker",
        &["--timeout", "1", "--", "sleep", &duration],
    );
    let mut requester = ask_later(&server.url("/req/slow"), &dir, "requester", &["-d", "go"]);
    assert!(wait_for(*STEP, || pgrep(&pattern)), "the command never ran");
    let ended = requester
        .wait_exit(long())
        .expect("the requester was answered");
    assert!(ended.success(), "{}", requester.err_text());
    let answer = parse_answer(&requester.out());
    assert_eq!(answer.status, 504, "{answer:?}");
    assert!(answer.text().contains("timed out after 1 s"), "{answer:?}");
    assert!(
        wait_for(*STEP, || !pgrep(&pattern)),
        "the command still runs"
    );
}

#[test]
fn work_streams_a_100_mib_answer_at_constant_memory() {
    // Under qemu-user the worker's figure is the emulator's, with its
    // translation cache: 16 MiB more is allowed, and the answer is still
    // larger than the limit.
    let (size, limit_kib): (u64, u64) = if is_emulated() {
        (64 << 20, 48 << 10)
    } else {
        (100 << 20, 32 << 10)
    };
    let server = Server::start();
    let dir = temp_dir("work-big");
    let worker = work(
        &server.url("/res/big"),
        &dir,
        "worker",
        &["--", "head", "-c", &size.to_string(), "/dev/zero"],
    );
    let out = curl(&[
        "-o",
        "/dev/null",
        "-w",
        "%{http_code} %{size_download}",
        &server.url("/req/big"),
    ]);
    assert!(out.status.success(), "{out:?}\n{}", worker.err_text());
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        format!("200 {size}"),
        "{}",
        worker.err_text()
    );
    let peak = status_kib(worker.pid(), "VmHWM");
    assert!(peak < limit_kib, "the worker's peak RSS was {peak} KiB");
}

#[test]
fn work_env_carries_method_path_query_and_headers() {
    let server = Server::start();
    let dir = temp_dir("work-env");
    let _worker = work(
        &server.url("/res/x"),
        &dir,
        "worker",
        &[
            "--",
            "sh",
            "-c",
            r#"printf '%s\n' "$PATCHCORD_METHOD" "$PATCHCORD_URI" "$PATCHCORD_PATH" "$PATCHCORD_QUERY" "$PATCHCORD_CONTENT_TYPE" "$PATCHCORD_H_X_ID"; cat"#,
        ],
    );
    let put = ask(
        &server.url("/req/x/a/b?q=1"),
        &[
            "-X",
            "PUT",
            "-H",
            "X-Id: 9",
            "-H",
            "Content-Type: text/csv",
            "-d",
            "body",
        ],
    );
    assert_eq!(put.status, 200, "{put:?}");
    assert_eq!(
        put.text(),
        "PUT\n/req/x/a/b?q=1\n/a/b\nq=1\ntext/csv\n9\nbody",
        "{put:?}"
    );
    // Without a rest, a query or the header: `/` and empty values.
    let get = ask(&server.url("/req/x"), &[]);
    assert_eq!(get.status, 200, "{get:?}");
    let text = get.text();
    let values: Vec<&str> = text.split('\n').collect();
    assert_eq!(values.len(), 7, "{get:?}");
    assert_eq!(values[..4], ["GET", "/req/x", "/", ""], "{get:?}");
    assert_eq!(values[5..], ["", ""], "{get:?}");
}

#[test]
fn work_exits_0_on_sigterm_after_running_job_answered() {
    let server = Server::start();
    let dir = temp_dir("work-sigterm");
    let mut worker = work(
        &server.url("/res/slow"),
        &dir,
        "worker",
        &[
            "-j",
            "2",
            "--",
            "sh",
            "-c",
            "touch started; sleep 1; echo done",
        ],
    );
    let mut requester = ask_later(&server.url("/req/slow"), &dir, "requester", &["-d", "x"]);
    let started = wait_for(*STEP, || dir.join("started").exists());
    assert!(started, "the command never started:\n{}", worker.err_text());
    worker.signal(libc::SIGTERM);
    let ended = requester
        .wait_exit(long())
        .expect("the requester was answered");
    assert!(ended.success(), "{}", requester.err_text());
    let answer = parse_answer(&requester.out());
    assert_eq!(
        (answer.status, answer.text().as_str()),
        (200, "done\n"),
        "{answer:?}"
    );
    let status = worker.wait_exit(*STEP);
    assert_eq!(
        status.and_then(|s| s.code()),
        Some(0),
        "{status:?}: {}",
        worker.err_text()
    );
}

/// A slot's kept reply connection that the relay closed while it idled is
/// not where a large (streamed) answer goes: it goes whole.
#[test]
fn a_large_answer_after_an_idle_spell_goes_whole() {
    let server = Server::start_with(&["--idle-timeout", "1"]);
    let dir = temp_dir("work-idle");
    let _worker = work(
        &server.url("/res/big"),
        &dir,
        "worker",
        &["--", "head", "-c", "200000", "/dev/zero"],
    );
    let url = server.url("/req/big");
    for round in 0..2 {
        let answer = ask(&url, &["-d", "x"]);
        assert_eq!(
            (answer.status, answer.body.len()),
            (200, 200_000),
            "round {round}: {}",
            answer.head
        );
        // Longer than the relay's --idle-timeout: it closes what idles.
        std::thread::sleep(Duration::from_millis(1500));
    }
}

/// A request whose body breaks off is never worked on: CMD is killed
/// before it sees the end of its input, so it does nothing.
#[test]
fn a_cut_request_body_kills_cmd_before_it_acts() {
    use std::io::Write;
    let server = Server::start();
    let dir = temp_dir("work-cut");
    let worker = work(
        &server.url("/res/cut"),
        &dir,
        "worker",
        &["--", "sh", "-c", "wc -c > seen; echo done"],
    );
    let mut requester = connect(server.addr);
    requester
        .write_all(b"POST /req/cut HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n")
        .unwrap();
    requester.write_all(&[b'a'; 30000]).unwrap();
    // The shell made `seen` (empty) as it started `wc`: CMD is running.
    let started = wait_for(patience(Duration::from_secs(10)), || {
        dir.join("seen").exists()
    });
    assert!(started, "{}", worker.err_text());
    drop(requester);
    let logged = wait_for(patience(Duration::from_secs(10)), || {
        worker.err_text().contains("body was cut")
    });
    assert!(logged, "{}", worker.err_text());
    assert_eq!(fs::read_to_string(dir.join("seen")).unwrap(), "");
    // Nothing was acted on, and the slot takes the next request.
    let answer = ask(&server.url("/req/cut"), &["-d", "whole"]);
    assert_eq!((answer.status, answer.text().as_str()), (200, "done\n"));
    assert_eq!(fs::read_to_string(dir.join("seen")).unwrap().trim(), "5");
}

/// Something CMD leaves running with its stderr and stdin open does not
/// hold the slot: the next request is answered while it still runs.
#[test]
fn a_background_process_of_cmd_does_not_hold_the_slot() {
    let server = Server::start();
    let dir = temp_dir("work-held");
    let worker = work(
        &server.url("/res/held"),
        &dir,
        "worker",
        &["--", "sh", "-c", "sleep 61.5 >/dev/null & echo started"],
    );
    let url = server.url("/req/held");
    for _ in 0..2 {
        let answer = ask(&url, &["-m", "30", "-d", "x"]);
        assert_eq!((answer.status, answer.text().as_str()), (200, "started\n"));
    }
    drop(worker);
    let _ = Command::new("pkill").args(["-f", "sleep 61.5"]).status();
}

/// A request with many headers (the relay gives each twice, as Patch-H-
/// and Pb-H-) reaches CMD with all of them.
#[test]
fn a_request_with_many_headers_reaches_cmd() {
    let server = Server::start();
    let dir = temp_dir("work-headers");
    let _worker = work(
        &server.url("/res/h"),
        &dir,
        "worker",
        &["--", "sh", "-c", "echo \"$PATCHCORD_H_X_39\""],
    );
    let headers: Vec<String> = (0..40).map(|i| format!("X-{i}: v{i}")).collect();
    let mut args: Vec<&str> = vec!["-d", "x"];
    for header in &headers {
        args.extend(["-H", header.as_str()]);
    }
    let answer = ask(&server.url("/req/h"), &args);
    assert_eq!((answer.status, answer.text().as_str()), (200, "v39\n"));
}

/// An output of exactly the 64 KiB held is still answered by how CMD
/// ended: a failure after it is a 500, not a cut.
#[test]
fn an_output_of_exactly_64_kib_then_a_failure_is_a_500() {
    let server = Server::start();
    let dir = temp_dir("work-64k");
    let _worker = work(
        &server.url("/res/edge"),
        &dir,
        "worker",
        &[
            "--",
            "sh",
            "-c",
            "head -c 65536 /dev/zero; echo boom >&2; exit 3",
        ],
    );
    let answer = ask(&server.url("/req/edge"), &["-d", "x"]);
    assert_eq!((answer.status, answer.text().as_str()), (500, "boom\n"));
}

/// Bad values are usage errors (exit 2), before anything is asked.
#[test]
fn bad_work_flags_exit_2() {
    let dir = temp_dir("work-usage");
    for args in [
        &["http://127.0.0.1:9/res/x", "-j", "0", "--", "true"][..],
        &["http://127.0.0.1:9/req/x", "--", "true"],
        &[
            "http://127.0.0.1:9/res/x",
            "--status-from-exit",
            "1=99",
            "--",
            "true",
        ],
        &["https://127.0.0.1:9/res/x", "--", "true"],
    ] {
        let mut worker = work(args[0], &dir, "usage", &args[1..]);
        let status = worker.wait_exit(patience(Duration::from_secs(10)));
        assert_eq!(
            status.and_then(|s| s.code()),
            Some(2),
            "{args:?}: {}",
            worker.err_text()
        );
    }
}
