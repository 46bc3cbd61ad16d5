//! Helpers for plexd-metrics' privileged integration tests.
//!
//! Every resource a test creates (network namespaces, veth pairs) is an RAII guard that
//! removes it on drop, so a failing assertion does not leave debris on the machine. Names
//! carry the process id and a counter, so tests can run in parallel, and next to other runs.
//!
//! The tests need root (CAP_SYS_ADMIN for namespaces, CAP_BPF and CAP_NET_ADMIN for TC). A
//! plain `cargo test` without root skips them loudly; `cargo xtask test` sets
//! `PLEXD_METRICS_REQUIRE_PRIVILEGED=1`, which turns a skip into a failure.

pub mod agent;
pub mod bench;
pub mod control_plane;
pub mod dashboard;
pub mod go_control_plane;
pub mod kernel_mesh;
pub mod mesh;
pub mod openssl;
pub mod pod;
pub mod prometheus;
pub mod prometheus_server;
pub mod targets;
pub mod wireguard;

use std::fmt;
use std::fs::File;
use std::io::{self, Write as _};
use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

use aya::programs::{SchedClassifier, TcAttachType};
use nix::sched::{setns, CloneFlags};
use plexd_metrics::source::counters::EndpointCounterSource as _;
use plexd_metrics::source::ebpf::{embedded_object, ProbeOptions, UnderlayProbe};
use plexd_metrics_common::{PROG_EGRESS, PROG_INGRESS};

/// Environment variable that makes a missing privilege a test failure instead of a skip.
pub const REQUIRE_PRIVILEGED: &str = "PLEXD_METRICS_REQUIRE_PRIVILEGED";

/// Whether this process may run the privileged tests.
///
/// Without root it panics when [`REQUIRE_PRIVILEGED`] is `1` (the run promised to exercise
/// them) and otherwise prints a `SKIPPED` line to stderr and returns `false`; the caller then
/// returns early.
pub fn require_privileges() -> bool {
    if nix::unistd::geteuid().is_root() {
        return true;
    }
    // libtest names each test's thread after the test.
    let thread = std::thread::current();
    let test = thread.name().unwrap_or("this test");
    if std::env::var(REQUIRE_PRIVILEGED).is_ok_and(|v| v == "1") {
        panic!("{test}: needs root, and {REQUIRE_PRIVILEGED}=1 forbids skipping it");
    }
    // Straight to the stream: libtest captures eprintln!, and a skip must be seen.
    let _ = writeln!(
        io::stderr(),
        "\n*** SKIPPED: {test} needs root (network namespaces, eBPF); run `cargo xtask test` ***\n"
    );
    false
}

/// This build's kernel programs attached to `dev` inside `ns` with `options`, watching the
/// WireGuard listen `ports`. Detach (drop) it in the same namespace when it matters: netlink
/// attachments (kernels before 6.6) are found by interface name there.
pub fn attach_probe(ns: &NetNs, dev: &str, options: &ProbeOptions, ports: &[u16]) -> UnderlayProbe {
    let probe = ns
        .run(|| UnderlayProbe::attach_with_options(embedded_object(), &[dev], options))
        .expect("enter namespace")
        .expect("attach the kernel programs");
    probe
        .set_listen_ports(ports)
        .expect("write the listen ports");
    probe
}

/// The agent binary of this build: `PLEXD_METRICS_BIN` when set (`cargo xtask test` sets
/// it), else the one cargo built next to the test executable.
pub fn agent_binary() -> PathBuf {
    if let Some(bin) = std::env::var_os("PLEXD_METRICS_BIN") {
        return bin.into();
    }
    let exe = std::env::current_exe().expect("test executable path");
    let bin = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("target/<profile>/deps")
        .join("plexd-metrics");
    assert!(
        bin.is_file(),
        "{} not built; run `cargo xtask test` or `cargo build -p plexd-metrics` first",
        bin.display()
    );
    bin
}

/// `GET path` of the agent's health endpoint at `addr`, from the calling thread's network
/// namespace, as a kubelet's or an operator's probe: the status and the JSON body. Fails the
/// test when no whole answer comes within `timeout`.
pub fn health_probe(
    addr: std::net::SocketAddr,
    path: &str,
    timeout: std::time::Duration,
) -> (u16, serde_json::Value) {
    use std::io::Read as _;
    let mut stream = std::net::TcpStream::connect_timeout(&addr, timeout)
        .unwrap_or_else(|e| panic!("the health endpoint at {addr}: {e}"));
    stream
        .set_read_timeout(Some(timeout))
        .expect("read timeout");
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .expect("send the request");
    let mut raw = String::new();
    stream.read_to_string(&mut raw).expect("read the answer");
    let (head, body) = raw.split_once("\r\n\r\n").expect("a whole HTTP answer");
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect("a status line");
    (status, serde_json::from_str(body).expect("a JSON body"))
}

/// A short name that is unique across this machine's concurrent test runs.
///
/// Interface names are limited to 15 bytes, so this stays well below that: `prefix` should be
/// at most 3 characters.
pub fn unique_name(prefix: &str) -> String {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    format!(
        "{prefix}{:x}x{:x}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

/// Runs a command and returns its stdout; fails with its stderr when it does not succeed.
pub fn run(program: &str, args: &[&str]) -> io::Result<String> {
    let out = Command::new(program).args(args).output()?;
    if !out.status.success() {
        return Err(io::Error::other(format!(
            "`{program} {}` failed ({}): {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    String::from_utf8(out.stdout).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
}

/// A named network namespace (`ip netns add`), deleted with everything in it on drop.
pub struct NetNs {
    name: String,
}

impl fmt::Debug for NetNs {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.name)
    }
}

impl NetNs {
    /// Creates a namespace whose name starts with `prefix` (at most 3 characters).
    pub fn new(prefix: &str) -> io::Result<Self> {
        let name = unique_name(prefix);
        run("ip", &["netns", "add", &name])?;
        let ns = Self { name };
        // A namespace starts with lo down; some kernels' defaults need it up for local traffic.
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// A name (`ip netns attach`) for the network namespace of PID 1, the one every process
    /// without a namespace of its own is in: what a service manager's units see. Dropping it
    /// removes the name only; the namespace, and what was made in it, stay.
    pub fn of_init(prefix: &str) -> io::Result<Self> {
        let name = unique_name(prefix);
        run("ip", &["netns", "attach", &name, "1"])?;
        let ns = Self { name };
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// The namespace's name, as `ip netns` knows it.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Where `ip netns` keeps the namespace's handle.
    pub fn path(&self) -> PathBuf {
        PathBuf::from("/run/netns").join(&self.name)
    }

    /// Runs `ip -n <ns> args...`.
    pub fn ip(&self, args: &[&str]) -> io::Result<String> {
        let mut all = vec!["-n", self.name.as_str()];
        all.extend_from_slice(args);
        run("ip", &all)
    }

    /// Runs any program inside the namespace (`ip netns exec`).
    pub fn exec(&self, program: &str, args: &[&str]) -> io::Result<String> {
        let mut all = vec!["netns", "exec", self.name.as_str(), program];
        all.extend_from_slice(args);
        run("ip", &all)
    }

    /// Runs `f` inside the namespace, on a thread of its own so that no other thread of the
    /// test process changes namespace, and returns what it returns.
    ///
    /// Sockets and BPF links created in `f` stay bound to this namespace after it returns,
    /// so they can be returned and used from any thread. A panic in `f` propagates.
    pub fn run<T, F>(&self, f: F) -> io::Result<T>
    where
        F: FnOnce() -> T + Send,
        T: Send,
    {
        let handle = File::open(self.path())?;
        std::thread::scope(|scope| {
            let worker = scope.spawn(move || {
                setns(&handle, CloneFlags::CLONE_NEWNET).map_err(io::Error::from)?;
                Ok(f())
            });
            worker
                .join()
                .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
        })
    }

    /// Writes a sysctl under `/proc/sys/net` for this namespace, e.g.
    /// `("ipv6/conf/all/disable_ipv6", "1")`.
    pub fn sysctl_net(&self, key: &str, value: &str) -> io::Result<()> {
        let path = PathBuf::from("/proc/sys/net").join(key);
        // /proc/sys/net shows the namespace of the thread that opens it.
        self.run(|| std::fs::write(&path, value))?
            .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", path.display())))
    }

    /// Turns IPv6 off for every interface of the namespace, present and future, so that no
    /// router solicitation, DAD or MLD packet disturbs an exact count.
    pub fn disable_ipv6(&self) -> io::Result<()> {
        self.sysctl_net("ipv6/conf/all/disable_ipv6", "1")?;
        self.sysctl_net("ipv6/conf/default/disable_ipv6", "1")
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        if let Err(e) = run("ip", &["netns", "del", &self.name]) {
            eprintln!(
                "warning: cannot delete network namespace {}: {e}",
                self.name
            );
        }
    }
}

/// One end of a [`VethPair`].
#[derive(Clone, Debug)]
pub struct VethEnd {
    /// Interface name inside its namespace.
    pub name: String,
    /// IPv4 address, without prefix length.
    pub addr: std::net::Ipv4Addr,
    /// MAC address, fixed so that the peer's neighbour entry can be written in advance.
    pub mac: String,
}

/// A veth pair joining two namespaces on 10.201.x.0/24, up, with IPv4 addresses and permanent
/// neighbour entries on both sides so that no ARP ever crosses it.
///
/// Deleting one end deletes both; the namespaces' own drops would too.
#[derive(Debug)]
pub struct VethPair<'a> {
    /// The end in the first namespace.
    pub a: VethEnd,
    /// The end in the second namespace.
    pub b: VethEnd,
    ns_a: &'a NetNs,
}

impl<'a> VethPair<'a> {
    /// Creates the pair between `ns_a` and `ns_b`. Call [`NetNs::disable_ipv6`] on both
    /// first when the test counts packets.
    pub fn new(ns_a: &'a NetNs, ns_b: &NetNs) -> io::Result<Self> {
        static SUBNET: AtomicU32 = AtomicU32::new(0);
        // Each namespace pair is isolated, so the subnet only varies to keep logs readable.
        let subnet = (SUBNET.fetch_add(1, Ordering::Relaxed) % 250) as u8;
        let end = |suffix: &str, host: u8| VethEnd {
            name: unique_name(&format!("v{suffix}")),
            addr: std::net::Ipv4Addr::new(10, 201, subnet, host),
            mac: format!("02:00:0a:c9:{subnet:02x}:{host:02x}"),
        };
        let (a, b) = (end("a", 1), end("b", 2));
        run(
            "ip",
            &[
                "link",
                "add",
                &a.name,
                "address",
                &a.mac,
                "netns",
                ns_a.name(),
                "type",
                "veth",
                "peer",
                "name",
                &b.name,
                "address",
                &b.mac,
                "netns",
                ns_b.name(),
            ],
        )?;
        let pair = Self { a, b, ns_a };
        for (ns, me, peer) in [(ns_a, &pair.a, &pair.b), (ns_b, &pair.b, &pair.a)] {
            ns.ip(&["addr", "add", &format!("{}/24", me.addr), "dev", &me.name])?;
            ns.ip(&[
                "neigh",
                "replace",
                &peer.addr.to_string(),
                "lladdr",
                &peer.mac,
                "dev",
                &me.name,
                "nud",
                "permanent",
            ])?;
            ns.ip(&["link", "set", &me.name, "up"])?;
        }
        Ok(pair)
    }
}

impl Drop for VethPair<'_> {
    fn drop(&mut self) {
        // Already gone if the namespace went first; nothing to report then.
        let _ = self.ns_a.ip(&["link", "del", &self.a.name]);
    }
}

/// What TC holds on one interface: TCX programs, cls_bpf filters, a clsact qdisc.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct TcState {
    /// Names of the TCX programs on ingress and egress.
    pub tcx_programs: Vec<String>,
    /// `tc filter show` lines of the clsact hooks.
    pub filters: Vec<String>,
    /// Whether a clsact qdisc is present.
    pub clsact: bool,
}

/// Reads the TC state of `dev` inside `ns`.
pub fn tc_state(ns: &NetNs, dev: &str) -> TcState {
    let tcx_programs = ns
        .run(|| {
            let mut names = Vec::new();
            for attach in [TcAttachType::Ingress, TcAttachType::Egress] {
                let programs = match SchedClassifier::query_tcx(dev, attach) {
                    Ok((_, programs)) => programs,
                    // Kernels before 6.6 have no TCX and refuse the query as invalid.
                    Err(aya::programs::ProgramError::SyscallError(aya::sys::SyscallError {
                        io_error,
                        ..
                    })) if io_error.raw_os_error() == Some(libc::EINVAL) => Vec::new(),
                    Err(e) => panic!("query TCX programs on {dev}: {e:?}"),
                };
                names.extend(
                    programs
                        .iter()
                        .map(|p| p.name_as_str().unwrap_or("?").to_owned()),
                );
            }
            names
        })
        .expect("enter namespace");
    let qdiscs = ns
        .exec("tc", &["qdisc", "show", "dev", dev])
        .expect("tc qdisc show");
    let clsact = qdiscs.lines().any(|l| l.starts_with("qdisc clsact"));
    let filters = if clsact {
        ["ingress", "egress"]
            .iter()
            .flat_map(|parent| {
                ns.exec("tc", &["filter", "show", "dev", dev, parent])
                    .expect("tc filter show")
                    .lines()
                    .map(str::to_owned)
                    .collect::<Vec<_>>()
            })
            .collect()
    } else {
        Vec::new()
    };
    TcState {
        tcx_programs,
        filters,
        clsact,
    }
}

/// Kernel program names are cut to 15 bytes.
pub fn kernel_name(name: &str) -> &str {
    &name[..name.len().min(15)]
}

/// The TC state of `dev` once no TCX link of ours is held any more, or as it is after 5 s.
///
/// The kernel detaches a TCX link when the last descriptor of it closes, and the tests of one
/// binary run in parallel threads: a child process another test is starting (`tc`, `ip`)
/// holds copies of all of this process's descriptors until it executes its program. The
/// agent starts no processes, so it does not wait like this.
pub fn tc_state_after_detach(ns: &NetNs, dev: &str) -> TcState {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        let state = tc_state(ns, dev);
        if ours(&state) == 0 || std::time::Instant::now() >= deadline {
            return state;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
}

/// How many of plexd-metrics' programs `state` holds.
pub fn ours(state: &TcState) -> usize {
    let names = [kernel_name(PROG_INGRESS), kernel_name(PROG_EGRESS)];
    state
        .tcx_programs
        .iter()
        .filter(|p| names.contains(&p.as_str()))
        .count()
        + state
            .filters
            .iter()
            .filter(|l| l.contains(PROG_INGRESS) || l.contains(PROG_EGRESS))
            .count()
}

/// Two namespaces with IPv6 off, so that nothing but a test's own packets crosses between
/// them (no router solicitations, no duplicate address detection).
pub fn quiet_namespaces() -> (NetNs, NetNs) {
    let a = NetNs::new("pqa").expect("create namespace");
    let b = NetNs::new("pqb").expect("create namespace");
    a.disable_ipv6().expect("disable IPv6");
    b.disable_ipv6().expect("disable IPv6");
    (a, b)
}

/// A UDP sender on end `a` of a veth pair and a receiver on end `b`.
pub struct UdpFlow {
    sender: std::net::UdpSocket,
    receiver: std::net::UdpSocket,
    to: std::net::SocketAddrV4,
}

impl UdpFlow {
    /// Binds the sender in `sender_ns` and the receiver on `port` in `receiver_ns`.
    pub fn new(sender_ns: &NetNs, receiver_ns: &NetNs, veth: &VethPair<'_>, port: u16) -> Self {
        use std::net::{SocketAddrV4, UdpSocket};
        let to = SocketAddrV4::new(veth.b.addr, port);
        let receiver = receiver_ns
            .run(move || UdpSocket::bind(to))
            .expect("enter receiver namespace")
            .expect("bind receiver socket");
        receiver
            .set_read_timeout(Some(std::time::Duration::from_secs(5)))
            .expect("set receive timeout");
        let from = SocketAddrV4::new(veth.a.addr, 0);
        let sender = sender_ns
            .run(move || UdpSocket::bind(from))
            .expect("enter sender namespace")
            .expect("bind sender socket");
        Self {
            sender,
            receiver,
            to,
        }
    }

    /// Sends `count` datagrams of `payload` bytes and returns once all have arrived. On a veth,
    /// `send_to` returns after the packet went through TC egress, and TC ingress runs before
    /// the socket gets the datagram: on return, every hook has seen every packet.
    pub fn send_and_receive(&self, count: u64, payload: usize) {
        let data = vec![0xa5u8; payload];
        for _ in 0..count {
            let sent = self.sender.send_to(&data, self.to).expect("send datagram");
            assert_eq!(sent, payload);
        }
        let mut buf = vec![0u8; payload + 1];
        for i in 0..count {
            let (n, _) = self
                .receiver
                .recv_from(&mut buf)
                .unwrap_or_else(|e| panic!("datagram {i} of {count} did not arrive: {e}"));
            assert_eq!(n, payload);
        }
    }
}

/// Synthetic WireGuard messages: the right types and sizes, with chosen indexes and
/// counters, and filler where WireGuard has ciphertext.
pub mod wg {
    /// A transport message to `receiver` with `counter` and a plaintext of `payload` bytes,
    /// padded to 16 bytes and followed by a 16-byte tag, as WireGuard sizes it.
    pub fn transport(receiver: u32, counter: u64, payload: usize) -> Vec<u8> {
        let mut m = 4u32.to_le_bytes().to_vec();
        m.extend_from_slice(&receiver.to_le_bytes());
        m.extend_from_slice(&counter.to_le_bytes());
        m.resize(16 + payload.next_multiple_of(16) + 16, 0x5a);
        m
    }

    /// A keepalive: a transport message without payload.
    pub fn keepalive(receiver: u32, counter: u64) -> Vec<u8> {
        transport(receiver, counter, 0)
    }

    /// A handshake message of type `kind` and `len` bytes whose second word is `index`.
    pub fn handshake(kind: u32, len: usize, index: u32) -> Vec<u8> {
        let mut m = kind.to_le_bytes().to_vec();
        m.extend_from_slice(&index.to_le_bytes());
        m.resize(len, 0x33);
        m
    }

    /// A handshake initiation from `sender`.
    pub fn initiation(sender: u32) -> Vec<u8> {
        handshake(1, 148, sender)
    }

    /// A handshake response from `sender`.
    pub fn response(sender: u32) -> Vec<u8> {
        handshake(2, 92, sender)
    }

    /// A cookie reply to `receiver`.
    pub fn cookie_reply(receiver: u32) -> Vec<u8> {
        handshake(3, 64, receiver)
    }

    /// `CLOCK_MONOTONIC_COARSE`, the clock the kernel programs timestamp with.
    pub fn coarse_now() -> std::time::Duration {
        let mut ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: clock_gettime writes into a valid timespec.
        let rc = unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC_COARSE, &mut ts) };
        assert_eq!(rc, 0, "clock_gettime");
        std::time::Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
    }

    /// An Ethernet/IPv4/UDP frame with a correct IPv4 checksum and no UDP checksum (zero,
    /// which IPv4 allows), for sending through an AF_PACKET socket.
    pub fn ipv4_udp_frame(
        dst_mac: [u8; 6],
        src_mac: [u8; 6],
        src: (std::net::Ipv4Addr, u16),
        dst: (std::net::Ipv4Addr, u16),
        payload: &[u8],
    ) -> Vec<u8> {
        let mut f = dst_mac.to_vec();
        f.extend_from_slice(&src_mac);
        f.extend_from_slice(&0x0800u16.to_be_bytes());
        let total = (20 + 8 + payload.len()) as u16;
        let mut ip = vec![0x45, 0];
        ip.extend_from_slice(&total.to_be_bytes());
        ip.extend_from_slice(&[0, 0, 0x40, 0, 64, 17, 0, 0]);
        ip.extend_from_slice(&src.0.octets());
        ip.extend_from_slice(&dst.0.octets());
        let sum = ip
            .chunks(2)
            .map(|w| u32::from(u16::from_be_bytes([w[0], w[1]])))
            .sum::<u32>();
        let sum = !(((sum & 0xffff) + (sum >> 16)) as u16);
        ip[10..12].copy_from_slice(&sum.to_be_bytes());
        f.extend(ip);
        f.extend_from_slice(&src.1.to_be_bytes());
        f.extend_from_slice(&dst.1.to_be_bytes());
        f.extend_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
        f.extend_from_slice(&[0, 0]);
        f.extend_from_slice(payload);
        f
    }

    /// Parses `02:00:...` into bytes.
    pub fn mac(text: &str) -> [u8; 6] {
        let mut out = [0u8; 6];
        for (o, b) in out.iter_mut().zip(text.split(':')) {
            *o = u8::from_str_radix(b, 16).expect("a MAC address");
        }
        out
    }

    /// An AF_PACKET socket bound to one interface of the calling thread's namespace.
    pub struct RawLink {
        fd: std::os::fd::OwnedFd,
        addr: libc::sockaddr_ll,
    }

    impl RawLink {
        /// Opens the socket on `interface`.
        pub fn open(interface: &str) -> std::io::Result<Self> {
            use std::os::fd::FromRawFd;
            let index = nix::net::if_::if_nametoindex(interface)?;
            // SAFETY: plain socket(2); checked below.
            let fd =
                unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, 0) };
            if fd < 0 {
                return Err(std::io::Error::last_os_error());
            }
            // SAFETY: a fresh descriptor nothing else owns.
            let fd = unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) };
            // SAFETY: all-zero is a valid sockaddr_ll; the fields below describe the link.
            let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
            addr.sll_family = libc::AF_PACKET as u16;
            addr.sll_ifindex = index as i32;
            addr.sll_halen = 6;
            Ok(Self { fd, addr })
        }

        /// Sends one frame as it is.
        pub fn send(&self, frame: &[u8]) -> std::io::Result<()> {
            use std::os::fd::AsRawFd;
            // SAFETY: frame and addr are valid for the lengths passed.
            let n = unsafe {
                libc::sendto(
                    self.fd.as_raw_fd(),
                    frame.as_ptr().cast(),
                    frame.len(),
                    0,
                    (&raw const self.addr).cast(),
                    std::mem::size_of::<libc::sockaddr_ll>() as u32,
                )
            };
            if n < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        }
    }
}

/// The keys of `points`' data that `docs/metrics.md` does not name in its group's entry
/// (`- \`group\`: ...`), as `group.key`: the document is the list users read, and each key
/// an agent sends must be in it. Keys of nested objects keyed by user data (interface or
/// destination names) are not looked at; their parent key is.
pub fn undocumented_keys(points: &[plexd_metrics::api::MetricPoint]) -> Vec<String> {
    let doc = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/metrics.md"),
    )
    .expect("read docs/metrics.md");
    let entry = |group: &str| -> String {
        let start = format!("- `{group}`");
        let mut lines = doc.lines().skip_while(|l| !l.starts_with(&start));
        let mut text = String::new();
        if let Some(first) = lines.next() {
            text.push_str(first);
            for line in lines.take_while(|l| !l.starts_with("- `") && !l.starts_with('#')) {
                text.push('\n');
                text.push_str(line);
            }
        }
        text
    };
    let mut missing = std::collections::BTreeSet::new();
    for point in points {
        let text = entry(&point.group);
        let data = point.data.to_value();
        for key in data.as_object().into_iter().flat_map(|o| o.keys()) {
            if !text.contains(&format!("`{key}`")) {
                missing.insert(format!("{}.{key}", point.group));
            }
        }
    }
    missing.into_iter().collect()
}

/// How long an agent may take to exit after SIGTERM or `--once` before a test gives up on
/// it: its own flush is bounded by 10 s, and loading the kernel programs takes a few.
pub const EXIT_DEADLINE: std::time::Duration = std::time::Duration::from_secs(60);

/// Waits for `child` to exit, at most `limit`; kills it and fails the test past that.
pub fn wait_within(
    child: &mut std::process::Child,
    limit: std::time::Duration,
) -> std::process::ExitStatus {
    let deadline = std::time::Instant::now() + limit;
    loop {
        if let Some(status) = child.try_wait().expect("poll the child") {
            return status;
        }
        if std::time::Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("process {} did not exit within {limit:?}", child.id());
        }
        // Polling: std has no wait with a timeout for a child.
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
}

/// Runs `command` to its end like [`std::process::Command::output`], at most `limit`.
pub fn output_within(
    command: &mut std::process::Command,
    limit: std::time::Duration,
) -> std::process::Output {
    use std::io::Read as _;
    let mut child = command
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("start the process");
    let read = |mut pipe: Box<dyn std::io::Read + Send>| {
        std::thread::spawn(move || {
            let mut bytes = Vec::new();
            let _ = pipe.read_to_end(&mut bytes);
            bytes
        })
    };
    let stdout = read(Box::new(child.stdout.take().expect("piped stdout")));
    let stderr = read(Box::new(child.stderr.take().expect("piped stderr")));
    let status = wait_within(&mut child, limit);
    std::process::Output {
        status,
        stdout: stdout.join().expect("stdout reader"),
        stderr: stderr.join().expect("stderr reader"),
    }
}
