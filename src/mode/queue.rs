//! Queue channels (the default mode): POST/PUT sends, GET receives, each side
//! waits for the other, producers and consumers each first come, first served.
//!
//! The handoff: whichever side arrives second takes the first live waiter of
//! the other side from the channel (under the registry lock, in microseconds).
//! The producer's thread then streams its body straight into the consumer's
//! socket (a clone of it travels in [`Consumer`]) and tells the consumer's
//! thread how it went; the producer is answered only after the consumer was
//! sent the whole body. A waiter whose client left is never paired: consumers
//! are probed before use, producers probe themselves (after reading ahead the
//! body bytes already received) and hand the consumer back if they are gone.

use std::collections::VecDeque;
use std::io;
use std::net::{Shutdown, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crossbeam_channel::{Sender, bounded};

use crate::error::Reject;
use crate::http::response::{StreamError, stream_body};
use crate::http::{Exchange, Head, Payload, Version, is_open};
use crate::mode::envelope::Envelope;
use crate::mode::wait::{Waited, wait};
use crate::mode::{Family, deadline, short};
use crate::registry::{ChannelState, Registry};
use crate::route::Query;

/// How much of a waiting producer's body is read ahead, so that a client that
/// sent a small body and hung up is seen to be gone.
const READ_AHEAD: usize = 16 * 1024;

/// Every queue channel.
pub struct Queues {
    registry: Registry<Queue>,
    next_id: AtomicU64,
    max_wait: Option<Duration>,
}

/// One channel's waiters, oldest first.
#[derive(Default)]
struct Queue {
    producers: VecDeque<Producer>,
    consumers: VecDeque<Consumer>,
}

impl ChannelState for Queue {
    fn is_idle(&self) -> bool {
        self.producers.is_empty() && self.consumers.is_empty()
    }
}

/// A parked producer: its thread waits for a [`Wake`].
struct Producer {
    id: u64,
    wake: Sender<Wake>,
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
    done: Sender<Delivery>,
}

/// What a producer tells the consumer's thread, once.
enum Delivery {
    /// The whole response was written; the connection may be kept if `reusable`.
    Sent { reusable: bool },
    /// The response started and was cut: close the connection.
    Cut,
    /// The producer was gone before sending a byte: wait for another.
    Retry(Consumer),
    /// The consumer's own client was found gone: close without a word.
    Gone,
    /// The channel was deleted or the server is stopping.
    Ended(Reject),
}

/// What the producer relays: its envelope and, for `?body=`, the text itself.
struct Message {
    envelope: Envelope,
    /// `?body=` text, sent instead of a request body.
    inline: Option<Vec<u8>>,
}

impl Queues {
    /// Empty queues; waits are capped by `max_wait` (None: unbounded).
    pub fn new(max_wait: Option<Duration>) -> Queues {
        Queues {
            registry: Registry::default(),
            next_id: AtomicU64::new(1),
            max_wait,
        }
    }

    fn next_id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }

    /// A consumer: takes the first live producer, or waits for one.
    fn consume(&self, ex: &mut Exchange, key: &str, query: &Query) -> Result<(), Reject> {
        if ex.has_body() {
            return Err(Reject::bad_request(
                "a receive (GET) takes no body; send with POST or PUT",
            ));
        }
        let stream = ex.conn.shared_stream();
        let (done_tx, done_rx) = bounded(1);
        let id = self.next_id();
        let mut consumer = Consumer {
            id,
            stream,
            version: ex.request.version,
            keep_alive: ex.request.keep_alive,
            mime: query.mime.clone(),
            done: done_tx,
        };
        let deadline = deadline(query.timeout, self.max_wait);
        let may_park = deadline.is_none_or(|d| d > Instant::now());
        // A consumer handed back by a producer that vanished was first in
        // line, and goes back to the front.
        let mut handed_back = false;
        loop {
            let mut waiting = Some(consumer);
            let producer = self
                .registry
                .with(key, |queue| {
                    let producer = queue.producers.pop_front();
                    if producer.is_none() && may_park {
                        if let Some(me) = waiting.take() {
                            if handed_back {
                                queue.consumers.push_front(me);
                            } else {
                                queue.consumers.push_back(me);
                            }
                        }
                    }
                    producer
                })
                .map_err(|_| Reject::shutting_down())?;
            let delivery = match (producer, waiting) {
                (Some(producer), Some(me)) => match producer.wake.send(Wake::Paired(me)) {
                    Ok(()) => match done_rx.recv() {
                        Ok(delivery) => delivery,
                        Err(_) => Delivery::Cut,
                    },
                    // The producer's thread is gone (it panicked): try the next one.
                    Err(returned) => match returned.into_inner() {
                        Wake::Paired(me) => {
                            consumer = me;
                            continue;
                        }
                        Wake::Ended(reject) => return Err(reject),
                    },
                },
                (None, Some(_)) => return Err(Reject::timeout()),
                (_, None) => {
                    log::debug!("queue {key:?}: consumer {id} parked");
                    let stream = ex.conn.stream();
                    let waited = wait(
                        &done_rx,
                        deadline,
                        || is_open(stream),
                        || self.unpark(key, |queue| remove(&mut queue.consumers, |c| c.id == id)),
                    );
                    match waited {
                        Waited::Got(delivery) => delivery,
                        Waited::TimedOut => return Err(Reject::timeout()),
                        Waited::HungUp => Delivery::Gone,
                    }
                }
            };
            match delivery {
                Delivery::Sent { reusable } => ex.mark_responded(reusable),
                Delivery::Cut => ex.mark_responded(false),
                Delivery::Gone => {
                    log::debug!("queue {key:?}: consumer {id} hung up while waiting");
                    ex.close();
                }
                Delivery::Ended(reject) => return Err(reject),
                Delivery::Retry(me) => {
                    consumer = me;
                    handed_back = true;
                    continue;
                }
            }
            return Ok(());
        }
    }

    /// A producer: takes the first live consumer, or waits for one, then
    /// streams its body to it.
    fn produce(&self, ex: &mut Exchange, key: &str, query: &Query) -> Result<(), Reject> {
        let message = Message::new(ex, query);
        let (wake_tx, wake_rx) = bounded(1);
        let id = self.next_id();
        let deadline = deadline(query.timeout, self.max_wait);
        let may_park = deadline.is_none_or(|d| d > Instant::now());
        loop {
            let me = Producer {
                id,
                wake: wake_tx.clone(),
            };
            let (consumer, parked) = self
                .registry
                .with(key, |queue| match queue.consumers.pop_front() {
                    Some(consumer) => (Some(consumer), false),
                    None if may_park => {
                        queue.producers.push_back(me);
                        (None, true)
                    }
                    None => (None, false),
                })
                .map_err(|_| Reject::shutting_down())?;
            let consumer = match consumer {
                Some(consumer) if is_open(&consumer.stream) => consumer,
                Some(consumer) => {
                    log::debug!(
                        "queue {key:?}: consumer {} had hung up; skipped",
                        consumer.id
                    );
                    let _ = consumer.done.send(Delivery::Gone);
                    continue;
                }
                None if !parked => return Err(Reject::timeout()),
                None => {
                    log::debug!("queue {key:?}: producer {id} parked");
                    let waited = wait(
                        &wake_rx,
                        deadline,
                        || is_producer_alive(ex),
                        || self.unpark(key, |queue| remove(&mut queue.producers, |p| p.id == id)),
                    );
                    match waited {
                        Waited::Got(Wake::Paired(consumer)) => {
                            if !is_producer_alive(ex) {
                                log::debug!("queue {key:?}: producer {id} hung up while waiting");
                                let done = consumer.done.clone();
                                let _ = done.send(Delivery::Retry(consumer));
                                ex.close();
                                return Ok(());
                            }
                            consumer
                        }
                        Waited::Got(Wake::Ended(reject)) => return Err(reject),
                        Waited::TimedOut => return Err(Reject::timeout()),
                        Waited::HungUp => {
                            log::debug!("queue {key:?}: producer {id} hung up while waiting");
                            ex.close();
                            return Ok(());
                        }
                    }
                }
            };
            return transfer(ex, key, &message, consumer);
        }
    }

    /// Takes a waiter out of channel `key` if it is still parked there.
    fn unpark(&self, key: &str, take: impl FnOnce(&mut Queue) -> bool) -> bool {
        self.registry.with_existing(key, take).unwrap_or(false)
    }
}

impl Family for Queues {
    fn send(&self, ex: &mut Exchange, key: &str, query: &Query) -> Result<(), Reject> {
        self.produce(ex, key, query)
    }

    fn receive(&self, ex: &mut Exchange, key: &str, query: &Query) -> Result<(), Reject> {
        self.consume(ex, key, query)
    }

    fn end_under(&self, prefix: &str, reject: &Reject) -> (usize, usize) {
        end(self.registry.remove_under(prefix), reject)
    }

    fn close(&self) -> usize {
        end(self.registry.close(), &Reject::shutting_down()).1
    }
}

/// Whether a parked producer's client is still there. Reading ahead what
/// already arrived lets the peek used off Linux see a hang-up queued behind a
/// small body (DESIGN.md §3); on Linux the TCP state says it either way.
fn is_producer_alive(ex: &mut Exchange) -> bool {
    ex.read_ahead(READ_AHEAD).is_ok() && is_open(ex.conn.stream())
}

fn remove<T>(waiters: &mut VecDeque<T>, is_it: impl Fn(&T) -> bool) -> bool {
    match waiters.iter().position(is_it) {
        Some(i) => waiters.remove(i).is_some(),
        None => false,
    }
}

/// Answers every waiter of `queues` with `reject`.
fn end(queues: Vec<Queue>, reject: &Reject) -> (usize, usize) {
    let channels = queues.len();
    let mut waiters = 0;
    for queue in queues {
        for producer in queue.producers {
            waiters += usize::from(producer.wake.send(Wake::Ended(reject.clone())).is_ok());
        }
        for consumer in queue.consumers {
            waiters += usize::from(consumer.done.send(Delivery::Ended(reject.clone())).is_ok());
        }
    }
    (channels, waiters)
}

impl Message {
    fn new(ex: &Exchange, query: &Query) -> Message {
        let inline = if ex.has_body() {
            None
        } else {
            query.body.clone()
        };
        Message {
            envelope: Envelope::from_request(ex, query, inline.is_some()),
            inline,
        }
    }
}

/// Streams the producer's message to `consumer`, then answers both.
fn transfer(
    ex: &mut Exchange,
    key: &str,
    message: &Message,
    consumer: Consumer,
) -> Result<(), Reject> {
    let length = match &message.inline {
        Some(bytes) => Some(bytes.len() as u64),
        None => ex.body_length(),
    };
    let payload = Payload::for_body(consumer.version, length);
    let mut head = Head::new(200);
    message
        .envelope
        .write_to(&mut head, consumer.mime.as_deref());
    if length.is_none() {
        head.header("X-Accel-Buffering", "no");
    }
    let reusable = consumer.keep_alive && payload != Payload::UntilClose;
    let head = head.finish(payload, reusable);
    let mut sink = &*consumer.stream;
    let result = match &message.inline {
        Some(bytes) => stream_body(&head, &mut &bytes[..], &mut sink, payload),
        None => ex.stream_body_to(&head, &consumer.stream, payload),
    };
    let done = consumer.done.clone();
    match result {
        Ok(bytes) => {
            if !reusable {
                // End a close-delimited response now, not when the last
                // handle on the socket is dropped.
                let _ = consumer.stream.shutdown(Shutdown::Write);
            }
            let _ = done.send(Delivery::Sent { reusable });
            log::info!("queue {}: delivered {bytes} bytes", short(key));
            if let Err(error) = ex.respond(Head::new(200), b"") {
                log::debug!("queue {key:?}: producer hung up before its answer: {error}");
                ex.close();
            }
            Ok(())
        }
        Err(StreamError::Read { error, sent }) => {
            if sent == 0 {
                // Nothing reached the consumer: it goes back to waiting.
                let _ = done.send(Delivery::Retry(consumer));
            } else {
                let _ = consumer.stream.shutdown(Shutdown::Both);
                let _ = done.send(Delivery::Cut);
            }
            log::debug!("queue {key:?}: producer failed mid-body after {sent} bytes: {error}");
            if error.kind() == io::ErrorKind::InvalidData {
                return Err(Reject::bad_request(format!(
                    "malformed request body: {error}"
                )));
            }
            ex.close();
            Ok(())
        }
        Err(StreamError::Write(error)) => {
            let _ = done.send(Delivery::Cut);
            log::debug!("queue {key:?}: consumer hung up mid-transfer: {error}");
            Err(Reject::new(
                502,
                "the consumer hung up before the whole body was sent; not delivered",
            ))
        }
    }
}
