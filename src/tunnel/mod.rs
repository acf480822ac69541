//! WebSocket tunnels to TCP targets (Patchwork's `/huproxy`): [`serve`]
//! answers `GET /_/tunnel/<host>/<port>` with `Upgrade: websocket`. It asks
//! the access file whether the client's table lists the target, dials the
//! target (within [`DIAL_TIMEOUT`]) before accepting the upgrade, so an
//! unreachable target is a plain 502, and then carries bytes both ways on
//! the connection's own thread (`pump.rs`) until either side ends. The
//! client, `patchcord tunnel`, is `client.rs`.

pub mod client;
mod pump;

use std::io;
use std::net::TcpStream;
use std::os::fd::{AsRawFd, RawFd};
use std::time::{Duration, Instant};

use tungstenite::protocol::{Role, WebSocketConfig};

use crate::access::{Access, Denial};
use crate::error::Reject;
use crate::http::{Exchange, Head, Method};
use crate::metrics::Stats;
use crate::route::Routed;

/// How long the target has to accept the connection.
pub const DIAL_TIMEOUT: Duration = Duration::from_secs(10);

/// The largest WebSocket message or frame a tunnel takes: its peers send
/// what one read gave them, far less.
const MAX_MESSAGE: usize = 1 << 20;

/// The WebSocket settings of both ends of a tunnel.
pub fn ws_config() -> WebSocketConfig {
    WebSocketConfig::default()
        // tungstenite keeps (and zeroes) this much per tunnel, idle or not.
        .read_buffer_size(16 * 1024)
        .write_buffer_size(0)
        .max_message_size(Some(MAX_MESSAGE))
        .max_frame_size(Some(MAX_MESSAGE))
}

/// What every tunnel of a relay shares.
#[derive(Clone, Copy)]
pub struct Settings {
    /// Silence after which the client is pinged.
    pub keepalive: Duration,
    /// Readable once the relay stops: each tunnel then closes cleanly.
    pub stop: Option<RawFd>,
}

/// Serves a tunnel request: 401/403 unless the client's table lists the
/// target, 426 unless it asks for a WebSocket, 502 when the target cannot
/// be reached; then 101, and the tunnel, until either side ends.
pub fn serve(
    ex: &mut Exchange,
    routed: &Routed,
    access: &Access,
    stats: &Stats,
    settings: Settings,
) -> Result<(), Reject> {
    if !matches!(ex.request.method, Method::Get) {
        return Err(Reject::method_not_allowed("GET, OPTIONS"));
    }
    let target = crate::route::tunnel_target(&routed.path)
        .ok_or_else(|| Reject::new(404, "not a tunnel path (/_/tunnel/HOST/PORT)"))?;
    let label = match access.tunnel(&routed.credential, &target) {
        Ok(label) => label,
        Err((denial, label)) => {
            match denial {
                Denial::UnknownToken => stats.bad_credential(),
                _ => stats.denied(),
            }
            log::info!(
                "refused a tunnel to {target} ({}): {}",
                label.as_deref().unwrap_or("no valid token"),
                denial.reject().status
            );
            return Err(denial.reject());
        }
    };
    let key = websocket_key(ex)?;
    if ex.has_body() {
        // Its bytes would be taken for the WebSocket's.
        return Err(Reject::bad_request("a WebSocket upgrade has no body"));
    }
    let started = Instant::now();
    let remote =
        crate::remote::dial(&target.host, target.port, DIAL_TIMEOUT).map_err(|reason| {
            stats.tunnel_failed();
            log::info!("tunnel to {target} ({label}): cannot reach it: {reason}");
            Reject::new(502, format!("tunnel target {target} unreachable: {reason}"))
        })?;
    let mut head = Head::new(101);
    head.header("Upgrade", "websocket")
        .header("Connection", "Upgrade")
        .header(
            "Sec-WebSocket-Accept",
            tungstenite::handshake::derive_accept_key(key.as_bytes()),
        );
    // Counted before the client can see its 101.
    stats.tunnel_opened();
    let early = match ex.upgrade(head) {
        Ok(early) => early,
        Err(e) => {
            stats.tunnel_closed();
            log::debug!("tunnel to {target}: the client left before 101: {e}");
            return Ok(());
        }
    };
    log::info!("tunnel to {target} ({label}) open");
    let end = carry(ex, &remote, early, stats, settings);
    stats.tunnel_closed();
    log::info!(
        "tunnel to {target} ({label}) closed after {:.1} s: {}",
        started.elapsed().as_secs_f64(),
        match &end {
            pump::End::Remote => "the client closed it".to_owned(),
            pump::End::Local => "the target closed it".to_owned(),
            pump::End::Stopped => "the relay stopped".to_owned(),
            pump::End::Broken(reason) => reason.clone(),
        }
    );
    Ok(())
}

/// Carries the tunnel: the client's socket (with `early`, the bytes read
/// past the request) as a WebSocket, `remote` as bytes; then lets both
/// connections end gently.
fn carry(
    ex: &mut Exchange,
    remote: &TcpStream,
    early: Vec<u8>,
    stats: &Stats,
    settings: Settings,
) -> pump::End {
    let client = ex.conn.stream();
    for socket in [client, remote] {
        if let Err(e) = socket.set_nonblocking(true) {
            return pump::End::Broken(format!("cannot set up the sockets: {e}"));
        }
    }
    let _ = remote.set_nodelay(true);
    let mut ws =
        tungstenite::WebSocket::from_partially_read(client, early, Role::Server, Some(ws_config()));
    let (mut input, mut output) = (remote, remote);
    let end = pump::run(
        pump::Ends {
            ws: &mut ws,
            ws_fd: client.as_raw_fd(),
            input: &mut input,
            input_fd: remote.as_raw_fd(),
            output: &mut output,
            output_fd: remote.as_raw_fd(),
            stop: settings.stop,
        },
        settings.keepalive,
        &|flow, n| stats.tunnel_carried(flow == pump::Flow::FromWebSocket, n),
    );
    if !matches!(end, pump::End::Broken(_)) {
        // A socket closed with bytes unread is reset, and a reset can
        // destroy what was sent last: end writing, and read what still
        // comes (at most CLOSE_GRACE) before closing.
        let ending: &[&TcpStream] = match end {
            pump::End::Local => &[client],
            _ => &[client, remote],
        };
        let _ = drain(ending);
    }
    let _ = client.set_nonblocking(false);
    end
}

/// Stops writing to each of `sockets` and reads what they still send,
/// until each ended or [`pump::CLOSE_GRACE`] passed.
pub(super) fn drain(sockets: &[&TcpStream]) -> io::Result<()> {
    use std::io::Read as _;
    let deadline = Instant::now() + pump::CLOSE_GRACE;
    let mut open: Vec<&TcpStream> = sockets.to_vec();
    for socket in &open {
        let _ = socket.shutdown(std::net::Shutdown::Write);
    }
    let mut scratch = [0u8; 16 * 1024];
    while !open.is_empty() {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            break;
        }
        let fds: Vec<_> = open.iter().map(|s| (s.as_raw_fd(), libc::POLLIN)).collect();
        crate::sys::poll(&fds, Some(left))?;
        open.retain(|socket| {
            loop {
                match (&mut &**socket).read(&mut scratch) {
                    Ok(0) => break false,
                    Ok(_) => {}
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break true,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(_) => break false,
                }
            }
        });
    }
    Ok(())
}

/// The `Sec-WebSocket-Key` of a WebSocket upgrade; 426 for a request that
/// is not one (RFC 6455 §4.2.1).
fn websocket_key(ex: &Exchange) -> Result<String, Reject> {
    let request = &ex.request;
    let upgrade = request
        .header("upgrade")
        .is_some_and(|v| has_token(v, "websocket"));
    let connection = request
        .header("connection")
        .is_some_and(|v| has_token(v, "upgrade"));
    if !upgrade || !connection {
        return Err(
            Reject::new(426, "a tunnel is a WebSocket: ask with Upgrade: websocket")
                .with_header("Upgrade", "websocket")
                .with_header("Connection", "Upgrade"),
        );
    }
    if request.header("sec-websocket-version").map(str::trim) != Some("13") {
        return Err(Reject::new(426, "this relay speaks WebSocket version 13")
            .with_header("Upgrade", "websocket")
            .with_header("Sec-WebSocket-Version", "13"));
    }
    let key = request
        .header("sec-websocket-key")
        .map(str::trim)
        .filter(|key| {
            use base64::Engine as _;
            base64::engine::general_purpose::STANDARD
                .decode(key)
                .is_ok_and(|raw| raw.len() == 16)
        })
        .ok_or_else(|| Reject::bad_request("Sec-WebSocket-Key must be 16 bytes in base64"))?;
    Ok(key.to_owned())
}

/// Whether the comma-separated header `value` lists `token` (any case).
fn has_token(value: &str, token: &str) -> bool {
    value
        .split(',')
        .any(|item| item.trim().eq_ignore_ascii_case(token))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connection_tokens() {
        assert!(has_token("keep-alive, Upgrade", "upgrade"));
        assert!(has_token("websocket", "websocket"));
        assert!(!has_token("upgrades", "upgrade"));
    }
}
