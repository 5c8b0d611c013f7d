//! The keyring file decoder (`crypto::open_keyring`). The first input byte
//! picks the mode:
//! - even: the rest is a whole keyring file, with its Argon2id parameters
//!   clamped to a few KiB and one pass (a hostile header may legitimately ask
//!   for up to 4 GiB and 100 passes, which would only measure Argon2);
//! - odd: the rest is the sealed JSON body, sealed here exactly as the format
//!   says, so the JSON decoder and the keyring invariants see the input.
//!
//! Mirrors `check_keyring_file_target` in `tests/properties.rs`, which
//! replays `fuzz/seeds/keyring_file` and `fuzz/regressions/keyring_file`.
#![no_main]

use aes_gcm_siv::{
    aead::{AeadInPlace, KeyInit},
    Aes256GcmSiv, Key, Nonce,
};
use credvault_crypto::{crypto, secret::SecretString};
use libfuzzer_sys::fuzz_target;

const PASSPHRASE: &str = "test passphrase, not a secret";

fn seal_body(body: &[u8]) -> Vec<u8> {
    let (m, t, p) = (8u32, 1u32, 1u32);
    let mut header = b"CVKR\x01".to_vec();
    for n in [m, t, p] {
        header.extend_from_slice(&n.to_be_bytes());
    }
    header.extend_from_slice(&[7u8; 16]);
    header.extend_from_slice(&[9u8; 12]);
    let mut key = [0u8; 32];
    argon2::Argon2::new(
        argon2::Algorithm::Argon2id,
        argon2::Version::V0x13,
        argon2::Params::new(m, t, p, Some(32)).unwrap(),
    )
    .hash_password_into(PASSPHRASE.as_bytes(), &[7u8; 16], &mut key)
    .unwrap();
    let mut buffer = body.to_vec();
    let tag = Aes256GcmSiv::new(Key::<Aes256GcmSiv>::from_slice(&key))
        .encrypt_in_place_detached(Nonce::from_slice(&[9u8; 12]), &header, &mut buffer)
        .unwrap();
    let mut out = header;
    out.extend_from_slice(&buffer);
    out.extend_from_slice(&tag);
    out
}

fuzz_target!(|input: &[u8]| {
    let Some((mode, rest)) = input.split_first() else {
        return;
    };
    let passphrase = SecretString::from(PASSPHRASE);
    if mode % 2 == 1 {
        let _ = crypto::open_keyring(&seal_body(rest), &passphrase);
        return;
    }
    let mut bytes = rest.to_vec();
    if bytes.len() >= 17 {
        let m_cost = 8 + u32::from(bytes[5] % 56);
        bytes[5..9].copy_from_slice(&m_cost.to_be_bytes());
        bytes[9..13].copy_from_slice(&1u32.to_be_bytes());
        bytes[13..17].copy_from_slice(&1u32.to_be_bytes());
    }
    let _ = crypto::open_keyring(&bytes, &passphrase);
});
