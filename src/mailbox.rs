//! How a thread waits for word from another: a [`Mailbox`] that its owner
//! waits on, with a deadline, and any number of [`Poster`]s that put a
//! message in it. Used by every blocking wait on the hot path: a parked
//! request waiting for its counterpart or its outcome, a pubsub subscriber
//! waiting for a message, an idle worker waiting for a connection.

use std::time::Instant;

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender, TrySendError, bounded};

/// The waiting end: owned by the thread that waits.
pub struct Mailbox<T> {
    rx: Receiver<T>,
}

/// The posting end; cloned for everyone who may have word for the owner.
pub struct Poster<T> {
    tx: Sender<T>,
}

impl<T> Clone for Poster<T> {
    fn clone(&self) -> Self {
        Poster {
            tx: self.tx.clone(),
        }
    }
}

/// Why a wait ended without a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Empty {
    /// The deadline passed.
    Timeout,
    /// Every poster was dropped without a word: none will ever come.
    Abandoned,
}

impl<T> Mailbox<T> {
    /// An empty mailbox, and its first poster.
    pub fn new() -> (Mailbox<T>, Poster<T>) {
        let (tx, rx) = bounded(1);
        (Mailbox { rx }, Poster { tx })
    }

    /// Waits for a message until `deadline` (None: for as long as it takes).
    pub fn wait(&self, deadline: Option<Instant>) -> Result<T, Empty> {
        match deadline {
            Some(deadline) => self.rx.recv_deadline(deadline).map_err(|e| match e {
                RecvTimeoutError::Timeout => Empty::Timeout,
                RecvTimeoutError::Disconnected => Empty::Abandoned,
            }),
            None => self.rx.recv().map_err(|_| Empty::Abandoned),
        }
    }
}

impl<T> Poster<T> {
    /// Puts `message` in the mailbox, waking its owner. Fails, giving the
    /// message back, when the owner is gone or a message is already waiting
    /// (a mailbox holds one: who posts knows it is the only one with word).
    pub fn post(&self, message: T) -> Result<(), T> {
        self.tx.try_send(message).map_err(|e| match e {
            TrySendError::Full(m) | TrySendError::Disconnected(m) => m,
        })
    }
}
