//! Segment files: record framing, the sparse offset index, and recovery of a segment on open.
//!
//! A frame is `length u32 LE | crc32c u32 LE | offset u64 LE | time u64 LE (µs since the epoch) |
//! payload`, where `length` counts the bytes after the CRC and the CRC covers exactly those. The
//! offset inside every frame lets a scan notice a frame that is intact but out of place (a stale
//! tail, a wrong index entry) as well as a damaged one.
//!
//! The `.index` file is a hint, never the truth: 16-byte entries `offset u64 LE | position u64 LE`,
//! one whenever at least `index_interval_bytes` were appended since the previous entry. Every
//! entry is checked against the log before it is trusted, and a bad one only costs a longer scan.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;

/// Length, CRC, offset and time.
pub(super) const HEADER_BYTES: u64 = 24;
/// The bytes `length` covers besides the payload: offset and time.
const COVERED_FIXED: u32 = 16;
/// The largest payload accepted. Also what bounds the allocation a damaged length field could
/// make a scan attempt.
pub(super) const MAX_PAYLOAD: usize = 64 << 20;
const INDEX_ENTRY_BYTES: usize = 16;
/// How much a scan reads at a time: many small records per system call.
const READ_CHUNK: usize = 64 << 10;

/// The bytes a record with a payload of `payload` bytes takes on disk.
pub(super) fn frame_bytes(payload: usize) -> u64 {
    HEADER_BYTES + payload as u64
}

/// Appends one frame to `buf`. The payload must be at most [`MAX_PAYLOAD`] bytes.
pub(super) fn encode(buf: &mut Vec<u8>, offset: u64, time_us: u64, payload: &[u8]) {
    let covered = COVERED_FIXED as usize + payload.len();
    let length = u32::try_from(covered).unwrap_or(u32::MAX);
    let start = buf.len();
    buf.extend_from_slice(&length.to_le_bytes());
    buf.extend_from_slice(&[0; 4]);
    buf.extend_from_slice(&offset.to_le_bytes());
    buf.extend_from_slice(&time_us.to_le_bytes());
    buf.extend_from_slice(payload);
    let crc = crc32c::crc32c(&buf[start + 8..]);
    buf[start + 4..start + 8].copy_from_slice(&crc.to_le_bytes());
}

pub(super) fn log_file_name(base: u64) -> String {
    format!("{base:020}.log")
}

pub(super) fn index_file_name(base: u64) -> String {
    format!("{base:020}.index")
}

/// The base offset of a segment file name, `None` for anything else in the directory.
pub(super) fn parse_log_file_name(name: &str) -> Option<u64> {
    let stem = name.strip_suffix(".log")?;
    if stem.len() == 20 && stem.bytes().all(|b| b.is_ascii_digit()) {
        stem.parse().ok()
    } else {
        None
    }
}

pub(super) fn now_micros() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
}

pub(super) fn micros_to_time(micros: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_micros(micros)
}

pub(super) fn time_to_micros(time: SystemTime) -> u64 {
    time.duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
}

/// One record as a scan found it.
#[derive(Debug)]
pub(super) struct Frame {
    pub offset: u64,
    pub time_us: u64,
    /// Where the frame starts in its segment file.
    pub position: u64,
    pub payload: Bytes,
}

/// Why a scan stopped before the end of the bytes it was given.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Damage {
    /// The bytes end inside a frame.
    Truncated,
    /// A length no frame can have.
    Length(u32),
    Checksum,
    /// An intact frame that does not carry the offset expected there.
    Sequence {
        expected: u64,
        found: u64,
    },
}

impl std::fmt::Display for Damage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Damage::Truncated => write!(f, "a truncated record"),
            Damage::Length(length) => write!(f, "an impossible record length {length}"),
            Damage::Checksum => write!(f, "a record failing its CRC32C"),
            Damage::Sequence { expected, found } => {
                write!(f, "offset {found} where {expected} was expected")
            }
        }
    }
}

pub(super) enum Step {
    Frame(Frame),
    /// Exactly at the limit: every byte was a whole, valid frame.
    End,
    Damaged(Damage),
}

/// Reads frames one after another from a position up to a limit, with positional reads (so any
/// number of scans can share one `File` with the writer) and a buffer.
pub(super) struct Scanner<'a> {
    file: &'a File,
    position: u64,
    limit: u64,
    expected: u64,
    buf: Vec<u8>,
    /// The file position of `buf[0]`.
    buf_at: u64,
}

impl<'a> Scanner<'a> {
    /// Scans `file` from `position`, where a frame with offset `expected` must start, to `limit`.
    pub fn new(file: &'a File, position: u64, limit: u64, expected: u64) -> Self {
        Scanner {
            file,
            position,
            limit,
            expected,
            buf: Vec::new(),
            buf_at: position,
        }
    }

    /// Where the next frame would start: after a scan stops, the end of the valid bytes.
    pub fn position(&self) -> u64 {
        self.position
    }

    /// Makes `buf` hold `[position, position + need)`; false when that passes the limit or the
    /// end of the file.
    fn fill(&mut self, need: u64) -> io::Result<bool> {
        if self.position.saturating_add(need) > self.limit {
            return Ok(false);
        }
        let consumed = (self.position - self.buf_at) as usize;
        let need = need as usize;
        if consumed + need <= self.buf.len() {
            return Ok(true);
        }
        self.buf.drain(..consumed.min(self.buf.len()));
        self.buf_at = self.position;
        let held = self.buf.len();
        let remaining = (self.limit - self.position) as usize;
        let want = need.max(READ_CHUNK).min(remaining);
        self.buf.resize(want, 0);
        match self
            .file
            .read_exact_at(&mut self.buf[held..], self.buf_at + held as u64)
        {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
                // The file is shorter than the limit said: as good as truncated.
                self.buf.truncate(held);
                Ok(false)
            }
            Err(e) => {
                self.buf.truncate(held);
                Err(e)
            }
        }
    }

    pub fn next_frame(&mut self) -> io::Result<Step> {
        if self.position >= self.limit {
            return Ok(Step::End);
        }
        if !self.fill(8)? {
            return Ok(Step::Damaged(Damage::Truncated));
        }
        let at = (self.position - self.buf_at) as usize;
        let length = u32::from_le_bytes(le4(&self.buf[at..at + 4]));
        let crc = u32::from_le_bytes(le4(&self.buf[at + 4..at + 8]));
        if length < COVERED_FIXED || length as usize > COVERED_FIXED as usize + MAX_PAYLOAD {
            return Ok(Step::Damaged(Damage::Length(length)));
        }
        let size = 8 + u64::from(length);
        if !self.fill(size)? {
            return Ok(Step::Damaged(Damage::Truncated));
        }
        let at = (self.position - self.buf_at) as usize;
        let body = &self.buf[at + 8..at + size as usize];
        if crc32c::crc32c(body) != crc {
            return Ok(Step::Damaged(Damage::Checksum));
        }
        let offset = u64::from_le_bytes(le8(&body[0..8]));
        let time_us = u64::from_le_bytes(le8(&body[8..16]));
        if offset != self.expected {
            return Ok(Step::Damaged(Damage::Sequence {
                expected: self.expected,
                found: offset,
            }));
        }
        let frame = Frame {
            offset,
            time_us,
            position: self.position,
            payload: Bytes::copy_from_slice(&body[16..]),
        };
        self.position += size;
        self.expected = offset + 1;
        Ok(Step::Frame(frame))
    }
}

fn le4(bytes: &[u8]) -> [u8; 4] {
    let mut out = [0; 4];
    out.copy_from_slice(&bytes[..4]);
    out
}

fn le8(bytes: &[u8]) -> [u8; 8] {
    let mut out = [0; 8];
    out.copy_from_slice(&bytes[..8]);
    out
}

/// One segment as readers see it: only whole records the writer has committed.
#[derive(Debug)]
pub(super) struct Segment {
    pub base: u64,
    /// Open while the segment is the active one, shared by the writer (positional writes),
    /// readers (positional reads) and the syncer. Sealed segments are opened per read, so that
    /// a long log does not hold a descriptor per segment.
    pub file: Option<Arc<File>>,
    pub log_path: PathBuf,
    pub index_path: PathBuf,
    /// Bytes of whole, committed records.
    pub size: u64,
    /// The offset after the last record.
    pub end: u64,
    /// The append time of the last record, `None` when there is none (or it is unknown).
    pub last_time_us: Option<u64>,
    /// `(offset, position)`, increasing in both.
    pub index: Vec<(u64, u64)>,
}

impl Segment {
    /// Where to start scanning for `offset`: the position and offset of the last index entry at
    /// or before it.
    pub fn seek_point(&self, offset: u64) -> (u64, u64) {
        let i = self.index.partition_point(|&(o, _)| o <= offset);
        match i.checked_sub(1).map(|i| self.index[i]) {
            Some((o, position)) => (position, o),
            None => (0, self.base),
        }
    }

    /// The position after the last index entry, or 0: where the next entry is measured from.
    pub fn last_indexed_position(&self) -> u64 {
        self.index.last().map_or(0, |&(_, position)| position)
    }
}

/// Opens the segment `base` in `dir`, trusting its index only as far as the log confirms it,
/// scanning from the last good index entry to the end (which also completes a short index) and,
/// when it is the `active` (last) segment, cutting a torn tail at the first bad frame. A damaged
/// frame in a sealed segment is reported and left alone: nothing is deleted there.
pub(super) fn recover(
    dir: &Path,
    base: u64,
    active: bool,
    index_interval: u64,
) -> io::Result<Segment> {
    let log_path = dir.join(log_file_name(base));
    let index_path = dir.join(index_file_name(base));
    let file = OpenOptions::new().read(true).write(true).open(&log_path)?;
    let file_len = file.metadata()?.len();

    let stored_index = match std::fs::read(&index_path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == io::ErrorKind::NotFound => Vec::new(),
        Err(e) => return Err(e),
    };
    let mut index = parse_index(&stored_index, base, file_len);
    // Entries past what the log confirms are dropped from the end until one checks out.
    while let Some(&(offset, position)) = index.last() {
        let mut probe = Scanner::new(&file, position, file_len, offset);
        match probe.next_frame()? {
            Step::Frame(_) => break,
            Step::End | Step::Damaged(_) => {
                index.pop();
            }
        }
    }

    let (start_position, start_offset) = index.last().map_or((0, base), |&(o, p)| (p, o));
    let mut last_indexed = start_position;
    let mut end = start_offset;
    let mut last_time_us = None;
    let mut scanner = Scanner::new(&file, start_position, file_len, start_offset);
    let damage = loop {
        match scanner.next_frame()? {
            Step::Frame(frame) => {
                if frame.position > last_indexed && frame.position - last_indexed >= index_interval
                {
                    index.push((frame.offset, frame.position));
                    last_indexed = frame.position;
                }
                end = frame.offset + 1;
                last_time_us = Some(frame.time_us);
            }
            Step::End => break None,
            Step::Damaged(damage) => break Some(damage),
        }
    };
    let valid = scanner.position();
    if let Some(damage) = damage {
        if active {
            let cut = file_len - valid;
            file.set_len(valid)?;
            file.sync_data()?;
            tracing::warn!(
                segment = %log_path.display(),
                cut_bytes = cut,
                kept_bytes = valid,
                "cut a torn tail from the event log: {damage} at byte {valid}"
            );
        } else {
            tracing::warn!(
                segment = %log_path.display(),
                "the sealed segment holds {damage} at byte {valid}; records from there on are \
                 not readable and were left on disk"
            );
        }
    }

    let rebuilt = encode_index(&index);
    if rebuilt != stored_index {
        // The index is only a hint: a full disk must not keep the log from opening.
        if let Err(e) = write_index(&index_path, &rebuilt) {
            tracing::warn!(index = %index_path.display(), "could not rewrite the index: {e}");
        }
    }

    Ok(Segment {
        base,
        file: active.then(|| Arc::new(file)),
        log_path,
        index_path,
        size: valid,
        end,
        last_time_us,
        index,
    })
}

/// The entries of an index file up to the first one that cannot be right: not increasing, or
/// pointing outside the log.
fn parse_index(bytes: &[u8], base: u64, file_len: u64) -> Vec<(u64, u64)> {
    let mut entries: Vec<(u64, u64)> = Vec::with_capacity(bytes.len() / INDEX_ENTRY_BYTES);
    for chunk in bytes.chunks_exact(INDEX_ENTRY_BYTES) {
        let offset = u64::from_le_bytes(le8(&chunk[0..8]));
        let position = u64::from_le_bytes(le8(&chunk[8..16]));
        let (after_offset, after_position) = entries.last().map_or((base, 0), |&(o, p)| (o, p));
        if offset <= after_offset || position <= after_position || position >= file_len {
            break;
        }
        entries.push((offset, position));
    }
    entries
}

pub(super) fn encode_index(entries: &[(u64, u64)]) -> Vec<u8> {
    let mut out = Vec::with_capacity(entries.len() * INDEX_ENTRY_BYTES);
    for &(offset, position) in entries {
        out.extend_from_slice(&offset.to_le_bytes());
        out.extend_from_slice(&position.to_le_bytes());
    }
    out
}

fn write_index(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)?;
    file.write_all_at(bytes, 0)
}

/// Creates (or empties: nothing at or after `base` was ever acknowledged when a segment is
/// created) the files of a new segment; returns it and its index file, open for appending.
pub(super) fn create(dir: &Path, base: u64) -> io::Result<(Segment, File)> {
    let log_path = dir.join(log_file_name(base));
    let index_path = dir.join(index_file_name(base));
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&log_path)?;
    let index_file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(&index_path)?;
    let segment = Segment {
        base,
        file: Some(Arc::new(file)),
        log_path,
        index_path,
        size: 0,
        end: base,
        last_time_us: None,
        index: Vec::new(),
    };
    Ok((segment, index_file))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frames(records: &[(u64, &[u8])]) -> Vec<u8> {
        let mut buf = Vec::new();
        for &(offset, payload) in records {
            encode(&mut buf, offset, 1_000 + offset, payload);
        }
        buf
    }

    fn scan_all(file: &File, limit: u64, expected: u64) -> (Vec<Frame>, Option<Damage>, u64) {
        let mut scanner = Scanner::new(file, 0, limit, expected);
        let mut out = Vec::new();
        loop {
            match scanner.next_frame().expect("read") {
                Step::Frame(frame) => out.push(frame),
                Step::End => return (out, None, scanner.position()),
                Step::Damaged(d) => return (out, Some(d), scanner.position()),
            }
        }
    }

    #[test]
    fn frames_round_trip_and_damage_is_named() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("x.log");
        let mut bytes = frames(&[(5, b"hello"), (6, b""), (7, &[0xff; 300])]);
        std::fs::write(&path, &bytes).expect("write");
        let file = File::open(&path).expect("open");
        let (found, damage, end) = scan_all(&file, bytes.len() as u64, 5);
        assert_eq!(damage, None);
        assert_eq!(end, bytes.len() as u64);
        assert_eq!(found.len(), 3);
        assert_eq!(&found[0].payload[..], b"hello");
        assert_eq!(found[0].time_us, 1_005);
        assert_eq!(found[2].payload.len(), 300);

        // A wrong expectation is a sequence error, not a silent skip.
        let (_, damage, _) = scan_all(&file, bytes.len() as u64, 4);
        assert_eq!(
            damage,
            Some(Damage::Sequence {
                expected: 4,
                found: 5
            })
        );

        // Flip a payload byte of the second record: the first survives.
        let second = frame_bytes(5) as usize;
        bytes[second + HEADER_BYTES as usize - 1] ^= 1;
        std::fs::write(&path, &bytes).expect("write");
        let file = File::open(&path).expect("open");
        let (found, damage, end) = scan_all(&file, bytes.len() as u64, 5);
        assert_eq!(found.len(), 1);
        assert_eq!(damage, Some(Damage::Checksum));
        assert_eq!(end, second as u64);

        // Zeros, as a crash can leave after the last write.
        std::fs::write(&path, [0u8; 64]).expect("write");
        let file = File::open(&path).expect("open");
        let (found, damage, end) = scan_all(&file, 64, 0);
        assert!(found.is_empty());
        assert_eq!(damage, Some(Damage::Length(0)));
        assert_eq!(end, 0);
    }

    #[test]
    fn a_bad_index_costs_a_scan_never_data() {
        let dir = tempfile::tempdir().expect("tempdir");
        let payload = [7u8; 100];
        let records: Vec<(u64, &[u8])> = (0..50).map(|o| (o, &payload[..])).collect();
        let bytes = frames(&records);
        std::fs::write(dir.path().join(log_file_name(0)), &bytes).expect("write");
        // Entries pointing into the middle of frames and past the end.
        let garbage = encode_index(&[(3, 10), (9, 1_000_000)]);
        std::fs::write(dir.path().join(index_file_name(0)), garbage).expect("write");
        let recovered = recover(dir.path(), 0, true, 512).expect("recover");
        assert_eq!(recovered.end, 50);
        assert_eq!(recovered.size, bytes.len() as u64);
        let frame = frame_bytes(100);
        // Rebuilt: one entry every 512 bytes, each at a frame start.
        assert!(!recovered.index.is_empty());
        for &(offset, position) in &recovered.index {
            assert_eq!(position, offset * frame);
        }
        let stored = std::fs::read(dir.path().join(index_file_name(0))).expect("read");
        assert_eq!(stored, encode_index(&recovered.index));
    }
}
