//! Relays behind a load balancer (`--cluster-url`). The balancer sends
//! every request for a channel to one relay, chosen by the channel's
//! shard key; a double-clutch answer, though, goes to a queue channel that
//! the responder names, which the balancer may give to another relay than
//! the one that holds the requester. The requester's relay then takes the
//! answer from there, through the balancer, as that channel's consumer: a
//! GET that proves (`Patch-Relay`, an HMAC under the key the relays share,
//! for that channel, until a time) that a relay asks for its requester.
//! The relay that holds the channel answers it as it would the requester
//! itself (the answer's status, its headers, its body) and marks it
//! `Patch-Switched`; what comes back without the mark is that relay's own
//! refusal.
//!
//! The request is withdrawn as soon as the requester hangs up, so the
//! other relay never pairs it; only an answer already under way in that
//! instant can be lost, as behind any proxy.

use std::time::{Duration, Instant};

use crate::client::{Client, Failure, Relay, Upload};
use crate::error::Reject;
use crate::hooks::HookKey;
use crate::http::response::{Payload, stream_body};
use crate::http::{Exchange, Head, Method};
use crate::mode::delivery::SWITCHED;
use crate::route::percent_encode;

/// Headers of the other relay's answer that this relay writes itself
/// (framing, its own common headers) or that only say it is an answer.
const NOT_COPIED: [&str; 9] = [
    "content-length",
    "transfer-encoding",
    "connection",
    "keep-alive",
    "date",
    "access-control-allow-origin",
    "x-content-type-options",
    "x-robots-tag",
    "patch-switched",
];

/// How long past its own wait (`?timeout=`, after which the other relay
/// answers 408) the answer's relay has to say anything at all.
const ANSWER_SLACK: Duration = Duration::from_secs(2);

/// The balancer, and the key the relays behind it share.
pub struct Cluster {
    balancer: Relay,
    key: HookKey,
    /// The longest pause in an answer's body (`--idle-timeout`).
    idle: Duration,
}

/// How taking an answer ended, when it did not fail.
pub enum Taken {
    /// The requester was sent the answer, whole.
    Answered,
    /// The requester hung up first; nothing was taken for it.
    HungUp,
}

impl Cluster {
    /// Relays behind `balancer`, signing with `key`; an answer's body may
    /// pause for `idle` at most, as it may on one relay.
    pub fn new(balancer: Relay, key: HookKey, idle: Duration) -> Cluster {
        Cluster {
            balancer,
            key,
            idle,
        }
    }

    /// Takes the answer sent to queue channel `channel` (waiting for it
    /// for at most `within`) from whichever relay holds the channel, and
    /// writes it to the requester of `ex`.
    pub fn take_answer(
        &self,
        ex: &mut Exchange,
        channel: &str,
        within: Duration,
    ) -> Result<Taken, Reject> {
        let proof = self.key.relay_proof(channel);
        let target = format!(
            "{}?timeout={}",
            self.balancer.target(&percent_encode(channel, b"/")),
            within.as_secs_f64()
        );
        // A requester that leaves resets the request: the other relay then
        // never pairs it with the answer.
        let mut client = Client::new(self.balancer.clone())
            .abandoning()
            .answered_by(Instant::now() + within + ANSWER_SLACK);
        // The requester sends nothing more until it has its answer: its
        // socket turning readable means it hung up (the client peeks: a
        // pipelined next request does not count).
        let watch = [(ex.conn.fd(), libc::POLLIN)];
        let headers = [("Patch-Relay", proof.as_bytes())];
        let mut incoming = match client.open("GET", &target, &headers, Upload::None, &watch) {
            Ok(incoming) => incoming,
            Err(Failure::Withdrawn(..)) => {
                ex.close();
                return Ok(Taken::HungUp);
            }
            Err(Failure::Io(error)) if error.kind() == std::io::ErrorKind::TimedOut => {
                return Err(Reject::new(
                    504,
                    format!(
                        "no answer came through --cluster-url within {} s (--reply-timeout)",
                        within.as_secs_f64()
                    ),
                ));
            }
            Err(Failure::Io(error)) => {
                return Err(Reject::new(
                    502,
                    format!(
                        "the answer's relay could not be reached through --cluster-url: {error}"
                    ),
                ));
            }
        };
        incoming.patience(self.idle);
        let status = incoming.head.status;
        if incoming.head.header(SWITCHED).is_none() {
            return Err(match status {
                408 => Reject::new(
                    504,
                    format!(
                        "the responder sent no answer within {} s (--reply-timeout)",
                        within.as_secs_f64()
                    ),
                ),
                _ => Reject::new(
                    502,
                    format!("the relay that holds the answer's channel refused it ({status})"),
                ),
            });
        }
        let mut head = Head::new(status);
        for (name, value) in &incoming.head.headers {
            if !NOT_COPIED.iter().any(|n| name.eq_ignore_ascii_case(n)) {
                head.header(name, value);
            }
        }
        let length = incoming
            .head
            .header("content-length")
            .and_then(|n| n.parse::<u64>().ok());
        let bodiless = ex.request.method == Method::Head || matches!(status, 204 | 304);
        let payload = match length {
            _ if !bodiless => Payload::for_body(ex.request.version, length),
            Some(n) if status != 204 => Payload::Length(n),
            _ => Payload::None,
        };
        let bytes = ex.start_response(head, payload);
        let mut sink = ex.conn.stream();
        let written = if bodiless {
            crate::http::response::write_all(&mut sink, [bytes.as_slice()])
                .map(|()| 0)
                .map_err(|error| error.to_string())
        } else {
            stream_body(&bytes, &mut incoming, &mut sink, payload)
                .map_err(|error| format!("{error:?}"))
        };
        match written {
            Ok(sent) => {
                ex.add_sent(sent);
                Ok(Taken::Answered)
            }
            Err(error) => {
                // Started, then cut: the connection ends, as for an answer
                // cut on one relay.
                log::debug!("a switched answer from another relay was cut: {error}");
                ex.close();
                Ok(Taken::Answered)
            }
        }
    }
}
