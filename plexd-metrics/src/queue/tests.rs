//! The queue against a real directory (no privileges needed): restarts, damage, bounds.

use super::*;
use proptest::prelude::*;

/// A directory under the system's temporary directory, removed on drop.
struct TestDir(PathBuf);

impl TestDir {
    fn new() -> Self {
        let dir = std::env::temp_dir().join(format!("plexd-queue-{}", Uuid::new_v4()));
        std::fs::create_dir(&dir).unwrap();
        Self(dir)
    }

    fn files(&self, suffix: &str) -> Vec<String> {
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

fn limits(batch_size: usize, max_points: usize) -> QueueLimits {
    QueueLimits {
        batch_size,
        max_points,
        max_bytes: 1 << 30,
    }
}

fn numbered(range: std::ops::RangeInclusive<u64>) -> Vec<MetricPoint> {
    range
        .map(|n| {
            MetricPoint::new(
                chrono::Utc::now(),
                "system",
                "",
                &serde_json::json!({"n": n}),
            )
            .unwrap()
        })
        .collect()
}

fn ns(points: &[MetricPoint]) -> Vec<u64> {
    points
        .iter()
        .map(|p| p.data.to_value()["n"].as_u64().unwrap())
        .collect()
}

/// Takes every batch from the head, as a destination that accepts all would.
fn drain(q: &mut DeliveryQueue) -> Vec<(Uuid, Vec<u64>)> {
    let mut out = Vec::new();
    while let Some((key, points)) = q.head() {
        out.push((key, ns(&points)));
        q.pop();
    }
    out
}

#[test]
fn the_queue_trims_from_the_oldest_but_never_the_batch_in_flight() {
    let mut q = DeliveryQueue::in_memory(limits(3, 5));
    q.collected(numbered(1..=6));
    assert_eq!(q.seal(true), 1, "one point over the bound");
    let (head, second) = (q.batches[0].key, q.batches[1].key);
    let points = |q: &DeliveryQueue, i: usize| ns(q.batches[i].points.as_ref().unwrap());
    assert_eq!(points(&q, 0), [1, 2, 3], "the head is in flight");
    assert_eq!(points(&q, 1), [5, 6]);
    assert_eq!(q.batches[1].key, second, "a trimmed batch keeps its key");
    q.collected(numbered(7..=9));
    assert_eq!(q.seal(false), 3);
    assert_ne!(q.batches[0].key, head);
    assert_eq!(
        drain(&mut q)
            .into_iter()
            .flat_map(|(_, p)| p)
            .collect::<Vec<_>>(),
        [5, 6, 7, 8, 9]
    );
    assert_eq!(q.queued_points(), 0);
}

#[test]
fn a_restart_sends_the_stored_batches_first_under_their_keys_then_the_unsealed_points() {
    let dir = TestDir::new();
    let mut q = DeliveryQueue::open(&dir.0, limits(2, 100)).unwrap();
    assert_eq!(q.state(), QueueState::Disk(dir.0.clone()));
    q.collected(numbered(1..=3));
    q.seal(false);
    let keys: Vec<Uuid> = q.batches.iter().map(|b| b.key).collect();
    q.collected(numbered(4..=5));
    assert_eq!(
        q.spooled_points(),
        5,
        "three in batches, two in the journal"
    );
    assert_eq!(dir.files(".batch").len(), 2);
    drop(q); // a kill: nothing more is written

    let mut q = DeliveryQueue::open(&dir.0, limits(2, 100)).unwrap();
    assert_eq!(
        (q.queued_points(), q.buffered(), q.spooled_points()),
        (3, 2, 5)
    );
    let first = q.head().unwrap();
    assert_eq!((first.0, ns(&first.1)), (keys[0], vec![1, 2]));
    q.pop();
    assert_eq!(
        dir.files(".batch").len(),
        1,
        "a delivered batch's file goes"
    );
    q.seal(false);
    let rest = drain(&mut q);
    assert_eq!(rest[0], (keys[1], vec![3]));
    assert_eq!(rest[1].1, [4, 5]);
    assert!(dir.files(".batch").is_empty());
    assert_eq!(q.spooled_points(), 0);
    assert_eq!(q.corrupt_batches(), 0);
}

#[test]
fn damaged_and_foreign_files_are_set_aside_counted_and_the_rest_delivered() {
    let dir = TestDir::new();
    let mut q = DeliveryQueue::open(&dir.0, limits(1, 100)).unwrap();
    q.collected(numbered(1..=5));
    q.seal(false);
    drop(q);
    let batches = dir.files(".batch");
    assert_eq!(batches.len(), 5);
    let path = |i: usize| dir.0.join(&batches[i]);
    // A flipped byte in the first, the second cut short, the fourth all zeros.
    let mut bytes = std::fs::read(path(0)).unwrap();
    bytes[50] ^= 0x20;
    std::fs::write(path(0), bytes).unwrap();
    let len = std::fs::metadata(path(1)).unwrap().len();
    std::fs::File::options()
        .write(true)
        .open(path(1))
        .unwrap()
        .set_len(len - 3)
        .unwrap();
    let len = std::fs::metadata(path(3)).unwrap().len() as usize;
    std::fs::write(path(3), vec![0; len]).unwrap();
    // A file of someone else's, and one that only looks like a batch.
    std::fs::write(dir.0.join("notes.txt"), "hello").unwrap();
    std::fs::write(dir.0.join("x.batch"), "hello").unwrap();

    let mut q = DeliveryQueue::open(&dir.0, limits(1, 100)).unwrap();
    assert_eq!(q.corrupt_batches(), 2, "the foreign file and the bad name");
    let delivered: Vec<u64> = drain(&mut q).into_iter().flat_map(|(_, p)| p).collect();
    assert_eq!(delivered, [3, 5], "every intact batch, in order");
    assert_eq!(q.corrupt_batches(), 5);
    assert_eq!(
        dir.files(".corrupt").len(),
        4,
        "three damaged batches and the bad name set aside"
    );
    assert!(
        dir.0.join("notes.txt").exists(),
        "someone else's file is left alone"
    );
    drop(q);
    // The next start finds nothing more to complain about than the foreign file.
    let q = DeliveryQueue::open(&dir.0, limits(1, 100)).unwrap();
    assert_eq!((q.corrupt_batches(), q.queued_points()), (1, 0));
}

#[test]
fn a_journal_of_another_layout_is_set_aside_and_the_queue_starts() {
    let dir = TestDir::new();
    std::fs::write(dir.0.join("journal"), b"PXMJ\x09\x00\x00\x00rest").unwrap();
    let mut q = DeliveryQueue::open(&dir.0, limits(10, 100)).unwrap();
    assert_eq!(q.corrupt_batches(), 1);
    assert!(dir.0.join("journal.corrupt").exists());
    q.collected(numbered(1..=2));
    q.seal(false);
    assert_eq!(drain(&mut q)[0].1, [1, 2]);
}

#[test]
fn beyond_max_bytes_the_oldest_files_go_but_not_the_one_in_flight() {
    let dir = TestDir::new();
    let mut q = DeliveryQueue::open(&dir.0, limits(1, 100)).unwrap();
    q.collected(numbered(1..=1));
    q.seal(false);
    let one = q.spooled_bytes();
    q.limits.max_bytes = one * 3;
    q.collected(numbered(2..=6));
    let dropped = q.seal(true);
    assert!(
        q.spooled_bytes() <= one * 3,
        "{} > {}",
        q.spooled_bytes(),
        one * 3
    );
    assert_eq!(dropped, 3);
    let left: Vec<u64> = drain(&mut q).into_iter().flat_map(|(_, p)| p).collect();
    assert_eq!(
        left,
        [1, 5, 6],
        "the head was in flight; the oldest behind it went"
    );
    assert!(dir.files(".batch").is_empty());
}

#[test]
fn a_missing_directory_leaves_the_queue_in_memory_until_it_appears() {
    let dir = TestDir::new();
    let missing = dir.0.join("later");
    let mut q = DeliveryQueue::open(&missing, limits(10, 100)).unwrap();
    match q.state() {
        QueueState::DiskUnavailable { dir, error } => {
            assert_eq!(dir, missing);
            assert!(error.contains("create the directory"), "{error}");
        }
        other => panic!("{other:?}"),
    }
    q.collected(numbered(1..=2));
    q.seal(false);
    assert_eq!(q.spooled_points(), 0);
    std::fs::create_dir(&missing).unwrap();
    // The retry waits for DISK_RETRY; pretend it has passed.
    if let Disk::Broken { retry_at, .. } = &mut q.disk {
        *retry_at = Instant::now();
    }
    q.collected(numbered(3..=4));
    q.seal(false);
    assert_eq!(q.state(), QueueState::Disk(missing.clone()));
    assert_eq!(q.spooled_points(), 2, "new batches go to the directory");
    let all: Vec<u64> = drain(&mut q).into_iter().flat_map(|(_, p)| p).collect();
    assert_eq!(all, [1, 2, 3, 4]);
}

#[test]
fn another_agents_directory_is_refused() {
    let dir = TestDir::new();
    let _held = DeliveryQueue::open(&dir.0, limits(10, 100)).unwrap();
    let err = DeliveryQueue::open(&dir.0, limits(10, 100)).err().unwrap();
    assert!(
        err.to_string().contains("in use by another plexd-metrics"),
        "{err}"
    );
}

/// What a run does to the queue between two restarts.
#[derive(Clone, Debug)]
enum Step {
    Collect(u8),
    Seal,
    Deliver,
    /// The head is sent and the process dies before the answer: the destination has it.
    SendThenKill,
    Restart,
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        4 => (1u8..5).prop_map(Step::Collect),
        2 => Just(Step::Seal),
        2 => Just(Step::Deliver),
        1 => Just(Step::SendThenKill),
        1 => Just(Step::Restart),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    /// Against a model (a list of points and the batches they were sealed into): across any
    /// sequence of collects, seals, deliveries and kills, every point reaches a destination
    /// that drops repeated keys exactly once, in order, and a key always names the same points.
    #[test]
    fn restarts_lose_and_repeat_nothing(steps in prop::collection::vec(step(), 1..40), batch in 1usize..4) {
        let dir = TestDir::new();
        let mut q = DeliveryQueue::open(&dir.0, limits(batch, 1000)).unwrap();
        let mut next = 1u64;
        let mut delivered: Vec<u64> = Vec::new();
        let mut keys: std::collections::HashMap<Uuid, Vec<u64>> = Default::default();
        for s in steps.iter().chain([Step::Seal].iter()) {
            match s {
                Step::Collect(n) => {
                    let n = u64::from(*n);
                    q.collected(numbered(next..=next + n - 1));
                    next += n;
                }
                Step::Seal => { q.seal(false); }
                Step::Deliver | Step::SendThenKill => {
                    if let Some((key, points)) = q.head() {
                        let points = ns(&points);
                        match keys.insert(key, points.clone()) {
                            Some(before) => prop_assert_eq!(before, points, "a key names one batch"),
                            None => delivered.extend(points),
                        }
                        if matches!(s, Step::Deliver) {
                            q.pop();
                        } else {
                            drop(q);
                            q = DeliveryQueue::open(&dir.0, limits(batch, 1000)).unwrap();
                        }
                    }
                }
                Step::Restart => {
                    drop(q);
                    q = DeliveryQueue::open(&dir.0, limits(batch, 1000)).unwrap();
                }
            }
        }
        for (key, points) in drain(&mut q) {
            match keys.insert(key, points.clone()) {
                Some(before) => prop_assert_eq!(before, points),
                None => delivered.extend(points),
            }
        }
        prop_assert_eq!(delivered, (1..next).collect::<Vec<_>>());
        prop_assert_eq!(q.corrupt_batches(), 0);
    }
}
