//! The `tunnel` group's reader: reads the WireGuard devices and the kernel programs'
//! per-endpoint counters and hands both to the join (`accounting::join`), one
//! [`TunnelStats`] per peer.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::accounting::counters::CounterSnapshot;
use crate::accounting::device::{listen_ports, Device};
use crate::accounting::join::JoinState;
use crate::collector::{BoxError, TunnelStats, TunnelStatsReader};
use crate::config::PeerNames;
use crate::source::counters::EndpointCounterSource;
use crate::source::peer_names::PeerNamer;
use crate::source::wireguard::{DeviceSource, WireGuardError};

/// Why the tunnel stats could not be read.
#[derive(Debug, thiserror::Error)]
pub enum TunnelError {
    /// The WireGuard devices could not be read.
    #[error(transparent)]
    Devices(#[from] WireGuardError),
    /// The blocking read did not finish (it panicked or the runtime is shutting down).
    #[error("the WireGuard read did not finish: {0}")]
    Task(#[from] tokio::task::JoinError),
}

/// Joins [`DeviceSource`] and, when the kernel programs run, [`EndpointCounterSource`]: the
/// agent's [`TunnelStatsReader`].
#[derive(Clone)]
pub struct WireGuardTunnelReader {
    inner: Arc<Inner>,
}

struct Inner {
    devices: Arc<dyn DeviceSource>,
    counters: Option<Arc<dyn EndpointCounterSource>>,
    names: PeerNamer,
    stale_after: Duration,
    state: Mutex<JoinState>,
    counters_failing: Mutex<bool>,
    /// The listen ports last handed to the kernel programs.
    ports: Mutex<Option<Vec<u16>>>,
    /// Endpoints whose counters the kernel programs were asked to create ahead of traffic.
    tracked: Mutex<HashSet<SocketAddr>>,
}

impl WireGuardTunnelReader {
    /// A reader over `devices`; `counters` is `None` when the kernel programs do not run,
    /// and `packet_loss_percent` is then -1.
    pub fn new(
        devices: Arc<dyn DeviceSource>,
        counters: Option<Arc<dyn EndpointCounterSource>>,
        names: PeerNames,
        stale_after: Duration,
    ) -> Self {
        Self {
            inner: Arc::new(Inner {
                devices,
                counters,
                names: PeerNamer::new(names),
                stale_after,
                state: Mutex::new(JoinState::default()),
                counters_failing: Mutex::new(false),
                ports: Mutex::new(None),
                tracked: Mutex::new(HashSet::new()),
            }),
        }
    }

    /// Hands the listen ports of `devices` to the kernel programs now, so that they count
    /// from the start rather than from the first collect. Later changes are handed over by
    /// the reads themselves.
    pub fn hand_listen_ports(&self, devices: &[Device]) {
        if let Some(counters) = &self.inner.counters {
            self.inner.update_listen_ports(counters.as_ref(), devices);
            self.inner.track_new_endpoints(counters.as_ref(), devices);
        }
    }

    /// One read, on the calling thread (which may block): what
    /// [`TunnelStatsReader::read_tunnel_stats`] runs on a blocking thread.
    pub fn read_blocking(&self, now: SystemTime) -> Result<Vec<TunnelStats>, TunnelError> {
        self.inner.read(now)
    }
}

impl Inner {
    fn read(&self, now: SystemTime) -> Result<Vec<TunnelStats>, TunnelError> {
        let devices = self.devices.read_devices()?;
        if let Some(counters) = &self.counters {
            self.update_listen_ports(counters.as_ref(), &devices);
            self.track_new_endpoints(counters.as_ref(), &devices);
        }
        let snapshot = self
            .counters
            .as_ref()
            .and_then(|c| self.read_counters(c.as_ref()));
        let names = self.names.current();
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        Ok(state.join(&devices, snapshot.as_ref(), now, &names, self.stale_after))
    }

    /// Devices come and go and change ports while the agent runs; the kernel programs learn
    /// the new set before the counters are read.
    fn update_listen_ports(&self, source: &dyn EndpointCounterSource, devices: &[Device]) {
        let ports = listen_ports(devices);
        // No device (yet): the ports written at attach (metrics.ebpf.listen_ports) stay.
        if ports.is_empty() {
            return;
        }
        let mut last = self.ports.lock().unwrap_or_else(|p| p.into_inner());
        if last.as_ref() == Some(&ports) {
            return;
        }
        match source.set_listen_ports(&ports) {
            Ok(()) => {
                info!(component = "metrics", ports = ?ports, "WireGuard listen ports handed to the kernel programs");
                *last = Some(ports);
            }
            // Tried again next cycle.
            Err(e) => {
                warn!(component = "metrics", error = %e, ports = ?ports, "cannot hand the WireGuard listen ports to the kernel programs")
            }
        }
    }

    /// Peers' endpoints get their counters before their first message, so that a burst of
    /// new peers does not wait on the kernel's allocator; failures are retried next cycle.
    fn track_new_endpoints(&self, source: &dyn EndpointCounterSource, devices: &[Device]) {
        let mut tracked = self.tracked.lock().unwrap_or_else(|p| p.into_inner());
        let new: Vec<SocketAddr> = devices
            .iter()
            .flat_map(|d| d.peers.iter().filter_map(|p| p.endpoint))
            .filter(|e| !tracked.contains(e))
            .collect();
        if new.is_empty() {
            return;
        }
        match source.track_endpoints(&new) {
            Ok(()) => tracked.extend(new),
            Err(e) => {
                warn!(component = "metrics", error = %e, endpoints = new.len(), "cannot create counters for new WireGuard endpoints ahead of their traffic")
            }
        }
    }

    /// The counters, or `None` for this cycle when they cannot be read: the device state is
    /// still worth reporting, with loss unknown (-1). Said once when it starts failing and
    /// once when it recovers, not every cycle.
    fn read_counters(&self, source: &dyn EndpointCounterSource) -> Option<CounterSnapshot> {
        let result = source.read_endpoints();
        let mut failing = self
            .counters_failing
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        match result {
            Ok(snapshot) => {
                if std::mem::replace(&mut *failing, false) {
                    info!(
                        component = "metrics",
                        "eBPF endpoint counters readable again; packet loss is measured"
                    );
                }
                Some(snapshot)
            }
            Err(e) => {
                if !std::mem::replace(&mut *failing, true) {
                    warn!(component = "metrics", error = %e, "cannot read the eBPF endpoint counters; packet_loss_percent is -1 until they can be read again");
                }
                None
            }
        }
    }
}

#[async_trait]
impl TunnelStatsReader for WireGuardTunnelReader {
    async fn read_tunnel_stats(
        &self,
        _cancel: &CancellationToken,
    ) -> Result<Vec<TunnelStats>, BoxError> {
        // Sockets and maps are read with blocking calls, each bounded by a timeout; with
        // thousands of peers that takes milliseconds the async workers should not spend.
        let inner = Arc::clone(&self.inner);
        let stats = tokio::task::spawn_blocking(move || inner.read(SystemTime::now()))
            .await
            .map_err(TunnelError::from)??;
        Ok(stats)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::accounting::join::test_support::{counts, device, peer, snapshot};

    struct FakeDevices(Mutex<Result<Vec<Device>, String>>);
    impl DeviceSource for FakeDevices {
        fn read_devices(&self) -> Result<Vec<Device>, WireGuardError> {
            self.0
                .lock()
                .unwrap()
                .clone()
                .map_err(|message| WireGuardError::Decode {
                    device: "wg0".into(),
                    message,
                })
        }
    }

    struct FakeCounters(
        Mutex<Vec<Result<CounterSnapshot, String>>>,
        Mutex<Vec<Vec<u16>>>,
    );
    impl EndpointCounterSource for FakeCounters {
        fn read_endpoints(&self) -> Result<CounterSnapshot, BoxError> {
            self.0.lock().unwrap().remove(0).map_err(Into::into)
        }
        fn set_listen_ports(&self, ports: &[u16]) -> Result<(), BoxError> {
            self.1.lock().unwrap().push(ports.to_vec());
            Ok(())
        }
    }

    #[tokio::test]
    async fn the_reader_joins_its_sources_and_survives_a_counter_failure() {
        let e = "192.0.2.1:51820";
        let devices = Arc::new(FakeDevices(Mutex::new(Ok(device(vec![peer(
            "A",
            Some(e),
        )])))));
        let counters = Arc::new(FakeCounters(
            Mutex::new(vec![
                Ok(snapshot(&[(e, counts(10, 0))])),
                Err("map gone".into()),
                Ok(snapshot(&[(e, counts(30, 10))])),
                Ok(snapshot(&[(e, counts(30, 10))])),
            ]),
            Mutex::new(vec![]),
        ));
        let reader = WireGuardTunnelReader::new(
            devices.clone(),
            Some(counters.clone()),
            PeerNames::default(),
            Duration::from_secs(180),
        );
        // At start, before any read, the kernel programs learn the ports.
        reader.hand_listen_ports(&device(vec![]));
        assert_eq!(*counters.1.lock().unwrap(), [vec![51820]]);
        let cancel = CancellationToken::new();
        let s = reader.read_tunnel_stats(&cancel).await.unwrap();
        assert_eq!(s[0].rx_packets, Some(10));
        let s = reader.read_tunnel_stats(&cancel).await.unwrap();
        assert_eq!(
            s[0].packet_loss_percent, -1.0,
            "unreadable counters: loss unknown"
        );
        assert_eq!(s[0].rx_packets, None);
        // Nothing is lost: the next good read covers both intervals.
        let s = reader.read_tunnel_stats(&cancel).await.unwrap();
        assert_eq!(s[0].rx_packets, Some(20));
        assert_eq!(s[0].lost_packets, Some(10));
        // The listen ports were handed over once, and again only when they changed.
        assert_eq!(*counters.1.lock().unwrap(), [vec![51820]]);
        devices.0.lock().unwrap().as_mut().unwrap()[0].listen_port = 51999;
        reader.read_tunnel_stats(&cancel).await.unwrap();
        assert_eq!(*counters.1.lock().unwrap(), [vec![51820], vec![51999]]);

        *devices.0.lock().unwrap() = Err("socket gone".into());
        let err = reader.read_tunnel_stats(&cancel).await.unwrap_err();
        assert_eq!(
            err.to_string(),
            "cannot decode the kernel's dump of WireGuard device wg0: socket gone"
        );
    }

    #[test]
    fn a_names_file_is_read_again_when_it_changes() {
        let dir = std::env::temp_dir().join(format!("plexd-namer-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("names.yaml");
        let key = crate::source::wireguard::key_to_base64(&[3; 32]);
        std::fs::write(&file, format!("{key}: first\n")).unwrap();
        let namer = PeerNamer::new(PeerNames::File(file.clone()));
        assert_eq!(namer.current()[&key], "first");

        let write_later = |text: String, later: u64| {
            std::fs::write(&file, text).unwrap();
            // Make the change visible even on file systems with coarse timestamps.
            let f = std::fs::File::options().write(true).open(&file).unwrap();
            f.set_modified(SystemTime::now() + Duration::from_secs(later))
                .unwrap();
        };
        write_later(format!("{key}: second\n"), 60);
        assert_eq!(namer.current()[&key], "second");
        // A broken version keeps the names loaded before.
        write_later("{{{ not yaml".into(), 120);
        assert_eq!(namer.current()[&key], "second");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
