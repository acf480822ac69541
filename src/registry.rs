//! Channel key → channel state, for every family: one lock, one closed flag
//! for shutdown, one prefix removal for DELETE. What a family keeps is a
//! [`Channels`] collection: a plain map of per-channel state (queues,
//! request/responder), or a store with cross-channel bookkeeping (pubsub's
//! retention). The lock guards only that collection: callers do their
//! matching in microseconds and move bytes after it is released. Poisoning is
//! ignored: no critical section can leave a collection half-changed.

use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard};

/// What a family keeps for its channels, as the registry handles it.
pub trait Channels: Default {
    /// What one channel holds when it is taken out (to tell its waiters).
    type Channel;

    /// The keys of the channels that exist now.
    fn keys(&self) -> Vec<String>;

    /// Takes channel `key` out, with everything it holds.
    fn take(&mut self, key: &str) -> Option<Self::Channel>;
}

/// Per-channel state in a plain map: kept while it holds something.
pub trait ChannelState: Default {
    /// True when the channel holds nothing worth keeping (no waiters, no messages).
    fn is_idle(&self) -> bool;
}

impl<S: ChannelState> Channels for HashMap<String, S> {
    type Channel = S;

    fn keys(&self) -> Vec<String> {
        HashMap::keys(self).cloned().collect()
    }

    fn take(&mut self, key: &str) -> Option<S> {
        self.remove(key)
    }
}

/// The registry was closed for shutdown; nothing new may park.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Closed;

/// The channels of one family.
pub struct Registry<C> {
    /// Guards the collection; never held across socket I/O or a blocking call.
    inner: Mutex<Inner<C>>,
}

struct Inner<C> {
    channels: C,
    closed: bool,
}

impl<C: Channels> Default for Registry<C> {
    fn default() -> Self {
        Registry {
            inner: Mutex::new(Inner {
                channels: C::default(),
                closed: false,
            }),
        }
    }
}

/// The registry's collection, locked.
pub struct Guard<'r, C> {
    inner: MutexGuard<'r, Inner<C>>,
}

impl<C> std::ops::Deref for Guard<'_, C> {
    type Target = C;
    fn deref(&self) -> &C {
        &self.inner.channels
    }
}

impl<C> std::ops::DerefMut for Guard<'_, C> {
    fn deref_mut(&mut self) -> &mut C {
        &mut self.inner.channels
    }
}

impl<C: Channels> Registry<C> {
    /// A registry holding `channels` (read back from somewhere).
    pub fn new(channels: C) -> Registry<C> {
        Registry {
            inner: Mutex::new(Inner {
                channels,
                closed: false,
            }),
        }
    }

    fn lock_inner(&self) -> MutexGuard<'_, Inner<C>> {
        self.inner
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Locks the collection for a change; fails once the registry is closed.
    pub fn lock(&self) -> Result<Guard<'_, C>, Closed> {
        let inner = self.lock_inner();
        if inner.closed {
            return Err(Closed);
        }
        Ok(Guard { inner })
    }

    /// Locks the collection, closed or not: for leaving it (a waiter taking
    /// itself out), which shutdown must not prevent.
    pub fn lock_even_closed(&self) -> Guard<'_, C> {
        Guard {
            inner: self.lock_inner(),
        }
    }

    /// Takes out channel `prefix` and every channel under it (`/a` takes
    /// `/a`, `/a/b` and `/a/b/c`, not `/ab`), for their waiters to be told.
    pub fn remove_under(&self, prefix: &str) -> Vec<C::Channel> {
        let mut inner = self.lock_inner();
        let keys: Vec<String> = inner
            .channels
            .keys()
            .into_iter()
            .filter(|key| is_under(key, prefix))
            .collect();
        keys.iter()
            .filter_map(|key| inner.channels.take(key))
            .collect()
    }

    /// Closes the registry for shutdown and takes out every channel.
    pub fn close(&self) -> Vec<C::Channel> {
        let mut inner = self.lock_inner();
        inner.closed = true;
        let keys = inner.channels.keys();
        keys.iter()
            .filter_map(|key| inner.channels.take(key))
            .collect()
    }
}

impl<S: ChannelState> Registry<HashMap<String, S>> {
    /// Runs `f` on the channel `key`, creating it first if needed and removing
    /// it afterwards if it is idle. Fails once the registry is closed.
    pub fn with<R>(&self, key: &str, f: impl FnOnce(&mut S) -> R) -> Result<R, Closed> {
        let mut channels = self.lock()?;
        if let Some(state) = channels.get_mut(key) {
            let result = f(state);
            if state.is_idle() {
                channels.remove(key);
            }
            return Ok(result);
        }
        let mut state = S::default();
        let result = f(&mut state);
        if !state.is_idle() {
            channels.insert(key.to_owned(), state);
        }
        Ok(result)
    }

    /// Runs `f` on channel `key` only if it exists, removing it if it is then
    /// idle; works after closing too.
    pub fn with_existing<R>(&self, key: &str, f: impl FnOnce(&mut S) -> R) -> Option<R> {
        let mut channels = self.lock_even_closed();
        let state = channels.get_mut(key)?;
        let result = f(state);
        if state.is_idle() {
            channels.remove(key);
        }
        Some(result)
    }

    /// How many channels exist now.
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.lock_even_closed().len()
    }
}

/// Whether channel `key` is `prefix` or lies under it.
pub fn is_under(key: &str, prefix: &str) -> bool {
    match key.strip_prefix(prefix) {
        Some("") => true,
        Some(rest) => prefix.ends_with('/') || rest.starts_with('/'),
        None => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Default)]
    struct Count(u32);
    impl ChannelState for Count {
        fn is_idle(&self) -> bool {
            self.0 == 0
        }
    }

    type Counts = Registry<HashMap<String, Count>>;

    #[test]
    fn channels_live_only_while_busy() {
        let registry = Counts::default();
        registry.with("/a", |c| c.0 += 1).unwrap();
        registry.with("/b", |_| ()).unwrap();
        assert_eq!(registry.len(), 1);
        registry.with_existing("/a", |c| c.0 -= 1);
        assert_eq!(registry.len(), 0);
        assert_eq!(registry.with_existing("/a", |_| ()), None);
    }

    #[test]
    fn prefixes_take_whole_segments() {
        assert!(is_under("/a", "/a"));
        assert!(is_under("/a/b", "/a"));
        assert!(is_under("/a/b", "/a/"));
        assert!(!is_under("/ab", "/a"));
        assert!(!is_under("/a", "/a/b"));
        let registry = Counts::default();
        for key in ["/a", "/a/b", "/ab"] {
            registry.with(key, |c| c.0 = 1).unwrap();
        }
        assert_eq!(registry.remove_under("/a").len(), 2);
        assert_eq!(registry.len(), 1);
    }

    #[test]
    fn closing_refuses_new_channels() {
        let registry = Counts::default();
        registry.with("/a", |c| c.0 = 1).unwrap();
        assert_eq!(registry.close().len(), 1);
        assert_eq!(registry.with("/a", |_| ()), Err(Closed));
        assert!(registry.lock().is_err());
    }
}
