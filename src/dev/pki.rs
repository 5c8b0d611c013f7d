//! Throwaway certificate authority for `credvault dev` and the integration tests.
//!
//! Owns: generating (or reloading from PEM) a small ECDSA P-256 CA and issuing
//! server certificates (serverAuth, DNS/IP SANs) and client certificates
//! (clientAuth, SPIFFE URI SANs and/or a subject CN, any validity window —
//! including already-expired ones, so tests can exercise rejection).
//!
//! This is *not* a production CA: there is no revocation, no serial tracking
//! and keys are held in plain `String`s. It exists so that a developer and the
//! test suite get real mTLS without openssl or a shell script.

use std::fmt;
use std::net::IpAddr;

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, DnValue,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyIdMethod, KeyPair, KeyUsagePurpose, SanType,
    PKCS_ECDSA_P256_SHA256,
};
use time::{Duration, OffsetDateTime};
use x509_parser::prelude::{FromDer, ParsedExtension, X509Certificate};

/// How long the dev CA lives. Long enough that a developer's `.credvault-dev`
/// directory never silently stops working.
const CA_VALIDITY: Duration = Duration::days(3650);
/// Default leaf lifetime (server and client).
const LEAF_VALIDITY: Duration = Duration::days(365);
/// Back-date `not_before` so a peer whose clock is slightly behind ours does
/// not reject a certificate that was minted a second ago.
const CLOCK_SKEW: Duration = Duration::hours(1);

/// Errors from the dev CA. Messages never contain key material.
#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    /// rcgen refused the parameters or failed to sign.
    #[error("certificate generation failed: {0}")]
    Generate(#[from] rcgen::Error),
    /// The CA certificate PEM could not be decoded or parsed.
    #[error("invalid ca certificate: {0}")]
    InvalidCaCertificate(String),
    /// The CA key PEM could not be decoded. The reason is deliberately vague:
    /// parser errors on a private key are not something we echo.
    #[error("invalid ca private key")]
    InvalidCaKey,
    /// The certificate is not a CA (basicConstraints CA:TRUE and keyCertSign).
    #[error("certificate is not a certificate authority")]
    NotACa,
    /// The key does not belong to the certificate.
    #[error("ca private key does not match the ca certificate")]
    KeyMismatch,
    /// A server certificate needs at least one DNS name or IP address.
    #[error("a server certificate needs at least one dns name or ip address")]
    NoSubjectAltNames,
    /// A SAN or CN value is not representable (e.g. non-ASCII DNS name or URI).
    #[error("invalid name {0:?}: {1}")]
    InvalidName(String, String),
    /// `not_before` is not strictly before `not_after`.
    #[error("invalid validity window: not_before must be before not_after")]
    InvalidValidity,
}

/// A certificate and its private key, both PEM-encoded.
///
/// `key_pem` is secret material; `Debug` omits it.
#[derive(Clone)]
pub struct CertifiedKey {
    /// The leaf certificate (only the leaf; the CA is [`DevCa::ca_cert_pem`]).
    pub cert_pem: String,
    /// PKCS#8 private key (`-----BEGIN PRIVATE KEY-----`).
    pub key_pem: String,
}

impl fmt::Debug for CertifiedKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CertifiedKey")
            .field("cert_pem", &self.cert_pem)
            .field("key_pem", &"[redacted]")
            .finish()
    }
}

/// What to put in a client certificate.
#[derive(Debug, Clone, Default)]
pub struct ClientCertSpec {
    /// Subject CN; `None` leaves the subject empty.
    pub common_name: Option<String>,
    /// URI SANs, e.g. `"spiffe://credvault.dev/admin"`. Not validated here on
    /// purpose: tests need to mint certificates with bad or multiple URIs.
    pub uri_sans: Vec<String>,
    /// Defaults to now - 1h.
    pub not_before: Option<OffsetDateTime>,
    /// Defaults to now + 1 year. A past date yields an expired certificate.
    pub not_after: Option<OffsetDateTime>,
}

/// A development certificate authority able to issue server and client leaves.
pub struct DevCa {
    cert_pem: String,
    key_pem: String,
    issuer: Issuer<'static, KeyPair>,
}

impl fmt::Debug for DevCa {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DevCa")
            .field("cert_pem", &self.cert_pem)
            .field("key_pem", &"[redacted]")
            .finish_non_exhaustive()
    }
}

impl DevCa {
    /// Create a fresh self-signed CA (ECDSA P-256, CA:TRUE pathlen 0, 10 years).
    pub fn generate(common_name: &str) -> Result<DevCa, PkiError> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let now = OffsetDateTime::now_utc();

        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params
            .distinguished_name
            .push(DnType::CommonName, utf8_dn_value(common_name)?);
        // pathlen 0: the dev CA signs leaves only, never intermediates.
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        params.not_before = now - CLOCK_SKEW;
        params.not_after = now + CA_VALIDITY;
        // Sha256 key ids are derived from the public key, so a reloaded CA
        // (see `from_pem`) produces the same authorityKeyIdentifier.
        params.key_identifier_method = KeyIdMethod::Sha256;

        let cert = params.self_signed(&key)?;
        let cert_pem = cert.pem();
        let key_pem = key.serialize_pem();
        Ok(DevCa {
            cert_pem,
            key_pem,
            issuer: Issuer::new(params, key),
        })
    }

    /// Reload a CA written earlier by [`DevCa::generate`] (or any ECDSA/Ed25519/RSA
    /// CA whose subject uses single-valued RDNs with common string types).
    ///
    /// Checks that the certificate is a CA and that the key belongs to it, so a
    /// mixed-up `.credvault-dev` directory fails loudly instead of issuing
    /// certificates that nothing will accept.
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<DevCa, PkiError> {
        let (_, pem) = x509_parser::pem::parse_x509_pem(cert_pem.as_bytes())
            .map_err(|e| PkiError::InvalidCaCertificate(format!("pem: {e}")))?;
        if pem.label != "CERTIFICATE" {
            return Err(PkiError::InvalidCaCertificate(format!(
                "unexpected pem label {:?}",
                pem.label
            )));
        }
        let (rest, cert) = X509Certificate::from_der(&pem.contents)
            .map_err(|e| PkiError::InvalidCaCertificate(e.to_string()))?;
        if !rest.is_empty() {
            return Err(PkiError::InvalidCaCertificate(
                "trailing bytes after certificate".into(),
            ));
        }

        let is_ca = matches!(cert.basic_constraints(), Ok(Some(bc)) if bc.value.ca);
        let can_sign = matches!(cert.key_usage(), Ok(Some(ku)) if ku.value.key_cert_sign());
        if !is_ca || !can_sign {
            return Err(PkiError::NotACa);
        }

        let key = KeyPair::from_pem(key_pem).map_err(|_| PkiError::InvalidCaKey)?;
        if cert.public_key().subject_public_key.data.as_ref() != key.public_key_raw() {
            return Err(PkiError::KeyMismatch);
        }

        let mut params = CertificateParams::default();
        params.distinguished_name = distinguished_name_from(&cert)?;
        params.key_usages = key_usages_from(&cert);
        // Prefer the CA's own subjectKeyIdentifier so issued leaves' AKI matches
        // it byte for byte even if the CA was not made by us.
        params.key_identifier_method = match subject_key_id(&cert) {
            Some(id) => KeyIdMethod::PreSpecified(id),
            None => KeyIdMethod::Sha256,
        };
        let issuer = Issuer::new(params, key);

        let ca = DevCa {
            cert_pem: cert_pem.to_owned(),
            key_pem: key_pem.to_owned(),
            issuer,
        };
        // Path building compares the leaf's issuer name with the CA's subject
        // byte for byte. Prove our re-encoding of the subject is exact now,
        // rather than handing out certificates that fail far away.
        let probe = ca.issue_client(&ClientCertSpec {
            common_name: Some("credvault-dev-probe".into()),
            ..ClientCertSpec::default()
        })?;
        let (_, probe_pem) = x509_parser::pem::parse_x509_pem(probe.cert_pem.as_bytes())
            .map_err(|e| PkiError::InvalidCaCertificate(format!("probe: {e}")))?;
        let (_, probe_cert) = X509Certificate::from_der(&probe_pem.contents)
            .map_err(|e| PkiError::InvalidCaCertificate(format!("probe: {e}")))?;
        if probe_cert.issuer().as_raw() != cert.subject().as_raw() {
            return Err(PkiError::InvalidCaCertificate(
                "subject cannot be reproduced exactly".into(),
            ));
        }
        Ok(ca)
    }

    /// The CA certificate (trust anchor for both server and client verification).
    pub fn ca_cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// The CA private key (PKCS#8 PEM). Secret: write it with 0600 permissions.
    pub fn ca_key_pem(&self) -> &str {
        &self.key_pem
    }

    /// Issue a server certificate (serverAuth) for the given names.
    ///
    /// CN = the first DNS name (or the first IP if there are no DNS names);
    /// clients verify against the SANs, the CN is only for humans.
    pub fn issue_server(
        &self,
        dns_names: &[&str],
        ips: &[IpAddr],
    ) -> Result<CertifiedKey, PkiError> {
        let cn = match (dns_names.first(), ips.first()) {
            (Some(dns), _) => (*dns).to_owned(),
            (None, Some(ip)) => ip.to_string(),
            (None, None) => return Err(PkiError::NoSubjectAltNames),
        };

        let mut params = leaf_params(None, None)?;
        params
            .distinguished_name
            .push(DnType::CommonName, utf8_dn_value(&cn)?);
        for name in dns_names {
            let ia5 = (*name)
                .try_into()
                .map_err(|e: rcgen::Error| PkiError::InvalidName((*name).into(), e.to_string()))?;
            params.subject_alt_names.push(SanType::DnsName(ia5));
        }
        params
            .subject_alt_names
            .extend(ips.iter().map(|ip| SanType::IpAddress(*ip)));
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        self.sign(&params)
    }

    /// Issue a client certificate (clientAuth) as described by `spec`.
    pub fn issue_client(&self, spec: &ClientCertSpec) -> Result<CertifiedKey, PkiError> {
        let mut params = leaf_params(spec.not_before, spec.not_after)?;
        if let Some(cn) = &spec.common_name {
            params
                .distinguished_name
                .push(DnType::CommonName, utf8_dn_value(cn)?);
        }
        for uri in &spec.uri_sans {
            let ia5 = uri
                .as_str()
                .try_into()
                .map_err(|e: rcgen::Error| PkiError::InvalidName(uri.clone(), e.to_string()))?;
            params.subject_alt_names.push(SanType::URI(ia5));
        }
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        self.sign(&params)
    }

    fn sign(&self, params: &CertificateParams) -> Result<CertifiedKey, PkiError> {
        // A fresh key per leaf; rcgen derives the serial from its hash, so
        // serials are unique without us keeping state.
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok(CertifiedKey {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }
}

/// Common leaf parameters: empty subject (rcgen's default CN is a placeholder
/// we never want), digitalSignature, AKI, and the validity window.
fn leaf_params(
    not_before: Option<OffsetDateTime>,
    not_after: Option<OffsetDateTime>,
) -> Result<CertificateParams, PkiError> {
    let now = OffsetDateTime::now_utc();
    let not_before = not_before.unwrap_or(now - CLOCK_SKEW);
    let not_after = not_after.unwrap_or(now + LEAF_VALIDITY);
    if not_before >= not_after {
        return Err(PkiError::InvalidValidity);
    }
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params.not_before = not_before;
    params.not_after = not_after;
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.use_authority_key_identifier_extension = true;
    Ok(params)
}

fn utf8_dn_value(s: &str) -> Result<DnValue, PkiError> {
    if s.is_empty() {
        return Err(PkiError::InvalidName(
            s.into(),
            "common name must not be empty".into(),
        ));
    }
    Ok(DnValue::Utf8String(s.to_owned()))
}

/// Rebuild the CA subject as rcgen values, keeping order and string types so
/// that rcgen re-encodes it to the same bytes.
fn distinguished_name_from(cert: &X509Certificate<'_>) -> Result<DistinguishedName, PkiError> {
    use x509_parser::der_parser::asn1_rs::Tag;

    let unsupported = |why: &str| PkiError::InvalidCaCertificate(format!("subject: {why}"));
    let mut dn = DistinguishedName::new();
    for rdn in cert.subject().iter() {
        let mut attrs = rdn.iter();
        let (Some(attr), None) = (attrs.next(), attrs.next()) else {
            return Err(unsupported("multi-valued or empty rdn"));
        };
        let oid: Vec<u64> = attr
            .attr_type()
            .iter()
            .ok_or_else(|| unsupported("oid out of range"))?
            .collect();
        let ty = DnType::from_oid(&oid);
        if dn.get(&ty).is_some() {
            // rcgen's DistinguishedName holds one value per type.
            return Err(unsupported("repeated attribute type"));
        }
        let text = std::str::from_utf8(attr.attr_value().data)
            .map_err(|_| unsupported("attribute is not utf-8"))?;
        let value = match attr.attr_value().header.tag() {
            Tag::Utf8String => DnValue::Utf8String(text.to_owned()),
            Tag::PrintableString => DnValue::PrintableString(
                text.try_into()
                    .map_err(|_| unsupported("invalid printable string"))?,
            ),
            Tag::Ia5String => DnValue::Ia5String(
                text.try_into()
                    .map_err(|_| unsupported("invalid ia5 string"))?,
            ),
            _ => return Err(unsupported("unsupported string type")),
        };
        dn.push(ty, value);
    }
    Ok(dn)
}

fn key_usages_from(cert: &X509Certificate<'_>) -> Vec<KeyUsagePurpose> {
    let Ok(Some(ku)) = cert.key_usage() else {
        return Vec::new();
    };
    let ku = ku.value;
    [
        (ku.digital_signature(), KeyUsagePurpose::DigitalSignature),
        (ku.non_repudiation(), KeyUsagePurpose::ContentCommitment),
        (ku.key_encipherment(), KeyUsagePurpose::KeyEncipherment),
        (ku.data_encipherment(), KeyUsagePurpose::DataEncipherment),
        (ku.key_agreement(), KeyUsagePurpose::KeyAgreement),
        (ku.key_cert_sign(), KeyUsagePurpose::KeyCertSign),
        (ku.crl_sign(), KeyUsagePurpose::CrlSign),
        (ku.encipher_only(), KeyUsagePurpose::EncipherOnly),
        (ku.decipher_only(), KeyUsagePurpose::DecipherOnly),
    ]
    .into_iter()
    .filter_map(|(set, purpose)| set.then_some(purpose))
    .collect()
}

fn subject_key_id(cert: &X509Certificate<'_>) -> Option<Vec<u8>> {
    cert.iter_extensions()
        .find_map(|ext| match ext.parsed_extension() {
            ParsedExtension::SubjectKeyIdentifier(id) => Some(id.0.to_vec()),
            _ => None,
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{Ipv4Addr, Ipv6Addr};
    use std::sync::Arc;

    use rustls::client::danger::ServerCertVerifier;
    use rustls::client::WebPkiServerVerifier;
    use rustls::crypto::CryptoProvider;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
    use rustls::server::danger::ClientCertVerifier;
    use rustls::server::WebPkiClientVerifier;
    use rustls::{ClientConfig, ClientConnection, RootCertStore, ServerConfig, ServerConnection};

    fn provider() -> Arc<CryptoProvider> {
        Arc::new(rustls::crypto::ring::default_provider())
    }

    fn certs(pem: &str) -> Vec<CertificateDer<'static>> {
        rustls_pemfile::certs(&mut pem.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .unwrap()
    }

    fn key(pem: &str) -> PrivateKeyDer<'static> {
        rustls_pemfile::private_key(&mut pem.as_bytes())
            .unwrap()
            .unwrap()
    }

    fn roots(ca: &DevCa) -> Arc<RootCertStore> {
        let mut roots = RootCertStore::empty();
        for c in certs(ca.ca_cert_pem()) {
            roots.add(c).unwrap();
        }
        Arc::new(roots)
    }

    fn client_verifier(ca: &DevCa) -> Arc<dyn ClientCertVerifier> {
        WebPkiClientVerifier::builder_with_provider(roots(ca), provider())
            .build()
            .unwrap()
    }

    fn server_verifier(ca: &DevCa) -> Arc<WebPkiServerVerifier> {
        WebPkiServerVerifier::builder_with_provider(roots(ca), provider())
            .build()
            .unwrap()
    }

    fn verify_client(ca: &DevCa, leaf: &CertifiedKey) -> Result<(), rustls::Error> {
        let chain = certs(&leaf.cert_pem);
        client_verifier(ca)
            .verify_client_cert(&chain[0], &chain[1..], UnixTime::now())
            .map(|_| ())
    }

    fn verify_server(ca: &DevCa, leaf: &CertifiedKey, name: &str) -> Result<(), rustls::Error> {
        let chain = certs(&leaf.cert_pem);
        let name = ServerName::try_from(name.to_owned()).unwrap();
        server_verifier(ca)
            .verify_server_cert(&chain[0], &chain[1..], &name, &[], UnixTime::now())
            .map(|_| ())
    }

    fn spiffe_client(ca: &DevCa) -> CertifiedKey {
        ca.issue_client(&ClientCertSpec {
            uri_sans: vec!["spiffe://credvault.dev/admin".into()],
            ..ClientCertSpec::default()
        })
        .unwrap()
    }

    /// Drive a full in-memory TLS handshake (no sockets needed).
    fn handshake(
        client: &mut ClientConnection,
        server: &mut ServerConnection,
    ) -> Result<(), rustls::Error> {
        for _ in 0..32 {
            let mut buf = Vec::new();
            while client.wants_write() {
                client.write_tls(&mut buf).unwrap();
            }
            if !buf.is_empty() {
                server.read_tls(&mut buf.as_slice()).unwrap();
                server.process_new_packets()?;
            }
            buf.clear();
            while server.wants_write() {
                server.write_tls(&mut buf).unwrap();
            }
            if !buf.is_empty() {
                client.read_tls(&mut buf.as_slice()).unwrap();
                client.process_new_packets()?;
            }
            if !client.is_handshaking() && !server.is_handshaking() {
                return Ok(());
            }
        }
        panic!("handshake did not converge");
    }

    #[test]
    fn ca_is_a_p256_ca() {
        let ca = DevCa::generate("credvault dev ca").unwrap();
        let (_, pem) = x509_parser::pem::parse_x509_pem(ca.ca_cert_pem().as_bytes()).unwrap();
        let cert = pem.parse_x509().unwrap();
        assert!(cert.basic_constraints().unwrap().unwrap().value.ca);
        assert!(cert.key_usage().unwrap().unwrap().value.key_cert_sign());
        assert_eq!(
            cert.public_key().algorithm.algorithm,
            x509_parser::oid_registry::OID_KEY_TYPE_EC_PUBLIC_KEY
        );
        let lifetime =
            cert.validity().not_after.timestamp() - cert.validity().not_before.timestamp();
        assert!(lifetime >= CA_VALIDITY.whole_seconds());
        assert!(ca.ca_key_pem().contains("PRIVATE KEY"));
    }

    #[test]
    fn debug_redacts_keys() {
        let ca = DevCa::generate("ca").unwrap();
        let leaf = spiffe_client(&ca);
        let body = |pem: &str| pem.lines().nth(1).unwrap().to_owned();
        for dbg in [format!("{ca:?}"), format!("{leaf:?}")] {
            assert!(dbg.contains("[redacted]"));
            assert!(!dbg.contains(&body(ca.ca_key_pem())));
            assert!(!dbg.contains(&body(&leaf.key_pem)));
        }
    }

    #[test]
    fn client_verifier_accepts_issued_client_cert() {
        let ca = DevCa::generate("ca").unwrap();
        verify_client(&ca, &spiffe_client(&ca)).unwrap();
        let cn_only = ca
            .issue_client(&ClientCertSpec {
                common_name: Some("acme-worker".into()),
                ..ClientCertSpec::default()
            })
            .unwrap();
        verify_client(&ca, &cn_only).unwrap();
    }

    #[test]
    fn client_verifier_rejects_expired_and_foreign_certs() {
        let ca = DevCa::generate("ca").unwrap();
        let now = OffsetDateTime::now_utc();
        let expired = ca
            .issue_client(&ClientCertSpec {
                uri_sans: vec!["spiffe://credvault.dev/old".into()],
                not_before: Some(now - Duration::days(10)),
                not_after: Some(now - Duration::days(1)),
                ..ClientCertSpec::default()
            })
            .unwrap();
        let err = verify_client(&ca, &expired).unwrap_err();
        assert!(
            matches!(
                err,
                rustls::Error::InvalidCertificate(rustls::CertificateError::Expired)
                    | rustls::Error::InvalidCertificate(
                        rustls::CertificateError::ExpiredContext { .. }
                    )
            ),
            "{err:?}"
        );

        let other = DevCa::generate("ca").unwrap();
        assert!(verify_client(&ca, &spiffe_client(&other)).is_err());
    }

    #[test]
    fn server_cert_is_not_a_client_cert_and_vice_versa() {
        let ca = DevCa::generate("ca").unwrap();
        let server = ca.issue_server(&["localhost"], &[]).unwrap();
        assert!(verify_client(&ca, &server).is_err());
        assert!(verify_server(&ca, &spiffe_client(&ca), "localhost").is_err());
    }

    #[test]
    fn server_cert_validates_for_localhost_and_loopback() {
        let ca = DevCa::generate("ca").unwrap();
        let server = ca
            .issue_server(
                &["localhost"],
                &[
                    IpAddr::V4(Ipv4Addr::LOCALHOST),
                    IpAddr::V6(Ipv6Addr::LOCALHOST),
                ],
            )
            .unwrap();
        verify_server(&ca, &server, "localhost").unwrap();
        verify_server(&ca, &server, "127.0.0.1").unwrap();
        verify_server(&ca, &server, "::1").unwrap();
        assert!(verify_server(&ca, &server, "example.com").is_err());
    }

    #[test]
    fn server_cert_needs_a_name() {
        let ca = DevCa::generate("ca").unwrap();
        assert!(matches!(
            ca.issue_server(&[], &[]),
            Err(PkiError::NoSubjectAltNames)
        ));
        let ip_only = ca
            .issue_server(&[], &[IpAddr::V4(Ipv4Addr::LOCALHOST)])
            .unwrap();
        verify_server(&ca, &ip_only, "127.0.0.1").unwrap();
    }

    #[test]
    fn invalid_inputs_are_errors() {
        let ca = DevCa::generate("ca").unwrap();
        assert!(matches!(
            ca.issue_server(&["bücher.example"], &[]),
            Err(PkiError::InvalidName(..))
        ));
        let now = OffsetDateTime::now_utc();
        assert!(matches!(
            ca.issue_client(&ClientCertSpec {
                not_before: Some(now),
                not_after: Some(now - Duration::hours(1)),
                ..ClientCertSpec::default()
            }),
            Err(PkiError::InvalidValidity)
        ));
        assert!(matches!(
            DevCa::generate(""),
            Err(PkiError::InvalidName(..))
        ));
    }

    #[test]
    fn mtls_handshake_with_issued_certs() {
        let ca = DevCa::generate("ca").unwrap();
        let server = ca
            .issue_server(&["localhost"], &[IpAddr::V4(Ipv4Addr::LOCALHOST)])
            .unwrap();
        let client = spiffe_client(&ca);

        let server_cfg = ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_client_cert_verifier(client_verifier(&ca))
            .with_single_cert(certs(&server.cert_pem), key(&server.key_pem))
            .unwrap();
        let client_cfg = ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots(&ca))
            .with_client_auth_cert(certs(&client.cert_pem), key(&client.key_pem))
            .unwrap();

        let mut c = ClientConnection::new(
            Arc::new(client_cfg),
            ServerName::try_from("localhost").unwrap(),
        )
        .unwrap();
        let mut s = ServerConnection::new(Arc::new(server_cfg)).unwrap();
        handshake(&mut c, &mut s).unwrap();
        let peer = s.peer_certificates().unwrap();
        assert_eq!(peer[0], certs(&client.cert_pem)[0]);
    }

    #[test]
    fn from_pem_round_trip_issues_verifiable_certs() {
        let original = DevCa::generate("credvault dev ca").unwrap();
        let reloaded = DevCa::from_pem(original.ca_cert_pem(), original.ca_key_pem()).unwrap();
        assert_eq!(reloaded.ca_cert_pem(), original.ca_cert_pem());

        let client = spiffe_client(&reloaded);
        verify_client(&original, &client).unwrap();
        let server = reloaded.issue_server(&["localhost"], &[]).unwrap();
        verify_server(&original, &server, "localhost").unwrap();
    }

    #[test]
    fn from_pem_survives_a_trip_through_files() {
        let dir = tempfile::tempdir().unwrap();
        let original = DevCa::generate("ca on disk").unwrap();
        let cert_path = dir.path().join("ca.pem");
        let key_path = dir.path().join("ca-key.pem");
        std::fs::write(&cert_path, original.ca_cert_pem()).unwrap();
        std::fs::write(&key_path, original.ca_key_pem()).unwrap();
        let reloaded = DevCa::from_pem(
            &std::fs::read_to_string(cert_path).unwrap(),
            &std::fs::read_to_string(key_path).unwrap(),
        )
        .unwrap();
        verify_client(&original, &spiffe_client(&reloaded)).unwrap();
    }

    #[test]
    fn from_pem_refuses_mismatched_or_bogus_input() {
        let a = DevCa::generate("a").unwrap();
        let b = DevCa::generate("b").unwrap();
        assert!(matches!(
            DevCa::from_pem(a.ca_cert_pem(), b.ca_key_pem()),
            Err(PkiError::KeyMismatch)
        ));
        assert!(matches!(
            DevCa::from_pem("not a pem", a.ca_key_pem()),
            Err(PkiError::InvalidCaCertificate(_))
        ));
        assert!(matches!(
            DevCa::from_pem(a.ca_cert_pem(), "garbage"),
            Err(PkiError::InvalidCaKey)
        ));
        let leaf = spiffe_client(&a);
        assert!(matches!(
            DevCa::from_pem(&leaf.cert_pem, &leaf.key_pem),
            Err(PkiError::NotACa)
        ));
        // The error must not echo key material.
        let err = DevCa::from_pem(a.ca_cert_pem(), b.ca_key_pem()).unwrap_err();
        assert!(!err.to_string().contains("PRIVATE"));
    }
}
