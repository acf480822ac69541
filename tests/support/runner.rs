//! Which emulator runs the binaries built for this target: the
//! `CARGO_TARGET_<TRIPLE>_RUNNER` variable (what `make cross-test` sets) for
//! the ARM target they were built for. Shared by the tests and the bench
//! (through `#[path]`), which both start the server through it.

use std::process::Command;

/// The runner cargo was given for the ARM target this was built for; empty
/// on the machine's own target (a native Pi included).
pub fn cargo_runner() -> String {
    let triple = match (std::env::consts::ARCH, cfg!(target_env = "gnu")) {
        ("arm", true) => "ARMV7_UNKNOWN_LINUX_GNUEABIHF",
        ("aarch64", true) => "AARCH64_UNKNOWN_LINUX_GNU",
        _ => return String::new(),
    };
    std::env::var(format!("CARGO_TARGET_{triple}_RUNNER")).unwrap_or_default()
}

/// A command that runs `binary` through `runner` (a program and its
/// arguments, split on spaces), or directly when `runner` is empty.
pub fn through(runner: &str, binary: &str) -> Command {
    let mut words = runner.split_whitespace();
    match words.next() {
        Some(program) => {
            let mut command = Command::new(program);
            command.args(words).arg(binary);
            command
        }
        None => Command::new(binary),
    }
}
