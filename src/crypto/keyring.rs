//! The keyring: versioned 256-bit data keys, each with a state, and one primary.
//!
//! Versions are never reused: a destroyed key leaves a tombstone behind, so a
//! record sealed under version `n` can only ever be opened by the key that was
//! `n` when it was sealed. Key bytes never leave this module except through
//! `KeyMaterial::expose`, which is crate-private; everything printable
//! ([`Fingerprint`], [`KeyInfo`], the `Debug` impls) carries no key material.

use std::collections::BTreeMap;
use std::fmt;
use std::num::NonZeroU32;
use std::time::{SystemTime, UNIX_EPOCH};

use rand::rngs::OsRng;
use rand::RngCore;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

/// Length of every data key, in bytes (AES-256).
pub const KEY_LEN: usize = 32;

/// Domain separation, so a fingerprint can never collide with another use of
/// SHA-256 over the same key.
const FINGERPRINT_CONTEXT: &[u8] = b"credvault key fingerprint v1\0";

/// A key version. Zero is reserved as invalid, so a zeroed header never names a key.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct KeyVersion(NonZeroU32);

impl KeyVersion {
    /// The first version of every keyring.
    pub const FIRST: KeyVersion = KeyVersion(NonZeroU32::MIN);

    /// `None` for 0.
    pub fn new(version: u32) -> Option<Self> {
        NonZeroU32::new(version).map(Self)
    }

    /// The version as a plain number (never 0).
    pub fn get(self) -> u32 {
        self.0.get()
    }

    fn next(self) -> Option<Self> {
        self.0.checked_add(1).map(Self)
    }
}

impl fmt::Display for KeyVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// The lifecycle state of one key version.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum KeyState {
    /// May be the primary (new writes) and decrypts. Newly added keys start here.
    Active,
    /// A former primary: no new writes, still decrypts records not yet rewrapped.
    #[serde(alias = "decryptonly", alias = "decrypt_only")]
    DecryptOnly,
    /// Taken out of service: key bytes kept but no longer used, so a record
    /// still under it fails as KEY_VERSION_UNAVAILABLE while the operator can
    /// still undo (`reactivate`). The safe step before `destroy`.
    Retired,
    /// Tombstone: key bytes erased; the version stays reserved forever.
    Destroyed,
}

impl KeyState {
    /// The lowercase name used in files, CLI output and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            KeyState::Active => "active",
            KeyState::DecryptOnly => "decrypt-only",
            KeyState::Retired => "retired",
            KeyState::Destroyed => "destroyed",
        }
    }
}

impl fmt::Display for KeyState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A short, one-way identifier of a key: safe to log, store and compare.
///
/// The store remembers the fingerprint of every version it has used, so a
/// keyring whose version `n` holds different bytes is caught at load instead of
/// turning every record into a false "undecryptable".
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Fingerprint([u8; 8]);

impl Fingerprint {
    /// Fingerprint of raw key bytes.
    pub fn of(key: &[u8; KEY_LEN]) -> Self {
        let digest = Sha256::new()
            .chain_update(FINGERPRINT_CONTEXT)
            .chain_update(key)
            .finalize();
        let mut out = [0u8; 8];
        out.copy_from_slice(&digest[..8]);
        Self(out)
    }

    /// The 8 fingerprint bytes.
    pub fn as_bytes(&self) -> &[u8; 8] {
        &self.0
    }
}

impl fmt::Display for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl fmt::Debug for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Fingerprint({self})")
    }
}

/// One 256-bit key, zeroized on drop.
#[derive(Clone)]
pub struct KeyMaterial {
    version: KeyVersion,
    fingerprint: Fingerprint,
    key: Zeroizing<[u8; KEY_LEN]>,
}

impl KeyMaterial {
    pub(crate) fn new(version: KeyVersion, key: Zeroizing<[u8; KEY_LEN]>) -> Self {
        Self {
            version,
            fingerprint: Fingerprint::of(&key),
            key,
        }
    }

    /// The version this key was issued as.
    pub fn version(&self) -> KeyVersion {
        self.version
    }

    /// The key's fingerprint.
    pub fn fingerprint(&self) -> Fingerprint {
        self.fingerprint
    }

    /// The raw key. Crate-private so only the envelope and keyring file code
    /// can reach it.
    pub(crate) fn expose(&self) -> &[u8; KEY_LEN] {
        &self.key
    }
}

impl fmt::Debug for KeyMaterial {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyMaterial")
            .field("version", &self.version.get())
            .field("fingerprint", &self.fingerprint)
            .finish_non_exhaustive()
    }
}

/// What may be shown about one key version: never its bytes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyInfo {
    /// The version.
    pub version: KeyVersion,
    /// Its state.
    pub state: KeyState,
    /// `None` once destroyed.
    pub fingerprint: Option<Fingerprint>,
    /// Creation time, seconds since the Unix epoch.
    pub created_at_unix: i64,
    /// Whether new writes use this version.
    pub primary: bool,
}

/// A key version cannot be used for decryption.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum KeyUnavailable {
    /// The keyring has never had this version (or it belongs to another keyring).
    #[error("key version {0} is not in the keyring")]
    Unknown(KeyVersion),
    /// The version existed and was destroyed.
    #[error("key version {0} has been destroyed")]
    Destroyed(KeyVersion),
    /// The version is retired: kept, but no longer used.
    #[error("key version {0} is retired")]
    Retired(KeyVersion),
}

impl KeyUnavailable {
    /// The version that was asked for.
    pub fn version(&self) -> KeyVersion {
        match *self {
            KeyUnavailable::Unknown(v)
            | KeyUnavailable::Destroyed(v)
            | KeyUnavailable::Retired(v) => v,
        }
    }
}

/// A rotation operation was refused; the keyring is unchanged.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum KeyringError {
    /// No such version.
    #[error("key version {0} is not in the keyring")]
    UnknownVersion(KeyVersion),
    /// The operation needs the version in another state.
    #[error("key version {version} is {state}; {operation} needs it {expected}")]
    WrongState {
        /// The version operated on.
        version: KeyVersion,
        /// Its current state.
        state: KeyState,
        /// The state the operation requires.
        expected: KeyState,
        /// `promote`, `retire` or `destroy`.
        operation: &'static str,
    },
    /// Retiring or destroying the primary would leave new writes without a key.
    #[error("key version {0} is the primary; promote another version first")]
    IsPrimary(KeyVersion),
    /// All 2^32-1 versions have been used.
    #[error("no key versions left")]
    VersionsExhausted,
}

#[derive(Clone)]
pub(crate) struct Entry {
    pub(crate) state: KeyState,
    pub(crate) created_at_unix: i64,
    /// `None` exactly when `state` is `Destroyed`.
    pub(crate) material: Option<KeyMaterial>,
}

/// Versioned keys with exactly one primary (which is always `Active`).
///
/// Cloning is cheap enough for copy-on-write rotation (clone, modify, swap)
/// and every copy zeroizes its keys on drop.
#[derive(Clone)]
pub struct Keyring {
    entries: BTreeMap<KeyVersion, Entry>,
    primary: KeyVersion,
}

fn now_unix() -> i64 {
    // A clock before 1970 is a broken host, not a reason to fail key creation.
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

fn fresh_key(version: KeyVersion) -> KeyMaterial {
    let mut key = Zeroizing::new([0u8; KEY_LEN]);
    OsRng.fill_bytes(key.as_mut());
    KeyMaterial::new(version, key)
}

impl Keyring {
    /// A new keyring with one fresh random key: version 1, active, primary.
    ///
    /// Panics only if the operating system cannot supply randomness.
    pub fn generate() -> Keyring {
        let mut entries = BTreeMap::new();
        entries.insert(
            KeyVersion::FIRST,
            Entry {
                state: KeyState::Active,
                created_at_unix: now_unix(),
                material: Some(fresh_key(KeyVersion::FIRST)),
            },
        );
        Keyring {
            entries,
            primary: KeyVersion::FIRST,
        }
    }

    /// Rebuilds a keyring from decoded parts, enforcing every invariant; the
    /// error text names the broken rule and never any key bytes.
    pub(crate) fn from_parts(
        entries: Vec<(KeyVersion, Entry)>,
        primary: KeyVersion,
    ) -> Result<Keyring, String> {
        let mut map = BTreeMap::new();
        for (version, entry) in entries {
            match (&entry.material, entry.state) {
                (Some(_), KeyState::Destroyed) => {
                    return Err(format!(
                        "destroyed key version {version} still carries key bytes"
                    ))
                }
                (None, KeyState::Active | KeyState::DecryptOnly | KeyState::Retired) => {
                    return Err(format!("key version {version} has no key bytes"))
                }
                _ => {}
            }
            if let Some(m) = &entry.material {
                if m.version != version {
                    return Err(format!("key version {version} is mislabelled"));
                }
            }
            if map.insert(version, entry).is_some() {
                return Err(format!("key version {version} appears more than once"));
            }
        }
        match map.get(&primary) {
            None => Err(format!(
                "primary key version {primary} is not in the keyring"
            )),
            Some(e) if e.state != KeyState::Active => Err(format!(
                "primary key version {primary} is {}, not active",
                e.state
            )),
            Some(_) => Ok(Keyring {
                entries: map,
                primary,
            }),
        }
    }

    pub(crate) fn entries(&self) -> impl Iterator<Item = (KeyVersion, &Entry)> {
        self.entries.iter().map(|(v, e)| (*v, e))
    }

    /// The version new writes are sealed with.
    pub fn primary(&self) -> KeyVersion {
        self.primary
    }

    /// The key for opening a record sealed under `version` (active or decrypt-only).
    pub fn key_for_decrypt(&self, version: KeyVersion) -> Result<&KeyMaterial, KeyUnavailable> {
        match self.entries.get(&version) {
            None => Err(KeyUnavailable::Unknown(version)),
            Some(e) if e.state == KeyState::Retired => Err(KeyUnavailable::Retired(version)),
            Some(e) => e
                .material
                .as_ref()
                .ok_or(KeyUnavailable::Destroyed(version)),
        }
    }

    /// The key for sealing under `version`: only active keys take new writes.
    pub fn key_for_encrypt(&self, version: KeyVersion) -> Result<&KeyMaterial, KeyringError> {
        self.sealing_key(version, KeyState::Active, "sealing")
    }

    /// The key for sealing under `version` during a primary's rollout to
    /// the other replicas: active, or decrypt-only (the previous primary).
    pub fn key_for_rollout(&self, version: KeyVersion) -> Result<&KeyMaterial, KeyringError> {
        self.sealing_key(version, KeyState::DecryptOnly, "sealing during a rollout")
    }

    /// A key with its bytes in state `weakest` or active (active keys seal
    /// in every case).
    fn sealing_key(
        &self,
        version: KeyVersion,
        weakest: KeyState,
        operation: &'static str,
    ) -> Result<&KeyMaterial, KeyringError> {
        let entry = self
            .entries
            .get(&version)
            .ok_or(KeyringError::UnknownVersion(version))?;
        match (&entry.material, entry.state) {
            (Some(m), state) if state == KeyState::Active || state == weakest => Ok(m),
            _ => Err(KeyringError::WrongState {
                version,
                state: entry.state,
                expected: weakest,
                operation,
            }),
        }
    }

    /// Every version ever issued, ascending, tombstones included.
    pub fn versions(&self) -> Vec<KeyInfo> {
        self.entries
            .iter()
            .map(|(v, e)| KeyInfo {
                version: *v,
                state: e.state,
                fingerprint: e.material.as_ref().map(KeyMaterial::fingerprint),
                created_at_unix: e.created_at_unix,
                primary: *v == self.primary,
            })
            .collect()
    }

    /// The state of `version`, if it was ever issued.
    pub fn state(&self, version: KeyVersion) -> Option<KeyState> {
        self.entries.get(&version).map(|e| e.state)
    }

    /// The fingerprint of `version`; `None` if unknown or destroyed.
    pub fn fingerprint(&self, version: KeyVersion) -> Option<Fingerprint> {
        self.entries
            .get(&version)
            .and_then(|e| e.material.as_ref())
            .map(KeyMaterial::fingerprint)
    }

    /// Adds a fresh active key under the next never-used version; it is not
    /// primary until [`Keyring::promote`]d.
    ///
    /// Panics only if the operating system cannot supply randomness.
    pub fn add(&mut self) -> Result<KeyVersion, KeyringError> {
        // Tombstones are kept, so the largest key is the largest ever issued.
        let version = match self.entries.keys().next_back() {
            Some(max) => max.next().ok_or(KeyringError::VersionsExhausted)?,
            None => KeyVersion::FIRST,
        };
        self.entries.insert(
            version,
            Entry {
                state: KeyState::Active,
                created_at_unix: now_unix(),
                material: Some(fresh_key(version)),
            },
        );
        Ok(version)
    }

    /// Makes `version` (active, or decrypt-only to roll back) the primary for
    /// new writes; the previous primary becomes decrypt-only.
    pub fn promote(&mut self, version: KeyVersion) -> Result<(), KeyringError> {
        self.require_state_in(
            version,
            &[KeyState::Active, KeyState::DecryptOnly],
            KeyState::Active,
            "promote",
        )?;
        if version == self.primary {
            return Ok(());
        }
        let previous = self.primary;
        if let Some(e) = self.entries.get_mut(&previous) {
            e.state = KeyState::DecryptOnly;
        }
        if let Some(e) = self.entries.get_mut(&version) {
            e.state = KeyState::Active;
        }
        self.primary = version;
        Ok(())
    }

    /// Active or decrypt-only -> retired: no longer used to decrypt. Refused
    /// for the primary. Reversible with [`Keyring::reactivate`].
    pub fn retire(&mut self, version: KeyVersion) -> Result<(), KeyringError> {
        if version == self.primary {
            return Err(KeyringError::IsPrimary(version));
        }
        self.require_state_in(
            version,
            &[KeyState::Active, KeyState::DecryptOnly],
            KeyState::DecryptOnly,
            "retire",
        )?;
        if let Some(e) = self.entries.get_mut(&version) {
            e.state = KeyState::Retired;
        }
        Ok(())
    }

    /// Retired -> decrypt-only: undoes a retirement that turned out early.
    pub fn reactivate(&mut self, version: KeyVersion) -> Result<(), KeyringError> {
        self.require_state(version, KeyState::Retired, "reactivate")?;
        if let Some(e) = self.entries.get_mut(&version) {
            e.state = KeyState::DecryptOnly;
        }
        Ok(())
    }

    /// Retired -> destroyed: the key bytes are zeroized and dropped, the
    /// tombstone keeps the version from ever being reused.
    pub fn destroy(&mut self, version: KeyVersion) -> Result<(), KeyringError> {
        if version == self.primary {
            return Err(KeyringError::IsPrimary(version));
        }
        self.require_state(version, KeyState::Retired, "destroy")?;
        if let Some(e) = self.entries.get_mut(&version) {
            e.state = KeyState::Destroyed;
            // Dropping the `Zeroizing` wipes the bytes.
            e.material = None;
        }
        Ok(())
    }

    fn require_state_in(
        &self,
        version: KeyVersion,
        allowed: &[KeyState],
        expected: KeyState,
        operation: &'static str,
    ) -> Result<(), KeyringError> {
        let entry = self
            .entries
            .get(&version)
            .ok_or(KeyringError::UnknownVersion(version))?;
        if allowed.contains(&entry.state) {
            Ok(())
        } else {
            Err(KeyringError::WrongState {
                version,
                state: entry.state,
                expected,
                operation,
            })
        }
    }

    fn require_state(
        &self,
        version: KeyVersion,
        expected: KeyState,
        operation: &'static str,
    ) -> Result<(), KeyringError> {
        let entry = self
            .entries
            .get(&version)
            .ok_or(KeyringError::UnknownVersion(version))?;
        if entry.state == expected {
            Ok(())
        } else {
            Err(KeyringError::WrongState {
                version,
                state: entry.state,
                expected,
                operation,
            })
        }
    }
}

impl fmt::Debug for Keyring {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Keyring")
            .field("primary", &self.primary.get())
            .field("versions", &self.versions())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::Engine;

    fn v(n: u32) -> KeyVersion {
        KeyVersion::new(n).unwrap()
    }

    #[test]
    fn version_zero_is_invalid() {
        assert!(KeyVersion::new(0).is_none());
        assert_eq!(v(7).get(), 7);
        assert_eq!(v(7).to_string(), "7");
    }

    #[test]
    fn generate_makes_one_active_primary() {
        let k = Keyring::generate();
        assert_eq!(k.primary(), v(1));
        let infos = k.versions();
        assert_eq!(infos.len(), 1);
        assert_eq!(infos[0].state, KeyState::Active);
        assert!(infos[0].primary);
        assert!(infos[0].created_at_unix > 1_600_000_000);
        assert_eq!(infos[0].fingerprint, k.fingerprint(v(1)));
        assert_eq!(k.key_for_decrypt(v(1)).unwrap().version(), v(1));
        assert_eq!(k.key_for_encrypt(k.primary()).unwrap().version(), v(1));
        assert_eq!(
            k.key_for_decrypt(v(2)).unwrap_err(),
            KeyUnavailable::Unknown(v(2))
        );
    }

    #[test]
    fn keys_are_random() {
        let a = Keyring::generate();
        let b = Keyring::generate();
        assert_ne!(
            a.key_for_encrypt(v(1)).unwrap().expose(),
            b.key_for_encrypt(v(1)).unwrap().expose()
        );
        assert_ne!(a.fingerprint(v(1)), b.fingerprint(v(1)));
    }

    #[test]
    fn fingerprint_is_domain_separated_sha256_prefix() {
        let key = [7u8; KEY_LEN];
        let fp = Fingerprint::of(&key);
        let mut h = Sha256::new();
        h.update(b"credvault key fingerprint v1\0");
        h.update(key);
        let expect = hex::encode(&h.finalize()[..8]);
        assert_eq!(fp.to_string(), expect);
        assert_eq!(fp.to_string().len(), 16);
    }

    #[test]
    fn rotation_lifecycle() {
        let mut k = Keyring::generate();
        let v2 = k.add().unwrap();
        assert_eq!(v2, v(2));
        assert_eq!(k.primary(), v(1));
        k.promote(v2).unwrap();
        assert_eq!(k.primary(), v2);
        // The old primary only decrypts now.
        assert_eq!(k.state(v(1)), Some(KeyState::DecryptOnly));
        assert!(k.key_for_decrypt(v(1)).is_ok());
        assert!(k.key_for_encrypt(v(1)).is_err());

        // The primary cannot be retired or destroyed.
        assert_eq!(k.retire(v2), Err(KeyringError::IsPrimary(v2)));
        assert_eq!(k.destroy(v2), Err(KeyringError::IsPrimary(v2)));

        // Destroy needs retired first.
        assert!(matches!(
            k.destroy(v(1)),
            Err(KeyringError::WrongState {
                state: KeyState::DecryptOnly,
                ..
            })
        ));
        k.retire(v(1)).unwrap();
        assert_eq!(k.state(v(1)), Some(KeyState::Retired));
        assert_eq!(
            k.key_for_decrypt(v(1)).unwrap_err(),
            KeyUnavailable::Retired(v(1))
        );
        // A retired key cannot be promoted, but can be reactivated.
        assert!(matches!(
            k.promote(v(1)),
            Err(KeyringError::WrongState { .. })
        ));
        k.reactivate(v(1)).unwrap();
        assert!(k.key_for_decrypt(v(1)).is_ok());
        k.retire(v(1)).unwrap();

        k.destroy(v(1)).unwrap();
        assert_eq!(k.state(v(1)), Some(KeyState::Destroyed));
        assert_eq!(
            k.key_for_decrypt(v(1)).unwrap_err(),
            KeyUnavailable::Destroyed(v(1))
        );
        assert_eq!(k.fingerprint(v(1)), None);
        assert!(k.reactivate(v(1)).is_err());
        let info = &k.versions()[0];
        assert_eq!(
            (info.version, info.state, info.fingerprint),
            (v(1), KeyState::Destroyed, None)
        );
        assert!(k.entries.get(&v(1)).unwrap().material.is_none());

        // Versions are never reused, even after destroying the highest non-primary.
        let v3 = k.add().unwrap();
        assert_eq!(v3, v(3));
        k.retire(v3).unwrap();
        k.destroy(v3).unwrap();
        assert_eq!(k.add().unwrap(), v(4));
        assert_eq!(k.versions().len(), 4);

        // Rolling back: a decrypt-only former primary can be promoted again.
        let v5 = k.add().unwrap();
        k.promote(v5).unwrap();
        k.promote(v2).unwrap();
        assert_eq!(k.primary(), v2);
        assert_eq!(k.state(v5), Some(KeyState::DecryptOnly));

        assert_eq!(k.promote(v(99)), Err(KeyringError::UnknownVersion(v(99))));
    }

    #[test]
    fn versions_exhausted_is_an_error_not_a_panic() {
        let k = Keyring::generate();
        let mut entries: Vec<_> = k.entries().map(|(v, e)| (v, e.clone())).collect();
        let max = v(u32::MAX);
        entries.push((
            max,
            Entry {
                state: KeyState::Destroyed,
                created_at_unix: 0,
                material: None,
            },
        ));
        let mut k = Keyring::from_parts(entries, v(1)).unwrap();
        assert_eq!(k.add(), Err(KeyringError::VersionsExhausted));
    }

    #[test]
    fn from_parts_enforces_invariants() {
        let key = |n| Some(KeyMaterial::new(v(n), Zeroizing::new([n as u8; KEY_LEN])));
        let e = |state, material| Entry {
            state,
            created_at_unix: 0,
            material,
        };
        assert!(Keyring::from_parts(vec![(v(1), e(KeyState::Active, key(1)))], v(1)).is_ok());
        assert!(Keyring::from_parts(vec![], v(1)).is_err());
        assert!(Keyring::from_parts(vec![(v(1), e(KeyState::Active, key(1)))], v(2)).is_err());
        assert!(Keyring::from_parts(vec![(v(1), e(KeyState::DecryptOnly, key(1)))], v(1)).is_err());
        assert!(Keyring::from_parts(
            vec![
                (v(1), e(KeyState::Active, key(1))),
                (v(1), e(KeyState::Active, key(1)))
            ],
            v(1)
        )
        .is_err());
        assert!(Keyring::from_parts(
            vec![
                (v(1), e(KeyState::Active, key(1))),
                (v(2), e(KeyState::Destroyed, key(2)))
            ],
            v(1)
        )
        .is_err());
        assert!(Keyring::from_parts(
            vec![
                (v(1), e(KeyState::Active, key(1))),
                (v(2), e(KeyState::Active, None))
            ],
            v(1)
        )
        .is_err());
    }

    #[test]
    fn debug_never_shows_key_bytes() {
        let mut k = Keyring::generate();
        k.add().unwrap();
        for (_, entry) in k.entries() {
            let m = entry.material.as_ref().unwrap();
            let bytes = m.expose();
            let needles = [
                hex::encode(bytes),
                hex::encode_upper(bytes),
                base64::engine::general_purpose::STANDARD.encode(bytes),
                base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes),
                format!("{:?}", &bytes[..]),
                format!("{:?}", &bytes[..4])
                    .trim_end_matches(']')
                    .to_string(),
            ];
            for dbg in [
                format!("{k:?}"),
                format!("{k:#?}"),
                format!("{m:?}"),
                format!("{m:#?}"),
            ] {
                for needle in &needles {
                    assert!(!dbg.contains(needle.as_str()), "{dbg} leaks key bytes");
                }
            }
            assert!(format!("{m:?}").contains(&m.fingerprint().to_string()));
        }
    }

    #[test]
    fn state_names() {
        assert_eq!(
            serde_json::to_string(&KeyState::DecryptOnly).unwrap(),
            "\"decrypt-only\""
        );
        assert_eq!(
            serde_json::to_string(&KeyState::Active).unwrap(),
            "\"active\""
        );
        assert_eq!(
            serde_json::from_str::<KeyState>("\"decryptonly\"").unwrap(),
            KeyState::DecryptOnly
        );
        assert_eq!(KeyState::Destroyed.to_string(), "destroyed");
    }
}
