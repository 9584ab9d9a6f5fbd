//! A shard's state as a snapshot holds it (snapshot format version 9; 8 is the same without
//! the settled payments kept for their refunds, and 7 without what the shard owes its
//! providers, [`MoneyImage`]; both are still read): the shard's own state
//! types ([`User`] with its devices and means, [`CodeRecord`], [`CouponRecord`],
//! [`AgeRegistration`], [`Store`], the idempotency records' [`IdemState`], the providers'
//! [`TerminalEntry`] lists and [`AgePolicy`]s), archived with rkyv as they are, in one
//! [`ShardImage`]. Nothing is copied into types of the storage's own: a field of a type the
//! engine may not derive on is archived through its leaf (`shard/archive.rs`). Secrets stay
//! sealed as the state holds them: device keys sealed to their IDm, card numbers as the vault
//! sealed them, an enrollment's key in its idempotency record sealed to that record.
//!
//! Recovery reads the archive in place from the mapped file; each map is rebuilt from it in
//! bulk, users, idempotency records and codes each on a thread of their own. Snapshots of
//! format versions 1 to 6 are converted by `shard/legacy.rs`.

use std::collections::BTreeSet;
use std::sync::Arc;

use rkyv::with::Unshare;
use rkyv::{Archive, Deserialize, Serialize};

use super::archive::UserKeyVia;
use super::idempotency::{FrozenRecords, IdemKey, IdemState, Idempotency};
use super::state::{
    CodeMoney, CodeRecord, CodeState, CouponRecord, Kept, Ledger, Obligation, Reference,
    SettledPayment, SettledStore, ShardState, Shared, StateConfig, User,
};
use crate::age::{AgePolicy, AgeRegistration};
use crate::cow::{CowMap, Frozen};
use crate::geo::Store;
use crate::keys::open_device_key;
use crate::providers::TerminalEntry;
use crate::types::{Idm, UserKey};
use crate::wal::snapshot::{Restore, SNAPSHOT_VERSION};

/// One shard's whole state (snapshot format version 9): the state of version 7, what the
/// shard owes its providers (since version 8), and the settled payments it keeps for their
/// refunds (since version 9).
#[derive(Archive, Serialize)]
pub(crate) struct ShardImage {
    state: StateImage,
    money: MoneyImage,
    /// By idempotency key.
    settled: Vec<(IdemKey, SettledPayment)>,
}

/// One shard's whole state as snapshot format version 8 held it: [`ShardImage`] without the
/// settled payments.
#[derive(Archive, Serialize)]
#[cfg_attr(not(test), expect(dead_code, reason = "read in place; only the tests write format 8"))]
pub(crate) struct ShardImageV8 {
    state: StateImage,
    money: MoneyImage,
}

/// The authorizations' references and the operations owed to providers (`state/money.rs`),
/// since snapshot format version 8.
#[derive(Archive, Serialize, Deserialize)]
struct MoneyImage {
    op_seq: u64,
    /// By idempotency key and digest.
    in_flight: Vec<(IdemKey, u64, Reference)>,
    /// By code number.
    codes: Vec<(u64, CodeMoney)>,
    /// By operation ID.
    owed: Vec<(u64, Obligation)>,
}

/// A shard's state but for [`MoneyImage`]: the whole of a snapshot of format version 7.
/// Written only (a restore reads its archive in place, a field at a time).
#[derive(Archive, Serialize)]
pub(crate) struct StateImage {
    dispatch_seq: u64,
    /// The last code or coupon sequence number used.
    code_seq: u64,
    /// By user ID.
    users: Vec<UserImage>,
    /// Expiry, key, digest, state ([`IdemRecord`]), archived from the frozen ring itself
    /// ([`RingRecords`]).
    #[rkyv(with = RingRecords)]
    idem: FrozenRecords,
    /// The providers this shard owns, by code.
    providers: Vec<ProviderImage>,
    /// Age registrations, by card IDm.
    ages: Vec<(Idm, AgeRegistration)>,
    /// Stores and when each last changed, by that time.
    stores: Vec<(Store, i64)>,
    /// Payment codes, by issue number.
    codes: Vec<CodeImage>,
    /// Coupons, by issue number.
    coupons: Vec<(u64, CouponRecord)>,
}

/// A snapshot's idempotency record: expiry, key, digest, state.
pub(crate) type IdemRecord = (i64, IdemKey, u64, IdemState);

/// Archives a frozen ring's records as the `Vec<IdemRecord>` a snapshot holds, straight from
/// the ring: no copy of its million records is made first. In the ring's order, the order they
/// were made in, which a restore keeps: it is state (the count limit drops the oldest first,
/// and the digest hashes that order). Not by expiry: a batch's time is taken by its caller, so
/// two callers' batches can reach a shard in the other order of their times.
struct RingRecords;

impl rkyv::with::ArchiveWith<FrozenRecords> for RingRecords {
    type Archived = rkyv::vec::ArchivedVec<rkyv::Archived<IdemRecord>>;
    type Resolver = rkyv::vec::VecResolver;

    fn resolve_with(
        records: &FrozenRecords,
        resolver: Self::Resolver,
        out: rkyv::Place<Self::Archived>,
    ) {
        rkyv::vec::ArchivedVec::resolve_from_len(records.len(), resolver, out);
    }
}

impl<S> rkyv::with::SerializeWith<FrozenRecords, S> for RingRecords
where
    S: rkyv::rancor::Fallible + rkyv::ser::Allocator + rkyv::ser::Writer + ?Sized,
    IdemRecord: Serialize<S>,
{
    fn serialize_with(
        records: &FrozenRecords,
        serializer: &mut S,
    ) -> Result<Self::Resolver, S::Error> {
        let records = records
            .iter()
            .map(|(key, entry)| (entry.expires_ms, key, entry.digest, entry.state().into_owned()));
        rkyv::vec::ArchivedVec::<rkyv::Archived<IdemRecord>>::serialize_from_iter::<IdemRecord, _, _>(
            records, serializer,
        )
    }
}

#[derive(Archive, Serialize, Deserialize)]
struct UserImage {
    #[rkyv(with = UserKeyVia)]
    key: UserKey,
    /// Archived as the user itself (the map shares it with the running shard).
    #[rkyv(with = Unshare)]
    user: Arc<User>,
}

#[derive(Archive, Serialize, Deserialize)]
struct CodeImage {
    number: u64,
    #[rkyv(with = Unshare)]
    code: Arc<CodeRecord>,
}

/// A provider's terminal list and its terminals' own age policies.
#[derive(Archive, Serialize, Deserialize)]
struct ProviderImage {
    code: u32,
    terminals: Vec<TerminalEntry>,
    age_policies: Vec<(String, AgePolicy)>,
}

/// A shard's state as its writer needs it for a snapshot, taken on the shard's thread between
/// two batches. Every map of shard state is frozen ([`CowMap::freeze`]: a reference per chunk,
/// whatever the map holds), so the shard pauses for microseconds and a change it makes
/// afterwards copies only the chunk it touches; the writer's thread builds, sorts and encodes
/// the image. Only the providers' terminal lists and age policies (held by the shared
/// registry, small) are copied here.
pub(crate) struct Capture {
    users: Frozen<UserKey, Arc<User>>,
    idem: FrozenRecords,
    codes: Frozen<u64, Arc<CodeRecord>>,
    ages: Frozen<Idm, AgeRegistration>,
    coupons: Frozen<u64, CouponRecord>,
    stores: Frozen<String, (Store, i64)>,
    providers: Vec<ProviderImage>,
    dispatch_seq: u64,
    code_seq: u64,
    /// A copy: references of codes and operations owed (small next to the maps above).
    money: Ledger,
    settled: SettledStore,
}

impl Capture {
    /// Takes the capture of `state` (and of its providers' lists in the shared registry).
    pub(crate) fn take(state: &mut ShardState) -> Capture {
        let providers = state
            .owned_providers
            .iter()
            .filter_map(|code| state.shared.registry.provider(*code))
            .map(|p| ProviderImage {
                code: p.code,
                terminals: p.export_terminals(),
                age_policies: p
                    .export_age_policies()
                    .into_iter()
                    .map(|(terminal, resolved)| (terminal, resolved.policy))
                    .collect(),
            })
            .collect();
        Capture {
            users: state.users.freeze(),
            idem: state.idem.freeze(),
            codes: state.codes.freeze(),
            ages: state.ages.freeze(),
            coupons: state.coupons.freeze(),
            stores: state.stores.freeze(),
            providers,
            dispatch_seq: state.dispatch_seq,
            code_seq: state.code_seq,
            money: state.money.clone(),
            settled: state.settled.clone(),
        }
    }

    /// The image (built on the writer's thread), every list in a fixed order, since the maps
    /// it comes from have none.
    pub(crate) fn into_image(self) -> ShardImage {
        let Capture {
            users,
            idem,
            codes,
            ages,
            coupons,
            stores,
            providers,
            dispatch_seq,
            code_seq,
            money,
            settled,
        } = self;
        let mut users: Vec<UserImage> = users
            .iter()
            .map(|(key, user)| UserImage { key: key.clone(), user: Arc::clone(user) })
            .collect();
        users.sort_unstable_by(|a, b| a.key.cmp(&b.key));
        let mut ages: Vec<(Idm, AgeRegistration)> = ages.iter().map(|(k, v)| (*k, *v)).collect();
        ages.sort_unstable_by_key(|(idm, _)| *idm);
        let mut stores: Vec<(Store, i64)> = stores.iter().map(|(_, s)| s.clone()).collect();
        stores.sort_by(|a, b| (a.1, &a.0.store_id).cmp(&(b.1, &b.0.store_id)));
        let mut codes: Vec<CodeImage> = codes
            .iter()
            .map(|(&number, code)| CodeImage { number, code: Arc::clone(code) })
            .collect();
        codes.sort_unstable_by_key(|c| c.number);
        let mut coupons: Vec<(u64, CouponRecord)> =
            coupons.iter().map(|(&number, c)| (number, c.clone())).collect();
        coupons.sort_unstable_by_key(|(number, _)| *number);
        let state = StateImage {
            dispatch_seq,
            code_seq,
            users,
            idem,
            providers,
            ages,
            stores,
            codes,
            coupons,
        };
        let money = MoneyImage {
            op_seq: money.op_seq,
            in_flight: {
                let mut in_flight: Vec<_> =
                    money.in_flight.into_iter().map(|((k, d), r)| (k, d, r)).collect();
                in_flight.sort_unstable_by_key(|(k, d, _)| (*k, *d));
                in_flight
            },
            codes: money.codes.into_iter().collect(),
            owed: money.owed.into_iter().collect(),
        };
        // In the order kept: the store is a function of that order (`state/settled.rs`).
        let settled: Vec<(IdemKey, SettledPayment)> = settled.entries().collect();
        ShardImage { state, money, settled }
    }

    /// The image, encoded into `buffer` (emptied first), given room for `capacity` bytes to
    /// start with (the last snapshot's size: a buffer grown by doubling copies itself each
    /// time).
    pub(crate) fn encode(
        self,
        mut buffer: rkyv::util::AlignedVec,
        capacity: usize,
    ) -> rkyv::util::AlignedVec {
        buffer.clear();
        buffer.reserve(capacity);
        let image = self.into_image();
        with_scratch(|arena| {
            rkyv::api::high::to_bytes_in_with_alloc::<_, _, rkyv::rancor::Error>(
                &image,
                buffer,
                arena.acquire(),
            )
        })
        .expect("a shard's state always serializes")
    }
}

/// The encoders' scratch space, kept between snapshots: each snapshot borrows one arena, and
/// gives it back for the next.
///
/// Encoding a list (a million idempotency records) first holds each element's resolver in
/// scratch space: tens of megabytes. rkyv's own arena is per thread, and each snapshot is
/// encoded on a thread of its own, so that space was allocated afresh for every snapshot and
/// paid for again in page faults, as the snapshot's buffer once was ([`crate::wal`] keeps that
/// buffer for the same reason). As many arenas are kept as snapshots were ever encoded at once
/// (one per shard at most), each as large as the largest it served.
static SCRATCH: std::sync::Mutex<Vec<rkyv::ser::allocator::Arena>> =
    std::sync::Mutex::new(Vec::new());

/// Runs `encode` with an arena of [`SCRATCH`]'s (a new one if all are in use).
fn with_scratch<T>(encode: impl FnOnce(&mut rkyv::ser::allocator::Arena) -> T) -> T {
    let scratch = || SCRATCH.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    let mut arena = scratch().pop().unwrap_or_default();
    let encoded = encode(&mut arena);
    scratch().push(arena);
    encoded
}

/// Why a snapshot's image was refused.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ImageError {
    /// The archive does not validate, or a value in it is not valid.
    #[error("snapshot does not decode: {0}")]
    Decode(String),
    /// It decodes, but does not fit this engine.
    #[error("{0}")]
    Mismatch(&'static str),
    /// A snapshot of an older format that does not convert.
    #[error("{0}")]
    Legacy(#[from] crate::wal::record::RecordError),
}

impl Restore for ShardState {
    type Error = ImageError;

    /// A snapshot of the current format is the image; an older one is converted.
    fn restore_snapshot(&mut self, version: u16, payload: &[u8]) -> Result<(), ImageError> {
        if version == SNAPSHOT_VERSION {
            let image = rkyv::access::<ArchivedShardImage, rkyv::rancor::Error>(payload)
                .map_err(decode_error)?;
            // What the shard owes and the payments it keeps for their refunds are its own: built
            // on a thread of their own beside the maps (`restore_maps`), not after them.
            let config = self.config;
            std::thread::scope(|scope| {
                let books = scope.spawn(|| -> Result<(Ledger, SettledStore), ImageError> {
                    let mut ledger = Ledger::default();
                    restore_money(&image.money, &mut ledger)?;
                    let settled = restore_settled(&image.settled, config)?;
                    Ok((ledger, settled))
                });
                restore(&image.state, self)?;
                let (ledger, settled) = books.join().expect("ledger restore panicked")?;
                let journal = self.money.journal.take();
                self.money = Ledger { journal, ..ledger };
                self.settled = settled;
                Ok(())
            })
        } else if version == LEDGER_VERSION {
            let image = rkyv::access::<ArchivedShardImageV8, rkyv::rancor::Error>(payload)
                .map_err(decode_error)?;
            restore(&image.state, self)?;
            restore_money(&image.money, &mut self.money)
        } else if version == STATE_ONLY_VERSION {
            let image = rkyv::access::<ArchivedStateImage, rkyv::rancor::Error>(payload)
                .map_err(decode_error)?;
            restore(image, self)
        } else {
            Ok(super::legacy::restore(version, payload, self)?)
        }
    }
}

fn decode_error(error: rkyv::rancor::Error) -> ImageError {
    ImageError::Decode(error.to_string())
}

/// Deserializes a part of the image.
fn owned<T: Archive>(archived: &T::Archived) -> Result<T, ImageError>
where
    T::Archived: Deserialize<T, rkyv::api::high::HighDeserializer<rkyv::rancor::Error>>,
{
    rkyv::deserialize::<T, rkyv::rancor::Error>(archived).map_err(decode_error)
}

/// The snapshot format whose image is a [`StateImage`] alone (no [`MoneyImage`]).
const STATE_ONLY_VERSION: u16 = 7;
/// The snapshot format whose image is a [`ShardImageV8`] (no settled payments).
const LEDGER_VERSION: u16 = 8;

/// Restores what the shard owes its providers into `money` (its journal left as it is).
fn restore_money(image: &ArchivedMoneyImage, money: &mut Ledger) -> Result<(), ImageError> {
    money.op_seq = image.op_seq.to_native();
    let in_flight: Vec<(IdemKey, u64, Reference)> = owned(&image.in_flight)?;
    money.in_flight = in_flight.into_iter().map(|(k, d, r)| ((k, d), r)).collect();
    money.codes = owned::<Vec<(u64, CodeMoney)>>(&image.codes)?.into_iter().collect();
    money.owed = owned::<Vec<(u64, Obligation)>>(&image.owed)?.into_iter().collect();
    Ok(())
}

/// The settled payments kept for their refunds, under `config`'s bound `settled_max` (none
/// under a bound of 0, as the commands' replay would keep none), each until its refund window
/// ends.
fn restore_settled(
    image: &<Vec<(IdemKey, SettledPayment)> as Archive>::Archived,
    config: StateConfig,
) -> Result<SettledStore, ImageError> {
    let settled_max = config.settled_max;
    let mut store = SettledStore::default();
    let settled: Vec<(IdemKey, SettledPayment)> = owned(image)?;
    let settled = settled.into_iter().take(if settled_max == 0 { 0 } else { usize::MAX });
    for (key, SettledPayment { money, purse }) in settled {
        let CodeMoney { reference, refunds } = money;
        let until_ms = config.refundable_until(reference.at_ms);
        let dispatch_id = reference.dispatch_id;
        store.push(key, Kept { reference, purse }, until_ms, settled_max);
        if !refunds.is_empty() {
            store.set_refunds(dispatch_id, refunds);
        }
    }
    Ok(store)
}

/// Restores the state image `image` (a snapshot's, validated: a payload that passed its
/// checksum but does not decode is refused, never trusted) into a fresh `state` (and the
/// shared indexes).
fn restore(image: &ArchivedStateImage, state: &mut ShardState) -> Result<(), ImageError> {
    state.dispatch_seq = image.dispatch_seq.to_native();
    state.code_seq = image.code_seq.to_native();
    restore_maps(
        state,
        |users, shared| restore_users(image, users, shared),
        |idem| restore_idem(image, idem),
        |codes| restore_codes(image, codes.codes, codes.expiry, codes.coupons),
    )?;
    for p in image.providers.iter() {
        let code = p.code.to_native();
        let Some(provider) = state.shared.registry.provider(code) else { continue };
        provider.restore_terminals(owned(&p.terminals)?);
        for (terminal_id, policy) in owned::<Vec<(String, AgePolicy)>>(&p.age_policies)? {
            let resolved = state.shared.age.config.resolve(&policy).map_err(|_| {
                ImageError::Mismatch(
                    "a stored store age policy names a jurisdiction or time zone the config \
                     no longer has",
                )
            })?;
            provider
                .set_age_policy(&terminal_id, Some(resolved))
                .map_err(|_| ImageError::Mismatch("age policy of an unlisted terminal"))?;
        }
        state.owned_providers.insert(code);
    }
    for (idm, registration) in owned::<Vec<(Idm, AgeRegistration)>>(&image.ages)? {
        state.ages.insert(idm, registration);
    }
    for (store, updated_ms) in owned::<Vec<(Store, i64)>>(&image.stores)? {
        state.stores.upsert(store, updated_ms);
    }
    Ok(())
}

/// A shard's codes, their expiry index and its coupons, as a restore fills them.
pub(crate) struct CodeMaps<'a> {
    pub(crate) codes: &'a mut CowMap<u64, Arc<CodeRecord>>,
    pub(crate) expiry: &'a mut BTreeSet<(i64, u64)>,
    pub(crate) coupons: &'a mut CowMap<u64, CouponRecord>,
}

/// Fills a fresh shard's users, idempotency records and codes from a snapshot. They are
/// independent maps: each is built on its own thread, so a shard holding all three takes as
/// long as its largest, not their sum.
pub(crate) fn restore_maps<E: Send>(
    state: &mut ShardState,
    users: impl FnOnce(&mut CowMap<UserKey, Arc<User>>, &Shared) -> Result<(), E>,
    idem: impl FnOnce(&mut Idempotency) -> Result<(), E> + Send,
    codes: impl FnOnce(CodeMaps<'_>) -> Result<(), E> + Send,
) -> Result<(), E> {
    let ShardState {
        users: user_map,
        idem: records,
        codes: code_map,
        code_expiry,
        coupons,
        shared,
        ..
    } = state;
    let shared: &Shared = shared;
    std::thread::scope(|scope| {
        let idem = scope.spawn(|| idem(records));
        let codes =
            scope.spawn(|| codes(CodeMaps { codes: code_map, expiry: code_expiry, coupons }));
        let users = users(user_map, shared);
        users?;
        idem.join().expect("idempotency restore panicked")?;
        codes.join().expect("code restore panicked")
    })
}

/// Users with their devices and means; their sealed device keys go to the device index and
/// their sealed card numbers to the vault (both keep them sealed until first used). The
/// largest part of a snapshot, and the longest of the restore's threads: its two halves are
/// restored on two threads (the registries are concurrent maps).
fn restore_users(
    image: &ArchivedStateImage,
    users: &mut CowMap<UserKey, Arc<User>>,
    shared: &Shared,
) -> Result<(), ImageError> {
    let all = image.users.as_slice();
    // One key opening proves the vault key is the one the data was written with; the others
    // open on first use.
    let with_device = all.iter().find(|archived| !archived.user.devices.is_empty());
    if let Some(archived) = with_device {
        let UserImage { user, .. } = owned::<UserImage>(archived)?;
        let device = &user.devices[0];
        open_device_key(&shared.vault, &device.sealed.current.1, &device.idm).ok_or(
            ImageError::Mismatch(
                "a sealed device key does not open: is this the vault key the data was \
                 written with?",
            ),
        )?;
    }
    let (first, second) = all.split_at(all.len() / 2);
    let (restored, rest) = std::thread::scope(|scope| {
        let rest = scope.spawn(|| restore_user_range(second, shared));
        let restored = restore_user_range(first, shared);
        (restored, rest.join().expect("user restore panicked"))
    });
    let mut restored = restored?;
    restored.extend(rest?);
    users.insert_in_bulk(restored);
    Ok(())
}

/// Restores `users` (part of a snapshot's), their keys and card numbers into the registries.
fn restore_user_range(
    users: &[ArchivedUserImage],
    shared: &Shared,
) -> Result<Vec<(UserKey, Arc<User>)>, ImageError> {
    let mut restored = Vec::with_capacity(users.len());
    for archived in users {
        let UserImage { key, user } = owned::<UserImage>(archived)?;
        for device in &user.devices {
            shared.devices.import_sealed(device.idm, key.clone(), &device.sealed);
        }
        for number in user.means.iter().filter_map(|m| m.number.as_ref()) {
            shared.vault.store(number.token, Arc::clone(&number.sealed));
        }
        restored.push((key, user));
    }
    Ok(restored)
}

fn restore_idem(image: &ArchivedStateImage, idem: &mut Idempotency) -> Result<(), ImageError> {
    idem.restore(owned(&image.idem)?);
    Ok(())
}

fn restore_codes(
    image: &ArchivedStateImage,
    codes_out: &mut CowMap<u64, Arc<CodeRecord>>,
    expiry_out: &mut BTreeSet<(i64, u64)>,
    coupons: &mut CowMap<u64, CouponRecord>,
) -> Result<(), ImageError> {
    // Codes come in issue-number order: their expiry index is built in bulk.
    let mut codes = Vec::with_capacity(image.codes.len());
    let mut expiry = Vec::new();
    for archived in image.codes.iter() {
        let CodeImage { number, code } = owned::<CodeImage>(archived)?;
        if code.state == CodeState::Issued {
            expiry.push((code.expires_ms, number));
        }
        codes.push((number, code));
    }
    codes_out.insert_in_bulk(codes);
    // A fresh state: collecting builds the tree in bulk, much faster than inserting.
    *expiry_out = expiry.into_iter().collect();
    for (number, coupon) in owned::<Vec<(u64, CouponRecord)>>(&image.coupons)? {
        coupons.insert(number, coupon);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fuzzing::fresh_shard;
    use crate::shard::state::Owed;
    use crate::types::{AuthCode, Currency};
    use crate::wal::snapshot::Restore;
    use rkyv::util::AlignedVec;

    /// A shard owing one capture, with its code's reference kept.
    fn owing() -> ShardState {
        let mut state = fresh_shard();
        state.dispatch_seq = 5;
        state.code_seq = 3;
        let reference = Reference {
            dispatch_id: 5,
            provider_code: 7,
            auth_code: Some(AuthCode(*b"123456")),
            amount_minor: 1_000,
            currency: Currency::try_from("JPY").unwrap(),
            terminal_id: "T-1".into(),
            card_token: None,
            at_ms: 1_700_000_000_000,
        };
        let obligation =
            Obligation { reference: reference.clone(), operation: Owed::Capture(600), since_ms: 9 };
        state.money.op_seq = 1;
        state.money.owed.insert(1, obligation);
        state.money.codes.insert(3, CodeMoney { reference: reference.clone(), refunds: vec![] });
        state.money.in_flight.insert(((1, 2), 3), reference.clone());
        let dispatch_id = reference.dispatch_id;
        let until_ms = state.config.refundable_until(1_700_000_000_000);
        state.settled.push((6, 7), Kept { reference, purse: None }, until_ms, 10);
        state.settled.set_refunds(dispatch_id, vec![((4, 5), 300)]);
        state
    }

    fn restored(version: u16, payload: &[u8]) -> ShardState {
        let mut state = fresh_shard();
        state.restore_snapshot(version, payload).expect("the snapshot restores");
        state
    }

    /// A snapshot carries what the shard owes its providers, and the references it keeps.
    #[test]
    fn a_snapshot_carries_the_ledger() {
        let payload = Capture::take(&mut owing()).encode(AlignedVec::new(), 0);
        let state = restored(SNAPSHOT_VERSION, &payload);
        let (owed, kept) = (&state.money, &owing().money);
        assert_eq!(owed.owed, kept.owed);
        assert_eq!(owed.codes, kept.codes);
        assert_eq!(owed.in_flight, kept.in_flight);
        assert_eq!((owed.op_seq, state.dispatch_seq, state.code_seq), (1, 5, 3));
        let entries = |s: &ShardState| s.settled.entries().collect::<Vec<_>>();
        assert_eq!(entries(&state), entries(&owing()));
        assert_eq!(state.settled.refunds(5), [((4, 5), 300)]);
        assert_eq!(state.digest(), owing().digest());
    }

    /// A snapshot encoded into the buffer an earlier one left (the writer keeps it) is the
    /// same bytes as one encoded into a new buffer: nothing of the earlier one stays.
    #[test]
    fn a_snapshot_in_a_kept_buffer_is_the_snapshot_in_a_new_one() {
        let fresh = Capture::take(&mut owing()).encode(AlignedVec::new(), 0);
        let mut kept = AlignedVec::new();
        kept.extend_from_slice(&[0xa5; 1 << 16]);
        let again = Capture::take(&mut owing()).encode(kept, 0);
        assert_eq!(again.as_slice(), fresh.as_slice());
        assert!(again.capacity() >= 1 << 16, "the kept buffer's room is reused");
    }

    /// A snapshot keeps the idempotency records in the order they were made in, whatever the
    /// order of their expiries (two callers' batches can reach a shard in the other order of
    /// their times): the restored ring, its count limit and its digest are the shard's.
    #[test]
    fn a_snapshot_keeps_the_records_in_the_order_they_were_made() {
        let with_records = || {
            let mut state = fresh_shard();
            let records =
                [(5_000, 1), (4_000, 2), (6_000, 3), (4_500, 4)].map(|(expires_ms, id)| {
                    (
                        expires_ms,
                        (id, u128::from(id)),
                        id,
                        IdemState::Done(crate::shard::idempotency::KeptReply::Delivered(id as u32)),
                    )
                });
            state.idem.restore(records.to_vec());
            state
        };
        let payload = Capture::take(&mut with_records()).encode(AlignedVec::new(), 0);
        let state = restored(SNAPSHOT_VERSION, &payload);
        let order = |s: &ShardState| s.idem.records().map(|e| e.digest).collect::<Vec<_>>();
        assert_eq!(order(&state), [1, 2, 3, 4]);
        assert_eq!(state.digest(), with_records().digest());
    }

    #[derive(Archive, Serialize)]
    struct Ring {
        #[rkyv(with = RingRecords)]
        records: FrozenRecords,
    }

    /// A frozen ring archives as the vector of its records would, byte for byte (the format
    /// is the same), the oldest first and only those within the count limit.
    #[test]
    fn a_ring_archives_as_the_vector_of_its_records() {
        let mut idem = Idempotency::new(60_000, 8);
        let records: Vec<IdemRecord> = (1..=12u64)
            .map(|id| {
                let state =
                    IdemState::Done(crate::shard::idempotency::KeptReply::Delivered(id as u32));
                (5_000 - id as i64, (id, u128::from(id) << 70), id, state)
            })
            .collect();
        idem.restore(records.clone());
        let ring = rkyv::to_bytes::<rkyv::rancor::Error>(&Ring { records: idem.freeze() }).unwrap();
        let newest = rkyv::to_bytes::<rkyv::rancor::Error>(&records[4..].to_vec()).unwrap();
        assert_eq!(&ring[..], &newest[..]);
    }

    /// A snapshot of format 8 (the state and the ledger, written by a build before settled
    /// payments were kept) still restores: the ledger as it was, no settled payment.
    #[test]
    fn a_format_8_snapshot_restores_with_no_settled_payment() {
        let ShardImage { state, money, .. } = Capture::take(&mut owing()).into_image();
        let payload = rkyv::to_bytes::<rkyv::rancor::Error>(&ShardImageV8 { state, money });
        let state = restored(LEDGER_VERSION, &payload.unwrap());
        assert_eq!(state.money.owed, owing().money.owed);
        assert_eq!(state.money.codes, owing().money.codes);
        assert!(state.settled.is_empty());
    }

    /// The operations owed, as a format 8 snapshot archived them (before
    /// [`Owed::RefundSettled`] was added at the end), read back as this build's: the same
    /// values, the archived type's size unchanged.
    #[test]
    fn format_8_obligations_read_as_they_were_written() {
        #[derive(rkyv::Archive, rkyv::Serialize)]
        enum OwedV8 {
            Capture(u64),
            Void,
            Refund(u64),
            Reversal,
        }
        let size = std::mem::size_of::<<Owed as rkyv::Archive>::Archived>();
        assert_eq!(std::mem::size_of::<ArchivedOwedV8>(), size);
        let written = vec![OwedV8::Capture(5), OwedV8::Void, OwedV8::Refund(7), OwedV8::Reversal];
        let bytes = rkyv::to_bytes::<rkyv::rancor::Error>(&written).unwrap();
        let read = rkyv::from_bytes::<Vec<Owed>, rkyv::rancor::Error>(&bytes).unwrap();
        assert_eq!(read, [Owed::Capture(5), Owed::Void, Owed::Refund(7), Owed::Reversal]);
    }

    /// A snapshot of format 7 (the state alone, written by a build before the ledger) still
    /// restores: the state as it was, nothing owed.
    #[test]
    fn a_format_7_snapshot_restores_with_nothing_owed() {
        let image = Capture::take(&mut owing()).into_image();
        let payload = rkyv::to_bytes::<rkyv::rancor::Error>(&image.state).unwrap();
        let state = restored(STATE_ONLY_VERSION, &payload);
        assert_eq!((state.dispatch_seq, state.code_seq), (5, 3));
        assert!(state.money.owed.is_empty() && state.money.codes.is_empty());
        assert!(state.money.in_flight.is_empty());
    }
}
