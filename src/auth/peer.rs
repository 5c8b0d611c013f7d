//! Transport identity: what the accept loop learned about a connection, and
//! the gate every request on it passes to become an [`Identity`].
//!
//! The words, from the wire inwards: a [`Peer`] is a connection (mTLS, or
//! the mesh sidecar's); an [`Identity`] is the name it proves; a
//! [`Principal`](super::Principal) is that identity with its grants; a
//! [`Caller`](super::Caller) is a principal authorized for one tenant and
//! one action, the only proof of authorization the broker accepts.

use std::sync::Arc;

use subtle::ConstantTimeEq;

use super::{mesh, AuthError, Authenticator, GrantsMemo, Identity, TokenError};
use crate::secret::SecretString;

/// The connection a request came in on, attached by the transport. A TLS
/// peer whose certificate named no usable identity may connect, but every
/// call on it is refused.
#[derive(Clone, Debug)]
pub enum Peer {
    /// An mTLS connection and the identity of its certificate.
    Tls(Arc<TlsPeer>),
    /// A mesh-mode connection from the local sidecar: callers' identities come
    /// from `x-forwarded-client-cert` elements added for `vault_identity`,
    /// on requests that carry the sidecar's shared secret when one is set.
    Mesh {
        vault_identity: Arc<str>,
        sidecar_secret: Option<Arc<SecretString>>,
    },
}

/// An mTLS connection: one identity for every call on it, so what the
/// policy grants it is resolved on its first call and again only after the
/// policy is replaced (calls on a connection are the hot path; a policy
/// match walks every rule).
#[derive(Debug)]
pub struct TlsPeer {
    identity: Result<Identity, AuthError>,
    grants: GrantsMemo,
}

impl Peer {
    /// An mTLS connection whose certificate named `identity` (or did not).
    pub fn tls(identity: Result<Identity, AuthError>) -> Self {
        Peer::Tls(Arc::new(TlsPeer {
            identity,
            grants: GrantsMemo::default(),
        }))
    }

    /// The identity the connection itself proves: its certificate's, on
    /// mTLS. A mesh connection proves none; its callers are named per
    /// request, in headers only [`Authenticator::request_identity`] may
    /// believe.
    pub fn connection_identity(&self) -> Option<&Identity> {
        match self {
            Peer::Tls(tls) => tls.identity.as_ref().ok(),
            Peer::Mesh { .. } => None,
        }
    }
}

/// The header a mesh sidecar adds to prove it is the sidecar: anything else
/// that can reach the loopback listener (another container in the pod)
/// could otherwise forge `x-forwarded-client-cert`.
pub const SIDECAR_SECRET_HEADER: &str = "x-credvault-sidecar-secret";

/// The forwarded-identity headers of one request: absent, or present as
/// text (`Err` when a value is not text).
#[derive(Clone, Copy, Debug, Default)]
pub struct Forwarded<'a> {
    pub xfcc: Option<Result<&'a str, ()>>,
    pub sidecar_secret: Option<Result<&'a str, ()>>,
}

impl Authenticator {
    /// The identity behind one request: its connection's (with the
    /// connection's memo of its grants), or on a mesh connection the one
    /// the sidecar forwarded.
    pub fn request_identity<'p>(
        &self,
        peer: Option<&'p Peer>,
        forwarded: Forwarded<'_>,
    ) -> Result<(Identity, Option<&'p GrantsMemo>), AuthError> {
        match peer {
            // Only a sidecar in mesh mode may speak for a client; on the mTLS
            // port the header is an impersonation attempt.
            Some(Peer::Tls(_)) if forwarded.xfcc.is_some() => {
                Err(AuthError::ForwardedIdentityRefused)
            }
            Some(Peer::Tls(tls)) => Ok((tls.identity.clone()?, Some(&tls.grants))),
            Some(Peer::Mesh {
                vault_identity,
                sidecar_secret,
            }) => {
                if let Some(expected) = sidecar_secret {
                    let given = forwarded.sidecar_secret.and_then(Result::ok).unwrap_or("");
                    let matches: bool = given.as_bytes().ct_eq(expected.expose().as_bytes()).into();
                    if !matches {
                        return Err(mesh::MeshError::SidecarSecret.into());
                    }
                }
                let identity = mesh::identity_from_xfcc(
                    forwarded.xfcc.and_then(Result::ok),
                    vault_identity,
                    self.identity_rules(),
                )?;
                Ok((identity, None))
            }
            None => Err(AuthError::NoCertificate),
        }
    }
}

/// The bearer token of an `authorization` header value; a header that is
/// present but not `Bearer <token>` is refused, never ignored.
pub fn bearer(authorization: Option<Result<&str, ()>>) -> Result<Option<&str>, AuthError> {
    let Some(value) = authorization else {
        return Ok(None);
    };
    value
        .ok()
        .and_then(|v| {
            v.strip_prefix("Bearer ")
                .or_else(|| v.strip_prefix("bearer "))
        })
        .map(|token| Some(token.trim()))
        .ok_or(AuthError::Token(TokenError::Malformed))
}
