//! The server: bind, print the bound address, accept connections and hand each
//! to a worker thread, serve requests on it in order, and shut down cleanly on
//! SIGINT/SIGTERM. Reading order: [`run`] → [`accept_loop`] (the main loop) →
//! [`serve_connection`], which reads each request head and hands the request
//! to `app::serve`. This file knows HTTP framing and connections, not modes
//! or endpoints.
//!
//! Threads: one per open connection, from an elastic pool. A finished worker
//! offers itself for the next connection for [`RETIRE_AFTER`], then exits; the
//! accept loop reuses an idle worker when one is offering, else spawns one. So
//! the pool is exactly as large as the connections need, up to
//! `--max-connections`, and a pool of N blocked workers never starves N+1.

use std::io::{self, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread;
use std::time::{Duration, Instant};

use crossbeam_channel::bounded;
use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
use signal_hook::iterator::Signals;

use crate::access::Access;
use crate::app::{self, Relay};
use crate::config::Config;
use crate::error::{Error, Reject};
use crate::http::request::{HeadError, HeadTimeouts, read_head};
use crate::http::{Conn, Exchange, refuse};
use crate::mailbox::{Mailbox, Poster};
use crate::mode::pubsub::Restored;

/// Stack size of connection threads: small so that 32-bit Pis can hold
/// thousands of waiters; nothing on a connection thread recurses or keeps
/// large buffers on the stack.
pub const STACK_SIZE: usize = 128 * 1024;

/// How long an idle worker waits for another connection before it exits.
const RETIRE_AFTER: Duration = Duration::from_secs(30);

/// How long shutdown waits for waiters to be answered and transfers to end.
const SHUTDOWN_GRACE: Duration = Duration::from_millis(1500);

/// Binds, prints `listening on http://ADDR`, serves until SIGINT or SIGTERM,
/// then answers every waiter with 503 and returns (the process then exits 0).
/// A second signal exits at once with status 1. SIGHUP re-reads the access
/// file (`systemctl reload`).
pub fn run(config: Config, access: Access, restored: Option<Restored>) -> Result<(), Error> {
    raise_open_files_limit(config.max_connections);
    // Registered before anything else: a signal from now on is kept until
    // the thread below takes it.
    let mut signals = Signals::new([SIGINT, SIGTERM, SIGHUP]).map_err(Error::Signal)?;

    let listener = TcpListener::bind(config.listen).map_err(|source| Error::Bind {
        addr: config.listen.to_string(),
        source,
    })?;
    let addr = listener.local_addr().map_err(Error::LocalAddr)?;
    let mut stdout = io::stdout().lock();
    let _ = writeln!(stdout, "listening on http://{addr}");
    let _ = stdout.flush();
    drop(stdout);
    log::info!(
        "patchcord {} listening on http://{addr}",
        env!("CARGO_PKG_VERSION")
    );

    let relay = Arc::new(Relay::new(config, access, restored).map_err(Error::Spawn)?);
    let (stop_tx, stop_rx) = bounded::<()>(1);
    let signalled = Arc::clone(&relay);
    thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            let mut stops = 0;
            for signal in signals.forever() {
                if signal == SIGHUP {
                    signalled.reload();
                    continue;
                }
                stops += 1;
                if stops > 1 {
                    std::process::exit(1);
                }
                let _ = stop_tx.try_send(());
            }
        })
        .map_err(Error::Spawn)?;
    let accepting = Arc::clone(&relay);
    thread::Builder::new()
        .name("accept".into())
        .spawn(move || accept_loop(&listener, &accepting))
        .map_err(Error::Spawn)?;

    let _ = stop_rx.recv();
    shut_down(&relay);
    Ok(())
}

/// Answers every waiter with 503, then waits a short grace for the requests
/// in progress to finish.
fn shut_down(relay: &Relay) {
    let waiters = relay.stop();
    log::info!("stopping: answering {waiters} waiters with 503");
    let deadline = Instant::now() + SHUTDOWN_GRACE;
    while relay.stats.busy.load(Ordering::SeqCst) > 0 && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(10));
    }
    relay.finish();
    log::info!("stopped");
}

/// Idle workers, each offering its mailbox for the next connection; the
/// most recently idle is reused first (its stack and caches are warm), the
/// longest idle retire.
#[derive(Default)]
struct Pool {
    /// Held for a push or a pop, never across a system call.
    idle: Mutex<Vec<Poster<Accepted>>>,
}

impl Pool {
    fn lock(&self) -> MutexGuard<'_, Vec<Poster<Accepted>>> {
        self.idle.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Hands `stream` to an idle worker, or gives it back if none is idle.
    fn hand_over(&self, stream: Accepted) -> Result<(), Accepted> {
        let mut stream = stream;
        loop {
            // Popped in a statement of its own: the lock is released before
            // the worker is woken.
            let worker = self.lock().pop();
            let Some(worker) = worker else {
                return Err(stream);
            };
            match worker.post(stream) {
                Ok(()) => return Ok(()),
                Err(back) => stream = back,
            }
        }
    }

    /// A worker's life: serves `first`, then each connection handed to it,
    /// until it has been idle for [`RETIRE_AFTER`].
    fn work(&self, relay: &Relay, first: Accepted) {
        let (mailbox, poster) = Mailbox::new();
        let mut next = Some(first);
        while let Some(accepted) = next {
            serve_connection(relay, accepted);
            let offer = poster.clone();
            self.lock().push(offer);
            next = match mailbox.wait(Some(Instant::now() + RETIRE_AFTER)) {
                Ok(stream) => Some(stream),
                Err(_) => {
                    let mut idle = self.lock();
                    match idle.iter().position(|w| w.is_same(&poster)) {
                        Some(at) => {
                            idle.swap_remove(at);
                            None
                        }
                        // Taken just now: a connection is on its way.
                        None => {
                            drop(idle);
                            mailbox.wait(None).ok()
                        }
                    }
                }
            };
        }
    }
}

/// Accepts connections forever. An accept error (out of descriptors, a
/// connection aborted before accept) is logged and waited out, never fatal.
fn accept_loop(listener: &TcpListener, relay: &Arc<Relay>) {
    let pool = Arc::new(Pool::default());
    // ── the main loop ──
    loop {
        match listener.accept() {
            Ok((stream, peer)) => admit(stream, peer, relay, &pool),
            Err(e)
                if e.kind() == io::ErrorKind::ConnectionAborted
                    || e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => {
                log::warn!("accept failed: {e}; retrying shortly");
                thread::sleep(Duration::from_millis(100));
            }
        }
    }
}

/// Hands `stream` to an idle worker or a new one, or refuses it with 503.
fn admit(stream: TcpStream, peer: SocketAddr, relay: &Arc<Relay>, pool: &Arc<Pool>) {
    if relay.is_stopping() {
        return turn_away(stream, relay, "server shutting down");
    }
    if !relay.limits.open_connection(peer) {
        relay.stats.refused_per_ip();
        log::info!("refused a connection: --max-connections-per-ip reached for {peer:?}");
        return turn_away(stream, relay, "too many connections from your address");
    }
    let open = &relay.stats.open;
    if open.fetch_add(1, Ordering::SeqCst) >= relay.config.max_connections {
        open.fetch_sub(1, Ordering::SeqCst);
        relay.limits.close_connection(peer);
        log::warn!(
            "refused a connection: --max-connections {} reached",
            relay.config.max_connections
        );
        return turn_away(stream, relay, "too many connections; try again later");
    }
    let Err(accepted) = pool.hand_over(Accepted { stream, peer }) else {
        return;
    };
    // The slot lets the stream be taken back if the thread cannot be started.
    let slot = Arc::new(Mutex::new(Some(accepted)));
    let worker_slot = Arc::clone(&slot);
    let worker_relay = Arc::clone(relay);
    let worker_pool = Arc::clone(pool);
    let spawned = thread::Builder::new()
        .name("conn".into())
        .stack_size(STACK_SIZE)
        .spawn(move || {
            let first = worker_slot.lock().ok().and_then(|mut s| s.take());
            if let Some(first) = first {
                worker_pool.work(&worker_relay, first);
            }
        });
    if let Err(e) = spawned {
        relay.stats.open.fetch_sub(1, Ordering::SeqCst);
        relay.limits.close_connection(peer);
        log::warn!("cannot start a connection thread: {e}");
        if let Some(accepted) = slot.lock().ok().and_then(|mut s| s.take()) {
            turn_away(
                accepted.stream,
                relay,
                "server out of threads; try again later",
            );
        }
    }
}

/// Answers a connection that will not be served with 503 and closes it.
fn turn_away(stream: TcpStream, relay: &Relay, reason: &'static str) {
    let _ = stream.set_write_timeout(Some(Duration::from_millis(100)));
    let _ = refuse(&stream, &Reject::new(503, reason), &relay.common);
}

/// Decrements a counter when dropped, also when the thread unwinds.
struct Counted<'a>(&'a AtomicUsize);

impl<'a> Counted<'a> {
    fn new(counter: &'a AtomicUsize) -> Counted<'a> {
        counter.fetch_add(1, Ordering::SeqCst);
        Counted(counter)
    }
}

impl Drop for Counted<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// An accepted connection and the address it came from.
struct Accepted {
    stream: TcpStream,
    peer: SocketAddr,
}

/// Gives back a connection counted against its address when dropped.
struct PerIp<'a>(&'a Relay, SocketAddr);

impl Drop for PerIp<'_> {
    fn drop(&mut self) {
        self.0.limits.close_connection(self.1);
    }
}

/// Serves the requests of one connection, in order, until it closes.
fn serve_connection(relay: &Relay, accepted: Accepted) {
    // `open` and the address's count were taken in admit(); these give
    // them back however we leave.
    let _open = Counted(&relay.stats.open);
    let _per_ip = PerIp(relay, accepted.peer);
    let config = &relay.config;
    let mut conn = Conn::new(accepted.stream, config.idle_timeout);
    let timeouts = HeadTimeouts {
        header: config.header_timeout,
        idle: config.idle_timeout,
    };
    let mut first = true;
    // ── the connection's main loop: one request at a time ──
    loop {
        let request = match read_head(&mut conn, timeouts, first) {
            Ok(request) => request,
            Err(HeadError::Closed) => return,
            Err(HeadError::Slow) => {
                log::debug!("{:?}: request head too slow; closed", conn.peer());
                return;
            }
            Err(HeadError::Io(e)) => {
                log::debug!("{:?}: {e}", conn.peer());
                return;
            }
            Err(HeadError::Reject(reject)) => {
                log::debug!("{:?}: {} {}", conn.peer(), reject.status, reject.reason);
                let _ = refuse(conn.stream(), &reject, &relay.common);
                return conn.linger_close();
            }
        };
        first = false;
        let busy = Counted::new(&relay.stats.busy);
        let _ = conn.set_read_timeout(config.idle_timeout);
        let mut ex = Exchange::new(&mut conn, request, &relay.common);
        app::serve(relay, &mut ex);
        let reusable = ex.is_reusable();
        let linger = ex.is_responded() && !ex.is_body_read();
        if ex.is_released() {
            // Counted done already, by the thread that wrote the response.
            std::mem::forget(busy);
        } else {
            drop(busy);
        }
        drop(ex);
        if !reusable {
            if linger {
                conn.linger_close();
            }
            return;
        }
    }
}

/// Descriptors a connection holds: its socket (a transfer in progress adds
/// a pipe for splice; waiting takes none).
const DESCRIPTORS_PER_CONNECTION: u64 = 1;

/// Raises the limit on open files to what `max_connections` need: the soft
/// limit to the hard one (distributions start with 1024), and the hard one
/// too when the process may (it runs privileged); says how many waiting
/// connections the limit leaves room for, and warns when that is fewer
/// than `max_connections`.
fn raise_open_files_limit(max_connections: usize) {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes one rlimit into the valid, owned `limit`.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        log::warn!(
            "cannot read the open files limit: {}",
            io::Error::last_os_error()
        );
        return;
    }
    let before = limit.rlim_cur;
    // Linux refuses an unlimited soft limit, and more than fs.nr_open
    // (1 Mi by default) at all.
    let needed = libc::rlim_t::try_from(
        (max_connections as u64 * DESCRIPTORS_PER_CONNECTION + 64).min(1 << 20),
    )
    .unwrap_or(1 << 20);
    if limit.rlim_max < needed {
        let raised = libc::rlimit {
            rlim_cur: needed,
            rlim_max: needed,
        };
        // SAFETY: setrlimit reads one rlimit from the valid, owned `raised`.
        // Unprivileged, it fails and the hard limit stays.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
            limit = raised;
        }
    }
    let wanted = limit.rlim_max.min(1 << 20);
    if wanted > limit.rlim_cur {
        limit.rlim_cur = wanted;
        // SAFETY: setrlimit reads one rlimit from the valid, owned `limit`.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &limit) } != 0 {
            log::warn!(
                "open files limit stays {before}: {}",
                io::Error::last_os_error()
            );
            limit.rlim_cur = before;
        }
    }
    // rlim_t is 32 bits wide on 32-bit ARM, 64 here.
    #[allow(clippy::useless_conversion)] // not useless where rlim_t is u32
    let now = u64::from(limit.rlim_cur);
    let room = now.saturating_sub(64) / DESCRIPTORS_PER_CONNECTION;
    log::info!("open files limit: {now} (was {before}): room for about {room} waiting connections");
    if room < max_connections as u64 {
        log::warn!(
            "the open files limit ({now}) leaves room for about {room} waiting connections, \
             fewer than --max-connections {max_connections}; raise it (ulimit -n, or \
             LimitNOFILE= for a service)"
        );
    }
}
