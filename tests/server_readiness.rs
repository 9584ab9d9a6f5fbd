//! `/readyz` tells the truth (issue #23): HTTP answers before the engine has recovered, and
//! `/readyz` is 503 while the server recovers, while it drains after a shutdown began, while a
//! shard is down (`server_durability::readyz_is_not_ready_while_a_shard_is_down`), and while
//! every provider's circuit breaker is open; `?verbose` says which.

use std::time::Duration;

use settlegate_adapters::{AdapterConfig, GuardConfig};
use settlegate_engine::ProviderConfig;
use settlegate_protocol::ops::Authorize;

use crate::support::server::*;
use crate::support::*;

/// While the server starts (here: loading its demo users, after the engine's recovery),
/// HTTP already answers: `/readyz` is 503 `recovering`, `/metrics` serves the build's series;
/// once started, 200.
#[tokio::test]
async fn readyz_is_503_while_the_server_recovers() {
    let mut config = server_config();
    config.demo.users = 3_000;
    let (addr_tx, addr_rx) = tokio::sync::oneshot::channel();
    let start = settlegate::server::start_observed(config, move |addr| {
        let _ = addr_tx.send(addr);
    });
    let probe = async {
        let http = addr_rx.await.unwrap();
        let (status, body) = http_get_at(http, "/readyz").await;
        let (_, verbose) = http_get_at(http, "/readyz?verbose").await;
        let (metrics_status, metrics) = http_get_at(http, "/metrics").await;
        (status, body, verbose, metrics_status, metrics)
    };
    let (server, (status, body, verbose, metrics_status, metrics)) = tokio::join!(start, probe);
    let server = server.unwrap();
    assert!(status.contains("503"), "{status}");
    assert_eq!(body, "not ready: recovering\n");
    assert!(verbose.contains("recovering: yes"), "{verbose}");
    assert!(metrics_status.contains("200"), "{metrics_status}");
    assert!(metrics.contains("settlegate_build_info"), "{metrics}");
    let (status, body) = http_get(&server, "/readyz").await;
    assert!(status.contains("200"), "{status} {body}");
    server.shutdown().await;
}

/// After a shutdown began, while a connection finishes a payment in flight (its provider takes
/// 1.5 s), `/readyz` answers 503 `draining`; the payment is still answered.
#[tokio::test]
async fn readyz_is_503_while_the_server_drains() {
    const SLOW: u32 = 800;
    let mut config = server_config();
    config.engine.request_deadline_ms = 10_000;
    config.server.shutdown_grace_ms = 10_000;
    config.engine.providers.push(simulated_provider(SLOW, "slow", 1_500_000));
    let server = start_with(config).await;
    let http = server.http_addr;
    let admin = client(&server, ADMIN_KEY).await;
    let mut payer = enroll(&admin, "drain-1").await;
    let payment = Authorize {
        client_request_id: request_id().get(),
        inherent_id: payer.sign(1_000, SLOW, "T-1"),
    };
    let in_flight = tokio::spawn(async move {
        admin.call(&settlegate_protocol::messages::Request::Authorize(payment)).await
    });
    // The payment reaches its provider before the shutdown begins.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let stopping = tokio::spawn(server.shutdown());
    tokio::time::sleep(Duration::from_millis(200)).await;
    let (status, body) = http_get_at(http, "/readyz").await;
    assert!(status.contains("503"), "{status}");
    assert_eq!(body, "not ready: draining\n");
    let (_, verbose) = http_get_at(http, "/readyz?verbose").await;
    assert!(verbose.contains("draining: yes"), "{verbose}");
    let answer = in_flight.await.unwrap().expect("answered while draining");
    assert!(matches!(answer, settlegate_protocol::messages::Response::Ok(_)), "{answer:?}");
    stopping.await.unwrap();
}

/// Every provider an ISO 8583 host on a closed port: once the adapter's circuit breaker opens,
/// `/readyz` answers 503, and `?verbose` names the provider's breaker.
#[tokio::test]
async fn readyz_is_503_while_every_providers_breaker_is_open() {
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = closed.local_addr().unwrap().port();
    drop(closed);
    let adapter: AdapterConfig = toml::from_str(&format!(
        "kind = \"iso8583\"\nhost_addr = \"127.0.0.1:{port}\"\nmerchant_id = \"SGTEST01\""
    ))
    .unwrap();
    let mut config = server_config();
    config.engine.providers = vec![ProviderConfig {
        code: 900,
        name: "acquirer".into(),
        adapter,
        limits: GuardConfig { concurrency_max: 8, timeout_ms: 1_000 },
        terminals: Vec::new(),
    }];
    let server = start_with(config).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let (status, body) = loop {
        let (status, body) = http_get(&server, "/readyz").await;
        if status.contains("503") || tokio::time::Instant::now() > deadline {
            break (status, body);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(status.contains("503"), "{status} {body}");
    assert_eq!(body, "not ready: every provider's circuit breaker is open\n");
    let (_, verbose) = http_get(&server, "/readyz?verbose").await;
    assert!(verbose.contains("provider 900 (acquirer): breaker open"), "{verbose}");
    assert!(verbose.contains("all breakers open: yes"), "{verbose}");
    server.shutdown().await;
}
