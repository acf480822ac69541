//! The command line, as clap derive types. Every flag of `serve` has a
//! `PATCHCORD_*` environment twin (the client-side subcommands read
//! `PATCHCORD_URL` and `PATCHCORD_TOKEN` only); the
//! doc comments are the `--help` text. Validation and defaults that depend
//! on other variables live in `config.rs`.

use std::ffi::OsString;

use clap::builder::{BoolishValueParser, PossibleValuesParser, TypedValueParser};
use clap::{Args, CommandFactory, FromArgMatches, Parser, Subcommand};

/// An HTTP relay: programs meet on named channels, with nothing but curl.
///
/// `curl -d hello http://HOST:3000/jobs` waits until `curl http://HOST:3000/jobs`
/// arrives, and the body flows from one to the other. See `man patchcord`.
#[derive(Debug, Parser)]
#[command(name = "patchcord", version, args_conflicts_with_subcommands = true)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,

    #[command(flatten)]
    pub serve: ServeArgs,
}

/// What patchcord is asked to do.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the relay (the default when no subcommand is given).
    Serve(Box<ServeArgs>),
    /// Print a new random access token and the lines of the access file
    /// (`--auth`) that grant it, plaintext and hashed.
    Token(TokenArgs),
    /// Bridge channels to a pair of named pipes: lines written to DIR/send
    /// are sent to a channel, messages of another come out of DIR/recv.
    Fifo(Box<FifoArgs>),
    /// Subscribe to a pubsub channel and run CMD once per message, in order,
    /// never losing a retained one (without CMD, print each message).
    Listen(Box<ListenArgs>),
    /// Answer the requests of a request/responder channel (`/res/ID`) with
    /// CMD: the request's body on its stdin, its stdout the answer.
    Work(Box<WorkArgs>),
    /// Carry stdin and stdout through a relay's WebSocket tunnel to a TCP
    /// target (`/_/tunnel/HOST/PORT`): ssh's ProxyCommand.
    Tunnel(Box<TunnelArgs>),
}

/// What the client-side subcommands present to the relay.
#[derive(Debug, Clone, Args)]
pub struct Presents {
    /// The access token to present (sent as Patch-Token).
    #[arg(
        long,
        env = "PATCHCORD_TOKEN",
        hide_env_values = true,
        value_name = "TOKEN"
    )]
    pub token: Option<String>,
}

/// Options of `patchcord tunnel`.
#[derive(Debug, Clone, Args)]
pub struct TunnelArgs {
    /// The tunnel's URL: http(s)://RELAY/_/tunnel/HOST/PORT (or ws://, wss://,
    /// or Patchwork's /huproxy/NS/HOST/PORT).
    #[arg(value_name = "URL")]
    pub url: String,

    #[command(flatten)]
    pub presents: Presents,

    /// Trust only the certificates of this PEM file for an https relay (a
    /// relay with a certificate of its own CA), instead of the built-in
    /// roots.
    #[arg(long, env = "PATCHCORD_CACERT", value_name = "FILE")]
    pub cacert: Option<std::path::PathBuf>,

    /// Seconds of silence after which the tunnel is pinged (keeps NATs and
    /// proxies from dropping an idle ssh session); no answer within as long
    /// again ends it.
    #[arg(
        long,
        env = "PATCHCORD_KEEPALIVE_SECS",
        default_value_t = 30.0,
        value_name = "SECS"
    )]
    pub keepalive_secs: f64,
}

/// Options of `patchcord listen`.
#[derive(Debug, Clone, Args)]
pub struct ListenArgs {
    /// The channel, e.g. http://pi:3000/pubsub/alerts.
    #[arg(env = "PATCHCORD_URL", value_name = "URL")]
    pub url: String,

    /// Keep the cursor (the last handled message's id) in FILE, so that a
    /// restart resumes after it; it wins over --since once it exists.
    #[arg(long, value_name = "FILE")]
    pub state: Option<std::path::PathBuf>,

    /// Where to start without a state file: `new` (messages published from
    /// now on), `all` (every retained message) or an ID (the ones after it).
    #[arg(long, default_value = "new", value_name = "ID|all|new")]
    pub since: String,

    /// Move on past a CMD that failed (else stop, exit 1, and leave the
    /// cursor before its message).
    #[arg(short, long)]
    pub keep_going: bool,

    /// Run this shell command when messages were missed (PATCHCORD_MISSED
    /// holds how many, or `unknown`).
    #[arg(long, value_name = "CMD2")]
    pub on_missed: Option<String>,

    /// Without CMD: end each message with NUL instead of a newline.
    #[arg(short = 'z', long = "null")]
    pub null: bool,

    /// Without CMD: print bodies (`line`) or the relay's JSON lines (`ndjson`).
    #[arg(long, default_value = "line", value_parser = ["line", "ndjson"], value_name = "FORMAT")]
    pub format: String,

    #[command(flatten)]
    pub presents: Presents,

    /// Log less (warnings and errors only).
    #[arg(short, long)]
    pub quiet: bool,

    /// Run per message, with its body on stdin and PATCHCORD_ID,
    /// PATCHCORD_TITLE, PATCHCORD_H_<NAME>... in its environment.
    #[arg(last = true, value_name = "CMD")]
    pub command: Vec<OsString>,
}

/// Options of `patchcord work`.
#[derive(Debug, Clone, Args)]
pub struct WorkArgs {
    /// The responder's URL, e.g. http://pi:3000/res/jobs (requesters use
    /// /req/jobs).
    #[arg(env = "PATCHCORD_URL", value_name = "URL")]
    pub url: String,

    /// How many requests to work on at once.
    #[arg(short, long, default_value_t = 1, value_name = "N")]
    pub jobs: usize,

    /// Kill a CMD still running after SECS and answer 504.
    #[arg(long, value_name = "SECS")]
    pub timeout: Option<f64>,

    /// Answer these exit statuses of CMD with these HTTP statuses, e.g.
    /// `1=404,2=400` (others than 0 answer 500).
    #[arg(long, value_name = "CODE=STATUS,...")]
    pub status_from_exit: Option<String>,

    #[command(flatten)]
    pub presents: Presents,

    /// Log less (warnings and errors only).
    #[arg(short, long)]
    pub quiet: bool,

    /// Run per request, with its body on stdin and PATCHCORD_METHOD,
    /// PATCHCORD_PATH, PATCHCORD_H_<NAME>... in its environment.
    #[arg(last = true, required = true, value_name = "CMD")]
    pub command: Vec<OsString>,
}

/// Options of `patchcord fifo`.
#[derive(Debug, Clone, Args)]
pub struct FifoArgs {
    /// The directory to create, holding the FIFOs `send` and `recv`.
    pub dir: std::path::PathBuf,

    /// The relay (default: PATCHCORD_URL, else http://127.0.0.1:3000).
    #[arg(long, env = "PATCHCORD_URL", value_name = "URL")]
    pub server: Option<String>,

    /// Lines written to DIR/send are sent to this channel.
    #[arg(long, value_name = "CHANNEL")]
    pub send: Option<String>,

    #[command(flatten)]
    pub presents: Presents,

    /// Messages of this channel come out of DIR/recv, one per line.
    #[arg(long, value_name = "CHANNEL")]
    pub recv: Option<String>,

    /// NUL instead of newline ends a message, both ways.
    #[arg(short = 'z', long = "null")]
    pub null: bool,

    /// Permission bits of the FIFOs (octal).
    #[arg(long, default_value = "0600", value_name = "MODE")]
    pub mode: String,

    /// Longest message; longer lines are dropped, logged and counted.
    #[arg(long, default_value = "1M", value_parser = parse_size, value_name = "BYTES")]
    pub max_message: u64,

    /// On SIGINT/SIGTERM, how long to keep delivering lines already written.
    #[arg(long, default_value_t = 2.0, value_name = "SECS")]
    pub drain_timeout: f64,

    /// Where undelivered messages go at exit (default: standard error).
    #[arg(long, value_name = "FILE")]
    pub spool: Option<std::path::PathBuf>,

    /// Return once DIR is ready, printing the bridge's process id.
    #[arg(short = 'b', long = "background")]
    pub background: bool,

    /// Replace a DIR left behind by a bridge that was killed.
    #[arg(long)]
    pub force: bool,

    /// Log less (warnings and errors only).
    #[arg(short, long)]
    pub quiet: bool,

    /// Run this command with PATCHCORD_SEND and PATCHCORD_RECV set to the
    /// FIFOs; the bridge stops when it exits.
    #[arg(last = true, value_name = "CMD")]
    pub command: Vec<std::ffi::OsString>,
}

/// Options of `patchcord token`.
#[derive(Debug, Clone, Args)]
pub struct TokenArgs {
    /// The table's name in the access file: a label for logs, never the secret.
    #[arg(default_value = "NAME")]
    pub label: String,
}

/// Options of `patchcord serve`.
#[derive(Debug, Clone, Args)]
pub struct ServeArgs {
    /// Address to listen on (`HOST:PORT`; default 0.0.0.0:3000, every
    /// interface); port 0 picks a free port.
    #[arg(short, long, env = "PATCHCORD_LISTEN", value_name = "ADDR")]
    pub listen: Option<String>,

    /// Port to listen on, replacing the port of --listen (PORT is read when
    /// neither --port nor --listen is given).
    #[arg(short, long, env = "PATCHCORD_PORT", value_name = "PORT")]
    pub port: Option<u16>,

    /// Longest wait for a counterpart, in seconds; 0 waits forever (also read
    /// from REQUEST_TIMEOUT). A request's `?timeout=` is capped by it.
    #[arg(
        short,
        long,
        env = "PATCHCORD_TIMEOUT",
        value_name = "SECS",
        allow_negative_numbers = true
    )]
    pub timeout: Option<f64>,

    /// Most connections open at once; beyond it new ones get 503 and are closed.
    #[arg(
        long,
        env = "PATCHCORD_MAX_CONNECTIONS",
        default_value_t = 10_000,
        value_name = "N"
    )]
    pub max_connections: usize,

    /// Seconds a client may take to send a request's head before it is dropped.
    #[arg(
        long,
        env = "PATCHCORD_HEADER_TIMEOUT",
        allow_negative_numbers = true,
        default_value_t = 10.0,
        value_name = "SECS"
    )]
    pub header_timeout: f64,

    /// Seconds an idle keep-alive connection, or a stalled transfer, is kept.
    #[arg(
        long,
        env = "PATCHCORD_IDLE_TIMEOUT",
        allow_negative_numbers = true,
        default_value_t = 60.0,
        value_name = "SECS"
    )]
    pub idle_timeout: f64,

    /// Seconds a requester waits for an answer sent to a reply path or a
    /// switch channel before it gets 504.
    #[arg(
        long,
        env = "PATCHCORD_REPLY_TIMEOUT",
        allow_negative_numbers = true,
        default_value_t = 60.0,
        value_name = "SECS"
    )]
    pub reply_timeout: f64,

    /// Seconds a notification backend has to accept a message (connect,
    /// TLS, answer) before it counts as failed.
    #[arg(
        long,
        env = "PATCHCORD_NOTIFY_TIMEOUT",
        allow_negative_numbers = true,
        default_value_t = 10.0,
        value_name = "SECS"
    )]
    pub notify_timeout: f64,

    /// Messages each pubsub channel keeps for subscribers that resume with a cursor.
    #[arg(
        long,
        env = "PATCHCORD_PUBSUB_RETAIN_COUNT",
        default_value_t = 100,
        value_name = "N"
    )]
    pub pubsub_retain_count: usize,

    /// Bytes of messages each pubsub channel keeps (K, M, G: KiB, MiB, GiB).
    #[arg(
        long,
        env = "PATCHCORD_PUBSUB_RETAIN_BYTES",
        default_value = "1M",
        value_parser = parse_size,
        value_name = "BYTES"
    )]
    pub pubsub_retain_bytes: u64,

    /// Seconds a pubsub message is kept.
    #[arg(
        long,
        env = "PATCHCORD_PUBSUB_RETAIN_SECS",
        allow_negative_numbers = true,
        default_value_t = 3600.0,
        value_name = "SECS"
    )]
    pub pubsub_retain_secs: f64,

    /// Bytes of pubsub messages kept across all channels; beyond it the
    /// oldest message of any channel goes first.
    #[arg(
        long,
        env = "PATCHCORD_PUBSUB_MEMORY",
        default_value = "64M",
        value_parser = parse_size,
        value_name = "BYTES"
    )]
    pub pubsub_memory: u64,

    /// Largest message a pubsub channel accepts; a larger one gets 413.
    #[arg(
        long,
        env = "PATCHCORD_PUBSUB_MAX_MESSAGE",
        default_value = "1M",
        value_parser = parse_size,
        value_name = "BYTES"
    )]
    pub pubsub_max_message: u64,

    /// This relay's name behind a load balancer (letters, digits, `-`, `_`):
    /// its reply paths start with it, `/_/reply/TAG.`, for the balancer to
    /// send them back here.
    #[arg(long, env = "PATCHCORD_SHARD_TAG", value_name = "TAG")]
    pub shard_tag: Option<String>,

    /// The load balancer in front of this relay and its peers
    /// (http://HOST:PORT): a double-clutch answer is taken through it from
    /// whichever relay holds its channel. Needs the key the relays share
    /// (PATCHCORD_SECRET_KEY or --secret-key-file).
    #[arg(long, env = "PATCHCORD_CLUSTER_URL", value_name = "URL")]
    pub cluster_url: Option<String>,

    /// Keep every retained pubsub message in this SQLite file too: a
    /// restarted relay serves them again, and ids continue above them.
    /// A publish gets its answer once its message is in the file.
    #[arg(long, env = "PATCHCORD_STORE", value_name = "FILE")]
    pub store: Option<std::path::PathBuf>,

    /// How the store's commits reach the disk: `normal` survives the relay
    /// being killed, `full` (an fsync per commit) a power cut too.
    #[arg(
        long,
        env = "PATCHCORD_STORE_SYNC",
        default_value = "normal",
        value_parser = ["normal", "full"],
        value_name = "LEVEL"
    )]
    pub store_sync: String,

    /// Seconds of silence after which a streaming subscription (SSE, NDJSON)
    /// gets a keepalive, so that proxies keep it open.
    #[arg(
        long,
        env = "PATCHCORD_KEEPALIVE_SECS",
        allow_negative_numbers = true,
        default_value_t = 30.0,
        value_name = "SECS"
    )]
    pub keepalive_secs: f64,

    /// The origin allowed to read responses from a browser page on another
    /// origin (Access-Control-Allow-Origin); an empty value sends no CORS header.
    #[arg(
        long,
        env = "PATCHCORD_CORS_ORIGIN",
        default_value = "*",
        value_name = "ORIGIN"
    )]
    pub cors_origin: String,

    /// The access file (TOML): tokens and the paths each may use per
    /// method; without it every channel is open to everyone. Re-read on SIGHUP.
    #[arg(long, env = "PATCHCORD_AUTH", value_name = "FILE")]
    pub auth: Option<std::path::PathBuf>,

    /// A file holding the key hook secrets are signed with (at least 32
    /// bytes; a trailing newline is dropped). PATCHCORD_SECRET_KEY may hold
    /// the key itself. Without either, a random key is made at start.
    #[arg(long, env = "PATCHCORD_SECRET_KEY_FILE", value_name = "FILE")]
    pub secret_key_file: Option<std::path::PathBuf>,

    /// Requests per client address: N/s, N/m or N/h; beyond it, 429 with
    /// Retry-After. Off by default.
    #[arg(long, env = "PATCHCORD_RATE_LIMIT", value_name = "RATE")]
    pub rate_limit: Option<String>,

    /// Requests a client may make at once before --rate-limit applies
    /// (default: one second's worth, at least 1).
    #[arg(long, env = "PATCHCORD_RATE_BURST", value_name = "N")]
    pub rate_burst: Option<u32>,

    /// Proxies whose X-Forwarded-For is believed, as addresses or CIDR
    /// ranges separated by commas (e.g. 127.0.0.1,10.0.0.0/8).
    #[arg(long, env = "PATCHCORD_TRUST_PROXY", value_name = "CIDRS")]
    pub trust_proxy: Option<String>,

    /// Most connections open at once from one address (trusted proxies
    /// excepted); beyond it new ones get 503. Off by default.
    #[arg(long, env = "PATCHCORD_MAX_CONNECTIONS_PER_IP", value_name = "N")]
    pub max_connections_per_ip: Option<usize>,

    /// Largest body a queue, requester or responder may send (K, M, G):
    /// 413 when Content-Length says more; a chunked body that passes it is
    /// cut. Unlimited by default.
    #[arg(
        long,
        env = "PATCHCORD_MAX_BODY",
        value_parser = parse_size,
        value_name = "BYTES"
    )]
    pub max_body: Option<u64>,

    /// A token that `GET /metrics` must carry (`Authorization: Bearer`);
    /// without it the metrics are open.
    #[arg(long, env = "PATCHCORD_METRICS_TOKEN", value_name = "TOKEN")]
    pub metrics_token: Option<String>,

    /// Show channel names whole in `/_/channels` and on the page (they are
    /// capabilities, so they are shortened by default). With --auth, a
    /// caller sees the channels it may GET, whole, either way.
    #[arg(long, env = "PATCHCORD_LIST_CHANNELS", value_parser = BoolishValueParser::new())]
    pub list_channels: bool,

    /// Log level (RUST_LOG overrides it).
    #[arg(
        long,
        env = "PATCHCORD_LOG_LEVEL",
        default_value = "info",
        value_name = "LEVEL",
        value_parser = PossibleValuesParser::new(["off", "error", "warn", "info", "debug", "trace"])
            .map(|level| level.parse::<log::LevelFilter>().unwrap_or(log::LevelFilter::Info)),
        ignore_case = true
    )]
    pub log_level: log::LevelFilter,

    /// Log more: the same as --log-level debug (wins over --quiet).
    #[arg(short, long, env = "PATCHCORD_VERBOSE", value_parser = BoolishValueParser::new())]
    pub verbose: bool,

    /// Log less: the same as --log-level warn.
    #[arg(short, long, env = "PATCHCORD_QUIET", value_parser = BoolishValueParser::new())]
    pub quiet: bool,
}

impl Cli {
    /// Parses the process's arguments; on a usage error, prints it and exits 2.
    pub fn parse_args() -> Cli {
        let args = serve_first(std::env::args_os().collect());
        Cli::from_arg_matches(&Cli::command().get_matches_from(args))
            .unwrap_or_else(|error| error.exit())
    }

    /// What to do: the subcommand, or `serve` with the options given.
    pub fn into_command(self) -> Command {
        self.command.unwrap_or(Command::Serve(Box::new(self.serve)))
    }
}

/// Moves a `serve` given after options to the front, so that the options
/// work before it as after it (`patchcord -q serve` is `patchcord serve
/// -q`): `serve` is the default, and its options are the top level's.
fn serve_first(mut args: Vec<OsString>) -> Vec<OsString> {
    let command = Cli::command();
    let takes_value = |flag: &str| {
        command.get_arguments().any(|arg| {
            let named = match flag.strip_prefix("--") {
                Some(long) => arg.get_long() == Some(long),
                None => flag.len() == 2 && arg.get_short() == flag.chars().nth(1),
            };
            named && arg.get_action().takes_values()
        })
    };
    let mut i = 1;
    while i < args.len() {
        let Some(word) = args[i].to_str() else { break };
        if word == "--" || !word.starts_with('-') || word == "-" {
            if word == "serve" && i > 1 {
                let serve = args.remove(i);
                args.insert(1, serve);
            }
            break;
        }
        // `--flag value` skips the value; `--flag=value` and `-tVALUE` do not.
        i += if !word.contains('=') && takes_value(word) {
            2
        } else {
            1
        };
    }
    args
}

/// A byte count: digits, optionally followed by K, M or G (binary multiples;
/// `KiB`, `MB` and the like are read the same way).
fn parse_size(text: &str) -> Result<u64, String> {
    let text = text.trim();
    let digits = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(digits);
    let number: u64 = number
        .parse()
        .map_err(|_| format!("{text:?} is not a byte count such as 65536, 64K or 1M"))?;
    let shift = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kb" | "kib" => 10,
        "m" | "mb" | "mib" => 20,
        "g" | "gb" | "gib" => 30,
        _ => return Err(format!("{text:?}: the unit must be K, M or G")),
    };
    number
        .checked_mul(1 << shift)
        .ok_or_else(|| format!("{text:?} is too large"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_is_well_formed() {
        Cli::command().debug_assert();
    }

    /// Every option (except --help and --version) has a PATCHCORD_ twin.
    #[test]
    fn every_flag_has_a_patchcord_env_twin() {
        let command = Cli::command();
        let serve = command.find_subcommand("serve").expect("serve subcommand");
        for cmd in [&command, serve] {
            for arg in cmd.get_arguments() {
                let id = arg.get_id().as_str();
                if id == "help" || id == "version" {
                    continue;
                }
                let env = arg.get_env().map(|e| e.to_string_lossy().into_owned());
                let expected = format!("PATCHCORD_{}", id.to_uppercase());
                assert_eq!(env.as_deref(), Some(expected.as_str()), "flag --{id}");
            }
        }
    }

    fn serve_args(argv: &[&str]) -> ServeArgs {
        let args = serve_first(argv.iter().map(OsString::from).collect());
        match Cli::try_parse_from(args).unwrap().into_command() {
            Command::Serve(args) => *args,
            _ => panic!("not serve"),
        }
    }

    #[test]
    fn serve_is_the_default_subcommand_and_takes_options_before_it() {
        assert_eq!(
            serve_args(&["patchcord", "--port", "8080"]).port,
            Some(8080)
        );
        assert_eq!(
            serve_args(&["patchcord", "serve", "--port", "8081"]).port,
            Some(8081)
        );
        let before = serve_args(&[
            "patchcord",
            "-q",
            "--listen",
            "127.0.0.1:1",
            "serve",
            "-p",
            "2",
        ]);
        assert!(before.quiet);
        assert_eq!(before.listen.as_deref(), Some("127.0.0.1:1"));
        assert_eq!(before.port, Some(2));
        assert!(
            serve_args(&["patchcord", "--listen=serve", "serve"])
                .listen
                .is_some()
        );
    }

    #[test]
    fn usage_errors_say_what_is_wrong() {
        let error = Cli::try_parse_from(["patchcord", "--log-level", "loud"]).unwrap_err();
        assert!(error.to_string().contains("possible values"), "{error}");
        let negative = Cli::try_parse_from(["patchcord", "--timeout", "-1"]).unwrap();
        match negative.into_command() {
            Command::Serve(args) => assert_eq!(args.timeout, Some(-1.0)),
            _ => panic!("not serve"),
        }
    }

    #[test]
    fn sizes_take_binary_units() {
        assert_eq!(parse_size("65536"), Ok(65536));
        assert_eq!(parse_size("64K"), Ok(64 << 10));
        assert_eq!(parse_size("1MiB"), Ok(1 << 20));
        assert_eq!(parse_size("2g"), Ok(2 << 30));
        assert!(parse_size("1T").is_err());
        assert!(parse_size("M").is_err());
        assert!(parse_size("99999999999999G").is_err());
    }

    /// The man page documents every flag and every environment variable.
    #[test]
    fn man_page_names_every_flag_and_variable() {
        let page = include_str!("../man/patchcord.1").replace("\\-", "-");
        let command = Cli::command();
        let mut names = vec![
            "PORT".to_owned(),
            "REQUEST_TIMEOUT".to_owned(),
            "RUST_LOG".to_owned(),
        ];
        let commands = std::iter::once(&command).chain(command.get_subcommands());
        for arg in commands.flat_map(|c| c.get_arguments()) {
            if let Some(long) = arg.get_long() {
                names.push(format!("--{long}"));
            }
            if let Some(env) = arg.get_env() {
                names.push(env.to_string_lossy().into_owned());
            }
        }
        assert!(names.len() > 40, "{names:?}");
        for name in names {
            assert!(
                page.contains(&name),
                "man/patchcord.1 does not mention {name}"
            );
        }
    }
}
