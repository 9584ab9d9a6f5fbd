//! Engine configuration: every tunable and limit, from TOML, with defaults that run.

use serde::{Deserialize, Serialize};
use settlegate_adapters::{AdapterConfig, GuardConfig};

use crate::age::AgeConfig;
use crate::limits::{MAILBOX_CAPACITY_MAX, PROVIDERS_MAX, PROVIDER_NAME_LEN_MAX, SHARDS_MAX};
use crate::password::PasswordConfig;
use crate::providers::TerminalEntry;
use crate::wal::DurabilityConfig;

/// The environment variable that carries the vault key (64 hex digits); it wins over config.
pub const VAULT_KEY_ENV: &str = "SETTLEGATE_VAULT_KEY";

/// Engine configuration (the `[engine]` table of the server's TOML file).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct EngineConfig {
    /// Shard actors; `0` means one per two cores (see [`EngineConfig::shard_count`]).
    pub shards: usize,
    /// Batches queued per shard before admission answers busy.
    pub mailbox_capacity: usize,
    /// The retry-after hint given with a busy answer, in ms.
    pub busy_retry_after_ms: u32,
    /// Accepted distance between an inherent ID's timestamp and the engine's clock, in ms.
    pub timestamp_window_ms: i64,
    /// How long a rotated-out device key stays valid, in ms.
    pub key_grace_ms: i64,
    /// Deadline of an authorization from admission to outcome, in ms.
    pub request_deadline_ms: u64,
    /// How long idempotency records are kept, in ms.
    pub idempotency_ttl_ms: i64,
    /// Idempotency records kept per shard at most.
    pub idempotency_records_max: usize,
    /// Consecutive failed logins that lock an account.
    pub login_failures_max: u32,
    /// How long a lockout lasts, in ms.
    pub lockout_ms: i64,
    /// Argon2id costs.
    pub password: PasswordConfig,
    /// The card vault.
    pub vault: VaultConfig,
    /// Settlement providers.
    pub providers: Vec<ProviderConfig>,
    /// The write-ahead log.
    pub durability: DurabilityConfig,
    /// Age rules and the default store age policy (A1–A3).
    pub age: AgeConfig,
    /// The issuer number payment codes and coupons carry (C2).
    pub code_issuer: u16,
    /// Clustering on NATS JetStream (`docs/CLUSTER.md`): the server's top-level `[cluster]`
    /// table, set by the server; none for a single node.
    #[serde(skip)]
    pub cluster: Option<crate::cluster::ClusterConfig>,
}

/// Vault key source. `SETTLEGATE_VAULT_KEY` in the environment overrides `key_hex`; with
/// neither, an ephemeral random key is used and a warning logged (demo only: sealed numbers
/// cannot be opened after a restart).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct VaultConfig {
    /// 64 hex digits.
    pub key_hex: Option<String>,
}

/// One provider.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ProviderConfig {
    /// Designation code.
    pub code: u32,
    /// Display name.
    pub name: String,
    /// The adapter that talks to it.
    #[serde(default)]
    pub adapter: AdapterConfig,
    /// Concurrency limit and timeout.
    #[serde(default)]
    pub limits: GuardConfig,
    /// Terminals listed at start.
    #[serde(default)]
    pub terminals: Vec<TerminalEntry>,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            shards: 0,
            mailbox_capacity: 1024,
            busy_retry_after_ms: 5,
            timestamp_window_ms: 300_000,
            key_grace_ms: 86_400_000,
            request_deadline_ms: 5_000,
            idempotency_ttl_ms: 86_400_000,
            idempotency_records_max: 1_000_000,
            login_failures_max: 5,
            lockout_ms: 900_000,
            password: PasswordConfig::default(),
            vault: VaultConfig::default(),
            providers: Vec::new(),
            durability: DurabilityConfig::default(),
            age: AgeConfig::default(),
            code_issuer: 1,
            cluster: None,
        }
    }
}

impl EngineConfig {
    /// Parses TOML.
    pub fn from_toml(text: &str) -> Result<EngineConfig, String> {
        toml::from_str(text).map_err(|e| e.to_string())
    }

    /// The shard count in force: `shards`, or when it is 0 one per two cores (at least one).
    /// Shards are the units that apply state changes one at a time (on a caller's thread when
    /// idle, else on their own); more shards let more batches apply at once, but each shard a
    /// batch touches costs it a turn of its own. On two cores one shard served the same load
    /// with 7–10% less CPU per request than two (`docs/BENCHMARKS-HISTORY.md`). An engine with a
    /// data directory keeps the count its data was written with (the count must not change across
    /// restarts).
    pub fn shard_count(&self) -> usize {
        if self.shards == 0 {
            let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
            (cores / 2).clamp(1, SHARDS_MAX)
        } else {
            self.shards
        }
    }

    /// The shard count an engine started with this config runs: [`EngineConfig::shard_count`],
    /// except that with `shards = 0` and a data directory already written, the count that
    /// data was written with (the count must not change across restarts, and a machine of
    /// another size must still open its data).
    pub fn shard_count_in_force(&self) -> Result<usize, crate::wal::StorageError> {
        let recorded = match (&self.durability.data_dir, self.shards) {
            (Some(dir), 0) => crate::wal::recorded_shard_count(dir)?,
            _ => None,
        };
        Ok(recorded.unwrap_or_else(|| self.shard_count()))
    }

    /// Checks every value against its limits; names the first that is wrong.
    pub fn validate(&self) -> Result<(), String> {
        let check = |ok: bool, what: &str| if ok { Ok(()) } else { Err(what.to_owned()) };
        check(self.shards <= SHARDS_MAX, "shards must be at most 256")?;
        if let Some(cluster) = &self.cluster {
            cluster.validate()?;
            check(
                self.shards > 0,
                "a cluster's partition count is engine.shards, and must be set (the same on every node)",
            )?;
            check(
                self.durability.data_dir.is_none(),
                "a cluster node keeps its partitions in NATS JetStream: engine.durability.data_dir must not be set",
            )?;
        }
        check(
            (1..=MAILBOX_CAPACITY_MAX).contains(&self.mailbox_capacity),
            "mailbox_capacity must be 1..=65536",
        )?;
        check(self.timestamp_window_ms > 0, "timestamp_window_ms must be positive")?;
        check(self.key_grace_ms >= 0, "key_grace_ms must not be negative")?;
        check(self.request_deadline_ms > 0, "request_deadline_ms must be positive")?;
        check(self.idempotency_ttl_ms > 0, "idempotency_ttl_ms must be positive")?;
        check(
            (1..=crate::shard::idempotency::RECORDS_MAX_LIMIT)
                .contains(&(self.idempotency_records_max as u64)),
            "idempotency_records_max must be 1..=4294967296",
        )?;
        check(self.login_failures_max > 0, "login_failures_max must be positive")?;
        check(self.lockout_ms >= 0, "lockout_ms must not be negative")?;
        check(
            self.durability.fsync_interval_ms > 0,
            "durability.fsync_interval_ms must be positive",
        )?;
        check(self.providers.len() <= PROVIDERS_MAX, "at most 1024 providers")?;
        let mut codes: Vec<u32> = self.providers.iter().map(|p| p.code).collect();
        codes.sort_unstable();
        check(codes.windows(2).all(|w| w[0] != w[1]), "provider codes must be unique")?;
        for provider in &self.providers {
            check(
                provider.limits.concurrency_max > 0,
                "provider concurrency_max must be positive",
            )?;
            check(provider.limits.timeout_ms > 0, "provider timeout_ms must be positive")?;
            check(
                !provider.name.is_empty() && provider.name.len() <= PROVIDER_NAME_LEN_MAX,
                "provider name must be 1..=48 bytes",
            )?;
        }
        self.age.validate()?;
        Ok(())
    }

    /// The vault key: from the environment, then config, else `None`.
    pub fn vault_key(&self) -> Result<Option<[u8; 32]>, String> {
        let text = match std::env::var(VAULT_KEY_ENV) {
            Ok(text) => Some(text),
            Err(_) => self.vault.key_hex.clone(),
        };
        let Some(text) = text else { return Ok(None) };
        let bytes = hex::decode(text.trim()).map_err(|_| "vault key is not hex".to_owned())?;
        let key: [u8; 32] = bytes
            .try_into()
            .map_err(|_| "vault key must be 32 bytes (64 hex digits)".to_owned())?;
        Ok(Some(key))
    }
}
