//! Channel → FIFO, strictly: the next message is asked for only when a
//! reader has `DIR/recv` open and the previous message was read out whole.
//! At most one message is outside the relay. A reader that leaves while
//! the request waits withdraws it (nothing is taken); a reader that leaves
//! half-way through a message leaves it whole for the next reader.

use std::fs::File;
use std::io::{self, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::Path;
use std::time::Duration;

use super::{Shared, Spooled, backoff};
use crate::client::{Client, Outcome};
use crate::sys;

/// How often a message written to the FIFO is checked for being read out:
/// first after 50 µs (a reader in a loop takes it at once), then twice as
/// long each time, up to every 10 ms (a reader that takes its time).
const DRAIN_FIRST: Duration = Duration::from_micros(50);
const DRAIN_MOST: Duration = Duration::from_millis(10);

/// What came of serving one reader.
enum Served {
    /// The reader left; wait for the next.
    ReaderLeft,
    /// Stopping.
    Stopped,
}

pub fn run(shared: &Shared, mut client: Client, channel: &str, fifo: &Path) {
    let target = client.relay().target(channel);
    // The message fetched and not yet read out whole: framed, ready to write.
    let mut pending: Option<Vec<u8>> = None;
    // The write end the last reader had, kept (empty) until the next reader
    // is in: a reader that opens the FIFO just as the last one leaves finds
    // a writer there, where closing this would give it an end of file.
    let mut held: Option<File> = None;
    while !shared.stop.is_raised() {
        // The FIFO the path leads to now, held (O_PATH: no reader or
        // writer) so that the supervisor can open this very one to release
        // the wait below: at stop, or when the path was deleted and the
        // watchdog made a new FIFO that readers open instead.
        let inode = match sys::open(fifo, libc::O_PATH) {
            Ok(inode) if inode.metadata().is_ok_and(|m| m.file_type().is_fifo()) => inode,
            // Deleted, or a file written in its place: the watchdog makes
            // it again (moving such a file aside) within a second.
            Ok(_) => {
                shared.stop.sleep(Duration::from_millis(100));
                continue;
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                shared.stop.sleep(Duration::from_millis(100));
                continue;
            }
            Err(e) => {
                log::warn!("recv: cannot open {}: {e}", fifo.display());
                shared.stop.sleep(Duration::from_secs(1));
                continue;
            }
        };
        // Kept for a FIFO that is no longer at the path, it helps no reader.
        if held.as_ref().is_some_and(|h| !same_file(h, &inode)) {
            held = None;
        }
        if !shared.recv_waiting(Some(inode.as_raw_fd())) {
            break;
        }
        // The watchdog may have made the FIFO again between the open above
        // and the registration, and found nothing to release: look again.
        let still_there = sys::open(fifo, libc::O_PATH)
            .ok()
            .is_some_and(|now| same_file(&now, &inode));
        if !still_there {
            shared.recv_waiting(None);
            continue;
        }
        // Blocks until a reader opens the FIFO (at once if one has).
        let opened = sys::open(&sys::reopen_path(inode.as_raw_fd()), libc::O_WRONLY);
        shared.recv_waiting(None);
        drop(inode);
        let out = match opened {
            Ok(out) => out,
            Err(e) => {
                log::warn!("recv: cannot open {}: {e}", fifo.display());
                shared.stop.sleep(Duration::from_secs(1));
                continue;
            }
        };
        held = None;
        if shared.stop.is_raised() {
            break;
        }
        if sys::set_nonblocking(out.as_raw_fd(), true).is_err() {
            continue;
        }
        match serve(shared, &mut client, &target, &out, &mut pending) {
            // Bytes left unread are the start of a message the next reader
            // gets whole: they go when no descriptor holds the pipe. With
            // none, the write end is kept for the next reader.
            Served::ReaderLeft => {
                if sys::unread(out.as_raw_fd()).is_ok_and(|n| n == 0) {
                    held = Some(out);
                }
            }
            Served::Stopped => break,
        }
    }
    if let Some(message) = pending {
        shared.spool(Spooled::new(unframe(shared, message), ""));
    }
}

/// Whether two descriptors refer to the same file.
fn same_file(a: &File, b: &File) -> bool {
    match (a.metadata(), b.metadata()) {
        (Ok(a), Ok(b)) => (a.dev(), a.ino()) == (b.dev(), b.ino()),
        _ => false,
    }
}

/// Serves the reader of `out` until it leaves or the bridge stops.
fn serve(
    shared: &Shared,
    client: &mut Client,
    target: &str,
    out: &File,
    pending: &mut Option<Vec<u8>>,
) -> Served {
    let fd = out.as_raw_fd();
    let mut backoff = backoff();
    loop {
        if pending.is_none() {
            // A reader that already left gets no request made for it.
            match sys::poll(&[(fd, 0)], Some(Duration::ZERO)) {
                Ok(ready) if !ready[0].error => {}
                _ => return Served::ReaderLeft,
            }
            // The request waits while the reader stays; if it leaves (POLLERR
            // on the write end, even with no events asked) or we stop, the
            // request is withdrawn and nothing is taken.
            let watch = [(shared.stop.fd(), libc::POLLIN), (fd, 0)];
            match client.request("GET", target, None, &watch, shared.max) {
                Outcome::Answered(r) if r.status == 200 && r.oversized => {
                    shared.dropped(r.body.len().max(shared.max + 1), "recv");
                    continue;
                }
                Outcome::Answered(r) if r.status == 200 => {
                    backoff.reset();
                    *pending = Some(frame(shared, r.body));
                }
                // Nobody sent within the relay's wait: ask again.
                Outcome::Answered(r) if r.status == 408 => continue,
                Outcome::Answered(r) => {
                    if backoff.failures() == 0 {
                        log::warn!(
                            "recv: the relay answered {} ({}); trying again",
                            r.status,
                            String::from_utf8_lossy(&r.body).trim()
                        );
                    }
                    if backoff.sleep(&shared.stop) {
                        return Served::Stopped;
                    }
                    continue;
                }
                Outcome::Withdrawn { watch: 0, .. } => return Served::Stopped,
                Outcome::Withdrawn { .. } => return Served::ReaderLeft,
                Outcome::Failed(e) => {
                    if backoff.failures() == 0 {
                        log::warn!("recv: cannot reach the relay ({e}); trying again");
                    }
                    if backoff.sleep(&shared.stop) {
                        return Served::Stopped;
                    }
                    continue;
                }
            }
        }
        let message = pending.as_ref().expect("a message");
        match write_all(shared, out, message) {
            Ok(true) => {}
            // The reader left before it had all of it: the kernel drops
            // what it did not read when we close; the next reader gets it whole.
            Ok(false) | Err(_) => return Served::ReaderLeft,
        }
        match drained(shared, fd) {
            Drained::Yes => {
                *pending = None;
                shared.count_received();
            }
            Drained::ReaderLeft => return Served::ReaderLeft,
            Drained::Stopped => return Served::Stopped,
        }
    }
}

/// Writes all of `bytes` to the FIFO; false if the reader left first.
fn write_all(shared: &Shared, mut out: &File, bytes: &[u8]) -> io::Result<bool> {
    let mut written = 0;
    while written < bytes.len() {
        match out.write(&bytes[written..]) {
            Ok(n) => written += n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                let fds = [
                    (out.as_raw_fd(), libc::POLLOUT),
                    (shared.abort.fd(), libc::POLLIN),
                ];
                let ready = sys::poll(&fds, None)?;
                if ready[1].readable {
                    return Ok(false);
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if e.kind() == io::ErrorKind::BrokenPipe => return Ok(false),
            Err(e) => return Err(e),
        }
    }
    Ok(true)
}

enum Drained {
    Yes,
    ReaderLeft,
    Stopped,
}

/// Waits until the reader has read everything written (FIONREAD is 0).
/// Once stopping, the reader has until the drain deadline (abort).
fn drained(shared: &Shared, fd: i32) -> Drained {
    let mut wait = DRAIN_FIRST;
    loop {
        match sys::unread(fd) {
            Ok(0) => return Drained::Yes,
            Ok(_) => {}
            Err(_) => return Drained::ReaderLeft,
        }
        let fds = [(fd, 0), (shared.abort.fd(), libc::POLLIN)];
        let Ok(ready) = sys::poll(&fds, Some(wait)) else {
            return Drained::ReaderLeft;
        };
        wait = (wait * 2).min(DRAIN_MOST);
        if ready[0].error {
            // A reader that read everything and left at once also shows
            // POLLERR: what is unread decides.
            return match sys::unread(fd) {
                Ok(0) => Drained::Yes,
                _ => Drained::ReaderLeft,
            };
        }
        if ready[1].readable {
            return Drained::Stopped;
        }
    }
}

/// A body as a line: one trailing delimiter dropped, one added. A newline
/// inside a message passes through, with a warning (use -z for such).
fn frame(shared: &Shared, mut body: Vec<u8>) -> Vec<u8> {
    let delim = shared.delim;
    if body.last() == Some(&delim) {
        body.pop();
    }
    if body.contains(&delim) {
        log::warn!(
            "recv: a message of {} bytes holds a {} inside: its reader sees it as several (use -z)",
            body.len(),
            if delim == b'\n' { "newline" } else { "NUL" }
        );
    }
    body.push(delim);
    body
}

/// The message of a framed line, for the spool.
fn unframe(shared: &Shared, mut line: Vec<u8>) -> Vec<u8> {
    if line.last() == Some(&shared.delim) {
        line.pop();
    }
    line
}
