//! Name resolution for destination binding: which addresses a policy's host name stands
//! for right now. Shared by every request, below the request stages.
//!
//! The lookup itself is a seam ([`Lookup`]): production uses the system resolver
//! ([`SystemLookup`], getaddrinfo through `tokio::net::lookup_host`); the in-process tests
//! give static answers ([`StaticLookup`]). Whatever the lookup returns is only the answer
//! set: whether a connection may be bound to one of its addresses (address classes,
//! `allow_internal`) is decided by [`enforce::confirm_address`](crate::enforce::confirm_address).
#![forbid(unsafe_code)]

use std::{
    collections::HashMap,
    fmt,
    future::Future,
    io,
    net::IpAddr,
    pin::Pin,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use crate::identify::normalize;

/// A boxed lookup future.
pub type LookupFuture<'a> = Pin<Box<dyn Future<Output = io::Result<Vec<IpAddr>>> + Send + 'a>>;

/// How names are turned into addresses.
pub trait Lookup: Send + Sync + 'static {
    /// The addresses of `name` (for a connection to `port`).
    fn lookup<'a>(&'a self, name: &'a str, port: u16) -> LookupFuture<'a>;
}

/// The system resolver (getaddrinfo, through `tokio::net::lookup_host`).
#[derive(Clone, Copy, Debug, Default)]
pub struct SystemLookup;

impl Lookup for SystemLookup {
    fn lookup<'a>(&'a self, name: &'a str, port: u16) -> LookupFuture<'a> {
        Box::pin(async move {
            Ok(tokio::net::lookup_host((name, port))
                .await?
                .map(|a| a.ip())
                .collect())
        })
    }
}

/// Fixed answers, for tests and `policy explain` fixtures. A name without answers fails
/// like NXDOMAIN.
#[derive(Clone, Debug, Default)]
pub struct StaticLookup {
    answers: HashMap<String, Vec<IpAddr>>,
}

impl StaticLookup {
    /// No answers.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds the answers for `name` (lowercase, no trailing dot).
    #[must_use]
    pub fn with(mut self, name: &str, addrs: impl IntoIterator<Item = IpAddr>) -> Self {
        self.answers
            .entry(name.to_ascii_lowercase())
            .or_default()
            .extend(addrs);
        self
    }

    /// The answers for `name`, synchronously.
    pub fn get(&self, name: &str) -> io::Result<Vec<IpAddr>> {
        self.answers
            .get(&name.to_ascii_lowercase())
            .cloned()
            .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, "no such name (static)"))
    }
}

impl Lookup for StaticLookup {
    fn lookup<'a>(&'a self, name: &'a str, _port: u16) -> LookupFuture<'a> {
        Box::pin(async move { self.get(name) })
    }
}

/// A small DNS cache for confirming destination names.
pub struct Resolver {
    lookup: Arc<dyn Lookup>,
    cache: Mutex<HashMap<(String, u16), Resolved>>,
    /// Answers the DNS proxy returned to workloads: name → (valid until, addresses).
    learned: Mutex<HashMap<String, (Instant, Vec<IpAddr>)>>,
}

impl fmt::Debug for Resolver {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let entries = self.cache.lock().map(|c| c.len()).unwrap_or(0);
        f.debug_struct("Resolver")
            .field("cached", &entries)
            .finish_non_exhaustive()
    }
}

impl Default for Resolver {
    /// The system resolver.
    fn default() -> Self {
        Self::new(SystemLookup)
    }
}

/// When a name was resolved, and to what.
type Resolved = (Instant, Vec<IpAddr>);

/// How long a resolution is trusted.
const DNS_TTL: Duration = Duration::from_secs(30);

impl Resolver {
    /// A resolver that asks `lookup`.
    pub fn new(lookup: impl Lookup) -> Self {
        Self {
            lookup: Arc::new(lookup),
            cache: Mutex::new(HashMap::new()),
            learned: Mutex::new(HashMap::new()),
        }
    }

    /// Remembers that `name` (lowercase, no trailing dot) resolved to `addrs` for a
    /// workload, valid for `ttl` (at most [`DNS_TTL`], at least one second): until then a
    /// connection to one of them is bound to `name` like a resolved address.
    pub fn learn(&self, name: &str, addrs: &[IpAddr], ttl: Duration) {
        let ttl = ttl.clamp(Duration::from_secs(1), DNS_TTL);
        let addrs = addrs
            .iter()
            .map(|ip| normalize((*ip, 0).into()).ip())
            .collect();
        self.learned
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(name.to_ascii_lowercase(), (Instant::now() + ttl, addrs));
    }

    fn learned(&self, name: &str) -> Vec<IpAddr> {
        let mut learned = self.learned.lock().unwrap_or_else(|p| p.into_inner());
        learned.retain(|_, (until, _)| *until > Instant::now());
        learned
            .get(name)
            .map(|(_, ips)| ips.clone())
            .unwrap_or_default()
    }

    /// The addresses of `name` (cached for a short time), IPv4-mapped IPv6 as IPv4.
    pub async fn resolve(&self, name: &str, port: u16) -> Result<Vec<IpAddr>, String> {
        let key = (name.to_owned(), port);
        let cached = self
            .cache
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&key)
            .filter(|(at, _)| at.elapsed() < DNS_TTL)
            .map(|(_, ips)| ips.clone());
        let learned = self.learned(name);
        if let Some(mut ips) = cached {
            for ip in learned {
                if !ips.contains(&ip) {
                    ips.push(ip);
                }
            }
            return Ok(ips);
        }
        if !learned.is_empty() {
            return Ok(learned);
        }
        let ips: Vec<IpAddr> = self
            .lookup
            .lookup(name, port)
            .await
            .map_err(|e| format!("resolving {name}: {e}"))?
            .into_iter()
            .map(|ip| normalize((ip, port).into()).ip())
            .collect();
        self.cache
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(key, (Instant::now(), ips.clone()));
        Ok(ips)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "tests")]
mod tests {
    use super::*;

    #[tokio::test]
    async fn static_answers_are_normalised_and_cached() {
        let resolver = Resolver::new(StaticLookup::new().with(
            "api.test",
            [
                "::ffff:127.0.0.31".parse().unwrap(),
                "2001:db8::1".parse().unwrap(),
            ],
        ));
        let want: Vec<IpAddr> = vec![
            "127.0.0.31".parse().unwrap(),
            "2001:db8::1".parse().unwrap(),
        ];
        assert_eq!(resolver.resolve("api.test", 80).await.unwrap(), want);
        assert_eq!(resolver.resolve("api.test", 80).await.unwrap(), want);
        let err = resolver.resolve("other.test", 80).await.unwrap_err();
        assert!(err.starts_with("resolving other.test: "), "{err}");
        assert!(format!("{resolver:?}").starts_with("Resolver { cached: 1"));
    }

    #[tokio::test]
    async fn learned_answers_bind_until_their_ttl() {
        let resolver = Resolver::new(StaticLookup::new());
        let ip: IpAddr = "127.0.54.9".parse().unwrap();
        resolver.learn("Api.Test", &[ip], Duration::from_secs(60));
        assert_eq!(resolver.resolve("api.test", 80).await.unwrap(), vec![ip]);
        resolver.learn("gone.test", &[ip], Duration::ZERO);
        std::thread::sleep(Duration::from_millis(1100));
        assert!(resolver.resolve("gone.test", 80).await.is_err());
    }
}
