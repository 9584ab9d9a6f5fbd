//! A1–A3 age: a user terminal's age registration (in the user's shard) and a store terminal's age policy (in its provider's shard).

use super::*;

impl ShardState {
    /// A1: keeps a terminal's age registration, after the checks that need the user's state
    /// (the tag was verified before the command was made).
    pub(super) fn register_age(&mut self, record: AgeRecord, now_ms: i64) -> Reply {
        let Some(account) = self.users.get_mut(&record.user).map(Arc::make_mut) else {
            return Reply::Refused(ReasonCode::UnknownUser);
        };
        let Some(device) = account.devices.iter_mut().find(|d| d.idm == record.card_idm) else {
            return Reply::Refused(ReasonCode::UserDeviceMismatch);
        };
        if (now_ms - record.timestamp_ms).abs() > self.config.timestamp_window_ms {
            return Reply::Refused(ReasonCode::StaleTimestamp);
        }
        if !device.replay.fresh(record.counter) {
            return Reply::Refused(ReasonCode::ReplayedNonce);
        }
        device.replay.record(record.counter);
        let validity_max_ms = self.shared.age.config.validity_max_ms();
        let too_long = record.valid_until_ms.saturating_sub(now_ms) > validity_max_ms;
        if too_long {
            return Reply::Refused(ReasonCode::InvalidAgeRegistration);
        }
        if let Err(reason) = record.validate(now_ms, self.config.timestamp_window_ms) {
            return Reply::Refused(reason);
        }
        self.ages.insert(
            record.card_idm,
            AgeRegistration {
                birth_date: record.birth_date,
                method: record.method,
                verified_at_ms: record.verified_at_ms,
                valid_until_ms: record.valid_until_ms,
            },
        );
        Reply::Ok
    }

    pub(super) fn set_age_policy(
        &mut self,
        provider_code: u32,
        terminal_id: &str,
        policy: Option<&AgePolicy>,
    ) -> Reply {
        let Some(provider) = self.shared.registry.provider(provider_code) else {
            return Reply::Refused(ReasonCode::UnknownProvider);
        };
        let resolved = match policy.map(|p| self.shared.age.config.resolve(p)).transpose() {
            Ok(resolved) => resolved,
            Err(reason) => return Reply::Refused(reason),
        };
        self.owned_providers.insert(provider_code);
        match provider.set_age_policy(terminal_id, resolved) {
            Ok(()) => Reply::Ok,
            Err(reason) => Reply::Refused(reason),
        }
    }
}
