//! A1–A3 age: a user terminal's age registration (in the user's shard) and a store terminal's age policy (in its provider's shard).

use super::*;

impl ShardState {
    /// A1: keeps a terminal's age registration, after the checks that need the user's state
    /// (the tag was verified before the command was made).
    pub(super) fn register_age(
        &mut self,
        record: AgeRecord,
        now_ms: i64,
    ) -> Result<(), ReasonCode> {
        let Some(account) = self.users.get_mut(&record.user).map(Arc::make_mut) else {
            return Err(ReasonCode::UnknownUser);
        };
        let Some(device) = account.devices.iter_mut().find(|d| d.idm == record.card_idm) else {
            return Err(ReasonCode::UserDeviceMismatch);
        };
        if (now_ms - record.timestamp_ms).abs() > self.config.timestamp_window_ms {
            return Err(ReasonCode::StaleTimestamp);
        }
        if !device.replay.fresh(record.counter) {
            return Err(ReasonCode::ReplayedNonce);
        }
        device.replay.record(record.counter);
        let validity_max_ms = self.shared.age.config.validity_max_ms();
        let too_long = record.valid_until_ms.saturating_sub(now_ms) > validity_max_ms;
        if too_long {
            return Err(ReasonCode::InvalidAgeRegistration);
        }
        record.validate(now_ms, self.config.timestamp_window_ms)?;
        self.ages.insert(
            record.card_idm,
            AgeRegistration {
                birth_date: record.birth_date,
                method: record.method,
                verified_at_ms: record.verified_at_ms,
                valid_until_ms: record.valid_until_ms,
            },
        );
        Ok(())
    }

    pub(super) fn set_age_policy(
        &mut self,
        provider_code: u32,
        terminal_id: &str,
        policy: Option<&AgePolicy>,
    ) -> Result<(), ReasonCode> {
        let Some(provider) = self.shared.registry.provider(provider_code) else {
            return Err(ReasonCode::UnknownProvider);
        };
        let resolved = policy.map(|p| self.shared.age.config.resolve(p)).transpose()?;
        self.owned_providers.insert(provider_code);
        provider.set_age_policy(terminal_id, resolved)
    }
}
