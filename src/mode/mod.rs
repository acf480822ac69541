//! The channel families, one file each. A family gets an [`Exchange`] whose
//! head was read and a routed channel, and answers it; it owns its
//! registry of channels. The HTTP layer knows nothing of modes.
//!
//! - `handoff.rs`: the socket-free pairing that queues (and req/res) build on
//! - `delivery.rs`: writing a message into a waiting client's socket
//! - `wait.rs`: how a parked request waits
//! - `envelope.rs`: the headers that travel with a message
//! - `queue.rs`: queue channels
//! - `reqres.rs`: request/responder channels
//! - `cluster.rs`: a double-clutch answer taken from another relay, through
//!   the balancer in front of them (`--cluster-url`)
//! - `pubsub/`: pubsub channels (store, streams, stream formats)
//!
//! [`Exchange`]: crate::http::Exchange

pub mod cluster;
pub mod delivery;
pub mod envelope;
pub mod handoff;
pub mod pubsub;
pub mod queue;
pub mod reqres;
mod wait;

use std::time::{Duration, Instant};

use crate::error::Reject;
use crate::http::Exchange;
use crate::route::{Action, Channel, Mode, Routed};

/// A family of channels (a mode, or two that pair), as the relay drives it.
pub trait Family: Send + Sync {
    /// Whether this family serves channels of `mode`.
    fn serves(&self, mode: Mode) -> bool;

    /// Serves one request (`action` on `channel`, as `routed`) on one of its
    /// channels.
    fn serve(
        &self,
        ex: &mut Exchange,
        routed: &Routed,
        channel: &Channel,
        action: Action,
    ) -> Result<(), Reject>;

    /// Ends channel `prefix` and every channel under it, answering their
    /// waiters with `reject`; returns how many channels and waiters.
    fn end_under(&self, prefix: &str, reject: &Reject) -> (usize, usize);

    /// Closes every channel for shutdown; returns how many waiters were answered.
    fn close(&self) -> usize;

    /// Ends what runs beside the requests (the store's writer), once the
    /// requests in progress are done or given up on.
    fn finish(&self) {}

    /// The channels that exist now, with who waits on them.
    fn channels(&self) -> Vec<ChannelView>;
}

/// One active channel, as `/_/channels` and the page show it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChannelView {
    pub key: String,
    /// `queue`, `pubsub` or `reqres`.
    pub mode: &'static str,
    /// Who waits, by role (`producers`, `consumers`, `subscribers`,
    /// `requesters`, `responders`), and how many.
    pub waiting: Vec<(&'static str, usize)>,
    /// Messages a pubsub channel retains.
    pub retained: Option<usize>,
}

/// When a wait that started now ends: the request's own `?timeout=`, capped by
/// the server's maximum; `None` waits forever.
pub fn deadline(requested: Option<Duration>, max_wait: Option<Duration>) -> Option<Instant> {
    let wait = match (requested, max_wait) {
        (Some(asked), Some(max)) => Some(asked.min(max)),
        (asked, max) => asked.or(max),
    };
    // A wait too long to represent (`?timeout=1e19`) is no deadline at all.
    wait.and_then(|wait| Instant::now().checked_add(wait))
}

/// How long since `start`, as the info line of a delivery says it.
pub fn took(start: Instant) -> String {
    format!("{:.1} ms", start.elapsed().as_secs_f64() * 1e3)
}

/// The channel's key as info-level logs show it: channel names are
/// capabilities, so the last segment is cut to its first four characters.
pub fn short(key: &str) -> String {
    let (dir, last) = key.rsplit_once('/').unwrap_or(("", key));
    let mut chars = last.chars();
    let head: String = chars.by_ref().take(4).collect();
    let more = if chars.next().is_some() { "…" } else { "" };
    format!("{dir}/{head}{more}")
}

impl<F: Family + ?Sized> Family for std::sync::Arc<F> {
    fn serves(&self, mode: Mode) -> bool {
        (**self).serves(mode)
    }

    fn serve(
        &self,
        ex: &mut Exchange,
        routed: &Routed,
        channel: &Channel,
        action: Action,
    ) -> Result<(), Reject> {
        (**self).serve(ex, routed, channel, action)
    }

    fn end_under(&self, prefix: &str, reject: &Reject) -> (usize, usize) {
        (**self).end_under(prefix, reject)
    }

    fn close(&self) -> usize {
        (**self).close()
    }

    fn channels(&self) -> Vec<ChannelView> {
        (**self).channels()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deadlines_are_capped_by_the_server() {
        assert_eq!(deadline(None, None), None);
        let start = Instant::now();
        let capped =
            deadline(Some(Duration::from_secs(100)), Some(Duration::from_secs(1))).unwrap();
        assert!(capped < start + Duration::from_secs(2));
        assert!(deadline(None, Some(Duration::from_secs(5))).is_some());
        assert_eq!(deadline(Some(Duration::from_secs(u64::MAX)), None), None);
    }

    #[test]
    fn logs_shorten_channel_names() {
        assert_eq!(short("/jobs"), "/jobs");
        assert_eq!(short("/u/alice/queue/3f9a0c7e"), "/u/alice/queue/3f9a…");
    }
}
