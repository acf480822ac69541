//! Abuse limits per client address: a token bucket of requests
//! (`--rate-limit`, `--rate-burst`) and a cap on open connections
//! (`--max-connections-per-ip`). The client is the socket's peer, or, only
//! when the peer is a trusted proxy (`--trust-proxy`), the rightmost address
//! of `X-Forwarded-For` that is not itself trusted: a client cannot name
//! itself someone else by sending the header.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Mutex, MutexGuard};
use std::time::Instant;

use ipnet::IpNet;

use crate::error::Reject;
use crate::http::Request;

/// Requests per second, and how many may come at once.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rate {
    pub per_second: f64,
    pub burst: f64,
}

/// The limits, and what they count.
pub struct Limits {
    rate: Option<Rate>,
    per_ip: Option<usize>,
    trusted: Vec<IpNet>,
    buckets: Mutex<Buckets>,
    connections: Mutex<HashMap<IpAddr, usize>>,
}

/// Each client's bucket, swept of full ones as the map grows.
struct Buckets {
    by_client: HashMap<IpAddr, Bucket>,
    /// The size at which full buckets are swept next.
    sweep_at: usize,
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

/// The least number of buckets before a sweep is worth it.
const SWEEP_FLOOR: usize = 1024;

/// The most buckets kept (about 10 MiB).
const MAX_BUCKETS: usize = 1 << 18;

impl Limits {
    pub fn new(rate: Option<Rate>, per_ip: Option<usize>, trusted: Vec<IpNet>) -> Limits {
        Limits {
            rate,
            per_ip,
            trusted,
            buckets: Mutex::new(Buckets {
                by_client: HashMap::new(),
                sweep_at: SWEEP_FLOOR,
            }),
            connections: Mutex::new(HashMap::new()),
        }
    }

    /// Whether `--rate-limit` is on (the client is worked out only then).
    pub fn limits_requests(&self) -> bool {
        self.rate.is_some()
    }

    fn is_trusted(&self, ip: IpAddr) -> bool {
        let ip = canonical(ip);
        self.trusted.iter().any(|net| net.contains(&ip))
    }

    /// The client a request comes from (see the module's comment).
    pub fn client(&self, peer: Option<SocketAddr>, request: &Request) -> Option<IpAddr> {
        let peer = canonical(peer?.ip());
        if !self.is_trusted(peer) {
            return Some(peer);
        }
        // Every X-Forwarded-For field, in order, as one list; read from the
        // right, where the trusted proxies appended what they saw.
        let forwarded: Vec<&str> = request
            .headers
            .iter()
            .filter(|(name, _)| name.eq_ignore_ascii_case("x-forwarded-for"))
            .filter_map(|(_, value)| std::str::from_utf8(value).ok())
            .flat_map(|value| value.split(','))
            .collect();
        for entry in forwarded.iter().rev() {
            match parse_forwarded(entry) {
                Some(ip) if self.is_trusted(ip) => continue,
                Some(ip) => return Some(ip),
                // Garbage where a proxy should have written an address:
                // nothing left of it can be believed.
                None => return Some(peer),
            }
        }
        Some(peer)
    }

    /// Takes a token from `client`'s bucket, or says 429 with how many
    /// whole seconds until one is free.
    pub fn admit(&self, client: Option<IpAddr>) -> Result<(), Reject> {
        let (Some(rate), Some(client)) = (self.rate, client) else {
            return Ok(());
        };
        let client = counted_as(client);
        let now = Instant::now();
        let mut buckets = lock(&self.buckets);
        if buckets.by_client.len() >= buckets.sweep_at {
            // A bucket that has refilled is the same as none.
            buckets.by_client.retain(|_, b| {
                b.tokens + now.duration_since(b.at).as_secs_f64() * rate.per_second < rate.burst
            });
            if buckets.by_client.len() >= MAX_BUCKETS {
                // So many clients at once: forget them all rather than grow.
                log::warn!(
                    "--rate-limit: {} clients at once; their buckets start over",
                    buckets.by_client.len()
                );
                buckets.by_client.clear();
            }
            buckets.sweep_at = (buckets.by_client.len() * 2).clamp(SWEEP_FLOOR, MAX_BUCKETS);
        }
        let bucket = buckets.by_client.entry(client).or_insert(Bucket {
            tokens: rate.burst,
            at: now,
        });
        let refilled = now.duration_since(bucket.at).as_secs_f64() * rate.per_second;
        bucket.tokens = (bucket.tokens + refilled).min(rate.burst);
        bucket.at = now;
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            return Ok(());
        }
        let wait = ((1.0 - bucket.tokens) / rate.per_second).ceil().max(1.0);
        Err(
            Reject::new(429, "too many requests from your address; slow down")
                .with_header("Retry-After", format!("{wait:.0}")),
        )
    }

    /// Counts a new connection from `peer`; false when that address has
    /// `--max-connections-per-ip` open already (a trusted proxy has no cap:
    /// it speaks for many clients).
    pub fn open_connection(&self, peer: SocketAddr) -> bool {
        let (Some(cap), Some(ip)) = (self.per_ip, self.capped(peer)) else {
            return true;
        };
        let mut open = lock(&self.connections);
        let count = open.entry(ip).or_insert(0);
        if *count >= cap {
            return false;
        }
        *count += 1;
        true
    }

    /// Gives back what [`Limits::open_connection`] counted.
    pub fn close_connection(&self, peer: SocketAddr) {
        let (Some(_), Some(ip)) = (self.per_ip, self.capped(peer)) else {
            return;
        };
        let mut open = lock(&self.connections);
        if let Some(count) = open.get_mut(&ip) {
            *count -= 1;
            if *count == 0 {
                open.remove(&ip);
            }
        }
    }

    /// The address whose connections are capped: the peer, unless trusted.
    fn capped(&self, peer: SocketAddr) -> Option<IpAddr> {
        let ip = canonical(peer.ip());
        (!self.is_trusted(ip)).then(|| counted_as(ip))
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}

/// What a client is counted as: its IPv4 address, or its IPv6 /64 (one
/// subscriber's network: counting each of its 2^64 addresses apart would
/// let it start a new bucket with every request).
fn counted_as(ip: IpAddr) -> IpAddr {
    match canonical(ip) {
        IpAddr::V6(v6) => {
            let bits = u128::from(v6) & !((1u128 << 64) - 1);
            IpAddr::V6(bits.into())
        }
        v4 => v4,
    }
}

/// An IPv4 client seen on an IPv6 socket (`::ffff:1.2.3.4`) as IPv4.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

/// One `X-Forwarded-For` entry: an address, possibly with a port
/// (`1.2.3.4:5678`, `[::1]:80`).
fn parse_forwarded(entry: &str) -> Option<IpAddr> {
    let entry = entry.trim();
    entry
        .parse::<IpAddr>()
        .ok()
        .or_else(|| entry.parse::<SocketAddr>().ok().map(|s| s.ip()))
        .or_else(|| {
            entry
                .strip_prefix('[')
                .and_then(|e| e.strip_suffix(']'))?
                .parse()
                .ok()
        })
        .map(canonical)
}

/// `N/s`, `N/m` (or `/min`), `N/h`, or a bare `N` (per second).
pub fn parse_rate(text: &str) -> Result<f64, String> {
    let (number, unit) = text.trim().split_once('/').unwrap_or((text.trim(), "s"));
    let count: f64 = number
        .trim()
        .parse()
        .map_err(|_| format!("{text:?} is not a rate such as 10/s or 600/m"))?;
    let seconds = match unit.trim() {
        "s" | "sec" | "second" => 1.0,
        "m" | "min" | "minute" => 60.0,
        "h" | "hour" => 3600.0,
        _ => return Err(format!("{text:?}: the unit must be /s, /m or /h")),
    };
    let per_second = count / seconds;
    if !per_second.is_finite() || per_second <= 0.0 {
        return Err(format!("{text:?}: the rate must be more than 0"));
    }
    Ok(per_second)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::http::Method;

    fn limits(trusted: &[&str]) -> Limits {
        Limits::new(
            Some(Rate {
                per_second: 1.0,
                burst: 2.0,
            }),
            Some(2),
            trusted.iter().map(|t| t.parse().unwrap()).collect(),
        )
    }

    fn client(l: &Limits, peer: &str, forwarded: &[&str]) -> IpAddr {
        let headers: Vec<(&str, &str)> = forwarded
            .iter()
            .map(|value| ("X-Forwarded-For", *value))
            .collect();
        let request = Request::fake(Method::Get, "/x", &headers);
        l.client(Some(peer.parse().unwrap()), &request).unwrap()
    }

    #[test]
    fn forwarded_for_counts_only_from_a_trusted_peer() {
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        let none = limits(&[]);
        assert_eq!(client(&none, "9.9.9.9:1", &["1.1.1.1"]), ip("9.9.9.9"));
        let proxied = limits(&["127.0.0.0/8", "10.0.0.0/8"]);
        assert_eq!(client(&proxied, "127.0.0.1:1", &[]), ip("127.0.0.1"));
        assert_eq!(
            client(&proxied, "127.0.0.1:1", &["1.1.1.1, 2.2.2.2"]),
            ip("2.2.2.2")
        );
        // A spoofed entry on the left is never reached.
        assert_eq!(
            client(&proxied, "127.0.0.1:1", &["6.6.6.6", "2.2.2.2, 10.1.1.1"]),
            ip("2.2.2.2")
        );
        assert_eq!(
            client(&proxied, "[::ffff:127.0.0.1]:1", &["[2001:db8::1]:443"]),
            ip("2001:db8::1")
        );
        assert_eq!(client(&proxied, "127.0.0.1:1", &["junk"]), ip("127.0.0.1"));
    }

    #[test]
    fn a_bucket_refuses_past_its_burst_and_says_when_to_retry() {
        let l = limits(&[]);
        let a = Some("1.1.1.1".parse().unwrap());
        assert!(l.admit(a).is_ok());
        assert!(l.admit(a).is_ok());
        let refused = l.admit(a).unwrap_err();
        assert_eq!(refused.status, 429);
        assert_eq!(refused.headers, vec![("Retry-After", "1".into())]);
        // Another client has its own bucket.
        assert!(l.admit(Some("2.2.2.2".parse().unwrap())).is_ok());
    }

    #[test]
    fn connections_are_capped_per_address_but_not_for_trusted_proxies() {
        let l = limits(&["127.0.0.2/32"]);
        let a = "127.0.0.1:5".parse().unwrap();
        assert!(l.open_connection(a));
        assert!(l.open_connection(a));
        assert!(!l.open_connection(a));
        l.close_connection(a);
        assert!(l.open_connection(a));
        let proxy = "127.0.0.2:5".parse().unwrap();
        for _ in 0..5 {
            assert!(l.open_connection(proxy));
        }
    }

    #[test]
    fn an_ipv6_network_is_one_client() {
        let l = limits(&[]);
        let a = Some("2001:db8::1".parse().unwrap());
        let b = Some("2001:db8::ffff:2".parse().unwrap());
        assert!(l.admit(a).is_ok());
        assert!(l.admit(b).is_ok());
        assert_eq!(l.admit(a).unwrap_err().status, 429);
        assert!(l.admit(Some("2001:db8:0:1::1".parse().unwrap())).is_ok());
    }

    #[test]
    fn rates_take_units() {
        assert_eq!(parse_rate("10/s"), Ok(10.0));
        assert_eq!(parse_rate("5"), Ok(5.0));
        assert_eq!(parse_rate("120/m"), Ok(2.0));
        assert_eq!(parse_rate("3600/h"), Ok(1.0));
        assert!(parse_rate("0/s").is_err());
        assert!(parse_rate("x/s").is_err());
        assert!(parse_rate("1/d").is_err());
    }
}
