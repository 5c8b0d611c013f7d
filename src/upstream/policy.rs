//! Which token and revocation endpoints the vault may call.
//!
//! Callers choose the token endpoint at Deposit, so without a policy the vault
//! would be an SSRF relay into the cluster (cloud metadata, admin ports). The
//! policy is checked at Deposit and again before every upstream call.

use std::net::IpAddr;

use url::{Host, Url};

/// Settings of the endpoint policy.
#[derive(Clone, Debug, Default)]
pub struct EndpointPolicy {
    /// Plain `http` to a loopback host (dev mode and tests).
    pub allow_http_loopback: bool,
    /// Hosts allowed; empty means any public host. Entries match the host
    /// exactly or, written `*.example.com`, any subdomain.
    pub allowed_hosts: Vec<String>,
    /// Literal private, link-local, loopback or unspecified addresses.
    pub allow_private_networks: bool,
}

/// Why an endpoint was refused; safe to show the caller.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum EndpointRejected {
    #[error("endpoint must use https")]
    NotHttps,
    #[error("endpoint must not carry credentials, a fragment or a query secret")]
    Userinfo,
    #[error("endpoint has no host")]
    NoHost,
    #[error("host `{0}` is not in the endpoint allowlist")]
    HostNotAllowed(String),
    #[error("address `{0}` is private, link-local or loopback")]
    PrivateAddress(IpAddr),
}

impl EndpointPolicy {
    /// Checks a parsed URL against the policy.
    pub fn check(&self, url: &Url) -> Result<(), EndpointRejected> {
        if !url.username().is_empty() || url.password().is_some() || url.fragment().is_some() {
            return Err(EndpointRejected::Userinfo);
        }
        let host = url.host().ok_or(EndpointRejected::NoHost)?;
        let loopback = is_loopback(&host);
        match url.scheme() {
            "https" => {}
            "http" if self.allow_http_loopback && loopback => {}
            _ => return Err(EndpointRejected::NotHttps),
        }
        let host_str = url.host_str().unwrap_or_default().to_ascii_lowercase();
        if !self.allowed_hosts.is_empty()
            && !self
                .allowed_hosts
                .iter()
                .any(|p| host_matches(p, &host_str))
        {
            return Err(EndpointRejected::HostNotAllowed(host_str));
        }
        let ip = match host {
            Host::Ipv4(ip) => Some(IpAddr::V4(ip)),
            Host::Ipv6(ip) => Some(IpAddr::V6(ip)),
            Host::Domain(_) => None,
        };
        if let Some(ip) = ip {
            let loopback_allowed = self.allow_http_loopback && ip.is_loopback();
            if is_internal(ip) && !self.allow_private_networks && !loopback_allowed {
                return Err(EndpointRejected::PrivateAddress(ip));
            }
        }
        Ok(())
    }
}

fn host_matches(pattern: &str, host: &str) -> bool {
    let pattern = pattern.to_ascii_lowercase();
    match pattern.strip_prefix("*.") {
        Some(suffix) => host.len() > suffix.len() + 1 && host.ends_with(&format!(".{suffix}")),
        None => pattern == host,
    }
}

fn is_loopback(host: &Host<&str>) -> bool {
    match host {
        Host::Domain(name) => name.eq_ignore_ascii_case("localhost"),
        Host::Ipv4(ip) => ip.is_loopback(),
        Host::Ipv6(ip) => ip.is_loopback(),
    }
}

/// Addresses that reach inside the cluster or the host rather than a provider.
pub fn is_internal(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => {
            v4.is_private()
                || v4.is_loopback()
                || v4.is_link_local()
                || v4.is_unspecified()
                || v4.is_broadcast()
                // 100.64.0.0/10, carrier-grade NAT, common for pod networks.
                || (v4.octets()[0] == 100 && (v4.octets()[1] & 0xc0) == 64)
        }
        IpAddr::V6(v6) => {
            let first = v6.segments()[0];
            v6.is_loopback()
                || v6.is_unspecified()
                || (first & 0xfe00) == 0xfc00 // unique local
                || (first & 0xffc0) == 0xfe80 // link local
                || v6.to_ipv4_mapped().is_some_and(|v4| is_internal(IpAddr::V4(v4)))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(policy: &EndpointPolicy, url: &str) -> Result<(), EndpointRejected> {
        policy.check(&Url::parse(url).unwrap())
    }

    #[test]
    fn https_public_hosts_pass_by_default() {
        let policy = EndpointPolicy::default();
        assert_eq!(
            check(&policy, "https://oauth2.googleapis.com/token"),
            Ok(())
        );
        assert_eq!(
            check(&policy, "http://oauth2.googleapis.com/token"),
            Err(EndpointRejected::NotHttps)
        );
        assert_eq!(
            check(&policy, "http://127.0.0.1:8080/token"),
            Err(EndpointRejected::NotHttps)
        );
    }

    #[test]
    fn internal_addresses_are_refused() {
        let policy = EndpointPolicy::default();
        for url in [
            "https://169.254.169.254/latest/meta-data",
            "https://10.0.0.1/token",
            "https://[::1]/token",
            "https://[fd00::1]/token",
            "https://[::ffff:10.0.0.1]/token",
            "https://100.64.1.1/token",
        ] {
            assert!(
                matches!(
                    check(&policy, url),
                    Err(EndpointRejected::PrivateAddress(_))
                ),
                "{url}"
            );
        }
    }

    #[test]
    fn loopback_http_only_when_allowed() {
        let policy = EndpointPolicy {
            allow_http_loopback: true,
            ..Default::default()
        };
        assert_eq!(check(&policy, "http://127.0.0.1:8080/token"), Ok(()));
        assert_eq!(check(&policy, "http://localhost:8080/token"), Ok(()));
        assert_eq!(
            check(&policy, "http://10.0.0.1/token"),
            Err(EndpointRejected::NotHttps)
        );
    }

    #[test]
    fn allowlist_matches_exact_and_wildcard_hosts() {
        let policy = EndpointPolicy {
            allowed_hosts: vec!["login.example.com".into(), "*.okta.com".into()],
            ..Default::default()
        };
        assert_eq!(check(&policy, "https://login.example.com/t"), Ok(()));
        assert_eq!(check(&policy, "https://acme.okta.com/t"), Ok(()));
        assert!(check(&policy, "https://okta.com/t").is_err());
        assert!(check(&policy, "https://evil-okta.com/t").is_err());
        assert!(check(&policy, "https://user:pw@login.example.com/t").is_err());
    }
}
