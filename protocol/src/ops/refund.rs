//! `REFUND` (0x0069): return part or all of a redeemed payment code's capture; the refunds of
//! a capture add up to it at most.

use settlegate_types::ClientRequestId;

use crate::ops::void::Target;
use crate::ops::Operation;
use crate::values::Codec;
use crate::wire::{BodyError, Reader, Writer};

/// Refund an amount of a capture, for the store terminal that redeemed the code.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refund {
    /// Makes the request idempotent.
    pub client_request_id: ClientRequestId,
    /// What is refunded.
    pub target: Target,
    /// The amount, minor units, in the capture's currency.
    pub amount_minor: u64,
    /// The store terminal (the identity must act for it).
    pub terminal_id: String,
}

/// A refund's answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Refunded {
    /// This refund's amount.
    pub amount_minor: u64,
    /// Every refund of the capture, this one included.
    pub refunded_minor: u64,
    /// The capture.
    pub captured_minor: u64,
}

impl Codec for Refunded {
    fn encode(&self, w: &mut Writer<'_>) {
        w.u64(self.amount_minor).u64(self.refunded_minor).u64(self.captured_minor);
    }
    fn decode(r: &mut Reader<'_>) -> Result<Refunded, BodyError> {
        Ok(Refunded {
            amount_minor: r.u64("amount_minor")?,
            refunded_minor: r.u64("refunded_minor")?,
            captured_minor: r.u64("captured_minor")?,
        })
    }
}

impl Operation for Refund {
    const OPCODE: u16 = 0x0069;
    const NAME: &'static str = "refund";
    type Reply = Refunded;

    fn encode(&self, w: &mut Writer<'_>) {
        w.u128(self.client_request_id);
        self.target.encode(w);
        w.u64(self.amount_minor).str8(&self.terminal_id);
    }

    fn decode(_: u16, r: &mut Reader<'_>) -> Result<Refund, BodyError> {
        Ok(Refund {
            client_request_id: r.u128("client_request_id")?,
            target: Target::decode(r)?,
            amount_minor: r.u64("amount_minor")?,
            terminal_id: r.str8("terminal_id")?.to_owned(),
        })
    }

    fn route(&self) -> super::Route<'_> {
        self.target.route()
    }
}
