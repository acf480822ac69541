//! Pubsub channels: POST/PUT publishes at once, GET receives the next message,
//! and every channel keeps its recent messages so that a subscriber that
//! comes back with a cursor (`?after=ID`, `Last-Event-ID`) misses nothing.
//!
//! - `store.rs`: what channels keep (pure: retention, ids, cursors)
//! - `journal.rs`: with `--store`, the writer that puts messages in the
//!   store's file before memory shows them
//! - `stream.rs`: the writing side of a streaming subscription
//! - `format.rs`: raw, SSE and NDJSON encodings of messages
//!
//! Who gets what, decided under the registry lock in microseconds, told
//! after it is released:
//! - a parked one-shot GET ([`Waiter`]) is handed the message itself, once;
//! - a streaming subscription keeps its own cursor and is only rung; it
//!   pulls what is new from the retained messages and writes it on its own
//!   thread, so a slow one never slows the publisher or the others, and
//!   holds no queue of its own: when it falls behind the retention, it is
//!   told how many messages it missed.

pub mod format;
mod journal;
pub mod store;
mod stream;

pub use journal::{Restored, restore};

use std::io::{self, Read};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::config::PubsubLimits;
use crate::error::Reject;
use crate::http::{Exchange, Head};
use crate::mailbox::Mailbox;
use crate::metrics::Stats;
use crate::mode::envelope::Envelope;
use crate::mode::wait::{Sleep, Waited, wait};
use crate::mode::{ChannelView, Family, deadline, short, took};
use crate::registry::{Guard, Registry};
use crate::route::{Action, CHANNEL_METHODS, Channel, Mode, Query, Routed};
use format::Format;
use journal::Journal;
use store::{Feed, Store, Waiter, Wake};

/// Every pubsub channel.
pub struct Pubsub {
    /// Shared with the journal, whose commits place messages in it.
    registry: Arc<Registry<Store>>,
    /// With `--store`: writes each message to the file before it is published.
    journal: Option<Journal>,
    limits: PubsubLimits,
    max_wait: Option<Duration>,
    keepalive: Duration,
    next_subscriber: AtomicU64,
    stats: Arc<Stats>,
}

impl Pubsub {
    /// The channels `restored` from the store's file (and its journal), or
    /// none yet. Fails if the journal's writer thread cannot be started.
    pub fn new(
        stats: Arc<Stats>,
        limits: PubsubLimits,
        max_wait: Option<Duration>,
        keepalive: Duration,
        restored: Option<Restored>,
    ) -> std::io::Result<Pubsub> {
        let (registry, journal) = match restored {
            Some(restored) => {
                let registry = Arc::new(Registry::new(restored.store));
                let journal = Journal::start(
                    restored.disk,
                    Arc::clone(&registry),
                    limits.clone(),
                    Arc::clone(&stats),
                )?;
                (registry, Some(journal))
            }
            None => (Arc::default(), None),
        };
        Ok(Pubsub {
            registry,
            journal,
            limits,
            max_wait,
            keepalive,
            next_subscriber: AtomicU64::new(1),
            stats,
        })
    }

    /// The store, locked and refreshed (expired messages evicted), unless closed.
    fn open(&self) -> Result<Guard<'_, Store>, Reject> {
        let mut store = self.registry.lock().map_err(|_| Reject::shutting_down())?;
        let evicted = store.expire(Instant::now(), self.limits.retain_age);
        self.stats.evicted(evicted as u64);
        Ok(store)
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
                    log::debug!("pubsub {}: publisher hung up mid-body: {error}", short(key));
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
        let published = match &self.journal {
            Some(journal) => journal.publish(key, envelope, body)?,
            None => self.open()?.publish(key, envelope, body, &self.limits),
        };
        let id = published.id;
        self.stats.published();
        self.stats.evicted(published.evicted as u64);
        self.stats.unpark(Mode::Pubsub, published.waiters.len());
        let mut handed = published.bells.len();
        for waiter in published.waiters {
            let wake = Wake::Message {
                message: Arc::clone(&published.message),
                missed: waiter.missed,
            };
            handed += usize::from(waiter.wake.post(wake).is_ok());
        }
        for bell in published.bells {
            // A bell already rung says "pull" all the same: nothing is lost.
            let _ = bell.post(());
        }
        log::info!(
            "pubsub {}: message {id} ({bytes} bytes) handed to {handed} subscribers in {}",
            short(key),
            took(ex.started())
        );
        let mut head = Head::new(200);
        head.header("Patch-Id", id.to_string())
            .header("Patch-Subscribers", handed.to_string());
        if let Err(error) = ex.respond(head, b"") {
            log::debug!(
                "pubsub {}: publisher hung up before its answer: {error}",
                short(key)
            );
            ex.close();
        }
        Ok(())
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
        let (mailbox, wake) = Mailbox::new();
        let found = {
            let mut store = self.open()?;
            let (next, missed) = store.next_after(key, cursor);
            if next.is_none() {
                if !may_park {
                    return Err(no_message());
                }
                store.park(key, Waiter { id, missed, wake });
                self.stats.park(Mode::Pubsub);
            }
            next.map(|message| (message, missed))
        };
        let (message, missed) = match found {
            Some(found) => found,
            None => {
                log::debug!("pubsub {}: subscriber {id} waiting", short(key));
                // Woken to answer and carry on: blind.
                let waited = wait(&mailbox, ex, deadline, Sleep::Blind, || {
                    self.unpark(key, id)
                });
                match waited {
                    Waited::Got(Wake::Message { message, missed }) => (message, missed),
                    Waited::Got(Wake::Ended(reject)) => return Err(reject),
                    Waited::TimedOut => return Err(no_message()),
                    Waited::HungUp => {
                        log::debug!(
                            "pubsub {}: subscriber {id} hung up while waiting",
                            short(key)
                        );
                        self.stats.hung_up();
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
        match ex.respond(head, &message.body) {
            Ok(()) => self.stats.delivered(1),
            Err(error) => {
                log::debug!(
                    "pubsub {}: subscriber {id} hung up before its message: {error}",
                    short(key)
                );
                ex.close();
            }
        }
        Ok(())
    }

    /// Takes parked subscriber `id` out of channel `key`; false if it was
    /// handed a message meanwhile.
    fn unpark(&self, key: &str, id: u64) -> bool {
        let removed = self.registry.lock_even_closed().unpark(key, id);
        if removed {
            self.stats.unpark(Mode::Pubsub, 1);
        }
        removed
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
        let (bell, ringer) = Mailbox::new();
        let first = self.open()?.pull(key, id, &mut cursor, Some(ringer))?;
        self.stats.stream_started();
        log::debug!("pubsub {}: stream {id} ({format:?}) started", short(key));
        let pull = || self.open()?.pull(key, id, &mut cursor, None);
        let ended = stream::follow(
            ex,
            format,
            query.mime.as_deref(),
            first,
            &bell,
            self.keepalive,
            pull,
            &self.stats,
        );
        self.stats.stream_ended();
        match ended {
            stream::Ended::HungUp => {
                log::debug!("pubsub {}: stream {id} hung up", short(key));
                self.registry.lock_even_closed().leave(key, id);
            }
            stream::Ended::By(reject) => {
                log::debug!(
                    "pubsub {}: stream {id} ended: {}",
                    short(key),
                    reject.reason
                );
            }
        }
        ex.close();
        Ok(())
    }
}

impl Family for Pubsub {
    fn serves(&self, mode: Mode) -> bool {
        mode == Mode::Pubsub
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
            Action::Send => self.publish(ex, &channel.pair_key(), query),
            Action::Receive => self.subscribe(ex, &channel.pair_key(), query),
            _ => Err(Reject::method_not_allowed(CHANNEL_METHODS)),
        }
    }

    /// Deletes the channels with what they retain: waiters get `reject`,
    /// streams end.
    fn end_under(&self, prefix: &str, reject: &Reject) -> (usize, usize) {
        let ended = self.end(self.registry.remove_under(prefix), reject);
        if let Some(journal) = &self.journal {
            journal.tidy();
        }
        ended
    }

    /// Waiters get 503, streams end. The store's file keeps every message.
    fn close(&self) -> usize {
        self.registry.lock_even_closed().track_drops(false);
        self.end(self.registry.close(), &Reject::shutting_down()).1
    }

    /// Writes what is left to the store's file and closes it.
    fn finish(&self) {
        if let Some(journal) = &self.journal {
            journal.finish();
        }
    }

    /// Hook channels (`/h/<name>`, `/r/<name>`) are capabilities, never listed.
    fn channels(&self) -> Vec<ChannelView> {
        self.registry
            .lock_even_closed()
            .views()
            .into_iter()
            .filter(|(key, _, _)| !key.starts_with("/h/") && !key.starts_with("/r/"))
            .map(|(key, subscribers, retained)| ChannelView {
                key,
                mode: "pubsub",
                waiting: vec![("subscribers", subscribers)],
                retained: Some(retained),
            })
            .collect()
    }
}

impl Pubsub {
    /// Ends the subscribers of `feeds`: waiters get `reject`, streams are
    /// rung and, finding their channel gone, end. Returns how many channels
    /// and subscribers were ended.
    fn end(&self, feeds: Vec<Feed>, reject: &Reject) -> (usize, usize) {
        let channels = feeds.len();
        let mut subscribers = 0;
        for feed in feeds {
            let (waiters, listeners) = feed.into_subscribers();
            self.stats.unpark(Mode::Pubsub, waiters.len());
            for waiter in waiters {
                subscribers += usize::from(waiter.wake.post(Wake::Ended(reject.clone())).is_ok());
            }
            for listener in listeners {
                let _ = listener.bell.post(());
                subscribers += 1;
            }
        }
        (channels, subscribers)
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

#[cfg(test)]
mod tests {
    use super::*;

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
