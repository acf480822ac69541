//! How a parked request waits: asleep in its mailbox until word comes from
//! its counterpart, its deadline passes, or its own client speaks.
//!
//! A waiter every one of whose loud words ends its connection (a queue
//! consumer, a producer whose message is at hand) sleeps *watching* its
//! client's socket while the client has sent nothing beyond its request: a
//! hang-up is seen at once (POLLRDHUP on Linux, whatever the client left
//! unread), and the word that its answer went out can be posted quietly.
//! Bytes the client sends meanwhile (a pipelined request) are read ahead
//! into the connection's buffer, up to [`READ_AHEAD`]; from then on, and
//! for any other waiter, it sleeps *blind* and checks its client every
//! [`SWEEP`].

use std::time::{Duration, Instant};

use crate::http::{Exchange, is_open};
use crate::mailbox::{Empty, Mailbox, Watch};

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
    /// Watching its client's socket; a word that must wake it ends its
    /// connection.
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

/// The client of a waiting request, as its wait watches it.
pub trait Client {
    /// The client's socket to watch, while the client has sent nothing
    /// beyond its request; None otherwise (and in tests).
    fn watch(&self) -> Option<Watch>;

    /// Reads ahead what the client sent meanwhile; false once it is gone.
    fn read_ahead(&mut self) -> bool;

    /// Whether the client is still there: a probe, after reading ahead what
    /// it sent (off Linux a hang-up hides behind unread bytes).
    fn is_alive(&mut self) -> bool;

    /// How long a watching wait may sleep without looking at the client:
    /// a quiet post is noticed by then at the latest.
    fn idle_timeout(&self) -> Duration;
}

impl Client for Exchange<'_> {
    fn watch(&self) -> Option<Watch> {
        // Nothing of a next request has come, and nothing of this request's
        // body is left: the client's next bytes mean it has its answer.
        let quiet = self.conn.buffered().is_empty() && self.is_body_read();
        quiet.then(|| Watch { fd: self.conn.fd() })
    }

    fn read_ahead(&mut self) -> bool {
        matches!(self.conn.take_in(READ_AHEAD), Ok(false))
    }

    fn is_alive(&mut self) -> bool {
        Exchange::read_ahead(self, READ_AHEAD).is_ok() && is_open(self.conn.stream())
    }

    fn idle_timeout(&self) -> Duration {
        self.conn.idle_timeout()
    }
}

/// Waits in `mailbox` until `until`, sleeping as `sleep` says: watching,
/// it reads ahead what `client` sends and returns when it hangs up; blind,
/// it probes `client` every [`SWEEP`].
pub fn watch<T>(
    mailbox: &Mailbox<T>,
    client: &mut impl Client,
    until: Option<Instant>,
    sleep: Sleep,
) -> Watched<T> {
    let hang_ups_seen = cfg!(any(target_os = "linux", target_os = "android"));
    loop {
        let socket = match sleep {
            Sleep::Watching => client.watch(),
            Sleep::Blind => None,
        };
        let check = match socket {
            Some(_) if hang_ups_seen => client.idle_timeout(),
            _ => SWEEP,
        };
        let check_at = Instant::now() + check;
        let wake_at = until.map_or(check_at, |u| u.min(check_at));
        match mailbox.wait(Some(wake_at), socket) {
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
            Err(Empty::Socket { readable, hung_up }) => {
                if hung_up || (readable && !client.read_ahead()) {
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
        match mailbox.wait(Some(Instant::now() + SWEEP), None) {
            Ok(message) => return Waited::Got(message),
            Err(Empty::Abandoned) => return Waited::HungUp,
            Err(_) => {}
        }
    }
}

/// A client with no socket that never leaves: for tests of waiting itself.
#[cfg(test)]
pub struct NoSocket;

#[cfg(test)]
impl Client for NoSocket {
    fn watch(&self) -> Option<Watch> {
        None
    }

    fn read_ahead(&mut self) -> bool {
        true
    }

    fn is_alive(&mut self) -> bool {
        true
    }

    fn idle_timeout(&self) -> Duration {
        SWEEP
    }
}
