//! "mTLS plus tenant claims scope every call", proven against every way in:
//! an attack matrix over every RPC, JWT tenant claims, and certificate hot
//! reload.

mod support;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine;
use credvault::{
    api::pb::{
        self, credential_vault_client::CredentialVaultClient, vault_admin_client::VaultAdminClient,
    },
    dev::pki::{CertifiedKey, ClientCertSpec, DevCa},
};
use support::{provider::ProviderDouble, vault::*};
use tonic::{transport::Channel, Code, Request};

const CLIENT_ID: &str = "vault-client";
const CLIENT_SECRET: &str = "client-secret-id";
const ISSUER: &str = "https://issuer.test";
const AUDIENCE: &str = "credvault";

/// A signing key for tokens and its JWKS entry.
struct Signer {
    pem: String,
    jwk: serde_json::Value,
}

fn signer(kid: &str) -> Signer {
    let key = rcgen::KeyPair::generate().unwrap();
    let raw = key.public_key_raw();
    let b64 = |b: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b);
    Signer {
        pem: key.serialize_pem(),
        jwk: serde_json::json!({
            "kty": "EC", "crv": "P-256", "alg": "ES256", "use": "sig", "kid": kid,
            "x": b64(&raw[1..33]), "y": b64(&raw[33..65]),
        }),
    }
}

fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

fn token(signer: &Signer, kid: &str, tenant: &str, exp: i64) -> String {
    let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::ES256);
    header.kid = Some(kid.to_owned());
    let claims = serde_json::json!({
        "iss": ISSUER, "aud": AUDIENCE, "sub": "end-user", "tenant": tenant,
        "iat": now(), "exp": exp,
    });
    jsonwebtoken::encode(
        &header,
        &claims,
        &jsonwebtoken::EncodingKey::from_ec_pem(signer.pem.as_bytes()).unwrap(),
    )
    .unwrap()
}

fn unsigned_token(tenant: &str) -> String {
    let b64 = |v: serde_json::Value| {
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string())
    };
    format!(
        "{}.{}.",
        b64(serde_json::json!({"alg": "none", "typ": "JWT", "kid": "k1"})),
        b64(
            serde_json::json!({"iss": ISSUER, "aud": AUDIENCE, "tenant": tenant, "exp": now() + 600})
        )
    )
}

/// A vault whose policy adds `jwt-app`, which must present a token.
fn jwt_vault_dir(signer: &Signer) -> VaultDir {
    let dir = VaultDir::custom(
        "allow_http_loopback = true",
        &format!(
            "[auth.jwt]\njwks_file = \"jwks.json\"\nissuer = \"{ISSUER}\"\naudience = \"{AUDIENCE}\"\n"
        ),
    );
    std::fs::write(
        dir.path().join("jwks.json"),
        serde_json::json!({ "keys": [signer.jwk] }).to_string(),
    )
    .unwrap();
    let mut policy = std::fs::read_to_string(dir.path().join("policy.toml")).unwrap();
    policy.push_str(&format!(
        "\n[[rule]]\nidentity = \"spiffe://{TRUST_DOMAIN}/jwt-app\"\ntenants = [\"acme\", \"globex\"]\n\
         actions = [\"deposit\", \"get\", \"revoke\"]\nrequire_jwt = true\n\
         \n[[rule]]\nidentity = \"spiffe://{TRUST_DOMAIN}/acme-admin\"\ntenants = [\"acme\"]\n\
         actions = [\"admin\"]\n"
    ));
    std::fs::write(dir.path().join("policy.toml"), policy).unwrap();
    dir
}

fn client_cert(ca: &DevCa, name: &str) -> CertifiedKey {
    ca.issue_client(&ClientCertSpec {
        uri_sans: vec![format!("spiffe://{TRUST_DOMAIN}/{name}")],
        ..Default::default()
    })
    .unwrap()
}

/// `message` as a request carrying `metadata`.
fn with_metadata<T>(message: T, metadata: &[(&'static str, String)]) -> Request<T> {
    let mut request = Request::new(message);
    for (k, v) in metadata {
        request.metadata_mut().insert(*k, v.parse().unwrap());
    }
    request
}

/// One attempt: an RPC with optional extra metadata.
async fn attempt(
    client: &mut CredentialVaultClient<Channel>,
    rpc: &str,
    tenant: &str,
    provider: &ProviderDouble,
    metadata: &[(&'static str, String)],
) -> Result<(), tonic::Status> {
    macro_rules! call {
        ($method:ident, $message:expr) => {
            client
                .$method(with_metadata($message, metadata))
                .await
                .map(|_| ())
        };
    }
    match rpc {
        "Deposit" => call!(
            deposit,
            pb::DepositRequest {
                credential: reference(tenant, "victim", "idp"),
                client: oauth_client(&provider.token_url(), CLIENT_ID, CLIENT_SECRET),
                grant: refresh_grant("rt-attacker", None),
                labels: Default::default(),
            }
        ),
        "GetAccessToken" => call!(get_access_token, get_request(tenant, "victim", "idp")),
        _ => call!(
            revoke,
            pb::RevokeRequest {
                credential: reference(tenant, "victim", "idp"),
            }
        ),
    }
}

/// The VaultAdmin RPCs, attempted the same way.
const ADMIN_RPCS: &[&str] = &[
    "ListCredentials",
    "DescribeCredential",
    "GetKeyStatus",
    "ReloadKeyring",
    "StartRewrap",
    "GetRewrapStatus",
    "Backup",
    "ReloadPolicy",
];

async fn attempt_admin(
    channel: Channel,
    rpc: &str,
    tenant: &str,
    metadata: &[(&'static str, String)],
) -> Result<(), tonic::Status> {
    let mut client = VaultAdminClient::new(channel);
    macro_rules! call {
        ($method:ident, $message:expr) => {
            client
                .$method(with_metadata($message, metadata))
                .await
                .map(|_| ())
        };
    }
    match rpc {
        "ListCredentials" => call!(
            list_credentials,
            pb::ListCredentialsRequest {
                tenant: tenant.into(),
                page_size: 10,
                page_token: String::new(),
            }
        ),
        "DescribeCredential" => call!(
            describe_credential,
            pb::DescribeCredentialRequest {
                credential: reference(tenant, "victim", "idp"),
            }
        ),
        "GetKeyStatus" => call!(get_key_status, pb::GetKeyStatusRequest {}),
        "ReloadKeyring" => call!(reload_keyring, pb::ReloadKeyringRequest {}),
        "StartRewrap" => call!(
            start_rewrap,
            pb::StartRewrapRequest {
                records_per_second: 0
            }
        ),
        "GetRewrapStatus" => call!(get_rewrap_status, pb::GetRewrapStatusRequest {}),
        "ReloadPolicy" => call!(reload_policy, pb::ReloadPolicyRequest {}),
        _ => {
            let mut request = Request::new(pb::BackupRequest {});
            for (k, v) in metadata {
                request.metadata_mut().insert(*k, v.parse().unwrap());
            }
            // A refused stream fails at the call or at its first message.
            let mut stream = client.backup(request).await?.into_inner();
            stream.message().await.map(|_| ())
        }
    }
}

/// A token with its header and claims adjusted by the caller.
fn forged_token(
    signer: &Signer,
    header: impl FnOnce(&mut jsonwebtoken::Header),
    claims: impl FnOnce(&mut serde_json::Value),
) -> String {
    let mut h = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::ES256);
    h.kid = Some("k1".to_owned());
    header(&mut h);
    let mut c = serde_json::json!({
        "iss": ISSUER, "aud": AUDIENCE, "sub": "end-user", "tenant": "acme",
        "iat": now(), "exp": now() + 600,
    });
    claims(&mut c);
    jsonwebtoken::encode(
        &h,
        &c,
        &jsonwebtoken::EncodingKey::from_ec_pem(signer.pem.as_bytes()).unwrap(),
    )
    .unwrap()
}

/// An HS256 token keyed with the verifier's public key: the classic
/// algorithm-confusion attack.
fn hmac_confused_token(public_jwk: &serde_json::Value) -> String {
    let mut h = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256);
    h.kid = Some("k1".to_owned());
    let claims = serde_json::json!({
        "iss": ISSUER, "aud": AUDIENCE, "tenant": "acme", "exp": now() + 600,
    });
    jsonwebtoken::encode(
        &h,
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(public_jwk.to_string().as_bytes()),
    )
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_attack_matrix_is_refused_on_every_rpc_and_changes_nothing() {
    let provider = ProviderDouble::with_client(CLIENT_ID, Some(CLIENT_SECRET)).await;
    let good = signer("k1");
    let dir = jwt_vault_dir(&good);
    let vault = TestVault::start(&dir).await;
    let ca_pem = dir.pki.ca.ca_cert_pem().to_owned();

    // The victim's credential, in tenant acme.
    let mut admin = vault.client(&dir, "admin").await;
    let victim = provider.issue_refresh_token(CLIENT_ID);
    admin
        .deposit(pb::DepositRequest {
            credential: reference("acme", "victim", "idp"),
            client: oauth_client(&provider.token_url(), CLIENT_ID, CLIENT_SECRET),
            grant: refresh_grant(
                &victim,
                Some(("at-victim", SystemTime::now() + Duration::from_secs(3600))),
            ),
            labels: Default::default(),
        })
        .await
        .unwrap();

    let other_ca = DevCa::generate("attacker CA").unwrap();
    let expired = dir
        .pki
        .ca
        .issue_client(&ClientCertSpec {
            uri_sans: vec![format!("spiffe://{TRUST_DOMAIN}/admin")],
            not_before: Some(time::OffsetDateTime::now_utc() - time::Duration::days(10)),
            not_after: Some(time::OffsetDateTime::now_utc() - time::Duration::days(1)),
            ..Default::default()
        })
        .unwrap();
    let jwt_app = client_cert(&dir.pki.ca, "jwt-app");
    let acme = dir.pki.clients["acme"].clone();
    let stranger = dir.pki.clients["stranger"].clone();
    let imposter = signer("k1");

    struct Case {
        name: &'static str,
        cert: Option<CertifiedKey>,
        tenant: &'static str,
        metadata: Vec<(&'static str, String)>,
        /// `None`: refused before gRPC (the TLS handshake fails).
        expect: Option<(Code, &'static str)>,
        /// The same for the VaultAdmin RPCs (which need `admin`).
        admin: Option<(Code, &'static str)>,
    }
    let unauthenticated = Some((Code::Unauthenticated, "UNAUTHENTICATED"));
    let no_action = Some((Code::PermissionDenied, "ACTION_NOT_PERMITTED"));
    let bearer = |t: String| vec![("authorization", format!("Bearer {t}"))];
    let cases = vec![
        Case {
            name: "no certificate",
            cert: None,
            tenant: "acme",
            metadata: vec![],
            expect: None,
            admin: None,
        },
        Case {
            name: "certificate from another CA",
            cert: Some(client_cert(&other_ca, "admin")),
            tenant: "acme",
            metadata: vec![],
            expect: None,
            admin: None,
        },
        Case {
            name: "expired certificate",
            cert: Some(expired),
            tenant: "acme",
            metadata: vec![],
            expect: None,
            admin: None,
        },
        Case {
            name: "identity not in policy",
            cert: Some(stranger),
            tenant: "acme",
            metadata: vec![],
            expect: Some((Code::PermissionDenied, "ACTION_NOT_PERMITTED")),
            admin: no_action,
        },
        Case {
            name: "tenant outside the policy",
            cert: Some(acme.clone()),
            tenant: "globex",
            metadata: vec![],
            expect: Some((Code::PermissionDenied, "TENANT_NOT_PERMITTED")),
            admin: no_action,
        },
        Case {
            name: "JWT for another tenant",
            cert: Some(jwt_app.clone()),
            tenant: "acme",
            metadata: bearer(token(&good, "k1", "globex", now() + 600)),
            expect: Some((Code::PermissionDenied, "TENANT_NOT_PERMITTED")),
            admin: no_action,
        },
        Case {
            name: "expired JWT",
            cert: Some(jwt_app.clone()),
            tenant: "acme",
            metadata: bearer(token(&good, "k1", "acme", now() - 3600)),
            expect: Some((Code::Unauthenticated, "UNAUTHENTICATED")),
            admin: unauthenticated,
        },
        Case {
            name: "JWT with a bad signature",
            cert: Some(jwt_app.clone()),
            tenant: "acme",
            metadata: bearer(token(&imposter, "k1", "acme", now() + 600)),
            expect: Some((Code::Unauthenticated, "UNAUTHENTICATED")),
            admin: unauthenticated,
        },
        Case {
            name: "alg none JWT",
            cert: Some(jwt_app.clone()),
            tenant: "acme",
            metadata: bearer(unsigned_token("acme")),
            expect: Some((Code::Unauthenticated, "UNAUTHENTICATED")),
            admin: unauthenticated,
        },
        Case {
            name: "JWT whose key is not in the JWKS",
            cert: Some(jwt_app.clone()),
            tenant: "acme",
            metadata: bearer(token(&imposter, "k2", "acme", now() + 600)),
            expect: Some((Code::Unauthenticated, "UNAUTHENTICATED")),
            admin: unauthenticated,
        },
        Case {
            name: "JWT required but absent",
            cert: Some(jwt_app.clone()),
            tenant: "acme",
            metadata: vec![],
            expect: Some((Code::Unauthenticated, "UNAUTHENTICATED")),
            admin: unauthenticated,
        },
        Case {
            name: "forged XFCC, mesh mode off",
            cert: Some(acme.clone()),
            tenant: "acme",
            metadata: vec![(
                "x-forwarded-client-cert",
                format!("By=spiffe://{TRUST_DOMAIN}/vault;URI=spiffe://{TRUST_DOMAIN}/admin"),
            )],
            expect: Some((Code::Unauthenticated, "UNAUTHENTICATED")),
            admin: unauthenticated,
        },
        Case {
            name: "XFCC with a wrong By=",
            cert: Some(acme.clone()),
            tenant: "acme",
            metadata: vec![(
                "x-forwarded-client-cert",
                format!("By=spiffe://elsewhere/proxy;URI=spiffe://{TRUST_DOMAIN}/admin"),
            )],
            expect: Some((Code::Unauthenticated, "UNAUTHENTICATED")),
            admin: unauthenticated,
        },
        Case {
            name: "JWT from another issuer",
            cert: Some(jwt_app.clone()),
            tenant: "acme",
            metadata: bearer(forged_token(
                &good,
                |_| {},
                |c| c["iss"] = "https://evil.test".into(),
            )),
            expect: unauthenticated,
            admin: unauthenticated,
        },
        Case {
            name: "JWT for another audience",
            cert: Some(jwt_app.clone()),
            tenant: "acme",
            metadata: bearer(forged_token(
                &good,
                |_| {},
                |c| c["aud"] = "someone-else".into(),
            )),
            expect: unauthenticated,
            admin: unauthenticated,
        },
        Case {
            name: "JWT not valid yet (nbf)",
            cert: Some(jwt_app.clone()),
            tenant: "acme",
            metadata: bearer(forged_token(
                &good,
                |_| {},
                |c| c["nbf"] = (now() + 3600).into(),
            )),
            expect: unauthenticated,
            admin: unauthenticated,
        },
        Case {
            name: "JWT whose kid names no key",
            cert: Some(jwt_app.clone()),
            tenant: "acme",
            metadata: bearer(forged_token(&good, |h| h.kid = Some("nope".into()), |_| {})),
            expect: unauthenticated,
            admin: unauthenticated,
        },
        Case {
            name: "JWT keyed with the public key (HS256 confusion)",
            cert: Some(jwt_app.clone()),
            tenant: "acme",
            metadata: bearer(hmac_confused_token(&good.jwk)),
            expect: unauthenticated,
            admin: unauthenticated,
        },
        Case {
            name: "JWT carrying its own key (jwk header)",
            cert: Some(jwt_app.clone()),
            tenant: "acme",
            metadata: bearer(forged_token(
                &imposter,
                |h| h.jwk = Some(serde_json::from_value(imposter.jwk.clone()).unwrap()),
                |_| {},
            )),
            expect: unauthenticated,
            admin: unauthenticated,
        },
        Case {
            name: "JWT pointing at its own key set (jku header)",
            cert: Some(jwt_app.clone()),
            tenant: "acme",
            metadata: bearer(forged_token(
                &imposter,
                |h| h.jku = Some("https://evil.test/jwks.json".into()),
                |_| {},
            )),
            expect: unauthenticated,
            admin: unauthenticated,
        },
        Case {
            name: "JWT with a certificate chain header (x5c)",
            cert: Some(jwt_app.clone()),
            tenant: "acme",
            metadata: bearer(forged_token(
                &imposter,
                |h| h.x5c = Some(vec!["MIIBattacker".into()]),
                |_| {},
            )),
            expect: unauthenticated,
            admin: unauthenticated,
        },
    ];

    for case in &cases {
        let channel = vault.channel(case.cert.as_ref(), &ca_pem).await;
        for rpc in ADMIN_RPCS {
            let outcome = attempt_admin(channel.clone(), rpc, case.tenant, &case.metadata).await;
            let status = outcome.expect_err(&format!("{} / {rpc} must be refused", case.name));
            match case.admin {
                None => assert!(
                    status.get_error_details_or_none().is_none(),
                    "{} / {rpc}: expected a transport failure, got {status:?}",
                    case.name
                ),
                Some((code, reason)) => {
                    assert_eq!(status.code(), code, "{} / {rpc}: {status:?}", case.name);
                    assert_eq!(error_info(&status).0, reason, "{} / {rpc}", case.name);
                }
            }
        }
        let mut client = CredentialVaultClient::new(channel);
        for rpc in ["Deposit", "GetAccessToken", "Revoke"] {
            let outcome = attempt(&mut client, rpc, case.tenant, &provider, &case.metadata).await;
            let status = outcome.expect_err(&format!("{} / {rpc} must be refused", case.name));
            match case.expect {
                None => assert!(
                    status.get_error_details_or_none().is_none(),
                    "{} / {rpc}: expected a transport failure, got {status:?}",
                    case.name
                ),
                Some((code, reason)) => {
                    assert_eq!(status.code(), code, "{} / {rpc}: {status:?}", case.name);
                    assert_eq!(error_info(&status).0, reason, "{} / {rpc}", case.name);
                }
            }
            // Error messages never carry the token.
            for (_, value) in &case.metadata {
                assert!(!status
                    .message()
                    .contains(value.trim_start_matches("Bearer ")));
            }
        }
    }

    // An admin of one tenant may list it, and nothing global or foreign.
    let acme_admin = vault
        .channel(Some(&client_cert(&dir.pki.ca, "acme-admin")), &ca_pem)
        .await;
    attempt_admin(acme_admin.clone(), "ListCredentials", "acme", &[])
        .await
        .unwrap();
    for rpc in ADMIN_RPCS {
        let tenant = "globex";
        if let Err(status) = attempt_admin(acme_admin.clone(), rpc, tenant, &[]).await {
            assert_eq!(error_info(&status).0, "TENANT_NOT_PERMITTED", "{rpc}");
        } else {
            panic!("acme-admin / {rpc} for {tenant} must be refused");
        }
    }

    // A valid token for the right tenant works, and only for that tenant.
    let mut jwt_client = CredentialVaultClient::new(vault.channel(Some(&jwt_app), &ca_pem).await);
    let ok = bearer(token(&good, "k1", "acme", now() + 600));
    attempt(&mut jwt_client, "GetAccessToken", "acme", &provider, &ok)
        .await
        .unwrap();

    // Nothing stored changed: the victim's grant is intact, nothing was added.
    let token = admin
        .get_access_token(get_request("acme", "victim", "idp"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(token.access_token, "at-victim");
    let mut admin_api = VaultAdminClient::new(
        vault
            .channel(Some(&dir.pki.clients["admin"]), &ca_pem)
            .await,
    );
    let described = admin_api
        .describe_credential(pb::DescribeCredentialRequest {
            credential: reference("acme", "victim", "idp"),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(described.generation, 1);
    for tenant in ["acme", "globex"] {
        let listed = admin_api
            .list_credentials(pb::ListCredentialsRequest {
                tenant: tenant.into(),
                page_size: 10,
                page_token: String::new(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(
            listed.credentials.len(),
            usize::from(tenant == "acme"),
            "{tenant}"
        );
    }
    assert!(provider.is_refresh_token_live(&victim));
    assert_eq!(provider.token_calls(), 0);
}

trait DetailsOrNone {
    fn get_error_details_or_none(&self) -> Option<String>;
}

impl DetailsOrNone for tonic::Status {
    fn get_error_details_or_none(&self) -> Option<String> {
        use tonic_types::StatusExt;
        self.get_error_details()
            .error_info()
            .map(|i| i.reason.clone())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificates_and_the_ca_bundle_reload_without_dropping_open_connections() {
    let dir = VaultDir::new();
    dir.replace_in_config(
        "client_ca = \"ca.pem\"",
        "client_ca = \"ca.pem\"\nreload_interval = \"100ms\"",
    );
    let vault = TestVault::start(&dir).await;
    let old_ca = dir.pki.ca.ca_cert_pem().to_owned();

    // A connection established before the rotation.
    let mut open = vault.client(&dir, "admin").await;
    open.get_access_token(get_request("acme", "nobody", "idp"))
        .await
        .unwrap_err();

    // Rotate everything to a new CA.
    let new_ca = DevCa::generate("rotated CA").unwrap();
    let server = new_ca
        .issue_server(&["localhost"], &["127.0.0.1".parse().unwrap()])
        .unwrap();
    std::fs::write(dir.path().join("server-key.pem"), &server.key_pem).unwrap();
    std::fs::write(dir.path().join("server.pem"), &server.cert_pem).unwrap();
    std::fs::write(dir.path().join("ca.pem"), new_ca.ca_cert_pem()).unwrap();

    let new_admin = client_cert(&new_ca, "admin");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let mut fresh =
            CredentialVaultClient::new(vault.channel(Some(&new_admin), new_ca.ca_cert_pem()).await);
        match fresh
            .get_access_token(get_request("acme", "nobody", "idp"))
            .await
        {
            Err(status) if status.code() == Code::NotFound => break,
            _ => {
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "new certificates never served"
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
    // New connections with the old CA's certificate are refused...
    let mut stale = CredentialVaultClient::new(
        vault
            .channel(Some(&dir.pki.clients["admin"]), &old_ca)
            .await,
    );
    assert!(stale
        .get_access_token(get_request("acme", "nobody", "idp"))
        .await
        .unwrap_err()
        .get_error_details_or_none()
        .is_none());
    // ...while the connection opened before keeps working.
    let status = open
        .get_access_token(get_request("acme", "nobody", "idp"))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::NotFound);
}

/// A refused GetAccessToken on a real `credvault dev`, with its log lines
/// in the format `env` sets: that call's audit event.
async fn refused_call_audited(env: &[(&str, &str)]) -> String {
    let dir = tempfile::tempdir().unwrap();
    let dev = support::dev::DevProcess::start_capturing(dir.path(), env);
    let channel = dev.channel(dir.path(), "acme");
    let mut client = CredentialVaultClient::new(channel);
    client
        .get_access_token(get_request("acme", "alice@example.com", "google"))
        .await
        .unwrap_err();
    let (_, log) = dev.terminate();
    let event = log
        .lines()
        .find(|l| l.contains("credvault::audit") && l.contains("GetAccessToken"))
        .unwrap_or_else(|| panic!("no audit event in:\n{log}"))
        .to_owned();
    assert!(
        !log.contains("alice@example.com"),
        "the subject appears in clear"
    );
    event
}

#[tokio::test]
async fn every_call_leaves_one_audit_event_without_secrets() {
    // Covered in-process by tests/no_secret_leaks.rs (which captures every
    // log line); here: the event's shape, from a real server's output.
    let event = refused_call_audited(&[("RUST_LOG", "warn,credvault::audit=info")]).await;
    for field in [
        "identity=spiffe://credvault.dev/acme",
        "tenant=\"acme\"",
        "provider=\"google\"",
        "reason=\"CREDENTIAL_NOT_FOUND\"",
        "latency_ms=",
    ] {
        assert!(event.contains(field), "{field} missing from {event}");
    }
}

#[tokio::test]
async fn the_audit_event_is_one_json_object_when_logs_are_json() {
    // `log.format = "json"`, as the README tells operators to route the
    // audit trail: the vault writes this line itself (telemetry::lines).
    let line = refused_call_audited(&[
        ("RUST_LOG", "warn,credvault::audit=info"),
        ("CREDVAULT_LOG__FORMAT", "json"),
    ])
    .await;
    let event: serde_json::Value =
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line}"));
    // Exactly these keys, in this order (the library's: time, level, the
    // event's fields as written, target).
    let keys = [
        "timestamp",
        "level",
        "message",
        "method",
        "identity",
        "tenant",
        "provider",
        "subject",
        "reason",
        "latency_ms",
        "target",
    ];
    assert_eq!(
        event.as_object().map(|o| o.len()),
        Some(keys.len()),
        "{line}"
    );
    let at: Vec<usize> = keys
        .iter()
        .map(|k| {
            line.find(&format!("\"{k}\":"))
                .unwrap_or_else(|| panic!("{k} in {line}"))
        })
        .collect();
    assert!(at.windows(2).all(|w| w[0] < w[1]), "{line}");
    assert_eq!(event["level"], "INFO");
    assert_eq!(event["target"], "credvault::audit");
    assert_eq!(event["message"], "call");
    assert_eq!(event["method"], "GetAccessToken");
    assert_eq!(event["identity"], "spiffe://credvault.dev/acme");
    assert_eq!(event["tenant"], "acme");
    assert_eq!(event["provider"], "google");
    assert_eq!(event["reason"], "CREDENTIAL_NOT_FOUND");
    assert!(
        event["latency_ms"].as_f64().is_some_and(|ms| ms >= 0.0),
        "{event}"
    );
    let subject = event["subject"].as_str().expect("the subject's hash");
    assert!(
        subject.len() == 16 && subject.bytes().all(|b| b.is_ascii_hexdigit()),
        "{subject}"
    );
    let at = event["timestamp"].as_str().expect("a timestamp");
    assert!(at.len() == 27 && at.ends_with('Z'), "{at}");
}

#[tokio::test]
async fn mesh_mode_trusts_only_xfcc_added_for_this_vault() {
    let provider = ProviderDouble::with_client(CLIENT_ID, Some(CLIENT_SECRET)).await;
    let mesh_port = support::dev::free_port();
    let vault_id = format!("spiffe://{TRUST_DOMAIN}/credvault");
    let dir = VaultDir::custom(
        "allow_http_loopback = true",
        &format!(
            "[auth.mesh]\nenabled = true\nlisten = \"127.0.0.1:{mesh_port}\"\nvault_identity = \"{vault_id}\"\n"
        ),
    );
    let vault = TestVault::start(&dir).await;
    let channel = tonic::transport::Endpoint::from_shared(format!("http://127.0.0.1:{mesh_port}"))
        .unwrap()
        .connect_lazy();
    let mut sidecar = CredentialVaultClient::new(channel);
    let xfcc = |by: &str, uri: &str| {
        vec![(
            "x-forwarded-client-cert",
            format!("By={by};Hash=00;URI={uri}"),
        )]
    };
    let acme = format!("spiffe://{TRUST_DOMAIN}/acme");

    attempt(
        &mut sidecar,
        "Deposit",
        "acme",
        &provider,
        &xfcc(&vault_id, &acme),
    )
    .await
    .unwrap();
    for (name, metadata, reason) in [
        ("no header", vec![], "UNAUTHENTICATED"),
        (
            "wrong By=",
            xfcc("spiffe://credvault.test/other", &acme),
            "UNAUTHENTICATED",
        ),
        (
            "foreign trust domain",
            xfcc(&vault_id, "spiffe://elsewhere/acme"),
            "UNAUTHENTICATED",
        ),
        (
            "identity not in policy",
            xfcc(&vault_id, &format!("spiffe://{TRUST_DOMAIN}/stranger")),
            "ACTION_NOT_PERMITTED",
        ),
    ] {
        let status = attempt(&mut sidecar, "GetAccessToken", "acme", &provider, &metadata)
            .await
            .unwrap_err();
        assert_eq!(error_info(&status).0, reason, "{name}");
    }
    // The forwarded identity is scoped like a certificate's.
    let status = attempt(
        &mut sidecar,
        "GetAccessToken",
        "globex",
        &provider,
        &xfcc(&vault_id, &acme),
    )
    .await
    .unwrap_err();
    assert_eq!(error_info(&status).0, "TENANT_NOT_PERMITTED");
    drop(vault);
}
