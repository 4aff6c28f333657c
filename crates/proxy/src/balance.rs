//! Which instance gets a call: power of two choices over peak-EWMA latency (the default) or
//! round-robin, over the healthy instances that outlier ejection has not taken out.
//!
//! Every instance of a callee has an [`EndpointStats`]: a latency estimate that jumps up to a slow
//! answer at once and decays back slowly (peak EWMA, as in Finagle and Linkerd), the calls in flight
//! to it, and its outlier record. P2C draws two instances at random and takes the one with the lower
//! `latency × (in flight + 1)`: nearly as good as scanning all, without herding onto one.

use std::time::Duration;

use flotilla_manifest::{LoadBalancer, OutlierPolicy, Protocol};
use flotilla_registry::Endpoint;
use tokio::time::Instant;

/// The estimate of an instance nothing has been learnt about yet: optimistic enough that a new
/// instance gets traffic, not so low that it gets all of it.
const DEFAULT_RTT: Duration = Duration::from_millis(5);

/// How fast the estimate forgets: an old observation weighs `e^(-age/DECAY)`.
const DECAY: Duration = Duration::from_secs(10);

/// The instance a try goes to, as a request extension for the upstream client: the only one it
/// needs, so a retried request's copy carries no other.
#[derive(Clone, Debug)]
pub struct Picked {
    pub service: std::sync::Arc<str>,
    pub endpoint: Endpoint,
    /// How to speak to it: HTTP/1.1, or HTTP/2 with prior knowledge for gRPC.
    pub protocol: Protocol,
}

/// What the balancer knows about one instance.
#[derive(Debug, Clone)]
pub struct EndpointStats {
    rtt_nanos: f64,
    stamp: Instant,
    pub(crate) in_flight: u32,
    consecutive_failures: u32,
    ejections: u32,
    ejected_until: Option<Instant>,
}

/// A change of an instance's ejection, for the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ejection {
    Ejected { for_: Duration, failures: u32 },
    Returned,
}

impl EndpointStats {
    pub fn new(now: Instant) -> Self {
        Self {
            rtt_nanos: DEFAULT_RTT.as_nanos() as f64,
            stamp: now,
            in_flight: 0,
            consecutive_failures: 0,
            ejections: 0,
            ejected_until: None,
        }
    }

    /// `latency × (in flight + 1)`, with the latency decayed for the time since it was measured,
    /// so that an instance that was slow once is tried again eventually.
    pub fn cost(&self, now: Instant) -> f64 {
        let age = now.saturating_duration_since(self.stamp).as_secs_f64();
        let decayed = self.rtt_nanos * (-age / DECAY.as_secs_f64()).exp();
        decayed * f64::from(self.in_flight + 1)
    }

    /// Folds in one call's latency: a slower answer is taken at once, a faster one gradually.
    pub fn observe(&mut self, rtt: Duration, now: Instant) {
        let rtt = rtt.as_nanos() as f64;
        if rtt > self.rtt_nanos {
            self.rtt_nanos = rtt;
        } else {
            let age = now.saturating_duration_since(self.stamp).as_secs_f64();
            let weight = (-age / DECAY.as_secs_f64()).exp();
            self.rtt_nanos = self.rtt_nanos * weight + rtt * (1.0 - weight);
        }
        self.stamp = now;
    }

    pub fn is_ejected(&self, now: Instant) -> bool {
        self.ejected_until.is_some_and(|until| now < until)
    }

    pub fn ejected_until(&self) -> Option<Instant> {
        self.ejected_until
    }

    pub fn consecutive_failures(&self) -> u32 {
        self.consecutive_failures
    }

    pub fn ejections(&self) -> u32 {
        self.ejections
    }

    /// Ends an ejection whose time is up; the instance starts over with a clean run.
    pub fn expire(&mut self, now: Instant) -> Option<Ejection> {
        match self.ejected_until {
            Some(until) if now >= until => {
                self.ejected_until = None;
                self.consecutive_failures = 0;
                Some(Ejection::Returned)
            }
            _ => None,
        }
    }

    /// Counts an outcome; ejects after `consecutive_failures` in a row when `may_eject`. The
    /// n-th ejection lasts n × `base_ejection`, up to `max_ejection`.
    pub fn outcome(
        &mut self,
        failed: bool,
        policy: &OutlierPolicy,
        may_eject: bool,
        now: Instant,
    ) -> Option<Ejection> {
        if !failed {
            self.consecutive_failures = 0;
            return None;
        }
        self.consecutive_failures += 1;
        if !policy.enabled
            || !may_eject
            || self.is_ejected(now)
            || self.consecutive_failures < policy.consecutive_failures.get()
        {
            return None;
        }
        self.ejections += 1;
        let length = policy
            .base_ejection
            .saturating_mul(self.ejections)
            .min(policy.max_ejection);
        self.ejected_until = Some(now + length);
        Some(Ejection::Ejected {
            for_: length,
            failures: self.consecutive_failures,
        })
    }
}

/// How many of `total` instances may be ejected at once: `max_ejected_percent`, but at least one
/// when there are two or more (a percentage of two would otherwise round down to nothing).
pub fn max_ejected(policy: &OutlierPolicy, total: usize) -> usize {
    if total < 2 || policy.max_ejected_percent == 0 {
        return 0;
    }
    (total * policy.max_ejected_percent as usize / 100).clamp(1, total - 1)
}

/// The most instances one pick considers: the usable ones are a bit mask, so picking allocates
/// nothing. The manifest allows 64 replicas.
pub const MAX_CANDIDATES: usize = 64;

/// Picks one of the instances whose bit is set in `usable` (never zero) by `policy`; `stats` is
/// indexed like the bits. `turn` is the round-robin counter of the callee.
pub fn pick(
    policy: LoadBalancer,
    usable: u64,
    stats: &[EndpointStats],
    turn: &mut usize,
    now: Instant,
) -> usize {
    let n = usable.count_ones() as usize;
    if n <= 1 {
        return usable.trailing_zeros().min(63) as usize;
    }
    match policy {
        LoadBalancer::RoundRobin => {
            *turn = turn.wrapping_add(1);
            nth_set_bit(usable, *turn % n)
        }
        LoadBalancer::P2cEwma => {
            let a = fastrand::usize(0..n);
            // A second draw from the others, so the two are always distinct.
            let b = (a + 1 + fastrand::usize(0..n - 1)) % n;
            let (a, b) = (nth_set_bit(usable, a), nth_set_bit(usable, b));
            if stats[b].cost(now) < stats[a].cost(now) {
                b
            } else {
                a
            }
        }
    }
}

fn nth_set_bit(mut bits: u64, n: usize) -> usize {
    for _ in 0..n {
        bits &= bits - 1;
    }
    bits.trailing_zeros() as usize
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::num::NonZeroU32;

    #[test]
    fn peak_ewma_jumps_up_and_decays_down() {
        let t0 = Instant::now();
        let mut stats = EndpointStats::new(t0);
        stats.observe(Duration::from_millis(100), t0);
        assert!((stats.cost(t0) - 100e6).abs() < 1.0);
        // A fast answer a second later only pulls the estimate down part of the way.
        let t1 = t0 + Duration::from_secs(1);
        stats.observe(Duration::from_millis(1), t1);
        let cost = stats.cost(t1);
        assert!(cost > 50e6 && cost < 100e6, "{cost}");
        // Calls in flight make an instance look proportionally busier.
        stats.in_flight = 3;
        assert!((stats.cost(t1) - 4.0 * cost).abs() < 1.0);
        // Left alone, the estimate decays so the instance is tried again.
        assert!(stats.cost(t1 + Duration::from_secs(60)) < cost / 100.0);
    }

    #[test]
    fn p2c_prefers_the_cheaper_of_two() {
        let t0 = Instant::now();
        let fast = EndpointStats::new(t0);
        let mut slow = EndpointStats::new(t0);
        slow.observe(Duration::from_millis(200), t0);
        let stats = [slow, fast.clone(), fast];
        let mut turn = 0;
        for _ in 0..100 {
            assert_eq!(pick(LoadBalancer::P2cEwma, 0b011, &stats, &mut turn, t0), 1);
        }
        let picks: Vec<_> = (0..4)
            .map(|_| pick(LoadBalancer::RoundRobin, 0b101, &stats, &mut turn, t0))
            .collect();
        assert_eq!(picks, [2, 0, 2, 0]);
        assert_eq!(pick(LoadBalancer::P2cEwma, 0b100, &stats, &mut turn, t0), 2);
    }

    #[test]
    fn ejections_grow_and_expire() {
        let t0 = Instant::now();
        let policy = OutlierPolicy {
            consecutive_failures: NonZeroU32::new(2).unwrap(),
            base_ejection: Duration::from_secs(10),
            max_ejection: Duration::from_secs(25),
            ..OutlierPolicy::default()
        };
        let mut stats = EndpointStats::new(t0);
        assert_eq!(stats.outcome(true, &policy, true, t0), None);
        assert_eq!(
            stats.outcome(true, &policy, true, t0),
            Some(Ejection::Ejected {
                for_: Duration::from_secs(10),
                failures: 2
            })
        );
        assert!(stats.is_ejected(t0 + Duration::from_secs(9)));
        let t10 = t0 + Duration::from_secs(10);
        assert_eq!(stats.expire(t10), Some(Ejection::Returned));
        stats.outcome(true, &policy, true, t10);
        let second = stats.outcome(true, &policy, true, t10);
        assert_eq!(
            second,
            Some(Ejection::Ejected {
                for_: Duration::from_secs(20),
                failures: 2
            })
        );
        let t30 = t10 + Duration::from_secs(20);
        stats.expire(t30);
        stats.outcome(true, &policy, true, t30);
        let third = stats.outcome(true, &policy, true, t30);
        assert!(
            matches!(third, Some(Ejection::Ejected { for_, .. }) if for_ == Duration::from_secs(25))
        );
        // Not when the cap on ejected instances is reached.
        let mut other = EndpointStats::new(t0);
        other.outcome(true, &policy, false, t0);
        assert_eq!(other.outcome(true, &policy, false, t0), None);
    }

    #[test]
    fn at_least_one_of_two_may_be_ejected() {
        let policy = OutlierPolicy::default();
        assert_eq!(max_ejected(&policy, 1), 0);
        assert_eq!(max_ejected(&policy, 2), 1);
        assert_eq!(max_ejected(&policy, 10), 5);
        let all = OutlierPolicy {
            max_ejected_percent: 100,
            ..policy
        };
        assert_eq!(max_ejected(&all, 3), 2, "one instance always stays");
    }
}
