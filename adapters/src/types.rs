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
    /// When the engine made the request (its reservation's time, ms since the epoch, from the
    /// engine's log). A network adapter dates its message by it and derives its identifiers
    /// from it and `dispatch_id`, so that they can be rebuilt from the log alone (to reverse
    /// an authorization whose answer a crash cut off).
    pub at_ms: i64,
    /// Whether it is a sale: a single-message payment (the engine's `AUTHORIZE`), settled
    /// (captured in full) with its approval, so that refunds of it may follow
    /// ([`ProviderAdapter::refunds_sales`](crate::ProviderAdapter::refunds_sales)); false for
    /// a hold captured or voided later (a payment code's authorization).
    pub sale: bool,
}

/// A provider's answer to an authorization.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProviderReply {
    /// Authorized, with the provider's authorization code.
    Approved {
        /// Authorization code.
        auth_code: AuthCode,
        /// The identifiers a network adapter assigned the authorization (ISO 8583); `None`
        /// for providers that need none. With the request, they make the reference a later
        /// capture, void, refund or reversal names ([`ProviderReply::reference`]): built
        /// only when wanted, so that an approval on the payment's path carries no copy of the
        /// request (and boxed: an answer on that path stays a few bytes).
        network: Option<Box<NetworkReference>>,
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

impl ProviderReply {
    /// An approval with `auth_code`, and no network identifiers: for adapters whose provider
    /// identifies an authorization by the engine's dispatch ID alone.
    pub fn approved(auth_code: AuthCode) -> ProviderReply {
        ProviderReply::Approved { auth_code, network: None }
    }

    /// The authorization code of an approval.
    pub fn auth_code(&self) -> Option<AuthCode> {
        match self {
            ProviderReply::Approved { auth_code, .. } => Some(*auth_code),
            ProviderReply::Declined { .. } => None,
        }
    }

    /// The reference of an approval of `request`: what the provider needs to match a later
    /// capture, void, refund or reversal to it
    /// ([`ProviderAdapter::lifecycle`](crate::ProviderAdapter::lifecycle)).
    pub fn reference(&self, request: &AuthorizationRequest) -> Option<AuthReference> {
        match self {
            ProviderReply::Approved { auth_code, network } => {
                Some(AuthReference::of(request, Some(*auth_code), network.as_deref().copied()))
            }
            ProviderReply::Declined { .. } => None,
        }
    }
}

/// What identifies an authorization at its provider: everything a capture, void, refund or
/// reversal needs to be matched to it. A plain value (integers, byte arrays, one string),
/// meant to be kept with the payment (in the engine's log) and handed back unchanged.
///
/// Every approval makes one ([`ProviderReply::reference`]). [`AuthReference::of`] builds one
/// from the request alone, for reversing an authorization whose answer never came: enough for
/// the simulator, which knows authorizations by dispatch ID; an ISO 8583 host also needs the
/// [`network`](AuthReference::network) identifiers the adapter assigned.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct AuthReference {
    /// The engine's dispatch ID of the authorization.
    pub dispatch_id: u64,
    /// The provider's designation code.
    pub provider_code: u32,
    /// The provider's authorization code; `None` for an authorization never answered.
    pub auth_code: Option<AuthCode>,
    /// The amount authorized, in minor units.
    pub amount_minor: u64,
    /// The currency of `amount_minor`.
    pub currency: Currency,
    /// The store terminal the authorization was made at, as the engine sent it.
    pub terminal_id: String,
    /// The vault token of the card, for card means (never a PAN).
    pub card_token: Option<CardToken>,
    /// The request's [`at_ms`](AuthorizationRequest::at_ms).
    pub at_ms: i64,
    /// The identifiers a network adapter assigned the authorization (ISO 8583); `None` for
    /// providers that need none (the simulator), and in a reference the engine rebuilt from
    /// its log: an adapter that derives its identifiers from the dispatch ID and
    /// [`at_ms`](AuthReference::at_ms) (ISO 8583, `docs/ADAPTERS.md`) derives them again.
    pub network: Option<NetworkReference>,
}

impl AuthReference {
    /// The reference of `request`, with what its answer brought.
    pub fn of(
        request: &AuthorizationRequest,
        auth_code: Option<AuthCode>,
        network: Option<NetworkReference>,
    ) -> AuthReference {
        AuthReference {
            dispatch_id: request.dispatch_id,
            provider_code: request.provider_code,
            auth_code,
            amount_minor: request.amount_minor,
            currency: request.currency,
            terminal_id: request.terminal_id.clone(),
            card_token: request.card_token,
            at_ms: request.at_ms,
            network,
        }
    }
}

/// The identifiers of one ISO 8583 message as the adapter sent it: with an authorization's,
/// a host matches a later message to it (field 90, "original data elements", and field 37).
/// All ASCII digits, as on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct NetworkReference {
    /// The message type (`0100`, `0200`, …).
    pub mti: [u8; 4],
    /// The system trace audit number (field 11), 1..=999999.
    pub stan: u32,
    /// The retrieval reference number (field 37).
    pub rrn: [u8; 12],
    /// The transmission date and time (field 7), `MMDDhhmmss` UTC.
    pub transmitted: [u8; 10],
    /// The local date and time the message carried (fields 13 and 12), `MMDDhhmmss`.
    pub local: [u8; 10],
    /// The acquiring institution ID (field 32) as field 90 carries it: eleven digits,
    /// zero-padded on the left; all zeros when none was sent.
    pub acquirer: [u8; 11],
}

/// A lifecycle operation on an authorization ([`LifecycleRequest`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Operation {
    /// Capture (complete) the authorization: once, full or partial, at most the amount
    /// authorized; what is not captured is released.
    Capture {
        /// The amount captured, in minor units (1 ..= the amount authorized).
        amount_minor: u64,
    },
    /// Cancel the authorization before any capture, releasing the whole hold.
    Void,
    /// Return money after the capture: partial refunds allowed, their total at most the
    /// amount captured.
    Refund {
        /// The amount refunded, in minor units.
        amount_minor: u64,
    },
    /// Undo an authorization whose outcome the engine could not record (a timeout, a crash):
    /// accepted whether or not the provider holds it, refused once captured.
    Reversal,
}

impl Operation {
    /// A short lower-case name (`capture`, `void`, `refund`, `reversal`) for logs.
    pub fn name(self) -> &'static str {
        match self {
            Operation::Capture { .. } => "capture",
            Operation::Void => "void",
            Operation::Refund { .. } => "refund",
            Operation::Reversal => "reversal",
        }
    }
}

/// A capture, void, refund or reversal of an earlier authorization.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct LifecycleRequest {
    /// Engine-unique ID of this operation. Asking again with the same ID (a retry) is
    /// answered as the first time, without applying the operation twice, by providers that
    /// can tell (the simulator).
    pub operation_id: u64,
    /// The authorization, as its approval's reference has it.
    pub authorization: AuthReference,
    /// What to do.
    pub operation: Operation,
}

impl LifecycleRequest {
    /// A capture of `amount_minor` of `authorization`.
    pub fn capture(operation_id: u64, authorization: AuthReference, amount_minor: u64) -> Self {
        let operation = Operation::Capture { amount_minor };
        LifecycleRequest { operation_id, authorization, operation }
    }

    /// A void of `authorization`.
    pub fn void(operation_id: u64, authorization: AuthReference) -> Self {
        LifecycleRequest { operation_id, authorization, operation: Operation::Void }
    }

    /// A refund of `amount_minor` of `authorization`'s capture.
    pub fn refund(operation_id: u64, authorization: AuthReference, amount_minor: u64) -> Self {
        let operation = Operation::Refund { amount_minor };
        LifecycleRequest { operation_id, authorization, operation }
    }

    /// A reversal of `authorization`.
    pub fn reversal(operation_id: u64, authorization: AuthReference) -> Self {
        LifecycleRequest { operation_id, authorization, operation: Operation::Reversal }
    }

    /// The amount the operation moves: the capture's or refund's, else the amount authorized.
    pub fn amount_minor(&self) -> u64 {
        match self.operation {
            Operation::Capture { amount_minor } | Operation::Refund { amount_minor } => {
                amount_minor
            }
            Operation::Void | Operation::Reversal => self.authorization.amount_minor,
        }
    }
}

/// A provider's answer to a [`LifecycleRequest`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(tag = "answer", rename_all = "snake_case")]
pub enum LifecycleReply {
    /// Done (or, for a reversal or void, nothing was left to undo).
    Accepted {
        /// The identifiers of the message that carried the operation (ISO 8583), if any.
        network: Option<NetworkReference>,
    },
    /// Refused by the provider, or by the adapter on its behalf.
    Refused {
        /// Why.
        reason: RefusalReason,
    },
}

/// Why a provider refused a lifecycle operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RefusalReason {
    /// The provider holds no such authorization (never approved, a reference that does not
    /// match it, or one it no longer keeps).
    UnknownAuthorization,
    /// The amount is zero, or more than is left: a capture above the amount authorized, a
    /// refund that would take the refunds past the amount captured.
    AmountInvalid,
    /// Not possible in the authorization's state: a capture of one already captured, voided
    /// or reversed; a void or reversal after the capture; a refund before it.
    InvalidState,
    /// Refused for another reason the provider gave.
    Declined(DeclineReason),
    /// This adapter does not carry lifecycle operations (or not this one) to its provider.
    Unsupported,
}
