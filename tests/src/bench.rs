//! What the comparison benchmarks behind `cargo xtask bench` share: A/B rounds reduced to
//! median and min–max, the report row each benchmark hands to xtask, and the whole-process
//! figures read from `/proc`.
//!
//! Every benchmark measures the agent (A) and the tool a user would run instead (B) in the
//! same run, alternating A B A B … and swapping which goes first every other round, so that
//! the load of a shared machine falls on both sides alike. Rows go to stdout and, when
//! [`ROWS_ENV`] names a file, as JSON lines to that file, which xtask turns into the report.

use std::collections::BTreeMap;
use std::io::{self, Read as _, Write as _};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::time::{Duration, Instant};

use serde::Serialize;

/// Environment variable naming the JSON-lines file that rows are appended to.
pub const ROWS_ENV: &str = "PLEXD_BENCH_ROWS";

/// Which side of a comparison a round measures.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Side {
    /// plexd-metrics.
    Agent,
    /// The tool it is compared with.
    Baseline,
}

/// Named figures of one measurement, e.g. `{"wall_ms": 3.2, "cpu_ms": 1.1}`.
pub type Figures = BTreeMap<&'static str, f64>;

/// The figures of every round, per side, in round order.
#[derive(Debug, Default)]
pub struct Rounds {
    /// The agent's figures, one entry per round.
    pub agent: Vec<Figures>,
    /// The baseline's figures, one entry per round.
    pub baseline: Vec<Figures>,
}

impl Rounds {
    /// The agent's values of figure `key`, one per round.
    pub fn agent(&self, key: &str) -> Vec<f64> {
        values(&self.agent, key)
    }

    /// The baseline's values of figure `key`, one per round.
    pub fn baseline(&self, key: &str) -> Vec<f64> {
        values(&self.baseline, key)
    }
}

fn values(rounds: &[Figures], key: &str) -> Vec<f64> {
    rounds
        .iter()
        .map(|f| {
            *f.get(key)
                .unwrap_or_else(|| panic!("no figure {key:?} in {f:?}"))
        })
        .collect()
}

/// Runs `rounds` rounds of both sides, A B then B A then A B …: whichever goes first may
/// pay for cold caches, so neither side always does.
pub fn alternate(rounds: usize, mut measure: impl FnMut(Side) -> Figures) -> Rounds {
    let mut out = Rounds::default();
    for round in 0..rounds {
        let order = if round % 2 == 0 {
            [Side::Agent, Side::Baseline]
        } else {
            [Side::Baseline, Side::Agent]
        };
        for side in order {
            let figures = measure(side);
            eprintln!("  round {round}: {side:?} {figures:?}");
            match side {
                Side::Agent => out.agent.push(figures),
                Side::Baseline => out.baseline.push(figures),
            }
        }
    }
    out
}

/// Median and min–max of a set of samples.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct Spread {
    /// The median (the mean of the middle two for an even count).
    pub median: f64,
    /// The smallest sample.
    pub min: f64,
    /// The largest sample.
    pub max: f64,
}

impl Spread {
    /// The spread of `samples`, which must not be empty.
    pub fn of(samples: &[f64]) -> Self {
        assert!(!samples.is_empty(), "no samples");
        let mut v = samples.to_vec();
        v.sort_by(f64::total_cmp);
        let mid = v.len() / 2;
        Self {
            median: if v.len().is_multiple_of(2) {
                (v[mid - 1] + v[mid]) / 2.0
            } else {
                v[mid]
            },
            min: v[0],
            max: v[v.len() - 1],
        }
    }
}

/// What a row's figure must reach.
#[derive(Clone, Copy, Debug, Serialize)]
#[serde(tag = "kind", content = "value", rename_all = "snake_case")]
pub enum Goal {
    /// The median of agent / baseline per round is at most this.
    RatioAtMost(f64),
    /// The median of agent / baseline per round is at least this.
    RatioAtLeast(f64),
    /// The agent's median is below this, in the row's unit.
    Below(f64),
}

impl Goal {
    fn describe(self, unit: &str) -> String {
        match self {
            Goal::RatioAtMost(r) => format!("≤ {r}×"),
            Goal::RatioAtLeast(r) => format!("≥ {r}×"),
            Goal::Below(v) => format!("< {v} {unit}"),
        }
    }
}

/// A further condition of a row's goal, e.g. that two medians agree.
#[derive(Clone, Debug, Serialize)]
pub struct Check {
    /// What was checked, with the figures.
    pub text: String,
    /// Whether it held.
    pub met: bool,
}

/// One line of the report.
#[derive(Clone, Debug, Serialize)]
pub struct Row {
    /// Stable identifier, e.g. `wireguard-1000`.
    pub id: String,
    /// What is measured.
    pub what: String,
    /// The agent's side, e.g. `one tunnel-group collect`.
    pub agent_label: String,
    /// The baseline's side; empty when there is none.
    pub baseline_label: String,
    /// Unit of the figures.
    pub unit: String,
    /// The agent's figure over the rounds.
    pub agent: Spread,
    /// The baseline's figure over the rounds.
    pub baseline: Option<Spread>,
    /// agent / baseline, per round.
    pub ratio: Option<Spread>,
    /// The goal, in words.
    pub goal: String,
    /// Further conditions of the goal.
    pub checks: Vec<Check>,
    /// Whether the goal and every check held.
    pub met: bool,
    /// Other figures worth printing (e.g. the compression ratio).
    pub notes: Vec<String>,
    /// Every figure of every round, per side.
    pub raw: BTreeMap<&'static str, Vec<Figures>>,
}

impl Row {
    /// A row comparing figure `key` of both sides of `rounds` against `goal`.
    #[allow(clippy::too_many_arguments)]
    pub fn compare(
        id: impl Into<String>,
        what: impl Into<String>,
        labels: (&str, &str),
        unit: &str,
        rounds: &Rounds,
        key: &str,
        goal: Goal,
    ) -> Self {
        let (a, b) = (rounds.agent(key), rounds.baseline(key));
        let ratios: Vec<f64> = a.iter().zip(&b).map(|(a, b)| a / b).collect();
        let ratio = Spread::of(&ratios);
        let agent = Spread::of(&a);
        let met = match goal {
            Goal::RatioAtMost(r) => ratio.median <= r,
            Goal::RatioAtLeast(r) => ratio.median >= r,
            Goal::Below(v) => agent.median < v,
        };
        Self {
            id: id.into(),
            what: what.into(),
            agent_label: labels.0.to_owned(),
            baseline_label: labels.1.to_owned(),
            unit: unit.to_owned(),
            agent,
            baseline: Some(Spread::of(&b)),
            ratio: Some(ratio),
            goal: goal.describe(unit),
            checks: Vec::new(),
            met,
            notes: Vec::new(),
            raw: BTreeMap::from([
                ("agent", rounds.agent.clone()),
                ("baseline", rounds.baseline.clone()),
            ]),
        }
    }

    /// A row of the agent alone: `samples` against an absolute `goal`.
    pub fn alone(
        id: impl Into<String>,
        what: impl Into<String>,
        label: &str,
        unit: &str,
        samples: &[f64],
        goal: Goal,
    ) -> Self {
        let agent = Spread::of(samples);
        let met = match goal {
            Goal::Below(v) => agent.median < v,
            _ => panic!("a row without baseline needs an absolute goal"),
        };
        Self {
            id: id.into(),
            what: what.into(),
            agent_label: label.to_owned(),
            baseline_label: String::new(),
            unit: unit.to_owned(),
            agent,
            baseline: None,
            ratio: None,
            goal: goal.describe(unit),
            checks: Vec::new(),
            met,
            notes: Vec::new(),
            raw: BTreeMap::from([(
                "agent",
                samples
                    .iter()
                    .map(|&v| Figures::from([("value", v)]))
                    .collect(),
            )]),
        }
    }

    /// Adds a further condition; the row is met only if it holds too.
    pub fn check(mut self, text: impl Into<String>, met: bool) -> Self {
        self.checks.push(Check {
            text: text.into(),
            met,
        });
        self.met &= met;
        self
    }

    /// Adds a note printed under the table.
    pub fn note(mut self, text: impl Into<String>) -> Self {
        self.notes.push(text.into());
        self
    }
}

/// Prints `row` and appends it to the file named by [`ROWS_ENV`], if any.
pub fn emit(row: &Row) -> io::Result<()> {
    let ratio = row.ratio.map_or_else(String::new, |r| {
        format!(", ratio {:.2}× ({:.2}–{:.2})", r.median, r.min, r.max)
    });
    let baseline = row
        .baseline
        .map_or_else(String::new, |b| format!(" vs {:.3} {}", b.median, row.unit));
    println!(
        "{}: {:.3} {}{baseline}{ratio}; goal {}: {}",
        row.id,
        row.agent.median,
        row.unit,
        row.goal,
        if row.met { "met" } else { "NOT met" }
    );
    for c in &row.checks {
        println!("  {} ({})", c.text, if c.met { "met" } else { "NOT met" });
    }
    for n in &row.notes {
        println!("  {n}");
    }
    let Some(path) = std::env::var_os(ROWS_ENV) else {
        return Ok(());
    };
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)?;
    let mut line = serde_json::to_vec(row)?;
    line.push(b'\n');
    file.write_all(&line)
}

/// CPU time of every thread of process `pid` so far, in nanoseconds on a CPU (the first
/// field of each thread's `schedstat`; `utime` and `stime` count 10 ms ticks, too coarse
/// for one scrape).
pub fn process_cpu(pid: u32) -> io::Result<Duration> {
    let mut total = 0u64;
    for task in std::fs::read_dir(format!("/proc/{pid}/task"))? {
        // A thread may end between the listing and the read; it then counts no more.
        let Ok(text) = std::fs::read_to_string(task?.path().join("schedstat")) else {
            continue;
        };
        total += text
            .split(' ')
            .next()
            .and_then(|v| v.parse::<u64>().ok())
            .ok_or_else(|| io::Error::other(format!("bad schedstat of {pid}: {text}")))?;
    }
    Ok(Duration::from_nanos(total))
}

/// CPU time of the calling thread so far: what an in-process collect on it costs.
pub fn thread_cpu() -> Duration {
    cpu_clock(libc::CLOCK_THREAD_CPUTIME_ID)
}

/// CPU time of every thread of this process so far: what an in-process collect costs when
/// it hands work to other threads (tokio's blocking pool), which [`thread_cpu`] misses.
pub fn process_cpu_self() -> Duration {
    cpu_clock(libc::CLOCK_PROCESS_CPUTIME_ID)
}

fn cpu_clock(clock: libc::clockid_t) -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec into the valid one passed.
    let rc = unsafe { libc::clock_gettime(clock, &mut ts) };
    assert_eq!(rc, 0, "clock_gettime({clock})");
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

/// A `/proc/PID/status` field in bytes, e.g. `VmRSS` or `VmHWM`.
pub fn status_bytes(pid: u32, key: &str) -> io::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))
        .and_then(|v| v.trim().strip_suffix(" kB")?.trim().parse::<u64>().ok())
        .map(|kib| kib * 1024)
        .ok_or_else(|| io::Error::other(format!("no {key} in /proc/{pid}/status")))
}

/// The median of `samples`, which must not be empty.
pub fn median(samples: &[f64]) -> f64 {
    Spread::of(samples).median
}

/// `n` with thousands separators: 10,000.
pub fn thousands(n: usize) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// Bytes to MiB.
pub fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

/// Milliseconds of a duration.
pub fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// One `GET path` over HTTP/1.0, as a Prometheus scrape does; returns the body. A fresh
/// connection each time, as Prometheus' scrapes of an exporter mostly are.
pub fn http_get(addr: SocketAddr, path: &str) -> io::Result<Vec<u8>> {
    let mut stream = TcpStream::connect(addr)?;
    stream.set_read_timeout(Some(Duration::from_secs(60)))?;
    write!(
        stream,
        "GET {path} HTTP/1.0\r\nHost: {addr}\r\nAccept: text/plain\r\n\r\n"
    )?;
    let mut answer = Vec::new();
    stream.read_to_end(&mut answer)?;
    let split = answer
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| io::Error::other(format!("no HTTP header from {addr}{path}")))?;
    let head = String::from_utf8_lossy(&answer[..split]);
    let status = head.split(' ').nth(1);
    if !head.starts_with("HTTP/1.") || status != Some("200") {
        return Err(io::Error::other(format!(
            "GET {addr}{path}: {}",
            head.lines().next().unwrap_or("")
        )));
    }
    Ok(answer.split_off(split + 4))
}

/// Waits until `addr` accepts TCP connections (a server that has just been started), for at
/// most `deadline`.
pub fn wait_for_listener(addr: SocketAddr, deadline: Duration) -> io::Result<()> {
    let start = Instant::now();
    loop {
        match TcpStream::connect_timeout(&addr, Duration::from_millis(200)) {
            Ok(_) => return Ok(()),
            Err(e) if start.elapsed() > deadline => {
                return Err(io::Error::other(format!(
                    "nothing listens on {addr} after {deadline:?}: {e}"
                )))
            }
            // Refused: not bound yet. The retry is the condition being polled.
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    }
}

/// A free TCP port on 127.0.0.1 of the calling thread's namespace, for a server started next.
pub fn free_port() -> io::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// Where the cargo-installed tools live: `target/tools/<name>/bin/<name>`, from the
/// directory xtask passes in `PLEXD_BENCH_TOOLS`.
pub fn tool(name: &str) -> io::Result<std::path::PathBuf> {
    let dir = std::env::var_os("PLEXD_BENCH_TOOLS").ok_or_else(|| {
        io::Error::other(
            "PLEXD_BENCH_TOOLS is not set; run the benchmark through `cargo xtask bench`",
        )
    })?;
    let path = Path::new(&dir).join(name).join("bin").join(name);
    if !path.is_file() {
        return Err(io::Error::other(format!(
            "{} is missing; run `cargo xtask setup`",
            path.display()
        )));
    }
    Ok(path)
}

/// `peers` remote endpoints on the first end of `veth`: its address, ports 10,000 and up.
pub fn endpoints_on(veth: &crate::VethPair, peers: usize) -> Vec<SocketAddr> {
    (0..peers)
        .map(|i| SocketAddr::from((veth.a.addr, 10_000 + i as u16)))
        .collect()
}

/// Gives each of `endpoints` (from [`endpoints_on`]) one WireGuard session in `probe`, which
/// is attached to the second end of `veth` and watches `port`: transport messages with
/// counters 0, 1 and 3 to receiver index `i + 1`, so that every session has a hole (counter
/// 2) to settle once the reorder timeout has passed.
///
/// The messages are raw frames sent through `peer_ns`'s end, 128 endpoints at a time, each
/// batch waited for until the probe has counted it: a burst would overflow the receiving
/// end's backlog before TC sees it. Before them the node (in `wg_ns`) announces every index
/// in a handshake response, as WireGuard does, so that each session gets a window.
pub fn one_session_each(
    peer_ns: &crate::NetNs,
    wg_ns: &crate::NetNs,
    veth: &crate::VethPair,
    probe: &plexd_metrics::source::ebpf::UnderlayProbe,
    endpoints: &[SocketAddr],
    port: u16,
) {
    use crate::wg::{ipv4_udp_frame, mac, response, transport, RawLink};
    use plexd_metrics::source::counters::EndpointCounterSource as _;

    let (a, b) = (&veth.a, &veth.b);
    // As the tunnel reader does with the peers of the device state: counters exist before
    // the traffic, so that the burst below does not wait for the kernel's allocator.
    probe.track_endpoints(endpoints).expect("track the peers");
    let link = peer_ns
        .run(|| RawLink::open(&a.name))
        .expect("enter namespace")
        .expect("AF_PACKET socket");
    let seen = || {
        probe
            .totals()
            .expect("read the packet counters")
            .ingress_packets
    };
    let sent = || {
        probe
            .totals()
            .expect("read the packet counters")
            .egress_packets
    };
    // The node announces each session's index in a handshake response, as WireGuard does:
    // the kernel gives only announced sessions a window wherever there is room.
    let node_link = wg_ns
        .run(|| RawLink::open(&b.name))
        .expect("enter namespace")
        .expect("AF_PACKET socket");
    for (n, chunk) in endpoints.chunks(128).enumerate() {
        let target = sent() + chunk.len() as u64;
        for (i, endpoint) in chunk.iter().enumerate() {
            let SocketAddr::V4(to) = endpoint else {
                panic!("{endpoint} is not an address of {}", a.name);
            };
            let frame = ipv4_udp_frame(
                mac(&a.mac),
                mac(&b.mac),
                (b.addr, port),
                (*to.ip(), to.port()),
                &response((n * 128 + i) as u32 + 1),
            );
            node_link.send(&frame).expect("send a frame");
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while sent() < target {
            assert!(
                Instant::now() < deadline,
                "the kernel programs saw {} of {target} announcements after 10 s",
                sent()
            );
            std::thread::yield_now();
        }
    }
    for (n, chunk) in endpoints.chunks(128).enumerate() {
        for counter in [0, 1, 3] {
            let target = seen() + chunk.len() as u64;
            for (i, endpoint) in chunk.iter().enumerate() {
                let SocketAddr::V4(from) = endpoint else {
                    panic!("{endpoint} is not an address of {}", a.name);
                };
                let receiver = (n * 128 + i) as u32 + 1;
                let frame = ipv4_udp_frame(
                    mac(&b.mac),
                    mac(&a.mac),
                    (*from.ip(), from.port()),
                    (b.addr, port),
                    &transport(receiver, counter, 64),
                );
                link.send(&frame).expect("send a frame");
            }
            let deadline = Instant::now() + Duration::from_secs(10);
            while seen() < target {
                assert!(
                    Instant::now() < deadline,
                    "the kernel programs saw {} of {target} packets after 10 s",
                    seen()
                );
                std::thread::yield_now();
            }
        }
    }
}
