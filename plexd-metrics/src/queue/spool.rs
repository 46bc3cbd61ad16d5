//! The queue's directory: the one place that opens, syncs, renames and deletes its files.
//!
//! ```text
//! DIR/lock                                 flock(2)ed while an agent uses DIR; holds its pid
//! DIR/journal                              points collected since the last seal
//! DIR/<first:020>-<end:020>.batch          one sealed batch (see `record`)
//! DIR/*.tmp                                a batch being written; removed at the next start
//! DIR/*.corrupt                            set aside by an agent: damaged or of another layout
//! ```
//!
//! A batch file is written under a temporary name, synced, renamed, and the directory synced
//! once per seal, so a batch file exists whole or not at all. Its name carries its ordinals,
//! so that start-up learns the queue's order and size from one directory listing without
//! reading 256 MiB; the content is checked (and a damaged file set aside) when the batch
//! comes to the head of the queue.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use nix::fcntl::{Flock, FlockArg};
use uuid::Uuid;

use super::record::{self, BatchRecord, RecordError, JOURNAL_HEADER};
use crate::api::MetricPoint;

const LOCK: &str = "lock";
const JOURNAL: &str = "journal";
const BATCH_SUFFIX: &str = ".batch";
const TMP_SUFFIX: &str = ".tmp";
const CORRUPT_SUFFIX: &str = ".corrupt";

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
        /// What the agent was doing, e.g. "write the journal".
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

/// A batch file as listed: what its name says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredBatch {
    /// Ordinal of its first point.
    pub first: u64,
    /// Ordinal after its last point.
    pub end: u64,
    /// Its size on disk.
    pub bytes: u64,
}

impl StoredBatch {
    /// Points in the batch, by its name.
    pub fn points(&self) -> u64 {
        self.end - self.first
    }

    fn file_name(&self) -> String {
        format!("{:020}-{:020}{BATCH_SUFFIX}", self.first, self.end)
    }
}

/// What a directory held when it was opened.
#[derive(Debug, Default)]
pub struct Recovered {
    /// Sealed batches, oldest first.
    pub batches: Vec<StoredBatch>,
    /// Journal points not yet in any batch, oldest first, with the ordinal of the first.
    pub unsealed: Vec<MetricPoint>,
    /// Ordinal of `unsealed[0]`, and of the next point when it is empty.
    pub next: u64,
    /// Files set aside or skipped, each described for the log.
    pub damaged: Vec<String>,
}

/// An open, locked queue directory.
#[derive(Debug)]
pub struct Spool {
    dir: PathBuf,
    // Held for as long as the spool lives; the kernel releases it when the process dies.
    _lock: Flock<File>,
    journal: File,
    journal_len: u64,
}

impl Spool {
    /// Locks `dir`, sets aside what it cannot read and returns what it holds.
    /// The directory is not created: a missing one is usually a volume not mounted yet.
    pub fn open(dir: &Path) -> Result<(Self, Recovered), SpoolError> {
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
        let mut journal_bytes = None;
        for entry in std::fs::read_dir(dir).map_err(io("list the directory"))? {
            let entry = entry.map_err(io("list the directory"))?;
            let name = entry.file_name();
            let Some(name) = name.to_str() else {
                recovered
                    .damaged
                    .push(format!("skipped {:?}: not a queue file", entry.file_name()));
                continue;
            };
            if name == LOCK || name.ends_with(CORRUPT_SUFFIX) {
                continue;
            }
            if name.ends_with(TMP_SUFFIX) {
                // A batch whose write a stop interrupted: its points are still in the journal.
                std::fs::remove_file(entry.path()).map_err(io("remove a temporary file"))?;
                continue;
            }
            if name == JOURNAL {
                journal_bytes = Some(std::fs::read(entry.path()).map_err(io("read the journal"))?);
                continue;
            }
            match parse_batch_name(name) {
                Some((first, end)) => {
                    let bytes = entry.metadata().map_err(io("list the directory"))?.len();
                    recovered.batches.push(StoredBatch { first, end, bytes });
                }
                None if name.ends_with(BATCH_SUFFIX) => {
                    set_aside(dir, name).map_err(io("set aside a damaged file"))?;
                    recovered
                        .damaged
                        .push(format!("set aside {name}: not a batch file name"));
                }
                // Someone else's file: not ours to move, but said once.
                None => recovered
                    .damaged
                    .push(format!("skipped {name}: not a queue file")),
            }
        }
        recovered.batches.sort_by_key(|b| b.first);
        let sealed_end = recovered.batches.iter().map(|b| b.end).max().unwrap_or(0);
        recovered.next = sealed_end;

        let journal_path = dir.join(JOURNAL);
        let bytes = journal_bytes.unwrap_or_default();
        let scan = match record::scan_journal(&bytes) {
            Ok(scan) => {
                if scan.torn(bytes.len()) {
                    recovered.damaged.push(format!(
                        "dropped the journal's last {} bytes: a cycle cut short",
                        bytes.len() - scan.valid_len
                    ));
                }
                scan
            }
            Err(e) => {
                set_aside(dir, JOURNAL).map_err(io("set aside a damaged journal"))?;
                recovered
                    .damaged
                    .push(format!("set aside the journal: {e}"));
                record::JournalScan {
                    records: Vec::new(),
                    valid_len: 0,
                }
            }
        };
        for rec in scan.records {
            let end = rec.first + rec.points.len() as u64;
            if end <= sealed_end {
                continue;
            }
            let skip = sealed_end.saturating_sub(rec.first) as usize;
            if recovered.unsealed.is_empty() {
                recovered.next = rec.first + skip as u64;
            }
            recovered.unsealed.extend(rec.points.into_iter().skip(skip));
        }

        let journal = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&journal_path)
            .map_err(io("open the journal"))?;
        let mut spool = Self {
            dir: dir.to_owned(),
            _lock: lock,
            journal,
            journal_len: 0,
        };
        if scan.valid_len >= JOURNAL_HEADER {
            // Cut the torn tail, so that the next record follows the last complete one.
            spool
                .journal
                .set_len(scan.valid_len as u64)
                .and_then(|()| spool.journal.sync_data())
                .map_err(io("truncate the journal"))?;
            spool.journal_len = scan.valid_len as u64;
        } else {
            spool.reset_journal()?;
        }
        Ok((spool, recovered))
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Bytes the journal holds now.
    pub fn journal_bytes(&self) -> u64 {
        self.journal_len
    }

    /// Appends one cycle's points, numbered from `first`, and syncs them: one write and one
    /// `fdatasync` per cycle. On failure the journal is cut back to its last record.
    pub fn append(&mut self, first: u64, points: &[MetricPoint]) -> Result<(), SpoolError> {
        let bytes = record::encode_journal_record(first, points);
        let written = self
            .journal
            .write_all_at(&bytes, self.journal_len)
            .and_then(|()| self.journal.sync_data());
        match written {
            Ok(()) => {
                self.journal_len += bytes.len() as u64;
                Ok(())
            }
            Err(source) => {
                let _ = self.journal.set_len(self.journal_len);
                Err(self.error("write the journal", source))
            }
        }
    }

    /// Writes one sealed batch: to a temporary name, synced, renamed. The rename is durable
    /// once [`Spool::sync_dir`] returned.
    pub fn write_batch(
        &self,
        first: u64,
        key: Uuid,
        points: &[MetricPoint],
    ) -> Result<StoredBatch, SpoolError> {
        let bytes = record::encode_batch(first, key, points);
        let stored = StoredBatch {
            first,
            end: first + points.len() as u64,
            bytes: bytes.len() as u64,
        };
        let name = stored.file_name();
        let tmp = self.dir.join(format!("{name}{TMP_SUFFIX}"));
        let written = File::create(&tmp)
            .and_then(|mut f| f.write_all(&bytes).and_then(|()| f.sync_data()))
            .and_then(|()| std::fs::rename(&tmp, self.dir.join(&name)));
        if let Err(source) = written {
            let _ = std::fs::remove_file(&tmp);
            return Err(self.error("write a batch", source));
        }
        Ok(stored)
    }

    /// Makes the renames since the last call durable.
    pub fn sync_dir(&self) -> Result<(), SpoolError> {
        File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| self.error("sync the directory", e))
    }

    /// Empties the journal once its points are sealed into batches.
    pub fn reset_journal(&mut self) -> Result<(), SpoolError> {
        let header = record::journal_header();
        let reset = self
            .journal
            .set_len(0)
            .and_then(|()| self.journal.write_all_at(&header, 0))
            .and_then(|()| self.journal.sync_data());
        match reset {
            Ok(()) => {
                self.journal_len = header.len() as u64;
                Ok(())
            }
            Err(e) => Err(self.error("reset the journal", e)),
        }
    }

    /// Reads a batch back. A damaged file is set aside (`*.corrupt`) and the error says why.
    pub fn read_batch(&self, stored: &StoredBatch) -> Result<BatchRecord, ReadError> {
        let name = stored.file_name();
        let path = self.dir.join(&name);
        let mut bytes = Vec::with_capacity(stored.bytes as usize);
        File::open(&path)
            .and_then(|mut f| f.read_to_end(&mut bytes))
            .map_err(|e| ReadError::Io(self.error("read a batch", e)))?;
        let damage = match record::decode_batch(&bytes) {
            Ok(batch) if batch.first == stored.first && batch.end() == stored.end => {
                return Ok(batch)
            }
            Ok(batch) => RecordError::Inconsistent(format!(
                "holds ordinals {}..{}",
                batch.first,
                batch.end()
            )),
            Err(e) => e,
        };
        let _ = set_aside(&self.dir, &name);
        Err(ReadError::Damaged { name, damage })
    }

    /// Deletes a batch that its destination took (or refused for good).
    pub fn remove(&self, stored: &StoredBatch) -> Result<(), SpoolError> {
        std::fs::remove_file(self.dir.join(stored.file_name()))
            .map_err(|e| self.error("delete a delivered batch", e))
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
    /// The file is damaged; it was set aside.
    #[error("set aside {name}: {damage}")]
    Damaged {
        /// The file's name.
        name: String,
        /// What is wrong with it.
        damage: RecordError,
    },
    /// The file could not be read at all.
    #[error(transparent)]
    Io(SpoolError),
}

fn lock(dir: &Path) -> Result<Flock<File>, SpoolError> {
    let path = dir.join(LOCK);
    let file = OpenOptions::new()
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

fn set_aside(dir: &Path, name: &str) -> io::Result<()> {
    std::fs::rename(dir.join(name), dir.join(format!("{name}{CORRUPT_SUFFIX}")))
}

fn parse_batch_name(name: &str) -> Option<(u64, u64)> {
    let stem = name.strip_suffix(BATCH_SUFFIX)?;
    let (first, end) = stem.split_once('-')?;
    if first.len() != 20 || end.len() != 20 {
        return None;
    }
    let (first, end) = (first.parse().ok()?, end.parse().ok()?);
    (end > first).then_some((first, end))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A directory under the system's temporary directory, removed on drop.
    pub(crate) struct TestDir(pub PathBuf);

    impl TestDir {
        pub(crate) fn new() -> Self {
            let dir = std::env::temp_dir().join(format!("plexd-spool-{}", Uuid::new_v4()));
            std::fs::create_dir(&dir).unwrap();
            Self(dir)
        }
    }

    impl Drop for TestDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn points(range: std::ops::Range<u64>) -> Vec<MetricPoint> {
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

    #[test]
    fn batch_names_sort_as_their_ordinals() {
        let a = StoredBatch {
            first: 9,
            end: 10,
            bytes: 0,
        };
        let b = StoredBatch {
            first: 10,
            end: 200,
            bytes: 0,
        };
        assert!(a.file_name() < b.file_name());
        assert_eq!(parse_batch_name(&b.file_name()), Some((10, 200)));
        for bad in [
            "1-2.batch",
            "x.batch",
            "00000000000000000002-00000000000000000001.batch",
        ] {
            assert_eq!(parse_batch_name(bad), None, "{bad}");
        }
    }

    #[test]
    fn a_crash_between_the_batches_of_one_seal_loses_and_repeats_nothing() {
        let dir = TestDir::new();
        let (mut spool, rec) = Spool::open(&dir.0).unwrap();
        assert_eq!((rec.next, rec.batches.len()), (0, 0));
        spool.append(0, &points(0..3)).unwrap();
        spool.append(3, &points(3..7)).unwrap();
        // The seal wrote the first of two batches (0..5) and then the process died.
        spool.write_batch(0, Uuid::new_v4(), &points(0..5)).unwrap();
        drop(spool);
        let (_, rec) = Spool::open(&dir.0).unwrap();
        assert_eq!(rec.batches.len(), 1);
        assert_eq!(rec.next, 5, "points 5 and 6 are not in a batch");
        let ns: Vec<u64> = rec
            .unsealed
            .iter()
            .map(|p| p.data.to_value()["n"].as_u64().unwrap())
            .collect();
        assert_eq!(ns, [5, 6]);
    }

    #[test]
    fn a_second_opener_is_refused_with_the_holders_pid() {
        let dir = TestDir::new();
        let _first = Spool::open(&dir.0).unwrap();
        let err = Spool::open(&dir.0).unwrap_err();
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
        let err = Spool::open(&missing).unwrap_err();
        assert!(err.to_string().contains("absent"), "{err}");
        assert!(
            err.advice().contains("create the directory"),
            "{}",
            err.advice()
        );
        assert!(!missing.exists());
    }
}
