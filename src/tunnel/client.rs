//! `patchcord tunnel URL`: stdin and stdout carried through a relay's
//! WebSocket tunnel (`/_/tunnel/HOST/PORT`), so that ssh can use it as its
//! ProxyCommand. It connects (TLS for https:// and wss://, with the
//! webpki roots), upgrades with the token as `Patch-Token`, then moves
//! bytes with the relay's own loop (`pump.rs`) until either side ends:
//! exit 0 when the relay closed the tunnel cleanly or stdin ended; 1 with a
//! one-line reason otherwise (the relay's refusal, a broken connection).

use std::io::{self, Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::os::fd::{AsRawFd, RawFd};
use std::time::Duration;

use tungstenite::client::IntoClientRequest;
use tungstenite::handshake::HandshakeError;

use super::pump;
use crate::cli::TunnelArgs;
use crate::error::{ConfigError, Error, Exit};

/// How long connecting and the upgrade may take: the relay dials the
/// target (within ten seconds) before it answers.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(20);

/// Runs `patchcord tunnel` until the tunnel ends.
pub fn run(args: TunnelArgs) -> Result<Exit, Error> {
    let keepalive = crate::config::keepalive(args.keepalive_secs)?;
    let url = Url::parse(&args.url)?;
    let failed = |reason: String| Error::Client {
        command: "tunnel",
        reason,
    };
    let stop = crate::sys::Flag::on_signals().map_err(Error::Signal)?;
    let tcp = connect(&url.host, url.port).map_err(failed)?;
    let stream = if url.tls {
        Stream::tls(tcp, &url.host).map_err(failed)?
    } else {
        Stream::Plain(tcp)
    };
    let mut request = url
        .websocket
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
    ws.get_ref()
        .set_nonblocking()
        .map_err(|e| failed(format!("cannot set up the socket: {e}")))?;
    let end = pump::run(
        pump::Ends {
            ws: &mut ws,
            ws_fd,
            input: &mut Fd(0),
            input_fd: 0,
            output: &mut Fd(1),
            output_fd: 1,
            stop: Some(stop.fd()),
        },
        keepalive,
        &|_, _| {},
    );
    match end {
        pump::End::Remote | pump::End::Local | pump::End::Stopped => Ok(Exit::Clean),
        pump::End::Broken(reason) => Err(failed(reason)),
    }
}

/// stdin or stdout, unbuffered: Rust's buffers would hide bytes from
/// poll, and hold an ssh session's output back.
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

impl Write for Fd {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        // SAFETY: `data` is valid for `data.len()` bytes of reads; the
        // descriptor is the process's own stdout, open throughout.
        let n = unsafe { libc::write(self.0, data.as_ptr().cast(), data.len()) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(n as usize)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// A tunnel URL, taken apart.
#[derive(Debug, PartialEq, Eq)]
struct Url {
    /// The URL with a ws:// or wss:// scheme.
    websocket: String,
    host: String,
    port: u16,
    tls: bool,
}

impl Url {
    /// http(s):// or ws(s)://HOST[:PORT]/PATH; a usage error otherwise.
    fn parse(text: &str) -> Result<Url, ConfigError> {
        let bad = |why: &str| ConfigError::new(format!("tunnel URL {text:?}: {why}"));
        let (scheme, rest) = text
            .split_once("://")
            .ok_or_else(|| bad("must start with http://, https://, ws:// or wss://"))?;
        let (tls, websocket_scheme, default_port) = match scheme.to_ascii_lowercase().as_str() {
            "http" | "ws" => (false, "ws", 80),
            "https" | "wss" => (true, "wss", 443),
            _ => return Err(bad("must start with http://, https://, ws:// or wss://")),
        };
        if tls && !cfg!(feature = "tls") {
            return Err(bad(
                "https needs TLS, and this patchcord was built without it (cargo feature tls)",
            ));
        }
        let (authority, path) = match rest.find('/') {
            Some(at) => (&rest[..at], &rest[at..]),
            None => (rest, "/"),
        };
        if authority.contains('@') {
            return Err(bad("give the token with --token, not in the URL"));
        }
        let (host, port) = match authority.rsplit_once(':') {
            Some((host, port)) if !port.contains(']') => (
                host,
                port.parse::<u16>()
                    .map_err(|_| bad("the port is not a number"))?,
            ),
            _ => (authority, default_port),
        };
        let host = host.trim_start_matches('[').trim_end_matches(']');
        if host.is_empty() {
            return Err(bad("has no host"));
        }
        Ok(Url {
            websocket: format!("{websocket_scheme}://{authority}{path}"),
            host: host.to_owned(),
            port,
            tls,
        })
    }
}

/// Connects to the relay, trying each of its addresses.
fn connect(host: &str, port: u16) -> Result<TcpStream, String> {
    let addresses = (host, port)
        .to_socket_addrs()
        .map_err(|e| format!("cannot find {host}: {e}"))?;
    let mut last = format!("{host} has no address");
    for address in addresses {
        match TcpStream::connect_timeout(&address, HANDSHAKE_TIMEOUT) {
            Ok(stream) => {
                let _ = stream.set_nodelay(true);
                let _ = stream.set_read_timeout(Some(HANDSHAKE_TIMEOUT));
                let _ = stream.set_write_timeout(Some(HANDSHAKE_TIMEOUT));
                let _ = crate::sys::keepalive(stream.as_raw_fd(), Some((30, 10, 3)));
                return Ok(stream);
            }
            Err(e) => last = format!("cannot connect to {host}:{port}: {e}"),
        }
    }
    Err(last)
}

/// The connection to the relay, with TLS or without.
enum Stream {
    Plain(TcpStream),
    #[cfg(feature = "tls")]
    Tls(Box<rustls::StreamOwned<rustls::ClientConnection, TcpStream>>),
}

impl Stream {
    /// A TLS connection over `tcp` to `host`, checked against the webpki roots.
    #[cfg(feature = "tls")]
    fn tls(tcp: TcpStream, host: &str) -> Result<Stream, String> {
        use std::sync::Arc;
        let roots = rustls::RootCertStore {
            roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
        };
        // The crypto provider is ring, the one built in.
        let config = rustls::ClientConfig::builder()
            .with_root_certificates(roots)
            .with_no_client_auth();
        let name = rustls::pki_types::ServerName::try_from(host.to_owned())
            .map_err(|_| format!("{host:?} is not a name TLS can check"))?;
        let connection = rustls::ClientConnection::new(Arc::new(config), name)
            .map_err(|e| format!("TLS: {e}"))?;
        Ok(Stream::Tls(Box::new(rustls::StreamOwned::new(
            connection, tcp,
        ))))
    }

    #[cfg(not(feature = "tls"))]
    fn tls(_: TcpStream, _: &str) -> Result<Stream, String> {
        Err("this patchcord was built without TLS".to_owned())
    }

    fn tcp(&self) -> &TcpStream {
        match self {
            Stream::Plain(tcp) => tcp,
            #[cfg(feature = "tls")]
            Stream::Tls(tls) => tls.get_ref(),
        }
    }

    fn fd(&self) -> RawFd {
        self.tcp().as_raw_fd()
    }

    /// From the upgrade on, the loop never blocks on the relay.
    fn set_nonblocking(&self) -> io::Result<()> {
        let tcp = self.tcp();
        tcp.set_read_timeout(None)?;
        tcp.set_write_timeout(None)?;
        tcp.set_nonblocking(true)
    }
}

impl Read for Stream {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Plain(tcp) => tcp.read(out),
            #[cfg(feature = "tls")]
            Stream::Tls(tls) => tls.read(out),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Plain(tcp) => tcp.write(data),
            #[cfg(feature = "tls")]
            Stream::Tls(tls) => tls.write(data),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            Stream::Plain(tcp) => tcp.flush(),
            #[cfg(feature = "tls")]
            Stream::Tls(tls) => tls.flush(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        let url = Url::parse("https://relay.example/_/tunnel/pi.lan/22").unwrap();
        assert_eq!(
            url,
            Url {
                websocket: "wss://relay.example/_/tunnel/pi.lan/22".to_owned(),
                host: "relay.example".to_owned(),
                port: 443,
                tls: true,
            }
        );
        let url = Url::parse("http://127.0.0.1:3000/huproxy/a/h/22").unwrap();
        assert_eq!((url.port, url.tls), (3000, false));
        assert_eq!(url.websocket, "ws://127.0.0.1:3000/huproxy/a/h/22");
        let url = Url::parse("ws://[::1]:8/_/tunnel/x/1").unwrap();
        assert_eq!((url.host.as_str(), url.port), ("::1", 8));
        for bad in [
            "relay/_/tunnel/x/1",
            "ftp://x/",
            "http://u:p@x/",
            "http://x:port/",
            "http:///x",
        ] {
            assert!(Url::parse(bad).is_err(), "{bad}");
        }
    }
}
