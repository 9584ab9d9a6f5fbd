//! W1–W3: stores, the entered store (GPS, beacon, QR poster), the wallet's balances and what
//! is usable where.

use settlegate_engine::emvqr;
use settlegate_engine::AddMeansOptions;
use settlegate_engine::{
    AcceptedMethod, AuthOutcome, AuthorizeRequest, BestBy, EngineError, InherentId, MeansInput,
    MeansKind, ReasonCode, Signal, Store,
};

use crate::support::*;

fn store(id: &str, latitude: f64, longitude: f64) -> Store {
    Store {
        store_id: id.into(),
        name: format!("Store {id}"),
        industry: "convenience".into(),
        address: "1-1 Somewhere".into(),
        latitude,
        longitude,
        beacons: Vec::new(),
        wifi: Vec::new(),
        qr_code: None,
        accepts: vec![
            AcceptedMethod { kind: MeansKind::CreditCard, brand: "visa".into() },
            AcceptedMethod { kind: MeansKind::EMoney, brand: "suica".into() },
        ],
    }
}

fn refusal<T: std::fmt::Debug>(result: Result<T, EngineError>) -> ReasonCode {
    match result {
        Err(EngineError::Refused(reason)) => reason,
        other => panic!("expected a refusal, got {other:?}"),
    }
}

async fn add(h: &Harness, stores: Vec<Store>) {
    for s in stores {
        h.engine.upsert_store(request_id(), s).await.expect("store accepted");
    }
}

#[tokio::test]
async fn the_nearest_store_among_several_and_none_in_range() {
    let h = Harness::new();
    // Around Shibuya crossing (35.6595, 139.7005).
    add(
        &h,
        vec![
            store("HACHIKO", 35.6590, 139.7006),
            store("CENTER-GAI", 35.6605, 139.6985),
            store("DOGENZAKA", 35.6575, 139.6965),
        ],
    )
    .await;
    let found = h.engine.store_at(35.6595, 139.7005, 500).await.unwrap();
    assert_eq!(found.store.store_id, "HACHIKO");
    let metres = found.distance_m.unwrap();
    assert!((50.0..60.0).contains(&metres), "about 56 m, got {metres}");
    assert!(found.tied.is_empty());
    // A smaller radius than the nearest store's distance: no store.
    assert_eq!(refusal(h.engine.store_at(35.6595, 139.7005, 30).await), ReasonCode::NoStoreInRange);
    // Far away: no store either.
    assert_eq!(refusal(h.engine.store_at(0.0, 0.0, 50_000).await), ReasonCode::NoStoreInRange);
    // Out-of-range input is refused, not guessed at.
    assert_eq!(refusal(h.engine.store_at(91.0, 0.0, 100).await), ReasonCode::InvalidPosition);
    assert_eq!(refusal(h.engine.store_at(0.0, 0.0, 50_001).await), ReasonCode::InvalidPosition);
    assert_eq!(refusal(h.engine.store_at(f64::NAN, 0.0, 100).await), ReasonCode::InvalidPosition);
}

#[tokio::test]
async fn a_tie_goes_to_the_lowest_id_and_lists_the_others() {
    let h = Harness::new();
    add(&h, vec![store("TIE-B", 0.001, 0.0), store("TIE-A", -0.001, 0.0)]).await;
    let found = h.engine.store_at(0.0, 0.0, 1_000).await.unwrap();
    assert_eq!(found.store.store_id, "TIE-A");
    assert_eq!(found.tied, vec!["TIE-B".to_owned()]);
    // Mirrored along a meridian away from the equator: equal to the millimetre, a tie too,
    // whatever the last bits of the floating-point arithmetic say.
    add(&h, vec![store("MIRROR-N", 10.001, 20.0), store("MIRROR-S", 9.999, 20.0)]).await;
    let found = h.engine.store_at(10.0, 20.0, 1_000).await.unwrap();
    assert_eq!(found.store.store_id, "MIRROR-N");
    assert_eq!(found.tied, vec!["MIRROR-S".to_owned()]);
}

#[tokio::test]
async fn a_store_just_across_the_antimeridian() {
    let h = Harness::new();
    // Fiji straddles the antimeridian. The point is at 179.9990 E; one store 220 m east at
    // 179.9990 W, another 330 m west on the point's own side.
    add(&h, vec![store("ACROSS", -17.0, -179.9989), store("SAME-SIDE", -17.0, 179.9959)]).await;
    let found = h.engine.store_at(-17.0, 179.9990, 1_000).await.unwrap();
    assert_eq!(found.store.store_id, "ACROSS");
    let metres = found.distance_m.unwrap();
    assert!((200.0..240.0).contains(&metres), "about 225 m, got {metres}");
    // And near the pole, every longitude is near.
    add(&h, vec![store("POLE", 89.9999, 45.0)]).await;
    let found = h.engine.store_at(89.9998, -135.0, 100).await.unwrap();
    assert_eq!(found.store.store_id, "POLE");
}

#[tokio::test]
async fn beacon_wifi_and_qr_poster_resolution() {
    let h = Harness::new();
    let body = "000201010211\
                26190015jp.example.pay1\
                27220018com.example.wallet\
                5204541153033925802JP5910Demo Store6005Tokyo6304";
    let mpm = format!("{body}{}", emvqr::crc_hex(body));
    let mut poster = store("POSTER", 35.0, 135.0);
    poster.qr_code = Some(mpm.clone());
    poster.beacons = vec!["f7826da6-4fa2-4e98-8024-bc5b71e0893e:1:7".into()];
    poster.wifi = vec!["00:11:22:33:44:55".into()];
    let mut plain = store("PLAIN", 35.1, 135.1);
    plain.qr_code = Some("POSTER-PLAIN-0001".into());
    add(&h, vec![poster, plain]).await;

    let by_beacon = h
        .engine
        .store_by_signal(Signal::Beacon, "f7826da6-4fa2-4e98-8024-bc5b71e0893e:1:7")
        .await
        .unwrap();
    assert_eq!(by_beacon.store.store_id, "POSTER");
    let by_wifi = h.engine.store_by_signal(Signal::Wifi, "00:11:22:33:44:55").await.unwrap();
    assert_eq!(by_wifi.store.store_id, "POSTER");
    let by_qr = h.engine.store_by_signal(Signal::QrPoster, &mpm).await.unwrap();
    assert_eq!(by_qr.store.store_id, "POSTER");
    assert_eq!(by_qr.qr_networks, vec!["jp.example.pay1", "com.example.wallet"]);
    let plain = h.engine.store_by_signal(Signal::QrPoster, "POSTER-PLAIN-0001").await.unwrap();
    assert_eq!(plain.store.store_id, "PLAIN");
    assert!(plain.qr_networks.is_empty());

    // An unknown beacon, and a poster whose CRC does not match.
    let unknown = h.engine.store_by_signal(Signal::Beacon, "no-such-beacon").await;
    assert_eq!(refusal(unknown), ReasonCode::UnknownStore);
    let mut forged = mpm.clone();
    forged.replace_range(forged.len() - 1.., if mpm.ends_with('0') { "1" } else { "0" });
    let forged = h.engine.store_by_signal(Signal::QrPoster, &forged).await;
    assert_eq!(refusal(forged), ReasonCode::InvalidQrCode);
    // A store cannot register a poster with a bad CRC, nor another store's beacon.
    let mut bad = store("BAD", 35.2, 135.2);
    bad.qr_code = Some(format!("{body}0000"));
    assert_eq!(refusal(h.engine.upsert_store(request_id(), bad).await), ReasonCode::InvalidQrCode);
    let mut thief = store("THIEF", 35.3, 135.3);
    thief.wifi = vec!["00:11:22:33:44:55".into()];
    assert_eq!(refusal(h.engine.upsert_store(request_id(), thief).await), ReasonCode::StoreIdInUse);
}

#[tokio::test]
async fn moving_and_removing_a_store() {
    let h = Harness::new();
    let mut moving = store("MOVER", 35.0, 135.0);
    moving.beacons = vec!["beacon-mover".into()];
    add(&h, vec![moving.clone()]).await;
    // Move it half a world away (another cell, very likely another shard).
    moving.latitude = -33.8688;
    moving.longitude = 151.2093;
    h.engine.upsert_store(request_id(), moving).await.unwrap();
    assert_eq!(refusal(h.engine.store_at(35.0, 135.0, 1_000).await), ReasonCode::NoStoreInRange);
    let found = h.engine.store_at(-33.8688, 151.2093, 100).await.unwrap();
    assert_eq!(found.store.store_id, "MOVER");
    let by_beacon = h.engine.store_by_signal(Signal::Beacon, "beacon-mover").await.unwrap();
    assert_eq!(by_beacon.store.latitude, -33.8688);
    h.engine.remove_store(request_id(), "MOVER").await.unwrap();
    assert_eq!(
        refusal(h.engine.store_by_signal(Signal::Beacon, "beacon-mover").await),
        ReasonCode::UnknownStore
    );
    assert_eq!(
        refusal(h.engine.remove_store(request_id(), "MOVER").await),
        ReasonCode::UnknownStore
    );
    // Invalid stores are refused.
    let mut bad = store("", 0.0, 0.0);
    assert_eq!(
        refusal(h.engine.upsert_store(request_id(), bad.clone()).await),
        ReasonCode::InvalidStore
    );
    bad.store_id = "OK".into();
    bad.longitude = 180.5;
    assert_eq!(refusal(h.engine.upsert_store(request_id(), bad).await), ReasonCode::InvalidStore);
}

/// A user with a visa card (means 1) and the given extra means.
async fn wallet_user(h: &Harness, name: &str, extra: Vec<MeansInput>) -> TestUser {
    let user = h.user(name).await;
    for means in extra {
        h.engine
            .add_means(request_id(), &user.user, &means, AddMeansOptions::default())
            .await
            .unwrap();
    }
    user
}

fn suica() -> MeansInput {
    MeansInput::EMoney { emoney_type: "suica".into() }
}

fn pay(user: &TestUser, means: MeansKind, means_id: u32, amount: u64) -> AuthorizeRequest {
    let record = InherentId { means, means_id, ..user.record(T0_MS, amount, PROVIDER_OK, "W-T1") };
    AuthorizeRequest {
        client_request_id: request_id(),
        inherent_id: record.sign(user.credential.device_key.expose()),
    }
}

#[tokio::test]
async fn balances_change_with_top_ups_and_settlements() {
    let h = Harness::new();
    let user = wallet_user(&h, "purse", vec![suica()]).await;
    let emoney = 2;
    // A card keeps no balance; a purse starts empty and takes one currency.
    let card_top_up = h.engine.top_up(request_id(), &user.user, 1, 1_000, jpy()).await;
    assert_eq!(refusal(card_top_up), ReasonCode::NotStoredValue);
    let balance = h.engine.top_up(request_id(), &user.user, emoney, 5_000, jpy()).await.unwrap();
    assert_eq!((balance.balance_minor, balance.available_minor), (5_000, 5_000));
    let usd = settlegate_engine::Currency::try_from("USD").unwrap();
    let wrong = h.engine.top_up(request_id(), &user.user, emoney, 100, usd).await;
    assert_eq!(refusal(wrong), ReasonCode::CurrencyMismatch);

    // A settlement debits the purse.
    approved(h.engine.authorize(pay(&user, MeansKind::EMoney, emoney, 1_200)).await.unwrap());
    let wallet = h.engine.list_means(&user.user, Default::default()).await.unwrap();
    let purse = wallet.iter().find(|m| m.means_id == emoney).unwrap();
    assert_eq!(purse.balance.unwrap().balance_minor, 3_800);
    assert_eq!(purse.uses, 1);
    assert_eq!(purse.last_used_ms, Some(T0_MS));
    // More than the balance is declined before any provider is asked.
    let too_much = h.engine.authorize(pay(&user, MeansKind::EMoney, emoney, 3_801)).await.unwrap();
    assert_eq!(too_much, AuthOutcome::Declined(ReasonCode::InsufficientBalance));
    // A provider decline releases the hold and debits nothing.
    let declined = InherentId {
        means: MeansKind::EMoney,
        means_id: emoney,
        ..user.record(T0_MS, 1_000, PROVIDER_DECLINE, "W-T1")
    };
    let declined = AuthorizeRequest {
        client_request_id: request_id(),
        inherent_id: declined.sign(user.credential.device_key.expose()),
    };
    let outcome = h.engine.authorize(declined).await.unwrap();
    assert_eq!(outcome, AuthOutcome::Declined(ReasonCode::ProviderDoNotHonor));
    let wallet = h.engine.list_means(&user.user, Default::default()).await.unwrap();
    let balance = wallet.iter().find(|m| m.means_id == emoney).unwrap().balance.unwrap();
    assert_eq!((balance.balance_minor, balance.available_minor), (3_800, 3_800));
    // The card has no balance and is untouched.
    assert!(wallet.iter().find(|m| m.means_id == 1).unwrap().balance.is_none());
}

#[tokio::test]
async fn usable_methods_best_by_usage_or_balance() {
    let h = Harness::new();
    add(&h, vec![store("KIOSK", 35.68, 139.76)]).await;
    // Means 1: visa card; 2: suica; 3: nanaco (not accepted at the kiosk); 4: a second suica.
    let user = wallet_user(
        &h,
        "chooser",
        vec![suica(), MeansInput::EMoney { emoney_type: "nanaco".into() }, suica()],
    )
    .await;
    h.engine.top_up(request_id(), &user.user, 2, 1_000, jpy()).await.unwrap();
    h.engine.top_up(request_id(), &user.user, 4, 9_000, jpy()).await.unwrap();
    h.engine.top_up(request_id(), &user.user, 3, 50_000, jpy()).await.unwrap();
    for _ in 0..3 {
        approved(h.engine.authorize(pay(&user, MeansKind::CreditCard, 1, 500)).await.unwrap());
    }
    approved(h.engine.authorize(pay(&user, MeansKind::EMoney, 2, 100)).await.unwrap());

    let by_use = h.engine.usable_methods(&user.user, "KIOSK", BestBy::MostUsed).await.unwrap();
    let usable: Vec<(u32, bool)> =
        by_use.methods.iter().map(|m| (m.means.means_id, m.usable)).collect();
    assert_eq!(usable, vec![(1, true), (2, true), (3, false), (4, true)]);
    assert_eq!(by_use.best, Some(1), "the card was used most");
    assert!(by_use.accepted.is_empty());
    let balances: Vec<Option<u64>> =
        by_use.methods.iter().map(|m| m.means.balance.map(|b| b.balance_minor)).collect();
    assert_eq!(balances, vec![None, Some(900), Some(50_000), Some(9_000)]);

    let by_balance =
        h.engine.usable_methods(&user.user, "KIOSK", BestBy::LargestBalance).await.unwrap();
    assert_eq!(by_balance.best, Some(4), "nanaco has more, but the kiosk does not take it");
    assert_eq!(
        refusal(h.engine.usable_methods(&user.user, "NO-SUCH-STORE", BestBy::MostUsed).await),
        ReasonCode::UnknownStore
    );
}

#[tokio::test]
async fn nothing_usable_lists_what_the_store_takes() {
    let h = Harness::new();
    let mut cash_only = store("CASH-ONLY", 35.0, 135.0);
    cash_only.accepts.clear();
    add(&h, vec![store("KIOSK", 35.68, 139.76), cash_only]).await;
    // A user with no methods at all: everything empty, and the hint.
    let bare = h.user("bare").await;
    let bare_user = bare.user.clone();
    let card_only = h.engine.usable_methods(&bare_user, "KIOSK", BestBy::MostUsed).await.unwrap();
    assert_eq!(card_only.best, Some(1), "the harness user has a visa card");
    let nobody =
        settlegate_engine::UserKey::new(settlegate_engine::UserIdType::Mail, "nobody@example.com")
            .unwrap();
    assert_eq!(
        refusal(h.engine.usable_methods(&nobody, "KIOSK", BestBy::MostUsed).await),
        ReasonCode::UnknownUser
    );
    let enrolled_only = {
        let user = settlegate_engine::UserKey::new(
            settlegate_engine::UserIdType::Mail,
            "nomeans@example.com",
        )
        .unwrap();
        h.engine
            .enroll(settlegate_engine::EnrollRequest {
                client_request_id: request_id(),
                user: user.clone(),
                password: PASSWORD.into(),
                card_idm: fresh_idm(),
            })
            .await
            .unwrap();
        user
    };
    let none = h.engine.usable_methods(&enrolled_only, "KIOSK", BestBy::MostUsed).await.unwrap();
    assert!(none.methods.is_empty());
    assert_eq!(none.best, None);
    assert_eq!(none.accepted.len(), 2, "register a visa card or a suica");
    // A store that lists no methods: nothing is usable and there is nothing to suggest.
    let cash = h.engine.usable_methods(&bare_user, "CASH-ONLY", BestBy::MostUsed).await.unwrap();
    assert!(cash.methods.iter().all(|m| !m.usable));
    assert_eq!(cash.best, None);
    assert!(cash.accepted.is_empty());
    // An empty purse is not usable.
    h.engine
        .add_means(request_id(), &bare_user, &suica(), AddMeansOptions::default())
        .await
        .unwrap();
    let empty = h.engine.usable_methods(&bare_user, "KIOSK", BestBy::LargestBalance).await.unwrap();
    assert_eq!(empty.methods.iter().map(|m| m.usable).collect::<Vec<_>>(), vec![true, false]);
    assert_eq!(empty.best, Some(1), "no purse has a balance: the most used");
}

#[tokio::test]
async fn stores_and_balances_survive_a_restart() {
    for snapshot_every_records in [0, 4] {
        let dir = tempfile::tempdir().unwrap();
        let durable = || durable_config(dir.path(), snapshot_every_records);
        let h = Harness::with_config(durable());
        let mut kiosk = store("KIOSK", 35.68, 139.76);
        kiosk.beacons = vec!["kiosk-beacon".into()];
        add(&h, vec![kiosk, store("OTHER", 10.0, 10.0)]).await;
        let mut moved = store("OTHER", -20.0, -40.0);
        moved.wifi = vec!["aa:bb".into()];
        h.engine.upsert_store(request_id(), moved).await.unwrap();
        let user = wallet_user(&h, "restart", vec![suica()]).await;
        h.engine.top_up(request_id(), &user.user, 2, 2_000, jpy()).await.unwrap();
        approved(h.engine.authorize(pay(&user, MeansKind::EMoney, 2, 700)).await.unwrap());
        h.engine.shutdown().await;
        drop(h);

        let h = Harness::with_config(durable());
        let kiosk = h.engine.store_by_signal(Signal::Beacon, "kiosk-beacon").await.unwrap();
        assert_eq!(kiosk.store.store_id, "KIOSK");
        let other = h.engine.store_by_signal(Signal::Wifi, "aa:bb").await.unwrap();
        assert_eq!(other.store.latitude, -20.0);
        assert_eq!(refusal(h.engine.store_at(10.0, 10.0, 1_000).await), ReasonCode::NoStoreInRange);
        let usable = h.engine.usable_methods(&user.user, "KIOSK", BestBy::LargestBalance).await;
        let usable = usable.unwrap();
        let purse = usable.methods.iter().find(|m| m.means.means_id == 2).unwrap();
        assert_eq!(
            purse.means.balance.unwrap().balance_minor,
            1_300,
            "snapshots: {snapshot_every_records}"
        );
        assert_eq!(usable.best, Some(2));
        h.engine.shutdown().await;
    }
}
