//! `ISSUE_CODE` (0x0060): request a payment code (C1–C2, C4).

use settlegate_types::{ClientRequestId, Idm, ReasonCode};

use crate::ops::Operation;
use crate::values::{Codec, IssuedCode};
use crate::wire::{present_or_zero, BodyError, Reader, Writer};

/// Hold an amount a signed inherent ID authorizes, as a payment code.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IssueCode {
    /// Makes the request idempotent.
    pub client_request_id: ClientRequestId,
    /// The signed inherent ID.
    pub inherent_id: Vec<u8>,
    /// How long the code is valid, ms (whole seconds on the wire).
    pub validity_ms: i64,
    /// The device to deliver it to, when not the requesting one (C4).
    pub deliver_to: Option<Idm>,
    /// A cash-on-delivery order's reference.
    pub order_ref: String,
}

/// The code, or why none was issued.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CodeOutcome {
    /// Issued.
    Issued(Box<IssuedCode>),
    /// Declined.
    Declined(ReasonCode),
}

impl Codec for CodeOutcome {
    fn encode(&self, w: &mut Writer<'_>) {
        match self {
            CodeOutcome::Issued(code) => {
                w.u8(0);
                code.encode(w);
            }
            CodeOutcome::Declined(reason) => {
                w.u8(1);
                reason.encode(w);
            }
        }
    }
    fn decode(r: &mut Reader<'_>) -> Result<CodeOutcome, BodyError> {
        Ok(match r.u8("result")? {
            0 => CodeOutcome::Issued(Box::new(IssuedCode::decode(r)?)),
            1 => CodeOutcome::Declined(ReasonCode::decode(r)?),
            _ => return Err(BodyError::Invalid("result")),
        })
    }
}

impl Operation for IssueCode {
    const OPCODE: u16 = 0x0060;
    const NAME: &'static str = "issue_code";
    type Reply = CodeOutcome;

    fn encode(&self, w: &mut Writer<'_>) {
        w.u128(self.client_request_id)
            .bytes16(&self.inherent_id)
            .u32((self.validity_ms / 1000) as u32)
            .flag(self.deliver_to.is_some())
            .raw(&self.deliver_to.unwrap_or([0; 8]))
            .str8(&self.order_ref);
    }

    fn decode(_: u16, r: &mut Reader<'_>) -> Result<IssueCode, BodyError> {
        Ok(IssueCode {
            client_request_id: r.u128("client_request_id")?,
            inherent_id: r.bytes16("inherent_id")?.to_vec(),
            validity_ms: i64::from(r.u32("validity_s")?) * 1000,
            deliver_to: {
                let has = r.flag("has_deliver_to")?;
                let idm: [u8; 8] = r.array("deliver_to")?;
                present_or_zero(has, idm, "deliver_to (zeros when has_deliver_to is 0)")?
            },
            order_ref: r.str8("order_ref")?.to_owned(),
        })
    }

    fn route(&self) -> super::Route<'_> {
        super::Route::Signed(&self.inherent_id)
    }
}
