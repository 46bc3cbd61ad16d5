//! The WireGuard devices of this network namespace, as their implementations report them.
//!
//! Kernel WireGuard answers over generic netlink ([`kernel`]); userspace implementations
//! (wireguard-go, boringtun) over their UAPI socket in `/var/run/wireguard` ([`uapi`]). Both
//! yield the same plain [`Device`] structs, and [`DeviceSource`] hides which one was asked, so
//! the tunnel join is tested with fakes.

pub mod kernel;
pub mod uapi;

use std::collections::BTreeSet;
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use base64::Engine as _;
use tracing::{debug, warn};

use crate::source::netlink::NetlinkError;

/// Where wireguard-go and boringtun put their UAPI sockets by default.
pub const DEFAULT_SOCKET_DIR: &str = "/var/run/wireguard";

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

/// Why WireGuard device state could not be read.
#[derive(Debug, thiserror::Error)]
pub enum WireGuardError {
    /// The UAPI socket directory could not be listed.
    #[error(
        "cannot list the WireGuard UAPI sockets in {}: {source}; \
         set metrics.wireguard.socket_dir",
        dir.display()
    )]
    SocketDir {
        /// The directory.
        dir: PathBuf,
        /// What the OS said.
        source: std::io::Error,
    },
    /// A userspace device's UAPI socket could not be used.
    #[error("cannot read WireGuard device {device} over {}: {source}", socket.display())]
    Uapi {
        /// The interface.
        device: String,
        /// The socket.
        socket: PathBuf,
        /// What went wrong.
        source: uapi::UapiError,
    },
    /// The kernel's WireGuard devices could not be read.
    #[error("cannot read kernel WireGuard devices: {0}")]
    Kernel(#[from] NetlinkError),
    /// A kernel device dump could not be decoded.
    #[error("cannot decode the kernel's dump of WireGuard device {device}: {message}")]
    Decode {
        /// The interface.
        device: String,
        /// What was wrong.
        message: String,
    },
    /// A configured interface is neither a kernel device nor has a UAPI socket.
    #[error(
        "WireGuard interface {device} not found: no kernel WireGuard device of that name in this \
         network namespace and no UAPI socket {}; check metrics.wireguard.interfaces",
        socket.display()
    )]
    NotFound {
        /// The configured name.
        device: String,
        /// Where its UAPI socket was looked for.
        socket: PathBuf,
    },
    /// Every configured or found device failed to read.
    #[error("{}", .0.iter().map(ToString::to_string).collect::<Vec<_>>().join("; "))]
    All(Vec<WireGuardError>),
}

/// Reads the state of WireGuard devices: the seam between the real implementations and the
/// tunnel join.
pub trait DeviceSource: Send + Sync {
    /// Every device's current state. Blocking: call it from a blocking-capable thread.
    fn read_devices(&self) -> Result<Vec<Device>, WireGuardError>;
}

/// The devices of the calling thread's network namespace: kernel ones over netlink and
/// userspace ones over their UAPI sockets, all of them or only the configured ones.
#[derive(Clone, Debug)]
pub struct SystemDevices {
    interfaces: Vec<String>,
    socket_dir: PathBuf,
}

impl SystemDevices {
    /// Reads `interfaces`, or every device found when it is empty; UAPI sockets are looked
    /// for in `socket_dir`.
    pub fn new(interfaces: Vec<String>, socket_dir: impl Into<PathBuf>) -> Self {
        Self {
            interfaces,
            socket_dir: socket_dir.into(),
        }
    }

    fn read_userspace(&self, name: &str) -> Result<Device, WireGuardError> {
        let socket = uapi::socket_path(&self.socket_dir, name);
        uapi::read_device(name, &socket).map_err(|source| {
            if source.is_stale_socket() && !socket.exists() {
                WireGuardError::NotFound {
                    device: name.to_owned(),
                    socket,
                }
            } else {
                WireGuardError::Uapi {
                    device: name.to_owned(),
                    socket,
                    source,
                }
            }
        })
    }
}

impl DeviceSource for SystemDevices {
    fn read_devices(&self) -> Result<Vec<Device>, WireGuardError> {
        let mut devices = Vec::new();
        let mut problems = Vec::new();
        // Without kernel WireGuard (or without a usable netlink socket) the userspace
        // devices are still read.
        let (mut kernel, kernel_names) = match kernel::KernelClient::connect().and_then(|client| {
            let names = match client {
                Some(_) => kernel::device_names()?,
                None => Vec::new(),
            };
            Ok((client, names))
        }) {
            Ok(found) => found,
            Err(e) => {
                problems.push(e);
                (None, Vec::new())
            }
        };
        let wanted: Vec<String> = if self.interfaces.is_empty() {
            let mut all = kernel_names.clone();
            for name in uapi::socket_names(&self.socket_dir)? {
                if !kernel_names.contains(&name) && interface_exists(&name) {
                    all.push(name);
                }
            }
            all
        } else {
            self.interfaces.clone()
        };
        for name in &wanted {
            let read = match kernel.as_mut() {
                Some(client) if kernel_names.contains(name) => client.device(name),
                _ => self.read_userspace(name),
            };
            match read {
                Ok(d) => devices.push(d),
                // A socket nobody listens on is what a killed wireguard-go leaves behind
                // for a moment, until its interface is gone too.
                Err(WireGuardError::Uapi { ref source, .. })
                    if self.interfaces.is_empty() && source.is_stale_socket() =>
                {
                    debug!(component = "metrics", device = %name, "skipping stale WireGuard UAPI socket");
                }
                Err(e) => problems.push(e),
            }
        }
        if devices.is_empty() && !problems.is_empty() {
            return Err(if problems.len() == 1 {
                problems.remove(0)
            } else {
                WireGuardError::All(problems)
            });
        }
        // The devices that could be read are still worth reporting.
        for problem in problems {
            warn!(component = "metrics", error = %problem, "WireGuard device skipped this cycle");
        }
        Ok(devices)
    }
}

/// Whether `name` is an interface of the calling thread's network namespace.
fn interface_exists(name: &str) -> bool {
    nix::net::if_::if_nametoindex(name).is_ok()
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

/// The default UAPI socket directory as a path.
pub fn default_socket_dir() -> &'static Path {
    Path::new(DEFAULT_SOCKET_DIR)
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
    fn a_configured_device_that_is_nowhere_is_named_with_the_setting() {
        let dir = std::env::temp_dir().join(format!("plexd-wg-none-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let err = SystemDevices::new(vec!["wgnope0".into()], &dir)
            .read_devices()
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            format!(
                "WireGuard interface wgnope0 not found: no kernel WireGuard device of that name in \
                 this network namespace and no UAPI socket {}/wgnope0.sock; check \
                 metrics.wireguard.interfaces",
                dir.display()
            )
        );
        // Without configured names, no device is no error; an empty socket directory adds
        // no userspace device (a machine with kernel WireGuard may still list its own).
        let found = SystemDevices::new(vec![], &dir).read_devices().unwrap();
        assert!(found
            .iter()
            .all(|d| d.implementation == Implementation::Kernel));
        std::fs::remove_dir_all(&dir).unwrap();
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
