//! Load generation and latency statistics.
//!
//! Latencies are kept as raw nanosecond samples and sorted once; percentiles
//! use the nearest-rank method. A few million samples per run is well within
//! memory, so no histogram approximation is needed.

use std::{
    future::Future,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use tokio::task::JoinSet;

use crate::support::vault::{histogram_mean, metric_sum};

/// The outcome of one measured run: successful requests and their latencies.
#[derive(Clone, Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct Sample {
    /// Latencies of successful requests, in nanoseconds, sorted.
    pub lat_ns: Vec<u64>,
    /// Wall time of the measurement window.
    pub secs: f64,
    pub errors: usize,
    pub first_error: Option<String>,
}

impl Sample {
    pub fn from_latencies(mut lat_ns: Vec<u64>, secs: f64) -> Self {
        lat_ns.sort_unstable();
        Self {
            lat_ns,
            secs,
            errors: 0,
            first_error: None,
        }
    }

    /// Pools several runs of the same experiment (e.g. interleaved rounds).
    pub fn merge(parts: impl IntoIterator<Item = Sample>) -> Self {
        let mut out = Sample::default();
        for part in parts {
            out.lat_ns.extend(part.lat_ns);
            out.secs += part.secs;
            out.errors += part.errors;
            if out.first_error.is_none() {
                out.first_error = part.first_error;
            }
        }
        out.lat_ns.sort_unstable();
        out
    }

    /// Requests attempted in the window: answered or failed.
    pub fn attempted(&self) -> usize {
        self.count() + self.errors
    }

    /// A short description of the failures, for tables.
    pub fn failure_note(&self) -> String {
        match &self.first_error {
            None => String::new(),
            Some(first) => format!("{} failed/stalled (first: {first})", self.errors),
        }
    }

    pub fn count(&self) -> usize {
        self.lat_ns.len()
    }

    /// Successful requests per second over the window.
    pub fn rps(&self) -> f64 {
        if self.secs > 0.0 {
            self.count() as f64 / self.secs
        } else {
            0.0
        }
    }

    /// Nearest-rank percentile, `q` in 0..=100.
    pub fn pct(&self, q: f64) -> Duration {
        if self.lat_ns.is_empty() {
            return Duration::ZERO;
        }
        let rank = ((q / 100.0) * self.lat_ns.len() as f64).ceil() as usize;
        let index = rank.clamp(1, self.lat_ns.len()) - 1;
        Duration::from_nanos(self.lat_ns[index])
    }

    pub fn mean(&self) -> Duration {
        match self.lat_ns.len() {
            0 => Duration::ZERO,
            n => Duration::from_nanos(self.lat_ns.iter().sum::<u64>() / n as u64),
        }
    }

    pub fn max(&self) -> Duration {
        Duration::from_nanos(self.lat_ns.last().copied().unwrap_or(0))
    }

    /// Fails loudly: figures from a run with errors are not benchmark figures.
    pub fn expect_clean(&self, what: &str) {
        assert!(
            self.errors == 0,
            "{what}: {} request(s) failed; first error: {}",
            self.errors,
            self.first_error.as_deref().unwrap_or("?")
        );
        assert!(self.count() > 0, "{what}: no request completed");
    }

    /// Like [`Sample::expect_clean`], for runs that may legitimately be empty.
    pub fn expect_clean_or_empty(&self, what: &str) {
        if self.errors > 0 || self.count() > 0 {
            self.expect_clean(what);
        }
    }
}

/// Runs `concurrency` workers in a closed loop (each sends its next request
/// as soon as the previous one is answered) for `warmup + measure`, and
/// records the requests started inside the measurement window.
///
/// `op(worker, seq)` performs one request.
pub async fn closed_loop<F, Fut>(
    concurrency: usize,
    warmup: Duration,
    measure: Duration,
    op: F,
) -> Sample
where
    F: Fn(usize, u64) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<(), String>> + Send + 'static,
{
    let op = Arc::new(op);
    let start = Instant::now() + warmup;
    let end = start + measure;
    let mut workers = JoinSet::new();
    for worker in 0..concurrency {
        let op = Arc::clone(&op);
        workers.spawn(async move {
            let mut lat = Vec::with_capacity(4096);
            let (mut errors, mut first_error) = (0usize, None);
            let mut seq = 0u64;
            loop {
                let sent = Instant::now();
                if sent >= end {
                    break;
                }
                let result = op(worker, seq).await;
                seq += 1;
                if sent < start {
                    continue;
                }
                match result {
                    Ok(()) => lat.push(sent.elapsed().as_nanos() as u64),
                    Err(error) => {
                        errors += 1;
                        first_error.get_or_insert(error);
                    }
                }
            }
            (lat, errors, first_error)
        });
    }
    let mut parts = Vec::new();
    while let Some(joined) = workers.join_next().await {
        let (lat, errors, first_error) = joined.expect("load worker panicked");
        parts.push(Sample {
            lat_ns: lat,
            secs: 0.0,
            errors,
            first_error,
        });
    }
    let mut sample = Sample::merge(parts);
    sample.secs = measure.as_secs_f64();
    sample
}

/// Performs `op(i)` for every `i` in `0..n` with `concurrency` workers
/// pulling the next index; returns the latencies and the wall time. Stops
/// handing out work once `give_up_after` calls have failed.
pub async fn fan_out<F, Fut>(n: usize, concurrency: usize, give_up_after: usize, op: F) -> Sample
where
    F: Fn(usize) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<(), String>> + Send + 'static,
{
    let op = Arc::new(op);
    let next = Arc::new(AtomicUsize::new(0));
    let failed = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let mut workers = JoinSet::new();
    for _ in 0..concurrency.min(n.max(1)) {
        let (op, next, failed) = (Arc::clone(&op), Arc::clone(&next), Arc::clone(&failed));
        workers.spawn(async move {
            let mut lat = Vec::new();
            let (mut errors, mut first_error) = (0usize, None);
            loop {
                if failed.load(Ordering::Relaxed) >= give_up_after {
                    break;
                }
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= n {
                    break;
                }
                let sent = Instant::now();
                match op(i).await {
                    Ok(()) => lat.push(sent.elapsed().as_nanos() as u64),
                    Err(error) => {
                        failed.fetch_add(1, Ordering::Relaxed);
                        errors += 1;
                        first_error.get_or_insert(error);
                    }
                }
            }
            (lat, errors, first_error)
        });
    }
    let mut parts = Vec::new();
    while let Some(joined) = workers.join_next().await {
        let (lat, errors, first_error) = joined.expect("fan-out worker panicked");
        parts.push(Sample {
            lat_ns: lat,
            secs: 0.0,
            errors,
            first_error,
        });
    }
    let mut sample = Sample::merge(parts);
    sample.secs = started.elapsed().as_secs_f64();
    sample
}

/// Milliseconds with two decimals, for tables.
pub fn ms(d: Duration) -> String {
    format!("{:.2}", d.as_secs_f64() * 1e3)
}

/// Microseconds, for tables of fast calls.
pub fn us(d: Duration) -> String {
    format!("{:.0}", d.as_secs_f64() * 1e6)
}

/// Where a side's calls spent their time server-side, as means over a run:
/// a span the server timed around each call's work, and the durable store
/// write each call made. From a vault's `/metrics` these are exact means (a
/// histogram's sum over its count); a baseline may time itself.
#[derive(Clone, Copy, Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct ServerTiming {
    /// The durable writes the means cover: one per measured call.
    pub writes: u64,
    /// The span `from_metrics` was asked for (the refresh scenario: the
    /// provider's answer to one refresh request; Deposit: the handler).
    pub span_mean: Duration,
    /// One record write until the store acknowledged it as durable.
    pub store_mean: Duration,
}

impl ServerTiming {
    /// From a vault's `/metrics` text, `span` naming the histogram family
    /// of the span.
    pub fn from_metrics(text: &str, span: &str) -> Self {
        Self {
            writes: metric_sum(text, "credvault_store_write_duration_seconds_count") as u64,
            span_mean: histogram_mean(text, span),
            store_mean: histogram_mean(text, "credvault_store_write_duration_seconds"),
        }
    }

    /// Write-weighted means over several runs.
    pub fn merge<'a>(parts: impl IntoIterator<Item = &'a ServerTiming>) -> Self {
        let (mut writes, mut span, mut store) = (0u64, 0f64, 0f64);
        for part in parts {
            writes += part.writes;
            span += part.span_mean.as_secs_f64() * part.writes as f64;
            store += part.store_mean.as_secs_f64() * part.writes as f64;
        }
        let mean = |sum: f64| match writes {
            0 => Duration::ZERO,
            n => Duration::from_secs_f64(sum / n as f64),
        };
        Self {
            writes,
            span_mean: mean(span),
            store_mean: mean(store),
        }
    }
}
