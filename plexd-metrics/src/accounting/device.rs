//! The WireGuard devices and peers as plain data, whichever implementation reported them,
//! and the rules for comparing what they report with what the kernel programs see.

use std::collections::BTreeSet;
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::time::SystemTime;

use base64::Engine as _;

/// Which implementation runs a device.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Implementation {
    /// The Linux kernel module, read over generic netlink.
    Kernel,
    /// A userspace implementation (wireguard-go, boringtun), read over its UAPI socket.
    Userspace,
}

impl fmt::Display for Implementation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Kernel => "kernel",
            Self::Userspace => "userspace",
        })
    }
}

/// One WireGuard interface and its peers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Device {
    /// The interface name, e.g. `wg0`.
    pub name: String,
    /// Who runs it.
    pub implementation: Implementation,
    /// The UDP port it listens on; 0 when it has none yet.
    pub listen_port: u16,
    /// The firewall mark on its outgoing packets; 0 when none. The route to a peer's
    /// endpoint is looked up with it, as the device's own packets are routed.
    pub fwmark: u32,
    /// Its peers, in the order the implementation lists them.
    pub peers: Vec<Peer>,
}

/// One peer of a [`Device`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Peer {
    /// The peer's public key, base64 as `wg` prints it.
    pub public_key: String,
    /// Where the peer's packets come from and go to; `None` until it is known.
    pub endpoint: Option<SocketAddr>,
    /// The tunnel addresses routed to the peer.
    pub allowed_ips: Vec<AllowedIp>,
    /// When the last handshake with the peer completed; `None` if none ever did.
    pub last_handshake: Option<SystemTime>,
    /// Bytes received from the peer, as the device counts them (cumulative).
    pub rx_bytes: u64,
    /// Bytes sent to the peer, as the device counts them (cumulative).
    pub tx_bytes: u64,
    /// Persistent keepalive interval in seconds; `None` when off.
    pub persistent_keepalive: Option<u16>,
}

/// A network routed to a peer, e.g. `10.0.0.2/32`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct AllowedIp {
    /// The network address.
    pub addr: IpAddr,
    /// The prefix length.
    pub prefix_len: u8,
}

impl AllowedIp {
    /// Whether this entry names exactly one host (/32 or /128): a mesh address.
    pub fn is_single_host(&self) -> bool {
        match self.addr {
            IpAddr::V4(_) => self.prefix_len == 32,
            IpAddr::V6(_) => self.prefix_len == 128,
        }
    }
}

impl fmt::Display for AllowedIp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix_len)
    }
}

/// Encodes a 32-byte key as `wg` prints it.
pub fn key_to_base64(key: &[u8; 32]) -> String {
    base64::engine::general_purpose::STANDARD.encode(key)
}

/// Whether `text` is a WireGuard key as `wg` prints it: 32 bytes in standard base64.
pub fn is_base64_key(text: &str) -> bool {
    text.len() == 44
        && base64::engine::general_purpose::STANDARD
            .decode(text)
            .is_ok_and(|k| k.len() == 32)
}

/// The UDP ports the devices listen on, sorted, without duplicates and without 0: what the
/// kernel programs must watch.
pub fn listen_ports(devices: &[Device]) -> Vec<u16> {
    devices
        .iter()
        .map(|d| d.listen_port)
        .filter(|&p| p != 0)
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect()
}

/// The form endpoints are compared in: IPv4-mapped IPv6 addresses as IPv4, and no IPv6 flow
/// label or scope, which the kernel programs cannot see on the wire.
pub fn endpoint_key(addr: SocketAddr) -> SocketAddr {
    match addr {
        SocketAddr::V6(v6) => match v6.ip().to_ipv4_mapped() {
            Some(v4) => SocketAddr::new(IpAddr::V4(v4), v6.port()),
            None => SocketAddr::new(IpAddr::V6(*v6.ip()), v6.port()),
        },
        v4 => v4,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{Ipv6Addr, SocketAddrV6};

    fn device(port: u16) -> Device {
        Device {
            name: format!("wg{port}"),
            implementation: Implementation::Userspace,
            listen_port: port,
            fwmark: 0,
            peers: vec![],
        }
    }

    #[test]
    fn listen_ports_are_sorted_unique_and_nonzero() {
        let devices = [device(51821), device(0), device(51820), device(51821)];
        assert_eq!(listen_ports(&devices), [51820, 51821]);
        assert!(listen_ports(&[]).is_empty());
    }

    #[test]
    fn endpoints_compare_without_mapping_scope_or_flow() {
        let mapped: SocketAddr = "[::ffff:10.0.0.1]:51820".parse().unwrap();
        assert_eq!(endpoint_key(mapped), "10.0.0.1:51820".parse().unwrap());
        let scoped = SocketAddr::V6(SocketAddrV6::new(
            "fe80::1".parse::<Ipv6Addr>().unwrap(),
            51820,
            7,
            3,
        ));
        assert_eq!(endpoint_key(scoped), "[fe80::1]:51820".parse().unwrap());
        let v4: SocketAddr = "192.0.2.1:1".parse().unwrap();
        assert_eq!(endpoint_key(v4), v4);
    }

    #[test]
    fn keys_are_recognised() {
        let key = key_to_base64(&[7; 32]);
        assert_eq!(key.len(), 44);
        assert!(is_base64_key(&key));
        assert!(!is_base64_key("not a key"));
        assert!(!is_base64_key(&key[..43]));
        // 33 bytes encode to 44 characters too, without padding.
        assert!(!is_base64_key(
            &base64::engine::general_purpose::STANDARD.encode([1u8; 33])[..44]
        ));
    }

    #[test]
    fn allowed_ips_print_like_wg() {
        let ip = AllowedIp {
            addr: "10.0.0.0".parse().unwrap(),
            prefix_len: 24,
        };
        assert_eq!(ip.to_string(), "10.0.0.0/24");
    }
}
