//! W2–W3 hot paths: the nearest-store lookup among 1,000,000 stores (the R-tree of one shard's
//! cells, and the engine's `store_at` through its shards), and the usable-methods query end to
//! end in-process.
//!
//! `cargo bench --bench geo`. Under `cargo test` (the test suite runs every bench once) the
//! store count drops to 10,000 so the suite stays quick; the figures in docs/BENCHMARKS.md
//! come from `cargo bench`.

mod common;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use settlegate_engine::geo;
use settlegate_engine::{AcceptedMethod, BestBy, MeansInput, MeansKind, Store, UsableQuery};
use settlegate_engine::{AddMeansOptions, RequestId};

/// Whether criterion runs as a benchmark (`cargo bench`), not once as a test.
fn full_size() -> bool {
    std::env::args().any(|arg| arg == "--bench")
}

/// A point in a box around Japan's main islands: latitude 31–45, longitude 129–146.
fn point(rng: &mut ChaCha8Rng) -> (f64, f64) {
    (rng.gen_range(31.0..45.0), rng.gen_range(129.0..146.0))
}

fn nearest(c: &mut Criterion) {
    let stores = if full_size() { 1_000_000 } else { 10_000 };
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    let tree = geo::bulk_tree((0..stores).map(|i| {
        let (lat, lon) = point(&mut rng);
        (format!("S{i:07}"), lat, lon)
    }));
    let queries: Vec<[f64; 3]> = (0..4096)
        .map(|_| {
            let (lat, lon) = point(&mut rng);
            geo::unit_vector(lat, lon)
        })
        .collect();
    // 1,000,000 stores over ~2.3 million km²: about one store per 2 km²; search 5 km.
    let max_chord = geo::metres_to_chord(5_000.0);
    let found = queries.iter().filter(|q| !geo::nearest_in(&tree, **q, max_chord).is_empty());
    eprintln!("{stores} stores; {} of {} queries find one", found.count(), queries.len());
    let mut group = c.benchmark_group("nearest_store");
    group.throughput(Throughput::Elements(1));
    group.bench_function(BenchmarkId::new("rtree", stores), |b| {
        let mut i = 0;
        b.iter(|| {
            i = (i + 1) % queries.len();
            geo::nearest_in(&tree, queries[i], max_chord)
        })
    });
    group.finish();
}

fn store(i: usize, rng: &mut ChaCha8Rng) -> Store {
    let (latitude, longitude) = point(rng);
    Store {
        store_id: format!("STORE-{i:06}"),
        name: format!("Store {i}"),
        industry: "5411".into(),
        address: String::new(),
        latitude,
        longitude,
        beacons: Vec::new(),
        wifi: Vec::new(),
        qr_code: None,
        accepts: vec![
            AcceptedMethod { kind: MeansKind::CreditCard, brand: "visa".into() },
            AcceptedMethod { kind: MeansKind::EMoney, brand: "suica".into() },
        ],
    }
}

fn engine_paths(c: &mut Criterion) {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let (users, stores) = if full_size() { (10_000, 100_000) } else { (200, 1_000) };
    let bench = common::Bench::new(&runtime, users);
    let engine = &bench.engine;
    let mut rng = ChaCha8Rng::seed_from_u64(11);
    runtime.block_on(async {
        for chunk in (0..stores).collect::<Vec<_>>().chunks(512) {
            let upserts = chunk.iter().map(|&i| {
                engine.upsert_store(
                    RequestId(1 << 100 | i as u128),
                    store(i, &mut ChaCha8Rng::seed_from_u64(i as u64)),
                )
            });
            for result in futures::future::join_all(upserts).await {
                result.expect("store");
            }
        }
        let suica = MeansInput::EMoney { emoney_type: "suica".into() };
        for (i, payer) in bench.payers.iter().enumerate() {
            let added = engine
                .add_means(
                    RequestId(1 << 90 | i as u128),
                    &payer.user,
                    &suica,
                    AddMeansOptions::default(),
                )
                .await
                .unwrap();
            engine
                .top_up(
                    RequestId(1 << 80 | i as u128),
                    &payer.user,
                    added.means_id,
                    10_000,
                    "JPY".try_into().unwrap(),
                )
                .await
                .unwrap();
        }
    });

    let mut group = c.benchmark_group("engine");
    let positions: Vec<(f64, f64)> = (0..1024).map(|_| point(&mut rng)).collect();
    group.throughput(Throughput::Elements(1));
    group.bench_function(BenchmarkId::new("store_at", stores), |b| {
        let mut i = 0;
        b.iter(|| {
            i = (i + 1) % positions.len();
            let (lat, lon) = positions[i];
            let _ = runtime.block_on(engine.store_at(lat, lon, 20_000));
        })
    });
    let batch = 1024;
    let queries: Vec<UsableQuery> = (0..batch)
        .map(|i| UsableQuery {
            user: bench.payers[i % bench.payers.len()].user.clone(),
            store_id: format!("STORE-{:06}", (i * 7919) % stores),
            best_by: if i % 2 == 0 { BestBy::MostUsed } else { BestBy::LargestBalance },
        })
        .collect();
    let results = runtime.block_on(engine.usable_methods_batch(queries.clone()));
    assert!(results.iter().all(|r| r.as_ref().is_ok_and(|u| u.best.is_some())));
    for submitters in [1usize, 4] {
        group.throughput(Throughput::Elements((batch * submitters) as u64));
        group.bench_function(BenchmarkId::new("usable_methods_1024x", submitters), |b| {
            b.iter(|| {
                runtime.block_on(futures::future::join_all(
                    (0..submitters).map(|_| engine.usable_methods_batch(queries.clone())),
                ))
            })
        });
    }
    group.finish();
}

criterion_group!(benches, nearest, engine_paths);
criterion_main!(benches);
