//! One consumer group's reader of one partition of the embedded log.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;

use super::group::Group;
use super::partition::Shared;
use crate::{BoxFuture, BrokerError, Consumer, Delivery, Record};

/// Records read ahead per read; they are handed out one at a time all the same.
const READ_AHEAD: usize = 64;

/// Hands out a partition's records in offset order, one at a time, from the group's committed
/// offset on.
///
/// Attempt numbers live in memory only: after a restart (a new consumer), the record that was
/// not acknowledged is handed out again as attempt 1. Two consumers of one group and partition
/// at the same time would each get every record; the engine above keeps one per pair.
pub(super) struct LogConsumer {
    partition: Arc<Shared>,
    group: Arc<Group>,
    /// The next offset to read (records before it are delivered or buffered).
    position: u64,
    buffered: VecDeque<Record>,
    current: Option<Current>,
    end: watch::Receiver<u64>,
}

/// The record handed out and not yet acknowledged.
struct Current {
    record: Record,
    attempt: u32,
    /// Set by `nack`: not to be handed out again before then.
    retry_at: Option<Instant>,
}

impl LogConsumer {
    pub fn new(partition: Arc<Shared>, group: Arc<Group>) -> LogConsumer {
        let start = partition.start_offset();
        let position = group.committed(partition.id).unwrap_or(start).max(start);
        LogConsumer {
            end: partition.watch_end(),
            partition,
            group,
            position,
            buffered: VecDeque::new(),
            current: None,
        }
    }

    async fn next_delivery(&mut self) -> Result<Delivery, BrokerError> {
        if let Some(retry_at) = self.current.as_ref().and_then(|c| c.retry_at) {
            tokio::time::sleep_until(retry_at).await;
        }
        // From here on nothing awaits before the state changes, so a dropped `next` (a timeout
        // around it) loses nothing.
        if let Some(current) = &mut self.current {
            // Asked again without an ack (after a nack, or after the caller lost the delivery):
            // the same record, once more.
            current.retry_at = None;
            current.attempt = current.attempt.saturating_add(1);
            return Ok(Delivery {
                record: current.record.clone(),
                attempt: current.attempt,
            });
        }
        loop {
            if let Some(record) = self.buffered.pop_front() {
                self.current = Some(Current {
                    record: record.clone(),
                    attempt: 1,
                    retry_at: None,
                });
                return Ok(Delivery { record, attempt: 1 });
            }
            // Marked seen before reading, so a record appended after the read wakes the wait.
            self.end.borrow_and_update();
            let partition = Arc::clone(&self.partition);
            let from = self.position;
            let records = tokio::task::spawn_blocking(move || partition.read(from, READ_AHEAD))
                .await
                .map_err(|_| BrokerError::Closed)??;
            match records.last() {
                Some(last) => {
                    self.position = last.offset + 1;
                    self.buffered.extend(records);
                }
                None => {
                    if self.end.changed().await.is_err() {
                        return Err(BrokerError::Closed);
                    }
                }
            }
        }
    }

    async fn acknowledge(&mut self) -> Result<(), BrokerError> {
        let Some(current) = &self.current else {
            return Ok(());
        };
        let next = current.record.offset + 1;
        self.group.commit(self.partition.id, next).await?;
        self.current = None;
        Ok(())
    }
}

impl Consumer for LogConsumer {
    fn next(&mut self) -> BoxFuture<'_, Result<Delivery, BrokerError>> {
        Box::pin(self.next_delivery())
    }

    fn ack(&mut self) -> BoxFuture<'_, Result<(), BrokerError>> {
        Box::pin(self.acknowledge())
    }

    fn nack(&mut self, delay: Duration) -> BoxFuture<'_, Result<(), BrokerError>> {
        if let Some(current) = &mut self.current {
            let now = Instant::now();
            // A delay too long to represent is as good as a year.
            let later = now
                .checked_add(delay)
                .or_else(|| now.checked_add(Duration::from_secs(365 * 24 * 3600)))
                .unwrap_or(now);
            current.retry_at = Some(later);
        }
        Box::pin(async { Ok(()) })
    }
}
