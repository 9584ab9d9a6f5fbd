//! A per-provider concurrency limit and timeout around any adapter.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use futures::future::BoxFuture;
use futures::stream::FuturesUnordered;
use futures::{Future as _, Stream, StreamExt as _};
use serde::{Deserialize, Serialize};
use tokio::sync::Semaphore;
use tokio::time::{Instant, Sleep};

use crate::{
    AdapterError, Answers, AuthorizationRequest, LifecycleReply, LifecycleRequest, ProviderAdapter,
    ProviderReply,
};

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
/// [`Guarded::authorize`] and [`Guarded::lifecycle`] share the permits, and each always
/// finishes by `deadline` (or the provider timeout, whichever is sooner) with a definitive
/// result: a reply, [`AdapterError::Timeout`] or [`AdapterError::Unavailable`]. No request is
/// left "processing".
#[derive(Clone)]
pub struct Guarded {
    adapter: Arc<dyn ProviderAdapter>,
    permits: Arc<Semaphore>,
    /// `concurrency_max`.
    capacity: usize,
    timeout: Duration,
    /// How long calls took, from the permit to the answer (or the timeout).
    latency: Arc<settlegate_types::histogram::Histogram>,
}

impl Guarded {
    /// Wraps `adapter` with `config`'s limits.
    pub fn new(adapter: Arc<dyn ProviderAdapter>, config: GuardConfig) -> Guarded {
        assert!(config.concurrency_max > 0, "concurrency_max must be positive");
        Guarded {
            adapter,
            permits: Arc::new(Semaphore::new(config.concurrency_max as usize)),
            capacity: config.concurrency_max as usize,
            latency: Arc::new(settlegate_types::histogram::Histogram::latency()),
            timeout: Duration::from_millis(config.timeout_ms),
        }
    }

    /// The wrapped adapter's name.
    pub fn name(&self) -> &str {
        self.adapter.name()
    }

    /// How long calls took, from the permit to the answer (or the timeout), in seconds.
    pub fn latency(&self) -> settlegate_types::histogram::HistogramSnapshot {
        self.latency.snapshot()
    }

    /// Calls in flight now (holding a permit).
    pub fn in_flight(&self) -> usize {
        self.capacity - self.permits.available_permits()
    }

    /// The wrapped adapter's link state ([`ProviderAdapter::health`]).
    pub fn health(&self) -> Option<crate::ProviderHealth> {
        self.adapter.health()
    }

    /// Whether the wrapped adapter's sales may be refunded ([`ProviderAdapter::refunds_sales`]).
    pub fn refunds_sales(&self) -> bool {
        self.adapter.refunds_sales()
    }

    /// The adapter's immediate answer, if it decides in process
    /// ([`ProviderAdapter::decide_now`]). No permit is taken: nothing stays in flight.
    pub fn decide_now(
        &self,
        request: &AuthorizationRequest,
    ) -> Option<Result<ProviderReply, AdapterError>> {
        self.adapter.decide_now(request)
    }

    /// Dispatches `request`, waiting for a permit and the answer no later than `deadline`.
    pub async fn authorize(
        &self,
        request: AuthorizationRequest,
        deadline: Instant,
    ) -> Result<ProviderReply, AdapterError> {
        self.call(deadline, || self.adapter.authorize(request)).await
    }

    /// Requests the authorizations of `requests` together
    /// ([`ProviderAdapter::authorize_batch`]), under the same limits as
    /// [`authorize`](Guarded::authorize) each: a permit each, and every answer not in by
    /// `deadline` (or the provider's timeout) a [`AdapterError::Timeout`]. When the permits for
    /// the whole batch are there, they are taken at once and the batch shares one timer;
    /// otherwise each request waits for its own permit, as alone.
    pub fn authorize_batch(
        &self,
        requests: Vec<AuthorizationRequest>,
        deadline: Instant,
    ) -> Answers {
        let count = requests.len();
        let deadline = deadline.min(Instant::now() + self.timeout);
        let permits = u32::try_from(count).ok().and_then(|n| self.permits.try_acquire_many(n).ok());
        let Some(permits) = permits else {
            let calls: FuturesUnordered<_> = (requests.into_iter().enumerate())
                .map(|(at, request)| {
                    let guarded = self.clone();
                    async move { (at, guarded.authorize(request, deadline).await) }
                })
                .collect();
            return calls.boxed();
        };
        // Given back one by one as the answers come in (the rest when the batch is dropped).
        permits.forget();
        Bounded {
            answers: self.adapter.authorize_batch(requests).fuse(),
            deadline,
            timer: None,
            waiting: vec![true; count],
            left: count,
            given_up: 0,
            permits: Arc::clone(&self.permits),
            latency: Arc::clone(&self.latency),
            started: Instant::now(),
            unsettled: 0,
        }
        .boxed()
    }

    /// Carries a capture, void, refund or reversal ([`ProviderAdapter::lifecycle`]) under the
    /// same limits as [`Guarded::authorize`]: the same permits, the provider timeout and
    /// `deadline`, and a definitive result by then.
    pub async fn lifecycle(
        &self,
        request: LifecycleRequest,
        deadline: Instant,
    ) -> Result<LifecycleReply, AdapterError> {
        self.call(deadline, || self.adapter.lifecycle(request)).await
    }

    /// Takes a permit (waiting at most until `deadline`), then runs the call `start` begins,
    /// bounded by `deadline` and the provider timeout.
    async fn call<T>(
        &self,
        deadline: Instant,
        start: impl FnOnce() -> BoxFuture<'static, Result<T, AdapterError>>,
    ) -> Result<T, AdapterError> {
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
        let started = Instant::now();
        let mut reply = start();
        // A ready future (the zero-latency simulator) is answered without arming a timer.
        let result = match futures::FutureExt::now_or_never(&mut reply) {
            Some(result) => result,
            None => {
                tokio::time::timeout_at(deadline, reply).await.unwrap_or(Err(AdapterError::Timeout))
            }
        };
        drop(permit);
        self.latency.record_duration(started.elapsed());
        result
    }
}

/// A batch's answers under its deadline: each request answered once, its permit given back
/// and its latency recorded once the answers that came with it are taken (when the stream has
/// no more for now: one look at the shared permits and histogram for them all); at the
/// deadline, every request still waiting answered [`AdapterError::Timeout`].
struct Bounded {
    answers: futures::stream::Fuse<Answers>,
    deadline: Instant,
    timer: Option<Pin<Box<Sleep>>>,
    /// By position: whether the request still waits for its answer.
    waiting: Vec<bool>,
    left: usize,
    /// No request before this position waits: where the next one given up is looked for.
    given_up: usize,
    permits: Arc<Semaphore>,
    latency: Arc<settlegate_types::histogram::Histogram>,
    started: Instant,
    /// Answered since the permits and the histogram were last told ([`Bounded::settle`]).
    unsettled: usize,
}

impl Bounded {
    /// The first request still waiting, answered `error`.
    fn give_up(
        &mut self,
        error: fn() -> AdapterError,
    ) -> Option<(usize, Result<ProviderReply, AdapterError>)> {
        let at = self.given_up + self.waiting[self.given_up..].iter().position(|&w| w)?;
        self.given_up = at + 1;
        self.answered(at);
        Some((at, Err(error())))
    }

    fn answered(&mut self, at: usize) {
        self.waiting[at] = false;
        self.left -= 1;
        self.unsettled += 1;
    }

    /// Gives back the permits of the requests answered since the last call, and records their
    /// latency: now, for they were taken together.
    fn settle(&mut self) {
        if self.unsettled > 0 {
            self.permits.add_permits(self.unsettled);
            self.latency.record_durations(self.started.elapsed(), self.unsettled as u64);
            self.unsettled = 0;
        }
    }
}

impl Stream for Bounded {
    type Item = (usize, Result<ProviderReply, AdapterError>);

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let polled = self.poll_answer(cx);
        if !matches!(polled, Poll::Ready(Some(_))) {
            // Nothing more for now: what was taken since the last look is settled at once.
            self.settle();
        }
        polled
    }
}

impl Bounded {
    /// The next answer, a request given up at the deadline, or nothing more.
    fn poll_answer(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Option<(usize, Result<ProviderReply, AdapterError>)>> {
        let this = self;
        if this.left == 0 {
            return Poll::Ready(None);
        }
        if this.timer.as_ref().is_none_or(|timer| !timer.is_elapsed()) {
            loop {
                match this.answers.poll_next_unpin(cx) {
                    Poll::Ready(Some((at, answer))) => {
                        // An adapter's stray or repeated answer is not a second answer.
                        if this.waiting.get(at).copied().unwrap_or(false) {
                            this.answered(at);
                            return Poll::Ready(Some((at, answer)));
                        }
                    }
                    Poll::Ready(None) => {
                        // The adapter ended without answering some: they never will be.
                        let unanswered = || {
                            AdapterError::Unavailable("the adapter ended without an answer".into())
                        };
                        return Poll::Ready(this.give_up(unanswered));
                    }
                    Poll::Pending => break,
                }
            }
            let deadline = this.deadline;
            let timer =
                this.timer.get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
            if timer.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
        }
        Poll::Ready(this.give_up(|| AdapterError::Timeout))
    }
}

impl Drop for Bounded {
    fn drop(&mut self) {
        self.settle();
        self.permits.add_permits(self.left);
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::simulated::{Simulated, SimulatedConfig};
    use crate::{Currency, MeansKind};

    fn request() -> AuthorizationRequest {
        AuthorizationRequest {
            dispatch_id: 1,
            provider_code: 1,
            means: MeansKind::CreditCard,
            card_token: None,
            terminal_id: "T".into(),
            amount_minor: 1,
            currency: Currency::try_from("JPY").unwrap(),
            at_ms: 1_700_000_000_000,
            sale: false,
        }
    }

    fn slow(latency_ms: u64) -> Arc<dyn ProviderAdapter> {
        simulated(latency_ms * 1000, latency_ms * 1000)
    }

    /// A simulated provider answering after a uniform latency of `min_us` to `max_us`.
    fn simulated(min_us: u64, max_us: u64) -> Arc<Simulated> {
        let config = SimulatedConfig {
            latency_us_min: min_us,
            latency_us_max: max_us,
            ..SimulatedConfig::default()
        };
        Arc::new(Simulated::new(config).unwrap())
    }

    fn requests(count: u64) -> Vec<AuthorizationRequest> {
        (1..=count).map(|dispatch_id| AuthorizationRequest { dispatch_id, ..request() }).collect()
    }

    /// A batch under one deadline: the answers in by then stand, the rest are timeouts, each
    /// request answered once, and every permit given back.
    #[tokio::test(start_paused = true)]
    async fn a_batch_answers_what_is_in_by_its_deadline_and_times_out_the_rest() {
        let simulated = simulated(1_000, 100_000);
        let guarded =
            Guarded::new(simulated.clone(), GuardConfig { concurrency_max: 64, timeout_ms: 5_000 });
        let batch = requests(40);
        let start = Instant::now();
        let mut answers = guarded.authorize_batch(batch.clone(), start + Duration::from_millis(50));
        assert_eq!(guarded.in_flight(), 40, "a permit each, taken at once");
        let mut seen = vec![false; batch.len()];
        let (mut approved, mut timed_out) = (0, 0);
        while let Some((at, answer)) = answers.next().await {
            assert!(!std::mem::replace(&mut seen[at], true), "request {at} answered twice");
            let latency = Duration::from_micros(simulated.latency_of(&batch[at]));
            match answer {
                Ok(ProviderReply::Approved { .. }) => {
                    assert!(latency <= Duration::from_millis(50), "{at}: {latency:?}");
                    approved += 1;
                }
                Err(AdapterError::Timeout) => {
                    assert!(latency > Duration::from_millis(50), "{at}: {latency:?}");
                    assert_eq!(start.elapsed(), Duration::from_millis(50), "at the deadline");
                    timed_out += 1;
                }
                other => panic!("{at}: {other:?}"),
            }
        }
        assert!(approved > 0 && timed_out > 0, "{approved} approved, {timed_out} timed out");
        assert!(seen.iter().all(|&s| s), "every request answered");
        assert_eq!(guarded.in_flight(), 0, "every permit given back");
        assert_eq!(guarded.latency().count, 40, "a latency recorded each");
    }

    /// Answers taken together give their permits back and record their latency when the batch
    /// has nothing more for now: a caller waiting for the rest holds no answered request's
    /// permit.
    #[tokio::test(start_paused = true)]
    async fn an_answered_request_holds_no_permit_once_its_batch_waits_for_more() {
        let guarded = Guarded::new(
            simulated(1_000, 20_000),
            GuardConfig { concurrency_max: 64, timeout_ms: 5_000 },
        );
        let far = Instant::now() + Duration::from_secs(1);
        let mut answers = guarded.authorize_batch(requests(40), far);
        let (mut taken, mut waits) = (0, 0);
        while taken < 40 {
            match futures::poll!(answers.next()) {
                Poll::Ready(Some((_, answer))) => {
                    assert!(matches!(answer, Ok(ProviderReply::Approved { .. })), "{answer:?}");
                    taken += 1;
                }
                Poll::Ready(None) => panic!("the batch ended after {taken} answers"),
                Poll::Pending => {
                    assert_eq!(guarded.in_flight(), 40 - taken, "after {taken} answers");
                    assert_eq!(guarded.latency().count, taken as u64, "after {taken} answers");
                    waits += 1;
                    tokio::time::sleep(Duration::from_micros(500)).await;
                }
            }
        }
        assert!(waits > 1, "the answers came at several times");
        assert!(futures::poll!(answers.next()).is_ready());
        assert_eq!(guarded.in_flight(), 0, "every permit given back");
        assert_eq!(guarded.latency().count, 40, "a latency recorded each");
    }

    /// Without the permits for a whole batch, each request waits for its own, as alone; a batch
    /// dropped before its answers gives its permits back.
    #[tokio::test(start_paused = true)]
    async fn a_batch_without_room_waits_request_by_request_and_a_dropped_one_frees_its_permits() {
        let guarded = Guarded::new(slow(10), GuardConfig { concurrency_max: 4, timeout_ms: 5_000 });
        let far = Instant::now() + Duration::from_secs(5);
        let start = Instant::now();
        let answers: Vec<_> = guarded.authorize_batch(requests(10), far).collect().await;
        assert_eq!(answers.len(), 10);
        assert!(answers.iter().all(|(_, a)| matches!(a, Ok(ProviderReply::Approved { .. }))));
        // Four at a time, 10 ms each: three rounds.
        assert_eq!(start.elapsed(), Duration::from_millis(30));
        let mut dropped = guarded.authorize_batch(requests(3), far);
        assert!(futures::poll!(dropped.next()).is_pending());
        assert_eq!(guarded.in_flight(), 3);
        drop(dropped);
        assert_eq!(guarded.in_flight(), 0, "the dropped batch's permits given back");
    }

    #[tokio::test(start_paused = true)]
    async fn concurrency_limit_makes_the_next_request_wait_then_fail_at_its_deadline() {
        let guarded = Arc::new(Guarded::new(
            slow(1_000),
            GuardConfig { concurrency_max: 1, timeout_ms: 5_000 },
        ));
        let first = tokio::spawn({
            let guarded = Arc::clone(&guarded);
            async move { guarded.authorize(request(), Instant::now() + Duration::from_secs(5)).await }
        });
        tokio::task::yield_now().await;
        // The only permit is taken for a second: a request with a 100 ms deadline cannot get it.
        let second =
            guarded.authorize(request(), Instant::now() + Duration::from_millis(100)).await;
        assert!(matches!(second, Err(AdapterError::Unavailable(_))), "{second:?}");
        assert!(matches!(first.await.unwrap(), Ok(ProviderReply::Approved { .. })));
        // The permit is back: the next request goes through.
        let third = guarded.authorize(request(), Instant::now() + Duration::from_secs(5)).await;
        assert!(matches!(third, Ok(ProviderReply::Approved { .. })));
    }

    #[tokio::test(start_paused = true)]
    async fn lifecycle_operations_share_the_permits_and_the_timeout() {
        let guarded = Arc::new(Guarded::new(
            slow(1_000),
            GuardConfig { concurrency_max: 1, timeout_ms: 5_000 },
        ));
        let far = || Instant::now() + Duration::from_secs(60);
        let reply = guarded.authorize(request(), far()).await.unwrap();
        let reference = reply.reference(&request()).unwrap();
        let capture = crate::LifecycleRequest::capture(9, reference.clone(), 1);
        let first = tokio::spawn({
            let guarded = Arc::clone(&guarded);
            async move { guarded.lifecycle(capture, far()).await }
        });
        tokio::task::yield_now().await;
        assert_eq!(guarded.in_flight(), 1);
        let void = crate::LifecycleRequest::void(10, reference);
        let waited = guarded.lifecycle(void, Instant::now() + Duration::from_millis(100)).await;
        assert!(matches!(waited, Err(AdapterError::Unavailable(_))), "{waited:?}");
        let accepted = crate::LifecycleReply::Accepted { network: None };
        assert_eq!(first.await.unwrap(), Ok(accepted));
        let tight = Guarded::new(slow(10_000), GuardConfig { concurrency_max: 4, timeout_ms: 200 });
        let reference = crate::AuthReference::of(&request(), None, None);
        let reversal = crate::LifecycleRequest::reversal(11, reference);
        assert_eq!(tight.lifecycle(reversal, far()).await, Err(AdapterError::Timeout));
    }

    #[tokio::test(start_paused = true)]
    async fn provider_timeout_bounds_the_wait_even_with_a_later_deadline() {
        let guarded =
            Guarded::new(slow(10_000), GuardConfig { concurrency_max: 4, timeout_ms: 200 });
        let started = Instant::now();
        let result = guarded.authorize(request(), Instant::now() + Duration::from_secs(60)).await;
        assert_eq!(result, Err(AdapterError::Timeout));
        assert_eq!(
            started.elapsed(),
            Duration::from_millis(200),
            "paused clock: exactly the timeout"
        );
    }
}
