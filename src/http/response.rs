//! Writing responses: the head (status line, Date, the common headers, framing),
//! and bodies framed by Content-Length when the length is known, chunked for
//! HTTP/1.1 clients otherwise, and delimited by close for HTTP/1.0 clients. A
//! stream is never buffered to learn its length.

use std::io::{self, IoSlice, Read, Write};
use std::time::{SystemTime, UNIX_EPOCH};

use crate::http::request::{Version, is_valid_value};

/// Bytes read from a source per write to the sink while streaming a body.
pub const COPY_BUFFER: usize = 64 * 1024;

/// How a response body is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Payload {
    /// Content-Length.
    Length(u64),
    /// Transfer-Encoding: chunked (HTTP/1.1 clients).
    Chunked,
    /// The end of the connection (HTTP/1.0 clients, length unknown).
    UntilClose,
    /// No body and no framing header: a response whose status forbids a
    /// body (204, 304) or that answers HEAD with its length unknown.
    None,
}

impl Payload {
    /// The framing for a body of `length` (None: unknown) sent to a `version` client.
    pub fn for_body(version: Version, length: Option<u64>) -> Payload {
        match (length, version) {
            (Some(n), _) => Payload::Length(n),
            (None, Version::Http11) => Payload::Chunked,
            (None, Version::Http10) => Payload::UntilClose,
        }
    }
}

/// The headers every response carries besides Date, decided once from the
/// configuration: the CORS origin (DESIGN.md §4), and the two that keep a
/// relayed page from being sniffed or indexed as the relay's own.
#[derive(Debug, Clone)]
pub struct Common {
    bytes: Vec<u8>,
}

impl Common {
    /// The common headers for a relay whose responses allow `cors_origin`
    /// (`*`, an origin, or None for no CORS header at all).
    pub fn new(cors_origin: Option<&str>) -> Common {
        let mut bytes = Vec::new();
        if let Some(origin) = cors_origin {
            bytes.extend_from_slice(b"Access-Control-Allow-Origin: ");
            bytes.extend_from_slice(origin.as_bytes());
            bytes.extend_from_slice(b"\r\n");
        }
        bytes.extend_from_slice(b"X-Content-Type-Options: nosniff\r\nX-Robots-Tag: none\r\n");
        Common { bytes }
    }
}

/// A response head being built: the status line, then the headers added.
pub struct Head {
    status: u16,
    bytes: Vec<u8>,
}

impl Head {
    /// Starts a head with the status line.
    pub fn new(status: u16) -> Head {
        let mut bytes = Vec::with_capacity(256);
        // Written in place: no allocation for the number.
        let _ = write!(bytes, "HTTP/1.1 {status} ");
        bytes.extend_from_slice(reason_phrase(status).as_bytes());
        bytes.extend_from_slice(b"\r\n");
        Head { status, bytes }
    }

    /// The status code.
    pub fn status(&self) -> u16 {
        self.status
    }

    /// Adds a header. A value with a control byte is dropped (and logged),
    /// never written: no client can inject a header into another's response.
    pub fn header(&mut self, name: &str, value: impl AsRef<[u8]>) -> &mut Head {
        let value = value.as_ref();
        if !is_valid_value(value) || !is_token(name) {
            log::warn!("dropped response header {name:?} with an invalid name or value");
            return self;
        }
        self.bytes.extend_from_slice(name.as_bytes());
        self.bytes.extend_from_slice(b": ");
        self.bytes.extend_from_slice(value);
        self.bytes.extend_from_slice(b"\r\n");
        self
    }

    /// Adds Date, the `common` headers, the framing and connection headers
    /// and the blank line.
    pub fn finish(mut self, payload: Payload, keep_alive: bool, common: &Common) -> Vec<u8> {
        self.bytes.extend_from_slice(b"Date: ");
        with_date(|date| self.bytes.extend_from_slice(date));
        self.bytes.extend_from_slice(b"\r\n");
        self.bytes.extend_from_slice(&common.bytes);
        match payload {
            Payload::Length(n) => {
                let _ = write!(self.bytes, "Content-Length: {n}\r\n");
            }
            Payload::Chunked => self
                .bytes
                .extend_from_slice(b"Transfer-Encoding: chunked\r\n"),
            Payload::UntilClose | Payload::None => {}
        }
        if !keep_alive || payload == Payload::UntilClose {
            self.bytes.extend_from_slice(b"Connection: close\r\n");
        }
        self.bytes.extend_from_slice(b"\r\n");
        self.bytes
    }
}

/// Runs `f` on the current IMF-fixdate, formatted at most once a second per thread.
fn with_date<R>(f: impl FnOnce(&[u8]) -> R) -> R {
    thread_local! {
        static DATE: std::cell::RefCell<(u64, String)> = const { std::cell::RefCell::new((u64::MAX, String::new())) };
    }
    let now = SystemTime::now();
    let secs = now.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    DATE.with(|cell| {
        let mut cached = cell.borrow_mut();
        if cached.0 != secs {
            *cached = (secs, http_date(now));
        }
        f(cached.1.as_bytes())
    })
}

fn is_token(name: &str) -> bool {
    !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

/// Why streaming a body stopped early.
#[derive(Debug)]
pub enum StreamError {
    /// Reading the source failed after `sent` bytes (head included) reached the sink.
    Read { error: io::Error, sent: u64 },
    /// Writing to the sink failed.
    Write(io::Error),
}

/// Writes `head`, then the body read from `source`, framed by `payload`, to
/// `sink`, with constant memory: each read is written before the next one, so
/// a slow sink slows the source (backpressure). The head goes out with the
/// first bytes of the body, in one write. Returns the body bytes copied.
pub fn stream_body(
    head: &[u8],
    source: &mut dyn Read,
    sink: &mut dyn Write,
    payload: Payload,
) -> Result<u64, StreamError> {
    // Layout: [head][chunk-size line][data][CRLF], so each round is one write.
    const SIZE_LINE: usize = 18;
    let data_start = head.len() + SIZE_LINE;
    // A small message gets a small buffer: no 64 KiB to clear for 64 bytes.
    let capacity = match payload {
        Payload::Length(n) => usize::try_from(n).map_or(COPY_BUFFER, |n| n.clamp(1, COPY_BUFFER)),
        Payload::Chunked | Payload::UntilClose | Payload::None => COPY_BUFFER,
    };
    let mut buf = vec![0u8; data_start + capacity + 2];
    buf[..head.len()].copy_from_slice(head);
    let mut head_sent = false;
    let mut copied = 0u64;
    loop {
        let n = match source.read(&mut buf[data_start..data_start + capacity]) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(error) => {
                let sent = if head_sent {
                    head.len() as u64 + copied
                } else {
                    0
                };
                return Err(StreamError::Read { error, sent });
            }
        };
        let mut start = data_start;
        let mut end = data_start + n;
        if payload == Payload::Chunked {
            let size_line = if n == 0 {
                "0\r\n".to_owned()
            } else {
                format!("{n:x}\r\n")
            };
            start -= size_line.len();
            buf[start..data_start].copy_from_slice(size_line.as_bytes());
            buf[end..end + 2].copy_from_slice(b"\r\n");
            end += 2;
        }
        let pieces: [&[u8]; 2] = if head_sent {
            [&[], &buf[start..end]]
        } else {
            [head, &buf[start..end]]
        };
        write_all(sink, pieces).map_err(StreamError::Write)?;
        head_sent = true;
        copied += n as u64;
        if n == 0 {
            sink.flush().map_err(StreamError::Write)?;
            return Ok(copied);
        }
    }
}

/// Writes `prefix` (a response head, or nothing), then `data` as the next
/// piece of a body that is written as it comes, framed by `payload` (one
/// chunk when chunked), in one system call where the socket allows. Empty
/// data is not framed, since an empty chunk would end the body.
pub fn write_piece(
    sink: &mut dyn Write,
    payload: Payload,
    prefix: &[u8],
    data: &[u8],
) -> io::Result<()> {
    if payload != Payload::Chunked || data.is_empty() {
        return write_all(sink, [prefix, data]);
    }
    let size_line = format!("{:x}\r\n", data.len());
    write_all(sink, [prefix, size_line.as_bytes(), data, b"\r\n"])
}

/// The bytes that end a body framed by `payload` that was written as it came.
pub fn end_of_body(payload: Payload) -> &'static [u8] {
    match payload {
        Payload::Chunked => b"0\r\n\r\n",
        Payload::Length(_) | Payload::UntilClose | Payload::None => b"",
    }
}

/// Writes the slices in order, with as few system calls as the socket allows.
pub fn write_all<const N: usize>(sink: &mut dyn Write, mut pieces: [&[u8]; N]) -> io::Result<()> {
    while pieces.iter().any(|piece| !piece.is_empty()) {
        let slices = pieces.map(IoSlice::new);
        let mut n = match sink.write_vectored(&slices) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        for piece in &mut pieces {
            let done = n.min(piece.len());
            *piece = &piece[done..];
            n -= done;
        }
    }
    Ok(())
}

/// The standard reason phrase of `status`.
pub fn reason_phrase(status: u16) -> &'static str {
    match status {
        100 => "Continue",
        101 => "Switching Protocols",
        200 => "OK",
        201 => "Created",
        202 => "Accepted",
        203 => "Non-Authoritative Information",
        204 => "No Content",
        205 => "Reset Content",
        206 => "Partial Content",
        300 => "Multiple Choices",
        301 => "Moved Permanently",
        302 => "Found",
        303 => "See Other",
        304 => "Not Modified",
        307 => "Temporary Redirect",
        308 => "Permanent Redirect",
        400 => "Bad Request",
        401 => "Unauthorized",
        402 => "Payment Required",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        406 => "Not Acceptable",
        407 => "Proxy Authentication Required",
        408 => "Request Timeout",
        409 => "Conflict",
        410 => "Gone",
        411 => "Length Required",
        412 => "Precondition Failed",
        413 => "Content Too Large",
        414 => "URI Too Long",
        415 => "Unsupported Media Type",
        416 => "Range Not Satisfiable",
        417 => "Expectation Failed",
        418 => "I'm a teapot",
        421 => "Misdirected Request",
        422 => "Unprocessable Content",
        425 => "Too Early",
        426 => "Upgrade Required",
        428 => "Precondition Required",
        429 => "Too Many Requests",
        431 => "Request Header Fields Too Large",
        451 => "Unavailable For Legal Reasons",
        500 => "Internal Server Error",
        501 => "Not Implemented",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        505 => "HTTP Version Not Supported",
        507 => "Insufficient Storage",
        511 => "Network Authentication Required",
        // The status code is what counts; clients ignore the phrase.
        _ => "Unknown",
    }
}

/// `time` as an IMF-fixdate (RFC 9110 §5.6.7), e.g. `Sun, 06 Nov 1994 08:49:37 GMT`.
pub fn http_date(time: SystemTime) -> String {
    let secs = time.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let days = secs / 86_400;
    let (hour, minute, second) = (secs % 86_400 / 3600, secs % 3600 / 60, secs % 60);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + u64::from(month <= 2);
    const WEEKDAYS: [&str; 7] = ["Thu", "Fri", "Sat", "Sun", "Mon", "Tue", "Wed"];
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    format!(
        "{}, {day:02} {} {year} {hour:02}:{minute:02}:{second:02} GMT",
        WEEKDAYS[(days % 7) as usize],
        MONTHS[(month - 1) as usize]
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn dates_are_imf_fixdates() {
        assert_eq!(http_date(UNIX_EPOCH), "Thu, 01 Jan 1970 00:00:00 GMT");
        let t = UNIX_EPOCH + Duration::from_secs(784_111_777);
        assert_eq!(http_date(t), "Sun, 06 Nov 1994 08:49:37 GMT");
        let t = UNIX_EPOCH + Duration::from_secs(1_709_164_800); // 2024-02-29
        assert_eq!(http_date(t), "Thu, 29 Feb 2024 00:00:00 GMT");
    }

    #[test]
    fn injected_header_values_are_dropped() {
        let mut head = Head::new(200);
        head.header("X-Ok", "fine")
            .header("X-Bad", "a\r\nSet-Cookie: x")
            .header("Bad Name", "v");
        let text =
            String::from_utf8(head.finish(Payload::Length(0), true, &Common::new(Some("*"))))
                .unwrap();
        assert!(text.contains("X-Ok: fine\r\n"));
        assert!(!text.contains("Set-Cookie") && !text.contains("Bad Name"));
        assert!(text.contains("Access-Control-Allow-Origin: *\r\n"));
        assert!(text.contains("X-Content-Type-Options: nosniff\r\n"));
        assert!(text.contains("X-Robots-Tag: none\r\n"));
        assert!(text.starts_with("HTTP/1.1 200 OK\r\n"));
    }

    fn streamed(body: &[u8], payload: Payload) -> Vec<u8> {
        let mut out = Vec::new();
        stream_body(b"HEAD\r\n\r\n", &mut &body[..], &mut out, payload).unwrap();
        out
    }

    #[test]
    fn bodies_are_framed() {
        assert_eq!(streamed(b"hello", Payload::Length(5)), b"HEAD\r\n\r\nhello");
        assert_eq!(
            streamed(b"hello", Payload::Chunked),
            b"HEAD\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
        );
        assert_eq!(streamed(b"", Payload::Chunked), b"HEAD\r\n\r\n0\r\n\r\n");
        assert_eq!(streamed(b"", Payload::UntilClose), b"HEAD\r\n\r\n");
    }

    #[test]
    fn pieces_are_framed_as_chunks() {
        let mut out = Vec::new();
        write_piece(&mut out, Payload::Chunked, b"HEAD\r\n\r\n", b"hello").unwrap();
        write_piece(&mut out, Payload::Chunked, b"", b"").unwrap();
        out.extend_from_slice(end_of_body(Payload::Chunked));
        assert_eq!(out, b"HEAD\r\n\r\n5\r\nhello\r\n0\r\n\r\n");
        let mut out = Vec::new();
        write_piece(&mut out, Payload::UntilClose, b"", b"hi").unwrap();
        assert_eq!(out, b"hi");
    }
}
