//! Queue channels (the default mode): POST/PUT sends, GET receives, each side
//! waits for the other, producers and consumers each first come, first
//! served, on the [`Handoff`].
//!
//! A consumer waits as a [`Receiver`]: the producer that takes it (or that
//! it takes) streams its body straight into its socket, then tells its
//! thread how it went; the producer is answered only after the consumer was
//! sent the whole body. A producer whose whole message is at hand
//! (`?body=`, or a small body that arrived with its head) waits as a
//! receiver too, of its own answer: the consumer that takes it writes both
//! responses itself. Either way, when it went well and a connection stays
//! open, its thread is told quietly and sleeps on until its client's next
//! request: one sleep per request (see `delivery.rs`).
//!
//! A waiter whose client left is never paired: consumers, and producers
//! with their message at hand, are probed when taken; other producers probe
//! themselves (after reading ahead the body bytes already received) and hand
//! the consumer back to the front of its line if they are gone.

use std::io;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::error::Reject;
use crate::http::{Common, Exchange, Head, body, is_open};
use crate::mailbox::{Mailbox, Poster};
use crate::metrics::{Kind, Stats};
use crate::mode::delivery::{Body, Delivered, Delivery, Outgoing, Receiver, deliver};
use crate::mode::envelope::Envelope;
use crate::mode::handoff::{Arrival, Handoff, Park, Waiter, Wake};
use crate::mode::wait::{READ_AHEAD, Sleep, Waited, wait};
use crate::mode::{ChannelView, Family, deadline, short, took};
use crate::route::{Action, CHANNEL_METHODS, Channel, Mode, Query, Routed};

/// Every queue channel.
pub struct Queues {
    handoff: Handoff<Producer, Receiver>,
    stats: Arc<Stats>,
    max_wait: Option<Duration>,
    /// How long a producer's body may stall before it is answered 408.
    idle_timeout: Duration,
}

/// A producer, as the line holds it.
enum Producer {
    /// Its whole message is at hand: whoever takes it delivers the message
    /// and then the producer's own answer, to it as a receiver.
    Ready {
        outgoing: Arc<Outgoing>,
        receiver: Receiver,
    },
    /// Its body is still in its request: its thread is woken to stream it.
    Streaming {
        id: u64,
        wake: Poster<Wake<Receiver>>,
    },
}

impl Waiter for Producer {
    fn id(&self) -> u64 {
        match self {
            Producer::Ready { receiver, .. } => receiver.id,
            Producer::Streaming { id, .. } => *id,
        }
    }

    /// A producer with its message at hand is probed; the others probe
    /// themselves, with what they have read ahead (see [`is_producer_alive`]).
    fn is_alive(&self) -> bool {
        match self {
            Producer::Ready { receiver, .. } => receiver.is_alive(),
            Producer::Streaming { .. } => true,
        }
    }

    fn end(self, why: Option<&Reject>) {
        match self {
            Producer::Ready { receiver, .. } => receiver.end(why),
            Producer::Streaming { wake, .. } => {
                let _ = wake.post(Wake::unpaired(why));
            }
        }
    }
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

    /// A new waiter identity.
    pub fn next_id(&self) -> u64 {
        self.handoff.next_id()
    }

    /// Takes waiting receiver `id` out of channel `key`'s line; false if it
    /// was already taken.
    pub fn unpark_receiver(&self, key: &str, id: u64) -> bool {
        self.handoff.unpark_b(key, id)
    }

    /// Offers `receiver` to the first live producer waiting on `key`, or
    /// parks it in the consumers' line (`park`). A producer with its message
    /// at hand is served here and now; another is woken to serve it. Gives
    /// the receiver back if it may not park and no producer is there.
    pub fn offer(
        &self,
        key: &str,
        receiver: Receiver,
        park: Park,
        common: &Common,
    ) -> Result<(), Receiver> {
        let mut receiver = receiver;
        loop {
            let done = receiver.done.clone();
            match self.handoff.arrive_b(key, receiver, park) {
                Ok(Arrival::Paired { mine, theirs }) => match theirs {
                    Producer::Ready {
                        outgoing,
                        receiver: producer,
                    } => {
                        self.deliver_ready(key, &outgoing, producer, mine, common);
                        return Ok(());
                    }
                    Producer::Streaming { wake, .. } => match wake.post(Wake::Paired(mine)) {
                        Ok(()) => return Ok(()),
                        // The producer's thread is gone (it panicked): the next one.
                        Err(Wake::Paired(me)) => receiver = me,
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
    /// waits to be told how its response went. A `relayed` consumer is
    /// another relay taking a switched answer for its requester.
    fn consume(
        &self,
        ex: &mut Exchange,
        key: &str,
        query: &Query,
        relayed: bool,
    ) -> Result<(), Reject> {
        if ex.has_body() {
            return Err(Reject::bad_request(
                "a receive (GET) takes no body; send with POST or PUT",
            ));
        }
        let (mailbox, done) = Mailbox::new();
        let id = self.handoff.next_id();
        let kind = Kind::Channel(Mode::Queue);
        let receiver = Receiver::new(ex, id, kind, key, query, false, done);
        let receiver = if relayed {
            receiver.relayed()
        } else {
            receiver
        };
        let deadline = deadline(query.timeout, self.max_wait);
        if self
            .offer(key, receiver, park_until(deadline), ex.common())
            .is_err()
        {
            return Err(Reject::timeout());
        }
        // Every loud word to a consumer ends its connection: it may watch.
        match wait(&mailbox, ex, deadline, Sleep::Watching, || {
            self.handoff.unpark_b(key, id)
        }) {
            Waited::Got(delivery) => delivery.apply(ex),
            Waited::TimedOut => Err(Reject::timeout()),
            Waited::HungUp => {
                log::debug!("queue {}: consumer {id} hung up while waiting", short(key));
                self.stats.hung_up();
                ex.close();
                Ok(())
            }
        }
    }

    /// A producer: takes the first live consumer, or waits for one (or for
    /// a consumer that serves itself), then streams its body to it.
    fn produce(&self, ex: &mut Exchange, key: &str, query: &Query) -> Result<(), Reject> {
        self.send(ex, key, query, Park::Back, Reject::timeout)
    }

    /// Sends the message of `ex` to the consumer of `key` (parking as
    /// `park` allows); a sender that finds nobody and may not park is
    /// answered `alone()`.
    pub fn send(
        &self,
        ex: &mut Exchange,
        key: &str,
        query: &Query,
        park: Park,
        alone: impl FnOnce() -> Reject,
    ) -> Result<(), Reject> {
        let outgoing = Arc::new(Outgoing::from_request(ex, query, READ_AHEAD)?);
        let deadline = deadline(query.timeout, self.max_wait);
        let park = if park == Park::Back {
            park_until(deadline)
        } else {
            park
        };
        let id = self.handoff.next_id();
        let consumer = if outgoing.inline.is_some() {
            // At hand: whoever takes it answers it, as a receiver of its 200.
            let (mailbox, done) = Mailbox::new();
            let kind = Kind::Channel(Mode::Queue);
            let receiver = Receiver::new(ex, id, kind, key, query, true, done);
            let outgoing = Arc::clone(&outgoing);
            match self
                .handoff
                .arrive_a(key, Producer::Ready { outgoing, receiver }, park)
            {
                Err(_) => return Err(Reject::shutting_down()),
                Ok(Arrival::Alone(_)) => return Err(alone()),
                Ok(Arrival::Paired { theirs, .. }) => theirs,
                Ok(Arrival::Parked) => return self.wait_answered(ex, key, id, deadline, &mailbox),
            }
        } else {
            let (mailbox, wake) = Mailbox::new();
            match self
                .handoff
                .arrive_a(key, Producer::Streaming { id, wake }, park)
            {
                Err(_) => return Err(Reject::shutting_down()),
                Ok(Arrival::Alone(_)) => return Err(alone()),
                Ok(Arrival::Paired { theirs, .. }) => theirs,
                Ok(Arrival::Parked) => match self.wait_paired(ex, key, id, deadline, &mailbox)? {
                    Some(consumer) => consumer,
                    None => return Ok(()),
                },
            }
        };
        self.transfer(ex, key, &outgoing, consumer)
    }

    /// A parked producer whose message is at hand waits to be answered by
    /// the thread that delivers it.
    fn wait_answered(
        &self,
        ex: &mut Exchange,
        key: &str,
        id: u64,
        deadline: Option<Instant>,
        mailbox: &Mailbox<Delivery>,
    ) -> Result<(), Reject> {
        // Every loud word to it ends its connection: it may watch.
        match wait(mailbox, ex, deadline, Sleep::Watching, || {
            self.handoff.unpark_a(key, id)
        }) {
            Waited::Got(delivery) => delivery.apply(ex),
            Waited::TimedOut => Err(Reject::timeout()),
            Waited::HungUp => {
                log::debug!("queue {}: producer {id} hung up while waiting", short(key));
                self.stats.hung_up();
                ex.close();
                Ok(())
            }
        }
    }

    /// A parked producer whose body is still in its request waits for a
    /// consumer; None when it is done (gone, or answered).
    fn wait_paired(
        &self,
        ex: &mut Exchange,
        key: &str,
        id: u64,
        deadline: Option<Instant>,
        mailbox: &Mailbox<Wake<Receiver>>,
    ) -> Result<Option<Receiver>, Reject> {
        // Woken to stream its body and carry on: blind.
        match wait(mailbox, ex, deadline, Sleep::Blind, || {
            self.handoff.unpark_a(key, id)
        }) {
            Waited::Got(Wake::Paired(consumer)) if is_producer_alive(ex) => Ok(Some(consumer)),
            Waited::Got(Wake::Paired(consumer)) => {
                // Gone while the consumer came: the consumer was first in
                // line and goes back there.
                let _ = self.offer(key, consumer, Park::Front, ex.common());
                log::debug!("queue {}: producer {id} hung up while waiting", short(key));
                self.stats.hung_up();
                ex.close();
                Ok(None)
            }
            Waited::Got(Wake::Ended(reject)) => Err(reject),
            Waited::TimedOut => Err(Reject::timeout()),
            // Found gone by a consumer, which counted it.
            Waited::Got(Wake::Gone) => {
                ex.close();
                Ok(None)
            }
            Waited::HungUp => {
                log::debug!("queue {}: producer {id} hung up while waiting", short(key));
                self.stats.hung_up();
                ex.close();
                Ok(None)
            }
        }
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
        consumer: Receiver,
    ) -> Result<(), Reject> {
        let common = ex.common();
        if outgoing.inline.is_some() && !is_open(ex.conn.stream()) {
            log::debug!(
                "queue {}: producer hung up before its message was relayed",
                short(key)
            );
            self.stats.hung_up();
            let _ = self.offer(key, consumer, Park::Front, common);
            ex.close();
            return Ok(());
        }
        let body = match &outgoing.inline {
            Some(bytes) => Body::Inline(bytes),
            None => Body::Request(ex),
        };
        match self.relay(key, body, outgoing, consumer, common) {
            Ok(()) => {
                if let Err(error) = ex.respond(Head::new(200), b"") {
                    log::debug!(
                        "queue {}: producer hung up before its answer: {error}",
                        short(key)
                    );
                    ex.close();
                }
                Ok(())
            }
            Err(Failed::Producer(error)) => {
                ex.close();
                if let Some(refusal) = body::refusal_for(&error) {
                    Err(refusal)
                } else if matches!(
                    error.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) {
                    Err(stalled(self.idle_timeout))
                } else {
                    Ok(())
                }
            }
            Err(Failed::Consumer) => Err(consumer_gone()),
        }
    }

    /// Any thread delivers the message a producer had at hand to `consumer`,
    /// then the producer's own answer to the producer.
    fn deliver_ready(
        &self,
        key: &str,
        outgoing: &Outgoing,
        producer: Receiver,
        consumer: Receiver,
        common: &Common,
    ) {
        let inline = outgoing.inline.as_deref().unwrap_or_default();
        let answer = match self.relay(key, Body::Inline(inline), outgoing, consumer, common) {
            Ok(()) => Answer::delivered(),
            Err(_) => Answer::refused(&consumer_gone()),
        };
        if let Delivered::ReceiverGone = deliver(
            &self.stats,
            Body::Inline(&answer.body),
            &answer.outgoing,
            producer,
            common,
        ) {
            log::debug!("queue {}: producer hung up before its answer", short(key));
        }
    }

    /// Delivers a message to `consumer`, counts the pair, and hands the
    /// consumer back to the front of its line if the producer failed before
    /// anything reached it.
    fn relay(
        &self,
        key: &str,
        body: Body,
        outgoing: &Outgoing,
        consumer: Receiver,
        common: &Common,
    ) -> Result<(), Failed> {
        let start = Instant::now();
        match deliver(&self.stats, body, outgoing, consumer, common) {
            Delivered::Whole { sent } => {
                self.stats.paired(sent);
                log::info!(
                    "queue {}: delivered {sent} bytes in {}",
                    short(key),
                    took(start)
                );
                Ok(())
            }
            Delivered::SenderFailed { error, sent, back } => {
                log::debug!(
                    "queue {}: producer failed mid-body after {sent} bytes: {error}",
                    short(key)
                );
                if let Some(consumer) = back {
                    // Nothing reached the consumer: it goes back first in line.
                    let _ = self.offer(key, consumer, Park::Front, common);
                }
                Err(Failed::Producer(error))
            }
            Delivered::ReceiverGone => Err(Failed::Consumer),
        }
    }
}

/// Why a relay failed.
enum Failed {
    /// The producer's body did not arrive.
    Producer(io::Error),
    /// The consumer could not be written to.
    Consumer,
}

/// A producer's answer, as a message to deliver to it.
struct Answer {
    outgoing: Outgoing,
    body: Vec<u8>,
}

impl Answer {
    /// 200, empty: delivered.
    fn delivered() -> Answer {
        Answer::new(200, Vec::new())
    }

    /// A refusal, with its one-line reason.
    fn refused(reject: &Reject) -> Answer {
        Answer::new(reject.status, format!("{}\n", reject.reason).into_bytes())
    }

    fn new(status: u16, body: Vec<u8>) -> Answer {
        Answer {
            outgoing: Outgoing {
                envelope: Envelope::text(),
                status,
                inline: None,
            },
            body,
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
        routed: &Routed,
        channel: &Channel,
        action: Action,
    ) -> Result<(), Reject> {
        let query = &routed.query;
        match action {
            Action::Send => self.produce(ex, &channel.pair_key(), query),
            Action::Receive => {
                self.consume(ex, &channel.pair_key(), query, routed.credential.relay)
            }
            _ => Err(Reject::method_not_allowed(CHANNEL_METHODS)),
        }
    }

    fn end_under(&self, prefix: &str, reject: &Reject) -> (usize, usize) {
        self.handoff.end_under(prefix, reject)
    }

    fn close(&self) -> usize {
        self.handoff.close()
    }

    /// Reply paths (`/_/reply/<secret>`) are secrets, never listed.
    fn channels(&self) -> Vec<ChannelView> {
        let mut views = self.handoff.views("queue", ("producers", "consumers"));
        views.retain(|view| !view.key.starts_with("/_/"));
        views
    }
}

/// Where a waiter with `deadline` may park: nowhere if it has passed.
pub fn park_until(deadline: Option<Instant>) -> Park {
    if deadline.is_none_or(|d| d > Instant::now()) {
        Park::Back
    } else {
        Park::Never
    }
}

/// Whether a parked producer's client is still there. Reading ahead what
/// already arrived lets the peek used off Linux see a hang-up queued behind a
/// small body (DESIGN.md §3); on Linux the TCP state says it either way.
fn is_producer_alive(ex: &mut Exchange) -> bool {
    ex.read_ahead(READ_AHEAD).is_ok() && is_open(ex.conn.stream())
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
