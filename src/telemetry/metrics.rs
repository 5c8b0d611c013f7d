//! The vault's Prometheus metrics, served by the ops listener on `/metrics`.
//!
//! Low cardinality by design: no subject or tenant labels. Provider names are
//! chosen by callers, so only the first [`MAX_PROVIDER_LABELS`] distinct ones
//! get their own label; the rest are counted as `other`.

use std::{
    collections::HashSet,
    sync::{atomic::AtomicU64, Mutex},
};

use prometheus_client::{
    encoding::{text::encode, EncodeLabelSet},
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
    registry::Registry,
};

/// Distinct provider labels before new ones fold into `other`.
pub const MAX_PROVIDER_LABELS: usize = 64;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CallLabels {
    pub method: String,
    /// `OK` or the ErrorInfo reason.
    pub reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct MethodLabels {
    pub method: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CacheLabels {
    /// `hit` or `miss`.
    pub result: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RefreshLabels {
    pub provider: String,
    /// `ok`, `reauth`, `rejected_client`, `unavailable`, `superseded`.
    pub outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ProviderLabels {
    pub provider: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CauseLabels {
    pub cause: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KeyVersionLabels {
    pub key_version: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct WebhookLabels {
    /// The sink's configured name (operators choose it: bounded).
    pub webhook: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DeliveryLabels {
    pub webhook: String,
    /// `delivered` or `failed` (one failed attempt; it is retried).
    pub outcome: String,
}

/// Every metric the vault exports.
pub struct Metrics {
    registry: Registry,
    pub calls: Family<CallLabels, Counter>,
    pub call_seconds: Family<MethodLabels, Histogram>,
    pub cache: Family<CacheLabels, Counter>,
    /// Resolved once: a cache hit is the hottest path and should not build
    /// label strings or take the family's lock.
    cache_hits: Counter,
    cache_misses: Counter,
    /// Per method, its OK counter and its latency histogram, resolved on
    /// the method's first call for the same reason. Its keys are the
    /// vault's own method names, so they are hashed with a fixed fast hash:
    /// std's SipHash, made for keys a caller chooses, took about 190
    /// instructions of every call (callgrind, 2026-12-04).
    answered: std::sync::RwLock<
        std::collections::HashMap<&'static str, (Counter, Histogram), foldhash::fast::FixedState>,
    >,
    pub refreshes: Family<RefreshLabels, Counter>,
    /// How long the provider took to answer a refresh (any outcome): what
    /// a refresh costs that the vault does not control.
    refresh_seconds: Family<ProviderLabels, Histogram>,
    /// How long a record write took until the store acknowledged it (for
    /// a durable write, until it was flushed or committed): the other half
    /// of a refresh, and all of a Deposit's storage.
    pub store_write_seconds: Histogram,
    pub coalesced_waiters: Counter,
    pub reauth_transitions: Family<CauseLabels, Counter>,
    pub forced_refreshes_rate_limited: Counter,
    /// Calls answered from a credential's cool-down, without the provider.
    pub refresh_cooldowns: Counter,
    pub credentials_cooling_down: Gauge,
    /// Calls whose `min_valid_for` exceeds what the provider issues.
    pub lifetime_shortfalls: Counter,
    /// Refresh claims of another replica taken over after their bound.
    pub claim_takeovers: Counter,
    pub records: Family<KeyVersionLabels, Gauge>,
    pub store_bytes: Gauge<u64, AtomicU64>,
    pub overloaded: Counter,
    pub webhooks: WebhookMetrics,
    providers: Mutex<HashSet<String>>,
}

/// Webhook delivery, per sink.
pub struct WebhookMetrics {
    /// Delivery attempts by outcome.
    pub deliveries: Family<DeliveryLabels, Counter>,
    /// Age of the oldest event a sink has not delivered yet (0: caught up).
    pub lag_seconds: Family<WebhookLabels, Gauge>,
    /// Times a sink fell behind the retention and lost events.
    pub events_lost: Family<WebhookLabels, Counter>,
}

impl WebhookMetrics {
    fn register(r: &mut Registry) -> Self {
        Self {
            deliveries: register(
                r,
                "webhook_deliveries",
                "webhook delivery attempts by sink and outcome",
            ),
            lag_seconds: register(
                r,
                "webhook_lag_seconds",
                "age of the oldest event a webhook has not delivered yet",
            ),
            events_lost: register(
                r,
                "webhook_events_lost",
                "times a webhook fell behind the event retention and lost events",
            ),
        }
    }
}

/// The latency histograms, registered together.
struct Latencies {
    call_seconds: Family<MethodLabels, Histogram>,
    refresh_seconds: Family<ProviderLabels, Histogram>,
    store_write_seconds: Histogram,
}

impl Latencies {
    fn register(r: &mut Registry) -> Self {
        use prometheus_client::metrics::histogram::exponential_buckets;
        let call_seconds = Family::<MethodLabels, Histogram>::new_with_constructor(|| {
            // 100 µs .. ~26 s: cache hits sit at the bottom, upstream round
            // trips in the middle, timeouts at the top.
            Histogram::new(exponential_buckets(0.0001, 2.0, 19))
        });
        r.register(
            "rpc_duration_seconds",
            "gRPC call latency",
            call_seconds.clone(),
        );
        let refresh_seconds = Family::<ProviderLabels, Histogram>::new_with_constructor(|| {
            // 1 ms .. ~33 s.
            Histogram::new(exponential_buckets(0.001, 2.0, 16))
        });
        r.register(
            "refresh_duration_seconds",
            "time the provider took to answer one refresh request, by provider",
            refresh_seconds.clone(),
        );
        // 50 µs (a group-committed sled write) .. ~6.5 s (an etcd election).
        let store_write_seconds = Histogram::new(exponential_buckets(0.00005, 2.0, 18));
        r.register(
            "store_write_duration_seconds",
            "time one record write took until the store acknowledged it (durable writes: until flushed)",
            store_write_seconds.clone(),
        );
        Self {
            call_seconds,
            refresh_seconds,
            store_write_seconds,
        }
    }
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("credvault");
        let r = &mut registry;
        let calls = register(r, "rpc_calls", "gRPC calls by method and outcome reason");
        let cache: Family<CacheLabels, Counter> =
            register(r, "token_cache", "access token cache lookups");
        let resolve = |result: &str| {
            cache
                .get_or_create(&CacheLabels {
                    result: result.to_owned(),
                })
                .clone()
        };
        let (cache_hits, cache_misses) = (resolve("hit"), resolve("miss"));
        let Latencies {
            call_seconds,
            refresh_seconds,
            store_write_seconds,
        } = Latencies::register(r);
        Self {
            calls,
            call_seconds,
            cache_hits,
            cache_misses,
            answered: Default::default(),
            refreshes: register(r, "refreshes", "upstream refreshes by provider and outcome"),
            refresh_seconds,
            store_write_seconds,
            coalesced_waiters: register(
                r,
                "refresh_coalesced_waiters",
                "callers that joined a refresh already in flight",
            ),
            reauth_transitions: register(
                r,
                "reauth_transitions",
                "grants newly marked REAUTH_REQUIRED",
            ),
            forced_refreshes_rate_limited: register(
                r,
                "forced_refreshes_rate_limited",
                "force_refresh calls answered with a recent refresh",
            ),
            refresh_cooldowns: register(
                r,
                "refresh_cooldowns",
                "token requests answered from a failing credential's cool-down",
            ),
            credentials_cooling_down: register(
                r,
                "credentials_cooling_down",
                "credentials whose refreshes are paused after transient failures",
            ),
            lifetime_shortfalls: register(
                r,
                "token_lifetime_shortfalls",
                "calls asking a longer min_valid_for than the provider's token lifetime",
            ),
            claim_takeovers: register(
                r,
                "refresh_claim_takeovers",
                "refresh claims of another replica taken over after their bound",
            ),
            records: register(r, "records", "stored records by key version"),
            store_bytes: register(r, "store_size_bytes", "size of the store on disk"),
            overloaded: register(
                r,
                "overloaded",
                "calls shed because the vault was at capacity",
            ),
            webhooks: WebhookMetrics::register(r),
            cache,
            providers: Mutex::new(HashSet::new()),
            registry,
        }
    }
}

/// Registers a fresh metric under `name` and returns a handle to it.
fn register<M>(registry: &mut Registry, name: &str, help: &str) -> M
where
    M: prometheus_client::registry::Metric + Clone + Default,
{
    let metric = M::default();
    registry.register(name, help, metric.clone());
    metric
}

impl Metrics {
    /// The Prometheus text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = encode(&mut out, &self.registry);
        out
    }

    pub fn call(&self, method: &'static str, reason: &str, seconds: f64) {
        if reason == "OK" {
            if let Some((ok, latency)) = self
                .answered
                .read()
                .unwrap_or_else(|e| e.into_inner())
                .get(method)
            {
                ok.inc();
                latency.observe(seconds);
                return;
            }
            let (ok, latency) = self.answered(method);
            ok.inc();
            latency.observe(seconds);
            return;
        }
        self.call_failed(method, reason, seconds);
    }

    /// One call that was not answered OK: `reason` is its error's, or what
    /// ended it unanswered.
    pub fn call_failed(&self, method: &str, reason: &str, seconds: f64) {
        self.calls
            .get_or_create(&CallLabels {
                method: method.to_owned(),
                reason: reason.to_owned(),
            })
            .inc();
        self.call_seconds
            .get_or_create(&MethodLabels {
                method: method.to_owned(),
            })
            .observe(seconds);
    }

    /// Resolves `method`'s OK counter and latency histogram.
    fn answered(&self, method: &'static str) -> (Counter, Histogram) {
        let handles = (
            self.calls
                .get_or_create(&CallLabels {
                    method: method.to_owned(),
                    reason: "OK".to_owned(),
                })
                .clone(),
            self.call_seconds
                .get_or_create(&MethodLabels {
                    method: method.to_owned(),
                })
                .clone(),
        );
        self.answered
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(method, handles.clone());
        handles
    }

    pub fn cache(&self, hit: bool) {
        if hit {
            self.cache_hits.inc();
        } else {
            self.cache_misses.inc();
        }
    }

    /// One upstream refresh request, its outcome and how long the provider
    /// took to answer it.
    pub fn refresh(&self, provider: &str, outcome: &str, seconds: f64) {
        let provider = self.provider_label(provider);
        self.refresh_seconds
            .get_or_create(&ProviderLabels {
                provider: provider.clone(),
            })
            .observe(seconds);
        self.refreshes
            .get_or_create(&RefreshLabels {
                provider,
                outcome: outcome.to_owned(),
            })
            .inc();
    }

    pub fn reauth(&self, cause: &str) {
        self.reauth_transitions
            .get_or_create(&CauseLabels {
                cause: cause.to_owned(),
            })
            .inc();
    }

    /// Replaces the per-version record gauges.
    pub fn set_records(&self, counts: &[(u32, u64)]) {
        self.records.clear();
        for (version, count) in counts {
            self.records
                .get_or_create(&KeyVersionLabels {
                    key_version: version.to_string(),
                })
                .set(i64::try_from(*count).unwrap_or(i64::MAX));
        }
    }

    fn provider_label(&self, provider: &str) -> String {
        let mut seen = self.providers.lock().unwrap_or_else(|e| e.into_inner());
        if seen.contains(provider) {
            return provider.to_owned();
        }
        if seen.len() < MAX_PROVIDER_LABELS {
            seen.insert(provider.to_owned());
            return provider.to_owned();
        }
        "other".to_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn providers_beyond_the_cap_fold_into_other() {
        let metrics = Metrics::default();
        for i in 0..MAX_PROVIDER_LABELS + 10 {
            metrics.refresh(&format!("p{i}"), "ok", 0.02);
        }
        let text = metrics.encode();
        assert!(text.contains("provider=\"p0\""));
        assert!(text.contains("provider=\"other\""));
        assert!(!text.contains(&format!("provider=\"p{}\"", MAX_PROVIDER_LABELS + 5)));
    }
}
