//! The `credvault` command line: parsing and dispatch of every subcommand
//! (`serve`, `dev`, `keyring …`, `backup`, `restore`, `admin …`). The binary
//! (`src/main.rs`) only calls [`main`].
//!
//! - [`admin`]: the operator's VaultAdmin client behind `credvault admin …`.
//! - `keyring`: the offline keyring file operations.

pub mod admin;
mod keyring;

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    process::ExitCode,
};

use clap::{Parser, Subcommand};

use self::{
    admin::{AdminCommand, TargetArgs},
    keyring::KeyringCommand,
};
use crate::{
    broker,
    config::Config,
    crypto, dev, files,
    server::{self, tls, Listeners},
    store::{self, backup, StoreSettings},
    telemetry,
};

#[derive(Parser)]
#[command(
    name = "credvault",
    version,
    about = "A gRPC credential vault for OAuth grants."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the vault from a configuration file.
    Serve {
        /// The TOML configuration; settings can be overridden by CREDVAULT_* variables.
        #[arg(long, env = "CREDVAULT_CONFIG")]
        config: PathBuf,
    },
    /// Run a local vault with generated certificates, keyring and config.
    Dev {
        /// Where the dev files live; reused when it exists.
        #[arg(long, default_value = ".credvault-dev")]
        dir: PathBuf,
        /// The mTLS gRPC listener.
        #[arg(long, default_value = "127.0.0.1:50051")]
        listen: SocketAddr,
        /// The plaintext ops listener (/livez, /readyz).
        #[arg(long, default_value = "127.0.0.1:9090")]
        ops_listen: SocketAddr,
        /// Store the records on this etcd cluster (comma-separated client
        /// URLs) instead of the dev dir: several `dev` processes on one
        /// `--dir`, with different listeners, then form one vault.
        #[arg(long, value_delimiter = ',')]
        etcd: Vec<String>,
        /// The demo OAuth provider's listener (loopback; the `demo` preset
        /// points at it).
        #[arg(long, default_value = "127.0.0.1:50052")]
        demo_listen: SocketAddr,
    },
    /// Manage the sealed keyring file (offline; a running vault picks up changes).
    #[command(subcommand)]
    Keyring(KeyringCommand),
    /// Back up a stopped vault's store (still encrypted; safe to copy),
    /// authenticated under its keyring. For a running vault use
    /// `credvault admin backup`.
    Backup {
        /// The vault's configuration (for its keyring and data dir).
        #[arg(long, env = "CREDVAULT_CONFIG")]
        config: PathBuf,
        /// The data dir of the stopped vault (default: the config's).
        #[arg(long)]
        data_dir: Option<PathBuf>,
        #[arg(long)]
        out: PathBuf,
    },
    /// Restore a backup into an empty data dir, after checking it is
    /// authentic under the keyring.
    Restore {
        #[arg(long)]
        from: PathBuf,
        /// The vault's configuration (for its keyring and data dir).
        #[arg(long, env = "CREDVAULT_CONFIG")]
        config: PathBuf,
        /// The empty data dir to restore into (default: the config's).
        #[arg(long)]
        data_dir: Option<PathBuf>,
    },
    /// Operate a running vault through its VaultAdmin service.
    Admin {
        #[command(flatten)]
        target: TargetArgs,
        #[command(subcommand)]
        command: AdminCommand,
    },
}

/// Runs the command line; the process's exit code.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    // Once, before any TLS client or server exists.
    tls::install_crypto_provider();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(error) => return fail(&format!("cannot start the async runtime: {error}")),
    };
    let result = runtime.block_on(async {
        match cli.command {
            Command::Serve { config } => serve(&config, None).await,
            Command::Dev {
                dir,
                listen,
                ops_listen,
                etcd,
                demo_listen,
            } => run_dev(&dir, listen, ops_listen, etcd, demo_listen).await,
            Command::Keyring(command) => tokio::task::spawn_blocking(move || keyring::run(command))
                .await
                .unwrap_or_else(|_| Err("the keyring task failed".into())),
            Command::Backup {
                config,
                data_dir,
                out,
            } => backup_offline(&config, data_dir, &out).await,
            Command::Restore {
                from,
                config,
                data_dir,
            } => restore(&from, &config, data_dir).await,
            Command::Admin { target, command } => admin::run(target, command).await,
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => fail(&message),
    }
}

fn fail(message: &str) -> ExitCode {
    eprintln!("credvault: error: {message}");
    ExitCode::FAILURE
}

/// What `dev` changes in the config it serves.
struct DevOverrides {
    listen: SocketAddr,
    ops_listen: SocketAddr,
    etcd: Vec<String>,
    /// The demo provider's base URL: the `demo` preset points at it.
    demo: String,
}

/// The preset of the demo provider `dev` serves: a public client (PKCE),
/// every endpoint, the provider's own callback page as redirect URI.
fn demo_preset(base: &str) -> crate::config::ProviderPreset {
    crate::config::ProviderPreset {
        token_endpoint: format!("{base}/token"),
        authorization_endpoint: Some(format!("{base}/authorize")),
        device_authorization_endpoint: Some(format!("{base}/device_authorization")),
        issuer: Some(base.to_owned()),
        redirect_uri: Some(format!("{base}/callback")),
        revocation_endpoint: Some(format!("{base}/revoke")),
        auth_method: crate::config::PresetAuthMethod::None,
        client_id: dev::provider::CLIENT_ID.to_owned(),
        client_secret: None,
        client_secret_file: None,
        private_key_file: None,
        signing_alg: None,
        key_id: None,
        scopes: vec!["profile".to_owned()],
    }
}

async fn serve(path: &Path, dev: Option<DevOverrides>) -> Result<(), String> {
    let owned = path.to_owned();
    let mut config = tokio::task::spawn_blocking(move || Config::load(&owned))
        .await
        .map_err(|_| "the config task failed".to_owned())?
        .map_err(|e| e.to_string())?;
    if let Some(dev) = dev {
        config.listen = dev.listen;
        config.ops_listen = dev.ops_listen;
        if !dev.etcd.is_empty() {
            config.storage = crate::config::StorageConfig::etcd(dev.etcd);
        }
        config
            .providers
            .entry("demo".to_owned())
            .or_insert_with(|| demo_preset(&dev.demo));
    }
    telemetry::init_logging(
        &config.log.filter,
        config.log.format,
        store::TEARDOWN_LOG_TARGETS,
    );
    let listeners = Listeners::bind(&config).await.map_err(|e| {
        format!(
            "cannot listen on {} / {}: {e}",
            config.listen, config.ops_listen
        )
    })?;
    server::run(config, listeners, shutdown_signal())
        .await
        .map_err(|e| e.to_string())
}

async fn run_dev(
    dir: &Path,
    listen: SocketAddr,
    ops_listen: SocketAddr,
    etcd: Vec<String>,
    demo_listen: SocketAddr,
) -> Result<(), String> {
    if !demo_listen.ip().is_loopback() {
        return Err("--demo-listen must be a loopback address".into());
    }
    // A second dev process (several on one etcd form one vault) takes any
    // free port rather than fail: the demo provider is a convenience.
    let demo_listener = match tokio::net::TcpListener::bind(demo_listen).await {
        Ok(listener) => listener,
        Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => {
            tokio::net::TcpListener::bind((demo_listen.ip(), 0))
                .await
                .map_err(|e| format!("cannot start the demo provider: {e}"))?
        }
        Err(e) => {
            return Err(format!(
                "cannot listen on {demo_listen} (--demo-listen): {e}"
            ))
        }
    };
    let demo = dev::provider::start(demo_listener)
        .map_err(|e| format!("the demo provider did not start: {e}"))?;
    let owned = dir.to_owned();
    let prepared = tokio::task::spawn_blocking(move || dev::prepare(&owned))
        .await
        .map_err(|_| "the dev set-up task failed".to_owned())?
        .map_err(|e| e.to_string())?;
    println!(
        "{}",
        dev::instructions(&prepared.dir, listen, ops_listen, &demo)
    );
    serve(
        &prepared.config,
        Some(DevOverrides {
            listen,
            ops_listen,
            etcd,
            demo,
        }),
    )
    .await
}

/// The embedded store an offline backup or restore works on, opened with
/// the configured page cache.
struct OfflineStore {
    data_dir: PathBuf,
    cache_capacity: u64,
}

async fn open_store(
    target: &OfflineStore,
) -> Result<std::sync::Arc<dyn store::CredentialStore>, String> {
    let data_dir = &target.data_dir;
    store::open(&StoreSettings::Embedded {
        data_dir: data_dir.clone(),
        cache_capacity: target.cache_capacity,
    })
    .await
    .map_err(|e| format!("{}: {e}", data_dir.display()))
}

/// The keyring and store an offline backup or restore works on.
async fn offline_target(
    config: &Path,
    data_dir: Option<PathBuf>,
) -> Result<(crypto::Keyring, OfflineStore), String> {
    let owned = config.to_owned();
    let config = tokio::task::spawn_blocking(move || Config::load(&owned))
        .await
        .map_err(|_| "the config task failed".to_owned())?
        .map_err(|e| e.to_string())?;
    let keyring = crypto::KeyringSource {
        path: config.keyring.path.clone(),
        passphrase: config.keyring.passphrase.clone(),
        passphrase_file: config.keyring.passphrase_file.clone(),
    }
    .load()
    .await
    .map_err(|e| e.to_string())?;
    let target = OfflineStore {
        data_dir: data_dir.unwrap_or(config.data_dir),
        cache_capacity: config.storage.sled.cache_capacity_mib << 20,
    };
    Ok((keyring, target))
}

async fn backup_offline(
    config: &Path,
    data_dir: Option<PathBuf>,
    out: &Path,
) -> Result<(), String> {
    let (keyring, target) = offline_target(config, data_dir).await?;
    if !target.data_dir.is_dir() {
        return Err(format!("{}: no such data dir", target.data_dir.display()));
    }
    let store = open_store(&target)
        .await
        .map_err(|e| format!("{e} (is the vault running? use `credvault admin backup`)"))?;
    let key = broker::backup_key(&keyring, None).map_err(|e| e.to_string())?;
    let mut bytes = Vec::new();
    let records = backup::export(store.as_ref(), &key, &mut bytes)
        .await
        .map_err(|e| e.to_string())?;
    let out_owned = out.to_owned();
    tokio::task::spawn_blocking(move || {
        files::write_atomically(&out_owned, &bytes, files::Access::Private)
    })
    .await
    .map_err(|_| "the write task failed".to_owned())?
    .map_err(|e| e.to_string())?;
    println!("backed up {records} records to {}", out.display());
    Ok(())
}

async fn restore(from: &Path, config: &Path, data_dir: Option<PathBuf>) -> Result<(), String> {
    let (keyring, target) = offline_target(config, data_dir).await?;
    let bytes = tokio::fs::read(from)
        .await
        .map_err(|e| format!("{}: {e}", from.display()))?;
    let fail = |e: &dyn std::fmt::Display| format!("{}: {e}", from.display());
    let version = backup::key_version_of(&bytes).map_err(|e| fail(&e))?;
    let key = broker::backup_key(&keyring, Some(version)).map_err(|e| fail(&e))?;
    let store = open_store(&target).await?;
    let records = backup::import(store.as_ref(), &key, &bytes)
        .await
        .map_err(|e| fail(&e))?;
    println!(
        "restored {records} records into {}",
        target.data_dir.display()
    );
    Ok(())
}

/// Resolves on SIGTERM or ctrl-c.
async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = terminate => {},
    }
}
