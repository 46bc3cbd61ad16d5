//! Many ping targets behind a veth pair, for the latency tests and benchmark.
//!
//! A pinger namespace and a target namespace are joined by a veth pair with IPv4 and IPv6
//! addresses and permanent neighbour entries. The target namespace holds any number of
//! addresses on its loopback interface, all answering at once, plus prefixes that answer with
//! an ICMP error (an `unreachable` route) or not at all (a `blackhole` route). (Loopback
//! rather than a dummy interface: the test machines' kernels have no dummy driver, and the
//! answer is the same: the namespace's own stack replies at once.)

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use crate::{unique_name, NetNs};

/// IPv4 targets live in 10.77.0.0/16.
const V4_TARGETS: [u8; 2] = [10, 77];
/// A prefix the target namespace answers with "host unreachable".
pub const V4_UNREACHABLE: Ipv4Addr = Ipv4Addr::new(10, 78, 0, 5);
/// A prefix the target namespace drops silently.
pub const V4_SILENT: Ipv4Addr = Ipv4Addr::new(10, 79, 0, 5);
/// IPv6 counterpart of [`V4_UNREACHABLE`].
pub const V6_UNREACHABLE: Ipv6Addr = Ipv6Addr::new(0xfd78, 0, 0, 0, 0, 0, 0, 5);
/// IPv6 counterpart of [`V4_SILENT`].
pub const V6_SILENT: Ipv6Addr = Ipv6Addr::new(0xfd79, 0, 0, 0, 0, 0, 0, 5);

/// Two namespaces, a veth pair between them, and addresses that answer pings.
pub struct TargetNet {
    /// Where the pinger runs.
    pub pinger: NetNs,
    /// Where the targets are.
    pub target: NetNs,
    /// The pinger's end of the veth pair: the stand-in for the mesh interface.
    pub link: String,
    /// The target's end of the veth pair.
    pub target_link: String,
    /// Addresses on the target's loopback interface, IPv4 first then IPv6.
    pub addresses: Vec<IpAddr>,
}

impl TargetNet {
    /// Creates the namespaces with `v4` IPv4 and `v6` IPv6 target addresses.
    pub fn new(v4: usize, v6: usize) -> io::Result<Self> {
        let pinger = NetNs::new("plp")?;
        let target = NetNs::new("plt")?;
        let link = unique_name("vp");
        let target_link = unique_name("vt");
        connect(&pinger, &target, &link, &target_link)?;

        // The target forwards, so that its unreachable routes answer with ICMP errors, and
        // does not rate-limit those errors.
        for (key, value) in [
            ("ipv4/ip_forward", "1"),
            ("ipv6/conf/all/forwarding", "1"),
            ("ipv4/icmp_ratelimit", "0"),
            ("ipv4/icmp_msgs_per_sec", "1000000"),
            ("ipv6/icmp/ratelimit", "0"),
        ] {
            target.sysctl_net(key, value)?;
        }
        target.ip(&["route", "add", "unreachable", "10.78.0.0/16"])?;
        target.ip(&["route", "add", "blackhole", "10.79.0.0/16"])?;
        target.ip(&["-6", "route", "add", "unreachable", "fd78::/64"])?;
        target.ip(&["-6", "route", "add", "blackhole", "fd79::/64"])?;

        let dummy = "lo";
        let mut addresses = Vec::with_capacity(v4 + v6);
        let mut batch = String::new();
        for i in 0..v4 {
            let i = u16::try_from(i + 1).expect("at most 65535 targets");
            let [hi, lo] = i.to_be_bytes();
            let a = Ipv4Addr::new(V4_TARGETS[0], V4_TARGETS[1], hi, lo);
            batch.push_str(&format!("addr add {a}/32 dev {dummy}\n"));
            addresses.push(IpAddr::V4(a));
        }
        for i in 0..v6 {
            let a = Ipv6Addr::new(
                0xfd77,
                0,
                0,
                0,
                0,
                0,
                0,
                u16::try_from(i + 1).expect("fits"),
            );
            batch.push_str(&format!("addr add {a}/128 dev {dummy} nodad\n"));
            addresses.push(IpAddr::V6(a));
        }
        if !batch.is_empty() {
            // One `ip` process for thousands of addresses instead of one each.
            let file = std::env::temp_dir().join(format!("{}.batch", unique_name("ipb")));
            std::fs::write(&file, batch)?;
            let result = target.ip(&["-batch", file.to_str().expect("UTF-8 temp dir")]);
            let _ = std::fs::remove_file(&file);
            result?;
        }
        Ok(Self {
            pinger,
            target,
            link,
            target_link,
            addresses,
        })
    }

    /// Deletes the veth pair, as when a mesh interface goes away.
    pub fn disconnect(&self) -> io::Result<()> {
        self.pinger.ip(&["link", "del", &self.link]).map(drop)
    }

    /// Creates the veth pair again under the same names, with its addresses and routes.
    pub fn reconnect(&self) -> io::Result<()> {
        connect(&self.pinger, &self.target, &self.link, &self.target_link)
    }

    /// Allows (`true`) or forbids unprivileged ICMP datagram sockets in the pinger's
    /// namespace, which decides the socket kind the pinger gets.
    pub fn allow_datagram_sockets(&self, allow: bool) -> io::Result<()> {
        let range = if allow { "0 2147483647" } else { "1 0" };
        self.pinger.sysctl_net("ipv4/ping_group_range", range)
    }
}

/// The veth pair between the namespaces, addressed, with neighbours and the pinger's routes.
fn connect(pinger: &NetNs, target: &NetNs, link: &str, peer: &str) -> io::Result<()> {
    run_ip(&[
        "link",
        "add",
        link,
        "address",
        "02:00:0a:ca:00:01",
        "netns",
        pinger.name(),
        "type",
        "veth",
        "peer",
        "name",
        peer,
        "address",
        "02:00:0a:ca:00:02",
        "netns",
        target.name(),
    ])?;
    for (ns, dev, me, other, mac) in [
        (pinger, link, "1", "2", "02:00:0a:ca:00:02"),
        (target, peer, "2", "1", "02:00:0a:ca:00:01"),
    ] {
        // No duplicate address detection: the addresses are usable at once.
        ns.sysctl_net(&format!("ipv6/conf/{dev}/accept_dad"), "0")?;
        ns.ip(&["addr", "add", &format!("10.202.0.{me}/24"), "dev", dev])?;
        ns.ip(&[
            "addr",
            "add",
            &format!("fd02::{me}/64"),
            "dev",
            dev,
            "nodad",
        ])?;
        for other_ip in [format!("10.202.0.{other}"), format!("fd02::{other}")] {
            ns.ip(&[
                "neigh",
                "replace",
                &other_ip,
                "lladdr",
                mac,
                "dev",
                dev,
                "nud",
                "permanent",
            ])?;
        }
        ns.ip(&["link", "set", dev, "up"])?;
    }
    for prefix in ["10.77.0.0/16", "10.78.0.0/16", "10.79.0.0/16"] {
        pinger.ip(&["route", "add", prefix, "via", "10.202.0.2", "dev", link])?;
    }
    for prefix in ["fd77::/64", "fd78::/64", "fd79::/64"] {
        pinger.ip(&["-6", "route", "add", prefix, "via", "fd02::2", "dev", link])?;
    }

    Ok(())
}

fn run_ip(args: &[&str]) -> io::Result<String> {
    crate::run("ip", args)
}
