//! `CONFIRM_TERMINAL` (0x0022): terminal confirmation (S38–S39).

use crate::ops::Operation;
use crate::values::{Codec, TerminalService};
use crate::wire::{BodyError, Reader, Writer};

/// Whether a provider lists a store terminal, and its service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfirmTerminal {
    /// The provider.
    pub provider_code: u32,
    /// The terminal's ID.
    pub terminal_id: String,
}

/// The answer: listed (with its service, if any) or not.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TerminalConfirmation {
    /// The provider does not list the terminal.
    NotListed,
    /// It does.
    Listed {
        /// The terminal-unique service.
        service: Option<TerminalService>,
    },
}

impl Codec for TerminalConfirmation {
    fn encode(&self, w: &mut Writer<'_>) {
        match self {
            TerminalConfirmation::NotListed => {
                w.u8(0).u8(0);
            }
            TerminalConfirmation::Listed { service } => {
                w.u8(1);
                service.encode(w);
            }
        }
    }
    fn decode(r: &mut Reader<'_>) -> Result<TerminalConfirmation, BodyError> {
        let listed = r.flag("listed")?;
        let service = Option::<TerminalService>::decode(r)?;
        match (listed, service) {
            (true, service) => Ok(TerminalConfirmation::Listed { service }),
            (false, None) => Ok(TerminalConfirmation::NotListed),
            (false, Some(_)) => Err(BodyError::Invalid("has_service (0 when listed is 0)")),
        }
    }
}

impl Operation for ConfirmTerminal {
    const OPCODE: u16 = 0x0022;
    const NAME: &'static str = "confirm_terminal";
    type Reply = TerminalConfirmation;

    fn encode(&self, w: &mut Writer<'_>) {
        w.u32(self.provider_code).str8(&self.terminal_id);
    }

    fn decode(_: u16, r: &mut Reader<'_>) -> Result<ConfirmTerminal, BodyError> {
        Ok(ConfirmTerminal {
            provider_code: r.u32("provider_code")?,
            terminal_id: r.str8("terminal_id")?.to_owned(),
        })
    }
}
