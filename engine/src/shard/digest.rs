//! A shard's state digest: one 64-bit hash of everything the shard holds, so that two copies
//! of a shard (the running engine's, and one rebuilt elsewhere from the shard's log alone, as
//! a replica will) can be compared without shipping their state.
//!
//! Maps are hashed order-independently: each entry is hashed on its own and the entry hashes
//! are added, so the digest does not depend on the order a map was filled in, nor on how it
//! is laid out in memory. The idempotency records are hashed in their ring's order, which is
//! state (the count limit drops the oldest first). Each entry is hashed through its `Debug`
//! form, which every state type has and which names every field; secrets are sealed and their
//! `Debug` form does not show the ciphertext, whose random nonce differs between two copies
//! sealed apart. Positions in the ring and other bookkeeping that a restore renumbers are left
//! out. The hasher is FxHash, deterministic across runs and machines of one build.

use std::fmt::{self, Write as _};
use std::hash::Hasher as _;

use rustc_hash::FxHasher;

use super::state::ShardState;

/// Feeds formatted text into a hasher, without building the string.
struct HashWriter(FxHasher);

impl fmt::Write for HashWriter {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        self.0.write(s.as_bytes());
        Ok(())
    }
}

/// The hash of one value's `Debug` form, under a section `tag`.
fn hash_of(tag: &str, value: impl fmt::Debug) -> u64 {
    let mut writer = HashWriter(FxHasher::default());
    // Writing into a hasher cannot fail.
    let _ = write!(writer, "{tag}:{value:?}");
    writer.0.finish()
}

/// Sums the entries' hashes: the same entries in any order give the same sum.
fn unordered<T: fmt::Debug>(tag: &str, entries: impl Iterator<Item = T>) -> u64 {
    entries.fold(0u64, |sum, entry| sum.wrapping_add(hash_of(tag, entry)))
}

impl ShardState {
    /// The digest of this shard's state (see the module docs).
    pub(crate) fn digest(&self) -> u64 {
        let mut parts = vec![
            hash_of("index", self.index),
            unordered("user", self.users.iter()),
            unordered("age", self.ages.iter()),
            unordered("store", self.stores.stores()),
            unordered("code", self.codes.iter()),
            unordered("coupon", self.coupons.iter()),
            hash_of("sequences", (self.code_seq, self.dispatch_seq)),
            // What the shard owes providers, and the references it keeps for it.
            unordered("in flight", self.money.in_flight.iter()),
            unordered("code money", self.money.codes.iter()),
            unordered("owed", self.money.owed.iter()),
            unordered("settled", self.settled.entries()),
            hash_of("operations", self.money.op_seq),
        ];
        let mut ring = HashWriter(FxHasher::default());
        for entry in self.idem.records() {
            let _ = write!(
                ring,
                "{:?}/{}/{}/{:?};",
                entry.key(),
                entry.expires_ms,
                entry.digest,
                entry.state()
            );
        }
        parts.push(ring.0.finish());
        // The terminal lists and age policies of the providers this shard keeps.
        for code in &self.owned_providers {
            if let Some(provider) = self.shared.registry.provider(*code) {
                let terminals = provider.export_terminals();
                let policies: Vec<_> = provider
                    .export_age_policies()
                    .into_iter()
                    .map(|(terminal, policy)| (terminal, policy.policy))
                    .collect();
                parts.push(hash_of("provider", (code, terminals, policies)));
            }
        }
        hash_of("shard", parts)
    }
}
