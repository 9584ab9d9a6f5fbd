//! Money movement through the ISO 8583 host simulator (`tests/iso_host`, with its tally of
//! authorizations): a code's capture below its hold at `REDEEM_CODE` (a `0220` advice), its
//! `VOID`, `REFUND`s up to the capture and no further, the sweeper's void of an expired code, a
//! reversal after a timeout, and a capture retried until the host acknowledges it, across a
//! restart of the engine (the host cut off by a proxy the test controls, then back).

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use proptest::prelude::*;
use settlegate_engine::adapters::{AdapterConfig, GuardConfig};
use settlegate_engine::{
    AuthOutcome, AuthorizeRequest, CodeOutcome, CodeRefunded, CodeState, CodeVoided, EngineError,
    IssueCodeRequest, IssuedCode, MeansKind, ProviderConfig, ReasonCode, RequestId,
};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

use crate::engine_codes::{code_request_via, redeem};
use crate::engine_iso::{spawn_host_tallying, Host};
use crate::support::*;

const ISO: u32 = 900;
const MINUTE_MS: i64 = 60_000;

/// A host simulator with its ledger and tally.
pub(crate) struct IsoHost {
    _host: Host,
    pub(crate) port: u16,
    pub(crate) ledger: PathBuf,
    tally: PathBuf,
    _dir: tempfile::TempDir,
}

pub(crate) fn iso_host() -> IsoHost {
    let dir = tempfile::tempdir().unwrap();
    let ledger = dir.path().join("ledger.jsonl");
    let tally = dir.path().join("tally.json");
    let (host, port) = spawn_host_tallying(&ledger, Some(&tally));
    IsoHost { _host: host, port, ledger, tally, _dir: dir }
}

impl IsoHost {
    /// The host's whole tally (`null` before it is written).
    pub(crate) fn tally(&self) -> serde_json::Value {
        let text = std::fs::read_to_string(&self.tally).unwrap_or_default();
        serde_json::from_str(&text).unwrap_or_default()
    }

    /// The host's account of the authorization of `amount` (each test's amounts differ).
    fn held(&self, amount: u64) -> Option<serde_json::Value> {
        let text = std::fs::read_to_string(&self.tally).ok()?;
        let tally: serde_json::Value = serde_json::from_str(&text).ok()?;
        tally["authorizations"]
            .as_array()?
            .iter()
            .find(|held| held["authorized"].as_u64() == Some(amount))
            .cloned()
    }

    /// `(state, captured, refunded, voided, reversed)` of the authorization of `amount`.
    pub(crate) fn account(&self, amount: u64) -> Option<(String, u64, u64, u64, u64)> {
        let held = self.held(amount)?;
        let figure = |key: &str| held[key].as_u64().unwrap_or(0);
        let state = held["state"].as_str()?.to_owned();
        Some((state, figure("captured"), figure("refunded"), figure("voided"), figure("reversed")))
    }

    /// The lifecycle operations `op` the host received, as (op, MTI as received, its answer).
    fn operations(&self, op: &str) -> Vec<(String, String, String)> {
        let text = std::fs::read_to_string(&self.ledger).unwrap_or_default();
        text.lines()
            .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
            .filter(|entry| entry["dir"] == "op" && entry["op"] == op)
            .map(|entry| {
                let field = |key: &str| entry[key].as_str().unwrap_or_default().to_owned();
                (field("op"), field("mti"), field("code"))
            })
            .collect()
    }
}

pub(crate) fn iso_provider(port: u16, timeout_ms: u64) -> ProviderConfig {
    let adapter: AdapterConfig = toml::from_str(&format!(
        "kind = \"iso8583\"\nhost_addr = \"127.0.0.1:{port}\"\nmerchant_id = \"SGTEST01\""
    ))
    .unwrap();
    ProviderConfig {
        code: ISO,
        name: "iso-host".into(),
        adapter,
        limits: GuardConfig { concurrency_max: 64, timeout_ms },
        terminals: Vec::new(),
    }
}

fn harness(port: u16, data_dir: Option<&std::path::Path>) -> Harness {
    let mut config = match data_dir {
        Some(dir) => durable_config(dir, 0),
        None => config(),
    };
    config.providers.push(iso_provider(port, 5_000));
    config.forwarding.retry_initial_ms = 50;
    config.forwarding.retry_max_ms = 200;
    Harness::with_config(config)
}

/// A request for a card code of `amount` via `provider`.
fn card_code_request(h: &Harness, user: &TestUser, amount: u64, provider: u32) -> IssueCodeRequest {
    code_request_via(h, user, amount, (MeansKind::CreditCard, 0), provider)
}

/// Issues a card code of `amount` via the host, waiting for the adapter's sign-on.
async fn issue_card_code(h: &Harness, user: &TestUser, amount: u64) -> IssuedCode {
    issue_signed_on(h, || card_code_request(h, user, amount, ISO)).await
}

/// Issues the code of `request()`, made again until the adapter has signed on.
pub(crate) async fn issue_signed_on(
    h: &Harness,
    request: impl Fn() -> IssueCodeRequest,
) -> IssuedCode {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let request = request();
        match h.engine.issue_code(request).await.expect("an answer") {
            CodeOutcome::Issued(code) => return *code,
            CodeOutcome::Declined(ReasonCode::ProviderUnavailable)
                if tokio::time::Instant::now() < deadline =>
            {
                tokio::time::sleep(Duration::from_millis(100)).await
            }
            other => panic!("expected a code, got {other:?}"),
        }
    }
}

/// Runs the forwarder until `condition` holds, failing the test after 30 s.
async fn forward_until(h: &Harness, what: &str, mut condition: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let _ = h.engine.forward_owed().await;
        if condition() {
            return;
        }
        assert!(tokio::time::Instant::now() < deadline, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A host, an engine on it, a user of `name` and a card code of `amount` the host holds.
async fn card_code(name: &str, amount: u64) -> (IsoHost, Harness, IssuedCode) {
    let host = iso_host();
    let h = harness(host.port, None);
    let user = h.user(name).await;
    let code = issue_card_code(&h, &user, amount).await;
    assert_eq!(host.account(amount), Some(("authorized".into(), 0, 0, 0, 0)));
    (host, h, code)
}

fn refused(reason: ReasonCode) -> EngineError {
    EngineError::Refused(reason)
}

#[tokio::test]
async fn a_code_redeemed_below_its_hold_is_captured_at_the_host_by_an_advice() {
    let (host, h, code) = card_code("capture", 12_000).await;

    let redemption = h.engine.redeem_code(redeem(&code, 9_500, "POS-1")).await.unwrap();
    assert_eq!((redemption.captured_minor, redemption.released_minor), (9_500, 2_500));
    forward_until(&h, "the capture at the host", || {
        host.account(12_000) == Some(("captured".into(), 9_500, 0, 0, 0))
    })
    .await;
    let captures: Vec<_> = host.operations("capture");
    assert_eq!(captures, vec![("capture".into(), "0220".into(), "00".into())], "one advice");
    // Acknowledged: owed no more (the next round finds the queue empty).
    h.engine.forward_owed().await.unwrap();
    assert!(
        h.engine.owed_by_provider().iter().all(|q| q.depth == 0),
        "{:?}",
        h.engine.owed_by_provider()
    );
    h.engine.shutdown().await;
}

#[tokio::test]
async fn a_voided_code_releases_its_hold_and_the_host_is_told() {
    let (host, h, code) = card_code("void", 13_000).await;

    // Only a terminal the code was requested for may void it ("*": the store was not known).
    let other = h.engine.void_code(request_id(), code.number, "OTHER".into()).await;
    assert_eq!(other, Err(refused(ReasonCode::UnknownCode)));
    let id = request_id();
    let voided = h.engine.void_code(id, code.number, "*".into()).await.unwrap();
    assert_eq!(voided, CodeVoided { released_minor: 13_000 });
    // A retry is answered the same; another void, and a redemption, are refused.
    assert_eq!(h.engine.void_code(id, code.number, "*".into()).await.unwrap(), voided);
    let again = h.engine.void_code(request_id(), code.number, "*".into()).await;
    assert_eq!(again, Err(refused(ReasonCode::CodeVoided)));
    let redeemed = h.engine.redeem_code(redeem(&code, 1_000, "POS-1")).await;
    assert_eq!(redeemed.unwrap_err(), refused(ReasonCode::CodeVoided));
    assert_eq!(h.engine.code_state(code.number).await.unwrap(), CodeState::Voided);

    forward_until(&h, "the void at the host", || {
        host.account(13_000) == Some(("voided".into(), 0, 0, 13_000, 0))
    })
    .await;
    let voids: Vec<_> = host.operations("void");
    assert_eq!(voids.len(), 1, "one void: {voids:?}");
    h.engine.shutdown().await;
}

#[tokio::test]
async fn refunds_add_up_to_the_capture_and_no_further() {
    let (host, h, code) = card_code("refund", 14_000).await;
    // Before its redemption the code concerns the terminal it was requested for ("*").
    let early = h.engine.refund_code(request_id(), code.number, 100, "*".into()).await;
    assert_eq!(early, Err(refused(ReasonCode::NotRefundable)), "nothing captured yet");
    h.engine.redeem_code(redeem(&code, 11_000, "POS-1")).await.unwrap();

    let id = request_id();
    let first = h.engine.refund_code(id, code.number, 4_000, "POS-1".into()).await.unwrap();
    let expected =
        CodeRefunded { amount_minor: 4_000, refunded_minor: 4_000, captured_minor: 11_000 };
    assert_eq!(first, expected);
    // Idempotent: a retry is answered the same and refunds nothing more.
    assert_eq!(h.engine.refund_code(id, code.number, 4_000, "POS-1".into()).await.unwrap(), first);
    // Past the capture: refused. Another terminal: no such code.
    let over = h.engine.refund_code(request_id(), code.number, 7_001, "POS-1".into()).await;
    assert_eq!(over, Err(refused(ReasonCode::RefundAboveCaptured)));
    let zero = h.engine.refund_code(request_id(), code.number, 0, "POS-1".into()).await;
    assert_eq!(zero, Err(refused(ReasonCode::RefundAboveCaptured)));
    let elsewhere = h.engine.refund_code(request_id(), code.number, 1, "POS-2".into()).await;
    assert_eq!(elsewhere, Err(refused(ReasonCode::UnknownCode)));

    forward_until(&h, "the capture and the refund at the host", || {
        host.account(14_000) == Some(("captured".into(), 11_000, 4_000, 0, 0))
    })
    .await;
    let rest = h.engine.refund_code(request_id(), code.number, 7_000, "POS-1".into()).await;
    assert_eq!(rest.unwrap().refunded_minor, 11_000);
    forward_until(&h, "the second refund at the host", || {
        host.account(14_000) == Some(("captured".into(), 11_000, 11_000, 0, 0))
    })
    .await;
    let refunds: Vec<_> = host.operations("refund");
    assert_eq!(refunds.len(), 2, "two refunds, none refused: {refunds:?}");
    assert!(refunds.iter().all(|(_, mti, code)| mti == "0200" && code == "00"), "{refunds:?}");
    h.engine.shutdown().await;
}

#[tokio::test]
async fn the_sweeper_voids_an_expired_code_at_the_host() {
    let host = iso_host();
    let h = harness(host.port, None);
    let dan = h.user("expiry").await;
    issue_card_code(&h, &dan, 15_000).await;
    h.clock.advance(10 * MINUTE_MS + 1_000);
    assert_eq!(h.engine.sweep_codes().await.unwrap(), 1);
    forward_until(&h, "the expired code's void at the host", || {
        host.account(15_000) == Some(("voided".into(), 0, 0, 15_000, 0))
    })
    .await;
    h.engine.shutdown().await;
}

#[tokio::test]
async fn an_authorization_that_timed_out_is_reversed_at_the_host() {
    let host = iso_host();
    let mut config = config();
    // The host never answers 8,000..=8,099: the engine's provider timeout declines it.
    config.providers.push(iso_provider(host.port, 1_000));
    let h = Harness::with_config(config);
    let erin = h.user("timeout").await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        match h.authorize(erin.signed(T0_MS, 8_042, ISO, "ISO-T1")).await {
            AuthOutcome::Declined(ReasonCode::ProviderTimeout) => break,
            AuthOutcome::Declined(ReasonCode::ProviderUnavailable)
                if tokio::time::Instant::now() < deadline =>
            {
                tokio::time::sleep(Duration::from_millis(100)).await
            }
            other => panic!("expected a timeout, got {other:?}"),
        }
    }
    forward_until(&h, "the reversal at the host", || {
        host.account(8_042) == Some(("reversed".into(), 0, 0, 0, 8_042))
    })
    .await;
    h.engine.shutdown().await;
}

/// A TCP proxy to the host that the test can cut (its connections closed, new ones refused)
/// and restore.
pub(crate) struct Proxy {
    pub(crate) port: u16,
    open: Arc<AtomicBool>,
    connections: Arc<Mutex<Vec<JoinHandle<()>>>>,
    accepting: JoinHandle<()>,
}

impl Proxy {
    pub(crate) async fn to(port: u16) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let own_port = listener.local_addr().unwrap().port();
        let open = Arc::new(AtomicBool::new(true));
        let connections: Arc<Mutex<Vec<JoinHandle<()>>>> = Arc::default();
        let (is_open, held) = (Arc::clone(&open), Arc::clone(&connections));
        let accepting = tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                if !is_open.load(Ordering::SeqCst) {
                    continue;
                }
                let relay = tokio::spawn(async move {
                    if let Ok(mut outbound) = TcpStream::connect(("127.0.0.1", port)).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                });
                held.lock().unwrap().push(relay);
            }
        });
        Proxy { port: own_port, open, connections, accepting }
    }

    /// Closes every relayed connection and refuses new ones.
    pub(crate) fn cut(&self) {
        self.open.store(false, Ordering::SeqCst);
        for relay in self.connections.lock().unwrap().drain(..) {
            relay.abort();
        }
    }

    pub(crate) fn restore(&self) {
        self.open.store(true, Ordering::SeqCst);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.cut();
        self.accepting.abort();
    }
}

#[tokio::test]
async fn a_capture_is_retried_until_the_host_acknowledges_it_across_a_restart() {
    let host = iso_host();
    let proxy = Proxy::to(host.port).await;
    let data = tempfile::tempdir().unwrap();
    let h = harness(proxy.port, Some(data.path()));
    let fay = h.user("retry").await;
    let code = issue_card_code(&h, &fay, 16_000).await;

    // The host out of reach: the redemption is recorded, its capture owed and not sent.
    proxy.cut();
    let redemption = h.engine.redeem_code(redeem(&code, 10_000, "POS-1")).await.unwrap();
    assert_eq!(redemption.captured_minor, 10_000);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let mut failed = 0;
    while failed < 3 {
        failed += h.engine.forward_owed().await.unwrap().failed;
        assert!(tokio::time::Instant::now() < deadline, "sends to a host out of reach fail");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let owed = h.engine.owed_by_provider();
    assert_eq!(owed.iter().map(|q| (q.provider_code, q.depth)).collect::<Vec<_>>(), [(ISO, 1)]);
    assert_eq!(host.account(16_000), Some(("authorized".into(), 0, 0, 0, 0)), "not captured");
    h.engine.shutdown().await;
    drop(h);

    // Restarted on the same data, the host back: the capture still owed is sent.
    proxy.restore();
    let h = harness(proxy.port, Some(data.path()));
    forward_until(&h, "the capture at the host after the restart", || {
        host.account(16_000) == Some(("captured".into(), 10_000, 0, 0, 0))
    })
    .await;
    let captures: Vec<_> = host.operations("capture");
    assert_eq!(captures.len(), 1, "acknowledged once: {captures:?}");
    h.engine.forward_owed().await.unwrap();
    assert!(h.engine.owed_by_provider().iter().all(|q| q.depth == 0));
    h.engine.shutdown().await;
}

/// An ISO 8583 provider on a single-message host (`message_class = "financial"`): a payment is
/// a `0200`, settled with its approval, which refunds may follow.
pub(crate) fn iso_sale_provider(port: u16) -> ProviderConfig {
    let mut provider = iso_provider(port, 5_000);
    provider.adapter = toml::from_str(&format!(
        "kind = \"iso8583\"\nhost_addr = \"127.0.0.1:{port}\"\nmerchant_id = \"SGTEST01\"\n\
         message_class = \"financial\""
    ))
    .unwrap();
    provider
}

/// Authorizes `amount` for `user` at the host's provider and terminal `ISO-T1`, made again
/// until the adapter has signed on; the approved payment's client request ID.
async fn settle_signed_on(h: &Harness, user: &TestUser, amount: u64) -> RequestId {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let id = request_id();
        let inherent_id = user.signed(T0_MS, amount, ISO, "ISO-T1");
        let request = AuthorizeRequest { client_request_id: id, inherent_id };
        match h.engine.authorize(request).await.expect("an outcome") {
            AuthOutcome::Approved(_) => return id,
            AuthOutcome::Declined(ReasonCode::ProviderUnavailable)
                if tokio::time::Instant::now() < deadline =>
            {
                tokio::time::sleep(Duration::from_millis(100)).await
            }
            other => panic!("expected an approval, got {other:?}"),
        }
    }
}

/// The refunds the host received: `(field 3, amount, field 90's STAN, its answer)` of each
/// `0200` naming an original.
pub(crate) fn refund_messages(ledger: &std::path::Path) -> Vec<(String, u64, String, String)> {
    let text = std::fs::read_to_string(ledger).unwrap_or_default();
    text.lines()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .filter(|entry| entry["dir"] == "op" && entry["op"] == "refund")
        .map(|entry| {
            let field = |key: &str| entry[key].as_str().unwrap_or_default().to_owned();
            let amount = entry["amount"].as_u64().unwrap_or(0);
            (field("f3"), amount, field("orig_stan"), field("code"))
        })
        .collect()
}

/// A payment settled at once by a single-message host (`0200`) is refunded there in parts: each
/// an `0200` with processing code `20` and the amount refunded, naming the payment (field 90);
/// one that would pass the amount settled is refused by the engine and never sent.
#[tokio::test]
async fn a_settled_payment_is_refunded_at_the_host_by_an_0200_with_processing_code_20() {
    let host = iso_host();
    let mut config = config();
    config.providers.push(iso_sale_provider(host.port));
    config.forwarding.retry_initial_ms = 50;
    config.forwarding.retry_max_ms = 200;
    let h = Harness::with_config(config);
    let gus = h.user("sale").await;
    let payment = settle_signed_on(&h, &gus, 17_000).await;
    assert_eq!(host.account(17_000), Some(("captured".into(), 17_000, 0, 0, 0)), "a sale");

    let refund = |id, amount: u64| {
        h.engine.refund_payment(id, &gus.user, payment.get(), amount, "ISO-T1".into())
    };
    let id = request_id();
    let first = refund(id, 5_000).await.unwrap();
    let expected =
        CodeRefunded { amount_minor: 5_000, refunded_minor: 5_000, captured_minor: 17_000 };
    assert_eq!(first, expected);
    assert_eq!(refund(id, 5_000).await.unwrap(), first, "a retry refunds nothing more");
    let over = refund(request_id(), 12_001).await;
    assert_eq!(over, Err(refused(ReasonCode::RefundAboveCaptured)));
    forward_until(&h, "the refund at the host", || {
        host.account(17_000) == Some(("captured".into(), 17_000, 5_000, 0, 0))
    })
    .await;
    let rest = refund(request_id(), 12_000).await.unwrap();
    assert_eq!(rest.refunded_minor, 17_000);
    forward_until(&h, "the second refund at the host", || {
        host.account(17_000) == Some(("captured".into(), 17_000, 17_000, 0, 0))
    })
    .await;
    let stan = host.held(17_000).unwrap()["stan"].as_str().unwrap().to_owned();
    let sent = refund_messages(&host.ledger);
    let expected =
        [5_000, 12_000].map(|amount| ("200000".to_owned(), amount, stan.clone(), "00".into()));
    assert_eq!(sent, expected, "two refunds, each an 0200 with processing code 20");
    h.engine.shutdown().await;
}

/// A settled payment is kept for its refunds across a restart (restored from a snapshot, or
/// replayed from the log) until its refund window ends, then refused as unknown (114); at
/// `settled_max_per_shard`, the payment whose window ends first is dropped for a new one.
#[tokio::test]
async fn a_settled_payment_is_refundable_until_its_window_ends_across_a_restart() {
    use settlegate_engine::Clock as _;
    for snapshot_every in [0, 1] {
        let data = tempfile::tempdir().unwrap();
        let mut config = durable_config(data.path(), snapshot_every);
        config.forwarding.refund_window_ms = 3_600_000;
        config.forwarding.settled_max_per_shard = 2;
        let h = Harness::with_config(config.clone());
        let hal = h.user("window").await;
        let mut sales = Vec::new();
        for amount in [1_000, 2_000, 3_000] {
            let id = request_id();
            let inherent_id = hal.signed(h.clock.now_ms(), amount, PROVIDER_OK, "POS-W");
            let outcome =
                h.engine.authorize(AuthorizeRequest { client_request_id: id, inherent_id }).await;
            assert!(matches!(outcome.unwrap(), AuthOutcome::Approved(_)));
            sales.push(id);
            h.clock.advance(MINUTE_MS);
        }
        let refund = |h: &Harness, id: RequestId, sale: usize, amount: u64| {
            let (engine, user, payment) = (h.engine.clone(), hal.user.clone(), sales[sale].get());
            async move { engine.refund_payment(id, &user, payment, amount, "POS-W".into()).await }
        };
        let unknown = Err(refused(ReasonCode::UnknownPayment));
        assert_eq!(refund(&h, request_id(), 0, 100).await, unknown, "dropped at the bound");
        let first = request_id();
        let answer = refund(&h, first, 1, 500).await.unwrap();
        assert_eq!((answer.refunded_minor, answer.captured_minor), (500, 2_000));
        let now_ms = h.clock.now_ms();
        h.engine.shutdown().await;
        drop(h);

        let h = Harness::with_config(config);
        h.clock.set(now_ms);
        assert_eq!(refund(&h, first, 1, 500).await.unwrap(), answer, "the retry, as the first");
        let over = refund(&h, request_id(), 1, 1_501).await;
        assert_eq!(over, Err(refused(ReasonCode::RefundAboveCaptured)), "500 refunded already");
        // The second sale's window ends an hour after it; the third's a minute later.
        h.clock.set(T0_MS + MINUTE_MS + 3_600_000);
        h.engine.sweep_codes().await.unwrap();
        assert_eq!(refund(&h, request_id(), 1, 100).await, unknown, "past its window");
        assert_eq!(refund(&h, request_id(), 2, 3_000).await.unwrap().refunded_minor, 3_000);
        h.clock.advance(MINUTE_MS);
        assert_eq!(refund(&h, request_id(), 2, 1).await, unknown, "past its window too");
        h.engine.shutdown().await;
    }
}

// ---- a property test over random lifecycles, against a reference model ----------------------

#[derive(Debug, Clone)]
enum Step {
    /// A card code for `10_000 × (its index + 1) + extra`: each code's amount is its own.
    Issue {
        extra: u64,
    },
    Redeem {
        code: usize,
        amount: u64,
    },
    Void {
        code: usize,
    },
    Refund {
        code: usize,
        amount: u64,
    },
    /// Past every code's expiry, then the sweeper.
    Expire,
    /// One round of the forwarder.
    Forward,
    /// A payment (`AUTHORIZE`) of `1_000_000 × (its index + 1) + extra`, settled at once.
    Sale {
        extra: u64,
    },
    /// A refund of a settled payment (`REFUND` target 2); `elsewhere`: by another terminal.
    RefundSale {
        sale: usize,
        amount: u64,
        elsewhere: bool,
    },
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        3 => (0u64..9_000).prop_map(|extra| Step::Issue { extra }),
        3 => (0usize..8, 1u64..12_000).prop_map(|(code, amount)| Step::Redeem { code, amount }),
        1 => (0usize..8).prop_map(|code| Step::Void { code }),
        3 => (0usize..8, 0u64..8_000).prop_map(|(code, amount)| Step::Refund { code, amount }),
        1 => Just(Step::Expire),
        2 => Just(Step::Forward),
        2 => (0u64..9_000).prop_map(|extra| Step::Sale { extra }),
        3 => (0usize..8, 0u64..800_000, prop::bool::weighted(0.1))
            .prop_map(|(sale, amount, elsewhere)| Step::RefundSale { sale, amount, elsewhere }),
    ]
}

/// The model's answer to a refund of `amount` of a capture of `captured` with `refunded`
/// refunded so far, which it updates: never past the capture.
fn modelled_refund(
    captured: u64,
    refunded: &mut u64,
    amount: u64,
) -> Result<CodeRefunded, EngineError> {
    if amount == 0 || *refunded + amount > captured {
        return Err(refused(ReasonCode::RefundAboveCaptured));
    }
    *refunded += amount;
    Ok(CodeRefunded { amount_minor: amount, refunded_minor: *refunded, captured_minor: captured })
}

/// A code as the reference model has it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Modelled {
    Issued,
    Redeemed { captured: u64, refunded: u64 },
    Voided,
    Expired,
}

/// Random interleavings of issue, redemption, void, refunds, expiry and forwarder rounds, and
/// of settled payments and their refunds, with the simulated provider (whose ledger enforces
/// the lifecycle's rules) behind the engine. The engine answers as the model does; once
/// everything owed is forwarded, the provider holds what the model says: never more captured
/// than authorized, never more refunded than captured, and every authorization in exactly one
/// final state (captured, or voided).
async fn run_lifecycles(steps: Vec<Step>) -> Result<(), TestCaseError> {
    use settlegate_engine::adapters::simulated::{HoldState, Simulated, SimulatedConfig};
    const SIM: u32 = 700;
    let simulator = Arc::new(Simulated::new(SimulatedConfig::default()).unwrap());
    let mut config = config();
    config.providers.push(ProviderConfig {
        code: SIM,
        name: "model".into(),
        adapter: AdapterConfig::default(),
        limits: GuardConfig::default(),
        terminals: Vec::new(),
    });
    let adapter: Arc<dyn settlegate_engine::adapters::ProviderAdapter> = simulator.clone();
    let clock = Arc::new(settlegate_engine::ManualClock::new(T0_MS));
    let engine =
        settlegate_engine::Engine::start_with_adapters(config, clock.clone(), vec![(SIM, adapter)])
            .unwrap();
    let h = Harness { engine, clock };
    let user = h.user("model").await;
    let mut codes: Vec<(IssuedCode, Modelled)> = Vec::new();
    // Settled payments: client request ID, amount, refunded so far.
    let mut sales: Vec<(RequestId, u64, u64)> = Vec::new();
    let pick = |codes: &Vec<(IssuedCode, Modelled)>, i: usize| {
        (!codes.is_empty()).then(|| i % codes.len())
    };
    for step in steps {
        match step {
            Step::Issue { extra } => {
                let amount = 10_000 * (codes.len() as u64 + 1) + extra;
                let request = card_code_request(&h, &user, amount, SIM);
                match h.engine.issue_code(request).await.unwrap() {
                    CodeOutcome::Issued(code) => codes.push((*code, Modelled::Issued)),
                    other => prop_assert!(false, "the simulator approves: {other:?}"),
                }
            }
            Step::Redeem { code, amount } => {
                let Some(i) = pick(&codes, code) else { continue };
                let (issued, model) = &mut codes[i];
                let answer = h.engine.redeem_code(redeem(issued, amount, "POS-M")).await;
                let expected = match *model {
                    Modelled::Issued if amount <= issued.amount_minor => Ok(amount),
                    Modelled::Issued => Err(refused(ReasonCode::AmountAboveAuthorized)),
                    Modelled::Redeemed { .. } => Err(refused(ReasonCode::CodeRedeemed)),
                    Modelled::Voided => Err(refused(ReasonCode::CodeVoided)),
                    Modelled::Expired => Err(refused(ReasonCode::CodeExpired)),
                };
                prop_assert_eq!(answer.map(|r| r.captured_minor), expected.clone());
                if let Ok(captured) = expected {
                    *model = Modelled::Redeemed { captured, refunded: 0 };
                }
            }
            Step::Void { code } => {
                let Some(i) = pick(&codes, code) else { continue };
                let (issued, model) = &mut codes[i];
                let answer = h.engine.void_code(request_id(), issued.number, "*".into()).await;
                let expected = match *model {
                    Modelled::Issued => Ok(issued.amount_minor),
                    Modelled::Redeemed { .. } => Err(refused(ReasonCode::CodeRedeemed)),
                    Modelled::Voided => Err(refused(ReasonCode::CodeVoided)),
                    Modelled::Expired => Err(refused(ReasonCode::CodeExpired)),
                };
                prop_assert_eq!(answer.map(|v| v.released_minor), expected.clone());
                if expected.is_ok() {
                    *model = Modelled::Voided;
                }
            }
            Step::Refund { code, amount } => {
                let Some(i) = pick(&codes, code) else { continue };
                let (issued, model) = &mut codes[i];
                let terminal = match model {
                    Modelled::Redeemed { .. } => "POS-M",
                    _ => "*",
                };
                let answer = h
                    .engine
                    .refund_code(request_id(), issued.number, amount, terminal.into())
                    .await;
                match model {
                    Modelled::Redeemed { captured, refunded } => {
                        prop_assert_eq!(answer, modelled_refund(*captured, refunded, amount));
                    }
                    _ => prop_assert_eq!(answer, Err(refused(ReasonCode::NotRefundable))),
                }
            }
            Step::Expire => {
                h.clock.advance(10 * MINUTE_MS + 1_000);
                let due = codes.iter().filter(|(_, m)| *m == Modelled::Issued).count();
                prop_assert_eq!(h.engine.sweep_codes().await.unwrap() as usize, due);
                for (_, model) in codes.iter_mut().filter(|(_, m)| *m == Modelled::Issued) {
                    *model = Modelled::Expired;
                }
            }
            Step::Forward => {
                h.engine.forward_owed().await.unwrap();
            }
            Step::Sale { extra } => {
                use settlegate_engine::Clock as _;
                let amount = 1_000_000 * (sales.len() as u64 + 1) + extra;
                let id = request_id();
                let inherent_id = user.signed(h.clock.now_ms(), amount, SIM, "POS-S");
                let request = AuthorizeRequest { client_request_id: id, inherent_id };
                let outcome = h.engine.authorize(request).await.unwrap();
                prop_assert!(matches!(outcome, AuthOutcome::Approved(_)), "{outcome:?}");
                sales.push((id, amount, 0));
            }
            Step::RefundSale { sale, amount, elsewhere } => {
                if sales.is_empty() {
                    continue;
                }
                let count = sales.len();
                let (id, captured, refunded) = &mut sales[sale % count];
                let terminal = if elsewhere { "POS-T" } else { "POS-S" };
                let answer = h
                    .engine
                    .refund_payment(request_id(), &user.user, id.get(), amount, terminal.into())
                    .await;
                if elsewhere {
                    prop_assert_eq!(answer, Err(refused(ReasonCode::UnknownPayment)));
                } else {
                    prop_assert_eq!(answer, modelled_refund(*captured, refunded, amount));
                }
            }
        }
    }
    // The end of the day: whatever is still issued expires, and everything owed is sent.
    h.clock.advance(10 * MINUTE_MS + 1_000);
    h.engine.sweep_codes().await.unwrap();
    for (_, model) in codes.iter_mut().filter(|(_, m)| *m == Modelled::Issued) {
        *model = Modelled::Expired;
    }
    let mut rounds = 0;
    loop {
        let round = h.engine.forward_owed().await.unwrap();
        if round.owed == 0 && round.failed == 0 {
            break;
        }
        rounds += 1;
        prop_assert!(rounds < 100, "the queue drains: {round:?}");
    }
    let holds = simulator.holds();
    prop_assert_eq!(holds.len(), codes.len() + sales.len(), "one authorization per code or sale");
    for (_, amount, refunded) in &sales {
        let found = holds.iter().find(|(_, hold)| hold.authorized_minor == *amount);
        let Some((_, hold)) = found else {
            return Err(TestCaseError::fail(format!("no hold for the sale of {amount}")));
        };
        prop_assert!(hold.sale && hold.refunded_minor <= hold.captured_minor);
        let expected = (HoldState::Captured, *amount, *refunded);
        prop_assert_eq!((hold.state, hold.captured_minor, hold.refunded_minor), expected);
    }
    for (issued, model) in &codes {
        let found = holds.iter().find(|(_, hold)| hold.authorized_minor == issued.amount_minor);
        let Some((_, hold)) = found else {
            return Err(TestCaseError::fail(format!("no hold for {issued:?}")));
        };
        prop_assert!(hold.captured_minor <= hold.authorized_minor);
        prop_assert!(hold.refunded_minor <= hold.captured_minor);
        let expected = match *model {
            Modelled::Redeemed { captured, refunded } => (HoldState::Captured, captured, refunded),
            Modelled::Voided | Modelled::Expired => (HoldState::Voided, 0, 0),
            Modelled::Issued => unreachable!("every code ended"),
        };
        prop_assert_eq!((hold.state, hold.captured_minor, hold.refunded_minor), expected);
    }
    h.engine.shutdown().await;
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 32, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn random_lifecycles_agree_with_the_model_and_the_provider(
        steps in prop::collection::vec(step(), 1..40),
    ) {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        runtime.block_on(run_lifecycles(steps))?;
    }
}

/// A user of `name` with two card codes via the simulated provider, of 2,000 and 3,000.
async fn two_codes(h: &Harness, name: &str) -> (TestUser, IssuedCode, IssuedCode) {
    let user = h.user(name).await;
    let mut codes = Vec::new();
    for amount in [2_000, 3_000] {
        let request = card_code_request(h, &user, amount, PROVIDER_OK);
        match h.engine.issue_code(request).await.unwrap() {
            CodeOutcome::Issued(code) => codes.push(*code),
            other => panic!("expected a code, got {other:?}"),
        }
    }
    let second = codes.pop().unwrap();
    (user, codes.pop().unwrap(), second)
}

/// What is owed survives a restart from snapshots (one after every record: the log after the
/// last one is all but empty), and is sent then.
#[tokio::test]
async fn owed_operations_survive_snapshots_and_a_restart() {
    let data = tempfile::tempdir().unwrap();
    let mut config = durable_config(data.path(), 1);
    config.forwarding.retry_initial_ms = 50;
    let h = Harness::with_config(config.clone());
    let (_, first, second) = two_codes(&h, "snapshot").await;
    h.engine.redeem_code(redeem(&first, 1_500, "POS-1")).await.unwrap();
    h.engine.void_code(request_id(), second.number, "*".into()).await.unwrap();
    h.engine.shutdown().await;
    drop(h);
    let snapshots = (0..config.shard_count())
        .filter(|i| settlegate_engine::wal::shard_snapshot_path(data.path(), *i).exists())
        .count();
    assert!(snapshots > 0, "snapshots were written");

    let h = Harness::with_config(config);
    let round = h.engine.forward_owed().await.unwrap();
    assert_eq!((round.acknowledged, round.failed, round.owed), (2, 0, 0), "{round:?}");
    h.engine.shutdown().await;
}

/// At the bound of a shard's queue of owed operations, what would add one by choice waits:
/// an issue is declined, a redemption, a void and a refund are refused, all with reason 31;
/// nothing is lost, and once the queue drains they go through.
#[tokio::test]
async fn the_owed_queue_is_bounded() {
    let mut config = config();
    config.shards = 1;
    config.forwarding.owed_max_per_shard = 1;
    let h = Harness::with_config(config);
    let (hal, first, second) = two_codes(&h, "bounded").await;
    let issue = |amount| card_code_request(&h, &hal, amount, PROVIDER_OK);
    h.engine.redeem_code(redeem(&first, 1_000, "POS-1")).await.unwrap();
    // One capture owed: the queue is full.
    let unavailable = refused(ReasonCode::ProviderUnavailable);
    let declined = h.engine.issue_code(issue(4_000)).await.unwrap();
    assert_eq!(declined, CodeOutcome::Declined(ReasonCode::ProviderUnavailable));
    assert_eq!(
        h.engine.redeem_code(redeem(&second, 1_000, "POS-1")).await,
        Err(unavailable.clone())
    );
    let void = h.engine.void_code(request_id(), second.number, "*".into()).await;
    assert_eq!(void, Err(unavailable.clone()));
    let refund = h.engine.refund_code(request_id(), first.number, 100, "POS-1".into()).await;
    assert_eq!(refund, Err(unavailable));
    assert_eq!(h.engine.code_state(second.number).await.unwrap(), CodeState::Issued);
    // Drained: the same requests go through.
    assert_eq!(h.engine.forward_owed().await.unwrap().acknowledged, 1);
    h.engine.refund_code(request_id(), first.number, 100, "POS-1".into()).await.unwrap();
    h.engine.forward_owed().await.unwrap();
    h.engine.void_code(request_id(), second.number, "*".into()).await.unwrap();
    h.engine.shutdown().await;
}

/// An authorization still with its provider at a stop, whose idempotency record the count
/// limit dropped meanwhile (so recovery finds no pending record to decline), is abandoned at
/// recovery: its reversal is owed and sent all the same.
#[tokio::test]
async fn an_in_flight_authorization_whose_record_was_dropped_is_reversed_after_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let durable = || {
        let mut config = durable_config(dir.path(), 0);
        config.shards = 1;
        config.idempotency_records_max = 1;
        Harness::gated(config)
    };
    let (h, gate) = durable();
    let ivy = h.user("abandoned").await;
    let request = settlegate_engine::AuthorizeRequest {
        client_request_id: request_id(),
        inherent_id: ivy.signed(T0_MS, 1_200, PROVIDER_GATED, "T-1"),
    };
    let in_flight = tokio::spawn({
        let engine = h.engine.clone();
        async move { engine.authorize(request).await }
    });
    let asked = gate.next().await;
    // Another request takes the shard's only record: the payment's is dropped.
    approved(h.authorize(ivy.signed(T0_MS, 100, PROVIDER_OK, "T-1")).await);
    h.engine.shutdown().await;
    drop(asked);
    assert!(in_flight.await.unwrap().is_err(), "stopped before its answer");
    drop(h);

    let (h, _gate) = durable();
    let round = h.engine.forward_owed().await.unwrap();
    // The gated provider refuses lifecycle operations (unsupported): an answer all the same.
    assert_eq!((round.acknowledged, round.failed, round.owed), (1, 0, 0), "{round:?}");
    h.engine.shutdown().await;
}

/// A provider out of reach holds up no other: with one operation sent per shard and provider
/// and round, a capture owed to a reachable provider goes out behind one owed to a host that
/// cannot be reached.
#[tokio::test]
async fn a_provider_out_of_reach_holds_up_no_other() {
    let host = iso_host();
    let proxy = Proxy::to(host.port).await;
    let mut config = config();
    config.shards = 1;
    config.providers.push(iso_provider(proxy.port, 5_000));
    config.forwarding.batch_max = 1;
    let h = Harness::with_config(config);
    let jo = h.user("blocked").await;
    let stuck = issue_card_code(&h, &jo, 17_000).await;
    let request = card_code_request(&h, &jo, 2_000, PROVIDER_OK);
    let CodeOutcome::Issued(free) = h.engine.issue_code(request).await.unwrap() else {
        panic!("issued")
    };
    proxy.cut();
    h.engine.redeem_code(redeem(&stuck, 1_000, "POS-1")).await.unwrap();
    h.engine.redeem_code(redeem(&free, 1_000, "POS-1")).await.unwrap();
    let round = h.engine.forward_owed().await.unwrap();
    assert_eq!((round.acknowledged, round.failed), (1, 1), "{round:?}");
    // The queues as the next round finds them (the host's capture backing off meanwhile).
    h.engine.forward_owed().await.unwrap();
    let owed = h.engine.owed_by_provider();
    assert_eq!(owed.iter().map(|q| (q.provider_code, q.depth)).collect::<Vec<_>>(), [(ISO, 1)]);
    h.engine.shutdown().await;
}

/// A provider configured to take no refunds of sales (`refunds_sales = false`): the engine
/// keeps none of its payments, and a `REFUND` of one is answered 114, as for a payment unknown.
#[tokio::test]
async fn a_provider_that_takes_no_sale_refunds_keeps_nothing_to_refund() {
    let mut config = config();
    for provider in &mut config.providers {
        if let AdapterConfig::Simulated(simulated) = &mut provider.adapter {
            simulated.refunds_sales = provider.code != PROVIDER_OK;
        }
    }
    let h = Harness::with_config(config);
    let ida = h.user("no-sale-refunds").await;
    let id = request_id();
    let inherent_id = ida.signed(h.engine.now_ms(), 1_000, PROVIDER_OK, "POS-N");
    let outcome = h.engine.authorize(AuthorizeRequest { client_request_id: id, inherent_id });
    assert!(matches!(outcome.await.unwrap(), AuthOutcome::Approved(_)));
    let refund = h.engine.refund_payment(request_id(), &ida.user, id.get(), 100, "POS-N".into());
    assert_eq!(refund.await, Err(refused(ReasonCode::UnknownPayment)));
}
