//! credvault: a gRPC credential vault. Services deposit a user's OAuth grant
//! once; afterwards any service in the mesh asks for a fresh access token by
//! reference and never sees a refresh token.
//!
//! # Layout
//!
//! A call flows TLS -> auth -> api -> broker -> (cache, store, crypto,
//! upstream) -> api. DESIGN §5 fixes who may import whom; `tests/walls.rs`
//! enforces it.
//!
//! - [`server`]: assembly ([`server::Vault::build`]) and serving — mTLS
//!   transport, gRPC services, health, reflection, the ops listener,
//!   background tasks, graceful shutdown.
//! - [`auth`]: transport identity (the peer, the header gate), the policy
//!   file, tenant and action checks.
//! - [`api`]: tonic services; proto <-> domain; the one error-to-status table.
//! - [`broker`]: the token lifecycle — cache, single-flight refresh, the one
//!   write path, reauth state, revocation, key rotation, backups; the
//!   credential event log and its watchers; the consent flows the vault
//!   runs; jobs that one replica runs at a time.
//! - `upstream`: the OAuth client (refresh, code exchange, client
//!   credentials, revocation, the consent flows' requests, discovery,
//!   `private_key_jwt`), its own types, and the endpoint policy.
//! - [`crypto`]: the versioned keyring, its sealed file and source, the
//!   record envelope.
//! - [`store`]: the storage trait, its one scan, [`store::open`], and the
//!   embedded sled backend.
//! - [`config`]: the TOML configuration with `CREDVAULT_*` overrides.
//! - [`telemetry`]: logging, Prometheus metrics, the audit trail.
//! - [`cli`]: the command line, including the VaultAdmin client.
//! - [`dev`]: `credvault dev` — a throwaway CA, certificates, keyring and
//!   config for local use and tests, and a demo OAuth provider on loopback.
//! - `webhooks`: credential events POSTed to HTTP sinks, signed per
//!   Standard Webhooks, one replica delivering each sink.
//! - `files`: atomic private writes, secret files, change watching.
//! - [`secret`]: the redacting, zeroizing wrapper every secret travels in.
//!
//! The public surface is what the binary, the tests and the benches need:
//! the generated protos (`api::pb`), the server's entry points, the config,
//! the crypto primitives, the store trait, the record codec and the domain
//! vocabulary (`broker::model`, `broker::record`), the dev PKI, and the
//! command line.

#![forbid(unsafe_code)]

pub mod api;
pub mod auth;
pub mod broker;
pub mod cli;
pub mod config;
pub mod crypto;
pub mod dev;
mod files;
pub mod secret;
pub mod server;
pub mod store;
pub mod telemetry;
mod upstream;
mod webhooks;
