//! How a parked request waits: asleep in its mailbox until word comes from
//! its counterpart, its deadline passes, or its own client speaks.
//!
//! A waiter every one of whose loud words ends its connection (a queue
//! consumer, a producer whose message is at hand) sleeps *watching* its
//! client while the client has sent nothing beyond its request: asleep in
//! a blocking read of the client's socket, it sees a hang-up at once, the
//! word that its answer went out can be posted quietly, and the client's
//! next request, which wakes it, is already read. Bytes the client sends
//! before its answer (a pipelined request) are kept in the connection's
//! buffer; from then on, and for any other waiter, it sleeps *blind* and
//! checks its client every [`SWEEP`].

use std::io;
use std::os::fd::RawFd;
use std::time::{Duration, Instant};

use crate::http::{Exchange, is_open};
use crate::mailbox::{Empty, Mailbox};

/// How much of what a waiting client sends is read ahead: enough for a
/// small body (so that a client that sent one and hung up is seen to be
/// gone) and a pipelined request or two.
pub const READ_AHEAD: usize = 16 * 1024;

/// How often a waiter that does not watch for hang-ups (blind, off Linux,
/// or with its read-ahead full) checks that its client is still there, and
/// how often a claimed waiter tries to leave its line.
pub const SWEEP: Duration = Duration::from_secs(2);

/// How a waiter sleeps (see the module's comment).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sleep {
    /// Watching its client, in a read of its socket; a word that must wake
    /// it ends its connection.
    Watching,
    /// Blind to its socket, checking its client every [`SWEEP`].
    Blind,
}

/// How a wait ended.
#[derive(Debug)]
pub enum Waited<T> {
    /// Word from the counterpart.
    Got(T),
    /// The deadline passed and the waiter left its line unpaired.
    TimedOut,
    /// The waiter's client hung up and the waiter left its line, or whoever
    /// held the waiter dropped it without a word.
    HungUp,
}

/// How a watch of the client ended (see [`watch`]).
#[derive(Debug)]
pub enum Watched<T> {
    Got(T),
    /// `until` passed.
    Timeout,
    /// The client hung up.
    HungUp,
    /// Every poster was dropped without a word.
    Abandoned,
}

/// What a waiter's read of its client brought.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Read {
    /// Bytes, now in the connection's buffer.
    Bytes,
    /// The end of the stream: the client closed its side (or the socket was
    /// shut for reading to wake the waiter).
    End,
    /// Nothing within the read's time.
    Timeout,
    /// The socket failed.
    Failed,
}

/// The client of a waiting request, as its wait watches it.
pub trait Client {
    /// The client's socket to read while waiting, when the client has sent
    /// nothing beyond its request; None otherwise (and in tests).
    fn reading_fd(&self) -> Option<RawFd>;

    /// Reads what the client sends next into the connection's buffer,
    /// waiting until `deadline`, and at most the idle timeout.
    fn read(&mut self, deadline: Option<Instant>) -> Read;

    /// Whether the client is still there: a probe, after reading ahead what
    /// it sent (off Linux a hang-up hides behind unread bytes).
    fn is_alive(&mut self) -> bool;
}

impl Client for Exchange<'_> {
    fn reading_fd(&self) -> Option<RawFd> {
        // Nothing of a next request has come, and nothing of this request's
        // body is left: the client's next bytes mean it has its answer.
        let quiet = self.conn.buffered().is_empty() && self.is_body_read();
        quiet.then(|| self.conn.fd())
    }

    fn read(&mut self, deadline: Option<Instant>) -> Read {
        let idle = self.conn.idle_timeout();
        // Without a deadline the socket keeps its idle timeout, set for
        // this request already: no system call to set it.
        let timeout = match deadline {
            None => idle,
            Some(deadline) => {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return Read::Timeout;
                }
                left.min(idle)
            }
        };
        if self.conn.set_read_timeout(timeout).is_err() {
            return Read::Failed;
        }
        match self.conn.fill(READ_AHEAD) {
            Ok(0) => Read::End,
            Ok(_) => Read::Bytes,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock
                        | io::ErrorKind::TimedOut
                        | io::ErrorKind::Interrupted
                ) =>
            {
                Read::Timeout
            }
            Err(_) => Read::Failed,
        }
    }

    fn is_alive(&mut self) -> bool {
        Exchange::read_ahead(self, READ_AHEAD).is_ok() && is_open(self.conn.stream())
    }
}

/// Waits in `mailbox` until `until`, sleeping as `sleep` says: watching,
/// in a read of `client`, which returns when it hangs up; blind, probing
/// `client` every [`SWEEP`].
pub fn watch<T>(
    mailbox: &Mailbox<T>,
    client: &mut impl Client,
    until: Option<Instant>,
    sleep: Sleep,
) -> Watched<T> {
    loop {
        let fd = match sleep {
            Sleep::Watching => client.reading_fd(),
            Sleep::Blind => None,
        };
        if let Some(fd) = fd {
            match mailbox.read_or_word(fd, || client.read(until)) {
                Ok(message) => return Watched::Got(message),
                Err(None) => return Watched::Abandoned,
                // More than its request (a pipelined one): blind from now on.
                Err(Some(Read::Bytes)) => {}
                Err(Some(Read::End | Read::Failed)) => return Watched::HungUp,
                Err(Some(Read::Timeout)) => {
                    if until.is_some_and(|u| Instant::now() >= u) {
                        return Watched::Timeout;
                    }
                }
            }
            continue;
        }
        let check_at = Instant::now() + SWEEP;
        match mailbox.wait(Some(until.map_or(check_at, |u| u.min(check_at)))) {
            Ok(message) => return Watched::Got(message),
            Err(Empty::Abandoned) => return Watched::Abandoned,
            Err(Empty::Timeout) => {
                if until.is_some_and(|u| Instant::now() >= u) {
                    return Watched::Timeout;
                }
                if !client.is_alive() {
                    return Watched::HungUp;
                }
            }
        }
    }
}

/// Waits on `mailbox` as a parked request: until `deadline`, or until
/// `client` hangs up; then `unpark` tries to take the waiter out of its
/// line, and the wait ends. If the waiter is not there, a counterpart holds
/// it and word is coming: the wait goes on blind, and `unpark` is tried
/// again every [`SWEEP`] (a counterpart that finds itself gone puts the
/// waiter back in its line).
pub fn wait<T>(
    mailbox: &Mailbox<T>,
    client: &mut impl Client,
    deadline: Option<Instant>,
    sleep: Sleep,
    mut unpark: impl FnMut() -> bool,
) -> Waited<T> {
    let left = match watch(mailbox, client, deadline, sleep) {
        Watched::Got(message) => return Waited::Got(message),
        Watched::Abandoned => return Waited::HungUp,
        Watched::Timeout => Waited::TimedOut,
        Watched::HungUp => Waited::HungUp,
    };
    loop {
        if unpark() {
            return left;
        }
        // Claimed: word is coming, whatever the client does.
        match mailbox.wait(Some(Instant::now() + SWEEP)) {
            Ok(message) => return Waited::Got(message),
            Err(Empty::Abandoned) => return Waited::HungUp,
            Err(Empty::Timeout) => {}
        }
    }
}

/// A client with no socket that never leaves: for tests of waiting itself.
#[cfg(test)]
pub struct NoSocket;

#[cfg(test)]
impl Client for NoSocket {
    fn reading_fd(&self) -> Option<RawFd> {
        None
    }

    fn read(&mut self, _: Option<Instant>) -> Read {
        Read::Timeout
    }

    fn is_alive(&mut self) -> bool {
        true
    }
}
