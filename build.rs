//! Compiles `proto/` with the pure-Rust `protox` compiler, so building
//! credvault never needs a system `protoc`.

use std::{env, fs, path::PathBuf};

use prost::Message;

const PROTOS: &[&str] = &["credvault/v1/vault.proto", "credvault/v1/admin.proto"];

const ETCD_PROTOS: &[&str] = &["etcd/kv.proto", "etcd/rpc.proto"];

/// Messages that carry a secret: their derived `Debug` would print it, so it
/// is not generated; `src/api/pb.rs` writes a redacting one by hand.
const SECRET_BEARING: &[&str] = &[
    ".credvault.v1.OAuthClient",
    ".credvault.v1.RefreshTokenGrant",
    ".credvault.v1.AuthorizationCodeGrant",
    ".credvault.v1.GetAccessTokenResponse",
    // `state` is a bearer handle: whoever holds it completes the consent.
    ".credvault.v1.BeginAuthorizationResponse",
    ".credvault.v1.CompleteAuthorizationRequest",
    ".credvault.v1.BeginDeviceAuthorizationResponse",
    ".credvault.v1.GetAuthorizationRequest",
    ".credvault.v1.Authorization",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // compile_fds emits no rerun-if-changed of its own.
    println!("cargo:rerun-if-changed=proto");

    let descriptors = protox::compile(PROTOS, ["proto"])?;

    // The encoded set backs gRPC reflection, so grpcurl needs no proto files.
    let out_dir = PathBuf::from(env::var("OUT_DIR")?);
    fs::write(
        out_dir.join("credvault_descriptor.bin"),
        descriptors.encode_to_vec(),
    )?;

    // The messages and the servers. The servers decode requests with the
    // vault's codec, which refuses an undecodable request from the error
    // table (`src/api/codec.rs`).
    tonic_prost_build::configure()
        .skip_debug(SECRET_BEARING)
        .build_client(false)
        .build_server(true)
        .codec_path("crate::api::codec::RequestCodec")
        .compile_fds(descriptors.clone())?;

    // The clients, with prost's own codec: an answer a client cannot decode
    // is the server's fault, INTERNAL. Same package, so their own directory;
    // the messages are the ones generated above.
    let clients = out_dir.join("clients");
    fs::create_dir_all(&clients)?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(false)
        .extern_path(".credvault.v1", "crate::api::pb")
        .out_dir(&clients)
        .compile_fds(descriptors)?;

    // The etcd v3 API subset the replicated store speaks: a client only,
    // never served and never in the reflection set.
    let etcd = protox::compile(ETCD_PROTOS, ["proto"])?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(false)
        .compile_fds(etcd)?;
    Ok(())
}
