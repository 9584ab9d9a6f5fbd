//! `UPSERT_STORE` (0x0050): add or replace a store (W1).

use settlegate_types::ClientRequestId;

use crate::ops::Operation;
use crate::values::{Codec, Store};
use crate::wire::{BodyError, Reader, Writer};

/// Add a store, or replace the one with its ID; an empty reply.
#[derive(Debug, Clone, PartialEq)]
pub struct UpsertStore {
    /// Makes the request idempotent.
    pub client_request_id: ClientRequestId,
    /// The store.
    pub store: Store,
}

impl Operation for UpsertStore {
    const OPCODE: u16 = 0x0050;
    const NAME: &'static str = "upsert_store";
    type Reply = ();

    fn encode(&self, w: &mut Writer<'_>) {
        w.u128(self.client_request_id);
        self.store.encode(w);
    }

    fn decode(_: u16, r: &mut Reader<'_>) -> Result<UpsertStore, BodyError> {
        Ok(UpsertStore { client_request_id: r.u128("client_request_id")?, store: Store::decode(r)? })
    }
}
