//! A WireGuard mesh on one machine: wireguard-go nodes in namespaces of their own, each
//! joined to a router namespace by a veth pair, so that loss can be injected in the router's
//! forward chain, before any node's TC hooks see the packets.
//!
//! ```text
//!  node 0 ── veth ──┐
//!  node 1 ── veth ──┼── router (forwards; nftables drop rules)
//!  node 2 ── veth ──┘
//! ```
//!
//! Node `i` has underlay address `10.210.i.2` (the router is `10.210.i.1`), tunnel address
//! `10.220.0.(i+1)` and listens on UDP `51820 + i`. Everything is torn down on drop.

use std::io;
use std::net::Ipv4Addr;

use crate::wireguard::{KeyPair, WireGuardGo};
use crate::{run, unique_name, NetNs};

/// The first listen port; node `i` listens on `BASE_PORT + i`.
pub const BASE_PORT: u16 = 51820;

/// One WireGuard node of a [`Mesh`].
pub struct MeshNode {
    /// The wireguard-go process (dropped first: it goes before its namespace).
    pub wg: WireGuardGo,
    /// Its key pair.
    pub keys: KeyPair,
    /// Its namespace.
    pub ns: NetNs,
    /// Its address on the underlay (the veth to the router).
    pub underlay: Ipv4Addr,
    /// The name of its underlay veth.
    pub underlay_dev: String,
    /// Its address inside the tunnel.
    pub tunnel: Ipv4Addr,
    /// Its WireGuard listen port.
    pub listen_port: u16,
}

impl MeshNode {
    /// Where the other nodes send its encrypted packets.
    pub fn endpoint(&self) -> String {
        format!("{}:{}", self.underlay, self.listen_port)
    }
}

/// A router namespace and `n` fully meshed wireguard-go nodes.
pub struct Mesh {
    /// The nodes (dropped before the router).
    pub nodes: Vec<MeshNode>,
    /// The namespace that forwards between the nodes.
    pub router: NetNs,
}

impl Mesh {
    /// Builds `n` nodes (at most 200) that all know each other, with a persistent keepalive
    /// of `keepalive` seconds when given. No handshake has happened yet: the first packet
    /// through the tunnel starts it.
    pub fn new(n: usize, keepalive: Option<u16>) -> io::Result<Self> {
        assert!(n <= 200, "at most 200 nodes");
        let router = NetNs::new("pmr")?;
        router.disable_ipv6()?;
        router.sysctl_net("ipv4/ip_forward", "1")?;
        let mut nodes = Vec::with_capacity(n);
        for i in 0..n {
            nodes.push(Self::node(&router, i)?);
        }
        let mesh = Self { nodes, router };
        for i in 0..n {
            for j in (0..n).filter(|&j| j != i) {
                mesh.add_peer(i, &mesh.nodes[j], keepalive)?;
            }
        }
        Ok(mesh)
    }

    fn node(router: &NetNs, i: usize) -> io::Result<MeshNode> {
        let ns = NetNs::new("pmn")?;
        ns.disable_ipv6()?;
        let dev = unique_name("vn");
        let router_dev = unique_name("vr");
        run(
            "ip",
            &[
                "link",
                "add",
                &dev,
                "netns",
                ns.name(),
                "type",
                "veth",
                "peer",
                "name",
                &router_dev,
                "netns",
                router.name(),
            ],
        )?;
        let subnet = i as u8;
        let underlay = Ipv4Addr::new(10, 210, subnet, 2);
        let gateway = Ipv4Addr::new(10, 210, subnet, 1);
        router.ip(&["addr", "add", &format!("{gateway}/24"), "dev", &router_dev])?;
        router.ip(&["link", "set", &router_dev, "up"])?;
        ns.ip(&["addr", "add", &format!("{underlay}/24"), "dev", &dev])?;
        ns.ip(&["link", "set", &dev, "up"])?;
        ns.ip(&["route", "add", "default", "via", &gateway.to_string()])?;

        let keys = KeyPair::generate()?;
        let wg = WireGuardGo::start(&ns, &unique_name("wg"))?;
        let listen_port = BASE_PORT + i as u16;
        wg.set_identity(&keys, listen_port)?;
        let tunnel = Ipv4Addr::new(10, 220, 0, subnet + 1);
        ns.ip(&["addr", "add", &format!("{tunnel}/24"), "dev", &wg.name])?;
        ns.ip(&["link", "set", &wg.name, "up"])?;
        Ok(MeshNode {
            wg,
            keys,
            ns,
            underlay,
            underlay_dev: dev,
            tunnel,
            listen_port,
        })
    }

    /// Makes `other` a peer of node `i`.
    fn add_peer(&self, i: usize, other: &MeshNode, keepalive: Option<u16>) -> io::Result<()> {
        let node = &self.nodes[i];
        let endpoint = other.endpoint();
        let allowed = format!("{}/32", other.tunnel);
        let keepalive = keepalive.map(|k| k.to_string());
        let mut args = vec![
            "set",
            node.wg.name.as_str(),
            "peer",
            other.keys.public.as_str(),
            "endpoint",
            endpoint.as_str(),
            "allowed-ips",
            allowed.as_str(),
        ];
        if let Some(k) = &keepalive {
            args.extend(["persistent-keepalive", k.as_str()]);
        }
        node.wg.wg(&args).map(drop)
    }

    /// Pings node `to`'s tunnel address from node `from`, 10 ms apart, until `count` echoes
    /// are answered, and returns how many were: echoes that go unanswered (a drop rule) are
    /// made up for by more, within a deadline of twice the sending time plus 5 s. A first
    /// packet between the two starts the handshake; [`Mesh::handshake`] waits for it.
    pub fn ping(&self, from: usize, to: usize, count: u32) -> io::Result<u32> {
        // iputils' ping waits only two round trips for the last replies once any reply has
        // come (`-W` applies only while none has), so a reply late by a scheduling hiccup
        // counted as lost; with a deadline (`-w`) it waits for `count` answers.
        let deadline = (count / 50 + 5).to_string();
        self.run_ping(
            from,
            to,
            &["-c", &count.to_string(), "-i", "0.01", "-w", &deadline],
        )
    }

    /// Brings up the session from node `from` to node `to`: one echo, answered once
    /// WireGuard's handshake completes, which on a loaded machine can take seconds.
    pub fn handshake(&self, from: usize, to: usize) -> io::Result<()> {
        // With no reply yet, `-W` is how long ping waits for one.
        match self.run_ping(from, to, &["-c", "1", "-W", "20"])? {
            1 => Ok(()),
            _ => Err(io::Error::other(format!(
                "no answer from node {to} to node {from} within 20 s: the handshake failed"
            ))),
        }
    }

    /// Runs ping with `options` from node `from` to node `to`'s tunnel address; the number
    /// of answers.
    fn run_ping(&self, from: usize, to: usize, options: &[&str]) -> io::Result<u32> {
        let target = self.nodes[to].tunnel.to_string();
        let out = std::process::Command::new("ip")
            .args([
                "netns",
                "exec",
                self.nodes[from].ns.name(),
                "ping",
                "-q",
                "-n",
            ])
            .args(options)
            .arg(&target)
            .output()?;
        let text = String::from_utf8_lossy(&out.stdout);
        // "N packets transmitted, M received, ..."; ping exits non-zero when any was lost.
        text.lines()
            .find_map(|l| {
                let received = l.split(", ").nth(1)?;
                received.strip_suffix(" received")?.parse().ok()
            })
            .ok_or_else(|| io::Error::other(format!("unexpected ping output: {text}")))
    }

    /// Echoes from node `from` to node `to` of which the router drops about `percent` %
    /// (data messages only): a few clean ones first, so that a session the kernel programs
    /// joined midway has its window's start before the loss, then `count` lossy ones, then
    /// a few clean ones, which close every hole. Returns the lossy echoes answered and the
    /// router's drop count, the truth a test compares with.
    pub fn lossy_echoes(
        &self,
        from: usize,
        to: usize,
        percent: u8,
        count: u32,
    ) -> io::Result<(u32, u64)> {
        if self.ping(from, to, 3)? != 3 {
            return Err(io::Error::other(
                "clean echoes before the loss went unanswered",
            ));
        }
        let rule = self.drop_between(from, to, percent, true)?;
        let answered = self.ping(from, to, count)?;
        let dropped = rule.dropped()?;
        drop(rule);
        if dropped == 0 {
            return Err(io::Error::other(format!(
                "the rule dropped nothing ({answered} of {count} answered)"
            )));
        }
        if self.ping(from, to, 5)? != 5 {
            return Err(io::Error::other(
                "clean echoes after the loss went unanswered",
            ));
        }
        Ok((answered, dropped))
    }

    /// Drops `percent` % of the UDP packets that node `from` sends to node `to`'s WireGuard
    /// port, in the router, at random; only transport data messages (type 4) when
    /// `data_only`. The rule's counter is the truth about what was dropped.
    pub fn drop_between(
        &self,
        from: usize,
        to: usize,
        percent: u8,
        data_only: bool,
    ) -> io::Result<LossRule<'_>> {
        let table = unique_name("pl");
        let (src, dst) = (&self.nodes[from], &self.nodes[to]);
        let nft = |args: &[&str]| self.router.exec("nft", args);
        nft(&["add", "table", "inet", &table])?;
        nft(&[
            "add",
            "chain",
            "inet",
            &table,
            "lossy",
            "{ type filter hook forward priority 0; policy accept; }",
        ])?;
        // The first byte of a WireGuard message is its type; transport data is 4.
        let data = if data_only { "@ih,0,8 4" } else { "" };
        let rule = format!(
            "ip saddr {} ip daddr {} udp dport {} {data} numgen random mod 100 < {percent} counter drop",
            src.underlay, dst.underlay, dst.listen_port
        );
        let mut args = vec!["add", "rule", "inet", table.as_str(), "lossy"];
        args.extend(rule.split_whitespace());
        nft(&args)?;
        Ok(LossRule {
            router: &self.router,
            table,
        })
    }
}

/// An nftables drop rule in the router; removed on drop.
pub struct LossRule<'a> {
    router: &'a NetNs,
    table: String,
}

impl LossRule<'_> {
    /// Packets the rule has dropped so far.
    pub fn dropped(&self) -> io::Result<u64> {
        let text = self
            .router
            .exec("nft", &["list", "table", "inet", &self.table])?;
        text.split_whitespace()
            .skip_while(|w| *w != "counter")
            .nth(2)
            .and_then(|n| n.parse().ok())
            .ok_or_else(|| io::Error::other(format!("no counter in: {text}")))
    }
}

impl Drop for LossRule<'_> {
    fn drop(&mut self) {
        let _ = self
            .router
            .exec("nft", &["delete", "table", "inet", &self.table]);
    }
}
