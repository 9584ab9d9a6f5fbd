//! Shard snapshots: a shard's whole state in one archive, so recovery starts from it and
//! replays only the log written after it. This module knows the file, not what the archive
//! holds: its writer gets the payload encoded, its reader hands the payload (checked, aligned,
//! in place) and its format version to whatever restores it ([`Restore`]).
//!
//! File `shard-NNN.snap`: a 48-byte header (magic `SGSNAP\0\0`, `u16` format version, `u16`
//! shard index, `u32` shard count, `u64` generation, `u64` payload length, `u32` CRC-32 of the
//! payload, 12 zero bytes), then the payload, which thus starts 16-byte aligned: recovery maps
//! the file and reads the archive in place, with no copy. Before format version 4 the header
//! was those 36 bytes without the padding; such files are read into an aligned buffer.
//! A snapshot of generation G holds everything before the log of generation G. Written to a
//! temporary file, synced, renamed: a crash leaves the old one or the new one, never half of
//! one. Secrets are sealed as in the log.

use std::path::{Path, PathBuf};

use super::StorageError;

pub(crate) const MAGIC: [u8; 8] = *b"SGSNAP\0\0";
/// The header's length since format version 4 (a multiple of the archive's alignment).
const HEADER_LEN: usize = 48;
/// The header's length before format version 4.
const HEADER_LEN_V3: usize = 36;

/// The snapshot format this build writes and the newest it reads. Snapshot versions follow
/// the log's ([`super::FORMAT_VERSION`]) up to 6; version 7 archives the shard's state types
/// themselves (`shard/image.rs`), its logs being as version 6's; version 8 adds what the shard
/// owes its providers and the references it keeps (`shard/state/money.rs`; a version 7
/// snapshot restores with nothing owed); version 9 adds the settled payments kept for their
/// refunds (a version 8 snapshot restores with none). Older snapshots are still read
/// (`shard/legacy.rs`).
pub const SNAPSHOT_VERSION: u16 = 9;

/// What a snapshot restores into: given the payload (checked and aligned) and its format
/// version, rebuilds the state it holds.
pub(crate) trait Restore {
    /// Why a payload was refused.
    type Error: std::fmt::Display;
    /// Restores from `payload`, of format `version`.
    fn restore_snapshot(&mut self, version: u16, payload: &[u8]) -> Result<(), Self::Error>;
}

/// The snapshot file of shard `index`.
pub fn shard_snapshot_path(dir: &Path, index: usize) -> PathBuf {
    dir.join(format!("shard-{index:03}.snap"))
}

/// Encodes a snapshot file of the current format: header and `payload`.
pub(crate) fn encode(payload: &[u8], index: usize, count: usize, generation: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER_LEN + payload.len());
    out.extend_from_slice(&header(payload, index, count, generation));
    out.extend_from_slice(payload);
    out
}

/// The header of a snapshot file of the current format holding `payload`, which follows it.
pub(crate) fn header(payload: &[u8], index: usize, count: usize, generation: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER_LEN);
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&SNAPSHOT_VERSION.to_be_bytes());
    out.extend_from_slice(&(index as u16).to_be_bytes());
    out.extend_from_slice(&(count as u32).to_be_bytes());
    out.extend_from_slice(&generation.to_be_bytes());
    out.extend_from_slice(&(payload.len() as u64).to_be_bytes());
    out.extend_from_slice(&crc32fast::hash(payload).to_be_bytes());
    out.resize(HEADER_LEN, 0);
    out
}

/// Test hook: rewrites the snapshot file at `path`, of format version 4 or 5, as format
/// version 3 wrote it: the same payload (versions 3 to 5 share its layout) after the 36-byte
/// header. Recovery must read it as it reads such a file from an older build.
#[cfg(feature = "test-hooks")]
pub fn rewrite_as_version_3(path: &Path) -> std::io::Result<()> {
    let bytes = std::fs::read(path)?;
    let version = u16::from_be_bytes([bytes[8], bytes[9]]);
    assert!((4..=5).contains(&version), "versions 4 and 5 share version 3's payload");
    let mut out = bytes[..HEADER_LEN_V3].to_vec();
    out[8..10].copy_from_slice(&3u16.to_be_bytes());
    out.extend_from_slice(&bytes[HEADER_LEN..]);
    std::fs::write(path, out)
}

/// A snapshot file's payload, its checksum verified, aligned, and its format version: restored
/// by reading the archive in place, without first deserializing it into owned values.
pub(crate) struct Snapshot {
    version: u16,
    payload: Payload,
}

/// Where a snapshot's payload lies.
enum Payload {
    /// The file mapped into memory; the payload is `range` of it.
    Mapped { map: memmap2::Mmap, range: std::ops::Range<usize> },
    /// Read into a buffer (files from before format version 4).
    Read(rkyv::util::AlignedVec<16>),
}

impl Payload {
    fn bytes(&self) -> &[u8] {
        match self {
            Payload::Mapped { map, range } => &map[range.clone()],
            Payload::Read(buffer) => buffer,
        }
    }
}

impl Snapshot {
    /// Restores the payload into `state`.
    pub(crate) fn restore<S: Restore>(&self, state: &mut S) -> Result<(), S::Error> {
        state.restore_snapshot(self.version, self.payload.bytes())
    }
}

/// A snapshot file's header, checked.
struct Header {
    version: u16,
    generation: u64,
    /// Where the payload starts.
    header_len: usize,
    /// The payload's length, within the file.
    len: usize,
    crc: u32,
}

/// Checks a snapshot's first [`HEADER_LEN_V3`] bytes (`header`) against the shard it is read
/// for and the length of its file.
fn parse_header(
    path: &Path,
    header: &[u8],
    file_len: u64,
    index: usize,
    count: usize,
) -> Result<Header, StorageError> {
    let corrupt = |detail: &str| StorageError::Corrupt {
        path: path.to_owned(),
        offset: 0,
        detail: detail.to_owned(),
    };
    let Some(header) = header.get(..HEADER_LEN_V3) else {
        return Err(corrupt("not a settlegate snapshot"));
    };
    if header[..8] != MAGIC {
        return Err(corrupt("not a settlegate snapshot"));
    }
    let be16 = |at: usize| u16::from_be_bytes([header[at], header[at + 1]]);
    let be64 = |at: usize| u64::from_be_bytes(header[at..at + 8].try_into().expect("8"));
    let version = be16(8);
    if version > SNAPSHOT_VERSION {
        return Err(StorageError::NewerFormat {
            path: path.to_owned(),
            found: version,
            supported: SNAPSHOT_VERSION,
        });
    }
    let file_count = u32::from_be_bytes(header[12..16].try_into().expect("4")) as usize;
    if (be16(10) as usize, file_count) != (index, count) {
        return Err(StorageError::Mismatch {
            path: path.to_owned(),
            detail: "snapshot of another shard layout: the shard count must not change".into(),
        });
    }
    let generation = be64(16);
    let len = be64(24);
    let crc = u32::from_be_bytes(header[32..36].try_into().expect("4"));
    let header_len = if version >= 4 { HEADER_LEN } else { HEADER_LEN_V3 };
    // The length is checked against the file before anything that size is allocated or mapped.
    if file_len < header_len as u64 || len > file_len - header_len as u64 {
        return Err(corrupt("snapshot truncated"));
    }
    Ok(Header { version, generation, header_len, len: len as usize, crc })
}

/// Payloads from which [`checksum`] reads the two halves on two threads.
const CHECKSUM_PARALLEL_MIN: usize = 64 << 20;

/// The CRC-32 of `bytes`: a large payload's halves are summed on two threads and combined.
fn checksum(bytes: &[u8]) -> u32 {
    if bytes.len() < CHECKSUM_PARALLEL_MIN {
        return crc32fast::hash(bytes);
    }
    let (low, high) = bytes.split_at(bytes.len() / 2);
    let sum = |half: &[u8]| {
        let mut hasher = crc32fast::Hasher::new();
        hasher.update(half);
        hasher
    };
    let (mut low, high) = std::thread::scope(|scope| {
        let high = scope.spawn(|| sum(high));
        (sum(low), high.join().expect("a checksum thread panicked"))
    });
    low.combine(&high);
    low.finalize()
}

/// Checks a payload's checksum.
fn finish(path: &Path, header: &Header, payload: Payload) -> Result<Snapshot, StorageError> {
    if checksum(payload.bytes()) != header.crc {
        return Err(StorageError::Corrupt {
            path: path.to_owned(),
            offset: 0,
            detail: "snapshot checksum mismatch".to_owned(),
        });
    }
    Ok(Snapshot { version: header.version, payload })
}

/// Reads a snapshot from its bytes (`path` only names it in errors): its generation and
/// payload, as [`read`] does from a file.
pub(crate) fn read_bytes(
    path: &Path,
    bytes: &[u8],
    index: usize,
    count: usize,
) -> Result<(u64, Snapshot), StorageError> {
    let header = parse_header(path, bytes, bytes.len() as u64, index, count)?;
    let mut payload = rkyv::util::AlignedVec::<16>::with_capacity(header.len);
    payload.extend_from_slice(&bytes[header.header_len..header.header_len + header.len]);
    let snapshot = finish(path, &header, Payload::Read(payload))?;
    Ok((header.generation, snapshot))
}

/// Reads shard `index`'s snapshot: `None` if there is none, else its generation and payload.
/// A snapshot of an older format version is given to its restorer as it is.
pub(crate) fn read(
    path: &Path,
    index: usize,
    count: usize,
) -> Result<Option<(u64, Snapshot)>, StorageError> {
    use std::io::Read;
    let io = |source| StorageError::Io { path: path.to_owned(), source };
    let mut file = match std::fs::File::open(path) {
        Ok(file) => file,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => return Err(io(source)),
    };
    let file_len = file.metadata().map_err(io)?.len();
    let mut header = [0u8; HEADER_LEN_V3];
    if file_len < HEADER_LEN_V3 as u64 {
        return Err(StorageError::Corrupt {
            path: path.to_owned(),
            offset: 0,
            detail: "not a settlegate snapshot".into(),
        });
    }
    file.read_exact(&mut header).map_err(io)?;
    let header = parse_header(path, &header, file_len, index, count)?;
    let (header_len, len) = (header.header_len, header.len);
    let payload = if header.version >= 4 {
        // A mapping starts on a page and the header is 48 bytes, so the payload is aligned for
        // the archive (and `rkyv::access` checks it). Populated at once: recovery reads it all.
        // SAFETY: a snapshot file is written whole to a temporary file and renamed into place,
        // never written again, and the data directory is the engine's alone: the mapping does
        // not change under the reader.
        let map = unsafe { memmap2::MmapOptions::new().populate().map(&file) }.map_err(io)?;
        Payload::Mapped { map, range: header_len..header_len + len }
    } else {
        // Read straight into an aligned buffer: rkyv reads the archive in place from there.
        let mut payload = rkyv::util::AlignedVec::<16>::with_capacity(len);
        payload.resize(len, 0);
        file.read_exact(&mut payload).map_err(io)?;
        Payload::Read(payload)
    };
    let snapshot = finish(path, &header, payload)?;
    Ok(Some((header.generation, snapshot)))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A payload large enough to be summed in halves gets the checksum of the whole.
    #[test]
    fn a_large_payload_is_summed_in_halves_to_the_same_checksum() {
        let mut state = 0x2545_f491_4f6c_dd1du64;
        let bytes: Vec<u8> = (0..CHECKSUM_PARALLEL_MIN + 4_099)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                state as u8
            })
            .collect();
        assert_eq!(checksum(&bytes), crc32fast::hash(&bytes));
        assert_eq!(checksum(&bytes[..1000]), crc32fast::hash(&bytes[..1000]));
    }
}
