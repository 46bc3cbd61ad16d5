//! The `app` group end to end: the agent binary (`--once`) fetches application endpoints
//! served by this test on loopback (JSON, Prometheus text, failures of every kind) and
//! reports one point per endpoint; and the agent's own `/metrics`, scraped as an endpoint,
//! reads as the same page fetched directly. No privileges needed.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use plexd_metrics::api::MetricPoint;
use plexd_metrics_tests::agent::json_log_events;
use plexd_metrics_tests::agent_binary;
use plexd_metrics_tests::control_plane::{TempDir, TestControlPlane};
use plexd_metrics_tests::prometheus_server::{free_port, get};
use serde_json::{json, Value};

/// Bound on any one read or write of the test's server, and on waiting for the agent.
const DEADLINE: Duration = Duration::from_secs(30);

/// The timeout of the endpoint that never answers.
const HANG_TIMEOUT: Duration = Duration::from_secs(2);

/// 50 MB: three times the agent's body limit.
const HUGE: usize = 50 * 1000 * 1000;

/// What the test's server answers on a path.
#[derive(Clone)]
enum Answer {
    /// Status, content type and body, with a `Content-Length`.
    Fixed(u16, Option<&'static str>, Vec<u8>),
    /// `HUGE` bytes of digits without a length, delimited by closing the connection.
    Endless,
    /// `HUGE` bytes announced by `Content-Length`.
    Huge,
    /// Reads the request and never answers; the connection stays open until the test ends.
    Hang,
}

/// An HTTP/1.1 server on loopback, one thread per connection, that answers by path.
struct Server {
    addr: SocketAddr,
    /// Dropped when the test ends, which releases the hanging connections.
    _release: mpsc::Sender<()>,
}

impl Server {
    fn start(routes: BTreeMap<&'static str, Answer>) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind a loopback port");
        let addr = listener.local_addr().unwrap();
        let (release, released) = mpsc::channel::<()>();
        let released = std::sync::Arc::new(std::sync::Mutex::new(released));
        std::thread::spawn(move || {
            for stream in listener.incoming().map_while(Result::ok) {
                let routes = routes.clone();
                let released = released.clone();
                std::thread::spawn(move || serve(stream, &routes, &released));
            }
        });
        Self {
            addr,
            _release: release,
        }
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }
}

fn serve(
    mut stream: TcpStream,
    routes: &BTreeMap<&'static str, Answer>,
    released: &std::sync::Mutex<mpsc::Receiver<()>>,
) {
    stream.set_read_timeout(Some(DEADLINE)).unwrap();
    stream.set_write_timeout(Some(DEADLINE)).unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        match stream.read(&mut byte) {
            Ok(1) => head.push(byte[0]),
            _ => return,
        }
    }
    let head = String::from_utf8_lossy(&head);
    let path = head.split_whitespace().nth(1).unwrap_or("/");
    let answer =
        routes
            .get(path)
            .cloned()
            .unwrap_or(Answer::Fixed(404, None, b"no such path".to_vec()));
    // Writes fail once the agent gives up on a large body; that is the point of those paths.
    let _ = match answer {
        Answer::Fixed(status, content_type, body) => {
            let mut response = format!(
                "HTTP/1.1 {status} X\r\nContent-Length: {}\r\nConnection: close\r\n",
                body.len()
            );
            if let Some(t) = content_type {
                response.push_str(&format!("Content-Type: {t}\r\n"));
            }
            response.push_str("\r\n");
            stream
                .write_all(response.as_bytes())
                .and_then(|()| stream.write_all(&body))
        }
        Answer::Huge => stream
            .write_all(
                format!("HTTP/1.1 200 OK\r\nContent-Length: {HUGE}\r\nConnection: close\r\n\r\n")
                    .as_bytes(),
            )
            .and_then(|()| write_digits(&mut stream)),
        Answer::Endless => stream
            .write_all(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n")
            .and_then(|()| write_digits(&mut stream)),
        Answer::Hang => {
            // Until the test ends (or its deadline): the agent must give up on its own.
            let _ = released.lock().unwrap().recv_timeout(DEADLINE);
            Ok(())
        }
    };
}

fn write_digits(stream: &mut TcpStream) -> std::io::Result<()> {
    let chunk = vec![b'7'; 64 * 1024];
    let mut left = HUGE;
    while left > 0 {
        let n = left.min(chunk.len());
        stream.write_all(&chunk[..n])?;
        left -= n;
    }
    Ok(())
}

/// A config without the parts that need privileges or a mesh, with `apps` (YAML) added.
fn config(dir: &TempDir, apps: &str, extra: &str) -> std::path::PathBuf {
    dir.write(
        "config.yaml",
        format!(
            "metrics:\n  ebpf: {{ enabled: false }}\n  wireguard: {{ enabled: false }}\n  \
             latency: {{ enabled: false }}\n  health: {{ enabled: false }}\n{extra}  apps:\n{apps}"
        ),
    )
}

/// What one `plexd-metrics --once` run left.
struct Once {
    batch: Vec<MetricPoint>,
    /// From start to exit.
    took: Duration,
    /// The agent's peak resident memory, in bytes.
    max_rss: u64,
}

/// Runs `plexd-metrics --once` with `config`; fails the test unless it exits 0 with one JSON
/// batch within [`DEADLINE`].
fn run_once(config: &std::path::Path) -> Once {
    let started = Instant::now();
    // Reaped by wait4 below, which std's Child cannot do; clippy cannot see that.
    #[allow(clippy::zombie_processes)]
    let mut child = Command::new(agent_binary())
        .args(["--once", "--log-format", "json", "--config"])
        .arg(config)
        .env_remove("RUST_LOG")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start the agent");
    let pid = child.id() as libc::pid_t;
    let (mut stdout, mut stderr) = (child.stdout.take().unwrap(), child.stderr.take().unwrap());
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let err = std::thread::spawn(move || {
            let mut err = Vec::new();
            let _ = stderr.read_to_end(&mut err);
            err
        });
        let mut out = Vec::new();
        let _ = stdout.read_to_end(&mut out);
        let err = err.join().unwrap_or_default();
        // wait4 rather than Child::wait: it also tells this child's own peak memory.
        let mut status = 0;
        // SAFETY: wait4 on our own child's pid, filling the status and usage given.
        let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
        let waited = unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
        let _ = tx.send((waited, status, usage.ru_maxrss, out, err));
    });
    let Ok((waited, status, max_rss_kib, out, err)) = rx.recv_timeout(DEADLINE) else {
        // SAFETY: kill(2) with the pid of our own child, which has not been reaped.
        unsafe { libc::kill(pid, libc::SIGKILL) };
        panic!("agent --once still running after {DEADLINE:?}");
    };
    let took = started.elapsed();
    let stderr = String::from_utf8_lossy(&err);
    assert_eq!(waited, pid, "wait4: {}", std::io::Error::last_os_error());
    assert!(
        libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
        "agent --once failed ({status:#x}): {stderr}"
    );
    let batch = serde_json::from_slice(&out).unwrap_or_else(|e| {
        panic!(
            "stdout is not one JSON batch ({e}): {}",
            String::from_utf8_lossy(&out)
        )
    });
    Once {
        batch,
        took,
        max_rss: u64::try_from(max_rss_kib).unwrap() * 1024,
    }
}

/// The `app` points of `batch` by name.
fn app_points(batch: &[MetricPoint]) -> BTreeMap<String, Value> {
    batch
        .iter()
        .filter(|p| p.group == "app")
        .map(|p| {
            assert!(p.peer_id.is_empty(), "{p:?}");
            let data = p.data.to_value();
            (data["name"].as_str().unwrap().to_owned(), data)
        })
        .collect()
}

#[test]
fn every_endpoint_gives_its_point_and_failures_say_what_happened() {
    let invalid_utf8 = b"up 1\nbad\xff\xfe 2\n".to_vec();
    let server = Server::start(BTreeMap::from([
        (
            "/flat",
            Answer::Fixed(
                200,
                Some("application/json"),
                br#"{"requests": 1027, "ratio": 0.25, "ready": true, "version": "1.2.3"}"#.to_vec(),
            ),
        ),
        (
            "/nested",
            Answer::Fixed(
                200,
                None,
                br#"{"db": {"pool": {"open": 3, "idle": 1}}, "queues": [4, 5]}"#.to_vec(),
            ),
        ),
        (
            "/metrics",
            Answer::Fixed(
                200,
                Some("text/plain; version=0.0.4"),
                concat!(
                    "# HELP http_requests_total Requests.\n",
                    "# TYPE http_requests_total counter\n",
                    "http_requests_total{method=\"get\",code=\"200\"} 1027\n",
                    "http_requests_total{method=\"post\",code=\"500\"} 3\n",
                    "# TYPE latency_seconds histogram\n",
                    "latency_seconds_bucket{le=\"0.5\"} 4\n",
                    "latency_seconds_bucket{le=\"+Inf\"} 6\n",
                    "latency_seconds_sum 2.5\n",
                    "latency_seconds_count 6\n",
                )
                .as_bytes()
                .to_vec(),
            ),
        ),
        ("/503", Answer::Fixed(503, None, b"overloaded".to_vec())),
        ("/hang", Answer::Hang),
        ("/huge", Answer::Huge),
        ("/endless", Answer::Endless),
        (
            "/utf8",
            Answer::Fixed(200, Some("text/plain"), invalid_utf8),
        ),
        (
            "/html",
            Answer::Fixed(
                200,
                Some("text/html"),
                b"<html><body>hi</body></html>".to_vec(),
            ),
        ),
    ]));
    // A port nothing listens on: bound, then closed.
    let refused = free_port();
    let dir = TempDir::new("apps-once");
    let apps: String = [
        ("flat", server.url("/flat"), 5),
        ("nested", server.url("/nested"), 5),
        ("prom", server.url("/metrics"), 5),
        ("fails", server.url("/503"), 5),
        ("hangs", server.url("/hang"), HANG_TIMEOUT.as_secs()),
        ("huge", server.url("/huge"), 5),
        ("endless", server.url("/endless"), 10),
        ("utf8", server.url("/utf8"), 5),
        ("html", server.url("/html"), 5),
        ("refused", format!("http://{refused}/metrics"), 5),
    ]
    .iter()
    .map(|(name, url, secs)| format!("    - {{ name: {name}, url: '{url}', timeout: {secs}s }}\n"))
    .collect();
    let Once {
        batch,
        took,
        max_rss,
    } = run_once(&config(&dir, &apps, ""));
    let points = app_points(&batch);
    assert_eq!(points.len(), 10, "{points:#?}");

    // Every endpoint is fetched at once: the run lasts about the longest wait (the hanging
    // endpoint's timeout), not the sum of them. The margin covers starting the agent.
    assert!(
        took < HANG_TIMEOUT + Duration::from_secs(5),
        "the run took {took:?}"
    );

    let up = |name: &str| {
        let p = &points[name];
        assert_eq!(p["up"], true, "{p}");
        assert!(p.get("error").is_none(), "{p}");
        assert_eq!(p["truncated"], 0, "{p}");
        assert!(p["scrape_duration_seconds"].as_f64().unwrap() >= 0.0);
        p["metrics"].clone()
    };
    assert_eq!(
        up("flat"),
        json!({"requests": 1027, "ratio": 0.25, "ready": 1})
    );
    assert_eq!(
        up("nested"),
        json!({"db.pool.open": 3, "db.pool.idle": 1, "queues.0": 4, "queues.1": 5})
    );
    assert_eq!(
        up("prom"),
        json!({
            "http_requests_total{method=\"get\",code=\"200\"}": 1027.0,
            "http_requests_total{method=\"post\",code=\"500\"}": 3.0,
            "latency_seconds_bucket{le=\"0.5\"}": 4.0,
            "latency_seconds_bucket{le=\"+Inf\"}": 6.0,
            "latency_seconds_sum": 2.5,
            "latency_seconds_count": 6.0,
        })
    );

    let down = |name: &str, path: &str, why: &str| {
        let p = &points[name];
        assert_eq!(p["up"], false, "{p}");
        assert_eq!(p["metrics"], json!({}), "{p}");
        let error = p["error"]
            .as_str()
            .unwrap_or_else(|| panic!("no error: {p}"));
        let url = if path.starts_with("http") {
            path.to_owned()
        } else {
            server.url(path)
        };
        assert!(
            error.starts_with(&format!("{url}: {why}")),
            "{name}: {error:?} does not start with {url}: {why}"
        );
        p["scrape_duration_seconds"].as_f64().unwrap()
    };
    down("fails", "/503", "answered 503 Service Unavailable");
    let waited = down("hangs", "/hang", "no answer within 2s");
    assert!(
        (HANG_TIMEOUT.as_secs_f64()..HANG_TIMEOUT.as_secs_f64() + 2.0).contains(&waited),
        "gave up after {waited} s"
    );
    down("huge", "/huge", "body larger than 16 MiB");
    down("endless", "/endless", "body larger than 16 MiB");
    down(
        "utf8",
        "/utf8",
        "body is not UTF-8 text (invalid byte at offset 8)",
    );
    down("html", "/html", "not JSON or Prometheus text: ");
    down(
        "refused",
        &format!("http://{refused}/metrics"),
        "cannot connect: ",
    );

    // Reading a 50 MB body that has no length stops at the limit instead of buffering it:
    // the agent's peak memory stays well below the body's size.
    assert!(
        max_rss < HUGE as u64,
        "the agent's resident memory peaked at {max_rss} bytes"
    );
}

/// A valid page of 400,000 series (about 15 MB, under the body limit) keeps its first
/// 10,000 and counts the rest, without the agent's memory growing with the page.
#[test]
fn a_large_valid_page_keeps_its_first_metrics_and_counts_the_rest() {
    const SERIES: usize = 400_000;
    let mut page = String::from("# HELP requests_total Requests.\n# TYPE requests_total counter\n");
    for i in 0..SERIES {
        page.push_str(&format!("requests_total{{path=\"/p{i}\"}} {i}\n"));
    }
    assert!(page.len() < 16 << 20, "{} bytes", page.len());
    let server = Server::start(BTreeMap::from([(
        "/metrics",
        Answer::Fixed(200, Some("text/plain; version=0.0.4"), page.into_bytes()),
    )]));
    let dir = TempDir::new("apps-large");
    let run = run_once(&config(
        &dir,
        &format!("    - {{ name: big, url: '{}' }}\n", server.url("/metrics")),
        "",
    ));
    let point = &app_points(&run.batch)["big"];
    assert_eq!(point["up"], true, "{}", point["error"]);
    let metrics = point["metrics"].as_object().unwrap();
    assert_eq!(metrics.len(), 10_000);
    assert_eq!(point["truncated"], SERIES - 10_000);
    assert_eq!(metrics["requests_total{path=\"/p9999\"}"], 9999.0);
    // The body itself is held while it is read (up to 16 MiB); parsing all 400,000 series
    // would take several times that again.
    assert!(
        run.max_rss < 64 << 20,
        "the agent's resident memory peaked at {} bytes",
        run.max_rss
    );
}

/// An HTTPS endpoint (the test control plane's secrets API, which answers JSON) is trusted
/// through the entry's `ca_file` and no other way, and gets the entry's token.
#[test]
fn https_endpoints_are_trusted_through_their_ca_file_and_sent_their_token() {
    let server = TestControlPlane::https();
    server.require_token("app-token-1");
    server.put_secret("k", "plain", &[7; 32]);
    let dir = TempDir::new("apps-tls");
    let ca = dir.write("ca.pem", server.ca_pem());
    let token = dir.write("token", "app-token-1\n");
    let wrong = dir.write("wrong", "not-the-token\n");
    let url = format!("{}/v1/nodes/n/secrets/k", server.url());
    let (token, wrong, ca) = (token.display(), wrong.display(), ca.display());
    let apps = [
        format!("    - {{ name: trusted, url: '{url}', token_file: {token}, ca_file: {ca} }}\n"),
        format!("    - {{ name: untrusted, url: '{url}', token_file: {token} }}\n"),
        format!(
            "    - {{ name: wrong-token, url: '{url}', token_file: {wrong}, ca_file: {ca} }}\n"
        ),
    ]
    .concat();
    let batch = run_once(&config(&dir, &apps, "")).batch;
    let points = app_points(&batch);

    let trusted = &points["trusted"];
    assert_eq!(trusted["up"], true, "{trusted}");
    // The secret's fields are strings, which are not measurements.
    assert_eq!(trusted["metrics"], json!({}), "{trusted}");
    let error = |name: &str| {
        points[name]["error"]
            .as_str()
            .unwrap_or_default()
            .to_owned()
    };
    assert!(
        error("untrusted").contains("(TLS: set the entry's ca_file to the CA that signed"),
        "{}",
        points["untrusted"]
    );
    assert_eq!(
        error("wrong-token"),
        format!("{url}: answered 401 Unauthorized")
    );

    // Two requests got through TLS; each carried its entry's token.
    let mut sent: Vec<String> = (0..2)
        .map(|_| {
            let request = server.next_blocking(DEADLINE);
            assert_eq!(request.method.as_str(), "GET");
            request
                .header("authorization")
                .unwrap_or_default()
                .to_owned()
        })
        .collect();
    sent.sort();
    assert_eq!(sent, ["Bearer app-token-1", "Bearer not-the-token"]);
}

#[test]
fn the_agents_own_metrics_page_reads_as_it_does_fetched_directly() {
    let dir = TempDir::new("apps-self");
    let listen = free_port();
    // The first agent serves /metrics; it reports to stdout, which nobody reads.
    // It also fetches its own page as an endpoint, which puts the app group's families on
    // that page.
    let first = config(
        &dir,
        &format!("    - {{ name: own, url: 'http://{listen}/metrics', timeout: 2s }}\n"),
        &format!("  collect_interval: 5s\n  report_interval: 10s\n  prometheus: {{ listen: '{listen}' }}\n"),
    );
    let mut serving = Command::new(agent_binary())
        .args([
            "--log-level",
            "plexd_metrics=debug,info",
            "--log-format",
            "json",
            "--config",
        ])
        .arg(&first)
        .env_remove("RUST_LOG")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start the agent serving /metrics");
    let logs = json_log_events(&mut serving);
    let stop = Stop(serving);

    // Its page holds the system group once its first cycle has been folded in.
    let deadline = Instant::now() + DEADLINE;
    let page = loop {
        if let Ok((200, body)) = get(listen, "/metrics") {
            if body.contains("plexd_node_") && body.contains("plexd_app_up{app=\"own\"} 1") {
                break body;
            }
        }
        assert!(
            Instant::now() < deadline,
            "no plexd_node_ and plexd_app_up series on /metrics"
        );
        // Paced by the agent's own log lines (or a tenth of a second without any).
        let _ = logs.recv_timeout(Duration::from_millis(100));
    };

    let second = TempDir::new("apps-self-2");
    let batch = run_once(&config(
        &second,
        &format!("    - {{ name: self, url: 'http://{listen}/metrics' }}\n"),
        "",
    ))
    .batch;
    let (_, after) = get(listen, "/metrics").expect("fetch /metrics again");
    drop(stop);

    let point = &app_points(&batch)["self"];
    assert_eq!(point["up"], true, "{point}");
    let scraped = point["metrics"].as_object().unwrap();
    let before = series(&page);
    let after = series(&after);
    // The same series, by the same keys: name and labels as the page writes them.
    let keys = |m: &BTreeMap<String, f64>| m.keys().cloned().collect::<Vec<_>>();
    assert_eq!(keys(&before), keys(&after), "the page changed its series");
    assert_eq!(
        scraped.keys().cloned().collect::<Vec<_>>().len(),
        before.len(),
        "{scraped:?}"
    );
    for (key, value) in &before {
        let got = scraped
            .get(key)
            .unwrap_or_else(|| panic!("{key} missing from the app point"));
        // Values that did not move between the two direct fetches are the app's exactly.
        if after[key] == *value {
            assert_eq!(got.as_f64(), Some(*value), "{key}");
        }
    }
}

/// A page's series by the text before the value (the page writes no timestamps), read with
/// nothing but string splitting: an independent reading of the format.
fn series(page: &str) -> BTreeMap<String, f64> {
    page.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .map(|l| {
            let (key, value) = l.rsplit_once(' ').expect("series and value");
            (key.to_owned(), value.parse::<f64>().expect("a number"))
        })
        .filter(|(_, v)| v.is_finite())
        .collect()
}

/// Stops the serving agent with SIGTERM when the test ends, however it ends.
struct Stop(std::process::Child);

impl Drop for Stop {
    fn drop(&mut self) {
        // SAFETY: kill(2) with the pid of our own child.
        unsafe { libc::kill(self.0.id() as i32, libc::SIGTERM) };
        let _ = self.0.wait();
    }
}
