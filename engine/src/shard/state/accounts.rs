//! G1 accounts, applied in the user's shard: enrollment, devices and their keys, settlement means, login attempts.

use super::*;

impl ShardState {
    pub(super) fn enroll(
        &mut self,
        user: UserKey,
        password_phc: String,
        idm: Idm,
        key: NewDeviceKey,
        device_free: bool,
    ) -> Reply {
        if self.users.contains_key(&user) {
            return Reply::Refused(ReasonCode::UserExists);
        }
        if !device_free {
            return Reply::Refused(ReasonCode::DeviceInUse);
        }
        self.shared.devices.provision(idm, user.clone(), 1, &key);
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
        Reply::KeyIssued { key_version: 1, key }
    }

    pub(super) fn provision_device(
        &mut self,
        user: UserKey,
        idm: Idm,
        key: NewDeviceKey,
        device_free: bool,
    ) -> Reply {
        let Some(account) = self.users.get_mut(&user).map(Arc::make_mut) else {
            return Reply::Refused(ReasonCode::UnknownUser);
        };
        if account.devices.len() >= DEVICES_PER_USER_MAX {
            return Reply::Refused(ReasonCode::TooManyDevices);
        }
        if !device_free {
            return Reply::Refused(ReasonCode::DeviceInUse);
        }
        self.shared.devices.provision(idm, user, 1, &key);
        account.devices.push(Device {
            idm,
            key_version: 1,
            replay: ReplayWindow::default(),
            sealed: SealedKeys::first(&key),
        });
        Reply::KeyIssued { key_version: 1, key }
    }

    /// Replaces a device's key with `key`; the previous one is accepted until
    /// `grace_until_ms` ([`REVOKED`]: never again).
    pub(super) fn rotate_device_key(
        &mut self,
        user: &UserKey,
        idm: Idm,
        key: NewDeviceKey,
        grace_until_ms: i64,
    ) -> Reply {
        let Some(account) = self.users.get_mut(user).map(Arc::make_mut) else {
            return Reply::Refused(ReasonCode::UnknownUser);
        };
        let Some(device) = account.devices.iter_mut().find(|d| d.idm == idm) else {
            return Reply::Refused(ReasonCode::UnknownDevice);
        };
        let Some(version) = device.key_version.checked_add(1) else {
            return Reply::Refused(ReasonCode::KeyVersionInvalid);
        };
        device.key_version = version;
        device.sealed = device.sealed.rotated(version, &key, grace_until_ms);
        self.shared.devices.rotate(&idm, version, &key, grace_until_ms);
        Reply::KeyIssued { key_version: version, key }
    }

    pub(super) fn add_means(
        &mut self,
        user: &UserKey,
        means: NewMeans,
        make_default: bool,
        now_ms: i64,
    ) -> Reply {
        let Some(account) = self.users.get_mut(user).map(Arc::make_mut) else {
            return Reply::Refused(ReasonCode::UnknownUser);
        };
        if account.means.len() >= MEANS_PER_USER_MAX {
            return Reply::Refused(ReasonCode::TooManyMeans);
        }
        let means_id = account.next_means_id;
        account.next_means_id += 1;
        let number = means.sealed.map(|(token, last4, sealed)| {
            StoredNumber::kept(&self.shared.vault, token, last4, sealed)
        });
        let last4 = number.as_ref().map(|n| n.last4);
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
        Reply::MeansAdded { means_id, last4 }
    }

    pub(super) fn set_default_means(&mut self, user: &UserKey, means_id: u32) -> Reply {
        let Some(account) = self.users.get_mut(user).map(Arc::make_mut) else {
            return Reply::Refused(ReasonCode::UnknownUser);
        };
        if !account.means.iter().any(|m| m.means_id == means_id) {
            return Reply::Refused(ReasonCode::MeansNotRegistered);
        }
        account.default_means = Some(means_id);
        Reply::Ok
    }

    pub(super) fn login_attempt(&mut self, user: &UserKey, success: bool, now_ms: i64) -> Reply {
        let Some(account) = self.users.get_mut(user).map(Arc::make_mut) else {
            return Reply::Refused(ReasonCode::UnknownUser);
        };
        if now_ms < account.locked_until_ms {
            return Reply::Refused(ReasonCode::UserLocked);
        }
        if success {
            account.failed_logins = 0;
            return Reply::Ok;
        }
        account.failed_logins += 1;
        if account.failed_logins >= self.config.login_failures_max {
            account.failed_logins = 0;
            account.locked_until_ms = now_ms.saturating_add(self.config.lockout_ms);
        }
        Reply::Refused(ReasonCode::WrongPassword)
    }
}
