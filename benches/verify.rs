//! Batch verification of inherent-ID tags (HMAC-SHA256), sizes 1, 64 and 1024.
//!
//! `cargo bench --bench verify`; compare with `openssl speed -bytes <body> sha256` (the body
//! length is printed once at start) as docs/BENCHMARKS.md describes.

mod common;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};

fn verify(c: &mut Criterion) {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let bench = common::Bench::new(&runtime, 64);
    let sample = bench.signed(0);
    eprintln!("inherent ID: {} bytes, MAC'd body {} bytes", sample.len(), sample.len() - 32);
    let mut group = c.benchmark_group("verify_batch");
    for size in [1usize, 64, 1024] {
        let records: Vec<Vec<u8>> = (0..size).map(|i| bench.signed(i)).collect();
        let devices = bench.engine.devices();
        assert!(devices.verify_batch(&records, common::NOW_MS).iter().all(Result::is_ok));
        group.throughput(Throughput::Elements(size as u64));
        group.bench_with_input(BenchmarkId::from_parameter(size), &records, |b, records| {
            b.iter(|| devices.verify_batch(records, common::NOW_MS))
        });
    }
    group.finish();
}

criterion_group!(benches, verify);
criterion_main!(benches);
