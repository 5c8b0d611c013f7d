//! The guard against mass false reauth.
//!
//! If an operator loads a keyring whose key under some version differs from
//! the key that sealed the records (a restored backup of the wrong file, a
//! mixed-up secret), every record would fail authentication and be reported
//! as "user must re-consent". The store remembers each key version's
//! fingerprint; a keyring that disagrees is refused before serving.

use crate::{
    crypto::{Fingerprint, Keyring},
    store::{CredentialStore, StoreError},
};

const PREFIX: &str = "key-fingerprint/";

/// Why a keyring does not fit this store.
#[derive(Debug, thiserror::Error)]
pub enum KeyGuardError {
    #[error(
        "keyring does not match the store: key version {version} has fingerprint {found}, \
         but the store's records were sealed under fingerprint {expected}"
    )]
    FingerprintMismatch {
        version: u32,
        expected: String,
        found: Fingerprint,
    },
    #[error("{0}")]
    Store(#[from] StoreError),
}

/// Compares the keyring with the fingerprints the store remembers, then
/// records the fingerprints of versions the store has not seen yet.
pub async fn check_and_remember(
    store: &dyn CredentialStore,
    keyring: &Keyring,
) -> Result<(), KeyGuardError> {
    for info in keyring.versions() {
        // Destroyed versions carry no key to compare.
        let Some(found) = info.fingerprint else {
            continue;
        };
        let name = format!("{PREFIX}{}", info.version.get());
        // Put-if-absent: of two replicas starting with different key
        // material, the second sees the first's fingerprint and refuses.
        if let Some(expected) = store
            .put_meta_if_absent(&name, found.as_bytes().to_vec())
            .await?
        {
            if expected != found.as_bytes() {
                return Err(KeyGuardError::FingerprintMismatch {
                    version: info.version.get(),
                    expected: hex::encode(expected),
                    found,
                });
            }
        }
    }
    Ok(())
}
