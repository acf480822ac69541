//! patchcord: an HTTP relay where programs meet on named channels.
//!
//! Reading order:
//! - `cli.rs`, `config.rs`: flags and environment → a checked [`config::Config`]
//! - `server.rs`: bind, accept loop, worker threads, the connection loop, shutdown
//! - `http/`: the HTTP/1.1 layer (heads, bodies, responses)
//! - `app.rs`: the one entry point: route → policy → endpoint or family → observe
//! - `route.rs`: the URL grammar, a request head → its route
//! - `registry.rs`: channel key → channel state, for every family
//! - `mailbox.rs`: how a thread waits for word from another
//! - `mode/`: the channel families (`handoff.rs`, `queue.rs`, `pubsub/`)
//! - `metrics.rs`: the counters, and the one observation of each request
//! - `error.rs`: fatal errors, per-request refusals, exit statuses

mod app;
mod cli;
mod config;
mod error;
mod http;
mod mailbox;
mod metrics;
mod mode;
mod registry;
mod route;
mod server;

use std::process::ExitCode;

use cli::{Cli, Command};
use error::{Error, Exit};

fn main() -> ExitCode {
    let result = match Cli::parse_args().into_command() {
        Command::Serve(args) => serve(args),
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
    server::run(config)?;
    Ok(Exit::Clean)
}
