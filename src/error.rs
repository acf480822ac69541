//! The two kinds of failure: [`Error`] ends the process (startup or fatal, exit
//! status 1) and [`Reject`] ends one request (a status and a one-line reason).
//! Handlers return `Result<_, Reject>`; the connection loop in `server.rs` is the
//! one place that turns a Reject into a response.

use std::borrow::Cow;
use std::{fmt, io};

/// A failure that stops patchcord as a whole.
#[derive(Debug)]
pub enum Error {
    /// The listening socket could not be bound.
    Bind { addr: String, source: io::Error },
    /// The bound socket's own address could not be read back.
    LocalAddr(io::Error),
    /// The SIGINT/SIGTERM handler could not be installed.
    Signal(ctrlc::Error),
    /// The logger could not be installed.
    Logger(log::SetLoggerError),
    /// The accept thread could not be started.
    Spawn(io::Error),
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Bind { addr, .. } => write!(f, "cannot listen on {addr}"),
            Error::LocalAddr(_) => write!(f, "cannot read the bound address"),
            Error::Signal(_) => write!(f, "cannot install the signal handler"),
            Error::Logger(_) => write!(f, "cannot install the logger"),
            Error::Spawn(_) => write!(f, "cannot start the accept thread"),
        }
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Error::Bind { source, .. } => Some(source),
            Error::LocalAddr(source) => Some(source),
            Error::Signal(source) => Some(source),
            Error::Logger(source) => Some(source),
            Error::Spawn(source) => Some(source),
        }
    }
}

/// Why one request is refused: its status code, a one-line reason for the body,
/// and at most one extra header (`Allow` on 405).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reject {
    pub status: u16,
    pub reason: Cow<'static, str>,
    pub header: Option<(&'static str, &'static str)>,
}

impl Reject {
    /// A refusal with `status` and a one-line `reason`.
    pub fn new(status: u16, reason: impl Into<Cow<'static, str>>) -> Reject {
        Reject {
            status,
            reason: reason.into(),
            header: None,
        }
    }

    /// 400: the request is malformed.
    pub fn bad_request(reason: impl Into<Cow<'static, str>>) -> Reject {
        Reject::new(400, reason)
    }

    /// 405 with the `Allow` header listing what the resource accepts.
    pub fn method_not_allowed(allow: &'static str) -> Reject {
        Reject {
            header: Some(("Allow", allow)),
            ..Reject::new(405, format!("method not allowed here; allowed: {allow}"))
        }
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
}
