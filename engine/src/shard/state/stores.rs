//! W1 stores, in the shard of their cell.

use super::*;

flow_reply! {
    /// What the stores flow's queries answer (its changes answer [`Reply::Done`]).
    pub(crate) enum StoresReply in Stores {
        /// The stores nearest a point, within the asked distance (W2).
        Nearest(Vec<Candidate>),
        /// A store found by its ID.
        Found(Box<Store>),
    }
}

impl ShardState {
    pub(super) fn upsert_store(
        &mut self,
        store: Store,
        signals_free: bool,
        now_ms: i64,
    ) -> Result<(), ReasonCode> {
        if self.stores.get(&store.store_id).is_none() && self.stores.len() >= STORES_PER_SHARD_MAX {
            return Err(ReasonCode::TooManyStores);
        }
        if !signals_free {
            return Err(ReasonCode::StoreIdInUse);
        }
        self.shared.stores.set(&store, now_ms);
        self.stores.upsert(store, now_ms);
        Ok(())
    }
}
