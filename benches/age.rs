//! The age check of a basket (A2): `age::decide` on baskets of 1, 10 and 100 lines with half of
//! them age-restricted, against a registration, in the store's time zone.
//!
//! `cargo bench --bench age`. It is pure CPU work inside the owning shard, so its cost adds
//! directly to the shard's time per payment; compare with the in-process authorize figure.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use settlegate_engine::age::{self, AgeConfig, AgeRegistration, Date, VerificationMethod};
use settlegate_engine::{AgePolicy, Basket, BasketItem, OnAgeFailure};

/// 2026-11-22T00:00:00Z.
const NOW_MS: i64 = 1_795_305_600_000;

fn basket(lines: usize) -> Basket {
    let items = (0..lines)
        .map(|i| BasketItem {
            item_id: format!("ITEM-{i:04}"),
            category: if i % 2 == 0 { "alcohol".into() } else { String::new() },
            quantity: 1,
            unit_amount_minor: 100,
        })
        .collect();
    Basket { age_confirmation: true, items }
}

fn decide(c: &mut Criterion) {
    let config = AgeConfig::default();
    let policy = AgePolicy {
        jurisdiction: "JP".into(),
        time_zone: "Asia/Tokyo".into(),
        on_failure: OnAgeFailure::RemoveItems,
        strict: false,
    };
    let resolved = config.resolve(&policy).unwrap();
    let adult = AgeRegistration {
        birth_date: Date::new(1990, 6, 15).unwrap(),
        method: VerificationMethod::DocumentChip,
        verified_at_ms: NOW_MS - 1_000,
        valid_until_ms: NOW_MS + 86_400_000,
    };
    let minor = AgeRegistration { birth_date: Date::new(2010, 6, 15).unwrap(), ..adult };
    let mut group = c.benchmark_group("age_decide");
    for lines in [1usize, 10, 100] {
        let basket = basket(lines);
        let total = basket.total().unwrap();
        for (who, registration) in [("adult", adult), ("minor", minor)] {
            let decision =
                age::decide(&basket, total, Some(&registration), &resolved, &config, NOW_MS)
                    .unwrap();
            assert_eq!(decision.verdict.items.is_empty(), who == "adult");
            group.throughput(Throughput::Elements(1));
            group.bench_with_input(BenchmarkId::new(who, lines), &basket, |b, basket| {
                b.iter(|| {
                    age::decide(basket, total, Some(&registration), &resolved, &config, NOW_MS)
                })
            });
        }
    }
    group.finish();
}

criterion_group!(benches, decide);
criterion_main!(benches);
