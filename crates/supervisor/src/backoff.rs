//! When to restart a crashed instance, kept free of clocks and randomness so it can be tested.

use std::collections::VecDeque;
use std::hash::{BuildHasher, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use flotilla_manifest::RestartSettings;
use tokio::time::Instant;

/// Jitter spreads restarts of instances that crashed together (say, when a shared dependency
/// went away), so they don't all hit it again at the same instant.
const JITTER: f64 = 0.2;

/// The delay before restart number `attempt + 1` (`attempt` 0 is the first restart).
///
/// `backoff_initial` doubles per attempt up to `backoff_max`; a crash-looping instance waits
/// `backoff_max` straight away. `jitter` in `[-1, 1]` scales the delay by up to ±20%, and the
/// result never exceeds `backoff_max`: the cap is a promise to whoever waits for the restart.
pub(crate) fn delay(
    settings: &RestartSettings,
    attempt: u32,
    crash_looping: bool,
    jitter: f64,
) -> Duration {
    let max = settings.backoff_max;
    let base = if crash_looping {
        max
    } else {
        let factor = 1u32 << attempt.min(31);
        settings.backoff_initial.saturating_mul(factor).min(max)
    };
    let scaled = base.as_secs_f64() * (1.0 + JITTER * jitter.clamp(-1.0, 1.0));
    Duration::try_from_secs_f64(scaled).unwrap_or(max).min(max)
}

/// A number in `[-1, 1]`, different on every call. Not cryptographic, just spread out: every
/// `RandomState` gets fresh SipHash keys, which is all the randomness std offers without a crate.
pub(crate) fn jitter() -> f64 {
    static CALLS: AtomicU64 = AtomicU64::new(0);
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u64(CALLS.fetch_add(1, Ordering::Relaxed));
    let unit = (hasher.finish() >> 11) as f64 / (1u64 << 53) as f64;
    unit * 2.0 - 1.0
}

/// An instance's recent crashes: how long to wait before the next restart, and whether it is
/// crash-looping.
pub(crate) struct CrashHistory {
    /// When each crash within the last `crash_loop_window` happened.
    recent: VecDeque<Instant>,
    /// Crashes since the instance last stayed up longer than `crash_loop_window`.
    attempt: u32,
}

/// What to do about one crash.
pub(crate) struct Verdict {
    pub(crate) delay: Duration,
    pub(crate) crash_looping: bool,
    /// How many crashes fell within the window (for the log line).
    pub(crate) recent: usize,
}

impl CrashHistory {
    pub(crate) fn new() -> Self {
        Self {
            recent: VecDeque::new(),
            attempt: 0,
        }
    }

    /// Records a crash at `now` of a process that had been up for `uptime`.
    pub(crate) fn crashed(
        &mut self,
        settings: &RestartSettings,
        now: Instant,
        uptime: Duration,
        jitter: f64,
    ) -> Verdict {
        let window = settings.crash_loop_window;
        if uptime > window {
            // It ran fine for a while: this is a fresh problem, not more of the old one.
            self.attempt = 0;
        }
        self.recent.push_back(now);
        while self
            .recent
            .front()
            .is_some_and(|&t| now.duration_since(t) > window)
        {
            self.recent.pop_front();
        }
        let crash_looping = self.recent.len() >= settings.crash_loop_threshold.get() as usize;
        let delay = delay(settings, self.attempt, crash_looping, jitter);
        self.attempt = self.attempt.saturating_add(1);
        Verdict {
            delay,
            crash_looping,
            recent: self.recent.len(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::num::NonZeroU32;

    fn settings() -> RestartSettings {
        RestartSettings {
            backoff_initial: Duration::from_millis(100),
            backoff_max: Duration::from_secs(1),
            crash_loop_threshold: NonZeroU32::new(3).expect("non-zero"),
            crash_loop_window: Duration::from_secs(10),
            stop_grace: Duration::from_secs(1),
        }
    }

    #[test]
    fn doubles_up_to_the_cap() {
        let s = settings();
        let delays: Vec<_> = (0..6)
            .map(|attempt| delay(&s, attempt, false, 0.0).as_millis())
            .collect();
        assert_eq!(delays, [100, 200, 400, 800, 1000, 1000]);
        assert_eq!(delay(&s, 1000, false, 0.0), s.backoff_max, "no overflow");
        assert_eq!(delay(&s, 0, true, 0.0), s.backoff_max);
    }

    #[test]
    fn jitter_is_twenty_percent_and_never_beyond_the_cap() {
        let s = settings();
        assert_eq!(delay(&s, 1, false, 1.0), Duration::from_millis(240));
        assert_eq!(delay(&s, 1, false, -1.0), Duration::from_millis(160));
        assert_eq!(delay(&s, 1, false, 7.0), Duration::from_millis(240));
        assert_eq!(delay(&s, 9, false, 1.0), s.backoff_max);
        assert_eq!(delay(&s, 9, false, -1.0), Duration::from_millis(800));
        for _ in 0..1000 {
            let j = jitter();
            assert!((-1.0..=1.0).contains(&j), "{j}");
        }
        assert_ne!(jitter(), jitter());
    }

    #[test]
    fn crash_loops_within_the_window_and_resets_after_a_long_run() {
        let s = settings();
        let mut history = CrashHistory::new();
        let t0 = Instant::now();
        let short = Duration::from_millis(10);
        let at = |ms| t0 + Duration::from_millis(ms);

        let first = history.crashed(&s, at(0), short, 0.0);
        assert_eq!((first.delay.as_millis(), first.crash_looping), (100, false));
        let second = history.crashed(&s, at(200), short, 0.0);
        assert_eq!(
            (second.delay.as_millis(), second.crash_looping),
            (200, false)
        );
        let third = history.crashed(&s, at(500), short, 0.0);
        assert!(third.crash_looping);
        assert_eq!((third.delay, third.recent), (s.backoff_max, 3));

        // Up for longer than the window: the old crashes are forgotten, backoff starts over.
        let later = history.crashed(&s, at(30_000), Duration::from_secs(20), 0.0);
        assert_eq!((later.delay.as_millis(), later.crash_looping), (100, false));
        assert_eq!(later.recent, 1);
    }
}
