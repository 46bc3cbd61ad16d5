//! The durable queue's two kinds of record, as bytes: sealed batches (one file each) and the
//! journal of points collected since the last seal. Pure: no files, no clocks.
//!
//! Why two kinds: a batch exists only at the report tick (or when `batch_size` points have
//! gathered), but a point must be durable from the collect cycle that made it. So each cycle
//! appends one record to the journal and syncs it once; at the seal the journal's points
//! become batch files, each with the `Idempotency-Key` it keeps through every attempt and
//! every restart, and the journal is emptied.
//!
//! Points are numbered from the first the directory ever held (their *ordinal*). A batch file
//! names the ordinals it holds, `[first, end)`, and a journal record the ordinal of its first
//! point. After a crash in the middle of a seal, the journal's points below the highest `end`
//! of any batch file are already in a batch; the rest are not. So no point is lost and none is
//! sent under two keys, whichever write the crash interrupted.
//!
//! Batch file (little-endian):
//!
//! ```text
//! 0   "PXMB"        magic
//! 4   u16           layout version (VERSION)
//! 6   u16           0 (reserved)
//! 8   u64           first ordinal
//! 16  u64           end ordinal (first + points)
//! 24  [u8; 16]      idempotency key
//! 40  u32           payload length
//! 44  payload       the points as the JSON array the control plane receives
//! ..  u32           CRC-32 of everything before it
//! ```
//!
//! Journal: an 8-byte header (`"PXMJ"`, u16 version, u16 0), then records of
//! `u32 payload length, u32 CRC-32 of the rest, u64 first ordinal, payload`. A record that is
//! cut short, zero-filled or damaged ends the journal: what follows it was never synced
//! after it (records are appended and synced one at a time), so it is the cycle a crash
//! interrupted.
//!
//! CRC-32 (crc32fast, hardware-accelerated) detects every burst of up to 32 flipped bits and
//! torn writes; the payload is JSON so that a record stays readable with `tail -c +45`.

use uuid::Uuid;

use crate::api::MetricPoint;

/// The layout version written into every batch file and journal. A reader refuses other
/// versions by name instead of guessing at their bytes.
pub const VERSION: u16 = 1;

const BATCH_MAGIC: [u8; 4] = *b"PXMB";
const JOURNAL_MAGIC: [u8; 4] = *b"PXMJ";
const BATCH_HEADER: usize = 44;
/// Length of the journal's file header.
pub const JOURNAL_HEADER: usize = 8;
const RECORD_HEADER: usize = 16;
const CRC: usize = 4;

/// Why bytes are not a valid batch file.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RecordError {
    /// Shorter than its header or than the length it states.
    #[error("truncated: {len} bytes, {expected} expected")]
    Truncated {
        /// Bytes present.
        len: usize,
        /// Bytes the header says there are.
        expected: usize,
    },
    /// Not a file this agent writes.
    #[error("not a plexd-metrics queue file (no PXMB/PXMJ magic)")]
    Magic,
    /// Written by an agent with another layout.
    #[error("layout version {0}, this agent reads version {VERSION} only")]
    Version(u16),
    /// The checksum does not match: a flipped bit, a torn write.
    #[error("checksum mismatch")]
    Checksum,
    /// The checksum matches but the content contradicts itself.
    #[error("inconsistent: {0}")]
    Inconsistent(String),
}

/// A sealed batch as stored: its ordinals, its key and its points.
#[derive(Debug, Clone, PartialEq)]
pub struct BatchRecord {
    /// Ordinal of the first point.
    pub first: u64,
    /// The key every attempt of this batch carries.
    pub key: Uuid,
    /// The points, in collection order.
    pub points: Vec<MetricPoint>,
}

impl BatchRecord {
    /// Ordinal after the last point.
    pub fn end(&self) -> u64 {
        self.first + self.points.len() as u64
    }
}

/// Encodes a batch file.
pub fn encode_batch(first: u64, key: Uuid, points: &[MetricPoint]) -> Vec<u8> {
    let payload = serde_json::to_vec(points).expect("points serialise to JSON");
    let mut out = Vec::with_capacity(BATCH_HEADER + payload.len() + CRC);
    out.extend_from_slice(&BATCH_MAGIC);
    out.extend_from_slice(&VERSION.to_le_bytes());
    out.extend_from_slice(&0u16.to_le_bytes());
    out.extend_from_slice(&first.to_le_bytes());
    out.extend_from_slice(&(first + points.len() as u64).to_le_bytes());
    out.extend_from_slice(key.as_bytes());
    out.extend_from_slice(&payload_len(&payload).to_le_bytes());
    out.extend_from_slice(&payload);
    let crc = crc32fast::hash(&out);
    out.extend_from_slice(&crc.to_le_bytes());
    out
}

/// Decodes a whole batch file; anything but a complete, intact file of [`VERSION`] is an error.
pub fn decode_batch(bytes: &[u8]) -> Result<BatchRecord, RecordError> {
    check_magic(bytes, BATCH_MAGIC)?;
    if bytes.len() < BATCH_HEADER {
        return Err(RecordError::Truncated {
            len: bytes.len(),
            expected: BATCH_HEADER,
        });
    }
    let len = u32_at(bytes, 40) as usize;
    let total = BATCH_HEADER + len + CRC;
    if bytes.len() < total {
        return Err(RecordError::Truncated {
            len: bytes.len(),
            expected: total,
        });
    }
    if bytes.len() > total {
        return Err(RecordError::Inconsistent(format!(
            "{} bytes after the checksum",
            bytes.len() - total
        )));
    }
    let body = &bytes[..total - CRC];
    if crc32fast::hash(body) != u32_at(bytes, total - CRC) {
        return Err(RecordError::Checksum);
    }
    let (first, end) = (u64_at(bytes, 8), u64_at(bytes, 16));
    let key = Uuid::from_bytes(bytes[24..40].try_into().expect("16 bytes"));
    let points: Vec<MetricPoint> = serde_json::from_slice(&body[BATCH_HEADER..])
        .map_err(|e| RecordError::Inconsistent(format!("payload: {e}")))?;
    if end.checked_sub(first) != Some(points.len() as u64) {
        return Err(RecordError::Inconsistent(format!(
            "header says ordinals {first}..{end}, payload has {} points",
            points.len()
        )));
    }
    Ok(BatchRecord { first, key, points })
}

/// The journal's file header.
pub fn journal_header() -> [u8; JOURNAL_HEADER] {
    let mut out = [0; JOURNAL_HEADER];
    out[..4].copy_from_slice(&JOURNAL_MAGIC);
    out[4..6].copy_from_slice(&VERSION.to_le_bytes());
    out
}

/// Encodes one journal record: the points of one collect cycle, the first numbered `first`.
pub fn encode_journal_record(first: u64, points: &[MetricPoint]) -> Vec<u8> {
    let payload = serde_json::to_vec(points).expect("points serialise to JSON");
    let mut out = Vec::with_capacity(RECORD_HEADER + payload.len());
    out.extend_from_slice(&payload_len(&payload).to_le_bytes());
    out.extend_from_slice(&[0; 4]);
    out.extend_from_slice(&first.to_le_bytes());
    out.extend_from_slice(&payload);
    let crc = crc32fast::hash(&out[8..]);
    out[4..8].copy_from_slice(&crc.to_le_bytes());
    out
}

/// One collect cycle's points as the journal holds them.
#[derive(Debug, Clone, PartialEq)]
pub struct JournalRecord {
    /// Ordinal of the first point.
    pub first: u64,
    /// The points.
    pub points: Vec<MetricPoint>,
}

/// What a journal holds: its complete records, and where the valid part ends.
#[derive(Debug, Clone, PartialEq)]
pub struct JournalScan {
    /// The complete, intact records, in order.
    pub records: Vec<JournalRecord>,
    /// Bytes from the start that are header and complete records; the rest is a torn tail.
    pub valid_len: usize,
}

impl JournalScan {
    /// Whether bytes follow the last complete record (a cycle cut short by a crash, or damage).
    pub fn torn(&self, file_len: usize) -> bool {
        file_len > self.valid_len
    }
}

/// Reads a journal. An unknown magic or version is an error (the whole file is set aside);
/// a bad record ends the scan without error, since it can only be the last write.
pub fn scan_journal(bytes: &[u8]) -> Result<JournalScan, RecordError> {
    if bytes.is_empty() {
        return Ok(JournalScan {
            records: Vec::new(),
            valid_len: 0,
        });
    }
    if bytes.len() < JOURNAL_HEADER {
        // A header cut short: the journal was being created when the process died.
        return if journal_header().starts_with(bytes) {
            Ok(JournalScan {
                records: Vec::new(),
                valid_len: 0,
            })
        } else {
            Err(RecordError::Magic)
        };
    }
    check_magic(bytes, JOURNAL_MAGIC)?;
    let mut records = Vec::new();
    let mut at = JOURNAL_HEADER;
    while let Some((record, next)) = journal_record_at(bytes, at) {
        records.push(record);
        at = next;
    }
    Ok(JournalScan {
        records,
        valid_len: at,
    })
}

fn journal_record_at(bytes: &[u8], at: usize) -> Option<(JournalRecord, usize)> {
    let header = bytes.get(at..at + RECORD_HEADER)?;
    let len = u32_at(header, 0) as usize;
    let end = at.checked_add(RECORD_HEADER)?.checked_add(len)?;
    let covered = bytes.get(at + 8..end)?;
    if crc32fast::hash(covered) != u32_at(header, 4) {
        return None;
    }
    let points: Vec<MetricPoint> = serde_json::from_slice(&covered[8..]).ok()?;
    if points.is_empty() {
        return None;
    }
    let first = u64_at(header, 8);
    Some((JournalRecord { first, points }, end))
}

/// Checks the magic and the version, which both kinds keep in their first 6 bytes.
fn check_magic(bytes: &[u8], magic: [u8; 4]) -> Result<(), RecordError> {
    if bytes.len() < 6 {
        return if magic.starts_with(bytes) {
            Err(RecordError::Truncated {
                len: bytes.len(),
                expected: 6,
            })
        } else {
            Err(RecordError::Magic)
        };
    }
    if bytes[..4] != magic {
        return Err(RecordError::Magic);
    }
    match u16::from_le_bytes([bytes[4], bytes[5]]) {
        VERSION => Ok(()),
        other => Err(RecordError::Version(other)),
    }
}

fn payload_len(payload: &[u8]) -> u32 {
    // One collect cycle or one batch is far below 4 GiB (batch_size is bounded by the queue).
    u32::try_from(payload.len()).expect("a record under 4 GiB")
}

fn u32_at(bytes: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(bytes[at..at + 4].try_into().expect("4 bytes"))
}

fn u64_at(bytes: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(bytes[at..at + 8].try_into().expect("8 bytes"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn points(n: usize, tag: u64) -> Vec<MetricPoint> {
        (0..n)
            .map(|i| {
                MetricPoint::new(
                    chrono::Utc::now(),
                    "tunnel",
                    format!("peer-{i}"),
                    &serde_json::json!({"tag": tag, "i": i, "s": "é\"\\"}),
                )
                .unwrap()
            })
            .collect()
    }

    #[test]
    fn a_batch_comes_back_whole() {
        let key = Uuid::new_v4();
        let p = points(3, 1);
        let bytes = encode_batch(40, key, &p);
        let back = decode_batch(&bytes).unwrap();
        assert_eq!((back.first, back.end(), back.key), (40, 43, key));
        assert_eq!(back.points, p);
    }

    #[test]
    fn a_batch_of_another_version_or_kind_is_refused_by_name() {
        let mut bytes = encode_batch(0, Uuid::new_v4(), &points(1, 1));
        bytes[4] = 9;
        assert_eq!(decode_batch(&bytes), Err(RecordError::Version(9)));
        assert_eq!(decode_batch(b"hello, world"), Err(RecordError::Magic));
        assert_eq!(decode_batch(&[0; 4096]), Err(RecordError::Magic));
        assert_eq!(
            decode_batch(&journal_header()),
            Err(RecordError::Magic),
            "a journal is not a batch"
        );
    }

    #[test]
    fn a_journal_reads_back_its_records_and_stops_at_damage() {
        let mut bytes = journal_header().to_vec();
        let (a, b) = (points(2, 1), points(3, 2));
        bytes.extend(encode_journal_record(0, &a));
        let after_a = bytes.len();
        bytes.extend(encode_journal_record(2, &b));
        let scan = scan_journal(&bytes).unwrap();
        assert_eq!(scan.valid_len, bytes.len());
        assert_eq!(
            scan.records,
            [
                JournalRecord {
                    first: 0,
                    points: a.clone()
                },
                JournalRecord {
                    first: 2,
                    points: b
                }
            ]
        );
        // A zero-filled tail (what a file system may leave after a crash) is not a record.
        let mut zeros = bytes[..after_a].to_vec();
        zeros.extend([0; 64]);
        let scan = scan_journal(&zeros).unwrap();
        assert_eq!((scan.records.len(), scan.valid_len), (1, after_a));
        assert!(scan.torn(zeros.len()));
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        /// Cut a journal of random cycles at every byte offset: exactly the records that lie
        /// wholly before the cut come back, and the valid part ends right after the last.
        #[test]
        fn a_journal_cut_anywhere_gives_back_exactly_its_complete_records(
            cycles in prop::collection::vec(1usize..4, 1..5),
        ) {
            let mut bytes = journal_header().to_vec();
            let mut ends = vec![];
            let mut written = vec![];
            let mut first = 0;
            for (tag, n) in cycles.iter().enumerate() {
                let p = points(*n, tag as u64);
                bytes.extend(encode_journal_record(first, &p));
                ends.push(bytes.len());
                written.push(JournalRecord { first, points: p });
                first += *n as u64;
            }
            for cut in 0..=bytes.len() {
                let scan = scan_journal(&bytes[..cut]).unwrap();
                let complete = ends.iter().filter(|&&e| e <= cut).count();
                prop_assert_eq!(&scan.records[..], &written[..complete]);
                let valid = if complete == 0 {
                    if cut >= JOURNAL_HEADER { JOURNAL_HEADER } else { 0 }
                } else {
                    ends[complete - 1]
                };
                prop_assert_eq!(scan.valid_len, valid, "cut at {}", cut);
            }
        }

        /// A batch file cut short anywhere, or with any one byte changed, never decodes.
        #[test]
        fn a_damaged_batch_never_decodes(n in 1usize..5, at in any::<prop::sample::Index>(), flip in 1u8..=255) {
            let bytes = encode_batch(7, Uuid::new_v4(), &points(n, 3));
            for cut in 0..bytes.len() {
                prop_assert!(decode_batch(&bytes[..cut]).is_err());
            }
            let mut damaged = bytes.clone();
            let i = at.index(damaged.len());
            damaged[i] ^= flip;
            prop_assert!(decode_batch(&damaged).is_err(), "byte {} changed", i);
        }

        /// Arbitrary bytes never panic either reader.
        #[test]
        fn junk_never_panics(bytes in prop::collection::vec(any::<u8>(), 0..256), journal in any::<bool>()) {
            let mut input = bytes;
            if journal && input.len() >= JOURNAL_HEADER {
                input[..JOURNAL_HEADER].copy_from_slice(&journal_header());
            }
            let _ = decode_batch(&input);
            let _ = scan_journal(&input);
        }
    }
}
