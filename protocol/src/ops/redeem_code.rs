//! `REDEEM_CODE` (0x0061) and `REDEEM_CODE_BASKET` (0x0067): redeem a payment code at a POS
//! (C3), with the sale's items, or with its basket for the age check (C3 with A2).

use settlegate_types::{ClientRequestId, Currency};

use crate::ops::Operation;
use crate::values::{Basket, Codec, Redemption, SaleLine};
use crate::wire::{BodyError, Reader, Writer};

/// Redeem a payment code with the sale's basket, for the age check (C3 with A2).
pub const REDEEM_CODE_BASKET: u16 = 0x0067;

/// A sale's lines: its items, or its basket for the age check. Which one decides the opcode.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SaleLines {
    /// The items (`REDEEM_CODE`), 0 to 256.
    Items(Vec<SaleLine>),
    /// The basket (`REDEEM_CODE_BASKET`).
    Basket(Basket),
}

/// Redeem a payment code for a sale; the reply is the redemption.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RedeemCode {
    /// Makes the request idempotent.
    pub client_request_id: ClientRequestId,
    /// The code's text.
    pub code: String,
    /// The issuer the POS read from the code.
    pub issuer: u16,
    /// The code's issue number.
    pub number: u64,
    /// The sale's amount.
    pub amount_minor: u64,
    /// Its currency.
    pub currency: Currency,
    /// When the sale was made, ms.
    pub sale_at_ms: i64,
    /// The POS terminal.
    pub terminal_id: String,
    /// The sale's lines.
    pub lines: SaleLines,
    /// A coupon to apply.
    pub coupon: Option<String>,
    /// A cash-on-delivery order's reference.
    pub order_ref: String,
}

impl Operation for RedeemCode {
    const OPCODE: u16 = 0x0061;
    const NAME: &'static str = "redeem_code";
    const ALSO: &'static [(u16, &'static str)] = &[(REDEEM_CODE_BASKET, "redeem_code_basket")];
    type Reply = Box<Redemption>;

    fn opcode(&self) -> u16 {
        match self.lines {
            SaleLines::Items(_) => Self::OPCODE,
            SaleLines::Basket(_) => REDEEM_CODE_BASKET,
        }
    }

    fn encode(&self, w: &mut Writer<'_>) {
        w.u128(self.client_request_id)
            .str8(&self.code)
            .u16(self.issuer)
            .u64(self.number)
            .u64(self.amount_minor)
            .currency(self.currency)
            .i64(self.sale_at_ms)
            .str8(&self.terminal_id);
        match &self.lines {
            SaleLines::Items(items) => items.encode(w),
            SaleLines::Basket(basket) => basket.encode(w),
        }
        w.str8(self.coupon.as_deref().unwrap_or("")).str8(&self.order_ref);
    }

    fn decode(opcode: u16, r: &mut Reader<'_>) -> Result<RedeemCode, BodyError> {
        Ok(RedeemCode {
            client_request_id: r.u128("client_request_id")?,
            code: r.str8("code")?.to_owned(),
            issuer: r.u16("issuer")?,
            number: r.u64("number")?,
            amount_minor: r.u64("amount_minor")?,
            currency: r.currency()?,
            sale_at_ms: r.i64("sale_at_ms")?,
            terminal_id: r.str8("terminal_id")?.to_owned(),
            // Fields are read in the order written: the lines, then the coupon.
            lines: if opcode == REDEEM_CODE_BASKET {
                SaleLines::Basket(Basket::decode(r)?)
            } else {
                SaleLines::Items(Vec::<SaleLine>::decode(r)?)
            },
            coupon: {
                let coupon = r.str8("coupon")?;
                (!coupon.is_empty()).then(|| coupon.to_owned())
            },
            order_ref: r.str8("order_ref")?.to_owned(),
        })
    }

    fn route(&self) -> super::Route<'_> {
        super::Route::Code(self.number)
    }
}
