//! settlegate-engine: an embeddable payment authorization engine on sharded actors.
//!
//! Start one with [`Engine::start`] from an [`EngineConfig`], then call its async methods:
//! enrollment and settlement means (G1), providers' terminal lists and the terminal
//! confirmation query (G2), and settlement authorization (G3), one by one or in batches.
//!
//! Layout, from the bytes inwards:
//! - [`inherent`]: the signed binary record a user terminal builds;
//! - `keys` ([`DeviceIndex`], [`Verified`]): device keys and batch verification of their HMAC-SHA256 tags (rayon);
//! - `shard`: actix actors, each owning a slice of users, applying commands in order;
//! - `providers` ([`Registry`], [`Provider`]): providers, terminal lists and services, and the adapters behind them;
//! - [`geo`] and [`emvqr`]: stores, the store-geo index and QR posters (W1–W2);
//! - [`codes`]: payment codes and coupons, their format and tags (C1–C5, T1);
//! - [`age`]: age registrations, rules per jurisdiction and the basket check (A1–A3);
//! - `vault` ([`Vault`]) and [`password`]: the only places a card number or password is handled;
//! - [`cluster`]: partitions replicated on NATS JetStream, ownership and fencing;
//! - [`engine`]: the facade that routes requests through all of the above;
//! - `alloc` ([`tune_allocator`]): allocator tuning for the process that holds the state.
//!
//! `wal`, `cow`, `limits` and `fuzzing` are internals, public only for the workspace's tests,
//! benches and fuzz targets (hidden from these docs): not API, and they change without notice.
//!
//! # Example
//!
//! A provider, a user with a card, and a payment authorized in-process (the config's cheap
//! Argon2 costs are for examples and tests only; keep the defaults in production, and give the
//! engine a lasting vault key in [`EngineConfig::vault_key`] or the config file):
//!
//! ```
//! use settlegate_engine::adapters::{simulated::SimulatedConfig, AdapterConfig};
//! use settlegate_engine::{
//!     AddMeansOptions, AuthOutcome, AuthorizeRequest, Currency, Engine, EngineConfig,
//!     EnrollRequest, InherentId, MeansInput, MeansKind, PasswordConfig, ProviderConfig,
//!     RequestId, UserIdType, UserKey,
//! };
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let engine = Engine::start(EngineConfig {
//!     password: PasswordConfig { memory_kib: 64, iterations: 1, parallelism: 1 },
//!     providers: vec![ProviderConfig {
//!         code: 1,
//!         name: "Demo Acquirer".into(),
//!         adapter: AdapterConfig::Simulated(SimulatedConfig::default()),
//!         limits: Default::default(),
//!         terminals: Vec::new(),
//!     }],
//!     ..EngineConfig::default()
//! })?;
//!
//! // Accounts: enrol a user with their phone (the device key goes to the phone), add a card.
//! let user = UserKey::new(UserIdType::Mail, "hanako@example.jp")?;
//! let device = engine
//!     .enroll(EnrollRequest {
//!         client_request_id: RequestId::random(),
//!         user: user.clone(),
//!         password: "a long passphrase".into(),
//!         card_idm: [1, 0x2e, 0, 0, 0, 0, 0, 1],
//!     })
//!     .await?;
//! let card = MeansInput::CreditCard { pan: "4111111111111111".into() };
//! let default = AddMeansOptions { make_default: true };
//! engine.add_means(RequestId::random(), &user, &card, default).await?;
//!
//! // Settlement: the phone signs an inherent ID; the store passes it on unchanged.
//! let record = InherentId {
//!     key_version: device.key_version,
//!     amount_minor: 1_980,
//!     currency: Currency::try_from("JPY")?,
//!     means: MeansKind::CreditCard,
//!     means_id: 0,
//!     provider_code: 1,
//!     card_idm: device.card_idm,
//!     user: user.clone(),
//!     terminal_id: "SHOP-0001".into(),
//!     counter: 1,
//!     timestamp_ms: engine.now_ms(),
//! };
//! let request = AuthorizeRequest {
//!     client_request_id: RequestId::random(),
//!     inherent_id: record.sign(device.device_key.expose()),
//! };
//! // A retry (after a timeout, say) reuses the request and its ID: it gets the same outcome.
//! let outcome = engine.authorize(request.clone()).await?;
//! assert_eq!(engine.authorize(request).await?, outcome);
//! assert!(matches!(outcome, AuthOutcome::Approved(_)));
//!
//! engine.shutdown().await;
//! # Ok(())
//! # }
//! ```
//!
//! Each family of operations has its own example: accounts at [`Engine::enroll`], providers'
//! terminals at [`Engine::register_terminals`], age at [`Engine::set_age_policy`], stores and
//! the wallet at [`Engine::usable_methods`], payment codes at [`Engine::issue_code`].
#![deny(missing_docs)]

pub mod age;
mod alloc;
mod clock;
pub mod cluster;
pub mod codes;
pub mod config;
#[doc(hidden)]
pub mod cow;
pub mod emvqr;
pub mod engine;
pub mod error;
mod fail;
#[doc(hidden)]
pub mod fuzzing;
pub mod geo;
mod ids;
pub mod inherent;
mod keys;
#[doc(hidden)]
pub mod limits;
mod means;
mod notices;
pub mod password;
mod providers;
pub mod report;
mod shard;
mod startup;
pub mod types;
mod vault;
#[doc(hidden)]
pub mod wal;

/// The concurrent map the engine's shared tables use (devices, provider terminals, vault
/// tokens, notice channels): a `DashMap` hashed with foldhash, seeded at random per process,
/// so that a key from the network cannot be chosen to collide; hashing a key costs a few
/// instructions, where SipHash (`DashMap`'s default) was 2–3% of the server's time on the
/// authorize path.
pub(crate) type SharedMap<K, V> = dashmap::DashMap<K, V, foldhash::fast::RandomState>;

pub use age::{AgeCheck, AgePolicy, AgeRecord, AgeVerdict, Basket, BasketItem, OnAgeFailure};
pub use alloc::tune_allocator;
pub use clock::{Clock, ManualClock, SystemClock};
pub use config::{EngineConfig, ProviderConfig, VaultConfig, VaultKey};
pub use engine::{replay_shard, shard_of_user};
pub use engine::{
    AuthorizeRequest, BasketOutcome, BestBy, CodeOutcome, CodeRefunded, CodeVoided,
    DeviceCredential, Engine, EnrollRequest, EnteredStore, ForwardRound, IssueCodeRequest,
    MeansAdded, MeansOrder, MethodAtStore, OwedQueue, ProviderState, RedeemRequest, SaleLines,
    ShardLoad, ShardReplay, UsableMethods, UsableQuery,
};
pub use error::EngineError;
pub use geo::{AcceptedMethod, Signal, Store};
pub use ids::{AddMeansOptions, ProviderCode, RequestId};
pub use inherent::{InherentId, SigningKey};
pub use keys::{DeviceIndex, DeviceKey, Verified};
pub use means::MeansInput;
pub use notices::{DeliveryNotice, DeviceMessage, Notice};
pub use password::PasswordConfig;
pub use providers::{Provider, Registry};
pub use providers::{TerminalConfirmation, TerminalEntry};
pub use settlegate_adapters as adapters;
pub use shard::state::{
    Balance, CodeSpec, CodeState, IssuedCode, IssuedCoupon, MeansView, Redemption,
};
pub use types::*;
pub use vault::Vault;
