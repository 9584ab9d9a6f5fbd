//! G1 accounts, applied in the user's shard: enrollment, devices and their keys, settlement means, login attempts.

use super::*;
use crate::keys::PreparedKey;

flow_reply! {
    /// What the accounts flow answers, besides [`Reply::Done`] and a refusal.
    pub(crate) enum AccountsReply in Accounts {
        /// A device's new key: enrollment, provisioning, rotation.
        KeyIssued(IssuedKey),
        /// A means registered.
        MeansAdded(AddedMeans),
        /// The user's means (a query).
        Means(Vec<MeansView>),
        /// The user's password hash, to check a login against (a query).
        Credentials(Credentials),
        /// The card IDms of the user's devices (a query).
        Devices(Vec<Idm>),
    }
}

/// A device key issued: its version and the key, in the clear when the command made it now,
/// sealed only when the command was replayed from the log (nobody reads that answer; recovery
/// opens no key).
#[derive(Debug, Clone)]
pub(crate) struct IssuedKey {
    pub(crate) key_version: u16,
    pub(crate) key: NewDeviceKey,
}

/// A means registered: its ID, and the last four digits of its number if it has one.
#[derive(Debug, Clone, Copy)]
pub(crate) struct AddedMeans {
    pub(crate) means_id: u32,
    pub(crate) last4: Option<[u8; 4]>,
}

/// What a login is checked against.
#[derive(Debug, Clone)]
pub(crate) struct Credentials {
    pub(crate) password_phc: String,
}

impl ShardState {
    pub(super) fn enroll(
        &mut self,
        user: UserKey,
        password_phc: String,
        idm: Idm,
        key: NewDeviceKey,
        device_free: bool,
    ) -> Result<IssuedKey, ReasonCode> {
        if self.users.contains_key(&user) {
            return Err(ReasonCode::UserExists);
        }
        if !device_free {
            return Err(ReasonCode::DeviceInUse);
        }
        let prepared = PreparedKey::of(1, &key);
        RegistryWrite::Provision { idm, user: user.clone(), key: prepared }
            .make(&mut self.deferred, &self.shared);
        let sealed = SealedKeys::first(&key);
        let account = User {
            password_phc,
            devices: vec![Device { idm, key_version: 1, replay: ReplayWindow::default(), sealed }],
            means: Vec::new(),
            default_means: None,
            next_means_id: 1,
            failed_logins: 0,
            locked_until_ms: i64::MIN,
        };
        self.users.insert(user, Arc::new(account));
        Ok(IssuedKey { key_version: 1, key })
    }

    pub(super) fn provision_device(
        &mut self,
        user: UserKey,
        idm: Idm,
        key: NewDeviceKey,
        device_free: bool,
    ) -> Result<IssuedKey, ReasonCode> {
        let Some(account) = self.users.get_mut(&user).map(Arc::make_mut) else {
            return Err(ReasonCode::UnknownUser);
        };
        if account.devices.len() >= DEVICES_PER_USER_MAX {
            return Err(ReasonCode::TooManyDevices);
        }
        if !device_free {
            return Err(ReasonCode::DeviceInUse);
        }
        let prepared = PreparedKey::of(1, &key);
        RegistryWrite::Provision { idm, user, key: prepared }
            .make(&mut self.deferred, &self.shared);
        account.devices.push(Device {
            idm,
            key_version: 1,
            replay: ReplayWindow::default(),
            sealed: SealedKeys::first(&key),
        });
        Ok(IssuedKey { key_version: 1, key })
    }

    /// Replaces a device's key with `key`; the previous one is accepted until
    /// `grace_until_ms` ([`REVOKED`]: never again).
    pub(super) fn rotate_device_key(
        &mut self,
        user: &UserKey,
        idm: Idm,
        key: NewDeviceKey,
        grace_until_ms: i64,
    ) -> Result<IssuedKey, ReasonCode> {
        let Some(account) = self.users.get_mut(user).map(Arc::make_mut) else {
            return Err(ReasonCode::UnknownUser);
        };
        let Some(device) = account.devices.iter_mut().find(|d| d.idm == idm) else {
            return Err(ReasonCode::UnknownDevice);
        };
        let Some(version) = device.key_version.checked_add(1) else {
            return Err(ReasonCode::KeyVersionInvalid);
        };
        device.key_version = version;
        device.sealed = device.sealed.rotated(version, &key, grace_until_ms);
        let key_prepared = PreparedKey::of(version, &key);
        RegistryWrite::Rotate { idm, key: key_prepared, grace_until_ms }
            .make(&mut self.deferred, &self.shared);
        Ok(IssuedKey { key_version: version, key })
    }

    pub(super) fn add_means(
        &mut self,
        user: &UserKey,
        means: NewMeans,
        make_default: bool,
        now_ms: i64,
    ) -> Result<AddedMeans, ReasonCode> {
        let Some(account) = self.users.get_mut(user).map(Arc::make_mut) else {
            return Err(ReasonCode::UnknownUser);
        };
        if account.means.len() >= MEANS_PER_USER_MAX {
            return Err(ReasonCode::TooManyMeans);
        }
        let means_id = account.next_means_id;
        account.next_means_id += 1;
        let number = means.sealed.map(|(token, last4, sealed)| {
            StoredNumber::kept(token, last4, sealed, |token, sealed| {
                RegistryWrite::Store { token, sealed }.make(&mut self.deferred, &self.shared)
            })
        });
        let last4 = number.as_ref().map(|n| n.last4);
        // Grown one at a time (a user has a few means at most, `MEANS_PER_USER_MAX`): a first
        // push would otherwise make room for four, about 400 unused bytes for each of a
        // million users, all written once (page faults at recovery).
        account.means.reserve_exact(1);
        account.means.push(StoredMeans {
            means_id,
            kind: means.kind,
            label: means.label,
            number,
            uses: 0,
            last_used_ms: None,
            registered_ms: now_ms,
            purse: (means.kind == MeansKind::EMoney).then(Purse::default),
        });
        if make_default || account.default_means.is_none() {
            account.default_means = Some(means_id);
        }
        Ok(AddedMeans { means_id, last4 })
    }

    pub(super) fn set_default_means(
        &mut self,
        user: &UserKey,
        means_id: u32,
    ) -> Result<(), ReasonCode> {
        let Some(account) = self.users.get_mut(user).map(Arc::make_mut) else {
            return Err(ReasonCode::UnknownUser);
        };
        if !account.means.iter().any(|m| m.means_id == means_id) {
            return Err(ReasonCode::MeansNotRegistered);
        }
        account.default_means = Some(means_id);
        Ok(())
    }

    pub(super) fn login_attempt(
        &mut self,
        user: &UserKey,
        success: bool,
        now_ms: i64,
    ) -> Result<(), ReasonCode> {
        let Some(account) = self.users.get_mut(user).map(Arc::make_mut) else {
            return Err(ReasonCode::UnknownUser);
        };
        if now_ms < account.locked_until_ms {
            return Err(ReasonCode::UserLocked);
        }
        if success {
            account.failed_logins = 0;
            return Ok(());
        }
        account.failed_logins += 1;
        if account.failed_logins >= self.config.login_failures_max {
            account.failed_logins = 0;
            account.locked_until_ms = now_ms.saturating_add(self.config.lockout_ms);
        }
        Err(ReasonCode::WrongPassword)
    }
}
