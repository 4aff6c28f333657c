//! The Redis store: GCRA in one Lua script, so a check is one atomic round trip whichever
//! gateway makes it, timed by the Redis server's clock so gateways whose clocks disagree still
//! agree on every client's TAT. Keys are `flotilla:rl:{app}:{route}:{client}` and expire when
//! their TAT passes, so idle clients vanish by themselves.
//!
//! When Redis does not answer within 50ms the request is allowed uncounted (fail open):
//! a rate limit protects services from too much traffic, and turning a Redis outage into an
//! outage of every limited route would be the larger harm. Each such request is counted and a
//! warning is logged at most every 10 seconds.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use redis::Script;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};

use super::{ClientKey, Decision, KeyForm, Outcome, Quota};

/// How long a request may wait for Redis before it is let through uncounted.
const CALL_TIMEOUT: Duration = Duration::from_millis(50);
/// How long `start` may take to connect and load the script.
const START_TIMEOUT: Duration = Duration::from_secs(5);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
const WARN_EVERY: Duration = Duration::from_secs(10);

/// KEYS[1] holds the client's TAT in microseconds of the server's clock; ARGV[1] is the emission
/// interval and ARGV[2] the burst. Returns {allowed, remaining, retry after, reset}, the last
/// two in microseconds. Every number stays an integer below 2^53, so Lua's doubles are exact.
const GCRA_SCRIPT: &str = r"
if redis.replicate_commands then redis.replicate_commands() end
local time = redis.call('TIME')
local now = tonumber(time[1]) * 1000000 + tonumber(time[2])
local interval = tonumber(ARGV[1])
local capacity = interval * tonumber(ARGV[2])
local tat = tonumber(redis.call('GET', KEYS[1]) or 0) or 0
if tat < now then tat = now end
local new_tat = tat + interval
local allow_at = new_tat - capacity
if now < allow_at then
  return {0, 0, allow_at - now, tat - now}
end
redis.call('SET', KEYS[1], string.format('%.0f', new_tat), 'PX', math.ceil((new_tat - now) / 1000))
return {1, math.floor((now + capacity - new_tat) / interval), 0, new_tat - now}
";

pub(super) struct RedisStore {
    /// Multiplexed, and reconnects in the background after the connection breaks.
    connection: ConnectionManager,
    script: Script,
    /// `flotilla:rl:{app}:`.
    prefix: Box<[u8]>,
    failures: AtomicU64,
    /// When the last warning was logged, and the failures counted then.
    warned: Mutex<(Option<Instant>, u64)>,
}

/// The URL without its password, for messages.
fn redact(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let authority_end = rest.find('/').unwrap_or(rest.len());
    match rest[..authority_end].rfind('@') {
        Some(at) => format!("{scheme}://***@{}", &rest[at + 1..]),
        None => url.to_owned(),
    }
}

impl RedisStore {
    pub(super) async fn connect(url: &str, app: &str) -> Result<Self, String> {
        let shown = redact(url);
        if url.starts_with("rediss://") {
            // Only ring is built in; installing it fails harmlessly when a provider is set.
            let _ = rustls::crypto::ring::default_provider().install_default();
        }
        let client = redis::Client::open(url)
            .map_err(|e| format!("invalid rate limit store URL {shown}: {e}"))?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(CONNECT_TIMEOUT))
            .set_response_timeout(Some(Duration::from_secs(1)))
            .set_number_of_retries(2)
            .set_min_delay(Duration::from_millis(50))
            .set_max_delay(Duration::from_secs(1));
        let script = Script::new(GCRA_SCRIPT);
        let connect = async {
            let mut connection = ConnectionManager::new_with_config(client, config).await?;
            // Loading the script proves the server is there and runs scripts.
            script.prepare_invoke().load_async(&mut connection).await?;
            Ok::<_, redis::RedisError>(connection)
        };
        let connection = match tokio::time::timeout(START_TIMEOUT, connect).await {
            Ok(Ok(connection)) => connection,
            Ok(Err(e)) => {
                return Err(format!(
                    "cannot use the rate limit store at {shown}: {e}; check that Redis runs \
                     there, or set [gateway.rate_limit] store = \"memory\""
                ));
            }
            Err(_) => {
                return Err(format!(
                    "the rate limit store at {shown} did not answer within {}s",
                    START_TIMEOUT.as_secs()
                ));
            }
        };
        let mut prefix = b"flotilla:rl:".to_vec();
        for c in app.chars() {
            match c {
                '%' => prefix.extend_from_slice(b"%25"),
                ':' => prefix.extend_from_slice(b"%3A"),
                c => prefix.extend_from_slice(c.encode_utf8(&mut [0; 4]).as_bytes()),
            }
        }
        prefix.push(b':');
        Ok(Self {
            connection,
            script,
            prefix: prefix.into(),
            failures: AtomicU64::new(0),
            warned: Mutex::new((None, 0)),
        })
    }

    pub(super) async fn check(&self, quota: &Quota, client: ClientKey<'_>) -> Decision {
        let mut key = Vec::with_capacity(self.prefix.len() + quota.redis_route.len() + 48);
        key.extend_from_slice(&self.prefix);
        key.extend_from_slice(&quota.redis_route);
        KeyForm::of(client).write_redis(&mut key);
        let mut invocation = self.script.key(key);
        invocation.arg(quota.interval_us).arg(quota.burst);
        let mut connection = self.connection.clone();
        let call = invocation.invoke_async::<(i64, i64, i64, i64)>(&mut connection);
        match tokio::time::timeout(CALL_TIMEOUT, call).await {
            Ok(Ok((allowed, remaining, retry_after, reset))) => {
                let count = |n: i64| u64::try_from(n).unwrap_or(0);
                let outcome = Outcome {
                    allowed: allowed == 1,
                    tat: 0,
                    remaining: count(remaining),
                    reset: count(reset),
                    retry_after: count(retry_after),
                };
                Decision::new(quota, outcome, Duration::from_micros)
            }
            Ok(Err(e)) => {
                self.failed(&e);
                quota.uncounted()
            }
            Err(_) => {
                self.failed(&format!("no answer within {}ms", CALL_TIMEOUT.as_millis()));
                quota.uncounted()
            }
        }
    }

    fn failed(&self, cause: &dyn std::fmt::Display) {
        let failures = self.failures.fetch_add(1, Ordering::Relaxed) + 1;
        let Ok(mut warned) = self.warned.try_lock() else {
            // Another request is logging right now.
            return;
        };
        let (last, counted) = *warned;
        if last.is_some_and(|at| at.elapsed() < WARN_EVERY) {
            return;
        }
        *warned = (Some(Instant::now()), failures);
        tracing::warn!(
            %cause,
            failed = failures - counted,
            "the rate limit store (Redis) failed; requests pass uncounted until it answers again"
        );
    }

    pub(super) fn failures(&self) -> u64 {
        self.failures.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_stay_out_of_messages() {
        assert_eq!(
            redact("redis://:hunter2@10.0.0.5:6379/0"),
            "redis://***@10.0.0.5:6379/0"
        );
        assert_eq!(redact("redis://127.0.0.1:6379"), "redis://127.0.0.1:6379");
    }
}
