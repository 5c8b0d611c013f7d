//! Transport identity: what the accept loop learned about a connection, and
//! the gate every request on it passes to become an [`Identity`].
//!
//! The words, from the wire inwards: a [`Peer`] is a connection (mTLS, or
//! the mesh sidecar's); an [`Identity`] is the name it proves; a
//! [`Principal`](super::Principal) is that identity with its grants; a
//! [`Caller`](super::Caller) is a principal authorized for one tenant and
//! one action, the only proof of authorization the broker accepts.

use std::sync::Arc;

use super::{mesh, AuthError, Authenticator, Identity, TokenError};

/// The connection a request came in on, attached by the transport. A TLS
/// peer whose certificate named no usable identity may connect, but every
/// call on it is refused.
#[derive(Clone, Debug)]
pub enum Peer {
    /// An mTLS connection and the identity of its certificate.
    Tls(Result<Identity, AuthError>),
    /// A mesh-mode connection from the local sidecar: callers' identities come
    /// from `x-forwarded-client-cert` elements added for `vault_identity`.
    Mesh { vault_identity: Arc<str> },
}

impl Authenticator {
    /// The identity behind one request: its connection's, or on a mesh
    /// connection the one the sidecar forwarded. `forwarded` is the
    /// request's `x-forwarded-client-cert` header: absent, or present as
    /// text (`Err` when it is not).
    pub fn request_identity(
        &self,
        peer: Option<&Peer>,
        forwarded: Option<Result<&str, ()>>,
    ) -> Result<Identity, AuthError> {
        match peer {
            // Only a sidecar in mesh mode may speak for a client; on the mTLS
            // port the header is an impersonation attempt.
            Some(Peer::Tls(_)) if forwarded.is_some() => Err(AuthError::ForwardedIdentityRefused),
            Some(Peer::Tls(identity)) => identity.clone(),
            Some(Peer::Mesh { vault_identity }) => Ok(mesh::identity_from_xfcc(
                forwarded.and_then(Result::ok),
                vault_identity,
                self.identity_rules(),
            )?),
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
