//! The health endpoint: `/healthz` (liveness) and `/readyz` (readiness) over plain HTTP,
//! for a kubelet's probes or a service manager's checks.
//!
//! Liveness asks whether the Manager's loop still turns: each of its two tickers must have
//! fired within twice its interval. Readiness asks whether the agent does its job: the
//! config was loaded, the kernel programs are attached (or were turned off on purpose), and
//! delivery keeps up (the last report was accepted, or the retry queue still has room), and
//! a configured durable queue can write to its directory.
//! Both answer JSON, with the reason when the answer is no. There is deliberately no metrics
//! exposition here: every point goes to the control plane, as in the spec.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::header::{HeaderValue, ALLOW, CACHE_CONTROL, CONTENT_TYPE};
use hyper::{Method, Request, Response, StatusCode};
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::info;

use crate::collector::DeliveryCounters;
use crate::manager::{DeliveryStats, Heartbeat, LastReport, ManagerOptions};
use crate::queue::QueueState;

/// Why the health endpoint could not start.
#[derive(Debug, thiserror::Error)]
pub enum HealthError {
    /// The address cannot be bound (in use, not an address of this host, no permission).
    #[error(
        "metrics: health: cannot listen on {addr}: {source}; set metrics.health.listen to a \
         free address of this host, or metrics.health.enabled: false"
    )]
    Bind {
        /// The configured address.
        addr: SocketAddr,
        /// What the OS said.
        source: std::io::Error,
    },
}

/// Whether the kernel programs are there, as readiness sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum EbpfState {
    /// Attached to the underlay interfaces.
    Attached,
    /// Turned off in the config (`metrics.ebpf.enabled: false`): nothing is missing.
    Disabled,
    /// Wanted but not attached; the text says why.
    Failed(String),
}

/// What the checks read: the Manager's heartbeat and delivery figures, the kernel programs'
/// state and the intervals they are judged by.
pub struct HealthState {
    heartbeat: Arc<Heartbeat>,
    delivery: Arc<DeliveryStats>,
    ebpf: EbpfState,
    collect_interval: Duration,
    report_interval: Duration,
    max_points: u64,
}

/// One check's answer: whether it passed, and the JSON body that says why.
#[derive(Clone, Debug, PartialEq)]
pub struct Verdict {
    /// Whether the check passed (HTTP 200) or not (HTTP 503).
    pub ok: bool,
    /// `{"status": "ok"|"fail", "reason"?: ..., "checks": {...}}`.
    pub body: Value,
}

impl HealthState {
    /// State for a Manager running with `options`, which publishes into `heartbeat` and
    /// `delivery`.
    pub fn new(
        options: &ManagerOptions,
        heartbeat: Arc<Heartbeat>,
        delivery: Arc<DeliveryStats>,
        ebpf: EbpfState,
    ) -> Self {
        Self {
            heartbeat,
            delivery,
            ebpf,
            collect_interval: options.collect_interval,
            report_interval: options.report_interval,
            max_points: options.limits.max_points as u64,
        }
    }

    /// `/healthz`: both tickers fired within twice their interval.
    pub fn liveness(&self) -> Verdict {
        let now = Instant::now();
        let mut reasons = Vec::new();
        let mut checks = serde_json::Map::new();
        for (name, key, last, interval) in [
            (
                "collect",
                "metrics.collect_interval",
                self.heartbeat.last_collect(),
                self.collect_interval,
            ),
            (
                "report",
                "metrics.report_interval",
                self.heartbeat.last_report(),
                self.report_interval,
            ),
        ] {
            let limit = interval * 2;
            let check = match last {
                None => {
                    reasons.push(format!("the {name} loop has not started"));
                    json!({"ok": false, "limit_seconds": limit.as_secs_f64()})
                }
                Some(at) => {
                    let ago = now.saturating_duration_since(at);
                    let ok = ago <= limit;
                    if !ok {
                        reasons.push(format!(
                            "the {name} loop is stuck: its ticker last fired {}s ago, more \
                             than twice {key} ({}s)",
                            ago.as_secs(),
                            interval.as_secs()
                        ));
                    }
                    json!({
                        "ok": ok,
                        "last_tick_seconds_ago": round_ms(ago),
                        "limit_seconds": limit.as_secs_f64(),
                    })
                }
            };
            checks.insert(name.to_owned(), check);
        }
        verdict(reasons, checks)
    }

    /// `/readyz`: config loaded, kernel programs attached or off, delivery keeping up, the
    /// durable queue (when configured) writing to its directory.
    pub fn readiness(&self) -> Verdict {
        let mut reasons = Vec::new();
        let mut checks = serde_json::Map::new();
        // The endpoint only runs once the config was loaded and validated.
        checks.insert("config".to_owned(), json!({"ok": true}));
        let ebpf = match &self.ebpf {
            EbpfState::Attached => json!({"ok": true, "state": "attached"}),
            EbpfState::Disabled => json!({"ok": true, "state": "disabled"}),
            EbpfState::Failed(why) => {
                reasons.push(format!("the kernel programs are not attached: {why}"));
                json!({"ok": false, "state": "failed", "error": why})
            }
        };
        checks.insert("ebpf".to_owned(), ebpf);

        let last = self.delivery.last_report();
        let totals = self.delivery.delivery_totals();
        let queued = totals.queued_points;
        let in_memory = self.delivery.memory_points();
        let full = in_memory >= self.max_points || self.delivery.dropping();
        let ok = last == LastReport::Accepted || !full;
        if !ok {
            let disk = match self.delivery.queue_state() {
                QueueState::Memory => String::new(),
                _ => format!(" in memory, {} bytes on disk", totals.spooled_bytes),
            };
            reasons.push(format!(
                "delivery is not keeping up: the last report was {} and the retry queue is \
                 full ({in_memory} of metrics.queue.max_points {}{disk}); the oldest points \
                 are being dropped",
                describe(last),
                self.max_points,
            ));
        }
        checks.insert(
            "delivery".to_owned(),
            json!({
                "ok": ok,
                "last_report": last.as_str(),
                "queued_points": queued,
                "max_points": self.max_points,
            }),
        );
        let queue = match self.delivery.queue_state() {
            QueueState::Memory => json!({"ok": true, "kind": "memory"}),
            QueueState::Disk(dir) => json!({
                "ok": true,
                "kind": "disk",
                "dir": dir.display().to_string(),
                "spooled_points": totals.spooled_points,
                "spooled_bytes": totals.spooled_bytes,
                "corrupt_batches": totals.corrupt_batches,
            }),
            QueueState::DiskUnavailable { dir, error } => {
                reasons.push(format!(
                    "the durable queue is unavailable, points are kept in memory only: {error}"
                ));
                json!({
                    "ok": false,
                    "kind": "memory",
                    "dir": dir.display().to_string(),
                    "error": error,
                })
            }
        };
        checks.insert("queue".to_owned(), queue);
        verdict(reasons, checks)
    }

    fn answer(&self, req: &Request<Incoming>) -> Response<Full<Bytes>> {
        let verdict = match req.uri().path() {
            "/healthz" => self.liveness(),
            "/readyz" => self.readiness(),
            _ => {
                return respond(
                    StatusCode::NOT_FOUND,
                    &json!({"status": "fail", "reason": "no such path; ask /healthz or /readyz"}),
                )
            }
        };
        if req.method() != Method::GET && req.method() != Method::HEAD {
            let mut response = respond(
                StatusCode::METHOD_NOT_ALLOWED,
                &json!({"status": "fail", "reason": "only GET and HEAD are served"}),
            );
            response
                .headers_mut()
                .insert(ALLOW, HeaderValue::from_static("GET, HEAD"));
            return response;
        }
        let status = if verdict.ok {
            StatusCode::OK
        } else {
            StatusCode::SERVICE_UNAVAILABLE
        };
        respond(status, &verdict.body)
    }
}

fn describe(last: LastReport) -> &'static str {
    match last {
        LastReport::None => "not sent yet",
        LastReport::Accepted => "accepted",
        LastReport::Failed => "a failure",
        LastReport::Rejected => "rejected by the control plane",
    }
}

fn round_ms(d: Duration) -> f64 {
    (d.as_millis() as f64) / 1000.0
}

fn verdict(reasons: Vec<String>, checks: serde_json::Map<String, Value>) -> Verdict {
    let ok = reasons.is_empty();
    let mut body = serde_json::Map::new();
    body.insert("status".to_owned(), json!(if ok { "ok" } else { "fail" }));
    if !ok {
        body.insert("reason".to_owned(), json!(reasons.join("; ")));
    }
    body.insert("checks".to_owned(), Value::Object(checks));
    Verdict {
        ok,
        body: Value::Object(body),
    }
}

fn respond(status: StatusCode, body: &Value) -> Response<Full<Bytes>> {
    let mut text = body.to_string();
    text.push('\n');
    let mut response = Response::new(Full::new(Bytes::from(text)));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

/// The bound listener, ready to serve.
pub struct HealthServer {
    listener: TcpListener,
    state: Arc<HealthState>,
}

impl HealthServer {
    /// Binds `addr`. Must run inside a tokio runtime.
    pub fn bind(addr: SocketAddr, state: HealthState) -> Result<Self, HealthError> {
        let listener =
            crate::http_server::bind(addr).map_err(|source| HealthError::Bind { addr, source })?;
        Ok(Self {
            listener,
            state: Arc::new(state),
        })
    }

    /// The address actually bound (the port is chosen by the OS when the config says 0).
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Answers probes until `cancel` fires (see [`crate::http_server`]).
    pub async fn serve(self, cancel: CancellationToken) {
        if let Ok(addr) = self.local_addr() {
            info!(component = "metrics", %addr, "health endpoint listening (/healthz, /readyz)");
        }
        let state = self.state;
        let answer: crate::http_server::Answer = Arc::new(move |req| state.answer(req));
        crate::http_server::serve("health", self.listener, None, answer, cancel).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::MetricPoint;
    use crate::collector::{BoxError, CollectError, Collector};
    use crate::manager::Manager;
    use crate::queue::QueueLimits;
    use crate::reporter::MetricReporter;
    use async_trait::async_trait;
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    use tokio::sync::{mpsc, Notify};

    fn cfg(collect: u64, report: u64, batch_size: usize, max_points: usize) -> ManagerOptions {
        ManagerOptions {
            collect_interval: Duration::from_secs(collect),
            report_interval: Duration::from_secs(report),
            limits: QueueLimits {
                batch_size,
                max_points,
                max_bytes: crate::config::DEFAULT_QUEUE_MAX_BYTES,
                max_memory_bytes: crate::config::DEFAULT_QUEUE_MAX_MEMORY_BYTES as usize,
            },
        }
    }

    /// One point per call; from call `block_from` on, waits until the gate is opened.
    struct Gated {
        calls: AtomicU64,
        block_from: u64,
        gate: Notify,
        open: AtomicBool,
    }

    impl Gated {
        fn new(block_from: u64) -> Arc<Self> {
            Arc::new(Self {
                calls: AtomicU64::new(0),
                block_from,
                gate: Notify::new(),
                open: AtomicBool::new(false),
            })
        }
        fn open(&self) {
            self.open.store(true, Ordering::SeqCst);
            self.gate.notify_waiters();
        }
    }

    #[async_trait]
    impl Collector for Gated {
        fn group(&self) -> &'static str {
            "system"
        }
        async fn collect(
            &self,
            _: crate::collector::Cycle,
            _: &CancellationToken,
        ) -> Result<Vec<MetricPoint>, CollectError> {
            let n = self.calls.fetch_add(1, Ordering::SeqCst) + 1;
            if n >= self.block_from {
                let wait = self.gate.notified();
                if !self.open.load(Ordering::SeqCst) {
                    wait.await;
                }
            }
            Ok(vec![MetricPoint::new(
                chrono::Utc::now(),
                "system",
                "",
                &json!({"n": n}),
            )
            .unwrap()])
        }
    }

    /// Fails every batch while `down`, accepts otherwise; says when it accepted one.
    struct Switch {
        down: AtomicBool,
        accepted: mpsc::UnboundedSender<usize>,
    }

    #[async_trait]
    impl MetricReporter for Switch {
        async fn report_metrics(&self, _: &str, batch: &[MetricPoint]) -> Result<(), BoxError> {
            if self.down.load(Ordering::SeqCst) {
                return Err("control plane unavailable".into());
            }
            let _ = self.accepted.send(batch.len());
            Ok(())
        }
    }

    struct Running {
        addr: SocketAddr,
        cancel: CancellationToken,
        reporter: Arc<Switch>,
        accepted: mpsc::UnboundedReceiver<usize>,
    }

    impl Drop for Running {
        fn drop(&mut self) {
            self.cancel.cancel();
        }
    }

    /// A Manager with `collector` and the health endpoint on a free loopback port.
    fn start(cfg: ManagerOptions, collector: Arc<dyn Collector>, ebpf: EbpfState) -> Running {
        let (tx, accepted) = mpsc::unbounded_channel();
        let reporter = Arc::new(Switch {
            down: AtomicBool::new(false),
            accepted: tx,
        });
        let (heartbeat, delivery) = (Arc::new(Heartbeat::default()), Arc::default());
        let state = HealthState::new(&cfg, heartbeat.clone(), Arc::clone(&delivery), ebpf);
        let server = HealthServer::bind("127.0.0.1:0".parse().unwrap(), state).unwrap();
        let addr = server.local_addr().unwrap();
        let manager = Manager::new(Some(cfg), vec![collector], reporter.clone(), "node-1")
            .with_heartbeat(heartbeat)
            .with_delivery_stats(Arc::clone(&delivery));
        let cancel = CancellationToken::new();
        tokio::spawn(server.serve(cancel.clone()));
        tokio::spawn({
            let cancel = cancel.clone();
            async move { manager.run(cancel).await }
        });
        Running {
            addr,
            cancel,
            reporter,
            accepted,
        }
    }

    /// A plain HTTP/1.1 request over a fresh connection: status and parsed body.
    ///
    /// Made from a blocking thread: while one runs, the paused clock of these tests does not
    /// advance on its own. Awaited on the runtime, the request would leave it idle while the
    /// reply crosses loopback, and the clock would jump to the next collect or report.
    async fn request(addr: SocketAddr, method: &str, path: &str) -> (u16, String) {
        let head = format!("{method} {path} HTTP/1.1\r\nHost: probe\r\n\r\n");
        let text = tokio::task::spawn_blocking(move || {
            use std::io::{Read as _, Write as _};
            let mut stream = std::net::TcpStream::connect(addr).unwrap();
            stream.write_all(head.as_bytes()).unwrap();
            let mut raw = Vec::new();
            stream.read_to_end(&mut raw).unwrap();
            String::from_utf8(raw).unwrap()
        })
        .await
        .unwrap();
        let (head, body) = text.split_once("\r\n\r\n").expect("a complete response");
        let status = head.split(' ').nth(1).unwrap().parse().unwrap();
        assert!(
            head.to_ascii_lowercase()
                .contains("content-type: application/json"),
            "{head}"
        );
        (status, body.to_owned())
    }

    async fn get(addr: SocketAddr, path: &str) -> (u16, Value) {
        let (status, body) = request(addr, "GET", path).await;
        (status, serde_json::from_str(&body).expect("a JSON body"))
    }

    async fn sleep_until_secs(start: Instant, secs: u64) {
        tokio::time::sleep_until(start + Duration::from_secs(secs)).await;
    }

    #[tokio::test(start_paused = true)]
    async fn a_stuck_collector_holds_back_neither_tickers_nor_liveness() {
        let t0 = Instant::now();
        let gated = Gated::new(3);
        let mut run = start(cfg(5, 10, 100, 1000), gated.clone(), EbpfState::Disabled);

        let (status, body) = get(run.addr, "/healthz").await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["status"], "ok");
        assert_eq!(body["checks"]["collect"]["limit_seconds"], 10.0);
        assert_eq!(body["checks"]["report"]["limit_seconds"], 20.0);
        assert_eq!(
            run.accepted.recv().await,
            Some(2),
            "the cycles at 5 and 10 s"
        );

        // From the third collect (t = 15 s) on, every collection hangs: each is abandoned
        // at the next tick, and the tickers go on.
        for secs in [26, 31, 44] {
            sleep_until_secs(t0, secs).await;
            let (status, body) = get(run.addr, "/healthz").await;
            assert_eq!(status, 200, "at {secs} s: {body}");
            assert!(
                body["checks"]["collect"]["last_tick_seconds_ago"]
                    .as_f64()
                    .unwrap()
                    < 5.0,
                "at {secs} s: {body}"
            );
            assert!(
                body["checks"]["report"]["last_tick_seconds_ago"]
                    .as_f64()
                    .unwrap()
                    < 10.0,
                "at {secs} s: {body}"
            );
        }

        // Once the source answers again, its points flow.
        gated.open();
        assert!(
            run.accepted.recv().await.is_some(),
            "points after the source recovered went out"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_full_queue_after_failed_reports_is_not_ready_until_one_is_accepted() {
        let t0 = Instant::now();
        let mut run = start(cfg(5, 10, 2, 4), Gated::new(u64::MAX), EbpfState::Attached);
        let (status, body) = get(run.addr, "/readyz").await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(
            body["checks"],
            json!({
                "config": {"ok": true},
                "ebpf": {"ok": true, "state": "attached"},
                "delivery": {"ok": true, "last_report": "none", "queued_points": 0, "max_points": 4},
                "queue": {"ok": true, "kind": "memory"},
            })
        );

        run.reporter.down.store(true, Ordering::SeqCst);
        // t = 10 s: two points fail and wait; the queue is not full yet.
        sleep_until_secs(t0, 11).await;
        let (status, body) = get(run.addr, "/readyz").await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["checks"]["delivery"]["last_report"], "failed");
        assert_eq!(body["checks"]["delivery"]["queued_points"], 2);

        // t = 20 s: four points, the bound.
        sleep_until_secs(t0, 21).await;
        let (status, body) = get(run.addr, "/readyz").await;
        assert_eq!(status, 503, "{body}");
        assert_eq!(
            body["reason"],
            "delivery is not keeping up: the last report was a failure and the retry queue is \
             full (4 of metrics.queue.max_points 4); the oldest points are being dropped"
        );
        assert_eq!(body["checks"]["delivery"]["ok"], false);
        // Liveness is another matter: the loop turns.
        assert_eq!(get(run.addr, "/healthz").await.0, 200);

        run.reporter.down.store(false, Ordering::SeqCst);
        assert_eq!(run.accepted.recv().await, Some(2));
        let (status, body) = get(run.addr, "/readyz").await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["checks"]["delivery"]["last_report"], "accepted");
        // Whether the collect at 25 s dropped points depends on the retries' jitter (the
        // retry after the outage may come before it or after); readiness does not.
    }

    #[tokio::test(start_paused = true)]
    async fn kernel_programs_that_failed_to_attach_are_not_ready_and_say_why() {
        let run = start(
            cfg(5, 10, 100, 1000),
            Gated::new(u64::MAX),
            EbpfState::Failed("cannot load: permission denied".into()),
        );
        let (status, body) = get(run.addr, "/readyz").await;
        assert_eq!(status, 503);
        assert_eq!(
            body["reason"],
            "the kernel programs are not attached: cannot load: permission denied"
        );
        assert_eq!(body["checks"]["ebpf"]["state"], "failed");
        assert_eq!(body["checks"]["delivery"]["ok"], true);
        assert_eq!(get(run.addr, "/healthz").await.0, 200, "alive all the same");
    }

    #[tokio::test(start_paused = true)]
    async fn only_the_two_paths_and_reading_methods_are_served() {
        let run = start(
            cfg(5, 10, 100, 1000),
            Gated::new(u64::MAX),
            EbpfState::Disabled,
        );
        let (status, body) = get(run.addr, "/metrics").await;
        assert_eq!(status, 404, "no metrics exposition: {body}");
        let (status, body) = request(run.addr, "POST", "/healthz").await;
        assert_eq!(status, 405, "{body}");
        let (status, body) = request(run.addr, "HEAD", "/readyz").await;
        assert_eq!((status, body.as_str()), (200, ""));
        let (status, body) = get(run.addr, "/readyz").await;
        assert_eq!(status, 200);
        assert_eq!(body["checks"]["ebpf"]["state"], "disabled");
    }

    #[tokio::test(start_paused = true)]
    async fn a_loop_that_never_started_is_not_alive() {
        let cfg = cfg(5, 10, 100, 1000);
        let state = HealthState::new(&cfg, Arc::default(), Arc::default(), EbpfState::Disabled);
        let verdict = state.liveness();
        assert!(!verdict.ok);
        assert_eq!(
            verdict.body["reason"],
            "the collect loop has not started; the report loop has not started"
        );
    }

    #[tokio::test]
    async fn an_address_in_use_names_the_setting() {
        let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = taken.local_addr().unwrap();
        let cfg = cfg(5, 10, 100, 1000);
        let state = HealthState::new(&cfg, Arc::default(), Arc::default(), EbpfState::Disabled);
        let e = HealthServer::bind(addr, state)
            .err()
            .expect("the port is taken");
        let text = e.to_string();
        assert!(
            text.starts_with(&format!("metrics: health: cannot listen on {addr}: "))
                && text.ends_with(
                    "; set metrics.health.listen to a free address of this host, or \
                     metrics.health.enabled: false"
                ),
            "{text}"
        );
    }
}
