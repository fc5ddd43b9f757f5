//! The address rules: which addresses a webhook may reach (none on internal networks,
//! unless allow-listed), and the resolver that applies them at connect time.

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;
use std::sync::Arc;

use ipnet::IpNet;
use reqwest::dns::{Addrs, Name, Resolve, Resolving};

/// An allow-list entry: an IP address (`127.0.0.1`, `::1`), a network (`10.0.0.0/8`,
/// `fd00::/8`) or a host name (`localhost`). An address or network entry lifts the
/// address rules for the addresses in it, whatever name led there; a host name entry
/// lifts them for that exact host name only (case-insensitive, not its subdomains).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AllowRule(Allowed);

#[derive(Clone, Debug, PartialEq, Eq)]
enum Allowed {
    Net(IpNet),
    Host(String),
}

/// An allow-list entry that is neither an address, a network nor a host name.
#[derive(Debug, thiserror::Error)]
#[error(
    "invalid allow-list entry {0:?}: expected an IP address, a network (10.0.0.0/8) or a host name"
)]
pub struct ParseAllowRuleError(String);

impl FromStr for AllowRule {
    type Err = ParseAllowRuleError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let t = s.trim();
        // `[::1]`, as in a URL.
        let bare = t
            .strip_prefix('[')
            .and_then(|r| r.strip_suffix(']'))
            .unwrap_or(t);
        if let Ok(net) = bare.parse::<IpNet>() {
            // Normalize `10.1.2.3/8` to `10.0.0.0/8`.
            return Ok(AllowRule(Allowed::Net(net.trunc())));
        }
        if let Ok(ip) = bare.parse::<IpAddr>() {
            return Ok(AllowRule(Allowed::Net(IpNet::from(ip))));
        }
        let host = normalize_host(t);
        let label_ok = |l: &str| {
            !l.is_empty()
                && l.len() <= 63
                && l.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        };
        if host.len() <= 253 && host.split('.').all(label_ok) {
            Ok(AllowRule(Allowed::Host(host)))
        } else {
            Err(ParseAllowRuleError(s.to_owned()))
        }
    }
}

impl fmt::Display for AllowRule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.0 {
            Allowed::Net(net) => net.fmt(f),
            Allowed::Host(host) => f.write_str(host),
        }
    }
}

/// Lower case, without the root's trailing dot: how both sides of a host name comparison
/// are spelled.
fn normalize_host(host: &str) -> String {
    host.trim_end_matches('.').to_ascii_lowercase()
}

/// Why the address rules refuse `ip`, if they do (before the allow-list).
fn refused_class(ip: IpAddr) -> Option<&'static str> {
    match ip {
        IpAddr::V4(v4) => {
            let [a, b, c, _] = v4.octets();
            if v4.is_loopback() {
                Some("loopback")
            } else if v4.is_private() {
                Some("private")
            } else if a == 100 && (b & 0xc0) == 64 {
                Some("shared (CGNAT)")
            } else if v4.is_link_local() {
                // Includes 169.254.169.254, the cloud metadata service.
                Some("link-local")
            } else if a == 0 {
                // 0.0.0.0/8: Linux connects 0.0.0.0 to the local host.
                Some("unspecified")
            } else if v4.is_broadcast() {
                Some("broadcast")
            } else if v4.is_multicast() {
                Some("multicast")
            } else if a == 192 && b == 0 && c == 0 {
                // 192.0.0.0/24: IETF protocol assignments (DS-Lite, NAT64 discovery, ...).
                Some("protocol-assignment")
            } else if a == 198 && (b & 0xfe) == 18 {
                // 198.18.0.0/15: benchmarking networks, routed inside labs.
                Some("benchmarking")
            } else if a >= 240 {
                Some("reserved")
            } else {
                None
            }
        }
        IpAddr::V6(v6) => {
            // IPv4 addresses in IPv6 clothing: `::ffff:127.0.0.1`, and the well-known
            // NAT64 prefix 64:ff9b::/96, which a NAT64 gateway forwards to the embedded
            // IPv4 address.
            if let Some(v4) = v6.to_ipv4_mapped() {
                return refused_class(IpAddr::V4(v4));
            }
            let s = v6.segments();
            if s[..6] == [0x64, 0xff9b, 0, 0, 0, 0] {
                let o = v6.octets();
                return refused_class(IpAddr::from([o[12], o[13], o[14], o[15]]));
            }
            if v6.is_loopback() {
                Some("loopback")
            } else if v6.is_unspecified() {
                Some("unspecified")
            } else if s[..6] == [0; 6] {
                // ::a.b.c.d, deprecated; stacks that still honour it reach the IPv4 host.
                Some("IPv4-compatible")
            } else if s[0] == 0x2002 {
                // 6to4: relays forward to the IPv4 address in bits 16-48, whatever it is.
                Some("6to4")
            } else if s[..3] == [0x64, 0xff9b, 0x1] {
                // 64:ff9b:1::/48: NAT64 prefixes for local use, translated like the above.
                Some("local NAT64")
            } else if v6.is_unicast_link_local() {
                Some("link-local")
            } else if (s[0] & 0xffc0) == 0xfec0 {
                Some("site-local")
            } else if v6.is_unique_local() {
                Some("unique-local")
            } else if v6.is_multicast() {
                Some("multicast")
            } else {
                None
            }
        }
    }
}

/// Whether a refused class is an internal network that an allow-listed host name may
/// resolve to (a receiver on a private network, on loopback in development). The others
/// (link-local with the metadata service, unspecified, broadcast, multicast, reserved and
/// the tunnelling forms) no legitimate receiver resolves to: an allow-listed name that
/// resolves there is refused all the same, unless a network rule names the address.
fn internal_network(class: &str) -> bool {
    matches!(
        class,
        "loopback" | "private" | "shared (CGNAT)" | "site-local" | "unique-local" | "benchmarking"
    )
}

/// The address rules with the allow-list applied.
#[derive(Debug, Default)]
pub(super) struct AddressRules {
    nets: Vec<IpNet>,
    hosts: Vec<String>,
}

impl AddressRules {
    pub(super) fn new(allow: &[AllowRule]) -> Self {
        let mut rules = AddressRules::default();
        for rule in allow {
            match &rule.0 {
                Allowed::Net(net) => rules.nets.push(*net),
                Allowed::Host(host) => rules.hosts.push(host.clone()),
            }
        }
        rules
    }

    /// Whether the host name is allow-listed (then its addresses may be internal ones).
    fn host_allowed(&self, host: &str) -> bool {
        let host = normalize_host(host);
        self.hosts.contains(&host)
    }

    /// Why `ip`, an address of `host`, is refused, if it is: an allow-listed host may
    /// resolve to internal networks, never to the other refused classes.
    pub(super) fn refusal_for(&self, host: &str, ip: IpAddr) -> Option<&'static str> {
        let class = self.refusal(ip)?;
        (!(self.host_allowed(host) && internal_network(class))).then_some(class)
    }

    /// Why `ip` is refused, if it is.
    pub(super) fn refusal(&self, ip: IpAddr) -> Option<&'static str> {
        let class = refused_class(ip)?;
        // An allowed IPv4 network also covers the IPv4-mapped form of its addresses.
        let v4 = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4),
            IpAddr::V4(_) => None,
        };
        let allowed = self
            .nets
            .iter()
            .any(|n| n.contains(&ip) || v4.is_some_and(|v4| n.contains(&v4)));
        (!allowed).then_some(class)
    }
}

pub(super) fn refused_address(ip: IpAddr, class: &str) -> String {
    format!(
        "{ip} is a {class} address: webhooks may not target internal networks unless \
         the address is allow-listed"
    )
}

pub(super) fn refused_host(host: &str, ip: IpAddr, class: &str) -> String {
    format!(
        "{host} resolves to {ip}, a {class} address: webhooks may not target internal \
         networks unless the host or address is allow-listed"
    )
}

/// The resolver of the HTTP client: resolves with the system resolver and drops refused
/// addresses, so that the addresses checked are the ones connected to.
#[derive(Debug)]
pub(super) struct GuardedResolver {
    pub(super) rules: Arc<AddressRules>,
}

/// Every address of a host name was refused (the error the resolver returns).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub(super) struct Refused(String);

impl Resolve for GuardedResolver {
    fn resolve(&self, name: Name) -> Resolving {
        let rules = Arc::clone(&self.rules);
        let host = name.as_str().to_owned();
        Box::pin(async move {
            // Port 0: the client puts the URL's port in.
            let addrs: Vec<_> = tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            let mut kept = Vec::new();
            let mut first_refused = None;
            for addr in addrs {
                match rules.refusal_for(&host, addr.ip()) {
                    None => kept.push(addr),
                    Some(class) => {
                        first_refused.get_or_insert((addr.ip(), class));
                    }
                }
            }
            match (kept.is_empty(), first_refused) {
                (true, Some((ip, class))) => {
                    Err(Box::new(Refused(refused_host(&host, ip, class))) as _)
                }
                (true, None) => Err(format!("{host} resolves to no address").into()),
                (false, _) => Ok(Box::new(kept.into_iter()) as Addrs),
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn rule(s: &str) -> AllowRule {
        s.parse().unwrap()
    }

    #[test]
    fn address_classification() {
        let refused = [
            ("127.0.0.1", "loopback"),
            ("127.255.0.9", "loopback"),
            ("10.1.2.3", "private"),
            ("172.16.0.1", "private"),
            ("172.31.255.255", "private"),
            ("192.168.1.1", "private"),
            ("100.64.0.1", "shared (CGNAT)"),
            ("100.127.255.254", "shared (CGNAT)"),
            ("100.100.100.200", "shared (CGNAT)"),
            ("169.254.169.254", "link-local"),
            ("169.254.0.1", "link-local"),
            ("0.0.0.0", "unspecified"),
            ("0.1.2.3", "unspecified"),
            ("255.255.255.255", "broadcast"),
            ("224.0.0.1", "multicast"),
            ("239.1.1.1", "multicast"),
            ("::1", "loopback"),
            ("::", "unspecified"),
            ("fe80::1", "link-local"),
            ("febf::1", "link-local"),
            ("fec0::1", "site-local"),
            ("fc00::1", "unique-local"),
            ("fd00:ec2::254", "unique-local"),
            ("ff02::1", "multicast"),
            ("::ffff:127.0.0.1", "loopback"),
            ("::ffff:169.254.169.254", "link-local"),
            ("::ffff:10.0.0.1", "private"),
            ("::ffff:100.64.1.1", "shared (CGNAT)"),
            ("64:ff9b::7f00:1", "loopback"),
            ("64:ff9b::a9fe:a9fe", "link-local"),
            ("192.0.0.1", "protocol-assignment"),
            ("192.0.0.170", "protocol-assignment"),
            ("198.18.0.1", "benchmarking"),
            ("198.19.255.255", "benchmarking"),
            ("240.0.0.1", "reserved"),
            ("250.1.2.3", "reserved"),
            ("2002:7f00:1::1", "6to4"),
            ("2002:808:808::1", "6to4"),
            ("64:ff9b:1::a00:1", "local NAT64"),
            ("::127.0.0.1", "IPv4-compatible"),
            ("::8.8.8.8", "IPv4-compatible"),
        ];
        for (addr, class) in refused {
            assert_eq!(refused_class(ip(addr)), Some(class), "{addr}");
        }
        let allowed = [
            "8.8.8.8",
            "1.1.1.1",
            "100.63.255.255",
            "100.128.0.0",
            "172.15.255.255",
            "172.32.0.0",
            "169.253.255.255",
            "192.169.0.1",
            "93.184.216.34",
            "2606:4700:4700::1111",
            "2001:db8::1",
            "::ffff:8.8.8.8",
            "64:ff9b::808:808",
            "192.0.1.1",
            "198.17.255.255",
            "198.20.0.0",
            "223.255.255.255",
            "2003::1",
            "64:ff9b:2::1",
        ];
        for addr in allowed {
            assert_eq!(refused_class(ip(addr)), None, "{addr}");
        }
    }

    #[test]
    fn allow_rules_parse() {
        assert_eq!(rule("127.0.0.1").to_string(), "127.0.0.1/32");
        assert_eq!(rule(" 10.1.2.3/8 ").to_string(), "10.0.0.0/8");
        assert_eq!(rule("::1").to_string(), "::1/128");
        assert_eq!(rule("[::1]").to_string(), "::1/128");
        assert_eq!(rule("fd00::/8").to_string(), "fd00::/8");
        assert_eq!(rule("LocalHost.").to_string(), "localhost");
        assert_eq!(
            rule("hooks.internal-1.example").to_string(),
            "hooks.internal-1.example"
        );
        for bad in [
            "",
            "10.0.0.0/33",
            "a b",
            "http://x",
            "x..y",
            "x:80",
            "*.example",
        ] {
            assert!(bad.parse::<AllowRule>().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn allow_rules_lift_refusals() {
        let rules = AddressRules::new(&[rule("10.0.0.0/8"), rule("::1"), rule("Localhost")]);
        assert_eq!(rules.refusal(ip("10.9.8.7")), None);
        assert_eq!(
            rules.refusal(ip("::ffff:10.9.8.7")),
            None,
            "mapped form too"
        );
        assert_eq!(rules.refusal(ip("::1")), None);
        assert_eq!(rules.refusal(ip("127.0.0.1")), Some("loopback"));
        assert_eq!(rules.refusal(ip("192.168.0.1")), Some("private"));
        assert_eq!(rules.refusal(ip("8.8.8.8")), None);
        assert!(rules.host_allowed("localhost"));
        assert!(rules.host_allowed("LOCALHOST."));
        assert!(!rules.host_allowed("sub.localhost"));
        assert!(!rules.host_allowed("localhost.example"));
    }

    #[test]
    fn an_allowed_name_may_resolve_to_internal_networks_only() {
        let rules = AddressRules::new(&[rule("receiver"), rule("169.254.10.0/24")]);
        for internal in [
            "10.1.2.3",
            "127.0.0.1",
            "192.168.5.5",
            "fd00::5",
            "::ffff:10.0.0.1",
        ] {
            assert_eq!(
                rules.refusal_for("receiver", ip(internal)),
                None,
                "{internal}"
            );
            assert!(
                rules.refusal_for("other", ip(internal)).is_some(),
                "{internal}"
            );
        }
        for never in [
            ("169.254.169.254", "link-local"),
            ("fe80::1", "link-local"),
            ("0.0.0.0", "unspecified"),
            ("224.0.0.1", "multicast"),
            ("240.0.0.1", "reserved"),
            ("2002:7f00:1::1", "6to4"),
            ("::127.0.0.1", "IPv4-compatible"),
        ] {
            assert_eq!(
                rules.refusal_for("receiver", ip(never.0)),
                Some(never.1),
                "{never:?}"
            );
        }
        // A network rule still lifts any class, for any name.
        assert_eq!(rules.refusal_for("other", ip("169.254.10.9")), None);
    }
}
