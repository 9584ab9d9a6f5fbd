//! `SET_AGE_POLICY` (0x0041): set or clear a store terminal's age policy.

use settlegate_types::ClientRequestId;

use crate::ops::Operation;
use crate::wire::{BodyError, Reader, Writer};

/// What a store terminal does when a basket's age condition does not hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[repr(u8)]
pub enum OnAgeFailure {
    /// Refuse the payment (1).
    #[default]
    Refuse = 1,
    /// Remove the restricted items and settle the rest (2).
    RemoveItems = 2,
}

impl OnAgeFailure {
    /// Decodes the wire byte.
    pub fn from_u8(byte: u8) -> Option<OnAgeFailure> {
        match byte {
            1 => Some(OnAgeFailure::Refuse),
            2 => Some(OnAgeFailure::RemoveItems),
            _ => None,
        }
    }
}

/// A store terminal's age policy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgePolicy {
    /// The jurisdiction whose age limits apply.
    pub jurisdiction: String,
    /// The IANA time zone a birthday is counted in.
    pub time_zone: String,
    /// What happens when the condition does not hold.
    pub on_failure: OnAgeFailure,
    /// Whether a basket without the age-confirmation flag is refused.
    pub strict: bool,
}

/// Set (or, with no policy, clear) a store terminal's age policy; an empty reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SetAgePolicy {
    /// Makes the request idempotent.
    pub client_request_id: ClientRequestId,
    /// The provider.
    pub provider_code: u32,
    /// The terminal's ID.
    pub terminal_id: String,
    /// The policy.
    pub policy: Option<AgePolicy>,
}

impl Operation for SetAgePolicy {
    const OPCODE: u16 = 0x0041;
    const NAME: &'static str = "set_age_policy";
    type Reply = ();

    fn encode(&self, w: &mut Writer<'_>) {
        w.u128(self.client_request_id).u32(self.provider_code).str8(&self.terminal_id);
        match &self.policy {
            None => w.u8(0),
            Some(p) => w
                .u8(1)
                .str8(&p.jurisdiction)
                .str8(&p.time_zone)
                .u8(p.on_failure as u8)
                .flag(p.strict),
        };
    }

    fn decode(_: u16, r: &mut Reader<'_>) -> Result<SetAgePolicy, BodyError> {
        Ok(SetAgePolicy {
            client_request_id: r.u128("client_request_id")?,
            provider_code: r.u32("provider_code")?,
            terminal_id: r.str8("terminal_id")?.to_owned(),
            policy: if r.flag("has_policy")? {
                Some(AgePolicy {
                    jurisdiction: r.str8("jurisdiction")?.to_owned(),
                    time_zone: r.str8("time_zone")?.to_owned(),
                    on_failure: OnAgeFailure::from_u8(r.u8("on_failure")?)
                        .ok_or(BodyError::Invalid("on_failure"))?,
                    strict: r.flag("strict")?,
                })
            } else {
                None
            },
        })
    }
}
