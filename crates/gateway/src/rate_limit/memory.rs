//! The memory store: every client's TAT in a map split into shards, each behind its own lock,
//! so concurrent requests of different clients rarely wait for each other.
//!
//! Memory stays bounded however many distinct keys a flood brings: entries whose TAT has passed
//! carry no state and are swept every 10 seconds and whenever a shard fills up; a shard still
//! full of live entries then forgets the half that would have been forgotten soonest.

use std::hash::BuildHasher;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};
use std::time::Duration;

use hashbrown::HashTable;
use tokio::time::{Instant, MissedTickBehavior};

use super::{ClientKey, Decision, KeyForm, Quota, RateLimiter, gcra};

/// A power of two: a shard is picked by bits of the hash.
const SHARDS: usize = 64;
/// 262,144 clients in all, some 20 MiB at most.
const SHARD_CAPACITY: usize = 4096;
const SWEEP_EVERY: Duration = Duration::from_secs(10);

pub(super) struct MemoryStore {
    /// TATs are nanoseconds since this instant (tokio's clock, so tests can pause it).
    epoch: Instant,
    /// Keyed SipHash: client keys come from clients, who must not be able to aim at one shard
    /// or one bucket chain.
    hasher: std::collections::hash_map::RandomState,
    shards: Box<[Mutex<HashTable<Entry>>]>,
    forgiven: AtomicU64,
}

struct Entry {
    hash: u64,
    route: Arc<str>,
    client: StoredKey,
    tat: u64,
}

/// An owned [`KeyForm`].
enum StoredKey {
    Ip(IpAddr),
    Value(Box<[u8]>),
    Digest([u8; 20]),
    Everyone,
}

impl StoredKey {
    fn new(form: KeyForm<'_>) -> Self {
        match form {
            KeyForm::Ip(ip) => StoredKey::Ip(ip),
            KeyForm::Value(value) => StoredKey::Value(value.into()),
            KeyForm::Digest(digest) => StoredKey::Digest(digest),
            KeyForm::Everyone => StoredKey::Everyone,
        }
    }

    fn form(&self) -> KeyForm<'_> {
        match self {
            StoredKey::Ip(ip) => KeyForm::Ip(*ip),
            StoredKey::Value(value) => KeyForm::Value(value),
            StoredKey::Digest(digest) => KeyForm::Digest(*digest),
            StoredKey::Everyone => KeyForm::Everyone,
        }
    }
}

impl Entry {
    fn is(&self, hash: u64, route: &Arc<str>, client: KeyForm<'_>) -> bool {
        self.hash == hash
            && (Arc::ptr_eq(&self.route, route) || *self.route == **route)
            && self.client.form() == client
    }
}

/// Bits 32..38 of the hash: hashbrown places entries by the low bits and tags them with the top
/// seven, so picking shards by either would crowd every shard's table.
fn shard_of(hash: u64) -> usize {
    (hash >> 32) as usize & (SHARDS - 1)
}

impl MemoryStore {
    pub(super) fn new() -> Self {
        Self {
            epoch: Instant::now(),
            hasher: Default::default(),
            shards: (0..SHARDS).map(|_| Mutex::default()).collect(),
            forgiven: AtomicU64::new(0),
        }
    }

    fn now(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }

    fn shard(&self, index: usize) -> MutexGuard<'_, HashTable<Entry>> {
        // A panic while holding a shard cannot leave an entry half-written: TATs are plain
        // numbers, so the data is still good.
        self.shards[index]
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Allocates only when the client is new.
    pub(super) fn check(&self, quota: &Quota, client: ClientKey<'_>) -> Decision {
        let form = KeyForm::of(client);
        let hash = self.hasher.hash_one((&*quota.route, form));
        let now = self.now();
        let mut shard = self.shard(shard_of(hash));
        let outcome = match shard.find_mut(hash, |entry| entry.is(hash, &quota.route, form)) {
            Some(entry) => {
                let outcome = gcra(entry.tat, now, quota.interval_ns, quota.capacity_ns);
                if outcome.allowed {
                    entry.tat = outcome.tat;
                }
                outcome
            }
            None => {
                let outcome = gcra(0, now, quota.interval_ns, quota.capacity_ns);
                if outcome.allowed {
                    if shard.len() >= SHARD_CAPACITY {
                        self.make_room(&mut shard, now);
                    }
                    shard.insert_unique(
                        hash,
                        Entry {
                            hash,
                            route: quota.route.clone(),
                            client: StoredKey::new(form),
                            tat: outcome.tat,
                        },
                        |entry| entry.hash,
                    );
                }
                outcome
            }
        };
        drop(shard);
        Decision::new(quota, outcome, Duration::from_nanos)
    }

    /// Sweeps a full shard; if every entry is still live, forgets the half whose TAT comes
    /// soonest (they are the closest to being forgotten anyway).
    fn make_room(&self, shard: &mut HashTable<Entry>, now: u64) {
        shard.retain(|entry| entry.tat > now);
        if shard.len() < SHARD_CAPACITY {
            return;
        }
        let mut tats: Vec<u64> = shard.iter().map(|entry| entry.tat).collect();
        let middle = tats.len() / 2;
        let (_, &mut median, _) = tats.select_nth_unstable(middle);
        let before = shard.len();
        shard.retain(|entry| entry.tat > median);
        self.forgiven
            .fetch_add((before - shard.len()) as u64, Ordering::Relaxed);
    }

    pub(super) fn sweep(&self) {
        for index in 0..SHARDS {
            let now = self.now();
            let mut shard = self.shard(index);
            shard.retain(|entry| entry.tat > now);
            // Give back what a flood made the table grow to.
            let live = shard.len();
            if shard.capacity() > 4 * live + 64 {
                shard.shrink_to(2 * live, |entry| entry.hash);
            }
        }
    }

    pub(super) fn entries(&self) -> usize {
        (0..SHARDS).map(|index| self.shard(index).len()).sum()
    }

    pub(super) fn forgiven(&self) -> u64 {
        self.forgiven.load(Ordering::Relaxed)
    }
}

/// Sweeps every 10 seconds until the limiter is dropped.
pub(super) fn spawn_sweeper(limiter: Weak<RateLimiter>) {
    tokio::spawn(async move {
        let mut every = tokio::time::interval_at(Instant::now() + SWEEP_EVERY, SWEEP_EVERY);
        every.set_missed_tick_behavior(MissedTickBehavior::Delay);
        loop {
            every.tick().await;
            let Some(limiter) = limiter.upgrade() else {
                return;
            };
            limiter.sweep();
        }
    });
}
