//! The queue's directory: the one place that opens, writes, syncs and deletes its files.
//!
//! ```text
//! DIR/lock                      flock(2)ed while an agent uses DIR; holds its pid
//! DIR/<first:020>.log           a segment of the log: records appended, never rewritten
//! DIR/cursor                    the ordinal below which every batch was delivered
//! DIR/*.corrupt                 set aside by an agent: not a log it can read
//! ```
//!
//! Each collect cycle appends to the newest segment and syncs it with one `fdatasync`: no
//! file is created, renamed or deleted on that path (creating and deleting a file per cycle
//! costs more than the write on some file systems, and every rename needs a sync of the
//! directory too). A segment is closed at about 8 MiB; a new one is a file create and a
//! directory sync. A segment goes as a whole once everything in it was delivered, or when
//! `max_bytes` makes room. Each start appends to a segment of its own, so that nothing an
//! earlier run wrote is ever truncated or written over.
//!
//! Large appends are handed to the device in chunks as they are encoded
//! (`sync_file_range(SYNC_FILE_RANGE_WRITE)`, which starts writeback without waiting), so
//! that the final `fdatasync` waits for the tail only and encoding overlaps the device's work.
//!
//! The cursor is written without a sync: a killed process leaves it in the page cache, and a
//! cursor that power loss set back only sends delivered batches again under their keys,
//! which a control plane drops as repeats.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use nix::fcntl::{Flock, FlockArg};
use uuid::Uuid;

use super::record::{self, Header, Kind, RecordError};
use crate::api::MetricPoint;

/// Subdirectories that hold the queues of the destinations besides the primary one, each a
/// queue directory of its own.
pub const DESTINATION_DIRS: [&str; 1] = [REMOTE_WRITE_DIR];
/// The remote-write destination's queue, under the primary's directory.
pub const REMOTE_WRITE_DIR: &str = "remote_write";
const LOCK: &str = "lock";
const CURSOR: &str = "cursor";
const SEGMENT_SUFFIX: &str = ".log";
const CORRUPT_SUFFIX: &str = ".corrupt";
/// A segment takes no more appends once it holds this much (or an eighth of
/// `metrics.queue.max_bytes`, when that is less), so that `max_bytes` can make room a segment
/// at a time without a segment being most of it.
pub const SEGMENT_BYTES: u64 = 8 << 20;
/// Bytes encoded before they are written and their writeback started.
const CHUNK: usize = 1 << 20;

/// Why the directory cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum SpoolError {
    /// Another agent holds the directory's lock: two agents would send the same batches.
    #[error(
        "metrics.queue.dir {dir} is in use by another plexd-metrics{holder}; give each agent \
         a directory of its own"
    )]
    Locked {
        /// The directory.
        dir: PathBuf,
        /// `" (pid N)"` when the lock file says which process holds it.
        holder: String,
    },
    /// A file operation failed (missing directory, read-only or full file system).
    #[error("metrics.queue.dir {dir}: cannot {doing}: {source}")]
    Io {
        /// The directory.
        dir: PathBuf,
        /// What the agent was doing, e.g. "append to the log".
        doing: &'static str,
        /// What the OS said.
        source: io::Error,
    },
}

impl SpoolError {
    /// What an operator does about it, appended to the logged error.
    pub fn advice(&self) -> &'static str {
        match self {
            Self::Locked { .. } => "",
            Self::Io { source, .. } => match source.raw_os_error() {
                Some(libc::ENOENT) | Some(libc::ENOTDIR) => {
                    "create the directory (the DaemonSet's hostPath and the systemd unit's \
                     StateDirectory= do) or fix metrics.queue.dir"
                }
                Some(libc::EROFS) | Some(libc::EACCES) | Some(libc::EPERM) => {
                    "make the directory writable by the agent"
                }
                Some(libc::ENOSPC) | Some(libc::EDQUOT) => {
                    "free space on its file system or lower metrics.queue.max_bytes"
                }
                _ => "check the directory and its file system",
            },
        }
    }
}

/// Where a batch record lies in the log.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Located {
    /// The segment, by its first ordinal.
    pub segment: u64,
    /// The record's offset in the segment.
    pub offset: u64,
    /// Its header: ordinals, key, length.
    pub header: Header,
}

/// A segment as the queue accounts for it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Segment {
    /// Bytes in it.
    pub bytes: u64,
    /// The highest ordinal it holds a point of, plus one.
    pub end: u64,
}

/// What a directory held when it was opened.
#[derive(Debug, Default)]
pub struct Recovered {
    /// Batches not yet delivered, oldest first.
    pub batches: Vec<Located>,
    /// Points collected since the last seal, oldest first.
    pub unsealed: Vec<MetricPoint>,
    /// Ordinal of `unsealed[0]`, and of the next point when it is empty.
    pub next: u64,
    /// Damage and foreign files found, each described for the log.
    pub damaged: Vec<String>,
}

/// An open, locked queue directory.
#[derive(Debug)]
pub struct Spool {
    dir: PathBuf,
    // Held for as long as the spool lives; the kernel releases it when the process dies.
    _lock: Flock<File>,
    segments: BTreeMap<u64, Segment>,
    /// The segment appended to, by its first ordinal, and its file; opened at the first
    /// append.
    current: Option<(u64, File)>,
    cursor: File,
    /// Encoding buffer, kept between writes so that a large seal does not fault in fresh
    /// pages every cycle.
    scratch: Vec<u8>,
    segment_bytes: u64,
}

impl Spool {
    /// Locks `dir`, reads what it holds and returns it; segments close at `segment_bytes`.
    /// The directory is not created: a missing one is usually a volume not mounted yet.
    pub fn open(dir: &Path, segment_bytes: u64) -> Result<(Self, Recovered), SpoolError> {
        let io = |doing| {
            move |source| SpoolError::Io {
                dir: dir.to_owned(),
                doing,
                source,
            }
        };
        let meta = std::fs::metadata(dir).map_err(io("open the directory"))?;
        if !meta.is_dir() {
            return Err(io("open the directory")(io::Error::from_raw_os_error(
                libc::ENOTDIR,
            )));
        }
        let lock = lock(dir)?;
        let mut recovered = Recovered::default();
        let mut names = Vec::new();
        for entry in std::fs::read_dir(dir).map_err(io("list the directory"))? {
            let entry = entry.map_err(io("list the directory"))?;
            let file_name = entry.file_name();
            let Some(name) = file_name.to_str() else {
                recovered
                    .damaged
                    .push(format!("skipped {file_name:?}: not a queue file"));
                continue;
            };
            if name == LOCK || name == CURSOR || name.ends_with(CORRUPT_SUFFIX) {
                continue;
            }
            // A destination other than the primary keeps its queue in a subdirectory.
            if DESTINATION_DIRS.contains(&name) {
                continue;
            }
            match name
                .strip_suffix(SEGMENT_SUFFIX)
                .filter(|n| n.len() == 20)
                .and_then(|n| n.parse::<u64>().ok())
            {
                Some(first) => names.push((first, name.to_owned())),
                None if name.ends_with(SEGMENT_SUFFIX) => {
                    set_aside(dir, name).map_err(io("set aside a damaged file"))?;
                    recovered
                        .damaged
                        .push(format!("set aside {name}: not a segment name"));
                }
                // Someone else's file: not ours to move, but said once.
                None => recovered
                    .damaged
                    .push(format!("skipped {name}: not a queue file")),
            }
        }
        names.sort();

        let cursor_path = dir.join(CURSOR);
        let delivered = match std::fs::read(&cursor_path) {
            // Created empty, written at the first delivery of a stored batch.
            Ok(bytes) if bytes.is_empty() => 0,
            Ok(bytes) => record::decode_cursor(&bytes).unwrap_or_else(|| {
                recovered
                    .damaged
                    .push("ignored a damaged cursor".to_owned());
                0
            }),
            Err(e) if e.kind() == io::ErrorKind::NotFound => 0,
            Err(e) => return Err(io("read the cursor")(e)),
        };

        let mut segments = BTreeMap::new();
        // Points records and the batches' highest end, to find the unsealed points after.
        let mut points_records = Vec::new();
        let mut sealed_end = delivered;
        for (first, name) in names {
            let file = File::open(dir.join(&name)).map_err(io("read a segment"))?;
            let len = file.metadata().map_err(io("read a segment"))?.len();
            if len == 0 {
                // Created by a run that stopped before its first append.
                std::fs::remove_file(dir.join(&name)).map_err(io("remove an empty segment"))?;
                continue;
            }
            let (found, damage) = record::scan_with(len, |at, buf| file.read_exact_at(buf, at))
                .map_err(io("read a segment"))?;
            if let (Some(damage), true) = (&damage, found.is_empty()) {
                set_aside(dir, &name).map_err(io("set aside a damaged file"))?;
                recovered
                    .damaged
                    .push(format!("set aside {name}: {damage}"));
                continue;
            }
            if let Some(damage) = damage {
                // Whatever follows a damaged header cannot be found; a cut at the end is
                // the write a crash interrupted.
                let whole = found.last().map_or(0, |(at, h)| at + h.record_len());
                recovered.damaged.push(format!(
                    "{name}: {} bytes after the last whole record skipped ({damage})",
                    len - whole
                ));
            }
            let mut end = first;
            for (at, header) in found {
                end = end.max(header.end);
                match header.kind {
                    Kind::Batch => {
                        sealed_end = sealed_end.max(header.end);
                        if header.end > delivered {
                            recovered.batches.push(Located {
                                segment: first,
                                offset: at,
                                header,
                            });
                        }
                    }
                    // Read later, and only if no batch holds its points.
                    Kind::Points => points_records.push(Located {
                        segment: first,
                        offset: at,
                        header,
                    }),
                }
            }
            segments.insert(first, Segment { bytes: len, end });
        }
        recovered.batches.sort_by_key(|b| b.header.first);
        recovered.next = sealed_end;
        for at in points_records {
            let header = at.header;
            if header.end <= recovered.next {
                continue;
            }
            let mut record = vec![0; header.record_len() as usize];
            File::open(dir.join(segment_name(at.segment)))
                .and_then(|f| f.read_exact_at(&mut record, at.offset))
                .map_err(io("read a segment"))?;
            match record::decode_points(&header, &record) {
                Ok(points) => {
                    let skip = recovered.next.saturating_sub(header.first) as usize;
                    if recovered.unsealed.is_empty() {
                        recovered.next = header.first + skip as u64;
                    }
                    recovered.unsealed.extend(points.into_iter().skip(skip));
                }
                Err(e) => recovered.damaged.push(format!(
                    "dropped the points of ordinals {}..{}: {e}",
                    header.first, header.end
                )),
            }
        }
        if recovered.unsealed.is_empty() {
            recovered.next = segments
                .values()
                .map(|s| s.end)
                .max()
                .unwrap_or(0)
                .max(sealed_end);
        }

        let cursor = owner_only()
            .write(true)
            .create(true)
            .truncate(false)
            .open(&cursor_path)
            .map_err(io("open the cursor"))?;
        Ok((
            Self {
                dir: dir.to_owned(),
                _lock: lock,
                segments,
                current: None,
                cursor,
                scratch: Vec::new(),
                segment_bytes,
            },
            recovered,
        ))
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Bytes in the log's segments.
    pub fn bytes(&self) -> u64 {
        self.segments.values().map(|s| s.bytes).sum()
    }

    /// The segments, oldest first.
    pub fn segments(&self) -> &BTreeMap<u64, Segment> {
        &self.segments
    }

    /// The segment appended to, if one is open.
    pub fn current_segment(&self) -> Option<u64> {
        self.current.as_ref().map(|(first, _)| *first)
    }

    /// Appends one cycle's points, numbered from `first`, and syncs them.
    pub fn append_points(&mut self, first: u64, points: &[MetricPoint]) -> Result<(), SpoolError> {
        self.scratch.clear();
        record::encode(&mut self.scratch, Kind::Points, first, Uuid::nil(), points);
        let scratch = std::mem::take(&mut self.scratch);
        let appended = self.append(first, &[&scratch[..]]);
        self.scratch = scratch;
        appended.map(|_| ())
    }

    /// Appends one seal's batches, given as `(key, points)` numbered on from `first`, and
    /// syncs them: one `fdatasync` however many batches. Returns where each batch lies.
    pub fn append_batches(
        &mut self,
        first: u64,
        batches: &[(Uuid, &[MetricPoint])],
    ) -> Result<Vec<Located>, SpoolError> {
        let (segment, start) = self.segment_for(first)?;
        let file = &self.current.as_ref().expect("opened above").1;
        let mut located = Vec::with_capacity(batches.len());
        let mut offset = start;
        let mut written = start;
        let mut ordinal = first;
        self.scratch.clear();
        let mut result = Ok(());
        for (i, (key, points)) in batches.iter().enumerate() {
            let at = self.scratch.len();
            record::encode(&mut self.scratch, Kind::Batch, ordinal, *key, points);
            let header = record::decode_header(&self.scratch[at..]).expect("just encoded");
            located.push(Located {
                segment,
                offset,
                header,
            });
            offset += header.record_len();
            ordinal += points.len() as u64;
            if self.scratch.len() >= CHUNK || i + 1 == batches.len() {
                result = file.write_all_at(&self.scratch, written);
                if result.is_err() {
                    break;
                }
                start_writeback(file, written, self.scratch.len() as u64);
                written += self.scratch.len() as u64;
                self.scratch.clear();
            }
        }
        let result = result.and_then(|()| file.sync_data());
        self.finish_append(
            segment,
            start,
            written,
            ordinal,
            result,
            "append a seal to the log",
        )?;
        Ok(located)
    }

    /// Appends the encoded `parts` to the segment for ordinal `first` and syncs them.
    fn append(&mut self, first: u64, parts: &[&[u8]]) -> Result<u64, SpoolError> {
        let (segment, start) = self.segment_for(first)?;
        let file = &self.current.as_ref().expect("opened above").1;
        let mut written = start;
        let mut result = Ok(());
        let mut end = first;
        for part in parts {
            result = file.write_all_at(part, written);
            if result.is_err() {
                break;
            }
            written += part.len() as u64;
            if let Ok(header) = record::decode_header(part) {
                end = end.max(header.end);
            }
        }
        let result = result.and_then(|()| file.sync_data());
        self.finish_append(segment, start, written, end, result, "append to the log")?;
        Ok(start)
    }

    /// Accounts for a finished append, or cuts a failed one off the segment, so that the
    /// next record follows the last whole one.
    fn finish_append(
        &mut self,
        segment: u64,
        start: u64,
        written: u64,
        end: u64,
        result: io::Result<()>,
        doing: &'static str,
    ) -> Result<(), SpoolError> {
        if let Err(source) = result {
            if let Some((_, file)) = &self.current {
                let _ = file.set_len(start);
            }
            return Err(self.error(doing, source));
        }
        let state = self
            .segments
            .get_mut(&segment)
            .expect("the current segment");
        state.bytes = written;
        state.end = state.end.max(end);
        Ok(())
    }

    /// The segment to append ordinal `first` onwards to, and where its end is: the current
    /// one while it has room, else a new one.
    fn segment_for(&mut self, first: u64) -> Result<(u64, u64), SpoolError> {
        if let Some((segment, _)) = &self.current {
            let bytes = self.segments[segment].bytes;
            if bytes < self.segment_bytes {
                return Ok((*segment, bytes));
            }
        }
        // Named after the first ordinal it holds, or after the segment before it when that
        // is higher (a seal of points an earlier segment journaled): names sort as the log.
        let first = match self.segments.keys().next_back() {
            Some(last) => first.max(last + 1),
            None => first,
        };
        let name = segment_name(first);
        let file = owner_only()
            .write(true)
            .create_new(true)
            .open(self.dir.join(&name))
            .and_then(|f| {
                // The new name must survive a power loss before anything relies on it.
                File::open(&self.dir).and_then(|d| d.sync_all())?;
                Ok(f)
            })
            .map_err(|e| self.error("create a segment", e))?;
        self.segments.insert(
            first,
            Segment {
                bytes: 0,
                end: first,
            },
        );
        self.current = Some((first, file));
        Ok((first, 0))
    }

    /// Reads a batch back and checks it.
    pub fn read_batch(&self, at: &Located) -> Result<Vec<MetricPoint>, ReadError> {
        let name = segment_name(at.segment);
        let mut record = vec![0; at.header.record_len() as usize];
        File::open(self.dir.join(&name))
            .and_then(|f| f.read_exact_at(&mut record, at.offset))
            .map_err(|e| ReadError::Io(self.error("read a batch", e)))?;
        record::decode_points(&at.header, &record).map_err(|damage| ReadError::Damaged {
            name,
            offset: at.offset,
            damage,
        })
    }

    /// Records that every batch below `ordinal` was delivered.
    pub fn write_cursor(&self, ordinal: u64) -> Result<(), SpoolError> {
        self.cursor
            .write_all_at(&record::encode_cursor(ordinal), 0)
            .map_err(|e| self.error("write the cursor", e))
    }

    /// Deletes a segment whose points all went (delivered, refused for good, or dropped to
    /// make room). The current segment is closed first, so the next append starts a new one.
    pub fn remove_segment(&mut self, first: u64) -> Result<(), SpoolError> {
        if self.current_segment() == Some(first) {
            self.current = None;
        }
        self.segments.remove(&first);
        std::fs::remove_file(self.dir.join(segment_name(first)))
            .map_err(|e| self.error("delete a delivered segment", e))
    }

    fn error(&self, doing: &'static str, source: io::Error) -> SpoolError {
        SpoolError::Io {
            dir: self.dir.clone(),
            doing,
            source,
        }
    }
}

/// Why a stored batch could not be read back.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    /// The record is damaged.
    #[error("{name} at offset {offset}: {damage}")]
    Damaged {
        /// The segment's name.
        name: String,
        /// Where the record starts.
        offset: u64,
        /// What is wrong with it.
        damage: RecordError,
    },
    /// The segment could not be read at all.
    #[error(transparent)]
    Io(SpoolError),
}

fn segment_name(first: u64) -> String {
    format!("{first:020}{SEGMENT_SUFFIX}")
}

/// Starts writing `len` bytes at `offset` back to the device without waiting. Through libc:
/// neither nix nor rustix wraps `sync_file_range`. Advisory: if it fails, the `fdatasync`
/// that follows does all the work.
fn start_writeback(file: &File, offset: u64, len: u64) {
    let (Ok(offset), Ok(len)) = (i64::try_from(offset), i64::try_from(len)) else {
        return;
    };
    // SAFETY: a system call on a descriptor `file` keeps open for the call; no memory is
    // passed.
    unsafe {
        libc::sync_file_range(file.as_raw_fd(), offset, len, libc::SYNC_FILE_RANGE_WRITE);
    }
}

fn lock(dir: &Path) -> Result<Flock<File>, SpoolError> {
    let path = dir.join(LOCK);
    let file = owner_only()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(|source| SpoolError::Io {
            dir: dir.to_owned(),
            doing: "open the lock file",
            source,
        })?;
    match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
        Ok(mut locked) => {
            // The pid is only for the other agent's error message.
            let _ = locked
                .set_len(0)
                .and_then(|()| locked.write_all(format!("{}\n", std::process::id()).as_bytes()));
            Ok(locked)
        }
        Err((_, nix::errno::Errno::EWOULDBLOCK)) => {
            let holder = std::fs::read_to_string(&path)
                .ok()
                .and_then(|t| t.trim().parse::<u32>().ok())
                .map_or_else(String::new, |pid| format!(" (pid {pid})"));
            Err(SpoolError::Locked {
                dir: dir.to_owned(),
                holder,
            })
        }
        Err((_, errno)) => Err(SpoolError::Io {
            dir: dir.to_owned(),
            doing: "lock the directory",
            source: errno.into(),
        }),
    }
}

/// Options for the files the agent creates in the directory: readable by the agent only, as
/// the points name peers and their addresses.
fn owner_only() -> OpenOptions {
    let mut options = OpenOptions::new();
    options.mode(0o600);
    options
}

fn set_aside(dir: &Path, name: &str) -> io::Result<()> {
    std::fs::rename(dir.join(name), dir.join(format!("{name}{CORRUPT_SUFFIX}")))
}

#[cfg(test)]
mod tests {
    use super::super::fixtures::{ns, numbered, TestDir};
    use super::*;

    #[test]
    fn points_sealed_after_they_were_journaled_come_back_once() {
        let dir = TestDir::new();
        let (mut spool, rec) = Spool::open(&dir.0, SEGMENT_BYTES).unwrap();
        assert_eq!((rec.next, rec.batches.len()), (0, 0));
        spool.append_points(0, &numbered(0..=2)).unwrap();
        spool.append_points(3, &numbered(3..=6)).unwrap();
        // A seal took the first five points, then the process died.
        let p = numbered(0..=4);
        let at = spool
            .append_batches(0, &[(Uuid::new_v4(), &p[..2]), (Uuid::new_v4(), &p[2..])])
            .unwrap();
        assert_eq!(at.len(), 2);
        drop(spool);
        let (spool, rec) = Spool::open(&dir.0, SEGMENT_BYTES).unwrap();
        assert_eq!(rec.batches.len(), 2);
        assert_eq!(ns(&spool.read_batch(&rec.batches[1]).unwrap()), [2, 3, 4]);
        assert_eq!(rec.next, 5, "points 5 and 6 are not in a batch");
        assert_eq!(ns(&rec.unsealed), [5, 6]);
        assert!(rec.damaged.is_empty(), "{:?}", rec.damaged);
    }

    #[test]
    fn a_torn_append_is_skipped_and_said_and_the_next_start_writes_a_segment_of_its_own() {
        let dir = TestDir::new();
        let (mut spool, _) = Spool::open(&dir.0, SEGMENT_BYTES).unwrap();
        spool
            .append_batches(0, &[(Uuid::new_v4(), &numbered(0..=1))])
            .unwrap();
        let segment = dir.0.join(segment_name(0));
        let len = std::fs::metadata(&segment).unwrap().len();
        spool.append_points(2, &numbered(2..=3)).unwrap();
        drop(spool);
        // The last append was cut short by a crash.
        let file = OpenOptions::new().write(true).open(&segment).unwrap();
        file.set_len(len + 30).unwrap();
        let (mut spool, rec) = Spool::open(&dir.0, SEGMENT_BYTES).unwrap();
        assert_eq!(rec.batches.len(), 1);
        assert!(rec.unsealed.is_empty());
        assert_eq!(rec.next, 2);
        assert_eq!(rec.damaged.len(), 1, "{:?}", rec.damaged);
        assert!(rec.damaged[0].contains("30 bytes"), "{:?}", rec.damaged);
        spool.append_points(2, &numbered(2..=2)).unwrap();
        assert_eq!(spool.current_segment(), Some(2));
        assert_eq!(
            std::fs::metadata(&segment).unwrap().len(),
            len + 30,
            "never written over"
        );
    }

    #[test]
    fn the_files_are_the_agents_alone() {
        use std::os::unix::fs::PermissionsExt;
        let dir = TestDir::new();
        let (mut spool, _) = Spool::open(&dir.0, SEGMENT_BYTES).unwrap();
        spool.append_points(0, &numbered(0..=0)).unwrap();
        for name in [LOCK, CURSOR, &segment_name(0)] {
            let mode = std::fs::metadata(dir.0.join(name))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600, "{name}");
        }
    }

    #[test]
    fn a_second_opener_is_refused_with_the_holders_pid() {
        let dir = TestDir::new();
        let _first = Spool::open(&dir.0, SEGMENT_BYTES).unwrap();
        let err = Spool::open(&dir.0, SEGMENT_BYTES).unwrap_err();
        assert!(matches!(err, SpoolError::Locked { .. }), "{err}");
        let text = err.to_string();
        assert!(
            text.contains(&format!("(pid {})", std::process::id())) && text.contains("in use"),
            "{text}"
        );
    }

    #[test]
    fn a_missing_directory_is_not_created_and_says_what_to_do() {
        let dir = TestDir::new();
        let missing = dir.0.join("absent");
        let err = Spool::open(&missing, SEGMENT_BYTES).unwrap_err();
        assert!(err.to_string().contains("absent"), "{err}");
        assert!(
            err.advice().contains("create the directory"),
            "{}",
            err.advice()
        );
        assert!(!missing.exists());
    }
}
