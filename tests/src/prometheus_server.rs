//! A real Prometheus (Debian's `prometheus`, installed by `cargo xtask setup`) on a loopback
//! port, with storage of its own, killed when dropped; `promtool` beside it; and a real
//! VictoriaMetrics the same way.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::control_plane::TempDir;

/// How long a server may take to become ready, and one HTTP exchange to finish.
const READY_DEADLINE: Duration = Duration::from_secs(60);
const HTTP_TIMEOUT: Duration = Duration::from_secs(10);

/// `program` from PATH, or a failure that says how to install it (never a skip).
pub fn require_tool(program: &str) -> PathBuf {
    let found = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join(program))
            .find(|p| p.is_file())
    });
    found.unwrap_or_else(|| {
        panic!(
            "{program} is not on PATH: run `cargo xtask setup` (it installs Debian's prometheus, \
             which brings promtool, and victoria-metrics), or `cargo xtask test`"
        )
    })
}

/// Runs `promtool` with `args` in `dir`.
pub fn promtool(dir: &Path, args: &[&str]) -> Output {
    Command::new(require_tool("promtool"))
        .current_dir(dir)
        .args(args)
        .output()
        .expect("run promtool")
}

/// The stdout and stderr of `out`, for failure messages.
pub fn said(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// A running `prometheus` with an empty scrape config.
pub struct Prometheus {
    child: Child,
    addr: SocketAddr,
    _dir: TempDir,
}

impl Prometheus {
    /// Starts Prometheus on a free loopback port over `dir`, whose `data/` may already hold
    /// blocks (see [`backfill`]), and waits (with a deadline) until it is ready.
    pub fn start(dir: TempDir) -> Self {
        Self::start_with(dir, &[])
    }

    /// Like [`Prometheus::start`], with `extra` arguments (e.g.
    /// `--web.enable-remote-write-receiver`).
    pub fn start_with(dir: TempDir, extra: &[&str]) -> Self {
        // A port the kernel chose free a moment ago; Prometheus binds it right after.
        Self::start_on(dir, free_port(), extra)
    }

    /// Like [`Prometheus::start_with`], on `addr`: for a test whose agent writes to it before
    /// it runs.
    pub fn start_on(dir: TempDir, addr: SocketAddr, extra: &[&str]) -> Self {
        let config = dir.write("prometheus.yml", "global:\n  scrape_interval: 15s\n");
        let data = dir.path().join("data");
        std::fs::create_dir_all(&data).expect("create the storage directory");
        let log = std::fs::File::create(dir.path().join("prometheus.log")).expect("log file");
        let child = Command::new(require_tool("prometheus"))
            .arg(format!("--config.file={}", config.display()))
            .arg(format!("--storage.tsdb.path={}", data.display()))
            .arg(format!("--web.listen-address={addr}"))
            .args(extra)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log file"))
            .stderr(log)
            .spawn()
            .expect("start prometheus");
        let mut server = Prometheus {
            child,
            addr,
            _dir: dir,
        };
        server.wait_ready();
        server
    }

    fn wait_ready(&mut self) {
        let log = self._dir.path().join("prometheus.log");
        wait_ready(&mut self.child, "prometheus", self.addr, "/-/ready", &log);
    }

    /// What the server has logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self._dir.path().join("prometheus.log")).unwrap_or_default()
    }

    /// `GET path` over HTTP/1.0: the status and the body.
    pub fn get(&self, path: &str) -> std::io::Result<(u16, String)> {
        get(self.addr, path)
    }

    /// An instant query at `time` (Unix seconds): the API's whole answer, whatever its status.
    pub fn query(&self, query: &str, time: i64) -> Value {
        instant_query(self.addr, query, time)
    }

    /// The remote-write receiver's URL (with `--web.enable-remote-write-receiver`).
    pub fn remote_write_url(&self) -> String {
        format!("http://{}/api/v1/write", self.addr)
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A running single-node VictoriaMetrics (`victoria-metrics`) on a free loopback port with
/// storage of its own, killed when dropped.
pub struct VictoriaMetrics {
    child: Child,
    addr: SocketAddr,
    dir: TempDir,
}

impl VictoriaMetrics {
    /// Starts it over `dir` and waits (with a deadline) until it answers `/health`.
    ///
    /// Queries see every sample at once: no 30 s `-search.latencyOffset`, no response cache.
    pub fn start(dir: TempDir) -> Self {
        let data = dir.path().join("data");
        let addr = free_port();
        let log = std::fs::File::create(dir.path().join("victoria-metrics.log")).expect("log");
        let child = Command::new(require_tool("victoria-metrics"))
            .arg(format!("-storageDataPath={}", data.display()))
            .arg(format!("-httpListenAddr={addr}"))
            .arg("-search.latencyOffset=0s")
            .arg("-search.disableCache")
            .arg("-retentionPeriod=100y")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log file"))
            .stderr(log)
            .spawn()
            .expect("start victoria-metrics");
        let mut server = Self { child, addr, dir };
        let log = server.dir.path().join("victoria-metrics.log");
        wait_ready(&mut server.child, "victoria-metrics", addr, "/health", &log);
        server
    }

    /// What the server has logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("victoria-metrics.log")).unwrap_or_default()
    }

    /// `GET path` over HTTP/1.0: the status and the body.
    pub fn get(&self, path: &str) -> std::io::Result<(u16, String)> {
        get(self.addr, path)
    }

    /// Makes what was written so far searchable (`/internal/force_flush`).
    pub fn flush(&self) {
        let (status, body) = self.get("/internal/force_flush").expect("force_flush");
        assert_eq!(status, 200, "force_flush: {body}");
    }

    /// An instant query at `time` (Unix seconds) through the Prometheus query API.
    pub fn query(&self, query: &str, time: i64) -> Value {
        instant_query(self.addr, query, time)
    }

    /// The remote-write URL.
    pub fn remote_write_url(&self) -> String {
        format!("http://{}/api/v1/write", self.addr)
    }
}

impl Drop for VictoriaMetrics {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Waits until `GET path` answers 200, with a deadline; fails with the server's log when it
/// exits or the deadline passes.
fn wait_ready(child: &mut Child, name: &str, addr: SocketAddr, path: &str, log: &Path) {
    let said = || std::fs::read_to_string(log).unwrap_or_default();
    let deadline = Instant::now() + READY_DEADLINE;
    loop {
        if let Some(status) = child.try_wait().expect("poll the server") {
            panic!("{name} exited with {status}: {}", said());
        }
        if matches!(get(addr, path), Ok((200, _))) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{name} not ready after {READY_DEADLINE:?}: {}",
            said()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A loopback port the kernel chose free a moment ago; the server binds it right after.
pub fn free_port() -> SocketAddr {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free loopback port")
}

/// `GET path` from `addr` over HTTP/1.0, with a deadline: the status and the body.
pub fn get(addr: SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    let request = format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    exchange(addr, request.as_bytes())
}

/// One HTTP/1.0 exchange of `request` with `addr`, with a deadline: the status and the
/// body.
pub fn exchange(addr: SocketAddr, request: &[u8]) -> std::io::Result<(u16, String)> {
    let mut stream = TcpStream::connect_timeout(&addr, HTTP_TIMEOUT)?;
    stream.set_read_timeout(Some(HTTP_TIMEOUT))?;
    stream.set_write_timeout(Some(HTTP_TIMEOUT))?;
    stream.write_all(request)?;
    let mut response = Vec::new();
    stream.read_to_end(&mut response)?;
    let response = String::from_utf8_lossy(&response);
    let (head, body) = response.split_once("\r\n\r\n").unwrap_or((&response, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    Ok((status, body.to_owned()))
}

/// An instant query of the Prometheus HTTP API at `addr`: its whole JSON answer.
fn instant_query(addr: SocketAddr, query: &str, time: i64) -> Value {
    let path = format!("/api/v1/query?query={}&time={time}", url_encode(query));
    let (status, body) = get(addr, &path).unwrap_or_else(|e| panic!("query {query}: {e}"));
    serde_json::from_str(&body)
        .unwrap_or_else(|e| panic!("query {query}: HTTP {status}, not JSON ({e}): {body}"))
}

/// Writes the OpenMetrics text `openmetrics` into `dir/data` as TSDB blocks
/// (`promtool tsdb create-blocks-from openmetrics`), before a [`Prometheus`] starts there.
pub fn backfill(dir: &TempDir, openmetrics: &str) {
    let input = dir.write("backfill.om", openmetrics);
    let data = dir.path().join("data");
    let out = promtool(
        dir.path(),
        &[
            "tsdb",
            "create-blocks-from",
            "openmetrics",
            input.to_str().expect("a UTF-8 path"),
            data.to_str().expect("a UTF-8 path"),
        ],
    );
    assert!(out.status.success(), "backfill: {}", said(&out));
}

/// Percent-encodes everything but RFC 3986's unreserved characters.
pub fn url_encode(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}
