//! Issue #26: a provider's completion lands on the idempotency record it belongs to.
//!
//! A payment's record is pending while its provider is asked. If the record leaves the table
//! meanwhile (the count limit drops it) and a new request takes the same client request ID,
//! the first payment's late completion must not complete the new record: it is dropped,
//! counted, and the payment stands declined as a provider timeout, its own purse hold released.
//! The provider here answers when the test says, so every interleaving is exact.

use settlegate_engine::{AddMeansOptions, RequestId};
use settlegate_engine::{
    AuthOutcome, AuthorizeRequest, EngineConfig, EngineError, InherentId, MeansInput, MeansKind,
    MeansOrder, MeansView, ReasonCode,
};

use crate::support::gate::{Asked, Gate};
use crate::support::*;

/// Records a shard keeps: small, so that four payments push a pending one out.
const RECORDS_MAX: usize = 4;
const EMONEY: u32 = 2;
const TOP_UP: u64 = 10_000;
const AMOUNT_A: u64 = 1_000;
const AMOUNT_B: u64 = 2_500;

fn small_config() -> EngineConfig {
    let mut config = config();
    config.idempotency_records_max = RECORDS_MAX;
    config
}

/// An e-money payment of `amount` through `provider`, under client request ID `id`.
fn pay(user: &TestUser, id: u128, amount: u64, provider: u32) -> AuthorizeRequest {
    let record = InherentId {
        means: MeansKind::EMoney,
        means_id: EMONEY,
        ..user.record(T0_MS, amount, provider, "I-T1")
    };
    AuthorizeRequest {
        client_request_id: RequestId(id),
        inherent_id: record.sign(user.credential.device_key.expose()),
    }
}

/// Alice, with an e-money purse topped up with [`TOP_UP`].
async fn funded(h: &Harness) -> TestUser {
    let alice = h.user("alice").await;
    let suica = MeansInput::EMoney { emoney_type: "suica".into() };
    h.engine
        .add_means(request_id(), &alice.user, &suica, AddMeansOptions::default())
        .await
        .unwrap();
    h.engine.top_up(request_id(), &alice.user, EMONEY, TOP_UP, jpy()).await.unwrap();
    alice
}

async fn purse(h: &Harness, user: &TestUser) -> MeansView {
    let means = h.engine.list_means(&user.user, MeansOrder::Registration).await.unwrap();
    means.into_iter().find(|m| m.means_id == EMONEY).unwrap()
}

fn balance(view: &MeansView) -> (u64, u64) {
    let balance = view.balance.unwrap();
    (balance.balance_minor, balance.available_minor)
}

/// Where the interleaving leaves things: payment B (the ID's second use) still with its
/// provider, payment A's late approval already answered.
struct Interleaved {
    alice: TestUser,
    b: AuthorizeRequest,
    b_call: tokio::task::JoinHandle<Result<AuthOutcome, EngineError>>,
    b_asked: Asked,
}

/// Payment A is reserved (its hold taken) and waits for its provider; four payments push its
/// record out of the table; payment B reuses A's client request ID and waits for its provider
/// too; then A's provider approves. A's caller is told it stands declined, B's record is still
/// pending, and A's hold alone is released.
async fn interleave(h: &Harness, gate: &Gate) -> Interleaved {
    let alice = funded(h).await;

    let id = request_id();
    let a = pay(&alice, id.get(), AMOUNT_A, PROVIDER_GATED);
    let a_call = tokio::spawn({
        let engine = h.engine.clone();
        let a = a.clone();
        async move { engine.authorize(a).await }
    });
    let a_asked = gate.next().await;
    assert_eq!(a_asked.request.amount_minor, AMOUNT_A);
    assert!(matches!(h.engine.authorize(a.clone()).await, Err(EngineError::InFlight)));
    assert_eq!(balance(&purse(h, &alice).await), (TOP_UP, TOP_UP - AMOUNT_A));

    // The count limit drops A's record: as many newer records as the table keeps.
    for _ in 0..RECORDS_MAX {
        approved(h.authorize(alice.signed(T0_MS, 10, PROVIDER_OK, "I-T1")).await);
    }
    // The ID is free again: B takes it, a new request (another inherent ID and amount).
    let b = pay(&alice, id.get(), AMOUNT_B, PROVIDER_GATED);
    let b_call = tokio::spawn({
        let engine = h.engine.clone();
        let b = b.clone();
        async move { engine.authorize(b).await }
    });
    let b_asked = gate.next().await;
    assert_eq!(b_asked.request.amount_minor, AMOUNT_B);
    assert!(matches!(h.engine.authorize(b.clone()).await, Err(EngineError::InFlight)));
    assert_eq!(balance(&purse(h, &alice).await), (TOP_UP, TOP_UP - AMOUNT_A - AMOUNT_B));

    // A's provider approves, late: its record is gone, and B's is not A's.
    a_asked.approve(*b"AAAAAA");
    let a_outcome = a_call.await.unwrap().unwrap();
    assert_eq!(a_outcome, AuthOutcome::Declined(ReasonCode::ProviderTimeout));
    assert_eq!(h.engine.completions_dropped(), 1);
    // B's record is untouched: a retry of B is still in flight, not answered with A's outcome.
    let b_retry = h.engine.authorize(b.clone()).await;
    assert!(matches!(b_retry, Err(EngineError::InFlight)), "B's record got {b_retry:?}");
    // A's hold is released, nothing debited for it; B's hold stays.
    let view = purse(h, &alice).await;
    assert_eq!(balance(&view), (TOP_UP, TOP_UP - AMOUNT_B));
    assert_eq!(view.uses, 0);
    Interleaved { alice, b, b_call, b_asked }
}

/// B's provider approves: B's record gets B's outcome, and only B's amount is debited.
async fn complete_b(h: &Harness, run: Interleaved) -> (TestUser, AuthorizeRequest, AuthOutcome) {
    let Interleaved { alice, b, b_call, b_asked } = run;
    b_asked.approve(*b"BBBBBB");
    let b_outcome = b_call.await.unwrap().unwrap();
    let approval = approved(b_outcome);
    assert_eq!((approval.auth_code.0, approval.amount_final_minor), (*b"BBBBBB", AMOUNT_B));
    assert_eq!(h.engine.authorize(b.clone()).await.unwrap(), b_outcome);
    let view = purse(h, &alice).await;
    assert_eq!(balance(&view), (TOP_UP - AMOUNT_B, TOP_UP - AMOUNT_B));
    assert_eq!(view.uses, 1);
    (alice, b, b_outcome)
}

#[tokio::test]
async fn a_late_completion_does_not_land_on_a_newer_record_of_its_id() {
    let (h, gate) = Harness::gated(small_config());
    let run = interleave(&h, &gate).await;
    complete_b(&h, run).await;
    assert_eq!(h.engine.completions_dropped(), 1);
    assert_eq!(gate.calls(), 2);
    h.engine.shutdown().await;
}

/// The same interleaving, then a restart: the log (and, every few records, a snapshot)
/// replayed gives the states the engine had: B's record holds B's approval, the purse what
/// B alone debited, and A's dropped completion is not applied to B's record on replay either.
#[tokio::test]
async fn a_late_completion_replays_as_it_was_applied() {
    for snapshot_every in [0, 5] {
        let dir = tempfile::tempdir().unwrap();
        let durable = || {
            let mut config = durable_config(dir.path(), snapshot_every);
            config.idempotency_records_max = RECORDS_MAX;
            Harness::gated(config)
        };
        let (h, gate) = durable();
        let run = interleave(&h, &gate).await;
        let (alice, b, b_outcome) = complete_b(&h, run).await;
        let means_before = h.engine.list_means(&alice.user, MeansOrder::Registration).await;
        h.engine.shutdown().await;
        drop(h);

        let (h, gate) = durable();
        assert_eq!(h.engine.authorize(b).await.unwrap(), b_outcome, "snapshots {snapshot_every}");
        assert_eq!(
            h.engine.list_means(&alice.user, MeansOrder::Registration).await.unwrap(),
            means_before.unwrap()
        );
        assert_eq!(gate.calls(), 0, "nothing was asked of the provider again");
        h.engine.shutdown().await;
    }
}

/// The interleaving, then the engine stops with B still at its provider: on replay A's late
/// completion leaves B's record pending, so recovery resolves B (declined as a provider
/// timeout, its hold released) instead of finding it completed with A's approval.
#[tokio::test]
async fn a_record_pending_at_a_restart_is_resolved_not_given_a_late_completion() {
    let dir = tempfile::tempdir().unwrap();
    let durable = || {
        let mut config = durable_config(dir.path(), 0);
        config.idempotency_records_max = RECORDS_MAX;
        Harness::gated(config)
    };
    let (h, gate) = durable();
    let Interleaved { alice, b, b_call, b_asked } = interleave(&h, &gate).await;
    h.engine.shutdown().await;
    b_asked.approve(*b"BBBBBB");
    // Its completion is refused: the engine stopped, nothing acknowledged.
    assert!(matches!(b_call.await.unwrap(), Err(EngineError::Stopped)));
    drop(h);

    let (h, gate) = durable();
    let resolved = h.engine.authorize(b).await.unwrap();
    assert_eq!(resolved, AuthOutcome::Declined(ReasonCode::ProviderTimeout));
    let view = purse(&h, &alice).await;
    assert_eq!(balance(&view), (TOP_UP, TOP_UP), "every hold released, nothing debited");
    assert_eq!(view.uses, 0);
    assert_eq!(gate.calls(), 0);
    h.engine.shutdown().await;
}

/// A completion that finds its own record pending is not counted as dropped.
#[tokio::test]
async fn no_completion_is_dropped_in_the_ordinary_course() {
    let (h, gate) = Harness::gated(small_config());
    let alice = h.user("alice").await;
    let paid = tokio::spawn({
        let engine = h.engine.clone();
        let request = AuthorizeRequest {
            client_request_id: request_id(),
            inherent_id: alice.signed(T0_MS, 10, PROVIDER_GATED, "I-T1"),
        };
        async move { engine.authorize(request).await }
    });
    gate.next().await.approve(*b"CCCCCC");
    approved(paid.await.unwrap().unwrap());
    assert_eq!(h.engine.completions_dropped(), 0);
    h.engine.shutdown().await;
}

/// A completion that finds its shard busy is kept back for one more look at the shard before
/// it goes to the shard's mailbox. Its caller gone before that look (the connection closed),
/// it is recorded all the same: the payment completes with its provider's outcome and the purse
/// is debited, as when a busy shard's batch went to the mailbox at once. Dropped, it would leave
/// the payment in flight and its hold taken.
#[tokio::test]
async fn a_completion_kept_back_from_a_busy_shard_is_recorded_though_its_caller_went_away() {
    let (h, gate) = Harness::gated(config());
    let alice = funded(&h).await;

    let a = pay(&alice, request_id().get(), AMOUNT_A, PROVIDER_GATED);
    // Polled by hand, so that the test says when the caller takes each step.
    let mut call = Box::pin(h.engine.authorize(a.clone()));
    assert!(futures::poll!(&mut call).is_pending(), "reserved, with its provider");
    let asked = gate.next().await;
    let release = h.engine.stall_shard_of(&alice.user);
    asked.approve(*b"AAAAAA");
    // The caller takes the answer and finds the shard busy: its completion is kept back.
    assert!(futures::poll!(&mut call).is_pending(), "the shard is held");
    drop(call);
    drop(release);

    let mut retried = h.engine.authorize(a.clone()).await;
    for _ in 0..500 {
        if !matches!(retried, Err(EngineError::InFlight)) {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        retried = h.engine.authorize(a.clone()).await;
    }
    let approval = approved(retried.expect("the payment completed"));
    assert_eq!((approval.auth_code.0, approval.amount_final_minor), (*b"AAAAAA", AMOUNT_A));
    let view = purse(&h, &alice).await;
    assert_eq!(balance(&view), (TOP_UP - AMOUNT_A, TOP_UP - AMOUNT_A));
    assert_eq!(view.uses, 1);
    h.engine.shutdown().await;
}
