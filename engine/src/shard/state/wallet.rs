//! W3 the wallet: stored-value top-ups.

use super::*;

impl ShardState {
    pub(super) fn top_up(
        &mut self,
        user: &UserKey,
        means_id: u32,
        amount_minor: u64,
        currency: Currency,
        now_ms: i64,
    ) -> Reply {
        let Some(account) = self.users.get_mut(user).map(Arc::make_mut) else {
            return Reply::Refused(ReasonCode::UnknownUser);
        };
        let Some(means) = account.means.iter_mut().find(|m| m.means_id == means_id) else {
            return Reply::Refused(ReasonCode::MeansNotRegistered);
        };
        let Some(purse) = &mut means.purse else {
            return Reply::Refused(ReasonCode::NotStoredValue);
        };
        if purse.currency.is_some_and(|c| c != currency) {
            return Reply::Refused(ReasonCode::CurrencyMismatch);
        }
        let Some(balance) =
            purse.balance_minor.checked_add(amount_minor).filter(|b| *b <= BALANCE_MAX_MINOR)
        else {
            return Reply::Refused(ReasonCode::BalanceLimit);
        };
        purse.balance_minor = balance;
        purse.currency = Some(currency);
        Reply::Balance(balance_of(purse, now_ms))
    }
}
