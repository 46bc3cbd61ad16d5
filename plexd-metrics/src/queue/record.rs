//! The durable queue's records, as bytes. Pure: no files, no clocks.
//!
//! The queue's directory is a log: segment files of records appended one after another and
//! synced once per collect cycle, never rewritten. Two kinds of record:
//!
//! - a **points** record holds the points of a collect cycle that did not complete a batch,
//!   so that they are durable from the cycle that made them;
//! - a **batch** record holds one sealed batch: its points and the `Idempotency-Key` it keeps
//!   through every attempt and every restart. A seal appends all of its batches at once. A
//!   cycle that completes a batch goes straight into the seal, so a node whose cycles fill a
//!   batch writes each point once.
//!
//! Points are numbered from the first the directory ever held (their *ordinal*); every record
//! names the ordinals it holds, `[first, end)`. Reading a directory back, the batches are the
//! queue in order, and the points records at or beyond the highest batch `end` are the
//! points collected since the last seal; those below were sealed already. So no point is lost
//! and none is sent under two keys, wherever a crash cut the log.
//!
//! Record (little-endian):
//!
//! ```text
//! 0   "PXMR"        magic
//! 4   u16           layout version (VERSION)
//! 6   u8            kind: 1 points, 2 batch
//! 7   u8            0 (reserved)
//! 8   u64           first ordinal
//! 16  u64           end ordinal (first + points)
//! 24  [u8; 16]      idempotency key (zero in a points record)
//! 40  u32           payload length
//! 44  u32           CRC-32 of bytes 0..44 and of the payload
//! 48  payload       the points, one after another:
//!                     i64 seconds and u32 nanoseconds of the timestamp (UTC),
//!                     u16 length and the group, u16 length and the peer id,
//!                     u32 length and the data's JSON text
//! ```
//!
//! A point's data is JSON text in memory already; framed by lengths, a record is written by
//! copying, without the escaping and timestamp formatting of a JSON array, which were most of
//! the time of making a large cycle durable. Reading it back checks every length, the UTF-8
//! and that each data is a JSON object.
//!
//! The header alone says where the next record starts, so start-up walks 256 MiB of log by
//! reading a few thousand headers; a payload's checksum is checked when it is read for
//! delivery. CRC-32 (crc32fast, hardware-accelerated) detects every burst of up to 32 flipped
//! bits.
//!
//! The cursor file names the ordinal below which every batch was delivered, so that a restart
//! does not send again the delivered batches of a segment whose others still wait:
//! `"PXMC"`, u16 version, u16 0, u64 ordinal, u32 CRC-32 of the 16 bytes before.

use chrono::DateTime;
use uuid::Uuid;

use crate::api::{MetricPoint, PointData};

/// The layout version written into every record. A reader refuses other versions by name
/// instead of guessing at their bytes.
pub const VERSION: u16 = 1;
/// Length of a record's header.
pub const HEADER: usize = 48;
/// Length of the cursor file.
pub const CURSOR_LEN: usize = 20;

const RECORD_MAGIC: [u8; 4] = *b"PXMR";
const CURSOR_MAGIC: [u8; 4] = *b"PXMC";

/// What a record holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// Points of a collect cycle, not yet in a batch.
    Points,
    /// A sealed batch.
    Batch,
}

/// Why bytes are not a valid record.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum RecordError {
    /// Shorter than its header or than the length it states.
    #[error("truncated: {len} bytes, {expected} expected")]
    Truncated {
        /// Bytes present.
        len: usize,
        /// Bytes the header says there are.
        expected: usize,
    },
    /// Not a record this agent writes (zeros, another program's bytes).
    #[error("not a plexd-metrics queue record")]
    Magic,
    /// Written by an agent with another layout.
    #[error("layout version {0}, this agent reads version {VERSION} only")]
    Version(u16),
    /// The checksum does not match: a flipped bit, a torn write.
    #[error("checksum mismatch")]
    Checksum,
    /// The header or the payload contradicts itself.
    #[error("inconsistent: {0}")]
    Inconsistent(String),
}

/// A record's header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    /// Points or batch.
    pub kind: Kind,
    /// Ordinal of the first point.
    pub first: u64,
    /// Ordinal after the last point.
    pub end: u64,
    /// The batch's idempotency key (nil for points).
    pub key: Uuid,
    /// Bytes of payload after the header.
    pub len: u32,
    crc: u32,
}

impl Header {
    /// Bytes of the whole record.
    pub fn record_len(&self) -> u64 {
        HEADER as u64 + u64::from(self.len)
    }

    /// Points in the record.
    pub fn points(&self) -> u64 {
        self.end - self.first
    }
}

/// Appends one record of `kind` holding `points`, numbered from `first`, to `out`; the points
/// are serialised in place.
pub fn encode(out: &mut Vec<u8>, kind: Kind, first: u64, key: Uuid, points: &[MetricPoint]) {
    let start = out.len();
    out.extend_from_slice(&RECORD_MAGIC);
    out.extend_from_slice(&VERSION.to_le_bytes());
    out.push(match kind {
        Kind::Points => 1,
        Kind::Batch => 2,
    });
    out.push(0);
    out.extend_from_slice(&first.to_le_bytes());
    out.extend_from_slice(&(first + points.len() as u64).to_le_bytes());
    out.extend_from_slice(key.as_bytes());
    out.extend_from_slice(&[0; 8]);
    for point in points {
        encode_point(out, point);
    }
    // One record is one cycle or one batch: far below 4 GiB.
    let len = u32::try_from(out.len() - start - HEADER).expect("a record under 4 GiB");
    out[start + 40..start + 44].copy_from_slice(&len.to_le_bytes());
    let mut crc = crc32fast::Hasher::new();
    crc.update(&out[start..start + 44]);
    crc.update(&out[start + HEADER..]);
    out[start + 44..start + HEADER].copy_from_slice(&crc.finalize().to_le_bytes());
}

/// Decodes a record's header: magic, version, kind and ordinals checked, the payload not.
pub fn decode_header(bytes: &[u8]) -> Result<Header, RecordError> {
    if bytes.len() < HEADER {
        return Err(if RECORD_MAGIC.starts_with(&bytes[..bytes.len().min(4)]) {
            RecordError::Truncated {
                len: bytes.len(),
                expected: HEADER,
            }
        } else {
            RecordError::Magic
        });
    }
    if bytes[..4] != RECORD_MAGIC {
        return Err(RecordError::Magic);
    }
    let version = u16::from_le_bytes([bytes[4], bytes[5]]);
    if version != VERSION {
        return Err(RecordError::Version(version));
    }
    let kind = match (bytes[6], bytes[7]) {
        (1, 0) => Kind::Points,
        (2, 0) => Kind::Batch,
        (kind, _) => return Err(RecordError::Inconsistent(format!("kind {kind}"))),
    };
    let (first, end) = (u64_at(bytes, 8), u64_at(bytes, 16));
    if end <= first {
        return Err(RecordError::Inconsistent(format!(
            "ordinals {first}..{end}"
        )));
    }
    Ok(Header {
        kind,
        first,
        end,
        key: Uuid::from_bytes(bytes[24..40].try_into().expect("16 bytes")),
        len: u32_at(bytes, 40),
        crc: u32_at(bytes, 44),
    })
}

/// Checks a record's payload against its header and decodes its points. `record` is the
/// whole record, header included.
pub fn decode_points(header: &Header, record: &[u8]) -> Result<Vec<MetricPoint>, RecordError> {
    let expected = header.record_len() as usize;
    if record.len() != expected {
        return Err(RecordError::Truncated {
            len: record.len(),
            expected,
        });
    }
    let mut crc = crc32fast::Hasher::new();
    crc.update(&record[..44]);
    crc.update(&record[HEADER..]);
    if crc.finalize() != header.crc {
        return Err(RecordError::Checksum);
    }
    let mut payload = Payload(&record[HEADER..]);
    let count = usize::try_from(header.points()).unwrap_or(usize::MAX);
    // Each point takes at least 20 bytes: a count beyond that is not worth allocating for.
    let mut points = Vec::with_capacity(count.min(payload.0.len() / 20));
    for _ in 0..count {
        points.push(payload.point()?);
    }
    if !payload.0.is_empty() {
        return Err(RecordError::Inconsistent(format!(
            "{} bytes after the {count} points the header names",
            payload.0.len()
        )));
    }
    Ok(points)
}

fn encode_point(out: &mut Vec<u8>, point: &MetricPoint) {
    out.extend_from_slice(&point.timestamp.timestamp().to_le_bytes());
    out.extend_from_slice(&point.timestamp.timestamp_subsec_nanos().to_le_bytes());
    // Groups are the agent's own names and peer ids WireGuard keys or their names: both far
    // below 64 KiB; the data is one group's JSON object.
    let group = u16::try_from(point.group.len()).expect("a group name under 64 KiB");
    out.extend_from_slice(&group.to_le_bytes());
    out.extend_from_slice(point.group.as_bytes());
    let peer = u16::try_from(point.peer_id.len()).expect("a peer id under 64 KiB");
    out.extend_from_slice(&peer.to_le_bytes());
    out.extend_from_slice(point.peer_id.as_bytes());
    let data = point.data.as_str();
    let len = u32::try_from(data.len()).expect("point data under 4 GiB");
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(data.as_bytes());
}

/// The unread rest of a payload.
struct Payload<'a>(&'a [u8]);

impl<'a> Payload<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], RecordError> {
        if self.0.len() < n {
            return Err(RecordError::Inconsistent(format!(
                "a point runs past the payload ({n} bytes wanted, {} left)",
                self.0.len()
            )));
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }

    fn text(&mut self, len: usize) -> Result<String, RecordError> {
        String::from_utf8(self.take(len)?.to_vec())
            .map_err(|e| RecordError::Inconsistent(format!("a point's text: {e}")))
    }

    fn point(&mut self) -> Result<MetricPoint, RecordError> {
        let secs = i64::from_le_bytes(self.take(8)?.try_into().expect("8 bytes"));
        let nanos = u32::from_le_bytes(self.take(4)?.try_into().expect("4 bytes"));
        let timestamp = DateTime::from_timestamp(secs, nanos).ok_or_else(|| {
            RecordError::Inconsistent(format!("timestamp {secs}.{nanos:09} out of range"))
        })?;
        let len = u16::from_le_bytes(self.take(2)?.try_into().expect("2 bytes"));
        let group = self.text(usize::from(len))?;
        let len = u16::from_le_bytes(self.take(2)?.try_into().expect("2 bytes"));
        let peer_id = self.text(usize::from(len))?;
        let len = u32::from_le_bytes(self.take(4)?.try_into().expect("4 bytes"));
        let data = PointData::from_text(self.text(len as usize)?)
            .map_err(|e| RecordError::Inconsistent(format!("a point's data: {e}")))?;
        Ok(MetricPoint {
            timestamp,
            group,
            peer_id,
            data,
        })
    }
}

/// Where each record of a segment starts, by its header, until the bytes end or a header is
/// cut short or damaged (the error says which).
pub fn scan(bytes: &[u8]) -> (Vec<(usize, Header)>, Option<RecordError>) {
    let read = |at: u64, buf: &mut [u8]| {
        let at = at as usize;
        buf.copy_from_slice(&bytes[at..at + buf.len()]);
        Ok::<(), std::convert::Infallible>(())
    };
    let Ok((found, damage)) = scan_with(bytes.len() as u64, read);
    let found = found.into_iter().map(|(at, h)| (at as usize, h)).collect();
    (found, damage)
}

/// What [`scan_with`] found: each record's offset and header, and the damage that ended the
/// walk early, if any.
pub type Scanned = (Vec<(u64, Header)>, Option<RecordError>);

/// [`scan`] over a segment of `len` bytes that is not in memory: `read(offset, buf)` fills
/// `buf` from the segment. Only the headers are read, so start-up walks a full directory
/// without reading the points.
pub fn scan_with<E>(
    len: u64,
    mut read: impl FnMut(u64, &mut [u8]) -> Result<(), E>,
) -> Result<Scanned, E> {
    let mut found = Vec::new();
    let mut at = 0;
    let mut buf = [0; HEADER];
    while at < len {
        let available = usize::try_from(len - at).unwrap_or(usize::MAX).min(HEADER);
        read(at, &mut buf[..available])?;
        let header = match decode_header(&buf[..available]) {
            Ok(header) => header,
            Err(e) => return Ok((found, Some(e))),
        };
        if len - at < header.record_len() {
            let e = RecordError::Truncated {
                len: usize::try_from(len - at).unwrap_or(usize::MAX),
                expected: header.record_len() as usize,
            };
            return Ok((found, Some(e)));
        }
        found.push((at, header));
        at += header.record_len();
    }
    Ok((found, None))
}

/// The cursor file: every batch below `ordinal` was delivered.
pub fn encode_cursor(ordinal: u64) -> [u8; CURSOR_LEN] {
    let mut out = [0; CURSOR_LEN];
    out[..4].copy_from_slice(&CURSOR_MAGIC);
    out[4..6].copy_from_slice(&VERSION.to_le_bytes());
    out[8..16].copy_from_slice(&ordinal.to_le_bytes());
    let crc = crc32fast::hash(&out[..16]);
    out[16..].copy_from_slice(&crc.to_le_bytes());
    out
}

/// Reads a cursor file; `None` unless it is complete and intact.
pub fn decode_cursor(bytes: &[u8]) -> Option<u64> {
    if bytes.len() != CURSOR_LEN
        || bytes[..4] != CURSOR_MAGIC
        || u16::from_le_bytes([bytes[4], bytes[5]]) != VERSION
        || crc32fast::hash(&bytes[..16]) != u32_at(bytes, 16)
    {
        return None;
    }
    Some(u64_at(bytes, 8))
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

    /// Every record of `bytes`, decoded, until the first damage.
    fn read_all(bytes: &[u8]) -> (Vec<(Header, Vec<MetricPoint>)>, bool) {
        let (found, damage) = scan(bytes);
        let mut out = Vec::new();
        for (at, header) in found {
            match decode_points(&header, &bytes[at..at + header.record_len() as usize]) {
                Ok(p) => out.push((header, p)),
                Err(_) => return (out, true),
            }
        }
        (out, damage.is_some())
    }

    #[test]
    fn records_come_back_whole_with_their_kind_ordinals_and_key() {
        let key = Uuid::new_v4();
        let (a, b) = (points(3, 1), points(2, 2));
        let mut bytes = Vec::new();
        encode(&mut bytes, Kind::Points, 40, Uuid::nil(), &a);
        encode(&mut bytes, Kind::Batch, 40, key, &b);
        let (records, damaged) = read_all(&bytes);
        assert!(!damaged);
        assert_eq!(records.len(), 2);
        let (h, p) = &records[0];
        assert_eq!(
            (h.kind, h.first, h.end, h.key),
            (Kind::Points, 40, 43, Uuid::nil())
        );
        assert_eq!(p, &a);
        let (h, p) = &records[1];
        assert_eq!((h.kind, h.first, h.end, h.key), (Kind::Batch, 40, 42, key));
        assert_eq!(p, &b);
    }

    #[test]
    fn other_versions_kinds_and_bytes_are_refused_by_name() {
        let mut bytes = Vec::new();
        encode(&mut bytes, Kind::Batch, 0, Uuid::new_v4(), &points(1, 1));
        let mut other = bytes.clone();
        other[4] = 9;
        assert_eq!(decode_header(&other), Err(RecordError::Version(9)));
        let mut other = bytes.clone();
        other[6] = 7;
        assert!(matches!(
            decode_header(&other),
            Err(RecordError::Inconsistent(_))
        ));
        assert_eq!(
            decode_header(b"hello, world, this is not a queue record at all!"),
            Err(RecordError::Magic)
        );
        assert_eq!(decode_header(&[0; 4096]), Err(RecordError::Magic));
        assert!(matches!(
            decode_header(&bytes[..20]),
            Err(RecordError::Truncated { .. })
        ));
    }

    #[test]
    fn a_cursor_reads_back_only_whole() {
        let bytes = encode_cursor(1234);
        assert_eq!(decode_cursor(&bytes), Some(1234));
        for cut in 0..bytes.len() {
            assert_eq!(decode_cursor(&bytes[..cut]), None);
        }
        let mut flipped = bytes;
        flipped[9] ^= 1;
        assert_eq!(decode_cursor(&flipped), None);
        assert_eq!(decode_cursor(&[0; CURSOR_LEN]), None);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        /// Cut a segment of random records at every byte offset: exactly the records that lie
        /// wholly before the cut come back, and a cut inside a record is reported.
        #[test]
        fn a_segment_cut_anywhere_gives_back_exactly_its_complete_records(
            records in prop::collection::vec((1usize..4, any::<bool>()), 1..5),
        ) {
            let mut bytes = Vec::new();
            let mut ends = vec![];
            let mut first = 0;
            for (tag, (n, batch)) in records.iter().enumerate() {
                let kind = if *batch { Kind::Batch } else { Kind::Points };
                encode(&mut bytes, kind, first, Uuid::new_v4(), &points(*n, tag as u64));
                ends.push(bytes.len());
                first += *n as u64;
            }
            for cut in 0..=bytes.len() {
                let (got, damaged) = read_all(&bytes[..cut]);
                let complete = ends.iter().filter(|&&e| e <= cut).count();
                prop_assert_eq!(got.len(), complete, "cut at {}", cut);
                prop_assert_eq!(damaged, cut > 0 && !ends.contains(&cut), "cut at {}", cut);
                for (i, (h, p)) in got.iter().enumerate() {
                    prop_assert_eq!(p.len(), records[i].0);
                    prop_assert_eq!(h.points() as usize, records[i].0);
                }
            }
        }

        /// Any one byte changed anywhere is found: the records before it come back, the one
        /// it is in does not.
        #[test]
        fn a_changed_byte_is_found(
            records in prop::collection::vec(1usize..4, 1..4),
            at in any::<prop::sample::Index>(),
            flip in 1u8..=255,
        ) {
            let mut bytes = Vec::new();
            let mut ends = Vec::new();
            let mut first = 0;
            for (tag, n) in records.iter().enumerate() {
                encode(&mut bytes, Kind::Batch, first, Uuid::new_v4(), &points(*n, tag as u64));
                ends.push(bytes.len());
                first += *n as u64;
            }
            let i = at.index(bytes.len());
            bytes[i] ^= flip;
            let (got, damaged) = read_all(&bytes);
            let before = ends.iter().filter(|&&e| e <= i).count();
            prop_assert!(damaged, "byte {} changed", i);
            prop_assert_eq!(got.len(), before, "byte {} changed", i);
        }

        /// Arbitrary bytes never panic a reader.
        #[test]
        fn junk_never_panics(bytes in prop::collection::vec(any::<u8>(), 0..256), magic in any::<bool>()) {
            let mut input = bytes;
            if magic && input.len() >= 8 {
                input[..4].copy_from_slice(&RECORD_MAGIC);
                input[4..6].copy_from_slice(&VERSION.to_le_bytes());
            }
            let _ = read_all(&input);
            let _ = decode_cursor(&input);
        }
    }
}
