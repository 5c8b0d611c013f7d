//! credvault: a gRPC credential vault. Services deposit a user's OAuth grant
//! once; afterwards any service in the mesh asks for a fresh access token by
//! reference and never sees a refresh token.
//!
//! # Layout
//!
//! A call flows TLS -> auth -> api -> broker -> (cache, store, crypto,
//! upstream) -> api.
//!
//! - [`server`]: assembly — mTLS transport, gRPC services, health,
//!   reflection, the ops listener, graceful shutdown.
//! - [`audit`]: the per-call audit event and the subject's keyed hash.
//! - [`auth`]: caller identity from the peer certificate, the policy file,
//!   tenant and action checks.
//! - [`api`]: tonic services; proto <-> domain; the one error-to-status table.
//! - [`broker`]: the token lifecycle — cache, single-flight refresh, rotation
//!   write-back by compare-and-swap, reauth state, revocation.
//! - [`upstream`]: the OAuth client (refresh, code exchange, client
//!   credentials, revocation) and the endpoint policy.
//! - [`crypto`]: the versioned keyring, its sealed file, the record envelope.
//! - [`store`]: the storage trait and its sled implementation.
//! - [`admin_client`]: the operator's VaultAdmin client behind
//!   `credvault admin …`.
//! - [`config`]: the TOML configuration with `CREDVAULT_*` overrides.
//! - [`dev`]: `credvault dev` — a throwaway CA, certificates, keyring and
//!   config for local use and tests.
//! - [`metrics`]: the Prometheus metrics served on the ops listener.
//! - [`secret`]: the redacting, zeroizing wrapper every secret travels in.
//! - [`telemetry`]: logging setup.

pub mod admin_client;
pub mod api;
pub mod audit;
pub mod auth;
pub mod broker;
pub mod config;
pub mod crypto;
pub mod dev;
pub mod metrics;
pub mod secret;
pub mod server;
pub mod store;
pub mod telemetry;
pub mod upstream;
