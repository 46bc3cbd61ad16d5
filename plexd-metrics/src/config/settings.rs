//! What a config that passed validation says, in the types the agent runs with.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::num::NonZeroUsize;

use super::Config;

/// A config that passed [`Config::validate`], the only way to get one (it cannot be built
/// outside this crate). The agent and the Manager run from it, so that no value they use can
/// be one the rules would have refused.
///
/// The values the rules turn into other types (counts, addresses, parsed targets) are in
/// [`Settings::metrics`]. Everything else is read from [`Settings::config`], whose fields
/// serde already types (durations, paths, sizes, ports) and which has passed every rule.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct Settings {
    /// The validated config.
    pub config: Config,
    /// The metrics pipeline's typed values; `None` when `metrics.enabled` is false, in which
    /// case its keys were not checked and nothing is collected on a schedule.
    pub metrics: Option<MetricsSettings>,
}

/// The values of `metrics` that validation turns into the types they are used as.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct MetricsSettings {
    /// `metrics.batch_size`: most points in one report.
    pub batch_limit: NonZeroUsize,
    /// `metrics.queue.max_points`: most points the queue holds in memory; at least
    /// `batch_limit`.
    pub queue_max_points: NonZeroUsize,
    /// `metrics.health.listen`; `None` when `metrics.health.enabled` is false.
    pub health_listen: Option<SocketAddr>,
    /// `metrics.latency.targets`, each address parsed and unicast; `None` when
    /// `metrics.latency.enabled` is false.
    pub latency_targets: Option<BTreeMap<String, IpAddr>>,
    /// `metrics.prometheus.listen`; `None` when `/metrics` is off.
    pub prometheus_listen: Option<SocketAddr>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::testing::with_env;
    use std::time::Duration;

    /// The metrics settings of `cfg`, which must be valid with metrics on.
    fn metrics(cfg: &Config) -> MetricsSettings {
        cfg.validate()
            .expect("valid")
            .metrics
            .expect("metrics are on")
    }

    #[test]
    fn counts_are_the_configured_ones() {
        let cfg = Config::parse("metrics: { batch_size: 7, queue: { max_points: 70 } }").unwrap();
        let m = metrics(&cfg);
        assert_eq!((m.batch_limit.get(), m.queue_max_points.get()), (7, 70));
        assert_eq!(metrics(&Config::default()).batch_limit.get(), 100);
    }

    #[test]
    fn what_is_off_has_no_settings() {
        let cfg = Config::parse("metrics: { enabled: false, batch_size: 0 }").unwrap();
        assert!(cfg.validate().unwrap().metrics.is_none());
        let cfg = Config::parse(
            "metrics: { health: { enabled: false, listen: nope }, \
             latency: { enabled: false, targets: { a: nowhere } } }",
        )
        .unwrap();
        let m = metrics(&cfg);
        assert_eq!((m.health_listen, m.latency_targets), (None, None));
    }

    #[test]
    fn health_defaults_to_this_host_and_takes_any_socket_address() {
        let health = Config::parse("").unwrap().metrics.health;
        assert!(health.enabled);
        assert_eq!(
            metrics(&Config::parse("").unwrap()).health_listen,
            Some("127.0.0.1:9102".parse().unwrap())
        );
        let cfg = Config::parse("metrics: { health: { listen: '[::]:0' } }").unwrap();
        assert_eq!(metrics(&cfg).health_listen, Some("[::]:0".parse().unwrap()));
        let env = with_env(
            None,
            &[("PLEXD_METRICS_METRICS_HEALTH_LISTEN", "0.0.0.0:9102")],
        );
        assert_eq!(env.unwrap().metrics.health.listen, "0.0.0.0:9102");
    }

    #[test]
    fn latency_defaults_and_a_full_example() {
        let d = Config::default().metrics.latency;
        assert!(d.enabled);
        assert_eq!(d.probes, 3);
        assert_eq!(d.timeout, Duration::from_secs(1));
        assert!(d.interface.is_empty());
        assert!(d.targets.is_empty());

        let cfg = Config::parse(
            r#"
metrics:
  latency:
    enabled: true
    interface: wg0
    probes: 5
    timeout: 500ms
    targets:
      "xTIBA5rboUvnH4htodjb6e697QjLERt1NAB4mZqp8Dg=": 10.100.0.2
      peer-b: " fd00::2 "
"#,
        )
        .unwrap();
        let t = metrics(&cfg).latency_targets.expect("latency is on");
        let l = &cfg.metrics.latency;
        assert_eq!((l.interface.as_str(), l.probes), ("wg0", 5));
        assert_eq!(l.timeout, Duration::from_millis(500));
        assert_eq!(
            t["xTIBA5rboUvnH4htodjb6e697QjLERt1NAB4mZqp8Dg="],
            "10.100.0.2".parse::<IpAddr>().unwrap()
        );
        assert_eq!(t["peer-b"], "fd00::2".parse::<IpAddr>().unwrap());
    }
}
