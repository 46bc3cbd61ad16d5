//! Wires sources, collectors, the Manager and a reporter together from a [`Config`].
//!
//! This is the one place that decides which parts run and the one place that spawns
//! long-lived tasks, so shutdown has a single path: cancel the token, await the tasks.

use std::sync::Arc;
use std::time::Instant;

use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::api::MetricBatch;
use crate::collector::{AgentStatsCollector, Collector, KernelCounters, SystemCollector};
use crate::config::AttachModeConfig;
use crate::config::Config;
use crate::manager::{Manager, RunOutcome};
use crate::reporter::{MetricReporter, StdoutReporter};
use crate::source::ebpf::{
    default_route_interfaces, embedded_object, AttachMode, ProbeOptions, UnderlayProbe,
};
use crate::source::proc::LinuxSystemReader;

/// Why the agent could not start. Every variant is a configuration or environment
/// problem the user has to fix; the binary exits with code 2 for them.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// The configured proc root or mount point cannot be read.
    #[error("metrics: system: {0}")]
    System(#[from] crate::source::proc::ProcError),
    /// Reporting to a control plane was asked for, but this build cannot do it yet.
    #[error(
        "control_plane.url is set, but this build has no control plane reporter yet; \
         remove control_plane.url to use the stdout sink"
    )]
    ControlPlaneUnsupported,
}

/// The assembled pipeline, ready to run.
pub struct Agent {
    manager: Manager,
    // Keeps the kernel programs attached for as long as the agent lives; dropping it detaches.
    _probe: Option<Arc<UnderlayProbe>>,
}

impl Agent {
    /// Builds the pipeline for `cfg`, which must have passed [`Config::validate`].
    ///
    /// Attaching the kernel programs may fail (no privileges, no such interface); the agent
    /// then runs without them and says so, because the other groups are still worth having.
    pub fn build(cfg: &Config) -> Result<Self, AgentError> {
        let started = Instant::now();
        if !cfg.control_plane.url.is_empty() {
            return Err(AgentError::ControlPlaneUnsupported);
        }
        let system = &cfg.metrics.system;
        let net_interface = Some(system.net_interface.clone()).filter(|s| !s.is_empty());
        let reader = LinuxSystemReader::new(&system.proc_root, &system.mount_point, net_interface);
        reader.check()?;

        let probe = if cfg.metrics.enabled && cfg.metrics.ebpf.enabled {
            attach_probe(cfg)
        } else {
            None
        };
        let kernel = probe.clone().map(|p| p as Arc<dyn KernelCounters>);
        let collectors: Vec<Arc<dyn Collector>> = vec![
            Arc::new(SystemCollector::new(reader)),
            Arc::new(AgentStatsCollector::new(started, None, kernel)),
        ];
        let reporter: Arc<dyn MetricReporter> = Arc::new(StdoutReporter::new());

        Ok(Self {
            manager: Manager::new(
                cfg.metrics.clone(),
                collectors,
                reporter,
                cfg.node_id.clone(),
            ),
            _probe: probe,
        })
    }

    /// One collection cycle, returned as a batch instead of reported.
    pub async fn collect_once(&self) -> MetricBatch {
        self.manager.collect_once(&CancellationToken::new()).await
    }

    /// Runs until SIGTERM or SIGINT, then flushes what is buffered and detaches.
    pub async fn run_until_signalled(self) -> std::io::Result<RunOutcome> {
        let cancel = CancellationToken::new();
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
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
        let outcome = self.manager.run(cancel.clone()).await;
        cancel.cancel();
        // The signal task ends as soon as the token is cancelled.
        let _ = signals.await;
        Ok(outcome)
    }
}

fn attach_probe(cfg: &Config) -> Option<Arc<UnderlayProbe>> {
    let interfaces = if cfg.metrics.ebpf.interfaces.is_empty() {
        match default_route_interfaces(&cfg.metrics.system.proc_root) {
            Ok(found) if !found.is_empty() => found,
            Ok(_) => {
                warn!(
                    component = "metrics",
                    "no default route found to attach the kernel programs to; set metrics.ebpf.interfaces"
                );
                return None;
            }
            Err(e) => {
                warn!(component = "metrics", error = %e, "cannot find the underlay interfaces; set metrics.ebpf.interfaces");
                return None;
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
            Some(Arc::new(probe))
        }
        Err(e) => {
            error!(
                component = "metrics",
                error = %e,
                "kernel programs not attached; running without eBPF (set metrics.ebpf.enabled: false to silence this)"
            );
            None
        }
    }
}
