//! The Prometheus side of the deployment files, checked with the real tools: the alert rules
//! (`promtool check rules`, and their unit tests with `promtool test rules`), the example
//! scrape config (vmagent's strict parser: Debian's promtool has no Kubernetes discovery), and the Grafana dashboard, whose every query runs
//! on a real Prometheus holding synthetic series of every metric it reads, and must return
//! data. No privileges needed; promtool and prometheus come from `cargo xtask setup`.

use std::collections::BTreeSet;
use std::fmt::Write as _;

use plexd_metrics_tests::control_plane::TempDir;
use plexd_metrics_tests::dashboard::{dashboard, dashboard_queries, substitute};
use plexd_metrics_tests::pod::{deploy_dir, read_yaml};
use plexd_metrics_tests::prometheus_server::{backfill, promtool, require_tool, said, Prometheus};
use serde_json::Value;

fn prometheus_dir() -> std::path::PathBuf {
    deploy_dir().join("prometheus")
}

#[test]
fn the_alert_rules_pass_promtool_check_rules() {
    let out = promtool(&prometheus_dir(), &["check", "rules", "alerts.yaml"]);
    assert!(out.status.success(), "{}", said(&out));
}

#[test]
fn the_alert_rules_pass_their_unit_tests() {
    let out = promtool(&prometheus_dir(), &["test", "rules", "alerts_test.yaml"]);
    let text = said(&out);
    assert!(out.status.success() && text.contains("SUCCESS"), "{text}");
}

#[test]
fn a_broken_rule_fails_its_unit_tests() {
    // The unit tests mean something only if a wrong threshold fails them.
    let dir = TempDir::new("alerts-broken");
    let rules = std::fs::read_to_string(prometheus_dir().join("alerts.yaml")).unwrap();
    let broken = rules.replace(") > 0.02", ") > 0.05");
    assert_ne!(broken, rules, "the replacement applied");
    dir.write("alerts.yaml", broken);
    dir.write(
        "alerts_test.yaml",
        std::fs::read(prometheus_dir().join("alerts_test.yaml")).unwrap(),
    );
    let out = promtool(dir.path(), &["test", "rules", "alerts_test.yaml"]);
    assert!(!out.status.success(), "{}", said(&out));
}

#[test]
fn every_alert_has_a_duration_severity_runbook_and_tests_that_fire_and_do_not() {
    let rules = read_yaml(&prometheus_dir().join("alerts.yaml")).remove(0);
    let tests = read_yaml(&prometheus_dir().join("alerts_test.yaml")).remove(0);
    let cases: Vec<&Value> = tests["tests"]
        .as_array()
        .expect("tests")
        .iter()
        .flat_map(|t| t["alert_rule_test"].as_array().expect("alert_rule_test"))
        .collect();
    let mut names = BTreeSet::new();
    for rule in rules["groups"]
        .as_array()
        .expect("groups")
        .iter()
        .flat_map(|g| g["rules"].as_array().expect("rules"))
    {
        let name = rule["alert"].as_str().expect("only alerting rules");
        names.insert(name);
        assert!(
            rule["for"].as_str().is_some_and(|f| f != "0s"),
            "{name}: for"
        );
        assert!(
            ["warning", "critical"].contains(&rule["labels"]["severity"].as_str().unwrap_or("")),
            "{name}: severity"
        );
        for key in ["summary", "description", "runbook"] {
            assert!(
                rule["annotations"][key]
                    .as_str()
                    .is_some_and(|s| s.len() > 20),
                "{name}: annotation {key}"
            );
        }
        let of_this = || cases.iter().filter(|c| c["alertname"] == name);
        assert!(
            of_this().any(|c| c["exp_alerts"].as_array().is_some_and(|a| !a.is_empty())),
            "{name}: no test in which it fires"
        );
        assert!(
            of_this().any(|c| c["exp_alerts"].as_array().is_some_and(|a| a.is_empty())),
            "{name}: no test in which it stays quiet"
        );
    }
    assert_eq!(names.len(), 7, "{names:?}");
}

#[test]
fn the_scrape_config_parses_and_labels_the_node() {
    let out = std::process::Command::new(require_tool("vmagent"))
        .current_dir(prometheus_dir())
        .args(["-promscrape.config=scrape-config.yaml", "-dryRun"])
        .output()
        .expect("run vmagent");
    assert!(out.status.success(), "{}", said(&out));
    let config = read_yaml(&prometheus_dir().join("scrape-config.yaml")).remove(0);
    let job = &config["scrape_configs"][0];
    assert_eq!(job["kubernetes_sd_configs"][0]["role"], "pod");
    let relabel = job["relabel_configs"].as_array().expect("relabel_configs");
    let node = relabel
        .iter()
        .find(|r| r["target_label"] == "node")
        .expect("a relabelling to node");
    assert_eq!(
        node["source_labels"],
        serde_json::json!(["__meta_kubernetes_pod_node_name"])
    );
    assert!(relabel.iter().any(|r| r["action"] == "keep"
        && r["source_labels"]
            == serde_json::json!(["__meta_kubernetes_pod_annotation_prometheus_io_scrape"])));
}

#[test]
fn the_dashboard_has_its_variables_and_reads_the_chosen_data_source() {
    let d = dashboard();
    assert!(d["schemaVersion"].as_u64().is_some_and(|v| v >= 36));
    let vars = d["templating"]["list"].as_array().expect("templating");
    let var = |name: &str| {
        vars.iter()
            .find(|v| v["name"] == name)
            .unwrap_or_else(|| panic!("no variable {name}"))
    };
    assert_eq!(var("datasource")["type"], "datasource");
    assert_eq!(var("datasource")["query"], "prometheus");
    for name in ["node", "peer"] {
        let query = var(name)["definition"].as_str().expect("definition");
        assert!(
            query.starts_with("label_values(") && query.ends_with(&format!(", {name})")),
            "{query}"
        );
        assert_eq!(var(name)["datasource"]["uid"], "${datasource}");
    }
    for panel in d["panels"].as_array().unwrap() {
        if panel["type"] == "row" {
            continue;
        }
        let title = &panel["title"];
        assert_eq!(panel["datasource"]["uid"], "${datasource}", "{title}");
        for target in panel["targets"].as_array().unwrap() {
            assert_eq!(target["datasource"]["uid"], "${datasource}", "{title}");
            let expr = target["expr"].as_str().unwrap();
            // Time series follow the dashboard's resolution; the table ranks over an hour.
            if panel["type"] == "timeseries"
                && (expr.contains("rate(") || expr.contains("increase("))
            {
                assert!(expr.contains("[$__rate_interval]"), "{title}: {expr}");
            }
            if expr.contains("plexd_peer_") {
                assert!(
                    expr.contains("node=~\"$node\", peer=~\"$peer\""),
                    "{title}: {expr}"
                );
            }
        }
    }
    let titles: Vec<&str> = d["panels"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|p| p["title"].as_str())
        .collect();
    for wanted in [
        "loss",
        "Worst peers",
        "Round-trip",
        "handshake",
        "Received",
        "Transmitted",
    ] {
        assert!(
            titles.iter().any(|t| t.contains(wanted)),
            "{wanted}: {titles:?}"
        );
    }
    for wanted in ["Queued", "Dropped", "Rejected", "Reconnects"] {
        assert!(
            titles.iter().any(|t| t.contains(wanted)),
            "{wanted}: {titles:?}"
        );
    }
}

/// The first sample's time of the synthetic series (Unix seconds), its step, and how many.
const STEP: i64 = 15;
const SAMPLES: i64 = 120;

/// OpenMetrics text with every series the dashboard reads: node n1 with a peer `lossy`
/// (3 % of its packets lost) and a peer `clean`, 30 minutes of samples from `start`.
fn synthetic_series(start: i64) -> String {
    let mut om = String::new();
    let peers = [
        ("lossy", "TE9TU1k=", 970, 30),
        ("clean", "Q0xFQU4=", 1000, 0),
    ];
    let peer_labels = |peer: &str, key: &str| {
        format!("node=\"n1\",interface=\"wg0\",public_key=\"{key}\",peer=\"{peer}\"")
    };
    let mut family = |name: &str, kind: &str, lines: &dyn Fn(i64, i64) -> Vec<String>| {
        writeln!(om, "# TYPE {name} {kind}").unwrap();
        for i in 0..SAMPLES {
            let t = start + i * STEP;
            for line in lines(i, t) {
                writeln!(om, "{line} {t}").unwrap();
            }
        }
    };
    let per_peer = |metric: &'static str, value: &'static dyn Fn(i64, i64, i64) -> i64| {
        move |i: i64, _t: i64| {
            peers
                .iter()
                .map(|(peer, key, received, lost)| {
                    let v = value(i, *received, *lost);
                    format!("{metric}{{{}}} {v}", peer_labels(peer, key))
                })
                .collect::<Vec<_>>()
        }
    };
    family(
        "plexd_peer_receive_packets",
        "counter",
        &per_peer("plexd_peer_receive_packets_total", &|i, r, _| i * r),
    );
    family(
        "plexd_peer_lost_packets",
        "counter",
        &per_peer("plexd_peer_lost_packets_total", &|i, _, l| i * l),
    );
    family(
        "plexd_peer_receive_bytes",
        "counter",
        &per_peer("plexd_peer_receive_bytes_total", &|i, r, _| i * r * 1200),
    );
    family(
        "plexd_peer_transmit_bytes",
        "counter",
        &per_peer("plexd_peer_transmit_bytes_total", &|i, r, _| i * r * 900),
    );
    family(
        "plexd_peer_last_handshake_timestamp_seconds",
        "gauge",
        &|_, t| {
            peers
                .iter()
                .map(|(peer, key, ..)| {
                    format!(
                        "plexd_peer_last_handshake_timestamp_seconds{{{}}} {}",
                        peer_labels(peer, key),
                        t - t % 120
                    )
                })
                .collect()
        },
    );
    family("plexd_peer_info", "gauge", &|_, _| {
        peers
            .iter()
            .map(|(peer, key, ..)| {
                format!(
                    "plexd_peer_info{{{},endpoint=\"192.0.2.1:51820\"}} 1",
                    peer_labels(peer, key)
                )
            })
            .collect()
    });
    // Four probes a step, spread over the buckets.
    family("plexd_peer_rtt_seconds", "histogram", &|i, _| {
        let buckets = [
            ("0.0005", 0),
            ("0.001", 1),
            ("0.0025", 2),
            ("0.005", 3),
            ("0.01", 3),
            ("0.025", 4),
            ("+Inf", 4),
        ];
        let mut lines = Vec::new();
        for (peer, key, ..) in peers {
            let labels = peer_labels(peer, key);
            for (le, per_step) in buckets {
                lines.push(format!(
                    "plexd_peer_rtt_seconds_bucket{{{labels},le=\"{le}\"}} {}",
                    i * per_step
                ));
            }
            lines.push(format!(
                "plexd_peer_rtt_seconds_count{{{labels}}} {}",
                i * 4
            ));
            lines.push(format!(
                "plexd_peer_rtt_seconds_sum{{{labels}}} {}",
                i as f64 * 0.02
            ));
        }
        lines
    });
    let destinations = ["control_plane", "remote_write"];
    let per_destination = |metric: &'static str, value: fn(i64) -> i64| {
        move |i: i64, _t: i64| {
            destinations
                .iter()
                .map(|d| format!("{metric}{{node=\"n1\",destination=\"{d}\"}} {}", value(i)))
                .collect::<Vec<_>>()
        }
    };
    family(
        "plexd_agent_queued_points",
        "gauge",
        &per_destination("plexd_agent_queued_points", |i| i * 10),
    );
    for (family_name, metric) in [
        (
            "plexd_agent_dropped_points",
            "plexd_agent_dropped_points_total",
        ),
        (
            "plexd_agent_rejected_points",
            "plexd_agent_rejected_points_total",
        ),
        ("plexd_agent_reconnects", "plexd_agent_reconnects_total"),
    ] {
        family(family_name, "counter", &per_destination(metric, |i| i));
    }
    family("plexd_agent_uptime_seconds", "gauge", &|i, _| {
        vec![format!(
            "plexd_agent_uptime_seconds{{node=\"n1\"}} {}",
            i * STEP
        )]
    });
    om.push_str("# EOF\n");
    om
}

#[test]
fn every_dashboard_query_runs_on_a_real_prometheus_and_shows_data() {
    // Minutes-aligned, three hours back: well inside the default retention, and outside the
    // head block that a starting Prometheus owns.
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let start = now - 3 * 3600 - now % 60;
    let at = start + (SAMPLES - 5) * STEP;

    let dir = TempDir::new("prometheus-dashboard");
    backfill(&dir, &synthetic_series(start));
    let server = Prometheus::start(dir);

    let d = dashboard();
    let mut queries = dashboard_queries(&d);
    // The variables' label_values(selector, label): the selector must find series.
    for var in d["templating"]["list"].as_array().unwrap() {
        if let Some(def) = var["definition"].as_str() {
            let inner = def
                .strip_prefix("label_values(")
                .and_then(|s| s.rsplit_once(", "))
                .map(|(selector, _)| selector.to_owned())
                .unwrap_or_else(|| panic!("{def}"));
            queries.push((format!("variable {}", var["name"]), inner));
        }
    }
    assert!(queries.len() >= 12, "{queries:?}");
    for (title, expr) in queries {
        let query = substitute(&expr);
        let answer = server.query(&query, at);
        assert_eq!(answer["status"], "success", "{title}: {query}: {answer}");
        let result = answer["data"]["result"].as_array();
        assert!(
            result.is_some_and(|r| !r.is_empty()),
            "{title}: no data for {query}: {answer}"
        );
    }
    // The loss panel shows the lossy peer's 3 % and the clean one's 0.
    let (_, loss) = dashboard_queries(&d)
        .into_iter()
        .find(|(title, _)| title == "Packet loss per peer")
        .expect("the loss panel");
    let answer = server.query(&substitute(&loss), at);
    for series in answer["data"]["result"].as_array().unwrap() {
        let value: f64 = series["value"][1].as_str().unwrap().parse().unwrap();
        let expected = if series["metric"]["peer"] == "lossy" {
            0.03
        } else {
            0.0
        };
        assert!((value - expected).abs() < 1e-9, "{series}");
    }
}

#[test]
fn an_invalid_query_is_an_error_from_the_real_prometheus() {
    // The check above means something only if Prometheus refuses what does not parse.
    let server = Prometheus::start(TempDir::new("prometheus-invalid"));
    let answer = server.query("sum by (node) (rate(plexd_peer_receive_bytes_total[1m])", 0);
    assert_eq!(answer["status"], "error", "{answer}");
}
