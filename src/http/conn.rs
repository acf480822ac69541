//! One client connection: the socket and the bytes read from it but not yet
//! used. Heads are parsed from the buffer; bodies drain it before reading the
//! socket. Socket options, liveness probes and lingering close live here too.

use std::io::{self, Read};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The buffer's first allocation; it grows only as real bytes arrive.
const INITIAL_BUFFER: usize = 2048;

/// A client connection with its read buffer.
pub struct Conn {
    /// Shared so that another thread may write a response to this socket
    /// (see `mode/queue.rs`) without a second descriptor; it closes when the
    /// last holder drops it.
    stream: Arc<TcpStream>,
    peer: Option<SocketAddr>,
    /// The read timeout last set, so it is set again only when it changes.
    read_timeout: Option<Duration>,
    /// How long the connection may stay idle, or a transfer stall.
    idle_timeout: Duration,
    /// When the last response ended, if another thread wrote it: the idle
    /// time before the next request counts from then.
    idle_since: Option<Instant>,
    /// Bytes read from the socket; `buf[pos..len]` are not yet used.
    buf: Vec<u8>,
    pos: usize,
    len: usize,
}

impl Conn {
    /// Wraps an accepted socket, turning on TCP_NODELAY and TCP keepalive and
    /// setting the write timeout that ends stalled transfers (`idle_timeout`).
    pub fn new(stream: TcpStream, idle_timeout: Duration) -> Conn {
        // Small exchanges must not wait for delayed ACKs (Nagle).
        let _ = stream.set_nodelay(true);
        set_keepalive(&stream);
        let _ = stream.set_write_timeout(Some(idle_timeout));
        let peer = stream.peer_addr().ok();
        Conn {
            stream: Arc::new(stream),
            peer,
            read_timeout: None,
            idle_timeout,
            idle_since: None,
            buf: Vec::new(),
            pos: 0,
            len: 0,
        }
    }

    /// The socket, for writing.
    pub fn stream(&self) -> &TcpStream {
        &self.stream
    }

    /// A handle on the socket that another thread may write to.
    pub fn shared_stream(&self) -> Arc<TcpStream> {
        Arc::clone(&self.stream)
    }

    /// The socket's descriptor, for poll(2).
    pub fn fd(&self) -> RawFd {
        self.stream.as_raw_fd()
    }

    /// How long the connection may stay idle, or a transfer stall.
    pub fn idle_timeout(&self) -> Duration {
        self.idle_timeout
    }

    /// Records that the last response ended at `at` (written by another
    /// thread): the wait for the next request counts from then.
    pub fn set_idle_since(&mut self, at: Instant) {
        self.idle_since = Some(at);
    }

    /// When the connection became idle, if not just now; forgotten once read.
    pub fn take_idle_since(&mut self) -> Option<Instant> {
        self.idle_since.take()
    }

    /// The client's address, for logs.
    pub fn peer(&self) -> Option<SocketAddr> {
        self.peer
    }

    /// Bytes read but not yet used.
    pub fn buffered(&self) -> &[u8] {
        &self.buf[self.pos..self.len]
    }

    /// Marks `n` buffered bytes as used.
    pub fn consume(&mut self, n: usize) {
        self.pos = (self.pos + n).min(self.len);
        if self.pos == self.len {
            self.pos = 0;
            self.len = 0;
        }
    }

    /// Reads once from the socket into the buffer, letting the buffer hold at
    /// most `limit` unused bytes. Returns how many bytes arrived (0: end of stream).
    pub fn fill(&mut self, limit: usize) -> io::Result<usize> {
        self.fill_with(limit, 0)
    }

    fn fill_with(&mut self, limit: usize, flags: libc::c_int) -> io::Result<usize> {
        if self.pos > 0 {
            self.buf.copy_within(self.pos..self.len, 0);
            self.len -= self.pos;
            self.pos = 0;
        }
        if self.len >= limit {
            return Err(io::Error::new(
                io::ErrorKind::OutOfMemory,
                "buffer limit reached",
            ));
        }
        if self.len == self.buf.len() {
            let grown = (self.buf.len() * 2).clamp(INITIAL_BUFFER, limit);
            self.buf.resize(grown, 0);
        }
        let end = self.buf.len().min(limit);
        let n = if flags == 0 {
            (&*self.stream).read(&mut self.buf[self.len..end])?
        } else {
            recv(&self.stream, &mut self.buf[self.len..end], flags)?
        };
        self.len += n;
        Ok(n)
    }

    /// Reads whatever the socket already holds, without waiting, until the
    /// buffer holds `limit` unused bytes; true when it found the end of the
    /// stream (the client closed its side). Afterwards the peek that
    /// [`is_open`] falls back on off Linux sees a hang-up queued behind
    /// those bytes.
    pub fn read_ahead(&mut self, limit: usize) -> io::Result<bool> {
        while self.len - self.pos < limit {
            match self.fill_with(limit, libc::MSG_DONTWAIT) {
                Ok(0) => return Ok(true),
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(false)
    }

    /// Sets the socket's read timeout (a system call only when it changes).
    pub fn set_read_timeout(&mut self, timeout: Duration) -> io::Result<()> {
        let timeout = Some(timeout.max(Duration::from_millis(1)));
        if self.read_timeout != timeout {
            self.stream.set_read_timeout(timeout)?;
            self.read_timeout = timeout;
        }
        Ok(())
    }

    /// Closes after a response that left request bytes unread: stops writing,
    /// then reads and drops what the client still sends for a short while, so
    /// the kernel does not answer those bytes with a reset that could destroy
    /// the response before the client reads it (RFC 9112 §9.6).
    pub fn linger_close(self) {
        let _ = self.stream.shutdown(Shutdown::Write);
        let deadline = Instant::now() + Duration::from_secs(1);
        let mut drained = 0usize;
        let mut scratch = [0u8; 4096];
        while drained < 4 << 20 {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() || self.stream.set_read_timeout(Some(left)).is_err() {
                break;
            }
            match (&*self.stream).read(&mut scratch) {
                Ok(0) | Err(_) => break,
                Ok(n) => drained += n,
            }
        }
    }
}

impl Read for Conn {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        if self.pos == self.len {
            // Nothing buffered: large reads go straight to the socket.
            return (&*self.stream).read(out);
        }
        let n = out.len().min(self.len - self.pos);
        out[..n].copy_from_slice(&self.buf[self.pos..self.pos + n]);
        self.consume(n);
        Ok(n)
    }
}

/// Whether the peer of `stream` may still be there: false once it has closed
/// or reset the connection, even with bytes of its still unread. Never blocks
/// and never consumes bytes. A client that half-closes counts as gone.
pub fn is_open(stream: &TcpStream) -> bool {
    #[cfg(target_os = "linux")]
    if let Some(established) = is_established(stream) {
        return established;
    }
    // Elsewhere: peek. Bytes waiting to be read count as open, so read them
    // ahead first (see [`Conn::read_ahead`]).
    let mut byte = [0u8; 1];
    match recv(stream, &mut byte, libc::MSG_PEEK | libc::MSG_DONTWAIT) {
        Ok(n) => n > 0,
        Err(e) => matches!(
            e.kind(),
            io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
        ),
    }
}

/// TCP_ESTABLISHED from the kernel's include/net/tcp_states.h (libc has no constant for it).
#[cfg(target_os = "linux")]
const TCP_ESTABLISHED: u8 = 1;

/// The kernel's view of the connection (TCP_INFO): whether it is still
/// ESTABLISHED. CLOSE_WAIT means the peer's FIN arrived, whatever is still
/// unread; CLOSE means it reset. None if the kernel would not say.
#[cfg(target_os = "linux")]
fn is_established(stream: &TcpStream) -> Option<bool> {
    // SAFETY: tcp_info is plain data, valid when zeroed.
    let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
    // SAFETY: the pointer and length describe `info`, a live tcp_info that
    // the kernel fills (possibly partly; tcpi_state is its first byte), and
    // the descriptor is owned by `stream` for the duration of the call.
    let rc = unsafe {
        libc::getsockopt(
            stream.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            (&mut info as *mut libc::tcp_info).cast(),
            &mut len,
        )
    };
    (rc == 0 && len > 0).then_some(info.tcpi_state == TCP_ESTABLISHED)
}

/// recv(2) with `flags` (e.g. MSG_DONTWAIT: never blocks, whatever the socket's mode).
fn recv(stream: &TcpStream, out: &mut [u8], flags: libc::c_int) -> io::Result<usize> {
    // SAFETY: `out` is valid for `out.len()` bytes of writes for the duration
    // of the call, and the descriptor is owned by `stream`, which outlives it.
    let n = unsafe {
        libc::recv(
            stream.as_raw_fd(),
            out.as_mut_ptr().cast(),
            out.len(),
            flags,
        )
    };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(n as usize)
}

/// Turns on TCP keepalive so a peer that vanished without a FIN is noticed
/// eventually, even by a waiter that never writes.
fn set_keepalive(stream: &TcpStream) {
    if let Err(e) = crate::sys::keepalive(stream.as_raw_fd(), None) {
        log::debug!("SO_KEEPALIVE: {e}");
    }
}
