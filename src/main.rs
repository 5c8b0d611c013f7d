//! The `credvault` command line. Parsing and dispatch only; everything it
//! runs lives in the library.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    process::ExitCode,
};

use clap::{Args, Parser, Subcommand};
use credvault::{
    admin_client,
    config::{self, Config},
    crypto::{self, KdfParams, KeyVersion, Keyring},
    dev,
    server::{self, Listeners},
    store::{backup, SledStore},
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
    },
    /// Manage the sealed keyring file (offline; a running vault picks up changes).
    #[command(subcommand)]
    Keyring(KeyringCommand),
    /// Back up a stopped vault's store (still encrypted; safe to copy).
    /// For a running vault use `credvault admin backup`.
    Backup {
        /// The data dir of a stopped vault.
        #[arg(long)]
        data_dir: PathBuf,
        #[arg(long)]
        out: PathBuf,
    },
    /// Restore a backup into an empty data dir.
    Restore {
        #[arg(long)]
        from: PathBuf,
        #[arg(long)]
        data_dir: PathBuf,
    },
    /// Operate a running vault through its VaultAdmin service.
    Admin {
        #[command(flatten)]
        target: TargetArgs,
        #[command(subcommand)]
        command: AdminCommand,
    },
}

#[derive(Subcommand)]
enum KeyringCommand {
    /// Create a new keyring with one key (version 1, primary).
    Init(KeyringArgs),
    /// Add a fresh key under the next version (not yet primary).
    Add(KeyringArgs),
    /// Make VERSION the primary for new writes; the old primary becomes decrypt-only.
    Promote(KeyringVersionArgs),
    /// Stop using VERSION for decryption (reversible with `reactivate`).
    Retire(KeyringVersionArgs),
    /// Undo a retirement: VERSION decrypts again.
    Reactivate(KeyringVersionArgs),
    /// Erase a retired VERSION's key bytes forever (its number is never reused).
    Destroy(KeyringVersionArgs),
    /// Show every version: state, fingerprint, creation time.
    List(KeyringArgs),
    /// Re-seal the keyring under a new passphrase.
    ChangePassphrase {
        #[command(flatten)]
        keyring: KeyringArgs,
        /// A file holding the new passphrase.
        #[arg(long)]
        new_passphrase_file: PathBuf,
    },
}

#[derive(Args)]
struct KeyringArgs {
    /// The keyring file.
    #[arg(long, env = "CREDVAULT_KEYRING_FILE")]
    keyring: PathBuf,
    /// A file holding the passphrase (never put it next to the keyring in production).
    #[arg(long, env = "CREDVAULT_KEYRING_PASSPHRASE_FILE")]
    passphrase_file: PathBuf,
}

#[derive(Args)]
struct KeyringVersionArgs {
    #[command(flatten)]
    keyring: KeyringArgs,
    /// The key version.
    version: u32,
}

#[derive(Args)]
struct TargetArgs {
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
enum AdminCommand {
    /// Key versions, states and record counts.
    KeyStatus,
    /// Make the vault re-read its keyring file now.
    ReloadKeyring,
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

fn main() -> ExitCode {
    let cli = Cli::parse();
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
            } => run_dev(&dir, listen, ops_listen).await,
            Command::Keyring(command) => keyring(command),
            Command::Backup { data_dir, out } => backup_offline(&data_dir, &out).await,
            Command::Restore { from, data_dir } => restore(&from, &data_dir).await,
            Command::Admin { target, command } => admin(target, command).await,
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

async fn serve(path: &Path, listen: Option<(SocketAddr, SocketAddr)>) -> Result<(), String> {
    let mut config = Config::load(path).map_err(|e| e.to_string())?;
    if let Some((grpc, ops)) = listen {
        config.listen = grpc;
        config.ops_listen = ops;
    }
    telemetry::init(&config.log.filter, config.log.format);
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

async fn run_dev(dir: &Path, listen: SocketAddr, ops_listen: SocketAddr) -> Result<(), String> {
    let prepared = dev::prepare(dir).map_err(|e| e.to_string())?;
    println!("{}", dev::instructions(&prepared.dir, listen, ops_listen));
    serve(&prepared.config, Some((listen, ops_listen))).await
}

async fn backup_offline(data_dir: &Path, out: &Path) -> Result<(), String> {
    if !data_dir.is_dir() {
        return Err(format!("{}: no such data dir", data_dir.display()));
    }
    let store = SledStore::open(data_dir).map_err(|e| {
        format!(
            "{}: {e} (is the vault running? use `credvault admin backup`)",
            data_dir.display()
        )
    })?;
    let mut bytes = Vec::new();
    let records = backup::export(&store, &mut bytes)
        .await
        .map_err(|e| e.to_string())?;
    admin_client::write_atomically(out, &bytes).map_err(|e| e.to_string())?;
    println!("backed up {records} records to {}", out.display());
    Ok(())
}

async fn restore(from: &Path, data_dir: &Path) -> Result<(), String> {
    let bytes = std::fs::read(from).map_err(|e| format!("{}: {e}", from.display()))?;
    let store = SledStore::open(data_dir).map_err(|e| format!("{}: {e}", data_dir.display()))?;
    let records = backup::import(&store, &bytes)
        .await
        .map_err(|e| format!("{}: {e}", from.display()))?;
    println!("restored {records} records into {}", data_dir.display());
    Ok(())
}

fn keyring(command: KeyringCommand) -> Result<(), String> {
    match command {
        KeyringCommand::Init(args) => keyring_init(&args),
        KeyringCommand::Add(args) => edit_keyring(&args, |k| {
            let version = k.add().map_err(|e| e.to_string())?;
            Ok(format!(
                "added key version {version} (not primary; `promote {version}` to use it)"
            ))
        }),
        KeyringCommand::Promote(a) => edit_keyring(&a.keyring, |k| {
            k.promote(version(a.version)?).map_err(|e| e.to_string())?;
            Ok(format!("key version {} is now the primary", a.version))
        }),
        KeyringCommand::Retire(a) => edit_keyring(&a.keyring, |k| {
            k.retire(version(a.version)?).map_err(|e| e.to_string())?;
            Ok(format!(
                "key version {} retired; records still under it now fail with KEY_VERSION_UNAVAILABLE \
                 (check `credvault admin key-status` first; `reactivate` undoes this)",
                a.version
            ))
        }),
        KeyringCommand::Reactivate(a) => edit_keyring(&a.keyring, |k| {
            k.reactivate(version(a.version)?)
                .map_err(|e| e.to_string())?;
            Ok(format!("key version {} decrypts again", a.version))
        }),
        KeyringCommand::Destroy(a) => edit_keyring(&a.keyring, |k| {
            k.destroy(version(a.version)?).map_err(|e| e.to_string())?;
            Ok(format!(
                "key version {} destroyed; its bytes are gone for good",
                a.version
            ))
        }),
        KeyringCommand::List(args) => {
            let keyring = load_keyring(&args)?;
            println!(
                "{:>7}  {:<12}  {:<16}  {:>7}  created",
                "version", "state", "fingerprint", "primary"
            );
            for info in keyring.versions() {
                let created = time::OffsetDateTime::from_unix_timestamp(info.created_at_unix)
                    .ok()
                    .and_then(|t| {
                        t.format(&time::format_description::well_known::Rfc3339)
                            .ok()
                    })
                    .unwrap_or_default();
                println!(
                    "{:>7}  {:<12}  {:<16}  {:>7}  {created}",
                    info.version,
                    info.state,
                    info.fingerprint
                        .map(|f| f.to_string())
                        .unwrap_or_else(|| "-".into()),
                    if info.primary { "yes" } else { "" },
                );
            }
            Ok(())
        }
        KeyringCommand::ChangePassphrase {
            keyring: args,
            new_passphrase_file,
        } => {
            let keyring = load_keyring(&args)?;
            let new = config::read_passphrase(&new_passphrase_file).map_err(|e| e.to_string())?;
            crypto::store(&args.keyring, &keyring, &new, KdfParams::default())
                .map_err(|e| format!("{}: {e}", args.keyring.display()))?;
            println!(
                "{}: re-sealed under the new passphrase",
                args.keyring.display()
            );
            Ok(())
        }
    }
}

fn version(n: u32) -> Result<KeyVersion, String> {
    KeyVersion::new(n).ok_or_else(|| "key version 0 does not exist".to_owned())
}

fn load_keyring(args: &KeyringArgs) -> Result<Keyring, String> {
    let passphrase = config::read_passphrase(&args.passphrase_file).map_err(|e| e.to_string())?;
    crypto::load(&args.keyring, &passphrase).map_err(|e| format!("{}: {e}", args.keyring.display()))
}

/// Load, change, write back atomically; print what happened.
fn edit_keyring(
    args: &KeyringArgs,
    change: impl FnOnce(&mut Keyring) -> Result<String, String>,
) -> Result<(), String> {
    let passphrase = config::read_passphrase(&args.passphrase_file).map_err(|e| e.to_string())?;
    let mut keyring = crypto::load(&args.keyring, &passphrase)
        .map_err(|e| format!("{}: {e}", args.keyring.display()))?;
    let message = change(&mut keyring)?;
    crypto::store(&args.keyring, &keyring, &passphrase, KdfParams::default())
        .map_err(|e| format!("{}: {e}", args.keyring.display()))?;
    println!("{message}");
    println!("a running vault picks this up on its next keyring check, on SIGHUP, or with `credvault admin reload-keyring`");
    Ok(())
}

async fn admin(args: TargetArgs, command: AdminCommand) -> Result<(), String> {
    let pick = |explicit: Option<PathBuf>, dev_name: &str, flag: &str| {
        explicit
            .or_else(|| args.dev_dir.as_ref().map(|d| d.join(dev_name)))
            .ok_or_else(|| format!("--{flag} (or --dev-dir) is required"))
    };
    let target = admin_client::Target {
        address: args.target.clone(),
        ca: pick(args.cacert.clone(), "ca.pem", "cacert")?,
        cert: pick(args.cert.clone(), "admin.pem", "cert")?,
        key: pick(args.key.clone(), "admin-key.pem", "key")?,
    };
    let output = match command {
        AdminCommand::KeyStatus => admin_client::key_status(&target).await,
        AdminCommand::ReloadKeyring => admin_client::reload_keyring(&target).await,
        AdminCommand::Rewrap { rate, no_wait } => {
            admin_client::rewrap(&target, rate, !no_wait).await
        }
        AdminCommand::List { tenant } => admin_client::list(&target, &tenant).await,
        AdminCommand::Backup { out } => admin_client::backup(&target, &out).await,
        AdminCommand::Describe {
            tenant,
            subject,
            provider,
        } => admin_client::describe(&target, &tenant, &subject, &provider).await,
    }
    .map_err(|e| e.to_string())?;
    print!("{output}");
    if !output.ends_with('\n') {
        println!();
    }
    Ok(())
}

fn keyring_init(args: &KeyringArgs) -> Result<(), String> {
    if args.keyring.exists() {
        return Err(format!(
            "{}: already exists; refusing to overwrite a keyring",
            args.keyring.display()
        ));
    }
    let passphrase = config::read_passphrase(&args.passphrase_file).map_err(|e| e.to_string())?;
    let keyring = Keyring::generate();
    let primary = keyring.primary();
    let fingerprint = keyring
        .fingerprint(primary)
        .map(|f| f.to_string())
        .unwrap_or_default();
    crypto::store(&args.keyring, &keyring, &passphrase, KdfParams::default())
        .map_err(|e| format!("{}: {e}", args.keyring.display()))?;
    println!(
        "created {} with key version {primary} (fingerprint {fingerprint})",
        args.keyring.display()
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
