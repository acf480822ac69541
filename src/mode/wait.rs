//! How a parked request waits: for its counterpart's message, until its
//! deadline, checking every [`SWEEP`] that its own client is still there so a
//! waiter whose client left frees its thread and is never paired.

use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError};

/// How often a parked waiter checks that its client is still connected.
pub const SWEEP: Duration = Duration::from_secs(2);

/// How a wait ended.
pub enum Waited<T> {
    /// The counterpart's message.
    Got(T),
    /// The deadline passed and the waiter left its queue unpaired.
    TimedOut,
    /// The waiter's client hung up and the waiter left its queue, or whoever
    /// held the waiter dropped it without a word.
    HungUp,
}

/// Waits on `rx`. At the deadline, or when `is_alive` says the client left,
/// `unpark` tries to take the waiter out of its queue; if a counterpart
/// already took it, the wait goes on for that counterpart's message.
pub fn wait<T>(
    rx: &Receiver<T>,
    mut deadline: Option<Instant>,
    mut is_alive: impl FnMut() -> bool,
    mut unpark: impl FnMut() -> bool,
) -> Waited<T> {
    let mut claimed = false;
    loop {
        let sweep_at = Instant::now() + SWEEP;
        let wake_at = deadline.map_or(sweep_at, |d| d.min(sweep_at));
        match rx.recv_deadline(wake_at) {
            Ok(message) => return Waited::Got(message),
            Err(RecvTimeoutError::Disconnected) => return Waited::HungUp,
            Err(RecvTimeoutError::Timeout) if claimed => {}
            Err(RecvTimeoutError::Timeout) => {
                let expired = deadline.is_some_and(|d| Instant::now() >= d);
                if expired || !is_alive() {
                    if unpark() {
                        return if expired {
                            Waited::TimedOut
                        } else {
                            Waited::HungUp
                        };
                    }
                    // A counterpart took this waiter a moment ago: its message is coming.
                    claimed = true;
                    deadline = None;
                }
            }
        }
    }
}
