//! How a streaming pubsub subscription writes its messages: raw (patchbay's
//! `?persist=true`: bodies back to back, as the publishers framed them),
//! Server-Sent Events, or NDJSON. Pure: bytes in, bytes out; the stream loop
//! in `stream.rs` frames and writes them. A message is encoded piece by
//! piece ([`Encoder`]), so that a stream's buffer stays small whatever the
//! size of the message it is writing.

use std::time::UNIX_EPOCH;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;

use crate::error::Reject;
use crate::mode::pubsub::store::Message;
use crate::route::{Query, parse_flag};

/// SSE field names a relayed header may not take: they would change the
/// event, or fake the relay's own `encoding` field.
const SSE_FIELDS: [&str; 5] = ["data", "id", "event", "retry", "encoding"];

/// Body bytes encoded per piece (a multiple of 3, so that base64 pieces join
/// without padding); a piece of output is at most 6 times this (JSON escapes).
const PIECE: usize = 6 * 1024;

/// The framing of a streaming subscription.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// Bodies back to back, nothing added.
    Raw,
    /// `text/event-stream`: `id:` and `data:` lines per message.
    Sse,
    /// One JSON object per line.
    Ndjson,
}

impl Format {
    /// The stream a subscription asks for, or None for a one-shot receive:
    /// `?format=sse|ndjson|raw`, else SSE when the client accepts
    /// `text/event-stream` and gave no `?mime=`, else raw with `?persist=true`.
    pub fn requested(query: &Query, accept: Option<&str>) -> Result<Option<Format>, Reject> {
        if let Some(format) = query.get("format") {
            return match format {
                "sse" => Ok(Some(Format::Sse)),
                "ndjson" => Ok(Some(Format::Ndjson)),
                "raw" => Ok(Some(Format::Raw)),
                _ => Err(Reject::bad_request("format= takes sse, ndjson or raw")),
            };
        }
        if accept.is_some_and(accepts_event_stream) && query.mime.is_none() {
            return Ok(Some(Format::Sse));
        }
        let persist = match query.get("persist") {
            Some(flag) => parse_flag(flag).ok_or_else(|| {
                Reject::bad_request("persist= takes true, false, 1, 0, yes or no")
            })?,
            None => false,
        };
        Ok(persist.then_some(Format::Raw))
    }

    /// The stream's Content-Type; a raw stream takes the subscriber's `?mime=`.
    pub fn content_type(self, mime: Option<&str>) -> &str {
        match self {
            Format::Raw => mime.unwrap_or("application/octet-stream"),
            Format::Sse => "text/event-stream",
            Format::Ndjson => "application/x-ndjson",
        }
    }

    /// Appends a notice that `count` messages were evicted before this
    /// subscriber could read them (a raw stream has no room for one).
    pub fn write_missed(self, count: u64, out: &mut Vec<u8>) {
        let notice = match self {
            Format::Raw => return,
            Format::Sse => format!("event: missed\ndata: {count}\n\n"),
            Format::Ndjson => format!("{{\"event\":\"missed\",\"count\":{count}}}\n"),
        };
        out.extend_from_slice(notice.as_bytes());
    }

    /// Appends a keepalive (nothing for a raw stream, which has no room for one).
    pub fn write_keepalive(self, out: &mut Vec<u8>) {
        match self {
            Format::Raw => {}
            Format::Sse => out.extend_from_slice(b": keepalive\n\n"),
            Format::Ndjson => out.extend_from_slice(b"{\"event\":\"keepalive\"}\n"),
        }
    }
}

/// Whether an Accept header lists `text/event-stream` (in any case) without
/// `q=0`, which would mean "not acceptable" (RFC 9110 §12.4.2).
fn accepts_event_stream(accept: &str) -> bool {
    accept.split(',').any(|range| {
        let mut params = range.split(';').map(str::trim);
        let is_sse = params
            .next()
            .is_some_and(|t| t.eq_ignore_ascii_case("text/event-stream"));
        let refused = params.any(|p| {
            p.strip_prefix("q=")
                .is_some_and(|q| q.parse::<f32>().is_ok_and(|q| q == 0.0))
        });
        is_sse && !refused
    })
}

/// One message being encoded, piece by piece.
///
/// SSE: an `id:` line, the relayed headers as extra fields (which
/// EventSource ignores and line readers see), and the body as `data:` lines,
/// split where the body has line breaks so that the client joins it back
/// (WHATWG HTML §9.2.6); a body that is not UTF-8 goes as one base64 line
/// after `encoding: base64`. NDJSON: `{"id","time","content_type","body"}`,
/// with `"headers"` when any travel and `"encoding":"base64"` for a body that
/// is not UTF-8. Raw: the body.
pub struct Encoder<'m> {
    format: Format,
    message: &'m Message,
    /// Whether the body goes as base64 (not UTF-8, in SSE or NDJSON).
    base64: bool,
    stage: Stage,
    /// Body bytes encoded so far.
    at: usize,
    /// The last body byte encoded was a CR (SSE: a CRLF is one line break).
    after_cr: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    Start,
    Body,
    End,
    Done,
}

impl<'m> Encoder<'m> {
    /// Starts encoding `message` as `format`.
    pub fn new(format: Format, message: &'m Message) -> Encoder<'m> {
        let base64 = format != Format::Raw && std::str::from_utf8(&message.body).is_err();
        Encoder {
            format,
            message,
            base64,
            stage: Stage::Start,
            at: 0,
            after_cr: false,
        }
    }

    /// Appends the next piece of the message to `out`; false (and nothing
    /// appended) once the message is complete.
    pub fn write_next(&mut self, out: &mut Vec<u8>) -> bool {
        match self.stage {
            Stage::Start => {
                self.start(out);
                self.stage = Stage::Body;
            }
            Stage::Body => {
                let body = &self.message.body;
                let end = body.len().min(self.at + PIECE);
                let piece = &body[self.at..end];
                if self.base64 {
                    out.extend_from_slice(BASE64.encode(piece).as_bytes());
                } else {
                    match self.format {
                        Format::Raw => out.extend_from_slice(piece),
                        Format::Sse => self.sse_lines(piece, out),
                        Format::Ndjson => json_bytes(piece, out),
                    }
                }
                self.at = end;
                if end == body.len() {
                    self.stage = Stage::End;
                }
            }
            Stage::End => {
                match self.format {
                    Format::Raw => {}
                    Format::Sse => out.extend_from_slice(b"\n\n"),
                    Format::Ndjson => out.extend_from_slice(b"\"}\n"),
                }
                self.stage = Stage::Done;
            }
            Stage::Done => return false,
        }
        true
    }

    /// What comes before the body.
    fn start(&self, out: &mut Vec<u8>) {
        let message = self.message;
        match self.format {
            Format::Raw => {}
            Format::Sse => {
                out.extend_from_slice(format!("id: {}\n", message.id).as_bytes());
                for (name, value) in headers(message) {
                    if !SSE_FIELDS.contains(&name.to_ascii_lowercase().as_str()) {
                        let value = String::from_utf8_lossy(value);
                        out.extend_from_slice(format!("{name}: {value}\n").as_bytes());
                    }
                }
                if self.base64 {
                    out.extend_from_slice(b"encoding: base64\n");
                }
                out.extend_from_slice(b"data: ");
            }
            Format::Ndjson => {
                let time = message
                    .time
                    .duration_since(UNIX_EPOCH)
                    .map_or(0, |d| d.as_secs());
                let id = message.id;
                out.extend_from_slice(format!("{{\"id\":{id},\"time\":{time}").as_bytes());
                out.extend_from_slice(b",\"content_type\":\"");
                json_bytes(message.envelope.content_type.as_bytes(), out);
                out.push(b'"');
                let mut headers = headers(message).peekable();
                if headers.peek().is_some() {
                    out.extend_from_slice(b",\"headers\":{");
                    for (i, (name, value)) in headers.enumerate() {
                        if i > 0 {
                            out.push(b',');
                        }
                        out.push(b'"');
                        json_bytes(name.as_bytes(), out);
                        out.extend_from_slice(b"\":\"");
                        json_bytes(String::from_utf8_lossy(value).as_bytes(), out);
                        out.push(b'"');
                    }
                    out.push(b'}');
                }
                if self.base64 {
                    out.extend_from_slice(b",\"encoding\":\"base64\"");
                }
                out.extend_from_slice(b",\"body\":\"");
            }
        }
    }

    /// SSE: a body's bytes, each line break (CR, LF or CRLF) starting a new
    /// `data:` line. CR and LF never occur inside a UTF-8 sequence, so a
    /// piece may end anywhere.
    fn sse_lines(&mut self, piece: &[u8], out: &mut Vec<u8>) {
        for &byte in piece {
            match byte {
                b'\n' if self.after_cr => {}
                b'\r' | b'\n' => out.extend_from_slice(b"\ndata: "),
                _ => out.push(byte),
            }
            self.after_cr = byte == b'\r';
        }
    }
}

/// The headers that travel with `message`, besides its Content-Type.
fn headers(message: &Message) -> impl Iterator<Item = (&str, &[u8])> {
    let envelope = &message.envelope;
    let encoding = envelope
        .encoding
        .as_deref()
        .map(|value| ("Content-Encoding", value));
    let disposition = envelope
        .disposition
        .as_deref()
        .map(|value| ("Content-Disposition", value));
    encoding.into_iter().chain(disposition).chain(
        envelope
            .relayed
            .iter()
            .map(|(name, value)| (name.as_str(), value.as_slice())),
    )
}

/// Appends the bytes of UTF-8 text, escaped for the inside of a JSON string
/// (RFC 8259 §7). Only ASCII bytes are escaped, so a piece may end inside a
/// multi-byte character.
pub fn json_bytes(text: &[u8], out: &mut Vec<u8>) {
    for &byte in text {
        match byte {
            b'"' => out.extend_from_slice(b"\\\""),
            b'\\' => out.extend_from_slice(b"\\\\"),
            b'\n' => out.extend_from_slice(b"\\n"),
            b'\r' => out.extend_from_slice(b"\\r"),
            b'\t' => out.extend_from_slice(b"\\t"),
            byte if byte < b' ' => out.extend_from_slice(format!("\\u{byte:04x}").as_bytes()),
            byte => out.push(byte),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mode::envelope::Envelope;
    use std::time::Duration;

    fn message(body: &[u8], relayed: &[(&str, &str)]) -> Message {
        Message::new(
            7,
            UNIX_EPOCH + Duration::from_secs(1_700_000_000),
            std::time::Instant::now(),
            Envelope {
                content_type: "text/plain".into(),
                encoding: None,
                disposition: None,
                relayed: relayed
                    .iter()
                    .map(|(n, v)| (n.to_string(), v.as_bytes().to_vec()))
                    .collect(),
            },
            body.to_vec(),
        )
    }

    fn encoded(format: Format, message: &Message) -> Vec<u8> {
        let mut out = Vec::new();
        let mut encoder = Encoder::new(format, message);
        let mut pieces = 0;
        while encoder.write_next(&mut out) {
            pieces += 1;
            assert!(pieces < 10_000);
        }
        out
    }

    fn written(format: Format, message: &Message) -> String {
        String::from_utf8(encoded(format, message)).unwrap()
    }

    #[test]
    fn sse_splits_lines_and_keeps_its_own_fields() {
        let relayed = [("Title", "Build failed"), ("id", "99"), ("Encoding", "x")];
        let m = message(b"one\ntwo\r\nthree\rfour\n", &relayed);
        assert_eq!(
            written(Format::Sse, &m),
            "id: 7\nTitle: Build failed\ndata: one\ndata: two\ndata: three\ndata: four\ndata: \n\n"
        );
        assert_eq!(
            written(Format::Sse, &message(b"", &[])),
            "id: 7\ndata: \n\n"
        );
        assert_eq!(
            written(Format::Sse, &message(&[0xff, 0], &[])),
            "id: 7\nencoding: base64\ndata: /wA=\n\n"
        );
    }

    #[test]
    fn ndjson_escapes_text_and_encodes_binary() {
        let m = message(b"say \"hi\"\n\x01", &[("Title", "T")]);
        assert_eq!(
            written(Format::Ndjson, &m),
            "{\"id\":7,\"time\":1700000000,\"content_type\":\"text/plain\",\
             \"headers\":{\"Title\":\"T\"},\"body\":\"say \\\"hi\\\"\\n\\u0001\"}\n"
        );
        assert_eq!(
            written(Format::Ndjson, &message(&[0xff], &[])),
            "{\"id\":7,\"time\":1700000000,\"content_type\":\"text/plain\",\
             \"encoding\":\"base64\",\"body\":\"/w==\"}\n"
        );
    }

    #[test]
    fn large_bodies_are_encoded_in_pieces_that_join_up() {
        // A CRLF across the boundary of two pieces is still one line break.
        let mut text = vec![b'a'; PIECE - 1];
        text.extend_from_slice(b"\r\nb");
        let expected = format!("id: 7\ndata: {}\ndata: b\n\n", "a".repeat(PIECE - 1));
        assert_eq!(written(Format::Sse, &message(&text, &[])), expected);
        let binary: Vec<u8> = (0..3 * PIECE + 5).map(|i| (i % 113) as u8 | 0x80).collect();
        let ndjson = written(Format::Ndjson, &message(&binary, &[]));
        let tail = format!("\"body\":\"{}\"}}\n", BASE64.encode(&binary));
        assert!(ndjson.ends_with(&tail));
        let mut accented = "é".repeat(PIECE).into_bytes();
        accented.push(b'"');
        let ndjson = written(Format::Ndjson, &message(&accented, &[]));
        let tail = format!("\"body\":\"{}\\\"\"}}\n", "é".repeat(PIECE));
        assert!(ndjson.ends_with(&tail));
        assert!(encoded(Format::Raw, &message(&binary, &[])) == binary);
    }

    #[test]
    fn raw_streams_add_nothing() {
        let m = message(b"data: hi\n\n", &[("Title", "T")]);
        assert_eq!(written(Format::Raw, &m), "data: hi\n\n");
        let mut out = Vec::new();
        Format::Raw.write_keepalive(&mut out);
        Format::Raw.write_missed(3, &mut out);
        assert!(out.is_empty());
    }

    #[test]
    fn the_request_picks_the_format() {
        let query = |params: &[(&str, &str)], mime: Option<&str>| Query {
            params: params
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            mime: mime.map(str::to_owned),
            ..Query::default()
        };
        let none = query(&[], None);
        let sse = Some("text/html, Text/Event-Stream;q=0.9");
        assert_eq!(Format::requested(&none, None), Ok(None));
        assert_eq!(Format::requested(&none, sse), Ok(Some(Format::Sse)));
        let refused = Some("text/event-stream; q=0, */*");
        assert_eq!(Format::requested(&none, refused), Ok(None));
        let chat = query(&[("persist", "true")], Some("text/event-stream"));
        assert_eq!(Format::requested(&chat, sse), Ok(Some(Format::Raw)));
        let ndjson = query(&[("format", "ndjson")], None);
        assert_eq!(Format::requested(&ndjson, sse), Ok(Some(Format::Ndjson)));
        assert!(Format::requested(&query(&[("format", "xml")], None), None).is_err());
        assert!(Format::requested(&query(&[("persist", "maybe")], None), None).is_err());
    }
}
