//! The etcd v3 gRPC client: code generated from the API subset in
//! `proto/etcd/`, the connection to every member, and the mapping of
//! transport failures to [`StoreError`].

#![allow(clippy::all, clippy::pedantic, missing_docs, dead_code)]

use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};

use super::{members::Members, EtcdSettings};
use crate::store::StoreError;

/// etcd's `mvccpb` package (keys and events).
pub mod mvccpb {
    tonic::include_proto!("mvccpb");
}

/// etcd's `etcdserverpb` package (KV and Watch); its generated code refers
/// to `super::mvccpb`.
pub mod etcdserverpb {
    tonic::include_proto!("etcdserverpb");
}

pub use etcdserverpb::*;

/// One lazily connected channel per endpoint, taken in turn, with a member
/// that fails left out for a while ([`Members`]).
pub fn members(settings: &EtcdSettings) -> Result<Members, StoreError> {
    let tls = tls(settings)?;
    let mut endpoints = Vec::with_capacity(settings.endpoints.len());
    for url in &settings.endpoints {
        let mut endpoint = Endpoint::from_shared(url.clone())
            .map_err(|e| StoreError::Io(format!("etcd endpoint {url}: {e}")))?
            .connect_timeout(settings.dial_timeout)
            .timeout(settings.request_timeout)
            .tcp_nodelay(true)
            .http2_keep_alive_interval(std::time::Duration::from_secs(10))
            .keep_alive_timeout(std::time::Duration::from_secs(5));
        if let Some(tls) = &tls {
            endpoint = endpoint
                .tls_config(tls.clone())
                .map_err(|e| StoreError::Io(format!("etcd tls: {e}")))?;
        }
        endpoints.push(endpoint.connect_lazy());
    }
    Members::new(endpoints, settings.request_timeout)
        .ok_or_else(|| StoreError::Io("storage.etcd.endpoints is empty".into()))
}

fn tls(settings: &EtcdSettings) -> Result<Option<ClientTlsConfig>, StoreError> {
    let read = |path: &std::path::Path| {
        std::fs::read(path).map_err(|e| StoreError::Io(format!("{}: {e}", path.display())))
    };
    let mut config = None;
    if let Some(ca) = &settings.ca {
        config = Some(ClientTlsConfig::new().ca_certificate(Certificate::from_pem(read(ca)?)));
    }
    if let (Some(cert), Some(key)) = (&settings.cert, &settings.key) {
        let key = zeroize::Zeroizing::new(read(key)?);
        config = Some(
            config
                .unwrap_or_default()
                .identity(Identity::from_pem(read(cert)?, key.as_slice())),
        );
    }
    Ok(config)
}

/// A name for this process among the replicas: host, pid and a random
/// suffix, so a restarted replica is a new one.
pub fn replica_id() -> String {
    use rand::RngCore;
    let host = std::env::var("HOSTNAME").unwrap_or_else(|_| "replica".into());
    let mut suffix = [0u8; 4];
    rand::rngs::OsRng.fill_bytes(&mut suffix);
    format!("{host}-{}-{}", std::process::id(), hex::encode(suffix))
}

/// A failed etcd call, kept whole until the caller decides whether to retry.
pub struct Failed(tonic::Status);

impl From<tonic::Status> for Failed {
    fn from(status: tonic::Status) -> Self {
        Failed(status)
    }
}

impl Failed {
    /// Whether the call may have been applied anyway (lost reply, no
    /// leader): a compare-and-swap then retries and reads back.
    pub fn outcome_unknown(&self) -> bool {
        use tonic::Code;
        matches!(
            self.0.code(),
            Code::Unavailable | Code::DeadlineExceeded | Code::Cancelled | Code::Unknown
        )
    }
}

impl From<Failed> for StoreError {
    fn from(failed: Failed) -> Self {
        status_error(failed.0)
    }
}

/// A failed call as a storage error; the message names the condition, never
/// a key or a value.
pub fn status_error(status: tonic::Status) -> StoreError {
    StoreError::Io(format!(
        "etcd: {} ({})",
        status.code().description(),
        status.message().chars().take(120).collect::<String>()
    ))
}
