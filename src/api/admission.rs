//! Admission control: who gets served when the vault is at capacity.
//!
//! - [`AdmissionLayer`] caps the calls in flight across all connections and
//!   sheds the excess at once with RESOURCE_EXHAUSTED / `OVERLOADED`, instead
//!   of queueing them until they time out (a queue only adds latency to work
//!   that will be dropped anyway). Health checks are always admitted, so an
//!   overloaded vault still reports SERVING and is not restarted by its probes.
//!   It also bounds every admitted call by `server.request_timeout` (and
//!   records a call whose time runs out before its frame began), and gives
//!   the answer tonic makes itself to an oversized request the error model's
//!   details.
//! - [`IdentityRateLimiter`] keeps one noisy client from using the whole
//!   capacity: a token bucket per caller identity (bounded: idle buckets
//!   are full and are dropped first).
//! - [`CallSlots`] caps the calls one identity has in flight, below the
//!   global cap, so one identity holding calls open cannot starve the rest.

use std::{
    cell::Cell,
    collections::HashMap,
    future::Future,
    pin::Pin,
    sync::{Arc, Mutex},
    task::{Context, Poll},
    time::{Duration, Instant},
};

use hashbrown::HashTable;
use tokio::sync::Semaphore;
use tonic::Status;
use tower::{Layer, Service};

use super::ApiError;
use crate::{
    auth::{Identity, Peer},
    telemetry::Metrics,
};

/// The global in-flight limit, as a tower layer over the gRPC router.
#[derive(Clone)]
pub struct AdmissionLayer {
    permits: Arc<Semaphore>,
    metrics: Arc<Metrics>,
    limits: CallLimits,
}

/// An admitted call, as its frame sees it: a task-local over the call's own
/// future (so it costs no allocation), set up by the admission layer.
struct CallScope {
    /// When the call's time (`server.request_timeout`) runs out: the frame,
    /// dropped unanswered, tells from it a call the vault gave up on from
    /// one whose client hung up.
    deadline: Instant,
    /// Whether the frame has begun: read by the layer when the time runs
    /// out, to leave the call's record to a frame that has one.
    framed: Cell<bool>,
}

tokio::task_local! {
    static CALL: CallScope;
}

/// The frame's first step: tells the admission layer the frame began, and
/// returns the call's deadline. `None` outside an admitted call (a service
/// called without the layer).
pub(crate) fn frame_began() -> Option<Instant> {
    CALL.try_with(|call| {
        call.framed.set(true);
        call.deadline
    })
    .ok()
}

/// What bounds one admitted call.
#[derive(Clone, Copy, Debug)]
pub struct CallLimits {
    /// `server.max_request_bytes`, which tonic's decoder enforces; named in
    /// the status of a request over it.
    pub max_request_bytes: usize,
    /// `server.request_timeout`: the longest a call may take to answer.
    pub request_timeout: Duration,
}

impl AdmissionLayer {
    pub fn new(max_in_flight: usize, limits: CallLimits, metrics: Arc<Metrics>) -> Self {
        Self {
            permits: Arc::new(Semaphore::new(max_in_flight.max(1))),
            metrics,
            limits,
        }
    }
}

impl<S> Layer<S> for AdmissionLayer {
    type Service = Admission<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Admission {
            inner,
            permits: Arc::clone(&self.permits),
            metrics: Arc::clone(&self.metrics),
            limits: self.limits,
        }
    }
}

/// See [`AdmissionLayer`].
#[derive(Clone)]
pub struct Admission<S> {
    inner: S,
    permits: Arc<Semaphore>,
    metrics: Arc<Metrics>,
    limits: CallLimits,
}

/// tonic refuses a request over `server.max_request_bytes` itself, from its
/// length prefix and before any decoder runs, with a bare OUT_OF_RANGE. The
/// error model promises every failure a credvault ErrorInfo, and bad input
/// is the caller's error: it is re-issued as INVALID_FIELD on `request`, and
/// every other answer passes as it is. (An undecodable request never gets
/// this far untyped: the services' codec refuses it, `super::codec`.)
fn typed_oversize(
    response: http::Response<tonic::body::Body>,
    max: usize,
) -> http::Response<tonic::body::Body> {
    // Names made once: a `&str` name is parsed again on every lookup, and
    // this runs on every call.
    const GRPC_STATUS: http::HeaderName = http::HeaderName::from_static("grpc-status");
    const GRPC_MESSAGE: http::HeaderName = http::HeaderName::from_static("grpc-message");
    const GRPC_DETAILS: http::HeaderName = http::HeaderName::from_static("grpc-status-details-bin");
    let headers = response.headers();
    // An answer carries its status in the headers only when it has no
    // body: an answered call's status is in the trailers, and passes here
    // after one lookup.
    let Some(code) = headers.get(&GRPC_STATUS) else {
        return response;
    };
    // Statuses from the error table carry their details; tonic's length
    // refusal is the one OUT_OF_RANGE without them.
    if code != "11" || headers.contains_key(&GRPC_DETAILS) {
        return response;
    }
    let tonic_refusal = headers.get(&GRPC_MESSAGE).is_some_and(|m| {
        percent_encoding::percent_decode(m.as_bytes())
            .decode_utf8_lossy()
            .contains("message length too large")
    });
    if !tonic_refusal {
        return response;
    }
    let status: Status = ApiError::InvalidFields(vec![super::status::FieldViolation::new(
        "request",
        format!("the request message is larger than {max} bytes"),
    )])
    .into();
    status.into_http()
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

impl<S, B> Service<http::Request<B>> for Admission<S>
where
    S: Service<http::Request<B>, Response = http::Response<tonic::body::Body>>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    B: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        // The ready clone serves this call; a fresh clone waits for the next.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        if request.uri().path().starts_with("/grpc.health.v1.Health/") {
            return Box::pin(inner.call(request));
        }
        match Arc::clone(&self.permits).try_acquire_owned() {
            Ok(permit) => {
                let limits = self.limits;
                let deadline = tokio::time::Instant::now() + limits.request_timeout;
                // For the audit of a call whose time runs out before its
                // frame began (its request was still arriving): cheap
                // clones, of an `Arc` and of the path's shared bytes.
                let peer = request.extensions().get::<Peer>().cloned();
                let path = request.uri().path_and_query().cloned();
                let metrics = Arc::clone(&self.metrics);
                Box::pin(async move {
                    let scope = CallScope {
                        deadline: deadline.into_std(),
                        framed: Cell::new(false),
                    };
                    let call = CALL.scope(scope, inner.call(request));
                    let mut call = std::pin::pin!(call);
                    // tonic's own server timeout would answer a bare
                    // CANCELLED; this one answers from the error table. A
                    // refresh the call started is its own task and goes on.
                    let Ok(response) = tokio::time::timeout_at(deadline, call.as_mut()).await
                    else {
                        // A frame records its own call when it is dropped.
                        let framed = call.as_mut().take_value().is_some_and(|c| c.framed.get());
                        if !framed {
                            super::call::record_unframed(
                                &metrics,
                                path.as_ref().map_or("", |p| p.path()),
                                peer.as_ref(),
                                (deadline - limits.request_timeout).into_std(),
                            );
                        }
                        let status: Status = ApiError::TimedOut(limits.request_timeout).into();
                        return Ok(status.into_http());
                    };
                    drop(permit);
                    response.map(|r| typed_oversize(r, limits.max_request_bytes))
                })
            }
            Err(_) => {
                self.metrics.overloaded.inc();
                let status: Status = ApiError::Overloaded("too many calls in flight").into();
                Box::pin(async move { Ok(status.into_http()) })
            }
        }
    }
}

/// Calls in flight per caller identity, so that one identity holding its
/// calls open cannot take every slot of the global cap from the others.
///
/// Keyed by a keyed hash of the identity, which is also the table's hash:
/// no allocation on the hot path, and one hash per call (entering), none on
/// leaving. A `HashMap<u64, _>` hashed the hash again on both.
///
/// The hash is foldhash, seeded per process, rather than std's SipHash,
/// which took about 390 instructions of every call (callgrind, 2026-12-04).
/// SipHash's guarantee against crafted collisions buys nothing here: the
/// table holds only identities with a call in flight (at most the global
/// cap), its keys are identities a CA or an authenticated sidecar vouched
/// for, and two identities that did share a hash would only share a cap.
pub struct CallSlots {
    max: usize,
    in_flight: Arc<Mutex<HashTable<InFlight>>>,
    hasher: foldhash::fast::RandomState,
}

/// One identity's calls in flight.
struct InFlight {
    identity: u64,
    calls: usize,
}

/// One call's place; given back on drop.
pub struct CallSlot {
    in_flight: Arc<Mutex<HashTable<InFlight>>>,
    identity: u64,
}

impl Drop for CallSlot {
    fn drop(&mut self) {
        let mut in_flight = self.in_flight.lock().unwrap_or_else(|e| e.into_inner());
        let identity = self.identity;
        if let Ok(mut entry) = in_flight.find_entry(identity, |f| f.identity == identity) {
            entry.get_mut().calls -= 1;
            if entry.get().calls == 0 {
                entry.remove();
            }
        }
    }
}

impl CallSlots {
    pub fn new(max_per_identity: usize) -> Self {
        Self {
            max: max_per_identity.max(1),
            in_flight: Arc::default(),
            hasher: foldhash::fast::RandomState::default(),
        }
    }

    /// A place for one call of `identity`, or `OVERLOADED`.
    pub fn enter(&self, identity: &Identity) -> Result<CallSlot, ApiError> {
        use std::hash::BuildHasher;
        let identity = self.hasher.hash_one(identity);
        let mut in_flight = self.in_flight.lock().unwrap_or_else(|e| e.into_inner());
        let entry = in_flight
            .entry(identity, |f| f.identity == identity, |f| f.identity)
            .or_insert(InFlight { identity, calls: 0 })
            .into_mut();
        if entry.calls >= self.max {
            return Err(ApiError::Overloaded(
                "too many calls in flight for this identity",
            ));
        }
        entry.calls += 1;
        Ok(CallSlot {
            in_flight: Arc::clone(&self.in_flight),
            identity,
        })
    }
}

/// Buckets kept before idle ones are dropped (an idle bucket is full, so
/// dropping it changes nothing).
const MAX_BUCKETS: usize = 10_000;

/// A token bucket per caller identity.
pub struct IdentityRateLimiter {
    /// Tokens per second; 0 turns the limiter off.
    rate: f64,
    burst: f64,
    buckets: Mutex<HashMap<Identity, Bucket>>,
}

struct Bucket {
    tokens: f64,
    at: Instant,
}

impl IdentityRateLimiter {
    pub fn new(per_second: u32, burst: u32) -> Self {
        Self {
            rate: f64::from(per_second),
            burst: f64::from(burst.max(per_second).max(1)),
            buckets: Mutex::new(HashMap::new()),
        }
    }

    /// Takes one token for `identity`, or refuses with `OVERLOADED`.
    pub fn check(&self, identity: &Identity) -> Result<(), ApiError> {
        if self.rate <= 0.0 {
            return Ok(());
        }
        let now = Instant::now();
        let mut buckets = self.buckets.lock().unwrap_or_else(|e| e.into_inner());
        if buckets.len() >= MAX_BUCKETS {
            let refill_time = self.burst / self.rate;
            buckets.retain(|_, b| now.duration_since(b.at).as_secs_f64() < refill_time);
        }
        // An identity's clone is a reference count.
        let bucket = buckets.entry(identity.clone()).or_insert(Bucket {
            tokens: self.burst,
            at: now,
        });
        let refill = now.duration_since(bucket.at).as_secs_f64() * self.rate;
        bucket.tokens = (bucket.tokens + refill).min(self.burst);
        bucket.at = now;
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            Ok(())
        } else {
            Err(ApiError::Overloaded(
                "rate limit for this identity exceeded",
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn identity(n: usize) -> Identity {
        Identity::CommonName(format!("caller-{n}").into())
    }

    #[test]
    fn idle_buckets_are_dropped_so_the_limiter_stays_bounded() {
        // The burst is at least a second of rate: idle for a second, full.
        let limiter = IdentityRateLimiter::new(1000, 1);
        for n in 0..MAX_BUCKETS {
            limiter.check(&identity(n)).unwrap();
        }
        assert_eq!(limiter.buckets.lock().unwrap().len(), MAX_BUCKETS);
        std::thread::sleep(std::time::Duration::from_millis(1100));
        limiter.check(&identity(MAX_BUCKETS)).unwrap();
        assert_eq!(limiter.buckets.lock().unwrap().len(), 1);
    }

    #[test]
    fn one_identity_holds_at_most_its_slots() {
        let slots = CallSlots::new(2);
        let (a, b) = (
            slots.enter(&identity(1)).unwrap(),
            slots.enter(&identity(1)).unwrap(),
        );
        assert!(slots.enter(&identity(1)).is_err());
        let _other = slots
            .enter(&identity(2))
            .expect("another identity has its own slots");
        drop(a);
        let _again = slots
            .enter(&identity(1))
            .expect("a slot given back is free again");
        drop((b, _other, _again));
        assert_eq!(
            slots.in_flight.lock().unwrap().len(),
            0,
            "an identity with no calls in flight leaves no entry"
        );
    }
}
