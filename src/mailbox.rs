//! How a thread waits for word from another: a [`Mailbox`] that its owner
//! waits on, with a deadline, and any number of [`Poster`]s that put a
//! message in it. Every blocking wait on the hot path uses it: a parked
//! request waiting for its counterpart or its outcome, a pubsub subscriber
//! waiting for a message or its bell, an idle worker waiting for a
//! connection.
//!
//! The owner parks at once when the mailbox is empty: no spinning and no
//! `sched_yield` (crossbeam's blocking receive backs off with yields first,
//! each of them a context switch on a busy two-core machine). It sleeps in
//! poll(2) on its thread's wake-up descriptor (an eventfd) and, if it asks,
//! on its own client's socket too, so that its client's next request or
//! hang-up wakes it without anyone's help. A poster makes a system call
//! only when the owner is actually asleep, and a *quiet* post none when the
//! owner's socket will wake it anyway: a consumer whose response another
//! thread wrote sleeps once per request, until its client's next request.

use std::cell::RefCell;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::sync::{Arc, Mutex, MutexGuard};
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
    /// instructions, never across a system call.
    slot: Mutex<Slot<T>>,
    /// The owner thread's wake-up descriptor.
    waker: Arc<Waker>,
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
    /// Asleep, and its own socket's next bytes will wake it: a quiet post
    /// need not.
    Watching,
    /// Asleep, and only a post will wake it.
    Blind,
}

/// What the owner watches on its client's socket while it waits.
#[derive(Debug, Clone, Copy)]
pub struct Watch {
    pub fd: RawFd,
    /// Wake on bytes to read, not only on a hang-up.
    pub readable: bool,
    /// The client sends nothing more until it has its answer, so its next
    /// bytes mean the answer is out: a quiet post may leave the owner asleep.
    pub quiet: bool,
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
            waker: Waker::of_this_thread(),
        });
        let poster = Poster {
            inner: Arc::clone(&inner),
        };
        (Mailbox { inner }, poster)
    }

    /// Waits for a message until `deadline` (None: for as long as it takes),
    /// watching the socket of `watch` too, if given. Must be called on the
    /// thread that made the mailbox.
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
                    Some(watch) if watch.readable && watch.quiet => Sleep::Watching,
                    _ => Sleep::Blind,
                };
            }
            let woke = self.inner.waker.sleep(deadline, watch);
            let mut slot = self.inner.lock();
            slot.sleep = Sleep::Awake;
            if let Some(message) = slot.message.take() {
                return Ok(message);
            }
            match woke {
                Woke::Posted => {}
                Woke::Timeout if deadline.is_some_and(|d| Instant::now() >= d) => {
                    return Err(Empty::Timeout);
                }
                Woke::Timeout => {}
                Woke::Socket { readable, hung_up } => {
                    return Err(Empty::Socket { readable, hung_up });
                }
            }
        }
    }
}

impl<T> Inner<T> {
    fn lock(&self) -> MutexGuard<'_, Slot<T>> {
        // A panic never happens while the slot is held: ignore poisoning.
        self.slot.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn post(&self, message: T, quiet: bool) -> Result<(), T> {
        let wake = {
            let mut slot = self.lock();
            if slot.message.is_some() {
                return Err(message);
            }
            slot.message = Some(message);
            match slot.sleep {
                Sleep::Awake => false,
                Sleep::Watching => !quiet,
                Sleep::Blind => true,
            }
        };
        if wake {
            self.waker.wake();
        }
        Ok(())
    }
}

impl<T> Poster<T> {
    /// Puts `message` in the mailbox and wakes its owner if it sleeps.
    /// Fails, giving the message back, when a message is already waiting (a
    /// mailbox holds one: who posts knows it is the only one with word; a
    /// bell that is already rung says the same).
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
        let wake = {
            let mut slot = self.inner.lock();
            slot.posters -= 1;
            // With a message waiting, the owner learns nothing new: a quiet
            // post stays quiet when its poster is dropped.
            slot.posters == 0 && slot.message.is_none() && slot.sleep != Sleep::Awake
        };
        if wake {
            self.inner.waker.wake();
        }
    }
}

/// How a sleep ended.
enum Woke {
    Posted,
    Timeout,
    Socket { readable: bool, hung_up: bool },
}

/// A thread's wake-up descriptor: an eventfd on Linux, a pipe elsewhere.
/// One per thread, made on first use and shared by its mailboxes; a wake
/// that comes after its wait ended only causes a spurious wake-up later.
struct Waker {
    read: OwnedFd,
    /// The same descriptor as `read` for an eventfd.
    write: Option<OwnedFd>,
}

thread_local! {
    static WAKER: RefCell<Option<Arc<Waker>>> = const { RefCell::new(None) };
}

impl Waker {
    fn of_this_thread() -> Arc<Waker> {
        WAKER.with(|cell| {
            let mut cell = cell.borrow_mut();
            match &*cell {
                Some(waker) => Arc::clone(waker),
                None => {
                    let waker = Arc::new(Waker::new().unwrap_or_else(|e| {
                        // Out of descriptors: nothing can wait without one.
                        panic!("cannot make a wake-up descriptor: {e}")
                    }));
                    *cell = Some(Arc::clone(&waker));
                    waker
                }
            }
        })
    }

    #[cfg(target_os = "linux")]
    fn new() -> io::Result<Waker> {
        use std::os::fd::FromRawFd;
        // SAFETY: eventfd takes no pointers; a non-negative result is a new
        // descriptor that nothing else owns.
        let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: see above: `fd` is open and ours alone.
        let read = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(Waker { read, write: None })
    }

    #[cfg(not(target_os = "linux"))]
    fn new() -> io::Result<Waker> {
        use std::os::fd::FromRawFd;
        let mut fds = [0 as RawFd; 2];
        // SAFETY: pipe writes two descriptors into the valid, owned array.
        if unsafe { libc::pipe(fds.as_mut_ptr()) } != 0 {
            return Err(io::Error::last_os_error());
        }
        for fd in fds {
            // SAFETY: fcntl on descriptors just made and owned here.
            unsafe {
                libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC);
                libc::fcntl(fd, libc::F_SETFL, libc::O_NONBLOCK);
            }
        }
        // SAFETY: pipe succeeded, so both descriptors are open and ours alone.
        let (read, write) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        Ok(Waker {
            read,
            write: Some(write),
        })
    }

    /// Wakes the thread sleeping on this waker (or its next sleep).
    fn wake(&self) {
        let one = 1u64.to_ne_bytes();
        let fd = self.write.as_ref().unwrap_or(&self.read).as_raw_fd();
        // SAFETY: writes 8 bytes from a live array to a descriptor this
        // waker owns. A full counter or pipe already means "wake up".
        unsafe {
            libc::write(fd, one.as_ptr().cast(), one.len());
        }
    }

    /// Empties the descriptor after a wake-up.
    fn drain(&self) {
        let mut buf = [0u8; 64];
        // SAFETY: reads into a live, owned buffer from a non-blocking
        // descriptor this waker owns.
        unsafe {
            libc::read(self.read.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len());
        }
    }

    /// Sleeps until woken, until `deadline`, or until the socket of `watch`
    /// has something.
    fn sleep(&self, deadline: Option<Instant>, watch: Option<Watch>) -> Woke {
        let mut fds = [
            libc::pollfd {
                fd: self.read.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: -1,
                events: 0,
                revents: 0,
            },
        ];
        if let Some(watch) = watch {
            fds[1].fd = watch.fd;
            fds[1].events = HANG_UP | if watch.readable { libc::POLLIN } else { 0 };
        }
        let timeout = match deadline {
            None => -1,
            Some(deadline) => {
                let left = deadline.saturating_duration_since(Instant::now());
                // Rounded up, so that a wake-up is never before the deadline.
                let ms = left.as_nanos().div_ceil(1_000_000);
                libc::c_int::try_from(ms).unwrap_or(libc::c_int::MAX)
            }
        };
        // SAFETY: `fds` is a live array of two pollfd for the duration of
        // the call; a negative fd is ignored by poll.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), 2, timeout) };
        if n <= 0 {
            // A signal (EINTR) or the timeout: the caller looks again.
            return Woke::Timeout;
        }
        if fds[0].revents != 0 {
            self.drain();
            return Woke::Posted;
        }
        let revents = fds[1].revents;
        Woke::Socket {
            readable: revents & libc::POLLIN != 0,
            hung_up: revents & (HANG_UP | libc::POLLHUP | libc::POLLERR | libc::POLLNVAL) != 0,
        }
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
    use std::thread;
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
            readable: true,
            quiet: true,
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
    fn a_hang_up_on_the_watched_socket_wakes_the_owner() {
        let (ours, theirs) = std::os::unix::net::UnixStream::pair().unwrap();
        let (mailbox, _poster) = Mailbox::<()>::new();
        let watch = Watch {
            fd: ours.as_raw_fd(),
            readable: false,
            quiet: false,
        };
        drop(theirs);
        match mailbox.wait(soon(), Some(watch)) {
            Err(Empty::Socket { hung_up: true, .. }) => {}
            other => panic!("{other:?}"),
        }
    }
}
