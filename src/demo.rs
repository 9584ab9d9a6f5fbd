//! Demo data: users with devices and cards, so a fresh server has something to show. The
//! providers, their terminals and discounts come from the config's `[engine]` section.

use settlegate_engine::{Engine, EngineError, EnrollRequest, MeansInput, UserIdType, UserKey};

/// The demo users' password (demo only).
pub const DEMO_PASSWORD: &str = "demo password";

/// Enrolls `count` demo users (`demo0001@example.com`, ...) with a device and a card.
/// Idempotent: client request IDs are derived from the user number.
pub async fn load(engine: &Engine, count: usize) -> Result<(), EngineError> {
    for n in 1..=count {
        let user = UserKey::new(UserIdType::Mail, format!("demo{n:04}@example.com"))
            .map_err(EngineError::Refused)?;
        let idm = (0xDE00_0000_0000_0000u64 + n as u64).to_be_bytes();
        let enrolled = engine
            .enroll(EnrollRequest {
                client_request_id: u128::from(n as u64) | (1 << 100),
                user: user.clone(),
                password: DEMO_PASSWORD.into(),
                card_idm: idm,
            })
            .await;
        match enrolled {
            Ok(_) | Err(EngineError::Refused(settlegate_engine::ReasonCode::UserExists)) => {}
            Err(error) => return Err(error),
        }
        let card = MeansInput::CreditCard { pan: "4111111111111111".into() };
        engine.add_means(u128::from(n as u64) | (2 << 100), &user, &card, true).await?;
    }
    Ok(())
}
