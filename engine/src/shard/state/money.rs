//! Money owed to providers (store and forward, `docs/ARCHITECTURE.md`, "Forwarding"): the
//! reference of every authorization a provider may hold, kept with its payment code, and the
//! captures, voids, refunds and reversals owed to providers, until each is acknowledged.
//!
//! Everything here is state the shard's commands make: an obligation is created by the command
//! that causes it (a code's redemption, the sweeper's expiry of a code, a provider timeout, the
//! completion recovery makes for a payment a crash left in flight), so that it is in the log
//! with it and comes back on replay. The forwarder (`engine/forward.rs`) sends each one and
//! records the provider's answer with [`Command::Forwarded`]; until then it stays owed, and is
//! sent again after a restart.

use std::collections::BTreeMap;

use rustc_hash::FxHashMap;

use settlegate_adapters::{AuthReference, LifecycleRequest};

use super::*;

flow_reply! {
    /// What the forwarding flow answers, besides a refusal.
    pub(crate) enum MoneyReply in Money {
        /// What a shard owes its providers (a query).
        Owed(OwedView),
        /// A code's hold voided (`VOID`).
        Voided(VoidedCode),
        /// A refund of a code's capture (`REFUND`).
        Refunded(RefundedCode),
    }
}

/// The authorization a provider holds (or may hold), as the engine keeps it: the parts of
/// [`AuthReference`] the engine knows without the adapter. A network adapter's identifiers are
/// not kept: it derives them from the dispatch ID and `at_ms` ([`AuthReference::network`]).
#[derive(Debug, Clone, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub(crate) struct Reference {
    pub(crate) dispatch_id: u64,
    pub(crate) provider_code: u32,
    /// The provider's authorization code; none while (or if never) answered.
    #[rkyv(with = Map<Via<[u8; 6]>>)]
    pub(crate) auth_code: Option<AuthCode>,
    pub(crate) amount_minor: u64,
    #[rkyv(with = Via<[u8; 3]>)]
    pub(crate) currency: Currency,
    pub(crate) terminal_id: String,
    #[rkyv(with = Map<Via<[u8; 16]>>)]
    pub(crate) card_token: Option<CardToken>,
    pub(crate) at_ms: i64,
}

impl Reference {
    /// The reference of `dispatch`, before its answer.
    pub(crate) fn of(dispatch: &Dispatch) -> Reference {
        Reference {
            dispatch_id: dispatch.dispatch_id,
            provider_code: dispatch.provider_code,
            auth_code: None,
            amount_minor: dispatch.amount_final_minor(),
            currency: dispatch.currency,
            terminal_id: dispatch.terminal_id.clone(),
            card_token: dispatch.card_token,
            at_ms: dispatch.at_ms,
        }
    }

    /// As the adapter takes it.
    pub(crate) fn to_adapter(&self) -> AuthReference {
        AuthReference {
            dispatch_id: self.dispatch_id,
            provider_code: self.provider_code,
            auth_code: self.auth_code,
            amount_minor: self.amount_minor,
            currency: self.currency,
            terminal_id: self.terminal_id.clone(),
            card_token: self.card_token,
            at_ms: self.at_ms,
            network: None,
        }
    }
}

/// An operation owed to a provider.
#[derive(Debug, Clone, Copy, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub(crate) enum Owed {
    /// Capture this much of the authorization (a code's redemption).
    Capture(u64),
    /// Release the whole hold (a code expired unused, or voided).
    Void,
    /// Return this much of the capture.
    Refund(u64),
    /// Undo an authorization whose answer the engine could not record.
    Reversal,
    /// Return this much of a settled payment (a sale, captured with its approval: `REFUND`
    /// target 2). Carried to the provider as [`Owed::Refund`] is; told apart for the report.
    RefundSettled(u64),
}

impl Owed {
    /// A short lower-case name, as the adapter's [`settlegate_adapters::Operation::name`].
    pub(crate) fn name(self) -> &'static str {
        match self {
            Owed::Capture(_) => "capture",
            Owed::Void => "void",
            Owed::Refund(_) | Owed::RefundSettled(_) => "refund",
            Owed::Reversal => "reversal",
        }
    }
}

/// One operation owed to a provider, until it acknowledges it.
#[derive(Debug, Clone, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub(crate) struct Obligation {
    pub(crate) reference: Reference,
    pub(crate) operation: Owed,
    /// When the command that created it was made.
    pub(crate) since_ms: i64,
}

impl Obligation {
    /// The request that carries it, under `operation_id`.
    pub(crate) fn request(&self, operation_id: u64) -> LifecycleRequest {
        let authorization = self.reference.to_adapter();
        match self.operation {
            Owed::Capture(amount) => LifecycleRequest::capture(operation_id, authorization, amount),
            Owed::Void => LifecycleRequest::void(operation_id, authorization),
            Owed::Refund(amount) | Owed::RefundSettled(amount) => {
                LifecycleRequest::refund(operation_id, authorization, amount)
            }
            Owed::Reversal => LifecycleRequest::reversal(operation_id, authorization),
        }
    }
}

/// The provider's last word on an owed operation ([`Command::Forwarded`]).
#[derive(Debug, Clone, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub(crate) enum Acknowledged {
    /// Done.
    Accepted,
    /// Refused for good, for this reason (`settlegate_adapters::RefusalReason`, in words): not
    /// sent again.
    Refused(String),
}

/// A code's authorization, or a settled payment's, as kept for the operations that follow it.
#[derive(Debug, Clone, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub(crate) struct CodeMoney {
    pub(crate) reference: Reference,
    /// Refunds of its capture, by the refund's idempotency key (a client request ID under
    /// the hash of what it refunds): its amount.
    pub(crate) refunds: Vec<(IdemKey, u64)>,
}

impl CodeMoney {
    /// The total refunded.
    pub(crate) fn refunded_minor(&self) -> u64 {
        self.refunds.iter().map(|(_, amount)| amount).sum()
    }

    /// Records a refund of `amount_minor` of a capture of `captured_minor`, for idempotency
    /// record `key`, if the refunds' total stays within the capture and the queue of owed
    /// operations is not `full`: the reference to owe it on, and the answer.
    fn refund(
        &mut self,
        captured_minor: u64,
        amount_minor: u64,
        key: IdemKey,
        full: bool,
    ) -> Result<(Reference, RefundedCode), ReasonCode> {
        let refunded_minor = self.refunded_minor();
        if amount_minor == 0 || refunded_minor.saturating_add(amount_minor) > captured_minor {
            return Err(ReasonCode::RefundAboveCaptured);
        }
        if full {
            return Err(ReasonCode::ProviderUnavailable);
        }
        self.refunds.push((key, amount_minor));
        let refunded_minor = refunded_minor + amount_minor;
        let answer = RefundedCode { amount_minor, refunded_minor, captured_minor };
        Ok((self.reference.clone(), answer))
    }
}

/// A settled payment with its refunds (`REFUND` target 2), as a snapshot and a report hold it
/// (the store keeps a [`super::Kept`] and the refunds beside it, `state/settled.rs`).
#[derive(Debug, Clone, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub(crate) struct SettledPayment {
    /// Its reference and its refunds.
    pub(crate) money: CodeMoney,
    /// The stored-value means it was paid from, when the engine keeps that balance: each
    /// refund is credited back to it as it is owed to the provider.
    pub(crate) purse: Option<PurseOf>,
}

/// A user's stored-value means, by its ID.
#[derive(Debug, Clone, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub(crate) struct PurseOf {
    #[rkyv(with = UserKeyVia)]
    pub(crate) user: UserKey,
    pub(crate) means_id: u32,
}

/// What a shard owes its providers and what it keeps to owe them more.
#[derive(Debug, Clone, Default)]
pub(crate) struct Ledger {
    /// Authorizations sent to their provider and not answered yet, by their idempotency
    /// record's key and digest: a hash map, as every payment sent to a provider enters and
    /// leaves it; whatever reads it in order (a snapshot, recovery's abandoned payments) sorts.
    pub(crate) in_flight: FxHashMap<(IdemKey, u64), Reference>,
    /// The approved authorization of each payment code, by issue number.
    pub(crate) codes: BTreeMap<u64, CodeMoney>,
    /// Operations owed to providers and not acknowledged, by operation ID (the order they
    /// were created in).
    pub(crate) owed: BTreeMap<u64, Obligation>,
    /// The last operation ID used (in the shard's top 8 bits, as a dispatch ID).
    pub(crate) op_seq: u64,
    /// What the commands applied owed and what the providers answered, in order, when kept:
    /// only a report's replay keeps it (`report.rs`); never in a snapshot or a digest.
    pub(crate) journal: Option<Vec<Journaled>>,
}

/// An entry of [`Ledger::journal`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Journaled {
    /// An operation owed, by operation ID.
    Owed(u64, Obligation),
    /// The provider's answer to an owed operation, at this time.
    Answered(u64, Acknowledged, i64),
}

/// A shard's owed operations, as the forwarder reads them.
#[derive(Debug, Clone, Default)]
pub(crate) struct OwedView {
    /// The first ones of each provider (by operation ID), at most the query's limit per
    /// provider: a provider out of reach does not hold up another's.
    pub(crate) first: Vec<(u64, Obligation)>,
    /// By provider: how many are owed, and since when the oldest.
    pub(crate) by_provider: BTreeMap<u32, (u64, i64)>,
}

/// A code's hold voided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct VoidedCode {
    /// The amount released.
    pub(crate) released_minor: u64,
}

/// A refund of a code's capture.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct RefundedCode {
    /// This refund's amount.
    pub(crate) amount_minor: u64,
    /// Every refund of the capture, this one included.
    pub(crate) refunded_minor: u64,
    /// The capture.
    pub(crate) captured_minor: u64,
}

impl ShardState {
    /// Whether the queue of owed operations is at its bound: what would add to it by choice
    /// (a redemption, an expiry, a void, a refund) waits.
    pub(crate) fn owed_full(&self) -> bool {
        self.money.owed.len() >= self.config.owed_max
    }

    /// Owes `operation` on `reference` to its provider, from a command made at `now_ms`.
    pub(super) fn owe(&mut self, reference: Reference, operation: Owed, now_ms: i64) {
        self.money.op_seq += 1;
        let operation_id = (u64::from(self.index) << 56) | self.money.op_seq;
        tracing::debug!(
            operation_id,
            dispatch_id = reference.dispatch_id,
            provider = reference.provider_code,
            operation = operation.name(),
            "owed to the provider"
        );
        let obligation = Obligation { reference, operation, since_ms: now_ms };
        if let Some(journal) = &mut self.money.journal {
            journal.push(Journaled::Owed(operation_id, obligation.clone()));
        }
        self.money.owed.insert(operation_id, obligation);
    }

    /// The provider's answer to owed operation `operation_id`, recorded at `now_ms`: it is owed
    /// no more.
    pub(super) fn forwarded(&mut self, operation_id: u64, answer: &Acknowledged, now_ms: i64) {
        let Some(obligation) = self.money.owed.remove(&operation_id) else { return };
        if let Some(journal) = &mut self.money.journal {
            journal.push(Journaled::Answered(operation_id, answer.clone(), now_ms));
        }
        if let Acknowledged::Refused(reason) = answer {
            tracing::warn!(
                operation_id,
                dispatch_id = obligation.reference.dispatch_id,
                provider = obligation.reference.provider_code,
                operation = obligation.operation.name(),
                reason = reason.as_str(),
                "the provider refused an owed operation; it is not sent again"
            );
        }
    }

    /// An authorization sent to its provider: its reference, until its answer.
    pub(super) fn sent(&mut self, key: IdemKey, digest: u64, dispatch: &Dispatch) {
        self.money.in_flight.insert((key, digest), Reference::of(dispatch));
    }

    /// The reference of the authorization of record `key` (with `digest`; none: the first of
    /// the key, for a completion read from an older log), answered now.
    pub(super) fn answered(&mut self, key: IdemKey, digest: Option<u64>) -> Option<Reference> {
        let at = match digest {
            Some(digest) => (key, digest),
            // The key's first digest, as the log's order had it (rare: older logs only).
            None => self.money.in_flight.keys().filter(|(k, _)| *k == key).min().copied()?,
        };
        self.money.in_flight.remove(&at)
    }

    /// A payment's (or code request's) answer that leaves the provider holding what the
    /// engine does not record: reversed. A timeout (the provider may have approved), and an
    /// approval whose record was gone.
    pub(super) fn reverse_unrecorded(
        &mut self,
        reference: Option<Reference>,
        outcome: &AuthOutcome,
        dropped: bool,
        now_ms: i64,
    ) {
        let Some(mut reference) = reference else { return };
        let unrecorded = match outcome {
            AuthOutcome::Approved(approval) => {
                reference.auth_code = Some(approval.auth_code);
                dropped
            }
            AuthOutcome::Declined(reason) => *reason == ReasonCode::ProviderTimeout,
        };
        if unrecorded {
            self.owe(reference, Owed::Reversal, now_ms);
        }
    }

    /// The operations owed, for the forwarder: the first `limit` of each provider, and the
    /// count and oldest by provider.
    pub(crate) fn owed_view(&self, limit: usize) -> OwedView {
        let mut view = OwedView::default();
        for (&id, obligation) in &self.money.owed {
            let entry = view
                .by_provider
                .entry(obligation.reference.provider_code)
                .or_insert((0, obligation.since_ms));
            if entry.0 < limit as u64 {
                view.first.push((id, obligation.clone()));
            }
            entry.0 += 1;
            entry.1 = entry.1.min(obligation.since_ms);
        }
        view
    }

    /// `VOID` of payment code `number` by `terminal_id` (one its code request was made for):
    /// its hold released and its provider told, before any redemption.
    pub(super) fn void_code(
        &mut self,
        number: u64,
        may_void: impl Fn(&str) -> bool,
        now_ms: i64,
    ) -> Result<VoidedCode, ReasonCode> {
        let Some(record) = self.codes.get(&number) else { return Err(ReasonCode::UnknownCode) };
        if !may_void(&record.terminal_id) {
            return Err(ReasonCode::UnknownCode);
        }
        record.still_issued()?;
        if self.owed_full() {
            return Err(ReasonCode::ProviderUnavailable);
        }
        let released_minor = record.amount_minor;
        self.release_code(number, CodeState::Voided, now_ms);
        Ok(VoidedCode { released_minor })
    }

    /// `REFUND` of `amount_minor` of redeemed code `number`'s capture by `terminal_id` (one
    /// its redemption or request was made at), for idempotency record `key`: the refunds'
    /// total never passes the capture.
    pub(super) fn refund_code(
        &mut self,
        number: u64,
        amount_minor: u64,
        may_refund: impl Fn(&str) -> bool,
        key: IdemKey,
        now_ms: i64,
    ) -> Result<RefundedCode, ReasonCode> {
        let Some(record) = self.codes.get(&number) else { return Err(ReasonCode::UnknownCode) };
        if !may_refund(record.merchant_terminal()) {
            return Err(ReasonCode::UnknownCode);
        }
        let CodeState::Redeemed(redemption) = &record.state else {
            return Err(ReasonCode::NotRefundable);
        };
        let captured_minor = redemption.captured_minor;
        let paid_from = PurseOf { user: record.user.clone(), means_id: record.means_id };
        let full = self.owed_full();
        let Some(money) = self.money.codes.get_mut(&number) else {
            // Issued before this build kept references: its provider cannot be reached.
            return Err(ReasonCode::NotRefundable);
        };
        let (reference, refunded) = money.refund(captured_minor, amount_minor, key, full)?;
        // A code paid from a purse the engine keeps: the refund goes back to it (a card's
        // money goes back through its provider alone).
        self.credit_purse(&paid_from, amount_minor);
        self.owe(reference, Owed::Refund(amount_minor), now_ms);
        Ok(refunded)
    }

    /// A payment approved and recorded on its idempotency record `key` (a sale: `AUTHORIZE`,
    /// settled with its approval under `auth_code`): kept for its refunds, with `reference`,
    /// when its provider takes refunds of sales, until its refund window ends; and the purse
    /// (`user`'s means `means_id`) it was paid from, if the engine keeps that balance. At the bound
    /// (`settled_max`) the oldest kept make room (`state/settled.rs`).
    pub(super) fn keep_settled(
        &mut self,
        key: IdemKey,
        reference: &Reference,
        auth_code: AuthCode,
        (user, means_id): (&UserKey, u32),
    ) {
        let provider = self.shared.registry.provider(reference.provider_code);
        if !provider.is_some_and(|provider| provider.adapter.refunds_sales())
            || self.config.settled_max == 0
            || self.config.refund_window_ms <= 0
        {
            return;
        }
        // Paid from a purse the engine keeps: a refund is credited back there.
        let paid_from_purse = self.users.get(user).is_some_and(|account| {
            account.means.iter().any(|m| m.means_id == means_id && m.purse.is_some())
        });
        let purse = paid_from_purse.then(|| PurseOf { user: user.clone(), means_id });
        let mut reference = reference.clone();
        reference.auth_code = Some(auth_code);
        let until_ms = self.config.refundable_until(reference.at_ms);
        // The same key again (its client request ID reused once its record was dropped): the
        // later payment is the one found from now on.
        self.settled.push(key, Kept { reference, purse }, until_ms, self.config.settled_max);
    }

    /// The sweeper: settled payments past their refund window are no longer kept.
    pub(super) fn sweep_settled(&mut self, now_ms: i64) {
        self.settled.sweep(now_ms);
    }

    /// `REFUND` of `amount_minor` of settled payment `payment` (its idempotency key) by
    /// `terminal_id` (the one it was made at), for idempotency record `key`: the refunds' total
    /// never passes the amount settled.
    pub(super) fn refund_payment(
        &mut self,
        payment: IdemKey,
        amount_minor: u64,
        may_refund: impl Fn(&str) -> bool,
        key: IdemKey,
        now_ms: i64,
    ) -> Result<RefundedCode, ReasonCode> {
        let Some(kept) = self.settled.get(&payment) else {
            return Err(ReasonCode::UnknownPayment);
        };
        // Another terminal's payment, and one past its window not swept yet, are not found.
        let until_ms = self.config.refundable_until(kept.reference.at_ms);
        if !may_refund(&kept.reference.terminal_id) || now_ms >= until_ms {
            return Err(ReasonCode::UnknownPayment);
        }
        let captured_minor = kept.reference.amount_minor;
        let dispatch_id = kept.reference.dispatch_id;
        let purse = kept.purse.clone();
        let refunds = self.settled.refunds(dispatch_id).to_vec();
        let mut money = CodeMoney { reference: kept.reference.clone(), refunds };
        let full = self.owed_full();
        let (reference, refunded) = money.refund(captured_minor, amount_minor, key, full)?;
        self.settled.set_refunds(dispatch_id, money.refunds);
        if let Some(purse) = purse {
            self.credit_purse(&purse, amount_minor);
        }
        self.owe(reference, Owed::RefundSettled(amount_minor), now_ms);
        Ok(refunded)
    }

    /// Credits `amount_minor` refunded back to the purse it was paid from, if that means is a
    /// stored-value one the engine keeps (and is still registered). Money returned is never
    /// refused: the balance may pass the top-up limit.
    fn credit_purse(&mut self, of: &PurseOf, amount_minor: u64) {
        let Some(account) = self.users.get_mut(&of.user).map(Arc::make_mut) else { return };
        let means = account.means.iter_mut().find(|m| m.means_id == of.means_id);
        if let Some(purse) = means.and_then(|m| m.purse.as_mut()) {
            purse.balance_minor = purse.balance_minor.saturating_add(amount_minor);
        }
    }
}
