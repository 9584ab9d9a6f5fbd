//! `AUTHORIZE_BASKET` (0x0031): authorize a settlement with its basket of items (age check,
//! A2–A3).

use settlegate_types::limits::BASKET_ITEMS_MAX;
use settlegate_types::{AuthOutcome, ClientRequestId};

use crate::ops::Operation;
use crate::values::{Basket, Codec};
use crate::wire::{BodyError, Reader, Writer};

/// Authorize a signed inherent ID with the sale's basket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuthorizeBasket {
    /// Makes the request idempotent.
    pub client_request_id: ClientRequestId,
    /// The signed inherent ID.
    pub inherent_id: Vec<u8>,
    /// The basket.
    pub basket: Basket,
}

/// How the age condition of a basket was checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum AgeCheck {
    /// Not checked (0).
    NotChecked = 0,
    /// The basket holds no restricted item (1).
    NoRestrictedItems = 1,
    /// The condition holds (2).
    Held = 2,
    /// It does not hold: the restricted items were removed (3).
    NotHeld = 3,
}

impl AgeCheck {
    /// Decodes the wire byte.
    pub fn from_u8(byte: u8) -> Option<AgeCheck> {
        match byte {
            0 => Some(AgeCheck::NotChecked),
            1 => Some(AgeCheck::NoRestrictedItems),
            2 => Some(AgeCheck::Held),
            3 => Some(AgeCheck::NotHeld),
            _ => None,
        }
    }
}

/// The age check's verdict on a basket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgeVerdict {
    /// How it was checked.
    pub check: AgeCheck,
    /// The items removed.
    pub items: Vec<String>,
    /// The amount settled.
    pub amount_minor: u64,
}

/// The outcome, and the age check's verdict when there was one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BasketOutcome {
    /// The authorization's outcome.
    pub outcome: AuthOutcome,
    /// The verdict.
    pub verdict: Option<AgeVerdict>,
}

impl Codec for BasketOutcome {
    fn encode(&self, w: &mut Writer<'_>) {
        self.outcome.encode(w);
        match &self.verdict {
            None => {
                w.u8(0);
            }
            Some(v) => {
                w.u8(1).u8(v.check as u8).u64(v.amount_minor).u16(v.items.len() as u16);
                for item in &v.items {
                    w.str8(item);
                }
            }
        }
    }
    fn decode(r: &mut Reader<'_>) -> Result<BasketOutcome, BodyError> {
        let outcome = AuthOutcome::decode(r)?;
        let verdict = if r.flag("has_verdict")? {
            let check =
                AgeCheck::from_u8(r.u8("age_check")?).ok_or(BodyError::Invalid("age_check"))?;
            let amount_minor = r.u64("amount_minor")?;
            let count = r.u16("item_count")? as usize;
            if count > BASKET_ITEMS_MAX {
                return Err(BodyError::Invalid("item_count"));
            }
            let mut items = Vec::with_capacity(count);
            for _ in 0..count {
                items.push(r.str8("item_id")?.to_owned());
            }
            Some(AgeVerdict { check, items, amount_minor })
        } else {
            None
        };
        Ok(BasketOutcome { outcome, verdict })
    }
}

impl Operation for AuthorizeBasket {
    const OPCODE: u16 = 0x0031;
    const NAME: &'static str = "authorize_basket";
    type Reply = BasketOutcome;

    fn encode(&self, w: &mut Writer<'_>) {
        w.u128(self.client_request_id).bytes16(&self.inherent_id);
        self.basket.encode(w);
    }

    fn decode(_: u16, r: &mut Reader<'_>) -> Result<AuthorizeBasket, BodyError> {
        Ok(AuthorizeBasket {
            client_request_id: r.u128("client_request_id")?,
            inherent_id: r.bytes16("inherent_id")?.to_vec(),
            basket: Basket::decode(r)?,
        })
    }

    fn route(&self) -> super::Route<'_> {
        super::Route::Signed(&self.inherent_id)
    }
}
