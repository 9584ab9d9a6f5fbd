//! `TOP_UP` (0x0054): load a stored-value means.

use settlegate_types::{ClientRequestId, Currency, UserKey};

use crate::ops::Operation;
use crate::values::{Balance, Codec};
use crate::wire::{BodyError, Reader, Writer};

/// Load an amount onto a stored-value means; the reply is its balance.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopUp {
    /// Makes the request idempotent.
    pub client_request_id: ClientRequestId,
    /// The user.
    pub user: UserKey,
    /// The means.
    pub means_id: u32,
    /// The amount.
    pub amount_minor: u64,
    /// Its currency.
    pub currency: Currency,
}

/// A balance after a top-up: the currency is always there.
impl Codec for Balance {
    fn encode(&self, w: &mut Writer<'_>) {
        w.u64(self.balance_minor)
            .u64(self.available_minor)
            .raw(&self.currency.map_or([0; 3], |c| c.bytes()));
    }
    fn decode(r: &mut Reader<'_>) -> Result<Balance, BodyError> {
        let balance_minor = r.u64("balance_minor")?;
        let available_minor = r.u64("available_minor")?;
        let currency = r.currency()?;
        Ok(Balance { balance_minor, available_minor, currency: Some(currency) })
    }
}

impl Operation for TopUp {
    const OPCODE: u16 = 0x0054;
    const NAME: &'static str = "top_up";
    type Reply = Balance;

    fn encode(&self, w: &mut Writer<'_>) {
        w.u128(self.client_request_id)
            .user(&self.user)
            .u32(self.means_id)
            .u64(self.amount_minor)
            .currency(self.currency);
    }

    fn decode(_: u16, r: &mut Reader<'_>) -> Result<TopUp, BodyError> {
        Ok(TopUp {
            client_request_id: r.u128("client_request_id")?,
            user: r.user()?,
            means_id: r.u32("means_id")?,
            amount_minor: r.u64("amount_minor")?,
            currency: r.currency()?,
        })
    }

    fn route(&self) -> super::Route<'_> {
        super::Route::User(&self.user)
    }
}
