//! The operator's side of `credvault.v1.VaultAdmin`, behind the
//! `credvault admin …` commands: an mTLS client, plain-text reports, and a
//! progress bar for rewraps.

use std::{path::PathBuf, time::Duration};

use clap::{Args, Subcommand};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

use crate::{
    api::pb::{self, vault_admin_client::VaultAdminClient},
    files,
};

#[derive(Args)]
pub(super) struct TargetArgs {
    /// The vault's gRPC address (host:port; the host is the TLS server name).
    #[arg(long, default_value = "localhost:50051", global = true)]
    target: String,
    /// Take ca.pem, admin.pem and admin-key.pem from a `credvault dev` directory.
    #[arg(long, global = true)]
    dev_dir: Option<PathBuf>,
    /// CA bundle that the vault's certificate chains to.
    #[arg(long, global = true)]
    cacert: Option<PathBuf>,
    /// The operator's client certificate.
    #[arg(long, global = true)]
    cert: Option<PathBuf>,
    /// The operator's client key.
    #[arg(long, global = true)]
    key: Option<PathBuf>,
}

#[derive(Subcommand)]
pub(super) enum AdminCommand {
    /// Key versions, states and record counts.
    KeyStatus,
    /// Make the vault re-read its keyring file now.
    ReloadKeyring,
    /// Make the vault re-read its policy file now.
    ReloadPolicy,
    /// Re-encrypt every record under the primary key, with a progress bar.
    Rewrap {
        /// Records per second (0: the server's default).
        #[arg(long, default_value_t = 0)]
        rate: u32,
        /// Start it and return without waiting.
        #[arg(long)]
        no_wait: bool,
    },
    /// Stream a backup of the running vault's store into a file.
    Backup {
        #[arg(long)]
        out: PathBuf,
    },
    /// A tenant's credentials (metadata only).
    List {
        #[arg(long)]
        tenant: String,
    },
    /// One credential's metadata.
    Describe {
        #[arg(long)]
        tenant: String,
        #[arg(long)]
        subject: String,
        #[arg(long)]
        provider: String,
    },
}

/// Runs one admin command and prints its report.
pub(super) async fn run(args: TargetArgs, command: AdminCommand) -> Result<(), String> {
    let pick = |explicit: Option<PathBuf>, dev_name: &str, flag: &str| {
        explicit
            .or_else(|| args.dev_dir.as_ref().map(|d| d.join(dev_name)))
            .ok_or_else(|| format!("--{flag} (or --dev-dir) is required"))
    };
    let target = Target {
        address: args.target.clone(),
        ca: pick(args.cacert.clone(), "ca.pem", "cacert")?,
        cert: pick(args.cert.clone(), "admin.pem", "cert")?,
        key: pick(args.key.clone(), "admin-key.pem", "key")?,
    };
    let output = match command {
        AdminCommand::KeyStatus => key_status(&target).await,
        AdminCommand::ReloadKeyring => reload_keyring(&target).await,
        AdminCommand::ReloadPolicy => reload_policy(&target).await,
        AdminCommand::Rewrap { rate, no_wait } => rewrap(&target, rate, !no_wait).await,
        AdminCommand::List { tenant } => list(&target, &tenant).await,
        AdminCommand::Backup { out } => backup(&target, &out).await,
        AdminCommand::Describe {
            tenant,
            subject,
            provider,
        } => describe(&target, &tenant, &subject, &provider).await,
    }
    .map_err(|e| e.to_string())?;
    print!("{output}");
    if !output.ends_with('\n') {
        println!();
    }
    Ok(())
}

/// How to reach and authenticate to a vault.
#[derive(Clone, Debug)]
pub struct Target {
    /// `host:port`; the host is also the TLS server name.
    pub address: String,
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// A failed admin command, as one line.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct AdminError(String);

fn read(path: &PathBuf) -> Result<Vec<u8>, AdminError> {
    std::fs::read(path).map_err(|e| AdminError(format!("{}: {e}", path.display())))
}

fn status_error(status: tonic::Status) -> AdminError {
    use tonic_types::StatusExt;
    let reason = status
        .get_error_details()
        .error_info()
        .map(|i| i.reason.clone())
        .unwrap_or_default();
    AdminError(format!(
        "{reason} ({:?}): {}",
        status.code(),
        status.message()
    ))
}

/// Connects with the operator's client certificate.
pub async fn connect(target: &Target) -> Result<VaultAdminClient<Channel>, AdminError> {
    let host = target
        .address
        .rsplit_once(':')
        .map_or(target.address.as_str(), |(host, _)| host)
        .trim_matches(['[', ']']);
    let key = zeroize::Zeroizing::new(read(&target.key)?);
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(read(&target.ca)?))
        .identity(Identity::from_pem(read(&target.cert)?, key.as_slice()))
        .domain_name(host);
    let channel = Endpoint::from_shared(format!("https://{}", target.address))
        .map_err(|e| AdminError(format!("bad target {}: {e}", target.address)))?
        .tls_config(tls)
        .map_err(|e| AdminError(format!("tls: {e}")))?
        .connect_timeout(Duration::from_secs(10))
        .connect()
        .await
        .map_err(|e| AdminError(format!("cannot connect to {}: {e}", target.address)))?;
    Ok(VaultAdminClient::new(channel))
}

/// `credvault admin key-status` (and the answer of `reload-keyring`).
pub fn render_key_status(status: &pb::GetKeyStatusResponse) -> String {
    let mut out = format!(
        "{:>7}  {:<12}  {:<16}  {:>8}  {:>10}\n",
        "version", "state", "fingerprint", "primary", "records"
    );
    for v in &status.versions {
        let state = pb::KeyState::try_from(v.state)
            .map(|s| {
                s.as_str_name()
                    .trim_start_matches("KEY_STATE_")
                    .to_lowercase()
            })
            .unwrap_or_default();
        out.push_str(&format!(
            "{:>7}  {:<12}  {:<16}  {:>8}  {:>10}\n",
            v.version,
            state,
            v.fingerprint,
            if v.primary { "yes" } else { "" },
            v.record_count
        ));
    }
    if status.records_under_unknown_versions > 0 {
        out.push_str(&format!(
            "records under versions this keyring never had: {}\n",
            status.records_under_unknown_versions
        ));
    }
    if status.unreadable_records > 0 {
        out.push_str(&format!(
            "records with unreadable envelopes: {}\n",
            status.unreadable_records
        ));
    }
    out
}

pub async fn key_status(target: &Target) -> Result<String, AdminError> {
    let mut client = connect(target).await?;
    let status = client
        .get_key_status(pb::GetKeyStatusRequest {})
        .await
        .map_err(status_error)?
        .into_inner();
    Ok(render_key_status(&status))
}

pub async fn reload_keyring(target: &Target) -> Result<String, AdminError> {
    let mut client = connect(target).await?;
    let status = client
        .reload_keyring(pb::ReloadKeyringRequest {})
        .await
        .map_err(status_error)?
        .into_inner();
    Ok(format!("keyring reloaded\n{}", render_key_status(&status)))
}

pub async fn reload_policy(target: &Target) -> Result<String, AdminError> {
    let mut client = connect(target).await?;
    let reloaded = client
        .reload_policy(pb::ReloadPolicyRequest {})
        .await
        .map_err(status_error)?
        .into_inner();
    Ok(format!("policy reloaded: {} rules", reloaded.rules))
}

/// Starts (or joins) a rewrap and draws its progress until it ends.
pub async fn rewrap(target: &Target, rate: u32, wait: bool) -> Result<String, AdminError> {
    let mut client = connect(target).await?;
    let mut status = client
        .start_rewrap(pb::StartRewrapRequest {
            records_per_second: rate,
        })
        .await
        .map_err(status_error)?
        .into_inner();
    if !wait {
        return Ok(progress_line(&status));
    }
    loop {
        eprint!("\r{}", progress_line(&status));
        if status.state != pb::RewrapState::Running as i32 {
            eprintln!();
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
        status = client
            .get_rewrap_status(pb::GetRewrapStatusRequest {})
            .await
            .map_err(status_error)?
            .into_inner();
    }
    if status.state == pb::RewrapState::Failed as i32 {
        return Err(AdminError(format!("rewrap failed: {}", status.error)));
    }
    Ok(format!(
        "rewrap to key version {} finished: {} rewrapped, {} skipped, {} failed",
        status.target_version, status.rewrapped, status.skipped, status.failed
    ))
}

/// `[#########---------]  5123/10000  rewrapped 5000  skipped 123  failed 0`
pub fn progress_line(status: &pb::RewrapStatus) -> String {
    const WIDTH: u64 = 30;
    let done = status.scanned.min(status.total);
    let filled = (done * WIDTH).checked_div(status.total).unwrap_or(WIDTH);
    format!(
        "rewrap -> v{} [{}{}] {}/{}  rewrapped {}  skipped {}  failed {}",
        status.target_version,
        "#".repeat(filled as usize),
        "-".repeat((WIDTH - filled) as usize),
        done,
        status.total,
        status.rewrapped,
        status.skipped,
        status.failed
    )
}

pub async fn list(target: &Target, tenant: &str) -> Result<String, AdminError> {
    let mut client = connect(target).await?;
    let mut out = String::new();
    let mut page_token = String::new();
    loop {
        let page = client
            .list_credentials(pb::ListCredentialsRequest {
                tenant: tenant.to_owned(),
                page_size: 500,
                page_token,
            })
            .await
            .map_err(status_error)?
            .into_inner();
        for c in &page.credentials {
            out.push_str(&describe_line(c));
            out.push('\n');
        }
        if page.next_page_token.is_empty() {
            break;
        }
        page_token = page.next_page_token;
    }
    Ok(out)
}

pub async fn describe(
    target: &Target,
    tenant: &str,
    subject: &str,
    provider: &str,
) -> Result<String, AdminError> {
    let mut client = connect(target).await?;
    let metadata = client
        .describe_credential(pb::DescribeCredentialRequest {
            credential: Some(pb::CredentialRef {
                tenant: tenant.to_owned(),
                subject: subject.to_owned(),
                provider: provider.to_owned(),
            }),
        })
        .await
        .map_err(status_error)?
        .into_inner();
    Ok(describe_line(&metadata))
}

fn describe_line(c: &pb::CredentialMetadata) -> String {
    let reference = c.credential.clone().unwrap_or_default();
    let state = pb::CredentialState::try_from(c.state)
        .map(|s| {
            s.as_str_name()
                .trim_start_matches("CREDENTIAL_STATE_")
                .to_lowercase()
        })
        .unwrap_or_default();
    let expires = c
        .access_token_expires_at
        .map(|t| t.to_string())
        .unwrap_or_else(|| "-".to_owned());
    let mut extra = String::new();
    if !c.last_event.is_empty() {
        let at = c.last_event_at.map(|t| t.to_string()).unwrap_or_default();
        extra.push_str(&format!("  last_event={}@{at}", c.last_event));
    }
    if let Some(since) = c.failing_since {
        extra.push_str(&format!("  failing_since={since}"));
    }
    format!(
        "{}/{}/{}  state={}{}  generation={}  key_version={}  expires={}  endpoint={}{extra}",
        reference.tenant,
        reference.subject,
        reference.provider,
        state,
        if c.reauth_cause.is_empty() {
            String::new()
        } else {
            format!("({})", c.reauth_cause)
        },
        c.generation,
        c.key_version,
        expires,
        c.token_endpoint_host
    )
}

/// Streams a backup from a running vault into `out` (written atomically).
pub async fn backup(target: &Target, out: &std::path::Path) -> Result<String, AdminError> {
    let mut client = connect(target).await?;
    let mut stream = client
        .backup(pb::BackupRequest {})
        .await
        .map_err(status_error)?
        .into_inner();
    let mut bytes = Vec::new();
    while let Some(chunk) = stream.message().await.map_err(status_error)? {
        bytes.extend_from_slice(&chunk.data);
    }
    files::write_atomically(out, &bytes, files::Access::Private)
        .map_err(|e| AdminError(e.to_string()))?;
    Ok(format!(
        "backup written to {} ({} bytes)",
        out.display(),
        bytes.len()
    ))
}
