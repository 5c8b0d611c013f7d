//! The vault's `crypto` module, built from the vault's own source files
//! without the rest of the vault, for the fuzz targets.
//!
//! Why not depend on the `credvault` crate: the targets reach only `crypto`
//! (and the `secret` and `files` modules it uses), yet a dependency on the
//! crate built tonic, sled, reqwest, the etcd client and everything under
//! them with ASan and coverage instrumentation: 12-16 minutes of every CI
//! run, half of it. These are the same files, compiled once more here, so
//! what is fuzzed is what the vault runs; only the crate root differs.
//! The vault's `files` and `secret` modules sit at this crate's root too,
//! so `crate::files` and `crate::secret` in `crypto` name them here as
//! they do in the vault.
#![forbid(unsafe_code)]

#[path = "../../src/files.rs"]
pub mod files;
#[path = "../../src/secret.rs"]
pub mod secret;

#[path = "../../src/crypto/mod.rs"]
pub mod crypto;
