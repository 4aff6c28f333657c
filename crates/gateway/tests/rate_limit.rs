//! The rate limiter against both stores: GCRA's burst and steady rate, per-key buckets, the
//! headers and the 429 problem, bounded memory, concurrency, and Redis shared by two gateways,
//! unreachable at start, and breaking mid-run (fail open).
//!
//! Redis tests need a real server at FLOTILLA_TEST_REDIS_URL (e.g. redis://127.0.0.1:6379) and
//! are skipped without one.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use flotilla_gateway::rate_limit::{ClientKey, Decision, Quota, RateLimiter};
use flotilla_manifest::{RateLimit, RateLimitKey, RateLimitStore, Route};
use http::{HeaderMap, HeaderValue, StatusCode};
use http_body_util::BodyExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;

/// Counts the allocations of each thread, to show that checking a known client allocates
/// nothing.
struct CountingAllocator;

thread_local! {
    static ALLOCATIONS: Cell<u64> = const { Cell::new(0) };
}

// A pass-through to the system allocator that only counts.
#[allow(unsafe_code)]
unsafe impl GlobalAlloc for CountingAllocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let _ = ALLOCATIONS.try_with(|count| count.set(count.get() + 1));
        // SAFETY: the caller's contract is passed on unchanged.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: as above.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOCATOR: CountingAllocator = CountingAllocator;

fn allocations() -> u64 {
    ALLOCATIONS.with(Cell::get)
}

fn limit(requests: u32, per: Duration, burst: u32) -> RateLimit {
    RateLimit {
        requests,
        per,
        burst,
        key: RateLimitKey::ClientIp,
    }
}

fn ip(last: u8) -> ClientKey<'static> {
    ClientKey::Ip(IpAddr::V4(Ipv4Addr::new(10, 0, 0, last)))
}

async fn memory() -> Arc<RateLimiter> {
    RateLimiter::start(&RateLimitStore::Memory, "shop")
        .await
        .expect("a memory limiter always starts")
}

/// `burst` requests pass at once, the next is refused until one interval has passed.
async fn burst_then_steady_rate(limiter: &RateLimiter, quota: &Quota, interval: Duration) {
    let client = ip(1);
    for remaining in (0..3).rev() {
        let decision = limiter.check(quota, client).await;
        assert!(decision.allowed, "{decision:?}");
        assert!(decision.counted);
        assert_eq!((decision.limit, decision.remaining), (3, remaining));
        assert_eq!(decision.retry_after, None);
    }
    let refused = limiter.check(quota, client).await;
    assert!(!refused.allowed, "{refused:?}");
    assert_eq!(refused.remaining, 0);
    let retry_after = refused.retry_after.expect("a refusal says when to retry");
    assert!(
        retry_after <= interval && retry_after > interval / 4,
        "retry after {retry_after:?}, interval {interval:?}"
    );
    assert!(refused.reset >= retry_after && refused.reset <= interval * 3);

    tokio::time::sleep(retry_after).await;
    let again = limiter.check(quota, client).await;
    assert!(
        again.allowed,
        "one interval later one more passes: {again:?}"
    );
    assert!(!limiter.check(quota, client).await.allowed, "but only one");
}

#[tokio::test(start_paused = true)]
async fn memory_burst_passes_then_the_steady_rate() {
    let limiter = memory().await;
    let quota = Quota::new("/api", &limit(10, Duration::from_secs(1), 3));
    burst_then_steady_rate(&limiter, &quota, Duration::from_millis(100)).await;
    // The clock is paused: the refusal waits exactly one interval.
    let client = ip(2);
    for _ in 0..3 {
        assert!(limiter.check(&quota, client).await.allowed);
    }
    let refused = limiter.check(&quota, client).await;
    assert_eq!(refused.retry_after, Some(Duration::from_millis(100)));
    assert_eq!(refused.reset, Duration::from_millis(300));
}

#[tokio::test(start_paused = true)]
async fn memory_the_steady_rate_holds_over_time() {
    let limiter = memory().await;
    let quota = Quota::new("/api", &limit(5, Duration::from_secs(1), 2));
    // A client trying every 50ms for 10s gets the burst plus 5 a second, no more.
    let mut allowed = 0;
    for _ in 0..200 {
        if limiter.check(&quota, ip(1)).await.allowed {
            allowed += 1;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(allowed, 2 + 50 - 1, "burst of 2, then one every 200ms");
}

#[tokio::test(start_paused = true)]
async fn memory_buckets_are_per_client_and_per_route() {
    let limiter = memory().await;
    let api = Quota::new("/api", &limit(1, Duration::from_secs(60), 1));
    let admin = Quota::new("/admin", &limit(1, Duration::from_secs(60), 1));
    assert!(limiter.check(&api, ip(1)).await.allowed);
    assert!(!limiter.check(&api, ip(1)).await.allowed);
    assert!(limiter.check(&api, ip(2)).await.allowed, "another client");
    assert!(limiter.check(&admin, ip(1)).await.allowed, "another route");
    // A header value spelling an address does not share that address's bucket.
    assert!(
        limiter
            .check(&api, ClientKey::Value(b"10.0.0.1"))
            .await
            .allowed
    );
    assert!(
        !limiter
            .check(&api, ClientKey::Value(b"10.0.0.1"))
            .await
            .allowed
    );
    assert!(
        limiter
            .check(&api, ClientKey::Value(b"tenant-b"))
            .await
            .allowed
    );
    // Long values are kept by digest: still one bucket per value.
    let long_a = [b'a'; 500];
    let mut long_b = long_a;
    long_b[499] = b'b';
    assert!(limiter.check(&api, ClientKey::Value(&long_a)).await.allowed);
    assert!(!limiter.check(&api, ClientKey::Value(&long_a)).await.allowed);
    assert!(limiter.check(&api, ClientKey::Value(&long_b)).await.allowed);
    // Quotas built apart for the same route name share its buckets.
    let api_again = Quota::new("/api", &limit(1, Duration::from_secs(60), 1));
    assert!(!limiter.check(&api_again, ip(2)).await.allowed);
}

#[tokio::test]
async fn checking_a_known_client_allocates_nothing() {
    let limiter = memory().await;
    let quota = Quota::new("/api", &limit(1000, Duration::from_secs(1), 1000));
    let tenant = ClientKey::Value(b"tenant-with-a-name");
    let long = [b'x'; 300];
    for client in [ip(1), tenant, ClientKey::Value(&long), ClientKey::Everyone] {
        assert!(limiter.check(&quota, client).await.allowed, "first request");
        let before = allocations();
        let decision = limiter.check(&quota, client).await;
        let after = allocations();
        assert!(decision.allowed && decision.counted);
        assert_eq!(after - before, 0, "{client:?}");
    }
    // The count is real: a new client's key is copied into the store.
    let before = allocations();
    limiter.check(&quota, ClientKey::Value(b"newcomer")).await;
    assert!(allocations() > before);
}

#[tokio::test(start_paused = true)]
async fn headers_and_the_429_problem() {
    let limiter = memory().await;
    let quota = Quota::new("/api", &limit(100, Duration::from_secs(1), 20));
    let decision = limiter.check(&quota, ip(1)).await;
    let mut headers = HeaderMap::new();
    decision.apply_headers(&mut headers);
    assert_eq!(headers["ratelimit-limit"], "20");
    assert_eq!(headers["ratelimit-remaining"], "19");
    // 10ms until the bucket is full again, rounded up to whole seconds.
    assert_eq!(headers["ratelimit-reset"], "1");
    assert_eq!(headers["ratelimit-policy"], "100;w=1;burst=20");

    let slow = Quota::new("/slow", &limit(2, Duration::from_secs(60), 1));
    assert!(limiter.check(&slow, ip(1)).await.allowed);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let refused = limiter.check(&slow, ip(1)).await;
    assert!(!refused.allowed);
    assert_eq!(refused.retry_after, Some(Duration::from_millis(29_500)));
    let refusal = refused.refusal();
    assert_eq!(refusal.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(refusal.kind, "urn:flotilla:problem:rate-limited");
    assert_eq!(refusal.headers["retry-after"], "30", "29.5s rounded up");
    assert_eq!(refusal.headers["ratelimit-remaining"], "0");
    assert_eq!(refusal.headers["ratelimit-policy"], "2;w=60;burst=1");

    // What the client gets: a problem+json 429 carrying every header.
    let response =
        flotilla_proxy::Error::from(refusal).to_response(Some(&HeaderValue::from_static("req-1")));
    assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);
    let headers = response.headers().clone();
    assert_eq!(headers["content-type"], "application/problem+json");
    assert_eq!(headers["retry-after"], "30");
    assert_eq!(headers["ratelimit-limit"], "1");
    assert_eq!(headers["ratelimit-reset"], "30");
    let body = response
        .into_body()
        .collect()
        .await
        .expect("body")
        .to_bytes();
    let problem: serde_json::Value = serde_json::from_slice(&body).expect("json");
    assert_eq!(problem["type"], "urn:flotilla:problem:rate-limited");
    assert_eq!(problem["status"], 429);
    assert_eq!(
        problem["detail"],
        "this route allows 2 requests per minute; retry in 30s"
    );
}

#[tokio::test(start_paused = true)]
async fn retry_after_is_at_least_one_second() {
    let limiter = memory().await;
    let quota = Quota::new("/fast", &limit(1000, Duration::from_secs(1), 1));
    assert!(limiter.check(&quota, ip(1)).await.allowed);
    let refused = limiter.check(&quota, ip(1)).await;
    assert_eq!(refused.retry_after, Some(Duration::from_millis(1)));
    assert_eq!(refused.refusal().headers["retry-after"], "1");
}

#[tokio::test(start_paused = true)]
async fn idle_clients_are_swept_and_memory_stays_bounded() {
    let limiter = memory().await;
    let quota = Quota::new("/api", &limit(1, Duration::from_secs(1), 1));
    for n in 0..100_000u32 {
        let client = IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + n));
        assert!(limiter.check(&quota, ClientKey::Ip(client)).await.allowed);
    }
    assert_eq!(limiter.stats().entries, 100_000);
    // One client stays busy: its state must survive the sweeps.
    let slow = Quota::new("/slow", &limit(1, Duration::from_secs(3600), 1));
    assert!(limiter.check(&slow, ip(1)).await.allowed);

    // Their TATs pass after a second; the sweeper runs every 10s by itself.
    tokio::time::sleep(Duration::from_secs(11)).await;
    assert_eq!(limiter.stats().entries, 1);
    assert!(!limiter.check(&slow, ip(1)).await.allowed);

    // A flood of keys that all stay live cannot grow memory past the cap.
    let long = Quota::new("/long", &limit(1, Duration::from_secs(3600), 1));
    for n in 0..300_000u32 {
        limiter
            .check(&long, ClientKey::Value(&n.to_le_bytes()))
            .await;
    }
    let stats = limiter.stats();
    assert!(stats.entries <= 262_144, "{stats:?}");
    assert!(stats.forgiven >= 300_000 - 262_144, "{stats:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_requests_pass_exactly_the_burst() {
    let limiter = memory().await;
    let shared = Arc::new(Quota::new("/api", &limit(1, Duration::from_secs(3600), 50)));
    let mut tasks = JoinSet::new();
    for task in 0..32u8 {
        let (limiter, quota) = (limiter.clone(), shared.clone());
        tasks.spawn(async move {
            let mut allowed = [0u32; 4];
            for _ in 0..25 {
                // Everyone shares one bucket; four clients have one each.
                if limiter.check(&quota, ClientKey::Everyone).await.allowed {
                    allowed[0] += 1;
                }
                if limiter.check(&quota, ip(task % 3 + 1)).await.allowed {
                    allowed[usize::from(task % 3) + 1] += 1;
                }
            }
            allowed
        });
    }
    let mut allowed = [0u32; 4];
    while let Some(counts) = tasks.join_next().await {
        for (total, count) in allowed.iter_mut().zip(counts.expect("task")) {
            *total += count;
        }
    }
    assert_eq!(allowed, [50, 50, 50, 50]);
}

#[tokio::test]
async fn quotas_pick_the_client_by_key() {
    let peer = IpAddr::V4(Ipv4Addr::new(192, 0, 2, 7));
    let mut headers = HeaderMap::new();
    headers.insert("x-tenant", HeaderValue::from_static("acme"));
    headers.insert("x-empty", HeaderValue::from_static(""));
    let route = |key| {
        let mut route = Route::new("/api", "orders");
        route.rate_limit = Some(RateLimit {
            key,
            ..limit(1, Duration::from_secs(1), 1)
        });
        Quota::for_route(&route).expect("limited")
    };
    let by = |key, api_key, subject| route(key).client(peer, &headers, api_key, subject);
    assert_eq!(by(RateLimitKey::ClientIp, None, None), ClientKey::Ip(peer));
    assert_eq!(by(RateLimitKey::Route, None, None), ClientKey::Everyone);
    assert_eq!(
        by(RateLimitKey::Header("x-tenant".into()), None, None),
        ClientKey::Value(b"acme")
    );
    assert_eq!(
        by(RateLimitKey::Header("x-empty".into()), None, None),
        ClientKey::Ip(peer),
        "an empty value counts as absent"
    );
    assert_eq!(
        by(RateLimitKey::Header("x-missing".into()), None, None),
        ClientKey::Ip(peer)
    );
    assert_eq!(
        by(RateLimitKey::ApiKey, Some("partner"), Some("alice")),
        ClientKey::Value(b"partner")
    );
    assert_eq!(
        by(RateLimitKey::ApiKey, None, Some("alice")),
        ClientKey::Ip(peer)
    );
    assert_eq!(
        by(RateLimitKey::Subject, None, Some("alice")),
        ClientKey::Value(b"alice")
    );
    assert_eq!(by(RateLimitKey::Subject, None, None), ClientKey::Ip(peer));
    assert!(Quota::for_route(&Route::new("/free", "web")).is_none());
}

// ---- Redis ----

fn redis_url() -> Option<String> {
    let url = std::env::var("FLOTILLA_TEST_REDIS_URL").ok();
    if url.is_none() {
        eprintln!("skipped: FLOTILLA_TEST_REDIS_URL not set");
    }
    url
}

async fn redis(url: &str, app: &str) -> Arc<RateLimiter> {
    RateLimiter::start(&RateLimitStore::Redis { url: url.into() }, app)
        .await
        .expect("Redis at FLOTILLA_TEST_REDIS_URL")
}

/// A route name no other test run uses, so runs sharing a Redis never see each other's counts.
fn unique(route: &str) -> String {
    format!("{route}-{:016x}", fastrand::u64(..))
}

#[tokio::test]
async fn redis_burst_passes_then_the_steady_rate() {
    let Some(url) = redis_url() else { return };
    let limiter = redis(&url, "test").await;
    let quota = Quota::new(&unique("/burst"), &limit(10, Duration::from_secs(1), 3));
    burst_then_steady_rate(&limiter, &quota, Duration::from_millis(100)).await;
    assert_eq!(limiter.stats().store_failures, 0);
}

#[tokio::test]
async fn redis_two_gateways_share_the_limit() {
    let Some(url) = redis_url() else { return };
    let (first, second) = (redis(&url, "test").await, redis(&url, "test").await);
    let quota = Quota::new(&unique("/shared"), &limit(1, Duration::from_secs(3600), 5));
    for limiter in [&first, &first, &first, &second, &second] {
        let decision = limiter.check(&quota, ip(1)).await;
        assert!(decision.allowed && decision.counted, "{decision:?}");
    }
    let refused: [Decision; 2] = [
        first.check(&quota, ip(1)).await,
        second.check(&quota, ip(1)).await,
    ];
    for decision in refused {
        assert!(!decision.allowed, "{decision:?}");
        let retry = decision.retry_after.expect("retry after");
        assert!(retry > Duration::from_secs(3590) && retry <= Duration::from_secs(3600));
    }
    // Another client, and another app on the same Redis, have buckets of their own.
    assert!(second.check(&quota, ip(2)).await.allowed);
    let other_app = redis(&url, "other").await;
    assert!(other_app.check(&quota, ip(1)).await.allowed);
}

#[tokio::test]
async fn redis_keys_expire_when_their_tat_passes() {
    let Some(url) = redis_url() else { return };
    let limiter = redis(&url, "test").await;
    let route = unique("/expire");
    let quota = Quota::new(&route, &limit(20, Duration::from_secs(1), 1));
    assert!(
        limiter
            .check(&quota, ClientKey::Value(b"tenant"))
            .await
            .allowed
    );
    let mut connection = redis::Client::open(url.as_str())
        .expect("url")
        .get_multiplexed_async_connection()
        .await
        .expect("connect");
    let key = format!("flotilla:rl:test:{route}:v:tenant");
    let ttl: i64 = redis::cmd("PTTL")
        .arg(&key)
        .query_async(&mut connection)
        .await
        .expect("pttl");
    assert!((1..=50).contains(&ttl), "50ms interval, ttl {ttl}ms");
    tokio::time::sleep(Duration::from_millis(120)).await;
    let exists: bool = redis::cmd("EXISTS")
        .arg(&key)
        .query_async(&mut connection)
        .await
        .expect("exists");
    assert!(!exists, "an idle client's key vanishes");
}

#[tokio::test]
async fn start_on_a_closed_port_says_so() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("addr").port();
    drop(listener);
    let started = tokio::time::Instant::now();
    let store = RateLimitStore::Redis {
        url: format!("redis://:secret@127.0.0.1:{port}"),
    };
    let error = match RateLimiter::start(&store, "test").await {
        Ok(_) => panic!("nothing listens on port {port}"),
        Err(error) => error,
    };
    eprintln!("{error}");
    assert!(
        error.starts_with(&format!(
            "cannot use the rate limit store at redis://***@127.0.0.1:{port}: "
        )),
        "{error}"
    );
    assert!(error.contains("store = \"memory\""), "{error}");
    assert!(!error.contains("secret"), "{error}");
    assert!(started.elapsed() < Duration::from_secs(5));
}

#[tokio::test]
async fn rediss_to_a_server_without_tls_says_so() {
    // A server that answers the TLS hello with plain text, as a non-TLS Redis would.
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let server = tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            use tokio::io::AsyncWriteExt;
            let _ = socket.write_all(b"-ERR unknown command\r\n").await;
        }
    });
    let store = RateLimitStore::Redis {
        url: format!("rediss://127.0.0.1:{port}"),
    };
    let error = match RateLimiter::start(&store, "test").await {
        Ok(_) => panic!("no TLS there"),
        Err(error) => error,
    };
    eprintln!("{error}");
    assert!(
        error.starts_with(&format!(
            "cannot use the rate limit store at rediss://127.0.0.1:{port}: "
        )),
        "{error}"
    );
    server.abort();
}

/// A TCP proxy in front of Redis that the test can cut.
struct Cable {
    addr: SocketAddr,
    tasks: JoinSet<()>,
}

impl Cable {
    async fn lay(listen: SocketAddr, redis: SocketAddr) -> Cable {
        let listener = TcpListener::bind(listen).await.expect("bind the proxy");
        let addr = listener.local_addr().expect("addr");
        let mut tasks = JoinSet::new();
        tasks.spawn(async move {
            let mut connections = JoinSet::new();
            loop {
                let Ok((mut client, _)) = listener.accept().await else {
                    return;
                };
                connections.spawn(async move {
                    if let Ok(mut server) = TcpStream::connect(redis).await {
                        let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                    }
                });
            }
            // Dropping `connections` with this task closes every proxied connection.
        });
        Cable { addr, tasks }
    }

    async fn cut(mut self) {
        self.tasks.shutdown().await;
    }
}

async fn redis_addr(url: &str) -> SocketAddr {
    let rest = url.split_once("://").map_or(url, |(_, rest)| rest);
    let authority = rest.split('/').next().unwrap_or(rest);
    let host_port = authority.rsplit_once('@').map_or(authority, |(_, hp)| hp);
    tokio::net::lookup_host(host_port)
        .await
        .expect("resolve the Redis address")
        .next()
        .expect("an address")
}

#[tokio::test]
async fn redis_failing_mid_run_fails_open_and_recovers() {
    let Some(url) = redis_url() else { return };
    if url.starts_with("rediss://") {
        eprintln!("skipped: the proxy test speaks plain redis://");
        return;
    }
    let server = redis_addr(&url).await;
    let cable = Cable::lay("127.0.0.1:0".parse().expect("addr"), server).await;
    let proxied = format!("redis://{}", cable.addr);
    let limiter = redis(&proxied, "test").await;
    let quota = Quota::new(&unique("/open"), &limit(1, Duration::from_secs(3600), 1));
    assert!(limiter.check(&quota, ip(1)).await.allowed);
    assert!(
        !limiter.check(&quota, ip(1)).await.allowed,
        "counted in Redis"
    );

    let addr = cable.addr;
    cable.cut().await;
    for _ in 0..5 {
        let started = tokio::time::Instant::now();
        let decision = limiter.check(&quota, ip(1)).await;
        assert!(decision.allowed, "fails open: {decision:?}");
        assert!(!decision.counted);
        assert!(decision.retry_after.is_none());
        assert!(
            started.elapsed() < Duration::from_millis(500),
            "a dead store costs at most its timeout, took {:?}",
            started.elapsed()
        );
        let mut headers = HeaderMap::new();
        decision.apply_headers(&mut headers);
        assert!(headers.contains_key("ratelimit-policy"));
        assert!(
            !headers.contains_key("ratelimit-remaining"),
            "nothing was counted"
        );
    }
    assert!(limiter.stats().store_failures >= 5, "{:?}", limiter.stats());

    // Redis comes back at the same address: the limiter reconnects and counts again.
    let cable = Cable::lay(addr, server).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let decision = limiter.check(&quota, ip(1)).await;
        if decision.counted {
            assert!(
                !decision.allowed,
                "the bucket survived in Redis: {decision:?}"
            );
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "never reconnected");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    cable.cut().await;
}
