//! Demo data: users with devices and cards, so a fresh server has something to show. The
//! providers, their terminals and discounts come from the config's `[engine]` section.

use settlegate_engine::emvqr;
use settlegate_engine::{
    AcceptedMethod, Engine, EngineError, EnrollRequest, MeansInput, MeansKind, Store, UserIdType,
    UserKey,
};
use settlegate_engine::{AddMeansOptions, RequestId};

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
                client_request_id: RequestId(u128::from(n as u64) | (1 << 100)),
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
        engine
            .add_means(
                RequestId(u128::from(n as u64) | (2 << 100)),
                &user,
                &card,
                AddMeansOptions { make_default: true },
            )
            .await?;
    }
    Ok(())
}

/// The demo stores (W1): at the demo terminals' places, with a beacon each; Shibuya's QR
/// poster is an EMVCo merchant-presented payload naming two networks.
pub fn stores() -> Vec<Store> {
    let body = "000201010211\
                26190015jp.example.pay1\
                27220018com.example.wallet\
                5204541153033925802JP5910Demo Store6005Tokyo6304";
    let poster = format!("{body}{}", emvqr::crc_hex(body));
    let accepts = |brands: &[(MeansKind, &str)]| {
        brands
            .iter()
            .map(|(kind, brand)| AcceptedMethod { kind: *kind, brand: (*brand).into() })
            .collect()
    };
    vec![
        Store {
            store_id: "DEMO-SHIBUYA-01".into(),
            name: "Demo Mart Shibuya".into(),
            industry: "5411".into(),
            address: "2-1 Dogenzaka, Shibuya, Tokyo".into(),
            latitude: 35.659_05,
            longitude: 139.700_63,
            beacons: vec!["demo-beacon-shibuya".into()],
            wifi: Vec::new(),
            qr_code: Some(poster),
            accepts: accepts(&[(MeansKind::CreditCard, "visa"), (MeansKind::EMoney, "")]),
        },
        Store {
            store_id: "DEMO-SHINJUKU-01".into(),
            name: "Demo Cafe Shinjuku".into(),
            industry: "5814".into(),
            address: "3-38 Shinjuku, Tokyo".into(),
            latitude: 35.690_92,
            longitude: 139.700_26,
            beacons: vec!["demo-beacon-shinjuku".into()],
            wifi: Vec::new(),
            qr_code: Some("DEMO-POSTER-SHINJUKU".into()),
            accepts: accepts(&[(MeansKind::EMoney, "suica"), (MeansKind::QrCode, "")]),
        },
    ]
}

/// Registers the demo stores (idempotent: fixed client request IDs).
pub async fn load_stores(engine: &Engine) -> Result<(), EngineError> {
    for (n, store) in stores().into_iter().enumerate() {
        engine.upsert_store(RequestId(u128::from(n as u64) | (3 << 100)), store).await?;
    }
    Ok(())
}
