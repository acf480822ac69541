//! The kinds of failure: [`Error`] ends the process (startup or fatal, exit
//! status 1), [`Reject`] ends one request (a status, a one-line reason and
//! the headers that go with it), and [`Exit`] is the status the process ends
//! with. Handlers return `Result<_, Reject>`; `app.rs` is the one place that
//! turns a Reject into a response.

use std::borrow::Cow;
use std::process::ExitCode;
use std::{fmt, io};

/// The status patchcord exits with (documented in the man page, EXIT STATUS).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    /// A clean stop: SIGINT or SIGTERM, everything delivered.
    Clean = 0,
    /// A startup or fatal error.
    Fatal = 1,
    /// A usage error: a bad flag, value or variable.
    Usage = 2,
    /// Stopped with messages that could not be delivered (the named-pipe bridge).
    Undelivered = 3,
}

impl From<Exit> for ExitCode {
    fn from(exit: Exit) -> ExitCode {
        ExitCode::from(exit as u8)
    }
}

/// A failure that stops patchcord as a whole.
#[derive(Debug)]
pub enum Error {
    /// A flag, value or environment variable is unusable (exit status 2).
    Config(ConfigError),
    /// The listening socket could not be bound.
    Bind { addr: String, source: io::Error },
    /// The bound socket's own address could not be read back.
    LocalAddr(io::Error),
    /// The SIGINT/SIGTERM/SIGHUP handlers could not be installed.
    Signal(io::Error),
    /// The logger could not be installed.
    Logger(log::SetLoggerError),
    /// The accept thread (or the pubsub store's writer) could not be started.
    Spawn(io::Error),
    /// The access file (`--auth`) is unreadable or wrong.
    Access(crate::access::FileError),
    /// The pubsub store (`--store`) cannot be opened or read back.
    Store(crate::store::OpenError),
    /// `patchcord fifo` could not start.
    Fifo(crate::fifo::Failed),
    /// `patchcord listen` or `work` could not go on.
    Client {
        command: &'static str,
        reason: String,
    },
    /// The kernel gave no random bytes.
    Random(io::Error),
}

impl Error {
    /// The exit status this error ends the process with.
    pub fn exit(&self) -> Exit {
        match self {
            Error::Config(_) => Exit::Usage,
            _ => Exit::Fatal,
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Config(error) => write!(f, "{error}"),
            Error::Bind { addr, .. } => write!(f, "cannot listen on {addr}"),
            Error::LocalAddr(_) => write!(f, "cannot read the bound address"),
            Error::Signal(_) => write!(f, "cannot install the signal handlers"),
            Error::Logger(_) => write!(f, "cannot install the logger"),
            Error::Spawn(_) => write!(f, "cannot start a thread"),
            Error::Access(error) => write!(f, "{error}"),
            Error::Store(error) => write!(f, "{error}"),
            Error::Random(_) => write!(f, "cannot read random bytes"),
            Error::Fifo(error) => write!(f, "fifo: {error}"),
            Error::Client { command, reason } => write!(f, "{command}: {reason}"),
        }
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Error::Config(error) => error.source(),
            Error::Bind { source, .. } => Some(source),
            Error::LocalAddr(source) => Some(source),
            Error::Signal(source) => Some(source),
            Error::Logger(source) => Some(source),
            Error::Spawn(source) => Some(source),
            Error::Access(_) | Error::Store(_) => None,
            Error::Random(source) => Some(source),
            Error::Fifo(_) | Error::Client { .. } => None,
        }
    }
}

impl From<ConfigError> for Error {
    fn from(error: ConfigError) -> Error {
        Error::Config(error)
    }
}

/// An unusable setting: what is wrong with it, and the underlying cause if
/// there is one (a failed name lookup, a number that would not parse).
#[derive(Debug)]
pub struct ConfigError {
    pub message: String,
    pub source: Option<Box<dyn std::error::Error + Send + Sync>>,
}

impl ConfigError {
    /// A setting that is wrong in itself.
    pub fn new(message: impl Into<String>) -> ConfigError {
        ConfigError {
            message: message.into(),
            source: None,
        }
    }

    /// A setting that could not be used because of `source`.
    pub fn caused(
        message: impl Into<String>,
        source: impl Into<Box<dyn std::error::Error + Send + Sync>>,
    ) -> ConfigError {
        ConfigError {
            message: message.into(),
            source: Some(source.into()),
        }
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for ConfigError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source
            .as_deref()
            .map(|source| source as &(dyn std::error::Error + 'static))
    }
}

/// Why one request is refused: its status code, a one-line reason for the
/// body, and the headers the refusal needs (`Allow`, `Retry-After`,
/// `WWW-Authenticate`, `Upgrade`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reject {
    pub status: u16,
    pub reason: Cow<'static, str>,
    pub headers: Vec<(&'static str, Cow<'static, str>)>,
}

impl Reject {
    /// A refusal with `status` and a one-line `reason`.
    pub fn new(status: u16, reason: impl Into<Cow<'static, str>>) -> Reject {
        Reject {
            status,
            reason: reason.into(),
            headers: Vec::new(),
        }
    }

    /// The same refusal with header `name: value` added.
    pub fn with_header(
        mut self,
        name: &'static str,
        value: impl Into<Cow<'static, str>>,
    ) -> Reject {
        self.headers.push((name, value.into()));
        self
    }

    /// 400: the request is malformed.
    pub fn bad_request(reason: impl Into<Cow<'static, str>>) -> Reject {
        Reject::new(400, reason)
    }

    /// 405 with the `Allow` header listing what the resource accepts.
    pub fn method_not_allowed(allow: &'static str) -> Reject {
        Reject::new(405, format!("method not allowed here; allowed: {allow}"))
            .with_header("Allow", allow)
    }

    /// 408: nobody came within the wait.
    pub fn timeout() -> Reject {
        Reject::new(
            408,
            "timed out waiting for the other side; nothing was consumed",
        )
    }

    /// 410: the channel was deleted while this request waited.
    pub fn deleted() -> Reject {
        Reject::new(410, "channel deleted while waiting")
    }

    /// 503: the server is shutting down.
    pub fn shutting_down() -> Reject {
        Reject::new(503, "server shutting down")
    }

    /// 500: the client hung up before its answer could be written.
    pub fn hung_up() -> Reject {
        Reject::new(500, "client hung up")
    }
}
