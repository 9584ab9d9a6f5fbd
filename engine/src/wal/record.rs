//! The log record format of versions 1 to 6, read only: rkyv-archived mirror types of the
//! shard's commands, converted into the commands when an older log is opened (and the log
//! rewritten in the current format, whose record is the shard's `Envelope` itself:
//! `shard/logged.rs`). Secrets in them are sealed: device keys under the vault key, card
//! numbers as the vault sealed them. Passwords only ever exist as Argon2id PHC strings. The
//! snapshot reader of versions 1 to 6 (`shard/legacy.rs`) shares the leaf types.

use rkyv::{Archive, Deserialize, Serialize};

use crate::age::{AgeCheck, AgePolicy, AgeRecord, AgeVerdict, Basket, BasketItem, OnAgeFailure};
use crate::codes::CouponEffect;
use crate::geo::{AcceptedMethod, Store};
use crate::inherent::InherentId;
use crate::keys::{DeviceKey, NewDeviceKey, Verified};
use crate::providers::TerminalEntry;
use crate::shard::state::NewMeans;
use crate::shard::state::{CodeSpec, RedeemSpec, SaleLine};
use crate::shard::{Command, Envelope};
use crate::types::{
    Approval, AuthCode, AuthOutcome, CardToken, Currency, Discount, MeansKind, ReasonCode,
    TerminalService, UserIdType, UserKey,
};
use crate::vault::{SealedNumber, Vault};

/// One logged command with its context.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq)]
pub(crate) struct LogEnvelope {
    owner_hash: u64,
    client_request_id: Option<u128>,
    digest: u64,
    now_ms: i64,
    command: LogCommand,
}

#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq)]
enum LogCommand {
    Enroll {
        user: LogUser,
        password_phc: String,
        idm: [u8; 8],
        key: LogSealed,
    },
    ProvisionDevice {
        user: LogUser,
        idm: [u8; 8],
        key: LogSealed,
    },
    RotateDeviceKey {
        user: LogUser,
        idm: [u8; 8],
        key: LogSealed,
    },
    AddMeans {
        user: LogUser,
        kind: u8,
        label: String,
        number: Option<LogNumber>,
        make_default: bool,
    },
    SetDefaultMeans {
        user: LogUser,
        means_id: u32,
    },
    LoginAttempt {
        user: LogUser,
        success: bool,
    },
    /// The signed inherent ID, re-encoded from the verified record and its tag.
    AuthReserve {
        inherent_id: Vec<u8>,
    },
    AuthComplete {
        owner_hash: u64,
        client_request_id: u128,
        user: LogUser,
        means_id: u32,
        outcome: LogOutcome,
    },
    RegisterTerminals {
        provider_code: u32,
        terminals: Vec<LogTerminal>,
    },
    RemoveTerminals {
        provider_code: u32,
        terminal_ids: Vec<String>,
    },
    // Format version 2 appends the variants below; version-1 logs never hold them.
    /// An authorization with its basket (A2).
    AuthReserveBasket {
        inherent_id: Vec<u8>,
        basket: LogBasket,
    },
    AuthCompleteBasket {
        owner_hash: u64,
        client_request_id: u128,
        user: LogUser,
        means_id: u32,
        outcome: LogOutcome,
        verdict: LogVerdict,
    },
    /// The signed age record, body and tag (A1).
    RegisterAge {
        record: Vec<u8>,
    },
    SetAgePolicy {
        provider_code: u32,
        terminal_id: String,
        policy: Option<LogAgePolicy>,
    },
    // Format version 3 appends the variants below.
    UpsertStore {
        store: LogStore,
    },
    RemoveStore {
        store_id: String,
        moved: bool,
    },
    TopUp {
        user: LogUser,
        means_id: u32,
        amount_minor: u64,
        currency: [u8; 3],
    },
    CodeReserve {
        inherent_id: Vec<u8>,
        spec: LogCodeSpec,
    },
    CodeComplete {
        owner_hash: u64,
        client_request_id: u128,
        user: LogUser,
        means_id: u32,
        outcome: LogOutcome,
        spec: LogCodeSpec,
    },
    RedeemCode {
        number: u64,
        amount_minor: u64,
        currency: [u8; 3],
        terminal_id: String,
        sale_at_ms: i64,
        items: Vec<(String, u32, u64)>,
        coupon: Option<u64>,
        order_ref: String,
    },
    SweepCodes,
    IssueCoupon {
        user: LogUser,
        provider_code: u32,
        effect: LogCoupon,
        uses: u32,
        expires_ms: i64,
    },
    // Format version 5 appends the variants below.
    RedeemCodeBasket {
        sale: LogSale,
        basket: LogBasket,
    },
    // Format version 6 appends the variants below (none may make the archived command larger
    // than its 128 bytes: a record is read from the end of its payload). The completions above
    // name their record by key alone; `Completion` names it by key and digest, and a code's
    // the store terminal it was requested for.
    /// A device's keys revoked at once; `key` is the one given to nobody that replaces them.
    RevokeDeviceKey {
        user: LogUser,
        idm: [u8; 8],
        key: LogSealed,
    },
    /// A delivery notice accepted (C4), and how many devices were subscribed.
    NotifyDelivery {
        user: LogUser,
        devices: u32,
    },
    /// A provider's answer to a payment or payment-code request.
    Completion(Box<LogCompletion>),
}

/// A provider's answer, and the idempotency record it is for: key and the request's digest.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq)]
pub(crate) struct LogCompletion {
    owner_hash: u64,
    client_request_id: u128,
    digest: u64,
    user: LogUser,
    means_id: u32,
    outcome: LogOutcome,
    /// A payment with a basket: its age verdict.
    verdict: Option<LogVerdict>,
    /// A payment-code request: the code to issue.
    code: Option<LogCodeSpec>,
    /// A payment-code request: the store terminal it was requested for.
    terminal_id: String,
}

/// A redemption's sale, but for its lines.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq)]
pub(crate) struct LogSale {
    number: u64,
    amount_minor: u64,
    currency: [u8; 3],
    terminal_id: String,
    sale_at_ms: i64,
    coupon: Option<u64>,
    order_ref: String,
}

impl LogSale {
    /// The redemption of this sale of `items`, or of `basket`.
    fn redeem(self, items: Vec<SaleLine>, basket: Option<Basket>) -> Result<Command, RecordError> {
        let spec = RedeemSpec {
            number: self.number,
            amount_minor: self.amount_minor,
            currency: currency_in(self.currency)?,
            terminal_id: self.terminal_id,
            sale_at_ms: self.sale_at_ms,
            // Recorded as one or the other, never both.
            lines: match basket {
                Some(basket) => crate::engine::SaleLines::Basket(basket),
                None => crate::engine::SaleLines::Items(items),
            },
            coupon: self.coupon,
            order_ref: self.order_ref,
        };
        // Its terminal's policies are resolved at replay (`Command::resolve`).
        Ok(Command::RedeemCode { spec: Box::new(spec), policies: None })
    }
}

#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq)]
pub(crate) struct LogCodeSpec {
    validity_ms: i64,
    deliver_to: Option<[u8; 8]>,
    order_ref: String,
}

/// A coupon's effect: kind (1 percent, 2 fixed, 3 order code), value, currency.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq)]
pub(crate) struct LogCoupon {
    kind: u8,
    value: u64,
    currency: [u8; 3],
}

pub(crate) fn coupon_in(coupon: &LogCoupon) -> Result<CouponEffect, RecordError> {
    Ok(match coupon.kind {
        1 => CouponEffect::Percent {
            bps: u16::try_from(coupon.value).map_err(|_| RecordError("coupon bps"))?,
        },
        2 => CouponEffect::Fixed {
            amount_minor: coupon.value,
            currency: currency_in(coupon.currency)?,
        },
        3 => CouponEffect::OrderCode,
        _ => return Err(RecordError("coupon kind")),
    })
}

fn code_spec_in(spec: &LogCodeSpec) -> Box<CodeSpec> {
    Box::new(CodeSpec {
        validity_ms: spec.validity_ms,
        deliver_to: spec.deliver_to,
        order_ref: spec.order_ref.clone(),
    })
}

#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq)]
pub(crate) struct LogStore {
    store_id: String,
    name: String,
    industry: String,
    address: String,
    latitude: f64,
    longitude: f64,
    beacons: Vec<String>,
    wifi: Vec<String>,
    qr_code: Option<String>,
    /// Means kind and brand.
    accepts: Vec<(u8, String)>,
}

pub(crate) fn store_in(store: &LogStore) -> Result<Store, RecordError> {
    let accepts = store
        .accepts
        .iter()
        .map(|(kind, brand)| {
            let kind = MeansKind::from_u8(*kind).ok_or(RecordError("accepted means kind"))?;
            Ok(AcceptedMethod { kind, brand: brand.clone() })
        })
        .collect::<Result<_, RecordError>>()?;
    Ok(Store {
        store_id: store.store_id.clone(),
        name: store.name.clone(),
        industry: store.industry.clone(),
        address: store.address.clone(),
        latitude: store.latitude,
        longitude: store.longitude,
        beacons: store.beacons.clone(),
        wifi: store.wifi.clone(),
        qr_code: store.qr_code.clone(),
        accepts,
    })
}

#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq)]
pub(crate) struct LogBasket {
    age_confirmation: bool,
    items: Vec<LogItem>,
}

#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq)]
struct LogItem {
    item_id: String,
    category: String,
    quantity: u32,
    unit_amount_minor: u64,
}

#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq)]
pub(crate) struct LogVerdict {
    check: u8,
    items: Vec<String>,
    amount_minor: u64,
}

#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq)]
pub(crate) struct LogAgePolicy {
    pub(crate) jurisdiction: String,
    pub(crate) time_zone: String,
    pub(crate) on_failure: u8,
    pub(crate) strict: bool,
}

#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq)]
pub(crate) struct LogUser {
    pub(crate) id_type: u8,
    pub(crate) id: String,
}

#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq)]
pub(crate) struct LogSealed {
    nonce: [u8; 24],
    ciphertext: Vec<u8>,
}

#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq)]
pub(crate) struct LogNumber {
    pub(crate) token: [u8; 16],
    pub(crate) last4: [u8; 4],
    pub(crate) sealed: LogSealed,
}

#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq)]
pub(crate) enum LogOutcome {
    Approved {
        auth_code: [u8; 6],
        provider_code: u32,
        amount_requested_minor: u64,
        discount_minor: u64,
        amount_final_minor: u64,
        currency: [u8; 3],
    },
    Declined {
        reason: u16,
    },
}

#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq)]
pub(crate) struct LogTerminal {
    terminal_id: String,
    service: Option<LogService>,
}

#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq)]
struct LogService {
    /// 1 percent (`value` = bps), 2 fixed (`value` = minor units in `currency`).
    discount_kind: u8,
    value: u64,
    currency: [u8; 3],
    valid_from_ms: i64,
    valid_until_ms: i64,
    description: String,
}

/// A record that does not map back to a command: written by a newer or broken writer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid log record: {0}")]
pub(crate) struct RecordError(pub(crate) &'static str);

pub(crate) fn user_in(user: &LogUser) -> Result<UserKey, RecordError> {
    user_key_in(user.id_type, &user.id)
}

/// [`user_in`], read in place from an archive.
pub(crate) fn archived_user_in(user: &ArchivedLogUser) -> Result<UserKey, RecordError> {
    user_key_in(user.id_type, user.id.as_str())
}

fn user_key_in(id_type: u8, id: &str) -> Result<UserKey, RecordError> {
    let id_type = UserIdType::from_u8(id_type).ok_or(RecordError("user id type"))?;
    UserKey::new(id_type, id).map_err(|_| RecordError("user id"))
}

/// [`sealed_in`], read in place from an archive.
pub(crate) fn archived_sealed_in(sealed: &ArchivedLogSealed) -> SealedNumber {
    SealedNumber { nonce: sealed.nonce, ciphertext: sealed.ciphertext.to_vec() }
}

pub(crate) fn sealed_in(sealed: &LogSealed) -> SealedNumber {
    SealedNumber { nonce: sealed.nonce, ciphertext: sealed.ciphertext.clone() }
}

/// A device key sealed to `idm`, opened; refused if it does not open under `vault`.
pub(crate) fn open_key(
    vault: &Vault,
    sealed: &SealedNumber,
    idm: &[u8; 8],
) -> Result<DeviceKey, RecordError> {
    let plain = vault.open(sealed, idm).ok_or(RecordError(
        "a sealed device key does not open: is this the vault key the data was written with?",
    ))?;
    let bytes: [u8; 32] =
        plain.as_slice().try_into().map_err(|_| RecordError("device key length"))?;
    Ok(DeviceKey::from_bytes(bytes))
}

/// A device key as a command carries it, from a legacy record's sealed key.
fn new_key_in(
    vault: &Vault,
    sealed: &LogSealed,
    idm: &[u8; 8],
) -> Result<NewDeviceKey, RecordError> {
    let sealed = sealed_in(sealed);
    let plain = open_key(vault, &sealed, idm)?;
    Ok(NewDeviceKey { sealed: std::sync::Arc::new(sealed), plain: Some(plain) })
}

pub(crate) fn currency_in(bytes: [u8; 3]) -> Result<Currency, RecordError> {
    Currency::from_bytes(bytes).map_err(|_| RecordError("currency"))
}

pub(crate) fn outcome_in(outcome: &LogOutcome) -> Result<AuthOutcome, RecordError> {
    Ok(match *outcome {
        LogOutcome::Approved {
            auth_code,
            provider_code,
            amount_requested_minor,
            discount_minor,
            amount_final_minor,
            currency,
        } => AuthOutcome::Approved(Approval {
            auth_code: AuthCode(auth_code),
            provider_code,
            amount_requested_minor,
            discount_minor,
            amount_final_minor,
            currency: currency_in(currency)?,
        }),
        LogOutcome::Declined { reason } => {
            AuthOutcome::Declined(ReasonCode::from_code(reason).ok_or(RecordError("reason code"))?)
        }
    })
}

pub(crate) fn terminal_in(entry: &LogTerminal) -> Result<TerminalEntry, RecordError> {
    let service = match &entry.service {
        None => None,
        Some(s) => {
            let discount = match s.discount_kind {
                1 => Discount::Percent {
                    bps: u16::try_from(s.value).map_err(|_| RecordError("bps"))?,
                },
                2 => Discount::Fixed { amount_minor: s.value, currency: currency_in(s.currency)? },
                _ => return Err(RecordError("discount kind")),
            };
            Some(TerminalService {
                discount,
                valid_from_ms: s.valid_from_ms,
                valid_until_ms: s.valid_until_ms,
                description: s.description.clone(),
            })
        }
    };
    Ok(TerminalEntry { terminal_id: entry.terminal_id.clone(), service })
}

fn basket_in(basket: &LogBasket) -> Basket {
    Basket {
        age_confirmation: basket.age_confirmation,
        items: basket
            .items
            .iter()
            .map(|i| BasketItem {
                item_id: i.item_id.clone(),
                category: i.category.clone(),
                quantity: i.quantity,
                unit_amount_minor: i.unit_amount_minor,
            })
            .collect(),
    }
}

pub(crate) fn verdict_in(verdict: &LogVerdict) -> Result<AgeVerdict, RecordError> {
    Ok(AgeVerdict {
        check: AgeCheck::from_u8(verdict.check).ok_or(RecordError("age check"))?,
        items: verdict.items.clone(),
        amount_minor: verdict.amount_minor,
    })
}

pub(crate) fn policy_in(policy: &LogAgePolicy) -> Result<AgePolicy, RecordError> {
    Ok(AgePolicy {
        jurisdiction: policy.jurisdiction.clone(),
        time_zone: policy.time_zone.clone(),
        on_failure: OnAgeFailure::from_u8(policy.on_failure)
            .ok_or(RecordError("age policy on_failure"))?,
        strict: policy.strict,
    })
}

fn inherent_in(inherent_id: &[u8]) -> Result<Verified, RecordError> {
    let (record, _, tag) =
        InherentId::decode(inherent_id).map_err(|_| RecordError("inherent id"))?;
    Ok(Verified { record, digest: *tag })
}

impl LogEnvelope {
    /// The envelope back, opening sealed device keys with `vault`.
    pub(crate) fn to_envelope(&self, vault: &Vault) -> Result<Envelope, RecordError> {
        Ok(Envelope {
            owner_hash: self.owner_hash,
            client_request_id: self.client_request_id,
            digest: self.digest,
            now_ms: self.now_ms,
            command: command_in(&self.command, vault)?,
        })
    }

    /// Serializes as an older build logged it (tests of the legacy reader).
    #[cfg(test)]
    pub(crate) fn to_bytes(&self) -> rkyv::util::AlignedVec {
        rkyv::to_bytes::<rkyv::rancor::Error>(self).expect("log records always serialize")
    }

    /// Validates and deserializes a record's payload.
    pub(crate) fn from_bytes(payload: &[u8]) -> Result<LogEnvelope, RecordError> {
        let mut aligned = rkyv::util::AlignedVec::<16>::with_capacity(payload.len());
        aligned.extend_from_slice(payload);
        rkyv::from_bytes::<LogEnvelope, rkyv::rancor::Error>(&aligned)
            .map_err(|_| RecordError("archive"))
    }
}

fn command_in(command: &LogCommand, vault: &Vault) -> Result<Command, RecordError> {
    Ok(match command {
        LogCommand::Enroll { user, password_phc, idm, key } => Command::Enroll {
            user: user_in(user)?,
            password_phc: password_phc.clone(),
            idm: *idm,
            key: new_key_in(vault, key, idm)?,
            device_free: None,
        },
        LogCommand::ProvisionDevice { user, idm, key } => Command::ProvisionDevice {
            user: user_in(user)?,
            idm: *idm,
            key: new_key_in(vault, key, idm)?,
            device_free: None,
        },
        LogCommand::RotateDeviceKey { user, idm, key } => Command::RotateDeviceKey {
            user: user_in(user)?,
            idm: *idm,
            key: new_key_in(vault, key, idm)?,
        },
        LogCommand::RevokeDeviceKey { user, idm, key } => Command::RevokeDeviceKey {
            user: user_in(user)?,
            idm: *idm,
            key: new_key_in(vault, key, idm)?,
        },
        LogCommand::NotifyDelivery { user, devices } => {
            Command::NotifyDelivery { user: user_in(user)?, devices: *devices }
        }
        LogCommand::AddMeans { user, kind, label, number, make_default } => Command::AddMeans {
            user: user_in(user)?,
            means: NewMeans {
                kind: MeansKind::from_u8(*kind).ok_or(RecordError("means kind"))?,
                label: label.clone(),
                sealed: number
                    .as_ref()
                    .map(|n| (CardToken(n.token), n.last4, sealed_in(&n.sealed))),
            },
            make_default: *make_default,
        },
        LogCommand::SetDefaultMeans { user, means_id } => {
            Command::SetDefaultMeans { user: user_in(user)?, means_id: *means_id }
        }
        LogCommand::LoginAttempt { user, success } => {
            Command::LoginAttempt { user: user_in(user)?, success: *success }
        }
        LogCommand::AuthReserve { inherent_id } => Command::AuthReserve {
            verified: inherent_in(inherent_id)?,
            basket: None,
            terminal: None,
        },
        LogCommand::AuthReserveBasket { inherent_id, basket } => Command::AuthReserve {
            verified: inherent_in(inherent_id)?,
            basket: Some(Box::new(basket_in(basket))),
            terminal: None,
        },
        LogCommand::AuthCompleteBasket {
            owner_hash,
            client_request_id,
            user,
            means_id,
            outcome,
            verdict,
        } => Command::AuthComplete {
            key: (*owner_hash, *client_request_id),
            digest: None,
            user: user_in(user)?,
            means_id: *means_id,
            outcome: outcome_in(outcome)?,
            verdict: Some(Box::new(verdict_in(verdict)?)),
        },
        LogCommand::RegisterAge { record } => {
            let (record, _, tag) =
                AgeRecord::decode(record).map_err(|_| RecordError("age record"))?;
            Command::RegisterAge { record, tag: *tag }
        }
        LogCommand::SetAgePolicy { provider_code, terminal_id, policy } => Command::SetAgePolicy {
            provider_code: *provider_code,
            terminal_id: terminal_id.clone(),
            policy: policy.as_ref().map(policy_in).transpose()?,
        },
        LogCommand::UpsertStore { store } => {
            Command::UpsertStore { store: Box::new(store_in(store)?), signals_free: None }
        }
        LogCommand::RemoveStore { store_id, moved } => {
            Command::RemoveStore { store_id: store_id.clone(), moved: *moved }
        }
        LogCommand::CodeReserve { inherent_id, spec } => Command::CodeReserve {
            verified: inherent_in(inherent_id)?,
            spec: code_spec_in(spec),
            terminal: None,
        },
        LogCommand::CodeComplete {
            owner_hash,
            client_request_id,
            user,
            means_id,
            outcome,
            spec,
        } => Command::CodeComplete {
            key: (*owner_hash, *client_request_id),
            digest: None,
            user: user_in(user)?,
            means_id: *means_id,
            outcome: outcome_in(outcome)?,
            spec: code_spec_in(spec),
            // Not recorded before format version 6.
            terminal_id: String::new(),
        },
        LogCommand::RedeemCode {
            number,
            amount_minor,
            currency,
            terminal_id,
            sale_at_ms,
            items,
            coupon,
            order_ref,
        } => {
            let sale = LogSale {
                number: *number,
                amount_minor: *amount_minor,
                currency: *currency,
                terminal_id: terminal_id.clone(),
                sale_at_ms: *sale_at_ms,
                coupon: *coupon,
                order_ref: order_ref.clone(),
            };
            sale.redeem(items.clone(), None)?
        }
        LogCommand::RedeemCodeBasket { sale, basket } => {
            sale.clone().redeem(Vec::new(), Some(basket_in(basket)))?
        }
        LogCommand::SweepCodes => Command::SweepCodes,
        LogCommand::IssueCoupon { user, provider_code, effect, uses, expires_ms } => {
            Command::IssueCoupon {
                user: user_in(user)?,
                provider_code: *provider_code,
                effect: coupon_in(effect)?,
                uses: *uses,
                expires_ms: *expires_ms,
            }
        }
        LogCommand::TopUp { user, means_id, amount_minor, currency } => Command::TopUp {
            user: user_in(user)?,
            means_id: *means_id,
            amount_minor: *amount_minor,
            currency: currency_in(*currency)?,
        },
        LogCommand::AuthComplete { owner_hash, client_request_id, user, means_id, outcome } => {
            Command::AuthComplete {
                key: (*owner_hash, *client_request_id),
                digest: None,
                user: user_in(user)?,
                means_id: *means_id,
                outcome: outcome_in(outcome)?,
                verdict: None,
            }
        }
        LogCommand::Completion(c) => {
            let key = (c.owner_hash, c.client_request_id);
            let (digest, user, means_id) = (Some(c.digest), user_in(&c.user)?, c.means_id);
            let outcome = outcome_in(&c.outcome)?;
            match &c.code {
                Some(spec) => Command::CodeComplete {
                    key,
                    digest,
                    user,
                    means_id,
                    outcome,
                    spec: code_spec_in(spec),
                    terminal_id: c.terminal_id.clone(),
                },
                None => Command::AuthComplete {
                    key,
                    digest,
                    user,
                    means_id,
                    outcome,
                    verdict: c.verdict.as_ref().map(verdict_in).transpose()?.map(Box::new),
                },
            }
        }
        LogCommand::RegisterTerminals { provider_code, terminals } => Command::RegisterTerminals {
            provider_code: *provider_code,
            terminals: terminals.iter().map(terminal_in).collect::<Result<_, _>>()?,
        },
        LogCommand::RemoveTerminals { provider_code, terminal_ids } => Command::RemoveTerminals {
            provider_code: *provider_code,
            terminal_ids: terminal_ids.clone(),
        },
    })
}

#[cfg(test)]
mod layout {
    use super::*;

    #[test]
    fn the_archived_command_keeps_its_size() {
        assert_eq!(std::mem::size_of::<ArchivedLogCommand>(), 128);
    }

    /// A code's issue as format version 5 logged it (no terminal) still reads, with no
    /// terminal; as version 6 logs it, with its terminal.
    #[test]
    fn a_code_issue_reads_from_either_format() {
        let vault = Vault::new(&[3; 32]);
        let user = LogUser { id_type: 1, id: "a@example.com".into() };
        let outcome = LogOutcome::Declined { reason: ReasonCode::ProviderDoNotHonor.code() };
        let spec = LogCodeSpec { validity_ms: 60_000, deliver_to: None, order_ref: String::new() };
        let envelope = |command| LogEnvelope {
            owner_hash: 7,
            client_request_id: None,
            digest: 0,
            now_ms: 1,
            command,
        };
        let v5 = envelope(LogCommand::CodeComplete {
            owner_hash: 7,
            client_request_id: 9,
            user: user.clone(),
            means_id: 1,
            outcome: outcome.clone(),
            spec: spec.clone(),
        });
        let v6 = envelope(LogCommand::Completion(Box::new(LogCompletion {
            owner_hash: 7,
            client_request_id: 9,
            digest: 11,
            user,
            means_id: 1,
            outcome,
            verdict: None,
            code: Some(spec),
            terminal_id: "SHOP-A-1".into(),
        })));
        for (record, terminal) in [(v5, ""), (v6, "SHOP-A-1")] {
            let read = LogEnvelope::from_bytes(&record.to_bytes()).unwrap();
            let Command::CodeComplete { key, terminal_id, .. } =
                read.to_envelope(&vault).unwrap().command
            else {
                panic!("a code's completion")
            };
            assert_eq!((key, terminal_id.as_str()), ((7, 9), terminal));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Records written by format version 5 (before completions named their record's digest),
    /// as that build encoded them: an authorization's completion, one with a basket, a code
    /// request's.
    const V5_COMPLETIONS: [&str; 3] = [
        "616c696365406578616d706c652e636f6d000000000000000000000000000000887766554433221100000000\
         0000000000000000000000000000000000000000000000000000000000000000000000000000000000000000\
         00748d00a2010000070000000000000088776655443322112a00000000000000000000000000000001000000\
         910000007cffffff0100000000413142324333006400000000000000b0040000000000000000000000000000\
         b0040000000000004a5059000000000000000000000000000000000000000000000000000000000000000000\
         00000000",
        "616c696365406578616d706c652e636f6d00000062656572ffffffff00000000887766554433221100000000\
         0000000000000000000000000000000000000000000000000000000000000000000000000000000000000000\
         01748d00a20100000b0000000000000088776655443322112b00000000000000000000000000000001000000\
         910000007cffffff0200000001001e0000000000000000000000000000000000000000000000000000000000\
         000000000000000000000000000000000100000050ffffff0100000000000000840300000000000000000000\
         00000000",
        "616c696365406578616d706c652e636f6d000000000000000000000000000000887766554433221100000000\
         0000000000000000000000000000000000000000000000000000000000000000000000000000000000000000\
         02748d00a2010000120000000000000088776655443322112c00000000000000000000000000000001000000\
         910000007cffffff0300000000413142324333006400000000000000b0040000000000000000000000000000\
         b0040000000000004a5059000000000060ea0000000000000109090909090909090000004f524445522d31ff\
         00000000",
    ];

    fn hex(text: &str) -> Vec<u8> {
        (0..text.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&text[i..i + 2], 16).unwrap())
            .collect()
    }

    /// An older log's completions still read, as completions that name their record by key
    /// alone; the archived envelope keeps its size, so the root of every older record is
    /// where its reader looks for it.
    #[test]
    fn version_5_completions_read_as_completions_by_key() {
        assert_eq!(std::mem::size_of::<ArchivedLogEnvelope>(), 192, "the envelope's layout moved");
        let vault = Vault::new(&[7; 32]);
        let commands: Vec<Command> = V5_COMPLETIONS
            .iter()
            .map(|text| LogEnvelope::from_bytes(&hex(text)).unwrap().to_envelope(&vault).unwrap())
            .map(|envelope| envelope.command)
            .collect();
        let owner = 0x1122_3344_5566_7788;
        match &commands[0] {
            Command::AuthComplete {
                key,
                digest: None,
                means_id: 1,
                outcome,
                verdict: None,
                ..
            } => {
                assert_eq!(*key, (owner, 42));
                assert!(
                    matches!(outcome, AuthOutcome::Approved(a) if a.amount_final_minor == 1200)
                );
            }
            other => panic!("{other:?}"),
        }
        match &commands[1] {
            Command::AuthComplete { key, digest: None, means_id: 2, verdict: Some(v), .. } => {
                assert_eq!((*key, v.amount_minor), ((owner, 43), 900));
            }
            other => panic!("{other:?}"),
        }
        match &commands[2] {
            Command::CodeComplete { key, digest: None, means_id: 3, spec, .. } => {
                assert_eq!((*key, spec.order_ref.as_str()), ((owner, 44), "ORDER-1"));
            }
            other => panic!("{other:?}"),
        }
    }
}
