//! Request/responder channels: a requester (any method on
//! `/<ns>/req/<id>/<rest>`) waits for a responder on `/<ns>/res/<id>`,
//! which gets the request as its response (`Patch-Method`, `Patch-Uri`,
//! `Patch-Path`, `Patch-H-*`, the body) and answers it in one of three
//! [`Form`]s: its own POST body (patchbay's), a POST to a channel it names
//! (the double clutch), or a POST to a one-shot reply path (`Patch-Reply`).
//!
//! Requesters and responders meet on the [`Handoff`], keyed by the
//! responder's path. Whoever arrives second routes the pair's answer before
//! anyone learns of the pair, so that it can reach only this requester; for
//! a switched or replied answer the requester waits as the one receiver on
//! the answer's channel of the queues. Each body moves on the thread of the
//! client that sends it: the requester's thread writes its request into the
//! responder's socket, then hands its own client to the responder's thread
//! (simple form), which writes its answer into it. An answer therefore
//! starts only after the whole request reached the responder: a requester
//! that got an answer knows its request was delivered.
//!
//! Both sides are told `100 Continue` as they arrive: once paired, another
//! thread may write into their sockets, and an interim response must not
//! fall into the middle of a final one.

use std::io::Read;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::access::Access;
use crate::error::Reject;
use crate::http::{Common, Exchange, Method, body};
use crate::mailbox::{Mailbox, Poster};
use crate::metrics::{Kind, Stats};
use crate::mode::cluster::{Cluster, Taken};
use crate::mode::delivery::{Body, Delivered, Delivery, Outgoing, Receiver, deliver};
use crate::mode::envelope::Envelope;
use crate::mode::handoff::{Arrival, Handoff, Park, Waiter, Wake};
use crate::mode::queue::{Queues, park_until};
use crate::mode::wait::{READ_AHEAD, Sleep, Waited, wait};
use crate::mode::{ChannelView, Family, deadline, short, took};
use crate::route::{
    Action, CHANNEL_METHODS, Channel, Mode, Query, REPLY_PREFIX, Route, Routed, normalize,
    without_credentials,
};

/// The longest channel name a switching responder may give.
const MAX_SWITCH_NAME: usize = 1024;

/// Random bytes in a reply path's secret: 128 bits.
const REPLY_SECRET_BYTES: usize = 16;

/// Every request/responder channel.
pub struct ReqRes {
    handoff: Handoff<Requester, Responder>,
    /// Where switched and replied answers are sent and waited for.
    queues: Arc<Queues>,
    stats: Arc<Stats>,
    max_wait: Option<Duration>,
    /// How long a requester waits for a switched or replied answer.
    reply_timeout: Duration,
    /// This relay's name behind a balancer, first in its reply paths.
    shard_tag: Option<String>,
    /// The balancer and its relays (`--cluster-url`): a switched answer is
    /// taken from whichever relay holds its channel.
    cluster: Option<Cluster>,
    /// Who may receive on a switch channel (`--auth`).
    access: Arc<Access>,
}

/// A requester, as its line holds it.
struct Requester {
    id: u64,
    /// Its client, where its answer goes.
    receiver: Receiver,
    /// Wakes its thread to write its request to the responder that took it.
    wake: Poster<Wake<Pairing>>,
}

/// A responder, as its line holds it.
struct Responder {
    id: u64,
    /// Its client, where the request goes.
    receiver: Receiver,
    form: Form,
    /// For [`Form::Answer`]: wakes its thread to write its answer into the
    /// requester that took it.
    wake: Option<Poster<Wake<Receiver>>>,
}

/// How a responder answers.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Form {
    /// `POST /res/<id>`: its body is the answer.
    Answer,
    /// `POST /res/<id>?switch=true`: its body names the queue channel the
    /// answer is then sent to.
    Switch(String),
    /// `GET /res/<id>`: the answer is sent to this one-shot path, given
    /// to it in `Patch-Reply`.
    Reply(String),
}

/// Where a pair's answer comes from, as its requester's thread knows it.
enum AnswerBy {
    /// The responder's thread writes it, once given the requester's client
    /// after the request reached the responder.
    Responder(Poster<Wake<Receiver>>),
    /// It is sent to this queue channel (the double clutch).
    Channel(String),
    /// It is sent to this queue channel, which may be another relay's:
    /// the requester's thread takes it through the balancer.
    Balancer(String),
    /// It is sent to this one-shot reply path.
    Reply(String),
}

/// What a requester's thread is given when it is paired: the responder to
/// write its request to, where its answer will come from, and, for the
/// simple form, its own client, to hand to the responder's thread once the
/// request was delivered.
struct Pairing {
    responder: Receiver,
    answer: AnswerBy,
    requester: Option<Receiver>,
}

impl Waiter for Requester {
    fn id(&self) -> u64 {
        self.id
    }

    fn is_alive(&self) -> bool {
        self.receiver.is_alive()
    }

    fn end(self, why: Option<&Reject>) {
        let _ = self.wake.post(Wake::unpaired(why));
    }
}

impl Waiter for Responder {
    fn id(&self) -> u64 {
        self.id
    }

    fn is_alive(&self) -> bool {
        self.receiver.is_alive()
    }

    fn end(self, why: Option<&Reject>) {
        match self.wake {
            Some(wake) => {
                let _ = wake.post(Wake::unpaired(why));
            }
            None => self.receiver.end(why),
        }
    }
}

impl AnswerBy {
    /// The queue channel the requester waits on, if any.
    fn channel(&self) -> Option<&str> {
        match self {
            AnswerBy::Responder(_) | AnswerBy::Balancer(_) => None,
            AnswerBy::Channel(key) | AnswerBy::Reply(key) => Some(key),
        }
    }
}

impl ReqRes {
    /// No channels yet; `queues` carries switched and replied answers,
    /// which a requester waits for for at most `reply_timeout`; reply
    /// paths start with `shard_tag` when the relay has one.
    pub fn new(
        stats: Arc<Stats>,
        queues: Arc<Queues>,
        max_wait: Option<Duration>,
        reply_timeout: Duration,
        shard_tag: Option<String>,
        cluster: Option<Cluster>,
        access: Arc<Access>,
    ) -> ReqRes {
        ReqRes {
            shard_tag,
            cluster,
            access,
            handoff: Handoff::new(Arc::clone(&stats), (Mode::Requester, Mode::Responder)),
            queues,
            stats,
            max_wait,
            reply_timeout,
        }
    }

    /// A new waiter identity, unique among the queues' too: a requester
    /// also waits in a queue channel for a switched or replied answer.
    fn next_id(&self) -> u64 {
        self.queues.next_id()
    }

    /// A requester: takes the first live responder, or waits for one; writes
    /// its request to it; waits for its answer.
    fn request(&self, ex: &mut Exchange, routed: &Routed, channel: &Channel) -> Result<(), Reject> {
        if ex.send_continue().is_err() {
            ex.close();
            return Ok(());
        }
        let key = channel.pair_key();
        let id = self.next_id();
        let (answer_box, done) = Mailbox::new();
        // The query is the responder's to read: none of it shapes the answer.
        let kind = Kind::Channel(Mode::Requester);
        let receiver = Receiver::new(ex, id, kind, &channel.key, &Query::default(), true, done);
        let (wake_box, wake) = Mailbox::new();
        let requester = Requester { id, receiver, wake };
        let deadline = deadline(routed.query.timeout, self.max_wait);
        let envelope = request_envelope(ex, routed, channel);
        let pairing = match self.handoff.arrive_a(&key, requester, park_until(deadline)) {
            Err(_) => return Err(Reject::shutting_down()),
            Ok(Arrival::Alone(_)) => return Err(no_responder()),
            Ok(Arrival::Paired { mine, theirs }) => {
                let (answer, requester) =
                    self.route_answer(theirs.form, theirs.wake, mine.receiver, ex.common());
                Pairing {
                    responder: theirs.receiver,
                    answer,
                    requester,
                }
            }
            // Woken to write its request and carry on: blind.
            Ok(Arrival::Parked) => match wait(&wake_box, ex, deadline, Sleep::Blind, || {
                self.handoff.unpark_a(&key, id)
            }) {
                Waited::Got(Wake::Paired(pairing)) => pairing,
                Waited::Got(Wake::Ended(reject)) => return Err(reject),
                Waited::TimedOut => return Err(no_responder()),
                // Found gone by a responder, which counted it.
                Waited::Got(Wake::Gone) => {
                    ex.close();
                    return Ok(());
                }
                Waited::HungUp => return self.hung_up(ex, &key, "requester", id),
            },
        };
        self.ask(ex, &key, id, envelope, pairing, &answer_box)
    }

    /// A paired requester's thread writes its request into its responder,
    /// then waits for its answer.
    fn ask(
        &self,
        ex: &mut Exchange,
        key: &str,
        id: u64,
        mut envelope: Envelope,
        pairing: Pairing,
        answer_box: &Mailbox<Delivery>,
    ) -> Result<(), Reject> {
        let Pairing {
            responder,
            answer,
            requester,
        } = pairing;
        if let AnswerBy::Reply(path) = &answer {
            envelope
                .relayed
                .push(("Patch-Reply".to_owned(), path.as_bytes().to_vec()));
        }
        let request = Outgoing {
            envelope,
            status: 200,
            inline: None,
        };
        let common = ex.common();
        match deliver(&self.stats, Body::Request(ex), &request, responder, common) {
            Delivered::Whole { .. } => {
                if let (AnswerBy::Responder(wake), Some(requester)) = (&answer, requester) {
                    // The request reached the responder: now its answer.
                    if wake.post(Wake::Paired(requester)).is_err() {
                        return Err(thread_gone());
                    }
                }
            }
            Delivered::SenderFailed { error, back, .. } => {
                log::debug!(
                    "reqres {}: requester {id} failed mid-request: {error}",
                    short(key)
                );
                if let Some(responder) = back {
                    self.refuse(responder, &requester_gone(), common);
                }
                ex.close();
                if self.take_back(&answer, id) {
                    return body::refusal_for(&error).map_or(Ok(()), Err);
                }
                // An answer is on its way all the same: it ends the exchange.
            }
            Delivered::ReceiverGone => {
                log::debug!(
                    "reqres {}: responder hung up before its request",
                    short(key)
                );
                // Its body may be unread: the connection cannot be reused.
                ex.close();
                if self.take_back(&answer, id) {
                    return Err(responder_gone());
                }
            }
        }
        if let AnswerBy::Balancer(channel) = &answer {
            return self.take_from_balancer(ex, key, id, channel);
        }
        // Its answer. Every loud word ends its connection: it may watch.
        let answer_by = answer
            .channel()
            .and_then(|_| Instant::now().checked_add(self.reply_timeout));
        let waited = wait(answer_box, ex, answer_by, Sleep::Watching, || {
            // A simple answer always comes, from the responder's thread.
            answer
                .channel()
                .is_some_and(|channel| self.queues.unpark_receiver(channel, id))
        });
        match waited {
            Waited::Got(delivery) => delivery.apply(ex),
            Waited::TimedOut => Err(Reject::new(
                504,
                format!(
                    "the responder sent no answer within {} s (--reply-timeout)",
                    self.reply_timeout.as_secs_f64()
                ),
            )),
            Waited::HungUp => self.hung_up(ex, key, "requester", id),
        }
    }

    /// Refuses a switch to queue channel `answer_to` that the responder of
    /// `routed` could not receive on itself: its requester will receive
    /// there, and a responder must not read through it what it may not.
    fn may_switch_to(&self, routed: &Routed, answer_to: &str) -> Result<(), Reject> {
        let receive = Routed {
            method: Method::Get,
            path: answer_to.to_owned(),
            route: Route::Channel {
                channel: Channel::parse(answer_to.to_owned()),
                action: Action::Receive,
            },
            query: Query::default(),
            credential: routed.credential.clone(),
        };
        match self.access.check(&receive) {
            Ok(_) => Ok(()),
            Err(_) => Err(Reject::new(
                403,
                "?switch=true names a channel this responder may not receive on (GET in the access file)",
            )),
        }
    }

    /// Takes a switched answer that may be another relay's, through the
    /// balancer, for the requester of `ex`.
    fn take_from_balancer(
        &self,
        ex: &mut Exchange,
        key: &str,
        id: u64,
        channel: &str,
    ) -> Result<(), Reject> {
        let cluster = self
            .cluster
            .as_ref()
            .expect("a balancer answer has a cluster");
        match cluster.take_answer(ex, channel, self.reply_timeout)? {
            Taken::Answered => Ok(()),
            Taken::HungUp => self.hung_up(ex, key, "requester", id),
        }
    }

    /// After its request failed, takes the requester back from where its
    /// answer would come, so that its own thread answers it; false if an
    /// answer is already on its way to it.
    fn take_back(&self, answer: &AnswerBy, id: u64) -> bool {
        match answer {
            AnswerBy::Responder(wake) => {
                // The responder's thread learns that no answer is wanted.
                let _ = wake.post(Wake::Gone);
                true
            }
            AnswerBy::Channel(channel) | AnswerBy::Reply(channel) => {
                self.queues.unpark_receiver(channel, id)
            }
            // Nothing was asked of another relay yet.
            AnswerBy::Balancer(_) => true,
        }
    }

    /// Routes the answer of a new pair before either side learns of it: a
    /// switched or replied answer's requester waits as the one receiver on
    /// its channel; a simple answer's requester is given back, for its
    /// thread to hand to the responder's (`wake`) once the request was sent.
    fn route_answer(
        &self,
        form: Form,
        wake: Option<Poster<Wake<Receiver>>>,
        requester: Receiver,
        common: &Common,
    ) -> (AnswerBy, Option<Receiver>) {
        let (answer, channel) = match (form, wake) {
            (Form::Answer, Some(wake)) => return (AnswerBy::Responder(wake), Some(requester)),
            (Form::Switch(channel), _) if self.cluster.is_some() => {
                return (AnswerBy::Balancer(channel), None);
            }
            (Form::Switch(channel), _) => (AnswerBy::Channel(channel.clone()), channel),
            (Form::Reply(path), _) => (AnswerBy::Reply(path.clone()), path),
            (Form::Answer, None) => unreachable!("a simple-form responder has a wake"),
        };
        // An answer already sent to a switch channel is delivered at once.
        if let Err(requester) = self.queues.offer(&channel, requester, Park::Back, common) {
            requester.end(Some(&Reject::shutting_down()));
        }
        (answer, None)
    }

    /// A responder: takes the first live requester, or waits for one; gets
    /// its request as its response; answers it as its form says.
    fn respond(&self, ex: &mut Exchange, routed: &Routed, channel: &Channel) -> Result<(), Reject> {
        let key = channel.pair_key();
        let query = &routed.query;
        let form = match ex.request.method {
            Method::Get if query.body.is_some() => Form::Answer,
            Method::Get if ex.has_body() => {
                return Err(Reject::bad_request(
                    "a responder's GET takes no body; POST an answer",
                ));
            }
            Method::Get => Form::Reply(reply_path(self.shard_tag.as_deref())?),
            Method::Post | Method::Put if query.get("switch").is_some_and(is_on) => {
                let answer_to = switch_channel(ex, channel)?;
                self.may_switch_to(routed, &answer_to)?;
                Form::Switch(answer_to)
            }
            Method::Post | Method::Put => Form::Answer,
            _ => return Err(Reject::method_not_allowed(CHANNEL_METHODS)),
        };
        // The simple form's answer, checked before it may be paired.
        let answer = match form {
            Form::Answer => Some(Outgoing::from_request(ex, query, READ_AHEAD)?),
            Form::Switch(_) | Form::Reply(_) => None,
        };
        if ex.send_continue().is_err() {
            ex.close();
            return Ok(());
        }
        let id = self.next_id();
        let (done_box, done) = Mailbox::new();
        let kind = Kind::Channel(Mode::Responder);
        let receiver = Receiver::new(ex, id, kind, &channel.key, query, false, done);
        let (wake_box, wake) = match answer {
            Some(_) => {
                let (mailbox, poster) = Mailbox::new();
                (Some(mailbox), Some(poster))
            }
            None => (None, None),
        };
        let responder = Responder {
            id,
            receiver,
            form,
            wake,
        };
        let deadline = deadline(query.timeout, self.max_wait);
        let parked = match self.handoff.arrive_b(&key, responder, park_until(deadline)) {
            Err(_) => return Err(Reject::shutting_down()),
            Ok(Arrival::Alone(_)) => return Err(no_requester()),
            Ok(Arrival::Paired { mine, theirs }) => {
                let (answer, requester) =
                    self.route_answer(mine.form, mine.wake, theirs.receiver, ex.common());
                let pairing = Pairing {
                    responder: mine.receiver,
                    answer,
                    requester,
                };
                if let Err(Wake::Paired(pairing)) = theirs.wake.post(Wake::Paired(pairing)) {
                    self.refuse(pairing.responder, &thread_gone(), ex.common());
                }
                false
            }
            Ok(Arrival::Parked) => true,
        };
        // Waits end at the deadline only while it is in its line.
        let until = deadline.filter(|_| parked);
        let unpark = || parked && self.handoff.unpark_b(&key, id);
        let (Some(answer), Some(wake_box)) = (&answer, &wake_box) else {
            // Its response, the request, is all that is to come. Every loud
            // word ends its connection: it may watch.
            return match wait(&done_box, ex, until, Sleep::Watching, unpark) {
                Waited::Got(delivery) => delivery.apply(ex),
                Waited::TimedOut => Err(no_requester()),
                Waited::HungUp => self.hung_up(ex, &key, "responder", id),
            };
        };
        // Woken once the request reached it, to write its answer and carry
        // on: blind.
        let requester = match wait(wake_box, ex, until, Sleep::Blind, unpark) {
            Waited::Got(Wake::Paired(requester)) => requester,
            Waited::Got(Wake::Ended(reject)) => return Err(reject),
            Waited::TimedOut => return Err(no_requester()),
            Waited::HungUp => return self.hung_up(ex, &key, "responder", id),
            // Its client was found gone while in line (and counted), or its
            // requester failed: no answer is wanted. What its client was
            // told, if anything, was posted first.
            Waited::Got(Wake::Gone) => {
                return match done_box.wait(Some(Instant::now())) {
                    Ok(delivery) => {
                        let told = delivery.apply(ex);
                        ex.close();
                        told
                    }
                    Err(_) => {
                        ex.close();
                        Ok(())
                    }
                };
            }
        };
        // Its response (the request) went out before it was woken: recorded
        // first, so that its client may leave once its answer is sent.
        let told = match done_box.wait(Some(Instant::now())) {
            Ok(delivery) => delivery.apply(ex),
            Err(_) => Ok(()),
        };
        self.answer(ex, &key, answer, requester);
        told
    }

    /// The responder's thread writes its answer into `requester`, once its
    /// own client has the request (so that client may leave as soon as its
    /// body is sent: the last bytes are not held back to check it stayed).
    fn answer(&self, ex: &mut Exchange, key: &str, answer: &Outgoing, requester: Receiver) {
        let common = ex.common();
        let body = match &answer.inline {
            Some(bytes) => Body::Inline(bytes),
            None => Body::Request(ex),
        };
        let start = Instant::now();
        match deliver(&self.stats, body, answer, requester, common) {
            Delivered::Whole { sent } => {
                self.stats.paired(sent);
                log::info!(
                    "reqres {}: answered, {sent} bytes in {}",
                    short(key),
                    took(start)
                );
            }
            Delivered::SenderFailed { error, back, .. } => {
                log::debug!(
                    "reqres {}: responder failed mid-answer: {error}",
                    short(key)
                );
                if let Some(requester) = back {
                    self.refuse(requester, &responder_gone(), common);
                }
                ex.close();
            }
            Delivered::ReceiverGone => {
                log::debug!("reqres {}: requester hung up before its answer", short(key));
            }
        }
    }

    /// Answers `receiver` with a refusal, its one-line reason as the body.
    fn refuse(&self, receiver: Receiver, reject: &Reject, common: &Common) {
        let text = format!("{}\n", reject.reason).into_bytes();
        let refusal = Outgoing {
            envelope: Envelope::text(),
            status: reject.status,
            inline: None,
        };
        let _ = deliver(&self.stats, Body::Inline(&text), &refusal, receiver, common);
    }

    /// A waiter whose client hung up: close without a word.
    fn hung_up(&self, ex: &mut Exchange, key: &str, who: &str, id: u64) -> Result<(), Reject> {
        log::debug!("reqres {}: {who} {id} hung up while waiting", short(key));
        self.stats.hung_up();
        ex.close();
        Ok(())
    }

    /// An answer POSTed to a one-shot reply path: delivered to the one
    /// requester waiting there, or refused with 410.
    pub fn reply(&self, ex: &mut Exchange, routed: &Routed) -> Result<(), Reject> {
        if !matches!(ex.request.method, Method::Post | Method::Put) {
            return Err(Reject::method_not_allowed("POST, PUT, OPTIONS"));
        }
        self.queues
            .send(ex, &routed.path, &routed.query, Park::Never, || {
                Reject::new(
                    410,
                    "this reply path was used or has expired, or its requester left",
                )
            })
    }
}

impl Family for ReqRes {
    fn serves(&self, mode: Mode) -> bool {
        matches!(mode, Mode::Requester | Mode::Responder)
    }

    fn serve(
        &self,
        ex: &mut Exchange,
        routed: &Routed,
        channel: &Channel,
        action: Action,
    ) -> Result<(), Reject> {
        match action {
            Action::Request => self.request(ex, routed, channel),
            Action::Respond => self.respond(ex, routed, channel),
            Action::NotAllowed(allowed) => Err(Reject::method_not_allowed(allowed)),
            _ => Err(Reject::method_not_allowed(CHANNEL_METHODS)),
        }
    }

    /// Pairs are keyed by their responder's path: `DELETE /res/site` ends
    /// the pair `site`, `DELETE /u/alice` every pair of that namespace.
    fn end_under(&self, prefix: &str, reject: &Reject) -> (usize, usize) {
        self.handoff.end_under(prefix, reject)
    }

    fn close(&self) -> usize {
        self.handoff.close()
    }

    fn channels(&self) -> Vec<ChannelView> {
        self.handoff.views("reqres", ("requesters", "responders"))
    }
}

/// The request of `ex` as a message to a responder.
fn request_envelope(ex: &Exchange, routed: &Routed, channel: &Channel) -> Envelope {
    let uri = without_credentials(&ex.request.target);
    // What follows the id: `/index.html` of `/req/site/index.html`.
    let rest = channel.name().split_once('/').map_or("", |(_, rest)| rest);
    let carrier = routed.credential.token.as_ref().map(|(_, source)| *source);
    Envelope::of_request(&ex.request, carrier, &uri, &format!("/{rest}"))
}

/// The queue channel a switching responder names in its body: `/<ns>/<name>`.
fn switch_channel(ex: &mut Exchange, channel: &Channel) -> Result<String, Reject> {
    let bad = || {
        Reject::bad_request(format!(
            "?switch=true takes a channel name as its body (at most {MAX_SWITCH_NAME} bytes)"
        ))
    };
    let mut name = Vec::new();
    let read = (&mut *ex)
        .take(MAX_SWITCH_NAME as u64 + 1)
        .read_to_end(&mut name);
    if read.is_err() || name.len() > MAX_SWITCH_NAME {
        ex.close();
        return Err(bad());
    }
    let name = std::str::from_utf8(&name).map_err(|_| bad())?.trim();
    let name = name.trim_start_matches('/');
    if name.is_empty() || name.contains('?') {
        return Err(bad());
    }
    let key = normalize(&format!("{}/{name}", channel.namespace()))?;
    if Channel::parse(key.clone()).mode != Mode::Queue {
        return Err(Reject::bad_request(
            "?switch=true takes a queue channel's name, not a pubsub, req or res path",
        ));
    }
    Ok(key)
}

/// `switch=` on: `true`, `1`, `yes`, or empty.
fn is_on(value: &str) -> bool {
    crate::route::parse_flag(value) == Some(true)
}

/// 408 for a requester: no responder came.
fn no_responder() -> Reject {
    Reject::new(
        408,
        "no responder came within the timeout; the request was not sent",
    )
}

/// 408 for a responder: no requester came.
fn no_requester() -> Reject {
    Reject::new(
        408,
        "no requester came within the timeout; the answer was not sent",
    )
}

/// 502 for a responder whose requester failed before the request reached it.
fn requester_gone() -> Reject {
    Reject::new(502, "the requester hung up before its request was sent")
}

/// 502 for a requester whose responder left before answering.
fn responder_gone() -> Reject {
    Reject::new(502, "the responder hung up before it answered")
}

/// 502: the other side's thread is gone (it cannot happen short of a bug).
fn thread_gone() -> Reject {
    Reject::new(502, "the other side's connection ended unexpectedly")
}

/// A new one-shot reply path: `/_/reply/<128 random bits in hex>`, after
/// `<shard_tag>.` when the relay has one (a balancer sends it back here).
fn reply_path(shard_tag: Option<&str>) -> Result<String, Reject> {
    let secret = crate::random::hex(REPLY_SECRET_BYTES).map_err(|e| {
        log::error!("cannot draw random bytes for a reply path: {e}");
        Reject::new(500, "the server cannot draw random bytes for a reply path")
    })?;
    Ok(match shard_tag {
        Some(tag) => format!("{REPLY_PREFIX}{tag}.{secret}"),
        None => format!("{REPLY_PREFIX}{secret}"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reply_secrets_are_128_random_bits() {
        let a = reply_path(None).unwrap();
        let b = reply_path(None).unwrap();
        let secret = a.strip_prefix(REPLY_PREFIX).unwrap();
        assert_eq!(secret.len(), 32);
        assert!(secret.bytes().all(|c| c.is_ascii_hexdigit()));
        assert_ne!(a, b);
        // Behind a balancer, the relay's tag first.
        let tagged = reply_path(Some("relay2")).unwrap();
        let secret = tagged.strip_prefix("/_/reply/relay2.").unwrap();
        assert_eq!(secret.len(), 32);
    }
}
