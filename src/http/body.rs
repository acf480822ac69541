//! Request bodies: Content-Length and chunked (RFC 9112 §7.1) decoding, read
//! straight from the connection without buffering the body. `100 Continue` is
//! sent on the first read, so a client that asked for it sends nothing until
//! a handler wants the bytes (for the queue: until a consumer is there).

use std::io::{self, Read, Write};

use crate::http::conn::{Conn, is_open};
use crate::http::request::Framing;

/// Longest chunk-size line, extensions included.
const MAX_CHUNK_LINE: usize = 4096;
/// Most bytes of trailer fields after the last chunk.
const MAX_TRAILERS: usize = 16 * 1024;

/// Where a body reader is in the body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyState {
    /// So many bytes left of a Content-Length body.
    Length(u64),
    /// Before a chunk-size line.
    ChunkSize,
    /// Inside a chunk with so many bytes left.
    ChunkData(u64),
    /// After a chunk's data, before its CRLF.
    ChunkEnd,
    /// After the last chunk, in the trailer section.
    Trailers,
    /// The whole body was read.
    Done,
}

impl BodyState {
    /// The state before the first byte of a body framed by `framing`.
    pub fn new(framing: Framing) -> BodyState {
        match framing {
            Framing::Length(0) => BodyState::Done,
            Framing::Length(n) => BodyState::Length(n),
            Framing::Chunked => BodyState::ChunkSize,
        }
    }
}

/// Reads a request body from `conn`, tracking progress in `state`.
pub struct BodyReader<'a> {
    pub conn: &'a mut Conn,
    pub state: &'a mut BodyState,
    /// Set while `100 Continue` is owed; cleared once it is sent.
    pub continue_pending: &'a mut bool,
    /// Chunked bytes still allowed (`--max-body`), if capped.
    pub allowance: &'a mut Option<u64>,
    /// The client already has its response (another client's request, for
    /// a responder): it may leave as soon as its body is sent.
    pub responded: bool,
}

impl BodyReader<'_> {
    fn send_continue(&mut self) -> io::Result<()> {
        if *self.continue_pending {
            *self.continue_pending = false;
            let mut stream = self.conn.stream();
            stream.write_all(b"HTTP/1.1 100 Continue\r\n\r\n")?;
        }
        Ok(())
    }

    /// Refuses to complete a body whose client has left: a client that sent
    /// its body and hung up before its answer would retry, so what it sent
    /// must not be delivered. Checked as the last bytes are read, since a
    /// hang-up queued behind unread bytes cannot be seen earlier.
    fn check_still_there(&self) -> io::Result<()> {
        if self.responded || is_open(self.conn.stream()) {
            Ok(())
        } else {
            Err(io::Error::new(
                io::ErrorKind::ConnectionAborted,
                "client left before its answer",
            ))
        }
    }

    /// Ensures a whole line is buffered and returns its length, LF included.
    fn line(&mut self, limit: usize) -> io::Result<usize> {
        loop {
            if let Some(i) = self.conn.buffered().iter().position(|&b| b == b'\n') {
                return Ok(i + 1);
            }
            if self.conn.buffered().len() >= limit {
                return Err(invalid("chunked body line too long"));
            }
            match self.conn.fill(limit) {
                Ok(0) => return Err(early_end()),
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::OutOfMemory => {
                    return Err(invalid("chunked body line too long"));
                }
                Err(e) => return Err(e),
            }
        }
    }

    fn read_data(&mut self, out: &mut [u8], left: u64) -> io::Result<usize> {
        let max = usize::try_from(left).map_or(out.len(), |left| left.min(out.len()));
        let n = self.conn.read(&mut out[..max])?;
        if n == 0 {
            return Err(early_end());
        }
        Ok(n)
    }
}

impl Read for BodyReader<'_> {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        if out.is_empty() {
            return Ok(0);
        }
        loop {
            match *self.state {
                BodyState::Done => return Ok(0),
                BodyState::Length(left) => {
                    self.send_continue()?;
                    let n = self.read_data(out, left)?;
                    let left = left - n as u64;
                    if left == 0 {
                        self.check_still_there()?;
                        *self.state = BodyState::Done;
                    } else {
                        *self.state = BodyState::Length(left);
                    }
                    return Ok(n);
                }
                BodyState::ChunkData(left) => {
                    let n = self.read_data(out, left)?;
                    let left = left - n as u64;
                    *self.state = if left == 0 {
                        BodyState::ChunkEnd
                    } else {
                        BodyState::ChunkData(left)
                    };
                    return Ok(n);
                }
                BodyState::ChunkSize => {
                    self.send_continue()?;
                    let len = self.line(MAX_CHUNK_LINE)?;
                    let size = chunk_size(&self.conn.buffered()[..len])?;
                    if let Some(left) = self.allowance {
                        *left = left.checked_sub(size).ok_or_else(|| {
                            io::Error::new(io::ErrorKind::FileTooLarge, "body over --max-body")
                        })?;
                    }
                    self.conn.consume(len);
                    *self.state = if size == 0 {
                        BodyState::Trailers
                    } else {
                        BodyState::ChunkData(size)
                    };
                }
                BodyState::ChunkEnd => {
                    let len = self.line(MAX_CHUNK_LINE)?;
                    if &self.conn.buffered()[..len] != b"\r\n" {
                        return Err(invalid("chunk data longer than its size"));
                    }
                    self.conn.consume(len);
                    *self.state = BodyState::ChunkSize;
                }
                BodyState::Trailers => {
                    // Trailer fields are read and dropped: none of them travel.
                    let mut total = 0;
                    loop {
                        let len = self.line(MAX_TRAILERS)?;
                        let line = &self.conn.buffered()[..len];
                        let is_end = line == b"\r\n";
                        if !line.ends_with(b"\r\n") {
                            return Err(invalid("trailer line does not end in CRLF"));
                        }
                        self.conn.consume(len);
                        total += len;
                        if is_end {
                            break;
                        }
                        if total > MAX_TRAILERS {
                            return Err(invalid("trailer section too large"));
                        }
                    }
                    self.check_still_there()?;
                    *self.state = BodyState::Done;
                    return Ok(0);
                }
            }
        }
    }
}

/// Parses `1a;ext=1\r\n`: hex digits, optional extensions, CRLF.
fn chunk_size(line: &[u8]) -> io::Result<u64> {
    let line = line
        .strip_suffix(b"\r\n")
        .ok_or_else(|| invalid("chunk-size line does not end in CRLF"))?;
    let digits = line.iter().take_while(|b| b.is_ascii_hexdigit()).count();
    let rest = &line[digits..];
    let rest_ok =
        rest.is_empty() || rest.iter().find(|b| **b != b' ' && **b != b'\t') == Some(&b';');
    if digits == 0 || digits > 16 || !rest_ok || !crate::http::request::is_valid_value(rest) {
        return Err(invalid("malformed chunk-size line"));
    }
    let text = std::str::from_utf8(&line[..digits]).map_err(|_| invalid("malformed chunk size"))?;
    u64::from_str_radix(text, 16).map_err(|_| invalid("malformed chunk size"))
}

fn invalid(reason: &'static str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, reason)
}

/// 413: a body over `--max-body`.
pub fn too_large() -> crate::error::Reject {
    crate::error::Reject::new(
        413,
        "the body is larger than this relay takes (--max-body); it was not delivered",
    )
}

/// The refusal a sender gets when its body could not be read for a reason
/// of its own making: malformed framing (400) or over `--max-body` (413);
/// None when it just left or stalled.
pub fn refusal_for(error: &io::Error) -> Option<crate::error::Reject> {
    match error.kind() {
        io::ErrorKind::InvalidData => Some(crate::error::Reject::bad_request(format!(
            "malformed request body: {error}"
        ))),
        io::ErrorKind::FileTooLarge => Some(too_large()),
        _ => None,
    }
}

/// The error of a body that ended before its framing said it would.
pub fn early_end() -> io::Error {
    io::Error::new(
        io::ErrorKind::UnexpectedEof,
        "client closed before the body ended",
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunk_sizes() {
        assert_eq!(chunk_size(b"1a\r\n").unwrap(), 26);
        assert_eq!(chunk_size(b"0\r\n").unwrap(), 0);
        assert_eq!(chunk_size(b"FF;name=value\r\n").unwrap(), 255);
        assert_eq!(chunk_size(b"10 ;x\r\n").unwrap(), 16);
        assert_eq!(chunk_size(b"ffffffffffffffff\r\n").unwrap(), u64::MAX);
        for bad in [
            &b"\r\n"[..],
            b"x\r\n",
            b"1a\n",
            b"1ffffffffffffffff\r\n",
            b"-1\r\n",
            b"1 2\r\n",
            b"1;\x01\r\n",
        ] {
            assert!(chunk_size(bad).is_err(), "{bad:?}");
        }
    }
}
