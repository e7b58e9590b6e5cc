//! Name resolution for destination binding: which addresses a policy's host name stands
//! for right now. Shared by every request, below the request stages.
//!
//! The lookup itself is a seam ([`Lookup`]): production uses hickory-resolver
//! ([`DnsLookup`], configured from a `resolv.conf` file, asynchronous on the agent's tokio
//! runtime: no blocking getaddrinfo in the request path); the in-process tests give static
//! answers ([`StaticLookup`]). A lookup returns the answer set with its TTL; the
//! [`Resolver`] caches it for that TTL clamped into [`TtlBounds`] and resolves again on
//! expiry, so a name that moved is followed within the bounds and an old address stops
//! being bindable.
//!
//! Negative answers (NXDOMAIN, no A/AAAA records) and resolver failures are errors: the
//! request is denied (fail closed). Negative answers are cached for their negative TTL
//! clamped to at most [`NEGATIVE_MAX_TTL`], failures for [`FAILURE_TTL`], so a dead or
//! hostile resolver cannot be made to see one query per request. The cache holds at most
//! [`CACHE_CAPACITY`] names.
//!
//! [`Resolver::learn`] adds answers that a workload received through the agent's DNS proxy:
//! they stay bindable until their (clamped) TTL expires, in addition to the resolver's own
//! current answers, so a workload and the agent agree on addresses even when a round-robin
//! zone gives each query a different subset.
//!
//! Whatever the answer set is, whether a connection may be bound to one of its addresses
//! (address classes, `allow_internal`) is decided by
//! [`enforce::confirm_address`](crate::enforce::confirm_address).
#![forbid(unsafe_code)]

use std::{
    collections::HashMap,
    fmt,
    future::Future,
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
    pin::Pin,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use hickory_resolver::{
    Resolver as HickoryResolver,
    config::{LookupIpStrategy, ResolveHosts},
    net::{
        DnsError, NetError,
        runtime::{
            RuntimeProvider, TokioHandle, TokioRuntimeProvider, TokioTime,
            iocompat::AsyncIoTokioAsStd,
        },
    },
};
use tokio::net::{TcpSocket, TcpStream, UdpSocket};

use crate::identify::normalize;

/// How long a negative answer (NXDOMAIN, no address records) is trusted at most.
pub const NEGATIVE_MAX_TTL: Duration = Duration::from_secs(30);
/// How long a resolver failure (timeout, SERVFAIL, no reachable server) is remembered.
pub const FAILURE_TTL: Duration = Duration::from_secs(1);
/// Names held in the cache (own answers and learned answers each).
pub const CACHE_CAPACITY: usize = 4096;
/// Learned addresses kept per name (the soonest to expire are dropped first).
pub const LEARNED_PER_NAME: usize = 64;

/// Errors of this module.
#[derive(Debug, thiserror::Error)]
pub enum ResolveError {
    /// The resolver configuration file cannot be read.
    #[error("--resolv-conf {}: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The resolver configuration file is not usable (no nameserver, bad syntax).
    #[error("--resolv-conf {}: {reason}", path.display())]
    Config {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The TTL bounds are inverted.
    #[error("--dns-min-ttl {}s is above --dns-max-ttl {}s", min.as_secs(), max.as_secs())]
    Bounds {
        /// The floor given.
        min: Duration,
        /// The ceiling given.
        max: Duration,
    },
}

/// The floor and ceiling applied to every answer's TTL.
///
/// The floor (default 5 s) stops a zero or one-second TTL from turning every request into a
/// DNS query; the ceiling (default 300 s) makes the agent look again at least that often,
/// so a name that moved is followed even when its zone announces a TTL of a day.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TtlBounds {
    min: Duration,
    max: Duration,
}

impl Default for TtlBounds {
    fn default() -> Self {
        Self {
            min: Duration::from_secs(5),
            max: Duration::from_secs(300),
        }
    }
}

impl TtlBounds {
    /// Bounds from a floor and a ceiling (floor ≤ ceiling).
    pub fn new(min: Duration, max: Duration) -> Result<Self, ResolveError> {
        if min > max {
            return Err(ResolveError::Bounds { min, max });
        }
        Ok(Self { min, max })
    }

    /// The floor.
    pub fn min(&self) -> Duration {
        self.min
    }

    /// The ceiling.
    pub fn max(&self) -> Duration {
        self.max
    }

    /// `ttl` clamped into the bounds.
    pub fn clamp(&self, ttl: Duration) -> Duration {
        ttl.clamp(self.min, self.max)
    }

    /// A negative answer's TTL (the SOA minimum, or the floor if none) clamped into
    /// [floor, [`NEGATIVE_MAX_TTL`]] (the floor itself at most that).
    pub fn clamp_negative(&self, ttl: Option<Duration>) -> Duration {
        let lo = self.min.min(NEGATIVE_MAX_TTL);
        ttl.unwrap_or(lo).clamp(lo, NEGATIVE_MAX_TTL)
    }
}

/// A positive answer: the addresses and how long they may be trusted (as announced).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Answers {
    /// The addresses, in resolver order.
    pub addrs: Vec<IpAddr>,
    /// The remaining TTL of the answer (the smallest record TTL).
    pub ttl: Duration,
}

/// Why a lookup gave no addresses.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LookupError {
    /// The name does not exist or has no address records; the negative TTL if known.
    Negative {
        /// What the resolver said.
        detail: String,
        /// The negative TTL (SOA minimum), if the answer carried one.
        ttl: Option<Duration>,
    },
    /// The resolver did not answer usefully (timeout, SERVFAIL, REFUSED, I/O).
    Failed {
        /// What went wrong.
        detail: String,
    },
}

impl fmt::Display for LookupError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Negative { detail, .. } => write!(f, "no address (negative answer: {detail})"),
            Self::Failed { detail } => write!(f, "resolver failure: {detail}"),
        }
    }
}

/// A boxed lookup future.
pub type LookupFuture<'a> = Pin<Box<dyn Future<Output = Result<Answers, LookupError>> + Send + 'a>>;

/// How names are turned into addresses.
pub trait Lookup: Send + Sync + 'static {
    /// The addresses of `name` (lowercase, no trailing dot) with their TTL.
    fn lookup<'a>(&'a self, name: &'a str) -> LookupFuture<'a>;
}

/// hickory's tokio runtime, with the agent's SO_MARK on every DNS socket it opens.
///
/// The agent's own cgroup is exempt from the hooks, except when a policy selects that
/// cgroup (workloads share it): then only the mark tells the hooks that a socket is the
/// agent's, and without it the agent's DNS would be denied or redirected to itself.
#[derive(Clone)]
struct MarkedRuntime {
    inner: TokioRuntimeProvider,
    mark: u32,
}

impl MarkedRuntime {
    fn socket(&self, addr: SocketAddr, ty: socket2::Type) -> std::io::Result<socket2::Socket> {
        let socket = socket2::Socket::new(socket2::Domain::for_address(addr), ty, None)?;
        if self.mark != 0 {
            socket.set_mark(self.mark)?;
        }
        socket.set_nonblocking(true)?;
        Ok(socket)
    }
}

impl RuntimeProvider for MarkedRuntime {
    type Handle = TokioHandle;
    type Timer = TokioTime;
    type Udp = UdpSocket;
    type Tcp = AsyncIoTokioAsStd<TcpStream>;

    fn create_handle(&self) -> Self::Handle {
        self.inner.create_handle()
    }

    fn connect_tcp(
        &self,
        server_addr: SocketAddr,
        bind_addr: Option<SocketAddr>,
        wait_for: Option<Duration>,
    ) -> Pin<Box<dyn Send + Future<Output = std::io::Result<Self::Tcp>>>> {
        let socket = self.socket(server_addr, socket2::Type::STREAM);
        Box::pin(async move {
            let socket = TcpSocket::from_std_stream(socket?.into());
            if let Some(bind_addr) = bind_addr {
                socket.bind(bind_addr)?;
            }
            socket.set_nodelay(true)?;
            let wait_for = wait_for.unwrap_or(Duration::from_secs(5));
            match tokio::time::timeout(wait_for, socket.connect(server_addr)).await {
                Ok(stream) => Ok(AsyncIoTokioAsStd(stream?)),
                Err(_) => Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!("DNS over TCP to {server_addr}: connect timed out"),
                )),
            }
        })
    }

    fn bind_udp(
        &self,
        local_addr: SocketAddr,
        _server_addr: SocketAddr,
    ) -> Pin<Box<dyn Send + Future<Output = std::io::Result<Self::Udp>>>> {
        let socket = self.socket(local_addr, socket2::Type::DGRAM).and_then(|s| {
            s.bind(&local_addr.into())?;
            UdpSocket::from_std(s.into())
        });
        Box::pin(async move { socket })
    }
}

/// The production lookup: hickory-resolver on tokio, with the nameservers and options of a
/// `resolv.conf` file. Names are queried as fully qualified (no search domains: a policy
/// host name means exactly that name). `/etc/hosts` entries are honoured (read once, at
/// start) like getaddrinfo would, and `localhost` answers loopback without a query. Its
/// sockets carry the agent's SO_MARK.
pub struct DnsLookup {
    resolver: HickoryResolver<MarkedRuntime>,
}

impl fmt::Debug for DnsLookup {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DnsLookup").finish_non_exhaustive()
    }
}

impl DnsLookup {
    /// A resolver configured from the `resolv.conf` at `path`. Its own response cache
    /// never outlives the ceiling of `bounds` (nor a negative answer [`NEGATIVE_MAX_TTL`]),
    /// so a [`Resolver`] that looks again on expiry gets a fresh answer. `mark` is the
    /// SO_MARK of its sockets (0: none).
    pub fn from_resolv_conf(
        path: &Path,
        bounds: TtlBounds,
        mark: u32,
    ) -> Result<Self, ResolveError> {
        let text = std::fs::read(path).map_err(|source| ResolveError::Read {
            path: path.to_owned(),
            source,
        })?;
        let (config, mut opts) =
            hickory_resolver::system_conf::parse_resolv_conf(&text).map_err(|e| {
                ResolveError::Config {
                    path: path.to_owned(),
                    reason: e.to_string(),
                }
            })?;
        opts.ip_strategy = LookupIpStrategy::Ipv4AndIpv6;
        opts.use_hosts_file = ResolveHosts::Always;
        opts.cache_size = CACHE_CAPACITY as u64;
        opts.positive_min_ttl = None;
        opts.positive_max_ttl = Some(bounds.max());
        opts.negative_min_ttl = None;
        opts.negative_max_ttl = Some(NEGATIVE_MAX_TTL);
        let runtime = MarkedRuntime {
            inner: TokioRuntimeProvider::default(),
            mark,
        };
        let resolver = HickoryResolver::builder_with_config(config, runtime)
            .with_options(opts)
            .build()
            .map_err(|e| ResolveError::Config {
                path: path.to_owned(),
                reason: e.to_string(),
            })?;
        Ok(Self { resolver })
    }
}

impl Lookup for DnsLookup {
    fn lookup<'a>(&'a self, name: &'a str) -> LookupFuture<'a> {
        Box::pin(async move {
            match self.resolver.lookup_ip(format!("{name}.")).await {
                Ok(lookup) => Ok(Answers {
                    addrs: lookup.iter().collect(),
                    ttl: lookup
                        .valid_until()
                        .saturating_duration_since(Instant::now()),
                }),
                Err(NetError::Dns(DnsError::NoRecordsFound(none))) => Err(LookupError::Negative {
                    detail: none.response_code.to_string(),
                    ttl: none.negative_ttl.map(|s| Duration::from_secs(u64::from(s))),
                }),
                Err(e) => Err(LookupError::Failed {
                    detail: e.to_string(),
                }),
            }
        })
    }
}

/// Fixed answers, for tests and `policy explain` fixtures. A name without answers fails
/// like NXDOMAIN.
#[derive(Clone, Debug, Default)]
pub struct StaticLookup {
    answers: HashMap<String, Vec<IpAddr>>,
    ttl: Option<Duration>,
}

impl StaticLookup {
    /// No answers; every answer has a TTL of one hour.
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

    /// Every answer carries this TTL.
    #[must_use]
    pub fn with_ttl(mut self, ttl: Duration) -> Self {
        self.ttl = Some(ttl);
        self
    }

    /// The answers for `name`, synchronously.
    pub fn get(&self, name: &str) -> Result<Answers, LookupError> {
        self.answers
            .get(&name.to_ascii_lowercase())
            .map(|addrs| Answers {
                addrs: addrs.clone(),
                ttl: self.ttl.unwrap_or(Duration::from_secs(3600)),
            })
            .ok_or_else(|| LookupError::Negative {
                detail: "no such name (static)".to_owned(),
                ttl: None,
            })
    }
}

impl Lookup for StaticLookup {
    fn lookup<'a>(&'a self, name: &'a str) -> LookupFuture<'a> {
        Box::pin(async move { self.get(name) })
    }
}

/// The resolver's current answer for a name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Resolved {
    /// The current answer set (IPv4-mapped IPv6 as IPv4), in resolver order.
    pub addrs: Vec<IpAddr>,
    /// Until when it is trusted (the clamped TTL); the name is resolved again after.
    pub valid_until: Instant,
}

/// A cached lookup result.
#[derive(Clone, Debug)]
struct Entry {
    result: Result<Vec<IpAddr>, String>,
    valid_until: Instant,
}

/// The cache: own answers and learned answers, each bounded in names.
#[derive(Debug, Default)]
struct Cache {
    answers: HashMap<String, Entry>,
    learned: HashMap<String, Vec<(IpAddr, Instant)>>,
}

impl Cache {
    /// Makes room for one more name in `answers`: drops expired entries, then, if still
    /// full, the one that expires first.
    fn make_room(&mut self, now: Instant) {
        if self.answers.len() < CACHE_CAPACITY {
            return;
        }
        self.answers.retain(|_, e| e.valid_until > now);
        if self.answers.len() >= CACHE_CAPACITY
            && let Some(first) = self
                .answers
                .iter()
                .min_by_key(|(_, e)| e.valid_until)
                .map(|(k, _)| k.clone())
        {
            self.answers.remove(&first);
        }
    }

    /// The same for `learned`.
    fn make_room_learned(&mut self, now: Instant) {
        if self.learned.len() < CACHE_CAPACITY {
            return;
        }
        self.learned.retain(|_, v| {
            v.retain(|(_, until)| *until > now);
            !v.is_empty()
        });
        if self.learned.len() >= CACHE_CAPACITY
            && let Some(first) = self
                .learned
                .iter()
                .min_by_key(|(_, v)| v.iter().map(|(_, u)| *u).max())
                .map(|(k, _)| k.clone())
        {
            self.learned.remove(&first);
        }
    }

    /// Whether `ip` was learned for `name` and has not expired.
    fn is_learned(&self, name: &str, ip: IpAddr, now: Instant) -> bool {
        self.learned
            .get(name)
            .is_some_and(|v| v.iter().any(|(a, until)| *a == ip && *until > now))
    }
}

/// The agent's view of DNS for destination binding: a bounded cache over a [`Lookup`],
/// following each answer's TTL within [`TtlBounds`], plus the answers learned from the DNS
/// proxy.
pub struct Resolver {
    lookup: Arc<dyn Lookup>,
    bounds: TtlBounds,
    cache: Mutex<Cache>,
}

impl fmt::Debug for Resolver {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (answers, learned) = self
            .cache
            .lock()
            .map(|c| (c.answers.len(), c.learned.len()))
            .unwrap_or((0, 0));
        f.debug_struct("Resolver")
            .field("cached", &answers)
            .field("learned", &learned)
            .field("bounds", &self.bounds)
            .finish_non_exhaustive()
    }
}

/// The key of a name: lowercase, one trailing dot removed.
fn key(name: &str) -> String {
    name.strip_suffix('.').unwrap_or(name).to_ascii_lowercase()
}

/// An address as the kernel records it (IPv4-mapped IPv6 as IPv4).
fn canonical(ip: IpAddr) -> IpAddr {
    normalize((ip, 0).into()).ip()
}

impl Resolver {
    /// A resolver that asks `lookup`, with the default [`TtlBounds`].
    pub fn new(lookup: impl Lookup) -> Self {
        Self::with_bounds(lookup, TtlBounds::default())
    }

    /// A resolver that asks `lookup` and clamps every TTL into `bounds`.
    pub fn with_bounds(lookup: impl Lookup, bounds: TtlBounds) -> Self {
        Self {
            lookup: Arc::new(lookup),
            bounds,
            cache: Mutex::new(Cache::default()),
        }
    }

    /// The TTL bounds.
    pub fn bounds(&self) -> TtlBounds {
        self.bounds
    }

    fn cache(&self) -> std::sync::MutexGuard<'_, Cache> {
        self.cache.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The current answer set of `name`: from the cache while it is valid, otherwise
    /// looked up again. An error (negative answer or resolver failure) is the reason,
    /// naming the name.
    pub async fn resolve(&self, name: &str) -> Result<Resolved, String> {
        let name = key(name);
        let now = Instant::now();
        let cached = self
            .cache()
            .answers
            .get(&name)
            .filter(|e| e.valid_until > now)
            .cloned();
        let entry = match cached {
            Some(entry) => entry,
            None => {
                let result = self.lookup.lookup(&name).await;
                let now = Instant::now();
                let entry = match result {
                    Ok(answers) if !answers.addrs.is_empty() => {
                        let mut addrs: Vec<IpAddr> = Vec::with_capacity(answers.addrs.len());
                        for ip in answers.addrs.into_iter().map(canonical) {
                            if !addrs.contains(&ip) {
                                addrs.push(ip);
                            }
                        }
                        Entry {
                            result: Ok(addrs),
                            valid_until: now + self.bounds.clamp(answers.ttl),
                        }
                    }
                    Ok(_) => Entry {
                        result: Err(format!("resolving {name}: no address (empty answer)")),
                        valid_until: now + self.bounds.clamp_negative(None),
                    },
                    Err(e) => {
                        let ttl = match &e {
                            LookupError::Negative { ttl, .. } => self.bounds.clamp_negative(*ttl),
                            LookupError::Failed { .. } => FAILURE_TTL,
                        };
                        Entry {
                            result: Err(format!("resolving {name}: {e}")),
                            valid_until: now + ttl,
                        }
                    }
                };
                let mut cache = self.cache();
                cache.make_room(now);
                cache.answers.insert(name, entry.clone());
                entry
            }
        };
        entry.result.map(|addrs| Resolved {
            addrs,
            valid_until: entry.valid_until,
        })
    }

    /// Whether a connection to `ip` may be bound to `name` as far as DNS goes: `ip` was
    /// learned for `name` from the DNS proxy and has not expired, or it is in the current
    /// answer set. An error is returned only when `ip` was not learned and the name does
    /// not resolve.
    pub async fn has_address(&self, name: &str, ip: IpAddr) -> Result<bool, String> {
        let ip = canonical(ip);
        if self.cache().is_learned(&key(name), ip, Instant::now()) {
            return Ok(true);
        }
        Ok(self.resolve(name).await?.addrs.contains(&ip))
    }

    /// Answers a workload received through the agent's DNS proxy: each address of `addrs`
    /// may be bound for `name` until `ttl` (clamped into the bounds) expires, in addition
    /// to the resolver's own current answers. Learning again extends an address's expiry.
    pub fn learn(&self, name: &str, addrs: &[IpAddr], ttl: Duration) {
        if addrs.is_empty() {
            return;
        }
        let now = Instant::now();
        let until = now + self.bounds.clamp(ttl);
        let name = key(name);
        let mut cache = self.cache();
        if !cache.learned.contains_key(&name) {
            cache.make_room_learned(now);
        }
        let list = cache.learned.entry(name).or_default();
        list.retain(|(_, u)| *u > now);
        for ip in addrs.iter().copied().map(canonical) {
            match list.iter_mut().find(|(a, _)| *a == ip) {
                Some(slot) => slot.1 = slot.1.max(until),
                None => list.push((ip, until)),
            }
        }
        if list.len() > LEARNED_PER_NAME {
            list.sort_by_key(|(_, u)| std::cmp::Reverse(*u));
            list.truncate(LEARNED_PER_NAME);
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "tests")]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    /// A lookup whose answers the test changes, counting the queries.
    #[derive(Clone)]
    struct Scripted {
        answer: Arc<Mutex<Result<Answers, LookupError>>>,
        queries: Arc<AtomicUsize>,
    }

    impl Default for Scripted {
        fn default() -> Self {
            Self {
                answer: Arc::new(Mutex::new(Ok(Answers {
                    addrs: Vec::new(),
                    ttl: Duration::ZERO,
                }))),
                queries: Arc::default(),
            }
        }
    }

    impl Scripted {
        fn set(&self, answer: Result<Answers, LookupError>) {
            *self.answer.lock().unwrap() = answer;
        }
        fn answer(&self, addrs: &[&str], ttl: Duration) {
            self.set(Ok(Answers {
                addrs: addrs.iter().map(|a| ip(a)).collect(),
                ttl,
            }));
        }
        fn queries(&self) -> usize {
            self.queries.load(Ordering::SeqCst)
        }
    }

    impl Lookup for Scripted {
        fn lookup<'a>(&'a self, _name: &'a str) -> LookupFuture<'a> {
            self.queries.fetch_add(1, Ordering::SeqCst);
            let answer = self.answer.lock().unwrap().clone();
            Box::pin(async move { answer })
        }
    }

    fn bounds(min: u64, max: u64) -> TtlBounds {
        TtlBounds::new(Duration::from_secs(min), Duration::from_secs(max)).unwrap()
    }

    #[tokio::test]
    async fn static_answers_are_normalised_deduplicated_and_cached() {
        let resolver = Resolver::new(StaticLookup::new().with(
            "api.test",
            [ip("::ffff:127.0.0.31"), ip("2001:db8::1"), ip("127.0.0.31")],
        ));
        let want = vec![ip("127.0.0.31"), ip("2001:db8::1")];
        assert_eq!(resolver.resolve("api.test").await.unwrap().addrs, want);
        assert_eq!(resolver.resolve("API.test.").await.unwrap().addrs, want);
        let err = resolver.resolve("other.test").await.unwrap_err();
        assert!(
            err.starts_with("resolving other.test: no address (negative answer"),
            "{err}"
        );
        assert!(format!("{resolver:?}").starts_with("Resolver { cached: 2"));
    }

    #[test]
    fn ttl_bounds_clamp_and_reject_inverted_bounds() {
        let b = bounds(5, 300);
        assert_eq!(b.clamp(Duration::ZERO), Duration::from_secs(5));
        assert_eq!(b.clamp(Duration::from_secs(60)), Duration::from_secs(60));
        assert_eq!(
            b.clamp(Duration::from_secs(86_400)),
            Duration::from_secs(300)
        );
        assert_eq!(b.clamp_negative(None), Duration::from_secs(5));
        assert_eq!(
            b.clamp_negative(Some(Duration::from_secs(3600))),
            NEGATIVE_MAX_TTL
        );
        // A floor above the negative ceiling is capped by it.
        assert_eq!(bounds(60, 600).clamp_negative(None), NEGATIVE_MAX_TTL);
        let err = TtlBounds::new(Duration::from_secs(10), Duration::from_secs(2)).unwrap_err();
        assert_eq!(
            err.to_string(),
            "--dns-min-ttl 10s is above --dns-max-ttl 2s"
        );
        assert_eq!(TtlBounds::default(), bounds(5, 300));
    }

    #[tokio::test]
    async fn answers_are_trusted_for_the_clamped_ttl_then_resolved_again() {
        let lookup = Scripted::default();
        lookup.answer(&["127.0.0.10"], Duration::from_secs(3600));
        let resolver = Resolver::with_bounds(lookup.clone(), bounds(0, 3600));
        let first = resolver.resolve("api.test").await.unwrap();
        let left = first.valid_until.saturating_duration_since(Instant::now());
        assert!(left > Duration::from_secs(3590), "{left:?}");
        lookup.answer(&["127.0.0.11"], Duration::ZERO);
        // Still valid: the cache answers, the lookup is not asked.
        assert_eq!(
            resolver.resolve("api.test").await.unwrap().addrs,
            first.addrs
        );
        assert_eq!(lookup.queries(), 1);

        // A zero TTL with a zero floor expires at once: every resolve asks again and sees
        // the rebinding.
        let lookup = Scripted::default();
        lookup.answer(&["127.0.0.10"], Duration::ZERO);
        let resolver = Resolver::with_bounds(lookup.clone(), bounds(0, 3600));
        assert_eq!(
            resolver.resolve("api.test").await.unwrap().addrs,
            [ip("127.0.0.10")]
        );
        lookup.answer(&["127.0.0.11"], Duration::ZERO);
        assert_eq!(
            resolver.resolve("api.test").await.unwrap().addrs,
            [ip("127.0.0.11")]
        );
        assert!(
            !resolver
                .has_address("api.test", ip("127.0.0.10"))
                .await
                .unwrap()
        );
        assert!(
            resolver
                .has_address("api.test", ip("127.0.0.11"))
                .await
                .unwrap()
        );
        assert_eq!(lookup.queries(), 4);

        // The ceiling caps a long TTL.
        let lookup = Scripted::default();
        lookup.answer(&["127.0.0.10"], Duration::from_secs(86_400));
        let resolver = Resolver::with_bounds(lookup, bounds(1, 2));
        let left = resolver
            .resolve("api.test")
            .await
            .unwrap()
            .valid_until
            .saturating_duration_since(Instant::now());
        assert!(left <= Duration::from_secs(2), "{left:?}");
    }

    #[tokio::test]
    async fn negative_answers_and_failures_deny_and_are_cached_briefly() {
        let lookup = Scripted::default();
        lookup.set(Err(LookupError::Negative {
            detail: "NXDomain".to_owned(),
            ttl: Some(Duration::from_secs(86_400)),
        }));
        let resolver = Resolver::with_bounds(lookup.clone(), bounds(5, 300));
        let before = Instant::now();
        let err = resolver.resolve("gone.test").await.unwrap_err();
        assert_eq!(
            err,
            "resolving gone.test: no address (negative answer: NXDomain)"
        );
        let err = resolver
            .has_address("gone.test", ip("127.0.0.1"))
            .await
            .unwrap_err();
        assert!(err.contains("NXDomain"), "{err}");
        assert_eq!(lookup.queries(), 1, "the negative answer is cached");
        let until = resolver.cache().answers["gone.test"].valid_until;
        assert!(until <= before + NEGATIVE_MAX_TTL + Duration::from_secs(1));

        lookup.set(Err(LookupError::Failed {
            detail: "request timed out".to_owned(),
        }));
        let err = resolver.resolve("slow.test").await.unwrap_err();
        assert_eq!(
            err,
            "resolving slow.test: resolver failure: request timed out"
        );
        let until = resolver.cache().answers["slow.test"].valid_until;
        assert!(until <= Instant::now() + FAILURE_TTL);

        lookup.answer(&[], Duration::from_secs(60));
        let err = resolver.resolve("empty.test").await.unwrap_err();
        assert_eq!(err, "resolving empty.test: no address (empty answer)");
    }

    #[tokio::test]
    async fn learned_answers_are_bindable_until_their_clamped_ttl() {
        let lookup = Scripted::default();
        lookup.answer(&["192.0.2.1"], Duration::from_secs(3600));
        let resolver = Resolver::with_bounds(lookup.clone(), bounds(0, 3600));
        // Round robin: the workload's answer (through the DNS proxy) is another subset.
        resolver.learn(
            "API.Test.",
            &[ip("192.0.2.2"), ip("::ffff:192.0.2.3")],
            Duration::from_secs(60),
        );
        assert!(
            resolver
                .has_address("api.test", ip("192.0.2.2"))
                .await
                .unwrap()
        );
        assert!(
            resolver
                .has_address("api.test", ip("192.0.2.3"))
                .await
                .unwrap()
        );
        assert_eq!(lookup.queries(), 0, "a learned address needs no lookup");
        assert!(
            resolver
                .has_address("api.test", ip("192.0.2.1"))
                .await
                .unwrap()
        );
        assert!(
            !resolver
                .has_address("api.test", ip("192.0.2.9"))
                .await
                .unwrap()
        );
        // Learned for one name only.
        assert!(
            !resolver
                .has_address("other.test", ip("192.0.2.2"))
                .await
                .unwrap()
        );

        // A learned answer outlives a failing resolver, but not its TTL.
        let failing = Scripted::default();
        failing.set(Err(LookupError::Failed {
            detail: "timeout".to_owned(),
        }));
        let resolver = Resolver::with_bounds(failing, bounds(0, 3600));
        resolver.learn("api.test", &[ip("192.0.2.2")], Duration::from_secs(60));
        resolver.learn("api.test", &[ip("192.0.2.4")], Duration::ZERO);
        assert!(
            resolver
                .has_address("api.test", ip("192.0.2.2"))
                .await
                .unwrap()
        );
        let err = resolver
            .has_address("api.test", ip("192.0.2.4"))
            .await
            .unwrap_err();
        assert!(err.contains("timeout"), "{err}");

        // The floor applies to learned TTLs too; the ceiling caps them.
        let resolver = Resolver::with_bounds(StaticLookup::new(), bounds(5, 10));
        resolver.learn("api.test", &[ip("192.0.2.2")], Duration::ZERO);
        resolver.learn("api.test", &[ip("192.0.2.5")], Duration::from_secs(86_400));
        assert!(
            resolver
                .has_address("api.test", ip("192.0.2.2"))
                .await
                .unwrap()
        );
        let latest = resolver.cache().learned["api.test"]
            .iter()
            .map(|(_, u)| *u)
            .max()
            .unwrap();
        assert!(latest <= Instant::now() + Duration::from_secs(10));
        // Nothing to learn from an empty answer.
        resolver.learn("empty.test", &[], Duration::from_secs(60));
        assert!(!resolver.cache().learned.contains_key("empty.test"));
    }

    #[tokio::test]
    async fn the_caches_are_bounded() {
        let lookup = Scripted::default();
        lookup.answer(&["192.0.2.1"], Duration::from_secs(60));
        let resolver = Resolver::with_bounds(lookup, bounds(0, 3600));
        for i in 0..CACHE_CAPACITY + 10 {
            resolver.resolve(&format!("n{i}.test")).await.unwrap();
            resolver.learn(
                &format!("n{i}.test"),
                &[ip("192.0.2.2")],
                Duration::from_secs(60),
            );
        }
        let many: Vec<IpAddr> = (0..=255u8)
            .map(|i| IpAddr::from([198, 51, 100, i]))
            .collect();
        resolver.learn("wide.test", &many, Duration::from_secs(60));
        let cache = resolver.cache();
        assert!(
            cache.answers.len() <= CACHE_CAPACITY,
            "{}",
            cache.answers.len()
        );
        assert!(
            cache.learned.len() <= CACHE_CAPACITY,
            "{}",
            cache.learned.len()
        );
        assert_eq!(cache.learned["wide.test"].len(), LEARNED_PER_NAME);
    }

    #[tokio::test]
    async fn a_resolv_conf_configures_the_dns_lookup_with_clear_errors() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("missing.conf");
        let err = DnsLookup::from_resolv_conf(&missing, TtlBounds::default(), 0).unwrap_err();
        assert!(
            err.to_string()
                .starts_with(&format!("--resolv-conf {}: ", missing.display())),
            "{err}"
        );
        let empty = dir.path().join("empty.conf");
        std::fs::write(&empty, "# nothing\nsearch example.test\n").unwrap();
        let err = DnsLookup::from_resolv_conf(&empty, TtlBounds::default(), 0).unwrap_err();
        assert!(err.to_string().contains("no nameservers"), "{err}");
        let garbage = dir.path().join("garbage.conf");
        std::fs::write(&garbage, b"\xff\xfe nameserver \x00\n").unwrap();
        assert!(DnsLookup::from_resolv_conf(&garbage, TtlBounds::default(), 0).is_err());
        // `localhost` never leaves the process (RFC 6761), whatever the nameserver.
        let conf = dir.path().join("resolv.conf");
        std::fs::write(
            &conf,
            "nameserver 127.0.0.1\noptions timeout:1 attempts:1\n",
        )
        .unwrap();
        let lookup = DnsLookup::from_resolv_conf(&conf, TtlBounds::default(), 0).unwrap();
        let answers = lookup.lookup("localhost").await.unwrap();
        assert!(answers.addrs.contains(&ip("127.0.0.1")), "{answers:?}");
    }
}
