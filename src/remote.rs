//! Connections the relay and `patchcord tunnel` open to other servers:
//! [`Url`] (http, https, ws, wss), [`connect`] (each address in turn,
//! within a deadline; TLS with rustls and the webpki roots for https and
//! wss), and [`post`], the one request a notification backend gets
//! (`Connection: close`, so its answer's status is all there is to read).
//! The relay's own client-side subcommands use `client.rs`, which keeps
//! connections to one relay alive; nothing here is kept.

use std::io::{self, Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::os::fd::{AsRawFd, RawFd};
use std::path::Path;
use std::time::{Duration, Instant};

/// A URL of a server patchcord connects to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Url {
    /// https or wss.
    pub tls: bool,
    /// As written (`host:port`, `[::1]:8`), for `Host`.
    pub authority: String,
    /// Without brackets, for resolving and for TLS.
    pub host: String,
    pub port: u16,
    /// The path and query, `/` at least.
    pub path: String,
}

impl Url {
    /// Parses `text`, whose scheme must be one of `schemes` (lowercase
    /// http, https, ws, wss); the error says what is wrong, naming no part
    /// of the URL.
    pub fn parse(text: &str, schemes: &[&str]) -> Result<Url, String> {
        let (scheme, rest) = text
            .split_once("://")
            .ok_or_else(|| format!("must start with {}://", schemes.join("://, ")))?;
        let scheme = scheme.to_ascii_lowercase();
        if !schemes.contains(&scheme.as_str()) {
            return Err(format!("must start with {}://", schemes.join("://, ")));
        }
        let tls = matches!(scheme.as_str(), "https" | "wss");
        if tls && !cfg!(feature = "tls") {
            return Err(format!(
                "is {scheme}, and this patchcord was built without TLS (cargo feature tls)"
            ));
        }
        let (authority, path) = match rest.find(['/', '?']) {
            Some(at) if rest[at..].starts_with('?') => (&rest[..at], format!("/{}", &rest[at..])),
            Some(at) => (&rest[..at], rest[at..].to_owned()),
            None => (rest, "/".to_owned()),
        };
        if authority.contains('@') {
            return Err("must not hold credentials".to_owned());
        }
        if path
            .bytes()
            .any(|b| b.is_ascii_control() || b == b' ' || b == b'#')
        {
            return Err("has a space, a control character or a fragment in its path".to_owned());
        }
        let default_port = if tls { 443 } else { 80 };
        let (host, port) = match authority.rsplit_once(':') {
            Some((host, port)) if !port.contains(']') => (
                host,
                port.parse::<u16>()
                    .map_err(|_| "has a port that is not a number".to_owned())?,
            ),
            _ => (authority, default_port),
        };
        let bracketed = host.strip_prefix('[').and_then(|h| h.strip_suffix(']'));
        if bracketed.is_none() && host.contains(':') {
            return Err("has an IPv6 address without its brackets".to_owned());
        }
        let host = bracketed.unwrap_or(host);
        let fits = !host.is_empty()
            && host
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-._:".contains(&b));
        if !fits {
            return Err("has no host, or a host with characters no host has".to_owned());
        }
        Ok(Url {
            tls,
            authority: authority.to_owned(),
            host: host.to_owned(),
            port,
            path,
        })
    }
}

/// A connection to another server, with TLS or without.
pub enum Stream {
    Plain(Timed),
    #[cfg(feature = "tls")]
    Tls(Box<rustls::StreamOwned<rustls::ClientConnection, Timed>>),
}

/// A TCP connection whose every read and write ends by a deadline (the
/// socket's timeouts set to what is left before each): a server that
/// drips its handshake or its answer cannot hold one past it, however
/// many reads TLS makes of it.
pub struct Timed {
    tcp: TcpStream,
    deadline: Option<Instant>,
}

impl Timed {
    /// Sets the socket's timeout for the next operation to what is left.
    fn arm(&self, read: bool) -> io::Result<()> {
        let Some(deadline) = self.deadline else {
            return Ok(());
        };
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(io::ErrorKind::TimedOut.into());
        }
        if read {
            self.tcp.set_read_timeout(Some(left))
        } else {
            self.tcp.set_write_timeout(Some(left))
        }
    }
}

impl Read for Timed {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        self.arm(true)?;
        self.tcp.read(out)
    }
}

impl Write for Timed {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        self.arm(false)?;
        self.tcp.write(data)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.tcp.flush()
    }
}

/// Connects to `url`'s host, trying each of its addresses; with TLS for
/// https and wss (the handshake happens on the first write or read),
/// trusting `trust`. Every
/// step until [`Stream::untimed`] ends within `within` of now, but for the
/// name's lookup, which the system resolver bounds.
pub fn connect(url: &Url, within: Duration, trust: &Trust) -> Result<Stream, String> {
    let deadline = Instant::now() + within;
    let tcp = dial(&url.host, url.port, within)?;
    let _ = tcp.set_nodelay(true);
    let timed = Timed {
        tcp,
        deadline: Some(deadline),
    };
    if url.tls {
        Stream::tls(timed, &url.host, trust)
    } else {
        Ok(Stream::Plain(timed))
    }
}

/// A TCP connection to `host` and `port`, each of its addresses tried in
/// turn, all within `within` (but for the name's lookup, which the system
/// resolver bounds). The error is a short reason naming nothing else.
pub fn dial(host: &str, port: u16, within: Duration) -> Result<TcpStream, String> {
    let deadline = Instant::now() + within;
    let addresses = (host, port)
        .to_socket_addrs()
        .map_err(|_| "host not found".to_owned())?;
    let mut last = "host not found".to_owned();
    for address in addresses {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            last = format!("no answer within {within:?}");
            break;
        }
        match TcpStream::connect_timeout(&address, left) {
            Ok(tcp) => return Ok(tcp),
            Err(e) if e.kind() == io::ErrorKind::TimedOut => {
                last = format!("no answer within {within:?}");
            }
            Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
                last = "connection refused".to_owned();
            }
            Err(e) => last = e.kind().to_string(),
        }
    }
    Err(last)
}

impl Stream {
    /// A TLS connection over `tcp` to `host`, checked against `trust`.
    #[cfg(feature = "tls")]
    fn tls(tcp: Timed, host: &str, trust: &Trust) -> Result<Stream, String> {
        let config = trust.config();
        let name = rustls::pki_types::ServerName::try_from(host.to_owned())
            .map_err(|_| "a host TLS cannot check".to_owned())?;
        let connection =
            rustls::ClientConnection::new(config, name).map_err(|e| format!("TLS: {e}"))?;
        Ok(Stream::Tls(Box::new(rustls::StreamOwned::new(
            connection, tcp,
        ))))
    }

    #[cfg(not(feature = "tls"))]
    fn tls(_: Timed, _: &str, _: &Trust) -> Result<Stream, String> {
        Err("this patchcord was built without TLS".to_owned())
    }

    fn timed(&self) -> &Timed {
        match self {
            Stream::Plain(timed) => timed,
            #[cfg(feature = "tls")]
            Stream::Tls(tls) => tls.get_ref(),
        }
    }

    /// The TCP connection under it.
    pub fn tcp(&self) -> &TcpStream {
        &self.timed().tcp
    }

    /// The socket's descriptor, for poll(2).
    pub fn fd(&self) -> RawFd {
        self.tcp().as_raw_fd()
    }

    /// From now on no deadline: reads and writes wait (or, non-blocking,
    /// do not) as the socket says.
    pub fn untimed(&mut self) -> io::Result<()> {
        match self {
            Stream::Plain(timed) => timed.deadline = None,
            #[cfg(feature = "tls")]
            Stream::Tls(tls) => tls.get_mut().deadline = None,
        }
        let tcp = self.tcp();
        tcp.set_read_timeout(None)?;
        tcp.set_write_timeout(None)
    }
}

/// The certificates a TLS connection trusts: the webpki roots (Mozilla's,
/// built in), or only those of a PEM file (as curl's `--cacert`), read
/// once. TLS is rustls with ring, its one crypto provider here.
#[derive(Clone, Default)]
pub struct Trust {
    #[cfg(feature = "tls")]
    own: Option<std::sync::Arc<rustls::ClientConfig>>,
}

impl Trust {
    /// The built-in roots.
    pub fn builtin() -> Trust {
        Trust::default()
    }

    /// Only the certificates of the PEM file `file`.
    #[cfg(feature = "tls")]
    pub fn from_file(file: &Path) -> Result<Trust, String> {
        use rustls::pki_types::CertificateDer;
        use rustls::pki_types::pem::PemObject as _;
        let shown = file.display();
        let certificates = CertificateDer::pem_file_iter(file)
            .map_err(|e| format!("cannot read {shown}: {e}"))?
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| format!("{shown}: {e}"))?;
        let mut roots = rustls::RootCertStore::empty();
        let (added, _) = roots.add_parsable_certificates(certificates);
        if added == 0 {
            return Err(format!("{shown} holds no certificate to trust"));
        }
        Ok(Trust {
            own: Some(client_config(roots)),
        })
    }

    #[cfg(not(feature = "tls"))]
    pub fn from_file(_: &Path) -> Result<Trust, String> {
        Err("this patchcord was built without TLS (cargo feature tls)".to_owned())
    }

    #[cfg(feature = "tls")]
    fn config(&self) -> std::sync::Arc<rustls::ClientConfig> {
        use std::sync::{Arc, OnceLock};
        static WEBPKI: OnceLock<Arc<rustls::ClientConfig>> = OnceLock::new();
        let builtin = || {
            WEBPKI.get_or_init(|| {
                client_config(rustls::RootCertStore {
                    roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
                })
            })
        };
        Arc::clone(self.own.as_ref().unwrap_or_else(builtin))
    }
}

/// A client configuration trusting `roots`.
#[cfg(feature = "tls")]
fn client_config(roots: rustls::RootCertStore) -> std::sync::Arc<rustls::ClientConfig> {
    std::sync::Arc::new(
        rustls::ClientConfig::builder()
            .with_root_certificates(roots)
            .with_no_client_auth(),
    )
}

impl Read for Stream {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Plain(timed) => timed.read(out),
            #[cfg(feature = "tls")]
            Stream::Tls(tls) => tls.read(out),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Plain(timed) => timed.write(data),
            #[cfg(feature = "tls")]
            Stream::Tls(tls) => tls.write(data),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            Stream::Plain(timed) => timed.flush(),
            #[cfg(feature = "tls")]
            Stream::Tls(tls) => tls.flush(),
        }
    }
}

/// Sends one request (`method`, `url`, `headers`, `body`) on a new
/// connection and returns its answer's status; everything within `within`.
/// The error is a short reason that names no part of the URL.
pub fn request(
    method: &str,
    url: &Url,
    trust: &Trust,
    headers: &[(String, String)],
    body: &[u8],
    within: Duration,
) -> Result<u16, String> {
    let mut stream = connect(url, within, trust)?;
    let mut head = format!(
        "{method} {} HTTP/1.1\r\nHost: {}\r\nUser-Agent: patchcord/{}\r\nContent-Length: {}\r\nConnection: close\r\n",
        url.path,
        url.authority,
        env!("CARGO_PKG_VERSION"),
        body.len()
    );
    for (name, value) in headers {
        head.push_str(name);
        head.push_str(": ");
        head.push_str(value);
        head.push_str("\r\n");
    }
    head.push_str("\r\n");
    let timed_out = |e: io::Error| match e.kind() {
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => {
            format!("no answer within {within:?}")
        }
        io::ErrorKind::InvalidData => format!("TLS or HTTP: {e}"),
        kind => kind.to_string(),
    };
    stream
        .write_all(head.as_bytes())
        .and_then(|()| stream.write_all(body))
        .and_then(|()| stream.flush())
        .map_err(timed_out)?;
    crate::client::read_status(&mut stream).map_err(timed_out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALL: [&str; 4] = ["http", "https", "ws", "wss"];

    #[test]
    fn urls() {
        let url = Url::parse("https://relay.example/_/tunnel/pi.lan/22", &ALL).unwrap();
        assert_eq!(
            url,
            Url {
                tls: true,
                authority: "relay.example".to_owned(),
                host: "relay.example".to_owned(),
                port: 443,
                path: "/_/tunnel/pi.lan/22".to_owned(),
            }
        );
        let url = Url::parse("HTTP://127.0.0.1:3000?x=1", &ALL).unwrap();
        assert_eq!(
            (url.port, url.tls, url.path.as_str()),
            (3000, false, "/?x=1")
        );
        let url = Url::parse("ws://[::1]:8/_/tunnel/x/1", &ALL).unwrap();
        assert_eq!(
            (url.host.as_str(), url.port, url.authority.as_str()),
            ("::1", 8, "[::1]:8")
        );
        for bad in [
            "relay/_/tunnel/x/1",
            "ftp://x/",
            "http://u:p@x/",
            "http://x:port/",
            "http:///x",
            "http://x/a b",
            "http://x/a#frag",
            "http://x\r\n/",
            "http://::1/",
        ] {
            assert!(Url::parse(bad, &ALL).is_err(), "{bad}");
        }
        assert!(Url::parse("ws://x/", &["http", "https"]).is_err());
    }
}
