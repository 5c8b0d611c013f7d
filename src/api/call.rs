//! The frame every RPC runs in: authenticate the request, admit it (validate
//! and authorize), run it, then record the outcome (metrics, the audit
//! event, a log line) and map it to the wire. Handlers supply only the two
//! middle steps. A call that ends unanswered (its client hung up, or its
//! time ran out) is recorded too; one whose time ran out before its frame
//! began is recorded for the admission layer, by [`record_unframed`].

use std::{future::Future, sync::Arc, time::Instant};

use http::HeaderName;
use tonic::{Request, Response, Status};

use super::{
    admission::{CallSlots, IdentityRateLimiter},
    pb::CredentialRef,
    status::ApiError,
};
use crate::{
    auth::{
        self, Authenticator, Caller, Forwarded, Identity, Peer, Principal, SIDECAR_SECRET_HEADER,
    },
    telemetry::{audit, Metrics},
};

/// What every call passes before its handler runs: authentication, the
/// bearer token's claims, then the per-identity rate limit and call cap.
pub struct Gate {
    pub auth: Arc<Authenticator>,
    pub limiter: IdentityRateLimiter,
    pub slots: CallSlots,
}

impl Gate {
    /// The principal behind a request, from its connection's identity. The
    /// identity goes into the audit entry as soon as it is known.
    pub(crate) fn principal<T>(
        &self,
        request: &Request<T>,
        entry: &mut AuditEntry,
    ) -> Result<Principal, ApiError> {
        // Names made once: a `&str` name is parsed again on every lookup.
        const XFCC: HeaderName = HeaderName::from_static("x-forwarded-client-cert");
        const SIDECAR_SECRET: HeaderName = HeaderName::from_static(SIDECAR_SECRET_HEADER);
        let header = |name: &HeaderName| {
            request
                .metadata()
                .as_ref()
                .get(name)
                .map(|v| v.to_str().map_err(|_| ()))
        };
        let (identity, memo) = self.auth.request_identity(
            request.extensions().get::<Peer>(),
            Forwarded {
                xfcc: header(&XFCC),
                sidecar_secret: header(&SIDECAR_SECRET),
            },
        )?;
        entry.identified(&identity);
        let bearer = auth::bearer(header(&http::header::AUTHORIZATION))?;
        let principal = self.auth.principal(identity, bearer, memo)?;
        // Buckets only for identities the policy knows: a stranger cannot
        // grow the limiter's state.
        if !principal.grants.actions.is_empty() {
            self.limiter.check(&principal.identity)?;
        }
        Ok(principal)
    }
}

/// Who made a call, for which tenant and about which credential, for the
/// audit event: filled in as each is learned, so a refused call still says
/// who was refused and what they asked for.
///
/// Everything in it is only for the log lines (the audit line, and the
/// debug line of a failed call), so when neither is written nothing is
/// recorded: no string copies, and not the subject's keyed hash (an HMAC).
#[derive(Default)]
pub(crate) struct AuditEntry {
    /// Some line will be written.
    on: bool,
    identity: Option<Identity>,
    tenant: String,
    provider: String,
    subject_hash: String,
}

impl AuditEntry {
    /// The reference a request names, before it is authorized.
    fn new() -> Self {
        Self {
            on: audit::enabled() || tracing::enabled!(tracing::Level::DEBUG),
            ..Self::default()
        }
    }

    fn identified(&mut self, identity: &Identity) {
        if self.on {
            self.identity = Some(identity.clone());
        }
    }

    /// The reference a request names, before it is authorized.
    pub(crate) fn requested(&mut self, reference: Option<&CredentialRef>) {
        if let (Some(reference), true) = (reference, self.on) {
            self.tenant.clone_from(&reference.tenant);
            self.provider.clone_from(&reference.provider);
            if !reference.subject.is_empty() {
                self.subject_hash = audit::subject_hash(&reference.subject);
            }
        }
    }

    /// The tenant a request names, before it is authorized.
    pub(crate) fn requested_tenant(&mut self, tenant: &str) {
        if self.on {
            self.tenant = tenant.to_owned();
        }
    }

    /// The authorized caller: its tenant, resolved (an empty requested
    /// tenant names the caller's only one). The credential was recorded as
    /// requested; authorizing does not change it.
    pub(crate) fn authorized(&mut self, caller: &Caller) {
        if self.on {
            self.tenant.clone_from(&caller.tenant);
        }
    }
}

/// An identity for a log line, or nothing when the call had none.
struct Who<'a>(Option<&'a Identity>);

impl std::fmt::Display for Who<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            Some(identity) => identity.fmt(f),
            None => Ok(()),
        }
    }
}

/// Runs calls in the frame; one per service.
#[derive(Clone)]
pub struct Calls {
    gate: Arc<Gate>,
    metrics: Arc<Metrics>,
}

impl Calls {
    pub fn new(gate: Arc<Gate>, metrics: Arc<Metrics>) -> Self {
        Self { gate, metrics }
    }

    /// One RPC: `admit` validates and authorizes the request into a command
    /// (noting what it learns in the audit entry), `run` carries it out.
    /// Every call gets exactly one audit event, refused ones included.
    pub(crate) async fn handle<R, C, T, Fut>(
        &self,
        method: &'static str,
        request: Request<R>,
        admit: impl FnOnce(Principal, R, &mut AuditEntry) -> Result<C, ApiError>,
        run: impl FnOnce(C) -> Fut,
    ) -> Result<Response<T>, Status>
    where
        Fut: Future<Output = Result<T, ApiError>>,
    {
        let mut call = InFlight {
            calls: self,
            method,
            started: Instant::now(),
            deadline: super::admission::frame_began(),
            entry: AuditEntry::new(),
            answered: false,
        };
        let admitted = self
            .gate
            .principal(&request, &mut call.entry)
            .and_then(|principal| {
                let slot = self.gate.slots.enter(&principal.identity)?;
                Ok((
                    slot,
                    admit(principal, request.into_inner(), &mut call.entry)?,
                ))
            });
        let result = match admitted {
            Ok((_slot, command)) => run(command).await,
            Err(error) => Err(error),
        };
        call.finish(result)
    }

    /// Records one call's outcome: its metrics and its audit event.
    fn record(&self, method: &'static str, entry: &AuditEntry, started: Instant, reason: &str) {
        let elapsed = started.elapsed().as_secs_f64();
        self.metrics.call(method, reason, elapsed);
        audit_line(method, entry, elapsed, reason);
    }
}

/// Records a call whose time ran out before its frame began: its request
/// was still arriving (a client trickling its body), so nothing but the
/// connection is known of it. Its identity is the connection's on mTLS; a
/// mesh caller's forwarded identity is in headers that only the frame
/// authenticates, so it is left out rather than believed.
pub(crate) fn record_unframed(
    metrics: &Metrics,
    path: &str,
    peer: Option<&Peer>,
    started: Instant,
) {
    // The path is one the router matched (an unknown one is answered at
    // once and never runs out of time), so these labels are the methods';
    // the check bounds them should that ever change.
    let method = path
        .rsplit('/')
        .next()
        .filter(|m| !m.is_empty() && m.len() <= 64 && m.bytes().all(|b| b.is_ascii_alphanumeric()))
        .unwrap_or("unknown");
    let reason = super::status::reason::CALL_TIMED_OUT;
    let mut entry = AuditEntry::new();
    if let Some(identity) = peer.and_then(Peer::connection_identity) {
        entry.identified(identity);
    }
    let elapsed = started.elapsed().as_secs_f64();
    metrics.call_failed(method, reason, elapsed);
    audit_line(method, &entry, elapsed, reason);
}

/// The audit event of one call.
fn audit_line(method: &str, entry: &AuditEntry, elapsed: f64, reason: &str) {
    tracing::info!(
        target: audit::TARGET,
        method,
        identity = %Who(entry.identity.as_ref()),
        tenant = entry.tenant.as_str(),
        provider = entry.provider.as_str(),
        subject = entry.subject_hash.as_str(),
        reason,
        latency_ms = elapsed * 1e3,
        "call"
    );
}

/// The audit reason of a call whose client hung up before it was answered.
/// Never sent: nobody is listening.
const CANCELLED: &str = "CANCELLED";

/// A call in the frame, until it is answered. A call can also end without
/// an answer: its client hangs up, or the admission layer's time limit runs
/// out, and either way the handler is dropped where it stands. It is still
/// recorded then, on drop, so every call gets exactly one audit event.
struct InFlight<'a> {
    calls: &'a Calls,
    method: &'static str,
    started: Instant,
    deadline: Option<Instant>,
    entry: AuditEntry,
    answered: bool,
}

impl InFlight<'_> {
    /// Records the answer (metrics, the audit event, a log line for a
    /// failure) and maps it to the wire.
    fn finish<T>(mut self, result: Result<T, ApiError>) -> Result<Response<T>, Status> {
        self.answered = true;
        let wire = result.as_ref().err().map(ApiError::wire);
        let reason = wire.as_ref().map_or("OK", |w| w.reason);
        self.calls
            .record(self.method, &self.entry, self.started, reason);
        match (result, wire) {
            (Ok(response), _) => Ok(Response::new(response)),
            (Err(_), Some(wire)) => {
                tracing::debug!(
                    method = self.method,
                    identity = %Who(self.entry.identity.as_ref()),
                    tenant = self.entry.tenant.as_str(),
                    reason,
                    detail = %wire.detail,
                    "call failed"
                );
                Err(wire.into_status())
            }
            (Err(error), None) => Err(error.wire().into_status()),
        }
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        if self.answered {
            return;
        }
        let timed_out = self.deadline.is_some_and(|at| Instant::now() >= at);
        let reason = if timed_out {
            super::status::reason::CALL_TIMED_OUT
        } else {
            CANCELLED
        };
        self.calls
            .record(self.method, &self.entry, self.started, reason);
    }
}
