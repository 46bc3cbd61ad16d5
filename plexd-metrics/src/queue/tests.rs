//! The queue against a real directory (no privileges needed): restarts, damage, bounds.

use super::fixtures::{ns, numbered, padded, TestDir};
use super::*;
use proptest::prelude::*;

fn limits(batch_size: usize, max_points: usize) -> QueueLimits {
    QueueLimits {
        batch_size,
        max_points,
        max_bytes: 1 << 30,
        max_memory_bytes: 1 << 30,
    }
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

fn batch_at(q: &DeliveryQueue, i: usize) -> (Uuid, Vec<u64>) {
    let b = &q.batches[i];
    (b.key, ns(b.points.as_ref().expect("in memory")))
}

/// One batch record of `points`, numbered from 0.
fn batch_record(points: &[MetricPoint]) -> Vec<u8> {
    let mut out = Vec::new();
    record::encode(&mut out, record::Kind::Batch, 0, Uuid::new_v4(), points);
    out
}

fn log_bytes(dir: &TestDir) -> u64 {
    dir.files(".log")
        .iter()
        .map(|n| std::fs::metadata(dir.0.join(n)).unwrap().len())
        .sum()
}

#[test]
fn the_queue_trims_from_the_oldest_but_never_the_batch_in_flight() {
    let mut q = DeliveryQueue::in_memory(limits(3, 5));
    q.buffer = numbered(1..=6);
    assert_eq!(q.seal(true), 1, "one point over the bound");
    let (head, second) = (batch_at(&q, 0), batch_at(&q, 1));
    assert_eq!(head.1, [1, 2, 3], "the head is in flight");
    assert_eq!(second.1, [5, 6]);
    q.buffer = numbered(7..=9);
    assert_eq!(q.seal(false), 3);
    assert_eq!(batch_at(&q, 0).0, second.0, "a trimmed batch keeps its key");
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
fn big_points_are_trimmed_by_the_memory_bound_before_the_count_bound() {
    // Points of 100 KiB each (an app endpoint's page), a bound of 1 MiB: about ten fit,
    // far fewer than max_points.
    let mut q = DeliveryQueue::in_memory(QueueLimits {
        max_memory_bytes: 1 << 20,
        ..limits(5, 10_000)
    });
    let mut dropped = 0;
    for cycle in 0..8 {
        q.buffer = padded(cycle * 5 + 1..=cycle * 5 + 5, 100 << 10);
        dropped += q.seal(false);
    }
    let kept = q.queued_points();
    assert_eq!(
        kept + dropped,
        40,
        "every point is kept or counted as dropped"
    );
    assert!(
        (9..=10).contains(&kept),
        "{kept} points of 100 KiB under 1 MiB"
    );
    let numbers: Vec<u64> = drain(&mut q).into_iter().flat_map(|(_, p)| p).collect();
    let newest: Vec<u64> = (41 - kept as u64..=40).collect();
    assert_eq!(numbers, newest, "the oldest went first");
    // Small points are bounded by their number as before.
    let mut q = DeliveryQueue::in_memory(limits(5, 12));
    q.buffer = numbered(1..=20);
    assert_eq!(q.seal(false), 8);
}

#[test]
fn a_cycle_that_completes_a_batch_goes_straight_into_the_seal() {
    let dir = TestDir::new();
    let mut q = DeliveryQueue::open(&dir.0, limits(4, 100)).unwrap();
    q.collected(numbered(1..=3), false);
    assert_eq!(
        (q.buffered(), q.spooled_points()),
        (3, 3),
        "a points record"
    );
    let journaled = log_bytes(&dir);
    q.collected(numbered(4..=9), false);
    assert_eq!(q.buffered(), 0);
    assert_eq!(q.spooled_points(), 9);
    let sealed = log_bytes(&dir) - journaled;
    // Points 4..9 were written once, in the seal; 1..3 again in their batch.
    let once = batch_record(&numbered(1..=9)).len() as u64;
    assert!(
        sealed < once + 3 * record::HEADER as u64 + 64,
        "{sealed} bytes for the seal"
    );
    let got = drain(&mut q);
    assert_eq!(
        got.iter().map(|(_, p)| p.clone()).collect::<Vec<_>>(),
        [vec![1, 2, 3, 4], vec![5, 6, 7, 8], vec![9]]
    );
}

#[test]
fn a_restart_sends_the_stored_batches_first_under_their_keys_then_the_unsealed_points() {
    let dir = TestDir::new();
    let mut q = DeliveryQueue::open(&dir.0, limits(2, 100)).unwrap();
    assert_eq!(q.state(), QueueState::Disk(dir.0.clone()));
    q.buffer = numbered(1..=3);
    q.seal(false);
    let keys = [batch_at(&q, 0).0, batch_at(&q, 1).0];
    q.collected(numbered(4..=4), false);
    assert_eq!(
        q.spooled_points(),
        4,
        "three in batches, one collected since"
    );
    drop(q); // a kill: nothing more is written

    let mut q = DeliveryQueue::open(&dir.0, limits(2, 100)).unwrap();
    assert_eq!(
        (q.queued_points(), q.buffered(), q.spooled_points()),
        (3, 1, 4)
    );
    let first = q.head().unwrap();
    assert_eq!((first.0, ns(&first.1)), (keys[0], vec![1, 2]));
    q.pop();
    drop(q); // a kill after the first batch was delivered

    let mut q = DeliveryQueue::open(&dir.0, limits(2, 100)).unwrap();
    assert_eq!(q.queued_points(), 1, "the cursor skips the delivered batch");
    let second = q.head().unwrap();
    assert_eq!((second.0, ns(&second.1)), (keys[1], vec![3]));
    q.pop();
    q.collected(numbered(5..=5), false);
    let rest = drain(&mut q);
    assert_eq!(rest[0].1, [4, 5]);
    assert_eq!(q.spooled_points(), 0);
    assert_eq!(q.corrupt_batches(), 0);
}

#[test]
fn damaged_records_and_foreign_files_are_skipped_counted_and_the_rest_delivered() {
    let dir = TestDir::new();
    let mut q = DeliveryQueue::open(&dir.0, limits(1, 100)).unwrap();
    q.buffer = numbered(1..=5);
    q.seal(false);
    drop(q);
    let segments = dir.files(".log");
    assert_eq!(segments.len(), 1);
    let path = dir.0.join(&segments[0]);
    let mut bytes = std::fs::read(&path).unwrap();
    let (found, _) = record::scan(&bytes);
    assert_eq!(found.len(), 5);
    // A flipped bit in the second batch's payload, the fourth's overwritten with zeros.
    bytes[found[1].0 + record::HEADER + 5] ^= 0x20;
    let (at, h) = found[3];
    bytes[at + record::HEADER..at + h.record_len() as usize].fill(0);
    std::fs::write(&path, &bytes).unwrap();
    // A file of someone else's, a segment of zeros, one that only looks like a segment.
    std::fs::write(dir.0.join("notes.txt"), "hello").unwrap();
    std::fs::write(dir.0.join(format!("{:020}.log", 1000)), [0; 300]).unwrap();
    std::fs::write(dir.0.join("x.log"), "hello").unwrap();

    let mut q = DeliveryQueue::open(&dir.0, limits(1, 100)).unwrap();
    assert_eq!(
        q.corrupt_batches(),
        3,
        "the foreign file, the zeros, the bad name"
    );
    let delivered: Vec<u64> = drain(&mut q).into_iter().flat_map(|(_, p)| p).collect();
    assert_eq!(delivered, [1, 3, 5], "every intact batch, in order");
    assert_eq!(q.corrupt_batches(), 5);
    assert_eq!(
        dir.files(".corrupt").len(),
        2,
        "the zeros and the bad name set aside"
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
fn a_log_of_another_layout_is_set_aside_and_the_queue_starts() {
    let dir = TestDir::new();
    let mut other = batch_record(&numbered(1..=1));
    other[4] = 9;
    std::fs::write(dir.0.join(format!("{:020}.log", 0)), other).unwrap();
    let mut q = DeliveryQueue::open(&dir.0, limits(10, 100)).unwrap();
    assert_eq!(q.corrupt_batches(), 1);
    assert_eq!(dir.files(".corrupt").len(), 1);
    q.collected(numbered(1..=2), false);
    q.seal(false);
    assert_eq!(drain(&mut q)[0].1, [1, 2]);
}

#[test]
fn beyond_max_bytes_the_oldest_segments_go_but_not_the_one_in_flight() {
    let dir = TestDir::new();
    // 1 MiB: segments of 128 KiB.
    let mut q = DeliveryQueue::open(
        &dir.0,
        QueueLimits {
            batch_size: 50,
            max_points: 10,
            max_bytes: 1 << 20,
            max_memory_bytes: 1 << 30,
        },
    )
    .unwrap();
    let big = |range| padded(range, 900);
    q.buffer = big(1..=50);
    q.seal(false);
    let head = q.head().unwrap();
    assert_eq!(ns(&head.1)[0], 1);
    let mut dropped = 0;
    let mut next = 51;
    while next < 3000 {
        q.buffer = big(next..=next + 49);
        next += 50;
        dropped += q.seal(true);
        assert!(q.spooled_bytes() <= 1 << 20, "{} bytes", q.spooled_bytes());
    }
    assert!(dropped > 0);
    let left: Vec<u64> = drain(&mut q).into_iter().flat_map(|(_, p)| p).collect();
    assert_eq!(
        left[..50],
        (1..=50).collect::<Vec<_>>()[..],
        "the head was in flight"
    );
    assert_eq!(
        left.len() + dropped,
        next as usize - 1,
        "each point kept or counted"
    );
    assert!(
        left.windows(2).all(|w| w[0] < w[1]),
        "the newest kept, in order"
    );
    assert_eq!(*left.last().unwrap(), next - 1);
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
    q.collected(numbered(1..=2), false);
    q.seal(false);
    assert_eq!(q.spooled_points(), 0);
    std::fs::create_dir(&missing).unwrap();
    // The retry waits for DISK_RETRY; pretend it has passed.
    if let Disk::Broken { retry_at, .. } = &mut q.disk {
        *retry_at = Instant::now();
    }
    q.collected(numbered(3..=4), false);
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
                    q.collected(numbered(next..=next + n - 1), false);
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
