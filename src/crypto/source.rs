//! Where the running vault's keyring comes from, so it can be read again on
//! a reload: the sealed file and its passphrase (given, or in a file).

use std::path::PathBuf;

use super::{keyring_file, Keyring};
use crate::{files, secret::SecretString};

/// The keyring file and how to unseal it.
#[derive(Clone, Debug)]
pub struct KeyringSource {
    pub path: PathBuf,
    pub passphrase: Option<SecretString>,
    pub passphrase_file: Option<PathBuf>,
}

/// Why the keyring could not be read; one line, never key material.
#[derive(Debug, thiserror::Error)]
pub enum KeyringSourceError {
    #[error("no keyring passphrase configured")]
    NoPassphrase,
    #[error("{0}")]
    Passphrase(#[from] files::FileError),
    #[error("keyring {path}: {source}")]
    Keyring {
        path: String,
        source: keyring_file::KeyringFileError,
    },
}

impl KeyringSource {
    /// Reads and unseals the keyring. Argon2 and file reads block: this runs
    /// them on the blocking pool.
    pub async fn load(&self) -> Result<Keyring, KeyringSourceError> {
        let source = self.clone();
        tokio::task::spawn_blocking(move || source.load_blocking())
            .await
            .unwrap_or_else(|_| Err(KeyringSourceError::NoPassphrase))
    }

    fn load_blocking(&self) -> Result<Keyring, KeyringSourceError> {
        let passphrase = match (&self.passphrase, &self.passphrase_file) {
            (Some(passphrase), _) => passphrase.clone(),
            (None, Some(file)) => files::read_secret(file)?,
            (None, None) => return Err(KeyringSourceError::NoPassphrase),
        };
        keyring_file::load(&self.path, &passphrase).map_err(|source| KeyringSourceError::Keyring {
            path: self.path.display().to_string(),
            source,
        })
    }
}
