//! `patchcord listen URL [-- CMD]`: the notification loop, lossless where
//! the relay can make it so. One NDJSON stream (`?format=ndjson&after=ID`)
//! carries every message from the cursor on, with its id and exactly the
//! headers that travelled; each runs CMD (or is printed) in order, and the
//! cursor moves, and is saved to `--state`, only once that is done. A
//! broken stream reconnects after the cursor, with waits that grow and are
//! jittered. Evictions the relay reports, and id jumps it cannot explain
//! (it restarted, or forgot the channel), are said on stderr and run
//! `--on-missed`.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::fs::File;
use std::io::{self, Write};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use base64::Engine as _;
use serde::Deserialize;

use crate::child;
use crate::cli::ListenArgs;
use crate::client::{Backoff, Client, Failure, Relay, Upload};
use crate::error::{ConfigError, Error, Exit};
use crate::sys;

/// The longest line of the stream accepted: a message of 48 MiB in base64.
const MAX_LINE: usize = 64 << 20;

/// What an empty pipe always takes without blocking (POSIX's minimum).
const PIPE_BUF: usize = 4096;

/// The first and the longest wait before reconnecting.
const FIRST_WAIT: Duration = Duration::from_millis(250);
const LONGEST_WAIT: Duration = Duration::from_secs(30);

/// A stream silent this long (four of the relay's default keepalives) is
/// taken as broken.
const SILENCE: Duration = Duration::from_secs(120);

/// A line of the stream: a message, or an event.
#[derive(Debug, Deserialize)]
struct Line {
    id: Option<u64>,
    time: Option<u64>,
    content_type: Option<String>,
    body: Option<String>,
    encoding: Option<String>,
    #[serde(default)]
    headers: BTreeMap<String, String>,
    event: Option<String>,
    count: Option<u64>,
}

/// What to do with a message.
enum Sink {
    Command(Vec<OsString>),
    Lines(u8),
    Ndjson,
}

/// How handling one message went.
enum Handled {
    Done,
    /// CMD failed (and --keep-going was not given): stop.
    Failed(String),
}

/// Why the loop ended.
enum End {
    Stopped,
    Failed(String),
}

/// Where the cursor is kept.
struct State {
    path: PathBuf,
    temporary: PathBuf,
}

impl State {
    /// The cursor kept in `path` (written aside as `path.tmp`).
    fn new(path: PathBuf) -> State {
        let mut temporary = path.clone().into_os_string();
        temporary.push(".tmp");
        State {
            path,
            temporary: PathBuf::from(temporary),
        }
    }

    /// The saved cursor, if the file exists.
    fn load(&self) -> Result<Option<u64>, String> {
        match std::fs::read_to_string(&self.path) {
            Ok(text) => text.trim().parse().map(Some).map_err(|_| {
                format!(
                    "--state {}: not a cursor (a message id); remove it to start over",
                    self.path.display()
                )
            }),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(format!("--state {}: {e}", self.path.display())),
        }
    }

    /// Saves `id`: written aside, flushed to the disk, renamed over the
    /// file, and the directory flushed, so that a crash or a power cut
    /// leaves the old cursor or the new one, never a torn file.
    fn save(&self, id: u64) -> io::Result<()> {
        let mut file = File::create(&self.temporary)?;
        writeln!(file, "{id}")?;
        file.sync_all()?;
        std::fs::rename(&self.temporary, &self.path)?;
        let dir = match self.path.parent() {
            Some(dir) if !dir.as_os_str().is_empty() => dir,
            _ => Path::new("."),
        };
        File::open(dir)?.sync_all()
    }
}

/// Where the listener is in the channel.
struct Cursor {
    /// The last message handled (or the `--since` / saved id).
    last: Option<u64>,
    /// Start at the oldest retained message (`--since all`, before any).
    from_oldest: bool,
    /// The relay reported a loss, so the next id may jump.
    excused: bool,
}

impl Cursor {
    /// The query that resumes after the cursor.
    fn query(&self) -> String {
        match (self.last, self.from_oldest) {
            (Some(id), _) => format!("?format=ndjson&after={id}"),
            (None, true) => "?format=ndjson&after=0".to_owned(),
            (None, false) => "?format=ndjson".to_owned(),
        }
    }
}

/// `patchcord listen`.
pub fn run(args: ListenArgs) -> Result<Exit, Error> {
    let usage = |reason: String| Error::Config(ConfigError::new(reason));
    let failed = |reason: String| Error::Client {
        command: "listen",
        reason,
    };
    let relay = Relay::parse(&args.url).map_err(usage)?;
    crate::client::check_token(args.presents.token.as_deref()).map_err(usage)?;
    let channel = relay.path().to_owned();
    if !is_pubsub(&channel) {
        return Err(usage(format!(
            "{:?} is not a pubsub channel's URL (…/pubsub/NAME)",
            args.url
        )));
    }
    let state = args.state.clone().map(State::new);
    let saved = match &state {
        Some(state) => state.load().map_err(failed)?,
        None => None,
    };
    let mut cursor = Cursor {
        last: saved,
        from_oldest: false,
        excused: false,
    };
    if saved.is_none() {
        match args.since.as_str() {
            "new" => {}
            "all" => cursor.from_oldest = true,
            id => {
                cursor.last =
                    Some(id.parse().map_err(|_| {
                        usage(format!("--since {id:?}: a message id, `all` or `new`"))
                    })?);
            }
        }
    }
    let sink = if !args.command.is_empty() {
        Sink::Command(args.command.clone())
    } else if args.format == "ndjson" {
        Sink::Ndjson
    } else {
        Sink::Lines(if args.null { 0 } else { b'\n' })
    };
    let stop = sys::Flag::on_signals().map_err(Error::Signal)?;
    let mut client = Client::new(relay).with_token(args.presents.token.clone());
    let listener = Listener {
        args: &args,
        channel,
        state,
        sink,
        stop: &stop,
    };
    match listener.listen(&mut client, &mut cursor) {
        End::Stopped => {
            log::info!(
                "stopped{}",
                cursor
                    .last
                    .map(|id| format!(" after message {id}"))
                    .unwrap_or_default()
            );
            Ok(Exit::Clean)
        }
        End::Failed(reason) => Err(failed(reason)),
    }
}

/// What the loop needs besides the cursor.
struct Listener<'a> {
    args: &'a ListenArgs,
    /// The channel's path, for PATCHCORD_CHANNEL.
    channel: String,
    state: Option<State>,
    sink: Sink,
    stop: &'a sys::Flag,
}

impl Listener<'_> {
    // ── the loop: subscribe after the cursor, handle each line ──
    /// Follows the channel until a stop, or a failure that ends it.
    fn listen(&self, client: &mut Client, cursor: &mut Cursor) -> End {
        let mut backoff = Backoff::new(FIRST_WAIT, LONGEST_WAIT);
        let watch = [(self.stop.fd(), libc::POLLIN)];
        loop {
            if self.stop.is_raised() {
                return End::Stopped;
            }
            let target = format!("{}{}", self.channel, cursor.query());
            let why = match client.open("GET", &target, &[], Upload::None, &watch) {
                Err(Failure::Withdrawn(..)) => return End::Stopped,
                Err(Failure::Io(e)) => format!("cannot reach the relay: {e}"),
                Ok(incoming) if incoming.head.status == 200 => {
                    let mut incoming = incoming;
                    incoming.watch(self.stop.fd());
                    incoming.patience(SILENCE);
                    let again = if backoff.failures() > 0 { " again" } else { "" };
                    log::info!("subscribed{again} to {}", crate::mode::short(&self.channel));
                    // A loss before the stream's first message comes as the
                    // header Patch-Missed and as the stream's first line:
                    // the line is the one acted on.
                    loop {
                        match incoming.line(MAX_LINE) {
                            Ok(Some(line)) => match self.line(&line, cursor) {
                                Ok(()) => backoff.reset(),
                                Err(end) => return end,
                            },
                            Ok(None) => break "the relay ended the stream".to_owned(),
                            Err(e) if e.kind() == io::ErrorKind::Interrupted => {
                                return End::Stopped;
                            }
                            Err(e) if e.kind() == io::ErrorKind::InvalidData => {
                                return End::Failed(format!("the relay's stream: {e}"));
                            }
                            Err(e) => break format!("the stream broke: {e}"),
                        }
                    }
                }
                Ok(incoming) => {
                    let status = incoming.head.status;
                    let reason = incoming.reason();
                    if crate::client::is_final(status) {
                        return End::Failed(format!(
                            "the relay refused {}: {status} {reason:?}",
                            self.channel
                        ));
                    }
                    format!("the relay answered {status} {reason:?}")
                }
            };
            let wait = backoff.next_wait();
            if backoff.failures() <= 1 {
                log::warn!("{why}; subscribing again");
            } else {
                log::debug!("{why}; subscribing again in {wait:?}");
            }
            if self.stop.sleep(wait) {
                return End::Stopped;
            }
        }
    }

    /// Handles one line of the stream.
    fn line(&self, raw: &[u8], cursor: &mut Cursor) -> Result<(), End> {
        let line: Line = serde_json::from_slice(raw)
            .map_err(|e| End::Failed(format!("the relay's stream has a bad line: {e}")))?;
        match (line.event.as_deref(), line.id) {
            (Some("missed"), _) => {
                self.missed(
                    cursor,
                    line.count.map_or("unknown".into(), |n| n.to_string()),
                );
                if matches!(self.sink, Sink::Ndjson) {
                    self.print(raw, b'\n').map_err(End::Failed)?;
                }
                Ok(())
            }
            (Some(_), _) | (None, None) => Ok(()),
            (None, Some(id)) => {
                if cursor.last.is_some_and(|last| id <= last) {
                    return Ok(());
                }
                if let Some(last) = cursor.last.filter(|&last| id > last + 1 && !cursor.excused) {
                    log::warn!(
                        "missed unknown: the ids jump from {last} to {id}; the relay restarted \
                         or forgot the channel, and messages published before that may be lost"
                    );
                    if matches!(self.sink, Sink::Ndjson) {
                        self.print(br#"{"event":"missed","count":null}"#, b'\n')
                            .map_err(End::Failed)?;
                    }
                    self.run_on_missed("unknown");
                }
                cursor.excused = false;
                match self.handle(id, &line, raw) {
                    Handled::Done => {}
                    Handled::Failed(reason) => return Err(End::Failed(reason)),
                }
                cursor.last = Some(id);
                if let Some(state) = &self.state {
                    state.save(id).map_err(|e| {
                        End::Failed(format!("cannot save --state {}: {e}", state.path.display()))
                    })?;
                }
                if self.stop.is_raised() {
                    return Err(End::Stopped);
                }
                Ok(())
            }
        }
    }

    /// The relay reported `count` messages lost before the next one.
    fn missed(&self, cursor: &mut Cursor, count: String) {
        cursor.excused = true;
        log::warn!(
            "missed {count}: messages of {} were evicted before they could be handled",
            self.channel
        );
        self.run_on_missed(&count);
    }

    /// Runs `--on-missed`, if given, with PATCHCORD_MISSED=`count`.
    fn run_on_missed(&self, count: &str) {
        let Some(script) = &self.args.on_missed else {
            return;
        };
        let status = Command::new("sh")
            .arg("-c")
            .arg(script)
            .process_group(0)
            .env("PATCHCORD_MISSED", count)
            .env("PATCHCORD_CHANNEL", &self.channel)
            .stdin(std::process::Stdio::null())
            .status();
        match status {
            Ok(status) if status.success() => {}
            Ok(status) => log::warn!("--on-missed: {}", child::describe(status)),
            Err(e) => log::warn!("--on-missed: cannot run sh: {e}"),
        }
    }

    /// Prints message `id`, or runs CMD for it.
    fn handle(&self, id: u64, line: &Line, raw: &[u8]) -> Handled {
        let body = match decode(line) {
            Ok(body) => body,
            Err(reason) => return Handled::Failed(format!("message {id}: {reason}")),
        };
        match &self.sink {
            Sink::Lines(delim) => match self.print(&body, *delim) {
                Ok(()) => Handled::Done,
                Err(reason) => Handled::Failed(reason),
            },
            Sink::Ndjson => match self.print(raw, b'\n') {
                Ok(()) => Handled::Done,
                Err(reason) => Handled::Failed(reason),
            },
            Sink::Command(argv) => self.run_command(argv, id, line, body),
        }
    }

    /// Writes `bytes` and `delim` to standard output, flushed.
    fn print(&self, bytes: &[u8], delim: u8) -> Result<(), String> {
        let mut out = io::stdout().lock();
        out.write_all(bytes)
            .and_then(|()| out.write_all(&[delim]))
            .and_then(|()| out.flush())
            .map_err(|e| format!("cannot write to standard output: {e}"))
    }

    /// Runs CMD for message `id`, its body on stdin, and waits for it.
    fn run_command(&self, argv: &[OsString], id: u64, line: &Line, body: Vec<u8>) -> Handled {
        let mut env = vec![
            ("PATCHCORD_ID".to_owned(), OsString::from(id.to_string())),
            (
                "PATCHCORD_CHANNEL".to_owned(),
                OsString::from(&self.channel),
            ),
            (
                "PATCHCORD_TIME".to_owned(),
                OsString::from(line.time.unwrap_or(0).to_string()),
            ),
            (
                "PATCHCORD_CONTENT_TYPE".to_owned(),
                child::value(line.content_type.as_deref().unwrap_or("").as_bytes()),
            ),
        ];
        let mut title = OsString::new();
        for (name, value) in &line.headers {
            if name.eq_ignore_ascii_case("title") {
                title = child::value(value.as_bytes());
            }
            env.push((child::header_variable(name), child::value(value.as_bytes())));
        }
        env.push(("PATCHCORD_TITLE".to_owned(), title));
        let mut process = match child::spawn(argv, &env, false) {
            Ok(process) => process,
            Err(e) => {
                return Handled::Failed(format!("cannot run {:?}: {e}", argv[0]));
            }
        };
        // A body that fits PIPE_BUF goes into the empty pipe at once; a
        // larger one from a thread of its own, so that a CMD that does not
        // read it, or starts something that keeps stdin open, cannot hold
        // the loop.
        if let Some(mut stdin) = process.stdin.take() {
            if body.len() <= PIPE_BUF {
                let _ = stdin.write_all(&body);
                drop(stdin);
            } else {
                let spawned = std::thread::Builder::new()
                    .name("stdin".into())
                    .spawn(move || {
                        let _ = stdin.write_all(&body);
                    });
                if let Err(e) = spawned {
                    // CMD would see an empty body: end it, count it failed.
                    child::kill_group(process.id());
                    let _ = process.wait();
                    return Handled::Failed(format!(
                        "message {id}: cannot start a thread for CMD's stdin: {e}"
                    ));
                }
            }
        }
        let status = loop {
            match process.wait() {
                Ok(status) => break status,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Handled::Failed(format!("cannot wait for CMD: {e}")),
            }
        };
        if status.success() {
            log::debug!("message {id}: done");
            Handled::Done
        } else if self.args.keep_going {
            log::warn!(
                "message {id}: CMD failed ({}); going on",
                child::describe(status)
            );
            Handled::Done
        } else {
            Handled::Failed(format!(
                "message {id}: CMD failed ({}); stopped before it (--keep-going moves on)",
                child::describe(status)
            ))
        }
    }
}

/// Whether `path` names a pubsub channel, by the relay's own grammar.
fn is_pubsub(path: &str) -> bool {
    crate::route::Channel::parse(path.to_owned()).mode == crate::route::Mode::Pubsub
}

/// A message's body from its line.
fn decode(line: &Line) -> Result<Vec<u8>, String> {
    let body = line.body.as_deref().unwrap_or("");
    match line.encoding.as_deref() {
        None => Ok(body.as_bytes().to_vec()),
        Some("base64") => base64::engine::general_purpose::STANDARD
            .decode(body)
            .map_err(|e| format!("a body that is not base64: {e}")),
        Some(other) => Err(format!("an unknown encoding {other:?}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_pubsub_channels_are_followed() {
        assert!(is_pubsub("/pubsub/alerts"));
        assert!(is_pubsub("/u/alice/pubsub/a/b"));
        assert!(!is_pubsub("/jobs"));
        assert!(!is_pubsub("/pubsub"));
        assert!(!is_pubsub("/queue/pubsub/x"));
    }

    #[test]
    fn the_cursor_resumes_after_the_last_message() {
        let mut cursor = Cursor {
            last: None,
            from_oldest: false,
            excused: false,
        };
        assert_eq!(cursor.query(), "?format=ndjson");
        cursor.from_oldest = true;
        assert_eq!(cursor.query(), "?format=ndjson&after=0");
        cursor.last = Some(41);
        assert_eq!(cursor.query(), "?format=ndjson&after=41");
    }

    #[test]
    fn lines_decode_text_and_base64() {
        let text: Line = serde_json::from_str(
            r#"{"id":5,"time":1,"content_type":"text/plain","body":"hi\n","headers":{"Title":"T"}}"#,
        )
        .expect("parses");
        assert_eq!(decode(&text).expect("decodes"), b"hi\n");
        assert_eq!(text.headers["Title"], "T");
        let binary: Line =
            serde_json::from_str(r#"{"id":6,"body":"AAH/","encoding":"base64"}"#).expect("parses");
        assert_eq!(decode(&binary).expect("decodes"), [0, 1, 255]);
        let missed: Line = serde_json::from_str(r#"{"event":"missed","count":3}"#).expect("parses");
        assert_eq!(
            (missed.event.as_deref(), missed.count),
            (Some("missed"), Some(3))
        );
    }

    #[test]
    fn the_state_file_is_replaced_whole() {
        let dir = std::env::temp_dir().join(format!("patchcord-state-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let state = State::new(dir.join("cursor"));
        assert_eq!(state.load(), Ok(None));
        state.save(17).expect("saves");
        state.save(18).expect("saves");
        assert_eq!(state.load(), Ok(Some(18)));
        assert!(!state.temporary.exists());
        std::fs::write(&state.path, "garbage").expect("writes");
        assert!(state.load().is_err());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
