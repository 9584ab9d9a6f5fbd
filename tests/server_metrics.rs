//! `/metrics` under load (issue #23): scraped while payments run, parsed with a Prometheus
//! text-format parser (`prometheus-parse`), and every series the issue names is there:
//! request latency per operation, provider call latency, WAL fsync and group size, providers'
//! link, breaker, in-flight calls, timeouts and reversals pending, shards' queue depth and
//! `BUSY` answers, connections by state, process metrics, the build, and decline reasons by
//! name.

use std::sync::Arc;
use std::time::Duration;

use settlegate_protocol::messages::Request;
use settlegate_protocol::ops::Ping;

use crate::support::server::*;
use crate::support::*;

#[tokio::test]
async fn every_series_is_scraped_under_load() {
    const ONE_MS: u32 = 710;
    let dir = tempfile::tempdir().unwrap();
    let mut config = server_config();
    config.engine.durability.data_dir = Some(dir.path().join("data"));
    config.engine.providers.push(simulated_provider(ONE_MS, "one-ms", 1_000));
    let server = start_with(config).await;
    let admin = Arc::new(client(&server, ADMIN_KEY).await);
    // An unauthenticated connection, held open through the scrape.
    let _idle = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    let mut payers = Vec::new();
    for i in 0..8 {
        payers.push(enroll(&admin, &format!("metrics-{i}")).await);
    }
    let load = {
        let admin = Arc::clone(&admin);
        tokio::spawn(async move {
            let mut round = 0u64;
            let stop = tokio::time::Instant::now() + Duration::from_millis(1_500);
            while tokio::time::Instant::now() < stop {
                round += 1;
                let calls = payers.iter_mut().enumerate().map(|(i, payer)| {
                    // Every other payment through the provider answering after 1 ms; one in
                    // eight over the approval limit (a decline with a reason).
                    let provider = if i % 2 == 0 { PROVIDER_OK } else { ONE_MS };
                    let amount = if i == 7 { APPROVE_LIMIT + 1 } else { 1_000 + round };
                    let bytes = payer.sign(amount, provider, "T-1");
                    let admin = Arc::clone(&admin);
                    async move { admin.authorize(request_id().get(), bytes).await.unwrap() }
                });
                futures::future::join_all(calls).await;
                admin.call_ok(&Request::Ping(Ping { payload: vec![1] })).await.unwrap();
            }
        })
    };
    tokio::time::sleep(Duration::from_millis(700)).await;
    let (status, text) = http_get(&server, "/metrics").await;
    load.await.unwrap();
    assert!(status.contains("200"), "{status}");
    let lines = text.lines().map(|l| Ok(l.to_owned()));
    let scrape = prometheus_parse::Scrape::parse(lines).expect("Prometheus text format");
    let has = |name: &str, labels: &[(&str, &str)]| {
        scrape
            .samples
            .iter()
            .any(|s| s.metric == name && labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
    };
    // The parser folds a histogram's `_bucket` lines into one sample of its base name.
    let histogram = |name: &str, labels: &[(&str, &str)]| {
        scrape.samples.iter().any(|s| {
            s.metric == name
                && labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v))
                && matches!(&s.value, prometheus_parse::Value::Histogram(buckets)
                    if buckets.len() == 19 && buckets.last().unwrap().less_than.is_infinite())
        })
    };
    let histograms: &[(&str, &[(&str, &str)])] = &[
        ("settlegate_request_duration_seconds", &[("op", "authorize")]),
        ("settlegate_request_duration_seconds", &[("op", "ping")]),
        ("settlegate_provider_call_duration_seconds", &[("provider", "710"), ("name", "one-ms")]),
        ("settlegate_wal_fsync_duration_seconds", &[("shard", "0")]),
    ];
    for (name, labels) in histograms {
        assert!(histogram(name, labels), "histogram {name}{labels:?}\n{text}");
    }
    assert!(
        scrape.samples.iter().any(|s| s.metric == "settlegate_wal_group_records"
            && matches!(&s.value, prometheus_parse::Value::Histogram(b) if b.len() == 18)),
        "{text}"
    );
    let wanted: &[(&str, &[(&str, &str)])] = &[
        ("settlegate_request_duration_seconds_count", &[("op", "ping")]),
        ("settlegate_provider_call_duration_seconds_sum", &[("name", "one-ms")]),
        ("settlegate_wal_fsync_duration_seconds_count", &[("shard", "0")]),
        ("settlegate_provider_link_up", &[("provider", "100")]),
        ("settlegate_provider_breaker_open", &[("provider", "710")]),
        ("settlegate_provider_in_flight", &[("provider", "710")]),
        ("settlegate_provider_timeouts_total", &[("provider", "100")]),
        ("settlegate_provider_reversals_pending", &[("provider", "100")]),
        ("settlegate_provider_owed_operations", &[("provider", "100")]),
        ("settlegate_provider_owed_oldest_age_seconds", &[("provider", "710")]),
        ("settlegate_shard_queue_depth", &[("shard", "0")]),
        ("settlegate_shard_busy_total", &[("shard", "1")]),
        ("settlegate_connections", &[("state", "authenticated")]),
        ("settlegate_connections", &[("state", "unauthenticated")]),
        ("settlegate_build_info", &[("version", env!("CARGO_PKG_VERSION"))]),
        ("process_cpu_seconds_total", &[]),
        ("process_resident_memory_bytes", &[]),
        ("process_open_fds", &[]),
        ("process_start_time_seconds", &[]),
        ("settlegate_authorizations_total", &[("result", "approved"), ("reason", "none")]),
        (
            "settlegate_authorizations_total",
            &[("result", "declined"), ("reason", "provider_insufficient_funds")],
        ),
        ("settlegate_requests_total", &[("op", "authorize"), ("status", "ok")]),
    ];
    let missing: Vec<String> = wanted
        .iter()
        .filter(|(name, labels)| !has(name, labels))
        .map(|(name, labels)| format!("{name}{labels:?}"))
        .collect();
    assert!(missing.is_empty(), "missing series: {missing:#?}\n{text}");
    // The figures are figures: payments were timed, the provider's calls and fsyncs counted.
    let value = |name: &str, labels: &[(&str, &str)]| {
        scrape
            .samples
            .iter()
            .find(|s| s.metric == name && labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
            .map(|s| match s.value {
                prometheus_parse::Value::Counter(v) | prometheus_parse::Value::Gauge(v) => v,
                prometheus_parse::Value::Untyped(v) => v,
                _ => f64::NAN,
            })
    };
    let count = |name: &str, labels: &[(&str, &str)]| value(name, labels).unwrap_or(0.0);
    assert!(count("settlegate_request_duration_seconds_count", &[("op", "authorize")]) > 0.0);
    assert!(count("settlegate_provider_call_duration_seconds_count", &[("provider", "710")]) > 0.0);
    let fsyncs: f64 = (0..2)
        .map(|s| count("settlegate_wal_fsync_duration_seconds_count", &[("shard", &s.to_string())]))
        .sum();
    assert!(fsyncs > 0.0, "{text}");
    server.shutdown().await;
}
