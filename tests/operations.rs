//! What an operator sees, through the real binary: `/healthz`, `/metrics`
//! (checked against the text format's rules, and by Prometheus's own
//! `promtool` where it is installed), `/status` and `/_/channels` with
//! parked waiters and under access control, the page without JavaScript,
//! the icon and `robots.txt`.

use std::collections::HashSet;
use std::io::Write;
use std::process::{Command, Stdio};

use crate::support::*;

/// Checks `text` against the Prometheus text format (0.0.4): every sample
/// belongs to a family announced once by `# HELP` and `# TYPE` before its
/// samples, names and labels are well formed, values are numbers, no
/// series appears twice; returns each series with its value.
fn parse_exposition(text: &str) -> Vec<(String, f64)> {
    let name_ok = |n: &str| {
        !n.is_empty()
            && n.chars()
                .next()
                .is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || c == ':')
            && n.chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
    };
    let mut helped = HashSet::new();
    let mut typed = HashSet::new();
    let mut current: Option<String> = None;
    let mut series = HashSet::new();
    let mut samples = Vec::new();
    assert!(text.ends_with('\n'), "the exposition ends with a newline");
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# ") {
            let mut words = rest.splitn(3, ' ');
            let (kind, name) = (words.next().unwrap(), words.next().unwrap_or(""));
            assert!(name_ok(name), "bad name in {line:?}");
            match kind {
                "HELP" => assert!(helped.insert(name.to_owned()), "HELP twice: {line}"),
                "TYPE" => {
                    assert!(typed.insert(name.to_owned()), "TYPE twice: {line}");
                    let t = words.next().unwrap_or("");
                    assert!(
                        ["counter", "gauge", "histogram", "summary", "untyped"].contains(&t),
                        "{line}"
                    );
                    if t == "counter" {
                        assert!(name.ends_with("_total"), "a counter ends in _total: {name}");
                    }
                    current = Some(name.to_owned());
                }
                _ => panic!("unknown comment {line:?}"),
            }
            continue;
        }
        assert!(!line.is_empty(), "empty line in the exposition");
        let (key, value) = line.rsplit_once(' ').unwrap_or_else(|| panic!("{line:?}"));
        let name = key.split('{').next().unwrap();
        assert!(name_ok(name), "bad metric name {line:?}");
        // A histogram's samples are its name with _bucket, _sum or _count.
        let family = current
            .as_deref()
            .filter(|family| {
                ["_bucket", "_sum", "_count"]
                    .iter()
                    .any(|suffix| name.strip_prefix(family) == Some(suffix))
            })
            .unwrap_or(name);
        assert_eq!(
            current.as_deref(),
            Some(family),
            "sample outside its family: {line:?}"
        );
        if let Some(labels) = key.strip_prefix(name) {
            if !labels.is_empty() {
                let inner = labels
                    .strip_prefix('{')
                    .and_then(|l| l.strip_suffix('}'))
                    .unwrap_or_else(|| panic!("{line:?}"));
                for pair in inner.split(',') {
                    let (label, quoted) = pair.split_once('=').unwrap_or_else(|| panic!("{line}"));
                    assert!(name_ok(label) && !label.starts_with("__"), "{line}");
                    assert!(
                        quoted.len() >= 2 && quoted.starts_with('"') && quoted.ends_with('"'),
                        "{line}"
                    );
                }
            }
        }
        let value: f64 = value
            .parse()
            .unwrap_or_else(|_| panic!("bad value {line:?}"));
        assert!(series.insert(key.to_owned()), "duplicate series {key}");
        samples.push((key.to_owned(), value));
    }
    assert_eq!(helped, typed, "every family has HELP and TYPE");
    samples
}

/// The value of `series` in an exposition.
fn metric(samples: &[(String, f64)], series: &str) -> f64 {
    samples
        .iter()
        .find(|(k, _)| k == series)
        .unwrap_or_else(|| panic!("no {series}"))
        .1
}

fn scrape(server: &Server) -> String {
    let got = request(server.addr, &get("/metrics"));
    assert_eq!(got.status, 200, "{}", got.text());
    assert_eq!(
        got.header("Content-Type"),
        Some("text/plain; version=0.0.4; charset=utf-8")
    );
    got.text()
}

#[test]
fn metrics_follow_the_text_format_and_move_with_an_exchange() {
    let server = Server::start();
    let before = parse_exposition(&scrape(&server));
    assert_eq!(metric(&before, "patchcord_pairs_total"), 0.0);
    let mut consumer = connect(server.addr);
    send(&mut consumer, &get("/metrics-test"));
    server.wait_parked(1);
    let parked = parse_exposition(&scrape(&server));
    assert_eq!(metric(&parked, "patchcord_waiters{mode=\"queue\"}"), 1.0);
    let sent = request(server.addr, &post("/metrics-test", b"twelve bytes"));
    assert_eq!(sent.status, 200);
    assert_eq!(read_response(&mut consumer).unwrap().body, b"twelve bytes");
    server.wait_counter("pairs_total", 1);
    let text = scrape(&server);
    let after = parse_exposition(&text);
    assert_eq!(metric(&after, "patchcord_pairs_total"), 1.0);
    assert_eq!(metric(&after, "patchcord_relayed_bytes_total"), 12.0);
    assert_eq!(metric(&after, "patchcord_waiters{mode=\"queue\"}"), 0.0);
    assert!(
        metric(
            &after,
            "patchcord_requests_total{kind=\"queue\",class=\"2xx\"}"
        ) >= 2.0
    );
    assert!(metric(&after, "process_resident_memory_bytes") > 1e6);
    assert!(metric(&after, "process_threads") >= 2.0);
    assert!(metric(&after, "process_open_fds") >= 3.0);
    let start = metric(&after, "process_start_time_seconds");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    assert!(
        (now - 600.0..=now + 1.0).contains(&start),
        "{start} vs {now}"
    );
    promtool_check(&text);
}

#[test]
fn the_store_figures_follow_the_text_format() {
    let dir = temp_dir("metrics-store");
    let file = dir.join("pubsub.db");
    let server = Server::start_with(&["--store", file.to_str().unwrap()]);
    for body in ["one", "two", "three"] {
        let published = request(server.addr, &post("/pubsub/metrics", body.as_bytes()));
        assert_eq!(published.status, 200, "{}", published.text());
    }
    let text = scrape(&server);
    let figures = parse_exposition(&text);
    assert_eq!(metric(&figures, "patchcord_store_rows"), 3.0);
    assert!(metric(&figures, "patchcord_store_bytes") > 4096.0);
    assert_eq!(metric(&figures, "patchcord_store_failures_total"), 0.0);
    let commits = metric(&figures, "patchcord_store_commit_seconds_count");
    assert!((1.0..=3.0).contains(&commits), "{commits} commits");
    assert_eq!(
        metric(
            &figures,
            "patchcord_store_commit_seconds_bucket{le=\"+Inf\"}"
        ),
        commits
    );
    assert!(metric(&figures, "patchcord_store_commit_seconds_sum") > 0.0);
    assert!(server.status().contains("\"store\":{\"bytes\":"));
    promtool_check(&text);
    // Without --store there is no store family.
    let plain = Server::start();
    assert!(!scrape(&plain).contains("patchcord_store"));
    assert!(!plain.status().contains("\"store\""));
}

/// `promtool check metrics`, Prometheus's own linter, when it is installed
/// (`.ci/run` installs Debian's prometheus package); says so loudly if not.
fn promtool_check(text: &str) {
    let Ok(mut child) = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
    else {
        eprintln!(
            "SKIP promtool: not installed (Debian package prometheus); the format rules were checked here"
        );
        return;
    };
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let output = finish(child);
    assert!(
        output.status.success() && output.stdout.is_empty() && output.stderr.is_empty(),
        "promtool: {output:?}"
    );
}

#[test]
fn a_metrics_token_protects_the_metrics() {
    let server = Server::start_with(&["--metrics-token", "scrape-me"]);
    let got = request(server.addr, &get("/metrics"));
    assert_eq!(got.status, 401);
    assert!(got.header("WWW-Authenticate").is_some());
    let wrong = with_headers("GET", "/metrics", &[("Authorization", "Bearer nope")], b"");
    assert_eq!(request(server.addr, &wrong).status, 401);
    let right = with_headers(
        "GET",
        "/metrics",
        &[("Authorization", "Bearer scrape-me")],
        b"",
    );
    let got = request(server.addr, &right);
    assert_eq!(got.status, 200);
    parse_exposition(&got.text());
    assert!(!server.log().contains("scrape-me"));
}

#[test]
fn healthz_is_ok_and_503_while_stopping() {
    let mut server = Server::start();
    let got = request(server.addr, &get("/healthz"));
    assert_eq!((got.status, got.text().as_str()), (200, "ok\n"));
    // A transfer in flight keeps the relay in its stopping grace.
    let mut consumer = connect(server.addr);
    send(&mut consumer, &get("/slow"));
    server.wait_parked(1);
    let mut producer = connect(server.addr);
    send(
        &mut producer,
        b"POST /slow HTTP/1.1\r\nHost: t\r\nContent-Length: 100\r\n\r\nfirst",
    );
    server.wait_counter("busy", 2);
    // Connected (and served by a thread) before the stop, so that the
    // question is answered within the grace even where accepting is slow.
    let mut asker = connect(server.addr);
    server.wait_counter("open", 4);
    server.signal(libc::SIGTERM);
    server.wait_log("stopping", 1);
    send(&mut asker, &get("/healthz"));
    let got = read_response(&mut asker).expect("an answer within the grace");
    assert_eq!(got.status, 503, "{}", got.text());
    assert!(server.wait_exit(*STEP).is_some());
}

#[test]
fn status_and_channels_show_parked_waiters_shortened_by_default() {
    let server = Server::start();
    let status = server.status();
    assert!(json_counter(&status, "threads") >= 2, "{status}");
    let mut consumer = connect(server.addr);
    send(&mut consumer, &get("/u/alice/queue/3f9a0c7e"));
    let mut responder = connect(server.addr);
    send(&mut responder, &post("/u/bob/res/site", b"page"));
    let mut subscriber = connect(server.addr);
    send(&mut subscriber, &get("/pubsub/alerts?format=sse"));
    server.wait_parked(2);
    server.wait_streams(1);
    let got = request(server.addr, &get("/_/channels"));
    assert_eq!(got.status, 200);
    assert_eq!(got.header("Content-Type"), Some("application/json"));
    let listing = got.text();
    let value: serde_json::Value = serde_json::from_str(&listing).expect("JSON");
    assert_eq!(value["names"], "shortened");
    let channels = value["channels"].as_array().unwrap();
    let find = |name: &str| {
        channels
            .iter()
            .find(|c| c["channel"] == name)
            .unwrap_or_else(|| panic!("{name} in {listing}"))
    };
    let queue = find("/u/alice/queue/3f9a…");
    assert_eq!(
        (queue["mode"].as_str(), queue["consumers"].as_u64()),
        (Some("queue"), Some(1))
    );
    let pair = find("/u/bob/res/site");
    assert_eq!(
        (pair["mode"].as_str(), pair["responders"].as_u64()),
        (Some("reqres"), Some(1))
    );
    let feed = find("/pubsub/aler…");
    assert_eq!(feed["subscribers"].as_u64(), Some(1));
    assert!(!listing.contains("3f9a0c7e"));
    assert!(json_counter(&server.status(), "waiters") >= 2);
    // Served, the channel is gone from the list.
    assert_eq!(
        request(server.addr, &post("/u/alice/queue/3f9a0c7e", b"x")).status,
        200
    );
    assert_eq!(read_response(&mut consumer).unwrap().body, b"x");
    let listing = request(server.addr, &get("/_/channels")).text();
    assert!(!listing.contains("/u/alice"), "{listing}");

    let whole = Server::start_with(&["--list-channels"]);
    let mut consumer = connect(whole.addr);
    send(&mut consumer, &get("/u/alice/queue/3f9a0c7e"));
    whole.wait_parked(1);
    let listing = request(whole.addr, &get("/_/channels")).text();
    assert!(listing.contains("\"/u/alice/queue/3f9a0c7e\""), "{listing}");
    assert!(listing.contains("\"names\":\"whole\""), "{listing}");
}

#[test]
fn with_access_control_a_caller_sees_only_what_it_may_get() {
    let dir = temp_dir("ops-auth");
    let file = dir.join("access.toml");
    std::fs::write(
        &file,
        "[tokens.public]\nGET = [\"/public/**\"]\n\n[tokens.alice]\ntoken = \"alice-t\"\n\"*\" = [\"/u/alice/**\", \"/public/**\"]\n\n[tokens.admin]\ntoken = \"admin-t\"\n\"*\" = [\"/**\"]\n",
    )
    .unwrap();
    let server = Server::start_with(&["--auth", file.to_str().unwrap()]);
    let park = |path: &str| {
        let mut c = connect(server.addr);
        send(
            &mut c,
            &with_headers("GET", path, &[("Patch-Token", "admin-t")], b""),
        );
        c
    };
    let _waiters = [
        park("/public/news"),
        park("/u/alice/inbox"),
        park("/u/bob/inbox"),
    ];
    server.wait_parked(3);
    let list = |headers: &[(&str, &str)]| {
        let got = request(
            server.addr,
            &with_headers("GET", "/_/channels", headers, b""),
        );
        assert_eq!(got.status, 200);
        got.text()
    };
    let public = list(&[]);
    assert!(public.contains("\"/public/news\""), "{public}");
    assert!(!public.contains("/u/"), "{public}");
    let alice = list(&[("Patch-Token", "alice-t")]);
    assert!(alice.contains("\"/u/alice/inbox\"") && alice.contains("/public/news"));
    assert!(!alice.contains("/u/bob"), "{alice}");
    let admin = list(&[("Authorization", "Bearer admin-t")]);
    assert!(admin.contains("\"/u/bob/inbox\""), "{admin}");
    // An unknown token sees nothing.
    let nobody = list(&[("Patch-Token", "guess")]);
    assert!(nobody.contains("\"channels\":[]"), "{nobody}");
    // The page follows the same rule.
    let page = request(server.addr, &get("/")).text();
    assert!(
        page.contains("/public/news") && !page.contains("/u/alice"),
        "{page}"
    );
}

#[test]
fn the_page_works_without_javascript_and_escapes_what_clients_send() {
    let server = Server::start_with(&["--list-channels"]);
    let mut consumer = connect(server.addr);
    send(&mut consumer, &get("/a%3Cb%3E%22c"));
    server.wait_parked(1);
    let page = curl(&["-sf", "-H", "Host: pi.local:3000", &server.url("/")]);
    assert!(page.status.success(), "{page:?}");
    let html = String::from_utf8_lossy(&page.stdout).into_owned();
    assert!(html.starts_with("<!doctype html>"), "{html}");
    assert!(html.contains("/a&lt;b&gt;&quot;c"), "the channel, escaped");
    assert!(!html.contains("/a<b>"));
    assert!(html.contains("curl -d hello <span class=\"origin\">http://pi.local:3000</span>/jobs"));
    // A Host that is no host name is not shown at all.
    let odd = request(
        server.addr,
        b"GET / HTTP/1.1\r\nHost: x\"><script>alert(1)</script>\r\n\r\n",
    );
    assert_eq!(odd.status, 200);
    assert!(!odd.text().contains("<script>alert"), "{}", odd.text());
    let policy = odd.header("Content-Security-Policy").unwrap_or("");
    assert!(policy.contains("default-src 'none'"), "{policy}");
    // The icon and robots.txt are answered, never parked as channels.
    let icon = request(server.addr, &get("/favicon.ico"));
    assert_eq!(icon.status, 200);
    assert_eq!(icon.header("Content-Type"), Some("image/x-icon"));
    assert_eq!(&icon.body[..4], &[0, 0, 1, 0]);
    let robots = request(server.addr, &get("/robots.txt"));
    assert_eq!(robots.text(), "User-agent: *\nDisallow: /\n");
    assert_eq!(json_counter(&server.status(), "waiters"), 1);
    drop(consumer);
}
