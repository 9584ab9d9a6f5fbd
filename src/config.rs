//! The server's TOML config: `[server]` (listeners, limits, identities, TLS), `[engine]`
//! (see `settlegate_engine::EngineConfig`) and `[demo]`.

use std::net::SocketAddr;
use std::path::PathBuf;

use serde::Deserialize;
use settlegate_engine::config::{VaultKey, CREDENTIALS_DIRECTORY_ENV};
use settlegate_engine::EngineConfig;

/// The environment variable that carries the vault key (64 hex digits); it wins over the
/// config's `vault_key_file` and `vault.key_hex` (`docs/CONFIG.md`). The binary reads it; the
/// engine library reads no environment variable.
pub const VAULT_KEY_ENV: &str = "SETTLEGATE_VAULT_KEY";

/// The embedded default config (`src/default.toml`).
pub const DEFAULT_CONFIG: &str = include_str!("default.toml");

/// The whole config file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Listeners, limits, identities.
    #[serde(default)]
    pub server: ServerConfig,
    /// The engine.
    #[serde(default)]
    pub engine: EngineConfig,
    /// Demo data loaded at start.
    #[serde(default)]
    pub demo: DemoConfig,
    /// Clustering on NATS JetStream (`docs/CLUSTER.md`); absent: a single node.
    #[serde(default)]
    pub cluster: Option<settlegate_engine::cluster::ClusterConfig>,
}

impl Config {
    /// Parses TOML and checks it.
    pub fn from_toml(text: &str) -> Result<Config, String> {
        let mut config: Config = toml::from_str(text).map_err(|e| e.to_string())?;
        config.engine.cluster = config.cluster.clone();
        if config.cluster.is_some() && (config.demo.users > 0 || config.demo.stores) {
            return Err("demo data is for a single node: set [demo] users = 0 and stores = false in a cluster".into());
        }
        config.server.validate()?;
        config.engine.validate()?;
        Ok(config)
    }

    /// What is legal but probably a mistake, one line each (logged at start and printed by
    /// `settlegate check-config`).
    pub fn warnings(&self) -> Vec<String> {
        let mut warnings = Vec::new();
        if self.server.identities.is_empty() {
            warnings.push(
                "server.identities is empty: no client can ever authenticate (add an \
                 [[server.identities]] table with an api_key_sha256 or a cert_sha256)"
                    .to_owned(),
            );
        }
        warnings
    }

    /// The embedded default.
    pub fn embedded() -> Config {
        Config::from_toml(DEFAULT_CONFIG).expect("the embedded config is valid")
    }

    /// The engine's config as the binary starts it ([`engine_config_from_env`]).
    pub fn engine_config(&self) -> Result<EngineConfig, String> {
        engine_config_from_env(&self.engine)
    }
}

/// The engine's config as the binary starts it: the vault key resolved from
/// `SETTLEGATE_VAULT_KEY` when it is set, else from `vault_key_file` (a leading
/// `${CREDENTIALS_DIRECTORY}` taken from the environment), else `vault.key_hex`, and put in
/// [`EngineConfig::vault_key`] (see [`engine_with_vault_key`]). Reads files: blocking.
pub fn engine_config_from_env(engine: &EngineConfig) -> Result<EngineConfig, String> {
    engine_with_vault_key(
        engine,
        std::env::var(VAULT_KEY_ENV).ok(),
        std::env::var_os(CREDENTIALS_DIRECTORY_ENV),
    )
}

/// `engine` with its vault key resolved given the value of `SETTLEGATE_VAULT_KEY` (`env_key`)
/// and of `CREDENTIALS_DIRECTORY` (`credentials_dir`): `env_key`, else `vault_key_file`'s
/// contents, else `vault.key_hex`, else none. Errors name where the key came from, never its
/// digits.
pub fn engine_with_vault_key(
    engine: &EngineConfig,
    env_key: Option<String>,
    credentials_dir: Option<std::ffi::OsString>,
) -> Result<EngineConfig, String> {
    let mut engine = engine.clone();
    if let Some(text) = env_key {
        let key = VaultKey::from_hex(&text).map_err(|e| format!("{VAULT_KEY_ENV}: {e}"))?;
        engine.vault_key = Some(key);
    }
    engine.vault_key = engine.resolve_vault_key(credentials_dir)?;
    Ok(engine)
}

/// An `IP:port` to listen on, with an error that says what was given and what is wanted (a
/// host name is not resolved: which of its addresses to listen on is the operator's choice).
fn socket_addr<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<SocketAddr, D::Error> {
    let text = String::deserialize(deserializer)?;
    text.parse().map_err(|_| {
        serde::de::Error::custom(format!(
            "{text:?} is not an IP address and port (such as \"127.0.0.1:7878\" or \"[::1]:7878\"; \
             a host name is not resolved: give the address to listen on)"
        ))
    })
}

/// `[server]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServerConfig {
    /// Protocol listener.
    #[serde(deserialize_with = "socket_addr")]
    pub listen: SocketAddr,
    /// HTTP listener (`/metrics`, `/healthz`, `/readyz`).
    #[serde(deserialize_with = "socket_addr")]
    pub http_listen: SocketAddr,
    /// Open connections at most; more are closed at once.
    pub connections_max: usize,
    /// Of those, connections not yet authenticated at most (more are closed at once), so that
    /// connections without a key never hold every place; `None`: a quarter of
    /// `connections_max`. See [`ServerConfig::unauthenticated_cap`].
    pub unauthenticated_max: Option<usize>,
    /// Requests in flight per connection; reading pauses at the limit.
    pub in_flight_max: usize,
    /// Unsent reply bytes per connection past which it stops reading requests (a peer that
    /// pipelines without reading); one that makes no room within `idle_timeout_ms` is closed.
    pub reply_backlog_max_bytes: usize,
    /// Unsent reply bytes of the whole server past which every connection holding more than
    /// 64 KiB of them stops reading too.
    pub reply_backlog_total_max_bytes: usize,
    /// Connection threads, each a single-threaded runtime serving the connections handed to
    /// it (reading, decoding, tag verification, applying to idle shards, writing); 0: one per
    /// core. See [`ServerConfig::io_thread_count`].
    pub io_threads: usize,
    /// A connection with no frame for this long is closed.
    pub idle_timeout_ms: u64,
    /// A started frame must be complete within this.
    pub frame_read_timeout_ms: u64,
    /// A connection must authenticate within this.
    pub auth_timeout_ms: u64,
    /// How long shutdown waits for connections to finish their in-flight requests.
    pub shutdown_grace_ms: u64,
    /// Log filter (`RUST_LOG` wins), e.g. `info` or `settlegate=debug`.
    pub log_level: String,
    /// Log format: `text` or `json`.
    pub log_format: String,
    /// API keys (stored as SHA-256) and TLS client-certificate identities.
    pub identities: Vec<IdentityConfig>,
    /// TLS on the protocol port.
    pub tls: Option<TlsConfig>,
    /// How often expired payment codes are swept and their holds released, ms.
    pub code_sweep_interval_ms: u64,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            listen: "127.0.0.1:7878".parse().expect("address"),
            http_listen: "127.0.0.1:9898".parse().expect("address"),
            connections_max: 1024,
            unauthenticated_max: None,
            in_flight_max: 1024,
            reply_backlog_max_bytes: 1 << 20,
            reply_backlog_total_max_bytes: 256 << 20,
            io_threads: 0,
            idle_timeout_ms: 60_000,
            frame_read_timeout_ms: 10_000,
            auth_timeout_ms: 10_000,
            shutdown_grace_ms: 10_000,
            log_level: "info".into(),
            log_format: "text".into(),
            identities: Vec::new(),
            tls: None,
            code_sweep_interval_ms: 1_000,
        }
    }
}

impl ServerConfig {
    /// The cap on unauthenticated connections in force: `unauthenticated_max`, or a quarter of
    /// `connections_max` (at least one).
    pub fn unauthenticated_cap(&self) -> usize {
        self.unauthenticated_max.unwrap_or((self.connections_max / 4).max(1))
    }

    /// The connection threads in force: `io_threads`, or when it is 0 one per core. A
    /// connection's thread applies its batches to their shards itself whenever the shard is
    /// idle (`settlegate_engine`'s shard module), so the shard threads take only what arrives
    /// while their shard is busy, and the connection threads are the ones that need the
    /// cores. On two cores, one connection thread spends less CPU per request than two in the
    /// closed loop, but saturates in the open loop at half the closed loop's rate; two keep the
    /// open loop's median and tail lower (`docs/BENCHMARKS-HISTORY.md`).
    pub fn io_thread_count(&self) -> usize {
        if self.io_threads > 0 {
            return self.io_threads;
        }
        std::thread::available_parallelism().map_or(1, |n| n.get())
    }

    fn validate(&self) -> Result<(), String> {
        let check = |ok: bool, what: &str| if ok { Ok(()) } else { Err(what.to_owned()) };
        check(
            (1..=65_536).contains(&self.connections_max),
            "server.connections_max must be 1..=65536",
        )?;
        check(
            (1..=self.connections_max).contains(&self.unauthenticated_cap()),
            "server.unauthenticated_max must be 1..=connections_max",
        )?;
        check(
            self.reply_backlog_max_bytes >= 65_536,
            "server.reply_backlog_max_bytes must be at least 65536",
        )?;
        check(
            self.reply_backlog_total_max_bytes >= self.reply_backlog_max_bytes,
            "server.reply_backlog_total_max_bytes must be at least reply_backlog_max_bytes",
        )?;
        check(
            (1..=65_535).contains(&self.in_flight_max),
            "server.in_flight_max must be 1..=65535",
        )?;
        check(self.io_threads <= 1024, "server.io_threads must be 0..=1024")?;
        check(self.idle_timeout_ms > 0, "server.idle_timeout_ms must be positive")?;
        check(self.frame_read_timeout_ms > 0, "server.frame_read_timeout_ms must be positive")?;
        check(self.auth_timeout_ms > 0, "server.auth_timeout_ms must be positive")?;
        check(
            matches!(self.log_format.as_str(), "text" | "json"),
            "server.log_format must be text or json",
        )?;
        for identity in &self.identities {
            identity.validate()?;
        }
        Ok(())
    }
}

/// One identity a connection can authenticate as.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IdentityConfig {
    /// Name for logs and metrics.
    pub name: String,
    /// SHA-256 (hex) of the API key; the key itself is never stored.
    #[serde(default)]
    pub api_key_sha256: Option<String>,
    /// SHA-256 (hex) of the DER of the TLS client certificate that authenticates as it.
    #[serde(default)]
    pub cert_sha256: Option<String>,
    /// `authorize`, `accounts`, `providers`, `stores`, `report`.
    #[serde(default)]
    pub permissions: Vec<String>,
    /// Store-terminal IDs it may act for: exact IDs, or prefixes ending in `*`.
    #[serde(default)]
    pub terminals: Vec<String>,
    /// Provider codes whose terminal lists it may change (`providers`) and whose report it
    /// may read (`report`).
    #[serde(default)]
    pub providers: Vec<u32>,
}

impl IdentityConfig {
    fn validate(&self) -> Result<(), String> {
        let hex32 = |v: &Option<String>| {
            v.as_ref().is_none_or(|h| h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit()))
        };
        if !hex32(&self.api_key_sha256) || !hex32(&self.cert_sha256) {
            return Err(format!("identity {}: digests must be 64 hex digits", self.name));
        }
        if self.api_key_sha256.is_none() && self.cert_sha256.is_none() {
            return Err(format!("identity {}: needs api_key_sha256 or cert_sha256", self.name));
        }
        for permission in &self.permissions {
            if !["authorize", "accounts", "providers", "stores", "report"]
                .contains(&permission.as_str())
            {
                return Err(format!("identity {}: unknown permission {permission}", self.name));
            }
        }
        Ok(())
    }
}

/// `[server.tls]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// PEM certificate chain.
    pub cert_pem: PathBuf,
    /// PEM private key.
    pub key_pem: PathBuf,
    /// PEM CA certificates that sign client certificates; with it, clients are asked for one.
    #[serde(default)]
    pub client_ca_pem: Option<PathBuf>,
    /// Whether a client certificate is required (else optional, and `AUTH` still works).
    #[serde(default)]
    pub client_cert_required: bool,
}

/// `[demo]`: data loaded at start so the engine has something to show.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DemoConfig {
    /// Demo users to enroll (`demo0001@example.com`...), each with a card and a device.
    pub users: usize,
    /// Register the demo stores (`DEMO-SHIBUYA-01`, `DEMO-SHINJUKU-01`) with their beacons and
    /// QR posters.
    pub stores: bool,
}

#[cfg(test)]
mod vault_key_tests {
    use super::engine_with_vault_key;
    use settlegate_engine::config::VaultKey;
    use settlegate_engine::EngineConfig;

    const KEY_HEX: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    fn file_config(path: &std::path::Path) -> EngineConfig {
        EngineConfig { vault_key_file: Some(path.to_owned()), ..EngineConfig::default() }
    }

    #[test]
    fn the_environment_wins_over_the_key_file_and_the_file_over_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vault-key");
        std::fs::write(&path, KEY_HEX).unwrap();
        let env = "ff".repeat(32);
        let resolved = engine_with_vault_key(&file_config(&path), Some(env.clone()), None);
        assert_eq!(resolved.unwrap().vault_key, Some(VaultKey::from_bytes([0xff; 32])));
        // The environment wins even over a key file that is missing.
        let missing = file_config(&dir.path().join("missing"));
        let resolved = engine_with_vault_key(&missing, Some(env), None);
        assert_eq!(resolved.unwrap().vault_key, Some(VaultKey::from_bytes([0xff; 32])));
        let from_file = engine_with_vault_key(&file_config(&path), None, None).unwrap();
        assert_eq!(from_file.vault_key, Some(VaultKey::from_hex(KEY_HEX).unwrap()));
        let none = engine_with_vault_key(&EngineConfig::default(), None, None).unwrap();
        assert_eq!(none.vault_key, None);
    }

    #[test]
    fn a_bad_environment_key_is_named_and_not_repeated() {
        let error = engine_with_vault_key(&EngineConfig::default(), Some("zz".repeat(32)), None)
            .unwrap_err();
        assert!(error.starts_with("SETTLEGATE_VAULT_KEY: "), "{error}");
        assert!(!error.contains("zzzz"), "{error}");
    }
}
