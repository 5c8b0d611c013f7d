//! The keyring at rest: sealed with AES-256-GCM-SIV under a key that Argon2id
//! derives from an operator passphrase.
//!
//! Layout (big-endian):
//!
//! ```text
//! 0   4   magic "CVKR"
//! 4   1   format version (1)
//! 5   4   Argon2id m_cost (KiB)
//! 9   4   Argon2id t_cost
//! 13  4   Argon2id p_cost
//! 17  16  salt
//! 33  12  nonce
//! 45  n   ciphertext + 16-byte tag of the JSON keyring
//! ```
//!
//! The whole header is the associated data, so the KDF parameters cannot be
//! downgraded without the passphrase. The JSON plaintext holds the key bytes
//! (base64) and is only ever kept in zeroizing buffers.

use std::fmt;
use std::fs;
use std::path::{Path, PathBuf};

use aes_gcm_siv::aead::{AeadInPlace, KeyInit};
use aes_gcm_siv::{Aes256GcmSiv, Key, Nonce, Tag};
use argon2::{Algorithm, Argon2, Params, Version};
use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine;
use rand::rngs::OsRng;
use rand::RngCore;
use serde::de::{self, Deserializer, Visitor};
use serde::ser::{SerializeStruct, Serializer};
use serde::{Deserialize, Serialize};
use zeroize::{Zeroize, Zeroizing};

use super::keyring::{Entry, KeyMaterial, KeyState, KeyVersion, Keyring, KEY_LEN};
use crate::{files, secret::SecretString};

/// The first four bytes of a keyring file.
pub const MAGIC: [u8; 4] = *b"CVKR";
/// The only keyring file format this build writes and reads.
pub const FORMAT_VERSION: u8 = 1;
/// Shortest passphrase accepted when sealing, in characters.
pub const MIN_PASSPHRASE_CHARS: usize = 8;

const SALT_LEN: usize = 16;
const NONCE_LEN: usize = 12;
const TAG_LEN: usize = 16;
const PARAMS_AT: usize = 5;
const SALT_AT: usize = PARAMS_AT + 12;
const NONCE_AT: usize = SALT_AT + SALT_LEN;
const HEADER_LEN: usize = NONCE_AT + NONCE_LEN;

/// Upper bounds on KDF parameters, so a hostile file cannot make us allocate
/// or spin without limit before the passphrase is even checked.
// Ceilings on the header's Argon2 parameters. The header is readable (and,
// by anyone who can write the keyring Secret, writable) without the
// passphrase, and a running vault derives on every automatic reload: these
// bound what such a write can cost to well under a second of one core and
// 256 MiB, about 13 times OWASP's recommendation.
const MAX_M_COST_KIB: u32 = 256 * 1024;
const MAX_T_COST: u32 = 10;
const MAX_P_COST: u32 = 8;

/// Argon2id cost parameters, stored in the file header.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct KdfParams {
    /// Memory, in KiB.
    pub m_cost_kib: u32,
    /// Iterations.
    pub t_cost: u32,
    /// Lanes.
    pub p_cost: u32,
}

impl Default for KdfParams {
    /// OWASP's Argon2id recommendation: 19 MiB, 2 iterations, 1 lane.
    fn default() -> Self {
        Self {
            m_cost_kib: 19_456,
            t_cost: 2,
            p_cost: 1,
        }
    }
}

impl KdfParams {
    /// Cheap parameters for tests and throwaway dev keyrings.
    pub fn fast_for_tests() -> Self {
        Self {
            m_cost_kib: 1024,
            t_cost: 1,
            p_cost: 1,
        }
    }

    fn to_argon2(self) -> Result<Argon2<'static>, KeyringFileError> {
        if self.m_cost_kib > MAX_M_COST_KIB || self.t_cost > MAX_T_COST || self.p_cost > MAX_P_COST
        {
            return Err(KeyringFileError::Kdf(format!(
                "parameters out of bounds (m_cost {} KiB, t_cost {}, p_cost {}; limits {MAX_M_COST_KIB}, {MAX_T_COST}, {MAX_P_COST})",
                self.m_cost_kib, self.t_cost, self.p_cost
            )));
        }
        let params = Params::new(self.m_cost_kib, self.t_cost, self.p_cost, Some(KEY_LEN))
            .map_err(|e| KeyringFileError::Kdf(format!("invalid parameters: {e}")))?;
        Ok(Argon2::new(Algorithm::Argon2id, Version::V0x13, params))
    }
}

/// Loading or storing the keyring file failed.
#[derive(Debug, thiserror::Error)]
pub enum KeyringFileError {
    /// Reading or writing the file (or its directory) failed.
    #[error("keyring file {}: {source}", path.display())]
    Io {
        /// The file or directory involved.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// Too short or wrong magic.
    #[error("not a credvault keyring file")]
    NotAKeyring,
    /// A newer or unknown format version.
    #[error("unsupported keyring file format {0}")]
    UnsupportedFormat(u8),
    /// Authentication failed; the two causes cannot be told apart.
    #[error("wrong passphrase or corrupted keyring file")]
    WrongPassphrase,
    /// Decrypted, but the contents break a keyring invariant.
    #[error("malformed keyring: {0}")]
    Malformed(String),
    /// The passphrase is too short to seal with.
    #[error("keyring passphrase must be at least {MIN_PASSPHRASE_CHARS} characters")]
    WeakPassphrase,
    /// KDF parameters rejected or derivation failed.
    #[error("keyring key derivation: {0}")]
    Kdf(String),
}

/// Seals `keyring` into the bytes of a keyring file, with a fresh salt and nonce.
pub fn seal_keyring(
    keyring: &Keyring,
    passphrase: &SecretString,
    params: KdfParams,
) -> Result<Vec<u8>, KeyringFileError> {
    if passphrase.expose().chars().count() < MIN_PASSPHRASE_CHARS {
        return Err(KeyringFileError::WeakPassphrase);
    }
    let argon2 = params.to_argon2()?;

    let mut salt = [0u8; SALT_LEN];
    OsRng.fill_bytes(&mut salt);
    let mut nonce = [0u8; NONCE_LEN];
    OsRng.fill_bytes(&mut nonce);

    let mut header = Vec::with_capacity(HEADER_LEN);
    header.extend_from_slice(&MAGIC);
    header.push(FORMAT_VERSION);
    for n in [params.m_cost_kib, params.t_cost, params.p_cost] {
        header.extend_from_slice(&n.to_be_bytes());
    }
    header.extend_from_slice(&salt);
    header.extend_from_slice(&nonce);

    let file_key = derive(&argon2, passphrase, &salt)?;
    let plaintext = to_json(keyring)?;

    let mut out = Vec::with_capacity(HEADER_LEN + plaintext.len() + TAG_LEN);
    out.extend_from_slice(&header);
    out.extend_from_slice(&plaintext);
    let body = &mut out[HEADER_LEN..];
    match cipher(&file_key).encrypt_in_place_detached(Nonce::from_slice(&nonce), &header, body) {
        Ok(tag) => {
            out.extend_from_slice(&tag);
            Ok(out)
        }
        Err(_) => {
            out.zeroize();
            Err(KeyringFileError::Malformed(
                "keyring too large to seal".into(),
            ))
        }
    }
}

/// Opens the bytes of a keyring file and validates the keyring inside.
pub fn open_keyring(bytes: &[u8], passphrase: &SecretString) -> Result<Keyring, KeyringFileError> {
    let [m0, m1, m2, m3, format, ..] = *bytes else {
        return Err(KeyringFileError::NotAKeyring);
    };
    if [m0, m1, m2, m3] != MAGIC {
        return Err(KeyringFileError::NotAKeyring);
    }
    if format != FORMAT_VERSION {
        return Err(KeyringFileError::UnsupportedFormat(format));
    }
    if bytes.len() < HEADER_LEN + TAG_LEN {
        return Err(KeyringFileError::NotAKeyring);
    }
    let (header, rest) = bytes.split_at(HEADER_LEN);
    let (ciphertext, tag) = rest.split_at(rest.len() - TAG_LEN);
    let params = KdfParams {
        m_cost_kib: be_u32(header, PARAMS_AT),
        t_cost: be_u32(header, PARAMS_AT + 4),
        p_cost: be_u32(header, PARAMS_AT + 8),
    };
    let argon2 = params.to_argon2()?;
    let file_key = derive(&argon2, passphrase, &header[SALT_AT..NONCE_AT])?;

    let mut plaintext = Zeroizing::new(ciphertext.to_vec());
    cipher(&file_key)
        .decrypt_in_place_detached(
            Nonce::from_slice(&header[NONCE_AT..]),
            header,
            plaintext.as_mut_slice(),
            Tag::from_slice(tag),
        )
        .map_err(|_| KeyringFileError::WrongPassphrase)?;
    from_json(&plaintext)
}

/// Reads and opens the keyring file at `path`.
pub fn load(path: &Path, passphrase: &SecretString) -> Result<Keyring, KeyringFileError> {
    let bytes = fs::read(path).map_err(|source| KeyringFileError::Io {
        path: path.to_owned(),
        source,
    })?;
    open_keyring(&bytes, passphrase)
}

/// Seals `keyring` and replaces the file at `path` atomically: a reader sees
/// the old file or the new one, never a torn write, even across a crash.
pub fn store(
    path: &Path,
    keyring: &Keyring,
    passphrase: &SecretString,
    params: KdfParams,
) -> Result<(), KeyringFileError> {
    let bytes = seal_keyring(keyring, passphrase, params)?;
    files::write_atomically(path, &bytes, files::Access::Private).map_err(|e| {
        KeyringFileError::Io {
            path: path.to_owned(),
            source: std::io::Error::other(e.message),
        }
    })
}

fn be_u32(bytes: &[u8], at: usize) -> u32 {
    let mut b = [0u8; 4];
    if let Some(s) = bytes.get(at..at + 4) {
        b.copy_from_slice(s);
    }
    u32::from_be_bytes(b)
}

fn derive(
    argon2: &Argon2<'_>,
    passphrase: &SecretString,
    salt: &[u8],
) -> Result<Zeroizing<[u8; KEY_LEN]>, KeyringFileError> {
    let mut key = Zeroizing::new([0u8; KEY_LEN]);
    argon2
        .hash_password_into(passphrase.expose().as_bytes(), salt, key.as_mut())
        .map_err(|e| KeyringFileError::Kdf(e.to_string()))?;
    Ok(key)
}

fn cipher(key: &[u8; KEY_LEN]) -> Aes256GcmSiv {
    Aes256GcmSiv::new(Key::<Aes256GcmSiv>::from_slice(key))
}

// ---- JSON body -------------------------------------------------------------

#[derive(Serialize)]
struct FileKeyringOut<'a> {
    primary: u32,
    keys: Vec<FileEntryOut<'a>>,
}

struct FileEntryOut<'a> {
    version: u32,
    entry: &'a Entry,
}

impl Serialize for FileEntryOut<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut st = s.serialize_struct("Key", 4)?;
        st.serialize_field("version", &self.version)?;
        st.serialize_field("state", &self.entry.state)?;
        st.serialize_field("created_at_unix", &self.entry.created_at_unix)?;
        st.serialize_field("key", &self.entry.material.as_ref().map(KeyB64Out))?;
        st.end()
    }
}

/// Base64 into a stack buffer that is wiped afterwards, so the encoded key
/// never lands in an un-zeroized heap string.
struct KeyB64Out<'a>(&'a KeyMaterial);

impl Serialize for KeyB64Out<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut buf = Zeroizing::new([0u8; 64]);
        let n = BASE64
            .encode_slice(self.0.expose(), buf.as_mut())
            .map_err(serde::ser::Error::custom)?;
        let text = std::str::from_utf8(&buf[..n]).map_err(serde::ser::Error::custom)?;
        s.serialize_str(text)
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileKeyringIn {
    primary: u32,
    keys: Vec<FileEntryIn>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileEntryIn {
    version: u32,
    state: KeyState,
    created_at_unix: i64,
    key: Option<KeyB64In>,
}

struct KeyB64In(Zeroizing<[u8; KEY_LEN]>);

impl<'de> Deserialize<'de> for KeyB64In {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = KeyB64In;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a base64 256-bit key")
            }
            fn visit_str<E: de::Error>(self, text: &str) -> Result<KeyB64In, E> {
                // Our own message: serde's default would echo the value.
                let mut buf = Zeroizing::new([0u8; 48]);
                match BASE64.decode_slice(text, buf.as_mut()) {
                    Ok(KEY_LEN) => {
                        let mut key = Zeroizing::new([0u8; KEY_LEN]);
                        key.copy_from_slice(&buf[..KEY_LEN]);
                        Ok(KeyB64In(key))
                    }
                    _ => Err(E::custom("key is not 32 bytes of base64")),
                }
            }
        }
        d.deserialize_str(V)
    }
}

/// Upper bound on the JSON of one entry, so the buffer never reallocates
/// (a reallocation would leave an un-zeroized copy of key bytes behind).
const JSON_PER_ENTRY: usize = 192;

fn to_json(keyring: &Keyring) -> Result<Zeroizing<Vec<u8>>, KeyringFileError> {
    let doc = FileKeyringOut {
        primary: keyring.primary().get(),
        keys: keyring
            .entries()
            .map(|(v, entry)| FileEntryOut {
                version: v.get(),
                entry,
            })
            .collect(),
    };
    let mut buf = Zeroizing::new(Vec::with_capacity(64 + JSON_PER_ENTRY * doc.keys.len()));
    serde_json::to_writer(&mut *buf, &doc).map_err(|e| {
        KeyringFileError::Malformed(format!("cannot encode keyring: {}", e.classify_str()))
    })?;
    Ok(buf)
}

fn from_json(plaintext: &[u8]) -> Result<Keyring, KeyringFileError> {
    let doc: FileKeyringIn = serde_json::from_slice(plaintext).map_err(|e| {
        // Position only: serde messages can quote values, and values include keys.
        KeyringFileError::Malformed(format!(
            "invalid contents ({} at line {} column {})",
            e.classify_str(),
            e.line(),
            e.column()
        ))
    })?;
    let invalid_version = |n: u32| {
        KeyVersion::new(n)
            .ok_or_else(|| KeyringFileError::Malformed(format!("key version {n} is invalid")))
    };
    let primary = invalid_version(doc.primary)?;
    let mut entries = Vec::with_capacity(doc.keys.len());
    for k in doc.keys {
        let version = invalid_version(k.version)?;
        entries.push((
            version,
            Entry {
                state: k.state,
                created_at_unix: k.created_at_unix,
                material: k.key.map(|b| KeyMaterial::new(version, b.0)),
            },
        ));
    }
    Keyring::from_parts(entries, primary).map_err(KeyringFileError::Malformed)
}

trait ClassifyStr {
    fn classify_str(&self) -> &'static str;
}

impl ClassifyStr for serde_json::Error {
    fn classify_str(&self) -> &'static str {
        match self.classify() {
            serde_json::error::Category::Io => "i/o error",
            serde_json::error::Category::Syntax => "syntax error",
            serde_json::error::Category::Data => "invalid data",
            serde_json::error::Category::Eof => "unexpected end",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pass() -> SecretString {
        SecretString::new("correct horse battery staple")
    }

    fn v(n: u32) -> KeyVersion {
        KeyVersion::new(n).unwrap()
    }

    fn seal_fast(k: &Keyring) -> Vec<u8> {
        seal_keyring(k, &pass(), KdfParams::fast_for_tests()).unwrap()
    }

    fn same(a: &Keyring, b: &Keyring) {
        assert_eq!(a.primary(), b.primary());
        assert_eq!(a.versions(), b.versions());
        for info in a.versions() {
            match (
                a.key_for_decrypt(info.version),
                b.key_for_decrypt(info.version),
            ) {
                (Ok(x), Ok(y)) => assert_eq!(x.expose(), y.expose()),
                (Err(x), Err(y)) => assert_eq!(x, y),
                _ => panic!("key availability differs for {}", info.version),
            }
        }
    }

    #[test]
    fn round_trip_with_rotation_history() {
        let mut k = Keyring::generate();
        let v2 = k.add().unwrap();
        k.promote(v2).unwrap();
        k.retire(v(1)).unwrap();
        k.destroy(v(1)).unwrap();
        let v3 = k.add().unwrap();
        k.promote(v3).unwrap();
        k.retire(v2).unwrap();
        k.add().unwrap();

        let bytes = seal_fast(&k);
        assert_eq!(&bytes[..4], b"CVKR");
        assert_eq!(bytes[4], 1);
        assert_eq!(be_u32(&bytes, 5), 1024);
        let back = open_keyring(&bytes, &pass()).unwrap();
        same(&k, &back);
        assert_eq!(back.state(v(1)), Some(KeyState::Destroyed));
        // The next version is still 5, not a reused 1.
        let mut back = back;
        assert_eq!(back.add().unwrap(), v(5));
    }

    #[test]
    fn default_params_round_trip() {
        assert_eq!(
            KdfParams::default(),
            KdfParams {
                m_cost_kib: 19_456,
                t_cost: 2,
                p_cost: 1
            }
        );
        let k = Keyring::generate();
        let bytes = seal_keyring(&k, &pass(), KdfParams::default()).unwrap();
        same(&k, &open_keyring(&bytes, &pass()).unwrap());
    }

    #[test]
    fn wrong_passphrase() {
        let bytes = seal_fast(&Keyring::generate());
        let err =
            open_keyring(&bytes, &SecretString::new("correct horse battery stapler")).unwrap_err();
        assert!(matches!(err, KeyringFileError::WrongPassphrase));
        assert_eq!(
            err.to_string(),
            "wrong passphrase or corrupted keyring file"
        );
    }

    #[test]
    fn weak_passphrase_refused_at_seal() {
        let k = Keyring::generate();
        for p in ["", "short", "1234567", "äöüäöüä"] {
            assert!(matches!(
                seal_keyring(&k, &SecretString::new(p), KdfParams::fast_for_tests()),
                Err(KeyringFileError::WeakPassphrase)
            ));
        }
        assert!(seal_keyring(
            &k,
            &SecretString::new("12345678"),
            KdfParams::fast_for_tests()
        )
        .is_ok());
    }

    #[test]
    fn truncated_and_foreign_files() {
        let bytes = seal_fast(&Keyring::generate());
        for len in [0, 3, 4, HEADER_LEN, HEADER_LEN + TAG_LEN - 1] {
            assert!(
                matches!(
                    open_keyring(&bytes[..len], &pass()),
                    Err(KeyringFileError::NotAKeyring)
                ),
                "len {len}"
            );
        }
        // Long enough to parse, but the tag no longer matches.
        assert!(matches!(
            open_keyring(&bytes[..bytes.len() - 1], &pass()),
            Err(KeyringFileError::WrongPassphrase)
        ));
        assert!(matches!(
            open_keyring(
                b"{\"primary\": 1, \"keys\": []} padding padding padding padding",
                &pass()
            ),
            Err(KeyringFileError::NotAKeyring)
        ));
        let mut future = bytes.clone();
        future[4] = 2;
        assert!(matches!(
            open_keyring(&future, &pass()),
            Err(KeyringFileError::UnsupportedFormat(2))
        ));
    }

    #[test]
    fn tampered_header_or_body_fails() {
        let bytes = seal_fast(&Keyring::generate());
        // Salt, nonce and body bytes (params are covered by the next test).
        for i in [SALT_AT, NONCE_AT, HEADER_LEN, bytes.len() - 1] {
            let mut t = bytes.clone();
            t[i] ^= 1;
            assert!(matches!(
                open_keyring(&t, &pass()),
                Err(KeyringFileError::WrongPassphrase)
            ));
        }
        // Params bumped within bounds: still authenticated via the AAD/KDF.
        let mut t = bytes.clone();
        t[PARAMS_AT + 4..PARAMS_AT + 8].copy_from_slice(&2u32.to_be_bytes());
        assert!(matches!(
            open_keyring(&t, &pass()),
            Err(KeyringFileError::WrongPassphrase)
        ));
    }

    #[test]
    fn hostile_kdf_params_are_refused_before_deriving() {
        let bytes = seal_fast(&Keyring::generate());
        for (at, value) in [
            (PARAMS_AT, u32::MAX), // 4 TiB of memory
            (PARAMS_AT, MAX_M_COST_KIB + 1),
            (PARAMS_AT, 4 * 1024 * 1024), // the review's 4 GiB
            (PARAMS_AT + 4, 100),         // and its 100 passes
            (PARAMS_AT + 4, 1_000_000),   // iterations
            (PARAMS_AT + 4, 0),
            (PARAMS_AT + 8, 255), // lanes
            (PARAMS_AT + 8, 0),
            (PARAMS_AT, 1), // below Argon2's minimum
        ] {
            let mut t = bytes.clone();
            t[at..at + 4].copy_from_slice(&value.to_be_bytes());
            assert!(
                matches!(open_keyring(&t, &pass()), Err(KeyringFileError::Kdf(_))),
                "offset {at} value {value}"
            );
        }
        assert!(matches!(
            seal_keyring(
                &Keyring::generate(),
                &pass(),
                KdfParams {
                    m_cost_kib: u32::MAX,
                    t_cost: 1,
                    p_cost: 1
                }
            ),
            Err(KeyringFileError::Kdf(_))
        ));
    }

    fn seal_raw_json(json: &str) -> Vec<u8> {
        // Builds a correctly sealed file around arbitrary contents.
        let params = KdfParams::fast_for_tests();
        let argon2 = params.to_argon2().unwrap();
        let mut header = Vec::new();
        header.extend_from_slice(&MAGIC);
        header.push(FORMAT_VERSION);
        for n in [params.m_cost_kib, params.t_cost, params.p_cost] {
            header.extend_from_slice(&n.to_be_bytes());
        }
        header.extend_from_slice(&[1; SALT_LEN]);
        header.extend_from_slice(&[2; NONCE_LEN]);
        let key = derive(&argon2, &pass(), &[1; SALT_LEN]).unwrap();
        let mut body = json.as_bytes().to_vec();
        let tag = cipher(&key)
            .encrypt_in_place_detached(Nonce::from_slice(&[2; NONCE_LEN]), &header, &mut body)
            .unwrap();
        [header, body, tag.to_vec()].concat()
    }

    #[test]
    fn malformed_contents_are_refused() {
        let key = BASE64.encode([9u8; 32]);
        let ok = format!(
            r#"{{"primary":1,"keys":[{{"version":1,"state":"active","created_at_unix":0,"key":"{key}"}}]}}"#
        );
        assert!(open_keyring(&seal_raw_json(&ok), &pass()).is_ok());

        let cases = [
            // no such primary
            format!(r#"{{"primary":2,"keys":[{{"version":1,"state":"active","created_at_unix":0,"key":"{key}"}}]}}"#),
            // primary not active
            format!(r#"{{"primary":1,"keys":[{{"version":1,"state":"decrypt-only","created_at_unix":0,"key":"{key}"}}]}}"#),
            // duplicate version
            format!(r#"{{"primary":1,"keys":[{{"version":1,"state":"active","created_at_unix":0,"key":"{key}"}},{{"version":1,"state":"active","created_at_unix":0,"key":"{key}"}}]}}"#),
            // version zero
            format!(r#"{{"primary":1,"keys":[{{"version":1,"state":"active","created_at_unix":0,"key":"{key}"}},{{"version":0,"state":"decrypt-only","created_at_unix":0,"key":"{key}"}}]}}"#),
            // destroyed entry still has a key
            format!(r#"{{"primary":1,"keys":[{{"version":1,"state":"active","created_at_unix":0,"key":"{key}"}},{{"version":2,"state":"destroyed","created_at_unix":0,"key":"{key}"}}]}}"#),
            // live entry without a key
            r#"{"primary":1,"keys":[{"version":1,"state":"active","created_at_unix":0,"key":null}]}"#.to_string(),
            // short key
            r#"{"primary":1,"keys":[{"version":1,"state":"active","created_at_unix":0,"key":"c2VjcmV0LWtleS1ieXRlcw=="}]}"#.to_string(),
            // empty keyring
            r#"{"primary":1,"keys":[]}"#.to_string(),
            // unknown field
            format!(r#"{{"primary":1,"min_decrypt_version":1,"keys":[{{"version":1,"state":"active","created_at_unix":0,"key":"{key}"}}]}}"#),
            "not json".to_string(),
        ];
        for json in cases {
            let err = open_keyring(&seal_raw_json(&json), &pass()).unwrap_err();
            assert!(
                matches!(err, KeyringFileError::Malformed(_)),
                "{json}: {err:?}"
            );
            let msg = err.to_string();
            assert!(!msg.contains(&key) && !msg.contains("c2VjcmV0"), "{msg}");
        }
    }

    #[test]
    fn store_and_load_atomically_with_private_mode() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keyring.bin");
        let mut k = Keyring::generate();
        store(&path, &k, &pass(), KdfParams::fast_for_tests()).unwrap();
        same(&k, &load(&path, &pass()).unwrap());

        // Overwrite in place; no temp files left behind.
        k.add().unwrap();
        store(&path, &k, &pass(), KdfParams::fast_for_tests()).unwrap();
        same(&k, &load(&path, &pass()).unwrap());
        let names: Vec<_> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("keyring.bin")]);

        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }

        // A weak passphrase leaves the existing file untouched.
        assert!(matches!(
            store(
                &path,
                &k,
                &SecretString::new("short"),
                KdfParams::fast_for_tests()
            ),
            Err(KeyringFileError::WeakPassphrase)
        ));
        same(&k, &load(&path, &pass()).unwrap());
    }

    #[test]
    fn io_errors_name_the_path() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("nope");
        match load(&missing, &pass()) {
            Err(KeyringFileError::Io { path, source }) => {
                assert_eq!(path, missing);
                assert_eq!(source.kind(), std::io::ErrorKind::NotFound);
            }
            other => panic!("{other:?}"),
        }
        let in_missing_dir = dir.path().join("no-dir").join("keyring.bin");
        assert!(matches!(
            store(
                &in_missing_dir,
                &Keyring::generate(),
                &pass(),
                KdfParams::fast_for_tests()
            ),
            Err(KeyringFileError::Io { .. })
        ));
    }

    #[test]
    fn sealed_file_does_not_contain_key_bytes() {
        let k = Keyring::generate();
        let bytes = seal_fast(&k);
        let key = k.key_for_decrypt(v(1)).unwrap().expose();
        let b64 = BASE64.encode(key);
        assert!(!bytes.windows(KEY_LEN).any(|w| w == key));
        assert!(!bytes.windows(b64.len()).any(|w| w == b64.as_bytes()));
        assert!(!bytes.windows(9).any(|w| w == b"\"primary\""));
    }
}
