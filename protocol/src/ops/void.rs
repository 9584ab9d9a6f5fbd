//! `VOID` (0x0068): cancel a payment code's authorization before its redemption: its hold is
//! released and its provider told.

use settlegate_types::ClientRequestId;

use crate::ops::Operation;
use crate::values::Codec;
use crate::wire::{BodyError, Reader, Writer};

/// What a `VOID` or `REFUND` names: a payment code by its issue number (`u8 target` 1, then
/// `u64 number`). Other targets (a settled payment) are reserved: a body naming one does not
/// parse.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    /// A payment code, by issue number.
    Code(u64),
}

impl Codec for Target {
    fn encode(&self, w: &mut Writer<'_>) {
        match self {
            Target::Code(number) => {
                w.u8(1).u64(*number);
            }
        }
    }
    fn decode(r: &mut Reader<'_>) -> Result<Target, BodyError> {
        match r.u8("target")? {
            1 => Ok(Target::Code(r.u64("number")?)),
            _ => Err(BodyError::Invalid("target")),
        }
    }
}

impl Target {
    /// The partition it is served in.
    pub fn route(&self) -> super::Route<'_> {
        match self {
            Target::Code(number) => super::Route::Code(*number),
        }
    }
}

/// Void a payment code before its redemption, for a store terminal it was requested for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Void {
    /// Makes the request idempotent.
    pub client_request_id: ClientRequestId,
    /// What is voided.
    pub target: Target,
    /// The store terminal (the identity must act for it).
    pub terminal_id: String,
}

/// A void's answer: the amount released.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Voided {
    /// The hold released, minor units.
    pub released_minor: u64,
}

impl Codec for Voided {
    fn encode(&self, w: &mut Writer<'_>) {
        w.u64(self.released_minor);
    }
    fn decode(r: &mut Reader<'_>) -> Result<Voided, BodyError> {
        Ok(Voided { released_minor: r.u64("released_minor")? })
    }
}

impl Operation for Void {
    const OPCODE: u16 = 0x0068;
    const NAME: &'static str = "void";
    type Reply = Voided;

    fn encode(&self, w: &mut Writer<'_>) {
        w.u128(self.client_request_id);
        self.target.encode(w);
        w.str8(&self.terminal_id);
    }

    fn decode(_: u16, r: &mut Reader<'_>) -> Result<Void, BodyError> {
        Ok(Void {
            client_request_id: r.u128("client_request_id")?,
            target: Target::decode(r)?,
            terminal_id: r.str8("terminal_id")?.to_owned(),
        })
    }

    fn route(&self) -> super::Route<'_> {
        self.target.route()
    }
}
