//! Identifiers, money and outcomes shared by every flow.

use std::fmt;

use serde::{Deserialize, Serialize};

pub use settlegate_adapters::{AuthCode, CardToken, Currency, MeansKind};

use crate::limits::{TERMINAL_ID_LEN_MAX, USER_ID_LEN_MAX};

/// A FeliCa-style card IDm: the 8-byte identity of the secure element in the user's terminal.
/// It names the device whose key signs the inherent ID.
pub type Idm = [u8; 8];

/// A client-chosen request ID that makes a mutating request idempotent (16 random bytes).
pub type ClientRequestId = u128;

/// How a user is identified (seed 000: mail address or an inherent number).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[repr(u8)]
pub enum UserIdType {
    /// A mail address.
    Mail = 1,
    /// An inherent number (digits only).
    InherentNumber = 2,
}

impl UserIdType {
    /// Decodes the wire byte.
    pub fn from_u8(byte: u8) -> Option<UserIdType> {
        match byte {
            1 => Some(UserIdType::Mail),
            2 => Some(UserIdType::InherentNumber),
            _ => None,
        }
    }
}

/// Whether `id` is shaped as a mail address: one `@` with text on both sides, no whitespace or
/// control character.
fn mail_shape_ok(id: &str) -> bool {
    let Some(at) = id.find('@') else { return false };
    let (local, domain) = (&id[..at], &id[at + 1..]);
    let clean = if id.is_ascii() {
        // The ASCII whitespace and control characters are exactly these bytes.
        id.bytes().all(|b| b > b' ' && b != 0x7f)
    } else {
        !id.chars().any(|c| c.is_whitespace() || c.is_control())
    };
    !local.is_empty() && !domain.is_empty() && !domain.contains('@') && clean
}

/// A user's identity: ID type and ID. Validated on construction.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct UserKey {
    id_type: UserIdType,
    id: String,
}

impl UserKey {
    /// Validates `id` for `id_type`: 1..=64 bytes; a mail address has one `@` with text on
    /// both sides and no whitespace; an inherent number is ASCII digits.
    pub fn new<S>(id_type: UserIdType, id: S) -> Result<UserKey, ReasonCode>
    where
        S: AsRef<str> + Into<String>,
    {
        // Checked before it is copied: a key is built from every request's record.
        let text = id.as_ref();
        let len_ok = !text.is_empty() && text.len() <= USER_ID_LEN_MAX;
        let shape_ok = match id_type {
            UserIdType::Mail => mail_shape_ok(text),
            UserIdType::InherentNumber => text.bytes().all(|b| b.is_ascii_digit()),
        };
        if len_ok && shape_ok {
            Ok(UserKey { id_type, id: id.into() })
        } else {
            Err(ReasonCode::InvalidUserId)
        }
    }

    /// The ID type.
    pub fn id_type(&self) -> UserIdType {
        self.id_type
    }

    /// The ID text.
    pub fn id(&self) -> &str {
        &self.id
    }
}

impl fmt::Debug for UserKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}:{}", self.id_type, self.id)
    }
}

/// Validates a store-terminal ID: 1..=16 printable ASCII bytes.
pub fn terminal_id_valid(id: &str) -> bool {
    !id.is_empty() && id.len() <= TERMINAL_ID_LEN_MAX && id.bytes().all(|b| b.is_ascii_graphic())
}

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
}

impl ReasonCode {
    /// Every reason code, in numeric order.
    pub const ALL: [ReasonCode; 58] = [
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

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// The definition `mail_shape_ok` implements, written the plain way.
    fn mail_shape_reference(id: &str) -> bool {
        let mut parts = id.splitn(2, '@');
        let local = parts.next().unwrap_or("");
        let domain = parts.next().unwrap_or("");
        !local.is_empty()
            && !domain.is_empty()
            && !domain.contains('@')
            && !id.chars().any(|c| c.is_whitespace() || c.is_control())
    }

    proptest! {
        /// The ASCII fast path and the general one agree with the definition, on text built
        /// mostly of the characters that decide it (`@`, ASCII and Unicode whitespace and
        /// controls, DEL, non-ASCII letters).
        #[test]
        fn mail_shape_matches_its_definition(
            id in proptest::collection::vec(
                prop_oneof![
                    Just('@'), Just(' '), Just('\t'), Just('\u{7f}'), Just('\u{85}'),
                    Just('\u{a0}'), Just('\u{2003}'), Just('é'), Just('\0'), any::<char>(),
                    proptest::char::range('!', '~'),
                ],
                0..12,
            ).prop_map(|chars| chars.into_iter().collect::<String>())
        ) {
            prop_assert_eq!(mail_shape_ok(&id), mail_shape_reference(&id), "{:?}", id);
        }
    }

    #[test]
    fn user_keys_are_checked_before_they_are_kept() {
        assert!(UserKey::new(UserIdType::Mail, "a@b.c").is_ok());
        assert!(UserKey::new(UserIdType::Mail, String::from("a@b")).is_ok());
        for bad in ["", "ab", "@b", "a@", "a@b@c", "a @b", "a@b\u{a0}", "a@b\u{7f}"] {
            assert_eq!(
                UserKey::new(UserIdType::Mail, bad),
                Err(ReasonCode::InvalidUserId),
                "{bad:?}"
            );
        }
        assert!(UserKey::new(UserIdType::Mail, "a".repeat(USER_ID_LEN_MAX + 1) + "@b").is_err());
        assert!(UserKey::new(UserIdType::InherentNumber, "0123").is_ok());
        assert!(UserKey::new(UserIdType::InherentNumber, "12a").is_err());
    }
}
