//! Values that cross the engine–adapter boundary.
//!
//! The money types are defined in `settlegate-types` (shared with the wire codec) and
//! re-exported here.

pub use settlegate_types::{AuthCode, CardToken, Currency, CurrencyError, MeansKind};

use serde::{Deserialize, Serialize};

/// What the engine sends a provider: the means, the terminal and the card token, never a PAN.
#[derive(Debug, Clone, PartialEq)]
pub struct AuthorizationRequest {
    /// Engine-unique ID of this dispatch; an adapter may use it as its trace or STAN source.
    pub dispatch_id: u64,
    /// The provider's designation code.
    pub provider_code: u32,
    /// The settlement means kind.
    pub means: MeansKind,
    /// The vault token of the card, for card means.
    pub card_token: Option<CardToken>,
    /// The store terminal the payment is made at.
    pub terminal_id: String,
    /// Amount to authorize, in minor units, after the terminal-unique discount.
    pub amount_minor: u64,
    /// The currency of `amount_minor`.
    pub currency: Currency,
}

/// A provider's answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProviderReply {
    /// Authorized, with the provider's authorization code.
    Approved {
        /// Authorization code.
        auth_code: AuthCode,
    },
    /// Declined by the provider, with its reason.
    Declined {
        /// Why.
        reason: DeclineReason,
    },
}

/// Why a provider declined.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DeclineReason {
    /// Not enough funds or credit.
    InsufficientFunds,
    /// The issuer declined without a specific reason.
    DoNotHonor,
    /// The amount exceeds a limit of the provider.
    LimitExceeded,
    /// The card or account is not valid at the provider.
    InvalidAccount,
}

/// A dispatch that produced no provider answer. Each is a definitive outcome for the engine.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum AdapterError {
    /// No answer within the provider timeout or the request deadline.
    #[error("provider did not answer in time")]
    Timeout,
    /// The provider is unreachable, failing, or at its concurrency limit until the deadline.
    #[error("provider unavailable: {0}")]
    Unavailable(String),
    /// The adapter's configuration is invalid.
    #[error("invalid adapter config: {0}")]
    Config(String),
}
