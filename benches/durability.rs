//! Durability costs: the authorize path with the write-ahead log under each fsync policy (and
//! without a log), and the time to recover a data directory of N users with one payment code each.
//!
//! `cargo bench --bench durability`. `SETTLEGATE_RECOVERY_USERS=1000000` sets the large
//! recovery size (default 10,000; the test suite runs 200).

mod common;

use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use futures::future::join_all;
use settlegate_engine::wal::FsyncPolicy;
use settlegate_engine::{AuthOutcome, CodeOutcome, Engine, IssueCodeRequest};

fn durable(dir: &std::path::Path, fsync: FsyncPolicy) -> settlegate_engine::EngineConfig {
    let mut config = common::config();
    config.durability.data_dir = Some(dir.to_owned());
    config.durability.fsync = fsync;
    config
}

fn authorize_by_policy(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
    let mut group = c.benchmark_group("authorize_fsync");
    let (submitters, size) = (4usize, 1024usize);
    group.throughput(Throughput::Elements((submitters * size) as u64));
    let policies =
        [("memory", None), ("off", Some(FsyncPolicy::Off)), ("always", Some(FsyncPolicy::Always))];
    for (name, policy) in policies {
        let dir = tempfile::tempdir().unwrap();
        let config = match policy {
            None => common::config(),
            Some(fsync) => durable(dir.path(), fsync),
        };
        let bench = common::Bench::with_config(&runtime, 1_000, config);
        group.bench_function(BenchmarkId::from_parameter(name), |b| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    let batches: Vec<_> = (0..submitters).map(|_| bench.requests(size)).collect();
                    let started = Instant::now();
                    let results = runtime.block_on(async {
                        join_all(batches.into_iter().map(|batch| {
                            let engine = bench.engine.clone();
                            tokio::spawn(async move { engine.authorize_batch(batch).await })
                        }))
                        .await
                    });
                    total += started.elapsed();
                    let first = &results[0].as_ref().unwrap()[0];
                    assert!(matches!(first, Ok(AuthOutcome::Approved(_))), "{first:?}");
                }
                total
            })
        });
        bench.engine.shutdown();
    }
    group.finish();
}

fn recovery(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
    let large: usize = std::env::var("SETTLEGATE_RECOVERY_USERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10_000);
    let mut group = c.benchmark_group("recovery");
    group.sample_size(10);
    // `cargo test` runs benches without `--bench`: only the small size there.
    let measuring = std::env::args().any(|arg| arg == "--bench");
    let sizes: &[usize] = if measuring { &[200, large] } else { &[200] };
    for &users in sizes {
        let dir = tempfile::tempdir().unwrap();
        let setup = Instant::now();
        let bench =
            common::Bench::with_config(&runtime, users, durable(dir.path(), FsyncPolicy::Off));
        // One payment code per user (issued, so held): the other half of the data set.
        runtime.block_on(async {
            for chunk in (0..users).collect::<Vec<_>>().chunks(512) {
                let issues = chunk.iter().map(|&i| {
                    bench.engine.issue_code(IssueCodeRequest {
                        client_request_id: (7 << 100) | i as u128,
                        inherent_id: bench.signed(i),
                        validity_ms: 86_400_000,
                        deliver_to: None,
                        order_ref: String::new(),
                    })
                });
                for outcome in futures::future::join_all(issues).await {
                    assert!(matches!(outcome, Ok(CodeOutcome::Issued(_))), "{outcome:?}");
                }
            }
        });
        bench.engine.shutdown();
        drop(bench);
        eprintln!("recovery/{users}: data directory written in {:?}", setup.elapsed());
        group.throughput(Throughput::Elements(users as u64));
        group.bench_function(BenchmarkId::new("users_and_codes", users), |b| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    let started = Instant::now();
                    let engine =
                        Engine::start(durable(dir.path(), FsyncPolicy::Off)).expect("recovers");
                    total += started.elapsed();
                    engine.shutdown();
                }
                total
            })
        });
    }
    group.finish();
}

criterion_group!(benches, authorize_by_policy, recovery);
criterion_main!(benches);
