//! Who is calling, derived from the peer's (already chain-verified) leaf certificate.
//!
//! Owns: the [`Identity`] type, SPIFFE ID parsing ([`SpiffeId`]) and the rules
//! that turn a client certificate into exactly one identity:
//!
//! 1. exactly one URI SAN that is a valid SPIFFE ID -> [`Identity::Spiffe`]
//!    (its trust domain must equal the pinned one, if pinned);
//! 2. more than one URI SAN -> refused (the X509-SVID spec allows exactly one,
//!    and picking one would let a CA-signed cert choose who it is);
//! 3. no URI SAN -> the subject CN, only if the rules allow it;
//! 4. anything else -> refused.
//!
//! This module does not verify the chain, validity or EKU: rustls has done that
//! before the certificate gets here. It only decides *which* name to trust.
//! Identities are not secrets; they appear in logs and policy files, so the
//! values accepted here are restricted to printable characters.

use std::{fmt, sync::Arc};

use x509_parser::certificate::X509Certificate;
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::FromDer;

/// Maximum length of a SPIFFE ID in bytes, per the SPIFFE spec.
const MAX_SPIFFE_ID_LEN: usize = 2048;
/// Cap on an accepted subject CN. RFC 5280's upper bound is 64 characters;
/// we allow some slack for non-conforming issuers but refuse absurd values
/// that would bloat every log line.
const MAX_COMMON_NAME_LEN: usize = 256;
/// How much of a rejected value we echo in an error message.
const MAX_ECHO_LEN: usize = 128;
const SPIFFE_PREFIX: &str = "spiffe://";

/// Why a peer certificate does not yield an identity. Messages are safe to log
/// and to return to the caller (they contain no secrets; echoed values are
/// escaped and truncated).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdentityError {
    /// The bytes are not a well-formed X.509 certificate.
    #[error("bad client certificate: {0}")]
    BadCertificate(String),
    /// Neither a URI SAN nor (when allowed) a subject CN.
    #[error("client certificate carries no identity")]
    NoIdentity,
    /// More than one URI SAN: ambiguous, refused.
    #[error("client certificate has {0} uri sans; exactly one is allowed")]
    MultipleUriSans(usize),
    /// The URI SAN is not a `spiffe://` URI.
    #[error("uri san is not a spiffe id: {0}")]
    NotSpiffe(String),
    /// The URI SAN (or a given string) looks like a SPIFFE ID but breaks the spec.
    #[error("invalid spiffe id: {0}")]
    InvalidSpiffeId(&'static str),
    /// The SPIFFE ID belongs to another trust domain than the pinned one.
    #[error("spiffe trust domain mismatch: expected {expected:?}, found {found:?}")]
    TrustDomainMismatch {
        /// The pinned trust domain.
        expected: String,
        /// The one in the certificate.
        found: String,
    },
    /// No URI SAN, and CN identities are disabled.
    #[error("client certificate has no spiffe id and common-name identities are not allowed")]
    CommonNameNotAllowed,
    /// More than one CN in the subject: ambiguous, refused.
    #[error("client certificate subject has more than one common name")]
    MultipleCommonNames,
    /// The CN is empty, not UTF-8, too long or contains control characters.
    #[error("invalid common name: {0}")]
    InvalidCommonName(&'static str),
}

/// A SPIFFE ID, e.g. `spiffe://credvault.dev/ns/prod/sa/worker`.
///
/// Always valid by construction (see [`SpiffeId::parse`]). Kept as its one
/// string, shared: an identity is cloned into every call on a connection
/// and printed in every audit line, so a clone is a reference count and
/// printing is one copy.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SpiffeId {
    /// `spiffe://td` then the path: empty, or `/seg(/seg)*`.
    uri: Arc<str>,
    /// Where the trust domain ends (and the path begins) in `uri`.
    path_at: usize,
}

impl SpiffeId {
    /// Parse and validate a SPIFFE ID per the SPIFFE-ID spec (§2):
    /// scheme exactly `spiffe`, a trust domain of `[a-z0-9.-_]` (so no
    /// uppercase, port, userinfo or percent-encoding), a path whose segments
    /// are non-empty, not `.`/`..`, of `[A-Za-z0-9.-_]`; no query or fragment;
    /// at most 2048 bytes. A trust-domain-only ID (empty path) is valid here;
    /// [`identity_from_certificate`] refuses it as a workload identity.
    pub fn parse(s: &str) -> Result<SpiffeId, IdentityError> {
        let invalid = IdentityError::InvalidSpiffeId;
        if s.is_empty() {
            return Err(invalid("empty"));
        }
        if s.len() > MAX_SPIFFE_ID_LEN {
            return Err(invalid("longer than 2048 bytes"));
        }
        let rest = s
            .strip_prefix(SPIFFE_PREFIX)
            .ok_or(invalid("scheme must be \"spiffe://\""))?;
        if rest.contains('?') {
            return Err(invalid("query is not allowed"));
        }
        if rest.contains('#') {
            return Err(invalid("fragment is not allowed"));
        }

        let (td, path) = match rest.find('/') {
            Some(i) => rest.split_at(i),
            None => (rest, ""),
        };
        validate_trust_domain(td)?;

        if !path.is_empty() {
            // `path` starts with '/'; skip it and check each segment.
            for segment in path[1..].split('/') {
                match segment {
                    "" => return Err(invalid("path segments must not be empty")),
                    "." | ".." => return Err(invalid("path segments must not be . or ..")),
                    _ => {}
                }
                if !segment.bytes().all(is_path_char) {
                    return Err(invalid(
                        "path may only contain letters, digits, '.', '-' and '_'",
                    ));
                }
            }
        }

        Ok(SpiffeId {
            uri: format!("{SPIFFE_PREFIX}{td}{path}").into(),
            path_at: SPIFFE_PREFIX.len() + td.len(),
        })
    }

    /// The trust domain, e.g. `credvault.dev`.
    pub fn trust_domain(&self) -> &str {
        &self.uri[SPIFFE_PREFIX.len()..self.path_at]
    }

    /// The path including its leading `/`, or `""` for a trust-domain ID.
    pub fn path(&self) -> &str {
        &self.uri[self.path_at..]
    }

    /// The whole ID, `spiffe://td/path`.
    pub fn as_str(&self) -> &str {
        &self.uri
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.uri)
    }
}

impl std::str::FromStr for SpiffeId {
    type Err = IdentityError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        SpiffeId::parse(s)
    }
}

/// Check a bare trust domain name (e.g. a configured pin) against the SPIFFE
/// rules: non-empty, `[a-z0-9.-_]` only. Use it when loading configuration so
/// a pin such as `Credvault.Dev` fails at start-up instead of never matching.
pub fn validate_trust_domain(td: &str) -> Result<(), IdentityError> {
    if td.is_empty() {
        return Err(IdentityError::InvalidSpiffeId("trust domain is empty"));
    }
    if td.contains(':') {
        return Err(IdentityError::InvalidSpiffeId(
            "trust domain must not contain a port",
        ));
    }
    if td.contains('@') {
        return Err(IdentityError::InvalidSpiffeId(
            "trust domain must not contain userinfo",
        ));
    }
    if !td.bytes().all(is_trust_domain_char) {
        return Err(IdentityError::InvalidSpiffeId(
            "trust domain may only contain lowercase letters, digits, '.', '-' and '_'",
        ));
    }
    Ok(())
}

fn is_trust_domain_char(b: u8) -> bool {
    b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'-' | b'_')
}

fn is_path_char(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_')
}

/// The authenticated caller's name.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Identity {
    /// From the certificate's single SPIFFE URI SAN.
    Spiffe(SpiffeId),
    /// From the subject CN (only when allowed by [`IdentityRules`]).
    CommonName(Arc<str>),
}

impl fmt::Display for Identity {
    /// `spiffe://td/path` or `cn:NAME` — the form used in logs and policy files.
    /// The `cn:` prefix keeps a CN from ever impersonating a SPIFFE ID.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Identity::Spiffe(id) => id.fmt(f),
            Identity::CommonName(cn) => write!(f, "cn:{cn}"),
        }
    }
}

/// How certificate identities are accepted.
///
/// `Default` is the strict setting: any trust domain, no CN fallback.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct IdentityRules {
    /// Pin: only SPIFFE IDs of this trust domain (exact, lowercase) are
    /// accepted. `None` accepts any trust domain the client CA signed.
    pub trust_domain: Option<String>,
    /// Accept the subject CN when the certificate has no URI SAN.
    pub allow_common_name: bool,
}

/// Derive the caller's identity from its leaf certificate (DER).
///
/// Never panics: arbitrary bytes yield [`IdentityError::BadCertificate`].
pub fn identity_from_certificate(
    leaf_der: &[u8],
    rules: &IdentityRules,
) -> Result<Identity, IdentityError> {
    let (rest, cert) = X509Certificate::from_der(leaf_der)
        .map_err(|e| IdentityError::BadCertificate(e.to_string()))?;
    if !rest.is_empty() {
        // rustls hands us exactly one DER certificate; trailing bytes mean
        // the input is not what we think it is.
        return Err(IdentityError::BadCertificate(
            "trailing bytes after certificate".into(),
        ));
    }

    let uris = uri_sans(&cert)?;
    match uris.as_slice() {
        [] => common_name_identity(&cert, rules),
        [uri] => spiffe_identity(uri, rules),
        more => Err(IdentityError::MultipleUriSans(more.len())),
    }
}

/// All URI SANs. A duplicated SAN extension is a malformed certificate
/// (RFC 5280 §4.2) and x509-parser reports it as an error, which we keep.
fn uri_sans<'a>(cert: &'a X509Certificate<'_>) -> Result<Vec<&'a str>, IdentityError> {
    let san = cert
        .subject_alternative_name()
        .map_err(|e| IdentityError::BadCertificate(format!("subject alternative name: {e}")))?;
    Ok(san
        .map(|ext| {
            ext.value
                .general_names
                .iter()
                .filter_map(|name| match name {
                    GeneralName::URI(uri) => Some(*uri),
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default())
}

fn spiffe_identity(uri: &str, rules: &IdentityRules) -> Result<Identity, IdentityError> {
    // Classify by scheme first so "https://..." says "not spiffe" rather than
    // a confusing parse error, while "spiffe:/x" or "SPIFFE://x" (which the
    // spec forbids) are reported as invalid SPIFFE IDs.
    let looks_spiffe = uri
        .get(..SPIFFE_PREFIX.len() - 2)
        .is_some_and(|scheme| scheme.eq_ignore_ascii_case("spiffe:"));
    if !looks_spiffe {
        return Err(IdentityError::NotSpiffe(echo(uri)));
    }
    let id = SpiffeId::parse(uri)?;
    if id.path().is_empty() {
        // `spiffe://td` names the trust domain itself, not a workload.
        return Err(IdentityError::InvalidSpiffeId(
            "a workload spiffe id needs a path",
        ));
    }
    if let Some(expected) = &rules.trust_domain {
        if id.trust_domain() != expected {
            return Err(IdentityError::TrustDomainMismatch {
                expected: expected.clone(),
                found: id.trust_domain().to_owned(),
            });
        }
    }
    Ok(Identity::Spiffe(id))
}

fn common_name_identity(
    cert: &X509Certificate<'_>,
    rules: &IdentityRules,
) -> Result<Identity, IdentityError> {
    let mut cns = cert.subject().iter_common_name();
    let Some(cn) = cns.next() else {
        // Nothing to go on at all: say so, whatever the CN setting.
        return Err(IdentityError::NoIdentity);
    };
    if !rules.allow_common_name {
        return Err(IdentityError::CommonNameNotAllowed);
    }
    if cns.next().is_some() {
        return Err(IdentityError::MultipleCommonNames);
    }
    // as_str accepts UTF8String/PrintableString/IA5String/NumericString and
    // checks UTF-8; BMPString etc. are refused rather than guessed at.
    let cn = cn
        .as_str()
        .map_err(|_| IdentityError::InvalidCommonName("not a utf-8 string"))?;
    if cn.is_empty() {
        return Err(IdentityError::InvalidCommonName("empty"));
    }
    if cn.len() > MAX_COMMON_NAME_LEN {
        return Err(IdentityError::InvalidCommonName("longer than 256 bytes"));
    }
    // Identities are logged and matched in policy files: control characters
    // (newlines, escapes) would allow log forging, so refuse them.
    if cn.chars().any(char::is_control) {
        return Err(IdentityError::InvalidCommonName(
            "contains control characters",
        ));
    }
    Ok(Identity::CommonName(cn.into()))
}

/// Escape and truncate an untrusted value before it goes into an error message.
fn echo(value: &str) -> String {
    let mut out: String = value
        .chars()
        .take(MAX_ECHO_LEN)
        .flat_map(char::escape_debug)
        .collect();
    if value.chars().nth(MAX_ECHO_LEN).is_some() {
        out.push('…');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dev::pki::{ClientCertSpec, DevCa};

    fn der(pem: &str) -> Vec<u8> {
        let (_, pem) = x509_parser::pem::parse_x509_pem(pem.as_bytes()).unwrap();
        pem.contents
    }

    fn client(ca: &DevCa, cn: Option<&str>, uris: &[&str]) -> Vec<u8> {
        let leaf = ca
            .issue_client(&ClientCertSpec {
                common_name: cn.map(str::to_owned),
                uri_sans: uris.iter().map(|u| (*u).to_owned()).collect(),
                ..ClientCertSpec::default()
            })
            .unwrap();
        der(&leaf.cert_pem)
    }

    fn any_td() -> IdentityRules {
        IdentityRules::default()
    }

    fn pinned(td: &str) -> IdentityRules {
        IdentityRules {
            trust_domain: Some(td.into()),
            allow_common_name: false,
        }
    }

    fn cn_allowed() -> IdentityRules {
        IdentityRules {
            trust_domain: None,
            allow_common_name: true,
        }
    }

    #[test]
    fn spiffe_happy_path() {
        let ca = DevCa::generate("ca").unwrap();
        let cert = client(&ca, Some("ignored-cn"), &["spiffe://credvault.dev/admin"]);
        for rules in [any_td(), pinned("credvault.dev"), cn_allowed()] {
            let id = identity_from_certificate(&cert, &rules).unwrap();
            assert_eq!(id.to_string(), "spiffe://credvault.dev/admin");
            let Identity::Spiffe(s) = id else {
                panic!("expected spiffe")
            };
            assert_eq!(s.trust_domain(), "credvault.dev");
            assert_eq!(s.path(), "/admin");
        }
    }

    #[test]
    fn pinned_trust_domain_mismatch() {
        let ca = DevCa::generate("ca").unwrap();
        let cert = client(&ca, None, &["spiffe://evil.example/admin"]);
        assert_eq!(
            identity_from_certificate(&cert, &pinned("credvault.dev")),
            Err(IdentityError::TrustDomainMismatch {
                expected: "credvault.dev".into(),
                found: "evil.example".into(),
            })
        );
        // Suffix tricks do not pass the pin either.
        let cert = client(&ca, None, &["spiffe://credvault.dev.evil/admin"]);
        assert!(matches!(
            identity_from_certificate(&cert, &pinned("credvault.dev")),
            Err(IdentityError::TrustDomainMismatch { .. })
        ));
    }

    #[test]
    fn two_uri_sans_refused() {
        let ca = DevCa::generate("ca").unwrap();
        let cert = client(
            &ca,
            Some("cn"),
            &["spiffe://credvault.dev/a", "spiffe://credvault.dev/b"],
        );
        assert_eq!(
            identity_from_certificate(&cert, &cn_allowed()),
            Err(IdentityError::MultipleUriSans(2))
        );
    }

    #[test]
    fn non_spiffe_uri_refused_even_with_cn() {
        let ca = DevCa::generate("ca").unwrap();
        let cert = client(&ca, Some("cn"), &["https://credvault.dev/admin"]);
        assert_eq!(
            identity_from_certificate(&cert, &cn_allowed()),
            Err(IdentityError::NotSpiffe(
                "https://credvault.dev/admin".into()
            ))
        );
        let cert = client(&ca, None, &["SPIFFE://credvault.dev/admin"]);
        assert!(matches!(
            identity_from_certificate(&cert, &any_td()),
            Err(IdentityError::InvalidSpiffeId(_))
        ));
        let cert = client(&ca, None, &["spiffe://credvault.dev/a/../b"]);
        assert!(matches!(
            identity_from_certificate(&cert, &any_td()),
            Err(IdentityError::InvalidSpiffeId(_))
        ));
    }

    #[test]
    fn trust_domain_only_id_is_not_a_workload() {
        let ca = DevCa::generate("ca").unwrap();
        let cert = client(&ca, None, &["spiffe://credvault.dev"]);
        assert!(matches!(
            identity_from_certificate(&cert, &any_td()),
            Err(IdentityError::InvalidSpiffeId(_))
        ));
    }

    #[test]
    fn common_name_fallback_allowed() {
        let ca = DevCa::generate("ca").unwrap();
        let cert = client(&ca, Some("acme-worker"), &[]);
        let id = identity_from_certificate(&cert, &cn_allowed()).unwrap();
        assert_eq!(id, Identity::CommonName("acme-worker".into()));
        assert_eq!(id.to_string(), "cn:acme-worker");
        // A CN that looks like a SPIFFE ID stays a CN.
        let cert = client(&ca, Some("spiffe://credvault.dev/admin"), &[]);
        assert_eq!(
            identity_from_certificate(&cert, &cn_allowed())
                .unwrap()
                .to_string(),
            "cn:spiffe://credvault.dev/admin"
        );
    }

    #[test]
    fn common_name_fallback_refused() {
        let ca = DevCa::generate("ca").unwrap();
        let cert = client(&ca, Some("acme-worker"), &[]);
        assert_eq!(
            identity_from_certificate(&cert, &any_td()),
            Err(IdentityError::CommonNameNotAllowed)
        );
        assert_eq!(
            identity_from_certificate(&cert, &pinned("credvault.dev")),
            Err(IdentityError::CommonNameNotAllowed)
        );
    }

    #[test]
    fn no_identity_at_all() {
        let ca = DevCa::generate("ca").unwrap();
        let cert = client(&ca, None, &[]);
        for rules in [cn_allowed(), any_td()] {
            assert_eq!(
                identity_from_certificate(&cert, &rules),
                Err(IdentityError::NoIdentity)
            );
        }
    }

    #[test]
    fn common_name_with_control_characters_refused() {
        let ca = DevCa::generate("ca").unwrap();
        let cert = client(&ca, Some("admin\nlevel=info msg=forged"), &[]);
        assert!(matches!(
            identity_from_certificate(&cert, &cn_allowed()),
            Err(IdentityError::InvalidCommonName(_))
        ));
    }

    #[test]
    fn garbage_der_is_an_error() {
        let ca = DevCa::generate("ca").unwrap();
        let good = client(&ca, None, &["spiffe://credvault.dev/admin"]);
        let inputs: Vec<Vec<u8>> = vec![
            vec![],
            vec![0x30],
            vec![0x30, 0x82, 0xff, 0xff],
            vec![0xff; 64],
            b"-----BEGIN CERTIFICATE-----".to_vec(),
            good[..good.len() / 2].to_vec(),
            [good.as_slice(), &[0u8]].concat(),
        ];
        for input in inputs {
            assert!(matches!(
                identity_from_certificate(&input, &any_td()),
                Err(IdentityError::BadCertificate(_))
            ));
        }
        // Every single-byte corruption must yield a result, never a panic.
        for i in 0..good.len() {
            let mut bad = good.clone();
            bad[i] ^= 0xa5;
            let _ = identity_from_certificate(&bad, &cn_allowed());
        }
        // And every truncation.
        for n in 0..good.len() {
            assert!(identity_from_certificate(&good[..n], &any_td()).is_err());
        }
    }

    #[test]
    fn spiffe_parse_accepts_valid_ids() {
        for ok in [
            "spiffe://credvault.dev/admin",
            "spiffe://example.org/ns/prod/sa/Worker_1.v-2",
            "spiffe://a_b-c.9/x",
            "spiffe://example.org",
            "spiffe://example.org/...",
            "spiffe://example.org/.a",
        ] {
            let id = SpiffeId::parse(ok).unwrap();
            assert_eq!(id.to_string(), ok);
            assert_eq!(ok.parse::<SpiffeId>().unwrap(), id);
        }
    }

    #[test]
    fn spiffe_parse_edge_cases() {
        let long_path = format!("spiffe://td/{}", "a".repeat(MAX_SPIFFE_ID_LEN));
        let max_ok = format!(
            "spiffe://td/{}",
            "a".repeat(MAX_SPIFFE_ID_LEN - "spiffe://td/".len())
        );
        assert!(SpiffeId::parse(&max_ok).is_ok());
        for bad in [
            "",
            "spiffe://",
            "spiffe:///path",
            "spiffe:/td/path",
            "spiffe:td/path",
            "SPIFFE://td/path",
            "Spiffe://td/path",
            "https://td/path",
            "spiffe://TD/path",
            "spiffe://td:8443/path",
            "spiffe://user@td/path",
            "spiffe://td/path?x=1",
            "spiffe://td/path#frag",
            "spiffe://td/",
            "spiffe://td//path",
            "spiffe://td/path/",
            "spiffe://td/./path",
            "spiffe://td/a/..",
            "spiffe://td/a%20b",
            "spiffe://td/a b",
            "spiffe://td/a:b",
            "spiffe://td/ümlaut",
            "spiffe://tü/x",
            " spiffe://td/path",
            long_path.as_str(),
        ] {
            assert!(
                matches!(SpiffeId::parse(bad), Err(IdentityError::InvalidSpiffeId(_))),
                "{bad:?} should be invalid"
            );
        }
    }

    #[test]
    fn trust_domain_validation() {
        assert!(validate_trust_domain("credvault.dev").is_ok());
        assert!(validate_trust_domain("Credvault.dev").is_err());
        assert!(validate_trust_domain("").is_err());
        assert!(validate_trust_domain("td:1").is_err());
    }

    #[test]
    fn echo_escapes_and_truncates() {
        assert_eq!(echo("a\nb"), "a\\nb");
        let long = "x".repeat(500);
        assert_eq!(echo(&long).chars().count(), MAX_ECHO_LEN + 1);
    }

    #[test]
    fn errors_are_lowercase() {
        let errors = [
            IdentityError::BadCertificate("x".into()),
            IdentityError::NoIdentity,
            IdentityError::MultipleUriSans(2),
            IdentityError::NotSpiffe("x".into()),
            IdentityError::InvalidSpiffeId("x"),
            IdentityError::TrustDomainMismatch {
                expected: "a".into(),
                found: "b".into(),
            },
            IdentityError::CommonNameNotAllowed,
            IdentityError::MultipleCommonNames,
            IdentityError::InvalidCommonName("x"),
        ];
        for e in errors {
            let msg = e.to_string();
            assert!(msg.starts_with(|c: char| c.is_ascii_lowercase()), "{msg}");
        }
    }
}
