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

impl EndpointPolicy {
    /// Whether a resolved address may be connected to. Loopback is allowed
    /// with `allow_http_loopback` (dev and tests run providers on localhost).
    pub fn address_allowed(&self, ip: IpAddr) -> bool {
        !is_internal(ip)
            || self.allow_private_networks
            || (self.allow_http_loopback && ip.is_loopback())
    }

    /// The policy plus DNS: a name that resolves to an internal address is
    /// refused like the literal address would be. Used at Deposit so the
    /// caller gets a clear error; connections are re-checked by the
    /// [`PolicyResolver`], which also defeats DNS rebinding in between.
    pub async fn check_resolved(&self, url: &Url) -> Result<(), EndpointRejected> {
        self.check(url)?;
        let Some(Host::Domain(name)) = url.host() else {
            return Ok(());
        };
        let port = url.port_or_known_default().unwrap_or(443);
        // A name that does not resolve now fails at connect time, as an
        // unavailable provider; that is not a policy question.
        let Ok(addrs) = tokio::net::lookup_host((name, port)).await else {
            return Ok(());
        };
        for addr in addrs {
            if !self.address_allowed(addr.ip()) {
                return Err(EndpointRejected::PrivateAddress(addr.ip()));
            }
        }
        Ok(())
    }
}

/// Resolves provider host names for the HTTP client and drops addresses the
/// policy forbids, so a name cannot be pointed at the cluster after Deposit.
#[derive(Clone, Debug)]
pub struct PolicyResolver {
    policy: EndpointPolicy,
}

impl PolicyResolver {
    pub fn new(policy: EndpointPolicy) -> Self {
        Self { policy }
    }
}

impl reqwest::dns::Resolve for PolicyResolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let policy = self.policy.clone();
        let host = name.as_str().to_owned();
        Box::pin(async move {
            let addrs: Vec<std::net::SocketAddr> = tokio::net::lookup_host((host.as_str(), 0))
                .await?
                .filter(|addr| policy.address_allowed(addr.ip()))
                .collect();
            if addrs.is_empty() {
                return Err(
                    Box::new(EndpointRejected::NoHost) as Box<dyn std::error::Error + Send + Sync>
                );
            }
            Ok(Box::new(addrs.into_iter()) as reqwest::dns::Addrs)
        })
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

    #[tokio::test]
    async fn names_resolving_to_internal_addresses_are_refused() {
        let strict = EndpointPolicy::default();
        let url = Url::parse("https://localhost:8443/token").unwrap();
        assert!(matches!(
            strict.check_resolved(&url).await,
            Err(EndpointRejected::PrivateAddress(ip)) if ip.is_loopback()
        ));
        let dev = EndpointPolicy {
            allow_http_loopback: true,
            ..Default::default()
        };
        assert_eq!(dev.check_resolved(&url).await, Ok(()));
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
