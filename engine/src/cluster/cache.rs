//! The restart cache: each partition's stream as this node saw it (appended as its owner, or
//! applied as its standby), kept in local files so that a node starting again reads from its
//! own disk what it had, and from NATS only what came after.
//!
//! The stream stays the source of truth; the cache only ever holds messages the stream
//! acknowledged or delivered, so nothing in it was refused (a zombie's appends never are). It
//! is never synced: a crash may cut its last entry short, and the reader stops at the first
//! entry whose checksum fails. It is used only for the stream it was written from (the
//! stream's creation time is in every file's header: a stream deleted and made again, whose
//! sequences start over, finds the cache stale) and only where it joins up with the state
//! already restored (the newest snapshot's sequence + 1).
//!
//! Files: `p<N>-<first sequence>.cache` in `cluster.cache_dir`. A file past half of
//! `cache_max_bytes` is closed and a new one begun; only the newest two are kept, so the cache
//! covers at least half that many bytes of the newest messages. A gap (a standby that reloaded
//! a snapshot past what it missed) starts the cache again from the message after it.
//!
//! File layout: the header (`SGRCACHE`, `u16` format 2, `u32` partition, `u16` length and the
//! stream's creation time, in nanoseconds since the epoch, as decimal text), then entries:
//! `u64` sequence, `u32` length, `u32` CRC-32 of the sequence's eight bytes and the payload,
//! the payload: empty for a fence or hand-over message, else the records' format (`u16`, the
//! message's `Sg-Format`) and the message's framed records. Format 1 (before entries named
//! their records' format) is not read: the stream has those messages.

use std::fs::{self, File};
use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};

use bytes::Bytes;

use super::append::Records;

const MAGIC: &[u8; 8] = b"SGRCACHE";
const FORMAT: u16 = 2;
const ENTRY_HEADER_LEN: usize = 16;
/// An entry's payload is one message: NATS's `max_payload` bounds it far below this.
const PAYLOAD_MAX: usize = 64 << 20;

/// Writes one partition's cache.
pub(super) struct Writer {
    dir: PathBuf,
    partition: usize,
    /// The stream's creation time, as every file's header holds it.
    stream: String,
    max_bytes: u64,
    file: Option<BufWriter<File>>,
    /// Bytes in the current file.
    bytes: u64,
    /// The last sequence written; 0 before any.
    last: u64,
    /// Whether the files already here join up with `last` (the node replayed them): else the
    /// first file begun drops them.
    joined: bool,
}

impl Writer {
    /// A writer for `partition` whose next entry is the message after `last` (what the node has
    /// applied, from a snapshot or from this cache). If `joined` (the cache was read up to
    /// `last`), the newest file already here is kept; else every file already here goes.
    pub(super) fn new(
        dir: &Path,
        partition: usize,
        stream: &str,
        max_bytes: u64,
        last: u64,
        joined: bool,
    ) -> Self {
        Writer {
            dir: dir.to_owned(),
            partition,
            stream: stream.to_owned(),
            max_bytes,
            file: None,
            bytes: 0,
            last,
            joined,
        }
    }

    /// Records the message at stream `sequence`. One already written is skipped; one after a
    /// gap starts the cache again from it. A write that fails turns the cache off for this
    /// partition until the node restarts (logged): the stream has everything anyway.
    pub(super) fn record(&mut self, sequence: u64, records: &Records) {
        if sequence <= self.last {
            return;
        }
        let result = self.write(sequence, records);
        if let Err(error) = result {
            tracing::warn!(
                partition = self.partition,
                %error,
                "restart cache write failed; the cache is off for this partition until restart"
            );
            self.max_bytes = 0;
            self.file = None;
        }
    }

    fn write(&mut self, sequence: u64, records: &Records) -> io::Result<()> {
        if self.max_bytes == 0 {
            return Ok(());
        }
        let gap = sequence != self.last + 1 || !self.joined;
        if gap || self.file.is_none() || self.bytes > self.max_bytes / 2 {
            self.begin(sequence, gap)?;
            self.joined = true;
        }
        let file = self.file.as_mut().expect("begun");
        // The payload: nothing for a message without records, else their format and them.
        let format = records.format.to_be_bytes();
        let payload: [&[u8]; 2] =
            if records.framed.is_empty() { [&[], &[]] } else { [&format, &records.framed] };
        let len = payload[0].len() + payload[1].len();
        let mut head = [0u8; ENTRY_HEADER_LEN];
        head[..8].copy_from_slice(&sequence.to_be_bytes());
        head[8..12].copy_from_slice(&(len as u32).to_be_bytes());
        head[12..].copy_from_slice(&entry_crc(sequence, &payload).to_be_bytes());
        file.write_all(&head)?;
        file.write_all(payload[0])?;
        file.write_all(payload[1])?;
        // One write per message: a crash loses at most the entry being written.
        file.flush()?;
        self.bytes += (ENTRY_HEADER_LEN + len) as u64;
        self.last = sequence;
        Ok(())
    }

    /// Starts a new file at `first`; keeps only the newest file before it (none after a gap).
    fn begin(&mut self, first: u64, gap: bool) -> io::Result<()> {
        self.file = None;
        fs::create_dir_all(&self.dir)?;
        let mut older = files(&self.dir, self.partition)?;
        older.retain(|(start, _)| *start < first);
        let keep = usize::from(!gap && self.last > 0);
        let drop_count = older.len().saturating_sub(keep);
        for (_, path) in older.iter().take(drop_count) {
            fs::remove_file(path)?;
        }
        let path = self.dir.join(format!("p{}-{first}.cache", self.partition));
        let mut file = BufWriter::with_capacity(1 << 16, File::create(&path)?);
        let mut header = Vec::with_capacity(16 + self.stream.len());
        header.extend_from_slice(MAGIC);
        header.extend_from_slice(&FORMAT.to_be_bytes());
        header.extend_from_slice(&(self.partition as u32).to_be_bytes());
        header.extend_from_slice(&(self.stream.len() as u16).to_be_bytes());
        header.extend_from_slice(self.stream.as_bytes());
        file.write_all(&header)?;
        self.bytes = header.len() as u64;
        self.file = Some(file);
        Ok(())
    }
}

/// The checksum of an entry: its sequence and its payload (given in parts).
fn entry_crc(sequence: u64, payload: &[&[u8]]) -> u32 {
    let mut hasher = crc32fast::Hasher::new();
    hasher.update(&sequence.to_be_bytes());
    payload.iter().for_each(|part| hasher.update(part));
    hasher.finalize()
}

/// This partition's cache files in `dir`, oldest (lowest first sequence) first.
fn files(dir: &Path, partition: usize) -> io::Result<Vec<(u64, PathBuf)>> {
    let prefix = format!("p{partition}-");
    let mut found = Vec::new();
    let entries = match fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(error) if error.kind() == io::ErrorKind::NotFound => return Ok(found),
        Err(error) => return Err(error),
    };
    for entry in entries {
        let path = entry?.path();
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
        let first = name
            .strip_prefix(&prefix)
            .and_then(|rest| rest.strip_suffix(".cache"))
            .and_then(|n| n.parse::<u64>().ok());
        if let Some(first) = first {
            found.push((first, path));
        }
    }
    found.sort();
    Ok(found)
}

/// What reading a partition's cache gave.
#[derive(Debug, Default, PartialEq, Eq)]
pub(super) struct Read {
    /// The messages after the one asked for, in order, with no gap: (sequence, records).
    pub(super) messages: Vec<(u64, Records)>,
    /// Why the cache was not used, or stopped short, if it was not read to its end.
    pub(super) stopped: Option<String>,
}

/// Reads `partition`'s cache in `dir`: the messages from `after + 1` on, as far as they join
/// up, written from the stream created at `stream`, and at most up to `last` (the stream's
/// last sequence: a cache ahead of its stream is not this stream's).
pub(super) fn read(dir: &Path, partition: usize, stream: &str, after: u64, last: u64) -> Read {
    let mut out = Read::default();
    let files = match files(dir, partition) {
        Ok(files) => files,
        Err(error) => {
            out.stopped = Some(format!("listing {}: {error}", dir.display()));
            return out;
        }
    };
    let mut next = after + 1;
    for (_, path) in files {
        let bytes = match fs::read(&path) {
            Ok(bytes) => bytes,
            Err(error) => {
                out.stopped = Some(format!("{}: {error}", path.display()));
                break;
            }
        };
        match read_file(&bytes, partition, stream, &mut next, last, &mut out.messages) {
            Ok(()) => {}
            Err(why) => {
                out.stopped = Some(format!("{}: {why}", path.display()));
                break;
            }
        }
    }
    if out.messages.is_empty() && out.stopped.is_none() && next == after + 1 {
        out.stopped = Some(format!("no cached message follows sequence {after}"));
    }
    out
}

/// Reads one file's entries from `*next` on into `out`, advancing `*next`. Entries before
/// `*next` are skipped; one after it (a gap) or past `last` ends the reading.
fn read_file(
    bytes: &[u8],
    partition: usize,
    stream: &str,
    next: &mut u64,
    last: u64,
    out: &mut Vec<(u64, Records)>,
) -> Result<(), String> {
    let mut rest = bytes.strip_prefix(MAGIC.as_slice()).ok_or("not a restart cache file")?;
    let take = |rest: &mut &[u8], n: usize| -> Result<Vec<u8>, String> {
        let (head, tail) = rest.split_at_checked(n).ok_or("header cut short")?;
        *rest = tail;
        Ok(head.to_vec())
    };
    let format = u16::from_be_bytes(take(&mut rest, 2)?.try_into().expect("2"));
    if format != FORMAT {
        return Err(format!("format {format}, not {FORMAT}"));
    }
    let owner = u32::from_be_bytes(take(&mut rest, 4)?.try_into().expect("4"));
    if owner as usize != partition {
        return Err(format!("written for partition {owner}"));
    }
    let len = u16::from_be_bytes(take(&mut rest, 2)?.try_into().expect("2")) as usize;
    let written_from = take(&mut rest, len)?;
    if written_from != stream.as_bytes() {
        return Err(format!(
            "written from a stream created at {}, not at {stream}",
            String::from_utf8_lossy(&written_from)
        ));
    }
    while !rest.is_empty() {
        let Some((head, tail)) = rest.split_at_checked(ENTRY_HEADER_LEN) else {
            return Err("last entry cut short".into());
        };
        let sequence = u64::from_be_bytes(head[..8].try_into().expect("8"));
        let len = u32::from_be_bytes(head[8..12].try_into().expect("4")) as usize;
        let crc = u32::from_be_bytes(head[12..].try_into().expect("4"));
        let Some(payload) = tail.get(..len).filter(|_| len <= PAYLOAD_MAX) else {
            return Err(format!("entry {sequence} cut short"));
        };
        if entry_crc(sequence, &[payload]) != crc {
            return Err(format!("entry {sequence} damaged"));
        }
        rest = &tail[len..];
        if sequence < *next {
            continue;
        }
        if sequence > last {
            return Err(format!("entry {sequence} is past the stream's last sequence {last}"));
        }
        if sequence != *next {
            return Err(format!("gap: {} expected, {sequence} found", *next));
        }
        // Records of a newer format than this build's end the reading as a damaged entry
        // would: the stream's copy is refused the same way.
        let records = match payload.split_first_chunk::<2>() {
            None if payload.is_empty() => Records::default(),
            None => return Err(format!("entry {sequence}: records without their format")),
            Some((format, framed)) => {
                let framed = Bytes::copy_from_slice(framed);
                Records::of_format(u16::from_be_bytes(*format), framed)
                    .map_err(|why| format!("entry {sequence}: {why}"))?
            }
        };
        out.push((sequence, records));
        *next += 1;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Records of this build's format.
    fn records(framed: &str) -> Records {
        Records::current(Bytes::from(framed.to_owned()))
    }

    fn write(dir: &Path, max: u64, last: u64, entries: impl IntoIterator<Item = u64>) -> Writer {
        let mut writer = Writer::new(dir, 3, "t1", max, last, true);
        for sequence in entries {
            writer.record(sequence, &records(&format!("m{sequence}")));
        }
        writer
    }

    fn sequences(read: &Read) -> Vec<u64> {
        read.messages.iter().map(|(s, _)| *s).collect()
    }

    #[test]
    fn what_is_written_reads_back_from_any_point_up_to_the_streams_end() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), 1 << 20, 0, 1..=10);
        let read = read(dir.path(), 3, "t1", 4, 10);
        assert_eq!(sequences(&read), (5..=10).collect::<Vec<_>>());
        assert_eq!(read.messages[0].1, records("m5"));
        assert_eq!(read.stopped, None);
        // Past the stream's end: not this stream's cache; what joined up before it is kept.
        let ahead = super::read(dir.path(), 3, "t1", 4, 7);
        assert_eq!(sequences(&ahead), vec![5, 6, 7]);
        assert!(ahead.stopped.unwrap().contains("past the stream's last sequence"));
    }

    #[test]
    fn another_stream_or_partition_or_a_gap_gives_nothing() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), 1 << 20, 4, 5..=10);
        let other = read(dir.path(), 3, "t2", 4, 10);
        assert!(other.messages.is_empty());
        assert!(other.stopped.unwrap().contains("not at t2"));
        assert!(read(dir.path(), 2, "t1", 4, 10).messages.is_empty());
        // The snapshot restored ends at 2: the cache starts at 5, so it does not join up.
        let gap = read(dir.path(), 3, "t1", 2, 10);
        assert!(gap.messages.is_empty());
        assert!(gap.stopped.unwrap().contains("gap"));
    }

    #[test]
    fn a_cut_or_damaged_last_entry_ends_the_reading_there() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), 1 << 20, 0, 1..=5);
        let (_, path) = files(dir.path(), 3).unwrap().pop().unwrap();
        let bytes = fs::read(&path).unwrap();
        fs::write(&path, &bytes[..bytes.len() - 1]).unwrap();
        let cut = read(dir.path(), 3, "t1", 0, 5);
        assert_eq!(sequences(&cut), vec![1, 2, 3, 4]);
        assert!(cut.stopped.unwrap().contains("cut short"));
        let mut damaged = bytes.clone();
        let at = damaged.len() - 1;
        damaged[at] ^= 1;
        fs::write(&path, &damaged).unwrap();
        assert_eq!(sequences(&read(dir.path(), 3, "t1", 0, 5)), vec![1, 2, 3, 4]);
    }

    #[test]
    fn rotation_keeps_the_newest_two_files_and_a_gap_starts_again() {
        let dir = tempfile::tempdir().unwrap();
        // Each entry is 16 + 2 + 3 or 4 bytes: a file is closed past 100 bytes, about every 4.
        let mut writer = write(dir.path(), 200, 0, 1..=40);
        let kept = files(dir.path(), 3).unwrap();
        assert_eq!(kept.len(), 2, "{kept:?}");
        let first = kept[0].0;
        let read = read(dir.path(), 3, "t1", first - 1, 40);
        assert_eq!(sequences(&read), (first..=40).collect::<Vec<_>>());
        // A gap: only what follows it is kept.
        writer.record(45, &records("m45"));
        writer.record(46, &records("m46"));
        let kept = files(dir.path(), 3).unwrap();
        assert_eq!(kept.iter().map(|(s, _)| *s).collect::<Vec<_>>(), vec![45]);
        assert_eq!(sequences(&super::read(dir.path(), 3, "t1", 44, 46)), vec![45, 46]);
        // Written already: skipped.
        writer.record(46, &records("other"));
        assert_eq!(super::read(dir.path(), 3, "t1", 45, 46).messages[0].1, records("m46"));
    }

    #[test]
    fn a_cache_that_was_not_used_is_dropped_by_the_first_file_begun() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), 1 << 20, 0, 1..=5);
        // The stream was made again: its sequences start over, the old files are not its.
        let mut writer = Writer::new(dir.path(), 3, "t2", 1 << 20, 0, false);
        writer.record(1, &records("n1"));
        assert_eq!(files(dir.path(), 3).unwrap().len(), 1);
        assert_eq!(super::read(dir.path(), 3, "t2", 0, 1).messages, vec![(1, records("n1"))]);
    }

    /// Each entry keeps its records' format (a message without records, none); an entry of a
    /// format newer than this build's ends the reading there, as the stream's copy of it is
    /// refused.
    #[test]
    fn an_entry_keeps_its_record_format_and_a_newer_one_ends_the_reading() {
        let dir = tempfile::tempdir().unwrap();
        let mut writer = Writer::new(dir.path(), 3, "t1", 1 << 20, 0, true);
        let older = Records { format: 9, framed: Bytes::from_static(b"m1") };
        writer.record(1, &older);
        writer.record(2, &Records::default());
        writer.record(3, &records("m3"));
        let newer = Records { format: crate::wal::FORMAT_VERSION + 1, ..records("m4") };
        writer.record(4, &newer);
        writer.record(5, &records("m5"));
        let read = read(dir.path(), 3, "t1", 0, 5);
        let expected = vec![(1, older), (2, Records::default()), (3, records("m3"))];
        assert_eq!(read.messages, expected);
        let stopped = read.stopped.unwrap();
        assert!(stopped.contains("entry 4: records of format"), "{stopped}");
    }

    /// A file of format 1 (entries without their records' format) is not read: the stream has
    /// its messages.
    #[test]
    fn a_file_of_format_1_is_not_read() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), 1 << 20, 0, 1..=3);
        let (_, path) = files(dir.path(), 3).unwrap().pop().unwrap();
        let mut bytes = fs::read(&path).unwrap();
        bytes[MAGIC.len()..MAGIC.len() + 2].copy_from_slice(&1u16.to_be_bytes());
        fs::write(&path, &bytes).unwrap();
        let read = read(dir.path(), 3, "t1", 0, 3);
        assert!(read.messages.is_empty());
        assert!(read.stopped.unwrap().contains("format 1, not 2"));
    }
}
