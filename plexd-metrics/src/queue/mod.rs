//! The delivery queue: points collected but not yet sealed into a batch (the buffer), then
//! batches waiting for their destination to accept them, oldest first.
//!
//! Without `metrics.queue.dir` everything lives in memory, bounded by
//! `metrics.queue.max_points`. With it, the queue is durable: each collect cycle's points are
//! synced to the directory's journal as they are collected, each batch is a file from the
//! moment it is sealed until its destination takes it, and a restart after any stop sends the
//! stored batches first, in order, under the keys they had. Only the head batch and batches
//! that fit in `max_points` are kept in memory as well, so a long outage costs disk, not
//! memory; the disk is bounded by `metrics.queue.max_bytes`.
//!
//! The disk never stops the agent: when a write fails (full, read-only, gone), the queue
//! carries on in memory, says so once, and tries the directory again at a later seal. Only a
//! directory that another agent holds is fatal, and only at start (two agents would send the
//! same batches).
//!
//! The queue does no networking; the Manager owns the one request in flight and tells the
//! queue how it ended.

#[cfg(test)]
mod fixtures;
pub mod record;
pub mod spool;

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;
use tracing::{debug, error, info, warn};
use uuid::Uuid;

use crate::api::MetricPoint;
use spool::{Located, Spool, SpoolError};

/// How long the queue runs from memory after a disk error before it tries the directory again.
pub const DISK_RETRY: Duration = Duration::from_secs(30);

/// The bounds of a queue.
#[derive(Clone, Copy, Debug)]
pub struct QueueLimits {
    /// Most points in one batch.
    pub batch_size: usize,
    /// Most points held in memory (all of them without a directory).
    pub max_points: usize,
    /// Most bytes those points may take in memory: points differ in size by orders of
    /// magnitude (an `app` point can carry thousands of metrics), so a bound on their number
    /// alone does not bound the memory.
    pub max_memory_bytes: usize,
    /// Most bytes in the directory.
    pub max_bytes: u64,
}

/// Where the queue keeps its batches, for readiness and `--check-config`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum QueueState {
    /// In memory, as configured.
    Memory,
    /// In the directory.
    Disk(PathBuf),
    /// A directory is configured but cannot be used now; in memory until it can.
    DiskUnavailable {
        /// The directory.
        dir: PathBuf,
        /// The error and what to do about it.
        error: String,
    },
}

/// One batch waiting for delivery. Its key goes with every attempt, so a destination that
/// took it once but whose answer was lost can drop the repeat.
#[derive(Debug)]
struct Batch {
    key: Uuid,
    /// Points in the batch.
    count: usize,
    /// What its points take in memory ([`point_bytes`]), counted while they are there.
    bytes: usize,
    /// In memory: always without a record in the log, otherwise while there is room or
    /// since it came to the head.
    points: Option<Arc<Vec<MetricPoint>>>,
    /// Its record in the log, if it has one.
    stored: Option<Located>,
}

enum Disk {
    /// No directory configured.
    Off,
    /// Writing to the directory.
    Ready(Spool),
    /// The directory failed; in memory until `retry_at`. The spool is kept when it was open
    /// (its lock too), so that a retry is just the next write.
    Broken {
        spool: Option<Spool>,
        dir: PathBuf,
        error: String,
        retry_at: Instant,
    },
}

/// The buffer and the batches behind it, in memory or in a directory.
pub struct DeliveryQueue {
    limits: QueueLimits,
    buffer: Vec<MetricPoint>,
    /// Ordinal of `buffer[0]` (or of the next point collected).
    buffer_first: u64,
    /// Points of the buffer that are in the log.
    journaled: usize,
    batches: VecDeque<Batch>,
    queued_points: usize,
    /// Points held in memory by batches without a record: what `max_points` bounds.
    memory_points: usize,
    /// Points held in memory by batches with a record.
    cached_points: usize,
    /// Bytes of the points that `memory_points` counts.
    memory_bytes: usize,
    /// Bytes of the points that `cached_points` counts.
    cached_bytes: usize,
    /// Points of the batches with a record.
    stored_points: u64,
    corrupt: u64,
    disk: Disk,
    /// Failures of the directory since it last worked.
    disk_failures: u32,
}

impl DeliveryQueue {
    /// A queue in memory only.
    pub fn in_memory(limits: QueueLimits) -> Self {
        Self {
            limits,
            buffer: Vec::new(),
            buffer_first: 0,
            journaled: 0,
            batches: VecDeque::new(),
            queued_points: 0,
            memory_points: 0,
            cached_points: 0,
            memory_bytes: 0,
            cached_bytes: 0,
            stored_points: 0,
            corrupt: 0,
            disk: Disk::Off,
            disk_failures: 0,
        }
    }

    /// A durable queue in `dir`, with what an earlier run left there queued first. Fails only
    /// when another agent holds `dir`; any other problem leaves the queue in memory (logged,
    /// and tried again later).
    pub fn open(dir: &Path, limits: QueueLimits) -> Result<Self, SpoolError> {
        let mut queue = Self::in_memory(limits);
        match Spool::open(dir, queue.segment_bytes()) {
            Ok((spool, recovered)) => {
                queue.adopt(spool, recovered);
                info!(
                    component = "metrics",
                    dir = %dir.display(),
                    batches = queue.batches.len(),
                    points = queue.spooled_points(),
                    bytes = queue.spooled_bytes(),
                    "durable queue opened; what it holds is sent first"
                );
            }
            Err(e @ SpoolError::Locked { .. }) => return Err(e),
            Err(e) => queue.broke(None, &e),
        }
        Ok(queue)
    }

    fn segment_bytes(&self) -> u64 {
        spool::SEGMENT_BYTES.min(self.limits.max_bytes / 8)
    }

    /// Takes over an opened directory: its batches go behind those queued in memory, its
    /// unsealed points before the buffer's.
    fn adopt(&mut self, spool: Spool, recovered: spool::Recovered) {
        if !recovered.damaged.is_empty() {
            self.corrupt += recovered.damaged.len() as u64;
            warn!(
                component = "metrics",
                dir = %spool.dir().display(),
                damaged = ?recovered.damaged,
                "durable queue: damaged or foreign files set aside or skipped; the rest is delivered"
            );
        }
        for at in recovered.batches {
            let count = at.header.points() as usize;
            self.queued_points += count;
            self.stored_points += count as u64;
            self.batches.push_back(Batch {
                key: at.header.key,
                count,
                bytes: 0,
                points: None,
                stored: Some(at),
            });
        }
        self.journaled = recovered.unsealed.len();
        let mut buffer = recovered.unsealed;
        buffer.append(&mut self.buffer);
        self.buffer = buffer;
        self.buffer_first = recovered.next;
        self.disk = Disk::Ready(spool);
    }

    /// The bounds the queue keeps.
    pub fn limits(&self) -> &QueueLimits {
        &self.limits
    }

    /// Where the batches are kept now.
    pub fn state(&self) -> QueueState {
        match &self.disk {
            Disk::Off => QueueState::Memory,
            Disk::Ready(spool) => QueueState::Disk(spool.dir().to_owned()),
            Disk::Broken { dir, error, .. } => QueueState::DiskUnavailable {
                dir: dir.clone(),
                error: error.clone(),
            },
        }
    }

    /// Adds one collect cycle's points. With a directory they are on disk before this
    /// returns: in a points record, or, when they complete a batch, in the seal this makes at
    /// once (as [`DeliveryQueue::seal`], whose trim's dropped points are returned).
    pub fn collected(&mut self, points: Vec<MetricPoint>, head_in_flight: bool) -> usize {
        if points.is_empty() {
            return 0;
        }
        if self.buffer.len() + points.len() >= self.limits.batch_size {
            if self.buffer.is_empty() {
                // A cycle that fills a batch by itself: its vector becomes the buffer as is.
                self.buffer = points;
            } else {
                self.buffer.extend(points);
            }
            return self.seal(head_in_flight);
        }
        if let Disk::Ready(spool) = &mut self.disk {
            let first = self.buffer_first + self.buffer.len() as u64;
            match spool.append_points(first, &points) {
                Ok(()) => self.journaled += points.len(),
                Err(e) => self.fail(&e),
            }
        }
        self.buffer.extend(points);
        0
    }

    /// Points collected and not yet sealed into a batch.
    pub fn buffered(&self) -> usize {
        self.buffer.len()
    }

    /// Seals the buffer into batches of at most `batch_size` points, each with a fresh key
    /// (with a directory, appended together with one sync), and trims the queue to its
    /// bounds. Returns the points dropped by the trim.
    pub fn seal(&mut self, head_in_flight: bool) -> usize {
        if !self.buffer.is_empty() {
            self.retry_disk();
            let first = self.buffer_first;
            let mut points = std::mem::take(&mut self.buffer).into_iter().peekable();
            let mut keys = fresh_keys(points.len().div_ceil(self.limits.batch_size));
            let mut batches: Vec<(Uuid, Vec<MetricPoint>)> = Vec::new();
            while points.peek().is_some() {
                let batch: Vec<MetricPoint> =
                    points.by_ref().take(self.limits.batch_size).collect();
                batches.push((keys.next().unwrap_or_else(Uuid::new_v4), batch));
            }
            let total: usize = batches.iter().map(|(_, b)| b.len()).sum();
            let stored = match &mut self.disk {
                Disk::Ready(spool) => {
                    let refs: Vec<(Uuid, &[MetricPoint])> =
                        batches.iter().map(|(k, b)| (*k, b.as_slice())).collect();
                    match spool.append_batches(first, &refs) {
                        Ok(located) => Some(located),
                        Err(e) => {
                            self.fail(&e);
                            None
                        }
                    }
                }
                _ => None,
            };
            self.buffer_first = first + total as u64;
            self.journaled = 0;
            self.queued_points += total;
            match stored {
                Some(located) => {
                    self.disk_worked();
                    self.stored_points += total as u64;
                    // The newest batches stay in memory too while there is room, so that
                    // what is sent next after a short outage is not read back from disk.
                    let sizes: Vec<usize> = batches.iter().map(|(_, b)| batch_bytes(b)).collect();
                    let bytes: usize = sizes.iter().sum();
                    let keep = self.memory_points + self.cached_points + total
                        <= self.limits.max_points
                        && self.memory_bytes + self.cached_bytes + bytes
                            <= self.limits.max_memory_bytes;
                    if keep {
                        self.cached_points += total;
                        self.cached_bytes += bytes;
                    }
                    for (((key, points), at), size) in batches.into_iter().zip(located).zip(sizes) {
                        self.batches.push_back(Batch {
                            key,
                            count: points.len(),
                            bytes: if keep { size } else { 0 },
                            points: keep.then(|| Arc::new(points)),
                            stored: Some(at),
                        });
                    }
                }
                None => {
                    self.memory_points += total;
                    for (key, points) in batches {
                        let bytes = batch_bytes(&points);
                        self.memory_bytes += bytes;
                        self.batches.push_back(Batch {
                            key,
                            count: points.len(),
                            bytes,
                            points: Some(Arc::new(points)),
                            stored: None,
                        });
                    }
                }
            }
        }
        self.trim(head_in_flight)
    }

    /// Drops the oldest points beyond the bounds and returns how many: batches in memory
    /// beyond `max_points` or `max_memory_bytes` (the oldest may lose part of its points,
    /// keeping its key), whole segments of the log beyond `max_bytes`. The head is left alone
    /// while it is in flight: its request carries it already.
    pub fn trim(&mut self, head_in_flight: bool) -> usize {
        let from = usize::from(head_in_flight);
        let mut dropped = 0;
        while self.memory_points > self.limits.max_points
            || self.memory_bytes > self.limits.max_memory_bytes
        {
            let Some(i) = (from..self.batches.len()).find(|&i| self.batches[i].stored.is_none())
            else {
                break;
            };
            let excess_points = self.memory_points.saturating_sub(self.limits.max_points);
            let excess_bytes = self
                .memory_bytes
                .saturating_sub(self.limits.max_memory_bytes);
            let oldest = &mut self.batches[i];
            let points = oldest.points.as_mut().expect("a batch without a record");
            // The fewest oldest points that cover both excesses.
            let mut cut = excess_points.min(oldest.count);
            let mut cut_bytes: usize = points[..cut].iter().map(point_bytes).sum();
            while cut < oldest.count && cut_bytes < excess_bytes {
                cut_bytes += point_bytes(&points[cut]);
                cut += 1;
            }
            if cut == oldest.count {
                cut_bytes = oldest.bytes;
                self.batches.remove(i);
            } else {
                // If an earlier attempt of this batch did land, the destination drops the
                // rest as a repeat, which is what it already holds.
                Arc::make_mut(points).drain(..cut);
                oldest.count -= cut;
                oldest.bytes -= cut_bytes;
            }
            dropped += cut;
            self.memory_points -= cut;
            self.memory_bytes -= cut_bytes;
            self.queued_points -= cut;
        }
        let in_flight = match self.batches.front() {
            Some(b) if head_in_flight => b.stored.map(|at| at.segment),
            _ => None,
        };
        while let Some(oldest) = self.segment_over_bound(in_flight) {
            dropped += self.drop_segment(oldest);
        }
        dropped
    }

    /// The oldest segment but the one in flight, while the log is over `max_bytes`.
    fn segment_over_bound(&self, in_flight: Option<u64>) -> Option<u64> {
        let (Disk::Ready(spool)
        | Disk::Broken {
            spool: Some(spool), ..
        }) = &self.disk
        else {
            return None;
        };
        if spool.bytes() <= self.limits.max_bytes {
            return None;
        }
        spool
            .segments()
            .keys()
            .copied()
            .find(|s| Some(*s) != in_flight)
    }

    /// Removes the batches of segment `first` from the queue and the segment from the
    /// directory; returns the points that went.
    fn drop_segment(&mut self, first: u64) -> usize {
        let mut gone = Vec::new();
        self.batches.retain_mut(|b| {
            let mine = b.stored.is_some_and(|at| at.segment == first);
            if mine {
                gone.push((b.count, b.bytes, b.points.is_some()));
            }
            !mine
        });
        let mut dropped = 0;
        for (count, bytes, cached) in gone {
            dropped += count;
            self.queued_points -= count;
            self.stored_points -= count as u64;
            if cached {
                self.cached_points -= count;
                self.cached_bytes -= bytes;
            }
        }
        if let Disk::Ready(spool)
        | Disk::Broken {
            spool: Some(spool), ..
        } = &mut self.disk
        {
            if let Err(e) = spool.remove_segment(first) {
                warn!(component = "metrics", error = %e, "durable queue: a segment stays on disk");
            }
        }
        dropped
    }

    /// The head batch's key and points, read from the log if need be. A record that cannot
    /// be read back is counted and skipped.
    pub fn head(&mut self) -> Option<(Uuid, Arc<Vec<MetricPoint>>)> {
        loop {
            let head = self.batches.front()?;
            if let Some(points) = &head.points {
                return Some((head.key, points.clone()));
            }
            let at = head.stored.expect("a batch not in memory has a record");
            let read = match &self.disk {
                Disk::Ready(spool)
                | Disk::Broken {
                    spool: Some(spool), ..
                } => spool.read_batch(&at),
                _ => unreachable!("records exist only with an open directory"),
            };
            match read {
                Ok(points) => {
                    let head = self.batches.front_mut().expect("checked");
                    head.bytes = batch_bytes(&points);
                    head.points = Some(Arc::new(points));
                    self.cached_points += head.count;
                    self.cached_bytes += head.bytes;
                }
                Err(e) => {
                    self.corrupt += 1;
                    warn!(
                        component = "metrics",
                        error = %e,
                        points = at.header.points(),
                        "durable queue: a damaged batch was skipped; the rest is delivered"
                    );
                    // Skipped as if delivered, so that its segment can go in time.
                    self.pop();
                }
            }
        }
    }

    /// Removes the head batch (its destination took it, or refused it for good). Segments
    /// that held only delivered points are deleted. Returns the batch's points.
    pub fn pop(&mut self) -> usize {
        let Some(gone) = self.batches.pop_front() else {
            return 0;
        };
        self.queued_points -= gone.count;
        match gone.stored {
            None => {
                self.memory_points -= gone.count;
                self.memory_bytes -= gone.bytes;
            }
            Some(at) => {
                self.stored_points -= gone.count as u64;
                if gone.points.is_some() {
                    self.cached_points -= gone.count;
                    self.cached_bytes -= gone.bytes;
                }
                self.delivered(at.header.end);
            }
        }
        gone.count
    }

    /// Every batch below `end` was delivered: the cursor says so, and segments holding
    /// nothing else go (the one being appended to only once it is full).
    fn delivered(&mut self, end: u64) {
        let segment_bytes = self.segment_bytes();
        let (Disk::Ready(spool)
        | Disk::Broken {
            spool: Some(spool), ..
        }) = &mut self.disk
        else {
            return;
        };
        if let Err(e) = spool.write_cursor(end) {
            debug!(component = "metrics", error = %e, "durable queue: the cursor was not written");
        }
        let done: Vec<u64> = spool
            .segments()
            .iter()
            .filter(|(first, s)| {
                s.end <= end
                    && (spool.current_segment() != Some(**first) || s.bytes >= segment_bytes)
            })
            .map(|(first, _)| *first)
            .collect();
        for first in done {
            if let Err(e) = spool.remove_segment(first) {
                // Sent again after a restart, under its keys: repeats the destination drops.
                warn!(component = "metrics", error = %e, "durable queue: a delivered segment stays on disk");
            }
        }
    }

    /// Whether no batch is waiting.
    pub fn is_empty(&self) -> bool {
        self.batches.is_empty()
    }

    /// Points in sealed batches.
    pub fn queued_points(&self) -> usize {
        self.queued_points
    }

    /// Points of the head batch.
    pub fn head_points(&self) -> usize {
        self.batches.front().map_or(0, |b| b.count)
    }

    /// Points held in memory by batches that have no record, which `max_points` bounds.
    pub fn memory_points(&self) -> usize {
        self.memory_points
    }

    /// Points in the directory not yet delivered: sealed batches and collected points.
    pub fn spooled_points(&self) -> u64 {
        self.stored_points + self.journaled as u64
    }

    /// Bytes in the directory's log.
    pub fn spooled_bytes(&self) -> u64 {
        match &self.disk {
            Disk::Ready(spool)
            | Disk::Broken {
                spool: Some(spool), ..
            } => spool.bytes(),
            _ => 0,
        }
    }

    /// Damaged records, cut appends and foreign files found since start.
    pub fn corrupt_batches(&self) -> u64 {
        self.corrupt
    }

    /// The directory failed: carry on in memory until [`DISK_RETRY`] has passed. The first
    /// failure of a run of them is logged as an error with what to do; retries that fail
    /// again only at debug level.
    fn fail(&mut self, e: &SpoolError) {
        let spool = match std::mem::replace(&mut self.disk, Disk::Off) {
            Disk::Ready(spool) => Some(spool),
            Disk::Broken { spool, .. } => spool,
            Disk::Off => None,
        };
        self.broke(spool, e);
    }

    fn broke(&mut self, spool: Option<Spool>, e: &SpoolError) {
        let (SpoolError::Io { dir, .. } | SpoolError::Locked { dir, .. }) = e;
        let advice = e.advice();
        let text = if advice.is_empty() {
            e.to_string()
        } else {
            format!("{e}; {advice}")
        };
        self.disk_failures += 1;
        if self.disk_failures == 1 {
            error!(
                component = "metrics",
                error = %text,
                retry_in = ?DISK_RETRY,
                "durable queue unavailable; points are kept in memory (bounded by metrics.queue.max_points) until the directory works again"
            );
        } else {
            debug!(component = "metrics", error = %text, "durable queue still unavailable");
        }
        self.disk = Disk::Broken {
            spool,
            dir: dir.clone(),
            error: text,
            retry_at: Instant::now() + DISK_RETRY,
        };
    }

    /// At a seal: when the directory's wait is over, use it again (opening it first if it
    /// never opened).
    fn retry_disk(&mut self) {
        let Disk::Broken {
            spool,
            dir,
            retry_at,
            ..
        } = &mut self.disk
        else {
            return;
        };
        if Instant::now() < *retry_at {
            return;
        }
        match spool.take() {
            Some(spool) => self.disk = Disk::Ready(spool),
            None => {
                let dir = dir.clone();
                match Spool::open(&dir, self.segment_bytes()) {
                    Ok((spool, recovered)) => self.adopt(spool, recovered),
                    Err(e) => self.broke(None, &e),
                }
            }
        }
    }

    /// Called after a seal that wrote to the directory: a run of failures has ended.
    fn disk_worked(&mut self) {
        if self.disk_failures > 0 {
            self.disk_failures = 0;
            if let Disk::Ready(spool) = &self.disk {
                info!(component = "metrics", dir = %spool.dir().display(), "durable queue usable again; new batches go to the directory");
            }
        }
    }

    /// Whether the directory is in use and healthy (for the shutdown's choice of how long
    /// to try).
    pub fn is_durable(&self) -> bool {
        matches!(self.disk, Disk::Ready(_))
    }
}

/// `n` version-4 keys from one read of the system's random source (a seal of 10,000 points
/// makes 100 batches, and a system call per key is most of the time of sealing them in
/// memory). Empty if the source fails; the caller then draws each key on its own.
fn fresh_keys(n: usize) -> impl Iterator<Item = Uuid> {
    let mut random = vec![0u8; 16 * n];
    if getrandom::fill(&mut random).is_err() {
        random.clear();
    }
    random
        .chunks_exact(16)
        .map(|b| uuid::Builder::from_random_bytes(b.try_into().expect("16 bytes")).into_uuid())
        .collect::<Vec<_>>()
        .into_iter()
}

#[cfg(test)]
mod tests;

/// What a point takes in memory, near enough for a bound: its JSON text and names, and the
/// struct and allocations around them.
fn point_bytes(point: &MetricPoint) -> usize {
    const OVERHEAD: usize = 96;
    point.data.as_str().len() + point.group.len() + point.peer_id.len() + OVERHEAD
}

/// [`point_bytes`] of every point of a batch.
fn batch_bytes(points: &[MetricPoint]) -> usize {
    points.iter().map(point_bytes).sum()
}
