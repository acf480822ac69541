//! Access control (DESIGN.md §7): the `--auth` file's tokens, each a table
//! of path globs per method, and [`Access::check`], which every channel
//! request (and every notification) passes once, in `app.rs`, on its
//! routed (normalized) path; each table's `tunnel` targets, which
//! [`Access::tunnel`] checks; and the file's `[notify]` backends, read with
//! it (their meaning is `notify.rs`'s).
//! Tokens are known by their SHA-256 digests and compared in constant time;
//! the file is re-read on SIGHUP, and a bad new file keeps the old rules.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use ctutils::CtEq;
use serde::Deserialize;
use sha2::{Digest, Sha256};

use crate::error::Reject;
use crate::http::Method;
use crate::notify::{Notifications, RawNotify};
use crate::route::{Action, Credential, Endpoint, Route, Routed, Target};

/// The method keys a table may have, in the order of [`Table::grants`];
/// `"*"` (every method) is kept apart.
const METHODS: [Method; 7] = [
    Method::Get,
    Method::Head,
    Method::Post,
    Method::Put,
    Method::Patch,
    Method::Delete,
    Method::Options,
];

/// The table a request without a credential is checked against.
const PUBLIC: &str = "public";

/// The relay's access rules, replaced whole when the file is re-read.
pub struct Access {
    /// The file, when `--auth` was given; without it everything is public.
    file: Option<PathBuf>,
    rules: RwLock<Arc<Rules>>,
}

/// One reading of the access file.
#[derive(Debug, Default)]
pub struct Rules {
    /// `[tokens.public]`, for requests that carry no credential.
    public: Table,
    /// Every other table, each with its token's digest.
    tokens: Vec<(Table, [u8; 32])>,
    /// The `[notify]` backends.
    notifications: Arc<Notifications>,
}

/// What one table grants: path globs per method.
#[derive(Debug, Default)]
struct Table {
    /// The table's name: a label for logs, never the secret.
    label: String,
    /// Globs per method, in the order of [`METHODS`].
    grants: [Vec<Glob>; METHODS.len()],
    /// Globs of `"*"`, for every method.
    any: Vec<Glob>,
    /// `tunnel = [...]`: the targets of `/_/tunnel` this table may reach.
    tunnel: Vec<TargetGlob>,
}

/// Why a request may not go on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Denial {
    /// No credential, and the public table lacks the permission (401).
    NoCredential,
    /// A credential no table knows (401, never a fall-back to public).
    UnknownToken,
    /// A known token without the permission (403).
    Forbidden,
    /// A tunnel asked of a relay without an access file (403).
    NoTunnels,
}

impl Denial {
    /// The refusal a client gets: it names neither the token nor the rule.
    pub fn reject(self) -> Reject {
        match self {
            Denial::NoCredential => Reject::new(
                401,
                "this path needs an access token (Patch-Token, ?token= or Authorization: Bearer)",
            )
            .with_header("WWW-Authenticate", "Bearer realm=\"patchcord\""),
            Denial::UnknownToken => Reject::new(401, "the access token is not valid").with_header(
                "WWW-Authenticate",
                "Bearer realm=\"patchcord\", error=\"invalid_token\"",
            ),
            Denial::Forbidden => Reject::new(403, "the access token does not allow this here"),
            Denial::NoTunnels => Reject::new(
                403,
                "tunnels are off: only an access file (--auth) can list their targets",
            ),
        }
    }
}

/// An error in the access file: where, and what.
#[derive(Debug)]
pub struct FileError {
    pub file: PathBuf,
    /// 1-based; 0 when the file could not be read at all.
    pub line: usize,
    pub message: String,
}

impl fmt::Display for FileError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.line == 0 {
            write!(f, "{}: {}", self.file.display(), self.message)
        } else {
            write!(f, "{}:{}: {}", self.file.display(), self.line, self.message)
        }
    }
}

impl std::error::Error for FileError {}

impl Access {
    /// The rules of `file`, or everything public without one.
    pub fn open(file: Option<&Path>) -> Result<Access, FileError> {
        let rules = match file {
            Some(file) => Rules::read(file)?,
            None => Rules::default(),
        };
        Ok(Access {
            file: file.map(Path::to_path_buf),
            rules: RwLock::new(Arc::new(rules)),
        })
    }

    /// Whether an access file is in force (then `Authorization: Bearer` is
    /// the relay's credential, and never travels).
    pub fn is_on(&self) -> bool {
        self.file.is_some()
    }

    /// Re-reads the file: a valid one takes effect for the next request; an
    /// invalid one is logged, with its line, and the old rules stay.
    pub fn reload(&self) {
        let Some(file) = &self.file else {
            log::info!("SIGHUP: no --auth file to re-read");
            return;
        };
        match Rules::read(file) {
            Ok(rules) => {
                let count = rules.tokens.len();
                let backends = rules.notifications.count();
                *self.rules.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(rules);
                log::info!(
                    "re-read {}: {count} tokens, {backends} notification backends",
                    file.display()
                );
            }
            Err(error) => log::error!("{error}; the rules read before stay in force"),
        }
    }

    /// Checks `routed` against the rules: Ok with the label of the table
    /// that allowed it (None when no file is in force or no check applies).
    pub fn check(&self, routed: &Routed) -> Result<Option<String>, (Denial, Option<String>)> {
        if self.file.is_none() {
            return Ok(None);
        }
        let Some(method) = needed(routed) else {
            return Ok(None);
        };
        let rules = Arc::clone(&self.rules.read().unwrap_or_else(|p| p.into_inner()));
        let path = routed.path.as_str();
        match &routed.credential.token {
            None if rules.public.allows(method, path) => Ok(Some(PUBLIC.to_owned())),
            None => Err((Denial::NoCredential, None)),
            Some((token, _)) => match rules.find(token.expose()) {
                None => Err((Denial::UnknownToken, None)),
                Some(table) if table.allows(method, path) => Ok(Some(table.label.clone())),
                Some(table) => Err((Denial::Forbidden, Some(table.label.clone()))),
            },
        }
    }
}

impl Access {
    /// Whether the client of `credential` may open a tunnel to `target`:
    /// Ok with the table's label. Only a table's `tunnel` list allows one;
    /// without an access file no tunnel is allowed at all.
    pub fn tunnel(
        &self,
        credential: &Credential,
        target: &Target,
    ) -> Result<String, (Denial, Option<String>)> {
        if self.file.is_none() {
            return Err((Denial::NoTunnels, None));
        }
        let rules = Arc::clone(&self.rules.read().unwrap_or_else(|p| p.into_inner()));
        match &credential.token {
            None if rules.public.reaches(target) => Ok(PUBLIC.to_owned()),
            None => Err((Denial::NoCredential, None)),
            Some((token, _)) => match rules.find(token.expose()) {
                None => Err((Denial::UnknownToken, None)),
                Some(table) if table.reaches(target) => Ok(table.label.clone()),
                Some(table) => Err((Denial::Forbidden, Some(table.label.clone()))),
            },
        }
    }

    /// The notification backends of the reading in force.
    pub fn notifications(&self) -> Arc<Notifications> {
        let rules = self.rules.read().unwrap_or_else(|p| p.into_inner());
        Arc::clone(&rules.notifications)
    }

    /// Which of `paths` the client of `credential` may GET, when a file is
    /// in force (None without one): for listing channels. An unknown token
    /// may GET nothing.
    pub fn readable(&self, credential: &Credential, paths: &[&str]) -> Option<Vec<bool>> {
        self.file.as_ref()?;
        let rules = Arc::clone(&self.rules.read().unwrap_or_else(|p| p.into_inner()));
        let table = match &credential.token {
            None => Some(&rules.public),
            Some((token, _)) => rules.find(token.expose()),
        };
        Some(
            paths
                .iter()
                .map(|path| table.is_some_and(|t| t.allows(&Method::Get, path)))
                .collect(),
        )
    }
}

/// The permission a request needs: its own method on its path, except that
/// a send by GET (`?body=`) needs POST and a responder needs POST. None for
/// what the file does not govern: preflights, endpoints, hooks.
fn needed(routed: &Routed) -> Option<&Method> {
    match &routed.route {
        Route::Channel { channel: _, action } => Some(match action {
            Action::Send if routed.method == Method::Get => &Method::Post,
            Action::Respond => &Method::Post,
            _ => &routed.method,
        }),
        // A notification is a send, whatever its method (GET takes a query).
        Route::Endpoint(Endpoint::Notify) => Some(&Method::Post),
        Route::Preflight | Route::Endpoint(_) | Route::Hook { .. } => None,
    }
}

impl Rules {
    /// Reads and checks `file`.
    fn read(file: &Path) -> Result<Rules, FileError> {
        let text = std::fs::read_to_string(file).map_err(|e| FileError {
            file: file.to_path_buf(),
            line: 0,
            message: format!("cannot read the access file: {e}"),
        })?;
        Rules::parse(&text).map_err(|(offset, message)| FileError {
            file: file.to_path_buf(),
            line: offset.map_or(0, |at| line_of(&text, at)),
            message,
        })
    }

    /// Parses the text of an access file; an error comes with the byte
    /// offset it was found at.
    fn parse(text: &str) -> Result<Rules, (Option<usize>, String)> {
        let file: RawFile = toml::from_str(text)
            .map_err(|e| (e.span().map(|s| s.start), e.message().to_owned()))?;
        let mut rules = Rules::default();
        for (label, raw) in file.tokens {
            let at = Some(raw.span().start);
            let raw = raw.into_inner();
            let table = raw.table(&label);
            let digest = match (&raw.token, &raw.sha256) {
                (None, None) if label == PUBLIC => {
                    rules.public = table;
                    continue;
                }
                (_, _) if label == PUBLIC => {
                    return Err((at, "[tokens.public] takes no token or sha256".to_owned()));
                }
                (Some(token), None) if !token.is_empty() => Sha256::digest(token.as_bytes()).into(),
                (None, Some(hex)) => crate::hex::decode32(hex).ok_or_else(|| {
                    (
                        at,
                        format!("[tokens.{label}]: sha256 must be 64 hexadecimal digits"),
                    )
                })?,
                _ => {
                    return Err((
                        at,
                        format!(
                            "[tokens.{label}] needs exactly one of token (not empty) or sha256"
                        ),
                    ));
                }
            };
            if rules.tokens.iter().any(|(_, d)| *d == digest) {
                return Err((
                    at,
                    format!("[tokens.{label}]: the same token as another table"),
                ));
            }
            rules.tokens.push((table, digest));
        }
        if let Some(notify) = file.notify {
            rules.notifications = Arc::new(notify.check().map_err(|message| (None, message))?);
        }
        Ok(rules)
    }

    /// The table whose token is `presented`: every digest is compared, in
    /// constant time, whichever matches.
    fn find(&self, presented: &str) -> Option<&Table> {
        let digest: [u8; 32] = Sha256::digest(presented.as_bytes()).into();
        let mut found = None;
        for (table, known) in &self.tokens {
            if known.ct_eq(&digest).to_bool() {
                found = Some(table);
            }
        }
        found
    }
}

impl Table {
    /// Whether this table lets `method` reach `path`: some allow matches
    /// and no deny does. GET grants HEAD too (a HEAD is a GET without body).
    fn allows(&self, method: &Method, path: &str) -> bool {
        let Some(path) = path.strip_prefix('/') else {
            return false;
        };
        let segments: Vec<&str> = path.split('/').collect();
        let index = METHODS.iter().position(|known| known == method);
        let own = index.map_or(&[][..], |i| &self.grants[i][..]);
        // GET grants HEAD too (a HEAD is a GET without its body).
        let get = if *method == Method::Head {
            &self.grants[0][..]
        } else {
            &[][..]
        };
        let globs = || self.any.iter().chain(own).chain(get);
        if globs().any(|g| g.deny && g.matches_segments(&segments)) {
            return false;
        }
        globs().any(|g| !g.deny && g.matches_segments(&segments))
    }
}

impl Table {
    /// Whether this table's `tunnel` list reaches `target`.
    fn reaches(&self, target: &Target) -> bool {
        self.tunnel.iter().any(|glob| glob.matches(target))
    }
}

/// A glob on a tunnel's `host:port`; a port is a number or `*`. A host
/// made of digits, dots and `*` is an IPv4 pattern: it matches addresses
/// only, `*` within one number (`10.0.0.*`); one in brackets is an IPv6
/// pattern (`[::1]`, `[fd00:*:*:*:*:*:*:*]`, `*` within one group of the
/// address's usual spelling); any other is a name pattern, whose `*`
/// matches any run of characters, dots included (`*.lan`), compared
/// without case with the name as the path writes it (resolved when
/// dialled). `*` alone matches every host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TargetGlob {
    host: String,
    kind: HostKind,
    /// None for `*`.
    port: Option<u16>,
}

/// What a tunnel glob's host matches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum HostKind {
    Ipv4,
    Ipv6,
    Name,
}

impl TryFrom<String> for TargetGlob {
    type Error = String;

    fn try_from(text: String) -> Result<TargetGlob, String> {
        let refuse = || {
            format!(
                "tunnel target {text:?} must be host:port (a glob such as \"*.lan:22\", \"[::1]:*\")"
            )
        };
        let (host, port) = match text.strip_prefix('[') {
            Some(rest) => {
                let (host, port) = rest.split_once("]:").ok_or_else(refuse)?;
                if !host
                    .bytes()
                    .all(|b| b.is_ascii_hexdigit() || b == b':' || b == b'*' || b == b'.')
                {
                    return Err(refuse());
                }
                (host, port)
            }
            None => {
                let (host, port) = text.rsplit_once(':').ok_or_else(refuse)?;
                let fits = host
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-._*".contains(&b));
                if !fits {
                    return Err(refuse());
                }
                (host, port)
            }
        };
        if host.is_empty() {
            return Err(refuse());
        }
        let port = match port {
            "*" => None,
            digits => Some(
                digits
                    .parse::<u16>()
                    .ok()
                    .filter(|&p| p > 0 && digits.bytes().all(|b| b.is_ascii_digit()))
                    .ok_or_else(refuse)?,
            ),
        };
        let bracketed = text.starts_with('[');
        let kind = if bracketed {
            HostKind::Ipv6
        } else if host != "*"
            && host
                .bytes()
                .all(|b| b.is_ascii_digit() || b == b'.' || b == b'*')
        {
            if host.split('.').count() != 4 {
                return Err(refuse());
            }
            HostKind::Ipv4
        } else {
            HostKind::Name
        };
        let host = match kind {
            // One spelling per address, as targets have.
            HostKind::Ipv6 if !host.contains('*') => host
                .parse::<std::net::Ipv6Addr>()
                .map_err(|_| refuse())?
                .to_string(),
            _ => host.to_ascii_lowercase(),
        };
        Ok(TargetGlob { host, kind, port })
    }
}

impl<'de> Deserialize<'de> for TargetGlob {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<TargetGlob, D::Error> {
        let text = String::deserialize(deserializer)?;
        TargetGlob::try_from(text).map_err(serde::de::Error::custom)
    }
}

impl TargetGlob {
    /// Whether `target` matches.
    fn matches(&self, target: &Target) -> bool {
        if self.port.is_some_and(|port| port != target.port) {
            return false;
        }
        let pieces = |glob: &str, host: &str, separator: char| {
            let glob: Vec<&str> = glob.split(separator).collect();
            let host: Vec<&str> = host.split(separator).collect();
            glob.len() == host.len()
                && glob
                    .iter()
                    .zip(&host)
                    .all(|(g, h)| match_segment(g.as_bytes(), h.as_bytes()))
        };
        match self.kind {
            HostKind::Ipv4 => {
                target.host.parse::<std::net::Ipv4Addr>().is_ok()
                    && pieces(&self.host, &target.host, '.')
            }
            HostKind::Ipv6 => target.is_ipv6() && pieces(&self.host, &target.host, ':'),
            HostKind::Name => match_segment(self.host.as_bytes(), target.host.as_bytes()),
        }
    }
}

/// A path glob: `*` matches within one segment, `**` any number of whole
/// segments (so `/x/**` matches `/x` itself), a leading `!` denies.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Glob {
    deny: bool,
    /// The segments after the leading `/`.
    segments: Vec<String>,
}

impl TryFrom<String> for Glob {
    type Error = String;

    fn try_from(text: String) -> Result<Glob, String> {
        let (deny, pattern) = match text.strip_prefix('!') {
            Some(rest) => (true, rest),
            None => (false, text.as_str()),
        };
        let Some(pattern) = pattern.strip_prefix('/') else {
            return Err(format!("path glob {text:?} must start with / (or !/)"));
        };
        let segments: Vec<String> = pattern.split('/').map(str::to_owned).collect();
        if segments.iter().any(|s| s.contains("**") && s != "**") {
            return Err(format!(
                "path glob {text:?}: ** must be a whole segment (/x/**, not /x**)"
            ));
        }
        if segments.iter().any(|s| s.chars().any(char::is_control)) {
            return Err(format!("path glob {text:?} has a control character"));
        }
        Ok(Glob { deny, segments })
    }
}

impl Glob {
    /// Whether the normalized `path` matches.
    #[cfg(test)]
    pub fn matches(&self, path: &str) -> bool {
        let Some(path) = path.strip_prefix('/') else {
            return false;
        };
        let path: Vec<&str> = path.split('/').collect();
        self.matches_segments(&path)
    }

    /// Whether a path, as its segments after the leading `/`, matches.
    fn matches_segments(&self, segments: &[&str]) -> bool {
        match_segments(&self.segments, segments)
    }
}

/// Matches glob segments against path segments; `**` takes any number of
/// them, none included. The two-pointer wildcard match over segments
/// (`**` as the star): on a mismatch it returns to the last `**` and lets
/// it take one more segment, so the work is at most segments × globs,
/// whatever the number of `**` (a client's path cannot make it explode).
fn match_segments(glob: &[String], path: &[&str]) -> bool {
    let (mut g, mut p) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while p < path.len() {
        if g < glob.len() && glob[g] == "**" {
            star = Some((g, p));
            g += 1;
        } else if g < glob.len() && match_segment(glob[g].as_bytes(), path[p].as_bytes()) {
            g += 1;
            p += 1;
        } else if let Some((star_g, star_p)) = star {
            g = star_g + 1;
            p = star_p + 1;
            star = Some((star_g, star_p + 1));
        } else {
            return false;
        }
    }
    glob[g..].iter().all(|s| s == "**")
}

/// Matches one segment against a pattern whose `*` matches any run of
/// characters (none included) within the segment.
fn match_segment(pattern: &[u8], text: &[u8]) -> bool {
    // The classic two-pointer wildcard match: linear, no recursion.
    let (mut p, mut t) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while t < text.len() {
        if p < pattern.len() && pattern[p] == b'*' {
            star = Some((p, t));
            p += 1;
        } else if p < pattern.len() && pattern[p] == text[t] {
            p += 1;
            t += 1;
        } else if let Some((star_p, star_t)) = star {
            p = star_p + 1;
            t = star_t + 1;
            star = Some((star_p, star_t + 1));
        } else {
            return false;
        }
    }
    pattern[p..].iter().all(|&b| b == b'*')
}

/// The 1-based line of byte `offset` in `text`.
fn line_of(text: &str, offset: usize) -> usize {
    text.as_bytes()[..offset.min(text.len())]
        .iter()
        .filter(|&&b| b == b'\n')
        .count()
        + 1
}

/// The file as written.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    #[serde(default)]
    tokens: BTreeMap<String, toml::Spanned<RawTable>>,
    /// Notification backends (`notify.rs`).
    #[serde(default)]
    notify: Option<RawNotify>,
}

/// One `[tokens.<label>]` table as written.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTable {
    token: Option<String>,
    sha256: Option<String>,
    #[serde(rename = "GET", default)]
    get: Vec<Glob>,
    #[serde(rename = "HEAD", default)]
    head: Vec<Glob>,
    #[serde(rename = "POST", default)]
    post: Vec<Glob>,
    #[serde(rename = "PUT", default)]
    put: Vec<Glob>,
    #[serde(rename = "PATCH", default)]
    patch: Vec<Glob>,
    #[serde(rename = "DELETE", default)]
    delete: Vec<Glob>,
    #[serde(rename = "OPTIONS", default)]
    options: Vec<Glob>,
    #[serde(rename = "*", default)]
    any: Vec<Glob>,
    /// Targets of `/_/tunnel`.
    #[serde(default)]
    tunnel: Vec<TargetGlob>,
}

impl<'de> Deserialize<'de> for Glob {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Glob, D::Error> {
        let text = String::deserialize(deserializer)?;
        Glob::try_from(text).map_err(serde::de::Error::custom)
    }
}

impl RawTable {
    /// The grants of this table, labelled `label`.
    fn table(&self, label: &str) -> Table {
        Table {
            label: label.to_owned(),
            grants: [
                self.get.clone(),
                self.head.clone(),
                self.post.clone(),
                self.put.clone(),
                self.patch.clone(),
                self.delete.clone(),
                self.options.clone(),
            ],
            any: self.any.clone(),
            tunnel: self.tunnel.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::http::Request;

    fn glob(text: &str) -> Glob {
        Glob::try_from(text.to_owned()).unwrap()
    }

    #[test]
    fn globs_match_within_and_across_segments() {
        let cases: &[(&str, &str, bool)] = &[
            ("/public/**", "/public", true),
            ("/public/**", "/public/", true),
            ("/public/**", "/public/a/b/c", true),
            ("/public/**", "/publicx", false),
            ("/public/**", "/x/public/a", false),
            ("/u/*/pub/**", "/u/alice/pub/x", true),
            ("/u/*/pub/**", "/u/alice/bob/pub/x", false),
            ("/u/*", "/u/alice", true),
            ("/u/*", "/u/alice/x", false),
            ("/jobs", "/jobs", true),
            ("/jobs", "/jobs/", false),
            ("/job*", "/jobs", true),
            ("/*.txt", "/a.txt", true),
            ("/*.txt", "/a/b.txt", false),
            ("/a*b*c", "/abxxc", true),
            ("/a*b*c", "/acb", false),
            ("/**", "/", true),
            ("/**", "/anything/at/all", true),
            ("/**/x", "/a/b/x", true),
            ("/**/x", "/x", true),
            ("/a/**/z", "/a/z", true),
            ("/a/**/z", "/a/b/c/z", true),
            ("/a/**/z", "/a/b/c/y", false),
        ];
        for (pattern, path, expected) in cases {
            assert_eq!(
                glob(pattern).matches(path),
                *expected,
                "{pattern} on {path}"
            );
        }
    }

    #[test]
    fn many_double_stars_on_a_long_path_stay_cheap() {
        let g = glob("/**/a/**/a/**/a/**/a/**/b");
        // Backtracking into every `**` would never finish here.
        let path = format!("/{}", vec!["a"; 4000].join("/"));
        assert!(!g.matches(&path));
        assert!(g.matches(&format!("{path}/b")));
    }

    #[test]
    fn bad_globs_are_refused() {
        for bad in ["public/**", "/x**", "/**y/z", "!x", ""] {
            assert!(Glob::try_from(bad.to_owned()).is_err(), "{bad}");
        }
        assert!(glob("!/u/alice/private/**").deny);
    }

    const FILE: &str = r#"
[tokens.public]
GET = ["/public/**", "/u/*/pub/**"]

[tokens.deploy]
token = "s3cret-plaintext"
POST = ["/u/alice/**", "!/u/alice/private/**"]
GET  = ["/u/alice/**"]

[tokens.admin]
sha256 = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"
"*" = ["/**"]
"#;

    fn access(text: &str) -> Access {
        Access {
            file: Some(PathBuf::from("test.toml")),
            rules: RwLock::new(Arc::new(Rules::parse(text).unwrap())),
        }
    }

    fn check(
        access: &Access,
        method: Method,
        target: &str,
        headers: &[(&str, &str)],
    ) -> Result<Option<String>, Denial> {
        let routed = crate::route::route(&Request::fake(method, target, headers)).unwrap();
        access.check(&routed).map_err(|(denial, _)| denial)
    }

    #[test]
    fn tables_allow_deny_wins_and_public_is_the_default() {
        let a = access(FILE);
        let deploy = [("Patch-Token", "s3cret-plaintext")];
        let ok = |label: &str| Ok(Some(label.to_owned()));
        assert_eq!(check(&a, Method::Get, "/public/x", &[]), ok("public"));
        assert_eq!(check(&a, Method::Head, "/public/x", &[]), ok("public"));
        assert_eq!(check(&a, Method::Get, "/u/bob/pub/feed", &[]), ok("public"));
        assert_eq!(
            check(&a, Method::Post, "/public/x", &[]),
            Err(Denial::NoCredential)
        );
        assert_eq!(
            check(&a, Method::Post, "/u/alice/jobs", &deploy),
            ok("deploy")
        );
        assert_eq!(
            check(&a, Method::Post, "/u/alice/private/x", &deploy),
            Err(Denial::Forbidden)
        );
        // A known token is checked against its own table, not public's.
        assert_eq!(
            check(&a, Method::Get, "/public/x", &deploy),
            Err(Denial::Forbidden)
        );
        assert_eq!(
            check(&a, Method::Get, "/x?token=wrong", &[]),
            Err(Denial::UnknownToken)
        );
        // "test" hashes to the admin digest; the digest itself is no token.
        assert_eq!(
            check(
                &a,
                Method::Delete,
                "/anything",
                &[("Authorization", "Bearer test")]
            ),
            ok("admin")
        );
        let digest = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08";
        assert_eq!(
            check(&a, Method::Get, &format!("/x?token={digest}"), &[]),
            Err(Denial::UnknownToken)
        );
    }

    #[test]
    fn sends_by_get_and_responders_need_post() {
        let a = access(FILE);
        let reader = [("Patch-Token", "reader")];
        let a2 = access(
            r#"
[tokens.reader]
token = "reader"
GET = ["/**"]
"#,
        );
        assert_eq!(
            check(&a2, Method::Get, "/jobs?body=hi", &reader),
            Err(Denial::Forbidden)
        );
        assert_eq!(
            check(&a2, Method::Get, "/jobs?method=post&body=hi", &reader),
            Err(Denial::Forbidden)
        );
        assert_eq!(
            check(&a2, Method::Get, "/res/site", &reader),
            Err(Denial::Forbidden)
        );
        assert!(check(&a2, Method::Get, "/req/site/x", &reader).is_ok());
        assert!(check(&a2, Method::Get, "/jobs", &reader).is_ok());
        // Preflights and endpoints are not this file's to refuse.
        assert!(check(&a, Method::Options, "/u/alice/x", &[]).is_ok());
        assert!(check(&a, Method::Get, "/status", &[]).is_ok());
        assert!(check(&a, Method::Post, "/h/abc", &[]).is_ok());
    }

    #[test]
    fn file_errors_name_the_line() {
        let cases: &[(&str, usize, &str)] = &[
            (
                "[tokens.a]\ntoken = \"x\"\nGET = [\"nope\"]\n",
                3,
                "must start with /",
            ),
            ("[tokens.a]\nGET = [\"/x\"]\n", 1, "exactly one of token"),
            (
                "\n[tokens.a]\ntoken = \"x\"\nsha256 = \"00\"\n",
                2,
                "exactly one of token",
            ),
            ("[tokens.a]\nsha256 = \"zz\"\n", 1, "64 hexadecimal"),
            ("[tokens.public]\ntoken = \"x\"\n", 1, "takes no token"),
            ("[tokens.a]\ntoken = \"x\"\nPOTS = []\n", 3, "unknown field"),
            ("[tokens.a\n", 1, ""),
            (
                "[tokens.a]\ntoken = \"x\"\n[tokens.b]\ntoken = \"x\"\n",
                3,
                "same token",
            ),
        ];
        for (text, line, words) in cases {
            let (at, message) = Rules::parse(text).unwrap_err();
            assert_eq!(line_of(text, at.unwrap_or(0)), *line, "{text:?}: {message}");
            assert!(message.contains(words), "{text:?}: {message}");
        }
    }

    #[test]
    fn tunnel_targets_are_globs_on_host_and_port() {
        let a = access(
            r#"
            [tokens.public]
            tunnel = ["public.lan:80"]
            [tokens.ops]
            token = "t"
            tunnel = ["*.LAN:22", "[::1]:*", "10.0.0.*:8080"]
            "#,
        );
        let reach = |token: Option<&str>, path: &str| {
            let target = crate::route::tunnel_target(path).unwrap();
            let credential = Credential {
                relay: false,
                token: token.map(|t| {
                    (
                        crate::route::Secret::fake(t),
                        crate::route::TokenSource::PatchToken,
                    )
                }),
                secret: None,
            };
            a.tunnel(&credential, &target).map_err(|(denial, _)| denial)
        };
        assert_eq!(
            reach(Some("t"), "/_/tunnel/pi.lan/22"),
            Ok("ops".to_owned())
        );
        assert_eq!(
            reach(Some("t"), "/_/tunnel/a.b.lan/22"),
            Ok("ops".to_owned())
        );
        assert_eq!(
            reach(Some("t"), "/_/tunnel/[::1]/5432"),
            Ok("ops".to_owned())
        );
        assert_eq!(
            reach(Some("t"), "/_/tunnel/10.0.0.7/8080"),
            Ok("ops".to_owned())
        );
        // An address pattern matches addresses only, `*` within a number.
        for elsewhere in [
            "/_/tunnel/10.0.0.1.127.0.0.1.nip.io/8080",
            "/_/tunnel/10.0.0.7.lan/8080",
        ] {
            assert_eq!(
                reach(Some("t"), elsewhere),
                Err(Denial::Forbidden),
                "{elsewhere}"
            );
        }
        assert_eq!(
            reach(Some("t"), "/_/tunnel/[0:0::1]/5432"),
            Ok("ops".to_owned())
        );
        assert_eq!(
            reach(Some("t"), "/_/tunnel/pi.lan/2222"),
            Err(Denial::Forbidden)
        );
        assert_eq!(reach(Some("t"), "/_/tunnel/lan/22"), Err(Denial::Forbidden));
        assert_eq!(
            reach(Some("t"), "/_/tunnel/public.lan/80"),
            Err(Denial::Forbidden)
        );
        assert_eq!(
            reach(None, "/_/tunnel/public.lan/80"),
            Ok("public".to_owned())
        );
        assert_eq!(
            reach(None, "/_/tunnel/pi.lan/22"),
            Err(Denial::NoCredential)
        );
        assert_eq!(
            reach(Some("x"), "/_/tunnel/pi.lan/22"),
            Err(Denial::UnknownToken)
        );
        let off = Access::open(None).unwrap();
        let target = crate::route::tunnel_target("/_/tunnel/pi.lan/22").unwrap();
        assert!(matches!(
            off.tunnel(&Credential::default(), &target),
            Err((Denial::NoTunnels, _))
        ));
        for bad in [
            "pi.lan",
            "pi.lan:0",
            "pi.lan:x",
            ":22",
            "::1:22",
            "[::1]22",
            "a/b:22",
            "[x]:22",
            "10.0.*:22",
            "[:::1]:22",
        ] {
            let text = format!("[tokens.t]\ntoken = \"t\"\ntunnel = [\"{bad}\"]\n");
            assert!(Rules::parse(&text).is_err(), "{bad}");
        }
    }

    #[test]
    fn without_a_file_everything_is_public() {
        let a = Access::open(None).unwrap();
        assert!(!a.is_on());
        assert_eq!(check(&a, Method::Delete, "/x?token=any", &[]), Ok(None));
    }
}
