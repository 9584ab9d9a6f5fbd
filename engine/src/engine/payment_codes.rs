//! C1–C5 payment codes and coupons: issue, redeem, state, sweep, delivery notices.

use super::*;

/// A payment-code request (C1–C2, C4): the user terminal's signed inherent ID (its store
/// terminal may be `*`: any store) for the amount, means and provider; how long the code is
/// valid; where to deliver it; and, for cash on delivery, the order it pays for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IssueCodeRequest {
    /// Makes retries safe (see [`RequestId`]).
    pub client_request_id: RequestId,
    /// The signed inherent ID.
    pub inherent_id: Vec<u8>,
    /// Validity of the code and its hold, ms (10 s to 7 days).
    pub validity_ms: i64,
    /// Another device of the user's to deliver the code to; `None`: the requesting device.
    pub deliver_to: Option<Idm>,
    /// The order a cash-on-delivery code pays for (at most 32 bytes); empty for none.
    pub order_ref: String,
}

/// The answer to a payment-code request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CodeOutcome {
    /// Authorized and held; the code issued.
    Issued(Box<IssuedCode>),
    /// Declined, with the reason (as a payment would be).
    Declined(ReasonCode),
}

/// A sale's lines: plain, or with their categories for the age check. One or the other, never
/// both.
#[derive(Debug, Clone, PartialEq, Eq, Hash, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub enum SaleLines {
    /// Lines sold: item ID (1..=32 bytes of 0x21–0x7E, as in a basket), quantity, unit
    /// amount.
    Items(Vec<(String, u32, u64)>),
    /// The lines sold with their categories, for the age check of a code payment (A2,
    /// `REDEEM_CODE_BASKET`): checked against the age registration of the device the code was
    /// delivered to; the redemption's items are the lines settled (those the age check did not
    /// remove).
    Basket(Basket),
}

impl SaleLines {
    /// Whether the lines are within bounds: at most [`SALE_ITEMS_MAX`] plain lines, each
    /// item ID valid (a basket's lines are checked by the age check, `Basket::total`).
    fn valid(&self) -> bool {
        match self {
            SaleLines::Items(items) => {
                items.len() <= SALE_ITEMS_MAX
                    && items.iter().all(|(item_id, _, _)| crate::age::item_id_valid(item_id))
            }
            SaleLines::Basket(_) => true,
        }
    }
}

/// A POS redeeming a code with its sales information (C3, C4).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RedeemRequest {
    /// Makes retries safe (see [`RequestId`]).
    pub client_request_id: RequestId,
    /// The code as read.
    pub code: String,
    /// The issuer the POS expects (the number printed beside the barcode).
    pub issuer: u16,
    /// The issue number the POS expects.
    pub number: u64,
    /// The sale's amount before any coupon.
    pub amount_minor: u64,
    /// The sale's currency.
    pub currency: Currency,
    /// The sale's date-time, ms since the epoch.
    pub sale_at_ms: i64,
    /// The store terminal (or courier handheld) redeeming it.
    pub terminal_id: String,
    /// The lines sold: plain lines, or a basket to check for age.
    pub lines: SaleLines,
    /// A coupon to apply in the same settlement (C5), as read.
    pub coupon: Option<String>,
    /// The order a cash-on-delivery code pays for.
    pub order_ref: String,
}

impl Engine {
    /// Issues a payment code (C1–C2): the request is checked like a payment and the provider
    /// asked for the authorization, which is held; on approval the code is issued by the
    /// user's shard (the second tier that will answer its redemption) and delivered to the
    /// designated device's stream.
    ///
    /// # Example
    ///
    /// A user terminal asks for a code valid at any store (`*`) for 1,000 JPY:
    ///
    /// ```
    /// # use settlegate_engine::adapters::{simulated::SimulatedConfig, AdapterConfig};
    /// # use settlegate_engine::*;
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// # let engine = Engine::start(EngineConfig {
    /// #     password: PasswordConfig { memory_kib: 64, iterations: 1, parallelism: 1 },
    /// #     providers: vec![ProviderConfig {
    /// #         code: 1,
    /// #         name: "Demo Acquirer".into(),
    /// #         adapter: AdapterConfig::Simulated(SimulatedConfig::default()),
    /// #         limits: Default::default(),
    /// #         terminals: Vec::new(),
    /// #     }],
    /// #     ..EngineConfig::default()
    /// # })?;
    /// let user = UserKey::new(UserIdType::Mail, "hanako@example.jp")?;
    /// let device = engine
    ///     .enroll(EnrollRequest {
    ///         client_request_id: RequestId::random(),
    ///         user: user.clone(),
    ///         password: "a long passphrase".into(),
    ///         card_idm: [1, 0x2e, 0, 0, 0, 0, 0, 1],
    ///     })
    ///     .await?;
    /// let card = MeansInput::CreditCard { pan: "4111111111111111".into() };
    /// engine.add_means(RequestId::random(), &user, &card, AddMeansOptions::default()).await?;
    /// let record = InherentId {
    ///     key_version: device.key_version,
    ///     amount_minor: 1_000,
    ///     currency: Currency::try_from("JPY")?,
    ///     means: MeansKind::CreditCard,
    ///     means_id: 0,
    ///     provider_code: 1,
    ///     card_idm: device.card_idm,
    ///     user: user.clone(),
    ///     terminal_id: "*".into(),
    ///     counter: 1,
    ///     timestamp_ms: engine.now_ms(),
    /// };
    /// let request = IssueCodeRequest {
    ///     client_request_id: RequestId::random(),
    ///     inherent_id: record.sign(device.device_key.expose()),
    ///     validity_ms: 600_000,
    ///     deliver_to: None,
    ///     order_ref: String::new(),
    /// };
    /// match engine.issue_code(request).await? {
    ///     CodeOutcome::Issued(code) => {
    ///         let state = engine.code_state(code.number).await?;
    ///         println!("{}: {state:?}", code.text);
    ///     }
    ///     CodeOutcome::Declined(reason) => println!("declined: {reason}"),
    /// }
    /// # engine.shutdown().await;
    /// # Ok(())
    /// # }
    /// ```
    pub async fn issue_code(&self, request: IssueCodeRequest) -> Result<CodeOutcome, EngineError> {
        let valid = (CODE_VALIDITY_MIN_MS..=CODE_VALIDITY_MAX_MS).contains(&request.validity_ms)
            && request.order_ref.len() <= ORDER_REF_LEN_MAX
            && request.order_ref.bytes().all(|b| b.is_ascii_graphic());
        if !valid {
            return Err(EngineError::Refused(ReasonCode::InvalidCodeRequest));
        }
        let now_ms = self.now_ms();
        let deadline =
            Instant::now() + Duration::from_millis(self.inner.config.request_deadline_ms);
        let verified = match self.inner.shared.devices.verify(&request.inherent_id, now_ms) {
            Ok(verified) => verified,
            Err(reason) => return Ok(CodeOutcome::Declined(reason)),
        };
        let spec = CodeSpec {
            validity_ms: request.validity_ms,
            deliver_to: request.deliver_to,
            order_ref: request.order_ref,
        };
        let user = verified.record.user.clone();
        let digest = digest_of(&("code", verified.digest, &spec));
        let terminal = Some(Box::new(self.terminal_context(&verified, now_ms)));
        let command = Command::CodeReserve { verified, spec: Box::new(spec), terminal };
        let reply =
            self.apply_for_user(&user, Some(request.client_request_id), digest, command).await?;
        let dispatch = match reply {
            CodeRequest::Dispatch(dispatch) => dispatch,
            // Approved at once by an in-process provider: issued in the same shard step.
            CodeRequest::Decided(issued) => return Ok(self.deliver_code(issued)),
            CodeRequest::Issued(issued) => return Ok(CodeOutcome::Issued(issued)),
            CodeRequest::Declined(reason) => return Ok(CodeOutcome::Declined(reason)),
        };
        let outcome = self.call_provider(&dispatch, deadline).await;
        let envelope = dispatch.completion(outcome, self.now_ms());
        // Like a payment's completion, never refused as busy.
        let shard = self.shard_of(dispatch.key.0);
        let mut replies = self
            .submit_always(shard, vec![Op::Apply(envelope)])
            .await
            .map_err(|_| self.lost(shard))?;
        match replies.pop().ok_or(EngineError::Stopped)?.into_flow()? {
            CodeCompletion::Issued(issued) => Ok(self.deliver_code(issued)),
            CodeCompletion::Declined(reason) => Ok(CodeOutcome::Declined(reason)),
            CodeCompletion::Dropped => {
                self.inner.shared.completion_dropped(&dispatch, &outcome);
                Ok(CodeOutcome::Declined(ReasonCode::ProviderTimeout))
            }
        }
    }

    /// Delivers a newly issued code to its device's stream.
    fn deliver_code(&self, issued: Box<IssuedCode>) -> CodeOutcome {
        let message = DeviceMessage::Code((*issued).clone());
        self.inner.notices.publish_device(issued.deliver_to, message);
        CodeOutcome::Issued(issued)
    }

    /// Redeems a code at a POS (C3): checks its tag (constant time) and that it is what the
    /// POS expects, then routes it by its issue number to the shard that issued it (T1), which
    /// captures at most the authorized amount once, releases the rest and records the
    /// remittance. A coupon issued to the same user may be applied in the same settlement.
    /// With a basket, its age-restricted items are checked first against the age registration
    /// of the device the code was delivered to (A1–A2), under the store terminal's policy.
    pub async fn redeem_code(&self, request: RedeemRequest) -> Result<Redemption, EngineError> {
        let refused = |reason| EngineError::Refused(reason);
        let code = CodePayload::open(&request.code, &self.inner.shared.codes).map_err(refused)?;
        if code.kind != CodeKind::Payment {
            return Err(refused(ReasonCode::InvalidCode));
        }
        if code.issuer != self.inner.config.code_issuer
            || code.issuer != request.issuer
            || code.number != request.number
        {
            return Err(refused(ReasonCode::CodeMismatch));
        }
        let coupon = match &request.coupon {
            None => None,
            Some(text) => {
                let coupon = CodePayload::open(text, &self.inner.shared.codes).map_err(refused)?;
                if coupon.kind != CodeKind::Coupon {
                    return Err(refused(ReasonCode::InvalidCode));
                }
                // A coupon applies with the payment codes of its own user, whose shard holds
                // both: another shard's coupon is another user's.
                if codes::shard_of_number(coupon.number) != codes::shard_of_number(code.number) {
                    return Err(refused(ReasonCode::CouponNotApplicable));
                }
                Some(coupon.number)
            }
        };
        let valid_sale = request.amount_minor > 0
            && request.amount_minor <= crate::limits::AMOUNT_MINOR_MAX
            && crate::types::terminal_id_valid(&request.terminal_id)
            && request.lines.valid()
            && request.order_ref.len() <= ORDER_REF_LEN_MAX;
        if !valid_sale {
            return Err(refused(ReasonCode::CodeMismatch));
        }
        let shard = codes::shard_of_number(code.number);
        if shard >= self.shard_count() {
            return Err(refused(ReasonCode::UnknownCode));
        }
        let spec = RedeemSpec {
            number: code.number,
            amount_minor: request.amount_minor,
            currency: request.currency,
            terminal_id: request.terminal_id,
            sale_at_ms: request.sale_at_ms,
            lines: request.lines,
            coupon,
            order_ref: request.order_ref,
        };
        let policies = Some(terminal_policies(&self.inner.shared.registry, &spec.terminal_id));
        let envelope = Envelope {
            owner_hash: digest_of(&("code", code.number)),
            client_request_id: Some(request.client_request_id.get()),
            digest: digest_of(&spec),
            now_ms: self.now_ms(),
            command: Command::RedeemCode { spec: Box::new(spec), policies },
        };
        let redemption: Box<Redemption> = self.call(shard, Op::Apply(envelope)).await?;
        Ok(*redemption)
    }

    /// A payment code's state: issued, expired, or redeemed with its capture and the
    /// remittance due to the merchant (C3).
    pub async fn code_state(&self, number: u64) -> Result<CodeState, EngineError> {
        self.code_state_for(number, |_| true).await
    }

    /// [`Engine::code_state`] for a reader that may see the codes of some store terminals only
    /// (`may_see` says which): a code's state concerns the terminal that redeemed it, or before
    /// its redemption the terminal it was requested for (`*` when the store was not known). A
    /// code of a terminal `may_see` refuses is answered exactly as a code that does not exist
    /// (`UnknownCode`).
    pub async fn code_state_for(
        &self,
        number: u64,
        may_see: impl Fn(&str) -> bool,
    ) -> Result<CodeState, EngineError> {
        let unknown = EngineError::Refused(ReasonCode::UnknownCode);
        let shard = codes::shard_of_number(number);
        if shard >= self.shard_count() {
            return Err(unknown);
        }
        let CodeView { state, terminal_id } =
            self.call(shard, Op::Query(Query::Code { number })).await?;
        if may_see(&terminal_id) {
            Ok(*state)
        } else {
            Err(unknown)
        }
    }

    /// Expires every payment code past its expiry and releases its hold, in every shard (of a
    /// cluster node: every partition it owns); returns how many. The server runs it
    /// periodically; an embedding application should too.
    pub async fn sweep_codes(&self) -> Result<u32, EngineError> {
        let now_ms = self.now_ms();
        let owned = |shard: &usize| {
            self.inner.cluster.as_ref().is_none_or(|c| c.partitions.applies(*shard, true))
        };
        let sweeps = (0..self.shard_count()).filter(owned).map(|shard| {
            let envelope = Envelope {
                owner_hash: 0,
                client_request_id: None,
                digest: 0,
                now_ms,
                command: Command::SweepCodes,
            };
            self.submit_always(shard, vec![Op::Apply(envelope)])
        });
        let mut swept = 0;
        for replies in join_all(sweeps).await {
            let reply = replies.map_err(|_| EngineError::Stopped)?.pop();
            let Swept(count) = reply.ok_or(EngineError::Stopped)?.into_flow()?;
            swept += count;
        }
        Ok(swept)
    }

    /// Issues coupons or service codes for a provider to each of `users` (C5), each delivered
    /// to the user's devices. Results come back in user order.
    pub async fn issue_coupons(
        &self,
        client_request_id: RequestId,
        provider_code: ProviderCode,
        users: Vec<UserKey>,
        effect: CouponEffect,
        uses: u32,
        expires_ms: i64,
    ) -> Vec<Result<IssuedCoupon, EngineError>> {
        let provider_code = provider_code.get();
        if users.is_empty() || users.len() > COUPON_USERS_MAX {
            return vec![Err(EngineError::Refused(ReasonCode::InvalidCoupon)); users.len().max(1)];
        }
        if self.registry().provider(provider_code).is_none() {
            return vec![Err(EngineError::Refused(ReasonCode::UnknownProvider)); users.len()];
        }
        if expires_ms <= self.now_ms() {
            return vec![Err(EngineError::Refused(ReasonCode::InvalidCoupon)); users.len()];
        }
        let issues = users.into_iter().map(|user| async move {
            let digest = digest_of(&("coupon", provider_code, &user, effect, uses, expires_ms));
            let command = Command::IssueCoupon {
                user: user.clone(),
                provider_code,
                effect,
                uses,
                expires_ms,
            };
            let coupon: Box<IssuedCoupon> =
                self.apply_for_user(&user, Some(client_request_id), digest, command).await?;
            let coupon = *coupon;
            for idm in self.devices_of(&user).await.unwrap_or_default() {
                self.inner.notices.publish_device(idm, DeviceMessage::Coupon(coupon.clone()));
            }
            Ok(coupon)
        });
        join_all(issues).await
    }

    /// Tells a user a cash-on-delivery parcel is on its way (C4): the notice reaches every
    /// device of theirs that is subscribed. Returns how many devices were subscribed when it
    /// was accepted. Idempotent by client request ID, as every change is: the user's shard
    /// keeps the answer, a retry gets it and publishes nothing (the same ID with another
    /// notice is `IdempotencyConflict`).
    pub async fn notify_delivery(
        &self,
        client_request_id: RequestId,
        notice: DeliveryNotice,
    ) -> Result<usize, EngineError> {
        let valid = notice.amount_minor > 0
            && notice.amount_minor <= crate::limits::AMOUNT_MINOR_MAX
            && !notice.order_ref.is_empty()
            && notice.order_ref.len() <= ORDER_REF_LEN_MAX
            && notice.order_ref.bytes().all(|b| b.is_ascii_graphic())
            && notice.merchant.len() <= crate::limits::STORE_NAME_LEN_MAX;
        if !valid {
            return Err(EngineError::Refused(ReasonCode::InvalidCodeRequest));
        }
        let devices = self.devices_of(&notice.user).await?;
        let listened = devices.iter().filter(|idm| self.inner.notices.device_listened(idm));
        let count = u32::try_from(listened.count()).unwrap_or(u32::MAX);
        let digest = digest_of(&(
            "delivery",
            &notice.user,
            &notice.order_ref,
            notice.amount_minor,
            notice.currency,
            &notice.merchant,
        ));
        let command = Command::NotifyDelivery { user: notice.user.clone(), devices: count };
        let reply = self.apply_for_user(&notice.user, Some(client_request_id), digest, command);
        match reply.await? {
            // The first answer: the notice goes out now, once.
            Delivery::Accepted(count) => {
                for idm in devices {
                    self.inner.notices.publish_device(idm, DeviceMessage::Delivery(notice.clone()));
                }
                Ok(count as usize)
            }
            // A retry: answered as the first was, nothing sent again.
            Delivery::Delivered(count) => Ok(count as usize),
        }
    }

    /// Subscribes to what reaches one device: its payment codes, its user's coupons and
    /// delivery notices (check the device's owner before handing the stream out).
    pub fn subscribe_device(&self, card_idm: Idm) -> broadcast::Receiver<DeviceMessage> {
        self.inner.notices.subscribe_device(card_idm)
    }

    /// The card IDms of a user's devices.
    pub async fn devices_of(&self, user: &UserKey) -> Result<Vec<Idm>, EngineError> {
        self.query_for_user(user, Query::Devices { user: user.clone() }).await
    }
}
