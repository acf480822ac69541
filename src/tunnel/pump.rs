//! One tunnel's bytes: a WebSocket on one side, a byte stream on the other
//! (the TCP target on the relay; stdin and stdout in `patchcord tunnel`),
//! moved both ways by one thread with poll(2). Nothing blocks: the
//! WebSocket's socket is non-blocking, and each side is read only when the
//! other has taken the last bytes, so memory stays at one message per
//! direction however fast either side is, and neither side can stall the
//! other into a deadlock. Either side's end ends the tunnel: a close frame
//! or an error on the WebSocket, the end of the byte stream; the caller then
//! drops both, so the other side learns of it at once. Pings keep an idle
//! tunnel alive and find a peer that vanished.

use std::io::{self, Read, Write};
use std::os::fd::RawFd;
use std::time::{Duration, Instant};

use tungstenite::{Message, WebSocket};

use crate::sys;

/// The most read from the byte side per message.
const CHUNK: usize = 64 * 1024;

/// How long a closing tunnel waits for the peer's close frame, or for its
/// last bytes to be taken.
pub const CLOSE_GRACE: Duration = Duration::from_secs(1);

/// The two sides of a tunnel.
pub struct Ends<'a, S> {
    pub ws: &'a mut WebSocket<S>,
    /// The WebSocket's socket (non-blocking).
    pub ws_fd: RawFd,
    pub input: &'a mut dyn Read,
    pub input_fd: RawFd,
    pub output: &'a mut dyn Write,
    pub output_fd: RawFd,
    /// A descriptor that becomes readable when the tunnel should close.
    pub stop: Option<RawFd>,
}

/// Which way bytes went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flow {
    /// From the WebSocket to the byte side.
    FromWebSocket,
    /// From the byte side to the WebSocket.
    ToWebSocket,
}

/// How a tunnel ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum End {
    /// The WebSocket's peer closed it with a close frame.
    Remote,
    /// The byte side ended, and the WebSocket was closed.
    Local,
    /// The stop descriptor asked for it; the WebSocket was closed.
    Stopped,
    /// Something broke; the reason, for a log line.
    Broken(String),
}

/// Moves bytes between `ends` until either side ends; pings after
/// `keepalive` of silence and gives up after as long again without an
/// answer. `tally` hears of every message's bytes as they go.
pub fn run<S: Read + Write>(
    ends: Ends<'_, S>,
    keepalive: Duration,
    tally: &dyn Fn(Flow, u64),
) -> End {
    let Ends {
        ws,
        ws_fd,
        input,
        input_fd,
        output,
        output_fd,
        stop,
    } = ends;
    // Bytes from the WebSocket not yet taken by the byte side.
    let mut pending: Vec<u8> = Vec::new();
    let mut taken = 0usize;
    // The WebSocket holds frames its socket has not taken yet.
    let mut unflushed = false;
    // Read the WebSocket without waiting for poll: it may hold whole
    // messages already read from its socket.
    let mut drain = true;
    let mut remote_closed = false;
    // Set when we sent our close frame: how we ended, and until when we
    // wait for the peer's.
    let mut closing: Option<(End, Instant)> = None;
    let mut heard = Instant::now();
    let mut pinged: Option<Instant> = None;
    let mut buf = vec![0u8; CHUNK];

    loop {
        // 1. What the WebSocket holds, while the byte side has taken the rest.
        while drain && taken == pending.len() && !remote_closed {
            match ws.read() {
                Ok(message) => {
                    heard = Instant::now();
                    pinged = None;
                    match message {
                        Message::Binary(_) | Message::Text(_) => {
                            pending = message.into_data().into();
                            taken = 0;
                            tally(Flow::FromWebSocket, pending.len() as u64);
                        }
                        Message::Close(_) => remote_closed = true,
                        Message::Ping(_) | Message::Pong(_) | Message::Frame(_) => {}
                    }
                    // A ping's pong or a close's answer may wait to be sent.
                    unflushed = true;
                }
                Err(tungstenite::Error::Io(e)) if e.kind() == io::ErrorKind::WouldBlock => {
                    drain = false;
                }
                Err(tungstenite::Error::ConnectionClosed | tungstenite::Error::AlreadyClosed) => {
                    remote_closed = true;
                }
                Err(e) => {
                    if let Some((end, _)) = closing.take() {
                        // Our close was sent: a peer that then hangs up is done too.
                        return end;
                    }
                    return End::Broken(describe_ws(&e));
                }
            }
        }
        // 2. Bytes for the byte side.
        while taken < pending.len() {
            match output.write(&pending[taken..]) {
                Ok(0) => return End::Broken("the output takes no more".to_owned()),
                Ok(n) => taken += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return End::Broken(format!("writing: {}", e.kind())),
            }
        }
        if taken == pending.len() && !pending.is_empty() {
            pending = Vec::new();
            taken = 0;
            drain = true;
            continue;
        }
        // 3. Frames the WebSocket holds for its socket.
        if unflushed {
            match ws.flush() {
                Ok(()) => unflushed = false,
                Err(tungstenite::Error::Io(e)) if e.kind() == io::ErrorKind::WouldBlock => {}
                // A server's socket is done once its close was answered.
                Err(tungstenite::Error::ConnectionClosed | tungstenite::Error::AlreadyClosed) => {
                    unflushed = false;
                    remote_closed = remote_closed || closing.is_none();
                }
                Err(e) => return End::Broken(describe_ws(&e)),
            }
        }
        if remote_closed && taken == pending.len() {
            return closing.map_or(End::Remote, |(end, _)| end);
        }
        let now = Instant::now();
        if let Some((_, until)) = &closing {
            if now >= *until {
                let (end, _) = closing.take().unwrap_or((End::Local, now));
                return end;
            }
        }
        // 4. Keepalive: a ping after silence; a peer that never answers is gone.
        match pinged {
            Some(at) if now.duration_since(at) >= keepalive => {
                return End::Broken(format!("no answer to a ping in {keepalive:?}"));
            }
            None if closing.is_none() && now.duration_since(heard) >= keepalive => {
                if let Err(e) = ws.write(Message::Ping(Vec::new().into())) {
                    return End::Broken(describe_ws(&e));
                }
                unflushed = true;
                pinged = Some(now);
                continue;
            }
            _ => {}
        }
        // 5. Wait for any side to be ready.
        let reading_input = !unflushed && closing.is_none() && !remote_closed;
        // A descriptor of no interest now is -1, which poll skips: a hang-up
        // is reported whatever the events asked, and would spin the loop.
        let watch =
            |fd: RawFd, events: libc::c_short| if events == 0 { (-1, 0) } else { (fd, events) };
        let mut ws_events = 0;
        if taken == pending.len() && !remote_closed {
            ws_events |= libc::POLLIN;
        }
        if unflushed {
            ws_events |= libc::POLLOUT;
        }
        let mut fds = vec![
            watch(ws_fd, ws_events),
            watch(input_fd, if reading_input { libc::POLLIN } else { 0 }),
            watch(
                output_fd,
                if taken < pending.len() {
                    libc::POLLOUT
                } else {
                    0
                },
            ),
        ];
        if let Some(stop) = stop {
            fds.push((stop, libc::POLLIN));
        }
        let deadline = match (&closing, pinged) {
            (Some((_, until)), _) => *until,
            (None, Some(at)) => at + keepalive,
            (None, None) => heard + keepalive,
        };
        let ready = match sys::poll(&fds, Some(deadline.saturating_duration_since(now))) {
            Ok(ready) => ready,
            Err(e) => return End::Broken(format!("poll: {e}")),
        };
        if ready[0].readable || ready[0].error {
            drain = true;
        }
        if let Some(ready) = ready.get(3) {
            if ready.readable && closing.is_none() {
                closing = Some((End::Stopped, close(ws, &mut unflushed)));
                continue;
            }
        }
        if reading_input && (ready[1].readable || ready[1].error) {
            match input.read(&mut buf) {
                Ok(0) => {
                    closing = Some((End::Local, close(ws, &mut unflushed)));
                }
                Ok(n) => {
                    let message = Message::binary(buf[..n].to_vec());
                    match ws.write(message) {
                        Ok(()) => {}
                        Err(tungstenite::Error::Io(e)) if e.kind() == io::ErrorKind::WouldBlock => {
                        }
                        Err(e) => return End::Broken(describe_ws(&e)),
                    }
                    unflushed = true;
                    tally(Flow::ToWebSocket, n as u64);
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
                    ) => {}
                Err(e) => {
                    let reason = format!("reading: {}", e.kind());
                    let _ = close(ws, &mut unflushed);
                    return End::Broken(reason);
                }
            }
        }
    }
}

/// Sends a close frame (what the socket does not take now is flushed by
/// the loop); returns until when to wait for the peer's.
fn close<S: Read + Write>(ws: &mut WebSocket<S>, unflushed: &mut bool) -> Instant {
    match ws.close(None) {
        Ok(()) => {}
        Err(tungstenite::Error::Io(e)) if e.kind() == io::ErrorKind::WouldBlock => {
            *unflushed = true;
        }
        Err(e) => log::debug!("tunnel: closing: {}", describe_ws(&e)),
    }
    Instant::now() + CLOSE_GRACE
}

/// A WebSocket error as a short reason.
pub fn describe_ws(error: &tungstenite::Error) -> String {
    match error {
        tungstenite::Error::Io(e) => format!("{}", e.kind()),
        tungstenite::Error::Protocol(
            tungstenite::error::ProtocolError::ResetWithoutClosingHandshake,
        ) => "the peer hung up without closing".to_owned(),
        tungstenite::Error::Capacity(e) => format!("message too large: {e}"),
        other => other.to_string(),
    }
}
