//! The bulkhead: at most `max_concurrent` calls to a callee at once, at most `max_queue` more
//! waiting, the rest refused at once — so a callee that stops answering ties up a bounded number
//! of the caller's connections and tasks instead of all of them.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};

use flotilla_manifest::BulkheadPolicy;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

#[derive(Debug)]
pub(crate) struct Bulkhead {
    slots: Arc<Semaphore>,
    waiting: AtomicU32,
    max_queue: u32,
    max_concurrent: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refusal {
    /// Every slot busy and the queue full.
    Full { max_concurrent: u32, max_queue: u32 },
    /// Waited in the queue until the try's time was up.
    TimedOut,
}

impl Bulkhead {
    pub(crate) fn new(policy: &BulkheadPolicy) -> Self {
        Self {
            slots: Arc::new(Semaphore::new(policy.max_concurrent.get() as usize)),
            waiting: AtomicU32::new(0),
            max_queue: policy.max_queue,
            max_concurrent: policy.max_concurrent.get(),
        }
    }

    /// A slot, held until the permit is dropped.
    pub(crate) async fn enter(&self, until: Instant) -> Result<OwnedSemaphorePermit, Refusal> {
        if let Ok(permit) = self.slots.clone().try_acquire_owned() {
            return Ok(permit);
        }
        let queued = self.waiting.fetch_add(1, Ordering::AcqRel);
        let _leave = Leave(&self.waiting);
        if queued >= self.max_queue {
            return Err(Refusal::Full {
                max_concurrent: self.max_concurrent,
                max_queue: self.max_queue,
            });
        }
        match tokio::time::timeout_at(until, self.slots.clone().acquire_owned()).await {
            Ok(Ok(permit)) => Ok(permit),
            // The semaphore is never closed; a timeout is the only real way out.
            Ok(Err(_)) | Err(_) => Err(Refusal::TimedOut),
        }
    }

    pub(crate) fn in_use(&self) -> u32 {
        self.max_concurrent - self.slots.available_permits() as u32
    }
}

/// Leaves the queue however the wait ends, the future being dropped included.
struct Leave<'a>(&'a AtomicU32);

impl Drop for Leave<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::num::NonZeroU32;
    use std::time::Duration;

    #[tokio::test(start_paused = true)]
    async fn slots_then_queue_then_refusal() {
        let bulkhead = Arc::new(Bulkhead::new(&BulkheadPolicy {
            max_concurrent: NonZeroU32::new(2).unwrap(),
            max_queue: 1,
        }));
        let until = Instant::now() + Duration::from_secs(1);
        let a = bulkhead.enter(until).await.expect("slot 1");
        let _b = bulkhead.enter(until).await.expect("slot 2");
        assert_eq!(bulkhead.in_use(), 2);
        let queued = {
            let bulkhead = bulkhead.clone();
            tokio::spawn(async move { bulkhead.enter(until).await.map(drop) })
        };
        tokio::task::yield_now().await;
        assert_eq!(
            bulkhead.enter(until).await.map(drop),
            Err(Refusal::Full {
                max_concurrent: 2,
                max_queue: 1
            })
        );
        drop(a);
        assert_eq!(queued.await.expect("join"), Ok(()));
        // With the queue free again, a waiter that outlasts its time gives up.
        let _c = bulkhead
            .enter(until)
            .await
            .expect("slot freed by the queued call");
        assert_eq!(
            bulkhead.enter(until).await.map(drop),
            Err(Refusal::TimedOut)
        );
    }
}
