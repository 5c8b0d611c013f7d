//! The bounds the lifecycle keeps on work nobody is waiting for, and on
//! state nobody bounds otherwise:
//!
//! - refreshes in flight, overall, per token-endpoint host and per tenant:
//!   a refresh flight runs detached from its callers (so a rotated token is
//!   never lost), which means a caller that hangs up no longer holds anything
//!   that the server's call limits count;
//! - a per-credential cool-down after consecutive transient failures, so a
//!   provider that is down is asked again at a bounded rate, not on every
//!   call;
//! - per-tenant record counts, for the record quota.
//!
//! All of it is in memory and per process: it bounds this replica's load.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::{Duration, SystemTime},
};

use super::model::CredentialId;

/// The limits, from the settings.
#[derive(Clone, Debug)]
pub struct LimitSettings {
    /// Upstream refreshes in flight in this process.
    pub refreshes_in_flight: usize,
    /// … towards one token-endpoint host.
    pub refreshes_per_host: usize,
    /// … for one tenant's credentials.
    pub refreshes_per_tenant: usize,
    /// Transient failures in a row before a credential cools down.
    pub backoff_after: u32,
    /// The first cool-down; it doubles with every further failure.
    pub backoff_base: Duration,
    pub backoff_max: Duration,
    /// Records one tenant may hold; 0 = no quota.
    pub records_per_tenant: u64,
}

impl Default for LimitSettings {
    fn default() -> Self {
        Self {
            refreshes_in_flight: 256,
            refreshes_per_host: 64,
            refreshes_per_tenant: 64,
            backoff_after: 3,
            backoff_base: Duration::from_secs(5),
            backoff_max: Duration::from_secs(300),
            records_per_tenant: 0,
        }
    }
}

/// How many failing credentials are remembered; beyond it, the streaks of
/// credentials not cooling down are forgotten first.
const MAX_STREAKS: usize = 100_000;

#[derive(Default)]
struct InFlight {
    total: usize,
    hosts: HashMap<String, usize>,
    tenants: HashMap<String, usize>,
}

/// A credential's run of transient refresh failures.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Streak {
    pub failures: u32,
    /// No refresh is attempted before this time.
    pub cooling_until: Option<SystemTime>,
}

/// The lifecycle's limits and the state they need.
pub struct Limits {
    settings: LimitSettings,
    in_flight: Arc<Mutex<InFlight>>,
    streaks: Mutex<HashMap<CredentialId, Streak>>,
    tenant_records: Mutex<HashMap<String, u64>>,
}

/// Held while one upstream refresh runs; gives its place back on drop.
pub struct RefreshPermit {
    in_flight: Arc<Mutex<InFlight>>,
    host: String,
    tenant: String,
}

impl Drop for RefreshPermit {
    fn drop(&mut self) {
        let mut in_flight = self.in_flight.lock().unwrap_or_else(|e| e.into_inner());
        in_flight.total = in_flight.total.saturating_sub(1);
        release(&mut in_flight.hosts, &self.host);
        release(&mut in_flight.tenants, &self.tenant);
    }
}

fn release(counts: &mut HashMap<String, usize>, key: &str) {
    if let Some(count) = counts.get_mut(key) {
        *count = count.saturating_sub(1);
        if *count == 0 {
            counts.remove(key);
        }
    }
}

impl Limits {
    pub fn new(settings: LimitSettings) -> Self {
        Self {
            settings,
            in_flight: Arc::default(),
            streaks: Mutex::default(),
            tenant_records: Mutex::default(),
        }
    }

    /// A place for one upstream refresh, or `None` when a bound is reached.
    pub fn refresh_permit(&self, tenant: &str, host: &str) -> Option<RefreshPermit> {
        let s = &self.settings;
        let mut in_flight = self.in_flight.lock().unwrap_or_else(|e| e.into_inner());
        let per_host = in_flight.hosts.get(host).copied().unwrap_or(0);
        let per_tenant = in_flight.tenants.get(tenant).copied().unwrap_or(0);
        if in_flight.total >= s.refreshes_in_flight
            || per_host >= s.refreshes_per_host
            || per_tenant >= s.refreshes_per_tenant
        {
            return None;
        }
        in_flight.total += 1;
        *in_flight.hosts.entry(host.to_owned()).or_default() += 1;
        *in_flight.tenants.entry(tenant.to_owned()).or_default() += 1;
        Some(RefreshPermit {
            in_flight: Arc::clone(&self.in_flight),
            host: host.to_owned(),
            tenant: tenant.to_owned(),
        })
    }

    /// Refreshes upstream right now.
    #[cfg(test)]
    fn refreshes_in_flight(&self) -> usize {
        self.in_flight
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .total
    }

    /// The credential's failure streak, if it has one.
    pub fn streak(&self, id: &CredentialId) -> Option<Streak> {
        self.streaks
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(id)
            .copied()
    }

    /// How long the credential still cools down, if it does.
    pub fn cooling_down(&self, id: &CredentialId, now: SystemTime) -> Option<(Streak, Duration)> {
        let streak = self.streak(id)?;
        let left = streak.cooling_until?.duration_since(now).ok()?;
        Some((streak, left))
    }

    /// Records a transient failure; returns the streak after it.
    pub fn failed(&self, id: &CredentialId, now: SystemTime) -> Streak {
        let s = &self.settings;
        let mut streaks = self.streaks.lock().unwrap_or_else(|e| e.into_inner());
        if streaks.len() >= MAX_STREAKS && !streaks.contains_key(id) {
            streaks.retain(|_, streak| streak.cooling_until.is_some_and(|until| until > now));
        }
        let streak = streaks.entry(id.clone()).or_insert(Streak {
            failures: 0,
            cooling_until: None,
        });
        streak.failures = streak.failures.saturating_add(1);
        if streak.failures >= s.backoff_after.max(1) {
            let doublings = (streak.failures - s.backoff_after.max(1)).min(16);
            let delay = s
                .backoff_base
                .saturating_mul(1 << doublings)
                .min(s.backoff_max);
            streak.cooling_until = Some(now + delay);
        }
        *streak
    }

    /// The credential works (or was replaced): its streak ends.
    pub fn recovered(&self, id: &CredentialId) {
        self.streaks
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(id);
    }

    /// Credentials cooling down now, for the gauge.
    pub fn cooling_count(&self, now: SystemTime) -> usize {
        self.streaks
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .filter(|s| s.cooling_until.is_some_and(|until| until > now))
            .count()
    }

    /// The record quota per tenant, if there is one.
    pub fn record_quota(&self) -> Option<u64> {
        (self.settings.records_per_tenant > 0).then_some(self.settings.records_per_tenant)
    }

    /// The tenant's record count, if known.
    pub fn tenant_records(&self, tenant: &str) -> Option<u64> {
        self.tenant_records
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(tenant)
            .copied()
    }

    /// Sets, or moves by `delta`, a tenant's record count.
    pub fn count_records(&self, tenant: &str, set: Option<u64>, delta: i64) {
        let mut counts = self
            .tenant_records
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if let Some(count) = set {
            counts.insert(tenant.to_owned(), count);
        } else if let Some(count) = counts.get_mut(tenant) {
            *count = count.saturating_add_signed(delta);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(subject: &str) -> CredentialId {
        CredentialId {
            tenant: "t".into(),
            subject: subject.into(),
            provider: "p".into(),
        }
    }

    #[test]
    fn refresh_permits_are_bounded_per_host_tenant_and_overall() {
        let limits = Limits::new(LimitSettings {
            refreshes_in_flight: 3,
            refreshes_per_host: 2,
            refreshes_per_tenant: 2,
            ..Default::default()
        });
        let a = limits.refresh_permit("t1", "h1").unwrap();
        let _b = limits.refresh_permit("t1", "h2").unwrap();
        assert!(limits.refresh_permit("t1", "h3").is_none(), "tenant bound");
        let _c = limits.refresh_permit("t2", "h1").unwrap();
        assert!(limits.refresh_permit("t3", "h3").is_none(), "global bound");
        drop(a);
        assert!(limits.refresh_permit("t2", "h1").is_some(), "freed by drop");
        assert_eq!(limits.refreshes_in_flight(), 2, "b and c");
    }

    #[test]
    fn cool_down_starts_at_the_threshold_and_doubles_to_a_ceiling() {
        let limits = Limits::new(LimitSettings {
            backoff_after: 2,
            backoff_base: Duration::from_secs(10),
            backoff_max: Duration::from_secs(25),
            ..Default::default()
        });
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1000);
        assert_eq!(limits.failed(&id("a"), now).cooling_until, None);
        let second = limits.failed(&id("a"), now);
        assert_eq!(second.cooling_until, Some(now + Duration::from_secs(10)));
        let third = limits.failed(&id("a"), now);
        assert_eq!(third.cooling_until, Some(now + Duration::from_secs(20)));
        let fourth = limits.failed(&id("a"), now);
        assert_eq!(fourth.cooling_until, Some(now + Duration::from_secs(25)));
        assert!(limits.cooling_down(&id("a"), now).is_some());
        assert_eq!(limits.cooling_count(now), 1);
        limits.recovered(&id("a"));
        assert!(limits.cooling_down(&id("a"), now).is_none());
    }
}
