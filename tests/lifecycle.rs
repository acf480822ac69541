//! The process: signals, exit status, command line.

use std::time::{Duration, Instant};

use crate::support::*;

#[test]
fn sigterm_answers_waiters_503_and_exits_0_within_2_s() {
    let mut server = Server::start();
    let mut waiters = Vec::new();
    for i in 0..3 {
        let mut stream = connect(server.addr);
        let raw = if i == 0 {
            post("/w", b"x")
        } else {
            get(&format!("/w{i}"))
        };
        send(&mut stream, &raw);
        waiters.push(stream);
    }
    server.wait_parked(3);
    let started = Instant::now();
    server.signal(libc::SIGTERM);
    for mut waiter in waiters {
        assert_eq!(read_response(&mut waiter).unwrap().status, 503);
    }
    let status = server
        .wait_exit(patience(Duration::from_secs(2)))
        .expect("exited within 2 s");
    assert!(status.success(), "{status:?}");
    assert!(started.elapsed() < patience(Duration::from_secs(2)));
}

#[test]
fn sigint_on_an_idle_server_exits_0() {
    let mut server = Server::start();
    server.signal(libc::SIGINT);
    let status = server
        .wait_exit(patience(Duration::from_secs(2)))
        .expect("exited within 2 s");
    assert_eq!(status.code(), Some(0));
}

#[test]
fn usage_errors_exit_2_and_bind_errors_exit_1() {
    let usage = command().arg("--no-such-flag").output().unwrap();
    assert_eq!(usage.status.code(), Some(2));
    let bad = command().args(["--timeout=-3"]).output().unwrap();
    assert_eq!(bad.status.code(), Some(2));
    let server = Server::start();
    let taken = command()
        .args(["--listen", &server.addr.to_string()])
        .output()
        .unwrap();
    assert_eq!(taken.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&taken.stderr).contains("patchcord: cannot listen on"));
}

#[test]
fn help_and_version_name_the_flags() {
    let output = command().arg("--help").output().unwrap();
    let help = String::from_utf8_lossy(&output.stdout);
    for flag in [
        "--listen",
        "--port",
        "--timeout",
        "--max-connections",
        "--header-timeout",
        "--idle-timeout",
        "PATCHCORD_LISTEN",
    ] {
        assert!(help.contains(flag), "--help lacks {flag}");
    }
    let version = command().arg("--version").output().unwrap();
    assert!(String::from_utf8_lossy(&version.stdout).starts_with("patchcord "));
}
