//! Strictness of the body decoders: where `docs/PROTOCOL.md` says a field is zeros (an absent
//! optional field's placeholder, padding) or names its only value, any other bytes are refused,
//! so that every body that decodes re-encodes to the same bytes. Each test is a body a fuzz
//! target (`fuzz/`, `docs/TESTING.md`) or the decoder audit found accepted, kept as it was
//! found.

use settlegate_protocol::messages::{opcode, status, Request, Response};
use settlegate_protocol::ops::void::Target;
use settlegate_protocol::DecodeError;

/// Parses space-separated hex.
fn hex(text: &str) -> Vec<u8> {
    text.split_whitespace().map(|pair| u8::from_str_radix(pair, 16).unwrap()).collect()
}

/// `body` decodes as a request of `opcode` and re-encodes to itself.
fn request_round_trips(opcode: u16, body: &[u8]) {
    let request = Request::decode(opcode, body).expect("the canonical body decodes");
    assert_eq!(request.opcode(), opcode);
    assert_eq!(request.to_frame(1).body, body, "re-encodes to the same bytes");
}

/// `body` is refused as a request of `opcode`, naming `field`.
fn request_refused(opcode: u16, body: &[u8], field: &str) {
    match Request::decode(opcode, body) {
        Err(DecodeError::Body(error)) => {
            assert!(error.to_string().contains(field), "{error} does not name {field}")
        }
        other => panic!("expected a body error naming {field}, got {other:?}"),
    }
}

/// `body` decodes as an `OK` response to `opcode` and re-encodes to itself.
fn response_round_trips(opcode: u16, body: &[u8]) {
    let response = Response::decode(opcode, status::OK, body).expect("the canonical body decodes");
    assert_eq!(response.encode(), (status::OK, body.to_vec()), "re-encodes to the same bytes");
}

/// `body` is refused as an `OK` response to `opcode`, naming `field`.
fn response_refused(opcode: u16, body: &[u8], field: &str) {
    match Response::decode(opcode, status::OK, body) {
        Err(error) => assert!(error.to_string().contains(field), "{error} does not name {field}"),
        Ok(response) => panic!("expected an error naming {field}, got {response:?}"),
    }
}

/// Issue #25: `ISSUE_CODE` with `has_deliver_to` 0 accepted non-zero `deliver_to` bytes (the
/// spec says zeros) and re-encoded them as zeros.
#[test]
fn issue_code_deliver_to_must_be_zeros_without_has_deliver_to() {
    let body = |has: u8, idm: &str| {
        hex(&format!(
            "00 00 00 00 00 00 00 00 00 00 00 00 00 00 00 07 \
             00 00 \
             00 00 02 58 \
             {has:02x} {idm} \
             00"
        ))
    };
    request_round_trips(opcode::ISSUE_CODE, &body(0, "00 00 00 00 00 00 00 00"));
    request_round_trips(opcode::ISSUE_CODE, &body(1, "01 2e 00 00 00 00 00 02"));
    request_refused(opcode::ISSUE_CODE, &body(0, "01 2e 00 00 00 00 00 02"), "deliver_to");
    request_refused(opcode::ISSUE_CODE, &body(0, "00 00 00 00 00 00 00 01"), "deliver_to");
}

/// `ISSUE_COUPONS`: a percent coupon's currency is `XXX`, and an order code's value and
/// currency are 0 and `XXX`; other bytes there were accepted and re-encoded as `XXX` and 0.
#[test]
fn issue_coupons_percent_and_order_code_carry_their_fixed_value_and_currency() {
    let body = |kind: u8, value: u64, currency: &str| {
        let mut body = vec![0u8; 15];
        body.push(9); // client request ID 9
        body.extend_from_slice(&1u32.to_be_bytes()); // provider 1
        body.push(kind);
        body.extend_from_slice(&value.to_be_bytes());
        body.extend_from_slice(currency.as_bytes());
        body.extend_from_slice(&1u32.to_be_bytes()); // uses
        body.extend_from_slice(&1_900_000_000_000i64.to_be_bytes()); // expires_ms
        body.extend_from_slice(&1u16.to_be_bytes()); // one user
        body.extend_from_slice(&[2, 4]);
        body.extend_from_slice(b"1234"); // inherent number 1234
        body
    };
    request_round_trips(opcode::ISSUE_COUPONS, &body(1, 500, "XXX"));
    request_round_trips(opcode::ISSUE_COUPONS, &body(2, 300, "JPY"));
    request_round_trips(opcode::ISSUE_COUPONS, &body(3, 0, "XXX"));
    request_refused(opcode::ISSUE_COUPONS, &body(1, 500, "JPY"), "currency");
    request_refused(opcode::ISSUE_COUPONS, &body(3, 0, "JPY"), "order code");
    request_refused(opcode::ISSUE_COUPONS, &body(3, 1, "XXX"), "order code");
}

/// A `LIST_MEANS` entry without a last use (`has_last_used` 0) carries `last_used_ms` 0.
#[test]
fn list_means_last_used_must_be_zero_without_has_last_used() {
    let body = |has: u8, last_used: i64| {
        let mut body = vec![1]; // one means
        body.extend_from_slice(&3u32.to_be_bytes());
        body.extend_from_slice(&[2, 0]); // e-money, not the default
        body.extend_from_slice(&[5]);
        body.extend_from_slice(b"Suica");
        body.push(0); // no last four
        body.extend_from_slice(&[0; 16]); // no token
        body.extend_from_slice(&0u64.to_be_bytes()); // uses
        body.push(has);
        body.extend_from_slice(&last_used.to_be_bytes());
        body.extend_from_slice(&1_795_305_600_000i64.to_be_bytes()); // registered_ms
        body
    };
    response_round_trips(opcode::LIST_MEANS, &body(0, 0));
    response_round_trips(opcode::LIST_MEANS, &body(1, 0));
    response_round_trips(opcode::LIST_MEANS, &body(1, 1_795_305_700_000));
    response_refused(opcode::LIST_MEANS, &body(0, 1_795_305_700_000), "last_used_ms");
}

/// A `wallet_entry` without a balance (`has_balance` 0) carries zeros in its balance fields.
#[test]
fn wallet_balance_must_be_zeros_without_has_balance() {
    let body = |has: u8, balance: u64, available: u64, currency: [u8; 3]| {
        let mut body = vec![1]; // one means
        body.extend_from_slice(&1u32.to_be_bytes());
        body.extend_from_slice(&[1, 1]); // card, the default
        body.extend_from_slice(&[13]);
        body.extend_from_slice(b"visa ****1111");
        body.extend_from_slice(&[4]);
        body.extend_from_slice(b"1111");
        body.extend_from_slice(&[7; 16]); // a token
        body.extend_from_slice(&2u64.to_be_bytes()); // uses
        body.push(0);
        body.extend_from_slice(&0i64.to_be_bytes());
        body.extend_from_slice(&1_795_305_600_000i64.to_be_bytes());
        body.push(has);
        body.extend_from_slice(&balance.to_be_bytes());
        body.extend_from_slice(&available.to_be_bytes());
        body.extend_from_slice(&currency);
        body
    };
    response_round_trips(opcode::WALLET, &body(0, 0, 0, [0; 3]));
    response_round_trips(opcode::WALLET, &body(1, 500, 400, *b"JPY"));
    response_round_trips(opcode::WALLET, &body(1, 0, 0, [0; 3]));
    response_refused(opcode::WALLET, &body(0, 500, 0, [0; 3]), "balance");
    response_refused(opcode::WALLET, &body(0, 0, 400, [0; 3]), "balance");
    response_refused(opcode::WALLET, &body(0, 0, 0, *b"JPY"), "balance");
}

/// `USABLE_METHODS`: `best_means_id` is 0 when `has_best` is 0.
#[test]
fn usable_methods_best_must_be_zero_without_has_best() {
    let body = |has: u8, best: u32| {
        let mut body = vec![4];
        body.extend_from_slice(b"S-01");
        body.push(0); // no methods
        body.push(has);
        body.extend_from_slice(&best.to_be_bytes());
        body.push(0); // no accepted methods
        body
    };
    response_round_trips(opcode::USABLE_METHODS, &body(0, 0));
    response_round_trips(opcode::USABLE_METHODS, &body(1, 3));
    response_refused(opcode::USABLE_METHODS, &body(0, 3), "best_means_id");
}

/// `STORE_AT`'s `entered`: `distance_mm` is 0 when `has_distance` is 0.
#[test]
fn entered_distance_must_be_zero_without_has_distance() {
    let body = |has: u8, distance_mm: u64| {
        let mut body = vec![4];
        body.extend_from_slice(b"S-01");
        body.push(1);
        body.extend_from_slice(b"N");
        body.extend_from_slice(&[0, 0]); // no industry, no address
        body.extend_from_slice(&356_590_500i32.to_be_bytes());
        body.extend_from_slice(&1_397_006_300i32.to_be_bytes());
        body.extend_from_slice(&[0, 0, 0, 0, 0]); // no beacons, Wi-Fi, poster, methods
        body.push(has);
        body.extend_from_slice(&distance_mm.to_be_bytes());
        body.extend_from_slice(&[0, 0]); // no ties, no networks
        body
    };
    response_round_trips(opcode::STORE_AT, &body(1, 51_234));
    response_round_trips(opcode::STORE_BY_SIGNAL, &body(0, 0));
    response_refused(opcode::STORE_BY_SIGNAL, &body(0, 51_234), "distance_mm");
}

/// Found by `response_body` (minimized input `7a 00`, then this body: `STORE_AT`, status OK):
/// a `distance_mm` of about 3.7 * 10^18 decoded, and came back another number from its trip
/// through metres as `f64`. No distance on the sphere is above `DISTANCE_MM_MAX`.
#[test]
fn entered_distance_is_at_most_half_the_circumference() {
    let found = "01 00 00 01 00 00 00 72 00 01 00 00 00 00 01 00                  00 00 00 00 01 33 5b 00 00 33 00 00 5d 00 00";
    response_refused(opcode::STORE_AT, &hex(found), "distance_mm");
    let with_distance = |mm: u64| {
        let mut body = hex(found);
        body[21..29].copy_from_slice(&mm.to_be_bytes());
        body
    };
    let max = settlegate_protocol::messages::DISTANCE_MM_MAX;
    response_round_trips(opcode::STORE_AT, &with_distance(max));
    response_round_trips(opcode::STORE_AT, &with_distance(12_345_678_901));
    response_refused(opcode::STORE_AT, &with_distance(max + 1), "distance_mm");
}

/// `CONFIRM_TERMINAL`: a terminal that is not listed has no service; a service after
/// `listed` 0 was accepted and dropped.
#[test]
fn confirm_terminal_not_listed_has_no_service() {
    let service = "01 01 01 f4 \
                   00 00 00 00 00 00 00 00 \
                   7f ff ff ff ff ff ff ff \
                   00";
    response_round_trips(opcode::CONFIRM_TERMINAL, &hex("00 00"));
    response_round_trips(opcode::CONFIRM_TERMINAL, &hex("01 00"));
    response_round_trips(opcode::CONFIRM_TERMINAL, &hex(&format!("01 {service}")));
    response_refused(opcode::CONFIRM_TERMINAL, &hex(&format!("00 {service}")), "has_service");
}

/// `VOID` and `REFUND`: their bodies and answers round-trip; a target other than 1 (a payment
/// code) or, for `REFUND`, 2 (a settled payment), a truncated body and trailing bytes are
/// refused.
#[test]
fn void_and_refund_bodies_round_trip_and_name_a_code() {
    let id = "00 00 00 00 00 00 00 00 00 00 00 00 00 00 00 07";
    let number = "01 00 00 00 00 00 00 2a";
    let void = |target: &str| hex(&format!("{id} {target} {number} 05 50 4f 53 2d 31"));
    request_round_trips(opcode::VOID, &void("01"));
    request_refused(opcode::VOID, &void("02"), "target");
    request_refused(opcode::VOID, &void("01")[..20], "number");
    let mut trailing = void("01");
    trailing.push(0);
    assert!(Request::decode(opcode::VOID, &trailing).is_err(), "trailing bytes are refused");
    let refund = |target: &str| {
        hex(&format!("{id} {target} {number} 00 00 00 00 00 00 01 90 05 50 4f 53 2d 31"))
    };
    request_round_trips(opcode::REFUND, &refund("01"));
    request_refused(opcode::REFUND, &refund("00"), "target");
    request_refused(opcode::REFUND, &refund("01")[..30], "amount_minor");
    // Target 2, a settled payment: a user (mail `a@b.c`) and its payment's request ID.
    let user = "01 05 61 40 62 2e 63";
    let payment = "00 00 00 00 00 00 00 00 00 00 00 00 00 00 00 09";
    let tail = "00 00 00 00 00 00 01 90 05 50 4f 53 2d 31";
    let settled = hex(&format!("{id} 02 {user} {payment} {tail}"));
    request_round_trips(opcode::REFUND, &settled);
    let Ok(Request::Refund(refund)) = Request::decode(opcode::REFUND, &settled) else {
        panic!("a refund")
    };
    assert!(matches!(refund.target, Target::Payment { payment_request_id: 9, .. }));
    request_refused(opcode::REFUND, &hex(&format!("{id} 03 {user} {payment} {tail}")), "target");
    request_refused(opcode::REFUND, &hex(&format!("{id} 02 09 {user} {payment}")), "user_id_type");
    request_refused(opcode::REFUND, &settled[..30], "payment_request_id");
    // A settled payment has no hold to void.
    request_refused(
        opcode::VOID,
        &hex(&format!("{id} 02 {user} {payment} 05 50 4f 53 2d 31")),
        "target",
    );
    response_round_trips(opcode::VOID, &hex("00 00 00 00 00 00 01 90"));
    response_refused(opcode::VOID, &hex("00 00 00 00 00 01 90"), "released_minor");
    let refunded = "00 00 00 00 00 00 01 90 00 00 00 00 00 00 01 90 00 00 00 00 00 00 03 e8";
    response_round_trips(opcode::REFUND, &hex(refunded));
    response_refused(opcode::REFUND, &hex(&refunded[..60]), "captured_minor");
}
