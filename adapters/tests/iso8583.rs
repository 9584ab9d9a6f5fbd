//! The ISO 8583 adapter against an issuer host simulated in Python with `pyiso8583`
//! (`tests/iso_host/iso_host.py`), over real loopback sockets. The simulator's amount
//! triggers are documented in its docstring and in `docs/ADAPTERS.md`.
//!
//! These tests fail, rather than skip, when python3 or pyiso8583 is missing.

mod iso_support;

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Instant;

use futures::FutureExt;
use iso_support::{
    approved, captured_logs, card, config, declined, eventually, ready_adapter, Host, TestVault,
    EVENTUALLY, PAN,
};
use settlegate_adapters::iso8583::{Iso8583Adapter, Iso8583Config, LinkStatus};
use settlegate_adapters::{
    AdapterConfig, AdapterError, DeclineReason, LifecycleReply, LifecycleRequest, MeansKind,
    ProviderAdapter, ProviderReply,
};

fn ledger_dir() -> tempfile::TempDir {
    tempfile::tempdir().expect("tempdir")
}

#[tokio::test]
async fn approves_with_the_pan_sent_only_to_the_host() {
    let dir = ledger_dir();
    let host = Host::spawn(0, Some(&dir.path().join("ledger.jsonl")));
    let adapter = ready_adapter(config(host.port)).await;

    assert_eq!(adapter.authorize(card(1, 12_345)).await, approved(b"012345"));

    // Not a card, or a token the vault does not know: declined without contacting the host.
    let mut emoney = card(2, 100);
    emoney.means = MeansKind::EMoney;
    emoney.card_token = None;
    assert_eq!(adapter.authorize(emoney).await, declined(DeclineReason::InvalidAccount));
    let mut unknown = card(3, 100);
    unknown.card_token = Some(settlegate_adapters::CardToken([9; 16]));
    assert_eq!(adapter.authorize(unknown).await, declined(DeclineReason::InvalidAccount));

    let lines = host.ledger_lines();
    let requests: Vec<_> =
        lines.iter().filter(|e| e.is("dir", "in") && e.is("mti", "0100")).collect();
    assert_eq!(requests.len(), 1, "{lines:?}");
    assert!(requests[0].is("pan_last4", "1111") && requests[0].is("amount", "12345"));
    assert!(lines.iter().any(|e| e.is("mti", "0800") && e.is("nmi", "001")), "sign-on first");
    assert_eq!(adapter.stats().approved, 1);
}

#[tokio::test]
async fn declines_map_to_reason_codes() {
    let host = Host::spawn(0, None);
    let adapter = ready_adapter(config(host.port)).await;
    let cases = [
        (2_000_000, declined(DeclineReason::InsufficientFunds)), // 51, over the amount rule
        (550, declined(DeclineReason::DoNotHonor)),              // 05
        (1_450, declined(DeclineReason::InvalidAccount)),        // 14
        (6_150, declined(DeclineReason::LimitExceeded)),         // 61
    ];
    for (i, (amount, expected)) in cases.into_iter().enumerate() {
        assert_eq!(adapter.authorize(card(i as u64, amount)).await, expected, "amount {amount}");
    }
    let malfunction = adapter.authorize(card(9, 9_650)).await;
    assert!(
        matches!(&malfunction, Err(AdapterError::Unavailable(m)) if m.contains("96")),
        "{malfunction:?}"
    );
    assert_eq!(adapter.stats().declined, 4);
}

#[tokio::test]
async fn timeout_is_reversed_and_the_host_receives_the_0400() {
    let dir = ledger_dir();
    let host = Host::spawn(0, Some(&dir.path().join("ledger.jsonl")));
    let adapter =
        ready_adapter(Iso8583Config { response_timeout_ms: 1_000, ..config(host.port) }).await;

    // 8000: the host never answers.
    assert_eq!(adapter.authorize(card(1, 8_000)).await, Err(AdapterError::Timeout));

    let dropped = host.ledger_lines().into_iter().find(|e| e.is("dir", "drop")).expect("dropped");
    let (stan, rrn) = (dropped.get("stan").unwrap(), dropped.get("rrn").unwrap());
    eventually("the host acknowledged the reversal", || {
        let lines = host.ledger_lines();
        let received = lines.iter().any(|e| {
            e.is("dir", "in")
                && e.is("mti", "0400")
                && e.is("orig_stan", &stan)
                && e.is("rrn", &rrn)
        });
        received && lines.iter().any(|e| e.is("dir", "out") && e.is("mti", "0410"))
    })
    .await;
    eventually("0410 matched", || adapter.stats().reversals_acked == 1).await;
    let reversal = host.ledger_lines().into_iter().find(|e| e.is("mti", "0400")).unwrap();
    assert!(reversal.is("pan_last4", "1111") && reversal.is("amount", "8000"), "{reversal:?}");
    // The connection is intact.
    assert_eq!(adapter.authorize(card(2, 100)).await, approved(b"000100"));
}

#[tokio::test]
async fn late_approval_after_the_reversal_approves_nothing() {
    let dir = ledger_dir();
    let host = Host::spawn(0, Some(&dir.path().join("ledger.jsonl")));
    let adapter =
        ready_adapter(Iso8583Config { response_timeout_ms: 1_000, ..config(host.port) }).await;

    // 7300: approved after 3 s, long after the adapter's 1 s timeout.
    assert_eq!(adapter.authorize(card(1, 7_300)).await, Err(AdapterError::Timeout));
    eventually("the late 0110 was sent after the reversal", || {
        host.ledger_lines()
            .iter()
            .any(|e| e.is("dir", "out") && e.is("mti", "0110") && e.is("reversed", "true"))
    })
    .await;
    eventually("the late reply was dropped", || adapter.stats().unmatched_replies == 1).await;
    let stats = adapter.stats();
    assert_eq!((stats.approved, stats.timeouts, stats.reversals_acked), (0, 1, 1), "{stats:?}");
    assert_eq!(adapter.authorize(card(2, 4_321)).await, approved(b"004321"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_hundred_concurrent_requests_on_one_connection_all_match() {
    let dir = ledger_dir();
    let host = Host::spawn(0, Some(&dir.path().join("ledger.jsonl")));
    let adapter = ready_adapter(config(host.port)).await;

    // Every tenth request is answered after up to half a second, so replies come back out of
    // order; every amount (and so every authorization code) is distinct.
    let amount = |i: u64| if i % 10 == 5 { 7_000 + i / 10 } else { 100_000 + i };
    let calls = (0..500u64).map(|i| {
        let adapter = Arc::clone(&adapter);
        tokio::spawn(async move { (i, adapter.authorize(card(i, amount(i))).await) })
    });
    for call in futures::future::join_all(calls).await {
        let (i, result) = call.expect("task");
        let code = format!("{:06}", amount(i) % 1_000_000);
        assert_eq!(result, approved(code.as_bytes().try_into().unwrap()), "request {i}");
    }
    let stats = adapter.stats();
    assert_eq!((stats.approved, stats.sign_ons, stats.unmatched_replies), (500, 1, 0));
    let lines = host.ledger_lines();
    let stans: HashSet<_> = lines
        .iter()
        .filter(|e| e.is("dir", "in") && e.is("mti", "0100"))
        .map(|e| e.get("stan").unwrap())
        .collect();
    assert_eq!(stans.len(), 500, "500 distinct STANs");
}

#[tokio::test]
async fn host_killed_breaker_opens_fails_fast_then_closes_after_echoes() {
    let dir = ledger_dir();
    let mut host = Host::spawn(0, Some(&dir.path().join("first.jsonl")));
    let port = host.port;
    let tuned =
        Iso8583Config { breaker_failures_to_open: 2, breaker_echoes_to_close: 3, ..config(port) };
    let adapter = ready_adapter(tuned).await;
    assert_eq!(adapter.authorize(card(1, 100)).await, approved(b"000100"));

    host.kill();
    eventually("breaker open", || adapter.status() == LinkStatus::BreakerOpen).await;
    // Failing fast: the answer is ready at once, no I/O, no timer.
    let fast = adapter.authorize(card(2, 100)).now_or_never().expect("ready future");
    assert!(
        matches!(&fast, Err(AdapterError::Unavailable(m)) if m.contains("circuit breaker open")),
        "{fast:?}"
    );

    let restarted = Host::spawn(port, Some(&dir.path().join("second.jsonl")));
    eventually("breaker closed", || adapter.status() == LinkStatus::Ready).await;
    let echoes = restarted
        .ledger_lines()
        .iter()
        .filter(|e| e.is("dir", "in") && e.is("mti", "0800") && e.is("nmi", "301"))
        .count();
    assert!(echoes >= 3, "closed after {echoes} echoes");
    let stats = adapter.stats();
    assert!(stats.breaker_opened >= 1 && stats.breaker_closed >= 1, "{stats:?}");
    assert_eq!(adapter.authorize(card(3, 200)).await, approved(b"000200"));
}

#[tokio::test]
async fn malformed_replies_are_dropped_without_harming_other_requests() {
    let host = Host::spawn(0, None);
    let adapter = ready_adapter(config(host.port)).await;

    // 9000: three malformed frames (an undecodable field, no response code, a bad MTI) on
    // the connection, then the real approval. Slow requests around it are in flight meanwhile.
    let mut amounts: Vec<u64> =
        (0..19).map(|i| if i % 2 == 0 { 7_020 + i } else { 300 + i }).collect();
    amounts.insert(10, 9_000);
    let calls = amounts.iter().enumerate().map(|(i, &amount)| {
        let adapter = Arc::clone(&adapter);
        async move { (amount, adapter.authorize(card(i as u64, amount)).await) }
    });
    for (amount, result) in futures::future::join_all(calls).await {
        let code = format!("{amount:06}");
        assert_eq!(result, approved(code.as_bytes().try_into().unwrap()), "amount {amount}");
    }
    let stats = adapter.stats();
    assert_eq!((stats.malformed_replies, stats.approved, stats.sign_ons), (3, 20, 1), "{stats:?}");
}

#[tokio::test]
async fn the_pan_appears_in_no_log_line_error_or_debug_output() {
    let logs = captured_logs();
    let host = Host::spawn(0, None);
    let adapter =
        ready_adapter(Iso8583Config { response_timeout_ms: 1_000, ..config(host.port) }).await;
    let mut outcomes = Vec::new();
    // An approval, a timeout with its reversal (which carries the PAN), malformed replies.
    for (i, amount) in [100, 8_000, 9_000, 1_400].into_iter().enumerate() {
        outcomes.push(format!("{:?}", adapter.authorize(card(i as u64, amount)).await));
    }
    eventually("reversal acknowledged", || adapter.stats().reversals_acked == 1).await;
    outcomes.push(format!("{:?} {:?} {:?}", adapter.stats(), adapter.status(), card(9, 1)));
    let logs = String::from_utf8_lossy(&logs.lock().unwrap()).into_owned();
    assert!(logs.contains("no reply in time") && logs.contains("malformed"), "{logs}");
    assert!(!logs.contains(PAN), "PAN in the logs");
    assert!(!outcomes.iter().any(|o| o.contains(PAN)), "{outcomes:?}");
}

#[test]
fn chosen_per_provider_in_toml_and_needs_the_vault() {
    let config: AdapterConfig = toml::from_str(
        "kind = \"iso8583\"\nhost_addr = \"127.0.0.1:1\"\nmerchant_id = \"M1\"\n\
         response_timeout_ms = 900",
    )
    .expect("toml");
    let AdapterConfig::Iso8583(iso) = &config else { panic!("{config:?}") };
    assert_eq!((iso.response_timeout_ms, iso.echo_interval_ms), (900, 30_000));
    let refused = settlegate_adapters::build(&config).err().expect("needs a detokenizer");
    assert!(refused.to_string().contains("build_with"), "{refused}");
    assert!(settlegate_adapters::build_with(&config, TestVault::shared()).is_ok());

    let bad: AdapterConfig =
        toml::from_str("kind = \"iso8583\"\nhost_addr = \"127.0.0.1:1\"").expect("toml");
    let error = settlegate_adapters::build_with(&bad, TestVault::shared()).err().expect("invalid");
    assert!(error.to_string().contains("merchant_id"), "{error}");
    assert!(toml::from_str::<AdapterConfig>("kind = \"iso8583\"\nhots = 1").is_err());
}

/// Throughput of the adapter against the Python host, against two baselines measured in the
/// same run over the same host: raw round trips the host writes back undecoded (Python's
/// socket ceiling), and pre-encoded 0100s sent by a bare pipelined client (the host's own
/// ceiling with pyiso8583 decoding and encoding: what the adapter could at best reach).
///
/// `CARGO_TARGET_DIR=/work/target-iso cargo test --release -p settlegate-adapters --test
/// iso8583 -- --ignored --nocapture throughput` (docs/BENCHMARKS-HISTORY.md).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "benchmark: run explicitly, in release mode"]
async fn throughput_against_python_host() {
    const REQUESTS: usize = 20_000;
    const WINDOW: usize = 256;
    const ROUNDS: usize = 5;
    let host = Host::spawn(0, None);
    let adapter = ready_adapter(Iso8583Config { in_flight_max: 4_096, ..config(host.port) }).await;
    let echo_frames = vec![echo_frame(); REQUESTS];
    let iso_frames: Vec<Vec<u8>> = (0..REQUESTS).map(request_frame).collect();
    adapter_round(&adapter, 2_000, WINDOW).await;
    raw_round(host.port, &echo_frames[..2_000], WINDOW).await;
    let mut rates = [Vec::new(), Vec::new(), Vec::new()];
    for round in 0..ROUNDS {
        let measured = [
            adapter_round(&adapter, REQUESTS, WINDOW).await,
            raw_round(host.port, &iso_frames, WINDOW).await,
            raw_round(host.port, &echo_frames, WINDOW).await,
        ];
        println!(
            "round {round}: adapter {:.0}/s, bare client 0100 {:.0}/s, raw echo {:.0}/s",
            measured[0], measured[1], measured[2]
        );
        for (rate, list) in measured.into_iter().zip(rates.iter_mut()) {
            list.push(rate);
        }
    }
    let [adapter_rate, iso_rate, echo_rate] = rates.map(|mut v| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    });
    println!(
        "median of {ROUNDS}: adapter {adapter_rate:.0} auth/s; bare client 0100 {iso_rate:.0}/s \
         (adapter at {:.2}x); raw python echo {echo_rate:.0}/s (adapter at {:.2}x)",
        adapter_rate / iso_rate,
        adapter_rate / echo_rate
    );
}

/// The lifecycle's throughput (#22): authorize + capture pairs through the adapter (an 0100,
/// then an 0220 advice of part of the amount naming it in field 90), against the adapter's own
/// authorizations alone in the same run, alternating, median of rounds.
///
/// `cargo test --release -p settlegate-adapters --test iso8583 -- --ignored --nocapture
/// lifecycle_throughput`
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "benchmark: run explicitly, in release mode"]
async fn lifecycle_throughput_against_python_host() {
    const PAIRS: usize = 10_000;
    const WINDOW: usize = 256;
    const ROUNDS: usize = 5;
    let host = Host::spawn(0, None);
    let adapter = ready_adapter(Iso8583Config { in_flight_max: 4_096, ..config(host.port) }).await;
    lifecycle_round(&adapter, 1 << 40, 1_000, WINDOW).await;
    let (mut pairs, mut auths) = (Vec::new(), Vec::new());
    for round in 0..ROUNDS {
        // Dispatch IDs of their own each round: the host keeps every authorization it approved.
        let base = (round as u64 + 2) << 40;
        let pair_rate = lifecycle_round(&adapter, base, PAIRS, WINDOW).await;
        let auth_rate = adapter_round(&adapter, PAIRS, WINDOW).await;
        println!("round {round}: {pair_rate:.0} authorize + capture pairs/s, {auth_rate:.0} authorizations/s");
        pairs.push(pair_rate);
        auths.push(auth_rate);
    }
    let median = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let (pairs, auths) = (median(pairs), median(auths));
    println!(
        "median of {ROUNDS}: {pairs:.0} pairs/s ({:.0} messages/s), {auths:.0} authorizations/s \
         alone: a pair at {:.2}x an authorization's rate",
        2.0 * pairs,
        pairs / auths
    );
}

/// `requests` authorizations from dispatch ID `base` on, each captured (all but one minor
/// unit) as soon as it is approved, `window` pairs at a time; pairs per second.
async fn lifecycle_round(
    adapter: &Arc<Iso8583Adapter>,
    base: u64,
    requests: usize,
    window: usize,
) -> f64 {
    let started = Instant::now();
    let workers = (0..window).map(|w| {
        let adapter = Arc::clone(adapter);
        tokio::spawn(async move {
            for i in (w..requests).step_by(window) {
                let request = card(base + i as u64, 100_000 + i as u64);
                let reply = adapter.authorize(request.clone()).await.expect("answered");
                let reference = reply.reference(&request).expect("approved");
                let capture = LifecycleRequest::capture(base + i as u64, reference, 99_999);
                let answer = adapter.lifecycle(capture).await;
                assert!(matches!(answer, Ok(LifecycleReply::Accepted { .. })), "{answer:?}");
            }
        })
    });
    for worker in futures::future::join_all(workers).await {
        worker.expect("worker");
    }
    requests as f64 / started.elapsed().as_secs_f64()
}

fn echo_frame() -> Vec<u8> {
    let mut frame = vec![0u8, 120];
    frame.extend_from_slice(b"ECHO");
    frame.resize(122, b'0');
    frame
}

/// An 0100 like the adapter's, encoded once up front.
fn request_frame(i: usize) -> Vec<u8> {
    use settlegate_adapters::iso8583::codec::{encode, Message};
    let mut message = Message::new(*b"0100").unwrap();
    let fields: [(u8, String); 9] = [
        (2, PAN.into()),
        (3, "000000".into()),
        (4, format!("{:012}", 100_000 + i)),
        (7, "0101000000".into()),
        (11, format!("{:06}", i % 999_999 + 1)),
        (37, format!("{i:012}")),
        (41, "TERM0001".into()),
        (42, "SETTLEGATE01   ".into()),
        (49, "392".into()),
    ];
    for (number, value) in fields {
        message.set(number, value).unwrap();
    }
    let mut frame = Vec::new();
    encode(&message, &mut frame).unwrap();
    frame
}

async fn adapter_round(adapter: &Arc<Iso8583Adapter>, requests: usize, window: usize) -> f64 {
    let started = Instant::now();
    let workers = (0..window).map(|w| {
        let adapter = Arc::clone(adapter);
        tokio::spawn(async move {
            for i in (w..requests).step_by(window) {
                let result = adapter.authorize(card(i as u64, 100_000 + i as u64)).await;
                assert!(matches!(result, Ok(ProviderReply::Approved { .. })), "{result:?}");
            }
        })
    });
    for worker in futures::future::join_all(workers).await {
        worker.expect("worker");
    }
    requests as f64 / started.elapsed().as_secs_f64()
}

/// Round trips of `frames` on one connection, at most `window` outstanding.
async fn raw_round(port: u16, frames: &[Vec<u8>], window: usize) -> f64 {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let stream = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.expect("connect");
    stream.set_nodelay(true).expect("nodelay");
    let (mut read, mut write) = stream.into_split();
    let permits = Arc::new(tokio::sync::Semaphore::new(window));
    let started = Instant::now();
    let writer = tokio::spawn({
        let permits = Arc::clone(&permits);
        let frames = frames.to_vec();
        async move {
            for frame in frames {
                permits.acquire().await.expect("permit").forget();
                write.write_all(&frame).await.expect("write");
            }
        }
    });
    let mut body = vec![0u8; 8192];
    for _ in 0..frames.len() {
        let mut header = [0u8; 2];
        let reply = async {
            read.read_exact(&mut header).await?;
            read.read_exact(&mut body[..usize::from(u16::from_be_bytes(header))]).await
        };
        tokio::time::timeout(EVENTUALLY, reply).await.expect("reply").expect("read");
        permits.add_permits(1);
    }
    writer.await.expect("writer");
    frames.len() as f64 / started.elapsed().as_secs_f64()
}
