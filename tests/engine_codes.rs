//! C1–C5 and T1: payment codes held, issued, delivered, redeemed once, expired and swept;
//! cash on delivery; coupons; the two-tier routing. The clock is the harness's manual clock.

use proptest::prelude::*;
use settlegate_engine::codes::{issue_number, CodeKey, CodeKind, CodePayload, CouponEffect};
use settlegate_engine::limits::ITEM_ID_LEN_MAX;
use settlegate_engine::{AddMeansOptions, ProviderCode};
use settlegate_engine::{
    CodeOutcome, CodeState, DeliveryNotice, DeviceMessage, EngineError, IssueCodeRequest,
    IssuedCode, MeansInput, MeansKind, ReasonCode, RedeemRequest, SaleLines,
};

use crate::support::*;

const MINUTE_MS: i64 = 60_000;

fn refusal<T: std::fmt::Debug>(result: Result<T, EngineError>) -> ReasonCode {
    match result {
        Err(EngineError::Refused(reason)) => reason,
        other => panic!("expected a refusal, got {other:?}"),
    }
}

/// The user's signed request for a code of `amount` with means `means_id` (0: default card).
fn code_request(
    h: &Harness,
    user: &TestUser,
    amount: u64,
    means: (MeansKind, u32),
) -> IssueCodeRequest {
    code_request_via(h, user, amount, means, PROVIDER_OK)
}

/// [`code_request`] via `provider`, valid 10 minutes, requested for the terminal "*".
pub(crate) fn code_request_via(
    h: &Harness,
    user: &TestUser,
    amount: u64,
    means: (MeansKind, u32),
    provider: u32,
) -> IssueCodeRequest {
    let mut record = user.record(h.engine.now_ms(), amount, provider, "*");
    record.means = means.0;
    record.means_id = means.1;
    IssueCodeRequest {
        client_request_id: request_id(),
        inherent_id: record.sign(user.credential.device_key.expose()),
        validity_ms: 10 * MINUTE_MS,
        deliver_to: None,
        order_ref: String::new(),
    }
}

async fn issue(h: &Harness, request: IssueCodeRequest) -> IssuedCode {
    match h.engine.issue_code(request).await.expect("an answer") {
        CodeOutcome::Issued(code) => *code,
        CodeOutcome::Declined(reason) => panic!("code declined: {reason}"),
    }
}

pub(crate) fn redeem(code: &IssuedCode, amount: u64, terminal: &str) -> RedeemRequest {
    RedeemRequest {
        client_request_id: request_id(),
        code: code.text.clone(),
        issuer: 1,
        number: code.number,
        amount_minor: amount,
        currency: jpy(),
        sale_at_ms: T0_MS,
        terminal_id: terminal.into(),
        lines: SaleLines::Items(vec![("ITEM-1".into(), 1, amount)]),
        coupon: None,
        order_ref: code.order_ref.clone(),
    }
}

/// A user with a card (means 1) and a purse (means 2) topped up with `balance`.
async fn purse_user(h: &Harness, name: &str, balance: u64) -> TestUser {
    let user = h.user(name).await;
    let purse = MeansInput::EMoney { emoney_type: "suica".into() };
    h.engine.add_means(request_id(), &user.user, &purse, AddMeansOptions::default()).await.unwrap();
    h.engine.top_up(request_id(), &user.user, 2, balance, jpy()).await.unwrap();
    user
}

async fn available(h: &Harness, user: &TestUser) -> (u64, u64) {
    let means = h.engine.list_means(&user.user, Default::default()).await.unwrap();
    let balance = means.iter().find(|m| m.means_id == 2).unwrap().balance.unwrap();
    (balance.balance_minor, balance.available_minor)
}

#[tokio::test]
async fn a_code_is_redeemed_once_even_when_two_terminals_race() {
    let h = Harness::new();
    let alice = h.user("alice").await;
    let code = issue(&h, code_request(&h, &alice, 5_000, (MeansKind::CreditCard, 0))).await;
    assert_eq!(code.text.len(), 65);
    assert_eq!(code.amount_minor, 5_000);
    let (a, b) = tokio::join!(
        h.engine.redeem_code(redeem(&code, 5_000, "POS-A")),
        h.engine.redeem_code(redeem(&code, 5_000, "POS-B")),
    );
    let results = [a, b];
    let wins = results.iter().filter(|r| r.is_ok()).count();
    assert_eq!(wins, 1, "exactly one redemption wins: {results:?}");
    let loser = results.into_iter().find(|r| r.is_err()).unwrap();
    assert_eq!(refusal(loser), ReasonCode::CodeRedeemed);
    // The record says who redeemed it, and what the merchant is owed.
    let CodeState::Redeemed(redemption) = h.engine.code_state(code.number).await.unwrap() else {
        panic!("redeemed")
    };
    assert_eq!(redemption.captured_minor, 5_000);
    assert!(["POS-A", "POS-B"].contains(&redemption.terminal_id.as_str()));
}

#[tokio::test]
async fn capture_below_the_authorized_amount_releases_the_rest() {
    let h = Harness::new();
    let bob = purse_user(&h, "bob", 10_000).await;
    let code = issue(&h, code_request(&h, &bob, 5_000, (MeansKind::EMoney, 2))).await;
    assert_eq!(available(&h, &bob).await, (10_000, 5_000), "the code's amount is held");
    let redemption = h.engine.redeem_code(redeem(&code, 3_200, "POS-A")).await.unwrap();
    assert_eq!((redemption.captured_minor, redemption.released_minor), (3_200, 1_800));
    assert_eq!(available(&h, &bob).await, (6_800, 6_800), "captured 3,200; the rest released");
    // Above the authorized amount is refused, and nothing changes.
    let bigger = issue(&h, code_request(&h, &bob, 1_000, (MeansKind::EMoney, 2))).await;
    let over = h.engine.redeem_code(redeem(&bigger, 1_001, "POS-A")).await;
    assert_eq!(refusal(over), ReasonCode::AmountAboveAuthorized);
    assert_eq!(h.engine.code_state(bigger.number).await.unwrap(), CodeState::Issued);
}

#[tokio::test]
async fn a_sale_line_whose_item_id_breaks_its_limit_is_refused() {
    let h = Harness::new();
    let dave = h.user("dave").await;
    let code = issue(&h, code_request(&h, &dave, 2_000, (MeansKind::CreditCard, 0))).await;
    // Item IDs are bounded as a basket's are (1..=32 bytes of 0x21-0x7E): the redemption lists
    // them back, and 256 lines of 255-byte IDs would not fit one frame.
    let too_long = "I".repeat(ITEM_ID_LEN_MAX + 1);
    for bad in ["", "ITEM 1", "ITEM\u{e9}", too_long.as_str()] {
        let mut request = redeem(&code, 2_000, "POS-A");
        request.lines = SaleLines::Items(vec![("ITEM-0".into(), 1, 1_000), (bad.into(), 1, 1_000)]);
        assert_eq!(
            refusal(h.engine.redeem_code(request).await),
            ReasonCode::CodeMismatch,
            "{bad:?}"
        );
    }
    assert_eq!(h.engine.code_state(code.number).await.unwrap(), CodeState::Issued);
    // At the limit it redeems.
    let longest = "I".repeat(ITEM_ID_LEN_MAX);
    let mut request = redeem(&code, 2_000, "POS-A");
    request.lines = SaleLines::Items(vec![(longest.clone(), 2, 1_000)]);
    let redemption = h.engine.redeem_code(request).await.unwrap();
    assert_eq!(redemption.items, vec![(longest, 2, 1_000)]);
}

#[tokio::test]
async fn expired_forged_and_altered_codes_are_refused() {
    let h = Harness::new();
    let carol = h.user("carol").await;
    let code = issue(&h, code_request(&h, &carol, 2_000, (MeansKind::CreditCard, 0))).await;
    // Forged: a well-formed code tagged with another key.
    let forged = CodePayload {
        kind: CodeKind::Payment,
        issuer: 1,
        number: code.number,
        value: 2_000,
        currency: jpy(),
        expires_s: (code.expires_ms / 1000) as u32,
        flags: 0,
    }
    .seal(&CodeKey::derive(&[0x42; 32]));
    let mut request = redeem(&code, 2_000, "POS-A");
    request.code = forged;
    assert_eq!(refusal(h.engine.redeem_code(request).await), ReasonCode::ForgedCode);
    // Altered: one character of the amount's encoding changed.
    let mut altered = code.text.clone().into_bytes();
    altered[20] = if altered[20] == b'A' { b'B' } else { b'A' };
    let mut request = redeem(&code, 2_000, "POS-A");
    request.code = String::from_utf8(altered).unwrap();
    assert_eq!(refusal(h.engine.redeem_code(request).await), ReasonCode::ForgedCode);
    // Not what the POS expects (another issue number printed beside it).
    let mut request = redeem(&code, 2_000, "POS-A");
    request.number += 1;
    assert_eq!(refusal(h.engine.redeem_code(request).await), ReasonCode::CodeMismatch);
    // Expired: the clock passes its expiry.
    h.clock.advance(11 * MINUTE_MS);
    let expired = h.engine.redeem_code(redeem(&code, 2_000, "POS-A")).await;
    assert_eq!(refusal(expired), ReasonCode::CodeExpired);
    assert_eq!(h.engine.code_state(code.number).await.unwrap(), CodeState::Expired);
}

#[tokio::test]
async fn the_sweeper_releases_expired_holds_which_never_count_after_expiry() {
    let h = Harness::new();
    let dan = purse_user(&h, "dan", 3_000).await;
    let code = issue(&h, code_request(&h, &dan, 2_000, (MeansKind::EMoney, 2))).await;
    assert_eq!(available(&h, &dan).await, (3_000, 1_000));
    // Not enough left for another code of 2,000 while the first one's hold stands.
    let second = h.engine.issue_code(code_request(&h, &dan, 2_000, (MeansKind::EMoney, 2))).await;
    assert_eq!(second.unwrap(), CodeOutcome::Declined(ReasonCode::InsufficientBalance));
    h.clock.advance(10 * MINUTE_MS + 1);
    // Past its expiry the hold counts for nothing, before any sweep.
    assert_eq!(available(&h, &dan).await, (3_000, 3_000));
    assert_eq!(h.engine.code_state(code.number).await.unwrap(), CodeState::Issued);
    assert_eq!(h.engine.sweep_codes().await.unwrap(), 1);
    assert_eq!(h.engine.code_state(code.number).await.unwrap(), CodeState::Expired);
    assert_eq!(h.engine.sweep_codes().await.unwrap(), 0, "swept once");
    assert_eq!(available(&h, &dan).await, (3_000, 3_000));
}

/// A sweep with nothing due changes nothing and is not logged: an idle shard writes (and
/// syncs) nothing however often the server sweeps. One that expires a code is logged, and the
/// expiry is there after a restart (whose clock has not reached it).
#[tokio::test]
async fn a_sweep_is_logged_only_when_it_has_something_to_do() {
    let dir = tempfile::tempdir().unwrap();
    let durable = || {
        let mut config = config();
        config.durability.data_dir = Some(dir.path().to_owned());
        config.durability.fsync = settlegate_engine::wal::FsyncPolicy::Always;
        Harness::with_config(config)
    };
    let logged = |h: &Harness| -> u64 {
        (0..h.engine.shard_count())
            .map(|shard| settlegate_engine::wal::shard_log_path(dir.path(), shard))
            .map(|log| std::fs::metadata(log).unwrap().len())
            .sum()
    };
    let h = durable();
    let dan = purse_user(&h, "dan", 3_000).await;
    let code = issue(&h, code_request(&h, &dan, 2_000, (MeansKind::EMoney, 2))).await;
    let before = logged(&h);
    for _ in 0..3 {
        assert_eq!(h.engine.sweep_codes().await.unwrap(), 0);
    }
    assert_eq!(logged(&h), before, "nothing due, nothing logged");
    h.clock.advance(10 * MINUTE_MS + 1);
    assert_eq!(h.engine.sweep_codes().await.unwrap(), 1);
    assert!(logged(&h) > before, "the expiry logged");
    h.engine.shutdown().await;
    drop(h);

    let h = durable();
    assert_eq!(h.engine.code_state(code.number).await.unwrap(), CodeState::Expired);
    assert_eq!(available(&h, &dan).await, (3_000, 3_000), "its hold released");
}

#[tokio::test]
async fn a_code_reaches_the_device_the_user_designates() {
    a_code_reaches_the_device_the_user_designates_with(0).await;
}

/// The same, with a provider that answers later: the code is issued by a second trip through
/// the shard instead of in the reserving step.
#[tokio::test]
async fn a_code_reaches_the_device_the_user_designates_when_the_provider_answers_later() {
    a_code_reaches_the_device_the_user_designates_with(300).await;
}

async fn a_code_reaches_the_device_the_user_designates_with(provider_latency_us: u64) {
    let h = Harness::with_config(config_answering_after(provider_latency_us));
    let erin = h.user("erin").await;
    let watch = fresh_idm();
    h.engine.provision_device(request_id(), &erin.user, PASSWORD, watch).await.unwrap();
    let mut watch_stream = h.engine.subscribe_device(watch);
    let mut phone_stream = h.engine.subscribe_device(erin.credential.card_idm);
    let mut request = code_request(&h, &erin, 1_500, (MeansKind::CreditCard, 0));
    request.deliver_to = Some(watch);
    let code = issue(&h, request).await;
    assert_eq!(code.deliver_to, watch);
    assert_eq!(watch_stream.try_recv().unwrap(), DeviceMessage::Code(code));
    assert!(phone_stream.try_recv().is_err(), "the requesting phone gets nothing");
    // Another user's device cannot be designated.
    let frank = h.user("frank").await;
    let mut request = code_request(&h, &erin, 1_500, (MeansKind::CreditCard, 0));
    request.deliver_to = Some(frank.credential.card_idm);
    let outcome = h.engine.issue_code(request).await.unwrap();
    assert_eq!(outcome, CodeOutcome::Declined(ReasonCode::UserDeviceMismatch));
}

#[tokio::test]
async fn cash_on_delivery_end_to_end() {
    let h = Harness::new();
    let gina = h.user("gina").await;
    let mut phone = h.engine.subscribe_device(gina.credential.card_idm);
    // The merchant's notice reaches the user.
    let notice = DeliveryNotice {
        user: gina.user.clone(),
        order_ref: "ORDER-7731".into(),
        amount_minor: 4_980,
        currency: jpy(),
        merchant: "Demo Books".into(),
    };
    assert_eq!(h.engine.notify_delivery(request_id(), notice.clone()).await.unwrap(), 1);
    assert_eq!(phone.try_recv().unwrap(), DeviceMessage::Delivery(notice));
    // The user authorizes and receives a code for that order.
    let mut request = code_request(&h, &gina, 4_980, (MeansKind::CreditCard, 0));
    request.order_ref = "ORDER-7731".into();
    let code = issue(&h, request).await;
    assert!(matches!(phone.try_recv().unwrap(), DeviceMessage::Code(_)));
    // The courier's handheld must present the same order.
    let mut wrong = redeem(&code, 4_980, "COURIER-9");
    wrong.order_ref = "ORDER-0000".into();
    assert_eq!(refusal(h.engine.redeem_code(wrong).await), ReasonCode::CodeMismatch);
    let redemption = h.engine.redeem_code(redeem(&code, 4_980, "COURIER-9")).await.unwrap();
    assert_eq!(redemption.terminal_id, "COURIER-9");
    assert_eq!(redemption.captured_minor, 4_980);
}

#[tokio::test]
async fn a_coupon_applies_then_is_refused_when_used_up() {
    let h = Harness::new();
    let hana = h.user("hana").await;
    let effect = CouponEffect::Fixed { amount_minor: 300, currency: jpy() };
    let expires = T0_MS + 86_400_000;
    let issued = h
        .engine
        .issue_coupons(
            request_id(),
            ProviderCode(PROVIDER_OK),
            vec![hana.user.clone()],
            effect,
            1,
            expires,
        )
        .await;
    let coupon = issued.into_iter().next().unwrap().unwrap();
    let first = issue(&h, code_request(&h, &hana, 2_000, (MeansKind::CreditCard, 0))).await;
    let mut with_coupon = redeem(&first, 2_000, "POS-A");
    with_coupon.coupon = Some(coupon.text.clone());
    let redemption = h.engine.redeem_code(with_coupon).await.unwrap();
    assert_eq!(redemption.coupon_discount_minor, 300);
    assert_eq!(redemption.captured_minor, 1_700);
    let second = issue(&h, code_request(&h, &hana, 2_000, (MeansKind::CreditCard, 0))).await;
    let mut again = redeem(&second, 2_000, "POS-A");
    again.coupon = Some(coupon.text);
    assert_eq!(refusal(h.engine.redeem_code(again).await), ReasonCode::CouponUsedUp);
    assert_eq!(h.engine.code_state(second.number).await.unwrap(), CodeState::Issued);
    // A percent coupon, used twice out of three.
    let percent = CouponEffect::Percent { bps: 1_000 };
    let issued = h
        .engine
        .issue_coupons(
            request_id(),
            ProviderCode(PROVIDER_OK),
            vec![hana.user.clone()],
            percent,
            3,
            expires,
        )
        .await;
    let coupon = issued.into_iter().next().unwrap().unwrap();
    let mut with_percent = redeem(&second, 2_000, "POS-A");
    with_percent.coupon = Some(coupon.text);
    assert_eq!(h.engine.redeem_code(with_percent).await.unwrap().captured_minor, 1_800);
}

#[tokio::test]
async fn the_second_tier_permits_what_it_issued_and_refuses_the_rest() {
    let h = Harness::new();
    let ivy = h.user("ivy").await;
    let code = issue(&h, code_request(&h, &ivy, 800, (MeansKind::CreditCard, 0))).await;
    // The first tier routes by the issue number's top byte to the shard that issued it.
    let shard = settlegate_engine::codes::shard_of_number(code.number);
    assert!(shard < h.engine.shard_count());
    let permitted = h.engine.redeem_code(redeem(&code, 800, "POS-A")).await.unwrap();
    assert_eq!(permitted.number, code.number);
    // A correctly tagged code that the second tier never issued (same engine key, a number
    // in another shard's range that no one used) is refused there.
    let key = CodeKey::derive(&[0x11; 32]);
    let unknown_number = issue_number(((shard + 1) % h.engine.shard_count()) as u8, 9_999);
    let never_issued = CodePayload {
        kind: CodeKind::Payment,
        issuer: 1,
        number: unknown_number,
        value: 800,
        currency: jpy(),
        expires_s: (code.expires_ms / 1000) as u32,
        flags: 0,
    }
    .seal(&key);
    let mut request = redeem(&code, 800, "POS-A");
    request.code = never_issued;
    request.number = unknown_number;
    assert_eq!(refusal(h.engine.redeem_code(request).await), ReasonCode::UnknownCode);
}

#[tokio::test]
async fn codes_survive_a_restart() {
    for snapshot_every_records in [0, 3] {
        let dir = tempfile::tempdir().unwrap();
        let durable = || durable_config(dir.path(), snapshot_every_records);
        let h = Harness::with_config(durable());
        let user = purse_user(&h, "jo", 9_000).await;
        let redeemed = issue(&h, code_request(&h, &user, 2_000, (MeansKind::EMoney, 2))).await;
        let held = issue(&h, code_request(&h, &user, 3_000, (MeansKind::EMoney, 2))).await;
        let effect = CouponEffect::OrderCode;
        let coupons = h
            .engine
            .issue_coupons(
                request_id(),
                ProviderCode(PROVIDER_OK),
                vec![user.user.clone()],
                effect,
                2,
                T0_MS + 86_400_000,
            )
            .await;
        let coupon = coupons.into_iter().next().unwrap().unwrap();
        let request = redeem(&redeemed, 1_500, "POS-A");
        let first = h.engine.redeem_code(request.clone()).await.unwrap();
        h.engine.shutdown().await;
        drop(h);

        let h = Harness::with_config(durable());
        // The retry gets the first answer; a new attempt finds it redeemed.
        assert_eq!(h.engine.redeem_code(request).await.unwrap(), first);
        let again = h.engine.redeem_code(redeem(&redeemed, 1_500, "POS-B")).await;
        assert_eq!(refusal(again), ReasonCode::CodeRedeemed);
        // The other code's hold stands and it can still be redeemed, with the coupon.
        assert_eq!(
            available(&h, &user).await,
            (7_500, 4_500),
            "snapshots: {snapshot_every_records}"
        );
        let mut with_coupon = redeem(&held, 3_000, "POS-A");
        with_coupon.coupon = Some(coupon.text);
        assert_eq!(h.engine.redeem_code(with_coupon).await.unwrap().captured_minor, 3_000);
        assert_eq!(available(&h, &user).await, (4_500, 4_500));
        h.engine.shutdown().await;
    }
}

#[derive(Debug, Clone)]
enum CodeOp {
    Issue { amount: u64 },
    Redeem { code: usize, amount: u64, twice: bool },
    Advance { minutes: i64 },
    Sweep,
}

fn code_op() -> impl Strategy<Value = CodeOp> {
    prop_oneof![
        3 => (1u64..3_000).prop_map(|amount| CodeOp::Issue { amount }),
        4 => (0usize..8, 1u64..3_500, any::<bool>())
            .prop_map(|(code, amount, twice)| CodeOp::Redeem { code, amount, twice }),
        2 => (1i64..8).prop_map(|minutes| CodeOp::Advance { minutes }),
        1 => Just(CodeOp::Sweep),
    ]
}

/// Random interleavings of issue, redeem (sometimes two at once), expiry and sweep: no code
/// is redeemed twice, a redemption captures exactly the amount the POS asked (and releases the
/// rest of the hold, nothing more), and the purse always adds up.
async fn run_codes(ops: Vec<CodeOp>, provider_latency_us: u64) -> Result<(), TestCaseError> {
    let h = Harness::with_config(config_answering_after(provider_latency_us));
    let user = purse_user(&h, "prop", 20_000).await;
    let mut codes: Vec<IssuedCode> = Vec::new();
    let mut wins = std::collections::HashMap::<u64, u32>::new();
    // The amount each winning redemption asked to capture, by issue number.
    let mut asked = std::collections::HashMap::<u64, u64>::new();
    for op in ops {
        match op {
            CodeOp::Issue { amount } => {
                let mut request = code_request(&h, &user, amount, (MeansKind::EMoney, 2));
                request.validity_ms = 5 * MINUTE_MS;
                if let CodeOutcome::Issued(code) = h.engine.issue_code(request).await.unwrap() {
                    codes.push(*code);
                }
            }
            CodeOp::Redeem { code, amount, twice } => {
                let Some(code) = codes.get(code % codes.len().max(1)) else { continue };
                let attempts = if twice { 2 } else { 1 };
                let results = futures::future::join_all(
                    (0..attempts).map(|_| h.engine.redeem_code(redeem(code, amount, "POS-P"))),
                )
                .await;
                for result in results {
                    match result {
                        Ok(r) => {
                            prop_assert_eq!(r.captured_minor, amount, "captured what was asked");
                            prop_assert_eq!(r.captured_minor + r.released_minor, code.amount_minor);
                            *wins.entry(code.number).or_default() += 1;
                            asked.insert(code.number, amount);
                        }
                        Err(EngineError::Refused(_)) => {}
                        Err(other) => return Err(TestCaseError::fail(format!("{other:?}"))),
                    }
                }
            }
            CodeOp::Advance { minutes } => h.clock.advance(minutes * MINUTE_MS),
            CodeOp::Sweep => {
                h.engine.sweep_codes().await.unwrap();
            }
        }
    }
    let mut captured = 0;
    let mut still_held = 0;
    let now = h.engine.now_ms();
    for code in &codes {
        let state = h.engine.code_state(code.number).await.unwrap();
        let won = wins.get(&code.number).copied().unwrap_or(0);
        prop_assert!(won <= 1, "code {} redeemed {won} times", code.number);
        match state {
            CodeState::Redeemed(r) => {
                prop_assert_eq!(won, 1);
                prop_assert_eq!(Some(r.captured_minor), asked.get(&code.number).copied());
                captured += r.captured_minor;
            }
            CodeState::Expired | CodeState::Voided => prop_assert_eq!(won, 0),
            CodeState::Issued => {
                prop_assert_eq!(won, 0);
                if code.expires_ms > now {
                    still_held += code.amount_minor;
                }
            }
        }
    }
    let (balance, available) = available(&h, &user).await;
    prop_assert_eq!(balance, 20_000 - captured, "every capture debited once");
    prop_assert_eq!(available, balance - still_held, "holds: only live codes'");
    h.engine.shutdown().await;
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn codes_are_redeemed_at_most_once_and_holds_settle_once(
        ops in prop::collection::vec(code_op(), 1..40),
        provider_latency_us in prop_oneof![Just(0u64), Just(200u64)],
    ) {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        runtime.block_on(run_codes(ops, provider_latency_us))?;
    }
}

/// A refund of what a purse the engine keeps paid, a settled payment's or a redeemed code's,
/// is credited back to that purse as it is owed to the provider; a retry credits nothing more.
#[tokio::test]
async fn a_refund_goes_back_to_the_purse_it_was_paid_from() {
    let h = Harness::new();
    let payer = purse_user(&h, "purse-refund", 10_000).await;

    // A payment of 3,000 from the purse, settled at once.
    let mut record = payer.record(h.engine.now_ms(), 3_000, PROVIDER_OK, "POS-1");
    record.means = MeansKind::EMoney;
    record.means_id = 2;
    let payment_id = request_id();
    let outcome = h
        .engine
        .authorize(settlegate_engine::AuthorizeRequest {
            client_request_id: payment_id,
            inherent_id: record.sign(payer.credential.device_key.expose()),
        })
        .await
        .unwrap();
    approved(outcome);
    assert_eq!(available(&h, &payer).await, (7_000, 7_000));
    let refund_id = request_id();
    let refund =
        || h.engine.refund_payment(refund_id, &payer.user, payment_id.get(), 1_200, "POS-1".into());
    refund().await.unwrap();
    assert_eq!(available(&h, &payer).await, (8_200, 8_200));
    refund().await.unwrap();
    assert_eq!(available(&h, &payer).await, (8_200, 8_200), "a retry credits nothing more");

    // A code of 2,000 paid from the purse, redeemed for all of it, then refunded in part.
    let code = issue(&h, code_request(&h, &payer, 2_000, (MeansKind::EMoney, 2))).await;
    h.engine.redeem_code(redeem(&code, 2_000, "POS-1")).await.unwrap();
    assert_eq!(available(&h, &payer).await, (6_200, 6_200));
    h.engine.refund_code(request_id(), code.number, 500, "POS-1".into()).await.unwrap();
    assert_eq!(available(&h, &payer).await, (6_700, 6_700));

    // A card's payment refunded: no purse moves.
    let card_id = request_id();
    let card = payer.signed(h.engine.now_ms(), 1_000, PROVIDER_OK, "POS-1");
    let request =
        settlegate_engine::AuthorizeRequest { client_request_id: card_id, inherent_id: card };
    approved(h.engine.authorize(request).await.unwrap());
    h.engine
        .refund_payment(request_id(), &payer.user, card_id.get(), 1_000, "POS-1".into())
        .await
        .unwrap();
    assert_eq!(available(&h, &payer).await, (6_700, 6_700));
}
