//! Which interfaces WireGuard's encrypted packets cross: the routes to the peers' endpoints.
//!
//! Each endpoint is looked up as `ip route get ADDR mark FWMARK` does, with the device's
//! firewall mark, because that is how WireGuard routes its own packets: with wg-quick's
//! policy routing, a lookup without the mark would answer with the tunnel itself.

use std::io;
use std::net::IpAddr;
use std::path::Path;

use netlink_packet_core::{NetlinkMessage, NetlinkPayload};
use netlink_packet_route::route::{RouteAddress, RouteAttribute, RouteMessage};
use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};
use netlink_sys::protocols::NETLINK_ROUTE;

use crate::accounting::routes;
use crate::source::ebpf::EbpfError;
use crate::source::netlink::{header, NetlinkError, NetlinkSocket};
use crate::source::wireguard::Device;

/// `RTM_GETROUTE` from <linux/rtnetlink.h>.
const RTM_GETROUTE: u16 = 26;

/// Why the underlay interfaces could not be found.
#[derive(Debug, thiserror::Error)]
pub enum UnderlayError {
    /// A route lookup failed for another reason than "no route".
    #[error("cannot look up the route to {addr}: {source}; set metrics.ebpf.interfaces")]
    Route {
        /// The endpoint address.
        addr: IpAddr,
        /// What the kernel said.
        source: NetlinkError,
    },
    /// No peer has a routable endpoint and there is no default route either.
    #[error(transparent)]
    NoDefault(#[from] EbpfError),
}

/// The interface the kernel would send a packet for `addr` through, with firewall mark
/// `mark` (0 for none); `None` when there is no route.
pub fn route_interface(addr: IpAddr, mark: u32) -> Result<Option<String>, NetlinkError> {
    let mut socket = NetlinkSocket::open(NETLINK_ROUTE)?;
    let replies = socket.request(
        NetlinkMessage::new(
            header(RTM_GETROUTE, 0),
            NetlinkPayload::InnerMessage(RouteNetlinkMessage::GetRoute(route_query(addr, mark))),
        ),
        "the route lookup",
    );
    let replies = match replies {
        Ok(r) => r,
        Err(e)
            if matches!(
                e.errno(),
                Some(
                    libc::ENETUNREACH
                        | libc::EHOSTUNREACH
                        | libc::EINVAL
                        | libc::EACCES
                        | libc::EPERM
                )
            ) =>
        {
            // Unreachable, prohibited or blackholed: no packet leaves for it.
            return Ok(None);
        }
        Err(e) => return Err(e),
    };
    for raw in replies {
        let parsed =
            NetlinkMessage::<RouteNetlinkMessage>::deserialize(&raw.bytes).map_err(|e| {
                NetlinkError::Decode {
                    request: "the route lookup",
                    message: e.to_string(),
                }
            })?;
        if let NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewRoute(route)) = parsed.payload {
            if let Some(index) = output_interface(&route) {
                return Ok(nix::net::if_::if_indextoname(index)
                    .ok()
                    .and_then(|n| n.into_string().ok()));
            }
        }
    }
    Ok(None)
}

fn route_query(addr: IpAddr, mark: u32) -> RouteMessage {
    let mut query = RouteMessage::default();
    let (family, len) = match addr {
        IpAddr::V4(_) => (AddressFamily::Inet, 32),
        IpAddr::V6(_) => (AddressFamily::Inet6, 128),
    };
    query.header.address_family = family;
    query.header.destination_prefix_length = len;
    query
        .attributes
        .push(RouteAttribute::Destination(RouteAddress::from(addr)));
    if mark != 0 {
        query.attributes.push(RouteAttribute::Mark(mark));
    }
    query
}

fn output_interface(route: &RouteMessage) -> Option<u32> {
    route.attributes.iter().find_map(|a| match a {
        RouteAttribute::Oif(index) => Some(*index),
        _ => None,
    })
}

/// The interfaces that carry the devices' encrypted traffic: those of the routes to every
/// peer's endpoint, or, while no peer has one yet (a server waiting for its clients), those
/// of the default routes in `proc_root`.
pub fn underlay_interfaces(
    devices: &[Device],
    proc_root: &Path,
) -> Result<Vec<String>, UnderlayError> {
    let mut found = Vec::new();
    for device in devices {
        for peer in &device.peers {
            if let Some(endpoint) = peer.endpoint {
                let addr = endpoint.ip();
                let interface = route_interface(addr, device.fwmark)
                    .map_err(|source| UnderlayError::Route { addr, source })?;
                found.push(interface);
            }
        }
    }
    let tunnels: Vec<&str> = devices.iter().map(|d| d.name.as_str()).collect();
    let chosen = routes::underlay_of_lookups(found, &tunnels);
    if chosen.is_empty() {
        return Ok(default_route_interfaces(proc_root)?);
    }
    Ok(chosen)
}

/// Names of the interfaces that carry a default route, IPv4 first, without duplicates and
/// without `lo`.
///
/// Reads `<proc_root>/net/route` and `<proc_root>/net/ipv6_route` (the latter may be missing
/// when IPv6 is off). The agent attaches to these when `metrics.ebpf.interfaces` is empty,
/// because WireGuard's encrypted traffic leaves through them.
pub fn default_route_interfaces(proc_root: &Path) -> Result<Vec<String>, EbpfError> {
    let read = |name: &str| -> Result<String, EbpfError> {
        let path = proc_root.join("net").join(name);
        match std::fs::read_to_string(&path) {
            Ok(text) => Ok(text),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(String::new()),
            Err(source) => Err(EbpfError::RouteTable { path, source }),
        }
    };
    let names = routes::default_route_interfaces(&read("route")?, &read("ipv6_route")?);
    if names.is_empty() {
        return Err(EbpfError::NoDefaultRoute {
            proc_root: proc_root.to_owned(),
        });
    }
    Ok(names)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queries_carry_the_address_and_the_mark() {
        let q = route_query("192.0.2.1".parse().unwrap(), 0xca6c);
        assert_eq!(q.header.address_family, AddressFamily::Inet);
        assert_eq!(q.header.destination_prefix_length, 32);
        assert_eq!(
            q.attributes,
            [
                RouteAttribute::Destination(RouteAddress::Inet("192.0.2.1".parse().unwrap())),
                RouteAttribute::Mark(0xca6c)
            ]
        );
        let q = route_query("2001:db8::1".parse().unwrap(), 0);
        assert_eq!(q.header.address_family, AddressFamily::Inet6);
        assert_eq!(q.header.destination_prefix_length, 128);
        assert_eq!(q.attributes.len(), 1, "no mark attribute without a mark");
    }

    #[test]
    fn the_loopback_route_is_found_in_any_namespace() {
        // Every network namespace routes 127.0.0.1 through lo; no privilege is needed to ask.
        assert_eq!(
            route_interface("127.0.0.1".parse().unwrap(), 0)
                .unwrap()
                .as_deref(),
            Some("lo")
        );
    }

    #[test]
    fn without_endpoints_the_default_routes_are_used() {
        let dir = std::env::temp_dir().join(format!("plexd-underlay-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("net")).unwrap();
        std::fs::write(
            dir.join("net/route"),
            "Iface\tDestination\tGateway\tFlags\tRefCnt\tUse\tMetric\tMask\tMTU\tWindow\tIRTT\n\
             eth9\t00000000\t0102A8C0\t0003\t0\t0\t100\t00000000\t0\t0\t0\n",
        )
        .unwrap();
        assert_eq!(underlay_interfaces(&[], &dir).unwrap(), ["eth9"]);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    const ROUTE: &str = "\
Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT
eth0\t00000000\t0102A8C0\t0003\t0\t0\t100\t00000000\t0\t0\t0
eth1\t00000000\t0101A8C0\t0003\t0\t0\t200\t00000000\t0\t0\t0
";

    fn fixture(route: Option<&str>, ipv6_route: Option<&str>) -> std::path::PathBuf {
        use std::sync::atomic::{AtomicU32, Ordering};
        static N: AtomicU32 = AtomicU32::new(0);
        let root = std::env::temp_dir().join(format!(
            "plexd-metrics-proc-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let net = root.join("net");
        std::fs::create_dir_all(&net).unwrap();
        if let Some(text) = route {
            std::fs::write(net.join("route"), text).unwrap();
        }
        if let Some(text) = ipv6_route {
            std::fs::write(net.join("ipv6_route"), text).unwrap();
        }
        root
    }

    const IPV6_ROUTE: &str = "00000000000000000000000000000000 00 \
        00000000000000000000000000000000 00 fe800000000000000000000000000001 00000400 00000001 \
        00000000 00000003     eth2\n";

    #[test]
    fn both_tables_are_read() {
        let root = fixture(Some(ROUTE), Some(IPV6_ROUTE));
        assert_eq!(
            default_route_interfaces(&root).unwrap(),
            ["eth0", "eth1", "eth2"]
        );
        std::fs::remove_dir_all(root).unwrap();
    }

    #[test]
    fn missing_ipv6_table_is_fine() {
        let root = fixture(Some(ROUTE), None);
        assert_eq!(default_route_interfaces(&root).unwrap(), ["eth0", "eth1"]);
        std::fs::remove_dir_all(root).unwrap();
    }

    #[test]
    fn no_default_route_says_what_to_set() {
        let root = fixture(Some(ROUTE.lines().next().unwrap()), None);
        let err = default_route_interfaces(&root).unwrap_err();
        assert!(matches!(err, EbpfError::NoDefaultRoute { .. }));
        assert!(
            err.to_string().ends_with("set metrics.ebpf.interfaces"),
            "{err}"
        );
        std::fs::remove_dir_all(root).unwrap();
    }

    #[test]
    fn unreadable_table_names_the_file() {
        // A directory where the file should be: read_to_string fails with something other
        // than NotFound.
        let root = fixture(None, None);
        std::fs::create_dir_all(root.join("net").join("route")).unwrap();
        let err = default_route_interfaces(&root).unwrap_err();
        assert!(matches!(err, EbpfError::RouteTable { .. }), "{err:?}");
        assert!(err.to_string().contains("net/route"), "{err}");
        std::fs::remove_dir_all(root).unwrap();
    }
}
