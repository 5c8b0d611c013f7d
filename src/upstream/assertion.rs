//! `private_key_jwt` client authentication (RFC 7523 §2.2, OpenID Connect
//! Core §9): instead of a shared secret, every request to the provider
//! carries a short-lived JWT signed with the client's private key.
//!
//! A fresh assertion is made for every request, with a unique `jti`, so a
//! provider that remembers `jti`s (as it should) never sees one twice.

use std::{
    fmt,
    time::{SystemTime, UNIX_EPOCH},
};

use jsonwebtoken::{Algorithm, EncodingKey, Header};
use rand::RngCore;
use serde::Serialize;
use url::Url;

/// How long an assertion is valid: long enough for one request.
const LIFETIME_SECS: u64 = 60;

pub const ASSERTION_TYPE: &str = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer";

/// The client's signing key. Its `Debug` shows the algorithm only.
pub struct AssertionKey {
    key: EncodingKey,
    algorithm: Algorithm,
    key_id: Option<String>,
}

impl fmt::Debug for AssertionKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AssertionKey")
            .field("algorithm", &self.algorithm)
            .field("key_id", &self.key_id)
            .finish_non_exhaustive()
    }
}

#[derive(Serialize)]
struct Claims<'a> {
    iss: &'a str,
    sub: &'a str,
    aud: &'a str,
    jti: String,
    iat: u64,
    exp: u64,
}

impl AssertionKey {
    /// A PEM private key (PKCS#8 EC P-256 for ES256, RSA for RS256).
    pub fn from_pem(pem: &[u8], algorithm: &str, key_id: Option<String>) -> Result<Self, String> {
        let (key, algorithm) = match algorithm {
            "ES256" => (EncodingKey::from_ec_pem(pem), Algorithm::ES256),
            "RS256" => (EncodingKey::from_rsa_pem(pem), Algorithm::RS256),
            other => {
                return Err(format!(
                    "unsupported signing algorithm `{other}` (ES256 or RS256)"
                ))
            }
        };
        let key = key.map_err(|_| "not a PEM private key for that algorithm".to_owned())?;
        Ok(Self {
            key,
            algorithm,
            key_id,
        })
    }

    /// A fresh assertion for a request to `audience` (the token endpoint).
    pub fn assertion(&self, client_id: &str, audience: &Url) -> Option<String> {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let mut jti = [0u8; 16];
        rand::rngs::OsRng.fill_bytes(&mut jti);
        let mut header = Header::new(self.algorithm);
        header.kid.clone_from(&self.key_id);
        let claims = Claims {
            iss: client_id,
            sub: client_id,
            aud: audience.as_str(),
            jti: hex::encode(jti),
            iat: now,
            exp: now + LIFETIME_SECS,
        };
        jsonwebtoken::encode(&header, &claims, &self.key).ok()
    }
}
