//! Which interfaces WireGuard's encrypted packets cross: the routes to the peers' endpoints.
//!
//! Each endpoint is looked up as `ip route get ADDR mark FWMARK` does, with the device's
//! firewall mark, because that is how WireGuard routes its own packets: with wg-quick's
//! policy routing, a lookup without the mark would answer with the tunnel itself.

use std::collections::HashSet;
use std::net::IpAddr;
use std::path::Path;

use netlink_packet_core::{NetlinkMessage, NetlinkPayload};
use netlink_packet_route::route::{RouteAddress, RouteAttribute, RouteMessage};
use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};
use netlink_sys::protocols::NETLINK_ROUTE;

use crate::source::ebpf::{default_route_interfaces, EbpfError};
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
    let chosen = choose(found, &tunnels);
    if chosen.is_empty() {
        return Ok(default_route_interfaces(proc_root)?);
    }
    Ok(chosen)
}

/// The distinct interfaces of the lookups, in the order first seen, without the tunnels
/// themselves (a route through the tunnel means the lookup missed WireGuard's own routing)
/// and without `lo` (a peer on this very host sends nothing over the underlay).
fn choose(lookups: Vec<Option<String>>, tunnels: &[&str]) -> Vec<String> {
    let mut seen = HashSet::new();
    lookups
        .into_iter()
        .flatten()
        .filter(|name| name != "lo" && !tunnels.contains(&name.as_str()))
        .filter(|name| seen.insert(name.clone()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn some(names: &[&str]) -> Vec<Option<String>> {
        names.iter().map(|n| Some((*n).to_owned())).collect()
    }

    #[test]
    fn distinct_interfaces_in_order_without_tunnels_or_lo() {
        let mut lookups = some(&["eth1", "eth0", "eth1", "wg0", "lo"]);
        lookups.push(None);
        assert_eq!(choose(lookups, &["wg0"]), ["eth1", "eth0"]);
        assert!(choose(vec![None, None], &[]).is_empty());
    }

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
}
