//! The curl examples of the README and the man page, run with real curl and
//! bash. Each command below must appear verbatim in both documents, so the
//! documents cannot drift from what is tested. `localhost:3000` is replaced by
//! the test server's address.

use std::net::SocketAddr;
use std::path::Path;

use crate::support::*;

const HTTPIPE_SEND: &str = r#"curl -XPOST localhost:3000/channels/v1/do_work -d"hello""#;
const HTTPIPE_RECEIVE: &str = "curl -XGET localhost:3000/channels/v1/do_work";
const DELETE_NAMESPACE: &str = "curl -X DELETE localhost:3000/channels/v1";
const JOBS_FEED: &str =
    r#"for f in *.mp3; do until curl -sf -d "$f" localhost:3000/jobs; do sleep 1; done; done"#;
const JOBS_WORK: &str = r#"while true; do
  f=$(curl -sf localhost:3000/jobs) || { sleep 1; continue; }
  ffmpeg -i "$f" "${f%.mp3}.ogg" || echo "failed: $f" >&2
done"#;
const FILE_SEND: &str = "curl -T report.pdf localhost:3000/u/alice/report";
const FILE_RECEIVE: &str = "curl -o received-report.pdf localhost:3000/u/alice/report";
const TAR_SEND: &str = "tar cz photos | curl -sf -T - localhost:3000/backup";
const TAR_RECEIVE: &str = "curl -sf localhost:3000/backup | tar xz";
const GET_SEND: &str = r#"curl "localhost:3000/jobs?body=hello+world""#;
const TIMEOUT: &str = r#"curl -sf "localhost:3000/jobs?timeout=5" || echo "nobody came""#;
const HEADER_SEND: &str =
    r#"curl -d "disk full" -H "Patch-H-Title: Build failed" localhost:3000/alerts"#;
const HEADER_RECEIVE: &str = "curl -i localhost:3000/alerts";
const RETRY: &str = r#"until curl -sf -d "$msg" localhost:3000/jobs; do sleep 1; done"#;
const PUBLISH: &str = r#"curl -d "backup done" localhost:3000/pubsub/alerts"#;
const NOTIFY_LOOP: &str = r#"hdr=$(mktemp); after=
while true; do
  msg=$(curl -sf -D "$hdr" "localhost:3000/pubsub/alerts?after=$after") || { sleep 2; continue; }
  after=$(awk 'tolower($1) == "patch-id:" { print $2 }' "$hdr" | tr -dc 0-9)
  missed=$(awk 'tolower($1) == "patch-missed:" { print $2 }' "$hdr" | tr -dc 0-9)
  [ -z "$missed" ] || notify-send "missed $missed alerts"
  notify-send "$msg"
done"#;
const FOLLOW_SSE: &str = r#"curl -N "localhost:3000/pubsub/alerts?format=sse""#;
const FOLLOW_NDJSON: &str = r#"curl -N "localhost:3000/pubsub/alerts?format=ndjson&after=0""#;
const CHAT_SUBSCRIBE: &str =
    r#"curl -N "localhost:3000/pubsub/chat?mime=text%2Fevent-stream&persist=true""#;
const CHAT_PUBLISH: &str =
    r#"printf 'data: hello\n\n' | curl --data-binary @- localhost:3000/pubsub/chat"#;
const SITE_LOOP: &str = r#"hdr=$(mktemp)
while true; do
  curl -sf -D "$hdr" -o /dev/null localhost:3000/res/site || { sleep 1; continue; }
  reply=$(awk 'tolower($1) == "patch-reply:" { print $2 }' "$hdr" | tr -d '\r')
  file=.$(awk 'tolower($1) == "patch-path:" { sub(/^[^:]*: */, ""); print }' "$hdr" | tr -d '\r')
  [ -d "$file" ] && file=$file/index.html
  case $file in
    *.html) type=text/html ;;
    *.css) type=text/css ;;
    *.js) type=text/javascript ;;
    *.png) type=image/png ;;
    *) type=application/octet-stream ;;
  esac
  if [ -f "$file" ]; then
    curl -s -T "$file" -H "Content-Type: $type" "localhost:3000$reply"
  else
    curl -s -H "Patch-Status: 404" -H "Content-Type: text/plain" -d "not found" "localhost:3000$reply"
  fi
done"#;
const SITE_GET: &str = "curl -i localhost:3000/req/site/index.html";
const HOOK_LOOP: &str = r#"while true; do
  curl -sf -d "thanks" -o event.json localhost:3000/res/hooks || { sleep 1; continue; }
  ./on-event.sh < event.json
done"#;
const HOOK_SEND: &str = r#"curl -d '{"action":"opened"}' -H "Content-Type: application/json" localhost:3000/req/hooks/github"#;
const TOKEN_SEND: &str =
    r#"curl -H "Patch-Token: $TOKEN" -d "deploy v2" localhost:3000/u/alice/jobs"#;
const TOKEN_RECEIVE: &str = r#"curl -H "Patch-Token: $TOKEN" localhost:3000/u/alice/jobs"#;
const R_MINT: &str = "curl localhost:3000/r";
const R_SEND: &str = r#"curl -d '{"action":"opened"}' localhost:3000/r/$NAME"#;
const R_FOLLOW: &str =
    r#"curl -N -H "Authorization: Bearer $SECRET" "localhost:3000/r/$NAME?format=ndjson&after=0""#;
const FIFO_WORKER: &str = r#"pid=$(patchcord fifo -b ./w --recv jobs --send results) || exit 1
trap 'kill -INT "$pid"' EXIT
trap '' PIPE
while IFS= read -r job; do
  printf '%s\n' "$(do_work "$job")" > ./w/send
done < ./w/recv"#;
const FIFO_ECHO: &str = r#"patchcord fifo ./echo --recv echo/in --send echo/out -- bash -c 'while IFS= read -r line; do printf "%s\n" "$line"; done < "$PATCHCORD_RECV" > "$PATCHCORD_SEND"'"#;
const FIFO_ECHO_CLIENT: &str =
    "curl -d hello localhost:3000/echo/in & curl localhost:3000/echo/out";

const WORK_FEED: &str =
    r#"for f in *.mp3; do until curl -sf -d "$f" localhost:3000/req/jobs; do sleep 1; done; done"#;
const WORK_JOBS: &str = r#"patchcord work http://localhost:3000/res/jobs -j 2 -- sh -c 'f=$(cat); ffmpeg -i "$f" "${f%.mp3}.ogg"'"#;
const LISTEN: &str = r#"patchcord listen http://localhost:3000/pubsub/alerts --state alerts.cursor -- sh -c 'notify-send "${PATCHCORD_TITLE:-alert}" "$(cat)"'"#;
const PUBLISH_TITLE: &str =
    r#"curl -d "backup done" -H "Patch-H-Title: Backup" localhost:3000/pubsub/alerts"#;
const WORK_SITE: &str = r#"patchcord work http://localhost:3000/res/site -j 4 -- sh -c 'f=.$PATCHCORD_PATH; [ -d "$f" ] && f=$f/index.html; [ -f "$f" ] || exec printf "Status: 404\n\nnot found\n"; case $f in *.html) t=text/html;; *.css) t=text/css;; *.js) t=text/javascript;; *) t=$(file -b --mime-type "$f");; esac; printf "Content-Type: %s\n\n" "$t"; exec cat "$f"'"#;
const WORK_HOOK: &str = "patchcord work http://localhost:3000/res/hooks -- ./on-event.sh";
const NOTIFY_SEND: &str =
    r#"curl -H "Patch-Token: $TOKEN" -d "backup done" localhost:3000/_/notify"#;
const NOTIFY_JSON: &str = r#"curl -H "Patch-Token: $TOKEN" -H "Content-Type: application/json" -d '{"title":"Backup","message":"**12 GB** in 4 min","type":"markdown"}' localhost:3000/_/notify"#;
const NOTIFY_NTFY: &str = r#"curl -H "Patch-Token: $TOKEN" -d "disk 91% full" "localhost:3000/_/notify?title=nas&priority=high&tags=warning""#;
const TUNNEL_SSH: &str =
    "ssh -o ProxyCommand='patchcord tunnel https://relay.example/_/tunnel/%h/%p --token T' pi.lan";

const ALL: [&str; 42] = [
    HTTPIPE_SEND,
    HTTPIPE_RECEIVE,
    DELETE_NAMESPACE,
    JOBS_FEED,
    JOBS_WORK,
    FILE_SEND,
    FILE_RECEIVE,
    TAR_SEND,
    TAR_RECEIVE,
    GET_SEND,
    TIMEOUT,
    HEADER_SEND,
    HEADER_RECEIVE,
    RETRY,
    PUBLISH,
    NOTIFY_LOOP,
    FOLLOW_SSE,
    FOLLOW_NDJSON,
    CHAT_SUBSCRIBE,
    CHAT_PUBLISH,
    SITE_LOOP,
    SITE_GET,
    HOOK_LOOP,
    HOOK_SEND,
    TOKEN_SEND,
    TOKEN_RECEIVE,
    R_MINT,
    R_SEND,
    R_FOLLOW,
    FIFO_WORKER,
    FIFO_ECHO,
    FIFO_ECHO_CLIENT,
    WORK_FEED,
    WORK_JOBS,
    LISTEN,
    PUBLISH_TITLE,
    WORK_SITE,
    WORK_HOOK,
    NOTIFY_SEND,
    NOTIFY_JSON,
    NOTIFY_NTFY,
    TUNNEL_SSH,
];

fn local(command: &str) -> String {
    command.replace("localhost:3000", "$PC")
}

/// Runs `script` (with `localhost:3000` rewritten), expecting success.
fn run(server: &Server, dir: &Path, script: &str) -> String {
    let output = bash(server, dir, &local(script));
    assert!(
        output.status.success(),
        "script failed: {script}\nstdout: {}\nstderr: {}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// Undoes the roff escapes the man page needs around these commands.
fn unroff(page: &str) -> String {
    page.replace("\\-", "-")
        .replace("\\(dq", "\"")
        .replace("\\(aq", "'")
        .replace("\\e", "\\")
        .replace("\\&", "")
}

#[test]
fn every_example_is_in_the_readme_and_the_man_page() {
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    let page = unroff(
        &std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/man/patchcord.1")).unwrap(),
    );
    for command in ALL {
        assert!(readme.contains(command), "README.md lacks: {command}");
        assert!(page.contains(command), "man/patchcord.1 lacks: {command}");
    }
}

#[test]
fn httpipe_example_and_namespace_delete() {
    let server = Server::start();
    let dir = temp_dir("ex-httpipe");
    let out = run(
        &server,
        &dir,
        &format!("{HTTPIPE_SEND} & {HTTPIPE_RECEIVE}; wait"),
    );
    assert_eq!(out, "hello");
    let waiter = spawn_curl(&[
        "-s",
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}",
        &server.url("/channels/v1/other"),
    ]);
    server.wait_parked(2);
    run(&server, &dir, DELETE_NAMESPACE);
    assert_eq!(String::from_utf8_lossy(&finish(waiter).stdout), "410");
}

/// The README's feeder and two workers, on the relay at `addr`, with
/// `ffmpeg` a stand-in that records each job and fails on b.mp3; the
/// workers carry on, and are stopped once every job was done (they loop
/// forever by design). Returns the jobs done.
fn run_job_queue(addr: SocketAddr, dir: &Path, jobs: &[&str], ffmpeg: &str) -> Vec<String> {
    for name in jobs {
        std::fs::write(dir.join(format!("{name}.mp3")), name).unwrap();
    }
    let script = format!(
        "{ffmpeg}\n\
         ({JOBS_WORK}) 2>>failed.txt & ({JOBS_WORK}) 2>>failed.txt &\n\
         {JOBS_FEED}\n\
         for i in $(seq 300); do [ \"$(sort -u done.txt | wc -l)\" -ge {count} ] && break; sleep 0.1; done\n\
         kill $(jobs -p)",
        count = jobs.len()
    );
    let output = finish(spawn_bash_at(addr, dir, &local(&script)));
    assert!(output.status.success(), "{output:?}");
    let mut done: Vec<String> = std::fs::read_to_string(dir.join("done.txt"))
        .unwrap()
        .lines()
        .map(String::from)
        .collect();
    done.sort();
    done.dedup();
    let failed = std::fs::read_to_string(dir.join("failed.txt")).unwrap_or_default();
    assert!(failed.contains("failed: b.mp3"), "{failed:?}");
    done
}

/// Records the job, and fails on b.mp3 as a broken file would.
const FFMPEG: &str = "ffmpeg() { echo \"$3\" >> done.txt; [ \"$2\" != b.mp3 ]; }";

#[test]
fn job_queue_feeds_workers_that_carry_on() {
    let server = Server::start();
    let dir = temp_dir("ex-jobs");
    let done = run_job_queue(server.addr, &dir, &["a", "b", "c", "d", "e"], FFMPEG);
    assert_eq!(done, ["a.ogg", "b.ogg", "c.ogg", "d.ogg", "e.ogg"]);
}

/// The feeder and the workers ride out a restart of the relay: every job is
/// done, none lost.
#[test]
fn job_queue_survives_a_relay_restart() {
    let first = Server::start();
    let addr = first.addr;
    let dir = temp_dir("ex-jobs-restart");
    // The relay is killed while the feeder and workers run, and a new one
    // starts on the same address a second later.
    let restart = std::thread::spawn(move || {
        std::thread::sleep(std::time::Duration::from_millis(700));
        drop(first);
        std::thread::sleep(std::time::Duration::from_secs(1));
        let mut command = command();
        command.args(["--listen", &addr.to_string()]);
        Server::start_command(command)
    });
    let jobs = ["a", "b", "c", "d", "e", "f", "g", "h", "i", "j"];
    // Each job takes a while, so that the restart falls in the middle.
    let slow = FFMPEG.replace("ffmpeg() { echo", "ffmpeg() { sleep 0.2; echo");
    let done = run_job_queue(addr, &dir, &jobs, &slow);
    let second = restart.join().unwrap();
    assert!(
        second.counter("pairs_total") > 0,
        "the second relay served jobs too"
    );
    let expected: Vec<String> = jobs.iter().map(|j| format!("{j}.ogg")).collect();
    assert_eq!(done, expected);
}

#[test]
fn file_sharing_and_streams() {
    let server = Server::start();
    let dir = temp_dir("ex-files");
    let report = pattern(3 << 20, 11);
    std::fs::write(dir.join("report.pdf"), &report).unwrap();
    std::fs::create_dir_all(dir.join("photos")).unwrap();
    std::fs::write(dir.join("photos/cat.jpg"), pattern(1 << 20, 12)).unwrap();
    std::fs::create_dir_all(dir.join("out")).unwrap();
    // Both in one directory, as someone trying it on one machine would.
    run(
        &server,
        &dir,
        &format!("{FILE_SEND} & {FILE_RECEIVE}; wait"),
    );
    assert!(std::fs::read(dir.join("received-report.pdf")).unwrap() == report);
    assert!(std::fs::read(dir.join("report.pdf")).unwrap() == report);
    run(
        &server,
        &dir,
        &format!("{TAR_SEND} & (cd out && {TAR_RECEIVE}); wait"),
    );
    assert!(std::fs::read(dir.join("out/photos/cat.jpg")).unwrap() == pattern(1 << 20, 12));
}

#[test]
fn sending_with_a_get() {
    let server = Server::start();
    let dir = temp_dir("ex-get");
    let out = run(
        &server,
        &dir,
        &format!("{GET_SEND} >/dev/null & curl -s localhost:3000/jobs; wait"),
    );
    assert_eq!(out, "hello world");
}

#[test]
fn timeouts_and_retries() {
    let server = Server::start_with(&["--timeout", "0.5"]);
    let dir = temp_dir("ex-timeout");
    assert_eq!(run(&server, &dir, TIMEOUT), "nobody came\n");
    let server = Server::start();
    let out = run(
        &server,
        &dir,
        &format!("msg=retried; ({RETRY}) & curl -s localhost:3000/jobs; wait"),
    );
    assert_eq!(out, "retried");
}

#[test]
fn headers_travel() {
    let server = Server::start();
    let dir = temp_dir("ex-headers");
    let out = run(
        &server,
        &dir,
        &format!("{HEADER_SEND} & {HEADER_RECEIVE}; wait"),
    );
    assert!(out.contains("Title: Build failed\r\n"), "{out}");
    assert!(out.ends_with("disk full"), "{out}");
}

/// Runs the README's notification loop with a stand-in for notify-send that
/// takes its time and stops the loop after `lines` notifications.
fn spawn_notification_loop(server: &Server, dir: &Path, lines: usize) -> std::process::Child {
    let script = format!(
        "notify-send() {{ echo \"$1\" >> shown.txt; sleep 0.3; [ $(wc -l < shown.txt) -lt {lines} ] || exit 0; }}\n{}",
        local(NOTIFY_LOOP)
    );
    spawn_bash(server, dir, &script)
}

/// Messages published while notify-send runs are not lost.
#[test]
fn the_notification_loop_loses_nothing() {
    let server = Server::start();
    let dir = temp_dir("ex-notify");
    let subscriber = spawn_notification_loop(&server, &dir, 3);
    server.wait_parked(1);
    for word in ["one", "two", "three"] {
        let out = run(&server, &dir, &PUBLISH.replace("backup done", word));
        assert!(out.is_empty(), "{out}");
    }
    let output = finish(subscriber);
    assert!(output.status.success(), "{output:?}");
    let shown = std::fs::read_to_string(dir.join("shown.txt")).unwrap();
    assert_eq!(shown, "one\ntwo\nthree\n");
}

/// A burst beyond the retention is reported, not hidden.
#[test]
fn the_notification_loop_reports_what_it_missed() {
    let server = Server::start_with(&["--pubsub-retain-count", "2"]);
    let dir = temp_dir("ex-notify-missed");
    let subscriber = spawn_notification_loop(&server, &dir, 4);
    server.wait_parked(1);
    run(&server, &dir, &PUBLISH.replace("backup done", "one"));
    // While "one" is shown, five more arrive; the channel keeps the last two.
    for word in ["two", "three", "four", "five", "six"] {
        run(&server, &dir, &PUBLISH.replace("backup done", word));
    }
    let output = finish(subscriber);
    assert!(output.status.success(), "{output:?}");
    let shown = std::fs::read_to_string(dir.join("shown.txt")).unwrap();
    assert_eq!(shown, "one\nmissed 3 alerts\nfive\nsix\n");
}

#[test]
fn streams_and_patchbay_chat() {
    let server = Server::start();
    let dir = temp_dir("ex-streams");
    let sse = spawn_bash(
        &server,
        &dir,
        &format!("timeout 3 {} || true", local(FOLLOW_SSE)),
    );
    let chat = spawn_bash(
        &server,
        &dir,
        &format!("timeout 3 {} || true", local(CHAT_SUBSCRIBE)),
    );
    server.wait_streams(2);
    run(&server, &dir, PUBLISH);
    run(&server, &dir, CHAT_PUBLISH);
    run(&server, &dir, CHAT_PUBLISH);
    let sse = String::from_utf8(finish(sse).stdout).unwrap();
    assert!(
        sse.starts_with("id: ") && sse.ends_with("\ndata: backup done\n\n"),
        "{sse:?}"
    );
    let chat = String::from_utf8(finish(chat).stdout).unwrap();
    assert_eq!(chat, "data: hello\n\ndata: hello\n\n");
    let ndjson = run(&server, &dir, &format!("timeout 1 {FOLLOW_NDJSON} || true"));
    assert!(
        ndjson.ends_with(
            ",\"content_type\":\"application/x-www-form-urlencoded\",\"body\":\"backup done\"}\n"
        ),
        "{ndjson:?}"
    );
}

/// The README's directory server: two files (one of them the directory's
/// index) and a 404, fetched with curl, each with its Content-Type.
#[test]
fn a_bash_loop_hosts_a_directory() {
    let server = Server::start();
    let dir = temp_dir("ex-site");
    std::fs::create_dir_all(dir.join("site")).unwrap();
    std::fs::write(dir.join("site/index.html"), "<h1>hello</h1>\n").unwrap();
    std::fs::write(dir.join("site/style.css"), "h1 { color: teal }\n").unwrap();
    // The loop's output goes to a file: its last curl, still waiting when
    // the loop is stopped, must not hold the test's pipe.
    let script = format!(
        "(cd site && {SITE_LOOP}) > loop.log 2>&1 &\n\
         {SITE_GET} > index.txt\n\
         curl -s -D - localhost:3000/req/site/style.css > css.txt\n\
         curl -s -w ' %{{http_code}} %{{content_type}}' localhost:3000/req/site/missing.html > missing.txt\n\
         curl -s -w ' %{{content_type}}' localhost:3000/req/site/ > root.txt\n\
         kill %1"
    );
    run(&server, &dir, &script);
    let read = |name: &str| std::fs::read_to_string(dir.join(name)).unwrap();
    let index = read("index.txt");
    assert!(index.starts_with("HTTP/1.1 200 OK\r\n"), "{index}");
    assert!(index.contains("\r\nContent-Type: text/html\r\n"), "{index}");
    assert!(index.ends_with("\r\n\r\n<h1>hello</h1>\n"), "{index}");
    let css = read("css.txt");
    assert!(css.contains("\r\nContent-Type: text/css\r\n"), "{css}");
    assert!(css.ends_with("\r\n\r\nh1 { color: teal }\n"), "{css}");
    assert_eq!(read("missing.txt"), "not found 404 text/plain");
    assert_eq!(read("root.txt"), "<h1>hello</h1>\n text/html");
}

/// The README's webhook loop: each sender is thanked, and each event is
/// handled once, in order.
#[test]
fn a_script_behind_nat_answers_webhooks() {
    let server = Server::start();
    let dir = temp_dir("ex-hooks");
    let handler = dir.join("on-event.sh");
    std::fs::write(
        &handler,
        "#!/bin/sh\ncat >> events.log\necho >> events.log\n",
    )
    .unwrap();
    std::fs::set_permissions(
        &handler,
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let second = HOOK_SEND.replace("opened", "closed");
    let script = format!(
        "({HOOK_LOOP}) > loop.log 2>&1 &\n\
         {HOOK_SEND} > first.txt\n\
         {second} > second.txt\n\
         for i in $(seq 100); do [ \"$(wc -l < events.log 2>/dev/null)\" -ge 2 ] && break; sleep 0.1; done\n\
         kill %1"
    );
    run(&server, &dir, &script);
    let read = |name: &str| std::fs::read_to_string(dir.join(name)).unwrap();
    assert_eq!(read("first.txt"), "thanks");
    assert_eq!(read("second.txt"), "thanks");
    assert_eq!(
        read("events.log"),
        "{\"action\":\"opened\"}\n{\"action\":\"closed\"}\n"
    );
}

#[test]
fn a_private_queue_takes_its_token() {
    let dir = temp_dir("ex-token");
    let file = dir.join("access.toml");
    std::fs::write(
        &file,
        "[tokens.alice]\ntoken = \"alice-token-123\"\n\"*\" = [\"/u/alice/**\"]\n",
    )
    .unwrap();
    let server = Server::start_with(&["--auth", file.to_str().unwrap()]);
    let script = format!(
        "TOKEN=alice-token-123\n\
         {TOKEN_RECEIVE} > got.txt &\n\
         {TOKEN_SEND}\n\
         wait\n\
         TOKEN=wrong\n\
         {TOKEN_SEND} -s -o /dev/null -w '%{{http_code}}'"
    );
    let out = run(&server, &dir, &script);
    assert_eq!(out, "401");
    assert_eq!(
        std::fs::read_to_string(dir.join("got.txt")).unwrap(),
        "deploy v2"
    );
}

#[test]
fn a_webhook_only_its_owner_reads() {
    let server = Server::start();
    let dir = temp_dir("ex-r-hook");
    let script = format!(
        "{R_MINT} > minted.json\n\
         NAME=$(sed -E 's/.*\"channel\":\"([^\"]+)\".*/\\1/' minted.json)\n\
         SECRET=$(sed -E 's/.*\"secret\":\"([^\"]+)\".*/\\1/' minted.json)\n\
         {R_SEND} > sent.txt\n\
         ({R_FOLLOW} > events.ndjson) &\n\
         for i in $(seq 100); do grep -q opened events.ndjson 2>/dev/null && break; sleep 0.1; done\n\
         kill %1\n\
         curl -s -o /dev/null -w '%{{http_code}}' \"localhost:3000/r/$NAME?after=0\""
    );
    let out = run(&server, &dir, &script);
    // Without the secret, reading is refused.
    assert_eq!(out, "401");
    let events = std::fs::read_to_string(dir.join("events.ndjson")).unwrap();
    assert!(
        events.contains("\"body\":\"{\\\"action\\\":\\\"opened\\\"}\""),
        "{events}"
    );
    assert!(std::fs::read_to_string(dir.join("sent.txt")).is_ok());
}

/// Runs `script` with `patchcord` on PATH and PATCHCORD_URL set: the
/// documented bridge commands as written.
fn spawn_with_patchcord(server: &Server, dir: &Path, script: &str) -> std::process::Child {
    let bin = std::path::Path::new(env!("CARGO_BIN_EXE_patchcord"))
        .parent()
        .unwrap()
        .to_owned();
    let path = format!(
        "{}:{}",
        bin.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    std::process::Command::new("bash")
        .args(["-c", &local(script)])
        .env("PC", server.addr.to_string())
        .env("PATH", path)
        .env("PATCHCORD_URL", server.url(""))
        .current_dir(dir)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run bash")
}

#[test]
fn a_bash_worker_through_the_fifo_bridge() {
    if is_emulated() {
        eprintln!("SKIP under emulation: runs the host's bash with the ARM binary on PATH");
        return;
    }
    let server = Server::start();
    let dir = temp_dir("ex-fifo-worker");
    let script = format!("do_work() {{ echo \"done: $1\"; }}\n{FIFO_WORKER}");
    let worker = spawn_with_patchcord(&server, &dir, &script);
    for job in ["a.mp3", "b.mp3", "c.mp3"] {
        let sent = curl(&["-sf", "-d", job, &server.url("/jobs")]);
        assert!(sent.status.success(), "{sent:?}");
        let got = curl(&["-sf", &server.url("/results")]);
        assert_eq!(String::from_utf8_lossy(&got.stdout), format!("done: {job}"));
    }
    // The worker's bridge stops with it: SIGTERM to bash runs its EXIT trap.
    // SAFETY: kill(2) on our own child's pid.
    unsafe { libc::kill(worker.id() as libc::pid_t, libc::SIGTERM) };
    let _ = finish(worker);
    let deadline = std::time::Instant::now() + *STEP;
    while dir.join("w").exists() {
        assert!(std::time::Instant::now() < deadline, "the bridge stayed");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

#[test]
fn the_echo_server_through_the_fifo_bridge() {
    if is_emulated() {
        eprintln!("SKIP under emulation: runs the host's bash with the ARM binary on PATH");
        return;
    }
    let server = Server::start();
    let dir = temp_dir("ex-fifo-echo");
    let mut echo = spawn_with_patchcord(&server, &dir, FIFO_ECHO);
    let out = run(&server, &dir, FIFO_ECHO_CLIENT);
    assert_eq!(out, "hello");
    let again = run(&server, &dir, &FIFO_ECHO_CLIENT.replace("hello", "again"));
    assert_eq!(again, "again");
    // SAFETY: kill(2) on our own child's pid.
    unsafe { libc::kill(echo.id() as libc::pid_t, libc::SIGINT) };
    let status = echo.wait().expect("wait");
    assert_eq!(status.code(), Some(0), "{status:?}");
}

/// Writes an executable script `name` in `dir`.
fn script_file(dir: &Path, name: &str, body: &str) {
    use std::os::unix::fs::PermissionsExt;
    let path = dir.join(name);
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).unwrap();
    }
    std::fs::write(&path, body).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
}

/// Stops a documented `patchcord` command started with `exec` (SIGTERM:
/// it finishes what it runs and exits 0).
fn stop_patchcord(child: std::process::Child) {
    // SAFETY: kill(2) on our own child's pid.
    unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
    let output = finish_within(child, *STEP);
    assert_eq!(output.status.code(), Some(0), "{output:?}");
}

/// Waits until `file` in `dir` has `lines` lines; its text.
fn wait_lines(dir: &Path, file: &str, lines: usize) -> String {
    let deadline = std::time::Instant::now() + *STEP;
    loop {
        let text = std::fs::read_to_string(dir.join(file)).unwrap_or_default();
        if text.lines().count() >= lines {
            return text;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{file} has {text:?}, not {lines} lines"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

#[test]
fn the_listen_example_notifies_once_per_message_with_its_title() {
    if is_emulated() {
        eprintln!("SKIP under emulation: runs the host's bash with the ARM binary on PATH");
        return;
    }
    let server = Server::start();
    let dir = temp_dir("ex-listen");
    script_file(
        &dir,
        "fake/notify-send",
        "#!/bin/sh\necho \"$1|$2\" >> shown.txt\n",
    );
    let listener = spawn_with_patchcord(
        &server,
        &dir,
        &format!("export PATH=\"$PWD/fake:$PATH\"\nexec {LISTEN}"),
    );
    server.wait_streams(1);
    run(&server, &dir, PUBLISH_TITLE);
    run(&server, &dir, PUBLISH);
    let shown = wait_lines(&dir, "shown.txt", 2);
    assert_eq!(shown, "Backup|backup done\nalert|backup done\n");
    stop_patchcord(listener);
    let cursor = std::fs::read_to_string(dir.join("alerts.cursor")).unwrap();
    assert!(cursor.trim().parse::<u64>().is_ok(), "{cursor:?}");
}

#[test]
fn the_work_job_queue_example_finishes_every_job() {
    if is_emulated() {
        eprintln!("SKIP under emulation: runs the host's bash with the ARM binary on PATH");
        return;
    }
    let server = Server::start();
    let dir = temp_dir("ex-work-jobs");
    script_file(&dir, "fake/ffmpeg", "#!/bin/sh\necho converted > \"$3\"\n");
    for job in ["a.mp3", "b.mp3", "c.mp3"] {
        std::fs::write(dir.join(job), "audio").unwrap();
    }
    let worker = spawn_with_patchcord(
        &server,
        &dir,
        &format!("export PATH=\"$PWD/fake:$PATH\"\nexec {WORK_JOBS}"),
    );
    run(&server, &dir, WORK_FEED);
    // Each feeder's 2xx came once its job was done.
    for job in ["a.ogg", "b.ogg", "c.ogg"] {
        assert_eq!(
            std::fs::read_to_string(dir.join(job)).unwrap(),
            "converted\n"
        );
    }
    stop_patchcord(worker);
}

#[test]
fn the_work_directory_server_example_serves_files_with_their_types() {
    if is_emulated() {
        eprintln!("SKIP under emulation: runs the host's bash with the ARM binary on PATH");
        return;
    }
    if std::process::Command::new("file")
        .arg("--version")
        .output()
        .is_err()
    {
        eprintln!("SKIP: the example names types with file(1), which is not installed");
        return;
    }
    let server = Server::start();
    let dir = temp_dir("ex-work-site");
    std::fs::write(dir.join("index.html"), "<h1>hi</h1>\n").unwrap();
    std::fs::create_dir_all(dir.join("css")).unwrap();
    std::fs::write(dir.join("css/a.css"), "h1 { color: red }\n").unwrap();
    let site = spawn_with_patchcord(&server, &dir, &format!("exec {WORK_SITE}"));
    let page = curl(&["-si", &server.url("/req/site/")]);
    let page = String::from_utf8_lossy(&page.stdout).into_owned();
    assert!(page.starts_with("HTTP/1.1 200"), "{page}");
    assert!(page.contains("Content-Type: text/html\r\n"), "{page}");
    assert!(page.ends_with("<h1>hi</h1>\n"), "{page}");
    let css = curl(&["-si", &server.url("/req/site/css/a.css")]);
    let css = String::from_utf8_lossy(&css.stdout).into_owned();
    assert!(css.contains("Content-Type: text/css\r\n"), "{css}");
    assert!(css.ends_with("h1 { color: red }\n"), "{css}");
    let missing = curl(&["-si", &server.url("/req/site/nope.html")]);
    let missing = String::from_utf8_lossy(&missing.stdout).into_owned();
    assert!(missing.starts_with("HTTP/1.1 404"), "{missing}");
    assert!(missing.ends_with("not found\n"), "{missing}");
    stop_patchcord(site);
}

#[test]
fn the_work_webhook_example_answers_with_the_script() {
    if is_emulated() {
        eprintln!("SKIP under emulation: runs the host's bash with the ARM binary on PATH");
        return;
    }
    let server = Server::start();
    let dir = temp_dir("ex-work-hook");
    script_file(
        &dir,
        "on-event.sh",
        "#!/bin/sh\ncat > event.json\n[ \"$PATCHCORD_CONTENT_TYPE\" = application/json ] || { echo 'not JSON' >&2; exit 1; }\necho handled\n",
    );
    let hooks = spawn_with_patchcord(&server, &dir, &format!("exec {WORK_HOOK}"));
    assert_eq!(run(&server, &dir, HOOK_SEND), "handled\n");
    assert_eq!(
        std::fs::read_to_string(dir.join("event.json")).unwrap(),
        r#"{"action":"opened"}"#
    );
    let refused = curl(&[
        "-s",
        "-w",
        " %{http_code}",
        "-d",
        "x",
        &server.url("/req/hooks/github"),
    ]);
    assert_eq!(String::from_utf8_lossy(&refused.stdout), "not JSON\n 500");
    stop_patchcord(hooks);
}

/// A backend that takes `n` requests on loopback and hands each back whole
/// (head and body), answering 200.
fn spawn_backend(n: usize) -> (SocketAddr, std::thread::JoinHandle<Vec<String>>) {
    use std::io::{Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let handle = std::thread::spawn(move || {
        let mut seen = Vec::new();
        for _ in 0..n {
            let (mut stream, _) = listener.accept().unwrap();
            stream.set_read_timeout(Some(*STEP)).unwrap();
            let mut got = Vec::new();
            let mut buf = [0u8; 4096];
            // Connection: close requests: the head, then Content-Length bytes.
            loop {
                let n = stream.read(&mut buf).unwrap();
                got.extend_from_slice(&buf[..n]);
                let text = String::from_utf8_lossy(&got).into_owned();
                if let Some(end) = text.find("\r\n\r\n") {
                    let length: usize = text[..end]
                        .lines()
                        .find_map(|l| l.strip_prefix("Content-Length: "))
                        .map_or(0, |v| v.trim().parse().unwrap());
                    if got.len() >= end + 4 + length || n == 0 {
                        break;
                    }
                }
                assert!(n > 0, "the request ended early");
            }
            stream
                .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
                .unwrap();
            seen.push(String::from_utf8_lossy(&got).into_owned());
        }
        seen
    });
    (addr, handle)
}

#[test]
fn the_notification_examples_reach_a_webhook_and_ntfy() {
    let (hook, hook_seen) = spawn_backend(3);
    let (ntfy, ntfy_seen) = spawn_backend(3);
    let dir = temp_dir("ex-notify");
    let file = dir.join("access.toml");
    std::fs::write(
        &file,
        format!(
            "[tokens.backup]\ntoken = \"backup-token-1\"\nPOST = [\"/_/notify\"]\n\n\
             [[notify.webhook]]\nurl = \"http://{hook}/hook\"\n\n\
             [[notify.ntfy]]\nserver = \"http://{ntfy}\"\ntopic = \"alice-alerts\"\n"
        ),
    )
    .unwrap();
    let server = Server::start_with(&["--auth", file.to_str().unwrap()]);
    let script = format!("TOKEN=backup-token-1\n{NOTIFY_SEND}\n{NOTIFY_JSON}\n{NOTIFY_NTFY}\n");
    let out = run(&server, &dir, &script);
    assert_eq!(out.lines().count(), 3, "{out}");
    for line in out.lines() {
        assert!(line.contains(r#""status":"sent""#), "{line}");
    }
    let hooks = hook_seen.join().unwrap();
    assert!(
        hooks[0].contains(r#""message":"backup done""#),
        "{}",
        hooks[0]
    );
    assert!(hooks[1].contains(r#""type":"markdown""#), "{}", hooks[1]);
    let pushes = ntfy_seen.join().unwrap();
    assert!(
        pushes[0].starts_with("POST /alice-alerts HTTP/1.1"),
        "{}",
        pushes[0]
    );
    assert!(pushes[0].ends_with("backup done"), "{}", pushes[0]);
    assert!(pushes[1].contains("Title: Backup\r\n"), "{}", pushes[1]);
    assert!(pushes[1].contains("Markdown: yes\r\n"), "{}", pushes[1]);
    assert!(pushes[1].ends_with("**12 GB** in 4 min"), "{}", pushes[1]);
    for header in ["Title: nas\r\n", "Priority: 4\r\n", "Tags: warning\r\n"] {
        assert!(pushes[2].contains(header), "{header:?} in {}", pushes[2]);
    }
    assert!(pushes[2].ends_with("disk 91% full"), "{}", pushes[2]);
    assert!(hooks[2].contains(r#""priority":4"#), "{}", hooks[2]);
    assert!(hooks[2].contains(r#""tags":["warning"]"#), "{}", hooks[2]);
}

#[test]
fn the_ssh_example_speaks_ssh_through_the_tunnel() {
    use std::io::{Read, Write};
    if std::process::Command::new("ssh")
        .arg("-V")
        .output()
        .is_err()
    {
        eprintln!("SKIP: no ssh client (openssh-client); .ci/run installs it");
        return;
    }
    if is_emulated() {
        eprintln!(
            "SKIP under emulation: runs the host's ssh with the ARM binary as its ProxyCommand"
        );
        return;
    }
    // A target that speaks first, as sshd does, and records what ssh says.
    let target = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = target.local_addr().unwrap().port();
    let heard = std::thread::spawn(move || {
        let (mut stream, _) = target.accept().unwrap();
        stream.set_read_timeout(Some(*STEP)).unwrap();
        stream
            .write_all(b"SSH-2.0-OpenSSH_9.2 patchcord-test\r\n")
            .unwrap();
        let mut got = Vec::new();
        let mut buf = [0u8; 4096];
        while !String::from_utf8_lossy(&got).contains("\r\n") {
            match stream.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
        }
        String::from_utf8_lossy(&got).into_owned()
    });
    let dir = temp_dir("ex-ssh");
    let file = dir.join("access.toml");
    std::fs::write(
        &file,
        "[tokens.laptop]\ntoken = \"T\"\ntunnel = [\"127.0.0.1:*\"]\n",
    )
    .unwrap();
    let server = Server::start_with(&["--auth", file.to_str().unwrap()]);
    // The documented command, aimed at the test relay and target.
    let command = TUNNEL_SSH
        .replace("https://relay.example", &server.url(""))
        .replace(
            " pi.lan",
            &format!(
                " -F /dev/null -o BatchMode=yes -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null -o ConnectTimeout=10 -p {port} 127.0.0.1 true"
            ),
        );
    let child = spawn_with_patchcord(&server, &dir, &command);
    let said = heard.join().unwrap();
    assert!(said.starts_with("SSH-2.0-"), "ssh said {said:?}");
    let output = finish_within(child, patience(*STEP));
    // The fake server closes after the banners: ssh fails, through the tunnel.
    assert!(!output.status.success());
    server.wait_counter("opened_total", 1);
}
