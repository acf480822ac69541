//! Queue channels (the default mode): POST/PUT sends, GET receives, each side
//! waits for the other, producers and consumers each first come, first
//! served, on the [`Handoff`].
//!
//! A consumer carries a clone of its socket: the producer that takes it (or
//! that it takes) streams its body straight into it, then tells the
//! consumer's thread how it went; the producer is answered only after the
//! consumer was sent the whole body. A waiter whose client left is never
//! paired: consumers are probed when taken, producers probe themselves
//! (after reading ahead the body bytes already received) and hand the
//! consumer back to the front of its line if they are gone.

use std::io;
use std::net::{Shutdown, TcpStream};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::error::Reject;
use crate::http::response::{StreamError, stream_body};
use crate::http::{Exchange, Head, Payload, Version, is_open};
use crate::mailbox::{Mailbox, Poster};
use crate::metrics::Stats;
use crate::mode::envelope::Envelope;
use crate::mode::handoff::{Arrival, Handoff, Park, Waiter};
use crate::mode::wait::{Waited, wait};
use crate::mode::{Family, deadline, short};
use crate::route::{Action, CHANNEL_METHODS, Channel, Mode, Query};

/// How much of a waiting producer's body is read ahead, so that a client that
/// sent a small body and hung up is seen to be gone.
const READ_AHEAD: usize = 16 * 1024;

/// Every queue channel.
pub struct Queues {
    handoff: Handoff<Producer, Consumer>,
    stats: Arc<Stats>,
    max_wait: Option<Duration>,
    /// How long a producer's body may stall before it is answered 408.
    idle_timeout: Duration,
}

/// A producer, as the line holds it: its thread waits for a [`Wake`].
struct Producer {
    id: u64,
    wake: Poster<Wake>,
}

/// What wakes a parked producer.
enum Wake {
    /// A consumer is ready: stream the body to it.
    Paired(Consumer),
    /// The channel was deleted or the server is stopping.
    Ended(Reject),
}

/// A consumer, as the producer that serves it sees it.
struct Consumer {
    id: u64,
    /// The consumer's socket; the producer writes the response to it.
    stream: Arc<TcpStream>,
    version: Version,
    keep_alive: bool,
    /// The consumer's `?mime=`, which overrides the message's Content-Type.
    mime: Option<String>,
    done: Poster<Delivery>,
}

/// What a consumer's thread is told, once.
enum Delivery {
    /// The whole response (of `sent` body bytes) was written; the connection
    /// may be kept if `reusable`.
    Sent { sent: u64, reusable: bool },
    /// The response started and was cut after `sent` body bytes: close the connection.
    Cut { sent: u64 },
    /// The consumer's own client was found gone: close without a word.
    Gone,
    /// The channel was deleted or the server is stopping.
    Ended(Reject),
}

impl Waiter for Producer {
    fn id(&self) -> u64 {
        self.id
    }

    /// A producer probes itself, with what it has read ahead (see [`is_producer_alive`]).
    fn is_alive(&self) -> bool {
        true
    }

    fn end(self, why: Option<&Reject>) {
        let reject = why.cloned().unwrap_or_else(Reject::deleted);
        let _ = self.wake.post(Wake::Ended(reject));
    }
}

impl Waiter for Consumer {
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

/// What a producer relays: its envelope and, for `?body=`, the text itself.
struct Outgoing {
    envelope: Envelope,
    /// `?body=` text, sent instead of a request body.
    inline: Option<Vec<u8>>,
}

impl Queues {
    /// Empty queues; waits are capped by `max_wait` (None: unbounded), and a
    /// stalled producer body is given up after `idle_timeout`.
    pub fn new(stats: Arc<Stats>, max_wait: Option<Duration>, idle_timeout: Duration) -> Queues {
        Queues {
            handoff: Handoff::new(Arc::clone(&stats), (Mode::Queue, Mode::Queue)),
            stats,
            max_wait,
            idle_timeout,
        }
    }

    /// Puts `consumer` before the first producer waiting on `key`, or in the
    /// consumers' line (`park`). Gives it back if it may not park and no
    /// producer is there.
    fn offer(&self, key: &str, consumer: Consumer, park: Park) -> Result<(), Consumer> {
        let mut consumer = consumer;
        loop {
            let done = consumer.done.clone();
            match self.handoff.arrive_b(key, consumer, park) {
                Ok(Arrival::Paired { mine, theirs }) => {
                    match theirs.wake.post(Wake::Paired(mine)) {
                        Ok(()) => return Ok(()),
                        // The producer's thread is gone (it panicked): the next one.
                        Err(Wake::Paired(me)) => consumer = me,
                        Err(Wake::Ended(_)) => unreachable!("posted Paired"),
                    }
                }
                Ok(Arrival::Parked) => return Ok(()),
                Ok(Arrival::Alone(me)) => return Err(me),
                Err(_) => {
                    // Shutting down: nothing may park any more.
                    let _ = done.post(Delivery::Ended(Reject::shutting_down()));
                    return Ok(());
                }
            }
        }
    }

    /// A consumer: takes the first live producer, or waits for one, then
    /// waits to be told how its response went.
    fn consume(&self, ex: &mut Exchange, key: &str, query: &Query) -> Result<(), Reject> {
        if ex.has_body() {
            return Err(Reject::bad_request(
                "a receive (GET) takes no body; send with POST or PUT",
            ));
        }
        let (mailbox, done) = Mailbox::new();
        let id = self.handoff.next_id();
        let consumer = Consumer {
            id,
            stream: ex.conn.shared_stream(),
            version: ex.request.version,
            keep_alive: ex.request.keep_alive,
            mime: query.mime.clone(),
            done,
        };
        let deadline = deadline(query.timeout, self.max_wait);
        let park = if deadline.is_none_or(|d| d > Instant::now()) {
            Park::Back
        } else {
            Park::Never
        };
        if self.offer(key, consumer, park).is_err() {
            return Err(Reject::timeout());
        }
        log::debug!("queue {key:?}: consumer {id} waiting");
        let stream = ex.conn.stream();
        let waited = wait(
            &mailbox,
            deadline,
            || is_open(stream),
            || self.handoff.unpark_b(key, id),
        );
        match waited {
            Waited::Got(Delivery::Sent { sent, reusable }) => {
                ex.mark_responded(200, sent, reusable)
            }
            Waited::Got(Delivery::Cut { sent }) => ex.mark_responded(200, sent, false),
            Waited::Got(Delivery::Ended(reject)) => return Err(reject),
            Waited::TimedOut => return Err(Reject::timeout()),
            // Found gone by a producer, which counted it.
            Waited::Got(Delivery::Gone) => ex.close(),
            Waited::HungUp => {
                log::debug!("queue {key:?}: consumer {id} hung up while waiting");
                self.stats.hung_up();
                ex.close();
            }
        }
        Ok(())
    }

    /// A producer: takes the first live consumer, or waits for one, then
    /// streams its body to it.
    fn produce(&self, ex: &mut Exchange, key: &str, query: &Query) -> Result<(), Reject> {
        let outgoing = Outgoing::new(ex, query);
        let (mailbox, wake) = Mailbox::new();
        let id = self.handoff.next_id();
        let deadline = deadline(query.timeout, self.max_wait);
        let park = if deadline.is_none_or(|d| d > Instant::now()) {
            Park::Back
        } else {
            Park::Never
        };
        let producer = Producer { id, wake };
        let consumer = match self.handoff.arrive_a(key, producer, park) {
            Err(_) => return Err(Reject::shutting_down()),
            Ok(Arrival::Alone(_)) => return Err(Reject::timeout()),
            Ok(Arrival::Paired { theirs, .. }) => theirs,
            Ok(Arrival::Parked) => {
                log::debug!("queue {key:?}: producer {id} waiting");
                let waited = wait(
                    &mailbox,
                    deadline,
                    || is_producer_alive(ex),
                    || self.handoff.unpark_a(key, id),
                );
                match waited {
                    Waited::Got(Wake::Paired(consumer)) if is_producer_alive(ex) => consumer,
                    Waited::Got(Wake::Paired(consumer)) => {
                        // Gone while the consumer came: the consumer was
                        // first in line and goes back there.
                        let _ = self.offer(key, consumer, Park::Front);
                        log::debug!("queue {key:?}: producer {id} hung up while waiting");
                        self.stats.hung_up();
                        ex.close();
                        return Ok(());
                    }
                    Waited::Got(Wake::Ended(reject)) => return Err(reject),
                    Waited::TimedOut => return Err(Reject::timeout()),
                    Waited::HungUp => {
                        log::debug!("queue {key:?}: producer {id} hung up while waiting");
                        self.stats.hung_up();
                        ex.close();
                        return Ok(());
                    }
                }
            }
        };
        self.transfer(ex, key, &outgoing, consumer)
    }

    /// Streams the producer's message to `consumer`, then answers both.
    fn transfer(
        &self,
        ex: &mut Exchange,
        key: &str,
        outgoing: &Outgoing,
        consumer: Consumer,
    ) -> Result<(), Reject> {
        let length = match &outgoing.inline {
            Some(bytes) => Some(bytes.len() as u64),
            None => ex.body_length(),
        };
        let payload = Payload::for_body(consumer.version, length);
        let mut head = Head::new(200);
        outgoing
            .envelope
            .write_to(&mut head, consumer.mime.as_deref());
        if length.is_none() {
            head.header("X-Accel-Buffering", "no");
        }
        let reusable = consumer.keep_alive && payload != Payload::UntilClose;
        let head = head.finish(payload, reusable, ex.common());
        let mut sink = &*consumer.stream;
        let result = match &outgoing.inline {
            Some(bytes) => stream_body(&head, &mut &bytes[..], &mut sink, payload),
            None => ex.stream_body_to(&head, &consumer.stream, payload),
        };
        match result {
            Ok(sent) => {
                if !reusable {
                    // End a close-delimited response now, not when the last
                    // handle on the socket is dropped.
                    let _ = consumer.stream.shutdown(Shutdown::Write);
                }
                let _ = consumer.done.post(Delivery::Sent { sent, reusable });
                self.stats.paired(sent);
                log::info!("queue {}: delivered {sent} bytes", short(key));
                if let Err(error) = ex.respond(Head::new(200), b"") {
                    log::debug!("queue {key:?}: producer hung up before its answer: {error}");
                    ex.close();
                }
                Ok(())
            }
            Err(StreamError::Read { error, sent }) => {
                log::debug!("queue {key:?}: producer failed mid-body after {sent} bytes: {error}");
                if sent == 0 {
                    // Nothing reached the consumer: it goes back first in line.
                    let _ = self.offer(key, consumer, Park::Front);
                } else {
                    let _ = consumer.stream.shutdown(Shutdown::Both);
                    let _ = consumer.done.post(Delivery::Cut {
                        sent: sent.saturating_sub(head.len() as u64),
                    });
                }
                match error.kind() {
                    io::ErrorKind::InvalidData => Err(Reject::bad_request(format!(
                        "malformed request body: {error}"
                    ))),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => {
                        ex.close();
                        Err(Reject::new(
                            408,
                            format!(
                                "the request body stalled: nothing arrived for {} s (--idle-timeout); not delivered",
                                self.idle_timeout.as_secs_f64()
                            ),
                        ))
                    }
                    _ => {
                        ex.close();
                        Ok(())
                    }
                }
            }
            Err(StreamError::Write(error)) => {
                let _ = consumer.done.post(Delivery::Cut { sent: 0 });
                log::debug!("queue {key:?}: consumer hung up mid-transfer: {error}");
                Err(Reject::new(
                    502,
                    "the consumer hung up before the whole body was sent; not delivered",
                ))
            }
        }
    }
}

impl Family for Queues {
    fn serves(&self, mode: Mode) -> bool {
        mode == Mode::Queue
    }

    fn serve(
        &self,
        ex: &mut Exchange,
        channel: &Channel,
        action: Action,
        query: &Query,
    ) -> Result<(), Reject> {
        match action {
            Action::Send => self.produce(ex, &channel.pair_key(), query),
            Action::Receive => self.consume(ex, &channel.pair_key(), query),
            _ => Err(Reject::method_not_allowed(CHANNEL_METHODS)),
        }
    }

    fn end_under(&self, prefix: &str, reject: &Reject) -> (usize, usize) {
        self.handoff.end_under(prefix, reject)
    }

    fn close(&self) -> usize {
        self.handoff.close()
    }
}

/// Whether a parked producer's client is still there. Reading ahead what
/// already arrived lets the peek used off Linux see a hang-up queued behind a
/// small body (DESIGN.md §3); on Linux the TCP state says it either way.
fn is_producer_alive(ex: &mut Exchange) -> bool {
    ex.read_ahead(READ_AHEAD).is_ok() && is_open(ex.conn.stream())
}

impl Outgoing {
    fn new(ex: &Exchange, query: &Query) -> Outgoing {
        let inline = if ex.has_body() {
            None
        } else {
            query.body.clone()
        };
        Outgoing {
            envelope: Envelope::from_request(ex, query, inline.is_some()),
            inline,
        }
    }
}
