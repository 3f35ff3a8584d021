//! Which addresses a delivery may connect to, checked on the address actually resolved.
//!
//! A listener url is chosen by a client, so without a policy the operator could be made to POST
//! to its own cluster: the API server, cloud metadata (169.254.169.254), internal services. The
//! policy is applied twice: [`PolicyResolver`] filters what DNS returns when a connection is
//! opened (so a name that later resolves elsewhere is still caught), and [`UrlPolicy::check_url`]
//! checks hosts written as IP literals, which never reach a resolver.

use std::{
    fmt,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
};

use ipnet::IpNet;
use url::{Host, Url};

/// Why an address is special.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AddressClass {
    /// 127.0.0.0/8, ::1.
    Loopback,
    /// RFC 1918 (10/8, 172.16/12, 192.168/16) and IPv6 unique local (fc00::/7, and the
    /// deprecated site-local fec0::/10).
    Private,
    /// RFC 6598 shared address space, 100.64.0.0/10 (carrier-grade NAT).
    SharedAddressSpace,
    /// 169.254.0.0/16 (cloud metadata lives here) and fe80::/10.
    LinkLocal,
    /// 224.0.0.0/4, ff00::/8.
    Multicast,
    /// 0.0.0.0/8 and ::; Linux connects 0.0.0.0 to the local host.
    Unspecified,
    /// 255.255.255.255.
    Broadcast,
    /// 240.0.0.0/4, reserved for future use.
    Reserved,
    /// In a network the configuration denies.
    Denied(IpNet),
}

impl AddressClass {
    /// Whether `allow_private_destinations` lifts the refusal. Link-local (cloud metadata),
    /// multicast, unspecified, broadcast, reserved and configured networks stay refused.
    fn is_private(self) -> bool {
        matches!(
            self,
            Self::Loopback | Self::Private | Self::SharedAddressSpace
        )
    }
}

impl fmt::Display for AddressClass {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Loopback => f.write_str("loopback"),
            Self::Private => f.write_str("private"),
            Self::SharedAddressSpace => f.write_str("shared address space"),
            Self::LinkLocal => f.write_str("link-local"),
            Self::Multicast => f.write_str("multicast"),
            Self::Unspecified => f.write_str("unspecified"),
            Self::Broadcast => f.write_str("broadcast"),
            Self::Reserved => f.write_str("reserved"),
            Self::Denied(network) => write!(f, "in denied network {network}"),
        }
    }
}

/// A delivery was refused because of the address it would connect to.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("destination {address} is not allowed ({class})")]
pub struct DestinationRefused {
    /// The refused address.
    pub address: IpAddr,
    /// Why.
    pub class: AddressClass,
}

/// A listener url that can never be delivered to, whatever it resolves to.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UrlRefused {
    /// Only http and https are delivered to.
    #[error("url scheme {0} is not allowed")]
    Scheme(String),
    /// The url names no host.
    #[error("url has no host")]
    NoHost,
    /// The host is an IP literal the policy refuses.
    #[error(transparent)]
    Destination(#[from] DestinationRefused),
}

/// The address rules for deliveries.
#[derive(Debug, Clone, Default)]
pub struct UrlPolicy {
    /// Allows loopback, private and shared (CGNAT) addresses: for development only.
    pub allow_private_destinations: bool,
    /// Further networks to refuse, such as the cluster's pod and service ranges. Applies even
    /// when private destinations are allowed.
    pub denied_networks: Vec<IpNet>,
}

impl UrlPolicy {
    /// Checks one address.
    pub fn check(&self, address: IpAddr) -> Result<(), DestinationRefused> {
        let canonical = address.to_canonical();
        if let Some(network) = self
            .denied_networks
            .iter()
            .find(|network| network.contains(&address) || network.contains(&canonical))
        {
            return Err(DestinationRefused {
                address,
                class: AddressClass::Denied(*network),
            });
        }
        match classify(address) {
            Some(class) if !(self.allow_private_destinations && class.is_private()) => {
                Err(DestinationRefused { address, class })
            }
            _ => Ok(()),
        }
    }

    /// Checks what can be checked without DNS: the scheme, and a host written as an IP literal.
    pub fn check_url(&self, url: &Url) -> Result<(), UrlRefused> {
        match url.scheme() {
            "http" | "https" => {}
            other => return Err(UrlRefused::Scheme(other.to_owned())),
        }
        match url.host() {
            None => Err(UrlRefused::NoHost),
            Some(Host::Domain(_)) => Ok(()),
            Some(Host::Ipv4(address)) => Ok(self.check(IpAddr::V4(address))?),
            Some(Host::Ipv6(address)) => Ok(self.check(IpAddr::V6(address))?),
        }
    }
}

/// The special class of an address, `None` for an ordinary public one.
pub fn classify(address: IpAddr) -> Option<AddressClass> {
    match address {
        IpAddr::V4(v4) => classify_v4(v4),
        IpAddr::V6(v6) => classify_v6(v6),
    }
}

fn classify_v4(address: Ipv4Addr) -> Option<AddressClass> {
    let [a, b, ..] = address.octets();
    if address.is_loopback() {
        Some(AddressClass::Loopback)
    } else if address.is_private() {
        Some(AddressClass::Private)
    } else if a == 100 && (b & 0xc0) == 64 {
        Some(AddressClass::SharedAddressSpace)
    } else if address.is_link_local() {
        Some(AddressClass::LinkLocal)
    } else if address.is_multicast() {
        Some(AddressClass::Multicast)
    } else if a == 0 {
        Some(AddressClass::Unspecified)
    } else if address.is_broadcast() {
        Some(AddressClass::Broadcast)
    } else if a >= 240 {
        Some(AddressClass::Reserved)
    } else {
        None
    }
}

fn classify_v6(address: Ipv6Addr) -> Option<AddressClass> {
    let segments = address.segments();
    if let Some(v4) = address.to_ipv4_mapped() {
        return classify_v4(v4);
    }
    if address.is_loopback() {
        return Some(AddressClass::Loopback);
    }
    if address.is_unspecified() {
        return Some(AddressClass::Unspecified);
    }
    if address.is_multicast() {
        return Some(AddressClass::Multicast);
    }
    if (segments[0] & 0xffc0) == 0xfe80 {
        return Some(AddressClass::LinkLocal);
    }
    // Unique local, deprecated site-local, and the local-use NAT64 prefix 64:ff9b:1::/48
    // (translators of a private network).
    if (segments[0] & 0xfe00) == 0xfc00
        || (segments[0] & 0xffc0) == 0xfec0
        || segments[..3] == [0x64, 0xff9b, 1]
    {
        return Some(AddressClass::Private);
    }
    // Forms that carry an IPv4 address and can reach it: IPv4-compatible (::a.b.c.d, deprecated),
    // NAT64 with the well-known prefix (64:ff9b::/96) and 6to4 (2002::/16).
    let embedded = if segments[..6] == [0; 6] || segments[..6] == [0x64, 0xff9b, 0, 0, 0, 0] {
        Some(ipv4_from(segments[6], segments[7]))
    } else if segments[0] == 0x2002 {
        Some(ipv4_from(segments[1], segments[2]))
    } else {
        None
    };
    embedded.and_then(classify_v4)
}

fn ipv4_from(high: u16, low: u16) -> Ipv4Addr {
    let [a, b] = high.to_be_bytes();
    let [c, d] = low.to_be_bytes();
    Ipv4Addr::new(a, b, c, d)
}

/// Name resolution failed.
#[derive(Debug, thiserror::Error)]
pub enum ResolveError {
    /// The system resolver gave an error.
    #[error("could not resolve host {host}")]
    Lookup {
        /// The name looked up.
        host: String,
        /// The resolver's error.
        #[source]
        source: std::io::Error,
    },
    /// The name has no address.
    #[error("host {host} has no address")]
    NoAddress {
        /// The name looked up.
        host: String,
    },
    /// Every address of the name is refused.
    #[error(transparent)]
    Refused(DestinationRefused),
}

impl UrlPolicy {
    /// The addresses `host` resolves to that the policy allows, in the resolver's order; when
    /// it allows none, the refusal of the first, and the connection is never attempted.
    pub async fn resolve(&self, host: &str, port: u16) -> Result<Vec<SocketAddr>, ResolveError> {
        let resolved = tokio::net::lookup_host((host, port))
            .await
            .map_err(|source| ResolveError::Lookup {
                host: host.to_owned(),
                source,
            })?;
        let mut allowed = Vec::new();
        let mut refused = None;
        for address in resolved {
            match self.check(address.ip()) {
                Ok(()) => allowed.push(address),
                Err(refusal) => {
                    refused.get_or_insert(refusal);
                }
            }
        }
        if allowed.is_empty() {
            return Err(match refused {
                Some(refusal) => ResolveError::Refused(refusal),
                None => ResolveError::NoAddress {
                    host: host.to_owned(),
                },
            });
        }
        Ok(allowed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(text: &str) -> IpAddr {
        match text.parse() {
            Ok(address) => address,
            Err(error) => panic!("{text}: {error}"),
        }
    }

    fn net(text: &str) -> IpNet {
        match text.parse() {
            Ok(network) => network,
            Err(error) => panic!("{text}: {error}"),
        }
    }

    #[test]
    fn address_classes() {
        use AddressClass::*;
        let table: &[(&str, Option<AddressClass>)] = &[
            ("127.0.0.1", Some(Loopback)),
            ("127.255.255.254", Some(Loopback)),
            ("10.0.0.1", Some(Private)),
            ("10.255.255.255", Some(Private)),
            ("172.16.0.1", Some(Private)),
            ("172.31.255.255", Some(Private)),
            ("172.32.0.1", None),
            ("192.168.1.1", Some(Private)),
            ("100.64.0.1", Some(SharedAddressSpace)),
            ("100.127.255.255", Some(SharedAddressSpace)),
            ("100.128.0.1", None),
            ("100.63.255.255", None),
            ("169.254.169.254", Some(LinkLocal)),
            ("169.254.0.1", Some(LinkLocal)),
            ("224.0.0.1", Some(Multicast)),
            ("239.255.255.250", Some(Multicast)),
            ("0.0.0.0", Some(Unspecified)),
            ("0.1.2.3", Some(Unspecified)),
            ("255.255.255.255", Some(Broadcast)),
            ("240.0.0.1", Some(Reserved)),
            ("8.8.8.8", None),
            ("1.1.1.1", None),
            ("93.184.216.34", None),
            ("::1", Some(Loopback)),
            ("::", Some(Unspecified)),
            ("fe80::1", Some(LinkLocal)),
            ("febf::1", Some(LinkLocal)),
            ("fc00::1", Some(Private)),
            ("fd12:3456:789a::1", Some(Private)),
            ("fec0::1", Some(Private)),
            ("ff02::1", Some(Multicast)),
            ("::ffff:127.0.0.1", Some(Loopback)),
            ("::ffff:10.1.2.3", Some(Private)),
            ("::ffff:169.254.169.254", Some(LinkLocal)),
            ("::ffff:100.64.0.1", Some(SharedAddressSpace)),
            ("::ffff:8.8.8.8", None),
            ("::127.0.0.1", Some(Loopback)),
            ("::10.0.0.1", Some(Private)),
            ("64:ff9b::a9fe:a9fe", Some(LinkLocal)),
            ("64:ff9b::7f00:1", Some(Loopback)),
            ("64:ff9b::808:808", None),
            ("64:ff9b:1::c0a8:101", Some(Private)),
            ("2002:a00:1::", Some(Private)),
            ("2002:7f00:1::", Some(Loopback)),
            ("2002:808:808::", None),
            ("2001:4860:4860::8888", None),
            ("2606:4700:4700::1111", None),
        ];
        for (address, expected) in table {
            assert_eq!(classify(ip(address)), *expected, "{address}");
        }
    }

    #[test]
    fn default_policy_refuses_special_addresses() {
        let policy = UrlPolicy::default();
        let table = [
            (
                "127.0.0.1",
                Some("destination 127.0.0.1 is not allowed (loopback)"),
            ),
            (
                "10.1.2.3",
                Some("destination 10.1.2.3 is not allowed (private)"),
            ),
            (
                "169.254.169.254",
                Some("destination 169.254.169.254 is not allowed (link-local)"),
            ),
            (
                "::ffff:127.0.0.1",
                Some("destination ::ffff:127.0.0.1 is not allowed (loopback)"),
            ),
            (
                "fe80::1",
                Some("destination fe80::1 is not allowed (link-local)"),
            ),
            ("8.8.8.8", None),
            ("2001:4860:4860::8888", None),
        ];
        for (address, expected) in table {
            let got = policy.check(ip(address)).err().map(|e| e.to_string());
            assert_eq!(got.as_deref(), expected, "{address}");
        }
    }

    #[test]
    fn allowing_private_destinations_keeps_the_dangerous_ones_refused() {
        let policy = UrlPolicy {
            allow_private_destinations: true,
            denied_networks: vec![net("10.96.0.0/12")],
        };
        let table = [
            ("127.0.0.1", true),
            ("::1", true),
            ("192.168.1.1", true),
            ("10.1.2.3", true),
            ("fd00::1", true),
            ("100.64.1.1", true),
            ("169.254.169.254", false),
            ("fe80::1", false),
            ("0.0.0.0", false),
            ("224.0.0.1", false),
            ("255.255.255.255", false),
            ("10.96.0.1", false),
            ("::ffff:10.96.0.1", false),
            ("8.8.8.8", true),
        ];
        for (address, allowed) in table {
            assert_eq!(policy.check(ip(address)).is_ok(), allowed, "{address}");
        }
    }

    #[test]
    fn denied_networks_apply_to_public_addresses_too() {
        let policy = UrlPolicy {
            allow_private_destinations: false,
            denied_networks: vec![net("203.0.113.0/24"), net("2001:db8::/32")],
        };
        let refused = policy.check(ip("203.0.113.9")).err();
        assert_eq!(
            refused.map(|e| e.to_string()).as_deref(),
            Some("destination 203.0.113.9 is not allowed (in denied network 203.0.113.0/24)")
        );
        assert!(policy.check(ip("2001:db8::1")).is_err());
        assert!(policy.check(ip("203.0.114.9")).is_ok());
    }

    #[test]
    fn url_checks() {
        let policy = UrlPolicy::default();
        let table = [
            ("https://example.com/hook?token=x", None),
            ("http://example.com:8080/", None),
            ("ftp://example.com/", Some("url scheme ftp is not allowed")),
            ("file:///etc/passwd", Some("url scheme file is not allowed")),
            (
                "http://127.0.0.1:9000/hook",
                Some("destination 127.0.0.1 is not allowed (loopback)"),
            ),
            (
                "http://[::1]/hook",
                Some("destination ::1 is not allowed (loopback)"),
            ),
            (
                "http://[::ffff:169.254.169.254]/",
                Some("destination ::ffff:169.254.169.254 is not allowed (link-local)"),
            ),
            (
                "http://2130706433/",
                Some("destination 127.0.0.1 is not allowed (loopback)"),
            ),
            (
                "http://0x7f.1/",
                Some("destination 127.0.0.1 is not allowed (loopback)"),
            ),
            ("http://localhost/", None),
        ];
        for (text, expected) in table {
            let url = match Url::parse(text) {
                Ok(url) => url,
                Err(error) => panic!("{text}: {error}"),
            };
            let got = policy.check_url(&url).err().map(|e| e.to_string());
            assert_eq!(got.as_deref(), expected, "{text}");
        }
    }

    #[tokio::test]
    async fn names_of_refused_addresses_resolve_to_a_refusal() {
        let refused = UrlPolicy::default().resolve("localhost", 80).await;
        match refused {
            Err(ResolveError::Refused(refusal)) => {
                assert_eq!(refusal.class, AddressClass::Loopback);
            }
            other => panic!("localhost resolved although loopback is refused: {other:?}"),
        }

        let permissive = UrlPolicy {
            allow_private_destinations: true,
            denied_networks: Vec::new(),
        };
        let addresses = match permissive.resolve("localhost", 8080).await {
            Ok(addresses) => addresses,
            Err(error) => panic!("{error}"),
        };
        assert!(!addresses.is_empty());
        assert!(addresses
            .iter()
            .all(|a| a.ip().is_loopback() && a.port() == 8080));
    }
}
