//! Encryption at rest (DESIGN §5a): everything that touches key material.
//!
//! - [`keyring`]: versioned 256-bit keys with a state each (active,
//!   decrypt-only, destroyed), one primary for new writes, fingerprints, and
//!   the rotation operations (add, promote, retire, reactivate, destroy).
//! - [`envelope`]: the per-record AES-256-GCM-SIV envelope, bound to
//!   (tenant, subject, provider, key version), and the classification of
//!   failures into corrupt / unsupported / key unavailable / undecryptable.
//! - [`keyring_file`]: the keyring sealed at rest under an Argon2id-derived
//!   key, written atomically.
//! - [`derived`]: keys derived from a keyring key for other purposes
//!   (backup authentication), one label each.
//! - [`shared`]: the running server's keyring, swapped atomically on reload.
//! - [`source`]: where that keyring is read from, again on every reload.
//!
//! Nothing printable from this module (errors, `Debug`, `Display`) carries key
//! bytes or plaintext. Randomness comes from the OS RNG; if the OS cannot
//! provide it, `rand` panics, since there is no safe way to continue.

pub mod derived;
pub mod envelope;
pub mod keyring;
pub mod keyring_file;
pub mod shared;
pub mod source;

pub use derived::{derive_key, Purpose};
pub use envelope::{
    key_version_of, open, seal, seal_during_rollout, seal_with, OpenError, RecordIdentity,
    SealError,
};
pub use keyring::{
    Fingerprint, KeyInfo, KeyMaterial, KeyState, KeyUnavailable, KeyVersion, Keyring, KeyringError,
    KEY_LEN,
};
pub use keyring_file::{load, open_keyring, seal_keyring, store, KdfParams, KeyringFileError};
pub use shared::SharedKeyring;
pub use source::{KeyringSource, KeyringSourceError};
