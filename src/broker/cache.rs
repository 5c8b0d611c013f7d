//! Access tokens held in memory so a cache hit costs no storage read and no
//! decryption. Entries are written only by the broker while it holds the
//! credential's write lock, after the store accepted the write, so the cache
//! never serves a token the store has already dropped.

use std::{
    collections::HashMap,
    hash::{BuildHasher, RandomState},
    sync::Mutex,
    time::{Duration, SystemTime},
};

use super::model::{AccessToken, CredentialId};

const SHARDS: usize = 32;

/// Sharded map from credential to its current access token.
pub struct TokenCache {
    shards: Vec<Mutex<HashMap<CredentialId, AccessToken>>>,
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
    fn shard(&self, id: &CredentialId) -> &Mutex<HashMap<CredentialId, AccessToken>> {
        &self.shards[(self.hasher.hash_one(id) as usize) % SHARDS]
    }

    /// The cached token, if it stays valid for `margin`.
    pub fn get(&self, id: &CredentialId, margin: Duration, now: SystemTime) -> Option<AccessToken> {
        let shard = self.shard(id).lock().unwrap_or_else(|e| e.into_inner());
        shard.get(id).filter(|t| t.valid_for(margin, now)).cloned()
    }

    pub fn put(&self, id: &CredentialId, token: AccessToken) {
        let mut shard = self.shard(id).lock().unwrap_or_else(|e| e.into_inner());
        shard.insert(id.clone(), token);
    }

    pub fn remove(&self, id: &CredentialId) {
        let mut shard = self.shard(id).lock().unwrap_or_else(|e| e.into_inner());
        shard.remove(id);
    }
}
