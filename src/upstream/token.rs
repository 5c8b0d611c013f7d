//! Tokens as a provider issues them: the access token the vault serves, and
//! the (possibly rotated) refresh token it keeps.

use std::time::{Duration, SystemTime};

use crate::secret::SecretString;

/// An access token and what we know of it.
#[derive(Clone, Debug)]
pub struct AccessToken {
    pub token: SecretString,
    pub token_type: String,
    pub expires_at: SystemTime,
    pub scopes: Vec<String>,
}

impl AccessToken {
    /// Whether the token stays valid for at least `margin` from `now`.
    pub fn valid_for(&self, margin: Duration, now: SystemTime) -> bool {
        self.expires_at
            .duration_since(now)
            .is_ok_and(|left| left >= margin)
    }
}

/// Tokens a provider issued.
#[derive(Debug)]
pub struct IssuedTokens {
    pub access_token: AccessToken,
    /// `None` when the provider did not rotate (or never issues one).
    pub refresh_token: Option<SecretString>,
}
