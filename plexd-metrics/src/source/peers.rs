//! Which peers the `latency` group probes, and at which mesh address.
//!
//! A peer's mesh address is the address configured for it in `metrics.latency.targets`
//! (by public key or name), or else its first single-host allowed IP (/32 or /128): the
//! address a mesh assigns to a node. A peer with neither is skipped. Targets that match no
//! peer of the device are probed too, under their configured key, so an explicit target is
//! never silently dropped.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::IpAddr;
use std::sync::{Arc, PoisonError, RwLock};
use std::time::Duration;

use async_trait::async_trait;
use tokio_util::sync::CancellationToken;
use tracing::debug;

use crate::collector::{BoxError, PeerLister, Pinger};
use crate::config::PeerNames;
use crate::source::icmp::IcmpPinger;
use crate::source::peer_names::PeerNamer;
use crate::source::wireguard::DeviceSource;

pub use crate::source::wireguard::AllowedIp;

/// One peer of the WireGuard device.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DevicePeer {
    /// The identifier points carry: the peer's name where one is known, else its public key.
    pub peer_id: String,
    /// The peer's public key, base64 as `wg show` prints it.
    pub public_key: String,
    /// The allowed IPs in the device's order.
    pub allowed_ips: Vec<AllowedIp>,
}

/// Reads the peers of the mesh's WireGuard device.
#[async_trait]
pub trait DevicePeers: Send + Sync {
    /// The device's peers right now.
    async fn device_peers(&self, cancel: &CancellationToken) -> Result<Vec<DevicePeer>, BoxError>;
}

/// The peers to probe, from the device and the configured targets; a [`PeerLister`].
pub struct MeshPeers {
    device: Option<Arc<dyn DevicePeers>>,
    targets: BTreeMap<String, IpAddr>,
    /// The addresses of the last listing, for [`MeshPinger`].
    addresses: RwLock<HashMap<String, IpAddr>>,
}

impl MeshPeers {
    /// Peers of `device` (if any) plus `targets` (public key or name → address).
    pub fn new(device: Option<Arc<dyn DevicePeers>>, targets: BTreeMap<String, IpAddr>) -> Self {
        Self {
            device,
            targets,
            addresses: RwLock::new(HashMap::new()),
        }
    }

    /// The mesh address `peer_id` had at the last listing.
    pub fn address_of(&self, peer_id: &str) -> Option<IpAddr> {
        self.addresses
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(peer_id)
            .copied()
    }

    /// Applies the rules to the device's peers: a configured target wins, then the first
    /// single-host allowed IP; peers with neither are left out.
    pub fn resolve(&self, device: &[DevicePeer]) -> Vec<(String, IpAddr)> {
        let mut out = Vec::with_capacity(device.len() + self.targets.len());
        let mut used_targets = HashSet::new();
        for peer in device {
            let by_key = self
                .targets
                .get_key_value(&peer.public_key)
                .or_else(|| self.targets.get_key_value(&peer.peer_id));
            let address = match by_key {
                Some((key, addr)) => {
                    used_targets.insert(key.as_str());
                    Some(*addr)
                }
                None => peer
                    .allowed_ips
                    .iter()
                    .find(|ip| ip.is_single_host())
                    .map(|ip| ip.addr),
            };
            match address {
                Some(addr) => out.push((peer.peer_id.clone(), addr)),
                None => debug!(
                    component = "metrics",
                    peer_id = %peer.peer_id,
                    "peer has no single-host allowed IP and no metrics.latency.targets entry; not probed"
                ),
            }
        }
        for (key, addr) in &self.targets {
            if !used_targets.contains(key.as_str()) {
                out.push((key.clone(), *addr));
            }
        }
        out
    }
}

#[async_trait]
impl PeerLister for MeshPeers {
    async fn peer_ids(&self, cancel: &CancellationToken) -> Result<Vec<String>, BoxError> {
        let device = match &self.device {
            Some(d) => d.device_peers(cancel).await?,
            None => Vec::new(),
        };
        let resolved = self.resolve(&device);
        let ids = resolved.iter().map(|(id, _)| id.clone()).collect();
        *self
            .addresses
            .write()
            .unwrap_or_else(PoisonError::into_inner) = resolved.into_iter().collect();
        Ok(ids)
    }
}

/// Why a peer could not be probed.
#[derive(Debug, thiserror::Error)]
pub enum PeerPingError {
    /// The peer was not in the last listing.
    #[error("peer {0:?} has no known mesh address")]
    NoAddress(String),
    /// The probe itself failed.
    #[error(transparent)]
    Icmp(#[from] crate::source::icmp::IcmpError),
}

/// Pings peers by id: looks the address up in [`MeshPeers`] and probes it with an
/// [`IcmpPinger`]; the spec's `Pinger`.
pub struct MeshPinger {
    peers: Arc<MeshPeers>,
    icmp: IcmpPinger,
}

impl MeshPinger {
    /// Probes the peers `peers` lists through `icmp`.
    pub fn new(peers: Arc<MeshPeers>, icmp: IcmpPinger) -> Self {
        Self { peers, icmp }
    }

    /// The ICMP layer, for its counters.
    pub fn icmp(&self) -> &IcmpPinger {
        &self.icmp
    }
}

#[async_trait]
impl Pinger for MeshPinger {
    async fn ping(&self, peer_id: &str) -> Result<Duration, BoxError> {
        let addr = self
            .peers
            .address_of(peer_id)
            .ok_or_else(|| PeerPingError::NoAddress(peer_id.to_owned()))?;
        Ok(self.icmp.probe(addr).await.map_err(PeerPingError::from)?)
    }

    async fn prepare(&self) -> Result<(), BoxError> {
        Ok(self.icmp.reopen_broken()?)
    }
}

/// The peers of the WireGuard devices, named as the tunnel group names them: the device
/// reader seen as [`DevicePeers`].
pub struct WireGuardPeers {
    devices: Arc<dyn DeviceSource>,
    names: PeerNamer,
}

impl WireGuardPeers {
    /// Peers of every device `devices` reads, with `peer_id` taken from `names`.
    pub fn new(devices: Arc<dyn DeviceSource>, names: PeerNames) -> Self {
        Self {
            devices,
            names: PeerNamer::new(names),
        }
    }
}

#[async_trait]
impl DevicePeers for WireGuardPeers {
    async fn device_peers(&self, cancel: &CancellationToken) -> Result<Vec<DevicePeer>, BoxError> {
        let devices = Arc::clone(&self.devices);
        // Netlink and the UAPI socket block; a cancelled cycle does not wait for them.
        let read = tokio::task::spawn_blocking(move || devices.read_devices());
        let found = tokio::select! {
            r = read => r.map_err(|e| format!("device read task failed: {e}"))??,
            () = cancel.cancelled() => return Err("cancelled while reading the WireGuard devices".into()),
        };
        let names = self.names.current();
        Ok(found
            .into_iter()
            .flat_map(|d| d.peers)
            .map(|p| DevicePeer {
                peer_id: names
                    .get(&p.public_key)
                    .cloned()
                    .unwrap_or_else(|| p.public_key.clone()),
                public_key: p.public_key,
                allowed_ips: p.allowed_ips,
            })
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn allowed(list: &[&str]) -> Vec<AllowedIp> {
        list.iter()
            .map(|s| {
                let (a, p) = s.split_once('/').unwrap();
                AllowedIp {
                    addr: ip(a),
                    prefix_len: p.parse().unwrap(),
                }
            })
            .collect()
    }

    fn peer(id: &str, key: &str, ips: &[&str]) -> DevicePeer {
        DevicePeer {
            peer_id: id.into(),
            public_key: key.into(),
            allowed_ips: allowed(ips),
        }
    }

    struct Device(Result<Vec<DevicePeer>, &'static str>);

    #[async_trait]
    impl DevicePeers for Device {
        async fn device_peers(&self, _: &CancellationToken) -> Result<Vec<DevicePeer>, BoxError> {
            self.0.clone().map_err(Into::into)
        }
    }

    #[test]
    fn first_single_host_allowed_ip_is_the_mesh_address() {
        let m = MeshPeers::new(None, BTreeMap::new());
        let got = m.resolve(&[
            peer("a", "ka", &["10.0.0.0/8", "10.100.0.2/32", "10.100.0.3/32"]),
            peer("b", "kb", &["fd00::/64", "fd00::b/128"]),
            peer("c", "kc", &["0.0.0.0/0", "::/0"]),
            peer("d", "kd", &[]),
        ]);
        assert_eq!(
            got,
            [("a".into(), ip("10.100.0.2")), ("b".into(), ip("fd00::b"))],
            "c and d have no single-host allowed IP and are skipped"
        );
    }

    #[test]
    fn targets_win_by_public_key_or_name_and_unmatched_targets_are_added() {
        let targets = BTreeMap::from([
            ("ka".to_owned(), ip("192.0.2.1")),
            ("c".to_owned(), ip("fd00::c")),
            ("lonely".to_owned(), ip("198.51.100.7")),
        ]);
        let m = MeshPeers::new(None, targets);
        let got = m.resolve(&[
            peer("a", "ka", &["10.100.0.2/32"]),
            peer("b", "kb", &["10.100.0.3/32"]),
            peer("c", "kc", &["0.0.0.0/0"]),
        ]);
        assert_eq!(
            got,
            [
                ("a".into(), ip("192.0.2.1")),
                ("b".into(), ip("10.100.0.3")),
                ("c".into(), ip("fd00::c")),
                ("lonely".into(), ip("198.51.100.7")),
            ]
        );
    }

    #[tokio::test]
    async fn listing_remembers_addresses_and_device_errors_pass_through() {
        let device = Arc::new(Device(Ok(vec![
            peer("a", "ka", &["10.100.0.2/32"]),
            peer("skip", "ks", &["10.0.0.0/24"]),
        ])));
        let m = MeshPeers::new(Some(device), BTreeMap::new());
        let ids = m.peer_ids(&CancellationToken::new()).await.unwrap();
        assert_eq!(ids, ["a"]);
        assert_eq!(m.address_of("a"), Some(ip("10.100.0.2")));
        assert_eq!(m.address_of("skip"), None);

        let m = MeshPeers::new(
            Some(Arc::new(Device(Err("wg0: no such device")))),
            BTreeMap::new(),
        );
        let e = m.peer_ids(&CancellationToken::new()).await.unwrap_err();
        assert_eq!(e.to_string(), "wg0: no such device");

        let m = MeshPeers::new(None, BTreeMap::new());
        assert!(m
            .peer_ids(&CancellationToken::new())
            .await
            .unwrap()
            .is_empty());
    }

    #[test]
    fn single_host_means_the_full_prefix_of_the_family() {
        let [v4, v6, v4net, mixed] = [
            allowed(&["10.0.0.1/32"])[0],
            allowed(&["fd00::1/128"])[0],
            allowed(&["10.0.0.1/31"])[0],
            AllowedIp {
                addr: ip("fd00::1"),
                prefix_len: 32,
            },
        ];
        assert!(v4.is_single_host() && v6.is_single_host());
        assert!(!v4net.is_single_host() && !mixed.is_single_host());
    }
}
