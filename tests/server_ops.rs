//! Every protocol operation, black-box over 127.0.0.1:0 through the Rust client.

use settlegate_protocol::messages::{BasketOutcome, MeansList, SaleLines, WalletEntries};
use settlegate_protocol::ops::code_state::GetCodeState;
use settlegate_protocol::ops::ping::Pong;
use settlegate_protocol::ops::server_info::GetServerInfo;
use settlegate_protocol::ops::{
    AddMeans, Auth, Authorize, AuthorizeBasket, ConfirmTerminal, IssueCode, ListMeans, Login, Ping,
    ProvisionDevice, RedeemCode, RegisterAge, RegisterTerminals, RemoveTerminals, RotateDeviceKey,
    SetAgePolicy, SetDefaultMeans, StoreAt, StoreBySignal, SubscribeDevice, TopUp, UpsertStore,
    UsableMethods, Wallet,
};
use std::time::Duration;

use settlegate_engine::{AuthOutcome, MeansKind, ReasonCode, UserIdType, UserKey};
use settlegate_protocol::messages::{MeansInput, MeansOrder, TerminalConfirmation, TerminalEntry};
use settlegate_protocol::messages::{Reply, Request, Response, PING_PAYLOAD_MAX};
use settlegate_protocol::values::{Discount, TerminalService};
use settlegate_protocol::Client;

use crate::support::server::*;
use crate::support::*;

#[tokio::test]
async fn connection_level_operations_and_authentication() {
    let server = start().await;
    let client = Client::connect(server.addr).await.unwrap();
    // PING and SERVER_INFO need no authentication.
    assert_eq!(
        client.call_ok(&Request::Ping(Ping { payload: b"abc".to_vec() })).await.unwrap(),
        Reply::Ping(Pong(b"abc".to_vec()))
    );
    let Reply::ServerInfo(info) =
        client.call_ok(&Request::ServerInfo(GetServerInfo)).await.unwrap()
    else {
        panic!()
    };
    assert_eq!(info.protocol_version, 1);
    assert_eq!(info.providers.iter().map(|p| p.0).collect::<Vec<_>>(), vec![100, 200, 300]);
    // Anything else needs it.
    let listing = Request::ListMeans(ListMeans {
        user: UserKey::new(UserIdType::Mail, "x@example.com").unwrap(),
        order: MeansOrder::Registration,
    });
    assert!(matches!(client.call(&listing).await.unwrap(), Response::Unauthenticated(_)));
    client.authenticate(ADMIN_KEY).await.unwrap();
    assert_eq!(client.call(&listing).await.unwrap(), Response::Refused(ReasonCode::UnknownUser));
    // A wrong key is refused and the connection closed.
    let other = Client::connect(server.addr).await.unwrap();
    let refused = other.call(&Request::Auth(Auth { key: "nope".into() })).await.unwrap();
    assert!(matches!(refused, Response::Unauthenticated(_)));
    assert!(
        other.call(&Request::Ping(Ping { payload: vec![] })).await.is_err(),
        "closed after a failed AUTH"
    );
    server.shutdown().await;
}

#[tokio::test]
async fn account_operations() {
    let server = start().await;
    let client = client(&server, ADMIN_KEY).await;
    let payer = enroll(&client, "ops-accounts").await;
    let login = |password: &str| {
        Request::Login(Login { user: payer.user.clone(), password: password.into() })
    };
    assert_eq!(client.call_ok(&login(PASSWORD)).await.unwrap(), Reply::Login(()));
    assert_eq!(
        client.call(&login("wrong password")).await.unwrap(),
        Response::Refused(ReasonCode::WrongPassword)
    );
    let emoney = Request::AddMeans(AddMeans {
        client_request_id: request_id().get(),
        user: payer.user.clone(),
        make_default: false,
        means: MeansInput::EMoney { emoney_type: "Suica".into() },
    });
    let Reply::AddMeans(added) = client.call_ok(&emoney).await.unwrap() else { panic!() };
    assert_eq!(added.last4, None);
    let set_default = Request::SetDefaultMeans(SetDefaultMeans {
        client_request_id: request_id().get(),
        user: payer.user.clone(),
        means_id: added.means_id,
    });
    assert_eq!(client.call_ok(&set_default).await.unwrap(), Reply::SetDefaultMeans(()));
    let listing =
        Request::ListMeans(ListMeans { user: payer.user.clone(), order: MeansOrder::Registration });
    let Reply::ListMeans(MeansList(means)) = client.call_ok(&listing).await.unwrap() else {
        panic!()
    };
    assert_eq!(means.len(), 2);
    assert_eq!(means.iter().find(|m| m.is_default).unwrap().kind, MeansKind::EMoney);
    assert!(means[0].token.is_some());
    // The listing's bytes never carry the card number.
    let raw = listing.to_frame(1).to_bytes();
    assert!(!String::from_utf8_lossy(&raw).contains("5555555555554444"));
    let provision = Request::ProvisionDevice(ProvisionDevice {
        client_request_id: request_id().get(),
        user: payer.user.clone(),
        password: PASSWORD.into(),
        card_idm: fresh_idm(),
    });
    let Reply::ProvisionDevice(second) = client.call_ok(&provision).await.unwrap() else {
        panic!()
    };
    assert_eq!(second.key_version, 1);
    let stolen = Request::RotateDeviceKey(RotateDeviceKey {
        client_request_id: request_id().get(),
        user: payer.user.clone(),
        password: "not the password".into(),
        card_idm: payer.credential.card_idm,
    });
    assert_eq!(
        client.call(&stolen).await.unwrap(),
        Response::Refused(ReasonCode::WrongPassword),
        "a device key is rotated only for someone who knows the password"
    );
    let rotate = Request::RotateDeviceKey(RotateDeviceKey {
        client_request_id: request_id().get(),
        user: payer.user.clone(),
        password: PASSWORD.into(),
        card_idm: payer.credential.card_idm,
    });
    let Reply::RotateDeviceKey(rotated) = client.call_ok(&rotate).await.unwrap() else { panic!() };
    assert_eq!(rotated.key_version, 2);
    assert_ne!(rotated.device_key, payer.credential.device_key);
    server.shutdown().await;
}

#[tokio::test]
async fn provider_terminals_and_confirmation() {
    let server = start().await;
    let client = client(&server, ADMIN_KEY).await;
    let service = TerminalService {
        discount: Discount::Fixed { amount_minor: 100, currency: jpy() },
        valid_from_ms: 0,
        valid_until_ms: i64::MAX,
        description: "100 yen off".into(),
    };
    let register = Request::RegisterTerminals(RegisterTerminals {
        client_request_id: request_id().get(),
        provider_code: PROVIDER_OK,
        terminals: vec![
            TerminalEntry { terminal_id: "SHOP-A-1".into(), service: Some(service.clone()) },
            TerminalEntry { terminal_id: "SHOP-A-2".into(), service: None },
        ],
    });
    assert_eq!(client.call_ok(&register).await.unwrap(), Reply::RegisterTerminals(()));
    let confirm = |id: &str| {
        Request::ConfirmTerminal(ConfirmTerminal {
            provider_code: PROVIDER_OK,
            terminal_id: id.into(),
        })
    };
    assert_eq!(
        client.call_ok(&confirm("SHOP-A-1")).await.unwrap(),
        Reply::ConfirmTerminal(TerminalConfirmation::Listed { service: Some(service) })
    );
    assert_eq!(
        client.call_ok(&confirm("SHOP-A-2")).await.unwrap(),
        Reply::ConfirmTerminal(TerminalConfirmation::Listed { service: None })
    );
    let remove = Request::RemoveTerminals(RemoveTerminals {
        client_request_id: request_id().get(),
        provider_code: PROVIDER_OK,
        terminal_ids: vec!["SHOP-A-2".into()],
    });
    assert_eq!(client.call_ok(&remove).await.unwrap(), Reply::RemoveTerminals(()));
    assert_eq!(
        client.call_ok(&confirm("SHOP-A-2")).await.unwrap(),
        Reply::ConfirmTerminal(TerminalConfirmation::NotListed)
    );
    let unknown = Request::ConfirmTerminal(ConfirmTerminal {
        provider_code: 4_242,
        terminal_id: "SHOP-A-1".into(),
    });
    assert_eq!(
        client.call(&unknown).await.unwrap(),
        Response::Refused(ReasonCode::UnknownProvider)
    );
    server.shutdown().await;
}

#[tokio::test]
async fn authorize_with_discount_retry_replay_and_notice() {
    let server = start().await;
    let client = client(&server, ADMIN_KEY).await;
    let mut payer = enroll(&client, "ops-authorize").await;
    let register = Request::RegisterTerminals(RegisterTerminals {
        client_request_id: request_id().get(),
        provider_code: PROVIDER_OK,
        terminals: vec![TerminalEntry {
            terminal_id: "SHOP-A-9".into(),
            service: Some(TerminalService {
                discount: Discount::Percent { bps: 1_000 },
                valid_from_ms: 0,
                valid_until_ms: i64::MAX,
                description: String::new(),
            }),
        }],
    });
    client.call_ok(&register).await.unwrap();
    let listener = Client::connect(server.addr).await.unwrap();
    listener.authenticate(ADMIN_KEY).await.unwrap();
    let mut notices = listener.subscribe_notices(&payer.user, PASSWORD).await.unwrap();

    let bytes = payer.sign(2_000, PROVIDER_OK, "SHOP-A-9");
    let id = request_id();
    let outcome = client.authorize(id.get(), bytes.clone()).await.unwrap();
    let approval = approved(outcome);
    assert_eq!((approval.discount_minor, approval.amount_final_minor), (200, 1_800));
    assert_eq!(
        client.authorize(id.get(), bytes.clone()).await.unwrap(),
        outcome,
        "retry: same outcome"
    );
    assert_eq!(
        client.authorize(request_id().get(), bytes).await.unwrap(),
        AuthOutcome::Declined(ReasonCode::ReplayedNonce)
    );
    let notice =
        tokio::time::timeout(Duration::from_secs(5), notices.recv()).await.unwrap().unwrap();
    assert_eq!((notice.client_request_id, notice.outcome), (id.get(), outcome));
    // A wrong password does not subscribe.
    let refused = listener.subscribe_notices(&payer.user, "wrong password").await;
    assert!(refused.is_err());
    server.shutdown().await;
}

#[tokio::test]
async fn pipelined_requests_are_matched_by_id() {
    let server = start().await;
    let client = std::sync::Arc::new(client(&server, ADMIN_KEY).await);
    // 30 devices with 10 payments each in flight: a device's counters stay within the replay
    // window however the server's batches interleave.
    let mut payers = Vec::new();
    for i in 0..30 {
        payers.push(enroll(&client, &format!("ops-pipeline-{i}")).await);
    }
    let requests: Vec<(u64, Vec<u8>)> = (0..300)
        .map(|i| (1_000 + i, payers[i as usize % 30].sign(1_000 + i, PROVIDER_OK, "T-1")))
        .collect();
    let calls = requests.into_iter().map(|(amount, bytes)| {
        let client = client.clone();
        async move { (amount, client.authorize(request_id().get(), bytes).await.unwrap()) }
    });
    let results = futures::future::join_all(calls).await;
    for (amount, outcome) in results {
        assert_eq!(
            approved(outcome).amount_final_minor,
            amount,
            "each reply belongs to its request"
        );
    }
    server.shutdown().await;
}

/// More complete frames in one read than the connection's in-flight limit: they are taken
/// a limit's worth at a time, and every one is answered (none waits for another read).
#[tokio::test]
async fn a_read_of_more_frames_than_the_in_flight_limit_is_answered_whole() {
    let mut config = server_config();
    config.server.in_flight_max = 4;
    let server = start_with(config).await;
    let mut bytes = Vec::new();
    Request::Auth(Auth { key: ADMIN_KEY.into() }).encode_frame(1, &mut bytes).unwrap();
    for id in 2..=41u64 {
        Request::Ping(Ping { payload: id.to_be_bytes().to_vec() })
            .encode_frame(id, &mut bytes)
            .unwrap();
    }
    let mut stream = raw(&server, &bytes).await;
    let mut input = Vec::new();
    let mut answered = std::collections::BTreeSet::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while answered.len() < 41 {
        let mut chunk = [0u8; 4096];
        let read = tokio::time::timeout_at(
            deadline,
            tokio::io::AsyncReadExt::read(&mut stream, &mut chunk),
        );
        let n = read.await.expect("every frame answered within 5 s").unwrap();
        assert!(n > 0, "closed after {} answers", answered.len());
        input.extend_from_slice(&chunk[..n]);
        while let Some((frame, used)) = settlegate_protocol::frame::decode(&input).unwrap() {
            input.drain(..used);
            assert_eq!(frame.status, 0, "request {}", frame.request_id);
            assert!(answered.insert(frame.request_id), "answered twice");
        }
    }
    assert_eq!(answered, (1..=41).collect());
    server.shutdown().await;
}

#[tokio::test]
async fn identities_are_held_to_their_permissions_and_scopes() {
    let server = start().await;
    let admin = client(&server, ADMIN_KEY).await;
    let mut payer = enroll(&admin, "ops-scopes").await;
    let shop = client(&server, TERMINAL_KEY).await;
    // Its own terminals: fine.
    approved(
        shop.authorize(request_id().get(), payer.sign(500, PROVIDER_OK, "SHOP-A-77"))
            .await
            .unwrap(),
    );
    // Another merchant's terminal: forbidden.
    let other = Request::Authorize(Authorize {
        client_request_id: request_id().get(),
        inherent_id: payer.sign(500, PROVIDER_OK, "SHOP-B-1"),
    });
    assert!(matches!(shop.call(&other).await.unwrap(), Response::Forbidden(_)));
    // No account or provider permissions.
    let listing =
        Request::ListMeans(ListMeans { user: payer.user.clone(), order: MeansOrder::Registration });
    assert!(matches!(shop.call(&listing).await.unwrap(), Response::Forbidden(_)));
    let register = Request::RegisterTerminals(RegisterTerminals {
        client_request_id: request_id().get(),
        provider_code: PROVIDER_OK,
        terminals: vec![TerminalEntry { terminal_id: "SHOP-A-1".into(), service: None }],
    });
    assert!(matches!(shop.call(&register).await.unwrap(), Response::Forbidden(_)));
    // The admin identity may not manage a provider outside its list either.
    let foreign = Request::RegisterTerminals(RegisterTerminals {
        client_request_id: request_id().get(),
        provider_code: 4_242,
        terminals: vec![TerminalEntry { terminal_id: "X".into(), service: None }],
    });
    assert!(matches!(admin.call(&foreign).await.unwrap(), Response::Forbidden(_)));
    server.shutdown().await;
}

#[tokio::test]
async fn busy_engine_answers_busy_with_a_retry_hint() {
    let mut config = server_config();
    config.engine.mailbox_capacity = 1;
    let server = start_with(config).await;
    let admin = client(&server, ADMIN_KEY).await;
    let mut payer = enroll(&admin, "ops-busy").await;
    // One batch per connection reaches the shard as one message: use several connections.
    let mut clients = Vec::new();
    for _ in 0..8 {
        clients.push(std::sync::Arc::new(client(&server, ADMIN_KEY).await));
    }
    let release = server.engine.stall_shard_of(&payer.user);
    let calls: Vec<_> = (0..8)
        .map(|i| {
            let client = clients[i].clone();
            let bytes = payer.sign(100, PROVIDER_OK, "T-1");
            tokio::spawn(async move {
                client
                    .call(&Request::Authorize(Authorize {
                        client_request_id: request_id().get(),
                        inherent_id: bytes,
                    }))
                    .await
                    .unwrap()
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(300)).await;
    drop(release);
    let mut busy = 0;
    for call in calls {
        match call.await.unwrap() {
            Response::Busy { retry_after_ms } => {
                assert!(retry_after_ms > 0);
                busy += 1;
            }
            Response::Ok(Reply::Authorize(outcome)) => {
                approved(outcome);
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    assert!(busy > 0, "a full shard mailbox must surface as BUSY");
    server.shutdown().await;
}

#[tokio::test]
async fn health_readiness_and_metrics() {
    let server = start().await;
    let client = client(&server, ADMIN_KEY).await;
    client.call_ok(&Request::Ping(Ping { payload: vec![] })).await.unwrap();
    let (status, body) = http_get(&server, "/healthz").await;
    assert!(status.contains("200"), "{status}");
    assert_eq!(body.trim(), "ok");
    let (status, _) = http_get(&server, "/readyz").await;
    assert!(status.contains("200"), "{status}");
    let (status, body) = http_get(&server, "/metrics").await;
    assert!(status.contains("200"));
    assert!(body.contains("settlegate_requests_total{op=\"ping\",status=\"ok\"} 1"), "{body}");
    assert!(body.contains("settlegate_connections_open"), "{body}");
    // Counted by the engine itself, read at the scrape.
    assert!(body.contains("settlegate_completions_dropped_total 0"), "{body}");
    server.shutdown().await;
}

#[tokio::test]
async fn age_registry_over_the_wire() {
    use settlegate_engine::age::{Date, VerificationMethod};
    use settlegate_engine::AgeRecord;
    use settlegate_protocol::messages::{AgeCheck, AgePolicy, OnAgeFailure};
    use settlegate_protocol::values::{Basket, BasketItem};

    let server = start().await;
    let admin = client(&server, ADMIN_KEY).await;
    let mut payer = enroll(&admin, "age-wire").await;
    let terminals = Request::RegisterTerminals(RegisterTerminals {
        client_request_id: request_id().get(),
        provider_code: PROVIDER_OK,
        terminals: vec![TerminalEntry { terminal_id: "SHOP-A-AGE".into(), service: None }],
    });
    admin.call_ok(&terminals).await.unwrap();
    let policy = AgePolicy {
        jurisdiction: "JP".into(),
        time_zone: "Asia/Tokyo".into(),
        on_failure: OnAgeFailure::RemoveItems,
        strict: false,
    };
    let set = |policy| {
        Request::SetAgePolicy(SetAgePolicy {
            client_request_id: request_id().get(),
            provider_code: PROVIDER_OK,
            terminal_id: "SHOP-A-AGE".into(),
            policy,
        })
    };
    assert_eq!(admin.call_ok(&set(Some(policy.clone()))).await.unwrap(), Reply::SetAgePolicy(()));
    let bad = AgePolicy { time_zone: "Nowhere/Land".into(), ..policy };
    assert_eq!(
        admin.call(&set(Some(bad))).await.unwrap(),
        Response::Refused(ReasonCode::InvalidAgePolicy)
    );

    // A1: the terminal registers a 17-year-old after biometric authentication.
    payer.counter += 1;
    let record = AgeRecord {
        key_version: payer.credential.key_version,
        card_idm: payer.credential.card_idm,
        user: payer.user.clone(),
        birth_date: Date::new(2009, 6, 1).unwrap(),
        method: VerificationMethod::Ekyc,
        verified_at_ms: now_ms() - 60_000,
        valid_until_ms: now_ms() + 86_400_000,
        counter: payer.counter,
        timestamp_ms: now_ms(),
    }
    .sign(payer.credential.device_key.expose());
    let register =
        Request::RegisterAge(RegisterAge { client_request_id: request_id().get(), record });
    assert_eq!(admin.call_ok(&register).await.unwrap(), Reply::RegisterAge(()));

    // A2: a store terminal identity (authorize only) pays for beer and bread; the beer goes.
    let shop = client(&server, TERMINAL_KEY).await;
    let basket = Basket {
        age_confirmation: true,
        items: vec![
            BasketItem {
                item_id: "BEER".into(),
                category: "alcohol".into(),
                quantity: 2,
                unit_amount_minor: 300,
            },
            BasketItem {
                item_id: "BREAD".into(),
                category: String::new(),
                quantity: 1,
                unit_amount_minor: 250,
            },
        ],
    };
    let pay = Request::AuthorizeBasket(AuthorizeBasket {
        client_request_id: request_id().get(),
        inherent_id: payer.sign(850, PROVIDER_OK, "SHOP-A-AGE"),
        basket: basket.clone(),
    });
    let Reply::AuthorizeBasket(BasketOutcome {
        outcome: AuthOutcome::Approved(approval),
        verdict: Some(verdict),
    }) = shop.call_ok(&pay).await.unwrap()
    else {
        panic!("expected an approval with a verdict")
    };
    assert_eq!(approval.amount_final_minor, 250);
    assert_eq!(verdict.check, AgeCheck::NotHeld);
    assert_eq!(verdict.items, vec!["BEER".to_owned()]);
    // The shop may not change age policies or register ages.
    assert!(matches!(shop.call(&set(None)).await.unwrap(), Response::Forbidden(_)));
    // A basket that does not add up to the signed amount: no verdict.
    let mismatch = Request::AuthorizeBasket(AuthorizeBasket {
        client_request_id: request_id().get(),
        inherent_id: payer.sign(999, PROVIDER_OK, "SHOP-A-AGE"),
        basket,
    });
    assert_eq!(
        shop.call_ok(&mismatch).await.unwrap(),
        Reply::AuthorizeBasket(BasketOutcome {
            outcome: AuthOutcome::Declined(ReasonCode::BasketMismatch),
            verdict: None
        })
    );
}

#[tokio::test]
async fn stores_and_wallet_over_the_wire() {
    use settlegate_protocol::messages::degrees_to_e7;
    use settlegate_protocol::messages::{BestBy, Signal};
    use settlegate_protocol::values::{AcceptedMethod, Store};

    let server = start().await;
    let admin = client(&server, ADMIN_KEY).await;
    let store = Store {
        store_id: "WIRE-STORE".into(),
        name: "Wire Mart".into(),
        industry: "5411".into(),
        address: "1 Wire St".into(),
        latitude: 35.6812,
        longitude: 139.7671,
        beacons: vec!["wire-beacon".into()],
        wifi: Vec::new(),
        qr_code: None,
        accepts: vec![AcceptedMethod { kind: MeansKind::EMoney, brand: "suica".into() }],
    };
    let upsert = Request::UpsertStore(UpsertStore {
        client_request_id: request_id().get(),
        store: store.clone(),
    });
    assert_eq!(admin.call_ok(&upsert).await.unwrap(), Reply::UpsertStore(()));
    // A terminal-only identity may not manage stores.
    let shop = client(&server, TERMINAL_KEY).await;
    assert!(matches!(shop.call(&upsert).await.unwrap(), Response::Forbidden(_)));

    let at = Request::StoreAt(StoreAt {
        latitude_e7: degrees_to_e7(35.6815),
        longitude_e7: degrees_to_e7(139.7671),
        radius_m: 100,
    });
    let Reply::StoreAt(entered) = admin.call_ok(&at).await.unwrap() else { panic!() };
    assert_eq!(entered.store, store);
    let metres = entered.distance_m.unwrap();
    assert!((33.0..34.0).contains(&metres), "{metres}");
    let far = Request::StoreAt(StoreAt { latitude_e7: 0, longitude_e7: 0, radius_m: 100 });
    assert_eq!(admin.call(&far).await.unwrap(), Response::Refused(ReasonCode::NoStoreInRange));
    let by_beacon =
        Request::StoreBySignal(StoreBySignal { signal: Signal::Beacon, id: "wire-beacon".into() });
    let Reply::StoreBySignal(entered) = admin.call_ok(&by_beacon).await.unwrap() else { panic!() };
    assert_eq!(entered.store.store_id, "WIRE-STORE");

    // A payer with a card (not accepted there) and a topped-up suica.
    let payer = enroll(&admin, "wallet-wire").await;
    let suica = Request::AddMeans(AddMeans {
        client_request_id: request_id().get(),
        user: payer.user.clone(),
        make_default: false,
        means: MeansInput::EMoney { emoney_type: "Suica".into() },
    });
    let Reply::AddMeans(added) = admin.call_ok(&suica).await.unwrap() else { panic!() };
    let top_up = Request::TopUp(TopUp {
        client_request_id: request_id().get(),
        user: payer.user.clone(),
        means_id: added.means_id,
        amount_minor: 3_000,
        currency: jpy(),
    });
    let Reply::TopUp(balance) = admin.call_ok(&top_up).await.unwrap() else { panic!() };
    assert_eq!((balance.balance_minor, balance.currency), (3_000, Some(jpy())));
    let usable = Request::UsableMethods(UsableMethods {
        user: payer.user.clone(),
        store_id: "WIRE-STORE".into(),
        best_by: BestBy::LargestBalance,
    });
    let Reply::UsableMethods(usable) = admin.call_ok(&usable).await.unwrap() else { panic!() };
    let marks: Vec<bool> = usable.methods.iter().map(|m| m.usable).collect();
    assert_eq!(marks, vec![false, true], "the mastercard is not accepted, the suica is");
    assert_eq!(usable.best, Some(added.means_id));
    let Reply::Wallet(WalletEntries(wallet)) =
        admin.call_ok(&Request::Wallet(Wallet { user: payer.user.clone() })).await.unwrap()
    else {
        panic!()
    };
    assert_eq!(wallet[1].balance.unwrap().available_minor, 3_000);
    assert!(wallet[0].balance.is_none());
    assert!(wallet[0].label.starts_with("mastercard "), "{}", wallet[0].label);
}

#[tokio::test]
async fn payment_codes_over_the_wire() {
    use settlegate_protocol::messages::{CodeOutcome, CodeState, DeviceMessage};

    let server = start().await;
    let admin = client(&server, ADMIN_KEY).await;
    let mut payer = enroll(&admin, "code-wire").await;
    // The device subscribes to its own stream.
    let device = Client::connect(server.addr).await.unwrap();
    device.authenticate(ADMIN_KEY).await.unwrap();
    let subscribe = Request::SubscribeDevice(SubscribeDevice {
        user: payer.user.clone(),
        password: PASSWORD.into(),
        card_idm: payer.credential.card_idm,
    });
    let (reply, mut pushes) = device.subscribe_device(&subscribe).await.unwrap();
    assert_eq!(reply, Reply::SubscribeDevice(()));

    let issue = Request::IssueCode(IssueCode {
        client_request_id: request_id().get(),
        inherent_id: payer.sign(6_000, PROVIDER_OK, "*"),
        validity_ms: 300_000,
        deliver_to: None,
        order_ref: String::new(),
    });
    let Reply::IssueCode(CodeOutcome::Issued(code)) = admin.call_ok(&issue).await.unwrap() else {
        panic!("code issued")
    };
    let pushed =
        tokio::time::timeout(Duration::from_secs(5), pushes.recv()).await.unwrap().unwrap();
    assert_eq!(pushed, Reply::DeviceMessage(DeviceMessage::Code((*code).clone())));

    // A store terminal redeems it for less; a second attempt is refused.
    let shop = client(&server, TERMINAL_KEY).await;
    let redeem = |client_request_id| {
        Request::RedeemCode(RedeemCode {
            client_request_id,
            code: code.text.clone(),
            issuer: 1,
            number: code.number,
            amount_minor: 5_500,
            currency: jpy(),
            sale_at_ms: now_ms(),
            terminal_id: "SHOP-A-POS1".into(),
            lines: SaleLines::Items(vec![("ITEM".into(), 1, 5_500)]),
            coupon: None,
            order_ref: String::new(),
        })
    };
    let Reply::RedeemCode(redemption) = shop.call_ok(&redeem(request_id().get())).await.unwrap()
    else {
        panic!("redeemed")
    };
    assert_eq!((redemption.captured_minor, redemption.released_minor), (5_500, 500));
    assert_eq!(
        shop.call(&redeem(request_id().get())).await.unwrap(),
        Response::Refused(ReasonCode::CodeRedeemed)
    );
    let state = Request::CodeState(GetCodeState { number: code.number });
    let Reply::CodeState(state) = shop.call_ok(&state).await.unwrap() else { panic!() };
    assert!(matches!(state, CodeState::Redeemed(_)));
    // The shop identity may act only for its own terminals.
    let mut elsewhere = redeem(request_id().get());
    if let Request::RedeemCode(request) = &mut elsewhere {
        request.terminal_id = "OTHER-POS".into();
    }
    assert!(matches!(shop.call(&elsewhere).await.unwrap(), Response::Forbidden(_)));
}

/// The first `count` answers on `stream`, by request ID, in the order they arrived (each
/// within 10 s; every one with status 0).
async fn answers_in_arrival(
    stream: &mut tokio::net::TcpStream,
    count: usize,
) -> Vec<(u64, Response)> {
    let (mut input, mut answers) = (Vec::new(), Vec::new());
    while answers.len() < count {
        let mut chunk = [0u8; 4096];
        let read = tokio::time::timeout(
            Duration::from_secs(10),
            tokio::io::AsyncReadExt::read(stream, &mut chunk),
        );
        let n = read.await.expect("answered within 10 s").unwrap();
        assert!(n > 0, "closed after {answers:?}");
        input.extend_from_slice(&chunk[..n]);
        while let Some((frame, used)) = settlegate_protocol::frame::decode(&input).unwrap() {
            input.drain(..used);
            assert_eq!(frame.status, 0, "request {}", frame.request_id);
            let response = Response::decode(frame.opcode, frame.status, &frame.body).unwrap();
            answers.push((frame.request_id, response));
        }
    }
    answers
}

/// A read's payments for one provider go to it as one batch under one deadline: over the wire,
/// every payment is answered once, those the provider answered by its timeout as it said,
/// the rest declined as timed out (a provider answering in 1 to 800 ms, a timeout of 300 ms).
#[tokio::test]
async fn a_batch_for_one_provider_stands_as_answered_by_its_deadline_and_times_out_the_rest() {
    const SPREAD: u32 = 800;
    let mut config = server_config();
    config.engine.request_deadline_ms = 10_000;
    let mut provider = simulated_provider_between(SPREAD, "spread", 1_000, 800_000);
    provider.limits.timeout_ms = 300;
    config.engine.providers.push(provider);
    let server = start_with(config).await;
    let admin = client(&server, ADMIN_KEY).await;
    let mut payer = enroll(&admin, "batch-deadline").await;
    let mut bytes = Vec::new();
    Request::Auth(Auth { key: ADMIN_KEY.into() }).encode_frame(1, &mut bytes).unwrap();
    const PAYMENTS: u64 = 24;
    for id in 2..2 + PAYMENTS {
        let payment = Authorize {
            client_request_id: request_id().get(),
            inherent_id: payer.sign(100, SPREAD, "T-1"),
        };
        Request::Authorize(payment).encode_frame(id, &mut bytes).unwrap();
    }
    let mut stream = raw(&server, &bytes).await;
    let mut answered = std::collections::BTreeMap::new();
    for (request_id, response) in answers_in_arrival(&mut stream, PAYMENTS as usize + 1).await {
        let outcome = match response {
            Response::Ok(Reply::Authorize(outcome)) => Some(outcome),
            _ if request_id == 1 => None,
            other => panic!("request {request_id}: {other:?}"),
        };
        assert!(answered.insert(request_id, outcome).is_none(), "answered twice");
    }
    let outcomes: Vec<AuthOutcome> = answered.into_values().flatten().collect();
    let approved = outcomes.iter().filter(|o| matches!(o, AuthOutcome::Approved(_))).count();
    let timed_out = (outcomes.iter())
        .filter(|o| **o == AuthOutcome::Declined(ReasonCode::ProviderTimeout))
        .count();
    assert_eq!(approved + timed_out, PAYMENTS as usize, "{outcomes:?}");
    assert!(approved > 0 && timed_out > 0, "{approved} approved, {timed_out} timed out");
    server.shutdown().await;
}

/// A batch's groups of answers are written by the batch's own task when the writer task has
/// nothing queued, and queued for it otherwise: with several pipelined batches answered by a
/// provider at 0-2 ms and `PING`s (answered through the writer task) between them, every frame
/// arrives whole and every request is answered once.
#[tokio::test]
async fn answers_written_by_their_batches_and_by_the_writer_arrive_whole_and_once() {
    const SPREAD: u32 = 810;
    const BATCHES: u64 = 8;
    const PAYMENTS: u64 = 40;
    const PINGS: u64 = 20;
    let mut config = server_config();
    let mut provider = simulated_provider_between(SPREAD, "zero-to-two-ms", 0, 2_000);
    provider.limits.concurrency_max = 1_000;
    config.engine.providers.push(provider);
    let server = start_with(config).await;
    let admin = client(&server, ADMIN_KEY).await;
    let mut stream =
        raw(&server, &Request::Auth(Auth { key: ADMIN_KEY.into() }).to_frame(1).to_bytes()).await;
    let mut next_id = 2;
    let (mut payments, mut pings) = (Vec::new(), Vec::new());
    for batch in 0..BATCHES {
        let mut payer = enroll(&admin, &format!("writers-{batch}")).await;
        let mut bytes = Vec::new();
        for n in 0..PAYMENTS {
            let payment = Authorize {
                client_request_id: request_id().get(),
                inherent_id: payer.sign(100, SPREAD, "T-1"),
            };
            Request::Authorize(payment).encode_frame(next_id, &mut bytes).unwrap();
            payments.push(next_id);
            next_id += 1;
            if n % (PAYMENTS / PINGS) == 0 {
                let ping = Ping { payload: vec![b'p'; PING_PAYLOAD_MAX] };
                Request::Ping(ping).encode_frame(next_id, &mut bytes).unwrap();
                pings.push(next_id);
                next_id += 1;
            }
        }
        tokio::io::AsyncWriteExt::write_all(&mut stream, &bytes).await.unwrap();
    }
    let mut answered = std::collections::BTreeSet::new();
    let count = 1 + payments.len() + pings.len();
    for (request_id, response) in answers_in_arrival(&mut stream, count).await {
        match response {
            Response::Ok(Reply::Authorize(AuthOutcome::Approved(_))) => {
                assert!(payments.contains(&request_id), "request {request_id}")
            }
            Response::Ok(Reply::Ping(Pong(payload))) => {
                assert!(pings.contains(&request_id), "request {request_id}");
                assert_eq!(payload, vec![b'p'; PING_PAYLOAD_MAX]);
            }
            _ if request_id == 1 => {}
            other => panic!("request {request_id}: {other:?}"),
        }
        assert!(answered.insert(request_id), "request {request_id} answered twice");
    }
    assert_eq!(answered.len(), count);
    server.shutdown().await;
}

/// No head-of-line blocking: of two `AUTHORIZE`s sent in one write, one to a provider that
/// answers after 2 s and one to a faster provider, the faster one's answer arrives first,
/// whether its provider decides in the shard (zero latency) or answers after 1 ms through the
/// asynchronous provider path. The order of arrival is checked, not a time.
#[tokio::test]
async fn a_slow_provider_holds_back_only_its_own_answers() {
    const PROVIDER_2S: u32 = 600;
    const PROVIDER_1MS: u32 = 700;
    let mut config = server_config();
    config.engine.request_deadline_ms = 10_000;
    for (code, name, latency_us) in
        [(PROVIDER_2S, "two-seconds", 2_000_000), (PROVIDER_1MS, "one-ms", 1_000)]
    {
        config.engine.providers.push(simulated_provider(code, name, latency_us));
    }
    let server = start_with(config).await;
    let admin = client(&server, ADMIN_KEY).await;
    let mut slow_payer = enroll(&admin, "hol-slow").await;
    let mut fast_payer = enroll(&admin, "hol-fast").await;
    for fast_provider in [PROVIDER_OK, PROVIDER_1MS] {
        let mut bytes = Vec::new();
        Request::Auth(Auth { key: ADMIN_KEY.into() }).encode_frame(1, &mut bytes).unwrap();
        let slow = Authorize {
            client_request_id: request_id().get(),
            inherent_id: slow_payer.sign(2_000, PROVIDER_2S, "T-1"),
        };
        let fast = Authorize {
            client_request_id: request_id().get(),
            inherent_id: fast_payer.sign(1_000, fast_provider, "T-1"),
        };
        Request::Authorize(slow).encode_frame(2, &mut bytes).unwrap();
        Request::Authorize(fast).encode_frame(3, &mut bytes).unwrap();
        let mut stream = raw(&server, &bytes).await;
        let mut arrived = Vec::new();
        for (request_id, response) in answers_in_arrival(&mut stream, 3).await {
            if request_id > 1 {
                let Response::Ok(Reply::Authorize(outcome)) = response else {
                    panic!("request {request_id}: {response:?}")
                };
                assert!(matches!(outcome, AuthOutcome::Approved(_)), "{outcome:?}");
            }
            arrived.push(request_id);
        }
        assert_eq!(
            arrived,
            [1, 3, 2],
            "provider {fast_provider}: the fast payment's answer comes before the slow one's"
        );
    }
    server.shutdown().await;
}
