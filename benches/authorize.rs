//! The whole in-process authorize path (verify, reserve in the shard, zero-latency provider,
//! complete in the shard, notice), by batch size; plus `concurrent`: 4 submitters at once.
//!
//! `cargo bench --bench authorize`. Signing is done outside the timed region: it is the
//! phone's work, not the engine's.

mod common;

use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use futures::future::join_all;
use settlegate_engine::AuthOutcome;

fn authorize(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
    let bench = common::Bench::new(&runtime, 1_000);
    let mut group = c.benchmark_group("authorize_batch");
    for size in [1usize, 256, 1024] {
        group.throughput(Throughput::Elements(size as u64));
        group.bench_function(BenchmarkId::from_parameter(size), |b| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    let requests = bench.requests(size);
                    let started = Instant::now();
                    let results = runtime.block_on(bench.engine.authorize_batch(requests));
                    total += started.elapsed();
                    assert!(matches!(results[0], Ok(AuthOutcome::Approved(_))), "{:?}", results[0]);
                }
                total
            })
        });
    }
    group.finish();

    let mut group = c.benchmark_group("authorize_concurrent");
    let (submitters, size) = (4usize, 1024usize);
    group.throughput(Throughput::Elements((submitters * size) as u64));
    group.bench_function(
        BenchmarkId::new("submitters_x_batch", format!("{submitters}x{size}")),
        |b| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    let batches: Vec<_> = (0..submitters).map(|_| bench.requests(size)).collect();
                    let started = Instant::now();
                    let results = runtime.block_on(async {
                        let tasks = batches.into_iter().map(|batch| {
                            let engine = bench.engine.clone();
                            tokio::spawn(async move { engine.authorize_batch(batch).await })
                        });
                        join_all(tasks).await
                    });
                    total += started.elapsed();
                    let first = &results[0].as_ref().unwrap()[0];
                    assert!(matches!(first, Ok(AuthOutcome::Approved(_))), "{first:?}");
                }
                total
            })
        },
    );
    group.finish();
}

criterion_group!(benches, authorize);
criterion_main!(benches);
