//! Settled payments kept for their refunds (`REFUND` target 2): an append-only store.
//!
//! Every approved payment at a provider that settles sales is kept for its refund window, and
//! nearly all of them are never refunded. A map of a million entries made each one pay a
//! random insertion (and, at the bound, a random removal): about 1.5 times the server's CPU
//! per authorization (`docs/BENCHMARKS.md`). Here keeping one is an append to a block that
//! stays in the cache, with an entry in that block's small index; a block once full is sealed
//! with its keys sorted, so that a refund (rare) finds its payment with a binary search per
//! block, newest first. Blocks leave whole, oldest first: when every payment in the oldest is
//! past its window (the sweeper), or when the store is at its bound. Refunds, few, are kept
//! beside the payments, by the payment's dispatch ID (unique in its shard).
//!
//! The store is a function of the order of its pushes alone, so a replayed shard and one
//! restored from a snapshot (which lists the entries in that order) hold the same blocks.

use std::collections::VecDeque;
use std::sync::Arc;

use rustc_hash::FxHashMap;

use super::{CodeMoney, IdemKey, PurseOf, Reference, SettledPayment};

/// The most payments a block holds.
const BLOCK_MAX: usize = 8_192;

/// A settled payment as the store keeps it: what a refund needs, its refunds beside it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Kept {
    /// The payment's reference, with its auth code.
    pub(crate) reference: Reference,
    /// The purse it was paid from, if the engine keeps that balance.
    pub(crate) purse: Option<PurseOf>,
}

/// A sealed block: its payments in the order they were kept, and its keys sorted.
#[derive(Debug)]
struct Block {
    entries: Vec<(IdemKey, Kept)>,
    /// Each key with its entry's position, sorted by key then position.
    sorted: Vec<(IdemKey, u32)>,
    /// The latest end of a refund window among its payments.
    until_max_ms: i64,
}

impl Block {
    /// The last entry kept under `key`, if any.
    fn find(&self, key: &IdemKey) -> Option<&Kept> {
        let after = self.sorted.partition_point(|(k, _)| k <= key);
        let (k, at) = self.sorted.get(after.checked_sub(1)?)?;
        (k == key).then(|| &self.entries[*at as usize].1)
    }
}

/// The settled payments a shard keeps for their refunds (see the module docs). Cloning it (a
/// snapshot's capture) shares the sealed blocks and copies the open one.
#[derive(Debug, Clone, Default)]
pub(crate) struct SettledStore {
    sealed: VecDeque<Arc<Block>>,
    /// The block being filled, and its keys' positions in it.
    open: Vec<(IdemKey, Kept)>,
    open_index: FxHashMap<IdemKey, u32>,
    open_until_max_ms: i64,
    /// Refunds made of each payment, by its dispatch ID: (the refund's idempotency key, its
    /// amount).
    refunds: FxHashMap<u64, Vec<(IdemKey, u64)>>,
    len: usize,
}

impl SettledStore {
    /// Payments kept, a later one under a key kept before included.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// Whether none is kept.
    #[cfg(test)]
    pub(crate) fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The size of a block for a store of at most `max` payments: a sixteenth of it, so that
    /// the bound drops payments a block at a time and never more than that below it.
    fn block_len(max: usize) -> usize {
        (max / 16).clamp(1, BLOCK_MAX)
    }

    /// Keeps `payment` under `key`, its refund window ending at
    /// `until_ms`, in a store of at most `max` payments: at the bound, the oldest block makes
    /// room. A key kept before is found as this payment from now on.
    pub(crate) fn push(&mut self, key: IdemKey, payment: Kept, until_ms: i64, max: usize) {
        if self.open.len() >= Self::block_len(max) {
            self.seal();
        }
        while self.len >= max && !self.sealed.is_empty() {
            self.drop_oldest();
        }
        let at = u32::try_from(self.open.len()).expect("a block holds at most BLOCK_MAX");
        self.open_index.insert(key, at);
        self.open.push((key, payment));
        self.open_until_max_ms = self.open_until_max_ms.max(until_ms);
        self.len += 1;
    }

    fn seal(&mut self) {
        let entries = std::mem::take(&mut self.open);
        self.open_index.clear();
        let mut sorted: Vec<(IdemKey, u32)> =
            entries.iter().enumerate().map(|(at, (key, _))| (*key, at as u32)).collect();
        sorted.sort_unstable();
        let until_max_ms = std::mem::take(&mut self.open_until_max_ms);
        self.sealed.push_back(Arc::new(Block { entries, sorted, until_max_ms }));
    }

    fn drop_oldest(&mut self) {
        let Some(block) = self.sealed.pop_front() else { return };
        self.len -= block.entries.len();
        for (_, payment) in &block.entries {
            self.refunds.remove(&payment.reference.dispatch_id);
        }
    }

    /// The sweeper's part: drops the oldest blocks whose payments are all past their refund
    /// window at `now_ms`. (A payment past its window in a block that stays is refused when
    /// asked for: its window is checked then.)
    pub(crate) fn sweep(&mut self, now_ms: i64) {
        while self.sweep_due(now_ms) {
            self.drop_oldest();
        }
    }

    /// Whether [`Self::sweep`] at `now_ms` would drop a block.
    pub(crate) fn sweep_due(&self, now_ms: i64) -> bool {
        self.sealed.front().is_some_and(|block| block.until_max_ms <= now_ms)
    }

    /// The payment last kept under `key` (its refunds: [`Self::refunds`]).
    pub(crate) fn get(&self, key: &IdemKey) -> Option<&Kept> {
        if let Some(&at) = self.open_index.get(key) {
            return Some(&self.open[at as usize].1);
        }
        self.sealed.iter().rev().find_map(|block| block.find(key))
    }

    /// The refunds made of the payment of dispatch `dispatch_id`.
    pub(crate) fn refunds(&self, dispatch_id: u64) -> &[(IdemKey, u64)] {
        self.refunds.get(&dispatch_id).map_or(&[], Vec::as_slice)
    }

    /// Records the refunds of the payment of dispatch `dispatch_id`, all of them.
    pub(crate) fn set_refunds(&mut self, dispatch_id: u64, refunds: Vec<(IdemKey, u64)>) {
        self.refunds.insert(dispatch_id, refunds);
    }

    /// Every payment kept, in the order kept, with its refunds filled in.
    pub(crate) fn entries(&self) -> impl Iterator<Item = (IdemKey, SettledPayment)> + '_ {
        let sealed = self.sealed.iter().flat_map(|block| block.entries.iter());
        sealed.chain(self.open.iter()).map(|(key, kept)| {
            let reference = kept.reference.clone();
            let refunds = self.refunds(reference.dispatch_id).to_vec();
            let money = CodeMoney { reference, refunds };
            (*key, SettledPayment { money, purse: kept.purse.clone() })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::Currency;

    fn payment(dispatch_id: u64) -> Kept {
        let reference = Reference {
            dispatch_id,
            provider_code: 1,
            auth_code: None,
            amount_minor: 100,
            currency: Currency::from_bytes(*b"JPY").unwrap(),
            terminal_id: "T".into(),
            card_token: None,
            at_ms: dispatch_id as i64,
        };
        Kept { reference, purse: None }
    }

    fn ids(store: &SettledStore) -> Vec<u64> {
        store.entries().map(|(_, p)| p.money.reference.dispatch_id).collect()
    }

    #[test]
    fn payments_are_found_newest_first_and_leave_oldest_first_at_the_bound() {
        let mut store = SettledStore::default();
        let max = 64; // blocks of 4
        for id in 0..100u64 {
            store.push((id % 40, u128::from(id % 40)), payment(id), id as i64 + 1_000, max);
        }
        assert!(store.len() <= max && store.len() > max - 4, "{}", store.len());
        // Key 5 was kept as payments 5, 45 and 85: the last is found.
        assert_eq!(store.get(&(5, 5)).unwrap().reference.dispatch_id, 85);
        // The oldest left: what stays is a run of the newest.
        let kept = ids(&store);
        assert_eq!(kept, ((100 - kept.len() as u64)..100).collect::<Vec<_>>());
        // Every key of the last 40 payments is found as its latest.
        for id in 60..100u64 {
            let key = (id % 40, u128::from(id % 40));
            assert_eq!(store.get(&key).unwrap().reference.dispatch_id, id);
        }
        assert!(store.get(&(99, 99)).is_none());
    }

    #[test]
    fn a_bound_below_a_block_is_exact() {
        let mut store = SettledStore::default();
        for id in 0..3u64 {
            store.push((id, 0), payment(id), 0, 2);
        }
        assert_eq!(ids(&store), vec![1, 2]);
        assert!(store.get(&(0, 0)).is_none());
    }

    #[test]
    fn the_sweeper_drops_whole_blocks_past_their_windows_and_their_refunds() {
        let mut store = SettledStore::default();
        for id in 0..40u64 {
            store.push((id, 0), payment(id), id as i64, 1_000); // blocks of 62
        }
        store.set_refunds(3, vec![((9, 9), 50)]);
        store.sweep(1_000);
        assert_eq!(store.len(), 40, "the open block stays");
        for id in 40..200u64 {
            store.push((id, 0), payment(id), id as i64, 1_000);
        }
        store.sweep(100);
        // The first block (0..62) ended by 61: gone, with payment 3's refunds.
        assert!(store.get(&(3, 0)).is_none());
        assert!(store.refunds(3).is_empty());
        assert_eq!(ids(&store).first(), Some(&62));
        assert!(store.get(&(150, 0)).is_some());
    }

    #[test]
    fn a_clone_shares_what_is_sealed_and_is_not_changed_by_later_pushes() {
        let mut store = SettledStore::default();
        for id in 0..100u64 {
            store.push((id, 0), payment(id), 0, 1_000);
        }
        let copy = store.clone();
        for id in 100..200u64 {
            store.push((id, 0), payment(id), 0, 1_000);
        }
        assert_eq!(ids(&copy), (0..100).collect::<Vec<_>>());
        assert_eq!(ids(&store), (0..200).collect::<Vec<_>>());
    }
}
