//! Durable storage of sealed credential records.
//!
//! The store knows keys, opaque bytes and revisions; it never sees plaintext
//! and never interprets a record. [`CredentialStore`] is the seam that lets a
//! replicated engine replace the embedded sled store when one node is not
//! enough: [`open`] is the one place that picks a backend, and nothing above
//! this module names one.
//!
//! Every write is a compare-and-swap on the record's *revision*, a counter the
//! store bumps on every write of a key. The broker builds its own
//! compare-and-swap-by-generation on top of it (a generation only changes on
//! Deposit; a revision changes on every write, including refresh write-backs
//! and rewraps), so no write can silently overwrite another.
//! A write that returns `Ok` is durable.

pub mod backup;
mod etcd;
mod sled_store;

use std::{fmt, path::PathBuf, sync::Arc, time::Duration};

use async_trait::async_trait;
use futures::{stream, Stream, TryStreamExt};

/// Records fetched per round trip by `<dyn CredentialStore>::records`.
const SCAN_PAGE: usize = 512;

pub use etcd::EtcdSettings;

/// `log` targets of the storage engines that can write TRACE records from a
/// thread's teardown: sled's crossbeam-epoch deferred functions run
/// wherever the epoch is next collected, a thread's exit included. The
/// logging holds them back (`telemetry::init_logging`); passed on, they
/// can abort the process.
pub const TEARDOWN_LOG_TARGETS: &[&str] = &["sled"];

/// Which engine holds the records, and its settings.
#[derive(Clone, Debug)]
pub enum StoreSettings {
    /// The embedded single-process store in a data directory, whose page
    /// cache holds at most `cache_capacity` bytes.
    Embedded {
        data_dir: PathBuf,
        cache_capacity: u64,
    },
    /// A replicated store on an etcd v3 cluster, shared by N replicas.
    Replicated(EtcdSettings),
}

/// Opens the configured store: the only place that names a backend.
pub async fn open(settings: &StoreSettings) -> Result<Arc<dyn CredentialStore>, StoreError> {
    match settings {
        StoreSettings::Embedded {
            data_dir,
            cache_capacity,
        } => Ok(Arc::new(
            sled_store::SledStore::open(data_dir, *cache_capacity).await?,
        )),
        StoreSettings::Replicated(etcd) => Ok(Arc::new(etcd::EtcdStore::open(etcd).await?)),
    }
}

/// A change to the store made by anyone (this process included), as a
/// replicated store's watch sees it: what caches and waiters follow.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Change {
    /// A record was written (`Some`: at this revision) or deleted (`None`).
    Record {
        key: StoreKey,
        revision: Option<Revision>,
    },
    /// A refresh claim on this record's key ended.
    ClaimReleased { key: StoreKey },
    /// History was lost (the watch fell behind a compaction): forget every
    /// cached entry.
    Reset,
}

/// Proof that this process holds the refresh claim of a credential; its
/// write-back is fenced on it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClaimToken {
    pub revision: Revision,
}

/// What asking for a refresh claim came to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ClaimOutcome {
    /// This process may refresh (`None`: the store needs no claims).
    Won(Option<ClaimToken>),
    /// Another process holds the claim, last written at `revision`.
    Held { revision: Revision },
}

/// Identifies one record: (tenant, subject, provider), length-prefixed so that
/// no two distinct triples share an encoding and a tenant is a key prefix.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct StoreKey(Vec<u8>);

impl StoreKey {
    pub fn new(tenant: &str, subject: &str, provider: &str) -> Self {
        let mut bytes = Self::tenant_prefix(tenant).0;
        for part in [subject, provider] {
            push_len_prefixed(&mut bytes, part);
        }
        Self(bytes)
    }

    /// The prefix shared by every key of `tenant`, for scans.
    pub fn tenant_prefix(tenant: &str) -> Self {
        let mut bytes = Vec::with_capacity(64);
        push_len_prefixed(&mut bytes, tenant);
        Self(bytes)
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    /// Keys starting with 0xff belong to the vault's own bookkeeping
    /// (claims, pending authorizations): no credential's key can, since it
    /// would need a tenant of 65,280 bytes or more.
    pub fn is_internal(&self) -> bool {
        self.0.first() == Some(&0xff)
    }

    pub fn from_bytes(bytes: Vec<u8>) -> Self {
        Self(bytes)
    }

    /// The (tenant, subject, provider) a key was built from; `None` for bytes
    /// that are not a key of this layout.
    pub fn parts(&self) -> Option<(String, String, String)> {
        let mut rest = self.0.as_slice();
        let mut next = || {
            let (len, tail) = rest.split_at_checked(2)?;
            let len = usize::from(u16::from_be_bytes([len[0], len[1]]));
            let (part, tail) = tail.split_at_checked(len)?;
            rest = tail;
            String::from_utf8(part.to_vec()).ok()
        };
        let parts = (next()?, next()?, next()?);
        rest.is_empty().then_some(parts)
    }
}

fn push_len_prefixed(out: &mut Vec<u8>, part: &str) {
    // Parts are validated to well under 64 KiB before they reach the store.
    let len = u16::try_from(part.len()).unwrap_or(u16::MAX);
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(&part.as_bytes()[..usize::from(len)]);
}

impl fmt::Debug for StoreKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Keys carry subjects (user ids); show their shape only.
        write!(f, "StoreKey({} bytes)", self.0.len())
    }
}

/// The store's per-key write counter. Starts at 1, never reused for a key
/// while the store lives.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Revision(pub u64);

/// A stored value together with the revision it was read at.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Versioned {
    pub revision: Revision,
    pub value: Vec<u8>,
}

/// What a compare-and-swap did.
#[derive(Debug, PartialEq, Eq)]
pub enum CasOutcome {
    /// Written (or deleted) and durable; the new revision, `None` after a delete.
    Written(Option<Revision>),
    /// Someone wrote first; here is what is stored now.
    Conflict(Option<Versioned>),
}

/// How a [`CredentialStore::write`] is made.
#[derive(Debug)]
pub struct Write<'a> {
    /// The revision the writer read (`None`: the key must be absent).
    pub expected: Option<Revision>,
    /// The new value; `None` deletes.
    pub value: Option<Vec<u8>>,
    /// Logged in the same atomic write, or not at all.
    pub event: Option<NewEvent>,
    /// A refresh's write-back: only while this claim stands, releasing it.
    /// Stores without claims ignore it.
    pub fence: Option<&'a ClaimToken>,
    /// Durable before `write` returns; otherwise at the next
    /// [`CredentialStore::flush`] (bulk work whose loss is harmless, such as
    /// a rewrap redone after a crash).
    pub durable: bool,
}

impl Write<'_> {
    pub const DURABLE: Write<'static> = Write {
        expected: None,
        value: None,
        event: None,
        fence: None,
        durable: true,
    };
}

/// An event to log with a write: opaque bytes (the broker's encoding, which
/// holds no secret) and when it happened, for trimming.
#[derive(Clone, Debug)]
pub struct NewEvent {
    pub at_ms: u64,
    pub payload: Vec<u8>,
}

/// An event as the log holds it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LoggedEvent {
    pub cursor: EventCursor,
    pub payload: Vec<u8>,
}

/// A place in the event log: `position` orders it (strictly increasing per
/// vault, across replicas and restarts); `at_ms` is when its event was
/// written, which lets a replicated store narrow a read to recent history.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct EventCursor {
    pub position: u64,
    pub at_ms: u64,
}

impl EventCursor {
    /// The opaque wire form: fixed-width hex, so cursors also compare as
    /// strings in log order.
    pub fn encode(&self) -> String {
        format!("{:016x}{:016x}", self.position, self.at_ms)
    }

    pub fn decode(text: &str) -> Option<Self> {
        if text.len() != 32 || !text.bytes().all(|b| b.is_ascii_hexdigit()) {
            return None;
        }
        Some(Self {
            position: u64::from_str_radix(text.get(..16)?, 16).ok()?,
            at_ms: u64::from_str_radix(text.get(16..)?, 16).ok()?,
        })
    }
}

/// Where the event log stands.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EventHorizon {
    /// The newest event's place (a reader starting here sees new events only).
    pub head: EventCursor,
    /// The newest place trimmed away; a reader resuming before it has
    /// missed events.
    pub trimmed_through: u64,
}

/// Storage failures. None of them carries record bytes.
#[derive(Clone, Debug, thiserror::Error)]
pub enum StoreError {
    #[error("storage i/o failed: {0}")]
    Io(String),
    #[error("stored entry is malformed: {0}")]
    Malformed(&'static str),
    /// A fenced write found its refresh claim taken over by another replica.
    #[error("the refresh claim was taken over by another replica")]
    ClaimLost,
}

/// The storage seam. Implementations must make `Ok` writes durable.
#[async_trait]
pub trait CredentialStore: Send + Sync + 'static {
    async fn get(&self, key: &StoreKey) -> Result<Option<Versioned>, StoreError>;

    /// The one write: replaces the value only if the stored revision equals
    /// `write.expected` (`None`: only if absent; `value: None` deletes),
    /// appends `write.event` to the event log in the same atomic write, and
    /// with a `fence`, also requires that claim to stand and releases it.
    async fn write(&self, key: &StoreKey, write: Write<'_>) -> Result<CasOutcome, StoreError>;

    /// A durable compare-and-swap with no event and no fence.
    async fn compare_and_swap(
        &self,
        key: &StoreKey,
        expected: Option<Revision>,
        value: Option<Vec<u8>>,
    ) -> Result<CasOutcome, StoreError> {
        self.write(
            key,
            Write {
                expected,
                value,
                ..Write::DURABLE
            },
        )
        .await
    }

    /// Up to `limit` records whose key starts with `prefix`, strictly after
    /// `after`, in key order.
    async fn scan(
        &self,
        prefix: &StoreKey,
        after: Option<&StoreKey>,
        limit: usize,
    ) -> Result<Vec<(StoreKey, Versioned)>, StoreError>;

    /// Small non-secret bookkeeping values (e.g. key fingerprints).
    async fn get_meta(&self, name: &str) -> Result<Option<Vec<u8>>, StoreError>;
    async fn put_meta(&self, name: &str, value: Vec<u8>) -> Result<(), StoreError>;

    /// Writes `value` under `name` unless something is there; returns what
    /// was there (`None`: written). Atomic on a replicated store, so of two
    /// replicas racing, one sees the other's value. A write retried after a
    /// lost reply that finds `value` itself there answers `None`.
    async fn put_meta_if_absent(
        &self,
        name: &str,
        value: Vec<u8>,
    ) -> Result<Option<Vec<u8>>, StoreError> {
        match self.get_meta(name).await? {
            Some(existing) => Ok(Some(existing)),
            None => self.put_meta(name, value).await.map(|()| None),
        }
    }
    /// Every bookkeeping value, for backups.
    async fn all_meta(&self) -> Result<Vec<(String, Vec<u8>)>, StoreError>;

    /// False once the store has failed a write in a way it cannot recover
    /// from without a restart; probes and the broker consult it.
    fn healthy(&self) -> bool {
        true
    }

    /// Whether this process should receive traffic (`/readyz`): healthy, and
    /// for a replicated store, its view confirmed fresh.
    fn ready(&self) -> bool {
        self.healthy()
    }

    /// Whether caches fed by [`CredentialStore::changes`] are known to be
    /// current; when not, readers must read through.
    fn fresh(&self) -> bool {
        true
    }

    /// Every change made to the store, by any process; `None` for a store
    /// only this process writes (its own writes keep its cache current).
    fn changes(&self) -> Option<tokio::sync::broadcast::Receiver<Change>> {
        None
    }

    /// Asks for the refresh claim of `key`; stores that only one process
    /// uses need none and always grant it.
    async fn claim(&self, key: &StoreKey) -> Result<ClaimOutcome, StoreError> {
        let _ = key;
        Ok(ClaimOutcome::Won(None))
    }

    /// Takes over a claim last written at `held`, if it still is.
    async fn take_over(&self, key: &StoreKey, held: Revision) -> Result<ClaimOutcome, StoreError> {
        let _ = (key, held);
        Ok(ClaimOutcome::Won(None))
    }

    /// Gives a claim back without a write-back (the refresh failed).
    async fn release(&self, key: &StoreKey, claim: &ClaimToken) -> Result<(), StoreError> {
        let _ = (key, claim);
        Ok(())
    }

    /// How long a waiter lets another process's claim stand, on its own
    /// clock, before taking it over.
    fn claim_takeover(&self) -> Duration {
        Duration::ZERO
    }

    /// Tells the other processes which key versions this one can open.
    async fn publish_key_versions(&self, versions: Vec<u32>) -> Result<(), StoreError> {
        let _ = versions;
        Ok(())
    }

    /// The key versions every live process can open; `None` when only this
    /// process uses the store (or none has said yet).
    fn key_versions_everyone_opens(&self) -> Option<std::collections::BTreeSet<u32>> {
        None
    }

    /// Bytes the store occupies on disk, where the engine knows it.
    fn size_on_disk(&self) -> Option<u64> {
        None
    }

    /// Up to `limit` logged events strictly after `after`, in log order.
    /// Only events whose write was acknowledged are returned.
    async fn events_after(
        &self,
        after: &EventCursor,
        limit: usize,
    ) -> Result<Vec<LoggedEvent>, StoreError>;

    /// Where the log stands: the cursor of its newest event (a reader that
    /// starts there sees only what comes next) and how far it was trimmed.
    async fn event_horizon(&self) -> Result<EventHorizon, StoreError>;

    /// Ticks when new events may be readable, from any process.
    fn event_signal(&self) -> tokio::sync::watch::Receiver<u64>;

    /// Deletes the events logged before `before_ms` (Unix milliseconds) and
    /// remembers the newest cursor deleted; returns how many went.
    async fn trim_events(&self, before_ms: u64) -> Result<u64, StoreError>;

    /// Makes every acknowledged write durable; used at shutdown.
    async fn flush(&self) -> Result<(), StoreError>;
}

impl dyn CredentialStore {
    /// Every record strictly after `after` (from the start when `None`), in
    /// key order, fetched a page at a time: the one way to walk the store.
    pub fn records(
        &self,
        after: Option<StoreKey>,
    ) -> impl Stream<Item = Result<(StoreKey, Versioned), StoreError>> + Send + '_ {
        let everything = StoreKey::from_bytes(Vec::new());
        stream::try_unfold(Some(after), move |cursor| {
            let everything = everything.clone();
            async move {
                // `None`: the previous page was the last one.
                let Some(after) = cursor else {
                    return Ok::<_, StoreError>(None);
                };
                let page = self.scan(&everything, after.as_ref(), SCAN_PAGE).await?;
                let next = match page.last() {
                    Some((last, _)) if page.len() == SCAN_PAGE => Some(Some(last.clone())),
                    _ => None,
                };
                // Internal entries (pending authorizations) are no records.
                let records = page.into_iter().filter(|(key, _)| !key.is_internal());
                Ok(Some((stream::iter(records.map(Ok)), next)))
            }
        })
        .try_flatten()
    }

    /// How many records lie strictly after `after`.
    pub async fn count_after(&self, after: Option<StoreKey>) -> Result<u64, StoreError> {
        self.records(after)
            .try_fold(0u64, |n, _| async move { Ok(n + 1) })
            .await
    }
}
