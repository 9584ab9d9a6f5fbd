//! The operations a settlegate run can mix, one function each.
//!
//! Adding an operation is one line in the `operations!` table below (its variant, its
//! `--mix` name and its function) and that function: `async fn(&Workload, &mut SlotCursor)
//! -> Outcome`, sending one request to either target.

use std::borrow::Cow;
use std::future::Future;
use std::sync::atomic::Ordering;

use settlegate_engine::{
    AuthOutcome, AuthorizeRequest, Basket, BasketItem, BestBy, CodeOutcome, Currency, EngineError,
    InherentId, IssueCodeRequest, IssuedCode, MeansKind, MeansOrder, RedeemRequest,
};
use settlegate_protocol::messages::{Reply, Request};
use settlegate_protocol::{ClientError, Response};

use crate::dataset::{now_ms, Dataset, Payer};
use crate::driver::Execute;
use crate::mix::SplitMix64;
use crate::tally::Outcome;
use crate::target::Target;

/// Declares [`Operation`]: its variants, `--mix` names and functions.
macro_rules! operations {
    ($($(#[doc = $doc:literal])* $variant:ident => $name:literal, $run:ident;)+) => {
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

            /// Sends one request of this kind.
            pub async fn run(self, workload: &Workload, slot: &mut SlotCursor) -> Outcome {
                match self {
                    $(Operation::$variant => $run(workload, slot).await,)+
                }
            }
        }
    };
}

operations! {
    /// Authorize a payment signed with the slot's next user's device key (the hot path).
    Authorize => "authorize", authorize;
    /// List a random user's means (read-only: one query to the user's shard).
    ListMeans => "list_means", list_means;
    /// Confirm a random store terminal with a provider (read-only, S38–S39).
    ConfirmTerminal => "confirm_terminal", confirm_terminal;
    /// Echo: the protocol round trip alone. Embedded, there is nothing to call (it measures the
    /// load generator's own overhead).
    Ping => "ping", ping;
    /// What a random user can pay with at a random store (W3: a store and a means lookup).
    Usable => "usable", usable;
    /// An age-checked payment: a basket with an alcohol line and the age-confirmation flag,
    /// paid from a terminal whose age registration the dataset made (A2).
    Age => "age", age_checked;
    /// A payment code issued (held authorization) and then redeemed by a store terminal for
    /// less: two requests, timed together (C1–C3).
    Code => "code", code;
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
    let index = slot.next_payer(w.dataset.payers.len());
    let provider = w.dataset.providers[index % w.dataset.providers.len()];
    let store = &w.dataset.stores[slot.below(w.dataset.stores.len())];
    let inherent_id = sign(&w.dataset.payers[index], provider, store);
    slot.sequence += 1;
    let id =
        (u128::from(w.run_ms) << 64) | ((slot.global as u128) << 32) | u128::from(slot.sequence);
    (id, inherent_id)
}

async fn authorize(w: &Workload, slot: &mut SlotCursor) -> Outcome {
    let (id, inherent_id) = next_payment(w, slot);
    match &w.target {
        Target::Embedded(engine) => {
            let request = AuthorizeRequest { client_request_id: id, inherent_id };
            auth_outcome(engine.authorize(request).await.map_err(engine_error))
        }
        Target::Remote(clients) => auth_outcome(
            clients[slot.connection].authorize(id, inherent_id).await.map_err(client_error),
        ),
    }
}

/// 1,000 JPY: two beers (alcohol) and a bento, with the age-confirmation flag.
fn basket() -> Basket {
    let line = |id: &str, category: &str, quantity, unit| BasketItem {
        item_id: id.into(),
        category: category.into(),
        quantity,
        unit_amount_minor: unit,
    };
    Basket {
        age_confirmation: true,
        items: vec![line("BEER", "alcohol", 2, 250), line("BENTO", "", 1, 500)],
    }
}

async fn age_checked(w: &Workload, slot: &mut SlotCursor) -> Outcome {
    let (id, inherent_id) = next_payment(w, slot);
    match &w.target {
        Target::Embedded(engine) => {
            let request = AuthorizeRequest { client_request_id: id, inherent_id };
            let mut results = engine.authorize_baskets(vec![(request, Some(basket()))]).await;
            let result = results.pop().expect("one result");
            auth_outcome(result.map(|r| r.outcome).map_err(engine_error))
        }
        Target::Remote(clients) => {
            let request =
                Request::AuthorizeBasket { client_request_id: id, inherent_id, basket: basket() };
            match clients[slot.connection].call_ok(&request).await {
                Ok(Reply::BasketOutcome(outcome, _)) => auth_outcome(Ok(outcome)),
                Ok(_) => Outcome::Error("unexpected reply".into()),
                Err(error) => Outcome::Error(client_error(error)),
            }
        }
    }
}

async fn code(w: &Workload, slot: &mut SlotCursor) -> Outcome {
    let (id, inherent_id) = next_payment(w, slot);
    let store = w.dataset.stores[slot.below(w.dataset.stores.len())].clone();
    let issue = IssueCodeRequest {
        client_request_id: id,
        inherent_id,
        validity_ms: 300_000,
        deliver_to: None,
        order_ref: String::new(),
    };
    let redeem = |code: &IssuedCode| RedeemRequest {
        client_request_id: id | (1 << 31),
        code: code.text.clone(),
        issuer: 1,
        number: code.number,
        amount_minor: 900,
        currency: code.currency,
        sale_at_ms: now_ms(),
        terminal_id: store.clone(),
        items: vec![("ITEM".into(), 1, 900)],
        coupon: None,
        order_ref: String::new(),
    };
    match &w.target {
        Target::Embedded(engine) => match engine.issue_code(issue).await {
            Ok(CodeOutcome::Issued(code)) => {
                ok_or_error(engine.redeem_code(redeem(&code)).await, engine_error)
            }
            Ok(CodeOutcome::Declined(reason)) => Outcome::Declined(reason.code()),
            Err(error) => Outcome::Error(engine_error(error)),
        },
        Target::Remote(clients) => {
            let client = &clients[slot.connection];
            match client.call_ok(&Request::IssueCode { request: issue }).await {
                Ok(Reply::Code(CodeOutcome::Issued(code))) => {
                    let request = Request::RedeemCode { request: redeem(&code) };
                    ok_or_error(client.call_ok(&request).await, client_error)
                }
                Ok(Reply::Code(CodeOutcome::Declined(reason))) => Outcome::Declined(reason.code()),
                Ok(_) => Outcome::Error("unexpected reply".into()),
                Err(error) => Outcome::Error(client_error(error)),
            }
        }
    }
}

async fn usable(w: &Workload, slot: &mut SlotCursor) -> Outcome {
    let user = w.dataset.payers[slot.below(w.dataset.payers.len())].user.clone();
    let store_id = w.dataset.stores[slot.below(w.dataset.stores.len())].clone();
    let best_by = if slot.below(2) == 0 { BestBy::MostUsed } else { BestBy::LargestBalance };
    match &w.target {
        Target::Embedded(engine) => {
            ok_or_error(engine.usable_methods(&user, &store_id, best_by).await, engine_error)
        }
        Target::Remote(clients) => {
            let request = Request::UsableMethods { user, store_id, best_by };
            ok_or_error(clients[slot.connection].call_ok(&request).await, client_error)
        }
    }
}

async fn list_means(w: &Workload, slot: &mut SlotCursor) -> Outcome {
    let user = &w.dataset.payers[slot.below(w.dataset.payers.len())].user;
    let order = MeansOrder::Registration;
    match &w.target {
        Target::Embedded(engine) => ok_or_error(engine.list_means(user, order).await, engine_error),
        Target::Remote(clients) => {
            let request = Request::ListMeans { user: user.clone(), order };
            ok_or_error(clients[slot.connection].call_ok(&request).await, client_error)
        }
    }
}

async fn confirm_terminal(w: &Workload, slot: &mut SlotCursor) -> Outcome {
    let provider_code = w.dataset.providers[slot.below(w.dataset.providers.len())];
    let terminal_id = &w.dataset.stores[slot.below(w.dataset.stores.len())];
    match &w.target {
        Target::Embedded(engine) => {
            ok_or_error(engine.confirm_terminal(provider_code, terminal_id), engine_error)
        }
        Target::Remote(clients) => {
            let request =
                Request::ConfirmTerminal { provider_code, terminal_id: terminal_id.clone() };
            ok_or_error(clients[slot.connection].call_ok(&request).await, client_error)
        }
    }
}

async fn ping(w: &Workload, slot: &mut SlotCursor) -> Outcome {
    match &w.target {
        Target::Embedded(_) => Outcome::Ok,
        Target::Remote(clients) => {
            let request = Request::Ping { payload: Vec::new() };
            match clients[slot.connection].call_ok(&request).await {
                Ok(Reply::Pong(_)) => Outcome::Ok,
                Ok(_) => Outcome::Error("unexpected reply".into()),
                Err(error) => Outcome::Error(client_error(error)),
            }
        }
    }
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
    .sign(payer.credential.device_key.expose())
}

fn auth_outcome(result: Result<AuthOutcome, Cow<'static, str>>) -> Outcome {
    match result {
        Ok(AuthOutcome::Approved(_)) => Outcome::Ok,
        Ok(AuthOutcome::Declined(reason)) => Outcome::Declined(reason.code()),
        Err(kind) => Outcome::Error(kind),
    }
}

fn ok_or_error<T, E>(result: Result<T, E>, kind: fn(E) -> Cow<'static, str>) -> Outcome {
    match result {
        Ok(_) => Outcome::Ok,
        Err(error) => Outcome::Error(kind(error)),
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
fn client_error(error: ClientError) -> Cow<'static, str> {
    match error {
        ClientError::Closed(_) => "connection closed".into(),
        ClientError::Protocol(_) => "protocol violation".into(),
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
            Response::FrameError { .. } => "frame error".into(),
            Response::Ok(_) => "unexpected reply".into(),
        },
    }
}
