//! C1–C5 payment codes and coupons, in the shard that issued them: issue on the provider's approval, redemption with its age check and coupon, expiry and the sweeper, coupons.

use super::*;

flow_reply! {
    /// What the payment-codes and coupons flow answers, besides a refusal and a retry's
    /// in-flight answer.
    pub(crate) enum CodesReply in Codes {
        /// A payment-code request: its reservation, or a retry's answer from its record (C1).
        Request(CodeRequest),
        /// A provider's completion of a payment-code request (C2).
        Completed(CodeCompletion),
        /// A code redeemed (C3).
        Redeemed(Box<Redemption>),
        /// A code's state (a query).
        State(CodeView),
        /// A coupon issued (C5).
        CouponIssued(Box<IssuedCoupon>),
        /// Codes expired by the sweeper.
        Swept(Swept),
        /// A delivery notice (C4).
        Delivery(Delivery),
    }
}

/// What a payment-code request is answered.
#[derive(Debug, Clone)]
pub(crate) enum CodeRequest {
    /// Every check passed: the work for its provider.
    Dispatch(Box<Dispatch>),
    /// Requested and issued in one step, its provider having approved at once: the caller
    /// delivers it to its device.
    Decided(Box<IssuedCode>),
    /// Issued before: a retry's answer (delivered then, not again).
    Issued(Box<IssuedCode>),
    /// Declined, at reservation or by its provider.
    Declined(ReasonCode),
}

/// What a provider's completion of a payment-code request is answered.
#[derive(Debug, Clone)]
pub(crate) enum CodeCompletion {
    /// The provider approved: the code is issued.
    Issued(Box<IssuedCode>),
    /// The provider declined (or failed): the hold is released.
    Declined(ReasonCode),
    /// The request's idempotency record was gone or replaced: no code is issued, and the
    /// request stands declined as a provider timeout ([`Shared::completion_dropped`]).
    Dropped,
}

/// A code's state, and the store terminal it concerns (`CodeRecord::merchant_terminal`).
#[derive(Debug, Clone)]
pub(crate) struct CodeView {
    pub(crate) state: Box<CodeState>,
    pub(crate) terminal_id: String,
}

/// How many codes a sweep expired.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Swept(pub(crate) u32);

/// What a delivery notice is answered: how many subscribed devices it reached.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Delivery {
    /// Accepted now: publish it.
    Accepted(u32),
    /// Accepted before (a retry's answer): publish nothing.
    Delivered(u32),
}

impl ShardState {
    /// C1: a payment-code request is checked exactly like a payment (device, counter, means,
    /// provider; a purse's amount held); the code itself is issued on the provider's approval.
    pub(super) fn code_reserve(
        &mut self,
        verified: Verified,
        mut spec: Box<CodeSpec>,
        terminal: &TerminalContext,
        now_ms: i64,
        idem_record: (IdemKey, u64),
    ) -> CodeRequest {
        let record = &verified.record;
        let requesting = record.card_idm;
        if let Some(target) = spec.deliver_to {
            let owns = self
                .users
                .get(&record.user)
                .is_some_and(|account| account.devices.iter().any(|d| d.idm == target));
            if !owns {
                return CodeRequest::Declined(ReasonCode::UserDeviceMismatch);
            }
        }
        spec.deliver_to = Some(spec.deliver_to.unwrap_or(requesting));
        // A code owes its provider a capture or a void later: not while that queue is full.
        if self.owed_full() {
            return CodeRequest::Declined(ReasonCode::ProviderUnavailable);
        }
        match self.reserve(verified, None, terminal, now_ms, idem_record) {
            Ok(mut dispatch) => {
                dispatch.code = Some(spec);
                CodeRequest::Dispatch(dispatch)
            }
            Err(declined) => CodeRequest::Declined(declined.reason),
        }
    }

    /// C2: on approval, issues the code: the purse's hold (stored value) now lasts until the
    /// code expires; otherwise releases, as a declined payment does.
    // The fields of `Command::CodeComplete`, as they come.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn code_complete(
        &mut self,
        key: IdemKey,
        digest: Option<u64>,
        user: &UserKey,
        means_id: u32,
        outcome: AuthOutcome,
        spec: &CodeSpec,
        terminal_id: String,
        now_ms: i64,
    ) -> CodeCompletion {
        let dropped =
            digest.is_some() && !self.idem.completes(&key, completes(digest, user, means_id));
        let approval = match outcome {
            AuthOutcome::Approved(approval) if !dropped => approval,
            // Released as a declined payment is, and answered the same way; no code is issued
            // for a completion whose record is gone.
            _ => {
                let completion =
                    self.auth_complete(key, digest, user, means_id, outcome, None, now_ms);
                return match (completion, outcome) {
                    (Completion::Recorded, AuthOutcome::Declined(reason)) => {
                        CodeCompletion::Declined(reason)
                    }
                    // An approval reaches here only with its record gone.
                    (Completion::Dropped, _) | (_, AuthOutcome::Approved(_)) => {
                        CodeCompletion::Dropped
                    }
                };
            }
        };
        self.code_seq += 1;
        let number = issue_number(self.index, self.code_seq);
        // Codes carry whole seconds.
        let expires_ms = (now_ms.saturating_add(spec.validity_ms) / 1000) * 1000;
        let means = self
            .users
            .get_mut(user)
            .map(Arc::make_mut)
            .and_then(|account| account.means.iter_mut().find(|m| m.means_id == means_id));
        if let Some(purse) = means.and_then(|means| means.purse.as_mut()) {
            if let Some(hold) = purse.holds.iter_mut().find(|hold| hold.is_of(key, digest)) {
                hold.key = code_hold_key(number);
                hold.digest = None;
                hold.expires_ms = expires_ms;
            }
        }
        let deliver_to = spec.deliver_to.unwrap_or_default();
        let record = CodeRecord {
            user: user.clone(),
            means_id,
            provider_code: approval.provider_code,
            amount_minor: approval.amount_final_minor,
            currency: approval.currency,
            expires_ms,
            auth_code: approval.auth_code,
            order_ref: spec.order_ref.clone(),
            deliver_to,
            state: CodeState::Issued,
            terminal_id,
        };
        let payload = CodePayload {
            kind: CodeKind::Payment,
            issuer: self.shared.code_issuer,
            number,
            value: record.amount_minor,
            currency: record.currency,
            expires_s: (expires_ms / 1000).clamp(0, i64::from(u32::MAX)) as u32,
            flags: 0,
        };
        let issued = IssuedCode {
            text: payload.seal(&self.shared.codes),
            number,
            amount_minor: record.amount_minor,
            currency: record.currency,
            expires_ms,
            deliver_to,
            user: user.clone(),
            order_ref: spec.order_ref.clone(),
        };
        self.code_expiry.insert((expires_ms, number));
        self.codes.insert(number, Arc::new(record));
        if let Some(mut reference) = self.answered(key, digest) {
            reference.auth_code = Some(approval.auth_code);
            self.money.codes.insert(number, CodeMoney { reference, refunds: Vec::new() });
        }
        let kept = KeptReply::CodeIssued(issued.clone());
        self.idem.complete(&key, completes(digest, user, means_id), kept);
        CodeCompletion::Issued(Box::new(issued))
    }

    /// C3: redeems a code at most once: checks it, applies a coupon, captures the sale (at most
    /// the authorized amount), releases the rest, debits a purse and records the remittance.
    pub(super) fn redeem_code(
        &mut self,
        spec: &RedeemSpec,
        policies: &[(u32, ResolvedPolicy)],
        now_ms: i64,
    ) -> Result<Box<Redemption>, ReasonCode> {
        let refuse = Err;
        let Some(record) = self.codes.get(&spec.number) else {
            return refuse(ReasonCode::UnknownCode);
        };
        record.still_issued()?;
        if now_ms >= record.expires_ms {
            self.release_code(spec.number, CodeState::Expired, now_ms);
            return refuse(ReasonCode::CodeExpired);
        }
        let order_ok = record.order_ref.is_empty() || record.order_ref == spec.order_ref;
        if spec.currency != record.currency || !order_ok {
            return refuse(ReasonCode::CodeMismatch);
        }
        let terminal_policy =
            policies.iter().find(|(code, _)| *code == record.provider_code).map(|(_, p)| p);
        let (sale_minor, items) = match self.age_check_sale(spec, record, terminal_policy, now_ms) {
            Ok(sale) => sale,
            Err(reason) => return refuse(reason),
        };
        let discount_minor = match spec.coupon {
            None => 0,
            Some(coupon) => match self.coupons.get(&coupon) {
                None => return refuse(ReasonCode::UnknownCode),
                Some(c) if c.user != record.user => return refuse(ReasonCode::CouponNotApplicable),
                Some(c) if now_ms >= c.expires_ms => return refuse(ReasonCode::CodeExpired),
                Some(c) if c.uses_left == 0 => return refuse(ReasonCode::CouponUsedUp),
                Some(c) => c.effect.discount_minor(sale_minor, spec.currency),
            },
        };
        let captured_minor = sale_minor - discount_minor;
        if captured_minor > record.amount_minor {
            return refuse(ReasonCode::AmountAboveAuthorized);
        }
        // The capture is owed to the provider: not while that queue is full.
        if self.owed_full() && self.money.codes.contains_key(&spec.number) {
            return refuse(ReasonCode::ProviderUnavailable);
        }
        // Every check passed: commit.
        if let Some(coupon) = spec.coupon.and_then(|c| self.coupons.get_mut(&c)) {
            coupon.uses_left -= 1;
        }
        let record = self.codes.get_mut(&spec.number).map(Arc::make_mut).expect("checked above");
        let redemption = Redemption {
            number: spec.number,
            captured_minor,
            released_minor: record.amount_minor - captured_minor,
            coupon_discount_minor: discount_minor,
            currency: record.currency,
            terminal_id: spec.terminal_id.clone(),
            provider_code: record.provider_code,
            auth_code: record.auth_code,
            sale_at_ms: spec.sale_at_ms,
            redeemed_at_ms: now_ms,
            items,
        };
        record.state = CodeState::Redeemed(Box::new(redemption.clone()));
        let (user, means_id, expires_ms) =
            (record.user.clone(), record.means_id, record.expires_ms);
        self.code_expiry.remove(&(expires_ms, spec.number));
        // The provider is told: the capture (a partial one releases the rest), or a void when
        // nothing is captured (a coupon paid it all).
        if let Some(money) = self.money.codes.get(&spec.number) {
            let owed = if captured_minor > 0 { Owed::Capture(captured_minor) } else { Owed::Void };
            self.owe(money.reference.clone(), owed, now_ms);
        }
        let means = self
            .users
            .get_mut(&user)
            .map(Arc::make_mut)
            .and_then(|account| account.means.iter_mut().find(|m| m.means_id == means_id));
        if let Some(means) = means {
            if let Some(purse) = &mut means.purse {
                purse.holds.retain(|hold| hold.key != code_hold_key(spec.number));
                purse.balance_minor = purse.balance_minor.saturating_sub(captured_minor);
            }
            means.uses += 1;
            means.last_used_ms = Some(now_ms);
        }
        Ok(Box::new(redemption))
    }

    /// A2 on a code payment: the sale's amount and lines to settle, after the age check of its
    /// basket against the registration of the device the code was delivered to, under the
    /// store terminal's policy; or why the redemption is refused. Without a basket the sale is
    /// settled as sent, except at a strict store, which cannot check a sale without items.
    pub(super) fn age_check_sale(
        &self,
        spec: &RedeemSpec,
        code: &CodeRecord,
        terminal_policy: Option<&ResolvedPolicy>,
        now_ms: i64,
    ) -> Result<(u64, Vec<SaleLine>), ReasonCode> {
        let policy = self.shared.age.policy_for(code.provider_code, terminal_policy);
        let basket = match &spec.lines {
            SaleLines::Basket(basket) => basket,
            SaleLines::Items(_) if policy.policy.strict => return Err(ReasonCode::BasketMismatch),
            SaleLines::Items(items) => return Ok((spec.amount_minor, items.clone())),
        };
        let decision = age::decide(
            basket,
            spec.amount_minor,
            self.ages.get(&code.deliver_to),
            policy,
            &self.shared.age.config,
            now_ms,
        )?;
        if let Some(reason) = decision.decline {
            return Err(reason);
        }
        // Under `remove_items` the verdict names the lines taken out; otherwise it names none.
        let removed = &decision.verdict.items;
        let items = basket
            .items
            .iter()
            .filter(|item| !removed.contains(&item.item_id))
            .map(|item| (item.item_id.clone(), item.quantity, item.unit_amount_minor))
            .collect();
        Ok((decision.verdict.amount_minor, items))
    }

    /// Marks an issued code `state` (expired or voided), releases its hold, and owes its
    /// provider the void of its authorization.
    pub(super) fn release_code(&mut self, number: u64, state: CodeState, now_ms: i64) {
        let Some(record) = self.codes.get_mut(&number).map(Arc::make_mut) else { return };
        if record.state != CodeState::Issued {
            return;
        }
        record.state = state;
        if let Some(money) = self.money.codes.get(&number) {
            self.owe(money.reference.clone(), Owed::Void, now_ms);
        }
        let Some(record) = self.codes.get(&number) else { return };
        self.code_expiry.remove(&(record.expires_ms, number));
        let (user, means_id) = (record.user.clone(), record.means_id);
        let purse = self
            .users
            .get_mut(&user)
            .map(Arc::make_mut)
            .and_then(|account| account.means.iter_mut().find(|m| m.means_id == means_id))
            .and_then(|means| means.purse.as_mut());
        if let Some(purse) = purse {
            purse.holds.retain(|hold| hold.key != code_hold_key(number));
        }
    }

    /// Whether a sweep at `now_ms` has anything to do: a code past its expiry, or a block of
    /// settled payments all past their refund window.
    pub(crate) fn sweep_due(&self, now_ms: i64) -> bool {
        self.code_expiry.first().is_some_and(|&(expires_ms, _)| expires_ms <= now_ms)
            || self.settled.sweep_due(now_ms)
    }

    /// Expires every code past its expiry at `now_ms`, releasing its hold; returns how many.
    pub(super) fn sweep_codes(&mut self, now_ms: i64) -> u32 {
        let due: Vec<u64> =
            self.code_expiry.range(..=(now_ms, u64::MAX)).map(|&(_, number)| number).collect();
        for &number in &due {
            self.release_code(number, CodeState::Expired, now_ms);
        }
        due.len() as u32
    }

    /// C5: a coupon for one user, kept in the user's shard so that it applies in the same
    /// shard as the user's payment codes.
    pub(super) fn issue_coupon(
        &mut self,
        user: UserKey,
        provider_code: u32,
        effect: CouponEffect,
        uses: u32,
        expires_ms: i64,
    ) -> Result<Box<IssuedCoupon>, ReasonCode> {
        if !self.users.contains_key(&user) {
            return Err(ReasonCode::UnknownUser);
        }
        if !effect.valid() || !(1..=COUPON_USES_MAX).contains(&uses) {
            return Err(ReasonCode::InvalidCoupon);
        }
        self.code_seq += 1;
        let number = issue_number(self.index, self.code_seq);
        let expires_ms = (expires_ms / 1000) * 1000;
        let expires_s = (expires_ms / 1000).clamp(0, i64::from(u32::MAX)) as u32;
        let text = CodePayload::coupon(self.shared.code_issuer, number, effect, expires_s)
            .seal(&self.shared.codes);
        let record =
            CouponRecord { user: user.clone(), provider_code, effect, uses_left: uses, expires_ms };
        self.coupons.insert(number, record);
        Ok(Box::new(IssuedCoupon { text, number, user, effect, uses, expires_ms }))
    }
}
