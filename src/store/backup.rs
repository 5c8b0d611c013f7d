//! Backups: the store's records and bookkeeping, still sealed, in one file.
//!
//! The file is safe to copy around: every record stays encrypted under the
//! keyring, which is never part of a backup. Each record is copied atomically
//! and every write acknowledged before the backup began is in it; a refresh
//! that lands during the backup may or may not be (see the README on what a
//! restore means for rotating refresh tokens).
//!
//! Format (big-endian): `b"CVBACKUP"`, version `1`, then entries
//! `kind (1 = record, 2 = meta) | key len u32 | key | value len u32 | value`,
//! then kind `0` and the SHA-256 of everything before it.

use futures::TryStreamExt;
use sha2::{Digest, Sha256};

use super::{CasOutcome, CredentialStore, StoreError, StoreKey};

const MAGIC: &[u8; 8] = b"CVBACKUP";
const VERSION: u8 = 1;
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
    hash: Sha256,
    sink: &'a mut S,
}

impl<S: ChunkSink> Writer<'_, S> {
    async fn put(&mut self, bytes: &[u8]) -> Result<(), BackupError> {
        self.hash.update(bytes);
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

/// Writes a backup of `store` into `sink`; returns the record count.
pub async fn export<S: ChunkSink>(
    store: &dyn CredentialStore,
    sink: &mut S,
) -> Result<u64, BackupError> {
    let mut w = Writer {
        buf: Vec::with_capacity(CHUNK + 1024),
        hash: Sha256::new(),
        sink,
    };
    w.put(MAGIC).await?;
    w.put(&[VERSION]).await?;
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
    let digest = w.hash.clone().finalize();
    w.buf.extend_from_slice(&digest);
    let rest = std::mem::take(&mut w.buf);
    w.sink.send(rest).await.map_err(BackupError::Sink)?;
    Ok(records)
}

/// Restores a backup into an empty store; returns the record count.
pub async fn import(store: &dyn CredentialStore, bytes: &[u8]) -> Result<u64, BackupError> {
    let body_len = bytes
        .len()
        .checked_sub(32)
        .ok_or(BackupError::Corrupt("shorter than its checksum"))?;
    let (body, digest) = bytes.split_at(body_len);
    if body.len() < MAGIC.len() + 1 || &body[..MAGIC.len()] != MAGIC {
        return Err(BackupError::NotABackup);
    }
    if body[MAGIC.len()] != VERSION {
        return Err(BackupError::UnsupportedVersion(body[MAGIC.len()]));
    }
    if Sha256::digest(body).as_slice() != digest {
        return Err(BackupError::Corrupt("checksum mismatch"));
    }
    let everything = StoreKey::from_bytes(Vec::new());
    if !store.scan(&everything, None, 1).await?.is_empty() {
        return Err(BackupError::TargetNotEmpty);
    }
    // Parse everything before writing anything: a bad file changes nothing.
    let mut entries = Vec::new();
    let mut rest = &body[MAGIC.len() + 1..];
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
            let key = StoreKey::from_bytes(key.to_vec());
            match store
                .compare_and_swap_unflushed(&key, None, Some(value.to_vec()))
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
        let mut file = Vec::new();
        let exported = export(source.as_ref(), &mut file).await.unwrap();
        assert_eq!(exported, 1000);

        let b = tempfile::tempdir().unwrap();
        let target = store_in(b.path()).await;
        let mut flipped = file.clone();
        flipped[100] ^= 1;
        assert!(matches!(
            import(target.as_ref(), &flipped).await,
            Err(BackupError::Corrupt(_))
        ));
        assert!(import(target.as_ref(), &file[..file.len() - 1])
            .await
            .is_err());
        assert_eq!(import(target.as_ref(), &file).await.unwrap(), 1000);
        assert_eq!(
            target.get_meta("key-fingerprint/1").await.unwrap(),
            Some(vec![1, 2, 3])
        );
        let key = StoreKey::new("t", "s7", "p");
        assert_eq!(
            target.get(&key).await.unwrap().unwrap().value,
            7u32.to_be_bytes().repeat(50)
        );
        // Never over existing data.
        assert!(matches!(
            import(target.as_ref(), &file).await,
            Err(BackupError::TargetNotEmpty)
        ));
    }
}
