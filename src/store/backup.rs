//! Backups: the store's records and bookkeeping, still sealed, in one file.
//!
//! The file is safe to copy around: every record stays encrypted under the
//! keyring, which is never part of a backup. Each record is copied atomically
//! and every write acknowledged before the backup began is in it; a refresh
//! that lands during the backup may or may not be (see the README on what a
//! restore means for rotating refresh tokens).
//!
//! Format (big-endian): `b"CVBACKUP"`, version `2`, the key version whose
//! derived key authenticates the file (u32), then entries
//! `kind (1 = record, 2 = meta) | key len u32 | key | value len u32 | value`,
//! then kind `0` and an HMAC-SHA256 of everything before it. The MAC key is
//! derived from a keyring key (`crypto::derive_key`), so a file changed by
//! anyone without the keyring (records dropped or rolled back, fingerprints
//! or the rewrap cursor rewritten) is refused before anything is restored.
//! Version 1 files (a plain SHA-256 anyone can recompute) are refused.

use futures::TryStreamExt;
use hmac::{Hmac, Mac};
use sha2::Sha256;
use zeroize::Zeroizing;

use super::{CasOutcome, CredentialStore, StoreError, StoreKey};

const MAGIC: &[u8; 8] = b"CVBACKUP";
const VERSION: u8 = 2;
const MAC_LEN: usize = 32;
const HEADER_LEN: usize = MAGIC.len() + 1 + 4;

/// The key that authenticates a backup, and the key version it derives from.
pub struct BackupKey {
    pub key_version: u32,
    pub mac_key: Zeroizing<[u8; 32]>,
}

fn mac(key: &[u8; 32]) -> Result<Hmac<Sha256>, BackupError> {
    // HMAC takes a key of any length; the error arm cannot happen.
    <Hmac<Sha256> as Mac>::new_from_slice(key).map_err(|_| BackupError::NotAuthentic)
}
const RECORD: u8 = 1;
const META: u8 = 2;
const END: u8 = 0;
/// Bytes handed to the sink at a time.
pub const CHUNK: usize = 64 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    #[error("{0}")]
    Store(#[from] StoreError),
    #[error("not a credvault backup (bad magic)")]
    NotABackup,
    #[error("unsupported backup format version {0}")]
    UnsupportedVersion(u8),
    #[error("backup is truncated or corrupt: {0}")]
    Corrupt(&'static str),
    #[error("backup fails authentication: it was changed, or it belongs to another keyring")]
    NotAuthentic,
    #[error("the backup is authenticated under key version {0}, which this keyring cannot use")]
    KeyUnavailable(u32),
    #[error("the target store is not empty; restore only into an empty data dir")]
    TargetNotEmpty,
    #[error("backup output failed: {0}")]
    Sink(String),
}

/// Where backup chunks go: a file being written, a gRPC stream.
pub trait ChunkSink: Send {
    fn send(
        &mut self,
        chunk: Vec<u8>,
    ) -> impl std::future::Future<Output = Result<(), String>> + Send;
}

impl ChunkSink for Vec<u8> {
    async fn send(&mut self, chunk: Vec<u8>) -> Result<(), String> {
        self.extend_from_slice(&chunk);
        Ok(())
    }
}

impl ChunkSink for tokio::sync::mpsc::Sender<Vec<u8>> {
    async fn send(&mut self, chunk: Vec<u8>) -> Result<(), String> {
        tokio::sync::mpsc::Sender::send(self, chunk)
            .await
            .map_err(|_| "the receiver went away".to_owned())
    }
}

/// Accumulates the file and hands it out in chunks.
struct Writer<'a, S: ChunkSink> {
    buf: Vec<u8>,
    mac: Hmac<Sha256>,
    sink: &'a mut S,
}

impl<S: ChunkSink> Writer<'_, S> {
    async fn put(&mut self, bytes: &[u8]) -> Result<(), BackupError> {
        self.mac.update(bytes);
        self.buf.extend_from_slice(bytes);
        if self.buf.len() >= CHUNK {
            self.sink
                .send(std::mem::take(&mut self.buf))
                .await
                .map_err(BackupError::Sink)?;
        }
        Ok(())
    }

    async fn entry(&mut self, kind: u8, key: &[u8], value: &[u8]) -> Result<(), BackupError> {
        self.put(&[kind]).await?;
        for part in [key, value] {
            let len =
                u32::try_from(part.len()).map_err(|_| BackupError::Corrupt("entry too large"))?;
            self.put(&len.to_be_bytes()).await?;
            self.put(part).await?;
        }
        Ok(())
    }
}

/// Writes a backup of `store` into `sink`, authenticated under `key`;
/// returns the record count.
pub async fn export<S: ChunkSink>(
    store: &dyn CredentialStore,
    key: &BackupKey,
    sink: &mut S,
) -> Result<u64, BackupError> {
    let mut w = Writer {
        buf: Vec::with_capacity(CHUNK + 1024),
        mac: mac(&key.mac_key)?,
        sink,
    };
    w.put(MAGIC).await?;
    w.put(&[VERSION]).await?;
    w.put(&key.key_version.to_be_bytes()).await?;
    for (name, value) in store.all_meta().await? {
        w.entry(META, name.as_bytes(), &value).await?;
    }
    let mut records = 0;
    let mut all = std::pin::pin!(store.records(None));
    while let Some((key, versioned)) = all.try_next().await? {
        w.entry(RECORD, key.as_bytes(), &versioned.value).await?;
        records += 1;
    }
    w.put(&[END]).await?;
    let tag = w.mac.clone().finalize().into_bytes();
    w.buf.extend_from_slice(&tag);
    let rest = std::mem::take(&mut w.buf);
    w.sink.send(rest).await.map_err(BackupError::Sink)?;
    Ok(records)
}

/// The key version a backup file says it is authenticated under (the
/// caller derives that version's key for [`import`]).
pub fn key_version_of(bytes: &[u8]) -> Result<u32, BackupError> {
    if bytes.len() < HEADER_LEN || &bytes[..MAGIC.len()] != MAGIC {
        return Err(BackupError::NotABackup);
    }
    if bytes[MAGIC.len()] != VERSION {
        return Err(BackupError::UnsupportedVersion(bytes[MAGIC.len()]));
    }
    let mut version = [0u8; 4];
    version.copy_from_slice(&bytes[MAGIC.len() + 1..HEADER_LEN]);
    Ok(u32::from_be_bytes(version))
}

/// Restores a backup into an empty store, after checking it is authentic
/// under `key`; returns the record count.
pub async fn import(
    store: &dyn CredentialStore,
    key: &BackupKey,
    bytes: &[u8],
) -> Result<u64, BackupError> {
    if key_version_of(bytes)? != key.key_version {
        return Err(BackupError::NotAuthentic);
    }
    let body_len = bytes
        .len()
        .checked_sub(MAC_LEN)
        .filter(|len| *len >= HEADER_LEN)
        .ok_or(BackupError::Corrupt("shorter than its authentication tag"))?;
    let (body, tag) = bytes.split_at(body_len);
    let mut check = mac(&key.mac_key)?;
    check.update(body);
    // Constant-time comparison, in `verify_slice`.
    check
        .verify_slice(tag)
        .map_err(|_| BackupError::NotAuthentic)?;
    let everything = StoreKey::from_bytes(Vec::new());
    if !store.scan(&everything, None, 1).await?.is_empty() {
        return Err(BackupError::TargetNotEmpty);
    }
    // Parse everything before writing anything: a bad file changes nothing.
    let mut entries = Vec::new();
    let mut rest = &body[HEADER_LEN..];
    loop {
        let (&kind, tail) = rest
            .split_first()
            .ok_or(BackupError::Corrupt("missing end marker"))?;
        rest = tail;
        if kind == END {
            if !rest.is_empty() {
                return Err(BackupError::Corrupt("data after the end marker"));
            }
            break;
        }
        if kind != RECORD && kind != META {
            return Err(BackupError::Corrupt("unknown entry kind"));
        }
        let mut take = || -> Result<&[u8], BackupError> {
            let (len, tail) = rest
                .split_at_checked(4)
                .ok_or(BackupError::Corrupt("truncated length"))?;
            let len = u32::from_be_bytes([len[0], len[1], len[2], len[3]]) as usize;
            let (part, tail) = tail
                .split_at_checked(len)
                .ok_or(BackupError::Corrupt("truncated entry"))?;
            rest = tail;
            Ok(part)
        };
        let key = take()?;
        let value = take()?;
        entries.push((kind, key, value));
    }
    let mut records = 0;
    for (kind, key, value) in entries {
        if kind == META {
            let name = std::str::from_utf8(key).map_err(|_| BackupError::Corrupt("meta name"))?;
            store.put_meta(name, value.to_vec()).await?;
        } else {
            // Durable at the flush below, once for the whole import.
            let write = super::Write {
                value: Some(value.to_vec()),
                durable: false,
                ..super::Write::DURABLE
            };
            match store
                .write(&StoreKey::from_bytes(key.to_vec()), write)
                .await?
            {
                CasOutcome::Written(_) => records += 1,
                CasOutcome::Conflict(_) => return Err(BackupError::Corrupt("duplicate record")),
            }
        }
    }
    store.flush().await?;
    Ok(records)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{open, StoreSettings};

    async fn store_in(dir: &std::path::Path) -> std::sync::Arc<dyn CredentialStore> {
        open(&StoreSettings::Embedded {
            data_dir: dir.to_owned(),
            cache_capacity: 64 << 20,
        })
        .await
        .unwrap()
    }

    #[tokio::test]
    async fn round_trip_and_tamper_detection() {
        let a = tempfile::tempdir().unwrap();
        let source = store_in(a.path()).await;
        for i in 0..1000u32 {
            let key = StoreKey::new("t", &format!("s{i}"), "p");
            source
                .compare_and_swap(&key, None, Some(i.to_be_bytes().repeat(50)))
                .await
                .unwrap();
        }
        source
            .put_meta("key-fingerprint/1", vec![1, 2, 3])
            .await
            .unwrap();
        let key = BackupKey {
            key_version: 3,
            mac_key: Zeroizing::new([7u8; 32]),
        };
        let mut file = Vec::new();
        let exported = export(source.as_ref(), &key, &mut file).await.unwrap();
        assert_eq!(exported, 1000);

        let b = tempfile::tempdir().unwrap();
        let target = store_in(b.path()).await;
        let mut flipped = file.clone();
        flipped[100] ^= 1;
        assert!(matches!(
            import(target.as_ref(), &key, &flipped).await,
            Err(BackupError::NotAuthentic)
        ));
        assert!(import(target.as_ref(), &key, &file[..file.len() - 1])
            .await
            .is_err());
        // Someone without the key cannot make a file that passes.
        let forger = BackupKey {
            key_version: 3,
            mac_key: Zeroizing::new([8u8; 32]),
        };
        let mut forged = Vec::new();
        export(source.as_ref(), &forger, &mut forged).await.unwrap();
        assert!(matches!(
            import(target.as_ref(), &key, &forged).await,
            Err(BackupError::NotAuthentic)
        ));
        let everything = StoreKey::from_bytes(Vec::new());
        assert!(target.scan(&everything, None, 1).await.unwrap().is_empty());
        assert_eq!(import(target.as_ref(), &key, &file).await.unwrap(), 1000);
        assert_eq!(
            target.get_meta("key-fingerprint/1").await.unwrap(),
            Some(vec![1, 2, 3])
        );
        let record = StoreKey::new("t", "s7", "p");
        assert_eq!(
            target.get(&record).await.unwrap().unwrap().value,
            7u32.to_be_bytes().repeat(50)
        );
        // Never over existing data.
        assert!(matches!(
            import(target.as_ref(), &key, &file).await,
            Err(BackupError::TargetNotEmpty)
        ));
    }
}
