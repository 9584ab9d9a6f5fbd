//! G1: enrollment, login, means, device keys and the vault.

use settlegate_engine::{AddMeansOptions, RequestId};
use settlegate_engine::{
    AuthOutcome, EngineError, EnrollRequest, MeansInput, MeansKind, MeansOrder, ReasonCode,
    UserIdType, UserKey,
};

use crate::support::*;

#[tokio::test]
async fn enrollment_then_login() {
    let h = Harness::new();
    let alice = h.user("alice").await;
    h.engine.login(&alice.user, PASSWORD).await.expect("right password");
    assert_eq!(
        h.engine.login(&alice.user, "wrong password!").await,
        Err(EngineError::Refused(ReasonCode::WrongPassword))
    );
}

#[tokio::test]
async fn unknown_user_login_is_refused_as_a_wrong_password() {
    let h = Harness::new();
    let ghost = UserKey::new(UserIdType::InherentNumber, "0000123").unwrap();
    // As a wrong password would be: a login does not tell who exists.
    assert_eq!(
        h.engine.login(&ghost, PASSWORD).await,
        Err(EngineError::Refused(ReasonCode::WrongPassword))
    );
    assert_eq!(
        h.engine.list_means(&ghost, MeansOrder::Registration).await,
        Err(EngineError::Refused(ReasonCode::UnknownUser))
    );
}

#[tokio::test]
async fn repeated_wrong_passwords_lock_the_account_until_lockout_ends() {
    let h = Harness::new();
    let bob = h.user("bob").await;
    for _ in 0..h.engine.config().login_failures_max {
        assert_eq!(
            h.engine.login(&bob.user, "not the password").await,
            Err(EngineError::Refused(ReasonCode::WrongPassword))
        );
    }
    // Locked: even the right password is refused.
    assert_eq!(
        h.engine.login(&bob.user, PASSWORD).await,
        Err(EngineError::Refused(ReasonCode::UserLocked))
    );
    h.clock.advance(h.engine.config().lockout_ms);
    h.engine.login(&bob.user, PASSWORD).await.expect("lockout over");
}

#[tokio::test]
async fn enrollment_validates_input() {
    let h = Harness::new();
    assert_eq!(
        UserKey::new(UserIdType::Mail, "no-at-sign").unwrap_err(),
        ReasonCode::InvalidUserId
    );
    assert_eq!(
        UserKey::new(UserIdType::InherentNumber, "12a").unwrap_err(),
        ReasonCode::InvalidUserId
    );
    let user = UserKey::new(UserIdType::Mail, "short@example.com").unwrap();
    let short = EnrollRequest {
        client_request_id: request_id(),
        user: user.clone(),
        password: "short".into(),
        card_idm: fresh_idm(),
    };
    assert_eq!(
        h.engine.enroll(short).await.unwrap_err(),
        EngineError::Refused(ReasonCode::PasswordPolicy)
    );
    let alice = h.user("alice").await;
    let again = EnrollRequest {
        client_request_id: request_id(),
        user: alice.user.clone(),
        password: PASSWORD.into(),
        card_idm: fresh_idm(),
    };
    assert_eq!(
        h.engine.enroll(again).await.unwrap_err(),
        EngineError::Refused(ReasonCode::UserExists)
    );
    let stolen_idm = EnrollRequest {
        client_request_id: request_id(),
        user,
        password: PASSWORD.into(),
        card_idm: alice.credential.card_idm,
    };
    assert_eq!(
        h.engine.enroll(stolen_idm).await.unwrap_err(),
        EngineError::Refused(ReasonCode::DeviceInUse)
    );
}

#[tokio::test]
async fn enrollment_retry_returns_the_first_key() {
    let h = Harness::new();
    let request = EnrollRequest {
        client_request_id: request_id(),
        user: UserKey::new(UserIdType::Mail, "retry@example.com").unwrap(),
        password: PASSWORD.into(),
        card_idm: fresh_idm(),
    };
    let first = h.engine.enroll(request.clone()).await.unwrap();
    let second = h.engine.enroll(request).await.unwrap();
    assert_eq!(first.device_key, second.device_key);
    assert_eq!(first.key_version, second.key_version);
}

#[tokio::test]
async fn means_are_tokenized_and_one_is_default() {
    let h = Harness::new();
    let carol = h.user("carol").await;
    let emoney = MeansInput::EMoney { emoney_type: "Suica".into() };
    let added = h
        .engine
        .add_means(request_id(), &carol.user, &emoney, AddMeansOptions::default())
        .await
        .unwrap();
    let bank =
        MeansInput::BankAccount { bank_code: "0001".into(), account_number: "1234567".into() };
    let bank_added = h
        .engine
        .add_means(request_id(), &carol.user, &bank, AddMeansOptions::default())
        .await
        .unwrap();
    assert_eq!(bank_added.last4.as_deref(), Some("4567"));
    let means = h.engine.list_means(&carol.user, MeansOrder::Registration).await.unwrap();
    assert_eq!(means.len(), 3);
    assert_eq!(means.iter().filter(|m| m.is_default).count(), 1);
    assert!(means[0].is_default, "the first means became the default");
    assert_eq!(means[0].last4.as_deref(), Some("1111"));
    let listing = format!("{means:?}");
    assert!(!listing.contains("4111111111111111"), "{listing}");
    assert!(!listing.contains("1234567"), "{listing}");
    // The vault opens the card number behind the token, for adapters only.
    let token = means[0].token.unwrap();
    assert_eq!(h.engine.vault().reveal(&token).unwrap().as_str(), "4111111111111111");

    h.engine.set_default_means(request_id(), &carol.user, added.means_id).await.unwrap();
    let means = h.engine.list_means(&carol.user, MeansOrder::Registration).await.unwrap();
    let default = means.iter().find(|m| m.is_default).unwrap();
    assert_eq!(default.kind, MeansKind::EMoney);
    assert_eq!(
        h.engine.set_default_means(request_id(), &carol.user, 99).await,
        Err(EngineError::Refused(ReasonCode::MeansNotRegistered))
    );
}

#[tokio::test]
async fn invalid_card_numbers_are_refused_and_never_echoed() {
    let h = Harness::new();
    let dave = h.user("dave").await;
    let bad = MeansInput::CreditCard { pan: "4111111111111112".into() };
    assert_eq!(
        h.engine.add_means(request_id(), &dave.user, &bad, AddMeansOptions::default()).await,
        Err(EngineError::Refused(ReasonCode::InvalidCardNumber))
    );
    assert!(!format!("{bad:?}").contains("4111111111111112"));
}

#[tokio::test]
async fn secrets_never_reach_debug_output() {
    let request = EnrollRequest {
        client_request_id: RequestId(1),
        user: UserKey::new(UserIdType::Mail, "x@example.com").unwrap(),
        password: "hunter2hunter2".into(),
        card_idm: [0; 8],
    };
    assert!(!format!("{request:?}").contains("hunter2"));
    let h = Harness::new();
    let eve = h.user("eve").await;
    let shown = format!("{:?}", eve.credential);
    assert!(!shown.contains(&format!("{:?}", eve.credential.device_key.expose())));
    assert!(shown.contains("redacted"));
}

#[tokio::test]
async fn rotated_key_keeps_working_until_the_grace_window_ends() {
    let h = Harness::new();
    let frank = h.user("frank").await;
    let rotated = h.rotate_key(&frank).await;
    assert_eq!(rotated.key_version, 2);
    // The old key (version 1) still verifies inside the grace window.
    let old = frank.signed(h.engine.now_ms(), 500, PROVIDER_OK, "T-1");
    approved(h.authorize(old).await);
    // The new key verifies.
    let mut record = frank.record(h.engine.now_ms(), 500, PROVIDER_OK, "T-1");
    record.key_version = 2;
    approved(h.authorize(record.sign(rotated.device_key.expose())).await);
    // After the grace window the old key is refused.
    h.clock.advance(h.engine.config().key_grace_ms);
    let late = frank.signed(h.engine.now_ms(), 500, PROVIDER_OK, "T-1");
    assert_eq!(h.authorize(late).await, AuthOutcome::Declined(ReasonCode::KeyVersionInvalid));
}

#[tokio::test]
async fn means_listing_orders() {
    let h = Harness::new();
    let gina = h.user("gina").await;
    let emoney = MeansInput::EMoney { emoney_type: "nanaco".into() };
    let second = h
        .engine
        .add_means(request_id(), &gina.user, &emoney, AddMeansOptions::default())
        .await
        .unwrap();
    h.engine.top_up(request_id(), &gina.user, second.means_id, 1_000, jpy()).await.unwrap();
    // Use the e-money twice, the card once, later.
    for _ in 0..2 {
        let mut record = gina.record(h.engine.now_ms(), 100, PROVIDER_OK, "T-1");
        record.means = MeansKind::EMoney;
        record.means_id = second.means_id;
        approved(h.authorize(record.sign(gina.credential.device_key.expose())).await);
    }
    h.clock.advance(1_000);
    approved(h.authorize(gina.signed(h.engine.now_ms(), 100, PROVIDER_OK, "T-1")).await);
    let ids = |means: Vec<settlegate_engine::MeansView>| -> Vec<u32> {
        means.iter().map(|m| m.means_id).collect()
    };
    let by = |order| h.engine.list_means(&gina.user, order);
    assert_eq!(ids(by(MeansOrder::Registration).await.unwrap()), vec![1, 2]);
    assert_eq!(ids(by(MeansOrder::Frequency).await.unwrap()), vec![2, 1]);
    assert_eq!(ids(by(MeansOrder::Recency).await.unwrap()), vec![1, 2]);
}
