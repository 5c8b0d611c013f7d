//! Compiles `proto/` with the pure-Rust `protox` compiler, so building
//! credvault never needs a system `protoc`.

use std::{env, fs, path::PathBuf};

use prost::Message;

const PROTOS: &[&str] = &["credvault/v1/vault.proto", "credvault/v1/admin.proto"];

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

    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_fds(descriptors)?;
    Ok(())
}
