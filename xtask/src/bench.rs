//! `cargo xtask bench`: the agent's cost beside the tools users would run instead, each
//! measured in the same run (these machines are shared, so only same-run comparisons mean
//! something), reported as one table in `target/bench/report.md` and `report.json`.
//!
//! Each benchmark is a binary of the tests crate (or, for the in-process encoding, a
//! Criterion bench) that alternates both sides over rounds and appends its rows to a
//! JSON-lines file (`PLEXD_BENCH_ROWS`); [`report`] turns those into the table, and with
//! `--write-docs` [`docs`] puts it into `docs/benchmarks.md`.

mod docs;
mod report;
mod vm;

use std::path::Path;
use std::process::Command;
use std::time::Instant;

use anyhow::{bail, Context, Result};

use crate::build_ebpf;
use crate::run::which;
use crate::setup::{self, Need};
use crate::util::{cargo_build, is_root, run_cmd, workspace_root};

/// Options of `cargo xtask bench`.
#[derive(clap::Args)]
pub struct Options {
    /// A reduced set (fewer rounds, sizes and targets) that runs in under 3 minutes once
    /// built, for use while developing; its figures say less about the goals.
    #[arg(long)]
    quick: bool,
    /// Run only this benchmark: node-exporter, wireguard-exporter, exposition, latency, kernel,
    /// packet-rate, encode, queue, tunnel, footprint or vm (the VM tests' budget, only this
    /// way).
    #[arg(long, value_name = "NAME")]
    only: Option<String>,
    /// Also write the table, with the machine, date and load, into docs/benchmarks.md between
    /// its `<!-- bench:begin -->` and `<!-- bench:end -->` lines; with --only, that
    /// benchmark's rows alone. Not with --quick, and only when every benchmark ran.
    //
    // A flag rather than every full run: the document is the figures of one chosen machine,
    // and a run on a laptop or a loaded CI host should not rewrite a tracked file unasked.
    #[arg(long, conflicts_with = "quick")]
    write_docs: bool,
}

/// What a benchmark runs.
enum Kind {
    /// A binary of the tests crate, run as root, with arguments for a full and a quick run.
    Binary {
        bin: &'static str,
        full: &'static [&'static str],
        quick: &'static [&'static str],
    },
    /// The Criterion bench `tests/benches/encode.rs`.
    Criterion,
    /// The VM tests' budget (boots QEMU; only with `--only vm`).
    Vm,
}

struct Bench {
    name: &'static str,
    kind: Kind,
    /// Part of a run without `--only`; and of a quick one.
    default: bool,
    quick: bool,
}

const BENCHES: &[Bench] = &[
    Bench {
        name: "node-exporter",
        kind: Kind::Binary {
            bin: "bench_node_exporter",
            full: &[],
            quick: &["--quick"],
        },
        default: true,
        quick: true,
    },
    Bench {
        name: "wireguard-exporter",
        kind: Kind::Binary {
            bin: "bench_wireguard_exporter",
            full: &[],
            quick: &["--quick"],
        },
        default: true,
        quick: true,
    },
    Bench {
        name: "exposition",
        kind: Kind::Binary {
            bin: "bench_exposition",
            full: &[],
            quick: &["--quick"],
        },
        default: true,
        quick: true,
    },
    Bench {
        name: "latency",
        kind: Kind::Binary {
            bin: "latency_bench",
            full: &["--targets", "1000,10000", "--rounds", "3"],
            quick: &[
                "--targets",
                "1000",
                "--collect-interval",
                "5",
                "--rounds",
                "2",
            ],
        },
        default: true,
        quick: true,
    },
    Bench {
        name: "kernel",
        kind: Kind::Binary {
            bin: "plexd-metrics-bench",
            full: &[],
            quick: &["--quick"],
        },
        default: true,
        quick: true,
    },
    Bench {
        name: "packet-rate",
        kind: Kind::Binary {
            bin: "bench_packet_rate",
            full: &[],
            quick: &["--quick"],
        },
        default: true,
        quick: true,
    },
    Bench {
        name: "encode",
        kind: Kind::Criterion,
        default: true,
        quick: true,
    },
    // The durable queue on a disk: collected() per cycle, bytes written per day, start-up
    // with 256 MiB queued.
    Bench {
        name: "queue",
        kind: Kind::Binary {
            bin: "bench_queue",
            full: &[],
            quick: &["--quick"],
        },
        default: true,
        quick: true,
    },
    // Figures of earlier issues, printed but not in the table: the tunnel collect's own
    // 20 ms goal at 10,000 peers, and the DaemonSet's resource figures.
    Bench {
        name: "tunnel",
        kind: Kind::Binary {
            bin: "bench_tunnel",
            full: &[],
            quick: &[],
        },
        default: true,
        quick: false,
    },
    Bench {
        name: "footprint",
        kind: Kind::Binary {
            bin: "bench_footprint",
            full: &[],
            quick: &[],
        },
        default: true,
        quick: false,
    },
    Bench {
        name: "vm",
        kind: Kind::Vm,
        default: false,
        quick: false,
    },
];

/// Runs the benchmarks (all of them even when one fails), writes the report and fails if
/// any benchmark did. A goal not met is not a failure: the report marks it.
pub fn run(o: &Options) -> Result<()> {
    let selected: Vec<&Bench> = match &o.only {
        Some(only) => {
            let Some(b) = BENCHES.iter().find(|b| b.name == only) else {
                let names: Vec<&str> = BENCHES.iter().map(|b| b.name).collect();
                bail!("no benchmark named {only}; there are {}", names.join(", "));
            };
            vec![b]
        }
        None => BENCHES
            .iter()
            .filter(|b| b.default && (b.quick || !o.quick))
            .collect(),
    };
    let root = workspace_root();
    let docs_path = root.join("docs/benchmarks.md");
    if o.write_docs {
        // Before the minutes of benchmarks, not after them.
        docs::check(&docs_path, o.only.is_some())?;
    }
    let out_dir = root.join("target/bench");
    std::fs::create_dir_all(&out_dir)
        .with_context(|| format!("cannot create {}", out_dir.display()))?;
    let rows = out_dir.join("rows.jsonl");
    if rows.exists() {
        std::fs::remove_file(&rows).with_context(|| format!("cannot remove {}", rows.display()))?;
    }
    let mut needs = vec![Need::Testbed];
    if selected
        .iter()
        .any(|b| matches!(b.kind, Kind::Binary { .. }))
    {
        needs.push(Need::Bench);
    }
    setup::ensure(&needs)?;
    let bins: Vec<&str> = selected
        .iter()
        .filter_map(|b| match b.kind {
            Kind::Binary { bin, .. } => Some(bin),
            _ => None,
        })
        .collect();
    if !bins.is_empty() {
        build(&bins)?;
    }
    let mut context = report::Context::now(o.quick, &std::env::args().skip(1).collect::<Vec<_>>());

    let started = Instant::now();
    let mut failed = Vec::new();
    let mut tagged: Vec<serde_json::Value> = Vec::new();
    for bench in &selected {
        eprintln!("\nxtask bench: {}", bench.name);
        let result = match &bench.kind {
            Kind::Binary { bin, full, quick } => {
                run_binary(bin, if o.quick { quick } else { full }, &rows)
            }
            Kind::Criterion => run_criterion(o.quick, &rows),
            Kind::Vm => vm::run(),
        };
        if let Err(e) = result {
            failed.push(format!("{}: {e:#}", bench.name));
        }
        // The rows this benchmark appended, tagged with its name: what `--write-docs
        // --only NAME` replaces.
        for mut row in report::read_rows(&rows)?.into_iter().skip(tagged.len()) {
            row[report::BENCH] = bench.name.into();
            tagged.push(row);
        }
    }
    let wall = started.elapsed();
    context.finish();
    let table = report::write(&context, &tagged, &out_dir, wall, &failed)?;
    println!("\n{table}");
    println!(
        "xtask bench: {:.0} s of benchmarks; report in {} and {}",
        wall.as_secs_f64(),
        out_dir.join("report.md").display(),
        out_dir.join("report.json").display()
    );
    if !failed.is_empty() {
        if o.write_docs {
            eprintln!("xtask bench: docs/benchmarks.md left as it was, as benchmarks failed");
        }
        bail!("benchmarks failed:\n{}", failed.join("\n"));
    }
    if o.write_docs {
        write_docs(o, &context, &tagged, &docs_path)?;
    }
    Ok(())
}

/// Puts the rows of this run into `docs/benchmarks.md` (see [`docs`]).
fn write_docs(
    o: &Options,
    context: &report::Context,
    rows: &[serde_json::Value],
    path: &Path,
) -> Result<()> {
    if rows.is_empty() {
        bail!("--write-docs: this run wrote no rows (tunnel, footprint and vm print their figures only)");
    }
    let command = match &o.only {
        Some(name) => format!("cargo xtask bench --only {name}"),
        None => "cargo xtask bench".to_owned(),
    };
    let section = docs::Section::of(context.machine(), &command, &context.when(), rows);
    let order: Vec<&str> = BENCHES.iter().map(|b| b.name).collect();
    docs::write(path, section, o.only.as_deref(), &order)?;
    println!("xtask bench: wrote the table into {}", path.display());
    Ok(())
}

/// Builds the kernel programs, the release agent and the benchmarks' binaries.
fn build(bins: &[&str]) -> Result<()> {
    build_ebpf::build(false)?;
    let mut all = vec!["plexd-metrics"];
    all.extend_from_slice(bins);
    cargo_build(true, &["plexd-metrics", "plexd-metrics-tests"], &all)
}

/// Runs a benchmark binary as root (through sudo when not root: namespaces, eBPF, raw
/// sockets), telling it where the agent, the tools and the rows file are.
fn run_binary(bin: &str, args: &[&str], rows: &Path) -> Result<()> {
    let release = crate::util::target_dir().join("release");
    let env = [
        ("PLEXD_METRICS_BIN", release.join("plexd-metrics")),
        ("PLEXD_BENCH_TOOLS", setup::tools_dir()),
        ("PLEXD_BENCH_ROWS", rows.to_path_buf()),
    ];
    let binary = release.join(bin);
    let mut cmd = if is_root() {
        let mut c = Command::new(&binary);
        c.envs(env);
        c
    } else if which("sudo") {
        // sudo drops the environment; `env` carries what the benchmark needs.
        let mut c = Command::new("sudo");
        c.arg("env");
        c.args(env.iter().map(|(k, v)| format!("{k}={}", v.display())));
        c.arg(&binary);
        c
    } else {
        bail!("{bin} needs root (network namespaces, eBPF, raw sockets) and sudo is not installed; run as root");
    };
    run_cmd(cmd.args(args))
}

/// Runs the Criterion bench, whose output stays in `target/criterion`.
fn run_criterion(quick: bool, rows: &Path) -> Result<()> {
    let root = workspace_root();
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(&root)
        .env("CRITERION_HOME", root.join("target/criterion"))
        .env("PLEXD_BENCH_ROWS", rows)
        // The release profile rather than `bench`: the same artifacts as the binaries' build,
        // so that neither build undoes the other.
        .args(["bench", "--profile", "release"])
        .args(["--package", "plexd-metrics-tests", "--bench", "encode"]);
    if quick {
        cmd.args(["--", "--quick"]);
    }
    run_cmd(&mut cmd)
}
