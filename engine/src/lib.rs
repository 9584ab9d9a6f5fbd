//! settlegate-engine: an embeddable payment authorization engine on sharded actors.
//!
//! Start one with [`Engine::start`] from an [`EngineConfig`], then call its async methods:
//! enrollment and settlement means (G1), providers' terminal lists and the terminal
//! confirmation query (G2), and settlement authorization (G3), one by one or in batches.
//!
//! Layout, from the bytes inwards:
//! - [`inherent`]: the signed binary record a user terminal builds;
//! - [`keys`]: device keys and batch verification of their HMAC-SHA256 tags (rayon);
//! - `shard`: actix actors, each owning a slice of users, applying commands in order;
//! - [`providers`]: providers, terminal lists and services, and the adapters behind them;
//! - [`geo`] and [`emvqr`]: stores, the store-geo index and QR posters (W1–W2);
//! - [`codes`]: payment codes and coupons, their format and tags (C1–C5, T1);
//! - [`age`]: age registrations, rules per jurisdiction and the basket check (A1–A3);
//! - [`vault`] and [`password`]: the only places a card number or password is handled;
//! - [`cluster`]: partitions replicated on NATS JetStream, ownership and fencing;
//! - [`engine`]: the facade that routes requests through all of the above;
//! - [`alloc`]: allocator tuning for the process that holds the state.
#![deny(missing_docs)]

pub mod age;
pub mod alloc;
pub mod clock;
pub mod cluster;
pub mod codes;
pub mod config;
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
pub mod keys;
pub mod limits;
pub mod means;
pub mod notices;
pub mod password;
pub mod providers;
mod shard;
mod startup;
pub mod types;
pub mod vault;
pub mod wal;

/// The concurrent map the engine's shared tables use (devices, provider terminals, vault
/// tokens, notice channels): a `DashMap` hashed with foldhash, seeded at random per process,
/// so that a key from the network cannot be chosen to collide; hashing a key costs a few
/// instructions, where SipHash (`DashMap`'s default) was 2–3% of the server's time on the
/// authorize path.
pub(crate) type SharedMap<K, V> = dashmap::DashMap<K, V, foldhash::fast::RandomState>;

pub use age::{AgeCheck, AgePolicy, AgeRecord, AgeVerdict, Basket, BasketItem, OnAgeFailure};
pub use clock::{Clock, ManualClock, SystemClock};
pub use config::{EngineConfig, ProviderConfig};
pub use engine::{replay_shard, shard_of_user};
pub use engine::{
    AuthorizeRequest, BasketOutcome, BestBy, CodeOutcome, DeviceCredential, Engine, EnrollRequest,
    EnteredStore, IssueCodeRequest, MeansAdded, MeansOrder, MethodAtStore, ProviderState,
    RedeemRequest, SaleLines, ShardLoad, ShardReplay, UsableMethods, UsableQuery,
};
pub use error::EngineError;
pub use geo::{AcceptedMethod, Signal, Store};
pub use ids::{AddMeansOptions, ProviderCode, RequestId};
pub use inherent::{InherentId, SigningKey};
pub use keys::DeviceKey;
pub use means::MeansInput;
pub use notices::{DeliveryNotice, DeviceMessage, Notice};
pub use providers::{TerminalConfirmation, TerminalEntry};
pub use settlegate_adapters as adapters;
pub use shard::state::{
    Balance, CodeSpec, CodeState, IssuedCode, IssuedCoupon, MeansView, Redemption,
};
pub use types::*;
