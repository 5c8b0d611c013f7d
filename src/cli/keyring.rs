//! `credvault keyring …`: offline operations on the sealed keyring file. A
//! running vault picks the changes up on its next check, on SIGHUP, or with
//! `credvault admin reload-keyring`. Blocking (Argon2, file I/O): the CLI
//! runs these on the blocking pool.

use std::path::PathBuf;

use clap::{Args, Subcommand};

use crate::{
    crypto::{self, KdfParams, KeyVersion, Keyring},
    files,
};

#[derive(Subcommand)]
pub(super) enum KeyringCommand {
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
pub(super) struct KeyringArgs {
    /// The keyring file.
    #[arg(long, env = "CREDVAULT_KEYRING_FILE")]
    keyring: PathBuf,
    /// A file holding the passphrase (never put it next to the keyring in production).
    #[arg(long, env = "CREDVAULT_KEYRING_PASSPHRASE_FILE")]
    passphrase_file: PathBuf,
}

#[derive(Args)]
pub(super) struct KeyringVersionArgs {
    #[command(flatten)]
    keyring: KeyringArgs,
    /// The key version.
    version: u32,
}

/// Runs one keyring command.
pub(super) fn run(command: KeyringCommand) -> Result<(), String> {
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
            let new = read_passphrase(&new_passphrase_file).map_err(|e| e.to_string())?;
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
    let passphrase = read_passphrase(&args.passphrase_file).map_err(|e| e.to_string())?;
    crypto::load(&args.keyring, &passphrase).map_err(|e| format!("{}: {e}", args.keyring.display()))
}

/// Load, change, write back atomically; print what happened.
fn edit_keyring(
    args: &KeyringArgs,
    change: impl FnOnce(&mut Keyring) -> Result<String, String>,
) -> Result<(), String> {
    let passphrase = read_passphrase(&args.passphrase_file).map_err(|e| e.to_string())?;
    let mut keyring = crypto::load(&args.keyring, &passphrase)
        .map_err(|e| format!("{}: {e}", args.keyring.display()))?;
    let message = change(&mut keyring)?;
    crypto::store(&args.keyring, &keyring, &passphrase, KdfParams::default())
        .map_err(|e| format!("{}: {e}", args.keyring.display()))?;
    println!("{message}");
    println!("a running vault picks this up on its next keyring check, on SIGHUP, or with `credvault admin reload-keyring`");
    Ok(())
}

fn keyring_init(args: &KeyringArgs) -> Result<(), String> {
    if args.keyring.exists() {
        return Err(format!(
            "{}: already exists; refusing to overwrite a keyring",
            args.keyring.display()
        ));
    }
    let passphrase = read_passphrase(&args.passphrase_file).map_err(|e| e.to_string())?;
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

fn read_passphrase(path: &std::path::Path) -> Result<crate::secret::SecretString, String> {
    files::read_secret(path).map_err(|e| e.to_string())
}
