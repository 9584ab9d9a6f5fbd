//! A processor embedding settlegate in-process: no TCP, just async calls.
//!
//! Run with `cargo run -p settlegate-engine --example embedded`.

use settlegate_engine::adapters::simulated::SimulatedConfig;
use settlegate_engine::adapters::AdapterConfig;
use settlegate_engine::{AddMeansOptions, ProviderCode, RequestId};
use settlegate_engine::{
    AuthOutcome, AuthorizeRequest, Currency, Discount, Engine, EngineConfig, EnrollRequest,
    InherentId, MeansInput, MeansKind, ProviderConfig, TerminalEntry, TerminalService, UserIdType,
    UserKey,
};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let config = EngineConfig {
        providers: vec![ProviderConfig {
            code: 1,
            name: "Demo Acquirer".into(),
            adapter: AdapterConfig::Simulated(SimulatedConfig::default()),
            limits: Default::default(),
            terminals: Vec::new(),
        }],
        ..EngineConfig::default()
    };
    let engine = Engine::start(config)?;
    let now_ms = engine.now_ms();

    // G2: the provider lists a terminal with a 5% discount for the next hour.
    let shop = TerminalEntry {
        terminal_id: "SHOP-0001".into(),
        service: Some(TerminalService {
            discount: Discount::Percent { bps: 500 },
            valid_from_ms: now_ms,
            valid_until_ms: now_ms + 3_600_000,
            description: "5% off in this area".into(),
        }),
    };
    engine.register_terminals(RequestId(1), ProviderCode(1), vec![shop]).await?;

    // G1: enroll a user, provision their phone, register a card.
    let user = UserKey::new(UserIdType::Mail, "hanako@example.jp")?;
    let device = engine
        .enroll(EnrollRequest {
            client_request_id: RequestId(2),
            user: user.clone(),
            password: "a long passphrase".into(),
            card_idm: *b"\x01\x2e\x00\x00\x00\x00\x00\x01",
        })
        .await?;
    let card = MeansInput::CreditCard { pan: "4111111111111111".into() };
    engine.add_means(RequestId(3), &user, &card, AddMeansOptions { make_default: true }).await?;
    let mut notices = engine.subscribe(&user);

    // G3: the phone signs an inherent ID; the store terminal passes it on unchanged.
    let record = InherentId {
        key_version: device.key_version,
        amount_minor: 1_980,
        currency: Currency::try_from("JPY")?,
        means: MeansKind::CreditCard,
        means_id: 0,
        provider_code: 1,
        card_idm: device.card_idm,
        user: user.clone(),
        terminal_id: "SHOP-0001".into(),
        counter: 1,
        timestamp_ms: now_ms,
    };
    let request = AuthorizeRequest {
        client_request_id: RequestId(4),
        inherent_id: record.sign(device.device_key.expose()),
    };
    match engine.authorize(request).await? {
        AuthOutcome::Approved(a) => println!(
            "approved {}: {} {} - discount {} = {}",
            a.auth_code.as_str(),
            a.amount_requested_minor,
            a.currency,
            a.discount_minor,
            a.amount_final_minor
        ),
        AuthOutcome::Declined(reason) => println!("declined: {reason}"),
    }
    let notice = notices.recv().await?;
    println!("notice for {:?}: {:?}", notice.user, notice.outcome);
    engine.shutdown().await;
    Ok(())
}
