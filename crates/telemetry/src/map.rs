//! The application map: who calls whom, how often, how well and how fast, from recent CLIENT
//! spans (each proxied call records exactly one, at the caller's side).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};

use crate::span::SpanKind;
use crate::traces::TraceStore;

/// Calls from one service to another within a window.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EdgeStats {
    pub caller: String,
    pub callee: String,
    pub requests: u64,
    /// Calls whose span failed: status `error`, or an HTTP status of 500 or more.
    pub errors: u64,
    /// `requests` over the window's length.
    pub requests_per_second: f64,
    /// `errors / requests`.
    pub error_rate: f64,
    /// Median call duration, in milliseconds.
    pub p50_ms: f64,
    /// 99th percentile call duration, in milliseconds.
    pub p99_ms: f64,
}

#[derive(Default)]
struct Tally {
    durations: Vec<Duration>,
    errors: u64,
}

impl TraceStore {
    /// The edges seen in CLIENT spans that started within `window` before `now`, sorted by
    /// caller then callee. Spans that do not name their peer are left out.
    pub fn edges(&self, window: Duration, now: SystemTime) -> Vec<EdgeStats> {
        let mut since = now.checked_sub(window).unwrap_or(SystemTime::UNIX_EPOCH);
        // Under load the store holds less than the window: rates are taken over the stretch it
        // holds completely, not divided by seconds whose calls were evicted.
        if let Some(complete) = self.complete_since()
            && complete > since
        {
            since = complete.min(now);
        }
        let window = now.duration_since(since).unwrap_or(window);
        // Keyed by `Arc<str>` and looked up by `&str`: one reference count per edge, not per span.
        let mut tallies: HashMap<Arc<str>, HashMap<Arc<str>, Tally>> = HashMap::new();
        self.for_each_span(|span| {
            let Some(callee) = &span.http.peer_service else {
                return;
            };
            if span.kind != SpanKind::Client || span.start < since || span.start > now {
                return;
            }
            let by_callee = match tallies.get_mut(&*span.service) {
                Some(by_callee) => by_callee,
                None => tallies.entry(span.service.clone()).or_default(),
            };
            let tally = match by_callee.get_mut(&**callee) {
                Some(tally) => tally,
                None => by_callee.entry(callee.clone()).or_default(),
            };
            tally.durations.push(span.duration);
            tally.errors += u64::from(span.is_error());
        });

        let seconds = window.as_secs_f64();
        let mut edges: Vec<EdgeStats> = tallies
            .into_iter()
            .flat_map(|(caller, by_callee)| {
                by_callee.into_iter().map(move |(callee, mut tally)| {
                    tally.durations.sort_unstable();
                    let requests = tally.durations.len() as u64;
                    EdgeStats {
                        caller: caller.to_string(),
                        callee: callee.to_string(),
                        requests,
                        errors: tally.errors,
                        requests_per_second: if seconds > 0.0 {
                            requests as f64 / seconds
                        } else {
                            0.0
                        },
                        error_rate: tally.errors as f64 / requests as f64,
                        p50_ms: percentile_ms(&tally.durations, 0.50),
                        p99_ms: percentile_ms(&tally.durations, 0.99),
                    }
                })
            })
            .collect();
        edges.sort_unstable_by(|a, b| (&a.caller, &a.callee).cmp(&(&b.caller, &b.callee)));
        edges
    }
}

/// Nearest rank: the smallest duration with at least `q` of them at or below it. Never
/// interpolated, so every value reported is one that was observed.
fn percentile_ms(sorted: &[Duration], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    // From nanoseconds, so whole milliseconds come out exact.
    sorted[rank - 1].as_nanos() as f64 / 1e6
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::span::{Span, SpanStatus, TraceId};
    use crate::traces::tests::{child, span, t};

    /// A call from `caller` to `callee` as the proxy records it: a CLIENT span and a SERVER span.
    fn call(caller: &str, callee: &str, start_ms: u64, ms: u64) -> (Span, Span) {
        let mut client = span(TraceId::random(), caller, start_ms, ms);
        client.kind = SpanKind::Client;
        client.http.peer_service = Some(callee.into());
        let mut server = child(&client, callee, start_ms, ms.saturating_sub(1));
        server.http.peer_service = Some(caller.into());
        (client, server)
    }

    #[test]
    fn edges_count_rate_errors_and_percentiles() {
        let store = TraceStore::new(10_000);
        // gateway -> orders: 100 calls of 1..=100 ms within the last 10 s, five failing.
        for ms in 1..=100u64 {
            let (mut client, mut server) = call("gateway", "orders", 50_000 + ms * 10, ms);
            match ms {
                10 | 20 | 30 => client.status = SpanStatus::Error,
                40 | 50 => client.http.status = Some(503),
                _ => client.http.status = Some(200),
            }
            server.status = SpanStatus::Error; // server spans never count: the client's do
            store.record(client);
            store.record(server);
        }
        // orders -> stock: two calls in the window, one too old, one not yet started.
        for start in [10_000, 55_000, 59_000, 61_000] {
            let (client, server) = call("orders", "stock", start, 4);
            store.record(client);
            store.record(server);
        }
        // A client span with no peer is not an edge.
        let mut anonymous = span(TraceId::random(), "orders", 55_000, 1);
        anonymous.kind = SpanKind::Client;
        store.record(anonymous);

        let edges = store.edges(Duration::from_secs(10), t(60_000));
        let pairs: Vec<_> = edges
            .iter()
            .map(|e| (e.caller.as_str(), e.callee.as_str()))
            .collect();
        assert_eq!(pairs, [("gateway", "orders"), ("orders", "stock")]);

        let orders = &edges[0];
        assert_eq!(orders.requests, 100);
        assert_eq!(orders.errors, 5);
        assert_eq!(orders.requests_per_second, 10.0);
        assert_eq!(orders.error_rate, 0.05);
        assert_eq!(orders.p50_ms, 50.0);
        assert_eq!(orders.p99_ms, 99.0);

        let stock = &edges[1];
        assert_eq!(stock.requests, 2);
        assert_eq!(stock.errors, 0);
        assert_eq!(stock.requests_per_second, 0.2);
        assert_eq!(stock.error_rate, 0.0);
        assert_eq!((stock.p50_ms, stock.p99_ms), (4.0, 4.0));

        assert!(store.edges(Duration::from_secs(1), t(0)).is_empty());
    }

    #[test]
    fn rates_cover_only_what_the_store_still_holds() {
        // Room for 100 spans (50 calls); 1,000 calls at 100 a second over the last 10 s: the
        // store holds the last half second, and the rate is taken over that, not the window.
        let store = TraceStore::new(100);
        for n in 0..1_000u64 {
            let (client, server) = call("gateway", "orders", 50_000 + n * 10, 1);
            store.record(client);
            store.record(server);
        }
        let edges = store.edges(Duration::from_secs(60), t(60_000));
        assert_eq!(edges[0].requests, 50);
        let rate = edges[0].requests_per_second;
        assert!((95.0..=105.0).contains(&rate), "{rate} req/s for 100 req/s");
    }

    #[test]
    fn percentiles_take_the_nearest_rank() {
        let ms = |v: &[u64]| {
            v.iter()
                .map(|&m| Duration::from_millis(m))
                .collect::<Vec<_>>()
        };
        assert_eq!(percentile_ms(&ms(&[7]), 0.5), 7.0);
        assert_eq!(percentile_ms(&ms(&[1, 2]), 0.5), 1.0);
        assert_eq!(percentile_ms(&ms(&[1, 2]), 0.99), 2.0);
        assert_eq!(
            percentile_ms(&ms(&[1, 2, 3, 4, 5, 6, 7, 8, 9, 1000]), 0.99),
            1000.0
        );
        assert_eq!(percentile_ms(&[], 0.5), 0.0);
    }

    #[test]
    fn edge_stats_round_trip_through_json() {
        let edge = EdgeStats {
            caller: "gateway".into(),
            callee: "orders".into(),
            requests: 3,
            errors: 1,
            requests_per_second: 0.05,
            error_rate: 1.0 / 3.0,
            p50_ms: 1.5,
            p99_ms: 12.0,
        };
        let json = serde_json::to_string(&edge).expect("serialize");
        assert_eq!(
            serde_json::from_str::<EdgeStats>(&json).expect("deserialize"),
            edge
        );
    }
}
