//! The URL grammar of DESIGN.md §2: (method, request target) → [`Route`].
//! Pure: no sockets, no state, table-tested below. The normalized path made
//! here is the one string used for routing, logs and (later) access control.

use std::time::Duration;

use crate::error::Reject;
use crate::http::Method;

/// Paths that are never channels.
const RESERVED: [&str; 8] = [
    "/",
    "/favicon.ico",
    "/robots.txt",
    "/healthz",
    "/status",
    "/metrics",
    "/h",
    "/r",
];

/// Where a request goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    /// A reserved path (the normalized path): a server endpoint, not a channel.
    Reserved(String),
    /// A channel, what the request does on it, and its query.
    Channel {
        channel: Channel,
        action: Action,
        query: Query,
    },
    /// `OPTIONS *` or `OPTIONS` on any path: a CORS preflight.
    Preflight,
}

/// The family of a channel, set by the first mode segment of its path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Queue,
    Pubsub,
    Requester,
    Responder,
}

impl Mode {
    /// The mode's name, as in paths and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Queue => "queue",
            Mode::Pubsub => "pubsub",
            Mode::Requester => "req",
            Mode::Responder => "res",
        }
    }
}

/// A channel named by a path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Channel {
    pub mode: Mode,
    /// The normalized path without its query: the channel's identity.
    pub key: String,
    /// The segments before the mode segment, as a path (`""` or `/u/alice`).
    pub namespace: String,
    /// The segments after the mode segment (the whole path for a plain queue).
    pub name: String,
}

/// What a request does on a channel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// POST, PUT, or GET with `?body=`: send a message.
    Send,
    /// GET: receive a message.
    Receive,
    /// DELETE: end the waiters of the channel and of every channel under it.
    Delete,
    /// Any other method; the value lists the allowed ones.
    NotAllowed(&'static str),
}

/// The methods a channel accepts, for `Allow`.
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
    /// Every parameter, decoded, in order, for the modes' own (`token` excluded).
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

/// Routes a request by its method and target (origin form).
pub fn route(method: &Method, target: &str) -> Result<Route, Reject> {
    if target == "*" {
        return Ok(Route::Preflight);
    }
    let (raw_path, raw_query) = target.split_once('?').unwrap_or((target, ""));
    let path = normalize(raw_path)?;
    if *method == Method::Options {
        return Ok(Route::Preflight);
    }
    if RESERVED.contains(&path.as_str()) || path == "/_" || path.starts_with("/_/") {
        return Ok(Route::Reserved(path));
    }
    let query = parse_query(raw_query)?;
    let mut channel = channel(path);
    if channel.mode == Mode::Queue {
        if let Some(flag) = query.get("pubsub") {
            if parse_flag(flag)
                .ok_or_else(|| Reject::bad_request("pubsub= takes true, false, 1, 0, yes or no"))?
            {
                channel.mode = Mode::Pubsub;
            }
        }
    }
    let action = match method {
        // `?body=` makes a GET a send (patchbay's `?method=post&body=` too).
        Method::Get if query.body.is_some() => Action::Send,
        Method::Get => Action::Receive,
        Method::Post | Method::Put => Action::Send,
        Method::Delete => Action::Delete,
        _ => Action::NotAllowed(CHANNEL_METHODS),
    };
    Ok(Route::Channel {
        channel,
        action,
        query,
    })
}

/// Splits a normalized path into mode, namespace and name: the first segment
/// that names a mode and is followed by a non-empty segment sets the mode.
fn channel(key: String) -> Channel {
    let segments: Vec<&str> = key[1..].split('/').collect();
    for (i, segment) in segments.iter().enumerate() {
        let mode = match *segment {
            "queue" => Mode::Queue,
            "pubsub" => Mode::Pubsub,
            "req" => Mode::Requester,
            "res" => Mode::Responder,
            _ => continue,
        };
        if segments.get(i + 1).is_some_and(|next| !next.is_empty()) {
            let namespace = segments[..i].iter().map(|s| format!("/{s}")).collect();
            let name = segments[i + 1..].join("/");
            return Channel {
                mode,
                namespace,
                name,
                key,
            };
        }
    }
    Channel {
        mode: Mode::Queue,
        namespace: String::new(),
        name: key[1..].to_owned(),
        key,
    }
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

fn parse_query(raw: &str) -> Result<Query, Reject> {
    let mut query = Query::default();
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
            "token" | "secret" => continue,
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
    Ok(query)
}

/// `true`/`1`/`yes`/empty are on, `false`/`0`/`no` off, anything else None.
pub fn parse_flag(value: &str) -> Option<bool> {
    match value.to_ascii_lowercase().as_str() {
        "" | "true" | "1" | "yes" | "on" => Some(true),
        "false" | "0" | "no" | "off" => Some(false),
        _ => None,
    }
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

    fn channel_of(method: Method, target: &str) -> (Mode, String, String, String, Action) {
        match route(&method, target) {
            Ok(Route::Channel {
                channel, action, ..
            }) => (
                channel.mode,
                channel.key,
                channel.namespace,
                channel.name,
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
    fn methods_pick_the_action() {
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
            channel_of(Method::Patch, "/a").4,
            Action::NotAllowed(CHANNEL_METHODS)
        );
        assert_eq!(route(&Method::Options, "/a"), Ok(Route::Preflight));
        assert_eq!(route(&Method::Options, "*"), Ok(Route::Preflight));
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
                matches!(route(&Method::Get, path), Ok(Route::Reserved(_))),
                "{path}"
            );
        }
        assert!(matches!(
            route(&Method::Get, "/healthz/x"),
            Ok(Route::Channel { .. })
        ));
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
            match route(&Method::Get, target) {
                Err(r) => assert_eq!(r.status, 400, "{target}"),
                Ok(r) => panic!("{target} was routed: {r:?}"),
            }
        }
    }

    #[test]
    fn query_parameters_are_decoded() {
        let Ok(Route::Channel { query, .. }) = route(
            &Method::Get,
            "/a?timeout=1.5&body=hello+world%21&mime=text%2Fplain&token=s3cret&x=1",
        ) else {
            panic!("not a channel");
        };
        assert_eq!(query.timeout, Some(Duration::from_millis(1500)));
        assert_eq!(query.body.as_deref(), Some(&b"hello world!"[..]));
        assert_eq!(query.mime.as_deref(), Some("text/plain"));
        assert_eq!(query.get("x"), Some("1"));
        assert_eq!(query.get("token"), None);
    }
}
