//! The pubsub store (`--store FILE`): what a publisher got its 200 for is
//! served again after a `kill -9` and a restart on the same file, cursors
//! (`?after=`, `Last-Event-ID`, `patchcord listen`) carry on exactly once,
//! retention trims the file, and a file the relay cannot use, or a disk
//! that fills up, gets the documented answer.

use std::collections::HashMap;
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::thread;
use std::time::Duration;

use crate::support::*;

/// A relay on `file` (and `addr`, or a free port), with `args`.
fn start(file: &Path, addr: Option<SocketAddr>, args: &[&str]) -> Server {
    let mut relay = command();
    let listen = addr.map_or("127.0.0.1:0".to_owned(), |a| a.to_string());
    relay
        .args(["--listen", &listen, "--log-level", "debug", "--store"])
        .arg(file)
        .args(args);
    Server::start_command(relay)
}

/// Publishes `body` on `path` over `stream` (keep-alive): the answer.
fn publish_on(stream: &mut TcpStream, path: &str, body: &[u8]) -> Response {
    send(stream, &post(path, body));
    read_response(stream).expect("publish answered")
}

/// Publishes on a connection of its own: the id.
fn publish(server: &Server, path: &str, body: &[u8]) -> u64 {
    let answer = publish_on(&mut connect(server.addr), path, body);
    assert_eq!(answer.status, 200, "{}", answer.text());
    answer.patch_id()
}

/// Deletes channel `path` (and those under it).
fn delete(server: &Server, path: &str) {
    let raw = format!("DELETE {path} HTTP/1.1\r\nHost: t\r\n\r\n");
    let deleted = request(server.addr, raw.as_bytes());
    assert_eq!(deleted.status, 200, "{}", deleted.text());
}

/// One cursor-loop step: the message after `after` (its id and body), or
/// None when nothing comes within a short wait.
fn next_after(server: &Server, path: &str, after: u64) -> Option<(u64, Vec<u8>)> {
    let got = request(
        server.addr,
        &get(&format!("{path}?after={after}&timeout=0.3")),
    );
    match got.status {
        200 => {
            assert_eq!(got.header("patch-missed"), None, "{path} after {after}");
            Some((got.patch_id(), got.body))
        }
        408 => None,
        other => panic!("{path} after {after}: {other} {}", got.text()),
    }
}

/// A cursor loop from `after` until nothing more comes: every message, in order.
fn drain(server: &Server, path: &str, mut after: u64) -> Vec<(u64, Vec<u8>)> {
    let mut got = Vec::new();
    for _ in 0..10_000 {
        match next_after(server, path, after) {
            Some((id, body)) => {
                assert!(id > after, "{path}: id {id} after cursor {after}");
                after = id;
                got.push((id, body));
            }
            None => return got,
        }
    }
    panic!("{path}: the cursor loop never ended");
}

/// Figure `name` of the `store` object in `/status`.
fn store_figure(server: &Server, name: &str) -> u64 {
    let status = server.status();
    let store = status
        .split_once("\"store\":{")
        .unwrap_or_else(|| panic!("no store in {status}"))
        .1;
    json_counter(store.split('}').next().unwrap(), name)
}

/// The store file in a fresh directory.
fn store_file(name: &str) -> (PathBuf, PathBuf) {
    let dir = temp_dir(name);
    let file = dir.join("pubsub.db");
    (dir, file)
}

#[test]
fn a_killed_relay_serves_every_acknowledged_message_again() {
    let (_dir, file) = store_file("store-kill");
    let server = start(&file, None, &["--pubsub-retain-count", "200"]);
    // 1,000 messages on 10 channels, from 10 publishers at once.
    let publishers: Vec<_> = (0..10)
        .map(|c| {
            let addr = server.addr;
            thread::spawn(move || {
                let mut stream = connect(addr);
                let path = format!("/pubsub/kill/{c}");
                (0..100)
                    .map(|i| {
                        let body = format!("c{c} m{i}").into_bytes();
                        let answer = publish_on(&mut stream, &path, &body);
                        assert_eq!(answer.status, 200, "{}", answer.text());
                        (answer.patch_id(), body)
                    })
                    .collect::<Vec<_>>()
            })
        })
        .collect();
    let sent: Vec<Vec<(u64, Vec<u8>)>> = publishers
        .into_iter()
        .map(|p| p.join().expect("publisher"))
        .collect();
    // Each channel's subscriber has read the first 40 with its cursor loop.
    let mut cursors = HashMap::new();
    for (c, messages) in sent.iter().enumerate() {
        let path = format!("/pubsub/kill/{c}");
        let mut after = messages[0].0 - 1;
        for expected in &messages[..40] {
            let got = next_after(&server, &path, after).expect("a retained message");
            assert_eq!(&got, expected);
            after = got.0;
        }
        cursors.insert(c, after);
    }

    let addr = server.kill_9();
    let server = start(&file, Some(addr), &["--pubsub-retain-count", "200"]);
    server.wait_log("1000 messages on 10 channels", 1);
    for (c, messages) in sent.iter().enumerate() {
        let path = format!("/pubsub/kill/{c}");
        let got = drain(&server, &path, cursors[&c]);
        assert_eq!(got, messages[40..], "{path} after the restart");
    }
    // A channel's new messages continue above every id it gave before the
    // crash, and a cursor from before it sees each exactly once.
    let path = "/pubsub/kill/3";
    let last = sent[3].last().unwrap().0;
    let fresh = publish(&server, path, b"after the crash");
    assert_eq!(fresh, last + 1, "ids stay consecutive within a channel");
    assert_eq!(
        drain(&server, path, last),
        [(fresh, b"after the crash".to_vec())]
    );
    assert_eq!(store_figure(&server, "rows"), 1001);
}

#[test]
fn last_event_id_resumes_a_stream_across_a_restart() {
    let (_dir, file) = store_file("store-sse");
    let server = start(&file, None, &["--store-sync", "full"]);
    let ids: Vec<u64> = (1..=5)
        .map(|i| publish(&server, "/pubsub/sse", format!("e{i}").as_bytes()))
        .collect();
    let mut stream = connect(server.addr);
    send(
        &mut stream,
        format!(
            "GET /pubsub/sse?after={} HTTP/1.1\r\nHost: t\r\nAccept: text/event-stream\r\n\r\n",
            ids[0] - 1
        )
        .as_bytes(),
    );
    let (head, mut events) = Chunks::start(stream);
    assert_eq!(head.status, 200);
    let seen = String::from_utf8_lossy(&events.until(b"\n\n", 3)).into_owned();
    assert!(seen.contains(&format!("id: {}\n", ids[2])), "{seen}");

    let addr = server.kill_9();
    let server = start(&file, Some(addr), &["--store-sync", "full"]);
    let fresh = publish(&server, "/pubsub/sse", b"e6");
    // What EventSource sends when it reconnects: the same URL, and the last id.
    let mut stream = connect(server.addr);
    send(
        &mut stream,
        format!(
            "GET /pubsub/sse?after={} HTTP/1.1\r\nHost: t\r\nAccept: text/event-stream\r\nLast-Event-ID: {}\r\n\r\n",
            ids[0] - 1,
            ids[2]
        )
        .as_bytes(),
    );
    let (head, mut events) = Chunks::start(stream);
    assert_eq!(head.status, 200);
    let resumed = String::from_utf8_lossy(&events.until(b"\n\n", 3)).into_owned();
    let expected = format!(
        "id: {}\ndata: e4\n\nid: {}\ndata: e5\n\nid: {fresh}\ndata: e6\n\n",
        ids[3], ids[4]
    );
    assert!(resumed.contains(&expected), "{resumed}");
    assert!(!resumed.contains("missed"), "{resumed}");
}

#[test]
fn listen_carries_on_across_a_kill_without_a_gap() {
    let (dir, file) = store_file("store-listen");
    let server = start(&file, None, &[]);
    let url = server.url("/pubsub/alerts");
    let listener = Running::patchcord(
        "listen",
        &url,
        &dir,
        "listen",
        &["--on-missed", "echo \"$PATCHCORD_MISSED\" >> missed"],
    );
    server.wait_streams(1);
    for body in ["a1", "a2", "a3"] {
        publish(&server, "/pubsub/alerts", body.as_bytes());
    }
    let printed = |n: usize| {
        let done = wait_for(*STEP * 4, || {
            std::fs::read_to_string(&listener.stdout)
                .unwrap_or_default()
                .lines()
                .count()
                >= n
        });
        assert!(done, "{n} lines never came:\n{}", listener.err_text());
    };
    printed(3);

    let addr = server.kill_9();
    let server = start(&file, Some(addr), &[]);
    // Published before the listener is back: the store kept them for it.
    for body in ["b1", "b2"] {
        publish(&server, "/pubsub/alerts", body.as_bytes());
    }
    printed(5);
    server.wait_streams(1);
    publish(&server, "/pubsub/alerts", b"b3");
    printed(6);
    let out = std::fs::read_to_string(&listener.stdout).expect("out");
    assert_eq!(out, "a1\na2\na3\nb1\nb2\nb3\n");
    let err = listener.err_text();
    assert!(!err.contains("missed"), "{err}");
    assert!(!dir.join("missed").exists(), "{err}");
}

#[test]
fn retention_and_deletion_leave_the_file_too() {
    let (_dir, file) = store_file("store-trim");
    let mut server = start(&file, None, &["--pubsub-retain-count", "10"]);
    let body = pattern(4096, 7);
    let mut stream = connect(server.addr);
    for _ in 0..2000 {
        assert_eq!(publish_on(&mut stream, "/pubsub/trim", &body).status, 200);
    }
    // Evicted rows leave the file with the next commit: the last message's
    // eviction is still to go.
    assert_eq!(store_figure(&server, "rows"), 11);
    publish(&server, "/pubsub/gone", b"deleted soon");
    assert_eq!(store_figure(&server, "rows"), 11);
    // A DELETE commits at once, with what else left memory.
    delete(&server, "/pubsub/gone");
    assert_eq!(store_figure(&server, "rows"), 10);
    server.signal(libc::SIGTERM);
    server.wait_exit(*STEP).expect("stopped");
    // 8 MB went through; the file holds 40 KB of messages and little free space.
    let size = std::fs::metadata(&file).expect("store").len();
    assert!(size < 2 << 20, "the store is {size} bytes");
    assert!(!Path::new(&format!("{}-wal", file.display())).exists());

    // A shorter age at the next start: the old messages go at once.
    let args = ["--pubsub-retain-count", "10", "--pubsub-retain-secs", "1"];
    thread::sleep(Duration::from_millis(1100));
    let server = start(&file, None, &args);
    assert_eq!(drain(&server, "/pubsub/trim", 0), []);
    assert_eq!(drain(&server, "/pubsub/gone", 0), []);
    let kept = publish(&server, "/pubsub/trim", b"the last");
    assert_eq!(store_figure(&server, "rows"), 1);
    drop(server);
    let server = start(&file, None, &args);
    assert_eq!(
        drain(&server, "/pubsub/trim", 0),
        [(kept, b"the last".to_vec())]
    );
}

#[test]
fn a_deleted_channel_gives_its_space_back() {
    let (_dir, file) = store_file("store-vacuum");
    let args = [
        "--pubsub-retain-count",
        "2000",
        "--pubsub-retain-bytes",
        "16M",
    ];
    let mut server = start(&file, None, &args);
    let body = pattern(4096, 11);
    let mut stream = connect(server.addr);
    for _ in 0..1000 {
        assert_eq!(publish_on(&mut stream, "/pubsub/big", &body).status, 200);
    }
    server.signal(libc::SIGTERM);
    server.wait_exit(*STEP).expect("stopped");
    let full = std::fs::metadata(&file).expect("store").len();
    assert!(full > 4 << 20, "the store is {full} bytes");

    let mut server = start(&file, None, &args);
    delete(&server, "/pubsub/big");
    assert_eq!(store_figure(&server, "rows"), 0);
    server.signal(libc::SIGTERM);
    server.wait_exit(*STEP).expect("stopped");
    let emptied = std::fs::metadata(&file).expect("store").len();
    assert!(emptied < 1 << 20, "{full} bytes, then {emptied}");
}

/// Starts a relay on `file` that must refuse it: its stderr.
fn refused(file: &Path, configure: impl FnOnce(&mut Command)) -> String {
    let mut relay = command();
    relay
        .args(["--listen", "127.0.0.1:0", "--store"])
        .arg(file)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    configure(&mut relay);
    let mut child = relay.spawn().expect("start patchcord");
    let status = wait_child(&mut child, *STEP).expect("the relay stopped by itself");
    let out = child.wait_with_output().expect("output");
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(status.code(), Some(1), "{stderr}");
    assert!(out.stdout.is_empty(), "it listened: {stderr}");
    assert!(stderr.contains(&file.display().to_string()), "{stderr}");
    stderr
}

#[test]
fn a_file_that_is_not_a_usable_store_stops_the_relay() {
    let (dir, file) = store_file("store-refused");
    std::fs::write(&file, "# my notes\n".repeat(200)).expect("write");
    let said = refused(&file, |_| {});
    assert!(said.contains("not a patchcord store"), "{said}");
    assert_eq!(
        std::fs::read_to_string(&file).expect("kept"),
        "# my notes\n".repeat(200),
        "the file was changed"
    );

    // A store whose pages were damaged.
    let damaged = dir.join("damaged.db");
    let mut server = start(&damaged, None, &[]);
    for i in 0..300 {
        publish(&server, &format!("/pubsub/d{}", i % 7), &pattern(900, i));
    }
    server.signal(libc::SIGTERM);
    server.wait_exit(*STEP).expect("stopped");
    let mut bytes = std::fs::read(&damaged).expect("store");
    assert!(bytes.len() > 16 * 4096, "{} bytes", bytes.len());
    for byte in &mut bytes[4 * 4096..12 * 4096] {
        *byte ^= 0x5a;
    }
    std::fs::write(&damaged, &bytes).expect("damage");
    let said = refused(&damaged, |_| {});
    assert!(said.contains("is damaged"), "{said}");

    // A store the relay may not write.
    let locked = dir.join("locked.db");
    let server = start(&locked, None, &[]);
    publish(&server, "/pubsub/x", b"kept");
    let mut server = server;
    server.signal(libc::SIGTERM);
    server.wait_exit(*STEP).expect("stopped");
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(&locked, std::fs::Permissions::from_mode(0o444)).expect("chmod");
    let said = refused(&locked, |relay| {
        // root writes any file: run the relay as nobody, as a service user.
        if unsafe { libc::geteuid() } == 0 {
            use std::os::unix::process::CommandExt as _;
            relay.uid(65534).gid(65534);
        }
    });
    assert!(said.contains("read-only"), "{said}");
}

#[test]
fn a_full_disk_answers_507_and_memory_keeps_serving() {
    let (dir, _) = store_file("store-full");
    let disk = dir.join("disk");
    std::fs::create_dir_all(&disk).expect("mount point");
    let mounted = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=1m", "patchcord-test"])
        .arg(&disk)
        .output();
    match mounted {
        Ok(out) if out.status.success() => {}
        other => {
            eprintln!(
                "\n*** SKIPPED a_full_disk_answers_507_and_memory_keeps_serving: it mounts a \
                 1 MiB tmpfs, which needs root (CI runs as root): {other:?}\n"
            );
            return;
        }
    }
    struct Unmount(PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg(&self.0).status();
        }
    }
    let _unmount = Unmount(disk.clone());
    let file = disk.join("pubsub.db");
    let mut server = start(&file, None, &["--pubsub-retain-count", "1000"]);
    // Something else fills the disk but for 256 KiB.
    let filler = disk.join("filler");
    std::fs::write(&filler, vec![0u8; 768 * 1024]).expect("filler");
    let body = pattern(16 * 1024, 3);
    let mut ids = Vec::new();
    let mut stream = connect(server.addr);
    let refusal = (0..200)
        .find_map(|_| {
            let answer = publish_on(&mut stream, "/pubsub/full", &body);
            if answer.status == 200 {
                ids.push(answer.patch_id());
                None
            } else {
                Some(answer)
            }
        })
        .expect("the 1 MiB disk filled up");
    assert_eq!(refusal.status, 507, "{}", refusal.text());
    assert!(
        refusal.text().contains("disk is full"),
        "{}",
        refusal.text()
    );
    assert!(ids.len() >= 3, "only {} messages fitted", ids.len());
    // Memory still serves every message that was acknowledged, in order.
    let got = drain(&server, "/pubsub/full", ids[0] - 1);
    assert_eq!(got.iter().map(|(id, _)| *id).collect::<Vec<_>>(), ids);
    // Every failure is counted; the log says it once per 10 s.
    for _ in 0..3 {
        let again = publish_on(&mut stream, "/pubsub/full", &body);
        assert_eq!(again.status, 507, "{}", again.text());
    }
    assert_eq!(store_figure(&server, "failed_total"), 4);
    assert_eq!(server.log_count("not published"), 1, "{}", server.log());
    server.assert_serving();
    // Room again: publishing works again, with the next id, none skipped.
    std::fs::remove_file(&filler).expect("room again");
    let answer = publish_on(&mut stream, "/pubsub/full", b"room again");
    assert_eq!(answer.status, 200, "{}", answer.text());
    assert_eq!(answer.patch_id(), ids.last().unwrap() + 1);
    server.signal(libc::SIGTERM);
    server.wait_exit(*STEP).expect("stopped");
}
