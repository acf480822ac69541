//! Channel key → channel state, for one mode. A channel appears on first use
//! and is removed as soon as it is idle again, so the map never grows with
//! channels that were used once. The lock guards only the map: callers do
//! their matching inside [`Registry::with`] in microseconds and move bytes
//! after it returns. Poisoning is ignored: a panicking thread never holds the
//! lock across anything that could leave the map inconsistent.

use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard};

/// What a mode keeps per channel.
pub trait ChannelState: Default {
    /// True when the channel holds nothing worth keeping (no waiters, no messages).
    fn is_idle(&self) -> bool;
}

/// The registry was closed for shutdown; nothing new may park.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Closed;

/// The channels of one mode.
pub struct Registry<S> {
    /// Guards the map; never held across socket I/O or a blocking call.
    inner: Mutex<Inner<S>>,
}

struct Inner<S> {
    channels: HashMap<String, S>,
    closed: bool,
}

impl<S: ChannelState> Default for Registry<S> {
    fn default() -> Self {
        Registry {
            inner: Mutex::new(Inner {
                channels: HashMap::new(),
                closed: false,
            }),
        }
    }
}

impl<S: ChannelState> Registry<S> {
    fn lock(&self) -> MutexGuard<'_, Inner<S>> {
        self.inner
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Runs `f` on the channel `key`, creating it first if needed and removing
    /// it afterwards if it is idle. Fails once the registry is closed.
    pub fn with<R>(&self, key: &str, f: impl FnOnce(&mut S) -> R) -> Result<R, Closed> {
        let mut inner = self.lock();
        if inner.closed {
            return Err(Closed);
        }
        let result;
        let idle;
        if let Some(state) = inner.channels.get_mut(key) {
            result = f(state);
            idle = state.is_idle();
        } else {
            let mut state = S::default();
            result = f(&mut state);
            idle = state.is_idle();
            if !idle {
                inner.channels.insert(key.to_owned(), state);
            }
            return Ok(result);
        }
        if idle {
            inner.channels.remove(key);
        }
        Ok(result)
    }

    /// Runs `f` on channel `key` only if it exists, removing it if it is then idle.
    pub fn with_existing<R>(&self, key: &str, f: impl FnOnce(&mut S) -> R) -> Option<R> {
        let mut inner = self.lock();
        let state = inner.channels.get_mut(key)?;
        let result = f(state);
        if state.is_idle() {
            inner.channels.remove(key);
        }
        Some(result)
    }

    /// Removes channel `prefix` and every channel under it (`/a` takes `/a`,
    /// `/a/b` and `/a/b/c`, not `/ab`), returning them for their waiters to be told.
    pub fn remove_under(&self, prefix: &str) -> Vec<S> {
        let mut inner = self.lock();
        let keys: Vec<String> = inner
            .channels
            .keys()
            .filter(|key| is_under(key, prefix))
            .cloned()
            .collect();
        keys.iter()
            .filter_map(|key| inner.channels.remove(key))
            .collect()
    }

    /// Closes the registry for shutdown and returns every channel.
    pub fn close(&self) -> Vec<S> {
        let mut inner = self.lock();
        inner.closed = true;
        inner.channels.drain().map(|(_, state)| state).collect()
    }

    /// How many channels exist now.
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.lock().channels.len()
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

    #[test]
    fn channels_live_only_while_busy() {
        let registry: Registry<Count> = Registry::default();
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
        let registry: Registry<Count> = Registry::default();
        for key in ["/a", "/a/b", "/ab"] {
            registry.with(key, |c| c.0 = 1).unwrap();
        }
        assert_eq!(registry.remove_under("/a").len(), 2);
        assert_eq!(registry.len(), 1);
    }

    #[test]
    fn closing_refuses_new_channels() {
        let registry: Registry<Count> = Registry::default();
        registry.with("/a", |c| c.0 = 1).unwrap();
        assert_eq!(registry.close().len(), 1);
        assert_eq!(registry.with("/a", |_| ()), Err(Closed));
    }
}
