//! The gRPC surface: generated types, request validation, the services, and
//! the one table that maps domain errors to `tonic::Status`.
//!
//! This is the only module that knows tonic's request and status types; it
//! turns protos into validated domain commands and domain results back into
//! protos, and nothing else.
//!
//! - [`pb`]: the generated code, with redacting `Debug` for secrets.
//! - `call`: the frame every RPC runs in (authenticate, admit, run, record).
//! - `codec`: the servers' request decoding, with typed refusals.
//! - `convert`: proto -> domain validation.
//! - `status`: the error-to-wire table.
//! - `admission`: the global in-flight cap and the per-identity rate limit.
//! - `events`: admitting a watch, and the bounded pump of its stream.
//! - `vault`, `admin`: the two services.

mod admin;
pub(crate) mod admission;
mod call;
pub(crate) mod codec;
mod convert;
mod events;
pub mod pb;
pub(crate) mod status;
mod vault;

pub use admin::AdminService;
pub use admission::{AdmissionLayer, CallLimits, CallSlots, IdentityRateLimiter};
pub use call::{Calls, Gate};
pub use events::Watching;
pub use status::ApiError;
pub use vault::VaultService;

/// The `google.rpc.ErrorInfo` domain of every credvault error.
pub const ERROR_DOMAIN: &str = "credvault";
