//! `AUTH` (0x0001): authenticate the connection with an API key.

use crate::ops::Operation;
use crate::values::Codec;
use crate::wire::{BodyError, Reader, Writer};

/// Authenticate with an API key (`auth_method` 1).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Auth {
    /// The API key.
    pub key: String,
}

/// Who the connection now acts as.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Authenticated {
    /// The identity's name.
    pub identity: String,
    /// Its permission bits.
    pub permissions: u32,
}

impl Codec for Authenticated {
    fn encode(&self, w: &mut Writer<'_>) {
        w.str8(&self.identity).u32(self.permissions);
    }
    fn decode(r: &mut Reader<'_>) -> Result<Authenticated, BodyError> {
        Ok(Authenticated {
            identity: r.str8("identity")?.to_owned(),
            permissions: r.u32("permissions")?,
        })
    }
}

impl Operation for Auth {
    const OPCODE: u16 = 0x0001;
    const NAME: &'static str = "auth";
    const UNAUTHENTICATED: bool = true;
    type Reply = Authenticated;

    fn encode(&self, w: &mut Writer<'_>) {
        w.u8(1).str8(&self.key);
    }

    fn decode(_: u16, r: &mut Reader<'_>) -> Result<Auth, BodyError> {
        if r.u8("auth_method")? != 1 {
            return Err(BodyError::Invalid("auth_method"));
        }
        Ok(Auth { key: r.str8("key")?.to_owned() })
    }
}
