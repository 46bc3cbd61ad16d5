//! The report of `cargo xtask bench`: the benchmarks' rows (JSON lines, see
//! `tests/src/bench.rs`) as a Markdown table of medians, min–max spreads and ratios, in
//! `report.md`, and everything measured in `report.json`.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use anyhow::{Context as _, Result};
use serde_json::{json, Value};

/// Where and how the run happened, for the report's header.
pub struct Context {
    command: String,
    started: String,
    cpu: String,
    kernel: String,
    cpus: usize,
    load_at_start: String,
    load_at_end: String,
    quick: bool,
}

impl Context {
    /// The context of a run started now with `args` (after `cargo xtask`).
    pub fn now(quick: bool, args: &[String]) -> Self {
        let output = |program: &str, args: &[&str]| {
            Command::new(program)
                .args(args)
                .output()
                .ok()
                .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
                .unwrap_or_default()
        };
        Self {
            command: format!("cargo xtask {}", args.join(" ")),
            started: output("date", &["-u", "+%Y-%m-%d %H:%M UTC"]),
            kernel: output("uname", &["-r"]),
            cpu: std::fs::read_to_string("/proc/cpuinfo")
                .ok()
                .and_then(|info| {
                    info.lines()
                        .find_map(|l| l.strip_prefix("model name")?.split_once(':'))
                        .map(|(_, model)| model.split_whitespace().collect::<Vec<_>>().join(" "))
                })
                .unwrap_or_else(|| "unknown CPU".to_owned()),
            cpus: std::thread::available_parallelism().map_or(0, |n| n.get()),
            load_at_start: load_average(),
            load_at_end: String::new(),
            quick,
        }
    }

    /// Records the load average at the end of the run.
    pub fn finish(&mut self) {
        self.load_at_end = load_average();
    }

    /// The machine, for the line of `docs/benchmarks.md`: CPU model, cores and kernel.
    pub fn machine(&self) -> String {
        format!("{}, {} cores, Linux {}", self.cpu, self.cpus, self.kernel)
    }

    /// When the run started (UTC) and the 1-minute load average at its start and end.
    pub fn when(&self) -> String {
        let first = |l: &str| l.split(' ').next().unwrap_or("?").to_owned();
        format!(
            "{}, load {} → {}",
            self.started,
            first(&self.load_at_start),
            first(&self.load_at_end)
        )
    }
}

/// The 1-, 5- and 15-minute load averages, e.g. `0.52 0.61 0.70`.
fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|l| l.split(' ').take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

/// The key of a row naming the benchmark that wrote it, added by xtask.
pub const BENCH: &str = "bench";

/// The rows in the JSON-lines file `rows` (none when it does not exist).
pub fn read_rows(rows: &Path) -> Result<Vec<Value>> {
    let text = match std::fs::read_to_string(rows) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", rows.display())),
    };
    text.lines()
        .map(serde_json::from_str)
        .collect::<Result<_, _>>()
        .with_context(|| format!("a line of {} is not a JSON row", rows.display()))
}

/// Writes `report.md` and `report.json` into `out_dir` from `rows` and returns the
/// Markdown.
pub fn write(
    ctx: &Context,
    rows: &[Value],
    out_dir: &Path,
    wall: Duration,
    failed: &[String],
) -> Result<String> {
    let markdown = markdown(ctx, rows, wall, failed);
    let report = json!({
        "command": ctx.command,
        "started": ctx.started,
        "quick": ctx.quick,
        "host": {
            "cpu": ctx.cpu,
            "kernel": ctx.kernel,
            "cpus": ctx.cpus,
            "load_at_start": ctx.load_at_start,
            "load_at_end": ctx.load_at_end,
        },
        "wall_seconds": wall.as_secs_f64(),
        "failed": failed,
        "rows": rows,
    });
    let md_path = out_dir.join("report.md");
    std::fs::write(&md_path, &markdown)
        .with_context(|| format!("cannot write {}", md_path.display()))?;
    let json_path = out_dir.join("report.json");
    let pretty = serde_json::to_string_pretty(&report).context("serialise the report")?;
    std::fs::write(&json_path, pretty + "\n")
        .with_context(|| format!("cannot write {}", json_path.display()))?;
    Ok(markdown)
}

fn markdown(ctx: &Context, rows: &[Value], wall: Duration, failed: &[String]) -> String {
    let mut md = format!(
        "Measured with `{}` on {}: Linux {}, {} CPUs, load average {} at the start; {:.0} s of \
         benchmarks{}. Each figure is the median over rounds that alternate the agent and the \
         baseline, with the min–max spread in brackets; the ratio is agent ÷ baseline per \
         round.\n\n",
        ctx.command,
        ctx.started,
        ctx.kernel,
        ctx.cpus,
        ctx.load_at_start,
        wall.as_secs_f64(),
        if ctx.quick {
            " (quick: fewer rounds and sizes)"
        } else {
            ""
        }
    );
    md.push_str(&table(rows));
    md.push_str("\nWhat each row compares, and further figures:\n\n");
    md.push_str(&sides(rows));
    if !failed.is_empty() {
        md.push_str("\nBenchmarks that failed (no rows from them):\n\n");
        for f in failed {
            md.push_str(&format!("- {}\n", f.lines().next().unwrap_or(f)));
        }
    }
    md
}

/// The header of [`table`], two lines.
pub const TABLE_HEADER: &str = "| bench | what | plexd-metrics | baseline | ratio | goal | met |\n\
                                | --- | --- | --- | --- | --- | --- | --- |\n";

/// The rows as a Markdown table under [`TABLE_HEADER`], each line starting with the
/// benchmark that wrote it (`cargo xtask bench --only NAME` reruns it).
pub fn table(rows: &[Value]) -> String {
    let mut md = TABLE_HEADER.to_owned();
    for row in rows {
        let unit = row["unit"].as_str().unwrap_or("");
        let baseline = if row["baseline"].is_null() {
            "—".to_owned()
        } else {
            spread(&row["baseline"], unit)
        };
        let ratio = if row["ratio"].is_null() {
            "—".to_owned()
        } else {
            format!(
                "{}× ({}–{})",
                number(&row["ratio"]["median"]),
                number(&row["ratio"]["min"]),
                number(&row["ratio"]["max"])
            )
        };
        let mut goal = row["goal"].as_str().unwrap_or("").to_owned();
        for check in row["checks"].as_array().into_iter().flatten() {
            goal.push_str(&format!(
                "; {} {}",
                check["text"].as_str().unwrap_or(""),
                mark(&check["met"])
            ));
        }
        let cells = [
            row[BENCH].as_str().unwrap_or("").to_owned(),
            row["what"].as_str().unwrap_or("").to_owned(),
            spread(&row["agent"], unit),
            baseline,
            ratio,
            goal,
            mark(&row["met"]).to_owned(),
        ];
        let cells: Vec<String> = cells.iter().map(|c| c.replace('|', "\\|")).collect();
        md.push_str(&format!("| {} |\n", cells.join(" | ")));
    }
    md
}

/// One list item per row: the benchmark, the row's id, the sides it compares and its
/// further figures (`- **bench** `id`: agent vs baseline; notes`).
pub fn sides(rows: &[Value]) -> String {
    let mut md = String::new();
    for row in rows {
        let baseline = row["baseline_label"].as_str().unwrap_or("");
        let id = row["id"].as_str().unwrap_or("");
        // Some benchmarks start a note with its row's id, which the item already names.
        let own = format!("{id}: ");
        let notes: Vec<&str> = row["notes"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
            .map(|n| n.strip_prefix(&own).unwrap_or(n))
            .collect();
        md.push_str(&format!(
            "- **{}** `{}`: {}{}{}\n",
            row[BENCH].as_str().unwrap_or(""),
            id,
            row["agent_label"].as_str().unwrap_or(""),
            if baseline.is_empty() {
                String::new()
            } else {
                format!(" vs {baseline}")
            },
            if notes.is_empty() {
                String::new()
            } else {
                format!("; {}", notes.join("; "))
            }
        ));
    }
    md
}

fn mark(met: &Value) -> &'static str {
    if met.as_bool() == Some(true) {
        "✓"
    } else {
        "✗"
    }
}

/// `median unit (min–max)`.
fn spread(s: &Value, unit: &str) -> String {
    format!(
        "{} {unit} ({}–{})",
        number(&s["median"]),
        number(&s["min"]),
        number(&s["max"])
    )
}

/// Three significant digits, or whole numbers with thousands separators from 1,000 on.
fn number(v: &Value) -> String {
    let Some(x) = v.as_f64() else {
        return "?".to_owned();
    };
    let a = x.abs();
    if a >= 1000.0 {
        let digits = format!("{:.0}", a);
        let mut out = String::new();
        for (i, c) in digits.chars().enumerate() {
            if i > 0 && (digits.len() - i) % 3 == 0 {
                out.push(',');
            }
            out.push(c);
        }
        return if x < 0.0 { format!("-{out}") } else { out };
    }
    let decimals = if a >= 100.0 {
        0
    } else if a >= 10.0 {
        1
    } else if a >= 1.0 {
        2
    } else if a >= 0.1 {
        3
    } else {
        4
    };
    format!("{x:.decimals$}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_keep_three_significant_digits() {
        assert_eq!(number(&json!(608819.08)), "608,819");
        assert_eq!(number(&json!(1234.6)), "1,235");
        assert_eq!(number(&json!(140.78)), "141");
        assert_eq!(number(&json!(25.43)), "25.4");
        assert_eq!(number(&json!(1.333)), "1.33");
        assert_eq!(number(&json!(0.169)), "0.169");
        assert_eq!(number(&json!(0.0256)), "0.0256");
    }

    #[test]
    fn a_row_becomes_a_table_line_with_its_checks() {
        let row = json!({
            "bench": "latency", "id": "latency-1000", "what": "ICMP latency", "agent_label": "collect",
            "baseline_label": "fping", "unit": "s",
            "agent": {"median": 0.1, "min": 0.09, "max": 0.2},
            "baseline": {"median": 0.2, "min": 0.1, "max": 0.3},
            "ratio": {"median": 0.5, "min": 0.4, "max": 0.9},
            "goal": "≤ 1×", "checks": [{"text": "medians agree", "met": false}],
            "met": false, "notes": ["a note", "latency-1000: its own note"],
        });
        let ctx = Context::now(true, &["bench".to_owned(), "--quick".to_owned()]);
        let md = markdown(&ctx, &[row], Duration::from_secs(100), &[]);
        assert!(md.contains(
            "| latency | ICMP latency | 0.100 s (0.0900–0.200) | 0.200 s (0.100–0.300) | 0.500× (0.400–0.900) | ≤ 1×; medians agree ✗ | ✗ |"
        ), "{md}");
        assert!(md.contains("`cargo xtask bench --quick`"));
        assert!(
            md.contains("- **latency** `latency-1000`: collect vs fping; a note; its own note\n")
        );
    }
}
