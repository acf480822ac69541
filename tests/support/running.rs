//! A child the test started and owns: a `patchcord listen` or `patchcord
//! work`, a curl, a bash script of clients. It runs in a process group of
//! its own with its output in files, and the whole group is killed and
//! reaped when it is dropped, on every path (a failed assertion included),
//! so a script's background clients never outlive the test.

use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::thread;
use std::time::{Duration, Instant};

/// A started child, killed with its process group when dropped.
pub struct Running {
    child: Child,
    /// How it ended, once it has (and was reaped).
    status: Option<ExitStatus>,
    /// Where its standard output goes.
    pub stdout: PathBuf,
    /// Where its standard error goes.
    pub stderr: PathBuf,
}

impl Running {
    /// Starts `command` in a new process group, with standard input from
    /// /dev/null and its output to `DIR/NAME.out` and `DIR/NAME.err`.
    pub fn start(mut command: Command, dir: &Path, name: &str) -> Running {
        use std::os::unix::process::CommandExt;
        let stdout = dir.join(format!("{name}.out"));
        let stderr = dir.join(format!("{name}.err"));
        let child = command
            .process_group(0)
            .stdin(Stdio::null())
            .stdout(File::create(&stdout).expect("stdout file"))
            .stderr(File::create(&stderr).expect("stderr file"))
            .spawn()
            .unwrap_or_else(|e| panic!("start {name}: {e}"));
        Running {
            child,
            status: None,
            stdout,
            stderr,
        }
    }

    /// `patchcord SUBCOMMAND URL ARGS…` (listen, work) started in `dir`,
    /// without the caller's RUST_LOG, PATCHCORD_URL or PATCHCORD_TOKEN.
    pub fn patchcord(
        subcommand: &str,
        url: &str,
        dir: &Path,
        name: &str,
        args: &[&str],
    ) -> Running {
        let mut command = super::command();
        command
            .arg(subcommand)
            .arg(url)
            .args(args)
            .env_remove("RUST_LOG")
            .env_remove("PATCHCORD_URL")
            .env_remove("PATCHCORD_TOKEN")
            .current_dir(dir);
        Running::start(command, dir, name)
    }

    /// A bash script (`bash -euo pipefail -c`) run in `dir`, with `$PC`
    /// set to `addr` (the relay's `host:port`).
    pub fn bash(addr: std::net::SocketAddr, dir: &Path, name: &str, script: &str) -> Running {
        let mut command = Command::new("bash");
        command
            .args(["-euo", "pipefail", "-c", script])
            .env("PC", addr.to_string())
            .env("TMPDIR", dir)
            .current_dir(dir);
        Running::start(command, dir, name)
    }

    /// Its process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends `signal` to it alone (not to its group).
    pub fn signal(&self, signal: libc::c_int) {
        // SAFETY: kill(2) has no memory effects; the pid is our child's,
        // not yet reaped (a reaped one would have `status`).
        let rc = unsafe { libc::kill(self.child.id() as libc::pid_t, signal) };
        assert_eq!(rc, 0, "kill {}", self.child.id());
    }

    /// Whether it still runs (reaping it if it has ended).
    pub fn running(&mut self) -> bool {
        if self.status.is_none() {
            self.status = self.child.try_wait().expect("try_wait");
        }
        self.status.is_none()
    }

    /// Waits up to `limit` for it to end: how it ended, or None.
    pub fn wait_exit(&mut self, limit: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + limit;
        while self.running() {
            if Instant::now() >= deadline {
                return None;
            }
            thread::sleep(Duration::from_millis(5));
        }
        self.status
    }

    /// Its standard output so far.
    pub fn out(&self) -> Vec<u8> {
        fs::read(&self.stdout).unwrap_or_default()
    }

    /// Its standard output so far, as text.
    pub fn out_text(&self) -> String {
        String::from_utf8_lossy(&self.out()).into_owned()
    }

    /// Its standard error so far, as text.
    pub fn err_text(&self) -> String {
        String::from_utf8_lossy(&fs::read(&self.stderr).unwrap_or_default()).into_owned()
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let pid = self.child.id() as libc::pid_t;
        // SAFETY: kill(2) has no memory effects. While `status` is None the
        // child is not reaped, so its pid is still its own; its group's id
        // (the same number) stays taken while any member lives.
        unsafe {
            if self.status.is_none() {
                libc::kill(pid, libc::SIGKILL);
            }
            // What the group started may outlive its leader.
            libc::kill(-pid, libc::SIGKILL);
        }
        if self.status.is_none() {
            let _ = self.child.wait();
        }
    }
}

/// Polls `done` every few milliseconds until it holds or `limit` has
/// passed; whether it held.
pub fn wait_for(limit: Duration, mut done: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    loop {
        if done() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        thread::sleep(Duration::from_millis(5));
    }
}
