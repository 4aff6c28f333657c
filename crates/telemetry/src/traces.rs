//! The trace store: the fleet's recent spans, bounded in memory, indexed by trace.
//!
//! Every proxied call records two spans, so at full load the store takes on the order of 100,000
//! spans a second. Recording is therefore a short critical section (a ring push, one hash lookup,
//! at worst one eviction) that allocates nothing: ring and index are sized for the capacity up
//! front, and an evicted span is freed after the lock is released. Queries walk the spans under the
//! same locks, so a large store is split into shards by trace id: a query then holds any one lock
//! for a fraction of its work, and recorders wait at most that long.

use std::collections::hash_map::Entry;
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};

use crate::span::{IdHash, Span, TraceId};
use crate::wire::{micros, rfc3339};

/// Most shards a store is split into.
const MAX_SHARDS: usize = 16;
/// Fewest spans a shard holds: below this, splitting only makes eviction less exactly
/// oldest-first without shortening any lock hold that matters.
const MIN_SHARD_SPANS: usize = 4096;

/// Which traces [`TraceStore::traces`] returns.
#[derive(Debug, Clone, Default)]
pub struct TraceQuery {
    /// Only traces with a span of this service.
    pub service: Option<String>,
    /// Only traces with a failed span (see [`TraceSummary::error`]).
    pub errors: bool,
    /// The N longest traces, longest first, instead of the newest first.
    pub slowest: Option<usize>,
    /// Only traces that started at or after this time.
    pub since: Option<SystemTime>,
    /// At most this many.
    pub limit: Option<usize>,
}

/// One trace in a listing.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TraceSummary {
    pub trace_id: TraceId,
    /// Service and name of the root span, or of the earliest span still held when the root is
    /// missing (evicted, or never sent).
    pub root_service: String,
    pub root_name: String,
    #[serde(with = "rfc3339")]
    pub start: SystemTime,
    /// The root span's duration, or from the earliest start to the latest end when the root is
    /// missing.
    #[serde(with = "micros")]
    pub duration: Duration,
    /// Spans held for the trace.
    pub spans: usize,
    /// Every service with a span in the trace, sorted.
    pub services: Vec<String>,
    /// Whether any span failed: status `error`, or an HTTP status of 500 or more.
    pub error: bool,
}

/// Recent spans of the whole fleet, bounded in number.
pub struct TraceStore {
    shards: Box<[Mutex<Shard>]>,
    capacity: usize,
    /// Spans pushed out to make room.
    dropped: AtomicU64,
}

impl TraceStore {
    /// Keeps the newest `max_spans` spans (at least one).
    pub fn new(max_spans: usize) -> Self {
        let capacity = max_spans.max(1);
        let count = (capacity / MIN_SHARD_SPANS).clamp(1, MAX_SHARDS);
        let shards = (0..count)
            .map(|i| {
                let share = capacity / count + usize::from(i < capacity % count);
                Mutex::new(Shard::with_capacity(share))
            })
            .collect();
        Self {
            shards,
            capacity,
            dropped: AtomicU64::new(0),
        }
    }

    /// Stores a span, evicting the oldest one (of its shard) when full.
    pub fn record(&self, span: Span) {
        let evicted = self.lock_shard(&span.trace_id).push(span);
        if evicted.is_some() {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
        // `evicted` is freed here, after the lock is released.
    }

    /// Stores the spans of one call, both of one trace, under one lock.
    pub fn record_pair(&self, first: Span, second: Span) {
        debug_assert_eq!(first.trace_id, second.trace_id);
        let (a, b) = {
            let mut shard = self.lock_shard(&first.trace_id);
            (shard.push(first), shard.push(second))
        };
        let evicted = u64::from(a.is_some()) + u64::from(b.is_some());
        if evicted > 0 {
            self.dropped.fetch_add(evicted, Ordering::Relaxed);
        }
        // The evicted spans are freed here, after the lock is released.
    }

    /// Every span held for a trace, by start time, a parent before its children when they start
    /// together.
    pub fn trace(&self, id: TraceId) -> Vec<Span> {
        let spans: Vec<Span> = {
            let shard = self.lock_shard(&id);
            match shard.traces.get(&id) {
                Some(chain) => shard.chain(*chain).cloned().collect(),
                None => return Vec::new(),
            }
        };
        let mut keyed: Vec<_> = depths(&spans)
            .into_iter()
            .zip(spans)
            .map(|(depth, span)| ((span.start, depth), span))
            .collect();
        keyed.sort_by_key(|(key, _)| *key);
        keyed.into_iter().map(|(_, span)| span).collect()
    }

    /// Summaries of the matching traces, newest first (or longest first with `slowest`).
    pub fn traces(&self, query: &TraceQuery) -> Vec<TraceSummary> {
        // First pass: only what ordering and filtering need, without allocating per trace, so
        // each shard lock is held for a plain walk.
        let mut picked: Vec<(TraceId, SystemTime, Duration)> = Vec::new();
        for shard in self.shards.iter() {
            let shard = lock(shard);
            for (id, chain) in &shard.traces {
                let service = query.service.as_deref();
                if service.is_some_and(|name| !shard.chain(*chain).any(|s| *s.service == *name)) {
                    continue;
                }
                let Some(outline) = Outline::of(shard.chain(*chain)) else {
                    continue;
                };
                if (query.errors && !outline.error)
                    || query.since.is_some_and(|since| outline.start < since)
                {
                    continue;
                }
                picked.push((*id, outline.start, outline.duration));
            }
        }

        let mut limit = query.limit.unwrap_or(usize::MAX);
        if let Some(n) = query.slowest {
            picked.sort_unstable_by(|a, b| b.2.cmp(&a.2).then(b.1.cmp(&a.1)).then(a.0.cmp(&b.0)));
            limit = limit.min(n);
        } else {
            picked.sort_unstable_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
        }
        picked.truncate(limit);

        // Second pass: the full summary for the few that are returned. A trace evicted in
        // between is left out.
        picked
            .into_iter()
            .filter_map(|(id, _, _)| {
                let shard = self.lock_shard(&id);
                let chain = *shard.traces.get(&id)?;
                summarize(id, shard.chain(chain))
            })
            .collect()
    }

    /// Spans held now.
    pub fn len(&self) -> usize {
        self.shards.iter().map(|s| lock(s).slots.len()).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Most spans held at once.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// How many spans were dropped from memory to stay within capacity.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    /// Since when every span recorded is still held: `None` while nothing was ever evicted, else
    /// the latest among the shards' oldest held spans (shards evict independently).
    pub(crate) fn complete_since(&self) -> Option<SystemTime> {
        self.shards
            .iter()
            .filter_map(|shard| {
                let shard = lock(shard);
                (shard.base > 0).then(|| shard.slots.front().map(|slot| slot.span.start))?
            })
            .max()
    }

    /// Visits every span held, one shard (one lock) at a time.
    pub(crate) fn for_each_span(&self, mut visit: impl FnMut(&Span)) {
        for shard in self.shards.iter() {
            lock(shard).slots.iter().for_each(|slot| visit(&slot.span));
        }
    }

    fn lock_shard(&self, id: &TraceId) -> MutexGuard<'_, Shard> {
        // The low bytes: W3C trace ids are random there even when a vendor puts a time in front.
        let key = usize::from(u16::from_le_bytes([id.0[14], id.0[15]]));
        lock(&self.shards[key % self.shards.len()])
    }
}

/// Nothing under a shard lock panics short of a bug, and should one, a store that may hold a stale
/// span still beats a proxy that panics on every later call: poisoning is ignored.
fn lock(shard: &Mutex<Shard>) -> MutexGuard<'_, Shard> {
    shard.lock().unwrap_or_else(|e| e.into_inner())
}

/// A ring of spans in arrival order, with each trace's spans linked into a chain through the ring
/// so that a trace is found without a scan and indexed without a per-trace allocation.
struct Shard {
    slots: VecDeque<Slot>,
    /// Sequence number of `slots[0]`; a span keeps its sequence number while it is held.
    base: u64,
    capacity: usize,
    traces: HashMap<TraceId, Chain, IdHash>,
}

struct Slot {
    span: Span,
    /// The next span of the same trace, by sequence number.
    next: Option<u64>,
}

/// A trace's spans: its oldest and newest by sequence number. The ring evicts in sequence order,
/// so the span evicted for a trace is always the head of its chain.
#[derive(Clone, Copy)]
struct Chain {
    first: u64,
    last: u64,
}

impl Shard {
    fn with_capacity(capacity: usize) -> Self {
        // Allocated in full up front: growing later would copy the whole ring (or rehash the
        // index) while recorders wait. Pages of it not yet written are not resident either.
        Self {
            slots: VecDeque::with_capacity(capacity),
            base: 0,
            capacity,
            traces: HashMap::with_capacity_and_hasher(capacity, IdHash::default()),
        }
    }

    /// Appends a span, returning the one evicted to make room so the caller can free it outside
    /// the lock.
    fn push(&mut self, span: Span) -> Option<Span> {
        let evicted = (self.slots.len() >= self.capacity)
            .then(|| self.pop_oldest())
            .flatten();
        let seq = self.base + self.slots.len() as u64;
        match self.traces.entry(span.trace_id) {
            Entry::Occupied(mut entry) => {
                let chain = entry.get_mut();
                let last = (chain.last - self.base) as usize;
                self.slots[last].next = Some(seq);
                chain.last = seq;
            }
            Entry::Vacant(entry) => {
                entry.insert(Chain {
                    first: seq,
                    last: seq,
                });
            }
        }
        self.slots.push_back(Slot { span, next: None });
        evicted
    }

    fn pop_oldest(&mut self) -> Option<Span> {
        let slot = self.slots.pop_front()?;
        self.base += 1;
        if let Entry::Occupied(mut entry) = self.traces.entry(slot.span.trace_id) {
            match slot.next {
                Some(next) => entry.get_mut().first = next,
                None => {
                    entry.remove();
                }
            }
        }
        Some(slot.span)
    }

    fn chain(&self, chain: Chain) -> impl Iterator<Item = &Span> + Clone + '_ {
        let mut next = Some(chain.first);
        std::iter::from_fn(move || {
            let seq = next?;
            let slot = &self.slots[(seq - self.base) as usize];
            next = slot.next;
            Some(&slot.span)
        })
    }
}

/// What ordering and filtering need to know about a trace.
struct Outline<'a> {
    /// The root span, or the earliest span when the root is missing.
    top: &'a Span,
    start: SystemTime,
    duration: Duration,
    spans: usize,
    error: bool,
}

impl<'a> Outline<'a> {
    fn of(spans: impl Iterator<Item = &'a Span>) -> Option<Self> {
        let mut root: Option<&Span> = None;
        let mut earliest: Option<&Span> = None;
        let mut end = SystemTime::UNIX_EPOCH;
        let mut count = 0;
        let mut error = false;
        for span in spans {
            count += 1;
            error |= span.is_error();
            end = end.max(span.end());
            if span.parent_span_id.is_none() && root.is_none_or(|r| span.start < r.start) {
                root = Some(span);
            }
            if earliest.is_none_or(|e| span.start < e.start) {
                earliest = Some(span);
            }
        }
        let earliest = earliest?;
        let (top, duration) = match root {
            Some(root) => (root, root.duration),
            None => (
                earliest,
                end.duration_since(earliest.start).unwrap_or_default(),
            ),
        };
        Some(Self {
            top,
            start: top.start,
            duration,
            spans: count,
            error,
        })
    }
}

pub(crate) fn summarize<'a>(
    trace_id: TraceId,
    spans: impl Iterator<Item = &'a Span> + Clone,
) -> Option<TraceSummary> {
    let outline = Outline::of(spans.clone())?;
    let mut services: Vec<&str> = spans.map(|s| &*s.service).collect();
    services.sort_unstable();
    services.dedup();
    Some(TraceSummary {
        trace_id,
        root_service: outline.top.service.to_string(),
        root_name: outline.top.title().into_owned(),
        start: outline.start,
        duration: outline.duration,
        spans: outline.spans,
        services: services.into_iter().map(str::to_owned).collect(),
        error: outline.error,
    })
}

/// Each span's distance from the top of its trace, following parents that are held; linear in
/// the number of spans, and safe against parent cycles in spans sent from outside.
pub(crate) fn depths(spans: &[Span]) -> Vec<usize> {
    let index: HashMap<_, _> = spans
        .iter()
        .enumerate()
        .map(|(i, s)| (s.span_id, i))
        .collect();
    let parent = |i: usize| {
        let p = *index.get(&spans[i].parent_span_id?)?;
        (p != i).then_some(p)
    };
    let mut depth: Vec<Option<usize>> = vec![None; spans.len()];
    let mut on_path = vec![false; spans.len()];
    let mut path = Vec::new();
    for start in 0..spans.len() {
        let mut above = 0;
        let mut current = Some(start);
        while let Some(i) = current {
            if let Some(d) = depth[i] {
                above = d + 1;
                break;
            }
            if on_path[i] {
                break; // a cycle: treat its first member reached as a top
            }
            on_path[i] = true;
            path.push(i);
            current = parent(i);
        }
        for (offset, i) in path.drain(..).rev().enumerate() {
            depth[i] = Some(above + offset);
            on_path[i] = false;
        }
    }
    depth.into_iter().map(Option::unwrap_or_default).collect()
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::span::{HttpHop, SpanId, SpanKind, SpanStatus};

    pub(crate) fn t(ms: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000) + Duration::from_millis(ms)
    }

    pub(crate) fn trace_id(n: u128) -> TraceId {
        TraceId((n + 1).to_be_bytes())
    }

    /// A span of `service` starting at `start_ms` (from [`t`]) and lasting `ms`.
    pub(crate) fn span(trace: TraceId, service: &str, start_ms: u64, ms: u64) -> Span {
        Span {
            trace_id: trace,
            span_id: SpanId::random(),
            parent_span_id: None,
            service: service.into(),
            instance: None,
            name: format!("{service} op").into(),
            kind: SpanKind::Server,
            start: t(start_ms),
            duration: Duration::from_millis(ms),
            status: SpanStatus::Unset,
            status_message: None,
            http: HttpHop::default(),
            attributes: Vec::new(),
        }
    }

    pub(crate) fn child(parent: &Span, service: &str, start_ms: u64, ms: u64) -> Span {
        Span {
            parent_span_id: Some(parent.span_id),
            ..span(parent.trace_id, service, start_ms, ms)
        }
    }

    fn held(store: &TraceStore) -> usize {
        store
            .traces(&TraceQuery::default())
            .iter()
            .map(|t| t.spans)
            .sum()
    }

    #[test]
    fn eviction_keeps_the_newest_spans_within_capacity() {
        let store = TraceStore::new(100);
        for i in 0..1_000u64 {
            // Seven spans a trace, so chains are cut in the middle as well as removed whole.
            store.record(span(trace_id(u128::from(i / 7)), "a", i, 1));
            assert!(store.len() <= 100);
        }
        assert_eq!(store.len(), 100);
        assert_eq!(store.dropped(), 900);
        assert_eq!(held(&store), 100, "the index agrees with the ring");
        // Spans 900..1000 are held: trace 128 is 896..903, trace 142 is 994..1001.
        assert!(store.trace(trace_id(127)).is_empty());
        assert_eq!(store.trace(trace_id(128)).len(), 3);
        assert_eq!(store.trace(trace_id(129)).len(), 7);
        let newest = store.traces(&TraceQuery {
            limit: Some(1),
            ..TraceQuery::default()
        });
        assert_eq!(newest[0].trace_id, trace_id(142));
        assert_eq!(newest[0].spans, 6);
    }

    #[test]
    fn a_sharded_store_stays_bounded_too() {
        let store = TraceStore::new(20_000);
        assert!(store.shards.len() > 1);
        for i in 0..200_000u64 {
            store.record(span(TraceId::random(), "a", i, 1));
        }
        assert!(store.len() <= 20_000);
        assert_eq!(store.dropped(), 200_000 - store.len() as u64);
        assert_eq!(held(&store), store.len());
    }

    #[test]
    fn a_trace_comes_back_by_start_parents_first() {
        let store = TraceStore::new(100);
        let id = trace_id(7);
        let root = span(id, "gateway", 0, 50);
        let client = child(&root, "gateway", 0, 40); // starts with its parent
        let server = child(&client, "orders", 5, 30);
        let later = child(&server, "orders", 20, 5);
        store.record(span(trace_id(8), "other", 0, 1));
        for s in [&later, &server, &client, &root] {
            store.record(s.clone());
        }
        let spans = store.trace(id);
        let order: Vec<_> = spans.iter().map(|s| s.span_id).collect();
        assert_eq!(
            order,
            [root.span_id, client.span_id, server.span_id, later.span_id]
        );
        assert!(store.trace(trace_id(9)).is_empty());
    }

    #[test]
    fn parent_cycles_do_not_hang_trace() {
        let store = TraceStore::new(10);
        let id = trace_id(1);
        let mut a = span(id, "a", 0, 1);
        let mut b = span(id, "b", 0, 1);
        a.parent_span_id = Some(b.span_id);
        b.parent_span_id = Some(a.span_id);
        store.record(a);
        store.record(b);
        assert_eq!(store.trace(id).len(), 2);
    }

    fn fleet() -> TraceStore {
        let store = TraceStore::new(1_000);
        // Trace 1: gateway -> orders, fine, 100 ms, oldest.
        let root = span(trace_id(1), "gateway", 0, 100);
        store.record(child(&root, "orders", 10, 80));
        store.record(root);
        // Trace 2: gateway -> payments, a server error, 300 ms.
        let root = span(trace_id(2), "gateway", 1_000, 300);
        let mut failing = child(&root, "payments", 1_010, 250);
        failing.http.status = Some(503);
        store.record(failing);
        store.record(root);
        // Trace 3: its root was never sent; orders -> stock, 2_000..2_500 in extent.
        let orphan = Span {
            parent_span_id: Some(SpanId::random()),
            ..span(trace_id(3), "orders", 2_000, 400)
        };
        let mut broken = child(&orphan, "stock", 2_100, 400);
        broken.status = SpanStatus::Error;
        store.record(broken);
        store.record(orphan);
        // Trace 4: the newest, stock alone, 50 ms.
        store.record(span(trace_id(4), "stock", 3_000, 50));
        store
    }

    fn ids(summaries: &[TraceSummary]) -> Vec<TraceId> {
        summaries.iter().map(|s| s.trace_id).collect()
    }

    #[test]
    fn traces_are_listed_newest_first_with_their_summary() {
        let listed = fleet().traces(&TraceQuery::default());
        assert_eq!(
            ids(&listed),
            [trace_id(4), trace_id(3), trace_id(2), trace_id(1)]
        );
        let two = &listed[2];
        assert_eq!(two.root_service, "gateway");
        assert_eq!(two.root_name, "gateway op");
        assert_eq!(two.start, t(1_000));
        assert_eq!(two.duration, Duration::from_millis(300));
        assert_eq!(two.spans, 2);
        assert_eq!(two.services, ["gateway", "payments"]);
        assert!(two.error);
        let rootless = &listed[1];
        assert_eq!(rootless.root_service, "orders");
        assert_eq!(rootless.start, t(2_000));
        assert_eq!(rootless.duration, Duration::from_millis(500), "the extent");
        assert!(rootless.error);
        assert!(!listed[0].error && !listed[3].error);
    }

    #[test]
    fn traces_filter_by_service_errors_since_and_limit() {
        let store = fleet();
        let query = |q: TraceQuery| ids(&store.traces(&q));
        let by_service = |s: &str| TraceQuery {
            service: Some(s.into()),
            ..TraceQuery::default()
        };
        assert_eq!(query(by_service("orders")), [trace_id(3), trace_id(1)]);
        assert_eq!(query(by_service("stock")), [trace_id(4), trace_id(3)]);
        assert!(query(by_service("nobody")).is_empty());
        let errors = TraceQuery {
            errors: true,
            ..TraceQuery::default()
        };
        assert_eq!(query(errors.clone()), [trace_id(3), trace_id(2)]);
        assert_eq!(
            query(TraceQuery {
                since: Some(t(1_000)),
                ..errors
            }),
            [trace_id(3), trace_id(2)]
        );
        assert_eq!(
            query(TraceQuery {
                since: Some(t(1_001)),
                limit: Some(1),
                ..TraceQuery::default()
            }),
            [trace_id(4)]
        );
    }

    #[test]
    fn slowest_lists_the_longest_first() {
        let store = fleet();
        let slowest = |n, limit| {
            ids(&store.traces(&TraceQuery {
                slowest: Some(n),
                limit,
                ..TraceQuery::default()
            }))
        };
        assert_eq!(slowest(3, None), [trace_id(3), trace_id(2), trace_id(1)]);
        assert_eq!(slowest(3, Some(1)), [trace_id(3)]);
        let slow_orders = store.traces(&TraceQuery {
            service: Some("orders".into()),
            slowest: Some(10),
            ..TraceQuery::default()
        });
        assert_eq!(ids(&slow_orders), [trace_id(3), trace_id(1)]);
    }

    #[test]
    fn summaries_use_the_span_wire_encodings() {
        let summary = TraceSummary {
            trace_id: trace_id(41),
            root_service: "gateway".into(),
            root_name: "GET /orders".into(),
            start: SystemTime::UNIX_EPOCH + Duration::from_micros(1_500_000),
            duration: Duration::from_micros(2_500),
            spans: 2,
            services: vec!["gateway".into(), "orders".into()],
            error: false,
        };
        let json = serde_json::to_string(&summary).expect("serialize");
        assert!(
            json.contains("\"start\":\"1970-01-01T00:00:01.500000Z\""),
            "{json}"
        );
        assert!(json.contains("\"duration\":2500"), "{json}");
        assert!(
            json.contains("\"trace_id\":\"0000000000000000000000000000002a\""),
            "{json}"
        );
        let back: TraceSummary = serde_json::from_str(&json).expect("deserialize");
        assert_eq!(back, summary);
    }
}
