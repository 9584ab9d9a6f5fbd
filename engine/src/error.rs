//! Errors of the engine API. A decline is not an error: it is an [`crate::AuthOutcome`].

use crate::types::ReasonCode;

/// Why the engine could not give an outcome for a request.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum EngineError {
    /// The owning shard's mailbox is full; nothing was recorded. Retry after the hint, with the
    /// same client request ID.
    #[error("engine busy, retry after {retry_after_ms} ms")]
    Busy {
        /// Suggested wait before retrying.
        retry_after_ms: u32,
    },
    /// A request with this client request ID is still being processed.
    #[error("a request with this client request ID is in flight")]
    InFlight,
    /// The request was refused, with the documented reason.
    #[error("refused: {0}")]
    Refused(ReasonCode),
    /// More requests in one batch than the limit.
    #[error("batch of {len} exceeds the maximum of {max}")]
    BatchTooLarge {
        /// Requests submitted.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// The configuration is invalid.
    #[error("invalid config: {0}")]
    Config(String),
    /// The data directory cannot be read or written; names the file and what is wrong.
    #[error("storage: {0}")]
    Storage(String),
    /// The request's partition is owned by another node of the cluster (or, while no owner is
    /// known, by none yet): send it there.
    #[error("partition {} moved to {:?} (epoch {})", .0.partition, .0.addr, .0.epoch)]
    Moved(crate::cluster::Moved),
    /// The engine is shutting down.
    #[error("engine stopped")]
    Stopped,
}
