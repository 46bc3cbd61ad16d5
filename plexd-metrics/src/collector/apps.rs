//! The `app` group: one point per application endpoint (`metrics.apps`) and cycle, saying
//! whether it answered and what it answered.
//!
//! Every endpoint is fetched at once and each fetch is bounded by its own timeout, so the
//! group never takes longer than the slowest timeout (plus reading what arrived). An
//! endpoint that fails, hangs or answers garbage gives its point with `up: false` and the
//! reason; it never fails the group or holds up the other endpoints.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use chrono::Utc;
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use super::{CollectError, Collector, Cycle};
use crate::accounting::app_metrics::parse_body;
use crate::api::{MetricPoint, GROUP_APP};

/// What one fetch of an endpoint brought back.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AppResponse {
    /// The body, whole (the fetcher bounds its size).
    pub body: Vec<u8>,
    /// The `Content-Type` header, if any.
    pub content_type: Option<String>,
}

/// One application endpoint, as the collector sees it: the HTTP adapter
/// ([`crate::source::apps::HttpAppFetcher`]) in the agent, fakes in tests.
#[async_trait]
pub trait AppFetcher: Send + Sync {
    /// The endpoint's configured name, the `name` of its points.
    fn name(&self) -> &str;
    /// Where it is fetched from, for the reasons in the points.
    fn url(&self) -> &str;
    /// Longest time one fetch may take.
    fn timeout(&self) -> Duration;
    /// Most metrics kept from one answer.
    fn max_metrics(&self) -> usize;
    /// Fetches the endpoint once. The error says what happened ("answered 503 Service
    /// Unavailable", "body larger than 16 MiB"); the collector adds the URL.
    async fn fetch(&self) -> Result<AppResponse, String>;
}

/// The `data` of an `app` point.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AppStats {
    /// The endpoint's name (`metrics.apps[].name`).
    pub name: String,
    /// Whether it answered with a 2xx and a body that could be read, within its timeout.
    pub up: bool,
    /// Seconds from sending the request to the end of the body (or to the failure).
    pub scrape_duration_seconds: f64,
    /// What it reported: key → number (see `accounting::app_metrics` for the keys); empty
    /// when it is down.
    pub metrics: serde_json::Map<String, serde_json::Value>,
    /// Metrics left out because of the bounds on their number and key length.
    pub truncated: u64,
    /// Why it is down, naming the URL; absent when it is up.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// Emits one `app` point per endpoint per cycle.
pub struct AppsCollector {
    apps: Vec<Arc<dyn AppFetcher>>,
}

impl AppsCollector {
    /// A collector over `apps`.
    pub fn new(apps: Vec<Arc<dyn AppFetcher>>) -> Self {
        Self { apps }
    }
}

#[async_trait]
impl Collector for AppsCollector {
    fn group(&self) -> &'static str {
        GROUP_APP
    }

    async fn collect(
        &self,
        _: Cycle,
        cancel: &CancellationToken,
    ) -> Result<Vec<MetricPoint>, CollectError> {
        let scrapes = self.apps.iter().map(|app| scrape(app.as_ref()));
        let stats = tokio::select! {
            stats = futures_util::future::join_all(scrapes) => stats,
            () = cancel.cancelled() => {
                return Err(CollectError::Cancelled { group: GROUP_APP, partial: Vec::new() });
            }
        };
        let now = Utc::now();
        stats
            .iter()
            .map(|s| {
                MetricPoint::new(now, GROUP_APP, "", s)
                    .map_err(|e| CollectError::source(GROUP_APP, e))
            })
            .collect()
    }
}

/// Fetches and reads one endpoint; whatever goes wrong becomes the point's `error`.
async fn scrape(app: &dyn AppFetcher) -> AppStats {
    let started = tokio::time::Instant::now();
    // The fetcher bounds itself too; this bound holds for any fetcher, so that one that
    // ignores its timeout cannot hold up the group.
    let fetched = tokio::time::timeout(app.timeout(), app.fetch()).await;
    let scrape_duration_seconds = started.elapsed().as_secs_f64();
    let read = match fetched {
        Err(_) => Err(format!(
            "no answer within {}",
            humantime::format_duration(app.timeout())
        )),
        Ok(Err(why)) => Err(why),
        Ok(Ok(response)) => {
            // Reading a page of up to 16 MiB takes milliseconds of CPU: on the blocking
            // pool, so that the runtime's workers (the Manager's loop, the servers) go on.
            let max = app.max_metrics();
            tokio::task::spawn_blocking(move || {
                parse_body(&response.body, response.content_type.as_deref(), max)
                    .map(|(_, read)| read)
                    .map_err(|e| e.to_string())
            })
            .await
            .unwrap_or_else(|e| Err(format!("reading the answer failed: {e}")))
        }
    };
    let (metrics, truncated, error) = match read {
        Ok(read) => (read.metrics, read.truncated, None),
        Err(why) => (
            serde_json::Map::new(),
            0,
            Some(format!("{}: {why}", app.url())),
        ),
    };
    AppStats {
        name: app.name().to_owned(),
        up: error.is_none(),
        scrape_duration_seconds,
        metrics,
        truncated,
        error,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// An endpoint that answers `answer` after `delay`, or never.
    struct Fake {
        name: &'static str,
        delay: Option<Duration>,
        answer: Result<AppResponse, String>,
    }

    impl Fake {
        fn answering(name: &'static str, body: &str, content_type: Option<&str>) -> Arc<Self> {
            Arc::new(Self {
                name,
                delay: Some(Duration::ZERO),
                answer: Ok(AppResponse {
                    body: body.as_bytes().to_vec(),
                    content_type: content_type.map(str::to_owned),
                }),
            })
        }
    }

    #[async_trait]
    impl AppFetcher for Fake {
        fn name(&self) -> &str {
            self.name
        }
        fn url(&self) -> &str {
            "http://127.0.0.1:1/metrics"
        }
        fn timeout(&self) -> Duration {
            Duration::from_secs(2)
        }
        fn max_metrics(&self) -> usize {
            100
        }
        async fn fetch(&self) -> Result<AppResponse, String> {
            match self.delay {
                Some(delay) => tokio::time::sleep(delay).await,
                None => std::future::pending().await,
            }
            self.answer.clone()
        }
    }

    async fn collect(apps: Vec<Arc<dyn AppFetcher>>) -> Vec<AppStats> {
        AppsCollector::new(apps)
            .collect(Cycle::default(), &CancellationToken::new())
            .await
            .unwrap()
            .iter()
            .map(|p| {
                assert_eq!((p.group.as_str(), p.peer_id.as_str()), ("app", ""));
                p.data.decode().unwrap()
            })
            .collect()
    }

    #[tokio::test(start_paused = true)]
    async fn each_endpoint_gives_one_point_whatever_the_others_do() {
        let started = tokio::time::Instant::now();
        let stats = collect(vec![
            Fake::answering("json", r#"{"a": {"b": 2}, "ok": true}"#, None),
            Fake::answering("prom", "# TYPE up gauge\nup 1\n", Some("text/plain")),
            Arc::new(Fake {
                name: "hangs",
                delay: None,
                answer: Err("unused".into()),
            }),
            Arc::new(Fake {
                name: "fails",
                delay: Some(Duration::from_millis(300)),
                answer: Err("answered 503 Service Unavailable".into()),
            }),
            Fake::answering("garbage", "<html>", Some("text/html")),
        ])
        .await;
        // The hanging one is given up at its timeout, and the others did not wait for it.
        assert_eq!(started.elapsed(), Duration::from_secs(2));
        let names: Vec<&str> = stats.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names, ["json", "prom", "hangs", "fails", "garbage"]);

        assert!(stats[0].up && stats[0].error.is_none());
        assert_eq!(
            serde_json::Value::Object(stats[0].metrics.clone()),
            json!({"a.b": 2, "ok": 1})
        );
        assert_eq!(
            serde_json::Value::Object(stats[1].metrics.clone()),
            json!({"up": 1.0})
        );

        let down = |i: usize| (stats[i].up, stats[i].metrics.len(), stats[i].error.clone());
        assert_eq!(
            down(2),
            (
                false,
                0,
                Some("http://127.0.0.1:1/metrics: no answer within 2s".into())
            )
        );
        assert_eq!(stats[2].scrape_duration_seconds, 2.0);
        assert_eq!(
            down(3),
            (
                false,
                0,
                Some("http://127.0.0.1:1/metrics: answered 503 Service Unavailable".into())
            )
        );
        assert_eq!(stats[3].scrape_duration_seconds, 0.3);
        let (up, _, error) = down(4);
        assert!(!up);
        assert!(
            error
                .unwrap()
                .starts_with("http://127.0.0.1:1/metrics: not JSON or Prometheus text: "),
            "{stats:?}"
        );
    }

    #[tokio::test]
    async fn the_point_has_the_documented_keys() {
        let points = AppsCollector::new(vec![Fake::answering("a", "m 1\n", None)])
            .collect(Cycle::default(), &CancellationToken::new())
            .await
            .unwrap();
        let data = points[0].data.to_value();
        let keys: Vec<&String> = data.as_object().unwrap().keys().collect();
        assert_eq!(
            keys,
            [
                "name",
                "up",
                "scrape_duration_seconds",
                "metrics",
                "truncated"
            ]
        );
        let down = AppsCollector::new(vec![Fake::answering(
            "b",
            "\u{0}",
            Some("application/json"),
        )])
        .collect(Cycle::default(), &CancellationToken::new())
        .await
        .unwrap();
        assert!(down[0].data.to_value()["error"].is_string());
    }

    #[tokio::test(start_paused = true)]
    async fn truncation_is_counted_in_the_point() {
        let body: String = (0..150).map(|i| format!("m{i} {i}\n")).collect();
        let stats = collect(vec![Fake::answering("big", &body, None)]).await;
        assert_eq!((stats[0].metrics.len(), stats[0].truncated), (100, 50));
        assert!(stats[0].up);
    }

    #[tokio::test]
    async fn cancellation_ends_the_cycle_at_once() {
        let cancel = CancellationToken::new();
        cancel.cancel();
        let hang = Arc::new(Fake {
            name: "hangs",
            delay: None,
            answer: Err(String::new()),
        });
        let err = AppsCollector::new(vec![hang])
            .collect(Cycle::default(), &cancel)
            .await
            .unwrap_err();
        assert!(matches!(err, CollectError::Cancelled { group: "app", .. }));
    }

    #[tokio::test]
    async fn no_endpoints_no_points() {
        assert!(collect(Vec::new()).await.is_empty());
    }
}
