//! patchcord: an HTTP relay where programs meet on named channels.
//!
//! Reading order:
//! - `cli.rs`, `config.rs`: flags and environment → a checked [`config::Config`]
//! - `server.rs`: bind, accept loop, worker threads, shutdown
//! - `http/`: the HTTP/1.1 layer (heads, bodies, responses)
//! - `route.rs`: the URL grammar, method and path → route
//! - `registry.rs`: channel key → channel state
//! - `mode/`: the channel families (`queue.rs`)
//! - `error.rs`: fatal errors and per-request refusals

mod cli;
mod config;
mod error;
mod http;
mod mode;
mod registry;
mod route;
mod server;

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let args = cli::Cli::parse().into_serve_args();
    let config = match config::Config::from_args(args) {
        Ok(config) => config,
        Err(message) => {
            eprintln!("patchcord: {message}");
            return ExitCode::from(2);
        }
    };
    let started = simple_logger::SimpleLogger::new()
        .with_level(config.log_level)
        .env()
        .with_utc_timestamps()
        .init()
        .map_err(error::Error::Logger)
        .and_then(|()| server::run(config));
    match started {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprint!("patchcord: {err}");
            let mut source = std::error::Error::source(&err);
            while let Some(cause) = source {
                eprint!(": {cause}");
                source = cause.source();
            }
            eprintln!();
            ExitCode::FAILURE
        }
    }
}
