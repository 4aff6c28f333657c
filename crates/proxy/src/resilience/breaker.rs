//! The circuit breaker of one callee: closed, open, half-open.
//!
//! A pure state machine: the caller passes the time in, so tests drive it with any clock and
//! the proxy with tokio's (which tests pause). It opens on `consecutive_failures` failures in a
//! row, or when the failure rate over a sliding window passes `failure_rate` with at least
//! `min_calls` calls in it; while open it rejects without calling; after `open_timeout` it lets
//! `half_open_probes` calls through and closes when all succeed, re-opening on the first failure.

use std::time::Duration;

use flotilla_manifest::BreakerPolicy;
use serde::{Deserialize, Serialize};
use tokio::time::Instant;

/// Buckets of the sliding window: the rate forgets old calls one tenth of a window at a time.
const BUCKETS: usize = 10;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum BreakerState {
    Closed,
    Open,
    HalfOpen,
}

impl BreakerState {
    pub fn as_str(self) -> &'static str {
        match self {
            BreakerState::Closed => "closed",
            BreakerState::Open => "open",
            BreakerState::HalfOpen => "half-open",
        }
    }
}

impl std::fmt::Display for BreakerState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Whether a call may go ahead.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// Go ahead; report the outcome with this ticket.
    Allowed(Ticket),
    /// The breaker is open (or half-open with every probe slot taken): fail fast.
    Rejected { retry_in: Duration },
}

/// Ties an outcome to the breaker state that admitted the call, so that a slow call admitted
/// before the breaker opened cannot close it again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ticket {
    generation: u64,
    probe: bool,
}

/// A state change, for the log and the event stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transition {
    pub from: BreakerState,
    pub to: BreakerState,
    pub reason: String,
}

#[derive(Debug, Clone, Copy, Default)]
struct Bucket {
    /// Which window slice this bucket holds, counted from the breaker's creation.
    slice: u64,
    calls: u32,
    failures: u32,
}

#[derive(Debug)]
pub struct Breaker {
    policy: BreakerPolicy,
    state: BreakerState,
    /// When the current state began.
    since: Instant,
    /// Bumped on every transition; outcomes of tickets from another generation are ignored.
    generation: u64,
    consecutive_failures: u32,
    buckets: [Bucket; BUCKETS],
    origin: Instant,
    probes_in_flight: u32,
    probe_successes: u32,
    times_opened: u64,
}

/// Counts for status pages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BreakerCounts {
    pub state: BreakerState,
    pub since: Instant,
    pub consecutive_failures: u32,
    pub window_calls: u32,
    pub window_failures: u32,
    pub times_opened: u64,
    /// While open: how long until probes are let through.
    pub half_open_in: Option<Duration>,
}

impl Breaker {
    pub fn new(policy: BreakerPolicy, now: Instant) -> Self {
        Self {
            policy,
            state: BreakerState::Closed,
            since: now,
            generation: 0,
            consecutive_failures: 0,
            buckets: [Bucket::default(); BUCKETS],
            origin: now,
            probes_in_flight: 0,
            probe_successes: 0,
            times_opened: 0,
        }
    }

    pub fn state(&self) -> BreakerState {
        self.state
    }

    /// Asks to make a call at `now`. May move an open breaker to half-open.
    pub fn admit(&mut self, now: Instant) -> (Admission, Option<Transition>) {
        if !self.policy.enabled {
            return (Admission::Allowed(self.ticket(false)), None);
        }
        let mut transition = None;
        if self.state == BreakerState::Open {
            let reopen_at = self.since + self.policy.open_timeout;
            if now < reopen_at {
                return (
                    Admission::Rejected {
                        retry_in: reopen_at - now,
                    },
                    None,
                );
            }
            transition = Some(self.enter(
                BreakerState::HalfOpen,
                now,
                format!(
                    "open for {}: letting {} probe call(s) through",
                    humantime::format_duration(self.policy.open_timeout),
                    self.policy.half_open_probes
                ),
            ));
        }
        let admission = match self.state {
            BreakerState::Closed => Admission::Allowed(self.ticket(false)),
            BreakerState::HalfOpen => {
                if self.probes_in_flight + self.probe_successes < self.policy.half_open_probes.get()
                {
                    self.probes_in_flight += 1;
                    Admission::Allowed(self.ticket(true))
                } else {
                    // The probes decide soon; until then everyone else fails fast.
                    Admission::Rejected {
                        retry_in: Duration::from_secs(1),
                    }
                }
            }
            // Left above when the timeout has passed; still open means still rejecting.
            BreakerState::Open => Admission::Rejected {
                retry_in: Duration::ZERO,
            },
        };
        (admission, transition)
    }

    /// Reports how an admitted call ended.
    pub fn record(&mut self, ticket: Ticket, failed: bool, now: Instant) -> Option<Transition> {
        if !self.policy.enabled || ticket.generation != self.generation {
            return None;
        }
        match self.state {
            BreakerState::Closed => {
                self.count(failed, now);
                if !failed {
                    self.consecutive_failures = 0;
                    return None;
                }
                self.consecutive_failures += 1;
                let threshold = self.policy.consecutive_failures.get();
                if self.consecutive_failures >= threshold {
                    let reason = format!("{threshold} consecutive failures");
                    return Some(self.enter(BreakerState::Open, now, reason));
                }
                let (calls, failures) = self.window(now);
                if calls >= self.policy.min_calls.get()
                    && u64::from(failures) * 100
                        >= u64::from(self.policy.failure_rate) * u64::from(calls)
                {
                    let reason = format!(
                        "{failures} of the last {calls} calls failed (threshold {}%)",
                        self.policy.failure_rate
                    );
                    return Some(self.enter(BreakerState::Open, now, reason));
                }
                None
            }
            BreakerState::HalfOpen if ticket.probe => {
                self.probes_in_flight = self.probes_in_flight.saturating_sub(1);
                if failed {
                    return Some(self.enter(BreakerState::Open, now, "a probe call failed".into()));
                }
                self.probe_successes += 1;
                if self.probe_successes >= self.policy.half_open_probes.get() {
                    return Some(self.enter(
                        BreakerState::Closed,
                        now,
                        "the probe calls succeeded".into(),
                    ));
                }
                None
            }
            BreakerState::HalfOpen | BreakerState::Open => None,
        }
    }

    /// An admitted call ended without an outcome (the caller went away): frees its probe slot.
    pub fn cancel(&mut self, ticket: Ticket) {
        if ticket.probe && ticket.generation == self.generation {
            self.probes_in_flight = self.probes_in_flight.saturating_sub(1);
        }
    }

    pub fn counts(&self, now: Instant) -> BreakerCounts {
        let (window_calls, window_failures) = self.window(now);
        BreakerCounts {
            state: self.state,
            since: self.since,
            consecutive_failures: self.consecutive_failures,
            window_calls,
            window_failures,
            times_opened: self.times_opened,
            half_open_in: (self.state == BreakerState::Open)
                .then(|| (self.since + self.policy.open_timeout).saturating_duration_since(now)),
        }
    }

    fn ticket(&self, probe: bool) -> Ticket {
        Ticket {
            generation: self.generation,
            probe,
        }
    }

    fn enter(&mut self, to: BreakerState, now: Instant, reason: String) -> Transition {
        let from = self.state;
        self.state = to;
        self.since = now;
        self.generation += 1;
        self.probes_in_flight = 0;
        self.probe_successes = 0;
        match to {
            BreakerState::Open => self.times_opened += 1,
            // A fresh start: the failures that opened it are history.
            BreakerState::Closed => {
                self.consecutive_failures = 0;
                self.buckets = [Bucket::default(); BUCKETS];
            }
            BreakerState::HalfOpen => {}
        }
        Transition { from, to, reason }
    }

    fn slice_len(&self) -> Duration {
        (self.policy.window / BUCKETS as u32).max(Duration::from_millis(1))
    }

    fn slice(&self, now: Instant) -> u64 {
        let elapsed = now.saturating_duration_since(self.origin);
        (elapsed.as_nanos() / self.slice_len().as_nanos()) as u64
    }

    fn count(&mut self, failed: bool, now: Instant) {
        let slice = self.slice(now);
        let bucket = &mut self.buckets[(slice % BUCKETS as u64) as usize];
        if bucket.slice != slice {
            *bucket = Bucket {
                slice,
                calls: 0,
                failures: 0,
            };
        }
        bucket.calls += 1;
        bucket.failures += u32::from(failed);
    }

    /// Calls and failures in the window ending at `now`.
    fn window(&self, now: Instant) -> (u32, u32) {
        let current = self.slice(now);
        self.buckets
            .iter()
            .filter(|b| (b.calls > 0) && current.saturating_sub(b.slice) < BUCKETS as u64)
            .fold((0, 0), |(calls, failures), b| {
                (calls + b.calls, failures + b.failures)
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::num::NonZeroU32;

    fn policy() -> BreakerPolicy {
        BreakerPolicy {
            consecutive_failures: NonZeroU32::new(3).unwrap(),
            failure_rate: 50,
            min_calls: NonZeroU32::new(10).unwrap(),
            window: Duration::from_secs(10),
            open_timeout: Duration::from_secs(5),
            half_open_probes: NonZeroU32::new(2).unwrap(),
            ..BreakerPolicy::default()
        }
    }

    fn allowed(breaker: &mut Breaker, now: Instant) -> Ticket {
        match breaker.admit(now).0 {
            Admission::Allowed(ticket) => ticket,
            rejected => panic!("expected a call to be allowed, got {rejected:?}"),
        }
    }

    fn call(breaker: &mut Breaker, failed: bool, now: Instant) -> Option<Transition> {
        let ticket = allowed(breaker, now);
        breaker.record(ticket, failed, now)
    }

    #[test]
    fn opens_after_consecutive_failures_and_fails_fast() {
        let t0 = Instant::now();
        let mut breaker = Breaker::new(policy(), t0);
        assert_eq!(call(&mut breaker, true, t0), None);
        assert_eq!(
            call(&mut breaker, false, t0),
            None,
            "a success resets the run"
        );
        assert_eq!(call(&mut breaker, true, t0), None);
        assert_eq!(call(&mut breaker, true, t0), None);
        let opened = call(&mut breaker, true, t0).expect("opens");
        assert_eq!(
            (opened.from, opened.to),
            (BreakerState::Closed, BreakerState::Open)
        );
        assert!(opened.reason.contains("3 consecutive failures"));
        let later = t0 + Duration::from_secs(2);
        assert_eq!(
            breaker.admit(later).0,
            Admission::Rejected {
                retry_in: Duration::from_secs(3)
            }
        );
        assert_eq!(breaker.counts(later).times_opened, 1);
    }

    #[test]
    fn opens_on_failure_rate_with_enough_calls() {
        let t0 = Instant::now();
        let mut breaker = Breaker::new(policy(), t0);
        // Alternating: never three in a row, but half of the calls fail.
        let mut opened = None;
        for i in 0..10 {
            opened = opened.or(call(&mut breaker, i % 2 == 1, t0));
        }
        let opened = opened.expect("opens on the tenth call");
        assert!(
            opened.reason.contains("of the last 10 calls failed"),
            "{}",
            opened.reason
        );
    }

    #[test]
    fn old_calls_leave_the_window() {
        let t0 = Instant::now();
        let mut breaker = Breaker::new(policy(), t0);
        for i in 0..9 {
            assert_eq!(call(&mut breaker, i % 2 == 0, t0), None);
        }
        // Eleven seconds later the nine calls have left the window: one more is not enough.
        let later = t0 + Duration::from_secs(11);
        assert_eq!(call(&mut breaker, false, later), None);
        assert_eq!(breaker.counts(later).window_calls, 1);
        assert_eq!(breaker.state(), BreakerState::Closed);
    }

    fn opened(t0: Instant) -> Breaker {
        let mut breaker = Breaker::new(policy(), t0);
        for _ in 0..3 {
            call(&mut breaker, true, t0);
        }
        assert_eq!(breaker.state(), BreakerState::Open);
        breaker
    }

    #[test]
    fn half_open_after_the_timeout_then_closes_when_probes_succeed() {
        let t0 = Instant::now();
        let mut breaker = opened(t0);
        let t5 = t0 + Duration::from_secs(5);
        let (admission, transition) = breaker.admit(t5);
        let transition = transition.expect("half-opens");
        assert_eq!(transition.to, BreakerState::HalfOpen);
        let Admission::Allowed(first) = admission else {
            panic!("the first probe goes through")
        };
        let second = allowed(&mut breaker, t5);
        // Both probe slots are taken: the rest fail fast.
        assert!(matches!(breaker.admit(t5).0, Admission::Rejected { .. }));
        assert_eq!(breaker.record(first, false, t5), None);
        let closed = breaker.record(second, false, t5).expect("closes");
        assert_eq!(
            (closed.from, closed.to),
            (BreakerState::HalfOpen, BreakerState::Closed)
        );
        assert_eq!(breaker.counts(t5).consecutive_failures, 0);
    }

    #[test]
    fn a_failed_probe_reopens() {
        let t0 = Instant::now();
        let mut breaker = opened(t0);
        let t5 = t0 + Duration::from_secs(5);
        let probe = allowed(&mut breaker, t5);
        let reopened = breaker.record(probe, true, t5).expect("reopens");
        assert_eq!(
            (reopened.from, reopened.to),
            (BreakerState::HalfOpen, BreakerState::Open)
        );
        assert!(matches!(
            breaker.admit(t5 + Duration::from_secs(1)).0,
            Admission::Rejected { .. }
        ));
        assert_eq!(breaker.counts(t5).times_opened, 2);
    }

    #[test]
    fn stale_outcomes_and_cancelled_probes() {
        let t0 = Instant::now();
        let mut breaker = Breaker::new(policy(), t0);
        let slow = allowed(&mut breaker, t0);
        for _ in 0..3 {
            call(&mut breaker, true, t0);
        }
        let t5 = t0 + Duration::from_secs(5);
        let probe = allowed(&mut breaker, t5);
        // The slow call admitted while closed succeeds now: it says nothing about the probes.
        assert_eq!(breaker.record(slow, false, t5), None);
        assert_eq!(breaker.state(), BreakerState::HalfOpen);
        // A cancelled probe frees its slot for another.
        breaker.cancel(probe);
        let _again = allowed(&mut breaker, t5);
        let _third = allowed(&mut breaker, t5);
        assert!(matches!(breaker.admit(t5).0, Admission::Rejected { .. }));
    }

    #[test]
    fn a_disabled_breaker_never_opens() {
        let t0 = Instant::now();
        let mut breaker = Breaker::new(
            BreakerPolicy {
                enabled: false,
                ..policy()
            },
            t0,
        );
        for _ in 0..100 {
            assert_eq!(call(&mut breaker, true, t0), None);
        }
        assert_eq!(breaker.state(), BreakerState::Closed);
    }
}
