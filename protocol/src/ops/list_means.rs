//! `LIST_MEANS` (0x0014): list a user's means.

use settlegate_types::UserKey;

use crate::ops::Operation;
use crate::values::{Codec, MeansView};
use crate::wire::{BodyError, Reader, Writer};

/// The order means are listed in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum MeansOrder {
    /// As registered (0).
    #[default]
    Registration,
    /// Most used first (1).
    Frequency,
    /// Most recently used first (2).
    Recency,
}

/// List a user's means, in an order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListMeans {
    /// The user.
    pub user: UserKey,
    /// The order.
    pub order: MeansOrder,
}

/// A user's means, without balances: `u8` count, then each view.
#[derive(Debug, Clone, PartialEq)]
pub struct MeansList(pub Vec<MeansView>);

impl Codec for MeansList {
    fn encode(&self, w: &mut Writer<'_>) {
        w.u8(self.0.len() as u8);
        for m in &self.0 {
            m.encode_view(w);
        }
    }
    fn decode(r: &mut Reader<'_>) -> Result<MeansList, BodyError> {
        let count = r.u8("count")?;
        let mut means = Vec::new();
        for _ in 0..count {
            means.push(MeansView::decode_view(r)?);
        }
        Ok(MeansList(means))
    }
}

impl Operation for ListMeans {
    const OPCODE: u16 = 0x0014;
    const NAME: &'static str = "list_means";
    type Reply = MeansList;

    fn encode(&self, w: &mut Writer<'_>) {
        let order = match self.order {
            MeansOrder::Registration => 0,
            MeansOrder::Frequency => 1,
            MeansOrder::Recency => 2,
        };
        w.user(&self.user).u8(order);
    }

    fn decode(_: u16, r: &mut Reader<'_>) -> Result<ListMeans, BodyError> {
        Ok(ListMeans {
            user: r.user()?,
            order: match r.u8("order")? {
                0 => MeansOrder::Registration,
                1 => MeansOrder::Frequency,
                2 => MeansOrder::Recency,
                _ => return Err(BodyError::Invalid("order")),
            },
        })
    }

    fn route(&self) -> super::Route<'_> {
        super::Route::User(&self.user)
    }
}
