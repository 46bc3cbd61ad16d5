//! Reading routing tables: which interfaces carry the default routes, and which of the
//! route lookups' answers are the underlay.

use std::collections::HashSet;

// Route flags from <linux/route.h>: a route must be up, and "reject" routes (unreachable,
// prohibit) carry no traffic.
const RTF_UP: u32 = 0x0001;
const RTF_REJECT: u32 = 0x0200;

/// `/proc/net/route`: a header line, then tab-separated `Iface Destination Gateway Flags
/// RefCnt Use Metric Mask ...` with hexadecimal destination, flags and mask.
fn ipv4_default_interfaces(text: &str) -> Vec<String> {
    text.lines()
        .skip(1)
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let (iface, destination, flags, mask) = (
                fields.first()?,
                fields.get(1)?,
                fields.get(3)?,
                fields.get(7)?,
            );
            let flags = u32::from_str_radix(flags, 16).ok()?;
            let is_default = u32::from_str_radix(destination, 16).ok()? == 0
                && u32::from_str_radix(mask, 16).ok()? == 0;
            (is_default && flags & RTF_UP != 0 && flags & RTF_REJECT == 0)
                .then(|| (*iface).to_owned())
        })
        .collect()
}

/// `/proc/net/ipv6_route`: no header; space-separated `dest dest_len src src_len next_hop
/// metric refcnt use flags iface`, all hexadecimal except the interface name.
fn ipv6_default_interfaces(text: &str) -> Vec<String> {
    text.lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            if fields.len() < 10 {
                return None;
            }
            let is_default = fields[0].bytes().all(|b| b == b'0')
                && u8::from_str_radix(fields[1], 16).ok()? == 0;
            let flags = u32::from_str_radix(fields[8], 16).ok()?;
            (is_default && flags & RTF_UP != 0 && flags & RTF_REJECT == 0)
                .then(|| fields[9].to_owned())
        })
        .collect()
}

/// The interfaces of the default routes in the texts of `/proc/net/route` and
/// `/proc/net/ipv6_route`: IPv4 first, without duplicates and without `lo`.
pub fn default_route_interfaces(route: &str, ipv6_route: &str) -> Vec<String> {
    let mut names = ipv4_default_interfaces(route);
    names.extend(ipv6_default_interfaces(ipv6_route));
    let mut seen = HashSet::new();
    names.retain(|name| name != "lo" && seen.insert(name.clone()));
    names
}

/// The distinct interfaces of the route lookups, in the order first seen, without the
/// tunnels themselves (a route through the tunnel means the lookup missed WireGuard's own
/// routing) and without `lo` (a peer on this very host sends nothing over the underlay).
pub fn underlay_of_lookups(lookups: Vec<Option<String>>, tunnels: &[&str]) -> Vec<String> {
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
    use proptest::prelude::*;

    use super::*;

    const ROUTE: &str = "\
Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT
eth0\t00000000\t0102A8C0\t0003\t0\t0\t100\t00000000\t0\t0\t0
eth0\t0002A8C0\t00000000\t0001\t0\t0\t100\t00FFFFFF\t0\t0\t0
wg0\t0000640A\t00000000\t0001\t0\t0\t0\t0000FFFF\t0\t0\t0
eth1\t00000000\t0101A8C0\t0003\t0\t0\t200\t00000000\t0\t0\t0
down0\t00000000\t0103A8C0\t0002\t0\t0\t300\t00000000\t0\t0\t0
";

    const IPV6_ROUTE: &str = "\
fe800000000000000000000000000000 40 00000000000000000000000000000000 00 00000000000000000000000000000000 00000100 00000001 00000000 00000001     eth0
00000000000000000000000000000000 00 00000000000000000000000000000000 00 fe800000000000000000000000000001 00000400 00000001 00000000 00000003     eth2
00000000000000000000000000000000 00 00000000000000000000000000000000 00 fe800000000000000000000000000001 00000400 00000001 00000000 00000003     eth0
00000000000000000000000000000001 80 00000000000000000000000000000000 00 00000000000000000000000000000000 00000000 00000003 00000000 80200001       lo
00000000000000000000000000000000 00 00000000000000000000000000000000 00 00000000000000000000000000000000 ffffffff 00000001 00000000 00200200       lo
";

    #[test]
    fn ipv4_default_routes_that_are_up() {
        assert_eq!(ipv4_default_interfaces(ROUTE), ["eth0", "eth1"]);
    }

    #[test]
    fn ipv4_header_only_has_none() {
        assert!(ipv4_default_interfaces(ROUTE.lines().next().unwrap()).is_empty());
    }

    #[test]
    fn ipv6_default_routes_skip_prefixes_and_reject_routes() {
        assert_eq!(ipv6_default_interfaces(IPV6_ROUTE), ["eth2", "eth0"]);
    }

    #[test]
    fn garbage_lines_are_ignored() {
        assert!(ipv4_default_interfaces("Iface\nnot a route\n\n").is_empty());
        assert!(ipv6_default_interfaces("short line\nzz 00 a b c d e f g h\n").is_empty());
    }

    #[test]
    fn both_tables_merged_in_order_without_duplicates_or_lo() {
        assert_eq!(
            default_route_interfaces(ROUTE, IPV6_ROUTE),
            ["eth0", "eth1", "eth2"]
        );
        assert_eq!(default_route_interfaces(ROUTE, ""), ["eth0", "eth1"]);
    }

    fn some(names: &[&str]) -> Vec<Option<String>> {
        names.iter().map(|n| Some((*n).to_owned())).collect()
    }

    #[test]
    fn distinct_interfaces_in_order_without_tunnels_or_lo() {
        let mut lookups = some(&["eth1", "eth0", "eth1", "wg0", "lo"]);
        lookups.push(None);
        assert_eq!(underlay_of_lookups(lookups, &["wg0"]), ["eth1", "eth0"]);
        assert!(underlay_of_lookups(vec![None, None], &[]).is_empty());
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(5_000))]
        // The tables come from the kernel, but a container may mount anything there.
        #[test]
        fn any_text_gives_distinct_names_without_lo(
            route in "(\\PC{0,40}\n){0,6}",
            ipv6_route in "([0-9a-f ]{0,60}(lo|eth0|wg0)?\n){0,6}",
        ) {
            let names = default_route_interfaces(&route, &ipv6_route);
            let unique: HashSet<&String> = names.iter().collect();
            prop_assert_eq!(unique.len(), names.len());
            prop_assert!(names.iter().all(|n| n != "lo" && !n.is_empty()));
        }
    }
}
