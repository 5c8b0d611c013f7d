//! The frame every RPC runs in: authenticate the request, admit it (validate
//! and authorize), run it, then record the outcome (metrics, the audit
//! event, a log line) and map it to the wire. Handlers supply only the two
//! middle steps.

use std::{future::Future, sync::Arc, time::Instant};

use tonic::{Request, Response, Status};

use super::{admission::IdentityRateLimiter, status::ApiError};
use crate::{
    auth::{self, Authenticator, Caller, Peer, Principal},
    broker::model::CredentialId,
    telemetry::{audit, Metrics},
};

/// What every call passes before its handler runs: authentication, then the
/// per-identity rate limit, then the bearer token's claims.
pub struct Gate {
    pub auth: Arc<Authenticator>,
    pub limiter: IdentityRateLimiter,
}

impl Gate {
    /// The principal behind a request, from its connection's identity.
    pub(crate) fn principal<T>(&self, request: &Request<T>) -> Result<Principal, ApiError> {
        let header = |name: &str| {
            request
                .metadata()
                .get(name)
                .map(|v| v.to_str().map_err(|_| ()))
        };
        let identity = self.auth.request_identity(
            request.extensions().get::<Peer>(),
            header("x-forwarded-client-cert"),
        )?;
        self.limiter.check(&identity)?;
        let bearer = auth::bearer(header("authorization"))?;
        Ok(self.auth.principal(identity, bearer)?)
    }
}

/// Who made a call and about which credential, for the audit event.
pub(crate) struct AuditEntry {
    caller: Caller,
    provider: String,
    subject_hash: String,
}

impl AuditEntry {
    pub(crate) fn new(caller: Caller, id: Option<&CredentialId>) -> Self {
        Self {
            caller,
            provider: id.map(|id| id.provider.clone()).unwrap_or_default(),
            subject_hash: id
                .map(|id| audit::subject_hash(&id.subject))
                .unwrap_or_default(),
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
    /// and its audit entry, `run` carries the command out.
    pub(crate) async fn handle<R, C, T, Fut>(
        &self,
        method: &'static str,
        request: Request<R>,
        admit: impl FnOnce(Principal, R) -> Result<(AuditEntry, C), ApiError>,
        run: impl FnOnce(C) -> Fut,
    ) -> Result<Response<T>, Status>
    where
        Fut: Future<Output = Result<T, ApiError>>,
    {
        let started = Instant::now();
        let admitted = self
            .gate
            .principal(&request)
            .and_then(|principal| admit(principal, request.into_inner()));
        let (entry, result) = match admitted {
            Ok((entry, command)) => (Some(entry), run(command).await),
            Err(error) => (None, Err(error)),
        };
        self.finish(method, entry.as_ref(), started, result)
    }

    /// Records the outcome of one call: metrics, the audit event, a log line.
    fn finish<T>(
        &self,
        method: &'static str,
        entry: Option<&AuditEntry>,
        started: Instant,
        result: Result<T, ApiError>,
    ) -> Result<Response<T>, Status> {
        let elapsed = started.elapsed().as_secs_f64();
        let identity = entry
            .map(|e| e.caller.identity.to_string())
            .unwrap_or_default();
        let tenant = entry.map(|e| e.caller.tenant.as_str()).unwrap_or_default();
        let provider = entry.map(|e| e.provider.as_str()).unwrap_or_default();
        let subject = entry.map(|e| e.subject_hash.as_str()).unwrap_or_default();
        let wire = result.as_ref().err().map(ApiError::wire);
        let reason = wire.as_ref().map_or("OK", |w| w.reason);
        self.metrics.call(method, reason, elapsed);
        tracing::info!(
            target: audit::TARGET,
            method,
            %identity,
            tenant,
            provider,
            subject,
            reason,
            latency_ms = elapsed * 1e3,
            "call"
        );
        match (result, wire) {
            (Ok(response), _) => Ok(Response::new(response)),
            (Err(_), Some(wire)) => {
                let detail = &wire.detail;
                tracing::debug!(method, %identity, tenant, reason, %detail, "call failed");
                Err(wire.into_status())
            }
            (Err(error), None) => Err(error.wire().into_status()),
        }
    }
}
