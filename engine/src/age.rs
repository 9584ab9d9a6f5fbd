//! The age registry (A1–A3): device-signed age registrations, age rules per jurisdiction,
//! store age policies, and the check of a payment's basket.
//!
//! **A1.** After biometric authentication succeeds on the user's terminal, the terminal sends
//! an [`AgeRecord`] signed with its device key: the user's birth date (a date, never an age
//! number), how and when it was verified, and until when the registration is valid. The owning
//! user's shard keeps it under the terminal's card IDm; a newer registration replaces it.
//!
//! **A2.** A payment made with a [`Basket`] names each item's category. When the basket carries
//! the age-confirmation flag (or the store runs the strict mode), every item whose category has
//! a minimum age in the store's jurisdiction is checked against the registered birth date, on
//! the transaction's local date in the store's time zone. If the condition fails, the store's
//! [`AgePolicy`] decides: remove the restricted items and settle the rest, or refuse and name
//! them. The store learns only whether the condition held, never the birth date.
//!
//! **A3.** Without the flag the basket is settled as it is, unless the store runs the strict
//! mode, in which the engine checks categories whatever the flag says (`docs/ARCHITECTURE.md`
//! says why the mode exists).
//!
//! Everything here is pure: the shard passes the time in, so replaying the log gives the same
//! decisions.

use std::collections::BTreeMap;

use hmac::{Hmac, Mac};
pub use jiff::civil::Date;
use jiff::tz::TimeZone;
use jiff::Timestamp;
use serde::{Deserialize, Serialize};
use sha2::Sha256;

use crate::inherent::TAG_LEN;
use crate::limits::{
    AMOUNT_MINOR_MAX, BASKET_ITEMS_MAX, CATEGORY_LEN_MAX, ITEM_ID_LEN_MAX, ITEM_QUANTITY_MAX,
    JURISDICTION_LEN_MAX, TIME_ZONE_LEN_MAX, USER_ID_LEN_MAX,
};
use crate::types::{Idm, ReasonCode, UserIdType, UserKey};

/// First byte of an age record: its format, distinct from every inherent-ID version so that
/// no signed record can be read as the other kind.
pub const AGE_RECORD_FORMAT: u8 = 0xA1;
/// Fixed bytes of an age record besides the user ID.
const AGE_FIXED_LEN: usize = 50 + TAG_LEN;
/// Shortest age record.
pub const AGE_RECORD_LEN_MIN: usize = AGE_FIXED_LEN + 1;
/// Longest age record.
pub const AGE_RECORD_LEN_MAX: usize = AGE_FIXED_LEN + USER_ID_LEN_MAX;
/// Earliest birth year accepted.
const BIRTH_YEAR_MIN: i16 = 1900;

/// How the birth date was verified before the terminal registered it.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    Hash,
    Serialize,
    Deserialize,
    rkyv::Archive,
    rkyv::Serialize,
    rkyv::Deserialize,
)]
#[serde(rename_all = "snake_case")]
#[repr(u8)]
pub enum VerificationMethod {
    /// An identity document inspected in person.
    DocumentInPerson = 1,
    /// The chip of an identity document read by the terminal (NFC).
    DocumentChip = 2,
    /// Remote identity proofing: document image and a live selfie (eKYC).
    Ekyc = 3,
}

impl VerificationMethod {
    /// From the wire byte.
    pub fn from_u8(byte: u8) -> Option<VerificationMethod> {
        match byte {
            1 => Some(VerificationMethod::DocumentInPerson),
            2 => Some(VerificationMethod::DocumentChip),
            3 => Some(VerificationMethod::Ekyc),
            _ => None,
        }
    }
}

/// A signed age registration (A1), as the user terminal builds it.
///
/// Layout (big-endian; specified in `docs/PROTOCOL.md`):
///
/// | offset | size | field |
/// |---|---|---|
/// | 0 | 1 | format, `0xA1` |
/// | 1 | 2 | device key version |
/// | 3 | 8 | card IDm |
/// | 11 | 1 | user-ID type |
/// | 12 | 1 | user-ID length `L`, 1..=64 |
/// | 13 | L | user ID |
/// | 13+L | 2 | birth year (1900..) |
/// | 15+L | 1 | birth month, 1..=12 |
/// | 16+L | 1 | birth day, 1..=31 (a real date) |
/// | 17+L | 1 | verification method |
/// | 18+L | 8 | verified at, ms since the UNIX epoch |
/// | 26+L | 8 | valid until, ms since the UNIX epoch |
/// | 34+L | 8 | device counter (shares the inherent IDs' counter) |
/// | 42+L | 8 | timestamp, ms since the UNIX epoch |
/// | 50+L | 32 | HMAC-SHA256 by the device key over every byte before it |
#[derive(Debug, Clone, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct AgeRecord {
    /// Version of the device key that signs it.
    pub key_version: u16,
    /// Card IDm of the terminal being registered.
    pub card_idm: Idm,
    /// The terminal's user.
    #[rkyv(with = crate::shard::archive::UserKeyVia)]
    pub user: UserKey,
    /// Birth date (a civil date, no time zone).
    #[rkyv(with = crate::shard::archive::Via<(i16, i8, i8)>)]
    pub birth_date: Date,
    /// How it was verified.
    pub method: VerificationMethod,
    /// When it was verified.
    pub verified_at_ms: i64,
    /// Until when the registration is valid.
    pub valid_until_ms: i64,
    /// Device counter.
    pub counter: u64,
    /// Creation time.
    pub timestamp_ms: i64,
}

impl AgeRecord {
    /// Appends the unsigned body.
    pub fn encode_body(&self, out: &mut Vec<u8>) {
        out.push(AGE_RECORD_FORMAT);
        out.extend_from_slice(&self.key_version.to_be_bytes());
        out.extend_from_slice(&self.card_idm);
        out.push(self.user.id_type() as u8);
        out.push(self.user.id().len() as u8);
        out.extend_from_slice(self.user.id().as_bytes());
        out.extend_from_slice(&self.birth_date.year().to_be_bytes());
        out.push(self.birth_date.month() as u8);
        out.push(self.birth_date.day() as u8);
        out.push(self.method as u8);
        out.extend_from_slice(&self.verified_at_ms.to_be_bytes());
        out.extend_from_slice(&self.valid_until_ms.to_be_bytes());
        out.extend_from_slice(&self.counter.to_be_bytes());
        out.extend_from_slice(&self.timestamp_ms.to_be_bytes());
    }

    /// Encodes and signs with `device_key`: what a user terminal sends.
    pub fn sign(&self, device_key: &[u8; 32]) -> Vec<u8> {
        let mut out = Vec::with_capacity(AGE_RECORD_LEN_MAX);
        self.encode_body(&mut out);
        let mut mac = Hmac::<Sha256>::new_from_slice(device_key).expect("HMAC takes any key");
        mac.update(&out);
        out.extend_from_slice(&mac.finalize().into_bytes());
        out
    }

    /// Decodes a signed record into its fields, the body and the tag. Every length is checked
    /// before it is read.
    pub fn decode(bytes: &[u8]) -> Result<(AgeRecord, &[u8], &[u8; TAG_LEN]), ReasonCode> {
        const BAD: ReasonCode = ReasonCode::Malformed;
        if bytes.len() < AGE_RECORD_LEN_MIN || bytes.len() > AGE_RECORD_LEN_MAX {
            return Err(BAD);
        }
        let (body, tag) = bytes.split_at(bytes.len() - TAG_LEN);
        let tag: &[u8; TAG_LEN] = tag.try_into().expect("split at TAG_LEN");
        if body[0] != AGE_RECORD_FORMAT {
            return Err(BAD);
        }
        let key_version = u16::from_be_bytes([body[1], body[2]]);
        let card_idm: Idm = body[3..11].try_into().expect("8");
        let id_type = UserIdType::from_u8(body[11]).ok_or(BAD)?;
        let user_len = body[12] as usize;
        if body.len() != AGE_FIXED_LEN - TAG_LEN + user_len {
            return Err(BAD);
        }
        let user_id = std::str::from_utf8(&body[13..13 + user_len]).map_err(|_| BAD)?;
        let user = UserKey::new(id_type, user_id).map_err(|_| BAD)?;
        let rest = &body[13 + user_len..];
        let be_i64 = |at: usize| i64::from_be_bytes(rest[at..at + 8].try_into().expect("8"));
        let year = i16::from_be_bytes([rest[0], rest[1]]);
        let birth_date = Date::new(year, rest[2] as i8, rest[3] as i8)
            .map_err(|_| ReasonCode::InvalidAgeRegistration)?;
        let method =
            VerificationMethod::from_u8(rest[4]).ok_or(ReasonCode::InvalidAgeRegistration)?;
        let record = AgeRecord {
            key_version,
            card_idm,
            user,
            birth_date,
            method,
            verified_at_ms: be_i64(5),
            valid_until_ms: be_i64(13),
            counter: u64::from_be_bytes(rest[21..29].try_into().expect("8")),
            timestamp_ms: be_i64(29),
        };
        Ok((record, body, tag))
    }

    /// The checks of a registration that need only the clock: a birth date from 1900 that is
    /// not in the future, verified no later than now (plus the timestamp window), and valid
    /// until a time after now.
    pub fn validate(&self, now_ms: i64, window_ms: i64) -> Result<(), ReasonCode> {
        let invalid = Err(ReasonCode::InvalidAgeRegistration);
        let today_utc = utc_date(now_ms).ok_or(ReasonCode::InvalidAgeRegistration)?;
        // A day of slack: east of UTC, the local date may already be tomorrow's.
        let latest_birth = today_utc.tomorrow().unwrap_or(today_utc);
        if self.birth_date.year() < BIRTH_YEAR_MIN || self.birth_date > latest_birth {
            return invalid;
        }
        if self.verified_at_ms > now_ms.saturating_add(window_ms) {
            return invalid;
        }
        if self.valid_until_ms <= now_ms || self.valid_until_ms <= self.verified_at_ms {
            return invalid;
        }
        Ok(())
    }
}

/// A registration a shard keeps, per card IDm.
#[derive(Debug, Clone, Copy, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct AgeRegistration {
    /// Birth date.
    #[rkyv(with = crate::shard::archive::Via<(i16, i8, i8)>)]
    pub birth_date: Date,
    /// How it was verified.
    pub method: VerificationMethod,
    /// When it was verified.
    pub verified_at_ms: i64,
    /// Until when it counts.
    pub valid_until_ms: i64,
}

impl AgeRegistration {
    /// Whether it still counts at `now_ms`.
    pub fn valid_at(&self, now_ms: i64) -> bool {
        now_ms < self.valid_until_ms
    }
}

/// On which day someone born on 29 February has their birthday in a common year.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LeapDayBirthday {
    /// 1 March (the later day, the conservative choice for age-restricted sales; Japan's and
    /// England's reading).
    #[default]
    March1,
    /// 28 February.
    February28,
}

/// The age rules of one jurisdiction.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JurisdictionRules {
    /// Minimum age per item category (`alcohol = 20`). A category not listed has no minimum.
    pub minimum_ages: BTreeMap<String, u8>,
    /// The birthday of those born on 29 February, in common years.
    #[serde(default)]
    pub leap_day_birthday: LeapDayBirthday,
}

/// What a store does when the age condition fails (A2).
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    Hash,
    Default,
    Serialize,
    Deserialize,
    rkyv::Archive,
    rkyv::Serialize,
    rkyv::Deserialize,
)]
#[serde(rename_all = "snake_case")]
#[repr(u8)]
pub enum OnAgeFailure {
    /// Tell the terminal the restricted items cannot be paid for; nothing is settled.
    #[default]
    Refuse = 1,
    /// Remove the restricted items and settle the rest.
    RemoveItems = 2,
}

impl OnAgeFailure {
    /// From the wire byte.
    pub fn from_u8(byte: u8) -> Option<OnAgeFailure> {
        match byte {
            1 => Some(OnAgeFailure::Refuse),
            2 => Some(OnAgeFailure::RemoveItems),
            _ => None,
        }
    }
}

/// A store's age policy: where it is, what it does on failure, and whether it checks item
/// categories itself (the strict mode, A3).
#[derive(
    Debug,
    Clone,
    PartialEq,
    Eq,
    Hash,
    Serialize,
    Deserialize,
    rkyv::Archive,
    rkyv::Serialize,
    rkyv::Deserialize,
)]
#[serde(deny_unknown_fields)]
pub struct AgePolicy {
    /// The jurisdiction whose minimum ages apply (a key of `[engine.age.jurisdictions]`).
    pub jurisdiction: String,
    /// The store's IANA time zone (`Asia/Tokyo`): the transaction's local date is taken there.
    pub time_zone: String,
    /// What happens when the condition fails.
    #[serde(default)]
    pub on_failure: OnAgeFailure,
    /// Check restricted categories even when the request lacks the age-confirmation flag.
    #[serde(default)]
    pub strict: bool,
}

impl Default for AgePolicy {
    fn default() -> Self {
        AgePolicy {
            jurisdiction: "JP".into(),
            time_zone: "Asia/Tokyo".into(),
            on_failure: OnAgeFailure::Refuse,
            strict: false,
        }
    }
}

/// A policy checked against the rules, with its time zone loaded.
#[derive(Debug, Clone, PartialEq)]
pub struct ResolvedPolicy {
    /// The policy as given.
    pub policy: AgePolicy,
    tz: TimeZone,
}

impl ResolvedPolicy {
    /// `policy` with its time zone found by name (a policy accepted before, read back from a
    /// log: its jurisdiction was checked then); `None` if the name is unknown.
    pub(crate) fn by_zone_name(policy: AgePolicy) -> Option<ResolvedPolicy> {
        let tz = TimeZone::get(&policy.time_zone).ok()?;
        Some(ResolvedPolicy { policy, tz })
    }
}

/// The `[engine.age]` table: jurisdictions and the default store policy.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AgeConfig {
    /// Age rules by jurisdiction code.
    pub jurisdictions: BTreeMap<String, JurisdictionRules>,
    /// The policy of a store whose terminal and provider set none.
    pub default_policy: AgePolicy,
    /// Longest validity of a registration, in days from its registration.
    pub registration_validity_max_days: u32,
    /// Policies of whole providers: every store terminal of the provider that sets none of
    /// its own.
    pub provider_policies: Vec<ProviderAgePolicy>,
}

/// A provider-wide age policy (`[[engine.age.provider_policies]]`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProviderAgePolicy {
    /// The provider's designation code.
    pub provider_code: u32,
    /// Its policy.
    pub policy: AgePolicy,
}

impl Default for AgeConfig {
    fn default() -> Self {
        let rules = |ages: &[(&str, u8)]| JurisdictionRules {
            minimum_ages: ages.iter().map(|(c, a)| ((*c).to_owned(), *a)).collect(),
            leap_day_birthday: LeapDayBirthday::March1,
        };
        AgeConfig {
            jurisdictions: BTreeMap::from([
                ("JP".to_owned(), rules(&[("alcohol", 20), ("tobacco", 20)])),
                ("US".to_owned(), rules(&[("alcohol", 21), ("tobacco", 21)])),
            ]),
            default_policy: AgePolicy::default(),
            registration_validity_max_days: 400,
            provider_policies: Vec::new(),
        }
    }
}

impl AgeConfig {
    /// Checks the rules and the default policy; names the first problem.
    pub fn validate(&self) -> Result<(), String> {
        for (code, rules) in &self.jurisdictions {
            if code.is_empty() || code.len() > JURISDICTION_LEN_MAX {
                return Err(format!("age jurisdiction code {code:?} must be 1..=8 characters"));
            }
            if let Some(bad) =
                rules.minimum_ages.keys().find(|c| !category_valid(c) || c.is_empty())
            {
                return Err(format!(
                    "age category {bad:?} must be 1..=16 of a-z, 0-9, '_' (jurisdiction {code})"
                ));
            }
        }
        for entry in &self.provider_policies {
            if self.resolve(&entry.policy).is_err() {
                return Err(format!(
                    "age policy of provider {} names an unknown jurisdiction or time zone",
                    entry.provider_code
                ));
            }
        }
        if self.registration_validity_max_days == 0 {
            return Err("age.registration_validity_max_days must be positive".into());
        }
        self.resolve(&self.default_policy)
            .map(|_| ())
            .map_err(|_| "age.default_policy names an unknown jurisdiction or time zone".into())
    }

    /// Checks `policy` and loads its time zone.
    pub fn resolve(&self, policy: &AgePolicy) -> Result<ResolvedPolicy, ReasonCode> {
        if !self.jurisdictions.contains_key(&policy.jurisdiction)
            || policy.time_zone.len() > TIME_ZONE_LEN_MAX
        {
            return Err(ReasonCode::InvalidAgePolicy);
        }
        let tz = TimeZone::get(&policy.time_zone).map_err(|_| ReasonCode::InvalidAgePolicy)?;
        Ok(ResolvedPolicy { policy: policy.clone(), tz })
    }

    /// Longest validity in ms.
    pub fn validity_max_ms(&self) -> i64 {
        i64::from(self.registration_validity_max_days) * 86_400_000
    }
}

/// The age config resolved once at start: rules, the engine-wide and provider-wide policies.
#[derive(Debug, Clone)]
pub struct AgeRules {
    /// The config.
    pub config: AgeConfig,
    default_policy: ResolvedPolicy,
    provider_policies: rustc_hash::FxHashMap<u32, ResolvedPolicy>,
}

impl AgeRules {
    /// Resolves `config` (validate it first).
    pub fn new(config: AgeConfig) -> Result<AgeRules, String> {
        config.validate()?;
        let default_policy = config
            .resolve(&config.default_policy)
            .map_err(|e| format!("age default policy: {e}"))?;
        let mut provider_policies = rustc_hash::FxHashMap::default();
        for entry in &config.provider_policies {
            let resolved = config.resolve(&entry.policy).map_err(|e| format!("age policy: {e}"))?;
            provider_policies.insert(entry.provider_code, resolved);
        }
        Ok(AgeRules { config, default_policy, provider_policies })
    }

    /// The policy in force: the terminal's own, else its provider's, else the engine's.
    pub fn policy_for<'a>(
        &'a self,
        provider_code: u32,
        terminal_policy: Option<&'a ResolvedPolicy>,
    ) -> &'a ResolvedPolicy {
        terminal_policy
            .or_else(|| self.provider_policies.get(&provider_code))
            .unwrap_or(&self.default_policy)
    }
}

/// Whether `category` is a valid category name (empty means "no category").
pub fn category_valid(category: &str) -> bool {
    category.len() <= CATEGORY_LEN_MAX
        && category.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
}

/// Whether `item_id` is a valid item ID: 1..=[`ITEM_ID_LEN_MAX`] bytes of 0x21–0x7E, in a
/// basket and in a redemption's sale lines alike.
pub fn item_id_valid(item_id: &str) -> bool {
    !item_id.is_empty()
        && item_id.len() <= ITEM_ID_LEN_MAX
        && item_id.bytes().all(|b| b.is_ascii_graphic())
}

/// One line of a basket.
#[derive(Debug, Clone, PartialEq, Eq, Hash, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct BasketItem {
    /// The store's item ID (1..=32 printable ASCII).
    pub item_id: String,
    /// Its category (`alcohol`), or empty for none.
    pub category: String,
    /// How many.
    pub quantity: u32,
    /// Price of one, in minor units of the payment's currency.
    pub unit_amount_minor: u64,
}

/// The items of a payment, as the store terminal sends them (A2).
#[derive(
    Debug, Clone, PartialEq, Eq, Hash, Default, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize,
)]
pub struct Basket {
    /// The age-confirmation flag: the terminal says the basket holds age-restricted items.
    pub age_confirmation: bool,
    /// The lines.
    pub items: Vec<BasketItem>,
}

impl Basket {
    /// The basket's total after validating every line (item IDs unique), or `BasketMismatch`.
    pub fn total(&self) -> Result<u64, ReasonCode> {
        const BAD: ReasonCode = ReasonCode::BasketMismatch;
        if self.items.is_empty() || self.items.len() > BASKET_ITEMS_MAX {
            return Err(BAD);
        }
        let mut ids: Vec<&str> = self.items.iter().map(|item| item.item_id.as_str()).collect();
        ids.sort_unstable();
        if ids.windows(2).any(|pair| pair[0] == pair[1]) {
            return Err(BAD);
        }
        let mut total: u64 = 0;
        for item in &self.items {
            if !item_id_valid(&item.item_id) || !category_valid(&item.category) {
                return Err(BAD);
            }
            if item.quantity == 0 || item.quantity > ITEM_QUANTITY_MAX {
                return Err(BAD);
            }
            let line = item.unit_amount_minor.checked_mul(u64::from(item.quantity)).ok_or(BAD)?;
            total = total.checked_add(line).filter(|t| *t <= AMOUNT_MINOR_MAX).ok_or(BAD)?;
        }
        Ok(total)
    }
}

/// What the age check found, as the store may learn it.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize,
)]
#[repr(u8)]
pub enum AgeCheck {
    /// Not checked: no age-confirmation flag and the store is not strict (A3).
    NotChecked = 0,
    /// Checked; the basket holds no item with a minimum age in the store's jurisdiction.
    NoRestrictedItems = 1,
    /// The condition held for every restricted item.
    Held = 2,
    /// The condition did not hold (too young, no registration, or an expired one).
    NotHeld = 3,
}

impl AgeCheck {
    /// From the wire byte.
    pub fn from_u8(byte: u8) -> Option<AgeCheck> {
        match byte {
            0 => Some(AgeCheck::NotChecked),
            1 => Some(AgeCheck::NoRestrictedItems),
            2 => Some(AgeCheck::Held),
            3 => Some(AgeCheck::NotHeld),
            _ => None,
        }
    }
}

/// The basket's verdict: what was checked, which items were removed (or, when refused, which
/// cannot be paid for), and the amount left to settle before any terminal discount.
#[derive(Debug, Clone, PartialEq, Eq, Hash, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct AgeVerdict {
    /// The check's result.
    pub check: AgeCheck,
    /// Item IDs removed from the payment (policy `remove_items`) or refused (policy `refuse`).
    pub items: Vec<String>,
    /// The amount to settle, in minor units, before the terminal's discount.
    pub amount_minor: u64,
}

/// The decision for a basket: settle the verdict's amount, or decline.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BasketDecision {
    /// What the store learns.
    pub verdict: AgeVerdict,
    /// `None` to proceed with `verdict.amount_minor`; a reason to decline.
    pub decline: Option<ReasonCode>,
}

/// Someone's age in whole years on `today`.
pub fn age_on(birth: Date, today: Date, leap_day: LeapDayBirthday) -> i32 {
    let years = i32::from(today.year()) - i32::from(birth.year());
    let (month, day) = match (birth.month(), birth.day(), today.in_leap_year()) {
        (2, 29, false) => match leap_day {
            LeapDayBirthday::March1 => (3, 1),
            LeapDayBirthday::February28 => (2, 28),
        },
        (month, day, _) => (month, day),
    };
    if (today.month(), today.day()) < (month, day) {
        years - 1
    } else {
        years
    }
}

fn utc_date(now_ms: i64) -> Option<Date> {
    Some(Timestamp::from_millisecond(now_ms).ok()?.to_zoned(TimeZone::UTC).date())
}

/// Decides a basket (A2, A3): `signed_amount` is the amount the user signed in the inherent
/// ID, which the basket must add up to; `registration` is the paying terminal's, if any.
pub fn decide(
    basket: &Basket,
    signed_amount: u64,
    registration: Option<&AgeRegistration>,
    policy: &ResolvedPolicy,
    config: &AgeConfig,
    now_ms: i64,
) -> Result<BasketDecision, ReasonCode> {
    let total = basket.total()?;
    if total != signed_amount {
        return Err(ReasonCode::BasketMismatch);
    }
    let proceed = |check, items, amount_minor| BasketDecision {
        verdict: AgeVerdict { check, items, amount_minor },
        decline: None,
    };
    if !basket.age_confirmation && !policy.policy.strict {
        return Ok(proceed(AgeCheck::NotChecked, Vec::new(), total));
    }
    let rules = config
        .jurisdictions
        .get(&policy.policy.jurisdiction)
        .ok_or(ReasonCode::InvalidAgePolicy)?;
    let restricted: Vec<(&BasketItem, u8)> = basket
        .items
        .iter()
        .filter_map(|item| rules.minimum_ages.get(&item.category).map(|min| (item, *min)))
        .collect();
    if restricted.is_empty() {
        return Ok(proceed(AgeCheck::NoRestrictedItems, Vec::new(), total));
    }
    let age = registration.filter(|r| r.valid_at(now_ms)).and_then(|r| {
        let today = Timestamp::from_millisecond(now_ms).ok()?.to_zoned(policy.tz.clone()).date();
        Some(age_on(r.birth_date, today, rules.leap_day_birthday))
    });
    let failing: Vec<&BasketItem> = restricted
        .iter()
        .filter(|(_, min)| age.is_none_or(|age| age < i32::from(*min)))
        .map(|(item, _)| *item)
        .collect();
    if failing.is_empty() {
        return Ok(proceed(AgeCheck::Held, Vec::new(), total));
    }
    let removed_minor: u64 =
        failing.iter().map(|item| item.unit_amount_minor * u64::from(item.quantity)).sum();
    let items: Vec<String> = failing.iter().map(|item| item.item_id.clone()).collect();
    let remaining = total - removed_minor;
    let decline = match policy.policy.on_failure {
        OnAgeFailure::RemoveItems if remaining > 0 => None,
        _ => Some(ReasonCode::AgeConditionNotMet),
    };
    let amount_minor = if decline.is_some() { 0 } else { remaining };
    Ok(BasketDecision {
        verdict: AgeVerdict { check: AgeCheck::NotHeld, items, amount_minor },
        decline,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn date(y: i16, m: i8, d: i8) -> Date {
        Date::new(y, m, d).unwrap()
    }

    #[test]
    fn age_turns_on_the_birthday() {
        let birth = date(2006, 4, 2);
        assert_eq!(age_on(birth, date(2026, 4, 1), LeapDayBirthday::March1), 19);
        assert_eq!(age_on(birth, date(2026, 4, 2), LeapDayBirthday::March1), 20);
        assert_eq!(age_on(birth, date(2026, 12, 31), LeapDayBirthday::March1), 20);
    }

    #[test]
    fn leap_day_birthdays_follow_the_jurisdiction() {
        let birth = date(2004, 2, 29);
        // 2025 is a common year.
        assert_eq!(age_on(birth, date(2025, 2, 28), LeapDayBirthday::March1), 20);
        assert_eq!(age_on(birth, date(2025, 2, 28), LeapDayBirthday::February28), 21);
        assert_eq!(age_on(birth, date(2025, 3, 1), LeapDayBirthday::March1), 21);
        // 2028 is a leap year: the birthday is the day itself.
        assert_eq!(age_on(birth, date(2028, 2, 28), LeapDayBirthday::February28), 23);
        assert_eq!(age_on(birth, date(2028, 2, 29), LeapDayBirthday::March1), 24);
    }

    #[test]
    fn age_record_round_trips_and_rejects_bad_dates() {
        let record = AgeRecord {
            key_version: 3,
            card_idm: [7; 8],
            user: UserKey::new(UserIdType::Mail, "a@example.com").unwrap(),
            birth_date: date(2000, 2, 29),
            method: VerificationMethod::DocumentChip,
            verified_at_ms: 1_700_000_000_000,
            valid_until_ms: 1_800_000_000_000,
            counter: 42,
            timestamp_ms: 1_700_000_000_500,
        };
        let signed = record.sign(&[9; 32]);
        let (decoded, body, tag) = AgeRecord::decode(&signed).unwrap();
        assert_eq!(decoded, record);
        assert_eq!(body.len() + tag.len(), signed.len());
        let mut bad_day = signed.clone();
        let at = 13 + "a@example.com".len() + 3;
        bad_day[at] = 30; // 30 February
        assert_eq!(AgeRecord::decode(&bad_day).unwrap_err(), ReasonCode::InvalidAgeRegistration);
        assert_eq!(AgeRecord::decode(&signed[..40]).unwrap_err(), ReasonCode::Malformed);
    }

    #[test]
    fn config_from_toml_and_its_checks() {
        let text = r#"
            [age.jurisdictions.DE]
            minimum_ages = { beer = 16, spirits = 18 }
            leap_day_birthday = "february28"
            [age.default_policy]
            jurisdiction = "DE"
            time_zone = "Europe/Berlin"
            on_failure = "remove_items"
            [[age.provider_policies]]
            provider_code = 7
            policy = { jurisdiction = "DE", time_zone = "Europe/Berlin", strict = true }
        "#;
        let config = crate::EngineConfig::from_toml(text).unwrap();
        config.validate().unwrap();
        let rules = AgeRules::new(config.age.clone()).unwrap();
        assert!(rules.policy_for(7, None).policy.strict);
        assert_eq!(rules.policy_for(8, None).policy.on_failure, OnAgeFailure::RemoveItems);
        let mut bad = config.clone();
        bad.age.default_policy.time_zone = "Europe/Atlantis".into();
        assert!(bad.validate().unwrap_err().contains("default_policy"));
        let mut bad = config;
        bad.age.jurisdictions.get_mut("DE").unwrap().minimum_ages.insert("Beer!".into(), 1);
        assert!(bad.validate().unwrap_err().contains("Beer!"));
    }
}
