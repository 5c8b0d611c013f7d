//! The files the vault reads and writes outside its store, handled one way.
//!
//! - [`write_atomically`]: temp file in the same directory with a random
//!   name, fsync, rename, fsync the directory. A reader (or a crash) sees the
//!   old file or the whole new one; private files are created 0600 from the
//!   first byte, never widened later.
//! - [`read_secret`]: a passphrase or client-secret file, one trailing
//!   newline dropped, straight into a [`SecretString`].
//! - [`ChangeWatch`]: the one poller behind every "reload when the file
//!   changes" (keyring, TLS material). Kubernetes swaps mounted Secrets by
//!   symlink, so files are compared by (mtime, length), not by inode.
//!
//! These are blocking calls: async callers run them on the blocking pool.

use std::{
    ffi::OsString,
    fs::{self, File, OpenOptions},
    io::Write,
    path::{Path, PathBuf},
    time::{Duration, SystemTime},
};

use rand::RngCore;

use crate::secret::SecretString;

/// A file operation that failed; names the path, never the contents.
#[derive(Debug, thiserror::Error)]
#[error("{path}: {message}")]
pub struct FileError {
    pub path: String,
    pub message: String,
}

impl FileError {
    fn new(path: &Path, message: impl std::fmt::Display) -> Self {
        Self {
            path: path.display().to_string(),
            message: message.to_string(),
        }
    }
}

/// Who may read a written file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    /// Owner only (0600): keys, passphrases, backups.
    Private,
    /// The process umask decides: certificates, configs.
    Shared,
}

/// Replaces `path` with `bytes` atomically and durably.
pub fn write_atomically(path: &Path, bytes: &[u8], access: Access) -> Result<(), FileError> {
    let file_name = path
        .file_name()
        .ok_or_else(|| FileError::new(path, "not a file path"))?;
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    // Same directory, so the rename cannot cross filesystems; a random name,
    // so two writers never share a temp file.
    let mut suffix = [0u8; 8];
    rand::rngs::OsRng.fill_bytes(&mut suffix);
    let mut tmp_name = OsString::from(".");
    tmp_name.push(file_name);
    tmp_name.push(format!(".tmp-{}", hex::encode(suffix)));
    let tmp = dir.join(tmp_name);

    let result = (|| {
        let mut file = create_new(&tmp, access).map_err(|e| FileError::new(&tmp, e))?;
        file.write_all(bytes)
            .and_then(|()| file.sync_all())
            .map_err(|e| FileError::new(&tmp, e))?;
        drop(file);
        fs::rename(&tmp, path).map_err(|e| FileError::new(path, e))?;
        sync_dir(dir).map_err(|e| FileError::new(dir, e))
    })();
    if result.is_err() {
        // Best effort: a leftover temp file is clutter, not a leak (0600).
        let _ = fs::remove_file(&tmp);
    }
    result
}

fn create_new(path: &Path, access: Access) -> std::io::Result<File> {
    let mut options = OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    if access == Access::Private {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    #[cfg(not(unix))]
    let _ = access;
    options.open(path)
}

fn sync_dir(dir: &Path) -> std::io::Result<()> {
    // Makes the rename itself durable; on Windows the rename is journaled.
    #[cfg(unix)]
    File::open(dir)?.sync_all()?;
    #[cfg(not(unix))]
    let _ = dir;
    Ok(())
}

/// Reads a secret file; one trailing newline is not part of the secret.
pub fn read_secret(path: &Path) -> Result<SecretString, FileError> {
    let text = SecretString::from(
        fs::read_to_string(path).map_err(|e| FileError::new(path, format!("cannot read: {e}")))?,
    );
    let trimmed = text.expose().trim_end_matches(['\n', '\r']);
    if trimmed.is_empty() {
        return Err(FileError::new(path, "the file is empty"));
    }
    Ok(SecretString::from(trimmed))
}

/// Notices when any of a set of files changes.
pub struct ChangeWatch {
    paths: Vec<PathBuf>,
    seen: Vec<Option<(Option<SystemTime>, u64)>>,
}

impl ChangeWatch {
    /// Starts watching; the files as they are now count as seen.
    pub fn new(paths: Vec<PathBuf>) -> Self {
        let seen = stamps(&paths);
        Self { paths, seen }
    }

    /// Resolves at the next poll that sees a change, checking every
    /// `interval` on the blocking pool; never resolves for a zero interval.
    pub async fn next_change(&mut self, interval: Duration) {
        if interval.is_zero() {
            return std::future::pending().await;
        }
        loop {
            tokio::time::sleep(interval).await;
            let paths = self.paths.clone();
            let Ok(now) = tokio::task::spawn_blocking(move || stamps(&paths)).await else {
                continue;
            };
            if now != self.seen {
                self.seen = now;
                return;
            }
        }
    }
}

fn stamps(paths: &[PathBuf]) -> Vec<Option<(Option<SystemTime>, u64)>> {
    paths
        .iter()
        .map(|p| fs::metadata(p).ok().map(|m| (m.modified().ok(), m.len())))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn atomic_private_writes_replace_the_file_and_leave_no_temp() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("backup.bin");
        write_atomically(&path, b"one", Access::Private).unwrap();
        write_atomically(&path, b"two", Access::Private).unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"two");
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
    }

    #[test]
    fn secrets_lose_one_trailing_newline_and_empty_files_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("secret");
        fs::write(&path, "s3cret\n").unwrap();
        assert_eq!(read_secret(&path).unwrap().expose(), "s3cret");
        fs::write(&path, "\n").unwrap();
        let error = read_secret(&path).unwrap_err().to_string();
        assert!(error.contains("empty"), "{error}");
    }

    #[tokio::test]
    async fn a_change_is_seen_once() {
        let tick = Duration::from_millis(10);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("watched");
        fs::write(&path, "a").unwrap();
        let mut watch = ChangeWatch::new(vec![path.clone()]);
        let quiet = tokio::time::timeout(tick * 5, watch.next_change(tick)).await;
        assert!(quiet.is_err(), "an unchanged file is no change");
        fs::write(&path, "bb").unwrap();
        tokio::time::timeout(Duration::from_secs(5), watch.next_change(tick))
            .await
            .expect("the change is seen");
        let again = tokio::time::timeout(tick * 5, watch.next_change(tick)).await;
        assert!(again.is_err(), "a change is seen once");
    }
}
