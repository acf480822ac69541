//! `patchcord listen`, the pubsub subscriber that runs a command per
//! message, through the real binary against a real relay, with curl as the
//! publisher: order and once-only delivery through bursts, a kill -9 and a
//! relay restart, what is reported as missed, the command's environment,
//! the printing forms without a command, failures and signals.

use std::fs;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use crate::support::*;

// ── helpers ──────────────────────────────────────────────────────────────

/// `patchcord listen URL ARGS…` started in `dir` (where its command's
/// relative files go), its output in `dir/NAME.out` and `dir/NAME.err`.
fn listen(url: &str, dir: &Path, name: &str, args: &[&str]) -> Running {
    Running::patchcord("listen", url, dir, name, args)
}

/// Publishes with curl (`ARGS` say the body and headers): the message's id.
fn publish(url: &str, args: &[&str]) -> u64 {
    let out = curl(&[&["-f", "-D", "-", "-o", "/dev/null"], args, &[url]].concat());
    let head = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "publish {args:?}: {head}{out:?}");
    head.lines()
        .find_map(|line| {
            let (name, value) = line.split_once(':')?;
            name.eq_ignore_ascii_case("patch-id")
                .then(|| value.trim().parse().ok())?
        })
        .unwrap_or_else(|| panic!("no Patch-Id in {head}"))
}

/// The lines of the file at `path` (none while it does not exist).
fn lines(path: &Path) -> Vec<String> {
    fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(str::to_owned)
        .collect()
}

/// `m1` … `mN`.
fn bodies(n: usize) -> Vec<String> {
    (1..=n).map(|i| format!("m{i}")).collect()
}

/// The id a `--state` file holds, if it holds one.
fn state(path: &Path) -> Option<u64> {
    let text = fs::read_to_string(path).ok()?;
    text.strip_suffix('\n')?.parse().ok()
}

/// What follows each `missed ` in `log`: the counts (or `unknown`) it reported.
fn missed_reports(log: &str) -> Vec<String> {
    log.match_indices("missed ")
        .map(|(at, word)| {
            log[at + word.len()..]
                .split(|c: char| !c.is_ascii_alphanumeric())
                .next()
                .unwrap_or("")
                .to_owned()
        })
        .collect()
}

/// How long a whole run of a listener may take.
fn long() -> Duration {
    *STEP * 3
}

/// Waits until the file at `path` has at least `n` lines; fails with the
/// listener's log otherwise.
fn wait_lines(path: &Path, n: usize, listener: &Running) {
    let done = wait_for(long(), || lines(path).len() >= n);
    assert!(
        done,
        "{} has {} of {n} lines; the listener said:\n{}",
        path.display(),
        lines(path).len(),
        listener.err_text()
    );
}

/// Waits up to [`STEP`] for `listener` to end: its exit code.
fn exit_code(listener: &mut Running) -> Option<i32> {
    let status = listener.wait_exit(*STEP);
    let status = status
        .unwrap_or_else(|| panic!("the listener was still running:\n{}", listener.err_text()));
    status.code()
}

/// Publishes `m{FROM}` … `m{TO}` on `path` of the relay at `$PC`, one curl
/// after the other, in bursts of `burst` with a short pause after each.
fn publish_script(path: &str, from: usize, to: usize, burst: usize) -> String {
    format!(
        r#"for i in $(seq {from} {to}); do
  curl -sSf --max-time 60 -o /dev/null -d "m$i" "http://$PC{path}"
  if [ $((i % {burst})) -eq 0 ]; then sleep 0.1; fi
done"#
    )
}

// ── tests ────────────────────────────────────────────────────────────────

#[test]
fn listen_runs_cmd_once_per_message_in_order_through_bursts() {
    let n = if is_emulated() { 200 } else { 500 };
    let server = Server::start_with(&["--pubsub-retain-count", "1000"]);
    let dir = temp_dir("listen-bursts");
    let listener = listen(
        &server.url("/pubsub/bursts"),
        &dir,
        "listen",
        &[
            "--since",
            "all",
            "--",
            "sh",
            "-c",
            "cat >> out; echo >> out; sleep 0.002",
        ],
    );
    let mut publisher = Running::bash(
        server.addr,
        &dir,
        "publish",
        &publish_script("/pubsub/bursts", 1, n, 50),
    );
    let published = publisher.wait_exit(long()).expect("the publisher finished");
    assert!(published.success(), "{}", publisher.err_text());
    wait_lines(&dir.join("out"), n, &listener);
    assert_eq!(lines(&dir.join("out")), bodies(n));
    let log = listener.err_text();
    assert!(
        missed_reports(&log).is_empty(),
        "nothing was missed:\n{log}"
    );
}

#[test]
fn listen_resumes_from_state_after_kill_9() {
    let n: usize = if is_emulated() { 80 } else { 200 };
    let kill_after = n / 4;
    let server = Server::start_with(&["--pubsub-retain-count", "1000"]);
    let dir = temp_dir("listen-kill9");
    let url = server.url("/pubsub/resume");
    let first = publish(&url, &["-d", "m1"]);
    let mut publisher = Running::bash(
        server.addr,
        &dir,
        "publish",
        &publish_script("/pubsub/resume", 2, n, n),
    );
    let published = publisher.wait_exit(long()).expect("the publisher finished");
    assert!(published.success(), "{}", publisher.err_text());
    // One write per message (O_APPEND), so a command orphaned by the kill
    // cannot split a line; an empty body (a kill before the body was
    // written) writes nothing. The marker finds the command with pgrep.
    let marker = format!("listen-resume-{}", std::process::id());
    let script =
        format!(": {marker}; x=$(cat); [ -n \"$x\" ] && printf '%s\\n' \"$x\" >> out; sleep 0.02");
    let args = [
        "--state", "state", "--since", "all", "--", "sh", "-c", &script,
    ];
    let out = dir.join("out");
    let mut listener = listen(&url, &dir, "first", &args);
    wait_lines(&out, kill_after, &listener);
    listener.signal(libc::SIGKILL);
    listener.wait_exit(*STEP).expect("the listener died");
    // The command it was running finishes on its own; let it.
    let gone = wait_for(*STEP, || {
        let found = Command::new("pgrep")
            .args(["-f", &format!("^sh -c : {marker}")])
            .output()
            .expect("run pgrep");
        !found.status.success()
    });
    assert!(gone, "the orphaned command still runs");
    let saved = state(&dir.join("state")).expect("a state file with an id");
    assert!(
        (first..first + n as u64).contains(&saved),
        "state {saved}, ids from {first}"
    );
    // The message after the saved one is the only one that may run twice.
    let again = format!("m{}", saved - first + 2);
    let before = lines(&out);
    assert!(
        before.len() as u64 > saved - first,
        "{saved} saved but only {} ran",
        before.len()
    );

    let listener = listen(&url, &dir, "second", &args);
    let done = wait_for(long(), || {
        lines(&out).last().map(String::as_str) == Some(&format!("m{n}"))
    });
    assert!(
        done,
        "m{n} never ran: {:?}\n{}",
        lines(&out).len(),
        listener.err_text()
    );
    let mut got = lines(&out);
    let ran = got.len();
    got.dedup();
    assert_eq!(got, bodies(n), "in order, none lost");
    assert!(ran <= n + 1, "{} ran twice", ran - n);
    if ran == n + 1 {
        let all = lines(&out);
        let twice: Vec<&String> = all
            .windows(2)
            .filter(|w| w[0] == w[1])
            .map(|w| &w[0])
            .collect();
        assert_eq!(
            twice,
            [&again],
            "only the message after the saved id runs twice"
        );
    }
    let last = first + n as u64 - 1;
    assert!(
        wait_for(*STEP, || state(&dir.join("state")) == Some(last)),
        "the state ends at the last id {last}: {:?}",
        state(&dir.join("state"))
    );
}

#[test]
fn listen_reports_a_gap_after_a_memory_relay_restart() {
    let server = Server::start();
    let addr = server.addr;
    let dir = temp_dir("listen-restart");
    let url = server.url("/pubsub/gap");
    let listener = listen(
        &url,
        &dir,
        "listen",
        &["--on-missed", "echo \"$PATCHCORD_MISSED\" >> missed"],
    );
    let printed = dir.join("listen.out");
    server.wait_streams(1);
    for body in ["a1", "a2", "a3"] {
        publish(&url, &["-d", body]);
    }
    wait_lines(&printed, 3, &listener);

    assert_eq!(server.kill_9(), addr);
    let mut again = command();
    again.args(["--listen", &addr.to_string(), "--log-level", "debug"]);
    let server = Server::start_command(again);
    assert_eq!(server.addr, addr);
    server.wait_streams(1);
    for body in ["b1", "b2"] {
        publish(&url, &["-d", body]);
    }
    wait_lines(&printed, 5, &listener);
    assert_eq!(lines(&printed), ["a1", "a2", "a3", "b1", "b2"]);
    let told = wait_for(*STEP, || !lines(&dir.join("missed")).is_empty());
    assert!(told, "--on-missed never ran:\n{}", listener.err_text());
    assert_eq!(lines(&dir.join("missed")), ["unknown"]);
    let log = listener.err_text();
    assert_eq!(missed_reports(&log), ["unknown"], "{log}");
}

#[test]
fn listen_reports_patch_missed() {
    let server = Server::start_with(&["--pubsub-retain-count", "5"]);
    let dir = temp_dir("listen-missed");
    let url = server.url("/pubsub/lossy");
    let first = publish(&url, &["-d", "m1"]);
    for i in 2..=23 {
        publish(&url, &["-d", &format!("m{i}")]);
    }
    // What the relay itself says was lost after the first.
    let asked = request(
        server.addr,
        &get(&format!("/pubsub/lossy?after={first}&timeout=1")),
    );
    assert_eq!(asked.status, 200, "{}", asked.text());
    let lost: u64 = asked
        .header("patch-missed")
        .expect("Patch-Missed")
        .parse()
        .expect("a count");
    assert!(lost > 0);
    let since = first.to_string();
    let mut listener = listen(
        &url,
        &dir,
        "listen",
        &[
            "--since",
            &since,
            "--on-missed",
            "echo \"missed=$PATCHCORD_MISSED $PATCHCORD_CHANNEL\" >> missfile",
        ],
    );
    let printed = dir.join("listen.out");
    wait_lines(&printed, 5, &listener);
    let told = wait_for(*STEP, || !lines(&dir.join("missfile")).is_empty());
    assert!(told, "--on-missed never ran:\n{}", listener.err_text());
    assert_eq!(
        lines(&dir.join("missfile")),
        [format!("missed={lost} /pubsub/lossy")]
    );
    listener.signal(libc::SIGTERM);
    assert_eq!(exit_code(&mut listener), Some(0), "{}", listener.err_text());
    let retained: Vec<String> = (19..=23).map(|i| format!("m{i}")).collect();
    assert_eq!(lines(&printed), retained);
    let log = listener.err_text();
    assert_eq!(missed_reports(&log), [lost.to_string()], "{log}");
}

#[test]
fn listen_puts_headers_and_title_in_cmd_environment() {
    let server = Server::start();
    let dir = temp_dir("listen-env");
    let url = server.url("/pubsub/alerts");
    let titled = publish(
        &url,
        &[
            "-H",
            "Patch-H-Title: Backup done",
            "-H",
            "Patch-H-X-Job: 42",
            "-H",
            "Content-Type: text/plain",
            "-d",
            "ok",
        ],
    );
    let plain = publish(&url, &["-d", "no title"]);
    let listener = listen(
        &url,
        &dir,
        "listen",
        &[
            "--since",
            "all",
            "--",
            "sh",
            "-c",
            r#"printf "%s|%s|%s|%s|%s|%s|%s\n" "$PATCHCORD_TITLE" "$PATCHCORD_H_X_JOB" "$PATCHCORD_ID" "$PATCHCORD_CHANNEL" "$PATCHCORD_CONTENT_TYPE" "$PATCHCORD_TIME" "$(cat)" >> out"#,
        ],
    );
    let out = dir.join("out");
    wait_lines(&out, 2, &listener);
    let got = lines(&out);
    let fields: Vec<Vec<&str>> = got.iter().map(|l| l.split('|').collect()).collect();
    assert_eq!(
        fields[0][..5],
        [
            "Backup done",
            "42",
            &titled.to_string(),
            "/pubsub/alerts",
            "text/plain"
        ],
        "{got:?}"
    );
    assert_eq!(fields[0][6], "ok");
    assert_eq!(
        fields[1][..4],
        ["", "", &plain.to_string(), "/pubsub/alerts"],
        "{got:?}"
    );
    assert_eq!(fields[1][6], "no title");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    for line in &fields {
        let time: u64 = line[5].parse().expect("PATCHCORD_TIME in seconds");
        assert!(time + 3600 > now && time <= now, "{time} vs {now}");
    }
}

#[test]
fn listen_without_cmd_prints_lines_nul_and_ndjson() {
    let server = Server::start();
    let dir = temp_dir("listen-print");
    let url = server.url("/pubsub/print");
    let binary = dir.join("binary");
    fs::write(&binary, b"\xff\xfex").unwrap();
    let ids = [
        publish(&url, &["-d", "one"]),
        publish(&url, &["--data-binary", "two\nlines"]),
        publish(&url, &["--data-binary", &format!("@{}", binary.display())]),
        publish(&url, &["-H", "Patch-H-Title: T", "-d", "four"]),
    ];
    let nul = listen(&url, &dir, "nul", &["--since", "all", "-z"]);
    let ndjson = listen(
        &url,
        &dir,
        "ndjson",
        &["--since", "all", "--format", "ndjson"],
    );

    let done = wait_for(long(), || {
        nul.out().iter().filter(|&&b| b == 0).count() >= 4
    });
    assert!(done, "{:?}\n{}", nul.out_text(), nul.err_text());
    assert_eq!(nul.out(), b"one\0two\nlines\0\xff\xfex\0four\0");

    wait_lines(&ndjson.stdout, 4, &ndjson);
    let objects: Vec<serde_json::Value> = lines(&ndjson.stdout)
        .iter()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l:?}: {e}")))
        .collect();
    assert_eq!(objects.len(), 4, "{objects:?}");
    let got_ids: Vec<u64> = objects
        .iter()
        .map(|o| o["id"].as_u64().expect("id"))
        .collect();
    assert_eq!(got_ids, ids);
    let got_bodies: Vec<&str> = objects
        .iter()
        .map(|o| o["body"].as_str().expect("body"))
        .collect();
    assert_eq!(got_bodies, ["one", "two\nlines", "//54", "four"]);
    assert_eq!(objects[2]["encoding"], "base64", "{}", objects[2]);
    assert!(objects[0].get("encoding").is_none(), "{}", objects[0]);
    for object in &objects {
        assert!(object["time"].as_u64().is_some(), "{object}");
        assert!(object["content_type"].is_string(), "{object}");
    }
    let headers = objects[3]["headers"].as_object().expect("headers");
    let title = headers
        .iter()
        .find(|(name, _)| name.eq_ignore_ascii_case("title"))
        .map(|(_, value)| value);
    assert_eq!(title.and_then(|v| v.as_str()), Some("T"), "{}", objects[3]);
}

#[test]
fn listen_stops_on_failing_cmd_unless_keep_going() {
    let server = Server::start();
    let dir = temp_dir("listen-fail");
    let url = server.url("/pubsub/jobs");
    let good = publish(&url, &["-d", "good"]);
    publish(&url, &["-d", "bad"]);
    let good2 = publish(&url, &["-d", "good2"]);
    let cmd = [
        "sh",
        "-c",
        r#"read -r x || :; echo "$x" >> out; [ "$x" != bad ]"#,
    ];
    let base = ["--state", "state", "--since", "all"];

    let mut stopping = listen(&url, &dir, "stop", &[&base[..], &["--"], &cmd].concat());
    assert_eq!(exit_code(&mut stopping), Some(1), "{}", stopping.err_text());
    assert_eq!(lines(&dir.join("out")), ["good", "bad"]);
    assert_eq!(
        state(&dir.join("state")),
        Some(good),
        "left before the failure"
    );

    // A restart runs the failed message again; --keep-going moves past it.
    let mut going = listen(
        &url,
        &dir,
        "going",
        &[&base[..], &["--keep-going", "--"], &cmd].concat(),
    );
    wait_lines(&dir.join("out"), 4, &going);
    let saved = wait_for(*STEP, || state(&dir.join("state")) == Some(good2));
    assert!(saved, "state {:?}", state(&dir.join("state")));
    assert!(going.running(), "{}", going.err_text());
    going.signal(libc::SIGTERM);
    assert_eq!(exit_code(&mut going), Some(0), "{}", going.err_text());
    assert_eq!(lines(&dir.join("out")), ["good", "bad", "bad", "good2"]);
}

#[test]
fn listen_exits_0_on_sigterm_with_state_saved() {
    let server = Server::start();
    let dir = temp_dir("listen-sigterm");
    let url = server.url("/pubsub/slow");
    let id = publish(&url, &["-d", "only"]);
    let args = [
        "--state",
        "state",
        "--since",
        "all",
        "--",
        "sh",
        "-c",
        "touch started; sleep 1; cat >> out",
    ];
    let mut listener = listen(&url, &dir, "first", &args);
    let started = wait_for(*STEP, || dir.join("started").exists());
    assert!(
        started,
        "the command never started:\n{}",
        listener.err_text()
    );
    // Mid-command: it finishes, its message counts as handled.
    listener.signal(libc::SIGTERM);
    assert_eq!(exit_code(&mut listener), Some(0), "{}", listener.err_text());
    assert_eq!(fs::read_to_string(dir.join("out")).unwrap(), "only");
    assert_eq!(state(&dir.join("state")), Some(id));

    // Resumed after it, idle, then stopped: nothing runs again.
    fs::remove_file(dir.join("started")).unwrap();
    let mut listener = listen(&url, &dir, "second", &args);
    server.wait_streams(2);
    listener.signal(libc::SIGTERM);
    assert_eq!(exit_code(&mut listener), Some(0), "{}", listener.err_text());
    assert!(
        !dir.join("started").exists(),
        "the handled message ran again"
    );
    assert_eq!(state(&dir.join("state")), Some(id));
}

/// A URL that is not a pubsub channel is refused before anything is
/// asked: a queue's message is never taken by a listener.
#[test]
fn listen_refuses_a_queue_url_and_takes_nothing() {
    let server = Server::start();
    let dir = temp_dir("listen-queue");
    let producer = spawn_curl(&["-sf", "-d", "important job", &server.url("/jobs")]);
    server.wait_parked(1);
    let mut listener = listen(&server.url("/jobs"), &dir, "listener", &["--since", "all"]);
    let status = listener.wait_exit(patience(Duration::from_secs(10)));
    assert_eq!(
        status.and_then(|s| s.code()),
        Some(2),
        "{}",
        listener.err_text()
    );
    let got = curl(&["-sf", &server.url("/jobs")]);
    assert_eq!(String::from_utf8_lossy(&got.stdout), "important job");
    assert!(finish(producer).status.success());
}
