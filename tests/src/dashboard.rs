//! The Grafana dashboard in `deploy/grafana`, as the tests read it: its queries, and what
//! Grafana would send to Prometheus for them.

use serde_json::Value;

use crate::pod::deploy_dir;

/// The dashboard's JSON.
pub fn dashboard() -> Value {
    let path = deploy_dir().join("grafana/plexd-metrics.json");
    serde_json::from_str(&std::fs::read_to_string(&path).expect("the dashboard"))
        .expect("the dashboard is JSON")
}

/// Every panel's targets' expressions, with the panel's title.
pub fn dashboard_queries(dashboard: &Value) -> Vec<(String, String)> {
    dashboard["panels"]
        .as_array()
        .expect("panels")
        .iter()
        .filter(|p| p["type"] != "row")
        .flat_map(|p| {
            let title = p["title"].as_str().expect("title").to_owned();
            p["targets"]
                .as_array()
                .expect("targets")
                .iter()
                .map(move |t| (title.clone(), t["expr"].as_str().expect("expr").to_owned()))
        })
        .collect()
}

/// The query Prometheus gets for a Grafana expression: the variables replaced by what
/// "All" and a one-minute rate interval would give.
pub fn substitute(expr: &str) -> String {
    expr.replace("$__rate_interval", "1m")
        .replace("$node", ".*")
        .replace("$peer", ".*")
}
