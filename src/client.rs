//! The HTTP/1.1 client of the client-side subcommands (`fifo`, `listen`,
//! `work`): one keep-alive connection per [`Client`], requests with a body
//! given whole or streamed chunked from a reader, responses read as a
//! stream ([`Incoming`]), and waits that give up when a watched descriptor
//! fires (the stop flag, or a FIFO whose reader left), closing the socket
//! so that the relay withdraws the request: a receive cancelled this way
//! takes nothing, since the relay never pairs a waiter that hung up. Plain
//! `http://` only; the reconnect policy ([`Backoff`]) lives here too.

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream, ToSocketAddrs};
use std::os::fd::{AsRawFd, RawFd};
use std::time::{Duration, Instant};

use crate::sys;

/// How long writing a request, and each read of a response (once its head
/// has begun), may take.
const IO_TIMEOUT: Duration = Duration::from_secs(30);

/// How long connecting may take (short: a stop waits for it).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// How long a withdrawn request waits for the relay to close it, or for an
/// answer it had already begun to send.
const WITHDRAW_GRACE: Duration = Duration::from_secs(5);

/// TCP keepalive probes: the first after 30 s of quiet, then every 10 s,
/// three unanswered end the connection.
const KEEPALIVE: (u32, u32, u32) = (30, 10, 3);

/// The longest response head accepted.
const MAX_HEAD: usize = 64 * 1024;

/// The longest chunk-size or trailer line accepted.
const MAX_LINE: usize = 4096;

/// How much of a streamed request body goes in one chunk.
const CHUNK: usize = 64 * 1024;

/// Where the relay is.
#[derive(Debug, Clone)]
pub struct Relay {
    /// `host:port`, for the Host header.
    host: String,
    addrs: Vec<SocketAddr>,
    /// The URL's path, without a trailing `/` (channels go under it).
    base: String,
}

impl Relay {
    /// Reads `http://host[:port][/path]`.
    pub fn parse(url: &str) -> Result<Relay, String> {
        let rest = url
            .strip_prefix("http://")
            .ok_or_else(|| format!("{url:?}: only http:// URLs (put TLS in a proxy in front)"))?;
        let (host, base) = match rest.find('/') {
            Some(at) => (&rest[..at], rest[at..].trim_end_matches('/')),
            None => (rest, ""),
        };
        if host.is_empty() {
            return Err(format!("{url:?} has no host"));
        }
        if base
            .bytes()
            .any(|b| b <= b' ' || b == b'?' || b == b'#' || b == 0x7f)
        {
            return Err(format!("{url:?}: a path without spaces, ? or #"));
        }
        let with_port = if host
            .rsplit_once(':')
            .is_some_and(|(_, p)| p.parse::<u16>().is_ok())
        {
            host.to_owned()
        } else {
            format!("{host}:80")
        };
        let addrs: Vec<SocketAddr> = with_port
            .to_socket_addrs()
            .map_err(|e| format!("{url:?}: cannot resolve {host}: {e}"))?
            .collect();
        Ok(Relay {
            host: host.to_owned(),
            addrs,
            base: base.to_owned(),
        })
    }

    /// The request target of `channel` (`jobs` or `/jobs`) under the URL.
    pub fn target(&self, channel: &str) -> String {
        format!("{}/{}", self.base, channel.trim_start_matches('/'))
    }

    /// The URL's own path (`/` when it had none).
    pub fn path(&self) -> &str {
        if self.base.is_empty() {
            "/"
        } else {
            &self.base
        }
    }
}

/// A response read whole: its status and body.
#[derive(Debug)]
pub struct Response {
    pub status: u16,
    pub body: Vec<u8>,
    /// The body was longer than allowed and was read and dropped.
    pub oversized: bool,
}

/// How a request ended.
#[derive(Debug)]
pub enum Outcome {
    Answered(Response),
    /// Watched descriptor `watch` fired before the response began: the
    /// request was withdrawn (its connection closed). `sure`: the relay
    /// closed it without an answer, so it took nothing; else it did not
    /// answer within the grace, and may have.
    Withdrawn {
        watch: usize,
        sure: bool,
    },
    /// The relay could not be reached, or the connection broke.
    Failed(io::Error),
}

/// A request's body.
pub enum Upload<'a> {
    None,
    Bytes(&'a [u8]),
    /// Sent chunked as the reader gives it. A read error ends the request
    /// without its last chunk (the relay sees the body cut).
    Stream(&'a mut dyn Read),
}

/// A response head.
#[derive(Debug)]
pub struct Head {
    pub status: u16,
    pub headers: Vec<(String, Vec<u8>)>,
}

impl Head {
    /// The first header called `name`, as text.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .and_then(|(_, v)| std::str::from_utf8(v).ok())
            .map(str::trim)
    }
}

/// One keep-alive connection to the relay, opened when needed.
pub struct Client {
    relay: Relay,
    stream: Option<TcpStream>,
    /// Sent as `Patch-Token`, so that a request's own `Authorization` travels.
    token: Option<String>,
    /// A watched descriptor that fires resets the connection at once,
    /// rather than withdrawing the request and waiting for an answer
    /// already under way (see [`Client::abandoning`]).
    abandon: bool,
    /// The latest a watched request's answer may start; past it the request
    /// is reset and fails with `TimedOut` (None: as long as it takes).
    deadline: Option<Instant>,
}

impl Client {
    /// A client of `relay`; it connects at its first request.
    pub fn new(relay: Relay) -> Client {
        Client {
            relay,
            stream: None,
            token: None,
            abandon: false,
            deadline: None,
        }
    }

    /// A client whose watched requests give up (reset, `TimedOut`) when
    /// their answer has not started by `deadline`.
    pub fn answered_by(mut self, deadline: Instant) -> Client {
        self.deadline = Some(deadline);
        self
    }

    /// A client whose request, when a watched descriptor fires, is
    /// abandoned: the connection is reset at once, so that the relay (and
    /// a proxy between) sees its waiter gone; an answer under way is
    /// refused rather than taken. For a client that could not use it.
    pub fn abandoning(mut self) -> Client {
        self.abandon = true;
        self
    }

    /// The client presents `token` to the relay.
    pub fn with_token(mut self, token: Option<String>) -> Client {
        self.token = token.filter(|t| !t.is_empty());
        self
    }

    /// Where the relay is.
    pub fn relay(&self) -> &Relay {
        &self.relay
    }

    fn connect(&mut self) -> io::Result<&mut TcpStream> {
        if self.stream.is_none() {
            let mut last = io::Error::new(io::ErrorKind::NotFound, "no address");
            for addr in &self.relay.addrs {
                match TcpStream::connect_timeout(addr, CONNECT_TIMEOUT) {
                    Ok(stream) => {
                        stream.set_nodelay(true)?;
                        // A relay that vanished is noticed within a minute,
                        // even by a request waiting for its answer.
                        sys::keepalive(stream.as_raw_fd(), Some(KEEPALIVE))?;
                        stream.set_write_timeout(Some(IO_TIMEOUT))?;
                        stream.set_read_timeout(Some(IO_TIMEOUT))?;
                        self.stream = Some(stream);
                        break;
                    }
                    Err(e) => last = e,
                }
            }
            if self.stream.is_none() {
                return Err(last);
            }
        }
        Ok(self.stream.as_mut().expect("connected"))
    }

    /// Closes the connection, so that the relay sees the client gone.
    pub fn disconnect(&mut self) {
        if let Some(stream) = self.stream.take() {
            let _ = stream.shutdown(Shutdown::Both);
        }
    }

    /// Sends `method target` with `body` (a GET has none) and waits for the
    /// answer, giving up when one of `watch` (descriptor, events) fires
    /// first. A body over `max_body` is read and dropped (`oversized`).
    pub fn request(
        &mut self,
        method: &str,
        target: &str,
        body: Option<&[u8]>,
        watch: &[(RawFd, libc::c_short)],
        max_body: usize,
    ) -> Outcome {
        let upload = || body.map_or(Upload::None, Upload::Bytes);
        let incoming = match self.open(method, target, &[], upload(), watch) {
            Ok(incoming) => incoming,
            Err(Failure::Io(e)) => return Outcome::Failed(e),
            Err(Failure::Withdrawn(watch, sure)) => return Outcome::Withdrawn { watch, sure },
        };
        let status = incoming.head.status;
        match incoming.read_whole(max_body) {
            Ok((body, oversized)) => Outcome::Answered(Response {
                status,
                body,
                oversized,
            }),
            Err(e) => Outcome::Failed(e),
        }
    }

    /// Sends a request with `headers` and `body`, and waits for the head of
    /// its answer, giving up when one of `watch` fires first (the request
    /// is then withdrawn: an answer that still comes within the grace is
    /// returned, else [`Failure::Withdrawn`]). The body of the answer is
    /// read from the returned [`Incoming`], which keeps the connection
    /// only if it is read to its end.
    pub fn open(
        &mut self,
        method: &str,
        target: &str,
        headers: &[(&str, &[u8])],
        mut body: Upload<'_>,
        watch: &[(RawFd, libc::c_short)],
    ) -> Result<Incoming<'_>, Failure> {
        // A kept connection the relay closed meanwhile fails on first use:
        // one retry on a fresh connection, when nothing can have been taken
        // (it closed before answering anything). A streamed body, which
        // cannot be sent twice, always goes on a fresh connection.
        if matches!(body, Upload::Stream(_)) {
            self.disconnect();
        }
        let mut attempt = 0;
        let (parsed, buffered, reusable) = loop {
            let fresh = self.stream.is_none();
            match self.exchange(method, target, headers, &mut body, watch) {
                Ok(answer) => break answer,
                Err(Failure::Io(e)) if !fresh && attempt == 0 && is_stale(&e) => {
                    attempt += 1;
                    self.stream = None;
                }
                Err(Failure::Io(e)) => {
                    self.stream = None;
                    return Err(Failure::Io(e));
                }
                Err(withdrawn) => {
                    self.disconnect();
                    return Err(withdrawn);
                }
            }
        };
        Ok(self.incoming(parsed, buffered, reusable))
    }

    fn exchange(
        &mut self,
        method: &str,
        target: &str,
        headers: &[(&str, &[u8])],
        body: &mut Upload<'_>,
        watch: &[(RawFd, libc::c_short)],
    ) -> Result<(Parsed, Vec<u8>, bool), Failure> {
        let host = self.relay.host.clone();
        let token = self.token.clone();
        let (abandon, deadline) = (self.abandon, self.deadline);
        let stream = self.connect().map_err(Failure::Io)?;
        stream
            .set_read_timeout(Some(IO_TIMEOUT))
            .map_err(Failure::Io)?;
        let mut head = format!("{method} {target} HTTP/1.1\r\nHost: {host}\r\n").into_bytes();
        if let Some(token) = token {
            head.extend_from_slice(format!("Patch-Token: {token}\r\n").as_bytes());
        }
        for (name, value) in headers {
            head.extend_from_slice(name.as_bytes());
            head.extend_from_slice(b": ");
            head.extend_from_slice(value);
            head.extend_from_slice(b"\r\n");
        }
        match body {
            Upload::None => {}
            Upload::Bytes(bytes) => {
                if !headers
                    .iter()
                    .any(|(n, _)| n.eq_ignore_ascii_case("content-type"))
                {
                    head.extend_from_slice(b"Content-Type: application/octet-stream\r\n");
                }
                head.extend_from_slice(format!("Content-Length: {}\r\n", bytes.len()).as_bytes());
            }
            Upload::Stream(_) => head.extend_from_slice(b"Transfer-Encoding: chunked\r\n"),
        }
        head.extend_from_slice(b"\r\n");
        match body {
            Upload::None => stream.write_all(&head).map_err(Failure::Io)?,
            Upload::Bytes(bytes) => {
                head.extend_from_slice(bytes);
                stream.write_all(&head).map_err(Failure::Io)?;
            }
            Upload::Stream(reader) => {
                stream.write_all(&head).map_err(Failure::Io)?;
                match send_chunked(stream, *reader) {
                    Ok(()) => {}
                    // The relay refused the body and closed: its answer may
                    // be waiting (a 410, a 413); read it if it is.
                    Err(Sent::Write(e)) => {
                        let _ = stream.set_read_timeout(Some(Duration::from_millis(500)));
                        let read = read_head(stream);
                        let _ = stream.set_read_timeout(Some(IO_TIMEOUT));
                        return match read {
                            Ok((head, buffered)) => Ok((head, buffered, false)),
                            Err(_) => Err(Failure::Io(e)),
                        };
                    }
                    Err(Sent::Source(e)) => {
                        self.disconnect();
                        return Err(Failure::Io(io::Error::new(
                            e.kind(),
                            format!("the body was cut: {e}"),
                        )));
                    }
                }
            }
        }
        // Wait for the first byte of the answer, or a watched descriptor.
        if !watch.is_empty() {
            let mut fds = vec![(stream.as_raw_fd(), libc::POLLIN)];
            fds.extend_from_slice(watch);
            loop {
                let left = deadline.map(|d| d.saturating_duration_since(Instant::now()));
                let ready = sys::poll(&fds, left).map_err(Failure::Io)?;
                if ready[0].readable || ready[0].error {
                    break;
                }
                if left.is_some_and(|left| left.is_zero()) {
                    sys::reset(stream.as_raw_fd());
                    self.stream = None;
                    return Err(Failure::Io(io::Error::new(
                        io::ErrorKind::TimedOut,
                        "no answer in time",
                    )));
                }
                if let Some(n) = ready[1..].iter().position(|r| r.readable || r.error) {
                    if abandon {
                        if !ready[n + 1].error && !sys::peer_closed(fds[n + 1].0) {
                            // Its next request, pipelined: it is still
                            // there. Not watched any more: its read will
                            // tell.
                            fds.remove(n + 1);
                            continue;
                        }
                        sys::reset(stream.as_raw_fd());
                        self.stream = None;
                        return Err(Failure::Withdrawn(n, false));
                    }
                    // Withdraw by half-closing: the relay sees the client
                    // gone and unparks it, answering nothing, or it had
                    // already paired it and the answer comes. Either way
                    // nothing is lost here: an answer that comes is
                    // returned (its message kept).
                    let _ = stream.shutdown(Shutdown::Write);
                    let _ = stream.set_read_timeout(Some(WITHDRAW_GRACE));
                    return match read_head(stream) {
                        Ok((head, buffered)) => Ok((head, buffered, false)),
                        Err(e) => Err(Failure::Withdrawn(
                            n,
                            e.kind() == io::ErrorKind::UnexpectedEof
                                || e.kind() == io::ErrorKind::ConnectionReset,
                        )),
                    };
                }
            }
        }
        let (head, buffered) = read_head(stream).map_err(Failure::Io)?;
        Ok((head, buffered, true))
    }

    fn incoming(&mut self, parsed: Parsed, buffered: Vec<u8>, reusable: bool) -> Incoming<'_> {
        let Parsed {
            head,
            framing,
            close,
        } = parsed;
        Incoming {
            head,
            body: BodyReader {
                framing,
                buffered,
                at: 0,
                chunk_left: 0,
                crlf_due: false,
                done: false,
                watch: None,
            },
            keep: reusable && !close && !matches!(framing, Framing::UntilClose),
            client: self,
        }
    }
}

/// Why a request got no answer.
#[derive(Debug)]
pub enum Failure {
    Io(io::Error),
    /// Watched descriptor `.0` fired first; `.1`: surely nothing was taken.
    Withdrawn(usize, bool),
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Failure::Io(e) => write!(f, "{e}"),
            Failure::Withdrawn(..) => f.write_str("withdrawn"),
        }
    }
}

/// Why a streamed body was not sent whole: the relay's side broke, or
/// the reader it came from failed.
enum Sent {
    Write(io::Error),
    Source(io::Error),
}

/// Sends what `reader` gives as chunks, then the last chunk.
fn send_chunked(stream: &mut TcpStream, reader: &mut dyn Read) -> Result<(), Sent> {
    let mut buf = vec![0u8; CHUNK + 16];
    loop {
        // Room for the size line in front of the data, so one write each.
        let n = loop {
            match reader.read(&mut buf[10..10 + CHUNK]) {
                Ok(n) => break n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(Sent::Source(e)),
            }
        };
        if n == 0 {
            return stream.write_all(b"0\r\n\r\n").map_err(Sent::Write);
        }
        let size = format!("{n:x}\r\n");
        let start = 10 - size.len();
        buf[start..10].copy_from_slice(size.as_bytes());
        buf[10 + n..12 + n].copy_from_slice(b"\r\n");
        stream.write_all(&buf[start..12 + n]).map_err(Sent::Write)?;
    }
}

/// Checks a token given to a subcommand: printable ASCII, since it goes
/// into a header (the reason never quotes it: it is a secret).
pub fn check_token(token: Option<&str>) -> Result<(), String> {
    match token {
        Some(token) if !token.bytes().all(|b| (b' '..0x7f).contains(&b)) => Err(
            "--token (or PATCHCORD_TOKEN) must be printable ASCII, without line breaks".to_owned(),
        ),
        _ => Ok(()),
    }
}

/// A refusal that asking again will not change: a 4xx other than 408
/// (nobody came in time), 410 (the channel was deleted: it comes back with
/// its next use) and 429 (rate limited).
pub fn is_final(status: u16) -> bool {
    (400..500).contains(&status) && !matches!(status, 408 | 410 | 429)
}

/// How a response body is framed.
#[derive(Debug, Clone, Copy)]
enum Framing {
    Length(u64),
    Chunked,
    UntilClose,
}

/// A response head and how its body is framed.
struct Parsed {
    head: Head,
    framing: Framing,
    close: bool,
}

/// Reads a response head (skipping 1xx ones); and what came after it. The
/// error is of a kind [`is_stale`] accepts only when nothing was read.
fn read_head<R: Read + ?Sized>(stream: &mut R) -> io::Result<(Parsed, Vec<u8>)> {
    let mut buf = Vec::with_capacity(4096);
    let mut chunk = [0u8; 8192];
    loop {
        let n = match stream.read(&mut chunk) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) if !buf.is_empty() => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("the response's head was cut: {e}"),
                ));
            }
            Err(e) => return Err(e),
        };
        if n == 0 {
            return Err(if buf.is_empty() {
                io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the relay closed the connection",
                )
            } else {
                io::Error::new(io::ErrorKind::InvalidData, "the response's head was cut")
            });
        }
        buf.extend_from_slice(&chunk[..n]);
        loop {
            // The relay copies each request header twice (Patch-H- and
            // Pb-H-) to a responder: room for many, grown when needed.
            let parsed = match parse_head(&buf, &mut [httparse::EMPTY_HEADER; 64]) {
                Err(httparse::Error::TooManyHeaders) => {
                    parse_head(&buf, &mut vec![httparse::EMPTY_HEADER; 1024])
                }
                other => other,
            };
            match parsed {
                Ok(Some((parsed, len))) if (100..200).contains(&parsed.head.status) => {
                    buf.drain(..len);
                }
                Ok(Some((parsed, len))) => return Ok((parsed, buf.split_off(len))),
                Ok(None) if buf.len() < MAX_HEAD => break,
                Ok(None) => {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        "a response head over 64 KiB",
                    ));
                }
                Err(e) => {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!("a malformed response: {e}"),
                    ));
                }
            }
        }
    }
}

/// Reads a response head from any stream (another server's, for
/// `remote.rs`): its status, 1xx heads skipped.
pub fn read_status<R: Read + ?Sized>(stream: &mut R) -> io::Result<u16> {
    read_head(stream).map(|(parsed, _)| parsed.head.status)
}

/// Parses the head at the start of `buf` into `headers`: None while it is
/// incomplete; else the head and its length.
fn parse_head<'b>(
    buf: &'b [u8],
    headers: &mut [httparse::Header<'b>],
) -> Result<Option<(Parsed, usize)>, httparse::Error> {
    let mut response = httparse::Response::new(headers);
    let len = match response.parse(buf)? {
        httparse::Status::Complete(len) => len,
        httparse::Status::Partial => return Ok(None),
    };
    let status = response.code.unwrap_or(0);
    let mut length = None;
    let mut chunked = false;
    let mut close = response.version == Some(0);
    let mut kept = Vec::with_capacity(response.headers.len());
    for h in response.headers.iter() {
        let value = std::str::from_utf8(h.value).unwrap_or("").trim();
        if h.name.eq_ignore_ascii_case("content-length") {
            length = Some(
                value
                    .parse::<u64>()
                    .map_err(|_| httparse::Error::HeaderValue)?,
            );
        } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
            chunked = value.to_ascii_lowercase().ends_with("chunked");
        } else if h.name.eq_ignore_ascii_case("connection") {
            close = value.eq_ignore_ascii_case("close");
        }
        kept.push((h.name.to_owned(), h.value.to_vec()));
    }
    let framing = if status == 204 || status == 304 {
        Framing::Length(0)
    } else if chunked {
        Framing::Chunked
    } else if let Some(length) = length {
        Framing::Length(length)
    } else {
        Framing::UntilClose
    };
    let head = Head {
        status,
        headers: kept,
    };
    Ok(Some((
        Parsed {
            head,
            framing,
            close,
        },
        len,
    )))
}

/// Whether a request on a kept connection failed because the relay had
/// closed it meanwhile, before taking the request: the write failed, or
/// the connection ended before any byte of an answer.
fn is_stale(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::UnexpectedEof | io::ErrorKind::ConnectionReset | io::ErrorKind::BrokenPipe
    )
}

/// A response being read: its head, and its body through [`Read`].
/// Dropped before its body's end, it closes the connection.
pub struct Incoming<'c> {
    pub head: Head,
    body: BodyReader,
    keep: bool,
    client: &'c mut Client,
}

impl Incoming<'_> {
    /// Reads of the body give up with `Interrupted` when `fd` is readable
    /// (a stop flag) before the relay sends more.
    pub fn watch(&mut self, fd: RawFd) {
        self.body.watch = Some(fd);
    }

    /// Each read of the body may wait up to `limit` (a stream's quiet time).
    pub fn patience(&mut self, limit: Duration) {
        if let Some(stream) = &self.client.stream {
            let _ = stream.set_read_timeout(Some(limit));
        }
    }

    /// The whole body, or, past `max` bytes, nothing and `true`.
    pub fn read_whole(mut self, max: usize) -> io::Result<(Vec<u8>, bool)> {
        let mut body = Vec::new();
        let mut oversized = false;
        let mut buf = [0u8; 16 * 1024];
        loop {
            let n = self.read(&mut buf)?;
            if n == 0 {
                break;
            }
            if oversized || body.len() + n > max {
                oversized = true;
                body = Vec::new();
            } else {
                body.extend_from_slice(&buf[..n]);
            }
        }
        Ok((body, oversized))
    }

    /// The body as a one-line reason (its first KiB, trimmed; empty if it
    /// could not be read).
    pub fn reason(self) -> String {
        self.read_whole(1024)
            .map(|(body, _)| String::from_utf8_lossy(&body).trim().to_owned())
            .unwrap_or_default()
    }

    /// Reads the body to its end and drops it.
    pub fn skip(mut self) -> io::Result<()> {
        io::copy(&mut self, &mut io::sink()).map(|_| ())
    }

    /// The next line of the body (without its `\n` and a `\r` before it),
    /// at most `max` bytes; None at the body's end.
    pub fn line(&mut self, max: usize) -> io::Result<Option<Vec<u8>>> {
        let mut line = Vec::new();
        loop {
            let Some(stream) = self.client.stream.as_mut() else {
                return Err(io::Error::new(io::ErrorKind::NotConnected, "closed"));
            };
            let available = self.body.available(stream)?;
            if available.is_empty() {
                return if line.is_empty() {
                    Ok(None)
                } else {
                    Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "the response ended inside a line",
                    ))
                };
            }
            let (take, end) = match available.iter().position(|&b| b == b'\n') {
                Some(at) => (at + 1, true),
                None => (available.len(), false),
            };
            if line.len() + take > max + 1 {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "a line too long",
                ));
            }
            line.extend_from_slice(&available[..take]);
            self.body.consume(take);
            if end {
                line.pop();
                if line.last() == Some(&b'\r') {
                    line.pop();
                }
                return Ok(Some(line));
            }
        }
    }
}

impl Read for Incoming<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let Some(stream) = self.client.stream.as_mut() else {
            return Ok(0);
        };
        let available = self.body.available(stream)?;
        let n = available.len().min(buf.len());
        buf[..n].copy_from_slice(&available[..n]);
        self.body.consume(n);
        Ok(n)
    }
}

impl Drop for Incoming<'_> {
    fn drop(&mut self) {
        if !(self.keep && self.body.done) {
            self.client.disconnect();
        }
    }
}

/// A response body: framing over what came with the head, then the socket.
struct BodyReader {
    framing: Framing,
    buffered: Vec<u8>,
    /// Where the unread part of `buffered` starts.
    at: usize,
    /// Bytes left in the current chunk (chunked framing).
    chunk_left: u64,
    /// A chunk's data was read; its CRLF was not yet.
    crlf_due: bool,
    done: bool,
    watch: Option<RawFd>,
}

impl BodyReader {
    /// Reads more from the socket into `buffered`; false at its end.
    fn fill(&mut self, stream: &mut TcpStream) -> io::Result<bool> {
        if let Some(fd) = self.watch {
            let ready = sys::poll(
                &[(stream.as_raw_fd(), libc::POLLIN), (fd, libc::POLLIN)],
                stream.read_timeout()?,
            )?;
            if !(ready[0].readable || ready[0].error) {
                return Err(if ready[1].readable {
                    io::Error::new(io::ErrorKind::Interrupted, "stopped")
                } else {
                    io::Error::new(io::ErrorKind::TimedOut, "the relay went quiet")
                });
            }
        }
        if self.at == self.buffered.len() {
            self.buffered.clear();
            self.at = 0;
        }
        let mut chunk = [0u8; 16 * 1024];
        let n = stream.read(&mut chunk)?;
        self.buffered.extend_from_slice(&chunk[..n]);
        Ok(n > 0)
    }

    fn unread(&self) -> &[u8] {
        &self.buffered[self.at..]
    }

    /// One CRLF-terminated line of the framing, without its CRLF.
    fn framing_line(&mut self, stream: &mut TcpStream) -> io::Result<String> {
        loop {
            if let Some(at) = self.unread().iter().position(|&b| b == b'\n') {
                let line = String::from_utf8_lossy(&self.unread()[..at])
                    .trim_end_matches('\r')
                    .to_owned();
                self.at += at + 1;
                return Ok(line);
            }
            if self.unread().len() > MAX_LINE {
                return Err(io::Error::new(io::ErrorKind::InvalidData, "a long line"));
            }
            if !self.fill(stream)? {
                return Err(cut());
            }
        }
    }

    /// The body's next bytes (empty at its end), left unread until
    /// [`BodyReader::consume`].
    fn available(&mut self, stream: &mut TcpStream) -> io::Result<&[u8]> {
        if self.done {
            return Ok(&[]);
        }
        match self.framing {
            Framing::Length(0) => {
                self.done = true;
                return Ok(&[]);
            }
            Framing::Chunked if self.chunk_left == 0 => {
                if self.crlf_due {
                    if !self.framing_line(stream)?.is_empty() {
                        return Err(io::Error::new(
                            io::ErrorKind::InvalidData,
                            "a chunk longer than its size",
                        ));
                    }
                    self.crlf_due = false;
                }
                let line = self.framing_line(stream)?;
                let size = u64::from_str_radix(line.split(';').next().unwrap_or("").trim(), 16)
                    .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "a malformed chunk"))?;
                if size == 0 {
                    while !self.framing_line(stream)?.is_empty() {}
                    self.done = true;
                    return Ok(&[]);
                }
                self.chunk_left = size;
            }
            _ => {}
        }
        if self.unread().is_empty() && !self.fill(stream)? {
            if matches!(self.framing, Framing::UntilClose) {
                self.done = true;
                return Ok(&[]);
            }
            return Err(cut());
        }
        let left = match self.framing {
            Framing::Length(left) => left,
            Framing::Chunked => self.chunk_left,
            Framing::UntilClose => u64::MAX,
        };
        let n = (self.unread().len() as u64).min(left) as usize;
        Ok(&self.buffered[self.at..self.at + n])
    }

    /// Marks `n` bytes given by [`BodyReader::available`] as read.
    fn consume(&mut self, n: usize) {
        self.at += n;
        match &mut self.framing {
            Framing::Length(left) => *left -= n as u64,
            Framing::Chunked => {
                self.chunk_left -= n as u64;
                // The CRLF after a chunk's data is read before the next
                // size line.
                self.crlf_due = self.chunk_left == 0;
            }
            Framing::UntilClose => {}
        }
    }
}

fn cut() -> io::Error {
    io::Error::new(io::ErrorKind::UnexpectedEof, "the response ended early")
}

/// The reconnect policy: waits that double from `first` to `most`, each
/// drawn at random between half and the whole of it (jitter, so that many
/// clients cut off together do not come back together).
pub struct Backoff {
    first: Duration,
    most: Duration,
    attempt: u32,
}

impl Backoff {
    /// Waits from `first` to `most`.
    pub fn new(first: Duration, most: Duration) -> Backoff {
        Backoff {
            first,
            most,
            attempt: 0,
        }
    }

    /// Things went well: the next failure waits `first` again.
    pub fn reset(&mut self) {
        self.attempt = 0;
    }

    /// How many failures in a row so far.
    pub fn failures(&self) -> u32 {
        self.attempt
    }

    /// The next wait.
    pub fn next_wait(&mut self) -> Duration {
        let wait = jittered(self.first, self.most, self.attempt);
        self.attempt = self.attempt.saturating_add(1);
        wait
    }

    /// Sleeps the next wait, or until `flag` is raised; true if it was.
    pub fn sleep(&mut self, flag: &sys::Flag) -> bool {
        let wait = self.next_wait();
        flag.sleep(wait)
    }
}

/// The wait before retry `attempt` (0 first): `first` doubled per attempt
/// up to `most`, then drawn at random between half and the whole of it.
fn jittered(first: Duration, most: Duration, attempt: u32) -> Duration {
    let full = first.saturating_mul(1u32 << attempt.min(16)).min(most);
    let mut bytes = [0u8; 2];
    let draw = match crate::random::fill(&mut bytes) {
        Ok(()) => u32::from(u16::from_le_bytes(bytes)),
        Err(_) => 0x8000,
    };
    full / 2 + (full / 2) * draw / 0xffff
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_to_its_ceiling_with_jitter() {
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(2));
        let waits: Vec<Duration> = (0..8).map(|_| backoff.next_wait()).collect();
        for (i, wait) in waits.iter().enumerate() {
            let full = Duration::from_millis(100 << i).min(Duration::from_secs(2));
            assert!(*wait >= full / 2 && *wait <= full, "{i}: {wait:?}");
        }
        backoff.reset();
        assert!(backoff.next_wait() <= Duration::from_millis(100));
    }

    #[test]
    fn tokens_go_into_a_header_only_when_printable() {
        assert!(check_token(None).is_ok());
        assert!(check_token(Some("s3cret-Token_~")).is_ok());
        let refused = check_token(Some("a\r\nX-Evil: 1")).unwrap_err();
        assert!(!refused.contains("Evil"), "{refused}");
    }

    #[test]
    fn relay_urls_keep_their_path() {
        let relay = Relay::parse("http://127.0.0.1:3000/pubsub/alerts/").expect("parses");
        assert_eq!(relay.path(), "/pubsub/alerts");
        assert_eq!(relay.target("x"), "/pubsub/alerts/x");
        assert_eq!(
            Relay::parse("http://127.0.0.1:1").expect("parses").path(),
            "/"
        );
        assert!(Relay::parse("https://example.com/").is_err());
        assert!(Relay::parse("http://127.0.0.1:1/a b").is_err());
        assert!(Relay::parse("http:///x").is_err());
    }
}
