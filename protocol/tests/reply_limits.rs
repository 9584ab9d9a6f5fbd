//! Every operation's largest reply fits one frame (issue #19, item 4).
//!
//! For every `Reply` variant, and every status with a body, this builds the largest value the
//! engine's limits allow, encodes it as the server does (`Response::encode` and
//! `Response::encode_frame`), and checks that its body is at most `BODY_LEN_MAX` bytes and that
//! it decodes back to what was encoded. Each field takes the largest value it can have, even
//! where no single real reply has all of them at once (a 65-byte means label is a QR means',
//! which has no last four digits): the cases are upper bounds, not examples. Where a public
//! validator of the engine exists, the case's values are run through it, so that a case
//! cannot quietly ask for more than the engine lets in.
//!
//! Exhaustive by construction: `maximal_reply` and `maximal_response` match their enum without
//! a wildcard, so a new variant does not compile until its largest case is written there; and
//! `every_response_opcode_and_status_has_a_case` ties the cases to `opcode::REQUESTS` (which a
//! unit test of `messages` ties to `Request::decode`) and to the pushes, so a new operation
//! fails until it has a case, and each case must decode back as the variant its opcode decodes
//! to.

use std::collections::BTreeSet;
use std::mem::discriminant;

use settlegate_engine::codes::{CodeKey, CodeKind, CodePayload, CODE_TEXT_LEN};
use settlegate_engine::emvqr;
use settlegate_engine::limits::{
    ACCEPTED_METHODS_MAX, BALANCE_MAX_MINOR, BASKET_ITEMS_MAX, BEACON_ID_LEN_MAX, COUPON_USERS_MAX,
    COUPON_USES_MAX, ITEM_ID_LEN_MAX, ITEM_QUANTITY_MAX, MEANS_PER_USER_MAX, MEANS_TEXT_LEN_MAX,
    ORDER_REF_LEN_MAX, PROVIDERS_MAX, PROVIDER_NAME_LEN_MAX, SALE_ITEMS_MAX,
    SERVICE_DESCRIPTION_LEN_MAX, STORE_ADDRESS_LEN_MAX, STORE_IDS_PER_KIND_MAX, STORE_NAME_LEN_MAX,
    STORE_RADIUS_MAX_M, STORE_TEXT_LEN_MAX, TERMINAL_ID_LEN_MAX, USER_ID_LEN_MAX,
};
use settlegate_engine::{age::item_id_valid, terminal_id_valid};
use settlegate_protocol::frame::{self, BODY_LEN_MAX, FLAG_PUSH, FLAG_RESPONSE};
use settlegate_protocol::messages::{
    opcode, status, AgeCheck, AgeVerdict, BasketOutcome, CodeOutcome, CodeState, DeviceMessage,
    MeansAdded, MeansList, MethodAtStore, Notice, Reply, Response, ServerInfo,
    TerminalConfirmation, UsableAtStore, WalletEntries,
};
use settlegate_protocol::ops::auth::Authenticated;
use settlegate_protocol::ops::notify_delivery::Delivered;
use settlegate_protocol::ops::ping::Pong;
use settlegate_protocol::ops::refund::Refunded;
use settlegate_protocol::ops::void::Voided;

/// The page of a report the server fills from `REPORT_ROWS_MAX` rows of `row_len` bytes.
fn report_page(row_len: usize) -> settlegate_protocol::ops::report::ReportPage {
    let rows_max = settlegate_types::limits::REPORT_ROWS_MAX;
    let rows: Vec<String> = (0..rows_max).map(|_| "r".repeat(row_len)).collect();
    let header = settlegate_engine::report::ITEMS_HEADER;
    settlegate_protocol::ops::report::ReportPage::fill(i64::MAX, u32::MAX, header, &rows, rows_max)
}

/// A refund's answer (fixed-width).
fn refunded() -> Refunded {
    Refunded { amount_minor: u64::MAX, refunded_minor: u64::MAX, captured_minor: u64::MAX }
}
use settlegate_protocol::values::{
    AcceptedMethod, Balance, CouponEffect, DeliveryNotice, DeviceCredential, DeviceKey, Discount,
    EnteredStore, IssuedCode, IssuedCoupon, MeansView, Redemption, Store, TerminalService,
};
use settlegate_types::{
    Approval, AuthCode, AuthOutcome, CardToken, Currency, MeansKind, ReasonCode, UserIdType,
    UserKey,
};

/// A str8 carries at most this many bytes; `Writer::str8` cuts longer text, so a field with no
/// limit of its own is at most this long on the wire.
const STR8_MAX: usize = u8::MAX as usize;
/// The most entries a `u8` count can announce (`Writer` never writes more).
const COUNT8_MAX: usize = u8::MAX as usize;

/// One reply to check: the opcode it answers, what makes it the largest, the response.
struct Case {
    opcode: u16,
    what: &'static str,
    response: Response,
}

fn ok(opcode: u16, what: &'static str, reply: Reply) -> Case {
    Case { opcode, what, response: Response::Ok(reply) }
}

// ---- the largest parts, each checked against the engine's validator where it has one ----

/// `n` copies of `c`.
fn text(n: usize, c: char) -> String {
    c.to_string().repeat(n)
}

/// A distinct printable ID of exactly `len` bytes (`index` zero-padded, behind `prefix`).
fn id(prefix: char, index: usize, len: usize) -> String {
    format!("{prefix}{index:0>width$}", width = len - 1)
}

fn jpy() -> Currency {
    Currency::from_bytes(*b"JPY").unwrap()
}

/// A user ID of `USER_ID_LEN_MAX` bytes (a mail address: the longer `user` type byte is the
/// same for both types).
fn longest_user() -> UserKey {
    let local = text(USER_ID_LEN_MAX / 2 - 1, 'u');
    let domain = text(USER_ID_LEN_MAX / 2, 'd');
    let user = UserKey::new(UserIdType::Mail, format!("{local}@{domain}")).unwrap();
    assert_eq!(user.id().len(), USER_ID_LEN_MAX);
    user
}

/// A store-terminal ID of `TERMINAL_ID_LEN_MAX` bytes.
fn longest_terminal() -> String {
    let terminal = text(TERMINAL_ID_LEN_MAX, 'T');
    assert!(terminal_id_valid(&terminal));
    terminal
}

/// `ORDER_REF_LEN_MAX` bytes of 0x21–0x7E (`ISSUE_CODE`, `NOTIFY_DELIVERY` check it).
fn longest_order_ref() -> String {
    text(ORDER_REF_LEN_MAX, 'O')
}

/// An approval: every field is fixed-width, so any approval is the largest outcome (38 bytes
/// against a decline's 3).
fn approved() -> AuthOutcome {
    AuthOutcome::Approved(Approval {
        auth_code: AuthCode(*b"Z9Y8X7"),
        provider_code: u32::MAX,
        amount_requested_minor: 1_000_000_000_000_000,
        discount_minor: 1,
        amount_final_minor: 999_999_999_999_999,
        currency: jpy(),
    })
}

/// A code's text as the engine seals it: always `CODE_TEXT_LEN` characters.
fn code_text(kind: CodeKind, number: u64) -> String {
    let payload = CodePayload {
        kind,
        issuer: u16::MAX,
        number,
        value: 1_000_000,
        currency: jpy(),
        expires_s: u32::MAX,
        flags: if kind == CodeKind::Coupon { 2 } else { 0 },
    };
    let text = payload.seal(&CodeKey::derive(&[7; 32]));
    assert_eq!(text.len(), CODE_TEXT_LEN);
    text
}

fn issued_code() -> IssuedCode {
    IssuedCode {
        text: code_text(CodeKind::Payment, u64::MAX),
        number: u64::MAX,
        amount_minor: 1_000_000_000_000_000,
        currency: jpy(),
        expires_ms: i64::MAX,
        deliver_to: [0xFF; 8],
        user: longest_user(),
        order_ref: longest_order_ref(),
    }
}

fn issued_coupon(number: u64) -> IssuedCoupon {
    IssuedCoupon {
        text: code_text(CodeKind::Coupon, number),
        number,
        user: longest_user(),
        // Every effect is the same width on the wire (kind, u64, currency).
        effect: CouponEffect::Fixed { amount_minor: u64::MAX, currency: jpy() },
        uses: COUPON_USES_MAX,
        expires_ms: i64::MAX,
    }
}

fn delivery() -> DeliveryNotice {
    DeliveryNotice {
        user: longest_user(),
        order_ref: longest_order_ref(),
        amount_minor: 1_000_000_000_000_000,
        currency: jpy(),
        // `notify_delivery` refuses a merchant over STORE_NAME_LEN_MAX bytes.
        merchant: text(STORE_NAME_LEN_MAX, 'M'),
    }
}

/// A means with every field at its largest: the label of a QR means (scheme, a space, the
/// settlement number, each `MEANS_TEXT_LEN_MAX`; a card's `mastercard ****1234` and an account's
/// `{bank_code} ****1234` are shorter), and a last four digits and a token besides.
fn means_view(means_id: u32, balance: Option<Balance>) -> MeansView {
    let scheme = text(MEANS_TEXT_LEN_MAX, 'Q');
    let number = text(MEANS_TEXT_LEN_MAX, '9');
    MeansView {
        means_id,
        kind: MeansKind::QrCode,
        label: format!("{scheme} {number}"),
        last4: Some("1234".into()),
        token: Some(CardToken([0xAB; 16])),
        is_default: means_id == 1,
        uses: u64::MAX,
        last_used_ms: Some(i64::MAX),
        registered_ms: i64::MAX,
        balance,
    }
}

fn purse() -> Balance {
    Balance {
        balance_minor: BALANCE_MAX_MINOR,
        available_minor: BALANCE_MAX_MINOR,
        currency: Some(jpy()),
    }
}

/// `MEANS_PER_USER_MAX` means (`ADD_MEANS` refuses more, reason 57).
fn all_means(balance: Option<Balance>) -> Vec<MeansView> {
    (1..=MEANS_PER_USER_MAX as u32).map(|id| means_view(id, balance)).collect()
}

/// `ACCEPTED_METHODS_MAX` methods, each brand `STORE_TEXT_LEN_MAX` bytes.
fn all_accepted() -> Vec<AcceptedMethod> {
    (0..ACCEPTED_METHODS_MAX)
        .map(|i| AcceptedMethod { kind: MeansKind::EMoney, brand: id('B', i, STORE_TEXT_LEN_MAX) })
        .collect()
}

/// The largest store `Store::validate` accepts, with `qr_code` as its poster (at most
/// `emvqr::PAYLOAD_LEN_MAX` bytes, plain or EMVCo).
fn longest_store(qr_code: String) -> Store {
    let ids = |prefix| {
        (0..STORE_IDS_PER_KIND_MAX).map(|i| id(prefix, i, BEACON_ID_LEN_MAX)).collect::<Vec<_>>()
    };
    let store = settlegate_engine::Store {
        store_id: text(STORE_TEXT_LEN_MAX, 'S'),
        name: text(STORE_NAME_LEN_MAX, 'N'),
        industry: text(STORE_TEXT_LEN_MAX, 'I'),
        address: text(STORE_ADDRESS_LEN_MAX, 'A'),
        latitude: -90.0,
        longitude: 179.999_999_9,
        beacons: ids('b'),
        wifi: ids('w'),
        qr_code: Some(qr_code),
        accepts: all_accepted()
            .into_iter()
            .map(|a| settlegate_engine::AcceptedMethod { kind: a.kind, brand: a.brand })
            .collect(),
    };
    store.validate().expect("the largest store is valid");
    // The same store as the wire carries it.
    Store {
        store_id: store.store_id,
        name: store.name,
        industry: store.industry,
        address: store.address,
        latitude: store.latitude,
        longitude: store.longitude,
        beacons: store.beacons,
        wifi: store.wifi,
        qr_code: store.qr_code,
        accepts: all_accepted(),
    }
}

/// The EMVCo poster whose networks take the most bytes in `entered`. Each network is a
/// template (ID, length: 4 characters) holding sub-object 00 (4 more) and the network's name
/// of `g` characters, which `entered` lists as a str8 of `1 + g` bytes; a template holds at
/// most 99 characters, so `g` is at most 95. Of the 512 characters, `000201` and `6304XXXX`
/// take 14: in the 498 left, five templates (95 + 95 + 95 + 95 + 78) list 463 bytes; four can
/// list at most 384, and every template past the fifth costs 7 bytes more than it lists.
fn poster_with_most_networks() -> String {
    let mut payload = String::from("000201");
    for (template, name_len) in [(26, 95), (27, 95), (28, 95), (29, 95), (30, 78)] {
        let name = id('n', template, name_len);
        let inner = format!("00{name_len:02}{name}");
        payload += &format!("{template:02}{:02}{inner}", inner.len());
    }
    payload += "6304";
    payload += &emvqr::crc_hex(&payload);
    assert_eq!(payload.len(), emvqr::PAYLOAD_LEN_MAX);
    payload
}

/// `count` distinct item IDs of `ITEM_ID_LEN_MAX` bytes, valid in a basket and a sale.
fn item_ids(count: usize) -> Vec<String> {
    let ids: Vec<String> = (0..count).map(|i| id('i', i, ITEM_ID_LEN_MAX)).collect();
    assert!(ids.iter().all(|id| item_id_valid(id)));
    ids
}

/// A redemption of `SALE_ITEMS_MAX` lines with `item_id_len`-byte item IDs.
fn redemption_with(item_id_len: usize) -> Redemption {
    Redemption {
        number: u64::MAX,
        captured_minor: 1_000_000_000_000_000,
        released_minor: 0,
        coupon_discount_minor: 1,
        currency: jpy(),
        terminal_id: longest_terminal(),
        provider_code: u32::MAX,
        auth_code: AuthCode(*b"A1B2C3"),
        sale_at_ms: i64::MAX,
        redeemed_at_ms: i64::MAX,
        items: (0..SALE_ITEMS_MAX)
            .map(|i| (id('i', i, item_id_len), ITEM_QUANTITY_MAX, u64::MAX))
            .collect(),
    }
}

/// The largest redemption: `SALE_ITEMS_MAX` lines (`redeem_code` refuses more; a basket's
/// `BASKET_ITEMS_MAX` is no more), each item ID `ITEM_ID_LEN_MAX` bytes (`redeem_code` checks
/// a sale's lines as `Basket::total` checks a basket's).
fn redemption() -> Redemption {
    const _: () = assert!(BASKET_ITEMS_MAX <= SALE_ITEMS_MAX);
    let redemption = redemption_with(ITEM_ID_LEN_MAX);
    assert!(redemption.items.iter().all(|(id, _, _)| item_id_valid(id)));
    redemption
}

// ---- the cases -------------------------------------------------------------------------------

/// One value of every `Reply` variant, its contents aside: `maximal_reply` is run on each.
fn reply_witnesses() -> Vec<Reply> {
    let credential = || DeviceCredential {
        card_idm: [0; 8],
        key_version: 0,
        device_key: DeviceKey::from_bytes([0; 32]),
    };
    let entered = || {
        Box::new(EnteredStore {
            store: longest_store(String::from("P")),
            distance_m: None,
            tied: Vec::new(),
            qr_networks: Vec::new(),
        })
    };
    vec![
        Reply::Auth(Authenticated { identity: String::new(), permissions: 0 }),
        Reply::Ping(Pong(Vec::new())),
        Reply::ServerInfo(ServerInfo {
            server_version: String::new(),
            protocol_version: 1,
            shards: 1,
            body_length_max: 0,
            in_flight_max: 0,
            providers: Vec::new(),
        }),
        Reply::Enroll(credential()),
        Reply::ProvisionDevice(credential()),
        Reply::RotateDeviceKey(credential()),
        Reply::Login(()),
        Reply::SetDefaultMeans(()),
        Reply::SubscribeNotices(()),
        Reply::RevokeDeviceKey(()),
        Reply::RegisterTerminals(()),
        Reply::RemoveTerminals(()),
        Reply::RegisterAge(()),
        Reply::SetAgePolicy(()),
        Reply::UpsertStore(()),
        Reply::RemoveStore(()),
        Reply::SubscribeDevice(()),
        Reply::AddMeans(MeansAdded { means_id: 1, last4: None }),
        Reply::ListMeans(MeansList(Vec::new())),
        Reply::ConfirmTerminal(TerminalConfirmation::NotListed),
        Reply::Authorize(AuthOutcome::Declined(ReasonCode::Malformed)),
        Reply::AuthorizeBasket(BasketOutcome {
            outcome: AuthOutcome::Declined(ReasonCode::Malformed),
            verdict: None,
        }),
        Reply::Notice(Notice {
            user: longest_user(),
            client_request_id: 0,
            terminal_id: String::new(),
            outcome: AuthOutcome::Declined(ReasonCode::Malformed),
            at_ms: 0,
        }),
        Reply::Wallet(WalletEntries(Vec::new())),
        Reply::StoreAt(entered()),
        Reply::StoreBySignal(entered()),
        Reply::TopUp(purse()),
        Reply::UsableMethods(Box::new(UsableAtStore {
            store_id: String::new(),
            methods: Vec::new(),
            best: None,
            accepted: Vec::new(),
        })),
        Reply::IssueCode(CodeOutcome::Declined(ReasonCode::Malformed)),
        Reply::RedeemCode(Box::new(redemption())),
        Reply::CodeState(CodeState::Issued),
        Reply::Void(Voided { released_minor: 0 }),
        Reply::Refund(refunded()),
        Reply::Report(report_page(0)),
        Reply::IssueCoupons(Vec::new()),
        Reply::NotifyDelivery(Delivered { devices: 0 }),
        Reply::DeviceMessage(DeviceMessage::Delivery(delivery())),
    ]
}

/// The largest replies of `witness`'s variant, for every opcode answered with it. No wildcard:
/// a new variant does not compile until its case is here.
fn maximal_reply(witness: &Reply) -> Vec<Case> {
    use opcode::*;
    // Fixed-width: card IDm, key version, 32-byte key.
    let credential = || DeviceCredential {
        card_idm: [0xFF; 8],
        key_version: u16::MAX,
        device_key: DeviceKey::from_bytes([0x5A; 32]),
    };
    let fixed_credential = "fixed-width device credential";
    // The largest valid store (every text at its limit, STORE_IDS_PER_KIND_MAX beacons and
    // Wi-Fi IDs of BEACON_ID_LEN_MAX, a 512-byte poster, ACCEPTED_METHODS_MAX methods).
    // SALE_ITEMS_MAX lines of ITEM_ID_LEN_MAX item IDs, the longest terminal ID.
    let sale_lines = "SALE_ITEMS_MAX lines of ITEM_ID_LEN_MAX";
    match witness {
        // The identity's name comes from the server's config, which bounds it by nothing: a
        // str8 carries STR8_MAX bytes (longer is cut). `permissions` is fixed-width.
        Reply::Auth(_) => vec![ok(
            AUTH,
            "identity name at the str8 maximum",
            Reply::Auth(Authenticated { identity: text(STR8_MAX, 'I'), permissions: u32::MAX }),
        )],
        // `Request::decode` refuses a PING payload over PING_PAYLOAD_MAX; the reply echoes it.
        Reply::Ping(_) => vec![ok(
            PING,
            "PING_PAYLOAD_MAX payload",
            Reply::Ping(Pong(vec![0xA5; settlegate_protocol::messages::PING_PAYLOAD_MAX])),
        )],
        // PROVIDERS_MAX providers (config), each name PROVIDER_NAME_LEN_MAX bytes (config);
        // the version is the crate's, bounded here by the str8 maximum only.
        Reply::ServerInfo(_) => vec![ok(
            SERVER_INFO,
            "PROVIDERS_MAX providers, names PROVIDER_NAME_LEN_MAX, version at the str8 maximum",
            Reply::ServerInfo(ServerInfo {
                server_version: text(STR8_MAX, 'v'),
                protocol_version: 1,
                shards: u16::MAX,
                body_length_max: BODY_LEN_MAX as u32,
                in_flight_max: u16::MAX,
                providers: (0..PROVIDERS_MAX)
                    .map(|i| (u32::MAX - i as u32, id('p', i, PROVIDER_NAME_LEN_MAX)))
                    .collect(),
            }),
        )],
        Reply::Enroll(_) => vec![ok(ENROLL, fixed_credential, Reply::Enroll(credential()))],
        Reply::ProvisionDevice(_) => {
            vec![ok(PROVISION_DEVICE, fixed_credential, Reply::ProvisionDevice(credential()))]
        }
        Reply::RotateDeviceKey(_) => {
            vec![ok(ROTATE_DEVICE_KEY, fixed_credential, Reply::RotateDeviceKey(credential()))]
        }
        // No body.
        Reply::Login(()) => vec![ok(LOGIN, "empty", Reply::Login(()))],
        Reply::SetDefaultMeans(()) => {
            vec![ok(SET_DEFAULT_MEANS, "empty", Reply::SetDefaultMeans(()))]
        }
        Reply::SubscribeNotices(()) => {
            vec![ok(SUBSCRIBE_NOTICES, "empty", Reply::SubscribeNotices(()))]
        }
        Reply::RevokeDeviceKey(()) => {
            vec![ok(REVOKE_DEVICE_KEY, "empty", Reply::RevokeDeviceKey(()))]
        }
        Reply::RegisterTerminals(()) => {
            vec![ok(REGISTER_TERMINALS, "empty", Reply::RegisterTerminals(()))]
        }
        Reply::RemoveTerminals(()) => {
            vec![ok(REMOVE_TERMINALS, "empty", Reply::RemoveTerminals(()))]
        }
        Reply::RegisterAge(()) => vec![ok(REGISTER_AGE, "empty", Reply::RegisterAge(()))],
        Reply::SetAgePolicy(()) => vec![ok(SET_AGE_POLICY, "empty", Reply::SetAgePolicy(()))],
        Reply::UpsertStore(()) => vec![ok(UPSERT_STORE, "empty", Reply::UpsertStore(()))],
        Reply::RemoveStore(()) => vec![ok(REMOVE_STORE, "empty", Reply::RemoveStore(()))],
        Reply::SubscribeDevice(()) => {
            vec![ok(SUBSCRIBE_DEVICE, "empty", Reply::SubscribeDevice(()))]
        }
        // The vault's last four digits, 4 bytes.
        Reply::AddMeans(_) => vec![ok(
            ADD_MEANS,
            "last4 of 4 digits",
            Reply::AddMeans(MeansAdded { means_id: u32::MAX, last4: Some("1234".into()) }),
        )],
        // MEANS_PER_USER_MAX means, labels 2 x MEANS_TEXT_LEN_MAX + 1 (a QR means'), last4,
        // token. LIST_MEANS carries no balance.
        Reply::ListMeans(_) => vec![ok(
            LIST_MEANS,
            "MEANS_PER_USER_MAX means, longest labels",
            Reply::ListMeans(MeansList(all_means(None))),
        )],
        // Listed with a fixed discount (wider than a percentage) and a description of
        // SERVICE_DESCRIPTION_LEN_MAX bytes (`register_terminals` refuses longer).
        Reply::ConfirmTerminal(_) => vec![ok(
            CONFIRM_TERMINAL,
            "listed, fixed discount, SERVICE_DESCRIPTION_LEN_MAX description",
            Reply::ConfirmTerminal(TerminalConfirmation::Listed {
                service: Some(TerminalService {
                    discount: Discount::Fixed { amount_minor: u64::MAX, currency: jpy() },
                    valid_from_ms: i64::MIN,
                    valid_until_ms: i64::MAX,
                    description: text(SERVICE_DESCRIPTION_LEN_MAX, 'D'),
                }),
            }),
        )],
        // An approval: fixed-width.
        Reply::Authorize(_) => vec![ok(AUTHORIZE, "approval", Reply::Authorize(approved()))],
        // An approval and a verdict naming BASKET_ITEMS_MAX items (the decoder refuses more)
        // of ITEM_ID_LEN_MAX bytes (`Basket::total` checks every one before a verdict is
        // made). A real approval names at most BASKET_ITEMS_MAX - 1: removing every item
        // leaves nothing to settle, a decline.
        Reply::AuthorizeBasket(_) => {
            let ids = item_ids(BASKET_ITEMS_MAX);
            let basket = settlegate_engine::Basket {
                age_confirmation: true,
                items: ids
                    .iter()
                    .map(|id| settlegate_engine::BasketItem {
                        item_id: id.clone(),
                        category: text(settlegate_engine::limits::CATEGORY_LEN_MAX, 'a'),
                        quantity: 1,
                        unit_amount_minor: 1,
                    })
                    .collect(),
            };
            assert_eq!(basket.total(), Ok(BASKET_ITEMS_MAX as u64), "a valid basket");
            let verdict =
                AgeVerdict { check: AgeCheck::NotHeld, items: ids, amount_minor: u64::MAX };
            vec![ok(
                AUTHORIZE_BASKET,
                "approval, verdict of BASKET_ITEMS_MAX items of ITEM_ID_LEN_MAX",
                Reply::AuthorizeBasket(BasketOutcome {
                    outcome: approved(),
                    verdict: Some(verdict),
                }),
            )]
        }
        // The longest user, terminal ID (TERMINAL_ID_LEN_MAX, from the signed inherent ID), an
        // approval.
        Reply::Notice(_) => vec![ok(
            NOTICE,
            "longest user and terminal, approval",
            Reply::Notice(Notice {
                user: longest_user(),
                client_request_id: u128::MAX,
                terminal_id: longest_terminal(),
                outcome: approved(),
                at_ms: i64::MAX,
            }),
        )],
        // As LIST_MEANS, each with its balance.
        Reply::Wallet(_) => vec![ok(
            WALLET,
            "MEANS_PER_USER_MAX means with balances, longest labels",
            Reply::Wallet(WalletEntries(all_means(Some(purse())))),
        )],
        // STORE_AT adds a distance and the tied stores: the engine bounds their number by
        // nothing, the encoder lists at most COUNT8_MAX (STORE_TEXT_LEN_MAX bytes each).
        Reply::StoreAt(_) => vec![ok(
            STORE_AT,
            "largest store, COUNT8_MAX tied stores",
            Reply::StoreAt(Box::new(EnteredStore {
                store: longest_store(text(emvqr::PAYLOAD_LEN_MAX, 'P')),
                distance_m: Some(f64::from(STORE_RADIUS_MAX_M)),
                tied: (0..COUNT8_MAX).map(|i| id('s', i, STORE_TEXT_LEN_MAX)).collect(),
                qr_networks: Vec::new(),
            })),
        )],
        // STORE_BY_SIGNAL adds the networks of its MPM poster: at most 463 bytes of them
        // (`poster_with_most_networks`).
        Reply::StoreBySignal(_) => {
            let poster = poster_with_most_networks();
            let networks = emvqr::parse(&poster).expect("a valid poster").networks;
            assert_eq!(networks.iter().map(|n| 1 + n.len()).sum::<usize>(), 463);
            vec![ok(
                STORE_BY_SIGNAL,
                "largest store, its MPM poster's networks",
                Reply::StoreBySignal(Box::new(EnteredStore {
                    store: longest_store(poster),
                    distance_m: None,
                    tied: Vec::new(),
                    qr_networks: networks,
                })),
            )]
        }
        // Fixed-width.
        Reply::TopUp(_) => vec![ok(TOP_UP, "fixed-width balance", Reply::TopUp(purse()))],
        Reply::Void(_) => {
            vec![ok(VOID, "fixed-width", Reply::Void(Voided { released_minor: u64::MAX }))]
        }
        Reply::Refund(_) => vec![ok(REFUND, "fixed-width", Reply::Refund(refunded()))],
        // A page is filled (`ReportPage::fill`) with REPORT_ROWS_MAX rows at most, fewer when
        // the next would take the body past a frame: here rows of 300 bytes, and rows as short
        // as can be (the count's limit).
        Reply::Report(_) => vec![
            ok(REPORT, "rows of 300 bytes, as many as fit", Reply::Report(report_page(300))),
            ok(REPORT, "REPORT_ROWS_MAX empty rows", Reply::Report(report_page(0))),
        ],
        // The store's ID (STORE_TEXT_LEN_MAX), every means of the user with its balance, a
        // best method, and ACCEPTED_METHODS_MAX accepted methods (listed only when nothing is
        // usable, so never with a best: both are here).
        Reply::UsableMethods(_) => vec![ok(
            USABLE_METHODS,
            "MEANS_PER_USER_MAX methods, ACCEPTED_METHODS_MAX accepted",
            Reply::UsableMethods(Box::new(UsableAtStore {
                store_id: text(STORE_TEXT_LEN_MAX, 'S'),
                methods: all_means(Some(purse()))
                    .into_iter()
                    .map(|means| MethodAtStore { means, usable: true })
                    .collect(),
                best: Some(u32::MAX),
                accepted: all_accepted(),
            })),
        )],
        // An issued code: CODE_TEXT_LEN text, the longest user, ORDER_REF_LEN_MAX order.
        Reply::IssueCode(_) => vec![ok(
            ISSUE_CODE,
            "issued code, longest user and order",
            Reply::IssueCode(CodeOutcome::Issued(Box::new(issued_code()))),
        )],
        // Both opcodes of the redemption.
        Reply::RedeemCode(_) => [REDEEM_CODE, REDEEM_CODE_BASKET]
            .into_iter()
            .map(|op| ok(op, sale_lines, Reply::RedeemCode(Box::new(redemption()))))
            .collect(),
        // Redeemed, with the largest redemption.
        Reply::CodeState(_) => vec![ok(
            CODE_STATE,
            "redeemed, SALE_ITEMS_MAX lines of ITEM_ID_LEN_MAX",
            Reply::CodeState(CodeState::Redeemed(Box::new(redemption()))),
        )],
        // COUPON_USERS_MAX users (the decoder and `issue_coupons` refuse more), each issued a
        // coupon (a refusal is 3 bytes): CODE_TEXT_LEN text, the longest user.
        Reply::IssueCoupons(_) => vec![ok(
            ISSUE_COUPONS,
            "COUPON_USERS_MAX coupons, longest users",
            Reply::IssueCoupons(
                (0..COUPON_USERS_MAX as u64).map(|n| Ok(issued_coupon(n))).collect(),
            ),
        )],
        // Fixed-width.
        Reply::NotifyDelivery(_) => vec![ok(
            NOTIFY_DELIVERY,
            "fixed-width count",
            Reply::NotifyDelivery(Delivered { devices: u32::MAX }),
        )],
        // Each kind at its largest: a code and a coupon as above, a delivery notice with the
        // longest user, order reference and merchant (STORE_NAME_LEN_MAX).
        Reply::DeviceMessage(_) => vec![
            ok(
                DEVICE_MESSAGE,
                "issued code, longest user and order",
                Reply::DeviceMessage(DeviceMessage::Code(issued_code())),
            ),
            ok(
                DEVICE_MESSAGE,
                "coupon, longest user",
                Reply::DeviceMessage(DeviceMessage::Coupon(issued_coupon(u64::MAX))),
            ),
            ok(
                DEVICE_MESSAGE,
                "delivery, longest user, order and merchant",
                Reply::DeviceMessage(DeviceMessage::Delivery(delivery())),
            ),
        ],
    }
}

/// One value of every `Response` variant, its contents aside.
fn response_witnesses() -> Vec<Response> {
    vec![
        Response::Ok(Reply::Login(())),
        Response::Refused(ReasonCode::Malformed),
        Response::Busy { retry_after_ms: 0 },
        Response::InFlight,
        Response::Unauthenticated(String::new()),
        Response::Forbidden(String::new()),
        Response::BadRequest(String::new()),
        Response::UnknownOpcode,
        Response::ShuttingDown,
        Response::Internal(String::new()),
        Response::Moved { partition: 0, epoch: 0, address: String::new() },
        Response::FrameError { kind: 0, detail: String::new() },
    ]
}

/// The largest responses of `witness`'s status. No wildcard, as in `maximal_reply`.
fn maximal_response(witness: &Response) -> Vec<Case> {
    // Statuses other than OK say nothing about the operation: any opcode will do.
    let op = opcode::REDEEM_CODE;
    let case = |what, response| vec![Case { opcode: op, what, response }];
    // Free-text details have no limit of their own: a str8 carries STR8_MAX bytes.
    let detail = || text(STR8_MAX, 'x');
    match witness {
        Response::Ok(_) => reply_witnesses().iter().flat_map(maximal_reply).collect(),
        Response::Refused(_) => case("u16 reason", Response::Refused(ReasonCode::InvalidCoupon)),
        Response::Busy { .. } => {
            case("u32 retry-after", Response::Busy { retry_after_ms: u32::MAX })
        }
        Response::InFlight => case("empty", Response::InFlight),
        Response::Unauthenticated(_) => {
            case("detail at the str8 maximum", Response::Unauthenticated(detail()))
        }
        Response::Forbidden(_) => case("detail at the str8 maximum", Response::Forbidden(detail())),
        Response::BadRequest(_) => {
            case("detail at the str8 maximum", Response::BadRequest(detail()))
        }
        Response::UnknownOpcode => case("empty", Response::UnknownOpcode),
        Response::ShuttingDown => case("empty", Response::ShuttingDown),
        Response::Internal(_) => case("detail at the str8 maximum", Response::Internal(detail())),
        Response::Moved { .. } => case(
            "partition, epoch, address at the str8 maximum",
            Response::Moved { partition: u16::MAX, epoch: u64::MAX, address: detail() },
        ),
        // Sent with opcode 0.
        Response::FrameError { .. } => vec![Case {
            opcode: 0,
            what: "kind, detail at the str8 maximum",
            response: Response::FrameError {
                kind: frame::FrameError::TooLarge as u16,
                detail: detail(),
            },
        }],
    }
}

fn all_cases() -> Vec<Case> {
    response_witnesses().iter().flat_map(maximal_response).collect()
}

/// Encodes `case` both ways the server can, checks the body fits and decodes back; its length.
fn check(case: &Case) -> usize {
    let (status, body) = case.response.encode();
    assert!(
        body.len() <= BODY_LEN_MAX,
        "{:#06x} {}: {} bytes, over {BODY_LEN_MAX}",
        case.opcode,
        case.what,
        body.len()
    );
    assert_eq!(
        Response::decode(case.opcode, status, &body).as_ref(),
        Ok(&case.response),
        "{:#06x} {} decodes back",
        case.opcode,
        case.what
    );
    // In place, as the server writes it: one frame, the same status and body.
    let mut out = Vec::new();
    assert_eq!(case.response.encode_frame(case.opcode, 9, &mut out), status);
    let (frame, used) = frame::decode(&out).expect("a valid frame").expect("a whole frame");
    assert_eq!(used, out.len());
    assert_eq!((frame.opcode, frame.status, frame.request_id), (case.opcode, status, 9));
    assert_eq!(frame.flags & FLAG_RESPONSE, FLAG_RESPONSE);
    assert_eq!(frame.body, body);
    body.len()
}

#[test]
fn every_largest_reply_fits_a_frame_and_decodes_back() {
    let mut sizes = Vec::new();
    for witness in reply_witnesses() {
        for case in maximal_reply(&witness) {
            let Response::Ok(reply) = &case.response else { unreachable!("OK cases only") };
            assert_eq!(discriminant(reply), discriminant(&witness), "{}", case.what);
            sizes.push((check(&case), case.opcode, case.what));
        }
    }
    // The other statuses (`OK`'s arm is the reply cases above).
    for witness in response_witnesses().iter().filter(|w| !matches!(w, Response::Ok(_))) {
        for case in maximal_response(witness) {
            assert_eq!(discriminant(&case.response), discriminant(witness), "{}", case.what);
            check(&case);
        }
    }
    sizes.sort_by_key(|(len, _, _)| std::cmp::Reverse(*len));
    for (len, op, what) in &sizes {
        println!("{len:>6} bytes, margin {:>6}: {op:#06x} {what}", BODY_LEN_MAX - len);
    }
}

#[test]
fn every_response_opcode_and_status_has_a_case() {
    let cases = all_cases();
    let covered: BTreeSet<u16> = cases
        .iter()
        .filter(|case| matches!(case.response, Response::Ok(_)))
        .map(|case| case.opcode)
        .collect();
    let answered: BTreeSet<u16> =
        opcode::REQUESTS.iter().copied().chain([opcode::NOTICE, opcode::DEVICE_MESSAGE]).collect();
    assert_eq!(covered, answered, "every request and push has its largest reply, nothing else");
    let statuses: BTreeSet<u16> = cases.iter().map(|case| case.response.status()).collect();
    assert_eq!(statuses, status::ALL.iter().copied().collect());
    // One witness per variant.
    let variants: Vec<_> = reply_witnesses().iter().map(discriminant).collect();
    assert!(variants.iter().enumerate().all(|(i, v)| !variants[..i].contains(v)));
    let variants: Vec<_> = response_witnesses().iter().map(discriminant).collect();
    assert!(variants.iter().enumerate().all(|(i, v)| !variants[..i].contains(v)));
    // The pushes go out flagged as pushes.
    for case in
        cases.iter().filter(|case| [opcode::NOTICE, opcode::DEVICE_MESSAGE].contains(&case.opcode))
    {
        let mut out = Vec::new();
        case.response.encode_frame(case.opcode, 1, &mut out);
        assert_eq!(out[3], FLAG_RESPONSE | FLAG_PUSH, "{}", case.what);
    }
}

/// Decodes `bytes` as exactly one frame: an `INTERNAL` answer to request 42, opcode `op`.
fn assert_one_internal_frame(bytes: &[u8], op: u16) {
    let (frame, used) = frame::decode(bytes).expect("a valid frame").expect("a whole frame");
    assert_eq!(used, bytes.len(), "that frame and nothing else");
    assert_eq!(frame.flags, FLAG_RESPONSE);
    assert_eq!((frame.opcode, frame.status, frame.request_id), (op, status::INTERNAL, 42));
    match Response::decode(frame.opcode, frame.status, &frame.body) {
        Ok(Response::Internal(detail)) => {
            assert!(detail.contains("does not fit a frame"), "{detail}")
        }
        other => panic!("expected INTERNAL, got {other:?}"),
    }
}

#[test]
fn an_oversize_reply_is_answered_internal_in_one_frame() {
    // 1,000 of the largest coupons (what ISSUE_COUPONS allowed before COUPON_USERS_MAX was
    // 256), and a redemption of item IDs at the str8 maximum (what REDEEM_CODE allowed before
    // its item IDs were bounded).
    let oversize = [
        (
            opcode::ISSUE_COUPONS,
            Reply::IssueCoupons((0..1_000).map(|n| Ok(issued_coupon(n))).collect()),
        ),
        (opcode::REDEEM_CODE, Reply::RedeemCode(Box::new(redemption_with(STR8_MAX)))),
    ];
    for (op, reply) in oversize {
        let response = Response::Ok(reply);
        let body_len = response.encode().1.len();
        assert!(body_len > BODY_LEN_MAX, "{body_len} bytes");
        let mut out = Vec::new();
        assert_eq!(response.encode_frame(op, 42, &mut out), status::INTERNAL);
        assert_one_internal_frame(&out, op);
        // After frames already in the buffer: those stay as they were.
        let mut out = Vec::new();
        Response::Ok(Reply::Ping(Pong(b"hi".to_vec()))).encode_frame(opcode::PING, 41, &mut out);
        let before = out.clone();
        assert_eq!(response.encode_frame(op, 42, &mut out), status::INTERNAL);
        assert_eq!(out[..before.len()], before[..]);
        assert_one_internal_frame(&out[before.len()..], op);
    }
}
