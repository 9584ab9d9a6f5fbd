//! `REFUND` of a settled payment (target 2) over TCP, against the in-process server: a payment
//! `AUTHORIZE` settled at once is named by its user and its client request ID, refunded in
//! parts up to its amount, and refused past it, for another terminal, or when unknown.

use settlegate_engine::{AuthOutcome, ReasonCode};
use settlegate_protocol::messages::{Reply, Request, Response};
use settlegate_protocol::ops::refund::{Refund, Refunded};
use settlegate_protocol::ops::void::{Target, Void};
use settlegate_protocol::Client;

use crate::support::server::{client, enroll, identity, server_config, start_with, TERMINAL_KEY};
use crate::support::{request_id, PROVIDER_OK};

/// An identity that acts for the terminals `SHOP-B-*` only.
const SHOP_B_KEY: &str = "test-shop-b-key";

fn refund(target: Target, id: u128, amount_minor: u64, terminal: &str) -> Request {
    Request::Refund(Refund {
        client_request_id: id,
        target,
        amount_minor,
        terminal_id: terminal.into(),
    })
}

async fn refunded(client: &Client, request: &Request) -> Response {
    client.call(request).await.expect("answered")
}

fn ok(amount_minor: u64, refunded_minor: u64, captured_minor: u64) -> Response {
    Response::Ok(Reply::Refund(Refunded { amount_minor, refunded_minor, captured_minor }))
}

#[tokio::test]
async fn a_settled_payment_is_refunded_in_parts_up_to_its_amount_and_no_further() {
    let mut config = server_config();
    let shop_b = identity("shop-b", SHOP_B_KEY, &["authorize"], &["SHOP-B-*"], &[]);
    config.server.identities.push(shop_b);
    let server = start_with(config).await;
    let admin = client(&server, crate::support::server::ADMIN_KEY).await;
    let mut payer = enroll(&admin, "refund-settled").await;
    let shop_a = client(&server, TERMINAL_KEY).await;

    // A payment of 1,000 at SHOP-A-1, settled at once by the simulated provider.
    let payment_id = request_id().get();
    let approved = shop_a.authorize(payment_id, payer.sign(1_000, PROVIDER_OK, "SHOP-A-1")).await;
    assert!(matches!(approved.unwrap(), AuthOutcome::Approved(_)));
    let user = payer.user.clone();
    let payment = || Target::Payment { user: user.clone(), payment_request_id: payment_id };

    // A partial refund, and its retry: answered the same, refunding nothing more.
    let first = refund(payment(), request_id().get(), 400, "SHOP-A-1");
    assert_eq!(refunded(&shop_a, &first).await, ok(400, 400, 1_000));
    assert_eq!(refunded(&shop_a, &first).await, ok(400, 400, 1_000));
    // The same ID with another amount is a conflict.
    let Request::Refund(mut conflicting) = first.clone() else { unreachable!() };
    conflicting.amount_minor = 401;
    let conflict = refunded(&shop_a, &Request::Refund(conflicting)).await;
    assert_eq!(conflict, Response::Refused(ReasonCode::IdempotencyConflict));

    // Past the amount captured: refused, and nothing changes.
    let past = refund(payment(), request_id().get(), 601, "SHOP-A-1");
    assert_eq!(refunded(&shop_a, &past).await, Response::Refused(ReasonCode::RefundAboveCaptured));
    let zero = refund(payment(), request_id().get(), 0, "SHOP-A-1");
    assert_eq!(refunded(&shop_a, &zero).await, Response::Refused(ReasonCode::RefundAboveCaptured));
    let rest = refund(payment(), request_id().get(), 600, "SHOP-A-1");
    assert_eq!(refunded(&shop_a, &rest).await, ok(600, 1_000, 1_000));
    let more = refund(payment(), request_id().get(), 1, "SHOP-A-1");
    assert_eq!(refunded(&shop_a, &more).await, Response::Refused(ReasonCode::RefundAboveCaptured));
    // The first one's retry still answers as the first time.
    assert_eq!(refunded(&shop_a, &first).await, ok(400, 400, 1_000));

    // Another terminal's identity, naming its own terminal: not found, as an unknown payment.
    let shop_b = client(&server, SHOP_B_KEY).await;
    let other = refund(payment(), request_id().get(), 1, "SHOP-B-1");
    let unknown = Response::Refused(ReasonCode::UnknownPayment);
    assert_eq!(refunded(&shop_b, &other).await, unknown);
    // Naming the payment's terminal, which it may not act for: forbidden, before any lookup.
    let foreign = refund(payment(), request_id().get(), 1, "SHOP-A-1");
    assert!(matches!(refunded(&shop_b, &foreign).await, Response::Forbidden(_)));

    // An unknown payment: another request ID, or another user.
    let stranger = Target::Payment { user: payer.user.clone(), payment_request_id: 7 };
    let request = refund(stranger, request_id().get(), 1, "SHOP-A-1");
    assert_eq!(refunded(&shop_a, &request).await, unknown);
    let other_user = enroll(&admin, "refund-settled-other").await.user;
    let request = refund(
        Target::Payment { user: other_user, payment_request_id: payment_id },
        request_id().get(),
        1,
        "SHOP-A-1",
    );
    assert_eq!(refunded(&shop_a, &request).await, unknown);

    // A declined payment (above the simulator's limit) settled nothing: not found either.
    let declined_id = request_id().get();
    let over = payer.sign(crate::support::APPROVE_LIMIT + 1, PROVIDER_OK, "SHOP-A-1");
    let declined = shop_a.authorize(declined_id, over).await.unwrap();
    assert!(matches!(declined, AuthOutcome::Declined(_)), "{declined:?}");
    let target = Target::Payment { user: payer.user.clone(), payment_request_id: declined_id };
    let request = refund(target, request_id().get(), 1, "SHOP-A-1");
    assert_eq!(refunded(&shop_a, &request).await, unknown);

    // A bad terminal ID: reason 60, as for a code.
    let bad = refund(payment(), request_id().get(), 1, "SHOP-A-\u{e9}");
    let answer = refunded(&admin, &bad).await;
    assert_eq!(answer, Response::Refused(ReasonCode::InvalidTerminal));

    // A settled payment cannot be voided: a `VOID` naming one does not parse.
    let void = Request::Void(Void {
        client_request_id: request_id().get(),
        target: payment(),
        terminal_id: "SHOP-A-1".into(),
    });
    assert!(matches!(refunded(&shop_a, &void).await, Response::BadRequest(_)));
}
