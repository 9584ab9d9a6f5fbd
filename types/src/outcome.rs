//! Outcomes: why a request is refused or a payment declined, and an authorization's result.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::{AuthCode, Currency};

/// Every reason the engine gives for refusing a request. The numeric values are part of the
/// wire protocol (`docs/PROTOCOL.md`) and never change meaning.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[repr(u16)]
#[non_exhaustive]
pub enum ReasonCode {
    /// The inherent ID could not be decoded or breaks a limit.
    Malformed = 1,
    /// No device with this card IDm is provisioned.
    UnknownDevice = 2,
    /// The keyed hash does not match: the record was forged or altered.
    ForgedTag = 3,
    /// The key version is unknown, or a rotated-out key used after its grace window.
    KeyVersionInvalid = 4,
    /// The device is provisioned to a different user than the record names.
    UserDeviceMismatch = 5,
    /// No such user.
    UnknownUser = 6,
    /// The record's timestamp is outside the accepted window.
    StaleTimestamp = 7,
    /// The device counter was already used (a replay).
    ReplayedNonce = 8,
    /// The user has no such settlement means (or no default).
    MeansNotRegistered = 9,
    /// The means ID names a means of another kind than the record says.
    MeansMismatch = 10,
    /// No provider has this designation code.
    UnknownProvider = 11,
    /// Amount is zero or above the maximum.
    InvalidAmount = 12,
    /// The provider declined: insufficient funds.
    ProviderInsufficientFunds = 20,
    /// The provider declined without a specific reason.
    ProviderDoNotHonor = 21,
    /// The provider declined: over a limit.
    ProviderLimitExceeded = 22,
    /// The provider declined: invalid card or account.
    ProviderInvalidAccount = 23,
    /// The provider did not answer within the timeout or deadline.
    ProviderTimeout = 30,
    /// The provider is unreachable, failing or saturated.
    ProviderUnavailable = 31,
    /// The client request ID was used before with a different request.
    IdempotencyConflict = 40,
    /// Enrollment of a user that exists.
    UserExists = 50,
    /// The user ID does not fit its type or limits.
    InvalidUserId = 51,
    /// The password is shorter or longer than allowed.
    PasswordPolicy = 52,
    /// Login with a wrong password.
    WrongPassword = 53,
    /// Too many failed logins: locked until the lockout ends.
    UserLocked = 54,
    /// The card number is not 12–19 digits with a valid Luhn check digit.
    InvalidCardNumber = 55,
    /// A means field is empty or too long.
    InvalidMeans = 56,
    /// The user already has the maximum number of means.
    TooManyMeans = 57,
    /// The user already has the maximum number of devices.
    TooManyDevices = 58,
    /// This card IDm is provisioned already.
    DeviceInUse = 59,
    /// A terminal ID is empty, too long or not printable ASCII.
    InvalidTerminal = 60,
    /// A terminal-unique service is invalid (percent over 100%, empty window, bad currency).
    InvalidService = 61,
    /// Too many terminals for the provider or the request.
    TooManyTerminals = 62,
    /// The age condition of restricted items does not hold (no registration, an expired one,
    /// or too young); the store learns nothing more (A2).
    AgeConditionNotMet = 70,
    /// The basket is invalid or its total differs from the amount the user signed.
    BasketMismatch = 71,
    /// An age registration is invalid (birth date, validity window or verification method).
    InvalidAgeRegistration = 72,
    /// An age policy names an unknown jurisdiction or time zone.
    InvalidAgePolicy = 73,
    /// A store's fields break a limit (ID, name, position, IDs, accepted methods).
    InvalidStore = 80,
    /// A QR payload in EMVCo merchant-presented format is malformed or its CRC does not match.
    InvalidQrCode = 81,
    /// No store has this ID, beacon, Wi-Fi ID or QR poster.
    UnknownStore = 82,
    /// No store lies within the radius of the point.
    NoStoreInRange = 83,
    /// A stored-value means lacks the balance for the payment.
    InsufficientBalance = 84,
    /// A top-up names a means that keeps no balance in the engine (not stored value).
    NotStoredValue = 85,
    /// A top-up would take the balance above the maximum.
    BalanceLimit = 86,
    /// A beacon, Wi-Fi ID or QR poster belongs to another store already.
    StoreIdInUse = 87,
    /// The shard holds the maximum number of stores.
    TooManyStores = 88,
    /// A position is not a latitude in -90..=90 and a longitude in -180..=180, or the radius is
    /// not 1..=50,000 m.
    InvalidPosition = 89,
    /// A stored-value payment or top-up in another currency than the purse's.
    CurrencyMismatch = 90,
    /// The text is not a settlegate code (prefix, length, alphabet, kind).
    InvalidCode = 100,
    /// The code's tag does not verify: forged, altered, or issued by another engine.
    ForgedCode = 101,
    /// No such code or coupon was issued here.
    UnknownCode = 102,
    /// The code or coupon has expired.
    CodeExpired = 103,
    /// The code was redeemed already.
    CodeRedeemed = 104,
    /// The sales information does not match the code (issuer, number, currency, order).
    CodeMismatch = 105,
    /// The sale (less any coupon) is above the authorized amount.
    AmountAboveAuthorized = 106,
    /// The coupon has no uses left.
    CouponUsedUp = 107,
    /// The coupon was issued to another user, or is of another currency than the sale.
    CouponNotApplicable = 108,
    /// A coupon's effect, uses or expiry is invalid.
    InvalidCoupon = 109,
    /// A code's validity is out of range (10 s to 7 days), or its order reference too long.
    InvalidCodeRequest = 110,
    /// A refund of a code not redeemed (nothing captured), or of one whose provider
    /// reference the engine does not hold (redeemed before the engine kept them).
    NotRefundable = 111,
    /// A refund of zero, or one that would take the refunds past the amount captured.
    RefundAboveCaptured = 112,
    /// The code was voided (`VOID`).
    CodeVoided = 113,
    /// No settled payment of this user under this client request ID can be refunded here:
    /// never made or declined, made at another store terminal, at a provider that takes no
    /// refunds of sales, or past its refund window (one answer for all, so that it tells
    /// another terminal nothing).
    UnknownPayment = 114,
    /// The server cannot make a reconciliation report (`REPORT`): it keeps no data directory
    /// (in memory only, or a cluster node).
    ReportUnavailable = 120,
}

impl ReasonCode {
    /// Every reason code, in numeric order.
    pub const ALL: [ReasonCode; 63] = [
        ReasonCode::Malformed,
        ReasonCode::UnknownDevice,
        ReasonCode::ForgedTag,
        ReasonCode::KeyVersionInvalid,
        ReasonCode::UserDeviceMismatch,
        ReasonCode::UnknownUser,
        ReasonCode::StaleTimestamp,
        ReasonCode::ReplayedNonce,
        ReasonCode::MeansNotRegistered,
        ReasonCode::MeansMismatch,
        ReasonCode::UnknownProvider,
        ReasonCode::InvalidAmount,
        ReasonCode::ProviderInsufficientFunds,
        ReasonCode::ProviderDoNotHonor,
        ReasonCode::ProviderLimitExceeded,
        ReasonCode::ProviderInvalidAccount,
        ReasonCode::ProviderTimeout,
        ReasonCode::ProviderUnavailable,
        ReasonCode::IdempotencyConflict,
        ReasonCode::UserExists,
        ReasonCode::InvalidUserId,
        ReasonCode::PasswordPolicy,
        ReasonCode::WrongPassword,
        ReasonCode::UserLocked,
        ReasonCode::InvalidCardNumber,
        ReasonCode::InvalidMeans,
        ReasonCode::TooManyMeans,
        ReasonCode::TooManyDevices,
        ReasonCode::DeviceInUse,
        ReasonCode::InvalidTerminal,
        ReasonCode::InvalidService,
        ReasonCode::TooManyTerminals,
        ReasonCode::AgeConditionNotMet,
        ReasonCode::BasketMismatch,
        ReasonCode::InvalidAgeRegistration,
        ReasonCode::InvalidAgePolicy,
        ReasonCode::InvalidStore,
        ReasonCode::InvalidQrCode,
        ReasonCode::UnknownStore,
        ReasonCode::NoStoreInRange,
        ReasonCode::InsufficientBalance,
        ReasonCode::NotStoredValue,
        ReasonCode::BalanceLimit,
        ReasonCode::StoreIdInUse,
        ReasonCode::TooManyStores,
        ReasonCode::InvalidPosition,
        ReasonCode::CurrencyMismatch,
        ReasonCode::InvalidCode,
        ReasonCode::ForgedCode,
        ReasonCode::UnknownCode,
        ReasonCode::CodeExpired,
        ReasonCode::CodeRedeemed,
        ReasonCode::CodeMismatch,
        ReasonCode::AmountAboveAuthorized,
        ReasonCode::CouponUsedUp,
        ReasonCode::CouponNotApplicable,
        ReasonCode::InvalidCoupon,
        ReasonCode::InvalidCodeRequest,
        ReasonCode::NotRefundable,
        ReasonCode::RefundAboveCaptured,
        ReasonCode::CodeVoided,
        ReasonCode::UnknownPayment,
        ReasonCode::ReportUnavailable,
    ];

    /// The wire value.
    pub fn code(self) -> u16 {
        self as u16
    }

    /// From the wire value.
    pub fn from_code(code: u16) -> Option<ReasonCode> {
        ReasonCode::ALL.iter().copied().find(|reason| reason.code() == code)
    }
}

impl fmt::Display for ReasonCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{self:?}({})", self.code())
    }
}

impl std::error::Error for ReasonCode {}

/// The approval of an authorization.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Approval {
    /// The provider's authorization code.
    pub auth_code: AuthCode,
    /// The provider that authorized.
    pub provider_code: u32,
    /// The amount the user terminal asked for.
    pub amount_requested_minor: u64,
    /// The terminal-unique discount taken off.
    pub discount_minor: u64,
    /// What was authorized: requested minus discount.
    pub amount_final_minor: u64,
    /// The currency of all three amounts.
    pub currency: Currency,
}

/// The outcome of an authorization: a business result, not an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthOutcome {
    /// Approved.
    Approved(Approval),
    /// Declined, with the documented reason.
    Declined(ReasonCode),
}
