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
    /// The address is deliberately not named: the message would otherwise
    /// tell a caller what an internal name resolves to.
    #[error("the endpoint's address is not allowed (private, loopback or special-purpose)")]
    PrivateAddress,
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
                return Err(EndpointRejected::PrivateAddress);
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
                tracing::info!(
                    host = name,
                    "endpoint refused: it resolves to a special-purpose address"
                );
                return Err(EndpointRejected::PrivateAddress);
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

/// Addresses that are not a provider on the public internet: every range
/// of the IANA IPv4 and IPv6 special-purpose registries (private, loopback,
/// link-local, this-network, shared/CGN, documentation, benchmarking,
/// reserved, multicast, site-local, …), and IPv6 forms that embed an IPv4
/// address (mapped, compatible, NAT64, 6to4, Teredo).
pub fn is_internal(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => is_special_v4(v4),
        IpAddr::V6(v6) => is_special_v6(v6),
    }
}

/// IPv4 special-purpose ranges as (network, prefix length).
const SPECIAL_V4: &[([u8; 4], u8)] = &[
    ([0, 0, 0, 0], 8),       // this network
    ([10, 0, 0, 0], 8),      // private
    ([100, 64, 0, 0], 10),   // shared address space (CGN, pod networks)
    ([127, 0, 0, 0], 8),     // loopback
    ([169, 254, 0, 0], 16),  // link local (cloud metadata)
    ([172, 16, 0, 0], 12),   // private
    ([192, 0, 0, 0], 24),    // IETF protocol assignments
    ([192, 0, 2, 0], 24),    // documentation (TEST-NET-1)
    ([192, 31, 196, 0], 24), // AS112
    ([192, 52, 193, 0], 24), // AMT
    ([192, 88, 99, 0], 24),  // 6to4 relay anycast
    ([192, 168, 0, 0], 16),  // private
    ([192, 175, 48, 0], 24), // AS112 direct delegation
    ([198, 18, 0, 0], 15),   // benchmarking
    ([198, 51, 100, 0], 24), // documentation (TEST-NET-2)
    ([203, 0, 113, 0], 24),  // documentation (TEST-NET-3)
    ([224, 0, 0, 0], 4),     // multicast
    ([240, 0, 0, 0], 4),     // reserved, and the limited broadcast
];

fn is_special_v4(ip: std::net::Ipv4Addr) -> bool {
    let bits = u32::from(ip);
    SPECIAL_V4.iter().any(|(net, len)| {
        let mask = u32::MAX.checked_shl(32 - u32::from(*len)).unwrap_or(0);
        bits & mask == u32::from_be_bytes(*net) & mask
    })
}

/// IPv6 special-purpose ranges refused outright, as (network, prefix length).
const SPECIAL_V6: &[(u128, u8)] = &[
    (0, 96),                      // unspecified, loopback, IPv4-compatible
    (0x0064_ff9b_0001 << 80, 48), // NAT64 local use
    (0x0100 << 112, 64),          // discard only
    (0x2001 << 112, 23),          // IETF assignments, Teredo, benchmarking, ORCHID
    (0x2001_0db8 << 96, 32),      // documentation
    (0x2002 << 112, 16),          // 6to4
    (0x3fff << 112, 20),          // documentation
    (0x5f00 << 112, 16),          // SRv6 SIDs
    (0xfc00 << 112, 7),           // unique local
    (0xfe80 << 112, 10),          // link local
    (0xfec0 << 112, 10),          // site local (deprecated)
    (0xff00 << 112, 8),           // multicast
];

fn is_special_v6(ip: std::net::Ipv6Addr) -> bool {
    let bits = u128::from(ip);
    if let Some(v4) = ip.to_ipv4_mapped() {
        return is_special_v4(v4);
    }
    // NAT64 well-known prefix 64:ff9b::/96 reaches the IPv4 address it embeds.
    if bits >> 32 == 0x0064_ff9b_0000_0000_0000_0000 {
        return is_special_v4(std::net::Ipv4Addr::from(bits as u32));
    }
    SPECIAL_V6.iter().any(|(net, len)| {
        let mask = u128::MAX.checked_shl(128 - u32::from(*len)).unwrap_or(0);
        bits & mask == net & mask
    })
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
                matches!(check(&policy, url), Err(EndpointRejected::PrivateAddress)),
                "{url}"
            );
        }
    }

    #[test]
    fn every_special_purpose_range_and_embedded_ipv4_is_refused() {
        let refused = [
            "0.1.2.3",                              // this network
            "192.0.0.8",                            // IETF protocol assignments
            "192.0.2.1",                            // documentation
            "198.18.0.1",                           // benchmarking
            "198.19.255.255",                       // benchmarking, end of the /15
            "203.0.113.9",                          // documentation
            "224.0.0.1",                            // multicast
            "240.0.0.1",                            // reserved
            "255.255.255.255",                      // broadcast
            "::a00:1",                              // IPv4-compatible 10.0.0.1
            "::7f00:1",                             // IPv4-compatible 127.0.0.1
            "64:ff9b::a9fe:a9fe",                   // NAT64 of 169.254.169.254
            "64:ff9b:1::1",                         // NAT64 local use
            "2002:a00:1::1",                        // 6to4 of 10.0.0.1
            "2001:0:4136:e378:8000:63bf:3fff:fdd2", // Teredo
            "2001:db8::1",                          // documentation
            "fec0::1",                              // site local
            "ff02::1",                              // multicast
            "100::1",                               // discard only
        ];
        for ip in refused {
            let ip: IpAddr = ip.parse().unwrap();
            assert!(is_internal(ip), "{ip} must be refused");
        }
        for ip in [
            "8.8.8.8",
            "142.250.74.110",
            "2607:f8b0:4004:c1b::5f",
            "64:ff9b::808:808",
        ] {
            let ip: IpAddr = ip.parse().unwrap();
            assert!(!is_internal(ip), "{ip} is a public address");
        }
    }

    #[test]
    fn a_refusal_does_not_name_the_address() {
        let message = EndpointRejected::PrivateAddress.to_string();
        assert!(!message.contains("169.254"), "{message}");
        assert_eq!(
            check(&EndpointPolicy::default(), "https://169.254.169.254/x"),
            Err(EndpointRejected::PrivateAddress)
        );
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
        assert_eq!(
            strict.check_resolved(&url).await,
            Err(EndpointRejected::PrivateAddress)
        );
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
