//! Shard snapshots: a shard's whole state in one rkyv archive, so recovery starts from it and
//! replays only the log written after it.
//!
//! File `shard-NNN.snap`: a 48-byte header (magic `SGSNAP\0\0`, `u16` format version, `u16`
//! shard index, `u32` shard count, `u64` generation, `u64` payload length, `u32` CRC-32 of the
//! payload, 12 zero bytes), then the payload, which thus starts 16-byte aligned: recovery maps
//! the file and reads the archive in place, with no copy. Before format version 4 the header
//! was those 36 bytes without the padding; such files are read into an aligned buffer.
//! A snapshot of generation G holds everything before the log of generation G. Written to a
//! temporary file, synced, renamed: a crash leaves the old one or the new one, never half of
//! one. Secrets are sealed as in the log.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use rkyv::{Archive, Deserialize, Serialize};

use super::record::{archived_sealed_in, archived_user_in};
use super::record::{
    coupon_in, coupon_out, currency_in, policy_in, policy_out, store_in, store_out, verdict_in,
    verdict_out, LogAgePolicy, LogCoupon, LogStore, LogVerdict,
};
use super::record::{
    outcome_in, outcome_out, sealed_out, terminal_in, terminal_out, user_out, LogNumber,
    LogOutcome, LogSealed, LogTerminal, LogUser, RecordError,
};
use super::{StorageError, FORMAT_VERSION};
use crate::age::{AgeRegistration, VerificationMethod};
use crate::cow::{CowMap, Frozen};
use crate::geo::Store;
use crate::keys::{open_device_key, SealedKeys};
use crate::shard::idempotency::{seal_issued_key, FrozenRecords, IdemState, Idempotency};
use crate::shard::replay::ReplayWindow;
use crate::shard::state::{
    Balance, CodeRecord, CodeState, CouponRecord, Device, IssuedCode, IssuedCoupon, Purse,
    PurseHold, Redemption, Reply, ShardState, Shared, StoredMeans, StoredNumber, User,
};
use crate::types::AuthCode;
use crate::types::Idm;
use crate::types::{CardToken, MeansKind, ReasonCode, UserKey};

pub(crate) const MAGIC: [u8; 8] = *b"SGSNAP\0\0";
/// The header's length since format version 4 (a multiple of the archive's alignment).
const HEADER_LEN: usize = 48;
/// The header's length before format version 4.
const HEADER_LEN_V3: usize = 36;

#[derive(Archive, Serialize, Deserialize, Debug)]
pub(crate) struct SnapShard {
    dispatch_seq: u64,
    users: Vec<SnapUser>,
    idem: Vec<SnapIdem>,
    providers: Vec<SnapProvider>,
    /// Since format version 2.
    age: SnapAge,
    /// Since format version 3: the stores of this shard's cells.
    stores: Vec<SnapStore>,
    /// Since format version 3: stored-value balances and their holds.
    wallet: Vec<SnapPurse>,
    /// Since format version 3: payment codes and coupons, and the sequence they come from.
    code_seq: u64,
    codes: Vec<SnapCode>,
    coupons: Vec<SnapCoupon>,
    /// Since format version 6: the store terminal each code was requested for, by number.
    code_terminals: Vec<(u64, String)>,
}

#[derive(Archive, Serialize, Deserialize, Debug)]
struct SnapCode {
    number: u64,
    user: LogUser,
    means_id: u32,
    provider_code: u32,
    amount_minor: u64,
    currency: [u8; 3],
    expires_ms: i64,
    auth_code: [u8; 6],
    order_ref: String,
    deliver_to: [u8; 8],
    /// 0 issued, 1 redeemed, 2 expired.
    state: u8,
    redemption: Option<SnapRedemption>,
}

#[derive(Archive, Serialize, Deserialize, Debug)]
struct SnapRedemption {
    captured_minor: u64,
    released_minor: u64,
    coupon_discount_minor: u64,
    terminal_id: String,
    sale_at_ms: i64,
    redeemed_at_ms: i64,
    items: Vec<(String, u32, u64)>,
}

impl From<&Redemption> for SnapRedemption {
    fn from(r: &Redemption) -> SnapRedemption {
        SnapRedemption {
            captured_minor: r.captured_minor,
            released_minor: r.released_minor,
            coupon_discount_minor: r.coupon_discount_minor,
            terminal_id: r.terminal_id.clone(),
            sale_at_ms: r.sale_at_ms,
            redeemed_at_ms: r.redeemed_at_ms,
            items: r.items.clone(),
        }
    }
}

impl SnapRedemption {
    /// The redemption, with what the code (or the idempotency record) holds beside it.
    fn into_redemption(
        self,
        number: u64,
        currency: crate::types::Currency,
        provider_code: u32,
        auth_code: AuthCode,
    ) -> Redemption {
        Redemption {
            number,
            captured_minor: self.captured_minor,
            released_minor: self.released_minor,
            coupon_discount_minor: self.coupon_discount_minor,
            currency,
            terminal_id: self.terminal_id,
            provider_code,
            auth_code,
            sale_at_ms: self.sale_at_ms,
            redeemed_at_ms: self.redeemed_at_ms,
            items: self.items,
        }
    }
}

#[derive(Archive, Serialize, Deserialize, Debug)]
struct SnapCoupon {
    number: u64,
    user: LogUser,
    provider_code: u32,
    effect: LogCoupon,
    uses_left: u32,
    expires_ms: i64,
}

#[derive(Archive, Serialize, Deserialize, Debug)]
struct SnapPurse {
    user: LogUser,
    means_id: u32,
    balance_minor: u64,
    currency: Option<[u8; 3]>,
    /// Since format version 6 with the digest of each hold's payment.
    holds: Vec<SnapHold>,
}

/// A purse's hold.
#[derive(Archive, Serialize, Deserialize, Debug)]
struct SnapHold {
    /// Owner hash and client request ID (or the code hold key).
    key: (u64, u128),
    /// The digest of the payment's request (none for a code's hold).
    digest: Option<u64>,
    amount_minor: u64,
    expires_ms: i64,
}

/// A purse as format versions 3 to 5 keep it: its holds without their payments' digests.
#[derive(Archive, Serialize, Deserialize, Debug)]
struct SnapPurseV5 {
    user: LogUser,
    means_id: u32,
    balance_minor: u64,
    currency: Option<[u8; 3]>,
    /// Owner hash, client request ID (or the code hold key), amount, expiry.
    holds: Vec<(u64, u128, u64, i64)>,
}

/// The payload of a snapshot of format versions 3 to 5: version 6 but for its purses' holds'
/// digests and the codes' terminals.
#[derive(Archive, Serialize, Deserialize, Debug)]
struct SnapShardV5 {
    dispatch_seq: u64,
    users: Vec<SnapUser>,
    idem: Vec<SnapIdem>,
    providers: Vec<SnapProvider>,
    age: SnapAge,
    stores: Vec<SnapStore>,
    wallet: Vec<SnapPurseV5>,
    code_seq: u64,
    codes: Vec<SnapCode>,
    coupons: Vec<SnapCoupon>,
}

#[derive(Archive, Serialize, Deserialize, Debug)]
struct SnapStore {
    store: LogStore,
    updated_ms: i64,
}

/// The payload of a format-version-2 snapshot: version 3 without the stores.
#[derive(Archive, Serialize, Deserialize, Debug)]
struct SnapShardV2 {
    dispatch_seq: u64,
    users: Vec<SnapUser>,
    idem: Vec<SnapIdem>,
    providers: Vec<SnapProvider>,
    age: SnapAge,
}

/// The payload of a format-version-1 snapshot: version 2 without the age section.
#[derive(Archive, Serialize, Deserialize, Debug)]
struct SnapShardV1 {
    dispatch_seq: u64,
    users: Vec<SnapUser>,
    idem: Vec<SnapIdem>,
    providers: Vec<SnapProvider>,
}

#[derive(Archive, Serialize, Deserialize, Debug, Default)]
struct SnapAge {
    registrations: Vec<SnapAgeRegistration>,
    /// Terminal age policies of the providers this shard owns: code, terminal, policy.
    policies: Vec<(u32, String, LogAgePolicy)>,
}

#[derive(Archive, Serialize, Deserialize, Debug)]
struct SnapAgeRegistration {
    idm: [u8; 8],
    /// Year, month, day.
    birth_date: (i16, i8, i8),
    method: u8,
    verified_at_ms: i64,
    valid_until_ms: i64,
}

#[derive(Archive, Serialize, Deserialize, Debug)]
struct SnapUser {
    user: LogUser,
    password_phc: String,
    devices: Vec<SnapDevice>,
    means: Vec<SnapMeans>,
    default_means: Option<u32>,
    next_means_id: u32,
    failed_logins: u32,
    locked_until_ms: i64,
}

#[derive(Archive, Serialize, Deserialize, Debug)]
struct SnapDevice {
    idm: [u8; 8],
    key_version: u16,
    replay: (u64, u64, bool),
    current: (u16, LogSealed),
    previous: Option<(u16, LogSealed, i64)>,
}

#[derive(Archive, Serialize, Deserialize, Debug)]
struct SnapMeans {
    means_id: u32,
    kind: u8,
    label: String,
    number: Option<LogNumber>,
    uses: u64,
    last_used_ms: Option<i64>,
    registered_ms: i64,
}

#[derive(Archive, Serialize, Deserialize, Debug)]
struct SnapIdem {
    expires_ms: i64,
    owner_hash: u64,
    client_request_id: u128,
    digest: u64,
    state: SnapIdemState,
}

#[derive(Archive, Serialize, Deserialize, Debug)]
enum SnapIdemState {
    Pending {
        user: LogUser,
        means_id: u32,
    },
    Ok,
    Refused {
        reason: u16,
    },
    KeyIssued {
        key_version: u16,
        key: LogSealed,
    },
    MeansAdded {
        means_id: u32,
        last4: Option<[u8; 4]>,
    },
    Auth {
        outcome: LogOutcome,
    },
    /// Since format version 2.
    BasketAuth {
        outcome: LogOutcome,
        verdict: LogVerdict,
    },
    /// Since format version 3: a payment code's issue (its text is derived again on restore).
    CodeIssued {
        number: u64,
        text: String,
        amount_minor: u64,
        currency: [u8; 3],
        expires_ms: i64,
        deliver_to: [u8; 8],
        user: LogUser,
        order_ref: String,
    },
    /// Since format version 3: a redemption's answer.
    Redeemed {
        number: u64,
        currency: [u8; 3],
        provider_code: u32,
        auth_code: [u8; 6],
        redemption: SnapRedemption,
    },
    /// Since format version 3: a coupon's issue.
    CouponIssued {
        number: u64,
        text: String,
        user: LogUser,
        effect: LogCoupon,
        uses: u32,
        expires_ms: i64,
    },
    /// Since format version 3: a top-up's answer.
    Balance {
        balance_minor: u64,
        available_minor: u64,
        currency: Option<[u8; 3]>,
    },
    /// Since format version 6: a delivery notice's answer.
    Delivered {
        devices: u32,
    },
}

#[derive(Archive, Serialize, Deserialize, Debug)]
struct SnapProvider {
    code: u32,
    terminals: Vec<LogTerminal>,
}

impl SnapShard {
    /// Puts every list in a fixed order (users and balances by user ID, stores by the time
    /// they changed, registrations by IDm, coupons and codes by number, idempotency records by
    /// expiry), since the maps they come from have none. Runs on the writer's thread.
    pub(crate) fn sort(&mut self) {
        self.users.sort_by(|a, b| (a.user.id_type, &a.user.id).cmp(&(b.user.id_type, &b.user.id)));
        self.age.registrations.sort_by_key(|r| r.idm);
        self.stores.sort_by_key(|s| s.updated_ms);
        self.wallet.sort_by(|a, b| (&a.user.id, a.means_id).cmp(&(&b.user.id, b.means_id)));
        self.coupons.sort_by_key(|c| c.number);
        self.codes.sort_by_key(|c| c.number);
        self.code_terminals.sort_by_key(|(number, _)| *number);
        self.idem.sort_by_key(|i| (i.expires_ms, i.owner_hash, i.client_request_id));
    }
}

/// A shard's state as its writer needs it for a snapshot, taken on the shard's thread between
/// two batches. Every map of shard state is frozen ([`CowMap::freeze`]: a reference per chunk,
/// whatever the map holds), so the shard pauses for microseconds and a change it makes
/// afterwards copies only the chunk it touches; the writer's thread builds, sorts and encodes
/// the archive. Only the providers' terminal lists and age policies (held by the shared
/// registry, small) are copied here.
pub(crate) struct Capture {
    users: Frozen<UserKey, std::sync::Arc<User>>,
    idem: FrozenRecords,
    codes: Frozen<u64, std::sync::Arc<CodeRecord>>,
    ages: Frozen<Idm, AgeRegistration>,
    coupons: Frozen<u64, CouponRecord>,
    stores: Frozen<String, (Store, i64)>,
    vault: std::sync::Arc<crate::vault::Vault>,
    /// Everything else, ready: its users, idempotency records, codes and balances still empty.
    rest: SnapShard,
}

impl Capture {
    /// Takes the capture of `state` (and of its slice of the shared indexes).
    pub(crate) fn take(state: &mut ShardState) -> Capture {
        let users = state.users.freeze();
        let idem = state.idem.freeze();
        let providers = state
            .owned_providers
            .iter()
            .filter_map(|code| state.shared.registry.provider(*code))
            .map(|p| SnapProvider {
                code: p.code,
                terminals: p.export_terminals().iter().map(terminal_out).collect(),
            })
            .collect();
        let policies = state
            .owned_providers
            .iter()
            .filter_map(|code| state.shared.registry.provider(*code))
            .flat_map(|p| {
                p.export_age_policies()
                    .into_iter()
                    .map(|(terminal, policy)| (p.code, terminal, policy_out(&policy.policy)))
            })
            .collect();
        let age = SnapAge { registrations: Vec::new(), policies };
        let rest = SnapShard {
            dispatch_seq: state.dispatch_seq,
            users: Vec::new(),
            idem: Vec::new(),
            providers,
            age,
            stores: Vec::new(),
            wallet: Vec::new(),
            code_seq: state.code_seq,
            codes: Vec::new(),
            coupons: Vec::new(),
            code_terminals: Vec::new(),
        };
        Capture {
            users,
            idem,
            codes: state.codes.freeze(),
            ages: state.ages.freeze(),
            coupons: state.coupons.freeze(),
            stores: state.stores.freeze(),
            vault: std::sync::Arc::clone(&state.shared.vault),
            rest,
        }
    }

    /// Builds the snapshot (on the writer's thread), sealing what is not sealed yet.
    pub(crate) fn into_snapshot(self) -> SnapShard {
        let Capture { users, idem, codes, ages, coupons, stores, vault, mut rest } = self;
        rest.age.registrations = ages
            .iter()
            .map(|(idm, r)| SnapAgeRegistration {
                idm: *idm,
                birth_date: (r.birth_date.year(), r.birth_date.month(), r.birth_date.day()),
                method: r.method as u8,
                verified_at_ms: r.verified_at_ms,
                valid_until_ms: r.valid_until_ms,
            })
            .collect();
        rest.stores = stores
            .iter()
            .map(|(_, (store, updated_ms))| SnapStore {
                store: store_out(store),
                updated_ms: *updated_ms,
            })
            .collect();
        rest.coupons = coupons
            .iter()
            .map(|(&number, c)| SnapCoupon {
                number,
                user: user_out(&c.user),
                provider_code: c.provider_code,
                effect: coupon_out(&c.effect),
                uses_left: c.uses_left,
                expires_ms: c.expires_ms,
            })
            .collect();
        for (key, user) in users.iter() {
            for means in &user.means {
                if let Some(purse) = &means.purse {
                    rest.wallet.push(SnapPurse {
                        user: user_out(key),
                        means_id: means.means_id,
                        balance_minor: purse.balance_minor,
                        currency: purse.currency.map(|c| c.bytes()),
                        holds: purse
                            .holds
                            .iter()
                            .map(|h| SnapHold {
                                key: h.key,
                                digest: h.digest,
                                amount_minor: h.amount_minor,
                                expires_ms: h.expires_ms,
                            })
                            .collect(),
                    });
                }
            }
        }
        rest.users = users.iter().map(|(key, user)| capture_user(key, user)).collect();
        rest.codes = codes
            .iter()
            .map(|(&number, c)| {
                let (state_byte, redemption) = match &c.state {
                    CodeState::Issued => (0, None),
                    CodeState::Redeemed(r) => (1, Some(SnapRedemption::from(&**r))),
                    CodeState::Expired => (2, None),
                };
                SnapCode {
                    number,
                    user: user_out(&c.user),
                    means_id: c.means_id,
                    provider_code: c.provider_code,
                    amount_minor: c.amount_minor,
                    currency: c.currency.bytes(),
                    expires_ms: c.expires_ms,
                    auth_code: c.auth_code.0,
                    order_ref: c.order_ref.clone(),
                    deliver_to: c.deliver_to,
                    state: state_byte,
                    redemption,
                }
            })
            .collect();
        rest.code_terminals =
            codes.iter().map(|(&number, c)| (number, c.terminal_id.clone())).collect();

        rest.idem = idem
            .iter()
            .map(|((owner_hash, client_request_id), entry)| SnapIdem {
                expires_ms: entry.expires_ms,
                owner_hash,
                client_request_id,
                digest: entry.digest,
                state: match &*entry.state() {
                    IdemState::Pending { user, means_id } => {
                        SnapIdemState::Pending { user: user_out(user), means_id: *means_id }
                    }
                    IdemState::Done(reply) => {
                        capture_reply(&vault, reply, owner_hash, client_request_id)
                    }
                    IdemState::SealedKey { key_version, sealed } => SnapIdemState::KeyIssued {
                        key_version: *key_version,
                        key: sealed_out(sealed),
                    },
                },
            })
            .collect();
        rest
    }
}

/// Restores a snapshot, read in place from its archive, into a fresh `state` (and the shared
/// indexes). Device keys and the keys in enrollment records stay sealed until first used.
fn restore_archived(snap: &ArchivedSnapShard, state: &mut ShardState) -> Result<(), RecordError> {
    state.dispatch_seq = snap.dispatch_seq.to_native();
    state.code_seq = snap.code_seq.to_native();
    // Users, idempotency records and codes are independent maps: each is built on its own
    // thread, so a shard holding all three takes as long as its largest, not their sum.
    let ShardState { users, idem, codes, code_expiry, coupons, shared, .. } = &mut *state;
    let shared: &Shared = shared;
    std::thread::scope(|scope| {
        let idem = scope.spawn(|| restore_idem_records(snap, idem));
        let codes = scope.spawn(|| restore_codes(snap, codes, code_expiry, coupons));
        let users = restore_users(snap, users, shared);
        users?;
        idem.join().expect("idempotency restore panicked")?;
        codes.join().expect("code restore panicked")
    })?;
    for p in snap.providers.iter() {
        if let Some(provider) = state.shared.registry.provider(p.code.to_native()) {
            let terminals: Vec<LogTerminal> = owned(&p.terminals)?;
            provider
                .restore_terminals(terminals.iter().map(terminal_in).collect::<Result<_, _>>()?);
            state.owned_providers.insert(p.code.to_native());
        }
    }
    for r in snap.age.registrations.iter() {
        let registration = AgeRegistration {
            birth_date: jiff::civil::Date::new(
                r.birth_date.0.to_native(),
                r.birth_date.1,
                r.birth_date.2,
            )
            .map_err(|_| RecordError("age registration birth date"))?,
            method: VerificationMethod::from_u8(r.method)
                .ok_or(RecordError("age verification method"))?,
            verified_at_ms: r.verified_at_ms.to_native(),
            valid_until_ms: r.valid_until_ms.to_native(),
        };
        state.ages.insert(r.idm, registration);
    }
    for s in snap.stores.iter() {
        state.stores.upsert(store_in(&owned(&s.store)?)?, s.updated_ms.to_native());
    }
    for policy in snap.age.policies.iter() {
        let (code, terminal_id, policy): (u32, String, LogAgePolicy) = owned(policy)?;
        let policy = policy_in(&policy)?;
        let resolved = state.shared.age.config.resolve(&policy).map_err(|_| {
            RecordError(
                "a stored store age policy names a jurisdiction or time zone the config no \
                 longer has",
            )
        })?;
        if let Some(provider) = state.shared.registry.provider(code) {
            provider
                .set_age_policy(&terminal_id, Some(resolved))
                .map_err(|_| RecordError("age policy of an unlisted terminal"))?;
            state.owned_providers.insert(code);
        }
    }
    Ok(())
}

/// Users with their devices (whose keys stay sealed) and means, then their balances.
fn restore_users(
    snap: &ArchivedSnapShard,
    users: &mut CowMap<UserKey, std::sync::Arc<User>>,
    shared: &Shared,
) -> Result<(), RecordError> {
    let vault = &shared.vault;
    let mut restored = Vec::with_capacity(snap.users.len());
    let mut vault_checked = false;
    for snap_user in snap.users.iter() {
        let user_key = archived_user_in(&snap_user.user)?;
        let mut devices = Vec::with_capacity(snap_user.devices.len());
        for d in snap_user.devices.iter() {
            let current = archived_sealed_in(&d.current.1);
            if !vault_checked {
                // One key opening proves the vault key is the one the data was written with;
                // the others open on first use.
                open_device_key(vault, &current, &d.idm).ok_or(RecordError(
                    "a sealed device key does not open: is this the vault key the data was \
                     written with?",
                ))?;
                vault_checked = true;
            }
            let sealed = SealedKeys {
                current: (d.current.0.to_native(), std::sync::Arc::new(current)),
                previous: d.previous.as_ref().map(|p| {
                    (
                        p.0.to_native(),
                        std::sync::Arc::new(archived_sealed_in(&p.1)),
                        p.2.to_native(),
                    )
                }),
            };
            shared.devices.import_sealed(d.idm, user_key.clone(), &sealed);
            devices.push(Device {
                idm: d.idm,
                key_version: d.key_version.to_native(),
                replay: ReplayWindow::from_parts(
                    d.replay.0.to_native(),
                    d.replay.1.to_native(),
                    d.replay.2,
                ),
                sealed,
            });
        }
        let mut means = Vec::with_capacity(snap_user.means.len());
        for m in snap_user.means.iter() {
            let number = m.number.as_ref().map(|n| {
                StoredNumber::kept(
                    vault,
                    CardToken(n.token),
                    n.last4,
                    archived_sealed_in(&n.sealed),
                )
            });
            means.push(StoredMeans {
                means_id: m.means_id.to_native(),
                kind: MeansKind::from_u8(m.kind).ok_or(RecordError("means kind"))?,
                label: m.label.as_str().to_owned(),
                number,
                uses: m.uses.to_native(),
                last_used_ms: m.last_used_ms.as_ref().map(|t| t.to_native()),
                registered_ms: m.registered_ms.to_native(),
                purse: (m.kind == MeansKind::EMoney as u8).then(Purse::default),
            });
        }
        let user = User {
            password_phc: snap_user.password_phc.as_str().to_owned(),
            devices,
            means,
            default_means: snap_user.default_means.as_ref().map(|m| m.to_native()),
            next_means_id: snap_user.next_means_id.to_native(),
            failed_logins: snap_user.failed_logins.to_native(),
            locked_until_ms: snap_user.locked_until_ms.to_native(),
        };
        restored.push((user_key, std::sync::Arc::new(user)));
    }
    users.insert_in_bulk(restored);
    for p in snap.wallet.iter() {
        let user = archived_user_in(&p.user)?;
        let means_id = p.means_id.to_native();
        let purse = users
            .get_mut(&user)
            .map(std::sync::Arc::make_mut)
            .and_then(|u| u.means.iter_mut().find(|m| m.means_id == means_id))
            .and_then(|m| m.purse.as_mut())
            .ok_or(RecordError("a balance for a means that keeps none"))?;
        purse.balance_minor = p.balance_minor.to_native();
        purse.currency = p.currency.as_ref().map(|c| currency_in(*c)).transpose()?;
        purse.holds = p
            .holds
            .iter()
            .map(|h| PurseHold {
                key: (h.key.0.to_native(), h.key.1.to_native()),
                digest: h.digest.as_ref().map(|d| d.to_native()),
                amount_minor: h.amount_minor.to_native(),
                expires_ms: h.expires_ms.to_native(),
            })
            .collect();
    }
    Ok(())
}

fn restore_idem_records(
    snap: &ArchivedSnapShard,
    idem: &mut Idempotency,
) -> Result<(), RecordError> {
    let mut records = Vec::with_capacity(snap.idem.len());
    for i in snap.idem.iter() {
        records.push((
            i.expires_ms.to_native(),
            (i.owner_hash.to_native(), i.client_request_id.to_native()),
            i.digest.to_native(),
            restore_idem(i)?,
        ));
    }
    idem.restore(records);
    Ok(())
}

fn restore_codes(
    snap: &ArchivedSnapShard,
    codes_out: &mut CowMap<u64, std::sync::Arc<CodeRecord>>,
    expiry_out: &mut BTreeSet<(i64, u64)>,
    coupons: &mut CowMap<u64, CouponRecord>,
) -> Result<(), RecordError> {
    // Codes come in issue-number order: their expiry index is built in bulk.
    let mut codes = Vec::with_capacity(snap.codes.len());
    let mut expiry = Vec::new();
    // Both by number; a code without one (snapshots before format version 6) gets none.
    let mut terminals = snap.code_terminals.iter().peekable();
    for c in snap.codes.iter() {
        let number = c.number.to_native();
        while terminals.next_if(|t| t.0.to_native() < number).is_some() {}
        let terminal_id = match terminals.next_if(|t| t.0.to_native() == number) {
            Some(t) => t.1.as_str().to_owned(),
            None => String::new(),
        };
        let currency = currency_in(c.currency)?;
        let record_state = match (c.state, c.redemption.as_ref()) {
            (0, _) => CodeState::Issued,
            (1, Some(r)) => {
                let r: SnapRedemption = owned(r)?;
                let provider_code = c.provider_code.to_native();
                CodeState::Redeemed(Box::new(r.into_redemption(
                    number,
                    currency,
                    provider_code,
                    AuthCode(c.auth_code),
                )))
            }
            (2, _) => CodeState::Expired,
            _ => return Err(RecordError("code state")),
        };
        if record_state == CodeState::Issued {
            expiry.push((c.expires_ms.to_native(), number));
        }
        codes.push((
            number,
            std::sync::Arc::new(CodeRecord {
                user: archived_user_in(&c.user)?,
                means_id: c.means_id.to_native(),
                provider_code: c.provider_code.to_native(),
                amount_minor: c.amount_minor.to_native(),
                currency,
                expires_ms: c.expires_ms.to_native(),
                auth_code: AuthCode(c.auth_code),
                order_ref: c.order_ref.as_str().to_owned(),
                deliver_to: c.deliver_to,
                state: record_state,
                terminal_id,
            }),
        ));
    }
    codes_out.insert_in_bulk(codes);
    // A fresh state: collecting builds the tree in bulk, much faster than inserting.
    *expiry_out = expiry.into_iter().collect();
    for c in snap.coupons.iter() {
        let record = CouponRecord {
            user: archived_user_in(&c.user)?,
            provider_code: c.provider_code.to_native(),
            effect: coupon_in(&owned(&c.effect)?)?,
            uses_left: c.uses_left.to_native(),
            expires_ms: c.expires_ms.to_native(),
        };
        coupons.insert(c.number.to_native(), record);
    }
    Ok(())
}

/// Deserializes a small, rarely present part of an archive into its owned form.
fn owned<T: Archive>(archived: &T::Archived) -> Result<T, RecordError>
where
    T::Archived: rkyv::Deserialize<T, rkyv::api::high::HighDeserializer<rkyv::rancor::Error>>,
{
    rkyv::deserialize::<T, rkyv::rancor::Error>(archived)
        .map_err(|_| RecordError("a snapshot field does not decode"))
}

impl From<SnapShardV1> for SnapShard {
    fn from(v1: SnapShardV1) -> SnapShard {
        SnapShard {
            dispatch_seq: v1.dispatch_seq,
            users: v1.users,
            idem: v1.idem,
            providers: v1.providers,
            age: SnapAge::default(),
            stores: Vec::new(),
            wallet: Vec::new(),
            code_seq: 0,
            codes: Vec::new(),
            coupons: Vec::new(),
            code_terminals: Vec::new(),
        }
    }
}

impl From<SnapShardV2> for SnapShard {
    fn from(v2: SnapShardV2) -> SnapShard {
        SnapShard {
            dispatch_seq: v2.dispatch_seq,
            users: v2.users,
            idem: v2.idem,
            providers: v2.providers,
            age: v2.age,
            stores: Vec::new(),
            wallet: Vec::new(),
            code_seq: 0,
            codes: Vec::new(),
            coupons: Vec::new(),
            code_terminals: Vec::new(),
        }
    }
}

impl From<SnapShardV5> for SnapShard {
    /// Holds from before format version 6 carry no digest: the first completion of their key
    /// takes them, as it did.
    fn from(v5: SnapShardV5) -> SnapShard {
        let wallet = v5
            .wallet
            .into_iter()
            .map(|p| SnapPurse {
                user: p.user,
                means_id: p.means_id,
                balance_minor: p.balance_minor,
                currency: p.currency,
                holds: p
                    .holds
                    .into_iter()
                    .map(|(owner_hash, client_request_id, amount_minor, expires_ms)| SnapHold {
                        key: (owner_hash, client_request_id),
                        digest: None,
                        amount_minor,
                        expires_ms,
                    })
                    .collect(),
            })
            .collect();
        SnapShard {
            dispatch_seq: v5.dispatch_seq,
            users: v5.users,
            idem: v5.idem,
            providers: v5.providers,
            age: v5.age,
            stores: v5.stores,
            wallet,
            code_seq: v5.code_seq,
            codes: v5.codes,
            coupons: v5.coupons,
            code_terminals: Vec::new(),
        }
    }
}

fn capture_user(key: &UserKey, user: &User) -> SnapUser {
    let devices = user
        .devices
        .iter()
        .map(|d| SnapDevice {
            idm: d.idm,
            key_version: d.key_version,
            replay: d.replay.parts(),
            current: (d.sealed.current.0, sealed_out(&d.sealed.current.1)),
            previous: d.sealed.previous.as_ref().map(|(v, k, until)| (*v, sealed_out(k), *until)),
        })
        .collect();
    let means = user
        .means
        .iter()
        .map(|m| SnapMeans {
            means_id: m.means_id,
            kind: m.kind as u8,
            label: m.label.clone(),
            number: m.number.as_ref().map(|n| LogNumber {
                token: n.token.0,
                last4: n.last4,
                sealed: sealed_out(&n.sealed),
            }),
            uses: m.uses,
            last_used_ms: m.last_used_ms,
            registered_ms: m.registered_ms,
        })
        .collect();
    SnapUser {
        user: user_out(key),
        password_phc: user.password_phc.clone(),
        devices,
        means,
        default_means: user.default_means,
        next_means_id: user.next_means_id,
        failed_logins: user.failed_logins,
        locked_until_ms: user.locked_until_ms,
    }
}

fn capture_reply(
    vault: &crate::vault::Vault,
    reply: &Reply,
    owner_hash: u64,
    crid: u128,
) -> SnapIdemState {
    match reply {
        Reply::Refused(reason) => SnapIdemState::Refused { reason: reason.code() },
        Reply::KeyIssued { key_version, key } => SnapIdemState::KeyIssued {
            key_version: *key_version,
            key: sealed_out(&seal_issued_key(vault, (owner_hash, crid), key)),
        },
        Reply::MeansAdded { means_id, last4 } => {
            SnapIdemState::MeansAdded { means_id: *means_id, last4: *last4 }
        }
        Reply::Auth(outcome) => SnapIdemState::Auth { outcome: outcome_out(outcome) },
        Reply::CodeIssued(c) => SnapIdemState::CodeIssued {
            number: c.number,
            text: c.text.clone(),
            amount_minor: c.amount_minor,
            currency: c.currency.bytes(),
            expires_ms: c.expires_ms,
            deliver_to: c.deliver_to,
            user: user_out(&c.user),
            order_ref: c.order_ref.clone(),
        },
        Reply::Redeemed(r) => SnapIdemState::Redeemed {
            number: r.number,
            currency: r.currency.bytes(),
            provider_code: r.provider_code,
            auth_code: r.auth_code.0,
            redemption: SnapRedemption::from(&**r),
        },
        Reply::CouponIssued(c) => SnapIdemState::CouponIssued {
            number: c.number,
            text: c.text.clone(),
            user: user_out(&c.user),
            effect: coupon_out(&c.effect),
            uses: c.uses,
            expires_ms: c.expires_ms,
        },
        Reply::Balance(b) => SnapIdemState::Balance {
            balance_minor: b.balance_minor,
            available_minor: b.available_minor,
            currency: b.currency.map(|c| c.bytes()),
        },
        Reply::BasketAuth(outcome, verdict) => SnapIdemState::BasketAuth {
            outcome: outcome_out(outcome),
            verdict: verdict_out(verdict),
        },
        // Only the replies above are ever stored as done.
        Reply::Delivered(devices) => SnapIdemState::Delivered { devices: *devices },
        _ => SnapIdemState::Ok,
    }
}

fn restore_idem(i: &ArchivedSnapIdem) -> Result<IdemState, RecordError> {
    Ok(match &i.state {
        ArchivedSnapIdemState::Pending { user, means_id } => {
            IdemState::Pending { user: archived_user_in(user)?, means_id: means_id.to_native() }
        }
        ArchivedSnapIdemState::Ok => IdemState::Done(Reply::Ok),
        ArchivedSnapIdemState::Refused { reason } => IdemState::Done(Reply::Refused(
            ReasonCode::from_code(reason.to_native()).ok_or(RecordError("reason"))?,
        )),
        ArchivedSnapIdemState::KeyIssued { key_version, key } => IdemState::SealedKey {
            key_version: key_version.to_native(),
            sealed: archived_sealed_in(key),
        },
        ArchivedSnapIdemState::MeansAdded { means_id, last4 } => {
            IdemState::Done(Reply::MeansAdded {
                means_id: means_id.to_native(),
                last4: last4.as_ref().copied(),
            })
        }
        ArchivedSnapIdemState::Auth { outcome } => {
            IdemState::Done(Reply::Auth(outcome_in(&owned(outcome)?)?))
        }
        ArchivedSnapIdemState::CodeIssued {
            number,
            text,
            amount_minor,
            currency,
            expires_ms,
            deliver_to,
            user,
            order_ref,
        } => IdemState::Done(Reply::CodeIssued(Box::new(IssuedCode {
            text: text.as_str().to_owned(),
            number: number.to_native(),
            amount_minor: amount_minor.to_native(),
            currency: currency_in(*currency)?,
            expires_ms: expires_ms.to_native(),
            deliver_to: *deliver_to,
            user: archived_user_in(user)?,
            order_ref: order_ref.as_str().to_owned(),
        }))),
        ArchivedSnapIdemState::Redeemed {
            number,
            currency,
            provider_code,
            auth_code,
            redemption,
        } => {
            let r: SnapRedemption = owned(redemption)?;
            IdemState::Done(Reply::Redeemed(Box::new(r.into_redemption(
                number.to_native(),
                currency_in(*currency)?,
                provider_code.to_native(),
                AuthCode(*auth_code),
            ))))
        }
        ArchivedSnapIdemState::CouponIssued { number, text, user, effect, uses, expires_ms } => {
            IdemState::Done(Reply::CouponIssued(Box::new(IssuedCoupon {
                text: text.as_str().to_owned(),
                number: number.to_native(),
                user: archived_user_in(user)?,
                effect: coupon_in(&owned(effect)?)?,
                uses: uses.to_native(),
                expires_ms: expires_ms.to_native(),
            })))
        }
        ArchivedSnapIdemState::Balance { balance_minor, available_minor, currency } => {
            IdemState::Done(Reply::Balance(Balance {
                balance_minor: balance_minor.to_native(),
                available_minor: available_minor.to_native(),
                currency: currency.as_ref().map(|c| currency_in(*c)).transpose()?,
            }))
        }
        ArchivedSnapIdemState::Delivered { devices } => {
            IdemState::Done(Reply::Delivered(devices.to_native()))
        }
        ArchivedSnapIdemState::BasketAuth { outcome, verdict } => {
            IdemState::Done(Reply::BasketAuth(
                outcome_in(&owned(outcome)?)?,
                Box::new(verdict_in(&owned(verdict)?)?),
            ))
        }
    })
}

/// The snapshot file of shard `index`.
pub fn shard_snapshot_path(dir: &Path, index: usize) -> PathBuf {
    dir.join(format!("shard-{index:03}.snap"))
}

/// Encodes a snapshot file: header and payload.
pub(crate) fn encode(
    snapshot: &mut SnapShard,
    index: usize,
    count: usize,
    generation: u64,
) -> Vec<u8> {
    snapshot.sort();
    let payload =
        rkyv::to_bytes::<rkyv::rancor::Error>(snapshot).expect("snapshots always serialize");
    let mut out = Vec::with_capacity(HEADER_LEN + payload.len());
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&FORMAT_VERSION.to_be_bytes());
    out.extend_from_slice(&(index as u16).to_be_bytes());
    out.extend_from_slice(&(count as u32).to_be_bytes());
    out.extend_from_slice(&generation.to_be_bytes());
    out.extend_from_slice(&(payload.len() as u64).to_be_bytes());
    out.extend_from_slice(&crc32fast::hash(&payload).to_be_bytes());
    out.resize(HEADER_LEN, 0);
    out.extend_from_slice(&payload);
    out
}

/// Test hook: rewrites the snapshot file at `path` as format version `version` (3 to 5) wrote
/// it: the payload without what version 6 added (the codes' terminals, the holds' digests),
/// and for version 3 the
/// 36-byte header. Recovery must read it as it reads such a file from an older build.
#[cfg(feature = "test-hooks")]
pub fn rewrite_as_version(path: &Path, version: u16) -> std::io::Result<()> {
    assert!((3..6).contains(&version), "versions 3 to 5 share this layout");
    let bytes = std::fs::read(path)?;
    let mut payload = rkyv::util::AlignedVec::<16>::with_capacity(bytes.len() - HEADER_LEN);
    payload.extend_from_slice(&bytes[HEADER_LEN..]);
    let current = rkyv::from_bytes::<SnapShard, rkyv::rancor::Error>(&payload)
        .map_err(|_| std::io::Error::other("snapshot does not decode"))?;
    let old = SnapShardV5 {
        dispatch_seq: current.dispatch_seq,
        users: current.users,
        idem: current.idem,
        providers: current.providers,
        age: current.age,
        stores: current.stores,
        wallet: current
            .wallet
            .into_iter()
            .map(|p| SnapPurseV5 {
                user: p.user,
                means_id: p.means_id,
                balance_minor: p.balance_minor,
                currency: p.currency,
                holds: p
                    .holds
                    .into_iter()
                    .map(|h| (h.key.0, h.key.1, h.amount_minor, h.expires_ms))
                    .collect(),
            })
            .collect(),
        code_seq: current.code_seq,
        codes: current.codes,
        coupons: current.coupons,
    };
    let payload = rkyv::to_bytes::<rkyv::rancor::Error>(&old).expect("snapshots always serialize");
    let header_len = if version >= 4 { HEADER_LEN } else { HEADER_LEN_V3 };
    let mut out = bytes[..HEADER_LEN_V3].to_vec();
    out[8..10].copy_from_slice(&version.to_be_bytes());
    out[24..32].copy_from_slice(&(payload.len() as u64).to_be_bytes());
    out[32..36].copy_from_slice(&crc32fast::hash(&payload).to_be_bytes());
    out.resize(header_len, 0);
    out.extend_from_slice(&payload);
    std::fs::write(path, out)
}

/// A snapshot file's payload, its checksum verified, aligned: restored by reading the archive
/// in place, without first deserializing it into owned values.
pub(crate) struct Snapshot {
    payload: Payload,
}

/// Where a snapshot's payload lies.
enum Payload {
    /// The file mapped into memory; the payload is `range` of it.
    Mapped { map: memmap2::Mmap, range: std::ops::Range<usize> },
    /// Read into a buffer (files from before format version 4, and payloads converted from
    /// before version 6).
    Read(rkyv::util::AlignedVec<16>),
}

impl Payload {
    fn bytes(&self) -> &[u8] {
        match self {
            Payload::Mapped { map, range } => &map[range.clone()],
            Payload::Read(buffer) => buffer,
        }
    }
}

impl Snapshot {
    /// Restores into a fresh `state` (and the shared indexes). The archive is validated first:
    /// a payload that passed its checksum but does not decode is refused, never trusted.
    pub(crate) fn restore(&self, state: &mut ShardState) -> Result<(), RecordError> {
        let archived = rkyv::access::<ArchivedSnapShard, rkyv::rancor::Error>(self.payload.bytes())
            .map_err(|_| RecordError("snapshot does not decode"))?;
        restore_archived(archived, state)
    }
}

/// A snapshot file's header, checked.
struct Header {
    version: u16,
    generation: u64,
    /// Where the payload starts.
    header_len: usize,
    /// The payload's length, within the file.
    len: usize,
    crc: u32,
}

/// Checks a snapshot's first [`HEADER_LEN_V3`] bytes (`header`) against the shard it is read
/// for and the length of its file.
fn parse_header(
    path: &Path,
    header: &[u8],
    file_len: u64,
    index: usize,
    count: usize,
) -> Result<Header, StorageError> {
    let corrupt = |detail: &str| StorageError::Corrupt {
        path: path.to_owned(),
        offset: 0,
        detail: detail.to_owned(),
    };
    let Some(header) = header.get(..HEADER_LEN_V3) else {
        return Err(corrupt("not a settlegate snapshot"));
    };
    if header[..8] != MAGIC {
        return Err(corrupt("not a settlegate snapshot"));
    }
    let be16 = |at: usize| u16::from_be_bytes([header[at], header[at + 1]]);
    let be64 = |at: usize| u64::from_be_bytes(header[at..at + 8].try_into().expect("8"));
    let version = be16(8);
    if version > FORMAT_VERSION {
        return Err(StorageError::NewerFormat {
            path: path.to_owned(),
            found: version,
            supported: FORMAT_VERSION,
        });
    }
    let file_count = u32::from_be_bytes(header[12..16].try_into().expect("4")) as usize;
    if (be16(10) as usize, file_count) != (index, count) {
        return Err(StorageError::Mismatch {
            path: path.to_owned(),
            detail: "snapshot of another shard layout: the shard count must not change".into(),
        });
    }
    let generation = be64(16);
    let len = be64(24);
    let crc = u32::from_be_bytes(header[32..36].try_into().expect("4"));
    let header_len = if version >= 4 { HEADER_LEN } else { HEADER_LEN_V3 };
    // The length is checked against the file before anything that size is allocated or mapped.
    if file_len < header_len as u64 || len > file_len - header_len as u64 {
        return Err(corrupt("snapshot truncated"));
    }
    Ok(Header { version, generation, header_len, len: len as usize, crc })
}

/// Checks a payload's checksum and converts one of an older layout to the current one.
fn finish(path: &Path, header: &Header, payload: Payload) -> Result<Snapshot, StorageError> {
    let corrupt = |detail: &str| StorageError::Corrupt {
        path: path.to_owned(),
        offset: 0,
        detail: detail.to_owned(),
    };
    if crc32fast::hash(payload.bytes()) != header.crc {
        return Err(corrupt("snapshot checksum mismatch"));
    }
    let upgrade = |old: SnapShard| {
        Payload::Read(
            rkyv::to_bytes::<rkyv::rancor::Error>(&old).expect("snapshots always serialize"),
        )
    };
    let payload = match header.version {
        1 => upgrade(
            rkyv::from_bytes::<SnapShardV1, rkyv::rancor::Error>(payload.bytes())
                .map_err(|_| corrupt("snapshot does not decode"))?
                .into(),
        ),
        2 => upgrade(
            rkyv::from_bytes::<SnapShardV2, rkyv::rancor::Error>(payload.bytes())
                .map_err(|_| corrupt("snapshot does not decode"))?
                .into(),
        ),
        3..=5 => upgrade(
            rkyv::from_bytes::<SnapShardV5, rkyv::rancor::Error>(payload.bytes())
                .map_err(|_| corrupt("snapshot does not decode"))?
                .into(),
        ),
        _ => payload,
    };
    Ok(Snapshot { payload })
}

/// Reads a snapshot from its bytes (`path` only names it in errors): its generation and
/// payload, as [`read`] does from a file.
pub(crate) fn read_bytes(
    path: &Path,
    bytes: &[u8],
    index: usize,
    count: usize,
) -> Result<(u64, Snapshot), StorageError> {
    let header = parse_header(path, bytes, bytes.len() as u64, index, count)?;
    let mut payload = rkyv::util::AlignedVec::<16>::with_capacity(header.len);
    payload.extend_from_slice(&bytes[header.header_len..header.header_len + header.len]);
    let snapshot = finish(path, &header, Payload::Read(payload))?;
    Ok((header.generation, snapshot))
}

/// Reads shard `index`'s snapshot: `None` if there is none, else its generation and payload.
/// Snapshots of older format versions are converted to the current layout.
pub(crate) fn read(
    path: &Path,
    index: usize,
    count: usize,
) -> Result<Option<(u64, Snapshot)>, StorageError> {
    use std::io::Read;
    let io = |source| StorageError::Io { path: path.to_owned(), source };
    let mut file = match std::fs::File::open(path) {
        Ok(file) => file,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => return Err(io(source)),
    };
    let file_len = file.metadata().map_err(io)?.len();
    let mut header = [0u8; HEADER_LEN_V3];
    if file_len < HEADER_LEN_V3 as u64 {
        return Err(StorageError::Corrupt {
            path: path.to_owned(),
            offset: 0,
            detail: "not a settlegate snapshot".into(),
        });
    }
    file.read_exact(&mut header).map_err(io)?;
    let header = parse_header(path, &header, file_len, index, count)?;
    let (header_len, len) = (header.header_len, header.len);
    let payload = if header.version >= 4 {
        // A mapping starts on a page and the header is 48 bytes, so the payload is aligned for
        // the archive (and `rkyv::access` checks it). Populated at once: recovery reads it all.
        // SAFETY: a snapshot file is written whole to a temporary file and renamed into place,
        // never written again, and the data directory is the engine's alone: the mapping does
        // not change under the reader.
        let map = unsafe { memmap2::MmapOptions::new().populate().map(&file) }.map_err(io)?;
        Payload::Mapped { map, range: header_len..header_len + len }
    } else {
        // Read straight into an aligned buffer: rkyv reads the archive in place from there.
        let mut payload = rkyv::util::AlignedVec::<16>::with_capacity(len);
        payload.resize(len, 0);
        file.read_exact(&mut payload).map_err(io)?;
        Payload::Read(payload)
    };
    let snapshot = finish(path, &header, payload)?;
    Ok(Some((header.generation, snapshot)))
}
