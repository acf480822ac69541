//! Access control, hooks and abuse limits through the real binary: the
//! access file's tables (deny wins, `**`, public, hashed tokens), 401
//! against 403, path tricks, SIGHUP, what never travels or is logged,
//! `/h` and `/r` hook channels, rate limits behind proxies, the per-address
//! connection cap and `--max-body`.

use std::io::{Read, Write};
use std::path::PathBuf;
use std::thread;
use std::time::Duration;

use crate::support::*;

/// The access file of DESIGN.md §7, with one more token for readers.
const FILE: &str = r#"
# Requests that carry no token use [tokens.public].
[tokens.public]
GET = ["/public/**", "/u/*/pub/**"]

[tokens.deploy]
token = "s3cret-plaintext"
POST = ["/u/alice/**", "!/u/alice/private/**"]
GET  = ["/u/alice/**"]
DELETE = ["/u/alice/**"]

[tokens.admin]
sha256 = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"
"*" = ["/**"]

[tokens.reader]
token = "read-only"
GET = ["/feeds/**"]
"#;

/// sha256("test"), the admin table's digest.
const ADMIN_DIGEST: &str = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08";

/// Writes `text` to a fresh access file and returns its path.
fn access_file(name: &str, text: &str) -> PathBuf {
    let path = temp_dir(name).join("access.toml");
    std::fs::write(&path, text).expect("write the access file");
    path
}

/// A server with `FILE` as its access file.
fn guarded(name: &str, more: &[&str]) -> (Server, PathBuf) {
    let file = access_file(name, FILE);
    let mut args = vec!["--auth", file.to_str().unwrap()];
    args.extend_from_slice(more);
    (Server::start_with(&args), file)
}

/// The status of a `method` request on `path` with header lines `headers`.
fn status(server: &Server, method: &str, path: &str, headers: &[(&str, &str)]) -> u16 {
    request(server.addr, &with_headers(method, path, headers, b"")).status
}

/// The status of a send by POST with a short body and `?timeout=0.2`, so
/// that an allowed one ends in 408 without a consumer.
fn send_status(server: &Server, path: &str, headers: &[(&str, &str)]) -> u16 {
    let sep = if path.contains('?') { '&' } else { '?' };
    let target = format!("{path}{sep}timeout=0.2");
    request(server.addr, &with_headers("POST", &target, headers, b"x")).status
}

const DEPLOY: (&str, &str) = ("Patch-Token", "s3cret-plaintext");

#[test]
fn tables_allow_and_deny_and_deny_wins() {
    let (server, _) = guarded("tables", &[]);
    // Allowed: the wait for a consumer then times out (408), past the check.
    assert_eq!(send_status(&server, "/u/alice/jobs", &[DEPLOY]), 408);
    assert_eq!(send_status(&server, "/u/alice/a/b/c", &[DEPLOY]), 408);
    // `/x/**` matches `/x` itself.
    assert_eq!(send_status(&server, "/u/alice", &[DEPLOY]), 408);
    // A matching deny wins over the allow.
    assert_eq!(send_status(&server, "/u/alice/private/x", &[DEPLOY]), 403);
    assert_eq!(send_status(&server, "/u/alice/private", &[DEPLOY]), 403);
    assert_eq!(send_status(&server, "/u/bob/jobs", &[DEPLOY]), 403);
    // `*` stays in its segment.
    assert_eq!(
        status(&server, "GET", "/u/bob/pub/feed?timeout=0.2", &[]),
        408
    );
    assert_eq!(
        status(&server, "GET", "/u/bob/x/pub/feed?timeout=0.2", &[]),
        401
    );
    // The admin's token, stored hashed, may do anything, by any carrier.
    assert_eq!(
        send_status(&server, "/anything", &[("Authorization", "Bearer test")]),
        408
    );
    assert_eq!(send_status(&server, "/anything?token=test", &[]), 408);
    assert_eq!(
        send_status(&server, "/anything", &[("Patch-Token", "test")]),
        408
    );
    // The hash itself is no token.
    assert_eq!(
        send_status(&server, &format!("/anything?token={ADMIN_DIGEST}"), &[]),
        401
    );
    assert!(server.counter("denied_total") >= 4, "{}", server.status());
    assert!(server.counter("bad_credentials_total") >= 1);
}

#[test]
fn no_token_is_401_with_a_challenge_a_wrong_one_401_a_weak_one_403() {
    let (server, _) = guarded("answers", &[]);
    let got = request(server.addr, &post("/u/alice/jobs", b"x"));
    assert_eq!(got.status, 401);
    assert_eq!(
        got.header("WWW-Authenticate"),
        Some("Bearer realm=\"patchcord\"")
    );
    assert_eq!(got.text().lines().count(), 1, "{}", got.text());
    // An unknown token is 401, never a fall-back to public, even where
    // public may read.
    let got = request(
        server.addr,
        &with_headers("GET", "/public/news", &[("Patch-Token", "guess")], b""),
    );
    assert_eq!(got.status, 401);
    assert!(
        got.header("WWW-Authenticate")
            .is_some_and(|v| v.contains("invalid_token"))
    );
    let got = request(
        server.addr,
        &with_headers("POST", "/u/bob/x", &[DEPLOY], b"x"),
    );
    assert_eq!(got.status, 403);
    // The reason names neither the token nor the rule.
    for text in [got.text(), server.log()] {
        assert!(!text.contains("s3cret-plaintext"), "{text}");
        assert!(!text.contains("/u/alice/**"), "{text}");
    }
    // The label does appear in the log, for the operator.
    server.wait_log("(deploy): 403", 1);
}

#[test]
fn public_table_serves_requests_without_a_token_with_curl() {
    let (server, _) = guarded("public", &[]);
    let consumer = spawn_curl(&["-f", &server.url("/public/news")]);
    server.wait_parked(1);
    // Sending there takes a token with POST on it: admin's.
    let refused = curl(&["-f", "-d", "hello", &server.url("/public/news")]);
    assert_eq!(refused.status.code(), Some(22), "{refused:?}");
    let sent = curl(&[
        "-f",
        "-H",
        "Authorization: Bearer test",
        "-d",
        "hello",
        &server.url("/public/news"),
    ]);
    assert!(sent.status.success(), "{sent:?}");
    let got = finish(consumer);
    assert_eq!(String::from_utf8_lossy(&got.stdout), "hello");
    // HEAD is a GET without a body: GET grants it (past the check, a queue
    // says 405 to HEAD); it grants no POST.
    assert_eq!(code(&["-I", &server.url("/public/news")]), "405");
    assert_eq!(code(&["-I", &server.url("/private/news")]), "401");
}

#[test]
fn a_send_by_get_needs_post() {
    let (server, _) = guarded("body", &[]);
    let reader = ("Patch-Token", "read-only");
    assert_eq!(
        status(&server, "GET", "/feeds/a?timeout=0.2", &[reader]),
        408
    );
    assert_eq!(
        status(&server, "GET", "/feeds/a?body=hi&timeout=0.2", &[reader]),
        403
    );
    assert_eq!(
        status(
            &server,
            "GET",
            "/feeds/a?method=post&body=hi&timeout=0.2",
            &[reader]
        ),
        403
    );
    // And a responder, whatever its method, needs POST.
    assert_eq!(
        status(&server, "GET", "/feeds/res/x?timeout=0.2", &[reader]),
        403
    );
    // A requester needs its own method.
    assert_eq!(
        status(&server, "GET", "/feeds/req/x/y?timeout=0.2", &[reader]),
        408
    );
}

#[test]
fn path_tricks_never_reach_a_denied_channel() {
    let (server, _) = guarded("tricks", &[]);
    // Bob's channel has a consumer, placed by the admin.
    let mut consumer = connect(server.addr);
    send(
        &mut consumer,
        &with_headers("GET", "/u/bob/inbox", &[("Patch-Token", "test")], b""),
    );
    server.wait_parked(1);
    let tricks = [
        "/u/alice/../bob/inbox",
        "/u/alice/%2e%2e/bob/inbox",
        "/u/alice/%2E%2E/bob/inbox",
        "/u/alice/.%2e/bob/inbox",
        "/u/alice%2F..%2Fbob/inbox",
        "/u/alice/%2Fbob/inbox",
        "/u/alice/./../bob/inbox",
        "//u/bob/inbox",
        "/u//bob/inbox",
        "/u/bob//inbox",
        "/u/bob/inbox/",
        "/u/bob/inbox?x=/u/alice/y",
    ];
    for trick in tricks {
        let got = request(
            server.addr,
            &with_headers("POST", trick, &[DEPLOY], b"stolen"),
        );
        assert!(
            matches!(got.status, 400 | 403),
            "{trick}: {} {}",
            got.status,
            got.text()
        );
    }
    // Bob's consumer got nothing: the admin's message is the first.
    let sent = request(
        server.addr,
        &with_headers("POST", "/u/bob/inbox", &[("Patch-Token", "test")], b"real"),
    );
    assert_eq!(sent.status, 200);
    let got = read_response(&mut consumer).unwrap();
    assert_eq!(got.body, b"real");
}

#[test]
fn a_delete_needs_delete_on_the_prefix_it_deletes() {
    let (server, _) = guarded("delete", &[]);
    assert_eq!(status(&server, "DELETE", "/u/alice/jobs", &[DEPLOY]), 200);
    assert_eq!(status(&server, "DELETE", "/u/alice", &[DEPLOY]), 200);
    // `/u` holds bob's channels too.
    assert_eq!(status(&server, "DELETE", "/u", &[DEPLOY]), 403);
    assert_eq!(status(&server, "DELETE", "/u", &[]), 401);
}

/// One request through a responder on `/api/res/x` that holds the admin's
/// token: the requester's curl arguments, and the head the responder saw.
fn seen_by_responder(server: &Server, parked: u64, requester: &[&str]) -> String {
    let responder = spawn_curl(&[
        "-D",
        "-",
        "-H",
        "Authorization: Bearer test",
        "-d",
        "ok",
        &server.url("/api/res/x"),
    ]);
    server.wait_parked(parked);
    let mut args = vec!["-f"];
    args.extend_from_slice(requester);
    let got = curl(&args);
    assert!(got.status.success(), "{got:?}");
    String::from_utf8_lossy(&finish(responder).stdout).into_owned()
}

#[test]
fn the_credential_never_reaches_the_other_side() {
    let (server, _) = guarded("travel", &[]);
    // The relay token in Patch-Token: the client's own Authorization travels.
    let seen = seen_by_responder(
        &server,
        1,
        &[
            "-H",
            "Patch-Token: test",
            "-H",
            "Authorization: Basic dXNlcjpwdw==",
            &server.url("/api/req/x/path?token=test&keep=1"),
        ],
    );
    assert!(
        seen.contains("Patch-H-Authorization: Basic dXNlcjpwdw=="),
        "{seen}"
    );
    assert!(seen.contains("Patch-Uri: /api/req/x/path?keep=1"), "{seen}");
    assert!(!seen.to_ascii_lowercase().contains("patch-token"), "{seen}");
    assert!(!seen.contains(": test"), "{seen}");
    // The relay token as a Bearer: that Authorization does not travel.
    let seen = seen_by_responder(
        &server,
        2,
        &[
            "-H",
            "Authorization: Bearer test",
            &server.url("/api/req/x/other"),
        ],
    );
    assert!(seen.contains("Patch-Path: /other"), "{seen}");
    assert!(
        !seen.to_ascii_lowercase().contains("authorization"),
        "{seen}"
    );
    assert!(!server.log().contains("token=test"), "{}", server.log());
}

#[test]
fn without_an_access_file_a_bearer_header_travels_to_the_responder() {
    let server = Server::start();
    let responder = spawn_curl(&["-D", "-", "-d", "ok", &server.url("/res/open")]);
    server.wait_parked(1);
    let requester = curl(&[
        "-f",
        "-H",
        "Authorization: Bearer for-the-app",
        &server.url("/req/open/x"),
    ]);
    assert!(requester.status.success(), "{requester:?}");
    let seen = String::from_utf8_lossy(&finish(responder).stdout).into_owned();
    assert!(
        seen.contains("Patch-H-Authorization: Bearer for-the-app"),
        "{seen}"
    );
}

#[test]
fn sighup_rereads_a_valid_file_and_keeps_the_old_rules_for_a_bad_one() {
    let (server, file) = guarded("sighup", &[]);
    assert_eq!(send_status(&server, "/u/alice/x", &[DEPLOY]), 408);
    let newer = FILE.replace("s3cret-plaintext", "rotated-token");
    std::fs::write(&file, newer).unwrap();
    server.signal(libc::SIGHUP);
    server.wait_log("re-read", 1);
    assert_eq!(send_status(&server, "/u/alice/x", &[DEPLOY]), 401);
    assert_eq!(
        send_status(&server, "/u/alice/x", &[("Patch-Token", "rotated-token")]),
        408
    );
    // A broken file is logged with its line; the rules stay.
    std::fs::write(&file, "[tokens.x]\ntoken = \"a\"\nGET = [\"no-slash\"]\n").unwrap();
    server.signal(libc::SIGHUP);
    server.wait_log("access.toml:3:", 1);
    assert_eq!(
        send_status(&server, "/u/alice/x", &[("Patch-Token", "rotated-token")]),
        408
    );
    assert_eq!(
        send_status(&server, "/anywhere", &[("Patch-Token", "test")]),
        408
    );
}

#[test]
fn a_bad_file_at_start_is_an_error_naming_the_file_and_line() {
    let file = access_file("badstart", "[tokens.a]\ntoken = \"x\"\nGOT = [\"/x\"]\n");
    let output = command()
        .args(["--listen", "127.0.0.1:0", "--auth", file.to_str().unwrap()])
        .output()
        .expect("run patchcord");
    assert_eq!(output.status.code(), Some(1), "{output:?}");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("access.toml:3:"), "{stderr}");
    let missing = command()
        .args([
            "--listen",
            "127.0.0.1:0",
            "--auth",
            "/nonexistent/access.toml",
        ])
        .output()
        .expect("run patchcord");
    assert_eq!(missing.status.code(), Some(1), "{missing:?}");
}

#[test]
fn patchcord_token_prints_a_token_and_lines_that_work() {
    let output = command().args(["token", "ci"]).output().expect("token");
    assert!(output.status.success(), "{output:?}");
    let text = String::from_utf8_lossy(&output.stdout).into_owned();
    let token = text
        .lines()
        .find_map(|l| l.strip_prefix("token: "))
        .expect("a token line")
        .to_owned();
    assert!(token.len() >= 22, "{token}");
    let again = command().args(["token"]).output().expect("token");
    assert!(!String::from_utf8_lossy(&again.stdout).contains(&token));
    // The hashed lines, pasted, with a grant added.
    let hashed: String = text
        .lines()
        .skip_while(|l| !l.starts_with("# or hashed"))
        .skip(1)
        .take(2)
        .map(|l| format!("{l}\n"))
        .collect();
    assert!(hashed.contains("sha256 = "), "{text}");
    assert!(!hashed.contains(&token), "{hashed}");
    let file = access_file("tokencmd", &format!("{hashed}POST = [\"/ci/**\"]\n"));
    let server = Server::start_with(&["--auth", file.to_str().unwrap()]);
    let bearer = format!("Bearer {token}");
    assert_eq!(
        send_status(&server, "/ci/build", &[("Authorization", &bearer)]),
        408
    );
    assert_eq!(send_status(&server, "/ci/build", &[]), 401);
}

/// A server whose hook key is `key`.
fn with_key(key: &str) -> Server {
    let mut command = command();
    command
        .args(["--listen", "127.0.0.1:0", "--log-level", "debug"])
        .env("PATCHCORD_SECRET_KEY", key);
    Server::start_command(command)
}

/// Mints a hook of `kind` (`h` or `r`) with curl: (channel, secret).
fn mint(server: &Server, kind: &str) -> (String, String) {
    let output = curl(&["-f", &server.url(&format!("/{kind}"))]);
    assert!(output.status.success(), "{output:?}");
    let json = String::from_utf8_lossy(&output.stdout).into_owned();
    let field = |name: &str| {
        let key = format!("\"{name}\":\"");
        let at = json.find(&key).unwrap_or_else(|| panic!("{json}")) + key.len();
        json[at..].split('"').next().unwrap().to_owned()
    };
    (field("channel"), field("secret"))
}

#[test]
fn h_hooks_take_the_secret_to_send_and_anyone_reads() {
    let server = with_key("0123456789abcdef0123456789abcdef-hooks");
    let (channel, secret) = mint(&server, "h");
    let (other, other_secret) = mint(&server, "h");
    assert_ne!(channel, other);
    let path = format!("/h/{channel}");
    // Anyone reads: a subscriber streams.
    let reader = spawn_curl(&["-N", &server.url(&format!("{path}?format=ndjson"))]);
    server.wait_streams(1);
    let right = format!("{}?secret={secret}", server.url(&path));
    let wrong = format!("{}?secret={other_secret}", server.url(&path));
    let bearer = format!("Authorization: Bearer {secret}");
    let url = server.url(&path);
    assert_eq!(code(&["-d", "no secret", &url]), "401");
    assert_eq!(
        code(&["-H", "Authorization: Bearer 00", "-d", "bad", &url]),
        "403"
    );
    assert_eq!(code(&["-d", "another channel's", &wrong]), "403");
    assert_eq!(code(&["-d", "first", &right]), "200");
    assert_eq!(code(&["-H", &bearer, "-d", "second", &url]), "200");
    // Reading takes no secret, on any hook channel.
    let other_read = request(server.addr, &get(&format!("/h/{other}?timeout=0.2")));
    assert!(!matches!(other_read.status, 401 | 403), "{other_read:?}");
    // Nobody deletes every hook at once, and no hook is listed.
    assert_eq!(code(&["-X", "DELETE", &server.url("/h/")]), "404");
    assert_eq!(code(&["-X", "DELETE", &server.url("/r/")]), "404");
    let listing = request(server.addr, &get("/_/channels")).text();
    assert!(!listing.contains("/h/"), "{listing}");
    // Deleting takes it.
    assert_eq!(code(&["-X", "DELETE", &url]), "401");
    assert_eq!(code(&["-X", "DELETE", &right]), "200");
    let lines = String::from_utf8_lossy(&finish(reader).stdout).into_owned();
    assert!(
        lines.contains("first") && lines.contains("second"),
        "{lines}"
    );
    assert!(
        !lines.contains("no secret") && !lines.contains("bad"),
        "{lines}"
    );
    // The secret is never logged.
    let log = server.log();
    assert!(
        !log.contains(&secret) && !log.contains(&other_secret),
        "{log}"
    );
}

/// The status curl got for a request with `args`.
fn code(args: &[&str]) -> String {
    let mut all = vec!["-o", "/dev/null", "-w", "%{http_code}"];
    all.extend_from_slice(args);
    String::from_utf8_lossy(&curl(&all).stdout).into_owned()
}

#[test]
fn r_hooks_take_anyones_webhook_and_the_secret_to_read() {
    let key = "a-key-of-at-least-thirty-two-bytes-for-r";
    let server = with_key(key);
    let (channel, secret) = mint(&server, "r");
    let path = format!("/r/{channel}");
    // A webhook caller gets its 200 at once, with no reader yet.
    let sent = curl(&[
        "-f",
        "-H",
        "X-Event: push",
        "-d",
        "{\"ref\":1}",
        &server.url(&path),
    ]);
    assert!(sent.status.success(), "{sent:?}");
    let refused = request(server.addr, &get(&path));
    assert_eq!(refused.status, 401);
    let refused = request(
        server.addr,
        &get(&format!("{path}?secret={}", &secret[..63])),
    );
    assert_eq!(refused.status, 403);
    // Reading, from the start, with the secret.
    let got = curl(&[
        "-f",
        &server.url(&format!("{path}?secret={secret}&after=0")),
    ]);
    assert!(got.status.success(), "{got:?}");
    assert_eq!(String::from_utf8_lossy(&got.stdout), "{\"ref\":1}");
    // A restart with the same key keeps the secret valid.
    drop(server);
    let server = with_key(key);
    let sent = curl(&["-f", "-d", "after restart", &server.url(&path)]);
    assert!(sent.status.success(), "{sent:?}");
    let got = curl(&[
        "-f",
        "-H",
        &format!("Authorization: Bearer {secret}"),
        &server.url(&format!("{path}?after=0")),
    ]);
    assert!(got.status.success(), "{got:?}");
    assert_eq!(String::from_utf8_lossy(&got.stdout), "after restart");
    // Another key: the old secret is worth nothing.
    drop(server);
    let server = with_key("another-key-of-at-least-thirty-two-bytes");
    let refused = request(server.addr, &get(&format!("{path}?secret={secret}")));
    assert_eq!(refused.status, 403);
    assert!(!server.log().contains(&secret));
}

#[test]
fn hooks_ignore_the_access_file() {
    let (server, _) = guarded("hooks-auth", &[]);
    let (channel, secret) = mint(&server, "r");
    let sent = curl(&["-f", "-d", "event", &server.url(&format!("/r/{channel}"))]);
    assert!(sent.status.success(), "{sent:?}");
    let got = curl(&[
        "-f",
        "-H",
        &format!("Authorization: Bearer {secret}"),
        &server.url(&format!("/r/{channel}?after=0")),
    ]);
    assert!(got.status.success(), "{got:?}");
    assert_eq!(String::from_utf8_lossy(&got.stdout), "event");
}

#[test]
fn rate_limit_says_429_with_retry_after_and_trusts_only_trusted_proxies() {
    let server = Server::start_with(&["--rate-limit", "1/m", "--rate-burst", "2"]);
    assert_eq!(request(server.addr, &get("/status")).status, 200);
    assert_eq!(request(server.addr, &get("/status")).status, 200);
    let got = request(server.addr, &get("/status"));
    assert_eq!(got.status, 429);
    let retry: u64 = got.header("Retry-After").unwrap().parse().unwrap();
    assert!((1..=60).contains(&retry), "{retry}");
    assert_eq!(got.text().lines().count(), 1);
    // A spoofed X-Forwarded-For from an untrusted peer changes nothing.
    let spoofed = with_headers("GET", "/status", &[("X-Forwarded-For", "203.0.113.9")], b"");
    assert_eq!(request(server.addr, &spoofed).status, 429);

    // Behind a trusted proxy, each forwarded client has its own bucket, and
    // a client's own X-Forwarded-For entry on the left is not believed.
    let proxied = Server::start_with(&[
        "--rate-limit",
        "1/m",
        "--rate-burst",
        "1",
        "--trust-proxy",
        "127.0.0.0/8",
    ]);
    let from = |xff: &str| {
        request(
            proxied.addr,
            &with_headers("GET", "/status", &[("X-Forwarded-For", xff)], b""),
        )
        .status
    };
    assert_eq!(from("198.51.100.1"), 200);
    assert_eq!(from("198.51.100.1"), 429);
    assert_eq!(from("1.2.3.4, 198.51.100.1"), 429);
    assert_eq!(from("198.51.100.2"), 200);
    assert!(proxied.counter("rate_limited_total") >= 2);
}

#[test]
fn connections_per_address_are_capped() {
    let server = Server::start_with(&["--max-connections-per-ip", "2"]);
    let mut held: Vec<_> = (0..2)
        .map(|_| {
            let mut c = connect(server.addr);
            send(&mut c, &get("/capped?timeout=30"));
            c
        })
        .collect();
    // Counted when accepted, in order: no need to wait (nor to ask
    // /status, which would count as a connection too).
    let mut third = connect(server.addr);
    let got = read_response(&mut third).unwrap();
    assert_eq!(got.status, 503);
    assert!(got.text().contains("from your address"), "{}", got.text());
    // One leaves: room for another.
    drop(held.pop());
    let deadline = std::time::Instant::now() + *STEP;
    loop {
        let mut c = connect(server.addr);
        send(&mut c, &post("/capped", b"x"));
        let got = read_response(&mut c).unwrap();
        if got.status == 200 {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{}", got.status);
        thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(read_response(&mut held[0]).unwrap().body, b"x");
}

#[test]
fn max_body_refuses_a_declared_length_and_cuts_a_chunked_body() {
    let server = Server::start_with(&["--max-body", "1K"]);
    // Declared too long: 413 before anything, with no consumer at all.
    let got = request(server.addr, &post("/big", &[b'x'; 1025]));
    assert_eq!(got.status, 413);
    assert_eq!(got.text().lines().count(), 1);
    let fits = spawn_curl(&["-f", &server.url("/big")]);
    server.wait_parked(1);
    let sent = request(server.addr, &post("/big", &[b'y'; 1024]));
    assert_eq!(sent.status, 200);
    assert_eq!(finish(fits).stdout.len(), 1024);
    // Chunked past the limit: the consumer's transfer is cut (curl 18),
    // and the producer is told 413, never a 2xx.
    let consumer = spawn_curl(&["-f", &server.url("/big")]);
    server.wait_parked(2);
    let mut producer = connect(server.addr);
    send(
        &mut producer,
        b"POST /big HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n200\r\n",
    );
    producer.write_all(&[b'z'; 512]).unwrap();
    producer.write_all(b"\r\n").unwrap();
    thread::sleep(Duration::from_millis(50));
    producer.write_all(b"400\r\n").unwrap();
    producer.write_all(&[b'z'; 1024]).unwrap();
    let _ = producer.write_all(b"\r\n0\r\n\r\n");
    let got = read_response(&mut producer).unwrap();
    assert_eq!(got.status, 413, "{}", got.text());
    let cut = finish(consumer);
    assert_ne!(cut.status.code(), Some(0), "{cut:?}");
    assert!(cut.stdout.len() <= 1024);
    // Request/responder bodies are capped too.
    let got = request(server.addr, &post("/req/x/y", &[b'x'; 2048]));
    assert_eq!(got.status, 413);
    let mut rest = Vec::new();
    let _ = producer.read_to_end(&mut rest);
}

#[test]
fn access_counters_are_in_status() {
    let server = Server::start();
    let status = server.status();
    for name in [
        "denied_total",
        "bad_credentials_total",
        "rate_limited_total",
        "connections_refused_per_ip_total",
    ] {
        assert_eq!(json_counter(&status, name), 0, "{status}");
    }
}

/// `patchcord fifo`, `listen` and `work` present their token (`--token` or
/// PATCHCORD_TOKEN) as Patch-Token; without it a private channel refuses
/// them, and a listener says so and exits 1.
#[test]
fn client_subcommands_present_their_token() {
    let file = access_file(
        "access-clients",
        r#"
[tokens.tool]
token = "tool-secret"
GET = ["/pubsub/**", "/jobs"]
POST = ["/pubsub/**", "/jobs", "/req/**", "/res/**"]
"#,
    );
    let server = Server::start_with(&["--auth", file.to_str().unwrap()]);
    let dir = temp_dir("access-clients");
    let token = ["-H", "Patch-Token: tool-secret"];
    let run = |args: &[&str], token: Option<&str>| {
        let mut command = command();
        command
            .args(args)
            .env_remove("PATCHCORD_URL")
            .env_remove("PATCHCORD_TOKEN")
            .current_dir(&dir)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped());
        if let Some(token) = token {
            command.env("PATCHCORD_TOKEN", token);
        }
        command.spawn().expect("start patchcord")
    };
    // listen: refused without the token (a final answer: exit 1) ...
    let refused = finish_within(
        run(&["listen", &server.url("/pubsub/news"), "-q"], None),
        *STEP,
    );
    assert_eq!(refused.status.code(), Some(1), "{refused:?}");
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("401"),
        "{refused:?}"
    );
    // ... and served with it, from the environment.
    let mut listener = run(
        &["listen", &server.url("/pubsub/news")],
        Some("tool-secret"),
    );
    server.wait_streams(1);
    let published = curl(
        &[
            &token[..],
            &["-sf", "-d", "extra", &server.url("/pubsub/news")],
        ]
        .concat(),
    );
    assert!(published.status.success(), "{published:?}");
    let mut line = [0u8; 6];
    listener
        .stdout
        .as_mut()
        .unwrap()
        .read_exact(&mut line)
        .expect("the listener prints the message");
    assert_eq!(&line, b"extra\n");
    let _ = listener.kill();
    let _ = listener.wait();
    // work, with --token.
    let mut worker = run(
        &[
            "work",
            &server.url("/res/tool"),
            "--token",
            "tool-secret",
            "--",
            "echo",
            "worked",
        ],
        None,
    );
    let answer = curl(&[&token[..], &["-sf", "-d", "x", &server.url("/req/tool")]].concat());
    assert_eq!(
        String::from_utf8_lossy(&answer.stdout),
        "worked\n",
        "{answer:?}"
    );
    let _ = worker.kill();
    let _ = worker.wait();
    // fifo, from the environment: a line sent by its command.
    let consumer = spawn_curl(&[&token[..], &["-sf", &server.url("/jobs")]].concat());
    server.wait_parked(1);
    let bridge = run(
        &[
            "fifo",
            "./bridge",
            "--server",
            &server.url(""),
            "--send",
            "jobs",
            "--",
            "sh",
            "-c",
            "echo line > \"$PATCHCORD_SEND\"",
        ],
        Some("tool-secret"),
    );
    let bridged = finish_within(bridge, *STEP);
    assert!(bridged.status.success(), "{bridged:?}");
    assert_eq!(String::from_utf8_lossy(&finish(consumer).stdout), "line");
}

#[test]
fn a_responder_may_switch_an_answer_only_to_a_channel_it_may_read() {
    // The service answers its requests, and may read and write its answer
    // channels, but not the jobs queue beside them.
    let file = access_file(
        "switch",
        r#"
[tokens.public]
GET = ["/svc/req/**"]

[tokens.service]
token = "svc-token"
POST = ["/svc/res/**", "/svc/answers/**", "/svc/jobs"]
GET = ["/svc/answers/**"]
"#,
    );
    let server = Server::start_with(&["--auth", file.to_str().unwrap()]);
    let token = [("Patch-Token", "svc-token")];
    let switch = |channel: &str| {
        request(
            server.addr,
            &with_headers(
                "POST",
                "/svc/res/x?switch=true&timeout=0.3",
                &token,
                channel.as_bytes(),
            ),
        )
    };
    // Switching to the jobs queue would let its requester take a job the
    // service may not read: refused before any pairing.
    let refused = switch("jobs");
    assert_eq!(refused.status, 403, "{}", refused.text());
    assert!(
        refused.text().contains("may not receive"),
        "{}",
        refused.text()
    );
    // An answer channel it may read: the switch is taken (408: no requester).
    assert_eq!(switch("answers/1").status, 408);
    // And end to end.
    let requester = {
        let addr = server.addr;
        thread::spawn(move || request(addr, &get("/svc/req/x/page")))
    };
    let switched = request(
        server.addr,
        &with_headers("POST", "/svc/res/x?switch=true", &token, b"answers/2"),
    );
    assert_eq!(switched.status, 200, "{}", switched.text());
    let answered = request(
        server.addr,
        &with_headers("POST", "/svc/answers/2", &token, b"done"),
    );
    assert_eq!(answered.status, 200, "{}", answered.text());
    let got = requester.join().expect("requester");
    assert_eq!((got.status, got.text().as_str()), (200, "done"));
}
