//! The real binary killed with SIGKILL while authorizations are in flight at an ISO 8583 host
//! (the simulator of `tests/iso_host`, which keeps running): after the restart on the same data
//! directory, recovery declines them and the forwarder sends the host their reversals, with
//! the identifiers (STAN, RRN, field 7) the engine rebuilt from its log.

use std::time::Duration;

use settlegate_engine::{AuthOutcome, ReasonCode};
use settlegate_protocol::Client;

use crate::engine_iso::spawn_host_tallying;
use crate::engine_money::Proxy;
use crate::support::request_id;
use crate::support::server::{
    binary_config, enroll, http_get_at, now_ms, redeem_request, spawn_binary, spawn_binary_serving,
    ADMIN_KEY,
};

/// The server process, killed when the test ends, also when a check fails.
struct Server(std::process::Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The host's tally: `(state, authorized, reversed)` by amount.
pub(crate) fn tally(path: &std::path::Path) -> Vec<(String, u64, u64)> {
    let Ok(text) = std::fs::read_to_string(path) else { return Vec::new() };
    let Ok(tally) = serde_json::from_str::<serde_json::Value>(&text) else { return Vec::new() };
    let held = tally["authorizations"].as_array().cloned().unwrap_or_default();
    held.iter()
        .map(|h| {
            let state = h["state"].as_str().unwrap_or_default().to_owned();
            (state, h["authorized"].as_u64().unwrap_or(0), h["reversed"].as_u64().unwrap_or(0))
        })
        .collect()
}

/// Polls `condition` every 50 ms, failing the test after 60 s.
pub(crate) async fn wait_for(what: &str, mut condition: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while !condition() {
        assert!(tokio::time::Instant::now() < deadline, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn connect(addr: std::net::SocketAddr) -> Client {
    let client = Client::connect(addr).await.expect("connect");
    client.authenticate(ADMIN_KEY).await.expect("authenticate");
    client
}

#[tokio::test]
async fn authorizations_in_flight_at_a_kill_are_reversed_at_the_host_after_the_restart() {
    let host_dir = tempfile::tempdir().unwrap();
    let ledger = host_dir.path().join("ledger.jsonl");
    let tally_path = host_dir.path().join("tally.json");
    let (_host, port) = spawn_host_tallying(&ledger, Some(&tally_path));
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    // Nothing times out before the kill: neither the adapter (which would reverse on its own)
    // nor the engine (which would owe a reversal of a timeout).
    let engine = format!(
        "shards = 2\nrequest_deadline_ms = 600000\n\
         durability = {{ data_dir = \"{}\", fsync = \"always\" }}\n\
         forwarding = {{ interval_ms = 50, retry_initial_ms = 50, retry_max_ms = 500 }}",
        data.display()
    );
    let adapter = format!(
        "{{ kind = \"iso8583\", host_addr = \"127.0.0.1:{port}\", merchant_id = \"SGTEST01\", \
         response_timeout_ms = 600000 }}\nlimits = {{ concurrency_max = 64, timeout_ms = 600000 }}"
    );
    let config = binary_config(dir.path(), &adapter, &engine);
    let (child, addr) = spawn_binary(&config);
    let mut server = Server(child);

    let client = connect(addr).await;
    let mut payer = enroll(&client, "inflight").await;
    // Once signed on, the host approves 1,234: a settled payment, never to be reversed.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let bytes = payer.sign(1_234, 1, "ISO-T1");
        match client.authorize(request_id().get(), bytes).await.unwrap() {
            AuthOutcome::Approved(_) => break,
            AuthOutcome::Declined(ReasonCode::ProviderUnavailable)
                if tokio::time::Instant::now() < deadline =>
            {
                tokio::time::sleep(Duration::from_millis(100)).await
            }
            other => panic!("expected an approval, got {other:?}"),
        }
    }

    // Three the host holds and never answers (8,000..=8,099): in flight at the kill.
    let client = std::sync::Arc::new(client);
    let amounts = [8_011u64, 8_022, 8_033];
    for amount in amounts {
        let bytes = payer.sign(amount, 1, "ISO-T1");
        let client = std::sync::Arc::clone(&client);
        tokio::spawn(async move { client.authorize(request_id().get(), bytes).await });
    }
    let held = |state: &str| {
        let tally = tally(&tally_path);
        amounts.iter().all(|a| tally.iter().any(|(s, held, _)| s == state && held == a))
    };
    wait_for("the host holding the three authorizations", || held("authorized")).await;
    server.0.kill().unwrap();
    server.0.wait().unwrap();
    drop(client);
    assert!(held("authorized"), "nothing reversed before the restart: {:?}", tally(&tally_path));

    let (child, _addr) = spawn_binary(&config);
    let _server = Server(child);
    wait_for("the reversals at the host", || held("reversed")).await;
    assert_reversed_once(&tally_path, &ledger, &amounts);
}

/// The host's account once `amounts` were reversed: each in full, by one reversal message
/// each (its `ledger`), and the approval of 1,234 standing.
pub(crate) fn assert_reversed_once(
    tally_path: &std::path::Path,
    ledger: &std::path::Path,
    amounts: &[u64],
) {
    let tally = tally(tally_path);
    for &amount in amounts {
        assert!(tally.contains(&("reversed".into(), amount, amount)), "{tally:?}");
    }
    assert!(tally.contains(&("authorized".into(), 1_234, 0)), "the approval stands: {tally:?}");
    let reversals = std::fs::read_to_string(ledger)
        .unwrap()
        .lines()
        .filter(|line| line.contains("\"dir\": \"op\"") && line.contains("\"op\": \"reversal\""))
        .count();
    assert_eq!(reversals, amounts.len(), "one reversal each");
}

/// A capture owed to a host out of reach (a proxy the test cuts): `/metrics` shows the queue's
/// depth and its oldest's age, and the server logs an ERROR with that age.
#[tokio::test]
async fn a_queue_that_cannot_drain_shows_in_metrics_and_an_error_with_its_age() {
    use settlegate_protocol::messages::{CodeOutcome, Reply, Request};
    use settlegate_protocol::ops::IssueCode;
    let host_dir = tempfile::tempdir().unwrap();
    let (_host, port) = spawn_host_tallying(&host_dir.path().join("ledger.jsonl"), None);
    let proxy = Proxy::to(port).await;
    let dir = tempfile::tempdir().unwrap();
    let engine = "forwarding = { interval_ms = 50, retry_initial_ms = 50, retry_max_ms = 200, \
                  alarm_after_ms = 500 }";
    let adapter = format!(
        "{{ kind = \"iso8583\", host_addr = \"127.0.0.1:{}\", merchant_id = \"SGTEST01\" }}",
        proxy.port
    );
    let config = binary_config(dir.path(), &adapter, engine);
    let (child, addr, http) = spawn_binary_serving(&config, "error", std::process::Stdio::piped());
    let mut server = Server(child);
    let stderr = server.0.stderr.take().unwrap();
    let (lines_tx, lines) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = lines_tx.send(line);
        }
    });

    let client = connect(addr).await;
    let mut payer = enroll(&client, "undrained").await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let code = loop {
        let issue = Request::IssueCode(IssueCode {
            client_request_id: request_id().get(),
            inherent_id: payer.sign(5_000, 1, "*"),
            validity_ms: 3_600_000,
            deliver_to: None,
            order_ref: String::new(),
        });
        match client.call_ok(&issue).await.unwrap() {
            Reply::IssueCode(CodeOutcome::Issued(code)) => break *code,
            Reply::IssueCode(CodeOutcome::Declined(ReasonCode::ProviderUnavailable))
                if tokio::time::Instant::now() < deadline =>
            {
                tokio::time::sleep(Duration::from_millis(100)).await
            }
            other => panic!("expected a code, got {other:?}"),
        }
    };
    proxy.cut();
    let redeem = redeem_request(&code, request_id().get(), 4_000, now_ms(), "POS-1");
    client.call_ok(&redeem).await.unwrap();

    let mut logged = Vec::new();
    wait_for("an ERROR naming the undrained queue's age", || {
        logged.extend(lines.try_iter());
        logged
            .iter()
            .any(|l| l.contains("ERROR") && l.contains("not draining: the oldest has waited"))
    })
    .await;
    let sample = |text: &str, name: &str| -> Option<f64> {
        text.lines()
            .find(|l| l.starts_with(name) && l.contains("provider=\"1\""))
            .and_then(|l| l.rsplit(' ').next()?.parse().ok())
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let scraped = http_get_at(http, "/metrics").await.1;
        let depth = sample(&scraped, "settlegate_provider_owed_operations");
        let age = sample(&scraped, "settlegate_provider_owed_oldest_age_seconds");
        if depth == Some(1.0) && age.is_some_and(|age| age >= 0.5) {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "owed gauges: {scraped}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A refund of a settled payment owed to a single-message host out of reach (a proxy the test
/// cuts) when the server is killed with SIGKILL: after the restart on the same data directory,
/// the host back, the forwarder sends it, once, as an `0200` with processing code `20`.
#[tokio::test]
async fn a_settled_payments_refund_owed_at_a_kill_reaches_the_host_after_the_restart() {
    use settlegate_protocol::messages::{Reply, Request};
    use settlegate_protocol::ops::refund::{Refund, Refunded};
    use settlegate_protocol::ops::void::Target;
    let host_dir = tempfile::tempdir().unwrap();
    let ledger = host_dir.path().join("ledger.jsonl");
    let tally_path = host_dir.path().join("tally.json");
    let (_host, port) = spawn_host_tallying(&ledger, Some(&tally_path));
    let proxy = Proxy::to(port).await;
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let engine = format!(
        "shards = 2\n\
         durability = {{ data_dir = \"{}\", fsync = \"always\" }}\n\
         forwarding = {{ interval_ms = 50, retry_initial_ms = 50, retry_max_ms = 200 }}",
        data.display()
    );
    let adapter = format!(
        "{{ kind = \"iso8583\", host_addr = \"127.0.0.1:{}\", merchant_id = \"SGTEST01\", \
         message_class = \"financial\" }}",
        proxy.port
    );
    let config = binary_config(dir.path(), &adapter, &engine);
    let (child, addr) = spawn_binary(&config);
    let mut server = Server(child);

    let client = connect(addr).await;
    let mut payer = enroll(&client, "sale-refund-kill").await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let payment_id = loop {
        let id = request_id().get();
        match client.authorize(id, payer.sign(2_345, 1, "ISO-T1")).await.unwrap() {
            AuthOutcome::Approved(_) => break id,
            AuthOutcome::Declined(ReasonCode::ProviderUnavailable)
                if tokio::time::Instant::now() < deadline =>
            {
                tokio::time::sleep(Duration::from_millis(100)).await
            }
            other => panic!("expected an approval, got {other:?}"),
        }
    };
    let settled = |refunded: u64| {
        let text = std::fs::read_to_string(&tally_path).unwrap_or_default();
        let tally: serde_json::Value = serde_json::from_str(&text).unwrap_or_default();
        let held = tally["authorizations"].as_array().cloned().unwrap_or_default();
        held.iter().any(|h| {
            h["authorized"] == 2_345 && h["state"] == "captured" && h["refunded"] == refunded
        })
    };
    wait_for("the sale captured at the host", || settled(0)).await;

    // The host out of reach: the refund is answered, owed, and not sent.
    proxy.cut();
    let refund = Request::Refund(Refund {
        client_request_id: request_id().get(),
        target: Target::Payment { user: payer.user.clone(), payment_request_id: payment_id },
        amount_minor: 1_000,
        terminal_id: "ISO-T1".into(),
    });
    let answer = client.call_ok(&refund).await.unwrap();
    let expected = Refunded { amount_minor: 1_000, refunded_minor: 1_000, captured_minor: 2_345 };
    assert_eq!(answer, Reply::Refund(expected));
    tokio::time::sleep(Duration::from_millis(300)).await;
    server.0.kill().unwrap();
    server.0.wait().unwrap();
    drop(client);
    assert!(settled(0), "nothing refunded before the restart");

    proxy.restore();
    let (child, addr) = spawn_binary(&config);
    let _server = Server(child);
    wait_for("the refund at the host after the restart", || settled(1_000)).await;
    // The host writes its tally and its message ledger one after the other: both, then.
    wait_for("the refund in the host's ledger", || {
        !crate::engine_money::refund_messages(&ledger).is_empty()
    })
    .await;
    let refunds: Vec<_> = crate::engine_money::refund_messages(&ledger);
    assert_eq!(refunds.len(), 1, "sent once: {refunds:?}");
    assert_eq!(
        (refunds[0].0.as_str(), refunds[0].1, refunds[0].3.as_str()),
        ("200000", 1_000, "00")
    );
    // The refund's retry after the restart is answered as the first time.
    let client = connect(addr).await;
    assert_eq!(client.call_ok(&refund).await.unwrap(), Reply::Refund(expected));
}
