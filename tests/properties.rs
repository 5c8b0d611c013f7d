//! Hostile input, property-tested: the decoders of everything credvault reads
//! back from disk (record envelope, keyring file, store keys, record payload)
//! and the request validation of the gRPC API.
//!
//! Decoders must never panic, must classify as DESIGN §5a orders, and must
//! never accept a modified input. The API must answer every request, however
//! odd its fields, with OK or a typed status (a credvault `ErrorInfo`), never
//! a panic, UNKNOWN or INTERNAL.
//!
//! The inputs the fuzz targets (`fuzz/`) ever crashed on, and their seed
//! corpus, are replayed here as regression cases: see
//! [`fuzz_regressions_and_seeds_replay_cleanly`].

mod support;

use std::{
    path::Path,
    sync::OnceLock,
    time::{Duration, SystemTime},
};

use aes_gcm_siv::{
    aead::{AeadInPlace, KeyInit},
    Aes256GcmSiv, Key, Nonce,
};
use credvault::{
    api::pb,
    auth::{
        identity::{identity_from_certificate, SpiffeId},
        IdentityRules, Policy,
    },
    broker::record,
    crypto::{self, KdfParams, KeyVersion, Keyring, KeyringFileError, OpenError, RecordIdentity},
    secret::SecretString,
    store::StoreKey,
};
use proptest::prelude::*;
use support::{provider::ProviderDouble, vault::*};
use tonic::Code;
use tonic_types::StatusExt;

const ID: RecordIdentity<'static> = RecordIdentity {
    tenant: "acme",
    subject: "alice",
    provider: "google",
};

fn keyring() -> &'static Keyring {
    static KEYRING: OnceLock<Keyring> = OnceLock::new();
    KEYRING.get_or_init(Keyring::generate)
}

/// The envelope decoder on arbitrary bytes: the same harness as
/// `fuzz/fuzz_targets/envelope.rs`.
fn check_envelope(bytes: &[u8]) {
    let version = crypto::key_version_of(bytes);
    let opened = crypto::open(keyring(), &ID, bytes);
    // Classification happens on the clear header, identically in both.
    match (&version, &opened) {
        (Err(a), Err(b)) => assert_eq!(a, b),
        (Ok(v), Err(OpenError::KeyVersionUnavailable { version })) => {
            assert_eq!(v.get(), *version)
        }
        (Ok(v), Err(OpenError::Undecryptable { version })) => assert_eq!(v.get(), *version),
        (Ok(_), Ok(_)) => {}
        other => panic!("inconsistent classification: {other:?}"),
    }
    if bytes.len() < 2 || bytes[..2] != *b"CV" {
        assert!(matches!(opened, Err(OpenError::Corrupt { .. })));
    }
}

/// Arbitrary bytes with small KDF parameters: the same harness as
/// `fuzz/fuzz_targets/keyring_file.rs` (a hostile header may ask for up to
/// 4 GiB and 100 passes, which the decoder allows by design).
fn check_keyring_file(bytes: &[u8]) {
    let mut bytes = bytes.to_vec();
    if bytes.len() >= 17 {
        let m_cost = 8 + u32::from(bytes[5] % 56);
        bytes[5..9].copy_from_slice(&m_cost.to_be_bytes());
        bytes[9..13].copy_from_slice(&1u32.to_be_bytes());
        bytes[13..17].copy_from_slice(&1u32.to_be_bytes());
    }
    let _ = crypto::open_keyring(&bytes, &SecretString::from(PASSPHRASE));
}

/// A keyring file whose sealed body is `body`, sealed exactly as the format
/// says (so the JSON decoder and the keyring invariants get the input).
fn seal_keyring_body(body: &[u8]) -> Vec<u8> {
    let (m, t, p) = (8u32, 1u32, 1u32);
    let mut header = b"CVKR\x01".to_vec();
    for n in [m, t, p] {
        header.extend_from_slice(&n.to_be_bytes());
    }
    header.extend_from_slice(&[7u8; 16]); // salt
    header.extend_from_slice(&[9u8; 12]); // nonce
    let mut key = [0u8; 32];
    argon2::Argon2::new(
        argon2::Algorithm::Argon2id,
        argon2::Version::V0x13,
        argon2::Params::new(m, t, p, Some(32)).unwrap(),
    )
    .hash_password_into(PASSPHRASE.as_bytes(), &[7u8; 16], &mut key)
    .unwrap();
    let mut out = header.clone();
    let mut buffer = body.to_vec();
    let tag = Aes256GcmSiv::new(Key::<Aes256GcmSiv>::from_slice(&key))
        .encrypt_in_place_detached(Nonce::from_slice(&[9u8; 12]), &header, &mut buffer)
        .unwrap();
    out.extend_from_slice(&buffer);
    out.extend_from_slice(&tag);
    out
}

fn name() -> impl Strategy<Value = String> {
    prop_oneof![
        6 => "[a-z0-9._@-]{1,12}",
        2 => "\\PC{0,24}",
        1 => Just(String::new()),
        1 => Just("x".repeat(70_000)),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn envelope_decoder_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
        check_envelope(&bytes);
    }

    #[test]
    fn envelope_with_a_valid_header_never_panics(
        version in any::<u32>(),
        rest in proptest::collection::vec(any::<u8>(), 0..128),
    ) {
        let mut bytes = b"CV\x01\x01".to_vec();
        bytes.extend_from_slice(&version.to_be_bytes());
        bytes.extend_from_slice(&rest);
        check_envelope(&bytes);
        let opened = crypto::open(keyring(), &ID, &bytes);
        prop_assert!(opened.is_err(), "random bytes authenticated");
    }

    /// Any change to a sealed envelope is refused, and classified by where
    /// it is: magic -> corrupt, format/algorithm -> unsupported, key version
    /// -> unavailable (or corrupt for 0), anything after -> undecryptable.
    #[test]
    fn tampered_envelopes_are_refused_and_classified(
        plaintext in proptest::collection::vec(any::<u8>(), 0..200),
        at in any::<prop::sample::Index>(),
        flip in 1u8..=255,
        cut in any::<prop::sample::Index>(),
    ) {
        let sealed = crypto::seal(keyring(), &ID, &plaintext).unwrap();
        prop_assert_eq!(&crypto::open(keyring(), &ID, &sealed).unwrap()[..], &plaintext[..]);

        let mut tampered = sealed.clone();
        let i = at.index(sealed.len());
        tampered[i] ^= flip;
        let error = crypto::open(keyring(), &ID, &tampered).unwrap_err();
        match i {
            0..=1 => prop_assert!(matches!(error, OpenError::Corrupt { .. }), "{:?}", error),
            2..=3 => prop_assert!(matches!(error, OpenError::UnsupportedFormat { .. }), "{:?}", error),
            4..=7 => {
                let version = u32::from_be_bytes(tampered[4..8].try_into().unwrap());
                if version == 0 {
                    prop_assert!(matches!(error, OpenError::Corrupt { .. }), "{:?}", error);
                } else {
                    prop_assert_eq!(error, OpenError::KeyVersionUnavailable { version });
                }
            }
            _ => prop_assert_eq!(error, OpenError::Undecryptable { version: 1 }),
        }

        // Truncation anywhere is refused.
        let short = &sealed[..cut.index(sealed.len())];
        prop_assert!(crypto::open(keyring(), &ID, short).is_err());

        // Another identity does not open it.
        let other = RecordIdentity { subject: "mallory", ..ID };
        prop_assert_eq!(
            crypto::open(keyring(), &other, &sealed).unwrap_err(),
            OpenError::Undecryptable { version: 1 }
        );
    }

    #[test]
    fn keyring_file_decoder_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
        check_keyring_file(&bytes);
    }

    #[test]
    fn keyring_body_decoder_never_panics(body in prop_oneof![
        proptest::collection::vec(any::<u8>(), 0..200),
        // JSON shaped like a keyring, with hostile values.
        (any::<u32>(), proptest::collection::vec((any::<u32>(), "[a-z_]{0,14}", any::<i64>(), proptest::option::of("[A-Za-z0-9+/=]{0,48}")), 0..4))
            .prop_map(|(primary, keys)| {
                let keys: Vec<serde_json::Value> = keys.into_iter().map(|(version, state, created, key)| {
                    serde_json::json!({"version": version, "state": state, "created_at_unix": created, "key": key})
                }).collect();
                serde_json::json!({"primary": primary, "keys": keys}).to_string().into_bytes()
            }),
    ]) {
        match crypto::open_keyring(&seal_keyring_body(&body), &SecretString::from(PASSPHRASE)) {
            // Authenticated, so only the body can be wrong.
            Err(KeyringFileError::Malformed(_)) | Ok(_) => {}
            Err(other) => prop_assert!(false, "unexpected error for a well-sealed body: {other}"),
        }
    }

    /// A sealed keyring file with any byte changed never opens.
    #[test]
    fn tampered_keyring_files_never_open(at in any::<prop::sample::Index>(), flip in 1u8..=255) {
        static SEALED: OnceLock<Vec<u8>> = OnceLock::new();
        let sealed = SEALED.get_or_init(|| {
            crypto::seal_keyring(keyring(), &SecretString::from(PASSPHRASE), KdfParams::fast_for_tests()).unwrap()
        });
        let mut tampered = sealed.clone();
        let i = at.index(sealed.len());
        tampered[i] ^= flip;
        // KDF parameter bytes may now ask for more: clamp them as the fuzz
        // target does, keeping the flip visible (params are authenticated).
        if (5..17).contains(&i) {
            let m = u32::from_be_bytes(tampered[5..9].try_into().unwrap());
            if m > 64 * 1024 || u32::from_be_bytes(tampered[9..13].try_into().unwrap()) > 4 {
                return Ok(());
            }
        }
        prop_assert!(crypto::open_keyring(&tampered, &SecretString::from(PASSPHRASE)).is_err());
    }

    #[test]
    fn store_keys_round_trip(tenant in "\\PC{0,40}", subject in "\\PC{0,40}", provider in "\\PC{0,40}") {
        let key = StoreKey::new(&tenant, &subject, &provider);
        prop_assert_eq!(key.parts(), Some((tenant.clone(), subject, provider)));
        prop_assert!(key.as_bytes().starts_with(StoreKey::tenant_prefix(&tenant).as_bytes()));
    }

    /// Arbitrary bytes never panic, and whatever decodes is canonical: it is
    /// exactly the key those parts build.
    #[test]
    fn store_key_parts_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..96)) {
        let key = StoreKey::from_bytes(bytes.clone());
        if let Some((t, s, p)) = key.parts() {
            let rebuilt = StoreKey::new(&t, &s, &p);
            prop_assert_eq!(rebuilt.as_bytes(), &bytes[..]);
        }
    }

    /// The identity parsers face whatever a client certificate carries.
    #[test]
    fn identity_parsers_never_panic(
        text in prop_oneof!["\\PC{0,80}", "spiffe://[a-zA-Z0-9.%/_-]{0,60}"],
        der in proptest::collection::vec(any::<u8>(), 0..300),
        cn in any::<bool>(),
    ) {
        let _ = SpiffeId::parse(&text);
        let rules = IdentityRules { trust_domain: Some("credvault.test".into()), allow_common_name: cn };
        prop_assert!(identity_from_certificate(&der, &rules).is_err());
        let _ = Policy::parse(&text);
    }

    /// A real client certificate with any one byte changed: an identity or an
    /// error, never a panic.
    #[test]
    fn tampered_certificates_never_panic(at in any::<prop::sample::Index>(), flip in 1u8..=255) {
        static DER: OnceLock<Vec<u8>> = OnceLock::new();
        let der = DER.get_or_init(|| {
            let pki = TestPki::generate();
            let pem = &pki.clients["acme"].cert_pem;
            let b64: String = pem.lines().filter(|l| !l.starts_with("-----")).collect();
            use base64::Engine;
            base64::engine::general_purpose::STANDARD.decode(b64).unwrap()
        });
        let rules = IdentityRules { trust_domain: Some(TRUST_DOMAIN.into()), allow_common_name: true };
        let intact = identity_from_certificate(der, &rules);
        prop_assert!(intact.is_ok(), "{:?}", intact);
        let mut tampered = der.clone();
        let i = at.index(der.len());
        tampered[i] ^= flip;
        let _ = identity_from_certificate(&tampered, &rules);
    }

    #[test]
    fn record_decoder_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
        let _ = record::decode(&bytes);
        if let Some((_, envelope)) = record::unframe(&bytes) {
            prop_assert_eq!(envelope.len(), bytes.len() - 8);
        } else {
            prop_assert!(bytes.len() < 8);
        }
    }
}

/// The hand-sealed body harness (here and in the fuzz target) matches the
/// real file format: a well-formed body opens. Without this, the body
/// properties would only ever exercise the wrong-passphrase path.
#[test]
fn hand_sealed_keyring_body_opens() {
    let key = "A".repeat(43) + "=";
    let body = format!(
        r#"{{"primary":1,"keys":[{{"version":1,"state":"active","created_at_unix":0,"key":"{key}"}}]}}"#
    );
    let keyring = crypto::open_keyring(
        &seal_keyring_body(body.as_bytes()),
        &SecretString::from(PASSPHRASE),
    )
    .unwrap();
    assert_eq!(keyring.primary(), KeyVersion::new(1).unwrap());
    let seed = std::fs::read(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/seeds/keyring_file/body-valid"),
    )
    .unwrap();
    assert!(crypto::open_keyring(
        &seal_keyring_body(&seed[1..]),
        &SecretString::from(PASSPHRASE)
    )
    .is_ok());
}

#[test]
fn fuzz_regressions_and_seeds_replay_cleanly() {
    let fuzz = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz");
    let mut replayed = 0;
    for (target, check) in [
        ("envelope", check_envelope as fn(&[u8])),
        ("keyring_file", check_keyring_file_target),
    ] {
        for dir in ["regressions", "seeds"] {
            let Ok(entries) = std::fs::read_dir(fuzz.join(dir).join(target)) else {
                continue;
            };
            for entry in entries {
                let path = entry.unwrap().path();
                check(&std::fs::read(&path).unwrap());
                replayed += 1;
            }
        }
    }
    println!("replayed {replayed} fuzz seeds and regressions");
}

/// `fuzz/fuzz_targets/keyring_file.rs`: the first byte picks raw bytes
/// (even) or a well-sealed body (odd).
fn check_keyring_file_target(bytes: &[u8]) {
    match bytes.split_first() {
        Some((mode, body)) if mode % 2 == 1 => {
            let _ = crypto::open_keyring(&seal_keyring_body(body), &SecretString::from(PASSPHRASE));
        }
        Some((_, rest)) => check_keyring_file(rest),
        None => {}
    }
}

// ---- request validation through a real vault --------------------------------

fn timestamp() -> impl Strategy<Value = Option<prost_types::Timestamp>> {
    proptest::option::of(
        (
            prop_oneof![
                any::<i64>(),
                -100i64..4_000_000_000,
                Just(i64::MAX),
                Just(i64::MIN)
            ],
            any::<i32>(),
        )
            .prop_map(|(seconds, nanos)| prost_types::Timestamp { seconds, nanos }),
    )
}

fn duration() -> impl Strategy<Value = Option<prost_types::Duration>> {
    proptest::option::of(
        (prop_oneof![any::<i64>(), -10i64..200_000], any::<i32>())
            .prop_map(|(seconds, nanos)| prost_types::Duration { seconds, nanos }),
    )
}

fn reference_strategy() -> impl Strategy<Value = Option<pb::CredentialRef>> {
    proptest::option::of(
        (
            prop_oneof![Just("acme".to_owned()), Just("globex".to_owned()), name()],
            prop_oneof![Just("alice".to_owned()), name()],
            prop_oneof![Just("idp".to_owned()), name()],
        )
            .prop_map(|(tenant, subject, provider)| pb::CredentialRef {
                tenant,
                subject,
                provider,
            }),
    )
}

/// A Deposit of `acme/alice/idp` with a fresh grant at `provider` and an
/// access token valid for an hour: a credential the vault serves from cache.
fn alice_deposit(provider: &ProviderDouble) -> pb::DepositRequest {
    pb::DepositRequest {
        credential: reference("acme", "alice", "idp"),
        client: oauth_client(&provider.token_url(), "alice-client", "alice-secret"),
        grant: refresh_grant(
            &provider.issue_refresh_token("alice-client"),
            Some(("at", SystemTime::now() + Duration::from_secs(3600))),
        ),
        labels: Default::default(),
    }
}

/// `server.max_request_bytes`, default.
const MAX_REQUEST_BYTES: usize = 256 * 1024;

#[derive(Clone, Debug)]
#[allow(clippy::large_enum_variant)] // a test value, built and dropped once per case
enum Call {
    Deposit(pb::DepositRequest),
    Get(pb::GetAccessTokenRequest),
    Revoke(pb::RevokeRequest),
}

impl Call {
    fn encoded_len(&self) -> usize {
        use prost::Message;
        match self {
            Call::Deposit(r) => r.encoded_len(),
            Call::Get(r) => r.encoded_len(),
            Call::Revoke(r) => r.encoded_len(),
        }
    }
}

fn call_strategy(token_url: String) -> impl Strategy<Value = Call> {
    let endpoint = prop_oneof![
        Just(token_url),
        Just(String::new()),
        Just("http://10.1.2.3/token".to_owned()),
        Just("http://169.254.169.254/latest".to_owned()),
        Just("ftp://127.0.0.1/x".to_owned()),
        Just("https://user:pass@127.0.0.1:1/token#frag".to_owned()),
        "\\PC{0,30}",
    ];
    let client = proptest::option::of(
        (
            endpoint.clone(),
            name(),
            name(),
            any::<i32>(),
            prop_oneof![Just(String::new()), endpoint],
            proptest::collection::vec(name(), 0..3),
        )
            .prop_map(
                |(
                    token_endpoint,
                    client_id,
                    client_secret,
                    auth_method,
                    revocation_endpoint,
                    scopes,
                )| {
                    pb::OAuthClient {
                        token_endpoint,
                        client_id,
                        client_secret,
                        auth_method: auth_method % 5,
                        revocation_endpoint,
                        scopes,
                        ..Default::default()
                    }
                },
            ),
    );
    let grant = proptest::option::of(prop_oneof![
        (name(), name(), timestamp()).prop_map(|(refresh_token, access_token, at)| {
            pb::deposit_request::Grant::RefreshToken(pb::RefreshTokenGrant {
                refresh_token,
                access_token,
                access_token_expires_at: at,
            })
        }),
        (name(), name(), name()).prop_map(|(code, redirect_uri, code_verifier)| {
            pb::deposit_request::Grant::AuthorizationCode(pb::AuthorizationCodeGrant {
                code,
                redirect_uri,
                code_verifier,
            })
        }),
        Just(pb::deposit_request::Grant::ClientCredentials(
            pb::ClientCredentialsGrant {}
        )),
    ]);
    let labels = proptest::collection::hash_map(name(), name(), 0..3);
    prop_oneof![
        (reference_strategy(), client, grant, labels).prop_map(
            |(credential, client, grant, labels)| {
                Call::Deposit(pb::DepositRequest {
                    credential,
                    client,
                    grant,
                    labels,
                })
            }
        ),
        (reference_strategy(), duration(), any::<bool>()).prop_map(
            |(credential, min_valid_for, force_refresh)| {
                Call::Get(pb::GetAccessTokenRequest {
                    credential,
                    min_valid_for,
                    force_refresh,
                })
            }
        ),
        reference_strategy().prop_map(|credential| Call::Revoke(pb::RevokeRequest { credential })),
    ]
}

/// A request's Debug, with long strings cut (the generator makes 70 KB ones).
fn short(call: &Call) -> String {
    let text = format!("{call:?}");
    let mut out = String::new();
    let mut run = 0;
    for c in text.chars() {
        run = if c == 'x' { run + 1 } else { 0 };
        if run <= 8 {
            out.push(c);
        } else if run == 9 {
            out.push('…');
        }
    }
    out
}

#[test]
fn every_request_gets_ok_or_a_typed_status() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let (provider, dir, vault) = runtime.block_on(async {
        let provider = ProviderDouble::with_client("alice-client", Some("alice-secret")).await;
        let dir = VaultDir::new();
        let vault = TestVault::start(&dir).await;
        (provider, dir, vault)
    });
    let clients = runtime.block_on(async {
        [
            vault.client(&dir, "admin").await,
            vault.client(&dir, "acme").await,
            vault.client(&dir, "stranger").await,
        ]
    });
    let mut runner = proptest::test_runner::TestRunner::new(ProptestConfig {
        cases: 1000,
        failure_persistence: None,
        ..ProptestConfig::default()
    });
    let strategy = (call_strategy(provider.token_url()), 0usize..3);
    let reasons = std::sync::Mutex::new(std::collections::BTreeMap::<String, usize>::new());
    runner
        .run(&strategy, |(call, who)| {
            // Over `server.max_request_bytes` tonic answers before any
            // credvault code runs: see `oversized_request_gets_a_typed_status`.
            if call.encoded_len() > MAX_REQUEST_BYTES - 1024 {
                return Ok(());
            }
            let mut client = clients[who].clone();
            let answer = runtime.block_on(async {
                let call_fut = async {
                    match call.clone() {
                        Call::Deposit(r) => client.deposit(r).await.map(|_| ()),
                        Call::Get(r) => client.get_access_token(r).await.map(|_| ()),
                        Call::Revoke(r) => client.revoke(r).await.map(|_| ()),
                    }
                };
                tokio::time::timeout(Duration::from_secs(20), call_fut).await
            });
            let answer = answer
                .map_err(|_| TestCaseError::fail(format!("no answer in 20 s: {}", short(&call))))?;
            let Err(status) = answer else {
                *reasons.lock().unwrap().entry("OK".into()).or_default() += 1;
                return Ok(());
            };
            prop_assert!(
                !matches!(status.code(), Code::Unknown | Code::Internal),
                "{} -> {status:?}",
                short(&call)
            );
            let details = status.get_error_details();
            let info = details.error_info();
            prop_assert!(
                info.is_some_and(|i| i.domain == "credvault" && !i.reason.is_empty()),
                "untyped status for {}: {status:?}",
                short(&call)
            );
            *reasons
                .lock()
                .unwrap()
                .entry(info.unwrap().reason.clone())
                .or_default() += 1;
            Ok(())
        })
        .unwrap();
    println!("answers by reason: {:?}", reasons.lock().unwrap());
    // The vault is still healthy afterwards.
    runtime.block_on(async {
        let mut admin = vault.client(&dir, "admin").await;
        admin.deposit(alice_deposit(&provider)).await.unwrap();
        admin
            .get_access_token(get_request("acme", "alice", "idp"))
            .await
            .unwrap();
    });
    drop(vault);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_request_gets_a_typed_status() {
    let dir = VaultDir::new();
    let vault = TestVault::start(&dir).await;
    let mut client = vault.client(&dir, "admin").await;
    let mut labels = std::collections::HashMap::new();
    labels.insert("big".to_owned(), "x".repeat(MAX_REQUEST_BYTES));
    let status = client
        .deposit(pb::DepositRequest {
            credential: reference("acme", "alice", "idp"),
            client: oauth_client("http://127.0.0.1:9/token", "c", "s"),
            grant: refresh_grant("rt", None),
            labels,
        })
        .await
        .unwrap_err();
    let details = status.get_error_details();
    assert!(
        details
            .error_info()
            .is_some_and(|info| info.domain == "credvault"),
        "untyped: {:?} {}",
        status.code(),
        status.message()
    );
}

/// A gRPC codec that sends and receives message bytes as they are: what a
/// broken or hostile client puts on the wire.
#[derive(Clone, Copy, Default)]
struct RawBytes;

impl tonic::codec::Encoder for RawBytes {
    type Item = Vec<u8>;
    type Error = tonic::Status;

    fn encode(
        &mut self,
        item: Vec<u8>,
        dst: &mut tonic::codec::EncodeBuf<'_>,
    ) -> Result<(), tonic::Status> {
        prost::bytes::BufMut::put_slice(dst, &item);
        Ok(())
    }
}

impl tonic::codec::Decoder for RawBytes {
    type Item = Vec<u8>;
    type Error = tonic::Status;

    fn decode(
        &mut self,
        src: &mut tonic::codec::DecodeBuf<'_>,
    ) -> Result<Option<Vec<u8>>, tonic::Status> {
        use prost::bytes::Buf;
        let mut bytes = vec![0; src.remaining()];
        src.copy_to_slice(&mut bytes);
        Ok(Some(bytes))
    }
}

impl tonic::codec::Codec for RawBytes {
    type Encode = Vec<u8>;
    type Decode = Vec<u8>;
    type Encoder = RawBytes;
    type Decoder = RawBytes;

    fn encoder(&mut self) -> RawBytes {
        RawBytes
    }

    fn decoder(&mut self) -> RawBytes {
        RawBytes
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_that_is_not_protobuf_gets_a_typed_status_and_loses_nothing() {
    let provider = ProviderDouble::with_client("alice-client", Some("alice-secret")).await;
    let dir = VaultDir::new();
    let vault = TestVault::start(&dir).await;
    let mut admin = vault.client(&dir, "admin").await;
    admin.deposit(alice_deposit(&provider)).await.unwrap();

    let cert = &dir.pki.clients["admin"];
    let mut raw =
        tonic::client::Grpc::new(vault.channel(Some(cert), dir.pki.ca.ca_cert_pem()).await);
    // A truncated varint, a field with wire type 7 (none exists), a length
    // past the end, and a string field that is not UTF-8.
    let garbage: [&[u8]; 4] = [
        b"\x08\xff",
        b"\x0f",
        b"\x0a\x7fabc",
        b"\x0a\x05\x0a\x03\xff\xfe\xfd",
    ];
    for method in [
        "GetAccessToken",
        "Deposit",
        "Revoke",
        "WatchCredentialEvents",
    ] {
        for bytes in garbage {
            raw.ready().await.unwrap();
            let path = http::uri::PathAndQuery::try_from(format!(
                "/credvault.v1.CredentialVault/{method}"
            ))
            .unwrap();
            let answer = if method == "WatchCredentialEvents" {
                raw.server_streaming(tonic::Request::new(bytes.to_vec()), path, RawBytes)
                    .await
                    .map(|_| ())
            } else {
                raw.unary(tonic::Request::new(bytes.to_vec()), path, RawBytes)
                    .await
                    .map(|_| ())
            };
            let status = answer.expect_err("garbage was accepted");
            let details = status.get_error_details();
            assert_eq!(
                (
                    status.code(),
                    details
                        .error_info()
                        .map(|i| (i.domain.as_str(), i.reason.as_str()))
                ),
                (Code::InvalidArgument, Some(("credvault", "INVALID_FIELD"))),
                "{method} with {bytes:?}: {status:?}"
            );
            let violations = details
                .bad_request()
                .map(|b| b.field_violations.clone())
                .unwrap_or_default();
            assert!(
                violations.iter().any(|v| v.field == "request"
                    && v.description.starts_with("not a valid protobuf message")),
                "{method} with {bytes:?}: {violations:?}"
            );
            if method == "GetAccessToken" && bytes == garbage[0] {
                println!("{:?}: {}", status.code(), violations[0].description);
            }
        }
    }
    // Nothing was lost: the credential is still served.
    admin
        .get_access_token(get_request("acme", "alice", "idp"))
        .await
        .unwrap();
}
