//! Requests and responses: the statuses, [`Response`], and the request and reply tables
//! generated from the list of operations ([`crate::ops`]), where each operation's body
//! layouts live (`docs/PROTOCOL.md` section 5).

use settlegate_types::ReasonCode;

pub use crate::ops::add_means::{MeansAdded, MeansInput};
pub use crate::ops::authorize_basket::{AgeCheck, AgeVerdict, BasketOutcome};
pub use crate::ops::code_state::CodeState;
pub use crate::ops::confirm_terminal::TerminalConfirmation;
pub use crate::ops::device_message::DeviceMessage;
pub use crate::ops::issue_code::CodeOutcome;
pub use crate::ops::list_means::{MeansList, MeansOrder};
pub use crate::ops::notice::Notice;
pub use crate::ops::ping::PING_PAYLOAD_MAX;
pub use crate::ops::redeem_code::SaleLines;
pub use crate::ops::register_terminals::TerminalEntry;
pub use crate::ops::server_info::ServerInfo;
pub use crate::ops::set_age_policy::{AgePolicy, OnAgeFailure};
pub use crate::ops::store_by_signal::Signal;
pub use crate::ops::usable_methods::{BestBy, MethodAtStore, UsableAtStore};
pub use crate::ops::wallet::WalletEntries;
pub use crate::ops::{opcode, Reply, Request};
use crate::values::Codec;
pub use crate::values::{degrees_to_e7, DISTANCE_MM_MAX};
use crate::wire::{BodyError, Reader, Writer};

/// Response statuses.
pub mod status {
    /// Success; the body is the reply.
    pub const OK: u16 = 0;
    /// The engine refused; body `u16 reason`.
    pub const REFUSED: u16 = 1;
    /// Busy; body `u32 retry_after_ms`.
    pub const BUSY: u16 = 2;
    /// Same client request ID still in flight.
    pub const IN_FLIGHT: u16 = 3;
    /// Not authenticated.
    pub const UNAUTHENTICATED: u16 = 4;
    /// Not permitted.
    pub const FORBIDDEN: u16 = 5;
    /// Body did not parse.
    pub const BAD_REQUEST: u16 = 6;
    /// Unknown opcode.
    pub const UNKNOWN_OPCODE: u16 = 7;
    /// Server shutting down.
    pub const SHUTTING_DOWN: u16 = 8;
    /// Server fault.
    pub const INTERNAL: u16 = 9;
    /// The request's partition is owned by another node of the cluster; body `u16 partition`,
    /// `u64 epoch`, `str8 address` (empty while no owner is known).
    pub const MOVED: u16 = 10;
    /// Framing broken; the server closes.
    pub const FRAME_ERROR: u16 = 16;

    /// Every status of `docs/PROTOCOL.md` section 4.
    pub const ALL: &[u16] = &[
        OK,
        REFUSED,
        BUSY,
        IN_FLIGHT,
        UNAUTHENTICATED,
        FORBIDDEN,
        BAD_REQUEST,
        UNKNOWN_OPCODE,
        SHUTTING_DOWN,
        INTERNAL,
        MOVED,
        FRAME_ERROR,
    ];
}

/// Most terminals in one register or remove request.
pub const TERMINALS_PER_REQUEST_MAX: usize = settlegate_types::limits::TERMINALS_PER_REQUEST_MAX;

/// Why a request body was not understood.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// No such opcode.
    #[error("unknown opcode {0:#06x}")]
    UnknownOpcode(u16),
    /// The body does not parse.
    #[error("{0}")]
    Body(#[from] BodyError),
}

impl Request {
    /// Appends the request, as a frame with `request_id`, to `out` (the body encoded in place).
    /// A body over the frame limit is an error, and `out` is left as it was.
    pub fn encode_frame(
        &self,
        request_id: u64,
        out: &mut Vec<u8>,
    ) -> Result<(), crate::frame::BodyTooLarge> {
        let head = crate::frame::Head { flags: 0, opcode: self.opcode(), status: 0 };
        crate::frame::encode_with(out, head, request_id, |out| self.encode_body(out))
    }

    /// The request as a frame.
    pub fn to_frame(&self, request_id: u64) -> crate::Frame {
        let mut body = Vec::new();
        self.encode_body(&mut body);
        crate::Frame::request(self.opcode(), request_id, body)
    }

    /// Parses a request body. Never allocates more than the body holds.
    pub fn decode(opcode: u16, body: &[u8]) -> Result<Request, DecodeError> {
        let mut r = Reader::new(body);
        let request =
            Request::decode_body(opcode, &mut r).ok_or(DecodeError::UnknownOpcode(opcode))??;
        let misfit_user = r.misfit_user();
        r.finish()?;
        if misfit_user {
            return Ok(Request::MisfitUserId { request: Box::new(request), body: body.to_vec() });
        }
        Ok(request)
    }
}

/// A response: a status and its body.
#[derive(Debug, Clone, PartialEq)]
#[allow(missing_docs)]
pub enum Response {
    Ok(Reply),
    Refused(ReasonCode),
    Busy { retry_after_ms: u32 },
    InFlight,
    Unauthenticated(String),
    Forbidden(String),
    BadRequest(String),
    UnknownOpcode,
    ShuttingDown,
    Internal(String),
    Moved { partition: u16, epoch: u64, address: String },
    FrameError { kind: u16, detail: String },
}

impl Response {
    /// Status and body.
    pub fn encode(&self) -> (u16, Vec<u8>) {
        let mut body = Vec::new();
        self.encode_body(&mut body);
        (self.status(), body)
    }

    /// The response as a frame answering a request with `opcode` and `request_id`, appended
    /// to `out` (the body encoded in place); returns its status. A body over the frame limit
    /// is sent as `INTERNAL` instead (never a panic).
    pub fn encode_frame(&self, opcode: u16, request_id: u64, out: &mut Vec<u8>) -> u16 {
        let status = self.status();
        let head = crate::frame::Head { flags: self.flags(), opcode, status };
        match crate::frame::encode_with(out, head, request_id, |out| self.encode_body(out)) {
            Ok(()) => status,
            // Every reply fits by its operation's limits (a test builds each one's largest);
            // should one not, the caller still gets an answer and the connection lives.
            Err(too_large) => {
                Response::Internal(format!("the reply does not fit a frame: {too_large}"))
                    .encode_frame(opcode, request_id, out)
            }
        }
    }

    /// The frame flags this response is sent with: a response, and a push for what a
    /// subscription delivers.
    fn flags(&self) -> u8 {
        let push = matches!(self, Response::Ok(reply) if reply.is_push());
        crate::frame::FLAG_RESPONSE | if push { crate::frame::FLAG_PUSH } else { 0 }
    }

    /// The status code this response is sent with.
    pub fn status(&self) -> u16 {
        match self {
            Response::Ok(_) => status::OK,
            Response::Refused(_) => status::REFUSED,
            Response::Busy { .. } => status::BUSY,
            Response::InFlight => status::IN_FLIGHT,
            Response::Unauthenticated(_) => status::UNAUTHENTICATED,
            Response::Forbidden(_) => status::FORBIDDEN,
            Response::BadRequest(_) => status::BAD_REQUEST,
            Response::UnknownOpcode => status::UNKNOWN_OPCODE,
            Response::ShuttingDown => status::SHUTTING_DOWN,
            Response::Internal(_) => status::INTERNAL,
            Response::Moved { .. } => status::MOVED,
            Response::FrameError { .. } => status::FRAME_ERROR,
        }
    }

    /// Appends the body to `out` (its status is [`Response::status`]).
    fn encode_body(&self, out: &mut Vec<u8>) {
        let mut w = Writer(out);
        match self {
            Response::Ok(reply) => reply.encode(&mut w),
            Response::Refused(reason) => reason.encode(&mut w),
            Response::Busy { retry_after_ms } => {
                w.u32(*retry_after_ms);
            }
            Response::InFlight | Response::UnknownOpcode | Response::ShuttingDown => {}
            Response::Unauthenticated(detail)
            | Response::Forbidden(detail)
            | Response::BadRequest(detail)
            | Response::Internal(detail) => {
                w.str8(detail);
            }
            Response::Moved { partition, epoch, address } => {
                w.u16(*partition).u64(*epoch).str8(address);
            }
            Response::FrameError { kind, detail } => {
                w.u16(*kind).str8(detail);
            }
        }
    }

    /// The response to a request with `opcode` and `request_id`, as a frame.
    pub fn to_frame(&self, opcode: u16, request_id: u64) -> crate::Frame {
        let (status, body) = self.encode();
        crate::Frame { flags: self.flags(), opcode, status, request_id, body }
    }

    /// Parses a response to a request of `opcode`.
    pub fn decode(opcode: u16, status: u16, body: &[u8]) -> Result<Response, BodyError> {
        let mut r = Reader::new(body);
        let response = match status {
            status::OK => Response::Ok(Reply::decode(opcode, &mut r)?),
            status::REFUSED => Response::Refused(ReasonCode::decode(&mut r)?),
            status::BUSY => Response::Busy { retry_after_ms: r.u32("retry_after_ms")? },
            status::IN_FLIGHT => Response::InFlight,
            status::UNAUTHENTICATED => Response::Unauthenticated(r.str8("detail")?.to_owned()),
            status::FORBIDDEN => Response::Forbidden(r.str8("detail")?.to_owned()),
            status::BAD_REQUEST => Response::BadRequest(r.str8("detail")?.to_owned()),
            status::UNKNOWN_OPCODE => Response::UnknownOpcode,
            status::SHUTTING_DOWN => Response::ShuttingDown,
            status::INTERNAL => Response::Internal(r.str8("detail")?.to_owned()),
            status::MOVED => Response::Moved {
                partition: r.u16("partition")?,
                epoch: r.u64("epoch")?,
                address: r.str8("address")?.to_owned(),
            },
            status::FRAME_ERROR => {
                Response::FrameError { kind: r.u16("kind")?, detail: r.str8("detail")?.to_owned() }
            }
            _ => return Err(BodyError::Invalid("status")),
        };
        if r.misfit_user() {
            return Err(BodyError::Invalid("user_id"));
        }
        r.finish()?;
        Ok(response)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// [`opcode::REQUESTS`] is what the server answers `UNAUTHENTICATED` or `UNKNOWN_OPCODE`
    /// by: it must name exactly the opcodes [`Request::decode`] knows, no more, no fewer.
    #[test]
    fn requests_lists_exactly_the_opcodes_request_decode_knows() {
        for op in 0..=u16::MAX {
            let known = !matches!(Request::decode(op, &[]), Err(DecodeError::UnknownOpcode(_)));
            assert_eq!(known, opcode::is_request(op), "opcode {op:#06x}");
        }
        let mut sorted = opcode::REQUESTS.to_vec();
        sorted.sort_unstable();
        sorted.dedup();
        assert_eq!(sorted.len(), opcode::REQUESTS.len(), "an opcode listed twice");
    }

    /// Every request and push has a name of its own (metrics label requests by it), and
    /// nothing else has one; each decodes back as a request of its opcode.
    #[test]
    fn every_request_and_push_has_a_name_of_its_own() {
        let named: Vec<u16> = (0..=u16::MAX).filter(|&op| opcode::name(op).is_some()).collect();
        let mut expected: Vec<u16> = opcode::REQUESTS
            .iter()
            .copied()
            .chain([opcode::NOTICE, opcode::DEVICE_MESSAGE])
            .collect();
        expected.sort_unstable();
        assert_eq!(named, expected);
        let mut names: Vec<&str> = named.iter().filter_map(|&op| opcode::name(op)).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), named.len(), "a name given twice");
        assert_eq!(opcode::name(opcode::REDEEM_CODE_BASKET), Some("redeem_code_basket"));
    }
}
