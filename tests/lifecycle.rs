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

/// Starts `command` and returns the address it printed, or its stderr if
/// it exited instead.
fn listening_line(mut command: std::process::Command) -> Result<String, String> {
    let output = command
        .env_remove("RUST_LOG")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("start patchcord");
    let mut server = output;
    let mut line = String::new();
    let stdout = server.stdout.take().expect("stdout");
    let read = std::thread::spawn(move || {
        let _ = std::io::BufRead::read_line(&mut std::io::BufReader::new(stdout), &mut line);
        line
    });
    let deadline = Instant::now() + *STEP;
    while !read.is_finished() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
    let _ = server.kill();
    let output = server.wait_with_output().expect("wait");
    let line = read.join().unwrap_or_default();
    if line.starts_with("listening on http://") {
        Ok(line.trim().to_owned())
    } else {
        Err(String::from_utf8_lossy(&output.stderr).into_owned())
    }
}

#[test]
fn options_work_before_and_after_serve() {
    for args in [
        &["-q", "--listen", "127.0.0.1:0", "serve"][..],
        &["--listen", "127.0.0.1:0", "serve", "-q"],
        &["serve", "--listen", "127.0.0.1:0"],
    ] {
        let mut command = command();
        command.args(args);
        assert!(listening_line(command).is_ok(), "{args:?}");
    }
}

#[test]
fn a_given_address_keeps_its_port_whatever_port_says() {
    let mut command = command();
    command.args(["--listen", "127.0.0.1:0"]).env("PORT", "9");
    let line = listening_line(command).expect("started");
    assert!(!line.ends_with(":9"), "{line}");
}

#[test]
fn bad_settings_say_what_is_wrong_and_exit_2() {
    for (args, says) in [
        (&["--timeout", "-1"][..], "cannot be negative"),
        (&["--log-level", "loud"], "possible values"),
        (
            &["--listen", "no-such-host.invalid:80"],
            "cannot resolve host",
        ),
        (&["--listen", "localhost"], "HOST:PORT"),
        (&["--idle-timeout", "0"], "more than 0"),
    ] {
        let output = command().args(args).output().unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(stderr.contains(says), "{args:?}: {stderr}");
        if says != "possible values" {
            // patchcord's own checks: one line, naming the setting.
            assert!(stderr.starts_with("patchcord: --"), "{args:?}: {stderr}");
            assert_eq!(stderr.lines().count(), 1, "{args:?}: {stderr}");
        }
    }
}

/// A consumer whose response the producer wrote sleeps until its client's
/// next request; it is not counted as busy meanwhile, so shutdown does not
/// wait for it.
#[test]
fn an_idle_keep_alive_consumer_is_not_busy_and_shutdown_is_prompt() {
    let mut server = Server::start();
    let mut consumer = connect(server.addr);
    send(&mut consumer, &get("/idle-after"));
    server.wait_parked(1);
    let producer = request(server.addr, &post("/idle-after", b"done"));
    assert_eq!(producer.status, 200);
    assert_eq!(read_response(&mut consumer).unwrap().text(), "done");
    // Only the request that reads /status stays in progress (the
    // producer's thread may still be finishing when its client has read
    // its answer).
    let deadline = Instant::now() + *STEP;
    loop {
        let status = server.status();
        if json_counter(&status, "busy") == 1 {
            break;
        }
        assert!(Instant::now() < deadline, "{status}");
        std::thread::sleep(Duration::from_millis(10));
    }
    let started = Instant::now();
    server.signal(libc::SIGTERM);
    let exited = server
        .wait_exit(patience(Duration::from_secs(2)))
        .expect("exited within 2 s");
    assert!(exited.success());
    assert!(started.elapsed() < patience(Duration::from_secs(2)));
    // The consumer's connection is closed with the process.
    let mut rest = Vec::new();
    let _ = std::io::Read::read_to_end(&mut consumer, &mut rest);
}
