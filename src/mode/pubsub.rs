//! Pubsub channels: POST/PUT publishes at once, GET receives the next message,
//! and every channel keeps its recent messages so that a subscriber that
//! comes back with a cursor (`?after=ID`, `Last-Event-ID`) misses nothing.
//!
//! Each message gets an id. Ids increase by one within a channel's history
//! on this server; a history starts above every id given before, taken from
//! the clock in microseconds, so a cursor from before a restart, or from
//! before the channel was forgotten, never hides new messages.
//!
//! Who gets what, all under one lock held for microseconds, never across
//! socket I/O:
//! - a parked one-shot GET ([`Waiter`]) is handed the message itself, once;
//! - a streaming subscription ([`Listener`]) keeps its own cursor and is only
//!   rung; it pulls what is new from the retained messages and writes it on
//!   its own thread, so a slow one never slows the publisher or the others,
//!   and holds no queue of its own: when it falls behind the retention, it
//!   is told how many messages it missed.
//!
//! Retention: per channel by count, bytes and age, and across channels by
//! `--pubsub-memory`, which evicts the oldest message of any channel first.
//! A channel with no messages and no subscribers is forgotten.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crossbeam_channel::{RecvTimeoutError, Sender, bounded};

use crate::config::PubsubLimits;
use crate::error::Reject;
use crate::http::response::{end_of_body, write_piece};
use crate::http::{Exchange, Head, Payload, is_open};
use crate::mode::envelope::Envelope;
use crate::mode::format::{Encoder, Format};
use crate::mode::wait::{SWEEP, Waited, wait};
use crate::mode::{Family, deadline, short};
use crate::route::Query;

/// About how many bytes of messages a stream takes from its channel at once.
const PULL_BYTES: usize = 64 * 1024;

/// How many encoded bytes a stream gathers before it writes them.
const FLUSH_AT: usize = 32 * 1024;

/// Every pubsub channel.
pub struct Pubsub {
    /// Guards every channel; held for microseconds, never across socket I/O
    /// or a blocking call.
    channels: Mutex<Channels>,
    limits: PubsubLimits,
    max_wait: Option<Duration>,
    keepalive: Duration,
    next_subscriber: AtomicU64,
}

/// The channels and what they retain together.
#[derive(Default)]
struct Channels {
    feeds: HashMap<String, Feed>,
    /// Each channel that retains messages, by the publication number
    /// (`seq`) of its oldest: the first entry holds the server's oldest message.
    oldest: BTreeMap<u64, String>,
    /// Bytes retained across all channels.
    bytes: usize,
    next_seq: u64,
    /// The largest id given so far: a new history starts above it.
    last_id: u64,
    /// Set for shutdown: nothing new may publish or subscribe.
    closed: bool,
}

/// One pubsub channel: its history on this server and its subscribers.
struct Feed {
    /// The id of the first message of this history.
    base: u64,
    /// The id the next message gets.
    next_id: u64,
    /// The messages kept, oldest first; their ids are consecutive.
    retained: VecDeque<Arc<Message>>,
    /// Bytes of `retained`.
    bytes: usize,
    /// One-shot GETs waiting for the next message.
    waiters: Vec<Waiter>,
    /// Streaming subscriptions.
    listeners: Vec<Listener>,
}

/// One published message.
pub struct Message {
    pub id: u64,
    /// Publication order across all channels.
    seq: u64,
    published: Instant,
    /// Bytes it holds, as retention counts them: body, headers, the
    /// channel's name (kept twice per channel) and some overhead.
    cost: usize,
    /// When it was published, as subscribers are told.
    pub time: SystemTime,
    pub envelope: Envelope,
    pub body: Vec<u8>,
}

/// A parked one-shot GET: it is handed the next message.
struct Waiter {
    id: u64,
    /// Messages after its cursor that were evicted before it came.
    missed: u64,
    wake: Sender<Wake>,
}

/// What a waiter is handed.
enum Wake {
    Message {
        message: Arc<Message>,
        missed: u64,
    },
    /// The channel was deleted or the server is stopping.
    Ended(Reject),
}

/// A streaming subscription: rung when there is something new to pull. The
/// channel dropping the bell (deletion, shutdown) rings it too.
struct Listener {
    id: u64,
    bell: Sender<()>,
}

/// What a stream pulled: new messages, and how many it missed before them.
struct Pulled {
    messages: Vec<Arc<Message>>,
    missed: u64,
    /// More messages are waiting beyond this batch.
    more: bool,
}

impl Message {
    /// A message not yet given a place in a channel.
    pub fn new(id: u64, time: SystemTime, envelope: Envelope, body: Vec<u8>) -> Message {
        Message {
            id,
            seq: 0,
            published: Instant::now(),
            cost: body.len() + envelope.size() + 128,
            time,
            envelope,
            body,
        }
    }
}

impl Feed {
    fn new(base: u64) -> Feed {
        Feed {
            base,
            next_id: base,
            retained: VecDeque::new(),
            bytes: 0,
            waiters: Vec::new(),
            listeners: Vec::new(),
        }
    }

    fn is_idle(&self) -> bool {
        self.retained.is_empty() && self.waiters.is_empty() && self.listeners.is_empty()
    }

    /// The newest id given in this history (`base - 1` before the first).
    fn newest(&self) -> u64 {
        self.next_id - 1
    }

    /// The retained messages after cursor `after`, and how many messages
    /// after it were evicted before the first of them (or, when none is
    /// retained, before the next one to come). A cursor beyond the newest id
    /// (another server run, a clock set back) means "seen everything"; ids
    /// from before this history are not counted as missed, being unknown.
    fn after(&self, after: u64) -> (std::collections::vec_deque::Iter<'_, Arc<Message>>, u64) {
        let after = after.min(self.newest());
        let floor = after.max(self.base - 1);
        let start = self.retained.partition_point(|m| m.id <= after);
        let next = self.retained.get(start).map_or(self.next_id, |m| m.id);
        (self.retained.range(start..), next - 1 - floor)
    }
}

impl Channels {
    /// The channel `key`, created with a fresh history if it is not there.
    fn feed(&mut self, key: &str) -> &mut Feed {
        if !self.feeds.contains_key(key) {
            let now = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX / 2));
            let base = now.max(self.last_id + 1);
            self.feeds.insert(key.to_owned(), Feed::new(base));
        }
        self.feeds.get_mut(key).expect("inserted above")
    }

    /// Evicts the oldest message of channel `key`, forgetting the channel if
    /// that leaves it idle; false if it had none.
    fn evict_oldest_of(&mut self, key: &str) -> bool {
        let Some(feed) = self.feeds.get_mut(key) else {
            return false;
        };
        let Some(message) = feed.retained.pop_front() else {
            return false;
        };
        let cost = message.cost;
        feed.bytes -= cost;
        self.bytes -= cost;
        self.oldest.remove(&message.seq);
        if let Some(next) = feed.retained.front() {
            self.oldest.insert(next.seq, key.to_owned());
        } else if feed.is_idle() {
            self.feeds.remove(key);
        }
        true
    }

    /// Evicts every message older than `max_age`, oldest first.
    fn expire(&mut self, now: Instant, max_age: Duration) {
        while let Some((&seq, key)) = self.oldest.first_key_value() {
            let expired = match self.feeds.get(key).and_then(|f| f.retained.front()) {
                Some(message) => now.saturating_duration_since(message.published) >= max_age,
                None => {
                    // Not reachable while the index is kept right; heal it.
                    self.oldest.remove(&seq);
                    continue;
                }
            };
            if !expired {
                break;
            }
            let key = key.clone();
            if !self.evict_oldest_of(&key) {
                self.oldest.remove(&seq);
            }
        }
    }

    /// Evicts until channel `key` is within its limits (its newest message
    /// stays whatever its size) and the server within its memory, where the
    /// oldest message of any channel goes first but never message `keep`.
    fn trim(&mut self, key: &str, limits: &PubsubLimits, keep: u64) {
        while let Some(feed) = self.feeds.get(key) {
            let count = feed.retained.len();
            if count <= 1 || (count <= limits.retain_count && feed.bytes <= limits.retain_bytes) {
                break;
            }
            if !self.evict_oldest_of(key) {
                break;
            }
        }
        while self.bytes > limits.memory {
            let Some((&seq, oldest_key)) = self.oldest.first_key_value() else {
                break;
            };
            if seq == keep {
                break;
            }
            let oldest_key = oldest_key.clone();
            if !self.evict_oldest_of(&oldest_key) {
                // Not reachable while the index is kept right; heal it.
                self.oldest.remove(&seq);
            }
        }
    }

    /// Takes channel `key` out, with everything it retains.
    fn remove(&mut self, key: &str) -> Option<Feed> {
        let feed = self.feeds.remove(key)?;
        if let Some(message) = feed.retained.front() {
            self.oldest.remove(&message.seq);
        }
        self.bytes -= feed.bytes;
        Some(feed)
    }

    /// Forgets channel `key` if nothing keeps it.
    fn forget_if_idle(&mut self, key: &str) {
        if self.feeds.get(key).is_some_and(Feed::is_idle) {
            self.feeds.remove(key);
        }
    }
}

impl Pubsub {
    /// No channels yet.
    pub fn new(limits: PubsubLimits, max_wait: Option<Duration>, keepalive: Duration) -> Pubsub {
        Pubsub {
            channels: Mutex::new(Channels::default()),
            limits,
            max_wait,
            keepalive,
            next_subscriber: AtomicU64::new(1),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Channels> {
        // A panicking thread never leaves the maps half-changed: ignore poisoning.
        self.channels
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The channels, refreshed (expired messages evicted), unless closed.
    fn open(&self) -> Result<MutexGuard<'_, Channels>, Reject> {
        let mut channels = self.lock();
        if channels.closed {
            return Err(Reject::shutting_down());
        }
        channels.expire(Instant::now(), self.limits.retain_age);
        Ok(channels)
    }

    fn next_subscriber(&self) -> u64 {
        self.next_subscriber.fetch_add(1, Ordering::Relaxed)
    }

    /// A publisher: reads the message whole, then adds it.
    fn publish(&self, ex: &mut Exchange, key: &str, query: &Query) -> Result<(), Reject> {
        let max = self.limits.max_message;
        let too_large = || {
            Reject::new(
                413,
                format!("message larger than {max} bytes (--pubsub-max-message)"),
            )
        };
        let inline = !ex.has_body() && query.body.is_some();
        let envelope = Envelope::from_request(ex, query, inline);
        let body = if inline {
            query.body.clone().unwrap_or_default()
        } else {
            if ex.body_length().is_some_and(|n| n > max as u64) {
                return Err(too_large());
            }
            let mut body = Vec::new();
            match (&mut *ex)
                .take((max as u64).saturating_add(1))
                .read_to_end(&mut body)
            {
                Ok(_) => {}
                Err(error) if error.kind() == io::ErrorKind::InvalidData => {
                    return Err(Reject::bad_request(format!(
                        "malformed request body: {error}"
                    )));
                }
                Err(error) => {
                    log::debug!("pubsub {key:?}: publisher hung up mid-body: {error}");
                    ex.close();
                    return Ok(());
                }
            }
            body
        };
        if body.len() > max {
            return Err(too_large());
        }
        let bytes = body.len();
        let (id, handed) = self.add(key, envelope, body)?;
        log::info!(
            "pubsub {}: message {id} ({bytes} bytes) handed to {handed} subscribers",
            short(key)
        );
        let mut head = Head::new(200);
        head.header("Patch-Id", id.to_string())
            .header("Patch-Subscribers", handed.to_string());
        if let Err(error) = ex.respond(head, b"") {
            log::debug!("pubsub {key:?}: publisher hung up before its answer: {error}");
            ex.close();
        }
        Ok(())
    }

    /// Adds a message to channel `key`: hands it to the parked waiters, rings
    /// the streams, retains it. Returns its id and how many subscribers got it.
    fn add(&self, key: &str, envelope: Envelope, body: Vec<u8>) -> Result<(u64, usize), Reject> {
        let mut channels = self.open()?;
        let seq = channels.next_seq;
        channels.next_seq += 1;
        let feed = channels.feed(key);
        let id = feed.next_id;
        feed.next_id += 1;
        let mut message = Message::new(id, SystemTime::now(), envelope, body);
        message.seq = seq;
        message.cost += 2 * key.len();
        let message = Arc::new(message);
        let mut handed = 0;
        for waiter in feed.waiters.drain(..) {
            let wake = Wake::Message {
                message: Arc::clone(&message),
                missed: waiter.missed,
            };
            handed += usize::from(waiter.wake.try_send(wake).is_ok());
        }
        for listener in &feed.listeners {
            // A full bell already says "pull": nothing is lost.
            let _ = listener.bell.try_send(());
        }
        handed += feed.listeners.len();
        let cost = message.cost;
        let first = feed.retained.is_empty();
        feed.retained.push_back(message);
        feed.bytes += cost;
        channels.bytes += cost;
        channels.last_id = channels.last_id.max(id);
        if first {
            channels.oldest.insert(seq, key.to_owned());
        }
        channels.trim(key, &self.limits, seq);
        Ok((id, handed))
    }

    /// A subscriber: a stream, or one message (retained after its cursor,
    /// or the next one published).
    fn subscribe(&self, ex: &mut Exchange, key: &str, query: &Query) -> Result<(), Reject> {
        if ex.has_body() {
            return Err(Reject::bad_request(
                "a receive (GET) takes no body; publish with POST or PUT",
            ));
        }
        let cursor = cursor(query, ex.request.header("last-event-id"))?;
        if let Some(format) = Format::requested(query, ex.request.header("accept"))? {
            return self.stream(ex, key, query, format, cursor);
        }
        let deadline = deadline(query.timeout, self.max_wait);
        let may_park = deadline.is_none_or(|d| d > Instant::now());
        let id = self.next_subscriber();
        let (wake_tx, wake_rx) = bounded(1);
        let found = {
            let mut channels = self.open()?;
            // Without a cursor, or on a channel with no history, the next
            // message is the one to wait for, and nothing was missed.
            let (next, missed) = match (cursor, channels.feeds.get(key)) {
                (Some(after), Some(feed)) => {
                    let (mut messages, missed) = feed.after(after);
                    (messages.next().cloned(), missed)
                }
                _ => (None, 0),
            };
            if next.is_none() {
                if !may_park {
                    return Err(no_message());
                }
                let wake = wake_tx;
                channels.feed(key).waiters.push(Waiter { id, missed, wake });
            }
            next.map(|message| (message, missed))
        };
        let (message, missed) = match found {
            Some(found) => found,
            None => {
                log::debug!("pubsub {key:?}: subscriber {id} parked");
                let stream = ex.conn.stream();
                let waited = wait(
                    &wake_rx,
                    deadline,
                    || is_open(stream),
                    || self.unpark(key, id),
                );
                match waited {
                    Waited::Got(Wake::Message { message, missed }) => (message, missed),
                    Waited::Got(Wake::Ended(reject)) => return Err(reject),
                    Waited::TimedOut => return Err(no_message()),
                    Waited::HungUp => {
                        log::debug!("pubsub {key:?}: subscriber {id} hung up while waiting");
                        ex.close();
                        return Ok(());
                    }
                }
            }
        };
        let mut head = Head::new(200);
        message.envelope.write_to(&mut head, query.mime.as_deref());
        head.header("Patch-Id", message.id.to_string())
            .header("Cache-Control", "no-cache");
        if missed > 0 {
            head.header("Patch-Missed", missed.to_string());
        }
        if let Err(error) = ex.respond(head, &message.body) {
            log::debug!("pubsub {key:?}: subscriber {id} hung up before its message: {error}");
            ex.close();
        }
        Ok(())
    }

    /// Takes parked waiter `id` out of channel `key`; false if it was handed
    /// a message meanwhile.
    fn unpark(&self, key: &str, id: u64) -> bool {
        let mut channels = self.lock();
        let Some(feed) = channels.feeds.get_mut(key) else {
            return false;
        };
        let Some(at) = feed.waiters.iter().position(|w| w.id == id) else {
            return false;
        };
        feed.waiters.swap_remove(at);
        channels.forget_if_idle(key);
        true
    }

    /// Pulls what stream `id` has not seen yet, moving its cursor; the first
    /// pull registers it with `bell`, in the same critical section, so that
    /// nothing published meanwhile is missed or repeated. Fails when the
    /// stream should end (channel deleted, server stopping).
    fn pull(
        &self,
        key: &str,
        id: u64,
        cursor: &mut Option<u64>,
        bell: Option<Sender<()>>,
    ) -> Result<Pulled, Reject> {
        let mut channels = self.open()?;
        let feed = match bell {
            Some(bell) => {
                let feed = channels.feed(key);
                feed.listeners.push(Listener { id, bell });
                feed
            }
            None => match channels.feeds.get_mut(key) {
                Some(feed) if feed.listeners.iter().any(|l| l.id == id) => feed,
                _ => return Err(Reject::deleted()),
            },
        };
        let after = cursor.unwrap_or(feed.newest());
        let (messages, missed) = feed.after(after);
        let available = messages.len();
        // A batch of at most about PULL_BYTES, so that a stream's buffers
        // stay small whatever the channel retains.
        let mut budget = PULL_BYTES;
        let messages: Vec<Arc<Message>> = messages
            .take_while(|m| {
                let take = budget > 0;
                budget = budget.saturating_sub(m.body.len().max(1));
                take
            })
            .cloned()
            .collect();
        let missed = if messages.is_empty() { 0 } else { missed };
        *cursor = Some(messages.last().map_or(after.min(feed.newest()), |m| m.id));
        Ok(Pulled {
            more: messages.len() < available,
            messages,
            missed,
        })
    }

    /// Takes stream `id` out of channel `key`.
    fn leave(&self, key: &str, id: u64) {
        let mut channels = self.lock();
        if let Some(feed) = channels.feeds.get_mut(key) {
            feed.listeners.retain(|l| l.id != id);
            channels.forget_if_idle(key);
        }
    }

    /// Serves a streaming subscription until the client leaves, the channel
    /// is deleted or the server stops.
    fn stream(
        &self,
        ex: &mut Exchange,
        key: &str,
        query: &Query,
        format: Format,
        mut cursor: Option<u64>,
    ) -> Result<(), Reject> {
        let id = self.next_subscriber();
        let (bell_tx, bell_rx) = bounded(1);
        let first = self.pull(key, id, &mut cursor, Some(bell_tx))?;
        log::debug!("pubsub {key:?}: stream {id} ({format:?}) started");
        let mut head = Head::new(200);
        head.header("Content-Type", format.content_type(query.mime.as_deref()))
            .header("Cache-Control", "no-cache")
            .header("X-Accel-Buffering", "no");
        if first.missed > 0 {
            head.header("Patch-Missed", first.missed.to_string());
        }
        let payload = Payload::for_body(ex.request.version, None);
        let head = ex.start_response(head, payload);
        let stream = ex.conn.stream();
        let mut out = StreamOut {
            sink: stream,
            payload,
            head,
            data: Vec::new(),
            last_sent: Instant::now(),
        };
        let mut pulled = Some(first);
        let ended = loop {
            let more = pulled.as_ref().is_some_and(|batch| batch.more);
            if let Err(error) = out.send(format, pulled.take()) {
                log::debug!("pubsub {key:?}: stream {id} hung up: {error}");
                self.leave(key, id);
                ex.close();
                return Ok(());
            }
            // A keepalive too far off to represent is never sent.
            let keepalive_at = out.last_sent.checked_add(self.keepalive);
            let sweep_at = Instant::now() + SWEEP;
            let rung = if more {
                Ok(())
            } else {
                bell_rx.recv_deadline(keepalive_at.map_or(sweep_at, |k| k.min(sweep_at)))
            };
            match rung {
                Ok(()) | Err(RecvTimeoutError::Disconnected) => {
                    match self.pull(key, id, &mut cursor, None) {
                        Ok(batch) => pulled = Some(batch),
                        Err(reject) => break reject,
                    }
                }
                Err(RecvTimeoutError::Timeout) => {
                    if !is_open(stream) {
                        log::debug!("pubsub {key:?}: stream {id} hung up");
                        self.leave(key, id);
                        ex.close();
                        return Ok(());
                    }
                    if keepalive_at.is_some_and(|k| Instant::now() >= k) {
                        format.write_keepalive(&mut out.data);
                        // A raw stream has no keepalive: its timer just restarts.
                        out.last_sent = Instant::now();
                    }
                }
            }
        };
        log::debug!("pubsub {key:?}: stream {id} ended: {}", ended.reason);
        let _ = out.flush();
        let _ = (&mut &*stream).write_all(end_of_body(payload));
        ex.close();
        Ok(())
    }
}

impl Family for Pubsub {
    fn send(&self, ex: &mut Exchange, key: &str, query: &Query) -> Result<(), Reject> {
        self.publish(ex, key, query)
    }

    fn receive(&self, ex: &mut Exchange, key: &str, query: &Query) -> Result<(), Reject> {
        self.subscribe(ex, key, query)
    }

    /// Deletes the channels with what they retain: waiters get `reject`,
    /// streams end.
    fn end_under(&self, prefix: &str, reject: &Reject) -> (usize, usize) {
        let feeds: Vec<Feed> = {
            let mut channels = self.lock();
            let keys: Vec<String> = channels
                .feeds
                .keys()
                .filter(|key| crate::registry::is_under(key, prefix))
                .cloned()
                .collect();
            keys.iter().filter_map(|key| channels.remove(key)).collect()
        };
        end(feeds, reject)
    }

    /// Waiters get 503, streams end.
    fn close(&self) -> usize {
        let feeds: Vec<Feed> = {
            let mut channels = self.lock();
            channels.closed = true;
            channels.oldest.clear();
            channels.bytes = 0;
            channels.feeds.drain().map(|(_, feed)| feed).collect()
        };
        end(feeds, &Reject::shutting_down()).1
    }
}

/// The writing side of a stream: the response head, until the first write,
/// and a small buffer of encoded bytes, written out whenever it fills.
struct StreamOut<'s> {
    sink: &'s TcpStream,
    payload: Payload,
    /// The response head, sent with the first piece.
    head: Vec<u8>,
    data: Vec<u8>,
    /// When something was last written, for the keepalive timer.
    last_sent: Instant,
}

impl StreamOut<'_> {
    /// Encodes and writes `batch`, and whatever is pending (the head, a
    /// keepalive).
    fn send(&mut self, format: Format, batch: Option<Pulled>) -> io::Result<()> {
        if let Some(batch) = batch {
            if batch.missed > 0 {
                format.write_missed(batch.missed, &mut self.data);
            }
            for message in &batch.messages {
                let mut encoder = Encoder::new(format, message);
                while encoder.write_next(&mut self.data) {
                    if self.data.len() >= FLUSH_AT {
                        self.flush()?;
                    }
                }
            }
        }
        self.flush()
    }

    /// Writes what is pending as one piece of the body.
    fn flush(&mut self) -> io::Result<()> {
        if self.head.is_empty() && self.data.is_empty() {
            return Ok(());
        }
        write_piece(&mut self.sink, self.payload, &self.head, &self.data)?;
        self.head.clear();
        self.data.clear();
        self.last_sent = Instant::now();
        Ok(())
    }
}

/// The subscriber's cursor: the `Last-Event-ID` header of a reconnecting
/// EventSource (which reconnects to the same URL, `?after=` included), else
/// `?after=ID`; empty means none. A malformed `Last-Event-ID` is ignored
/// (EventSource would resend it forever), a malformed `after=` refused.
fn cursor(query: &Query, last_event_id: Option<&str>) -> Result<Option<u64>, Reject> {
    if let Some(id) = last_event_id.and_then(|id| id.trim().parse().ok()) {
        return Ok(Some(id));
    }
    if let Some(after) = query.get("after") {
        let after = after.trim();
        if after.is_empty() {
            return Ok(None);
        }
        return after
            .parse()
            .map(Some)
            .map_err(|_| Reject::bad_request("after= takes a message id (Patch-Id)"));
    }
    Ok(None)
}

/// 408 for a subscriber: nothing was published within its wait.
fn no_message() -> Reject {
    Reject::new(408, "no message within the timeout")
}

/// Ends the subscribers of `feeds`: waiters get `reject`, streams are rung
/// (their bells are dropped with the channels) and end. Returns how many
/// channels and subscribers were ended.
fn end(feeds: Vec<Feed>, reject: &Reject) -> (usize, usize) {
    let channels = feeds.len();
    let mut subscribers = 0;
    for feed in feeds {
        for waiter in feed.waiters {
            subscribers += usize::from(waiter.wake.try_send(Wake::Ended(reject.clone())).is_ok());
        }
        subscribers += feed.listeners.len();
    }
    (channels, subscribers)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> PubsubLimits {
        PubsubLimits {
            retain_count: 3,
            retain_bytes: 1 << 20,
            retain_age: Duration::from_secs(3600),
            memory: 1 << 20,
            max_message: 1 << 20,
        }
    }

    fn pubsub(limits: PubsubLimits) -> Pubsub {
        Pubsub::new(limits, None, Duration::from_secs(30))
    }

    fn publish(pubsub: &Pubsub, key: &str, body: &[u8]) -> u64 {
        pubsub
            .add(key, Envelope::default(), body.to_vec())
            .unwrap()
            .0
    }

    fn retained(pubsub: &Pubsub, key: &str) -> Vec<Vec<u8>> {
        let channels = pubsub.lock();
        channels.feeds.get(key).map_or(Vec::new(), |feed| {
            feed.retained.iter().map(|m| m.body.clone()).collect()
        })
    }

    #[test]
    fn ids_increase_by_one_and_survive_a_forgotten_channel() {
        let pubsub = pubsub(limits());
        let first = publish(&pubsub, "/a", b"1");
        assert_eq!(publish(&pubsub, "/a", b"2"), first + 1);
        pubsub.end_under("/a", &Reject::deleted());
        assert!(publish(&pubsub, "/a", b"3") > first + 1);
    }

    #[test]
    fn cursors_find_the_next_message_and_count_the_missed() {
        let pubsub = pubsub(limits());
        let ids: Vec<u64> = (0..5).map(|i| publish(&pubsub, "/a", &[i])).collect();
        assert_eq!(retained(&pubsub, "/a"), [vec![2], vec![3], vec![4]]);
        let channels = pubsub.lock();
        let feed = &channels.feeds["/a"];
        let first = |after| {
            let (mut messages, missed) = feed.after(after);
            (messages.next().map(|m| m.id), missed)
        };
        assert_eq!(first(ids[2]), (Some(ids[3]), 0));
        assert_eq!(first(ids[0]), (Some(ids[2]), 1));
        assert_eq!(first(0), (Some(ids[2]), 2));
        assert_eq!(first(ids[4]), (None, 0));
        assert_eq!(first(u64::MAX), (None, 0));
    }

    #[test]
    fn retention_is_bounded_per_channel_and_across_channels() {
        let pubsub = pubsub(PubsubLimits {
            retain_count: 100,
            retain_bytes: 2500,
            memory: 5000,
            ..limits()
        });
        for _ in 0..4 {
            publish(&pubsub, "/a", &[0; 1000]);
        }
        assert_eq!(retained(&pubsub, "/a").len(), 2);
        for _ in 0..2 {
            publish(&pubsub, "/b", &[1; 1000]);
        }
        publish(&pubsub, "/c", &[2; 1000]);
        // 5 messages of ~1128 bytes exceed 5000: /a's oldest went first.
        assert_eq!(retained(&pubsub, "/a").len(), 1);
        assert_eq!(retained(&pubsub, "/b").len(), 2);
        // The newest message of a channel stays whatever its size.
        publish(&pubsub, "/d", &[3; 4000]);
        assert_eq!(retained(&pubsub, "/d").len(), 1);
        assert!(pubsub.lock().bytes <= 5000);
        assert_eq!(pubsub.lock().feeds.len(), 1);
    }

    #[test]
    fn long_channel_names_count_against_the_memory() {
        let pubsub = pubsub(PubsubLimits {
            memory: 64 << 10,
            ..limits()
        });
        for i in 0..100 {
            publish(&pubsub, &format!("/{i}/{}", "x".repeat(1000)), b"");
        }
        let channels = pubsub.lock();
        assert!(channels.bytes <= 64 << 10);
        assert!(channels.feeds.len() < 32, "{}", channels.feeds.len());
    }

    #[test]
    fn old_messages_expire_and_empty_channels_are_forgotten() {
        let pubsub = pubsub(PubsubLimits {
            retain_age: Duration::from_millis(1),
            ..limits()
        });
        publish(&pubsub, "/a", b"x");
        std::thread::sleep(Duration::from_millis(5));
        publish(&pubsub, "/b", b"y");
        let channels = pubsub.lock();
        assert!(!channels.feeds.contains_key("/a"));
        assert_eq!(channels.oldest.len(), 1);
    }

    #[test]
    fn cursors_are_read_from_after_or_last_event_id() {
        let query = |after: Option<&str>| Query {
            params: after
                .map(|a| vec![("after".to_owned(), a.to_owned())])
                .unwrap_or_default(),
            ..Query::default()
        };
        assert_eq!(cursor(&query(Some("42")), Some("7")), Ok(Some(7)));
        assert_eq!(cursor(&query(Some("42")), Some("junk")), Ok(Some(42)));
        assert_eq!(cursor(&query(Some("")), None), Ok(None));
        assert_eq!(cursor(&query(None), Some("7")), Ok(Some(7)));
        assert_eq!(cursor(&query(None), Some("junk")), Ok(None));
        assert!(cursor(&query(Some("x")), None).is_err());
    }
}
