//! Userspace WireGuard (wireguard-go, boringtun) over its UAPI socket.
//!
//! Written by hand because no crate reads it well enough here: wireguard-control's reader
//! only lists devices that have a macOS-style `.name` file (wireguard-go on Linux writes
//! none), prints unknown keys to stdout and panics on a bad `errno`; wireguard-uapi's parser
//! rejects any key it does not know (so a newer implementation breaks it) and brings an old
//! netlink stack; defguard_wireguard_rs compiles a whole boringtun in. The protocol is a
//! few `key=value` lines (<https://www.wireguard.com/xplatform/>).

use std::io::{self, Read as _, Write as _};
use std::net::{IpAddr, SocketAddr, SocketAddrV6};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use super::{key_to_base64, AllowedIp, Device, Implementation, Peer, WireGuardError};

/// How long a userspace implementation may take to answer, in all; thousands of peers
/// take milliseconds, so only a hung or stalling process reaches this.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(5);
/// Most bytes an answer may have: a device with 100,000 peers and a few allowed IPs each
/// writes about 16 MB. Whatever writes more is not a WireGuard implementation to trust.
const MAX_ANSWER_BYTES: usize = 32 << 20;

/// Why a UAPI exchange failed.
#[derive(Debug, thiserror::Error)]
pub enum UapiError {
    /// Connecting, writing or reading failed.
    #[error("{0}")]
    Io(#[from] io::Error),
    /// The implementation answered with an error number.
    #[error("the implementation answered errno={0}")]
    Errno(i32),
    /// A line is not what the protocol allows.
    #[error("line {line}: {message}")]
    Parse {
        /// 1-based line number of the answer.
        line: usize,
        /// What is wrong with it.
        message: String,
    },
    /// The answer ended before its `errno` line: the dump is incomplete.
    #[error("the answer ended after {lines} lines without its errno line")]
    Truncated {
        /// Lines read.
        lines: usize,
    },
    /// No complete answer within the time allowed.
    #[error(
        "no complete answer within {limit:?} ({bytes} bytes so far); is the process behind \
         the socket hung?"
    )]
    TimedOut {
        /// The time allowed.
        limit: Duration,
        /// What had arrived by then.
        bytes: usize,
    },
    /// The answer outgrew the bound.
    #[error(
        "the answer is larger than {} MiB, far more than any device's state; is something \
         else listening on the socket?",
        limit >> 20
    )]
    TooLarge {
        /// The bound, in bytes.
        limit: usize,
    },
}

impl UapiError {
    /// Whether the socket exists but nothing listens on it any more.
    pub fn is_stale_socket(&self) -> bool {
        matches!(self, Self::Io(e) if matches!(e.kind(), io::ErrorKind::ConnectionRefused | io::ErrorKind::NotFound))
    }
}

/// The socket of interface `name` in `dir`.
pub fn socket_path(dir: &Path, name: &str) -> PathBuf {
    dir.join(format!("{name}.sock"))
}

/// Interface names that have a socket in `dir`; none when the directory does not exist.
pub fn socket_names(dir: &Path) -> Result<Vec<String>, WireGuardError> {
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(source) => {
            return Err(WireGuardError::SocketDir {
                dir: dir.to_owned(),
                source,
            })
        }
    };
    let mut names: Vec<String> = entries
        .filter_map(Result::ok)
        .filter_map(|e| {
            e.file_name()
                .to_str()?
                .strip_suffix(".sock")
                .filter(|n| !n.is_empty())
                .map(str::to_owned)
        })
        .collect();
    names.sort();
    Ok(names)
}

/// Asks the implementation behind `socket` for device `name`'s full state, within
/// [`ANSWER_TIMEOUT`] and [`MAX_ANSWER_BYTES`].
pub fn read_device(name: &str, socket: &Path) -> Result<Device, UapiError> {
    read_device_within(name, socket, ANSWER_TIMEOUT, MAX_ANSWER_BYTES)
}

fn read_device_within(
    name: &str,
    socket: &Path,
    limit: Duration,
    max_bytes: usize,
) -> Result<Device, UapiError> {
    let deadline = Instant::now() + limit;
    let mut stream = UnixStream::connect(socket)?;
    stream.set_write_timeout(Some(limit))?;
    stream.write_all(b"get=1\n\n")?;
    // The answer ends with an empty line; the connection stays open for more requests.
    // Read whole, then parsed in place: ten thousand peers are about 1.5 MB. The bound is
    // on the whole answer, so that a writer trickling a byte at a time cannot hold the
    // collector past it.
    let mut answer = Vec::with_capacity(64 * 1024);
    let mut chunk = vec![0u8; 256 * 1024];
    let timed_out = |bytes| UapiError::TimedOut { limit, bytes };
    while !answer.ends_with(b"\n\n") {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(timed_out(answer.len()));
        }
        stream.set_read_timeout(Some(left))?;
        let n = match stream.read(&mut chunk) {
            Ok(n) => n,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                return Err(timed_out(answer.len()))
            }
            Err(e) => return Err(e.into()),
        };
        if n == 0 {
            break;
        }
        if answer.len() + n > max_bytes {
            return Err(UapiError::TooLarge { limit: max_bytes });
        }
        answer.extend_from_slice(&chunk[..n]);
    }
    parse_get(name, &answer)
}

/// Parses the answer to `get=1` up to and including its `errno` line.
pub fn parse_get(name: &str, answer: &[u8]) -> Result<Device, UapiError> {
    let mut device = Device {
        name: name.to_owned(),
        implementation: Implementation::Userspace,
        listen_port: 0,
        fwmark: 0,
        peers: Vec::new(),
    };
    let mut handshake = (0u64, 0u32);
    let answer = std::str::from_utf8(answer).map_err(|e| UapiError::Parse {
        line: 0,
        message: format!("not UTF-8: {e}"),
    })?;
    let mut lines = answer.split_terminator('\n');
    let mut number = 0;
    loop {
        let Some(text) = lines.next() else {
            return Err(UapiError::Truncated { lines: number });
        };
        number += 1;
        let parse = |message: String| UapiError::Parse {
            line: number,
            message,
        };
        let Some((key, value)) = text.split_once('=') else {
            return Err(parse(format!("expected key=value, got {text:?}")));
        };
        let invalid = |what: &str| parse(format!("invalid {what} {value:?}"));
        if key == "errno" {
            let errno: i32 = value.parse().map_err(|_| invalid("errno"))?;
            if errno != 0 {
                return Err(UapiError::Errno(errno));
            }
            finish_peer(&mut device, handshake);
            return Ok(device);
        }
        if key == "public_key" {
            finish_peer(&mut device, handshake);
            handshake = (0, 0);
            device.peers.push(Peer {
                public_key: hex_key(value).ok_or_else(|| invalid("public_key"))?,
                endpoint: None,
                allowed_ips: Vec::new(),
                last_handshake: None,
                rx_bytes: 0,
                tx_bytes: 0,
                persistent_keepalive: None,
            });
            continue;
        }
        let Some(peer) = device.peers.last_mut() else {
            match key {
                "listen_port" => device.listen_port = value.parse().map_err(|_| invalid(key))?,
                "fwmark" => device.fwmark = value.parse().map_err(|_| invalid(key))?,
                // private_key and keys a newer implementation adds.
                _ => {}
            }
            continue;
        };
        match key {
            "endpoint" => peer.endpoint = Some(parse_endpoint(value).ok_or_else(|| invalid(key))?),
            "allowed_ip" => peer
                .allowed_ips
                .push(parse_allowed_ip(value).ok_or_else(|| invalid(key))?),
            "rx_bytes" => peer.rx_bytes = value.parse().map_err(|_| invalid(key))?,
            "tx_bytes" => peer.tx_bytes = value.parse().map_err(|_| invalid(key))?,
            "last_handshake_time_sec" => handshake.0 = value.parse().map_err(|_| invalid(key))?,
            "last_handshake_time_nsec" => {
                handshake.1 = value
                    .parse()
                    .ok()
                    .filter(|&n| n < 1_000_000_000)
                    .ok_or_else(|| invalid(key))?;
            }
            "persistent_keepalive_interval" => {
                let secs: u16 = value.parse().map_err(|_| invalid(key))?;
                peer.persistent_keepalive = (secs != 0).then_some(secs);
            }
            // preshared_key, protocol_version and keys a newer implementation adds.
            _ => {}
        }
    }
}

/// The handshake time arrives in two lines; it is known once the peer's lines are over.
fn finish_peer(device: &mut Device, (secs, nanos): (u64, u32)) {
    if let Some(peer) = device.peers.last_mut() {
        peer.last_handshake =
            (secs != 0 || nanos != 0).then(|| SystemTime::UNIX_EPOCH + Duration::new(secs, nanos));
    }
}

fn hex_key(value: &str) -> Option<String> {
    let mut key = [0u8; 32];
    hex::decode_to_slice(value, &mut key).ok()?;
    Some(key_to_base64(&key))
}

/// `1.2.3.4:51820`, `[2001:db8::1]:51820`, or with a scope: `[fe80::1%eth0]:51820`. The
/// scope is dropped: endpoints are compared without it.
fn parse_endpoint(value: &str) -> Option<SocketAddr> {
    if let Ok(addr) = value.parse() {
        return Some(addr);
    }
    let rest = value.strip_prefix('[')?;
    let (host, port) = rest.split_once("]:")?;
    let (addr, _scope) = host.split_once('%')?;
    Some(SocketAddr::V6(SocketAddrV6::new(
        addr.parse().ok()?,
        port.parse().ok()?,
        0,
        0,
    )))
}

fn parse_allowed_ip(value: &str) -> Option<AllowedIp> {
    let (addr, prefix) = value.split_once('/')?;
    let addr: IpAddr = addr.parse().ok()?;
    let prefix_len: u8 = prefix.parse().ok()?;
    let max = if addr.is_ipv4() { 32 } else { 128 };
    (prefix_len <= max).then_some(AllowedIp { addr, prefix_len })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const KEY_A: &str = "58402e695ba1772b1cc9309755f043251ea77fdcf10fbe63989ceae8e7a2b5c0";
    const KEY_B: &str = "662e14fd594556f522604703340351258903b64f35553763f19426ab2a515c58";

    /// An answer as wireguard-go 0.0.20230223 writes it for a device with two peers.
    fn answer() -> String {
        format!(
            "private_key=e84b5a6d2717c1003a13b431570353dbaca9146cf150c5f8575680feba52027a\n\
             listen_port=51820\n\
             fwmark=51820\n\
             public_key={KEY_A}\n\
             preshared_key=0000000000000000000000000000000000000000000000000000000000000000\n\
             protocol_version=1\n\
             endpoint=192.0.2.7:51821\n\
             last_handshake_time_sec=1770892195\n\
             last_handshake_time_nsec=250000000\n\
             tx_bytes=52428800\n\
             rx_bytes=104857600\n\
             persistent_keepalive_interval=25\n\
             allowed_ip=10.100.0.2/32\n\
             allowed_ip=fd00::2/128\n\
             public_key={KEY_B}\n\
             protocol_version=1\n\
             last_handshake_time_sec=0\n\
             last_handshake_time_nsec=0\n\
             tx_bytes=0\n\
             rx_bytes=0\n\
             persistent_keepalive_interval=0\n\
             errno=0\n\n"
        )
    }

    #[test]
    fn a_full_answer_is_read() {
        let d = parse_get("wg0", answer().as_bytes()).unwrap();
        assert_eq!(d.name, "wg0");
        assert_eq!(d.implementation, Implementation::Userspace);
        assert_eq!(d.listen_port, 51820);
        assert_eq!(d.fwmark, 51820);
        assert_eq!(d.peers.len(), 2);
        let a = &d.peers[0];
        assert_eq!(a.public_key, "WEAuaVuhdyscyTCXVfBDJR6nf9zxD75jmJzq6OeitcA=");
        assert_eq!(a.endpoint, Some("192.0.2.7:51821".parse().unwrap()));
        assert_eq!(
            a.last_handshake,
            Some(SystemTime::UNIX_EPOCH + Duration::new(1_770_892_195, 250_000_000))
        );
        assert_eq!((a.rx_bytes, a.tx_bytes), (104_857_600, 52_428_800));
        assert_eq!(a.persistent_keepalive, Some(25));
        let ips: Vec<String> = a.allowed_ips.iter().map(ToString::to_string).collect();
        assert_eq!(ips, ["10.100.0.2/32", "fd00::2/128"]);
        let b = &d.peers[1];
        assert_eq!(b.endpoint, None);
        assert_eq!(b.last_handshake, None, "zero means never");
        assert_eq!(b.persistent_keepalive, None);
    }

    #[test]
    fn unknown_keys_are_ignored() {
        let text = answer().replace(
            "protocol_version=1\nendpoint",
            "protocol_version=1\nsome_future_key=1\nendpoint",
        );
        let d = parse_get("wg0", text.as_bytes()).unwrap();
        assert_eq!(d.peers.len(), 2);
    }

    #[test]
    fn an_answer_without_errno_is_incomplete() {
        let text = answer().replace("errno=0\n\n", "");
        assert!(matches!(
            parse_get("wg0", text.as_bytes()),
            Err(UapiError::Truncated { lines: 21 })
        ));
    }

    #[test]
    fn a_nonzero_errno_is_an_error() {
        let err = parse_get("wg0", "errno=-22\n\n".as_bytes()).unwrap_err();
        assert!(matches!(err, UapiError::Errno(-22)), "{err}");
    }

    #[test]
    fn bad_values_name_the_line() {
        let text = answer().replace("rx_bytes=104857600", "rx_bytes=lots");
        let err = parse_get("wg0", text.as_bytes()).unwrap_err();
        assert_eq!(err.to_string(), r#"line 11: invalid rx_bytes "lots""#);
        let text = answer().replace(KEY_B, "abc");
        assert!(parse_get("wg0", text.as_bytes())
            .unwrap_err()
            .to_string()
            .contains("invalid public_key"));
        assert!(parse_get("wg0", "garbage\n".as_bytes()).is_err());
    }

    #[test]
    fn endpoints_of_every_shape() {
        assert_eq!(
            parse_endpoint("[2001:db8::1]:51820"),
            Some("[2001:db8::1]:51820".parse().unwrap())
        );
        assert_eq!(
            parse_endpoint("[fe80::1%eth0]:51820"),
            Some("[fe80::1]:51820".parse().unwrap())
        );
        assert_eq!(parse_endpoint("nonsense"), None);
        assert_eq!(parse_allowed_ip("10.0.0.0/33"), None);
        assert!(parse_allowed_ip("::/0").is_some());
    }

    #[test]
    fn socket_names_come_from_the_directory() {
        let dir = std::env::temp_dir().join(format!("plexd-uapi-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        for f in ["wgb.sock", "wga.sock", "wga.name", ".sock"] {
            std::fs::write(dir.join(f), "").unwrap();
        }
        assert_eq!(socket_names(&dir).unwrap(), ["wga", "wgb"]);
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(socket_names(&dir).unwrap().is_empty(), "missing dir: none");
    }

    /// A UAPI socket in a fresh directory whose server answers each connection with
    /// `answer`, written in pieces of `piece` bytes `pause` apart.
    fn serving(
        tag: &str,
        answer: Vec<u8>,
        piece: usize,
        pause: Duration,
    ) -> (PathBuf, std::thread::JoinHandle<()>) {
        let dir = std::env::temp_dir().join(format!("plexd-uapi-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = socket_path(&dir, "wgs");
        let _ = std::fs::remove_file(&path);
        let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
        let server = std::thread::spawn(move || {
            let (mut stream, _) = listener.accept().unwrap();
            let mut request = [0u8; 7];
            stream.read_exact(&mut request).unwrap();
            for part in answer.chunks(piece) {
                // The reader gives up at its deadline; a broken pipe ends this side.
                if stream.write_all(part).is_err() {
                    return;
                }
                std::thread::sleep(pause);
            }
        });
        (path, server)
    }

    #[test]
    fn a_trickling_answer_ends_at_the_deadline_for_the_whole_answer() {
        // Each byte arrives well within the bound, the whole answer never does.
        let (path, server) = serving("slow", answer().into_bytes(), 1, Duration::from_millis(20));
        let started = Instant::now();
        let err =
            read_device_within("wgs", &path, Duration::from_millis(300), 1 << 20).unwrap_err();
        let took = started.elapsed();
        assert!(matches!(err, UapiError::TimedOut { .. }), "{err}");
        assert!(
            err.to_string()
                .starts_with("no complete answer within 300ms ("),
            "{err}"
        );
        assert!(took < Duration::from_secs(2), "took {took:?}");
        server.join().unwrap();
        std::fs::remove_dir_all(path.parent().unwrap()).unwrap();
    }

    #[test]
    fn an_endless_answer_is_cut_at_the_size_bound() {
        // Valid lines without end, as fast as the socket takes them.
        let line = format!("public_key={KEY_A}\n");
        let flood = line.repeat((4 << 20) / line.len()).into_bytes();
        let (path, server) = serving("big", flood, 64 * 1024, Duration::ZERO);
        let err = read_device_within("wgs", &path, Duration::from_secs(10), 1 << 20).unwrap_err();
        assert!(
            matches!(err, UapiError::TooLarge { limit } if limit == 1 << 20),
            "{err}"
        );
        assert!(
            err.to_string()
                .starts_with("the answer is larger than 1 MiB"),
            "{err}"
        );
        drop(err);
        server.join().unwrap();
        std::fs::remove_dir_all(path.parent().unwrap()).unwrap();
    }

    /// One peer as a test writes it in an answer.
    #[derive(Clone, Debug)]
    struct PeerText {
        key: [u8; 32],
        endpoint: Option<SocketAddr>,
        allowed: Vec<(IpAddr, u8)>,
        handshake: (u64, u32),
        rx: u64,
        tx: u64,
        keepalive: u16,
    }

    fn peer_text() -> impl Strategy<Value = PeerText> {
        let ip = prop_oneof![
            any::<[u8; 4]>().prop_map(|o| (IpAddr::from(o), 32u8)),
            any::<[u8; 16]>().prop_map(|o| (IpAddr::from(o), 128u8)),
        ]
        .prop_flat_map(|(addr, max)| (Just(addr), 0..=max));
        (
            any::<[u8; 32]>(),
            proptest::option::of(
                (ip.clone(), any::<u16>()).prop_map(|((a, _), p)| SocketAddr::new(a, p)),
            ),
            proptest::collection::vec(ip, 0..4),
            (0u64..1 << 40, 0u32..1_000_000_000),
            any::<u64>(),
            any::<u64>(),
            any::<u16>(),
        )
            .prop_map(
                |(key, endpoint, allowed, handshake, rx, tx, keepalive)| PeerText {
                    key,
                    endpoint,
                    allowed,
                    handshake,
                    rx,
                    tx,
                    keepalive,
                },
            )
    }

    /// The answer an implementation writes for these peers.
    fn render(port: u16, peers: &[PeerText]) -> String {
        let mut text = format!("private_key={}\nlisten_port={port}\n", "11".repeat(32));
        for p in peers {
            text += &format!("public_key={}\nprotocol_version=1\n", hex::encode(p.key));
            if let Some(e) = p.endpoint {
                text += &format!("endpoint={e}\n");
            }
            text += &format!(
                "last_handshake_time_sec={}\nlast_handshake_time_nsec={}\ntx_bytes={}\n\
                 rx_bytes={}\npersistent_keepalive_interval={}\n",
                p.handshake.0, p.handshake.1, p.tx, p.rx, p.keepalive
            );
            for (addr, len) in &p.allowed {
                text += &format!("allowed_ip={addr}/{len}\n");
            }
        }
        text + "errno=0\n\n"
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2_000))]

        #[test]
        fn every_peer_written_is_read_back(
            port in any::<u16>(),
            peers in proptest::collection::vec(peer_text(), 0..6),
        ) {
            let device = parse_get("wgp", render(port, &peers).as_bytes()).unwrap();
            prop_assert_eq!(device.listen_port, port);
            prop_assert_eq!(device.peers.len(), peers.len());
            for (got, want) in device.peers.iter().zip(&peers) {
                prop_assert_eq!(&got.public_key, &key_to_base64(&want.key));
                prop_assert_eq!(got.endpoint, want.endpoint);
                prop_assert_eq!((got.rx_bytes, got.tx_bytes), (want.rx, want.tx));
                let ips: Vec<(IpAddr, u8)> =
                    got.allowed_ips.iter().map(|a| (a.addr, a.prefix_len)).collect();
                prop_assert_eq!(&ips, &want.allowed);
                let never = want.handshake == (0, 0);
                prop_assert_eq!(got.last_handshake.is_none(), never);
                prop_assert_eq!(got.persistent_keepalive, (want.keepalive != 0).then_some(want.keepalive));
            }
        }

        #[test]
        fn an_answer_cut_before_its_errno_line_is_never_taken(
            peers in proptest::collection::vec(peer_text(), 1..4),
            cut in any::<proptest::sample::Index>(),
        ) {
            let text = render(51820, &peers);
            let end = text.find("errno=").unwrap();
            let prefix = &text[..cut.index(end)];
            prop_assert!(parse_get("wgp", prefix.as_bytes()).is_err());
        }

        #[test]
        fn junk_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = parse_get("wgp", &bytes);
        }

        #[test]
        fn mutated_answers_never_panic(
            peers in proptest::collection::vec(peer_text(), 1..3),
            at in any::<proptest::sample::Index>(),
            byte in any::<u8>(),
        ) {
            let mut bytes = render(51820, &peers).into_bytes();
            let i = at.index(bytes.len());
            bytes[i] = byte;
            let _ = parse_get("wgp", &bytes);
        }
    }

    #[test]
    fn a_socket_nobody_listens_on_is_stale() {
        let dir = std::env::temp_dir().join(format!("plexd-uapi-stale-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = socket_path(&dir, "wgx");
        drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
        let err = read_device("wgx", &path).unwrap_err();
        assert!(err.is_stale_socket(), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
