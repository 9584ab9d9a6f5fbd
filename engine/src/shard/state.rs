//! A shard's state and the commands that change it: pure and deterministic, no I/O, no clock,
//! no randomness. Everything nondeterministic (time, keys, tokens) arrives inside the command,
//! so that a log of commands replays to the same state.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use settlegate_adapters::{AdapterError, AuthorizationRequest, DeclineReason, ProviderReply};

use rkyv::with::Map;

use super::archive::{CouponLeaf, Via};
use super::idempotency::{Completes, IdemKey, IdemState, Idempotency, Seen};
use super::replay::ReplayWindow;
use crate::age::{self, AgePolicy, AgeRecord, AgeRegistration, AgeRules, AgeVerdict, Basket};
use crate::codes::{issue_number, CodeKey, CodeKind, CodePayload, CouponEffect};
use crate::cow::{CowMap, CHUNK_BITS_LARGE, CHUNK_BITS_SMALL};
use crate::geo::{Candidate, Store, StoreDirectory, StoreIndex};
use crate::keys::{DeviceIndex, DeviceKey, SealedKeys, Verified, REVOKED};
use crate::limits::{
    BALANCE_MAX_MINOR, COUPON_USES_MAX, DEVICES_PER_USER_MAX, MEANS_PER_USER_MAX,
    STORES_PER_SHARD_MAX,
};
use crate::providers::{Registry, TerminalEntry};
use crate::types::{
    Approval, AuthCode, AuthOutcome, CardToken, ClientRequestId, Currency, Idm, MeansKind,
    ReasonCode, UserKey,
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
    /// by a crash does (an approval there must be reversed).
    pub(crate) fn completion_dropped(&self, dispatch: &Dispatch, outcome: &AuthOutcome) {
        self.completions_dropped.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(
            dispatch_id = dispatch.dispatch_id,
            provider = dispatch.provider_code,
            client_request_id = %dispatch.key.1,
            approved = matches!(outcome, AuthOutcome::Approved(_)),
            "a provider's completion found its idempotency record gone or replaced; its outcome \
             is dropped and the payment declined as a provider timeout (an approval must be \
             reversed, as after a crash)"
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
#[derive(Debug, Clone)]
pub(crate) struct NewMeans {
    pub(crate) kind: MeansKind,
    pub(crate) label: String,
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
    /// Keeps a sealed number, registering it with the vault (which opens it for adapters).
    pub(crate) fn kept(
        vault: &Vault,
        token: CardToken,
        last4: [u8; 4],
        sealed: SealedNumber,
    ) -> StoredNumber {
        let sealed = Arc::new(sealed);
        vault.store(token, Arc::clone(&sealed));
        StoredNumber { token, last4, sealed }
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
        }
    }

    /// The payment's outcome from the adapter's answer (a timeout or failure is a decline).
    pub(crate) fn outcome_of(&self, answer: Result<ProviderReply, AdapterError>) -> AuthOutcome {
        match answer {
            Ok(ProviderReply::Approved { auth_code }) => AuthOutcome::Approved(Approval {
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
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
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
    #[rkyv(with = Via<(u8, String)>)]
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
}

/// A payment code's record, kept by the shard that issued it (the second tier, T1).
#[derive(Debug, Clone, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub(crate) struct CodeRecord {
    #[rkyv(with = Via<(u8, String)>)]
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
    /// The store terminal whose merchant the code's state concerns: the one that redeemed it,
    /// or before that the one it was requested for.
    pub(crate) fn merchant_terminal(&self) -> &str {
        match &self.state {
            CodeState::Redeemed(redemption) => &redemption.terminal_id,
            CodeState::Issued | CodeState::Expired => &self.terminal_id,
        }
    }
}

/// A coupon issued to a user (C5).
#[derive(Debug, Clone, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub(crate) struct CouponRecord {
    #[rkyv(with = Via<(u8, String)>)]
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
    #[rkyv(with = Via<(u8, String)>)]
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
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) struct RedeemSpec {
    pub(crate) number: u64,
    pub(crate) amount_minor: u64,
    pub(crate) currency: Currency,
    pub(crate) terminal_id: String,
    pub(crate) sale_at_ms: i64,
    pub(crate) items: Vec<SaleLine>,
    /// The lines with their categories, for the age check (`items` is then empty).
    pub(crate) basket: Option<Basket>,
    pub(crate) coupon: Option<u64>,
    pub(crate) order_ref: String,
}

/// A state change. Applied only by the shard that owns it.
#[derive(Debug, Clone)]
pub(crate) enum Command {
    Enroll {
        user: UserKey,
        password_phc: String,
        idm: Idm,
        key: DeviceKey,
    },
    ProvisionDevice {
        user: UserKey,
        idm: Idm,
        key: DeviceKey,
    },
    RotateDeviceKey {
        user: UserKey,
        idm: Idm,
        key: DeviceKey,
    },
    /// Revokes a device's keys at once: `key` (given to nobody) replaces the current one,
    /// which is refused from then on, as is any rotated-out one.
    RevokeDeviceKey {
        user: UserKey,
        idm: Idm,
        key: DeviceKey,
    },
    AddMeans {
        user: UserKey,
        means: NewMeans,
        make_default: bool,
    },
    SetDefaultMeans {
        user: UserKey,
        means_id: u32,
    },
    LoginAttempt {
        user: UserKey,
        success: bool,
    },
    AuthReserve {
        verified: Verified,
        basket: Option<Box<Basket>>,
    },
    /// A provider's answer to the payment whose record is `key`'s with `digest` (none: read
    /// from a log older than format version 6, which names the key alone).
    AuthComplete {
        key: IdemKey,
        digest: Option<u64>,
        user: UserKey,
        means_id: u32,
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
    /// W1: adds or replaces a store in the shard owning its cell.
    UpsertStore {
        store: Box<Store>,
    },
    /// Loads a stored-value means.
    TopUp {
        user: UserKey,
        means_id: u32,
        amount_minor: u64,
        currency: Currency,
    },
    /// C1: checks a payment-code request like a payment and holds its amount.
    CodeReserve {
        verified: Verified,
        spec: Box<CodeSpec>,
    },
    /// C2: the provider's answer to a payment-code request: issue the code, or release.
    CodeComplete {
        key: IdemKey,
        /// As [`Command::AuthComplete`]'s.
        digest: Option<u64>,
        user: UserKey,
        means_id: u32,
        outcome: AuthOutcome,
        spec: Box<CodeSpec>,
        /// The store terminal of the request's inherent ID.
        terminal_id: String,
    },
    /// C3: a POS redeems a code.
    RedeemCode {
        spec: Box<RedeemSpec>,
    },
    /// Releases the holds of codes expired unused.
    SweepCodes,
    /// C4: a delivery notice accepted for `user`, then subscribed on `devices` of theirs (the
    /// engine publishes it on a first answer only: this command is what makes it idempotent).
    NotifyDelivery {
        user: UserKey,
        devices: u32,
    },
    /// C5: a coupon for a user.
    IssueCoupon {
        user: UserKey,
        provider_code: u32,
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
}

/// A command with its routing, idempotency and time context.
#[derive(Debug, Clone)]
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
}

/// What applying a command or answering a query gives.
#[derive(Debug, Clone)]
pub(crate) enum Reply {
    Ok,
    Refused(ReasonCode),
    KeyIssued {
        key_version: u16,
        key: DeviceKey,
    },
    MeansAdded {
        means_id: u32,
        last4: Option<[u8; 4]>,
    },
    Auth(AuthOutcome),
    /// The outcome of a payment made with a basket, and what its age check found.
    BasketAuth(AuthOutcome, Box<AgeVerdict>),
    Dispatch(Box<Dispatch>),
    /// A payment reserved and completed in one step, its provider having answered at once
    /// (`Shard::decide_now`): the outcome is recorded; the caller publishes its notice.
    Decided(Box<Dispatch>, AuthOutcome),
    /// A payment code requested and issued in one step, its provider having approved at once:
    /// the caller delivers it to its device.
    CodeDecided(Box<IssuedCode>),
    InFlight,
    /// A provider's completion whose idempotency record was gone or replaced: nothing was
    /// recorded but the release of its payment's hold; the payment stands declined as a
    /// provider timeout ([`Shared::completion_dropped`]).
    CompletionDropped,
    Means(Vec<MeansView>),
    Credentials {
        password_phc: String,
    },
    Stores(Vec<Candidate>),
    Balance(Balance),
    CodeIssued(Box<IssuedCode>),
    Redeemed(Box<Redemption>),
    /// A code's state, and the store terminal it concerns (`CodeRecord::merchant_terminal`).
    CodeState(Box<CodeState>, String),
    CouponIssued(Box<IssuedCoupon>),
    Swept(u32),
    Devices(Vec<Idm>),
    /// A delivery notice accepted now: publish it (it reached this many subscribed devices).
    DeliveryAccepted(u32),
    /// A delivery notice accepted before (a retry's answer): publish nothing.
    Delivered(u32),
}

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
        }
    }

    /// Applies a command, answering a retry from its idempotency record.
    pub(crate) fn apply(&mut self, envelope: Envelope) -> Reply {
        let Some(client_request_id) = envelope.client_request_id else {
            let key = (envelope.owner_hash, 0);
            return self.execute(envelope.command, envelope.now_ms, key, envelope.digest);
        };
        let key = (envelope.owner_hash, client_request_id);
        match self.idem.lookup(&self.shared.vault, &key, envelope.digest, envelope.now_ms) {
            Seen::Same(reply) => return reply,
            Seen::Conflict => return Reply::Refused(ReasonCode::IdempotencyConflict),
            Seen::New => {}
        }
        let reply = self.execute(envelope.command, envelope.now_ms, key, envelope.digest);
        let state = match &reply {
            Reply::Dispatch(dispatch) => {
                IdemState::Pending { user: dispatch.user.clone(), means_id: dispatch.means_id }
            }
            // Kept as delivered, so that a retry does not publish the notice again.
            Reply::DeliveryAccepted(devices) => IdemState::Done(Reply::Delivered(*devices)),
            done => IdemState::done(&self.shared.vault, key, done),
        };
        self.idem.insert(key, envelope.digest, state, envelope.now_ms);
        reply
    }

    /// Answers a query.
    pub(crate) fn query(&self, query: Query) -> Reply {
        match query {
            Query::Code { number } => match self.codes.get(&number) {
                Some(record) => Reply::CodeState(
                    Box::new(record.state.clone()),
                    record.merchant_terminal().to_owned(),
                ),
                None => Reply::Refused(ReasonCode::UnknownCode),
            },
            Query::Devices { user } => match self.users.get(&user) {
                Some(account) => Reply::Devices(account.devices.iter().map(|d| d.idm).collect()),
                None => Reply::Refused(ReasonCode::UnknownUser),
            },
            Query::Means { user, now_ms } => match self.users.get(&user) {
                Some(account) => Reply::Means(means_views(account, now_ms)),
                None => Reply::Refused(ReasonCode::UnknownUser),
            },
            Query::Credentials { user, now_ms } => match self.users.get(&user) {
                None => Reply::Refused(ReasonCode::UnknownUser),
                Some(account) if now_ms < account.locked_until_ms => {
                    Reply::Refused(ReasonCode::UserLocked)
                }
                Some(account) => Reply::Credentials { password_phc: account.password_phc.clone() },
            },
            Query::NearestStores { position, max_chord } => {
                Reply::Stores(self.stores.nearest(position, max_chord))
            }
            Query::Store { store_id } => match self.stores.get(&store_id) {
                Some(store) => Reply::Stores(vec![Candidate { store: store.clone(), chord: 0.0 }]),
                None => Reply::Refused(ReasonCode::UnknownStore),
            },
        }
    }

    /// Applies `command`, for the idempotency record `key` of a request with `digest`.
    fn execute(&mut self, command: Command, now_ms: i64, key: IdemKey, digest: u64) -> Reply {
        match command {
            Command::Enroll { user, password_phc, idm, key: device_key } => {
                self.enroll(user, password_phc, idm, device_key)
            }
            Command::ProvisionDevice { user, idm, key: device_key } => {
                self.provision_device(user, idm, device_key)
            }
            Command::RotateDeviceKey { user, idm, key: device_key } => {
                let grace_until_ms = now_ms.saturating_add(self.config.key_grace_ms);
                self.rotate_device_key(&user, idm, device_key, grace_until_ms)
            }
            Command::RevokeDeviceKey { user, idm, key: device_key } => {
                match self.rotate_device_key(&user, idm, device_key, REVOKED) {
                    Reply::KeyIssued { .. } => Reply::Ok,
                    refused => refused,
                }
            }
            Command::AddMeans { user, means, make_default } => {
                self.add_means(&user, means, make_default, now_ms)
            }
            Command::SetDefaultMeans { user, means_id } => self.set_default_means(&user, means_id),
            Command::LoginAttempt { user, success } => self.login_attempt(&user, success, now_ms),
            Command::AuthReserve { verified, basket } => {
                self.auth_reserve(verified, basket.as_deref(), now_ms, (key, digest))
            }
            Command::AuthComplete { key, digest, user, means_id, outcome, verdict } => {
                self.auth_complete(key, digest, &user, means_id, outcome, verdict, now_ms)
            }
            Command::RegisterAge { record, tag: _ } => self.register_age(record, now_ms),
            Command::SetAgePolicy { provider_code, terminal_id, policy } => {
                self.set_age_policy(provider_code, &terminal_id, policy.as_ref())
            }
            Command::UpsertStore { store } => self.upsert_store(*store, now_ms),
            Command::CodeReserve { verified, spec } => {
                self.code_reserve(verified, spec, now_ms, (key, digest))
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
            }
            Command::RedeemCode { spec } => self.redeem_code(&spec, now_ms),
            Command::SweepCodes => Reply::Swept(self.sweep_codes(now_ms)),
            Command::NotifyDelivery { user, devices } => {
                if self.users.contains_key(&user) {
                    Reply::DeliveryAccepted(devices)
                } else {
                    Reply::Refused(ReasonCode::UnknownUser)
                }
            }
            Command::IssueCoupon { user, provider_code, effect, uses, expires_ms } => {
                self.issue_coupon(user, provider_code, effect, uses, expires_ms)
            }
            Command::TopUp { user, means_id, amount_minor, currency } => {
                self.top_up(&user, means_id, amount_minor, currency, now_ms)
            }
            Command::RemoveStore { store_id, moved } => match self.stores.remove(&store_id) {
                Some(_) if !moved => {
                    self.shared.stores.remove(&store_id);
                    Reply::Ok
                }
                Some(_) => Reply::Ok,
                None => Reply::Refused(ReasonCode::UnknownStore),
            },
            Command::RegisterTerminals { provider_code, terminals } => {
                self.register_terminals(provider_code, terminals)
            }
            Command::RemoveTerminals { provider_code, terminal_ids } => {
                match self.shared.registry.provider(provider_code) {
                    Some(provider) => {
                        provider.remove_terminals(&terminal_ids);
                        Reply::Ok
                    }
                    None => Reply::Refused(ReasonCode::UnknownProvider),
                }
            }
        }
    }

    fn enroll(&mut self, user: UserKey, password_phc: String, idm: Idm, key: DeviceKey) -> Reply {
        if self.users.contains_key(&user) {
            return Reply::Refused(ReasonCode::UserExists);
        }
        if !self.shared.devices.provision(idm, user.clone(), 1, &key) {
            return Reply::Refused(ReasonCode::DeviceInUse);
        }
        let sealed = SealedKeys::first(&self.shared.vault, &idm, &key);
        let account = User {
            password_phc,
            devices: vec![Device { idm, key_version: 1, replay: ReplayWindow::default(), sealed }],
            means: Vec::new(),
            default_means: None,
            next_means_id: 1,
            failed_logins: 0,
            locked_until_ms: i64::MIN,
        };
        self.users.insert(user, Arc::new(account));
        Reply::KeyIssued { key_version: 1, key }
    }

    fn provision_device(&mut self, user: UserKey, idm: Idm, key: DeviceKey) -> Reply {
        let Some(account) = self.users.get_mut(&user).map(Arc::make_mut) else {
            return Reply::Refused(ReasonCode::UnknownUser);
        };
        if account.devices.len() >= DEVICES_PER_USER_MAX {
            return Reply::Refused(ReasonCode::TooManyDevices);
        }
        if !self.shared.devices.provision(idm, user, 1, &key) {
            return Reply::Refused(ReasonCode::DeviceInUse);
        }
        let sealed = SealedKeys::first(&self.shared.vault, &idm, &key);
        account.devices.push(Device {
            idm,
            key_version: 1,
            replay: ReplayWindow::default(),
            sealed,
        });
        Reply::KeyIssued { key_version: 1, key }
    }

    /// Replaces a device's key with `key`; the previous one is accepted until
    /// `grace_until_ms` ([`REVOKED`]: never again).
    fn rotate_device_key(
        &mut self,
        user: &UserKey,
        idm: Idm,
        key: DeviceKey,
        grace_until_ms: i64,
    ) -> Reply {
        let Some(account) = self.users.get_mut(user).map(Arc::make_mut) else {
            return Reply::Refused(ReasonCode::UnknownUser);
        };
        let Some(device) = account.devices.iter_mut().find(|d| d.idm == idm) else {
            return Reply::Refused(ReasonCode::UnknownDevice);
        };
        let Some(version) = device.key_version.checked_add(1) else {
            return Reply::Refused(ReasonCode::KeyVersionInvalid);
        };
        device.key_version = version;
        device.sealed =
            device.sealed.rotated(&self.shared.vault, &idm, version, &key, grace_until_ms);
        self.shared.devices.rotate(&idm, version, &key, grace_until_ms);
        Reply::KeyIssued { key_version: version, key }
    }

    fn add_means(
        &mut self,
        user: &UserKey,
        means: NewMeans,
        make_default: bool,
        now_ms: i64,
    ) -> Reply {
        let Some(account) = self.users.get_mut(user).map(Arc::make_mut) else {
            return Reply::Refused(ReasonCode::UnknownUser);
        };
        if account.means.len() >= MEANS_PER_USER_MAX {
            return Reply::Refused(ReasonCode::TooManyMeans);
        }
        let means_id = account.next_means_id;
        account.next_means_id += 1;
        let number = means.sealed.map(|(token, last4, sealed)| {
            StoredNumber::kept(&self.shared.vault, token, last4, sealed)
        });
        let last4 = number.as_ref().map(|n| n.last4);
        account.means.push(StoredMeans {
            means_id,
            kind: means.kind,
            label: means.label,
            number,
            uses: 0,
            last_used_ms: None,
            registered_ms: now_ms,
            purse: (means.kind == MeansKind::EMoney).then(Purse::default),
        });
        if make_default || account.default_means.is_none() {
            account.default_means = Some(means_id);
        }
        Reply::MeansAdded { means_id, last4 }
    }

    fn set_default_means(&mut self, user: &UserKey, means_id: u32) -> Reply {
        let Some(account) = self.users.get_mut(user).map(Arc::make_mut) else {
            return Reply::Refused(ReasonCode::UnknownUser);
        };
        if !account.means.iter().any(|m| m.means_id == means_id) {
            return Reply::Refused(ReasonCode::MeansNotRegistered);
        }
        account.default_means = Some(means_id);
        Reply::Ok
    }

    fn login_attempt(&mut self, user: &UserKey, success: bool, now_ms: i64) -> Reply {
        let Some(account) = self.users.get_mut(user).map(Arc::make_mut) else {
            return Reply::Refused(ReasonCode::UnknownUser);
        };
        if now_ms < account.locked_until_ms {
            return Reply::Refused(ReasonCode::UserLocked);
        }
        if success {
            account.failed_logins = 0;
            return Reply::Ok;
        }
        account.failed_logins += 1;
        if account.failed_logins >= self.config.login_failures_max {
            account.failed_logins = 0;
            account.locked_until_ms = now_ms.saturating_add(self.config.lockout_ms);
        }
        Reply::Refused(ReasonCode::WrongPassword)
    }

    /// Every check of an authorization that needs the user's state; on success, the nonce is
    /// consumed and the work is handed back for dispatch to the provider, for the payment's
    /// idempotency record: its key and its request's digest.
    fn auth_reserve(
        &mut self,
        verified: Verified,
        basket: Option<&Basket>,
        now_ms: i64,
        (key, digest): (IdemKey, u64),
    ) -> Reply {
        let record = verified.record;
        let declined = |reason| Reply::Auth(AuthOutcome::Declined(reason));
        let Some(account) = self.users.get_mut(&record.user).map(Arc::make_mut) else {
            return declined(ReasonCode::UnknownUser);
        };
        let Some(device) = account.devices.iter_mut().find(|d| d.idm == record.card_idm) else {
            return declined(ReasonCode::UserDeviceMismatch);
        };
        // Verified against the key index before this command was applied: a revocation (or two
        // rotations) applied since then refuses its key here.
        if !device.sealed.accepts(record.key_version) {
            return declined(ReasonCode::KeyVersionInvalid);
        }
        if (now_ms - record.timestamp_ms).abs() > self.config.timestamp_window_ms {
            return declined(ReasonCode::StaleTimestamp);
        }
        if !device.replay.fresh(record.counter) {
            return declined(ReasonCode::ReplayedNonce);
        }
        // From here on the nonce is spent, whatever the outcome.
        device.replay.record(record.counter);
        let means_id =
            if record.means_id == 0 { account.default_means.unwrap_or(0) } else { record.means_id };
        let Some(means_index) = account.means.iter().position(|m| m.means_id == means_id) else {
            return declined(ReasonCode::MeansNotRegistered);
        };
        let means = &account.means[means_index];
        if means.kind != record.means {
            return declined(ReasonCode::MeansMismatch);
        }
        let Some(provider) = self.shared.registry.provider(record.provider_code) else {
            return declined(ReasonCode::UnknownProvider);
        };
        let terminal_policy = provider.age_policy(&record.terminal_id);
        let policy = self.shared.age.policy_for(record.provider_code, terminal_policy.as_ref());
        let (amount_minor, verdict) = match basket {
            // A strict store checks item categories itself: a payment without items would
            // bypass that, so it must carry a basket.
            None if policy.policy.strict => return declined(ReasonCode::BasketMismatch),
            None => (record.amount_minor, None),
            Some(basket) => {
                let registration = self.ages.get(&record.card_idm);
                let decision = match age::decide(
                    basket,
                    record.amount_minor,
                    registration,
                    policy,
                    &self.shared.age.config,
                    now_ms,
                ) {
                    Ok(decision) => decision,
                    Err(reason) => return declined(reason),
                };
                if let Some(reason) = decision.decline {
                    let outcome = AuthOutcome::Declined(reason);
                    return Reply::BasketAuth(outcome, Box::new(decision.verdict));
                }
                (decision.verdict.amount_minor, Some(Box::new(decision.verdict)))
            }
        };
        let discount_minor = provider
            .active_service(&record.terminal_id, now_ms)
            .map_or(0, |service| service.discount.discount_minor(amount_minor, record.currency));
        assert!(discount_minor <= amount_minor, "discount above amount");
        let kind = means.kind;
        let card_token = means.number.as_ref().map(|n| n.token);
        if let Some(purse) = &mut account.means[means_index].purse {
            // Stored value: the payment's amount is held until its provider answers.
            let final_minor = amount_minor - discount_minor;
            if purse.currency.is_some_and(|c| c != record.currency) {
                return declined(ReasonCode::CurrencyMismatch);
            }
            if purse.available_minor(now_ms) < final_minor {
                return declined(ReasonCode::InsufficientBalance);
            }
            let hold = PurseHold {
                key,
                digest: Some(digest),
                amount_minor: final_minor,
                expires_ms: i64::MAX,
            };
            purse.holds.push(hold);
        }
        self.dispatch_seq += 1;
        Reply::Dispatch(Box::new(Dispatch {
            key,
            digest,
            user: record.user,
            dispatch_id: (u64::from(self.index) << 56) | self.dispatch_seq,
            provider_code: record.provider_code,
            means_id,
            means: kind,
            card_token,
            terminal_id: record.terminal_id,
            amount_requested_minor: amount_minor,
            discount_minor,
            currency: record.currency,
            verdict,
            code: None,
        }))
    }

    /// Records a provider's answer on the payment's own idempotency record, and settles its
    /// hold and usage. A completion whose record is gone or replaced (see
    /// [`Idempotency::complete`]) records nothing but the release of its own hold: the payment
    /// stands declined ([`Reply::CompletionDropped`]). One read from an older log, which names
    /// its record by key alone, settles the hold and usage as it did when it was written.
    #[allow(clippy::too_many_arguments)]
    fn auth_complete(
        &mut self,
        key: IdemKey,
        digest: Option<u64>,
        user: &UserKey,
        means_id: u32,
        outcome: AuthOutcome,
        verdict: Option<Box<AgeVerdict>>,
        now_ms: i64,
    ) -> Reply {
        let reply = match verdict {
            Some(verdict) => Reply::BasketAuth(outcome, verdict),
            None => Reply::Auth(outcome),
        };
        let of = completes(digest, user, means_id);
        let landed = self.idem.complete(&key, of, reply);
        let dropped = !landed && digest.is_some();
        let means = self
            .users
            .get_mut(user)
            .map(Arc::make_mut)
            .and_then(|account| account.means.iter_mut().find(|m| m.means_id == means_id));
        let Some(means) = means else {
            return if dropped { Reply::CompletionDropped } else { Reply::Ok };
        };
        let approved = !dropped && matches!(outcome, AuthOutcome::Approved(_));
        if let Some(purse) = &mut means.purse {
            // Release the payment's own hold; an approval turns it into a debit.
            if let Some(at) = purse.holds.iter().position(|hold| hold.is_of(key, digest)) {
                let amount = purse.holds.swap_remove(at).amount_minor;
                if approved {
                    purse.balance_minor = purse.balance_minor.saturating_sub(amount);
                }
            }
        }
        if dropped {
            return Reply::CompletionDropped;
        }
        if approved {
            means.uses += 1;
            means.last_used_ms = Some(now_ms);
        }
        Reply::Ok
    }

    /// A1: keeps a terminal's age registration, after the checks that need the user's state
    /// (the tag was verified before the command was made).
    fn register_age(&mut self, record: AgeRecord, now_ms: i64) -> Reply {
        let Some(account) = self.users.get_mut(&record.user).map(Arc::make_mut) else {
            return Reply::Refused(ReasonCode::UnknownUser);
        };
        let Some(device) = account.devices.iter_mut().find(|d| d.idm == record.card_idm) else {
            return Reply::Refused(ReasonCode::UserDeviceMismatch);
        };
        if (now_ms - record.timestamp_ms).abs() > self.config.timestamp_window_ms {
            return Reply::Refused(ReasonCode::StaleTimestamp);
        }
        if !device.replay.fresh(record.counter) {
            return Reply::Refused(ReasonCode::ReplayedNonce);
        }
        device.replay.record(record.counter);
        let validity_max_ms = self.shared.age.config.validity_max_ms();
        let too_long = record.valid_until_ms.saturating_sub(now_ms) > validity_max_ms;
        if too_long {
            return Reply::Refused(ReasonCode::InvalidAgeRegistration);
        }
        if let Err(reason) = record.validate(now_ms, self.config.timestamp_window_ms) {
            return Reply::Refused(reason);
        }
        self.ages.insert(
            record.card_idm,
            AgeRegistration {
                birth_date: record.birth_date,
                method: record.method,
                verified_at_ms: record.verified_at_ms,
                valid_until_ms: record.valid_until_ms,
            },
        );
        Reply::Ok
    }

    fn set_age_policy(
        &mut self,
        provider_code: u32,
        terminal_id: &str,
        policy: Option<&AgePolicy>,
    ) -> Reply {
        let Some(provider) = self.shared.registry.provider(provider_code) else {
            return Reply::Refused(ReasonCode::UnknownProvider);
        };
        let resolved = match policy.map(|p| self.shared.age.config.resolve(p)).transpose() {
            Ok(resolved) => resolved,
            Err(reason) => return Reply::Refused(reason),
        };
        self.owned_providers.insert(provider_code);
        match provider.set_age_policy(terminal_id, resolved) {
            Ok(()) => Reply::Ok,
            Err(reason) => Reply::Refused(reason),
        }
    }

    fn top_up(
        &mut self,
        user: &UserKey,
        means_id: u32,
        amount_minor: u64,
        currency: Currency,
        now_ms: i64,
    ) -> Reply {
        let Some(account) = self.users.get_mut(user).map(Arc::make_mut) else {
            return Reply::Refused(ReasonCode::UnknownUser);
        };
        let Some(means) = account.means.iter_mut().find(|m| m.means_id == means_id) else {
            return Reply::Refused(ReasonCode::MeansNotRegistered);
        };
        let Some(purse) = &mut means.purse else {
            return Reply::Refused(ReasonCode::NotStoredValue);
        };
        if purse.currency.is_some_and(|c| c != currency) {
            return Reply::Refused(ReasonCode::CurrencyMismatch);
        }
        let Some(balance) =
            purse.balance_minor.checked_add(amount_minor).filter(|b| *b <= BALANCE_MAX_MINOR)
        else {
            return Reply::Refused(ReasonCode::BalanceLimit);
        };
        purse.balance_minor = balance;
        purse.currency = Some(currency);
        Reply::Balance(balance_of(purse, now_ms))
    }

    /// C1: a payment-code request is checked exactly like a payment (device, counter, means,
    /// provider; a purse's amount held); the code itself is issued on the provider's approval.
    fn code_reserve(
        &mut self,
        verified: Verified,
        mut spec: Box<CodeSpec>,
        now_ms: i64,
        idem_record: (IdemKey, u64),
    ) -> Reply {
        let record = &verified.record;
        let requesting = record.card_idm;
        if let Some(target) = spec.deliver_to {
            let owns = self
                .users
                .get(&record.user)
                .is_some_and(|account| account.devices.iter().any(|d| d.idm == target));
            if !owns {
                return Reply::Auth(AuthOutcome::Declined(ReasonCode::UserDeviceMismatch));
            }
        }
        spec.deliver_to = Some(spec.deliver_to.unwrap_or(requesting));
        match self.auth_reserve(verified, None, now_ms, idem_record) {
            Reply::Dispatch(mut dispatch) => {
                dispatch.code = Some(spec);
                Reply::Dispatch(dispatch)
            }
            other => other,
        }
    }

    /// C2: on approval, issues the code: the purse's hold (stored value) now lasts until the
    /// code expires; otherwise releases, as a declined payment does.
    // The fields of `Command::CodeComplete`, as they come.
    #[allow(clippy::too_many_arguments)]
    fn code_complete(
        &mut self,
        key: IdemKey,
        digest: Option<u64>,
        user: &UserKey,
        means_id: u32,
        outcome: AuthOutcome,
        spec: &CodeSpec,
        terminal_id: String,
        now_ms: i64,
    ) -> Reply {
        let dropped =
            digest.is_some() && !self.idem.completes(&key, completes(digest, user, means_id));
        let approval = match outcome {
            AuthOutcome::Approved(approval) if !dropped => approval,
            // Released as a declined payment is, and answered the same way; no code is issued
            // for a completion whose record is gone.
            _ => {
                return match self.auth_complete(key, digest, user, means_id, outcome, None, now_ms)
                {
                    Reply::CompletionDropped => Reply::CompletionDropped,
                    _ => Reply::Auth(outcome),
                };
            }
        };
        self.code_seq += 1;
        let number = issue_number(self.index, self.code_seq);
        // Codes carry whole seconds.
        let expires_ms = (now_ms.saturating_add(spec.validity_ms) / 1000) * 1000;
        let means = self
            .users
            .get_mut(user)
            .map(Arc::make_mut)
            .and_then(|account| account.means.iter_mut().find(|m| m.means_id == means_id));
        if let Some(purse) = means.and_then(|means| means.purse.as_mut()) {
            if let Some(hold) = purse.holds.iter_mut().find(|hold| hold.is_of(key, digest)) {
                hold.key = code_hold_key(number);
                hold.digest = None;
                hold.expires_ms = expires_ms;
            }
        }
        let deliver_to = spec.deliver_to.unwrap_or_default();
        let record = CodeRecord {
            user: user.clone(),
            means_id,
            provider_code: approval.provider_code,
            amount_minor: approval.amount_final_minor,
            currency: approval.currency,
            expires_ms,
            auth_code: approval.auth_code,
            order_ref: spec.order_ref.clone(),
            deliver_to,
            state: CodeState::Issued,
            terminal_id,
        };
        let payload = CodePayload {
            kind: CodeKind::Payment,
            issuer: self.shared.code_issuer,
            number,
            value: record.amount_minor,
            currency: record.currency,
            expires_s: (expires_ms / 1000).clamp(0, i64::from(u32::MAX)) as u32,
            flags: 0,
        };
        let issued = IssuedCode {
            text: payload.seal(&self.shared.codes),
            number,
            amount_minor: record.amount_minor,
            currency: record.currency,
            expires_ms,
            deliver_to,
            user: user.clone(),
            order_ref: spec.order_ref.clone(),
        };
        self.code_expiry.insert((expires_ms, number));
        self.codes.insert(number, Arc::new(record));
        let reply = Reply::CodeIssued(Box::new(issued));
        self.idem.complete(&key, completes(digest, user, means_id), reply.clone());
        reply
    }

    /// C3: redeems a code at most once: checks it, applies a coupon, captures the sale (at most
    /// the authorized amount), releases the rest, debits a purse and records the remittance.
    fn redeem_code(&mut self, spec: &RedeemSpec, now_ms: i64) -> Reply {
        let refuse = |reason| Reply::Refused(reason);
        let Some(record) = self.codes.get(&spec.number) else {
            return refuse(ReasonCode::UnknownCode);
        };
        match record.state {
            CodeState::Redeemed(_) => return refuse(ReasonCode::CodeRedeemed),
            CodeState::Expired => return refuse(ReasonCode::CodeExpired),
            CodeState::Issued => {}
        }
        if now_ms >= record.expires_ms {
            self.expire_code(spec.number);
            return refuse(ReasonCode::CodeExpired);
        }
        let order_ok = record.order_ref.is_empty() || record.order_ref == spec.order_ref;
        if spec.currency != record.currency || !order_ok {
            return refuse(ReasonCode::CodeMismatch);
        }
        let (sale_minor, items) = match self.age_check_sale(spec, record, now_ms) {
            Ok(sale) => sale,
            Err(reason) => return refuse(reason),
        };
        let discount_minor = match spec.coupon {
            None => 0,
            Some(coupon) => match self.coupons.get(&coupon) {
                None => return refuse(ReasonCode::UnknownCode),
                Some(c) if c.user != record.user => return refuse(ReasonCode::CouponNotApplicable),
                Some(c) if now_ms >= c.expires_ms => return refuse(ReasonCode::CodeExpired),
                Some(c) if c.uses_left == 0 => return refuse(ReasonCode::CouponUsedUp),
                Some(c) => c.effect.discount_minor(sale_minor, spec.currency),
            },
        };
        let captured_minor = sale_minor - discount_minor;
        if captured_minor > record.amount_minor {
            return refuse(ReasonCode::AmountAboveAuthorized);
        }
        // Every check passed: commit.
        if let Some(coupon) = spec.coupon.and_then(|c| self.coupons.get_mut(&c)) {
            coupon.uses_left -= 1;
        }
        let record = self.codes.get_mut(&spec.number).map(Arc::make_mut).expect("checked above");
        let redemption = Redemption {
            number: spec.number,
            captured_minor,
            released_minor: record.amount_minor - captured_minor,
            coupon_discount_minor: discount_minor,
            currency: record.currency,
            terminal_id: spec.terminal_id.clone(),
            provider_code: record.provider_code,
            auth_code: record.auth_code,
            sale_at_ms: spec.sale_at_ms,
            redeemed_at_ms: now_ms,
            items,
        };
        record.state = CodeState::Redeemed(Box::new(redemption.clone()));
        let (user, means_id, expires_ms) =
            (record.user.clone(), record.means_id, record.expires_ms);
        self.code_expiry.remove(&(expires_ms, spec.number));
        let means = self
            .users
            .get_mut(&user)
            .map(Arc::make_mut)
            .and_then(|account| account.means.iter_mut().find(|m| m.means_id == means_id));
        if let Some(means) = means {
            if let Some(purse) = &mut means.purse {
                purse.holds.retain(|hold| hold.key != code_hold_key(spec.number));
                purse.balance_minor = purse.balance_minor.saturating_sub(captured_minor);
            }
            means.uses += 1;
            means.last_used_ms = Some(now_ms);
        }
        Reply::Redeemed(Box::new(redemption))
    }

    /// A2 on a code payment: the sale's amount and lines to settle, after the age check of its
    /// basket against the registration of the device the code was delivered to, under the
    /// store terminal's policy; or why the redemption is refused. Without a basket the sale is
    /// settled as sent, except at a strict store, which cannot check a sale without items.
    fn age_check_sale(
        &self,
        spec: &RedeemSpec,
        code: &CodeRecord,
        now_ms: i64,
    ) -> Result<(u64, Vec<SaleLine>), ReasonCode> {
        let provider = self.shared.registry.provider(code.provider_code);
        let terminal_policy = provider.and_then(|p| p.age_policy(&spec.terminal_id));
        let policy = self.shared.age.policy_for(code.provider_code, terminal_policy.as_ref());
        let Some(basket) = &spec.basket else {
            if policy.policy.strict {
                return Err(ReasonCode::BasketMismatch);
            }
            return Ok((spec.amount_minor, spec.items.clone()));
        };
        let decision = age::decide(
            basket,
            spec.amount_minor,
            self.ages.get(&code.deliver_to),
            policy,
            &self.shared.age.config,
            now_ms,
        )?;
        if let Some(reason) = decision.decline {
            return Err(reason);
        }
        // Under `remove_items` the verdict names the lines taken out; otherwise it names none.
        let removed = &decision.verdict.items;
        let items = basket
            .items
            .iter()
            .filter(|item| !removed.contains(&item.item_id))
            .map(|item| (item.item_id.clone(), item.quantity, item.unit_amount_minor))
            .collect();
        Ok((decision.verdict.amount_minor, items))
    }

    /// Marks an issued code expired and releases its hold.
    fn expire_code(&mut self, number: u64) {
        let Some(record) = self.codes.get_mut(&number).map(Arc::make_mut) else { return };
        if record.state != CodeState::Issued {
            return;
        }
        record.state = CodeState::Expired;
        self.code_expiry.remove(&(record.expires_ms, number));
        let (user, means_id) = (record.user.clone(), record.means_id);
        let purse = self
            .users
            .get_mut(&user)
            .map(Arc::make_mut)
            .and_then(|account| account.means.iter_mut().find(|m| m.means_id == means_id))
            .and_then(|means| means.purse.as_mut());
        if let Some(purse) = purse {
            purse.holds.retain(|hold| hold.key != code_hold_key(number));
        }
    }

    /// Expires every code past its expiry at `now_ms`, releasing its hold; returns how many.
    fn sweep_codes(&mut self, now_ms: i64) -> u32 {
        let due: Vec<u64> =
            self.code_expiry.range(..=(now_ms, u64::MAX)).map(|&(_, number)| number).collect();
        for &number in &due {
            self.expire_code(number);
        }
        due.len() as u32
    }

    /// C5: a coupon for one user, kept in the user's shard so that it applies in the same
    /// shard as the user's payment codes.
    fn issue_coupon(
        &mut self,
        user: UserKey,
        provider_code: u32,
        effect: CouponEffect,
        uses: u32,
        expires_ms: i64,
    ) -> Reply {
        if !self.users.contains_key(&user) {
            return Reply::Refused(ReasonCode::UnknownUser);
        }
        if !effect.valid() || !(1..=COUPON_USES_MAX).contains(&uses) {
            return Reply::Refused(ReasonCode::InvalidCoupon);
        }
        self.code_seq += 1;
        let number = issue_number(self.index, self.code_seq);
        let expires_ms = (expires_ms / 1000) * 1000;
        let expires_s = (expires_ms / 1000).clamp(0, i64::from(u32::MAX)) as u32;
        let text = CodePayload::coupon(self.shared.code_issuer, number, effect, expires_s)
            .seal(&self.shared.codes);
        let record =
            CouponRecord { user: user.clone(), provider_code, effect, uses_left: uses, expires_ms };
        self.coupons.insert(number, record);
        Reply::CouponIssued(Box::new(IssuedCoupon { text, number, user, effect, uses, expires_ms }))
    }

    fn upsert_store(&mut self, store: Store, now_ms: i64) -> Reply {
        if self.stores.get(&store.store_id).is_none() && self.stores.len() >= STORES_PER_SHARD_MAX {
            return Reply::Refused(ReasonCode::TooManyStores);
        }
        if !self.shared.stores.signals_free(&store) {
            return Reply::Refused(ReasonCode::StoreIdInUse);
        }
        self.shared.stores.set(&store, now_ms);
        self.stores.upsert(store, now_ms);
        Reply::Ok
    }

    fn register_terminals(&mut self, provider_code: u32, terminals: Vec<TerminalEntry>) -> Reply {
        let Some(provider) = self.shared.registry.provider(provider_code) else {
            return Reply::Refused(ReasonCode::UnknownProvider);
        };
        self.owned_providers.insert(provider_code);
        match provider.register_terminals(terminals) {
            Ok(()) => Reply::Ok,
            Err(reason) => Reply::Refused(reason),
        }
    }

    /// Completes every authorization left with its provider when the engine stopped: the
    /// outcome is unknown, so it is declined as a provider timeout (an adapter that can reverse
    /// must reverse these dispatches). Returns the applied completions, for the log.
    pub(crate) fn resolve_pending(&mut self, now_ms: i64) -> Vec<Envelope> {
        let mut applied = Vec::new();
        for (key, digest, user, means_id) in self.idem.pending() {
            let envelope = Envelope {
                owner_hash: key.0,
                client_request_id: None,
                digest: 0,
                now_ms,
                command: Command::AuthComplete {
                    key,
                    digest: Some(digest),
                    user,
                    means_id,
                    outcome: AuthOutcome::Declined(ReasonCode::ProviderTimeout),
                    verdict: None,
                },
            };
            self.apply(envelope.clone());
            applied.push(envelope);
        }
        applied
    }

    /// The vault (to seal secrets on their way to the log).
    pub(crate) fn vault(&self) -> &Vault {
        &self.shared.vault
    }

    /// Users held, idempotency records held (for metrics and tests).
    pub(crate) fn sizes(&self) -> (usize, usize) {
        (self.users.len(), self.idem.len())
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
