//! Keys derived from a keyring key for purposes other than sealing records,
//! each under its own label, so no derived key can open a record and no two
//! purposes share a key.

use hmac::{Hmac, Mac};
use sha2::Sha256;
use zeroize::Zeroizing;

use super::keyring::{KeyUnavailable, KeyVersion, Keyring};

/// What a derived key is for; the label binds it to that purpose.
#[derive(Clone, Copy, Debug)]
pub enum Purpose {
    /// Authenticates backup files (HMAC-SHA256 over the whole file).
    BackupAuthentication,
}

impl Purpose {
    fn label(self) -> &'static [u8] {
        match self {
            Self::BackupAuthentication => b"credvault backup authentication v1",
        }
    }
}

/// The 256-bit key for `purpose` under key `version`:
/// HMAC-SHA256(key, label).
pub fn derive_key(
    keyring: &Keyring,
    version: KeyVersion,
    purpose: Purpose,
) -> Result<Zeroizing<[u8; 32]>, KeyUnavailable> {
    let key = keyring.key_for_decrypt(version)?;
    // HMAC takes a key of any length; the error arm cannot happen.
    let Ok(mut mac) = <Hmac<Sha256> as Mac>::new_from_slice(key.expose()) else {
        return Err(KeyUnavailable::Unknown(version));
    };
    mac.update(purpose.label());
    let mut out = Zeroizing::new([0u8; 32]);
    out.copy_from_slice(&mac.finalize().into_bytes());
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn derived_keys_differ_by_key_and_never_equal_the_key() {
        let mut keyring = Keyring::generate();
        let v1 = keyring.primary();
        let v2 = keyring.add().unwrap();
        let a = derive_key(&keyring, v1, Purpose::BackupAuthentication).unwrap();
        let b = derive_key(&keyring, v2, Purpose::BackupAuthentication).unwrap();
        assert_ne!(*a, *b);
        assert_ne!(&*a, keyring.key_for_decrypt(v1).unwrap().expose());
        assert_eq!(
            *a,
            *derive_key(&keyring, v1, Purpose::BackupAuthentication).unwrap()
        );
    }
}
