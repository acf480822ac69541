//! How a streaming pubsub subscription writes its messages: raw (patchbay's
//! `?persist=true`: bodies back to back, as the publishers framed them),
//! Server-Sent Events, or NDJSON. Pure: bytes in, bytes out; the stream loop
//! in `pubsub.rs` frames and writes them.

use std::time::UNIX_EPOCH;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;

use crate::error::Reject;
use crate::mode::pubsub::Message;
use crate::route::{Query, parse_flag};

/// SSE field names a relayed header may not take: they would change the event.
const SSE_FIELDS: [&str; 4] = ["data", "id", "event", "retry"];

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
        let wants_sse = accept.is_some_and(|accept| {
            accept
                .split(',')
                .any(|range| range.trim().starts_with("text/event-stream"))
        });
        if wants_sse && query.mime.is_none() {
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

    /// Appends `message` to `out`.
    pub fn write_message(self, message: &Message, out: &mut Vec<u8>) {
        match self {
            Format::Raw => out.extend_from_slice(&message.body),
            Format::Sse => sse_event(message, out),
            Format::Ndjson => ndjson_line(message, out),
        }
    }

    /// Appends a notice that `count` messages were evicted before this
    /// subscriber could read them (a raw stream has no room for one).
    pub fn write_missed(self, count: u64, out: &mut Vec<u8>) {
        match self {
            Format::Raw => {}
            Format::Sse => {
                out.extend_from_slice(format!("event: missed\ndata: {count}\n\n").as_bytes())
            }
            Format::Ndjson => out.extend_from_slice(
                format!("{{\"event\":\"missed\",\"count\":{count}}}\n").as_bytes(),
            ),
        }
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

/// One Server-Sent Event: `id:`, the relayed headers as extra fields (which
/// EventSource ignores and line readers see), and the body as `data:` lines,
/// split where the body has line breaks so that the client joins it back
/// (WHATWG HTML §9.2.6). A body that is not UTF-8 goes as one base64 line
/// after `encoding: base64`.
fn sse_event(message: &Message, out: &mut Vec<u8>) {
    out.extend_from_slice(format!("id: {}\n", message.id).as_bytes());
    for (name, value) in headers(message) {
        if !SSE_FIELDS.contains(&name.to_ascii_lowercase().as_str()) {
            out.extend_from_slice(
                format!("{name}: {}\n", String::from_utf8_lossy(value)).as_bytes(),
            );
        }
    }
    match std::str::from_utf8(&message.body) {
        Ok(text) => {
            let mut rest = text;
            loop {
                let Some(at) = rest.find(['\r', '\n']) else {
                    out.extend_from_slice(b"data: ");
                    out.extend_from_slice(rest.as_bytes());
                    out.push(b'\n');
                    break;
                };
                out.extend_from_slice(b"data: ");
                out.extend_from_slice(&rest.as_bytes()[..at]);
                out.push(b'\n');
                let skip = if rest[at..].starts_with("\r\n") { 2 } else { 1 };
                rest = &rest[at + skip..];
            }
        }
        Err(_) => {
            out.extend_from_slice(b"encoding: base64\ndata: ");
            out.extend_from_slice(BASE64.encode(&message.body).as_bytes());
            out.push(b'\n');
        }
    }
    out.push(b'\n');
}

/// One NDJSON line: `{"id","time","content_type","body"}`, with `"headers"`
/// when any travel, and `"encoding":"base64"` when the body is not UTF-8.
fn ndjson_line(message: &Message, out: &mut Vec<u8>) {
    let time = message
        .time
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    out.extend_from_slice(
        format!("{{\"id\":{},\"time\":{time},\"content_type\":", message.id).as_bytes(),
    );
    json_string(&message.envelope.content_type, out);
    let mut headers = headers(message).peekable();
    if headers.peek().is_some() {
        out.extend_from_slice(b",\"headers\":{");
        for (i, (name, value)) in headers.enumerate() {
            if i > 0 {
                out.push(b',');
            }
            json_string(name, out);
            out.push(b':');
            json_string(&String::from_utf8_lossy(value), out);
        }
        out.push(b'}');
    }
    match std::str::from_utf8(&message.body) {
        Ok(text) => {
            out.extend_from_slice(b",\"body\":");
            json_string(text, out);
        }
        Err(_) => {
            out.extend_from_slice(b",\"encoding\":\"base64\",\"body\":\"");
            out.extend_from_slice(BASE64.encode(&message.body).as_bytes());
            out.push(b'"');
        }
    }
    out.extend_from_slice(b"}\n");
}

/// The headers that travel with `message`, besides its Content-Type.
fn headers(message: &Message) -> impl Iterator<Item = (&str, &[u8])> {
    let envelope = &message.envelope;
    let disposition = envelope
        .disposition
        .as_deref()
        .map(|value| ("Content-Disposition", value));
    disposition.into_iter().chain(
        envelope
            .relayed
            .iter()
            .map(|(name, value)| (name.as_str(), value.as_slice())),
    )
}

/// Appends `text` as a JSON string (RFC 8259 §7).
fn json_string(text: &str, out: &mut Vec<u8>) {
    out.push(b'"');
    for c in text.chars() {
        match c {
            '"' => out.extend_from_slice(b"\\\""),
            '\\' => out.extend_from_slice(b"\\\\"),
            '\n' => out.extend_from_slice(b"\\n"),
            '\r' => out.extend_from_slice(b"\\r"),
            '\t' => out.extend_from_slice(b"\\t"),
            c if c < ' ' => out.extend_from_slice(format!("\\u{:04x}", c as u32).as_bytes()),
            c => {
                let mut utf8 = [0; 4];
                out.extend_from_slice(c.encode_utf8(&mut utf8).as_bytes());
            }
        }
    }
    out.push(b'"');
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
            Envelope {
                content_type: "text/plain".into(),
                disposition: None,
                relayed: relayed
                    .iter()
                    .map(|(n, v)| (n.to_string(), v.as_bytes().to_vec()))
                    .collect(),
            },
            body.to_vec(),
        )
    }

    fn written(format: Format, message: &Message) -> String {
        let mut out = Vec::new();
        format.write_message(message, &mut out);
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn sse_splits_lines_and_keeps_its_own_fields() {
        let m = message(
            b"one\ntwo\r\nthree\n",
            &[("Title", "Build failed"), ("id", "99")],
        );
        assert_eq!(
            written(Format::Sse, &m),
            "id: 7\nTitle: Build failed\ndata: one\ndata: two\ndata: three\ndata: \n\n"
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
        let sse = Some("text/html, text/event-stream;q=0.9");
        assert_eq!(Format::requested(&query(&[], None), None), Ok(None));
        assert_eq!(
            Format::requested(&query(&[], None), sse),
            Ok(Some(Format::Sse))
        );
        assert_eq!(
            Format::requested(
                &query(&[("persist", "true")], Some("text/event-stream")),
                sse
            ),
            Ok(Some(Format::Raw))
        );
        assert_eq!(
            Format::requested(&query(&[("format", "ndjson")], None), sse),
            Ok(Some(Format::Ndjson))
        );
        assert!(Format::requested(&query(&[("format", "xml")], None), None).is_err());
        assert!(Format::requested(&query(&[("persist", "maybe")], None), None).is_err());
    }
}
