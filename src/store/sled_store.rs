//! The embedded [`CredentialStore`]: sled, one tree for records, one for
//! the event log and one for bookkeeping, flushed before any write is
//! acknowledged.
//!
//! On disk a record is `revision (u64 BE) || sealed envelope`, and an event
//! is `at_ms (u64 BE) || payload` under its position (u64 BE). sled is a
//! single-writer embedded engine: one process owns a data directory.
//!
//! **The event log** lives in the records tree, under keys that no record
//! key can take (`0xffff` then `events/` and the position; a record key
//! starts with its tenant's length, at most a few hundred).
//!
//! A write and its event must land together. sled 0.34 can write two keys
//! atomically only by a batch or a transaction, and both take its global
//! write lock, which waits out any flush in progress: every evented write
//! would queue behind an fsync (measured: half the Deposit throughput at
//! c=16). So an evented write is two single-key inserts instead, the event
//! first, then the record, and the store repairs the one state a crash can
//! leave between them:
//!
//! - sled recovers a *prefix* of its log, so after a crash a record write
//!   never survives without the event logged before it (no change without
//!   its event);
//! - an event can survive without its record write (the crash fell between
//!   the two; the caller was never answered). At open, the store checks the
//!   newest events against the records and deletes an event whose change is
//!   not there (no event without its change). Each event names its record
//!   key and revision for this; only writes in flight at the crash can be
//!   unapplied, so the newest [`RECOVERY_WINDOW`] events are checked.
//!
//! Every record write is applied by one thread, the store's writer
//! ([`writer`]), which makes a write's read, check and two inserts a
//! compare-and-swap, and group-commits: one flush per batch of writes.
//! Positions are taken in order, and readers see the log only up to the
//! newest position below which every write completed both inserts and a
//! flush covered it: a reader never sees an event whose write could still be
//! lost, nor a gap that a slower writer fills later.

mod writer;

use std::{
    path::Path,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
    time::Duration,
};

use async_trait::async_trait;

use super::{
    CasOutcome, CredentialStore, EventCursor, EventHorizon, LoggedEvent, NewEvent, Revision,
    StoreError, StoreKey, Versioned, Write,
};

const RECORDS_TREE: &str = "credentials.v1";
/// Where events live in the records tree: after every record key.
const EVENTS_PREFIX: &[u8] = b"\xff\xffevents/";
/// Events checked against the records at open: more than the writes that
/// can be in flight at a crash (one batch of the writer).
const RECOVERY_WINDOW: usize = 4096;
const _: () = assert!(writer::MAX_BATCH < RECOVERY_WINDOW);
/// Events deleted per trim call.
const TRIM_BATCH: usize = 100_000;
const META_TREE: &str = "meta.v1";
/// Bookkeeping name of the newest position trimmed from the event log.
const EVENTS_TRIMMED: &str = "events.trimmed_through";
const AT_LEN: usize = 8;
/// An event's record write: a put or a delete.
const OP_PUT: u8 = 1;
const OP_DELETE: u8 = 2;
const REVISION_LEN: usize = 8;

/// sled-backed store. Cheap to clone.
#[derive(Clone)]
pub struct SledStore {
    engine: Engine,
    writer: Arc<writer::Writer>,
}

/// The sled handles and the state every thread of the store shares. Cheap
/// to clone; the writer thread holds one, the blocking pool's tasks others.
#[derive(Clone)]
struct Engine {
    db: sled::Db,
    records: sled::Tree,
    meta: sled::Tree,
    health: Arc<Health>,
    log: Arc<EventLog>,
}

/// A write's (old, new) raw entries, to take it back if its flush fails.
type Taken = (Option<sled::IVec>, Option<Vec<u8>>);

/// The event log's ordering and visibility (see the module documentation).
struct EventLog {
    /// Positions handed out and not yet fully written.
    order: std::sync::Mutex<Positions>,
    /// Every position up to this one has both its inserts done (not yet
    /// necessarily durable).
    committed: AtomicU64,
    /// The newest position a completed flush covered: what readers see.
    durable: tokio::sync::watch::Sender<u64>,
}

#[derive(Default)]
struct Positions {
    last: u64,
    in_flight: std::collections::BTreeSet<u64>,
}

impl EventLog {
    /// The next position, in flight until [`EventLog::done`].
    fn take(positions: &mut Positions) -> u64 {
        positions.last += 1;
        positions.in_flight.insert(positions.last);
        positions.last
    }

    /// `position`'s write is over (done or abandoned): move `committed` up
    /// to just below the oldest write still in flight.
    fn done(&self, position: u64) {
        let mut positions = self.order.lock().unwrap_or_else(|e| e.into_inner());
        positions.in_flight.remove(&position);
        let complete = match positions.in_flight.first() {
            Some(oldest) => oldest - 1,
            None => positions.last,
        };
        self.committed.fetch_max(complete, Ordering::SeqCst);
    }

    /// Publishes what a flush that began after `covers` made durable.
    fn flushed(&self, covers: u64) {
        self.durable.send_if_modified(|seen| {
            let moved = covers > *seen;
            *seen = (*seen).max(covers);
            moved
        });
    }
}

/// Whether the store still writes. sled latches an I/O error: after one,
/// every write fails until the process restarts.
#[derive(Default)]
struct Health {
    /// A write or flush failed.
    failing: AtomicBool,
    /// Entries whose write was never made durable and could not be taken
    /// back in sled (which refuses writes after an I/O error): readers see
    /// the previous entry until the process restarts.
    unacknowledged: std::sync::Mutex<std::collections::HashMap<Vec<u8>, Option<sled::IVec>>>,
}

/// How long a start waits for the directory lock of a previous owner, whose
/// last background flush can outlive it briefly.
const LOCK_WAIT: Duration = Duration::from_secs(20);
const LOCK_POLL: Duration = Duration::from_millis(100);

impl SledStore {
    /// Opens (or creates) the store under `dir` with a page cache of at most
    /// `cache_capacity` bytes, waiting up to [`LOCK_WAIT`] for another
    /// process's lock; the wait sleeps no runtime worker.
    pub async fn open(dir: &Path, cache_capacity: u64) -> Result<Self, StoreError> {
        let deadline = tokio::time::Instant::now() + LOCK_WAIT;
        loop {
            let path = dir.to_owned();
            let attempt = tokio::task::spawn_blocking(move || {
                sled::Config::new()
                    .path(path)
                    .cache_capacity(cache_capacity)
                    .mode(sled::Mode::HighThroughput)
                    .open()
            })
            .await
            .map_err(|_| StoreError::Io("open: the opening task failed".into()))?;
            match attempt {
                Ok(db) => return Self::with_db(db),
                // sled 0.34 reports a held lock as `ErrorKind::Other` with
                // the OS error in its message, not as `WouldBlock`.
                Err(sled::Error::Io(e))
                    if (e.kind() == std::io::ErrorKind::WouldBlock
                        || e.to_string().contains("could not acquire lock"))
                        && tokio::time::Instant::now() < deadline =>
                {
                    tokio::time::sleep(LOCK_POLL).await;
                }
                Err(e) => return Err(io_error("open", &e)),
            }
        }
    }

    fn with_db(db: sled::Db) -> Result<Self, StoreError> {
        let records = db
            .open_tree(RECORDS_TREE)
            .map_err(|e| io_error("open tree", &e))?;
        let meta = db
            .open_tree(META_TREE)
            .map_err(|e| io_error("open tree", &e))?;
        // Positions continue after the newest event, or after the newest
        // trimmed one when the trim emptied the log.
        let newest = records
            .scan_prefix(EVENTS_PREFIX)
            .next_back()
            .transpose()
            .map_err(|e| io_error("read events", &e))?
            .and_then(|(key, _)| position_in(&key))
            .unwrap_or(0);
        let trimmed = meta
            .get(EVENTS_TRIMMED)
            .map_err(|e| io_error("get meta", &e))?
            .and_then(|v| position_of(&v))
            .unwrap_or(0);
        let last = newest.max(trimmed);
        recover_events(&records)?;
        let engine = Engine {
            db,
            records,
            meta,
            health: Arc::default(),
            log: Arc::new(EventLog {
                order: std::sync::Mutex::new(Positions {
                    last,
                    in_flight: Default::default(),
                }),
                committed: AtomicU64::new(last),
                durable: tokio::sync::watch::Sender::new(last),
            }),
        };
        let writer = Arc::new(writer::Writer::start(engine.clone())?);
        Ok(Self { engine, writer })
    }

    /// Runs sled work on the blocking pool: a read can wait on disk.
    async fn blocking<T: Send + 'static>(
        &self,
        work: impl FnOnce(&Engine) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let engine = self.engine.clone();
        tokio::task::spawn_blocking(move || work(&engine))
            .await
            .map_err(|_| StoreError::Io("a storage task failed".into()))?
    }

    /// Makes every write made so far durable.
    async fn durable(&self) -> Result<(), StoreError> {
        self.writer.flush().await
    }
}

impl Engine {
    /// sled ids are monotonic across restarts, which makes them usable as
    /// revisions: a revision is never handed out twice.
    fn next_revision(&self) -> Result<Revision, StoreError> {
        let id = self
            .db
            .generate_id()
            .map_err(|e| io_error("generate id", &e))?;
        Ok(Revision(id + 1))
    }

    /// The compare-and-swap, on the writer thread (the only caller, which
    /// is what makes the read and the inserts atomic). Also returns the raw
    /// entries, so a write whose flush fails can be taken back.
    fn swap(
        &self,
        key: &StoreKey,
        expected: Option<Revision>,
        value: Option<Vec<u8>>,
        event: Option<NewEvent>,
    ) -> Result<(CasOutcome, Option<Taken>), StoreError> {
        if !self.healthy_now() {
            // sled would refuse anyway; saying so keeps the error typed.
            return Err(StoreError::Io(
                "the store failed earlier; restart required".into(),
            ));
        }
        let current_raw = self
            .records
            .get(key.as_bytes())
            .map_err(|e| io_error("get", &e))?;
        let current = current_raw.as_deref().map(decode).transpose()?;
        if current.as_ref().map(|v| v.revision) != expected {
            return Ok((CasOutcome::Conflict(current), None));
        }
        let new_revision = match value {
            Some(_) => Some(self.next_revision()?),
            None => None,
        };
        let new_raw = match (&value, new_revision) {
            (Some(value), Some(revision)) => Some(encode(revision, value)),
            _ => None,
        };
        if let Some(event) = event {
            let current = current_raw.zip(current.map(|v| v.revision));
            return self.swap_logged(key, current, new_raw, new_revision, event);
        }
        // sled's own CAS compares whole entries; revisions make every entry
        // distinct, so this is exactly a CAS on the revision we checked above.
        let swapped = self
            .records
            .compare_and_swap(key.as_bytes(), current_raw.clone(), new_raw.clone())
            .map_err(|e| self.failed(io_error("compare and swap", &e)))?;
        match swapped {
            Ok(()) => Ok((
                CasOutcome::Written(new_revision),
                Some((current_raw, new_raw)),
            )),
            Err(conflict) => Ok((
                CasOutcome::Conflict(conflict.current.as_deref().map(decode).transpose()?),
                None,
            )),
        }
    }

    /// The write of an entry together with its event: the event, then the
    /// entry (see the module documentation). The caller, the writer thread,
    /// checked the revision.
    fn swap_logged(
        &self,
        key: &StoreKey,
        current: Option<(sled::IVec, Revision)>,
        new_raw: Option<Vec<u8>>,
        new_revision: Option<Revision>,
        event: NewEvent,
    ) -> Result<(CasOutcome, Option<Taken>), StoreError> {
        // What recovery needs to tell whether the change landed: the key,
        // and the revision written (a put) or deleted (a delete).
        let (op, revision) = match (new_revision, &current) {
            (Some(written), _) => (OP_PUT, written),
            (None, Some((_, deleted))) => (OP_DELETE, *deleted),
            (None, None) => (OP_DELETE, Revision(0)),
        };
        let key_len = u16::try_from(key.as_bytes().len()).unwrap_or(u16::MAX);
        let mut entry =
            Vec::with_capacity(AT_LEN + 11 + key.as_bytes().len() + event.payload.len());
        entry.extend_from_slice(&event.at_ms.to_be_bytes());
        entry.extend_from_slice(&key_len.to_be_bytes());
        entry.extend_from_slice(&key.as_bytes()[..usize::from(key_len)]);
        entry.push(op);
        entry.extend_from_slice(&revision.0.to_be_bytes());
        entry.extend_from_slice(&event.payload);
        let position = {
            let mut positions = self.log.order.lock().unwrap_or_else(|e| e.into_inner());
            let position = EventLog::take(&mut positions);
            // Inserted under the lock: events enter sled's log in position
            // order.
            let inserted = self.records.insert(event_key(position), entry);
            if let Err(e) = inserted {
                drop(positions);
                self.log.done(position);
                return Err(self.failed(io_error("log event", &e)));
            }
            position
        };
        let written = match &new_raw {
            Some(raw) => self.records.insert(key.as_bytes(), raw.as_slice()),
            None => self.records.remove(key.as_bytes()),
        };
        self.log.done(position);
        written.map_err(|e| self.failed(io_error("write", &e)))?;
        Ok((
            CasOutcome::Written(new_revision),
            Some((current.map(|(raw, _)| raw), new_raw)),
        ))
    }

    fn healthy_now(&self) -> bool {
        !self.health.failing.load(Ordering::SeqCst)
    }

    /// The previous entry of a key whose last write was refused, if any.
    #[allow(clippy::option_option)]
    fn unacknowledged(&self, key: &[u8]) -> Option<Option<sled::IVec>> {
        let map = self
            .health
            .unacknowledged
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if map.is_empty() {
            return None;
        }
        map.get(key).cloned()
    }

    /// Marks the store as failing: sled latches I/O errors, so from here on
    /// writes fail until the process restarts. Probes report it.
    fn failed(&self, error: StoreError) -> StoreError {
        if !self.health.failing.swap(true, Ordering::SeqCst) {
            tracing::error!(%error, "the store failed a write; refusing writes and upstream refreshes until restarted");
        }
        error
    }

    /// Flushes, then shows readers the events the flush covered. Only the
    /// writer thread calls it, with sled's blocking `flush`: sled 0.34's
    /// `flush_async` deadlocks when several run at once (spacejam/sled#1308,
    /// fixed only on an unreleased branch).
    fn flush_now(&self) -> Result<(), StoreError> {
        let events = self.log.committed.load(Ordering::SeqCst);
        self.db
            .flush()
            .map_err(|e| self.failed(io_error("flush", &e)))?;
        self.log.flushed(events);
        Ok(())
    }
}

fn io_error(op: &str, error: &sled::Error) -> StoreError {
    StoreError::Io(format!("{op}: {error}"))
}

/// An event entry: `at_ms (8) || key length (2) || key || op (1) ||
/// revision (8) || payload`.
struct EventEntry<'a> {
    at_ms: u64,
    key: &'a [u8],
    op: u8,
    revision: u64,
    payload: &'a [u8],
}

impl<'a> EventEntry<'a> {
    fn parse(entry: &'a [u8]) -> Option<Self> {
        let (at, rest) = entry.split_at_checked(AT_LEN)?;
        let (len, rest) = rest.split_at_checked(2)?;
        let (key, rest) =
            rest.split_at_checked(usize::from(u16::from_be_bytes([len[0], len[1]])))?;
        let (&op, rest) = rest.split_first()?;
        let (revision, payload) = rest.split_at_checked(8)?;
        Some(Self {
            at_ms: position_of(at)?,
            key,
            op,
            revision: position_of(revision)?,
            payload,
        })
    }
}

/// At open: deletes the events whose record write a crash cut off (see the
/// module documentation). Only the newest event of a key can be one: an
/// older write's record insert came before the next write's event insert.
fn recover_events(records: &sled::Tree) -> Result<(), StoreError> {
    let mut newer = std::collections::HashSet::new();
    let mut removed = 0usize;
    for item in records
        .scan_prefix(EVENTS_PREFIX)
        .rev()
        .take(RECOVERY_WINDOW)
    {
        let (event_key, entry) = item.map_err(|e| io_error("read events", &e))?;
        let entry = EventEntry::parse(&entry).ok_or(StoreError::Malformed("event entry"))?;
        if !newer.insert(entry.key.to_vec()) {
            continue;
        }
        let stored = records
            .get(entry.key)
            .map_err(|e| io_error("get", &e))?
            .map(|raw| decode(&raw).map(|v| v.revision.0))
            .transpose()?;
        // Revisions only grow, so a newer one means the write landed and
        // something wrote after it.
        let landed = match (entry.op, stored) {
            (OP_PUT, Some(now)) => now >= entry.revision,
            (OP_PUT, None) => false,
            (_, Some(now)) => now != entry.revision,
            (_, None) => true,
        };
        if !landed {
            records
                .remove(&event_key)
                .map_err(|e| io_error("remove event", &e))?;
            removed += 1;
        }
    }
    if removed > 0 {
        tracing::warn!(removed, "removed events whose write a crash cut off");
        records.flush().map_err(|e| io_error("flush", &e))?;
    }
    Ok(())
}

fn position_of(bytes: &[u8]) -> Option<u64> {
    Some(u64::from_be_bytes(bytes.try_into().ok()?))
}

fn event_key(position: u64) -> Vec<u8> {
    let mut key = EVENTS_PREFIX.to_vec();
    key.extend_from_slice(&position.to_be_bytes());
    key
}

/// The position in an event key.
fn position_in(key: &[u8]) -> Option<u64> {
    position_of(key.strip_prefix(EVENTS_PREFIX)?)
}

fn decode(raw: &[u8]) -> Result<Versioned, StoreError> {
    if raw.len() < REVISION_LEN {
        return Err(StoreError::Malformed("entry shorter than its revision"));
    }
    let (revision, value) = raw.split_at(REVISION_LEN);
    let mut buf = [0u8; REVISION_LEN];
    buf.copy_from_slice(revision);
    Ok(Versioned {
        revision: Revision(u64::from_be_bytes(buf)),
        value: value.to_vec(),
    })
}

fn encode(revision: Revision, value: &[u8]) -> Vec<u8> {
    let mut raw = Vec::with_capacity(REVISION_LEN + value.len());
    raw.extend_from_slice(&revision.0.to_be_bytes());
    raw.extend_from_slice(value);
    raw
}

impl Engine {
    fn get_now(&self, key: &[u8]) -> Result<Option<Versioned>, StoreError> {
        if let Some(previous) = self.unacknowledged(key) {
            return previous.as_deref().map(decode).transpose();
        }
        match self.records.get(key).map_err(|e| io_error("get", &e))? {
            Some(raw) => decode(&raw).map(Some),
            None => Ok(None),
        }
    }

    /// Takes back a write whose flush failed, so readers never see what the
    /// caller was told failed.
    fn take_back(&self, key: &[u8], (old, new): Taken) {
        let reverted = self
            .records
            .compare_and_swap(key, new, old.clone())
            .is_ok_and(|swapped| swapped.is_ok());
        if !reverted {
            self.health
                .unacknowledged
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(key.to_vec(), old);
        }
    }

    fn scan_now(
        &self,
        prefix: &StoreKey,
        after: Option<&StoreKey>,
        limit: usize,
    ) -> Result<Vec<(StoreKey, Versioned)>, StoreError> {
        let mut out = Vec::new();
        // Start right after the cursor, so paging through a large store is
        // linear rather than re-walking every earlier page.
        let start = match after {
            Some(after) if after.as_bytes() >= prefix.as_bytes() => {
                std::ops::Bound::Excluded(after.as_bytes().to_vec())
            }
            _ => std::ops::Bound::Included(prefix.as_bytes().to_vec()),
        };
        let range = self
            .records
            .range::<Vec<u8>, _>((start, std::ops::Bound::Unbounded));
        for item in range {
            if out.len() >= limit {
                break;
            }
            let (key, raw) = item.map_err(|e| io_error("scan", &e))?;
            // The event log sorts after every record.
            if !key.starts_with(prefix.as_bytes()) || key.starts_with(EVENTS_PREFIX) {
                break;
            }
            let raw = match self.unacknowledged(&key) {
                Some(None) => continue,
                Some(Some(previous)) => previous,
                None => raw,
            };
            out.push((StoreKey::from_bytes(key.to_vec()), decode(&raw)?));
        }
        Ok(out)
    }

    fn all_meta_now(&self) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        let mut out = Vec::new();
        for item in self.meta.iter() {
            let (name, value) = item.map_err(|e| io_error("scan meta", &e))?;
            let name = String::from_utf8(name.to_vec())
                .map_err(|_| StoreError::Malformed("meta name is not utf-8"))?;
            out.push((name, value.to_vec()));
        }
        Ok(out)
    }
}

#[async_trait]
impl CredentialStore for SledStore {
    async fn get(&self, key: &StoreKey) -> Result<Option<Versioned>, StoreError> {
        let key = key.clone();
        self.blocking(move |store| store.get_now(key.as_bytes()))
            .await
    }

    async fn write(&self, key: &StoreKey, write: Write<'_>) -> Result<CasOutcome, StoreError> {
        let Write {
            expected,
            value,
            event,
            durable,
            fence: _,
        } = write;
        self.writer
            .write(writer::Job {
                key: key.clone(),
                expected,
                value,
                event,
                durable,
            })
            .await
    }

    async fn scan(
        &self,
        prefix: &StoreKey,
        after: Option<&StoreKey>,
        limit: usize,
    ) -> Result<Vec<(StoreKey, Versioned)>, StoreError> {
        let (prefix, after) = (prefix.clone(), after.cloned());
        self.blocking(move |store| store.scan_now(&prefix, after.as_ref(), limit))
            .await
    }

    async fn get_meta(&self, name: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let name = name.to_owned();
        self.blocking(move |store| {
            Ok(store
                .meta
                .get(name.as_bytes())
                .map_err(|e| io_error("get meta", &e))?
                .map(|v| v.to_vec()))
        })
        .await
    }

    async fn put_meta(&self, name: &str, value: Vec<u8>) -> Result<(), StoreError> {
        let name = name.to_owned();
        self.blocking(move |store| {
            store
                .meta
                .insert(name.as_bytes(), value)
                .map_err(|e| store.failed(io_error("put meta", &e)))?;
            Ok(())
        })
        .await?;
        self.durable().await
    }

    async fn all_meta(&self) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        self.blocking(Engine::all_meta_now).await
    }

    fn healthy(&self) -> bool {
        self.engine.healthy_now()
    }

    fn size_on_disk(&self) -> Option<u64> {
        self.engine.db.size_on_disk().ok()
    }

    async fn events_after(
        &self,
        after: &EventCursor,
        limit: usize,
    ) -> Result<Vec<LoggedEvent>, StoreError> {
        let visible = *self.engine.log.durable.borrow();
        let start = after.position.saturating_add(1);
        if start > visible {
            return Ok(Vec::new());
        }
        self.blocking(move |store| {
            let mut out = Vec::new();
            let range = store.records.range(event_key(start)..=event_key(visible));
            for item in range.take(limit) {
                let (key, entry) = item.map_err(|e| io_error("read events", &e))?;
                let position = position_in(&key)
                    .ok_or(StoreError::Malformed("event key is not a position"))?;
                let entry =
                    EventEntry::parse(&entry).ok_or(StoreError::Malformed("event entry"))?;
                out.push(LoggedEvent {
                    cursor: EventCursor {
                        position,
                        at_ms: entry.at_ms,
                    },
                    payload: entry.payload.to_vec(),
                });
            }
            Ok(out)
        })
        .await
    }

    async fn event_horizon(&self) -> Result<EventHorizon, StoreError> {
        let visible = *self.engine.log.durable.borrow();
        self.blocking(move |store| {
            let trimmed_through = store
                .meta
                .get(EVENTS_TRIMMED)
                .map_err(|e| io_error("get meta", &e))?
                .and_then(|v| position_of(&v))
                .unwrap_or(0);
            let at_ms = store
                .records
                .get(event_key(visible))
                .map_err(|e| io_error("read events", &e))?
                .and_then(|entry| entry.get(..AT_LEN).and_then(position_of))
                .unwrap_or(0);
            Ok(EventHorizon {
                head: EventCursor {
                    position: visible,
                    at_ms,
                },
                trimmed_through,
            })
        })
        .await
    }

    fn event_signal(&self) -> tokio::sync::watch::Receiver<u64> {
        self.engine.log.durable.subscribe()
    }

    async fn trim_events(&self, before_ms: u64) -> Result<u64, StoreError> {
        let trimmed = self
            .blocking(move |store| {
                let mut newest = None;
                let mut batch = sled::Batch::default();
                let mut count = 0u64;
                // Bounded per call; the next trim goes on.
                for item in store.records.scan_prefix(EVENTS_PREFIX).take(TRIM_BATCH) {
                    let (key, entry) = item.map_err(|e| io_error("read events", &e))?;
                    let at = entry.get(..AT_LEN).and_then(position_of).unwrap_or(0);
                    if at >= before_ms {
                        break;
                    }
                    newest = position_in(&key);
                    batch.remove(key);
                    count += 1;
                }
                let Some(newest) = newest else {
                    return Ok(0);
                };
                // The mark first: a crash between the two leaves events that
                // a later trim removes, never a gap nobody is told about.
                store
                    .meta
                    .insert(EVENTS_TRIMMED, &newest.to_be_bytes())
                    .map_err(|e| store.failed(io_error("put meta", &e)))?;
                store
                    .records
                    .apply_batch(batch)
                    .map_err(|e| store.failed(io_error("trim events", &e)))?;
                Ok(count)
            })
            .await?;
        if trimmed > 0 {
            self.durable().await?;
        }
        Ok(trimmed)
    }

    async fn flush(&self) -> Result<(), StoreError> {
        self.durable().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A page cache of 8 MiB: these tests hold a few records.
    const TEST_CACHE: u64 = 8 << 20;

    /// The smallest cache the configuration allows (1 MiB) under records
    /// taking several times that: every record written is read back, by
    /// key and by scan, before and after a reopen, with pages evicted in
    /// between.
    #[tokio::test]
    async fn a_page_cache_smaller_than_the_records_loses_none_of_them() {
        const SMALLEST: u64 = 1 << 20;
        const RECORDS: usize = 3000;
        let dir = tempfile::tempdir().unwrap();
        let key = |i: usize| StoreKey::new("acme", &format!("user-{i}"), "google");
        // Distinct 2 KiB values, 6 MiB in all, that do not compress away.
        let value = |i: usize| {
            let mut bytes = Vec::with_capacity(2048);
            let mut x = i as u64 + 1;
            while bytes.len() < 2048 {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                bytes.extend_from_slice(&x.to_le_bytes());
            }
            bytes
        };
        let reads_back_everything = |store: SledStore| async move {
            for i in (0..RECORDS).rev() {
                let stored = store.get(&key(i)).await.unwrap();
                assert_eq!(stored.map(|v| v.value), Some(value(i)), "record {i}");
            }
            let store: &dyn CredentialStore = &store;
            let scanned: Vec<_> = futures::TryStreamExt::try_collect(store.records(None))
                .await
                .unwrap();
            assert_eq!(scanned.len(), RECORDS);
        };
        {
            let store = SledStore::open(dir.path(), SMALLEST).await.unwrap();
            for i in 0..RECORDS {
                let write = Write {
                    value: Some(value(i)),
                    durable: i + 1 == RECORDS,
                    ..Write::DURABLE
                };
                let outcome = store.write(&key(i), write).await.unwrap();
                assert!(matches!(outcome, CasOutcome::Written(_)), "{outcome:?}");
            }
            reads_back_everything(store).await;
        }
        let store = SledStore::open(dir.path(), SMALLEST).await.unwrap();
        reads_back_everything(store).await;
    }

    /// A crash between an event's insert and its record's: at the next
    /// open the event is gone, and the events whose writes landed stay.
    #[tokio::test]
    async fn an_event_whose_write_a_crash_cut_off_is_removed_at_open() {
        let dir = tempfile::tempdir().unwrap();
        let key = StoreKey::new("acme", "alice", "google");
        {
            let store = SledStore::open(dir.path(), TEST_CACHE).await.unwrap();
            let write = Write {
                value: Some(b"landed".to_vec()),
                event: Some(NewEvent {
                    at_ms: 1,
                    payload: b"kept".to_vec(),
                }),
                ..Write::DURABLE
            };
            store.write(&key, write).await.unwrap();
            // The next write's event, and then the crash: a put of a
            // revision the record never got.
            let mut entry = 2u64.to_be_bytes().to_vec();
            entry.extend_from_slice(&u16::try_from(key.as_bytes().len()).unwrap().to_be_bytes());
            entry.extend_from_slice(key.as_bytes());
            entry.push(OP_PUT);
            entry.extend_from_slice(&u64::MAX.to_be_bytes());
            entry.extend_from_slice(b"cut off");
            store.engine.records.insert(event_key(99), entry).unwrap();
            store.engine.db.flush().unwrap();
        }
        let store = SledStore::open(dir.path(), TEST_CACHE).await.unwrap();
        let logged = store
            .events_after(&EventCursor::default(), 10)
            .await
            .unwrap();
        assert_eq!(logged.len(), 1);
        assert_eq!(logged[0].payload, b"kept");
        assert_eq!(
            store.get(&key).await.unwrap().unwrap().value,
            b"landed".to_vec()
        );
    }

    #[test]
    fn keys_decode_back_into_their_parts() {
        let key = StoreKey::new("acme", "alice@example.com", "google");
        assert_eq!(
            key.parts(),
            Some(("acme".into(), "alice@example.com".into(), "google".into()))
        );
        assert_eq!(StoreKey::from_bytes(vec![0, 9, b'a']).parts(), None);
        assert_eq!(StoreKey::tenant_prefix("acme").parts(), None);
    }

    #[test]
    fn keys_are_unambiguous() {
        assert_ne!(
            StoreKey::new("ab", "c", "d").as_bytes(),
            StoreKey::new("a", "bc", "d").as_bytes()
        );
    }
}
