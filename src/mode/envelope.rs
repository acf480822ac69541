//! What a sender relays besides its body (DESIGN.md §4): the Content-Type,
//! Content-Encoding, Content-Disposition and every `Patch-H-<Name>` header as
//! `<Name>`. Queue and pubsub channels both build it from the request and
//! both write it into the receiver's response. Hop-by-hop fields never
//! travel, nor do the headers a sender could use to take over the relay's
//! origin in a receiver's browser. `patchcord work` sorts a CMD's CGI
//! headers by the same rule ([`is_relayed`]).

use crate::http::{Exchange, Head, Request};
use crate::route::{Query, TokenSource};

/// Hop-by-hop fields: they describe one connection and never travel.
const HOP_BY_HOP: [&str; 7] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "transfer-encoding",
    "te",
    "trailer",
    "upgrade",
];

/// Headers a sender may not relay with `Patch-H-` (or `Pb-H-`) besides the
/// [`HOP_BY_HOP`] ones: the ones the relay sets itself, and the ones that
/// would act for the relay's whole origin in a browser (every channel
/// shares it): cookies, service workers, HSTS, site data, alternative
/// services. Names starting with [`UNRELAYED_PREFIXES`] are refused too.
const UNRELAYED: [&str; 14] = [
    "content-length",
    "content-type",
    "content-encoding",
    "content-disposition",
    "date",
    "cache-control",
    "x-accel-buffering",
    "x-content-type-options",
    "x-robots-tag",
    "set-cookie",
    "service-worker-allowed",
    "strict-transport-security",
    "clear-site-data",
    "alt-svc",
];

/// Request headers a requester's request never forwards to a responder
/// besides the [`HOP_BY_HOP`] ones: the body's framing, which is the
/// relay's business.
const NOT_FORWARDED: [&str; 2] = ["content-length", "expect"];

/// Name prefixes of headers the relay sets itself (`Patch-Id`, CORS: the
/// relay's policy, never a sender's).
const UNRELAYED_PREFIXES: [&str; 3] = ["patch-", "pb-", "access-control-"];

/// The headers that travel with one message.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Envelope {
    pub content_type: String,
    /// The sender's Content-Encoding (a gzip upload stays gzip, labelled so).
    pub encoding: Option<Vec<u8>>,
    pub disposition: Option<Vec<u8>>,
    /// `Patch-H-<Name>` (or `Pb-H-<Name>`) headers, as (`<Name>`, value).
    pub relayed: Vec<(String, Vec<u8>)>,
}

/// Whether `name` starts with `prefix` (lowercase), in any case.
pub fn has_prefix(name: &str, prefix: &str) -> bool {
    name.get(..prefix.len())
        .is_some_and(|start| start.eq_ignore_ascii_case(prefix))
}

/// Whether `<name>` may travel as `Patch-H-<name>`.
pub fn is_relayed(name: &str) -> bool {
    let lower = name.to_ascii_lowercase();
    !lower.is_empty()
        && !HOP_BY_HOP.contains(&lower.as_str())
        && !UNRELAYED.contains(&lower.as_str())
        && !UNRELAYED_PREFIXES.iter().any(|p| lower.starts_with(p))
}

impl Envelope {
    /// The envelope of the message `ex` sends; `inline` when the message is
    /// `?body=` text rather than a request body.
    pub fn from_request(ex: &Exchange, query: &Query, inline: bool) -> Envelope {
        let request = &ex.request;
        let content_type = match (&query.mime, request.header("content-type"), inline) {
            (Some(mime), _, _) => mime.clone(),
            (None, Some(given), _) => given.to_owned(),
            (None, None, true) => "text/plain; charset=utf-8".to_owned(),
            (None, None, false) => "application/octet-stream".to_owned(),
        };
        let mut disposition = None;
        let mut encoding = None;
        let mut relayed = Vec::new();
        for (field, value) in request.headers.iter() {
            if field.eq_ignore_ascii_case("content-disposition") {
                disposition = Some(value.to_vec());
                continue;
            }
            if field.eq_ignore_ascii_case("content-encoding") && !inline {
                encoding = Some(value.to_vec());
                continue;
            }
            let Some(at) = ["patch-h-", "pb-h-"]
                .iter()
                .find(|p| has_prefix(field, p))
                .map(|p| p.len())
            else {
                continue;
            };
            let name = &field[at..];
            if is_relayed(name) {
                relayed.push((name.to_owned(), value.to_vec()));
            }
        }
        Envelope {
            content_type,
            encoding,
            disposition,
            relayed,
        }
    }

    /// A request as a message to a responder (DESIGN.md §4): its method,
    /// URI (`uri`, without the relay's credentials) and path (`path`, what
    /// follows the channel id) as `Patch-Method`, `Patch-Uri` and
    /// `Patch-Path`, and each of its headers as `Patch-H-<Name>`, with the
    /// same again as patchbay's `Pb-` names. Hop-by-hop headers, the
    /// body's framing and the header that carried the relay's token
    /// (`carrier`) never travel; its Content-Type is the message's.
    pub fn of_request(
        request: &Request,
        carrier: Option<TokenSource>,
        uri: &str,
        path: &str,
    ) -> Envelope {
        let method = request.method.as_str();
        let mut relayed = Vec::with_capacity(5 + 2 * request.headers.iter().count());
        for (name, value) in [
            ("Patch-Method", method),
            ("Patch-Uri", uri),
            ("Patch-Path", path),
            ("Pb-Method", method),
            ("Pb-Uri", uri),
        ] {
            relayed.push((name.to_owned(), value.as_bytes().to_vec()));
        }
        for (name, value) in request.headers.iter() {
            let carried_token = name.eq_ignore_ascii_case("patch-token")
                || (carrier == Some(TokenSource::Bearer)
                    && name.eq_ignore_ascii_case("authorization"));
            let framing = HOP_BY_HOP
                .iter()
                .chain(&NOT_FORWARDED)
                .any(|n| name.eq_ignore_ascii_case(n));
            if carried_token || framing {
                continue;
            }
            for prefix in ["Patch-H-", "Pb-H-"] {
                relayed.push((format!("{prefix}{name}"), value.to_vec()));
            }
        }
        Envelope {
            content_type: request
                .header("content-type")
                .unwrap_or("application/octet-stream")
                .to_owned(),
            encoding: None,
            disposition: None,
            relayed,
        }
    }

    /// The envelope of a plain-text message from the relay itself.
    pub fn text() -> Envelope {
        Envelope {
            content_type: "text/plain; charset=utf-8".to_owned(),
            ..Envelope::default()
        }
    }

    /// Writes the envelope into a receiver's response head; `mime` is the
    /// receiver's own `?mime=`, which wins over the sender's Content-Type.
    pub fn write_to(&self, head: &mut Head, mime: Option<&str>) {
        head.header("Content-Type", mime.unwrap_or(&self.content_type));
        if let Some(encoding) = &self.encoding {
            head.header("Content-Encoding", encoding);
        }
        if let Some(disposition) = &self.disposition {
            head.header("Content-Disposition", disposition);
        }
        for (name, value) in &self.relayed {
            head.header(name, value);
        }
    }

    /// Roughly how many bytes the envelope holds, for memory accounting.
    pub fn size(&self) -> usize {
        self.content_type.len()
            + self.encoding.as_ref().map_or(0, Vec::len)
            + self.disposition.as_ref().map_or(0, Vec::len)
            + self
                .relayed
                .iter()
                .map(|(name, value)| name.len() + value.len() + 48)
                .sum::<usize>()
    }

    /// The envelope as bytes, for the store's file (`store.rs`): each field
    /// as its name and value, each preceded by its length (u32, little
    /// endian): `Content-Type`, then `Content-Encoding` and
    /// `Content-Disposition` if set, then each relayed header as `H-<Name>`.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.size());
        let mut field = |name: &str, value: &[u8]| {
            for part in [name.as_bytes(), value] {
                let len = u32::try_from(part.len()).unwrap_or(u32::MAX);
                out.extend_from_slice(&len.to_le_bytes());
                out.extend_from_slice(&part[..len as usize]);
            }
        };
        field("Content-Type", self.content_type.as_bytes());
        if let Some(encoding) = &self.encoding {
            field("Content-Encoding", encoding);
        }
        if let Some(disposition) = &self.disposition {
            field("Content-Disposition", disposition);
        }
        for (name, value) in &self.relayed {
            field(&format!("H-{name}"), value);
        }
        out
    }

    /// The envelope [`Envelope::to_bytes`] wrote; None if `bytes` are not one.
    pub fn from_bytes(mut bytes: &[u8]) -> Option<Envelope> {
        fn take<'b>(bytes: &mut &'b [u8]) -> Option<&'b [u8]> {
            let (len, rest) = bytes.split_first_chunk::<4>()?;
            let len = usize::try_from(u32::from_le_bytes(*len)).ok()?;
            let part = rest.get(..len)?;
            *bytes = &rest[len..];
            Some(part)
        }
        let mut envelope = Envelope::default();
        let mut content_type = None;
        while !bytes.is_empty() {
            let name = std::str::from_utf8(take(&mut bytes)?).ok()?.to_owned();
            let value = take(&mut bytes)?.to_vec();
            match name.as_str() {
                "Content-Type" => content_type = Some(String::from_utf8(value).ok()?),
                "Content-Encoding" => envelope.encoding = Some(value),
                "Content-Disposition" => envelope.disposition = Some(value),
                _ => envelope
                    .relayed
                    .push((name.strip_prefix("H-")?.to_owned(), value)),
            }
        }
        envelope.content_type = content_type?;
        Some(envelope)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_relays_own_headers_never_travel() {
        for name in ["Title", "X-Priority", "Tags"] {
            assert!(is_relayed(name), "{name}");
        }
        for name in [
            "",
            "Patch-Id",
            "patch-missed",
            "Pb-H-Title",
            "Access-Control-Allow-Origin",
            "Cache-Control",
            "X-Accel-Buffering",
            "Set-Cookie",
            "Transfer-Encoding",
            "Content-Length",
            "Content-Encoding",
            "Service-Worker-Allowed",
            "Strict-Transport-Security",
            "clear-site-data",
            "Alt-Svc",
            "Access-Control-Expose-Headers",
            "X-Robots-Tag",
        ] {
            assert!(!is_relayed(name), "{name}");
        }
    }

    #[test]
    fn an_envelope_comes_back_from_its_bytes() {
        let envelope = Envelope {
            content_type: "text/plain; charset=utf-8".to_owned(),
            encoding: Some(b"gzip".to_vec()),
            disposition: None,
            relayed: vec![
                ("Title".to_owned(), "caf\u{e9}".as_bytes().to_vec()),
                ("X-Raw".to_owned(), vec![0xff, b'a']),
            ],
        };
        let bytes = envelope.to_bytes();
        assert_eq!(Envelope::from_bytes(&bytes), Some(envelope));
        assert_eq!(Envelope::from_bytes(&bytes[..bytes.len() - 1]), None);
        assert_eq!(Envelope::from_bytes(b"junk"), None);
        assert_eq!(Envelope::from_bytes(b""), None);
    }
}
