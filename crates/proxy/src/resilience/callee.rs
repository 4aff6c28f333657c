//! One callee service as one caller sees it: breaker, retry budget, bulkhead, and a record per
//! instance. One mutex guards all but the bulkhead; it is held for a few comparisons per call.

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use flotilla_manifest::{Policy, Protocol};
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
    /// How the upstream client speaks to the instances: looked up once here, not per call.
    pub(crate) protocol: Protocol,
    pub(crate) bulkhead: Bulkhead,
    board: Arc<Board>,
    state: Mutex<State>,
}

struct State {
    breaker: Breaker,
    budget: RetryBudget,
    /// The instances of the last pick, in discovery's order, and what is known about each.
    names: Vec<Arc<str>>,
    stats: Vec<EndpointStats>,
    turn: usize,
}

impl State {
    /// Lines the records up with `endpoints`, keeping what is known about each instance by name.
    /// Discovery hands out the same snapshot until something changes, so this is usually one
    /// pointer comparison per instance.
    fn align(&mut self, endpoints: &[Endpoint], now: Instant) {
        let aligned = self.names.len() == endpoints.len()
            && self
                .names
                .iter()
                .zip(endpoints)
                .all(|(name, e)| Arc::ptr_eq(name, &e.instance) || *name == e.instance);
        if aligned {
            return;
        }
        let stats = endpoints
            .iter()
            .map(|e| {
                self.names
                    .iter()
                    .position(|name| *name == e.instance)
                    .map(|i| self.stats[i].clone())
                    .unwrap_or_else(|| EndpointStats::new(now))
            })
            .collect();
        self.stats = stats;
        self.names = endpoints.iter().map(|e| e.instance.clone()).collect();
    }
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
        protocol: Protocol,
        board: Arc<Board>,
    ) -> Arc<Self> {
        let now = Instant::now();
        let callee = Arc::new(Self {
            bulkhead: Bulkhead::new(&policy.bulkhead),
            state: Mutex::new(State {
                breaker: Breaker::new(policy.breaker.clone(), now),
                budget: RetryBudget::new(&policy.retries, now),
                names: Vec::new(),
                stats: Vec::new(),
                turn: 0,
            }),
            caller,
            service,
            policy,
            protocol,
            board: board.clone(),
        });
        board.enrol(&callee);
        callee
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // Every update leaves the state consistent, so a panic elsewhere cannot poison it.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Asks the breaker for a try; a call's first try also counts the call for the retry budget
    /// (under the same lock).
    pub(crate) fn admit(&self, first: bool, now: Instant) -> Admission {
        let (admission, transition) = {
            let mut state = self.lock();
            if first {
                state.budget.deposit(now);
            }
            state.breaker.admit(now)
        };
        if let Some(transition) = transition {
            self.announce(None, transition);
        }
        admission
    }

    pub(crate) fn breaker_state(&self) -> BreakerState {
        self.lock().breaker.state()
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
        let endpoints = &endpoints[..endpoints.len().min(balance::MAX_CANDIDATES)];
        let mut returned: u64 = 0;
        let chosen = {
            let mut state = self.lock();
            let state = &mut *state;
            state.align(endpoints, now);
            let mut usable: u64 = 0;
            for (i, stats) in state.stats.iter_mut().enumerate() {
                if stats.expire(now).is_some() {
                    returned |= 1 << i;
                }
                if !stats.is_ejected(now) {
                    usable |= 1 << i;
                }
            }
            let all = u64::MAX >> (64 - endpoints.len());
            if usable == 0 {
                // Every instance ejected: better to try one than to refuse all calls.
                usable = all;
            }
            if let Some(avoid) = avoid {
                if let Some(i) = endpoints.iter().position(|e| &*e.instance == avoid) {
                    if usable & !(1 << i) != 0 {
                        usable &= !(1 << i);
                    }
                }
            }
            let chosen = balance::pick(
                self.policy.load_balancer,
                usable,
                &state.stats,
                &mut state.turn,
                now,
            );
            state.stats[chosen].in_flight += 1;
            chosen
        };
        while returned != 0 {
            let i = returned.trailing_zeros() as usize;
            returned &= returned - 1;
            self.announce(
                Some(endpoints[i].instance.clone()),
                Transition {
                    from: BreakerState::Open,
                    to: BreakerState::Closed,
                    reason: "ejection over".into(),
                },
            );
        }
        endpoints[chosen].clone()
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
            let ejected_now = state.stats.iter().filter(|s| s.is_ejected(now)).count();
            let may_eject =
                ejected_now < balance::max_ejected(&self.policy.outlier, state.stats.len());
            let mut ejection = None;
            let slot = state.names.iter().position(|name| name == instance);
            if let Some(stats) = slot.map(|i| &mut state.stats[i]) {
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
        let mut views = Vec::with_capacity(1 + state.stats.len());
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
        for (instance, stats) in state.names.iter().zip(&state.stats) {
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
