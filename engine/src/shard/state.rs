//! A shard's state and the commands that change it: pure and deterministic, no I/O, no clock,
//! no randomness. Everything nondeterministic (time, keys, tokens) arrives inside the command,
//! so that a log of commands replays to the same state.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use settlegate_adapters::{AdapterError, AuthorizationRequest, DeclineReason, ProviderReply};

use rkyv::with::Map;

use super::archive::{CouponLeaf, DiscountLeaf, OutcomeLeaf, UserKeyVia, Via};
use super::idempotency::{Completes, IdemKey, IdemState, Idempotency, KeptReply, Seen};
use super::replay::ReplayWindow;
use crate::age::{
    self, AgePolicy, AgeRecord, AgeRegistration, AgeRules, AgeVerdict, Basket, ResolvedPolicy,
};
use crate::codes::{issue_number, CodeKey, CodeKind, CodePayload, CouponEffect};
use crate::cow::{CowMap, CHUNK_BITS_LARGE, CHUNK_BITS_SMALL};
use crate::engine::SaleLines;
use crate::geo::{Candidate, Store, StoreDirectory, StoreIndex};
use crate::keys::{DeviceIndex, NewDeviceKey, SealedKeys, Verified, REVOKED};
use crate::limits::{
    BALANCE_MAX_MINOR, COUPON_USES_MAX, DEVICES_PER_USER_MAX, MEANS_PER_USER_MAX,
    STORES_PER_SHARD_MAX,
};
use crate::providers::{Registry, TerminalEntry};
use crate::types::{
    Approval, AuthCode, AuthOutcome, CardToken, ClientRequestId, Currency, Discount, Idm,
    MeansKind, ReasonCode, UserKey,
};
use crate::vault::{SealedNumber, Vault};

/// State shared by all shards, written only by applying commands.
#[derive(Clone)]
pub(crate) struct Shared {
    pub(crate) devices: Arc<DeviceIndex>,
    pub(crate) vault: Arc<Vault>,
    pub(crate) registry: Arc<Registry>,
    pub(crate) age: Arc<AgeRules>,
    pub(crate) stores: Arc<StoreDirectory>,
    pub(crate) codes: Arc<CodeKey>,
    pub(crate) code_issuer: u16,
    /// Providers' completions dropped because their record was gone or replaced (applied live;
    /// a replay does not count them again).
    pub(crate) completions_dropped: Arc<AtomicU64>,
}

impl Shared {
    /// Counts and reports a completion of `dispatch` that found its idempotency record gone
    /// (the count limit dropped it) or replaced (its client request ID used again): its outcome
    /// was not recorded, and the payment stands declined as a provider timeout, as one cut off
    /// by a crash does (an approval there is reversed: `state/money.rs` owes the reversal).
    pub(crate) fn completion_dropped(&self, dispatch: &Dispatch, outcome: &AuthOutcome) {
        self.completions_dropped.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(
            dispatch_id = dispatch.dispatch_id,
            provider = dispatch.provider_code,
            client_request_id = %dispatch.key.1,
            approved = matches!(outcome, AuthOutcome::Approved(_)),
            "a provider's completion found its idempotency record gone or replaced; its outcome \
             is dropped and the payment declined as a provider timeout (an approval is \
             reversed at the provider, as after a crash)"
        );
    }
}

/// The parts of the engine config a shard applies.
#[derive(Debug, Clone, Copy)]
pub(crate) struct StateConfig {
    pub(crate) timestamp_window_ms: i64,
    pub(crate) key_grace_ms: i64,
    pub(crate) login_failures_max: u32,
    pub(crate) lockout_ms: i64,
    pub(crate) idempotency_ttl_ms: i64,
    pub(crate) idempotency_records_max: usize,
    /// Operations owed to providers a shard keeps at most before it refuses what would add
    /// one by choice (`[engine.forwarding] owed_max_per_shard`).
    pub(crate) owed_max: usize,
    /// How long a settled payment may be refunded, from its authorization
    /// (`[engine.forwarding] refund_window_ms`).
    pub(crate) refund_window_ms: i64,
    /// Settled payments kept for refunds at most (`settled_max_per_shard`).
    pub(crate) settled_max: usize,
}

impl StateConfig {
    /// The end of the refund window of a settled payment authorized at `at_ms`.
    pub(crate) fn refundable_until(&self, at_ms: i64) -> i64 {
        at_ms.saturating_add(self.refund_window_ms)
    }
}

/// One registered settlement means, as a client sees it (never a card number).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MeansView {
    /// The means' ID within the user (1, 2, ...).
    pub means_id: u32,
    /// Its kind.
    pub kind: MeansKind,
    /// Display text: scheme, e-money type, or a masked number.
    pub label: String,
    /// Last four digits of a card or account number.
    pub last4: Option<String>,
    /// The vault token of a card or account number.
    pub token: Option<CardToken>,
    /// Whether this is the user's default means.
    pub is_default: bool,
    /// Approved settlements made with it.
    pub uses: u64,
    /// When it was last used (ms since the epoch).
    pub last_used_ms: Option<i64>,
    /// When it was registered (ms since the epoch).
    pub registered_ms: i64,
    /// The balance, for a stored-value means (e-money); `None` for cards and accounts.
    pub balance: Option<Balance>,
}

/// A means ready to store: validated and, for numbers, already sealed by the vault.
#[derive(Debug, Clone, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub(crate) struct NewMeans {
    #[rkyv(with = Via<u8>)]
    pub(crate) kind: MeansKind,
    pub(crate) label: String,
    #[rkyv(with = Map<Via<([u8; 16], [u8; 4], SealedNumber)>>)]
    pub(crate) sealed: Option<(CardToken, [u8; 4], SealedNumber)>,
}

/// A card number as a means keeps it: its token, last four digits, and the number as the vault
/// sealed it (shared with the vault, so a snapshot reads it from the shard's own state).
#[derive(Debug, Clone, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub(crate) struct StoredNumber {
    #[rkyv(with = Via<[u8; 16]>)]
    pub(crate) token: CardToken,
    pub(crate) last4: [u8; 4],
    #[rkyv(with = rkyv::with::Unshare)]
    pub(crate) sealed: Arc<SealedNumber>,
}

impl StoredNumber {
    /// Keeps a sealed number, handing it to `register` for the vault (which opens it for
    /// adapters): [`Vault::store`] at once, or a [`RegistryWrite::Store`] a replay defers.
    pub(crate) fn kept(
        token: CardToken,
        last4: [u8; 4],
        sealed: SealedNumber,
        register: impl FnOnce(CardToken, Arc<SealedNumber>),
    ) -> StoredNumber {
        let number = StoredNumber { token, last4, sealed: Arc::new(sealed) };
        register(token, Arc::clone(&number.sealed));
        number
    }
}

#[derive(Debug, Clone, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub(crate) struct StoredMeans {
    pub(crate) means_id: u32,
    #[rkyv(with = Via<u8>)]
    pub(crate) kind: MeansKind,
    pub(crate) label: String,
    pub(crate) number: Option<StoredNumber>,
    pub(crate) uses: u64,
    pub(crate) last_used_ms: Option<i64>,
    pub(crate) registered_ms: i64,
    /// The balance of a stored-value means (e-money), kept by the engine.
    pub(crate) purse: Option<Purse>,
}

/// A stored-value balance: what is loaded, in which currency (fixed by the first top-up), and
/// the holds of payments waiting for their provider.
#[derive(
    Debug, Clone, Default, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize,
)]
pub(crate) struct Purse {
    pub(crate) balance_minor: u64,
    #[rkyv(with = Map<Via<[u8; 3]>>)]
    pub(crate) currency: Option<Currency>,
    pub(crate) holds: Vec<PurseHold>,
}

/// An amount held on a purse: for a payment with its provider (no expiry), or behind an issued
/// payment code (until the code expires).
#[derive(Debug, Clone, Copy, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub(crate) struct PurseHold {
    pub(crate) key: IdemKey,
    /// The digest of the payment's request, as its idempotency record holds it: a payment's
    /// completion releases its own hold, not that of a later payment given the same client
    /// request ID. None for a hold restored from a snapshot of a format before version 6 (the
    /// first completion of its key takes it, as before) and for a code's hold.
    pub(crate) digest: Option<u64>,
    pub(crate) amount_minor: u64,
    pub(crate) expires_ms: i64,
}

/// The key of the purse hold behind payment code `number`.
pub(crate) fn code_hold_key(number: u64) -> IdemKey {
    (u64::MAX, u128::from(number))
}

impl PurseHold {
    /// Whether this is the hold of the payment whose record is `key`'s with `digest` (a
    /// completion from an older log gives no digest and takes the first hold of its key, as
    /// it did; so does a hold restored from an older snapshot).
    fn is_of(&self, key: IdemKey, digest: Option<u64>) -> bool {
        self.key == key
            && match (self.digest, digest) {
                (Some(held), Some(named)) => held == named,
                _ => true,
            }
    }
}

/// How a completion names its record (none: read from a log older than format version 6).
fn completes(digest: Option<u64>, user: &UserKey, means_id: u32) -> Completes<'_> {
    match digest {
        Some(digest) => Completes::Record { digest },
        None => Completes::Legacy { user, means_id },
    }
}

impl Purse {
    /// The balance less every hold.
    /// The balance less every hold still in force at `now_ms` (a code's hold past its expiry
    /// counts for nothing, even before the sweeper releases it).
    pub(crate) fn available_minor(&self, now_ms: i64) -> u64 {
        let held: u64 =
            self.holds.iter().filter(|h| h.expires_ms > now_ms).map(|h| h.amount_minor).sum();
        self.balance_minor.saturating_sub(held)
    }
}

/// A stored-value means' balance, as a client sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct Balance {
    /// Loaded and not yet spent, minor units.
    pub balance_minor: u64,
    /// The balance less the holds of payments in flight.
    pub available_minor: u64,
    /// The purse's currency (none before the first top-up).
    #[rkyv(with = Map<Via<[u8; 3]>>)]
    pub currency: Option<Currency>,
}

#[derive(Debug, Clone, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub(crate) struct Device {
    pub(crate) idm: Idm,
    pub(crate) key_version: u16,
    pub(crate) replay: ReplayWindow,
    /// The device's keys sealed to its IDm, kept here so a snapshot needs nothing but the
    /// shard's own state (the key index holds them open).
    pub(crate) sealed: SealedKeys,
}

#[derive(Debug, Clone, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub(crate) struct User {
    pub(crate) password_phc: String,
    pub(crate) devices: Vec<Device>,
    pub(crate) means: Vec<StoredMeans>,
    pub(crate) default_means: Option<u32>,
    pub(crate) next_means_id: u32,
    pub(crate) failed_logins: u32,
    pub(crate) locked_until_ms: i64,
}

/// Work for a provider, produced when an authorization passes every check of its shard.
#[derive(Debug, Clone)]
pub(crate) struct Dispatch {
    pub(crate) key: IdemKey,
    /// The digest of the request, as its idempotency record holds it: the completion names the
    /// record by key and digest.
    pub(crate) digest: u64,
    pub(crate) user: UserKey,
    pub(crate) dispatch_id: u64,
    pub(crate) provider_code: u32,
    pub(crate) means_id: u32,
    pub(crate) means: MeansKind,
    pub(crate) card_token: Option<CardToken>,
    pub(crate) terminal_id: String,
    pub(crate) amount_requested_minor: u64,
    pub(crate) discount_minor: u64,
    pub(crate) currency: Currency,
    /// The basket's age verdict, for a payment made with a basket.
    pub(crate) verdict: Option<Box<AgeVerdict>>,
    /// What to issue once the provider approves, for a payment-code authorization (C1–C2).
    pub(crate) code: Option<Box<CodeSpec>>,
    /// When its reservation was made: the request's time for the provider
    /// ([`AuthorizationRequest::at_ms`]).
    pub(crate) at_ms: i64,
}

impl Dispatch {
    /// The amount charged: the requested amount less the terminal's discount.
    fn amount_final_minor(&self) -> u64 {
        self.amount_requested_minor - self.discount_minor
    }

    /// What the provider's adapter is asked: the final amount, after the terminal's discount.
    pub(crate) fn provider_request(&self) -> AuthorizationRequest {
        AuthorizationRequest {
            dispatch_id: self.dispatch_id,
            provider_code: self.provider_code,
            means: self.means,
            card_token: self.card_token,
            terminal_id: self.terminal_id.clone(),
            amount_minor: self.amount_final_minor(),
            currency: self.currency,
            at_ms: self.at_ms,
            // A payment is settled with its approval; a code's authorization is a hold.
            sale: self.code.is_none(),
        }
    }

    /// The payment's outcome from the adapter's answer (a timeout or failure is a decline).
    pub(crate) fn outcome_of(&self, answer: Result<ProviderReply, AdapterError>) -> AuthOutcome {
        match answer {
            // The reference is kept by the shard from the reservation (`state/money.rs`): an
            // adapter's network identifiers are derived from it again when needed.
            Ok(ProviderReply::Approved { auth_code, .. }) => AuthOutcome::Approved(Approval {
                auth_code,
                provider_code: self.provider_code,
                amount_requested_minor: self.amount_requested_minor,
                discount_minor: self.discount_minor,
                amount_final_minor: self.amount_final_minor(),
                currency: self.currency,
            }),
            Ok(ProviderReply::Declined { reason }) => AuthOutcome::Declined(match reason {
                DeclineReason::InsufficientFunds => ReasonCode::ProviderInsufficientFunds,
                DeclineReason::DoNotHonor => ReasonCode::ProviderDoNotHonor,
                DeclineReason::LimitExceeded => ReasonCode::ProviderLimitExceeded,
                DeclineReason::InvalidAccount => ReasonCode::ProviderInvalidAccount,
            }),
            Err(AdapterError::Timeout) => AuthOutcome::Declined(ReasonCode::ProviderTimeout),
            Err(_) => AuthOutcome::Declined(ReasonCode::ProviderUnavailable),
        }
    }

    /// The command that records the provider's `outcome` in the shard: a payment's completion,
    /// or for a payment-code request the code's issue (or release, if declined).
    pub(crate) fn completion(&self, outcome: AuthOutcome, now_ms: i64) -> Envelope {
        let (key, user, means_id) = (self.key, self.user.clone(), self.means_id);
        let digest = Some(self.digest);
        let command = match &self.code {
            Some(spec) => Command::CodeComplete {
                key,
                digest,
                user,
                means_id,
                outcome,
                spec: spec.clone(),
                terminal_id: self.terminal_id.clone(),
            },
            None => Command::AuthComplete {
                key,
                digest,
                user,
                means_id,
                outcome,
                verdict: self.verdict.clone(),
            },
        };
        Envelope { owner_hash: self.key.0, client_request_id: None, digest: 0, now_ms, command }
    }
}

/// How a payment code is to be issued (C2, C4).
#[derive(Debug, Clone, PartialEq, Eq, Hash, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct CodeSpec {
    /// How long the code (and its hold) stays valid, in ms.
    pub validity_ms: i64,
    /// The device it is delivered to; `None`: the requesting device.
    pub deliver_to: Option<Idm>,
    /// The order a cash-on-delivery code pays for; empty for none (C4).
    pub order_ref: String,
}

/// An issued payment code, as its holder receives it (C2).
#[derive(Debug, Clone, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct IssuedCode {
    /// The code's text (a QR code or Code 128 barcode of it is what the POS reads).
    pub text: String,
    /// Its issue number.
    pub number: u64,
    /// The authorized (and held) amount.
    pub amount_minor: u64,
    /// Its currency.
    #[rkyv(with = Via<[u8; 3]>)]
    pub currency: Currency,
    /// When it expires, ms since the epoch.
    pub expires_ms: i64,
    /// The device it is delivered to.
    pub deliver_to: Idm,
    /// The user.
    #[rkyv(with = UserKeyVia)]
    pub user: UserKey,
    /// The order it pays for (cash on delivery), if any.
    pub order_ref: String,
}

/// A code's redemption: the capture, what was released, and the remittance due to the
/// merchant (C3).
#[derive(Debug, Clone, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct Redemption {
    /// The code's issue number.
    pub number: u64,
    /// Captured from the hold: the sale less any coupon discount.
    pub captured_minor: u64,
    /// Released: the authorized amount less the capture.
    pub released_minor: u64,
    /// The coupon's discount, if a coupon was applied.
    pub coupon_discount_minor: u64,
    /// Currency.
    #[rkyv(with = Via<[u8; 3]>)]
    pub currency: Currency,
    /// The store terminal (or courier handheld) that redeemed it: whose merchant is owed.
    pub terminal_id: String,
    /// The provider that authorized the hold.
    pub provider_code: u32,
    /// The provider's authorization code.
    #[rkyv(with = Via<[u8; 6]>)]
    pub auth_code: AuthCode,
    /// The sale's date-time as the POS gave it.
    pub sale_at_ms: i64,
    /// When the engine redeemed it.
    pub redeemed_at_ms: i64,
    /// Lines sold: item ID, quantity, unit amount.
    pub items: Vec<(String, u32, u64)>,
}

/// Where a payment code stands.
#[derive(Debug, Clone, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub enum CodeState {
    /// Issued; its hold stands until it is redeemed or expires.
    Issued,
    /// Redeemed once: captured and the rest released.
    Redeemed(Box<Redemption>),
    /// Expired unused: its hold released.
    Expired,
    /// Voided before redemption (`VOID`): its hold released.
    Voided,
}

/// A payment code's record, kept by the shard that issued it (the second tier, T1).
#[derive(Debug, Clone, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub(crate) struct CodeRecord {
    #[rkyv(with = UserKeyVia)]
    pub(crate) user: UserKey,
    pub(crate) means_id: u32,
    pub(crate) provider_code: u32,
    pub(crate) amount_minor: u64,
    #[rkyv(with = Via<[u8; 3]>)]
    pub(crate) currency: Currency,
    pub(crate) expires_ms: i64,
    #[rkyv(with = Via<[u8; 6]>)]
    pub(crate) auth_code: AuthCode,
    pub(crate) order_ref: String,
    pub(crate) deliver_to: Idm,
    pub(crate) state: CodeState,
    /// The store terminal the code was requested for (the inherent ID's; `*` when the store
    /// was not known), which alone may read the code's state until it is redeemed; empty for a
    /// code issued before format version 6 recorded it.
    pub(crate) terminal_id: String,
}

impl CodeRecord {
    /// Whether the code is still issued (may be redeemed or voided); else why not.
    pub(crate) fn still_issued(&self) -> Result<(), ReasonCode> {
        match self.state {
            CodeState::Issued => Ok(()),
            CodeState::Redeemed(_) => Err(ReasonCode::CodeRedeemed),
            CodeState::Expired => Err(ReasonCode::CodeExpired),
            CodeState::Voided => Err(ReasonCode::CodeVoided),
        }
    }

    /// The store terminal whose merchant the code's state concerns: the one that redeemed it,
    /// or before that the one it was requested for.
    pub(crate) fn merchant_terminal(&self) -> &str {
        match &self.state {
            CodeState::Redeemed(redemption) => &redemption.terminal_id,
            CodeState::Issued | CodeState::Expired | CodeState::Voided => &self.terminal_id,
        }
    }
}

/// A coupon issued to a user (C5).
#[derive(Debug, Clone, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub(crate) struct CouponRecord {
    #[rkyv(with = UserKeyVia)]
    pub(crate) user: UserKey,
    pub(crate) provider_code: u32,
    #[rkyv(with = Via<CouponLeaf>)]
    pub(crate) effect: CouponEffect,
    pub(crate) uses_left: u32,
    pub(crate) expires_ms: i64,
}

/// A coupon as its holder receives it (C5).
#[derive(Debug, Clone, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct IssuedCoupon {
    /// The coupon's text.
    pub text: String,
    /// Its issue number.
    pub number: u64,
    /// The user it was issued to.
    #[rkyv(with = UserKeyVia)]
    pub user: UserKey,
    /// Its effect.
    #[rkyv(with = Via<CouponLeaf>)]
    pub effect: CouponEffect,
    /// How many times it can be used.
    pub uses: u32,
    /// When it expires.
    pub expires_ms: i64,
}

/// A line of a sale: item ID, quantity, unit amount in minor units.
pub(crate) type SaleLine = (String, u32, u64);

/// A POS's redemption request, as the shard applies it (C3).
#[derive(Debug, Clone, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub(crate) struct RedeemSpec {
    pub(crate) number: u64,
    pub(crate) amount_minor: u64,
    #[rkyv(with = Via<[u8; 3]>)]
    pub(crate) currency: Currency,
    pub(crate) terminal_id: String,
    pub(crate) sale_at_ms: i64,
    pub(crate) lines: SaleLines,
    pub(crate) coupon: Option<u64>,
    pub(crate) order_ref: String,
}

/// Hashed as the request's idempotency digest, exactly as before the lines became one enum
/// (items, then the optional basket): a retry of a redemption recorded by an older build must
/// find its record, not a conflict.
impl std::hash::Hash for RedeemSpec {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        let (items, basket): (&[SaleLine], Option<&Basket>) = match &self.lines {
            SaleLines::Items(items) => (items, None),
            SaleLines::Basket(basket) => (&[], Some(basket)),
        };
        self.number.hash(state);
        self.amount_minor.hash(state);
        self.currency.hash(state);
        self.terminal_id.hash(state);
        self.sale_at_ms.hash(state);
        items.hash(state);
        basket.hash(state);
        self.coupon.hash(state);
        self.order_ref.hash(state);
    }
}

/// What a payment needs to know of its store terminal, which lives in the registry of
/// another shard's provider: resolved by the engine before submission and carried in the
/// command and its log record, so that applying the command reads nothing outside its shard.
#[derive(Debug, Clone, Default, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub(crate) struct TerminalContext {
    /// Whether the provider is configured.
    pub(crate) provider_known: bool,
    /// The terminal's own age policy (else the provider's or the default, from the config).
    #[rkyv(with = Map<Via<AgePolicy>>)]
    pub(crate) policy: Option<ResolvedPolicy>,
    /// The discount of the terminal's service active when the command was made.
    #[rkyv(with = Map<Via<DiscountLeaf>>)]
    pub(crate) discount: Option<Discount>,
}

impl TerminalContext {
    /// `terminal_id` of `provider_code` in `registry` at `now_ms`.
    pub(crate) fn resolve(
        registry: &Registry,
        provider_code: u32,
        terminal_id: &str,
        now_ms: i64,
    ) -> TerminalContext {
        let Some(provider) = registry.provider(provider_code) else {
            return TerminalContext::default();
        };
        TerminalContext {
            provider_known: true,
            policy: provider.age_policy(terminal_id),
            discount: provider.active_discount(terminal_id, now_ms),
        }
    }
}

/// The own age policies of `terminal_id` under every provider that set one.
pub(crate) fn terminal_policies(
    registry: &Registry,
    terminal_id: &str,
) -> Vec<(u32, ResolvedPolicy)> {
    // Per redemption: no list of codes built and sorted, one lookup per provider.
    registry.providers().filter_map(|p| Some((p.code, p.age_policy(terminal_id)?))).collect()
}

/// A state change. Applied only by the shard that owns it.
#[derive(Debug, Clone, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub(crate) enum Command {
    /// `device_free`: whether the engine's claim of the IDm succeeded before submission
    /// ([`DeviceIndex::claim`]); none only in a record older than format version 8.
    Enroll {
        #[rkyv(with = UserKeyVia)]
        user: UserKey,
        password_phc: String,
        idm: Idm,
        key: NewDeviceKey,
        device_free: Option<bool>,
    },
    /// As [`Command::Enroll`]'s `device_free`.
    ProvisionDevice {
        #[rkyv(with = UserKeyVia)]
        user: UserKey,
        idm: Idm,
        key: NewDeviceKey,
        device_free: Option<bool>,
    },
    RotateDeviceKey {
        #[rkyv(with = UserKeyVia)]
        user: UserKey,
        idm: Idm,
        key: NewDeviceKey,
    },
    /// Revokes a device's keys at once: `key` (given to nobody) replaces the current one,
    /// which is refused from then on, as is any rotated-out one.
    RevokeDeviceKey {
        #[rkyv(with = UserKeyVia)]
        user: UserKey,
        idm: Idm,
        key: NewDeviceKey,
    },
    AddMeans {
        #[rkyv(with = UserKeyVia)]
        user: UserKey,
        means: NewMeans,
        make_default: bool,
    },
    SetDefaultMeans {
        #[rkyv(with = UserKeyVia)]
        user: UserKey,
        means_id: u32,
    },
    LoginAttempt {
        #[rkyv(with = UserKeyVia)]
        user: UserKey,
        success: bool,
    },
    AuthReserve {
        verified: Verified,
        basket: Option<Box<Basket>>,
        /// The store terminal, as the registry had it when the command was made.
        terminal: Option<Box<TerminalContext>>,
    },
    /// A provider's answer to the payment whose record is `key`'s with `digest` (none: read
    /// from a log older than format version 6, which names the key alone).
    AuthComplete {
        key: IdemKey,
        digest: Option<u64>,
        #[rkyv(with = UserKeyVia)]
        user: UserKey,
        means_id: u32,
        #[rkyv(with = Via<OutcomeLeaf>)]
        outcome: AuthOutcome,
        verdict: Option<Box<AgeVerdict>>,
    },
    /// A1: a verified age registration of one of the user's terminals.
    RegisterAge {
        record: AgeRecord,
        tag: [u8; 32],
    },
    /// A store terminal's own age policy (`None` clears it).
    SetAgePolicy {
        provider_code: u32,
        terminal_id: String,
        policy: Option<AgePolicy>,
    },
    /// W1: adds or replaces a store in the shard owning its cell. `signals_free`: whether
    /// the store directory had its beacons, Wi-Fi and QR poster free (or the store's own) when
    /// the command was made; none only in a record older than format version 8.
    UpsertStore {
        store: Box<Store>,
        signals_free: Option<bool>,
    },
    /// Loads a stored-value means.
    TopUp {
        #[rkyv(with = UserKeyVia)]
        user: UserKey,
        means_id: u32,
        amount_minor: u64,
        #[rkyv(with = Via<[u8; 3]>)]
        currency: Currency,
    },
    /// C1: checks a payment-code request like a payment and holds its amount.
    CodeReserve {
        verified: Verified,
        spec: Box<CodeSpec>,
        /// As [`Command::AuthReserve`]'s.
        terminal: Option<Box<TerminalContext>>,
    },
    /// C2: the provider's answer to a payment-code request: issue the code, or release.
    CodeComplete {
        key: IdemKey,
        /// As [`Command::AuthComplete`]'s.
        digest: Option<u64>,
        #[rkyv(with = UserKeyVia)]
        user: UserKey,
        means_id: u32,
        #[rkyv(with = Via<OutcomeLeaf>)]
        outcome: AuthOutcome,
        spec: Box<CodeSpec>,
        /// The store terminal of the request's inherent ID.
        terminal_id: String,
    },
    /// C3: a POS redeems a code.
    RedeemCode {
        spec: Box<RedeemSpec>,
        /// The redeeming terminal's own age policies, by provider, as the registry had them
        /// when the command was made (the code's provider is known only here); none only in a
        /// record older than format version 8.
        #[rkyv(with = Map<Map<Via<(u32, AgePolicy)>>>)]
        policies: Option<Vec<(u32, ResolvedPolicy)>>,
    },
    /// Releases the holds of codes expired unused.
    SweepCodes,
    /// C4: a delivery notice accepted for `user`, then subscribed on `devices` of theirs (the
    /// engine publishes it on a first answer only: this command is what makes it idempotent).
    NotifyDelivery {
        #[rkyv(with = UserKeyVia)]
        user: UserKey,
        devices: u32,
    },
    /// C5: a coupon for a user.
    IssueCoupon {
        #[rkyv(with = UserKeyVia)]
        user: UserKey,
        provider_code: u32,
        #[rkyv(with = Via<CouponLeaf>)]
        effect: CouponEffect,
        uses: u32,
        expires_ms: i64,
    },
    /// W1: removes a store; `moved` when it only left this shard for another cell's.
    RemoveStore {
        store_id: String,
        moved: bool,
    },
    RegisterTerminals {
        provider_code: u32,
        terminals: Vec<TerminalEntry>,
    },
    RemoveTerminals {
        provider_code: u32,
        terminal_ids: Vec<String>,
    },
    /// A provider's answer to an operation owed to it (store and forward): owed no more.
    Forwarded {
        operation_id: u64,
        answer: Acknowledged,
    },
    /// Recovery's end of an authorization still with its provider whose idempotency record is
    /// gone: its outcome unknown, its reversal owed.
    Abandoned {
        key: IdemKey,
        digest: u64,
    },
    /// `VOID` of a payment code before redemption, by a store terminal it was requested for.
    VoidCode {
        number: u64,
        terminal_id: String,
    },
    /// `REFUND` of part of a redeemed code's capture, by the store terminal that redeemed it.
    RefundCode {
        number: u64,
        amount_minor: u64,
        terminal_id: String,
    },
    /// `REFUND` of part of a settled payment, named by its idempotency key (the paying user's
    /// hash and its client request ID), by the store terminal it was made at.
    RefundPayment {
        payment: IdemKey,
        amount_minor: u64,
        terminal_id: String,
    },
    /// The provider's answer to the payment (or code request) that the command before it in
    /// the shard's log reserved, given in the same step by a provider that decides in process
    /// (`ShardCore::decide_now`). It is logged in place of that completion's command, which
    /// applying it rebuilds from the reservation's dispatch ([`ShardState::replay`] keeps it).
    /// Its record is the compact one of `shard/logged.rs`: 56 bytes where the completion's was
    /// about 240.
    Decided {
        #[rkyv(with = Via<OutcomeLeaf>)]
        outcome: AuthOutcome,
    },
}

impl Command {
    /// The IDm of the device whose key this command issues, if it issues one: an enrollment
    /// record keeps the key sealed to it ([`IdemState::SealedKey`]).
    pub(crate) fn issued_key_idm(&self) -> Option<Idm> {
        self.issued_key().map(|(idm, _)| idm)
    }

    /// The device key this command issues, and its device's IDm, if it issues one.
    pub(crate) fn issued_key(&self) -> Option<(Idm, &NewDeviceKey)> {
        match self {
            Command::Enroll { idm, key, .. }
            | Command::ProvisionDevice { idm, key, .. }
            | Command::RotateDeviceKey { idm, key, .. }
            | Command::RevokeDeviceKey { idm, key, .. } => Some((*idm, key)),
            _ => None,
        }
    }

    /// Whether the command carries everything applying it reads outside its shard: always,
    /// but for a command read from a log older than format version 8.
    pub(crate) fn is_resolved(&self) -> bool {
        match self {
            Command::Enroll { device_free, .. } | Command::ProvisionDevice { device_free, .. } => {
                device_free.is_some()
            }
            Command::UpsertStore { signals_free, .. } => signals_free.is_some(),
            Command::AuthReserve { terminal, .. } | Command::CodeReserve { terminal, .. } => {
                terminal.is_some()
            }
            Command::RedeemCode { policies, .. } => policies.is_some(),
            _ => true,
        }
    }

    /// Fills in what a command read from a log older than format version 8 lacks, from the
    /// registries as they stand (`now_ms`: the command's time), as the engine does before it
    /// submits a command. Recovery calls it with the shards replaying in time order.
    pub(crate) fn resolve(&mut self, shared: &Shared, now_ms: i64) {
        match self {
            Command::Enroll { idm, device_free: free @ None, .. }
            | Command::ProvisionDevice { idm, device_free: free @ None, .. } => {
                *free = Some(!shared.devices.contains(idm));
            }
            Command::UpsertStore { store, signals_free: free @ None } => {
                *free = Some(shared.stores.signals_free(store));
            }
            Command::AuthReserve { verified, terminal: terminal @ None, .. }
            | Command::CodeReserve { verified, terminal: terminal @ None, .. } => {
                let record = &verified.record;
                let context = TerminalContext::resolve(
                    &shared.registry,
                    record.provider_code,
                    &record.terminal_id,
                    now_ms,
                );
                *terminal = Some(Box::new(context));
            }
            Command::RedeemCode { spec, policies: policies @ None } => {
                *policies = Some(terminal_policies(&shared.registry, &spec.terminal_id));
            }
            _ => {}
        }
    }
}

/// A command with its routing, idempotency and time context: the shard's log record, archived
/// as it is (format version 8).
#[derive(Debug, Clone, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub(crate) struct Envelope {
    /// Routing hash of the owning key (user or provider).
    pub(crate) owner_hash: u64,
    /// The client's request ID, for idempotent commands.
    pub(crate) client_request_id: Option<ClientRequestId>,
    /// Digest of the request's content, to tell a retry from a reuse of the ID.
    pub(crate) digest: u64,
    /// The engine's clock when the command was made.
    pub(crate) now_ms: i64,
    pub(crate) command: Command,
}

/// A read that changes nothing.
#[derive(Debug, Clone)]
pub(crate) enum Query {
    Means {
        user: UserKey,
        now_ms: i64,
    },
    /// A payment code's record (its redemption and remittance, C3).
    Code {
        number: u64,
    },
    /// The card IDms of a user's devices.
    Devices {
        user: UserKey,
    },
    Credentials {
        user: UserKey,
        now_ms: i64,
    },
    /// W2: the stores nearest a point (unit vector) within a chord.
    NearestStores {
        position: [f64; 3],
        max_chord: f64,
    },
    /// A store by ID.
    Store {
        store_id: String,
    },
    /// The operations owed to providers: the first `limit`, and counts by provider.
    Owed {
        limit: usize,
    },
}

/// What applying a command or answering a query gives, as a shard's batch carries it back: the
/// answers every flow shares, and one variant per flow holding that flow's own reply type
/// (defined in the flow's module, under `state/`). A caller takes its flow's reply out with
/// [`Reply::into_flow`]; it cannot be handed another flow's.
#[derive(Debug, Clone)]
pub(crate) enum Reply {
    /// Done, with nothing more to say: a change whose answer is that it was made.
    Done,
    /// Refused, for this reason.
    Refused(ReasonCode),
    /// A retry of a request still with its provider.
    InFlight,
    /// G1 accounts ([`AccountsReply`]).
    Accounts(AccountsReply),
    /// G3 settlement ([`SettlementReply`]).
    Settlement(SettlementReply),
    /// C1–C5 payment codes and coupons ([`CodesReply`]).
    Codes(CodesReply),
    /// W3 the wallet ([`WalletReply`]).
    Wallet(WalletReply),
    /// W1–W2 stores ([`StoresReply`]).
    Stores(StoresReply),
    /// Store and forward, `VOID` and `REFUND` ([`MoneyReply`]).
    Money(MoneyReply),
}

/// A typed answer a [`Reply`] may carry: a flow's reply, or one of its variants' contents.
pub(crate) trait FlowReply: Sized {
    /// The answer, or (a bug: a reply of another kind) the reply as it came.
    fn take(reply: Reply) -> Result<Self, Reply>;
}

/// A change answered [`Reply::Done`] (age policies, terminal lists, stores, ...).
impl FlowReply for () {
    fn take(reply: Reply) -> Result<(), Reply> {
        match reply {
            Reply::Done => Ok(()),
            other => Err(other),
        }
    }
}

impl Reply {
    /// The dispatch of a payment (or code request) this reply sends to its provider, if it is
    /// one: what a reservation answers.
    pub(crate) fn as_dispatch(&self) -> Option<&Dispatch> {
        match self {
            Reply::Settlement(SettlementReply::Payment(Payment::Dispatch(dispatch)))
            | Reply::Codes(CodesReply::Request(CodeRequest::Dispatch(dispatch))) => Some(dispatch),
            _ => None,
        }
    }

    /// [`Self::as_dispatch`], taken out; any other reply handed back as it is.
    pub(crate) fn into_dispatch(self) -> Result<Box<Dispatch>, Reply> {
        match self {
            Reply::Settlement(SettlementReply::Payment(Payment::Dispatch(dispatch)))
            | Reply::Codes(CodesReply::Request(CodeRequest::Dispatch(dispatch))) => Ok(dispatch),
            other => Err(other),
        }
    }

    /// The answer of type `T` the caller of a command or query expects: a refusal and a
    /// retry's in-flight answer as the engine's errors. A reply of any other kind is a bug (a
    /// flow handed another flow's answer): logged, and surfaced as stopped rather than
    /// panicking the caller. The one place a reply's kind is checked.
    pub(crate) fn into_flow<T: FlowReply>(self) -> Result<T, crate::EngineError> {
        use crate::EngineError;
        match self {
            Reply::Refused(reason) => Err(EngineError::Refused(reason)),
            Reply::InFlight => Err(EngineError::InFlight),
            reply => T::take(reply).map_err(|other| {
                tracing::error!(
                    reply = ?std::mem::discriminant(&other),
                    expected = std::any::type_name::<T>(),
                    "unexpected shard reply"
                );
                EngineError::Stopped
            }),
        }
    }
}

/// Defines a flow's reply enum, carried in the [`Reply`] variant named after `in`, with each
/// variant holding one type of its own; and makes the enum and each variant's type a
/// [`FlowReply`] that a [`Reply`] converts from, so that a flow's code builds and takes its
/// answers by type alone.
macro_rules! flow_reply {
    (
        $(#[$meta:meta])*
        pub(crate) enum $name:ident in $flow:ident {
            $( $(#[$vmeta:meta])* $variant:ident($payload:ty), )*
        }
    ) => {
        $(#[$meta])*
        #[derive(Debug, Clone)]
        pub(crate) enum $name {
            $( $(#[$vmeta])* $variant($payload), )*
        }

        impl From<$name> for $crate::shard::state::Reply {
            fn from(reply: $name) -> $crate::shard::state::Reply {
                $crate::shard::state::Reply::$flow(reply)
            }
        }

        impl $crate::shard::state::FlowReply for $name {
            fn take(
                reply: $crate::shard::state::Reply,
            ) -> Result<$name, $crate::shard::state::Reply> {
                match reply {
                    $crate::shard::state::Reply::$flow(reply) => Ok(reply),
                    other => Err(other),
                }
            }
        }

        $(
            impl From<$payload> for $crate::shard::state::Reply {
                fn from(payload: $payload) -> $crate::shard::state::Reply {
                    $crate::shard::state::Reply::$flow($name::$variant(payload))
                }
            }

            impl $crate::shard::state::FlowReply for $payload {
                fn take(
                    reply: $crate::shard::state::Reply,
                ) -> Result<$payload, $crate::shard::state::Reply> {
                    match reply {
                        $crate::shard::state::Reply::$flow($name::$variant(payload)) => {
                            Ok(payload)
                        }
                        other => Err(other),
                    }
                }
            }
        )*
    };
}

mod accounts;
mod age_registry;
mod codes;
mod money;
mod providers;
mod settled;
mod settlement;
mod stores;
mod wallet;

pub(crate) use accounts::{AccountsReply, AddedMeans, Credentials, IssuedKey};
pub(crate) use codes::{CodeCompletion, CodeRequest, CodeView, CodesReply, Delivery, Swept};
pub(crate) use money::{
    Acknowledged, CodeMoney, Journaled, Ledger, MoneyReply, Obligation, Owed, OwedView, PurseOf,
    Reference, RefundedCode, SettledPayment, VoidedCode,
};
pub(crate) use settled::{Kept, SettledStore};
pub(crate) use settlement::{Completion, Payment, SettlementReply};
pub(crate) use stores::StoresReply;
pub(crate) use wallet::WalletReply;

/// One shard's users, devices' replay state and idempotency records. The maps are
/// [`CowMap`]s, so that a snapshot takes them without stopping the shard for long.
pub(crate) struct ShardState {
    pub(crate) index: u8,
    /// Shared with a snapshot being written: a change copies the user first (`Arc::make_mut`).
    pub(crate) users: CowMap<UserKey, Arc<User>>,
    /// Age registrations of this shard's users' terminals, by card IDm (A1).
    pub(crate) ages: CowMap<Idm, AgeRegistration>,
    /// The stores of this shard's cells (W1).
    pub(crate) stores: StoreIndex,
    /// Payment codes this shard issued, by issue number (C2, T1's second tier).
    /// Shared with a snapshot being written: a change copies the record first.
    pub(crate) codes: CowMap<u64, Arc<CodeRecord>>,
    /// Issued codes by expiry, for the sweeper.
    pub(crate) code_expiry: std::collections::BTreeSet<(i64, u64)>,
    /// Coupons this shard issued, by issue number (C5).
    pub(crate) coupons: CowMap<u64, CouponRecord>,
    /// The last code or coupon sequence number used.
    pub(crate) code_seq: u64,
    pub(crate) idem: Idempotency,
    pub(crate) dispatch_seq: u64,
    pub(crate) shared: Shared,
    pub(crate) config: StateConfig,
    /// Providers whose terminal lists this shard changes (their snapshot lives here).
    pub(crate) owned_providers: std::collections::BTreeSet<u32>,
    /// Authorizations' references and the operations owed to providers (`state/money.rs`).
    pub(crate) money: Ledger,
    /// Settled payments that may be refunded (`REFUND` target 2), by their idempotency key
    /// (the paying user's hash and the payment's client request ID), until their refund
    /// window ends (`state/money.rs`, `state/settled.rs`).
    pub(crate) settled: SettledStore,
    /// The writes to the shared registries made by commands applied since they were last
    /// taken, while a replay hands them to a thread of its own ([`ShardState::defer_registry`]);
    /// `None` (the rule): each is made at once.
    pub(crate) deferred: Option<Vec<RegistryWrite>>,
    /// In a replay ([`ShardState::replay`]), the dispatch of the payment (or code request) the
    /// last command reserved, for a [`Command::Decided`] after it; none otherwise.
    pub(crate) dispatched: Option<Box<Dispatch>>,
}

/// A write a shard's command makes to a registry the shards share (the device index, the
/// vault). Nothing a command does reads them back (a command carries what it reads outside
/// its shard), so a replay may make them on another thread, in order, while it applies the
/// commands that follow.
pub(crate) enum RegistryWrite {
    /// A device's first key ([`DeviceIndex::provision_prepared`]).
    Provision { idm: Idm, user: UserKey, key: crate::keys::PreparedKey },
    /// A device's new key ([`DeviceIndex::rotate_prepared`]).
    Rotate { idm: Idm, key: crate::keys::PreparedKey, grace_until_ms: i64 },
    /// A card number sealed ([`Vault::store`]).
    Store { token: CardToken, sealed: Arc<SealedNumber> },
}

impl RegistryWrite {
    /// Makes the write.
    pub(crate) fn apply(self, shared: &Shared) {
        match self {
            RegistryWrite::Provision { idm, user, key } => {
                shared.devices.provision_prepared(idm, user, key)
            }
            RegistryWrite::Rotate { idm, key, grace_until_ms } => {
                shared.devices.rotate_prepared(&idm, key, grace_until_ms)
            }
            RegistryWrite::Store { token, sealed } => shared.vault.store(token, sealed),
        }
    }

    /// Makes the write now, or leaves it in `deferred` for whoever takes them.
    pub(crate) fn make(self, deferred: &mut Option<Vec<RegistryWrite>>, shared: &Shared) {
        match deferred {
            Some(writes) => writes.push(self),
            None => self.apply(shared),
        }
    }
}

impl ShardState {
    pub(crate) fn new(index: u8, shared: Shared, config: StateConfig) -> ShardState {
        ShardState {
            index,
            users: CowMap::new(CHUNK_BITS_LARGE),
            ages: CowMap::new(CHUNK_BITS_SMALL),
            stores: StoreIndex::default(),
            codes: CowMap::new(CHUNK_BITS_LARGE),
            code_expiry: std::collections::BTreeSet::new(),
            coupons: CowMap::new(CHUNK_BITS_SMALL),
            code_seq: 0,
            idem: Idempotency::new(config.idempotency_ttl_ms, config.idempotency_records_max),
            dispatch_seq: 0,
            shared,
            config,
            owned_providers: std::collections::BTreeSet::new(),
            money: Ledger::default(),
            settled: SettledStore::default(),
            deferred: None,
            dispatched: None,
        }
    }

    /// From now on, leaves the writes to the shared registries in [`ShardState::deferred`]
    /// (`true`), or makes them at once (`false`; none may be left).
    pub(crate) fn defer_registry(&mut self, defer: bool) {
        debug_assert!(self.deferred.as_ref().is_none_or(Vec::is_empty), "writes left behind");
        self.deferred = defer.then(Vec::new);
    }

    /// Applies a command, answering a retry from its idempotency record.
    pub(crate) fn apply(&mut self, envelope: Envelope) -> Reply {
        let Some(client_request_id) = envelope.client_request_id else {
            let key = (envelope.owner_hash, 0);
            return self.execute(envelope.command, envelope.now_ms, key, envelope.digest);
        };
        let key = (envelope.owner_hash, client_request_id);
        let idm = envelope.command.issued_key_idm();
        match self.idem.lookup(&self.shared.vault, &key, idm, envelope.digest, envelope.now_ms) {
            Seen::Same(retry) => {
                let code_request = matches!(envelope.command, Command::CodeReserve { .. });
                return retry.into_reply(code_request);
            }
            Seen::Conflict => return Reply::Refused(ReasonCode::IdempotencyConflict),
            Seen::New => {}
        }
        let reply = self.execute(envelope.command, envelope.now_ms, key, envelope.digest);
        let state = match reply.as_dispatch() {
            Some(dispatch) => {
                IdemState::Pending { user: dispatch.user.clone(), means_id: dispatch.means_id }
            }
            None => match IdemState::done(&reply) {
                Some(state) => state,
                None => {
                    // Not reached: every reply of a command with a client request ID is kept.
                    let kind = std::mem::discriminant(&reply);
                    tracing::error!(?kind, "a request's reply of a kind no record keeps");
                    return reply;
                }
            },
        };
        self.idem.insert(key, envelope.digest, state, envelope.now_ms);
        reply
    }

    /// Starts loading the idempotency record `envelope`'s command reads into the cache, without
    /// waiting for it: a request's by its ID, a completion's by the key of the reservation it
    /// completes (long out of the cache by then). Called for commands a few ahead of the one
    /// being applied, so that their cache misses overlap.
    pub(crate) fn prefetch(&self, envelope: &Envelope) {
        let key = match envelope {
            Envelope { owner_hash, client_request_id: Some(id), .. } => (*owner_hash, *id),
            Envelope {
                command: Command::AuthComplete { key, .. } | Command::CodeComplete { key, .. },
                ..
            } => *key,
            _ => return,
        };
        self.idem.prefetch(&key);
    }

    /// Answers a query.
    pub(crate) fn query(&self, query: Query) -> Reply {
        let unknown_user = Reply::Refused(ReasonCode::UnknownUser);
        match query {
            Query::Code { number } => match self.codes.get(&number) {
                Some(record) => Reply::from(CodeView {
                    state: Box::new(record.state.clone()),
                    terminal_id: record.merchant_terminal().to_owned(),
                }),
                None => Reply::Refused(ReasonCode::UnknownCode),
            },
            Query::Devices { user } => match self.users.get(&user) {
                Some(account) => {
                    Reply::from(account.devices.iter().map(|d| d.idm).collect::<Vec<_>>())
                }
                None => unknown_user,
            },
            Query::Means { user, now_ms } => match self.users.get(&user) {
                Some(account) => Reply::from(means_views(account, now_ms)),
                None => unknown_user,
            },
            Query::Credentials { user, now_ms } => match self.users.get(&user) {
                None => unknown_user,
                Some(account) if now_ms < account.locked_until_ms => {
                    Reply::Refused(ReasonCode::UserLocked)
                }
                Some(account) => {
                    Reply::from(Credentials { password_phc: account.password_phc.clone() })
                }
            },
            Query::NearestStores { position, max_chord } => {
                Reply::from(StoresReply::Nearest(self.stores.nearest(position, max_chord)))
            }
            Query::Store { store_id } => match self.stores.get(&store_id) {
                Some(store) => Reply::from(Box::new(store.clone())),
                None => Reply::Refused(ReasonCode::UnknownStore),
            },
            Query::Owed { limit } => Reply::from(self.owed_view(limit)),
        }
    }

    /// Applies `command`, for the idempotency record `key` of a request with `digest`.
    fn execute(&mut self, command: Command, now_ms: i64, key: IdemKey, digest: u64) -> Reply {
        match command {
            Command::Enroll { user, password_phc, idm, key: device_key, device_free } => {
                answer(self.enroll(user, password_phc, idm, device_key, device_free == Some(true)))
            }
            Command::ProvisionDevice { user, idm, key: device_key, device_free } => {
                answer(self.provision_device(user, idm, device_key, device_free == Some(true)))
            }
            Command::RotateDeviceKey { user, idm, key: device_key } => {
                let grace_until_ms = now_ms.saturating_add(self.config.key_grace_ms);
                answer(self.rotate_device_key(&user, idm, device_key, grace_until_ms))
            }
            Command::RevokeDeviceKey { user, idm, key: device_key } => {
                answer(self.rotate_device_key(&user, idm, device_key, REVOKED).map(|_| ()))
            }
            Command::AddMeans { user, means, make_default } => {
                answer(self.add_means(&user, means, make_default, now_ms))
            }
            Command::SetDefaultMeans { user, means_id } => {
                answer(self.set_default_means(&user, means_id))
            }
            Command::LoginAttempt { user, success } => {
                answer(self.login_attempt(&user, success, now_ms))
            }
            Command::AuthReserve { verified, basket, terminal } => {
                let terminal = terminal.unwrap_or_default();
                let idem_record = (key, digest);
                self.auth_reserve(verified, basket.as_deref(), &terminal, now_ms, idem_record)
                    .into()
            }
            Command::AuthComplete { key, digest, user, means_id, outcome, verdict } => {
                self.auth_complete(key, digest, &user, means_id, outcome, verdict, now_ms).into()
            }
            Command::RegisterAge { record, tag: _ } => answer(self.register_age(record, now_ms)),
            Command::SetAgePolicy { provider_code, terminal_id, policy } => {
                answer(self.set_age_policy(provider_code, &terminal_id, policy.as_ref()))
            }
            Command::UpsertStore { store, signals_free } => {
                answer(self.upsert_store(*store, signals_free == Some(true), now_ms))
            }
            Command::CodeReserve { verified, spec, terminal } => {
                let terminal = terminal.unwrap_or_default();
                self.code_reserve(verified, spec, &terminal, now_ms, (key, digest)).into()
            }
            Command::CodeComplete { key, digest, user, means_id, outcome, spec, terminal_id } => {
                self.code_complete(
                    key,
                    digest,
                    &user,
                    means_id,
                    outcome,
                    &spec,
                    terminal_id,
                    now_ms,
                )
                .into()
            }
            Command::RedeemCode { spec, policies } => {
                answer(self.redeem_code(&spec, &policies.unwrap_or_default(), now_ms))
            }
            Command::SweepCodes => {
                self.sweep_settled(now_ms);
                Swept(self.sweep_codes(now_ms)).into()
            }
            Command::NotifyDelivery { user, devices } => {
                if self.users.contains_key(&user) {
                    Delivery::Accepted(devices).into()
                } else {
                    Reply::Refused(ReasonCode::UnknownUser)
                }
            }
            Command::IssueCoupon { user, provider_code, effect, uses, expires_ms } => {
                answer(self.issue_coupon(user, provider_code, effect, uses, expires_ms))
            }
            Command::TopUp { user, means_id, amount_minor, currency } => {
                answer(self.top_up(&user, means_id, amount_minor, currency, now_ms))
            }
            Command::RemoveStore { store_id, moved } => match self.stores.remove(&store_id) {
                Some(_) if !moved => {
                    self.shared.stores.remove(&store_id);
                    Reply::Done
                }
                Some(_) => Reply::Done,
                None => Reply::Refused(ReasonCode::UnknownStore),
            },
            Command::RegisterTerminals { provider_code, terminals } => {
                answer(self.register_terminals(provider_code, terminals))
            }
            Command::Forwarded { operation_id, answer } => {
                self.forwarded(operation_id, &answer, now_ms);
                Reply::Done
            }
            Command::Abandoned { key, digest } => {
                let reference = self.answered(key, Some(digest));
                let timeout = AuthOutcome::Declined(ReasonCode::ProviderTimeout);
                self.reverse_unrecorded(reference, &timeout, false, now_ms);
                Reply::Done
            }
            Command::VoidCode { number, terminal_id } => {
                answer(self.void_code(number, |t| t == terminal_id, now_ms))
            }
            Command::RefundCode { number, amount_minor, terminal_id } => {
                let terminal = |t: &str| t == terminal_id;
                answer(self.refund_code(number, amount_minor, terminal, key, now_ms))
            }
            Command::RefundPayment { payment, amount_minor, terminal_id } => {
                let terminal = |t: &str| t == terminal_id;
                answer(self.refund_payment(payment, amount_minor, terminal, key, now_ms))
            }
            Command::RemoveTerminals { provider_code, terminal_ids } => {
                match self.shared.registry.provider(provider_code) {
                    Some(provider) => {
                        provider.remove_terminals(&terminal_ids);
                        Reply::Done
                    }
                    None => Reply::Refused(ReasonCode::UnknownProvider),
                }
            }
            // Only a replay holds a dispatch here: a live shard applies the completion itself.
            // A record with no reservation before it (not written by any build) changes nothing.
            Command::Decided { outcome } => match self.dispatched.take() {
                Some(dispatch) => self.apply(dispatch.completion(outcome, now_ms)),
                None => {
                    tracing::error!(
                        shard = self.index,
                        "a decided record with no reservation before it"
                    );
                    Reply::Refused(ReasonCode::ProviderTimeout)
                }
            },
        }
    }

    /// Applies a command read back from a log (recovery, a standby's stream, a restart cache):
    /// as [`Self::apply`], but the dispatch of a payment (or code request) it reserves is kept
    /// for a [`Command::Decided`] that may follow, as the live shard completed it in the same
    /// step, and not handed back.
    pub(crate) fn replay(&mut self, envelope: Envelope) -> Reply {
        let (dispatched, reply) = match self.apply(envelope).into_dispatch() {
            Ok(dispatch) => (Some(dispatch), Reply::Done),
            Err(reply) => (None, reply),
        };
        self.dispatched = dispatched;
        reply
    }

    /// Users held, idempotency records held (for metrics and tests).
    pub(crate) fn sizes(&self) -> (usize, usize) {
        (self.users.len(), self.idem.len())
    }
}

/// A flow's answer, or its refusal.
fn answer<T: Into<Reply>>(result: Result<T, ReasonCode>) -> Reply {
    match result {
        Ok(answer) => answer.into(),
        Err(reason) => Reply::Refused(reason),
    }
}

impl From<()> for Reply {
    fn from((): ()) -> Reply {
        Reply::Done
    }
}

fn means_views(account: &User, now_ms: i64) -> Vec<MeansView> {
    account
        .means
        .iter()
        .map(|m| MeansView {
            means_id: m.means_id,
            kind: m.kind,
            label: m.label.clone(),
            last4: m.number.as_ref().map(|n| String::from_utf8_lossy(&n.last4).into_owned()),
            token: m.number.as_ref().map(|n| n.token),
            is_default: account.default_means == Some(m.means_id),
            uses: m.uses,
            last_used_ms: m.last_used_ms,
            registered_ms: m.registered_ms,
            balance: m.purse.as_ref().map(|purse| balance_of(purse, now_ms)),
        })
        .collect()
}

fn balance_of(purse: &Purse, now_ms: i64) -> Balance {
    Balance {
        balance_minor: purse.balance_minor,
        available_minor: purse.available_minor(now_ms),
        currency: purse.currency,
    }
}
