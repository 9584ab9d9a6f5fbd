//! The write-ahead log: every state change a shard applies is appended to that shard's log
//! before the reply that depends on it leaves the engine.
//!
//! File `shard-NNN.wal` in the data directory: a 24-byte header (magic `SGWAL\0\0\0`, `u16`
//! format version, `u16` shard index, `u32` shard count, `u64` generation, big-endian), then
//! records: `u32` payload length, `u32` header check (CRC-32 of the generation, the length and
//! the payload's CRC), `u32` CRC-32 of the payload, the payload (an rkyv archive of the shard's command envelope,
//! or from format 11 of a payment's decided outcome, `shard/logged.rs`; formats before 10 had
//! no header check). A log may be written over the
//! file of an older one (`start_log`): its last record may be followed by that log's bytes,
//! whose headers do not check against this log's generation.
//!
//! The log and snapshot layer (this module and `snapshot.rs`) is generic over what it stores:
//! it writes encoded records and snapshot payloads, reads records back through `Record`
//! (`read_records`; `read_log` for the engine's `LogEnvelope`) and snapshots through
//! `snapshot::Restore`, and tells its caller when records are durable by sending the caller's
//! own value `V` back on the caller's channel. It knows nothing of shards or their replies.
//!
//! **Group commit.** Each shard hands its batch's records *and its replies* (its `V`) to a
//! writer thread over a crossbeam channel. The writer takes everything queued, writes it,
//! syncs once (policy `always`), and only then sends each job's `V` back, so many changes
//! share one `fsync` and no reply can reveal a change that is not on disk. Replies of queries
//! travel the same queue, so they cannot overtake a write they observed either.
//!
//! **Recovery** (`startup.rs`) reads each shard's log on a thread of its own and applies its
//! commands through the same `ShardState::apply` while it reads (logs of older formats are
//! read whole first, and shards replayed interleaved by the commands' timestamps). A torn last
//! record (a crash mid-write), or an older log's bytes after the last record, is cut off, and
//! its first bytes kept in a side file beside the log; a record that does not decode, a length
//! over the maximum in a header that checks, or a record that looks torn but has a whole record
//! after it stops recovery with an error naming the file and offset (`parse_records`).

pub(crate) mod record;
pub(crate) mod snapshot;

#[cfg(feature = "test-hooks")]
pub use snapshot::rewrite_as_version_3;
pub use snapshot::{shard_snapshot_path, SNAPSHOT_VERSION};

use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use settlegate_types::histogram::{Histogram, COUNT_BOUNDS};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam::channel::{self, Receiver, RecvTimeoutError, Sender};
use serde::{Deserialize, Serialize};
use tokio::sync::oneshot;

/// The log and snapshot format this build writes and the newest it reads. Version 2 added the
/// age registry, version 3 the stores (each appended log record kinds and a snapshot
/// section), version 4 padded the snapshot header to 48 bytes so that the payload is aligned
/// in the file and can be mapped in place (its logs are as version 3's), version 5 appended the
/// record of a code redeemed with a basket (its snapshots are as version 4's), version 6 the
/// store terminal a payment code was requested for, the records of a device's keys revoked at
/// once and of a delivery notice (and its answer in the snapshot's idempotency records), and
/// the completion that names its idempotency record by key and digest (and a snapshot's purse
/// holds keep that digest), version 8 the shard's commands themselves (`shard/logged.rs`),
/// which carry what applying them once read outside their shard, so that each shard replays
/// from its own log alone (version 7 was an interim of the same session, never released, and is
/// not read), version 9 the same records with the promise that every one of them carries what
/// it reads outside its shard (a log of version 8 could hold commands converted from an older
/// format without it), so that recovery applies each shard's log while it reads it. Older
/// files are still read, and a log is rewritten in this version when first opened. Snapshots
/// have had a version of their own since ([`SNAPSHOT_VERSION`], 7: the shard's state types
/// archived as they are).
///
/// Version 10 frames each record with a header checked against the log's generation
/// (`CHECKED_HEADER_LEN`), so that a log may be written over the file of an older one
/// (`start_log`): the older log's records after the last of this one are not this one's.
/// Its records' payloads are as version 9's.
///
/// Version 11 adds one record kind: a payment whose provider decided in the step that
/// reserved it is logged as its reservation and a compact record of the provider's answer
/// (`shard/logged.rs`'s `DecidedRecord`, told from an envelope by its length), not a second
/// envelope for its completion. Its framing is version 10's.
pub const FORMAT_VERSION: u16 = 11;
/// The first format whose records carry a header check ([`CHECKED_HEADER_LEN`]).
const CHECKED_FORMAT: u16 = 10;
/// The magic of a log before [`CHECKED_FORMAT`].
const MAGIC: [u8; 8] = *b"SGWAL\0\0\0";
/// The magic of a log from [`CHECKED_FORMAT`] on, whose header is checksummed: a format version
/// damaged into an older one, whose records are framed otherwise, is refused, not misread.
const CHECKED_MAGIC: [u8; 8] = *b"SGWALC\0\0";
/// The fields every format's log header has: magic, version, shard index and count, generation.
const BASE_HEADER_LEN: usize = 24;
/// This format's log header: the base fields, the CRC-32 of them (`u32`), four zero bytes. A
/// damaged generation must not go unseen: each record's header is checked against it.
const FILE_HEADER_LEN: usize = 32;
/// A record's header before [`CHECKED_FORMAT`], and in a replicated log's messages
/// ([`frame_records`]): `u32` payload length, `u32` CRC-32 of the payload.
const RECORD_HEADER_LEN: usize = 8;
/// A record's header from [`CHECKED_FORMAT`] on: `u32` payload length, `u32` header check (the
/// CRC-32 of the log's generation, `u64`, the length and the payload's CRC, big-endian:
/// [`header_check`]), `u32` CRC-32 of the payload.
const CHECKED_HEADER_LEN: usize = 12;
/// Largest record payload accepted when reading (a command is far smaller).
pub const RECORD_LEN_MAX: usize = 1 << 20;
/// The most bytes of a log's cut tail kept in its side file ([`keep_cut_tail`]): the longest
/// record.
const CUT_KEPT_MAX: u64 = (CHECKED_HEADER_LEN + RECORD_LEN_MAX) as u64;
/// Jobs the writer takes into one group commit at most.
const GROUP_JOBS_MAX: usize = 4096;

/// When the log is forced to disk (Redis's `appendfsync`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FsyncPolicy {
    /// Sync before any reply that depends on a change (group commit). Nothing acknowledged is
    /// lost, even by a power failure.
    #[default]
    Always,
    /// Sync every `fsync_interval_ms`: a crash of the machine loses at most that window; a
    /// crash of the process alone loses nothing (writes are in the OS already).
    Interval,
    /// Never sync; the OS writes back when it likes. A process crash loses nothing, a machine
    /// crash may lose recent changes.
    Off,
}

/// `[engine.durability]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DurabilityConfig {
    /// Where the logs live; none: state is in memory only.
    pub data_dir: Option<PathBuf>,
    /// The sync policy.
    pub fsync: FsyncPolicy,
    /// The period of the `interval` policy.
    pub fsync_interval_ms: u64,
    /// A shard writes a snapshot (and starts a fresh log) after this many records; 0: never.
    pub snapshot_every_records: u64,
}

impl Default for DurabilityConfig {
    fn default() -> Self {
        DurabilityConfig {
            data_dir: None,
            fsync: FsyncPolicy::Always,
            fsync_interval_ms: 100,
            snapshot_every_records: 1_000_000,
        }
    }
}

/// A data directory that cannot be used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StorageError {
    /// Reading or writing failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// What the OS said.
        source: std::io::Error,
    },
    /// A record in the middle of a log is damaged.
    #[error("{path}: corrupt record at byte offset {offset}: {detail}")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// Where the bad record starts.
        offset: u64,
        /// What is wrong.
        detail: String,
    },
    /// Written by a newer settlegate.
    #[error("{path}: log format version {found} is newer than this build supports ({supported}); upgrade settlegate")]
    NewerFormat {
        /// The file.
        path: PathBuf,
        /// Its version.
        found: u16,
        /// Ours.
        supported: u16,
    },
    /// Not a settlegate log, or one of another shard layout.
    #[error("{path}: {detail}")]
    Mismatch {
        /// The file.
        path: PathBuf,
        /// What does not match.
        detail: String,
    },
}

/// The log file of shard `index`.
pub fn shard_log_path(dir: &Path, index: usize) -> PathBuf {
    dir.join(format!("shard-{index:03}.wal"))
}

/// The log of shard `index` that a snapshot being written will cover: the log of the
/// generation before, renamed when the log restarted at the snapshot's generation, and removed
/// once the snapshot is in place. Recovery replays it before the log when the snapshot it waited
/// for is not there (a crash while it was written).
pub fn shard_prev_log_path(dir: &Path, index: usize) -> PathBuf {
    dir.join(format!("shard-{index:03}.prev"))
}

/// The permissions of every file the engine creates in a data directory, whatever the umask:
/// logs and snapshots hold sealed device keys and card numbers.
pub const FILE_MODE: u32 = 0o600;
/// The permissions a data directory is created with, whatever the umask.
pub const DIR_MODE: u32 = 0o700;

/// The temporary file a snapshot (or a fresh log header) is written to before its rename.
fn shard_tmp_path(dir: &Path, index: usize) -> PathBuf {
    dir.join(format!("shard-{index:03}.tmp"))
}

/// The file the snapshot before shard `index`'s current one was, kept so that the next
/// snapshot is written over it in place ([`replace_in_place`]); nothing reads it.
pub(crate) fn shard_spare_path(dir: &Path, index: usize) -> PathBuf {
    dir.join(format!("shard-{index:03}.spare"))
}

/// The file of shard `index`'s log before its previous one, kept once the snapshot that covers
/// it is in place so that the next log is written over it ([`rotate`]); nothing reads it.
pub(crate) fn shard_free_log_path(dir: &Path, index: usize) -> PathBuf {
    dir.join(format!("shard-{index:03}.free"))
}

/// Makes a data directory ready for a start with `count` shards: creates it (mode
/// [`DIR_MODE`]) if it does not exist; warns about one that every user may read, write or
/// enter; sets the shard files it holds to [`FILE_MODE`]; removes the temporary files a crash
/// during a snapshot left.
pub(crate) fn prepare_dir(dir: &Path, count: usize) -> Result<(), StorageError> {
    match std::fs::metadata(dir) {
        Ok(meta) if !meta.is_dir() => {
            let detail = "the data directory is not a directory".to_owned();
            return Err(StorageError::Mismatch { path: dir.to_owned(), detail });
        }
        Ok(meta) => check_dir_mode(dir, &meta)?,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => create_dir(dir)?,
        Err(error) => return Err(io_error(dir)(error)),
    }
    for index in 0..count {
        let paths = [
            shard_log_path(dir, index),
            shard_prev_log_path(dir, index),
            shard_snapshot_path(dir, index),
            shard_spare_path(dir, index),
            shard_free_log_path(dir, index),
        ];
        for path in paths {
            restrict_existing(&path)?;
        }
        let tmp = shard_tmp_path(dir, index);
        match std::fs::metadata(&tmp) {
            Ok(meta) => {
                // A snapshot (or a log header) that a crash kept from its rename: the file it
                // was to replace is still in place, so nothing in it is needed.
                std::fs::remove_file(&tmp).map_err(io_error(&tmp))?;
                tracing::warn!(path = %tmp.display(), bytes = meta.len(), "removed a temporary file a crash left behind");
            }
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
            Err(error) => return Err(io_error(&tmp)(error)),
        }
    }
    Ok(())
}

#[cfg(unix)]
fn create_dir(dir: &Path) -> Result<(), StorageError> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).map_err(io_error(parent))?;
    }
    std::fs::DirBuilder::new().mode(DIR_MODE).create(dir).map_err(io_error(dir))?;
    // The mode given at creation passes through the umask; this does not.
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(DIR_MODE)).map_err(io_error(dir))
}

#[cfg(not(unix))]
fn create_dir(dir: &Path) -> Result<(), StorageError> {
    std::fs::create_dir_all(dir).map_err(io_error(dir))
}

#[cfg(unix)]
fn check_dir_mode(dir: &Path, meta: &std::fs::Metadata) -> Result<(), StorageError> {
    use std::os::unix::fs::PermissionsExt;
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o007 != 0 {
        // Warned, not refused: the files in it are 0600 whatever the directory says (they are
        // set so at start), so others see only their names and sizes.
        tracing::warn!(
            dir = %dir.display(),
            mode = format!("{mode:03o}"),
            "the data directory is open to every user; its files are private (600), but run `chmod 700` on it"
        );
    }
    Ok(())
}

#[cfg(not(unix))]
fn check_dir_mode(_dir: &Path, _meta: &std::fs::Metadata) -> Result<(), StorageError> {
    Ok(())
}

/// Sets an existing file (one written by an older build, or copied in) to [`FILE_MODE`].
fn restrict_existing(path: &Path) -> Result<(), StorageError> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        match std::fs::metadata(path) {
            Ok(meta) if meta.permissions().mode() & 0o777 != FILE_MODE => {
                let mode = std::fs::Permissions::from_mode(FILE_MODE);
                std::fs::set_permissions(path, mode).map_err(io_error(path))?;
                tracing::warn!(path = %path.display(), was = format!("{:03o}", meta.permissions().mode() & 0o777), "file permissions set to 600");
            }
            Ok(_) => {}
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
            Err(error) => return Err(io_error(path)(error)),
        }
    }
    #[cfg(not(unix))]
    let _ = path;
    Ok(())
}

/// Opens `path` for writing, created with [`FILE_MODE`] if missing, and sets that mode on it
/// whatever the umask or the mode it had.
fn open_private(path: &Path, options: &mut OpenOptions) -> std::io::Result<File> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
        let file = options.mode(FILE_MODE).open(path)?;
        file.set_permissions(std::fs::Permissions::from_mode(FILE_MODE))?;
        Ok(file)
    }
    #[cfg(not(unix))]
    options.open(path)
}

/// Keeps the bytes of shard `index`'s log from `from` on (a torn tail recovery is about to cut)
/// in a side file beside it, `shard-NNN.wal.cut-<offset>-<unix ms>`, synced before the log is
/// truncated. Returns the side file and the bytes kept.
///
/// At most [`CUT_KEPT_MAX`] bytes are kept: a torn write is one record at most (a whole record
/// before it is read, one after it is damage), and a log written over an older log's file
/// ([`start_log`]) may be followed by that log's bytes, up to a log's length.
pub(crate) fn keep_cut_tail(
    dir: &Path,
    index: usize,
    from: u64,
    now_ms: i64,
) -> Result<Option<(PathBuf, u64)>, StorageError> {
    use std::io::Read;
    let log = shard_log_path(dir, index);
    let mut file = File::open(&log).map_err(io_error(&log))?;
    file.seek(SeekFrom::Start(from)).map_err(io_error(&log))?;
    let mut tail = Vec::new();
    file.take(CUT_KEPT_MAX).read_to_end(&mut tail).map_err(io_error(&log))?;
    if tail.is_empty() {
        return Ok(None);
    }
    let name = |n: u32| {
        let suffix = if n == 0 { String::new() } else { format!(".{n}") };
        dir.join(format!("shard-{index:03}.wal.cut-{from}-{now_ms}{suffix}"))
    };
    // Never overwrites: a name taken already gets a counter.
    let mut n = 0;
    let (path, mut side) = loop {
        let path = name(n);
        match open_private(&path, OpenOptions::new().write(true).create_new(true)) {
            Ok(side) => break (path, side),
            Err(error) if error.kind() == std::io::ErrorKind::AlreadyExists && n < 1000 => n += 1,
            Err(error) => return Err(io_error(&path)(error)),
        }
    };
    side.write_all(&tail).and_then(|()| side.sync_all()).map_err(io_error(&path))?;
    File::open(dir).and_then(|d| d.sync_all()).map_err(io_error(dir))?;
    Ok(Some((path, tail.len() as u64)))
}

/// The shard count a data directory was written with: read from shard 0's log, or failing
/// that its previous log or its snapshot (both headers hold it at the same place); none for a directory with
/// neither. Lets an engine configured with `shards = 0` keep the layout its data has, since
/// the count must not change across restarts.
pub(crate) fn recorded_shard_count(dir: &Path) -> Result<Option<usize>, StorageError> {
    let paths = [
        (shard_log_path(dir, 0), [MAGIC, CHECKED_MAGIC]),
        (shard_prev_log_path(dir, 0), [MAGIC, CHECKED_MAGIC]),
        (snapshot::shard_snapshot_path(dir, 0), [snapshot::MAGIC; 2]),
    ];
    for (path, magics) in paths {
        let mut header = [0u8; 16];
        let read = std::fs::File::open(&path).and_then(|mut file| {
            use std::io::Read;
            file.read(&mut header)
        });
        match read {
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => continue,
            Err(error) => return Err(io_error(&path)(error)),
            // An empty (or torn at its header) file says nothing.
            Ok(len) if len < header.len() => continue,
            Ok(_) if !magics.iter().any(|magic| header[..8] == magic[..]) => {
                let detail = "not a settlegate file (bad magic)".to_owned();
                return Err(StorageError::Mismatch { path, detail });
            }
            Ok(_) => {
                return Ok(Some(u32::from_be_bytes(header[12..16].try_into().expect("4")) as usize))
            }
        }
    }
    Ok(None)
}

/// A log record as the reader decodes it from its payload.
pub(crate) trait Record: Sized {
    /// The record in `payload` of a log of format `version`, or why it is not one.
    fn decode(payload: &[u8], version: u16) -> Result<Self, String>;
}

/// A shard log as read back: its records, decoded as `R`.
#[derive(Debug)]
pub(crate) struct ReadLog<R> {
    pub(crate) records: Vec<R>,
    /// The format version in the file's header; none for a missing or empty file.
    pub(crate) version: Option<u16>,
    /// Bytes of the file that hold the header and whole records.
    pub(crate) valid_len: u64,
    /// Bytes of a torn last record, cut off.
    pub(crate) torn_bytes: u64,
    /// Whether those bytes start with a header that does not check against the log's generation:
    /// an older log's bytes in the file this one was written over, most likely, not a torn
    /// write of this log's (which leaves a header that checks, or one cut short by the file's
    /// end, unless a crash cut it inside its first twelve bytes).
    pub(crate) older_bytes: bool,
    /// The log's generation (the snapshot it follows); none for a missing or empty file.
    pub(crate) generation: Option<u64>,
}

fn io_error(path: &Path) -> impl FnOnce(std::io::Error) -> StorageError + '_ {
    move |source| StorageError::Io { path: path.to_owned(), source }
}

/// The header of a log of this build's format.
pub(crate) fn file_header(index: usize, count: usize, generation: u64) -> [u8; FILE_HEADER_LEN] {
    let mut header = [0u8; FILE_HEADER_LEN];
    header[..8].copy_from_slice(&CHECKED_MAGIC);
    header[8..10].copy_from_slice(&FORMAT_VERSION.to_be_bytes());
    header[10..12].copy_from_slice(&(index as u16).to_be_bytes());
    header[12..16].copy_from_slice(&(count as u32).to_be_bytes());
    header[16..24].copy_from_slice(&generation.to_be_bytes());
    let crc = crc32fast::hash(&header[..BASE_HEADER_LEN]);
    header[BASE_HEADER_LEN..BASE_HEADER_LEN + 4].copy_from_slice(&crc.to_be_bytes());
    header
}

/// Checks the log header at the start of `bytes` (at least [`BASE_HEADER_LEN`] of them) and
/// returns its length in its format; none where `bytes` end inside it (a header torn while the
/// file was created: nothing was ever acknowledged in it).
fn check_file_header(
    path: &Path,
    bytes: &[u8],
    index: usize,
    count: usize,
) -> Result<Option<usize>, StorageError> {
    let mismatch = |detail: String| StorageError::Mismatch { path: path.to_owned(), detail };
    let checked = bytes[..8] == CHECKED_MAGIC;
    if !checked && bytes[..8] != MAGIC {
        return Err(mismatch("not a settlegate log (bad magic)".into()));
    }
    let version = u16::from_be_bytes([bytes[8], bytes[9]]);
    let header_damaged = |detail: &str| StorageError::Corrupt {
        path: path.to_owned(),
        offset: 0,
        detail: format!("the file header {detail}"),
    };
    if version <= FORMAT_VERSION && checked != (version >= CHECKED_FORMAT) {
        return Err(header_damaged("names a format its magic does not"));
    }
    if version > FORMAT_VERSION {
        return Err(StorageError::NewerFormat {
            path: path.to_owned(),
            found: version,
            supported: FORMAT_VERSION,
        });
    }
    let file_index = u16::from_be_bytes([bytes[10], bytes[11]]) as usize;
    let file_count = u32::from_be_bytes(bytes[12..16].try_into().expect("4")) as usize;
    if (file_index, file_count) != (index, count) {
        return Err(mismatch(format!(
            "written as shard {file_index} of {file_count}, opened as shard {index} of {count}: \
             the shard count must not change across restarts"
        )));
    }
    if version < CHECKED_FORMAT {
        return Ok(Some(BASE_HEADER_LEN));
    }
    let Some(header) = bytes.get(..FILE_HEADER_LEN) else { return Ok(None) };
    let crc =
        u32::from_be_bytes(header[BASE_HEADER_LEN..BASE_HEADER_LEN + 4].try_into().expect("4"));
    if crc != crc32fast::hash(&header[..BASE_HEADER_LEN]) || header[BASE_HEADER_LEN + 4..] != [0; 4]
    {
        return Err(header_damaged("fails its checksum"));
    }
    Ok(Some(FILE_HEADER_LEN))
}

/// What shard `index`'s log header says: its format version and generation; none for a
/// missing file or one shorter than a header (nothing was ever acknowledged in it). The header
/// is checked as [`read_records`] checks it.
pub(crate) fn read_log_header(
    path: &Path,
    index: usize,
    count: usize,
) -> Result<Option<(u16, u64)>, StorageError> {
    use std::io::Read;
    let mut header = Vec::with_capacity(FILE_HEADER_LEN);
    let file = match File::open(path) {
        Ok(file) => file,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(error) => return Err(io_error(path)(error)),
    };
    file.take(FILE_HEADER_LEN as u64).read_to_end(&mut header).map_err(io_error(path))?;
    if header.len() < BASE_HEADER_LEN || check_file_header(path, &header, index, count)?.is_none() {
        return Ok(None);
    }
    let version = u16::from_be_bytes([header[8], header[9]]);
    let generation = u64::from_be_bytes(header[16..24].try_into().expect("8"));
    Ok(Some((version, generation)))
}

/// Shard `index`'s log, mapped in place for reading (no copy of a log of a gigabyte into
/// memory first); an empty buffer for a missing file. For recovery only: a file mapped must not
/// be cut short while it is read, and only recovery itself cuts a log short (a torn tail, once
/// read), a data directory serving one engine at a time. A reader beside a running engine
/// (`replay_shard`) reads with [`read_log_bytes`].
pub(crate) fn map_log(path: &Path) -> Result<LogBytes, StorageError> {
    let file = match File::open(path) {
        Ok(file) => file,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
            return Ok(LogBytes::Read(Vec::new()))
        }
        Err(error) => return Err(io_error(path)(error)),
    };
    let len = file.metadata().map_err(io_error(path))?.len();
    if len < BASE_HEADER_LEN as u64 {
        return read_log_bytes(path);
    }
    // SAFETY: nothing cuts a log short while recovery reads it (above); the map is read only.
    let map = unsafe { memmap2::Mmap::map(&file) }.map_err(io_error(path))?;
    let _ = map.advise(memmap2::Advice::Sequential);
    Ok(LogBytes::Mapped(map))
}

/// Shard `index`'s log read into memory; empty for a missing file.
pub(crate) fn read_log_bytes(path: &Path) -> Result<LogBytes, StorageError> {
    match std::fs::read(path) {
        Ok(bytes) => Ok(LogBytes::Read(bytes)),
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
            Ok(LogBytes::Read(Vec::new()))
        }
        Err(error) => Err(io_error(path)(error)),
    }
}

/// A log's bytes, mapped or read.
pub(crate) enum LogBytes {
    /// Mapped in place.
    Mapped(memmap2::Mmap),
    /// Read into memory (a file too short to map usefully, or none).
    Read(Vec<u8>),
}

impl std::ops::Deref for LogBytes {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        match self {
            LogBytes::Mapped(map) => map,
            LogBytes::Read(bytes) => bytes,
        }
    }
}

/// Reads shard `index`'s log of records `R`. A missing or empty file is an empty log.
pub(crate) fn read_records<R: Record>(
    path: &Path,
    index: usize,
    count: usize,
) -> Result<ReadLog<R>, StorageError> {
    parse_records(path, &read_log_bytes(path)?, index, count)
}

/// Reads a log from its bytes (`path` only names it in errors).
///
/// A torn tail is only what a partial write can leave: a last record whose header or payload
/// the end of the file cuts short, or a last record that fails its checksum, with no whole,
/// valid record after the point where it starts. A length over [`RECORD_LEN_MAX`], a checksum
/// mismatch or a record that does not decode before the last, and a "torn" record with a
/// valid record after it are corruption: an error naming the file and the offset of the bad
/// record, never a shorter log.
///
/// From [`CHECKED_FORMAT`] on, a log's last record may be followed by the bytes of an older log
/// whose file it was written over ([`start_log`]), which are cut as a torn tail is: the log ends
/// at the first record whose header does not check against the log's generation, or whose
/// payload the file cuts short or fails its checksum, unless a whole, valid record of the
/// log follows within a record's longest reach of it (where the record after a damaged one
/// starts at the latest). A length over the maximum is corruption where its header checks.
pub(crate) fn parse_records<R: Record>(
    path: &Path,
    bytes: &[u8],
    index: usize,
    count: usize,
) -> Result<ReadLog<R>, StorageError> {
    let mut records = Vec::new();
    let mut log = parse_records_with(path, bytes, index, count, |_, record| {
        records.push(record);
        Ok(())
    })?;
    log.records = records;
    Ok(log)
}

/// [`parse_records`], handing each record to `each` (with its byte offset) as it is read,
/// rather than collecting them: the returned log's `records` is empty. An error from `each`
/// stops the reading and is returned.
pub(crate) fn parse_records_with<R: Record>(
    path: &Path,
    bytes: &[u8],
    index: usize,
    count: usize,
    mut each: impl FnMut(u64, R) -> Result<(), StorageError>,
) -> Result<ReadLog<R>, StorageError> {
    let header_len = match bytes.len() {
        len if len < BASE_HEADER_LEN => None,
        _ => check_file_header(path, bytes, index, count)?,
    };
    let Some(header_len) = header_len else {
        // Nothing, or a header torn while the file was created: nothing was ever acknowledged.
        return Ok(ReadLog {
            records: Vec::new(),
            version: None,
            valid_len: 0,
            torn_bytes: bytes.len() as u64,
            older_bytes: false,
            generation: None,
        });
    };
    let version = u16::from_be_bytes([bytes[8], bytes[9]]);
    let generation = u64::from_be_bytes(bytes[16..24].try_into().expect("8"));
    let framing = Framing::of(version, generation);
    let mut offset = header_len;
    let corrupt = |offset: usize, detail: String| StorageError::Corrupt {
        path: path.to_owned(),
        offset: offset as u64,
        detail,
    };
    // Why the record at `offset` may be where the log ends, if it may be.
    let mut suspect = None;
    // Whether it ends at a header that does not check against the log's generation.
    let mut foreign = false;
    let head_len = framing.head_len;
    while offset < bytes.len() {
        let rest = &bytes[offset..];
        let Some((len, crc, checks)) = framing.header(rest) else {
            suspect = Some("its header is cut short by the end of the file");
            break;
        };
        if !checks {
            // Not a header of this log: a torn write, or the bytes of the older log whose file
            // this one was written over (`start_log`).
            suspect = Some("its header does not check against the log's generation");
            foreign = true;
            break;
        }
        // Checked first: a partial write never leaves a wrong length, so a length over the
        // maximum is corruption even where it also runs past the end of the file.
        if len > RECORD_LEN_MAX {
            return Err(corrupt(offset, format!("record length {len} over the maximum")));
        }
        let Some(payload) = rest.get(head_len..head_len + len) else {
            suspect = Some("its length runs past the end of the file");
            break;
        };
        let is_last = offset + head_len + len == bytes.len();
        if crc32fast::hash(payload) != crc {
            // In a checked log, what follows a torn record may be an older log's bytes.
            if is_last || framing.generation.is_some() {
                suspect = Some("the record fails its checksum");
                break;
            }
            return Err(corrupt(offset, "checksum mismatch".into()));
        }
        let record = R::decode(payload, version).map_err(|e| corrupt(offset, e))?;
        each(offset as u64, record)?;
        offset += head_len + len;
    }
    if let Some(reason) = suspect {
        // A partial write leaves nothing whole after it.
        if let Some(next) = next_valid_record::<R>(bytes, offset, version, framing) {
            return Err(corrupt(
                offset,
                format!(
                    "{reason}, yet a whole record follows at byte offset {next}: not a torn \
                     write but damage, and the records after it were acknowledged"
                ),
            ));
        }
    }
    Ok(ReadLog {
        records: Vec::new(),
        version: Some(version),
        valid_len: offset as u64,
        torn_bytes: (bytes.len() - offset) as u64,
        older_bytes: foreign,
        generation: Some(generation),
    })
}

/// How a log of one format frames its records.
#[derive(Clone, Copy)]
struct Framing {
    /// A record header's length.
    head_len: usize,
    /// The generation each record's header is checked against ([`CHECKED_FORMAT`] on); none
    /// before.
    generation: Option<u64>,
}

impl Framing {
    /// The framing of a log of format `version` and `generation`.
    fn of(version: u16, generation: u64) -> Framing {
        match version >= CHECKED_FORMAT {
            true => Framing { head_len: CHECKED_HEADER_LEN, generation: Some(generation) },
            false => Framing { head_len: RECORD_HEADER_LEN, generation: None },
        }
    }

    /// The record header at the start of `bytes`: its payload's length and CRC-32, and whether
    /// it checks against the log's generation (always, before [`CHECKED_FORMAT`]); none where
    /// `bytes` are shorter than a header.
    fn header(self, bytes: &[u8]) -> Option<(usize, u32, bool)> {
        let head = bytes.get(..self.head_len)?;
        let word = |at: usize| u32::from_be_bytes(head[at..at + 4].try_into().expect("4"));
        let (len, crc) = (word(0), word(self.head_len - 4));
        let checks = self.generation.is_none_or(|g| word(4) == header_check(g, len, crc));
        Some((len as usize, crc, checks))
    }
}

/// The header check of a record of `len` bytes whose payload's CRC-32 is `crc`, in a log of
/// `generation` (from [`CHECKED_FORMAT`] on): the CRC-32 of the three, big-endian. It covers
/// the payload's CRC so that a write torn inside a header is never completed by the header of
/// an older log's record at the same offset (of the same length, its CRC matching its payload).
fn header_check(generation: u64, len: u32, crc: u32) -> u32 {
    let mut bytes = [0u8; 16];
    bytes[..8].copy_from_slice(&generation.to_be_bytes());
    bytes[8..12].copy_from_slice(&len.to_be_bytes());
    bytes[12..].copy_from_slice(&crc.to_be_bytes());
    crc32fast::hash(&bytes)
}

/// The offset of the first whole, valid record after the suspect one at `suspect`: a length
/// within the maximum, a payload inside the file whose checksum matches, and which decodes.
///
/// Before [`CHECKED_FORMAT`], searched to the end of the file: nothing but a torn write ever
/// follows a log's last record. From it on, a log may be followed by an older log's bytes (whose
/// records do not check against this log's generation), and the search ends where the record
/// after a damaged one would begin at the latest: a header and the longest payload past it.
fn next_valid_record<R: Record>(
    bytes: &[u8],
    suspect: usize,
    version: u16,
    framing: Framing,
) -> Option<usize> {
    let head_len = framing.head_len;
    let last_start = match framing.generation {
        Some(_) => (suspect + head_len + RECORD_LEN_MAX).min(bytes.len()),
        None => bytes.len(),
    };
    let mut at = suspect + 1;
    while at <= last_start {
        let Some((len, crc, checks)) = framing.header(&bytes[at..]) else { break };
        let room = bytes.len() - at - head_len;
        if checks && len <= RECORD_LEN_MAX && len <= room {
            let payload = &bytes[at + head_len..at + head_len + len];
            if crc32fast::hash(payload) == crc && R::decode(payload, version).is_ok() {
                return Some(at);
            }
        }
        at += 1;
    }
    None
}

/// The header of `record` in a log of `generation`, as this build's format frames it: the
/// record follows it.
pub(crate) fn log_record_header(generation: u64, record: &[u8]) -> [u8; CHECKED_HEADER_LEN] {
    let (len, crc) = (record.len() as u32, crc32fast::hash(record));
    let mut head = [0u8; CHECKED_HEADER_LEN];
    head[..4].copy_from_slice(&len.to_be_bytes());
    head[4..8].copy_from_slice(&header_check(generation, len, crc).to_be_bytes());
    head[8..].copy_from_slice(&crc.to_be_bytes());
    head
}

/// A batch's log records, framed as they are encoded: one buffer, each record behind its header
/// for a log of `generation` ([`log_record_header`]).
///
/// A record's CRC is computed where it was just encoded, on bytes still in that core's cache,
/// and the batch is one allocation; the writer writes the buffer as it is, after checking that
/// it was framed for the log it writes (a record framed for another generation would read as
/// the log's end). A replicated log's records carry generation 0: a message frames them
/// without the check ([`frame_records`]).
pub(crate) struct Records {
    bytes: Vec<u8>,
    count: usize,
    generation: u64,
}

impl Records {
    /// No records yet, for a log of `generation`, with room for `bytes` bytes of them.
    pub(crate) fn with_capacity(generation: u64, bytes: usize) -> Records {
        Records { bytes: Vec::with_capacity(bytes), count: 0, generation }
    }

    /// Appends `record`, framed.
    pub(crate) fn push(&mut self, record: &[u8]) {
        self.bytes.extend_from_slice(&log_record_header(self.generation, record));
        self.bytes.extend_from_slice(record);
        self.count += 1;
    }

    /// How many records there are.
    pub(crate) fn len(&self) -> usize {
        self.count
    }

    /// Whether there are none.
    pub(crate) fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Each record's payload and the CRC-32 of it, in order.
    pub(crate) fn iter(&self) -> impl Iterator<Item = (&[u8], u32)> + '_ {
        let framing = Framing { head_len: CHECKED_HEADER_LEN, generation: None };
        let mut rest = &self.bytes[..];
        std::iter::from_fn(move || {
            let (len, crc, _) = framing.header(rest)?;
            let payload = &rest[CHECKED_HEADER_LEN..CHECKED_HEADER_LEN + len];
            rest = &rest[CHECKED_HEADER_LEN + len..];
            Some((payload, crc))
        })
    }
}

/// Encodes a snapshot's payload (on the snapshot's own thread, beside the log writer) into the
/// buffer it is given: empty, with the capacity the snapshot before it left (see [`Snapshots`]).
pub(crate) type SnapshotPayload =
    Box<dyn FnOnce(rkyv::util::AlignedVec) -> rkyv::util::AlignedVec + Send>;

/// Work for a shard's writer, done in the order queued. The writer knows nothing of what the
/// records hold or what its caller answers: `V` is the caller's, handed back when durable.
pub(crate) enum Job<V> {
    /// Encoded records to append; once they are durable (as the sync policy says), `replies`
    /// is sent on `reply`, and not before: the caller's answers that depend on the records
    /// wait for them.
    Records { records: Records, reply: oneshot::Sender<V>, replies: V },
    /// A snapshot of everything queued before it: the log starts afresh, and the payload is
    /// encoded and written on a thread of its own while the log goes on ([`rotate`]).
    Snapshot { payload: SnapshotPayload, index: usize, count: usize, generation: u64 },
}

/// Where a shard's jobs go: its local writer thread, or (in a cluster) the task that appends
/// them to the partition's replicated log (`cluster/append.rs`).
pub(crate) enum JobSender<V> {
    /// The local log writer's queue.
    Local(Sender<Job<V>>),
    /// The replicated log's queue.
    Replicated(tokio::sync::mpsc::UnboundedSender<Job<V>>),
}

impl<V> Clone for JobSender<V> {
    fn clone(&self) -> Self {
        match self {
            JobSender::Local(jobs) => JobSender::Local(jobs.clone()),
            JobSender::Replicated(jobs) => JobSender::Replicated(jobs.clone()),
        }
    }
}

/// What a shard's log writer measures, read by `/metrics`.
#[derive(Debug)]
pub struct WalStats {
    /// How long each fsync took, in seconds.
    pub fsync: Histogram,
    /// Records written per group commit.
    pub group_records: Histogram,
}

impl Default for WalStats {
    fn default() -> Self {
        WalStats { fsync: Histogram::latency(), group_records: Histogram::new(&COUNT_BOUNDS) }
    }
}

/// The sending side of a shard's log writer.
pub(crate) struct WalHandle<V> {
    jobs: JobSender<V>,
    /// The writer's figures (a replicated log's handle keeps none).
    pub(crate) stats: Arc<WalStats>,
    /// Set once the writer has failed and stopped.
    pub(crate) failed: Arc<AtomicBool>,
    pub(crate) index: usize,
    pub(crate) count: usize,
}

impl<V> Clone for WalHandle<V> {
    fn clone(&self) -> Self {
        let (index, count) = (self.index, self.count);
        WalHandle {
            jobs: self.jobs.clone(),
            stats: Arc::clone(&self.stats),
            failed: Arc::clone(&self.failed),
            index,
            count,
        }
    }
}

impl<V> WalHandle<V> {
    /// Queues a job; if the writer has failed, the job is dropped and its caller sees the
    /// engine as stopped (nothing unlogged is ever acknowledged).
    pub(crate) fn submit(&self, job: Job<V>) {
        match &self.jobs {
            JobSender::Local(jobs) => _ = jobs.send(job),
            JobSender::Replicated(jobs) => _ = jobs.send(job),
        }
    }

    /// A handle whose jobs go to `jobs`, the queue of a partition's replicated log; its
    /// `failed` flag is never set (a partition whose appends are refused answers `MOVED`).
    pub(crate) fn replicated(
        jobs: tokio::sync::mpsc::UnboundedSender<Job<V>>,
        index: usize,
        count: usize,
    ) -> WalHandle<V> {
        let failed = Arc::new(AtomicBool::new(false));
        let stats = Arc::default();
        WalHandle { jobs: JobSender::Replicated(jobs), stats, failed, index, count }
    }
}

/// Frames `records` for a message of a partition's replicated log (`u32` length, `u32` CRC-32,
/// payload: as a log file of format 9 framed them; a message is whole or absent, so its
/// records need no header check).
pub(crate) fn frame_records<'a>(records: impl Iterator<Item = (&'a [u8], u32)>, out: &mut Vec<u8>) {
    for (record, crc) in records {
        out.extend_from_slice(&(record.len() as u32).to_be_bytes());
        out.extend_from_slice(&crc.to_be_bytes());
        out.extend_from_slice(record);
    }
}

/// How [`frame_records`] frames a message's records: as a log of format 9, no header check.
const MESSAGE_FRAMING: Framing = Framing { head_len: RECORD_HEADER_LEN, generation: None };

/// The records of a message framed by [`frame_records`], decoded as `R` of record format
/// `version` (the appending build's); an error names the first record that is damaged (a
/// replicated message is whole or absent, so any damage is corruption).
pub(crate) fn unframe_records<R: Record>(mut bytes: &[u8], version: u16) -> Result<Vec<R>, String> {
    let mut records = Vec::new();
    while !bytes.is_empty() {
        let Some((len, crc, _)) = MESSAGE_FRAMING.header(bytes) else {
            return Err(format!("record {}: header cut short", records.len()));
        };
        let payload = bytes
            .get(RECORD_HEADER_LEN..RECORD_HEADER_LEN + len)
            .filter(|_| len <= RECORD_LEN_MAX)
            .ok_or_else(|| format!("record {}: length {len} out of bounds", records.len()))?;
        if crc32fast::hash(payload) != crc {
            return Err(format!("record {}: checksum mismatch", records.len()));
        }
        records.push(R::decode(payload, version)?);
        bytes = &bytes[RECORD_HEADER_LEN + len..];
    }
    Ok(records)
}

/// Opens shard `index`'s log for appending after `valid_len` (cutting off a torn tail) and
/// starts its writer thread, which hands its callers' `V`s back as their records are durable.
pub(crate) fn open_writer<V: Send + 'static>(
    dir: &Path,
    valid_len: u64,
    index: usize,
    count: usize,
    generation: u64,
    config: &DurabilityConfig,
) -> Result<(WalHandle<V>, std::thread::JoinHandle<()>), StorageError> {
    let path = &shard_log_path(dir, index);
    if valid_len >= FILE_HEADER_LEN as u64 {
        // Each record's header is checked against the log's generation: records of another
        // would be read as an older log's bytes.
        let header = read_log_header(path, index, count)?;
        if let Some((version, found)) =
            header.filter(|&(v, g)| (v, g) != (FORMAT_VERSION, generation))
        {
            let detail = format!(
                "the log to append to is of format {version}, generation {found}, not \
                 {FORMAT_VERSION}, {generation}"
            );
            return Err(StorageError::Mismatch { path: path.to_owned(), detail });
        }
    }
    let mut file =
        open_private(path, OpenOptions::new().create(true).read(true).write(true).truncate(false))
            .map_err(io_error(path))?;
    if valid_len < FILE_HEADER_LEN as u64 {
        file.set_len(0).map_err(io_error(path))?;
        file.write_all(&file_header(index, count, generation)).map_err(io_error(path))?;
    } else {
        file.set_len(valid_len).map_err(io_error(path))?;
        file.seek(SeekFrom::End(0)).map_err(io_error(path))?;
    }
    file.sync_all().map_err(io_error(path))?;
    if let Some(dir) = path.parent() {
        // Make the file's creation itself durable.
        File::open(dir).and_then(|d| d.sync_all()).map_err(io_error(dir))?;
    }
    let (jobs, queue) = channel::unbounded();
    let policy = config.fsync;
    let interval = Duration::from_millis(config.fsync_interval_ms.max(1));
    let files = Files {
        log: path.to_owned(),
        prev: shard_prev_log_path(dir, index),
        snapshot: shard_snapshot_path(dir, index),
        spare: shard_spare_path(dir, index),
        free: shard_free_log_path(dir, index),
        tmp: shard_tmp_path(dir, index),
        index,
        count,
    };
    let failed = Arc::new(AtomicBool::new(false));
    let writer_failed = Arc::clone(&failed);
    let stats = Arc::new(WalStats::default());
    let writer_stats = Arc::clone(&stats);
    let thread = std::thread::Builder::new()
        .name(format!("settlegate-wal-{index}"))
        .spawn(move || {
            if let Err(error) = ask_for_short_slices() {
                // An older kernel, or a policy the scheduler refuses to change: the writer runs
                // with the default slice, its replies later under load.
                tracing::debug!(shard = index, %error, "the log writer keeps the default slice");
            }
            let log = Log::new(file, generation);
            let run =
                || write_loop(log, &files, &queue, policy, interval, &writer_failed, &writer_stats);
            // A panic here (encoding a snapshot, say) is a broken invariant: fail fast.
            if let Err(panic) = std::panic::catch_unwind(std::panic::AssertUnwindSafe(run)) {
                crate::fail::fail_fast(&format!("log writer of shard {index}"), panic.as_ref());
            }
        })
        .map_err(|e| StorageError::Io { path: PathBuf::from("<thread>"), source: e })?;
    Ok((WalHandle { jobs: JobSender::Local(jobs), stats, failed, index, count }, thread))
}

/// The log a writer appends to, and its generation (which each record's header is checked
/// against).
struct Log {
    out: BufWriter<File>,
    generation: u64,
    /// Where the bytes whose writeback the writer has not started begin (see [`commit`]).
    unstarted: u64,
}

impl Log {
    /// A log of `generation` written through `file`, from its current position.
    fn new(file: File, generation: u64) -> Log {
        Log { out: BufWriter::with_capacity(1 << 20, file), generation, unstarted: 0 }
    }
}

/// A shard's files, for the writer.
struct Files {
    log: PathBuf,
    prev: PathBuf,
    snapshot: PathBuf,
    spare: PathBuf,
    free: PathBuf,
    tmp: PathBuf,
    index: usize,
    count: usize,
}

/// Rewrites shard `index`'s log, of generation `generation`, in this build's format: a
/// header of [`FORMAT_VERSION`] and `records` (the caller's, already encoded in it), replacing
/// the file whole (a crash leaves the old log or the new). For a log of an older format, on
/// first open: records are never appended to a file whose header names another format.
/// Returns the new log's length.
pub(crate) fn rewrite_log(
    dir: &Path,
    index: usize,
    count: usize,
    generation: u64,
    records: &[rkyv::util::AlignedVec],
) -> Result<u64, StorageError> {
    let path = shard_log_path(dir, index);
    let mut bytes = file_header(index, count, generation).to_vec();
    for record in records {
        bytes.extend_from_slice(&log_record_header(generation, record));
        bytes.extend_from_slice(record);
    }
    write_atomic(&path, &bytes).map_err(io_error(&path))?;
    Ok(bytes.len() as u64)
}

/// Writes `bytes` to `path` so that a crash leaves the old file or the new, whole one.
fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    write_atomic_parts(path, &[bytes])
}

/// [`write_atomic`] of `parts`, one after the other.
fn write_atomic_parts(path: &Path, parts: &[&[u8]]) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    let mut file = open_private(&tmp, OpenOptions::new().write(true).create(true).truncate(true))?;
    for part in parts {
        file.write_all(part)?;
    }
    file.sync_all()?;
    std::fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent() {
        File::open(dir)?.sync_all()?;
    }
    Ok(())
}

/// Puts `parts`, one after the other, in place of `path`'s file as [`write_atomic_parts`]
/// does (a crash leaves the old file or the new, whole one), but written over the file `path`
/// held before (`spare`), which then keeps the file it replaces for the next time.
///
/// Why: a new file's bytes go to newly allocated pages of the page cache, and on a VM whose
/// host takes back the guest's free memory (virtio-balloon free page reporting, as Firecracker
/// has) a page allocated afresh costs about ten times the copy into a page already there: a
/// snapshot of 160 MB took 0.4 s of CPU to write into a new file, 0.04 s over an old one. The
/// price is a second snapshot's room on disk (and, while the memory is free, in the cache).
///
/// The steps, and what a crash at each leaves (recovery reads `path` alone, and
/// [`prepare_dir`] removes `tmp`):
/// 1. `parts` written over `spare` from its start, cut to their length and synced. `spare` is
///    first checked to be no other name of `path`'s file (a crash between 3 and 4 leaves it
///    so), and made afresh if it is. A crash: `path` untouched.
/// 2. `spare` renamed to `tmp`. A crash: `path` untouched.
/// 3. `path`'s file linked as `spare`. A crash: `path` untouched.
/// 4. `tmp` renamed to `path`, and the directory synced: `path` is the new file.
fn replace_in_place(path: &Path, spare: &Path, tmp: &Path, parts: &[&[u8]]) -> std::io::Result<()> {
    let mut options = OpenOptions::new();
    options.write(true).create(true).truncate(false);
    let mut file = open_private(spare, &mut options)?;
    if is_other_name_of(&file, path)? {
        drop(file);
        std::fs::remove_file(spare)?;
        file = open_private(spare, &mut options)?;
    }
    let len = write_paced(&mut file, parts)?;
    file.set_len(len)?;
    file.sync_all()?;
    drop(file);
    std::fs::rename(spare, tmp)?;
    match std::fs::hard_link(path, spare) {
        Ok(()) => {}
        // No file to keep (the first snapshot), or a file system without hard links: the
        // next snapshot makes its file afresh.
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
        Err(error) => {
            tracing::debug!(path = %spare.display(), %error, "snapshot file not kept for reuse")
        }
    }
    std::fs::rename(tmp, path)?;
    if let Some(dir) = path.parent() {
        File::open(dir)?.sync_all()?;
    }
    Ok(())
}

/// How much of a snapshot's bytes [`write_paced`] lets the disk have queued at once.
const WRITEBACK_CHUNK: u64 = 1 << 20;

/// Writes `parts`, one after the other, from `file`'s start, and returns their length; on
/// Linux, each [`WRITEBACK_CHUNK`] is handed to the disk as soon as it is written
/// (`sync_file_range`), and the chunk before it waited for, so the disk never has more than
/// two chunks of the file queued. The caller still syncs the file: this orders no write and
/// makes nothing durable, it only spreads the writeback over the writing.
///
/// Why: written whole and then synced, a snapshot of 160 MB reached the disk as one burst, and
/// the log's `fdatasync`s issued meanwhile waited behind all of it: 100–400 ms each, about one
/// for each snapshot, during which no reply of the shard could leave (the durable closed loop's
/// p99.9 was 128–183 ms). Paced, a log's sync waits behind at most two chunks (RocksDB's
/// `bytes_per_sync` and PostgreSQL's `checkpoint_flush_after` do the same for the same reason).
fn write_paced(file: &mut File, parts: &[&[u8]]) -> std::io::Result<u64> {
    let (mut len, mut started, mut waited) = (0u64, 0u64, 0u64);
    for part in parts {
        for piece in part.chunks(WRITEBACK_CHUNK as usize) {
            file.write_all(piece)?;
            len += piece.len() as u64;
            if len - started >= WRITEBACK_CHUNK {
                start_writeback(file, started, len, false)?;
                start_writeback(file, waited, started, true)?;
                (waited, started) = (started, len);
            }
        }
    }
    Ok(len)
}

/// Starts the writeback of `file`'s bytes from `from` to `to` (and with `wait`, waits for it
/// to end); nothing where the system has no `sync_file_range`.
#[cfg(target_os = "linux")]
fn start_writeback(file: &File, from: u64, to: u64, wait: bool) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    if to <= from {
        return Ok(());
    }
    let flags = match wait {
        false => libc::SYNC_FILE_RANGE_WRITE,
        true => {
            libc::SYNC_FILE_RANGE_WAIT_BEFORE
                | libc::SYNC_FILE_RANGE_WRITE
                | libc::SYNC_FILE_RANGE_WAIT_AFTER
        }
    };
    // SAFETY: a plain system call on a file descriptor this function borrows for its duration.
    let done =
        unsafe { libc::sync_file_range(file.as_raw_fd(), from as i64, (to - from) as i64, flags) };
    match done {
        0 => Ok(()),
        _ => Err(std::io::Error::last_os_error()),
    }
}

#[cfg(not(target_os = "linux"))]
fn start_writeback(_: &File, _: u64, _: u64, _: bool) -> std::io::Result<()> {
    Ok(())
}

/// The slice the log writer asks the scheduler for (`sched_setattr`'s `sched_runtime` for the
/// default policy, Linux 6.12 and later; the shortest it grants). The writer runs for
/// microseconds at a time: from a job's arrival to its sync, and from a sync's end to its
/// replies. With the default slice (1.4 ms on a 2-core machine), once every core was busy a
/// woken writer waited for one: under the closed loop's durable load, one cycle in seven found
/// no job queued and the writer then took 0.8–1.2 ms to run after the next arrived, and a sync
/// took 0.35 ms from the call to its return where the disk needed about 0.2. A short slice lets
/// the woken writer preempt the task running: alternating, 1–6% more payments a second, 3–5%
/// less server CPU per payment, syncs of 0.21 ms (`docs/BENCHMARKS.md`).
#[cfg(target_os = "linux")]
const WRITER_SLICE_NS: u64 = 100_000;

/// `struct sched_attr` (`SCHED_ATTR_SIZE_VER1`), as `sched_getattr` and `sched_setattr` take it.
#[cfg(target_os = "linux")]
#[repr(C)]
#[derive(Debug, Default)]
struct SchedAttr {
    size: u32,
    policy: u32,
    flags: u64,
    nice: i32,
    priority: u32,
    runtime: u64,
    deadline: u64,
    period: u64,
    util_min: u32,
    util_max: u32,
}

/// The calling thread's scheduling attributes.
#[cfg(target_os = "linux")]
fn sched_attr() -> std::io::Result<SchedAttr> {
    let mut attr = SchedAttr::default();
    let size = std::mem::size_of::<SchedAttr>() as libc::c_uint;
    // SAFETY: the kernel writes at most `size` bytes into `attr`, borrowed for the call.
    let done = unsafe {
        libc::syscall(libc::SYS_sched_getattr, 0, std::ptr::from_mut(&mut attr), size, 0)
    };
    match done {
        0 => Ok(attr),
        _ => Err(std::io::Error::last_os_error()),
    }
}

/// Asks the scheduler for [`WRITER_SLICE_NS`] slices for the calling thread, when it runs under
/// the default policy (one an operator set, real-time or batch, stays); its nice value stays.
#[cfg(target_os = "linux")]
fn ask_for_short_slices() -> std::io::Result<()> {
    const SCHED_OTHER: u32 = 0;
    let mut attr = sched_attr()?;
    if attr.policy != SCHED_OTHER {
        return Ok(());
    }
    attr.size = std::mem::size_of::<SchedAttr>() as u32;
    // No flags: the utilisation clamps are left as they are.
    attr.flags = 0;
    attr.runtime = WRITER_SLICE_NS;
    // SAFETY: the kernel reads `attr.size` bytes from `attr`, borrowed for the call.
    let done = unsafe { libc::syscall(libc::SYS_sched_setattr, 0, std::ptr::from_ref(&attr), 0) };
    match done {
        0 => Ok(()),
        _ => Err(std::io::Error::last_os_error()),
    }
}

#[cfg(not(target_os = "linux"))]
fn ask_for_short_slices() -> std::io::Result<()> {
    Ok(())
}

/// Whether `file` is also `path`'s file (the same inode).
#[cfg(unix)]
fn is_other_name_of(file: &File, path: &Path) -> std::io::Result<bool> {
    use std::os::unix::fs::MetadataExt;
    let meta = file.metadata()?;
    match std::fs::metadata(path) {
        Ok(other) => Ok(meta.dev() == other.dev() && meta.ino() == other.ino()),
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(error) => Err(error),
    }
}

/// Without inode numbers to compare, the file is treated as shared: made afresh every time.
#[cfg(not(unix))]
fn is_other_name_of(_: &File, _: &Path) -> std::io::Result<bool> {
    Ok(true)
}

/// Starts the log afresh at a snapshot's generation, and the snapshot's writing beside it, so
/// that group commits go on while the snapshot is encoded and written:
///
/// 1. everything before the snapshot is synced;
/// 2. the log is renamed to the previous log ([`shard_prev_log_path`]) and a new one, of the
///    snapshot's generation, put in its place;
/// 3. on a thread of its own, the snapshot is encoded and put in place, then the previous log
///    removed.
///
/// A crash anywhere leaves a state recovery reads whole: before 2, the old log; between the
/// rename and the new log, the previous log alone; before the snapshot is in place, the old
/// snapshot, the previous log and the new log (replayed in that order); after it, the new
/// snapshot and the new log (a previous log left then is older than the snapshot, and removed).
/// The previous log is never replaced while a snapshot still needs it: a rotation first waits
/// for the snapshot before it, and fails if that one failed.
fn rotate(
    log: &mut Log,
    files: &Files,
    snapshot: SnapshotJob,
    snapshots: &mut Snapshots,
) -> std::io::Result<()> {
    end_log(&mut log.out)?;
    finish_snapshot(snapshots)?;
    let buffer = std::mem::take(&mut snapshots.buffer);
    std::fs::rename(&files.log, &files.prev)?;
    let file = start_log(files, snapshot.generation)?;
    *log = Log::new(file, snapshot.generation);
    let (path, prev, index) = (files.snapshot.clone(), files.prev.clone(), files.index);
    let (spare, tmp, free) = (files.spare.clone(), files.tmp.clone(), files.free.clone());
    let thread =
        std::thread::Builder::new().name(format!("settlegate-snap-{index}")).spawn(move || {
            let SnapshotJob { payload, index, count, generation } = snapshot;
            // Header and payload written as they are: a snapshot is not copied to join them.
            let payload = payload(buffer);
            let header = snapshot::header(&payload, index, count, generation);
            replace_in_place(&path, &spare, &tmp, &[&header, &payload])?;
            // Kept for the log after next to be written over (`start_log`).
            std::fs::rename(&prev, &free)?;
            Ok(payload)
        })?;
    snapshots.writing = Some(thread);
    Ok(())
}

/// Ends the log at its last record: flushed, cut there if its file is longer (a log written
/// over an older one's file, [`start_log`], holds that log's bytes after its own), and synced.
fn end_log(out: &mut BufWriter<File>) -> std::io::Result<()> {
    out.flush()?;
    let file = out.get_mut();
    let end = file.stream_position()?;
    if file.metadata()?.len() > end {
        file.set_len(end)?;
    }
    file.sync_data()
}

/// Puts a fresh log of `generation` in place of the log (which the caller has renamed to the
/// previous log) and returns it, open for writing after its header.
///
/// The log is written over the file of the log before the previous one (`free`, kept by the
/// last snapshot's thread), where there is one: its header first, synced, then the file renamed
/// in place, its older records left after the header for the new ones to overwrite. Why: on
/// this project's VM (ext4) a `fdatasync` after writes over a file's existing bytes took
/// 0.17–0.21 ms where one after appending to a file took 0.30–0.37 ms (a file's growth is a
/// metadata write with each sync, and its new page cache is dear: see [`replace_in_place`]).
/// The log format ([`FORMAT_VERSION`] 10) is what makes this safe: each record's header is
/// checked against the log's generation, so the older log's records after the last of this
/// one are never read as this one's.
///
/// A crash before the rename leaves the previous log alone (`free` is never read); after it, a
/// log of `generation` holding no record of its own.
fn start_log(files: &Files, generation: u64) -> std::io::Result<File> {
    let header = file_header(files.index, files.count, generation);
    let mut options = OpenOptions::new();
    options.write(true);
    match open_private(&files.free, &mut options) {
        Ok(mut file) => {
            // A name shared with the previous log would write over it, and a file whose records
            // are not of an older generation could be read as the new log's: never reused.
            let older = matches!(
                read_log_header(&files.free, files.index, files.count),
                Ok(Some((_, found))) if found < generation
            );
            if !older || is_other_name_of(&file, &files.prev)? {
                drop(file);
                std::fs::remove_file(&files.free)?;
            } else {
                file.write_all(&header)?;
                file.sync_data()?;
                std::fs::rename(&files.free, &files.log)?;
                if let Some(dir) = files.log.parent() {
                    File::open(dir)?.sync_all()?;
                }
                return Ok(file);
            }
        }
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
        Err(error) => return Err(error),
    }
    write_atomic(&files.log, &header)?;
    let mut file = OpenOptions::new().write(true).open(&files.log)?;
    file.seek(SeekFrom::End(0))?;
    Ok(file)
}

/// A snapshot being encoded and written beside the log ([`rotate`]); it hands its buffer back.
type SnapshotThread = std::thread::JoinHandle<std::io::Result<rkyv::util::AlignedVec>>;

/// A shard's snapshots, for its writer: the one being written, if any, and the buffer the last
/// one was encoded into, kept (emptied) for the next. A snapshot is as large as the shard's
/// state (160 MB for a million idempotency records), and memory allocated afresh for each was
/// paid for again in page faults (on this project's VM, where freed memory goes back to the
/// host, dearly): the price is that much memory held between snapshots.
#[derive(Default)]
struct Snapshots {
    writing: Option<SnapshotThread>,
    buffer: rkyv::util::AlignedVec,
}

/// What a snapshot job carries.
struct SnapshotJob {
    payload: SnapshotPayload,
    index: usize,
    count: usize,
    generation: u64,
}

/// Waits for the snapshot being written, if any: its failure is the writer's (the previous
/// log it leaves must not be replaced), and a panic while encoding it a broken invariant.
fn finish_snapshot(snapshots: &mut Snapshots) -> std::io::Result<()> {
    let Some(thread) = snapshots.writing.take() else { return Ok(()) };
    match thread.join() {
        Ok(result) => {
            snapshots.buffer = result?;
            snapshots.buffer.clear();
            Ok(())
        }
        Err(panic) => crate::fail::fail_fast("a shard's snapshot writer", panic.as_ref()),
    }
}

fn write_loop<V>(
    mut log: Log,
    files: &Files,
    queue: &Receiver<Job<V>>,
    policy: FsyncPolicy,
    interval: Duration,
    failed: &AtomicBool,
    stats: &WalStats,
) {
    let mut sync = SyncState { policy, interval, last: Instant::now(), unsynced: false, stats };
    let mut snapshots = Snapshots::default();
    loop {
        let first = match policy {
            FsyncPolicy::Interval => match queue.recv_timeout(interval) {
                Ok(job) => Some(job),
                Err(RecvTimeoutError::Timeout) => None,
                Err(RecvTimeoutError::Disconnected) => break,
            },
            _ => match queue.recv() {
                Ok(job) => Some(job),
                Err(_) => break,
            },
        };
        let mut jobs: Vec<Job<V>> = first.into_iter().collect();
        while jobs.len() < GROUP_JOBS_MAX {
            match queue.try_recv() {
                Ok(job) => jobs.push(job),
                Err(_) => break,
            }
        }
        if let Err(error) = process(&mut log, files, jobs, &mut sync, &mut snapshots, failed) {
            // Without a log nothing more may be acknowledged: every queued reply is dropped
            // (callers see the engine stopped), and the writer stops. `process` set the flag
            // before it dropped the replies it held: from then on the engine reports the shard
            // unavailable (and a server, not ready).
            tracing::error!(path = %files.log.display(), %error, "write-ahead log failed; shard stops acknowledging");
            return;
        }
    }
    let _ = end_log(&mut log.out);
    if let Err(error) = finish_snapshot(&mut snapshots) {
        // The previous log stays, and recovery replays it after the older snapshot.
        tracing::error!(path = %files.snapshot.display(), %error, "snapshot failed");
    }
}

struct SyncState<'a> {
    policy: FsyncPolicy,
    interval: Duration,
    last: Instant,
    unsynced: bool,
    stats: &'a WalStats,
}

type Pending<V> = (Records, oneshot::Sender<V>, V);

/// Runs of record jobs are group-committed; a snapshot job ends a run and rotates the files.
///
/// On a failure `failed` is set *before* the replies still held are dropped: a caller that sees
/// its reply dropped then always finds the shard reported unavailable.
fn process<V>(
    log: &mut Log,
    files: &Files,
    jobs: Vec<Job<V>>,
    sync: &mut SyncState<'_>,
    snapshots: &mut Snapshots,
    failed: &AtomicBool,
) -> std::io::Result<()> {
    let mut group: Vec<Pending<V>> = Vec::new();
    let mut jobs = jobs.into_iter();
    let mut run = || {
        for job in jobs.by_ref() {
            match job {
                Job::Records { records, reply, replies } => group.push((records, reply, replies)),
                Job::Snapshot { payload, index, count, generation } => {
                    commit(log, &mut group, sync)?;
                    let job = SnapshotJob { payload, index, count, generation };
                    rotate(log, files, job, snapshots)?;
                    sync.unsynced = false;
                }
            }
        }
        commit(log, &mut group, sync)
    };
    let result = run();
    if result.is_err() {
        failed.store(true, Ordering::Release);
    }
    drop((group, jobs));
    result
}

/// Writes a group of record jobs, syncs as the policy says, then releases their replies.
fn commit<V>(
    log: &mut Log,
    group: &mut Vec<Pending<V>>,
    sync: &mut SyncState<'_>,
) -> std::io::Result<()> {
    if group.is_empty() {
        return Ok(());
    }
    let records: usize = group.iter().map(|(records, _, _)| records.len()).sum();
    if records > 0 {
        sync.stats.group_records.record(records as f64);
    }
    write_group(log, group.iter().map(|(records, _, _)| records))?;
    sync.unsynced |= group.iter().any(|(records, _, _)| !records.is_empty());
    let due = match sync.policy {
        FsyncPolicy::Always => sync.unsynced,
        FsyncPolicy::Interval => sync.unsynced && sync.last.elapsed() >= sync.interval,
        FsyncPolicy::Off => false,
    };
    if due {
        let started = Instant::now();
        log.out.get_ref().sync_data()?;
        sync.stats.fsync.record_duration(started.elapsed());
        sync.last = Instant::now();
        sync.unsynced = false;
    } else if sync.policy != FsyncPolicy::Always {
        // Unsynced bytes are handed to the disk a chunk at a time, not left for the sync that
        // ends the log at its rotation: with `fsync = "off"` that sync found up to a log's
        // worth (300 MB) not yet written, and held back every reply of the shard behind it
        // (the closed loop's p99.9 was 489 ms). As `write_paced` does for a snapshot, but
        // with no wait: the writer's replies do not wait for the disk under this policy.
        let end = log.out.get_mut().stream_position()?;
        if end >= log.unstarted + WRITEBACK_CHUNK {
            start_writeback(log.out.get_ref(), log.unstarted, end, false)?;
            log.unstarted = end;
        }
    }
    for (_, reply, replies) in group.drain(..) {
        let _ = reply.send(replies);
    }
    Ok(())
}

/// Writes each batch's framed records as they are, in as few system calls as the system allows
/// (a vectored write: no copy into a buffer of the writer's).
fn write_group<'a>(
    log: &mut Log,
    batches: impl Iterator<Item = &'a Records>,
) -> std::io::Result<()> {
    let mut slices = Vec::new();
    for records in batches {
        if records.generation != log.generation {
            return Err(std::io::Error::other(format!(
                "records framed for log generation {}, written to generation {}",
                records.generation, log.generation
            )));
        }
        if !records.bytes.is_empty() {
            slices.push(std::io::IoSlice::new(&records.bytes));
        }
    }
    log.out.flush()?;
    let file = log.out.get_mut();
    let mut slices = &mut slices[..];
    while !slices.is_empty() {
        match file.write_vectored(slices) {
            Ok(0) => return Err(std::io::ErrorKind::WriteZero.into()),
            Ok(written) => std::io::IoSlice::advance_slices(&mut slices, written),
            Err(error) if error.kind() == std::io::ErrorKind::Interrupted => {}
            Err(error) => return Err(error),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The writer's short slices keep the thread's nice value (an operator's `nice` stays), and
    /// are granted as asked where the kernel takes a slice at all (6.12 and later).
    #[cfg(target_os = "linux")]
    #[test]
    fn a_writer_asks_for_short_slices_and_keeps_its_nice_value() {
        std::thread::spawn(|| {
            // Raising one's own nice value needs no privilege.
            // SAFETY: plain system calls on the calling thread.
            let tid = unsafe { libc::syscall(libc::SYS_gettid) } as libc::id_t;
            // SAFETY: as above.
            assert_eq!(unsafe { libc::setpriority(libc::PRIO_PROCESS, tid, 7) }, 0);
            let before = sched_attr().unwrap();
            assert_eq!(before.nice, 7);
            ask_for_short_slices().unwrap();
            let after = sched_attr().unwrap();
            assert_eq!((after.policy, after.nice), (before.policy, 7));
            if before.runtime != 0 {
                assert_eq!(after.runtime, WRITER_SLICE_NS, "{after:?}");
            }
        })
        .join()
        .unwrap();
    }

    fn inode(path: &Path) -> u64 {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(path).unwrap().ino()
    }

    #[test]
    fn a_snapshot_is_written_over_the_one_before_it() {
        let dir = tempfile::tempdir().unwrap();
        let (path, spare, tmp) =
            (dir.path().join("s.snap"), dir.path().join("s.spare"), dir.path().join("s.tmp"));
        replace_in_place(&path, &spare, &tmp, &[b"the first, ", b"the longest of three"]).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"the first, the longest of three");
        let first = inode(&path);
        replace_in_place(&path, &spare, &tmp, &[b"second"]).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"second");
        // The file it replaced is kept, whole, to be written over next time.
        assert_eq!(std::fs::read(&spare).unwrap(), b"the first, the longest of three");
        assert_eq!(inode(&spare), first);
        replace_in_place(&path, &spare, &tmp, &[b"third"]).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"third", "cut to its own length");
        assert_eq!(inode(&path), first, "written over the first snapshot's file");
        assert_eq!(std::fs::read(&spare).unwrap(), b"second");
        assert!(!tmp.exists());
    }

    fn files(dir: &Path) -> Files {
        Files {
            log: shard_log_path(dir, 0),
            prev: shard_prev_log_path(dir, 0),
            snapshot: shard_snapshot_path(dir, 0),
            spare: shard_spare_path(dir, 0),
            free: shard_free_log_path(dir, 0),
            tmp: shard_tmp_path(dir, 0),
            index: 0,
            count: 1,
        }
    }

    /// A log of `generation` holding `records` records of 100 bytes.
    fn log_file(path: &Path, generation: u64, records: usize) -> Vec<u8> {
        let mut bytes = file_header(0, 1, generation).to_vec();
        for n in 0..records {
            let record = vec![n as u8; 100];
            bytes.extend_from_slice(&log_record_header(generation, &record));
            bytes.extend_from_slice(&record);
        }
        std::fs::write(path, &bytes).unwrap();
        bytes
    }

    #[test]
    fn a_log_is_started_over_the_kept_older_log_only_where_that_is_safe() {
        let dir = tempfile::tempdir().unwrap();
        let files = files(dir.path());
        // The kept older log (generation 1), and the previous log (2): the log of generation
        // 3 is written over the older one, its header first, its records left after it.
        let older = log_file(&files.free, 1, 3);
        log_file(&files.prev, 2, 1);
        let free_inode = inode(&files.free);
        let mut log = start_log(&files, 3).unwrap();
        assert_eq!(inode(&files.log), free_inode);
        assert!(!files.free.exists());
        log.write_all(b"next").unwrap();
        let bytes = std::fs::read(&files.log).unwrap();
        assert_eq!(bytes[..FILE_HEADER_LEN], file_header(0, 1, 3));
        assert_eq!(&bytes[FILE_HEADER_LEN..FILE_HEADER_LEN + 4], b"next", "written after it");
        assert_eq!(bytes[FILE_HEADER_LEN + 4..], older[FILE_HEADER_LEN + 4..]);
        std::fs::remove_file(&files.log).unwrap();

        // Kept files that are not safe to write over are removed, and the log made afresh: one
        // whose generation is not older (a crash after its header was written, before its
        // rename, then a recovery back to an older generation), one that is another name of the
        // previous log, one that is not a log.
        let not_older = |files: &Files| _ = log_file(&files.free, 3, 2);
        let linked = |files: &Files| std::fs::hard_link(&files.prev, &files.free).unwrap();
        let not_a_log = |files: &Files| std::fs::write(&files.free, b"short").unwrap();
        let cases: [&dyn Fn(&Files); 3] = [&not_older, &linked, &not_a_log];
        for (case, make) in cases.iter().enumerate() {
            make(&files);
            let prev = std::fs::read(&files.prev).unwrap();
            start_log(&files, 3).unwrap();
            assert!(!files.free.exists(), "case {case}");
            assert_eq!(std::fs::read(&files.log).unwrap(), file_header(0, 1, 3), "case {case}");
            assert_eq!(std::fs::read(&files.prev).unwrap(), prev, "case {case}: untouched");
            std::fs::remove_file(&files.log).unwrap();
        }
    }

    #[test]
    fn an_unsynced_log_is_handed_to_the_disk_a_chunk_at_a_time_and_written_whole() {
        for policy in [FsyncPolicy::Off, FsyncPolicy::Interval] {
            let dir = tempfile::tempdir().unwrap();
            let files = files(dir.path());
            let mut log = Log::new(start_log(&files, 3).unwrap(), 3);
            let stats = WalStats::default();
            let interval = Duration::from_secs(3600);
            let last = Instant::now();
            let mut sync = SyncState { policy, interval, last, unsynced: false, stats: &stats };
            let payload = vec![5u8; 100_000];
            let mut expected = file_header(0, 1, 3).to_vec();
            for _ in 0..30 {
                let mut records = Records::with_capacity(3, 0);
                (0..4).for_each(|_| records.push(&payload));
                let (reply, answered) = oneshot::channel();
                let mut group = vec![(records, reply, 7)];
                commit(&mut log, &mut group, &mut sync).unwrap();
                assert_eq!(answered.blocking_recv(), Ok(7), "{policy:?}: answered unsynced");
                for _ in 0..4 {
                    expected.extend_from_slice(&log_record_header(3, &payload));
                    expected.extend_from_slice(&payload);
                }
            }
            assert_eq!(
                stats.fsync.snapshot().count,
                0,
                "{policy:?}: not synced within its interval"
            );
            // Started up to the last whole chunk's end, not left for the sync that ends the log.
            let len = expected.len() as u64;
            assert!(log.unstarted > len - WRITEBACK_CHUNK, "{policy:?}: {}", log.unstarted);
            assert_eq!(std::fs::read(&files.log).unwrap(), expected, "{policy:?}");
        }
    }

    #[test]
    fn a_paced_write_holds_its_parts_whole_across_chunks() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("paced");
        // Parts whose ends fall inside chunks, across several chunks, over a longer file.
        let chunk = WRITEBACK_CHUNK as usize;
        let parts: Vec<Vec<u8>> = [40, 3 * chunk + 17, chunk - 40, 5]
            .iter()
            .enumerate()
            .map(|(n, &len)| (0..len).map(|i| (i * 31 + n) as u8).collect())
            .collect();
        std::fs::write(&path, vec![0xee; 6 * chunk]).unwrap();
        let mut file = OpenOptions::new().write(true).open(&path).unwrap();
        let slices: Vec<&[u8]> = parts.iter().map(|part| &part[..]).collect();
        let len = write_paced(&mut file, &slices).unwrap();
        assert_eq!(len as usize, parts.iter().map(Vec::len).sum::<usize>());
        let bytes = std::fs::read(&path).unwrap();
        assert_eq!(bytes[..len as usize], parts.concat()[..]);
        assert!(bytes[len as usize..].iter().all(|&b| b == 0xee), "left for the caller to cut");
    }

    #[test]
    fn a_batch_is_written_framed_as_the_log_frames_a_record_and_only_to_its_own_generation() {
        let dir = tempfile::tempdir().unwrap();
        let files = files(dir.path());
        let payloads: [Vec<u8>; 3] = [vec![1; 240], Vec::new(), vec![7; 3000]];
        let batch = |generation| {
            let mut records = Records::with_capacity(generation, 0);
            payloads.iter().for_each(|payload| records.push(payload));
            records
        };
        let records = batch(3);
        assert_eq!(records.len(), 3);
        let read: Vec<_> = records.iter().collect();
        let expected: Vec<_> = payloads.iter().map(|p| (&p[..], crc32fast::hash(p))).collect();
        assert_eq!(read, expected);

        let mut log = Log::new(start_log(&files, 3).unwrap(), 3);
        write_group(&mut log, [&records, &batch(3)].into_iter()).unwrap();
        let mut framed = file_header(0, 1, 3).to_vec();
        for payload in payloads.iter().chain(&payloads) {
            framed.extend_from_slice(&log_record_header(3, payload));
            framed.extend_from_slice(payload);
        }
        assert_eq!(std::fs::read(&files.log).unwrap(), framed);

        // A batch framed for another generation would read as the log's end: it is refused,
        // and nothing of its group is written.
        let error = write_group(&mut log, [&batch(3), &batch(2)].into_iter()).unwrap_err();
        assert!(error.to_string().contains("generation 2"), "{error}");
        assert_eq!(std::fs::read(&files.log).unwrap(), framed);
    }

    #[test]
    fn a_spare_that_is_the_snapshot_itself_is_made_afresh_not_written_over() {
        // A crash after the snapshot's file was linked as the spare, before the new one was
        // renamed in place, leaves both names on one file (and the new one as `tmp`, which
        // the next start removes). Writing over the spare then would write over the snapshot.
        let dir = tempfile::tempdir().unwrap();
        let (path, spare, tmp) =
            (dir.path().join("s.snap"), dir.path().join("s.spare"), dir.path().join("s.tmp"));
        std::fs::write(&path, b"the snapshot recovery reads").unwrap();
        std::fs::hard_link(&path, &spare).unwrap();
        replace_in_place(&path, &spare, &tmp, &[b"the next"]).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"the next");
        assert_eq!(std::fs::read(&spare).unwrap(), b"the snapshot recovery reads");
        assert_ne!(inode(&path), inode(&spare));
        assert!(!tmp.exists());
    }
}
