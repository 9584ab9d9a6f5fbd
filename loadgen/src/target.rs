//! Where requests go: an engine in this process, or a server over TCP (one protocol client
//! per connection).

use anyhow::Context as _;
use settlegate_engine::adapters::simulated::SimulatedConfig;
use settlegate_engine::adapters::{AdapterConfig, GuardConfig};
use settlegate_engine::password::PasswordConfig;
use settlegate_engine::{Engine, EngineConfig, ProviderConfig};
use settlegate_protocol::Client;

/// The system under load.
pub enum Target {
    /// An engine started by the load generator.
    Embedded(Engine),
    /// A running server; client `c` is connection `c`.
    Remote(Vec<Client>),
}

impl Target {
    /// Starts an engine with zero-latency simulated providers `provider_codes`, and its
    /// forwarder (as the server runs it: the captures, voids and refunds the `code`, `void`
    /// and `refund` operations owe the providers are sent, and their queue drains). Must be
    /// called inside a Tokio runtime.
    pub fn embedded(provider_codes: &[u32]) -> anyhow::Result<Target> {
        let engine = Engine::start(embedded_config(provider_codes))?;
        let forwarder = engine.clone();
        let interval = std::time::Duration::from_millis(engine.config().forwarding.interval_ms);
        tokio::spawn(async move {
            let mut ticker = tokio::time::interval(interval);
            loop {
                ticker.tick().await;
                if let Err(settlegate_engine::EngineError::Stopped) = forwarder.forward_owed().await
                {
                    return;
                }
            }
        });
        Ok(Target::Embedded(engine))
    }

    /// Opens and authenticates `connections` connections to `addr`.
    pub async fn remote(addr: &str, api_key: &str, connections: usize) -> anyhow::Result<Target> {
        let mut clients = Vec::with_capacity(connections);
        for _ in 0..connections {
            let client =
                Client::connect(addr).await.with_context(|| format!("connecting to {addr}"))?;
            client.authenticate(api_key).await.context("authenticating")?;
            clients.push(client);
        }
        Ok(Target::Remote(clients))
    }
}

/// The embedded engine: zero-latency providers, and Argon2 costs lowered because the
/// dataset's enrollments are setup, not what is measured.
pub fn embedded_config(provider_codes: &[u32]) -> EngineConfig {
    let providers = provider_codes
        .iter()
        .map(|&code| ProviderConfig {
            code,
            name: format!("loadgen-{code}"),
            adapter: AdapterConfig::Simulated(SimulatedConfig::default()),
            limits: GuardConfig { concurrency_max: 1 << 20, timeout_ms: 5_000 },
            terminals: Vec::new(),
        })
        .collect();
    EngineConfig {
        password: PasswordConfig { memory_kib: 64, iterations: 1, parallelism: 1 },
        vault: settlegate_engine::config::VaultConfig { key_hex: Some("66".repeat(32)) },
        providers,
        ..EngineConfig::default()
    }
}
