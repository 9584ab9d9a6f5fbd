//! The example frames in docs/PROTOCOL.md section 7 are produced by this codec.
//!
//! `SETTLEGATE_BLESS=1 cargo test -p settlegate-protocol --test spec_examples` rewrites them.

use settlegate_engine::age::{Date, VerificationMethod};
use settlegate_engine::codes::{issue_number, CodeKey, CodeKind, CodePayload};
use settlegate_engine::{AgeRecord, InherentId};
use settlegate_protocol::messages::{
    opcode, AgeCheck, AgeVerdict, BasketOutcome, Reply, Request, Response, SaleLines,
};
use settlegate_protocol::ops::ping::Pong;
use settlegate_protocol::ops::refund::{Refund, Refunded};
use settlegate_protocol::ops::report::{GetReport, ReportPage, ReportPart};
use settlegate_protocol::ops::void::Target;
use settlegate_protocol::ops::{
    Auth, Authorize, AuthorizeBasket, Ping, RedeemCode, RegisterAge, StoreAt, UpsertStore,
};
use settlegate_protocol::values::{AcceptedMethod, Basket, BasketItem, EnteredStore, Store};
use settlegate_protocol::Frame;
use settlegate_types::{
    Approval, AuthCode, AuthOutcome, Currency, MeansKind, ReasonCode, UserIdType, UserKey,
};

const DOC: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/PROTOCOL.md");
/// The row of the `REPORT` example: the capture of a code redeemed at `POS-7`, acknowledged.
const REPORT_LINE: &str = "capture,1,POS-7,2026-11-22,Asia/Tokyo,2026-11-22T00:05:00Z,42,\
72057594037927978,7,A1B2C3,JPY,4200,acknowledged,yes,2026-11-22T00:05:01Z,";
const START: &str = "<!-- examples:start -->";
const END: &str = "<!-- examples:end -->";

/// The device key of the example inherent ID: bytes 0x00, 0x01, ..., 0x1f.
fn example_key() -> [u8; 32] {
    std::array::from_fn(|i| i as u8)
}

fn example_inherent_id() -> Vec<u8> {
    InherentId {
        key_version: 1,
        amount_minor: 1_980,
        currency: Currency::try_from("JPY").unwrap(),
        means: MeansKind::CreditCard,
        means_id: 0,
        provider_code: 1,
        card_idm: [0x01, 0x2e, 0, 0, 0, 0, 0, 0x01],
        user: UserKey::new(UserIdType::Mail, "hanako@example.jp").unwrap(),
        terminal_id: "DEMO-SHIBUYA-01".into(),
        counter: 1,
        timestamp_ms: 1_795_305_600_000,
    }
    .sign(&example_key())
}

fn example_age_record() -> Vec<u8> {
    AgeRecord {
        key_version: 1,
        card_idm: [0x01, 0x2e, 0, 0, 0, 0, 0, 0x01],
        user: UserKey::new(UserIdType::Mail, "hanako@example.jp").unwrap(),
        birth_date: Date::new(2000, 4, 2).unwrap(),
        method: VerificationMethod::DocumentChip,
        verified_at_ms: 1_795_305_000_000,
        valid_until_ms: 1_826_841_600_000,
        counter: 2,
        timestamp_ms: 1_795_305_600_000,
    }
    .sign(&example_key())
}

fn example_basket() -> Basket {
    let item = |id: &str, category: &str, quantity, unit| BasketItem {
        item_id: id.into(),
        category: category.into(),
        quantity,
        unit_amount_minor: unit,
    };
    Basket {
        age_confirmation: true,
        items: vec![item("BEER-350", "alcohol", 2, 490), item("BENTO-01", "", 1, 1_000)],
    }
}

fn example_store() -> Store {
    Store {
        store_id: "SHOP-0042".into(),
        name: "Demo Mart Shibuya".into(),
        industry: "5411".into(),
        address: "2-1 Dogenzaka, Shibuya".into(),
        latitude: 35.659_05,
        longitude: 139.700_63,
        beacons: vec!["beacon-0042".into()],
        wifi: Vec::new(),
        qr_code: Some("POSTER-0042".into()),
        accepts: vec![
            AcceptedMethod { kind: MeansKind::CreditCard, brand: "visa".into() },
            AcceptedMethod { kind: MeansKind::EMoney, brand: String::new() },
        ],
    }
}

/// The example payment code: 5,000 JPY, issue number 1·42, expiring at 1795306200 s, tagged
/// with the code key of the vault key 00 01 … 1f.
fn example_code() -> String {
    CodePayload {
        kind: CodeKind::Payment,
        issuer: 1,
        number: issue_number(1, 42),
        value: 5_000,
        currency: Currency::try_from("JPY").unwrap(),
        expires_s: 1_795_306_200,
        flags: 0,
    }
    .seal(&CodeKey::derive(&example_key()))
}

fn examples() -> Vec<(&'static str, String, Vec<u8>)> {
    let approval = AuthOutcome::Approved(Approval {
        auth_code: AuthCode(*b"A1B2C3"),
        provider_code: 1,
        amount_requested_minor: 1_980,
        discount_minor: 99,
        amount_final_minor: 1_881,
        currency: Currency::try_from("JPY").unwrap(),
    });
    let response = |r: Response, op: u16, id: u64| r.to_frame(op, id).to_bytes();
    vec![
        (
            "ping-request",
            "`PING`, request ID 1, payload `hi`.".into(),
            Request::Ping(Ping { payload: b"hi".to_vec() }).to_frame(1).to_bytes(),
        ),
        (
            "ping-response",
            "Its response.".into(),
            response(Response::Ok(Reply::Ping(Pong(b"hi".to_vec()))), opcode::PING, 1),
        ),
        (
            "auth-request",
            "`AUTH` with the demo API key `sg-demo-key`, request ID 2.".into(),
            Request::Auth(Auth { key: "sg-demo-key".into() }).to_frame(2).to_bytes(),
        ),
        (
            "inherent-id",
            "An inherent ID (not a frame): 1,980 JPY by credit card (default means) via provider \
             1, card IDm `012e000000000001`, user `hanako@example.jp` (mail), terminal \
             `DEMO-SHIBUYA-01`, key version 1, counter 1, timestamp 1795305600000, signed with \
             the device key 000102…1f (bytes 0 to 31)."
                .into(),
            example_inherent_id(),
        ),
        (
            "authorize-request",
            "`AUTHORIZE` of that inherent ID, client request ID 7, request ID 3.".into(),
            Request::Authorize(Authorize { client_request_id: 7, inherent_id: example_inherent_id() })
                .to_frame(3)
                .to_bytes(),
        ),
        (
            "authorize-approved",
            "An approval: code `A1B2C3`, provider 1, 1,980 requested, 99 off, 1,881 final, JPY."
                .into(),
            response(Response::Ok(Reply::Authorize(approval)), opcode::AUTHORIZE, 3),
        ),
        (
            "authorize-declined",
            "The response to request ID 3 (`AUTHORIZE`, opcode 0x0030) declining with reason 8 (ReplayedNonce).".into(),
            response(
                Response::Ok(Reply::Authorize(AuthOutcome::Declined(ReasonCode::ReplayedNonce))),
                opcode::AUTHORIZE,
                3,
            ),
        ),
        (
            "age-record",
            "An age record (not a frame) for the same terminal and user: born 2000-04-02, \
             verified by the identity document's chip (method 2) at 1795305000000, valid until \
             1826841600000, counter 2, timestamp 1795305600000, signed with the same device key."
                .into(),
            example_age_record(),
        ),
        (
            "register-age-request",
            "`REGISTER_AGE` of that record, client request ID 8, request ID 6.".into(),
            Request::RegisterAge(RegisterAge { client_request_id: 8, record: example_age_record() })
                .to_frame(6)
                .to_bytes(),
        ),
        (
            "authorize-basket-request",
            "`AUTHORIZE_BASKET` of the inherent ID above (1,980 JPY), client request ID 9, \
             request ID 7, with the age-confirmation flag and two lines: `BEER-350` (category \
             `alcohol`) 2 × 490, `BENTO-01` (no category) 1 × 1,000."
                .into(),
            Request::AuthorizeBasket(AuthorizeBasket {
                client_request_id: 9,
                inherent_id: example_inherent_id(),
                basket: example_basket(),
            })
            .to_frame(7)
            .to_bytes(),
        ),
        (
            "authorize-basket-removed",
            "Its response when the store terminal's policy was set to `remove_items` \
             (`SET_AGE_POLICY`; the demo default is `refuse`) and the user is under 20: the beer \
             is removed, 1,000 is settled with the terminal's 5% off (50), 950 final, \
             authorization code `Z9Y8X7`; `age_check` 3, `amount_minor` 1,000, item \
             `BEER-350`."
                .into(),
            response(
                Response::Ok(Reply::AuthorizeBasket(BasketOutcome {
                    outcome: AuthOutcome::Approved(Approval {
                        auth_code: AuthCode(*b"Z9Y8X7"),
                        provider_code: 1,
                        amount_requested_minor: 1_000,
                        discount_minor: 50,
                        amount_final_minor: 950,
                        currency: Currency::try_from("JPY").unwrap(),
                    }),
                    verdict: Some(AgeVerdict {
                        check: AgeCheck::NotHeld,
                        items: vec!["BEER-350".into()],
                        amount_minor: 1_000,
                    }),
                })),
                opcode::AUTHORIZE_BASKET,
                7,
            ),
        ),
        (
            "upsert-store-request",
            "`UPSERT_STORE`, client request ID 10, request ID 8: store `SHOP-0042`, \
             `Demo Mart Shibuya`, industry `5411`, address `2-1 Dogenzaka, Shibuya`, at \
             35.6590500, 139.7006300, beacon `beacon-0042`, no Wi-Fi IDs, QR poster \
             `POSTER-0042`, accepting visa cards and any e-money."
                .into(),
            Request::UpsertStore(UpsertStore { client_request_id: 10, store: example_store() })
                .to_frame(8)
                .to_bytes(),
        ),
        (
            "store-at-request",
            "`STORE_AT` 35.6595000, 139.7005000 within 200 m, request ID 9.".into(),
            Request::StoreAt(StoreAt { latitude_e7: 356_595_000, longitude_e7: 1_397_005_000, radius_m: 200 })
                .to_frame(9)
                .to_bytes(),
        ),
        (
            "store-at-response",
            "Its response: that store, 51.234 m away, no ties, no networks.".into(),
            response(
                Response::Ok(Reply::StoreAt(Box::new(EnteredStore {
                    store: example_store(),
                    distance_m: Some(51.234),
                    tied: Vec::new(),
                    qr_networks: Vec::new(),
                }))),
                opcode::STORE_AT,
                9,
            ),
        ),
        (
            "code-text",
            format!(
                "A payment code's text (not a frame), as ASCII: kind 0xC1, issuer 1, issue number \
                 0x010000000000002a (shard 1, sequence 42), 5,000 JPY, expiry 1795306200 s, flags \
                 0, tagged with the code key derived from the vault key 000102…1f. As text: `{}`.",
                example_code()
            ),
            example_code().into_bytes(),
        ),
        (
            "redeem-code-request",
            "`REDEEM_CODE` of that code, client request ID 11, request ID 10: issuer 1, number \
             0x010000000000002a, a sale of 4,200 JPY at 1795305900000 on terminal `POS-7`, one \
             item `BENTO-01` 1 × 4,200, no coupon, no order."
                .into(),
            Request::RedeemCode(RedeemCode {
                client_request_id: 11,
                    code: example_code(),
                    issuer: 1,
                    number: issue_number(1, 42),
                    amount_minor: 4_200,
                    currency: Currency::try_from("JPY").unwrap(),
                    sale_at_ms: 1_795_305_900_000,
                    terminal_id: "POS-7".into(),
                    lines: SaleLines::Items(vec![("BENTO-01".into(), 1, 4_200)]),
                    coupon: None,
                    order_ref: String::new(),
            })
            .to_frame(10)
            .to_bytes(),
        ),
        (
            "redeem-code-basket-request",
            "`REDEEM_CODE_BASKET` of that code, client request ID 12, request ID 11: issuer 1, \
             number 0x010000000000002a, a sale of 1,980 JPY at 1795305900000 on terminal `POS-7`, \
             with the age-confirmation flag and the basket of the `AUTHORIZE_BASKET` example \
             (`BEER-350`, category `alcohol`, 2 × 490; `BENTO-01`, no category, 1 × 1,000), no \
             coupon, no order."
                .into(),
            Request::RedeemCode(RedeemCode {
                client_request_id: 12,
                    code: example_code(),
                    issuer: 1,
                    number: issue_number(1, 42),
                    amount_minor: 1_980,
                    currency: Currency::try_from("JPY").unwrap(),
                    sale_at_ms: 1_795_305_900_000,
                    terminal_id: "POS-7".into(),
                    lines: SaleLines::Basket(example_basket()),
                    coupon: None,
                    order_ref: String::new(),
            })
            .to_frame(11)
            .to_bytes(),
        ),
        (
            "refund-settled-request",
            "`REFUND` of 500 JPY of the payment approved above (target 2: user \
             `hanako@example.jp`, its `AUTHORIZE`'s client request ID 7), client request ID 13, \
             request ID 12, by its terminal `DEMO-SHIBUYA-01`."
                .into(),
            Request::Refund(Refund {
                client_request_id: 13,
                target: Target::Payment {
                    user: UserKey::new(UserIdType::Mail, "hanako@example.jp").unwrap(),
                    payment_request_id: 7,
                },
                amount_minor: 500,
                terminal_id: "DEMO-SHIBUYA-01".into(),
            })
            .to_frame(12)
            .to_bytes(),
        ),
        (
            "refund-settled-response",
            "Its answer: 500 refunded now, 500 in all, of the 1,881 settled.".into(),
            response(
                Response::Ok(Reply::Refund(Refunded {
                    amount_minor: 500,
                    refunded_minor: 500,
                    captured_minor: 1_881,
                })),
                opcode::REFUND,
                12,
            ),
        ),
        (
            "report-request",
            "`REPORT`, request ID 12: provider 1's item list (part 2) of business day \
             `2026-11-22`, from offset 0, at most 100 rows."
                .into(),
            Request::Report(GetReport {
                business_day: "2026-11-22".into(),
                provider_code: 1,
                part: ReportPart::Items,
                offset: 0,
                rows_max: 100,
            })
            .to_frame(12)
            .to_bytes(),
        ),
        (
            "report-response",
            format!(
                "Its answer: built at 1795305900000, 1 row in all, the item list's header \
                 (`docs/RECONCILIATION.md`) and the row `{REPORT_LINE}`."
            ),
            response(
                Response::Ok(Reply::Report(ReportPage {
                    generated_ms: 1_795_305_900_000,
                    total: 1,
                    header: settlegate_engine::report::ITEMS_HEADER.into(),
                    lines: vec![REPORT_LINE.into()],
                })),
                opcode::REPORT,
                12,
            ),
        ),
        (
            "login-refused",
            "`LOGIN` refused, reason 53 (WrongPassword), request ID 4.".into(),
            response(Response::Refused(ReasonCode::WrongPassword), opcode::LOGIN, 4),
        ),
        (
            "busy",
            "`BUSY` with a retry-after of 5 ms, the response to an `AUTHORIZE` (opcode 0x0030) with request ID 5.".into(),
            response(Response::Busy { retry_after_ms: 5 }, opcode::AUTHORIZE, 5),
        ),
        (
            "frame-error",
            "The `FRAME_ERROR` sent before closing a connection whose header checksum failed: kind 3, detail `header checksum mismatch`."
                .into(),
            response(
                Response::FrameError { kind: 3, detail: "header checksum mismatch".into() },
                0,
                0,
            ),
        ),
    ]
}

fn hex_block(bytes: &[u8]) -> String {
    bytes
        .chunks(16)
        .map(|row| row.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(" "))
        .collect::<Vec<_>>()
        .join("\n")
}

fn render() -> String {
    let mut out = String::from(START);
    out.push('\n');
    for (name, description, bytes) in examples() {
        out.push_str(&format!(
            "\n#### {name}\n\n{description}\n\n```hex\n{}\n```\n",
            hex_block(&bytes)
        ));
    }
    out.push('\n');
    out.push_str(END);
    out
}

#[test]
fn protocol_doc_examples_match_the_codec() {
    let doc = std::fs::read_to_string(DOC).expect("docs/PROTOCOL.md");
    let rendered = render();
    let (Some(start), Some(end)) = (doc.find(START), doc.find(END)) else {
        panic!("docs/PROTOCOL.md lacks the examples markers");
    };
    let current = &doc[start..end + END.len()];
    if std::env::var_os("SETTLEGATE_BLESS").is_some() {
        let updated = doc.replace(current, &rendered);
        std::fs::write(DOC, updated).unwrap();
        return;
    }
    assert_eq!(current, rendered, "run with SETTLEGATE_BLESS=1 to update the doc");
}

#[test]
fn examples_decode_and_reencode_to_the_same_bytes() {
    for (name, _, bytes) in examples() {
        if name == "inherent-id" {
            let (record, _, _) = InherentId::decode(&bytes).unwrap();
            assert_eq!(record.terminal_id, "DEMO-SHIBUYA-01");
            continue;
        }
        if name == "code-text" {
            let text = String::from_utf8(bytes).unwrap();
            let payload = CodePayload::open(&text, &CodeKey::derive(&example_key())).unwrap();
            assert_eq!(payload.value, 5_000);
            continue;
        }
        if name == "age-record" {
            let (record, _, _) = AgeRecord::decode(&bytes).unwrap();
            assert_eq!(record.birth_date, Date::new(2000, 4, 2).unwrap());
            continue;
        }
        let (frame, used): (Frame, usize) =
            settlegate_protocol::frame::decode(&bytes).unwrap().unwrap();
        assert_eq!(used, bytes.len(), "{name}");
        // Built apart and copied (`to_frame`), and encoded in place (`encode_frame`).
        let mut in_place = Vec::new();
        let again = if frame.flags & settlegate_protocol::frame::FLAG_RESPONSE != 0 {
            let response = Response::decode(frame.opcode, frame.status, &frame.body).unwrap();
            let status = response.encode_frame(frame.opcode, frame.request_id, &mut in_place);
            assert_eq!(status, frame.status, "{name}");
            response.to_frame(frame.opcode, frame.request_id)
        } else {
            let request = Request::decode(frame.opcode, &frame.body).unwrap();
            request.encode_frame(frame.request_id, &mut in_place).unwrap();
            request.to_frame(frame.request_id)
        };
        assert_eq!(again.to_bytes(), bytes, "{name}");
        assert_eq!(in_place, bytes, "{name}: encoded in place");
    }
}
