//! `USABLE_METHODS` (0x0055): what the user can pay with at a store (W3).

use settlegate_types::UserKey;

use crate::ops::Operation;
use crate::values::{AcceptedMethod, Codec, MeansView};
use crate::wire::{present_or_zero, BodyError, Reader, Writer};

/// How the best method is chosen.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum BestBy {
    /// The most used (0).
    #[default]
    MostUsed,
    /// The largest balance (1).
    LargestBalance,
}

/// What a user can pay with at a store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UsableMethods {
    /// The user.
    pub user: UserKey,
    /// The store's ID.
    pub store_id: String,
    /// How the best method is chosen.
    pub best_by: BestBy,
}

/// One of the user's means, and whether the store accepts it.
#[derive(Debug, Clone, PartialEq)]
pub struct MethodAtStore {
    /// The means, with its balance.
    pub means: MeansView,
    /// Whether the store accepts it.
    pub usable: bool,
}

/// The user's means at a store, the best of them, and what the store accepts.
#[derive(Debug, Clone, PartialEq)]
pub struct UsableAtStore {
    /// The store's ID.
    pub store_id: String,
    /// Every means of the user.
    pub methods: Vec<MethodAtStore>,
    /// The best usable means.
    pub best: Option<u32>,
    /// The methods the store accepts.
    pub accepted: Vec<AcceptedMethod>,
}

impl Codec for UsableAtStore {
    fn encode(&self, w: &mut Writer<'_>) {
        w.str8(&self.store_id).u8(self.methods.len() as u8);
        for m in &self.methods {
            m.means.encode_with_balance(w);
            w.flag(m.usable);
        }
        w.flag(self.best.is_some()).u32(self.best.unwrap_or(0));
        self.accepted.encode(w);
    }
    fn decode(r: &mut Reader<'_>) -> Result<UsableAtStore, BodyError> {
        let store_id = r.str8("store_id")?.to_owned();
        let count = r.u8("count")?;
        let mut methods = Vec::new();
        for _ in 0..count {
            let means = MeansView::decode_with_balance(r)?;
            methods.push(MethodAtStore { means, usable: r.flag("usable")? });
        }
        let has_best = r.flag("has_best")?;
        let best =
            present_or_zero(has_best, r.u32("best")?, "best_means_id (0 when has_best is 0)")?;
        let accepted = Vec::<AcceptedMethod>::decode(r)?;
        Ok(UsableAtStore { store_id, methods, best, accepted })
    }
}

impl Operation for UsableMethods {
    const OPCODE: u16 = 0x0055;
    const NAME: &'static str = "usable_methods";
    type Reply = Box<UsableAtStore>;

    fn encode(&self, w: &mut Writer<'_>) {
        let best_by = match self.best_by {
            BestBy::MostUsed => 0,
            BestBy::LargestBalance => 1,
        };
        w.user(&self.user).str8(&self.store_id).u8(best_by);
    }

    fn decode(_: u16, r: &mut Reader<'_>) -> Result<UsableMethods, BodyError> {
        Ok(UsableMethods {
            user: r.user()?,
            store_id: r.str8("store_id")?.to_owned(),
            best_by: match r.u8("best_by")? {
                0 => BestBy::MostUsed,
                1 => BestBy::LargestBalance,
                _ => return Err(BodyError::Invalid("best_by")),
            },
        })
    }

    fn route(&self) -> super::Route<'_> {
        super::Route::User(&self.user)
    }
}
