//! patchcord: an HTTP relay where programs meet on named channels.
//!
//! Reading order:
//! - `cli.rs`, `config.rs`: flags and environment → a checked [`config::Config`]
//! - `server.rs`: bind, accept loop, worker threads, the connection loop, shutdown
//! - `http/`: the HTTP/1.1 layer (heads, bodies, responses)
//! - `app.rs`: the one entry point: route → policy → endpoint or family → observe
//! - `access.rs`, `hooks.rs`, `limits.rs`: who may do what: the access
//!   file's tokens, hook secrets, limits per client address
//! - `ops.rs`: what an operator sees: the channel list and the live page
//! - `fifo/`: `patchcord fifo`, channels as a pair of named pipes
//! - `listen.rs`, `work.rs`: `patchcord listen` (the notification loop) and
//!   `patchcord work` (the job worker), on `client.rs` (the client-side
//!   subcommands' HTTP client), `child.rs` (a user's CMD) and `sys.rs`
//! - `hex.rs`, `random.rs`: hexadecimal, and random bytes for secrets
//! - `route.rs`: the URL grammar, a request head → its route
//! - `registry.rs`: channel key → channel state, for every family
//! - `mailbox.rs`: how a thread waits for word from another
//! - `mode/`: the channel families (`handoff.rs`, `queue.rs`, `pubsub/`)
//! - `store.rs`: the pubsub store's SQLite file (`--store`)
//! - `metrics.rs`: the counters, and the one observation of each request
//! - `error.rs`: fatal errors, per-request refusals, exit statuses

mod access;
mod app;
mod child;
mod cli;
mod client;
mod config;
mod error;
mod fifo;
mod hex;
mod hooks;
mod http;
mod limits;
mod listen;
mod mailbox;
mod metrics;
mod mode;
mod notify;
mod ops;
mod random;
mod registry;
mod remote;
mod route;
mod server;
mod store;
mod sys;
mod tunnel;
mod work;

use std::process::ExitCode;

use cli::{Cli, Command};
use error::{Error, Exit};

fn main() -> ExitCode {
    let result = match Cli::parse_args().into_command() {
        Command::Serve(args) => serve(*args),
        Command::Token(args) => token(&args.label),
        Command::Fifo(args) => fifo(*args),
        Command::Listen(args) => client_logger(args.quiet).and_then(|()| listen::run(*args)),
        Command::Work(args) => client_logger(args.quiet).and_then(|()| work::run(*args)),
        // ssh shows a ProxyCommand's stderr: only what went wrong.
        Command::Tunnel(args) => client_logger(true).and_then(|()| tunnel::client::run(*args)),
    };
    match result {
        Ok(exit) => exit.into(),
        Err(err) => {
            eprint!("patchcord: {err}");
            let mut source = std::error::Error::source(&err);
            while let Some(cause) = source {
                eprint!(": {cause}");
                source = cause.source();
            }
            eprintln!();
            err.exit().into()
        }
    }
}

/// `patchcord serve`: checks the configuration, starts logging, runs the
/// relay until SIGINT or SIGTERM.
fn serve(args: cli::ServeArgs) -> Result<Exit, Error> {
    let config = config::Config::from_args(args)?;
    simple_logger::SimpleLogger::new()
        .with_level(config.log_level)
        .env()
        .with_utc_timestamps()
        .init()
        .map_err(Error::Logger)?;
    let access = access::Access::open(config.auth.as_deref()).map_err(Error::Access)?;
    if config.hook_key.generated {
        log::warn!(
            "no --secret-key-file or PATCHCORD_SECRET_KEY: hook secrets (/h, /r) will not survive a restart"
        );
    }
    let restored = match &config.store {
        Some(path) => {
            let started = std::time::Instant::now();
            let restored = mode::pubsub::restore(path, config.store_sync, &config.pubsub)
                .map_err(Error::Store)?;
            log::info!(
                "store {}: {} messages on {} channels read back in {:.0?}",
                path.display(),
                restored.messages,
                restored.channels,
                started.elapsed()
            );
            Some(restored)
        }
        None => None,
    };
    server::run(config, access, restored)?;
    Ok(Exit::Clean)
}

/// `patchcord fifo`: logs to stderr, then bridges until a signal.
fn fifo(args: cli::FifoArgs) -> Result<Exit, Error> {
    client_logger(args.quiet)?;
    fifo::run(args).map_err(Error::Fifo)
}

/// The client-side subcommands log to stderr, at info (warn with --quiet).
fn client_logger(quiet: bool) -> Result<(), Error> {
    let level = if quiet {
        log::LevelFilter::Warn
    } else {
        log::LevelFilter::Info
    };
    simple_logger::SimpleLogger::new()
        .with_level(level)
        .env()
        .with_utc_timestamps()
        .init()
        .map_err(Error::Logger)
}

/// `patchcord token`: a new random token (192 bits, URL-safe) and the
/// access file's lines for it, plaintext and hashed.
fn token(label: &str) -> Result<Exit, Error> {
    use base64::Engine as _;
    use sha2::Digest as _;
    let mut bytes = [0u8; 24];
    random::fill(&mut bytes).map_err(Error::Random)?;
    let token = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes);
    let digest = hex::encode(&sha2::Sha256::digest(token.as_bytes()));
    let label = if label
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
    {
        label.to_owned()
    } else {
        format!("{label:?}")
    };
    println!("token: {token}");
    println!();
    println!("# In the access file (--auth), either plaintext:");
    println!("[tokens.{label}]");
    println!("token = \"{token}\"");
    println!();
    println!("# or hashed, so that the file does not hold the token itself:");
    println!("[tokens.{label}]");
    println!("sha256 = \"{digest}\"");
    println!("# then grant it paths per method, e.g.:");
    println!("# POST = [\"/u/{}/**\"]", label.trim_matches('"'));
    Ok(Exit::Clean)
}
