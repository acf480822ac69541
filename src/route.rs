//! The URL grammar of DESIGN.md §2: a request head → [`Routed`], what every
//! later step needs: the normalized path (the one string used for routing,
//! access control, metrics and logs), the endpoint or the channel (mode,
//! namespace, name, pairing key), the action decided per mode, the query,
//! and the credential the client presented. Pure: no sockets, no state,
//! table-tested below.

use std::borrow::Cow;
use std::fmt;
use std::time::Duration;

use crate::error::Reject;
use crate::http::{Method, Request};

/// A request, routed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Routed {
    pub method: Method,
    /// The percent-decoded path without its query (`*` for `OPTIONS *`).
    pub path: String,
    pub route: Route,
    pub query: Query,
    /// The relay's own credentials, if the client gave any; never logged,
    /// never forwarded to another client.
    pub credential: Credential,
}

/// Where a request goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    /// A server endpoint: a reserved path, never a channel.
    Endpoint(Endpoint),
    /// A channel, and what the request does on it.
    Channel { channel: Channel, action: Action },
    /// A hook channel (`/h/<name>`, `/r/<name>`): a pubsub channel whose
    /// secret guards sending (`/h`) or reading (`/r`).
    Hook {
        hook: Hook,
        channel: Channel,
        action: Action,
    },
    /// `OPTIONS *`, or `OPTIONS` anywhere but on a requester: a CORS preflight.
    Preflight,
}

/// The server's own paths (DESIGN.md §2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    /// `GET /status`: the counters as JSON.
    Status,
    /// `/_/reply/<secret>`: a one-shot path for a responder's answer.
    Reply,
    /// `GET /h` or `GET /r`: mints a hook channel and its secret.
    Mint(Hook),
    /// `GET /`: the live page.
    Page,
    /// `/favicon.ico`: a tiny icon, so browsers never park a consumer there.
    Favicon,
    /// `/robots.txt`: crawlers stay out.
    Robots,
    /// `GET /healthz`: 200 `ok`.
    Health,
    /// `GET /metrics`: Prometheus text exposition.
    Metrics,
    /// `GET /_/channels`: the active channels as JSON.
    Channels,
    /// `/_/notify`, `/<ns>/_/notify` (and `ntfy` for `notify`): a
    /// notification forwarded to the backends of the access file.
    Notify,
    /// `/_/tunnel/<host>/<port>`, `/huproxy/<ns>/<host>/<port>`: a
    /// WebSocket carried to a TCP target.
    Tunnel,
    /// A path reserved for an endpoint this version does not serve.
    Reserved,
}

/// Paths that are never channels, and the endpoint each one is.
const RESERVED: [(&str, Endpoint); 9] = [
    ("/", Endpoint::Page),
    ("/favicon.ico", Endpoint::Favicon),
    ("/robots.txt", Endpoint::Robots),
    ("/healthz", Endpoint::Health),
    ("/status", Endpoint::Status),
    ("/metrics", Endpoint::Metrics),
    ("/_/channels", Endpoint::Channels),
    ("/h", Endpoint::Mint(Hook::Send)),
    ("/r", Endpoint::Mint(Hook::Read)),
];

/// The two kinds of hook channel; each takes its secret for one side.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hook {
    /// `/h/<name>`: anyone reads; sending (and deleting) takes the secret.
    Send,
    /// `/r/<name>`: anyone sends; reading (and deleting) takes the secret.
    Read,
}

impl Hook {
    /// The path segment, and the prefix of the text its secret signs.
    pub fn as_str(self) -> &'static str {
        match self {
            Hook::Send => "h",
            Hook::Read => "r",
        }
    }

    /// Whether `action` on this kind of hook takes the secret.
    pub fn guards(self, action: Action) -> bool {
        match action {
            Action::Delete => true,
            Action::Send => self == Hook::Send,
            Action::Receive => self == Hook::Read,
            _ => false,
        }
    }
}

/// Where one-shot reply paths live: `/_/reply/<secret>`.
pub const REPLY_PREFIX: &str = "/_/reply/";

/// The family of a channel, set by the first mode segment of its path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Queue,
    Pubsub,
    Requester,
    Responder,
}

impl Mode {
    /// Every mode, in the order counters list them.
    pub const ALL: [Mode; 4] = [Mode::Queue, Mode::Pubsub, Mode::Requester, Mode::Responder];

    /// The mode's name, as in paths, logs and counters.
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Queue => "queue",
            Mode::Pubsub => "pubsub",
            Mode::Requester => "req",
            Mode::Responder => "res",
        }
    }

    /// The mode's place in [`Mode::ALL`].
    pub fn index(self) -> usize {
        self as usize
    }
}

/// A channel named by a path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Channel {
    pub mode: Mode,
    /// The normalized path without its query: the channel's identity.
    pub key: String,
    /// Where the namespace ends and the name starts in `key`.
    split: (usize, usize),
}

impl Channel {
    /// The channel a normalized path names (the mode its path sets, without
    /// the query's `?pubsub=`).
    pub fn parse(key: String) -> Channel {
        channel(key)
    }

    /// The pubsub channel behind a hook path (`/h/<name>`): no namespace,
    /// and the name is what follows `/h/`.
    fn hook(key: String) -> Channel {
        Channel {
            mode: Mode::Pubsub,
            key,
            split: (0, 3),
        }
    }

    /// The segments before the mode segment, as a path (`""` or `/u/alice`).
    pub fn namespace(&self) -> &str {
        &self.key[..self.split.0]
    }

    /// The segments after the mode segment (the whole path, without its
    /// leading `/`, for a plain queue).
    pub fn name(&self) -> &str {
        &self.key[self.split.1..]
    }

    /// The key two waiters must share to be paired: the channel key for
    /// queue and pubsub; for req and res, the responder's path, of the
    /// namespace and the first segment of the name, so that
    /// `/req/site/a.css` meets `/res/site` (and `DELETE /res/site` names it).
    pub fn pair_key(&self) -> Cow<'_, str> {
        match self.mode {
            Mode::Queue | Mode::Pubsub => Cow::Borrowed(&self.key),
            Mode::Requester | Mode::Responder => {
                let id = self.name().split('/').next().unwrap_or("");
                Cow::Owned(format!("{}/res/{id}", self.namespace()))
            }
        }
    }
}

/// What a request does on a channel, decided by its method and its mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Queue and pubsub: POST, PUT, or GET with `?body=`: send a message.
    Send,
    /// Queue and pubsub: GET: receive a message.
    Receive,
    /// DELETE: end the waiters of the channel and of every channel under it.
    Delete,
    /// A requester (`req`): any method; it waits for a responder's answer.
    Request,
    /// A responder (`res`): takes a request to answer.
    Respond,
    /// A method the mode does not accept; the value lists the allowed ones.
    NotAllowed(&'static str),
}

/// The methods a queue or pubsub channel accepts, for `Allow`.
pub const CHANNEL_METHODS: &str = "GET, POST, PUT, DELETE, OPTIONS";

/// The query parameters every mode understands, decoded and checked.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Query {
    /// `timeout=SECS`: this request's longest wait.
    pub timeout: Option<Duration>,
    /// `body=TEXT` on a GET: the message to send.
    pub body: Option<Vec<u8>>,
    /// `mime=TYPE`: the Content-Type to give the message or the response.
    pub mime: Option<String>,
    /// Every other parameter, decoded, in order, for the modes' own
    /// (`token` and `secret` are never here: they are the [`Credential`]).
    pub params: Vec<(String, String)>,
}

impl Query {
    /// The first value of parameter `name`.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.params
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

/// The relay's own credentials in a request (DESIGN.md §2).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Credential {
    /// The access token, and which part of the request carried it.
    pub token: Option<(Secret, TokenSource)>,
    /// `?secret=`: a hook's capability.
    pub secret: Option<Secret>,
    /// A valid `Patch-Relay` proof came with a receive on a queue channel:
    /// another relay takes a switched answer for its requester (set by
    /// `app.rs`, which holds the key).
    pub relay: bool,
}

/// Where a request's access token came from; that header or parameter
/// never travels to another client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenSource {
    /// The `Patch-Token` header (first choice).
    PatchToken,
    /// The `?token=` parameter (second).
    Query,
    /// `Authorization: Bearer` (last: when neither of the others is given,
    /// so that a client can pass its own `Authorization` on).
    Bearer,
}

/// A credential's text: compared, never printed (`Debug` shows nothing of it).
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// The text, for comparing against what the server knows.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// A secret of `text`, for tests of what checks one.
    #[cfg(test)]
    pub fn fake(text: &str) -> Secret {
        Secret(text.to_owned())
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(..)")
    }
}

/// Routes a request by its head.
pub fn route(request: &Request) -> Result<Routed, Reject> {
    let method = request.method.clone();
    let target = request.target.as_str();
    if target == "*" {
        return Ok(Routed {
            method,
            path: "*".to_owned(),
            route: Route::Preflight,
            query: Query::default(),
            credential: Credential::default(),
        });
    }
    let (raw_path, raw_query) = target.split_once('?').unwrap_or((target, ""));
    let mut path = normalize(raw_path)?;
    let (query, token, secret) = parse_query(raw_query)?;
    let credential = credential(request, token, secret);
    let route = if let Some((_, endpoint)) = RESERVED.iter().find(|(p, _)| *p == path) {
        Route::Endpoint(*endpoint)
    } else if path
        .strip_prefix(REPLY_PREFIX)
        .is_some_and(|secret| !secret.is_empty() && !secret.contains('/'))
    {
        Route::Endpoint(Endpoint::Reply)
    } else if let Some(canonical) = notify_path(&path) {
        path = canonical;
        Route::Endpoint(Endpoint::Notify)
    } else if tunnel_target(&path).is_some() {
        Route::Endpoint(Endpoint::Tunnel)
    } else if path == "/_"
        || path.starts_with("/_/")
        || path == "/h/"
        || path == "/r/"
        || path == HUPROXY
        || path.starts_with("/huproxy/")
    {
        // `/h/` and `/r/` hold every hook channel: never a channel of their own
        // (a DELETE there would end them all).
        Route::Endpoint(Endpoint::Reserved)
    } else if let Some(hook) = hook_of(&path) {
        let channel = Channel::hook(path.clone());
        match action(&method, channel.mode, &query, request) {
            Some(action) => Route::Hook {
                hook,
                channel,
                action,
            },
            None => Route::Preflight,
        }
    } else {
        let mut channel = channel(path.clone());
        if channel.mode == Mode::Queue {
            if let Some(flag) = query.get("pubsub") {
                if parse_flag(flag).ok_or_else(|| {
                    Reject::bad_request("pubsub= takes true, false, 1, 0, yes or no")
                })? {
                    channel.mode = Mode::Pubsub;
                }
            }
        }
        match action(&method, channel.mode, &query, request) {
            Some(action) => Route::Channel { channel, action },
            None => Route::Preflight,
        }
    };
    let route = match route {
        Route::Endpoint(_) if method == Method::Options => Route::Preflight,
        route => route,
    };
    Ok(Routed {
        method,
        path,
        route,
        query,
        credential,
    })
}

/// Patchwork's tunnel path (`/huproxy/<ns>/<host>/<port>`).
const HUPROXY: &str = "/huproxy";

/// The notification path `path` is, written the one way access rules and
/// logs see it (`/<ns>/_/notify`): `/_/notify`, `/_/ntfy` (Patchwork's
/// name), or either under a namespace.
fn notify_path(path: &str) -> Option<String> {
    let namespace = path
        .strip_suffix("/_/notify")
        .or_else(|| path.strip_suffix("/_/ntfy"))?;
    // A namespace is a path of its own, and never under the server's `/_/`.
    let is_namespace = namespace.is_empty()
        || (namespace.starts_with('/')
            && !namespace.starts_with("/_/")
            && namespace != "/_"
            && !namespace.split('/').skip(1).any(str::is_empty));
    is_namespace.then(|| format!("{namespace}/_/notify"))
}

/// The namespace of a notification path (`""` or `/u/alice`).
pub fn notify_namespace(path: &str) -> &str {
    path.strip_suffix("/_/notify").unwrap_or("")
}

/// The target a tunnel path names: `/_/tunnel/<host>/<port>`, or
/// `/huproxy/<ns>/<host>/<port>` (Patchwork's path, whose namespace is a
/// label only). The host is a name, an IPv4 address or an IPv6 address
/// (in brackets or not); the port 1 to 65535.
pub fn tunnel_target(path: &str) -> Option<Target> {
    let rest = path.strip_prefix("/_/tunnel/").or_else(|| {
        let rest = path.strip_prefix("/huproxy/")?;
        let (namespace, rest) = rest.split_once('/')?;
        (!namespace.is_empty()).then_some(rest)
    })?;
    let (host, port) = rest.split_once('/')?;
    Target::new(host, port)
}

/// Where a tunnel goes: a host and a port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// Lowercase; an IPv6 address without its brackets.
    pub host: String,
    pub port: u16,
}

impl Target {
    /// The target of `host` and `port` as a path writes them.
    fn new(host: &str, port: &str) -> Option<Target> {
        let port: u16 = port
            .parse()
            .ok()
            .filter(|&p| p > 0 && port.bytes().all(|b| b.is_ascii_digit()))?;
        let bare = host
            .strip_prefix('[')
            .and_then(|h| h.strip_suffix(']'))
            .unwrap_or(host);
        if let Ok(ipv6) = bare.parse::<std::net::Ipv6Addr>() {
            // One spelling for each address: `[0:0::1]` is `[::1]`.
            return Some(Target {
                host: ipv6.to_string(),
                port,
            });
        }
        let is_name = !bare.is_empty()
            && bare.len() <= 253
            && bare
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.' || b == b'_');
        // A name whose last label starts with a digit is an address in
        // disguise to the resolver (`2130706433`, `0x7f.1`, `010.0.0.1`):
        // only an IPv4 address as written is one.
        let last = bare.trim_end_matches('.').rsplit('.').next().unwrap_or("");
        let numeric = last.bytes().next().is_some_and(|b| b.is_ascii_digit());
        if numeric && bare.parse::<std::net::Ipv4Addr>().is_err() {
            return None;
        }
        (is_name && bare == host).then(|| Target {
            host: bare.to_ascii_lowercase(),
            port,
        })
    }

    /// Whether the host is an IPv6 address.
    pub fn is_ipv6(&self) -> bool {
        self.host.contains(':')
    }
}

impl fmt::Display for Target {
    /// `host:port`, an IPv6 address in brackets: what `tunnel` globs match.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_ipv6() {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

/// The kind of hook `path` is a channel of: `/h/<name>` or `/r/<name>`.
/// The name is all that follows; only names the relay minted have a
/// secret anyone knows.
fn hook_of(path: &str) -> Option<Hook> {
    [Hook::Send, Hook::Read].into_iter().find(|hook| {
        path.strip_prefix('/')
            .and_then(|p| p.strip_prefix(hook.as_str()))
            .and_then(|p| p.strip_prefix('/'))
            .is_some_and(|name| !name.is_empty())
    })
}

/// What `method` does on a channel of `mode`; None for a CORS preflight.
fn action(method: &Method, mode: Mode, query: &Query, request: &Request) -> Option<Action> {
    let preflight = *method == Method::Options
        && (mode != Mode::Requester || request.header("access-control-request-method").is_some());
    if preflight {
        return None;
    }
    Some(match (mode, method) {
        (Mode::Requester, _) => Action::Request,
        (_, Method::Delete) => Action::Delete,
        (Mode::Responder, _) => Action::Respond,
        // `?body=` makes a GET a send (patchbay's `?method=post&body=` too).
        (_, Method::Get) if query.body.is_some() => Action::Send,
        (_, Method::Get) => Action::Receive,
        (_, Method::Post | Method::Put) => Action::Send,
        _ => Action::NotAllowed(CHANNEL_METHODS),
    })
}

/// The request's credentials: `Patch-Token`, else `?token=`, else
/// `Authorization: Bearer`; and `?secret=`.
fn credential(request: &Request, token: Option<String>, secret: Option<String>) -> Credential {
    let header_token = request
        .header("patch-token")
        .map(|t| (t.to_owned(), TokenSource::PatchToken));
    let query_token = token.map(|t| (t, TokenSource::Query));
    let bearer = || {
        request
            .bearer()
            .map(|token| (token.to_owned(), TokenSource::Bearer))
    };
    let token = header_token
        .or(query_token)
        .or_else(bearer)
        .map(|(text, source)| (Secret(text), source));
    Credential {
        token,
        secret: secret.map(Secret),
        relay: false,
    }
}

/// `target` (origin form) without its `token` and `secret` parameters, as
/// it was written otherwise: what may travel to another client.
pub fn without_credentials(target: &str) -> String {
    let Some((path, query)) = target.split_once('?') else {
        return target.to_owned();
    };
    let kept: Vec<&str> = query
        .split('&')
        .filter(|pair| {
            let name = pair.split_once('=').map_or(*pair, |(name, _)| name);
            let name = percent_decode(name, true).unwrap_or_default();
            name != b"token" && name != b"secret"
        })
        .collect();
    if kept.is_empty() {
        path.to_owned()
    } else {
        format!("{path}?{}", kept.join("&"))
    }
}

/// Splits a normalized path into mode, namespace and name: the first segment
/// that names a mode and is followed by a non-empty segment sets the mode.
fn channel(key: String) -> Channel {
    // Each segment with where it starts in `key`, after its `/`.
    let mut segments = key[1..].split('/').scan(1, |at, segment| {
        let start = *at;
        *at += segment.len() + 1;
        Some((start, segment))
    });
    let mut previous: Option<(usize, Mode)> = None;
    let found = segments.find_map(|(start, segment)| {
        if let Some((mode_start, mode)) = previous.take() {
            if !segment.is_empty() {
                // The namespace ends before the `/` of the mode segment.
                return Some((mode, (mode_start - 1, start)));
            }
        }
        previous = match segment {
            "queue" => Some((start, Mode::Queue)),
            "pubsub" => Some((start, Mode::Pubsub)),
            "req" => Some((start, Mode::Requester)),
            "res" => Some((start, Mode::Responder)),
            _ => None,
        };
        None
    });
    let (mode, split) = found.unwrap_or((Mode::Queue, (0, 1)));
    Channel { mode, key, split }
}

/// Percent-decodes a path and refuses what could name one channel two ways or
/// reach outside the tree: control bytes, invalid UTF-8, `.` and `..`
/// segments, encoded `/`.
pub fn normalize(raw: &str) -> Result<String, Reject> {
    if !raw.starts_with('/') {
        return Err(Reject::bad_request("path must start with /"));
    }
    let bytes = percent_decode(raw, false)
        .ok_or_else(|| Reject::bad_request("malformed percent-encoding in path"))?;
    if raw
        .as_bytes()
        .windows(3)
        .any(|w| w[0] == b'%' && w[1] == b'2' && (w[2] == b'f' || w[2] == b'F'))
    {
        return Err(Reject::bad_request("encoded / (%2F) in path"));
    }
    if bytes.iter().any(|&b| b < 0x20 || b == 0x7f) {
        return Err(Reject::bad_request("control character in path"));
    }
    let path = String::from_utf8(bytes).map_err(|_| Reject::bad_request("path is not UTF-8"))?;
    if path.split('/').any(|s| s == "." || s == "..") {
        return Err(Reject::bad_request(
            "'.' and '..' segments are not allowed in paths",
        ));
    }
    Ok(path)
}

/// The query's parameters; `token` and `secret` are taken out and returned
/// apart, so that they can never be forwarded or logged with the rest.
fn parse_query(raw: &str) -> Result<(Query, Option<String>, Option<String>), Reject> {
    let mut query = Query::default();
    let mut token = None;
    let mut secret = None;
    for pair in raw.split('&').filter(|p| !p.is_empty()) {
        let (raw_name, raw_value) = pair.split_once('=').unwrap_or((pair, ""));
        let bad = || Reject::bad_request("malformed percent-encoding in query");
        let name = String::from_utf8(percent_decode(raw_name, true).ok_or_else(bad)?)
            .map_err(|_| bad())?;
        let value = percent_decode(raw_value, true).ok_or_else(bad)?;
        match name.as_str() {
            "body" if query.body.is_none() => {
                query.body = Some(value);
                continue;
            }
            "token" | "secret" => {
                let value = String::from_utf8(value)
                    .map_err(|_| Reject::bad_request(format!("{name}= is not UTF-8")))?;
                let slot = if name == "token" {
                    &mut token
                } else {
                    &mut secret
                };
                slot.get_or_insert(value);
                continue;
            }
            _ => {}
        }
        let value = String::from_utf8(value)
            .map_err(|_| Reject::bad_request(format!("query parameter {name:?} is not UTF-8")))?;
        match name.as_str() {
            "timeout" if query.timeout.is_none() => {
                let secs: f64 = value
                    .trim()
                    .parse()
                    .map_err(|_| Reject::bad_request("timeout= takes a number of seconds"))?;
                query.timeout = Some(
                    Duration::try_from_secs_f64(secs)
                        .map_err(|_| Reject::bad_request("timeout= takes a number of seconds"))?,
                );
            }
            "mime" if query.mime.is_none() => {
                if value.is_empty() || !crate::http::request::is_valid_value(value.as_bytes()) {
                    return Err(Reject::bad_request(
                        "mime= must be a media type without control characters",
                    ));
                }
                query.mime = Some(value.clone());
            }
            _ => {}
        }
        query.params.push((name, value));
    }
    Ok((query, token, secret))
}

/// The pairs of a form body (`a=1&b=+2`), decoded, in order.
pub fn form_pairs(raw: &str) -> Result<Vec<(String, String)>, Reject> {
    raw.split('&')
        .filter(|p| !p.is_empty())
        .map(|pair| {
            let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
            let decode = |text| {
                percent_decode(text, true)
                    .and_then(|bytes| String::from_utf8(bytes).ok())
                    .ok_or_else(|| {
                        Reject::bad_request("malformed form: bad percent-encoding or not UTF-8")
                    })
            };
            Ok((decode(name)?, decode(value)?))
        })
        .collect()
}

/// `true`/`1`/`yes`/empty are on, `false`/`0`/`no` off, anything else None.
pub fn parse_flag(value: &str) -> Option<bool> {
    match value.to_ascii_lowercase().as_str() {
        "" | "true" | "1" | "yes" | "on" => Some(true),
        "false" | "0" | "no" | "off" => Some(false),
        _ => None,
    }
}

/// Percent-encodes `text` for a request target: every byte but letters,
/// digits, `-._~` and those of `kept` (`/` for a whole path, none for one
/// segment).
pub fn percent_encode(text: &str, kept: &[u8]) -> String {
    let mut out = String::with_capacity(text.len());
    for byte in text.bytes() {
        if byte.is_ascii_alphanumeric() || b"-._~".contains(&byte) || kept.contains(&byte) {
            out.push(byte as char);
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

/// Decodes `%XX` escapes (and `+` as space when `plus_is_space`, as in
/// form-encoded queries). None on a malformed escape.
fn percent_decode(text: &str, plus_is_space: bool) -> Option<Vec<u8>> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' => {
                let hex = bytes.get(i + 1..i + 3)?;
                let high = (hex[0] as char).to_digit(16)?;
                let low = (hex[1] as char).to_digit(16)?;
                out.push((high * 16 + low) as u8);
                i += 3;
            }
            b'+' if plus_is_space => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_and_segments_are_percent_encoded() {
        assert_eq!(percent_encode("/ns/answer-1", b"/"), "/ns/answer-1");
        assert_eq!(percent_encode("/ns/a b?c#d%", b"/"), "/ns/a%20b%3Fc%23d%25");
        assert_eq!(percent_encode("/caf\u{e9}", b"/"), "/caf%C3%A9");
        assert_eq!(percent_encode("!room:x/y", b""), "%21room%3Ax%2Fy");
    }

    fn routed(method: Method, target: &str, headers: &[(&str, &str)]) -> Result<Routed, Reject> {
        route(&Request::fake(method, target, headers))
    }

    fn channel_of(method: Method, target: &str) -> (Mode, String, String, String, Action) {
        match routed(method, target, &[]).map(|r| r.route) {
            Ok(Route::Channel { channel, action }) => (
                channel.mode,
                channel.key.clone(),
                channel.namespace().to_owned(),
                channel.name().to_owned(),
                action,
            ),
            other => panic!("{target}: {other:?}"),
        }
    }

    #[test]
    fn the_grammar_table() {
        use Mode::*;
        let cases: &[(&str, Mode, &str, &str, &str)] = &[
            (
                "/channels/v1/do_work",
                Queue,
                "/channels/v1/do_work",
                "",
                "channels/v1/do_work",
            ),
            ("/jobs", Queue, "/jobs", "", "jobs"),
            ("/jobs/", Queue, "/jobs/", "", "jobs/"),
            ("/pubsub/alerts", Pubsub, "/pubsub/alerts", "", "alerts"),
            (
                "/public/pubsub/alerts",
                Pubsub,
                "/public/pubsub/alerts",
                "/public",
                "alerts",
            ),
            ("/jobs?pubsub=true", Pubsub, "/jobs", "", "jobs"),
            ("/jobs?pubsub", Pubsub, "/jobs", "", "jobs"),
            ("/jobs?pubsub=no", Queue, "/jobs", "", "jobs"),
            (
                "/req/site/index.html",
                Requester,
                "/req/site/index.html",
                "",
                "site/index.html",
            ),
            (
                "/u/alice/req/api/users/7",
                Requester,
                "/u/alice/req/api/users/7",
                "/u/alice",
                "api/users/7",
            ),
            ("/res/site", Responder, "/res/site", "", "site"),
            (
                "/u/alice/res/api",
                Responder,
                "/u/alice/res/api",
                "/u/alice",
                "api",
            ),
            ("/a/queue/b", Queue, "/a/queue/b", "/a", "b"),
            ("/pubsub", Queue, "/pubsub", "", "pubsub"),
            ("/pubsub/", Queue, "/pubsub/", "", "pubsub/"),
            (
                "/x/pubsub/y/req/z",
                Pubsub,
                "/x/pubsub/y/req/z",
                "/x",
                "y/req/z",
            ),
            ("/hello%20world", Queue, "/hello world", "", "hello world"),
            ("/caf%C3%A9", Queue, "/café", "", "café"),
        ];
        for (target, mode, key, namespace, name) in cases {
            let got = channel_of(Method::Get, target);
            assert_eq!(
                (got.0, got.1.as_str(), got.2.as_str(), got.3.as_str()),
                (*mode, *key, *namespace, *name),
                "{target}"
            );
        }
    }

    #[test]
    fn requesters_and_responders_pair_on_namespace_and_id() {
        let pair = |target: &str| match routed(Method::Get, target, &[]).map(|r| r.route) {
            Ok(Route::Channel { channel, .. }) => channel.pair_key().into_owned(),
            other => panic!("{target}: {other:?}"),
        };
        assert_eq!(pair("/req/site/a.css"), "/res/site");
        assert_eq!(pair("/res/site"), "/res/site");
        assert_eq!(pair("/u/alice/req/api/users/7"), "/u/alice/res/api");
        assert_eq!(pair("/u/alice/res/api"), "/u/alice/res/api");
        assert_eq!(pair("/u/alice/res/api/more"), "/u/alice/res/api");
        assert_eq!(pair("/jobs"), "/jobs");
    }

    #[test]
    fn methods_pick_the_action_per_mode() {
        assert_eq!(channel_of(Method::Get, "/a").4, Action::Receive);
        assert_eq!(channel_of(Method::Post, "/a").4, Action::Send);
        assert_eq!(channel_of(Method::Put, "/a").4, Action::Send);
        assert_eq!(channel_of(Method::Get, "/a?body=hi").4, Action::Send);
        assert_eq!(
            channel_of(Method::Get, "/a?method=post&body=hi").4,
            Action::Send
        );
        assert_eq!(channel_of(Method::Delete, "/a").4, Action::Delete);
        assert_eq!(
            channel_of(Method::Head, "/a").4,
            Action::NotAllowed(CHANNEL_METHODS)
        );
        assert_eq!(
            channel_of(Method::Patch, "/pubsub/a").4,
            Action::NotAllowed(CHANNEL_METHODS)
        );
        // A requester may use any method, DELETE and OPTIONS included.
        for method in [
            Method::Get,
            Method::Head,
            Method::Patch,
            Method::Delete,
            Method::Options,
            Method::Other("PROPFIND".into()),
        ] {
            assert_eq!(channel_of(method, "/req/x/y").4, Action::Request);
        }
        assert_eq!(channel_of(Method::Post, "/res/x").4, Action::Respond);
        assert_eq!(channel_of(Method::Get, "/res/x").4, Action::Respond);
        let preflight = |target, headers: &[(&str, &str)]| {
            routed(Method::Options, target, headers).map(|r| r.route)
        };
        assert_eq!(preflight("/a", &[]), Ok(Route::Preflight));
        assert_eq!(preflight("*", &[]), Ok(Route::Preflight));
        assert_eq!(preflight("/status", &[]), Ok(Route::Preflight));
        assert_eq!(
            preflight("/req/x", &[("Access-Control-Request-Method", "PUT")]),
            Ok(Route::Preflight)
        );
    }

    #[test]
    fn reserved_paths_are_never_channels() {
        for path in [
            "/",
            "/favicon.ico",
            "/robots.txt",
            "/healthz",
            "/status",
            "/metrics",
            "/h",
            "/r",
            "/_",
            "/_/channels",
            "/%68ealthz",
        ] {
            assert!(
                matches!(
                    routed(Method::Get, path, &[]).map(|r| r.route),
                    Ok(Route::Endpoint(_))
                ),
                "{path}"
            );
        }
        assert_eq!(
            routed(Method::Get, "/status", &[]).map(|r| r.route),
            Ok(Route::Endpoint(Endpoint::Status))
        );
        assert!(matches!(
            routed(Method::Get, "/healthz/x", &[]).map(|r| r.route),
            Ok(Route::Channel { .. })
        ));
    }

    #[test]
    fn notify_and_tunnel_paths_are_endpoints() {
        for (target, canonical) in [
            ("/_/notify", "/_/notify"),
            ("/_/ntfy", "/_/notify"),
            ("/u/alice/_/ntfy", "/u/alice/_/notify"),
            ("/team/_/notify?title=x", "/team/_/notify"),
        ] {
            let routed = routed(Method::Post, target, &[]).unwrap();
            assert_eq!(routed.route, Route::Endpoint(Endpoint::Notify), "{target}");
            assert_eq!(routed.path, canonical);
        }
        assert_eq!(notify_namespace("/u/alice/_/notify"), "/u/alice");
        assert_eq!(notify_namespace("/_/notify"), "");
        // Not a namespace: the server's own paths, empty segments.
        for target in ["/_/x/_/notify", "/u//_/notify"] {
            assert_ne!(
                routed(Method::Post, target, &[]).map(|r| r.route),
                Ok(Route::Endpoint(Endpoint::Notify)),
                "{target}"
            );
        }
        for (target, shown) in [
            ("/_/tunnel/localhost/22", "localhost:22"),
            ("/_/tunnel/Pi.LAN/2222", "pi.lan:2222"),
            ("/_/tunnel/[::1]/22", "[::1]:22"),
            ("/_/tunnel/::1/22", "[::1]:22"),
            ("/_/tunnel/[0:0::1]/22", "[::1]:22"),
            ("/_/tunnel/10.0.0.2/65535", "10.0.0.2:65535"),
            ("/huproxy/alice/pi.lan/22", "pi.lan:22"),
        ] {
            let routed = routed(Method::Get, target, &[]).unwrap();
            assert_eq!(routed.route, Route::Endpoint(Endpoint::Tunnel), "{target}");
            assert_eq!(tunnel_target(&routed.path).unwrap().to_string(), shown);
        }
        for target in [
            "/_/tunnel/host/0",
            "/_/tunnel/host/65536",
            "/_/tunnel/host/+22",
            "/_/tunnel/host",
            "/_/tunnel/ho%20st/22",
            "/_/tunnel/[::1/22",
            "/_/tunnel/a/b/22",
            "/_/tunnel/2130706433/22",
            "/_/tunnel/0x7f.1/22",
            "/_/tunnel/010.0.0.1/22",
            "/_/tunnel/127.1/22",
            "/huproxy/pi/22",
            "/huproxy",
        ] {
            assert_eq!(
                routed(Method::Get, target, &[]).map(|r| r.route),
                Ok(Route::Endpoint(Endpoint::Reserved)),
                "{target}"
            );
        }
    }

    #[test]
    fn bad_paths_are_refused() {
        for target in [
            "/a/../b",
            "/a/./b",
            "/..",
            "/a%2Fb",
            "/a%2fb",
            "/a%00b",
            "/a%0Ab",
            "/%ff",
            "/%zz",
            "/a%2",
            "/a?timeout=x",
            "/a?timeout=-1",
            "/a?mime=a%0Db",
            "/a?pubsub=maybe",
            "/%2E%2E/x",
        ] {
            match routed(Method::Get, target, &[]) {
                Err(r) => assert_eq!(r.status, 400, "{target}"),
                Ok(r) => panic!("{target} was routed: {r:?}"),
            }
        }
    }

    #[test]
    fn query_parameters_are_decoded() {
        let routed = routed(
            Method::Get,
            "/a?timeout=1.5&body=hello+world%21&mime=text%2Fplain&token=s3cret&x=1",
            &[],
        )
        .unwrap();
        let query = routed.query;
        assert_eq!(query.timeout, Some(Duration::from_millis(1500)));
        assert_eq!(query.body.as_deref(), Some(&b"hello world!"[..]));
        assert_eq!(query.mime.as_deref(), Some("text/plain"));
        assert_eq!(query.get("x"), Some("1"));
        assert_eq!(query.get("token"), None);
    }

    #[test]
    fn credentials_never_travel_in_a_forwarded_uri() {
        assert_eq!(
            without_credentials("/req/a?x=1&token=t&y=2"),
            "/req/a?x=1&y=2"
        );
        assert_eq!(without_credentials("/req/a?%74oken=t&secret=s"), "/req/a");
        assert_eq!(without_credentials("/req/a"), "/req/a");
        assert_eq!(without_credentials("/req/a?tokens=1"), "/req/a?tokens=1");
        let reply = routed(Method::Post, "/_/reply/0123abcd", &[]).unwrap();
        assert_eq!(reply.route, Route::Endpoint(Endpoint::Reply));
        let other = routed(Method::Post, "/_/reply/a/b", &[]).unwrap();
        assert_eq!(other.route, Route::Endpoint(Endpoint::Reserved));
    }

    #[test]
    fn the_credential_is_patch_token_then_query_then_bearer() {
        let token = |target: &str, headers: &[(&str, &str)]| {
            let routed = routed(Method::Get, target, headers).unwrap();
            routed
                .credential
                .token
                .map(|(secret, source)| (secret.expose().to_owned(), source))
        };
        let bearer = ("Authorization", "Bearer b");
        let patch = ("Patch-Token", "p");
        assert_eq!(
            token("/a?token=q", &[bearer, patch]),
            Some(("p".into(), TokenSource::PatchToken))
        );
        assert_eq!(
            token("/a?token=q", &[bearer]),
            Some(("q".into(), TokenSource::Query))
        );
        assert_eq!(
            token("/a", &[bearer]),
            Some(("b".into(), TokenSource::Bearer))
        );
        assert_eq!(token("/a", &[("Authorization", "Basic eDp5")]), None);
        let routed = routed(Method::Get, "/a?secret=s&token=t&x=1", &[]).unwrap();
        assert_eq!(
            routed.credential.secret.as_ref().map(Secret::expose),
            Some("s")
        );
        assert!(!format!("{routed:?}").contains("s3") && !format!("{routed:?}").contains("\"t\""));
        assert_eq!(routed.query.params, vec![("x".to_owned(), "1".to_owned())]);
    }
}
