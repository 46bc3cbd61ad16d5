//! What the queue's tests share: a scratch directory and numbered points.

use std::path::PathBuf;

use uuid::Uuid;

use crate::api::MetricPoint;

/// A directory under the system's temporary directory, removed on drop.
pub(crate) struct TestDir(pub(crate) PathBuf);

impl TestDir {
    pub(crate) fn new() -> Self {
        let dir = std::env::temp_dir().join(format!("plexd-queue-{}", Uuid::new_v4()));
        std::fs::create_dir(&dir).unwrap();
        Self(dir)
    }

    /// The names in the directory that end with `suffix`, sorted.
    pub(crate) fn files(&self, suffix: &str) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(&self.0)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .filter(|n| n.ends_with(suffix))
            .collect();
        names.sort();
        names
    }
}

impl Drop for TestDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// `system` points whose data is `{"n": n}`, one per number of `range`.
pub(crate) fn numbered(range: std::ops::RangeInclusive<u64>) -> Vec<MetricPoint> {
    padded(range, 0)
}

/// Like [`numbered`], each point's data carrying `pad` bytes more.
pub(crate) fn padded(range: std::ops::RangeInclusive<u64>, pad: usize) -> Vec<MetricPoint> {
    range
        .map(|n| {
            let data = if pad == 0 {
                serde_json::json!({"n": n})
            } else {
                serde_json::json!({"n": n, "pad": "x".repeat(pad)})
            };
            MetricPoint::new(chrono::Utc::now(), "system", "", &data).unwrap()
        })
        .collect()
}

/// The numbers of points made by [`numbered`].
pub(crate) fn ns(points: &[MetricPoint]) -> Vec<u64> {
    points
        .iter()
        .map(|p| p.data.to_value()["n"].as_u64().unwrap())
        .collect()
}
