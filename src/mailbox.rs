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
//! - *watching* its client's socket, in poll(2), when the client sends
//!   nothing more until it has its answer: the client's next request or
//!   hang-up wakes it without anyone's help, so a *quiet* post (the word
//!   that its answer went out) needs no system call at all, and the owner
//!   sleeps once per request. A post that must wake it shuts the socket
//!   for reading, which wakes poll: so only a waiter whose every such word
//!   ends its connection (a refusal, a cut) may watch.

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
    /// In poll(2) on its client's socket `fd`, which its client's next
    /// bytes will wake: a quiet post leaves it asleep.
    Watching { fd: RawFd },
}

/// The client's socket an owner watches while it waits: a client that
/// sends nothing more until it has its answer, so that its next bytes mean
/// the answer is out, and every word that must wake the owner ends the
/// connection (see the module's comment).
#[derive(Debug, Clone, Copy)]
pub struct Watch {
    pub fd: RawFd,
}

/// Why a wait ended without a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Empty {
    /// The deadline passed.
    Timeout,
    /// Every poster was dropped without a word: none will ever come.
    Abandoned,
    /// The watched socket has something: bytes to read, or a hang-up.
    Socket { readable: bool, hung_up: bool },
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

    /// Waits for a message until `deadline` (None: for as long as it takes),
    /// watching the socket of `watch` if given (see the module's comment for
    /// what that implies). Must be called on the thread that made the mailbox.
    pub fn wait(&self, deadline: Option<Instant>, watch: Option<Watch>) -> Result<T, Empty> {
        loop {
            {
                let mut slot = self.inner.lock();
                if let Some(message) = slot.message.take() {
                    return Ok(message);
                }
                if slot.posters == 0 {
                    return Err(Empty::Abandoned);
                }
                slot.sleep = match watch {
                    Some(watch) => Sleep::Watching { fd: watch.fd },
                    None => Sleep::Blind,
                };
            }
            let woke = match watch {
                Some(watch) => poll(watch, deadline),
                None => park(deadline),
            };
            let mut slot = self.inner.lock();
            slot.sleep = Sleep::Awake;
            if let Some(message) = slot.message.take() {
                return Ok(message);
            }
            match woke {
                Woke::Timeout if deadline.is_some_and(|d| Instant::now() >= d) => {
                    return Err(Empty::Timeout);
                }
                // Spurious, a signal, or an unpark meant for an earlier wait.
                Woke::Timeout => {}
                Woke::Socket { readable, hung_up } => {
                    return Err(Empty::Socket { readable, hung_up });
                }
            }
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
            park(Some(until));
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
            Sleep::Watching { .. } if quiet => {}
            // Under the lock: the owner is still in poll on `fd`, so the
            // descriptor is still its socket and cannot have been reused.
            Sleep::Watching { fd, .. } => shut_for_reading(fd),
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
            Sleep::Watching { fd, .. } => shut_for_reading(fd),
            Sleep::Blind => {
                drop(slot);
                self.inner.owner.unpark();
            }
        }
    }
}

/// How a sleep ended.
enum Woke {
    /// The deadline, a post, or nothing at all: the caller looks again.
    Timeout,
    Socket {
        readable: bool,
        hung_up: bool,
    },
}

/// Parks the calling thread until unparked or until `deadline`.
fn park(deadline: Option<Instant>) -> Woke {
    match deadline {
        None => thread::park(),
        Some(deadline) => thread::park_timeout(deadline.saturating_duration_since(Instant::now())),
    }
    Woke::Timeout
}

/// Sleeps until the socket of `watch` has something or until `deadline`.
fn poll(watch: Watch, deadline: Option<Instant>) -> Woke {
    let mut fd = libc::pollfd {
        fd: watch.fd,
        events: HANG_UP | libc::POLLIN,
        revents: 0,
    };
    let timeout = match deadline {
        None => -1,
        Some(deadline) => {
            let left = deadline.saturating_duration_since(Instant::now());
            // Rounded up, so that a wake-up is never before the deadline.
            let ms = left.as_nanos().div_ceil(1_000_000);
            libc::c_int::try_from(ms).unwrap_or(libc::c_int::MAX)
        }
    };
    // SAFETY: `fd` is a live pollfd for the duration of the call.
    let n = unsafe { libc::poll(&mut fd, 1, timeout) };
    if n <= 0 {
        // A signal (EINTR) or the timeout: the caller looks again.
        return Woke::Timeout;
    }
    Woke::Socket {
        readable: fd.revents & libc::POLLIN != 0,
        hung_up: fd.revents & (HANG_UP | libc::POLLHUP | libc::POLLERR | libc::POLLNVAL) != 0,
    }
}

/// Wakes a thread in poll on `fd` by shutting the socket for reading: poll
/// then reports the end of the stream. Its connection reads nothing more.
fn shut_for_reading(fd: RawFd) {
    // SAFETY: shutdown takes no pointers; `fd` is open (see `Inner::post`).
    if unsafe { libc::shutdown(fd, libc::SHUT_RD) } != 0 {
        log::debug!("shutdown(SHUT_RD): {}", io::Error::last_os_error());
    }
}

/// The poll event of a peer that closed its side: POLLRDHUP on Linux, seen
/// even with bytes of its still unread; elsewhere the end of the stream
/// shows as readable.
#[cfg(any(target_os = "linux", target_os = "android"))]
const HANG_UP: libc::c_short = libc::POLLRDHUP;
#[cfg(not(any(target_os = "linux", target_os = "android")))]
const HANG_UP: libc::c_short = 0;

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
        assert_eq!(mailbox.wait(Some(Instant::now()), None), Ok(7));
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
        assert_eq!(mailbox.wait(soon(), None), Ok("word"));
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
            match mailbox.wait(Some(deadline), None) {
                Ok(got) => assert_eq!(got, i),
                Err(Empty::Timeout) => {
                    // Timed out just before the post: it is there next time.
                    let _poster = posting.join().unwrap();
                    assert_eq!(mailbox.wait(soon(), None), Ok(i));
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
        assert_eq!(
            mailbox.wait(Some(started + wait), None),
            Err(Empty::Timeout)
        );
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
        assert_eq!(mailbox.linger(Instant::now() + Duration::from_secs(5)), Some(2));
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
        assert_eq!(mailbox.wait(soon(), None), Err(Empty::Abandoned));
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
                        .map(|_| mailbox.wait(soon(), None).unwrap())
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

    #[test]
    fn a_quiet_post_leaves_a_watching_owner_asleep_until_its_socket_speaks() {
        let (ours, theirs) = std::os::unix::net::UnixStream::pair().unwrap();
        let (mailbox, poster) = Mailbox::new();
        let watch = Watch {
            fd: ours.as_raw_fd(),
        };
        let posting = thread::spawn(move || {
            thread::sleep(Duration::from_millis(30));
            poster.post_quietly("answered").unwrap();
            thread::sleep(Duration::from_millis(100));
            // The client's next request: this is what wakes the owner.
            std::io::Write::write_all(&mut &theirs, b"GET").unwrap();
            (poster, theirs)
        });
        let started = Instant::now();
        assert_eq!(mailbox.wait(soon(), Some(watch)), Ok("answered"));
        assert!(started.elapsed() >= Duration::from_millis(120));
        drop(posting.join().unwrap());
    }

    #[test]
    fn a_loud_post_wakes_a_watching_owner_and_ends_its_reading() {
        let (ours, theirs) = std::os::unix::net::UnixStream::pair().unwrap();
        let (mailbox, poster) = Mailbox::new();
        let watch = Watch {
            fd: ours.as_raw_fd(),
        };
        let posting = thread::spawn(move || {
            thread::sleep(Duration::from_millis(30));
            poster.post("refused").unwrap();
            poster
        });
        assert_eq!(mailbox.wait(soon(), Some(watch)), Ok("refused"));
        let mut byte = [0u8; 1];
        assert_eq!(std::io::Read::read(&mut &ours, &mut byte).unwrap(), 0);
        drop((posting.join().unwrap(), theirs));
    }

    #[test]
    fn a_hang_up_on_the_watched_socket_wakes_the_owner() {
        let (ours, theirs) = std::os::unix::net::UnixStream::pair().unwrap();
        let (mailbox, _poster) = Mailbox::<()>::new();
        let watch = Watch {
            fd: ours.as_raw_fd(),
        };
        drop(theirs);
        match mailbox.wait(soon(), Some(watch)) {
            Err(Empty::Socket { hung_up: true, .. }) => {}
            other => panic!("{other:?}"),
        }
    }
}
