//! Idempotency records: a retry with the same client request ID gets the first outcome.
//!
//! Bounded by a retention time and a record count per shard: a record answers retries while
//! it is younger than the retention time and among the newest `records_max` of its shard.
//! Authorizations stay safe past that too: the replay window and the timestamp window refuse
//! an old inherent ID presented again.
//!
//! A record past retention is not removed when it dies (that removal would be one more cache
//! miss in a table of a million records on every request); lookups ignore it, and a sweep
//! visits one chunk of the table every few inserts and drops what has died there. A chunk's
//! records lie together in memory, so the sweep reads them in order. One full pass takes
//! about a quarter of `records_max` inserts, so the table holds at most `records_max` live
//! records plus that quarter. (A pass every eighth cost twice the memory traffic: the sweep
//! streams the whole table once per pass.)

use std::borrow::Cow;
use std::sync::Arc;

use super::state::Reply;
use crate::cow::{CowMap, Frozen, CHUNK_BITS_LARGE};
use crate::keys::{open_device_key, DeviceKey};
use crate::types::{AuthOutcome, ClientRequestId, ReasonCode, UserKey};
use crate::vault::{SealedNumber, Vault};

/// A record's key: the owner's routing hash and the client's request ID.
pub(crate) type IdemKey = (u64, ClientRequestId);

/// A key as the table holds it: the same, packed in 24 bytes with 8-byte alignment, where the
/// tuple's `u128` aligns it to 16 and pads it to 32. A slot of the table is then 96 bytes, not
/// 112: the table is the shard's largest (a million records), read at random, one slot per
/// request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct PackedKey([u64; 3]);

impl PackedKey {
    fn pack((owner_hash, client_request_id): IdemKey) -> PackedKey {
        PackedKey([owner_hash, (client_request_id >> 64) as u64, client_request_id as u64])
    }

    fn unpack(self) -> IdemKey {
        let [owner_hash, high, low] = self.0;
        (owner_hash, (u128::from(high) << 64) | u128::from(low))
    }
}

#[derive(Debug, Clone)]
pub(crate) enum IdemState {
    /// The request is with its provider.
    Pending {
        /// Who pays (to record the outcome if recovery must resolve it).
        user: UserKey,
        /// With which means.
        means_id: u32,
    },
    /// The request finished with this reply.
    Done(Reply),
    /// A key issue's reply as a snapshot holds it: the key stays sealed (to the record's key)
    /// until a retry asks for it, so recovery does not decrypt every enrollment's key.
    SealedKey {
        /// The issued key's version.
        key_version: u16,
        /// The key, sealed.
        sealed: SealedNumber,
    },
}

impl IdemState {
    /// How a finished request's `reply` is kept: an issued device key sealed to the record's
    /// key (a retry opens it; a snapshot copies the sealed bytes), any other reply as it is.
    pub(crate) fn done(vault: &Vault, key: IdemKey, reply: &Reply) -> IdemState {
        match reply {
            Reply::KeyIssued { key_version, key: device_key } => IdemState::SealedKey {
                key_version: *key_version,
                sealed: seal_issued_key(vault, key, device_key),
            },
            done => IdemState::Done(done.clone()),
        }
    }

    /// The answer to a retry of the request this record is for.
    pub(crate) fn reply(&self, vault: &Vault, key: IdemKey) -> Reply {
        match self {
            IdemState::Pending { .. } => Reply::InFlight,
            IdemState::Done(reply) => reply.clone(),
            IdemState::SealedKey { key_version, sealed } => {
                match open_device_key(vault, sealed, &idem_aad(key)) {
                    Some(key) => Reply::KeyIssued { key_version: *key_version, key },
                    None => {
                        tracing::error!("the sealed key of an enrollment record does not open");
                        Reply::Refused(ReasonCode::IdempotencyConflict)
                    }
                }
            }
        }
    }
}

/// Seals an issued device key for the idempotency record `key` (bound to it).
pub(crate) fn seal_issued_key(vault: &Vault, key: IdemKey, device_key: &DeviceKey) -> SealedNumber {
    vault.seal(device_key.expose(), &idem_aad(key))
}

/// Associated data sealing a key kept in an idempotency record (no IDm at hand there).
fn idem_aad((owner_hash, client_request_id): IdemKey) -> Vec<u8> {
    let mut aad = b"idem".to_vec();
    aad.extend_from_slice(&owner_hash.to_be_bytes());
    aad.extend_from_slice(&client_request_id.to_be_bytes());
    aad
}

/// How a record holds its state. A payment's record (by far the most, one per authorization)
/// holds it inline: nothing is allocated for it, and nothing is followed when it dies, where a
/// pointer to a state of its own cost the sweep one cache miss per record in a table of a
/// million. Any other state is behind an `Arc`, so a snapshot's copy of a chunk shares it.
#[derive(Debug, Clone)]
enum Stored {
    /// The payment is with its provider.
    Pending { user: UserKey, means_id: u32 },
    /// A payment (without a basket) finished with this outcome.
    Auth(AuthOutcome),
    /// Anything else.
    Shared(Arc<IdemState>),
}

impl Stored {
    fn new(state: IdemState) -> Stored {
        match state {
            IdemState::Pending { user, means_id } => Stored::Pending { user, means_id },
            IdemState::Done(Reply::Auth(outcome)) => Stored::Auth(outcome),
            state => Stored::Shared(Arc::new(state)),
        }
    }

    /// The state, as the snapshot and recovery see it.
    fn state(&self) -> Cow<'_, IdemState> {
        match self {
            Stored::Pending { user, means_id } => {
                Cow::Owned(IdemState::Pending { user: user.clone(), means_id: *means_id })
            }
            Stored::Auth(outcome) => Cow::Owned(IdemState::Done(Reply::Auth(*outcome))),
            Stored::Shared(state) => Cow::Borrowed(state),
        }
    }

    /// The answer to a retry.
    fn reply(&self, vault: &Vault, key: IdemKey) -> Reply {
        match self {
            Stored::Pending { .. } => Reply::InFlight,
            Stored::Auth(outcome) => Reply::Auth(*outcome),
            Stored::Shared(state) => state.reply(vault, key),
        }
    }
}

/// One record. Cheap to clone (a snapshot's frozen copy of its chunk clones it): its state is
/// small or shared.
#[derive(Debug, Clone)]
pub(crate) struct Entry {
    /// Until when the record is kept.
    pub(crate) expires_ms: i64,
    /// Its place in the shard's sequence of records (for the count limit).
    seq: u64,
    /// The request's digest: the same ID with another digest is a conflict.
    pub(crate) digest: u64,
    /// Replaced whole when the request finishes.
    state: Stored,
}

impl Entry {
    /// The record's state.
    pub(crate) fn state(&self) -> Cow<'_, IdemState> {
        self.state.state()
    }

    /// Whether the record is within the count limit (`live_from_seq`, see
    /// `Idempotency::live_from_seq`) and its retention time at `now_ms`.
    fn live(&self, now_ms: i64, live_from_seq: u64) -> bool {
        self.expires_ms > now_ms && self.seq >= live_from_seq
    }
}

/// What a lookup found.
pub(crate) enum Seen {
    /// No record: process the request.
    New,
    /// Same request seen before: the answer its retry gets.
    Same(Reply),
    /// The ID was used with a different request.
    Conflict,
}

pub(crate) struct Idempotency {
    entries: CowMap<PackedKey, Entry>,
    /// The sequence number the next record gets.
    next_seq: u64,
    ttl_ms: i64,
    records_max: usize,
    /// Inserts between two sweep steps, and how many are left before the next.
    sweep_every: usize,
    sweep_countdown: usize,
    /// The chunk the next sweep step visits.
    sweep_chunk: usize,
}

/// The records of a snapshot: a frozen copy of the table and which of its records are live.
pub(crate) struct FrozenRecords {
    entries: Frozen<PackedKey, Entry>,
    live_from_seq: u64,
}

impl FrozenRecords {
    /// The records within the count limit when frozen, in no order (the writer sorts them by
    /// expiry). Those past their retention time are kept: a lookup after restore ignores them
    /// for the same reason a lookup before did.
    pub(crate) fn iter(&self) -> impl Iterator<Item = (IdemKey, &Entry)> {
        self.entries
            .iter()
            .filter(|(_, entry)| entry.seq >= self.live_from_seq)
            .map(|(key, entry)| (key.unpack(), entry))
    }
}

impl Idempotency {
    pub(crate) fn new(ttl_ms: i64, records_max: usize) -> Idempotency {
        assert!(records_max > 0);
        // The table grows a chunk at a time (a thousand records moved, not a million), so it
        // starts empty.
        let entries = CowMap::new(CHUNK_BITS_LARGE);
        let sweep_every = (records_max / 4 / entries.chunk_count()).max(1);
        Idempotency {
            entries,
            next_seq: 0,
            ttl_ms,
            records_max,
            sweep_every,
            sweep_countdown: sweep_every,
            sweep_chunk: 0,
        }
    }

    /// Sequence numbers from this one on are within the count limit.
    fn live_from_seq(&self) -> u64 {
        self.next_seq.saturating_sub(self.records_max as u64)
    }

    pub(crate) fn lookup(&self, vault: &Vault, key: &IdemKey, digest: u64, now_ms: i64) -> Seen {
        let live_from_seq = self.live_from_seq();
        match self.entries.get(&PackedKey::pack(*key)).filter(|e| e.live(now_ms, live_from_seq)) {
            None => Seen::New,
            Some(entry) if entry.digest == digest => Seen::Same(entry.state.reply(vault, *key)),
            Some(_) => Seen::Conflict,
        }
    }

    /// Records a new request's state (the lookup found no live record for `key`).
    pub(crate) fn insert(&mut self, key: IdemKey, digest: u64, state: IdemState, now_ms: i64) {
        self.sweep_step(now_ms);
        let expires_ms = now_ms.saturating_add(self.ttl_ms);
        let seq = self.next_seq;
        let entry = Entry { expires_ms, seq, digest, state: Stored::new(state) };
        if let Some(previous) = self.entries.insert(PackedKey::pack(key), entry) {
            // Only a dead record may be replaced (its key used again after retention).
            let live = previous.live(now_ms, self.live_from_seq());
            assert!(!live, "idempotency key inserted twice");
        }
        self.next_seq += 1;
    }

    /// Finishes a pending record. A record swept meanwhile is not recreated.
    pub(crate) fn complete(&mut self, key: &IdemKey, reply: Reply) {
        if let Some(entry) = self.entries.get_mut(&PackedKey::pack(*key)) {
            entry.state = Stored::new(IdemState::Done(reply));
        }
    }

    /// Every `sweep_every` inserts, drops the dead records of the next chunk.
    fn sweep_step(&mut self, now_ms: i64) {
        self.sweep_countdown -= 1;
        if self.sweep_countdown > 0 {
            return;
        }
        self.sweep_countdown = self.sweep_every;
        let live_from_seq = self.live_from_seq();
        let chunk = self.sweep_chunk;
        self.sweep_chunk = (chunk + 1) % self.entries.chunk_count();
        self.entries.retain_chunk(chunk, |_, entry| entry.live(now_ms, live_from_seq));
    }

    /// The live records (by the count limit), frozen for a snapshot.
    pub(crate) fn freeze(&mut self) -> FrozenRecords {
        FrozenRecords { entries: self.entries.freeze(), live_from_seq: self.live_from_seq() }
    }

    /// Restores a snapshot's records (expires at, key, digest, state) into an empty table, in
    /// expiry order: that order stands for the order they were recorded in (the count limit
    /// drops the first of them first).
    pub(crate) fn restore(&mut self, records: Vec<(i64, IdemKey, u64, IdemState)>) {
        let first_seq = self.next_seq;
        self.next_seq += records.len() as u64;
        self.entries.insert_in_bulk(
            records
                .into_iter()
                .zip(first_seq..)
                .map(|((expires_ms, key, digest, state), seq)| {
                    let entry = Entry { expires_ms, seq, digest, state: Stored::new(state) };
                    (PackedKey::pack(key), entry)
                })
                .collect(),
        );
    }

    /// Records still waiting for their provider's outcome (within the count limit).
    pub(crate) fn pending(&self) -> Vec<(IdemKey, UserKey, u32)> {
        let live_from_seq = self.live_from_seq();
        let mut pending: Vec<_> = self
            .entries
            .iter()
            .filter(|(_, entry)| entry.seq >= live_from_seq)
            .filter_map(|(key, entry)| match &entry.state {
                Stored::Pending { user, means_id } => Some((key.unpack(), user.clone(), *means_id)),
                Stored::Auth(_) | Stored::Shared(_) => None,
            })
            .collect();
        pending.sort_by_key(|(key, _, _)| *key);
        pending
    }

    /// Records held, counting dead ones not yet swept.
    pub(crate) fn len(&self) -> usize {
        self.entries.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::AuthOutcome;

    fn done(n: u64) -> IdemState {
        IdemState::Done(Reply::Swept(n as u32))
    }

    fn vault() -> Vault {
        Vault::new(&[7; 32])
    }

    fn key(n: u64) -> IdemKey {
        (n.wrapping_mul(0x9e37_79b9_7f4a_7c15), n.into())
    }

    fn found(table: &Idempotency, n: u64, now_ms: i64) -> bool {
        matches!(table.lookup(&vault(), &key(n), n, now_ms), Seen::Same(_))
    }

    /// The count limit: exactly the newest `records_max` records answer, whatever has been
    /// swept; the table never holds more than the limit plus one sweep pass.
    #[test]
    fn the_newest_records_max_answer_and_the_table_stays_bounded() {
        let records_max = 20_000;
        let mut table = Idempotency::new(i64::MAX / 2, records_max);
        let bound = records_max + records_max / 4 + table.entries.chunk_count();
        for n in 0..100_000u64 {
            assert!(matches!(table.lookup(&vault(), &key(n), n, 0), Seen::New));
            table.insert(key(n), n, done(n), 0);
            assert!(table.len() <= bound, "{} records held after {n}", table.len());
            if n % 997 == 0 {
                let oldest_live = (n + 1).saturating_sub(records_max as u64);
                assert!(found(&table, oldest_live, 0), "{oldest_live} is among the newest");
                if oldest_live > 0 {
                    assert!(!found(&table, oldest_live - 1, 0), "{} is past the limit", n);
                }
            }
        }
    }

    /// The retention time: a record answers until it expires, then not, swept or not; its ID
    /// may then be used again.
    #[test]
    fn a_record_answers_until_it_expires_and_its_id_can_then_be_reused() {
        let mut table = Idempotency::new(1_000, 100);
        table.insert(key(1), 1, done(1), 0);
        assert!(found(&table, 1, 999));
        assert!(matches!(table.lookup(&vault(), &key(1), 2, 999), Seen::Conflict));
        assert!(!found(&table, 1, 1_000));
        assert!(matches!(table.lookup(&vault(), &key(1), 2, 1_000), Seen::New));
        table.insert(key(1), 2, done(2), 1_000);
        assert!(matches!(table.lookup(&vault(), &key(1), 2, 1_500), Seen::Same(_)));
        // Expired records go when the sweep passes, with no later insert touching them.
        for n in 10..10 + 2 * table.entries.chunk_count() as u64 {
            table.insert(key(n), n, done(n), 5_000);
        }
        assert!(table.len() <= 100 + table.entries.chunk_count());
        assert!(table.entries.iter().all(|(_, entry)| entry.expires_ms > 5_000));
    }

    /// A snapshot holds only records within the count limit, and a restored table answers as
    /// the original did.
    #[test]
    fn frozen_records_are_the_live_ones_and_restore_answers_the_same() {
        let mut table = Idempotency::new(1_000_000, 500);
        for n in 0..2_000u64 {
            table.insert(key(n), n, done(n), n as i64);
        }
        let frozen = table.freeze();
        let mut records: Vec<_> = frozen
            .iter()
            .map(|(k, e)| (e.expires_ms, k, e.digest, e.state().into_owned()))
            .collect();
        assert_eq!(records.len(), 500);
        records.sort_by_key(|(expires, k, _, _)| (*expires, *k));
        let mut restored = Idempotency::new(1_000_000, 500);
        restored.restore(records);
        for n in 0..2_000u64 {
            assert_eq!(found(&restored, n, 3_000), found(&table, n, 3_000), "record {n}");
        }
        // The next insert pushes the oldest restored record out, as it would have the original's.
        table.insert(key(5_000), 5_000, done(0), 3_000);
        restored.insert(key(5_000), 5_000, done(0), 3_000);
        assert!(!found(&table, 1_500, 3_000) && !found(&restored, 1_500, 3_000));
        assert!(found(&restored, 1_501, 3_000));
        let pending = IdemState::Pending {
            user: crate::types::UserKey::new(crate::types::UserIdType::Mail, "a@b.c").unwrap(),
            means_id: 1,
        };
        restored.insert(key(6_000), 6_000, pending, 3_000);
        assert_eq!(restored.pending().len(), 1);
        restored
            .complete(&key(6_000), Reply::Auth(AuthOutcome::Declined(ReasonCode::ProviderTimeout)));
        assert!(restored.pending().is_empty());
    }

    /// A packed key unpacks to the key it was packed from, and a table slot is the 96 bytes the
    /// packing is for.
    #[test]
    fn a_packed_key_unpacks_to_itself_and_a_slot_is_96_bytes() {
        for key in [(0, 0), (u64::MAX, u128::MAX), (7, 1u128 << 64), (1, (1u128 << 64) - 1), key(9)]
        {
            assert_eq!(PackedKey::pack(key).unpack(), key);
        }
        #[cfg(target_pointer_width = "64")]
        assert_eq!(std::mem::size_of::<(PackedKey, Entry)>(), 96);
    }

    /// A payment's record, kept inline, goes from pending to its outcome, answers a retry with
    /// it, and goes through a snapshot as any other record does.
    #[test]
    fn a_payment_record_answers_in_flight_then_its_outcome_and_survives_a_snapshot() {
        let vault = vault();
        let user = crate::types::UserKey::new(crate::types::UserIdType::Mail, "a@b.c").unwrap();
        let outcome = AuthOutcome::Declined(ReasonCode::ProviderDoNotHonor);
        let mut table = Idempotency::new(1_000_000, 100);
        table.insert(key(1), 11, IdemState::Pending { user, means_id: 3 }, 0);
        assert!(matches!(table.lookup(&vault, &key(1), 11, 1), Seen::Same(Reply::InFlight)));
        assert_eq!(table.pending().len(), 1);
        table.complete(&key(1), Reply::Auth(outcome));
        assert!(table.pending().is_empty());
        let answer = |table: &Idempotency| match table.lookup(&vault, &key(1), 11, 2) {
            Seen::Same(Reply::Auth(answered)) => Some(answered),
            _ => None,
        };
        assert_eq!(answer(&table), Some(outcome));
        assert!(matches!(table.lookup(&vault, &key(1), 12, 2), Seen::Conflict));
        let frozen = table.freeze();
        let records: Vec<_> = frozen
            .iter()
            .map(|(k, e)| (e.expires_ms, k, e.digest, e.state().into_owned()))
            .collect();
        assert!(matches!(&records[0].3, IdemState::Done(Reply::Auth(kept)) if *kept == outcome));
        let mut restored = Idempotency::new(1_000_000, 100);
        restored.restore(records);
        assert_eq!(answer(&restored), Some(outcome));
    }
}
