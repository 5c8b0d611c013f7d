//! The record envelope: one stored credential, sealed with AES-256-GCM-SIV.
//!
//! Layout (big-endian), see DESIGN §5a:
//!
//! ```text
//! 0   2   magic "CV"
//! 2   1   format version (1)
//! 3   1   algorithm (1 = AES-256-GCM-SIV)
//! 4   4   key version (u32, 0 is invalid)
//! 8   12  nonce, fresh from the OS RNG on every seal
//! 20  n   ciphertext + 16-byte tag
//! ```
//!
//! The associated data is `bytes[0..8]` followed by the u32-length-prefixed
//! tenant, subject and provider, so a record only opens under the identity and
//! key version it was sealed for. Because the AEAD failure is opaque, [`open`]
//! classifies everything it can from the clear header before decrypting.

use aes_gcm_siv::aead::{AeadInPlace, KeyInit};
use aes_gcm_siv::{Aes256GcmSiv, Key, Nonce, Tag};
use rand::rngs::OsRng;
use rand::RngCore;
use zeroize::{Zeroize, Zeroizing};

use super::keyring::{KeyMaterial, KeyUnavailable, KeyVersion, Keyring, KeyringError};

/// The first two bytes of every envelope.
pub const MAGIC: [u8; 2] = *b"CV";
/// The only envelope format this build writes and reads.
pub const FORMAT_VERSION: u8 = 1;
/// Algorithm id of AES-256-GCM-SIV.
pub const ALGORITHM_AES_256_GCM_SIV: u8 = 1;

const NONCE_LEN: usize = 12;
const TAG_LEN: usize = 16;
/// magic + format + algorithm + key version: the part covered by the AAD.
const PREFIX_LEN: usize = 8;
const HEADER_LEN: usize = PREFIX_LEN + NONCE_LEN;
/// An empty plaintext still carries a header and a tag.
pub const MIN_ENVELOPE_LEN: usize = HEADER_LEN + TAG_LEN;

/// The (tenant, subject, provider) a record belongs to; bound into the AAD.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct RecordIdentity<'a> {
    /// Tenant.
    pub tenant: &'a str,
    /// User or principal.
    pub subject: &'a str,
    /// Upstream OAuth provider.
    pub provider: &'a str,
}

/// Sealing failed; no envelope was produced.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SealError {
    /// The requested key version is unknown or not active.
    #[error("cannot seal: {0}")]
    Key(#[from] KeyringError),
    /// An identity field or the plaintext exceeds what the format can carry.
    #[error("cannot seal: record too large")]
    TooLarge,
}

/// Why an envelope could not be opened, classified from the header first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum OpenError {
    /// Too short, bad magic or key version 0: an integrity alarm, not a reauth.
    #[error("corrupt record: {reason}")]
    Corrupt {
        /// Which check failed.
        reason: &'static str,
    },
    /// Written by a newer or foreign format; must never be overwritten blindly.
    #[error("unsupported record format {format_version} (algorithm {algorithm})")]
    UnsupportedFormat {
        /// Byte 2 of the envelope.
        format_version: u8,
        /// Byte 3 of the envelope.
        algorithm: u8,
    },
    /// The key version is not in the keyring or was destroyed: an operator error.
    #[error("key version {version} is not available")]
    KeyVersionUnavailable {
        /// The version named by the header.
        version: u32,
    },
    /// The key is present but authentication failed (tampering, wrong
    /// identity, or a header moved to another key): the grant is lost.
    #[error("record under key version {version} cannot be decrypted")]
    Undecryptable {
        /// The version named by the header.
        version: u32,
    },
}

impl From<KeyUnavailable> for OpenError {
    fn from(e: KeyUnavailable) -> Self {
        OpenError::KeyVersionUnavailable {
            version: e.version().get(),
        }
    }
}

/// Seals `plaintext` for `id` under the keyring's primary key.
pub fn seal(
    keyring: &Keyring,
    id: &RecordIdentity<'_>,
    plaintext: &[u8],
) -> Result<Vec<u8>, SealError> {
    seal_with(keyring, keyring.primary(), id, plaintext)
}

/// Seals under a specific key version, which must be active (rewrap pins the
/// target version for a whole pass).
pub fn seal_with(
    keyring: &Keyring,
    version: KeyVersion,
    id: &RecordIdentity<'_>,
    plaintext: &[u8],
) -> Result<Vec<u8>, SealError> {
    seal_under(keyring.key_for_encrypt(version)?, version, id, plaintext)
}

/// Seals under `version` while a new primary rolls out to every replica:
/// the previous primary (now decrypt-only in this keyring) keeps sealing
/// until every live replica can open the new one.
pub fn seal_during_rollout(
    keyring: &Keyring,
    version: KeyVersion,
    id: &RecordIdentity<'_>,
    plaintext: &[u8],
) -> Result<Vec<u8>, SealError> {
    seal_under(keyring.key_for_rollout(version)?, version, id, plaintext)
}

fn seal_under(
    key: &KeyMaterial,
    version: KeyVersion,
    id: &RecordIdentity<'_>,
    plaintext: &[u8],
) -> Result<Vec<u8>, SealError> {
    let mut nonce = [0u8; NONCE_LEN];
    OsRng.fill_bytes(&mut nonce);

    let mut out = Vec::with_capacity(HEADER_LEN + plaintext.len() + TAG_LEN);
    out.extend_from_slice(&MAGIC);
    out.push(FORMAT_VERSION);
    out.push(ALGORITHM_AES_256_GCM_SIV);
    out.extend_from_slice(&version.get().to_be_bytes());
    out.extend_from_slice(&nonce);
    let aad = associated_data(&out[..PREFIX_LEN], id).ok_or(SealError::TooLarge)?;
    out.extend_from_slice(plaintext);

    let (header, body) = out.split_at_mut(HEADER_LEN);
    match cipher(key).encrypt_in_place_detached(
        Nonce::from_slice(&header[PREFIX_LEN..]),
        &aad,
        body,
    ) {
        Ok(tag) => {
            out.extend_from_slice(&tag);
            Ok(out)
        }
        Err(_) => {
            // The buffer still holds plaintext.
            out.zeroize();
            Err(SealError::TooLarge)
        }
    }
}

/// Opens an envelope sealed for `id`, classifying failures before decrypting
/// (see [`OpenError`]).
pub fn open(
    keyring: &Keyring,
    id: &RecordIdentity<'_>,
    envelope: &[u8],
) -> Result<Zeroizing<Vec<u8>>, OpenError> {
    let version = key_version_of(envelope)?;
    let key = keyring.key_for_decrypt(version)?;
    let undecryptable = OpenError::Undecryptable {
        version: version.get(),
    };

    // `key_version_of` checked the length, so these splits are in bounds.
    let (header, rest) = envelope.split_at(HEADER_LEN);
    let (ciphertext, tag) = rest.split_at(rest.len() - TAG_LEN);
    // Seal refuses identities too long to prefix, so none could match.
    let aad = associated_data(&header[..PREFIX_LEN], id).ok_or(undecryptable)?;

    let mut buffer = Zeroizing::new(ciphertext.to_vec());
    cipher(key)
        .decrypt_in_place_detached(
            Nonce::from_slice(&header[PREFIX_LEN..]),
            &aad,
            buffer.as_mut_slice(),
            Tag::from_slice(tag),
        )
        .map_err(|_| undecryptable)?;
    Ok(buffer)
}

/// Reads the key version from the header without decrypting; applies the same
/// corrupt/unsupported checks as [`open`]. Used for per-version record counts.
pub fn key_version_of(envelope: &[u8]) -> Result<KeyVersion, OpenError> {
    let [m0, m1, format_version, algorithm, ..] = *envelope else {
        return Err(OpenError::Corrupt {
            reason: "record too short",
        });
    };
    if [m0, m1] != MAGIC {
        return Err(OpenError::Corrupt {
            reason: "bad magic",
        });
    }
    if format_version != FORMAT_VERSION || algorithm != ALGORITHM_AES_256_GCM_SIV {
        return Err(OpenError::UnsupportedFormat {
            format_version,
            algorithm,
        });
    }
    let [_, _, _, _, v0, v1, v2, v3, ..] = *envelope else {
        return Err(OpenError::Corrupt {
            reason: "record too short",
        });
    };
    if envelope.len() < MIN_ENVELOPE_LEN {
        return Err(OpenError::Corrupt {
            reason: "record too short",
        });
    }
    KeyVersion::new(u32::from_be_bytes([v0, v1, v2, v3])).ok_or(OpenError::Corrupt {
        reason: "key version 0",
    })
}

fn cipher(key: &KeyMaterial) -> Aes256GcmSiv {
    Aes256GcmSiv::new(Key::<Aes256GcmSiv>::from_slice(key.expose()))
}

/// `prefix || len(tenant) || tenant || len(subject) || subject || len(provider) || provider`;
/// the length prefixes keep ("ab","c") and ("a","bc") apart. `None` if a
/// field does not fit a u32 length.
fn associated_data(prefix: &[u8], id: &RecordIdentity<'_>) -> Option<Vec<u8>> {
    let fields = [id.tenant, id.subject, id.provider];
    let len = prefix.len() + fields.iter().map(|f| 4 + f.len()).sum::<usize>();
    let mut aad = Vec::with_capacity(len);
    aad.extend_from_slice(prefix);
    for field in fields {
        aad.extend_from_slice(&u32::try_from(field.len()).ok()?.to_be_bytes());
        aad.extend_from_slice(field.as_bytes());
    }
    Some(aad)
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: RecordIdentity<'static> = RecordIdentity {
        tenant: "acme",
        subject: "alice",
        provider: "google",
    };

    fn v(n: u32) -> KeyVersion {
        KeyVersion::new(n).unwrap()
    }

    #[test]
    fn round_trip_and_layout() {
        let k = Keyring::generate();
        let env = seal(&k, &ID, b"refresh-token-123").unwrap();
        assert_eq!(&env[..2], b"CV");
        assert_eq!(env[2], 1);
        assert_eq!(env[3], 1);
        assert_eq!(&env[4..8], &1u32.to_be_bytes());
        assert_eq!(env.len(), 20 + 17 + 16);
        assert!(!env.windows(8).any(|w| w == b"refresh-"));
        assert_eq!(
            open(&k, &ID, &env).unwrap().as_slice(),
            b"refresh-token-123"
        );
        assert_eq!(key_version_of(&env).unwrap(), v(1));

        let empty = seal(&k, &ID, b"").unwrap();
        assert_eq!(empty.len(), MIN_ENVELOPE_LEN);
        assert!(open(&k, &ID, &empty).unwrap().is_empty());
    }

    #[test]
    fn nonces_are_fresh() {
        let k = Keyring::generate();
        let a = seal(&k, &ID, b"same").unwrap();
        let b = seal(&k, &ID, b"same").unwrap();
        assert_ne!(a[8..20], b[8..20]);
        assert_ne!(a, b);
    }

    #[test]
    fn corrupt_cases() {
        let k = Keyring::generate();
        let env = seal(&k, &ID, b"x").unwrap();
        let corrupt = |bytes: &[u8]| match open(&k, &ID, bytes) {
            Err(OpenError::Corrupt { reason }) => reason,
            other => panic!("expected corrupt, got {other:?}"),
        };
        assert_eq!(corrupt(&[]), "record too short");
        assert_eq!(corrupt(b"CV\x01"), "record too short");
        assert_eq!(corrupt(&env[..MIN_ENVELOPE_LEN - 1]), "record too short");
        assert_eq!(corrupt(&env[..8]), "record too short");
        let mut bad = env.clone();
        bad[0] = b'X';
        assert_eq!(corrupt(&bad), "bad magic");
        assert_eq!(
            corrupt(b"{\"json\":true} and more bytes here......"),
            "bad magic"
        );
        let mut zero = env.clone();
        zero[4..8].copy_from_slice(&[0; 4]);
        assert_eq!(corrupt(&zero), "key version 0");
        assert!(matches!(
            key_version_of(&zero),
            Err(OpenError::Corrupt { .. })
        ));
    }

    #[test]
    fn unsupported_format_and_algorithm() {
        let k = Keyring::generate();
        let env = seal(&k, &ID, b"x").unwrap();
        let mut f = env.clone();
        f[2] = 2;
        assert_eq!(
            open(&k, &ID, &f).unwrap_err(),
            OpenError::UnsupportedFormat {
                format_version: 2,
                algorithm: 1
            }
        );
        let mut a = env.clone();
        a[3] = 9;
        assert_eq!(
            open(&k, &ID, &a).unwrap_err(),
            OpenError::UnsupportedFormat {
                format_version: 1,
                algorithm: 9
            }
        );
        // Unsupported wins over "too short": a future format may be shorter.
        assert!(matches!(
            key_version_of(b"CV\x02\x01"),
            Err(OpenError::UnsupportedFormat { .. })
        ));
    }

    #[test]
    fn missing_and_destroyed_versions() {
        let mut k = Keyring::generate();
        let old = seal(&k, &ID, b"x").unwrap();
        let other = Keyring::generate();
        let mut unknown = seal(&other, &ID, b"x").unwrap();
        unknown[4..8].copy_from_slice(&7u32.to_be_bytes());
        assert_eq!(
            open(&k, &ID, &unknown).unwrap_err(),
            OpenError::KeyVersionUnavailable { version: 7 }
        );

        let v2 = k.add().unwrap();
        k.promote(v2).unwrap();
        let new = seal(&k, &ID, b"y").unwrap();
        assert_eq!(key_version_of(&new).unwrap(), v2);
        assert_eq!(open(&k, &ID, &old).unwrap().as_slice(), b"x");
        k.retire(v(1)).unwrap();
        assert_eq!(
            open(&k, &ID, &old).unwrap_err(),
            OpenError::KeyVersionUnavailable { version: 1 }
        );
        k.destroy(v(1)).unwrap();
        assert_eq!(
            open(&k, &ID, &old).unwrap_err(),
            OpenError::KeyVersionUnavailable { version: 1 }
        );
        assert_eq!(open(&k, &ID, &new).unwrap().as_slice(), b"y");
    }

    #[test]
    fn tampering_is_undecryptable() {
        let k = Keyring::generate();
        let env = seal(&k, &ID, b"secret").unwrap();
        for i in 8..env.len() {
            let mut t = env.clone();
            t[i] ^= 0x01;
            assert_eq!(
                open(&k, &ID, &t).unwrap_err(),
                OpenError::Undecryptable { version: 1 },
                "byte {i}"
            );
        }
        let mut longer = env.clone();
        longer.push(0);
        assert_eq!(
            open(&k, &ID, &longer).unwrap_err(),
            OpenError::Undecryptable { version: 1 }
        );
        assert_eq!(
            open(&k, &ID, &env[..env.len() - 1]).unwrap_err(),
            OpenError::Undecryptable { version: 1 }
        );
    }

    #[test]
    fn wrong_identity_is_undecryptable() {
        let k = Keyring::generate();
        let env = seal(&k, &ID, b"secret").unwrap();
        for id in [
            RecordIdentity {
                tenant: "evil",
                ..ID
            },
            RecordIdentity {
                subject: "bob",
                ..ID
            },
            RecordIdentity {
                provider: "github",
                ..ID
            },
            // Length prefixes keep shifted boundaries apart.
            RecordIdentity {
                tenant: "acmea",
                subject: "lice",
                provider: "google",
            },
        ] {
            assert_eq!(
                open(&k, &id, &env).unwrap_err(),
                OpenError::Undecryptable { version: 1 }
            );
        }
    }

    #[test]
    fn header_moved_to_another_key_version_fails() {
        let mut k = Keyring::generate();
        let env = seal(&k, &ID, b"secret").unwrap();
        let v2 = k.add().unwrap();
        let mut moved = env.clone();
        moved[4..8].copy_from_slice(&v2.get().to_be_bytes());
        assert_eq!(
            open(&k, &ID, &moved).unwrap_err(),
            OpenError::Undecryptable { version: 2 }
        );
        moved[4..8].copy_from_slice(&3u32.to_be_bytes());
        assert_eq!(
            open(&k, &ID, &moved).unwrap_err(),
            OpenError::KeyVersionUnavailable { version: 3 }
        );
        // Re-sealing genuinely under v2 works, and is bound to v2.
        let resealed = seal_with(&k, v2, &ID, &open(&k, &ID, &env).unwrap()).unwrap();
        assert_eq!(key_version_of(&resealed).unwrap(), v2);
        let mut back = resealed.clone();
        back[4..8].copy_from_slice(&1u32.to_be_bytes());
        assert_eq!(
            open(&k, &ID, &back).unwrap_err(),
            OpenError::Undecryptable { version: 1 }
        );
    }

    #[test]
    fn seal_with_requires_active_key() {
        let mut k = Keyring::generate();
        let v2 = k.add().unwrap();
        k.promote(v2).unwrap();
        k.retire(v(1)).unwrap();
        assert!(matches!(
            seal_with(&k, v(1), &ID, b"x"),
            Err(SealError::Key(KeyringError::WrongState { .. }))
        ));
        assert!(matches!(
            seal_with(&k, v(9), &ID, b"x"),
            Err(SealError::Key(KeyringError::UnknownVersion(_)))
        ));
    }

    #[test]
    fn arbitrary_bytes_never_panic() {
        let k = Keyring::generate();
        let env = seal(&k, &ID, b"abc").unwrap();
        for len in 0..=env.len() {
            let _ = open(&k, &ID, &env[..len]);
            let _ = key_version_of(&env[..len]);
        }
        let mut state = 0x1234_5678u32;
        for _ in 0..2000 {
            state = state.wrapping_mul(1_103_515_245).wrapping_add(12345);
            let len = (state >> 16) as usize % 64;
            let mut bytes: Vec<u8> = (0..len).map(|i| (state >> (i % 24)) as u8).collect();
            if len >= 4 && state & 1 == 0 {
                bytes[..4].copy_from_slice(b"CV\x01\x01");
            }
            let _ = open(&k, &ID, &bytes);
        }
    }

    #[test]
    fn errors_carry_no_secrets() {
        let k = Keyring::generate();
        let env = seal(&k, &ID, b"plaintext-marker").unwrap();
        let mut t = env.clone();
        t[25] ^= 1;
        let msg = open(&k, &ID, &t).unwrap_err().to_string();
        assert_eq!(msg, "record under key version 1 cannot be decrypted");
        assert!(!msg.contains("plaintext-marker"));
    }
}
