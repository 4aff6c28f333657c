//! One callee service as one caller sees it: breaker, retry budget, bulkhead, and a record per
//! instance. One mutex guards all but the bulkhead; it is held for a few comparisons per call.

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use flotilla_manifest::Policy;
use flotilla_registry::Endpoint;
use tokio::time::Instant;

use super::breaker::{Admission, Breaker, Ticket, Transition};
use super::budget::RetryBudget;
use super::bulkhead::Bulkhead;
use super::{Board, BreakerEvent, BreakerState, BreakerView};
use crate::balance::{self, Ejection, EndpointStats};

pub(crate) struct Callee {
    pub(crate) caller: Arc<str>,
    pub(crate) service: Arc<str>,
    pub(crate) policy: Arc<Policy>,
    pub(crate) bulkhead: Bulkhead,
    board: Arc<Board>,
    state: Mutex<State>,
}

struct State {
    breaker: Breaker,
    budget: RetryBudget,
    /// By instance name; a handful per service, so a scan beats a map.
    endpoints: Vec<(Arc<str>, EndpointStats)>,
    turn: usize,
}

/// How one try ended, for the breaker and the instance's record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Outcome {
    Succeeded,
    Failed,
    /// The caller went away before an answer: says nothing about the callee.
    Abandoned,
}

impl Callee {
    pub(crate) fn new(
        caller: Arc<str>,
        service: Arc<str>,
        policy: Arc<Policy>,
        board: Arc<Board>,
    ) -> Arc<Self> {
        let now = Instant::now();
        let callee = Arc::new(Self {
            bulkhead: Bulkhead::new(&policy.bulkhead),
            state: Mutex::new(State {
                breaker: Breaker::new(policy.breaker.clone(), now),
                budget: RetryBudget::new(&policy.retries, now),
                endpoints: Vec::new(),
                turn: 0,
            }),
            caller,
            service,
            policy,
            board: board.clone(),
        });
        board.enrol(&callee);
        callee
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // Every update leaves the state consistent, so a panic elsewhere cannot poison it.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn admit(&self, now: Instant) -> Admission {
        let (admission, transition) = self.lock().breaker.admit(now);
        if let Some(transition) = transition {
            self.announce(None, transition);
        }
        admission
    }

    pub(crate) fn deposit(&self, now: Instant) {
        self.lock().budget.deposit(now);
    }

    pub(crate) fn withdraw(&self, now: Instant) -> bool {
        self.lock().budget.withdraw(now)
    }

    /// Picks an instance among `endpoints` (healthy ones, never empty) and counts a call in flight
    /// to it. `avoid` is the instance the previous try failed on, skipped when there is another.
    pub(crate) fn pick(
        &self,
        endpoints: &[Endpoint],
        avoid: Option<&str>,
        now: Instant,
    ) -> Endpoint {
        let mut returned = Vec::new();
        let picked = {
            let mut state = self.lock();
            let state = &mut *state;
            if state.endpoints.len() > endpoints.len() + 8 {
                // Instances come and go; forget the ones long gone.
                state
                    .endpoints
                    .retain(|(name, _)| endpoints.iter().any(|e| e.instance == *name));
            }
            let mut slots = Vec::with_capacity(endpoints.len());
            for endpoint in endpoints {
                let slot = match state
                    .endpoints
                    .iter()
                    .position(|(n, _)| *n == endpoint.instance)
                {
                    Some(slot) => slot,
                    None => {
                        state
                            .endpoints
                            .push((endpoint.instance.clone(), EndpointStats::new(now)));
                        state.endpoints.len() - 1
                    }
                };
                if state.endpoints[slot].1.expire(now).is_some() {
                    returned.push(endpoint.instance.clone());
                }
                slots.push(slot);
            }
            let usable = |i: &usize| {
                let stats = &state.endpoints[slots[*i]].1;
                !stats.is_ejected(now)
            };
            let mut candidates: Vec<usize> = (0..endpoints.len()).filter(usable).collect();
            if candidates.is_empty() {
                // Every instance ejected: better to try one than to refuse all calls.
                candidates.extend(0..endpoints.len());
            }
            if let Some(avoid) = avoid {
                if candidates.len() > 1 {
                    candidates.retain(|i| &*endpoints[*i].instance != avoid);
                }
            }
            let stats: Vec<&EndpointStats> = slots.iter().map(|s| &state.endpoints[*s].1).collect();
            let chosen = balance::pick(
                self.policy.load_balancer,
                &candidates,
                &stats,
                &mut state.turn,
                now,
            );
            state.endpoints[slots[chosen]].1.in_flight += 1;
            endpoints[chosen].clone()
        };
        for instance in returned {
            self.announce(
                Some(instance),
                Transition {
                    from: BreakerState::Open,
                    to: BreakerState::Closed,
                    reason: "ejection over".into(),
                },
            );
        }
        picked
    }

    /// Reports how a try on `instance` ended.
    pub(crate) fn finish(
        &self,
        instance: &Arc<str>,
        ticket: Ticket,
        outcome: Outcome,
        latency: Duration,
        now: Instant,
    ) {
        let (breaker, ejection) = {
            let mut state = self.lock();
            let state = &mut *state;
            let ejected_now = state
                .endpoints
                .iter()
                .filter(|(_, s)| s.is_ejected(now))
                .count();
            let may_eject =
                ejected_now < balance::max_ejected(&self.policy.outlier, state.endpoints.len());
            let mut ejection = None;
            if let Some((_, stats)) = state.endpoints.iter_mut().find(|(n, _)| n == instance) {
                stats.in_flight = stats.in_flight.saturating_sub(1);
                if outcome != Outcome::Abandoned {
                    stats.observe(latency, now);
                    ejection = stats.outcome(
                        outcome == Outcome::Failed,
                        &self.policy.outlier,
                        may_eject,
                        now,
                    );
                }
            }
            let breaker = match outcome {
                Outcome::Abandoned => {
                    state.breaker.cancel(ticket);
                    None
                }
                _ => state
                    .breaker
                    .record(ticket, outcome == Outcome::Failed, now),
            };
            (breaker, ejection)
        };
        if let Some(transition) = breaker {
            self.announce(None, transition);
        }
        if let Some(Ejection::Ejected { for_, failures }) = ejection {
            self.announce(
                Some(instance.clone()),
                Transition {
                    from: BreakerState::Closed,
                    to: BreakerState::Open,
                    reason: format!(
                        "{failures} consecutive failures: ejected for {}",
                        humantime::format_duration(for_)
                    ),
                },
            );
        }
    }

    fn announce(&self, instance: Option<Arc<str>>, transition: Transition) {
        self.board.announce(BreakerEvent {
            caller: self.caller.clone(),
            service: self.service.clone(),
            instance,
            from: transition.from,
            to: transition.to,
            reason: transition.reason,
        });
    }

    pub(crate) fn views(&self) -> Vec<BreakerView> {
        let now = Instant::now();
        let state = self.lock();
        let counts = state.breaker.counts(now);
        let mut views = Vec::with_capacity(1 + state.endpoints.len());
        views.push(BreakerView {
            caller: self.caller.to_string(),
            service: self.service.to_string(),
            instance: None,
            state: counts.state,
            state_for_ms: millis(now.saturating_duration_since(counts.since)),
            consecutive_failures: counts.consecutive_failures,
            window_calls: counts.window_calls,
            window_failures: counts.window_failures,
            in_flight: self.bulkhead.in_use(),
            times_opened: counts.times_opened,
            retry_in_ms: counts.half_open_in.map(millis),
        });
        for (instance, stats) in &state.endpoints {
            let ejected = stats.is_ejected(now);
            views.push(BreakerView {
                caller: self.caller.to_string(),
                service: self.service.to_string(),
                instance: Some(instance.to_string()),
                state: if ejected {
                    BreakerState::Open
                } else {
                    BreakerState::Closed
                },
                state_for_ms: 0,
                consecutive_failures: stats.consecutive_failures(),
                window_calls: 0,
                window_failures: 0,
                in_flight: stats.in_flight,
                times_opened: u64::from(stats.ejections()),
                retry_in_ms: stats
                    .ejected_until()
                    .filter(|_| ejected)
                    .map(|until| millis(until.saturating_duration_since(now))),
            });
        }
        views
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}
