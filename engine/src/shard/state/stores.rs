//! W1 stores, in the shard of their cell.

use super::*;

impl ShardState {
    pub(super) fn upsert_store(&mut self, store: Store, signals_free: bool, now_ms: i64) -> Reply {
        if self.stores.get(&store.store_id).is_none() && self.stores.len() >= STORES_PER_SHARD_MAX {
            return Reply::Refused(ReasonCode::TooManyStores);
        }
        if !signals_free {
            return Reply::Refused(ReasonCode::StoreIdInUse);
        }
        self.shared.stores.set(&store, now_ms);
        self.stores.upsert(store, now_ms);
        Reply::Ok
    }
}
