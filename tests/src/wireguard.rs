//! wireguard-go devices for the tests: started in a namespace, configured with `wg`, and
//! stopped with their UAPI socket removed when dropped.

use std::io::{self, BufRead, BufReader, Read as _, Write as _};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use base64::Engine as _;

use crate::{run, NetNs};

/// Where wireguard-go puts its UAPI sockets; shared by every namespace of the machine.
pub const SOCKET_DIR: &str = "/var/run/wireguard";

/// Bound on wireguard-go's start; it takes milliseconds.
const START_DEADLINE: Duration = Duration::from_secs(20);

/// A WireGuard key pair in `wg`'s base64.
#[derive(Clone, Debug)]
pub struct KeyPair {
    /// The private key.
    pub private: String,
    /// The public key.
    pub public: String,
}

impl KeyPair {
    /// A fresh pair from `wg genkey` and `wg pubkey`.
    pub fn generate() -> io::Result<Self> {
        let private = run("wg", &["genkey"])?.trim().to_owned();
        let mut child = Command::new("wg")
            .arg("pubkey")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()?;
        child
            .stdin
            .take()
            .expect("piped stdin")
            .write_all(private.as_bytes())?;
        let mut public = String::new();
        child
            .stdout
            .take()
            .expect("piped stdout")
            .read_to_string(&mut public)?;
        if !child.wait()?.success() {
            return Err(io::Error::other("wg pubkey failed"));
        }
        Ok(Self {
            private,
            public: public.trim().to_owned(),
        })
    }
}

/// 32 random bytes in base64: a public key for a peer that never needs to answer.
/// wireguard-go accepts any 32 bytes as a peer's key.
pub fn random_public_key() -> String {
    let mut key = [0u8; 32];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut key))
        .expect("read /dev/urandom");
    base64::engine::general_purpose::STANDARD.encode(key)
}

/// A wireguard-go process running interface `name` in a namespace.
pub struct WireGuardGo {
    /// The interface name, unique on the machine (the UAPI socket path is not per-namespace).
    pub name: String,
    /// The namespace's name.
    pub netns: String,
    child: Child,
}

impl WireGuardGo {
    /// Starts wireguard-go for a new interface in `ns` and returns once its UAPI socket
    /// accepts requests.
    pub fn start(ns: &NetNs, name: &str) -> io::Result<Self> {
        let mut child = Command::new("ip")
            .args(["netns", "exec", ns.name(), "wireguard-go", "-f", name])
            // Debug logs carry the line that says the UAPI socket is listening.
            .env("LOG_LEVEL", "debug")
            // It would otherwise refuse to run on a kernel that could have the module.
            .env("WG_I_PREFER_BUGGY_USERSPACE_TO_POLISHED_KMOD", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()?;
        let stdout = child.stdout.take().expect("piped stdout");
        let (ready_tx, ready) = mpsc::channel();
        // Drains the log for the process's whole life, so that it never blocks on a full pipe.
        std::thread::spawn(move || {
            let mut ready_tx = Some(ready_tx);
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if line.contains("UAPI listener started") {
                    if let Some(tx) = ready_tx.take() {
                        let _ = tx.send(());
                    }
                }
            }
        });
        let device = Self {
            name: name.to_owned(),
            netns: ns.name().to_owned(),
            child,
        };
        ready.recv_timeout(START_DEADLINE).map_err(|_| {
            io::Error::other(format!(
                "wireguard-go {name} did not open its UAPI socket within {START_DEADLINE:?}"
            ))
        })?;
        Ok(device)
    }

    /// Runs `wg <args>` in the device's namespace.
    pub fn wg(&self, args: &[&str]) -> io::Result<String> {
        let mut all = vec!["netns", "exec", self.netns.as_str(), "wg"];
        all.extend_from_slice(args);
        run("ip", &all)
    }

    /// Sets the device's private key and listen port.
    pub fn set_identity(&self, keys: &KeyPair, listen_port: u16) -> io::Result<()> {
        let file = self.temp_file("key", &keys.private)?;
        let port = listen_port.to_string();
        let result = self.wg(&[
            "set",
            &self.name,
            "private-key",
            &file.display().to_string(),
            "listen-port",
            &port,
        ]);
        let _ = std::fs::remove_file(&file);
        result.map(drop)
    }

    /// Replaces the whole configuration with `conf` (`wg setconf` syntax).
    pub fn setconf(&self, conf: &str) -> io::Result<()> {
        let file = self.temp_file("conf", conf)?;
        let result = self.wg(&["setconf", &self.name, &file.display().to_string()]);
        let _ = std::fs::remove_file(&file);
        result.map(drop)
    }

    /// `wg show <name> dump`: the device line, then one line per peer.
    pub fn dump(&self) -> io::Result<String> {
        self.wg(&["show", &self.name, "dump"])
    }

    /// The device's UAPI socket.
    pub fn socket(&self) -> PathBuf {
        PathBuf::from(SOCKET_DIR).join(format!("{}.sock", self.name))
    }

    fn temp_file(&self, what: &str, text: &str) -> io::Result<PathBuf> {
        let path = std::env::temp_dir().join(format!("plexd-{}-{what}", self.name));
        std::fs::write(&path, text)?;
        Ok(path)
    }
}

impl Drop for WireGuardGo {
    fn drop(&mut self) {
        // SIGTERM lets wireguard-go remove its interface and socket itself.
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let _ = self.child.wait();
        let _ = std::fs::remove_file(self.socket());
    }
}

/// One peer line of `wg show <dev> dump`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DumpPeer {
    /// Public key.
    pub public_key: String,
    /// Endpoint, `(none)` when unknown.
    pub endpoint: String,
    /// Allowed IPs, comma-separated.
    pub allowed_ips: String,
    /// Last handshake, seconds since the epoch; 0 for never.
    pub latest_handshake: u64,
    /// Bytes received.
    pub rx_bytes: u64,
    /// Bytes sent.
    pub tx_bytes: u64,
}

/// The peer lines of a `wg show <dev> dump`.
pub fn parse_dump(dump: &str) -> Vec<DumpPeer> {
    dump.lines()
        .skip(1)
        .map(|line| {
            let f: Vec<&str> = line.split('\t').collect();
            assert!(f.len() >= 8, "unexpected wg dump line: {line}");
            DumpPeer {
                public_key: f[0].to_owned(),
                endpoint: f[2].to_owned(),
                allowed_ips: f[3].to_owned(),
                latest_handshake: f[4].parse().expect("handshake seconds"),
                rx_bytes: f[5].parse().expect("rx bytes"),
                tx_bytes: f[6].parse().expect("tx bytes"),
            }
        })
        .collect()
}

/// A `wg setconf` configuration of `peers` peers with random keys, one /32 of 10.100.0.0/14
/// each and endpoints in 192.0.2.0/24 (TEST-NET-1, never reachable), listening on
/// `listen_port`; and the endpoints, in peer order. For the benchmarks' large devices.
pub fn many_peers(listen_port: u16, peers: usize) -> (String, Vec<std::net::SocketAddr>) {
    let endpoints: Vec<std::net::SocketAddr> = (0..peers)
        .map(|i| {
            std::net::SocketAddr::from((
                [192, 0, 2, (i % 250 + 1) as u8],
                20_000 + (i % 40_000) as u16,
            ))
        })
        .collect();
    (peers_at(listen_port, &endpoints), endpoints)
}

/// A `wg setconf` configuration with one peer (random key, one /32 of 10.100.0.0/14) at each
/// of `endpoints`, listening on `listen_port`.
pub fn peers_at(listen_port: u16, endpoints: &[std::net::SocketAddr]) -> String {
    let mut conf = format!("[Interface]\nListenPort = {listen_port}\n");
    for (i, endpoint) in endpoints.iter().enumerate() {
        conf.push_str(&format!(
            "[Peer]\nPublicKey = {}\nAllowedIPs = 10.{}.{}.{}/32\nEndpoint = {endpoint}\n",
            random_public_key(),
            100 + i / 62_500,
            i / 250 % 250,
            i % 250 + 1
        ));
    }
    conf
}
