//! Snapshots of format versions 1 to 6, read only: their own archived types (`Snap*`, with
//! the log's leaf types `Log*` of `wal/record.rs`), converted into a fresh shard's state on
//! first open. From format version 7 a snapshot holds the shard's state types themselves
//! (`shard/image.rs`), and nothing writes these any more; the first snapshot a shard writes
//! after such a start is of the new format.
//!
//! Version 1 lacks the age section, version 2 the stores, wallet, codes and coupons, versions 3
//! to 5 the holds' digests and the codes' terminals: each is converted to version 6's layout,
//! then restored.

use std::collections::BTreeSet;

use rkyv::{Archive, Deserialize, Serialize};

use super::idempotency::{IdemState, Idempotency, KeptReply};
use super::image::restore_maps;
use super::replay::ReplayWindow;
use super::state::{
    Balance, CodeRecord, CodeState, CouponRecord, Device, IssuedCode, IssuedCoupon, Purse,
    PurseHold, Redemption, ShardState, Shared, StoredMeans, StoredNumber, User,
};
use crate::age::{AgeRegistration, VerificationMethod};
use crate::cow::CowMap;
use crate::keys::{open_device_key, SealedKeys};
use crate::types::{AuthCode, CardToken, MeansKind, ReasonCode, UserKey};
use crate::wal::record::{
    archived_sealed_in, archived_user_in, coupon_in, currency_in, outcome_in, policy_in, store_in,
    terminal_in, verdict_in, LogAgePolicy, LogCoupon, LogNumber, LogOutcome, LogSealed, LogStore,
    LogTerminal, LogUser, LogVerdict, RecordError,
};

/// Restores a snapshot payload of format `version` (1 to 6) into a fresh `state` (and the
/// shared indexes). The archive is validated first: a payload that passed its checksum but
/// does not decode is refused, never trusted.
pub(crate) fn restore(
    version: u16,
    payload: &[u8],
    state: &mut ShardState,
) -> Result<(), RecordError> {
    const UNDECODABLE: RecordError = RecordError("snapshot does not decode");
    let upgrade =
        |old: SnapShard| rkyv::to_bytes::<rkyv::rancor::Error>(&old).map_err(|_| UNDECODABLE);
    let converted = match version {
        1 => upgrade(
            rkyv::from_bytes::<SnapShardV1, rkyv::rancor::Error>(payload)
                .map_err(|_| UNDECODABLE)?
                .into(),
        )?,
        2 => upgrade(
            rkyv::from_bytes::<SnapShardV2, rkyv::rancor::Error>(payload)
                .map_err(|_| UNDECODABLE)?
                .into(),
        )?,
        3..=5 => upgrade(
            rkyv::from_bytes::<SnapShardV5, rkyv::rancor::Error>(payload)
                .map_err(|_| UNDECODABLE)?
                .into(),
        )?,
        6 => {
            let archived = rkyv::access::<ArchivedSnapShard, rkyv::rancor::Error>(payload)
                .map_err(|_| UNDECODABLE)?;
            return restore_archived(archived, state);
        }
        _ => return Err(RecordError("not a snapshot format this module reads")),
    };
    let archived = rkyv::access::<ArchivedSnapShard, rkyv::rancor::Error>(&converted)
        .map_err(|_| UNDECODABLE)?;
    restore_archived(archived, state)
}

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

/// Restores a snapshot, read in place from its archive, into a fresh `state` (and the shared
/// indexes). Device keys and the keys in enrollment records stay sealed until first used.
fn restore_archived(snap: &ArchivedSnapShard, state: &mut ShardState) -> Result<(), RecordError> {
    state.dispatch_seq = snap.dispatch_seq.to_native();
    state.code_seq = snap.code_seq.to_native();
    restore_maps(
        state,
        |users, shared| restore_users(snap, users, shared),
        |idem| restore_idem_records(snap, idem),
        |codes| restore_codes(snap, codes.codes, codes.expiry, codes.coupons),
    )?;
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
                    CardToken(n.token),
                    n.last4,
                    archived_sealed_in(&n.sealed),
                    |token, sealed| vault.store(token, sealed),
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

fn restore_idem(i: &ArchivedSnapIdem) -> Result<IdemState, RecordError> {
    Ok(match &i.state {
        ArchivedSnapIdemState::Pending { user, means_id } => {
            IdemState::Pending { user: archived_user_in(user)?, means_id: means_id.to_native() }
        }
        ArchivedSnapIdemState::Ok => IdemState::Done(KeptReply::Ok),
        ArchivedSnapIdemState::Refused { reason } => IdemState::Done(KeptReply::Refused(
            ReasonCode::from_code(reason.to_native()).ok_or(RecordError("reason"))?,
        )),
        ArchivedSnapIdemState::KeyIssued { key_version, key } => IdemState::SealedKey {
            key_version: key_version.to_native(),
            sealed: archived_sealed_in(key),
        },
        ArchivedSnapIdemState::MeansAdded { means_id, last4 } => {
            IdemState::Done(KeptReply::MeansAdded {
                means_id: means_id.to_native(),
                last4: last4.as_ref().copied(),
            })
        }
        ArchivedSnapIdemState::Auth { outcome } => {
            IdemState::Done(KeptReply::Auth(outcome_in(&owned(outcome)?)?))
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
        } => IdemState::Done(KeptReply::CodeIssued(IssuedCode {
            text: text.as_str().to_owned(),
            number: number.to_native(),
            amount_minor: amount_minor.to_native(),
            currency: currency_in(*currency)?,
            expires_ms: expires_ms.to_native(),
            deliver_to: *deliver_to,
            user: archived_user_in(user)?,
            order_ref: order_ref.as_str().to_owned(),
        })),
        ArchivedSnapIdemState::Redeemed {
            number,
            currency,
            provider_code,
            auth_code,
            redemption,
        } => {
            let r: SnapRedemption = owned(redemption)?;
            IdemState::Done(KeptReply::Redeemed(r.into_redemption(
                number.to_native(),
                currency_in(*currency)?,
                provider_code.to_native(),
                AuthCode(*auth_code),
            )))
        }
        ArchivedSnapIdemState::CouponIssued { number, text, user, effect, uses, expires_ms } => {
            IdemState::Done(KeptReply::CouponIssued(IssuedCoupon {
                text: text.as_str().to_owned(),
                number: number.to_native(),
                user: archived_user_in(user)?,
                effect: coupon_in(&owned(effect)?)?,
                uses: uses.to_native(),
                expires_ms: expires_ms.to_native(),
            }))
        }
        ArchivedSnapIdemState::Balance { balance_minor, available_minor, currency } => {
            IdemState::Done(KeptReply::Balance(Balance {
                balance_minor: balance_minor.to_native(),
                available_minor: available_minor.to_native(),
                currency: currency.as_ref().map(|c| currency_in(*c)).transpose()?,
            }))
        }
        ArchivedSnapIdemState::Delivered { devices } => {
            IdemState::Done(KeptReply::Delivered(devices.to_native()))
        }
        ArchivedSnapIdemState::BasketAuth { outcome, verdict } => IdemState::Done(
            KeptReply::BasketAuth(outcome_in(&owned(outcome)?)?, verdict_in(&owned(verdict)?)?),
        ),
    })
}
