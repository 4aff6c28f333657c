//! Rate limits at the edge: a route's `rate_limit = { rate, burst, key }`, counted per client
//! key with GCRA (the generic cell rate algorithm) in the gateway's memory or in a Redis shared
//! by every gateway.
//!
//! GCRA keeps one number per (route, client): the theoretical arrival time (TAT) — when the
//! client's bucket would be empty had its requests come evenly at the steady rate. Each request
//! moves it one emission interval `T = period / requests` later; a request is refused when that
//! would put the TAT more than `T × burst` ahead of now. So `burst` requests may come at once,
//! after which requests pass at the steady rate; an idle client's TAT falls into the past and
//! its entry carries no state at all, which is what lets both stores forget idle clients.
//!
//! The gateway builds one [`Quota`] per limited route when it starts ([`Quota::for_route`]) and,
//! per request, asks [`RateLimiter::check`] with the client's [`ClientKey`]
//! ([`Quota::client`]). The [`Decision`] sets the `RateLimit-*` headers on the response
//! ([`Decision::apply_headers`]) or becomes a 429 problem ([`Decision::refusal`]).

mod memory;
mod redis_store;

use std::fmt::Write as _;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use flotilla_manifest::{RateLimit, RateLimitKey, RateLimitStore, Route};
use flotilla_proxy::Refusal;
use http::StatusCode;
use http::header::{HeaderMap, HeaderName, HeaderValue, RETRY_AFTER};

use memory::MemoryStore;
use redis_store::RedisStore;

pub const RATELIMIT_LIMIT: HeaderName = HeaderName::from_static("ratelimit-limit");
pub const RATELIMIT_REMAINING: HeaderName = HeaderName::from_static("ratelimit-remaining");
pub const RATELIMIT_RESET: HeaderName = HeaderName::from_static("ratelimit-reset");
pub const RATELIMIT_POLICY: HeaderName = HeaderName::from_static("ratelimit-policy");

/// The problem type of a 429.
pub const RATE_LIMITED: &str = "urn:flotilla:problem:rate-limited";

/// Client key values longer than this are kept as their SHA-1 digest: a header can carry
/// kilobytes, and a flood of such keys must not cost kilobytes of memory (or Redis) each.
const MAX_KEY_BYTES: usize = 64;

/// Counts requests against routes' rate limits; one per gateway, shared by all connections.
pub struct RateLimiter {
    store: Store,
}

enum Store {
    Memory(MemoryStore),
    Redis(RedisStore),
}

impl std::fmt::Debug for RateLimiter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let store = match &self.store {
            Store::Memory(_) => "memory",
            Store::Redis(_) => "redis",
        };
        f.debug_struct("RateLimiter")
            .field("store", &store)
            .field("stats", &self.stats())
            .finish()
    }
}

/// What the limiter has seen, for metrics and tests.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RateLimitStats {
    /// Clients with state in memory right now (always 0 with Redis).
    pub entries: usize,
    /// Clients forgotten while their TAT was still ahead because memory was full: each got a
    /// fresh bucket, so a flood of keys cannot grow memory but can make the limit more lenient.
    pub forgiven: u64,
    /// Requests let through uncounted because Redis did not answer in time.
    pub store_failures: u64,
}

impl RateLimiter {
    /// The limiter for `[gateway.rate_limit] store`. With Redis it connects and loads the GCRA
    /// script first, so a wrong URL or a server that is down is reported at start, not per
    /// request. `app` keeps the counters of apps sharing one Redis apart.
    ///
    /// The memory store sweeps idle clients every 10 seconds on a task that ends when the
    /// limiter is dropped.
    pub async fn start(store: &RateLimitStore, app: &str) -> Result<Arc<RateLimiter>, String> {
        match store {
            RateLimitStore::Memory => {
                let limiter = Arc::new(RateLimiter {
                    store: Store::Memory(MemoryStore::new()),
                });
                memory::spawn_sweeper(Arc::downgrade(&limiter));
                Ok(limiter)
            }
            RateLimitStore::Redis { url } => {
                let store = RedisStore::connect(url, app).await?;
                Ok(Arc::new(RateLimiter {
                    store: Store::Redis(store),
                }))
            }
        }
    }

    /// Counts one request of `client` against `quota`. Never fails: when Redis does not answer
    /// within 50ms the request is allowed uncounted (see [`Decision::counted`]).
    pub async fn check(&self, quota: &Quota, client: ClientKey<'_>) -> Decision {
        match &self.store {
            Store::Memory(store) => store.check(quota, client),
            Store::Redis(store) => store.check(quota, client).await,
        }
    }

    pub fn stats(&self) -> RateLimitStats {
        match &self.store {
            Store::Memory(store) => RateLimitStats {
                entries: store.entries(),
                forgiven: store.forgiven(),
                store_failures: 0,
            },
            Store::Redis(store) => RateLimitStats {
                store_failures: store.failures(),
                ..RateLimitStats::default()
            },
        }
    }

    /// Forgets the clients whose TAT has passed (they carry no state); the memory store does
    /// this by itself every 10 seconds and whenever a shard fills up.
    pub fn sweep(&self) {
        if let Store::Memory(store) = &self.store {
            store.sweep();
        }
    }
}

/// Whose requests are counted together: what a route's `key` picks out of a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientKey<'a> {
    /// The client's address.
    Ip(IpAddr),
    /// An API key's name, a verified subject or a header's value.
    Value(&'a [u8]),
    /// `key = "route"`: everyone together.
    Everyone,
}

/// One route's limit, prepared once when the gateway starts so that checking a request
/// allocates nothing in memory.
#[derive(Debug, Clone)]
pub struct Quota {
    route: Arc<str>,
    key: RateLimitKey,
    /// For `key = "header:NAME"`.
    header: Option<HeaderName>,
    /// The emission interval `T`, in nanoseconds (at least 1).
    interval_ns: u64,
    /// `T × burst`: how far ahead of now the TAT may run.
    capacity_ns: u64,
    /// `T` in whole microseconds, as Redis counts (at least 1).
    interval_us: u64,
    burst: u32,
    /// `flotilla:rl:{app}:` comes from the limiter; this is `{route}:` with `%` and `:` escaped.
    redis_route: Box<[u8]>,
    policy: Arc<Policy>,
}

/// What a refusal and the headers say about the limit.
#[derive(Debug)]
struct Policy {
    /// `100;w=1;burst=20`.
    header: HeaderValue,
    /// `100 requests per second with bursts of 20`.
    text: Box<str>,
}

impl Quota {
    /// The quota of `route`, if it has a `rate_limit`. Routes sharing a prefix (one per API
    /// version) are counted apart.
    pub fn for_route(route: &Route) -> Option<Quota> {
        let limit = route.rate_limit.as_ref()?;
        let id = match &route.version {
            Some(version) => format!("{}@{}", route.prefix, version.name),
            None => route.prefix.clone(),
        };
        Some(Quota::new(&id, limit))
    }

    /// `route` names the counters: quotas with the same name share them (also across gateways
    /// sharing a Redis).
    pub fn new(route: &str, limit: &RateLimit) -> Quota {
        let requests = u128::from(limit.requests.max(1));
        let burst = limit.burst.max(1);
        let per_ns = limit.per.as_nanos().max(1);
        let interval_ns = u64::try_from(per_ns / requests).unwrap_or(u64::MAX).max(1);
        let interval_us = u64::try_from((per_ns / requests + 500) / 1000)
            .unwrap_or(u64::MAX)
            .max(1);
        let window = limit.per.as_secs().max(1);
        let (count, unit) = match window {
            1 => (limit.requests, "second".to_owned()),
            60 => (limit.requests, "minute".to_owned()),
            3600 => (limit.requests, "hour".to_owned()),
            other => (limit.requests, format!("{other} seconds")),
        };
        let text = if burst > 1 {
            format!("{count} requests per {unit} with bursts of {burst}")
        } else {
            format!("{count} requests per {unit}")
        };
        let header = HeaderValue::try_from(format!("{count};w={window};burst={burst}"))
            .unwrap_or(HeaderValue::from_static(""));
        let mut redis_route = String::with_capacity(route.len() + 1);
        for c in route.chars() {
            match c {
                '%' => redis_route.push_str("%25"),
                ':' => redis_route.push_str("%3A"),
                c => redis_route.push(c),
            }
        }
        redis_route.push(':');
        Quota {
            route: route.into(),
            header: match &limit.key {
                RateLimitKey::Header(name) => HeaderName::try_from(name.as_str()).ok(),
                _ => None,
            },
            key: limit.key.clone(),
            interval_ns,
            capacity_ns: interval_ns.saturating_mul(u64::from(burst)),
            interval_us,
            burst,
            redis_route: redis_route.into_bytes().into(),
            policy: Arc::new(Policy {
                header,
                text: text.into(),
            }),
        }
    }

    /// The route's name, as given to [`Quota::new`].
    pub fn route(&self) -> &str {
        &self.route
    }

    /// Whose bucket a request goes into, by the route's `key`: `api_key` is the name of the API
    /// key the request was authenticated with, `subject` the verified JWT `sub` or API key name.
    /// Requests without what the key asks for are counted by `peer` (the client address).
    pub fn client<'a>(
        &self,
        peer: IpAddr,
        headers: &'a HeaderMap,
        api_key: Option<&'a str>,
        subject: Option<&'a str>,
    ) -> ClientKey<'a> {
        let value = match &self.key {
            RateLimitKey::ClientIp => None,
            RateLimitKey::Route => return ClientKey::Everyone,
            RateLimitKey::ApiKey => api_key.map(str::as_bytes),
            RateLimitKey::Subject => subject.map(str::as_bytes),
            RateLimitKey::Header(_) => self
                .header
                .as_ref()
                .and_then(|name| headers.get(name))
                .map(HeaderValue::as_bytes),
        };
        match value {
            Some(value) if !value.is_empty() => ClientKey::Value(value),
            _ => ClientKey::Ip(peer),
        }
    }

    /// The decision for a request let through uncounted.
    fn uncounted(&self) -> Decision {
        Decision {
            allowed: true,
            limit: self.burst,
            remaining: self.burst,
            reset: Duration::ZERO,
            retry_after: None,
            counted: false,
            policy: self.policy.clone(),
        }
    }
}

/// A client key as both stores keep it: values longer than [`MAX_KEY_BYTES`] by their digest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum KeyForm<'a> {
    Ip(IpAddr),
    Value(&'a [u8]),
    Digest([u8; 20]),
    Everyone,
}

impl<'a> KeyForm<'a> {
    fn of(client: ClientKey<'a>) -> Self {
        match client {
            ClientKey::Ip(ip) => KeyForm::Ip(ip),
            ClientKey::Value(value) if value.len() > MAX_KEY_BYTES => {
                KeyForm::Digest(sha1_smol::Sha1::from(value).digest().bytes())
            }
            ClientKey::Value(value) => KeyForm::Value(value),
            ClientKey::Everyone => KeyForm::Everyone,
        }
    }

    /// The client's part of a Redis key: `ip:1.2.3.4`, `v:VALUE`, `d:HEX` or `*`. The tags keep
    /// a header value that looks like an address from sharing that address's bucket.
    fn write_redis(self, key: &mut Vec<u8>) {
        match self {
            KeyForm::Ip(ip) => {
                let mut text = String::with_capacity(48);
                let _ = write!(text, "ip:{ip}");
                key.extend_from_slice(text.as_bytes());
            }
            KeyForm::Value(value) => {
                key.extend_from_slice(b"v:");
                key.extend_from_slice(value);
            }
            KeyForm::Digest(digest) => {
                key.extend_from_slice(b"d:");
                for byte in digest {
                    key.extend_from_slice(&HEX[usize::from(byte >> 4)..][..1]);
                    key.extend_from_slice(&HEX[usize::from(byte & 15)..][..1]);
                }
            }
            KeyForm::Everyone => key.push(b'*'),
        }
    }
}

const HEX: &[u8; 16] = b"0123456789abcdef";

/// What GCRA says about one request, in nanoseconds (memory) or microseconds (Redis).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Outcome {
    allowed: bool,
    /// The TAT to store when allowed.
    tat: u64,
    remaining: u64,
    /// Until the bucket is full again.
    reset: u64,
    /// Until this request would have been allowed (0 when it is).
    retry_after: u64,
}

/// One GCRA step: a request at `now` against the stored `tat` (0 for none), with emission
/// interval `interval` and `capacity = interval × burst`, all in one time unit.
fn gcra(tat: u64, now: u64, interval: u64, capacity: u64) -> Outcome {
    let tat = tat.max(now);
    let new_tat = tat.saturating_add(interval);
    let allow_at = new_tat.saturating_sub(capacity);
    if now < allow_at {
        return Outcome {
            allowed: false,
            tat,
            remaining: 0,
            reset: tat - now,
            retry_after: allow_at - now,
        };
    }
    Outcome {
        allowed: true,
        tat: new_tat,
        remaining: (now.saturating_add(capacity) - new_tat) / interval,
        reset: new_tat - now,
        retry_after: 0,
    }
}

/// What the limiter decided about one request.
#[derive(Debug, Clone)]
pub struct Decision {
    pub allowed: bool,
    /// `RateLimit-Limit`: the burst, the most requests that may come at once.
    pub limit: u32,
    /// `RateLimit-Remaining`: how many more may come right now.
    pub remaining: u32,
    /// `RateLimit-Reset`: until the whole burst is available again.
    pub reset: Duration,
    /// For a refused request: when it would have been allowed.
    pub retry_after: Option<Duration>,
    /// False when the store did not answer and the request was let through uncounted.
    pub counted: bool,
    policy: Arc<Policy>,
}

impl Decision {
    /// `duration` turns the outcome's time unit into a `Duration`.
    fn new(quota: &Quota, outcome: Outcome, duration: fn(u64) -> Duration) -> Decision {
        Decision {
            allowed: outcome.allowed,
            limit: quota.burst,
            remaining: u32::try_from(outcome.remaining)
                .unwrap_or(u32::MAX)
                .min(quota.burst),
            reset: duration(outcome.reset),
            retry_after: (!outcome.allowed).then(|| duration(outcome.retry_after)),
            counted: true,
            policy: quota.policy.clone(),
        }
    }

    /// `RateLimit-Limit`, `-Remaining`, `-Reset` (whole seconds, rounded up) and `-Policy`
    /// (`100;w=1;burst=20`); a request let through uncounted gets only the policy.
    pub fn apply_headers(&self, headers: &mut HeaderMap) {
        headers.insert(RATELIMIT_POLICY, self.policy.header.clone());
        if !self.counted {
            return;
        }
        headers.insert(RATELIMIT_LIMIT, HeaderValue::from(self.limit));
        headers.insert(RATELIMIT_REMAINING, HeaderValue::from(self.remaining));
        headers.insert(RATELIMIT_RESET, HeaderValue::from(ceil_seconds(self.reset)));
    }

    /// The 429 problem for a refused request, with `Retry-After` (whole seconds, at least 1)
    /// and the `RateLimit-*` headers.
    pub fn refusal(&self) -> Refusal {
        let wait = ceil_seconds(self.retry_after.unwrap_or(Duration::ZERO)).max(1);
        let mut refusal = Refusal::new(
            StatusCode::TOO_MANY_REQUESTS,
            RATE_LIMITED,
            "Too many requests",
            format!("this route allows {}; retry in {wait}s", self.policy.text),
        );
        self.apply_headers(&mut refusal.headers);
        refusal.headers.insert(RETRY_AFTER, HeaderValue::from(wait));
        refusal
    }
}

fn ceil_seconds(duration: Duration) -> u64 {
    duration.as_secs() + u64::from(duration.subsec_nanos() > 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_passes_at_once_then_the_steady_rate() {
        let (interval, capacity) = (10, 30);
        let mut tat = 0;
        for remaining in [2, 1, 0] {
            let outcome = gcra(tat, 100, interval, capacity);
            assert!(outcome.allowed);
            assert_eq!(outcome.remaining, remaining);
            tat = outcome.tat;
        }
        let refused = gcra(tat, 100, interval, capacity);
        assert!(!refused.allowed);
        assert_eq!((refused.retry_after, refused.reset), (10, 30));
        assert_eq!(refused.tat, tat, "a refusal does not move the TAT");
        let later = gcra(tat, 110, interval, capacity);
        assert!(later.allowed);
        assert_eq!(later.remaining, 0);
        assert!(!gcra(later.tat, 110, interval, capacity).allowed);
    }

    #[test]
    fn an_idle_client_starts_afresh() {
        let outcome = gcra(50, 1_000, 10, 30);
        assert_eq!(outcome.tat, 1_010);
        assert_eq!(outcome.remaining, 2);
        assert_eq!(outcome.reset, 10);
    }

    #[test]
    fn quotas_describe_themselves() {
        let limit = RateLimit {
            requests: 100,
            per: Duration::from_secs(1),
            burst: 20,
            key: RateLimitKey::ClientIp,
        };
        let quota = Quota::new("/api:v1%", &limit);
        assert_eq!(quota.interval_ns, 10_000_000);
        assert_eq!(quota.capacity_ns, 200_000_000);
        assert_eq!(quota.interval_us, 10_000);
        assert_eq!(quota.policy.header, "100;w=1;burst=20");
        assert_eq!(&*quota.redis_route, b"/api%3Av1%25:");
        let thirds = Quota::new(
            "/",
            &RateLimit {
                requests: 3,
                burst: 1,
                per: Duration::from_secs(60),
                ..limit
            },
        );
        assert_eq!(thirds.interval_us, 20_000_000);
        assert_eq!(&*thirds.policy.text, "3 requests per minute");
    }

    #[test]
    fn long_values_are_kept_as_digests() {
        let long = [b'a'; 65];
        assert!(matches!(
            KeyForm::of(ClientKey::Value(&long)),
            KeyForm::Digest(_)
        ));
        let mut key = Vec::new();
        KeyForm::of(ClientKey::Value(&long)).write_redis(&mut key);
        assert_eq!(key.len(), 2 + 40);
        key.clear();
        KeyForm::of(ClientKey::Ip("::1".parse().expect("ip"))).write_redis(&mut key);
        assert_eq!(key, b"ip:::1");
    }
}
