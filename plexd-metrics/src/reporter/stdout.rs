//! The sink used when no control plane is configured: one JSON batch per line.

use std::io::Write;
use std::sync::Mutex;

use async_trait::async_trait;

use super::MetricReporter;
use crate::api::MetricPoint;
use crate::collector::BoxError;

/// Writes each batch as one line of JSON (the API's array) to a writer, stdout by default.
pub struct StdoutReporter {
    out: Mutex<Box<dyn Write + Send>>,
}

impl StdoutReporter {
    /// A sink writing to the process's stdout.
    pub fn new() -> Self {
        Self::to_writer(Box::new(std::io::stdout()))
    }

    /// A sink writing to `out`.
    pub fn to_writer(out: Box<dyn Write + Send>) -> Self {
        Self {
            out: Mutex::new(out),
        }
    }
}

impl Default for StdoutReporter {
    fn default() -> Self {
        Self::new()
    }
}

#[async_trait]
impl MetricReporter for StdoutReporter {
    async fn report_metrics(&self, _node_id: &str, batch: &[MetricPoint]) -> Result<(), BoxError> {
        let mut line = serde_json::to_vec(batch)?;
        line.push(b'\n');
        let mut out = self.out.lock().map_err(|_| "stdout sink: lock poisoned")?;
        // One write of the whole line, so batches never interleave with each other.
        out.write_all(&line)
            .and_then(|()| out.flush())
            .map_err(|e| format!("stdout sink: {e}"))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[derive(Clone, Default)]
    struct Shared(Arc<Mutex<Vec<u8>>>);
    impl Write for Shared {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[tokio::test]
    async fn one_line_per_batch_parsable_as_the_api_array() {
        let buf = Shared::default();
        let r = StdoutReporter::to_writer(Box::new(buf.clone()));
        let p = MetricPoint::new(
            chrono::Utc::now(),
            "agent",
            "",
            &serde_json::json!({"a": 1}),
        )
        .unwrap();
        r.report_metrics("n", &[p.clone(), p.clone()])
            .await
            .unwrap();
        r.report_metrics("n", std::slice::from_ref(&p))
            .await
            .unwrap();
        let text = String::from_utf8(buf.0.lock().unwrap().clone()).unwrap();
        let lines: Vec<_> = text.lines().collect();
        assert_eq!(lines.len(), 2);
        let first: Vec<MetricPoint> = serde_json::from_str(lines[0]).unwrap();
        assert_eq!(first, vec![p.clone(), p]);
    }
}
