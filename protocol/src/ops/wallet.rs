//! `WALLET` (0x0056): the user's methods with balances and use.

use settlegate_types::UserKey;

use crate::ops::Operation;
use crate::values::{Codec, MeansView};
use crate::wire::{BodyError, Reader, Writer};

/// The user's methods, with balances.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Wallet {
    /// The user.
    pub user: UserKey,
}

/// A user's means, each with its balance: `u8` count, then each view and balance.
#[derive(Debug, Clone, PartialEq)]
pub struct WalletEntries(pub Vec<MeansView>);

impl Codec for WalletEntries {
    fn encode(&self, w: &mut Writer<'_>) {
        w.u8(self.0.len() as u8);
        for m in &self.0 {
            m.encode_with_balance(w);
        }
    }
    fn decode(r: &mut Reader<'_>) -> Result<WalletEntries, BodyError> {
        let count = r.u8("count")?;
        let mut means = Vec::new();
        for _ in 0..count {
            means.push(MeansView::decode_with_balance(r)?);
        }
        Ok(WalletEntries(means))
    }
}

impl Operation for Wallet {
    const OPCODE: u16 = 0x0056;
    const NAME: &'static str = "wallet";
    type Reply = WalletEntries;

    fn encode(&self, w: &mut Writer<'_>) {
        w.user(&self.user);
    }

    fn decode(_: u16, r: &mut Reader<'_>) -> Result<Wallet, BodyError> {
        Ok(Wallet { user: r.user()? })
    }

    fn route(&self) -> super::Route<'_> {
        super::Route::User(&self.user)
    }
}
