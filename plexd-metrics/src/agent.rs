//! Wires sources, collectors, the Manager and a reporter together from [`Settings`].
//!
//! This is the one place that decides which parts run and the one place that spawns
//! long-lived tasks, so shutdown has a single path: cancel the token, await the tasks.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::os::unix::fs::DirBuilderExt as _;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use crate::accounting::app_metrics::DEFAULT_MAX_BODY_BYTES;
use crate::api::MetricBatch;
use crate::collector::{
    AgentStatsCollector, AppFetcher, AppsCollector, Collector, GpuCollector, KernelCounters,
    LatencyCollector, LatencySettings, ReconnectCounter, SystemCollector, TunnelCollector,
};
use crate::config::{AttachModeConfig, Config, Settings};
use crate::config::{GpuConfig, PrometheusConfig};
use crate::health::{EbpfState, HealthError, HealthServer, HealthState};
use crate::manager::{
    CollectionStats, DeliveryStats, Heartbeat, Manager, ManagerOptions, RunOutcome,
};
use crate::prometheus::exposition::{Exposition, ExpositionError, MetricsServer, Rendered};
use crate::prometheus::series::SeriesBook;
use crate::queue::{DeliveryQueue, QueueLimits};
use crate::reporter::{
    ControlPlaneReporter, LocalReporter, MetricReporter, MultiReporter, RemoteWriteReporter,
    ReportError, StdoutReporter,
};
use crate::secret::{NodeSecretKey, SecretError};
use crate::source::apps::HttpAppFetcher;
use crate::source::counters::EndpointCounterSource;
use crate::source::ebpf::{embedded_object, AttachMode, ProbeOptions, UnderlayProbe};
use crate::source::gpu::NvmlGpus;
use crate::source::icmp::{IcmpOptions, IcmpPinger};
use crate::source::peers::{DevicePeers, MeshPeers, MeshPinger, WireGuardPeers};
use crate::source::proc::LinuxSystemReader;
use crate::source::tunnel::WireGuardTunnelReader;
use crate::source::underlay::underlay_interfaces;
use crate::source::wireguard::{Device, DeviceSource, SystemDevices};

/// Why the agent could not start. All but [`AgentError::Signals`] are configuration or
/// environment problems the user has to fix ([`AgentError::is_configuration`]); the binary
/// exits with code 2 for them.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// The configured proc root or mount point cannot be read.
    #[error("metrics: system: {0}")]
    System(#[from] crate::source::proc::ProcError),
    /// A reporter's HTTP client cannot be set up (an unusable CA or client certificate).
    #[error("metrics: {0}")]
    Reporter(#[from] ReportError),
    /// The node secret key file cannot be used.
    #[error("control_plane.node_secret_key_file: {0}")]
    NodeSecretKey(#[from] SecretError),
    /// The health endpoint cannot listen where the config says.
    #[error(transparent)]
    Health(#[from] HealthError),
    /// The durable queue's directory is held by another agent.
    #[error(transparent)]
    Queue(#[from] crate::queue::spool::SpoolError),
    /// `/metrics` cannot start: its address, token file or certificate.
    #[error(transparent)]
    Prometheus(#[from] ExpositionError),
    /// SIGTERM and SIGINT cannot be caught, so the agent could not shut down cleanly.
    #[error("cannot install signal handlers: {0}")]
    Signals(std::io::Error),
}

impl AgentError {
    /// Whether the user fixes this in the config or the environment (exit code 2), rather
    /// than it being a fault of the agent or the machine.
    pub fn is_configuration(&self) -> bool {
        !matches!(self, Self::Signals(_))
    }
}

/// The assembled pipeline, ready to run.
pub struct Agent {
    manager: Manager,
    // The durable queue's directory and bounds; opened when the agent runs (not for `--once`,
    // which must not take the directory's lock).
    queue: Option<(PathBuf, QueueLimits)>,
    // Keeps the kernel programs attached for as long as the agent lives; dropping it detaches.
    _probe: Option<Arc<UnderlayProbe>>,
    // Where and what the health endpoint serves, when it is on.
    health: Option<(SocketAddr, HealthState)>,
    // The Prometheus exposition, when `metrics.prometheus.listen` is set.
    prometheus: Option<PrometheusParts>,
    // Remote write beside the control plane: a destination with a queue of its own (in
    // `metrics.queue.dir`/remote_write when the queue is durable).
    remote_write: Option<(Arc<dyn MetricReporter>, Arc<DeliveryStats>)>,
}

/// What `/metrics` needs to start: the task that folds the points, where it listens and
/// how it is protected.
struct PrometheusParts {
    exposition: Exposition,
    rendered: tokio::sync::watch::Receiver<Arc<Rendered>>,
    addr: SocketAddr,
    cfg: PrometheusConfig,
}

impl Agent {
    /// Builds the pipeline for `settings`.
    ///
    /// Attaching the kernel programs may fail (no privileges, no such interface); the agent
    /// then runs without them and says so, because the other groups are still worth having.
    pub fn build(settings: &Settings) -> Result<Self, AgentError> {
        let started = Instant::now();
        let cfg = &settings.config;
        let options = ManagerOptions::from_settings(settings);
        let system = &cfg.metrics.system;
        let net_interface = Some(system.net_interface.clone()).filter(|s| !s.is_empty());
        let reader = LinuxSystemReader::new(&system.proc_root, &system.mount_point, net_interface)
            .with_disks(&system.sys_root, system.disk_devices.clone());
        reader.check()?;

        let wireguard = &cfg.metrics.wireguard;
        let tunnel_on = cfg.metrics.enabled && wireguard.enabled;
        let devices = Arc::new(SystemDevices::new(
            wireguard.interfaces.clone(),
            &wireguard.socket_dir,
        ));
        // What is there at start: which devices the tunnel group will report, and where
        // their encrypted traffic goes (for the kernel programs).
        let found = if tunnel_on || cfg.metrics.ebpf.interfaces.is_empty() {
            read_devices_at_start(&devices, tunnel_on)
        } else {
            Vec::new()
        };

        let (probe, ebpf_state) = if cfg.metrics.enabled && cfg.metrics.ebpf.enabled {
            match attach_probe(cfg, &found) {
                Ok(probe) => (Some(probe), EbpfState::Attached),
                Err(why) => (None, EbpfState::Failed(why)),
            }
        } else {
            (None, EbpfState::Disabled)
        };
        let kernel = probe.clone().map(|p| p as Arc<dyn KernelCounters>);
        let delivery = Arc::new(DeliveryStats::default());
        let destinations = build_destinations(cfg)?;
        // Remote write beside the control plane reports its figures in the agent group too.
        let remote_write_stats = destinations
            .remote_write
            .as_ref()
            .map(|_| Arc::new(DeliveryStats::default()));
        let reconnects = delivery.clone() as Arc<dyn ReconnectCounter>;
        let collection = Arc::new(CollectionStats::default());
        let mut collectors: Vec<Arc<dyn Collector>> = vec![
            Arc::new(SystemCollector::new(reader)),
            Arc::new({
                let collector = AgentStatsCollector::new(started, Some(reconnects), kernel)
                    .with_delivery(delivery.clone())
                    .with_abandoned(collection.clone());
                match &remote_write_stats {
                    Some(stats) => collector.with_destination("remote_write", stats.clone()),
                    None => collector,
                }
            }),
        ];
        let metrics = settings.metrics.as_ref();
        if let Some(targets) = metrics.and_then(|m| m.latency_targets.as_ref()) {
            // The WireGuard devices' peers are probed when the tunnel group reads them too.
            let device_peers = wireguard.enabled.then(|| {
                Arc::new(WireGuardPeers::new(
                    devices.clone(),
                    wireguard.peer_names.clone(),
                )) as Arc<dyn DevicePeers>
            });
            collectors.extend(latency_collector(cfg, targets, device_peers));
        }
        if cfg.metrics.enabled && cfg.metrics.gpu.enabled {
            collectors.extend(gpu_collector(&cfg.metrics.gpu));
        }
        if tunnel_on {
            let counters = endpoint_counters(probe.as_ref());
            if counters.is_none() {
                warn!(
                    component = "metrics",
                    "packet loss is not measured: the kernel programs do not count WireGuard \
                     endpoints here, so the tunnel group reports packet_loss_percent -1 and no \
                     packet counts (the device state is still reported)"
                );
            }
            let tunnel = WireGuardTunnelReader::new(
                devices,
                counters,
                wireguard.peer_names.clone(),
                wireguard.stale_after,
            );
            tunnel.hand_listen_ports(&found);
            collectors.push(Arc::new(TunnelCollector::new(tunnel)));
        }
        if metrics.is_some() && !cfg.metrics.apps.is_empty() {
            collectors.push(apps_collector(cfg)?);
        }
        let heartbeat = Arc::new(Heartbeat::default());
        // With metrics off the agent does nothing and exits, so there is nothing to probe.
        let health = options
            .zip(metrics.and_then(|m| m.health_listen))
            .map(|(options, addr)| {
                let state =
                    HealthState::new(&options, heartbeat.clone(), delivery.clone(), ebpf_state);
                (addr, state)
            });
        let queue = options
            .zip(cfg.metrics.queue.dir.clone())
            .map(|(options, dir)| (dir, options.limits));

        let mut manager = Manager::new(
            options,
            collectors,
            destinations.primary,
            cfg.node_id.clone(),
        )
        .with_primary_name(destinations.primary_name)
        .with_delivery_stats(delivery)
        .with_collection_stats(collection)
        .with_heartbeat(heartbeat);
        let remote_write = destinations.remote_write.zip(remote_write_stats);
        let prometheus = metrics.and_then(|m| m.prometheus_listen).map(|addr| {
            let book = SeriesBook::new(env!("CARGO_PKG_VERSION"), destinations.primary_name);
            let (exposition, tap, rendered) = Exposition::new(book);
            manager.set_points_tap(tap);
            PrometheusParts {
                exposition,
                rendered,
                addr,
                cfg: cfg.metrics.prometheus.clone(),
            }
        });

        Ok(Self {
            manager,
            queue,
            remote_write,
            _probe: probe,
            health,
            prometheus,
        })
    }

    /// One collection cycle, returned as a batch instead of reported.
    pub async fn collect_once(&self) -> MetricBatch {
        self.manager
            .collect_once(
                crate::collector::Cycle::default(),
                &CancellationToken::new(),
            )
            .await
    }

    /// Serves the health endpoint and runs until SIGTERM or SIGINT, then flushes what is
    /// buffered and detaches.
    pub async fn run_until_signalled(self) -> Result<RunOutcome, AgentError> {
        let cancel = CancellationToken::new();
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .map_err(AgentError::Signals)?;
        let Agent {
            mut manager,
            queue,
            remote_write,
            _probe,
            health,
            prometheus,
        } = self;
        // Before anything is served: a directory another agent holds stops this one at once.
        let remote_write_queue = match &queue {
            Some((dir, limits)) if remote_write.is_some() => {
                let own = dir.join(crate::queue::spool::REMOTE_WRITE_DIR);
                // Readable by the agent alone, like the queue's files: points name peers.
                // Should this fail, opening the queue says why and it runs in memory.
                let _ = std::fs::DirBuilder::new()
                    .mode(0o700)
                    .create(&own)
                    .or_else(|e| match e.kind() {
                        std::io::ErrorKind::AlreadyExists => Ok(()),
                        _ => Err(e),
                    });
                Some(DeliveryQueue::open(&own, *limits)?)
            }
            _ => None,
        };
        if let Some((dir, limits)) = queue {
            manager = manager.with_queue(DeliveryQueue::open(&dir, limits)?);
        }
        if let Some((reporter, stats)) = remote_write {
            manager.add_destination("remote_write", reporter, remote_write_queue, stats);
        }
        // Bound before anything runs, so that a taken port stops the agent at once.
        let health = match health {
            Some((addr, state)) => {
                let server = HealthServer::bind(addr, state)?;
                Some(tokio::spawn(server.serve(cancel.clone())))
            }
            None => None,
        };
        let prometheus = match prometheus {
            Some(parts) => {
                let server = MetricsServer::bind(parts.addr, &parts.cfg, parts.rendered)?;
                let exposition = tokio::spawn(parts.exposition.run(cancel.clone()));
                let server = tokio::spawn(server.serve(cancel.clone()));
                Some((exposition, server))
            }
            None => None,
        };
        let signals = tokio::spawn({
            let cancel = cancel.clone();
            async move {
                tokio::select! {
                    _ = term.recv() => info!(component = "metrics", "SIGTERM received; shutting down"),
                    r = tokio::signal::ctrl_c() => match r {
                        Ok(()) => info!(component = "metrics", "SIGINT received; shutting down"),
                        Err(e) => error!(component = "metrics", error = %e, "cannot listen for SIGINT"),
                    },
                    () = cancel.cancelled() => {}
                }
                cancel.cancel();
            }
        });
        // On a worker thread rather than the thread blocked in `block_on`: wake-ups between
        // the collectors and the sockets' receive tasks then stay on the runtime's workers
        // instead of crossing to another thread for every probe reply.
        let manager = tokio::spawn({
            let cancel = cancel.clone();
            async move { manager.run(cancel).await }
        });
        let outcome = match manager.await {
            Ok(outcome) => outcome,
            Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
            Err(e) => return Err(AgentError::Signals(std::io::Error::other(e))),
        };
        cancel.cancel();
        // The signal and health tasks end as soon as the token is cancelled.
        let _ = signals.await;
        if let Some(health) = health {
            let _ = health.await;
        }
        if let Some((exposition, server)) = prometheus {
            let _ = exposition.await;
            let _ = server.await;
        }
        Ok(outcome)
    }
}

/// The control plane when one is configured (with the local endpoint beside it when that is
/// configured too), stdout otherwise.
/// The destinations: the primary one (whose figures are the `agent` group's and
/// readiness'), named, and remote write beside it when both it and the control plane are
/// configured. Remote write alone is the primary; stdout is the primary only when nothing
/// else is configured.
fn build_destinations(cfg: &Config) -> Result<Destinations, AgentError> {
    let remote_write = if cfg.metrics.enabled && cfg.metrics.remote_write.is_configured() {
        let reporter = RemoteWriteReporter::new(&cfg.metrics.remote_write, &cfg.node_id)?;
        info!(component = "metrics", url = %reporter.url(), "remote write enabled");
        Some(Arc::new(reporter) as Arc<dyn MetricReporter>)
    } else {
        None
    };
    if cfg.control_plane.is_configured() {
        return Ok(Destinations {
            primary: build_reporter(cfg)?,
            primary_name: "control_plane",
            remote_write,
        });
    }
    Ok(match remote_write {
        Some(remote_write) => Destinations {
            primary: remote_write,
            primary_name: "remote_write",
            remote_write: None,
        },
        None => Destinations {
            primary: Arc::new(StdoutReporter::new()),
            primary_name: "stdout",
            remote_write: None,
        },
    })
}

/// Where batches go.
struct Destinations {
    primary: Arc<dyn MetricReporter>,
    primary_name: &'static str,
    /// Remote write beside the control plane, in a lane of its own.
    remote_write: Option<Arc<dyn MetricReporter>>,
}

/// The control plane's reporter, with the local endpoint beside it when that is configured.
fn build_reporter(cfg: &Config) -> Result<Arc<dyn MetricReporter>, AgentError> {
    let control_plane = Arc::new(ControlPlaneReporter::new(&cfg.control_plane)?);
    info!(
        component = "metrics",
        url = %cfg.control_plane.url,
        node_id = %cfg.node_id,
        "reporting to the control plane"
    );
    let local = &cfg.metrics.local_endpoint;
    if !cfg.metrics.enabled || !local.is_configured() {
        return Ok(control_plane);
    }
    let path = cfg
        .control_plane
        .node_secret_key_file
        .as_deref()
        .ok_or_else(|| {
            ReportError::Setup(
                "metrics: config: local_endpoint: control_plane.node_secret_key_file is required"
                    .into(),
            )
        })?;
    let key = NodeSecretKey::load(path)?;
    let local_reporter = LocalReporter::new(local, control_plane.clone(), key, &cfg.node_id)?;
    info!(component = "metrics", pipeline = "metrics", url = %local.url, "local endpoint enabled");
    Ok(Arc::new(MultiReporter::new(
        control_plane,
        Arc::new(local_reporter),
    )))
}

/// The `latency` collector: the WireGuard devices' peers (when `device_peers` is given) and
/// `targets` (`metrics.latency.targets`), if there is a socket to probe them with.
///
/// Must run inside the runtime: the pinger starts its receive tasks, which live as long as
/// the collector.
/// The `gpu` group's collector, or `None` with a warning when NVML or a GPU is missing:
/// the other groups are worth having on such a node too.
fn gpu_collector(cfg: &GpuConfig) -> Option<Arc<dyn Collector>> {
    match NvmlGpus::open(cfg.library.as_deref()) {
        Ok((gpus, count)) => {
            info!(
                component = "metrics",
                gpus = count,
                "reporting NVIDIA GPUs through NVML"
            );
            Some(Arc::new(GpuCollector::new(Arc::new(gpus))))
        }
        Err(why) => {
            warn!(component = "metrics", "the gpu group is off: {why}");
            None
        }
    }
}

fn latency_collector(
    cfg: &Config,
    targets: &BTreeMap<String, IpAddr>,
    device_peers: Option<Arc<dyn DevicePeers>>,
) -> Option<Arc<dyn Collector>> {
    let latency = &cfg.metrics.latency;
    if targets.is_empty() && device_peers.is_none() {
        debug!(
            component = "metrics",
            "no metrics.latency.targets and metrics.wireguard is off; the latency group is not collected"
        );
        return None;
    }
    let options = IcmpOptions {
        interface: Some(latency.interface.clone()).filter(|i| !i.is_empty()),
        ..IcmpOptions::default()
    };
    let icmp = match IcmpPinger::open(&options) {
        Ok(icmp) => icmp,
        Err(e) => {
            error!(
                component = "metrics",
                error = %e,
                "latency not measured (set metrics.latency.enabled: false to silence this)"
            );
            return None;
        }
    };
    let peers = Arc::new(MeshPeers::new(device_peers, targets.clone()));
    let pinger = Arc::new(MeshPinger::new(peers.clone(), icmp));
    info!(
        component = "metrics",
        targets = targets.len(),
        probes = latency.probes,
        "latency collector enabled"
    );
    Some(Arc::new(LatencyCollector::new(
        pinger,
        peers,
        LatencySettings::from_config(&cfg.metrics),
    )))
}

/// The `app` collector: one HTTP fetcher per entry of `metrics.apps`.
fn apps_collector(cfg: &Config) -> Result<Arc<dyn Collector>, AgentError> {
    let apps = cfg
        .metrics
        .apps
        .iter()
        .enumerate()
        .map(|(i, app)| {
            HttpAppFetcher::new(i, app, DEFAULT_MAX_BODY_BYTES)
                .map(|f| Arc::new(f) as Arc<dyn AppFetcher>)
        })
        .collect::<Result<Vec<_>, _>>()?;
    let names: Vec<&str> = cfg.metrics.apps.iter().map(|a| a.name.as_str()).collect();
    info!(component = "metrics", apps = ?names, "application endpoints enabled");
    Ok(Arc::new(AppsCollector::new(apps)))
}

/// The kernel programs' per-endpoint counts for the tunnel join; `None` without them, and
/// the tunnel group then reports the device state with `packet_loss_percent` -1.
fn endpoint_counters(probe: Option<&Arc<UnderlayProbe>>) -> Option<Arc<dyn EndpointCounterSource>> {
    probe.map(|p| Arc::clone(p) as Arc<dyn EndpointCounterSource>)
}

/// Reads the WireGuard devices once at start and says what was found. Devices may also
/// appear later: the tunnel group reads them again every cycle.
fn read_devices_at_start(devices: &SystemDevices, tunnel_on: bool) -> Vec<Device> {
    match devices.read_devices() {
        Ok(found) => {
            if tunnel_on {
                if found.is_empty() {
                    info!(
                        component = "metrics",
                        "no WireGuard device yet; the tunnel group reports peers once one appears"
                    );
                } else {
                    let names: Vec<String> = found
                        .iter()
                        .map(|d| {
                            format!("{} ({}, {} peers)", d.name, d.implementation, d.peers.len())
                        })
                        .collect();
                    info!(component = "metrics", devices = ?names, "WireGuard devices found");
                }
            }
            found
        }
        Err(e) => {
            if tunnel_on {
                warn!(component = "metrics", error = %e, "cannot read the WireGuard devices at start; the tunnel group tries again every cycle");
            }
            Vec::new()
        }
    }
}

/// Attaches the kernel programs, or says why not (logged here; the text goes to readiness).
fn attach_probe(cfg: &Config, devices: &[Device]) -> Result<Arc<UnderlayProbe>, String> {
    let interfaces = if cfg.metrics.ebpf.interfaces.is_empty() {
        match underlay_interfaces(devices, &cfg.metrics.system.proc_root) {
            Ok(found) => found,
            Err(e) => {
                // Every error of the lookup already ends with the key to set.
                warn!(component = "metrics", error = %e, "cannot find the underlay interfaces");
                return Err(format!("cannot find the underlay interfaces: {e}"));
            }
        }
    } else {
        cfg.metrics.ebpf.interfaces.clone()
    };
    let ebpf = &cfg.metrics.ebpf;
    let options = ProbeOptions {
        mode: match ebpf.attach_mode {
            AttachModeConfig::Auto => AttachMode::Auto,
            AttachModeConfig::Netlink => AttachMode::Netlink,
        },
        max_endpoints: ebpf.max_peers,
        max_sessions: ebpf.max_sessions,
        reorder_timeout: ebpf.reorder_timeout,
    };
    let attached = UnderlayProbe::attach_with_options(embedded_object(), &interfaces, &options)
        .and_then(|probe| {
            // The configured ports stand in until the WireGuard device reader supplies the
            // devices' own.
            probe.write_listen_ports(&ebpf.listen_ports)?;
            Ok(probe)
        });
    match attached {
        Ok(probe) => {
            info!(
                component = "metrics",
                interfaces = ?interfaces,
                listen_ports = ?ebpf.listen_ports,
                "kernel programs attached"
            );
            Ok(Arc::new(probe))
        }
        Err(e) => {
            error!(
                component = "metrics",
                error = %e,
                "kernel programs not attached; running without eBPF (set metrics.ebpf.enabled: false to silence this)"
            );
            Err(e.to_string())
        }
    }
}
