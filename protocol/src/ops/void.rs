//! `VOID` (0x0068): cancel a payment code's authorization before its redemption: its hold is
//! released and its provider told.

use settlegate_types::{ClientRequestId, UserKey};

use crate::ops::Operation;
use crate::values::Codec;
use crate::wire::{BodyError, Reader, Writer};

/// What a `VOID` or `REFUND` names: a payment code by its issue number (`u8 target` 1, then
/// `u64 number`), or (`REFUND` only) a settled payment by its user and its `AUTHORIZE`'s
/// client request ID (`u8 target` 2, then `user`, `u128 payment_request_id`). Any other target
/// byte does not parse.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// A payment code, by issue number.
    Code(u64),
    /// A settled payment: the user who paid, and the client request ID of its `AUTHORIZE`.
    Payment {
        /// The paying user (the inherent ID's).
        user: UserKey,
        /// The client request ID the payment's `AUTHORIZE` was sent with.
        payment_request_id: ClientRequestId,
    },
}

impl Codec for Target {
    fn encode(&self, w: &mut Writer<'_>) {
        match self {
            Target::Code(number) => {
                w.u8(1).u64(*number);
            }
            Target::Payment { user, payment_request_id } => {
                w.u8(2).user(user).u128(*payment_request_id);
            }
        }
    }
    fn decode(r: &mut Reader<'_>) -> Result<Target, BodyError> {
        match r.u8("target")? {
            1 => Ok(Target::Code(r.u64("number")?)),
            2 => Ok(Target::Payment {
                user: r.user()?,
                payment_request_id: r.u128("payment_request_id")?,
            }),
            _ => Err(BodyError::Invalid("target")),
        }
    }
}

impl Target {
    /// The partition it is served in: the code's, or the paying user's.
    pub fn route(&self) -> super::Route<'_> {
        match self {
            Target::Code(number) => super::Route::Code(*number),
            Target::Payment { user, .. } => super::Route::User(user),
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
        let client_request_id = r.u128("client_request_id")?;
        // A settled payment has no hold to void: it is refunded.
        let target = match r.u8("target")? {
            1 => Target::Code(r.u64("number")?),
            _ => return Err(BodyError::Invalid("target")),
        };
        Ok(Void { client_request_id, target, terminal_id: r.str8("terminal_id")?.to_owned() })
    }

    fn route(&self) -> super::Route<'_> {
        self.target.route()
    }
}
