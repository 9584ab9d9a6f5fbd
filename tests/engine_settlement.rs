//! G3: settlement authorization and every way it can fail.

use settlegate_engine::{ProviderCode, RequestId};
use std::time::Duration;

use settlegate_engine::{
    AuthOutcome, AuthorizeRequest, Discount, EngineError, MeansOrder, ReasonCode, TerminalEntry,
    TerminalService,
};

use crate::support::*;

#[tokio::test]
async fn approved_settlement_without_discount() {
    let h = Harness::new();
    let alice = h.user("alice").await;
    let approval = approved(h.authorize(alice.signed(T0_MS, 1_234, PROVIDER_OK, "T-1")).await);
    assert_eq!(approval.amount_requested_minor, 1_234);
    assert_eq!(approval.discount_minor, 0, "terminal not on the list: no discount");
    assert_eq!(approval.amount_final_minor, 1_234);
    assert_eq!(approval.provider_code, PROVIDER_OK);
    assert!(approval.auth_code.as_str().bytes().all(|b| b.is_ascii_alphanumeric()));
}

#[tokio::test]
async fn forged_tag_is_declined() {
    let h = Harness::new();
    let alice = h.user("alice").await;
    let mut bytes = alice.signed(T0_MS, 1_000, PROVIDER_OK, "T-1");
    let last = bytes.len() - 1;
    bytes[last] ^= 1;
    assert_eq!(h.authorize(bytes).await, AuthOutcome::Declined(ReasonCode::ForgedTag));
    // An altered amount with the original tag is a forgery too.
    let mut bytes = alice.signed(T0_MS, 1_000, PROVIDER_OK, "T-1");
    bytes[10] ^= 0x01;
    assert_eq!(h.authorize(bytes).await, AuthOutcome::Declined(ReasonCode::ForgedTag));
    // A record signed with another key (not the enrolled device's) is a forgery.
    let record = alice.record(T0_MS, 1_000, PROVIDER_OK, "T-1");
    assert_eq!(
        h.authorize(record.sign(&[0x42; 32])).await,
        AuthOutcome::Declined(ReasonCode::ForgedTag)
    );
}

#[tokio::test]
async fn replayed_nonce_is_declined() {
    let h = Harness::new();
    let alice = h.user("alice").await;
    let bytes = alice.signed(T0_MS, 1_000, PROVIDER_OK, "T-1");
    approved(h.authorize(bytes.clone()).await);
    // The same bytes under a new client request ID: a replay, not a retry.
    assert_eq!(h.authorize(bytes).await, AuthOutcome::Declined(ReasonCode::ReplayedNonce));
}

#[tokio::test]
async fn stale_and_future_timestamps_are_declined() {
    let h = Harness::new();
    let alice = h.user("alice").await;
    let window = h.engine.config().timestamp_window_ms;
    let stale = alice.signed(T0_MS - window - 1, 1_000, PROVIDER_OK, "T-1");
    assert_eq!(h.authorize(stale).await, AuthOutcome::Declined(ReasonCode::StaleTimestamp));
    let future = alice.signed(T0_MS + window + 1, 1_000, PROVIDER_OK, "T-1");
    assert_eq!(h.authorize(future).await, AuthOutcome::Declined(ReasonCode::StaleTimestamp));
    let edge = alice.signed(T0_MS - window, 1_000, PROVIDER_OK, "T-1");
    approved(h.authorize(edge).await);
}

#[tokio::test]
async fn unknown_device_and_wrong_user_are_declined() {
    let h = Harness::new();
    let alice = h.user("alice").await;
    let bob = h.user("bob").await;
    let mut record = alice.record(T0_MS, 1_000, PROVIDER_OK, "T-1");
    record.card_idm = fresh_idm();
    assert_eq!(
        h.authorize(record.sign(alice.credential.device_key.expose())).await,
        AuthOutcome::Declined(ReasonCode::UnknownDevice)
    );
    // Alice's device claiming to pay as Bob.
    let mut record = alice.record(T0_MS, 1_000, PROVIDER_OK, "T-1");
    record.user = bob.user.clone();
    assert_eq!(
        h.authorize(record.sign(alice.credential.device_key.expose())).await,
        AuthOutcome::Declined(ReasonCode::UserDeviceMismatch)
    );
}

#[tokio::test]
async fn malformed_record_is_declined() {
    let h = Harness::new();
    assert_eq!(h.authorize(vec![1, 2, 3]).await, AuthOutcome::Declined(ReasonCode::Malformed));
    assert_eq!(h.authorize(vec![0; 200]).await, AuthOutcome::Declined(ReasonCode::Malformed));
}

#[tokio::test]
async fn amount_out_of_range_is_declined_as_invalid_amount() {
    let h = Harness::new();
    let alice = h.user("alice").await;
    for amount in [0, settlegate_engine::limits::AMOUNT_MINOR_MAX + 1] {
        let bytes = alice.signed(T0_MS, amount, PROVIDER_OK, "T-1");
        assert_eq!(h.authorize(bytes).await, AuthOutcome::Declined(ReasonCode::InvalidAmount));
    }
}

#[tokio::test]
async fn unknown_provider_is_declined() {
    let h = Harness::new();
    let alice = h.user("alice").await;
    let bytes = alice.signed(T0_MS, 1_000, 31_337, "T-1");
    assert_eq!(h.authorize(bytes).await, AuthOutcome::Declined(ReasonCode::UnknownProvider));
}

#[tokio::test]
async fn unregistered_or_mismatched_means_is_declined() {
    let h = Harness::new();
    let alice = h.user("alice").await;
    let mut record = alice.record(T0_MS, 1_000, PROVIDER_OK, "T-1");
    record.means_id = 7;
    let key = alice.credential.device_key.expose();
    assert_eq!(
        h.authorize(record.sign(key)).await,
        AuthOutcome::Declined(ReasonCode::MeansNotRegistered)
    );
    let mut record = alice.record(T0_MS, 1_000, PROVIDER_OK, "T-1");
    record.means = settlegate_engine::MeansKind::QrCode;
    assert_eq!(
        h.authorize(record.sign(key)).await,
        AuthOutcome::Declined(ReasonCode::MeansMismatch)
    );
}

async fn list_terminal(h: &Harness, terminal: &str, discount: Discount) {
    let entry = TerminalEntry {
        terminal_id: terminal.into(),
        service: Some(TerminalService {
            discount,
            valid_from_ms: T0_MS - 1,
            valid_until_ms: T0_MS + 3_600_000,
            description: "special".into(),
        }),
    };
    h.engine
        .register_terminals(request_id(), ProviderCode(PROVIDER_OK), vec![entry])
        .await
        .unwrap();
}

#[tokio::test]
async fn terminal_discount_is_exact_in_minor_units() {
    let h = Harness::new();
    let alice = h.user("alice").await;
    list_terminal(&h, "PCT-1", Discount::Percent { bps: 1_250 }).await;
    list_terminal(&h, "FIX-1", Discount::Fixed { amount_minor: 300, currency: jpy() }).await;
    list_terminal(
        &h,
        "FIX-USD",
        Discount::Fixed { amount_minor: 300, currency: "USD".try_into().unwrap() },
    )
    .await;
    // 12.5% of 999 is 124.875: the discount is floored to 124, the final amount 875.
    let a = approved(h.authorize(alice.signed(T0_MS, 999, PROVIDER_OK, "PCT-1")).await);
    assert_eq!((a.discount_minor, a.amount_final_minor), (124, 875));
    let a = approved(h.authorize(alice.signed(T0_MS, 1_000, PROVIDER_OK, "FIX-1")).await);
    assert_eq!((a.discount_minor, a.amount_final_minor), (300, 700));
    // A fixed discount never takes the amount below zero.
    let a = approved(h.authorize(alice.signed(T0_MS, 200, PROVIDER_OK, "FIX-1")).await);
    assert_eq!((a.discount_minor, a.amount_final_minor), (200, 0));
    // A fixed discount in another currency does not apply.
    let a = approved(h.authorize(alice.signed(T0_MS, 1_000, PROVIDER_OK, "FIX-USD")).await);
    assert_eq!((a.discount_minor, a.amount_final_minor), (0, 1_000));
    // The provider sees the final amount: 1,000,010 is over its approval limit, but 10% off is not.
    list_terminal(&h, "PCT-10", Discount::Percent { bps: 1_000 }).await;
    let a = approved(h.authorize(alice.signed(T0_MS, 1_000_010, PROVIDER_OK, "PCT-10")).await);
    assert_eq!(a.amount_final_minor, 900_009);
}

#[tokio::test]
async fn provider_declines_are_mapped_to_reasons() {
    let h = Harness::new();
    let alice = h.user("alice").await;
    assert_eq!(
        h.authorize(alice.signed(T0_MS, 1_000, PROVIDER_DECLINE, "T-1")).await,
        AuthOutcome::Declined(ReasonCode::ProviderDoNotHonor)
    );
    assert_eq!(
        h.authorize(alice.signed(T0_MS, APPROVE_LIMIT + 1, PROVIDER_OK, "T-1")).await,
        AuthOutcome::Declined(ReasonCode::ProviderInsufficientFunds)
    );
}

#[tokio::test]
async fn provider_timeout_gives_a_definitive_decline_and_retry_returns_it() {
    let h = Harness::new();
    let alice = h.user("alice").await;
    let request = AuthorizeRequest {
        client_request_id: request_id(),
        inherent_id: alice.signed(T0_MS, 1_000, PROVIDER_SLOW, "T-1"),
    };
    let started = std::time::Instant::now();
    let outcome = h.engine.authorize(request.clone()).await.unwrap();
    assert_eq!(outcome, AuthOutcome::Declined(ReasonCode::ProviderTimeout));
    // The provider takes 30 s; the outcome came from its 100 ms timeout, not the provider.
    assert!(started.elapsed() < Duration::from_secs(20));
    // Not left "processing": the retry returns the same outcome at once.
    assert_eq!(h.engine.authorize(request).await.unwrap(), outcome);
}

#[tokio::test]
async fn idempotent_retry_returns_the_first_outcome_and_settles_once() {
    let h = Harness::new();
    let alice = h.user("alice").await;
    let request = AuthorizeRequest {
        client_request_id: request_id(),
        inherent_id: alice.signed(T0_MS, 777, PROVIDER_OK, "T-1"),
    };
    let first = approved(h.engine.authorize(request.clone()).await.unwrap());
    let second = approved(h.engine.authorize(request.clone()).await.unwrap());
    assert_eq!(first, second, "same authorization code, same amounts");
    let means = h
        .engine
        .list_means(&alice.user, settlegate_engine::MeansOrder::Registration)
        .await
        .unwrap();
    assert_eq!(means[0].uses, 1, "settled once");
    // Reusing the ID for different bytes is a conflict, not a settlement.
    let reused = AuthorizeRequest {
        client_request_id: request.client_request_id,
        inherent_id: alice.signed(T0_MS, 778, PROVIDER_OK, "T-1"),
    };
    assert_eq!(
        h.engine.authorize(reused).await.unwrap(),
        AuthOutcome::Declined(ReasonCode::IdempotencyConflict)
    );
}

#[tokio::test]
async fn busy_shard_answers_busy_and_recovers() {
    let h = Harness::new();
    let alice = h.user("alice").await;
    let release = h.engine.stall_shard_of(&alice.user);
    // The stalled shard's mailbox (capacity 4) fills; further admissions are refused as busy.
    let requests: Vec<AuthorizeRequest> = (0..16)
        .map(|_| AuthorizeRequest {
            client_request_id: request_id(),
            inherent_id: alice.signed(T0_MS, 100, PROVIDER_OK, "T-1"),
        })
        .collect();
    let engine = h.engine.clone();
    let mut tasks = Vec::new();
    for request in requests.clone() {
        let engine = engine.clone();
        tasks.push(tokio::spawn(async move { engine.authorize(request).await }));
        tokio::task::yield_now().await;
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    drop(release);
    let mut busy = Vec::new();
    for (request, task) in requests.into_iter().zip(tasks) {
        match task.await.unwrap() {
            Err(EngineError::Busy { retry_after_ms }) => {
                assert!(retry_after_ms > 0);
                busy.push(request);
            }
            Ok(outcome) => {
                approved(outcome);
            }
            Err(other) => panic!("unexpected {other:?}"),
        }
    }
    assert!(!busy.is_empty(), "a full mailbox must answer busy");
    // Nothing was recorded for a busy answer: the retry with the same ID goes through.
    for request in busy {
        approved(h.engine.authorize(request).await.unwrap());
    }
}

/// A payment that finds its shard busy is kept back for the shard's turn, and applied when the
/// holder lets go: the release wakes it (nothing else touches the shard here to wake it later).
#[tokio::test]
async fn a_payment_kept_back_from_a_busy_shard_goes_through_when_the_shard_is_let_go() {
    let h = Harness::new();
    let alice = h.user("alice").await;
    let release = h.engine.stall_shard_of(&alice.user);
    let request = AuthorizeRequest {
        client_request_id: request_id(),
        inherent_id: alice.signed(T0_MS, 100, PROVIDER_OK, "T-1"),
    };
    let engine = h.engine.clone();
    let call = tokio::spawn(async move { engine.authorize(request).await });
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(!call.is_finished(), "the shard is held");
    drop(release);
    let outcome = tokio::time::timeout(Duration::from_secs(10), call)
        .await
        .expect("applied once the shard was let go")
        .unwrap();
    approved(outcome.unwrap());
}

#[tokio::test]
async fn batch_of_many_verifies_in_parallel_and_keeps_order() {
    let h = Harness::new();
    let alice = h.user("alice").await;
    let bob = h.user("bob").await;
    let mut requests = Vec::new();
    for i in 0..200u64 {
        let payer = if i % 2 == 0 { &alice } else { &bob };
        let mut bytes = payer.signed(T0_MS, 100 + i, PROVIDER_OK, "T-1");
        if i % 10 == 3 {
            let at = bytes.len() - 1;
            bytes[at] ^= 0xff;
        }
        requests.push(AuthorizeRequest { client_request_id: request_id(), inherent_id: bytes });
    }
    let results = h.engine.authorize_batch(requests).await;
    for (i, result) in results.into_iter().enumerate() {
        match result.unwrap() {
            AuthOutcome::Approved(a) => assert_eq!(a.amount_final_minor, 100 + i as u64),
            AuthOutcome::Declined(reason) => {
                assert_eq!(i % 10, 3, "only the forged ones are declined");
                assert_eq!(reason, ReasonCode::ForgedTag);
            }
        }
    }
}

#[tokio::test]
async fn oversized_batch_is_refused() {
    let h = Harness::new();
    let requests =
        vec![
            AuthorizeRequest { client_request_id: RequestId(1), inherent_id: Vec::new() };
            settlegate_engine::limits::BATCH_SIZE_MAX + 1
        ];
    let results = h.engine.authorize_batch(requests).await;
    assert!(results.iter().all(|r| matches!(r, Err(EngineError::BatchTooLarge { .. }))));
}

#[tokio::test]
async fn completion_notice_reaches_the_subscriber() {
    let h = Harness::new();
    let alice = h.user("alice").await;
    let mut notices = h.engine.subscribe(&alice.user);
    let request = AuthorizeRequest {
        client_request_id: request_id(),
        inherent_id: alice.signed(T0_MS, 500, PROVIDER_OK, "T-9"),
    };
    let outcome = h.engine.authorize(request.clone()).await.unwrap();
    let notice = tokio::time::timeout(Duration::from_secs(5), notices.recv())
        .await
        .expect("a notice")
        .unwrap();
    assert_eq!(notice.user, alice.user);
    assert_eq!(notice.client_request_id, request.client_request_id.get());
    assert_eq!(notice.terminal_id, "T-9");
    assert_eq!(notice.outcome, outcome);
}

/// Submitters on four threads at once, all on one shard: a batch is applied on its submitter's
/// thread when the shard is idle and by the shard's actor when it is busy. Either way each
/// request is applied exactly once: every user's count of approved settlements equals the
/// approvals it was told of, and the same requests again get the same answers.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_submitters_on_one_shard_apply_each_request_once() {
    const SUBMITTERS: usize = 8;
    const ROUNDS: usize = 150;
    let mut config = config();
    config.shards = 1;
    // Room for every batch in flight: this test is about turns, not about refusals.
    config.mailbox_capacity = 4096;
    let h = std::sync::Arc::new(Harness::with_config(config));
    let mut users = Vec::new();
    for i in 0..SUBMITTERS {
        users.push(std::sync::Arc::new(h.user(&format!("turns{i}")).await));
    }
    let tasks: Vec<_> = users
        .iter()
        .enumerate()
        .map(|(i, user)| {
            let (h, user) = (h.clone(), user.clone());
            tokio::spawn(async move {
                let mut answered = Vec::new();
                for round in 0..ROUNDS {
                    // Batches of 1 to 9 requests, a different size on each submitter.
                    let batch: Vec<AuthorizeRequest> = (0..(round + i) % 9 + 1)
                        .map(|_| AuthorizeRequest {
                            client_request_id: request_id(),
                            inherent_id: user.signed(T0_MS, 10, PROVIDER_OK, "T-1"),
                        })
                        .collect();
                    let outcomes = h.engine.authorize_batch(batch.clone()).await;
                    for (request, outcome) in batch.into_iter().zip(outcomes) {
                        answered.push((request, approved(outcome.expect("an outcome"))));
                    }
                }
                answered
            })
        })
        .collect();
    let mut answered = Vec::new();
    for task in tasks {
        answered.push(task.await.expect("a submitter"));
    }
    for (user, answers) in users.iter().zip(&answered) {
        let means = h.engine.list_means(&user.user, MeansOrder::Registration).await.unwrap();
        assert_eq!(means[0].uses, answers.len() as u64, "{:?}", user.user);
        for chunk in answers.chunks(16) {
            let again: Vec<AuthorizeRequest> = chunk.iter().map(|(r, _)| r.clone()).collect();
            let outcomes = h.engine.authorize_batch(again).await;
            for ((_, first), outcome) in chunk.iter().zip(outcomes) {
                assert_eq!(approved(outcome.unwrap()), *first);
            }
        }
    }
}
