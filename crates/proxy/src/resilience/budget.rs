//! The retry budget: retries may add at most a percentage of the calls, plus a small floor per
//! second, over a sliding window — so that when a callee fails everything, retries multiply its
//! load by at most `1 + percent/100` instead of by the number of attempts (as Linkerd does).

use std::time::Duration;

use flotilla_manifest::RetryPolicy;
use tokio::time::Instant;

const BUCKETS: usize = 10;

#[derive(Debug, Clone, Copy, Default)]
struct Bucket {
    slice: u64,
    calls: u32,
    retries: u32,
}

#[derive(Debug)]
pub struct RetryBudget {
    percent: u64,
    /// Retries allowed per window whatever the traffic: `budget_min_per_second × window`.
    floor: u64,
    slice_len: Duration,
    origin: Instant,
    buckets: [Bucket; BUCKETS],
}

impl RetryBudget {
    pub fn new(policy: &RetryPolicy, now: Instant) -> Self {
        let window = policy
            .budget_window
            .max(Duration::from_millis(BUCKETS as u64));
        Self {
            percent: u64::from(policy.budget_percent),
            floor: (u64::from(policy.budget_min_per_second) * window.as_millis() as u64) / 1000,
            slice_len: window / BUCKETS as u32,
            origin: now,
            buckets: [Bucket::default(); BUCKETS],
        }
    }

    /// Counts a call (its first try): it earns the budget `percent/100` of a retry.
    pub fn deposit(&mut self, now: Instant) {
        self.bucket(now).calls += 1;
    }

    /// Takes one retry from the budget; false when it is spent.
    pub fn withdraw(&mut self, now: Instant) -> bool {
        let (calls, retries) = self.totals(now);
        let allowed = self.floor + calls * self.percent / 100;
        if retries >= allowed {
            return false;
        }
        self.bucket(now).retries += 1;
        true
    }

    fn slice(&self, now: Instant) -> u64 {
        (now.saturating_duration_since(self.origin).as_nanos() / self.slice_len.as_nanos()) as u64
    }

    fn bucket(&mut self, now: Instant) -> &mut Bucket {
        let slice = self.slice(now);
        let bucket = &mut self.buckets[(slice % BUCKETS as u64) as usize];
        if bucket.slice != slice {
            *bucket = Bucket {
                slice,
                ..Bucket::default()
            };
        }
        bucket
    }

    fn totals(&self, now: Instant) -> (u64, u64) {
        let current = self.slice(now);
        self.buckets
            .iter()
            .filter(|b| current.saturating_sub(b.slice) < BUCKETS as u64)
            .fold((0, 0), |(c, r), b| {
                (c + u64::from(b.calls), r + u64::from(b.retries))
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn budget(percent: u32, min_per_second: u32) -> (RetryBudget, Instant) {
        let now = Instant::now();
        let policy = RetryPolicy {
            budget_percent: percent,
            budget_min_per_second: min_per_second,
            budget_window: Duration::from_secs(10),
            ..RetryPolicy::default()
        };
        (RetryBudget::new(&policy, now), now)
    }

    #[test]
    fn retries_are_a_share_of_the_calls_plus_a_floor() {
        let (mut budget, now) = budget(20, 1);
        // A floor of 1/s over 10 s: ten retries before any call.
        let floor = (0..100).filter(|_| budget.withdraw(now)).count();
        assert_eq!(floor, 10);
        for _ in 0..100 {
            budget.deposit(now);
        }
        let earned = (0..100).filter(|_| budget.withdraw(now)).count();
        assert_eq!(earned, 20);
    }

    #[test]
    fn the_budget_refills_as_the_window_slides() {
        let (mut budget, now) = budget(0, 1);
        assert_eq!((0..100).filter(|_| budget.withdraw(now)).count(), 10);
        let later = now + Duration::from_secs(11);
        assert_eq!((0..100).filter(|_| budget.withdraw(later)).count(), 10);
    }

    #[test]
    fn zero_means_no_retries() {
        let (mut budget, now) = budget(0, 0);
        budget.deposit(now);
        assert!(!budget.withdraw(now));
    }
}
