//! A user's CMD as a child process, for `listen` and `work`: the
//! environment that carries a message's or a request's headers, starting
//! it in its own process group (so that a timeout kills whatever it
//! started, and a terminal's Ctrl-C reaches only patchcord, which lets it
//! finish) and so that it gets SIGTERM if patchcord dies (a worker killed
//! with -9 leaves no job running for nobody), and saying how it ended.
//! What goes into its stdin and what is done with its output is the
//! caller's.

use std::ffi::{OsStr, OsString};
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::process::{Child, Command, ExitStatus, Stdio};

/// The prefix of the variables that carry headers.
pub const HEADER_PREFIX: &str = "PATCHCORD_H_";

/// The variable that carries header `name`: `PATCHCORD_H_` and the name in
/// upper case, every byte other than a letter or a digit made `_`
/// (`X-Job` → `PATCHCORD_H_X_JOB`).
pub fn header_variable(name: &str) -> String {
    let mut variable = String::with_capacity(HEADER_PREFIX.len() + name.len());
    variable.push_str(HEADER_PREFIX);
    variable.extend(name.bytes().map(|b| {
        if b.is_ascii_alphanumeric() {
            char::from(b.to_ascii_uppercase())
        } else {
            '_'
        }
    }));
    variable
}

/// A value for the environment (NUL, which no header holds, is dropped).
pub fn value(bytes: &[u8]) -> OsString {
    let kept: Vec<u8> = bytes.iter().copied().filter(|&b| b != 0).collect();
    OsStr::from_bytes(&kept).to_owned()
}

/// Starts `argv` with `env` added (and no inherited `PATCHCORD_H_*`, nor
/// the token patchcord presents, `PATCHCORD_TOKEN`), in a
/// process group of its own, with piped stdin, and stdout and stderr
/// piped when asked (else inherited).
pub fn spawn(
    argv: &[OsString],
    env: &[(String, OsString)],
    pipe_output: bool,
) -> io::Result<Child> {
    let (program, args) = argv
        .split_first()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "no command"))?;
    let mut command = Command::new(program);
    command.args(args).stdin(Stdio::piped()).process_group(0);
    let parent = std::process::id() as libc::pid_t;
    // SAFETY: between fork and exec only async-signal-safe calls are made
    // (prctl, getppid, _exit), and no memory is allocated or shared.
    unsafe {
        command.pre_exec(move || {
            // The signal comes when the thread that started CMD ends: the
            // caller waits for CMD on that thread.
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM, 0, 0, 0) != 0 {
                return Err(io::Error::last_os_error());
            }
            if libc::getppid() != parent {
                libc::_exit(1);
            }
            Ok(())
        });
    }
    for (name, _) in std::env::vars_os() {
        if name.as_bytes().starts_with(HEADER_PREFIX.as_bytes()) || name == "PATCHCORD_TOKEN" {
            command.env_remove(name);
        }
    }
    command.envs(env.iter().map(|(k, v)| (k, v)));
    if pipe_output {
        command.stdout(Stdio::piped()).stderr(Stdio::piped());
    }
    command.spawn()
}

/// Sends SIGKILL to the process group `child` leads.
pub fn kill_group(child_pid: u32) {
    // SAFETY: kill(2) with a negative pid signals the process group our
    // child leads (it was started with process_group(0)); no memory passed.
    unsafe { libc::kill(-(child_pid as libc::pid_t), libc::SIGKILL) };
}

/// How a child ended, in words: `exit status 3`, `killed by signal 9`.
pub fn describe(status: ExitStatus) -> String {
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exit status {code}"),
        (None, Some(signal)) => format!("killed by signal {signal}"),
        (None, None) => "ended".to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_names_become_variables() {
        assert_eq!(header_variable("Title"), "PATCHCORD_H_TITLE");
        assert_eq!(header_variable("X-Job"), "PATCHCORD_H_X_JOB");
        assert_eq!(header_variable("a.b~c"), "PATCHCORD_H_A_B_C");
    }

    #[test]
    fn a_child_runs_in_its_own_group_with_the_variables() {
        let env = vec![(header_variable("X-Job"), value(b"7\0"))];
        let argv = [
            "sh",
            "-c",
            "test \"$PATCHCORD_H_X_JOB\" = 7 && test $(ps -o pgid= $$) = $$",
        ]
        .map(OsString::from);
        let mut child = spawn(&argv, &env, false).expect("spawns");
        drop(child.stdin.take());
        let status = child.wait().expect("waits");
        assert!(status.success(), "{}", describe(status));
    }
}
