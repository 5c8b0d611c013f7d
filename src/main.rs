//! The `credvault` command line. Parsing and dispatch only; everything it
//! runs lives in the library.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    process::ExitCode,
};

use clap::{Args, Parser, Subcommand};
use credvault::{
    config::{self, Config},
    crypto::{self, KdfParams, Keyring},
    dev,
    server::{self, Listeners},
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
    /// Manage the sealed keyring file.
    #[command(subcommand)]
    Keyring(KeyringCommand),
}

#[derive(Subcommand)]
enum KeyringCommand {
    /// Create a new keyring with one key (version 1, primary).
    Init(KeyringArgs),
}

#[derive(Args)]
struct KeyringArgs {
    /// The keyring file.
    #[arg(long)]
    keyring: PathBuf,
    /// A file holding the passphrase (never put it next to the keyring in production).
    #[arg(long)]
    passphrase_file: PathBuf,
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
            Command::Keyring(KeyringCommand::Init(args)) => keyring_init(&args),
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
