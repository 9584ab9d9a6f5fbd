//! Provider adapters: the one trait the settlegate engine dispatches approved work to.
//!
//! The engine holds every provider as an `Arc<dyn ProviderAdapter>` wrapped in a [`Guarded`]
//! adapter (a concurrency limit and a timeout) and never knows which implementation it talks
//! to. Implementations live in their own modules:
//!
//! - [`simulated`]: a seeded provider with a latency distribution, a decline rate and a failure
//!   rate, for the demo, the tests and load generation. The same seed and request ID always
//!   give the same outcome, whatever the concurrency.
//!
//! Adapters are built from configuration with [`build`], so that a provider's adapter is
//! chosen per provider in the engine's TOML config.
#![deny(missing_docs)]

mod guard;
pub mod simulated;
mod types;

use std::sync::Arc;

use futures::future::BoxFuture;
use serde::{Deserialize, Serialize};

pub use guard::{GuardConfig, Guarded};
pub use types::{
    AdapterError, AuthCode, AuthorizationRequest, CardToken, Currency, CurrencyError,
    DeclineReason, MeansKind, ProviderReply,
};

/// The contract between the engine and a settlement provider.
///
/// `authorize` asks the provider to authorize (and, for this engine's single-message flow,
/// settle) an amount. The returned future may take as long as the provider takes; the engine
/// bounds it with the provider's timeout and the request's deadline through [`Guarded`], so an
/// implementation does not need its own timer. Dropping the future abandons the request; an
/// adapter whose protocol requires it (ISO 8583 reversal) must compensate itself.
pub trait ProviderAdapter: Send + Sync + 'static {
    /// A short name for logs and metrics (never contains secrets).
    fn name(&self) -> &str;

    /// Requests an authorization.
    fn authorize(
        &self,
        request: AuthorizationRequest,
    ) -> BoxFuture<'static, Result<ProviderReply, AdapterError>>;
}

/// Which adapter serves a provider, as written in the engine's TOML config
/// (`adapter = { kind = "simulated", ... }`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum AdapterConfig {
    /// The seeded simulator.
    Simulated(simulated::SimulatedConfig),
}

impl Default for AdapterConfig {
    fn default() -> Self {
        AdapterConfig::Simulated(simulated::SimulatedConfig::default())
    }
}

/// Builds the adapter a config names.
pub fn build(config: &AdapterConfig) -> Result<Arc<dyn ProviderAdapter>, AdapterError> {
    match config {
        AdapterConfig::Simulated(sim) => Ok(Arc::new(simulated::Simulated::new(sim.clone())?)),
    }
}
