//! Tenant claims from a signed JWT in `authorization: Bearer …`, verified
//! offline against a JWKS file.
//!
//! The certificate says which workload is calling; the JWT says for which
//! tenants this particular call may act (e.g. the end user's organisation).
//! A call may act for a tenant only if both agree. Algorithms are pinned by
//! configuration (`none` can never be configured), `iss`, `aud` and `exp` are
//! required, `nbf` is honoured, all with a small leeway.

use std::{collections::BTreeSet, path::Path, time::Duration};

use jsonwebtoken::{
    decode, decode_header,
    jwk::{JwkSet, KeyAlgorithm},
    Algorithm, DecodingKey, Validation,
};

use super::Tenants;

/// Why a token was not accepted. Never echoes the token.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("bearer token is malformed")]
    Malformed,
    #[error("bearer token algorithm is not allowed")]
    AlgorithmNotAllowed,
    #[error("bearer token key is not in the JWKS")]
    UnknownKey,
    #[error("bearer token is invalid: {0}")]
    Invalid(&'static str),
    #[error("bearer token carries no `{0}` claim of tenants")]
    NoTenantClaim(String),
}

/// Why the JWT configuration cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum JwtConfigError {
    #[error("{path}: {message}")]
    Jwks { path: String, message: String },
    #[error("auth.jwt.algorithms: {0}")]
    Algorithm(String),
}

/// What to accept.
#[derive(Clone, Debug)]
pub struct JwtSettings {
    pub issuer: String,
    pub audience: String,
    pub tenant_claim: String,
    pub algorithms: Vec<String>,
    pub leeway: Duration,
}

/// Verifies bearer tokens.
pub struct JwtVerifier {
    keys: Vec<(Option<String>, DecodingKey, Option<Algorithm>)>,
    algorithms: Vec<Algorithm>,
    settings: JwtSettings,
}

fn parse_algorithm(name: &str) -> Result<Algorithm, JwtConfigError> {
    // HMAC algorithms need a shared secret, which a JWKS file of public keys
    // must not hold; `none` does not exist here at all.
    match name {
        "RS256" => Ok(Algorithm::RS256),
        "RS384" => Ok(Algorithm::RS384),
        "RS512" => Ok(Algorithm::RS512),
        "PS256" => Ok(Algorithm::PS256),
        "PS384" => Ok(Algorithm::PS384),
        "PS512" => Ok(Algorithm::PS512),
        "ES256" => Ok(Algorithm::ES256),
        "ES384" => Ok(Algorithm::ES384),
        "EdDSA" => Ok(Algorithm::EdDSA),
        other => Err(JwtConfigError::Algorithm(format!(
            "`{other}` is not an allowed asymmetric algorithm"
        ))),
    }
}

fn key_algorithm(alg: KeyAlgorithm) -> Option<Algorithm> {
    Some(match alg {
        KeyAlgorithm::RS256 => Algorithm::RS256,
        KeyAlgorithm::RS384 => Algorithm::RS384,
        KeyAlgorithm::RS512 => Algorithm::RS512,
        KeyAlgorithm::PS256 => Algorithm::PS256,
        KeyAlgorithm::PS384 => Algorithm::PS384,
        KeyAlgorithm::PS512 => Algorithm::PS512,
        KeyAlgorithm::ES256 => Algorithm::ES256,
        KeyAlgorithm::ES384 => Algorithm::ES384,
        KeyAlgorithm::EdDSA => Algorithm::EdDSA,
        _ => return None,
    })
}

impl JwtVerifier {
    pub fn load(jwks_file: &Path, settings: JwtSettings) -> Result<Self, JwtConfigError> {
        let jwks_error = |message: String| JwtConfigError::Jwks {
            path: jwks_file.display().to_string(),
            message,
        };
        let text = std::fs::read_to_string(jwks_file).map_err(|e| jwks_error(e.to_string()))?;
        let set: JwkSet =
            serde_json::from_str(&text).map_err(|_| jwks_error("not a JWKS document".into()))?;
        let mut keys = Vec::new();
        for jwk in &set.keys {
            let key = DecodingKey::from_jwk(jwk)
                .map_err(|_| jwks_error("a key cannot be used for verification".into()))?;
            let alg = jwk.common.key_algorithm.and_then(key_algorithm);
            keys.push((jwk.common.key_id.clone(), key, alg));
        }
        if keys.is_empty() {
            return Err(jwks_error("holds no keys".into()));
        }
        let algorithms = settings
            .algorithms
            .iter()
            .map(|a| parse_algorithm(a))
            .collect::<Result<Vec<_>, _>>()?;
        if algorithms.is_empty() {
            return Err(JwtConfigError::Algorithm("at least one is required".into()));
        }
        Ok(Self {
            keys,
            algorithms,
            settings,
        })
    }

    /// Verifies `token` and returns the tenants it grants.
    pub fn verify(&self, token: &str) -> Result<Tenants, TokenError> {
        let header = decode_header(token).map_err(|_| TokenError::Malformed)?;
        if !self.algorithms.contains(&header.alg) {
            return Err(TokenError::AlgorithmNotAllowed);
        }
        let key = self
            .keys
            .iter()
            .find(|(kid, _, alg)| {
                (header.kid.is_none() || header.kid == *kid) && alg.is_none_or(|a| a == header.alg)
            })
            .ok_or(TokenError::UnknownKey)?;
        let mut validation = Validation::new(header.alg);
        validation.set_issuer(&[&self.settings.issuer]);
        validation.set_audience(&[&self.settings.audience]);
        validation.set_required_spec_claims(&["exp", "iss", "aud"]);
        validation.validate_nbf = true;
        validation.leeway = self.settings.leeway.as_secs();
        let data = decode::<serde_json::Value>(token, &key.1, &validation).map_err(|e| {
            use jsonwebtoken::errors::ErrorKind;
            TokenError::Invalid(match e.kind() {
                ErrorKind::ExpiredSignature => "expired",
                ErrorKind::ImmatureSignature => "not yet valid",
                ErrorKind::InvalidSignature => "bad signature",
                ErrorKind::InvalidIssuer => "wrong issuer",
                ErrorKind::InvalidAudience => "wrong audience",
                ErrorKind::MissingRequiredClaim(_) => "missing a required claim",
                _ => "rejected",
            })
        })?;
        let claim = data.claims.get(&self.settings.tenant_claim);
        let tenants: BTreeSet<String> = match claim {
            Some(serde_json::Value::String(t)) => [t.clone()].into(),
            Some(serde_json::Value::Array(items)) => items
                .iter()
                .filter_map(|v| v.as_str().map(str::to_owned))
                .collect(),
            _ => {
                return Err(TokenError::NoTenantClaim(
                    self.settings.tenant_claim.clone(),
                ))
            }
        };
        Ok(if tenants.is_empty() {
            Tenants::None
        } else {
            Tenants::Some(tenants)
        })
    }
}
