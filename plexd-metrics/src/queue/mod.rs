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
use spool::{ReadError, Spool, SpoolError, StoredBatch};

/// How long the queue runs from memory after a disk error before it tries the directory again.
pub const DISK_RETRY: Duration = Duration::from_secs(30);

/// The bounds of a queue.
#[derive(Clone, Copy, Debug)]
pub struct QueueLimits {
    /// Most points in one batch.
    pub batch_size: usize,
    /// Most points held in memory (all of them without a directory).
    pub max_points: usize,
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
struct Entry {
    /// Known once the points are (for a batch found on disk at start, when it is read).
    key: Uuid,
    /// Points in the batch.
    count: usize,
    /// In memory: always without a file, otherwise while there is room or it is the head.
    points: Option<Arc<Vec<MetricPoint>>>,
    /// Its file, when it has one.
    stored: Option<StoredBatch>,
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
    /// Points of the buffer that are in the journal.
    journaled: usize,
    batches: VecDeque<Entry>,
    queued_points: usize,
    /// Points held in memory by batches without a file: what `max_points` bounds.
    memory_points: usize,
    /// Points held in memory by batches with a file (a cache).
    cached_points: usize,
    /// Bytes and points of the batch files.
    stored_bytes: u64,
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
            stored_bytes: 0,
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
        match Spool::open(dir) {
            Ok((spool, recovered)) => {
                queue.adopt(spool, recovered);
                let (points, bytes) = (queue.spooled_points(), queue.spooled_bytes());
                info!(
                    component = "metrics",
                    dir = %dir.display(),
                    batches = queue.batches.len(),
                    points,
                    bytes,
                    "durable queue opened; what it holds is sent first"
                );
            }
            Err(e @ SpoolError::Locked { .. }) => return Err(e),
            Err(e) => queue.broke(None, &e),
        }
        Ok(queue)
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
        for stored in recovered.batches {
            self.queued_points += stored.points() as usize;
            self.stored_points += stored.points();
            self.stored_bytes += stored.bytes;
            self.batches.push_back(Entry {
                key: Uuid::nil(),
                count: stored.points() as usize,
                points: None,
                stored: Some(stored),
            });
        }
        self.journaled = recovered.unsealed.len();
        let mut buffer = recovered.unsealed;
        buffer.append(&mut self.buffer);
        self.buffer = buffer;
        self.buffer_first = recovered.next;
        self.disk = Disk::Ready(spool);
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

    /// Adds one collect cycle's points to the buffer; with a directory they are synced to
    /// its journal before this returns.
    pub fn collected(&mut self, points: Vec<MetricPoint>) {
        if points.is_empty() {
            return;
        }
        if let Disk::Ready(spool) = &mut self.disk {
            let first = self.buffer_first + self.buffer.len() as u64;
            match spool.append(first, &points) {
                Ok(()) => self.journaled += points.len(),
                Err(e) => self.fail(&e),
            }
        }
        self.buffer.extend(points);
    }

    /// Points collected and not yet sealed into a batch.
    pub fn buffered(&self) -> usize {
        self.buffer.len()
    }

    /// Seals the buffer into batches of at most `batch_size` points, each with a fresh key,
    /// and trims the queue to its bounds. Returns the points dropped by the trim.
    pub fn seal(&mut self, head_in_flight: bool) -> usize {
        if !self.buffer.is_empty() {
            self.retry_disk();
            let mut first = self.buffer_first;
            let mut wrote = false;
            let mut points = std::mem::take(&mut self.buffer).into_iter().peekable();
            while points.peek().is_some() {
                let batch: Vec<MetricPoint> =
                    points.by_ref().take(self.limits.batch_size).collect();
                let key = Uuid::new_v4();
                let stored = match &self.disk {
                    Disk::Ready(spool) => match spool.write_batch(first, key, &batch) {
                        Ok(stored) => Some(stored),
                        Err(e) => {
                            self.fail(&e);
                            None
                        }
                    },
                    _ => None,
                };
                first += batch.len() as u64;
                wrote |= stored.is_some();
                self.push_entry(key, batch, stored);
            }
            self.buffer_first = first;
            self.journaled = 0;
            if let Disk::Ready(spool) = &mut self.disk {
                let done = if wrote { spool.sync_dir() } else { Ok(()) }
                    .and_then(|()| spool.reset_journal());
                match done {
                    Ok(()) => self.disk_worked(),
                    Err(e) => self.fail(&e),
                }
            }
        }
        self.trim(head_in_flight)
    }

    fn push_entry(&mut self, key: Uuid, batch: Vec<MetricPoint>, stored: Option<StoredBatch>) {
        let count = batch.len();
        self.queued_points += count;
        let keep = match &stored {
            None => {
                self.memory_points += count;
                true
            }
            // The newest batches stay in memory too while there is room, so that the batch
            // sent next after a short outage is not read back from disk.
            Some(s) => {
                self.stored_points += s.points();
                self.stored_bytes += s.bytes;
                let room =
                    self.memory_points + self.cached_points + count <= self.limits.max_points;
                if room {
                    self.cached_points += count;
                }
                room
            }
        };
        self.batches.push_back(Entry {
            key,
            count,
            points: keep.then(|| Arc::new(batch)),
            stored,
        });
    }

    /// Drops the oldest points beyond the bounds and returns how many: batches in memory
    /// beyond `max_points` (the oldest may lose part of its points, keeping its key), batch
    /// files beyond `max_bytes` (whole files). The head is left alone while it is in flight:
    /// its request carries it already.
    pub fn trim(&mut self, head_in_flight: bool) -> usize {
        let first = usize::from(head_in_flight);
        let mut dropped = 0;
        while self.memory_points > self.limits.max_points {
            let Some(i) = (first..self.batches.len()).find(|&i| self.batches[i].stored.is_none())
            else {
                break;
            };
            let excess = self.memory_points - self.limits.max_points;
            let oldest = &mut self.batches[i];
            if oldest.count <= excess {
                let gone = self.batches.remove(i).expect("index checked");
                dropped += gone.count;
                self.memory_points -= gone.count;
                self.queued_points -= gone.count;
            } else {
                // If an earlier attempt of this batch did land, the destination drops the
                // rest as a repeat, which is what it already holds.
                let points = oldest.points.as_mut().expect("a batch without a file");
                Arc::make_mut(points).drain(..excess);
                oldest.count -= excess;
                dropped += excess;
                self.memory_points -= excess;
                self.queued_points -= excess;
            }
        }
        while self.spooled_bytes() > self.limits.max_bytes {
            let Some(i) = (first..self.batches.len()).find(|&i| self.batches[i].stored.is_some())
            else {
                break;
            };
            let gone = self.batches.remove(i).expect("index checked");
            dropped += gone.count;
            self.delete_file(&gone);
            self.forget(&gone);
        }
        dropped
    }

    /// The head batch's key and points, read from its file if need be. A file that cannot be
    /// read is set aside, counted and skipped.
    pub fn head(&mut self) -> Option<(Uuid, Arc<Vec<MetricPoint>>)> {
        loop {
            let entry = self.batches.front()?;
            if let Some(points) = &entry.points {
                return Some((entry.key, points.clone()));
            }
            let stored = entry
                .stored
                .clone()
                .expect("a batch not in memory has a file");
            let read = match &self.disk {
                Disk::Ready(spool)
                | Disk::Broken {
                    spool: Some(spool), ..
                } => spool.read_batch(&stored),
                _ => unreachable!("batch files exist only with an open directory"),
            };
            match read {
                Ok(batch) => {
                    let entry = self.batches.front_mut().expect("checked");
                    entry.key = batch.key;
                    entry.points = Some(Arc::new(batch.points));
                    self.cached_points += entry.count;
                }
                Err(e) => {
                    self.corrupt += 1;
                    match &e {
                        ReadError::Damaged { .. } => warn!(
                            component = "metrics",
                            error = %e,
                            points = stored.points(),
                            "durable queue: a damaged batch was set aside; the rest is delivered"
                        ),
                        ReadError::Io(_) => warn!(
                            component = "metrics",
                            error = %e,
                            points = stored.points(),
                            "durable queue: a batch could not be read and is skipped"
                        ),
                    }
                    let gone = self.batches.pop_front().expect("checked");
                    self.forget(&gone);
                }
            }
        }
    }

    /// Removes the head batch (its destination took it, or refused it for good), with its
    /// file. Returns its points.
    pub fn pop(&mut self) -> usize {
        let Some(gone) = self.batches.pop_front() else {
            return 0;
        };
        self.delete_file(&gone);
        self.forget(&gone);
        gone.count
    }

    /// Deletes a batch's file, if it has one. A file that cannot be deleted is sent again
    /// after a restart, under its key: a repeat the destination drops, not a loss.
    fn delete_file(&self, gone: &Entry) {
        if let (
            Some(stored),
            Disk::Ready(spool)
            | Disk::Broken {
                spool: Some(spool), ..
            },
        ) = (&gone.stored, &self.disk)
        {
            if let Err(e) = spool.remove(stored) {
                warn!(component = "metrics", error = %e, "durable queue: a batch file stays on disk");
            }
        }
    }

    fn forget(&mut self, gone: &Entry) {
        self.queued_points -= gone.count;
        match &gone.stored {
            Some(stored) => {
                self.stored_points -= stored.points();
                self.stored_bytes -= stored.bytes;
                if gone.points.is_some() {
                    self.cached_points -= gone.count;
                }
            }
            None => self.memory_points -= gone.count,
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

    /// Points held in memory by batches that have no file, which `max_points` bounds.
    pub fn memory_points(&self) -> usize {
        self.memory_points
    }

    /// Points in the directory: batch files and the journal.
    pub fn spooled_points(&self) -> u64 {
        self.stored_points + self.journaled as u64
    }

    /// Bytes in the directory: batch files and the journal.
    pub fn spooled_bytes(&self) -> u64 {
        let journal = match &self.disk {
            Disk::Ready(spool) => spool.journal_bytes(),
            _ => 0,
        };
        self.stored_bytes + journal
    }

    /// Damaged batch files and journal tails found since start.
    pub fn corrupt_batches(&self) -> u64 {
        self.corrupt
    }

    /// The directory failed: carry on in memory until [`DISK_RETRY`] has passed. The first
    /// failure of a run of them is logged as an error with what to do; retries that fail
    /// again only at debug level.
    fn fail(&mut self, e: &SpoolError) {
        let mut spool = match std::mem::replace(&mut self.disk, Disk::Off) {
            Disk::Ready(spool) => Some(spool),
            Disk::Broken { spool, .. } => spool,
            Disk::Off => None,
        };
        if let Some(spool) = &mut spool {
            // Unsealed points are in memory from now on; an empty journal cannot bring them
            // back under a second key after a restart. Truncation works on a full disk too.
            let _ = spool.reset_journal();
        }
        self.journaled = 0;
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
                match Spool::open(&dir) {
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

#[cfg(test)]
mod tests;
