//! The system calls the client-side subcommands (`fifo`, `listen`, `work`)
//! need that std does not offer: FIFOs, `poll(2)`, `flock(2)`, FIONREAD,
//! and a level-triggered flag a loop can poll beside its descriptors.

use std::ffi::CString;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

fn c_path(path: &Path) -> io::Result<CString> {
    CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL in path"))
}

fn check(rc: libc::c_int) -> io::Result<libc::c_int> {
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

/// `mkfifo(path, mode)` (the umask may narrow `mode`; callers chmod after).
pub fn mkfifo(path: &Path, mode: u32) -> io::Result<()> {
    let path = c_path(path)?;
    // SAFETY: `path` is a valid NUL-terminated string for the call.
    check(unsafe { libc::mkfifo(path.as_ptr(), mode as libc::mode_t) }).map(|_| ())
}

/// Renames `from` to `to`, failing if `to` exists (even an empty directory).
pub fn rename_noreplace(from: &Path, to: &Path) -> io::Result<()> {
    let (from, to) = (c_path(from)?, c_path(to)?);
    // SAFETY: two valid NUL-terminated paths relative to the working directory.
    check(unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            from.as_ptr(),
            libc::AT_FDCWD,
            to.as_ptr(),
            libc::RENAME_NOREPLACE,
        )
    })
    .map(|_| ())
}

/// Opens `path` with raw `flags` (O_CLOEXEC added).
pub fn open(path: &Path, flags: libc::c_int) -> io::Result<File> {
    let path = c_path(path)?;
    // SAFETY: a valid path; the returned descriptor is owned by the File.
    let fd = check(unsafe { libc::open(path.as_ptr(), flags | libc::O_CLOEXEC) })?;
    // SAFETY: `fd` was just opened and is owned by nobody else.
    Ok(unsafe { File::from_raw_fd(fd) })
}

/// The path that opens again the file `fd` refers to, even once its own
/// path is gone (procfs); for an O_PATH descriptor, with any access.
pub fn reopen_path(fd: RawFd) -> PathBuf {
    PathBuf::from(format!("/proc/self/fd/{fd}"))
}

/// Sets or clears O_NONBLOCK on `fd`.
pub fn set_nonblocking(fd: RawFd, on: bool) -> io::Result<()> {
    // SAFETY: fcntl on a descriptor the caller owns; no memory is passed.
    let flags = check(unsafe { libc::fcntl(fd, libc::F_GETFL) })?;
    let flags = if on {
        flags | libc::O_NONBLOCK
    } else {
        flags & !libc::O_NONBLOCK
    };
    // SAFETY: as above.
    check(unsafe { libc::fcntl(fd, libc::F_SETFL, flags) }).map(|_| ())
}

/// `flock(fd, LOCK_EX | LOCK_NB)`: false when another holds it.
pub fn try_lock(file: &File) -> io::Result<bool> {
    // SAFETY: flock on an owned, open descriptor.
    match check(unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) }) {
        Ok(_) => Ok(true),
        Err(e) if e.raw_os_error() == Some(libc::EWOULDBLOCK) => Ok(false),
        Err(e) => Err(e),
    }
}

/// Bytes written to a pipe and not yet read (FIONREAD works on either end).
pub fn unread(fd: RawFd) -> io::Result<usize> {
    let mut n: libc::c_int = 0;
    // SAFETY: FIONREAD writes one int into the valid, owned `n`.
    check(unsafe { libc::ioctl(fd, libc::FIONREAD, &mut n) })?;
    Ok(n.max(0) as usize)
}

/// What `poll` saw on one descriptor.
#[derive(Debug, Clone, Copy, Default)]
pub struct Ready {
    pub readable: bool,
    pub writable: bool,
    /// POLLERR or POLLHUP: for a FIFO's write end, no reader is left.
    pub error: bool,
}

/// Polls `fds` (descriptor, events) for up to `timeout` (None: forever).
pub fn poll(fds: &[(RawFd, libc::c_short)], timeout: Option<Duration>) -> io::Result<Vec<Ready>> {
    let mut polled: Vec<libc::pollfd> = fds
        .iter()
        .map(|&(fd, events)| libc::pollfd {
            fd,
            events,
            revents: 0,
        })
        .collect();
    // ppoll: a timeout finer than poll's milliseconds.
    let spec = timeout.map(|t| libc::timespec {
        tv_sec: t.as_secs().min(i32::MAX as u64) as libc::time_t,
        tv_nsec: t.subsec_nanos() as libc::c_long,
    });
    let spec_ptr = spec
        .as_ref()
        .map_or(std::ptr::null(), |s| s as *const libc::timespec);
    loop {
        // SAFETY: `polled` is a valid array of `polled.len()` pollfds;
        // `spec_ptr` is null or points at a live timespec; no signal mask.
        let rc = unsafe {
            libc::ppoll(
                polled.as_mut_ptr(),
                polled.len() as libc::nfds_t,
                spec_ptr,
                std::ptr::null(),
            )
        };
        if rc >= 0 {
            break;
        }
        let error = io::Error::last_os_error();
        if error.kind() != io::ErrorKind::Interrupted {
            return Err(error);
        }
    }
    Ok(polled
        .iter()
        .map(|p| Ready {
            readable: p.revents & libc::POLLIN != 0,
            writable: p.revents & libc::POLLOUT != 0,
            error: p.revents & (libc::POLLERR | libc::POLLHUP | libc::POLLNVAL) != 0,
        })
        .collect())
}

/// A flag that is also a descriptor: once raised, its read end stays
/// readable, so a pump polling it beside its sockets wakes, and keeps waking.
pub struct Flag {
    raised: AtomicBool,
    read: OwnedFd,
    write: OwnedFd,
}

impl Flag {
    /// A flag not raised yet (a pipe: two descriptors).
    pub fn new() -> io::Result<Flag> {
        let mut fds = [0 as libc::c_int; 2];
        // SAFETY: pipe2 writes two descriptors into the valid `fds`.
        check(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC | libc::O_NONBLOCK) })?;
        // SAFETY: both descriptors were just created and are owned here.
        let (read, write) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        Ok(Flag {
            raised: AtomicBool::new(false),
            read,
            write,
        })
    }

    /// Raises the flag (once is enough; again is harmless).
    pub fn raise(&self) {
        if !self.raised.swap(true, Ordering::SeqCst) {
            // SAFETY: writes one byte from a valid buffer to an owned pipe.
            unsafe { libc::write(self.write.as_raw_fd(), b"!".as_ptr().cast(), 1) };
        }
    }

    /// Whether it was raised.
    pub fn is_raised(&self) -> bool {
        self.raised.load(Ordering::SeqCst)
    }

    /// The descriptor to poll for POLLIN.
    pub fn fd(&self) -> RawFd {
        self.read.as_raw_fd()
    }

    /// A flag raised by SIGINT or SIGTERM (from a thread of its own); a
    /// second signal exits at once with status 1, as the relay does.
    pub fn on_signals() -> io::Result<std::sync::Arc<Flag>> {
        use signal_hook::consts::{SIGINT, SIGTERM};
        let flag = std::sync::Arc::new(Flag::new()?);
        let mut signals = signal_hook::iterator::Signals::new([SIGINT, SIGTERM])?;
        let raised = std::sync::Arc::clone(&flag);
        std::thread::Builder::new()
            .name("signals".into())
            .spawn(move || {
                for _ in signals.forever() {
                    if raised.is_raised() {
                        log::warn!("second signal: stopping now");
                        std::process::exit(1);
                    }
                    raised.raise();
                }
            })?;
        Ok(flag)
    }

    /// Sleeps up to `duration`, or until the flag is raised; true if raised.
    pub fn sleep(&self, duration: Duration) -> bool {
        let _ = poll(&[(self.fd(), libc::POLLIN)], Some(duration));
        self.is_raised()
    }
}

/// Turns on TCP keepalive on socket `fd`, so that a peer that vanished
/// without a FIN is noticed even by a side that only waits; with `probes`
/// (idle seconds before the first, seconds between them, how many unanswered
/// end the connection) instead of the kernel's two hours.
pub fn keepalive(fd: RawFd, probes: Option<(u32, u32, u32)>) -> io::Result<()> {
    let set = |level: libc::c_int, name: libc::c_int, value: libc::c_int| {
        // SAFETY: the pointer and length describe `value`, a live c_int, and
        // `fd` is a socket the caller owns for the duration of the call.
        check(unsafe {
            libc::setsockopt(
                fd,
                level,
                name,
                (&value as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        })
    };
    set(libc::SOL_SOCKET, libc::SO_KEEPALIVE, 1)?;
    if let Some((idle, interval, count)) = probes {
        let int = |n: u32| n.min(i32::MAX as u32) as libc::c_int;
        set(libc::IPPROTO_TCP, libc::TCP_KEEPIDLE, int(idle))?;
        set(libc::IPPROTO_TCP, libc::TCP_KEEPINTVL, int(interval))?;
        set(libc::IPPROTO_TCP, libc::TCP_KEEPCNT, int(count))?;
    }
    Ok(())
}

/// Whether the peer of socket `fd` closed it (or it failed), as a peek
/// tells without taking anything: bytes waiting mean it is still there.
pub fn peer_closed(fd: RawFd) -> bool {
    let mut byte = 0u8;
    // SAFETY: recv writes at most one byte into `byte`, which lives through
    // the call; MSG_PEEK leaves it in the socket, MSG_DONTWAIT never blocks.
    let n = unsafe {
        libc::recv(
            fd,
            (&raw mut byte).cast(),
            1,
            libc::MSG_PEEK | libc::MSG_DONTWAIT,
        )
    };
    match n {
        0 => true,
        n if n > 0 => false,
        _ => !matches!(
            std::io::Error::last_os_error().kind(),
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::Interrupted
        ),
    }
}

/// Makes the socket's close a reset (SO_LINGER of 0): its peer learns at
/// once that nobody is there, instead of reading an orderly end. The
/// socket closes when its owner drops it.
pub fn reset(fd: RawFd) {
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: setsockopt reads a `linger` that lives through the call; the
    // descriptor is the caller's.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&raw const linger).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        log::debug!("SO_LINGER: {}", std::io::Error::last_os_error());
    }
}

/// Bytes a TCP socket holds that its peer has not acknowledged yet
/// (SIOCOUTQ); None where the kernel will not say. A count that shrinks
/// means the peer is reading.
pub fn unsent(fd: RawFd) -> Option<usize> {
    #[cfg(target_os = "linux")]
    {
        let mut queued: libc::c_int = 0;
        // SAFETY: TIOCOUTQ (SIOCOUTQ) writes one int into `queued`, which
        // lives through the call; the descriptor is the caller's.
        let rc = unsafe { libc::ioctl(fd, libc::TIOCOUTQ, &mut queued) };
        (rc == 0).then(|| usize::try_from(queued).unwrap_or(0))
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _ = fd;
        None
    }
}
