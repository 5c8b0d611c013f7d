//! The etcd members as one transport for the generated clients: each call
//! goes to the next member in turn, and a member that just failed a call is
//! left out of the turn for a while.
//!
//! Why not tonic's balanced channel: it picks between members at random and
//! knows only whether a connection is open. A member that is frozen (a
//! stopped process, a stalled disk, a host that drops packets) keeps its
//! connection open and answers nothing, so it kept its share of the calls,
//! and each of them waited out the whole request timeout. A Revoke makes a
//! few etcd calls in a row, and some took more than 30 s of retries to land.
//! Here the first call that times out benches the member: the calls after
//! it go to the others.
//!
//! A member is benched when a call to it fails in the transport (refused,
//! reset, timed out) or when it answers `UNAVAILABLE` (etcd's "no leader",
//! "leader changed": a member cut off from the quorum). The bench lasts
//! [`FIRST_BENCH`], doubling with each failure in a row up to [`LONGEST_BENCH`];
//! one good answer from the member ends it. When every member is benched
//! the call goes to the one whose bench ends first, so a cluster that comes
//! back is used at once, never refused by this layer.

use std::{
    future::Future,
    pin::Pin,
    sync::{
        atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering},
        Arc,
    },
    task::{Context, Poll},
    time::{Duration, Instant},
};

use tonic::{body::Body, transport::Channel, Code};
use tower::{Service, ServiceExt};

/// How long a member is left out after its first failure in a row: long
/// enough that a frozen member is still out when the callers that met it
/// retry, and while it stays frozen it then costs one call a timeout per
/// bench, the benches doubling. Leaving a healthy member out costs little,
/// as the others take its calls.
pub const FIRST_BENCH: Duration = Duration::from_secs(5);
/// The longest a member is left out; it then gets one call to show it is
/// back.
pub const LONGEST_BENCH: Duration = Duration::from_secs(60);

/// Every member, cheap to clone: the clones share the turn and the benches.
#[derive(Clone)]
pub struct Members {
    shared: Arc<Shared>,
}

struct Shared {
    members: Box<[Member]>,
    turn: AtomicUsize,
    /// The zero of the benches' millisecond clock.
    epoch: Instant,
}

struct Member {
    channel: Channel,
    /// Milliseconds since `epoch` until which the member is left out.
    benched_until: AtomicU64,
    failures_in_a_row: AtomicU32,
}

impl Members {
    /// One lazily connected channel per member: a member that is down now
    /// is tried again when its turn comes. `None` without a member: there
    /// would be no one to call.
    pub fn new(channels: Vec<Channel>) -> Option<Self> {
        if channels.is_empty() {
            return None;
        }
        let members = channels
            .into_iter()
            .map(|channel| Member {
                channel,
                benched_until: AtomicU64::new(0),
                failures_in_a_row: AtomicU32::new(0),
            })
            .collect();
        Some(Self {
            shared: Arc::new(Shared {
                members,
                turn: AtomicUsize::new(0),
                epoch: Instant::now(),
            }),
        })
    }
}

impl Shared {
    fn now(&self) -> u64 {
        millis(self.epoch.elapsed())
    }

    /// The member for the next call: the next in turn that is not benched,
    /// or, if all are, the one whose bench ends first.
    fn pick(&self, now: u64) -> usize {
        let count = self.members.len();
        let start = self.turn.fetch_add(1, Ordering::Relaxed) % count;
        let mut soonest = (u64::MAX, start);
        for step in 0..count {
            let index = (start + step) % count;
            let until = self.members[index].benched_until.load(Ordering::Relaxed);
            if until <= now {
                return index;
            }
            if until < soonest.0 {
                soonest = (until, index);
            }
        }
        soonest.1
    }

    fn record(&self, index: usize, healthy: bool, now: u64) {
        let member = &self.members[index];
        if healthy {
            member.failures_in_a_row.store(0, Ordering::Relaxed);
            member.benched_until.store(0, Ordering::Relaxed);
            return;
        }
        let failures = member
            .failures_in_a_row
            .fetch_add(1, Ordering::Relaxed)
            .saturating_add(1);
        member
            .benched_until
            .store(now.saturating_add(bench(failures)), Ordering::Relaxed);
    }
}

/// Milliseconds a member is left out after `failures` failures in a row.
fn bench(failures: u32) -> u64 {
    let doublings = failures.saturating_sub(1).min(16);
    millis(
        FIRST_BENCH
            .saturating_mul(1 << doublings)
            .min(LONGEST_BENCH),
    )
}

fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

/// Whether the call's outcome says the member can serve: it answered, and
/// not with `UNAVAILABLE`. An error status without a message comes in the
/// response's headers (gRPC's trailers-only form); one that follows
/// messages, as on a watch stream, is the watch's to handle.
fn healthy(result: &Result<http::Response<Body>, tonic::transport::Error>) -> bool {
    match result {
        Ok(response) => response
            .headers()
            .get("grpc-status")
            .is_none_or(|status| Code::from_bytes(status.as_bytes()) != Code::Unavailable),
        Err(_) => false,
    }
}

impl Service<http::Request<Body>> for Members {
    type Response = http::Response<Body>;
    type Error = tonic::transport::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        // Each member's channel is made ready in the call, once it is picked.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        let shared = Arc::clone(&self.shared);
        let index = shared.pick(shared.now());
        let channel = shared.members[index].channel.clone();
        Box::pin(async move {
            let result = channel.oneshot(request).await;
            shared.record(index, healthy(&result), shared.now());
            result
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn members(count: usize) -> Members {
        let channels = (0..count)
            .map(|port| {
                tonic::transport::Endpoint::from_shared(format!("http://127.0.0.1:{}", port + 1))
                    .unwrap()
                    .connect_lazy()
            })
            .collect();
        Members::new(channels).unwrap()
    }

    #[test]
    fn without_a_member_there_is_no_transport() {
        assert!(Members::new(Vec::new()).is_none());
    }

    #[tokio::test]
    async fn calls_go_round_the_members() {
        let members = members(3);
        let picks: Vec<usize> = (0..6).map(|_| members.shared.pick(0)).collect();
        assert_eq!(picks, [0, 1, 2, 0, 1, 2]);
    }

    #[tokio::test]
    async fn a_failed_member_is_left_out_until_its_bench_ends() {
        let members = members(3);
        let shared = &members.shared;
        shared.record(1, false, 10_000);
        let picks: Vec<usize> = (0..6).map(|_| shared.pick(10_500)).collect();
        assert!(!picks.contains(&1), "{picks:?}");
        assert!(picks.contains(&0) && picks.contains(&2), "{picks:?}");
        // Back in the turn once its bench (5 s) has passed.
        let picks: Vec<usize> = (0..3).map(|_| shared.pick(15_000)).collect();
        assert!(picks.contains(&1), "{picks:?}");
    }

    #[tokio::test]
    async fn the_bench_doubles_with_failures_in_a_row_and_one_answer_ends_it() {
        assert_eq!(
            (1..=7).map(bench).collect::<Vec<_>>(),
            [5_000, 10_000, 20_000, 40_000, 60_000, 60_000, 60_000]
        );
        assert_eq!(bench(u32::MAX), 60_000);
        let members = members(2);
        let shared = &members.shared;
        for _ in 0..3 {
            shared.record(0, false, 0);
        }
        assert_eq!(
            shared.members[0].benched_until.load(Ordering::Relaxed),
            20_000
        );
        shared.record(0, true, 100);
        assert_eq!(shared.members[0].benched_until.load(Ordering::Relaxed), 0);
        shared.record(0, false, 200);
        assert_eq!(
            shared.members[0].benched_until.load(Ordering::Relaxed),
            5_200
        );
    }

    #[tokio::test]
    async fn with_every_member_benched_the_call_goes_to_the_soonest_back() {
        let members = members(3);
        let shared = &members.shared;
        shared.record(0, false, 0);
        shared.record(0, false, 0); // until 10 000
        shared.record(1, false, 500); // until 5 500
        shared.record(2, false, 0);
        shared.record(2, false, 0);
        shared.record(2, false, 0); // until 20 000
        for _ in 0..3 {
            assert_eq!(shared.pick(600), 1);
        }
    }

    #[tokio::test]
    async fn unavailable_and_transport_failures_count_against_a_member() {
        let answer = |status: Option<&str>| {
            let mut response = http::Response::new(Body::empty());
            if let Some(status) = status {
                response
                    .headers_mut()
                    .insert("grpc-status", status.parse().unwrap());
            }
            Ok(response)
        };
        assert!(healthy(&answer(None)));
        assert!(healthy(&answer(Some("0"))));
        // NOT_FOUND, FAILED_PRECONDITION: the member answered for the cluster.
        assert!(healthy(&answer(Some("5"))));
        assert!(healthy(&answer(Some("9"))));
        assert!(!healthy(&answer(Some("14"))));
        // A member nobody listens on: the connection is refused.
        let mut members = members(1);
        let request = http::Request::builder()
            .uri("http://127.0.0.1:1/etcdserverpb.KV/Range")
            .body(Body::empty())
            .unwrap();
        assert!(members.call(request).await.is_err());
        assert!(
            members.shared.members[0]
                .benched_until
                .load(Ordering::Relaxed)
                > 0
        );
    }
}
