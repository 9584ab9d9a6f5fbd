//! Shared bench setup: an engine on a fixed clock with enrolled users and zero-latency
//! providers, and pre-signed inherent IDs (signing is the phone's work, not the engine's).
#![allow(dead_code)] // each bench binary uses part of it

use settlegate_engine::{AddMeansOptions, RequestId};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use settlegate_engine::adapters::simulated::SimulatedConfig;
use settlegate_engine::adapters::{AdapterConfig, GuardConfig};
use settlegate_engine::password::PasswordConfig;
use settlegate_engine::{
    AuthorizeRequest, Currency, DeviceCredential, Engine, EngineConfig, EnrollRequest, InherentId,
    ManualClock, MeansInput, MeansKind, ProviderConfig, UserIdType, UserKey,
};

pub const NOW_MS: i64 = 1_795_305_600_000;
pub const PROVIDER: u32 = 1;

pub struct Payer {
    pub user: UserKey,
    pub credential: DeviceCredential,
    pub counter: AtomicU64,
}

pub struct Bench {
    pub engine: Engine,
    pub payers: Vec<Payer>,
    next_id: AtomicU64,
}

pub fn config() -> EngineConfig {
    EngineConfig {
        // Cheap hashing: enrollment is setup here, not what is measured.
        password: PasswordConfig { memory_kib: 64, iterations: 1, parallelism: 1 },
        vault: settlegate_engine::config::VaultConfig { key_hex: Some("22".repeat(32)) },
        mailbox_capacity: 4096,
        providers: vec![ProviderConfig {
            code: PROVIDER,
            name: "zero-latency".into(),
            adapter: AdapterConfig::Simulated(SimulatedConfig::default()),
            limits: GuardConfig { concurrency_max: 1 << 20, timeout_ms: 5_000 },
            terminals: Vec::new(),
        }],
        ..EngineConfig::default()
    }
}

impl Bench {
    pub fn new(runtime: &tokio::runtime::Runtime, users: usize) -> Bench {
        Bench::with_config(runtime, users, config())
    }

    pub fn with_config(
        runtime: &tokio::runtime::Runtime,
        users: usize,
        config: EngineConfig,
    ) -> Bench {
        let clock = Arc::new(ManualClock::new(NOW_MS));
        let engine = Engine::start_with_clock(config, clock).expect("engine");
        let payers = runtime.block_on(async {
            let mut payers = Vec::with_capacity(users);
            // Enroll in concurrent chunks: a million users is a realistic dataset.
            for chunk in (0..users).collect::<Vec<_>>().chunks(512) {
                let enrolled =
                    futures::future::join_all(chunk.iter().map(|&i| enroll(&engine, i))).await;
                payers.extend(enrolled);
            }
            payers
        });
        Bench { engine, payers, next_id: AtomicU64::new(1) }
    }

    /// One signed inherent ID from payer `i % payers`, with a fresh counter.
    pub fn signed(&self, i: usize) -> Vec<u8> {
        let payer = &self.payers[i % self.payers.len()];
        InherentId {
            key_version: payer.credential.key_version,
            amount_minor: 1_000 + (i as u64 % 1_000),
            currency: Currency::try_from("JPY").unwrap(),
            means: MeansKind::CreditCard,
            means_id: 0,
            provider_code: PROVIDER,
            card_idm: payer.credential.card_idm,
            user: payer.user.clone(),
            terminal_id: "TERM-0001".into(),
            counter: payer.counter.fetch_add(1, Ordering::Relaxed),
            timestamp_ms: NOW_MS,
        }
        .sign(payer.credential.device_key.expose())
    }

    /// A batch of fresh authorization requests.
    pub fn requests(&self, count: usize) -> Vec<AuthorizeRequest> {
        (0..count)
            .map(|i| AuthorizeRequest {
                client_request_id: RequestId(
                    u128::from(self.next_id.fetch_add(1, Ordering::Relaxed)) << 32,
                ),
                inherent_id: self.signed(i),
            })
            .collect()
    }
}

async fn enroll(engine: &Engine, i: usize) -> Payer {
    let user = UserKey::new(UserIdType::Mail, format!("user{i:07}@example.com")).unwrap();
    let credential = engine
        .enroll(EnrollRequest {
            client_request_id: RequestId(i as u128 + 1),
            user: user.clone(),
            password: "bench password".into(),
            card_idm: (i as u64 + 1).to_be_bytes(),
        })
        .await
        .expect("enroll");
    let card = MeansInput::CreditCard { pan: "4111111111111111".into() };
    engine
        .add_means(
            RequestId(1 << 64 | i as u128),
            &user,
            &card,
            AddMeansOptions { make_default: true },
        )
        .await
        .expect("card");
    Payer { user, credential, counter: AtomicU64::new(1) }
}
