//! Device keys: provisioning, rotation with a grace window, and batch tag verification.
//!
//! The index is read-mostly: shards write it when they apply a provisioning or rotation
//! command, and the verification stage reads it from any thread without going through a
//! shard. Each key is kept as a pre-keyed HMAC state so that verifying a tag costs only the
//! message blocks, not the two key blocks.

use std::fmt;
use std::sync::{Arc, OnceLock};

use hmac::{Hmac, Mac};
use rayon::prelude::*;
use sha2::Sha256;
use zeroize::Zeroizing;

use crate::inherent::{InherentId, RecordError, TAG_LEN};
use crate::limits::VERIFY_PARALLEL_MIN;
use crate::types::{Idm, ReasonCode, UserKey};
use crate::vault::{SealedNumber, Vault};
use crate::SharedMap;

/// A 256-bit device key. Its `Debug` never shows the bytes, and it is zeroed on drop.
#[derive(Clone, PartialEq, Eq)]
pub struct DeviceKey(Zeroizing<[u8; 32]>);

impl DeviceKey {
    /// Wraps key bytes.
    pub fn from_bytes(bytes: [u8; 32]) -> DeviceKey {
        DeviceKey(Zeroizing::new(bytes))
    }

    /// A fresh random key from the operating system's generator.
    pub fn random() -> DeviceKey {
        let mut bytes = [0u8; 32];
        rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut bytes);
        DeviceKey::from_bytes(bytes)
    }

    /// The key bytes, to hand to the device once at provisioning.
    pub fn expose(&self) -> &[u8; 32] {
        &self.0
    }
}

impl fmt::Debug for DeviceKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("DeviceKey(<redacted>)")
    }
}

/// One key version of a device. A key installed by a command is open at once; a key loaded from
/// a snapshot stays sealed (as the snapshot holds it) until the device is first used, so that
/// recovery does not decrypt a million keys nobody may present before the next restart.
struct KeySlot {
    version: u16,
    /// The key's pre-keyed HMAC state, once opened; `None` inside if it would not open.
    /// Boxed, as the HMAC state is large: a million devices restored sealed then take a
    /// fraction of the memory (and of the page faults) until they are used.
    open: OnceLock<Option<Box<Hmac<Sha256>>>>,
    /// The key sealed to the IDm as a snapshot gave it (shared with the shard's device), to
    /// open on first use.
    sealed: Option<Arc<SealedNumber>>,
}

/// A device key version as the index holds it, prepared by whoever installs it (a shard
/// replaying its log prepares it and leaves the installing to another thread:
/// `shard::state::RegistryWrite`).
pub(crate) struct PreparedKey(KeySlot);

impl PreparedKey {
    /// Version `version` of a device's key `key`: open at once if `key` is in the clear,
    /// else opened on first use.
    pub(crate) fn of(version: u16, key: &NewDeviceKey) -> PreparedKey {
        PreparedKey(KeySlot::of(version, key))
    }
}

impl KeySlot {
    fn new(version: u16, key: &DeviceKey) -> KeySlot {
        let mac = Hmac::<Sha256>::new_from_slice(key.expose()).expect("HMAC takes any key");
        let open = OnceLock::from(Some(Box::new(mac)));
        KeySlot { version, open, sealed: None }
    }

    fn sealed(version: u16, sealed: &Arc<SealedNumber>) -> KeySlot {
        KeySlot { version, open: OnceLock::new(), sealed: Some(Arc::clone(sealed)) }
    }

    /// The slot of a new key: ready at once when it is in the clear (made now), opened on first
    /// use when it is sealed only (a command replayed from the log: recovery opens no key).
    fn of(version: u16, key: &NewDeviceKey) -> KeySlot {
        match &key.plain {
            Some(plain) => KeySlot::new(version, plain),
            None => KeySlot::sealed(version, &key.sealed),
        }
    }

    /// The HMAC state, opening the sealed key on first use (a key that does not open is
    /// reported once, when first tried).
    fn mac(&self, vault: &Vault, idm: &Idm) -> Option<&Hmac<Sha256>> {
        self.open
            .get_or_init(|| {
                let key =
                    self.sealed.as_ref().and_then(|sealed| open_device_key(vault, sealed, idm));
                if key.is_none() {
                    tracing::error!(
                        "a device key from the snapshot or log does not open under the vault key"
                    );
                }
                let mac =
                    Hmac::<Sha256>::new_from_slice(key?.expose()).expect("HMAC takes any key");
                Some(Box::new(mac))
            })
            .as_deref()
    }
}

/// Opens a device key sealed to `aad` (a device's card IDm, or an enrollment record's key).
pub(crate) fn open_device_key(
    vault: &Vault,
    sealed: &SealedNumber,
    aad: &[u8],
) -> Option<DeviceKey> {
    let plain = vault.open(sealed, aad)?;
    let bytes: [u8; 32] = plain.as_slice().try_into().ok()?;
    Some(DeviceKey::from_bytes(bytes))
}

/// The end of the grace window of a revoked key: refused from the start, whatever the clock.
pub(crate) const REVOKED: i64 = i64::MIN;

/// A device's keys sealed to its IDm, as its shard keeps them for snapshots: the current
/// version, and the rotated-out one with the instant (ms) after which it is refused
/// ([`REVOKED`] for a key revoked at once).
#[derive(Debug, Clone, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub(crate) struct SealedKeys {
    #[rkyv(with = crate::shard::archive::Via<(u16, SealedNumber)>)]
    pub(crate) current: (u16, Arc<SealedNumber>),
    #[rkyv(with = rkyv::with::Map<crate::shard::archive::Via<(u16, SealedNumber, i64)>>)]
    pub(crate) previous: Option<(u16, Arc<SealedNumber>, i64)>,
}

/// A device key on its way into its user's shard, in a command: sealed to the device's IDm
/// under the vault key, as the command's log record keeps it (and, from then on, the shard's
/// state and snapshots: the key is sealed once); in the clear only in memory, for the answer
/// to the request that made it and the key index, and never archived.
#[derive(Debug, Clone, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub(crate) struct NewDeviceKey {
    #[rkyv(with = crate::shard::archive::Via<SealedNumber>)]
    pub(crate) sealed: Arc<SealedNumber>,
    /// None once read back from the log.
    #[rkyv(with = rkyv::with::Skip)]
    pub(crate) plain: Option<DeviceKey>,
}

impl NewDeviceKey {
    /// A fresh random key for device `idm`, sealed to it.
    pub(crate) fn random(vault: &Vault, idm: &Idm) -> NewDeviceKey {
        let key = DeviceKey::random();
        NewDeviceKey { sealed: Arc::new(vault.seal(key.expose(), idm)), plain: Some(key) }
    }
}

impl SealedKeys {
    /// A device's first key.
    pub(crate) fn first(key: &NewDeviceKey) -> SealedKeys {
        SealedKeys { current: (1, Arc::clone(&key.sealed)), previous: None }
    }

    /// Whether a record signed with key `version` may still be accepted: the current key, or
    /// the rotated-out one unless it was revoked. (The grace window's end is checked against
    /// the clock by the verifier; this is for the shard, which applies in order with
    /// revocations, so that a payment verified just before its key was revoked is refused.)
    pub(crate) fn accepts(&self, version: u16) -> bool {
        self.current.0 == version
            || self
                .previous
                .as_ref()
                .is_some_and(|(v, _, until)| *v == version && *until != REVOKED)
    }

    /// After a rotation to `key` at `version`: the current key becomes the previous one.
    pub(crate) fn rotated(
        &self,
        version: u16,
        key: &NewDeviceKey,
        grace_until_ms: i64,
    ) -> SealedKeys {
        let (old_version, old) = &self.current;
        SealedKeys {
            current: (version, Arc::clone(&key.sealed)),
            previous: Some((*old_version, Arc::clone(old), grace_until_ms)),
        }
    }
}

struct DeviceEntry {
    user: UserKey,
    current: KeySlot,
    /// The rotated-out key and the instant (ms) after which it is refused (boxed: rare).
    previous: Option<Box<(KeySlot, i64)>>,
}

/// Card IDm to device keys, shared by the shards (writers) and the verifiers (readers).
pub struct DeviceIndex {
    /// Boxed: an entry holds two HMAC states, and a growing table moves only the pointers.
    devices: SharedMap<Idm, Box<DeviceEntry>>,
    /// IDms claimed for a device being provisioned, not yet in `devices`
    /// ([`DeviceIndex::claim`]).
    claims: SharedMap<Idm, UserKey>,
    /// Opens keys loaded sealed from a snapshot.
    vault: Arc<Vault>,
}

/// A record whose tag verified: its fields and the body it was computed over.
#[derive(Debug, Clone, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct Verified {
    /// The decoded record.
    pub record: InherentId,
    /// The verified tag. It is a MAC over every field, so it identifies the request's content
    /// for idempotency without hashing the record a second time.
    pub digest: [u8; 32],
}

impl DeviceIndex {
    /// An empty index; `vault` opens the keys that snapshots carry.
    pub fn new(vault: Arc<Vault>) -> DeviceIndex {
        DeviceIndex { devices: SharedMap::default(), claims: SharedMap::default(), vault }
    }

    /// Claims `idm` for a device of `user` about to be provisioned: true if no device has it
    /// and no other provisioning holds it (atomically: two shards racing for one IDm cannot
    /// both win). The claim's outcome goes into the command, so the shard applying it reads
    /// nothing outside itself; the caller [`release`](Self::release)s a claim it won once the
    /// command is applied, whatever its outcome.
    pub(crate) fn claim(&self, idm: Idm, user: &UserKey) -> bool {
        if self.devices.contains_key(&idm) {
            return false;
        }
        match self.claims.entry(idm) {
            dashmap::Entry::Occupied(_) => false,
            dashmap::Entry::Vacant(vacant) => {
                vacant.insert(user.clone());
                // Provisioned between the check above and the claim: not free.
                if self.devices.contains_key(&idm) {
                    self.claims.remove(&idm);
                    return false;
                }
                true
            }
        }
    }

    /// Ends a claim won by [`claim`](Self::claim).
    pub(crate) fn release(&self, idm: &Idm) {
        self.claims.remove(idm);
    }

    /// Installs the first key of a device (applied by the owning user's shard, once the IDm
    /// was claimed for it). An IDm provisioned already is left as it is.
    pub(crate) fn provision_prepared(&self, idm: Idm, user: UserKey, key: PreparedKey) {
        if let dashmap::Entry::Vacant(vacant) = self.devices.entry(idm) {
            vacant.insert(Box::new(DeviceEntry { user, current: key.0, previous: None }));
        }
    }

    /// Replaces a device's key; the previous key stays valid until `grace_until_ms`.
    pub(crate) fn rotate_prepared(&self, idm: &Idm, key: PreparedKey, grace_until_ms: i64) {
        if let Some(mut entry) = self.devices.get_mut(idm) {
            let old = std::mem::replace(&mut entry.current, key.0);
            entry.previous = Some(Box::new((old, grace_until_ms)));
        }
    }

    /// Installs a device's keys from a snapshot, still sealed: each opens on first use.
    pub(crate) fn import_sealed(&self, idm: Idm, user: UserKey, keys: &SealedKeys) {
        let entry = DeviceEntry {
            user,
            current: KeySlot::sealed(keys.current.0, &keys.current.1),
            previous: keys
                .previous
                .as_ref()
                .map(|(v, sealed, until)| Box::new((KeySlot::sealed(*v, sealed), *until))),
        };
        self.devices.insert(idm, Box::new(entry));
    }

    /// Whether a device with this IDm exists.
    pub fn contains(&self, idm: &Idm) -> bool {
        self.devices.contains_key(idm)
    }

    /// Verifies one signed record at `now_ms`: decodes it, finds the device key by card IDm
    /// and key version, and checks the HMAC-SHA256 tag in constant time.
    pub fn verify(&self, bytes: &[u8], now_ms: i64) -> Result<Verified, ReasonCode> {
        let (record, body, tag) = InherentId::decode(bytes).map_err(|error| match error {
            RecordError::Field("amount") => ReasonCode::InvalidAmount,
            _ => ReasonCode::Malformed,
        })?;
        self.verify_tag(&record.card_idm, &record.user, record.key_version, body, tag, now_ms)?;
        Ok(Verified { record, digest: *tag })
    }

    /// Checks `tag` over `body` with the key of device `idm` at `key_version`, in constant
    /// time: the device must belong to `user`, and a rotated-out key must be within its grace
    /// window. Every signed record type (inherent IDs, age registrations) goes through here.
    pub(crate) fn verify_tag(
        &self,
        idm: &Idm,
        user: &UserKey,
        key_version: u16,
        body: &[u8],
        tag: &[u8; TAG_LEN],
        now_ms: i64,
    ) -> Result<(), ReasonCode> {
        let mut mac = {
            let entry = self.devices.get(idm).ok_or(ReasonCode::UnknownDevice)?;
            if entry.user != *user {
                return Err(ReasonCode::UserDeviceMismatch);
            }
            let slot = if entry.current.version == key_version {
                &entry.current
            } else {
                match entry.previous.as_deref() {
                    Some((slot, until_ms)) if slot.version == key_version => {
                        if now_ms >= *until_ms {
                            return Err(ReasonCode::KeyVersionInvalid);
                        }
                        slot
                    }
                    _ => return Err(ReasonCode::KeyVersionInvalid),
                }
            };
            // A key that does not open cannot verify anything: as good as no key.
            slot.mac(&self.vault, idm).ok_or(ReasonCode::UnknownDevice)?.clone()
        };
        mac.update(body);
        // `verify_slice` compares in constant time (the `subtle` crate underneath).
        mac.verify_slice(tag).map_err(|_| ReasonCode::ForgedTag)
    }

    /// Verifies a batch; large batches are spread over the rayon pool's cores.
    pub fn verify_batch<B: AsRef<[u8]> + Sync>(
        &self,
        records: &[B],
        now_ms: i64,
    ) -> Vec<Result<Verified, ReasonCode>> {
        if records.len() >= VERIFY_PARALLEL_MIN {
            records
                .par_iter()
                .with_min_len(VERIFY_PARALLEL_MIN / 2)
                .map(|bytes| self.verify(bytes.as_ref(), now_ms))
                .collect()
        } else {
            records.iter().map(|bytes| self.verify(bytes.as_ref(), now_ms)).collect()
        }
    }
}
