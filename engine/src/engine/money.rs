//! Money movement: the forwarder that carries the operations owed to providers (captures,
//! voids, refunds, reversals: store and forward), `VOID` and `REFUND` of payment codes, and
//! `REFUND` of settled payments.
//!
//! An operation is owed from the command that caused it (`shard/state/money.rs`); the forwarder
//! ([`Engine::forward_owed`], run every `[engine.forwarding] interval_ms` by the server) reads
//! each shard's queue, sends what is due through the provider's adapter, and records the
//! provider's answer in the shard with a [`Command::Forwarded`]. A send that fails (no answer,
//! the link down) is retried with exponential backoff, from memory: after a restart every
//! operation still owed is due at once.

use std::collections::{BTreeMap, HashMap, HashSet};

use settlegate_adapters::LifecycleReply;

use super::*;
use crate::shard::{Acknowledged, Obligation, OwedView, RefundedCode, VoidedCode};

/// The operations owed to one provider ([`Engine::owed_by_provider`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OwedQueue {
    /// The provider's code.
    pub provider_code: u32,
    /// Operations owed and not acknowledged.
    pub depth: u64,
    /// How long the oldest has been owed, in ms (by the engine's clock).
    pub oldest_age_ms: u64,
}

/// What one round of the forwarder did ([`Engine::forward_owed`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ForwardRound {
    /// Operations the provider acknowledged (accepted or refused for good).
    pub acknowledged: u32,
    /// Operations whose send failed: retried later.
    pub failed: u32,
    /// Operations still owed after the round, across providers.
    pub owed: u64,
}

/// A code's hold voided ([`Engine::void_code`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CodeVoided {
    /// The amount released.
    pub released_minor: u64,
}

/// A refund of a code's capture ([`Engine::refund_code`]), or of a settled payment
/// ([`Engine::refund_payment`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CodeRefunded {
    /// This refund's amount.
    pub amount_minor: u64,
    /// The total refunded, this one included.
    pub refunded_minor: u64,
    /// The amount captured.
    pub captured_minor: u64,
}

/// The forwarder's memory between rounds: retries' backoff, sends in progress, the last
/// queue depths (for metrics) and when each provider's alarm was last logged.
#[derive(Default)]
pub(super) struct Forwarding {
    /// By operation ID: failures so far, and when to try again.
    retries: HashMap<u64, (u32, Instant)>,
    /// Operations being sent now.
    sending: HashSet<u64>,
    /// By provider: depth and oldest (ms since the epoch), from the last round.
    queues: BTreeMap<u32, (u64, i64)>,
    /// By provider: when its alarm was last logged.
    alarmed: HashMap<u32, Instant>,
}

impl Engine {
    /// One round of store and forward: in every shard (of a cluster node: every partition it
    /// owns), sends the operations owed to providers that are due, at most
    /// `[engine.forwarding] batch_max` per shard and provider, and records each answer. Logs an ERROR with
    /// the age of a provider's oldest operation once it is older than `alarm_after_ms`. The
    /// server runs it every `interval_ms`; an embedding application should too.
    pub async fn forward_owed(&self) -> Result<ForwardRound, EngineError> {
        let config = &self.inner.config.forwarding;
        let owned = |shard: &usize| {
            self.inner.cluster.as_ref().is_none_or(|c| c.partitions.applies(*shard, true))
        };
        let mut queues: BTreeMap<u32, (u64, i64)> = BTreeMap::new();
        let mut sends = Vec::new();
        for shard in (0..self.shard_count()).filter(owned) {
            let OwedView { first, by_provider } =
                self.call(shard, Op::Query(Query::Owed { limit: config.batch_max })).await?;
            for (provider, (depth, oldest)) in by_provider {
                let entry = queues.entry(provider).or_insert((0, oldest));
                entry.0 += depth;
                entry.1 = entry.1.min(oldest);
            }
            let now = Instant::now();
            let mut forwarding = self.forwarding();
            for (operation_id, obligation) in first {
                let due = forwarding.retries.get(&operation_id).is_none_or(|(_, at)| *at <= now);
                if due && forwarding.sending.insert(operation_id) {
                    sends.push(self.forward_one(shard, operation_id, obligation));
                }
            }
        }
        self.alarm(&queues);
        let mut round = ForwardRound::default();
        for sent in join_all(sends).await {
            match sent {
                true => round.acknowledged += 1,
                false => round.failed += 1,
            }
        }
        let depth: u64 = queues.values().map(|(depth, _)| depth).sum();
        round.owed = depth.saturating_sub(u64::from(round.acknowledged));
        self.forwarding().queues = queues;
        Ok(round)
    }

    /// The operations owed to each provider, as the forwarder's last round found them.
    pub fn owed_by_provider(&self) -> Vec<OwedQueue> {
        let now_ms = self.now_ms();
        let forwarding = self.forwarding();
        forwarding
            .queues
            .iter()
            .map(|(&provider_code, &(depth, oldest))| OwedQueue {
                provider_code,
                depth,
                oldest_age_ms: now_ms.saturating_sub(oldest).max(0) as u64,
            })
            .collect()
    }

    fn forwarding(&self) -> std::sync::MutexGuard<'_, Forwarding> {
        self.inner.forwarding.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Logs an ERROR for each provider whose oldest owed operation is older than the alarm
    /// threshold, at most once per threshold period.
    fn alarm(&self, queues: &BTreeMap<u32, (u64, i64)>) {
        let after_ms = self.inner.config.forwarding.alarm_after_ms;
        let now_ms = self.now_ms();
        let now = Instant::now();
        let mut forwarding = self.forwarding();
        for (&provider, &(depth, oldest)) in queues {
            let age_ms = now_ms.saturating_sub(oldest).max(0) as u64;
            if age_ms < after_ms {
                continue;
            }
            let last = forwarding.alarmed.get(&provider);
            if last.is_some_and(|at| now.duration_since(*at) < Duration::from_millis(after_ms)) {
                continue;
            }
            forwarding.alarmed.insert(provider, now);
            tracing::error!(
                provider,
                depth,
                oldest_age_s = age_ms / 1000,
                "operations owed to a provider are not draining: the oldest has waited {}s",
                age_ms / 1000
            );
        }
    }

    /// Sends one owed operation and records the provider's answer; whether it was answered.
    async fn forward_one(&self, shard: usize, operation_id: u64, obligation: Obligation) -> bool {
        let provider_code = obligation.reference.provider_code;
        let deadline =
            Instant::now() + Duration::from_millis(self.inner.config.request_deadline_ms);
        let answer = match self.registry().provider(provider_code) {
            Some(provider) => {
                provider.adapter.lifecycle(obligation.request(operation_id), deadline).await
            }
            None => Err(settlegate_adapters::AdapterError::Unavailable(
                "the provider is not configured".into(),
            )),
        };
        let acknowledged = match answer {
            Ok(LifecycleReply::Accepted { .. }) => Acknowledged::Accepted,
            Ok(LifecycleReply::Refused { reason }) => Acknowledged::Refused(format!("{reason:?}")),
            // What the adapter cannot carry at all (a currency or terminal it has no mapping
            // for) will not go any better later: refused for good, with its reason.
            Err(settlegate_adapters::AdapterError::Config(reason)) => {
                Acknowledged::Refused(format!("Config: {reason}"))
            }
            Err(error) => {
                let config = &self.inner.config.forwarding;
                let mut forwarding = self.forwarding();
                forwarding.sending.remove(&operation_id);
                let failures = forwarding.retries.get(&operation_id).map_or(0, |(f, _)| *f) + 1;
                let delay_ms = config
                    .retry_initial_ms
                    .saturating_mul(1 << (failures - 1).min(20))
                    .min(config.retry_max_ms);
                let next = Instant::now() + Duration::from_millis(delay_ms);
                forwarding.retries.insert(operation_id, (failures, next));
                tracing::warn!(
                    operation_id,
                    provider = provider_code,
                    operation = obligation.operation.name(),
                    failures,
                    retry_in_ms = delay_ms,
                    %error,
                    "an owed operation did not reach its provider; retrying"
                );
                return false;
            }
        };
        tracing::debug!(
            operation_id,
            provider = provider_code,
            dispatch_id = obligation.reference.dispatch_id,
            operation = obligation.operation.name(),
            answer = ?acknowledged,
            "an owed operation was answered by its provider"
        );
        let envelope = Envelope {
            owner_hash: 0,
            client_request_id: None,
            digest: 0,
            now_ms: self.now_ms(),
            command: Command::Forwarded { operation_id, answer: acknowledged },
        };
        let recorded = self.submit_always(shard, vec![Op::Apply(envelope)]).await.is_ok();
        let mut forwarding = self.forwarding();
        forwarding.sending.remove(&operation_id);
        if recorded {
            forwarding.retries.remove(&operation_id);
        }
        recorded
    }

    /// `VOID` of payment code `number` before its redemption, by store terminal `terminal_id`
    /// (one the code was requested for): its hold is released and its provider told (a void
    /// owed, then forwarded). Idempotent by `client_request_id`.
    pub async fn void_code(
        &self,
        client_request_id: RequestId,
        number: u64,
        terminal_id: String,
    ) -> Result<CodeVoided, EngineError> {
        let shard = self.code_shard(number, &terminal_id)?;
        let envelope = Envelope {
            owner_hash: digest_of(&("code", number)),
            client_request_id: Some(client_request_id.get()),
            digest: digest_of(&("void", number, &terminal_id)),
            now_ms: self.now_ms(),
            command: Command::VoidCode { number, terminal_id },
        };
        let VoidedCode { released_minor } = self.call(shard, Op::Apply(envelope)).await?;
        Ok(CodeVoided { released_minor })
    }

    /// `REFUND` of `amount_minor` of redeemed payment code `number`'s capture, by store
    /// terminal `terminal_id` (the one that redeemed it): owed to its provider, then
    /// forwarded. Partial refunds add up to the capture at most. Idempotent by
    /// `client_request_id`.
    pub async fn refund_code(
        &self,
        client_request_id: RequestId,
        number: u64,
        amount_minor: u64,
        terminal_id: String,
    ) -> Result<CodeRefunded, EngineError> {
        let shard = self.code_shard(number, &terminal_id)?;
        let owner_hash = digest_of(&("code", number));
        let digest = digest_of(&("refund", number, amount_minor, &terminal_id));
        let command = Command::RefundCode { number, amount_minor, terminal_id };
        self.refund(shard, owner_hash, client_request_id, digest, amount_minor, command).await
    }

    /// `REFUND` of `amount_minor` of a settled payment: the payment `user` made with
    /// `payment_request_id` (its `AUTHORIZE`'s client request ID), approved and settled at
    /// once by a provider that takes refunds of sales, refunded by store terminal
    /// `terminal_id` (the one it was made at) within the refund window
    /// (`[engine.forwarding] refund_window_ms`): owed to its provider, then forwarded.
    /// Partial refunds add up to the amount settled at most. Idempotent by
    /// `client_request_id`.
    pub async fn refund_payment(
        &self,
        client_request_id: RequestId,
        user: &UserKey,
        payment_request_id: ClientRequestId,
        amount_minor: u64,
        terminal_id: String,
    ) -> Result<CodeRefunded, EngineError> {
        if !crate::types::terminal_id_valid(&terminal_id) {
            return Err(EngineError::Refused(ReasonCode::InvalidTerminal));
        }
        let owner = user_hash(user);
        let payment = (owner, payment_request_id);
        let owner_hash = digest_of(&("payment", payment));
        let digest = digest_of(&("refund", payment, amount_minor, &terminal_id));
        let command = Command::RefundPayment { payment, amount_minor, terminal_id };
        let shard = self.shard_of(owner);
        self.refund(shard, owner_hash, client_request_id, digest, amount_minor, command).await
    }

    /// Applies a refund of `amount_minor` (`command`) in `shard`, its idempotency record under
    /// `owner_hash` (what it refunds) and `client_request_id`, and answers it.
    async fn refund(
        &self,
        shard: usize,
        owner_hash: u64,
        client_request_id: RequestId,
        digest: u64,
        amount_minor: u64,
        command: Command,
    ) -> Result<CodeRefunded, EngineError> {
        if amount_minor > crate::limits::AMOUNT_MINOR_MAX {
            return Err(EngineError::Refused(ReasonCode::RefundAboveCaptured));
        }
        let client_request_id = Some(client_request_id.get());
        let now_ms = self.now_ms();
        let envelope = Envelope { owner_hash, client_request_id, digest, now_ms, command };
        let RefundedCode { amount_minor, refunded_minor, captured_minor } =
            self.call(shard, Op::Apply(envelope)).await?;
        Ok(CodeRefunded { amount_minor, refunded_minor, captured_minor })
    }

    /// The shard of code `number`, if this engine has it.
    fn code_shard(&self, number: u64, terminal_id: &str) -> Result<usize, EngineError> {
        if !crate::types::terminal_id_valid(terminal_id) {
            return Err(EngineError::Refused(ReasonCode::InvalidTerminal));
        }
        let shard = codes::shard_of_number(number);
        if shard >= self.shard_count() {
            return Err(EngineError::Refused(ReasonCode::UnknownCode));
        }
        Ok(shard)
    }
}
