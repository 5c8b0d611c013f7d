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
    #[error("x-forwarded-client-cert element has more than one By or URI")]
    Ambiguous,
    #[error("the mesh sidecar's shared secret is missing or wrong")]
    SidecarSecret,
}

/// Headers larger than this are refused unread.
const MAX_HEADER: usize = 16 * 1024;

/// One XFCC element: its `key=value` pairs, keys lowercased, values
/// unquoted and unescaped.
type Element = Vec<(String, String)>;

/// Parses an XFCC header by Envoy's grammar: elements separated by `,`,
/// pairs by `;`, each `key=value`; a value may be double-quoted, and inside
/// quotes `\"` and `\\` are escapes and `,;=` are plain characters.
fn parse(header: &str) -> Result<Vec<Element>, MeshError> {
    let mut elements = Vec::new();
    let mut element = Element::new();
    let (mut key, mut value) = (String::new(), String::new());
    let (mut in_value, mut quoted, mut escaped) = (false, false, false);
    let close = |element: &mut Element, key: &mut String, value: &mut String| {
        if key.trim().is_empty() {
            return Err(MeshError::Malformed);
        }
        element.push((key.trim().to_ascii_lowercase(), std::mem::take(value)));
        key.clear();
        Ok(())
    };
    for ch in header.chars() {
        match (in_value, quoted, escaped, ch) {
            (true, true, true, _) => {
                value.push(ch);
                escaped = false;
            }
            (true, true, false, '\\') => escaped = true,
            (true, true, false, '"') => quoted = false,
            (true, true, false, _) => value.push(ch),
            (true, false, _, '"') if value.is_empty() => quoted = true,
            (true, false, _, ';') => {
                close(&mut element, &mut key, &mut value)?;
                in_value = false;
            }
            (true, false, _, ',') => {
                close(&mut element, &mut key, &mut value)?;
                elements.push(std::mem::take(&mut element));
                in_value = false;
            }
            (true, false, _, '"') => return Err(MeshError::Malformed),
            (true, false, _, _) => value.push(ch),
            (false, _, _, '=') => in_value = true,
            (false, _, _, ';' | ',' | '"') => return Err(MeshError::Malformed),
            (false, _, _, _) => key.push(ch),
        }
    }
    if quoted || !in_value {
        return Err(MeshError::Malformed);
    }
    close(&mut element, &mut key, &mut value)?;
    elements.push(element);
    Ok(elements)
}

/// The caller's identity from the XFCC header, if the element closest to
/// the vault was added for `vault_identity`. An element with more than one
/// `By` or `URI` is refused: picking one would let a certificate (or a value
/// smuggled into another field) choose who it is.
pub fn identity_from_xfcc(
    header: Option<&str>,
    vault_identity: &str,
    rules: &IdentityRules,
) -> Result<Identity, MeshError> {
    let header = header.ok_or(MeshError::Missing)?;
    if header.len() > MAX_HEADER {
        return Err(MeshError::Malformed);
    }
    let element = parse(header)?.pop().ok_or(MeshError::Malformed)?;
    let values = |name: &str| -> Vec<&str> {
        element
            .iter()
            .filter(|(key, _)| key == name)
            .map(|(_, value)| value.as_str())
            .collect()
    };
    let (by, uri) = (values("by"), values("uri"));
    if by.len() > 1 || uri.len() > 1 {
        return Err(MeshError::Ambiguous);
    }
    if by.first() != Some(&vault_identity) {
        return Err(MeshError::WrongBy);
    }
    let uri = uri
        .first()
        .ok_or_else(|| MeshError::BadIdentity("no URI".into()))?;
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
            // Two URIs in the element closest to the vault: refused, not
            // "the last one wins".
            (
                Some(format!(
                    "By={VAULT};URI=spiffe://td/app;URI=spiffe://td/admin"
                )),
                MeshError::Ambiguous,
            ),
            (
                Some(format!("By={VAULT};By={VAULT};URI=spiffe://td/app")),
                MeshError::Ambiguous,
            ),
            // A DNS SAN smuggling `;URI=` unquoted adds a second URI.
            (
                Some(format!(
                    "By={VAULT};URI=spiffe://td/app;DNS=x;URI=spiffe://td/admin"
                )),
                MeshError::Ambiguous,
            ),
            (
                Some(format!("By={VAULT};URI=\"unterminated")),
                MeshError::Malformed,
            ),
        ] {
            assert_eq!(
                identity_from_xfcc(header.as_deref(), VAULT, &rules()).unwrap_err(),
                expected
            );
        }
        // Quoted per Envoy, the smuggled text is part of the DNS value.
        let quoted = format!("By={VAULT};DNS=\"x;URI=spiffe://td/admin\";URI=spiffe://td/app");
        assert_eq!(
            identity_from_xfcc(Some(&quoted), VAULT, &rules())
                .unwrap()
                .to_string(),
            "spiffe://td/app"
        );
        let escaped =
            format!("By={VAULT};Subject=\"CN=a\\\",URI=spiffe://td/admin\";URI=spiffe://td/app");
        assert_eq!(
            identity_from_xfcc(Some(&escaped), VAULT, &rules())
                .unwrap()
                .to_string(),
            "spiffe://td/app"
        );
        let foreign = format!("By={VAULT};URI=spiffe://elsewhere/app");
        assert!(matches!(
            identity_from_xfcc(Some(&foreign), VAULT, &rules()),
            Err(MeshError::BadIdentity(_))
        ));
    }
}
