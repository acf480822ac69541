//! Several relays behind the real HAProxy, configured with
//! `contrib/haproxy.cfg` (only its addresses changed): every request for a
//! channel reaches the same relay, so queue pairs, pubsub cursors,
//! requesters and responders, reply paths and hooks meet across the
//! balancer, the channels spread over the relays, and a relay that dies
//! hands its channels to the others without a 2xx for anything undelivered.
//! Without HAProxy the tests say SKIP and pass; `.ci/run` installs it.

use std::collections::HashSet;
use std::io::Write as _;
use std::net::{SocketAddr, TcpListener};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use crate::support::*;

/// The configuration as shipped.
const HAPROXY_CONF: &str = include_str!("../contrib/haproxy.cfg");
/// The key hook secrets are signed with, the same on every relay.
const KEY: &str = "cluster-test-key-that-is-at-least-32-bytes";

#[test]
fn the_configuration_is_in_the_readme_as_it_is_tested() {
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    assert!(
        readme.contains(&format!("```\n{HAPROXY_CONF}```\n")),
        "the README must show contrib/haproxy.cfg verbatim in a fence"
    );
    for line in [
        "balance hash var(txn.shard)",
        "hash-type consistent",
        "option abortonclose",
        "option httpchk GET /healthz",
        "timeout server 1h",
        "timeout tunnel 1h",
    ] {
        assert!(HAPROXY_CONF.contains(line), "{line}");
    }
}

/// Three relays and HAProxy in front of them.
struct Cluster {
    relays: Vec<Option<Server>>,
    haproxy: Child,
    addr: SocketAddr,
    dir: PathBuf,
}

impl Cluster {
    /// Starts `contrib/haproxy.cfg` over three relays, or None (after a
    /// loud SKIP) without HAProxy.
    fn start(name: &str) -> Option<Cluster> {
        let Some(binary) = haproxy_binary() else {
            static SAID: std::sync::Once = std::sync::Once::new();
            SAID.call_once(|| {
                let _ = std::io::stderr().write_all(
                    b"SKIP: haproxy not installed (.ci/run installs Debian's haproxy): tests/cluster.rs runs no cluster\n",
                );
            });
            return None;
        };
        // The balancer's port first: the relays take double-clutch answers
        // through it (--cluster-url).
        let port = free_port();
        let relays: Vec<Option<Server>> = (1..=3)
            .map(|i| {
                let mut relay = command();
                relay
                    .args(["--listen", "127.0.0.1:0", "--log-level", "debug"])
                    .args(["--shard-tag", &format!("relay{i}")])
                    .args(["--trust-proxy", "127.0.0.1"])
                    .args(["--cluster-url", &format!("http://127.0.0.1:{port}")])
                    .args(["--reply-timeout", "5"])
                    .env("PATCHCORD_SECRET_KEY", KEY);
                Some(Server::start_command(relay))
            })
            .collect();
        let dir = temp_dir(&format!("haproxy-{name}"));
        {
            let mut conf =
                HAPROXY_CONF.replacen("bind :3000", &format!("bind 127.0.0.1:{port}"), 1);
            for (i, relay) in relays.iter().enumerate() {
                let relay = relay.as_ref().expect("started");
                let line = format!("server relay{} 127.0.0.1:{}", i + 1, 3001 + i);
                assert_eq!(conf.matches(&line).count(), 1, "{line:?} once");
                conf = conf.replacen(&line, &format!("server relay{} {}", i + 1, relay.addr), 1);
            }
            let file = dir.join("haproxy.cfg");
            std::fs::write(&file, conf).expect("config");
            let log = std::fs::File::create(dir.join("haproxy.log")).expect("log");
            // -n: fewer connections than the shipped 20,000, which need a
            // descriptor limit that only root may raise.
            let mut haproxy = Command::new(&binary)
                .args(["-db", "-n", "4000", "-f"])
                .arg(&file)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(log)
                .spawn()
                .expect("start haproxy");
            let addr = SocketAddr::from(([127, 0, 0, 1], port));
            assert!(
                answers(&mut haproxy, addr),
                "haproxy did not start: {}",
                std::fs::read_to_string(dir.join("haproxy.log")).unwrap_or_default()
            );
            let cluster = Cluster {
                relays,
                haproxy,
                addr,
                dir,
            };
            cluster.wait_all_up();
            Some(cluster)
        }
    }

    /// Relay `i` (0-based), while it runs.
    fn relay(&self, i: usize) -> &Server {
        self.relays[i].as_ref().expect("running")
    }

    /// Waits until every relay has served a health check.
    fn wait_all_up(&self) {
        let up = wait_for(*STEP, || {
            (0..self.relays.len()).all(|i| self.relay(i).log().contains("/healthz"))
        });
        assert!(up, "not every relay was checked:\n{}", self.haproxy_log());
    }

    fn haproxy_log(&self) -> String {
        std::fs::read_to_string(self.dir.join("haproxy.log")).unwrap_or_default()
    }

    /// Waiters parked on the running relays together.
    fn waiters(&self) -> u64 {
        self.relays
            .iter()
            .flatten()
            .map(|r| r.counter("waiters"))
            .sum()
    }

    /// Pairs made by each relay.
    fn pairs(&self) -> Vec<u64> {
        self.relays
            .iter()
            .map(|r| r.as_ref().map_or(0, |r| r.counter("pairs_total")))
            .collect()
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let _ = self.haproxy.kill();
        let _ = self.haproxy.wait();
        if !thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

fn haproxy_binary() -> Option<PathBuf> {
    installed("haproxy")
}

/// A port of 127.0.0.1 that was free just now.
fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind a free port");
    listener.local_addr().unwrap().port()
}

/// Waits until the HAProxy just started answers at `addr`; false if it
/// exited first.
fn answers(haproxy: &mut Child, addr: SocketAddr) -> bool {
    let deadline = Instant::now() + *STEP;
    while Instant::now() < deadline {
        if haproxy.try_wait().expect("try_wait").is_some() {
            return false;
        }
        if let Ok(mut stream) = std::net::TcpStream::connect(addr) {
            let _ = stream.set_read_timeout(Some(*STEP));
            send(&mut stream, &get("/healthz"));
            if read_response(&mut stream).is_ok() {
                return true;
            }
        }
        thread::sleep(Duration::from_millis(20));
    }
    panic!("haproxy did not answer at {addr}");
}

/// One message from a producer to a consumer on `path`, through `addr`:
/// the consumer's answer (status and body) and the producer's status.
fn exchange(addr: SocketAddr, path: &str, body: &[u8]) -> ((u16, Vec<u8>), u16) {
    let consumer = {
        let (addr, path) = (addr, path.to_owned());
        thread::spawn(move || {
            let got = request(addr, &get(&path));
            (got.status, got.body)
        })
    };
    let sent = request(addr, &post(path, body));
    (consumer.join().expect("consumer"), sent.status)
}

#[test]
fn three_hundred_queue_pairs_meet_on_a_hundred_channels_over_three_relays() {
    let Some(cluster) = Cluster::start("pairs") else {
        return;
    };
    let addr = cluster.addr;
    // Three pairs per channel, all at once.
    let pairs: Vec<_> = (0..300)
        .map(|n| {
            thread::spawn(move || {
                let path = format!("/cluster/jobs/{}", n % 100);
                let body = format!("job {n}").into_bytes();
                let ((status, got), sent) = exchange(addr, &path, &body);
                assert_eq!((status, sent), (200, 200), "{path}");
                (path, got)
            })
        })
        .collect();
    let mut received = HashSet::new();
    for pair in pairs {
        let (path, got) = pair.join().expect("pair");
        let text = String::from_utf8(got).expect("text");
        let n: usize = text.strip_prefix("job ").expect("a job").parse().unwrap();
        assert_eq!(
            format!("/cluster/jobs/{}", n % 100),
            path,
            "a job crossed channels"
        );
        assert!(received.insert(n), "job {n} twice");
    }
    assert_eq!(received.len(), 300);
    let pairs = cluster.pairs();
    assert_eq!(pairs.iter().sum::<u64>(), 300, "{pairs:?}");
    assert!(
        pairs.iter().all(|&p| p > 0),
        "a relay had no channel: {pairs:?}"
    );
}

#[test]
fn a_consumer_that_leaves_through_the_balancer_is_never_handed_a_message() {
    let Some(cluster) = Cluster::start("leaving") else {
        return;
    };
    let addr = cluster.addr;
    for c in 0..6 {
        let path = format!("/cluster/leaving/{c}");
        let mut consumer = connect(addr);
        send(&mut consumer, &get(&path));
        let parked = wait_for(*STEP, || cluster.waiters() == 1);
        assert!(parked, "{path}: the consumer did not park");
        drop(consumer);
        // HAProxy closes the relay's side too (option abortonclose).
        let gone = wait_for(*STEP, || cluster.waiters() == 0);
        assert!(gone, "{path}: the relay never saw its consumer leave");
        let sent = request(addr, &post(&format!("{path}?timeout=0.5"), b"for nobody"));
        assert_eq!(sent.status, 408, "{path}: {}", sent.text());
    }
}

#[test]
fn pubsub_cursor_loops_lose_nothing_across_the_balancer() {
    let Some(cluster) = Cluster::start("pubsub") else {
        return;
    };
    let addr = cluster.addr;
    let mut first = Vec::new();
    for c in 0..10 {
        for i in 0..20 {
            let path = format!("/cluster/pubsub/alerts{c}");
            let published = request(addr, &post(&path, format!("{c}.{i}").as_bytes()));
            assert_eq!(published.status, 200, "{}", published.text());
            if i == 0 {
                first.push(published.patch_id());
            }
        }
    }
    for (c, first) in first.into_iter().enumerate() {
        let path = format!("/cluster/pubsub/alerts{c}");
        let mut after = first - 1;
        for i in 0..20 {
            let got = request(addr, &get(&format!("{path}?after={after}&timeout=2")));
            assert_eq!(got.status, 200, "{path} after {after}: {}", got.text());
            assert_eq!(got.header("patch-missed"), None);
            assert_eq!(got.text(), format!("{c}.{i}"));
            after = got.patch_id();
        }
        let none = request(addr, &get(&format!("{path}?after={after}&timeout=0.2")));
        assert_eq!(none.status, 408, "{path}: nothing more");
    }
    let published: Vec<u64> = (0..3)
        .map(|i| cluster.relay(i).counter("published_total"))
        .collect();
    assert_eq!(published.iter().sum::<u64>(), 200, "{published:?}");
    assert!(
        published.iter().filter(|&&p| p > 0).count() >= 2,
        "{published:?}"
    );
}

#[test]
fn requesters_meet_responders_and_reply_paths_come_back() {
    let Some(cluster) = Cluster::start("reqres") else {
        return;
    };
    let addr = cluster.addr;
    let mut tags = HashSet::new();
    for site in 0..12 {
        // The simple form: the responder's POST body is the answer.
        let responder = thread::spawn(move || {
            request(
                addr,
                &post(&format!("/cluster/s{site}/res/site"), b"simple"),
            )
        });
        let got = request(addr, &get(&format!("/cluster/s{site}/req/site/a.css")));
        assert_eq!((got.status, got.text().as_str()), (200, "simple"));
        assert_eq!(responder.join().expect("responder").status, 200);

        // The reply path, back to the relay that holds the requester.
        let requester =
            thread::spawn(move || request(addr, &get(&format!("/cluster/s{site}/req/site/b.css"))));
        let asked = request(addr, &get(&format!("/cluster/s{site}/res/site")));
        assert_eq!(asked.status, 200, "{}", asked.text());
        assert_eq!(asked.header("patch-path"), Some("/b.css"));
        let reply = asked.header("patch-reply").expect("Patch-Reply").to_owned();
        let tag = reply
            .strip_prefix("/_/reply/")
            .and_then(|rest| rest.split_once('.'))
            .expect("a tagged reply path")
            .0
            .to_owned();
        tags.insert(tag);
        let mut answer = connect(addr);
        send(
            &mut answer,
            format!(
                "POST {reply} HTTP/1.1\r\nHost: t\r\nPatch-Status: 201\r\nContent-Length: 7\r\n\r\nreplied"
            )
            .as_bytes(),
        );
        assert_eq!(read_response(&mut answer).expect("answered").status, 200);
        let got = requester.join().expect("requester");
        assert_eq!((got.status, got.text().as_str()), (201, "replied"));
    }
    assert!(tags.len() >= 2, "all sites on one relay: {tags:?}");
}

#[test]
fn double_clutch_answers_reach_their_requester_on_any_relay() {
    let Some(cluster) = Cluster::start("switch") else {
        return;
    };
    let addr = cluster.addr;
    for site in 0..12 {
        let requester =
            thread::spawn(move || request(addr, &get(&format!("/cluster/d{site}/req/site/page"))));
        // The responder names the answer's channel; the balancer may give
        // it to another relay than the requester's.
        let switched = request(
            addr,
            &post(
                &format!("/cluster/d{site}/res/site?switch=true"),
                format!("answer{site}").as_bytes(),
            ),
        );
        assert_eq!(switched.status, 200, "{}", switched.text());
        assert_eq!(switched.header("patch-path"), Some("/page"));
        let mut answer = connect(addr);
        send(
            &mut answer,
            format!(
                "POST /cluster/d{site}/answer{site} HTTP/1.1\r\nHost: t\r\nPatch-Status: 202\r\nPatch-H-X-Site: {site}\r\nContent-Type: text/plain\r\nContent-Length: 8\r\n\r\nswitched"
            )
            .as_bytes(),
        );
        assert_eq!(read_response(&mut answer).expect("answered").status, 200);
        let got = requester.join().expect("requester");
        assert_eq!(
            (got.status, got.text().as_str()),
            (202, "switched"),
            "site {site}"
        );
        assert_eq!(got.header("x-site"), Some(site.to_string().as_str()));
        assert_eq!(got.header("content-type"), Some("text/plain"));
        assert_eq!(got.header("patch-switched"), None);
    }

    // A requester that leaves takes its claim on the answer with it: the
    // answer finds no one, and is told so (never a 2xx).
    let mut requester = connect(addr);
    send(&mut requester, &get("/cluster/gone/req/site/page"));
    let switched = request(
        addr,
        &post("/cluster/gone/res/site?switch=true", b"gone-answer"),
    );
    assert_eq!(switched.status, 200, "{}", switched.text());
    // Its relay's pull for the answer waits on the answer's relay...
    let waiting = |n: u64| wait_for(*STEP, || cluster.waiters() == n);
    assert!(waiting(1), "the pull never waited");
    drop(requester);
    // ...until the requester leaves, which resets it.
    assert!(waiting(0), "the pull outlived its requester");
    let answer = request(
        addr,
        &post("/cluster/gone/gone-answer?timeout=1", b"nobody"),
    );
    assert_eq!(answer.status, 408, "{}", answer.text());

    // A proof is bound to its channel and its time, and to queue receives.
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let take = |path: &str, proof: &str| {
        let target = format!("{path}?timeout=0.2");
        request(
            addr,
            &with_headers("GET", &target, &[("Patch-Relay", proof)], b""),
        )
        .status
    };
    let valid = proof("/cluster/x/answer", now + 60);
    // Accepted: nothing was sent there, so it waited (408), unrefused.
    assert_eq!(take("/cluster/x/answer", &valid), 408);
    assert_eq!(take("/cluster/x/other", &valid), 403, "another channel");
    assert_eq!(
        take("/cluster/x/answer", &proof("/cluster/x/answer", now - 1)),
        403,
        "expired"
    );
    assert_eq!(take("/cluster/x/answer", "99999999999.00"), 403, "forged");
    let pubsub = proof("/cluster/pubsub/x", now + 60);
    assert_eq!(take("/cluster/pubsub/x", &pubsub), 403, "not a queue");
}

/// A relay's proof for `channel`, valid until Unix second `until`, as the
/// relays make it with their shared key.
fn proof(channel: &str, until: u64) -> String {
    use hmac::{KeyInit, Mac};
    let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(KEY.as_bytes()).unwrap();
    mac.update(format!("relay:{until} {channel}").as_bytes());
    let tag: String = mac
        .finalize()
        .into_bytes()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    format!("{until}.{tag}")
}

#[test]
fn hooks_minted_anywhere_work_everywhere() {
    let Some(cluster) = Cluster::start("hooks") else {
        return;
    };
    let addr = cluster.addr;
    for n in 0..8 {
        let minted = request(addr, &get("/r"));
        assert_eq!(minted.status, 200, "{}", minted.text());
        let text = minted.text();
        let field = |name: &str| -> String {
            text.split(&format!("\"{name}\":\""))
                .nth(1)
                .and_then(|rest| rest.split('"').next())
                .unwrap_or_else(|| panic!("no {name} in {text}"))
                .to_owned()
        };
        let (name, secret) = (field("channel"), field("secret"));
        let sent = request(
            addr,
            &post(&format!("/r/{name}"), format!("event {n}").as_bytes()),
        );
        assert_eq!(sent.status, 200, "{}", sent.text());
        let got = request(
            addr,
            &with_headers(
                "GET",
                &format!("/r/{name}?after=0&timeout=2"),
                &[("Authorization", &format!("Bearer {secret}"))],
                b"",
            ),
        );
        assert_eq!((got.status, got.text()), (200, format!("event {n}")));
        let denied = request(addr, &get(&format!("/r/{name}?after=0&timeout=0.2")));
        assert_eq!(denied.status, 401, "{}", denied.text());
    }
}

#[test]
fn a_dead_relay_hands_its_channels_over_and_nothing_undelivered_got_a_2xx() {
    let Some(mut cluster) = Cluster::start("failover") else {
        return;
    };
    let addr = cluster.addr;
    // Consumers waiting on 30 channels, spread over the relays.
    let (done, finished) = std::sync::mpsc::channel();
    for c in 0..30 {
        let done = done.clone();
        thread::spawn(move || {
            let got = request(addr, &get(&format!("/cluster/failover/{c}")));
            let _ = done.send((c, got.status, got.body));
        });
    }
    let parked = wait_for(*STEP, || cluster.waiters() == 30);
    assert!(parked, "the consumers did not all park");
    let lost = cluster.relay(1).counter("waiters") as usize;
    assert!(lost > 0, "relay2 held no consumer");
    // Traffic on 12 other channels while relay2 dies: every 2xx a sender
    // gets is a message its receiver got.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let traffic: Vec<_> = (0..12)
        .map(|c| {
            let stop = stop.clone();
            thread::spawn(move || {
                let path = format!("/cluster/traffic/{c}?timeout=1");
                let (mut sent, mut got) = (Vec::new(), Vec::new());
                for n in 0..10_000 {
                    if stop.load(std::sync::atomic::Ordering::Relaxed) {
                        break;
                    }
                    let body = format!("{c}.{n}");
                    let ((status, received), sent_status) = exchange(addr, &path, body.as_bytes());
                    if status == 200 {
                        got.push(received);
                    }
                    if sent_status == 200 {
                        sent.push(body.into_bytes());
                    }
                }
                (sent, got)
            })
        })
        .collect();
    thread::sleep(Duration::from_millis(200));
    let _ = cluster.relays[1].take().expect("relay2").kill_9();
    // Relay2's consumers are cut: a 5xx, never a 2xx.
    let mut cut = HashSet::new();
    while cut.len() < lost {
        let (c, status, body) = finished.recv_timeout(*STEP).expect("a cut consumer");
        assert!(status >= 500, "{c}: {status} {body:?}");
        cut.insert(c);
    }
    // Every channel works again once HAProxy has seen relay2 fail: the
    // others' consumers get their message where they wait, relay2's
    // channels meet on the relays left.
    for c in 0..30 {
        let path = format!("/cluster/failover/{c}");
        let body = format!("after {c}");
        if cut.contains(&c) {
            let met = wait_for(*STEP, || {
                let ((status, got), sent) =
                    exchange(addr, &format!("{path}?timeout=1"), body.as_bytes());
                // A 2xx on one side means the other got the message.
                assert_eq!(status == 200, sent == 200, "{path}: {status} / {sent}");
                status == 200 && got == body.as_bytes()
            });
            assert!(met, "{path} never worked again:\n{}", cluster.haproxy_log());
        } else {
            let sent = request(addr, &post(&path, body.as_bytes()));
            assert_eq!(sent.status, 200, "{path}: {}", sent.text());
        }
    }
    for _ in 0..30 - lost {
        let (c, status, body) = finished.recv_timeout(*STEP).expect("a consumer");
        assert!(!cut.contains(&c));
        assert_eq!((status, body), (200, format!("after {c}").into_bytes()));
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut exchanged = 0;
    for channel in traffic {
        let (sent, got) = channel.join().expect("traffic");
        // Every 2xx is a message its receiver got. (The reverse may not
        // hold: a relay killed between writing a message and answering its
        // sender leaves the sender with a 5xx for a delivered message.)
        for message in &sent {
            assert!(got.contains(message), "a 2xx for a message nobody got");
        }
        assert!(got.len() <= sent.len() + 1, "more than the one in flight");
        exchanged += sent.len();
    }
    assert!(exchanged > 0, "no traffic went through");
}

#[test]
fn the_cluster_demo_runs_three_relays_behind_haproxy() {
    if haproxy_binary().is_none() {
        eprintln!("SKIP: haproxy not installed: make cluster-demo not run");
        return;
    }
    if is_emulated() {
        eprintln!("SKIP: make cluster-demo runs the binary itself, not under the emulator");
        return;
    }
    // Four ports in a row, free just now, below the kernel's ephemeral
    // range (32768 and up), where the other tests' connections are not.
    let start = 20_000 + (std::process::id() % 1000) * 12;
    let port = (0..200u32)
        .map(|k| u16::try_from(start + (k * 52) % 12_000).expect("a port"))
        .find(|&p| (0..=3).all(|i| TcpListener::bind(("127.0.0.1", p + i)).is_ok()))
        .expect("four free ports in a row");
    let mut demo = Command::new("bash")
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/contrib/cluster-demo.sh"
        ))
        .env("PORT", port.to_string())
        .env("BIN", env!("CARGO_BIN_EXE_patchcord"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start the demo");
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let up = wait_for(*STEP, || {
        std::net::TcpStream::connect(addr).is_ok()
            && (1..=3).all(|i| std::net::TcpStream::connect(("127.0.0.1", port + i)).is_ok())
    });
    assert!(up, "the demo did not start");
    let up = wait_for(*STEP, || {
        let ((status, _), sent) = exchange(addr, "/demo/jobs?timeout=1", b"hello");
        status == 200 && sent == 200
    });
    assert!(up, "no pair through the demo's balancer");
    // SIGTERM: the demo stops what it started.
    // SAFETY: kill(2) on our own child's pid has no memory effects.
    unsafe { libc::kill(demo.id() as libc::pid_t, libc::SIGTERM) };
    assert!(
        wait_child(&mut demo, *STEP).is_some(),
        "the demo did not stop"
    );
    let stopped = wait_for(*STEP, || std::net::TcpStream::connect(addr).is_err());
    assert!(stopped, "HAProxy outlived the demo");
}

/// The README's nginx equivalent of the shard key, as tested below.
const NGINX_SHARDING: &str = r#"map $uri $patchcord_shard {
    "~^(?<ns>(/[^/]*)*?)/(req|res)/(?<id>[^/]+)" $ns/res/$id;
    default $uri;
}
upstream patchcord_relays {
    hash $patchcord_shard consistent;
    server 127.0.0.1:3001 max_fails=2 fail_timeout=5s;
    server 127.0.0.1:3002 max_fails=2 fail_timeout=5s;
    server 127.0.0.1:3003 max_fails=2 fail_timeout=5s;
}
"#;

#[test]
fn nginx_can_shard_by_the_same_key() {
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    assert!(
        readme.contains(&format!("```nginx\n{NGINX_SHARDING}```\n")),
        "the README must show the nginx sharding as tested"
    );
    let Some(nginx) = installed("nginx") else {
        eprintln!("SKIP: nginx not installed (.ci/run installs it): its sharding not run");
        return;
    };
    let relays: Vec<Server> = (0..3).map(|_| Server::start()).collect();
    let dir = temp_dir("nginx-shard");
    let port = free_port();
    let mut upstream = NGINX_SHARDING.to_owned();
    for (i, relay) in relays.iter().enumerate() {
        let line = format!("server 127.0.0.1:{} ", 3001 + i);
        upstream = upstream.replacen(&line, &format!("server {} ", relay.addr), 1);
    }
    let d = dir.display();
    let conf = format!(
        "daemon off;
master_process off;
pid {d}/nginx.pid;
error_log {d}/error.log warn;
events {{ worker_connections 512; }}
http {{
    access_log off;
    client_body_temp_path {d}/client_body;
    proxy_temp_path {d}/proxy;
    fastcgi_temp_path {d}/fastcgi;
    uwsgi_temp_path {d}/uwsgi;
    scgi_temp_path {d}/scgi;
{upstream}
    server {{
        listen 127.0.0.1:{port};
        merge_slashes off;
        location / {{
            proxy_pass http://patchcord_relays;
            proxy_http_version 1.1;
            proxy_set_header Connection \"\";
            proxy_buffering off;
            proxy_request_buffering off;
            proxy_read_timeout 1h;
        }}
    }}
}}
"
    );
    std::fs::write(dir.join("nginx.conf"), conf).expect("config");
    let mut child = Command::new(nginx)
        .arg("-p")
        .arg(&dir)
        .arg("-c")
        .arg(dir.join("nginx.conf"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start nginx");
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let up = wait_for(*STEP, || std::net::TcpStream::connect(addr).is_ok());
    let log = || std::fs::read_to_string(dir.join("error.log")).unwrap_or_default();
    assert!(up, "nginx did not start: {}", log());
    for site in 0..12 {
        let responder = thread::spawn(move || {
            request(addr, &post(&format!("/nginx/s{site}/res/site"), b"simple"))
        });
        let got = request(addr, &get(&format!("/nginx/s{site}/req/site/a.css")));
        assert_eq!(
            (got.status, got.text().as_str()),
            (200, "simple"),
            "{}",
            log()
        );
        assert_eq!(responder.join().expect("responder").status, 200);
    }
    for c in 0..30 {
        let ((status, got), sent) = exchange(addr, &format!("/nginx/jobs/{c}"), b"job");
        assert_eq!((status, got.as_slice(), sent), (200, &b"job"[..], 200));
    }
    let pairs: Vec<u64> = relays.iter().map(|r| r.counter("pairs_total")).collect();
    assert_eq!(pairs.iter().sum::<u64>(), 42, "{pairs:?}");
    assert!(pairs.iter().filter(|&&p| p > 0).count() >= 2, "{pairs:?}");
    let _ = child.kill();
    let _ = child.wait();
}

#[test]
fn a_silent_balancer_gets_a_requester_504_not_an_endless_wait() {
    // A "balancer" that takes connections and never answers.
    let silent = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = silent.local_addr().unwrap().port();
    let held = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    {
        let held = held.clone();
        thread::spawn(move || {
            for stream in silent.incoming().take(4).flatten() {
                held.lock().unwrap().push(stream);
            }
        });
    }
    let mut relay = command();
    relay
        .args(["--listen", "127.0.0.1:0", "--log-level", "debug"])
        .args(["--cluster-url", &format!("http://127.0.0.1:{port}")])
        .args(["--reply-timeout", "1"])
        .env("PATCHCORD_SECRET_KEY", KEY);
    let server = Server::start_command(relay);
    let addr = server.addr;
    let requester = thread::spawn(move || request(addr, &get("/silent/req/x/page")));
    let switched = request(addr, &post("/silent/res/x?switch=true", b"answer"));
    assert_eq!(switched.status, 200, "{}", switched.text());
    let started = Instant::now();
    let got = requester.join().expect("requester");
    assert_eq!(got.status, 504, "{}", got.text());
    assert!(got.text().contains("--reply-timeout"), "{}", got.text());
    // It asked the balancer, which held the request.
    assert!(
        !held.lock().unwrap().is_empty(),
        "the balancer was never asked"
    );
    let _ = started;
}
