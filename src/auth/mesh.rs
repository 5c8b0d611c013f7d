//! Mesh mode: a sidecar (Envoy, Istio, Linkerd) terminated mTLS and forwards
//! the client's identity in `x-forwarded-client-cert` (XFCC).
//!
//! Trust assumptions, all required:
//! - mesh mode is explicitly enabled, and its plaintext listener is reachable
//!   only by the local sidecar (bind it to loopback);
//! - the sidecar overwrites (never appends to) an XFCC header a client sent,
//!   so the element it adds is the last one;
//! - that element's `By=` is the vault's own identity, as the sidecar saw it.
//!
//! On the mTLS port an XFCC header is always refused: there it can only be an
//! impersonation attempt.

use super::identity::{Identity, IdentityRules, SpiffeId};

/// Why a forwarded identity was not accepted.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum MeshError {
    #[error("x-forwarded-client-cert is missing")]
    Missing,
    #[error("x-forwarded-client-cert is malformed")]
    Malformed,
    #[error("x-forwarded-client-cert was not added for this vault (By= mismatch)")]
    WrongBy,
    #[error("x-forwarded-client-cert names no usable identity: {0}")]
    BadIdentity(String),
}

/// Splits on `sep` outside double quotes.
fn split_unquoted(s: &str, sep: char) -> Vec<&str> {
    let mut parts = Vec::new();
    let (mut start, mut quoted) = (0, false);
    for (i, c) in s.char_indices() {
        match c {
            '"' => quoted = !quoted,
            c if c == sep && !quoted => {
                parts.push(&s[start..i]);
                start = i + c.len_utf8();
            }
            _ => {}
        }
    }
    parts.push(&s[start..]);
    parts
}

/// The caller's identity from the XFCC header, if the element closest to
/// the vault was added for `vault_identity`.
pub fn identity_from_xfcc(
    header: Option<&str>,
    vault_identity: &str,
    rules: &IdentityRules,
) -> Result<Identity, MeshError> {
    let header = header.ok_or(MeshError::Missing)?;
    if header.len() > 16 * 1024 {
        return Err(MeshError::Malformed);
    }
    let element = split_unquoted(header, ',')
        .into_iter()
        .next_back()
        .ok_or(MeshError::Malformed)?;
    let (mut by, mut uri) = (None, None);
    for pair in split_unquoted(element, ';') {
        let (key, value) = pair.trim().split_once('=').ok_or(MeshError::Malformed)?;
        let value = value.trim_matches('"');
        match key.to_ascii_lowercase().as_str() {
            "by" => by = Some(value),
            "uri" => uri = Some(value),
            _ => {}
        }
    }
    if by != Some(vault_identity) {
        return Err(MeshError::WrongBy);
    }
    let uri = uri.ok_or_else(|| MeshError::BadIdentity("no URI".into()))?;
    let spiffe = SpiffeId::parse(uri).map_err(|e| MeshError::BadIdentity(e.to_string()))?;
    if let Some(pinned) = &rules.trust_domain {
        if spiffe.trust_domain() != pinned {
            return Err(MeshError::BadIdentity("trust domain mismatch".into()));
        }
    }
    if spiffe.path().is_empty() {
        return Err(MeshError::BadIdentity(
            "names a trust domain, not a workload".into(),
        ));
    }
    Ok(Identity::Spiffe(spiffe))
}

#[cfg(test)]
mod tests {
    use super::*;

    const VAULT: &str = "spiffe://td/credvault";

    fn rules() -> IdentityRules {
        IdentityRules {
            trust_domain: Some("td".into()),
            allow_common_name: false,
        }
    }

    #[test]
    fn the_last_element_added_for_the_vault_wins() {
        let header = format!(
            "By=spiffe://td/gateway;URI=spiffe://td/evil,By={VAULT};Hash=ab;Subject=\"CN=x,O=y\";URI=spiffe://td/app"
        );
        let identity = identity_from_xfcc(Some(&header), VAULT, &rules()).unwrap();
        assert_eq!(identity.to_string(), "spiffe://td/app");
    }

    #[test]
    fn forgeries_are_refused() {
        for (header, expected) in [
            (None, MeshError::Missing),
            (
                Some("By=spiffe://td/other;URI=spiffe://td/app".to_owned()),
                MeshError::WrongBy,
            ),
            (
                Some(format!(
                    "By={VAULT};URI=spiffe://td/app,URI=spiffe://td/admin"
                )),
                MeshError::WrongBy,
            ),
            (Some("garbage".to_owned()), MeshError::Malformed),
        ] {
            assert_eq!(
                identity_from_xfcc(header.as_deref(), VAULT, &rules()).unwrap_err(),
                expected
            );
        }
        let foreign = format!("By={VAULT};URI=spiffe://elsewhere/app");
        assert!(matches!(
            identity_from_xfcc(Some(&foreign), VAULT, &rules()),
            Err(MeshError::BadIdentity(_))
        ));
    }
}
