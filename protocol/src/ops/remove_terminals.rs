//! `REMOVE_TERMINALS` (0x0021): remove terminals from a provider.

use settlegate_types::ClientRequestId;

use crate::ops::register_terminals::terminal_count;
use crate::ops::Operation;
use crate::wire::{BodyError, Reader, Writer};

/// Remove store terminals from a provider's list (1 to 1,024); an empty reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemoveTerminals {
    /// Makes the request idempotent.
    pub client_request_id: ClientRequestId,
    /// The provider.
    pub provider_code: u32,
    /// The terminals' IDs.
    pub terminal_ids: Vec<String>,
}

impl Operation for RemoveTerminals {
    const OPCODE: u16 = 0x0021;
    const NAME: &'static str = "remove_terminals";
    type Reply = ();

    fn encode(&self, w: &mut Writer<'_>) {
        w.u128(self.client_request_id)
            .u32(self.provider_code)
            .u16(self.terminal_ids.len() as u16);
        for id in &self.terminal_ids {
            w.str8(id);
        }
    }

    fn decode(_: u16, r: &mut Reader<'_>) -> Result<RemoveTerminals, BodyError> {
        let client_request_id = r.u128("client_request_id")?;
        let provider_code = r.u32("provider_code")?;
        let count = terminal_count(r)?;
        let mut terminal_ids = Vec::with_capacity(count);
        for _ in 0..count {
            terminal_ids.push(r.str8("terminal_id")?.to_owned());
        }
        Ok(RemoveTerminals { client_request_id, provider_code, terminal_ids })
    }
}
