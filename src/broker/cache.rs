//! Access tokens held in memory so a cache hit costs no storage read and no
//! decryption. Entries are written only by the broker while it holds the
//! credential's write lock, after the store accepted the write, so the cache
//! never serves a token the store has already dropped. Each entry remembers
//! the store revision it came from: on a replicated store, a change seen
//! through the watch drops entries older than it (a write by this process
//! carries the same revision as its own entry and leaves it alone).

use std::{
    collections::HashMap,
    hash::{BuildHasher, RandomState},
    sync::Mutex,
    time::{Duration, SystemTime},
};

use super::model::{AccessToken, CredentialId};
use crate::store::Revision;

const SHARDS: usize = 32;

type Shard = Mutex<HashMap<CredentialId, (AccessToken, Revision)>>;

/// Sharded map from credential to its current access token.
pub struct TokenCache {
    shards: Vec<Shard>,
    hasher: RandomState,
}

impl Default for TokenCache {
    fn default() -> Self {
        Self {
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
            hasher: RandomState::new(),
        }
    }
}

impl TokenCache {
    fn shard(&self, id: &CredentialId) -> &Shard {
        &self.shards[(self.hasher.hash_one(id) as usize) % SHARDS]
    }

    /// The cached token, if it stays valid for `margin`.
    pub fn get(&self, id: &CredentialId, margin: Duration, now: SystemTime) -> Option<AccessToken> {
        let shard = self.shard(id).lock().unwrap_or_else(|e| e.into_inner());
        shard
            .get(id)
            .filter(|(t, _)| t.valid_for(margin, now))
            .map(|(t, _)| t.clone())
    }

    /// Caches `token`, read or written at store `revision`.
    pub fn put(&self, id: &CredentialId, token: AccessToken, revision: Revision) {
        let mut shard = self.shard(id).lock().unwrap_or_else(|e| e.into_inner());
        match shard.get(id) {
            // Never replace a newer entry with an older one.
            Some((_, cached)) if *cached > revision => {}
            _ => {
                shard.insert(id.clone(), (token, revision));
            }
        }
    }

    pub fn remove(&self, id: &CredentialId) {
        let mut shard = self.shard(id).lock().unwrap_or_else(|e| e.into_inner());
        shard.remove(id);
    }

    /// The store changed the record at `revision` (`None`: deleted): drop
    /// an entry older than that.
    pub fn changed(&self, id: &CredentialId, revision: Option<Revision>) {
        let mut shard = self.shard(id).lock().unwrap_or_else(|e| e.into_inner());
        let stale = match (shard.get(id), revision) {
            (None, _) => false,
            (Some(_), None) => true,
            (Some((_, cached)), Some(revision)) => *cached < revision,
        };
        if stale {
            shard.remove(id);
        }
    }

    /// Forgets everything (the store's change history was lost).
    pub fn clear(&self) {
        for shard in &self.shards {
            shard.lock().unwrap_or_else(|e| e.into_inner()).clear();
        }
    }
}
