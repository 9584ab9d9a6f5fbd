//! Identifiers, money and outcomes shared by every flow.
//!
//! The plain values (IDs, money, reason codes, an authorization's outcome) live in
//! `settlegate-types`, shared with the wire codec; they are re-exported here. What has engine
//! behaviour (a terminal's discount and service) is defined here.

use serde::{Deserialize, Serialize};

pub use settlegate_types::{
    Approval, AuthCode, AuthOutcome, CardToken, ClientRequestId, Currency, Idm, MeansKind,
    ReasonCode, UserIdType, UserKey,
};

use crate::limits::TERMINAL_ID_LEN_MAX;

/// Validates a store-terminal ID: 1..=16 printable ASCII bytes.
pub fn terminal_id_valid(id: &str) -> bool {
    !id.is_empty() && id.len() <= TERMINAL_ID_LEN_MAX && id.bytes().all(|b| b.is_ascii_graphic())
}

/// A terminal-unique discount (seed 000 step S38–S39: the provider's special service).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Discount {
    /// A percentage in basis points (1/100 of a percent), 1..=10000. The discount is
    /// `floor(amount * bps / 10000)` minor units: rounding never favours the payer by a
    /// fraction of a minor unit.
    Percent {
        /// Basis points.
        bps: u16,
    },
    /// A fixed amount off, in the payment's currency; applies only to payments in that
    /// currency and never takes the amount below zero.
    Fixed {
        /// Minor units off.
        amount_minor: u64,
        /// The currency the amount is in.
        currency: Currency,
    },
}

impl Discount {
    /// The discount on `amount_minor` in `currency`, in minor units (never above the amount).
    pub fn discount_minor(&self, amount_minor: u64, currency: Currency) -> u64 {
        match *self {
            Discount::Percent { bps } => {
                // u128: amount (< 2^50) times bps (< 2^14) cannot overflow.
                ((amount_minor as u128 * bps as u128) / 10_000) as u64
            }
            Discount::Fixed { amount_minor: off, currency: discount_currency } => {
                if discount_currency == currency {
                    off.min(amount_minor)
                } else {
                    0
                }
            }
        }
    }

    /// Whether the discount is well formed.
    pub fn valid(&self) -> bool {
        match *self {
            Discount::Percent { bps } => (1..=10_000).contains(&bps),
            Discount::Fixed { amount_minor, .. } => amount_minor > 0,
        }
    }
}

/// A terminal-unique service with its validity window (milliseconds since the UNIX epoch,
/// `valid_from_ms` inclusive, `valid_until_ms` exclusive).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TerminalService {
    /// The discount.
    pub discount: Discount,
    /// First instant it applies.
    pub valid_from_ms: i64,
    /// First instant it no longer applies.
    pub valid_until_ms: i64,
    /// Text shown to the store terminal (at most 64 bytes).
    pub description: String,
}

impl TerminalService {
    /// Whether the service applies at `now_ms`.
    pub fn active_at(&self, now_ms: i64) -> bool {
        self.valid_from_ms <= now_ms && now_ms < self.valid_until_ms
    }
}
