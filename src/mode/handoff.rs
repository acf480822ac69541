//! The socket-free handoff: two kinds of waiters meet on named channels
//! (producers and consumers for queues; requesters and responders for
//! req/res). Whoever arrives second takes the first live waiter of the other
//! kind, each kind served first come, first served; with no one there, it
//! parks at the back of its own line, or, handed back because the
//! counterpart that took it was gone, at the front. DELETE and shutdown take
//! every parked waiter out and tell it why.
//!
//! Generic over what the waiters carry ([`Waiter`]): the modes put sockets
//! and mailboxes in them; the tests below put only mailboxes. Matching holds
//! the registry lock for microseconds; liveness probes and every word to a
//! waiter happen after it is released.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::error::Reject;
use crate::metrics::Stats;
use crate::mode::ChannelView;
use crate::registry::{ChannelState, Closed, Registry};
use crate::route::Mode;

/// What a parked request must be able to do, whatever else it carries.
pub trait Waiter: Send {
    /// Its identity within its handoff, for taking it out of its line.
    fn id(&self) -> u64;

    /// Whether its client is still there; asked when a counterpart takes it.
    fn is_alive(&self) -> bool;

    /// Tells its thread that it left its line unpaired: its client was found
    /// gone (None), or the channel was deleted or the server is stopping.
    fn end(self, why: Option<&Reject>);
}

/// What wakes a parked waiter whose own thread has work to do once paired
/// (a producer streaming its body, a requester writing its request): the
/// counterpart to do it for, or the word that it left its line unpaired.
#[derive(Debug)]
pub enum Wake<T> {
    /// Its counterpart: do the work.
    Paired(T),
    /// Its client was found gone: close without a word.
    Gone,
    /// The channel was deleted or the server is stopping.
    Ended(Reject),
}

impl<T> Wake<T> {
    /// The word for a waiter that [`Waiter::end`] takes out of its line.
    pub fn unpaired(why: Option<&Reject>) -> Wake<T> {
        why.map_or(Wake::Gone, |reject| Wake::Ended(reject.clone()))
    }
}

/// Where an arriving waiter goes when no counterpart is there.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Park {
    /// At the back of its line: it just came.
    Back,
    /// At the front: it was first, and its counterpart was found gone.
    Front,
    /// Nowhere: its wait is over (`?timeout=0`).
    Never,
}

/// What came of an arrival.
#[derive(Debug)]
pub enum Arrival<M, T> {
    /// A live counterpart was there and is now the arriver's to serve.
    Paired { mine: M, theirs: T },
    /// Nobody was there; the arriver waits in its line.
    Parked,
    /// Nobody was there and the arriver may not wait; it is given back.
    Alone(M),
}

/// One channel's two lines, oldest first.
pub struct Lines<A, B> {
    a: VecDeque<A>,
    b: VecDeque<B>,
}

impl<A, B> Default for Lines<A, B> {
    fn default() -> Self {
        Lines {
            a: VecDeque::new(),
            b: VecDeque::new(),
        }
    }
}

impl<A, B> ChannelState for Lines<A, B> {
    fn is_idle(&self) -> bool {
        self.a.is_empty() && self.b.is_empty()
    }
}

/// The channels of one family where waiters of kind `A` meet waiters of kind `B`.
pub struct Handoff<A, B> {
    registry: Registry<HashMap<String, Lines<A, B>>>,
    next_id: AtomicU64,
    stats: Arc<Stats>,
    /// The mode each kind is counted under.
    modes: (Mode, Mode),
}

impl<A: Waiter, B: Waiter> Handoff<A, B> {
    /// No channels yet; waiters of kind A count as `modes.0`, of kind B as `modes.1`.
    pub fn new(stats: Arc<Stats>, modes: (Mode, Mode)) -> Handoff<A, B> {
        Handoff {
            registry: Registry::default(),
            next_id: AtomicU64::new(1),
            stats,
            modes,
        }
    }

    /// A new waiter identity.
    pub fn next_id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }

    /// A waiter of kind A arrives on channel `key`.
    pub fn arrive_a(&self, key: &str, a: A, park: Park) -> Result<Arrival<A, B>, Closed> {
        self.arrive(
            key,
            a,
            park,
            |lines| (&mut lines.a, &mut lines.b),
            self.modes,
        )
    }

    /// A waiter of kind B arrives on channel `key`.
    pub fn arrive_b(&self, key: &str, b: B, park: Park) -> Result<Arrival<B, A>, Closed> {
        let modes = (self.modes.1, self.modes.0);
        self.arrive(key, b, park, |lines| (&mut lines.b, &mut lines.a), modes)
    }

    /// Takes waiter `id` of kind A out of its line; false if a counterpart
    /// took it (or DELETE or shutdown did).
    pub fn unpark_a(&self, key: &str, id: u64) -> bool {
        self.unpark(key, id, self.modes.0, |lines| &mut lines.a)
    }

    /// Takes waiter `id` of kind B out of its line; false if it is not there.
    pub fn unpark_b(&self, key: &str, id: u64) -> bool {
        self.unpark(key, id, self.modes.1, |lines| &mut lines.b)
    }

    fn arrive<M: Waiter, T: Waiter>(
        &self,
        key: &str,
        mine: M,
        park: Park,
        split: impl Fn(&mut Lines<A, B>) -> (&mut VecDeque<M>, &mut VecDeque<T>),
        (my_mode, their_mode): (Mode, Mode),
    ) -> Result<Arrival<M, T>, Closed> {
        let mut mine = Some(mine);
        loop {
            let found = self.registry.with(key, |lines| {
                let (my_line, their_line) = split(lines);
                let theirs = their_line.pop_front();
                if theirs.is_none() {
                    match park {
                        Park::Back => my_line.extend(mine.take()),
                        Park::Front => {
                            if let Some(me) = mine.take() {
                                my_line.push_front(me);
                            }
                        }
                        Park::Never => {}
                    }
                }
                theirs
            })?;
            let Some(theirs) = found else {
                return Ok(match mine {
                    Some(me) => Arrival::Alone(me),
                    None => {
                        self.stats.park(my_mode);
                        Arrival::Parked
                    }
                });
            };
            self.stats.unpark(their_mode, 1);
            // The probe runs outside the lock: it is a system call.
            if theirs.is_alive() {
                let mine = mine.expect("kept while a counterpart was found");
                return Ok(Arrival::Paired { mine, theirs });
            }
            self.stats.hung_up();
            theirs.end(None);
        }
    }

    fn unpark<W>(
        &self,
        key: &str,
        id: u64,
        mode: Mode,
        line: impl FnOnce(&mut Lines<A, B>) -> &mut VecDeque<W>,
    ) -> bool
    where
        W: Waiter,
    {
        let removed = self
            .registry
            .with_existing(key, |lines| {
                let line = line(lines);
                let at = line.iter().position(|w| w.id() == id)?;
                line.remove(at)
            })
            .flatten();
        match removed {
            Some(_) => {
                self.stats.unpark(mode, 1);
                true
            }
            None => false,
        }
    }

    /// Ends channel `prefix` and every channel under it, telling their
    /// waiters `reject`; returns how many channels and waiters.
    pub fn end_under(&self, prefix: &str, reject: &Reject) -> (usize, usize) {
        self.end(self.registry.remove_under(prefix), reject)
    }

    /// Each channel as `/_/channels` shows it, of `mode`: how many wait in
    /// each line, under the names `roles` gives them.
    pub fn views(
        &self,
        mode: &'static str,
        roles: (&'static str, &'static str),
    ) -> Vec<ChannelView> {
        self.registry
            .lock_even_closed()
            .iter()
            .map(|(key, lines)| ChannelView {
                key: key.clone(),
                mode,
                waiting: vec![(roles.0, lines.a.len()), (roles.1, lines.b.len())],
                retained: None,
            })
            .collect()
    }

    /// Closes every channel for shutdown; returns how many waiters were told.
    pub fn close(&self) -> usize {
        self.end(self.registry.close(), &Reject::shutting_down()).1
    }

    fn end(&self, channels: Vec<Lines<A, B>>, reject: &Reject) -> (usize, usize) {
        let count = channels.len();
        let mut waiters = 0;
        for lines in channels {
            self.stats.unpark(self.modes.0, lines.a.len());
            self.stats.unpark(self.modes.1, lines.b.len());
            waiters += lines.a.len() + lines.b.len();
            lines.a.into_iter().for_each(|a| a.end(Some(reject)));
            lines.b.into_iter().for_each(|b| b.end(Some(reject)));
        }
        (count, waiters)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mailbox::{Mailbox, Poster};
    use crate::mode::wait::{NoSocket, Sleep, Waited, wait};
    use std::sync::atomic::AtomicBool;
    use std::thread;
    use std::time::{Duration, Instant};

    /// What a test waiter is told.
    #[derive(Debug, PartialEq)]
    enum Word {
        /// Paired with the waiter of this id.
        Paired(u64),
        Gone,
        Ended(u16),
    }

    struct Test {
        id: u64,
        alive: Arc<AtomicBool>,
        poster: Poster<Word>,
    }

    impl std::fmt::Debug for Test {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            write!(f, "Test({})", self.id)
        }
    }

    impl Waiter for Test {
        fn id(&self) -> u64 {
            self.id
        }
        fn is_alive(&self) -> bool {
            self.alive.load(Ordering::SeqCst)
        }
        fn end(self, why: Option<&Reject>) {
            let word = why.map_or(Word::Gone, |r| Word::Ended(r.status));
            let _ = self.poster.post(word);
        }
    }

    type Pairs = Handoff<Test, Test>;

    fn handoff() -> Arc<Pairs> {
        Arc::new(Handoff::new(
            Arc::new(Stats::new()),
            (Mode::Queue, Mode::Queue),
        ))
    }

    fn waiter(handoff: &Pairs) -> (Test, Mailbox<Word>, Arc<AtomicBool>) {
        let (mailbox, poster) = Mailbox::new();
        let alive = Arc::new(AtomicBool::new(true));
        let test = Test {
            id: handoff.next_id(),
            alive: Arc::clone(&alive),
            poster,
        };
        (test, mailbox, alive)
    }

    /// A waiter of kind B arrives; when it pairs, both sides are told.
    fn arrive_b(handoff: &Pairs, key: &str) -> (u64, Mailbox<Word>, Arc<AtomicBool>) {
        let (b, mailbox, alive) = waiter(handoff);
        let id = b.id;
        match handoff.arrive_b(key, b, Park::Back).unwrap() {
            Arrival::Paired { mine, theirs } => {
                let _ = theirs.poster.post(Word::Paired(mine.id));
                let _ = mine.poster.post(Word::Paired(theirs.id));
            }
            Arrival::Parked => {}
            Arrival::Alone(_) => panic!("alone"),
        }
        (id, mailbox, alive)
    }

    fn arrive_a(handoff: &Pairs, key: &str, park: Park) -> Arrival<Test, Test> {
        let (a, _, _) = waiter(handoff);
        handoff.arrive_a(key, a, park).unwrap()
    }

    fn soon() -> Option<Instant> {
        Some(Instant::now() + Duration::from_secs(5))
    }

    #[test]
    fn each_kind_is_served_first_come_first_served() {
        let handoff = handoff();
        let parked: Vec<_> = (0..3).map(|_| arrive_b(&handoff, "/k")).collect();
        for (id, mailbox, _) in &parked {
            match arrive_a(&handoff, "/k", Park::Back) {
                Arrival::Paired { theirs, .. } => assert_eq!(theirs.id, *id),
                other => panic!("{other:?}"),
            }
            assert!(mailbox.wait(Some(Instant::now())).is_err());
        }
        assert!(matches!(
            arrive_a(&handoff, "/k", Park::Never),
            Arrival::Alone(_)
        ));
        assert_eq!(handoff.registry.len(), 0);
    }

    #[test]
    fn a_waiter_found_gone_is_told_and_skipped() {
        let handoff = handoff();
        let (_, dead_mailbox, dead) = arrive_b(&handoff, "/k");
        let (live_id, _, _) = arrive_b(&handoff, "/k");
        dead.store(false, Ordering::SeqCst);
        match arrive_a(&handoff, "/k", Park::Back) {
            Arrival::Paired { theirs, .. } => assert_eq!(theirs.id, live_id),
            other => panic!("{other:?}"),
        }
        assert_eq!(dead_mailbox.wait(soon()), Ok(Word::Gone));
    }

    #[test]
    fn a_waiter_handed_back_goes_to_the_front() {
        let handoff = handoff();
        let (first, _, _) = arrive_b(&handoff, "/k");
        let (second, _, _) = arrive_b(&handoff, "/k");
        let Arrival::Paired { theirs, .. } = arrive_a(&handoff, "/k", Park::Back) else {
            panic!("not paired");
        };
        assert_eq!(theirs.id, first);
        // The one that took it was gone: it goes back first in line.
        assert!(matches!(
            handoff.arrive_b("/k", theirs, Park::Front).unwrap(),
            Arrival::Parked
        ));
        for expected in [first, second] {
            match arrive_a(&handoff, "/k", Park::Back) {
                Arrival::Paired { theirs, .. } => assert_eq!(theirs.id, expected),
                other => panic!("{other:?}"),
            }
        }
    }

    #[test]
    fn a_claimed_waiter_waits_past_its_deadline_for_word() {
        let handoff = handoff();
        let (id, mailbox, _) = arrive_b(&handoff, "/k");
        let Arrival::Paired { theirs, .. } = arrive_a(&handoff, "/k", Park::Back) else {
            panic!("not paired");
        };
        // The waiter's deadline passes while its counterpart holds it: it
        // cannot leave its line (it is not in it) and waits for the word.
        let poster = thread::spawn(move || {
            thread::sleep(Duration::from_millis(100));
            let _ = theirs.poster.post(Word::Paired(0));
        });
        let handoff2 = Arc::clone(&handoff);
        let waited = wait(
            &mailbox,
            &mut NoSocket,
            Some(Instant::now() + Duration::from_millis(10)),
            Sleep::Blind,
            || handoff2.unpark_b("/k", id),
        );
        assert!(matches!(waited, Waited::Got(Word::Paired(0))), "{waited:?}");
        poster.join().unwrap();
    }

    #[test]
    fn a_parked_waiter_times_out_and_leaves_its_line() {
        let handoff = handoff();
        let (id, mailbox, _) = arrive_b(&handoff, "/k");
        let waited = wait(
            &mailbox,
            &mut NoSocket,
            Some(Instant::now() + Duration::from_millis(20)),
            Sleep::Blind,
            || handoff.unpark_b("/k", id),
        );
        assert!(matches!(waited, Waited::TimedOut));
        assert_eq!(handoff.registry.len(), 0);
    }

    #[test]
    fn delete_during_a_pairing_spares_the_pair() {
        let handoff = handoff();
        let (_, claimed_mailbox, _) = arrive_b(&handoff, "/k/a");
        let (_, parked_mailbox, _) = arrive_b(&handoff, "/k/b");
        let Arrival::Paired { theirs, .. } = arrive_a(&handoff, "/k/a", Park::Back) else {
            panic!("not paired");
        };
        assert_eq!(handoff.end_under("/k", &Reject::deleted()), (1, 1));
        assert_eq!(parked_mailbox.wait(soon()), Ok(Word::Ended(410)));
        // The pair formed before the DELETE completes as if nothing happened.
        let _ = theirs.poster.post(Word::Paired(7));
        assert_eq!(claimed_mailbox.wait(soon()), Ok(Word::Paired(7)));
    }

    #[test]
    fn shutdown_during_a_transfer_ends_only_the_parked() {
        let handoff = handoff();
        let (_, in_transfer, _) = arrive_b(&handoff, "/a");
        let (_, parked, _) = arrive_b(&handoff, "/b");
        let Arrival::Paired { theirs, .. } = arrive_a(&handoff, "/a", Park::Back) else {
            panic!("not paired");
        };
        let transfer = thread::spawn(move || {
            thread::sleep(Duration::from_millis(50));
            let _ = theirs.poster.post(Word::Paired(1));
        });
        assert_eq!(handoff.close(), 1);
        assert_eq!(parked.wait(soon()), Ok(Word::Ended(503)));
        assert_eq!(in_transfer.wait(soon()), Ok(Word::Paired(1)));
        transfer.join().unwrap();
        let (a, _, _) = waiter(&handoff);
        assert!(handoff.arrive_a("/a", a, Park::Back).is_err());
    }

    #[test]
    fn many_threads_pair_every_waiter_exactly_once() {
        let handoff = handoff();
        const EACH: usize = 200;
        let spawn = |side_b: bool| {
            let handoff = Arc::clone(&handoff);
            thread::spawn(move || {
                let mut partners = Vec::new();
                for _ in 0..EACH {
                    let (me, mailbox, _) = waiter(&handoff);
                    let id = me.id;
                    let arrival = if side_b {
                        handoff.arrive_b("/k", me, Park::Back)
                    } else {
                        handoff.arrive_a("/k", me, Park::Back)
                    };
                    match arrival.unwrap() {
                        Arrival::Paired { mine, theirs } => {
                            let _ = theirs.poster.post(Word::Paired(mine.id));
                            partners.push((id, theirs.id));
                        }
                        Arrival::Parked => match mailbox.wait(soon()) {
                            Ok(Word::Paired(other)) => partners.push((id, other)),
                            other => panic!("{other:?}"),
                        },
                        Arrival::Alone(_) => panic!("alone"),
                    }
                }
                partners
            })
        };
        let (a, b) = (spawn(false), spawn(true));
        let mut a = a.join().unwrap();
        let b = b.join().unwrap();
        let mut b: Vec<(u64, u64)> = b.into_iter().map(|(me, other)| (other, me)).collect();
        a.sort();
        b.sort();
        assert_eq!(a.len(), EACH);
        assert_eq!(a, b, "every pairing is seen the same way from both sides");
        assert_eq!(handoff.registry.len(), 0);
    }
}
