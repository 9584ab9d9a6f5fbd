//! A hash map a snapshot takes in the time of a few thousand small moves: [`CowMap`].
//!
//! The map is split into a fixed number of chunks by key hash, each an `FxHashMap` of its own.
//! [`CowMap::freeze`] moves each chunk's table header (not its entries) behind an `Arc` and
//! hands the [`Frozen`] copy a reference to each, whatever the map holds; the copy is read on
//! another thread (the snapshot writer's). A change afterwards takes back only the chunk it
//! touches, the first time it touches it: moved out of its `Arc` if the frozen copy is gone,
//! copied if it is still held. The copying a snapshot needs is thus paid a chunk at a time, by
//! the changes that need it, instead of all at once by a stopped shard. Keep values cheap to
//! clone (an `Arc` for anything large): a chunk's copy clones its values.
//!
//! An owned chunk is written in place, with no atomic operation: checking a reference count on
//! every write (`Arc::make_mut`, a locked instruction) cost the in-process authorize path
//! 6–13%.
//!
//! Why not a persistent map (a hash array mapped trie, as `imbl` has)? Its clone is O(1) as
//! well, but a lookup among a million entries walks four or five nodes, each a dependent cache
//! miss, and the shard's hot path is bound by exactly those misses. Here a lookup is one step
//! to the chunk (whose array stays in cache) and then `FxHashMap`'s own probe.
//! `docs/BENCHMARKS-HISTORY.md` has the comparison (`cargo bench --bench maps`).

use std::borrow::Borrow;
use std::hash::{BuildHasher, Hash};
use std::sync::Arc;

use rustc_hash::{FxBuildHasher, FxHashMap};

/// Chunk bits for a map that reaches a million entries per shard (users, codes, stores):
/// 1,024 chunks, so a write after a snapshot copies a chunk of about a thousand entries (tens
/// of microseconds). 4,096 chunks measured slower per request in `benches/maps.rs`; 256 make
/// each chunk's copy four times longer.
pub const CHUNK_BITS_LARGE: u32 = 10;

/// Chunk bits for a map that stays smaller (age registrations, coupons).
pub const CHUNK_BITS_SMALL: u32 = 8;

/// Entries from which [`CowMap::insert_in_bulk`] fills its chunks on two threads.
const BULK_PARALLEL_MIN: usize = 65_536;

/// A chunked copy-on-write hash map. See the module docs.
pub struct CowMap<K, V> {
    chunks: Box<[CowCell<FxHashMap<K, V>>]>,
    /// `64 - log2(chunks)`: the chunk is the top bits of the mixed hash (see `chunk_index`).
    shift: u32,
    len: usize,
}

/// A value owned alone (written in place, with no atomic operation), or shared with a frozen
/// copy since the last [`CowCell::freeze`] (written only after taking it back: moved out of
/// its `Arc` if the copy is gone, copied if not). A [`CowMap`]'s chunk is one, and so is a
/// chunk of the idempotency records' ring.
pub enum CowCell<T> {
    /// Held by this cell alone.
    Owned(T),
    /// Shared with a frozen copy.
    Shared(Arc<T>),
}

impl<T> CowCell<T> {
    /// The value, to read.
    pub fn get(&self) -> &T {
        match self {
            CowCell::Owned(value) => value,
            CowCell::Shared(value) => value,
        }
    }

    /// Whether a frozen copy may still share the value (a write would take it back first).
    pub fn is_shared(&self) -> bool {
        matches!(self, CowCell::Shared(_))
    }
}

impl<T: Default> Default for CowCell<T> {
    fn default() -> Self {
        CowCell::Owned(T::default())
    }
}

impl<T: Clone + Default> CowCell<T> {
    /// The value, writable: a shared value is taken back first.
    pub fn get_mut(&mut self) -> &mut T {
        if let CowCell::Shared(_) = self {
            let CowCell::Shared(shared) = std::mem::take(self) else { unreachable!() };
            *self = CowCell::Owned(Arc::unwrap_or_clone(shared));
        }
        match self {
            CowCell::Owned(value) => value,
            CowCell::Shared(_) => unreachable!("taken back above"),
        }
    }

    /// A frozen copy of the value: it becomes shared (moved behind an `Arc`, not copied) and
    /// the copy takes a reference to it.
    pub fn freeze(&mut self) -> Arc<T> {
        if let CowCell::Owned(value) = self {
            *self = CowCell::Shared(Arc::new(std::mem::take(value)));
        }
        match self {
            CowCell::Shared(value) => Arc::clone(value),
            CowCell::Owned(_) => unreachable!("shared above"),
        }
    }
}

/// A frozen copy of a [`CowMap`]: read-only, and `Send` to another thread.
pub struct Frozen<K, V> {
    chunks: Box<[Arc<FxHashMap<K, V>>]>,
    len: usize,
}

impl<K: Hash + Eq + Clone, V: Clone> CowMap<K, V> {
    /// An empty map of `2^chunk_bits` chunks (1..=16 bits). An empty chunk allocates nothing.
    pub fn new(chunk_bits: u32) -> CowMap<K, V> {
        assert!((1..=16).contains(&chunk_bits), "chunk bits out of range");
        CowMap {
            chunks: (0..1usize << chunk_bits).map(|_| CowCell::default()).collect(),
            shift: 64 - chunk_bits,
            len: 0,
        }
    }

    /// Makes room for `additional` more entries, spread evenly over the chunks (with room for
    /// the unevenness of a hash), so that filling the map moves no entry.
    pub fn reserve(&mut self, additional: usize) {
        let per_chunk = additional / self.chunks.len();
        if per_chunk == 0 {
            return;
        }
        // A chunk of n entries expected holds about n ± 4·√n at the extremes.
        let slack = 4 * (per_chunk as f64).sqrt() as usize + 4;
        for chunk in self.chunks.iter_mut() {
            chunk.get_mut().reserve(per_chunk + slack);
        }
    }

    fn chunk_index<Q: Hash + ?Sized>(&self, key: &Q) -> usize {
        // The chunk's own table hashes the key the same way and uses its low bits (the bucket)
        // and top seven (the control byte), so the chunk must not be those bits. Nor may it be
        // a slice of the Fx hash: for the engine's keys (a user's routing hash, then a request
        // counter shifted left) the middle bits depend on the user alone, which would put all
        // of one user's records in one chunk. A full avalanche (MurmurHash3's finalizer) makes
        // every bit of the chunk depend on every bit of the hash.
        let mut hash = FxBuildHasher.hash_one(key);
        hash ^= hash >> 33;
        hash = hash.wrapping_mul(0xff51_afd7_ed55_8ccd);
        hash ^= hash >> 33;
        hash = hash.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
        hash ^= hash >> 33;
        (hash >> self.shift) as usize
    }

    /// The number of entries.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the map is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The value of `key`.
    pub fn get<Q: Hash + Eq + ?Sized>(&self, key: &Q) -> Option<&V>
    where
        K: Borrow<Q>,
    {
        self.chunks[self.chunk_index(key)].get().get(key)
    }

    /// Whether `key` has a value.
    pub fn contains_key<Q: Hash + Eq + ?Sized>(&self, key: &Q) -> bool
    where
        K: Borrow<Q>,
    {
        self.get(key).is_some()
    }

    /// The chunk for `key`, writable; none if it is shared and does not hold `key` (a miss
    /// must not copy a chunk).
    fn chunk_holding_mut<Q: Hash + Eq + ?Sized>(&mut self, key: &Q) -> Option<&mut FxHashMap<K, V>>
    where
        K: Borrow<Q>,
    {
        let index = self.chunk_index(key);
        let chunk = &mut self.chunks[index];
        if chunk.is_shared() && !chunk.get().contains_key(key) {
            return None;
        }
        Some(chunk.get_mut())
    }

    /// The value of `key`, writable. A shared chunk is taken back only if it holds `key`.
    pub fn get_mut<Q: Hash + Eq + ?Sized>(&mut self, key: &Q) -> Option<&mut V>
    where
        K: Borrow<Q>,
    {
        self.chunk_holding_mut(key)?.get_mut(key)
    }

    /// Sets the value of `key`, returning the one it replaces.
    pub fn insert(&mut self, key: K, value: V) -> Option<V> {
        let index = self.chunk_index(&key);
        let previous = self.chunks[index].get_mut().insert(key, value);
        if previous.is_none() {
            self.len += 1;
        }
        previous
    }

    /// Removes `key`, returning its value. A shared chunk is taken back only if it holds `key`.
    pub fn remove<Q: Hash + Eq + ?Sized>(&mut self, key: &Q) -> Option<V>
    where
        K: Borrow<Q>,
    {
        let removed = self.chunk_holding_mut(key)?.remove(key);
        if removed.is_some() {
            self.len -= 1;
        }
        removed
    }

    /// Inserts `entries` a chunk at a time (a later entry with the same key replaces an
    /// earlier one). They are first sorted into their chunks, so each chunk's table is filled
    /// while it is in cache, instead of one random write to memory per entry; restoring a
    /// snapshot uses this.
    pub fn insert_in_bulk(&mut self, entries: Vec<(K, V)>)
    where
        K: Send + Sync,
        V: Send + Sync,
    {
        let indexes: Vec<u16> =
            entries.iter().map(|(key, _)| self.chunk_index(key) as u16).collect();
        let total = indexes.len();
        let mut counts = vec![0usize; self.chunks.len()];
        for &index in &indexes {
            counts[usize::from(index)] += 1;
        }
        let mut by_chunk: Vec<Vec<(K, V)>> =
            counts.iter().map(|&n| Vec::with_capacity(n)).collect();
        for (entry, index) in entries.into_iter().zip(indexes) {
            by_chunk[usize::from(index)].push(entry);
        }
        // Chunks are independent tables: a large load fills the two halves on two threads.
        let fill = |chunks: &mut [CowCell<FxHashMap<K, V>>], by_chunk: Vec<Vec<(K, V)>>| {
            let mut added = 0;
            for (chunk, entries) in chunks.iter_mut().zip(by_chunk) {
                if entries.is_empty() {
                    continue;
                }
                let map = chunk.get_mut();
                map.reserve(entries.len());
                for (key, value) in entries {
                    added += usize::from(map.insert(key, value).is_none());
                }
            }
            added
        };
        let added = if total < BULK_PARALLEL_MIN {
            fill(&mut self.chunks, by_chunk)
        } else {
            let half = self.chunks.len() / 2;
            let (low, high) = self.chunks.split_at_mut(half);
            let high_entries = by_chunk.split_off(half);
            std::thread::scope(|scope| {
                let other = scope.spawn(|| fill(high, high_entries));
                fill(low, by_chunk) + other.join().expect("a bulk insert panicked")
            })
        };
        self.len += added;
    }

    /// Every entry, in no particular order.
    pub fn iter(&self) -> impl Iterator<Item = (&K, &V)> {
        self.chunks.iter().flat_map(|chunk| chunk.get().iter())
    }

    /// Every value, in no particular order.
    pub fn values(&self) -> impl Iterator<Item = &V> {
        self.chunks.iter().flat_map(|chunk| chunk.get().values())
    }

    /// A frozen copy: every chunk becomes shared (its table moved behind an `Arc`, not
    /// copied) and the copy takes a reference to each.
    pub fn freeze(&mut self) -> Frozen<K, V> {
        let chunks = self.chunks.iter_mut().map(CowCell::freeze).collect();
        Frozen { chunks, len: self.len }
    }
}

impl<K, V> Frozen<K, V> {
    /// The number of entries.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the copy is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Every entry, in no particular order.
    pub fn iter(&self) -> impl Iterator<Item = (&K, &V)> {
        self.chunks.iter().flat_map(|chunk| chunk.iter())
    }
}

impl<K, V> std::fmt::Debug for CowMap<K, V> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CowMap")
            .field("len", &self.len)
            .field("chunks", &self.chunks.len())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    /// A small deterministic generator (xorshift), so a failure replays.
    fn next(state: &mut u64) -> u64 {
        *state ^= *state << 13;
        *state ^= *state >> 7;
        *state ^= *state << 17;
        *state
    }

    /// Random inserts, removals and changes against a `BTreeMap` model, freezing now and then:
    /// every frozen copy must still read exactly as the model did when it was frozen.
    #[test]
    fn matches_a_model_and_frozen_copies_do_not_change() {
        for seed in 1..=20u64 {
            let mut rng = seed.wrapping_mul(0x2545_f491_4f6c_dd1d) | 1;
            let mut map: CowMap<u32, u64> = CowMap::new(4);
            let mut model = BTreeMap::new();
            let mut frozen: Vec<(Frozen<u32, u64>, BTreeMap<u32, u64>)> = Vec::new();
            for step in 0..3000u64 {
                let key = (next(&mut rng) % 300) as u32;
                match next(&mut rng) % 6 {
                    0 | 1 => assert_eq!(map.insert(key, step), model.insert(key, step)),
                    2 => assert_eq!(map.remove(&key), model.remove(&key)),
                    3 => {
                        if let Some(v) = map.get_mut(&key) {
                            *v += 1;
                        }
                        if let Some(v) = model.get_mut(&key) {
                            *v += 1;
                        }
                    }
                    4 => assert_eq!(map.get(&key), model.get(&key)),
                    _ => {
                        if next(&mut rng).is_multiple_of(50) {
                            frozen.push((map.freeze(), model.clone()));
                        }
                    }
                }
                assert_eq!(map.len(), model.len());
            }
            let live: BTreeMap<u32, u64> = map.iter().map(|(k, v)| (*k, *v)).collect();
            assert_eq!(live, model);
            for (copy, then) in &frozen {
                let read: BTreeMap<u32, u64> = copy.iter().map(|(k, v)| (*k, *v)).collect();
                assert_eq!(&read, then);
                assert_eq!(copy.len(), then.len());
            }
        }
    }

    /// On one thread, and on two (a load of `BULK_PARALLEL_MIN` entries or more).
    #[test]
    fn bulk_insert_matches_inserting_one_by_one() {
        for (count, keys) in [(5_000u64, 3_001), (BULK_PARALLEL_MIN as u64 + 10_000, 60_013)] {
            bulk_insert_matches_inserting_one_by_one_with(count, keys);
        }
    }

    fn bulk_insert_matches_inserting_one_by_one_with(count: u64, keys: u64) {
        let entries: Vec<(u64, u64)> = (0..count).map(|i| (i * 7 % keys, i)).collect();
        let mut one_by_one: CowMap<u64, u64> = CowMap::new(6);
        let mut bulk: CowMap<u64, u64> = CowMap::new(6);
        one_by_one.insert(5, 99);
        bulk.insert(5, 99);
        let frozen = bulk.freeze();
        for (k, v) in entries.clone() {
            one_by_one.insert(k, v);
        }
        bulk.insert_in_bulk(entries);
        let read =
            |map: &CowMap<u64, u64>| map.iter().map(|(k, v)| (*k, *v)).collect::<BTreeMap<_, _>>();
        assert_eq!(read(&bulk), read(&one_by_one));
        assert_eq!(bulk.len(), one_by_one.len());
        assert_eq!(
            frozen.iter().collect::<Vec<_>>(),
            vec![(&5, &99)],
            "a frozen copy is untouched"
        );
    }

    #[test]
    fn keys_spread_over_every_chunk() {
        // Shaped as idempotency keys: 100 users' routing hashes, request IDs from a counter.
        let mut map: CowMap<(u64, u128), ()> = CowMap::new(8);
        for i in 0..100_000u64 {
            map.insert(((i % 100).wrapping_mul(0x9e37_79b9_7f4a_7c15), u128::from(i) << 32), ());
        }
        let sizes: Vec<usize> = map.chunks.iter().map(|c| c.get().len()).collect();
        let (min, max) = (sizes.iter().min().unwrap(), sizes.iter().max().unwrap());
        // 390 expected per chunk; a sound spread stays well within a factor of two.
        assert!(*min > 250 && *max < 550, "chunk sizes from {min} to {max}");
    }

    #[test]
    fn a_write_copies_only_the_chunk_it_touches() {
        let mut map: CowMap<u64, u64> = CowMap::new(6);
        map.reserve(10_000);
        for key in 0..10_000u64 {
            map.insert(key, key);
        }
        let frozen = map.freeze();
        // Reads and misses copy nothing.
        assert_eq!(map.get(&5), Some(&5));
        assert_eq!(map.get_mut(&20_000), None);
        assert_eq!(map.remove(&20_000), None);
        let shared = |map: &CowMap<u64, u64>| {
            let shared_with = |chunk: &CowCell<FxHashMap<u64, u64>>,
                               frozen: &Arc<FxHashMap<u64, u64>>| matches!(chunk, CowCell::Shared(map) if Arc::ptr_eq(map, frozen));
            map.chunks.iter().zip(frozen.chunks.iter()).filter(|(a, b)| shared_with(a, b)).count()
        };
        assert_eq!(shared(&map), 64);
        *map.get_mut(&5).unwrap() = 6;
        assert_eq!(shared(&map), 63);
        assert_eq!(frozen.iter().find(|(k, _)| **k == 5).map(|(_, v)| *v), Some(5));
    }
}
