//! `AUTHORIZE` (0x0030): authorize a settlement.

use settlegate_types::{AuthOutcome, ClientRequestId};

use crate::ops::Operation;
use crate::wire::{BodyError, Reader, Writer};

/// Authorize the settlement a signed inherent ID describes; the reply is the outcome.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Authorize {
    /// Makes the request idempotent.
    pub client_request_id: ClientRequestId,
    /// The signed inherent ID.
    pub inherent_id: Vec<u8>,
}

impl Operation for Authorize {
    const OPCODE: u16 = 0x0030;
    const NAME: &'static str = "authorize";
    type Reply = AuthOutcome;

    fn encode(&self, w: &mut Writer<'_>) {
        w.u128(self.client_request_id).bytes16(&self.inherent_id);
    }

    fn decode(_: u16, r: &mut Reader<'_>) -> Result<Authorize, BodyError> {
        Ok(Authorize {
            client_request_id: r.u128("client_request_id")?,
            inherent_id: r.bytes16("inherent_id")?.to_vec(),
        })
    }

    fn route(&self) -> super::Route<'_> {
        super::Route::Signed(&self.inherent_id)
    }
}
