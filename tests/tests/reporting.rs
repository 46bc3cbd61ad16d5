//! The reporters and the Manager against real servers on loopback: the wire format, TLS,
//! tokens, retries without loss, the local endpoint's credential and the MultiReporter.
//! No privileges needed.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use plexd_metrics::api::MetricPoint;
use plexd_metrics::collector::{
    BoxError, CollectError, Collector, DeliveryCounters, ReconnectCounter,
};
use plexd_metrics::config::{ControlPlaneConfig, LocalEndpointConfig};
use plexd_metrics::manager::{DeliveryStats, Manager, ManagerOptions};
use plexd_metrics::queue::QueueLimits;
use plexd_metrics::reporter::{
    classify, ControlPlaneReporter, Failure, LocalReporter, MetricReporter, MultiReporter,
    SecretFetcher,
};
use plexd_metrics::secret::NodeSecretKey;
use plexd_metrics_tests::control_plane::{Behaviour, Options, TempDir, TestControlPlane};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// Bound on waiting for a request that should come at once.
const SOON: Duration = Duration::from_secs(15);
const NSK: [u8; 32] = [0x5a; 32];

fn cp_config(server: &TestControlPlane, dir: &TempDir, token: &str) -> ControlPlaneConfig {
    let https = server.url().starts_with("https");
    ControlPlaneConfig {
        url: server.url(),
        token_file: Some(dir.write("token", token)),
        ca_file: https.then(|| dir.write("ca.pem", server.ca_pem())),
        timeout: Duration::from_secs(5),
        ..ControlPlaneConfig::default()
    }
}

fn point(group: &str, peer: &str, n: u64) -> MetricPoint {
    MetricPoint::new(
        chrono::Utc::now(),
        group,
        peer,
        &serde_json::json!({"n": n, "ratio": 0.5, "ok": true}),
    )
    .unwrap()
}

fn ns(points: &[MetricPoint]) -> Vec<u64> {
    points
        .iter()
        .map(|p| p.data.to_value()["n"].as_u64().unwrap())
        .collect()
}

#[tokio::test]
async fn the_wire_format_is_the_api_contract() {
    let server = TestControlPlane::https();
    server.require_token("s3cret-token");
    let dir = TempDir::new("wire");
    let reporter = ControlPlaneReporter::new(&cp_config(&server, &dir, "s3cret-token\n")).unwrap();
    let batch = [point("system", "", 1), point("tunnel", "peer-abc-123", 2)];
    let key = Uuid::new_v4();
    reporter.report_batch("node-1", key, &batch).await.unwrap();

    let r = server.next(SOON).await;
    assert_eq!(r.method, "POST");
    assert_eq!(r.path, "/v1/nodes/node-1/metrics");
    assert_eq!(r.header("content-type"), Some("application/json"));
    assert_eq!(r.header("content-encoding"), Some("gzip"));
    assert_eq!(r.header("authorization"), Some("Bearer s3cret-token"));
    assert_eq!(r.header("idempotency-key"), Some(key.to_string().as_str()));
    let agent = r.header("user-agent").unwrap();
    assert_eq!(
        agent,
        format!("plexd-metrics/{}", env!("CARGO_PKG_VERSION"))
    );

    let json = r.json();
    let array = json.as_array().expect("a JSON array");
    assert_eq!(array.len(), 2);
    let system = array[0].as_object().unwrap();
    let keys: Vec<&str> = system.keys().map(String::as_str).collect();
    assert_eq!(
        keys,
        ["timestamp", "group", "data"],
        "no peer_id on host points"
    );
    let ts = system["timestamp"].as_str().unwrap();
    assert!(ts.ends_with('Z'));
    chrono::DateTime::parse_from_rfc3339(ts).unwrap();
    assert_eq!(system["group"], "system");
    assert!(system["data"].is_object());
    assert_eq!(array[1]["peer_id"], "peer-abc-123");
    assert_eq!(array[1]["data"]["ratio"], 0.5);
    assert_eq!(r.points(), batch);
}

#[tokio::test]
async fn plain_http_to_loopback_and_a_base_path_work() {
    let server = TestControlPlane::http();
    let dir = TempDir::new("http");
    let mut cfg = cp_config(&server, &dir, "t");
    cfg.url = format!("{}/api/", server.url());
    let reporter = ControlPlaneReporter::new(&cfg).unwrap();
    reporter
        .report_metrics("node/1", &[point("agent", "", 1)])
        .await
        .unwrap();
    let r = server.next(SOON).await;
    assert_eq!(r.path, "/api/v1/nodes/node%2F1/metrics");
    assert!(
        Uuid::parse_str(r.key().unwrap()).is_ok(),
        "a fresh UUID per batch"
    );
}

#[tokio::test]
async fn a_4xx_is_a_rejection_with_the_bodys_first_line_and_5xx_408_429_are_retried() {
    let server = TestControlPlane::http();
    let dir = TempDir::new("status");
    let reporter = ControlPlaneReporter::new(&cp_config(&server, &dir, "t")).unwrap();
    let batch = [point("agent", "", 1)];
    server.script([
        Behaviour::Status(422, "unknown group \"agnet\"\nstack trace follows".into()),
        Behaviour::Status(500, "boom".into()),
        Behaviour::Status(408, String::new()),
        Behaviour::TooManyRequests(7),
    ]);
    let e = reporter.report_metrics("n", &batch).await.unwrap_err();
    assert_eq!(classify(&e), Failure::Rejected);
    let text = e.to_string();
    assert!(
        text.contains("422 Unprocessable Entity: unknown group \"agnet\""),
        "{text}"
    );
    assert!(!text.contains("stack trace"), "first line only: {text}");
    let e = reporter.report_metrics("n", &batch).await.unwrap_err();
    assert_eq!(classify(&e), Failure::Retry { after: None });
    let e = reporter.report_metrics("n", &batch).await.unwrap_err();
    assert_eq!(classify(&e), Failure::Retry { after: None });
    let e = reporter.report_metrics("n", &batch).await.unwrap_err();
    assert_eq!(
        classify(&e),
        Failure::Retry {
            after: Some(Duration::from_secs(7))
        }
    );
}

#[tokio::test]
async fn a_rotated_token_is_used_at_once_and_never_appears_in_errors() {
    let server = TestControlPlane::https();
    let dir = TempDir::new("rotate");
    let cfg = cp_config(&server, &dir, "token-one");
    let reporter = ControlPlaneReporter::new(&cfg).unwrap();
    let batch = [point("agent", "", 1)];

    server.require_token("token-one");
    reporter.report_metrics("n", &batch).await.unwrap();
    assert_eq!(
        server.next(SOON).await.header("authorization"),
        Some("Bearer token-one")
    );

    // Rotation the way tools do it: a new file renamed over the old one.
    let fresh = dir.write("token.new", "token-two\n");
    std::fs::rename(fresh, cfg.token_file.as_ref().unwrap()).unwrap();
    server.require_token("token-two");
    reporter.report_metrics("n", &batch).await.unwrap();
    assert_eq!(
        server.next(SOON).await.header("authorization"),
        Some("Bearer token-two")
    );

    // The server moves on before the file does: refused, and the error names the file's
    // key, not the token.
    server.require_token("token-three");
    let e = reporter.report_metrics("n", &batch).await.unwrap_err();
    assert_eq!(classify(&e), Failure::Rejected);
    let text = format!("{e} {e:?} {reporter:?}");
    assert!(text.contains("401"), "{text}");
    for secret in ["token-one", "token-two", "token-three"] {
        assert!(!text.contains(secret), "{text}");
    }
}

#[tokio::test]
async fn tls_failures_say_what_to_set() {
    let server = TestControlPlane::https();
    let dir = TempDir::new("tls");
    let mut cfg = cp_config(&server, &dir, "t");
    cfg.ca_file = None;
    let reporter = ControlPlaneReporter::new(&cfg).unwrap();
    let e = reporter
        .report_metrics("n", &[point("agent", "", 1)])
        .await
        .unwrap_err()
        .to_string();
    assert!(
        e.starts_with(&format!(
            "control plane {}/v1/nodes/n/metrics: ",
            server.url()
        )),
        "{e}"
    );
    assert!(e.contains("UnknownIssuer"), "{e}");
    assert!(e.contains("set control_plane.ca_file"), "{e}");
    assert!(server.try_next().is_none(), "no request got through");

    // Skipping verification gets through (and is warned about at construction).
    cfg.tls_insecure_skip_verify = true;
    let reporter = ControlPlaneReporter::new(&cfg).unwrap();
    reporter
        .report_metrics("n", &[point("agent", "", 1)])
        .await
        .unwrap();

    // A CA file that is no certificate is named when the client is built.
    cfg.ca_file = Some(dir.write("bad.pem", "not a certificate"));
    let e = ControlPlaneReporter::new(&cfg).unwrap_err().to_string();
    assert!(
        e.contains("control_plane.ca_file") && e.contains("bad.pem"),
        "{e}"
    );
}

#[tokio::test]
async fn mutual_tls_presents_the_client_certificate() {
    let server = TestControlPlane::start(Options {
        tls: true,
        require_client_cert: true,
    });
    let dir = TempDir::new("mtls");
    let mut cfg = cp_config(&server, &dir, "t");
    let without = ControlPlaneReporter::new(&cfg).unwrap();
    assert!(without
        .report_metrics("n", &[point("agent", "", 1)])
        .await
        .is_err());

    let client = server.client_cert();
    cfg.cert_file = Some(dir.write("client.pem", &client.cert));
    cfg.key_file = Some(dir.write("client.key", &client.key));
    let with = ControlPlaneReporter::new(&cfg).unwrap();
    with.report_metrics("n", &[point("agent", "", 1)])
        .await
        .unwrap();
    assert_eq!(server.next(SOON).await.status, 204);
}

#[tokio::test]
async fn a_hanging_control_plane_ends_at_the_timeout() {
    let server = TestControlPlane::http();
    server.set_default(Behaviour::Hang);
    let dir = TempDir::new("hang");
    let mut cfg = cp_config(&server, &dir, "t");
    cfg.timeout = Duration::from_millis(300);
    let reporter = ControlPlaneReporter::new(&cfg).unwrap();
    let e = reporter
        .report_metrics("n", &[point("agent", "", 1)])
        .await
        .unwrap_err();
    assert_eq!(classify(&e), Failure::Retry { after: None });
    assert!(
        e.to_string().ends_with("no answer within 300ms (timeout)"),
        "{e}"
    );
}

/// Emits `per_cycle` points per collect, numbered from 1 across cycles.
struct Numbered {
    next: AtomicU64,
    per_cycle: u64,
}

#[async_trait]
impl Collector for Numbered {
    fn group(&self) -> &'static str {
        "system"
    }
    async fn collect(
        &self,
        _: plexd_metrics::collector::Cycle,
        _: &CancellationToken,
    ) -> Result<Vec<MetricPoint>, CollectError> {
        let first = self.next.fetch_add(self.per_cycle, Ordering::SeqCst) + 1;
        Ok((first..first + self.per_cycle)
            .map(|n| point("system", "", n))
            .collect())
    }
}

/// Passes every call to the real reporter and tells the test its outcome, so the test can
/// wait for attempts that never reach the server (connection refused).
struct Observed {
    inner: Arc<dyn MetricReporter>,
    outcomes: mpsc::UnboundedSender<Result<(), String>>,
}

#[async_trait]
impl MetricReporter for Observed {
    async fn report_metrics(&self, node_id: &str, batch: &[MetricPoint]) -> Result<(), BoxError> {
        self.report_batch(node_id, Uuid::new_v4(), batch).await
    }
    async fn report_batch(
        &self,
        node_id: &str,
        key: Uuid,
        batch: &[MetricPoint],
    ) -> Result<(), BoxError> {
        let result = self.inner.report_batch(node_id, key, batch).await;
        let _ = self
            .outcomes
            .send(result.as_ref().map(drop).map_err(|e| e.to_string()));
        result
    }
}

struct Running {
    cancel: CancellationToken,
    task: tokio::task::JoinHandle<()>,
    stats: Arc<DeliveryStats>,
    outcomes: mpsc::UnboundedReceiver<Result<(), String>>,
}

/// A Manager with the real control plane reporter. The intervals are below the config's
/// minimums (the Manager does not check them) so that the test takes seconds, not minutes.
fn run_manager(
    reporter: Arc<dyn MetricReporter>,
    collect: Duration,
    report: Duration,
    batch_size: usize,
    per_cycle: u64,
) -> Running {
    let options = ManagerOptions {
        collect_interval: collect,
        report_interval: report,
        limits: QueueLimits {
            batch_size,
            max_points: 10_000,
            max_bytes: plexd_metrics::config::DEFAULT_QUEUE_MAX_BYTES,
            max_memory_bytes: plexd_metrics::config::DEFAULT_QUEUE_MAX_MEMORY_BYTES as usize,
        },
    };
    let (tx, outcomes) = mpsc::unbounded_channel();
    let observed = Arc::new(Observed {
        inner: reporter,
        outcomes: tx,
    });
    let stats = Arc::new(DeliveryStats::default());
    let collector = Arc::new(Numbered {
        next: AtomicU64::new(0),
        per_cycle,
    });
    let manager = Manager::new(Some(options), vec![collector], observed, "node-1")
        .with_delivery_stats(stats.clone());
    let cancel = CancellationToken::new();
    let task = tokio::spawn({
        let cancel = cancel.clone();
        async move {
            manager.run(cancel).await;
        }
    });
    Running {
        cancel,
        task,
        stats,
        outcomes,
    }
}

#[tokio::test]
async fn one_request_per_batch_size_in_order() {
    let server = TestControlPlane::https();
    let dir = TempDir::new("batches");
    let reporter = Arc::new(ControlPlaneReporter::new(&cp_config(&server, &dir, "t")).unwrap());
    // Seven points per cycle with batch_size 3: the cycle fills the buffer past the size,
    // and goes out at once as 3 + 3 + 1.
    let run = run_manager(
        reporter,
        Duration::from_millis(200),
        Duration::from_secs(60),
        3,
        7,
    );
    let mut sizes = Vec::new();
    let mut all = Vec::new();
    let mut keys = std::collections::HashSet::new();
    for _ in 0..3 {
        let r = server.next(SOON).await;
        sizes.push(r.points().len());
        all.extend(ns(&r.points()));
        assert!(keys.insert(r.key().unwrap().to_owned()));
    }
    assert_eq!(sizes, [3, 3, 1]);
    assert_eq!(all, (1..=7).collect::<Vec<_>>());
    run.cancel.cancel();
    run.task.await.unwrap();
}

/// What the server accepted, and how often each batch was tried.
#[derive(Default)]
struct Ledger {
    accepted: Vec<(String, Vec<u64>)>,
    attempts: std::collections::HashMap<String, usize>,
}

impl Ledger {
    fn record(&mut self, r: plexd_metrics_tests::control_plane::Recorded) {
        let key = r.key().unwrap().to_owned();
        *self.attempts.entry(key.clone()).or_default() += 1;
        assert!(!r.duplicate, "an accepted batch was sent again");
        if r.accepted() {
            self.accepted.push((key, ns(&r.points())));
        }
    }
}

#[tokio::test]
async fn failures_and_an_outage_lose_nothing_and_keep_order() {
    let server = TestControlPlane::https();
    let dir = TempDir::new("outage");
    let reporter = Arc::new(ControlPlaneReporter::new(&cp_config(&server, &dir, "t")).unwrap());
    server.script([
        Behaviour::Status(500, "db down".into()),
        Behaviour::Status(503, String::new()),
        Behaviour::TooManyRequests(1),
    ]);
    let mut run = run_manager(
        reporter,
        Duration::from_millis(100),
        Duration::from_millis(300),
        100,
        1,
    );

    let mut ledger = Ledger::default();
    // Three refused attempts of one batch, then it is accepted.
    for _ in 0..4 {
        ledger.record(server.next(SOON).await);
        run.outcomes.recv().await.unwrap().ok();
    }
    assert_eq!(ledger.accepted.len(), 1, "accepted after three failures");
    assert_eq!(
        ledger.attempts[&ledger.accepted[0].0], 4,
        "one key across its retries"
    );

    // The control plane goes away for several report intervals.
    server.go_away();
    let mut refused = 0;
    while refused < 3 {
        if run.outcomes.recv().await.unwrap().is_err() {
            refused += 1;
        }
    }
    let queued = run.stats.delivery_totals().queued_points;
    assert!(queued > 0, "points wait in the queue during the outage");
    server.come_back();
    // The first accepted report after the outage; what is still queued then goes out in
    // the loop or in the shutdown flush.
    while run.outcomes.recv().await.unwrap().is_err() {}
    run.cancel.cancel();
    run.task.await.unwrap();
    while let Some(r) = server.try_next() {
        ledger.record(r);
    }
    let delivered: Vec<u64> = ledger
        .accepted
        .iter()
        .flat_map(|(_, n)| n.clone())
        .collect();
    assert_eq!(
        delivered,
        (1..=delivered.len() as u64).collect::<Vec<_>>(),
        "every point once, in order"
    );
    assert!(delivered.len() as u64 >= queued);
    assert_eq!(run.stats.reconnect_count(), 2, "two recoveries");
    assert_eq!(run.stats.delivery_totals().dropped_points, 0);
}

/// A control plane with the local endpoint's secret, and a local endpoint expecting it.
struct LocalSetup {
    cp: TestControlPlane,
    local: TestControlPlane,
    dir: TempDir,
    control_plane: Arc<ControlPlaneReporter>,
}

fn local_setup(name: &str) -> LocalSetup {
    let cp = TestControlPlane::https();
    let local = TestControlPlane::https();
    cp.put_secret("local-metrics-token", "l0cal-bearer", &NSK);
    local.require_token("l0cal-bearer");
    let dir = TempDir::new(name);
    let control_plane = Arc::new(ControlPlaneReporter::new(&cp_config(&cp, &dir, "t")).unwrap());
    LocalSetup {
        cp,
        local,
        dir,
        control_plane,
    }
}

impl LocalSetup {
    fn reporter(&self) -> LocalReporter {
        let cfg = LocalEndpointConfig {
            url: format!("{}/ingest", self.local.url()),
            secret_key: "local-metrics-token".into(),
            tls_insecure_skip_verify: false,
            ca_file: Some(self.dir.write("local-ca.pem", self.local.ca_pem())),
            ..LocalEndpointConfig::default()
        };
        let fetcher = self.control_plane.clone() as Arc<dyn SecretFetcher>;
        LocalReporter::new(&cfg, fetcher, NodeSecretKey::from_bytes(NSK), "node-1").unwrap()
    }

    async fn secret_fetches(&self) -> usize {
        let mut n = 0;
        while let Some(r) = self.cp.try_next() {
            if r.path == "/v1/nodes/node-1/secrets/local-metrics-token" {
                assert_eq!(r.header("authorization"), Some("Bearer t"));
                n += 1;
            }
        }
        n
    }
}

#[tokio::test]
async fn the_local_endpoint_gets_plain_json_with_the_decrypted_credential_cached() {
    let s = local_setup("local-cache");
    let local = s.reporter();
    let batch = [point("system", "", 1)];
    local.report_metrics("node-1", &batch).await.unwrap();
    local.report_metrics("node-1", &batch).await.unwrap();
    for _ in 0..2 {
        let r = s.local.next(SOON).await;
        assert_eq!(r.path, "/ingest");
        assert_eq!(r.header("content-type"), Some("application/json"));
        assert_eq!(r.header("content-encoding"), None, "uncompressed");
        assert_eq!(r.header("authorization"), Some("Bearer l0cal-bearer"));
        assert_eq!(r.points(), batch);
    }
    assert_eq!(
        s.secret_fetches().await,
        1,
        "the second report used the cache"
    );
}

#[tokio::test]
async fn an_expired_credential_is_fetched_again_and_a_stale_one_beats_none() {
    let s = local_setup("local-stale");
    let local = s.reporter().with_credential_ttl(Duration::ZERO);
    let batch = [point("system", "", 1)];
    local.report_metrics("node-1", &batch).await.unwrap();
    local.report_metrics("node-1", &batch).await.unwrap();
    assert_eq!(
        s.secret_fetches().await,
        2,
        "TTL zero: every report fetches"
    );

    s.cp.set_secret_behaviour(Some(Behaviour::Status(500, "vault sealed".into())));
    local.report_metrics("node-1", &batch).await.unwrap();
    let last = {
        let mut last = None;
        while let Some(r) = s.local.try_next() {
            last = Some(r);
        }
        last.unwrap()
    };
    assert_eq!(
        last.header("authorization"),
        Some("Bearer l0cal-bearer"),
        "stale token"
    );

    // A fresh reporter has nothing cached: no POST at all.
    let fresh = s.reporter();
    let e = fresh
        .report_metrics("node-1", &batch)
        .await
        .unwrap_err()
        .to_string();
    assert!(
        e.starts_with("local endpoint: no credential for secret \"local-metrics-token\""),
        "{e}"
    );
    assert!(e.contains("500"), "{e}");
    assert!(
        s.local.try_next().is_none(),
        "nothing was posted without a token"
    );
}

#[tokio::test]
async fn multi_reporter_returns_the_control_planes_result_only() {
    let s = local_setup("multi");
    let multi = MultiReporter::new(s.control_plane.clone(), Arc::new(s.reporter()));
    let batch = [point("agent", "", 1)];
    s.cp.script([Behaviour::Status(503, "maintenance".into())]);
    s.local.script([
        Behaviour::Accept,
        Behaviour::Status(500, "disk full".into()),
    ]);

    // Control plane fails, local succeeds: the error is the control plane's.
    let e = multi.report_metrics("node-1", &batch).await.unwrap_err();
    assert!(e.to_string().contains("503"), "{e}");
    // Control plane succeeds, local fails: success.
    multi.report_metrics("node-1", &batch).await.unwrap();
    multi.close().await;
    let statuses: Vec<u16> = std::iter::from_fn(|| s.local.try_next())
        .map(|r| r.status)
        .collect();
    assert_eq!(statuses, [204, 500], "the local endpoint got both batches");
}

#[tokio::test]
async fn a_hanging_local_endpoint_does_not_delay_the_control_plane() {
    let s = local_setup("multi-hang");
    s.local.set_default(Behaviour::Hang);
    let multi = MultiReporter::new(s.control_plane.clone(), Arc::new(s.reporter()));
    let started = Instant::now();
    for n in 1..=3 {
        multi
            .report_metrics("node-1", &[point("agent", "", n)])
            .await
            .unwrap();
    }
    let elapsed = started.elapsed();
    assert!(
        elapsed < plexd_metrics::reporter::LOCAL_TIMEOUT,
        "three control plane reports took {elapsed:?} with the local endpoint hanging"
    );
    let mut cp_batches = Vec::new();
    while let Some(r) = s.cp.try_next() {
        if r.path.ends_with("/metrics") {
            cp_batches.extend(ns(&r.points()));
        }
    }
    assert_eq!(cp_batches, [1, 2, 3]);
    // The local endpoint has the first batch hanging; the others wait behind it.
    assert_eq!(ns(&s.local.next(SOON).await.points()), [1]);
}
