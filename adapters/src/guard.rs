//! A per-provider concurrency limit and timeout around any adapter.

use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::Semaphore;
use tokio::time::Instant;

use crate::{AdapterError, AuthorizationRequest, ProviderAdapter, ProviderReply};

/// Limits for one provider.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct GuardConfig {
    /// Most requests in flight to this provider at once.
    pub concurrency_max: u32,
    /// Longest the engine waits for this provider's answer.
    pub timeout_ms: u64,
}

impl Default for GuardConfig {
    fn default() -> Self {
        GuardConfig { concurrency_max: 4096, timeout_ms: 2_000 }
    }
}

/// An adapter behind its provider's concurrency limit and timeout.
///
/// [`Guarded::authorize`] always finishes by `deadline` (or the provider timeout, whichever is
/// sooner) with a definitive result: a reply, [`AdapterError::Timeout`] or
/// [`AdapterError::Unavailable`]. No request is left "processing".
pub struct Guarded {
    adapter: Arc<dyn ProviderAdapter>,
    permits: Arc<Semaphore>,
    timeout: Duration,
}

impl Guarded {
    /// Wraps `adapter` with `config`'s limits.
    pub fn new(adapter: Arc<dyn ProviderAdapter>, config: GuardConfig) -> Guarded {
        assert!(config.concurrency_max > 0, "concurrency_max must be positive");
        Guarded {
            adapter,
            permits: Arc::new(Semaphore::new(config.concurrency_max as usize)),
            timeout: Duration::from_millis(config.timeout_ms),
        }
    }

    /// The wrapped adapter's name.
    pub fn name(&self) -> &str {
        self.adapter.name()
    }

    /// Dispatches `request`, waiting for a permit and the answer no later than `deadline`.
    pub async fn authorize(
        &self,
        request: AuthorizationRequest,
        deadline: Instant,
    ) -> Result<ProviderReply, AdapterError> {
        let deadline = deadline.min(Instant::now() + self.timeout);
        // Fast path: a permit is free, so no timer is armed for the wait.
        let permit = match self.permits.try_acquire() {
            Ok(permit) => permit,
            Err(_) => match tokio::time::timeout_at(deadline, self.permits.acquire()).await {
                Ok(Ok(permit)) => permit,
                Ok(Err(_closed)) => {
                    return Err(AdapterError::Unavailable("provider closed".into()));
                }
                Err(_elapsed) => {
                    return Err(AdapterError::Unavailable(
                        "provider concurrency limit reached".into(),
                    ));
                }
            },
        };
        let mut reply = self.adapter.authorize(request);
        // A ready future (the zero-latency simulator) is answered without arming a timer.
        let result = match futures::FutureExt::now_or_never(&mut reply) {
            Some(result) => result,
            None => {
                tokio::time::timeout_at(deadline, reply).await.unwrap_or(Err(AdapterError::Timeout))
            }
        };
        drop(permit);
        result
    }
}
