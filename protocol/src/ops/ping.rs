//! `PING` (0x0002): echo.

use crate::ops::Operation;
use crate::values::Codec;
use crate::wire::{BodyError, Reader, Writer};

/// Largest `PING` payload.
pub const PING_PAYLOAD_MAX: usize = 64;

/// Echo a payload of at most [`PING_PAYLOAD_MAX`] bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ping {
    /// The payload.
    pub payload: Vec<u8>,
}

/// The payload echoed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pong(pub Vec<u8>);

impl Codec for Pong {
    fn encode(&self, w: &mut Writer<'_>) {
        w.raw(&self.0);
    }
    fn decode(r: &mut Reader<'_>) -> Result<Pong, BodyError> {
        Ok(Pong(r.rest().to_vec()))
    }
}

impl Operation for Ping {
    const OPCODE: u16 = 0x0002;
    const NAME: &'static str = "ping";
    const UNAUTHENTICATED: bool = true;
    type Reply = Pong;

    fn encode(&self, w: &mut Writer<'_>) {
        w.raw(&self.payload);
    }

    fn decode(_: u16, r: &mut Reader<'_>) -> Result<Ping, BodyError> {
        let payload = r.rest();
        if payload.len() > PING_PAYLOAD_MAX {
            return Err(BodyError::Invalid("ping payload over 64 bytes"));
        }
        Ok(Ping { payload: payload.to_vec() })
    }
}
