//! `REGISTER_AGE` (0x0040): register a user terminal's age information (A1).

use settlegate_types::ClientRequestId;

use crate::ops::Operation;
use crate::wire::{BodyError, Reader, Writer};

/// Register a signed age record; an empty reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegisterAge {
    /// Makes the request idempotent.
    pub client_request_id: ClientRequestId,
    /// The signed age record.
    pub record: Vec<u8>,
}

impl Operation for RegisterAge {
    const OPCODE: u16 = 0x0040;
    const NAME: &'static str = "register_age";
    type Reply = ();

    fn encode(&self, w: &mut Writer<'_>) {
        w.u128(self.client_request_id).bytes16(&self.record);
    }

    fn decode(_: u16, r: &mut Reader<'_>) -> Result<RegisterAge, BodyError> {
        Ok(RegisterAge {
            client_request_id: r.u128("client_request_id")?,
            record: r.bytes16("age_record")?.to_vec(),
        })
    }
}
