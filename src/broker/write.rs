//! The one write path. Every change to a credential (Deposit, Revoke, a
//! refresh write-back, a reauth mark, the rewrap of one record) goes through
//! [`Broker::write`], which:
//!
//! 1. takes the credential's write lock (so writers of one credential queue
//!    instead of racing, and a rewrap never loses a concurrent write);
//! 2. reads the stored value and asks the caller's `decide` what to do with
//!    it: put a record, delete, or leave it;
//! 3. seals the record and writes it by compare-and-swap on the revision it
//!    read; on a conflict (another process wrote) it reads again and asks
//!    again, at most [`CAS_ATTEMPTS`] times;
//! 4. logs the event the change notes, in that same compare-and-swap
//!    (DESIGN §5e), and stamps it on the record as its last event;
//! 5. updates the token cache only after the store accepted the write, so
//!    the cache never serves a token the store has already dropped.

use std::hash::BuildHasher;

use tokio::sync::MutexGuard;

use super::{
    events::Noted,
    model::{CredentialId, CredentialRecord, CredentialState},
    Broker, BrokerError,
};
use crate::{
    crypto::KeyVersion,
    store::{CasOutcome, ClaimToken, Revision, Versioned, Write},
};

/// How many times a write re-reads after losing a compare-and-swap before
/// it reports contention; each loss needs a concurrent writer.
pub(super) const CAS_ATTEMPTS: usize = 8;
/// Credentials share this many write locks (striped by hash).
pub(super) const WRITE_LOCK_STRIPES: usize = 256;

/// What a write does with the value it found, and the event it notes (logged
/// in the same atomic write).
pub(crate) enum Step<T> {
    /// Seal and store this record, then answer `T`.
    Put(Box<CredentialRecord>, Option<Noted>, T),
    /// Delete the stored value, then answer `T`.
    Delete(Option<Noted>, T),
    /// Leave the store as it is and answer `T`.
    Leave(T),
}

/// How a write is made.
#[derive(Clone, Copy, Debug)]
pub(crate) struct How<'a> {
    /// Durable before `write` returns; otherwise at the next store flush
    /// (bulk work whose loss is harmless, such as a rewrap).
    pub durable: bool,
    /// Seal under this key version instead of the primary.
    pub key: Option<KeyVersion>,
    /// A refresh's write-back: only while this claim stands, releasing it.
    pub fence: Option<&'a ClaimToken>,
    /// What the write may assume is stored, instead of reading it first.
    pub known: Known<'a>,
}

/// What a write assumes is stored when it starts. A wrong guess costs
/// nothing but the attempt: the compare-and-swap's conflict returns what is
/// stored, and the write decides again. A right one saves a read (a blocking
/// hop on sled, a round trip on etcd).
#[derive(Clone, Copy, Debug)]
pub(crate) enum Known<'a> {
    /// Nothing: read first.
    Nothing,
    /// Absent (most Deposits are of new credentials).
    Absent,
    /// This value, read moments ago (a refresh's write-back).
    Value(&'a Versioned),
}

impl How<'_> {
    pub const DURABLE: How<'static> = How {
        durable: true,
        key: None,
        fence: None,
        known: Known::Nothing,
    };
}

/// The answer of a write, and the key version it sealed under (if it put).
pub(crate) struct Wrote<T> {
    pub answer: T,
    pub key_version: Option<u32>,
}

impl Broker {
    /// Changes one credential; see the module documentation.
    pub(crate) async fn write<T>(
        &self,
        id: &CredentialId,
        how: How<'_>,
        mut decide: impl FnMut(Option<&Versioned>) -> Result<Step<T>, BrokerError>,
    ) -> Result<Wrote<T>, BrokerError> {
        let key = id.store_key();
        let _write = self.write_lock(id).await;
        let mut current = match how.known {
            Known::Absent => None,
            Known::Value(value) => Some(value.clone()),
            Known::Nothing => self.store.get(&key).await?,
        };
        for _ in 0..CAS_ATTEMPTS {
            // One instant for the record's last event and the event itself.
            let now = std::time::SystemTime::now();
            let (value, written, noted, answer) = match decide(current.as_ref())? {
                Step::Leave(answer) => {
                    return Ok(Wrote {
                        answer,
                        key_version: None,
                    })
                }
                Step::Delete(noted, answer) => (None, None, noted, answer),
                Step::Put(mut record, noted, answer) => {
                    if let (Some(noted), true) = (&noted, self.settings.events.enabled) {
                        record.last_event = Some((noted.kind, now));
                    }
                    let (value, key_version) = self.seal(id, &record, how.key)?;
                    (Some(value), Some((*record, key_version)), noted, answer)
                }
            };
            let event = noted
                .filter(|_| self.settings.events.enabled)
                .map(|noted| noted.logged(id, now));
            let write = Write {
                expected: current.as_ref().map(|v| v.revision),
                value,
                event,
                fence: how.fence,
                durable: how.durable,
            };
            let sent = std::time::Instant::now();
            let outcome = self.store.write(&key, write).await?;
            self.metrics
                .store_write_seconds
                .observe(sent.elapsed().as_secs_f64());
            match outcome {
                CasOutcome::Written(revision) => {
                    let record = written.as_ref().map(|(record, _)| record);
                    self.cache_after_write(id, record, revision);
                    return Ok(Wrote {
                        answer,
                        key_version: written.map(|(_, version)| version),
                    });
                }
                CasOutcome::Conflict(now_stored) => current = now_stored,
            }
        }
        Err(BrokerError::Contention)
    }

    /// The cache follows the store: the written record's token while it is
    /// active, nothing after a delete or for a dead grant.
    fn cache_after_write(
        &self,
        id: &CredentialId,
        written: Option<&CredentialRecord>,
        revision: Option<Revision>,
    ) {
        match (written, revision) {
            (
                Some(CredentialRecord {
                    state: CredentialState::Active,
                    access_token: Some(token),
                    ..
                }),
                Some(revision),
            ) => self.cache.put(id, token.clone(), revision),
            _ => self.cache.remove(id),
        }
    }

    /// Caches a token read from storage, unless the record moved on since.
    /// Under the write lock, so no write can slip in between.
    pub(super) async fn cache_if_current(
        &self,
        id: &CredentialId,
        read: &Versioned,
        token: &crate::upstream::AccessToken,
    ) {
        let _write = self.write_lock(id).await;
        if let Ok(Some(now_stored)) = self.store.get(&id.store_key()).await {
            if now_stored.revision == read.revision {
                self.cache.put(id, token.clone(), read.revision);
            }
        }
    }

    pub(super) async fn write_lock(&self, id: &CredentialId) -> MutexGuard<'_, ()> {
        let stripe = self.lock_hasher.hash_one(id) as usize % WRITE_LOCK_STRIPES;
        self.write_locks[stripe].lock().await
    }
}
