//! A sleep that ends when it should: the provider double's latency.
//!
//! tokio's timer wheel ticks once a millisecond and rounds every deadline up
//! to a tick, so `tokio::time::sleep(20 ms)` answers after 20-22 ms (p50
//! 21.9 ms measured, HTTP included). A double configured to take 20 ms then
//! takes about 8 % longer, and every figure computed from its setting (the
//! refresh benchmark's "ideal" of concurrency / latency) is off by as much.
//! Here one thread holds the deadlines and waits on a condition variable,
//! whose timeout is a futex on the monotonic clock with the kernel's
//! high-resolution timers: a sleep ends within tens of microseconds of its
//! deadline, for any number of sleepers, without a thread each.

use std::{
    collections::BTreeMap,
    sync::{Condvar, Mutex, OnceLock},
    time::{Duration, Instant},
};

use tokio::sync::oneshot;

/// Waits `duration`, to within the kernel's timer slack.
pub async fn sleep(duration: Duration) {
    let (wake, woken) = oneshot::channel();
    timer().add(Instant::now() + duration, wake);
    // The timer thread never drops a sender unsent, and lives as long as
    // the process.
    let _ = woken.await;
}

struct Timer {
    due: Mutex<Due>,
    changed: Condvar,
}

/// The sleepers, by deadline; the sequence number keeps equal instants apart.
#[derive(Default)]
struct Due {
    next: u64,
    wakes: BTreeMap<(Instant, u64), oneshot::Sender<()>>,
}

fn timer() -> &'static Timer {
    static TIMER: OnceLock<Timer> = OnceLock::new();
    TIMER.get_or_init(|| {
        // The thread's own `timer()` waits for this initialisation to end.
        std::thread::Builder::new()
            .name("double-timer".into())
            .spawn(|| timer().run())
            .expect("spawn the double's timer thread");
        Timer {
            due: Mutex::default(),
            changed: Condvar::new(),
        }
    })
}

impl Timer {
    fn add(&self, at: Instant, wake: oneshot::Sender<()>) {
        let mut due = self.due.lock().unwrap_or_else(|e| e.into_inner());
        let seq = due.next;
        due.next += 1;
        let earliest = due.wakes.keys().next().is_none_or(|&(first, _)| at < first);
        due.wakes.insert((at, seq), wake);
        drop(due);
        // Only a new earliest deadline shortens the thread's wait.
        if earliest {
            self.changed.notify_one();
        }
    }

    fn run(&self) {
        let mut due = self.due.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            let now = Instant::now();
            while let Some(entry) = due.wakes.first_entry() {
                if entry.key().0 > now {
                    break;
                }
                // A sleeper that gave up has dropped its receiver: nothing to do.
                let _ = entry.remove().send(());
            }
            due = match due.wakes.keys().next() {
                Some(&(first, _)) => {
                    self.changed
                        .wait_timeout(due, first.saturating_duration_since(now))
                        .unwrap_or_else(|e| e.into_inner())
                        .0
                }
                None => self.changed.wait(due).unwrap_or_else(|e| e.into_inner()),
            };
        }
    }
}
