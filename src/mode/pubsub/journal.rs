//! The pubsub store's journal (`--store FILE`): published messages are
//! written to the file in groups, and only then shown to subscribers and
//! answered to their publishers.
//!
//! Group commit: a publisher puts its message in the inbox. If nobody is
//! committing, it commits itself, at once: it takes the waiting messages
//! (its own first) as one group, reserves their ids under the registry
//! lock, commits them in one transaction (with the rows that retention
//! dropped since the last one) outside it, then places them in memory under
//! the lock again and posts each publisher its [`Published`] (who is to be
//! told) or the reason the write failed. If more messages came meanwhile,
//! it hands the lead to the journal's writer thread, which commits group
//! after group, each made of what arrived while the previous one ran, until
//! the inbox is empty, and then sleeps. So a lone publisher commits its own
//! message without waking anyone, and under load one thread that rarely
//! sleeps commits for everyone, each publisher woken once for its answer.
//! Both wait as every hot wait does (`mailbox.rs`): parked at once.
//!
//! A message a subscriber saw is in the file, a publisher's 200 means the
//! message is in the file, and a failed write leaves nothing behind: not in
//! memory, not in the file, and no id skipped (the reserved ids are given
//! back, newest first). Memory keeps serving what it holds.
//!
//! Rows that left memory (evicted, expired, a deleted channel) leave the
//! file with the next commit; a DELETE and shutdown commit at once.

use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant, SystemTime};

use super::store::{Message, Published, Store};
use crate::config::PubsubLimits;
use crate::error::Reject;
use crate::mailbox::{Mailbox, Poster};
use crate::metrics::Stats;
use crate::mode::envelope::Envelope;
use crate::registry::Registry;
use crate::store::{Disk, OpenError, SyncMode, WriteError, Written};

/// The most messages one commit takes.
const GROUP: usize = 512;

/// The least time between two lines about failed commits.
const WARN_EVERY: Duration = Duration::from_secs(10);

/// How long shutdown waits for a publisher's commit to end (one commit
/// takes well under a millisecond), within the relay's 2 s to exit.
const FINISH_LIMIT: Duration = Duration::from_millis(400);

/// The store, read back: the file and what memory holds of it.
pub struct Restored {
    /// The file, open and checked.
    pub disk: Disk,
    /// The channels with the messages read back.
    pub store: Store,
    /// How many messages were read back into memory.
    pub messages: usize,
    /// On how many channels.
    pub channels: usize,
}

/// The store's file and the messages on their way to it.
pub struct Journal {
    shared: Arc<Shared>,
    /// The writer thread, joined at shutdown.
    thread: Mutex<Option<JoinHandle<()>>>,
}

/// What publishers and the writer thread share.
struct Shared {
    /// Guards the waiting messages and who leads; held to push one, take a
    /// group or pass the lead, never across I/O or a commit.
    inbox: Mutex<Inbox>,
    /// The file, held for a commit (by whoever leads, a DELETE or
    /// shutdown); None once shutdown closed it.
    writer: Mutex<Option<Writer>>,
    /// Rung to hand the writer thread the lead (or to stop it).
    bell: Poster<()>,
}

/// The messages waiting to be committed, and who commits them.
struct Inbox {
    /// In the order they came; a group is taken from the front.
    entries: Vec<Entry>,
    lead: Lead,
    /// False once shutdown began: nothing new is taken.
    open: bool,
}

/// Who commits the waiting messages. While the inbox holds any, someone does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Lead {
    Nobody,
    /// The publisher that found nobody committing: one group, its own.
    Publisher,
    /// The journal's thread: group after group until the inbox is empty.
    Thread,
}

/// A message on its way to the file.
struct Entry {
    key: String,
    time: SystemTime,
    published: Instant,
    envelope: Envelope,
    body: Vec<u8>,
    reply: Poster<Answer>,
}

/// What a publisher is told: its message was published, or why not.
type Answer = Result<Published, Reject>;

/// Opens the store at `path` and reads it back within `limits`: messages
/// older than the retention age stay behind (and leave the file at the
/// first commit), the others are retained as they were, with their ids.
pub fn restore(path: &Path, sync: SyncMode, limits: &PubsubLimits) -> Result<Restored, OpenError> {
    let disk = Disk::open(path, sync)?;
    let mut store = Store::default();
    store.track_drops(true);
    let (mut messages, mut out_of_order) = (0, 0);
    let now = (SystemTime::now(), Instant::now());
    let last_id = disk.restore(|row| {
        let age = now.0.duration_since(row.time).unwrap_or_default();
        if age >= limits.retain_age {
            // Older than the retention allows now: it leaves the file too
            // (with the channel's older ones) at the first commit.
            store.keep_drops(vec![(row.channel, row.id)]);
            return;
        }
        if !store.follows(&row.channel, row.id) {
            out_of_order += 1;
            return;
        }
        // A message older than this boot keeps its age from the restart.
        let published = now.1.checked_sub(age).unwrap_or(now.1);
        let message = Message::new(row.id, row.time, published, row.envelope, row.body);
        store.place(&row.channel, message, limits);
        messages += 1;
    })?;
    if out_of_order > 0 {
        log::warn!(
            "store {}: {out_of_order} rows with ids out of order were skipped",
            path.display()
        );
    }
    store.given(last_id);
    let channels = store.views().len();
    Ok(Restored {
        disk,
        store,
        messages,
        channels,
    })
}

impl Journal {
    /// The journal of `disk`, for the channels in `registry`: starts its
    /// writer thread.
    pub fn start(
        disk: Disk,
        registry: Arc<Registry<Store>>,
        limits: PubsubLimits,
        stats: Arc<Stats>,
    ) -> std::io::Result<Journal> {
        stats.store_written(disk.size(), disk.rows());
        let writer = Writer {
            disk,
            registry,
            limits,
            stats,
            warned: None,
            unlogged: 0,
        };
        // The bell's mailbox belongs to the writer thread: it is made
        // there, and the shared state handed back.
        let (handed, shared) = std::sync::mpsc::sync_channel(1);
        let thread = thread::Builder::new().name("store".into()).spawn(move || {
            let (bell, poster) = Mailbox::new();
            let shared = Arc::new(Shared {
                inbox: Mutex::new(Inbox {
                    entries: Vec::new(),
                    lead: Lead::Nobody,
                    open: true,
                }),
                writer: Mutex::new(Some(writer)),
                bell: poster,
            });
            if handed.send(Arc::clone(&shared)).is_ok() {
                shared.serve(&bell);
            }
        })?;
        let shared = shared
            .recv()
            .map_err(|_| std::io::Error::other("the store's writer did not start"))?;
        Ok(Journal {
            shared,
            thread: Mutex::new(Some(thread)),
        })
    }

    /// Writes a message to channel `key` and, once it is in the file,
    /// publishes it: commits it at once if nobody is committing, else
    /// waits for the group it joins.
    pub fn publish(
        &self,
        key: &str,
        envelope: Envelope,
        body: Vec<u8>,
    ) -> Result<Published, Reject> {
        let (mailbox, reply) = Mailbox::new();
        let entry = Entry {
            key: key.to_owned(),
            time: SystemTime::now(),
            published: Instant::now(),
            envelope,
            body,
            reply,
        };
        let shared = &self.shared;
        let lead = {
            let mut inbox = shared.inbox();
            if !inbox.open {
                return Err(Reject::shutting_down());
            }
            inbox.entries.push(entry);
            let lead = inbox.lead == Lead::Nobody;
            if lead {
                inbox.lead = Lead::Publisher;
            }
            lead
        };
        if lead {
            // A commit that panics hands the lead on rather than leave the
            // publishers after it led by no one.
            struct HandOn<'a>(&'a Shared);
            impl Drop for HandOn<'_> {
                fn drop(&mut self) {
                    if thread::panicking() {
                        self.0.inbox().lead = Lead::Thread;
                        let _ = self.0.bell.post(());
                    }
                }
            }
            let _hand_on = HandOn(shared);
            shared.commit_group();
            // Decided under the lock that a new entry takes: it never finds
            // a leader that is about to leave.
            let mut inbox = shared.inbox();
            if inbox.entries.is_empty() {
                inbox.lead = Lead::Nobody;
            } else {
                inbox.lead = Lead::Thread;
                drop(inbox);
                // A bell already rung says the same.
                let _ = shared.bell.post(());
            }
        }
        // Every entry is answered, or dropped with its poster (a commit
        // that panicked): the wait ends.
        mailbox
            .wait(None)
            .unwrap_or_else(|_| Err(Reject::new(503, "the store's writer stopped")))
    }

    /// Deletes from the file at once what left memory (a DELETE's
    /// channels), rather than at the next commit. If the file cannot, it
    /// is logged, and the next commit tries again.
    pub fn tidy(&self) {
        if let Some(writer) = self.shared.writer().as_mut() {
            writer.tidy();
        }
    }

    /// Lets the commits under way finish, writes what is left and closes
    /// the file; publishes from now on get 503.
    pub fn finish(&self) {
        self.shared.inbox().open = false;
        let _ = self.shared.bell.post(());
        let thread = self.thread.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(thread) = thread {
            let _ = thread.join();
        }
    }
}

impl Shared {
    /// The writer thread: commits group after group whenever it is handed
    /// the lead; at shutdown, the rest, and closes the file.
    fn serve(&self, bell: &Mailbox<()>) {
        // However it ends (a panic included), nothing more is taken and
        // the publishers waiting are let go (their entries are dropped: 503).
        struct Closing<'a>(&'a Shared);
        impl Drop for Closing<'_> {
            fn drop(&mut self) {
                let mut inbox = self.0.inbox();
                inbox.open = false;
                inbox.entries.clear();
                inbox.lead = Lead::Thread;
            }
        }
        let _closing = Closing(self);
        loop {
            // The only poster is `self.bell`, alive as long as `self`.
            let _ = bell.wait(None);
            loop {
                {
                    let mut inbox = self.inbox();
                    if inbox.lead != Lead::Thread {
                        break;
                    }
                    if inbox.entries.is_empty() {
                        inbox.lead = Lead::Nobody;
                        break;
                    }
                }
                self.commit_group();
            }
            if !self.inbox().open {
                break;
            }
        }
        // Shutdown: let a publisher's commit end, then take the lead for good.
        let deadline = Instant::now() + FINISH_LIMIT;
        loop {
            {
                let mut inbox = self.inbox();
                if inbox.lead != Lead::Publisher || Instant::now() >= deadline {
                    inbox.lead = Lead::Thread;
                    break;
                }
            }
            thread::sleep(Duration::from_millis(2));
        }
        while !self.inbox().entries.is_empty() {
            self.commit_group();
        }
        if let Some(mut writer) = self.writer().take() {
            writer.tidy();
            log::info!(
                "store {}: closed with {} messages",
                writer.disk.path().display(),
                writer.disk.rows()
            );
        }
    }

    /// Commits the first waiting entries as one group and answers their
    /// publishers.
    fn commit_group(&self) {
        let answers = {
            let mut writer = self.writer();
            let group = {
                let mut inbox = self.inbox();
                let take = inbox.entries.len().min(GROUP);
                inbox.entries.drain(..take).collect::<Vec<_>>()
            };
            match writer.as_mut() {
                Some(writer) => writer.write(group),
                None => group
                    .into_iter()
                    .map(|entry| (entry.reply, Err(Reject::shutting_down())))
                    .collect(),
            }
        };
        for (reply, answer) in answers {
            let _ = reply.post(answer);
        }
    }

    fn inbox(&self) -> MutexGuard<'_, Inbox> {
        self.inbox.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn writer(&self) -> MutexGuard<'_, Option<Writer>> {
        self.writer.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The file, and what committing to it needs.
struct Writer {
    disk: Disk,
    registry: Arc<Registry<Store>>,
    limits: PubsubLimits,
    stats: Arc<Stats>,
    /// When a failure was last logged, and how many were not since: a full
    /// disk fails every commit, and the log may live on that disk.
    warned: Option<Instant>,
    unlogged: u64,
}

impl Writer {
    /// Commits `group`, then places its messages in memory; on a failure,
    /// gives their ids back. Returns what each publisher is to be told.
    /// Once shutdown closed the channels, nothing more is written (503).
    fn write(&mut self, group: Vec<Entry>) -> Vec<(Poster<Answer>, Answer)> {
        let (ids, drops, last_id) = {
            let Ok(mut store) = self.registry.lock() else {
                return group
                    .into_iter()
                    .map(|entry| (entry.reply, Err(Reject::shutting_down())))
                    .collect();
            };
            // Expired messages leave the file with this commit.
            let evicted = store.expire(Instant::now(), self.limits.retain_age);
            self.stats.evicted(evicted as u64);
            let ids: Vec<u64> = group.iter().map(|e| store.reserve(&e.key)).collect();
            (ids, store.take_drops(), store.last_id())
        };
        let written: Vec<Written<'_>> = group
            .iter()
            .zip(&ids)
            .map(|(entry, &id)| Written {
                channel: &entry.key,
                id,
                time: entry.time,
                envelope: &entry.envelope,
                body: &entry.body,
            })
            .collect();
        let result = self.commit(&written, &drops, last_id);
        drop(written);
        if let Err(error) = &result {
            let what = format!("{} messages not published: {error}", group.len());
            self.warn(&what);
        }
        match result {
            Ok(()) => {
                let mut store = self.registry.lock_even_closed();
                group
                    .into_iter()
                    .zip(ids)
                    .map(|(entry, id)| {
                        let message = Message::new(
                            id,
                            entry.time,
                            entry.published,
                            entry.envelope,
                            entry.body,
                        );
                        let published = store.place(&entry.key, message, &self.limits);
                        (entry.reply, Ok(published))
                    })
                    .collect()
            }
            Err(error) => {
                let mut store = self.registry.lock_even_closed();
                for (entry, &id) in group.iter().zip(&ids).rev() {
                    store.release(&entry.key, id);
                }
                store.keep_drops(drops);
                drop(store);
                let reject = refusal(&error);
                group
                    .into_iter()
                    .map(|entry| (entry.reply, Err(reject.clone())))
                    .collect()
            }
        }
    }

    /// Evicts expired messages and deletes from the file what left memory.
    fn tidy(&mut self) {
        let (drops, last_id) = {
            let mut store = self.registry.lock_even_closed();
            let evicted = store.expire(Instant::now(), self.limits.retain_age);
            self.stats.evicted(evicted as u64);
            (store.take_drops(), store.last_id())
        };
        if drops.is_empty() {
            return;
        }
        if let Err(error) = self.commit(&[], &drops, last_id) {
            self.warn(&format!(
                "rows that left memory stay in the file until the next commit: {error}"
            ));
            self.registry.lock_even_closed().keep_drops(drops);
        }
    }

    /// Logs a failure, at most once per [`WARN_EVERY`] (the counters count
    /// every one), saying how many went unlogged since.
    fn warn(&mut self, what: &str) {
        let now = Instant::now();
        if self.warned.is_some_and(|at| now < at + WARN_EVERY) {
            self.unlogged += 1;
            return;
        }
        let unlogged = std::mem::take(&mut self.unlogged);
        let since = if unlogged > 0 {
            format!(" ({unlogged} more failures since the last line)")
        } else {
            String::new()
        };
        log::warn!("store {}: {what}{since}", self.disk.path().display());
        self.warned = Some(now);
    }

    /// One commit, timed and counted.
    fn commit(
        &mut self,
        written: &[Written<'_>],
        drops: &[(String, u64)],
        last_id: u64,
    ) -> Result<(), WriteError> {
        let started = Instant::now();
        let result = self.disk.commit(written, drops, last_id);
        match &result {
            Ok(()) => {
                self.stats.store_committed(started.elapsed());
                self.stats.store_written(self.disk.size(), self.disk.rows());
            }
            Err(_) => self.stats.store_failed(),
        }
        result
    }
}

/// What a publisher is told when its group could not be written: 507 for
/// a full disk, 503 for any other failure; both may be retried.
fn refusal(error: &WriteError) -> Reject {
    let status = match error {
        WriteError::Full(_) => 507,
        WriteError::Failed(_) => 503,
    };
    Reject::new(status, format!("{error}: the message was not published"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> PubsubLimits {
        PubsubLimits {
            retain_count: 10_000,
            retain_bytes: 1 << 30,
            retain_age: Duration::from_secs(3600),
            memory: 1 << 30,
            max_message: 1 << 20,
        }
    }

    /// A fresh scratch directory for test `name`.
    fn scratch(name: &str) -> std::path::PathBuf {
        let dir =
            std::env::temp_dir().join(format!("patchcord-journal-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("scratch dir");
        dir
    }

    #[test]
    fn a_publisher_commits_within_half_a_connection_threads_stack() {
        // A lone publisher commits on its connection's thread (128 KiB of
        // stack): SQLite's parsing, writing, checkpointing and vacuuming
        // must fit with room to spare, here in a debug build.
        let dir = scratch("stack");
        let path = dir.join("pubsub.db");
        let small = thread::Builder::new()
            .stack_size(crate::server::STACK_SIZE / 2)
            .spawn(move || {
                let limits = PubsubLimits {
                    retain_count: 5,
                    ..limits()
                };
                let restored = restore(&path, SyncMode::Full, &limits).expect("new store");
                let registry = Arc::new(Registry::new(restored.store));
                let journal = Journal::start(
                    restored.disk,
                    Arc::clone(&registry),
                    limits,
                    Arc::new(Stats::new()),
                )
                .expect("journal");
                // 1,500 pages and more: the WAL is checkpointed on the way.
                for i in 0..1500u32 {
                    let key = format!("/c{}", i % 50);
                    let body = vec![b'x'; 4000];
                    journal
                        .publish(&key, Envelope::text(), body)
                        .expect("published");
                }
                registry.remove_under("/");
                journal.tidy();
                journal.finish();
            })
            .expect("thread");
        small.join().expect("no overflow");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn concurrent_publishers_each_get_their_own_consecutive_id() {
        let dir = scratch("concurrent");
        let path = dir.join("pubsub.db");
        let restored = restore(&path, SyncMode::Normal, &limits()).expect("new store");
        let registry = Arc::new(Registry::new(restored.store));
        let journal = Journal::start(
            restored.disk,
            Arc::clone(&registry),
            limits(),
            Arc::new(Stats::new()),
        )
        .expect("journal");
        let ids: Vec<(String, u64)> = thread::scope(|scope| {
            let publishers: Vec<_> = (0..8)
                .map(|p| {
                    let journal = &journal;
                    scope.spawn(move || {
                        (0..200)
                            .map(|i| {
                                let key = format!("/c{}", (p + i) % 4);
                                let body = format!("{p} {i}").into_bytes();
                                let published = journal
                                    .publish(&key, Envelope::text(), body)
                                    .expect("published");
                                (key, published.id)
                            })
                            .collect::<Vec<_>>()
                    })
                })
                .collect();
            publishers
                .into_iter()
                .flat_map(|p| p.join().expect("publisher"))
                .collect()
        });
        journal.finish();
        assert!(
            journal
                .publish("/c0", Envelope::text(), Vec::new())
                .is_err()
        );
        // Per channel: 400 distinct ids, consecutive.
        for channel in 0..4 {
            let key = format!("/c{channel}");
            let mut mine: Vec<u64> = ids
                .iter()
                .filter(|(k, _)| *k == key)
                .map(|(_, id)| *id)
                .collect();
            mine.sort_unstable();
            assert_eq!(mine.len(), 400, "{key}");
            assert!(mine.windows(2).all(|w| w[1] == w[0] + 1), "{key}: {mine:?}");
        }
        // The file holds them all, and reads back as memory held them.
        let again = restore(&path, SyncMode::Normal, &limits()).expect("reopened");
        assert_eq!(again.messages, 1600);
        assert_eq!(again.disk.rows(), 1600);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
