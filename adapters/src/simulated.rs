//! A seeded simulated provider for the demo, the tests and load generation.
//!
//! Every authorization's outcome is a pure function of the configured seed and the request's
//! `dispatch_id`: the same seed replays the same run whatever the interleaving of concurrent
//! requests.
//!
//! The simulator also keeps a ledger of the authorizations it approved ([`SimulatedHold`], by
//! dispatch ID, at most `ledger_max` of them, an approval forgotten when the one `ledger_max`
//! dispatch IDs later takes its slot: the oldest first) and carries their
//! lifecycle ([`ProviderAdapter::lifecycle`]) by the same rules as a real provider
//! ([`SimulatedHold::apply`]). A lifecycle operation's latency and failure are drawn from the
//! seed and its `operation_id`; its answer otherwise depends only on what the ledger holds.

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::Mutex;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use futures::future::BoxFuture;
use futures::{Future as _, FutureExt, Stream, StreamExt as _};
use rand::{Rng, RngCore, SeedableRng};
use rand_xoshiro::Xoshiro256PlusPlus;
use serde::{Deserialize, Serialize};
use tokio::time::Instant;

use crate::fine_timer::FineSleep;

use crate::{
    AdapterError, Answers, AuthCode, AuthorizationRequest, DeclineReason, LifecycleReply,
    LifecycleRequest, Operation, ProviderAdapter, ProviderReply, RefusalReason,
};

/// Default of [`SimulatedConfig::ledger_max`].
pub const LEDGER_MAX_DEFAULT: usize = 100_000;
/// Largest [`SimulatedConfig::ledger_max`] accepted (a table of about 640 MB).
pub const LEDGER_MAX_LIMIT: usize = 10_000_000;
/// Salt of a lifecycle operation's draw, so that an operation and a dispatch with the same ID
/// draw differently.
const OPERATION_SALT: u64 = 0x9e37_79b9_7f4a_7c15;

/// The simulator's behaviour.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct SimulatedConfig {
    /// Seed of the per-request random stream.
    pub seed: u64,
    /// Shortest simulated latency, in microseconds.
    pub latency_us_min: u64,
    /// Longest simulated latency, in microseconds (uniform between min and max).
    pub latency_us_max: u64,
    /// Fraction of requests declined with `do_not_honor`, in `[0, 1]`.
    pub decline_rate: f64,
    /// Fraction of requests that fail as unavailable, in `[0, 1]`.
    pub failure_rate: f64,
    /// Amounts above this (minor units) are declined with `insufficient_funds`.
    pub approve_limit_minor: u64,
    /// Most authorizations the ledger keeps for their lifecycle (1 to [`LEDGER_MAX_LIMIT`]);
    /// an approval is forgotten when the one `ledger_max` dispatch IDs later takes its slot
    /// (the oldest first), and operations on it are then refused as unknown. The table is
    /// made at start: about 64 bytes a slot.
    pub ledger_max: usize,
    /// Whether it settles sales with their approval for the engine to refund later
    /// ([`ProviderAdapter::refunds_sales`]): the engine then keeps each approved payment for
    /// its refund window, which costs every payment an index entry (`docs/CONFIG.md`,
    /// `settled_max_per_shard`). `true` by default; `false` for a provider whose sales are
    /// never refunded through the engine.
    pub refunds_sales: bool,
}

impl Default for SimulatedConfig {
    fn default() -> Self {
        SimulatedConfig {
            seed: 0,
            latency_us_min: 0,
            latency_us_max: 0,
            decline_rate: 0.0,
            failure_rate: 0.0,
            approve_limit_minor: u64::MAX,
            ledger_max: LEDGER_MAX_DEFAULT,
            refunds_sales: true,
        }
    }
}

/// The simulated provider.
pub struct Simulated {
    config: SimulatedConfig,
    name: String,
    ledger: Ledger,
}

/// Where an authorization the simulator approved stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HoldState {
    /// Approved, neither captured nor voided nor reversed.
    Authorized,
    /// Captured (refunds may follow).
    Captured,
    /// Voided before capture.
    Voided,
    /// Reversed before capture.
    Reversed,
}

/// What the simulated provider holds for one authorization it approved.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct SimulatedHold {
    /// The authorization code it approved with.
    pub auth_code: AuthCode,
    /// The amount authorized.
    pub authorized_minor: u64,
    /// The amount captured (0 until the capture).
    pub captured_minor: u64,
    /// The total refunded so far (at most `captured_minor`).
    pub refunded_minor: u64,
    /// Its state.
    pub state: HoldState,
    /// A sale ([`AuthorizationRequest::sale`]): captured in full with its approval.
    pub sale: bool,
}

impl SimulatedHold {
    /// A fresh approval of `authorized_minor`.
    pub fn new(auth_code: AuthCode, authorized_minor: u64) -> SimulatedHold {
        SimulatedHold {
            auth_code,
            authorized_minor,
            captured_minor: 0,
            refunded_minor: 0,
            state: HoldState::Authorized,
            sale: false,
        }
    }

    /// A fresh approval of a sale of `amount_minor`: captured in full at once.
    pub fn sale(auth_code: AuthCode, amount_minor: u64) -> SimulatedHold {
        SimulatedHold {
            captured_minor: amount_minor,
            state: HoldState::Captured,
            sale: true,
            ..SimulatedHold::new(auth_code, amount_minor)
        }
    }

    /// Applies `operation` by the provider's rules, or says why not (leaving it unchanged):
    ///
    /// | operation | accepted when | refused |
    /// |---|---|---|
    /// | capture of `a` | authorized, `1 <= a <= authorized` | `AmountInvalid` (amount), `InvalidState` (captured, voided, reversed) |
    /// | void | authorized, voided or reversed (nothing changes then) | `InvalidState` (captured) |
    /// | refund of `a` | captured, `1 <= a`, refunds `+ a <= captured` | `AmountInvalid` (amount), `InvalidState` (not captured) |
    /// | reversal | as a void; a sale also while captured and not refunded (the sale undone) | `InvalidState` (captured) |
    pub fn apply(&mut self, operation: Operation) -> Result<(), RefusalReason> {
        use HoldState::*;
        match (operation, self.state) {
            (Operation::Capture { amount_minor }, Authorized) => {
                if amount_minor == 0 || amount_minor > self.authorized_minor {
                    return Err(RefusalReason::AmountInvalid);
                }
                self.captured_minor = amount_minor;
                self.state = Captured;
            }
            (Operation::Capture { .. }, Captured | Voided | Reversed) => {
                return Err(RefusalReason::InvalidState);
            }
            (Operation::Void, Authorized) => self.state = Voided,
            (Operation::Reversal, Authorized) => self.state = Reversed,
            (Operation::Void | Operation::Reversal, Voided | Reversed) => {}
            // A sale whose answer the engine could not record is undone whole, until refunds.
            (Operation::Reversal, Captured) if self.sale && self.refunded_minor == 0 => {
                self.state = Reversed;
            }
            (Operation::Void | Operation::Reversal, Captured) => {
                return Err(RefusalReason::InvalidState);
            }
            (Operation::Refund { amount_minor }, Captured) => {
                let left = self.captured_minor - self.refunded_minor;
                if amount_minor == 0 || amount_minor > left {
                    return Err(RefusalReason::AmountInvalid);
                }
                self.refunded_minor += amount_minor;
            }
            (Operation::Refund { .. }, Authorized | Voided | Reversed) => {
                return Err(RefusalReason::InvalidState);
            }
        }
        Ok(())
    }
}

/// An authorization the simulator approved, and the operations it accepted on it.
struct Entry {
    dispatch_id: u64,
    hold: SimulatedHold,
    done: Vec<(u64, Operation)>,
}

/// The simulator's authorizations, by dispatch ID: a table of `ledger_max` slots, an approval in
/// slot `dispatch_id % ledger_max`, so that a later approval takes the slot of the one
/// `ledger_max` dispatches before it (with the engine's increasing dispatch IDs, the oldest is
/// forgotten first). Each slot has a lock of its own: an approval, on the payment's path, takes
/// one uncontended lock and writes one slot, with no hashing and no eviction to do (a shared
/// map under one lock cost the zero-latency authorize path about a tenth of its time).
struct Ledger {
    slots: Box<[Mutex<Option<Entry>>]>,
}

impl Ledger {
    fn new(max: usize) -> Ledger {
        Ledger { slots: (0..max).map(|_| Mutex::new(None)).collect() }
    }

    /// The slot of `dispatch_id`, locked.
    fn slot(&self, dispatch_id: u64) -> std::sync::MutexGuard<'_, Option<Entry>> {
        let slot = &self.slots[(dispatch_id % self.slots.len() as u64) as usize];
        // A panic while holding the lock leaves the slot consistent (each change is one
        // assignment after its checks): keep serving.
        slot.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn approve(&self, dispatch_id: u64, hold: SimulatedHold) {
        let mut slot = self.slot(dispatch_id);
        // A repeated dispatch draws the same approval: the first one stands.
        if slot.as_ref().is_some_and(|entry| entry.dispatch_id == dispatch_id) {
            return;
        }
        *slot = Some(Entry { dispatch_id, hold, done: Vec::new() });
    }

    /// What the ledger holds for `dispatch_id`.
    fn hold(&self, dispatch_id: u64) -> Option<SimulatedHold> {
        let slot = self.slot(dispatch_id);
        slot.as_ref().filter(|entry| entry.dispatch_id == dispatch_id).map(|entry| entry.hold)
    }

    fn apply(&self, request: &LifecycleRequest) -> LifecycleReply {
        let refused = |reason| LifecycleReply::Refused { reason };
        let accepted = LifecycleReply::Accepted { network: None };
        let authorization = &request.authorization;
        let mut slot = self.slot(authorization.dispatch_id);
        // A reference without a code (an authorization whose answer never came) names the
        // approval by dispatch ID and amount, for a reversal only.
        let entry = slot.as_mut().filter(|entry| {
            let code_ok = match authorization.auth_code {
                Some(code) => code == entry.hold.auth_code,
                None => request.operation == Operation::Reversal,
            };
            entry.dispatch_id == authorization.dispatch_id
                && code_ok
                && authorization.amount_minor == entry.hold.authorized_minor
        });
        let Some(Entry { hold, done, .. }) = entry else {
            // Nothing held: a reversal has nothing to undo.
            return match request.operation {
                Operation::Reversal => accepted,
                _ => refused(RefusalReason::UnknownAuthorization),
            };
        };
        if done.contains(&(request.operation_id, request.operation)) {
            return accepted; // a retry of an operation already applied
        }
        match hold.apply(request.operation) {
            Ok(()) => {
                done.push((request.operation_id, request.operation));
                accepted
            }
            Err(reason) => refused(reason),
        }
    }
}

impl Simulated {
    /// Validates `config` and builds the simulator.
    pub fn new(config: SimulatedConfig) -> Result<Simulated, AdapterError> {
        let rate_ok = |rate: f64| (0.0..=1.0).contains(&rate);
        if !rate_ok(config.decline_rate) || !rate_ok(config.failure_rate) {
            return Err(AdapterError::Config(
                "decline_rate and failure_rate must be within [0, 1]".into(),
            ));
        }
        if config.latency_us_min > config.latency_us_max {
            return Err(AdapterError::Config(
                "latency_us_min must not exceed latency_us_max".into(),
            ));
        }
        if !(1..=LEDGER_MAX_LIMIT).contains(&config.ledger_max) {
            return Err(AdapterError::Config(format!(
                "ledger_max must be from 1 to {LEDGER_MAX_LIMIT}"
            )));
        }
        let name = format!("simulated(seed={})", config.seed);
        let ledger = Ledger::new(config.ledger_max);
        Ok(Simulated { config, name, ledger })
    }

    /// What the simulator holds for the authorization of `dispatch_id`, if it approved it and
    /// still keeps it.
    pub fn hold(&self, dispatch_id: u64) -> Option<SimulatedHold> {
        self.ledger.hold(dispatch_id)
    }

    /// Every authorization the simulator keeps, by dispatch ID, ascending.
    pub fn holds(&self) -> Vec<(u64, SimulatedHold)> {
        let mut holds: Vec<_> = (self.ledger.slots.iter())
            .filter_map(|slot| {
                let slot = slot.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                slot.as_ref().map(|entry| (entry.dispatch_id, entry.hold))
            })
            .collect();
        holds.sort_unstable_by_key(|(id, _)| *id);
        holds
    }

    /// The latency of `request`'s authorization, in microseconds (for the guard's tests).
    #[cfg(test)]
    pub(crate) fn latency_of(&self, request: &AuthorizationRequest) -> u64 {
        self.decide(request).0.as_micros() as u64
    }

    /// One draw's latency and its roll in `[0, 1)` (failure, then decline, by the rates).
    fn draw(&self, rng: &mut Xoshiro256PlusPlus) -> (Duration, f64) {
        let config = &self.config;
        let latency_us = if config.latency_us_max == 0 {
            0
        } else {
            rng.gen_range(config.latency_us_min..=config.latency_us_max)
        };
        (Duration::from_micros(latency_us), rng.gen())
    }

    /// [`Simulated::decide`], and an approval entered in the ledger.
    fn answer(
        &self,
        request: &AuthorizationRequest,
    ) -> (Duration, Result<ProviderReply, AdapterError>) {
        let (latency, result) = self.decide(request);
        if let Ok(ProviderReply::Approved { auth_code, .. }) = &result {
            let hold = match request.sale {
                true => SimulatedHold::sale(*auth_code, request.amount_minor),
                false => SimulatedHold::new(*auth_code, request.amount_minor),
            };
            self.ledger.approve(request.dispatch_id, hold);
        }
        (latency, result)
    }

    /// A lifecycle operation's latency and answer: the failure drawn from the seed and the
    /// operation ID; otherwise the ledger's rules, applied now.
    fn operate(
        &self,
        request: &LifecycleRequest,
    ) -> (Duration, Result<LifecycleReply, AdapterError>) {
        let seed = self.config.seed ^ OPERATION_SALT ^ request.operation_id.rotate_left(17);
        let mut rng = Xoshiro256PlusPlus::seed_from_u64(seed);
        let (latency, roll) = self.draw(&mut rng);
        if roll < self.config.failure_rate {
            let error = AdapterError::Unavailable("simulated provider failure".into());
            return (latency, Err(error));
        }
        (latency, Ok(self.ledger.apply(request)))
    }

    /// The outcome and latency of one request: a pure function of seed and dispatch ID.
    fn decide(
        &self,
        request: &AuthorizationRequest,
    ) -> (Duration, Result<ProviderReply, AdapterError>) {
        let config = &self.config;
        // A small generator seeded per request (SplitMix64): a simulation's draw, not a secret, and
        // cheap enough to run in the shard's step for every payment.
        let mut rng =
            Xoshiro256PlusPlus::seed_from_u64(config.seed ^ request.dispatch_id.rotate_left(17));
        let (latency, roll) = self.draw(&mut rng);
        let result = if roll < config.failure_rate {
            Err(AdapterError::Unavailable("simulated provider failure".into()))
        } else if request.amount_minor > config.approve_limit_minor {
            Ok(ProviderReply::Declined { reason: DeclineReason::InsufficientFunds })
        } else if roll < config.failure_rate + config.decline_rate {
            Ok(ProviderReply::Declined { reason: DeclineReason::DoNotHonor })
        } else {
            Ok(ProviderReply::approved(auth_code_random(&mut rng)))
        };
        (latency, result)
    }
}

fn auth_code_random(rng: &mut Xoshiro256PlusPlus) -> AuthCode {
    const ALPHABET: &[u8; 36] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ";
    // Six base-36 digits of one draw (36^6 is about 2^31, so the bias is about 2^-33).
    let mut draw = rng.next_u64();
    let mut code = [0u8; 6];
    for byte in &mut code {
        *byte = ALPHABET[(draw % 36) as usize];
        draw /= 36;
    }
    AuthCode(code)
}

impl ProviderAdapter for Simulated {
    fn name(&self) -> &str {
        &self.name
    }

    /// A sale is captured with its approval ([`SimulatedHold::sale`]): refunds may follow.
    fn refunds_sales(&self) -> bool {
        self.config.refunds_sales
    }

    fn decide_now(
        &self,
        request: &AuthorizationRequest,
    ) -> Option<Result<ProviderReply, AdapterError>> {
        // Only with no latency configured: a latency is what a test or bench wants to see.
        (self.config.latency_us_max == 0).then(|| self.answer(request).1)
    }

    fn authorize(
        &self,
        request: AuthorizationRequest,
    ) -> BoxFuture<'static, Result<ProviderReply, AdapterError>> {
        let (latency, result) = self.answer(&request);
        after(latency, result)
    }

    /// The same answers as [`authorize`](ProviderAdapter::authorize) each, after the same
    /// latencies, from one timer for the whole batch, set to the next answer due.
    fn authorize_batch(&self, requests: Vec<AuthorizationRequest>) -> Answers {
        let mut answers: Vec<_> = (requests.iter().enumerate())
            .map(|(at, request)| {
                let (latency, answer) = self.answer(request);
                (latency, at, answer)
            })
            .collect();
        answers.sort_by_key(|(latency, at, _)| (*latency, *at));
        InTurn { start: Instant::now(), answers: answers.into(), past: Duration::ZERO, timer: None }
            .boxed()
    }

    fn lifecycle(
        &self,
        request: LifecycleRequest,
    ) -> BoxFuture<'static, Result<LifecycleReply, AdapterError>> {
        let (latency, result) = self.operate(&request);
        after(latency, result)
    }
}

/// A batch's answers, each yielded once its latency from `start` has passed, from one timer
/// set to the next one due.
struct InTurn<T> {
    start: Instant,
    /// The answers not yielded yet, by latency: (latency, position, answer).
    answers: VecDeque<(Duration, usize, T)>,
    /// How long after `start` the timer last found it: every answer with a latency up to
    /// this is due.
    past: Duration,
    timer: Option<FineSleep>,
}

impl<T: Unpin> Stream for InTurn<T> {
    type Item = (usize, T);

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        loop {
            let Some(&(latency, ..)) = this.answers.front() else { return Poll::Ready(None) };
            if latency <= this.past {
                let (_, at, answer) = this.answers.pop_front().expect("a front");
                return Poll::Ready(Some((at, answer)));
            }
            let due = this.start + latency;
            let timer = match &mut this.timer {
                Some(timer) => {
                    timer.reset(due);
                    timer
                }
                None => this.timer.insert(FineSleep::until(due)),
            };
            ready!(Pin::new(timer).poll(cx));
            // Whatever else fell due by now goes too.
            this.past = this.start.elapsed().max(latency);
        }
    }
}

/// `result`, after `latency` (at once when zero: no timer).
fn after<T: Send + 'static>(latency: Duration, result: T) -> BoxFuture<'static, T> {
    if latency.is_zero() {
        futures::future::ready(result).boxed()
    } else {
        let deadline = Instant::now() + latency;
        async move {
            FineSleep::until(deadline).await;
            result
        }
        .boxed()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{AuthReference, Currency, MeansKind};

    fn request(dispatch_id: u64, amount_minor: u64) -> AuthorizationRequest {
        AuthorizationRequest {
            dispatch_id,
            provider_code: 1,
            means: MeansKind::CreditCard,
            card_token: None,
            terminal_id: "T1".into(),
            amount_minor,
            currency: Currency::try_from("JPY").unwrap(),
            at_ms: 1_700_000_000_000,
            sale: false,
        }
    }

    #[test]
    fn same_seed_same_outcomes() {
        let config = SimulatedConfig {
            seed: 7,
            decline_rate: 0.3,
            failure_rate: 0.1,
            latency_us_max: 500,
            ..SimulatedConfig::default()
        };
        let a = Simulated::new(config.clone()).unwrap();
        let b = Simulated::new(config).unwrap();
        let outcomes_a: Vec<_> = (0..200).map(|i| a.decide(&request(i, 100))).collect();
        let outcomes_b: Vec<_> = (0..200).map(|i| b.decide(&request(i, 100))).collect();
        assert_eq!(outcomes_a, outcomes_b);
        let declines = outcomes_a
            .iter()
            .filter(|(_, r)| matches!(r, Ok(ProviderReply::Declined { .. })))
            .count();
        let failures = outcomes_a.iter().filter(|(_, r)| r.is_err()).count();
        // 200 draws at 30% and 10%: far outside these bounds would mean the rates are ignored.
        assert!((30..=90).contains(&declines), "declines {declines}");
        assert!((5..=40).contains(&failures), "failures {failures}");
    }

    #[test]
    fn amount_over_limit_is_declined() {
        let sim = Simulated::new(SimulatedConfig {
            approve_limit_minor: 1_000,
            ..SimulatedConfig::default()
        })
        .unwrap();
        assert!(matches!(sim.decide(&request(1, 1_000)).1, Ok(ProviderReply::Approved { .. })));
        assert_eq!(
            sim.decide(&request(1, 1_001)).1,
            Ok(ProviderReply::Declined { reason: DeclineReason::InsufficientFunds })
        );
    }

    #[test]
    fn answers_at_once_exactly_as_authorize_would_and_only_without_latency() {
        let config =
            SimulatedConfig { seed: 3, decline_rate: 0.3, failure_rate: 0.1, ..Default::default() };
        let sim = Simulated::new(config.clone()).unwrap();
        for i in 0..100 {
            let now = sim.decide_now(&request(i, 100)).expect("zero latency answers at once");
            let later = futures::executor::block_on(sim.authorize(request(i, 100)));
            assert_eq!(now, later, "dispatch {i}");
        }
        let slow = Simulated::new(SimulatedConfig { latency_us_max: 10, ..config }).unwrap();
        assert_eq!(slow.decide_now(&request(1, 100)), None);
    }

    /// A batch is answered exactly as its requests one by one (same seed, same answers), each
    /// after its own latency, in the order of the latencies (time paused: the test's clock).
    #[tokio::test(start_paused = true)]
    async fn a_batch_answers_as_its_requests_alone_each_after_its_own_latency() {
        let config = SimulatedConfig {
            latency_us_min: 500,
            latency_us_max: 30_000,
            decline_rate: 0.2,
            failure_rate: 0.1,
            ..SimulatedConfig::default()
        };
        let requests: Vec<_> = (1..=64).map(|id| request(id, 100 * id)).collect();
        let alone = sim(config.clone());
        let mut expected = Vec::new();
        for request in &requests {
            let (latency, _) = alone.decide(request);
            expected.push((latency, alone.authorize(request.clone()).await));
        }
        let batched = sim(config);
        let start = tokio::time::Instant::now();
        let mut answers = batched.authorize_batch(requests.clone());
        let mut seen = vec![false; requests.len()];
        let mut last = Duration::ZERO;
        while let Some((at, answer)) = answers.next().await {
            let (latency, want) = &expected[at];
            assert_eq!(&answer, want, "request {at}");
            let waited = start.elapsed();
            assert!(
                waited >= *latency,
                "request {at} answered after {waited:?}, before {latency:?}"
            );
            assert!(*latency >= last, "out of the latencies' order");
            last = *latency;
            assert!(!std::mem::replace(&mut seen[at], true), "request {at} answered twice");
        }
        assert!(seen.iter().all(|&s| s), "every request answered");
        // The batch's approvals entered the ledger as each one's would.
        for (id, request) in (1..).zip(&requests) {
            assert_eq!(batched.hold(id), alone.hold(id), "{request:?}");
        }
    }

    fn sim(config: SimulatedConfig) -> Simulated {
        Simulated::new(config).unwrap()
    }

    /// Authorizes `amount_minor` as dispatch `dispatch_id` and hands back the reference.
    fn approve(sim: &Simulated, dispatch_id: u64, amount_minor: u64) -> AuthReference {
        let reply = futures::executor::block_on(sim.authorize(request(dispatch_id, amount_minor)));
        let reply = reply.expect("answered");
        reply.reference(&request(dispatch_id, amount_minor)).expect("approved")
    }

    fn run(sim: &Simulated, id: u64, auth: &AuthReference, operation: Operation) -> LifecycleReply {
        let request = LifecycleRequest { operation_id: id, authorization: auth.clone(), operation };
        futures::executor::block_on(sim.lifecycle(request)).expect("no failure configured")
    }

    const ACCEPTED: LifecycleReply = LifecycleReply::Accepted { network: None };

    fn refused(reason: RefusalReason) -> LifecycleReply {
        LifecycleReply::Refused { reason }
    }

    #[test]
    fn capture_below_the_hold_then_refunds_up_to_the_captured_total() {
        let sim = sim(SimulatedConfig::default());
        let auth = approve(&sim, 1, 1_000);
        assert_eq!(auth.auth_code, sim.hold(1).map(|h| h.auth_code));
        assert_eq!((auth.dispatch_id, auth.amount_minor, auth.network), (1, 1_000, None));
        let capture = |amount_minor| Operation::Capture { amount_minor };
        let refund = |amount_minor| Operation::Refund { amount_minor };
        assert_eq!(run(&sim, 10, &auth, refund(1)), refused(RefusalReason::InvalidState));
        assert_eq!(run(&sim, 11, &auth, capture(0)), refused(RefusalReason::AmountInvalid));
        assert_eq!(run(&sim, 12, &auth, capture(1_001)), refused(RefusalReason::AmountInvalid));
        assert_eq!(run(&sim, 13, &auth, capture(700)), ACCEPTED);
        assert_eq!(run(&sim, 14, &auth, capture(100)), refused(RefusalReason::InvalidState));
        assert_eq!(run(&sim, 15, &auth, Operation::Void), refused(RefusalReason::InvalidState));
        assert_eq!(run(&sim, 16, &auth, Operation::Reversal), refused(RefusalReason::InvalidState));
        assert_eq!(run(&sim, 17, &auth, refund(400)), ACCEPTED);
        assert_eq!(run(&sim, 18, &auth, refund(301)), refused(RefusalReason::AmountInvalid));
        assert_eq!(run(&sim, 19, &auth, refund(300)), ACCEPTED);
        assert_eq!(run(&sim, 20, &auth, refund(1)), refused(RefusalReason::AmountInvalid));
        let hold = sim.hold(1).unwrap();
        assert_eq!(
            (hold.state, hold.authorized_minor, hold.captured_minor, hold.refunded_minor),
            (HoldState::Captured, 1_000, 700, 700)
        );
    }

    /// A sale is captured with its approval: refunds up to it follow, and nothing else but a
    /// reversal before any refund (the sale undone whole).
    #[test]
    fn a_sale_is_captured_at_once_and_refunded_up_to_its_amount() {
        let sim = sim(SimulatedConfig::default());
        let sale = |id| AuthorizationRequest { sale: true, ..request(id, 1_000) };
        let reply = futures::executor::block_on(sim.authorize(sale(3))).expect("answered");
        let auth = reply.reference(&sale(3)).expect("approved");
        let hold = sim.hold(3).unwrap();
        assert_eq!(
            (hold.state, hold.captured_minor, hold.sale),
            (HoldState::Captured, 1_000, true)
        );
        let refund = |amount_minor| Operation::Refund { amount_minor };
        let capture = Operation::Capture { amount_minor: 1 };
        assert_eq!(run(&sim, 1, &auth, capture), refused(RefusalReason::InvalidState));
        assert_eq!(run(&sim, 2, &auth, Operation::Void), refused(RefusalReason::InvalidState));
        assert_eq!(run(&sim, 3, &auth, refund(600)), ACCEPTED);
        assert_eq!(run(&sim, 4, &auth, refund(401)), refused(RefusalReason::AmountInvalid));
        assert_eq!(run(&sim, 5, &auth, Operation::Reversal), refused(RefusalReason::InvalidState));
        assert_eq!(run(&sim, 6, &auth, refund(400)), ACCEPTED);
        assert_eq!(sim.hold(3).unwrap().refunded_minor, 1_000);
        // Another sale, never refunded: its reversal undoes it.
        let reply = futures::executor::block_on(sim.authorize(sale(4))).expect("answered");
        let auth = reply.reference(&sale(4)).expect("approved");
        assert_eq!(run(&sim, 7, &auth, Operation::Reversal), ACCEPTED);
        assert_eq!(sim.hold(4).unwrap().state, HoldState::Reversed);
    }

    #[test]
    fn void_before_capture_then_nothing_but_voids_and_reversals() {
        let sim = sim(SimulatedConfig::default());
        let auth = approve(&sim, 2, 500);
        assert_eq!(run(&sim, 1, &auth, Operation::Void), ACCEPTED);
        assert_eq!(sim.hold(2).unwrap().state, HoldState::Voided);
        let capture = Operation::Capture { amount_minor: 500 };
        assert_eq!(run(&sim, 2, &auth, capture), refused(RefusalReason::InvalidState));
        let refund = Operation::Refund { amount_minor: 1 };
        assert_eq!(run(&sim, 3, &auth, refund), refused(RefusalReason::InvalidState));
        // Nothing left to release: accepted, and the state stays.
        assert_eq!(run(&sim, 4, &auth, Operation::Void), ACCEPTED);
        assert_eq!(run(&sim, 5, &auth, Operation::Reversal), ACCEPTED);
        assert_eq!(sim.hold(2).unwrap().state, HoldState::Voided);
        // A full capture of another authorization.
        let other = approve(&sim, 3, 500);
        assert_eq!(run(&sim, 6, &other, capture), ACCEPTED);
        assert_eq!(sim.hold(3).unwrap().captured_minor, 500);
    }

    #[test]
    fn unknown_authorizations_are_refused_but_a_reversal_is_accepted() {
        let sim = sim(SimulatedConfig { approve_limit_minor: 1_000, ..Default::default() });
        // Declined: never held.
        let declined = futures::executor::block_on(sim.authorize(request(4, 5_000)));
        assert!(matches!(declined, Ok(ProviderReply::Declined { .. })));
        assert_eq!(sim.hold(4), None);
        let never = AuthReference::of(&request(4, 5_000), Some(AuthCode(*b"ABC123")), None);
        let capture = Operation::Capture { amount_minor: 1 };
        assert_eq!(run(&sim, 1, &never, capture), refused(RefusalReason::UnknownAuthorization));
        assert_eq!(
            run(&sim, 2, &never, Operation::Void),
            refused(RefusalReason::UnknownAuthorization)
        );
        assert_eq!(run(&sim, 3, &never, Operation::Reversal), ACCEPTED);
        // A reference that does not match what the simulator holds (another code, amount).
        let auth = approve(&sim, 5, 100);
        let forged = AuthReference { auth_code: Some(AuthCode(*b"XXXXXX")), ..auth.clone() };
        assert_eq!(run(&sim, 4, &forged, capture), refused(RefusalReason::UnknownAuthorization));
        let bigger = AuthReference { amount_minor: 101, ..auth.clone() };
        assert_eq!(run(&sim, 5, &bigger, capture), refused(RefusalReason::UnknownAuthorization));
        // An unanswered authorization's reference (no code) names it for a reversal only.
        let unanswered = AuthReference::of(&request(5, 100), None, None);
        let void = run(&sim, 6, &unanswered, Operation::Void);
        assert_eq!(void, refused(RefusalReason::UnknownAuthorization));
        assert_eq!(run(&sim, 7, &unanswered, Operation::Reversal), ACCEPTED);
        assert_eq!(sim.hold(5).unwrap().state, HoldState::Reversed);
        assert_eq!(run(&sim, 8, &auth, Operation::Reversal), ACCEPTED, "again: nothing to undo");
    }

    #[test]
    fn a_retried_operation_is_applied_once() {
        let sim = sim(SimulatedConfig::default());
        let auth = approve(&sim, 1, 1_000);
        assert_eq!(run(&sim, 7, &auth, Operation::Capture { amount_minor: 1_000 }), ACCEPTED);
        let refund = Operation::Refund { amount_minor: 600 };
        assert_eq!(run(&sim, 8, &auth, refund), ACCEPTED);
        assert_eq!(run(&sim, 8, &auth, refund), ACCEPTED, "the same operation again");
        assert_eq!(sim.hold(1).unwrap().refunded_minor, 600);
        assert_eq!(run(&sim, 9, &auth, refund), refused(RefusalReason::AmountInvalid));
        assert_eq!(run(&sim, 7, &auth, Operation::Capture { amount_minor: 1_000 }), ACCEPTED);
    }

    #[test]
    fn the_ledger_forgets_the_oldest_past_ledger_max_and_decide_now_enters_approvals() {
        let sim = sim(SimulatedConfig { ledger_max: 2, ..Default::default() });
        for id in 1..=3 {
            assert!(matches!(sim.decide_now(&request(id, 10)), Some(Ok(_))));
        }
        let kept: Vec<u64> = sim.holds().iter().map(|(id, _)| *id).collect();
        assert_eq!(kept, [2, 3]);
        let first = AuthReference::of(
            &request(1, 10),
            sim.decide(&request(1, 10)).1.unwrap().auth_code(),
            None,
        );
        let void = run(&sim, 1, &first, Operation::Void);
        assert_eq!(void, refused(RefusalReason::UnknownAuthorization));
        assert!(Simulated::new(SimulatedConfig { ledger_max: 0, ..Default::default() }).is_err());
    }

    #[test]
    fn operations_fail_and_wait_as_seeded_and_a_failure_changes_nothing() {
        let config = SimulatedConfig {
            seed: 11,
            failure_rate: 0.5,
            latency_us_max: 300,
            ..SimulatedConfig::default()
        };
        let (a, b) = (sim(config.clone()), sim(config));
        let mut failures = 0;
        for id in 0..200u64 {
            let request = request(id, 100);
            let (Ok(approved), _) = (a.answer(&request).1, b.answer(&request).1) else {
                continue;
            };
            let Some(reference) = approved.reference(&request) else { continue };
            let capture = LifecycleRequest::capture(1_000 + id, reference, 100);
            let (first, second) = (a.operate(&capture), b.operate(&capture));
            assert_eq!(first, second, "same seed, same operation: same draw");
            if first.1.is_err() {
                failures += 1;
                assert_eq!(a.hold(id).unwrap().state, HoldState::Authorized);
            } else {
                assert_eq!(a.hold(id).unwrap().state, HoldState::Captured);
            }
        }
        assert!((10..=80).contains(&failures), "failures {failures}");
    }

    mod lifecycles {
        use proptest::prelude::*;

        use super::*;

        fn operation() -> impl Strategy<Value = Operation> {
            prop_oneof![
                (0..1_500u64).prop_map(|amount_minor| Operation::Capture { amount_minor }),
                Just(Operation::Void),
                (0..800u64).prop_map(|amount_minor| Operation::Refund { amount_minor }),
                Just(Operation::Reversal),
            ]
        }

        proptest! {
            /// Random operations on a few authorizations, some retried, some failing: never
            /// captured more than authorized, never refunded more than captured, one capture
            /// at most, and each authorization's state is the one its accepted operations
            /// imply.
            #[test]
            fn random_lifecycles_keep_the_rules(
                seed in any::<u64>(),
                failing in any::<bool>(),
                amounts in proptest::collection::vec(1..1_200u64, 1..4),
                steps in proptest::collection::vec((0..4usize, operation(), any::<bool>()), 0..40),
            ) {
                let failure_rate = if failing { 0.3 } else { 0.0 };
                let sim = sim(SimulatedConfig { seed, failure_rate, ..Default::default() });
                let mut refs = Vec::new();
                for (i, amount) in amounts.iter().enumerate() {
                    let id = i as u64 + 1;
                    if let (_, Ok(reply)) = sim.answer(&request(id, *amount)) {
                        refs.extend(reply.reference(&request(id, *amount)));
                    }
                }
                prop_assume!(!refs.is_empty());
                // The model: per authorization, accepted captures, refunds, and the first
                // void or reversal before any capture.
                let mut captured = vec![0u64; refs.len()];
                let mut captures = vec![0u32; refs.len()];
                let mut refunded = vec![0u64; refs.len()];
                let mut cancelled: Vec<Option<HoldState>> = vec![None; refs.len()];
                let mut last: Option<LifecycleRequest> = None;
                for (n, (which, operation, retry)) in steps.into_iter().enumerate() {
                    let request = match (&last, retry) {
                        (Some(previous), true) => previous.clone(),
                        _ => {
                            let which = which % refs.len();
                            let authorization = refs[which].clone();
                            LifecycleRequest { operation_id: n as u64, authorization, operation }
                        }
                    };
                    let which = refs.iter().position(|r| *r == request.authorization).unwrap();
                    let before = sim.hold(request.authorization.dispatch_id).unwrap();
                    let (_, answer) = sim.operate(&request);
                    let after = sim.hold(request.authorization.dispatch_id).unwrap();
                    match answer {
                        Err(_) => prop_assert_eq!(before, after, "a failure changes nothing"),
                        Ok(LifecycleReply::Refused { .. }) => prop_assert_eq!(before, after),
                        Ok(LifecycleReply::Accepted { .. }) if before == after => {}
                        Ok(LifecycleReply::Accepted { .. }) => match request.operation {
                            Operation::Capture { amount_minor } => {
                                captured[which] += amount_minor;
                                captures[which] += 1;
                            }
                            Operation::Refund { amount_minor } => refunded[which] += amount_minor,
                            Operation::Void => {
                                cancelled[which].get_or_insert(HoldState::Voided);
                            }
                            Operation::Reversal => {
                                cancelled[which].get_or_insert(HoldState::Reversed);
                            }
                        },
                    }
                    last = Some(request);
                }
                for (i, reference) in refs.iter().enumerate() {
                    let hold = sim.hold(reference.dispatch_id).unwrap();
                    prop_assert!(captures[i] <= 1, "captured once at most");
                    prop_assert!(captured[i] <= reference.amount_minor, "captured above the hold");
                    prop_assert!(refunded[i] <= captured[i], "refunded above the capture");
                    prop_assert!(captures[i] == 0 || cancelled[i].is_none(), "captured and voided");
                    prop_assert_eq!(hold.captured_minor, captured[i]);
                    prop_assert_eq!(hold.refunded_minor, refunded[i]);
                    let state = match (captures[i], cancelled[i]) {
                        (1, _) => HoldState::Captured,
                        (_, Some(state)) => state,
                        _ => HoldState::Authorized,
                    };
                    prop_assert_eq!(hold.state, state);
                }
            }
        }
    }

    #[test]
    fn invalid_rates_rejected() {
        let bad = SimulatedConfig { decline_rate: 1.5, ..SimulatedConfig::default() };
        assert!(Simulated::new(bad).is_err());
    }
}
