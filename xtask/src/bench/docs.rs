//! The generated section of `docs/benchmarks.md`, between [`BEGIN`] and [`END`], which
//! `cargo xtask bench --write-docs` rewrites: one line with the machine and the date and load
//! of each run whose rows it holds, the table, and what each row compares.
//!
//! A full run replaces the whole section. A run with `--only NAME` replaces NAME's rows and
//! that command's entry in the line and keeps the rest, which only makes sense when the rest
//! was measured on the same machine, so it refuses to merge rows from another one. Every
//! table line and list item starts with the benchmark that wrote it, which is what the merge
//! goes by.

use std::path::Path;

use anyhow::{bail, Context as _, Result};
use serde_json::Value;

use super::report::{self, TABLE_HEADER};

/// The line before the generated section.
pub const BEGIN: &str = "<!-- bench:begin -->";
/// The line after the generated section.
pub const END: &str = "<!-- bench:end -->";

/// The first line inside the section, for whoever edits the file by hand.
const WARNING: &str =
    "<!-- Written by `cargo xtask bench --write-docs`: edit outside the markers. -->";
/// How the line with the machine and the runs starts.
const MEASURED_ON: &str = "Measured on ";
/// Between the machine and each run in that line.
const SEPARATOR: &str = " · ";

/// The generated section, its table lines and list items keyed by benchmark.
#[derive(Debug, PartialEq)]
pub struct Section {
    /// CPU model, cores and kernel.
    pub machine: String,
    /// Each run whose rows the section holds: `` `command`: date, load start → end ``.
    pub runs: Vec<String>,
    /// Table lines below [`TABLE_HEADER`], as (benchmark, line).
    pub rows: Vec<(String, String)>,
    /// What each row compares and its further figures, as (benchmark, list item).
    pub sides: Vec<(String, String)>,
}

impl Section {
    /// The section of one run of `command` on `machine`, `when` being its date and load,
    /// with `rows` tagged with the benchmark that wrote them.
    pub fn of(machine: String, command: &str, when: &str, rows: &[Value]) -> Self {
        let keyed = |render: fn(&[Value]) -> String, skip: usize| {
            rows.iter()
                .map(|row| {
                    let bench = row[report::BENCH].as_str().unwrap_or("").to_owned();
                    let text = render(std::slice::from_ref(row));
                    (bench, text[skip..].trim_end().to_owned())
                })
                .collect()
        };
        Self {
            machine,
            runs: vec![format!("`{command}`: {when}")],
            rows: keyed(report::table, TABLE_HEADER.len()),
            sides: keyed(report::sides, 0),
        }
    }

    /// The section as it goes between the markers, without them.
    pub fn render(&self) -> String {
        let mut out = format!(
            "{WARNING}\n{MEASURED_ON}{}{SEPARATOR}{}\n\n{TABLE_HEADER}",
            self.machine,
            self.runs.join(SEPARATOR)
        );
        for (_, line) in &self.rows {
            out.push_str(line);
            out.push('\n');
        }
        out.push('\n');
        for (_, item) in &self.sides {
            out.push_str(item);
            out.push('\n');
        }
        out
    }

    /// Reads a section back from what [`Section::render`] wrote; `None` when it is empty.
    pub fn parse(body: &str) -> Result<Option<Self>> {
        let header: Vec<&str> = TABLE_HEADER.lines().collect();
        let mut section: Option<Self> = None;
        for (i, line) in body.lines().enumerate() {
            let unknown = || {
                anyhow::anyhow!(
                    "line {} of the generated section is not one the bench writes: {line:?}; \
                     a full `cargo xtask bench --write-docs` rewrites the section",
                    i + 1
                )
            };
            if line.trim().is_empty() || line == WARNING || header.contains(&line) {
                continue;
            }
            if let Some(rest) = line.strip_prefix(MEASURED_ON) {
                let mut parts = rest.split(SEPARATOR).map(str::to_owned);
                section = Some(Self {
                    machine: parts.next().unwrap_or_default(),
                    runs: parts.collect(),
                    rows: Vec::new(),
                    sides: Vec::new(),
                });
                continue;
            }
            let Some(s) = section.as_mut() else {
                return Err(unknown());
            };
            if let Some(cells) = line.strip_prefix("| ") {
                let (bench, _) = cells.split_once(" |").ok_or_else(unknown)?;
                s.rows.push((bench.to_owned(), line.to_owned()));
            } else if let Some(item) = line.strip_prefix("- **") {
                let (bench, _) = item.split_once("**").ok_or_else(unknown)?;
                s.sides.push((bench.to_owned(), line.to_owned()));
            } else {
                return Err(unknown());
            }
        }
        Ok(section)
    }

    /// `self` with `new`'s rows, sides and run in place of those of benchmark `only`, the
    /// rows kept in the order of `order` (benchmark names).
    pub fn merge(mut self, new: Self, only: &str, order: &[&str]) -> Result<Self> {
        if self.machine != new.machine {
            bail!(
                "the rows in docs/benchmarks.md were measured on {}, this is {}; a full \
                 `cargo xtask bench --write-docs` replaces them all",
                self.machine,
                new.machine
            );
        }
        let command = |run: &str| run.split_once(": ").map_or(run, |(c, _)| c).to_owned();
        let new_commands: Vec<String> = new.runs.iter().map(|r| command(r)).collect();
        self.runs.retain(|r| !new_commands.contains(&command(r)));
        self.runs.extend(new.runs);
        let rank = |bench: &str| {
            order
                .iter()
                .position(|b| *b == bench)
                .unwrap_or(order.len())
        };
        for (old, new) in [(&mut self.rows, new.rows), (&mut self.sides, new.sides)] {
            old.retain(|(bench, _)| bench != only);
            old.extend(new);
            old.sort_by_key(|(bench, _)| rank(bench));
        }
        Ok(self)
    }
}

/// The text between the markers of `doc` (the line after [`BEGIN`] up to [`END`]).
pub fn between_markers(doc: &str) -> Result<&str> {
    let (start, end) = marker_span(doc)?;
    Ok(&doc[start..end])
}

/// `doc` with the text between its markers replaced by `body`.
pub fn replace_between_markers(doc: &str, body: &str) -> Result<String> {
    let (start, end) = marker_span(doc)?;
    Ok(format!("{}{body}{}", &doc[..start], &doc[end..]))
}

/// Byte offsets of the text between the markers, each of which must stand on a line of its
/// own, once, `BEGIN` first.
fn marker_span(doc: &str) -> Result<(usize, usize)> {
    let find = |marker: &str| {
        let mut at = Vec::new();
        let mut offset = 0;
        for line in doc.split_inclusive('\n') {
            if line.trim_end() == marker {
                at.push((offset, offset + line.len()));
            }
            offset += line.len();
        }
        match at[..] {
            [one] => Ok(one),
            [] => bail!("no line {marker:?}: the generated section needs {BEGIN} and {END}, each on a line of its own"),
            _ => bail!("the line {marker:?} appears {} times; it must appear once", at.len()),
        }
    };
    let (_, start) = find(BEGIN)?;
    let (end, _) = find(END)?;
    if end < start {
        bail!("{END} comes before {BEGIN}");
    }
    Ok((start, end))
}

/// Fails if [`write`] could not write into the document at `path`: it cannot be read, its
/// markers are missing, or (for a merge, `merging`) its section does not parse.
pub fn check(path: &Path, merging: bool) -> Result<()> {
    let doc =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let body = between_markers(&doc).with_context(|| format!("in {}", path.display()))?;
    if merging {
        Section::parse(body).with_context(|| format!("in {}", path.display()))?;
    }
    Ok(())
}

/// Writes `new` into the document at `path`: the whole section, or with `only` merged into
/// the section already there (see [`Section::merge`]).
pub fn write(path: &Path, new: Section, only: Option<&str>, order: &[&str]) -> Result<()> {
    let doc =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let section = match only {
        Some(only) => match Section::parse(between_markers(&doc)?)
            .with_context(|| format!("in {}", path.display()))?
        {
            Some(old) => old.merge(new, only, order)?,
            None => new,
        },
        None => new,
    };
    let doc = replace_between_markers(&doc, &section.render())
        .with_context(|| format!("in {}", path.display()))?;
    std::fs::write(path, doc).with_context(|| format!("cannot write {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn row(bench: &str, id: &str, median: f64) -> Value {
        json!({
            "bench": bench, "id": id, "what": format!("{id} cost"), "agent_label": "agent",
            "baseline_label": "", "unit": "ms",
            "agent": {"median": median, "min": median, "max": median},
            "baseline": null, "ratio": null, "goal": "< 10 ms", "checks": [],
            "met": median < 10.0, "notes": [format!("{id} note")],
        })
    }

    const MACHINE: &str = "Some CPU, 2 cores, Linux 6.1.0";
    const ORDER: &[&str] = &["latency", "encode", "queue"];

    fn full() -> Section {
        Section::of(
            MACHINE.to_owned(),
            "cargo xtask bench",
            "2024-01-01 10:00 UTC, load 0.50 → 1.50",
            &[
                row("latency", "latency-1000", 1.0),
                row("encode", "encode-10000", 2.0),
                row("queue", "queue-a", 3.0),
                row("queue", "queue-b", 4.0),
            ],
        )
    }

    fn doc(body: &str) -> String {
        format!("# Benchmarks\n\nProse.\n\n{BEGIN}\n{body}{END}\n\nMore prose.\n")
    }

    #[test]
    fn a_rendered_section_parses_back() {
        let s = full();
        let text = s.render();
        assert!(text.contains(
            "Measured on Some CPU, 2 cores, Linux 6.1.0 · `cargo xtask bench`: 2024-01-01 10:00 UTC, load 0.50 → 1.50\n"
        ), "{text}");
        assert!(
            text.contains(
                "| encode | encode-10000 cost | 2.00 ms (2.00–2.00) | — | — | < 10 ms | ✓ |\n"
            ),
            "{text}"
        );
        assert!(
            text.contains("- **queue** `queue-b`: agent; queue-b note\n"),
            "{text}"
        );
        assert_eq!(Section::parse(&text).unwrap(), Some(s));
    }

    #[test]
    fn an_empty_section_parses_as_none() {
        assert_eq!(Section::parse("").unwrap(), None);
        assert_eq!(Section::parse("\n\n").unwrap(), None);
    }

    #[test]
    fn a_hand_edited_line_is_refused() {
        let text = full().render().replace("- **queue** `queue-a`", "queue-a");
        let err = Section::parse(&text).unwrap_err().to_string();
        assert!(err.contains("not one the bench writes"), "{err}");
    }

    #[test]
    fn only_one_benchmark_replaces_its_rows_and_its_run() {
        let only = |median| {
            Section::of(
                MACHINE.to_owned(),
                "cargo xtask bench --only queue",
                &format!("2024-01-0{median} 11:00 UTC, load 1 → 2"),
                &[row("queue", "queue-a", f64::from(median))],
            )
        };
        let merged = full().merge(only(7), "queue", ORDER).unwrap();
        let merged = merged.merge(only(8), "queue", ORDER).unwrap();
        assert_eq!(
            merged.runs,
            [
                "`cargo xtask bench`: 2024-01-01 10:00 UTC, load 0.50 → 1.50",
                "`cargo xtask bench --only queue`: 2024-01-08 11:00 UTC, load 1 → 2",
            ]
        );
        let benches: Vec<&str> = merged.rows.iter().map(|(b, _)| b.as_str()).collect();
        assert_eq!(benches, ["latency", "encode", "queue"]);
        assert!(merged.rows[2].1.contains("8.00 ms"), "{:?}", merged.rows);
        assert_eq!(merged.sides.len(), 3);
        assert!(merged.sides[2].1.starts_with("- **queue** `queue-a`"));

        // Rows of a benchmark the section lacks go where the order puts them.
        let latency = Section::of(
            MACHINE.to_owned(),
            "cargo xtask bench --only latency",
            "later",
            &[row("latency", "latency-1000", 5.0)],
        );
        let start = Section::parse(&only(7).render()).unwrap().unwrap();
        let merged = start.merge(latency, "latency", ORDER).unwrap();
        let benches: Vec<&str> = merged.rows.iter().map(|(b, _)| b.as_str()).collect();
        assert_eq!(benches, ["latency", "queue"]);
    }

    #[test]
    fn rows_of_another_machine_are_not_merged() {
        let other = Section::of("Other CPU, 8 cores, Linux 6.12".to_owned(), "c", "w", &[]);
        let err = full().merge(other, "queue", ORDER).unwrap_err().to_string();
        assert!(err.contains("measured on Some CPU"), "{err}");
    }

    #[test]
    fn the_section_between_the_markers_is_replaced_and_the_rest_kept() {
        let old = doc("stale\n");
        assert_eq!(between_markers(&old).unwrap(), "stale\n");
        let new = replace_between_markers(&old, "fresh\n").unwrap();
        assert_eq!(new, doc("fresh\n"));
        assert!(new.starts_with("# Benchmarks\n\nProse.\n\n"));
        assert!(new.ends_with("\n\nMore prose.\n"));
    }

    #[test]
    fn missing_misplaced_or_repeated_markers_are_errors() {
        let err = |doc: &str| replace_between_markers(doc, "x\n").unwrap_err().to_string();
        assert!(err("# Benchmarks\n").contains("no line \"<!-- bench:begin -->\""));
        assert!(err(&format!("{BEGIN}\n")).contains("no line \"<!-- bench:end -->\""));
        assert!(err(&format!("{END}\n{BEGIN}\n")).contains("comes before"));
        assert!(err(&format!("{BEGIN}\n{BEGIN}\n{END}\n")).contains("appears 2 times"));
        // A marker quoted inside a line of prose is not a marker.
        assert!(err(&format!("see `{BEGIN}`\n{END}\n")).contains("no line"));
    }

    #[test]
    fn writing_a_file_without_markers_fails_and_leaves_it() {
        let path = std::env::temp_dir().join(format!("xtask-benchmarks-{}.md", std::process::id()));
        std::fs::write(&path, "# Benchmarks\n").unwrap();
        let err = check(&path, false).unwrap_err();
        assert!(format!("{err:#}").contains("no line"), "{err:#}");
        let err = write(&path, full(), None, ORDER).unwrap_err();
        assert!(format!("{err:#}").contains("no line"), "{err:#}");
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "# Benchmarks\n");

        std::fs::write(&path, doc("")).unwrap();
        check(&path, true).unwrap();
        write(&path, full(), None, ORDER).unwrap();
        let only = Section::of(
            MACHINE.to_owned(),
            "cargo xtask bench --only encode",
            "now",
            &[row("encode", "encode-10000", 9.0)],
        );
        write(&path, only, Some("encode"), ORDER).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        let section = Section::parse(between_markers(&text).unwrap())
            .unwrap()
            .unwrap();
        assert_eq!(section.rows.len(), 4);
        assert!(section.rows[1].1.contains("9.00 ms"), "{text}");
        assert!(text.ends_with(&format!("{END}\n\nMore prose.\n")));
        std::fs::remove_file(&path).unwrap();
    }
}
