//! Kernel WireGuard between network namespaces, joined pairwise by veths, with netem on the
//! underlay. Only the VM's kernels have the modules (`cargo xtask integration-test vm`).
//!
//! ```text
//!  node 0 ──veth── node 1          node i: tunnel 10.240.0.(i+1), listens on 51820 + i
//!     └────veth── node 2 ──┘       link (i, j), i < j: 10.241.L.(1 for i, 2 for j)
//! ```
//!
//! Every node knows every other one as a peer whose endpoint is that node's end of their
//! link. Each link has its own subnet, so a node's traffic to a peer leaves on that link's
//! veth alone and netem on it touches that peer's packets only.

use std::io;
use std::net::Ipv4Addr;

use crate::wireguard::KeyPair;
use crate::{run, unique_name, NetNs};

/// The first listen port; node `i` listens on `BASE_PORT + i`.
pub const BASE_PORT: u16 = 51820;

/// One node: a namespace with a kernel WireGuard interface.
pub struct KernelNode {
    /// Its namespace (dropped last, taking the interfaces with it).
    pub ns: NetNs,
    /// The WireGuard interface's name (unique on the machine, so logs tell nodes apart).
    pub wg: String,
    /// Its key pair.
    pub keys: KeyPair,
    /// Its address inside the tunnel.
    pub tunnel: Ipv4Addr,
    /// Its listen port.
    pub listen_port: u16,
}

impl KernelNode {
    /// Runs `wg <args>` in the node's namespace.
    pub fn wg(&self, args: &[&str]) -> io::Result<String> {
        self.ns.exec("wg", args)
    }

    /// `wg show <dev> dump`: the interface line, then one line per peer (kernel WireGuard
    /// answers it over generic netlink).
    pub fn dump(&self) -> io::Result<String> {
        self.wg(&["show", &self.wg, "dump"])
    }
}

/// One veth between two nodes.
#[derive(Clone, Debug)]
pub struct Link {
    /// The lower node index.
    pub a: usize,
    /// The higher node index.
    pub b: usize,
    /// The veth in node `a`.
    pub a_dev: String,
    /// The veth in node `b`.
    pub b_dev: String,
    /// Node `a`'s address on the link.
    pub a_addr: Ipv4Addr,
    /// Node `b`'s address on the link.
    pub b_addr: Ipv4Addr,
}

/// Kernel WireGuard nodes, each pair joined by a veth.
pub struct KernelMesh {
    /// The nodes.
    pub nodes: Vec<KernelNode>,
    /// The links, one per pair of nodes.
    pub links: Vec<Link>,
    /// Node 0 is in a namespace that outlives the mesh (see [`KernelMesh::with_first_in`]).
    first_shared: bool,
}

impl KernelMesh {
    /// Builds `n` nodes (2 to 20) that all know each other, with no persistent keepalive, so
    /// that only the tests' own traffic crosses the links. No handshake has happened yet.
    pub fn new(n: usize) -> io::Result<Self> {
        Self::build(n, None)
    }

    /// Like [`KernelMesh::new`], with node 0 in `first`, a namespace the mesh does not own
    /// (such as [`NetNs::of_init`], where a systemd unit runs): its WireGuard interface is
    /// deleted on drop, its veths go with the other nodes' namespaces.
    pub fn with_first_in(first: NetNs, n: usize) -> io::Result<Self> {
        Self::build(n, Some(first))
    }

    fn build(n: usize, mut first: Option<NetNs>) -> io::Result<Self> {
        assert!((2..=20).contains(&n), "2 to 20 nodes");
        let first_shared = first.is_some();
        let mut nodes: Vec<KernelNode> = Vec::with_capacity(n);
        for i in 0..n {
            let ns = match first.take() {
                Some(ns) => ns,
                None => NetNs::new("pkn")?,
            };
            // No router solicitations or DAD on the links: a count must see only the tests'.
            ns.disable_ipv6()?;
            let wg = unique_name("wgk");
            ns.ip(&["link", "add", &wg, "type", "wireguard"])?;
            let keys = KeyPair::generate()?;
            let listen_port = BASE_PORT + i as u16;
            let key_file = std::env::temp_dir().join(format!("plexd-{wg}-key"));
            std::fs::write(&key_file, &keys.private)?;
            let set = ns.exec(
                "wg",
                &[
                    "set",
                    &wg,
                    "private-key",
                    &key_file.display().to_string(),
                    "listen-port",
                    &listen_port.to_string(),
                ],
            );
            let _ = std::fs::remove_file(&key_file);
            set?;
            let tunnel = Ipv4Addr::new(10, 240, 0, i as u8 + 1);
            ns.ip(&["addr", "add", &format!("{tunnel}/24"), "dev", &wg])?;
            ns.ip(&["link", "set", &wg, "up"])?;
            nodes.push(KernelNode {
                ns,
                wg,
                keys,
                tunnel,
                listen_port,
            });
        }
        let mut links = Vec::new();
        for a in 0..n {
            for b in a + 1..n {
                links.push(Self::link(&nodes, a, b, links.len() as u8)?);
            }
        }
        let mesh = Self {
            nodes,
            links,
            first_shared,
        };
        for i in 0..n {
            for j in (0..n).filter(|&j| j != i) {
                let endpoint = format!("{}:{}", mesh.addr_of(j, i), mesh.nodes[j].listen_port);
                let allowed = format!("{}/32", mesh.nodes[j].tunnel);
                mesh.nodes[i].wg(&[
                    "set",
                    &mesh.nodes[i].wg,
                    "peer",
                    &mesh.nodes[j].keys.public,
                    "endpoint",
                    &endpoint,
                    "allowed-ips",
                    &allowed,
                ])?;
            }
        }
        Ok(mesh)
    }

    fn link(nodes: &[KernelNode], a: usize, b: usize, index: u8) -> io::Result<Link> {
        let link = Link {
            a,
            b,
            a_dev: unique_name("vk"),
            b_dev: unique_name("vk"),
            a_addr: Ipv4Addr::new(10, 241, index, 1),
            b_addr: Ipv4Addr::new(10, 241, index, 2),
        };
        run(
            "ip",
            &[
                "link",
                "add",
                &link.a_dev,
                "netns",
                nodes[a].ns.name(),
                "type",
                "veth",
                "peer",
                "name",
                &link.b_dev,
                "netns",
                nodes[b].ns.name(),
            ],
        )?;
        for (node, dev, addr) in [
            (&nodes[a], &link.a_dev, link.a_addr),
            (&nodes[b], &link.b_dev, link.b_addr),
        ] {
            node.ns
                .ip(&["addr", "add", &format!("{addr}/24"), "dev", dev])?;
            node.ns.ip(&["link", "set", dev, "up"])?;
        }
        Ok(link)
    }

    /// The link between nodes `i` and `j`.
    pub fn link_between(&self, i: usize, j: usize) -> &Link {
        let (a, b) = (i.min(j), i.max(j));
        self.links
            .iter()
            .find(|l| l.a == a && l.b == b)
            .expect("every pair of nodes has a link")
    }

    /// Node `i`'s address on its link to node `other`.
    pub fn addr_of(&self, i: usize, other: usize) -> Ipv4Addr {
        let link = self.link_between(i, other);
        if link.a == i {
            link.a_addr
        } else {
            link.b_addr
        }
    }

    /// Node `i`'s veth on its link to node `other`.
    pub fn dev_of(&self, i: usize, other: usize) -> &str {
        let link = self.link_between(i, other);
        if link.a == i {
            &link.a_dev
        } else {
            &link.b_dev
        }
    }

    /// Pings node `to`'s tunnel address from node `from`, `interval` seconds apart, until
    /// `count` echoes are answered (unanswered ones are made up for by more, within a
    /// deadline). Returns the answers received.
    pub fn ping(&self, from: usize, to: usize, count: u32, interval: &str) -> io::Result<u32> {
        // iputils' ping waits only two round trips for the last replies once any reply has
        // come (`-W` applies only while none has), so under TCG a late reply counted as
        // lost; with a deadline (`-w`: twice the sending time plus 10 s) it sends until
        // `count` echoes are answered.
        let seconds: f64 = interval
            .parse()
            .map_err(|_| io::Error::other(format!("bad ping interval {interval:?}")))?;
        let deadline = ((f64::from(count) * seconds * 2.0).ceil() as u64 + 10).to_string();
        let out = self.nodes[from].ns.exec(
            "ping",
            &[
                "-q",
                "-n",
                "-c",
                &count.to_string(),
                "-i",
                interval,
                "-w",
                &deadline,
                &self.nodes[to].tunnel.to_string(),
            ],
        );
        // ping exits 1 when some echoes went unanswered; its summary still counts them.
        let text = match out {
            Ok(text) => text,
            Err(e) => e.to_string(),
        };
        text.lines()
            .find_map(|l| {
                let received = l.split(", ").nth(1)?;
                received.strip_suffix(" received")?.parse().ok()
            })
            .ok_or_else(|| io::Error::other(format!("unexpected ping output: {text}")))
    }
}

impl Drop for KernelMesh {
    fn drop(&mut self) {
        if self.first_shared {
            let node = &self.nodes[0];
            if let Err(e) = node.ns.ip(&["link", "del", &node.wg]) {
                eprintln!("warning: cannot delete {}: {e}", node.wg);
            }
        }
    }
}

/// A netem qdisc on one veth (in the namespace that sends through it); removed on drop.
pub struct Netem<'a> {
    ns: &'a NetNs,
    dev: String,
    /// The netem qdisc's handle, to read its counters and change it.
    handle: &'static str,
    /// `parent ...` of the netem qdisc, for `tc qdisc change`.
    parent: Vec<&'static str>,
}

/// What netem counted: packets it let through and packets it dropped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NetemStats {
    /// Packets sent on (after any delay).
    pub sent: u64,
    /// Packets netem dropped.
    pub dropped: u64,
}

impl<'a> Netem<'a> {
    /// Delays every packet leaving `dev` by `delay` with `jitter` (e.g. `20ms`, `2ms`).
    pub fn delay(ns: &'a NetNs, dev: &str, delay: &str, jitter: &str) -> io::Result<Self> {
        ns.exec(
            "tc",
            &[
                "qdisc", "add", "dev", dev, "root", "handle", "1:", "netem", "delay", delay, jitter,
            ],
        )?;
        Ok(Self {
            ns,
            dev: dev.to_owned(),
            handle: "1:",
            parent: vec!["root"],
        })
    }

    /// Drops `percent` % of the WireGuard transport messages (type 4) leaving `dev` for UDP
    /// port `port`, and nothing else: a prio qdisc whose third band holds the netem, and a u32
    /// filter that sends those messages there. Handshakes never meet the loss, so netem's drop
    /// count is exactly the transport messages a receiver can miss.
    pub fn transport_loss(ns: &'a NetNs, dev: &str, port: u16, percent: f64) -> io::Result<Self> {
        let tc = |args: &[&str]| ns.exec("tc", args);
        // Band 1:3 is used by nothing else: prio's default priomap puts ordinary traffic in 1:2.
        tc(&["qdisc", "add", "dev", dev, "root", "handle", "1:", "prio"])?;
        let netem = Self {
            ns,
            dev: dev.to_owned(),
            handle: "30:",
            parent: vec!["parent", "1:3"],
        };
        tc(&[
            "qdisc",
            "add",
            "dev",
            dev,
            "parent",
            "1:3",
            "handle",
            "30:",
            "netem",
            "loss",
            &format!("{percent}%"),
        ])?;
        // IPv4 without options (WireGuard never sets any): UDP at 20, its payload at 28, whose
        // first byte is the message type.
        tc(&[
            "filter",
            "add",
            "dev",
            dev,
            "parent",
            "1:",
            "protocol",
            "ip",
            "prio",
            "1",
            "u32",
            "match",
            "ip",
            "protocol",
            "17",
            "0xff",
            "match",
            "ip",
            "dport",
            &port.to_string(),
            "0xffff",
            "match",
            "u8",
            "4",
            "0xff",
            "at",
            "28",
            "flowid",
            "1:3",
        ])?;
        Ok(netem)
    }

    /// Sets the loss to `percent` % from now on (0 stops it); the counters keep counting.
    pub fn set_loss(&self, percent: f64) -> io::Result<()> {
        let mut args = vec!["qdisc", "change", "dev", self.dev.as_str()];
        args.extend(&self.parent);
        let loss = format!("{percent}%");
        args.extend(["handle", self.handle, "netem", "loss", loss.as_str()]);
        self.ns.exec("tc", &args).map(drop)
    }

    /// The netem qdisc's counters, from `tc -s -j qdisc show`.
    pub fn stats(&self) -> io::Result<NetemStats> {
        let text = self
            .ns
            .exec("tc", &["-s", "-j", "qdisc", "show", "dev", &self.dev])?;
        parse_netem_stats(&text, self.handle)
    }
}

impl Drop for Netem<'_> {
    fn drop(&mut self) {
        let _ = self
            .ns
            .exec("tc", &["qdisc", "del", "dev", &self.dev, "root"]);
    }
}

/// The counters of the netem qdisc with `handle` in `tc -s -j qdisc show` output.
pub fn parse_netem_stats(json: &str, handle: &str) -> io::Result<NetemStats> {
    let bad = |what: String| io::Error::new(io::ErrorKind::InvalidData, what);
    let qdiscs: Vec<serde_json::Value> =
        serde_json::from_str(json).map_err(|e| bad(format!("tc -j output: {e}: {json}")))?;
    let netem = qdiscs
        .iter()
        .find(|q| q["kind"] == "netem" && q["handle"] == handle)
        .ok_or_else(|| bad(format!("no netem qdisc {handle} in: {json}")))?;
    let field = |name: &str| {
        netem[name]
            .as_u64()
            .ok_or_else(|| bad(format!("netem qdisc without {name}: {netem}")))
    };
    Ok(NetemStats {
        sent: field("packets")?,
        dropped: field("drops")?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn netem_counters_come_from_tcs_json() {
        // As iproute2 6.1 prints it for a prio qdisc with a netem child.
        let json = r#"[{"kind":"prio","handle":"1:","root":true,"options":{"bands":3},"bytes":9000,"packets":90,"drops":0,"overlimits":0,"requeues":0,"backlog":0,"qlen":0},{"kind":"netem","handle":"30:","parent":"1:3","options":{"limit":1000,"loss-random":{"loss":0.05,"correlation":0}},"bytes":8000,"packets":80,"drops":4,"overlimits":0,"requeues":0,"backlog":0,"qlen":0}]"#;
        assert_eq!(
            parse_netem_stats(json, "30:").unwrap(),
            NetemStats {
                sent: 80,
                dropped: 4
            }
        );
        assert!(parse_netem_stats(json, "1:").is_err(), "1: is the prio");
        assert!(parse_netem_stats("not json", "30:").is_err());
    }
}
