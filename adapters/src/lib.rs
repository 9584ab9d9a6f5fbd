//! Provider adapters: the one trait the settlegate engine dispatches approved work to.
//!
//! The engine holds every provider as an `Arc<dyn ProviderAdapter>` wrapped in a [`Guarded`]
//! adapter (a concurrency limit and a timeout) and never knows which implementation it talks
//! to. Implementations live in their own modules:
//!
//! - [`simulated`]: a seeded provider with a latency distribution, a decline rate and a failure
//!   rate, for the demo, the tests and load generation. The same seed and request ID always
//!   give the same outcome, whatever the concurrency.
//! - [`iso8583`]: an ISO 8583 (1987) host over TCP, many requests in flight on one connection,
//!   reversals on timeout, reconnection, echo tests and a circuit breaker
//!   (`docs/ADAPTERS.md`).
//!
//! Besides authorizations, every adapter carries the lifecycle of an approved one (capture,
//! void, refund, reversal: [`ProviderAdapter::lifecycle`]), matched to it by the
//! [`AuthReference`] its approval handed back.
//!
//! Adapters are built from configuration with [`build`] (or [`build_with`], which also hands
//! them the [`Detokenizer`] that card adapters need), so that a provider's adapter is chosen
//! per provider in the engine's TOML config.
#![deny(missing_docs)]

mod fine_timer;
mod guard;
pub mod iso8583;
pub mod simulated;
mod types;

use std::sync::Arc;

use futures::future::BoxFuture;
use futures::stream::{BoxStream, FuturesUnordered};
use futures::{FutureExt as _, StreamExt as _};
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

pub use guard::{GuardConfig, Guarded};
pub use types::{
    AdapterError, AuthCode, AuthReference, AuthorizationRequest, CardToken, Currency,
    CurrencyError, DeclineReason, LifecycleReply, LifecycleRequest, MeansKind, NetworkReference,
    Operation, ProviderReply, RefusalReason,
};

/// The answers to [`ProviderAdapter::authorize_batch`]: each with its request's position in the
/// batch, in the order they come in.
pub type Answers = BoxStream<'static, (usize, Result<ProviderReply, AdapterError>)>;

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

    /// Requests an authorization. An approval, with its request, makes the [`AuthReference`]
    /// that later operations on it must hand back ([`ProviderReply::reference`]).
    fn authorize(
        &self,
        request: AuthorizationRequest,
    ) -> BoxFuture<'static, Result<ProviderReply, AdapterError>>;

    /// Requests the authorizations of `requests` together: the stream yields each answer, with
    /// the request's position in `requests`, as it comes in, and ends after the last. It is
    /// [`authorize`](ProviderAdapter::authorize) for each, and that is the default; an adapter
    /// that carries a batch more cheaply than its requests one by one (one timer, one write)
    /// overrides it, with the same answers. Dropping the stream abandons the requests not
    /// answered yet, as dropping their futures would.
    fn authorize_batch(&self, requests: Vec<AuthorizationRequest>) -> Answers {
        let calls: FuturesUnordered<_> = (requests.into_iter().enumerate())
            .map(|(at, request)| self.authorize(request).map(move |answer| (at, answer)))
            .collect();
        calls.boxed()
    }

    /// Carries a capture, void, refund or reversal of an earlier authorization to the
    /// provider ([`Operation`]). The rules (`docs/ADAPTERS.md`, "Lifecycle"):
    ///
    /// - capture: once per authorization, `1 ..=` the amount authorized; the rest is released;
    /// - void: only before the capture;
    /// - refund: only after the capture, any number, their total at most the amount captured;
    /// - reversal: accepted when the provider does not hold the authorization (nothing to undo)
    ///   or already voided or reversed it; refused once it is captured.
    ///
    /// A refusal is [`LifecycleReply::Refused`]; no answer is an [`AdapterError`], bounded by
    /// [`Guarded`] as for `authorize`. There is no default: an adapter that cannot carry
    /// these operations answers [`RefusalReason::Unsupported`] explicitly.
    fn lifecycle(
        &self,
        request: LifecycleRequest,
    ) -> BoxFuture<'static, Result<LifecycleReply, AdapterError>>;

    /// Answers at once, when this adapter decides in process with no I/O and no waiting (the
    /// zero-latency simulator); `None` otherwise (the default), and the engine calls
    /// [`authorize`](ProviderAdapter::authorize). An answer here must be the one `authorize`
    /// would have given: the engine then records the outcome in the same shard step as the
    /// reservation, without a trip back through the caller.
    fn decide_now(
        &self,
        _request: &AuthorizationRequest,
    ) -> Option<Result<ProviderReply, AdapterError>> {
        None
    }

    /// Whether a sale this adapter approved ([`AuthorizationRequest::sale`]) is settled at its
    /// provider with the approval, so that refunds of it ([`Operation::Refund`]) may follow.
    /// The engine keeps what such a refund needs only for payments at providers that say so.
    /// `false` by default: a provider that holds an approval until a capture (a dual-message
    /// host) has nothing to refund.
    fn refunds_sales(&self) -> bool {
        false
    }

    /// The state of the adapter's link to its provider, for readiness and metrics; `None` for
    /// an adapter with no link to lose (the simulator, the default).
    fn health(&self) -> Option<ProviderHealth> {
        None
    }
}

/// The state of an adapter's link to its provider ([`ProviderAdapter::health`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProviderHealth {
    /// Whether requests reach the provider now (signed on, breaker closed).
    pub link_up: bool,
    /// Whether the circuit breaker is open: requests fail fast.
    pub breaker_open: bool,
    /// Requests that timed out since start.
    pub timeouts: u64,
    /// Reversals written and neither acknowledged nor given up yet.
    pub reversals_pending: u64,
}

/// Which adapter serves a provider, as written in the engine's TOML config
/// (`adapter = { kind = "simulated", ... }`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
// Read once at start, never moved on a hot path: the size difference costs nothing.
#[allow(clippy::large_enum_variant)]
pub enum AdapterConfig {
    /// The seeded simulator.
    Simulated(simulated::SimulatedConfig),
    /// An ISO 8583 host over TCP.
    Iso8583(iso8583::Iso8583Config),
}

impl AdapterConfig {
    /// Checks the config without starting anything (for a config check at startup and
    /// `settlegate check-config`); reads the TLS files an ISO 8583 config names.
    pub fn validate(&self) -> Result<(), AdapterError> {
        match self {
            AdapterConfig::Simulated(sim) => simulated::Simulated::new(sim.clone()).map(drop),
            AdapterConfig::Iso8583(iso) => iso.validate(),
        }
    }
}

impl Default for AdapterConfig {
    fn default() -> Self {
        AdapterConfig::Simulated(simulated::SimulatedConfig::default())
    }
}

/// Maps a card token back to its card number (PAN), for adapters whose protocol carries it.
///
/// Implemented by the engine's vault. An implementation must not log or keep the number; the
/// adapter drops (and so zeroizes) it as soon as it is encoded.
pub trait Detokenizer: Send + Sync {
    /// The PAN behind `token`, or `None` if the token is unknown.
    fn reveal(&self, token: &CardToken) -> Option<Zeroizing<String>>;
}

/// A detokenizer that knows no token: card adapters built with it decline every card as
/// [`DeclineReason::InvalidAccount`] without contacting their host.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoDetokenizer;

impl Detokenizer for NoDetokenizer {
    fn reveal(&self, _token: &CardToken) -> Option<Zeroizing<String>> {
        None
    }
}

/// Builds the adapter a config names, for adapters that need no card numbers.
///
/// A `kind = "iso8583"` config is refused here: it needs the vault, through [`build_with`].
pub fn build(config: &AdapterConfig) -> Result<Arc<dyn ProviderAdapter>, AdapterError> {
    match config {
        AdapterConfig::Iso8583(_) => Err(AdapterError::Config(
            "iso8583: the adapter needs the card vault to detokenize; build it with build_with"
                .into(),
        )),
        _ => build_with(config, Arc::new(NoDetokenizer)),
    }
}

/// Builds the adapter a config names, giving it `detokenizer` to reveal card numbers.
///
/// An ISO 8583 adapter starts its connection thread here and signs on in the background.
pub fn build_with(
    config: &AdapterConfig,
    detokenizer: Arc<dyn Detokenizer>,
) -> Result<Arc<dyn ProviderAdapter>, AdapterError> {
    match config {
        AdapterConfig::Simulated(sim) => Ok(Arc::new(simulated::Simulated::new(sim.clone())?)),
        AdapterConfig::Iso8583(iso) => {
            Ok(Arc::new(iso8583::Iso8583Adapter::start(iso.clone(), detokenizer)?))
        }
    }
}
