//! Device keys: provisioning, rotation with a grace window, and batch tag verification.
//!
//! The index is read-mostly: shards write it when they apply a provisioning or rotation
//! command, and the verification stage reads it from any thread without going through a
//! shard. Each key is kept as a pre-keyed HMAC state so that verifying a tag costs only the
//! message blocks, not the two key blocks.

use std::fmt;

use dashmap::DashMap;
use hmac::{Hmac, Mac};
use rayon::prelude::*;
use sha2::Sha256;
use zeroize::Zeroizing;

use crate::inherent::{InherentId, RecordError, TAG_LEN};
use crate::limits::VERIFY_PARALLEL_MIN;
use crate::types::{Idm, ReasonCode, UserKey};

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

#[derive(Clone)]
struct KeySlot {
    version: u16,
    mac: Hmac<Sha256>,
    /// The key itself, kept for snapshots (which seal it before it leaves memory).
    key: DeviceKey,
}

impl KeySlot {
    fn new(version: u16, key: &DeviceKey) -> KeySlot {
        let mac = Hmac::<Sha256>::new_from_slice(key.expose()).expect("HMAC takes any key");
        KeySlot { version, mac, key: key.clone() }
    }
}

/// A device's keys, as a snapshot carries them.
#[derive(Debug, Clone)]
pub(crate) struct DeviceKeys {
    pub(crate) user: UserKey,
    pub(crate) current: (u16, DeviceKey),
    pub(crate) previous: Option<(u16, DeviceKey, i64)>,
}

struct DeviceEntry {
    user: UserKey,
    current: KeySlot,
    /// The rotated-out key and the instant (ms) after which it is refused.
    previous: Option<(KeySlot, i64)>,
}

/// Card IDm to device keys, shared by the shards (writers) and the verifiers (readers).
#[derive(Default)]
pub struct DeviceIndex {
    devices: DashMap<Idm, DeviceEntry>,
}

/// A record whose tag verified: its fields and the body it was computed over.
#[derive(Debug, Clone)]
pub struct Verified {
    /// The decoded record.
    pub record: InherentId,
    /// The verified tag. It is a MAC over every field, so it identifies the request's content
    /// for idempotency without hashing the record a second time.
    pub digest: [u8; 32],
}

impl DeviceIndex {
    /// Installs the first key of a device (applied by the owning user's shard). Returns false,
    /// changing nothing, if the IDm is provisioned already (atomically: two shards racing for
    /// one IDm cannot both win).
    pub(crate) fn provision(&self, idm: Idm, user: UserKey, version: u16, key: &DeviceKey) -> bool {
        match self.devices.entry(idm) {
            dashmap::Entry::Occupied(_) => false,
            dashmap::Entry::Vacant(vacant) => {
                vacant.insert(DeviceEntry {
                    user,
                    current: KeySlot::new(version, key),
                    previous: None,
                });
                true
            }
        }
    }

    /// Replaces a device's key; the previous key stays valid until `grace_until_ms`.
    pub(crate) fn rotate(&self, idm: &Idm, version: u16, key: &DeviceKey, grace_until_ms: i64) {
        if let Some(mut entry) = self.devices.get_mut(idm) {
            let old = std::mem::replace(&mut entry.current, KeySlot::new(version, key));
            entry.previous = Some((old, grace_until_ms));
        }
    }

    /// A device's keys, for a snapshot.
    pub(crate) fn export(&self, idm: &Idm) -> Option<DeviceKeys> {
        let entry = self.devices.get(idm)?;
        Some(DeviceKeys {
            user: entry.user.clone(),
            current: (entry.current.version, entry.current.key.clone()),
            previous: entry
                .previous
                .as_ref()
                .map(|(slot, until)| (slot.version, slot.key.clone(), *until)),
        })
    }

    /// Installs a device's keys from a snapshot.
    pub(crate) fn import(&self, idm: Idm, keys: &DeviceKeys) {
        let entry = DeviceEntry {
            user: keys.user.clone(),
            current: KeySlot::new(keys.current.0, &keys.current.1),
            previous: keys.previous.as_ref().map(|(v, key, until)| (KeySlot::new(*v, key), *until)),
        };
        self.devices.insert(idm, entry);
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
            if entry.current.version == key_version {
                entry.current.mac.clone()
            } else {
                match &entry.previous {
                    Some((slot, until_ms)) if slot.version == key_version => {
                        if now_ms >= *until_ms {
                            return Err(ReasonCode::KeyVersionInvalid);
                        }
                        slot.mac.clone()
                    }
                    _ => return Err(ReasonCode::KeyVersionInvalid),
                }
            }
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
