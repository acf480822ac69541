//! The relay's counters: atomics owned by the relay and given to each
//! family, so that counting never takes a lock and reading them (`/status`)
//! never blocks the relay. [`Stats::observe`] is the one place that sees each
//! finished request (its kind, status, bytes and duration): it counts it and
//! writes the debug access line.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::route::Mode;

/// What a request was, for the counters: a channel of some mode, a server
/// endpoint, or neither (a preflight, or a request refused before routing).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Channel(Mode),
    Endpoint,
    Other,
}

impl Kind {
    const COUNT: usize = Mode::ALL.len() + 2;

    fn index(self) -> usize {
        match self {
            Kind::Channel(mode) => mode.index(),
            Kind::Endpoint => Mode::ALL.len(),
            Kind::Other => Mode::ALL.len() + 1,
        }
    }

    fn label(index: usize) -> &'static str {
        match Mode::ALL.get(index) {
            Some(mode) => mode.as_str(),
            None if index == Mode::ALL.len() => "endpoint",
            None => "other",
        }
    }
}

/// Status classes counted: 1xx to 5xx, and "none" for a request that got no
/// response (its client left, or its connection was cut before a status).
const CLASSES: [&str; 6] = ["none", "1xx", "2xx", "3xx", "4xx", "5xx"];

/// One finished request, as [`Stats::observe`] sees it.
#[derive(Debug)]
pub struct Observation<'a> {
    pub kind: Kind,
    pub method: &'a str,
    /// The normalized path (never the query, which may hold a token).
    pub path: &'a str,
    pub status: Option<u16>,
    /// Body bytes of the response.
    pub sent: u64,
    pub elapsed: Duration,
}

/// What observing a request needs, kept for the thread that will finish
/// its response when that is not the request's own.
#[derive(Debug)]
pub struct Seed {
    pub kind: Kind,
    pub method: &'static str,
    pub path: String,
    pub started: Instant,
}

/// The counters. Gauges go up and down; `_total` counters only up.
pub struct Stats {
    started: Instant,
    /// When the relay started, as wall-clock time (for `process_start_time_seconds`).
    started_at: SystemTime,
    /// Connections open now (for --max-connections).
    pub open: AtomicUsize,
    /// Requests between their head and their answer; shutdown waits for them.
    pub busy: AtomicUsize,
    requests: [[AtomicU64; CLASSES.len()]; Kind::COUNT],
    /// Waiters parked now, by mode.
    waiting: [AtomicUsize; Mode::ALL.len()],
    /// Waiters ever parked, by mode.
    parked: [AtomicU64; Mode::ALL.len()],
    /// Streaming subscriptions open now.
    streams: AtomicUsize,
    streams_total: AtomicU64,
    pairs: AtomicU64,
    relayed: AtomicU64,
    hangups: AtomicU64,
    timeouts: AtomicU64,
    published: AtomicU64,
    delivered: AtomicU64,
    evicted: AtomicU64,
    /// Refused for want of a permission (401 without a credential, 403).
    denied: AtomicU64,
    /// Refused for an unknown token or a wrong hook secret.
    bad_credentials: AtomicU64,
    rate_limited: AtomicU64,
    /// Connections refused by --max-connections-per-ip.
    refused_per_ip: AtomicU64,
    /// Tunnels open now, ever opened, whose target could not be reached,
    /// and the bytes they carried each way.
    tunnels: AtomicUsize,
    tunnels_total: AtomicU64,
    tunnel_failures: AtomicU64,
    tunnel_to_target: AtomicU64,
    tunnel_from_target: AtomicU64,
    /// Notifications a backend accepted, and refused or never answered.
    notify_sent: AtomicU64,
    notify_failed: AtomicU64,
    /// The pubsub store's file (`--store`).
    store: StoreFigures,
}

/// Upper bounds (seconds) of the store's commit-latency histogram buckets.
const COMMIT_BUCKETS: [f64; 12] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0,
];

/// The pubsub store's figures, written by its writer thread; shown only
/// once it has written them (with `--store`).
#[derive(Default)]
struct StoreFigures {
    enabled: AtomicBool,
    bytes: AtomicU64,
    rows: AtomicU64,
    commits: AtomicU64,
    failed: AtomicU64,
    /// Commit latency: the sum and the last, in microseconds, and how many
    /// commits took at most each of [`COMMIT_BUCKETS`] (not cumulative).
    commit_micros: AtomicU64,
    last_commit_micros: AtomicU64,
    buckets: [AtomicU64; COMMIT_BUCKETS.len()],
}

impl Default for Stats {
    fn default() -> Stats {
        Stats::new()
    }
}

impl Stats {
    /// Every counter at zero, the uptime counted from now.
    pub fn new() -> Stats {
        Stats {
            started: Instant::now(),
            started_at: SystemTime::now(),
            open: AtomicUsize::new(0),
            busy: AtomicUsize::new(0),
            requests: Default::default(),
            waiting: Default::default(),
            parked: Default::default(),
            streams: AtomicUsize::new(0),
            streams_total: AtomicU64::new(0),
            pairs: AtomicU64::new(0),
            relayed: AtomicU64::new(0),
            hangups: AtomicU64::new(0),
            timeouts: AtomicU64::new(0),
            published: AtomicU64::new(0),
            delivered: AtomicU64::new(0),
            evicted: AtomicU64::new(0),
            denied: AtomicU64::new(0),
            bad_credentials: AtomicU64::new(0),
            rate_limited: AtomicU64::new(0),
            refused_per_ip: AtomicU64::new(0),
            tunnels: AtomicUsize::new(0),
            tunnels_total: AtomicU64::new(0),
            tunnel_failures: AtomicU64::new(0),
            tunnel_to_target: AtomicU64::new(0),
            tunnel_from_target: AtomicU64::new(0),
            notify_sent: AtomicU64::new(0),
            notify_failed: AtomicU64::new(0),
            store: StoreFigures::default(),
        }
    }

    /// Counts a finished request and writes its access line (debug).
    pub fn observe(&self, seen: &Observation) {
        let class = seen.status.map_or(0, |s| usize::from(s / 100).min(5));
        self.requests[seen.kind.index()][class].fetch_add(1, Ordering::Relaxed);
        if seen.status == Some(408) {
            self.timeouts.fetch_add(1, Ordering::Relaxed);
        }
        log::debug!(
            "{} {:?} {} {} bytes {:.1} ms",
            seen.method,
            seen.path,
            seen.status
                .map_or_else(|| "-".to_owned(), |s| s.to_string()),
            seen.sent,
            seen.elapsed.as_secs_f64() * 1e3
        );
    }

    /// Observes a request whose response another thread finished (with
    /// `status`, None if it could not be written, and `sent` body bytes) and
    /// counts it out of `busy`: its own thread may not learn of it until its
    /// client's next request, and then neither observes it nor counts it again.
    pub fn finished_elsewhere(&self, seed: &Seed, status: Option<u16>, sent: u64) {
        self.observe(&Observation {
            kind: seed.kind,
            method: seed.method,
            path: &seed.path,
            status,
            sent,
            elapsed: seed.started.elapsed(),
        });
        self.busy.fetch_sub(1, Ordering::SeqCst);
    }

    /// A waiter of `mode` parked.
    pub fn park(&self, mode: Mode) {
        self.waiting[mode.index()].fetch_add(1, Ordering::Relaxed);
        self.parked[mode.index()].fetch_add(1, Ordering::Relaxed);
    }

    /// `n` waiters of `mode` left their line (paired, timed out, gone, ended).
    pub fn unpark(&self, mode: Mode, n: usize) {
        self.waiting[mode.index()].fetch_sub(n, Ordering::Relaxed);
    }

    /// A streaming subscription started.
    pub fn stream_started(&self) {
        self.streams.fetch_add(1, Ordering::Relaxed);
        self.streams_total.fetch_add(1, Ordering::Relaxed);
    }

    /// A streaming subscription ended.
    pub fn stream_ended(&self) {
        self.streams.fetch_sub(1, Ordering::Relaxed);
    }

    /// A sender and a receiver met and `bytes` of body went from one to the other.
    pub fn paired(&self, bytes: u64) {
        self.pairs.fetch_add(1, Ordering::Relaxed);
        self.relayed.fetch_add(bytes, Ordering::Relaxed);
    }

    /// A client was found to have hung up while it waited.
    pub fn hung_up(&self) {
        self.hangups.fetch_add(1, Ordering::Relaxed);
    }

    /// A pubsub message was published.
    pub fn published(&self) {
        self.published.fetch_add(1, Ordering::Relaxed);
    }

    /// `n` pubsub messages were handed to subscribers.
    pub fn delivered(&self, n: u64) {
        self.delivered.fetch_add(n, Ordering::Relaxed);
    }

    /// `n` retained pubsub messages were evicted.
    pub fn evicted(&self, n: u64) {
        self.evicted.fetch_add(n, Ordering::Relaxed);
    }

    /// A request was refused for want of a permission.
    pub fn denied(&self) {
        self.denied.fetch_add(1, Ordering::Relaxed);
    }

    /// A request presented an unknown token or a wrong hook secret.
    pub fn bad_credential(&self) {
        self.bad_credentials.fetch_add(1, Ordering::Relaxed);
    }

    /// A request was refused by --rate-limit.
    pub fn rate_limited(&self) {
        self.rate_limited.fetch_add(1, Ordering::Relaxed);
    }

    /// A connection was refused by --max-connections-per-ip.
    pub fn refused_per_ip(&self) {
        self.refused_per_ip.fetch_add(1, Ordering::Relaxed);
    }

    /// A tunnel opened.
    pub fn tunnel_opened(&self) {
        self.tunnels.fetch_add(1, Ordering::Relaxed);
        self.tunnels_total.fetch_add(1, Ordering::Relaxed);
    }

    /// A tunnel closed.
    pub fn tunnel_closed(&self) {
        self.tunnels.fetch_sub(1, Ordering::Relaxed);
    }

    /// A tunnel's target could not be reached.
    pub fn tunnel_failed(&self) {
        self.tunnel_failures.fetch_add(1, Ordering::Relaxed);
    }

    /// `n` bytes went through a tunnel, to its target or from it.
    pub fn tunnel_carried(&self, to_target: bool, n: u64) {
        let counter = if to_target {
            &self.tunnel_to_target
        } else {
            &self.tunnel_from_target
        };
        counter.fetch_add(n, Ordering::Relaxed);
    }

    /// A notification backend accepted a message (`sent`) or did not.
    pub fn notified(&self, sent: bool) {
        let counter = if sent {
            &self.notify_sent
        } else {
            &self.notify_failed
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// Requests waiting now, of every mode, and streaming subscriptions.
    pub fn waiting_now(&self) -> u64 {
        let parked: usize = self.waiting.iter().map(|w| w.load(Ordering::Relaxed)).sum();
        (parked + self.streams.load(Ordering::Relaxed)) as u64
    }

    /// Messages relayed so far (queue and req/res pairs).
    pub fn pairs(&self) -> u64 {
        self.pairs.load(Ordering::Relaxed)
    }

    /// The store's file is `bytes` large and holds `rows` messages.
    pub fn store_written(&self, bytes: u64, rows: u64) {
        self.store.enabled.store(true, Ordering::Relaxed);
        self.store.bytes.store(bytes, Ordering::Relaxed);
        self.store.rows.store(rows, Ordering::Relaxed);
    }

    /// A commit to the store's file took `took`.
    pub fn store_committed(&self, took: Duration) {
        let micros = u64::try_from(took.as_micros()).unwrap_or(u64::MAX);
        let store = &self.store;
        store.commits.fetch_add(1, Ordering::Relaxed);
        store.commit_micros.fetch_add(micros, Ordering::Relaxed);
        store.last_commit_micros.store(micros, Ordering::Relaxed);
        if let Some(bucket) = COMMIT_BUCKETS
            .iter()
            .position(|&le| took.as_secs_f64() <= le)
        {
            store.buckets[bucket].fetch_add(1, Ordering::Relaxed);
        }
    }

    /// A commit to the store's file failed.
    pub fn store_failed(&self) {
        self.store.failed.fetch_add(1, Ordering::Relaxed);
    }

    /// Pubsub messages published so far.
    pub fn published_count(&self) -> u64 {
        self.published.load(Ordering::Relaxed)
    }

    /// How long the relay has run.
    pub fn uptime(&self) -> Duration {
        self.started.elapsed()
    }

    /// The counters as the JSON object `/status` returns.
    pub fn to_json(&self) -> String {
        let load = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
        let mut out = String::with_capacity(1024);
        let _ = write!(
            out,
            "{{\"version\":\"{}\",\"uptime_seconds\":{:.3},",
            env!("CARGO_PKG_VERSION"),
            self.uptime().as_secs_f64()
        );
        // The cheap figures only: the page polls this every second.
        let process = Process::memory();
        let _ = write!(
            out,
            "\"connections\":{{\"open\":{},\"busy\":{}}},\"process\":{{\"threads\":{},\"resident_memory_bytes\":{}}},",
            self.open.load(Ordering::Relaxed),
            self.busy.load(Ordering::Relaxed),
            process.threads,
            process.resident_bytes
        );
        out.push_str("\"requests\":{");
        for (i, classes) in self.requests.iter().enumerate() {
            if i > 0 {
                out.push(',');
            }
            let _ = write!(out, "\"{}\":{{", Kind::label(i));
            for (j, counter) in classes.iter().enumerate() {
                if j > 0 {
                    out.push(',');
                }
                let _ = write!(out, "\"{}\":{}", CLASSES[j], load(counter));
            }
            out.push('}');
        }
        out.push_str("},");
        let by_mode = |out: &mut String, name: &str, value: &dyn Fn(usize) -> u64| {
            let _ = write!(out, "\"{name}\":{{");
            for (i, mode) in Mode::ALL.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                let _ = write!(out, "\"{}\":{}", mode.as_str(), value(i));
            }
            out.push_str("},");
        };
        by_mode(&mut out, "waiters", &|i| {
            self.waiting[i].load(Ordering::Relaxed) as u64
        });
        by_mode(&mut out, "parked_total", &|i| load(&self.parked[i]));
        let _ = write!(
            out,
            "\"pairs_total\":{},\"bytes_relayed_total\":{},\"hangups_total\":{},\"timeouts_total\":{},",
            load(&self.pairs),
            load(&self.relayed),
            load(&self.hangups),
            load(&self.timeouts)
        );
        let _ = write!(
            out,
            "\"access\":{{\"denied_total\":{},\"bad_credentials_total\":{},\"rate_limited_total\":{},\"connections_refused_per_ip_total\":{}}},",
            load(&self.denied),
            load(&self.bad_credentials),
            load(&self.rate_limited),
            load(&self.refused_per_ip)
        );
        let _ = write!(
            out,
            "\"tunnels\":{{\"open\":{},\"opened_total\":{},\"failed_total\":{},\"bytes_to_target_total\":{},\"bytes_from_target_total\":{}}},\"notify\":{{\"sent_total\":{},\"failed_total\":{}}},",
            self.tunnels.load(Ordering::Relaxed),
            load(&self.tunnels_total),
            load(&self.tunnel_failures),
            load(&self.tunnel_to_target),
            load(&self.tunnel_from_target),
            load(&self.notify_sent),
            load(&self.notify_failed)
        );
        let _ = write!(
            out,
            "\"pubsub\":{{\"published_total\":{},\"delivered_total\":{},\"evicted_total\":{},\"streams\":{},\"streams_total\":{}}}",
            load(&self.published),
            load(&self.delivered),
            load(&self.evicted),
            self.streams.load(Ordering::Relaxed),
            load(&self.streams_total)
        );
        let store = &self.store;
        if store.enabled.load(Ordering::Relaxed) {
            let commits = load(&store.commits);
            let _ = write!(
                out,
                ",\"store\":{{\"bytes\":{},\"rows\":{},\"commits_total\":{},\"failed_total\":{},\"commit_seconds_mean\":{:.6},\"commit_seconds_last\":{:.6}}}",
                load(&store.bytes),
                load(&store.rows),
                commits,
                load(&store.failed),
                load(&store.commit_micros) as f64 / 1e6 / commits.max(1) as f64,
                load(&store.last_commit_micros) as f64 / 1e6
            );
        }
        out.push('}');
        out
    }
}

impl Stats {
    /// The counters, and this process's figures, in the Prometheus text
    /// exposition format (version 0.0.4): each family once, with its HELP
    /// and TYPE, in base units.
    pub fn to_prometheus(&self) -> String {
        let load = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
        let mut out = Exposition(String::with_capacity(8 * 1024));
        out.family(
            "patchcord_requests_total",
            "counter",
            "Requests answered, by what they were (a channel mode, an endpoint, other) and status class.",
        );
        for (i, classes) in self.requests.iter().enumerate() {
            for (j, counter) in classes.iter().enumerate() {
                out.sample(
                    "patchcord_requests_total",
                    &[("kind", Kind::label(i)), ("class", CLASSES[j])],
                    load(counter),
                );
            }
        }
        out.family(
            "patchcord_waiters",
            "gauge",
            "Requests waiting for a counterpart now, by mode.",
        );
        for (i, mode) in Mode::ALL.iter().enumerate() {
            let waiting = self.waiting[i].load(Ordering::Relaxed) as u64;
            out.sample("patchcord_waiters", &[("mode", mode.as_str())], waiting);
        }
        out.family(
            "patchcord_parked_total",
            "counter",
            "Requests that waited for a counterpart, by mode.",
        );
        for (i, mode) in Mode::ALL.iter().enumerate() {
            out.sample(
                "patchcord_parked_total",
                &[("mode", mode.as_str())],
                load(&self.parked[i]),
            );
        }
        let simple: [(&str, &str, &str, u64); 21] = [
            (
                "patchcord_open_connections",
                "gauge",
                "Client connections open now.",
                self.open.load(Ordering::Relaxed) as u64,
            ),
            (
                "patchcord_pairs_total",
                "counter",
                "Messages relayed from a sender to a receiver (queue, req/res).",
                load(&self.pairs),
            ),
            (
                "patchcord_relayed_bytes_total",
                "counter",
                "Body bytes relayed from senders to receivers.",
                load(&self.relayed),
            ),
            (
                "patchcord_hangups_total",
                "counter",
                "Waiting clients found to have hung up.",
                load(&self.hangups),
            ),
            (
                "patchcord_timeouts_total",
                "counter",
                "Requests answered 408: nobody came in time.",
                load(&self.timeouts),
            ),
            (
                "patchcord_pubsub_published_total",
                "counter",
                "Pubsub messages published.",
                load(&self.published),
            ),
            (
                "patchcord_pubsub_delivered_total",
                "counter",
                "Pubsub messages handed to subscribers.",
                load(&self.delivered),
            ),
            (
                "patchcord_pubsub_evicted_total",
                "counter",
                "Retained pubsub messages evicted.",
                load(&self.evicted),
            ),
            (
                "patchcord_pubsub_streams",
                "gauge",
                "Streaming pubsub subscriptions open now.",
                self.streams.load(Ordering::Relaxed) as u64,
            ),
            (
                "patchcord_denied_total",
                "counter",
                "Requests refused for want of a permission (401 without a credential, 403).",
                load(&self.denied),
            ),
            (
                "patchcord_bad_credentials_total",
                "counter",
                "Requests with an unknown token or a wrong hook secret.",
                load(&self.bad_credentials),
            ),
            (
                "patchcord_rate_limited_total",
                "counter",
                "Requests refused by --rate-limit.",
                load(&self.rate_limited),
            ),
            (
                "patchcord_connections_refused_per_ip_total",
                "counter",
                "Connections refused by --max-connections-per-ip.",
                load(&self.refused_per_ip),
            ),
            (
                "patchcord_tunnels",
                "gauge",
                "WebSocket tunnels open now.",
                self.tunnels.load(Ordering::Relaxed) as u64,
            ),
            (
                "patchcord_tunnels_opened_total",
                "counter",
                "WebSocket tunnels opened.",
                load(&self.tunnels_total),
            ),
            (
                "patchcord_tunnel_failures_total",
                "counter",
                "Tunnels refused 502: the target could not be reached.",
                load(&self.tunnel_failures),
            ),
            (
                "patchcord_tunnel_to_target_bytes_total",
                "counter",
                "Bytes carried by tunnels to their targets.",
                load(&self.tunnel_to_target),
            ),
            (
                "patchcord_tunnel_from_target_bytes_total",
                "counter",
                "Bytes carried by tunnels from their targets.",
                load(&self.tunnel_from_target),
            ),
            (
                "patchcord_notifications_sent_total",
                "counter",
                "Notifications a backend accepted (one per backend).",
                load(&self.notify_sent),
            ),
            (
                "patchcord_notifications_failed_total",
                "counter",
                "Notifications a backend refused or did not answer in time.",
                load(&self.notify_failed),
            ),
            (
                "patchcord_busy_requests",
                "gauge",
                "Requests between their head and their answer now.",
                self.busy.load(Ordering::Relaxed) as u64,
            ),
        ];
        for (name, kind, help, value) in simple {
            out.family(name, kind, help);
            out.sample(name, &[], value);
        }
        self.store.expose(&mut out);
        let process = Process::read();
        let start = self
            .started_at
            .duration_since(UNIX_EPOCH)
            .map_or(0.0, |d| d.as_secs_f64());
        let figures: [(&str, &str, &str, f64); 5] = [
            (
                "process_resident_memory_bytes",
                "gauge",
                "Resident memory size in bytes.",
                process.resident_bytes as f64,
            ),
            (
                "process_threads",
                "gauge",
                "Threads of the process.",
                process.threads as f64,
            ),
            (
                "process_open_fds",
                "gauge",
                "Open file descriptors.",
                process.open_fds as f64,
            ),
            (
                "process_cpu_seconds_total",
                "counter",
                "User and system CPU time spent, in seconds.",
                process.cpu_seconds,
            ),
            (
                "process_start_time_seconds",
                "gauge",
                "Start time of the process since the Unix epoch, in seconds.",
                start,
            ),
        ];
        for (name, kind, help, value) in figures {
            out.family(name, kind, help);
            out.sample_f64(name, value);
        }
        out.0
    }
}

/// The text exposition being written.
struct Exposition(String);

impl Exposition {
    fn family(&mut self, name: &str, kind: &str, help: &str) {
        let _ = writeln!(self.0, "# HELP {name} {help}");
        let _ = writeln!(self.0, "# TYPE {name} {kind}");
    }

    /// One sample; label values here are the relay's own words, never a
    /// client's, so they need no escaping.
    fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: u64) {
        self.0.push_str(name);
        if !labels.is_empty() {
            self.0.push('{');
            for (i, (label, value)) in labels.iter().enumerate() {
                if i > 0 {
                    self.0.push(',');
                }
                let _ = write!(self.0, "{label}=\"{value}\"");
            }
            self.0.push('}');
        }
        let _ = writeln!(self.0, " {value}");
    }

    fn sample_f64(&mut self, name: &str, value: f64) {
        let _ = writeln!(self.0, "{name} {value}");
    }
}

impl StoreFigures {
    /// The store's families, with `--store` only.
    fn expose(&self, out: &mut Exposition) {
        if !self.enabled.load(Ordering::Relaxed) {
            return;
        }
        let load = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
        for (name, kind, help, value) in [
            (
                "patchcord_store_bytes",
                "gauge",
                "Bytes of the pubsub store's file and its WAL.",
                load(&self.bytes),
            ),
            (
                "patchcord_store_rows",
                "gauge",
                "Messages in the pubsub store's file.",
                load(&self.rows),
            ),
            (
                "patchcord_store_failures_total",
                "counter",
                "Commits to the pubsub store that failed (publishers answered 507 or 503, or deletions put off).",
                load(&self.failed),
            ),
        ] {
            out.family(name, kind, help);
            out.sample(name, &[], value);
        }
        let name = "patchcord_store_commit_seconds";
        out.family(
            name,
            "histogram",
            "Time to commit a group of messages to the pubsub store.",
        );
        let mut cumulative = 0;
        for (le, bucket) in COMMIT_BUCKETS.iter().zip(&self.buckets) {
            cumulative += load(bucket);
            let _ = writeln!(out.0, "{name}_bucket{{le=\"{le}\"}} {cumulative}");
        }
        let commits = load(&self.commits);
        let _ = writeln!(out.0, "{name}_bucket{{le=\"+Inf\"}} {commits}");
        out.sample_f64(
            &format!("{name}_sum"),
            load(&self.commit_micros) as f64 / 1e6,
        );
        out.sample(&format!("{name}_count"), &[], commits);
    }
}

/// This process's own figures, from `/proc/self` (zero where unreadable).
#[derive(Debug, Default, Clone, Copy)]
pub struct Process {
    pub resident_bytes: u64,
    pub threads: u64,
    pub open_fds: u64,
    pub cpu_seconds: f64,
}

impl Process {
    /// Reads them all now: a few small files, no lock of the relay's (the
    /// kernel lists descriptors and sums threads' times in proportion to them).
    pub fn read() -> Process {
        let mut process = Process::memory();
        process.open_fds = std::fs::read_dir("/proc/self/fd").map_or(0, |d| d.count() as u64);
        if let Ok(stat) = std::fs::read_to_string("/proc/self/stat") {
            // Fields after the command name (which may hold spaces): utime
            // and stime are the 12th and 13th of them, in clock ticks.
            let after = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
            let fields: Vec<&str> = after.split_whitespace().collect();
            let ticks = |i: usize| fields.get(i).and_then(|f| f.parse::<u64>().ok());
            // SAFETY: sysconf has no memory effects.
            let per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
            if let (Some(user), Some(system)) = (ticks(11), ticks(12)) {
                if per_second > 0 {
                    process.cpu_seconds = (user + system) as f64 / per_second as f64;
                }
            }
        }
        process
    }

    /// Threads and resident memory only: one small file, whatever the load.
    pub fn memory() -> Process {
        let mut process = Process::default();
        if let Ok(status) = std::fs::read_to_string("/proc/self/status") {
            for line in status.lines() {
                let field = |prefix: &str| -> Option<u64> {
                    line.strip_prefix(prefix)?
                        .trim()
                        .trim_end_matches(" kB")
                        .parse()
                        .ok()
                };
                if let Some(kib) = field("VmRSS:") {
                    process.resident_bytes = kib * 1024;
                } else if let Some(n) = field("Threads:") {
                    process.threads = n;
                }
            }
        }
        process
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn observations_are_counted_by_kind_and_class() {
        let stats = Stats::new();
        let seen = |kind, status| Observation {
            kind,
            method: "GET",
            path: "/a",
            status,
            sent: 0,
            elapsed: Duration::ZERO,
        };
        stats.observe(&seen(Kind::Channel(Mode::Queue), Some(200)));
        stats.observe(&seen(Kind::Channel(Mode::Queue), Some(408)));
        stats.observe(&seen(Kind::Endpoint, Some(200)));
        stats.observe(&seen(Kind::Other, None));
        stats.park(Mode::Pubsub);
        stats.park(Mode::Pubsub);
        stats.unpark(Mode::Pubsub, 1);
        let json = stats.to_json();
        assert!(
            json.contains(
                "\"queue\":{\"none\":0,\"1xx\":0,\"2xx\":1,\"3xx\":0,\"4xx\":1,\"5xx\":0}"
            ),
            "{json}"
        );
        assert!(
            json.contains("\"endpoint\":{\"none\":0,\"1xx\":0,\"2xx\":1"),
            "{json}"
        );
        assert!(json.contains("\"other\":{\"none\":1"), "{json}");
        assert!(
            json.contains("\"waiters\":{\"queue\":0,\"pubsub\":1,"),
            "{json}"
        );
        assert!(
            json.contains("\"parked_total\":{\"queue\":0,\"pubsub\":2,"),
            "{json}"
        );
        assert!(json.contains("\"timeouts_total\":1"), "{json}");
        assert!(json.starts_with('{') && json.ends_with('}'));
        assert_eq!(json.matches('{').count(), json.matches('}').count());
    }
}
