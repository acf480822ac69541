//! Reading and checking a request head: limits (414/431), timeouts, CRLF-only
//! line endings, header values free of control bytes, and the body's framing
//! (RFC 9112 §6). Produces an owned [`Request`]; the body is left in the
//! connection for `body.rs`.

use std::io;
use std::time::{Duration, Instant};

use crate::error::Reject;
use crate::http::conn::Conn;

/// Longest request line (method, target, version).
pub const MAX_REQUEST_LINE: usize = 8 * 1024;
/// Most bytes of header fields after the request line.
pub const MAX_HEADER_BYTES: usize = 64 * 1024;
/// Most header fields.
pub const MAX_HEADERS: usize = 100;

/// The HTTP version of a request, which decides how responses are framed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Version {
    Http10,
    Http11,
}

/// How the request body is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// Content-Length (0 when the request declares no body).
    Length(u64),
    /// Transfer-Encoding: chunked.
    Chunked,
}

/// A request method; the ones patchcord routes on have their own variant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Method {
    Get,
    Head,
    Post,
    Put,
    Patch,
    Delete,
    Options,
    Other(String),
}

impl Method {
    fn parse(text: &str) -> Method {
        match text {
            "GET" => Method::Get,
            "HEAD" => Method::Head,
            "POST" => Method::Post,
            "PUT" => Method::Put,
            "PATCH" => Method::Patch,
            "DELETE" => Method::Delete,
            "OPTIONS" => Method::Options,
            other => Method::Other(other.to_owned()),
        }
    }

    /// The method's name for logs and counters, without allocating:
    /// `OTHER` for a method patchcord does not route on.
    pub fn name(&self) -> &'static str {
        match self {
            Method::Other(_) => "OTHER",
            Method::Get => "GET",
            Method::Head => "HEAD",
            Method::Post => "POST",
            Method::Put => "PUT",
            Method::Patch => "PATCH",
            Method::Delete => "DELETE",
            Method::Options => "OPTIONS",
        }
    }

    /// The method as it appears on the wire.
    pub fn as_str(&self) -> &str {
        match self {
            Method::Get => "GET",
            Method::Head => "HEAD",
            Method::Post => "POST",
            Method::Put => "PUT",
            Method::Patch => "PATCH",
            Method::Delete => "DELETE",
            Method::Options => "OPTIONS",
            Method::Other(name) => name,
        }
    }
}

/// A request's header fields, in order, packed into one buffer: two
/// allocations whatever their number. Values are checked free of control
/// bytes and trimmed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Headers {
    text: Vec<u8>,
    /// Where each field's name starts, where its value starts (its name's
    /// end) and where its value ends, in `text`.
    fields: Vec<(u32, u32, u32)>,
}

impl Headers {
    fn with_capacity(fields: usize, bytes: usize) -> Headers {
        Headers {
            text: Vec::with_capacity(bytes),
            fields: Vec::with_capacity(fields),
        }
    }

    fn push(&mut self, name: &str, value: &[u8]) {
        // A head is at most 72 KiB (MAX_REQUEST_LINE + MAX_HEADER_BYTES).
        let start = self.text.len() as u32;
        self.text.extend_from_slice(name.as_bytes());
        let middle = self.text.len() as u32;
        self.text.extend_from_slice(value);
        self.fields.push((start, middle, self.text.len() as u32));
    }

    /// The value of the first field named `name` (case-insensitive).
    fn get(&self, name: &str) -> Option<&[u8]> {
        self.fields.iter().find_map(|&(start, middle, end)| {
            let field = &self.text[start as usize..middle as usize];
            field
                .eq_ignore_ascii_case(name.as_bytes())
                .then(|| &self.text[middle as usize..end as usize])
        })
    }

    /// Every field as (name, value), in order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &[u8])> {
        self.fields.iter().map(|&(start, middle, end)| {
            let name = &self.text[start as usize..middle as usize];
            // Names are tokens (httparse checked them): ASCII.
            let name = std::str::from_utf8(name).unwrap_or("");
            (name, &self.text[middle as usize..end as usize])
        })
    }

    /// How many fields are named `name` (case-insensitive).
    fn count(&self, name: &str) -> usize {
        self.iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case(name))
            .count()
    }

    /// The comma-separated elements of every field named `name`, trimmed.
    fn values<'h>(&'h self, name: &'h str) -> impl Iterator<Item = &'h [u8]> + 'h {
        self.iter()
            .filter(move |(n, _)| n.eq_ignore_ascii_case(name))
            .flat_map(|(_, value)| value.split(|&b| b == b','))
            .map(trim)
    }
}

/// A parsed request head.
#[derive(Debug, Clone)]
pub struct Request {
    pub method: Method,
    /// The request target in origin form (`/path?query`).
    pub target: String,
    pub version: Version,
    pub headers: Headers,
    pub framing: Framing,
    /// The client sent `Expect: 100-continue` and waits before sending the body.
    pub expects_continue: bool,
    /// The client is willing to send another request on this connection.
    pub keep_alive: bool,
}

impl Request {
    /// A request as if parsed from the wire, for unit tests of what comes
    /// after parsing (rouille's `Request::fake_http`).
    #[cfg(test)]
    pub fn fake(method: Method, target: &str, headers: &[(&str, &str)]) -> Request {
        Request {
            method,
            target: target.to_owned(),
            version: Version::Http11,
            headers: {
                let mut packed = Headers::default();
                for (name, value) in headers {
                    packed.push(name, value.as_bytes());
                }
                packed
            },
            framing: Framing::Length(0),
            expects_continue: false,
            keep_alive: true,
        }
    }

    /// The first value of header `name` (case-insensitive), if it is UTF-8.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .get(name)
            .and_then(|value| std::str::from_utf8(value).ok())
    }

    /// The token of `Authorization: Bearer <token>`, if that is the scheme.
    pub fn bearer(&self) -> Option<&str> {
        let (scheme, token) = self.header("authorization")?.split_once(' ')?;
        scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
    }
}

/// Why no request could be read.
#[derive(Debug)]
pub enum HeadError {
    /// The client closed, or stayed idle past the idle timeout, between requests.
    Closed,
    /// The client took longer than the header timeout to send a head.
    Slow,
    /// The socket failed.
    Io(io::Error),
    /// The head is malformed or over a limit: answer, then close.
    Reject(Reject),
}

/// How long to wait for a head.
#[derive(Debug, Clone, Copy)]
pub struct HeadTimeouts {
    /// From the first byte of a head (or from accept, for the first) to its end.
    pub header: Duration,
    /// For the first byte of a further request on a kept-alive connection.
    pub idle: Duration,
}

/// Reads the next request head from `conn`. `first` is true for the first
/// request of a connection, whose head must arrive within the header timeout
/// from accept; later ones may idle for the idle timeout first.
pub fn read_head(
    conn: &mut Conn,
    timeouts: HeadTimeouts,
    first: bool,
) -> Result<Request, HeadError> {
    let mut deadline = Instant::now() + timeouts.header;
    let idle_since = conn.take_idle_since();
    if conn.buffered().is_empty() {
        let wait = if first {
            timeouts.header
        } else {
            // Idle from when the last response ended, if another thread
            // wrote it and this one learnt of it later; to the second, so
            // that the socket's timeout is not set anew for every request.
            let idle = idle_since.map_or(Duration::ZERO, |t| t.elapsed());
            if idle < Duration::from_secs(1) {
                timeouts.idle
            } else {
                timeouts.idle.saturating_sub(idle)
            }
        };
        if wait.is_zero() {
            return Err(HeadError::Closed);
        }
        conn.set_read_timeout(wait).map_err(HeadError::Io)?;
        match conn.fill(MAX_REQUEST_LINE + MAX_HEADER_BYTES) {
            Ok(0) => return Err(HeadError::Closed),
            Ok(_) => {}
            Err(e) if is_timeout(&e) => {
                return Err(if first {
                    HeadError::Slow
                } else {
                    HeadError::Closed
                });
            }
            Err(e) => return Err(HeadError::Io(e)),
        }
        if !first {
            deadline = Instant::now() + timeouts.header;
        }
    }
    loop {
        match parse(conn.buffered())? {
            Some((request, used)) => {
                conn.consume(used);
                return Ok(request);
            }
            None => {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return Err(HeadError::Slow);
                }
                conn.set_read_timeout(left).map_err(HeadError::Io)?;
                match conn.fill(MAX_REQUEST_LINE + MAX_HEADER_BYTES + 4) {
                    Ok(0) => return Err(HeadError::Closed),
                    Ok(_) => {}
                    Err(e) if is_timeout(&e) => return Err(HeadError::Slow),
                    Err(e) => return Err(HeadError::Io(e)),
                }
            }
        }
    }
}

fn is_timeout(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
    )
}

/// Parses a complete head from `bytes`: `Ok(None)` when more bytes are needed,
/// else the request and how many bytes it used. Never inlined: its 3 KiB of
/// header slots are on the stack only while it runs, not in the frame of
/// the connection loop all the while a request waits (a page of stack per
/// waiting thread).
#[inline(never)]
pub fn parse(bytes: &[u8]) -> Result<Option<(Request, usize)>, HeadError> {
    let line_end = bytes.iter().position(|&b| b == b'\n');
    let line_len = line_end.unwrap_or(bytes.len());
    if line_len > MAX_REQUEST_LINE + 1 {
        return Err(reject(414, "request line longer than 8 KiB"));
    }
    // Left uninitialized: httparse fills only as many as the head has.
    let mut fields = [const { std::mem::MaybeUninit::<httparse::Header>::uninit() }; MAX_HEADERS];
    let mut parsed = httparse::Request::new(&mut []);
    let used = match parsed.parse_with_uninit_headers(bytes, &mut fields) {
        Ok(httparse::Status::Complete(used)) => used,
        Ok(httparse::Status::Partial) => {
            if bytes.len() > line_len + MAX_HEADER_BYTES {
                return Err(reject(431, "request header fields larger than 64 KiB"));
            }
            return Ok(None);
        }
        Err(httparse::Error::TooManyHeaders) => {
            return Err(reject(431, "more than 100 request header fields"));
        }
        Err(httparse::Error::Token) => return Err(reject(400, bad_token(&bytes[..line_len]))),
        Err(e) => return Err(reject(400, format!("malformed request head: {e}"))),
    };
    if used > line_len + 1 + MAX_HEADER_BYTES {
        return Err(reject(431, "request header fields larger than 64 KiB"));
    }
    check_line_endings(&bytes[..used])?;
    let version = match parsed.version {
        Some(0) => Version::Http10,
        _ => Version::Http11,
    };
    let method = Method::parse(parsed.method.unwrap_or(""));
    let target = parsed.path.unwrap_or("");
    let mut headers = Headers::with_capacity(parsed.headers.len(), used - line_len);
    for field in parsed.headers.iter() {
        if !is_valid_value(field.value) {
            return Err(reject(
                400,
                format!("header {:?} has a control byte in its value", field.name),
            ));
        }
        headers.push(field.name, trim(field.value));
    }
    let request = Request {
        target: origin_form(target, &method)?,
        framing: framing(&headers)?,
        expects_continue: expects_continue(&headers, version)?,
        keep_alive: keep_alive(&headers, version),
        method,
        version,
        headers,
    };
    if version == Version::Http11 && request.headers.count("host") != 1 {
        return Err(reject(
            400,
            "an HTTP/1.1 request needs exactly one Host header",
        ));
    }
    Ok(Some((request, used)))
}

/// Why httparse found a bad token, in words a client's author can act on.
fn bad_token(line: &[u8]) -> &'static str {
    let target = line.split(|&b| b == b' ').nth(1).unwrap_or(b"");
    if std::str::from_utf8(target).is_err() {
        "request target is not UTF-8; percent-encode other bytes"
    } else if target.iter().any(|&b| b < 0x21 || b == 0x7f) {
        "request target has a space or a control byte; percent-encode them"
    } else {
        "malformed request line: expected METHOD /path HTTP/1.1"
    }
}

fn reject(status: u16, reason: impl Into<std::borrow::Cow<'static, str>>) -> HeadError {
    HeadError::Reject(Reject::new(status, reason))
}

/// Every line ends in CRLF: a bare LF or CR is refused, not guessed at, as
/// the two readings of such a head are how requests are smuggled (RFC 9112 §2.2).
fn check_line_endings(head: &[u8]) -> Result<(), HeadError> {
    for (i, &b) in head.iter().enumerate() {
        let bare_lf = b == b'\n' && (i == 0 || head[i - 1] != b'\r');
        let bare_cr = b == b'\r' && head.get(i + 1) != Some(&b'\n');
        if bare_lf || bare_cr {
            return Err(reject(
                400,
                "request head has a bare LF or CR; lines must end in CRLF",
            ));
        }
    }
    Ok(())
}

/// A header value may hold visible bytes, spaces and tabs, nothing else below
/// 0x20 and no DEL: such a value is refused, never relayed (DESIGN.md §4).
pub fn is_valid_value(value: &[u8]) -> bool {
    value
        .iter()
        .all(|&b| (b >= 0x20 && b != 0x7f) || b == b'\t')
}

fn trim(value: &[u8]) -> &[u8] {
    let start = value
        .iter()
        .position(|b| !b.is_ascii_whitespace())
        .unwrap_or(value.len());
    let end = value
        .iter()
        .rposition(|b| !b.is_ascii_whitespace())
        .map_or(start, |i| i + 1);
    &value[start..end]
}

/// Accepts origin form (`/path`) and absolute form (`http://host/path`, which
/// proxies send), returning origin form; `OPTIONS *` becomes `*`.
fn origin_form(target: &str, method: &Method) -> Result<String, HeadError> {
    if target.starts_with('/') {
        return Ok(target.to_owned());
    }
    if target == "*" && *method == Method::Options {
        return Ok(target.to_owned());
    }
    let lower = target.get(..8).unwrap_or(target).to_ascii_lowercase();
    let rest = if lower.starts_with("http://") {
        &target[7..]
    } else if lower.starts_with("https://") {
        &target[8..]
    } else {
        return Err(reject(400, "request target must start with /"));
    };
    let path_start = rest.find(['/', '?']).unwrap_or(rest.len());
    let path = &rest[path_start..];
    Ok(if path.starts_with('/') {
        path.to_owned()
    } else {
        format!("/{path}")
    })
}

/// The body's framing per RFC 9112 §6.3: chunked alone, or one Content-Length.
fn framing(headers: &Headers) -> Result<Framing, HeadError> {
    let has_length = headers.count("content-length") > 0;
    if headers.count("transfer-encoding") > 0 {
        if has_length {
            return Err(reject(400, "both Transfer-Encoding and Content-Length"));
        }
        let codings: Vec<&[u8]> = headers.values("transfer-encoding").collect();
        return match codings.as_slice() {
            [only] if only.eq_ignore_ascii_case(b"chunked") => Ok(Framing::Chunked),
            _ => Err(reject(400, "only Transfer-Encoding: chunked is supported")),
        };
    }
    let mut length = None;
    for value in headers.values("content-length") {
        let parsed = parse_length(value).ok_or_else(|| reject(400, "malformed Content-Length"))?;
        if length.is_some_and(|l| l != parsed) {
            return Err(reject(400, "conflicting Content-Length values"));
        }
        length = Some(parsed);
    }
    Ok(Framing::Length(length.unwrap_or(0)))
}

/// Decimal digits only, no sign, no overflow: a u64, checked, never used to
/// size an allocation.
fn parse_length(text: &[u8]) -> Option<u64> {
    if text.is_empty() || !text.iter().all(u8::is_ascii_digit) {
        return None;
    }
    text.iter().try_fold(0u64, |n, &d| {
        n.checked_mul(10)?.checked_add(u64::from(d - b'0'))
    })
}

fn expects_continue(headers: &Headers, version: Version) -> Result<bool, HeadError> {
    let mut expects = false;
    for value in headers.values("expect") {
        if value.eq_ignore_ascii_case(b"100-continue") {
            expects = true;
        } else {
            return Err(reject(417, "only Expect: 100-continue is supported"));
        }
    }
    Ok(expects && version == Version::Http11)
}

fn keep_alive(headers: &Headers, version: Version) -> bool {
    let mut close = false;
    let mut keep = false;
    for token in headers.values("connection") {
        close |= token.eq_ignore_ascii_case(b"close");
        keep |= token.eq_ignore_ascii_case(b"keep-alive");
    }
    match version {
        Version::Http11 => !close,
        Version::Http10 => keep && !close,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parsed(head: &str) -> Request {
        match parse(head.as_bytes()) {
            Ok(Some((request, used))) => {
                assert_eq!(used, head.len());
                request
            }
            Ok(None) => panic!("incomplete: {head:?}"),
            Err(e) => panic!("refused {head:?}: {e:?}"),
        }
    }

    fn status(head: &[u8]) -> u16 {
        match parse(head) {
            Err(HeadError::Reject(r)) => r.status,
            other => panic!("expected a refusal, got {other:?}"),
        }
    }

    #[test]
    fn framing_and_keep_alive() {
        let r = parsed("POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\n");
        assert_eq!(
            (r.framing, r.keep_alive, r.version),
            (Framing::Length(5), true, Version::Http11)
        );
        let r = parsed(
            "POST /a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: Chunked\r\nConnection: close\r\n\r\n",
        );
        assert_eq!((r.framing, r.keep_alive), (Framing::Chunked, false));
        let r = parsed("GET /a HTTP/1.0\r\n\r\n");
        assert_eq!((r.framing, r.keep_alive), (Framing::Length(0), false));
        let r = parsed("GET /a HTTP/1.0\r\nConnection: keep-alive\r\n\r\n");
        assert!(r.keep_alive);
        let r = parsed(
            "POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 7, 7\r\nExpect: 100-Continue\r\n\r\n",
        );
        assert_eq!((r.framing, r.expects_continue), (Framing::Length(7), true));
    }

    #[test]
    fn absolute_form_becomes_origin_form() {
        assert_eq!(
            parsed("GET http://h:3000/jobs?x=1 HTTP/1.1\r\nHost: h\r\n\r\n").target,
            "/jobs?x=1"
        );
        assert_eq!(
            parsed("GET http://h HTTP/1.1\r\nHost: h\r\n\r\n").target,
            "/"
        );
    }

    #[test]
    fn partial_heads_wait_for_more() {
        assert!(matches!(parse(b"GET /a HTTP/1.1\r\nHost: x\r\n"), Ok(None)));
    }

    #[test]
    fn bad_heads_are_refused_with_the_right_status() {
        assert_eq!(status(b"POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n"), 400);
        assert_eq!(
            status(b"POST /a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip, chunked\r\n\r\n"),
            400
        );
        assert_eq!(
            status(
                b"POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 99999999999999999999999\r\n\r\n"
            ),
            400
        );
        assert_eq!(
            status(b"POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: +5\r\n\r\n"),
            400
        );
        assert_eq!(
            status(
                b"POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n"
            ),
            400
        );
        assert_eq!(
            status(b"GET /a HTTP/1.1\r\nHost: x\r\nX-A: b\nX-C: d\r\n\r\n"),
            400
        );
        assert_eq!(
            status(b"GET /a HTTP/1.1\r\nHost: x\r\nX-A: b\x01c\r\n\r\n"),
            400
        );
        assert_eq!(status(b"GET /a HTTP/1.1\r\n\r\n"), 400);
        assert_eq!(status(b"GET a HTTP/1.1\r\nHost: x\r\n\r\n"), 400);
        match parse(b"GET /caf\xe9 HTTP/1.1\r\nHost: x\r\n\r\n") {
            Err(HeadError::Reject(r)) => assert!(r.reason.contains("not UTF-8"), "{r:?}"),
            other => panic!("{other:?}"),
        }
        assert_eq!(
            status(b"GET /a HTTP/1.1\r\nHost: x\r\nExpect: magic\r\n\r\n"),
            417
        );
        let long_line = format!("GET /{} HTTP/1.1\r\n", "a".repeat(MAX_REQUEST_LINE));
        assert_eq!(status(long_line.as_bytes()), 414);
        let many = format!(
            "GET /a HTTP/1.1\r\nHost: x\r\n{}\r\n",
            "X-A: b\r\n".repeat(MAX_HEADERS)
        );
        assert_eq!(status(many.as_bytes()), 431);
        let big = format!(
            "GET /a HTTP/1.1\r\nHost: x\r\nX-A: {}\r\n",
            "b".repeat(MAX_HEADER_BYTES)
        );
        assert_eq!(status(big.as_bytes()), 431);
    }
}
