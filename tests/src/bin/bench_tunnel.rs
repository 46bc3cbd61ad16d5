//! `cargo xtask bench`'s tunnel part: one collect of the tunnel group (read a wireguard-go
//! device with 10,000 peers over its UAPI socket, read 10,000 endpoint counters, join them)
//! against the goal of 20 ms, beside `wg show <dev> dump` of the same device as the baseline,
//! measured in the same run.

use std::collections::{BTreeMap, HashMap};
use std::io::{Read as _, Write as _};
use std::net::SocketAddr;
use std::os::unix::net::UnixStream;
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use plexd_metrics::collector::BoxError;
use plexd_metrics::config::PeerNames;
use plexd_metrics::source::counters::{CounterSnapshot, EndpointCounterSource, EndpointCounters};
use plexd_metrics::source::tunnel::{JoinState, WireGuardTunnelReader};
use plexd_metrics::source::wireguard::{uapi, DeviceSource, SystemDevices};
use plexd_metrics_tests::wireguard::{many_peers, WireGuardGo, SOCKET_DIR};
use plexd_metrics_tests::{unique_name, NetNs};

const PEERS: usize = 10_000;
const ROUNDS: usize = 30;
const GOAL: Duration = Duration::from_millis(20);

/// Counters for every endpoint, growing by one packet per read, built fresh each time as
/// the map reader would.
struct FakeCounters {
    endpoints: Vec<SocketAddr>,
    reads: AtomicU64,
}

impl EndpointCounterSource for FakeCounters {
    fn read_endpoints(&self) -> Result<CounterSnapshot, BoxError> {
        let n = self.reads.fetch_add(1, Ordering::Relaxed) + 1;
        let endpoints: HashMap<SocketAddr, EndpointCounters> = self
            .endpoints
            .iter()
            .map(|&e| {
                (
                    e,
                    EndpointCounters {
                        rx_packets: 100 * n,
                        tx_packets: 100 * n,
                        lost: n,
                        ..EndpointCounters::default()
                    },
                )
            })
            .collect();
        Ok(CounterSnapshot {
            endpoints,
            map_overflows: 0,
        })
    }

    fn set_listen_ports(&self, _: &[u16]) -> Result<(), BoxError> {
        Ok(())
    }
}

fn main() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("bench-tunnel: needs root (network namespace, wireguard-go)");
        std::process::exit(2);
    }
    let ns = NetNs::new("pbt").expect("create namespace");
    let wg = WireGuardGo::start(&ns, &unique_name("wgb")).expect("start wireguard-go");
    let (conf, endpoints) = many_peers(51_900, PEERS);
    wg.setconf(&conf).expect("wg setconf");

    let name = wg.name.clone();
    let devices = Arc::new(SystemDevices::new(vec![name.clone()], SOCKET_DIR));
    let reader = WireGuardTunnelReader::new(
        devices.clone(),
        Some(Arc::new(FakeCounters {
            endpoints,
            reads: AtomicU64::new(0),
        })),
        PeerNames::default(),
        Duration::from_secs(180),
    );

    let socket = wg.socket();
    let (collect, device_only, raw_uapi, parse, join) = ns
        .run(|| {
            for _ in 0..3 {
                let stats = reader.read_blocking(SystemTime::now()).expect("read");
                assert_eq!(stats.len(), PEERS, "every peer joined");
                assert_eq!(stats[0].lost_packets, Some(1), "interval deltas");
            }
            let collect = time(|| {
                reader.read_blocking(SystemTime::now()).expect("read");
            });
            let device_only = time(|| {
                devices.read_devices().expect("read devices");
            });
            // What wireguard-go itself takes: the same exchange, bytes only.
            let mut answer = Vec::new();
            let raw_uapi = time(|| {
                answer = raw_get(&socket);
            });
            let parse = time(|| {
                uapi::parse_get(&name, answer.as_slice()).expect("parse");
            });
            let parsed = vec![uapi::parse_get(&name, answer.as_slice()).expect("parse")];
            let counters = FakeCounters {
                endpoints: parsed[0].peers.iter().filter_map(|p| p.endpoint).collect(),
                reads: AtomicU64::new(0),
            };
            let mut state = JoinState::default();
            let join = time(|| {
                let snapshot = counters.read_endpoints().expect("counters");
                state.join(
                    &parsed,
                    Some(&snapshot),
                    SystemTime::now(),
                    &BTreeMap::new(),
                    Duration::from_secs(180),
                );
            });
            (collect, device_only, raw_uapi, parse, join)
        })
        .expect("enter namespace");
    let baseline = time(|| {
        let out = Command::new("ip")
            .args(["netns", "exec", ns.name(), "wg", "show", &name, "dump"])
            .output()
            .expect("run wg");
        assert!(out.status.success());
        assert_eq!(
            out.stdout.iter().filter(|&&b| b == b'\n').count(),
            PEERS + 1
        );
    });

    println!(
        "tunnel group collect, {PEERS} peers, {ROUNDS} rounds: wall median, wall p95, CPU median"
    );
    collect.line("plexd-metrics collect (UAPI read+counters+join)", true);
    device_only.line("  device read (UAPI exchange + parse)", true);
    raw_uapi.line("    wireguard-go answering (bytes only)", false);
    parse.line("    parsing the answer", true);
    join.line("  counters read + join", true);
    baseline.line("baseline: wg show <dev> dump (same device)", false);
    let own = parse.cpu + join.cpu;
    let verdict = if own < GOAL { "met" } else { "MISSED" };
    println!(
        "  goal: the agent's own work (parse + counters + join) under {} ms: {verdict} ({:.2} ms CPU)",
        GOAL.as_millis(),
        ms(own)
    );
    println!(
        "  whole collect / wg show dump: {:.2}x (both wait for wireguard-go's answer)",
        collect.median.as_secs_f64() / baseline.median.as_secs_f64()
    );
    // A missed goal is the verdict line's to say, as in the rest of `cargo xtask bench`; on a
    // loaded machine this one is close (its CPU median moves by a few ms between runs).
    drop(wg);
    drop(ns);
}

/// The UAPI `get` exchange without parsing: the implementation's share of a read.
fn raw_get(socket: &std::path::Path) -> Vec<u8> {
    let mut stream = UnixStream::connect(socket).expect("connect");
    stream.write_all(b"get=1\n\n").expect("write");
    let mut answer = Vec::with_capacity(4 << 20);
    let mut buf = vec![0u8; 256 * 1024];
    while !answer.ends_with(b"\n\n") {
        let n = stream.read(&mut buf).expect("read");
        assert!(n > 0, "answer ended early");
        answer.extend_from_slice(&buf[..n]);
    }
    answer
}

/// Wall-clock median and 95th percentile of `ROUNDS` runs of `f`, and the median CPU time
/// the calling thread spent in them: on a shared, loaded machine the CPU time is the
/// steadier measure of the agent's own work.
fn time(mut f: impl FnMut()) -> Timing {
    let mut wall = Vec::with_capacity(ROUNDS);
    let mut cpu = Vec::with_capacity(ROUNDS);
    for _ in 0..ROUNDS {
        let (start, start_cpu) = (Instant::now(), thread_cpu());
        f();
        wall.push(start.elapsed());
        cpu.push(thread_cpu().saturating_sub(start_cpu));
    }
    wall.sort();
    cpu.sort();
    Timing {
        median: wall[ROUNDS / 2],
        p95: wall[ROUNDS * 95 / 100],
        cpu: cpu[ROUNDS / 2],
    }
}

struct Timing {
    median: Duration,
    p95: Duration,
    cpu: Duration,
}

impl Timing {
    fn line(&self, what: &str, with_cpu: bool) {
        let cpu = if with_cpu {
            format!("{:>8.2} ms", ms(self.cpu))
        } else {
            format!("{:>11}", "-")
        };
        println!(
            "  {what:<44} {:>8.2} ms {:>8.2} ms {cpu}",
            ms(self.median),
            ms(self.p95)
        );
    }
}

fn thread_cpu() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec into the valid one passed.
    if unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) } != 0 {
        return Duration::ZERO;
    }
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}
