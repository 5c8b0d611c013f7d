//! The replicated [`CredentialStore`]: etcd v3, for N vault replicas.
//!
//! # Design (DESIGN §5d)
//!
//! **Layout.** Under the configured prefix `P`: records at `P r <key>`,
//! bookkeeping at `P m <name>`, refresh claims at `P c <key>`, replica
//! heartbeats at `P h <replica>`. A record's [`Revision`] is its etcd
//! `mod_revision`: cluster-wide, strictly increasing, never reused.
//!
//! **Writes.** A compare-and-swap is one transaction comparing the key's
//! `mod_revision` (or `version == 0` for "absent"); its else-branch reads
//! the key, so a conflict returns what is stored now. etcd acknowledges only
//! after a majority fsynced the write. A lost reply (timeout, connection
//! reset: the outcome is unknown) is resolved by reading the key back:
//! sealed values carry a random nonce, so finding our exact bytes proves our
//! write landed. Past the write's patience it answers
//! `STORAGE_UNAVAILABLE` with its outcome unknown: etcd may still commit it.
//! Calls go round the members; a member that fails a call (refused, timed
//! out, or answering `UNAVAILABLE`) is left out for a while, then tried with
//! one call, so a frozen member costs one call its timeout per bench, not a
//! share of every call (`members.rs`). A read that failed so is tried once
//! more, on a member in good standing: reads change nothing, and without it
//! every read that met a member as it froze failed although a quorum could
//! answer.
//!
//! **Exactly one refresh across replicas.** Inside its in-process flight, a
//! replica creates the claim key with put-if-absent before calling the
//! provider; only the claim's creator calls. The claim's value names the
//! replica and the attempt, so a claim rides out a leader election as a
//! write does: a retry that finds its own value knows its lost reply won.
//! Its write-back and the claim's release are one transaction that also
//! compares the claim's revision (the fence): a claimant that lost its
//! claim cannot write. Waiters on other replicas watch the record and the
//! claim and re-read when either changes.
//! A claim is taken over only after `claim_takeover` has passed *on the
//! waiter's own clock* since it first saw that claim revision (the client-go
//! leader-election rule), never by a lease TTL that could expire under a slow
//! provider; the bound covers the upstream timeout, so a live claimant has
//! finished (or given up) by then. Takeovers are counted.
//!
//! **Coherent caches.** One watch of the prefix, opened from the last seen
//! revision + 1 after any break, feeds [`Change`]s to the broker's cache; a
//! compaction that outran the watch clears the caches (re-list). A cache hit
//! stays a memory read. Each replica writes a heartbeat every
//! `max_staleness / 4` and notes when it sees it come back through the
//! watch: events arrive in revision order, so every change committed before
//! that heartbeat has been applied. Past `max_staleness` without such a
//! round trip the replica is not fresh: it reads through to etcd (and
//! answers `STORAGE_UNAVAILABLE` if etcd cannot be reached) and `/readyz`
//! fails, until a heartbeat comes back.
//!
//! **Keys across replicas.** Fingerprints are recorded put-if-absent, so of
//! two replicas with different key material the second refuses to start.
//! Each replica publishes the key versions it can open (`P k <replica>`, at
//! start and after every reload); a primary promoted on one replica seals
//! new writes only once every live replica (heartbeat seen recently, on
//! this replica's clock) reports it can open it. Until then the previous
//! primary keeps sealing, and a rewrap to the new primary is refused.
//!
//! **Events.** A write that carries an event puts it at
//! `P e <at_ms, 20 digits><random>` in the same transaction as the record,
//! so both land or neither does. Its cursor position is the transaction's
//! revision: cluster-wide, strictly increasing, the same on every replica.
//! A reader asks for events with `mod_revision` above its cursor, sorted by
//! it; the key's time narrows that read to events written at most
//! [`CLOCK_SKEW`] before the cursor's own, so a resume reads recent history
//! only. Every event with a revision at or below a read's revision is in
//! that read, so paging from the last event seen leaves no gap. Replicas
//! wake their readers when the watch shows a new event; readers also
//! re-read on a timer, so a watch break delays but never loses one.
//!
//! **Failures.** etcd unreachable or without quorum: calls fail fast with
//! `STORAGE_UNAVAILABLE`; the process stays up (`/livez` passes) and
//! recovers when etcd does. A replica killed mid-refresh leaves its claim;
//! another takes it over after the bound. An etcd member killed: the client
//! fails over; acknowledged writes are on a majority.

mod members;
mod rpc;
mod watch;

use std::{
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::Duration,
};

use async_trait::async_trait;

use self::{
    members::Members,
    rpc::{
        compare::{CompareResult, CompareTarget, TargetUnion},
        kv_client::KvClient,
        request_op::Request as Op,
        response_op::Response as OpResponse,
        Compare, DeleteRangeRequest, PutRequest, RangeRequest, RangeResponse, RequestOp,
        TxnRequest, TxnResponse,
    },
    watch::Watcher,
};
use super::{
    CasOutcome, Change, ClaimOutcome, ClaimToken, CredentialStore, EventCursor, EventHorizon,
    LoggedEvent, NewEvent, Revision, StoreError, StoreKey, Versioned, Write,
};

/// How to reach the cluster and how fresh a replica must stay.
#[derive(Clone, Debug)]
pub struct EtcdSettings {
    /// `http://host:port` or `https://host:port`, one per member.
    pub endpoints: Vec<String>,
    /// Every key of this vault lives under it.
    pub prefix: Vec<u8>,
    pub dial_timeout: Duration,
    pub request_timeout: Duration,
    /// A replica that has not confirmed its view this recently reads
    /// through and is not ready.
    pub max_staleness: Duration,
    /// How long a waiter lets another replica's refresh claim stand.
    pub claim_takeover: Duration,
    /// PEM files for TLS to etcd; all optional.
    pub ca: Option<std::path::PathBuf>,
    pub cert: Option<std::path::PathBuf>,
    pub key: Option<std::path::PathBuf>,
}

const RECORDS: u8 = b'r';
const META: u8 = b'm';
const CLAIMS: u8 = b'c';
const HEARTBEATS: u8 = b'h';
const KEYS: u8 = b'k';
const EVENTS: u8 = b'e';
/// Bookkeeping name of the newest revision trimmed from the event log.
const EVENTS_TRIMMED: &str = "events.trimmed_through";
/// How far apart replicas' clocks may be: an event's key time can precede
/// that of an event logged before it by up to this much.
pub const CLOCK_SKEW: Duration = Duration::from_secs(300);
/// Events deleted per trim transaction.
const TRIM_BATCH: i64 = 1000;

/// The etcd-backed store.
pub struct EtcdStore {
    kv: KvClient<Members>,
    /// The transport under `kv`, asked whether a failed read can go
    /// elsewhere.
    members: Members,
    prefix: Vec<u8>,
    replica: String,
    watcher: Arc<Watcher>,
    claim_takeover: Duration,
    /// How long a write starts new tries after a transient failure (a
    /// leader election), each then given up to one more; a read retries
    /// for twice as long. The request timeout.
    write_patience: Duration,
    /// Numbers this replica's claim attempts: a claim's value is the
    /// replica and its attempt, so a retry can tell its own landed attempt
    /// from any other claim.
    claim_attempts: AtomicU64,
}

const RETRY_PAUSE: Duration = Duration::from_millis(100);
/// A read that found no member to answer it within two request timeouts.
const READ_TIMED_OUT: &str = "etcd: no member answered the read within two request timeouts";
/// A write that found no member to commit it within its patience and a
/// request timeout; its outcome is unknown.
const WRITE_TIMED_OUT: &str = "etcd: no member answered the write in time; it may have landed";

/// The one retry loop of etcd calls: sends `call`, and sends it again after
/// a failure whose outcome is unknown (a lost reply, no leader, leader
/// changed) while `may_retry` allows, until `deadline`; each try gets what
/// is left of it, and tries start at least [`RETRY_PAUSE`] apart, so one
/// turned away at once (no leader yet) waits and one that timed out goes
/// again now. With the answer, whether a try before it failed (and so may
/// have landed). A try cut off by the deadline fails with `timed_out`.
async fn patiently<T, Call, Answer>(
    deadline: tokio::time::Instant,
    timed_out: &'static str,
    may_retry: impl Fn() -> bool,
    mut call: Call,
) -> Result<(T, bool), StoreError>
where
    Call: FnMut() -> Answer,
    Answer: std::future::Future<Output = Result<T, rpc::Failed>>,
{
    let mut retried = false;
    loop {
        let tried = tokio::time::Instant::now();
        let failed = match tokio::time::timeout_at(deadline, call()).await {
            Ok(Ok(answer)) => return Ok((answer, retried)),
            Ok(Err(failed)) => failed,
            Err(_) => return Err(StoreError::Io(timed_out.into())),
        };
        let retry = failed.outcome_unknown()
            && may_retry()
            && tokio::time::Instant::now() + RETRY_PAUSE < deadline;
        if !retry {
            return Err(failed.into());
        }
        tracing::debug!("an etcd call failed with its outcome unknown; sending it again");
        retried = true;
        tokio::time::sleep_until(tried + RETRY_PAUSE).await;
    }
}

impl EtcdStore {
    /// At most `limit` keys from `start` to the end of `base`'s range;
    /// `shape` adds an order or a revision bound.
    async fn range_from(
        &self,
        start: Vec<u8>,
        base: &[u8],
        limit: usize,
        shape: RangeRequest,
    ) -> Result<Vec<rpc::mvccpb::KeyValue>, StoreError> {
        let request = RangeRequest {
            key: start,
            range_end: prefix_end(base),
            limit: i64::try_from(limit).unwrap_or(i64::MAX),
            ..shape
        };
        Ok(self.range(request).await?.kvs)
    }

    /// Every read goes through here. A read whose member failed it in a way
    /// that leaves the member in doubt (timed out, refused, no leader,
    /// leader changed: the failures that leave a write's outcome unknown)
    /// is tried again, on the member next in turn, while one is in good
    /// standing, until two request timeouts have passed since the read
    /// began; each try gets what is left of them. A read changes nothing,
    /// so trying it again is safe. A caller that met a frozen member gets
    /// an answer after one timeout. So does one whose first try an election
    /// turned away and whose second met the frozen leader before anyone
    /// knew it was frozen: with one retry only, that read failed. No read
    /// waits longer than two timeouts, as before.
    async fn range(&self, request: RangeRequest) -> Result<RangeResponse, StoreError> {
        let deadline = tokio::time::Instant::now() + self.write_patience * 2;
        let read = || {
            let (mut kv, request) = (self.kv.clone(), request.clone());
            async move { Ok(kv.range(request).await?.into_inner()) }
        };
        let in_good_standing = || self.members.any_in_good_standing();
        let (response, _) = patiently(deadline, READ_TIMED_OUT, in_good_standing, read).await?;
        Ok(response)
    }

    /// Connects (lazily: a cluster that is down now is retried per call)
    /// and starts the watch and the heartbeat.
    pub async fn open(settings: &EtcdSettings) -> Result<Self, StoreError> {
        let members = rpc::members(settings)?;
        let replica = rpc::replica_id();
        let kv = KvClient::new(members.clone());
        let watcher = Watcher::start(
            members.clone(),
            kv.clone(),
            settings.prefix.clone(),
            replica.clone(),
            settings.max_staleness,
        );
        Ok(Self {
            kv,
            members,
            prefix: settings.prefix.clone(),
            replica,
            watcher,
            claim_takeover: settings.claim_takeover,
            write_patience: settings.request_timeout,
            claim_attempts: AtomicU64::new(0),
        })
    }

    fn key(&self, space: u8, name: &[u8]) -> Vec<u8> {
        let mut key = Vec::with_capacity(self.prefix.len() + 1 + name.len());
        key.extend_from_slice(&self.prefix);
        key.push(space);
        key.extend_from_slice(name);
        key
    }

    async fn range_one(&self, key: Vec<u8>) -> Result<Option<Versioned>, StoreError> {
        let response = self
            .range(RangeRequest {
                key,
                ..Default::default()
            })
            .await?;
        Ok(response.kvs.into_iter().next().map(|kv| Versioned {
            revision: Revision(u64::try_from(kv.mod_revision).unwrap_or(0)),
            value: kv.value,
        }))
    }

    async fn txn(&self, request: TxnRequest) -> Result<TxnResponse, rpc::Failed> {
        Ok(self.kv.clone().txn(request).await?.into_inner())
    }

    /// The event's key: its time first, so trims and resumes can cut the
    /// log by time; a random tail, so two events never share a key.
    fn event_key(&self, at_ms: u64) -> Vec<u8> {
        use rand::RngCore;
        let mut tail = [0u8; 8];
        rand::rngs::OsRng.fill_bytes(&mut tail);
        self.key(
            EVENTS,
            format!("{at_ms:020}{}", hex::encode(tail)).as_bytes(),
        )
    }

    /// The compare-and-swap, with `fence` as an extra condition (the claim
    /// that entitles a refresh's write-back) released in the same write,
    /// and the event logged in it.
    async fn swap(
        &self,
        key: &StoreKey,
        expected: Option<Revision>,
        value: Option<Vec<u8>>,
        fence: Option<&ClaimToken>,
        event: Option<NewEvent>,
    ) -> Result<CasOutcome, StoreError> {
        let record = self.key(RECORDS, key.as_bytes());
        let mut compare = vec![revision_is(&record, expected)];
        let mut success = vec![match &value {
            Some(value) => put(record.clone(), value.clone()),
            None => delete(record.clone()),
        }];
        if let Some(fence) = fence {
            let claim = self.key(CLAIMS, key.as_bytes());
            compare.push(revision_is(&claim, Some(fence.revision)));
            success.push(delete(claim));
        }
        if let Some(event) = event {
            success.push(put(self.event_key(event.at_ms), event.payload));
        }
        let request = TxnRequest {
            compare,
            success,
            failure: vec![range(record.clone())],
        };
        // A refresh's write-back carries a rotated refresh token that exists
        // nowhere else: it rides out a leader election rather than lose it.
        let patience = match fence {
            Some(_) => self.write_patience * 3,
            None => self.write_patience,
        };
        let (response, retried) = self.txn_patiently(request, patience).await?;
        if response.succeeded {
            return Ok(CasOutcome::Written(value.map(|_| revision_of(&response))));
        }
        let current = first_kv(response);
        // An earlier attempt whose reply was lost landed: our exact bytes
        // are there (sealed values are unique: random nonce), or the key we
        // deleted is gone.
        match (&value, &current) {
            (Some(ours), Some(stored)) if retried && stored.value == *ours => {
                return Ok(CasOutcome::Written(Some(stored.revision)))
            }
            (None, None) if retried => return Ok(CasOutcome::Written(None)),
            _ => {}
        }
        // Our record is as expected, so the fence failed.
        if fence.is_some() && current.as_ref().map(|v| v.revision) == expected {
            return Err(StoreError::ClaimLost);
        }
        Ok(CasOutcome::Conflict(current))
    }

    /// Sends a transaction, and sends it again while it fails in a way that
    /// leaves its outcome unknown (a lost reply, no leader, leader
    /// changed), until `patience` and one request timeout have passed;
    /// each try gets what is left of them, and tries start at least a pause
    /// apart. The same compare decides each attempt, so a landed one is
    /// never applied twice; `true` with the response says an earlier
    /// attempt may have landed, for the caller's read-back.
    ///
    /// That bound is the worst case as it was when tries started only
    /// within `patience`: one started just before it ended could take a
    /// whole timeout. Tries may now start in that last timeout too. Before,
    /// a write that a healthy member forwarded to a frozen leader timed out
    /// as its patience ended, and failed; now it is sent again, to a member
    /// that answers.
    async fn txn_patiently(
        &self,
        request: TxnRequest,
        patience: Duration,
    ) -> Result<(TxnResponse, bool), StoreError> {
        let deadline = tokio::time::Instant::now() + patience + self.write_patience;
        let write = || self.txn(request.clone());
        patiently(deadline, WRITE_TIMED_OUT, || true, write).await
    }

    /// Creates the claim (`held: None`) or takes over the one at `held`.
    /// It rides out a leader election as a write does: the claim's value
    /// names this attempt, so when a try's reply was lost and the retry
    /// finds the claim taken, a claim holding that value is this attempt's,
    /// won at its revision.
    async fn claim_with(
        &self,
        key: &StoreKey,
        held: Option<Revision>,
    ) -> Result<ClaimOutcome, StoreError> {
        let claim = self.key(CLAIMS, key.as_bytes());
        let attempt = self.claim_attempts.fetch_add(1, Ordering::Relaxed);
        let value = format!("{}#{attempt}", self.replica).into_bytes();
        let request = TxnRequest {
            compare: vec![revision_is(&claim, held)],
            success: vec![put(claim.clone(), value.clone())],
            failure: vec![range(claim)],
        };
        let (response, _) = self.txn_patiently(request, self.write_patience).await?;
        Ok(claim_outcome(response, &value))
    }
}

/// What a claim's transaction came to, for the attempt that wrote `ours`.
fn claim_outcome(response: TxnResponse, ours: &[u8]) -> ClaimOutcome {
    if response.succeeded {
        return ClaimOutcome::Won(Some(ClaimToken {
            revision: revision_of(&response),
        }));
    }
    match first_kv(response) {
        // An earlier try of this attempt landed and its reply was lost.
        Some(current) if current.value == ours => ClaimOutcome::Won(Some(ClaimToken {
            revision: current.revision,
        })),
        Some(current) => ClaimOutcome::Held {
            revision: current.revision,
        },
        // Released between our compare and our read: try again.
        None => ClaimOutcome::Held {
            revision: Revision(0),
        },
    }
}

fn revision_is(key: &[u8], expected: Option<Revision>) -> Compare {
    match expected {
        None => Compare {
            result: CompareResult::Equal as i32,
            target: CompareTarget::Version as i32,
            key: key.to_vec(),
            target_union: Some(TargetUnion::Version(0)),
            range_end: Vec::new(),
        },
        Some(revision) => Compare {
            result: CompareResult::Equal as i32,
            target: CompareTarget::Mod as i32,
            key: key.to_vec(),
            target_union: Some(TargetUnion::ModRevision(
                i64::try_from(revision.0).unwrap_or(i64::MAX),
            )),
            range_end: Vec::new(),
        },
    }
}

fn put(key: Vec<u8>, value: Vec<u8>) -> RequestOp {
    RequestOp {
        request: Some(Op::RequestPut(PutRequest {
            key,
            value,
            ..Default::default()
        })),
    }
}

fn delete(key: Vec<u8>) -> RequestOp {
    RequestOp {
        request: Some(Op::RequestDeleteRange(DeleteRangeRequest {
            key,
            ..Default::default()
        })),
    }
}

fn range(key: Vec<u8>) -> RequestOp {
    RequestOp {
        request: Some(Op::RequestRange(RangeRequest {
            key,
            ..Default::default()
        })),
    }
}

/// The revision a transaction committed at (its writes' `mod_revision`).
fn revision_of(response: &TxnResponse) -> Revision {
    Revision(
        response
            .header
            .as_ref()
            .map_or(0, |h| u64::try_from(h.revision).unwrap_or(0)),
    )
}

fn first_kv(response: TxnResponse) -> Option<Versioned> {
    response
        .responses
        .into_iter()
        .find_map(|op| match op.response {
            Some(OpResponse::ResponseRange(range)) => range.kvs.into_iter().next(),
            _ => None,
        })
        .map(|kv| Versioned {
            revision: Revision(u64::try_from(kv.mod_revision).unwrap_or(0)),
            value: kv.value,
        })
}

/// The time in an event key (after `base`, the events prefix).
fn event_time(key: &[u8], base: usize) -> u64 {
    key.get(base..base + 20)
        .and_then(|digits| std::str::from_utf8(digits).ok())
        .and_then(|digits| digits.parse().ok())
        .unwrap_or(0)
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// `key` with its last byte incremented: the end of the range of keys that
/// start with `key` (etcd's prefix convention).
fn prefix_end(key: &[u8]) -> Vec<u8> {
    let mut end = key.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    // All 0xff: to the end of the keyspace.
    vec![0]
}

#[async_trait]
impl CredentialStore for EtcdStore {
    async fn get(&self, key: &StoreKey) -> Result<Option<Versioned>, StoreError> {
        self.range_one(self.key(RECORDS, key.as_bytes())).await
    }

    async fn write(&self, key: &StoreKey, write: Write<'_>) -> Result<CasOutcome, StoreError> {
        // Every acknowledged etcd write is on a majority's disk: `durable`
        // costs nothing extra here.
        self.swap(key, write.expected, write.value, write.fence, write.event)
            .await
    }

    async fn scan(
        &self,
        prefix: &StoreKey,
        after: Option<&StoreKey>,
        limit: usize,
    ) -> Result<Vec<(StoreKey, Versioned)>, StoreError> {
        let base = self.key(RECORDS, prefix.as_bytes());
        let start = match after {
            Some(after) if after.as_bytes() >= prefix.as_bytes() => {
                // Strictly after: the smallest key greater than `after`.
                let mut start = self.key(RECORDS, after.as_bytes());
                start.push(0);
                start
            }
            _ => base.clone(),
        };
        let kvs = self
            .range_from(start, &base, limit, RangeRequest::default())
            .await?;
        let strip = self.prefix.len() + 1;
        Ok(kvs
            .into_iter()
            .filter_map(|kv| {
                let key = StoreKey::from_bytes(kv.key.get(strip..)?.to_vec());
                let revision = Revision(u64::try_from(kv.mod_revision).unwrap_or(0));
                Some((
                    key,
                    Versioned {
                        revision,
                        value: kv.value,
                    },
                ))
            })
            .collect())
    }

    async fn get_meta(&self, name: &str) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self
            .range_one(self.key(META, name.as_bytes()))
            .await?
            .map(|v| v.value))
    }

    async fn put_meta(&self, name: &str, value: Vec<u8>) -> Result<(), StoreError> {
        self.kv
            .clone()
            .put(PutRequest {
                key: self.key(META, name.as_bytes()),
                value,
                ..Default::default()
            })
            .await
            .map_err(rpc::status_error)?;
        Ok(())
    }

    async fn put_meta_if_absent(
        &self,
        name: &str,
        value: Vec<u8>,
    ) -> Result<Option<Vec<u8>>, StoreError> {
        let key = self.key(META, name.as_bytes());
        let request = TxnRequest {
            compare: vec![revision_is(&key, None)],
            success: vec![put(key.clone(), value.clone())],
            failure: vec![range(key)],
        };
        // A replica's first write at start-up: one call failed in the
        // transport must not fail the start, so it rides out what `swap`
        // rides out.
        let (response, retried) = self.txn_patiently(request, self.write_patience).await?;
        if response.succeeded {
            return Ok(None);
        }
        let there = first_kv(response).map(|v| v.value);
        // An earlier attempt whose reply was lost landed (or another
        // replica wrote the same value, which the caller reads alike).
        Ok(if retried && there.as_ref() == Some(&value) {
            None
        } else {
            there
        })
    }

    async fn all_meta(&self) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        let base = self.key(META, b"");
        let response = self
            .range(RangeRequest {
                key: base.clone(),
                range_end: prefix_end(&base),
                ..Default::default()
            })
            .await?;
        response
            .kvs
            .into_iter()
            .map(|kv| {
                let name = kv.key.get(base.len()..).unwrap_or_default().to_vec();
                let name = String::from_utf8(name)
                    .map_err(|_| StoreError::Malformed("meta name is not utf-8"))?;
                Ok((name, kv.value))
            })
            .collect()
    }

    fn ready(&self) -> bool {
        self.watcher.fresh()
    }

    fn fresh(&self) -> bool {
        self.watcher.fresh()
    }

    fn changes(&self) -> Option<tokio::sync::broadcast::Receiver<Change>> {
        Some(self.watcher.subscribe())
    }

    async fn claim(&self, key: &StoreKey) -> Result<ClaimOutcome, StoreError> {
        self.claim_with(key, None).await
    }

    async fn take_over(&self, key: &StoreKey, held: Revision) -> Result<ClaimOutcome, StoreError> {
        self.claim_with(key, Some(held)).await
    }

    async fn release(&self, key: &StoreKey, claim: &ClaimToken) -> Result<(), StoreError> {
        let claim_key = self.key(CLAIMS, key.as_bytes());
        self.txn(TxnRequest {
            compare: vec![revision_is(&claim_key, Some(claim.revision))],
            success: vec![delete(claim_key)],
            failure: Vec::new(),
        })
        .await?;
        Ok(())
    }

    fn claim_takeover(&self) -> Duration {
        self.claim_takeover
    }

    async fn publish_key_versions(&self, versions: Vec<u32>) -> Result<(), StoreError> {
        let text: Vec<String> = versions.iter().map(u32::to_string).collect();
        self.kv
            .clone()
            .put(PutRequest {
                key: self.key(KEYS, self.replica.as_bytes()),
                value: text.join(",").into_bytes(),
                ..Default::default()
            })
            .await
            .map_err(rpc::status_error)?;
        Ok(())
    }

    fn key_versions_everyone_opens(&self) -> Option<std::collections::BTreeSet<u32>> {
        self.watcher.everyone_opens()
    }

    async fn events_after(
        &self,
        after: &EventCursor,
        limit: usize,
    ) -> Result<Vec<LoggedEvent>, StoreError> {
        let base = self.key(EVENTS, b"");
        let from_ms = after
            .at_ms
            .saturating_sub(u64::try_from(CLOCK_SKEW.as_millis()).unwrap_or(u64::MAX));
        let mut start = base.clone();
        if after.position > 0 {
            start.extend_from_slice(format!("{from_ms:020}").as_bytes());
        }
        let in_revision_order = RangeRequest {
            sort_order: rpc::range_request::SortOrder::Ascend as i32,
            sort_target: rpc::range_request::SortTarget::Mod as i32,
            min_mod_revision: i64::try_from(after.position.saturating_add(1)).unwrap_or(i64::MAX),
            ..Default::default()
        };
        let kvs = self
            .range_from(start, &base, limit, in_revision_order)
            .await?;
        Ok(kvs
            .into_iter()
            .map(|kv| LoggedEvent {
                cursor: EventCursor {
                    position: u64::try_from(kv.mod_revision).unwrap_or(0),
                    at_ms: event_time(&kv.key, base.len()),
                },
                payload: kv.value,
            })
            .collect())
    }

    async fn event_horizon(&self) -> Result<EventHorizon, StoreError> {
        // The cluster's revision now: every event logged later has a higher
        // one. Its time is this replica's clock, which is what a later
        // resume narrows by (less the skew bound).
        let response = self
            .range(RangeRequest {
                key: self.key(META, EVENTS_TRIMMED.as_bytes()),
                ..Default::default()
            })
            .await?;
        let revision = response.header.as_ref().map_or(0, |h| h.revision);
        let trimmed_through = response
            .kvs
            .first()
            .and_then(|kv| kv.value.as_slice().try_into().ok())
            .map_or(0, u64::from_be_bytes);
        Ok(EventHorizon {
            head: EventCursor {
                position: u64::try_from(revision).unwrap_or(0),
                at_ms: now_ms(),
            },
            trimmed_through,
        })
    }

    fn event_signal(&self) -> tokio::sync::watch::Receiver<u64> {
        self.watcher.event_signal()
    }

    async fn trim_events(&self, before_ms: u64) -> Result<u64, StoreError> {
        let base = self.key(EVENTS, b"");
        let mut end = base.clone();
        end.extend_from_slice(format!("{before_ms:020}").as_bytes());
        let mut trimmed = 0u64;
        loop {
            let old = self
                .range(RangeRequest {
                    key: base.clone(),
                    range_end: end.clone(),
                    limit: TRIM_BATCH,
                    keys_only: true,
                    ..Default::default()
                })
                .await?;
            let Some(last) = old.kvs.last().map(|kv| kv.key.clone()) else {
                return Ok(trimmed);
            };
            let newest = old.kvs.iter().map(|kv| kv.mod_revision).max().unwrap_or(0);
            let newest = u64::try_from(newest).unwrap_or(0);
            let mark = self.key(META, EVENTS_TRIMMED.as_bytes());
            let marked = self
                .range_one(mark.clone())
                .await?
                .and_then(|v| v.value.as_slice().try_into().ok())
                .map_or(0, u64::from_be_bytes);
            let mut last_end = last;
            last_end.push(0);
            // The mark only moves forward, and with the deletion.
            self.txn(TxnRequest {
                compare: Vec::new(),
                success: vec![
                    RequestOp {
                        request: Some(Op::RequestDeleteRange(DeleteRangeRequest {
                            key: base.clone(),
                            range_end: last_end,
                            ..Default::default()
                        })),
                    },
                    put(mark, newest.max(marked).to_be_bytes().to_vec()),
                ],
                failure: Vec::new(),
            })
            .await?;
            trimmed += u64::try_from(old.kvs.len()).unwrap_or(0);
            if !old.more {
                return Ok(trimmed);
            }
        }
    }

    async fn flush(&self) -> Result<(), StoreError> {
        // Every acknowledged write is on a majority's disk already.
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_ends_follow_etcd() {
        assert_eq!(prefix_end(b"/a"), b"/b");
        assert_eq!(prefix_end(b"a\xff"), b"b");
        assert_eq!(prefix_end(b"\xff\xff"), vec![0]);
    }

    /// A claim transaction's answer: whether it wrote, at `revision`, or
    /// found the claim holding `value` at `revision`.
    fn answer(succeeded: bool, revision: i64, value: Option<&[u8]>) -> TxnResponse {
        let kvs = value
            .map(|value| rpc::mvccpb::KeyValue {
                value: value.to_vec(),
                mod_revision: revision,
                ..Default::default()
            })
            .into_iter()
            .collect();
        TxnResponse {
            header: Some(rpc::ResponseHeader {
                revision,
                ..Default::default()
            }),
            succeeded,
            responses: if succeeded {
                Vec::new()
            } else {
                vec![rpc::ResponseOp {
                    response: Some(OpResponse::ResponseRange(RangeResponse {
                        kvs,
                        ..Default::default()
                    })),
                }]
            },
        }
    }

    fn won_at(revision: u64) -> ClaimOutcome {
        ClaimOutcome::Won(Some(ClaimToken {
            revision: Revision(revision),
        }))
    }

    #[test]
    fn a_claim_found_holding_this_attempts_value_was_won_by_an_earlier_try() {
        let ours = b"replica-1-ab#7";
        assert_eq!(claim_outcome(answer(true, 40, None), ours), won_at(40));
        // The first try landed at 41 and its reply was lost; the retry's
        // compare failed on it.
        assert_eq!(
            claim_outcome(answer(false, 41, Some(ours)), ours),
            won_at(41)
        );
        // The same replica's other attempt, or another replica, holds it.
        for theirs in [
            &b"replica-1-ab#6"[..],
            b"replica-2-cd#7",
            b"replica-1-ab#70",
        ] {
            assert_eq!(
                claim_outcome(answer(false, 45, Some(theirs)), ours),
                ClaimOutcome::Held {
                    revision: Revision(45)
                }
            );
        }
        assert_eq!(
            claim_outcome(answer(false, 45, None), ours),
            ClaimOutcome::Held {
                revision: Revision(0)
            }
        );
    }
}
