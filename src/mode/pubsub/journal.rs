//! The pubsub store's writer (`--store FILE`): one thread that writes
//! published messages to the file in groups, and only then shows them to
//! subscribers and answers their publishers.
//!
//! A publisher hands its message to the writer and waits. The writer takes
//! every message waiting at once as one group: it reserves their ids under
//! the registry lock, commits them in one transaction (with the rows that
//! retention dropped since the last one) outside it, then places them in
//! memory under the lock again and hands each publisher its [`Published`]
//! (who is to be told) or the reason the write failed. While it commits,
//! the next group gathers: the busier the channel, the larger the groups,
//! and one commit serves them all.
//!
//! So a message a subscriber saw is in the file, a publisher's 200 means
//! the message is in the file, and a failed write leaves nothing behind:
//! not in memory, not in the file, and no id skipped (the reserved ids are
//! given back, newest first). Memory keeps serving what it holds.
//!
//! The writer waits as every hot wait does (`mailbox.rs`): parked at once,
//! rung by the publisher that finds the inbox empty.

use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant, SystemTime};

use super::store::{Message, Published, Store};
use crate::config::PubsubLimits;
use crate::error::Reject;
use crate::mailbox::{Empty, Mailbox, Poster};
use crate::metrics::Stats;
use crate::mode::envelope::Envelope;
use crate::registry::Registry;
use crate::store::{Disk, OpenError, Sync, WriteError, Written};

/// The most messages one commit takes.
const GROUP: usize = 512;

/// How often an idle writer looks for rows to delete (messages evicted or
/// expired, channels deleted) when nothing is published.
const TICK: Duration = Duration::from_secs(1);

/// The store, read back: the file and what memory holds of it.
pub struct Restored {
    pub disk: Disk,
    pub store: Store,
    /// Messages read back into memory, and their channels.
    pub messages: usize,
    pub channels: usize,
}

/// The running writer.
pub struct Journal {
    inbox: Arc<Inbox>,
    writer: Mutex<Option<JoinHandle<()>>>,
}

/// Messages on their way to the writer.
struct Inbox {
    /// Guards the entries; held to push one or to take a group, never
    /// across I/O.
    waiting: Mutex<Waiting>,
    /// Rung by the publisher that finds no entry waiting (and by
    /// [`Journal::finish`]): the writer may be asleep.
    bell: Poster<()>,
}

struct Waiting {
    entries: Vec<Entry>,
    /// False once [`Journal::finish`] began: nothing new is taken.
    open: bool,
}

/// A message on its way to the file.
struct Entry {
    key: String,
    time: SystemTime,
    published: Instant,
    envelope: Envelope,
    body: Vec<u8>,
    reply: Poster<Result<Published, Reject>>,
}

/// Opens the store at `path` and reads it back within `limits`: messages
/// older than the retention age stay behind (and leave the file at the
/// first commit), the others are retained as they were, with their ids.
pub fn restore(path: &Path, sync: Sync, limits: &PubsubLimits) -> Result<Restored, OpenError> {
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
    /// Starts the writer on `disk`, for the channels in `registry`.
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
        };
        // The mailbox is the writer thread's own: it is made there, and its
        // bell handed back.
        let (bell_sender, bell) = std::sync::mpsc::sync_channel(1);
        let writer = thread::Builder::new().name("store".into()).spawn(move || {
            let (mailbox, bell) = Mailbox::new();
            let inbox = Arc::new(Inbox {
                waiting: Mutex::new(Waiting {
                    entries: Vec::new(),
                    open: true,
                }),
                bell,
            });
            if bell_sender.send(Arc::clone(&inbox)).is_ok() {
                writer.run(&inbox, &mailbox);
            }
        })?;
        let inbox = bell
            .recv()
            .map_err(|_| std::io::Error::other("the store's writer did not start"))?;
        Ok(Journal {
            inbox,
            writer: Mutex::new(Some(writer)),
        })
    }

    /// Writes a message to channel `key` and, once it is in the file,
    /// publishes it: waits for its group's commit.
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
        let first = {
            let mut waiting = self.inbox.lock();
            if !waiting.open {
                return Err(Reject::shutting_down());
            }
            waiting.entries.push(entry);
            waiting.entries.len() == 1
        };
        if first {
            // A bell already rung says the same.
            let _ = self.inbox.bell.post(());
        }
        // The writer answers every entry it takes, and takes every entry
        // before it stops: the wait ends unless the writer died (then its
        // posters are dropped).
        mailbox
            .wait(None)
            .unwrap_or_else(|_| Err(Reject::new(503, "the store's writer stopped")))
    }

    /// Writes what is left (messages on their way, rows to delete) and
    /// stops the writer; publishes from now on get 503.
    pub fn finish(&self) {
        self.inbox.lock().open = false;
        let _ = self.inbox.bell.post(());
        let writer = self.writer.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(writer) = writer {
            let _ = writer.join();
        }
    }
}

impl Inbox {
    fn lock(&self) -> MutexGuard<'_, Waiting> {
        self.waiting.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The writer thread's state.
struct Writer {
    disk: Disk,
    registry: Arc<Registry<Store>>,
    limits: PubsubLimits,
    stats: Arc<Stats>,
}

impl Writer {
    fn run(mut self, inbox: &Inbox, bell: &Mailbox<()>) {
        // However the writer ends (a panic included), nothing more is
        // taken, and publishers still waiting are let go (their wait ends
        // with 503 when their entries are dropped).
        struct Closing<'a>(&'a Inbox);
        impl Drop for Closing<'_> {
            fn drop(&mut self) {
                let mut waiting = self.0.lock();
                waiting.open = false;
                waiting.entries.clear();
            }
        }
        let _closing = Closing(inbox);
        loop {
            let (group, open) = {
                let mut waiting = inbox.lock();
                let take = waiting.entries.len().min(GROUP);
                (
                    waiting.entries.drain(..take).collect::<Vec<_>>(),
                    waiting.open,
                )
            };
            if !group.is_empty() {
                self.write(group);
                continue;
            }
            if !open {
                break;
            }
            if let Err(Empty::Timeout) = bell.wait(Some(Instant::now() + TICK)) {
                self.tidy();
            }
        }
        self.tidy();
        log::info!(
            "store {}: closed with {} messages",
            self.disk.path().display(),
            self.disk.rows()
        );
    }

    /// Commits `group`, then places its messages in memory and answers
    /// their publishers; on a failure, gives their ids back and answers
    /// each with the reason.
    fn write(&mut self, group: Vec<Entry>) {
        let (ids, drops, last_id) = {
            let mut store = self.registry.lock_even_closed();
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
        match result {
            Ok(()) => {
                let published: Vec<(Published, Poster<_>)> = {
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
                            (store.place(&entry.key, message, &self.limits), entry.reply)
                        })
                        .collect()
                };
                for (published, reply) in published {
                    let _ = reply.post(Ok(published));
                }
            }
            Err(error) => {
                {
                    let mut store = self.registry.lock_even_closed();
                    for (entry, &id) in group.iter().zip(&ids).rev() {
                        store.release(&entry.key, id);
                    }
                    store.keep_drops(drops);
                }
                let reject = refusal(&error);
                for entry in group {
                    let _ = entry.reply.post(Err(reject.clone()));
                }
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
        if self.commit(&[], &drops, last_id).is_err() {
            self.registry.lock_even_closed().keep_drops(drops);
        }
    }

    /// One commit, timed and counted; a failure is logged.
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
            Err(error) => {
                self.stats.store_failed();
                log::warn!(
                    "store {}: {} messages not published: {error}",
                    self.disk.path().display(),
                    written.len()
                );
            }
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
