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
//! A member is benched when it answers `UNAVAILABLE` ("no leader", "request
//! timed out": a member cut off from the quorum), or when a call to it
//! fails in the transport (refused, reset, timed out) and the member has
//! answered nothing since that call was sent. The proviso is for elections:
//! while a frozen leader is replaced, calls that healthy members forwarded
//! to it time out too, and benching those members for it sent every call
//! to the frozen leader, the one member then left in good standing. For the
//! same reason "leader changed", the answer to a call caught by an election,
//! is an answer: the member is in the new term. The bench lasts
//! [`FIRST_BENCH`], doubling with each failure in a row up to
//! [`LONGEST_BENCH`]. Calls that were out together fail together: only the
//! first failure after what a call saw when it was sent counts, so the
//! calls one freeze caught are one failure, not a run of them.
//!
//! When a bench ends, the member gets one call, its trial, and stays out of the
//! turn until the trial answers: a good answer puts it back, a failure
//! benches it for longer. Without the trial, a member still frozen took its
//! share of every call made while the first of them waited out its timeout,
//! and each of those failed, once per bench. A trial whose caller gave up
//! holds the member out a little longer than the request timeout, then
//! another call tries it. When every member is out the call goes to the one
//! whose bench ends first, so a cluster that comes back is used at once,
//! never refused by this layer.
//!
//! A member can freeze with calls out on it, and its first failure comes
//! only when one of them times out. Until then, a member that has calls
//! out and has answered nothing for [`STALL_FRACTION`] of the request
//! timeout is passed over: new calls go to its peers, and nothing is
//! counted against it, so a member that is merely slow loses no standing
//! and is back in the turn with its next answer. Before, a frozen member
//! kept its turn for the whole timeout, and every call it took in that
//! time waited the timeout out. A stalled member still takes one call per
//! stall, its probe. The calls a healthy member forwarded to a frozen
//! leader hang until the election is over; without a call to answer, the
//! member would answer nothing before they time out, and be benched for
//! them (seen: with two members benched so, every call went to the one
//! left, which froze next). When every member the turn could use is
//! stalled (an election: calls forwarded to a frozen leader hang on every
//! member), the turn goes on as if none were, since passing over all of
//! them would help no call.
//!
//! A stream (the watch) fails without failing its call: its member answered
//! the call and then fell silent. Each response carries the member that
//! answered it ([`AnsweredBy`], in its extensions), so the watch can count a
//! silence against that member ([`Members::went_silent`]) and reopen on
//! another.

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
/// retry, and while it stays frozen it then costs one call (its trial) a
/// timeout per bench, the benches doubling. Leaving a healthy member out
/// costs little, as the others take its calls.
pub const FIRST_BENCH: Duration = Duration::from_secs(5);
/// The longest a member is left out; it then gets one call to show it is
/// back.
pub const LONGEST_BENCH: Duration = Duration::from_secs(60);
/// How much longer than a call's own timeout its trial holds the member
/// out: the time for the timed-out call's failure to be recorded. A hold
/// that ended with the timeout let a second call in as the first failed,
/// and both waited out the timeout.
const TRIAL_MARGIN: Duration = Duration::from_secs(1);
/// The share of the request timeout a member with calls out may go without
/// answering before new calls pass it over. A healthy member answers in
/// milliseconds, a call under an election in about a second; a fifth of
/// the default 5 s timeout is past both, and leaves four fifths of it that
/// the calls a frozen member would have taken no longer wait.
const STALL_FRACTION: u32 = 5;

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
    /// Milliseconds a trial holds its member out of the turn: the request
    /// timeout and [`TRIAL_MARGIN`], so a trial answers or fails within
    /// it, and one whose caller gave up is followed by another.
    trial_hold: u64,
    /// Milliseconds without an answer after which a member with calls out
    /// is passed over: the request timeout over [`STALL_FRACTION`].
    stall: u64,
}

struct Member {
    channel: Channel,
    /// Milliseconds since `epoch` until which the member is left out: its
    /// bench, or its trial's hold.
    benched_until: AtomicU64,
    /// Zero for a member in good standing; otherwise its next call is a
    /// trial.
    failures_in_a_row: AtomicU32,
    /// Good answers so far: a call that got none counts against the member
    /// only if this has not moved since the call was sent.
    answers: AtomicU64,
    /// Calls sent to the member that have not ended yet.
    out: AtomicU32,
    /// Milliseconds since `epoch` of the member's last response, or of
    /// the first call sent after a time with none out, whichever is later:
    /// how long calls out on it have gone unanswered is measured from here.
    heard_at: AtomicU64,
    /// Milliseconds since `epoch` from which the member, if stalled, takes
    /// its next probe.
    probe_at: AtomicU64,
}

/// What a call found when it was sent, to judge its outcome by.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Ticket {
    index: usize,
    failures: u32,
    answers: u64,
}

/// How a call to a member ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Outcome {
    /// The member answered for the cluster, whatever the answer.
    Answered,
    /// It answered that it cannot serve (`UNAVAILABLE`), or a stream it
    /// answered fell silent: counts whatever else it answered.
    CannotServe,
    /// No answer: refused, reset or timed out in the transport.
    NoAnswer,
}

impl Member {
    /// Whether the member has calls out and has answered nothing for
    /// `stall` milliseconds.
    fn stalled(&self, now: u64, stall: u64) -> bool {
        self.out.load(Ordering::Relaxed) > 0
            && now.saturating_sub(self.heard_at.load(Ordering::Relaxed)) >= stall
    }

    /// Whether this call is the stalled member's probe: one per `stall`.
    fn takes_a_probe(&self, now: u64, stall: u64) -> bool {
        let due = self.probe_at.load(Ordering::Relaxed);
        due <= now
            && self
                .probe_at
                .compare_exchange(
                    due,
                    now.saturating_add(stall),
                    Ordering::Relaxed,
                    Ordering::Relaxed,
                )
                .is_ok()
    }

    /// Whether a call may go to this member now, `until` being its
    /// `benched_until` as read, already past. A member in good standing
    /// takes any number of calls; one whose bench has ended takes one, the
    /// call that wins the right to hold it out while it is tried.
    fn takes_a_call(&self, until: u64, now: u64, hold: u64) -> bool {
        if self.failures_in_a_row.load(Ordering::Relaxed) == 0 {
            return true;
        }
        self.benched_until
            .compare_exchange(
                until,
                now.saturating_add(hold),
                Ordering::Relaxed,
                Ordering::Relaxed,
            )
            .is_ok()
    }
}

impl Members {
    /// One lazily connected channel per member: a member that is down now
    /// is tried again when its turn comes. `None` without a member: there
    /// would be no one to call.
    /// `request_timeout` is the channels' own: how long a call may wait.
    pub fn new(channels: Vec<Channel>, request_timeout: Duration) -> Option<Self> {
        if channels.is_empty() {
            return None;
        }
        let members = channels
            .into_iter()
            .map(|channel| Member {
                channel,
                benched_until: AtomicU64::new(0),
                failures_in_a_row: AtomicU32::new(0),
                answers: AtomicU64::new(0),
                out: AtomicU32::new(0),
                heard_at: AtomicU64::new(0),
                probe_at: AtomicU64::new(0),
            })
            .collect();
        Some(Self {
            shared: Arc::new(Shared {
                members,
                turn: AtomicUsize::new(0),
                epoch: Instant::now(),
                trial_hold: millis(request_timeout.saturating_add(TRIAL_MARGIN)),
                stall: millis(request_timeout / STALL_FRACTION),
            }),
        })
    }
}

/// Which member answered a call, in the response's extensions.
#[derive(Clone, Copy, Debug)]
pub struct AnsweredBy {
    index: usize,
}

impl Members {
    /// A stream this member answered has gone silent past what its peer
    /// allows: counted as a failure of the member, unless it is out of the
    /// turn already (benched, or held for its trial), so the next call, and
    /// the stream reopened, go to another member. Counted whatever else the
    /// member answered: a member whose watch misses what the cluster
    /// acknowledged is no place for the watch.
    pub fn went_silent(&self, answered: AnsweredBy) {
        self.shared.went_silent(answered.index, self.shared.now());
    }

    /// Whether some member is in good standing: not benched, not on trial.
    /// A read that just failed retries only then, so that once every member
    /// has failed a call (the cluster down, or cut off from this replica)
    /// a caller waits out one timeout, not two.
    pub fn any_in_good_standing(&self) -> bool {
        self.shared.members.iter().any(|member| {
            member.failures_in_a_row.load(Ordering::Relaxed) == 0
                && member.benched_until.load(Ordering::Relaxed) == 0
        })
    }
}

impl Shared {
    fn now(&self) -> u64 {
        millis(self.epoch.elapsed())
    }

    /// The member for the next call: the next in turn that takes one (not
    /// benched, not on trial) and is not stalled, or is and takes the call
    /// as its probe; failing that, the first stalled one that takes it;
    /// failing that, the one back soonest. With what the call found of it.
    fn pick(&self, now: u64) -> Ticket {
        let count = self.members.len();
        let start = self.turn.fetch_add(1, Ordering::Relaxed) % count;
        let mut soonest = (u64::MAX, start);
        let mut first_stalled = None;
        for step in 0..count {
            let index = (start + step) % count;
            let member = &self.members[index];
            let until = member.benched_until.load(Ordering::Relaxed);
            if until <= now {
                if member.stalled(now, self.stall) && !member.takes_a_probe(now, self.stall) {
                    first_stalled = first_stalled.or(Some((index, until)));
                } else if member.takes_a_call(until, now, self.trial_hold) {
                    return self.ticket(index);
                }
            }
            if until < soonest.0 {
                soonest = (until, index);
            }
        }
        match first_stalled {
            Some((index, until))
                if self.members[index].takes_a_call(until, now, self.trial_hold) =>
            {
                self.ticket(index)
            }
            _ => self.ticket(soonest.1),
        }
    }

    /// Picks the member for a call and counts the call out on it until the
    /// returned guard is dropped.
    fn send(self: &Arc<Self>, now: u64) -> (Ticket, CallOut) {
        let ticket = self.pick(now);
        let member = &self.members[ticket.index];
        if member.out.fetch_add(1, Ordering::Relaxed) == 0 {
            // Nothing was out: the wait for an answer starts now, not at
            // the member's last answer, which may be long ago.
            member.heard_at.fetch_max(now, Ordering::Relaxed);
        }
        let out = CallOut {
            shared: Arc::clone(self),
            index: ticket.index,
        };
        (ticket, out)
    }

    /// The member sent a response (any, even an error status): it is not
    /// stalled.
    fn heard_from(&self, index: usize, now: u64) {
        self.members[index]
            .heard_at
            .fetch_max(now, Ordering::Relaxed);
    }

    /// [`Members::went_silent`] at `now`.
    fn went_silent(&self, index: usize, now: u64) {
        let Some(member) = self.members.get(index) else {
            return;
        };
        if member.benched_until.load(Ordering::Relaxed) > now {
            return;
        }
        self.record(self.ticket(index), Outcome::CannotServe, now);
    }

    fn ticket(&self, index: usize) -> Ticket {
        let member = &self.members[index];
        Ticket {
            index,
            failures: member.failures_in_a_row.load(Ordering::Relaxed),
            answers: member.answers.load(Ordering::Relaxed),
        }
    }

    /// Records a call's outcome, `ticket` being what it found when sent.
    /// Any answer puts the member back. No answer counts only if the member
    /// gave none since. A failure counts only if no other call's failure
    /// has counted since this call was sent: six calls caught by one freeze
    /// bench the member once, not for six doublings.
    fn record(&self, ticket: Ticket, outcome: Outcome, now: u64) {
        let member = &self.members[ticket.index];
        match outcome {
            Outcome::Answered => {
                member.answers.fetch_add(1, Ordering::Relaxed);
                member.failures_in_a_row.store(0, Ordering::Relaxed);
                member.benched_until.store(0, Ordering::Relaxed);
                return;
            }
            Outcome::NoAnswer if member.answers.load(Ordering::Relaxed) != ticket.answers => {
                return;
            }
            Outcome::NoAnswer | Outcome::CannotServe => {}
        }
        let failures = ticket.failures.saturating_add(1);
        if member
            .failures_in_a_row
            .compare_exchange(
                ticket.failures,
                failures,
                Ordering::Relaxed,
                Ordering::Relaxed,
            )
            .is_ok()
        {
            member
                .benched_until
                .store(now.saturating_add(bench(failures)), Ordering::Relaxed);
        }
    }
}

/// A call counted out on its member until it ends, however it ends: with a
/// response, a failure, or its caller dropping it.
struct CallOut {
    shared: Arc<Shared>,
    index: usize,
}

impl Drop for CallOut {
    fn drop(&mut self) {
        self.shared.members[self.index]
            .out
            .fetch_sub(1, Ordering::Relaxed);
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

/// etcd's answer to a call an election caught (`ErrGRPCLeaderChanged`).
const LEADER_CHANGED: &[u8] = b"etcdserver: leader changed";

/// How the call ended for its member. An error status without a message
/// comes in the response's headers (gRPC's trailers-only form); one that
/// follows messages, as on a watch stream, is the watch's to handle.
fn outcome(result: &Result<http::Response<Body>, tonic::transport::Error>) -> Outcome {
    let Ok(response) = result else {
        return Outcome::NoAnswer;
    };
    let headers = response.headers();
    let unavailable = headers
        .get("grpc-status")
        .is_some_and(|status| Code::from_bytes(status.as_bytes()) == Code::Unavailable);
    let leader_changed = headers
        .get("grpc-message")
        .is_some_and(|message| message.as_bytes() == LEADER_CHANGED);
    if unavailable && !leader_changed {
        Outcome::CannotServe
    } else {
        Outcome::Answered
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
        let (ticket, out) = shared.send(shared.now());
        let channel = shared.members[ticket.index].channel.clone();
        Box::pin(async move {
            let mut result = channel.oneshot(request).await;
            drop(out);
            let now = shared.now();
            shared.record(ticket, outcome(&result), now);
            if let Ok(response) = &mut result {
                shared.heard_from(ticket.index, now);
                response.extensions_mut().insert(AnsweredBy {
                    index: ticket.index,
                });
            }
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
        // A 4 s request timeout: trials hold their member out for 5 s.
        Members::new(channels, Duration::from_secs(4)).unwrap()
    }

    /// The members `n` calls made at `now` go to.
    fn picks(shared: &Shared, n: usize, now: u64) -> Vec<usize> {
        (0..n).map(|_| shared.pick(now).index).collect()
    }

    fn calls_to(picks: &[usize], member: usize) -> usize {
        picks.iter().filter(|&&p| p == member).count()
    }

    /// A call to `member`, sent after every earlier outcome was recorded,
    /// gets no answer at `now`.
    fn fail(shared: &Shared, member: usize, now: u64) {
        shared.record(shared.ticket(member), Outcome::NoAnswer, now);
    }

    /// A call to `member`, sent after every earlier outcome was recorded,
    /// is answered at `now`.
    fn answer(shared: &Shared, member: usize, now: u64) {
        shared.record(shared.ticket(member), Outcome::Answered, now);
    }

    /// A call sent at `now` that the turn gives to `member`; the calls it
    /// gives to the others on the way end at once.
    fn send_to(shared: &Arc<Shared>, member: usize, now: u64) -> (Ticket, CallOut) {
        (0..shared.members.len() * 2)
            .map(|_| shared.send(now))
            .find(|(ticket, _)| ticket.index == member)
            .expect("the turn reaches the member")
    }

    fn benched_until(shared: &Shared, member: usize) -> u64 {
        shared.members[member].benched_until.load(Ordering::Relaxed)
    }

    #[test]
    fn without_a_member_there_is_no_transport() {
        assert!(Members::new(Vec::new(), FIRST_BENCH).is_none());
    }

    #[tokio::test]
    async fn calls_go_round_the_members() {
        let members = members(3);
        assert_eq!(picks(&members.shared, 6, 0), [0, 1, 2, 0, 1, 2]);
    }

    #[tokio::test]
    async fn a_failed_member_is_left_out_until_its_bench_ends() {
        let members = members(3);
        let shared = &members.shared;
        fail(shared, 1, 10_000);
        let during = picks(shared, 6, 10_500);
        assert_eq!(calls_to(&during, 1), 0, "{during:?}");
        assert!(
            calls_to(&during, 0) > 0 && calls_to(&during, 2) > 0,
            "{during:?}"
        );
        // Tried again once its bench (5 s) has passed.
        let after = picks(shared, 3, 15_000);
        assert_eq!(calls_to(&after, 1), 1, "{after:?}");
    }

    #[tokio::test]
    async fn a_member_back_from_its_bench_takes_one_call_until_that_call_answers() {
        let members = members(3);
        let shared = &members.shared;
        fail(shared, 1, 10_000);
        // Its bench over, the member gets one call, however many are made
        // while that one is out.
        let trial = picks(shared, 30, 15_000);
        assert_eq!(calls_to(&trial, 1), 1, "{trial:?}");
        let while_out = picks(shared, 30, 19_000);
        assert_eq!(calls_to(&while_out, 1), 0, "{while_out:?}");
        // The trial answered: back in the turn for every call.
        answer(shared, 1, 19_500);
        let back = picks(shared, 6, 19_500);
        assert_eq!(calls_to(&back, 1), 2, "{back:?}");
    }

    #[tokio::test]
    async fn a_failed_trial_benches_longer_and_an_abandoned_one_is_tried_again() {
        let members = members(3);
        let shared = &members.shared;
        fail(shared, 2, 0);
        let trial = picks(shared, 6, 5_000);
        assert_eq!(calls_to(&trial, 2), 1, "{trial:?}");
        // The trial failed: out for 10 s now.
        fail(shared, 2, 10_000);
        assert_eq!(benched_until(shared, 2), 20_000);
        assert_eq!(calls_to(&picks(shared, 30, 19_999), 2), 0);
        // A trial whose caller gave up (no answer recorded) holds the
        // member out for its request timeout and a second, then another
        // call tries it.
        assert_eq!(calls_to(&picks(shared, 30, 20_000), 2), 1);
        assert_eq!(calls_to(&picks(shared, 30, 24_999), 2), 0);
        assert_eq!(calls_to(&picks(shared, 30, 25_000), 2), 1);
    }

    #[tokio::test]
    async fn calls_caught_together_by_one_failure_count_once() {
        let members = members(3);
        let shared = &members.shared;
        // Six calls sent to member 0 in good standing, all failing as it
        // freezes: one failure, the first bench.
        let sent: Vec<Ticket> = (0..6)
            .map(|_| shared.pick(0))
            .filter(|ticket| ticket.index == 0)
            .collect();
        assert_eq!(sent.len(), 2);
        for ticket in sent.iter().cycle().take(6) {
            shared.record(*ticket, Outcome::NoAnswer, 5_000);
        }
        assert_eq!(benched_until(shared, 0), 10_000);
        // Its trial, sent having seen that failure, fails: the bench doubles.
        let trial = (0..3)
            .map(|_| shared.pick(10_000))
            .find(|ticket| ticket.index == 0)
            .unwrap();
        assert_eq!(trial.failures, 1);
        shared.record(trial, Outcome::NoAnswer, 15_000);
        assert_eq!(benched_until(shared, 0), 25_000);
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
            fail(shared, 0, 0);
        }
        assert_eq!(benched_until(shared, 0), 20_000);
        answer(shared, 0, 100);
        assert_eq!(benched_until(shared, 0), 0);
        fail(shared, 0, 200);
        assert_eq!(benched_until(shared, 0), 5_200);
    }

    #[tokio::test]
    async fn with_every_member_benched_the_call_goes_to_the_soonest_back() {
        let members = members(3);
        let shared = &members.shared;
        fail(shared, 0, 0);
        fail(shared, 0, 0); // until 10 000
        fail(shared, 1, 500); // until 5 500
        for _ in 0..3 {
            fail(shared, 2, 0); // until 20 000
        }
        assert_eq!(picks(shared, 3, 600), [1, 1, 1]);
    }

    #[tokio::test]
    async fn no_answer_counts_only_if_the_member_answered_nothing_since() {
        let members = members(3);
        let shared = &members.shared;
        // A call a healthy member forwarded to a frozen leader: it times
        // out, but the member answered another call meanwhile.
        let forwarded = shared.ticket(1);
        answer(shared, 1, 100);
        shared.record(forwarded, Outcome::NoAnswer, 5_000);
        assert_eq!(benched_until(shared, 1), 0);
        assert!(members.any_in_good_standing());
        // Silent since the call was sent: benched.
        let sent = shared.ticket(1);
        shared.record(sent, Outcome::NoAnswer, 5_000);
        assert_eq!(benched_until(shared, 1), 10_000);
        // UNAVAILABLE is an answer that it cannot serve: it counts whatever
        // the member answered before.
        answer(shared, 2, 0);
        let refused = shared.ticket(2);
        answer(shared, 2, 10);
        shared.record(refused, Outcome::CannotServe, 20);
        assert_eq!(benched_until(shared, 2), 5_020);
    }

    #[tokio::test]
    async fn a_silent_stream_benches_the_member_that_answered_it_once() {
        let members = members(3);
        let shared = &members.shared;
        members.went_silent(AnsweredBy { index: 1 });
        let until = benched_until(shared, 1);
        assert!(until >= millis(FIRST_BENCH), "{until}");
        assert_eq!(calls_to(&picks(shared, 6, 0), 1), 0);
        // Already benched: a second silence (another stream of the same
        // freeze) does not double the bench.
        members.went_silent(AnsweredBy { index: 1 });
        assert_eq!(benched_until(shared, 1), until);
        // An index this transport never handed out is ignored.
        members.went_silent(AnsweredBy { index: 7 });
        // A member whose bench is over but whose trial has not been sent
        // is not out of the turn: its silence counts, and its next call is
        // not the reopened watch's.
        fail(shared, 2, 0);
        shared.went_silent(2, 5_000);
        assert_eq!(benched_until(shared, 2), 15_000);
    }

    #[tokio::test]
    async fn good_standing_is_a_member_neither_benched_nor_on_trial() {
        let members = members(2);
        assert!(members.any_in_good_standing());
        fail(&members.shared, 0, 0);
        assert!(members.any_in_good_standing());
        fail(&members.shared, 1, 0);
        assert!(!members.any_in_good_standing());
        // Benches over, trials due: still not in good standing until one
        // answers.
        let _ = picks(&members.shared, 2, 60_000);
        assert!(!members.any_in_good_standing());
        answer(&members.shared, 1, 60_001);
        assert!(members.any_in_good_standing());
    }

    #[tokio::test]
    async fn a_member_with_calls_out_and_no_answer_for_a_fifth_of_the_timeout_is_passed_over() {
        let members = members(3);
        let shared = &members.shared;
        // A call out on member 0 from 10 s; the stall is 800 ms (4 s / 5).
        let _out = send_to(shared, 0, 10_000);
        assert_eq!(calls_to(&picks(shared, 6, 10_799), 0), 2);
        // Stalled: one call per stall is its probe, the rest go to its peers.
        let stalled = picks(shared, 30, 10_800);
        assert_eq!(calls_to(&stalled, 0), 1, "{stalled:?}");
        assert_eq!(calls_to(&picks(shared, 30, 11_599), 0), 0);
        assert_eq!(calls_to(&picks(shared, 30, 11_600), 0), 1);
        // Nothing counts against it: not benched, still in good standing.
        assert_eq!(benched_until(shared, 0), 0);
        assert!(members.any_in_good_standing());
        // Its next response, whatever it says, puts it back in the turn.
        shared.heard_from(0, 11_700);
        assert_eq!(calls_to(&picks(shared, 6, 11_700), 0), 2);
    }

    #[tokio::test]
    async fn the_wait_for_an_answer_starts_with_the_first_call_out_not_the_last_answer() {
        let members = members(3);
        let shared = &members.shared;
        shared.heard_from(0, 1_000);
        // Idle for a minute, then a call goes out: not stalled at once.
        let (_, out) = send_to(shared, 0, 61_000);
        assert_eq!(calls_to(&picks(shared, 6, 61_500), 0), 2);
        // Stalled: its probe, then nothing.
        assert_eq!(calls_to(&picks(shared, 6, 61_800), 0), 1);
        assert_eq!(calls_to(&picks(shared, 6, 61_800), 0), 0);
        // The call ended unanswered (its caller gave up): nothing is out,
        // so nothing is waited for.
        drop(out);
        assert_eq!(calls_to(&picks(shared, 6, 61_800), 0), 2);
    }

    #[tokio::test]
    async fn a_stalled_member_that_answers_its_probe_is_not_benched_for_its_hung_calls() {
        let members = members(3);
        let shared = &members.shared;
        // Member 0 forwarded a call to a frozen leader: it hangs. Members
        // 1 and 2 answer (the election is over).
        let (hung, out) = send_to(shared, 0, 0);
        // Stalled from 800 ms: its probe, answered at once.
        let probe = (0..3)
            .map(|_| shared.pick(1_000))
            .find(|ticket| ticket.index == 0)
            .expect("the stalled member takes its probe");
        shared.record(probe, Outcome::Answered, 1_010);
        shared.heard_from(0, 1_010);
        // The hung call times out: the member answered since, so it is
        // not benched, and it is back in the turn.
        drop(out);
        shared.record(hung, Outcome::NoAnswer, 4_000);
        assert_eq!(benched_until(shared, 0), 0);
        assert_eq!(calls_to(&picks(shared, 6, 4_000), 0), 2);
    }

    #[tokio::test]
    async fn with_every_member_stalled_the_turn_goes_on_as_if_none_were() {
        let members = members(3);
        let shared = &members.shared;
        // An election: calls out on every member, none answered. Each
        // takes its probe, then the calls go round all the same.
        let _out: Vec<_> = (0..3).map(|_| shared.send(0)).collect();
        assert_eq!(picks(shared, 9, 5_000), [0, 1, 2, 0, 1, 2, 0, 1, 2]);
        // One answers: it takes every call until the others do (or their
        // next probes are due).
        shared.heard_from(1, 5_000);
        assert_eq!(picks(shared, 6, 5_000), [1, 1, 1, 1, 1, 1]);
        // A benched member stays out even when the others are stalled.
        fail(shared, 1, 5_000);
        let stalled_or_benched = picks(shared, 6, 6_000);
        assert_eq!(
            calls_to(&stalled_or_benched, 1),
            0,
            "{stalled_or_benched:?}"
        );
    }

    #[tokio::test]
    async fn an_answer_of_unavailable_counts_against_a_member_unless_the_leader_changed() {
        let answer = |status: Option<&str>, message: &str| {
            let mut response = http::Response::new(Body::empty());
            if let Some(status) = status {
                let headers = response.headers_mut();
                headers.insert("grpc-status", status.parse().unwrap());
                headers.insert("grpc-message", message.parse().unwrap());
            }
            outcome(&Ok(response))
        };
        assert_eq!(answer(None, ""), Outcome::Answered);
        assert_eq!(answer(Some("0"), ""), Outcome::Answered);
        // NOT_FOUND, FAILED_PRECONDITION: the member answered for the cluster.
        assert_eq!(answer(Some("5"), ""), Outcome::Answered);
        assert_eq!(answer(Some("9"), ""), Outcome::Answered);
        for message in ["etcdserver: no leader", "etcdserver: request timed out"] {
            assert_eq!(answer(Some("14"), message), Outcome::CannotServe);
        }
        // An election caught the call; the member is in the new term.
        assert_eq!(
            answer(Some("14"), "etcdserver: leader changed"),
            Outcome::Answered
        );
        // A member nobody listens on: the connection is refused.
        let mut members = members(1);
        let request = http::Request::builder()
            .uri("http://127.0.0.1:1/etcdserverpb.KV/Range")
            .body(Body::empty())
            .unwrap();
        assert!(members.call(request).await.is_err());
        assert!(benched_until(&members.shared, 0) > 0);
    }
}
