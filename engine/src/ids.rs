//! The identifiers the API takes: [`RequestId`] (a client request ID) and [`ProviderCode`].
//!
//! Each wraps the integer the wire protocol carries, so that a request ID cannot be passed
//! where a provider code is wanted (or the other way round) without saying so.

use std::fmt;

/// A client request ID: what makes a change safe to retry (idempotent).
///
/// Every change (enrolling, adding a means, a payment, a top-up...) carries one. The engine
/// keeps the answer to a change under its ID, scoped to the owner of the change (the user, or
/// for provider and store changes the provider or the store's cell), for
/// [`EngineConfig::idempotency_ttl_ms`](crate::EngineConfig::idempotency_ttl_ms) (a day by
/// default; at most `idempotency_records_max` records per shard are kept):
///
/// - **the same ID with the same request** (same operation, same arguments) is a retry: it
///   gets the first answer again, and nothing is applied twice;
/// - **the same ID with a different request** for the same owner is refused as
///   `IdempotencyConflict`;
/// - after the record is gone (its TTL passed, or the count limit dropped it) the ID is new
///   again.
///
/// So use a fresh ID for every new operation, and the same ID only to retry that operation
/// (after a timeout, a lost connection or a `BUSY`). [`RequestId::random`] gives a fresh one.
///
/// ```
/// use settlegate_engine::RequestId;
///
/// let id = RequestId::random();
/// let retry = id; // the same ID: a retry of the same operation
/// assert_eq!(retry, id);
/// assert_ne!(RequestId::random(), id);
/// assert_eq!(RequestId::from(7u128).get(), 7);
/// ```
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RequestId(pub u128);

impl RequestId {
    /// A random ID (128 bits from the thread's CSPRNG): unique, for any practical purpose,
    /// per user and operation for the idempotency TTL, and across processes, so callers need
    /// no coordination. Keep it to retry the operation it was made for.
    pub fn random() -> RequestId {
        RequestId(rand::random())
    }

    /// The integer the wire protocol carries.
    pub const fn get(self) -> u128 {
        self.0
    }
}

impl From<u128> for RequestId {
    fn from(id: u128) -> RequestId {
        RequestId(id)
    }
}

impl From<RequestId> for u128 {
    fn from(id: RequestId) -> u128 {
        id.0
    }
}

impl fmt::Debug for RequestId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "RequestId({:#x})", self.0)
    }
}

impl fmt::Display for RequestId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:032x}", self.0)
    }
}

/// A provider's designation code: the `code` of its [`ProviderConfig`](crate::ProviderConfig),
/// and the provider an inherent ID names.
///
/// ```
/// use settlegate_engine::ProviderCode;
///
/// let code = ProviderCode(100);
/// assert_eq!(code.get(), 100);
/// assert_eq!(ProviderCode::from(100u32), code);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ProviderCode(pub u32);

impl ProviderCode {
    /// The integer the wire protocol and the config carry.
    pub const fn get(self) -> u32 {
        self.0
    }
}

impl From<u32> for ProviderCode {
    fn from(code: u32) -> ProviderCode {
        ProviderCode(code)
    }
}

impl From<ProviderCode> for u32 {
    fn from(code: ProviderCode) -> u32 {
        code.0
    }
}

impl fmt::Display for ProviderCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// How [`Engine::add_means`](crate::Engine::add_means) registers a means.
///
/// ```
/// use settlegate_engine::AddMeansOptions;
///
/// let options = AddMeansOptions::default().make_default(true);
/// assert!(options.make_default);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct AddMeansOptions {
    /// Make the new means the user's default (the user's first means is the default anyway).
    pub make_default: bool,
}

impl AddMeansOptions {
    /// These options, with the new means made the user's default or not.
    pub fn make_default(mut self, make_default: bool) -> AddMeansOptions {
        self.make_default = make_default;
        self
    }
}
