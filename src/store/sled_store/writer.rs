//! The sled store's one writer: a thread that applies every record write in
//! arrival order and makes each batch durable with one flush (group commit).
//!
//! Why a thread of its own rather than a hop to the blocking pool per write:
//! a write must not run on a runtime worker (sled can wait on disk), and a
//! `spawn_blocking` per write, then a turn-taking flush, cost Deposit 8 %
//! of its throughput at c=16 (16 % with the event log off; five interleaved
//! quick runs, 2026-12-01). Handing a write to a thread that is already
//! busy costs a queue push and no wake-up; the writes that arrive while a
//! flush runs queue up and become the next batch, so one fsync covers all
//! of them.
//!
//! Being the only writer of records also makes a write's read-check-insert a
//! compare-and-swap without per-key locks, and keeps event positions in the
//! order their writes were applied.
//!
//! A flush that fails takes back every durable write of its batch, newest
//! first, so no reader sees what a caller was told failed.

use std::{sync::mpsc, thread::JoinHandle};

use tokio::sync::oneshot;

use super::{Engine, Taken};
use crate::store::{CasOutcome, NewEvent, Revision, StoreError, StoreKey};

/// Writes applied before one flush at most. A crash can cut off at most one
/// batch, and recovery checks more events than this (`RECOVERY_WINDOW`).
pub(super) const MAX_BATCH: usize = 1024;

/// One record write, as [`crate::store::Write`] without the fence (one node
/// has no claims to fence on).
pub(super) struct Job {
    pub key: StoreKey,
    pub expected: Option<Revision>,
    pub value: Option<Vec<u8>>,
    pub event: Option<NewEvent>,
    pub durable: bool,
}

enum Order {
    Write(Job, oneshot::Sender<Result<CasOutcome, StoreError>>),
    /// Make every write done before this order durable (writes made outside
    /// the writer: bookkeeping, event trims).
    Flush(oneshot::Sender<Result<(), StoreError>>),
}

/// The handle: sends orders, and stops the thread when the last store
/// handle drops.
pub(super) struct Writer {
    orders: Option<mpsc::Sender<Order>>,
    thread: Option<JoinHandle<()>>,
    /// For marking the store failed when the thread is gone.
    engine: Engine,
}

impl Writer {
    pub(super) fn start(engine: Engine) -> Result<Self, StoreError> {
        let (orders, inbox) = mpsc::channel();
        let thread_engine = engine.clone();
        let thread = std::thread::Builder::new()
            .name("credvault-store-writer".into())
            .spawn(move || run(&thread_engine, &inbox))
            .map_err(|e| StoreError::Io(format!("start the store writer: {e}")))?;
        Ok(Self {
            orders: Some(orders),
            thread: Some(thread),
            engine,
        })
    }

    /// Applies `job`; answers once it is durable (if `job.durable`).
    pub(super) async fn write(&self, job: Job) -> Result<CasOutcome, StoreError> {
        let (done, answer) = oneshot::channel();
        self.send(Order::Write(job, done))?;
        answer.await.map_err(|_| self.gone())?
    }

    /// Makes every write already made durable.
    pub(super) async fn flush(&self) -> Result<(), StoreError> {
        let (done, answer) = oneshot::channel();
        self.send(Order::Flush(done))?;
        answer.await.map_err(|_| self.gone())?
    }

    fn send(&self, order: Order) -> Result<(), StoreError> {
        self.orders
            .as_ref()
            .and_then(|orders| orders.send(order).ok())
            .ok_or_else(|| self.gone())
    }

    fn gone(&self) -> StoreError {
        self.engine
            .failed(StoreError::Io("the store writer stopped".into()))
    }
}

impl Drop for Writer {
    /// Closing the queue ends the thread after its batch; waiting for it
    /// releases sled's directory lock before the store counts as closed, so
    /// the same directory can be opened again at once.
    fn drop(&mut self) {
        drop(self.orders.take());
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn run(engine: &Engine, inbox: &mpsc::Receiver<Order>) {
    while let Ok(first) = inbox.recv() {
        let batch: Vec<Order> = std::iter::once(first)
            .chain(inbox.try_iter().take(MAX_BATCH - 1))
            .collect();
        commit(engine, batch);
    }
}

/// A durable write waiting for the batch's flush.
struct Pending {
    key: StoreKey,
    taken: Taken,
    outcome: CasOutcome,
    done: oneshot::Sender<Result<CasOutcome, StoreError>>,
}

/// Applies a batch, flushes once if anything in it must be durable, then
/// answers. An answer whose caller has gone is dropped: the write stands.
fn commit(engine: &Engine, batch: Vec<Order>) {
    let mut pending = Vec::new();
    let mut flushes = Vec::new();
    for order in batch {
        match order {
            Order::Flush(done) => flushes.push(done),
            Order::Write(job, done) => {
                let durable = job.durable;
                match engine.swap(&job.key, job.expected, job.value, job.event) {
                    Ok((outcome @ CasOutcome::Written(_), Some(taken))) if durable => {
                        pending.push(Pending {
                            key: job.key,
                            taken,
                            outcome,
                            done,
                        });
                    }
                    Ok((outcome, _)) => {
                        let _ = done.send(Ok(outcome));
                    }
                    Err(error) => {
                        let _ = done.send(Err(error));
                    }
                }
            }
        }
    }
    if pending.is_empty() && flushes.is_empty() {
        return;
    }
    match engine.flush_now() {
        Ok(()) => {
            for write in pending {
                let _ = write.done.send(Ok(write.outcome));
            }
            for done in flushes {
                let _ = done.send(Ok(()));
            }
        }
        Err(error) => {
            for write in pending.into_iter().rev() {
                engine.take_back(write.key.as_bytes(), write.taken);
                let _ = write.done.send(Err(error.clone()));
            }
            for done in flushes {
                let _ = done.send(Err(error.clone()));
            }
        }
    }
}
