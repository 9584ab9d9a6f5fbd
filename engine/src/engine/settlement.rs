//! G3 settlement: authorize payments in batches (verify, reserve, dispatch, complete, notify).

use std::future::Future as _;
use std::pin::Pin;
use std::task::{Context, Poll};

use futures::StreamExt as _;
use settlegate_adapters::Answers;

use super::*;

/// A settlement request: the signed inherent ID exactly as the user terminal built it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuthorizeRequest {
    /// Makes retries safe: the same ID and bytes always get the first outcome.
    pub client_request_id: RequestId,
    /// The signed inherent ID (see [`crate::InherentId`]).
    pub inherent_id: Vec<u8>,
}

/// The outcome of a payment made with a basket (A2): the authorization outcome, and what the
/// age check found when the shard got as far as checking it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BasketOutcome {
    /// Approved or declined.
    pub outcome: AuthOutcome,
    /// The basket's verdict; `None` when the payment was declined before the basket was
    /// looked at (a forged tag, a replay, an unknown means...).
    pub verdict: Option<AgeVerdict>,
}

impl Engine {
    /// Authorizes one settlement.
    pub async fn authorize(&self, request: AuthorizeRequest) -> Result<AuthOutcome, EngineError> {
        let mut results = self.authorize_batch(vec![request]).await;
        results.pop().expect("one result per request")
    }

    /// Authorizes a batch: tags are verified together (across cores when the batch is large),
    /// each shard receives its part in one message, and providers are called concurrently.
    /// Results come back in request order.
    pub async fn authorize_batch(
        &self,
        requests: Vec<AuthorizeRequest>,
    ) -> Vec<Result<AuthOutcome, EngineError>> {
        let requests = requests.into_iter().map(|request| (request, None)).collect();
        let results = self.authorize_baskets(requests).await;
        results.into_iter().map(|result| result.map(|r| r.outcome)).collect()
    }

    /// Authorizes a batch of payments, each with its basket or without one (A2, A3). A basket
    /// must add up to the amount the user signed; its age-restricted items are checked against
    /// the paying terminal's age registration under the store's age policy. Results come back
    /// in request order, once every payment of the batch stands; [`Engine::authorize_start`]
    /// hands each out as soon as it stands instead.
    pub async fn authorize_baskets(
        &self,
        requests: Vec<(AuthorizeRequest, Option<Basket>)>,
    ) -> Vec<Result<BasketOutcome, EngineError>> {
        let mut results: Vec<Option<Result<BasketOutcome, EngineError>>> =
            vec![None; requests.len()];
        let mut authorizing = self.authorize_start(requests).await;
        let mut group = authorizing.take_ready();
        loop {
            for (index, result) in group {
                results[index] = Some(result);
            }
            match authorizing.next().await {
                Some(next) => group = next,
                None => break,
            }
        }
        results.into_iter().map(|r| r.expect("every request has a result")).collect()
    }

    /// Starts authorizing a batch as [`Engine::authorize_baskets`] does, and returns once every
    /// payment has been reserved in its shard: the results that stand already (declines, and
    /// outcomes the shard decided at once) are in [`Authorizing::take_ready`], and the payments
    /// waiting for a provider come out of [`Authorizing::next`] as their outcomes are recorded,
    /// so that a slow provider holds back only its own payments.
    pub async fn authorize_start(
        &self,
        requests: Vec<(AuthorizeRequest, Option<Basket>)>,
    ) -> Authorizing {
        let count = requests.len();
        let deadline =
            Instant::now() + Duration::from_millis(self.inner.config.request_deadline_ms);
        let mut authorizing = Authorizing::new(self.clone(), count);
        if count > BATCH_SIZE_MAX {
            let error = EngineError::BatchTooLarge { len: count, max: BATCH_SIZE_MAX };
            authorizing.ready = (0..count).map(|index| (index, Err(error.clone()))).collect();
            return authorizing;
        }
        let now_ms = self.now_ms();
        let (requests, baskets): (Vec<_>, Vec<_>) = requests.into_iter().unzip();
        // A cluster node answers only for the partitions it owns: any other payment is MOVED
        // before its tag is looked at (this node's copy of the devices may lag the owner's).
        let moved: Vec<Option<EngineError>> =
            requests.iter().map(|request| self.moved_payment(&request.inherent_id)).collect();
        let (ids, verified) = self.verify_batch(requests, now_ms).await;
        let mut per_shard: Vec<(Vec<usize>, Vec<Op>)> =
            (0..self.shard_count()).map(|_| Default::default()).collect();
        let requests = ids.into_iter().zip(verified).zip(baskets).enumerate();
        for (index, ((client_request_id, verified), basket)) in requests {
            if let Some(moved) = &moved[index] {
                authorizing.ready.push((index, Err(moved.clone())));
                continue;
            }
            match verified {
                Err(reason) => authorizing.ready.push((index, Ok(declined(reason)))),
                Ok(verified) => {
                    let owner_hash = user_hash(&verified.record.user);
                    // The tag is a MAC over the record; the basket joins it in the digest so
                    // that reusing a request ID with another basket is a conflict.
                    let digest = match &basket {
                        None => u64::from_be_bytes(verified.digest[..8].try_into().expect("8")),
                        Some(basket) => digest_of(&(verified.digest, basket)),
                    };
                    let shard = self.shard_of(owner_hash);
                    let terminal = Some(Box::new(self.terminal_context(&verified, now_ms)));
                    let basket = basket.map(Box::new);
                    per_shard[shard].0.push(index);
                    per_shard[shard].1.push(Op::Apply(Envelope {
                        owner_hash,
                        client_request_id: Some(client_request_id),
                        digest,
                        now_ms,
                        command: Command::AuthReserve { verified, basket, terminal },
                    }));
                }
            }
        }
        self.reserve(per_shard, now_ms, deadline, &mut authorizing).await;
        authorizing
    }

    /// For a cluster node: `MOVED` if the payment signed in `bytes` is for a partition this
    /// node does not own (a record that does not decode is declined wherever it lands).
    fn moved_payment(&self, bytes: &[u8]) -> Option<EngineError> {
        let cluster = self.inner.cluster.as_ref()?;
        let (record, _, _) = crate::inherent::InherentId::decode(bytes).ok()?;
        let shard = self.shard_of(user_hash(&record.user));
        cluster.partitions.admit(shard).err()
    }

    async fn verify_batch(
        &self,
        requests: Vec<AuthorizeRequest>,
        now_ms: i64,
    ) -> (Vec<ClientRequestId>, Vec<Result<Verified, ReasonCode>>) {
        let (ids, records): (Vec<_>, Vec<_>) =
            requests.into_iter().map(|r| (r.client_request_id.get(), r.inherent_id)).unzip();
        if records.len() < VERIFY_PARALLEL_MIN {
            return (ids, self.inner.shared.devices.verify_batch(&records, now_ms));
        }
        // Keyed hashing is CPU work: keep it off the async executor, on the rayon pool.
        let devices = Arc::clone(&self.inner.shared.devices);
        let (tx, rx) = oneshot::channel();
        rayon::spawn(move || {
            let _ = tx.send(devices.verify_batch(&records, now_ms));
        });
        let verified = rx.await.expect("rayon verification task finished");
        (ids, verified)
    }

    /// Sends each shard its reservations and collects declines and outcomes the shard could
    /// decide at once (`now_ms` is theirs) into `authorizing`, where the work for providers
    /// is started.
    async fn reserve(
        &self,
        per_shard: Vec<(Vec<usize>, Vec<Op>)>,
        now_ms: i64,
        deadline: Instant,
        authorizing: &mut Authorizing,
    ) {
        let mut pending = Vec::new();
        for (shard, (indices, ops)) in per_shard.into_iter().enumerate() {
            if ops.is_empty() {
                continue;
            }
            match self.submit(shard, ops) {
                Ok(receiver) => pending.push((shard, indices, receiver)),
                Err(error) => {
                    authorizing.ready.extend(indices.iter().map(|&i| (i, Err(error.clone()))))
                }
            }
        }
        for (shard, indices, receiver) in pending {
            let replies = match receiver.await {
                Ok(replies) => replies,
                Err(unanswered) => {
                    let error = unanswered.or_lost(self, shard);
                    authorizing.ready.extend(indices.iter().map(|&i| (i, Err(error.clone()))));
                    continue;
                }
            };
            // This shard's payments for providers, a batch per provider.
            let mut calls: Vec<(u32, Vec<Reserved>)> = Vec::new();
            for (index, reply) in indices.into_iter().zip(replies) {
                let result = match reply.into_flow() {
                    Ok(Payment::Dispatch(dispatch)) => {
                        let code = dispatch.provider_code;
                        match calls.iter_mut().find(|(c, _)| *c == code) {
                            Some((_, batch)) => batch.push((index, dispatch)),
                            None => calls.push((code, vec![(index, dispatch)])),
                        }
                        continue;
                    }
                    Ok(Payment::Decided(dispatch, outcome)) => {
                        Ok(self.publish_outcome(*dispatch, outcome, now_ms))
                    }
                    Ok(Payment::Auth(outcome)) => Ok(BasketOutcome { outcome, verdict: None }),
                    Ok(Payment::BasketAuth(outcome, verdict)) => {
                        Ok(BasketOutcome { outcome, verdict: Some(*verdict) })
                    }
                    Err(EngineError::Refused(reason)) => Ok(declined(reason)),
                    Err(error) => Err(error),
                };
                authorizing.ready.push((index, result));
            }
            for (code, batch) in calls {
                authorizing.call(code, batch, deadline);
            }
        }
    }

    /// Publishes a recorded payment's notice and returns its outcome for the caller.
    fn publish_outcome(
        &self,
        dispatch: Dispatch,
        outcome: AuthOutcome,
        now_ms: i64,
    ) -> BasketOutcome {
        self.inner.notices.publish(Notice {
            user: dispatch.user,
            client_request_id: dispatch.key.1,
            terminal_id: dispatch.terminal_id,
            outcome,
            at_ms: now_ms,
        });
        BasketOutcome { outcome, verdict: dispatch.verdict.map(|v| *v) }
    }

    pub(super) async fn call_provider(
        &self,
        dispatch: &Dispatch,
        deadline: Instant,
    ) -> AuthOutcome {
        let provider = self
            .registry()
            .provider(dispatch.provider_code)
            .expect("shard checked the provider; the provider set is fixed");
        dispatch.outcome_of(provider.adapter.authorize(dispatch.provider_request(), deadline).await)
    }
}

/// A payment's result, with its position in the batch.
pub type Standing = (usize, Result<BasketOutcome, EngineError>);

/// A payment reserved for its provider's call: its position and its dispatch.
type Reserved = (usize, Box<Dispatch>);

/// A payment whose provider answered: its position, its dispatch and the provider's outcome.
type Answered = (usize, Box<Dispatch>, AuthOutcome);

/// A batch of payments being authorized ([`Engine::authorize_start`]): its provider calls under
/// way, and the completions being recorded. Its results come out a group at a time, as they
/// stand: first those that stood at reservation ([`Authorizing::take_ready`]), then, from
/// [`Authorizing::next`], those whose providers answered together, once their shards have
/// recorded them (one shard message per shard and group, so that a burst of answers is
/// recorded as one batch, not one message each; what several shards have recorded by then
/// stands as one group, written together).
///
/// Its calls and recordings are polled here, each registering the caller's waker: a batch has
/// a call per provider and shard and a recording per shard, a few at most, where a `SelectAll`
/// of boxed streams and a `FuturesUnordered` of boxed futures cost a task of their own per
/// stream and per future, and a wake-up through it per answer (`docs/BENCHMARKS.md`).
#[must_use = "payments waiting for a provider stand only once `next` has returned them"]
pub struct Authorizing {
    engine: Engine,
    ready: Vec<Standing>,
    /// Provider calls under way, a batch per provider and shard.
    calls: Vec<Call>,
    /// Completions being recorded, a group per shard.
    recording: Vec<Recording>,
}

/// A batch's call to one provider, for one shard's payments.
struct Call {
    /// The answers, each with its position in `batch`, as they come in.
    answers: Answers,
    /// The payments not answered yet, by position.
    batch: Vec<Option<Reserved>>,
}

/// The completions of a group of answered payments, sent to their shard.
struct Recording {
    shard: usize,
    /// The shard's replies, one per completion, once it has recorded them.
    recorded: crate::engine::Submitted,
    entries: Vec<Answered>,
    /// When the answers were recorded: the time their notices carry.
    now_ms: i64,
}

impl Authorizing {
    fn new(engine: Engine, count: usize) -> Authorizing {
        Authorizing {
            engine,
            ready: Vec::with_capacity(count),
            calls: Vec::new(),
            recording: Vec::new(),
        }
    }

    /// The results that stand and have not been taken yet.
    pub fn take_ready(&mut self) -> Vec<Standing> {
        std::mem::take(&mut self.ready)
    }

    /// Whether every result has been handed out.
    pub fn is_done(&self) -> bool {
        self.ready.is_empty() && self.calls.is_empty() && self.recording.is_empty()
    }

    /// The next group of results to stand, or `None` when every result has been handed out.
    /// Provider calls make progress only while this is awaited.
    pub async fn next(&mut self) -> Option<Vec<Standing>> {
        std::future::poll_fn(|cx| self.poll_group(cx)).await
    }

    fn poll_group(&mut self, cx: &mut Context<'_>) -> Poll<Option<Vec<Standing>>> {
        loop {
            if !self.ready.is_empty() {
                return Poll::Ready(Some(self.take_ready()));
            }
            // What the shards have recorded first: it stands, as one group.
            let mut group = Vec::new();
            let mut at = 0;
            while at < self.recording.len() {
                match Pin::new(&mut self.recording[at].recorded).poll(cx) {
                    Poll::Ready(recorded) => {
                        let recording = self.recording.swap_remove(at);
                        self.stood(recording, recorded.ok(), &mut group);
                    }
                    Poll::Pending => at += 1,
                }
            }
            if !group.is_empty() {
                return Poll::Ready(Some(group));
            }
            // Every answer that is in: recorded together.
            let mut answered = Vec::new();
            let mut at = 0;
            while at < self.calls.len() {
                if self.calls[at].poll_answers(cx, &mut answered) {
                    self.calls.swap_remove(at);
                } else {
                    at += 1;
                }
            }
            if answered.is_empty() {
                if self.calls.is_empty() && self.recording.is_empty() {
                    return Poll::Ready(None);
                }
                return Poll::Pending;
            }
            self.record(answered);
        }
    }

    /// Starts the provider calls of reserved payments for provider `code`, as one batch
    /// ([`Guarded::authorize_batch`](settlegate_adapters::Guarded::authorize_batch)).
    fn call(&mut self, code: u32, batch: Vec<Reserved>, deadline: Instant) {
        let provider = (self.engine.registry().provider(code))
            .expect("shard checked the provider; the provider set is fixed");
        let requests = batch.iter().map(|(_, dispatch)| dispatch.provider_request()).collect();
        let answers = provider.adapter.authorize_batch(requests, deadline);
        self.calls.push(Call { answers, batch: batch.into_iter().map(Some).collect() });
    }

    /// Sends each shard the completions of `answered`, its payments whose providers answered.
    fn record(&mut self, answered: Vec<Answered>) {
        let engine = &self.engine;
        let now_ms = engine.now_ms();
        let mut per_shard: Vec<(Vec<Answered>, Vec<Op>)> =
            (0..engine.shard_count()).map(|_| Default::default()).collect();
        for (index, dispatch, outcome) in answered {
            let (entries, ops) = &mut per_shard[engine.shard_of(dispatch.key.0)];
            ops.push(Op::Apply(dispatch.completion(outcome, now_ms)));
            entries.push((index, dispatch, outcome));
        }
        for (shard, (entries, ops)) in per_shard.into_iter().enumerate() {
            if ops.is_empty() {
                continue;
            }
            // Completions are never refused as busy: dropping one would lose an outcome.
            let recorded = engine.submit_always(shard, ops);
            self.recording.push(Recording { shard, recorded, entries, now_ms });
        }
    }

    /// Adds the results of a recorded group to `group` (`replies` `None`: its shard is gone,
    /// and nothing was recorded).
    fn stood(&self, recording: Recording, replies: Option<Vec<Reply>>, group: &mut Vec<Standing>) {
        let Recording { shard, entries, now_ms, .. } = recording;
        let engine = &self.engine;
        let Some(replies) = replies else {
            // Not recorded, not acknowledged: no reply and no notice may claim it.
            let lost = engine.lost(shard);
            group.extend(entries.into_iter().map(|(i, ..)| (i, Err(lost.clone()))));
            return;
        };
        group.extend(entries.into_iter().zip(replies).map(
            |((index, dispatch, mut outcome), reply)| {
                // What stands: the provider's outcome, or a decline where the completion found
                // its record gone or replaced.
                if let Ok(Completion::Dropped) = reply.into_flow() {
                    engine.inner.shared.completion_dropped(&dispatch, &outcome);
                    outcome = AuthOutcome::Declined(ReasonCode::ProviderTimeout);
                }
                (index, Ok(engine.publish_outcome(*dispatch, outcome, now_ms)))
            },
        ));
    }
}

impl Call {
    /// Adds the answers that are in to `answered`; true once every answer has come.
    fn poll_answers(&mut self, cx: &mut Context<'_>, answered: &mut Vec<Answered>) -> bool {
        loop {
            match self.answers.poll_next_unpin(cx) {
                Poll::Ready(Some((at, answer))) => {
                    // An answer for a position answered before is not a second answer.
                    if let Some((index, dispatch)) = self.batch.get_mut(at).and_then(Option::take) {
                        let outcome = dispatch.outcome_of(answer);
                        answered.push((index, dispatch, outcome));
                    }
                }
                Poll::Ready(None) => return true,
                Poll::Pending => return false,
            }
        }
    }
}
