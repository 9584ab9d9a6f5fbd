//! W3 the wallet: stored-value top-ups.

use super::*;

flow_reply! {
    /// What the wallet flow answers.
    pub(crate) enum WalletReply in Wallet {
        /// A purse's balance after a top-up.
        Balance(Balance),
    }
}

impl ShardState {
    pub(super) fn top_up(
        &mut self,
        user: &UserKey,
        means_id: u32,
        amount_minor: u64,
        currency: Currency,
        now_ms: i64,
    ) -> Result<Balance, ReasonCode> {
        let Some(account) = self.users.get_mut(user).map(Arc::make_mut) else {
            return Err(ReasonCode::UnknownUser);
        };
        let Some(means) = account.means.iter_mut().find(|m| m.means_id == means_id) else {
            return Err(ReasonCode::MeansNotRegistered);
        };
        let Some(purse) = &mut means.purse else {
            return Err(ReasonCode::NotStoredValue);
        };
        if purse.currency.is_some_and(|c| c != currency) {
            return Err(ReasonCode::CurrencyMismatch);
        }
        let Some(balance) =
            purse.balance_minor.checked_add(amount_minor).filter(|b| *b <= BALANCE_MAX_MINOR)
        else {
            return Err(ReasonCode::BalanceLimit);
        };
        purse.balance_minor = balance;
        purse.currency = Some(currency);
        Ok(balance_of(purse, now_ms))
    }
}
