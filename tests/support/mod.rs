//! Shared test harness: an engine on a manual clock with cheap password hashing, three
//! simulated providers, and helpers that build signed inherent IDs.
#![allow(dead_code)]

pub mod gate;
pub mod nats;
pub mod server;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use settlegate_engine::adapters::simulated::SimulatedConfig;
use settlegate_engine::adapters::{AdapterConfig, GuardConfig};
use settlegate_engine::password::PasswordConfig;
use settlegate_engine::{
    AddMeansOptions, AuthOutcome, AuthorizeRequest, Currency, DeviceCredential, Engine,
    EngineConfig, EnrollRequest, InherentId, ManualClock, MeansInput, MeansKind, ProviderConfig,
    RequestId, UserIdType, UserKey,
};

/// 2026-11-22T00:00:00Z.
pub const T0_MS: i64 = 1_795_305_600_000;
/// Approves everything up to 1,000,000 minor units, instantly.
pub const PROVIDER_OK: u32 = 100;
/// Declines every request (`do_not_honor`).
pub const PROVIDER_DECLINE: u32 = 200;
/// Answers after 30 s; its timeout is 100 ms.
pub const PROVIDER_SLOW: u32 = 300;
/// Answers when the test says ([`gate::Gate`]), with a timeout of a minute; only in engines
/// started with [`Harness::gated`].
pub const PROVIDER_GATED: u32 = 400;
pub const APPROVE_LIMIT: u64 = 1_000_000;
pub const PASSWORD: &str = "correct horse battery";

static NEXT_ID: AtomicU64 = AtomicU64::new(1);
static NEXT_IDM: AtomicU64 = AtomicU64::new(1);

/// A fresh client request ID.
pub fn request_id() -> RequestId {
    RequestId(u128::from(NEXT_ID.fetch_add(1, Ordering::Relaxed)))
}

/// A fresh card IDm.
pub fn fresh_idm() -> [u8; 8] {
    NEXT_IDM.fetch_add(1, Ordering::Relaxed).to_be_bytes()
}

pub fn jpy() -> Currency {
    Currency::try_from("JPY").unwrap()
}

/// Provider `code`, named `name`, simulated and approving after `latency_us`, at most 64
/// calls in flight and a 5 s timeout.
pub fn simulated_provider(code: u32, name: &str, latency_us: u64) -> ProviderConfig {
    ProviderConfig {
        code,
        name: name.into(),
        adapter: simulated(code.into(), 0.0, latency_us),
        limits: GuardConfig { concurrency_max: 64, timeout_ms: 5_000 },
        terminals: Vec::new(),
    }
}

/// As [`simulated_provider`], approving after a latency drawn from `min_us` to `max_us`.
pub fn simulated_provider_between(
    code: u32,
    name: &str,
    min_us: u64,
    max_us: u64,
) -> ProviderConfig {
    let mut provider = simulated_provider(code, name, min_us);
    if let AdapterConfig::Simulated(simulated) = &mut provider.adapter {
        simulated.latency_us_max = max_us;
    }
    provider
}

pub fn simulated(seed: u64, decline_rate: f64, latency_us: u64) -> AdapterConfig {
    AdapterConfig::Simulated(SimulatedConfig {
        seed,
        decline_rate,
        latency_us_min: latency_us,
        latency_us_max: latency_us,
        approve_limit_minor: APPROVE_LIMIT,
        ..SimulatedConfig::default()
    })
}

/// The test config: cheap Argon2 (tests only), small mailboxes, three providers.
pub fn config() -> EngineConfig {
    config_answering_after(0)
}

/// [`config`], keeping its state in `dir`, with a snapshot every `snapshot_every_records`
/// records (0: none, so a restart replays the whole log).
pub fn durable_config(dir: &std::path::Path, snapshot_every_records: u64) -> EngineConfig {
    let mut config = config();
    config.durability.data_dir = Some(dir.to_owned());
    config.durability.snapshot_every_records = snapshot_every_records;
    config
}

/// [`config`], with the approving and declining providers answering after `latency_us`: 0
/// answers at once, so the shard completes each payment in the step that reserves it; more
/// sends each payment back through the caller to its provider and into the shard again.
pub fn config_answering_after(latency_us: u64) -> EngineConfig {
    EngineConfig {
        shards: 2,
        mailbox_capacity: 4,
        password: PasswordConfig { memory_kib: 64, iterations: 1, parallelism: 1 },
        vault: settlegate_engine::config::VaultConfig { key_hex: Some("11".repeat(32)) },
        providers: vec![
            ProviderConfig {
                code: PROVIDER_OK,
                name: "ok".into(),
                adapter: simulated(1, 0.0, latency_us),
                limits: GuardConfig::default(),
                terminals: Vec::new(),
            },
            ProviderConfig {
                code: PROVIDER_DECLINE,
                name: "decline".into(),
                adapter: simulated(2, 1.0, latency_us),
                limits: GuardConfig::default(),
                terminals: Vec::new(),
            },
            ProviderConfig {
                code: PROVIDER_SLOW,
                name: "slow".into(),
                adapter: simulated(3, 0.0, 30_000_000),
                limits: GuardConfig { concurrency_max: 16, timeout_ms: 100 },
                terminals: Vec::new(),
            },
        ],
        ..EngineConfig::default()
    }
}

pub struct Harness {
    pub engine: Engine,
    pub clock: Arc<ManualClock>,
}

impl Harness {
    pub fn new() -> Harness {
        Harness::with_config(config())
    }

    pub fn with_config(config: EngineConfig) -> Harness {
        let clock = Arc::new(ManualClock::new(T0_MS));
        let engine = Engine::start_with_clock(config, clock.clone()).expect("engine starts");
        Harness { engine, clock }
    }

    /// An engine on `config`, with [`PROVIDER_GATED`] added to it and served by a gated
    /// provider whose answers the test gives; the request deadline is a minute.
    pub fn gated(mut config: EngineConfig) -> (Harness, Arc<gate::Gate>) {
        config.request_deadline_ms = 60_000;
        config.providers.push(ProviderConfig {
            code: PROVIDER_GATED,
            name: "gated".into(),
            adapter: AdapterConfig::default(),
            limits: GuardConfig { concurrency_max: 16, timeout_ms: 60_000 },
            terminals: Vec::new(),
        });
        let (adapter, gate) = gate::Gate::new();
        let clock = Arc::new(ManualClock::new(T0_MS));
        let engine =
            Engine::start_with_adapters(config, clock.clone(), vec![(PROVIDER_GATED, adapter)])
                .expect("engine starts");
        (Harness { engine, clock }, gate)
    }

    /// Enrolls `name@example.com` with a card as default means.
    pub async fn user(&self, name: &str) -> TestUser {
        let user = UserKey::new(UserIdType::Mail, format!("{name}@example.com")).unwrap();
        let credential = self
            .engine
            .enroll(EnrollRequest {
                client_request_id: request_id(),
                user: user.clone(),
                password: PASSWORD.into(),
                card_idm: fresh_idm(),
            })
            .await
            .expect("enroll");
        let card = MeansInput::CreditCard { pan: "4111111111111111".into() };
        let options = AddMeansOptions { make_default: true };
        self.engine.add_means(request_id(), &user, &card, options).await.expect("add card");
        TestUser { user, credential, counter: AtomicU64::new(1) }
    }

    /// Rotates the key of `user`'s enrolled device; returns the new key.
    pub async fn rotate_key(&self, user: &TestUser) -> DeviceCredential {
        self.engine
            .rotate_device_key(request_id(), &user.user, PASSWORD, user.credential.card_idm)
            .await
            .expect("rotate")
    }

    pub async fn authorize(&self, bytes: Vec<u8>) -> AuthOutcome {
        self.engine
            .authorize(AuthorizeRequest { client_request_id: request_id(), inherent_id: bytes })
            .await
            .expect("an outcome")
    }
}

pub struct TestUser {
    pub user: UserKey,
    pub credential: DeviceCredential,
    pub counter: AtomicU64,
}

impl TestUser {
    /// An inherent ID for `amount` JPY at `terminal` via `provider`, with a fresh counter.
    pub fn record(&self, now_ms: i64, amount: u64, provider: u32, terminal: &str) -> InherentId {
        InherentId {
            key_version: self.credential.key_version,
            amount_minor: amount,
            currency: jpy(),
            means: MeansKind::CreditCard,
            means_id: 0,
            provider_code: provider,
            card_idm: self.credential.card_idm,
            user: self.user.clone(),
            terminal_id: terminal.into(),
            counter: self.counter.fetch_add(1, Ordering::Relaxed),
            timestamp_ms: now_ms,
        }
    }

    /// The same, signed with the device key.
    pub fn signed(&self, now_ms: i64, amount: u64, provider: u32, terminal: &str) -> Vec<u8> {
        self.record(now_ms, amount, provider, terminal).sign(self.credential.device_key.expose())
    }
}

pub fn approved(outcome: AuthOutcome) -> settlegate_engine::Approval {
    match outcome {
        AuthOutcome::Approved(approval) => approval,
        other => panic!("expected approval, got {other:?}"),
    }
}
