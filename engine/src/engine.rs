//! The engine handle: starts the shard actors and offers every operation as an async call.
//!
//! A request's path: stateless checks (decode, keyed-hash verification, batched across cores)
//! on the caller's side, then the owning shard's checks and state change, then the provider
//! adapter, then the shard again to record the outcome, then the user's notice stream.

use std::hash::{Hash, Hasher};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use actix::dev::SendError;
use futures::future::join_all;
use rustc_hash::FxHasher;
use tokio::sync::{broadcast, oneshot};
use tokio::time::Instant;

use crate::age::{AgePolicy, AgeRecord, AgeRules, AgeVerdict, Basket};
use crate::clock::{Clock, SystemClock};
use crate::codes::{self, CodeKey, CodeKind, CodePayload, CouponEffect};
use crate::config::EngineConfig;
use crate::error::EngineError;
use crate::geo::{self, AcceptedMethod, Candidate, Signal, Store, StoreDirectory};
use crate::keys::{DeviceIndex, DeviceKey, Verified};
use crate::limits::STORE_RADIUS_MAX_M;
use crate::limits::{BATCH_SIZE_MAX, VERIFY_PARALLEL_MIN};
use crate::limits::{
    CODE_VALIDITY_MAX_MS, CODE_VALIDITY_MIN_MS, COUPON_USERS_MAX, ORDER_REF_LEN_MAX, SALE_ITEMS_MAX,
};
use crate::means::MeansInput;
use crate::notices::{DeliveryNotice, DeviceMessage};
use crate::notices::{Notice, Notices};
use crate::password::PasswordHasher;
use crate::providers::{Registry, TerminalConfirmation, TerminalEntry};
use crate::shard::state::{
    terminal_policies, Balance, CodeSpec, CodeState, Dispatch, IssuedCode, IssuedCoupon, MeansView,
    RedeemSpec, Redemption, Shared, StateConfig, TerminalContext,
};
use crate::shard::{Batch, Command, Digest, Envelope, Op, Query, Reply, ShardHandle, Sizes, Turn};
use crate::startup::{build_registry, recover_shards, start_shards, stop_runtime, ActorRuntime};
use crate::types::{AuthOutcome, ClientRequestId, Currency, Idm, ReasonCode, UserKey};
use crate::vault::Vault;

/// A settlement request: the signed inherent ID exactly as the user terminal built it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuthorizeRequest {
    /// Makes retries safe: the same ID and bytes always get the first outcome.
    pub client_request_id: ClientRequestId,
    /// The signed inherent ID (see [`crate::InherentId`]).
    pub inherent_id: Vec<u8>,
}

/// The outcome of a payment made with a basket (A2): the authorization outcome, and what the
/// age check found when the shard got as far as checking it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BasketOutcome {
    /// Approved or declined.
    pub outcome: AuthOutcome,
    /// The basket's verdict; `None` when the payment was declined before the basket was
    /// looked at (a forged tag, a replay, an unknown means...).
    pub verdict: Option<AgeVerdict>,
}

/// The store a device is in (W2), and how it was found.
#[derive(Debug, Clone, PartialEq)]
pub struct EnteredStore {
    /// The store.
    pub store: Store,
    /// Great-circle distance from the point, metres, when found by position.
    pub distance_m: Option<f64>,
    /// Other stores at exactly the same distance (the store chosen is the lowest ID).
    pub tied: Vec<String>,
    /// The networks an EMVCo merchant-presented poster names (tags 26–51), when found by one.
    pub qr_networks: Vec<String>,
}

/// How the single best usable method is chosen (W3).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum BestBy {
    /// The most used (then the most recently used, then the oldest).
    #[default]
    MostUsed,
    /// The stored-value method with the largest available balance; when no usable method
    /// keeps a balance, the most used.
    LargestBalance,
}

/// One of the user's methods at a store (W3).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MethodAtStore {
    /// The method, with its balance, uses and last use.
    pub means: MeansView,
    /// Whether the store accepts it (and, for stored value, whether it has a balance).
    pub usable: bool,
}

/// What a user can pay with at a store (W3).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UsableMethods {
    /// The store.
    pub store_id: String,
    /// Every registered method, marked usable or not.
    pub methods: Vec<MethodAtStore>,
    /// The best usable method by the asked policy, if any is usable.
    pub best: Option<u32>,
    /// When nothing is usable: the methods the store accepts, to suggest registering one.
    pub accepted: Vec<AcceptedMethod>,
}

/// A payment-code request (C1–C2, C4): the user terminal's signed inherent ID (its store
/// terminal may be `*`: any store) for the amount, means and provider; how long the code is
/// valid; where to deliver it; and, for cash on delivery, the order it pays for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IssueCodeRequest {
    /// Idempotency key.
    pub client_request_id: ClientRequestId,
    /// The signed inherent ID.
    pub inherent_id: Vec<u8>,
    /// Validity of the code and its hold, ms (10 s to 7 days).
    pub validity_ms: i64,
    /// Another device of the user's to deliver the code to; `None`: the requesting device.
    pub deliver_to: Option<Idm>,
    /// The order a cash-on-delivery code pays for (at most 32 bytes); empty for none.
    pub order_ref: String,
}

/// The answer to a payment-code request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CodeOutcome {
    /// Authorized and held; the code issued.
    Issued(Box<IssuedCode>),
    /// Declined, with the reason (as a payment would be).
    Declined(ReasonCode),
}

/// A POS redeeming a code with its sales information (C3, C4).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RedeemRequest {
    /// Idempotency key.
    pub client_request_id: ClientRequestId,
    /// The code as read.
    pub code: String,
    /// The issuer the POS expects (the number printed beside the barcode).
    pub issuer: u16,
    /// The issue number the POS expects.
    pub number: u64,
    /// The sale's amount before any coupon.
    pub amount_minor: u64,
    /// The sale's currency.
    pub currency: Currency,
    /// The sale's date-time, ms since the epoch.
    pub sale_at_ms: i64,
    /// The store terminal (or courier handheld) redeeming it.
    pub terminal_id: String,
    /// Lines sold: item ID (1..=32 bytes of 0x21–0x7E, as in a basket), quantity, unit
    /// amount. Empty when `basket` carries them.
    pub items: Vec<(String, u32, u64)>,
    /// The lines sold with their categories, for the age check of a code payment (A2,
    /// `REDEEM_CODE_BASKET`): checked against the age registration of the device the code was
    /// delivered to. When set, `items` is empty and the redemption's items are the lines
    /// settled (those the age check did not remove).
    pub basket: Option<Basket>,
    /// A coupon to apply in the same settlement (C5), as read.
    pub coupon: Option<String>,
    /// The order a cash-on-delivery code pays for.
    pub order_ref: String,
}

/// One usable-methods query (W3).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UsableQuery {
    /// The user.
    pub user: UserKey,
    /// The store the user is in.
    pub store_id: String,
    /// How to choose the best method.
    pub best_by: BestBy,
}

/// Which query a lookup answers, and whether it is the query's means (else its store).
type Lookup = (usize, bool);

/// Marks each of the user's methods usable or not at `store` and picks the best.
fn usable_at(store: Store, means: Vec<MeansView>, best_by: BestBy) -> UsableMethods {
    let methods: Vec<MethodAtStore> = means
        .into_iter()
        .map(|means| {
            let accepted = store.accepts.iter().any(|a| a.accepts(means.kind, &means.label));
            let funded = means.balance.is_none_or(|b| b.available_minor > 0);
            MethodAtStore { usable: accepted && funded, means }
        })
        .collect();
    let usable = || methods.iter().filter(|m| m.usable).map(|m| &m.means);
    let most_used = usable()
        .max_by(|a, b| {
            (a.uses, a.last_used_ms)
                .cmp(&(b.uses, b.last_used_ms))
                .then(b.means_id.cmp(&a.means_id))
        })
        .map(|m| m.means_id);
    let best = match best_by {
        BestBy::MostUsed => most_used,
        BestBy::LargestBalance => usable()
            .filter_map(|m| Some((m.balance?.available_minor, m.means_id)))
            .max_by(|a, b| a.0.cmp(&b.0).then(b.1.cmp(&a.1)))
            .map(|(_, id)| id)
            .or(most_used),
    };
    let accepted = if best.is_none() { store.accepts.clone() } else { Vec::new() };
    UsableMethods { store_id: store.store_id, methods, best, accepted }
}

/// Enrollment of a new user with their first device (G1).
#[derive(Clone)]
pub struct EnrollRequest {
    /// Idempotency key.
    pub client_request_id: ClientRequestId,
    /// The user.
    pub user: UserKey,
    /// The password; hashed with Argon2id, never stored or logged in the clear.
    pub password: String,
    /// The card IDm of the user's terminal.
    pub card_idm: Idm,
}

impl std::fmt::Debug for EnrollRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EnrollRequest")
            .field("client_request_id", &self.client_request_id)
            .field("user", &self.user)
            .field("password", &"<redacted>")
            .field("card_idm", &hex::encode(self.card_idm))
            .finish()
    }
}

/// A device key handed out at provisioning or rotation. Give it to the device, then drop it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceCredential {
    /// The device.
    pub card_idm: Idm,
    /// Version to put in inherent IDs signed with this key.
    pub key_version: u16,
    /// The key.
    pub device_key: DeviceKey,
}

/// A registered means.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MeansAdded {
    /// The new means' ID within the user.
    pub means_id: u32,
    /// Last four digits of its card or account number, if it has one.
    pub last4: Option<String>,
}

/// The order of a means listing (C1).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum MeansOrder {
    /// Oldest registration first.
    #[default]
    Registration,
    /// Most used first.
    Frequency,
    /// Most recently used first; never-used last.
    Recency,
}

struct Inner {
    shards: Vec<ShardHandle>,
    shared: Shared,
    notices: Notices,
    clock: Arc<dyn Clock>,
    hasher: PasswordHasher,
    /// A PHC string verified against when the user is unknown, so a login for an unknown
    /// user takes as long as one for a known user (no user enumeration by timing).
    dummy_phc: String,
    config: EngineConfig,
    runtime: Mutex<Option<ActorRuntime>>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        stop_runtime(&self.runtime, &self.shards);
    }
}

/// The embeddable engine. Cheap to clone; all clones share one set of shards.
///
/// Its async methods need a Tokio runtime (timers bound provider calls; password hashing runs
/// on Tokio's blocking pool). The shard actors run on their own threads.
#[derive(Clone)]
pub struct Engine {
    inner: Arc<Inner>,
}

impl Engine {
    /// Starts an engine on the system clock.
    pub fn start(config: EngineConfig) -> Result<Engine, EngineError> {
        Engine::start_with_clock(config, Arc::new(SystemClock))
    }

    /// Starts an engine reading time from `clock`.
    pub fn start_with_clock(
        config: EngineConfig,
        clock: Arc<dyn Clock>,
    ) -> Result<Engine, EngineError> {
        Engine::start_with(config, clock, Vec::new())
    }

    /// Test hook: starts an engine whose providers named in `adapters` are served by the
    /// adapter given there instead of the one their config names (a test's provider that
    /// answers when the test says).
    #[cfg(feature = "test-hooks")]
    pub fn start_with_adapters(
        config: EngineConfig,
        clock: Arc<dyn Clock>,
        adapters: Vec<(u32, Arc<dyn settlegate_adapters::ProviderAdapter>)>,
    ) -> Result<Engine, EngineError> {
        Engine::start_with(config, clock, adapters)
    }

    fn start_with(
        config: EngineConfig,
        clock: Arc<dyn Clock>,
        adapters: Vec<(u32, Arc<dyn settlegate_adapters::ProviderAdapter>)>,
    ) -> Result<Engine, EngineError> {
        let (shared, state_config, hasher) = prepare(&config, adapters)?;
        let prepared = recover_shards(&config, &shared, state_config, clock.now_ms())?;
        let (shards, runtime) = start_shards(&config, prepared)?;
        let dummy_phc = hasher.hash("settlegate-timing-equalizer");
        Ok(Engine {
            inner: Arc::new(Inner {
                shards,
                shared,
                notices: Notices::default(),
                clock,
                hasher,
                dummy_phc,
                config,
                runtime: Mutex::new(Some(runtime)),
            }),
        })
    }

    /// Stops the shard actors. Requests after this fail with [`EngineError::Stopped`].
    pub fn shutdown(&self) {
        stop_runtime(&self.inner.runtime, &self.inner.shards);
    }

    /// The shards that take no more work: stopped (after [`Engine::shutdown`]), or whose log
    /// writer failed (a write or sync error: nothing more may be acknowledged). A server is
    /// ready only while this is empty. A shard that panics is not listed for long: the process
    /// aborts (see `docs/ARCHITECTURE.md`, "Failing fast").
    pub fn unavailable_shards(&self) -> Vec<usize> {
        (0..self.inner.shards.len()).filter(|&i| !self.inner.shards[i].is_available()).collect()
    }

    /// Number of shards.
    pub fn shard_count(&self) -> usize {
        self.inner.shards.len()
    }

    /// The config in force.
    pub fn config(&self) -> &EngineConfig {
        &self.inner.config
    }

    /// The providers.
    pub fn registry(&self) -> &Registry {
        &self.inner.shared.registry
    }

    /// The device key index (batch tag verification without the rest of the path).
    pub fn devices(&self) -> &DeviceIndex {
        &self.inner.shared.devices
    }

    /// The card vault (for adapters that must detokenize).
    pub fn vault(&self) -> &Arc<Vault> {
        &self.inner.shared.vault
    }

    /// The engine's clock reading.
    pub fn now_ms(&self) -> i64 {
        self.inner.clock.now_ms()
    }

    // ---- G1: accounts -------------------------------------------------------------------

    /// Enrolls a user with a password and their first device; returns the device key.
    pub async fn enroll(&self, request: EnrollRequest) -> Result<DeviceCredential, EngineError> {
        PasswordHasher::policy_check(&request.password).map_err(EngineError::Refused)?;
        let hasher = self.inner.hasher.clone();
        let password = zeroize::Zeroizing::new(request.password);
        let password_phc = tokio::task::spawn_blocking(move || hasher.hash(&password))
            .await
            .map_err(|_| EngineError::Stopped)?;
        let digest = digest_of(&("enroll", &request.user, request.card_idm));
        let claim = self.claim_device(request.card_idm, &request.user);
        let command = Command::Enroll {
            user: request.user.clone(),
            password_phc,
            idm: request.card_idm,
            key: DeviceKey::random(),
            device_free: Some(claim.won),
        };
        let reply =
            self.apply_for_user(&request.user, Some(request.client_request_id), digest, command);
        credential_from(claim.held_over(reply).await?, request.card_idm)
    }

    /// Provisions another device for a user, after checking their password.
    pub async fn provision_device(
        &self,
        client_request_id: ClientRequestId,
        user: &UserKey,
        password: &str,
        card_idm: Idm,
    ) -> Result<DeviceCredential, EngineError> {
        self.login(user, password).await?;
        let digest = digest_of(&("provision", user, card_idm));
        let claim = self.claim_device(card_idm, user);
        let command = Command::ProvisionDevice {
            user: user.clone(),
            idm: card_idm,
            key: DeviceKey::random(),
            device_free: Some(claim.won),
        };
        let reply = self.apply_for_user(user, Some(client_request_id), digest, command);
        credential_from(claim.held_over(reply).await?, card_idm)
    }

    /// Replaces a device's key, after checking the user's password. The previous key stays
    /// valid for `key_grace_ms`.
    pub async fn rotate_device_key(
        &self,
        client_request_id: ClientRequestId,
        user: &UserKey,
        password: &str,
        card_idm: Idm,
    ) -> Result<DeviceCredential, EngineError> {
        self.login(user, password).await?;
        let digest = digest_of(&("rotate", user, card_idm));
        let command = Command::RotateDeviceKey {
            user: user.clone(),
            idm: card_idm,
            key: DeviceKey::random(),
        };
        let reply = self.apply_for_user(user, Some(client_request_id), digest, command).await?;
        credential_from(reply, card_idm)
    }

    /// Revokes every key of a user's device at once, after checking the user's password: for a
    /// lost or stolen device. Its current key and any rotated-out key still in its grace window
    /// are refused from then on (reason `KeyVersionInvalid`), durably; the device stays the
    /// user's, and `rotate_device_key` gives it a new key if it is found again.
    pub async fn revoke_device_key(
        &self,
        client_request_id: ClientRequestId,
        user: &UserKey,
        password: &str,
        card_idm: Idm,
    ) -> Result<(), EngineError> {
        self.login(user, password).await?;
        let digest = digest_of(&("revoke", user, card_idm));
        // The device's key from now on: one nobody is given, so nothing it signs verifies.
        let command = Command::RevokeDeviceKey {
            user: user.clone(),
            idm: card_idm,
            key: DeviceKey::random(),
        };
        match self.apply_for_user(user, Some(client_request_id), digest, command).await? {
            Reply::Ok => Ok(()),
            other => Err(unexpected(other)),
        }
    }

    /// Checks a password. Too many consecutive failures lock the account for `lockout_ms`.
    ///
    /// An unknown user is answered exactly as a wrong password (`WrongPassword`), after the
    /// same work: a verification against a dummy hash, and a logged login attempt through the
    /// user's shard (which finds no user), so that neither the answer nor its timing tells
    /// which users exist. Every operation that takes a password checks it here.
    pub async fn login(&self, user: &UserKey, password: &str) -> Result<(), EngineError> {
        let now_ms = self.now_ms();
        let query = Query::Credentials { user: user.clone(), now_ms };
        let (phc, known) = match self.query_for_user(user, query).await? {
            Reply::Credentials { password_phc } => (password_phc, true),
            Reply::Refused(ReasonCode::UnknownUser) => (self.inner.dummy_phc.clone(), false),
            other => return Err(unexpected(other)),
        };
        let hasher = self.inner.hasher.clone();
        let password = zeroize::Zeroizing::new(password.to_owned());
        let verified = tokio::task::spawn_blocking(move || hasher.verify(&password, &phc))
            .await
            .map_err(|_| EngineError::Stopped)?;
        // The dummy hash's password never logs anyone in.
        let command = Command::LoginAttempt { user: user.clone(), success: verified && known };
        match self.apply_for_user(user, None, 0, command).await {
            Ok(Reply::Ok) => Ok(()),
            Ok(other) => Err(unexpected(other)),
            Err(EngineError::Refused(ReasonCode::UnknownUser)) => {
                Err(EngineError::Refused(ReasonCode::WrongPassword))
            }
            Err(error) => Err(error),
        }
    }

    /// Registers a settlement means; a card or account number goes to the vault.
    pub async fn add_means(
        &self,
        client_request_id: ClientRequestId,
        user: &UserKey,
        means: &MeansInput,
        make_default: bool,
    ) -> Result<MeansAdded, EngineError> {
        let prepared = means.prepare(&self.inner.shared.vault).map_err(EngineError::Refused)?;
        let digest = digest_of(&("means", user, means.public_parts(), make_default));
        let command = Command::AddMeans { user: user.clone(), means: prepared, make_default };
        match self.apply_for_user(user, Some(client_request_id), digest, command).await? {
            Reply::MeansAdded { means_id, last4 } => Ok(MeansAdded {
                means_id,
                last4: last4.map(|l| String::from_utf8_lossy(&l).into_owned()),
            }),
            other => Err(unexpected(other)),
        }
    }

    /// Makes a registered means the user's default.
    pub async fn set_default_means(
        &self,
        client_request_id: ClientRequestId,
        user: &UserKey,
        means_id: u32,
    ) -> Result<(), EngineError> {
        let digest = digest_of(&("default", user, means_id));
        let command = Command::SetDefaultMeans { user: user.clone(), means_id };
        match self.apply_for_user(user, Some(client_request_id), digest, command).await? {
            Reply::Ok => Ok(()),
            other => Err(unexpected(other)),
        }
    }

    /// The user's registered means, in the asked order.
    pub async fn list_means(
        &self,
        user: &UserKey,
        order: MeansOrder,
    ) -> Result<Vec<MeansView>, EngineError> {
        let query = Query::Means { user: user.clone(), now_ms: self.now_ms() };
        let mut means = match self.query_for_user(user, query).await? {
            Reply::Means(means) => means,
            other => return Err(unexpected(other)),
        };
        match order {
            MeansOrder::Registration => {}
            MeansOrder::Frequency => {
                means.sort_by(|a, b| b.uses.cmp(&a.uses).then(a.means_id.cmp(&b.means_id)))
            }
            MeansOrder::Recency => means.sort_by(|a, b| {
                b.last_used_ms.cmp(&a.last_used_ms).then(a.means_id.cmp(&b.means_id))
            }),
        }
        Ok(means)
    }

    /// Subscribes to the user's completion notices.
    pub fn subscribe(&self, user: &UserKey) -> broadcast::Receiver<Notice> {
        self.inner.notices.subscribe(user)
    }

    // ---- G2: providers ------------------------------------------------------------------

    /// Lists terminals (with their services) for a provider; the whole request or nothing.
    pub async fn register_terminals(
        &self,
        client_request_id: ClientRequestId,
        provider_code: u32,
        terminals: Vec<TerminalEntry>,
    ) -> Result<(), EngineError> {
        let digest = digest_of(&("terminals", provider_code, format!("{terminals:?}")));
        let command = Command::RegisterTerminals { provider_code, terminals };
        self.change_provider(provider_code, client_request_id, digest, command).await
    }

    /// Removes terminals from a provider's list.
    pub async fn remove_terminals(
        &self,
        client_request_id: ClientRequestId,
        provider_code: u32,
        terminal_ids: Vec<String>,
    ) -> Result<(), EngineError> {
        let digest = digest_of(&("remove-terminals", provider_code, &terminal_ids));
        let command = Command::RemoveTerminals { provider_code, terminal_ids };
        self.change_provider(provider_code, client_request_id, digest, command).await
    }

    /// Seed steps S38–S39: is this terminal on the provider's list, and with which service?
    pub fn confirm_terminal(
        &self,
        provider_code: u32,
        terminal_id: &str,
    ) -> Result<TerminalConfirmation, EngineError> {
        let provider = self
            .registry()
            .provider(provider_code)
            .ok_or(EngineError::Refused(ReasonCode::UnknownProvider))?;
        Ok(provider.confirm(terminal_id, self.now_ms()))
    }

    // ---- A1: age registry ----------------------------------------------------------------

    /// Registers a terminal's age information (A1): `record` is an [`AgeRecord`] signed by the
    /// terminal's device key after the user passed biometric authentication on it. The tag is
    /// checked in constant time; the owning shard checks the counter, the timestamp window
    /// and the validity window, then keeps the registration (replacing an older one).
    pub async fn register_age(
        &self,
        client_request_id: ClientRequestId,
        record: &[u8],
    ) -> Result<(), EngineError> {
        let now_ms = self.now_ms();
        let (decoded, body, tag) = AgeRecord::decode(record).map_err(EngineError::Refused)?;
        self.inner
            .shared
            .devices
            .verify_tag(&decoded.card_idm, &decoded.user, decoded.key_version, body, tag, now_ms)
            .map_err(EngineError::Refused)?;
        let digest = u64::from_be_bytes(tag[..8].try_into().expect("8"));
        let user = decoded.user.clone();
        let command = Command::RegisterAge { record: decoded, tag: *tag };
        match self.apply_for_user(&user, Some(client_request_id), digest, command).await? {
            Reply::Ok => Ok(()),
            other => Err(unexpected(other)),
        }
    }

    /// Sets a listed store terminal's own age policy (A2, A3); `None` clears it, so the
    /// terminal follows its provider's policy, or the engine's default.
    pub async fn set_age_policy(
        &self,
        client_request_id: ClientRequestId,
        provider_code: u32,
        terminal_id: &str,
        policy: Option<AgePolicy>,
    ) -> Result<(), EngineError> {
        if let Some(policy) = &policy {
            self.inner.shared.age.config.resolve(policy).map_err(EngineError::Refused)?;
        }
        let digest = digest_of(&("age-policy", provider_code, terminal_id, &policy));
        let command =
            Command::SetAgePolicy { provider_code, terminal_id: terminal_id.to_owned(), policy };
        self.change_provider(provider_code, client_request_id, digest, command).await
    }

    // ---- W1–W2: stores and where a device is -------------------------------------------

    /// Adds a store, or replaces the store with the same ID (W1). The store lives in the shard
    /// that owns its position's cell; a store that moves to another shard's cell is added
    /// there first and then removed from the old one.
    pub async fn upsert_store(
        &self,
        client_request_id: ClientRequestId,
        store: Store,
    ) -> Result<(), EngineError> {
        store.validate().map_err(EngineError::Refused)?;
        let previous = self.inner.shared.stores.locate(&store.store_id);
        let owner_hash = cell_hash(store.cell());
        let digest = digest_of(&("store", format!("{store:?}")));
        let store_id = store.store_id.clone();
        // Resolved here, from the directory all shards share, so that the store's shard reads
        // nothing outside itself (two upserts racing for one signal can both pass, as before).
        let signals_free = Some(self.inner.shared.stores.signals_free(&store));
        let command = Command::UpsertStore { store: Box::new(store), signals_free };
        let envelope = Envelope {
            owner_hash,
            client_request_id: Some(client_request_id),
            digest,
            now_ms: self.now_ms(),
            command,
        };
        let shard = self.shard_of(owner_hash);
        match self.call(shard, Op::Apply(envelope)).await? {
            Reply::Ok => {}
            other => return Err(unexpected(other)),
        }
        if let Some((old_cell, _)) = previous {
            let old_hash = cell_hash(old_cell);
            if self.shard_of(old_hash) != shard {
                let command = Command::RemoveStore { store_id, moved: true };
                let envelope = Envelope {
                    owner_hash: old_hash,
                    client_request_id: None,
                    digest: 0,
                    now_ms: self.now_ms(),
                    command,
                };
                match self.call(self.shard_of(old_hash), Op::Apply(envelope)).await {
                    Ok(_) | Err(EngineError::Refused(ReasonCode::UnknownStore)) => {}
                    Err(error) => return Err(error),
                }
            }
        }
        Ok(())
    }

    /// Removes a store (W1).
    pub async fn remove_store(
        &self,
        client_request_id: ClientRequestId,
        store_id: &str,
    ) -> Result<(), EngineError> {
        let (cell, _) = self
            .inner
            .shared
            .stores
            .locate(store_id)
            .ok_or(EngineError::Refused(ReasonCode::UnknownStore))?;
        let owner_hash = cell_hash(cell);
        let command = Command::RemoveStore { store_id: store_id.to_owned(), moved: false };
        let envelope = Envelope {
            owner_hash,
            client_request_id: Some(client_request_id),
            digest: digest_of(&("remove-store", store_id)),
            now_ms: self.now_ms(),
            command,
        };
        match self.call(self.shard_of(owner_hash), Op::Apply(envelope)).await? {
            Reply::Ok => Ok(()),
            other => Err(unexpected(other)),
        }
    }

    /// The store a device at a GPS position is in (W2): the nearest store within `radius_m`
    /// (1..=50,000) by great-circle distance. Ties go to the lowest store ID and are listed.
    pub async fn store_at(
        &self,
        latitude: f64,
        longitude: f64,
        radius_m: u32,
    ) -> Result<EnteredStore, EngineError> {
        let valid = latitude.is_finite()
            && longitude.is_finite()
            && (-90.0..=90.0).contains(&latitude)
            && (-180.0..=180.0).contains(&longitude)
            && (1..=STORE_RADIUS_MAX_M).contains(&radius_m);
        if !valid {
            return Err(EngineError::Refused(ReasonCode::InvalidPosition));
        }
        let mut shards: Vec<usize> = geo::covering_cells(latitude, longitude, f64::from(radius_m))
            .into_iter()
            .map(|cell| self.shard_of(cell_hash(cell)))
            .collect();
        shards.sort_unstable();
        shards.dedup();
        let position = geo::unit_vector(latitude, longitude);
        let max_chord = geo::metres_to_chord(f64::from(radius_m));
        let replies = join_all(shards.into_iter().map(|shard| {
            self.call(shard, Op::Query(Query::NearestStores { position, max_chord }))
        }))
        .await;
        let mut candidates: Vec<Candidate> = Vec::new();
        for reply in replies {
            match reply? {
                Reply::Stores(found) => candidates.extend(found),
                other => return Err(unexpected(other)),
            }
        }
        // Distances are compared as the protocol reports them, in whole millimetres, so that
        // stores placed symmetrically tie whatever the last bits of the arithmetic say.
        let millimetres = |c: &Candidate| (geo::chord_to_metres(c.chord) * 1000.0).round() as u64;
        let best = candidates.iter().map(millimetres).min();
        let mut nearest: Vec<Candidate> =
            candidates.into_iter().filter(|c| Some(millimetres(c)) == best).collect();
        nearest.sort_by(|a, b| a.store.store_id.cmp(&b.store.store_id));
        let mut nearest = nearest.into_iter();
        let chosen = nearest.next().ok_or(EngineError::Refused(ReasonCode::NoStoreInRange))?;
        Ok(EnteredStore {
            distance_m: Some(geo::chord_to_metres(chosen.chord)),
            store: chosen.store,
            tied: nearest.map(|c| c.store.store_id).collect(),
            qr_networks: Vec::new(),
        })
    }

    /// The store a beacon, Wi-Fi ID or QR poster names (W2). A poster in EMVCo
    /// merchant-presented format must pass its CRC check; the networks it names are returned.
    pub async fn store_by_signal(
        &self,
        signal: Signal,
        id: &str,
    ) -> Result<EnteredStore, EngineError> {
        let qr_networks = if signal == Signal::QrPoster && crate::emvqr::is_mpm(id) {
            crate::emvqr::parse(id)
                .map_err(|_| EngineError::Refused(ReasonCode::InvalidQrCode))?
                .networks
        } else {
            Vec::new()
        };
        let (store_id, cell) = self
            .inner
            .shared
            .stores
            .resolve(signal, id)
            .ok_or(EngineError::Refused(ReasonCode::UnknownStore))?;
        let store = self.store_in_cell(&store_id, cell).await?;
        Ok(EnteredStore { store, distance_m: None, tied: Vec::new(), qr_networks })
    }

    /// A store by ID.
    pub async fn store(&self, store_id: &str) -> Result<Store, EngineError> {
        let (cell, _) = self
            .inner
            .shared
            .stores
            .locate(store_id)
            .ok_or(EngineError::Refused(ReasonCode::UnknownStore))?;
        self.store_in_cell(store_id, cell).await
    }

    async fn store_in_cell(&self, store_id: &str, cell: u32) -> Result<Store, EngineError> {
        let query = Query::Store { store_id: store_id.to_owned() };
        match self.call(self.shard_of(cell_hash(cell)), Op::Query(query)).await? {
            Reply::Stores(mut found) if !found.is_empty() => Ok(found.swap_remove(0).store),
            other => Err(unexpected(other)),
        }
    }

    // ---- W3: the wallet and what is usable where ----------------------------------------

    /// Loads a stored-value (e-money) means; the first top-up fixes the purse's currency.
    /// Returns the new balance.
    pub async fn top_up(
        &self,
        client_request_id: ClientRequestId,
        user: &UserKey,
        means_id: u32,
        amount_minor: u64,
        currency: Currency,
    ) -> Result<Balance, EngineError> {
        if amount_minor == 0 || amount_minor > crate::limits::BALANCE_MAX_MINOR {
            return Err(EngineError::Refused(ReasonCode::InvalidAmount));
        }
        let digest = digest_of(&("top-up", user, means_id, amount_minor, currency));
        let command = Command::TopUp { user: user.clone(), means_id, amount_minor, currency };
        match self.apply_for_user(user, Some(client_request_id), digest, command).await? {
            Reply::Balance(balance) => Ok(balance),
            other => Err(unexpected(other)),
        }
    }

    /// Every method of the user at a store, marked usable or not, with balances; the best one
    /// by `best_by`; and, when none is usable, what the store accepts (W3).
    pub async fn usable_methods(
        &self,
        user: &UserKey,
        store_id: &str,
        best_by: BestBy,
    ) -> Result<UsableMethods, EngineError> {
        let query = UsableQuery { user: user.clone(), store_id: store_id.to_owned(), best_by };
        let mut results = self.usable_methods_batch(vec![query]).await;
        results.pop().expect("one result per query")
    }

    /// Answers a batch of usable-methods queries: each shard gets one message holding every
    /// store and means lookup it owns, however many queries there are. Results come back in
    /// query order.
    pub async fn usable_methods_batch(
        &self,
        queries: Vec<UsableQuery>,
    ) -> Vec<Result<UsableMethods, EngineError>> {
        let count = queries.len();
        if count > BATCH_SIZE_MAX {
            let error = EngineError::BatchTooLarge { len: count, max: BATCH_SIZE_MAX };
            return vec![Err(error); count];
        }
        let mut stores: Vec<Option<Result<Store, EngineError>>> = vec![None; count];
        let mut means: Vec<Option<Result<Vec<MeansView>, EngineError>>> = vec![None; count];
        let mut per_shard: Vec<(Vec<Lookup>, Vec<Op>)> =
            (0..self.shard_count()).map(|_| Default::default()).collect();
        for (index, query) in queries.iter().enumerate() {
            match self.inner.shared.stores.locate(&query.store_id) {
                None => stores[index] = Some(Err(EngineError::Refused(ReasonCode::UnknownStore))),
                Some((cell, _)) => {
                    let shard = &mut per_shard[self.shard_of(cell_hash(cell))];
                    shard.0.push((index, false));
                    shard.1.push(Op::Query(Query::Store { store_id: query.store_id.clone() }));
                }
            }
            let shard = &mut per_shard[self.shard_of(user_hash(&query.user))];
            shard.0.push((index, true));
            shard
                .1
                .push(Op::Query(Query::Means { user: query.user.clone(), now_ms: self.now_ms() }));
        }
        let mut pending = Vec::new();
        for (shard, (slots, ops)) in per_shard.into_iter().enumerate() {
            if ops.is_empty() {
                continue;
            }
            match self.submit(shard, ops) {
                Ok(receiver) => pending.push((slots, receiver)),
                Err(error) => {
                    for (index, is_means) in slots {
                        if is_means {
                            means[index] = Some(Err(error.clone()));
                        } else {
                            stores[index] = Some(Err(error.clone()));
                        }
                    }
                }
            }
        }
        for (slots, receiver) in pending {
            let replies = receiver.await.map_err(|_| EngineError::Stopped);
            for (position, (index, is_means)) in slots.into_iter().enumerate() {
                let reply = match &replies {
                    Ok(replies) => Ok(replies[position].clone()),
                    Err(error) => Err(error.clone()),
                };
                if is_means {
                    means[index] = Some(reply.and_then(|reply| match reply {
                        Reply::Means(found) => Ok(found),
                        other => Err(unexpected(other)),
                    }));
                } else {
                    stores[index] = Some(reply.and_then(|reply| match reply {
                        Reply::Stores(mut found) if !found.is_empty() => {
                            Ok(found.swap_remove(0).store)
                        }
                        other => Err(unexpected(other)),
                    }));
                }
            }
        }
        queries
            .into_iter()
            .zip(stores.into_iter().zip(means))
            .map(|(query, (store, means))| {
                let store = store.expect("every store lookup answered")?;
                let means = means.expect("every means lookup answered")?;
                Ok(usable_at(store, means, query.best_by))
            })
            .collect()
    }

    // ---- C1–C5: payment codes and coupons --------------------------------------------------

    /// Issues a payment code (C1–C2): the request is checked like a payment and the provider
    /// asked for the authorization, which is held; on approval the code is issued by the
    /// user's shard (the second tier that will answer its redemption) and delivered to the
    /// designated device's stream.
    pub async fn issue_code(&self, request: IssueCodeRequest) -> Result<CodeOutcome, EngineError> {
        let valid = (CODE_VALIDITY_MIN_MS..=CODE_VALIDITY_MAX_MS).contains(&request.validity_ms)
            && request.order_ref.len() <= ORDER_REF_LEN_MAX
            && request.order_ref.bytes().all(|b| b.is_ascii_graphic());
        if !valid {
            return Err(EngineError::Refused(ReasonCode::InvalidCodeRequest));
        }
        let now_ms = self.now_ms();
        let deadline =
            Instant::now() + Duration::from_millis(self.inner.config.request_deadline_ms);
        let verified = match self.inner.shared.devices.verify(&request.inherent_id, now_ms) {
            Ok(verified) => verified,
            Err(reason) => return Ok(CodeOutcome::Declined(reason)),
        };
        let spec = CodeSpec {
            validity_ms: request.validity_ms,
            deliver_to: request.deliver_to,
            order_ref: request.order_ref,
        };
        let user = verified.record.user.clone();
        let digest = digest_of(&("code", verified.digest, &spec));
        let terminal = Some(Box::new(self.terminal_context(&verified, now_ms)));
        let command = Command::CodeReserve { verified, spec: Box::new(spec), terminal };
        let reply =
            self.apply_for_user(&user, Some(request.client_request_id), digest, command).await?;
        let dispatch = match reply {
            Reply::Dispatch(dispatch) => dispatch,
            // Approved at once by an in-process provider: issued in the same shard step.
            Reply::CodeDecided(issued) => return Ok(self.deliver_code(issued)),
            Reply::CodeIssued(issued) => return Ok(CodeOutcome::Issued(issued)),
            Reply::Auth(AuthOutcome::Declined(reason)) => return Ok(CodeOutcome::Declined(reason)),
            other => return Err(unexpected(other)),
        };
        let outcome = self.call_provider(&dispatch, deadline).await;
        let envelope = dispatch.completion(outcome, self.now_ms());
        // Like a payment's completion, never refused as busy.
        let shard = self.shard_of(dispatch.key.0);
        let mut replies = self
            .submit_always(shard, vec![Op::Apply(envelope)])
            .await
            .map_err(|_| EngineError::Stopped)?;
        match replies.pop() {
            Some(Reply::CodeIssued(issued)) => Ok(self.deliver_code(issued)),
            Some(Reply::Auth(AuthOutcome::Declined(reason))) => Ok(CodeOutcome::Declined(reason)),
            Some(Reply::CompletionDropped) => {
                self.inner.shared.completion_dropped(&dispatch, &outcome);
                Ok(CodeOutcome::Declined(ReasonCode::ProviderTimeout))
            }
            Some(other) => Err(unexpected(other)),
            None => Err(EngineError::Stopped),
        }
    }

    /// Delivers a newly issued code to its device's stream.
    fn deliver_code(&self, issued: Box<IssuedCode>) -> CodeOutcome {
        let message = DeviceMessage::Code((*issued).clone());
        self.inner.notices.publish_device(issued.deliver_to, message);
        CodeOutcome::Issued(issued)
    }

    /// Redeems a code at a POS (C3): checks its tag (constant time) and that it is what the
    /// POS expects, then routes it by its issue number to the shard that issued it (T1), which
    /// captures at most the authorized amount once, releases the rest and records the
    /// remittance. A coupon issued to the same user may be applied in the same settlement.
    /// With a basket, its age-restricted items are checked first against the age registration
    /// of the device the code was delivered to (A1–A2), under the store terminal's policy.
    pub async fn redeem_code(&self, request: RedeemRequest) -> Result<Redemption, EngineError> {
        let refused = |reason| EngineError::Refused(reason);
        let code = CodePayload::open(&request.code, &self.inner.shared.codes).map_err(refused)?;
        if code.kind != CodeKind::Payment {
            return Err(refused(ReasonCode::InvalidCode));
        }
        if code.issuer != self.inner.config.code_issuer
            || code.issuer != request.issuer
            || code.number != request.number
        {
            return Err(refused(ReasonCode::CodeMismatch));
        }
        let coupon = match &request.coupon {
            None => None,
            Some(text) => {
                let coupon = CodePayload::open(text, &self.inner.shared.codes).map_err(refused)?;
                if coupon.kind != CodeKind::Coupon {
                    return Err(refused(ReasonCode::InvalidCode));
                }
                // A coupon applies with the payment codes of its own user, whose shard holds
                // both: another shard's coupon is another user's.
                if codes::shard_of_number(coupon.number) != codes::shard_of_number(code.number) {
                    return Err(refused(ReasonCode::CouponNotApplicable));
                }
                Some(coupon.number)
            }
        };
        let valid_sale = request.amount_minor > 0
            && request.amount_minor <= crate::limits::AMOUNT_MINOR_MAX
            && crate::types::terminal_id_valid(&request.terminal_id)
            && request.items.len() <= SALE_ITEMS_MAX
            && request.items.iter().all(|(item_id, _, _)| crate::age::item_id_valid(item_id))
            && (request.basket.is_none() || request.items.is_empty())
            && request.order_ref.len() <= ORDER_REF_LEN_MAX;
        if !valid_sale {
            return Err(refused(ReasonCode::CodeMismatch));
        }
        let shard = codes::shard_of_number(code.number);
        if shard >= self.shard_count() {
            return Err(refused(ReasonCode::UnknownCode));
        }
        let spec = RedeemSpec {
            number: code.number,
            amount_minor: request.amount_minor,
            currency: request.currency,
            terminal_id: request.terminal_id,
            sale_at_ms: request.sale_at_ms,
            items: request.items,
            basket: request.basket,
            coupon,
            order_ref: request.order_ref,
        };
        let policies = Some(terminal_policies(&self.inner.shared.registry, &spec.terminal_id));
        let envelope = Envelope {
            owner_hash: digest_of(&("code", code.number)),
            client_request_id: Some(request.client_request_id),
            digest: digest_of(&spec),
            now_ms: self.now_ms(),
            command: Command::RedeemCode { spec: Box::new(spec), policies },
        };
        match self.call(shard, Op::Apply(envelope)).await? {
            Reply::Redeemed(redemption) => Ok(*redemption),
            other => Err(unexpected(other)),
        }
    }

    /// A payment code's state: issued, expired, or redeemed with its capture and the
    /// remittance due to the merchant (C3).
    pub async fn code_state(&self, number: u64) -> Result<CodeState, EngineError> {
        self.code_state_for(number, |_| true).await
    }

    /// [`Engine::code_state`] for a reader that may see the codes of some store terminals only
    /// (`may_see` says which): a code's state concerns the terminal that redeemed it, or before
    /// its redemption the terminal it was requested for (`*` when the store was not known). A
    /// code of a terminal `may_see` refuses is answered exactly as a code that does not exist
    /// (`UnknownCode`).
    pub async fn code_state_for(
        &self,
        number: u64,
        may_see: impl Fn(&str) -> bool,
    ) -> Result<CodeState, EngineError> {
        let unknown = EngineError::Refused(ReasonCode::UnknownCode);
        let shard = codes::shard_of_number(number);
        if shard >= self.shard_count() {
            return Err(unknown);
        }
        match self.call(shard, Op::Query(Query::Code { number })).await? {
            Reply::CodeState(state, terminal_id) if may_see(&terminal_id) => Ok(*state),
            Reply::CodeState(..) => Err(unknown),
            other => Err(unexpected(other)),
        }
    }

    /// Expires every payment code past its expiry and releases its hold, in every shard;
    /// returns how many. The server runs it periodically; an embedding application should too.
    pub async fn sweep_codes(&self) -> Result<u32, EngineError> {
        let now_ms = self.now_ms();
        let sweeps = (0..self.shard_count()).map(|shard| {
            let envelope = Envelope {
                owner_hash: 0,
                client_request_id: None,
                digest: 0,
                now_ms,
                command: Command::SweepCodes,
            };
            self.submit_always(shard, vec![Op::Apply(envelope)])
        });
        let mut swept = 0;
        for replies in join_all(sweeps).await {
            match replies.map_err(|_| EngineError::Stopped)?.pop() {
                Some(Reply::Swept(count)) => swept += count,
                Some(other) => return Err(unexpected(other)),
                None => return Err(EngineError::Stopped),
            }
        }
        Ok(swept)
    }

    /// Issues coupons or service codes for a provider to each of `users` (C5), each delivered
    /// to the user's devices. Results come back in user order.
    pub async fn issue_coupons(
        &self,
        client_request_id: ClientRequestId,
        provider_code: u32,
        users: Vec<UserKey>,
        effect: CouponEffect,
        uses: u32,
        expires_ms: i64,
    ) -> Vec<Result<IssuedCoupon, EngineError>> {
        if users.is_empty() || users.len() > COUPON_USERS_MAX {
            return vec![Err(EngineError::Refused(ReasonCode::InvalidCoupon)); users.len().max(1)];
        }
        if self.registry().provider(provider_code).is_none() {
            return vec![Err(EngineError::Refused(ReasonCode::UnknownProvider)); users.len()];
        }
        if expires_ms <= self.now_ms() {
            return vec![Err(EngineError::Refused(ReasonCode::InvalidCoupon)); users.len()];
        }
        let issues = users.into_iter().map(|user| async move {
            let digest = digest_of(&("coupon", provider_code, &user, effect, uses, expires_ms));
            let command = Command::IssueCoupon {
                user: user.clone(),
                provider_code,
                effect,
                uses,
                expires_ms,
            };
            let coupon =
                match self.apply_for_user(&user, Some(client_request_id), digest, command).await? {
                    Reply::CouponIssued(coupon) => *coupon,
                    other => return Err(unexpected(other)),
                };
            for idm in self.devices_of(&user).await.unwrap_or_default() {
                self.inner.notices.publish_device(idm, DeviceMessage::Coupon(coupon.clone()));
            }
            Ok(coupon)
        });
        join_all(issues).await
    }

    /// Tells a user a cash-on-delivery parcel is on its way (C4): the notice reaches every
    /// device of theirs that is subscribed. Returns how many devices were subscribed when it
    /// was accepted. Idempotent by client request ID, as every change is: the user's shard
    /// keeps the answer, a retry gets it and publishes nothing (the same ID with another
    /// notice is `IdempotencyConflict`).
    pub async fn notify_delivery(
        &self,
        client_request_id: ClientRequestId,
        notice: DeliveryNotice,
    ) -> Result<usize, EngineError> {
        let valid = notice.amount_minor > 0
            && notice.amount_minor <= crate::limits::AMOUNT_MINOR_MAX
            && !notice.order_ref.is_empty()
            && notice.order_ref.len() <= ORDER_REF_LEN_MAX
            && notice.order_ref.bytes().all(|b| b.is_ascii_graphic())
            && notice.merchant.len() <= crate::limits::STORE_NAME_LEN_MAX;
        if !valid {
            return Err(EngineError::Refused(ReasonCode::InvalidCodeRequest));
        }
        let devices = self.devices_of(&notice.user).await?;
        let listened = devices.iter().filter(|idm| self.inner.notices.device_listened(idm));
        let count = u32::try_from(listened.count()).unwrap_or(u32::MAX);
        let digest = digest_of(&(
            "delivery",
            &notice.user,
            &notice.order_ref,
            notice.amount_minor,
            notice.currency,
            &notice.merchant,
        ));
        let command = Command::NotifyDelivery { user: notice.user.clone(), devices: count };
        let reply = self.apply_for_user(&notice.user, Some(client_request_id), digest, command);
        match reply.await? {
            // The first answer: the notice goes out now, once.
            Reply::DeliveryAccepted(count) => {
                for idm in devices {
                    self.inner.notices.publish_device(idm, DeviceMessage::Delivery(notice.clone()));
                }
                Ok(count as usize)
            }
            // A retry: answered as the first was, nothing sent again.
            Reply::Delivered(count) => Ok(count as usize),
            other => Err(unexpected(other)),
        }
    }

    /// Subscribes to what reaches one device: its payment codes, its user's coupons and
    /// delivery notices (check the device's owner before handing the stream out).
    pub fn subscribe_device(&self, card_idm: Idm) -> broadcast::Receiver<DeviceMessage> {
        self.inner.notices.subscribe_device(card_idm)
    }

    /// The card IDms of a user's devices.
    pub async fn devices_of(&self, user: &UserKey) -> Result<Vec<Idm>, EngineError> {
        match self.query_for_user(user, Query::Devices { user: user.clone() }).await? {
            Reply::Devices(devices) => Ok(devices),
            Reply::Refused(reason) => Err(EngineError::Refused(reason)),
            other => Err(unexpected(other)),
        }
    }

    // ---- G3: settlement -----------------------------------------------------------------

    /// Authorizes one settlement.
    pub async fn authorize(&self, request: AuthorizeRequest) -> Result<AuthOutcome, EngineError> {
        let mut results = self.authorize_batch(vec![request]).await;
        results.pop().expect("one result per request")
    }

    /// Authorizes a batch: tags are verified together (across cores when the batch is large),
    /// each shard receives its part in one message, and providers are called concurrently.
    /// Results come back in request order.
    pub async fn authorize_batch(
        &self,
        requests: Vec<AuthorizeRequest>,
    ) -> Vec<Result<AuthOutcome, EngineError>> {
        let requests = requests.into_iter().map(|request| (request, None)).collect();
        let results = self.authorize_baskets(requests).await;
        results.into_iter().map(|result| result.map(|r| r.outcome)).collect()
    }

    /// Authorizes a batch of payments, each with its basket or without one (A2, A3). A basket
    /// must add up to the amount the user signed; its age-restricted items are checked against
    /// the paying terminal's age registration under the store's age policy.
    pub async fn authorize_baskets(
        &self,
        requests: Vec<(AuthorizeRequest, Option<Basket>)>,
    ) -> Vec<Result<BasketOutcome, EngineError>> {
        let count = requests.len();
        if count > BATCH_SIZE_MAX {
            let error = EngineError::BatchTooLarge { len: count, max: BATCH_SIZE_MAX };
            return vec![Err(error); count];
        }
        let now_ms = self.now_ms();
        let deadline =
            Instant::now() + Duration::from_millis(self.inner.config.request_deadline_ms);
        let (requests, baskets): (Vec<_>, Vec<_>) = requests.into_iter().unzip();
        let (ids, verified) = self.verify_batch(requests, now_ms).await;
        let mut results: Vec<Option<Result<BasketOutcome, EngineError>>> = vec![None; count];
        let mut per_shard: Vec<(Vec<usize>, Vec<Op>)> =
            (0..self.shard_count()).map(|_| Default::default()).collect();
        let requests = ids.into_iter().zip(verified).zip(baskets).enumerate();
        for (index, ((client_request_id, verified), basket)) in requests {
            match verified {
                Err(reason) => results[index] = Some(Ok(declined(reason))),
                Ok(verified) => {
                    let owner_hash = user_hash(&verified.record.user);
                    // The tag is a MAC over the record; the basket joins it in the digest so
                    // that reusing a request ID with another basket is a conflict.
                    let digest = match &basket {
                        None => u64::from_be_bytes(verified.digest[..8].try_into().expect("8")),
                        Some(basket) => digest_of(&(verified.digest, basket)),
                    };
                    let shard = self.shard_of(owner_hash);
                    let terminal = Some(Box::new(self.terminal_context(&verified, now_ms)));
                    let basket = basket.map(Box::new);
                    per_shard[shard].0.push(index);
                    per_shard[shard].1.push(Op::Apply(Envelope {
                        owner_hash,
                        client_request_id: Some(client_request_id),
                        digest,
                        now_ms,
                        command: Command::AuthReserve { verified, basket, terminal },
                    }));
                }
            }
        }
        let dispatches = self.reserve(per_shard, now_ms, &mut results).await;
        self.dispatch_all(dispatches, deadline, &mut results).await;
        results.into_iter().map(|r| r.expect("every request has a result")).collect()
    }

    async fn verify_batch(
        &self,
        requests: Vec<AuthorizeRequest>,
        now_ms: i64,
    ) -> (Vec<ClientRequestId>, Vec<Result<Verified, ReasonCode>>) {
        let (ids, records): (Vec<_>, Vec<_>) =
            requests.into_iter().map(|r| (r.client_request_id, r.inherent_id)).unzip();
        if records.len() < VERIFY_PARALLEL_MIN {
            return (ids, self.inner.shared.devices.verify_batch(&records, now_ms));
        }
        // Keyed hashing is CPU work: keep it off the async executor, on the rayon pool.
        let devices = Arc::clone(&self.inner.shared.devices);
        let (tx, rx) = oneshot::channel();
        rayon::spawn(move || {
            let _ = tx.send(devices.verify_batch(&records, now_ms));
        });
        let verified = rx.await.expect("rayon verification task finished");
        (ids, verified)
    }

    /// Sends each shard its reservations and collects declines, outcomes the shard could
    /// decide at once (`now_ms` is theirs), and work for providers.
    async fn reserve(
        &self,
        per_shard: Vec<(Vec<usize>, Vec<Op>)>,
        now_ms: i64,
        results: &mut [Option<Result<BasketOutcome, EngineError>>],
    ) -> Vec<(usize, Box<Dispatch>)> {
        let mut pending = Vec::new();
        for (shard, (indices, ops)) in per_shard.into_iter().enumerate() {
            if ops.is_empty() {
                continue;
            }
            match self.submit(shard, ops) {
                Ok(receiver) => pending.push((indices, receiver)),
                Err(error) => indices.iter().for_each(|&i| results[i] = Some(Err(error.clone()))),
            }
        }
        let mut dispatches = Vec::new();
        for (indices, receiver) in pending {
            let Ok(replies) = receiver.await else {
                indices.iter().for_each(|&i| results[i] = Some(Err(EngineError::Stopped)));
                continue;
            };
            for (index, reply) in indices.into_iter().zip(replies) {
                results[index] = Some(match reply {
                    Reply::Dispatch(dispatch) => {
                        dispatches.push((index, dispatch));
                        continue;
                    }
                    Reply::Decided(dispatch, outcome) => {
                        Ok(self.publish_outcome(*dispatch, outcome, now_ms))
                    }
                    Reply::Auth(outcome) => Ok(BasketOutcome { outcome, verdict: None }),
                    Reply::BasketAuth(outcome, verdict) => {
                        Ok(BasketOutcome { outcome, verdict: Some(*verdict) })
                    }
                    Reply::InFlight => Err(EngineError::InFlight),
                    Reply::Refused(reason) => Ok(declined(reason)),
                    other => Err(unexpected(other)),
                });
            }
        }
        dispatches
    }

    /// Calls the providers, records every outcome in its shard, then publishes notices.
    async fn dispatch_all(
        &self,
        dispatches: Vec<(usize, Box<Dispatch>)>,
        deadline: Instant,
        results: &mut [Option<Result<BasketOutcome, EngineError>>],
    ) {
        if dispatches.is_empty() {
            return;
        }
        let outcomes =
            join_all(dispatches.iter().map(|(_, d)| self.call_provider(d, deadline))).await;
        let now_ms = self.now_ms();
        // Per shard: the dispatches (by position) whose completions it applies, and those.
        let mut completions: Vec<(Vec<usize>, Vec<Op>)> =
            (0..self.shard_count()).map(|_| Default::default()).collect();
        for (at, ((_, dispatch), outcome)) in dispatches.iter().zip(&outcomes).enumerate() {
            let (positions, ops) = &mut completions[self.shard_of(dispatch.key.0)];
            positions.push(at);
            ops.push(Op::Apply(dispatch.completion(*outcome, now_ms)));
        }
        // Completions are never refused as busy: dropping one would lose an outcome.
        let (positions, receivers): (Vec<_>, Vec<_>) = completions
            .into_iter()
            .enumerate()
            .filter(|(_, (_, ops))| !ops.is_empty())
            .map(|(shard, (positions, ops))| (positions, self.submit_always(shard, ops)))
            .unzip();
        let answers = join_all(receivers).await;
        let recorded = answers.iter().all(Result::is_ok);
        // What stands of each outcome: the provider's, or a decline where the completion found
        // its record gone or replaced.
        let mut standing = outcomes;
        for (positions, replies) in positions.into_iter().zip(answers) {
            for (at, reply) in positions.into_iter().zip(replies.unwrap_or_default()) {
                if let Reply::CompletionDropped = reply {
                    self.inner.shared.completion_dropped(&dispatches[at].1, &standing[at]);
                    standing[at] = AuthOutcome::Declined(ReasonCode::ProviderTimeout);
                }
            }
        }
        for ((index, dispatch), outcome) in dispatches.into_iter().zip(standing) {
            if !recorded {
                // Not recorded, not acknowledged: no reply and no notice may claim it.
                results[index] = Some(Err(EngineError::Stopped));
                continue;
            }
            results[index] = Some(Ok(self.publish_outcome(*dispatch, outcome, now_ms)));
        }
    }

    /// Publishes a recorded payment's notice and returns its outcome for the caller.
    fn publish_outcome(
        &self,
        dispatch: Dispatch,
        outcome: AuthOutcome,
        now_ms: i64,
    ) -> BasketOutcome {
        self.inner.notices.publish(Notice {
            user: dispatch.user,
            client_request_id: dispatch.key.1,
            terminal_id: dispatch.terminal_id,
            outcome,
            at_ms: now_ms,
        });
        BasketOutcome { outcome, verdict: dispatch.verdict.map(|v| *v) }
    }

    async fn call_provider(&self, dispatch: &Dispatch, deadline: Instant) -> AuthOutcome {
        let provider = self
            .registry()
            .provider(dispatch.provider_code)
            .expect("shard checked the provider; the provider set is fixed");
        dispatch.outcome_of(provider.adapter.authorize(dispatch.provider_request(), deadline).await)
    }

    // ---- routing ------------------------------------------------------------------------

    /// The store terminal of a verified request, from the registry (see [`TerminalContext`]).
    fn terminal_context(&self, verified: &Verified, now_ms: i64) -> TerminalContext {
        let record = &verified.record;
        TerminalContext::resolve(
            &self.inner.shared.registry,
            record.provider_code,
            &record.terminal_id,
            now_ms,
        )
    }

    /// Claims `idm` for a device of `user` about to be provisioned ([`DeviceIndex::claim`]).
    fn claim_device(&self, idm: Idm, user: &UserKey) -> DeviceClaim<'_> {
        let devices = &self.inner.shared.devices;
        DeviceClaim { devices, idm, won: devices.claim(idm, user) }
    }

    fn shard_of(&self, owner_hash: u64) -> usize {
        // Multiply-shift: uses the hash's high bits, which FxHash mixes best.
        ((owner_hash as u128 * self.inner.shards.len() as u128) >> 64) as usize
    }

    fn submit(
        &self,
        shard: usize,
        ops: Vec<Op>,
    ) -> Result<oneshot::Receiver<Vec<Reply>>, EngineError> {
        let (reply, receiver) = oneshot::channel();
        let shard = &self.inner.shards[shard];
        let batch = match shard.apply_if_idle(Batch { ops, reply }) {
            Turn::Applied => return Ok(receiver),
            Turn::Stopped => return Err(EngineError::Stopped),
            Turn::Queue(batch) => batch,
        };
        match shard.addr.try_send(batch) {
            Ok(()) => Ok(receiver),
            Err(SendError::Full(_)) => {
                Err(EngineError::Busy { retry_after_ms: self.inner.config.busy_retry_after_ms })
            }
            Err(SendError::Closed(_)) => Err(EngineError::Stopped),
        }
    }

    fn submit_always(&self, shard: usize, ops: Vec<Op>) -> oneshot::Receiver<Vec<Reply>> {
        let (reply, receiver) = oneshot::channel();
        let shard = &self.inner.shards[shard];
        // A stopped shard drops the batch, and the receiver sees it closed.
        if let Turn::Queue(batch) = shard.apply_if_idle(Batch { ops, reply }) {
            shard.addr.do_send(batch);
        }
        receiver
    }

    async fn call(&self, shard: usize, op: Op) -> Result<Reply, EngineError> {
        let receiver = self.submit(shard, vec![op])?;
        let mut replies = receiver.await.map_err(|_| EngineError::Stopped)?;
        let reply = replies.pop().expect("one reply per op");
        match reply {
            Reply::InFlight => Err(EngineError::InFlight),
            Reply::Refused(reason) => Err(EngineError::Refused(reason)),
            reply => Ok(reply),
        }
    }

    async fn apply_for_user(
        &self,
        user: &UserKey,
        client_request_id: Option<ClientRequestId>,
        digest: u64,
        command: Command,
    ) -> Result<Reply, EngineError> {
        let owner_hash = user_hash(user);
        let envelope =
            Envelope { owner_hash, client_request_id, digest, now_ms: self.now_ms(), command };
        self.call(self.shard_of(owner_hash), Op::Apply(envelope)).await
    }

    async fn apply_for_provider(
        &self,
        provider_code: u32,
        client_request_id: Option<ClientRequestId>,
        digest: u64,
        command: Command,
    ) -> Result<Reply, EngineError> {
        let owner_hash = digest_of(&("provider", provider_code));
        let envelope =
            Envelope { owner_hash, client_request_id, digest, now_ms: self.now_ms(), command };
        self.call(self.shard_of(owner_hash), Op::Apply(envelope)).await
    }

    /// Applies an idempotent change to a provider's state whose reply is `Ok` or a refusal.
    async fn change_provider(
        &self,
        provider_code: u32,
        client_request_id: ClientRequestId,
        digest: u64,
        command: Command,
    ) -> Result<(), EngineError> {
        let reply = self
            .apply_for_provider(provider_code, Some(client_request_id), digest, command)
            .await?;
        match reply {
            Reply::Ok => Ok(()),
            other => Err(unexpected(other)),
        }
    }

    async fn query_for_user(&self, user: &UserKey, query: Query) -> Result<Reply, EngineError> {
        let shard = self.shard_of(user_hash(user));
        match self.call(shard, Op::Query(query)).await {
            Err(EngineError::Refused(ReasonCode::UnknownUser)) => {
                Ok(Reply::Refused(ReasonCode::UnknownUser))
            }
            other => other,
        }
    }

    /// Providers' completions dropped since the engine started because the idempotency record
    /// they were for was gone (the count limit dropped it while its provider answered) or
    /// replaced (its client request ID used again after that): each such payment stands
    /// declined as a provider timeout, and an approval among them must be reversed, as after a
    /// crash. Each is also logged as a warning.
    pub fn completions_dropped(&self) -> u64 {
        self.inner.shared.completions_dropped.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Users and idempotency records held by each shard.
    pub async fn shard_sizes(&self) -> Vec<(usize, usize)> {
        let sizes = join_all(self.inner.shards.iter().map(|s| s.addr.send(Sizes))).await;
        sizes.into_iter().map(|s| s.unwrap_or((0, 0))).collect()
    }

    /// Each shard's state digest, in shard order: a hash of everything the shard holds,
    /// independent of the order its maps were filled in (`shard/digest.rs`). Two copies of a
    /// shard with the same digest hold the same state; [`replay_shard`] computes it for a shard
    /// rebuilt from its own log alone. Each is taken in its shard's turn, after the commands
    /// applied before it. `None` for a shard that stopped.
    pub async fn shard_digests(&self) -> Vec<Option<u64>> {
        let digests = join_all(self.inner.shards.iter().map(|s| s.addr.send(Digest))).await;
        digests.into_iter().map(|d| d.ok().flatten()).collect()
    }

    /// Test hook: blocks the shard that owns `user` until the returned guard is dropped. It
    /// returns once the shard is blocked, so that every batch for it then goes to its mailbox.
    #[cfg(feature = "test-hooks")]
    pub fn stall_shard_of(&self, user: &UserKey) -> std::sync::mpsc::Sender<()> {
        let (release, stalled) = std::sync::mpsc::channel();
        let (held, holding) = std::sync::mpsc::channel();
        let shard = self.shard_of(user_hash(user));
        self.inner.shards[shard].addr.do_send(crate::shard::Stall(held, stalled));
        holding.recv().expect("the shard's actor runs");
        release
    }
}

/// An IDm claimed for a device being provisioned, held until its command is applied.
struct DeviceClaim<'a> {
    devices: &'a DeviceIndex,
    idm: Idm,
    /// Whether the IDm was free (the command carries it).
    won: bool,
}

impl DeviceClaim<'_> {
    /// Awaits the command's reply, then releases the claim if it was won (by then the device
    /// is in the index, or its provisioning was refused).
    async fn held_over(
        self,
        reply: impl std::future::Future<Output = Result<Reply, EngineError>>,
    ) -> Result<Reply, EngineError> {
        let reply = reply.await;
        if self.won {
            self.devices.release(&self.idm);
        }
        reply
    }
}

/// Checks `config` and builds what the shards share (registry, indexes, vault) and the part of
/// the config they apply.
fn prepare(
    config: &EngineConfig,
    adapters: Vec<(u32, Arc<dyn settlegate_adapters::ProviderAdapter>)>,
) -> Result<(Shared, StateConfig, PasswordHasher), EngineError> {
    config.validate().map_err(EngineError::Config)?;
    let vault_key = match config.vault_key().map_err(EngineError::Config)? {
        Some(key) => key,
        None if config.durability.data_dir.is_some() => {
            return Err(EngineError::Config(
                "a data directory needs a lasting vault key (set SETTLEGATE_VAULT_KEY or \
                 engine.vault.key_hex): what is logged is sealed with it"
                    .into(),
            ));
        }
        None => {
            tracing::warn!(
                "no vault key configured: using an ephemeral key; sealed card numbers \
                 will not survive a restart (set SETTLEGATE_VAULT_KEY)"
            );
            *DeviceKey::random().expose()
        }
    };
    let vault = Arc::new(Vault::new(&vault_key));
    let registry = Arc::new(build_registry(config, &vault, adapters)?);
    let shared = Shared {
        devices: Arc::new(DeviceIndex::new(Arc::clone(&vault))),
        vault,
        registry,
        age: Arc::new(AgeRules::new(config.age.clone()).map_err(EngineError::Config)?),
        stores: Arc::new(StoreDirectory::default()),
        codes: Arc::new(CodeKey::derive(&vault_key)),
        code_issuer: config.code_issuer,
        completions_dropped: Arc::default(),
    };
    let state_config = StateConfig {
        timestamp_window_ms: config.timestamp_window_ms,
        key_grace_ms: config.key_grace_ms,
        login_failures_max: config.login_failures_max,
        lockout_ms: config.lockout_ms,
        idempotency_ttl_ms: config.idempotency_ttl_ms,
        idempotency_records_max: config.idempotency_records_max,
    };
    let hasher = PasswordHasher::new(config.password).map_err(EngineError::Config)?;
    Ok((shared, state_config, hasher))
}

/// What [`replay_shard`] rebuilt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShardReplay {
    /// The shard's index.
    pub shard: usize,
    /// Records applied from its log (after its snapshot, if any).
    pub records: usize,
    /// Its state digest ([`Engine::shard_digests`]).
    pub digest: u64,
}

/// Rebuilds shard `index` of the data directory in `config` from its own snapshot and log
/// alone, in this process, with no other shard loaded and nothing written (a torn tail is
/// skipped, not cut; stale files are left), and returns its digest: a replica rebuilding the
/// shard from its log reaches the state of the shard that wrote it. A log older than format
/// version 7 replays too, resolving what its records lack from the registries this shard alone
/// fills, so its digest may then differ from the engine's.
pub fn replay_shard(config: &EngineConfig, index: usize) -> Result<ShardReplay, EngineError> {
    let (shared, state_config, _) = prepare(config, Vec::new())?;
    let (state, records) = crate::startup::replay_one(config, &shared, state_config, index)?;
    Ok(ShardReplay { shard: index, records, digest: state.digest() })
}

fn declined(reason: ReasonCode) -> BasketOutcome {
    BasketOutcome { outcome: AuthOutcome::Declined(reason), verdict: None }
}

/// The routing hash of a geographic cell.
fn cell_hash(cell: u32) -> u64 {
    digest_of(&("cell", cell))
}

fn user_hash(user: &UserKey) -> u64 {
    digest_of(user)
}

/// A stable 64-bit digest (FxHash: deterministic across runs and machines).
fn digest_of<T: Hash + ?Sized>(value: &T) -> u64 {
    let mut hasher = FxHasher::default();
    value.hash(&mut hasher);
    hasher.finish()
}

fn credential_from(reply: Reply, card_idm: Idm) -> Result<DeviceCredential, EngineError> {
    match reply {
        Reply::KeyIssued { key_version, key } => {
            Ok(DeviceCredential { card_idm, key_version, device_key: key })
        }
        other => Err(unexpected(other)),
    }
}

/// A shard answered with a reply of the wrong kind: a bug. Logged, and surfaced as stopped
/// rather than panicking the caller.
fn unexpected(reply: Reply) -> EngineError {
    match reply {
        Reply::Refused(reason) => EngineError::Refused(reason),
        Reply::InFlight => EngineError::InFlight,
        other => {
            tracing::error!(reply = ?std::mem::discriminant(&other), "unexpected shard reply");
            EngineError::Stopped
        }
    }
}
