//! `cargo xtask bench`: encoding a batch of 10,000 points for the control plane (JSON, then
//! gzip), with the library's own function, under Criterion. After Criterion's run it reads
//! the samples Criterion saved back and emits the report row, with the compression ratio.
//!
//! The points are tunnel points with random public keys and every counter filled, as a node
//! with the kernel programs on reports them: random keys are the part that compresses worst.

use std::hint::black_box;
use std::io::Write as _;
use std::path::PathBuf;
use std::time::Duration;

use chrono::{TimeZone, Utc};
use criterion::Criterion;
use flate2::write::GzEncoder;
use flate2::Compression;
use plexd_metrics::api::{MetricPoint, GROUP_TUNNEL};
use plexd_metrics::collector::TunnelStats;
use plexd_metrics::prometheus::remote_write;
use plexd_metrics::prometheus::series::SeriesBook;
use plexd_metrics::reporter::gzip_json;
use plexd_metrics_tests::bench::{emit, median, thousands, Goal, Row};
use plexd_metrics_tests::wireguard::random_public_key;

const POINTS: usize = 10_000;
const ID: &str = "encode_batch_10000";
/// The JSON half alone, to tell what the gzip half costs.
const JSON_ID: &str = "encode_json_only_10000";
/// The same body at gzip's default level, to tell what the agent's fastest level saves.
const DEFAULT_LEVEL_ID: &str = "encode_gzip_default_10000";
/// The same points as a Prometheus remote-write request (protobuf, snappy).
const REMOTE_WRITE_ID: &str = "encode_remote_write_10000";

fn batch() -> Vec<MetricPoint> {
    let now = Utc
        .with_ymd_and_hms(2026, 11, 22, 1, 0, 0)
        .single()
        .expect("a time");
    (0..POINTS as u64)
        .map(|i| {
            let stats = TunnelStats {
                peer_id: random_public_key(),
                last_handshake_time: now - chrono::Duration::seconds((i % 120) as i64),
                rx_bytes: 1_000_000 + i * 7_919,
                tx_bytes: 2_000_000 + i * 104_729,
                handshake_succeeded: true,
                handshake_stale: false,
                packet_loss_percent: (i % 7) as f64 * 0.01,
                endpoint: format!("192.0.2.{}:{}", i % 250 + 1, 20_000 + i),
                interface: "wg0".to_owned(),
                public_key: String::new(),
                rx_packets: Some(900 + i % 100),
                tx_packets: Some(950 + i % 50),
                lost_packets: Some(i % 3),
                late_packets: Some(i % 2),
                duplicate_packets: Some(0),
                suspect_packets: Some(0),
                handshakes_sent: Some(1),
                handshakes_received: Some(1),
            };
            MetricPoint::new(now, GROUP_TUNNEL, stats.peer_id.clone(), &stats).expect("a point")
        })
        .collect()
}

/// Criterion's output directory, as Criterion itself finds it.
fn criterion_home() -> PathBuf {
    if let Some(home) = std::env::var_os("CRITERION_HOME") {
        return home.into();
    }
    let target = std::env::var_os("CARGO_TARGET_DIR").map_or_else(
        || PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target"),
        PathBuf::from,
    );
    target.join("criterion")
}

/// Milliseconds per iteration of each of Criterion's samples of bench `id` (`iters` and
/// `times` in ns).
fn samples_ms(id: &str) -> Vec<f64> {
    let path = criterion_home().join(id).join("new/sample.json");
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("cannot read Criterion's {}: {e}", path.display()));
    let sample: serde_json::Value = serde_json::from_str(&text).expect("sample.json is JSON");
    let column = |key: &str| -> Vec<f64> {
        sample[key]
            .as_array()
            .unwrap_or_else(|| panic!("no {key} in {}", path.display()))
            .iter()
            .map(|v| v.as_f64().expect("a number"))
            .collect()
    };
    column("times")
        .iter()
        .zip(column("iters"))
        .map(|(t, n)| t / n / 1e6)
        .collect()
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let points = batch();
    let json = serde_json::to_vec(&points).expect("JSON").len();
    let gz = gzip_json(&points).expect("encode").len();

    let mut c = Criterion::default().configure_from_args();
    if quick {
        c = c
            .sample_size(10)
            .warm_up_time(Duration::from_millis(500))
            .measurement_time(Duration::from_secs(2));
    }
    c.bench_function(ID, |b| b.iter(|| gzip_json(black_box(&points))));
    c.bench_function(JSON_ID, |b| {
        b.iter(|| serde_json::to_vec(black_box(&points)))
    });
    let mut default_len = 0;
    c.bench_function(DEFAULT_LEVEL_ID, |b| {
        b.iter(|| {
            let json = serde_json::to_vec(black_box(&points)).expect("JSON");
            let mut gz = GzEncoder::new(Vec::new(), Compression::default());
            gz.write_all(&json).expect("compress");
            default_len = gz.finish().expect("compress").len();
        })
    });
    // The remote-write book folds the points in as the reporter does; folding the same
    // batch again is the steady state of a running agent (every peer known, totals grow).
    let mut book = SeriesBook::new("bench", "remote_write");
    let external = [("node".to_owned(), "node-1".to_owned())];
    let mut remote_write_len = 0;
    c.bench_function(REMOTE_WRITE_ID, |b| {
        b.iter(|| {
            remote_write_len = remote_write::encode(&mut book, black_box(&points), &external).len();
        })
    });
    c.final_summary();
    // `cargo bench` runs benches with `--bench`; under `cargo test` Criterion runs each once
    // and saves nothing to read back.
    if !std::env::args().any(|a| a == "--bench") {
        return;
    }

    let row = Row::alone(
        "encode",
        format!(
            "encoding a batch: JSON + gzip of {} points",
            thousands(POINTS)
        ),
        "reporter::gzip_json (the POST body)",
        "ms",
        &samples_ms(ID),
        Goal::Below(10.0),
    )
    .note(format!(
        "encode: of which JSON alone {:.1} ms, the rest gzip at its fastest level (flate2 with \
         zlib-rs); at the default level (6) the whole would take {:.1} ms, compression ratio \
         {:.1}:1",
        median(&samples_ms(JSON_ID)),
        median(&samples_ms(DEFAULT_LEVEL_ID)),
        json as f64 / default_len as f64
    ))
    .note(format!(
        "encode: {} points, {:.2} MiB of JSON to {:.2} MiB gzip: compression ratio {:.1}:1",
        thousands(POINTS),
        json as f64 / (1024.0 * 1024.0),
        gz as f64 / (1024.0 * 1024.0),
        json as f64 / gz as f64
    ));
    emit(&row).expect("write the row");

    let remote_write_row = Row::alone(
        "encode",
        format!(
            "encoding a remote-write request of {} peers' samples",
            thousands(POINTS)
        ),
        "prometheus::remote_write::encode (protobuf, snappy)",
        "ms",
        &samples_ms(REMOTE_WRITE_ID),
        Goal::Below(5.0),
    )
    .note(format!(
        "encode: the remote-write request of the same {} tunnel points is {:.2} MiB; their \
         JSON + gzip for the control plane took {:.1} ms in the same run",
        thousands(POINTS),
        remote_write_len as f64 / (1024.0 * 1024.0),
        median(&samples_ms(ID))
    ));
    emit(&remote_write_row).expect("write the row");
}
