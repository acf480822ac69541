//! Queue channels (the default mode): POST/PUT sends, GET receives, each side
//! waits for the other, producers and consumers each first come, first
//! served, on the [`Handoff`].
//!
//! A consumer carries a clone of its socket: the producer that takes it (or
//! that it takes) streams its body straight into it, then tells the
//! consumer's thread how it went; the producer is answered only after the
//! consumer was sent the whole body. A producer whose whole message is at
//! hand (`?body=`, or a small body that arrived with its head) carries it
//! and a clone of its own socket instead: the consumer that takes it writes
//! both answers itself. Either way, when it went well and a connection stays
//! open, its thread is told quietly and sleeps on until its client's next
//! request: one sleep per request.
//!
//! A waiter whose client left is never paired: consumers, and producers
//! with their message at hand, are probed when taken; other producers probe
//! themselves (after reading ahead the body bytes already received) and hand
//! the consumer back to the front of its line if they are gone.

use std::io;
use std::net::{Shutdown, TcpStream};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::error::Reject;
use crate::http::response::{StreamError, stream_body};
use crate::http::{Common, Exchange, Head, Payload, Version, is_open};
use crate::mailbox::{Mailbox, Poster};
use crate::metrics::{Kind, Seed, Stats};
use crate::mode::envelope::Envelope;
use crate::mode::handoff::{Arrival, Handoff, Park, Waiter};
use crate::mode::wait::{READ_AHEAD, Sleep, Waited, wait};
use crate::mode::{Family, deadline, short};
use crate::route::{Action, CHANNEL_METHODS, Channel, Mode, Query};

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
    /// Its whole message, when it is at hand: whoever takes the producer
    /// delivers it and answers the producer.
    ready: Option<Ready>,
}

/// A producer's message at hand, and what answering the producer needs.
struct Ready {
    outgoing: Arc<Outgoing>,
    /// The producer's socket, for its answer.
    stream: Arc<TcpStream>,
    /// Whether the producer's connection stays open after its answer.
    keep_alive: bool,
    /// For observing the producer's request where it is answered.
    seed: Seed,
}

/// What wakes a parked producer.
enum Wake {
    /// A consumer is ready: stream the body to it.
    Paired(Consumer),
    /// Another thread delivered the message (or found it could not) and
    /// wrote the producer's answer, of `status`, which ended at `at`; the
    /// connection may be kept if `reusable`.
    Answered {
        status: u16,
        reusable: bool,
        at: Instant,
    },
    /// The producer's client was found gone: close without a word.
    Gone,
    /// The channel was deleted or the server is stopping.
    Ended(Reject),
}

/// A consumer, as the thread that serves it sees it.
struct Consumer {
    id: u64,
    /// The consumer's socket; the response is written to it.
    stream: Arc<TcpStream>,
    version: Version,
    keep_alive: bool,
    /// The consumer's `?mime=`, which overrides the message's Content-Type.
    mime: Option<String>,
    done: Poster<Delivery>,
    /// For observing the consumer's request where it is answered.
    seed: Seed,
}

/// What a consumer's thread is told, once.
enum Delivery {
    /// The whole response (of `sent` body bytes) was written, ending `at`;
    /// the connection may be kept if `reusable`.
    Sent {
        sent: u64,
        reusable: bool,
        at: Instant,
    },
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

    /// A producer with its message at hand is probed; the others probe
    /// themselves, with what they have read ahead (see [`is_producer_alive`]).
    fn is_alive(&self) -> bool {
        self.ready
            .as_ref()
            .is_none_or(|ready| is_open(&ready.stream))
    }

    fn end(self, why: Option<&Reject>) {
        let wake = why.map_or(Wake::Gone, |r| Wake::Ended(r.clone()));
        let _ = self.wake.post(wake);
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

/// What a producer relays: its envelope and, when the whole message is at
/// hand, the message itself.
struct Outgoing {
    envelope: Envelope,
    /// `?body=` text, or a small body taken whole before pairing.
    inline: Option<Vec<u8>>,
}

/// Where a delivered body comes from.
enum Body<'a, 'c> {
    /// At hand.
    Inline(&'a [u8]),
    /// Still in the producer's request, streamed as it is read.
    Request(&'a mut Exchange<'c>),
}

/// How a delivery went, as the producer learns it.
enum Delivered {
    /// The consumer was sent the whole body.
    Whole,
    /// The producer's body failed to arrive (`error`), after `sent` bytes
    /// of the response reached the consumer.
    ProducerFailed { error: io::Error, sent: u64 },
    /// The consumer could not be written to: not delivered.
    ConsumerGone,
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

    /// Offers `consumer` to the first live producer waiting on `key`, or
    /// parks it in the consumers' line (`park`). A producer with its message
    /// at hand is served here and now; another is woken to serve it. Gives
    /// the consumer back if it may not park and no producer is there.
    fn offer(
        &self,
        key: &str,
        consumer: Consumer,
        park: Park,
        common: &Common,
    ) -> Result<(), Consumer> {
        let mut consumer = consumer;
        loop {
            let done = consumer.done.clone();
            match self.handoff.arrive_b(key, consumer, park) {
                Ok(Arrival::Paired { mine, mut theirs }) => match theirs.ready.take() {
                    Some(ready) => {
                        self.deliver_ready(key, theirs, ready, mine, common);
                        return Ok(());
                    }
                    None => match theirs.wake.post(Wake::Paired(mine)) {
                        Ok(()) => return Ok(()),
                        // The producer's thread is gone (it panicked): the next one.
                        Err(Wake::Paired(me)) => consumer = me,
                        Err(_) => unreachable!("posted Paired"),
                    },
                },
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
            seed: seed(ex, key),
        };
        let deadline = deadline(query.timeout, self.max_wait);
        let park = if deadline.is_none_or(|d| d > Instant::now()) {
            Park::Back
        } else {
            Park::Never
        };
        if self.offer(key, consumer, park, ex.common()).is_err() {
            return Err(Reject::timeout());
        }
        // Every loud word to a consumer ends its connection: it may watch.
        let waited = wait(&mailbox, ex, deadline, Sleep::Watching, || {
            self.handoff.unpark_b(key, id)
        });
        match waited {
            Waited::Got(Delivery::Sent { sent, reusable, at }) => {
                ex.mark_responded(200, sent, reusable);
                ex.mark_finished(at);
                if reusable {
                    // Posted quietly: the deliverer counted this request done.
                    ex.mark_released();
                }
            }
            Waited::Got(Delivery::Cut { sent }) => ex.mark_responded(200, sent, false),
            Waited::Got(Delivery::Ended(reject)) => {
                // Its socket may have been shut for reading to wake it.
                ex.close();
                return Err(reject);
            }
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

    /// A producer: takes the first live consumer, or waits for one (or for
    /// a consumer that serves itself), then streams its body to it.
    fn produce(&self, ex: &mut Exchange, key: &str, query: &Query) -> Result<(), Reject> {
        let outgoing = Arc::new(Outgoing::new(ex, query));
        let (mailbox, wake) = Mailbox::new();
        let id = self.handoff.next_id();
        let deadline = deadline(query.timeout, self.max_wait);
        let park = if deadline.is_none_or(|d| d > Instant::now()) {
            Park::Back
        } else {
            Park::Never
        };
        let ready = outgoing.inline.is_some().then(|| Ready {
            outgoing: Arc::clone(&outgoing),
            stream: ex.conn.shared_stream(),
            keep_alive: ex.request.keep_alive,
            seed: seed(ex, key),
        });
        // A producer with its message at hand is only ever woken to end its
        // connection: it may watch; another is woken to stream its body.
        let sleep = if ready.is_some() {
            Sleep::Watching
        } else {
            Sleep::Blind
        };
        let producer = Producer { id, wake, ready };
        let consumer = match self.handoff.arrive_a(key, producer, park) {
            Err(_) => return Err(Reject::shutting_down()),
            Ok(Arrival::Alone(_)) => return Err(Reject::timeout()),
            Ok(Arrival::Paired { theirs, .. }) => theirs,
            Ok(Arrival::Parked) => {
                match wait(&mailbox, ex, deadline, sleep, || {
                    self.handoff.unpark_a(key, id)
                }) {
                    Waited::Got(Wake::Paired(consumer)) if is_producer_alive(ex) => consumer,
                    Waited::Got(Wake::Paired(consumer)) => {
                        // Gone while the consumer came: the consumer was
                        // first in line and goes back there.
                        let _ = self.offer(key, consumer, Park::Front, ex.common());
                        log::debug!("queue {key:?}: producer {id} hung up while waiting");
                        self.stats.hung_up();
                        ex.close();
                        return Ok(());
                    }
                    Waited::Got(Wake::Answered {
                        status,
                        reusable,
                        at,
                    }) => {
                        ex.mark_responded(status, 0, reusable);
                        ex.mark_finished(at);
                        if reusable {
                            ex.mark_released();
                        }
                        return Ok(());
                    }
                    Waited::Got(Wake::Ended(reject)) => {
                        ex.close();
                        return Err(reject);
                    }
                    Waited::TimedOut => return Err(Reject::timeout()),
                    // Found gone by a consumer, which counted it.
                    Waited::Got(Wake::Gone) => {
                        ex.close();
                        return Ok(());
                    }
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

    /// The producer's thread delivers its message to `consumer`, then
    /// answers its own client. A message taken whole from the producer's
    /// request is relayed only if the producer is still there (a streamed
    /// body is checked as its last bytes are read).
    fn transfer(
        &self,
        ex: &mut Exchange,
        key: &str,
        outgoing: &Outgoing,
        consumer: Consumer,
    ) -> Result<(), Reject> {
        let common = ex.common();
        if outgoing.inline.is_some() && !is_open(ex.conn.stream()) {
            log::debug!("queue {key:?}: producer hung up before its message was relayed");
            self.stats.hung_up();
            let _ = self.offer(key, consumer, Park::Front, common);
            ex.close();
            return Ok(());
        }
        let body = match &outgoing.inline {
            Some(bytes) => Body::Inline(bytes),
            None => Body::Request(ex),
        };
        match self.deliver(key, body, outgoing, consumer, common) {
            Delivered::Whole => {
                if let Err(error) = ex.respond(Head::new(200), b"") {
                    log::debug!("queue {key:?}: producer hung up before its answer: {error}");
                    ex.close();
                }
                Ok(())
            }
            Delivered::ProducerFailed { error, sent } => {
                log::debug!("queue {key:?}: producer failed mid-body after {sent} bytes: {error}");
                match error.kind() {
                    io::ErrorKind::InvalidData => Err(Reject::bad_request(format!(
                        "malformed request body: {error}"
                    ))),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => {
                        ex.close();
                        Err(stalled(self.idle_timeout))
                    }
                    _ => {
                        ex.close();
                        Ok(())
                    }
                }
            }
            Delivered::ConsumerGone => Err(consumer_gone()),
        }
    }

    /// Any thread delivers the message a producer had at hand to `consumer`
    /// and writes the producer's answer; the producer's thread is told.
    fn deliver_ready(
        &self,
        key: &str,
        producer: Producer,
        ready: Ready,
        consumer: Consumer,
        common: &Common,
    ) {
        let inline = ready.outgoing.inline.as_deref().unwrap_or_default();
        let (head, body) =
            match self.deliver(key, Body::Inline(inline), &ready.outgoing, consumer, common) {
                Delivered::Whole => (Head::new(200), Vec::new()),
                Delivered::ConsumerGone | Delivered::ProducerFailed { .. } => {
                    let reject = consumer_gone();
                    let mut head = Head::new(reject.status);
                    head.header("Content-Type", "text/plain; charset=utf-8");
                    (head, format!("{}\n", reject.reason).into_bytes())
                }
            };
        let status = head.status();
        let mut answer = head.finish(Payload::Length(body.len() as u64), ready.keep_alive, common);
        answer.extend_from_slice(&body);
        let wake = Wake::Answered {
            status,
            reusable: ready.keep_alive,
            at: Instant::now(),
        };
        // As for a consumer (see `deliver`): the producer's thread is told
        // before its answer goes out, and sleeps on until its client's next
        // request.
        let told = ready.keep_alive && producer.wake.post_quietly(wake).is_ok();
        let written = io::Write::write_all(&mut &*ready.stream, &answer);
        if let Err(error) = &written {
            log::debug!("queue {key:?}: producer hung up before its answer: {error}");
        }
        match (told, written) {
            (true, Ok(())) => self.stats.finished_elsewhere(&ready.seed, Some(status), 0),
            (true, Err(_)) => {
                // Told it went well: its next read ends its connection.
                let _ = ready.stream.shutdown(Shutdown::Both);
                self.stats.finished_elsewhere(&ready.seed, None, 0);
            }
            (false, written) => {
                // The connection ends with this answer.
                let how = if written.is_ok() {
                    Shutdown::Write
                } else {
                    Shutdown::Both
                };
                let _ = ready.stream.shutdown(how);
                let _ = producer.wake.post(Wake::Answered {
                    status,
                    reusable: false,
                    at: Instant::now(),
                });
            }
        }
    }

    /// Writes the message to `consumer`, with `body` after the head, and
    /// tells the consumer's thread how it went.
    fn deliver(
        &self,
        key: &str,
        body: Body,
        outgoing: &Outgoing,
        consumer: Consumer,
        common: &Common,
    ) -> Delivered {
        let length = match &body {
            Body::Inline(bytes) => Some(bytes.len() as u64),
            Body::Request(ex) => ex.body_length(),
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
        let head = head.finish(payload, reusable, common);
        // A message at hand cannot fail to arrive, so the consumer's thread
        // is told before the bytes go out: its client's next request, which
        // may follow them at once, then finds the word there and wakes the
        // thread once, not twice.
        let told = match &body {
            Body::Inline(bytes) if reusable => {
                let delivery = Delivery::Sent {
                    sent: bytes.len() as u64,
                    reusable,
                    at: Instant::now(),
                };
                consumer.done.post_quietly(delivery).is_ok()
            }
            _ => false,
        };
        let result = match body {
            Body::Inline(bytes) => {
                stream_body(&head, &mut &bytes[..], &mut &*consumer.stream, payload)
            }
            Body::Request(ex) => ex.stream_body_to(&head, &consumer.stream, payload),
        };
        match result {
            Ok(sent) => {
                if !reusable {
                    // End a close-delimited response now, not when the last
                    // handle on the socket is dropped.
                    let _ = consumer.stream.shutdown(Shutdown::Write);
                }
                let delivery = Delivery::Sent {
                    sent,
                    reusable,
                    at: Instant::now(),
                };
                if told {
                    self.stats
                        .finished_elsewhere(&consumer.seed, Some(200), sent);
                } else if !reusable {
                    let _ = consumer.done.post(delivery);
                } else if consumer.done.post_quietly(delivery).is_ok() {
                    // The consumer's client sends its next request only
                    // after reading this response: that will wake its
                    // thread, which need not be woken now.
                    self.stats
                        .finished_elsewhere(&consumer.seed, Some(200), sent);
                }
                self.stats.paired(sent);
                log::info!("queue {}: delivered {sent} bytes", short(key));
                Delivered::Whole
            }
            Err(StreamError::Read { error, sent }) => {
                if sent == 0 {
                    // Nothing reached the consumer: it goes back first in line.
                    let _ = self.offer(key, consumer, Park::Front, common);
                } else {
                    let _ = consumer.stream.shutdown(Shutdown::Both);
                    let _ = consumer.done.post(Delivery::Cut {
                        sent: sent.saturating_sub(head.len() as u64),
                    });
                }
                Delivered::ProducerFailed { error, sent }
            }
            Err(StreamError::Write(error)) => {
                if told {
                    // Told it went well: its next read ends its connection.
                    let _ = consumer.stream.shutdown(Shutdown::Both);
                    self.stats.finished_elsewhere(&consumer.seed, None, 0);
                } else {
                    let _ = consumer.done.post(Delivery::Cut { sent: 0 });
                }
                log::debug!("queue {key:?}: consumer hung up mid-transfer: {error}");
                Delivered::ConsumerGone
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

/// What observing the request of `ex` on channel `key` needs, for the
/// thread that may answer it.
fn seed(ex: &Exchange, key: &str) -> Seed {
    Seed {
        kind: Kind::Channel(Mode::Queue),
        method: ex.request.method.name(),
        path: key.to_owned(),
        started: ex.started(),
    }
}

/// 502: the consumer could not be written to.
fn consumer_gone() -> Reject {
    Reject::new(
        502,
        "the consumer hung up before the whole body was sent; not delivered",
    )
}

/// 408: the producer's body stopped arriving.
fn stalled(idle_timeout: Duration) -> Reject {
    Reject::new(
        408,
        format!(
            "the request body stalled: nothing arrived for {} s (--idle-timeout); not delivered",
            idle_timeout.as_secs_f64()
        ),
    )
}

impl Outgoing {
    /// What the producer of `ex` relays. A small body that is already here
    /// whole (it came with the head) is taken now, so that the message is at
    /// hand for whichever thread delivers it (which probes the producer
    /// first: see [`Producer::is_alive`] and [`Queues::transfer`]).
    fn new(ex: &mut Exchange, query: &Query) -> Outgoing {
        // `?body=` text, sent instead of a request body, is labelled as text.
        let text = !ex.has_body() && query.body.is_some();
        let envelope = Envelope::from_request(ex, query, text);
        let inline = if ex.has_body() {
            ex.take_buffered_body(READ_AHEAD)
        } else {
            Some(query.body.clone().unwrap_or_default())
        };
        Outgoing { envelope, inline }
    }
}
