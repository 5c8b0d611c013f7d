//! Generated protobuf and gRPC code for `credvault.v1`, and the redacting
//! `Debug` of every message that carries a secret.
//!
//! `build.rs` keeps prost from deriving `Debug` for those messages (its
//! `SECRET_BEARING` list); the impls below print every field but the secret
//! ones, so a `tracing::debug!(?request)` can never leak a token.

#![allow(clippy::all, clippy::pedantic, missing_docs)]

use std::fmt;

use crate::secret::REDACTED;

tonic::include_proto!("credvault.v1");
include!(concat!(env!("OUT_DIR"), "/clients/credvault.v1.rs"));

/// The encoded descriptor set of `proto/`, served by reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/credvault_descriptor.bin"));

/// `[redacted]` for a set secret, `""` for an empty one (so a missing
/// secret is still visible when debugging a request).
fn secret(value: &str) -> &'static str {
    if value.is_empty() {
        ""
    } else {
        REDACTED
    }
}

impl fmt::Debug for OAuthClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OAuthClient")
            .field("token_endpoint", &self.token_endpoint)
            .field("client_id", &self.client_id)
            .field("client_secret", &secret(&self.client_secret))
            .field("auth_method", &self.auth_method)
            .field("revocation_endpoint", &self.revocation_endpoint)
            .field("scopes", &self.scopes)
            .field("authorization_endpoint", &self.authorization_endpoint)
            .field(
                "device_authorization_endpoint",
                &self.device_authorization_endpoint,
            )
            .field("issuer", &self.issuer)
            .finish()
    }
}

impl fmt::Debug for RefreshTokenGrant {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RefreshTokenGrant")
            .field("refresh_token", &secret(&self.refresh_token))
            .field("access_token", &secret(&self.access_token))
            .field("access_token_expires_at", &self.access_token_expires_at)
            .finish()
    }
}

impl fmt::Debug for AuthorizationCodeGrant {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AuthorizationCodeGrant")
            .field("code", &secret(&self.code))
            .field("redirect_uri", &self.redirect_uri)
            .field("code_verifier", &secret(&self.code_verifier))
            .finish()
    }
}

impl fmt::Debug for GetAccessTokenResponse {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GetAccessTokenResponse")
            .field("access_token", &secret(&self.access_token))
            .field("token_type", &self.token_type)
            .field("expires_at", &self.expires_at)
            .field("scopes", &self.scopes)
            .finish()
    }
}

impl fmt::Debug for BeginAuthorizationResponse {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The URL carries the state too.
        f.debug_struct("BeginAuthorizationResponse")
            .field("authorization_url", &secret(&self.authorization_url))
            .field("state", &secret(&self.state))
            .field("expires_at", &self.expires_at)
            .finish()
    }
}

impl fmt::Debug for CompleteAuthorizationRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CompleteAuthorizationRequest")
            .field("state", &secret(&self.state))
            .field("code", &secret(&self.code))
            .field("error", &self.error)
            .field("iss", &self.iss)
            .finish()
    }
}

impl fmt::Debug for BeginDeviceAuthorizationResponse {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BeginDeviceAuthorizationResponse")
            .field("state", &secret(&self.state))
            .field("user_code", &self.user_code)
            .field("verification_uri", &self.verification_uri)
            .field("verification_uri_complete", &self.verification_uri_complete)
            .field("expires_at", &self.expires_at)
            .finish()
    }
}

impl fmt::Debug for GetAuthorizationRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GetAuthorizationRequest")
            .field("state", &secret(&self.state))
            .finish()
    }
}

impl fmt::Debug for Authorization {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Authorization")
            .field("state", &secret(&self.state))
            .field("status", &self.status)
            .field("credential", &self.credential)
            .field("generation", &self.generation)
            .field("error", &self.error)
            .field("expires_at", &self.expires_at)
            .finish()
    }
}
