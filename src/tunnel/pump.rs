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

/// The most read from the byte side per message (an ssh packet is at most
/// 32 KiB; each tunnel holds this buffer for its life).
const CHUNK: usize = 32 * 1024;

/// How long a closing tunnel waits for the peer's close frame, or for its
/// last bytes to be taken, after the last step forward.
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
/// `keepalive` of silence and gives up on a peer that neither answers nor
/// takes bytes for as long again. `tally` hears of every message's bytes
/// as they go.
///
/// Silence is measured on the peer: any message from it, and any frame of
/// ours its socket took, proves it alive, and so does its kernel taking
/// what waits before the ping. While the byte side has not taken the last
/// message the WebSocket is not read (that is the backpressure), so then
/// the peer's answer cannot be seen and no ping is timed.
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
    // The peer closed (its close frame, or its socket): what is left is to
    // hand the byte side the last message and the peer our answer, by
    // `grace` at the latest.
    let mut remote_closed = false;
    // Set when we sent our close frame: how we ended.
    let mut closing: Option<End> = None;
    // Until when a closing tunnel waits; moved on by every step forward.
    let mut grace: Option<Grace> = None;
    let mut heard = Instant::now();
    let mut pinged: Option<Instant> = None;
    // What the WebSocket's socket held unacknowledged when last looked at
    // after a ping.
    let mut unsent_at_ping = usize::MAX;
    let mut ping_sent = Instant::now();
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
                    if let Some(end) = closing.take() {
                        // Our close was sent: a peer that then hangs up is done too.
                        return end;
                    }
                    return End::Broken(describe_ws(&e));
                }
            }
            if remote_closed && grace.is_none() {
                grace = Some(Grace::start());
            }
        }
        // 2. Bytes for the byte side.
        let before = taken;
        while taken < pending.len() {
            match output.write(&pending[taken..]) {
                Ok(0) => return End::Broken("the output takes no more".to_owned()),
                Ok(n) => taken += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return End::Broken(format!("writing: {}", e.kind())),
            }
        }
        if taken > before {
            moved_on(&mut grace);
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
                Ok(()) => {
                    unflushed = false;
                    // The peer's socket took them: it is there.
                    heard = Instant::now();
                    moved_on(&mut grace);
                }
                Err(tungstenite::Error::Io(e)) if e.kind() == io::ErrorKind::WouldBlock => {}
                // A server's socket is done once its close was answered.
                Err(tungstenite::Error::ConnectionClosed | tungstenite::Error::AlreadyClosed) => {
                    unflushed = false;
                    remote_closed = remote_closed || closing.is_none();
                }
                Err(e) => return End::Broken(describe_ws(&e)),
            }
        }
        let now = Instant::now();
        let timed_out = grace.is_some_and(|g| now >= g.until);
        if remote_closed && ((taken == pending.len() && !unflushed) || timed_out) {
            return closing.unwrap_or(End::Remote);
        }
        if timed_out {
            return closing.unwrap_or(End::Local);
        }
        // 4. Keepalive: a ping after silence; a peer that never answers is
        //    gone. Not while the byte side holds the WebSocket back.
        let held_back = taken < pending.len();
        if held_back {
            heard = now;
            pinged = None;
        }
        match pinged {
            Some(at) if now.duration_since(at) >= keepalive => {
                // The ping may wait behind data the peer is still reading.
                // While its kernel takes what was sent, the peer is there;
                // once it took everything (the ping too), its program may
                // still be reading what came before: it gets PONG_LIMIT
                // keepalives in all. A peer that takes nothing is gone.
                let queued = sys::unsent(ws_fd);
                let patient = match queued {
                    Some(0) => now.duration_since(ping_sent) < keepalive * PONG_LIMIT,
                    Some(queued) => queued < unsent_at_ping,
                    None => false,
                };
                if !patient {
                    return End::Broken(format!("no answer to a ping in {keepalive:?}"));
                }
                pinged = Some(now);
                unsent_at_ping = queued.unwrap_or(0);
            }
            None if closing.is_none()
                && !remote_closed
                && now.duration_since(heard) >= keepalive =>
            {
                match ws.write(Message::Ping(Vec::new().into())) {
                    Ok(()) => {}
                    // Queued behind frames the socket has not taken yet.
                    Err(tungstenite::Error::Io(e)) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(e) => return End::Broken(describe_ws(&e)),
                }
                unflushed = true;
                pinged = Some(now);
                ping_sent = now;
                unsent_at_ping = usize::MAX;
                continue;
            }
            _ => {}
        }
        // 5. Wait for any side to be ready.
        let reading_input = !unflushed && closing.is_none() && !remote_closed;
        // A descriptor of no interest now is -1, which poll skips: a hang-up
        // is reported whatever the events asked, and would spin the loop.
        let watch = |fd: RawFd, events: libc::c_short| {
            if events == 0 { (-1, 0) } else { (fd, events) }
        };
        let mut ws_events = 0;
        if taken == pending.len() && !remote_closed {
            ws_events |= libc::POLLIN;
        }
        if unflushed {
            ws_events |= libc::POLLOUT;
        }
        let asked_to_stop = stop.filter(|_| closing.is_none() && !remote_closed);
        let fds = [
            watch(ws_fd, ws_events),
            watch(input_fd, if reading_input { libc::POLLIN } else { 0 }),
            watch(output_fd, if held_back { libc::POLLOUT } else { 0 }),
            asked_to_stop.map_or((-1, 0), |fd| (fd, libc::POLLIN)),
        ];
        let deadline = match (grace, pinged) {
            (Some(g), _) => g.until,
            (None, Some(at)) => at + keepalive,
            (None, None) if held_back => now + keepalive,
            (None, None) => heard + keepalive,
        };
        let ready = match sys::poll(&fds, Some(deadline.saturating_duration_since(now))) {
            Ok(ready) => ready,
            Err(e) => return End::Broken(format!("poll: {e}")),
        };
        if ready[0].readable || ready[0].error {
            drain = true;
        }
        if ready[3].readable {
            closing = Some(End::Stopped);
            grace = Some(close(ws, &mut unflushed));
            continue;
        }
        if reading_input && (ready[1].readable || ready[1].error) {
            match input.read(&mut buf) {
                Ok(0) => {
                    closing = Some(End::Local);
                    grace = Some(close(ws, &mut unflushed));
                }
                Ok(n) => {
                    let message = Message::binary(buf[..n].to_vec());
                    match ws.write(message) {
                        Ok(()) => {}
                        // Queued: flushed when the socket takes it.
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

/// How many keepalives a peer whose kernel took our ping has to answer it.
const PONG_LIMIT: u32 = 4;

/// How long a closing tunnel that keeps moving bytes may take in all.
const CLOSE_LIMIT: Duration = Duration::from_secs(10);

/// How long a closing tunnel waits.
#[derive(Debug, Clone, Copy)]
struct Grace {
    until: Instant,
    /// [`CLOSE_LIMIT`] after the close began.
    limit: Instant,
}

impl Grace {
    fn start() -> Grace {
        let now = Instant::now();
        Grace {
            until: now + CLOSE_GRACE,
            limit: now + CLOSE_LIMIT,
        }
    }
}

/// A closing tunnel that moved bytes waits on (its peer is still there),
/// up to [`CLOSE_LIMIT`] after the close began.
fn moved_on(grace: &mut Option<Grace>) {
    if let Some(grace) = grace {
        grace.until = (Instant::now() + CLOSE_GRACE).min(grace.limit);
    }
}

/// Sends a close frame (what the socket does not take now is flushed by
/// the loop); returns how long to wait for the peer's.
fn close<S: Read + Write>(ws: &mut WebSocket<S>, unflushed: &mut bool) -> Grace {
    match ws.close(None) {
        // Queued, or sent: the loop flushes what is left.
        Ok(()) => {}
        Err(tungstenite::Error::Io(e)) if e.kind() == io::ErrorKind::WouldBlock => {}
        Err(e) => log::debug!("tunnel: closing: {}", describe_ws(&e)),
    }
    *unflushed = true;
    Grace::start()
}

/// A WebSocket error as a short reason.
pub fn describe_ws(error: &tungstenite::Error) -> String {
    match error {
        // rustls says what went wrong inside an InvalidData.
        tungstenite::Error::Io(e) if e.kind() == io::ErrorKind::InvalidData => e.to_string(),
        tungstenite::Error::Io(e) => format!("{}", e.kind()),
        tungstenite::Error::Protocol(
            tungstenite::error::ProtocolError::ResetWithoutClosingHandshake,
        ) => "the peer hung up without closing".to_owned(),
        tungstenite::Error::Capacity(e) => format!("message too large: {e}"),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;
    use std::os::unix::net::UnixStream;
    use tungstenite::protocol::Role;

    /// Shrinks a socket's buffer (`option`: SO_SNDBUF or SO_RCVBUF).
    fn shrink(socket: &UnixStream, option: libc::c_int) {
        let size: libc::c_int = 4096;
        // SAFETY: reads one int from `size`, alive through the call, on a
        // socket the test owns.
        let rc = unsafe {
            libc::setsockopt(
                socket.as_raw_fd(),
                libc::SOL_SOCKET,
                option,
                (&size as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        assert_eq!(rc, 0);
    }

    #[test]
    fn a_ping_queued_behind_a_full_socket_waits_for_a_peer_that_reads_again() {
        const SIZE: usize = 1 << 20;
        let keepalive = Duration::from_secs(1);
        let (near, far) = UnixStream::pair().unwrap();
        let (bytes, mut source) = UnixStream::pair().unwrap();
        shrink(&near, libc::SO_SNDBUF);
        shrink(&far, libc::SO_RCVBUF);
        near.set_nonblocking(true).unwrap();
        bytes.set_nonblocking(true).unwrap();
        // The peer reads nothing for a keepalive and a half (the relay's
        // ping meets a full socket meanwhile), then everything.
        let peer = std::thread::spawn(move || {
            std::thread::sleep(keepalive * 3 / 2);
            far.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            let mut ws = WebSocket::from_raw_socket(far, Role::Client, None);
            let mut got = 0;
            loop {
                match ws.read() {
                    Ok(Message::Binary(data)) => got += data.len(),
                    Ok(Message::Close(_)) => {
                        let _ = ws.flush();
                        return got;
                    }
                    Ok(_) => {
                        let _ = ws.flush();
                    }
                    Err(e) => panic!("the peer's WebSocket broke after {got} bytes: {e}"),
                }
            }
        });
        let source = std::thread::spawn(move || {
            source.write_all(&vec![7u8; SIZE]).unwrap();
            source.shutdown(std::net::Shutdown::Write).unwrap();
            source
        });
        let mut ws =
            WebSocket::from_raw_socket(&near, Role::Server, Some(super::super::ws_config()));
        let (mut input, mut output) = (&bytes, &bytes);
        let end = run(
            Ends {
                ws: &mut ws,
                ws_fd: near.as_raw_fd(),
                input: &mut input,
                input_fd: bytes.as_raw_fd(),
                output: &mut output,
                output_fd: bytes.as_raw_fd(),
                stop: None,
            },
            keepalive,
            &|_, _| {},
        );
        assert_eq!(end, End::Local);
        assert_eq!(peer.join().unwrap(), SIZE);
        drop(source.join().unwrap());
    }
}
