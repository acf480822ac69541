//! What an operator looks at: the channel list (`/_/channels`), the live
//! page (`/`), the icon and `robots.txt`. Pure rendering: `app.rs` gathers
//! the channels and counters and writes the responses.

use std::fmt::Write as _;

use crate::mode::ChannelView;

/// The page, with `{{NAME}}` placeholders filled in by [`page`].
const PAGE: &str = include_str!("../assets/page.html");

/// A 16×16 icon (a PNG in an ICO), so that browsers asking for it never
/// park a consumer on a channel.
pub const FAVICON: &[u8] = include_bytes!("../assets/favicon.ico");

/// Crawlers stay out: channel names are capabilities.
pub const ROBOTS: &str = "User-agent: *\nDisallow: /\n";

/// The page's Content-Security-Policy: its own inline script and style,
/// requests to the relay itself, nothing from elsewhere.
pub const PAGE_POLICY: &str = "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; connect-src 'self'; img-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

/// A channel as listed: its name as shown (whole or shortened) and who waits.
pub struct Listed<'a> {
    pub shown: String,
    pub view: &'a ChannelView,
}

/// `/_/channels`: `{"channels":[...],"names":"whole"|"shortened"}`.
pub fn channels_json(listed: &[Listed], whole: bool) -> String {
    let mut out = String::from("{\"channels\":[");
    for (i, channel) in listed.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        out.push_str("{\"channel\":");
        json_string(&mut out, &channel.shown);
        let _ = write!(out, ",\"mode\":\"{}\"", channel.view.mode);
        for (role, count) in &channel.view.waiting {
            let _ = write!(out, ",\"{role}\":{count}");
        }
        if let Some(retained) = channel.view.retained {
            let _ = write!(out, ",\"retained\":{retained}");
        }
        out.push('}');
    }
    let names = if whole { "whole" } else { "shortened" };
    let _ = writeln!(out, "],\"names\":\"{names}\"}}");
    out
}

/// What the page shows before its script runs.
pub struct PageData<'a> {
    /// `host[:port]` the page was loaded from (checked, or the relay's address).
    pub host: &'a str,
    pub uptime_seconds: u64,
    pub waiters: u64,
    pub pairs: u64,
    pub published: u64,
    pub connections: u64,
    pub listed: &'a [Listed<'a>],
    pub whole: bool,
}

/// The page, filled in; every value from a client is HTML-escaped.
pub fn page(data: &PageData) -> String {
    let mut rows = String::new();
    if data.listed.is_empty() {
        rows.push_str(
            "    <tr><td colspan=\"3\" class=\"none\">No channel has anyone waiting.</td></tr>\n",
        );
    }
    for channel in data.listed {
        let waiting: Vec<String> = channel
            .view
            .waiting
            .iter()
            .map(|(role, count)| format!("{count} {role}"))
            .chain(channel.view.retained.map(|n| format!("{n} retained")))
            .collect();
        let _ = writeln!(
            rows,
            "    <tr><td class=\"channel\">{}</td><td>{}</td><td>{}</td></tr>",
            escape(&channel.shown),
            channel.view.mode,
            waiting.join(", ")
        );
    }
    let names = if data.whole {
        ""
    } else {
        "Channel names are capabilities: they are shortened here (patchcord --list-channels shows them whole)."
    };
    let host = escape(data.host);
    PAGE.replace("{{HOST}}", &host)
        .replace("{{ORIGIN}}", &format!("http://{host}"))
        .replace("{{VERSION}}", env!("CARGO_PKG_VERSION"))
        .replace("{{UPTIME}}", &uptime(data.uptime_seconds))
        .replace("{{WAITERS}}", &data.waiters.to_string())
        .replace("{{PAIRS}}", &data.pairs.to_string())
        .replace("{{PUBLISHED}}", &data.published.to_string())
        .replace("{{CONNECTIONS}}", &data.connections.to_string())
        .replace("{{CHANNELS}}", rows.trim_end())
        .replace("{{NAMES}}", names)
}

/// The `Host` a page may show: a host name or address with an optional
/// port, nothing else (None for anything a browser would not send).
pub fn valid_host(host: &str) -> Option<&str> {
    let ok = !host.is_empty()
        && host.len() <= 255
        && host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b".-:[]_".contains(&b));
    ok.then_some(host)
}

fn uptime(seconds: u64) -> String {
    let (d, h, m, s) = (
        seconds / 86_400,
        seconds % 86_400 / 3600,
        seconds % 3600 / 60,
        seconds % 60,
    );
    match (d, h, m) {
        (0, 0, 0) => format!("{s}s"),
        (0, 0, _) => format!("{m}m {s}s"),
        (0, _, _) => format!("{h}h {m}m"),
        _ => format!("{d}d {h}h"),
    }
}

/// `text` for HTML text and attribute values.
fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// `text` as a JSON string.
fn json_string(out: &mut String, text: &str) {
    let mut bytes = Vec::with_capacity(text.len() + 2);
    crate::mode::pubsub::format::json_bytes(text.as_bytes(), &mut bytes);
    out.push('"');
    // Only ASCII bytes were escaped: still UTF-8.
    out.push_str(&String::from_utf8_lossy(&bytes));
    out.push('"');
}

#[cfg(test)]
mod tests {
    use super::*;

    fn view(key: &str) -> ChannelView {
        ChannelView {
            key: key.to_owned(),
            mode: "queue",
            waiting: vec![("producers", 0), ("consumers", 2)],
            retained: None,
        }
    }

    #[test]
    fn channel_names_are_escaped_in_json_and_html() {
        let tricky = view("/a\"b<script>");
        let listed = [Listed {
            shown: tricky.key.clone(),
            view: &tricky,
        }];
        let json = channels_json(&listed, true);
        assert_eq!(
            json,
            "{\"channels\":[{\"channel\":\"/a\\\"b<script>\",\"mode\":\"queue\",\"producers\":0,\"consumers\":2}],\"names\":\"whole\"}\n"
        );
        let html = page(&PageData {
            host: "pi:3000",
            uptime_seconds: 3700,
            waiters: 2,
            pairs: 5,
            published: 0,
            connections: 3,
            listed: &listed,
            whole: true,
        });
        assert!(html.contains("/a&quot;b&lt;script&gt;"), "{html}");
        assert!(!html.contains("<script>\""));
        assert!(html.contains("curl -d hello <span class=\"origin\">http://pi:3000</span>/jobs"));
        assert!(html.contains("1h 1m"));
        assert!(!html.contains("{{"));
    }

    #[test]
    fn hosts_are_checked() {
        assert_eq!(valid_host("pi:3000"), Some("pi:3000"));
        assert_eq!(valid_host("[::1]:3000"), Some("[::1]:3000"));
        assert_eq!(valid_host("a\"><script>"), None);
        assert_eq!(valid_host(""), None);
    }
}
