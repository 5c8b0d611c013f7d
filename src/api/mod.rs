//! The gRPC surface: generated types, request validation, the services, and
//! the one table that maps domain errors to `tonic::Status`.
//!
//! This is the only module that knows tonic's request and status types; it
//! turns protos into validated domain commands and domain results back into
//! protos, and nothing else.

pub mod admin;
pub mod admission;
pub mod convert;
pub mod status;
pub mod vault;

/// Generated protobuf and gRPC code for `credvault.v1`.
#[allow(clippy::all, clippy::pedantic, missing_docs)]
pub mod pb {
    tonic::include_proto!("credvault.v1");

    /// The encoded descriptor set of `proto/`, served by reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        include_bytes!(concat!(env!("OUT_DIR"), "/credvault_descriptor.bin"));
}

pub use admin::AdminService;
pub use status::ApiError;
pub use vault::VaultService;

/// The `google.rpc.ErrorInfo` domain of every credvault error.
pub const ERROR_DOMAIN: &str = "credvault";
