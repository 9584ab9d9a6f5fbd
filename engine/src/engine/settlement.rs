//! G3 settlement: authorize payments in batches (verify, reserve, dispatch, complete, notify).

use super::*;

/// A settlement request: the signed inherent ID exactly as the user terminal built it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuthorizeRequest {
    /// Makes retries safe: the same ID and bytes always get the first outcome.
    pub client_request_id: ClientRequestId,
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
    /// the paying terminal's age registration under the store's age policy.
    pub async fn authorize_baskets(
        &self,
        requests: Vec<(AuthorizeRequest, Option<Basket>)>,
    ) -> Vec<Result<BasketOutcome, EngineError>> {
        let count = requests.len();
        if count > BATCH_SIZE_MAX {
            let error = EngineError::BatchTooLarge { len: count, max: BATCH_SIZE_MAX };
            return vec![Err(error); count];
        }
        let now_ms = self.now_ms();
        let deadline =
            Instant::now() + Duration::from_millis(self.inner.config.request_deadline_ms);
        let (requests, baskets): (Vec<_>, Vec<_>) = requests.into_iter().unzip();
        let (ids, verified) = self.verify_batch(requests, now_ms).await;
        let mut results: Vec<Option<Result<BasketOutcome, EngineError>>> = vec![None; count];
        let mut per_shard: Vec<(Vec<usize>, Vec<Op>)> =
            (0..self.shard_count()).map(|_| Default::default()).collect();
        let requests = ids.into_iter().zip(verified).zip(baskets).enumerate();
        for (index, ((client_request_id, verified), basket)) in requests {
            match verified {
                Err(reason) => results[index] = Some(Ok(declined(reason))),
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
        let dispatches = self.reserve(per_shard, now_ms, &mut results).await;
        self.dispatch_all(dispatches, deadline, &mut results).await;
        results.into_iter().map(|r| r.expect("every request has a result")).collect()
    }

    async fn verify_batch(
        &self,
        requests: Vec<AuthorizeRequest>,
        now_ms: i64,
    ) -> (Vec<ClientRequestId>, Vec<Result<Verified, ReasonCode>>) {
        let (ids, records): (Vec<_>, Vec<_>) =
            requests.into_iter().map(|r| (r.client_request_id, r.inherent_id)).unzip();
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

    /// Sends each shard its reservations and collects declines, outcomes the shard could
    /// decide at once (`now_ms` is theirs), and work for providers.
    async fn reserve(
        &self,
        per_shard: Vec<(Vec<usize>, Vec<Op>)>,
        now_ms: i64,
        results: &mut [Option<Result<BasketOutcome, EngineError>>],
    ) -> Vec<(usize, Box<Dispatch>)> {
        let mut pending = Vec::new();
        for (shard, (indices, ops)) in per_shard.into_iter().enumerate() {
            if ops.is_empty() {
                continue;
            }
            match self.submit(shard, ops) {
                Ok(receiver) => pending.push((shard, indices, receiver)),
                Err(error) => indices.iter().for_each(|&i| results[i] = Some(Err(error.clone()))),
            }
        }
        let mut dispatches = Vec::new();
        for (shard, indices, receiver) in pending {
            let Ok(replies) = receiver.await else {
                indices.iter().for_each(|&i| results[i] = Some(Err(self.lost(shard))));
                continue;
            };
            for (index, reply) in indices.into_iter().zip(replies) {
                results[index] = Some(match reply {
                    Reply::Dispatch(dispatch) => {
                        dispatches.push((index, dispatch));
                        continue;
                    }
                    Reply::Decided(dispatch, outcome) => {
                        Ok(self.publish_outcome(*dispatch, outcome, now_ms))
                    }
                    Reply::Auth(outcome) => Ok(BasketOutcome { outcome, verdict: None }),
                    Reply::BasketAuth(outcome, verdict) => {
                        Ok(BasketOutcome { outcome, verdict: Some(*verdict) })
                    }
                    Reply::InFlight => Err(EngineError::InFlight),
                    Reply::Refused(reason) => Ok(declined(reason)),
                    other => Err(unexpected(other)),
                });
            }
        }
        dispatches
    }

    /// Calls the providers, records every outcome in its shard, then publishes notices.
    async fn dispatch_all(
        &self,
        dispatches: Vec<(usize, Box<Dispatch>)>,
        deadline: Instant,
        results: &mut [Option<Result<BasketOutcome, EngineError>>],
    ) {
        if dispatches.is_empty() {
            return;
        }
        let outcomes =
            join_all(dispatches.iter().map(|(_, d)| self.call_provider(d, deadline))).await;
        let now_ms = self.now_ms();
        // Per shard: the dispatches (by position) whose completions it applies, and those.
        let mut completions: Vec<(Vec<usize>, Vec<Op>)> =
            (0..self.shard_count()).map(|_| Default::default()).collect();
        for (at, ((_, dispatch), outcome)) in dispatches.iter().zip(&outcomes).enumerate() {
            let (positions, ops) = &mut completions[self.shard_of(dispatch.key.0)];
            positions.push(at);
            ops.push(Op::Apply(dispatch.completion(*outcome, now_ms)));
        }
        // Completions are never refused as busy: dropping one would lose an outcome.
        let (positions, receivers): (Vec<_>, Vec<_>) = completions
            .into_iter()
            .enumerate()
            .filter(|(_, (_, ops))| !ops.is_empty())
            .map(|(shard, (positions, ops))| (positions, self.submit_always(shard, ops)))
            .unzip();
        let answers = join_all(receivers).await;
        let recorded = answers.iter().all(Result::is_ok);
        // What stands of each outcome: the provider's, or a decline where the completion found
        // its record gone or replaced.
        let mut standing = outcomes;
        for (positions, replies) in positions.into_iter().zip(answers) {
            for (at, reply) in positions.into_iter().zip(replies.unwrap_or_default()) {
                if let Reply::CompletionDropped = reply {
                    self.inner.shared.completion_dropped(&dispatches[at].1, &standing[at]);
                    standing[at] = AuthOutcome::Declined(ReasonCode::ProviderTimeout);
                }
            }
        }
        for ((index, dispatch), outcome) in dispatches.into_iter().zip(standing) {
            if !recorded {
                // Not recorded, not acknowledged: no reply and no notice may claim it.
                results[index] = Some(Err(self.lost(self.shard_of(dispatch.key.0))));
                continue;
            }
            results[index] = Some(Ok(self.publish_outcome(*dispatch, outcome, now_ms)));
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
