//! FIFO → channel: each line written to `DIR/send` is sent to the channel,
//! one request at a time, in order. The FIFO is not read while a send is
//! in flight, so with no receiver the pipe fills and writers block: the
//! relay's backpressure reaches the script. A line ends only at its
//! delimiter; bytes without one wait for the rest.

use std::fs::File;
use std::io::{self, Read};
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use crossbeam_channel::Receiver;

use super::{Shared, Spooled, backoff};
use crate::client::{Client, Outcome};

/// How long unterminated bytes wait before a warning says so.
const PARTIAL_WARNING: Duration = Duration::from_secs(1);

/// The pump's state: the FIFOs it reads and the bytes not yet sent.
struct Pump<'s> {
    shared: &'s Shared,
    client: Client,
    target: String,
    /// The FIFOs read: the first, and one made again after a deletion
    /// (its old writers may still be writing to the old one).
    fifos: Vec<File>,
    /// Bytes read and not yet sent: complete lines, then a partial one.
    buf: Vec<u8>,
    /// Dropping the rest of a line over the limit, up to its delimiter.
    discarding: bool,
    /// When unterminated bytes were last added, and whether that was said.
    partial_since: Option<Instant>,
    warned: bool,
    /// A send was cut short after its request went out: it may have arrived.
    cut: bool,
}

/// Runs the pump until stop, then sends what was written before stop until
/// the drain deadline (the abort flag); what is left goes to the spool.
pub fn run(shared: &Shared, client: Client, channel: &str, first: File, more: Receiver<File>) {
    let target = client.relay().target(channel);
    let mut pump = Pump {
        shared,
        client,
        target,
        fifos: vec![first],
        buf: Vec::new(),
        discarding: false,
        partial_since: None,
        warned: false,
        cut: false,
    };
    while !shared.stop.is_raised() {
        while let Ok(fifo) = more.try_recv() {
            pump.fifos.push(fifo);
            // Old writers had a second to leave; keep two at most.
            if pump.fifos.len() > 2 {
                pump.fifos.remove(0);
            }
        }
        let mut fds: Vec<_> = pump
            .fifos
            .iter()
            .map(|f| (f.as_raw_fd(), libc::POLLIN))
            .collect();
        fds.push((shared.stop.fd(), libc::POLLIN));
        let Ok(ready) = super::sys::poll(&fds, Some(PARTIAL_WARNING)) else {
            break;
        };
        if ready[..pump.fifos.len()].iter().any(|r| r.readable) {
            pump.read_available(true);
        }
        if !pump.send_lines() {
            break;
        }
        pump.warn_partial();
    }
    // Stopping: what is in the pipe now was written before; send it too
    // (or, past the deadline, spool it).
    // A writer that still holds the FIFO may add more while we send: read
    // again until nothing new comes, so nothing it wrote is dropped unseen.
    loop {
        if !pump.send_lines() {
            pump.spool_lines();
            break;
        }
        if pump.read_available(false) == 0 {
            break;
        }
    }
    // Last, right before the FIFOs close: bytes written meanwhile.
    pump.read_available(false);
    pump.fifos.clear();
    pump.spool_lines();
    pump.spool_partial();
}

impl Pump<'_> {
    /// Reads what the FIFOs hold now, without waiting, up to about a
    /// message and a pipe's worth; with `enough_for_one`, only until a
    /// whole line is here (the rest waits in the pipe, where it holds its
    /// writers back: the bridge keeps at most a read's worth of its own).
    fn read_available(&mut self, enough_for_one: bool) -> usize {
        let mut chunk = vec![0u8; 64 * 1024];
        let cap = self.shared.max + chunk.len();
        let mut read = 0;
        for i in 0..self.fifos.len() {
            while self.buf.len() < cap && !(enough_for_one && self.has_line()) {
                match self.fifos[i].read(&mut chunk) {
                    Ok(0) => break,
                    Ok(n) => {
                        read += n;
                        self.take(&chunk[..n]);
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(_) => break,
                }
            }
        }
        read
    }

    /// Adds bytes read; a line growing past the limit is dropped, up to its
    /// delimiter.
    fn take(&mut self, bytes: &[u8]) {
        let delim = self.shared.delim;
        let mut bytes = bytes;
        if self.discarding {
            match bytes.iter().position(|&b| b == delim) {
                Some(at) => {
                    self.discarding = false;
                    bytes = &bytes[at + 1..];
                }
                None => return,
            }
        }
        self.buf.extend_from_slice(bytes);
        let start = self.partial_start();
        if self.buf.len() - start > self.shared.max {
            self.shared.dropped(self.buf.len() - start, "send");
            self.buf.truncate(start);
            self.discarding = true;
        }
        self.partial_since = (self.buf.len() > self.partial_start()).then(Instant::now);
        self.warned = false;
    }

    /// Whether `buf` holds a whole line.
    fn has_line(&self) -> bool {
        self.buf.contains(&self.shared.delim)
    }

    /// Where the unterminated rest of `buf` starts.
    fn partial_start(&self) -> usize {
        let delim = self.shared.delim;
        self.buf
            .iter()
            .rposition(|&b| b == delim)
            .map_or(0, |at| at + 1)
    }

    /// Sends every complete line; false if the abort flag cut a send short
    /// (that line and the rest are still in `buf`).
    fn send_lines(&mut self) -> bool {
        let delim = self.shared.delim;
        while let Some(at) = self.buf.iter().position(|&b| b == delim) {
            let line = self.buf[..at].to_vec();
            if line.len() > self.shared.max {
                self.shared.dropped(line.len(), "send");
            } else if !self.send(&line) {
                return false;
            }
            self.buf.drain(..=at);
        }
        true
    }

    /// Sends one line until it is delivered (2xx), refused for good (4xx:
    /// dropped and logged), or the abort flag says stop trying.
    fn send(&mut self, line: &[u8]) -> bool {
        let abort = [(self.shared.abort.fd(), libc::POLLIN)];
        let mut backoff = backoff();
        // Said once per kind of trouble in a row, not once per try.
        let mut said = "";
        loop {
            if self.shared.abort.is_raised() {
                return false;
            }
            match self
                .client
                .request("POST", &self.target, Some(line), &abort, 64 * 1024)
            {
                Outcome::Answered(r) if (200..300).contains(&r.status) => {
                    self.shared.count_sent();
                    return true;
                }
                // Nobody came within the relay's wait: offer it again.
                Outcome::Answered(r) if r.status == 408 => backoff.reset(),
                Outcome::Answered(r) if (400..500).contains(&r.status) => {
                    log::warn!(
                        "send: the relay refused a message of {} bytes ({} {}); dropped",
                        line.len(),
                        r.status,
                        String::from_utf8_lossy(&r.body).trim()
                    );
                    self.shared.count_dropped();
                    return true;
                }
                Outcome::Answered(r) => {
                    if said != "status" {
                        log::warn!("send: the relay answered {}; trying again", r.status);
                        said = "status";
                    }
                    if backoff.sleep(&self.shared.abort) {
                        return false;
                    }
                }
                Outcome::Withdrawn { sure, .. } => {
                    self.cut = !sure;
                    return false;
                }
                Outcome::Failed(e) => {
                    if said != "unreachable" {
                        log::warn!("send: cannot reach the relay ({e}); trying again");
                        said = "unreachable";
                    }
                    if backoff.sleep(&self.shared.abort) {
                        return false;
                    }
                }
            }
        }
    }

    /// Says once when unterminated bytes have waited a while.
    fn warn_partial(&mut self) {
        if let Some(since) = self.partial_since {
            if !self.warned && since.elapsed() >= PARTIAL_WARNING {
                let delim = self.shared.delim;
                let partial = &self.buf[self.partial_start()..];
                let shown: String =
                    String::from_utf8_lossy(&partial[..partial.len().min(40)]).into();
                log::warn!(
                    "send: {} bytes without a trailing {} are waiting ({shown:?}); a message ends at its delimiter",
                    partial.len(),
                    if delim == b'\n' { "newline" } else { "NUL" }
                );
                self.warned = true;
            }
        }
    }

    /// At stop: the unsent complete lines.
    fn spool_lines(&mut self) {
        let delim = self.shared.delim;
        let mut first = true;
        while let Some(at) = self.buf.iter().position(|&b| b == delim) {
            let line: Vec<u8> = self.buf.drain(..=at).take(at).collect();
            // The first may have reached its receiver as its send was cut.
            let note = if first && self.cut {
                "its send was cut short: it may have been delivered"
            } else {
                ""
            };
            self.shared.spool(Spooled::new(line, note));
            first = false;
            self.cut = false;
        }
    }

    fn spool_partial(&mut self) {
        if !self.buf.is_empty() {
            let rest = std::mem::take(&mut self.buf);
            self.shared
                .spool(Spooled::new(rest, "partial (no delimiter)"));
        }
    }
}
