//! What pubsub channels keep, pure: each channel's history (its retained
//! messages, with consecutive ids), its parked one-shot subscribers and its
//! streams, and the bookkeeping across channels that `--pubsub-memory`
//! needs. No sockets and no waiting here: `mod.rs` locks the [`Store`] in
//! its registry, changes it in microseconds, and does the rest outside.
//!
//! Ids increase by one within a channel's history on this server; a history
//! starts above every id given before, taken from the clock in microseconds,
//! so a cursor from before a restart, or from before the channel was
//! forgotten, never hides new messages.
//!
//! Retention: per channel by count, bytes and age, and across channels by
//! memory, which evicts the oldest message of any channel first. A channel
//! with no messages and no subscribers is forgotten.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::config::PubsubLimits;
use crate::error::Reject;
use crate::mailbox::Poster;
use crate::mode::envelope::Envelope;
use crate::registry::Channels;

/// About how many bytes of messages a stream takes from its channel at once.
const PULL_BYTES: usize = 64 * 1024;

/// Every pubsub channel, and what they retain together.
#[derive(Default)]
pub struct Store {
    feeds: HashMap<String, Feed>,
    /// Each channel that retains messages, by the publication number
    /// (`seq`) of its oldest: the first entry holds the server's oldest message.
    oldest: BTreeMap<u64, String>,
    /// Bytes retained across all channels.
    bytes: usize,
    next_seq: u64,
    /// The largest id given so far: a new history starts above it.
    last_id: u64,
    /// Whether evictions and deletions are noted in `drops` (with `--store`).
    tracking: bool,
    /// What the store's file must lose: per channel, the newest id that
    /// left memory (evicted, or the channel deleted). Taken by the journal.
    drops: HashMap<String, u64>,
    /// Reserved ids of channels deleted before their messages were placed:
    /// those messages are published into the deleted history, that is,
    /// never shown (and they leave the file).
    orphans: HashSet<(String, u64)>,
}

/// One pubsub channel: its history on this server and its subscribers.
pub struct Feed {
    /// The id of the first message of this history.
    base: u64,
    /// The id the next message gets.
    next_id: u64,
    /// The messages kept, oldest first; their ids are consecutive.
    retained: VecDeque<Arc<Message>>,
    /// Bytes of `retained`.
    bytes: usize,
    /// Ids reserved for messages being written to the store's file: they
    /// keep the channel from being forgotten until they are placed.
    pending: usize,
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
pub struct Waiter {
    pub id: u64,
    /// Messages after its cursor that were evicted before it came.
    pub missed: u64,
    pub wake: Poster<Wake>,
}

/// What a waiter is handed.
pub enum Wake {
    Message {
        message: Arc<Message>,
        missed: u64,
    },
    /// The channel was deleted or the server is stopping.
    Ended(Reject),
}

/// A streaming subscription: rung when there is something new to pull.
pub struct Listener {
    pub id: u64,
    pub bell: Poster<()>,
}

/// What a publication did: the message's id, and who is to be told (after
/// the lock is released).
pub struct Published {
    pub id: u64,
    pub message: Arc<Message>,
    /// The parked one-shot subscribers, each now owed the message.
    pub waiters: Vec<Waiter>,
    /// The bells of the streams, to be rung.
    pub bells: Vec<Poster<()>>,
    /// How many retained messages were evicted to make room.
    pub evicted: usize,
}

/// What a stream pulled: new messages, and how many it missed before them.
pub struct Pulled {
    pub messages: Vec<Arc<Message>>,
    pub missed: u64,
    /// More messages are waiting beyond this batch.
    pub more: bool,
}

impl Message {
    /// A message not yet given a place in a channel, published at `time`
    /// (`published` on the monotonic clock, which retention by age reads).
    pub fn new(
        id: u64,
        time: SystemTime,
        published: Instant,
        envelope: Envelope,
        body: Vec<u8>,
    ) -> Message {
        Message {
            id,
            seq: 0,
            published,
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
            pending: 0,
            waiters: Vec::new(),
            listeners: Vec::new(),
        }
    }

    fn is_idle(&self) -> bool {
        self.retained.is_empty()
            && self.pending == 0
            && self.waiters.is_empty()
            && self.listeners.is_empty()
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

    /// The parked one-shot subscribers and the streams, taken out (for
    /// DELETE and shutdown).
    pub fn into_subscribers(self) -> (Vec<Waiter>, Vec<Listener>) {
        (self.waiters, self.listeners)
    }
}

impl Channels for Store {
    type Channel = Feed;

    fn keys(&self) -> Vec<String> {
        self.feeds.keys().cloned().collect()
    }

    fn take(&mut self, key: &str) -> Option<Feed> {
        let feed = self.feeds.remove(key)?;
        if let Some(message) = feed.retained.front() {
            self.oldest.remove(&message.seq);
        }
        // The newest ids are reserved, their messages still being written.
        let placed = feed.newest() - feed.pending as u64;
        self.drop_upto(key, placed);
        for id in placed + 1..feed.next_id {
            self.orphans.insert((key.to_owned(), id));
        }
        self.bytes -= feed.bytes;
        Some(feed)
    }
}

impl Store {
    /// Each channel with its subscribers (waiting GETs and streams) and
    /// retained messages, for `/_/channels`.
    pub fn views(&self) -> Vec<(String, usize, usize)> {
        self.feeds
            .iter()
            .map(|(key, feed)| {
                (
                    key.clone(),
                    feed.waiters.len() + feed.listeners.len(),
                    feed.retained.len(),
                )
            })
            .collect()
    }

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

    /// Adds a message to channel `key` and retains it within `limits`.
    pub fn publish(
        &mut self,
        key: &str,
        envelope: Envelope,
        body: Vec<u8>,
        limits: &PubsubLimits,
    ) -> Published {
        let id = self.reserve(key);
        let message = Message::new(id, SystemTime::now(), Instant::now(), envelope, body);
        self.place(key, message, limits)
    }

    /// Gives channel `key`'s next id to a message that is yet to be
    /// [placed](Store::place) (or [released](Store::release)): the journal
    /// writes it to the store's file in between, and memory shows it only
    /// once it is there.
    pub fn reserve(&mut self, key: &str) -> u64 {
        let feed = self.feed(key);
        let id = feed.next_id;
        feed.next_id += 1;
        feed.pending += 1;
        self.last_id = self.last_id.max(id);
        id
    }

    /// Gives back id `id` of channel `key`, whose message could not be
    /// written; the newest reservation first, so that ids stay consecutive.
    pub fn release(&mut self, key: &str, id: u64) {
        if self.is_orphan(key, id) {
            return;
        }
        if let Some(feed) = self.feeds.get_mut(key) {
            feed.pending = feed.pending.saturating_sub(1);
            if feed.next_id == id + 1 {
                feed.next_id = id;
            }
            self.forget_if_idle(key);
        }
    }

    /// Whether `id` may follow channel `key`'s messages (ids increase).
    pub fn follows(&self, key: &str, id: u64) -> bool {
        self.feeds.get(key).is_none_or(|feed| id >= feed.next_id)
    }

    /// Retains `message` (with an id from [`Store::reserve`], or read back
    /// from the store's file) in channel `key` within `limits`, and says
    /// who is to be told.
    pub fn place(&mut self, key: &str, message: Message, limits: &PubsubLimits) -> Published {
        let id = message.id;
        if self.is_orphan(key, id) {
            // Its channel was deleted meanwhile: published, then deleted.
            self.drop_upto(key, id);
            return Published {
                id,
                message: Arc::new(message),
                waiters: Vec::new(),
                bells: Vec::new(),
                evicted: 0,
            };
        }
        let seq = self.next_seq;
        self.next_seq += 1;
        let feed = self
            .feeds
            .entry(key.to_owned())
            .or_insert_with(|| Feed::new(id));
        feed.pending = feed.pending.saturating_sub(1);
        feed.next_id = feed.next_id.max(id + 1);
        let mut message = message;
        message.seq = seq;
        message.cost += 2 * key.len();
        let message = Arc::new(message);
        let waiters = std::mem::take(&mut feed.waiters);
        let bells = feed.listeners.iter().map(|l| l.bell.clone()).collect();
        let cost = message.cost;
        let first = feed.retained.is_empty();
        feed.retained.push_back(Arc::clone(&message));
        feed.bytes += cost;
        self.bytes += cost;
        self.last_id = self.last_id.max(id);
        if first {
            self.oldest.insert(seq, key.to_owned());
        }
        let evicted = self.trim(key, limits, seq);
        Published {
            id,
            message,
            waiters,
            bells,
            evicted,
        }
    }

    /// The first retained message of `key` after cursor `after` (None: no
    /// cursor, the next one to come), and how many were missed before it.
    pub fn next_after(&self, key: &str, after: Option<u64>) -> (Option<Arc<Message>>, u64) {
        match (after, self.feeds.get(key)) {
            (Some(after), Some(feed)) => {
                let (mut messages, missed) = feed.after(after);
                (messages.next().cloned(), missed)
            }
            // Without a cursor, or on a channel with no history, the next
            // message is the one to wait for, and nothing was missed.
            _ => (None, 0),
        }
    }

    /// Whether reservation `id` of channel `key` outlived its channel; it
    /// is forgotten as such.
    fn is_orphan(&mut self, key: &str, id: u64) -> bool {
        !self.orphans.is_empty() && self.orphans.remove(&(key.to_owned(), id))
    }

    /// The largest id given so far.
    pub fn last_id(&self) -> u64 {
        self.last_id
    }

    /// Raises the largest id given so far to `id` (read back from the
    /// store's file), so that new histories start above it.
    pub fn given(&mut self, id: u64) {
        self.last_id = self.last_id.max(id);
    }

    /// Notes from now on what leaves memory, for the store's file to lose
    /// it too ([`Store::take_drops`]); `false` stops noting (shutdown takes
    /// every channel out of memory, not out of the file).
    pub fn track_drops(&mut self, on: bool) {
        self.tracking = on;
    }

    /// What the store's file must lose since the last call: per channel,
    /// the newest id that left memory.
    pub fn take_drops(&mut self) -> Vec<(String, u64)> {
        self.drops.drain().collect()
    }

    /// Gives back drops taken by [`Store::take_drops`] that the file could
    /// not lose yet, for the next commit.
    pub fn keep_drops(&mut self, drops: Vec<(String, u64)>) {
        for (key, upto) in drops {
            let newest = self.drops.entry(key).or_default();
            *newest = (*newest).max(upto);
        }
    }

    /// Notes that channel `key`'s messages up to id `upto` left memory.
    fn drop_upto(&mut self, key: &str, upto: u64) {
        if self.tracking {
            self.keep_drops(vec![(key.to_owned(), upto)]);
        }
    }

    /// Parks a one-shot subscriber on channel `key`.
    pub fn park(&mut self, key: &str, waiter: Waiter) {
        self.feed(key).waiters.push(waiter);
    }

    /// Takes parked subscriber `id` out of channel `key`; false if it was
    /// handed a message (or ended) meanwhile.
    pub fn unpark(&mut self, key: &str, id: u64) -> bool {
        let Some(feed) = self.feeds.get_mut(key) else {
            return false;
        };
        let Some(at) = feed.waiters.iter().position(|w| w.id == id) else {
            return false;
        };
        feed.waiters.swap_remove(at);
        self.forget_if_idle(key);
        true
    }

    /// Pulls what stream `id` has not seen yet, moving its cursor; with a
    /// `bell`, registers the stream first, in the same critical section, so
    /// that nothing published meanwhile is missed or repeated. Fails when the
    /// stream is no longer registered (its channel was deleted).
    pub fn pull(
        &mut self,
        key: &str,
        id: u64,
        cursor: &mut Option<u64>,
        bell: Option<Poster<()>>,
    ) -> Result<Pulled, Reject> {
        let feed = match bell {
            Some(bell) => {
                let feed = self.feed(key);
                feed.listeners.push(Listener { id, bell });
                feed
            }
            None => match self.feeds.get_mut(key) {
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
    pub fn leave(&mut self, key: &str, id: u64) {
        if let Some(feed) = self.feeds.get_mut(key) {
            feed.listeners.retain(|l| l.id != id);
            self.forget_if_idle(key);
        }
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
        self.drop_upto(key, message.id);
        true
    }

    /// Evicts every message older than `max_age`, oldest first; returns how many.
    pub fn expire(&mut self, now: Instant, max_age: Duration) -> usize {
        let mut evicted = 0;
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
            if self.evict_oldest_of(&key) {
                evicted += 1;
            } else {
                self.oldest.remove(&seq);
            }
        }
        evicted
    }

    /// Evicts until channel `key` is within its limits (its newest message
    /// stays whatever its size) and the server within its memory, where the
    /// oldest message of any channel goes first but never message `keep`.
    /// Returns how many were evicted.
    fn trim(&mut self, key: &str, limits: &PubsubLimits, keep: u64) -> usize {
        let mut evicted = 0;
        while let Some(feed) = self.feeds.get(key) {
            let count = feed.retained.len();
            if count <= 1 || (count <= limits.retain_count && feed.bytes <= limits.retain_bytes) {
                break;
            }
            if !self.evict_oldest_of(key) {
                break;
            }
            evicted += 1;
        }
        while self.bytes > limits.memory {
            let Some((&seq, oldest_key)) = self.oldest.first_key_value() else {
                break;
            };
            if seq == keep {
                break;
            }
            let oldest_key = oldest_key.clone();
            if self.evict_oldest_of(&oldest_key) {
                evicted += 1;
            } else {
                // Not reachable while the index is kept right; heal it.
                self.oldest.remove(&seq);
            }
        }
        evicted
    }

    /// Forgets channel `key` if nothing keeps it.
    fn forget_if_idle(&mut self, key: &str) {
        if self.feeds.get(key).is_some_and(Feed::is_idle) {
            self.feeds.remove(key);
        }
    }
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

    fn publish(store: &mut Store, limits: &PubsubLimits, key: &str, body: &[u8]) -> u64 {
        store
            .publish(key, Envelope::default(), body.to_vec(), limits)
            .id
    }

    fn retained(store: &Store, key: &str) -> Vec<Vec<u8>> {
        store.feeds.get(key).map_or(Vec::new(), |feed| {
            feed.retained.iter().map(|m| m.body.clone()).collect()
        })
    }

    #[test]
    fn ids_increase_by_one_and_survive_a_forgotten_channel() {
        let mut store = Store::default();
        let first = publish(&mut store, &limits(), "/a", b"1");
        assert_eq!(publish(&mut store, &limits(), "/a", b"2"), first + 1);
        store.take("/a");
        assert!(publish(&mut store, &limits(), "/a", b"3") > first + 1);
    }

    #[test]
    fn cursors_find_the_next_message_and_count_the_missed() {
        let mut store = Store::default();
        let ids: Vec<u64> = (0..5)
            .map(|i| publish(&mut store, &limits(), "/a", &[i]))
            .collect();
        assert_eq!(retained(&store, "/a"), [vec![2], vec![3], vec![4]]);
        let first = |after| {
            let (message, missed) = store.next_after("/a", Some(after));
            (message.map(|m| m.id), missed)
        };
        assert_eq!(first(ids[2]), (Some(ids[3]), 0));
        assert_eq!(first(ids[0]), (Some(ids[2]), 1));
        assert_eq!(first(0), (Some(ids[2]), 2));
        assert_eq!(first(ids[4]), (None, 0));
        assert_eq!(first(u64::MAX), (None, 0));
    }

    #[test]
    fn retention_is_bounded_per_channel_and_across_channels() {
        let limits = PubsubLimits {
            retain_count: 100,
            retain_bytes: 2500,
            memory: 5000,
            ..limits()
        };
        let mut store = Store::default();
        for _ in 0..4 {
            publish(&mut store, &limits, "/a", &[0; 1000]);
        }
        assert_eq!(retained(&store, "/a").len(), 2);
        for _ in 0..2 {
            publish(&mut store, &limits, "/b", &[1; 1000]);
        }
        publish(&mut store, &limits, "/c", &[2; 1000]);
        // 5 messages of ~1128 bytes exceed 5000: /a's oldest went first.
        assert_eq!(retained(&store, "/a").len(), 1);
        assert_eq!(retained(&store, "/b").len(), 2);
        // The newest message of a channel stays whatever its size.
        let published = store.publish("/d", Envelope::default(), vec![3; 4000], &limits);
        assert!(published.evicted >= 3, "{}", published.evicted);
        assert_eq!(retained(&store, "/d").len(), 1);
        assert!(store.bytes <= 5000);
        assert_eq!(store.feeds.len(), 1);
    }

    #[test]
    fn long_channel_names_count_against_the_memory() {
        let limits = PubsubLimits {
            memory: 64 << 10,
            ..limits()
        };
        let mut store = Store::default();
        for i in 0..100 {
            publish(
                &mut store,
                &limits,
                &format!("/{i}/{}", "x".repeat(1000)),
                b"",
            );
        }
        assert!(store.bytes <= 64 << 10);
        assert!(store.feeds.len() < 32, "{}", store.feeds.len());
    }

    #[test]
    fn old_messages_expire_and_empty_channels_are_forgotten() {
        let mut store = Store::default();
        publish(&mut store, &limits(), "/a", b"x");
        std::thread::sleep(Duration::from_millis(5));
        publish(&mut store, &limits(), "/b", b"y");
        assert_eq!(store.expire(Instant::now(), Duration::from_millis(3)), 1);
        assert!(!store.feeds.contains_key("/a"));
        assert_eq!(store.oldest.len(), 1);
    }

    #[test]
    fn a_released_reservation_leaves_no_gap() {
        let mut store = Store::default();
        let first = publish(&mut store, &limits(), "/a", b"1");
        let a = store.reserve("/a");
        let b = store.reserve("/a");
        assert_eq!((a, b), (first + 1, first + 2));
        store.release("/a", b);
        store.release("/a", a);
        assert_eq!(publish(&mut store, &limits(), "/a", b"2"), first + 1);
        // A reservation keeps a channel without messages from being forgotten.
        let id = store.reserve("/new");
        assert!(store.feeds.contains_key("/new"));
        store.release("/new", id);
        assert!(!store.feeds.contains_key("/new"));
    }

    #[test]
    fn a_channel_deleted_while_its_messages_are_written_stays_deleted() {
        let mut store = Store::default();
        store.track_drops(true);
        let kept = publish(&mut store, &limits(), "/a", b"1");
        let id = store.reserve("/a");
        let failed = store.reserve("/a");
        store.take("/a");
        // Only the placed message leaves the file with the deletion.
        assert_eq!(store.take_drops(), [("/a".to_owned(), kept)]);
        // A subscriber makes the channel anew meanwhile.
        let (_mailbox, wake) = crate::mailbox::Mailbox::new();
        store.park(
            "/a",
            Waiter {
                id: 1,
                missed: 0,
                wake,
            },
        );
        let base = store.feeds["/a"].base;
        assert!(base > failed);
        store.release("/a", failed);
        let published = store.place(
            "/a",
            Message::new(
                id,
                SystemTime::now(),
                Instant::now(),
                Envelope::default(),
                b"2".to_vec(),
            ),
            &limits(),
        );
        assert!(published.waiters.is_empty() && published.bells.is_empty());
        assert!(store.feeds["/a"].retained.is_empty());
        assert_eq!(store.feeds["/a"].next_id, base);
        assert_eq!(store.take_drops(), [("/a".to_owned(), id)]);
        assert!(store.orphans.is_empty());
        // The new history goes on as if nothing happened: its subscriber
        // gets its first message.
        assert_eq!(store.feeds["/a"].waiters.len(), 1);
        let first = store.publish("/a", Envelope::default(), b"3".to_vec(), &limits());
        assert_eq!((first.id, first.waiters.len()), (base, 1));
    }

    #[test]
    fn what_leaves_memory_is_noted_for_the_file() {
        let mut store = Store::default();
        publish(&mut store, &limits(), "/quiet", b"0");
        assert_eq!(store.take_drops(), []);
        store.track_drops(true);
        let ids: Vec<u64> = (0..5)
            .map(|i| publish(&mut store, &limits(), "/a", &[i]))
            .collect();
        // Three retained: the first two were evicted.
        assert_eq!(store.take_drops(), [("/a".to_owned(), ids[1])]);
        assert_eq!(store.take_drops(), []);
        store.take("/a");
        assert_eq!(store.take_drops(), [("/a".to_owned(), ids[4])]);
        store.keep_drops(vec![("/b".to_owned(), 7), ("/b".to_owned(), 3)]);
        assert_eq!(store.take_drops(), [("/b".to_owned(), 7)]);
        // Shutdown takes channels out of memory, not out of the file.
        store.track_drops(false);
        store.take("/quiet");
        assert_eq!(store.take_drops(), []);
    }

    #[test]
    fn taking_a_channel_out_keeps_the_accounts_right() {
        let mut store = Store::default();
        publish(&mut store, &limits(), "/a", b"x");
        publish(&mut store, &limits(), "/b", b"y");
        let before = store.bytes;
        let feed = store.take("/a").expect("channel /a");
        assert_eq!(store.bytes, before - feed.bytes);
        assert_eq!(store.oldest.len(), 1);
        assert_eq!(store.keys(), vec!["/b".to_owned()]);
    }
}
