//! The audit log: one structured event per call on the `credvault::audit`
//! tracing target (identity, tenant, method, provider, a keyed hash of the
//! subject, outcome reason, latency). Never a secret.
//!
//! Route it separately with a filter, e.g. `RUST_LOG=info,credvault::audit=info`
//! and `log.format = "json"`, then select `target == "credvault::audit"` in the
//! log pipeline. Subjects are personal data, so they are logged as an HMAC
//! under a per-process random key: events of one process correlate, and the
//! log alone does not reveal who the user was.

use std::sync::OnceLock;

use hmac::{digest::KeyInit, Hmac, Mac};
use rand::RngCore;
use sha2::Sha256;

/// The tracing target of audit events.
pub const TARGET: &str = "credvault::audit";

/// The subject hash's HMAC, keyed once per process under a random key of
/// SHA-256's block size. Keying it costs two SHA-256 compressions (the
/// padded key, inner and outer), as many as hashing a subject: a clone of
/// the keyed state per call skips them. The key is lent, not copied, so
/// its one copy is wiped once the HMAC is keyed.
fn keyed() -> &'static Hmac<Sha256> {
    static KEYED: OnceLock<Hmac<Sha256>> = OnceLock::new();
    KEYED.get_or_init(|| {
        let mut key = zeroize::Zeroizing::new([0u8; 64]);
        rand::rngs::OsRng.fill_bytes(key.as_mut());
        <Hmac<Sha256> as KeyInit>::new((&*key).into())
    })
}

/// Whether audit lines are being written (a subscriber takes the target at
/// INFO): work done only for the line can be skipped when they are not.
pub fn enabled() -> bool {
    tracing::enabled!(target: TARGET, tracing::Level::INFO)
}

/// 16 hex characters identifying `subject` within this process's logs.
pub fn subject_hash(subject: &str) -> String {
    // Hex by hand: `hex::encode` collects one `char` at a time, some 700
    // instructions on every audited call.
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut mac = keyed().clone();
    mac.update(subject.as_bytes());
    let digest = mac.finalize().into_bytes();
    let mut hash = String::with_capacity(16);
    for byte in &digest[..8] {
        hash.push(char::from(HEX[usize::from(byte >> 4)]));
        hash.push(char::from(HEX[usize::from(byte & 0x0f)]));
    }
    hash
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hashes_are_stable_within_a_process_and_hide_the_subject() {
        let a = subject_hash("alice@example.com");
        assert_eq!(a, subject_hash("alice@example.com"));
        assert_ne!(a, subject_hash("bob@example.com"));
        assert_eq!(a.len(), 16);
        assert!(!a.contains("alice"));
        // The first 8 bytes of the HMAC, in lowercase hex.
        let mut mac = keyed().clone();
        mac.update(b"alice@example.com");
        assert_eq!(a, hex::encode(&mac.finalize().into_bytes()[..8]));
    }
}
