//! Why the shard's maps are [`CowMap`]s: the hot-path cost and the snapshot cost of three maps
//! holding what the idempotency table held before it became a ring (a 16-byte key; a record of
//! two integers and a shared state), at the size of a busy shard.
//!
//! - `std`: `FxHashMap`, the map the shard used before: fastest, but a snapshot must walk it
//!   (one reference count per record, hundreds of milliseconds at a million).
//! - `cow`: settlegate's chunked copy-on-write map: `freeze` costs one count per chunk.
//! - `imbl`: a persistent hash array mapped trie: `clone` is O(1).
//!
//! Groups: `maps/steady` is a steady-state request (look one existing key up, insert a new
//! one, remove the oldest); `maps/freeze` is what the shard pauses for; `maps/steady_after_freeze`
//! is the same request while a frozen copy is held (the copying a snapshot defers).
//!
//! `cargo bench --bench maps`. Under `cargo test` the map holds 10,000 records instead of
//! 1,000,000.

use std::collections::VecDeque;
use std::sync::Arc;

use criterion::{criterion_group, criterion_main, BatchSize, BenchmarkId, Criterion};
use rustc_hash::{FxBuildHasher, FxHashMap};
use settlegate_engine::cow::{CowMap, CHUNK_BITS_LARGE};

type Key = (u64, u128);

#[derive(Clone)]
struct Record {
    _expires_ms: i64,
    _digest: u64,
    _state: Arc<[u8; 48]>,
}

fn record(i: u64) -> Record {
    Record { _expires_ms: i as i64, _digest: i, _state: Arc::new([0; 48]) }
}

/// Whether criterion runs as a benchmark (`cargo bench`), not once as a test.
fn full_size() -> bool {
    std::env::args().any(|arg| arg == "--bench")
}

/// The i-th key, shaped like the engine's: the routing hash of one of 1,000 users, and a
/// request ID from a counter (as `benches/common.rs` makes them).
fn key(i: u64) -> Key {
    ((i % 1000).wrapping_mul(0x9e37_79b9_7f4a_7c15), u128::from(i) << 32)
}

/// The operations the benchmark needs from each map.
trait Map {
    fn name() -> &'static str;
    fn empty(capacity: usize) -> Self;
    fn get(&self, key: &Key) -> Option<&Record>;
    fn insert(&mut self, key: Key, value: Record);
    fn remove(&mut self, key: &Key);
    /// What a snapshot takes: a deep walk for `std`, chunk pointers for `cow`, O(1) for `imbl`.
    fn freeze(&mut self) -> Box<dyn Send>;
}

impl Map for FxHashMap<Key, Record> {
    fn name() -> &'static str {
        "std"
    }
    fn empty(capacity: usize) -> Self {
        FxHashMap::with_capacity_and_hasher(capacity, FxBuildHasher)
    }
    fn get(&self, key: &Key) -> Option<&Record> {
        FxHashMap::get(self, key)
    }
    fn insert(&mut self, key: Key, value: Record) {
        FxHashMap::insert(self, key, value);
    }
    fn remove(&mut self, key: &Key) {
        FxHashMap::remove(self, key);
    }
    fn freeze(&mut self) -> Box<dyn Send> {
        // What the shard did before: every record's state counted into a list.
        Box::new(self.iter().map(|(k, v)| (*k, v.clone())).collect::<Vec<_>>())
    }
}

struct Cow(CowMap<Key, Record>);

impl Map for Cow {
    fn name() -> &'static str {
        "cow"
    }
    fn empty(capacity: usize) -> Self {
        let mut map = CowMap::new(CHUNK_BITS_LARGE);
        map.reserve(capacity);
        Cow(map)
    }
    fn get(&self, key: &Key) -> Option<&Record> {
        self.0.get(key)
    }
    fn insert(&mut self, key: Key, value: Record) {
        self.0.insert(key, value);
    }
    fn remove(&mut self, key: &Key) {
        self.0.remove(key);
    }
    fn freeze(&mut self) -> Box<dyn Send> {
        Box::new(self.0.freeze())
    }
}

impl Map for imbl::GenericHashMap<Key, Record, FxBuildHasher, imbl::shared_ptr::DefaultSharedPtr> {
    fn name() -> &'static str {
        "imbl"
    }
    fn empty(_capacity: usize) -> Self {
        imbl::GenericHashMap::with_hasher(FxBuildHasher)
    }
    fn get(&self, key: &Key) -> Option<&Record> {
        imbl::GenericHashMap::get(self, key)
    }
    fn insert(&mut self, key: Key, value: Record) {
        imbl::GenericHashMap::insert(self, key, value);
    }
    fn remove(&mut self, key: &Key) {
        imbl::GenericHashMap::remove(self, key);
    }
    fn freeze(&mut self) -> Box<dyn Send> {
        Box::new(self.clone())
    }
}

/// A map of `n` records with their insertion order, as the idempotency table keeps it.
struct Table<M> {
    map: M,
    order: VecDeque<u64>,
    next: u64,
    probe: u64,
}

impl<M: Map> Table<M> {
    fn filled(n: u64) -> Table<M> {
        let mut map = M::empty(n as usize);
        for i in 0..n {
            map.insert(key(i), record(i));
        }
        Table { map, order: (0..n).collect(), next: n, probe: 1 }
    }

    /// One request: look an existing record up, record a new one, evict the oldest.
    fn request(&mut self) -> bool {
        let n = self.order.len() as u64;
        self.probe = self.probe.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        let existing = self.order[(self.probe >> 33) as usize % n as usize];
        let found = self.map.get(&key(existing)).is_some();
        self.map.insert(key(self.next), record(self.next));
        self.order.push_back(self.next);
        self.next += 1;
        let oldest = self.order.pop_front().expect("never empty");
        self.map.remove(&key(oldest));
        found
    }
}

fn bench_map<M: Map>(c: &mut Criterion, n: u64) {
    let mut table = Table::<M>::filled(n);
    c.benchmark_group("maps/steady")
        .bench_function(BenchmarkId::new(M::name(), n), |b| b.iter(|| table.request()));
    c.benchmark_group("maps/freeze").bench_function(BenchmarkId::new(M::name(), n), |b| {
        b.iter_batched(|| (), |()| table.map.freeze(), BatchSize::PerIteration)
    });
    // A frozen copy held, as the snapshot writer holds it, renewed every 100,000 requests so the
    // figure includes the chunk copies that follow each snapshot.
    let mut frozen = table.map.freeze();
    let mut since = 0u32;
    c.benchmark_group("maps/steady_after_freeze").bench_function(
        BenchmarkId::new(M::name(), n),
        |b| {
            b.iter(|| {
                since += 1;
                if since == 100_000 {
                    since = 0;
                    frozen = table.map.freeze();
                }
                table.request()
            })
        },
    );
    drop(frozen);
}

fn maps(c: &mut Criterion) {
    let n = if full_size() { 1_000_000 } else { 10_000 };
    bench_map::<FxHashMap<Key, Record>>(c, n);
    bench_map::<Cow>(c, n);
    bench_map::<imbl::GenericHashMap<Key, Record, FxBuildHasher, imbl::shared_ptr::DefaultSharedPtr>>(
        c, n,
    );
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(20);
    targets = maps
}
criterion_main!(benches);
