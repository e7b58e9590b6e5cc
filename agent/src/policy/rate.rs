//! Rate limits: `rate: N/second|minute|hour` on a destination or a rule.
//!
//! The limits are part of the immutable [`Snapshot`](super::Snapshot); the counters are
//! not. They live in a [`RateLimiter`] that the caller keeps across requests (and across
//! policy reloads: buckets are keyed by value, so a reloaded snapshot with the same
//! workload, destination and rule keeps counting in the same bucket).
//!
//! Each bucket is a token bucket of capacity N that refills continuously at N per
//! period, implemented as the equivalent generic cell rate algorithm in exact integer
//! arithmetic: at one instant exactly N requests pass, and afterwards one more passes
//! every period/N. The clock is passed in ([`Instant`]), so tests use synthetic time.
//!
//! Buckets are per workload × destination (a destination's `rate`) and per workload ×
//! destination × rule (a rule's `rate`). The route in the key is the rule's path
//! pattern, never the request's own path, so `/a`, `/a/` and `/%61` (one canonical path)
//! and also `/v1/customers/1` and `/v1/customers/2` (one route) share a bucket: a client
//! cannot escape a limit by varying how it spells or parameterises the path.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

/// The period of a [`RateLimit`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum RatePeriod {
    /// One second.
    Second,
    /// Sixty seconds.
    Minute,
    /// 3600 seconds.
    Hour,
}

impl RatePeriod {
    /// The period as a duration.
    pub fn duration(self) -> Duration {
        Duration::from_secs(match self {
            RatePeriod::Second => 1,
            RatePeriod::Minute => 60,
            RatePeriod::Hour => 3600,
        })
    }

    fn name(self) -> &'static str {
        match self {
            RatePeriod::Second => "second",
            RatePeriod::Minute => "minute",
            RatePeriod::Hour => "hour",
        }
    }
}

/// `N/period`: at most N requests per period, bursts of up to N.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize)]
pub struct RateLimit {
    count: u32,
    period: RatePeriod,
}

impl RateLimit {
    /// `count` per `period`; `None` for a count of 0.
    pub fn new(count: u32, period: RatePeriod) -> Option<Self> {
        (count > 0).then_some(RateLimit { count, period })
    }

    /// Requests per period (also the burst size).
    pub fn count(self) -> u32 {
        self.count
    }

    /// The period.
    pub fn period(self) -> RatePeriod {
        self.period
    }

    /// Parses `N/second`, `N/minute` or `N/hour`; the error says what is wrong.
    pub fn parse(s: &str) -> Result<Self, &'static str> {
        const EXPECTED: &str = "expected N/second, N/minute or N/hour, e.g. 100/minute";
        let (n, period) = s.split_once('/').ok_or(EXPECTED)?;
        let period = match period {
            "second" => RatePeriod::Second,
            "minute" => RatePeriod::Minute,
            "hour" => RatePeriod::Hour,
            _ => return Err(EXPECTED),
        };
        if n.is_empty() || !n.bytes().all(|b| b.is_ascii_digit()) {
            return Err(EXPECTED);
        }
        let count: u32 = n
            .parse()
            .map_err(|_| "the count must be at most 4294967295")?;
        RateLimit::new(count, period).ok_or("the count must be at least 1")
    }
}

impl fmt::Display for RateLimit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.count, self.period.name())
    }
}

/// Whether a limit belongs to a destination or to a rule.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum RateScope {
    /// The destination's `rate`: all requests of the workload to that destination.
    Destination,
    /// A rule's `rate`: the requests that rule allowed.
    Rule,
}

/// Identifies one bucket. Equal keys share a bucket, also across snapshots.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct RateKey {
    workload: Arc<str>,
    destination: Arc<str>,
    rule: Option<Arc<str>>,
    route: Arc<str>,
}

impl RateKey {
    /// A key: workload name, destination (`host:port`), rule id (none for the
    /// destination's limit) and route (the rule's path pattern; `*` for a destination).
    pub fn new(
        workload: impl Into<Arc<str>>,
        destination: impl Into<Arc<str>>,
        rule: Option<Arc<str>>,
        route: impl Into<Arc<str>>,
    ) -> Self {
        RateKey {
            workload: workload.into(),
            destination: destination.into(),
            rule,
            route: route.into(),
        }
    }

    /// The workload name.
    pub fn workload(&self) -> &str {
        &self.workload
    }

    /// The destination, `host:port`.
    pub fn destination(&self) -> &str {
        &self.destination
    }

    /// The rule id, for a rule's limit.
    pub fn rule(&self) -> Option<&str> {
        self.rule.as_deref()
    }

    /// The route: the rule's path pattern, or `*` for a destination's limit.
    pub fn route(&self) -> &str {
        &self.route
    }

    /// Destination or rule limit.
    pub fn scope(&self) -> RateScope {
        match self.rule {
            Some(_) => RateScope::Rule,
            None => RateScope::Destination,
        }
    }
}

impl fmt::Display for RateKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.rule {
            Some(rule) => write!(
                f,
                "workload {} destination {} rule {rule} ({})",
                self.workload, self.destination, self.route
            ),
            None => write!(
                f,
                "workload {} destination {}",
                self.workload, self.destination
            ),
        }
    }
}

/// A request refused by a rate limit.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("rate limit {limit} of {key} exceeded; retry after {retry_after:?}")]
pub struct RateLimited {
    /// The bucket that is empty.
    pub key: RateKey,
    /// Its limit.
    pub limit: RateLimit,
    /// When the next request could pass.
    pub retry_after: Duration,
}

impl RateLimited {
    /// The stable reason code: `rate_limited`.
    pub fn code(&self) -> &'static str {
        "rate_limited"
    }

    /// The HTTP status: 429.
    pub fn status(&self) -> u16 {
        429
    }
}

/// One bucket: the theoretical arrival time of the next request, in units of
/// 1/N nanoseconds since `epoch`.
#[derive(Debug)]
struct Bucket {
    limit: RateLimit,
    epoch: Instant,
    tat: u128,
}

impl Bucket {
    fn new(limit: RateLimit, now: Instant) -> Self {
        Bucket {
            limit,
            epoch: now,
            tat: 0,
        }
    }

    fn n(&self) -> u128 {
        u128::from(self.limit.count)
    }

    /// Cost of one request, in bucket units: the period in nanoseconds.
    fn cost(&self) -> u128 {
        self.limit.period.duration().as_nanos()
    }

    fn now(&self, now: Instant) -> u128 {
        now.saturating_duration_since(self.epoch).as_nanos() * self.n()
    }

    /// Adapts the bucket to a changed limit, keeping the fraction of tokens used.
    fn relimit(&mut self, limit: RateLimit, now: Instant) {
        if self.limit == limit {
            return;
        }
        let used = self.tat.saturating_sub(self.now(now));
        let old_capacity = self.cost() * self.n();
        self.limit = limit;
        self.epoch = now;
        let capacity = self.cost() * self.n();
        // used / old_capacity is the fraction of the burst in use.
        let scaled = used
            .checked_mul(capacity)
            .map_or_else(|| used / old_capacity * capacity, |x| x / old_capacity);
        self.tat = scaled.min(capacity);
    }

    /// The new arrival time if a request at `now` passes, or how long to wait.
    fn admit(&self, now: Instant) -> Result<u128, Duration> {
        let t = self.now(now);
        let next = self.tat.max(t) + self.cost();
        let capacity = self.cost() * self.n();
        let ahead = next - t;
        if ahead <= capacity {
            Ok(next)
        } else {
            let wait_ns = (ahead - capacity).div_ceil(self.n());
            Err(Duration::from_nanos(
                u64::try_from(wait_ns).unwrap_or(u64::MAX),
            ))
        }
    }

    fn is_full(&self, now: Instant) -> bool {
        self.tat <= self.now(now)
    }
}

/// Thread-safe token buckets, keyed by [`RateKey`]. Keep one per process; share it.
#[derive(Debug, Default)]
pub struct RateLimiter {
    buckets: Mutex<HashMap<RateKey, Bucket>>,
}

impl RateLimiter {
    /// No buckets yet: every bucket starts full.
    pub fn new() -> Self {
        RateLimiter::default()
    }

    /// Takes one token from the bucket of `key` (created full on first use), or says how
    /// long until one is available.
    pub fn check(&self, key: &RateKey, limit: RateLimit, now: Instant) -> Result<(), Duration> {
        let mut buckets = self.buckets.lock().unwrap_or_else(PoisonError::into_inner);
        let bucket = match buckets.get_mut(key) {
            Some(b) => b,
            None => buckets
                .entry(key.clone())
                .or_insert_with(|| Bucket::new(limit, now)),
        };
        bucket.relimit(limit, now);
        bucket.tat = bucket.admit(now)?;
        Ok(())
    }

    /// Takes one token from EACH bucket, or from none: if any bucket is empty, nothing is
    /// consumed and the first empty bucket is reported. Pass the output of
    /// [`Snapshot::rate_limits`](super::Snapshot::rate_limits); the keys must differ.
    pub fn check_all<'a, I>(&self, limits: I, now: Instant) -> Result<(), RateLimited>
    where
        I: IntoIterator<Item = (&'a RateKey, RateLimit)>,
        I::IntoIter: Clone,
    {
        let limits = limits.into_iter();
        let mut buckets = self.buckets.lock().unwrap_or_else(PoisonError::into_inner);
        for (key, limit) in limits.clone() {
            let bucket = match buckets.get_mut(key) {
                Some(b) => b,
                None => buckets
                    .entry(key.clone())
                    .or_insert_with(|| Bucket::new(limit, now)),
            };
            bucket.relimit(limit, now);
            if let Err(retry_after) = bucket.admit(now) {
                return Err(RateLimited {
                    key: key.clone(),
                    limit,
                    retry_after,
                });
            }
        }
        for (key, _) in limits {
            if let Some(bucket) = buckets.get_mut(key)
                && let Ok(next) = bucket.admit(now)
            {
                bucket.tat = next;
            }
        }
        Ok(())
    }

    /// Drops the buckets that are full at `now` (they are indistinguishable from new
    /// ones), bounding memory after reloads remove workloads or rules. Returns how many
    /// buckets remain.
    pub fn prune(&self, now: Instant) -> usize {
        let mut buckets = self.buckets.lock().unwrap_or_else(PoisonError::into_inner);
        buckets.retain(|_, b| !b.is_full(now));
        buckets.len()
    }

    /// How many buckets exist.
    pub fn len(&self) -> usize {
        self.buckets
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }

    /// Whether no bucket exists.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests")]
    use super::*;
    use std::sync::Barrier;
    use std::thread;

    fn key(rule: Option<&str>, route: &str) -> RateKey {
        RateKey::new("billing", "api.example.com:443", rule.map(Arc::from), route)
    }

    fn limit(s: &str) -> RateLimit {
        RateLimit::parse(s).unwrap()
    }

    #[test]
    fn parse_and_display() {
        for (s, count, period) in [
            ("1/second", 1, RatePeriod::Second),
            ("100/minute", 100, RatePeriod::Minute),
            ("4294967295/hour", u32::MAX, RatePeriod::Hour),
        ] {
            let l = RateLimit::parse(s).unwrap();
            assert_eq!((l.count(), l.period()), (count, period), "{s}");
            assert_eq!(l.to_string(), s);
        }
        for bad in [
            "",
            "100",
            "100/min",
            "100/minutes",
            "/minute",
            "-1/second",
            "1.5/second",
            " 1/second",
            "1/Second",
            "0/hour",
            "4294967296/hour",
            "1/second/2",
        ] {
            assert!(RateLimit::parse(bad).is_err(), "{bad:?}");
        }
        assert_eq!(
            RateLimit::parse("0/hour"),
            Err("the count must be at least 1")
        );
    }

    #[test]
    fn burst_then_steady_refill() {
        let rl = RateLimiter::new();
        let k = key(None, "*");
        let l = limit("3/second");
        let t0 = Instant::now();
        for _ in 0..3 {
            assert_eq!(rl.check(&k, l, t0), Ok(()));
        }
        let wait = rl.check(&k, l, t0).unwrap_err();
        assert_eq!(wait, Duration::from_nanos(333_333_334));
        // One token every 1/3 s, exactly.
        let t = t0 + Duration::from_nanos(333_333_333);
        assert!(rl.check(&k, l, t).is_err());
        let t = t0 + Duration::from_nanos(333_333_334);
        assert_eq!(rl.check(&k, l, t), Ok(()));
        assert!(rl.check(&k, l, t).is_err());
        // A long pause refills to capacity, never beyond.
        let t = t0 + Duration::from_secs(100);
        for _ in 0..3 {
            assert_eq!(rl.check(&k, l, t), Ok(()));
        }
        assert!(rl.check(&k, l, t).is_err());
    }

    #[test]
    fn exact_over_a_long_run() {
        // 7 per minute, one request every second for an hour: 7 + 7 × 59 + ... exactly
        // the continuous refill allows.
        let rl = RateLimiter::new();
        let k = key(None, "*");
        let l = limit("7/minute");
        let t0 = Instant::now();
        let passed = (0..3600u64)
            .filter(|s| rl.check(&k, l, t0 + Duration::from_secs(*s)).is_ok())
            .count();
        // Burst of 7 at t=0, then one every 60/7 s over the remaining 3599 s.
        assert_eq!(passed, 7 + (3599 * 7) / 60);
    }

    #[test]
    fn fifty_threads_race_for_n_tokens() {
        const N: u32 = 17;
        let rl = Arc::new(RateLimiter::new());
        let k = key(Some("r"), "/v1/x");
        let l = RateLimit::new(N, RatePeriod::Hour).unwrap();
        let now = Instant::now();
        let barrier = Arc::new(Barrier::new(50));
        let handles: Vec<_> = (0..50)
            .map(|_| {
                let (rl, k, barrier) = (Arc::clone(&rl), k.clone(), Arc::clone(&barrier));
                thread::spawn(move || {
                    barrier.wait();
                    (0..3).filter(|_| rl.check(&k, l, now).is_ok()).count()
                })
            })
            .collect();
        let passed: usize = handles.into_iter().map(|h| h.join().unwrap()).sum();
        assert_eq!(passed, N as usize);
    }

    #[test]
    fn spellings_of_one_route_share_a_bucket() {
        use crate::policy::canonical::normalize;
        // The key is built from the rule's route, so every spelling of the path (and
        // every value of a parameter) lands in the same bucket.
        let rl = RateLimiter::new();
        let l = limit("2/minute");
        let now = Instant::now();
        let mut results = Vec::new();
        for target in ["/a", "/%61", "/./a"] {
            let path = normalize(target).unwrap();
            assert_eq!(path.path(), "/a");
            results.push(rl.check(&key(Some("r"), "/a"), l, now).is_ok());
        }
        assert_eq!(results, [true, true, false]);
        assert_eq!(rl.len(), 1);
    }

    #[test]
    fn check_all_is_all_or_nothing() {
        let rl = RateLimiter::new();
        let dest = key(None, "*");
        let rule = key(Some("r"), "/a");
        let now = Instant::now();
        let both = [(&dest, limit("3/minute")), (&rule, limit("1/minute"))];
        assert_eq!(rl.check_all(both, now), Ok(()));
        let err = rl.check_all(both, now).unwrap_err();
        assert_eq!(err.key, rule);
        assert_eq!(err.code(), "rate_limited");
        assert_eq!(err.status(), 429);
        assert_eq!(err.retry_after, Duration::from_secs(60));
        // The destination bucket was not charged by the refused request: 2 left.
        assert_eq!(rl.check(&dest, limit("3/minute"), now), Ok(()));
        assert_eq!(rl.check(&dest, limit("3/minute"), now), Ok(()));
        assert!(rl.check(&dest, limit("3/minute"), now).is_err());
        assert!(
            err.to_string().starts_with(
                "rate limit 1/minute of workload billing destination api.example.com:443 \
                 rule r (/a) exceeded; retry after"
            ),
            "{err}"
        );
    }

    #[test]
    fn changed_limit_keeps_used_fraction_and_prune_drops_full_buckets() {
        let rl = RateLimiter::new();
        let k = key(None, "*");
        let now = Instant::now();
        for _ in 0..5 {
            assert!(rl.check(&k, limit("10/minute"), now).is_ok());
        }
        // Half used; at 4/minute that is 2 used, so 2 remain.
        assert!(rl.check(&k, limit("4/minute"), now).is_ok());
        assert!(rl.check(&k, limit("4/minute"), now).is_ok());
        assert!(rl.check(&k, limit("4/minute"), now).is_err());
        assert_eq!(rl.prune(now), 1);
        assert_eq!(rl.prune(now + Duration::from_secs(60)), 0);
        assert!(rl.is_empty());
    }
}
