//! Notifications forwarded to Matrix, ntfy and webhooks (Patchwork's
//! `/_/ntfy`): [`Notifications`], the backends of the access file's
//! `[notify]` tables, read with that file (and again on SIGHUP), never per
//! request; [`Message`], what a request asks to send, in any of the forms
//! Patchwork takes; each backend's request, built as its API expects; and
//! [`Notifier::deliver`], which sends one message to every backend at once,
//! each within `--notify-timeout`, holding no lock of the relay's. Whether a
//! client may notify is the access file's business (`app.rs`); secrets such
//! as a Matrix access token live only in that file and never reach a log
//! or an answer.

use std::collections::BTreeMap;
use std::io::Read as _;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::Deserialize;
use serde_json::json;

use crate::error::Reject;
use crate::route::{Query, percent_encode};

/// The largest message a request may carry (bodies of chat messages and
/// push notifications are far smaller).
pub const MAX_MESSAGE: usize = 64 * 1024;

/// The backends of one reading of the access file.
#[derive(Debug, Default)]
pub struct Notifications {
    /// `[[notify.matrix]]` and the like: for `/_/notify`.
    global: Vec<Backend>,
    /// `[[notify.namespace."/u/alice".matrix]]`: for `/u/alice/_/notify`.
    namespaces: BTreeMap<String, Vec<Backend>>,
}

impl Notifications {
    /// The backends a notification under `namespace` (`""` or `/u/alice`)
    /// goes to: the namespace's own; never another's, nor the global ones
    /// (a namespace without backends has none).
    pub fn backends(&self, namespace: &str) -> &[Backend] {
        if namespace.is_empty() {
            return &self.global;
        }
        self.namespaces.get(namespace).map_or(&[], Vec::as_slice)
    }

    /// How many backends are configured in all.
    pub fn count(&self) -> usize {
        self.global.len() + self.namespaces.values().map(Vec::len).sum::<usize>()
    }
}

/// One backend a message goes to.
#[derive(Clone)]
pub struct Backend {
    /// How answers and logs name it: its kind and host (`ntfy ntfy.sh`), or
    /// the `name` the file gives it; never a token, topic or room.
    pub name: String,
    kind: Kind,
    /// The certificates its https server may show (`cacert`, else the
    /// built-in roots).
    trust: crate::remote::Trust,
}

/// A backend shows its name only: its settings hold secrets.
impl std::fmt::Debug for Backend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Backend")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

impl Backend {
    /// Why this backend will not take `message`, if it will not: a Matrix
    /// room the file does not list.
    pub fn refuses(&self, message: &Message) -> Option<String> {
        match (&self.kind, &message.room) {
            (Kind::Matrix(matrix), Some(room))
                if *room != matrix.room && !matrix.rooms.contains(room) =>
            {
                Some(format!(
                    "{}: room= must be a room the access file lists for it (rooms = [...])",
                    self.name
                ))
            }
            _ => None,
        }
    }
}

/// A backend's kind and settings.
#[derive(Clone)]
enum Kind {
    Matrix(Matrix),
    Ntfy(Ntfy),
    Webhook(Webhook),
}

/// `[[notify.matrix]]`: a room, posted to with the client-server API.
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct Matrix {
    name: Option<String>,
    cacert: Option<std::path::PathBuf>,
    homeserver: String,
    access_token: String,
    room: String,
    /// Other rooms a request may name (`room=`); none by default.
    #[serde(default)]
    rooms: Vec<String>,
}

/// `[[notify.ntfy]]`: a topic on an ntfy server.
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct Ntfy {
    name: Option<String>,
    cacert: Option<std::path::PathBuf>,
    #[serde(default = "ntfy_sh")]
    server: String,
    topic: String,
    /// An access token (`Authorization: Bearer`), or `user` and `password`.
    token: Option<String>,
    user: Option<String>,
    password: Option<String>,
    /// The default priority (1 to 5, or min, low, default, high, urgent).
    priority: Option<String>,
    /// Tags (emoji short codes) every message gets.
    #[serde(default)]
    tags: Vec<String>,
}

fn ntfy_sh() -> String {
    "https://ntfy.sh".to_owned()
}

/// `[[notify.webhook]]`: a URL that gets a JSON object per message.
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct Webhook {
    name: Option<String>,
    cacert: Option<std::path::PathBuf>,
    url: String,
    /// Headers every request carries (a shared secret, say).
    #[serde(default)]
    headers: BTreeMap<String, String>,
}

/// The `[notify]` table as written (no Debug: it holds secrets).
#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawNotify {
    #[serde(default)]
    matrix: Vec<Matrix>,
    #[serde(default)]
    ntfy: Vec<Ntfy>,
    #[serde(default)]
    webhook: Vec<Webhook>,
    #[serde(default)]
    namespace: BTreeMap<String, RawBackends>,
}

/// The backend lists of one table.
#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBackends {
    #[serde(default)]
    matrix: Vec<Matrix>,
    #[serde(default)]
    ntfy: Vec<Ntfy>,
    #[serde(default)]
    webhook: Vec<Webhook>,
}

impl RawNotify {
    /// Checks the tables and makes them [`Notifications`]: URLs must be
    /// http or https (https only when built with TLS), values fit for
    /// headers, namespaces paths.
    pub fn check(self) -> Result<Notifications, String> {
        let mut namespaces = BTreeMap::new();
        for (written, raw) in self.namespace {
            let namespace = format!("/{}", written.trim_matches('/'));
            if namespace == "/" || namespace.split('/').skip(1).any(str::is_empty) {
                return Err(format!(
                    "[notify.namespace.{written:?}]: a namespace is a path such as \"/u/alice\""
                ));
            }
            if namespaces.insert(namespace.clone(), raw.check()?).is_some() {
                return Err(format!("[notify.namespace]: {namespace:?} is listed twice"));
            }
        }
        let global = RawBackends {
            matrix: self.matrix,
            ntfy: self.ntfy,
            webhook: self.webhook,
        };
        Ok(Notifications {
            global: global.check()?,
            namespaces,
        })
    }
}

impl RawBackends {
    fn check(self) -> Result<Vec<Backend>, String> {
        let mut backends = Vec::new();
        for matrix in self.matrix {
            let host = checked_url("matrix", "homeserver", &matrix.homeserver)?;
            secret_fits("matrix", "access_token", &matrix.access_token)?;
            for room in std::iter::once(&matrix.room).chain(&matrix.rooms) {
                if !room.starts_with('!') || room.len() < 2 {
                    return Err(format!(
                        "[[notify.matrix]]: room {room:?} must be a room id (\"!…:server\")"
                    ));
                }
            }
            let (name, cacert) = (matrix.name.clone(), matrix.cacert.clone());
            backends.push(Backend::new(
                "matrix",
                &host,
                name,
                cacert,
                Kind::Matrix(matrix),
            )?);
        }
        for ntfy in self.ntfy {
            let host = checked_url("ntfy", "server", &ntfy.server)?;
            if ntfy.topic.is_empty() || ntfy.topic.contains(['/', '?', '#']) {
                return Err("[[notify.ntfy]]: topic must be one path segment".to_owned());
            }
            for (key, value) in [
                ("token", &ntfy.token),
                ("user", &ntfy.user),
                ("password", &ntfy.password),
            ] {
                if let Some(value) = value {
                    secret_fits("ntfy", key, value)?;
                }
            }
            if ntfy.user.is_some() != ntfy.password.is_some() {
                return Err("[[notify.ntfy]]: user and password go together".to_owned());
            }
            if let Some(priority) = &ntfy.priority {
                priority_of(priority).map_err(|e| format!("[[notify.ntfy]]: {e}"))?;
            }
            let (name, cacert) = (ntfy.name.clone(), ntfy.cacert.clone());
            backends.push(Backend::new("ntfy", &host, name, cacert, Kind::Ntfy(ntfy))?);
        }
        for webhook in self.webhook {
            let host = checked_url("webhook", "url", &webhook.url)?;
            for (name, value) in &webhook.headers {
                let fits = !name.is_empty()
                    && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
                    && crate::http::request::is_valid_value(value.as_bytes());
                if !fits {
                    return Err(format!(
                        "[[notify.webhook]]: header {name:?} is not a valid header"
                    ));
                }
                // The framing is the client's to write, not the file's.
                let framing = [
                    "content-length",
                    "transfer-encoding",
                    "host",
                    "connection",
                    "te",
                    "upgrade",
                ];
                if framing.iter().any(|f| name.eq_ignore_ascii_case(f)) {
                    return Err(format!(
                        "[[notify.webhook]]: header {name:?} is set by patchcord itself"
                    ));
                }
            }
            let (name, cacert) = (webhook.name.clone(), webhook.cacert.clone());
            backends.push(Backend::new(
                "webhook",
                &host,
                name,
                cacert,
                Kind::Webhook(webhook),
            )?);
        }
        Ok(backends)
    }
}

/// The host of `url`, checked: http or https (https needs TLS), a host,
/// no credentials in it.
fn checked_url(kind: &str, key: &str, url: &str) -> Result<String, String> {
    crate::remote::Url::parse(url, &["http", "https"])
        .map(|url| url.authority)
        .map_err(|why| format!("[[notify.{kind}]]: {key} {why}"))
}

impl Backend {
    /// A backend of `kind` at `host`, named `name` (else by its kind and
    /// host), whose https server is checked against the PEM file `cacert`
    /// (read now, with the rest of the file), else the built-in roots.
    fn new(
        label: &str,
        host: &str,
        name: Option<String>,
        cacert: Option<std::path::PathBuf>,
        kind: Kind,
    ) -> Result<Backend, String> {
        let trust = match cacert {
            None => crate::remote::Trust::builtin(),
            Some(file) => crate::remote::Trust::from_file(&file)
                .map_err(|why| format!("[[notify.{label}]]: cacert: {why}"))?,
        };
        Ok(Backend {
            name: name.unwrap_or_else(|| format!("{label} {host}")),
            kind,
            trust,
        })
    }
}

/// A secret must fit in a header.
fn secret_fits(kind: &str, key: &str, value: &str) -> Result<(), String> {
    if value.is_empty() || !crate::http::request::is_valid_value(value.as_bytes()) {
        return Err(format!(
            "[[notify.{kind}]]: {key} must be text without control characters"
        ));
    }
    Ok(())
}

/// ntfy's priority as a number from 1 to 5.
fn priority_of(text: &str) -> Result<u8, String> {
    Ok(match text.trim().to_ascii_lowercase().as_str() {
        "1" | "min" => 1,
        "2" | "low" => 2,
        "3" | "default" => 3,
        "4" | "high" => 4,
        "5" | "max" | "urgent" => 5,
        _ => {
            return Err(format!(
                "priority {text:?} is not 1 to 5 (or min, low, default, high, urgent)"
            ));
        }
    })
}

/// How a message's text is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Plain,
    Markdown,
    Html,
}

impl Format {
    fn parse(text: &str) -> Option<Format> {
        match text.trim().to_ascii_lowercase().as_str() {
            "" | "plain" | "text" => Some(Format::Plain),
            "markdown" | "md" => Some(Format::Markdown),
            "html" => Some(Format::Html),
            _ => None,
        }
    }

    fn as_str(self) -> &'static str {
        match self {
            Format::Plain => "plain",
            Format::Markdown => "markdown",
            Format::Html => "html",
        }
    }
}

/// What a request asks to send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    pub title: Option<String>,
    pub text: String,
    pub format: Format,
    /// A Matrix room instead of the backend's own.
    pub room: Option<String>,
    /// ntfy's priority and tags, instead of (tags: besides) the backend's.
    pub priority: Option<u8>,
    pub tags: Vec<String>,
}

/// The fields of a message, as a JSON object, a form or a query gives them.
#[derive(Debug, Default, Deserialize)]
struct Fields {
    title: Option<String>,
    message: Option<String>,
    body: Option<String>,
    #[serde(rename = "type")]
    format: Option<String>,
    room: Option<String>,
    priority: Option<Loose>,
    tags: Option<Loose>,
}

/// A field that may be written as a string, a number or a list of
/// strings, and nothing deeper: read without recursion (a client's deeply
/// nested JSON must not exhaust a connection thread's small stack).
#[derive(Debug)]
enum Loose {
    Text(String),
    Number(u64),
    List(Vec<String>),
}

impl<'de> Deserialize<'de> for Loose {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Loose, D::Error> {
        struct Visitor;
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = Loose;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a string, a number or a list of strings")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Loose, E> {
                Ok(Loose::Text(v.to_owned()))
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<Loose, E> {
                Ok(Loose::Number(v))
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> Result<Loose, A::Error> {
                let mut list = Vec::new();
                // Each element must be a string: a nested list is refused
                // at its first bracket.
                while let Some(item) = seq.next_element::<String>()? {
                    if list.len() == 64 {
                        return Err(serde::de::Error::custom("at most 64 tags"));
                    }
                    list.push(item);
                }
                Ok(Loose::List(list))
            }
        }
        deserializer.deserialize_any(Visitor)
    }
}

impl Fields {
    /// The fields of a query or a form: the first value of each.
    fn from_pairs<'a>(pairs: impl Iterator<Item = (&'a str, &'a str)>) -> Fields {
        let mut fields = Fields::default();
        for (name, value) in pairs {
            let slot = match name {
                "title" => &mut fields.title,
                "message" => &mut fields.message,
                "body" => &mut fields.body,
                "type" => &mut fields.format,
                "room" => &mut fields.room,
                "priority" => {
                    fields.priority.get_or_insert(Loose::Text(value.to_owned()));
                    continue;
                }
                "tags" => {
                    fields.tags.get_or_insert(Loose::Text(value.to_owned()));
                    continue;
                }
                _ => continue,
            };
            slot.get_or_insert_with(|| value.to_owned());
        }
        fields
    }

    /// Fills what this lacks from `other` (the query, under a body's fields).
    fn or(self, other: Fields) -> Fields {
        Fields {
            title: self.title.or(other.title),
            message: self.message.or(other.message),
            body: self.body.or(other.body),
            format: self.format.or(other.format),
            room: self.room.or(other.room),
            priority: self.priority.or(other.priority),
            tags: self.tags.or(other.tags),
        }
    }
}

impl Message {
    /// The message of a request with `content_type` and `body` (possibly
    /// empty) and `query`, as Patchwork takes them: a JSON object, a form,
    /// or the query's `title`, `message` (or `body`), `type` and `room`,
    /// with any other body as the plain message. 400 when there is no text.
    pub fn parse(
        content_type: Option<&str>,
        body: &[u8],
        query: &Query,
    ) -> Result<Message, Reject> {
        let mut from_query = Fields::from_pairs(
            query
                .params
                .iter()
                .map(|(name, value)| (name.as_str(), value.as_str())),
        );
        if let Some(text) = &query.body {
            let text = String::from_utf8(text.clone())
                .map_err(|_| Reject::bad_request("body= is not UTF-8"))?;
            from_query.body.get_or_insert(text);
        }
        let media = content_type
            .and_then(|t| t.split(';').next())
            .map(|t| t.trim().to_ascii_lowercase())
            .unwrap_or_default();
        let fields = if body.is_empty() {
            from_query
        } else if media == "application/json" || media.ends_with("+json") {
            let fields: Fields = serde_json::from_slice(body).map_err(|e| {
                Reject::bad_request(format!(
                    "the body is not a JSON object of title, message, type and room: {e}"
                ))
            })?;
            fields.or(from_query)
        } else if let Some(pairs) = (media == "application/x-www-form-urlencoded")
            .then(|| form_fields(body))
            .flatten()
        {
            Fields::from_pairs(pairs.iter().map(|(n, v)| (n.as_str(), v.as_str()))).or(from_query)
        } else {
            // Any other body is the text; so is a "form" that names no
            // field, which is what `curl -d "backup done"` sends.
            let text = String::from_utf8(body.to_vec())
                .map_err(|_| Reject::bad_request("the message is not UTF-8 text"))?;
            Fields {
                message: Some(text),
                ..Fields::default()
            }
            .or(from_query)
        };
        Message::from_fields(fields)
    }

    fn from_fields(fields: Fields) -> Result<Message, Reject> {
        let text = fields
            .message
            .or(fields.body)
            .filter(|t| !t.trim().is_empty())
            .ok_or_else(|| {
                Reject::bad_request("nothing to send: give a message (the body, message= or body=)")
            })?;
        let format = match fields.format.as_deref() {
            None => Format::Plain,
            Some(written) => Format::parse(written)
                .ok_or_else(|| Reject::bad_request("type= takes plain, markdown or html"))?,
        };
        let priority = match fields.priority {
            None => None,
            Some(Loose::Number(n)) => Some(priority_of(&n.to_string())),
            Some(Loose::Text(s)) => Some(priority_of(&s)),
            Some(Loose::List(_)) => Some(Err("priority is a number or a name".to_owned())),
        }
        .transpose()
        .map_err(Reject::bad_request)?;
        let tags = match fields.tags {
            None => Vec::new(),
            Some(Loose::Text(s)) => s
                .split(',')
                .map(str::trim)
                .filter(|t| !t.is_empty())
                .map(str::to_owned)
                .collect(),
            Some(Loose::List(list)) => list,
            Some(Loose::Number(_)) => return Err(Reject::bad_request("tags is a list of strings")),
        };
        let title = fields.title.filter(|t| !t.trim().is_empty());
        let room = fields.room.filter(|r| !r.is_empty());
        Ok(Message {
            title,
            text,
            format,
            room,
            priority,
            tags,
        })
    }
}

/// The pairs of a form body (`title=x&message=y`), decoded, when it is
/// one: UTF-8, well formed, and naming a field of a message.
fn form_fields(body: &[u8]) -> Option<Vec<(String, String)>> {
    let text = std::str::from_utf8(body).ok()?;
    let pairs = crate::route::form_pairs(text.trim()).ok()?;
    pairs
        .iter()
        .any(|(name, _)| matches!(name.as_str(), "title" | "message" | "body"))
        .then_some(pairs)
}

/// A request to a backend, built from a message: what its API expects.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outgoing {
    pub method: &'static str,
    pub url: String,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Backend {
    /// The request that sends `message` (under `namespace`) to this backend;
    /// `txn` is a Matrix transaction id, unique per message.
    pub fn request(&self, message: &Message, namespace: &str, txn: &str) -> Outgoing {
        match &self.kind {
            Kind::Matrix(matrix) => matrix_request(matrix, message, txn),
            Kind::Ntfy(ntfy) => ntfy_request(ntfy, message),
            Kind::Webhook(webhook) => webhook_request(webhook, message, namespace),
        }
    }
}

/// `PUT /_matrix/client/v3/rooms/{room}/send/m.room.message/{txn}`: an
/// `m.text` (`m.notice` would not notify most clients), with an HTML
/// `formatted_body` for markdown and html; the title leads, in bold.
fn matrix_request(matrix: &Matrix, message: &Message, txn: &str) -> Outgoing {
    let room = message.room.as_deref().unwrap_or(&matrix.room);
    let url = format!(
        "{}/_matrix/client/v3/rooms/{}/send/m.room.message/{}",
        matrix.homeserver.trim_end_matches('/'),
        percent_encode(room, b""),
        percent_encode(txn, b"")
    );
    let (plain, html) = match message.format {
        Format::Plain => (message.text.clone(), None),
        Format::Markdown => (message.text.clone(), Some(markdown_html(&message.text))),
        Format::Html => (html_text(&message.text), Some(message.text.clone())),
    };
    let mut content = serde_json::Map::new();
    content.insert("msgtype".into(), json!("m.text"));
    match &message.title {
        None => content.insert("body".into(), json!(plain)),
        Some(title) => content.insert("body".into(), json!(format!("{title}\n{plain}"))),
    };
    let html = match (&message.title, html) {
        (None, html) => html,
        (Some(title), Some(html)) => Some(format!(
            "<strong>{}</strong><br>\n{html}",
            escape_html(title)
        )),
        (Some(title), None) => Some(format!(
            "<strong>{}</strong><br>\n{}",
            escape_html(title),
            escape_html(&plain).replace('\n', "<br>\n")
        )),
    };
    if let Some(html) = html {
        content.insert("format".into(), json!("org.matrix.custom.html"));
        content.insert("formatted_body".into(), json!(html));
    }
    Outgoing {
        method: "PUT",
        url,
        headers: vec![
            (
                "Authorization".to_owned(),
                format!("Bearer {}", matrix.access_token),
            ),
            ("Content-Type".to_owned(), "application/json".to_owned()),
        ],
        body: serde_json::Value::Object(content).to_string().into_bytes(),
    }
}

/// `POST {server}/{topic}` with the text as the body and `Title`,
/// `Priority`, `Tags` and `Markdown: yes` as headers (RFC 2047 words for a
/// title that is not ASCII, which ntfy decodes).
fn ntfy_request(ntfy: &Ntfy, message: &Message) -> Outgoing {
    let url = format!(
        "{}/{}",
        ntfy.server.trim_end_matches('/'),
        percent_encode(&ntfy.topic, b"")
    );
    let mut headers: Vec<(String, String)> = Vec::new();
    let mut header = |name: &str, value: String| headers.push((name.to_owned(), value));
    if let Some(title) = &message.title {
        header("Title", header_text(title));
    }
    let priority = message
        .priority
        .or_else(|| ntfy.priority.as_deref().and_then(|p| priority_of(p).ok()));
    if let Some(priority) = priority {
        header("Priority", priority.to_string());
    }
    let tags: Vec<&str> = ntfy
        .tags
        .iter()
        .chain(&message.tags)
        .map(String::as_str)
        .collect();
    if !tags.is_empty() {
        header("Tags", header_text(&tags.join(",")));
    }
    let text = match message.format {
        Format::Plain => message.text.clone(),
        Format::Markdown => {
            header("Markdown", "yes".to_owned());
            message.text.clone()
        }
        Format::Html => html_text(&message.text),
    };
    if let Some(token) = &ntfy.token {
        header("Authorization", format!("Bearer {token}"));
    } else if let (Some(user), Some(password)) = (&ntfy.user, &ntfy.password) {
        use base64::Engine as _;
        let pair = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
        header("Authorization", format!("Basic {pair}"));
    }
    header("Content-Type", "text/plain; charset=utf-8".to_owned());
    Outgoing {
        method: "POST",
        url,
        headers,
        body: text.into_bytes(),
    }
}

/// `POST {url}` of `{"title","message","type","room","namespace","time"}`.
fn webhook_request(webhook: &Webhook, message: &Message, namespace: &str) -> Outgoing {
    let time = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let body = json!({
        "title": message.title,
        "message": message.text,
        "type": message.format.as_str(),
        "room": message.room,
        "priority": message.priority,
        "tags": message.tags,
        "namespace": namespace,
        "time": time,
    });
    let mut headers: Vec<(String, String)> = webhook.headers.clone().into_iter().collect();
    // A Content-Type of the file's own replaces the default.
    if !headers
        .iter()
        .any(|(n, _)| n.eq_ignore_ascii_case("content-type"))
    {
        headers.push(("Content-Type".to_owned(), "application/json".to_owned()));
    }
    Outgoing {
        method: "POST",
        url: webhook.url.clone(),
        headers,
        body: body.to_string().into_bytes(),
    }
}

/// Markdown as HTML (CommonMark, with tables and strikethrough).
pub fn markdown_html(markdown: &str) -> String {
    use pulldown_cmark::{Options, Parser, html};
    let parser = Parser::new_ext(
        markdown,
        Options::ENABLE_TABLES | Options::ENABLE_STRIKETHROUGH,
    );
    let mut out = String::with_capacity(markdown.len() * 3 / 2);
    html::push_html(&mut out, parser);
    out.trim_end().to_owned()
}

/// The text of an HTML fragment: tags dropped, line breaks kept, the
/// common entities decoded.
pub fn html_text(html: &str) -> String {
    let mut out = String::with_capacity(html.len());
    let mut rest = html;
    while let Some(open) = rest.find('<') {
        out.push_str(&rest[..open]);
        let Some(close) = rest[open..].find('>') else {
            out.push_str(&rest[open..]);
            rest = "";
            break;
        };
        let tag = rest[open + 1..open + close]
            .trim_start_matches('/')
            .to_ascii_lowercase();
        let name = tag
            .split(|c: char| !c.is_ascii_alphanumeric())
            .next()
            .unwrap_or("");
        if matches!(
            name,
            "br" | "p" | "div" | "li" | "tr" | "h1" | "h2" | "h3" | "h4" | "h5" | "h6"
        ) && !out.ends_with('\n')
            && !out.is_empty()
        {
            out.push('\n');
        }
        rest = &rest[open + close + 1..];
    }
    out.push_str(rest);
    let decoded = out
        .replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&quot;", "\"")
        .replace("&#39;", "'")
        .replace("&nbsp;", " ")
        .replace("&amp;", "&");
    decoded.trim().to_owned()
}

/// `text` safe inside HTML.
fn escape_html(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// `text` as a header value: one line; RFC 2047 (`=?UTF-8?B?…?=`) when it
/// is not ASCII.
fn header_text(text: &str) -> String {
    let line: String = text
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    if line.is_ascii() {
        line
    } else {
        use base64::Engine as _;
        format!(
            "=?UTF-8?B?{}?=",
            base64::engine::general_purpose::STANDARD.encode(line.as_bytes())
        )
    }
}

/// Serves a notification request: reads its message (at most
/// [`MAX_MESSAGE`] bytes), sends it to the backends of its namespace, and
/// answers 200 `{"status":"sent","backends":[…]}` when each accepted it,
/// 502 naming those that did not (and their status), 503 when there are
/// none. The backends are the reading of the access file in force.
pub fn serve(
    ex: &mut crate::http::Exchange,
    routed: &crate::route::Routed,
    notifications: &Notifications,
    notifier: &Notifier,
    stats: &crate::metrics::Stats,
) -> Result<(), Reject> {
    use crate::http::{Head, Method};
    if !matches!(ex.request.method, Method::Get | Method::Post | Method::Put) {
        return Err(Reject::method_not_allowed("GET, POST, PUT, OPTIONS"));
    }
    let namespace = crate::route::notify_namespace(&routed.path).to_owned();
    // Before the body is read: a relay without backends parses nothing.
    let backends = notifications.backends(&namespace);
    if backends.is_empty() {
        let whose = if namespace.is_empty() {
            "this relay".to_owned()
        } else {
            format!("namespace {namespace}")
        };
        return Err(Reject::new(
            503,
            format!(
                "no notification backend is configured for {whose} (the access file's [notify])"
            ),
        ));
    }
    let too_large = || {
        Reject::new(
            413,
            format!("a notification takes at most {MAX_MESSAGE} bytes"),
        )
    };
    if ex.body_length().is_some_and(|n| n > MAX_MESSAGE as u64) {
        ex.close();
        return Err(too_large());
    }
    let mut body = Vec::new();
    if let Err(error) = (&mut *ex)
        .take(MAX_MESSAGE as u64 + 1)
        .read_to_end(&mut body)
    {
        ex.close();
        return match crate::http::body::refusal_for(&error) {
            Some(reject) => Err(reject),
            None => Err(Reject::hung_up()),
        };
    }
    if body.len() > MAX_MESSAGE {
        ex.close();
        return Err(too_large());
    }
    let content_type = ex.request.header("content-type").map(str::to_owned);
    let message = Message::parse(content_type.as_deref(), &body, &routed.query)?;
    if let Some(reason) = backends.iter().find_map(|b| b.refuses(&message)) {
        return Err(Reject::bad_request(reason));
    }
    let outcomes = notifier.deliver(backends, &message, &namespace);
    let mut sent = Vec::new();
    let mut failed = Vec::new();
    for (backend, outcome) in backends.iter().zip(&outcomes) {
        stats.notified(*outcome == Outcome::Sent);
        match outcome {
            Outcome::Sent => sent.push(json!(backend.name)),
            Outcome::Refused(status) => {
                log::warn!("notification: {} answered {status}", backend.name);
                failed.push(json!({"backend": backend.name, "status": status}));
            }
            Outcome::Failed(reason) => {
                log::warn!("notification: {} failed: {reason}", backend.name);
                failed.push(json!({"backend": backend.name, "error": reason}));
            }
        }
    }
    let (status, answer) = if failed.is_empty() {
        log::info!(
            "notification{} sent to {} backends",
            if namespace.is_empty() {
                String::new()
            } else {
                format!(" for {}", crate::mode::short(&namespace))
            },
            sent.len()
        );
        (200, json!({"status": "sent", "backends": sent}))
    } else {
        (
            502,
            json!({"status": "failed", "backends": sent, "failed": failed}),
        )
    };
    let mut head = Head::new(status);
    head.header("Content-Type", "application/json")
        .header("Cache-Control", "no-store");
    let body = format!("{answer}\n");
    ex.respond(head, body.as_bytes()).map_err(|_| {
        ex.close();
        Reject::hung_up()
    })
}

/// What became of a message at one backend.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// A 2xx.
    Sent,
    /// Another status.
    Refused(u16),
    /// No answer: unreachable, timed out, TLS failed; the reason names no URL.
    Failed(String),
}

/// Sends messages, each request on a new connection (TLS for https) that
/// ends within the notify timeout.
pub struct Notifier {
    timeout: Duration,
}

impl Notifier {
    /// A notifier whose requests each end within `timeout`.
    pub fn new(timeout: Duration) -> Notifier {
        Notifier { timeout }
    }

    /// Sends `message` to every backend at once, each on its own thread
    /// (which also renders it: markdown is the client's, and rendering it
    /// wants more stack than a connection thread has), and returns what
    /// became of it at each, in the backends' order, within the timeout
    /// (a backend whose name takes longer to look up is left to finish
    /// alone, and counts as failed).
    pub fn deliver(
        &self,
        backends: &[Backend],
        message: &Message,
        namespace: &str,
    ) -> Vec<Outcome> {
        let txn = crate::random::hex(16).unwrap_or_else(|_| {
            let now = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap_or_default();
            format!("{}", now.as_nanos())
        });
        let deadline = std::time::Instant::now() + self.timeout + Duration::from_millis(500);
        let message = std::sync::Arc::new(message.clone());
        let (done, outcomes) = crossbeam_channel::bounded(backends.len());
        let mut results: Vec<Option<Outcome>> = vec![None; backends.len()];
        for (i, backend) in backends.iter().enumerate() {
            let (backend, message, done) = (
                backend.clone(),
                std::sync::Arc::clone(&message),
                done.clone(),
            );
            let (namespace, txn, timeout) = (namespace.to_owned(), txn.clone(), self.timeout);
            let spawned = std::thread::Builder::new()
                .name("notify".into())
                .stack_size(1 << 20)
                .spawn(move || {
                    let outgoing = backend.request(&message, &namespace, &txn);
                    let _ = done.send((i, send(&outgoing, &backend.trust, timeout)));
                });
            if let Err(e) = spawned {
                results[i] = Some(Outcome::Failed(format!("cannot start a thread: {e}")));
            }
        }
        drop(done);
        while results.iter().any(Option::is_none) {
            match outcomes.recv_deadline(deadline) {
                Ok((i, outcome)) => results[i] = Some(outcome),
                Err(_) => break,
            }
        }
        results
            .into_iter()
            .map(|r| {
                r.unwrap_or_else(|| Outcome::Failed(format!("no answer within {:?}", self.timeout)))
            })
            .collect()
    }
}

/// Sends one request and reads its answer's status, within `timeout`.
fn send(outgoing: &Outgoing, trust: &crate::remote::Trust, timeout: Duration) -> Outcome {
    let url = match crate::remote::Url::parse(&outgoing.url, &["http", "https"]) {
        Ok(url) => url,
        Err(why) => return Outcome::Failed(format!("the URL {why}")),
    };
    match crate::remote::request(
        outgoing.method,
        &url,
        trust,
        &outgoing.headers,
        &outgoing.body,
        timeout,
    ) {
        Ok(status) if (200..300).contains(&status) => Outcome::Sent,
        Ok(status) => Outcome::Refused(status),
        Err(reason) => Outcome::Failed(reason),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn query(target: &str) -> Query {
        let request = crate::http::Request::fake(crate::http::Method::Post, target, &[]);
        crate::route::route(&request).unwrap().query
    }

    fn parse(content_type: Option<&str>, body: &str, target: &str) -> Result<Message, Reject> {
        Message::parse(content_type, body.as_bytes(), &query(target))
    }

    #[test]
    fn every_input_form_gives_the_same_message() {
        let expected = Message {
            title: Some("Backup".to_owned()),
            text: "done *ok*".to_owned(),
            format: Format::Markdown,
            room: Some("!r:x".to_owned()),
            priority: None,
            tags: Vec::new(),
        };
        let json = r#"{"title":"Backup","message":"done *ok*","type":"markdown","room":"!r:x"}"#;
        assert_eq!(
            parse(Some("application/json"), json, "/_/notify").unwrap(),
            expected
        );
        let form = "title=Backup&message=done+%2Aok%2A&type=markdown&room=%21r%3Ax";
        assert_eq!(
            parse(Some("application/x-www-form-urlencoded"), form, "/_/notify").unwrap(),
            expected
        );
        let target = "/_/notify?title=Backup&body=done%20*ok*&type=markdown&room=!r:x";
        assert_eq!(parse(None, "", target).unwrap(), expected);
        let target = "/_/notify?title=Backup&type=markdown&room=!r:x";
        assert_eq!(
            parse(Some("text/plain"), "done *ok*", target).unwrap(),
            expected
        );
        // What `curl -d` sends: a "form" that is the text.
        let form = "application/x-www-form-urlencoded";
        let plain = parse(Some(form), "backup done", "/_/notify?title=B").unwrap();
        assert_eq!(
            (plain.text.as_str(), plain.title.as_deref()),
            ("backup done", Some("B"))
        );
        let plain = parse(Some(form), "50% done & a=b", "/_/notify").unwrap();
        assert_eq!(plain.text, "50% done & a=b");
        let plain = parse(None, "backup done", "/_/notify").unwrap();
        assert_eq!(
            (plain.text.as_str(), plain.format, plain.title),
            ("backup done", Format::Plain, None)
        );
    }

    #[test]
    fn bad_input_is_refused() {
        for (content_type, body, target) in [
            (None, "", "/_/notify"),
            (None, "  \n", "/_/notify"),
            (Some("application/json"), "{\"title\":\"x\"}", "/_/notify"),
            (Some("application/json"), "[1]", "/_/notify"),
            (Some("application/json"), "{", "/_/notify"),
            (None, "hi", "/_/notify?type=rtf"),
            (None, "hi", "/_/notify?priority=9"),
        ] {
            assert_eq!(
                parse(content_type, body, target).map_err(|r| r.status),
                Err(400),
                "{body} {target}"
            );
        }
        let bytes = [0xffu8, 0xfe];
        assert!(Message::parse(None, &bytes, &query("/_/notify")).is_err());
    }

    fn has(headers: &[(String, String)], name: &str, value: &str) -> bool {
        headers.iter().any(|(n, v)| n == name && v == value)
    }

    fn backends(toml_text: &str) -> Result<Notifications, String> {
        let raw: RawNotify = toml::from_str(toml_text).map_err(|e| e.to_string())?;
        raw.check()
    }

    #[test]
    fn each_backend_gets_what_its_api_expects() {
        let notifications = backends(
            r#"
            [[matrix]]
            homeserver = "http://127.0.0.1:8008/"
            access_token = "syt_secret"
            room = "!abc:example.org"
            [[ntfy]]
            server = "http://127.0.0.1:8080"
            topic = "alerts"
            token = "tk_secret"
            priority = "high"
            tags = ["floppy_disk"]
            [[webhook]]
            url = "http://127.0.0.1:9000/hook"
            headers = { X-Secret = "s3" }
            "#,
        )
        .unwrap();
        let all = notifications.backends("");
        assert_eq!(
            all.iter().map(|b| b.name.as_str()).collect::<Vec<_>>(),
            [
                "matrix 127.0.0.1:8008",
                "ntfy 127.0.0.1:8080",
                "webhook 127.0.0.1:9000"
            ]
        );
        let message = Message {
            title: Some("Backup ✓".to_owned()),
            text: "**done**".to_owned(),
            format: Format::Markdown,
            room: None,
            priority: None,
            tags: vec!["tada".to_owned()],
        };
        let matrix = all[0].request(&message, "", "t1");
        assert_eq!(matrix.method, "PUT");
        assert_eq!(
            matrix.url,
            "http://127.0.0.1:8008/_matrix/client/v3/rooms/%21abc%3Aexample.org/send/m.room.message/t1"
        );
        assert!(has(&matrix.headers, "Authorization", "Bearer syt_secret"));
        let content: serde_json::Value = serde_json::from_slice(&matrix.body).unwrap();
        assert_eq!(content["msgtype"], "m.text");
        assert_eq!(content["body"], "Backup ✓\n**done**");
        assert_eq!(content["format"], "org.matrix.custom.html");
        assert_eq!(
            content["formatted_body"],
            "<strong>Backup ✓</strong><br>\n<p><strong>done</strong></p>"
        );
        let ntfy = all[1].request(&message, "", "t1");
        assert_eq!(
            (ntfy.method, ntfy.url.as_str()),
            ("POST", "http://127.0.0.1:8080/alerts")
        );
        assert_eq!(ntfy.body, b"**done**");
        for (name, value) in [
            ("Title", "=?UTF-8?B?QmFja3VwIOKckw==?="),
            ("Priority", "4"),
            ("Tags", "floppy_disk,tada"),
            ("Markdown", "yes"),
            ("Authorization", "Bearer tk_secret"),
        ] {
            assert!(
                has(&ntfy.headers, name, value),
                "{name} in {:?}",
                ntfy.headers
            );
        }
        let hook = all[2].request(&message, "/u/alice", "t1");
        assert!(has(&hook.headers, "X-Secret", "s3"));
        let object: serde_json::Value = serde_json::from_slice(&hook.body).unwrap();
        assert_eq!(object["message"], "**done**");
        assert_eq!(object["type"], "markdown");
        assert_eq!(object["namespace"], "/u/alice");
        // A Debug of the backends shows no name but the file's own.
        assert!(notifications.backends("/u/alice").is_empty());
    }

    #[test]
    fn html_becomes_text_where_a_backend_has_no_html() {
        assert_eq!(
            html_text("<p>Disk <b>full</b> &amp; hot</p><p>act&lt;now&gt;</p>"),
            "Disk full & hot\nact<now>"
        );
        let message = Message {
            title: None,
            text: "<i>hi</i><br>there".to_owned(),
            format: Format::Html,
            room: Some("!other:x".to_owned()),
            priority: Some(1),
            tags: Vec::new(),
        };
        let matrix = Backend {
            name: "m".to_owned(),
            trust: crate::remote::Trust::builtin(),
            kind: Kind::Matrix(Matrix {
                name: None,
                cacert: None,
                homeserver: "https://m.org".to_owned(),
                access_token: "t".to_owned(),
                room: "!mine:x".to_owned(),
                rooms: vec!["!other:x".to_owned()],
            }),
        }
        .request(&message, "", "t2");
        assert!(matrix.url.contains("/rooms/%21other%3Ax/"));
        let content: serde_json::Value = serde_json::from_slice(&matrix.body).unwrap();
        assert_eq!(content["body"], "hi\nthere");
        assert_eq!(content["formatted_body"], "<i>hi</i><br>there");
    }

    #[test]
    fn bad_backend_tables_are_refused() {
        for bad in [
            "[[matrix]]\nhomeserver = \"ftp://x\"\naccess_token = \"t\"\nroom = \"!r\"",
            "[[matrix]]\nhomeserver = \"http://u:p@x\"\naccess_token = \"t\"\nroom = \"!r\"",
            "[[matrix]]\nhomeserver = \"http://x\"\naccess_token = \"\"\nroom = \"!r\"",
            "[[ntfy]]\ntopic = \"a/b\"",
            "[[ntfy]]\ntopic = \"a\"\nuser = \"u\"",
            "[[ntfy]]\ntopic = \"a\"\npriority = \"loud\"",
            "[[webhook]]\nurl = \"http://x\"\nheaders = { \"Bad Name\" = \"v\" }",
            "[[webhook]]\nurl = \"http://x\"\nsecret = \"v\"",
            "[[webhook]]\nurl = \"http://x\"\nheaders = { Content-Length = \"1\" }",
            "[namespace.\"/\"]\n[[namespace.\"/\".webhook]]\nurl = \"http://x\"",
            "[[pager]]\nurl = \"http://x\"",
        ] {
            assert!(backends(bad).is_err(), "{bad}");
        }
        let n = backends("[[namespace.\"u/alice/\".webhook]]\nurl = \"http://x/h\"").unwrap();
        assert_eq!(n.backends("/u/alice").len(), 1);
        assert!(n.backends("").is_empty());
        assert_eq!(n.count(), 1);
    }
}
