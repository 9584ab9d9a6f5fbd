//! G3 settlement, applied in the payer's shard: a payment's reservation (every check that needs the user's state) and its completion with the provider's answer; what recovery resolves of payments left with their provider.

use super::*;

flow_reply! {
    /// What the settlement flow answers, besides a refusal and a retry's in-flight answer.
    pub(crate) enum SettlementReply in Settlement {
        /// A payment's request: its reservation, or a retry's answer from its record.
        Payment(Payment),
        /// A provider's completion of a payment.
        Completion(Completion),
    }
}

/// What a payment's request is answered.
#[derive(Debug, Clone)]
pub(crate) enum Payment {
    /// Every check passed: the work for its provider.
    Dispatch(Box<Dispatch>),
    /// Reserved and completed in one step, its provider having answered at once
    /// (`Shard::decide_now`): the outcome is recorded; the caller publishes its notice.
    Decided(Box<Dispatch>, AuthOutcome),
    /// The outcome: a decline at reservation, or a retry's answer.
    Auth(AuthOutcome),
    /// The outcome of a payment made with a basket, and what its age check found.
    BasketAuth(AuthOutcome, Box<AgeVerdict>),
}

/// What a provider's completion of a payment is answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Completion {
    /// The outcome is recorded on the payment's idempotency record.
    Recorded,
    /// The payment's idempotency record was gone or replaced: nothing was recorded but the
    /// release of its hold; the payment stands declined as a provider timeout
    /// ([`Shared::completion_dropped`]).
    Dropped,
}

/// Why a reservation declined: the reason, with the basket's verdict when its age check
/// declined it.
pub(super) struct Declined {
    pub(super) reason: ReasonCode,
    pub(super) verdict: Option<Box<AgeVerdict>>,
}

impl ShardState {
    /// A payment's reservation ([`ShardState::reserve`]), answered.
    pub(super) fn auth_reserve(
        &mut self,
        verified: Verified,
        basket: Option<&Basket>,
        terminal: &TerminalContext,
        now_ms: i64,
        idem_record: (IdemKey, u64),
    ) -> Payment {
        match self.reserve(verified, basket, terminal, now_ms, idem_record) {
            Ok(dispatch) => Payment::Dispatch(dispatch),
            Err(Declined { reason, verdict: None }) => Payment::Auth(AuthOutcome::Declined(reason)),
            Err(Declined { reason, verdict: Some(verdict) }) => {
                Payment::BasketAuth(AuthOutcome::Declined(reason), verdict)
            }
        }
    }

    /// Every check of an authorization that needs the user's state; on success, the nonce is
    /// consumed and the work is handed back for dispatch to the provider, for the payment's
    /// idempotency record: its key and its request's digest.
    pub(super) fn reserve(
        &mut self,
        verified: Verified,
        basket: Option<&Basket>,
        terminal: &TerminalContext,
        now_ms: i64,
        (key, digest): (IdemKey, u64),
    ) -> Result<Box<Dispatch>, Declined> {
        let record = verified.record;
        let declined = |reason| Err(Declined { reason, verdict: None });
        let Some(account) = self.users.get_mut(&record.user).map(Arc::make_mut) else {
            return declined(ReasonCode::UnknownUser);
        };
        let Some(device) = account.devices.iter_mut().find(|d| d.idm == record.card_idm) else {
            return declined(ReasonCode::UserDeviceMismatch);
        };
        // Verified against the key index before this command was applied: a revocation (or two
        // rotations) applied since then refuses its key here.
        if !device.sealed.accepts(record.key_version) {
            return declined(ReasonCode::KeyVersionInvalid);
        }
        if (now_ms - record.timestamp_ms).abs() > self.config.timestamp_window_ms {
            return declined(ReasonCode::StaleTimestamp);
        }
        if !device.replay.fresh(record.counter) {
            return declined(ReasonCode::ReplayedNonce);
        }
        // From here on the nonce is spent, whatever the outcome.
        device.replay.record(record.counter);
        let means_id =
            if record.means_id == 0 { account.default_means.unwrap_or(0) } else { record.means_id };
        let Some(means_index) = account.means.iter().position(|m| m.means_id == means_id) else {
            return declined(ReasonCode::MeansNotRegistered);
        };
        let means = &account.means[means_index];
        if means.kind != record.means {
            return declined(ReasonCode::MeansMismatch);
        }
        if !terminal.provider_known {
            return declined(ReasonCode::UnknownProvider);
        }
        let policy = self.shared.age.policy_for(record.provider_code, terminal.policy.as_ref());
        let (amount_minor, verdict) = match basket {
            // A strict store checks item categories itself: a payment without items would
            // bypass that, so it must carry a basket.
            None if policy.policy.strict => return declined(ReasonCode::BasketMismatch),
            None => (record.amount_minor, None),
            Some(basket) => {
                let registration = self.ages.get(&record.card_idm);
                let decision = match age::decide(
                    basket,
                    record.amount_minor,
                    registration,
                    policy,
                    &self.shared.age.config,
                    now_ms,
                ) {
                    Ok(decision) => decision,
                    Err(reason) => return declined(reason),
                };
                if let Some(reason) = decision.decline {
                    return Err(Declined { reason, verdict: Some(Box::new(decision.verdict)) });
                }
                (decision.verdict.amount_minor, Some(Box::new(decision.verdict)))
            }
        };
        let discount_minor = terminal
            .discount
            .map_or(0, |discount| discount.discount_minor(amount_minor, record.currency));
        assert!(discount_minor <= amount_minor, "discount above amount");
        let kind = means.kind;
        let card_token = means.number.as_ref().map(|n| n.token);
        if let Some(purse) = &mut account.means[means_index].purse {
            // Stored value: the payment's amount is held until its provider answers.
            let final_minor = amount_minor - discount_minor;
            if purse.currency.is_some_and(|c| c != record.currency) {
                return declined(ReasonCode::CurrencyMismatch);
            }
            if purse.available_minor(now_ms) < final_minor {
                return declined(ReasonCode::InsufficientBalance);
            }
            let hold = PurseHold {
                key,
                digest: Some(digest),
                amount_minor: final_minor,
                expires_ms: i64::MAX,
            };
            purse.holds.push(hold);
        }
        self.dispatch_seq += 1;
        let dispatch = Box::new(Dispatch {
            key,
            digest,
            user: record.user,
            dispatch_id: (u64::from(self.index) << 56) | self.dispatch_seq,
            provider_code: record.provider_code,
            means_id,
            means: kind,
            card_token,
            terminal_id: record.terminal_id,
            amount_requested_minor: amount_minor,
            discount_minor,
            currency: record.currency,
            verdict,
            code: None,
            at_ms: now_ms,
        });
        self.sent(key, digest, &dispatch);
        Ok(dispatch)
    }

    /// Records a provider's answer on the payment's own idempotency record, and settles its
    /// hold and usage. A completion whose record is gone or replaced (see
    /// [`Idempotency::complete`]) records nothing but the release of its own hold: the payment
    /// stands declined ([`Completion::Dropped`]). One read from an older log, which names
    /// its record by key alone, settles the hold and usage as it did when it was written.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn auth_complete(
        &mut self,
        key: IdemKey,
        digest: Option<u64>,
        user: &UserKey,
        means_id: u32,
        outcome: AuthOutcome,
        verdict: Option<Box<AgeVerdict>>,
        now_ms: i64,
    ) -> Completion {
        let reply = match verdict {
            Some(verdict) => KeptReply::BasketAuth(outcome, *verdict),
            None => KeptReply::Auth(outcome),
        };
        let of = completes(digest, user, means_id);
        let landed = self.idem.complete(&key, of, reply);
        let dropped = !landed && digest.is_some();
        let reference = self.answered(key, digest);
        if let (true, AuthOutcome::Approved(approval), Some(reference)) =
            (landed, &outcome, &reference)
        {
            self.keep_settled(key, reference, approval.auth_code, (user, means_id));
        }
        self.reverse_unrecorded(reference, &outcome, dropped, now_ms);
        let means = self
            .users
            .get_mut(user)
            .map(Arc::make_mut)
            .and_then(|account| account.means.iter_mut().find(|m| m.means_id == means_id));
        let Some(means) = means else {
            return if dropped { Completion::Dropped } else { Completion::Recorded };
        };
        let approved = !dropped && matches!(outcome, AuthOutcome::Approved(_));
        if let Some(purse) = &mut means.purse {
            // Release the payment's own hold; an approval turns it into a debit.
            if let Some(at) = purse.holds.iter().position(|hold| hold.is_of(key, digest)) {
                let amount = purse.holds.swap_remove(at).amount_minor;
                if approved {
                    purse.balance_minor = purse.balance_minor.saturating_sub(amount);
                }
            }
        }
        if dropped {
            return Completion::Dropped;
        }
        if approved {
            means.uses += 1;
            means.last_used_ms = Some(now_ms);
        }
        Completion::Recorded
    }

    /// Completes every authorization left with its provider when the engine stopped: the
    /// outcome is unknown, so it is declined as a provider timeout, and (as any timeout) a
    /// reversal of it is owed to its provider, with the reference its reservation left in the
    /// log (`state/money.rs`). Returns the applied completions, for the log.
    pub(crate) fn resolve_pending(&mut self, now_ms: i64) -> Vec<Envelope> {
        let mut applied = Vec::new();
        for (key, digest, user, means_id) in self.idem.pending() {
            let envelope = Envelope {
                owner_hash: key.0,
                client_request_id: None,
                digest: 0,
                now_ms,
                command: Command::AuthComplete {
                    key,
                    digest: Some(digest),
                    user,
                    means_id,
                    outcome: AuthOutcome::Declined(ReasonCode::ProviderTimeout),
                    verdict: None,
                },
            };
            self.apply(envelope.clone());
            applied.push(envelope);
        }
        // An authorization still with its provider whose idempotency record the count limit
        // dropped has no pending record to complete: it is abandoned, and reversed likewise.
        let mut abandoned: Vec<(IdemKey, u64)> = self.money.in_flight.keys().copied().collect();
        abandoned.sort_unstable();
        for (key, digest) in abandoned {
            let envelope = Envelope {
                owner_hash: key.0,
                client_request_id: None,
                digest: 0,
                now_ms,
                command: Command::Abandoned { key, digest },
            };
            self.apply(envelope.clone());
            applied.push(envelope);
        }
        applied
    }
}
