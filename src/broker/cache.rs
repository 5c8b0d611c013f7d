//! Access tokens held in memory so a cache hit costs no storage read and no
//! decryption. Entries are written only by the broker while it holds the
//! credential's write lock, after the store accepted the write, so the cache
//! never serves a token the store has already dropped. Each entry remembers
//! the store revision it came from: on a replicated store, a change seen
//! through the watch drops entries older than it (a write by this process
//! carries the same revision as its own entry and leaves it alone).

use std::{
    hash::{BuildHasher, RandomState},
    sync::{Mutex, MutexGuard},
    time::{Duration, SystemTime},
};

use hashbrown::{hash_table::Entry, HashTable};

use super::model::{AccessToken, CredentialId};
use crate::store::Revision;

const SHARDS: usize = 32;

/// A credential's cached token, and the store revision it was read or
/// written at.
struct Cached {
    id: CredentialId,
    token: AccessToken,
    revision: Revision,
}

/// A table rather than a `HashMap` so that the credential is hashed once
/// per call, for both the shard and the slot in it: the id is three strings,
/// and its keyed hash was a tenth of a cache hit's instructions when it was
/// computed twice (callgrind, 2026-12-02).
///
/// Entries are boxed because a table keeps up to twice as many slots as
/// entries (it doubles past 7/8 full): a slot of 8 bytes instead of the
/// 168 of a `Cached` saved about 120 bytes per cached credential at 1M
/// (scenario 5 of BENCHMARKS.md), for one more pointer to follow per hit.
type Shard = Mutex<HashTable<Box<Cached>>>;

/// Sharded map from credential to its current access token.
pub struct TokenCache {
    shards: Vec<Shard>,
    hasher: RandomState,
}

impl Default for TokenCache {
    fn default() -> Self {
        Self {
            shards: (0..SHARDS).map(|_| Mutex::new(HashTable::new())).collect(),
            hasher: RandomState::new(),
        }
    }
}

impl TokenCache {
    /// The id's hash and its shard, locked. The shard is chosen by bits the
    /// table does not use for a slot (it takes the low bits, and the top
    /// seven as a tag), so the entries of one shard still spread over it.
    fn shard(&self, id: &CredentialId) -> (u64, MutexGuard<'_, HashTable<Box<Cached>>>) {
        let hash = self.hasher.hash_one(id);
        let shard = &self.shards[(hash >> 32) as usize % SHARDS];
        (hash, shard.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// The cached token, if it stays valid for `margin`.
    pub fn get(&self, id: &CredentialId, margin: Duration, now: SystemTime) -> Option<AccessToken> {
        let (hash, shard) = self.shard(id);
        shard
            .find(hash, |cached| cached.id == *id)
            .filter(|cached| cached.token.valid_for(margin, now))
            .map(|cached| cached.token.clone())
    }

    /// Caches `token`, read or written at store `revision`.
    pub fn put(&self, id: &CredentialId, token: AccessToken, revision: Revision) {
        let (hash, mut shard) = self.shard(id);
        match shard.entry(
            hash,
            |cached| cached.id == *id,
            |cached| self.hasher.hash_one(&cached.id),
        ) {
            Entry::Occupied(mut entry) => {
                let cached = entry.get_mut();
                // Never replace a newer entry with an older one.
                if cached.revision <= revision {
                    cached.token = token;
                    cached.revision = revision;
                }
            }
            Entry::Vacant(entry) => {
                entry.insert(Box::new(Cached {
                    id: id.clone(),
                    token,
                    revision,
                }));
            }
        }
    }

    pub fn remove(&self, id: &CredentialId) {
        let (hash, mut shard) = self.shard(id);
        if let Ok(entry) = shard.find_entry(hash, |cached| cached.id == *id) {
            entry.remove();
        }
    }

    /// The store changed the record at `revision` (`None`: deleted): drop
    /// an entry older than that.
    pub fn changed(&self, id: &CredentialId, revision: Option<Revision>) {
        let (hash, mut shard) = self.shard(id);
        if let Ok(entry) = shard.find_entry(hash, |cached| cached.id == *id) {
            let stale = revision.is_none_or(|revision| entry.get().revision < revision);
            if stale {
                entry.remove();
            }
        }
    }

    /// Forgets everything (the store's change history was lost).
    pub fn clear(&self) {
        for shard in &self.shards {
            shard.lock().unwrap_or_else(|e| e.into_inner()).clear();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(n: usize) -> CredentialId {
        CredentialId {
            tenant: "acme".into(),
            subject: format!("user-{n}"),
            provider: "github".into(),
        }
    }

    fn token(value: &str, now: SystemTime) -> AccessToken {
        AccessToken {
            token: value.into(),
            token_type: "Bearer".into(),
            expires_at: now + Duration::from_secs(3600),
            scopes: vec!["repo".into()],
        }
    }

    fn cached(cache: &TokenCache, n: usize, now: SystemTime) -> Option<String> {
        cache
            .get(&id(n), Duration::ZERO, now)
            .map(|t| t.token.expose().to_owned())
    }

    #[test]
    fn many_credentials_each_keep_their_own_token() {
        let (cache, now) = (TokenCache::default(), SystemTime::now());
        for n in 0..5_000 {
            cache.put(&id(n), token(&format!("at-{n}"), now), Revision(1));
        }
        for n in 0..5_000 {
            assert_eq!(cached(&cache, n, now), Some(format!("at-{n}")));
        }
        assert_eq!(cached(&cache, 5_000, now), None);
    }

    #[test]
    fn an_older_revision_never_replaces_a_newer_one() {
        let (cache, now) = (TokenCache::default(), SystemTime::now());
        cache.put(&id(1), token("at-new", now), Revision(5));
        cache.put(&id(1), token("at-old", now), Revision(4));
        assert_eq!(cached(&cache, 1, now).as_deref(), Some("at-new"));
        cache.put(&id(1), token("at-same", now), Revision(5));
        assert_eq!(cached(&cache, 1, now).as_deref(), Some("at-same"));
    }

    #[test]
    fn a_token_that_expires_within_the_margin_is_not_served() {
        let (cache, now) = (TokenCache::default(), SystemTime::now());
        cache.put(&id(1), token("at", now), Revision(1));
        assert!(cache.get(&id(1), Duration::from_secs(3599), now).is_some());
        assert!(cache.get(&id(1), Duration::from_secs(3601), now).is_none());
    }

    #[test]
    fn changes_drop_only_older_entries_and_removal_drops_one() {
        let (cache, now) = (TokenCache::default(), SystemTime::now());
        for n in 0..3 {
            cache.put(&id(n), token("at", now), Revision(5));
        }
        cache.changed(&id(0), Some(Revision(5)));
        assert!(cached(&cache, 0, now).is_some(), "its own write's revision");
        cache.changed(&id(0), Some(Revision(6)));
        assert!(cached(&cache, 0, now).is_none(), "a newer change");
        cache.changed(&id(1), None);
        assert!(cached(&cache, 1, now).is_none(), "deleted");
        cache.remove(&id(2));
        assert!(cached(&cache, 2, now).is_none());
        cache.put(&id(3), token("at", now), Revision(1));
        cache.clear();
        assert!(cached(&cache, 3, now).is_none());
    }
}
