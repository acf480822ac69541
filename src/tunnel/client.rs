//! `patchcord tunnel URL`: stdin and stdout carried through a relay's
//! WebSocket tunnel (`/_/tunnel/HOST/PORT`), so that ssh can use it as its
//! ProxyCommand. It connects (TLS for https:// and wss://, with the
//! webpki roots), upgrades with the token as `Patch-Token`, then moves
//! bytes with the relay's own loop (`pump.rs`) until either side ends:
//! exit 0 when the relay closed the tunnel cleanly or stdin ended; 1 with a
//! one-line reason otherwise (the relay's refusal, a broken connection).

use std::io::{self, Read, Write};
use std::os::fd::RawFd;
use std::time::Duration;

use tungstenite::client::IntoClientRequest;
use tungstenite::handshake::HandshakeError;

use super::pump;
use crate::cli::TunnelArgs;
use crate::error::{ConfigError, Error, Exit};
use crate::remote::{self, Url};

/// How long connecting and the upgrade may take: the relay dials the
/// target (within ten seconds) before it answers.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(20);

/// Runs `patchcord tunnel` until the tunnel ends.
pub fn run(args: TunnelArgs) -> Result<Exit, Error> {
    let keepalive = crate::config::keepalive(args.keepalive_secs)?;
    let url = Url::parse(&args.url, &["http", "https", "ws", "wss"])
        .map_err(|why| ConfigError::new(format!("tunnel URL {:?} {why}", args.url)))?;
    let failed = |reason: String| Error::Client {
        command: "tunnel",
        reason,
    };
    let stop = crate::sys::Flag::on_signals().map_err(Error::Signal)?;
    let trust = match &args.cacert {
        Some(file) => remote::Trust::from_file(file)
            .map_err(|why| ConfigError::new(format!("--cacert: {why}")))?,
        None => remote::Trust::builtin(),
    };
    let stream = remote::connect(&url, HANDSHAKE_TIMEOUT, &trust)
        .map_err(|why| failed(format!("cannot connect to {}: {why}", url.authority)))?;
    let _ = crate::sys::keepalive(stream.fd(), Some((30, 10, 3)));
    let websocket = format!(
        "{}://{}{}",
        if url.tls { "wss" } else { "ws" },
        url.authority,
        url.path
    );
    let mut request = websocket
        .as_str()
        .into_client_request()
        .map_err(|e| failed(format!("bad URL: {e}")))?;
    let headers = request.headers_mut();
    if let Some(token) = &args.presents.token {
        let value = token
            .parse()
            .map_err(|_| failed("the token cannot be sent in a header".to_owned()))?;
        headers.insert("Patch-Token", value);
    }
    headers.insert(
        "User-Agent",
        tungstenite::http::HeaderValue::from_static(concat!(
            "patchcord/",
            env!("CARGO_PKG_VERSION")
        )),
    );
    let (mut ws, _) =
        match tungstenite::client::client_with_config(request, stream, Some(super::ws_config())) {
            Ok(done) => done,
            Err(HandshakeError::Failure(tungstenite::Error::Http(response))) => {
                let status = response.status();
                let reason = response
                    .body()
                    .as_deref()
                    .map(String::from_utf8_lossy)
                    .and_then(|body| body.lines().next().map(str::to_owned))
                    .filter(|line| !line.is_empty())
                    .unwrap_or_else(|| status.canonical_reason().unwrap_or("").to_owned());
                return Err(failed(format!(
                    "the relay answered {}: {reason}",
                    status.as_u16()
                )));
            }
            Err(HandshakeError::Failure(e)) => {
                return Err(failed(format!("upgrade failed: {}", pump::describe_ws(&e))));
            }
            Err(HandshakeError::Interrupted(_)) => {
                return Err(failed("upgrade interrupted".to_owned()));
            }
        };
    let ws_fd = ws.get_ref().fd();
    // From the upgrade on, the loop never blocks on the relay.
    ws.get_mut()
        .untimed()
        .and_then(|()| ws.get_ref().tcp().set_nonblocking(true))
        .map_err(|e| failed(format!("cannot set up the socket: {e}")))?;
    let end = pump::run(
        pump::Ends {
            ws: &mut ws,
            ws_fd,
            input: &mut Fd(0),
            input_fd: 0,
            output: &mut Stdout::new(),
            output_fd: 1,
            stop: Some(stop.fd()),
        },
        keepalive,
        &|_, _| {},
    );
    if matches!(end, pump::End::Local | pump::End::Stopped) {
        // Our close was sent: end writing, and take what still comes
        // before closing, so that no reset destroys what we sent last.
        let _ = super::drain(&[ws.get_ref().tcp()]);
    }
    match end {
        pump::End::Remote | pump::End::Local | pump::End::Stopped => Ok(Exit::Clean),
        pump::End::Broken(reason) => Err(failed(reason)),
    }
}

/// Standard input, unbuffered: Rust's buffer would hide bytes from poll.
/// Read only when poll says it may be, so it never blocks.
struct Fd(RawFd);

impl Read for Fd {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        // SAFETY: `out` is valid for `out.len()` bytes of writes; the
        // descriptor is the process's own stdin, open throughout.
        let n = unsafe { libc::read(self.0, out.as_mut_ptr().cast(), out.len()) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(n as usize)
    }
}

/// Standard output, written without ever blocking (the loop must go on
/// answering pings and reading the relay while a slow reader catches up),
/// though the descriptor the shell shares stays as it is.
enum Stdout {
    /// A pipe or a terminal, opened again, non-blocking: a description of
    /// our own.
    Reopened(std::fs::File),
    /// A socket (ssh may pass one): each send says MSG_DONTWAIT.
    Socket,
    /// A regular file (never blocks), or what could not be opened again:
    /// written after poll says it may be, a pipe's atomic size at a time.
    Polled { capped: bool },
}

impl Stdout {
    fn new() -> Stdout {
        // SAFETY: stat is plain data, valid when zeroed.
        let mut stat: libc::stat = unsafe { std::mem::zeroed() };
        // SAFETY: fstat fills `stat`, alive through the call; fd 1 is the
        // process's own.
        if unsafe { libc::fstat(1, &mut stat) } != 0 {
            return Stdout::Polled { capped: true };
        }
        match stat.st_mode & libc::S_IFMT {
            libc::S_IFREG => Stdout::Polled { capped: false },
            libc::S_IFSOCK => Stdout::Socket,
            _ => {
                use std::os::unix::fs::OpenOptionsExt as _;
                std::fs::OpenOptions::new()
                    .write(true)
                    .custom_flags(libc::O_NONBLOCK)
                    .open("/proc/self/fd/1")
                    .map_or(Stdout::Polled { capped: true }, Stdout::Reopened)
            }
        }
    }
}

impl Write for Stdout {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        let n = match self {
            Stdout::Reopened(file) => return file.write(data),
            // SAFETY: `data` is valid for `data.len()` bytes of reads; fd 1
            // is the process's own, open throughout.
            Stdout::Socket => unsafe {
                libc::send(
                    1,
                    data.as_ptr().cast(),
                    data.len(),
                    libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
                )
            },
            Stdout::Polled { capped } => {
                let ready = crate::sys::poll(&[(1, libc::POLLOUT)], Some(Duration::ZERO))?;
                if !ready[0].writable && !ready[0].error {
                    return Err(io::ErrorKind::WouldBlock.into());
                }
                let len = if *capped {
                    data.len().min(libc::PIPE_BUF)
                } else {
                    data.len()
                };
                // SAFETY: as above, for `len` bytes.
                unsafe { libc::write(1, data.as_ptr().cast(), len) }
            }
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(n as usize)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}
