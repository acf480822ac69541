//! Delivering a message to a waiting client: the response written into a
//! [`Receiver`]'s socket by the thread that has the message (a queue
//! producer's, a responder's answer, a requester's request), and the word
//! to the receiver's thread of how it went. Shared by queues and
//! request/responder channels.
//!
//! When it went well and the receiver's connection stays open, the word is
//! posted quietly, before the bytes go out when the message is at hand: the
//! receiver's thread sleeps on until its client's next request, and the
//! thread that wrote the response observes the request and counts it done.

use std::io;
use std::net::{Shutdown, TcpStream};
use std::sync::Arc;
use std::time::Instant;

use crate::error::Reject;
use crate::http::response::{StreamError, stream_body};
use crate::http::{Common, Exchange, Head, Method, Payload, Version, is_open};
use crate::mailbox::Poster;
use crate::metrics::{Kind, Seed, Stats};
use crate::mode::envelope::Envelope;
use crate::mode::handoff::Waiter;
use crate::route::Query;

/// The header that marks a switched answer handed to another relay.
pub const SWITCHED: &str = "Patch-Switched";

/// A waiting client that a message will be written to, as the thread that
/// writes it sees it.
pub struct Receiver {
    pub id: u64,
    /// The client's socket; the response is written to it.
    pub stream: Arc<TcpStream>,
    version: Version,
    keep_alive: bool,
    /// The client asked with HEAD: the response has no body.
    head_only: bool,
    /// The client's `?mime=`, which overrides the message's Content-Type.
    mime: Option<String>,
    /// The response takes the sender's status (an answer to a requester);
    /// else it is 200.
    takes_status: bool,
    /// Another relay takes the message for its requester (a switched
    /// answer across relays): the response says so with `Patch-Switched`.
    relayed: bool,
    /// Where the receiver's thread is told how it went.
    pub done: Poster<Delivery>,
    /// For observing the receiver's request where it is answered.
    seed: Seed,
}

/// What a receiver's thread is told, once.
pub enum Delivery {
    /// The whole response (of `status`, with `sent` body bytes) was
    /// written, ending `at`; the connection may be kept if `reusable`.
    Sent {
        status: u16,
        sent: u64,
        reusable: bool,
        at: Instant,
    },
    /// The response started and was cut after `sent` body bytes: close the connection.
    Cut { sent: u64 },
    /// The receiver's own client was found gone: close without a word.
    Gone,
    /// The channel was deleted or the server is stopping, or no answer
    /// will come: answer this.
    Ended(Reject),
}

/// What a sender relays: its envelope, the status it asks for, and, when
/// the whole message is at hand, the message itself.
pub struct Outgoing {
    pub envelope: Envelope,
    /// `Patch-Status`, for a receiver that takes it (200 by default).
    pub status: u16,
    /// `?body=` text, or a small body taken whole from the request.
    pub inline: Option<Vec<u8>>,
}

/// Where a delivered body comes from.
pub enum Body<'a, 'c> {
    /// At hand.
    Inline(&'a [u8]),
    /// Still in the sender's request, streamed as it is read.
    Request(&'a mut Exchange<'c>),
}

/// How a delivery went, as the sender learns it.
pub enum Delivered {
    /// The receiver was sent the whole response, of `sent` body bytes.
    Whole { sent: u64 },
    /// The sender's body failed to arrive (`error`) after `sent` bytes of
    /// the response; the receiver is given back when nothing reached it
    /// (its thread was told nothing).
    SenderFailed {
        error: io::Error,
        sent: u64,
        back: Option<Receiver>,
    },
    /// The receiver could not be written to: not delivered.
    ReceiverGone,
}

impl Receiver {
    /// The receiver as another relay that takes a switched answer for its
    /// requester: it takes the sender's status, and is told it is the
    /// answer (`Patch-Switched: 1`) rather than this relay's own refusal.
    pub fn relayed(mut self) -> Receiver {
        self.takes_status = true;
        self.relayed = true;
        self
    }

    /// The client of `ex`, waiting on channel `key` of `kind` for a message
    /// (`takes_status`: an answer whose status it takes); `done` tells its
    /// thread how the delivery went.
    pub fn new(
        ex: &Exchange,
        id: u64,
        kind: Kind,
        key: &str,
        query: &Query,
        takes_status: bool,
        done: Poster<Delivery>,
    ) -> Receiver {
        Receiver {
            id,
            stream: ex.conn.shared_stream(),
            version: ex.request.version,
            keep_alive: ex.request.keep_alive,
            head_only: ex.request.method == Method::Head,
            mime: query.mime.clone(),
            takes_status,
            relayed: false,
            done,
            seed: Seed {
                kind,
                method: ex.request.method.name(),
                path: key.to_owned(),
                started: ex.started(),
            },
        }
    }
}

impl Waiter for Receiver {
    fn id(&self) -> u64 {
        self.id
    }

    fn is_alive(&self) -> bool {
        is_open(&self.stream)
    }

    fn end(self, why: Option<&Reject>) {
        let delivery = why.map_or(Delivery::Gone, |r| Delivery::Ended(r.clone()));
        let _ = self.done.post(delivery);
    }
}

impl Delivery {
    /// Records on `ex`, the receiver's exchange, what this word says of its
    /// response; a refusal still to be written is returned.
    pub fn apply(self, ex: &mut Exchange) -> Result<(), Reject> {
        match self {
            Delivery::Sent {
                status,
                sent,
                reusable,
                at,
            } => {
                ex.mark_responded(status, sent, reusable);
                ex.mark_finished(at);
                if reusable {
                    // Posted quietly: the deliverer counted this request done.
                    ex.mark_released();
                }
            }
            Delivery::Cut { sent } => ex.mark_responded(200, sent, false),
            // Found gone by the deliverer, which counted it.
            Delivery::Gone => ex.close(),
            Delivery::Ended(reject) => {
                // Its socket may have been shut for reading to wake it.
                ex.close();
                return Err(reject);
            }
        }
        Ok(())
    }
}

impl Outgoing {
    /// What the sender of `ex` relays. A small body that is already here
    /// whole (it came with the head) is taken now (`take_small`), so that
    /// the message is at hand for whichever thread delivers it, which
    /// probes the sender first. `Patch-Status` must be 200–599.
    pub fn from_request(
        ex: &mut Exchange,
        query: &Query,
        take_small: usize,
    ) -> Result<Outgoing, Reject> {
        let status = match ex.request.header("patch-status") {
            None => 200,
            Some(text) => match text.trim().parse::<u16>() {
                Ok(status) if (200..=599).contains(&status) => status,
                _ => {
                    return Err(Reject::bad_request(
                        "Patch-Status takes a final status, 200 to 599",
                    ));
                }
            },
        };
        // `?body=` text, sent instead of a request body, is labelled as text.
        let text = !ex.has_body() && query.body.is_some();
        let envelope = Envelope::from_request(ex, query, text);
        let inline = if ex.has_body() {
            ex.take_buffered_body(take_small)
        } else {
            Some(query.body.clone().unwrap_or_default())
        };
        Ok(Outgoing {
            envelope,
            status,
            inline,
        })
    }
}

/// Writes the message `outgoing`, with `body` after the head, to `receiver`,
/// and tells the receiver's thread how it went.
pub fn deliver(
    stats: &Stats,
    body: Body,
    outgoing: &Outgoing,
    receiver: Receiver,
    common: &Common,
) -> Delivered {
    let length = match &body {
        Body::Inline(bytes) => Some(bytes.len() as u64),
        Body::Request(ex) => ex.body_length(),
    };
    let status = if receiver.takes_status {
        outgoing.status
    } else {
        200
    };
    // No body goes out to HEAD, or with a status that forbids one; the
    // sender's is read all the same, and dropped.
    let bodiless = receiver.head_only || matches!(status, 204 | 304);
    let payload = match length {
        _ if !bodiless => Payload::for_body(receiver.version, length),
        // The length a GET would get, announced.
        Some(n) if status != 204 => Payload::Length(n),
        _ => Payload::None,
    };
    let mut head = Head::new(status);
    outgoing
        .envelope
        .write_to(&mut head, receiver.mime.as_deref());
    if length.is_none() && !bodiless {
        head.header("X-Accel-Buffering", "no");
    }
    if receiver.relayed {
        head.header(SWITCHED, "1");
    }
    let reusable = receiver.keep_alive && payload != Payload::UntilClose;
    let head = head.finish(payload, reusable, common);
    // A message at hand cannot fail to arrive, so the receiver's thread is
    // told before the bytes go out: its client's next request, which may
    // follow them at once, then finds the word there and wakes the thread
    // once, not twice.
    let told = match &body {
        Body::Inline(bytes) if reusable => {
            let delivery = Delivery::Sent {
                status,
                sent: if bodiless { 0 } else { bytes.len() as u64 },
                reusable,
                at: Instant::now(),
            };
            receiver.done.post_quietly(delivery).is_ok()
        }
        _ => false,
    };
    let mut sink = &*receiver.stream;
    let result = if bodiless {
        match io::Write::write_all(&mut sink, &head) {
            Err(e) => Err(StreamError::Write(e)),
            // The body is read to its end all the same, and dropped.
            Ok(()) => match body {
                Body::Request(ex) => {
                    io::copy(ex, &mut io::sink())
                        .map(|_| 0)
                        .map_err(|error| StreamError::Read {
                            error,
                            sent: head.len() as u64,
                        })
                }
                Body::Inline(_) => Ok(0),
            },
        }
    } else {
        match body {
            Body::Inline(bytes) => stream_body(&head, &mut &bytes[..], &mut sink, payload),
            Body::Request(ex) => ex.stream_body_to(&head, &receiver.stream, payload),
        }
    };
    match result {
        Ok(sent) => {
            if !reusable {
                // End a close-delimited response now, not when the last
                // handle on the socket is dropped.
                let _ = receiver.stream.shutdown(Shutdown::Write);
            }
            let delivery = Delivery::Sent {
                status,
                sent,
                reusable,
                at: Instant::now(),
            };
            if told {
                stats.finished_elsewhere(&receiver.seed, Some(status), sent);
            } else if !reusable {
                let _ = receiver.done.post(delivery);
            } else if receiver.done.post_quietly(delivery).is_ok() {
                // The receiver's client sends its next request only after
                // reading this response: that will wake its thread, which
                // need not be woken now.
                stats.finished_elsewhere(&receiver.seed, Some(status), sent);
            }
            Delivered::Whole { sent }
        }
        Err(StreamError::Read { error, sent }) => {
            let back = if sent == 0 && !told {
                Some(receiver)
            } else {
                let _ = receiver.stream.shutdown(Shutdown::Both);
                if told {
                    stats.finished_elsewhere(&receiver.seed, None, 0);
                } else {
                    let _ = receiver.done.post(Delivery::Cut {
                        sent: sent.saturating_sub(head.len() as u64),
                    });
                }
                None
            };
            Delivered::SenderFailed { error, sent, back }
        }
        Err(StreamError::Write(error)) => {
            if told {
                // Told it went well: its next read ends its connection.
                let _ = receiver.stream.shutdown(Shutdown::Both);
                stats.finished_elsewhere(&receiver.seed, None, 0);
            } else {
                let _ = receiver.done.post(Delivery::Cut { sent: 0 });
            }
            log::debug!("receiver {} hung up mid-transfer: {error}", receiver.id);
            Delivered::ReceiverGone
        }
    }
}
