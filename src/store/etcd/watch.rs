//! One watch of the vault's prefix, kept open for the life of the process:
//! it turns etcd events into [`Change`]s for the caches and waiters, and
//! measures freshness with a heartbeat seen back through it.
//!
//! The watch is re-opened from the last seen revision + 1 after any break,
//! so no event is missed; if etcd compacted past that revision, every cache
//! is cleared ([`Change::Reset`]) and the watch starts from now.
//!
//! A watch whose member froze does not break: its connection stays open
//! and it just says nothing, until HTTP/2 keep-alive gives up on it (up to
//! 15 s). Silence alone does not show it: during a leader election nothing
//! is written, and every watch is silent. What does is a heartbeat the
//! cluster acknowledged that has not come back through the watch within
//! half of `max_staleness`: the watch is then counted against its member
//! and re-opened on another, and the replica is not fresh for about that
//! long, not for the keep-alive's. Heartbeats are sent without waiting for
//! the one before, for the same reason: one stuck on a frozen member must
//! not hold back the next, which goes to another.

use std::{
    collections::HashMap,
    sync::{
        atomic::{AtomicI64, AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use tokio::sync::{broadcast, mpsc};
use tokio_stream::wrappers::ReceiverStream;

use super::{
    members::{AnsweredBy, Members},
    prefix_end,
    rpc::{
        kv_client::KvClient, mvccpb::event::EventType, watch_client::WatchClient,
        watch_request::RequestUnion, PutRequest, RangeRequest, WatchCreateRequest, WatchRequest,
        WatchResponse,
    },
    CLAIMS, EVENTS, HEARTBEATS, KEYS, RECORDS,
};
use crate::store::{Change, Revision, StoreKey};

/// Changes queued per subscriber before a slow one starts missing them (it
/// then sees `Lagged` and treats it as a reset).
const CHANGES_BUFFER: usize = 4096;
const RECONNECT_PAUSE: Duration = Duration::from_millis(200);
/// The least time an acknowledged heartbeat is given to come back through
/// the watch, whatever `max_staleness` says.
const GRACE_FLOOR: Duration = Duration::from_millis(50);

/// A heartbeat written and not yet seen back through the watch.
struct Heartbeat {
    sent: Instant,
    /// When the cluster acknowledged it: from then on the watch owes it.
    acknowledged: Option<Instant>,
}

/// The watch's shared state.
pub struct Watcher {
    changes: broadcast::Sender<Change>,
    /// When the last heartbeat seen back through the watch was written.
    confirmed: Mutex<Option<Instant>>,
    /// Heartbeats written and not yet seen, by sequence number.
    pending: Mutex<HashMap<u64, Heartbeat>>,
    sequence: AtomicU64,
    last_revision: AtomicI64,
    max_staleness: Duration,
    /// Other replicas as this one sees them: the key versions each can
    /// open, and when its heartbeat last moved (on this process's clock).
    replicas: Mutex<HashMap<String, ReplicaView>>,
    /// The revision of the newest event seen: wakes event readers.
    events: tokio::sync::watch::Sender<u64>,
}

#[derive(Default)]
struct ReplicaView {
    versions: Option<std::collections::BTreeSet<u32>>,
    seen: Option<Instant>,
}

impl Watcher {
    /// Starts the watch and the heartbeat; both run until the process ends.
    pub fn start(
        members: Members,
        kv: KvClient<Members>,
        prefix: Vec<u8>,
        replica: String,
        max_staleness: Duration,
    ) -> Arc<Self> {
        let (changes, _) = broadcast::channel(CHANGES_BUFFER);
        let watcher = Arc::new(Self {
            changes,
            confirmed: Mutex::new(None),
            pending: Mutex::new(HashMap::new()),
            sequence: AtomicU64::new(0),
            last_revision: AtomicI64::new(0),
            max_staleness,
            replicas: Mutex::new(HashMap::new()),
            events: tokio::sync::watch::Sender::new(0),
        });
        let mut heartbeat_key = prefix.clone();
        heartbeat_key.push(HEARTBEATS);
        heartbeat_key.extend_from_slice(replica.as_bytes());
        tokio::spawn(watch_loop(
            Arc::downgrade(&watcher),
            members,
            kv.clone(),
            prefix,
            heartbeat_key.clone(),
        ));
        tokio::spawn(heartbeat_loop(Arc::downgrade(&watcher), kv, heartbeat_key));
        watcher
    }

    pub fn event_signal(&self) -> tokio::sync::watch::Receiver<u64> {
        self.events.subscribe()
    }

    pub fn subscribe(&self) -> broadcast::Receiver<Change> {
        self.changes.subscribe()
    }

    /// Whether every change committed more than `max_staleness` ago has
    /// been seen.
    pub fn fresh(&self) -> bool {
        self.confirmed
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_some_and(|at| at.elapsed() < self.max_staleness)
    }

    /// The key versions every live replica can open (`None` until some
    /// replica has said). Live: its heartbeat moved within three
    /// staleness bounds, as this process's own clock measures.
    pub fn everyone_opens(&self) -> Option<std::collections::BTreeSet<u32>> {
        let live_for = (self.max_staleness * 3).max(Duration::from_secs(3));
        let replicas = self.replicas.lock().unwrap_or_else(|e| e.into_inner());
        replicas
            .values()
            .filter(|r| r.seen.is_some_and(|at| at.elapsed() < live_for))
            .filter_map(|r| r.versions.clone())
            .reduce(|a, b| a.intersection(&b).copied().collect())
    }

    /// A replica's published key versions or heartbeat, from the watch or
    /// the initial listing.
    fn replica_event(&self, space: u8, name: &[u8], value: &[u8]) {
        let Ok(replica) = std::str::from_utf8(name) else {
            return;
        };
        let mut replicas = self.replicas.lock().unwrap_or_else(|e| e.into_inner());
        let view = replicas.entry(replica.to_owned()).or_default();
        view.seen = Some(Instant::now());
        if space == KEYS {
            view.versions = std::str::from_utf8(value)
                .ok()
                .map(|text| text.split(',').filter_map(|v| v.parse().ok()).collect());
        }
    }

    /// The cluster acknowledged heartbeat `sequence`: from now on the
    /// watch owes it ([`Watcher::watch_lost`]). One no longer pending was
    /// seen already: the watch may show a write before its reply arrives.
    fn heartbeat_acknowledged(&self, sequence: u64) {
        let mut pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(heartbeat) = pending.get_mut(&sequence) {
            heartbeat.acknowledged = Some(Instant::now());
        }
    }

    /// Whether the watch opened at `opened` has lost the cluster: a
    /// heartbeat acknowledged at least `grace` ago (and at least `grace`
    /// after the watch opened, which replays what it missed) has not come
    /// back through it.
    fn watch_lost(&self, grace: Duration, opened: Instant) -> bool {
        self.pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .filter_map(|heartbeat| heartbeat.acknowledged)
            .min()
            .is_some_and(|at| at.max(opened).elapsed() >= grace)
    }

    fn heartbeat_seen(&self, value: &[u8]) {
        let Ok(bytes) = <[u8; 8]>::try_from(value) else {
            return;
        };
        let sequence = u64::from_be_bytes(bytes);
        let sent = {
            let mut pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
            let sent = pending.remove(&sequence).map(|heartbeat| heartbeat.sent);
            // Older heartbeats that never came back are superseded.
            pending.retain(|s, _| *s > sequence);
            sent
        };
        if let Some(sent) = sent {
            let mut confirmed = self.confirmed.lock().unwrap_or_else(|e| e.into_inner());
            if confirmed.is_none_or(|at| at < sent) {
                *confirmed = Some(sent);
            }
        }
    }

    fn apply(&self, response: WatchResponse, prefix: &[u8], heartbeat_key: &[u8]) {
        for event in response.events {
            let Some(kv) = event.kv else { continue };
            self.last_revision
                .fetch_max(kv.mod_revision, Ordering::SeqCst);
            if kv.key == heartbeat_key {
                self.heartbeat_seen(&kv.value);
            }
            let Some((&space, name)) = kv.key.get(prefix.len()..).and_then(|k| k.split_first())
            else {
                continue;
            };
            if space == EVENTS {
                let revision = u64::try_from(kv.mod_revision).unwrap_or(0);
                self.events.send_if_modified(|seen| {
                    let moved = revision > *seen;
                    *seen = (*seen).max(revision);
                    moved
                });
                continue;
            }
            if space == HEARTBEATS || space == KEYS {
                if EventType::try_from(event.r#type) == Ok(EventType::Put) {
                    self.replica_event(space, name, &kv.value);
                }
                continue;
            }
            let key = StoreKey::from_bytes(name.to_vec());
            let change = match (space, EventType::try_from(event.r#type)) {
                (RECORDS, Ok(EventType::Put)) => Change::Record {
                    key,
                    revision: Some(Revision(u64::try_from(kv.mod_revision).unwrap_or(0))),
                },
                (RECORDS, _) => Change::Record {
                    key,
                    revision: None,
                },
                (CLAIMS, Ok(EventType::Delete)) => Change::ClaimReleased { key },
                _ => continue,
            };
            let _ = self.changes.send(change);
        }
        if let Some(header) = response.header {
            self.last_revision
                .fetch_max(header.revision, Ordering::SeqCst);
        }
    }
}

async fn watch_loop(
    watcher: std::sync::Weak<Watcher>,
    members: Members,
    mut kv: KvClient<Members>,
    prefix: Vec<u8>,
    heartbeat_key: Vec<u8>,
) {
    let mut client = WatchClient::new(members.clone());
    loop {
        let Some(state) = watcher.upgrade() else {
            return;
        };
        let mut start = state.last_revision.load(Ordering::SeqCst) + 1;
        if start == 1 {
            let Some(now) = first_open(&state, &mut kv, &prefix).await else {
                drop(state);
                tokio::time::sleep(RECONNECT_PAUSE).await;
                continue;
            };
            start = now + 1;
        }
        let (tx, rx) = mpsc::channel(1);
        let _ = tx
            .send(WatchRequest {
                request_union: Some(RequestUnion::CreateRequest(WatchCreateRequest {
                    key: prefix.clone(),
                    range_end: prefix_end(&prefix),
                    start_revision: start,
                    progress_notify: true,
                    ..Default::default()
                })),
            })
            .await;
        let grace = (state.max_staleness / 2).max(GRACE_FLOOR);
        drop(state);
        let (answered, stream) = match client.watch(ReceiverStream::new(rx)).await {
            Ok(stream) => (
                stream.extensions().get::<AnsweredBy>().copied(),
                stream.into_inner(),
            ),
            Err(_) => {
                tokio::time::sleep(RECONNECT_PAUSE).await;
                continue;
            }
        };
        let lost = follow(&watcher, stream, &prefix, &heartbeat_key, grace).await;
        // The request side stayed open until the stream ended.
        drop(tx);
        match (lost, answered) {
            (true, Some(answered)) => {
                tracing::warn!(
                    "store watch missed an acknowledged heartbeat; reopening it on another etcd member"
                );
                // Benched, so the reopened watch goes to another member at
                // once: every pause here is time the replica is not fresh.
                members.went_silent(answered);
            }
            _ => tokio::time::sleep(RECONNECT_PAUSE).await,
        }
    }
}

/// Before the first open, which is from now (the caches start empty):
/// learns the replicas already there; answers the revision to watch after.
async fn first_open(state: &Watcher, kv: &mut KvClient<Members>, prefix: &[u8]) -> Option<i64> {
    let mut replicas = prefix.to_vec();
    replicas.push(KEYS);
    let response = kv
        .range(RangeRequest {
            key: replicas.clone(),
            range_end: prefix_end(&replicas),
            ..Default::default()
        })
        .await
        .ok()?
        .into_inner();
    for kv in &response.kvs {
        if let Some(name) = kv.key.get(replicas.len()..) {
            state.replica_event(KEYS, name, &kv.value);
        }
    }
    let now = response.header.map_or(0, |h| h.revision);
    state.last_revision.fetch_max(now, Ordering::SeqCst);
    Some(now)
}

/// Applies one watch stream's responses until it breaks, or until it has
/// lost the cluster (an acknowledged heartbeat missing for `grace`);
/// answers whether it lost it.
async fn follow(
    watcher: &std::sync::Weak<Watcher>,
    mut stream: tonic::Streaming<WatchResponse>,
    prefix: &[u8],
    heartbeat_key: &[u8],
    grace: Duration,
) -> bool {
    let opened = Instant::now();
    let every = grace / 4;
    let mut check = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
    check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let response = tokio::select! {
            message = stream.message() => match message {
                Ok(Some(response)) => response,
                _ => return false,
            },
            _ = check.tick() => {
                match watcher.upgrade() {
                    Some(state) if state.watch_lost(grace, opened) => return true,
                    Some(_) => continue,
                    None => return false,
                }
            }
        };
        let Some(state) = watcher.upgrade() else {
            return false;
        };
        if response.compact_revision > 0 || response.canceled {
            // History we needed is gone: forget every cached entry and
            // follow from the compaction point on.
            tracing::warn!(
                compact_revision = response.compact_revision,
                "store watch fell behind a compaction; caches cleared"
            );
            state
                .last_revision
                .fetch_max(response.compact_revision, Ordering::SeqCst);
            let _ = state.changes.send(Change::Reset);
            return false;
        }
        state.apply(response, prefix, heartbeat_key);
    }
}

async fn heartbeat_loop(watcher: std::sync::Weak<Watcher>, kv: KvClient<Members>, key: Vec<u8>) {
    loop {
        let Some(state) = watcher.upgrade() else {
            return;
        };
        let every = (state.max_staleness / 4).max(Duration::from_millis(20));
        let sequence = state.sequence.fetch_add(1, Ordering::SeqCst) + 1;
        {
            let mut pending = state.pending.lock().unwrap_or_else(|e| e.into_inner());
            // While the watch is broken nothing comes back: keep the newest.
            if pending.len() > 64 {
                pending.retain(|s, _| *s + 32 > sequence);
            }
            pending.insert(
                sequence,
                Heartbeat {
                    sent: Instant::now(),
                    acknowledged: None,
                },
            );
        }
        drop(state);
        // Not awaited here: a put stuck on a frozen member waits out its
        // request timeout on its own, and the next heartbeat goes out on
        // time, to the next member in turn.
        let (mut kv, watcher) = (kv.clone(), watcher.clone());
        let put = PutRequest {
            key: key.clone(),
            value: sequence.to_be_bytes().to_vec(),
            ..Default::default()
        };
        tokio::spawn(async move {
            if kv.put(put).await.is_ok() {
                if let Some(state) = watcher.upgrade() {
                    state.heartbeat_acknowledged(sequence);
                }
            }
        });
        tokio::time::sleep(every).await;
    }
}
