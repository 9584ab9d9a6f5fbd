//! Entry points for the fuzz targets in `fuzz/` (cargo-fuzz): the write-ahead log and snapshot
//! readers, on bytes instead of files. Not part of the engine's API (hidden from its
//! documentation); nothing here is needed to embed the engine, and nothing here writes a file.

use std::path::Path;
use std::sync::Arc;

use crate::age::AgeRules;
use crate::codes::CodeKey;
use crate::geo::StoreDirectory;
use crate::keys::DeviceIndex;
use crate::providers::Registry;
use crate::shard::logged::Logged;
use crate::shard::state::{Shared, StateConfig};
use crate::shard::Envelope;
use crate::shard::ShardState;
use crate::vault::Vault;
use crate::wal::{self, snapshot, StorageError};

/// The vault key the fuzz targets' records are sealed under.
const VAULT_KEY: [u8; 32] = [0x55; 32];

/// What a log read from bytes held.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogRead {
    /// Whole records read (each also turned back into its command, which must not panic).
    pub records: usize,
    /// Bytes of the header and the whole records.
    pub valid_len: u64,
    /// Bytes of a torn tail the reader would cut.
    pub torn_bytes: u64,
    /// The log's generation; none for a file shorter than its header.
    pub generation: Option<u64>,
}

/// Why a log or snapshot was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// A damaged record (or snapshot) starting at this byte offset.
    Corrupt {
        /// The offset the error names.
        offset: u64,
    },
    /// Not a settlegate file, another shard layout, a newer format, or a damaged header.
    Header,
}

fn refusal(error: StorageError) -> Refusal {
    match error {
        // Offset 0: the file's header is damaged.
        StorageError::Corrupt { offset, .. } if offset > 0 => Refusal::Corrupt { offset },
        _ => Refusal::Header,
    }
}

/// Reads `bytes` as the log of shard 0 of 1, as recovery would, and turns every record back
/// into its command.
pub fn read_log(bytes: &[u8]) -> Result<LogRead, Refusal> {
    let mut log =
        wal::parse_records::<Logged>(Path::new("fuzz.wal"), bytes, 0, 1).map_err(refusal)?;
    let vault = Vault::new(&VAULT_KEY);
    let records = std::mem::take(&mut log.records);
    let count = records.len();
    for record in records {
        // A record may pass its checksum and decode yet not convert (a key that does not open,
        // a policy whose time zone is unknown): recovery refuses that; here it only must not
        // panic.
        let _ = record.into_envelope(&vault);
    }
    Ok(LogRead {
        records: count,
        valid_len: log.valid_len,
        torn_bytes: log.torn_bytes,
        generation: log.generation,
    })
}

/// A valid log of shard 0 of 1, generation `generation`, with one record per text.
pub struct SampleLog {
    /// The file.
    pub bytes: Vec<u8>,
    /// Where each record starts, then the file's length.
    pub boundaries: Vec<u64>,
}

/// Writes a valid log holding one record per entry of `texts` (each a provider's terminal
/// removed), as the writer writes it.
pub fn sample_log(generation: u64, texts: &[String]) -> SampleLog {
    let mut bytes = wal::file_header(0, 1, generation).to_vec();
    let mut boundaries = Vec::with_capacity(texts.len() + 1);
    for (n, text) in texts.iter().enumerate() {
        boundaries.push(bytes.len() as u64);
        let payload = Envelope::sample(n as u64, text).to_bytes();
        bytes.extend_from_slice(&wal::log_record_header(generation, &payload));
        bytes.extend_from_slice(&payload);
    }
    boundaries.push(bytes.len() as u64);
    SampleLog { bytes, boundaries }
}

/// Reads `bytes` as the snapshot of shard 0 of 1 and, if it reads, restores it into a fresh
/// shard, as recovery would. Returns the generation.
pub fn read_snapshot(bytes: &[u8]) -> Result<u64, Refusal> {
    let (generation, snapshot) =
        snapshot::read_bytes(Path::new("fuzz.snap"), bytes, 0, 1).map_err(refusal)?;
    let mut state = fresh_shard();
    snapshot.restore(&mut state).map_err(|_| Refusal::Corrupt { offset: 0 })?;
    Ok(generation)
}

/// A snapshot file of format `version` around `payload`, its header and checksum right, so
/// that a fuzz target reaches the archive's validation and the restore.
pub fn snapshot_file(version: u16, generation: u64, payload: &[u8]) -> Vec<u8> {
    let header_len = if version >= 4 { 48 } else { 36 };
    let mut out = Vec::with_capacity(header_len + payload.len());
    out.extend_from_slice(&snapshot::MAGIC);
    out.extend_from_slice(&version.to_be_bytes());
    out.extend_from_slice(&0u16.to_be_bytes());
    out.extend_from_slice(&1u32.to_be_bytes());
    out.extend_from_slice(&generation.to_be_bytes());
    out.extend_from_slice(&(payload.len() as u64).to_be_bytes());
    out.extend_from_slice(&crc32fast::hash(payload).to_be_bytes());
    out.resize(header_len, 0);
    out.extend_from_slice(payload);
    out
}

/// A fresh shard 0, with no provider, under the fuzzing vault key.
pub(crate) fn fresh_shard() -> ShardState {
    let vault = Arc::new(Vault::new(&VAULT_KEY));
    let shared = Shared {
        devices: Arc::new(DeviceIndex::new(Arc::clone(&vault))),
        vault,
        registry: Arc::new(Registry::new(Vec::new())),
        age: Arc::new(AgeRules::new(Default::default()).expect("the default age rules")),
        stores: Arc::new(StoreDirectory::default()),
        codes: Arc::new(CodeKey::derive(&VAULT_KEY)),
        code_issuer: 1,
        completions_dropped: Arc::default(),
    };
    let config = StateConfig {
        timestamp_window_ms: 300_000,
        key_grace_ms: 0,
        login_failures_max: 5,
        lockout_ms: 0,
        idempotency_ttl_ms: 86_400_000,
        idempotency_records_max: 1024,
        owed_max: 1024,
        refund_window_ms: 86_400_000,
        settled_max: 1024,
    };
    ShardState::new(0, shared, config)
}
