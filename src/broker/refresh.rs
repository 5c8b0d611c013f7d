//! Serving a token: from the cache while it is valid, else through one
//! refresh flight per credential, whose outcome every waiter shares.
//!
//! A flight reads the record, serves its stored token if that is good
//! enough, else asks the provider and writes the issued tokens back onto the
//! grant they came from. A provider's `invalid_grant` is believed only after
//! a re-read shows nobody rotated the grant meanwhile (DESIGN §5b).

use std::{
    sync::Arc,
    time::{Duration, Instant, SystemTime},
};

use tokio::sync::broadcast::error::RecvError;

use super::{
    events::{EventType, Noted},
    model::{
        AccessToken, CredentialId, CredentialRecord, CredentialState, ReauthCause, TokenRequest,
    },
    reauth, upstream_error,
    write::{How, Known, Step},
    Broker, BrokerError,
};
use crate::{
    store::{Change, ClaimOutcome, ClaimToken, Versioned},
    upstream::{IssuedTokens, UpstreamError},
};

/// Flights a caller may take part in before giving up: one that joined a
/// flight started for a weaker requirement runs one of its own.
const FLIGHTS_PER_CALL: usize = 2;
/// Reads of the record one flight may make: a Deposit that replaced the
/// grant meanwhile, and one retry after a benign rotation race.
const ROUNDS_PER_FLIGHT: usize = 4;

/// The outcome of one refresh flight, shared by all its waiters.
#[derive(Clone, Debug)]
pub(super) struct FlightOutcome {
    token: AccessToken,
    /// Issued by the provider during this flight (not read from storage).
    fresh: bool,
    /// Issued within `force_refresh_interval`: good enough for a forced call.
    recent: bool,
}

pub(super) type FlightResult = Result<FlightOutcome, BrokerError>;

/// What one round of a flight came to, when it did not fail.
enum Round {
    Served(FlightOutcome),
    /// The record changed under us; read it again.
    Again,
}

/// What asking for the refresh claim came to.
enum Claimed {
    /// This process may call the provider (fenced by the claim, if any).
    Mine(Option<ClaimToken>),
    /// The record changed meanwhile; read it again.
    Moved,
}

/// Where a write-back landed.
enum WriteBack {
    Stored(AccessToken),
    /// A Deposit replaced the grant meanwhile.
    Superseded,
}

impl Broker {
    /// An access token valid for at least `max(skew, min_valid_for)`.
    pub async fn get_access_token(
        self: &Arc<Self>,
        request: TokenRequest,
    ) -> Result<AccessToken, BrokerError> {
        let margin = request
            .min_valid_for
            .unwrap_or(self.settings.refresh_skew)
            .max(self.settings.refresh_skew);
        // A replica that cannot confirm its view is fresh reads through.
        if !request.force_refresh && self.store.fresh() {
            let cached = self.cache.get(&request.id, margin, SystemTime::now());
            self.metrics.cache(cached.is_some());
            if let Some(token) = cached {
                return Ok(token);
            }
        }
        for _ in 0..FLIGHTS_PER_CALL {
            let broker = Arc::clone(self);
            let id = request.id.clone();
            let force = request.force_refresh;
            let (outcome, joined) = self
                .flights
                .run(
                    request.id.clone(),
                    move || async move { broker.refresh_flow(id, margin, force).await },
                    Err(BrokerError::Internal("refresh task failed")),
                )
                .await;
            if joined {
                self.metrics.coalesced_waiters.inc();
            }
            let outcome = outcome?;
            let acceptable = if request.force_refresh {
                outcome.recent
            } else {
                outcome.fresh || outcome.token.valid_for(margin, SystemTime::now())
            };
            if acceptable {
                return Ok(outcome.token);
            }
        }
        Err(BrokerError::Internal("could not satisfy the token request"))
    }

    /// The body of one refresh flight (runs detached from its callers).
    async fn refresh_flow(
        self: Arc<Self>,
        id: CredentialId,
        margin: Duration,
        force: bool,
    ) -> FlightResult {
        let mut rotation_retry_used = false;
        for _ in 0..ROUNDS_PER_FLIGHT {
            match self
                .refresh_round(&id, margin, force, &mut rotation_retry_used)
                .await?
            {
                Round::Served(outcome) => return Ok(outcome),
                Round::Again => continue,
            }
        }
        Err(BrokerError::Contention)
    }

    async fn refresh_round(
        &self,
        id: &CredentialId,
        margin: Duration,
        force: bool,
        rotation_retry_used: &mut bool,
    ) -> Result<Round, BrokerError> {
        let (versioned, record) = self.load(id).await?;
        if let CredentialState::ReauthRequired(cause) = record.state {
            return Err(reauth(cause, id));
        }
        if let Some(outcome) = self
            .stored_outcome(id, &versioned, &record, margin, force)
            .await
        {
            return Ok(Round::Served(outcome));
        }
        if let Some((streak, left)) = self.limits.cooling_down(id, SystemTime::now()) {
            self.metrics.refresh_cooldowns.inc();
            return Err(BrokerError::UpstreamUnavailable {
                reason: format!(
                    "refresh cooling down after {} transient failures in a row",
                    streak.failures
                ),
                retry_after: Some(left.max(Duration::from_secs(1))),
            });
        }
        let fence = match self.claim_refresh(id, &versioned).await? {
            Claimed::Mine(fence) => fence,
            // Another replica refreshed (or the record moved): read again.
            Claimed::Moved => return Ok(Round::Again),
        };
        let round = self
            .refresh_claimed(id, &versioned, &record, fence.as_ref(), rotation_retry_used)
            .await;
        if let Some(fence) = &fence {
            // A no-op after a fenced write-back, which released it already.
            let _ = self.store.release(&id.store_key(), fence).await;
        }
        round
    }

    /// The provider call and write-back of one round, under its claim.
    async fn refresh_claimed(
        &self,
        id: &CredentialId,
        versioned: &Versioned,
        record: &CredentialRecord,
        fence: Option<&ClaimToken>,
        rotation_retry_used: &mut bool,
    ) -> Result<Round, BrokerError> {
        match self.call_provider(id, record).await? {
            Ok(tokens) => Ok(
                match self
                    .write_back_or_revoke(id, versioned, record, tokens, fence)
                    .await?
                {
                    WriteBack::Stored(token) => Round::Served(FlightOutcome {
                        token,
                        fresh: true,
                        recent: true,
                    }),
                    WriteBack::Superseded => Round::Again,
                },
            ),
            Err(UpstreamError::GrantRejected { oauth_error }) => {
                let cause = ReauthCause::of_rejected_grant(&oauth_error);
                self.on_rejected_grant(id, record, cause, rotation_retry_used)
                    .await
            }
            Err(error) => {
                if matches!(error, UpstreamError::Unavailable { .. }) {
                    self.note_failing(id, versioned, record).await;
                }
                Err(upstream_error(error, id))
            }
        }
    }

    /// Keeps the durable failing streak of a credential whose refresh just
    /// failed transiently: its start on the first failure, and
    /// REFRESH_FAILING once it has lasted `failing_after`. Best effort: a
    /// record that moved meanwhile is left alone (the next failure notes it).
    async fn note_failing(&self, id: &CredentialId, read: &Versioned, record: &CredentialRecord) {
        let now = SystemTime::now();
        let mut next = record.clone();
        let noted = match record.failing_since {
            None => {
                next.failing_since = Some(now);
                None
            }
            Some(since)
                if !record.failing_reported
                    && now.duration_since(since).unwrap_or_default()
                        >= self.settings.events.failing_after =>
            {
                next.failing_reported = true;
                Some(Noted::of(
                    EventType::RefreshFailing,
                    &next,
                    "upstream_unavailable",
                ))
            }
            Some(_) => return,
        };
        let mut next = Some((next, noted));
        let how = How {
            known: Known::Value(read),
            ..How::DURABLE
        };
        let wrote = self
            .write(id, how, |current| {
                Ok(match (current, next.take()) {
                    (Some(current), Some((next, noted))) if current.revision == read.revision => {
                        Step::Put(Box::new(next), noted, ())
                    }
                    _ => Step::Leave(()),
                })
            })
            .await;
        if let Err(error) = wrote {
            tracing::debug!(provider = %id.provider, %error, "could not note a failing refresh");
        }
    }

    /// The right to call the provider for this credential, across replicas.
    /// Waits while another replica holds the claim; gives up waiting when
    /// the record or the claim changes; takes the claim over once it has
    /// stood for the store's bound on this process's own clock.
    async fn claim_refresh(
        &self,
        id: &CredentialId,
        read: &Versioned,
    ) -> Result<Claimed, BrokerError> {
        let key = id.store_key();
        // Subscribe before asking, so no release can slip in between.
        let Some(mut changes) = self.store.changes() else {
            return Ok(Claimed::Mine(None));
        };
        let mut outcome = self.store.claim(&key).await?;
        loop {
            let held = match outcome {
                ClaimOutcome::Won(None) => return Ok(Claimed::Mine(None)),
                ClaimOutcome::Won(Some(fence)) => {
                    return self.confirm_claim(&key, read, fence).await
                }
                ClaimOutcome::Held { revision } if revision.0 == 0 => {
                    outcome = self.store.claim(&key).await?;
                    continue;
                }
                ClaimOutcome::Held { revision } => revision,
            };
            let seen = Instant::now();
            outcome = loop {
                let left = self.store.claim_takeover().saturating_sub(seen.elapsed());
                if left.is_zero() {
                    let taken = self.store.take_over(&key, held).await?;
                    if matches!(taken, ClaimOutcome::Won(_)) {
                        self.metrics.claim_takeovers.inc();
                        tracing::warn!(provider = %id.provider, "took over a refresh claim that outlived its bound");
                    }
                    break taken;
                }
                match tokio::time::timeout(left, changes.recv()).await {
                    Err(_elapsed) => continue,
                    Ok(Ok(Change::Record { key: changed, .. })) if changed == key => {
                        return Ok(Claimed::Moved)
                    }
                    Ok(Ok(Change::ClaimReleased { key: released })) if released == key => {
                        break self.store.claim(&key).await?;
                    }
                    Ok(Ok(Change::Reset) | Err(RecvError::Lagged(_))) => return Ok(Claimed::Moved),
                    Ok(Ok(_)) => continue,
                    Ok(Err(RecvError::Closed)) => {
                        return Err(BrokerError::Storage("the store's watch ended".into()))
                    }
                }
            };
        }
    }

    /// A claim won on a record that moved since this flight read it is
    /// given back: the refresh would use a stale refresh token.
    async fn confirm_claim(
        &self,
        key: &crate::store::StoreKey,
        read: &Versioned,
        fence: ClaimToken,
    ) -> Result<Claimed, BrokerError> {
        let now = self.store.get(key).await?;
        if now.as_ref().map(|v| v.revision) == Some(read.revision) {
            return Ok(Claimed::Mine(Some(fence)));
        }
        let _ = self.store.release(key, &fence).await;
        Ok(Claimed::Moved)
    }

    /// The stored token, when it answers this flight without the provider.
    async fn stored_outcome(
        &self,
        id: &CredentialId,
        versioned: &Versioned,
        record: &CredentialRecord,
        margin: Duration,
        force: bool,
    ) -> Option<FlightOutcome> {
        let now = SystemTime::now();
        let recent = record.last_refresh_at.is_some_and(|at| {
            now.duration_since(at)
                .map_or(true, |age| age < self.settings.force_refresh_interval)
        });
        if force && !recent {
            return None;
        }
        let token = record.access_token.as_ref()?;
        if !token.valid_for(margin, now) {
            // A token the provider issued within the forced-refresh interval
            // that still cannot cover `min_valid_for` means the provider's
            // lifetime is shorter than asked: another refresh would return
            // the same, and one per call would burn the provider's quota.
            // The freshest token there is answers instead.
            let freshest = !force && recent && token.valid_for(self.settings.refresh_skew, now);
            if !freshest {
                return None;
            }
            self.metrics.lifetime_shortfalls.inc();
            return Some(FlightOutcome {
                token: token.clone(),
                fresh: true,
                recent,
            });
        }
        if force {
            self.metrics.forced_refreshes_rate_limited.inc();
            tracing::debug!(provider = %id.provider, "forced refresh answered with a recent one");
        }
        self.cache_if_current(id, versioned, token).await;
        Some(FlightOutcome {
            token: token.clone(),
            fresh: false,
            recent,
        })
    }

    /// Asks the provider for new tokens; `Err` when it must not be asked.
    async fn call_provider(
        &self,
        id: &CredentialId,
        record: &CredentialRecord,
    ) -> Result<Result<IssuedTokens, UpstreamError>, BrokerError> {
        // A refresh rotates the grant upstream; if its write-back cannot
        // land, the rotated token is lost and the user must re-consent.
        // With a failing store, fail fast instead.
        if !self.store.healthy() {
            return Err(BrokerError::Storage(
                "the store is failing; refresh not attempted".into(),
            ));
        }
        let client = self.client_for(record)?;
        if record.refresh_token.is_none() && !record.client_credentials {
            return Err(reauth(ReauthCause::NoRefreshToken, id));
        }
        // Detached flights outlive their callers: bound them here, where
        // the upstream work happens.
        let host = client.token_endpoint.host_str().unwrap_or_default();
        let _permit = self
            .limits
            .refresh_permit(&id.tenant, host)
            .ok_or(BrokerError::Overloaded("too many refreshes in flight"))?;
        let sent = Instant::now();
        let issued = match &record.refresh_token {
            Some(refresh_token) => self.upstream.refresh(&client, refresh_token).await,
            None => self.upstream.client_credentials(&client).await,
        };
        let took = sent.elapsed();
        self.note_outcome(id, &issued);
        self.metrics.refresh(
            &id.provider,
            match &issued {
                Ok(_) => "ok",
                Err(UpstreamError::GrantRejected { .. }) => "grant_rejected",
                Err(UpstreamError::ClientRejected { .. }) => "rejected_client",
                Err(UpstreamError::Unavailable { .. }) => "unavailable",
                Err(UpstreamError::EndpointNotAllowed(_)) => "endpoint_not_allowed",
            },
            took.as_secs_f64(),
        );
        Ok(issued)
    }

    /// Keeps the credential's failure streak: transient failures extend it
    /// (and start a cool-down at the threshold), anything else ends it.
    fn note_outcome(&self, id: &CredentialId, issued: &Result<IssuedTokens, UpstreamError>) {
        let now = SystemTime::now();
        match issued {
            Err(UpstreamError::Unavailable { .. }) => {
                let streak = self.limits.failed(id, now);
                if streak.cooling_until.is_some() {
                    tracing::warn!(
                        provider = %id.provider,
                        failures = streak.failures,
                        "refreshes failing; cooling down"
                    );
                }
            }
            _ if self.limits.streak(id).is_some() => self.limits.recovered(id),
            _ => return,
        }
        self.metrics
            .credentials_cooling_down
            .set(i64::try_from(self.limits.cooling_count(now)).unwrap_or(i64::MAX));
    }

    /// A benign race looks exactly like a dead grant: someone rotated the
    /// refresh token after we read it. Re-read, and retry once if the grant
    /// we used is no longer current; else persist the reauth state.
    async fn on_rejected_grant(
        &self,
        id: &CredentialId,
        used: &CredentialRecord,
        cause: ReauthCause,
        rotation_retry_used: &mut bool,
    ) -> Result<Round, BrokerError> {
        let (latest_versioned, latest) = self.load(id).await?;
        let changed =
            latest.generation != used.generation || latest.refresh_token != used.refresh_token;
        if changed && !*rotation_retry_used {
            *rotation_retry_used = true;
            return Ok(Round::Again);
        }
        self.mark_reauth(id, &latest_versioned, latest, cause)
            .await?;
        Err(reauth(cause, id))
    }

    /// [`Broker::write_back`]; if the credential was revoked while the
    /// provider answered, the Revoke revoked the refresh token it found, which
    /// the provider has just replaced: revoke the one it issued now.
    async fn write_back_or_revoke(
        &self,
        id: &CredentialId,
        read: &Versioned,
        used: &CredentialRecord,
        tokens: IssuedTokens,
        fence: Option<&ClaimToken>,
    ) -> Result<WriteBack, BrokerError> {
        let rotated = tokens.refresh_token.clone();
        let result = self.write_back(id, read, used, tokens, fence).await;
        if let (Err(BrokerError::NotFound), Some(rotated)) = (&result, rotated) {
            if let Ok(client) = self.client_for(used) {
                if client.revocation_endpoint.is_some() {
                    match self.upstream.revoke(&client, &rotated).await {
                        Ok(()) => {
                            tracing::info!(provider = %id.provider, "revoked the refresh token issued during a Revoke")
                        }
                        Err(error) => {
                            tracing::warn!(provider = %id.provider, %error, "could not revoke the refresh token issued during a Revoke")
                        }
                    }
                }
            }
        }
        result
    }

    /// Persists freshly issued tokens, but only onto the grant they came
    /// from: same generation, record still present.
    async fn write_back(
        &self,
        id: &CredentialId,
        read: &Versioned,
        used: &CredentialRecord,
        tokens: IssuedTokens,
        fence: Option<&ClaimToken>,
    ) -> Result<WriteBack, BrokerError> {
        // The record as this flight read it is most likely still current:
        // try the write on it, and re-decide only on a conflict.
        let how = How {
            fence,
            known: Known::Value(read),
            ..How::DURABLE
        };
        let wrote = self
            .write(id, how, |current| {
                // Revoked while we were upstream: the new tokens die with it.
                let current = current.ok_or(BrokerError::NotFound)?;
                let mut base = if current.revision == read.revision {
                    used.clone()
                } else {
                    let latest = self.open(id, current)?;
                    if latest.generation != used.generation {
                        return Ok(Step::Leave(WriteBack::Superseded));
                    }
                    // Same grant, rewritten meanwhile (e.g. re-encrypted
                    // under a new key): apply our tokens on top of it.
                    latest
                };
                let now = SystemTime::now();
                base.access_token = Some(tokens.access_token.clone());
                if let Some(rotated) = &tokens.refresh_token {
                    base.refresh_token = Some(rotated.clone());
                }
                base.state = CredentialState::Active;
                base.updated_at = now;
                base.last_refresh_at = Some(now);
                // The first success after REFRESH_FAILING says so.
                let recovered = base.failing_reported;
                base.failing_since = None;
                base.failing_reported = false;
                let noted = recovered.then(|| Noted::of(EventType::Recovered, &base, ""));
                Ok(Step::Put(
                    Box::new(base),
                    noted,
                    WriteBack::Stored(tokens.access_token.clone()),
                ))
            })
            .await?;
        if matches!(wrote.answer, WriteBack::Stored(_)) {
            tracing::info!(
                tenant = %id.tenant,
                provider = %id.provider,
                rotated = tokens.refresh_token.is_some(),
                "access token refreshed"
            );
        }
        Ok(wrote.answer)
    }

    /// Persists REAUTH_REQUIRED onto the record as it was read. If anything
    /// wrote meanwhile (a new Deposit), that write wins and the dead grant
    /// needs no mark.
    async fn mark_reauth(
        &self,
        id: &CredentialId,
        read: &Versioned,
        mut record: CredentialRecord,
        cause: ReauthCause,
    ) -> Result<(), BrokerError> {
        record.state = CredentialState::ReauthRequired(cause);
        record.access_token = None;
        record.updated_at = SystemTime::now();
        record.failing_since = None;
        record.failing_reported = false;
        let noted = Noted::of(EventType::ReauthRequired, &record, cause.as_str());
        let mut record = Some((record, noted));
        let marked = self
            .write(
                id,
                How {
                    known: Known::Value(read),
                    ..How::DURABLE
                },
                |current| {
                    Ok(match (current, record.take()) {
                        (Some(current), Some((record, noted)))
                            if current.revision == read.revision =>
                        {
                            Step::Put(Box::new(record), Some(noted), true)
                        }
                        _ => Step::Leave(false),
                    })
                },
            )
            .await?
            .answer;
        if marked {
            self.metrics.reauth(cause.as_str());
        }
        tracing::warn!(
            tenant = %id.tenant,
            provider = %id.provider,
            cause = cause.as_str(),
            "grant is dead; reauthorization required"
        );
        Ok(())
    }
}
