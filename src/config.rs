//! Validated settings built from the command line and the environment. The
//! server sees only [`Config`]; nothing after start-up reads flags or variables.

use std::net::{SocketAddr, ToSocketAddrs};
use std::time::Duration;

use crate::cli::ServeArgs;
use crate::error::ConfigError;

/// Where the relay listens when neither --listen nor a port is given.
const DEFAULT_LISTEN: &str = "0.0.0.0:3000";

/// Everything the running server needs to know, already checked.
#[derive(Debug, Clone)]
pub struct Config {
    /// The address to bind.
    pub listen: SocketAddr,
    /// The longest a request may wait for a counterpart; `None` waits forever.
    pub max_wait: Option<Duration>,
    /// Connections open at once beyond which new ones get 503.
    pub max_connections: usize,
    /// How long a client may take to send a request head.
    pub header_timeout: Duration,
    /// How long an idle keep-alive connection or a stalled transfer is kept.
    pub idle_timeout: Duration,
    /// How long a requester waits for a switched or replied answer.
    pub reply_timeout: Duration,
    /// What pubsub channels keep, and how much they accept.
    pub pubsub: PubsubLimits,
    /// Silence after which a streaming subscription gets a keepalive.
    pub keepalive: Duration,
    /// The origin in `Access-Control-Allow-Origin`; None sends no CORS header.
    pub cors_origin: Option<String>,
    /// The log level before `RUST_LOG` is applied.
    pub log_level: log::LevelFilter,
}

/// Retention and size limits of pubsub channels.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PubsubLimits {
    /// Messages kept per channel.
    pub retain_count: usize,
    /// Bytes kept per channel (the newest message is kept whatever its size).
    pub retain_bytes: usize,
    /// How long a message is kept.
    pub retain_age: Duration,
    /// Bytes kept across all channels.
    pub memory: usize,
    /// The largest message accepted.
    pub max_message: usize,
}

impl Config {
    /// Checks `args`, filling in the legacy variables `PORT` and
    /// `REQUEST_TIMEOUT` (httpipe's) where the flags and their `PATCHCORD_*`
    /// twins say nothing.
    pub fn from_args(args: ServeArgs) -> Result<Config, ConfigError> {
        Config::from_args_and_env(args, |name| std::env::var(name).ok())
    }

    fn from_args_and_env(
        args: ServeArgs,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Config, ConfigError> {
        let mut listen = resolve(args.listen.as_deref().unwrap_or(DEFAULT_LISTEN))?;
        // --port wins; PORT only replaces the default, never a given address.
        let port = match (args.port, &args.listen) {
            (Some(port), _) => Some(port),
            (None, Some(_)) => None,
            (None, None) => match env("PORT") {
                Some(text) => Some(text.trim().parse::<u16>().map_err(|e| {
                    ConfigError::caused(format!("PORT={text:?} is not a port number"), e)
                })?),
                None => None,
            },
        };
        if let Some(port) = port {
            listen.set_port(port);
        }
        let timeout = match args.timeout {
            Some(secs) => secs,
            None => match env("REQUEST_TIMEOUT") {
                Some(text) => text.trim().parse::<f64>().map_err(|e| {
                    ConfigError::caused(
                        format!("REQUEST_TIMEOUT={text:?} is not a number of seconds"),
                        e,
                    )
                })?,
                None => 0.0,
            },
        };
        let max_wait = seconds("--timeout", timeout)?;
        let level = if args.verbose {
            log::LevelFilter::Debug
        } else if args.quiet {
            log::LevelFilter::Warn
        } else {
            args.log_level
        };
        if args.max_connections == 0 {
            return Err(ConfigError::new("--max-connections must be at least 1"));
        }
        let size = |name: &str, bytes: u64| {
            usize::try_from(bytes)
                .map_err(|_| ConfigError::new(format!("{name} {bytes} is too large here")))
        };
        let pubsub = PubsubLimits {
            retain_count: args.pubsub_retain_count,
            retain_bytes: size("--pubsub-retain-bytes", args.pubsub_retain_bytes)?,
            retain_age: positive("--pubsub-retain-secs", args.pubsub_retain_secs)?,
            memory: size("--pubsub-memory", args.pubsub_memory)?,
            max_message: size("--pubsub-max-message", args.pubsub_max_message)?,
        };
        if pubsub.retain_count == 0 {
            return Err(ConfigError::new("--pubsub-retain-count must be at least 1"));
        }
        if pubsub.memory < pubsub.max_message {
            return Err(ConfigError::new(
                "--pubsub-memory must be at least --pubsub-max-message",
            ));
        }
        let cors_origin = match args.cors_origin.trim() {
            "" => None,
            origin if crate::http::request::is_valid_value(origin.as_bytes()) => {
                Some(origin.to_owned())
            }
            origin => {
                return Err(ConfigError::new(format!(
                    "--cors-origin {origin:?} has a control character"
                )));
            }
        };
        Ok(Config {
            listen,
            max_wait: (!max_wait.is_zero()).then_some(max_wait),
            max_connections: args.max_connections,
            header_timeout: positive("--header-timeout", args.header_timeout)?,
            idle_timeout: positive("--idle-timeout", args.idle_timeout)?,
            reply_timeout: positive("--reply-timeout", args.reply_timeout)?,
            pubsub,
            keepalive: keepalive(args.keepalive_secs)?,
            cors_origin,
            log_level: level,
        })
    }
}

/// The address to bind: an IP address and port, or a host name to look up.
fn resolve(listen: &str) -> Result<SocketAddr, ConfigError> {
    if let Ok(addr) = listen.parse() {
        return Ok(addr);
    }
    let Some((host, port)) = listen.rsplit_once(':') else {
        return Err(ConfigError::new(format!(
            "--listen {listen:?} is not of the form HOST:PORT (e.g. 127.0.0.1:3000)"
        )));
    };
    if port.parse::<u16>().is_err() {
        return Err(ConfigError::new(format!(
            "--listen {listen:?}: {port:?} is not a port number"
        )));
    }
    match listen.to_socket_addrs() {
        Ok(mut addrs) => addrs.next().ok_or_else(|| {
            ConfigError::new(format!("--listen {listen:?}: host {host:?} has no address"))
        }),
        Err(e) => Err(ConfigError::caused(
            format!("--listen {listen:?}: cannot resolve host {host:?}"),
            e,
        )),
    }
}

/// A non-negative, finite number of seconds as a Duration.
pub fn seconds(name: &str, secs: f64) -> Result<Duration, ConfigError> {
    if secs < 0.0 {
        return Err(ConfigError::new(format!(
            "{name} {secs}: a number of seconds cannot be negative"
        )));
    }
    Duration::try_from_secs_f64(secs)
        .map_err(|_| ConfigError::new(format!("{name} {secs} is not a number of seconds")))
}

/// The keepalive interval: from 0.1 s (more often would flood streams) to a
/// day (beyond, it is no keepalive at all).
fn keepalive(secs: f64) -> Result<Duration, ConfigError> {
    if !(0.1..=86_400.0).contains(&secs) {
        return Err(ConfigError::new(format!(
            "--keepalive-secs {secs} must be between 0.1 and 86400"
        )));
    }
    seconds("--keepalive-secs", secs)
}

fn positive(name: &str, secs: f64) -> Result<Duration, ConfigError> {
    let duration = seconds(name, secs)?;
    if duration.is_zero() {
        return Err(ConfigError::new(format!("{name} must be more than 0")));
    }
    Ok(duration)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::Cli;
    use clap::Parser;

    fn config(argv: &[&str], env: &[(&str, &str)]) -> Result<Config, String> {
        let mut full = vec!["patchcord"];
        full.extend_from_slice(argv);
        let crate::cli::Command::Serve(args) = Cli::try_parse_from(full)
            .map_err(|e| e.to_string())?
            .into_command();
        Config::from_args_and_env(args, |name| {
            env.iter()
                .find(|(k, _)| *k == name)
                .map(|(_, v)| v.to_string())
        })
        .map_err(|e| e.to_string())
    }

    #[test]
    fn defaults() {
        let c = config(&[], &[]).unwrap();
        assert_eq!(c.listen, "0.0.0.0:3000".parse().unwrap());
        assert_eq!(c.max_wait, None);
        assert_eq!(c.max_connections, 10_000);
        assert_eq!(c.header_timeout, Duration::from_secs(10));
        assert_eq!(c.idle_timeout, Duration::from_secs(60));
        assert_eq!(c.reply_timeout, Duration::from_secs(60));
        assert_eq!(
            c.pubsub,
            PubsubLimits {
                retain_count: 100,
                retain_bytes: 1 << 20,
                retain_age: Duration::from_secs(3600),
                memory: 64 << 20,
                max_message: 1 << 20,
            }
        );
        assert_eq!(c.keepalive, Duration::from_secs(30));
        assert_eq!(c.cors_origin.as_deref(), Some("*"));
    }

    #[test]
    fn legacy_variables_fill_in_only_when_flags_are_absent() {
        let c = config(&[], &[("PORT", "8080"), ("REQUEST_TIMEOUT", "30")]).unwrap();
        assert_eq!(c.listen.port(), 8080);
        assert_eq!(c.max_wait, Some(Duration::from_secs(30)));
        let c = config(
            &["--port", "9000", "--timeout", "0"],
            &[("PORT", "8080"), ("REQUEST_TIMEOUT", "30")],
        )
        .unwrap();
        assert_eq!(c.listen.port(), 9000);
        assert_eq!(c.max_wait, None);
        // An explicit address keeps its port whatever PORT says.
        let c = config(&["--listen", "127.0.0.1:4000"], &[("PORT", "8080")]).unwrap();
        assert_eq!(c.listen, "127.0.0.1:4000".parse().unwrap());
    }

    #[test]
    fn errors_name_the_setting_and_the_cause() {
        let error = config(&["--timeout", "-1"], &[]).unwrap_err();
        assert!(error.contains("cannot be negative"), "{error}");
        let error = config(&["--listen", "nowhere"], &[]).unwrap_err();
        assert!(error.contains("HOST:PORT"), "{error}");
        let error = config(&["--listen", "no-such-host.invalid:80"], &[]).unwrap_err();
        assert!(error.contains("cannot resolve host"), "{error}");
        assert_eq!(
            config(&["--cors-origin", ""], &[]).unwrap().cors_origin,
            None
        );
    }

    #[test]
    fn bad_values_are_refused() {
        assert!(config(&["--timeout=-1"], &[]).is_err());
        assert!(config(&["--timeout", "inf"], &[]).is_err());
        assert!(config(&["--idle-timeout", "0"], &[]).is_err());
        assert!(config(&["--listen", "nowhere"], &[]).is_err());
        assert!(config(&[], &[("PORT", "http")]).is_err());
        assert!(config(&["--max-connections", "0"], &[]).is_err());
        assert!(config(&["--pubsub-retain-count", "0"], &[]).is_err());
        assert!(
            config(
                &["--pubsub-memory", "1K", "--pubsub-max-message", "2K"],
                &[]
            )
            .is_err()
        );
        assert!(config(&["--keepalive-secs", "0"], &[]).is_err());
        assert!(config(&["--reply-timeout", "0"], &[]).is_err());
        assert!(config(&["--keepalive-secs", "1e19"], &[]).is_err());
    }
}
