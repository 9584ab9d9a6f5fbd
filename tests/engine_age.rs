//! A1–A3: age registrations, the age check of a basket, both failure policies and the strict
//! mode. The clock is T0 = 2026-11-22T00:00:00Z: 09:00 on the 22nd in Tokyo, 19:00 on the 21st
//! in New York.

use settlegate_engine::ProviderCode;
use std::sync::atomic::Ordering;

use settlegate_engine::age::{Date, VerificationMethod};
use settlegate_engine::{
    AgeCheck, AgePolicy, AgeRecord, AuthOutcome, AuthorizeRequest, Basket, BasketItem, CodeOutcome,
    CodeState, EngineError, IssueCodeRequest, IssuedCode, OnAgeFailure, ReasonCode, RedeemRequest,
    Redemption, SaleLines, TerminalEntry,
};

use crate::support::*;

const DAY_MS: i64 = 86_400_000;

fn date(y: i16, m: i8, d: i8) -> Date {
    Date::new(y, m, d).unwrap()
}

fn policy(
    jurisdiction: &str,
    time_zone: &str,
    on_failure: OnAgeFailure,
    strict: bool,
) -> AgePolicy {
    AgePolicy { jurisdiction: jurisdiction.into(), time_zone: time_zone.into(), on_failure, strict }
}

/// Lists the test stores at `PROVIDER_OK` and sets their policies.
async fn stores(h: &Harness) {
    let ids = ["JP-REFUSE", "JP-REMOVE", "US-NY", "JP-STRICT", "JP-DEFAULT"];
    let entries = ids.iter().map(|id| TerminalEntry { terminal_id: (*id).into(), service: None });
    h.engine
        .register_terminals(request_id(), ProviderCode(PROVIDER_OK), entries.collect())
        .await
        .unwrap();
    let set = [
        ("JP-REFUSE", policy("JP", "Asia/Tokyo", OnAgeFailure::Refuse, false)),
        ("JP-REMOVE", policy("JP", "Asia/Tokyo", OnAgeFailure::RemoveItems, false)),
        ("US-NY", policy("US", "America/New_York", OnAgeFailure::Refuse, false)),
        ("JP-STRICT", policy("JP", "Asia/Tokyo", OnAgeFailure::RemoveItems, true)),
    ];
    for (terminal, policy) in set {
        h.engine
            .set_age_policy(request_id(), ProviderCode(PROVIDER_OK), terminal, Some(policy))
            .await
            .unwrap();
    }
}

fn age_record(user: &TestUser, birth: Date, valid_until_ms: i64) -> AgeRecord {
    AgeRecord {
        key_version: user.credential.key_version,
        card_idm: user.credential.card_idm,
        user: user.user.clone(),
        birth_date: birth,
        method: VerificationMethod::DocumentChip,
        verified_at_ms: T0_MS - DAY_MS,
        valid_until_ms,
        counter: user.counter.fetch_add(1, Ordering::Relaxed),
        timestamp_ms: T0_MS,
    }
}

async fn register(h: &Harness, user: &TestUser, birth: Date) {
    let signed =
        age_record(user, birth, T0_MS + 30 * DAY_MS).sign(user.credential.device_key.expose());
    h.engine.register_age(request_id(), &signed).await.expect("registration accepted");
}

/// A harness with the test stores and a user whose device is registered as born on `birth`.
async fn registered(name: &str, birth: Date) -> (Harness, TestUser) {
    let h = Harness::new();
    stores(&h).await;
    let user = h.user(name).await;
    register(&h, &user, birth).await;
    (h, user)
}

fn item(id: &str, category: &str, amount: u64) -> BasketItem {
    BasketItem {
        item_id: id.into(),
        category: category.into(),
        quantity: 1,
        unit_amount_minor: amount,
    }
}

/// Beer (alcohol, 600), bread (no category, 300), cigarettes (tobacco, 500).
fn mixed_basket(flag: bool) -> Basket {
    Basket {
        age_confirmation: flag,
        items: vec![
            item("BEER", "alcohol", 600),
            item("BREAD", "", 300),
            item("CIGS", "tobacco", 500),
        ],
    }
}

async fn pay(
    h: &Harness,
    user: &TestUser,
    terminal: &str,
    basket: Basket,
) -> settlegate_engine::engine::BasketOutcome {
    let amount = basket.total().unwrap();
    let request = AuthorizeRequest {
        client_request_id: request_id(),
        inherent_id: user.signed(T0_MS, amount, PROVIDER_OK, terminal),
    };
    let mut results = h.engine.authorize_baskets(vec![(request, Some(basket))]).await;
    results.pop().unwrap().expect("an outcome")
}

#[tokio::test]
async fn of_age_exactly_on_the_birthday_and_one_day_short() {
    let h = Harness::new();
    stores(&h).await;
    // In Tokyo it is 2026-11-22: born 2006-11-22 turns 20 today.
    let birthday = h.user("birthday").await;
    register(&h, &birthday, date(2006, 11, 22)).await;
    let paid = pay(&h, &birthday, "JP-REFUSE", mixed_basket(true)).await;
    let approval = approved(paid.outcome);
    assert_eq!(approval.amount_final_minor, 1_400);
    let verdict = paid.verdict.unwrap();
    assert_eq!(verdict.check, AgeCheck::Held);
    assert!(verdict.items.is_empty());

    let short = h.user("short").await;
    register(&h, &short, date(2006, 11, 23)).await;
    let paid = pay(&h, &short, "JP-REFUSE", mixed_basket(true)).await;
    assert_eq!(paid.outcome, AuthOutcome::Declined(ReasonCode::AgeConditionNotMet));
    let verdict = paid.verdict.unwrap();
    assert_eq!(verdict.check, AgeCheck::NotHeld);
    assert_eq!(verdict.items, vec!["BEER".to_owned(), "CIGS".to_owned()], "the reply names them");
}

#[tokio::test]
async fn leap_day_birth_in_a_common_year() {
    // Born 2004-02-29, twenty-one in 2025, a common year, at the US store (21 for alcohol,
    // leap-day birthdays on 1 March by default).
    let h = Harness::new();
    stores(&h).await;
    let leap = h.user("leap").await;
    let born = date(2004, 2, 29);
    let feb_28_ny = 1_740_787_200_000; // 2025-03-01T00:00:00Z = 2025-02-28 19:00 New York
    h.clock.set(feb_28_ny);
    let record = AgeRecord {
        verified_at_ms: feb_28_ny - DAY_MS,
        timestamp_ms: feb_28_ny,
        valid_until_ms: feb_28_ny + 30 * DAY_MS,
        ..age_record(&leap, born, 0)
    };
    h.engine
        .register_age(request_id(), &record.sign(leap.credential.device_key.expose()))
        .await
        .unwrap();
    let basket = Basket { age_confirmation: true, items: vec![item("WINE", "alcohol", 900)] };
    let request = |at: i64| AuthorizeRequest {
        client_request_id: request_id(),
        inherent_id: leap.signed(at, 900, PROVIDER_OK, "US-NY"),
    };
    // On 28 February in New York, not yet 21 (the birthday counts as 1 March in common years).
    let results =
        h.engine.authorize_baskets(vec![(request(feb_28_ny), Some(basket.clone()))]).await;
    let first = results.into_iter().next().unwrap().unwrap();
    assert_eq!(first.outcome, AuthOutcome::Declined(ReasonCode::AgeConditionNotMet));
    // Five hours later it is 1 March in New York: 21.
    let mar_1_ny = feb_28_ny + 5 * 3_600_000;
    h.clock.set(mar_1_ny);
    let results = h.engine.authorize_baskets(vec![(request(mar_1_ny), Some(basket))]).await;
    approved(results.into_iter().next().unwrap().unwrap().outcome);
}

#[tokio::test]
async fn the_store_time_zone_decides_the_local_date() {
    let h = Harness::new();
    stores(&h).await;
    // Born 2005-11-22: 21 on the 22nd. At T0 it is the 22nd in UTC but still the 21st in New
    // York, so a US store (21 for alcohol) refuses, though a UTC reading would approve.
    let user = h.user("nyc").await;
    register(&h, &user, date(2005, 11, 22)).await;
    let basket = Basket { age_confirmation: true, items: vec![item("BEER", "alcohol", 600)] };
    let paid = pay(&h, &user, "US-NY", basket.clone()).await;
    assert_eq!(paid.outcome, AuthOutcome::Declined(ReasonCode::AgeConditionNotMet));
    // In Tokyo the same person (20+) passes.
    approved(pay(&h, &user, "JP-REFUSE", basket).await.outcome);
}

#[tokio::test]
async fn remove_policy_settles_the_rest_and_names_what_was_removed() {
    let (h, teen) = registered("teen", date(2010, 1, 1)).await;
    let paid = pay(&h, &teen, "JP-REMOVE", mixed_basket(true)).await;
    let approval = approved(paid.outcome);
    assert_eq!(approval.amount_requested_minor, 300, "only the bread is settled");
    assert_eq!(approval.amount_final_minor, 300);
    let verdict = paid.verdict.unwrap();
    assert_eq!(verdict.check, AgeCheck::NotHeld);
    assert_eq!(verdict.items, vec!["BEER".to_owned(), "CIGS".to_owned()]);
    assert_eq!(verdict.amount_minor, 300);
}

#[tokio::test]
async fn a_basket_of_only_restricted_items_is_declined_under_either_policy() {
    let (h, teen) = registered("teen", date(2010, 1, 1)).await;
    for terminal in ["JP-REMOVE", "JP-REFUSE"] {
        let basket = Basket {
            age_confirmation: true,
            items: vec![item("BEER", "alcohol", 600), item("CIGS", "tobacco", 500)],
        };
        let paid = pay(&h, &teen, terminal, basket).await;
        assert_eq!(paid.outcome, AuthOutcome::Declined(ReasonCode::AgeConditionNotMet));
        let verdict = paid.verdict.unwrap();
        assert_eq!(verdict.items.len(), 2);
        assert_eq!(verdict.amount_minor, 0);
    }
}

#[tokio::test]
async fn without_the_flag_the_basket_is_settled_as_it_is() {
    let (h, teen) = registered("teen", date(2010, 1, 1)).await;
    let paid = pay(&h, &teen, "JP-REFUSE", mixed_basket(false)).await;
    assert_eq!(approved(paid.outcome).amount_final_minor, 1_400);
    assert_eq!(paid.verdict.unwrap().check, AgeCheck::NotChecked);
    // With the flag and nothing restricted, the check finds nothing to check.
    let bread = Basket { age_confirmation: true, items: vec![item("BREAD", "", 300)] };
    let paid = pay(&h, &teen, "JP-REFUSE", bread).await;
    approved(paid.outcome);
    assert_eq!(paid.verdict.unwrap().check, AgeCheck::NoRestrictedItems);
}

#[tokio::test]
async fn strict_mode_checks_categories_whatever_the_flag_says() {
    let (h, teen) = registered("teen", date(2010, 1, 1)).await;
    let paid = pay(&h, &teen, "JP-STRICT", mixed_basket(false)).await;
    assert_eq!(approved(paid.outcome).amount_final_minor, 300);
    assert_eq!(paid.verdict.unwrap().check, AgeCheck::NotHeld);
    // A strict store's payment without a basket would bypass the check: it is declined.
    let plain = h.authorize(teen.signed(T0_MS, 1_400, PROVIDER_OK, "JP-STRICT")).await;
    assert_eq!(plain, AuthOutcome::Declined(ReasonCode::BasketMismatch));
}

#[tokio::test]
async fn expired_or_missing_registrations_fail_the_condition() {
    let h = Harness::new();
    stores(&h).await;
    let adult = h.user("adult").await;
    let record = age_record(&adult, date(1980, 5, 5), T0_MS + DAY_MS);
    h.engine
        .register_age(request_id(), &record.sign(adult.credential.device_key.expose()))
        .await
        .unwrap();
    let beer = || Basket { age_confirmation: true, items: vec![item("BEER", "alcohol", 600)] };
    approved(pay(&h, &adult, "JP-REFUSE", beer()).await.outcome);
    h.clock.advance(DAY_MS + 1);
    let request = AuthorizeRequest {
        client_request_id: request_id(),
        inherent_id: adult.signed(T0_MS + DAY_MS + 1, 600, PROVIDER_OK, "JP-REFUSE"),
    };
    let expired = h.engine.authorize_baskets(vec![(request, Some(beer()))]).await;
    let expired = expired.into_iter().next().unwrap().unwrap();
    assert_eq!(expired.outcome, AuthOutcome::Declined(ReasonCode::AgeConditionNotMet));

    // A terminal that never registered fails the same way, and the store learns no more.
    let unregistered = h.user("unregistered").await;
    let request = AuthorizeRequest {
        client_request_id: request_id(),
        inherent_id: unregistered.signed(T0_MS + DAY_MS + 1, 600, PROVIDER_OK, "JP-REFUSE"),
    };
    let missing = h.engine.authorize_baskets(vec![(request, Some(beer()))]).await;
    let missing = missing.into_iter().next().unwrap().unwrap();
    assert_eq!(missing.outcome, expired.outcome);
    assert_eq!(missing.verdict, expired.verdict);
}

#[tokio::test]
async fn registrations_are_checked() {
    let h = Harness::new();
    stores(&h).await;
    let user = h.user("checked").await;
    let key = *user.credential.device_key.expose();
    let refused = |result: Result<(), EngineError>| match result {
        Err(EngineError::Refused(reason)) => reason,
        other => panic!("expected a refusal, got {other:?}"),
    };
    // A forged tag.
    let record = age_record(&user, date(1990, 1, 1), T0_MS + DAY_MS);
    let forged = record.sign(&[0x42; 32]);
    assert_eq!(refused(h.engine.register_age(request_id(), &forged).await), ReasonCode::ForgedTag);
    // An unknown terminal (card IDm never provisioned).
    let unknown =
        AgeRecord { card_idm: *b"NOSUCH!!", ..age_record(&user, date(1990, 1, 1), T0_MS + DAY_MS) };
    assert_eq!(
        refused(h.engine.register_age(request_id(), &unknown.sign(&key)).await),
        ReasonCode::UnknownDevice
    );
    // A birth date in the future, and a validity that already ended.
    let future = age_record(&user, date(2027, 1, 1), T0_MS + DAY_MS);
    assert_eq!(
        refused(h.engine.register_age(request_id(), &future.sign(&key)).await),
        ReasonCode::InvalidAgeRegistration
    );
    let ended = age_record(&user, date(1990, 1, 1), T0_MS - 1);
    assert_eq!(
        refused(h.engine.register_age(request_id(), &ended.sign(&key)).await),
        ReasonCode::InvalidAgeRegistration
    );
    // A replayed registration.
    let once = age_record(&user, date(1990, 1, 1), T0_MS + DAY_MS).sign(&key);
    h.engine.register_age(request_id(), &once).await.unwrap();
    assert_eq!(
        refused(h.engine.register_age(request_id(), &once).await),
        ReasonCode::ReplayedNonce
    );
    // A policy for a store terminal that is not listed, and one with an unknown time zone.
    let jp = policy("JP", "Asia/Tokyo", OnAgeFailure::Refuse, false);
    let result = h
        .engine
        .set_age_policy(request_id(), ProviderCode(PROVIDER_OK), "NOT-LISTED", Some(jp))
        .await;
    assert_eq!(refused(result), ReasonCode::InvalidTerminal);
    let bad = policy("JP", "Mars/Olympus_Mons", OnAgeFailure::Refuse, false);
    let result = h
        .engine
        .set_age_policy(request_id(), ProviderCode(PROVIDER_OK), "JP-REFUSE", Some(bad))
        .await;
    assert_eq!(refused(result), ReasonCode::InvalidAgePolicy);
}

#[tokio::test]
async fn a_basket_must_add_up_to_the_signed_amount() {
    let h = Harness::new();
    stores(&h).await;
    let user = h.user("sum").await;
    let request = AuthorizeRequest {
        client_request_id: request_id(),
        inherent_id: user.signed(T0_MS, 1_000, PROVIDER_OK, "JP-DEFAULT"),
    };
    let results = h.engine.authorize_baskets(vec![(request, Some(mixed_basket(false)))]).await;
    let result = results.into_iter().next().unwrap().unwrap();
    assert_eq!(result.outcome, AuthOutcome::Declined(ReasonCode::BasketMismatch));
}

/// Registrations, store policies and basket outcomes survive a restart: from the log alone,
/// and from snapshots plus the log.
#[tokio::test]
async fn age_state_survives_a_restart() {
    for snapshot_every_records in [0, 3] {
        let dir = tempfile::tempdir().unwrap();
        let durable = || durable_config(dir.path(), snapshot_every_records);
        let h = Harness::with_config(durable());
        stores(&h).await;
        let teen = h.user("teen").await;
        register(&h, &teen, date(2010, 1, 1)).await;
        let basket = mixed_basket(true);
        let request = AuthorizeRequest {
            client_request_id: request_id(),
            inherent_id: teen.signed(T0_MS, basket.total().unwrap(), PROVIDER_OK, "JP-REMOVE"),
        };
        let first = h.engine.authorize_baskets(vec![(request.clone(), Some(basket.clone()))]).await;
        let first = first.into_iter().next().unwrap().unwrap();
        assert_eq!(approved(first.outcome).amount_final_minor, 300);
        h.engine.shutdown().await;
        drop(h);

        let h = Harness::with_config(durable());
        // The retry gets the first outcome, verdict and all.
        let retry = h.engine.authorize_baskets(vec![(request, Some(basket.clone()))]).await;
        assert_eq!(
            retry.into_iter().next().unwrap().unwrap(),
            first,
            "snapshots: {snapshot_every_records}"
        );
        // The registration and the store's remove policy are still in force.
        let again = pay(&h, &teen, "JP-REMOVE", basket).await;
        assert_eq!(again.verdict.unwrap().items, vec!["BEER".to_owned(), "CIGS".to_owned()]);
        // And the strict store is still strict.
        let plain = h.authorize(teen.signed(T0_MS, 300, PROVIDER_OK, "JP-STRICT")).await;
        assert_eq!(plain, AuthOutcome::Declined(ReasonCode::BasketMismatch));
        h.engine.shutdown().await;
    }
}

#[tokio::test]
async fn a_store_terminal_without_a_policy_follows_the_default() {
    let (h, teen) = registered("teen", date(2010, 1, 1)).await;
    // Listed without a policy of its own, or not listed at all: the engine's default policy
    // (JP, Asia/Tokyo, refuse) applies.
    for terminal in ["JP-DEFAULT", "NOT-LISTED-1"] {
        let paid = pay(&h, &teen, terminal, mixed_basket(true)).await;
        assert_eq!(paid.outcome, AuthOutcome::Declined(ReasonCode::AgeConditionNotMet));
        assert_eq!(paid.verdict.unwrap().items.len(), 2);
    }
    // Clearing a terminal's own policy returns it to the default.
    h.engine
        .set_age_policy(request_id(), ProviderCode(PROVIDER_OK), "JP-REMOVE", None)
        .await
        .unwrap();
    let paid = pay(&h, &teen, "JP-REMOVE", mixed_basket(true)).await;
    assert_eq!(paid.outcome, AuthOutcome::Declined(ReasonCode::AgeConditionNotMet));
}

// A2 on a code payment (C3): `REDEEM_CODE_BASKET`.

/// A payment code of 2,000 issued to `user`'s own device, by the test stores' provider.
async fn code_for(h: &Harness, user: &TestUser) -> IssuedCode {
    let request = IssueCodeRequest {
        client_request_id: request_id(),
        inherent_id: user.signed(T0_MS, 2_000, PROVIDER_OK, "*"),
        validity_ms: 600_000,
        deliver_to: None,
        order_ref: String::new(),
    };
    match h.engine.issue_code(request).await.expect("an answer") {
        CodeOutcome::Issued(code) => *code,
        CodeOutcome::Declined(reason) => panic!("code declined: {reason}"),
    }
}

/// Redeeming `code` at `terminal` for the sale of `basket`.
fn redeem_with(code: &IssuedCode, terminal: &str, basket: Basket) -> RedeemRequest {
    RedeemRequest {
        client_request_id: request_id(),
        code: code.text.clone(),
        issuer: 1,
        number: code.number,
        amount_minor: basket.total().unwrap(),
        currency: jpy(),
        sale_at_ms: T0_MS,
        terminal_id: terminal.into(),
        lines: SaleLines::Basket(basket),
        coupon: None,
        order_ref: String::new(),
    }
}

fn lines(redemption: &Redemption) -> Vec<&str> {
    redemption.items.iter().map(|(id, _, _)| id.as_str()).collect()
}

fn refusal<T: std::fmt::Debug>(result: Result<T, EngineError>) -> ReasonCode {
    match result {
        Err(EngineError::Refused(reason)) => reason,
        other => panic!("expected a refusal, got {other:?}"),
    }
}

#[tokio::test]
async fn a_code_carries_the_age_registration_of_the_device_it_was_delivered_to() {
    let (h, adult) = registered("adult", date(1990, 5, 5)).await;
    let code = code_for(&h, &adult).await;
    let redeemed = h.engine.redeem_code(redeem_with(&code, "JP-REFUSE", mixed_basket(true))).await;
    let redeemed = redeemed.expect("of age: the whole basket is settled");
    assert_eq!((redeemed.captured_minor, redeemed.released_minor), (1_400, 600));
    assert_eq!(lines(&redeemed), ["BEER", "BREAD", "CIGS"]);
}

#[tokio::test]
async fn refused_for_age_the_code_stays_issued_and_redeems_without_the_restricted_items() {
    let (h, teen) = registered("teen", date(2010, 1, 1)).await;
    let unregistered = h.user("unregistered").await;
    for user in [&teen, &unregistered] {
        let code = code_for(&h, user).await;
        let refused = h.engine.redeem_code(redeem_with(&code, "JP-REFUSE", mixed_basket(true)));
        assert_eq!(refusal(refused.await), ReasonCode::AgeConditionNotMet);
        assert_eq!(h.engine.code_state(code.number).await.unwrap(), CodeState::Issued);
        let bread = Basket { age_confirmation: true, items: vec![item("BREAD", "", 300)] };
        let redeemed = h.engine.redeem_code(redeem_with(&code, "JP-REFUSE", bread)).await.unwrap();
        assert_eq!((redeemed.captured_minor, redeemed.released_minor), (300, 1_700));
    }
}

#[tokio::test]
async fn remove_policy_at_redemption_captures_the_rest_and_releases_the_remainder() {
    let (h, teen) = registered("teen", date(2010, 1, 1)).await;
    let code = code_for(&h, &teen).await;
    let redeemed = h.engine.redeem_code(redeem_with(&code, "JP-REMOVE", mixed_basket(true))).await;
    let redeemed = redeemed.expect("the bread is settled");
    assert_eq!((redeemed.captured_minor, redeemed.released_minor), (300, 1_700));
    assert_eq!(lines(&redeemed), ["BREAD"]);
    // Only restricted items, under either policy: nothing left to settle.
    for terminal in ["JP-REMOVE", "JP-REFUSE"] {
        let code = code_for(&h, &teen).await;
        let basket = Basket {
            age_confirmation: true,
            items: vec![item("BEER", "alcohol", 600), item("CIGS", "tobacco", 500)],
        };
        let refused = h.engine.redeem_code(redeem_with(&code, terminal, basket)).await;
        assert_eq!(refusal(refused), ReasonCode::AgeConditionNotMet, "{terminal}");
    }
}

#[tokio::test]
async fn a_strict_store_redeems_only_with_a_basket_and_checks_it_whatever_the_flag() {
    let (h, teen) = registered("teen", date(2010, 1, 1)).await;
    let code = code_for(&h, &teen).await;
    let mut plain = redeem_with(&code, "JP-STRICT", mixed_basket(false));
    plain.lines = SaleLines::Items(vec![("ANYTHING".into(), 1, 1_400)]);
    assert_eq!(refusal(h.engine.redeem_code(plain).await), ReasonCode::BasketMismatch);
    // Without the flag a store that is not strict settles the basket as it is.
    let unflagged = h.engine.redeem_code(redeem_with(&code, "JP-REFUSE", mixed_basket(false)));
    assert_eq!(unflagged.await.unwrap().captured_minor, 1_400);
    // The strict store (remove_items) checks the categories though the flag is off.
    let code = code_for(&h, &teen).await;
    let redeemed = h.engine.redeem_code(redeem_with(&code, "JP-STRICT", mixed_basket(false)));
    assert_eq!(lines(&redeemed.await.unwrap()), ["BREAD"]);
}

#[tokio::test]
async fn a_redemption_basket_must_add_up_and_is_part_of_the_idempotency_key() {
    let (h, adult) = registered("adult", date(1990, 5, 5)).await;
    let code = code_for(&h, &adult).await;
    let mut wrong = redeem_with(&code, "JP-REFUSE", mixed_basket(true));
    wrong.amount_minor += 1;
    assert_eq!(refusal(h.engine.redeem_code(wrong).await), ReasonCode::BasketMismatch);
    let request = redeem_with(&code, "JP-REFUSE", mixed_basket(true));
    let first = h.engine.redeem_code(request.clone()).await.unwrap();
    assert_eq!(h.engine.redeem_code(request.clone()).await.unwrap(), first, "the same answer");
    let mut other = request;
    let bread = Basket { age_confirmation: true, items: vec![item("BREAD", "", 1_400)] };
    other.lines = SaleLines::Basket(bread);
    assert_eq!(refusal(h.engine.redeem_code(other).await), ReasonCode::IdempotencyConflict);
}

#[tokio::test]
async fn a_basket_redemption_survives_a_restart() {
    for snapshot_every_records in [0, 3] {
        let dir = tempfile::tempdir().unwrap();
        let durable = || durable_config(dir.path(), snapshot_every_records);
        let h = Harness::with_config(durable());
        stores(&h).await;
        let teen = h.user("teen").await;
        register(&h, &teen, date(2010, 1, 1)).await;
        let code = code_for(&h, &teen).await;
        let request = redeem_with(&code, "JP-REMOVE", mixed_basket(true));
        let first = h.engine.redeem_code(request.clone()).await.unwrap();
        h.engine.shutdown().await;
        drop(h);

        let h = Harness::with_config(durable());
        let state = h.engine.code_state(code.number).await.unwrap();
        assert_eq!(state, CodeState::Redeemed(Box::new(first.clone())), "{snapshot_every_records}");
        assert_eq!(h.engine.redeem_code(request).await.unwrap(), first, "the retry's answer");
        h.engine.shutdown().await;
    }
}
