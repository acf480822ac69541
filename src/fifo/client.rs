//! The bridge's HTTP/1.1 client: one keep-alive connection per pump, and a
//! wait for the response head that gives up when a watched descriptor
//! fires (the stop flag, or a FIFO whose reader left), closing the socket
//! so that the relay withdraws the request: a receive cancelled this way
//! takes nothing, since the relay never pairs a waiter that hung up.

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream, ToSocketAddrs};
use std::os::fd::{AsRawFd, RawFd};
use std::time::Duration;

use super::sys;

/// How long writing a request, and each read of a response (once its head
/// has begun), may take.
const IO_TIMEOUT: Duration = Duration::from_secs(30);

/// How long connecting may take (short: a stop waits for it).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// How long a withdrawn request waits for the relay to close it, or for an
/// answer it had already begun to send.
const WITHDRAW_GRACE: Duration = Duration::from_secs(5);

/// The longest response head accepted.
const MAX_HEAD: usize = 64 * 1024;

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
    /// Reads `http://host[:port][/prefix]`.
    pub fn parse(url: &str) -> Result<Relay, String> {
        let rest = url.strip_prefix("http://").ok_or_else(|| {
            format!("--server {url:?}: only http:// URLs (put TLS in a proxy in front)")
        })?;
        let (host, base) = match rest.find('/') {
            Some(at) => (&rest[..at], rest[at..].trim_end_matches('/')),
            None => (rest, ""),
        };
        if host.is_empty() {
            return Err(format!("--server {url:?} has no host"));
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
            .map_err(|e| format!("--server {url:?}: cannot resolve {host}: {e}"))?
            .collect();
        Ok(Relay {
            host: host.to_owned(),
            addrs,
            base: base.to_owned(),
        })
    }

    /// The request target of `channel` (`jobs` or `/jobs`).
    pub fn target(&self, channel: &str) -> String {
        format!("{}/{}", self.base, channel.trim_start_matches('/'))
    }
}

/// A response: its status and body.
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

/// One keep-alive connection to the relay, opened when needed.
pub struct Client {
    relay: Relay,
    stream: Option<TcpStream>,
}

impl Client {
    pub fn new(relay: Relay) -> Client {
        Client {
            relay,
            stream: None,
        }
    }

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
        // A kept connection the relay closed meanwhile fails on first use:
        // one retry on a fresh connection, when nothing can have been taken.
        for attempt in 0..2 {
            let fresh = self.stream.is_none();
            match self.exchange(method, target, body, watch, max_body) {
                Err(Failure::Io(e))
                    if !fresh && attempt == 0 && e.kind() != io::ErrorKind::TimedOut =>
                {
                    self.stream = None;
                }
                Err(Failure::Io(e)) => {
                    self.stream = None;
                    return Outcome::Failed(e);
                }
                Err(Failure::Withdrawn(watch, sure)) => {
                    self.drop_connection();
                    return Outcome::Withdrawn { watch, sure };
                }
                Ok(response) => return Outcome::Answered(response),
            }
        }
        Outcome::Failed(io::Error::other("the connection kept breaking"))
    }

    /// Closes the connection, so that the relay sees the client gone.
    fn drop_connection(&mut self) {
        if let Some(stream) = self.stream.take() {
            let _ = stream.shutdown(Shutdown::Both);
        }
    }

    fn exchange(
        &mut self,
        method: &str,
        target: &str,
        body: Option<&[u8]>,
        watch: &[(RawFd, libc::c_short)],
        max_body: usize,
    ) -> Result<Response, Failure> {
        let host = self.relay.host.clone();
        let stream = self.connect().map_err(Failure::Io)?;
        let mut head = format!("{method} {target} HTTP/1.1\r\nHost: {host}\r\n");
        if let Some(body) = body {
            head.push_str(&format!(
                "Content-Type: application/octet-stream\r\nContent-Length: {}\r\n",
                body.len()
            ));
        }
        head.push_str("\r\n");
        let mut bytes = head.into_bytes();
        bytes.extend_from_slice(body.unwrap_or_default());
        stream.write_all(&bytes).map_err(Failure::Io)?;
        // Wait for the first byte of the answer, or a watched descriptor.
        let mut fds = vec![(stream.as_raw_fd(), libc::POLLIN)];
        fds.extend_from_slice(watch);
        loop {
            let ready = sys::poll(&fds, None).map_err(Failure::Io)?;
            if ready[0].readable || ready[0].error {
                break;
            }
            if let Some(n) = ready[1..].iter().position(|r| r.readable || r.error) {
                // Withdraw by half-closing: the relay sees the client gone
                // and unparks it, answering nothing, or it had already paired
                // it and the answer comes. Either way nothing is lost here:
                // an answer that comes is returned (its message kept).
                let _ = stream.shutdown(Shutdown::Write);
                let _ = stream.set_read_timeout(Some(WITHDRAW_GRACE));
                return match read_response(stream, max_body) {
                    Ok((response, _)) => {
                        self.drop_connection();
                        Ok(response)
                    }
                    Err(e) => Err(Failure::Withdrawn(
                        n,
                        e.kind() == io::ErrorKind::UnexpectedEof
                            || e.kind() == io::ErrorKind::ConnectionReset,
                    )),
                };
            }
        }
        let (response, reusable) = read_response(stream, max_body).map_err(Failure::Io)?;
        if !reusable {
            self.drop_connection();
        }
        Ok(response)
    }
}

enum Failure {
    Io(io::Error),
    Withdrawn(usize, bool),
}

/// Reads a response head and its body from `stream`; and whether the
/// connection may carry another request.
fn read_response(stream: &mut TcpStream, max_body: usize) -> io::Result<(Response, bool)> {
    let mut buf = Vec::with_capacity(4096);
    let mut chunk = [0u8; 8192];
    let (status, header_len, length, chunked, close) = loop {
        let n = stream.read(&mut chunk)?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the relay closed the connection",
            ));
        }
        buf.extend_from_slice(&chunk[..n]);
        let mut headers = [httparse::EMPTY_HEADER; 64];
        let mut response = httparse::Response::new(&mut headers);
        match response.parse(&buf) {
            Ok(httparse::Status::Complete(len)) => {
                let status = response.code.unwrap_or(0);
                if (100..200).contains(&status) {
                    buf.drain(..len);
                    continue;
                }
                let mut length = None;
                let mut chunked = false;
                let mut close = response.version == Some(0);
                for h in response.headers.iter() {
                    let value = std::str::from_utf8(h.value).unwrap_or("").trim();
                    if h.name.eq_ignore_ascii_case("content-length") {
                        length = value.parse::<u64>().ok();
                    } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
                        chunked = value.to_ascii_lowercase().ends_with("chunked");
                    } else if h.name.eq_ignore_ascii_case("connection") {
                        close = value.eq_ignore_ascii_case("close");
                    }
                }
                break (status, len, length, chunked, close);
            }
            Ok(httparse::Status::Partial) if buf.len() < MAX_HEAD => {}
            _ => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "a malformed response",
                ));
            }
        }
    };
    let mut reader = Body {
        buffered: buf.split_off(header_len),
        stream,
    };
    let mut body = Vec::new();
    let mut oversized = false;
    let mut keep = |bytes: &[u8], body: &mut Vec<u8>| {
        if body.len() + bytes.len() > max_body {
            oversized = true;
        } else {
            body.extend_from_slice(bytes);
        }
    };
    if chunked {
        loop {
            let line = reader.line()?;
            let size = usize::from_str_radix(
                std::str::from_utf8(&line)
                    .unwrap_or("")
                    .split(';')
                    .next()
                    .unwrap_or("")
                    .trim(),
                16,
            )
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "a malformed chunk"))?;
            if size == 0 {
                while !reader.line()?.is_empty() {}
                break;
            }
            reader.copy(size as u64, &mut |bytes| keep(bytes, &mut body))?;
            reader.line()?;
        }
    } else if let Some(length) = length {
        reader.copy(length, &mut |bytes| keep(bytes, &mut body))?;
    } else {
        reader.copy(u64::MAX, &mut |bytes| keep(bytes, &mut body))?;
    }
    if oversized {
        body.clear();
    }
    let response = Response {
        status,
        body,
        oversized,
    };
    Ok((response, !close && (chunked || length.is_some())))
}

/// A response body read through what came with the head.
struct Body<'s> {
    buffered: Vec<u8>,
    stream: &'s mut TcpStream,
}

impl Body<'_> {
    fn fill(&mut self) -> io::Result<()> {
        let mut chunk = [0u8; 16 * 1024];
        let n = self.stream.read(&mut chunk)?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the response ended early",
            ));
        }
        self.buffered.extend_from_slice(&chunk[..n]);
        Ok(())
    }

    /// One CRLF-terminated line, without its CRLF.
    fn line(&mut self) -> io::Result<Vec<u8>> {
        loop {
            if let Some(at) = self.buffered.iter().position(|&b| b == b'\n') {
                let mut line: Vec<u8> = self.buffered.drain(..=at).collect();
                line.pop();
                if line.last() == Some(&b'\r') {
                    line.pop();
                }
                return Ok(line);
            }
            if self.buffered.len() > 4096 {
                return Err(io::Error::new(io::ErrorKind::InvalidData, "a long line"));
            }
            self.fill()?;
        }
    }

    /// Passes `length` bytes (or all until the end, for u64::MAX) to `sink`.
    fn copy(&mut self, length: u64, sink: &mut dyn FnMut(&[u8])) -> io::Result<()> {
        let mut left = length;
        while left > 0 {
            if self.buffered.is_empty() {
                match self.fill() {
                    Err(e) if length == u64::MAX && e.kind() == io::ErrorKind::UnexpectedEof => {
                        return Ok(());
                    }
                    other => other?,
                }
            }
            let take = (self.buffered.len() as u64).min(left) as usize;
            sink(&self.buffered[..take]);
            self.buffered.drain(..take);
            left -= take as u64;
        }
        Ok(())
    }
}
