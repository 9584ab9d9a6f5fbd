//! G2: providers' terminal lists, terminal-unique services and the S38–S39 confirmation.

use settlegate_engine::ProviderCode;
use settlegate_engine::{
    Discount, EngineError, ReasonCode, TerminalConfirmation, TerminalEntry, TerminalService,
};

use crate::support::*;

fn service(discount: Discount, from_ms: i64, until_ms: i64) -> TerminalService {
    TerminalService {
        discount,
        valid_from_ms: from_ms,
        valid_until_ms: until_ms,
        description: "area special".into(),
    }
}

#[tokio::test]
async fn terminal_confirmation_reports_listing_and_active_service() {
    let h = Harness::new();
    let ten_percent = service(Discount::Percent { bps: 1_000 }, T0_MS, T0_MS + 60_000);
    let entries = vec![
        TerminalEntry { terminal_id: "SHIBUYA-01".into(), service: Some(ten_percent.clone()) },
        TerminalEntry { terminal_id: "PLAIN-01".into(), service: None },
    ];
    h.engine.register_terminals(request_id(), ProviderCode(PROVIDER_OK), entries).await.unwrap();
    let confirm = |id: &str| h.engine.confirm_terminal(ProviderCode(PROVIDER_OK), id).unwrap();
    assert_eq!(confirm("SHIBUYA-01"), TerminalConfirmation::Listed { service: Some(ten_percent) });
    assert_eq!(confirm("PLAIN-01"), TerminalConfirmation::Listed { service: None });
    assert_eq!(confirm("ELSEWHERE"), TerminalConfirmation::NotListed);
    // Outside its validity window the terminal is listed without a service.
    h.clock.advance(60_000);
    assert_eq!(confirm("SHIBUYA-01"), TerminalConfirmation::Listed { service: None });
    h.engine
        .remove_terminals(request_id(), ProviderCode(PROVIDER_OK), vec!["PLAIN-01".into()])
        .await
        .unwrap();
    assert_eq!(confirm("PLAIN-01"), TerminalConfirmation::NotListed);
    assert_eq!(
        h.engine.confirm_terminal(ProviderCode(9_999), "SHIBUYA-01"),
        Err(EngineError::Refused(ReasonCode::UnknownProvider))
    );
}

#[tokio::test]
async fn invalid_registrations_are_refused_whole() {
    let h = Harness::new();
    let good = TerminalEntry { terminal_id: "GOOD-01".into(), service: None };
    let over_100_percent = TerminalEntry {
        terminal_id: "BAD-01".into(),
        service: Some(service(Discount::Percent { bps: 10_001 }, T0_MS, T0_MS + 1)),
    };
    assert_eq!(
        h.engine
            .register_terminals(
                request_id(),
                ProviderCode(PROVIDER_OK),
                vec![good.clone(), over_100_percent]
            )
            .await,
        Err(EngineError::Refused(ReasonCode::InvalidService))
    );
    assert_eq!(
        h.engine.confirm_terminal(ProviderCode(PROVIDER_OK), "GOOD-01").unwrap(),
        TerminalConfirmation::NotListed,
        "nothing of a refused request is applied"
    );
    let empty_window = TerminalEntry {
        terminal_id: "BAD-02".into(),
        service: Some(service(Discount::Percent { bps: 100 }, T0_MS, T0_MS)),
    };
    assert_eq!(
        h.engine
            .register_terminals(request_id(), ProviderCode(PROVIDER_OK), vec![empty_window])
            .await,
        Err(EngineError::Refused(ReasonCode::InvalidService))
    );
    let bad_id = TerminalEntry { terminal_id: "has space".into(), service: None };
    assert_eq!(
        h.engine.register_terminals(request_id(), ProviderCode(PROVIDER_OK), vec![bad_id]).await,
        Err(EngineError::Refused(ReasonCode::InvalidTerminal))
    );
    assert_eq!(
        h.engine.register_terminals(request_id(), ProviderCode(4_242), vec![good]).await,
        Err(EngineError::Refused(ReasonCode::UnknownProvider))
    );
}
