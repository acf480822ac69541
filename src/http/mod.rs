//! patchcord's HTTP/1.1 layer, on httparse: one [`Exchange`] per request on a
//! [`Conn`]. It knows framing, limits and timeouts, and nothing of channels or
//! modes; `server.rs` drives it and the modes read bodies and write responses
//! through it. The exchange records the status and body bytes of its
//! response, also when another thread wrote it, for `app.rs` to observe.
//!
//! - `conn.rs`: the socket, its read buffer, liveness probes
//! - `request.rs`: request heads and their limits
//! - `body.rs`: request bodies (Content-Length, chunked, 100-continue)
//! - `response.rs`: response heads and streamed bodies
//! - `splice.rs`: socket-to-socket copies inside the kernel (Linux)

pub mod body;
pub mod conn;
pub mod request;
pub mod response;
#[cfg(target_os = "linux")]
pub mod splice;

use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::time::Instant;

pub use body::BodyState;
pub use conn::{Conn, is_open};
pub use request::{Framing, Method, Request, Version};
pub use response::{Common, Head, Payload, StreamError};

use crate::error::Reject;

/// One request on a connection: its head, how much of its body was read, and
/// what was answered. Decides whether the connection can serve another.
pub struct Exchange<'c> {
    pub conn: &'c mut Conn,
    pub request: Request,
    /// The headers every response carries.
    common: &'c Common,
    /// When the request's head was read.
    started: Instant,
    body: BodyState,
    /// Chunked body bytes still allowed by [`Exchange::limit_body`].
    allowance: Option<u64>,
    continue_pending: bool,
    /// The status of the response, once one was written or started.
    status: Option<u16>,
    /// Body bytes of the response written so far.
    sent: u64,
    /// When the response ended, if another thread wrote it.
    finished_at: Option<Instant>,
    /// The thread that wrote the response also counted this request done.
    released: bool,
    close: bool,
}

impl<'c> Exchange<'c> {
    /// Starts an exchange for `request`, read from `conn`; its responses
    /// carry the `common` headers.
    pub fn new(conn: &'c mut Conn, request: Request, common: &'c Common) -> Exchange<'c> {
        Exchange {
            body: BodyState::new(request.framing),
            allowance: None,
            continue_pending: request.expects_continue,
            conn,
            request,
            common,
            started: Instant::now(),
            status: None,
            sent: 0,
            finished_at: None,
            released: false,
            close: false,
        }
    }

    /// When the request's head was read.
    pub fn started(&self) -> Instant {
        self.started
    }

    /// The headers every response carries, for a response this exchange
    /// writes to another client.
    pub fn common(&self) -> &'c Common {
        self.common
    }

    /// The body's length, when the request declares it.
    pub fn body_length(&self) -> Option<u64> {
        match self.request.framing {
            Framing::Length(n) => Some(n),
            Framing::Chunked => None,
        }
    }

    /// Caps the body at `max` bytes: 413 now when its Content-Length says
    /// more (nothing of it read); a chunked body fails to read (an error of
    /// kind `FileTooLarge`) before the chunk that would pass the cap.
    pub fn limit_body(&mut self, max: u64) -> Result<(), Reject> {
        match self.request.framing {
            Framing::Length(n) if n > max => {
                self.close();
                Err(body::too_large())
            }
            Framing::Length(_) => Ok(()),
            Framing::Chunked => {
                self.allowance = Some(max);
                Ok(())
            }
        }
    }

    /// Whether the request has a body (possibly not yet read).
    pub fn has_body(&self) -> bool {
        self.request.framing != Framing::Length(0)
    }

    /// Whether the request's body was read to its end.
    pub fn is_body_read(&self) -> bool {
        self.body == BodyState::Done
    }

    /// Whether a response was written (or started) for this request.
    pub fn is_responded(&self) -> bool {
        self.status.is_some()
    }

    /// The status of the response, once one was written or started.
    pub fn status(&self) -> Option<u16> {
        self.status
    }

    /// Body bytes of the response written so far.
    pub fn sent(&self) -> u64 {
        self.sent
    }

    /// Counts `n` more body bytes written for a response this exchange started.
    pub fn add_sent(&mut self, n: u64) {
        self.sent += n;
    }

    /// Asks for the connection to be closed after this exchange.
    pub fn close(&mut self) {
        self.close = true;
    }

    /// Records that another thread answered this request on a clone of the
    /// socket, with `status` and `sent` body bytes; `reusable` is false when
    /// that answer ended the connection.
    pub fn mark_responded(&mut self, status: u16, sent: u64, reusable: bool) {
        self.status = Some(status);
        self.sent = sent;
        self.close |= !reusable;
    }

    /// Records when another thread finished this request's response: its
    /// duration ends there, and the connection's idle time starts there.
    pub fn mark_finished(&mut self, at: Instant) {
        self.finished_at = Some(at);
        self.conn.set_idle_since(at);
    }

    /// When the response was finished by another thread, if it was.
    pub fn finished_at(&self) -> Option<Instant> {
        self.finished_at
    }

    /// Records that the thread that finished the response also observed the
    /// request and counted it as no longer in progress.
    pub fn mark_released(&mut self) {
        self.released = true;
    }

    /// Whether another thread observed the request and counted it as no
    /// longer in progress.
    pub fn is_released(&self) -> bool {
        self.released
    }

    /// Whether the connection can carry another request.
    pub fn is_reusable(&self) -> bool {
        self.is_responded() && !self.close && self.request.keep_alive && self.is_body_read()
    }

    /// Whether a response may keep the connection open, as far as is known now.
    fn keeps_alive(&self) -> bool {
        !self.close && self.request.keep_alive && self.is_body_read()
    }

    /// Tells a client that waits for `100 Continue` to send its body now,
    /// before anything else may be written to it.
    pub fn send_continue(&mut self) -> io::Result<()> {
        if self.continue_pending {
            self.continue_pending = false;
            let mut stream = self.conn.stream();
            io::Write::write_all(&mut stream, b"HTTP/1.1 100 Continue\r\n\r\n")?;
        }
        Ok(())
    }

    /// Reads whatever of the body the socket already holds, without waiting
    /// and without sending `100 Continue` (a client that tired of waiting for
    /// it may have sent its body anyway); see [`Conn::read_ahead`].
    pub fn read_ahead(&mut self, limit: usize) -> io::Result<()> {
        let buffered = self.conn.buffered().len() as u64;
        match self.body {
            // Nothing of the body is left on the socket: a probe sees what follows.
            BodyState::Done => Ok(()),
            BodyState::Length(left) if buffered >= left => Ok(()),
            _ => self.conn.read_ahead(limit).map(|_| ()),
        }
    }

    /// Takes the whole body out of the connection's buffer when it is
    /// already there, declared by a Content-Length of at most `max` bytes
    /// and not held back for `100 Continue`. No liveness probe is made: the
    /// caller probes the client before the body is relayed.
    pub fn take_buffered_body(&mut self, max: usize) -> Option<Vec<u8>> {
        let BodyState::Length(length) = self.body else {
            return None;
        };
        let length = usize::try_from(length).ok().filter(|&n| n <= max)?;
        if self.continue_pending || self.conn.buffered().len() < length {
            return None;
        }
        let body = self.conn.buffered()[..length].to_vec();
        self.conn.consume(length);
        self.body = BodyState::Done;
        Some(body)
    }

    /// Streams this request's body, after `head`, into `sink` (another
    /// client's socket), framed by `payload`. A large Content-Length body is
    /// spliced inside the kernel; anything else is copied through a buffer.
    pub fn stream_body_to(
        &mut self,
        head: &[u8],
        sink: &TcpStream,
        payload: Payload,
    ) -> Result<u64, StreamError> {
        #[cfg(target_os = "linux")]
        if let (BodyState::Length(left), Payload::Length(length)) = (self.body, payload) {
            if left == length && length >= splice::SPLICE_MIN {
                if let Ok(pipe) = splice::Pipe::new() {
                    return self.splice_body_to(head, sink, &pipe, length);
                }
            }
        }
        let mut sink = sink;
        response::stream_body(head, self, &mut sink, payload)
    }

    #[cfg(target_os = "linux")]
    fn splice_body_to(
        &mut self,
        head: &[u8],
        sink: &TcpStream,
        pipe: &splice::Pipe,
        length: u64,
    ) -> Result<u64, StreamError> {
        // The first bytes, and whatever else is already buffered, go the
        // ordinary way: a producer gone before its first byte leaves the
        // consumer untouched (sent: 0), as in the copy loop.
        let mut buf = vec![0u8; 16 * 1024];
        let mut sent = self.forward(&mut buf, head, sink, 0)?;
        while !self.conn.buffered().is_empty() && !self.is_body_read() {
            sent += self.forward(&mut buf, &[], sink, sent)?;
        }
        let BodyState::Length(left) = self.body else {
            return Ok(length);
        };
        // All but the last byte move inside the kernel. The last is read the
        // ordinary way, which checks that the client is still there before
        // the consumer's response is complete.
        let moved = splice::splice_exact(self.conn.stream(), sink, pipe, left - 1, sent)?;
        self.body = BodyState::Length(left - moved);
        sent += moved;
        while !self.is_body_read() {
            sent += self.forward(&mut buf[..1], &[], sink, sent)?;
        }
        Ok(length)
    }

    /// Reads some of the body into `buf` and writes it, after `head`, to
    /// `sink`; returns the bytes written. `sent` (bytes the sink already got)
    /// goes into a read error.
    #[cfg(target_os = "linux")]
    fn forward(
        &mut self,
        buf: &mut [u8],
        head: &[u8],
        sink: &TcpStream,
        sent: u64,
    ) -> Result<u64, StreamError> {
        let n = match self.read(buf) {
            Ok(0) => Err(body::early_end()),
            other => other,
        }
        .map_err(|error| StreamError::Read { error, sent })?;
        response::write_all(&mut &*sink, [head, &buf[..n]]).map_err(StreamError::Write)?;
        Ok((head.len() + n) as u64)
    }

    /// Starts a response whose body the caller streams: the head, with the
    /// keep-alive decision made now (a body not yet read closes the
    /// connection). The caller counts the body bytes with [`Exchange::add_sent`].
    pub fn start_response(&mut self, head: Head, payload: Payload) -> Vec<u8> {
        self.status = Some(head.status());
        let keep_alive = self.keeps_alive() && payload != Payload::UntilClose;
        self.close |= !keep_alive;
        head.finish(payload, keep_alive, self.common)
    }

    /// Sends a complete response with a small body.
    pub fn respond(&mut self, head: Head, body: &[u8]) -> io::Result<()> {
        let mut bytes = self.start_response(head, Payload::Length(body.len() as u64));
        if self.request.method != Method::Head {
            bytes.extend_from_slice(body);
        }
        let mut stream = self.conn.stream();
        stream.write_all(&bytes)?;
        if self.request.method != Method::Head {
            self.sent += body.len() as u64;
        }
        Ok(())
    }

    /// Accepts a protocol upgrade (`101 Switching Protocols`, its headers in
    /// `head`): writes the head, and hands over what the connection read
    /// past the request, the new protocol's first bytes. The socket is then
    /// the caller's (`self.conn.stream()`); the connection closes after.
    pub fn upgrade(&mut self, head: Head) -> io::Result<Vec<u8>> {
        self.close = true;
        let status = head.status();
        let bytes = head.finish(Payload::None, true, self.common);
        let mut stream = self.conn.stream();
        stream.write_all(&bytes)?;
        self.status = Some(status);
        let early = self.conn.buffered().to_vec();
        self.conn.consume(early.len());
        Ok(early)
    }

    /// Sends a one-line plain-text response.
    pub fn respond_text(&mut self, status: u16, text: &str) -> io::Result<()> {
        let mut head = Head::new(status);
        head.header("Content-Type", "text/plain; charset=utf-8");
        let body = format!("{text}\n");
        self.respond(head, body.as_bytes())
    }

    /// Answers with a refusal: its status, its headers, its reason as the body.
    pub fn reject(&mut self, reject: &Reject) -> io::Result<()> {
        let (head, body) = refusal(reject);
        self.respond(head, body.as_bytes())
    }
}

/// The head and body that answer `reject`.
fn refusal(reject: &Reject) -> (Head, String) {
    let mut head = Head::new(reject.status);
    head.header("Content-Type", "text/plain; charset=utf-8");
    for (name, value) in &reject.headers {
        head.header(name, value.as_bytes());
    }
    (head, format!("{}\n", reject.reason))
}

/// Answers `reject` on a connection that has no request to speak of (a
/// malformed head, or one refused at accept), closing it afterwards.
pub fn refuse(
    mut stream: &std::net::TcpStream,
    reject: &Reject,
    common: &Common,
) -> io::Result<()> {
    let (head, body) = refusal(reject);
    let mut bytes = head.finish(Payload::Length(body.len() as u64), false, common);
    bytes.extend_from_slice(body.as_bytes());
    stream.write_all(&bytes)
}

impl Read for Exchange<'_> {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        body::BodyReader {
            conn: self.conn,
            state: &mut self.body,
            continue_pending: &mut self.continue_pending,
            allowance: &mut self.allowance,
            responded: self.status.is_some(),
        }
        .read(out)
    }
}
