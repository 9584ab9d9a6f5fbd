//! A provider that answers when the test says: every request it is asked waits in a queue
//! until the test approves or declines it, so a test can interleave providers' answers with
//! other requests exactly as it wants, and count what the provider was asked.
//!
//! It gates authorizations only: a capture, void, refund or reversal is refused at once with
//! [`RefusalReason::Unsupported`] (and not counted).

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use settlegate_engine::adapters::{
    AdapterError, AuthCode, AuthorizationRequest, DeclineReason, LifecycleReply, LifecycleRequest,
    ProviderAdapter, ProviderReply, RefusalReason,
};
use tokio::sync::{mpsc, oneshot, Mutex};

type Answer = Result<ProviderReply, AdapterError>;

/// One request the provider was asked, waiting for the test's answer.
pub struct Asked {
    /// What the engine asked.
    pub request: AuthorizationRequest,
    answer: oneshot::Sender<Answer>,
}

impl Asked {
    /// Approves it with `auth_code`.
    pub fn approve(self, auth_code: [u8; 6]) {
        let reply = ProviderReply::approved(AuthCode(auth_code));
        let _ = self.answer.send(Ok(reply));
    }

    /// Declines it (do not honor).
    pub fn decline(self) {
        let _ = self.answer.send(Ok(ProviderReply::Declined { reason: DeclineReason::DoNotHonor }));
    }
}

/// The test's side of a gated provider.
pub struct Gate {
    asked: Mutex<mpsc::UnboundedReceiver<Asked>>,
    calls: Arc<AtomicU64>,
}

impl Gate {
    /// A gated provider's adapter (for `Engine::start_with_adapters`) and the test's side.
    pub fn new() -> (Arc<dyn ProviderAdapter>, Arc<Gate>) {
        let (queue, asked) = mpsc::unbounded_channel();
        let calls = Arc::new(AtomicU64::new(0));
        let adapter = Arc::new(Gated { queue, calls: Arc::clone(&calls) });
        (adapter, Arc::new(Gate { asked: Mutex::new(asked), calls }))
    }

    /// The next request the provider is asked (waiting for it, at most 10 s).
    pub async fn next(&self) -> Asked {
        let mut asked = self.asked.lock().await;
        tokio::time::timeout(Duration::from_secs(10), asked.recv())
            .await
            .expect("the provider is asked within 10 s")
            .expect("the engine holds the provider")
    }

    /// How many requests the provider was asked, ever.
    pub fn calls(&self) -> u64 {
        self.calls.load(Ordering::SeqCst)
    }
}

struct Gated {
    queue: mpsc::UnboundedSender<Asked>,
    calls: Arc<AtomicU64>,
}

impl ProviderAdapter for Gated {
    fn name(&self) -> &str {
        "gated"
    }

    fn authorize(
        &self,
        request: AuthorizationRequest,
    ) -> Pin<Box<dyn Future<Output = Answer> + Send + 'static>> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        let (answer, answered) = oneshot::channel();
        let _ = self.queue.send(Asked { request, answer });
        Box::pin(async move {
            answered.await.unwrap_or(Err(AdapterError::Unavailable("the test went away".into())))
        })
    }

    fn lifecycle(
        &self,
        _request: LifecycleRequest,
    ) -> Pin<Box<dyn Future<Output = Result<LifecycleReply, AdapterError>> + Send + 'static>> {
        let refused = LifecycleReply::Refused { reason: RefusalReason::Unsupported };
        Box::pin(std::future::ready(Ok(refused)))
    }
}
