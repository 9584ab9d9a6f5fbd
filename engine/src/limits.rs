//! Every limit the engine enforces, in one place, checked against each other at compile time.
//!
//! The limits a client can see on the wire are defined in `settlegate-types` (shared with the
//! wire codec) and re-exported here; the engine's own follow.

pub use settlegate_types::limits::*;

/// Requests in one batch submission (embedded `authorize_batch`, or one protocol read).
pub const BATCH_SIZE_MAX: usize = 4096;
/// Terminals a provider may list.
pub const TERMINALS_PER_PROVIDER_MAX: usize = 1_000_000;
/// Providers the engine serves.
pub const PROVIDERS_MAX: usize = 1024;
/// Width of the per-device anti-replay window: counters this far below the highest seen are
/// still accepted once (reordering across pipelined connections), older ones are replays.
pub const REPLAY_WINDOW: u64 = 64;
/// Shards the engine may run.
pub const SHARDS_MAX: usize = 256;
/// Batches queued in one shard's mailbox before admission answers "busy".
pub const MAILBOX_CAPACITY_MAX: usize = 65_536;
/// Notices buffered per subscriber before the oldest are dropped (the subscriber sees a lag).
pub const NOTICE_BUFFER: usize = 256;
/// Stores one shard holds.
pub const STORES_PER_SHARD_MAX: usize = 4_000_000;
/// Batches at or above this size are verified on the rayon pool, smaller ones inline.
pub const VERIFY_PARALLEL_MIN: usize = 32;

const _: () = assert!(REPLAY_WINDOW == 64, "the replay window is one u64 bitmap");
const _: () = assert!(VERIFY_PARALLEL_MIN <= BATCH_SIZE_MAX);
const _: () = assert!(SHARDS_MAX <= 256, "dispatch IDs carry the shard in 8 bits");
