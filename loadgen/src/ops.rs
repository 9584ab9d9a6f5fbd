//! The operations a settlegate run can mix.
//!
//! Adding an operation is one line in the `operations!` table below (its variant and its
//! `--mix` name), then its wire request and the judging of its reply
//! ([`Operation::request`], [`Operation::judge`]: a server target) and its engine call
//! ([`Operation::run`]: an embedded target). Single-request operations are sent either by the
//! per-request driver ([`crate::driver`], through the protocol client) or in whole batches
//! ([`crate::lanes`]); both build and judge them with the same two functions.

use settlegate_engine::{ProviderCode, RequestId};
use std::borrow::Cow;
use std::future::Future;
use std::sync::atomic::Ordering;

use settlegate_engine::{
    AuthOutcome, AuthorizeRequest, Basket, BasketItem, BestBy, CodeOutcome, Currency, Engine,
    EngineError, InherentId, IssueCodeRequest, MeansKind, MeansOrder, RedeemRequest, UserKey,
};
use settlegate_protocol::messages::{self as wire, Reply, Request};
use settlegate_protocol::ops::{
    Authorize, AuthorizeBasket, ConfirmTerminal, IssueCode, ListMeans, Ping, RedeemCode,
    UsableMethods,
};
use settlegate_protocol::{values, Client, ClientError, Response};

use crate::dataset::{now_ms, Dataset, Payer};
use crate::driver::Execute;
use crate::mix::SplitMix64;
use crate::tally::Outcome;
use crate::target::Target;

/// Declares [`Operation`]: its variants, `--mix` names and functions.
macro_rules! operations {
    ($($(#[doc = $doc:literal])* $variant:ident => $name:literal;)+) => {
        /// A request kind the load generator can send.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum Operation {
            $($(#[doc = $doc])* $variant,)+
        }

        impl Operation {
            /// Every operation, in the order of the table.
            pub const ALL: &'static [Operation] = &[$(Operation::$variant,)+];

            /// The name used in `--mix`, `--slo` and reports.
            pub fn name(self) -> &'static str {
                match self {
                    $(Operation::$variant => $name,)+
                }
            }

        }
    };
}

operations! {
    /// Authorize a payment signed with the slot's next user's device key (the hot path).
    Authorize => "authorize";
    /// List a random user's means (read-only: one query to the user's shard).
    ListMeans => "list_means";
    /// Confirm a random store terminal with a provider (read-only, S38–S39).
    ConfirmTerminal => "confirm_terminal";
    /// Echo: the protocol round trip alone. Embedded, there is nothing to call (it measures the
    /// load generator's own overhead).
    Ping => "ping";
    /// What a random user can pay with at a random store (W3: a store and a means lookup).
    Usable => "usable";
    /// An age-checked payment: a basket with an alcohol line and the age-confirmation flag,
    /// paid from a terminal whose age registration the dataset made (A2).
    Age => "age";
    /// A payment code issued (held authorization) and then redeemed by a store terminal for
    /// less: two requests, timed together (C1–C3).
    Code => "code";
    /// A payment code issued, then voided by the store terminal it was requested for (its hold
    /// released, a void owed to its provider): two requests, timed together.
    Void => "void";
    /// `code`, then a partial refund of the capture by the redeeming terminal (owed to the
    /// provider): three requests, timed together.
    Refund => "refund";
    /// A payment (`authorize`, settled at once), then a partial refund of it by its store
    /// terminal (`REFUND` target 2, owed to the provider): two requests, timed together.
    RefundSale => "refund_sale";
}

/// The settlegate workload: a target, its dataset and the mix's operations.
pub struct Workload {
    target: Target,
    dataset: Dataset,
    operations: Vec<Operation>,
    /// Slots per connection, and connections: to give each slot its own users.
    pipeline: usize,
    connections: usize,
    /// Seed of the user and store choices.
    seed: u64,
    /// Distinguishes this run's client request IDs from earlier runs'.
    run_ms: u64,
}

impl Workload {
    /// A workload of `operations` (index for index with the mix's weights).
    pub fn new(
        target: Target,
        dataset: Dataset,
        operations: Vec<Operation>,
        connections: usize,
        pipeline: usize,
        seed: u64,
    ) -> Workload {
        let run_ms = now_ms() as u64;
        Workload { target, dataset, operations, pipeline, connections, seed, run_ms }
    }

    /// The mix's operations, index for index with its weights.
    pub fn operations(&self) -> &[Operation] {
        &self.operations
    }
}

/// The state of one in-flight slot. Payers are dealt to slots round-robin, so each user is
/// paid with by one slot at a time and a device never has two authorizations in flight (their
/// counters would arrive out of order).
pub struct SlotCursor {
    connection: usize,
    /// This slot's number among all slots of the run.
    global: usize,
    stride: usize,
    next_payer: usize,
    sequence: u64,
    rng: SplitMix64,
}

impl SlotCursor {
    /// The next payer this slot owns.
    fn next_payer(&mut self, payers: usize) -> usize {
        if self.next_payer >= payers {
            self.next_payer = self.global % payers;
        }
        let index = self.next_payer;
        self.next_payer += self.stride;
        index
    }

    fn below(&mut self, n: usize) -> usize {
        self.rng.below(n as u64) as usize
    }
}

impl Execute for Workload {
    type Slot = SlotCursor;

    fn slot(&self, connection: usize, slot: usize) -> SlotCursor {
        let global = connection * self.pipeline + slot;
        SlotCursor {
            connection,
            global,
            stride: self.connections * self.pipeline,
            next_payer: global,
            sequence: 0,
            rng: SplitMix64::new(self.seed.wrapping_add(global as u64) ^ 0x5EED),
        }
    }

    fn execute<'a>(
        &'a self,
        op: usize,
        slot: &'a mut SlotCursor,
    ) -> impl Future<Output = Outcome> + Send + 'a {
        self.operations[op].run(self, slot)
    }
}

/// The slot's next payment: a fresh client request ID and an inherent ID of the slot's next
/// payer's, for 1,000 JPY at a random store.
fn next_payment(w: &Workload, slot: &mut SlotCursor) -> (u128, Vec<u8>) {
    let (id, inherent_id, _, _) = next_payment_at(w, slot);
    (id, inherent_id)
}

/// [`next_payment`], the store terminal it names and the payer.
fn next_payment_at<'w>(
    w: &'w Workload,
    slot: &mut SlotCursor,
) -> (u128, Vec<u8>, &'w String, &'w UserKey) {
    let index = slot.next_payer(w.dataset.payers.len());
    let provider = w.dataset.providers[index % w.dataset.providers.len()];
    let store = &w.dataset.stores[slot.below(w.dataset.stores.len())];
    let inherent_id = sign(&w.dataset.payers[index], provider, store);
    slot.sequence += 1;
    let id =
        (u128::from(w.run_ms) << 64) | ((slot.global as u128) << 32) | u128::from(slot.sequence);
    (id, inherent_id, store, &w.dataset.payers[index].user)
}

impl Operation {
    /// Whether this operation is one request and one response, so that a batch of them can
    /// go out in one write ([`crate::lanes`]); `code` is two requests, the second built from
    /// the first's answer.
    pub fn is_single(self) -> bool {
        !matches!(
            self,
            Operation::Code | Operation::Void | Operation::Refund | Operation::RefundSale
        )
    }

    /// The one request a single-request operation sends to a server (`None` for `code`).
    pub fn request(self, w: &Workload, slot: &mut SlotCursor) -> Option<Request> {
        Some(match self {
            Operation::Authorize => {
                let (client_request_id, inherent_id) = next_payment(w, slot);
                Authorize { client_request_id, inherent_id }.into()
            }
            Operation::Age => {
                let (client_request_id, inherent_id) = next_payment(w, slot);
                AuthorizeBasket { client_request_id, inherent_id, basket: wire_basket() }.into()
            }
            Operation::Usable => {
                let (user, store_id, best_by) = usable_query(w, slot);
                let best_by = match best_by {
                    BestBy::MostUsed => wire::BestBy::MostUsed,
                    BestBy::LargestBalance => wire::BestBy::LargestBalance,
                };
                UsableMethods { user: user.clone(), store_id: store_id.clone(), best_by }.into()
            }
            Operation::ListMeans => {
                let user = random_user(w, slot);
                ListMeans { user: user.clone(), order: wire::MeansOrder::Registration }.into()
            }
            Operation::ConfirmTerminal => {
                let (provider_code, terminal_id) = random_terminal(w, slot);
                ConfirmTerminal { provider_code, terminal_id: terminal_id.clone() }.into()
            }
            Operation::Ping => Ping { payload: Vec::new() }.into(),
            Operation::Code | Operation::Void | Operation::Refund | Operation::RefundSale => {
                return None
            }
        })
    }

    /// How a server's answer to [`Operation::request`] counts.
    pub fn judge(self, answer: Result<Response, ClientError>) -> Outcome {
        let reply = match answer {
            Ok(Response::Ok(reply)) => reply,
            Ok(other) => {
                return Outcome::Error(client_error(ClientError::Unexpected(Box::new(other))))
            }
            Err(error) => return Outcome::Error(client_error(error)),
        };
        match (self, reply) {
            (Operation::Authorize, Reply::Authorize(outcome))
            | (Operation::Age, Reply::AuthorizeBasket(wire::BasketOutcome { outcome, .. })) => {
                auth_outcome(Ok(outcome))
            }
            (Operation::Ping, Reply::Ping(_)) => Outcome::Ok,
            (Operation::Authorize | Operation::Age | Operation::Ping, _) => {
                Outcome::Error("unexpected reply".into())
            }
            _ => Outcome::Ok,
        }
    }

    /// Sends one request of this kind (two for `code`) to the workload's target.
    pub async fn run(self, w: &Workload, slot: &mut SlotCursor) -> Outcome {
        match &w.target {
            Target::Remote(clients) => {
                let client = &clients[slot.connection];
                match self.request(w, slot) {
                    Some(request) => self.judge(client.call(&request).await),
                    None if self == Operation::RefundSale => sale_remote(w, slot, client).await,
                    None => code_remote(w, slot, client, self).await,
                }
            }
            Target::Embedded(engine) => match self {
                Operation::Authorize => authorize(w, slot, engine).await,
                Operation::Age => age_checked(w, slot, engine).await,
                Operation::Usable => usable(w, slot, engine).await,
                Operation::ListMeans => {
                    let user = random_user(w, slot);
                    ok_or_error(engine.list_means(user, MeansOrder::Registration).await)
                }
                Operation::ConfirmTerminal => {
                    let (provider_code, terminal_id) = random_terminal(w, slot);
                    ok_or_error(engine.confirm_terminal(ProviderCode(provider_code), terminal_id))
                }
                // Embedded, there is nothing to call: it measures the load generator itself.
                Operation::Ping => Outcome::Ok,
                Operation::Code | Operation::Void | Operation::Refund => {
                    code_embedded(w, slot, engine, self).await
                }
                Operation::RefundSale => sale_embedded(w, slot, engine).await,
            },
        }
    }
}

async fn authorize(w: &Workload, slot: &mut SlotCursor, engine: &Engine) -> Outcome {
    let (client_request_id, inherent_id) = next_payment(w, slot);
    let request = AuthorizeRequest { client_request_id: RequestId(client_request_id), inherent_id };
    auth_outcome(engine.authorize(request).await.map_err(engine_error))
}

/// 1,000 JPY: two beers (alcohol) and a bento: item, category, quantity, unit price.
const BASKET_LINES: [(&str, &str, u32, u64); 2] =
    [("BEER", "alcohol", 2, 250), ("BENTO", "", 1, 500)];

/// [`BASKET_LINES`] with the age-confirmation flag, for the engine.
fn basket() -> Basket {
    let line = |(id, category, quantity, unit): (&str, &str, u32, u64)| BasketItem {
        item_id: id.into(),
        category: category.into(),
        quantity,
        unit_amount_minor: unit,
    };
    Basket { age_confirmation: true, items: BASKET_LINES.into_iter().map(line).collect() }
}

/// [`BASKET_LINES`] with the age-confirmation flag, for the wire.
fn wire_basket() -> values::Basket {
    let line = |(id, category, quantity, unit): (&str, &str, u32, u64)| values::BasketItem {
        item_id: id.into(),
        category: category.into(),
        quantity,
        unit_amount_minor: unit,
    };
    values::Basket { age_confirmation: true, items: BASKET_LINES.into_iter().map(line).collect() }
}

async fn age_checked(w: &Workload, slot: &mut SlotCursor, engine: &Engine) -> Outcome {
    let (client_request_id, inherent_id) = next_payment(w, slot);
    let request = AuthorizeRequest { client_request_id: RequestId(client_request_id), inherent_id };
    let mut results = engine.authorize_baskets(vec![(request, Some(basket()))]).await;
    let result = results.pop().expect("one result");
    auth_outcome(result.map(|r| r.outcome).map_err(engine_error))
}

/// The code operation's two requests: the issue (a held authorization) and the redemption
/// of the issued code, for less, at a random store.
fn code_requests(
    w: &Workload,
    slot: &mut SlotCursor,
) -> (IssueCodeRequest, impl Fn(&str, u64, Currency) -> RedeemRequest, CodeAfter) {
    let (id, inherent_id, requested_at, _) = next_payment_at(w, slot);
    let store = w.dataset.stores[slot.below(w.dataset.stores.len())].clone();
    let after = CodeAfter {
        id: RequestId(id | (1 << 30)),
        requested_at: requested_at.clone(),
        redeemed_at: store.clone(),
    };
    let issue = IssueCodeRequest {
        client_request_id: RequestId(id),
        inherent_id,
        validity_ms: 300_000,
        deliver_to: None,
        order_ref: String::new(),
    };
    let redeem = move |text: &str, number: u64, currency: Currency| RedeemRequest {
        client_request_id: RequestId(id | (1 << 31)),
        code: text.to_owned(),
        issuer: 1,
        number,
        amount_minor: 900,
        currency,
        sale_at_ms: now_ms(),
        terminal_id: store.clone(),
        lines: settlegate_engine::SaleLines::Items(vec![("ITEM".into(), 1, 900)]),
        coupon: None,
        order_ref: String::new(),
    };
    (issue, redeem, after)
}

/// What follows a code's issue in the `void` and `refund` operations: their request's ID, and
/// the terminals the code was requested for and redeemed at.
struct CodeAfter {
    id: RequestId,
    requested_at: String,
    redeemed_at: String,
}

/// The amount the `refund` operation returns of the 900 JPY captured.
const REFUND_MINOR: u64 = 300;

async fn code_embedded(
    w: &Workload,
    slot: &mut SlotCursor,
    engine: &Engine,
    op: Operation,
) -> Outcome {
    let (issue, redeem, after) = code_requests(w, slot);
    match engine.issue_code(issue).await {
        Ok(CodeOutcome::Issued(code)) if op == Operation::Void => {
            ok_or_error(engine.void_code(after.id, code.number, after.requested_at).await)
        }
        Ok(CodeOutcome::Issued(code)) => {
            let redeemed = engine.redeem_code(redeem(&code.text, code.number, code.currency)).await;
            match (op, redeemed) {
                (Operation::Refund, Ok(_)) => ok_or_error(
                    engine
                        .refund_code(after.id, code.number, REFUND_MINOR, after.redeemed_at)
                        .await,
                ),
                (_, redeemed) => ok_or_error(redeemed),
            }
        }
        Ok(CodeOutcome::Declined(reason)) => Outcome::Declined(reason.code()),
        Err(error) => Outcome::Error(engine_error(error)),
    }
}

async fn code_remote(
    w: &Workload,
    slot: &mut SlotCursor,
    client: &Client,
    op: Operation,
) -> Outcome {
    let (issue, redeem, after) = code_requests(w, slot);
    let issue = IssueCode {
        client_request_id: issue.client_request_id.get(),
        inherent_id: issue.inherent_id,
        validity_ms: issue.validity_ms,
        deliver_to: issue.deliver_to,
        order_ref: issue.order_ref,
    };
    match client.call_ok(&issue.into()).await {
        Ok(Reply::IssueCode(wire::CodeOutcome::Issued(code))) if op == Operation::Void => {
            let void: Request = settlegate_protocol::ops::void::Void {
                client_request_id: after.id.get(),
                target: settlegate_protocol::ops::void::Target::Code(code.number),
                terminal_id: after.requested_at,
            }
            .into();
            Operation::Void.judge(client.call(&void).await)
        }
        Ok(Reply::IssueCode(wire::CodeOutcome::Issued(code))) => {
            let redeem = redeem(&code.text, code.number, code.currency);
            let settlegate_engine::SaleLines::Items(items) = redeem.lines else {
                return Outcome::Error("the mix redeems plain lines only".into());
            };
            let request: Request = RedeemCode {
                client_request_id: redeem.client_request_id.get(),
                code: redeem.code,
                issuer: redeem.issuer,
                number: redeem.number,
                amount_minor: redeem.amount_minor,
                currency: redeem.currency,
                sale_at_ms: redeem.sale_at_ms,
                terminal_id: redeem.terminal_id,
                lines: wire::SaleLines::Items(items),
                coupon: redeem.coupon,
                order_ref: redeem.order_ref,
            }
            .into();
            let redeemed = Operation::Code.judge(client.call(&request).await);
            if op != Operation::Refund || redeemed != Outcome::Ok {
                return redeemed;
            }
            let refund: Request = settlegate_protocol::ops::refund::Refund {
                client_request_id: after.id.get(),
                target: settlegate_protocol::ops::void::Target::Code(code.number),
                amount_minor: REFUND_MINOR,
                terminal_id: after.redeemed_at,
            }
            .into();
            Operation::Refund.judge(client.call(&refund).await)
        }
        Ok(Reply::IssueCode(wire::CodeOutcome::Declined(reason))) => {
            Outcome::Declined(reason.code())
        }
        Ok(_) => Outcome::Error("unexpected reply".into()),
        Err(error) => Outcome::Error(client_error(error)),
    }
}

/// The `refund_sale` operation's payment (its client request ID and inherent ID), its store
/// terminal and payer, and its refund's client request ID.
fn sale_requests<'w>(
    w: &'w Workload,
    slot: &mut SlotCursor,
) -> (u128, Vec<u8>, &'w String, &'w UserKey, RequestId) {
    let (id, inherent_id, store, user) = next_payment_at(w, slot);
    (id, inherent_id, store, user, RequestId(id | (1 << 30)))
}

async fn sale_embedded(w: &Workload, slot: &mut SlotCursor, engine: &Engine) -> Outcome {
    let (id, inherent_id, store, user, refund_id) = sale_requests(w, slot);
    let request = AuthorizeRequest { client_request_id: RequestId(id), inherent_id };
    match engine.authorize(request).await {
        Ok(AuthOutcome::Approved(_)) => ok_or_error(
            engine.refund_payment(refund_id, user, id, REFUND_MINOR, store.clone()).await,
        ),
        paid => auth_outcome(paid.map_err(engine_error)),
    }
}

async fn sale_remote(w: &Workload, slot: &mut SlotCursor, client: &Client) -> Outcome {
    let (id, inherent_id, store, user, refund_id) = sale_requests(w, slot);
    let paid = client.authorize(id, inherent_id).await;
    if !matches!(paid, Ok(AuthOutcome::Approved(_))) {
        return auth_outcome(paid.map_err(client_error));
    }
    let refund: Request = settlegate_protocol::ops::refund::Refund {
        client_request_id: refund_id.get(),
        target: settlegate_protocol::ops::void::Target::Payment {
            user: user.clone(),
            payment_request_id: id,
        },
        amount_minor: REFUND_MINOR,
        terminal_id: store.clone(),
    }
    .into();
    Operation::RefundSale.judge(client.call(&refund).await)
}

/// A random user, store and ranking: what a usable-methods query asks (W3).
fn usable_query<'w>(w: &'w Workload, slot: &mut SlotCursor) -> (&'w UserKey, &'w String, BestBy) {
    let user = random_user(w, slot);
    let store_id = &w.dataset.stores[slot.below(w.dataset.stores.len())];
    let best_by = if slot.below(2) == 0 { BestBy::MostUsed } else { BestBy::LargestBalance };
    (user, store_id, best_by)
}

async fn usable(w: &Workload, slot: &mut SlotCursor, engine: &Engine) -> Outcome {
    let (user, store_id, best_by) = usable_query(w, slot);
    ok_or_error(engine.usable_methods(user, store_id, best_by).await)
}

fn random_user<'w>(w: &'w Workload, slot: &mut SlotCursor) -> &'w UserKey {
    &w.dataset.payers[slot.below(w.dataset.payers.len())].user
}

/// A random provider and one of the dataset's store terminals.
fn random_terminal<'w>(w: &'w Workload, slot: &mut SlotCursor) -> (u32, &'w String) {
    let provider_code = w.dataset.providers[slot.below(w.dataset.providers.len())];
    (provider_code, &w.dataset.stores[slot.below(w.dataset.stores.len())])
}

/// A fresh inherent ID of `payer`'s, as their phone would sign it.
fn sign(payer: &Payer, provider_code: u32, terminal_id: &str) -> Vec<u8> {
    InherentId {
        key_version: payer.credential.key_version,
        amount_minor: 1_000,
        currency: Currency::try_from("JPY").expect("JPY is a currency"),
        means: MeansKind::CreditCard,
        means_id: 0,
        provider_code,
        card_idm: payer.credential.card_idm,
        user: payer.user.clone(),
        terminal_id: terminal_id.to_owned(),
        counter: payer.counter.fetch_add(1, Ordering::Relaxed) + 1,
        timestamp_ms: now_ms(),
    }
    .sign_with(&payer.signing)
}

fn auth_outcome(result: Result<AuthOutcome, Cow<'static, str>>) -> Outcome {
    match result {
        Ok(AuthOutcome::Approved(_)) => Outcome::Ok,
        Ok(AuthOutcome::Declined(reason)) => Outcome::Declined(reason.code()),
        Err(kind) => Outcome::Error(kind),
    }
}

fn ok_or_error<T>(result: Result<T, EngineError>) -> Outcome {
    match result {
        Ok(_) => Outcome::Ok,
        Err(error) => Outcome::Error(engine_error(error)),
    }
}

/// An engine error's kind, as errors are counted.
fn engine_error(error: EngineError) -> Cow<'static, str> {
    match error {
        EngineError::Busy { .. } => "busy".into(),
        EngineError::InFlight => "in flight".into(),
        EngineError::Refused(reason) => format!("refused {reason}").into(),
        EngineError::Stopped => "engine stopped".into(),
        other => other.to_string().into(),
    }
}

/// A client error's kind, as errors are counted.
pub(crate) fn client_error(error: ClientError) -> Cow<'static, str> {
    match error {
        ClientError::Closed(_) => "connection closed".into(),
        ClientError::Protocol(_) => "protocol violation".into(),
        ClientError::Request(_) => "request too large".into(),
        ClientError::Unexpected(response) => match *response {
            Response::Refused(reason) => format!("refused {reason}").into(),
            Response::Busy { .. } => "busy".into(),
            Response::InFlight => "in flight".into(),
            Response::Unauthenticated(_) => "unauthenticated".into(),
            Response::Forbidden(_) => "forbidden".into(),
            Response::BadRequest(_) => "bad request".into(),
            Response::UnknownOpcode => "unknown opcode".into(),
            Response::ShuttingDown => "shutting down".into(),
            Response::Internal(_) => "internal".into(),
            Response::Moved { .. } => "moved".into(),
            Response::FrameError { .. } => "frame error".into(),
            Response::Ok(_) => "unexpected reply".into(),
        },
    }
}
