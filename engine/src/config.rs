//! Engine configuration: every tunable and limit, from TOML, with defaults that run.

use serde::{Deserialize, Serialize};
use settlegate_adapters::{AdapterConfig, GuardConfig};

use crate::age::AgeConfig;
use crate::limits::{MAILBOX_CAPACITY_MAX, PROVIDERS_MAX, PROVIDER_NAME_LEN_MAX, SHARDS_MAX};
use crate::password::PasswordConfig;
use crate::providers::TerminalEntry;
use crate::wal::DurabilityConfig;

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
    /// A file holding the vault key's 64 hex digits (surrounding whitespace ignored), read at
    /// start: a Kubernetes Secret mounted as a file, or a systemd credential. A leading
    /// `${CREDENTIALS_DIRECTORY}` is replaced by the directory the caller of
    /// [`EngineConfig::resolve_vault_key`] passes (the server binary passes that environment
    /// variable, systemd's `LoadCredential=`; [`crate::Engine::start`] passes none, so an
    /// embedding program resolves such a path itself and sets [`EngineConfig::vault_key`]); a
    /// relative path is relative to the working directory.
    pub vault_key_file: Option<std::path::PathBuf>,
    /// Settlement providers.
    pub providers: Vec<ProviderConfig>,
    /// The write-ahead log.
    pub durability: DurabilityConfig,
    /// Age rules and the default store age policy (A1–A3).
    pub age: AgeConfig,
    /// The issuer number payment codes and coupons carry (C2).
    pub code_issuer: u16,
    /// Store and forward of the captures, voids, refunds and reversals owed to providers.
    pub forwarding: ForwardingConfig,
    /// Clustering on NATS JetStream (`docs/CLUSTER.md`): the server's top-level `[cluster]`
    /// table, set by the server; none for a single node.
    #[serde(skip)]
    pub cluster: Option<crate::cluster::ClusterConfig>,
    /// The vault key itself, given by the embedding program: it wins over `vault_key_file`
    /// and `vault.key_hex`. Never read from or written to TOML, and never read from the
    /// environment by the engine (the server binary puts `SETTLEGATE_VAULT_KEY` here).
    #[serde(skip)]
    pub vault_key: Option<VaultKey>,
}

/// A 256-bit vault key (see [`EngineConfig::vault_key`]). Its `Debug` form never shows it, and
/// it is wiped from memory when dropped.
#[derive(Clone, PartialEq, Eq)]
pub struct VaultKey(zeroize::Zeroizing<[u8; 32]>);

impl VaultKey {
    /// The key from its 32 bytes.
    pub fn from_bytes(bytes: [u8; 32]) -> VaultKey {
        VaultKey(zeroize::Zeroizing::new(bytes))
    }

    /// The key from its 64 hex digits (surrounding whitespace ignored). The error never
    /// repeats the digits.
    pub fn from_hex(text: &str) -> Result<VaultKey, String> {
        parse_key(text).map(VaultKey::from_bytes)
    }

    /// The key's bytes.
    pub(crate) fn expose(&self) -> &[u8; 32] {
        &self.0
    }
}

impl std::fmt::Debug for VaultKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("VaultKey(<redacted>)")
    }
}

/// Vault key source: [`EngineConfig::vault_key`] when set (the server binary sets it from
/// `SETTLEGATE_VAULT_KEY`); else `[engine] vault_key_file` or this `key_hex` (not both); with
/// none of them, an ephemeral random key is used and a warning logged (demo only: sealed
/// numbers cannot be opened after a restart).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct VaultConfig {
    /// 64 hex digits.
    pub key_hex: Option<String>,
}

/// The variable systemd sets to the directory of a service's credentials (`LoadCredential=`);
/// `${CREDENTIALS_DIRECTORY}` at the start of `vault_key_file` stands for it.
pub const CREDENTIALS_DIRECTORY_ENV: &str = "CREDENTIALS_DIRECTORY";

/// `file` with a leading `${CREDENTIALS_DIRECTORY}` replaced by `credentials_dir`.
fn expand_credentials_dir(
    file: &std::path::Path,
    credentials_dir: Option<std::ffi::OsString>,
) -> Result<std::path::PathBuf, String> {
    const VARIABLE: &str = "${CREDENTIALS_DIRECTORY}";
    let Some(rest) = file.to_str().and_then(|text| text.strip_prefix(VARIABLE)) else {
        return Ok(file.to_owned());
    };
    let dir = credentials_dir.filter(|dir| !dir.is_empty()).ok_or_else(|| {
        format!(
            "engine.vault_key_file {}: {CREDENTIALS_DIRECTORY_ENV} is not set (systemd sets it \
             for a service with LoadCredential=)",
            file.display()
        )
    })?;
    let mut path = std::path::PathBuf::from(dir);
    path.push(rest.trim_start_matches('/'));
    Ok(path)
}

/// 64 hex digits, surrounding whitespace ignored, as a 256-bit key.
fn parse_key(text: &str) -> Result<[u8; 32], String> {
    let bytes = hex::decode(text.trim()).map_err(|_| "the vault key is not hex".to_owned())?;
    bytes.try_into().map_err(|_| "the vault key must be 32 bytes (64 hex digits)".to_owned())
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

/// `[engine.forwarding]`: store and forward of the operations owed to providers
/// (`docs/CONFIG.md`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ForwardingConfig {
    /// Operations owed a shard keeps at most: at the bound, what would add one by choice
    /// (`ISSUE_CODE`, `REDEEM_CODE` of a code with a provider reference, `VOID`, `REFUND`) is
    /// refused `ProviderUnavailable` until the queue drains. Expiries and reversals are owed
    /// whatever the count (they cannot wait).
    pub owed_max_per_shard: usize,
    /// How often the forwarder looks for owed operations, in ms.
    pub interval_ms: u64,
    /// The first retry's delay after a failed send, in ms; doubled per failure.
    pub retry_initial_ms: u64,
    /// The longest delay between retries, in ms.
    pub retry_max_ms: u64,
    /// An owed operation older than this makes the forwarder log an ERROR with its age (at
    /// most once per this period and provider), in ms.
    pub alarm_after_ms: u64,
    /// Operations the forwarder sends at once per shard at most.
    pub batch_max: usize,
    /// How long a settled payment (`AUTHORIZE`, at a provider whose sales may be refunded)
    /// can be refunded (`REFUND` target 2), in ms from its authorization: until then its shard
    /// keeps what a refund needs; then the sweeper drops it.
    pub refund_window_ms: u64,
    /// Settled payments a shard keeps for refunds at most: at the bound, the one whose window
    /// ends first is dropped for the new one (it can no longer be refunded).
    pub settled_max_per_shard: usize,
}

impl Default for ForwardingConfig {
    fn default() -> Self {
        ForwardingConfig {
            owed_max_per_shard: 100_000,
            interval_ms: 200,
            retry_initial_ms: 500,
            retry_max_ms: 60_000,
            alarm_after_ms: 300_000,
            batch_max: 256,
            refund_window_ms: 30 * 24 * 3_600_000,
            settled_max_per_shard: 1_000_000,
        }
    }
}

impl ForwardingConfig {
    fn validate(&self) -> Result<(), String> {
        let check = |ok: bool, message: &str| if ok { Ok(()) } else { Err(message.to_owned()) };
        check(self.owed_max_per_shard > 0, "forwarding.owed_max_per_shard must be positive")?;
        check(self.interval_ms > 0, "forwarding.interval_ms must be positive")?;
        check(self.retry_initial_ms > 0, "forwarding.retry_initial_ms must be positive")?;
        check(
            self.retry_max_ms >= self.retry_initial_ms,
            "forwarding.retry_max_ms must be at least retry_initial_ms",
        )?;
        check(self.alarm_after_ms > 0, "forwarding.alarm_after_ms must be positive")?;
        check((1..=4096).contains(&self.batch_max), "forwarding.batch_max must be 1..=4096")?;
        check(
            self.refund_window_ms <= 366 * 24 * 3_600_000,
            "forwarding.refund_window_ms must be at most 366 days",
        )?;
        check(
            self.settled_max_per_shard <= 100_000_000,
            "forwarding.settled_max_per_shard must be at most 100000000",
        )
    }
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
            vault_key_file: None,
            providers: Vec::new(),
            durability: DurabilityConfig::default(),
            age: AgeConfig::default(),
            code_issuer: 1,
            forwarding: ForwardingConfig::default(),
            cluster: None,
            vault_key: None,
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
        self.forwarding.validate()?;
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
            provider.adapter.validate().map_err(|error| {
                format!("engine.providers[code {}].adapter: {error}", provider.code)
            })?;
            for (i, terminal) in provider.terminals.iter().enumerate() {
                terminal
                    .check(&format!("engine.providers[code {}].terminals[{i}]", provider.code))?;
            }
        }
        self.age.validate()?;
        check(
            self.vault_key_file.is_none() || self.vault.key_hex.is_none(),
            "set engine.vault_key_file or engine.vault.key_hex, not both",
        )?;
        Ok(())
    }

    /// The vault key in force: [`EngineConfig::vault_key`], else `vault_key_file`'s contents
    /// (a leading `${CREDENTIALS_DIRECTORY}` replaced by `credentials_dir`, which the caller
    /// reads from wherever it likes: the engine reads no environment variable), else
    /// `vault.key_hex`, else `None`. Errors name where the key came from, never its digits.
    pub fn resolve_vault_key(
        &self,
        credentials_dir: Option<std::ffi::OsString>,
    ) -> Result<Option<VaultKey>, String> {
        if let Some(key) = &self.vault_key {
            return Ok(Some(key.clone()));
        }
        if let Some(file) = &self.vault_key_file {
            let path = expand_credentials_dir(file, credentials_dir)?;
            let text = std::fs::read_to_string(&path).map_err(|e| {
                format!("engine.vault_key_file {}: cannot read it: {e}", path.display())
            })?;
            return VaultKey::from_hex(&text)
                .map(Some)
                .map_err(|e| format!("engine.vault_key_file {}: {e}", path.display()));
        }
        match &self.vault.key_hex {
            Some(text) => {
                VaultKey::from_hex(text).map(Some).map_err(|e| format!("engine.vault.key_hex: {e}"))
            }
            None => Ok(None),
        }
    }
}

#[cfg(test)]
mod vault_key_tests {
    use super::{EngineConfig, VaultConfig, VaultKey};

    const KEY_HEX: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    fn key(hex_text: &str) -> VaultKey {
        VaultKey::from_bytes(hex::decode(hex_text).unwrap().try_into().unwrap())
    }

    fn file_config(path: &std::path::Path) -> EngineConfig {
        EngineConfig { vault_key_file: Some(path.to_owned()), ..EngineConfig::default() }
    }

    #[test]
    fn key_file_is_read_with_surrounding_whitespace_ignored() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vault-key");
        std::fs::write(&path, format!("  {KEY_HEX}\n\n")).unwrap();
        let found = file_config(&path).resolve_vault_key(None).unwrap();
        assert_eq!(found, Some(key(KEY_HEX)));
    }

    #[test]
    fn the_given_key_wins_over_the_key_file_and_the_file_over_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vault-key");
        std::fs::write(&path, KEY_HEX).unwrap();
        let given = "ff".repeat(32);
        let with_key = |mut config: EngineConfig| {
            config.vault_key = Some(key(&given));
            config
        };
        let found = with_key(file_config(&path)).resolve_vault_key(None).unwrap();
        assert_eq!(found, Some(key(&given)));
        // The given key wins even over a key file that is missing.
        let missing = with_key(file_config(&dir.path().join("missing")));
        assert_eq!(missing.resolve_vault_key(None).unwrap(), Some(key(&given)));
        assert_eq!(format!("{:?}", key(&given)), "VaultKey(<redacted>)");
        let hex_only = EngineConfig {
            vault: VaultConfig { key_hex: Some("11".repeat(32)) },
            ..EngineConfig::default()
        };
        assert_eq!(
            hex_only.resolve_vault_key(None).unwrap(),
            Some(VaultKey::from_bytes([0x11; 32]))
        );
        assert_eq!(EngineConfig::default().resolve_vault_key(None).unwrap(), None);
    }

    #[test]
    fn credentials_directory_is_expanded() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("vault-key"), KEY_HEX).unwrap();
        let config = file_config("${CREDENTIALS_DIRECTORY}/vault-key".as_ref());
        let found = config.resolve_vault_key(Some(dir.path().as_os_str().to_owned())).unwrap();
        assert_eq!(found, Some(key(KEY_HEX)));
        let unset = config.resolve_vault_key(None).unwrap_err();
        assert!(unset.contains("CREDENTIALS_DIRECTORY is not set"), "{unset}");
        assert!(unset.contains("${CREDENTIALS_DIRECTORY}/vault-key"), "{unset}");
    }

    #[test]
    fn errors_name_the_file_and_never_the_key() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("missing");
        let error = file_config(&missing).resolve_vault_key(None).unwrap_err();
        assert!(error.contains(&missing.display().to_string()), "{error}");
        assert!(error.contains("cannot read"), "{error}");

        let short = dir.path().join("short");
        std::fs::write(&short, &KEY_HEX[..62]).unwrap();
        let error = file_config(&short).resolve_vault_key(None).unwrap_err();
        assert!(error.contains(&short.display().to_string()), "{error}");
        assert!(error.contains("64 hex digits"), "{error}");
        assert!(!error.contains(&KEY_HEX[..62]), "{error}");

        let not_hex = dir.path().join("not-hex");
        std::fs::write(&not_hex, "zz".repeat(32)).unwrap();
        let error = file_config(&not_hex).resolve_vault_key(None).unwrap_err();
        assert!(error.contains(&not_hex.display().to_string()), "{error}");
        assert!(error.contains("not hex"), "{error}");
    }

    #[test]
    fn key_file_and_key_hex_together_are_refused() {
        let config = EngineConfig {
            vault: VaultConfig { key_hex: Some(KEY_HEX.into()) },
            vault_key_file: Some("/k".into()),
            ..EngineConfig::default()
        };
        let error = config.validate().unwrap_err();
        assert_eq!(error, "set engine.vault_key_file or engine.vault.key_hex, not both");
        let parsed =
            EngineConfig::from_toml("vault_key_file = \"/run/secrets/vault-key\"").unwrap();
        assert_eq!(parsed.vault_key_file.as_deref(), Some("/run/secrets/vault-key".as_ref()));
    }
}
