//! Validated settings built from the command line and the environment. The
//! server sees only [`Config`]; nothing after start-up reads flags or variables.

use std::net::{SocketAddr, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::time::Duration;

use ipnet::IpNet;

use crate::cli::ServeArgs;
use crate::error::ConfigError;
use crate::hooks::{HookKey, MIN_KEY};
use crate::limits::{Rate, parse_rate};

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
    /// How long a notification backend has to accept a message.
    pub notify_timeout: Duration,
    /// What pubsub channels keep, and how much they accept.
    pub pubsub: PubsubLimits,
    /// Silence after which a streaming subscription gets a keepalive.
    pub keepalive: Duration,
    /// The origin in `Access-Control-Allow-Origin`; None sends no CORS header.
    pub cors_origin: Option<String>,
    /// The log level before `RUST_LOG` is applied.
    pub log_level: log::LevelFilter,
    /// The access file, read by `access.rs` (at start and on SIGHUP).
    pub auth: Option<PathBuf>,
    /// This relay's name behind a load balancer, in its reply paths.
    pub shard_tag: Option<String>,
    /// The load balancer in front of the relays, through which switched
    /// answers are taken from the relay that holds their channel.
    pub cluster: Option<crate::client::Relay>,
    /// The pubsub store's file (`--store`), and how its commits are synced.
    pub store: Option<PathBuf>,
    pub store_sync: crate::store::SyncMode,
    /// The key hook secrets are signed with.
    pub hook_key: HookKey,
    /// Requests per client address, when limited.
    pub rate: Option<Rate>,
    /// Proxies whose `X-Forwarded-For` is believed.
    pub trust_proxy: Vec<IpNet>,
    /// Most connections open at once from one address.
    pub max_connections_per_ip: Option<usize>,
    /// Largest queue or req/res body.
    pub max_body: Option<u64>,
    /// The SHA-256 of the Bearer token `GET /metrics` must carry, if any
    /// (the token itself is not kept).
    pub metrics_token: Option<[u8; 32]>,
    /// Channel names whole in listings.
    pub list_channels: bool,
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
        let rate = match &args.rate_limit {
            None => None,
            Some(text) => {
                let per_second =
                    parse_rate(text).map_err(|e| ConfigError::new(format!("--rate-limit {e}")))?;
                let burst = match args.rate_burst {
                    Some(0) => return Err(ConfigError::new("--rate-burst must be at least 1")),
                    Some(n) => f64::from(n),
                    None => per_second.ceil().max(1.0),
                };
                Some(Rate { per_second, burst })
            }
        };
        if args.rate_burst.is_some() && rate.is_none() {
            return Err(ConfigError::new("--rate-burst needs --rate-limit"));
        }
        if args.max_connections_per_ip == Some(0) {
            return Err(ConfigError::new(
                "--max-connections-per-ip must be at least 1",
            ));
        }
        let hook_key = hook_key(args.secret_key_file.as_deref(), env("PATCHCORD_SECRET_KEY"))?;
        Ok(Config {
            listen,
            max_wait: (!max_wait.is_zero()).then_some(max_wait),
            max_connections: args.max_connections,
            header_timeout: positive("--header-timeout", args.header_timeout)?,
            idle_timeout: positive("--idle-timeout", args.idle_timeout)?,
            reply_timeout: positive("--reply-timeout", args.reply_timeout)?,
            notify_timeout: positive("--notify-timeout", args.notify_timeout)?,
            pubsub,
            keepalive: keepalive(args.keepalive_secs)?,
            cors_origin,
            log_level: level,
            auth: args.auth,
            shard_tag: shard_tag(args.shard_tag)?,
            cluster: cluster(args.cluster_url, &hook_key)?,
            store: args.store.filter(|path| !path.as_os_str().is_empty()),
            store_sync: if args.store_sync == "full" {
                crate::store::SyncMode::Full
            } else {
                crate::store::SyncMode::Normal
            },
            hook_key,
            rate,
            trust_proxy: trust_proxy(args.trust_proxy.as_deref().unwrap_or(""))?,
            max_connections_per_ip: args.max_connections_per_ip,
            max_body: args.max_body,
            metrics_token: args.metrics_token.filter(|t| !t.is_empty()).map(|token| {
                use sha2::Digest as _;
                sha2::Sha256::digest(token.as_bytes()).into()
            }),
            list_channels: args.list_channels,
        })
    }
}

/// The hook key: from `--secret-key-file`, else `PATCHCORD_SECRET_KEY`,
/// else made up for this run. A trailing newline is not part of it.
fn hook_key(file: Option<&Path>, variable: Option<String>) -> Result<HookKey, ConfigError> {
    let (bytes, from) = match (file, variable) {
        (Some(file), _) => {
            let bytes = std::fs::read(file).map_err(|e| {
                ConfigError::caused(format!("--secret-key-file {}", file.display()), e)
            })?;
            (bytes, format!("--secret-key-file {}", file.display()))
        }
        (None, Some(text)) => (text.into_bytes(), "PATCHCORD_SECRET_KEY".to_owned()),
        (None, None) => {
            return HookKey::generate()
                .map_err(|e| ConfigError::caused("cannot make a random hook key", e));
        }
    };
    let mut bytes = bytes;
    if bytes.last() == Some(&b'\n') {
        bytes.pop();
        if bytes.last() == Some(&b'\r') {
            bytes.pop();
        }
    }
    if bytes.len() < MIN_KEY {
        return Err(ConfigError::new(format!(
            "{from}: the key must be at least {MIN_KEY} bytes (try: head -c 32 /dev/urandom | base64)"
        )));
    }
    Ok(HookKey::new(bytes))
}

/// `--trust-proxy`: addresses or CIDR ranges, separated by commas.
fn trust_proxy(text: &str) -> Result<Vec<IpNet>, ConfigError> {
    text.split(',')
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .map(|t| {
            t.parse::<IpNet>()
                .or_else(|_| t.parse::<std::net::IpAddr>().map(IpNet::from))
                .map_err(|_| {
                    ConfigError::new(format!(
                        "--trust-proxy {t:?} is not an address or a CIDR range such as 10.0.0.0/8"
                    ))
                })
        })
        .collect()
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
pub fn keepalive(secs: f64) -> Result<Duration, ConfigError> {
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

/// `--cluster-url`: the balancer, which only relays sharing a key may use
/// on each other's behalf.
fn cluster(
    url: Option<String>,
    key: &HookKey,
) -> Result<Option<crate::client::Relay>, ConfigError> {
    let Some(url) = url.filter(|u| !u.is_empty()) else {
        return Ok(None);
    };
    if key.generated {
        return Err(ConfigError::new(
            "--cluster-url needs the key the relays share: PATCHCORD_SECRET_KEY or --secret-key-file",
        ));
    }
    crate::client::Relay::parse(&url)
        .map(Some)
        .map_err(|e| ConfigError::new(format!("--cluster-url {e}")))
}

/// `--shard-tag`: 1 to 32 letters, digits, `-` or `_` (it goes into paths
/// and a balancer's rules); empty means none.
fn shard_tag(tag: Option<String>) -> Result<Option<String>, ConfigError> {
    let Some(tag) = tag.filter(|t| !t.is_empty()) else {
        return Ok(None);
    };
    let fits = tag.len() <= 32
        && tag
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if !fits {
        return Err(ConfigError::new(format!(
            "--shard-tag {tag:?}: 1 to 32 letters, digits, '-' or '_'"
        )));
    }
    Ok(Some(tag))
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
            .into_command()
        else {
            return Err("not serve".to_owned());
        };
        Config::from_args_and_env(*args, |name| {
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
        assert!(c.hook_key.generated);
        assert_eq!(c.rate, None);
        assert!(c.trust_proxy.is_empty());
        assert_eq!((c.max_connections_per_ip, c.max_body), (None, None));
    }

    #[test]
    fn limits_and_keys() {
        let c = config(
            &[
                "--rate-limit",
                "120/m",
                "--trust-proxy",
                "127.0.0.1, 10.0.0.0/8",
            ],
            &[("PATCHCORD_SECRET_KEY", &"k".repeat(32))],
        )
        .unwrap();
        assert_eq!(
            c.rate,
            Some(Rate {
                per_second: 2.0,
                burst: 2.0
            })
        );
        assert_eq!(c.trust_proxy.len(), 2);
        assert!(!c.hook_key.generated);
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
    fn a_relay_behind_a_balancer_has_a_tag_and_shares_its_key() {
        let key = [("PATCHCORD_SECRET_KEY", "k".repeat(32))];
        let key: Vec<(&str, &str)> = key.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let c = config(
            &[
                "--shard-tag",
                "relay-2",
                "--cluster-url",
                "http://127.0.0.1:3000",
            ],
            &key,
        )
        .unwrap();
        assert_eq!(c.shard_tag.as_deref(), Some("relay-2"));
        assert_eq!(c.cluster.expect("a balancer").target("/x"), "/x");
        for bad in ["", "a.b", "a/b", &"x".repeat(33)] {
            let c = config(&["--shard-tag", bad], &[]);
            assert!(bad.is_empty() == c.is_ok(), "{bad:?}: {c:?}");
        }
        let error = config(&["--cluster-url", "http://127.0.0.1:3000"], &[]).unwrap_err();
        assert!(error.contains("PATCHCORD_SECRET_KEY"), "{error}");
        let error = config(&["--cluster-url", "https://lb"], &key).unwrap_err();
        assert!(error.contains("--cluster-url"), "{error}");
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
        assert!(config(&["--rate-limit", "0/s"], &[]).is_err());
        assert!(config(&["--rate-burst", "3"], &[]).is_err());
        assert!(config(&["--rate-limit", "1/s", "--rate-burst", "0"], &[]).is_err());
        assert!(config(&["--max-connections-per-ip", "0"], &[]).is_err());
        assert!(config(&["--trust-proxy", "10.0.0.0/33"], &[]).is_err());
        assert!(config(&[], &[("PATCHCORD_SECRET_KEY", "short")]).is_err());
        assert!(config(&["--secret-key-file", "/nonexistent/key"], &[]).is_err());
    }
}
