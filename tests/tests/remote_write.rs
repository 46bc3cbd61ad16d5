//! Remote write through `RemoteWriteReporter` to real receivers (Prometheus with
//! `--web.enable-remote-write-receiver`, VictoriaMetrics) on loopback, and to the test HTTP
//! server for what a receiver cannot show: the request's headers and credentials, refusals,
//! throttling, retries and TLS.
//!
//! The expected values are sums of the interval figures the test generated, not values the
//! code under test computes. Nothing here needs privileges; the receivers must be installed
//! (`cargo xtask setup`).

use std::collections::BTreeMap;
use std::time::Duration;

use base64::Engine as _;
use chrono::{DateTime, TimeZone, Utc};
use plexd_metrics::api::{MetricPoint, GROUP_AGENT, GROUP_LATENCY, GROUP_SYSTEM, GROUP_TUNNEL};
use plexd_metrics::collector::{AgentStats, LatencyResult, SystemStats, TunnelStats};
use plexd_metrics::config::RemoteWriteConfig;
use plexd_metrics::prometheus::remote_write::decode;
use plexd_metrics::reporter::{classify, Failure, MetricReporter, RemoteWriteReporter, USER_AGENT};
use plexd_metrics_tests::control_plane::{Behaviour, Options, TempDir, TestControlPlane};
use plexd_metrics_tests::prometheus_server::{Prometheus, VictoriaMetrics};
use serde_json::Value;
use uuid::Uuid;

const NODE: &str = "node-1";
const CYCLE: i64 = 15;
const CYCLES_PER_BATCH: usize = 2;
const BATCHES: usize = 3;

/// The peers: name, public key, and the bucket their round trips fall in (microseconds).
const PEERS: [(&str, &str, (u64, u64)); 2] = [
    (
        "gw",
        "WEAuaVuhdyscyTCXVfBDJR6nf9zxD75jmJzq6OeitcA=",
        (2_600, 4_900),
    ),
    (
        "db",
        "Zi4U/VlFVvUiYEcDNANRJYkDtk81VTdj8ZQmqypRXFg=",
        (10_100, 24_900),
    ),
];

/// What the receivers must hold for one peer after some cycles, summed from the intervals.
#[derive(Clone, Debug, Default)]
struct PeerTotals {
    lost: u64,
    rx_packets: u64,
    rx_bytes: u64,
    probes_sent: u64,
    rtts: u64,
}

/// The generated points, batch by batch, and the totals after each batch.
struct Scenario {
    batches: Vec<Vec<MetricPoint>>,
    /// Per batch: its last point's time (Unix seconds) and each peer's totals then.
    after: Vec<(i64, BTreeMap<&'static str, PeerTotals>)>,
    last_load: f64,
}

fn scenario(seed: u64) -> Scenario {
    let mut rng = fastrand::Rng::with_seed(seed);
    // Minutes ago, on a whole second, well within what a fresh TSDB accepts.
    let start = Utc::now().timestamp() - 600;
    let mut totals: BTreeMap<&'static str, PeerTotals> = BTreeMap::new();
    let (mut batches, mut after) = (Vec::new(), Vec::new());
    let mut last_load = 0.0;
    let mut cycle = 0i64;
    for _ in 0..BATCHES {
        let mut batch = Vec::new();
        let mut t = 0;
        for _ in 0..CYCLES_PER_BATCH {
            t = start + cycle * CYCLE;
            let at: DateTime<Utc> = Utc.timestamp_opt(t, 0).unwrap();
            for (name, key, (lo, hi)) in PEERS {
                let total = totals.entry(name).or_default();
                let (lost, rx) = (rng.u64(0..20), rng.u64(100..1_000));
                total.lost += lost;
                total.rx_packets += rx;
                total.rx_bytes += rx * 120;
                let stats = TunnelStats {
                    peer_id: name.to_owned(),
                    last_handshake_time: at - chrono::Duration::seconds(10),
                    rx_bytes: total.rx_bytes,
                    tx_bytes: total.rx_bytes / 2,
                    handshake_succeeded: true,
                    handshake_stale: false,
                    packet_loss_percent: 0.0,
                    endpoint: "192.0.2.7:51820".to_owned(),
                    interface: "wg0".to_owned(),
                    public_key: key.to_owned(),
                    rx_packets: Some(rx),
                    tx_packets: Some(rx),
                    lost_packets: Some(lost),
                    late_packets: Some(0),
                    duplicate_packets: Some(0),
                    suspect_packets: Some(0),
                    handshakes_sent: Some(0),
                    handshakes_received: Some(0),
                };
                batch.push(MetricPoint::new(at, GROUP_TUNNEL, name, &stats).unwrap());
                let answered = rng.u32(1..=3);
                let rtts: Vec<Duration> = (0..answered)
                    .map(|_| Duration::from_micros(rng.u64(lo..=hi)))
                    .collect();
                total.probes_sent += 3;
                total.rtts += u64::from(answered);
                let result = LatencyResult::from_samples(name, 3, &rtts);
                batch.push(MetricPoint::new(at, GROUP_LATENCY, name, &result).unwrap());
            }
            last_load = f64::from(rng.u32(0..400)) / 100.0;
            let system = SystemStats {
                load_avg_1: last_load,
                cpu_usage_percent: 25.0,
                ..SystemStats::default()
            };
            batch.push(MetricPoint::new(at, GROUP_SYSTEM, "", &system).unwrap());
            let agent = AgentStats {
                uptime_seconds: (cycle * CYCLE) as f64,
                ..AgentStats::default()
            };
            batch.push(MetricPoint::new(at, GROUP_AGENT, "", &agent).unwrap());
            cycle += 1;
        }
        batches.push(batch);
        after.push((t, totals.clone()));
    }
    Scenario {
        batches,
        after,
        last_load,
    }
}

fn config(url: &str) -> RemoteWriteConfig {
    RemoteWriteConfig {
        url: url.to_owned(),
        external_labels: BTreeMap::from([("cluster".to_owned(), "test".to_owned())]),
        ..RemoteWriteConfig::default()
    }
}

/// The series of an instant query's vector: labels and value.
fn vector(answer: &Value, query: &str) -> Vec<(BTreeMap<String, String>, f64)> {
    assert_eq!(answer["status"], "success", "{query}: {answer}");
    answer["data"]["result"]
        .as_array()
        .unwrap_or_else(|| panic!("{query}: no result: {answer}"))
        .iter()
        .map(|s| {
            let labels = serde_json::from_value(s["metric"].clone()).expect("labels");
            let value = s["value"][1]
                .as_str()
                .and_then(|v| v.parse().ok())
                .unwrap_or_else(|| panic!("{query}: value of {s}"));
            (labels, value)
        })
        .collect()
}

/// The one value `query` has at `time`.
fn one(query_fn: &dyn Fn(&str, i64) -> Value, query: &str, time: i64) -> f64 {
    let v = vector(&query_fn(query, time), query);
    assert_eq!(v.len(), 1, "{query} at {time}: {v:?}");
    v[0].1
}

/// Sends the scenario's batches, then checks what `query_fn` answers against it.
async fn write_and_check(url: &str, query_fn: &dyn Fn(&str, i64) -> Value, flush: &dyn Fn()) {
    let s = scenario(0x5eed);
    let reporter = RemoteWriteReporter::new(&config(url), NODE).expect("reporter");
    for batch in &s.batches {
        reporter
            .report_batch(NODE, Uuid::new_v4(), batch)
            .await
            .unwrap_or_else(|e| panic!("{url} refused a batch: {e}"));
    }
    flush();

    // Counters hold the sums of the intervals, batch after batch.
    for (time, totals) in &s.after {
        for (name, key, _) in PEERS {
            let want = &totals[name];
            let q = |family: &str| format!("{family}{{peer=\"{name}\"}}");
            assert_eq!(
                one(query_fn, &q("plexd_peer_lost_packets_total"), *time),
                want.lost as f64,
                "{name} lost at {time}"
            );
            assert_eq!(
                one(query_fn, &q("plexd_peer_receive_packets_total"), *time),
                want.rx_packets as f64,
                "{name} received at {time}"
            );
            assert_eq!(
                one(query_fn, &q("plexd_peer_receive_bytes_total"), *time),
                want.rx_bytes as f64
            );
            assert_eq!(
                one(query_fn, &q("plexd_peer_probes_sent_total"), *time),
                want.probes_sent as f64
            );
            assert_eq!(
                one(query_fn, &q("plexd_peer_rtt_seconds_count"), *time),
                want.rtts as f64
            );
            let series = vector(
                &query_fn(&q("plexd_peer_lost_packets_total"), *time),
                "labels",
            );
            let labels = &series[0].0;
            for (label, value) in [
                ("interface", "wg0"),
                ("public_key", key),
                ("peer", name),
                ("node", NODE),
                ("cluster", "test"),
            ] {
                assert_eq!(
                    labels.get(label).map(String::as_str),
                    Some(value),
                    "{labels:?}"
                );
            }
        }
    }
    let (end, _) = *s.after.last().unwrap();
    // Every round trip of a peer falls in one bucket, so the median is that bucket's middle.
    for (name, want) in [("gw", 0.00375), ("db", 0.0175)] {
        let q =
            format!("histogram_quantile(0.5, plexd_peer_rtt_seconds_bucket{{peer=\"{name}\"}})");
        let got = one(query_fn, &q, end);
        assert!((got - want).abs() < 1e-9, "{q}: {got}, want {want}");
    }
    assert_eq!(one(query_fn, "plexd_node_load1", end), s.last_load);
    assert_eq!(one(query_fn, "plexd_peer_up{peer=\"gw\"}", end), 1.0);
    let build = vector(&query_fn("plexd_agent_build_info", end), "build_info");
    assert_eq!(
        build[0].0.get("version").map(String::as_str),
        Some(env!("CARGO_PKG_VERSION"))
    );
}

#[tokio::test]
async fn prometheus_holds_the_sums_of_the_intervals() {
    let prometheus = Prometheus::start_with(
        TempDir::new("rw-prom"),
        &["--web.enable-remote-write-receiver"],
    );
    let url = prometheus.remote_write_url();
    write_and_check(&url, &|q, t| prometheus.query(q, t), &|| {}).await;
}

#[tokio::test]
async fn victoria_metrics_holds_the_sums_of_the_intervals() {
    let vm = VictoriaMetrics::start(TempDir::new("rw-vm"));
    let url = vm.remote_write_url();
    write_and_check(&url, &|q, t| vm.query(q, t), &|| vm.flush()).await;
}

#[tokio::test]
async fn a_receiver_that_is_down_is_retried() {
    // A port nothing listens on: bound, then closed.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let url = format!("http://127.0.0.1:{port}/api/v1/write");
    let reporter = RemoteWriteReporter::new(&config(&url), NODE).unwrap();
    let s = scenario(1);
    let err = reporter
        .report_batch(NODE, Uuid::new_v4(), &s.batches[0])
        .await
        .unwrap_err();
    assert_eq!(classify(&err), Failure::Retry { after: None }, "{err}");
    let text = err.to_string();
    assert!(text.contains(&url), "{text}");
    assert!(text.contains("metrics.remote_write.url"), "{text}");
}

#[tokio::test]
async fn refusals_throttling_and_retries_are_classified_and_a_retry_sends_the_same_bytes() {
    let server = TestControlPlane::http();
    let url = format!("{}/api/v1/write", server.url());
    let reporter = RemoteWriteReporter::new(&config(&url), NODE).unwrap();
    let s = scenario(2);
    let wait = Duration::from_secs(10);

    // 503, then 429 with Retry-After, then accepted: three sends of one batch, one body.
    server.script([
        Behaviour::Status(503, "try later".into()),
        Behaviour::TooManyRequests(7),
        Behaviour::Accept,
    ]);
    let key = Uuid::new_v4();
    let e = reporter
        .report_batch(NODE, key, &s.batches[0])
        .await
        .unwrap_err();
    assert_eq!(classify(&e), Failure::Retry { after: None }, "{e}");
    let e = reporter
        .report_batch(NODE, key, &s.batches[0])
        .await
        .unwrap_err();
    assert_eq!(
        classify(&e),
        Failure::Retry {
            after: Some(Duration::from_secs(7))
        }
    );
    reporter
        .report_batch(NODE, key, &s.batches[0])
        .await
        .unwrap();
    let bodies: Vec<Vec<u8>> = [
        server.next(wait).await,
        server.next(wait).await,
        server.next(wait).await,
    ]
    .into_iter()
    .map(|r| r.body)
    .collect();
    assert!(
        bodies.windows(2).all(|w| w[0] == w[1]),
        "one encoding per batch"
    );

    // 400 (what Prometheus answers to out-of-order samples): refused, not retried.
    server.script([Behaviour::Status(400, "out of order sample".into())]);
    let e = reporter
        .report_batch(NODE, Uuid::new_v4(), &s.batches[1])
        .await
        .unwrap_err();
    assert_eq!(classify(&e), Failure::Rejected, "{e}");
    assert!(e.to_string().contains("out of order sample"), "{e}");
    server.next(wait).await;

    // The refused batch was folded once: the next one's counters include its intervals.
    reporter
        .report_batch(NODE, Uuid::new_v4(), &s.batches[2])
        .await
        .unwrap();
    let req = decode(&server.next(wait).await.body).expect("a remote-write body");
    // Each cycle of the batch writes the series once; the last is the batch's end.
    let lost = req
        .timeseries
        .iter()
        .rfind(|t| {
            t.label("__name__") == Some("plexd_peer_lost_packets_total")
                && t.label("peer") == Some("gw")
        })
        .expect("the gw lost series");
    let want = s.after[2].1["gw"].lost as f64;
    assert_eq!(lost.samples.last().unwrap().value, want);

    // 401 and 404 name the keys to check.
    server.script([Behaviour::Status(401, String::new())]);
    let e = reporter
        .report_batch(NODE, Uuid::new_v4(), &s.batches[0])
        .await
        .unwrap_err();
    assert_eq!(classify(&e), Failure::Rejected);
    assert!(
        e.to_string().contains("metrics.remote_write.token_file"),
        "{e}"
    );
}

#[tokio::test]
async fn the_request_carries_the_protocol_headers_credentials_and_extra_headers() {
    let dir = TempDir::new("rw-auth");
    let server = TestControlPlane::http();
    let url = format!("{}/api/v1/write", server.url());
    let wait = Duration::from_secs(10);
    let s = scenario(3);

    let token = dir.write("token", "rw-token-1\n");
    let mut cfg = config(&url);
    cfg.token_file = Some(token.clone());
    cfg.headers = BTreeMap::from([("X-Scope-OrgID".to_owned(), "tenant-7".to_owned())]);
    let reporter = RemoteWriteReporter::new(&cfg, NODE).unwrap();
    reporter
        .report_batch(NODE, Uuid::new_v4(), &s.batches[0])
        .await
        .unwrap();
    let r = server.next(wait).await;
    assert_eq!(r.header("authorization"), Some("Bearer rw-token-1"));
    assert_eq!(r.header("content-encoding"), Some("snappy"));
    assert_eq!(r.header("content-type"), Some("application/x-protobuf"));
    assert_eq!(r.header("x-prometheus-remote-write-version"), Some("0.1.0"));
    assert_eq!(r.header("user-agent"), Some(USER_AGENT));
    assert_eq!(r.header("x-scope-orgid"), Some("tenant-7"));
    assert_eq!(r.path, "/api/v1/write");
    let req = decode(&r.body).expect("a remote-write body");
    assert!(!req.timeseries.is_empty());
    assert!(req
        .timeseries
        .iter()
        .all(|t| t.label("node") == Some(NODE) && t.label("cluster") == Some("test")));

    // A rotated token is used on the next request.
    server.require_token("rw-token-2");
    std::fs::write(dir.path().join("token.new"), "rw-token-2").unwrap();
    std::fs::rename(dir.path().join("token.new"), &token).unwrap();
    reporter
        .report_batch(NODE, Uuid::new_v4(), &s.batches[1])
        .await
        .unwrap();
    assert_eq!(
        server.next(wait).await.header("authorization"),
        Some("Bearer rw-token-2")
    );

    // Basic auth.
    let server = TestControlPlane::http();
    let mut cfg = config(&format!("{}/api/v1/write", server.url()));
    cfg.username = "agent".to_owned();
    cfg.password_file = Some(dir.write("password", "pa:ss word\n"));
    let reporter = RemoteWriteReporter::new(&cfg, "").unwrap();
    reporter
        .report_batch("", Uuid::new_v4(), &s.batches[0])
        .await
        .unwrap();
    let r = server.next(wait).await;
    let want = base64::engine::general_purpose::STANDARD.encode("agent:pa:ss word");
    assert_eq!(
        r.header("authorization"),
        Some(format!("Basic {want}").as_str())
    );
    // Without a node_id there is no node label.
    let req = decode(&r.body).unwrap();
    assert!(req.timeseries.iter().all(|t| t.label("node").is_none()));
}

#[tokio::test]
async fn mutual_tls_with_a_private_ca() {
    let dir = TempDir::new("rw-tls");
    let server = TestControlPlane::start(Options {
        tls: true,
        require_client_cert: true,
    });
    let url = format!("{}/api/v1/write", server.url());
    let s = scenario(4);
    let client = server.client_cert();
    let mut cfg = config(&url);
    cfg.ca_file = Some(dir.write("ca.pem", server.ca_pem()));
    cfg.cert_file = Some(dir.write("client.pem", &client.cert));
    cfg.key_file = Some(dir.write("client.key", &client.key));
    let reporter = RemoteWriteReporter::new(&cfg, NODE).unwrap();
    reporter
        .report_batch(NODE, Uuid::new_v4(), &s.batches[0])
        .await
        .unwrap();
    let r = server.next(Duration::from_secs(10)).await;
    assert!(decode(&r.body).is_ok());

    // Without the CA: a TLS error that names the key to set, retried.
    let reporter = RemoteWriteReporter::new(&config(&url), NODE).unwrap();
    let e = reporter
        .report_batch(NODE, Uuid::new_v4(), &s.batches[0])
        .await
        .unwrap_err();
    assert_eq!(classify(&e), Failure::Retry { after: None });
    assert!(
        e.to_string().contains("metrics.remote_write.ca_file"),
        "{e}"
    );
}
