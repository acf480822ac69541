//! How a thread waits for word from another: a [`Mailbox`] that its owner
//! waits on, with a deadline, and any number of [`Poster`]s that put a
//! message in it. Every blocking wait on the hot path uses it: a parked
//! request waiting for its counterpart or its outcome, a pubsub subscriber
//! waiting for a message or its bell, an idle worker waiting for a
//! connection.
//!
//! The owner parks at once when the mailbox is empty: no spinning and no
//! `sched_yield` (crossbeam's blocking receive backs off with yields first,
//! each of them a context switch on a busy two-core machine). A poster makes
//! a system call only when the owner is actually asleep. The owner sleeps in
//! one of two ways, and costs no descriptor beyond its socket either way:
//!
//! - *blind*: parked on its thread's futex ([`std::thread::park`]); a post
//!   unparks it.
//! - *reading* its client's socket, in a blocking read, when the client
//!   sends nothing more until it has its answer: the client's next request
//!   (which the read takes in) or hang-up wakes it without anyone's help,
//!   so a *quiet* post (the word that its answer went out) needs no system
//!   call at all, and the owner sleeps once per request, in the read it
//!   would make anyway. A post that must wake it shuts the socket for
//!   reading, which ends the read: so only a waiter whose every such word
//!   ends its connection (a refusal, a cut) may sleep this way.

use std::io;
use std::os::fd::RawFd;
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::{self, Thread};
use std::time::Instant;

/// The waiting end: owned, and waited on, by the thread that made it.
pub struct Mailbox<T> {
    inner: Arc<Inner<T>>,
}

/// The posting end; cloned for everyone who may have word for the owner.
pub struct Poster<T> {
    inner: Arc<Inner<T>>,
}

struct Inner<T> {
    /// Guards the message and the owner's state; held for a few
    /// instructions (and, to wake a watching owner, one shutdown(2)).
    slot: Mutex<Slot<T>>,
    /// The owner, for unparking it.
    owner: Thread,
}

struct Slot<T> {
    message: Option<T>,
    sleep: Sleep,
    /// Posters alive; at zero no word can come any more.
    posters: usize,
}

/// What the owner is doing, as a poster needs to know it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Sleep {
    /// Running: it will look at the mailbox before it sleeps.
    Awake,
    /// Parked on its futex: a post unparks it.
    Blind,
    /// Parked on its futex until a set time, whatever comes: a post waits
    /// for it (see [`Mailbox::linger`]).
    Lingering,
    /// In a blocking read of its client's socket `fd`, which its client's
    /// next bytes will end: a quiet post leaves it asleep.
    Reading { fd: RawFd },
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
    /// An empty mailbox owned by the calling thread, and its first poster.
    pub fn new() -> (Mailbox<T>, Poster<T>) {
        let inner = Arc::new(Inner {
            slot: Mutex::new(Slot {
                message: None,
                sleep: Sleep::Awake,
                posters: 1,
            }),
            owner: thread::current(),
        });
        let poster = Poster {
            inner: Arc::clone(&inner),
        };
        (Mailbox { inner }, poster)
    }

    /// Waits for a message until `deadline` (None: for as long as it
    /// takes), parked. Must be called on the thread that made the mailbox.
    pub fn wait(&self, deadline: Option<Instant>) -> Result<T, Empty> {
        loop {
            {
                let mut slot = self.inner.lock();
                if let Some(message) = slot.message.take() {
                    return Ok(message);
                }
                if slot.posters == 0 {
                    return Err(Empty::Abandoned);
                }
                slot.sleep = Sleep::Blind;
            }
            match deadline {
                None => thread::park(),
                Some(deadline) => {
                    thread::park_timeout(deadline.saturating_duration_since(Instant::now()));
                }
            }
            let mut slot = self.inner.lock();
            slot.sleep = Sleep::Awake;
            if let Some(message) = slot.message.take() {
                return Ok(message);
            }
            if deadline.is_some_and(|d| Instant::now() >= d) {
                return Err(Empty::Timeout);
            }
            // Spurious, or an unpark meant for an earlier wait: look again.
        }
    }

    /// Sleeps in `read`, a blocking read of the client's socket `fd` (see
    /// the module's comment for what that implies), unless a message is
    /// already here. Returns the message if one came, in which case what
    /// `read` took in is the client's next request; else what `read`
    /// returned, or None when no word can come any more. Must be called on
    /// the thread that made the mailbox.
    pub fn read_or_word<R>(&self, fd: RawFd, read: impl FnOnce() -> R) -> Result<T, Option<R>> {
        {
            let mut slot = self.inner.lock();
            if let Some(message) = slot.message.take() {
                return Ok(message);
            }
            if slot.posters == 0 {
                return Err(None);
            }
            slot.sleep = Sleep::Reading { fd };
        }
        let read = read();
        let mut slot = self.inner.lock();
        slot.sleep = Sleep::Awake;
        match slot.message.take() {
            Some(message) => Ok(message),
            None => Err(Some(read)),
        }
    }
}

impl<T> Mailbox<T> {
    /// Sleeps until `until` whatever is posted meanwhile, then takes the
    /// message if one came. For a waiter that is woken often (a stream fed
    /// by a fast publisher): lingering a moment after each piece of work
    /// lets words gather, so that it wakes once for many instead of once
    /// for each.
    pub fn linger(&self, until: Instant) -> Option<T> {
        {
            let mut slot = self.inner.lock();
            if slot.message.is_some() || slot.posters == 0 {
                return slot.message.take();
            }
            slot.sleep = Sleep::Lingering;
        }
        while Instant::now() < until {
            thread::park_timeout(until.saturating_duration_since(Instant::now()));
        }
        let mut slot = self.inner.lock();
        slot.sleep = Sleep::Awake;
        slot.message.take()
    }
}

impl<T> Inner<T> {
    fn lock(&self) -> MutexGuard<'_, Slot<T>> {
        // A panic never happens while the slot is held: ignore poisoning.
        self.slot.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn post(&self, message: T, quiet: bool) -> Result<(), T> {
        let mut slot = self.lock();
        if slot.message.is_some() {
            return Err(message);
        }
        slot.message = Some(message);
        match slot.sleep {
            Sleep::Awake | Sleep::Lingering => {}
            Sleep::Reading { .. } if quiet => {}
            // Under the lock: the owner is still in its read of `fd`, so
            // the descriptor is still its socket and cannot have been reused.
            Sleep::Reading { fd } => shut_for_reading(fd),
            Sleep::Blind => {
                drop(slot);
                self.owner.unpark();
            }
        }
        Ok(())
    }
}

impl<T> Poster<T> {
    /// Puts `message` in the mailbox and wakes its owner if it sleeps (a
    /// watching owner's socket is shut for reading). Fails, giving the
    /// message back, when a message is already waiting (a mailbox holds one:
    /// who posts knows it is the only one with word; a bell that is already
    /// rung says the same).
    pub fn post(&self, message: T) -> Result<(), T> {
        self.inner.post(message, false)
    }

    /// Puts `message` in the mailbox and leaves its owner asleep if its own
    /// socket will wake it (its client sends nothing more until it has read
    /// the answer this message reports).
    pub fn post_quietly(&self, message: T) -> Result<(), T> {
        self.inner.post(message, true)
    }

    /// Whether `self` and `other` post to the same mailbox.
    pub fn is_same(&self, other: &Poster<T>) -> bool {
        Arc::ptr_eq(&self.inner, &other.inner)
    }
}

impl<T> Clone for Poster<T> {
    fn clone(&self) -> Self {
        self.inner.lock().posters += 1;
        Poster {
            inner: Arc::clone(&self.inner),
        }
    }
}

impl<T> Drop for Poster<T> {
    fn drop(&mut self) {
        let mut slot = self.inner.lock();
        slot.posters -= 1;
        // With a message waiting, the owner learns nothing new: a quiet
        // post stays quiet when its poster is dropped.
        if slot.posters > 0 || slot.message.is_some() {
            return;
        }
        match slot.sleep {
            Sleep::Awake | Sleep::Lingering => {}
            Sleep::Reading { fd } => shut_for_reading(fd),
            Sleep::Blind => {
                drop(slot);
                self.inner.owner.unpark();
            }
        }
    }
}

/// Wakes a thread in a blocking read of `fd` by shutting the socket for
/// reading: the read then ends. Its connection reads nothing more.
fn shut_for_reading(fd: RawFd) {
    // SAFETY: shutdown takes no pointers; `fd` is open (see `Inner::post`).
    if unsafe { libc::shutdown(fd, libc::SHUT_RD) } != 0 {
        log::debug!("shutdown(SHUT_RD): {}", io::Error::last_os_error());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;
    use std::time::Duration;

    fn soon() -> Option<Instant> {
        Some(Instant::now() + Duration::from_secs(5))
    }

    #[test]
    fn a_post_before_the_wait_is_there_at_once() {
        let (mailbox, poster) = Mailbox::new();
        poster.post(7).unwrap();
        assert_eq!(poster.post(8), Err(8), "a mailbox holds one message");
        assert_eq!(mailbox.wait(Some(Instant::now())), Ok(7));
    }

    #[test]
    fn a_post_wakes_a_sleeping_owner() {
        let (mailbox, poster) = Mailbox::new();
        let posting = thread::spawn(move || {
            thread::sleep(Duration::from_millis(50));
            poster.post("word").unwrap();
            poster
        });
        let started = Instant::now();
        assert_eq!(mailbox.wait(soon()), Ok("word"));
        assert!(started.elapsed() < Duration::from_secs(4));
        drop(posting.join().unwrap());
    }

    #[test]
    fn a_timeout_racing_a_post_loses_nothing() {
        for i in 0..200 {
            let (mailbox, poster) = Mailbox::new();
            let posting = thread::spawn(move || {
                thread::sleep(Duration::from_micros(i * 10));
                poster.post(i).unwrap();
                poster
            });
            let deadline = Instant::now() + Duration::from_micros(1000);
            match mailbox.wait(Some(deadline)) {
                Ok(got) => assert_eq!(got, i),
                Err(Empty::Timeout) => {
                    // Timed out just before the post: it is there next time.
                    let _poster = posting.join().unwrap();
                    assert_eq!(mailbox.wait(soon()), Ok(i));
                    continue;
                }
                Err(other) => panic!("{other:?}"),
            }
            drop(posting.join().unwrap());
        }
    }

    #[test]
    fn a_timeout_is_not_early() {
        let (mailbox, _poster) = Mailbox::<()>::new();
        let started = Instant::now();
        let wait = Duration::from_millis(30);
        assert_eq!(mailbox.wait(Some(started + wait)), Err(Empty::Timeout));
        assert!(started.elapsed() >= wait);
    }

    #[test]
    fn a_lingering_owner_sleeps_through_posts_until_its_time() {
        let (mailbox, poster) = Mailbox::new();
        let posting = thread::spawn(move || {
            thread::sleep(Duration::from_millis(10));
            poster.post(1).unwrap();
            poster
        });
        let started = Instant::now();
        let linger = Duration::from_millis(60);
        assert_eq!(mailbox.linger(started + linger), Some(1));
        assert!(started.elapsed() >= linger);
        // A word already there ends a linger at once.
        let poster = posting.join().unwrap();
        poster.post(2).unwrap();
        assert_eq!(
            mailbox.linger(Instant::now() + Duration::from_secs(5)),
            Some(2)
        );
        assert_eq!(mailbox.linger(Instant::now()), None);
    }

    #[test]
    fn dropping_every_poster_abandons_the_wait() {
        let (mailbox, poster) = Mailbox::<()>::new();
        let second = poster.clone();
        drop(poster);
        let dropping = thread::spawn(move || {
            thread::sleep(Duration::from_millis(30));
            drop(second);
        });
        assert_eq!(mailbox.wait(soon()), Err(Empty::Abandoned));
        dropping.join().unwrap();
    }

    #[test]
    fn many_waiters_each_get_their_own_word() {
        let owners: Vec<_> = (0..64)
            .map(|i| {
                let (tx, rx) = std::sync::mpsc::channel();
                let owner = thread::spawn(move || {
                    let (mailbox, poster) = Mailbox::new();
                    tx.send(poster).unwrap();
                    // A few words in a row, each from another thread.
                    (0..3)
                        .map(|_| mailbox.wait(soon()).unwrap())
                        .collect::<Vec<u64>>()
                });
                (i, rx.recv().unwrap(), owner)
            })
            .collect();
        let posters: Vec<_> = owners
            .iter()
            .map(|(i, poster, _)| (*i, poster.clone()))
            .collect();
        let posting = thread::spawn(move || {
            for round in 0..3u64 {
                for (i, poster) in &posters {
                    // Wait until the previous word was taken.
                    while poster.post(*i * 10 + round).is_err() {
                        thread::yield_now();
                    }
                }
            }
        });
        posting.join().unwrap();
        for (i, _, owner) in owners {
            assert_eq!(owner.join().unwrap(), vec![i * 10, i * 10 + 1, i * 10 + 2]);
        }
    }

    /// A blocking read of `socket`, as a waiter's.
    fn read_from(socket: &std::os::unix::net::UnixStream) -> Vec<u8> {
        let mut buf = [0u8; 16];
        let n = std::io::Read::read(&mut &*socket, &mut buf).unwrap_or(0);
        buf[..n].to_vec()
    }

    #[test]
    fn a_quiet_post_leaves_a_reading_owner_asleep_until_its_client_speaks() {
        let (ours, theirs) = std::os::unix::net::UnixStream::pair().unwrap();
        let (mailbox, poster) = Mailbox::new();
        let posting = thread::spawn(move || {
            thread::sleep(Duration::from_millis(30));
            poster.post_quietly("answered").unwrap();
            thread::sleep(Duration::from_millis(100));
            // The client's next request: this is what wakes the owner.
            std::io::Write::write_all(&mut &theirs, b"GET").unwrap();
            (poster, theirs)
        });
        let started = Instant::now();
        let mut read = Vec::new();
        let got = mailbox.read_or_word(ours.as_raw_fd(), || read = read_from(&ours));
        assert_eq!(got.map_err(|_| ()), Ok("answered"));
        assert_eq!(read, b"GET", "the next request was taken in");
        assert!(started.elapsed() >= Duration::from_millis(120));
        drop(posting.join().unwrap());
    }

    #[test]
    fn a_loud_post_ends_a_reading_owners_read() {
        let (ours, theirs) = std::os::unix::net::UnixStream::pair().unwrap();
        let (mailbox, poster) = Mailbox::new();
        let posting = thread::spawn(move || {
            thread::sleep(Duration::from_millis(30));
            poster.post("refused").unwrap();
            poster
        });
        let got = mailbox.read_or_word(ours.as_raw_fd(), || read_from(&ours));
        assert_eq!(got.map_err(|_| ()), Ok("refused"));
        assert!(read_from(&ours).is_empty(), "the socket reads nothing more");
        drop((posting.join().unwrap(), theirs));
    }

    #[test]
    fn a_hang_up_ends_a_reading_owners_read_without_a_word() {
        let (ours, theirs) = std::os::unix::net::UnixStream::pair().unwrap();
        let (mailbox, _poster) = Mailbox::<()>::new();
        drop(theirs);
        let got = mailbox.read_or_word(ours.as_raw_fd(), || read_from(&ours));
        assert_eq!(got, Err(Some(Vec::new())));
    }
}
