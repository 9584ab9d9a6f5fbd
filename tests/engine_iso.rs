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

/// The host simulator's process, killed when dropped.
pub struct Host(pub Child);

impl Drop for Host {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts the simulator on a free port with a ledger; fails (never skips) without python3
/// and pyiso8583.
fn spawn_host(ledger: &std::path::Path) -> (Host, u16) {
    spawn_host_tallying(ledger, None)
}

/// [`spawn_host`], also keeping the host's tally of authorizations in `tally` when given.
pub fn spawn_host_tallying(
    ledger: &std::path::Path,
    tally: Option<&std::path::Path>,
) -> (Host, u16) {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/iso_host/iso_host.py");
    let mut command = Command::new("python3");
    command.arg(script).args(["--port", "0", "--ledger"]).arg(ledger);
    if let Some(tally) = tally {
        command.arg("--tally-file").arg(tally);
    }
    let mut child = command
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

/// A dialect from the TOML config reaches the host through the engine: a 16-character terminal
/// ID, refused (reason 31) by the default dialect, goes out as its derived field 41 ID with the
/// full ID in field 48, and the MCC in field 18.
#[tokio::test]
async fn a_long_terminal_id_through_a_configured_dialect() {
    let dir = tempfile::tempdir().unwrap();
    let ledger = dir.path().join("ledger.jsonl");
    let (_host, port) = spawn_host(&ledger);
    let provider = |code: u32, dialect: &str| {
        let adapter: AdapterConfig = toml::from_str(&format!(
            "kind = \"iso8583\"\nhost_addr = \"127.0.0.1:{port}\"\nmerchant_id = \"SGTEST01\"\n\
             {dialect}"
        ))
        .unwrap();
        ProviderConfig {
            code,
            name: format!("iso-{code}"),
            adapter,
            limits: GuardConfig { concurrency_max: 64, timeout_ms: 5_000 },
            terminals: Vec::new(),
        }
    };
    let mut config = config();
    config.providers.push(provider(ISO_PROVIDER, ""));
    config.providers.push(provider(
        ISO_PROVIDER + 1,
        "long_terminal_ids = \"derive\"\nfields = [{ field = 48, source = \"terminal_id_full\" }, \
         { field = 18, source = \"constant\", value = \"5411\" }]",
    ));
    config.validate().expect("a valid config");
    let h = Harness::with_config(config);
    let alice = h.user("iso").await;

    let deadline = Instant::now() + Duration::from_secs(30);
    let outcome =
        |provider, amount, terminal| h.authorize(alice.signed(T0_MS, amount, provider, terminal));
    let approved = |provider, amount, terminal| async move {
        loop {
            match outcome(provider, amount, terminal).await {
                AuthOutcome::Approved(approval) => return approval,
                AuthOutcome::Declined(ReasonCode::ProviderUnavailable)
                    if Instant::now() < deadline =>
                {
                    tokio::time::sleep(Duration::from_millis(100)).await
                }
                other => panic!("expected an approval, got {other:?}"),
            }
        }
    };
    let approval = approved(ISO_PROVIDER + 1, 2_345, "STORE-0042-TILL3").await;
    assert_eq!(approval.auth_code.as_str(), "002345");
    // The default dialect, signed on, refuses the long ID without contacting the host.
    approved(ISO_PROVIDER, 1_111, "ISO-T1").await;
    let refused = outcome(ISO_PROVIDER, 2_345, "STORE-0042-TILL3").await;
    assert_eq!(refused, AuthOutcome::Declined(ReasonCode::ProviderUnavailable));

    let ledger = std::fs::read_to_string(&ledger).unwrap();
    let requests: Vec<&str> = ledger
        .lines()
        .filter(|l| l.contains("\"dir\": \"in\"") && l.contains("\"0100\""))
        .filter(|l| l.contains("\"amount\": 2345"))
        .collect();
    assert_eq!(requests.len(), 1, "{ledger}");
    for part in ["\"f41\": \"CVGX8JBM\"", "\"f48\": \"STORE-0042-TILL3\"", "\"f18\": \"5411\""] {
        assert!(requests[0].contains(part), "{part} in {}", requests[0]);
    }
    h.engine.shutdown().await;
}
