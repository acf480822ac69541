//! Socket-to-socket copies inside the kernel, with Linux's splice(2): the
//! bytes of a Content-Length body go from the producer's socket into a pipe
//! and from the pipe into the consumer's socket without passing through user
//! space. Used for bodies large enough to repay the pipe; everything else,
//! and any failure to make a pipe, takes the portable copy in `response.rs`.

use std::io;
use std::net::TcpStream;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use crate::http::body::early_end;
use crate::http::response::StreamError;

/// Bodies at least this long are spliced.
pub const SPLICE_MIN: u64 = 256 * 1024;

/// Most bytes moved by one splice call.
const STEP: usize = 1 << 20;

/// A pipe that carries spliced bytes; both ends close when it is dropped.
pub struct Pipe {
    read: OwnedFd,
    write: OwnedFd,
}

impl Pipe {
    /// A new pipe, close-on-exec.
    pub fn new() -> io::Result<Pipe> {
        let mut fds = [0 as RawFd; 2];
        // SAFETY: pipe2 writes two descriptors into the valid, owned array.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: pipe2 succeeded, so both descriptors are open and ours alone.
        let (read, write) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        Ok(Pipe { read, write })
    }
}

/// Moves exactly `len` bytes from `from` to `to` through `pipe`; `sent` (what
/// the sink already got) is counted into a read error.
pub fn splice_exact(
    from: &TcpStream,
    to: &TcpStream,
    pipe: &Pipe,
    len: u64,
    sent: u64,
) -> Result<u64, StreamError> {
    let mut moved = 0u64;
    while moved < len {
        let want = usize::try_from(len - moved).map_or(STEP, |left| left.min(STEP));
        let got = match splice(from.as_raw_fd(), pipe.write.as_raw_fd(), want) {
            Ok(0) => Err(early_end()),
            Ok(n) => Ok(n),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => Err(e),
        }
        .map_err(|error| StreamError::Read {
            error,
            sent: sent + moved,
        })?;
        let mut in_pipe = got;
        while in_pipe > 0 {
            match splice(pipe.read.as_raw_fd(), to.as_raw_fd(), in_pipe) {
                Ok(0) => return Err(StreamError::Write(io::ErrorKind::WriteZero.into())),
                Ok(n) => in_pipe -= n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(StreamError::Write(e)),
            }
        }
        moved += got as u64;
    }
    Ok(moved)
}

fn splice(from: RawFd, to: RawFd, len: usize) -> io::Result<usize> {
    // SAFETY: both descriptors are open for the duration of the call (owned
    // by the caller's streams and pipe); null offsets mean "current position".
    let n = unsafe {
        libc::splice(
            from,
            std::ptr::null_mut(),
            to,
            std::ptr::null_mut(),
            len,
            libc::SPLICE_F_MOVE | libc::SPLICE_F_MORE,
        )
    };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(n as usize)
}
