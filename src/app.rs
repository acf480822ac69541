//! The one entry point for every request: [`serve`] routes it, applies the
//! relay's request policy, hands it to a server endpoint or to the family of
//! its channel, answers a refusal, and then observes it, once, whoever wrote
//! its response (status, bytes and duration go to the counters and the
//! access log). `server.rs` calls it for each request and knows no mode and
//! no endpoint; a new family is one line in [`Relay::new`], a new endpoint
//! one arm in [`Relay::endpoint`].

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use crate::access::Access;
use crate::config::Config;
use crate::error::Reject;
use crate::http::{Common, Exchange, Head, Method};
use crate::limits::Limits;
use crate::metrics::{Kind, Observation, Stats};
use crate::mode::cluster::Cluster;
use crate::mode::pubsub::{Pubsub, Restored};
use crate::mode::queue::Queues;
use crate::mode::reqres::ReqRes;
use crate::mode::{ChannelView, Family};
use crate::notify::Notifier;
use crate::ops;
use crate::route::{
    self, Action, CHANNEL_METHODS, Endpoint, Hook, Mode, Route, Routed, TokenSource,
};

/// The methods a requester may use, for a preflight's answer.
const REQUESTER_METHODS: &str = "GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS";

/// What every connection thread shares: the configuration, the counters,
/// and the families of channels.
pub struct Relay {
    pub config: Config,
    pub stats: Arc<Stats>,
    /// The headers every response carries (CORS origin and the like).
    pub common: Common,
    families: Vec<Box<dyn Family>>,
    /// Request/responder channels, for the answers sent to reply paths.
    reqres: Arc<ReqRes>,
    /// Who may do what on which channel (`--auth`).
    access: Arc<Access>,
    /// Limits per client address.
    pub limits: Limits,
    /// Sends notifications to their backends (`/_/notify`).
    notifier: Notifier,
    /// Set once on SIGINT/SIGTERM; from then on every request gets 503.
    stopping: AtomicBool,
    /// Raised with `stopping`, for tunnels to poll: each sends its client
    /// a close frame (None if no pipe could be made: tunnels are then cut).
    stopped: Option<crate::sys::Flag>,
}

impl Relay {
    /// A relay with no channels yet (but the pubsub channels `restored`
    /// from the store's file), checking requests against `access`. Fails
    /// if the store's writer cannot be started.
    pub fn new(
        config: Config,
        access: Access,
        restored: Option<Restored>,
    ) -> std::io::Result<Relay> {
        let stats = Arc::new(Stats::new());
        let queues = Arc::new(Queues::new(
            Arc::clone(&stats),
            config.max_wait,
            config.idle_timeout,
        ));
        let access = Arc::new(access);
        // Switched and replied answers travel on queue channels.
        let reqres = Arc::new(ReqRes::new(
            Arc::clone(&stats),
            Arc::clone(&queues),
            config.max_wait,
            config.reply_timeout,
            config.shard_tag.clone(),
            config.cluster.clone().map(|balancer| {
                Cluster::new(balancer, config.hook_key.clone(), config.idle_timeout)
            }),
            Arc::clone(&access),
        ));
        let families: Vec<Box<dyn Family>> = vec![
            Box::new(queues),
            Box::new(Arc::clone(&reqres)),
            Box::new(Pubsub::new(
                Arc::clone(&stats),
                config.pubsub.clone(),
                config.max_wait,
                config.keepalive,
                restored,
            )?),
        ];
        Ok(Relay {
            common: Common::new(config.cors_origin.as_deref()),
            limits: Limits::new(
                config.rate,
                config.max_connections_per_ip,
                config.trust_proxy.clone(),
            ),
            access,
            notifier: Notifier::new(config.notify_timeout),
            config,
            stats,
            families,
            reqres,
            stopping: AtomicBool::new(false),
            stopped: crate::sys::Flag::new().ok(),
        })
    }

    /// Re-reads the access file (on SIGHUP).
    pub fn reload(&self) {
        self.access.reload();
    }

    /// Whether shutdown has begun.
    pub fn is_stopping(&self) -> bool {
        self.stopping.load(Ordering::SeqCst)
    }

    /// Begins shutdown: every parked waiter is answered 503 and nothing new
    /// may park. Returns how many waiters were answered.
    pub fn stop(&self) -> usize {
        self.stopping.store(true, Ordering::SeqCst);
        if let Some(stopped) = &self.stopped {
            stopped.raise();
        }
        self.families.iter().map(|family| family.close()).sum()
    }

    /// Ends what runs beside the requests (the pubsub store's writer, which
    /// writes what is left), after [`Relay::stop`] and its grace.
    pub fn finish(&self) {
        for family in &self.families {
            family.finish();
        }
    }

    /// Serves a request on a channel, or answers a DELETE across families.
    fn channel(
        &self,
        ex: &mut Exchange,
        routed: &Routed,
        channel: &route::Channel,
        action: Action,
    ) -> Result<(), Reject> {
        if action == Action::Delete {
            // A DELETE ends every family's channels under the path, whatever
            // mode its own path names.
            let deleted = Reject::deleted();
            let (channels, waiters) = self
                .families
                .iter()
                .map(|family| family.end_under(&channel.key, &deleted))
                .fold((0, 0), |(c, w), (more_c, more_w)| (c + more_c, w + more_w));
            log::info!(
                "deleted {channels} channels under {}; {waiters} waiters answered 410",
                crate::mode::short(&channel.key)
            );
            return respond_text(
                ex,
                200,
                &format!("deleted {channels} channels; {waiters} waiters answered 410"),
            );
        }
        check_range(ex, channel.mode, action)?;
        match self.families.iter().find(|f| f.serves(channel.mode)) {
            Some(family) => family.serve(ex, routed, channel, action),
            None => unreachable!("every mode has its family"),
        }
    }

    /// Serves a server endpoint.
    fn endpoint(
        &self,
        ex: &mut Exchange,
        endpoint: Endpoint,
        routed: &Routed,
    ) -> Result<(), Reject> {
        let path = &routed.path;
        match endpoint {
            Endpoint::Status => {
                only_get(ex)?;
                let mut head = Head::new(200);
                head.header("Content-Type", "application/json")
                    .header("Cache-Control", "no-store");
                let body = self.stats.to_json();
                ex.respond(head, body.as_bytes()).map_err(|_| hung_up(ex))
            }
            Endpoint::Reply => self.reqres.reply(ex, routed),
            Endpoint::Mint(hook) => {
                only_get(ex)?;
                let minted = self.config.hook_key.mint(hook).map_err(|e| {
                    log::error!("cannot read random bytes for a hook: {e}");
                    Reject::new(500, "cannot make a hook channel now; try again")
                })?;
                let mut head = Head::new(200);
                head.header("Content-Type", "application/json")
                    .header("Cache-Control", "no-store");
                let body = format!(
                    "{{\"channel\":\"{}\",\"secret\":\"{}\"}}\n",
                    minted.name, minted.secret
                );
                ex.respond(head, body.as_bytes()).map_err(|_| hung_up(ex))
            }
            Endpoint::Health => {
                only_get(ex)?;
                let mut head = Head::new(200);
                head.header("Content-Type", "text/plain; charset=utf-8")
                    .header("Cache-Control", "no-store");
                ex.respond(head, b"ok\n").map_err(|_| hung_up(ex))
            }
            Endpoint::Metrics => {
                only_get(ex)?;
                self.check_metrics_token(ex)?;
                let mut head = Head::new(200);
                head.header("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
                    .header("Cache-Control", "no-store");
                let body = self.stats.to_prometheus();
                ex.respond(head, body.as_bytes()).map_err(|_| hung_up(ex))
            }
            Endpoint::Channels => {
                only_get(ex)?;
                let (views, whole) = self.channels_for(routed);
                let listed = listed(&views, whole);
                let mut head = Head::new(200);
                head.header("Content-Type", "application/json")
                    .header("Cache-Control", "no-store");
                let body = ops::channels_json(&listed, whole);
                ex.respond(head, body.as_bytes()).map_err(|_| hung_up(ex))
            }
            Endpoint::Page => {
                only_get(ex)?;
                let (views, whole) = self.channels_for(routed);
                let listed = listed(&views, whole);
                let fallback = self.config.listen.to_string();
                let host = ex
                    .request
                    .header("host")
                    .and_then(ops::valid_host)
                    .unwrap_or(&fallback)
                    .to_owned();
                // The relay's, whatever the viewer may list (as the script shows it).
                let waiters = self.stats.waiting_now();
                let body = ops::page(&ops::PageData {
                    host: &host,
                    uptime_seconds: self.stats.uptime().as_secs(),
                    waiters,
                    pairs: self.stats.pairs(),
                    published: self.stats.published_count(),
                    connections: self.stats.open.load(std::sync::atomic::Ordering::Relaxed) as u64,
                    listed: &listed,
                    whole,
                });
                let mut head = Head::new(200);
                head.header("Content-Type", "text/html; charset=utf-8")
                    .header("Cache-Control", "no-store")
                    .header("Content-Security-Policy", ops::PAGE_POLICY);
                ex.respond(head, body.as_bytes()).map_err(|_| hung_up(ex))
            }
            Endpoint::Favicon => {
                only_get(ex)?;
                let mut head = Head::new(200);
                head.header("Content-Type", "image/x-icon")
                    .header("Cache-Control", "public, max-age=86400");
                ex.respond(head, ops::FAVICON).map_err(|_| hung_up(ex))
            }
            Endpoint::Robots => {
                only_get(ex)?;
                let mut head = Head::new(200);
                head.header("Content-Type", "text/plain; charset=utf-8");
                ex.respond(head, ops::ROBOTS.as_bytes())
                    .map_err(|_| hung_up(ex))
            }
            Endpoint::Notify => crate::notify::serve(
                ex,
                routed,
                &self.access.notifications(),
                &self.notifier,
                &self.stats,
            ),
            Endpoint::Tunnel => crate::tunnel::serve(
                ex,
                routed,
                &self.access,
                &self.stats,
                crate::tunnel::Settings {
                    keepalive: self.config.keepalive,
                    stop: self.stopped.as_ref().map(crate::sys::Flag::fd),
                },
            ),
            Endpoint::Reserved => Err(Reject::new(
                404,
                format!("{path:?} is reserved for the server, not a channel"),
            )),
        }
    }
}

impl Relay {
    /// The channels a listing shows to the client of `routed`, sorted, and
    /// whether their names are whole: with an access file, the ones it may
    /// GET, whole; else all of them, shortened unless `--list-channels`.
    fn channels_for(&self, routed: &Routed) -> (Vec<ChannelView>, bool) {
        let mut views: Vec<ChannelView> = self.families.iter().flat_map(|f| f.channels()).collect();
        views.sort_by(|a, b| a.key.cmp(&b.key));
        let keys: Vec<&str> = views.iter().map(|v| v.key.as_str()).collect();
        match self.access.readable(&routed.credential, &keys) {
            Some(readable) => {
                let mut allowed = readable.into_iter();
                views.retain(|_| allowed.next().unwrap_or(false));
                (views, true)
            }
            None => (views, self.config.list_channels),
        }
    }

    /// `--metrics-token`: `/metrics` takes it as a Bearer token.
    fn check_metrics_token(&self, ex: &Exchange) -> Result<(), Reject> {
        let Some(expected) = &self.config.metrics_token else {
            return Ok(());
        };
        let matches = ex.request.bearer().is_some_and(|token| {
            use ctutils::CtEq as _;
            use sha2::Digest as _;
            let presented: [u8; 32] = sha2::Sha256::digest(token.as_bytes()).into();
            presented.ct_eq(expected).to_bool()
        });
        if matches {
            return Ok(());
        }
        if ex.request.bearer().is_some() {
            self.stats.bad_credential();
        } else {
            self.stats.denied();
        }
        Err(Reject::new(
            401,
            "the metrics take their token (--metrics-token) as a Bearer",
        )
        .with_header("WWW-Authenticate", "Bearer realm=\"patchcord metrics\""))
    }

    /// Serves a request on a hook channel: the side its kind guards takes
    /// the channel's secret (`?secret=`, else `Authorization: Bearer`).
    fn hook(
        &self,
        ex: &mut Exchange,
        routed: &Routed,
        hook: Hook,
        channel: &route::Channel,
        action: Action,
    ) -> Result<(), Reject> {
        if hook.guards(action) {
            let name = channel.name();
            let presented = routed
                .credential
                .secret
                .as_ref()
                .map(|s| s.expose())
                .or(ex.request.bearer());
            match presented {
                None => {
                    self.stats.denied();
                    return Err(Reject::new(
                        401,
                        "this side of a hook channel takes its secret (?secret= or Authorization: Bearer)",
                    )
                    .with_header("WWW-Authenticate", "Bearer realm=\"patchcord hook\""));
                }
                Some(secret) if !self.config.hook_key.verify(hook, name, secret) => {
                    self.stats.bad_credential();
                    return Err(Reject::new(403, "that is not this hook channel's secret"));
                }
                Some(_) => {}
            }
        }
        self.channel(ex, routed, channel, action)
    }

    /// Whether `proof` (`Patch-Relay`) lets another relay take the answer
    /// waiting on the queue channel `routed` receives from.
    fn is_relay_proof(&self, routed: &Routed, proof: &str) -> bool {
        let Route::Channel {
            channel,
            action: Action::Receive,
        } = &routed.route
        else {
            return false;
        };
        channel.mode == Mode::Queue
            && self
                .config
                .hook_key
                .verify_relay(&channel.pair_key(), proof)
    }

    /// Checks `routed` against the rate limit and the access file; counts
    /// and logs a refusal (with the table's label, never the token).
    fn admit(&self, ex: &Exchange, routed: &Routed) -> Result<(), Reject> {
        if routed.credential.relay {
            // Another relay with the same key, for one channel, on behalf
            // of its requester: the access file and the limits were applied
            // where the exchange began (its pulls all come from one
            // address, the balancer's or that relay's).
            return Ok(());
        }
        // A balancer's health checks are never limited: a relay marked
        // down for them would lose every channel.
        let health = routed.route == Route::Endpoint(Endpoint::Health);
        if self.limits.limits_requests() && !health {
            let client = self.limits.client(ex.conn.peer(), &ex.request);
            if let Err(reject) = self.limits.admit(client) {
                self.stats.rate_limited();
                return Err(reject);
            }
        }
        match self.access.check(routed) {
            Ok(_) => Ok(()),
            Err((denial, label)) => {
                match denial {
                    crate::access::Denial::UnknownToken => self.stats.bad_credential(),
                    _ => self.stats.denied(),
                }
                log::info!(
                    "refused {} {} ({}): {}",
                    routed.method.name(),
                    crate::mode::short(&routed.path),
                    label.as_deref().unwrap_or("no valid token"),
                    denial.reject().status
                );
                Err(denial.reject())
            }
        }
    }
}

/// The channels of `views` with their names as shown.
fn listed(views: &[ChannelView], whole: bool) -> Vec<ops::Listed<'_>> {
    views
        .iter()
        .map(|view| ops::Listed {
            shown: if whole {
                view.key.clone()
            } else {
                crate::mode::short(&view.key)
            },
            view,
        })
        .collect()
}

/// 405 for anything but GET and HEAD (OPTIONS is a preflight before this).
fn only_get(ex: &Exchange) -> Result<(), Reject> {
    match ex.request.method {
        Method::Get | Method::Head => Ok(()),
        _ => Err(Reject::method_not_allowed("GET, HEAD, OPTIONS")),
    }
}

/// Whether `--max-body` applies: queue sends, requesters, responders and
/// answers to reply paths (pubsub has its own limit).
fn body_is_limited(route: &Route) -> bool {
    match route {
        Route::Channel { channel, .. } => channel.mode != Mode::Pubsub,
        Route::Endpoint(Endpoint::Reply) => true,
        _ => false,
    }
}

/// How a reply path appears in the access log.
const REPLY_LOGGED: &str = "/_/reply/…";

/// Serves one request whose head was read: the one entry point.
pub fn serve(relay: &Relay, ex: &mut Exchange) {
    let mut routed = route::route(&ex.request);
    if let Ok(routed) = &mut routed {
        // Without an access file `Authorization: Bearer` is not the relay's:
        // it travels to a responder like any other header.
        if !relay.access.is_on()
            && matches!(routed.credential.token, Some((_, TokenSource::Bearer)))
        {
            routed.credential.token = None;
        }
    }
    if let (Ok(found), Some(proof)) = (&mut routed, ex.request.header("patch-relay")) {
        if relay.is_relay_proof(found, proof) {
            found.credential.relay = true;
        } else {
            relay.stats.denied();
            routed = Err(Reject::new(
                403,
                "Patch-Relay is not a valid relay proof for this channel",
            ));
        }
    }
    let result = match &routed {
        Err(reject) => Err(reject.clone()),
        Ok(_) if relay.is_stopping() => {
            ex.close();
            Err(Reject::shutting_down())
        }
        Ok(routed) => dispatch(relay, ex, routed),
    };
    if let Err(reject) = result {
        if !ex.is_responded() && ex.reject(&reject).is_err() {
            ex.close();
        }
    }
    let (kind, path) = match &routed {
        Ok(Routed {
            route: Route::Channel { channel, .. } | Route::Hook { channel, .. },
            path,
            ..
        }) => (Kind::Channel(channel.mode), path.as_str()),
        // A reply path is a secret: never logged whole.
        Ok(Routed {
            route: Route::Endpoint(Endpoint::Reply),
            ..
        }) => (Kind::Endpoint, REPLY_LOGGED),
        Ok(Routed {
            route: Route::Endpoint(_),
            path,
            ..
        }) => (Kind::Endpoint, path.as_str()),
        Ok(Routed { path, .. }) => (Kind::Other, path.as_str()),
        // An unroutable path is logged without its query (it may hold a token).
        Err(_) => (
            Kind::Other,
            ex.request.target.split('?').next().unwrap_or(""),
        ),
    };
    if ex.is_released() {
        // Observed by the thread that finished the response.
        return;
    }
    let finished = ex.finished_at().unwrap_or_else(Instant::now);
    relay.stats.observe(&Observation {
        kind,
        method: ex.request.method.as_str(),
        path,
        status: ex.status(),
        sent: ex.sent(),
        elapsed: finished.saturating_duration_since(ex.started()),
    });
}

/// Applies the request policy, then serves the route.
fn dispatch(relay: &Relay, ex: &mut Exchange, routed: &Routed) -> Result<(), Reject> {
    // A page served through the relay must not install a service worker
    // that would take over the relay's origin (piping-server does the same).
    if ex
        .request
        .header("service-worker")
        .is_some_and(|v| v.eq_ignore_ascii_case("script"))
    {
        return Err(Reject::bad_request(
            "service workers cannot be registered through the relay",
        ));
    }
    relay.admit(ex, routed)?;
    if let Some(max) = relay
        .config
        .max_body
        .filter(|_| body_is_limited(&routed.route))
    {
        ex.limit_body(max)?;
    }
    match &routed.route {
        Route::Preflight => preflight(ex, routed),
        Route::Endpoint(endpoint) => relay.endpoint(ex, *endpoint, routed),
        Route::Channel { channel, action } => relay.channel(ex, routed, channel, *action),
        Route::Hook {
            hook,
            channel,
            action,
        } => relay.hook(ex, routed, *hook, channel, *action),
    }
}

/// Answers a CORS preflight; a requester's path allows every method.
fn preflight(ex: &mut Exchange, routed: &Routed) -> Result<(), Reject> {
    let methods = match route::Channel::parse(routed.path.clone()).mode {
        Mode::Requester => REQUESTER_METHODS,
        _ => CHANNEL_METHODS,
    };
    let mut head = Head::new(200);
    let allowed_headers = ex
        .request
        .header("access-control-request-headers")
        .unwrap_or("*")
        .to_owned();
    head.header("Allow", methods)
        .header("Access-Control-Allow-Methods", methods)
        .header("Access-Control-Allow-Headers", allowed_headers)
        .header("Access-Control-Max-Age", "86400");
    ex.respond(head, b"").map_err(|_| hung_up(ex))
}

/// A receive on a queue or pubsub channel takes a message whole: a `Range`
/// for anything but all of it (`bytes=0-`, which media players send) is
/// refused with 409 before anything is consumed. Answering it 200 with the
/// next message would let a resuming client (wget retrying a cut transfer,
/// `curl -C -`) glue the start of one message to the rest of another; 416
/// makes both wget and curl report the file complete (exit 0); 409 makes
/// both fail (wget exit 8, `curl -f` exit 22), keeping what they had.
fn check_range(ex: &Exchange, mode: Mode, action: Action) -> Result<(), Reject> {
    if action != Action::Receive || !matches!(mode, Mode::Queue | Mode::Pubsub) {
        return Ok(());
    }
    match ex.request.header("range").map(str::trim) {
        None | Some("bytes=0-") => Ok(()),
        Some(_) => Err(Reject::new(
            409,
            "a message is received whole and cannot be resumed (Range); nothing was consumed",
        )),
    }
}

/// Answers a small text response; a client gone before it is closed.
fn respond_text(ex: &mut Exchange, status: u16, text: &str) -> Result<(), Reject> {
    ex.respond_text(status, text).map_err(|_| hung_up(ex))
}

/// The client left before its answer: close, and nothing more to say.
fn hung_up(ex: &mut Exchange) -> Reject {
    ex.close();
    Reject::hung_up()
}
