//! How a parked request waits: for word from its counterpart, until its
//! deadline, checking every [`SWEEP`] that its own client is still there, so
//! that a waiter whose client left frees its thread and is never paired.

use std::time::{Duration, Instant};

use crate::mailbox::{Empty, Mailbox};

/// How often a parked waiter checks that its client is still connected.
pub const SWEEP: Duration = Duration::from_secs(2);

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

/// Waits on `mailbox`. At the deadline, or when `is_alive` says the client
/// left, `unpark` tries to take the waiter out of its line. If it is not
/// there, a counterpart holds it and word is coming: the wait goes on, and
/// `unpark` is tried again at each sweep (a counterpart that finds itself
/// gone puts the waiter back in its line).
pub fn wait<T>(
    mailbox: &Mailbox<T>,
    deadline: Option<Instant>,
    mut is_alive: impl FnMut() -> bool,
    mut unpark: impl FnMut() -> bool,
) -> Waited<T> {
    loop {
        let sweep_at = Instant::now() + SWEEP;
        let wake_at = deadline.map_or(sweep_at, |d| d.min(sweep_at));
        match mailbox.wait(Some(wake_at)) {
            Ok(message) => return Waited::Got(message),
            Err(Empty::Abandoned) => return Waited::HungUp,
            Err(Empty::Timeout) => {
                let expired = deadline.is_some_and(|d| Instant::now() >= d);
                if (expired || !is_alive()) && unpark() {
                    return if expired {
                        Waited::TimedOut
                    } else {
                        Waited::HungUp
                    };
                }
            }
        }
    }
}
