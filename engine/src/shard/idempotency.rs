//! Idempotency records: a retry with the same client request ID gets the first outcome.
//!
//! Bounded by a retention time and a record count per shard: a record answers retries while
//! it is younger than the retention time and among the newest `records_max` of its shard.
//! Authorizations stay safe past that too: the replay window and the timestamp window refuse
//! an old inherent ID presented again.
//!
//! A record past retention is not removed when it dies (that removal would be one more cache
//! miss among a million records on every request): lookups ignore it, and it stays in the ring
//! (see [`Idempotency`]) until the count limit reaches it. So a shard holds exactly its newest
//! `records_max` records, and nothing sweeps.

use std::borrow::Cow;
use std::collections::HashMap;
use std::hash::BuildHasher;
use std::sync::Arc;

use super::archive::{OutcomeLeaf, UserKeyVia, Via};
use super::state::{
    AccountsReply, AddedMeans, Balance, CodeRequest, CodesReply, Delivery, IssuedCode,
    IssuedCoupon, IssuedKey, MoneyReply, Payment, Redemption, RefundedCode, Reply, SettlementReply,
    VoidedCode, WalletReply,
};
use crate::age::AgeVerdict;
use crate::cow::CowCell;
use crate::keys::{open_device_key, NewDeviceKey};
use crate::types::{AuthOutcome, ClientRequestId, Idm, ReasonCode, UserKey};
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

#[derive(Debug, Clone, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub(crate) enum IdemState {
    /// The request is with its provider.
    Pending {
        /// Who pays (to record the outcome if recovery must resolve it).
        #[rkyv(with = UserKeyVia)]
        user: UserKey,
        /// With which means.
        means_id: u32,
    },
    /// The request finished with this reply.
    Done(KeptReply),
    /// A key issue's reply: the key stays sealed until a retry asks for it, so neither the
    /// request nor recovery seals or opens it again. Sealed to the device's IDm, as the
    /// command's log record and the device hold it (the same bytes); records written by builds
    /// before log format 9 sealed it to the record's key instead (`idem_aad`), and both open.
    SealedKey {
        /// The issued key's version.
        key_version: u16,
        /// The key, sealed.
        sealed: SealedNumber,
    },
}

impl IdemState {
    /// How a finished request's `reply` is kept: an issued device key as sealed (a retry opens
    /// it; a snapshot copies the sealed bytes), any other reply as its [`KeptReply`]; none for a
    /// reply no record keeps.
    pub(crate) fn done(reply: &Reply) -> Option<IdemState> {
        match reply {
            Reply::Accounts(AccountsReply::KeyIssued(issued)) => Some(IdemState::SealedKey {
                key_version: issued.key_version,
                sealed: SealedNumber::clone(&issued.key.sealed),
            }),
            done => KeptReply::of(done).map(IdemState::Done),
        }
    }

    /// The answer to a retry of the request this record is for; `idm`: the device whose key
    /// the request issues, if it issues one.
    pub(crate) fn reply(&self, vault: &Vault, key: IdemKey, idm: Option<Idm>) -> Retry {
        match self {
            IdemState::Pending { .. } => Retry::InFlight,
            IdemState::Done(kept) => Retry::Kept(kept.clone()),
            IdemState::SealedKey { key_version, sealed } => {
                let opened = idm
                    .and_then(|idm| open_device_key(vault, sealed, &idm))
                    .or_else(|| open_device_key(vault, sealed, &idem_aad(key)));
                match opened {
                    Some(plain) => Retry::Key(IssuedKey {
                        key_version: *key_version,
                        key: NewDeviceKey { sealed: Arc::new(sealed.clone()), plain: Some(plain) },
                    }),
                    None => {
                        tracing::error!("the sealed key of an enrollment record does not open");
                        Retry::Refused(ReasonCode::IdempotencyConflict)
                    }
                }
            }
        }
    }
}

/// The answer a retry gets from its request's record, before it is typed as its flow's reply.
#[derive(Debug)]
pub(crate) enum Retry {
    /// The request is still with its provider.
    InFlight,
    /// An issued device key, opened.
    Key(IssuedKey),
    /// The record does not answer after all.
    Refused(ReasonCode),
    /// The request's reply, as its record keeps it.
    Kept(KeptReply),
}

impl Retry {
    /// The reply of the retried request's flow; `code_request` says whether the request is a
    /// payment-code request (whose decline is kept as a payment's is).
    pub(crate) fn into_reply(self, code_request: bool) -> Reply {
        match self {
            Retry::InFlight => Reply::InFlight,
            Retry::Key(issued) => issued.into(),
            Retry::Refused(reason) => Reply::Refused(reason),
            Retry::Kept(kept) => kept.into_reply(code_request),
        }
    }
}

/// The replies a finished request's record keeps, flow-neutral, as a snapshot archives them:
/// every reply [`IdemState::Done`] may hold, and no other. A reply of a kind no record keeps
/// (an issued key is kept sealed, as [`IdemState::SealedKey`]; a dispatch, a query's
/// answer...) has no kept form: a new kind of answer must be added here before its records can
/// be kept. Archived as it is: the variants, their order and their fields are part of the
/// snapshot format.
#[derive(Debug, Clone, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub(crate) enum KeptReply {
    Ok,
    Refused(#[rkyv(with = Via<u16>)] ReasonCode),
    MeansAdded {
        means_id: u32,
        last4: Option<[u8; 4]>,
    },
    Auth(#[rkyv(with = Via<OutcomeLeaf>)] AuthOutcome),
    BasketAuth(#[rkyv(with = Via<OutcomeLeaf>)] AuthOutcome, AgeVerdict),
    CodeIssued(IssuedCode),
    Redeemed(Redemption),
    CouponIssued(IssuedCoupon),
    Balance(Balance),
    Delivered(u32),
    /// A code voided: the amount released.
    Voided(u64),
    /// A refund: its amount, the refunds' total, the capture.
    Refunded(u64, u64, u64),
}

impl KeptReply {
    /// The kept form of `reply`; none for a reply no record keeps.
    fn of(reply: &Reply) -> Option<KeptReply> {
        use CodesReply as Codes;
        use SettlementReply as Settlement;
        Some(match reply {
            Reply::Done => KeptReply::Ok,
            Reply::Refused(reason) => KeptReply::Refused(*reason),
            Reply::Accounts(AccountsReply::MeansAdded(AddedMeans { means_id, last4 })) => {
                KeptReply::MeansAdded { means_id: *means_id, last4: *last4 }
            }
            Reply::Settlement(Settlement::Payment(Payment::Auth(outcome))) => {
                KeptReply::Auth(*outcome)
            }
            Reply::Settlement(Settlement::Payment(Payment::BasketAuth(outcome, verdict))) => {
                KeptReply::BasketAuth(*outcome, (**verdict).clone())
            }
            // A code request's decline is kept as a payment's is (retries tell them apart by
            // their command).
            Reply::Codes(Codes::Request(CodeRequest::Declined(reason))) => {
                KeptReply::Auth(AuthOutcome::Declined(*reason))
            }
            Reply::Codes(Codes::Request(CodeRequest::Issued(code))) => {
                KeptReply::CodeIssued((**code).clone())
            }
            Reply::Codes(Codes::Redeemed(redemption)) => {
                KeptReply::Redeemed((**redemption).clone())
            }
            Reply::Codes(Codes::CouponIssued(coupon)) => {
                KeptReply::CouponIssued((**coupon).clone())
            }
            // Kept as delivered, so that a retry does not publish the notice again.
            Reply::Codes(Codes::Delivery(
                Delivery::Accepted(devices) | Delivery::Delivered(devices),
            )) => KeptReply::Delivered(*devices),
            Reply::Wallet(WalletReply::Balance(balance)) => KeptReply::Balance(*balance),
            Reply::Money(MoneyReply::Voided(voided)) => KeptReply::Voided(voided.released_minor),
            Reply::Money(MoneyReply::Refunded(r)) => {
                KeptReply::Refunded(r.amount_minor, r.refunded_minor, r.captured_minor)
            }
            Reply::InFlight
            | Reply::Money(MoneyReply::Owed(_))
            | Reply::Accounts(
                AccountsReply::KeyIssued(_)
                | AccountsReply::Means(_)
                | AccountsReply::Credentials(_)
                | AccountsReply::Devices(_),
            )
            | Reply::Settlement(
                Settlement::Payment(Payment::Dispatch(_) | Payment::Decided(..))
                | Settlement::Completion(_),
            )
            | Reply::Codes(
                Codes::Request(CodeRequest::Dispatch(_) | CodeRequest::Decided(_))
                | Codes::Completed(_)
                | Codes::State(_)
                | Codes::Swept(_),
            )
            | Reply::Stores(_) => return None,
        })
    }

    /// The reply of the flow that kept this; `code_request` as in [`Retry::into_reply`].
    fn into_reply(self, code_request: bool) -> Reply {
        match self {
            KeptReply::Ok => Reply::Done,
            KeptReply::Refused(reason) => Reply::Refused(reason),
            KeptReply::MeansAdded { means_id, last4 } => AddedMeans { means_id, last4 }.into(),
            KeptReply::Auth(AuthOutcome::Declined(reason)) if code_request => {
                CodeRequest::Declined(reason).into()
            }
            KeptReply::Auth(outcome) => Payment::Auth(outcome).into(),
            KeptReply::BasketAuth(outcome, verdict) => {
                Payment::BasketAuth(outcome, Box::new(verdict)).into()
            }
            KeptReply::CodeIssued(code) => CodeRequest::Issued(Box::new(code)).into(),
            KeptReply::Redeemed(redemption) => Box::new(redemption).into(),
            KeptReply::CouponIssued(coupon) => Box::new(coupon).into(),
            KeptReply::Balance(balance) => WalletReply::Balance(balance).into(),
            KeptReply::Delivered(devices) => Delivery::Delivered(devices).into(),
            KeptReply::Voided(released_minor) => VoidedCode { released_minor }.into(),
            KeptReply::Refunded(amount_minor, refunded_minor, captured_minor) => {
                RefundedCode { amount_minor, refunded_minor, captured_minor }.into()
            }
        }
    }
}

/// Associated data a key kept in an idempotency record was sealed to by builds before log
/// format 9 (they sealed it again for the record; it is now the device's own sealed key).
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
            IdemState::Done(KeptReply::Auth(outcome)) => Stored::Auth(outcome),
            state => Stored::Shared(Arc::new(state)),
        }
    }

    /// The state, as the snapshot and recovery see it.
    fn state(&self) -> Cow<'_, IdemState> {
        match self {
            Stored::Pending { user, means_id } => {
                Cow::Owned(IdemState::Pending { user: user.clone(), means_id: *means_id })
            }
            Stored::Auth(outcome) => Cow::Owned(IdemState::Done(KeptReply::Auth(*outcome))),
            Stored::Shared(state) => Cow::Borrowed(state),
        }
    }

    /// The answer to a retry.
    fn reply(&self, vault: &Vault, key: IdemKey, idm: Option<Idm>) -> Retry {
        match self {
            Stored::Pending { .. } => Retry::InFlight,
            Stored::Auth(outcome) => Retry::Kept(KeptReply::Auth(*outcome)),
            Stored::Shared(state) => state.reply(vault, key, idm),
        }
    }
}

/// One record. Cheap to clone (a snapshot's frozen copy of its ring chunk clones it): its state
/// is small or shared.
#[derive(Debug, Clone)]
pub(crate) struct Entry {
    /// The record's key (the index holds only a fingerprint of it).
    key: PackedKey,
    /// Until when the record answers; [`REPLACED`] once a later record took its key.
    pub(crate) expires_ms: i64,
    /// Its place in the shard's sequence of records: it sits at `seq % records_max` in the
    /// ring.
    seq: u64,
    /// The request's digest: the same ID with another digest is a conflict.
    pub(crate) digest: u64,
    /// Replaced whole when the request finishes.
    state: Stored,
}

/// The expiry of a record whose key a later record took (its ID used again after retention):
/// no lookup reaches it, and a snapshot leaves it out.
const REPLACED: i64 = i64::MIN;

impl Entry {
    /// The record's key.
    pub(crate) fn key(&self) -> IdemKey {
        self.key.unpack()
    }

    /// The record's state.
    pub(crate) fn state(&self) -> Cow<'_, IdemState> {
        self.state.state()
    }
}

/// Which record a provider's completion is for.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Completes<'a> {
    /// The record of the completion's key made for the request with this digest (every
    /// completion since log format version 6).
    Record {
        /// The request's digest, as its record holds it.
        digest: u64,
    },
    /// A completion read from an older log, which names the key alone: it completes the
    /// pending record of its key only if that record is for the same payer and means (the only
    /// record it could have been for).
    Legacy {
        /// Who paid.
        user: &'a UserKey,
        /// With which means.
        means_id: u32,
    },
}

/// What a lookup found.
pub(crate) enum Seen {
    /// No record: process the request.
    New,
    /// Same request seen before: the answer its retry gets.
    Same(Retry),
    /// The ID was used with a different request.
    Conflict,
}

/// Records per chunk of the ring: a write after a snapshot copies one chunk (about 100 KB).
const RING_CHUNK_BITS: u32 = 10;
const RING_CHUNK_MASK: usize = (1 << RING_CHUNK_BITS) - 1;

/// Slots per index bucket; the eighth word of the bucket counts its records in the overflow
/// map.
const SLOTS: usize = 7;
/// Records per bucket the index is sized for, at most: with seven slots, a bucket overflows
/// about once in a thousand (Poisson with mean 2, more than 7).
const RECORDS_PER_BUCKET: usize = 2;
/// A slot is `fingerprint << SEQ_BITS | seq mod 2^SEQ_BITS`; 0 is an empty slot.
const SEQ_BITS: u32 = 40;
const SEQ_MASK: u64 = (1 << SEQ_BITS) - 1;
/// The fingerprint: 24 bits of the key's hash, never 0.
const FINGERPRINT_MASK: u64 = (1 << (64 - SEQ_BITS)) - 1;
/// The overflow map is swept of dead records when it reaches this many, or twice what the last
/// sweep left.
const OVERFLOW_SWEEP_MIN: usize = 256;

/// The largest `records_max` the index's slots can tell apart (their sequence numbers are
/// kept modulo 2^40).
pub(crate) const RECORDS_MAX_LIMIT: u64 = 1 << 32;

/// An index bucket: one cache line.
#[derive(Debug, Clone, Copy, bytemuck::Zeroable)]
#[repr(C, align(64))]
struct Bucket {
    slots: [u64; SLOTS],
    /// How many records of this bucket the overflow map holds (live or not yet swept).
    overflowed: u64,
}

/// Where a record's index entry is.
#[derive(Clone, Copy)]
enum Place {
    /// In slot `.1` of bucket `.0`.
    Slot(usize, usize),
    /// In the overflow map.
    Overflow,
}

/// The idempotency records of a shard.
///
/// The records themselves are in a ring in the order they were made: record `seq` sits at
/// `seq % records_max`, so the newest `records_max` are exactly the ring's content, and each
/// new record takes the place of the one the count limit drops. Writing them is sequential;
/// nothing sweeps them.
///
/// An index finds a record by key: a table of buckets, one cache line each, of seven slots
/// holding a 24-bit fingerprint of the key's hash and the record's sequence number. A lookup
/// reads one bucket (the one cache miss a request pays here) and follows a live slot to the
/// ring only when its fingerprint matches: for a retry, or once in about eight million lookups
/// otherwise. The insert that follows writes the same bucket, still in cache. A slot
/// whose record the count limit dropped is free, known from its sequence number alone, so the
/// index too needs no sweep. A bucket with all seven slots taken by live records (about one
/// in a thousand) puts the next in a small overflow map, which a lookup reads only for such a
/// bucket.
///
/// The index holds `records_max / 2` buckets (32 bytes a record), allocated zeroed at start:
/// the system maps its pages as they are first written, and it never grows, so serving never
/// pauses to rebuild it.
pub(crate) struct Idempotency {
    /// Chunks of `2^RING_CHUNK_BITS` records; the last one fills up as the ring grows to
    /// `records_max`.
    ring: Vec<CowCell<Vec<Entry>>>,
    index: Box<[Bucket]>,
    /// Records of full buckets, by key: their sequence number.
    overflow: HashMap<PackedKey, u64, foldhash::fast::RandomState>,
    overflow_sweep_at: usize,
    /// Seeded at random per process, so that no client can choose request IDs that fall in
    /// one bucket.
    hasher: foldhash::fast::RandomState,
    /// The sequence number the next record gets.
    next_seq: u64,
    /// How many records in the ring a later record of the same key replaced: a snapshot holds
    /// the others ([`FrozenRecords::len`]).
    replaced: usize,
    ttl_ms: i64,
    records_max: usize,
}

/// The records of a snapshot: a frozen copy of the ring.
pub(crate) struct FrozenRecords {
    chunks: Vec<Arc<Vec<Entry>>>,
    /// The ring position of the oldest record.
    start: usize,
    /// How many records [`FrozenRecords::iter`] yields: the table keeps the count, so a
    /// snapshot makes no pass over a million records to learn it.
    len: usize,
}

impl FrozenRecords {
    /// How many records [`FrozenRecords::iter`] yields.
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// The records within the count limit when frozen, oldest first. Those past their
    /// retention time are kept: a lookup after restore ignores them for the same reason a
    /// lookup before did.
    pub(crate) fn iter(&self) -> impl ExactSizeIterator<Item = (IdemKey, &Entry)> + Clone {
        debug_assert_eq!(self.records().count(), self.len, "the table's count of its records");
        let records = self.records().map(|entry| (entry.key.unpack(), entry));
        Counted { records, left: self.len }
    }

    fn records(&self) -> impl Iterator<Item = &Entry> + Clone {
        oldest_first(self.chunks.iter().map(|chunk| &**chunk), self.start)
    }
}

/// An iterator whose length is known: `left` items are still to come.
#[derive(Clone)]
struct Counted<I> {
    records: I,
    left: usize,
}

impl<I: Iterator> Iterator for Counted<I> {
    type Item = I::Item;

    fn next(&mut self) -> Option<I::Item> {
        let next = self.records.next()?;
        self.left -= 1;
        Some(next)
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        (self.left, Some(self.left))
    }
}

impl<I: Iterator> ExactSizeIterator for Counted<I> {}

/// A ring's records (its chunks in order, the oldest at `start`), oldest first, but for those a
/// later record of the same key replaced.
fn oldest_first<'a>(
    chunks: impl Iterator<Item = &'a Vec<Entry>> + Clone,
    start: usize,
) -> impl Iterator<Item = &'a Entry> + Clone {
    let all = chunks.flat_map(|chunk| chunk.iter());
    all.clone().skip(start).chain(all.take(start)).filter(|entry| entry.expires_ms != REPLACED)
}

/// The sequence number of a slot's record if the count limit still keeps it (`next_seq` and
/// `records_max` as in [`Idempotency`]); none for an empty or free slot.
fn slot_seq(slot: u64, next_seq: u64, records_max: usize) -> Option<u64> {
    if slot == 0 {
        return None;
    }
    let age = next_seq.wrapping_sub(slot & SEQ_MASK) & SEQ_MASK;
    if (1..=records_max as u64).contains(&age) {
        next_seq.checked_sub(age)
    } else {
        None
    }
}

impl Idempotency {
    pub(crate) fn new(ttl_ms: i64, records_max: usize) -> Idempotency {
        let buckets = records_max.div_ceil(RECORDS_PER_BUCKET).next_power_of_two();
        Idempotency::with_buckets(ttl_ms, records_max, buckets)
    }

    /// A table whose index has `buckets` buckets (a power of two).
    fn with_buckets(ttl_ms: i64, records_max: usize, buckets: usize) -> Idempotency {
        assert!(records_max > 0 && records_max as u64 <= RECORDS_MAX_LIMIT);
        assert!(buckets.is_power_of_two());
        Idempotency {
            ring: Vec::new(),
            index: bytemuck::allocation::zeroed_slice_box(buckets),
            overflow: HashMap::default(),
            overflow_sweep_at: OVERFLOW_SWEEP_MIN,
            hasher: foldhash::fast::RandomState::default(),
            next_seq: 0,
            replaced: 0,
            ttl_ms,
            records_max,
        }
    }

    /// Writes every page of a fresh table's index once, before a replay that will touch most
    /// of it. The index is allocated zeroed and left untouched until used, and a command's
    /// first touch of a page is a read (the lookup): it maps the shared zero page, and the
    /// insert's write after it faults again, copies, and flushes the TLB of every core running
    /// the process. A table that holds records already is left as it is.
    pub(crate) fn prefault(&mut self) {
        const PAGE: usize = 4096;
        if self.next_seq != 0 {
            return;
        }
        advise_huge_pages(&self.index);
        let step = (PAGE / std::mem::size_of::<Bucket>()).max(1);
        for bucket in self.index.iter_mut().step_by(step) {
            // SAFETY: the pointer comes from an exclusive reference into the index, so it is
            // valid and aligned; the write stores the zero a fresh index holds.
            unsafe { std::ptr::write_volatile(&mut bucket.overflowed, 0) };
        }
    }

    /// The bucket and fingerprint of a key's hash.
    fn locate(&self, hash: u64) -> (usize, u64) {
        let fingerprint = (hash & FINGERPRINT_MASK).max(1);
        let bucket = (hash >> (64 - SEQ_BITS)) as usize & (self.index.len() - 1);
        (bucket, fingerprint)
    }

    fn ring_pos(&self, seq: u64) -> usize {
        (seq % self.records_max as u64) as usize
    }

    fn entry(&self, seq: u64) -> &Entry {
        let pos = self.ring_pos(seq);
        &self.ring[pos >> RING_CHUNK_BITS].get()[pos & RING_CHUNK_MASK]
    }

    fn entry_mut(&mut self, seq: u64) -> &mut Entry {
        let pos = self.ring_pos(seq);
        &mut self.ring[pos >> RING_CHUNK_BITS].get_mut()[pos & RING_CHUNK_MASK]
    }

    /// Where the index holds `key`'s record within the count limit, and its sequence number.
    fn find(&self, key: PackedKey, hash: u64) -> Option<(Place, u64)> {
        let (bucket_index, fingerprint) = self.locate(hash);
        let bucket = &self.index[bucket_index];
        for (slot_index, &slot) in bucket.slots.iter().enumerate() {
            if slot >> SEQ_BITS != fingerprint {
                continue;
            }
            let Some(seq) = slot_seq(slot, self.next_seq, self.records_max) else { continue };
            // A slot left from long ago may name a live sequence number (they wrap at 2^40):
            // the record there must be this key's.
            if self.entry(seq).key == key {
                return Some((Place::Slot(bucket_index, slot_index), seq));
            }
        }
        if bucket.overflowed == 0 {
            return None;
        }
        let &seq = self.overflow.get(&key)?;
        (seq >= self.live_from_seq()).then_some((Place::Overflow, seq))
    }

    /// Sequence numbers from this one on are within the count limit.
    fn live_from_seq(&self) -> u64 {
        self.next_seq.saturating_sub(self.records_max as u64)
    }

    /// Starts loading `key`'s index bucket into the cache, without waiting for it. A shard
    /// calls it for each command of a batch before applying the first, so the batch's cache
    /// misses overlap instead of following one another.
    pub(crate) fn prefetch(&self, key: &IdemKey) {
        let (bucket, _) = self.locate(self.hasher.hash_one(PackedKey::pack(*key)));
        let line: *const Bucket = &self.index[bucket];
        #[cfg(target_arch = "x86_64")]
        // SAFETY: a prefetch is a hint: it reads nothing into the program and cannot fault (and
        // the address is a live bucket's anyway). SSE is part of x86-64.
        unsafe {
            use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
            _mm_prefetch::<_MM_HINT_T0>(line.cast());
        }
        #[cfg(not(target_arch = "x86_64"))]
        let _ = line;
    }

    /// Whether `key` has a live record, and if so, the answer to a retry (`idm`: the device
    /// whose key the request issues, if it issues one).
    pub(crate) fn lookup(
        &self,
        vault: &Vault,
        key: &IdemKey,
        idm: Option<Idm>,
        digest: u64,
        now_ms: i64,
    ) -> Seen {
        let packed = PackedKey::pack(*key);
        let Some((_, seq)) = self.find(packed, self.hasher.hash_one(packed)) else {
            return Seen::New;
        };
        match self.entry(seq) {
            entry if entry.expires_ms <= now_ms => Seen::New,
            entry if entry.digest == digest => Seen::Same(entry.state.reply(vault, *key, idm)),
            _ => Seen::Conflict,
        }
    }

    /// Records a new request's state (the lookup found no live record for `key`).
    pub(crate) fn insert(&mut self, key: IdemKey, digest: u64, state: IdemState, now_ms: i64) {
        let expires_ms = now_ms.saturating_add(self.ttl_ms);
        let replaced = self.record(PackedKey::pack(key), digest, Stored::new(state), expires_ms);
        assert!(replaced.is_none_or(|expired| expired <= now_ms), "idempotency key inserted twice");
    }

    /// Adds a record as the newest; returns the expiry of the record of the same key it
    /// replaces, if the count limit kept one.
    fn record(
        &mut self,
        key: PackedKey,
        digest: u64,
        state: Stored,
        expires_ms: i64,
    ) -> Option<i64> {
        let hash = self.hasher.hash_one(key);
        let found = self.find(key, hash);
        let replaced = found.map(|(_, old)| {
            let entry = self.entry_mut(old);
            let expires_ms = std::mem::replace(&mut entry.expires_ms, REPLACED);
            debug_assert_ne!(expires_ms, REPLACED, "the index names a key's newest record");
            self.replaced += 1;
            expires_ms
        });
        let seq = self.next_seq;
        self.push(Entry { key, expires_ms, seq, digest, state });
        self.next_seq += 1;
        let (bucket_index, fingerprint) = self.locate(hash);
        let slot = fingerprint << SEQ_BITS | (seq & SEQ_MASK);
        match found {
            Some((Place::Slot(bucket, slot_index), _)) => {
                self.index[bucket].slots[slot_index] = slot
            }
            Some((Place::Overflow, _)) => {
                self.overflow.insert(key, seq);
            }
            None => {
                let (next_seq, records_max) = (self.next_seq, self.records_max);
                let bucket = &mut self.index[bucket_index];
                match bucket
                    .slots
                    .iter()
                    .position(|&s| slot_seq(s, next_seq, records_max).is_none())
                {
                    Some(free) => bucket.slots[free] = slot,
                    None => {
                        if self.overflow.insert(key, seq).is_none() {
                            bucket.overflowed += 1;
                        }
                        self.sweep_overflow();
                    }
                }
            }
        }
        replaced
    }

    /// Puts the newest record in the ring, in the place of the one the count limit drops.
    fn push(&mut self, entry: Entry) {
        let pos = self.ring_pos(entry.seq);
        let len = self.len();
        debug_assert!(pos <= len, "the ring fills in order");
        if pos < len {
            // The record the count limit drops: no longer counted if it was replaced.
            let seq = entry.seq;
            if self.entry(seq).expires_ms == REPLACED {
                self.replaced -= 1;
            }
            *self.entry_mut(seq) = entry;
            return;
        }
        if pos & RING_CHUNK_MASK == 0 {
            let room = (self.records_max - pos).min(RING_CHUNK_MASK + 1);
            self.ring.push(CowCell::Owned(Vec::with_capacity(room)));
        }
        self.ring.last_mut().expect("a chunk was pushed").get_mut().push(entry);
    }

    /// Drops the overflow map's records past the count limit, when it has grown enough since
    /// the last sweep for the sweep to be paid for.
    fn sweep_overflow(&mut self) {
        if self.overflow.len() < self.overflow_sweep_at {
            return;
        }
        let live_from_seq = self.live_from_seq();
        let dead: Vec<PackedKey> = self
            .overflow
            .iter()
            .filter(|(_, &seq)| seq < live_from_seq)
            .map(|(&key, _)| key)
            .collect();
        for key in dead {
            self.overflow.remove(&key);
            let (bucket, _) = self.locate(self.hasher.hash_one(key));
            self.index[bucket].overflowed -= 1;
        }
        self.overflow_sweep_at = OVERFLOW_SWEEP_MIN.max(2 * self.overflow.len());
    }

    /// The sequence number of the pending record `of` names under `key`, if the table still
    /// holds it: within the count limit, not replaced by a later record of the same key, still
    /// waiting for its provider, and the one the completion is for. A record past its retention
    /// time but not yet replaced is still its payment's: recovery would resolve it too.
    fn pending_record(&self, key: &IdemKey, of: Completes<'_>) -> Option<u64> {
        let packed = PackedKey::pack(*key);
        let (_, seq) = self.find(packed, self.hasher.hash_one(packed))?;
        let entry = self.entry(seq);
        let Stored::Pending { user, means_id } = &entry.state else { return None };
        let same = match of {
            Completes::Record { digest } => entry.digest == digest,
            Completes::Legacy { user: payer, means_id: means } => {
                user == payer && *means_id == means
            }
        };
        same.then_some(seq)
    }

    /// Whether a completion `of` the record of `key` would land (see [`Idempotency::complete`]).
    pub(crate) fn completes(&self, key: &IdemKey, of: Completes<'_>) -> bool {
        self.pending_record(key, of).is_some()
    }

    /// Finishes the pending record a provider's completion is for, and only that one: a
    /// completion whose record the count limit dropped, or a later record of the same key
    /// replaced, or that is no longer pending, changes nothing (the record is not recreated,
    /// and a newer request of the same ID is not given this one's outcome). Returns whether it
    /// landed.
    pub(crate) fn complete(&mut self, key: &IdemKey, of: Completes<'_>, reply: KeptReply) -> bool {
        let Some(seq) = self.pending_record(key, of) else { return false };
        self.entry_mut(seq).state = Stored::new(IdemState::Done(reply));
        true
    }

    /// The records within the count limit, frozen for a snapshot.
    pub(crate) fn freeze(&mut self) -> FrozenRecords {
        let start = self.ring_pos(self.live_from_seq());
        let len = self.len() - self.replaced;
        let chunks = self.ring.iter_mut().map(CowCell::freeze).collect();
        FrozenRecords { chunks, start, len }
    }

    /// Restores a snapshot's records (expires at, key, digest, state) into an empty table, in
    /// the order they were recorded in (the count limit drops the first of them first).
    pub(crate) fn restore(&mut self, records: Vec<(i64, IdemKey, u64, IdemState)>) {
        for (expires_ms, key, digest, state) in records {
            self.record(PackedKey::pack(key), digest, Stored::new(state), expires_ms);
        }
    }

    /// The records in the ring (within the count limit), oldest first, but for those a later
    /// record of the same key replaced.
    pub(crate) fn records(&self) -> impl Iterator<Item = &Entry> {
        oldest_first(self.ring.iter().map(CowCell::get), self.ring_pos(self.live_from_seq()))
    }

    /// Records still waiting for their provider's outcome (within the count limit): key,
    /// digest, payer and means.
    pub(crate) fn pending(&self) -> Vec<(IdemKey, u64, UserKey, u32)> {
        let mut pending: Vec<_> = self
            .records()
            .filter_map(|entry| match &entry.state {
                Stored::Pending { user, means_id } => {
                    Some((entry.key.unpack(), entry.digest, user.clone(), *means_id))
                }
                Stored::Auth(_) | Stored::Shared(_) => None,
            })
            .collect();
        pending.sort_by_key(|(key, _, _, _)| *key);
        pending
    }

    /// Records held: the newest `records_max`, answering or not (every chunk but the last is
    /// full).
    pub(crate) fn len(&self) -> usize {
        self.ring
            .last()
            .map_or(0, |last| ((self.ring.len() - 1) << RING_CHUNK_BITS) + last.get().len())
    }
}

/// Asks the kernel to back `index` with huge pages where it can (Linux's transparent huge
/// pages, in `madvise` mode on most systems): a replay touches its buckets at random, and with
/// 4 KiB pages nearly every touch also misses the TLB. A refusal changes nothing but speed.
fn advise_huge_pages(index: &[Bucket]) {
    #[cfg(target_os = "linux")]
    {
        const HUGE: usize = 2 << 20;
        let start = index.as_ptr() as usize;
        let end = start + std::mem::size_of_val(index);
        let (from, to) = (start.next_multiple_of(HUGE), end / HUGE * HUGE);
        if from < to {
            // SAFETY: the range lies inside `index`'s allocation; the advice changes how the
            // kernel backs the pages, never their contents.
            unsafe { libc::madvise(from as *mut libc::c_void, to - from, libc::MADV_HUGEPAGE) };
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = index;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::AuthOutcome;

    /// Each kept reply answers a retry as its flow's reply, which is kept as it was: a record
    /// restored from a snapshot answers as the record that was archived. A code request's
    /// decline, kept as a payment's, answers a code request as a code request's decline.
    #[test]
    fn a_kept_reply_answers_as_its_flow_and_is_kept_again_unchanged() {
        use crate::age::AgeCheck;
        let verdict =
            AgeVerdict { check: AgeCheck::NotHeld, items: vec!["7".into()], amount_minor: 5 };
        let declined = AuthOutcome::Declined(ReasonCode::ProviderTimeout);
        let kept = [
            KeptReply::Ok,
            KeptReply::Refused(ReasonCode::UnknownUser),
            KeptReply::MeansAdded { means_id: 2, last4: Some(*b"1111") },
            KeptReply::Auth(declined),
            KeptReply::BasketAuth(declined, verdict),
            KeptReply::Balance(Balance { balance_minor: 9, available_minor: 8, currency: None }),
            KeptReply::Delivered(3),
        ];
        for code_request in [false, true] {
            for kept in &kept {
                let reply = kept.clone().into_reply(code_request);
                let again = KeptReply::of(&reply).expect("kept");
                assert_eq!(format!("{again:?}"), format!("{kept:?}"));
            }
        }
        let reply = KeptReply::Auth(declined).into_reply(true);
        let code_declined = reply.into_flow::<CodeRequest>().expect("a code request's answer");
        assert!(matches!(code_declined, CodeRequest::Declined(ReasonCode::ProviderTimeout)));
        let reply = KeptReply::Auth(declined).into_reply(false);
        assert!(
            matches!(reply.into_flow::<Payment>(), Ok(Payment::Auth(outcome)) if outcome == declined)
        );
    }

    fn done(n: u64) -> IdemState {
        IdemState::Done(KeptReply::Delivered(n as u32))
    }

    fn vault() -> Vault {
        Vault::new(&[7; 32])
    }

    fn key(n: u64) -> IdemKey {
        (n.wrapping_mul(0x9e37_79b9_7f4a_7c15), n.into())
    }

    fn found(table: &Idempotency, n: u64, now_ms: i64) -> bool {
        matches!(table.lookup(&vault(), &key(n), None, n, now_ms), Seen::Same(_))
    }

    /// The count limit: exactly the newest `records_max` records answer, and the table never
    /// holds more; with the index as sized and with a single bucket (every record past seven in
    /// the overflow map, which stays bounded).
    #[test]
    fn the_newest_records_max_answer_and_the_table_stays_bounded() {
        let records_max = 20_000;
        for mut table in [
            Idempotency::new(i64::MAX / 2, records_max),
            Idempotency::with_buckets(i64::MAX / 2, records_max, 1),
        ] {
            for n in 0..60_000u64 {
                assert!(matches!(table.lookup(&vault(), &key(n), None, n, 0), Seen::New));
                table.insert(key(n), n, done(n), 0);
                assert!(table.len() <= records_max, "{} records held after {n}", table.len());
                assert!(table.overflow.len() <= 2 * records_max + OVERFLOW_SWEEP_MIN);
                if n % 997 == 0 {
                    let oldest_live = (n + 1).saturating_sub(records_max as u64);
                    assert!(found(&table, oldest_live, 0), "{oldest_live} is among the newest");
                    assert!(found(&table, n, 0), "{n} is the newest");
                    if oldest_live > 0 {
                        assert!(!found(&table, oldest_live - 1, 0), "{} is past the limit", n);
                    }
                }
            }
        }
    }

    /// The retention time: a record answers until it expires, then not; its ID may then be
    /// used again, and the record it replaces is gone from snapshots and from recovery's list.
    #[test]
    fn a_record_answers_until_it_expires_and_its_id_can_then_be_reused() {
        let mut table = Idempotency::new(1_000, 100);
        let user = crate::types::UserKey::new(crate::types::UserIdType::Mail, "a@b.c").unwrap();
        table.insert(key(1), 1, IdemState::Pending { user, means_id: 1 }, 0);
        assert!(matches!(
            table.lookup(&vault(), &key(1), None, 1, 999),
            Seen::Same(Retry::InFlight)
        ));
        assert!(matches!(table.lookup(&vault(), &key(1), None, 2, 999), Seen::Conflict));
        assert!(matches!(table.lookup(&vault(), &key(1), None, 1, 1_000), Seen::New));
        assert!(matches!(table.lookup(&vault(), &key(1), None, 2, 1_000), Seen::New));
        table.insert(key(1), 2, done(2), 1_000);
        assert!(matches!(
            table.lookup(&vault(), &key(1), None, 2, 1_500),
            Seen::Same(Retry::Kept(KeptReply::Delivered(2)))
        ));
        assert!(table.pending().is_empty(), "the replaced pending record is not recovery's");
        let frozen = table.freeze();
        let kept: Vec<_> = frozen.iter().map(|(k, e)| (k, e.digest)).collect();
        assert_eq!(kept, vec![(key(1), 2)]);
    }

    /// Sequence numbers are kept in the index modulo 2^40: across the wrap, the newest records
    /// still answer and the dropped ones do not.
    #[test]
    fn records_answer_across_the_index_sequence_wrap() {
        let records_max = 50;
        for mut table in [
            Idempotency::new(i64::MAX / 2, records_max),
            Idempotency::with_buckets(i64::MAX / 2, records_max, 2),
        ] {
            // An empty ring fills from position 0: start at a multiple of `records_max`.
            table.next_seq = ((1 << SEQ_BITS) - 120) / records_max as u64 * records_max as u64;
            for n in 0..300u64 {
                table.insert(key(n), n, done(n), 0);
                for m in n.saturating_sub(60)..=n {
                    let live = m + records_max as u64 > n;
                    assert_eq!(found(&table, m, 0), live, "record {m} after {n}");
                }
            }
        }
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
        let timeout = KeptReply::Auth(AuthOutcome::Declined(ReasonCode::ProviderTimeout));
        assert!(restored.complete(&key(6_000), Completes::Record { digest: 6_000 }, timeout));
        assert!(restored.pending().is_empty());
    }

    /// The table's own count of its records, which a snapshot takes for the number it holds, is
    /// the number a pass over the ring finds, as IDs are used again once their records expire
    /// and the ring drops replaced records and answering ones alike.
    #[test]
    fn a_frozen_table_holds_as_many_records_as_a_pass_over_it_finds() {
        let mut table = Idempotency::new(10, 64);
        let vault = vault();
        let mut state = 7u64;
        for now_ms in 0..2_000i64 {
            state = state
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            let n = (state >> 33) % 100;
            if matches!(table.lookup(&vault, &key(n), None, n, now_ms), Seen::New) {
                table.insert(key(n), n, done(n), now_ms);
            }
            if now_ms % 50 == 0 {
                let frozen = table.freeze();
                assert_eq!(frozen.len(), frozen.records().count(), "at {now_ms} ms");
            }
        }
        assert!(table.replaced > 0, "IDs were used again within the ring");
    }

    /// A packed key unpacks to the key it was packed from, a record is the 96 bytes the packing
    /// is for, and an index bucket is one cache line.
    #[test]
    fn a_packed_key_unpacks_to_itself_and_a_slot_is_96_bytes() {
        for key in [(0, 0), (u64::MAX, u128::MAX), (7, 1u128 << 64), (1, (1u128 << 64) - 1), key(9)]
        {
            assert_eq!(PackedKey::pack(key).unpack(), key);
        }
        #[cfg(target_pointer_width = "64")]
        assert_eq!(std::mem::size_of::<Entry>(), 96);
        assert_eq!(std::mem::size_of::<Bucket>(), 64);
        assert_eq!(std::mem::align_of::<Bucket>(), 64);
    }

    /// An enrollment's record keeps the device's own sealed key (no second seal): a retry
    /// opens it with the request's IDm. A record of an older build, sealed again to the
    /// record's key, still opens; another device's IDm opens neither.
    #[test]
    fn an_issued_key_opens_sealed_to_its_device_or_to_its_record() {
        let vault = vault();
        let idm = [1, 2, 3, 4, 5, 6, 7, 8];
        let issued = NewDeviceKey::random(&vault, &idm);
        let plain = *issued.plain.as_ref().unwrap().expose();
        let reply = Reply::Accounts(AccountsReply::KeyIssued(IssuedKey {
            key_version: 1,
            key: issued.clone(),
        }));
        let kept = IdemState::done(&reply).unwrap();
        let IdemState::SealedKey { sealed, .. } = &kept else { panic!("kept sealed") };
        assert_eq!(sealed, &*issued.sealed, "the device's bytes, not sealed again");
        let older =
            IdemState::SealedKey { key_version: 1, sealed: vault.seal(&plain, &idem_aad(key(1))) };
        for state in [&kept, &older] {
            match state.reply(&vault, key(1), Some(idm)) {
                Retry::Key(IssuedKey { key_version: 1, key }) => {
                    assert_eq!(key.plain.unwrap().expose(), &plain)
                }
                other => panic!("{other:?}"),
            }
        }
        let other_device = kept.reply(&vault, key(1), Some([9; 8]));
        assert!(matches!(other_device, Retry::Refused(ReasonCode::IdempotencyConflict)));
    }

    /// A payment's record, kept inline, goes from pending to its outcome, answers a retry with
    /// it, and goes through a snapshot as any other record does.
    #[test]
    fn a_payment_record_answers_in_flight_then_its_outcome_and_survives_a_snapshot() {
        let vault = vault();
        let user = crate::types::UserKey::new(crate::types::UserIdType::Mail, "a@b.c").unwrap();
        let outcome = AuthOutcome::Declined(ReasonCode::ProviderDoNotHonor);
        let mut table = Idempotency::new(1_000_000, 100);
        table.insert(key(1), 11, IdemState::Pending { user: user.clone(), means_id: 3 }, 0);
        assert!(matches!(table.lookup(&vault, &key(1), None, 11, 1), Seen::Same(Retry::InFlight)));
        assert_eq!(table.pending().len(), 1);
        // A completion for another request of the key, or from an older log for another means,
        // is not this record's.
        assert!(!table.complete(
            &key(1),
            Completes::Record { digest: 12 },
            KeptReply::Auth(outcome)
        ));
        let other_means = Completes::Legacy { user: &user, means_id: 4 };
        assert!(!table.complete(&key(1), other_means, KeptReply::Auth(outcome)));
        assert_eq!(table.pending().len(), 1);
        assert!(table.complete(
            &key(1),
            Completes::Record { digest: 11 },
            KeptReply::Auth(outcome)
        ));
        assert!(table.pending().is_empty());
        // Done: a second completion changes nothing.
        let timeout = KeptReply::Auth(AuthOutcome::Declined(ReasonCode::ProviderTimeout));
        assert!(!table.complete(&key(1), Completes::Record { digest: 11 }, timeout));
        let answer = |table: &Idempotency| match table.lookup(&vault, &key(1), None, 11, 2) {
            Seen::Same(Retry::Kept(KeptReply::Auth(answered))) => Some(answered),
            _ => None,
        };
        assert_eq!(answer(&table), Some(outcome));
        assert!(matches!(table.lookup(&vault, &key(1), None, 12, 2), Seen::Conflict));
        let frozen = table.freeze();
        let records: Vec<_> = frozen
            .iter()
            .map(|(k, e)| (e.expires_ms, k, e.digest, e.state().into_owned()))
            .collect();
        assert!(
            matches!(&records[0].3, IdemState::Done(KeptReply::Auth(kept)) if *kept == outcome)
        );
        let mut restored = Idempotency::new(1_000_000, 100);
        restored.restore(records);
        assert_eq!(answer(&restored), Some(outcome));
    }

    /// What the model knows of one record the table was given.
    #[derive(Debug, Clone, Copy)]
    struct Made {
        key: u64,
        /// Unique to the record, as a payment's tag is: no two records share one.
        digest: u64,
        means_id: u32,
        /// Its sequence number; none once a restore left it out.
        seq: Option<u64>,
        expires_ms: i64,
        pending: bool,
        /// The reply it holds once done: the one it was made with, or its completion's.
        answer: u32,
    }

    #[derive(Debug, Clone)]
    enum Step {
        /// A request with this key: a retry of the key's record (same digest, if there is
        /// one) or a new request (a digest never used), recorded if the lookup finds no live
        /// record; pending (a payment with its provider) or done at once. As in the engine,
        /// where a payment's digest is its tag, no two pending records share a digest.
        Request { key: u64, retry: bool, pending: bool, means_id: u32 },
        /// A provider's completion of a record made earlier, whether the table still holds it,
        /// dropped it or replaced it: named by key and digest, or (`legacy`, a completion from
        /// an older log) by key, payer and means.
        Complete { record: prop::sample::Index, legacy: bool },
        /// Time passes.
        Wait { ms: i64 },
        /// A snapshot, restored into a fresh table.
        Restore,
    }

    fn step() -> impl Strategy<Value = Step> {
        prop_oneof![
            6 => (0..12u64, any::<bool>(), any::<bool>(), 1..3u32)
                .prop_map(|(key, retry, pending, means_id)| Step::Request { key, retry, pending, means_id }),
            3 => (any::<prop::sample::Index>(), prop::bool::weighted(0.2))
                .prop_map(|(record, legacy)| Step::Complete { record, legacy }),
            2 => (0..400i64).prop_map(|ms| Step::Wait { ms }),
            1 => Just(Step::Restore),
        ]
    }

    use proptest::prelude::*;

    proptest! {
        /// The table against a model of every record it was given: reservations, records the
        /// count limit drops, IDs used again once their record expired, and completions that
        /// come late (for records dropped, replaced or done). After every step each key answers
        /// as the model says (a record answers while it is among the newest `records_max` and
        /// unexpired), a completion lands exactly when the record it names is its key's record
        /// in the table and still pending, and a done record answers with its own completion's
        /// reply, never another record's. With the index as sized, with one bucket (so most
        /// records go through the overflow map) and with two.
        #[test]
        fn every_completion_lands_on_its_own_record_only(
            records_max in 1..30usize,
            buckets in prop_oneof![Just(0usize), Just(1), Just(2)],
            steps in proptest::collection::vec(step(), 1..300),
        ) {
            let ttl_ms = 1_000;
            let fresh = || match buckets {
                0 => Idempotency::new(ttl_ms, records_max),
                n => Idempotency::with_buckets(ttl_ms, records_max, n),
            };
            let user = crate::types::UserKey::new(crate::types::UserIdType::Mail, "a@b.c").unwrap();
            let vault = vault();
            let mut table = fresh();
            let mut made: Vec<Made> = Vec::new();
            let mut newest: std::collections::HashMap<u64, usize> = Default::default();
            let (mut next_seq, mut now_ms, mut next_digest) = (0u64, 0i64, 0u64);
            for (at, step) in steps.into_iter().enumerate() {
                let live = |m: &Made, next_seq: u64| {
                    m.seq.is_some_and(|seq| seq + records_max as u64 >= next_seq)
                };
                // The key's record the table holds (answering or not), by index into `made`.
                let current = |made: &[Made], newest: &std::collections::HashMap<u64, usize>, k: u64, next_seq: u64| {
                    newest.get(&k).copied().filter(|&i| live(&made[i], next_seq))
                };
                match step {
                    Step::Request { key: k, retry, mut pending, means_id } => {
                        let held = current(&made, &newest, k, next_seq);
                        let digest = match held {
                            Some(i) if retry => {
                                // A request presented again past its record's retention is
                                // refused at once (the replay window), never with a provider.
                                pending &= made[i].expires_ms > now_ms;
                                made[i].digest
                            }
                            _ => {
                                next_digest += 1;
                                next_digest
                            }
                        };
                        let seen = table.lookup(&vault, &key(k), None, digest, now_ms);
                        match held.filter(|&i| made[i].expires_ms > now_ms) {
                            Some(i) if made[i].digest != digest => {
                                prop_assert!(matches!(seen, Seen::Conflict));
                            }
                            Some(_) => prop_assert!(matches!(seen, Seen::Same(_))),
                            None => {
                                prop_assert!(matches!(seen, Seen::New));
                                let state = if pending {
                                    IdemState::Pending { user: user.clone(), means_id }
                                } else {
                                    done(digest)
                                };
                                table.insert(key(k), digest, state, now_ms);
                                newest.insert(k, made.len());
                                made.push(Made {
                                    key: k,
                                    digest,
                                    means_id,
                                    seq: Some(next_seq),
                                    expires_ms: now_ms + ttl_ms,
                                    pending,
                                    answer: digest as u32,
                                });
                                next_seq += 1;
                            }
                        }
                    }
                    Step::Complete { record, legacy } => {
                        if made.is_empty() {
                            continue;
                        }
                        let named = record.index(made.len());
                        let Made { key: k, digest, means_id, .. } = made[named];
                        let answer = 1_000_000 + at as u32;
                        let held = current(&made, &newest, k, next_seq).filter(|&i| made[i].pending);
                        let (of, target) = if legacy {
                            // An older log's completion takes the key's pending record if it is
                            // for the same payer and means.
                            let target = held.filter(|&i| made[i].means_id == means_id);
                            (Completes::Legacy { user: &user, means_id }, target)
                        } else {
                            // Its own record, and no other.
                            (Completes::Record { digest }, held.filter(|&i| i == named))
                        };
                        let landed = table.complete(&key(k), of, KeptReply::Delivered(answer));
                        prop_assert_eq!(landed, target.is_some(), "completion of record {}", named);
                        if let Some(i) = target {
                            made[i].pending = false;
                            made[i].answer = answer;
                        }
                    }
                    Step::Wait { ms } => now_ms += ms,
                    Step::Restore => {
                        let records: Vec<_> = table
                            .freeze()
                            .iter()
                            .map(|(k, e)| (e.expires_ms, k, e.digest, e.state().into_owned()))
                            .collect();
                        table = fresh();
                        table.restore(records);
                        // The records the table held are renumbered from 0 in their order;
                        // the others are gone for good.
                        let mut kept: Vec<usize> = newest
                            .values()
                            .copied()
                            .filter(|&i| live(&made[i], next_seq))
                            .collect();
                        kept.sort_by_key(|&i| made[i].seq);
                        made.iter_mut().for_each(|m| m.seq = None);
                        next_seq = kept.len() as u64;
                        for (seq, i) in kept.into_iter().enumerate() {
                            made[i].seq = Some(seq as u64);
                        }
                    }
                }
                prop_assert!(table.len() <= records_max);
                for k in 0..12u64 {
                    let answering = current(&made, &newest, k, next_seq)
                        .map(|i| made[i])
                        .filter(|m| m.expires_ms > now_ms);
                    for digest in [answering.map_or(0, |m| m.digest), u64::MAX] {
                        let seen = table.lookup(&vault, &key(k), None, digest, now_ms);
                        match answering {
                            None => prop_assert!(matches!(seen, Seen::New), "key {} digest {}", k, digest),
                            Some(m) if m.digest != digest => prop_assert!(matches!(seen, Seen::Conflict)),
                            Some(m) if m.pending => prop_assert!(matches!(seen, Seen::Same(Retry::InFlight))),
                            Some(m) => prop_assert!(
                                matches!(seen, Seen::Same(Retry::Kept(KeptReply::Delivered(n))) if n == m.answer),
                                "key {} answers with another record's reply", k
                            ),
                        }
                    }
                }
                let pending: Vec<(IdemKey, u64)> =
                    table.pending().into_iter().map(|(k, digest, _, _)| (k, digest)).collect();
                let mut expected: Vec<(IdemKey, u64)> = newest
                    .values()
                    .map(|&i| made[i])
                    .filter(|m| live(m, next_seq) && m.pending)
                    .map(|m| (key(m.key), m.digest))
                    .collect();
                expected.sort();
                prop_assert_eq!(pending, expected);
            }
        }
    }
}
