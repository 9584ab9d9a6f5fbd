//! Hardening issue #19 (independent hostile review), over real sockets: what an identity can
//! learn or do that it should not, and what a retry may not repeat.

use settlegate_protocol::messages::SaleLines;
use settlegate_protocol::ops::notify_delivery::Delivered;
use settlegate_protocol::ops::{
    AddMeans, Auth, Authorize, Enroll, IssueCoupons, ListMeans, Login, NotifyDelivery,
    ProvisionDevice, RedeemCode, RevokeDeviceKey, RotateDeviceKey, SetDefaultMeans,
    SubscribeDevice, SubscribeNotices, TopUp, UsableMethods, Wallet,
};
use std::time::Duration;

use settlegate_engine::{ReasonCode, UserIdType, UserKey};
use settlegate_protocol::frame::{self, Frame};
use settlegate_protocol::messages::{CodeState, MeansInput};
use settlegate_protocol::messages::{Reply, Request, Response};
use settlegate_protocol::values::IssuedCode;
use settlegate_protocol::Client;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::support::server::*;
use crate::support::*;

/// A payment code of `amount` for `payer`, requested for store terminal `terminal`.
async fn issue_code(payer: &mut Payer, client: &Client, amount: u64, terminal: &str) -> IssuedCode {
    crate::support::server::issue_code(client, payer, amount, PROVIDER_OK, terminal, 300_000).await
}

/// The redemption of `code` for `amount` at `terminal`.
fn redeem(code: &IssuedCode, amount: u64, terminal: &str) -> Request {
    Request::RedeemCode(RedeemCode {
        client_request_id: request_id().get(),
        code: code.text.clone(),
        issuer: 1,
        number: code.number,
        amount_minor: amount,
        currency: jpy(),
        sale_at_ms: now_ms(),
        terminal_id: terminal.into(),
        lines: SaleLines::Items(vec![("ITEM-7".into(), 1, amount)]),
        coupon: None,
        order_ref: String::new(),
    })
}

/// A raw connection, authenticated with `key`, that sends frames as given and reads the
/// response frames as they come (bytes and all).
struct Raw {
    stream: TcpStream,
    input: Vec<u8>,
    next_id: u64,
}

impl Raw {
    async fn connect(server: &settlegate::server::RunningServer, key: &str) -> Raw {
        let stream = TcpStream::connect(server.addr).await.unwrap();
        let mut raw = Raw { stream, input: Vec::new(), next_id: 1 };
        let auth = raw.request(&Request::Auth(Auth { key: key.into() })).await;
        assert_eq!(auth.status, 0, "authenticated");
        raw
    }

    /// Sends `opcode` with `body`; returns the response frame.
    async fn send(&mut self, opcode: u16, body: Vec<u8>) -> Frame {
        let request_id = self.next_id;
        self.next_id += 1;
        let bytes = Frame::request(opcode, request_id, body).to_bytes();
        self.stream.write_all(&bytes).await.unwrap();
        loop {
            if let Some((frame, used)) = frame::decode(&self.input).unwrap() {
                self.input.drain(..used);
                assert_eq!(frame.request_id, request_id);
                return frame;
            }
            let mut chunk = [0u8; 4096];
            let n = tokio::time::timeout(Duration::from_secs(10), self.stream.read(&mut chunk))
                .await
                .expect("answered within 10 s")
                .unwrap();
            assert!(n > 0, "connection closed");
            self.input.extend_from_slice(&chunk[..n]);
        }
    }

    async fn request(&mut self, request: &Request) -> Frame {
        let frame = request.to_frame(0);
        self.send(frame.opcode, frame.body).await
    }
}

/// What a client sees of a response: opcode, status, flags and body (the request ID aside).
fn seen(frame: &Frame) -> (u16, u16, u8, Vec<u8>) {
    (frame.opcode, frame.status, frame.flags, frame.body.clone())
}

// ---- 7: operations that take a password do not tell who exists --------------------------

/// Every password-taking request, for `user` with `password`.
fn password_requests(user: &UserKey, password: &str, card_idm: [u8; 8]) -> Vec<Request> {
    vec![
        Request::Login(Login { user: user.clone(), password: password.into() }),
        Request::ProvisionDevice(ProvisionDevice {
            client_request_id: 77,
            user: user.clone(),
            password: password.into(),
            card_idm,
        }),
        Request::RotateDeviceKey(RotateDeviceKey {
            client_request_id: 78,
            user: user.clone(),
            password: password.into(),
            card_idm,
        }),
        Request::RevokeDeviceKey(RevokeDeviceKey {
            client_request_id: 79,
            user: user.clone(),
            password: password.into(),
            card_idm,
        }),
        Request::SubscribeNotices(SubscribeNotices {
            user: user.clone(),
            password: password.into(),
        }),
        Request::SubscribeDevice(SubscribeDevice {
            user: user.clone(),
            password: password.into(),
            card_idm,
        }),
    ]
}

/// LOGIN (and every other operation taking a password) answers an unknown user with the very
/// bytes it answers a wrong password with: `REFUSED` 53.
#[tokio::test]
async fn an_unknown_user_is_answered_as_a_wrong_password() {
    let mut config = server_config();
    // One failure per operation, without locking the known user.
    config.engine.login_failures_max = 100;
    let server = start_with(config).await;
    let admin = client(&server, ADMIN_KEY).await;
    let Payer { user: known, credential, .. } = enroll(&admin, "review-login").await;
    let ghost = UserKey::new(UserIdType::Mail, "nobody-here@example.com").unwrap();
    let mut raw = Raw::connect(&server, ADMIN_KEY).await;
    let wrong = password_requests(&known, "wrong password", credential.card_idm);
    let unknown = password_requests(&ghost, "wrong password", credential.card_idm);
    for (wrong, unknown) in wrong.iter().zip(&unknown) {
        let wrong_answer = raw.request(wrong).await;
        let unknown_answer = raw.request(unknown).await;
        assert_eq!(
            Response::decode(wrong_answer.opcode, wrong_answer.status, &wrong_answer.body),
            Ok(Response::Refused(ReasonCode::WrongPassword)),
            "opcode {:#06x}",
            wrong.opcode()
        );
        assert_eq!(seen(&unknown_answer), seen(&wrong_answer), "opcode {:#06x}", unknown.opcode());
    }
    server.shutdown().await;
}

/// And after the same work, so in the same time: an unknown user's login verifies against a
/// dummy hash and sends its failed attempt through the user's shard, logged (and, with
/// `fsync = always`, synced before the answer) as a known user's failed attempt is. Measured by
/// what it writes rather than by the clock, which other work on the machine disturbs: each
/// failed login, known user or not, appends one record of the same size to the shard logs.
#[tokio::test]
async fn an_unknown_user_costs_the_work_of_a_wrong_password() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = server_config();
    config.engine.durability.data_dir = Some(dir.path().to_owned());
    config.engine.durability.fsync = settlegate_engine::wal::FsyncPolicy::Always;
    config.engine.login_failures_max = 1_000;
    let server = start_with(config).await;
    let admin = client(&server, ADMIN_KEY).await;
    // IDs of the same length, so that their records are too.
    let Payer { user: known, .. } = enroll(&admin, "known-user1").await;
    let ghost = UserKey::new(UserIdType::Mail, "ghost-user1@example.com").unwrap();
    assert_eq!(known.id().len(), ghost.id().len());
    let logged = || -> u64 {
        std::fs::read_dir(dir.path())
            .unwrap()
            .map(|entry| entry.unwrap())
            .filter(|entry| entry.file_name().to_string_lossy().ends_with(".wal"))
            .map(|entry| entry.metadata().unwrap().len())
            .sum()
    };
    let mut raw = Raw::connect(&server, ADMIN_KEY).await;
    let login =
        |user: &UserKey| Request::Login(Login { user: user.clone(), password: "wrong!!!!".into() });
    let mut grew = Vec::new();
    for user in [&known, &ghost, &known, &ghost] {
        let before = logged();
        let answer = raw.request(&login(user)).await;
        assert_eq!(answer.status, settlegate_protocol::status::REFUSED);
        grew.push(logged() - before);
    }
    assert!(grew[0] > 0, "a failed login is logged");
    assert_eq!(grew, vec![grew[0]; 4], "bytes logged by: known, unknown, known, unknown");
    server.shutdown().await;
}

// ---- 12: a user ID that does not fit its type is refused with 51 --------------------------

/// A digits-only ID: a fine inherent number, and not a mail address.
const DIGITS: &str = "0123456789012345";

/// Every request that carries a `user` (in the layout of `docs/PROTOCOL.md`), for `user`.
fn user_requests(user: &UserKey) -> Vec<Request> {
    use settlegate_protocol::messages::{BestBy, MeansOrder};
    use settlegate_protocol::values::{CouponEffect, DeliveryNotice};
    let idm = [9; 8];
    let mut requests = password_requests(user, PASSWORD, idm);
    requests.extend([
        Request::Enroll(Enroll {
            client_request_id: 1,
            user: user.clone(),
            password: PASSWORD.into(),
            card_idm: idm,
        }),
        Request::AddMeans(AddMeans {
            client_request_id: 2,
            user: user.clone(),
            make_default: false,
            means: MeansInput::EMoney { emoney_type: "Suica".into() },
        }),
        Request::SetDefaultMeans(SetDefaultMeans {
            client_request_id: 3,
            user: user.clone(),
            means_id: 1,
        }),
        Request::ListMeans(ListMeans { user: user.clone(), order: MeansOrder::Registration }),
        Request::TopUp(TopUp {
            client_request_id: 4,
            user: user.clone(),
            means_id: 1,
            amount_minor: 100,
            currency: jpy(),
        }),
        Request::UsableMethods(UsableMethods {
            user: user.clone(),
            store_id: "S-1".into(),
            best_by: BestBy::MostUsed,
        }),
        Request::Wallet(Wallet { user: user.clone() }),
        Request::IssueCoupons(IssueCoupons {
            client_request_id: 5,
            provider_code: PROVIDER_OK,
            effect: CouponEffect::Percent { bps: 100 },
            uses: 1,
            expires_ms: i64::MAX,
            users: vec![user.clone()],
        }),
        Request::NotifyDelivery(NotifyDelivery {
            client_request_id: 6,
            notice: DeliveryNotice {
                user: user.clone(),
                order_ref: "ORDER-1".into(),
                amount_minor: 100,
                currency: jpy(),
                merchant: "M".into(),
            },
        }),
    ]);
    requests
}

/// `request`'s frame body with its `user` (the only one) of type `from` retyped as `to`.
fn retyped(request: &Request, id: &str, from: UserIdType, to: UserIdType) -> Vec<u8> {
    let mut body = Vec::new();
    request.encode_body(&mut body);
    let mut field = vec![from as u8, id.len() as u8];
    field.extend_from_slice(id.as_bytes());
    let at = body.windows(field.len()).position(|w| w == field).expect("the user is in the body");
    body[at] = to as u8;
    body
}

/// A well-formed request whose user ID does not fit its type is refused with reason 51, for
/// every operation that takes a user ID; a body that does not parse stays a `BAD_REQUEST`; an
/// identity that may not make the request is still told `FORBIDDEN`, and an unauthenticated
/// connection `UNAUTHENTICATED`.
#[tokio::test]
async fn a_user_id_that_does_not_fit_its_type_is_refused_with_51() {
    let server = start().await;
    let mut admin = Raw::connect(&server, ADMIN_KEY).await;
    let refused_51 = (settlegate_protocol::status::REFUSED, vec![0, 51]);
    let status_body = |frame: &Frame| (frame.status, frame.body.clone());

    // The issue's example: ENROLL of the mail address `no-at.example.com`.
    let mail = UserKey::new(UserIdType::Mail, "no@at.example.com").unwrap();
    let enroll = Request::Enroll(Enroll {
        client_request_id: request_id().get(),
        user: mail,
        password: PASSWORD.into(),
        card_idm: fresh_idm(),
    });
    let mut body = Vec::new();
    enroll.encode_body(&mut body);
    let at = body.windows(2).position(|w| w == b"o@").unwrap() + 1;
    body[at] = b'-';
    assert!(body.windows(17).any(|w| w == b"no-at.example.com"));
    assert_eq!(status_body(&admin.send(enroll.opcode(), body.clone()).await), refused_51);
    // The same with a byte too many: it does not parse.
    body.push(0);
    let answer = admin.send(enroll.opcode(), body).await;
    assert_eq!(answer.status, settlegate_protocol::status::BAD_REQUEST);

    // Every operation with a user: digits as a mail address, a mail address as a number.
    let number = UserKey::new(UserIdType::InherentNumber, DIGITS).unwrap();
    let address = UserKey::new(UserIdType::Mail, "someone@example.com").unwrap();
    for (user, from, to) in [
        (&number, UserIdType::InherentNumber, UserIdType::Mail),
        (&address, UserIdType::Mail, UserIdType::InherentNumber),
    ] {
        for request in user_requests(user) {
            let body = retyped(&request, user.id(), from, to);
            let answer = admin.send(request.opcode(), body).await;
            assert_eq!(status_body(&answer), refused_51, "opcode {:#06x}", request.opcode());
        }
    }
    // A mail address with nothing before its `@`, and one too long: 51 as well.
    let long = format!("{}@example.com", "a".repeat(60));
    for id in ["@example.com", long.as_str()] {
        let mut body = vec![1, id.len() as u8];
        body.extend_from_slice(id.as_bytes()); // WALLET: a user and nothing else
        let answer = admin.send(settlegate_protocol::opcode::WALLET, body).await;
        assert_eq!(status_body(&answer), refused_51, "{id}");
    }
    // An unknown user-ID type does not parse.
    let answer = admin.send(settlegate_protocol::opcode::WALLET, vec![3, 1, b'1']).await;
    assert_eq!(answer.status, settlegate_protocol::status::BAD_REQUEST);

    // Permissions and authentication come first.
    let mut shop = Raw::connect(&server, TERMINAL_KEY).await;
    let wallet = Request::Wallet(Wallet { user: number.clone() });
    let body = retyped(&wallet, DIGITS, UserIdType::InherentNumber, UserIdType::Mail);
    let answer = shop.send(wallet.opcode(), body.clone()).await;
    assert_eq!(answer.status, settlegate_protocol::status::FORBIDDEN);
    let mut stranger = TcpStream::connect(server.addr).await.unwrap();
    stranger.write_all(&Frame::request(wallet.opcode(), 9, body).to_bytes()).await.unwrap();
    let (bytes, _) = read_until_close(&mut stranger, Duration::from_millis(500)).await;
    let (answer, _) = frame::decode(&bytes).unwrap().expect("an answer");
    assert_eq!(answer.status, settlegate_protocol::status::UNAUTHENTICATED);
    server.shutdown().await;
}

// ---- 6: CODE_STATE tells a merchant about its own codes only -------------------------------

/// An identity that acts for terminals `SHOP-A-*` reads the state of the codes its terminals
/// redeemed, or (before redemption) were requested for; any other code, another merchant's
/// redemption above all, is answered with the very bytes of a code that does not exist
/// (`REFUSED` 102). The same after a restart, from the log and from a snapshot.
#[tokio::test]
async fn code_state_answers_only_for_the_identitys_own_terminals() {
    use settlegate_protocol::messages::opcode::CODE_STATE;
    let dir = tempfile::tempdir().unwrap();
    let config = |snapshot_every_records| {
        let mut config = server_config();
        config.engine.durability.data_dir = Some(dir.path().to_owned());
        config.engine.durability.snapshot_every_records = snapshot_every_records;
        config
    };
    let server = start_with(config(0)).await;
    let admin = client(&server, ADMIN_KEY).await;
    let mut payer = enroll(&admin, "review-codes").await;
    // Redeemed at another merchant's terminal (the issue's case).
    let theirs = issue_code(&mut payer, &admin, 3_000, "SHOP-B-1").await;
    admin.call_ok(&redeem(&theirs, 2_500, "SHOP-B-1")).await.unwrap();
    // Requested for one of SHOP-A's terminals, not redeemed yet.
    let waiting = issue_code(&mut payer, &admin, 1_000, "SHOP-A-1").await;
    // Requested with no store named, redeemed at SHOP-A.
    let ours = issue_code(&mut payer, &admin, 2_000, "*").await;
    let shop = client(&server, TERMINAL_KEY).await;
    shop.call_ok(&redeem(&ours, 1_500, "SHOP-A-2")).await.unwrap();
    // Requested with no store named, not redeemed: nobody's yet.
    let loose = issue_code(&mut payer, &admin, 500, "*").await;
    server.shutdown().await;

    // Before and after restarts: from the log alone, then from a snapshot.
    for snapshot_every_records in [0, 1, 1] {
        let server = start_with(config(snapshot_every_records)).await;
        let mut shop = Raw::connect(&server, TERMINAL_KEY).await;
        let mut admin = Raw::connect(&server, ADMIN_KEY).await;
        let state = |number: u64| number.to_be_bytes().to_vec();
        let none = shop.send(CODE_STATE, state(theirs.number + 1_000)).await;
        assert_eq!(
            Response::decode(CODE_STATE, none.status, &none.body),
            Ok(Response::Refused(ReasonCode::UnknownCode))
        );
        for hidden in [&theirs, &loose] {
            let answer = shop.send(CODE_STATE, state(hidden.number)).await;
            assert_eq!(seen(&answer), seen(&none), "code {:#x}", hidden.number);
            // The admin identity (terminal pattern `*`) sees it.
            assert_eq!(admin.send(CODE_STATE, state(hidden.number)).await.status, 0);
        }
        let answer = shop.send(CODE_STATE, state(waiting.number)).await;
        assert_eq!(
            Response::decode(CODE_STATE, answer.status, &answer.body),
            Ok(Response::Ok(Reply::CodeState(CodeState::Issued)))
        );
        let answer = shop.send(CODE_STATE, state(ours.number)).await;
        let Ok(Response::Ok(Reply::CodeState(state))) =
            Response::decode(CODE_STATE, answer.status, &answer.body)
        else {
            panic!("SHOP-A reads its own redemption")
        };
        let CodeState::Redeemed(redemption) = state else { panic!("redeemed") };
        assert_eq!(
            (redemption.terminal_id.as_str(), redemption.captured_minor),
            ("SHOP-A-2", 1_500)
        );
        if snapshot_every_records > 0 {
            // A record in the codes' shard, so it writes a snapshot: the next restart reads it.
            let admin = client(&server, ADMIN_KEY).await;
            let login =
                Request::Login(Login { user: payer.user.clone(), password: PASSWORD.into() });
            admin.call_ok(&login).await.unwrap();
        }
        server.shutdown().await;
    }
    let snapshots = std::fs::read_dir(dir.path())
        .unwrap()
        .filter(|e| e.as_ref().unwrap().file_name().to_string_lossy().ends_with(".snap"))
        .count();
    assert!(snapshots > 0, "the last restart read a snapshot");
}

// ---- 9: a lost or stolen device's keys are revoked at once, durably ------------------------

/// `REVOKE_DEVICE_KEY` refuses the device's current key at once, and a rotated-out key still
/// in its grace window with it; the revocation survives a restart (from the log, then from a
/// snapshot); a later rotation gives the device a working key again.
#[tokio::test]
async fn a_revoked_device_key_is_refused_at_once_and_after_a_restart() {
    use settlegate_engine::AuthOutcome;
    let dir = tempfile::tempdir().unwrap();
    let config = |snapshot_every_records| {
        let mut config = server_config();
        config.engine.durability.data_dir = Some(dir.path().to_owned());
        config.engine.durability.snapshot_every_records = snapshot_every_records;
        config
    };
    let server = start_with(config(0)).await;
    let admin = client(&server, ADMIN_KEY).await;
    let mut payer = enroll(&admin, "review-revoke").await;
    let pay = |payer: &mut Payer| {
        Request::Authorize(Authorize {
            client_request_id: request_id().get(),
            inherent_id: payer.sign(100, PROVIDER_OK, "SHOP-A-1"),
        })
    };
    let outcome = |reply| match reply {
        Reply::Authorize(outcome) => outcome,
        other => panic!("not an outcome: {other:?}"),
    };
    approved(outcome(admin.call_ok(&pay(&mut payer)).await.unwrap()));
    // A rotation leaves the old key valid for the grace window (a day): that is the problem.
    let (user, card_idm) = (payer.user.clone(), payer.credential.card_idm);
    let rotate = |password: &str| {
        Request::RotateDeviceKey(RotateDeviceKey {
            client_request_id: request_id().get(),
            user: user.clone(),
            password: password.into(),
            card_idm,
        })
    };
    let Reply::RotateDeviceKey(rotated) = admin.call_ok(&rotate(PASSWORD)).await.unwrap() else {
        panic!()
    };
    let stolen = payer.credential.clone();
    approved(outcome(admin.call_ok(&pay(&mut payer)).await.unwrap()));
    // Revocation needs the password, and is idempotent.
    let revoke = |client_request_id, password: &str| {
        Request::RevokeDeviceKey(RevokeDeviceKey {
            client_request_id,
            user: user.clone(),
            password: password.into(),
            card_idm,
        })
    };
    assert_eq!(
        admin.call(&revoke(request_id().get(), "not the password")).await.unwrap(),
        Response::Refused(ReasonCode::WrongPassword)
    );
    let id = request_id();
    assert_eq!(
        admin.call_ok(&revoke(id.get(), PASSWORD)).await.unwrap(),
        Reply::RevokeDeviceKey(())
    );
    assert_eq!(
        admin.call_ok(&revoke(id.get(), PASSWORD)).await.unwrap(),
        Reply::RevokeDeviceKey(())
    );
    let refused = AuthOutcome::Declined(ReasonCode::KeyVersionInvalid);
    // Neither the rotated-out key (the thief's) nor the current one signs anything now.
    for credential in [&stolen, &rotated] {
        payer.credential = credential.clone();
        assert_eq!(outcome(admin.call_ok(&pay(&mut payer)).await.unwrap()), refused);
    }
    server.shutdown().await;

    // After restarts: from the log alone, then from a snapshot.
    for snapshot_every_records in [0, 1, 1] {
        let server = start_with(config(snapshot_every_records)).await;
        let admin = client(&server, ADMIN_KEY).await;
        for credential in [&stolen, &rotated] {
            payer.credential = credential.clone();
            assert_eq!(outcome(admin.call_ok(&pay(&mut payer)).await.unwrap()), refused);
        }
        if snapshot_every_records > 0 {
            // A record in the user's shard, so it writes a snapshot for the next restart.
            let login =
                Request::Login(Login { user: payer.user.clone(), password: PASSWORD.into() });
            admin.call_ok(&login).await.unwrap();
        }
        server.shutdown().await;
    }
    // The device found again: a rotation gives it a key that works.
    let server = start_with(config(0)).await;
    let admin = client(&server, ADMIN_KEY).await;
    let Reply::RotateDeviceKey(fresh) = admin.call_ok(&rotate(PASSWORD)).await.unwrap() else {
        panic!()
    };
    assert_eq!(fresh.key_version, rotated.key_version + 2, "the revocation took a version");
    payer.credential = fresh;
    approved(outcome(admin.call_ok(&pay(&mut payer)).await.unwrap()));
    for credential in [&stolen, &rotated] {
        payer.credential = credential.clone();
        assert_eq!(outcome(admin.call_ok(&pay(&mut payer)).await.unwrap()), refused);
    }
    server.shutdown().await;
}

// ---- 13: NOTIFY_DELIVERY is idempotent by client request ID -------------------------------

/// A retried `NOTIFY_DELIVERY` (same client request ID, same notice) is answered as the first
/// was and notifies nobody again, also after a restart; the same ID with another notice is
/// refused with 40.
#[tokio::test]
async fn a_retried_delivery_notice_notifies_once() {
    use settlegate_protocol::messages::DeviceMessage;
    use settlegate_protocol::values::DeliveryNotice;
    let dir = tempfile::tempdir().unwrap();
    let mut config = server_config();
    config.engine.durability.data_dir = Some(dir.path().to_owned());
    let server = start_with(config.clone()).await;
    let admin = client(&server, ADMIN_KEY).await;
    let Payer { user, credential, .. } = enroll(&admin, "review-delivery").await;
    let subscribe = Request::SubscribeDevice(SubscribeDevice {
        user: user.clone(),
        password: PASSWORD.into(),
        card_idm: credential.card_idm,
    });
    let device = client(&server, ADMIN_KEY).await;
    let (_, mut pushes) = device.subscribe_device(&subscribe).await.unwrap();
    let notice = DeliveryNotice {
        user: user.clone(),
        order_ref: "ORDER-4411".into(),
        amount_minor: 4_980,
        currency: jpy(),
        merchant: "Review Books".into(),
    };
    let id = request_id();
    let notify = |client_request_id, notice: &DeliveryNotice| {
        Request::NotifyDelivery(NotifyDelivery { client_request_id, notice: notice.clone() })
    };
    assert_eq!(
        admin.call_ok(&notify(id.get(), &notice)).await.unwrap(),
        Reply::NotifyDelivery(Delivered { devices: 1 })
    );
    let pushed = tokio::time::timeout(Duration::from_secs(5), pushes.recv()).await.unwrap();
    assert_eq!(pushed.unwrap(), Reply::DeviceMessage(DeviceMessage::Delivery(notice.clone())));
    // The retry: the first answer, and nothing pushed.
    assert_eq!(
        admin.call_ok(&notify(id.get(), &notice)).await.unwrap(),
        Reply::NotifyDelivery(Delivered { devices: 1 })
    );
    let again = tokio::time::timeout(Duration::from_millis(500), pushes.recv()).await;
    assert!(again.is_err(), "a retry notifies nobody: {again:?}");
    // The same ID for another notice.
    let other = DeliveryNotice { amount_minor: 1, ..notice.clone() };
    assert_eq!(
        admin.call(&notify(id.get(), &other)).await.unwrap(),
        Response::Refused(ReasonCode::IdempotencyConflict)
    );
    server.shutdown().await;

    // After a restart the retry is still answered from its first answer, and pushes nothing.
    let server = start_with(config).await;
    let admin = client(&server, ADMIN_KEY).await;
    let device = client(&server, ADMIN_KEY).await;
    let (_, mut pushes) = device.subscribe_device(&subscribe).await.unwrap();
    assert_eq!(
        admin.call_ok(&notify(id.get(), &notice)).await.unwrap(),
        Reply::NotifyDelivery(Delivered { devices: 1 })
    );
    let again = tokio::time::timeout(Duration::from_millis(500), pushes.recv()).await;
    assert!(again.is_err(), "a retry after a restart notifies nobody: {again:?}");
    // A new ID is a new notice.
    assert_eq!(
        admin.call_ok(&notify(request_id().get(), &notice)).await.unwrap(),
        Reply::NotifyDelivery(Delivered { devices: 1 })
    );
    assert!(tokio::time::timeout(Duration::from_secs(5), pushes.recv()).await.is_ok());
    server.shutdown().await;
}
