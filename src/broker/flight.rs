//! Single-flight: at most one refresh per credential at a time.
//!
//! The first caller starts the work as a spawned task; callers arriving while
//! it runs wait for the same result. The task is detached from its callers on
//! purpose: if they all hang up mid-refresh, the provider has still rotated the
//! refresh token, and the write-back must still happen or the grant is lost.

use std::{
    collections::HashMap,
    future::Future,
    hash::Hash,
    sync::{Arc, Mutex},
};

use futures::{
    future::{BoxFuture, Shared},
    FutureExt,
};

type Flight<T> = Shared<BoxFuture<'static, T>>;

/// Coalesces concurrent work per key.
pub struct SingleFlight<K, T: Clone> {
    inflight: Arc<Mutex<HashMap<K, Flight<T>>>>,
}

impl<K, T: Clone> Default for SingleFlight<K, T> {
    fn default() -> Self {
        Self {
            inflight: Arc::new(Mutex::new(HashMap::new())),
        }
    }
}

impl<K, T> SingleFlight<K, T>
where
    K: Eq + Hash + Clone + Send + 'static,
    T: Clone + Send + Sync + 'static,
{
    /// Runs `work` unless a flight for `key` is already under way, and returns
    /// that flight's result either way, and whether this caller joined a
    /// flight already under way (for metrics). `on_panic` stands in for the
    /// result if the work panics, so waiters get an answer rather than a hang.
    pub async fn run<F>(&self, key: K, work: impl FnOnce() -> F, on_panic: T) -> (T, bool)
    where
        F: Future<Output = T> + Send + 'static,
    {
        let mut joined = false;
        let flight = {
            let mut inflight = self.inflight.lock().unwrap_or_else(|e| e.into_inner());
            match inflight.get(&key) {
                Some(flight) => {
                    joined = true;
                    flight.clone()
                }
                None => {
                    // Boxed where it is made: a refresh's future is some
                    // 6.6 KiB, and a future moves by being copied, so
                    // unboxed it would be copied whole at each move into
                    // the task and at each change of the task's stage
                    // (about ten times a flight). Boxed, a pointer moves.
                    let work = Box::pin(work());
                    let flight =
                        spawn_flight(Arc::clone(&self.inflight), key.clone(), work, on_panic);
                    inflight.insert(key, flight.clone());
                    flight
                }
            }
        };
        (flight.await, joined)
    }
}

fn spawn_flight<K, T, F>(
    registry: Arc<Mutex<HashMap<K, Flight<T>>>>,
    key: K,
    work: F,
    on_panic: T,
) -> Flight<T>
where
    K: Eq + Hash + Clone + Send + 'static,
    T: Clone + Send + Sync + 'static,
    F: Future<Output = T> + Send + 'static,
{
    let deregister = {
        let registry = Arc::clone(&registry);
        let key = key.clone();
        move || {
            registry
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&key);
        }
    };
    let on_done = deregister.clone();
    let task = tokio::spawn(async move {
        let result = work.await;
        // Deregister before waiters see the result: a caller arriving after
        // this point starts a fresh flight and reads what this one wrote.
        on_done();
        result
    });
    async move {
        match task.await {
            Ok(result) => result,
            Err(_) => {
                deregister();
                on_panic
            }
        }
    }
    .boxed()
    .shared()
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    #[tokio::test]
    async fn concurrent_callers_share_one_run() {
        let flights: Arc<SingleFlight<&'static str, usize>> = Arc::default();
        let runs = Arc::new(AtomicUsize::new(0));
        let gate = Arc::new(tokio::sync::Notify::new());
        let mut callers = Vec::new();
        for _ in 0..50 {
            let (flights, runs, gate) = (flights.clone(), runs.clone(), gate.clone());
            callers.push(tokio::spawn(async move {
                flights
                    .run(
                        "cred",
                        || async move {
                            gate.notified().await;
                            runs.fetch_add(1, Ordering::SeqCst) + 1
                        },
                        0,
                    )
                    .await
                    .0
            }));
        }
        // Let every caller join before the work may finish.
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        gate.notify_one();
        for caller in callers {
            assert_eq!(caller.await.unwrap(), 1);
        }
        assert_eq!(runs.load(Ordering::SeqCst), 1);
        // Finished flights are forgotten: the next call runs again.
        assert_eq!(flights.run("cred", || async { 7 }, 0).await.0, 7);
    }

    #[tokio::test]
    async fn work_survives_its_callers_going_away() {
        let flights: SingleFlight<u8, u8> = SingleFlight::default();
        let (done_tx, done_rx) = tokio::sync::oneshot::channel();
        let call = flights.run(
            1,
            || async move {
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                let _ = done_tx.send(());
                1
            },
            0,
        );
        // Drop the only caller before the work completes.
        let _ = tokio::time::timeout(std::time::Duration::from_millis(1), call).await;
        done_rx
            .await
            .expect("the detached work must still complete");
    }

    #[tokio::test]
    async fn a_panicking_flight_answers_with_the_fallback() {
        let flights: SingleFlight<u8, u8> = SingleFlight::default();
        let (out, _) = flights.run(1, || async { panic!("boom") }, 42).await;
        assert_eq!(out, 42);
        assert_eq!(flights.run(1, || async { 5 }, 0).await.0, 5);
    }
}
