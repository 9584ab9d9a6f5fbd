//! `REGISTER_TERMINALS` (0x0020): list terminals for a provider.

use settlegate_types::limits::TERMINALS_PER_REQUEST_MAX;
use settlegate_types::ClientRequestId;

use crate::ops::Operation;
use crate::values::{Codec, TerminalService};
use crate::wire::{BodyError, Reader, Writer};

/// A store terminal to list, with its terminal-unique service if it has one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TerminalEntry {
    /// The terminal's ID.
    pub terminal_id: String,
    /// Its service.
    pub service: Option<TerminalService>,
}

/// List store terminals for a provider (1 to 1,024); an empty reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegisterTerminals {
    /// Makes the request idempotent.
    pub client_request_id: ClientRequestId,
    /// The provider.
    pub provider_code: u32,
    /// The terminals.
    pub terminals: Vec<TerminalEntry>,
}

/// Reads a terminal count and checks it against the limit before anything is allocated.
pub(crate) fn terminal_count(r: &mut Reader<'_>) -> Result<usize, BodyError> {
    let count = r.u16("count")? as usize;
    if count == 0 || count > TERMINALS_PER_REQUEST_MAX {
        return Err(BodyError::Invalid("count (1..=1024)"));
    }
    Ok(count)
}

impl Operation for RegisterTerminals {
    const OPCODE: u16 = 0x0020;
    const NAME: &'static str = "register_terminals";
    type Reply = ();

    fn encode(&self, w: &mut Writer<'_>) {
        w.u128(self.client_request_id)
            .u32(self.provider_code)
            .u16(self.terminals.len() as u16);
        for entry in &self.terminals {
            w.str8(&entry.terminal_id);
            entry.service.encode(w);
        }
    }

    fn decode(_: u16, r: &mut Reader<'_>) -> Result<RegisterTerminals, BodyError> {
        let client_request_id = r.u128("client_request_id")?;
        let provider_code = r.u32("provider_code")?;
        let count = terminal_count(r)?;
        let mut terminals = Vec::with_capacity(count);
        for _ in 0..count {
            let terminal_id = r.str8("terminal_id")?.to_owned();
            let service = Option::<TerminalService>::decode(r)?;
            terminals.push(TerminalEntry { terminal_id, service });
        }
        Ok(RegisterTerminals { client_request_id, provider_code, terminals })
    }
}
