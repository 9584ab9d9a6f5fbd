//! `CODE_STATE` (0x0062): a payment code's state and remittance record.

use crate::ops::Operation;
use crate::values::{Codec, Redemption};
use crate::wire::{BodyError, Reader, Writer};

/// The state of the payment code with an issue number.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GetCodeState {
    /// The code's issue number.
    pub number: u64,
}

/// A payment code's state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CodeState {
    /// Issued, not yet redeemed (0).
    Issued,
    /// Redeemed (1), with the redemption.
    Redeemed(Box<Redemption>),
    /// Expired unredeemed (2).
    Expired,
    /// Voided before redemption (3, `VOID`).
    Voided,
}

impl Codec for CodeState {
    fn encode(&self, w: &mut Writer<'_>) {
        match self {
            CodeState::Issued => {
                w.u8(0);
            }
            CodeState::Redeemed(x) => {
                w.u8(1);
                x.encode(w);
            }
            CodeState::Expired => {
                w.u8(2);
            }
            CodeState::Voided => {
                w.u8(3);
            }
        }
    }
    fn decode(r: &mut Reader<'_>) -> Result<CodeState, BodyError> {
        Ok(match r.u8("state")? {
            0 => CodeState::Issued,
            1 => CodeState::Redeemed(Box::new(Redemption::decode(r)?)),
            2 => CodeState::Expired,
            3 => CodeState::Voided,
            _ => return Err(BodyError::Invalid("state")),
        })
    }
}

impl Operation for GetCodeState {
    const OPCODE: u16 = 0x0062;
    const NAME: &'static str = "code_state";
    type Reply = CodeState;

    fn encode(&self, w: &mut Writer<'_>) {
        w.u64(self.number);
    }

    fn decode(_: u16, r: &mut Reader<'_>) -> Result<GetCodeState, BodyError> {
        Ok(GetCodeState { number: r.u64("number")? })
    }

    fn route(&self) -> super::Route<'_> {
        super::Route::Code(self.number)
    }
}
