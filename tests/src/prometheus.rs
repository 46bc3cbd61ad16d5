//! Real receivers for the tests, in a network namespace: Prometheus (with a config of the
//! test's own) and VictoriaMetrics, each with a private storage directory, queried over the
//! Prometheus query API they share, killed on drop.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::prometheus_server::{get, url_encode};
use crate::NetNs;

/// How long a receiver may take to become ready; an empty store opens in well under a
/// second, but a loaded CI machine is slow to start any Go binary.
const READY_DEADLINE: Duration = Duration::from_secs(60);

/// A running receiver: Prometheus or VictoriaMetrics.
pub struct Receiver<'a> {
    ns: &'a NetNs,
    child: Child,
    listen: SocketAddr,
    dir: PathBuf,
}

/// Prometheus, as tests start it.
pub type Prometheus<'a> = Receiver<'a>;

impl<'a> Receiver<'a> {
    /// Starts `/usr/bin/prometheus` in `ns`, listening on `listen` (an address of `ns`), with
    /// `config` as its YAML and `extra` flags (e.g. `--web.enable-remote-write-receiver`),
    /// and waits until it is ready.
    pub fn start(ns: &'a NetNs, listen: SocketAddr, config: &str, extra: &[&str]) -> Self {
        let dir = private_dir("prometheus", listen);
        std::fs::write(dir.join("prometheus.yml"), config).expect("prometheus config");
        let mut args = vec![
            format!("--config.file={}", dir.join("prometheus.yml").display()),
            format!("--storage.tsdb.path={}", dir.join("data").display()),
            format!("--web.listen-address={listen}"),
        ];
        args.extend(extra.iter().map(|a| (*a).to_owned()));
        Self::spawn(ns, "/usr/bin/prometheus", &args, listen, dir, "/-/ready")
    }

    /// Starts `/usr/bin/victoria-metrics` (single node) in `ns`, listening on `listen`; it
    /// takes remote write at `/api/v1/write`.
    pub fn victoria_metrics(ns: &'a NetNs, listen: SocketAddr) -> Self {
        let dir = private_dir("victoria-metrics", listen);
        let args = [
            format!("-storageDataPath={}", dir.join("data").display()),
            format!("-httpListenAddr={listen}"),
            // Samples are queryable at once instead of after the default cache delay.
            "-search.latencyOffset=0s".to_owned(),
            "-search.disableCache".to_owned(),
        ];
        Self::spawn(
            ns,
            "/usr/bin/victoria-metrics",
            &args,
            listen,
            dir,
            "/health",
        )
    }

    fn spawn(
        ns: &'a NetNs,
        program: &str,
        args: &[String],
        listen: SocketAddr,
        dir: PathBuf,
        ready: &str,
    ) -> Self {
        assert!(
            std::path::Path::new(program).exists(),
            "{program} is not installed: run `cargo xtask setup`"
        );
        let log = std::fs::File::create(dir.join("log")).expect("receiver log");
        let child = Command::new("ip")
            .args(["netns", "exec", ns.name(), program])
            .args(args)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("start {program}: {e}"));
        let mut server = Self {
            ns,
            child,
            listen,
            dir,
        };
        let deadline = Instant::now() + READY_DEADLINE;
        loop {
            if let Ok(Some(status)) = server.child.try_wait() {
                panic!("{program} exited with {status}: {}", server.log());
            }
            if matches!(server.get(ready), Ok((200, _))) {
                return server;
            }
            assert!(
                Instant::now() < deadline,
                "{program} not ready within {READY_DEADLINE:?}: {}",
                server.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Its log so far, for failure messages.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("log")).unwrap_or_default()
    }

    /// `GET path` inside the namespace: the status and the body.
    pub fn get(&self, path: &str) -> std::io::Result<(u16, String)> {
        let listen = self.listen;
        self.ns.run(move || get(listen, path))?
    }

    /// The result of an instant query: the API's `data.result` array. Panics on an error
    /// answer, with Prometheus' reason.
    pub fn query(&self, expr: &str) -> Vec<serde_json::Value> {
        let path = format!("/api/v1/query?query={}", url_encode(expr));
        let (status, body) = self.get(&path).expect("query prometheus");
        let answer: serde_json::Value = serde_json::from_str(&body)
            .unwrap_or_else(|e| panic!("prometheus answered {status} with no JSON ({e}): {body}"));
        assert_eq!(answer["status"], "success", "query {expr}: {body}");
        answer["data"]["result"]
            .as_array()
            .cloned()
            .unwrap_or_default()
    }

    /// The single value `expr` gives (for a query that selects one series), or `None` while
    /// it gives none.
    pub fn value(&self, expr: &str) -> Option<f64> {
        let result = self.query(expr);
        assert!(
            result.len() <= 1,
            "{expr} selects {} series: {result:?}",
            result.len()
        );
        result
            .first()
            .and_then(|r| r["value"][1].as_str())
            .and_then(|v| v.parse().ok())
    }

    /// Polls `expr` until `done` accepts its value, for at most `deadline`.
    pub fn wait_for(&self, expr: &str, deadline: Duration, done: impl Fn(f64) -> bool) -> f64 {
        let until = Instant::now() + deadline;
        loop {
            let value = self.value(expr);
            if let Some(v) = value.filter(|v| done(*v)) {
                return v;
            }
            assert!(
                Instant::now() < until,
                "{expr} is {value:?} after {deadline:?}; prometheus log: {}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(250));
        }
    }
}

impl Drop for Receiver<'_> {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A fresh storage directory for a receiver listening on `listen`.
fn private_dir(what: &str, listen: SocketAddr) -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "plexd-{what}-{}-{}",
        std::process::id(),
        listen.port()
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("data")).expect("receiver dir");
    dir
}
