//! What an application endpoint (`metrics.apps`) answered, turned into the `metrics` object
//! of its `app` point: JSON objects flattened to dotted keys, or the Prometheus text format
//! with one key per sample. Bounded in the number and length of keys; never panics, whatever
//! the bytes.
//!
//! The rules, which docs/metrics.md states for users:
//!
//! - **Which format**: a `Content-Type` of `application/json` (or `…+json`) is JSON, one of
//!   `text/plain` or `application/openmetrics-text` is the Prometheus text format; otherwise
//!   a body whose first non-blank byte is `{` or `[` is taken for JSON, any other for text.
//! - **JSON**: the document must be an object. Numbers are kept as written; `true`/`false`
//!   become 1/0; nested objects join their keys with `.` (`{"db": {"open": 3}}` gives
//!   `db.open`); array elements are keyed by their index (`disks.0.used`); strings and
//!   `null` are left out (they are not measurements).
//! - **Prometheus text**: each sample is keyed by its name and, when it has labels, its
//!   labels as written (`http_requests_total{code="200",method="get"}`); a histogram's
//!   samples keep their `_bucket`, `_sum` and `_count` names. NaN and ±Inf values are left
//!   out: JSON has no number for them. `HELP`/`TYPE` lines that do not match their samples
//!   do not stop the rest from being read.
//! - **Bounds**: at most `max_metrics` keys, each at most [`MAX_KEY_BYTES`] long; a key met
//!   twice keeps its first value. What is left out for a bound is counted in
//!   [`AppMetrics::truncated`].

use serde_json::{Map, Number, Value};

/// Largest body read from an endpoint unless configured otherwise: far above what a
/// `/metrics` page of a busy service holds (a few MiB), low enough that a runaway endpoint
/// cannot take the agent's memory.
pub const DEFAULT_MAX_BODY_BYTES: usize = 16 * 1024 * 1024;

/// Longest key kept: a metric name with its labels. Longer ones are counted as truncated
/// rather than carried into every batch.
pub const MAX_KEY_BYTES: usize = 1024;

/// How a body was read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// A JSON object, flattened.
    Json,
    /// The Prometheus text exposition format.
    Prometheus,
}

/// The metrics read from one answer.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct AppMetrics {
    /// Key → number, in the order the body gave them.
    pub metrics: Map<String, Value>,
    /// Metrics left out because of the bound on their number
    /// (`metrics.apps[].max_metrics`) or [`MAX_KEY_BYTES`].
    pub truncated: u64,
}

impl AppMetrics {
    /// Keeps `value` under `key` unless a bound says no; the first value of a key wins.
    fn insert(&mut self, key: String, value: Number, max_metrics: usize) {
        if self.metrics.contains_key(&key) {
            return;
        }
        if key.len() > MAX_KEY_BYTES || self.metrics.len() >= max_metrics {
            self.truncated += 1;
            return;
        }
        self.metrics.insert(key, Value::Number(value));
    }
}

/// Why a body gave no metrics; the text says what was wrong with it, for the point's
/// `error`.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum BodyError {
    /// The body is not UTF-8.
    #[error("body is not UTF-8 text (invalid byte at offset {0})")]
    NotUtf8(usize),
    /// The body is neither a JSON object nor Prometheus text.
    #[error("not JSON or Prometheus text: {0}")]
    Unreadable(String),
}

/// Reads `body` as the format `content_type` names, or as the body looks when the type
/// names neither.
pub fn parse_body(
    body: &[u8],
    content_type: Option<&str>,
    max_metrics: usize,
) -> Result<(Format, AppMetrics), BodyError> {
    let text = std::str::from_utf8(body).map_err(|e| BodyError::NotUtf8(e.valid_up_to()))?;
    let format = declared_format(content_type).unwrap_or_else(|| sniff(text));
    let metrics = match format {
        Format::Json => json_metrics(text, max_metrics),
        Format::Prometheus => prometheus_metrics(text, max_metrics),
    }
    .map_err(BodyError::Unreadable)?;
    Ok((format, metrics))
}

/// The format a `Content-Type` header names, if it names one of the two.
fn declared_format(content_type: Option<&str>) -> Option<Format> {
    let media = content_type?.split(';').next()?.trim().to_ascii_lowercase();
    match media.as_str() {
        "application/json" => Some(Format::Json),
        m if m.starts_with("application/") && m.ends_with("+json") => Some(Format::Json),
        "text/plain" | "application/openmetrics-text" => Some(Format::Prometheus),
        _ => None,
    }
}

/// JSON opens with `{` or `[`; the text format never does (a line starts with a metric name
/// or `#`).
fn sniff(text: &str) -> Format {
    match text.trim_start().as_bytes().first() {
        Some(b'{' | b'[') => Format::Json,
        _ => Format::Prometheus,
    }
}

/// Flattens a JSON object; anything else is an error.
///
/// The document is walked as it is parsed, without building it as a tree first: what it
/// costs in memory is what is kept, whatever the body's size. serde_json refuses nesting
/// deeper than 128 levels, which bounds the recursion.
pub fn json_metrics(text: &str, max_metrics: usize) -> Result<AppMetrics, String> {
    use serde::de::Deserializer as _;
    let mut out = AppMetrics::default();
    let mut key = String::new();
    let mut de = serde_json::Deserializer::from_str(text);
    de.deserialize_map(Flatten {
        prefix: &mut key,
        out: &mut out,
        max: max_metrics,
        top: true,
    })
    .and_then(|()| de.end())
    .map_err(|e| format!("JSON: {e}"))?;
    Ok(out)
}

/// Visits one JSON value under `prefix`, keeping its numbers in `out`.
struct Flatten<'a> {
    prefix: &'a mut String,
    out: &'a mut AppMetrics,
    max: usize,
    /// The document itself, which must be an object.
    top: bool,
}

impl Flatten<'_> {
    fn number(self, n: Number) {
        self.out.insert(self.prefix.clone(), n, self.max);
    }

    /// The visitor for the value under `prefix.segment`; the caller restores `prefix`.
    fn child<'b>(&'b mut self, segment: &str) -> Flatten<'b> {
        if !self.prefix.is_empty() {
            self.prefix.push('.');
        }
        self.prefix.push_str(segment);
        Flatten {
            prefix: self.prefix,
            out: self.out,
            max: self.max,
            top: false,
        }
    }
}

impl<'de> serde::de::DeserializeSeed<'de> for Flatten<'_> {
    type Value = ();

    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> serde::de::Visitor<'de> for Flatten<'_> {
    type Value = ();

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.top {
            "an object of numbers"
        } else {
            "a JSON value"
        })
    }

    fn visit_bool<E>(self, v: bool) -> Result<(), E> {
        self.number(Number::from(u8::from(v)));
        Ok(())
    }

    fn visit_i64<E>(self, v: i64) -> Result<(), E> {
        self.number(Number::from(v));
        Ok(())
    }

    fn visit_u64<E>(self, v: u64) -> Result<(), E> {
        self.number(Number::from(v));
        Ok(())
    }

    fn visit_f64<E>(self, v: f64) -> Result<(), E> {
        // serde_json reads no NaN or infinity; the check is for the type's sake.
        if let Some(n) = Number::from_f64(v) {
            self.number(n);
        }
        Ok(())
    }

    fn visit_str<E>(self, _: &str) -> Result<(), E> {
        Ok(())
    }

    fn visit_unit<E>(self) -> Result<(), E> {
        Ok(())
    }

    fn visit_seq<A: serde::de::SeqAccess<'de>>(mut self, mut seq: A) -> Result<(), A::Error> {
        if self.top {
            return Err(serde::de::Error::invalid_type(
                serde::de::Unexpected::Seq,
                &self,
            ));
        }
        let len = self.prefix.len();
        let mut index = 0usize;
        loop {
            let more = seq.next_element_seed(self.child(&index.to_string()))?;
            self.prefix.truncate(len);
            if more.is_none() {
                return Ok(());
            }
            index += 1;
        }
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(mut self, mut map: A) -> Result<(), A::Error> {
        let len = self.prefix.len();
        while let Some(name) = map.next_key::<String>()? {
            map.next_value_seed(self.child(&name))?;
            self.prefix.truncate(len);
        }
        Ok(())
    }
}

/// Reads the Prometheus text format. A body that is blank is a page without metrics; one
/// the grammar refuses as a whole is an error naming the first problem.
pub fn prometheus_metrics(text: &str, max_metrics: usize) -> Result<AppMetrics, String> {
    use prom_text_format_parser::{Type, ValueType};
    let mut out = AppMetrics::default();
    if text.trim().is_empty() {
        return Ok(out);
    }
    // The parser builds the whole document before a bound can apply, a few times the text's
    // size; only the lines up to the last sample that can be kept are handed to it.
    let (text, beyond) = cut_after_samples(text, max_metrics);
    out.truncated = beyond;
    // Errors of assembly (a TYPE line without samples, HELP of another family) come with the
    // families that were read; only a document the grammar cannot read at all gives none.
    let (families, error) = prom_text_format_parser::parse_scrape(text);
    if families.is_empty() {
        if let Some(error) = error {
            return Err(format!("Prometheus text: {}", scrape_error(&error)));
        }
    }
    let mut key = String::new();
    for family in &families {
        for sample in &family.samples {
            let suffix = match (family.kind, sample.value.value_type) {
                (Type::Histogram, ValueType::Sample) if !family.name.ends_with("_bucket") => {
                    "_bucket"
                }
                (_, ValueType::Sum) => "_sum",
                (_, ValueType::Count) => "_count",
                _ => "",
            };
            // The grammar only lets through what Rust's float parser reads, but a value that
            // were not would be skipped rather than trusted.
            let Some(value) = sample
                .value
                .value
                .parse::<f64>()
                .ok()
                .and_then(Number::from_f64)
            else {
                continue;
            };
            key.clear();
            key.push_str(&family.name);
            key.push_str(suffix);
            // The labels as written, escapes included: the key is the series as the
            // exposition spelt it, so `{path="a\"b"}` stays unambiguous.
            key.push_str(&sample.labels.to_string());
            out.insert(key.clone(), value, max_metrics);
        }
    }
    Ok(out)
}

/// `text` up to the end of its `max`th sample line (a line that is neither blank nor a
/// comment), and how many sample lines follow.
fn cut_after_samples(text: &str, max: usize) -> (&str, u64) {
    let mut samples = 0usize;
    let mut end = None;
    let mut beyond = 0u64;
    let mut at = 0;
    for line in text.split_inclusive('\n') {
        let start = line.trim_start();
        let is_sample = !start.is_empty() && !start.starts_with('#');
        at += line.len();
        if !is_sample {
            continue;
        }
        if samples < max {
            samples += 1;
            if samples == max {
                end = Some(at);
            }
        } else {
            beyond += 1;
        }
    }
    match end {
        Some(end) if beyond > 0 => (&text[..end], beyond),
        _ => (text, 0),
    }
}

/// The first line of what the grammar said, shortened: its messages can quote the input.
fn scrape_error(error: &prom_text_format_parser::ScrapeParseError) -> String {
    let text = match error {
        prom_text_format_parser::ScrapeParseError::Parse(message) => message.clone(),
        prom_text_format_parser::ScrapeParseError::Collect(errors) => errors
            .first()
            .map(|e| format!("line {}: {}", e.line_no.start, e.error))
            .unwrap_or_default(),
    };
    let line = text.lines().find(|l| !l.trim().is_empty()).unwrap_or("");
    let mut short: String = line.chars().take(200).collect();
    if short.len() < line.len() {
        short.push('…');
    }
    short
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::json;

    const DEFAULT_MAX_METRICS: usize = crate::config::DEFAULT_APP_MAX_METRICS as usize;

    fn keys(m: &AppMetrics) -> Vec<&str> {
        m.metrics.keys().map(String::as_str).collect()
    }

    #[test]
    fn nested_json_flattens_to_dotted_keys_and_keeps_numbers_as_written() {
        let body = br#"{"requests": 12, "db": {"open": 3, "pool": {"idle": 1.5}},
            "ready": true, "degraded": false, "version": "1.2", "none": null,
            "disks": [{"used": 7}, 8], "big": 18446744073709551615, "neg": -4}"#;
        let (format, m) = parse_body(body, None, DEFAULT_MAX_METRICS).unwrap();
        assert_eq!(format, Format::Json);
        assert_eq!(
            Value::Object(m.metrics.clone()),
            json!({"requests": 12, "db.open": 3, "db.pool.idle": 1.5, "ready": 1,
                   "degraded": 0, "disks.0.used": 7, "disks.1": 8,
                   "big": 18446744073709551615u64, "neg": -4})
        );
        assert_eq!(m.truncated, 0);
    }

    #[test]
    fn json_that_is_not_an_object_or_not_json_is_refused() {
        for (body, want) in [
            (
                &b"[1, 2]"[..],
                "JSON: invalid type: sequence, expected an object of numbers",
            ),
            (
                b"12",
                "JSON: invalid type: integer `12`, expected an object of numbers",
            ),
            (b"{\"a\": 1} trailing", "JSON: trailing characters"),
            (b"{\"a\": ", "JSON: EOF while parsing"),
            (b"{\"a\": NaN}", "JSON: expected value"),
        ] {
            let err = parse_body(body, Some("application/json"), 10)
                .unwrap_err()
                .to_string();
            assert!(err.starts_with("not JSON or Prometheus text: "), "{err}");
            assert!(err.contains(want), "{err}");
        }
        let deep = format!("{}1{}", "{\"a\":".repeat(200), "}".repeat(200));
        let err = parse_body(deep.as_bytes(), None, 10)
            .unwrap_err()
            .to_string();
        assert!(err.contains("recursion limit"), "{err}");
    }

    #[test]
    fn prometheus_text_gives_one_key_per_sample_with_its_labels() {
        let text = r#"# HELP http_requests_total Requests.
# TYPE http_requests_total counter
http_requests_total{method="get",code="200"} 1027 1395066363000
http_requests_total{method="post",code="400"} 3
# TYPE temperature gauge
temperature -3.5e1
# TYPE latency_seconds histogram
latency_seconds_bucket{le="0.1"} 2
latency_seconds_bucket{le="+Inf"} 5
latency_seconds_sum 1.5
latency_seconds_count 5
# TYPE rpc summary
rpc{quantile="0.5"} 0.2
rpc{quantile="0.9"} NaN
rpc_sum 9
rpc_count 40
escaped{path="a\"b,c}=d\\e\n"} 1
untyped_thing +Inf
"#;
        let m = parse_body(text.as_bytes(), Some("text/plain; version=0.0.4"), 100)
            .unwrap()
            .1;
        assert_eq!(
            keys(&m),
            [
                r#"http_requests_total{method="get",code="200"}"#,
                r#"http_requests_total{method="post",code="400"}"#,
                "temperature",
                r#"latency_seconds_bucket{le="0.1"}"#,
                r#"latency_seconds_bucket{le="+Inf"}"#,
                "latency_seconds_sum",
                "latency_seconds_count",
                r#"rpc{quantile="0.5"}"#,
                "rpc_sum",
                "rpc_count",
                r#"escaped{path="a\"b,c}=d\\e\n"}"#,
            ]
        );
        assert_eq!(m.metrics["temperature"], json!(-35.0));
        assert_eq!(
            m.metrics[r#"http_requests_total{method="get",code="200"}"#],
            json!(1027.0)
        );
    }

    #[test]
    fn a_family_without_samples_does_not_hide_the_others() {
        let text = "# TYPE empty counter\n# TYPE up gauge\nup 1\n";
        let m = prometheus_metrics(text, 10).unwrap();
        assert_eq!(keys(&m), ["up"]);
    }

    #[test]
    fn text_the_grammar_refuses_says_so() {
        let err = parse_body(b"this is not { metrics", Some("text/plain"), 10)
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("not JSON or Prometheus text: Prometheus text: "),
            "{err}"
        );
        let err = parse_body(b"<html>oops</html>", None, 10).unwrap_err();
        assert!(matches!(err, BodyError::Unreadable(_)), "{err}");
    }

    #[test]
    fn blank_bodies_are_pages_without_metrics() {
        for body in [&b""[..], b"\n\n", b"# just a comment\n"] {
            let (_, m) = parse_body(body, None, 10).unwrap();
            assert!(m.metrics.is_empty(), "{body:?}");
        }
        let (_, m) = parse_body(b"{}", None, 10).unwrap();
        assert!(m.metrics.is_empty());
    }

    #[test]
    fn the_content_type_wins_over_the_look_of_the_body() {
        let err = parse_body(b"up 1\n", Some("application/json"), 10).unwrap_err();
        assert!(err.to_string().contains("JSON"), "{err}");
        let (f, _) = parse_body(b"{\"a\":1}", Some("application/vnd.x+json"), 10).unwrap();
        assert_eq!(f, Format::Json);
        let (f, m) = parse_body(b"up 1\n", Some("application/octet-stream"), 10).unwrap();
        assert_eq!((f, keys(&m)), (Format::Prometheus, vec!["up"]));
        let (f, _) = parse_body(b"up 1\n", Some("Application/OpenMetrics-Text"), 10).unwrap();
        assert_eq!(f, Format::Prometheus);
    }

    #[test]
    fn invalid_utf8_names_the_offset() {
        let err = parse_body(b"up 1\nbad\xff 2\n", None, 10).unwrap_err();
        assert_eq!(err, BodyError::NotUtf8(8));
        assert_eq!(
            err.to_string(),
            "body is not UTF-8 text (invalid byte at offset 8)"
        );
    }

    #[test]
    fn bounds_cut_and_count() {
        let object: Map<String, Value> = (0..25).map(|i| (format!("m{i}"), json!(i))).collect();
        let text = Value::Object(object).to_string();
        let m = json_metrics(&text, 10).unwrap();
        assert_eq!((m.metrics.len(), m.truncated), (10, 15));
        assert_eq!(keys(&m)[9], "m9", "the first ones are kept");

        let lines: String = (0..25).map(|i| format!("m{i} {i}\n")).collect();
        let m = prometheus_metrics(&lines, 10).unwrap();
        assert_eq!((m.metrics.len(), m.truncated), (10, 15));

        let long = format!("{{\"{}\": 1, \"ok\": 2}}", "k".repeat(MAX_KEY_BYTES + 1));
        let m = json_metrics(&long, 10).unwrap();
        assert_eq!((keys(&m), m.truncated), (vec!["ok"], 1));
    }

    #[test]
    fn only_the_lines_up_to_the_last_kept_sample_are_parsed() {
        let text = "# TYPE a counter\na 1\n\n# TYPE b gauge\nb 2\nc 3\n# trailing\nd junk{\n";
        assert_eq!(
            cut_after_samples(text, 2),
            ("# TYPE a counter\na 1\n\n# TYPE b gauge\nb 2\n", 2)
        );
        assert_eq!(cut_after_samples(text, 4), (text, 0));
        assert_eq!(cut_after_samples("a 1", 1), ("a 1", 0));
        // What lies beyond the cut is counted, not read: junk there does not matter.
        let m = prometheus_metrics(text, 2).unwrap();
        assert_eq!((keys(&m), m.truncated), (vec!["a", "b"], 2));
    }

    #[test]
    fn a_repeated_series_keeps_its_first_value() {
        let m = prometheus_metrics("up 1\nup 0\n", 10).unwrap();
        assert_eq!((m.metrics["up"].clone(), m.truncated), (json!(1.0), 0));
    }

    /// JSON values nested a few levels, with keys that may contain dots and collide.
    fn json_tree() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i64>().prop_map(|n| json!(n)),
            (-1e9f64..1e9).prop_map(|f| json!(f)),
            "[a-z.]{0,4}".prop_map(Value::String),
        ];
        leaf.prop_recursive(4, 64, 6, |inner| {
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
                proptest::collection::vec(("[a-b.]{0,3}", inner), 0..6)
                    .prop_map(|entries| Value::Object(entries.into_iter().collect())),
            ]
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(1_500))]
        /// No bytes make the reader panic, and the bounds hold whatever it reads.
        #[test]
        fn arbitrary_bytes_never_panic(
            body in proptest::collection::vec(any::<u8>(), 0..512),
            content_type in proptest::option::of(
                proptest::sample::select(vec!["text/plain", "application/json", "x/y"])),
        ) {
            if let Ok((_, m)) = parse_body(&body, content_type, 5) {
                prop_assert!(m.metrics.len() <= 5);
            }
        }

        /// Text built from the format's own pieces (names, braces, quotes, escapes, numbers,
        /// comments) reaches deeper into the grammar than random bytes do.
        #[test]
        fn exposition_like_text_never_panics(
            pieces in proptest::collection::vec(proptest::sample::select(vec![
                "m", "_bucket", "_sum", "_count", "{", "}", "le", "=", "\"", "\\", "\\\"",
                "\\n", ",", " ", "\n", "\r", "\t", "# TYPE ", "# HELP ", "#", "histogram",
                "summary", "counter", "1", "-2.5e3", "NaN", "+Inf", "-inf", "1e", ".", "é",
                "quantile", "\u{0}",
            ]), 0..64),
        ) {
            let text: String = pieces.concat();
            let _ = parse_body(text.as_bytes(), Some("text/plain"), 50);
            let _ = parse_body(text.as_bytes(), None, 50);
        }

        /// Every number of a flat JSON object comes back under its own key.
        #[test]
        fn flat_json_numbers_come_back_under_their_keys(
            entries in proptest::collection::btree_map(
                "[a-zA-Z_][a-zA-Z0-9_]{0,20}",
                prop_oneof![
                    any::<i64>().prop_map(Number::from),
                    any::<u64>().prop_map(Number::from),
                    (-1e300f64..1e300).prop_map(|f| Number::from_f64(f).unwrap()),
                ],
                0..50,
            ),
        ) {
            let object: Map<String, Value> = entries
                .iter()
                .map(|(k, v)| (k.clone(), Value::Number(v.clone())))
                .collect();
            let text = Value::Object(object).to_string();
            let (format, m) = parse_body(text.as_bytes(), None, DEFAULT_MAX_METRICS).unwrap();
            prop_assert_eq!(format, Format::Json);
            prop_assert_eq!(m.metrics.len(), entries.len());
            for (k, v) in &entries {
                prop_assert_eq!(&m.metrics[k], &Value::Number(v.clone()));
            }
        }

        /// Nested documents flatten as a walk of their parsed tree does: dotted keys, array
        /// indexes, booleans as 0/1, strings and nulls left out, the first of equal keys kept.
        #[test]
        fn nested_json_flattens_as_its_tree_does(value in json_tree()) {
            fn walk(v: &Value, key: String, out: &mut Map<String, Value>) {
                let join = |k: &str| if key.is_empty() { k.to_owned() } else { format!("{key}.{k}") };
                match v {
                    Value::Number(_) => { out.entry(key).or_insert(v.clone()); }
                    Value::Bool(b) => { out.entry(key).or_insert(json!(u8::from(*b))); }
                    Value::Object(m) => m.iter().for_each(|(k, v)| walk(v, join(k), out)),
                    Value::Array(a) => a.iter().enumerate().for_each(|(i, v)| walk(v, join(&i.to_string()), out)),
                    Value::String(_) | Value::Null => {}
                }
            }
            let object = json!({"root": value, "n": 1});
            let mut want = Map::new();
            walk(&object, String::new(), &mut want);
            let got = json_metrics(&object.to_string(), DEFAULT_MAX_METRICS).unwrap();
            prop_assert_eq!(got.metrics, want);
        }

        /// Every sample of simple exposition text comes back under its name.
        #[test]
        fn prometheus_samples_come_back_under_their_names(
            entries in proptest::collection::btree_map(
                "[a-zA-Z_:][a-zA-Z0-9_:]{0,20}", -1e12f64..1e12, 1..50),
        ) {
            let text: String = entries.iter().map(|(k, v)| format!("{k} {v}\n")).collect();
            let m = prometheus_metrics(&text, DEFAULT_MAX_METRICS).unwrap();
            prop_assert_eq!(m.metrics.len(), entries.len());
            for (k, v) in &entries {
                prop_assert_eq!(m.metrics[k].as_f64(), Some(*v));
            }
        }
    }
}
