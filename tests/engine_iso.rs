//! The engine with an ISO 8583 provider: the card number leaves the vault only inside the
//! adapter, reaches the issuer host (the pyiso8583 simulator of `tests/iso_host/`), and the
//! host's answer becomes the engine's outcome.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use settlegate_engine::adapters::{AdapterConfig, GuardConfig};
use settlegate_engine::{AuthOutcome, ProviderConfig, ReasonCode};

use crate::support::*;

const ISO_PROVIDER: u32 = 900;

struct Host(Child);

impl Drop for Host {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts the simulator on a free port with a ledger; fails (never skips) without python3
/// and pyiso8583.
fn spawn_host(ledger: &std::path::Path) -> (Host, u16) {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/iso_host/iso_host.py");
    let mut child = Command::new("python3")
        .arg(script)
        .args(["--port", "0", "--ledger"])
        .arg(ledger)
        .stdout(Stdio::piped())
        .spawn()
        .expect("python3 runs (the test command installs tests/iso_host/requirements.txt)");
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
    let port =
        line.strip_prefix("PORT ").and_then(|p| p.trim().parse().ok()).unwrap_or_else(|| {
            panic!("iso_host.py printed {line:?}, not a PORT line: is pyiso8583 installed?")
        });
    (Host(child), port)
}

#[tokio::test]
async fn a_card_payment_through_an_iso8583_host() {
    let dir = tempfile::tempdir().unwrap();
    let ledger = dir.path().join("ledger.jsonl");
    let (_host, port) = spawn_host(&ledger);
    let adapter: AdapterConfig = toml::from_str(&format!(
        "kind = \"iso8583\"\nhost_addr = \"127.0.0.1:{port}\"\nmerchant_id = \"SGTEST01\""
    ))
    .unwrap();
    let mut config = config();
    config.providers.push(ProviderConfig {
        code: ISO_PROVIDER,
        name: "iso-host".into(),
        adapter,
        limits: GuardConfig { concurrency_max: 64, timeout_ms: 5_000 },
        terminals: Vec::new(),
    });
    let h = Harness::with_config(config);
    let alice = h.user("iso").await;

    // Until the adapter has signed on, it answers "unavailable" at once.
    let deadline = Instant::now() + Duration::from_secs(30);
    let approval = loop {
        match h.authorize(alice.signed(T0_MS, 1_234, ISO_PROVIDER, "ISO-T1")).await {
            AuthOutcome::Approved(approval) => break approval,
            AuthOutcome::Declined(ReasonCode::ProviderUnavailable) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(100)).await
            }
            other => panic!("expected an approval, got {other:?}"),
        }
    };
    assert_eq!(approval.auth_code.as_str(), "001234", "the host's field 38");
    assert_eq!(approval.amount_final_minor, 1_234);
    // The host declines amounts 500..=599 with "do not honor".
    let declined = h.authorize(alice.signed(T0_MS, 550, ISO_PROVIDER, "ISO-T1")).await;
    assert_eq!(declined, AuthOutcome::Declined(ReasonCode::ProviderDoNotHonor));

    // The host saw the card's number (its ledger keeps only the last four digits), so the
    // engine's vault detokenized it for the adapter.
    let ledger = std::fs::read_to_string(&ledger).unwrap();
    let request = ledger
        .lines()
        .find(|l| l.contains("\"dir\": \"in\"") && l.contains("\"0100\"") && l.contains("1234"))
        .unwrap_or_else(|| panic!("no 0100 for 1,234 in the ledger:\n{ledger}"));
    assert!(request.contains("\"pan_last4\": \"1111\""), "{request}");
    h.engine.shutdown().await;
}
