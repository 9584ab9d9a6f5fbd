//! `REMOVE_STORE` (0x0051): remove a store (W1).

use settlegate_types::ClientRequestId;

use crate::ops::Operation;
use crate::wire::{BodyError, Reader, Writer};

/// Remove a store; an empty reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemoveStore {
    /// Makes the request idempotent.
    pub client_request_id: ClientRequestId,
    /// The store's ID.
    pub store_id: String,
}

impl Operation for RemoveStore {
    const OPCODE: u16 = 0x0051;
    const NAME: &'static str = "remove_store";
    type Reply = ();

    fn encode(&self, w: &mut Writer<'_>) {
        w.u128(self.client_request_id).str8(&self.store_id);
    }

    fn decode(_: u16, r: &mut Reader<'_>) -> Result<RemoveStore, BodyError> {
        Ok(RemoveStore {
            client_request_id: r.u128("client_request_id")?,
            store_id: r.str8("store_id")?.to_owned(),
        })
    }
}
