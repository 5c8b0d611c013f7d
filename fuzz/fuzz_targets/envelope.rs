//! The record envelope decoder (`crypto::open`, `crypto::key_version_of`) on
//! arbitrary bytes. Mirrors `check_envelope` in `tests/properties.rs`, which
//! replays `fuzz/seeds/envelope` and `fuzz/regressions/envelope`.
#![no_main]

use std::sync::OnceLock;

use credvault_crypto::crypto::{self, Keyring, OpenError, RecordIdentity};
use libfuzzer_sys::fuzz_target;

const ID: RecordIdentity<'static> = RecordIdentity {
    tenant: "acme",
    subject: "alice",
    provider: "google",
};

fn keyring() -> &'static Keyring {
    static KEYRING: OnceLock<Keyring> = OnceLock::new();
    KEYRING.get_or_init(Keyring::generate)
}

fuzz_target!(|bytes: &[u8]| {
    let version = crypto::key_version_of(bytes);
    let opened = crypto::open(keyring(), &ID, bytes);
    match (&version, &opened) {
        (Err(a), Err(b)) => assert_eq!(a, b),
        (Ok(v), Err(OpenError::KeyVersionUnavailable { version })) => {
            assert_eq!(v.get(), *version)
        }
        (Ok(v), Err(OpenError::Undecryptable { version })) => assert_eq!(v.get(), *version),
        (Ok(_), Ok(_)) => {}
        other => panic!("inconsistent classification: {other:?}"),
    }
});
