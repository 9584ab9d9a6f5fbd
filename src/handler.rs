//! What every operation's handling shares: the [`Context`], engine errors as responses,
//! metrics labels; and `AUTHORIZE` and `AUTHORIZE_BASKET`, handled a batch at a time by
//! [`authorize_batch`] so the engine can verify their tags together. Every other request goes
//! through [`crate::ops::handle`].

use settlegate_engine::engine::BasketOutcome;
use settlegate_engine::inherent::peek_terminal_id;
use settlegate_engine::{AuthOutcome, AuthorizeRequest, Basket, Engine, EngineError, ReasonCode};
use settlegate_protocol::messages::{opcode, status, Reply, Response, ServerInfo};

use crate::identity::{permission, Identity};
use crate::metrics::{BatchCounts, Metrics, OutcomeLabels, RequestLabels};
use crate::wire_map::ToWire as _;

/// What a handler needs.
pub struct Context {
    /// The engine.
    pub engine: Engine,
    /// Metrics.
    pub metrics: Metrics,
    /// The `SERVER_INFO` reply.
    pub info: ServerInfo,
}

/// An `AUTHORIZE` or `AUTHORIZE_BASKET` waiting for its batch.
pub struct PendingAuthorize {
    /// Frame request ID.
    pub request_id: u64,
    /// Client request ID.
    pub client_request_id: u128,
    /// Signed inherent ID.
    pub inherent_id: Vec<u8>,
    /// The basket of an `AUTHORIZE_BASKET`.
    pub basket: Option<Basket>,
}

impl PendingAuthorize {
    /// The opcode its response answers.
    pub fn opcode(&self) -> u16 {
        if self.basket.is_some() {
            opcode::AUTHORIZE_BASKET
        } else {
            opcode::AUTHORIZE
        }
    }
}

/// Authorizes a batch: records this identity may not act for are refused; records too broken
/// to name a terminal are declined as malformed; the rest go to the engine together. Each
/// response comes with its request ID and the opcode it answers.
pub async fn authorize_batch(
    ctx: &Context,
    identity: &Identity,
    batch: Vec<PendingAuthorize>,
) -> Vec<(u64, u16, Response)> {
    let mut responses = Vec::with_capacity(batch.len());
    let mut ids = Vec::with_capacity(batch.len());
    let mut requests = Vec::with_capacity(batch.len());
    for pending in batch {
        let op = pending.opcode();
        match peek_terminal_id(&pending.inherent_id) {
            None => {
                let malformed = BasketOutcome {
                    outcome: AuthOutcome::Declined(ReasonCode::Malformed),
                    verdict: None,
                };
                responses.push((pending.request_id, op, outcome_response(op, malformed)))
            }
            Some(terminal)
                if !(identity.may(permission::AUTHORIZE)
                    && identity.may_act_for_terminal(terminal)) =>
            {
                responses.push((
                    pending.request_id,
                    op,
                    Response::Forbidden("identity may not act for this terminal".into()),
                ))
            }
            Some(_) => {
                ids.push((pending.request_id, op));
                let request = AuthorizeRequest {
                    client_request_id: pending.client_request_id,
                    inherent_id: pending.inherent_id,
                };
                requests.push((request, pending.basket));
            }
        }
    }
    if !requests.is_empty() {
        ctx.metrics.authorize_batch_size.observe(requests.len() as f64);
        let results = ctx.engine.authorize_baskets(requests).await;
        let mut outcomes = BatchCounts::default();
        for ((request_id, op), result) in ids.into_iter().zip(results) {
            let response = match result {
                Ok(outcome) => {
                    outcomes.add(outcome_labels(&outcome.outcome));
                    outcome_response(op, outcome)
                }
                Err(error) => error_response(error),
            };
            responses.push((request_id, op, response));
        }
        outcomes.flush(&ctx.metrics.outcomes);
    }
    responses
}

/// The `OK` response of an `AUTHORIZE` (the outcome) or `AUTHORIZE_BASKET` (with the verdict).
fn outcome_response(op: u16, outcome: BasketOutcome) -> Response {
    if op == opcode::AUTHORIZE_BASKET {
        Response::Ok(Reply::AuthorizeBasket(outcome.to_wire()))
    } else {
        Response::Ok(Reply::Authorize(outcome.outcome))
    }
}

fn outcome_labels(outcome: &AuthOutcome) -> OutcomeLabels {
    match outcome {
        AuthOutcome::Approved(_) => OutcomeLabels { result: "approved", reason: 0 },
        AuthOutcome::Declined(reason) => {
            OutcomeLabels { result: "declined", reason: reason.code() }
        }
    }
}

/// The response for an engine error.
pub fn error_response(error: EngineError) -> Response {
    match error {
        EngineError::Refused(reason) => Response::Refused(reason),
        EngineError::Busy { retry_after_ms } => Response::Busy { retry_after_ms },
        EngineError::InFlight => Response::InFlight,
        EngineError::Stopped => Response::ShuttingDown,
        EngineError::Moved(moved) => {
            Response::Moved { partition: moved.partition, epoch: moved.epoch, address: moved.addr }
        }
        other => Response::Internal(other.to_string()),
    }
}

/// Counts a response in the metrics.
pub fn count_request(metrics: &Metrics, opcode: u16, status_code: u16) {
    metrics.requests.get_or_create(&request_labels(opcode, status_code)).inc();
}

/// The labels a response is counted under.
pub fn request_labels(opcode: u16, status_code: u16) -> RequestLabels {
    RequestLabels { op: op_name(opcode), status: status_name(status_code) }
}

/// A request's name (`unknown` for anything else, pushes included).
fn op_name(op: u16) -> &'static str {
    opcode::is_request(op).then(|| opcode::name(op)).flatten().unwrap_or("unknown")
}

fn status_name(code: u16) -> &'static str {
    match code {
        status::OK => "ok",
        status::REFUSED => "refused",
        status::BUSY => "busy",
        status::IN_FLIGHT => "in_flight",
        status::UNAUTHENTICATED => "unauthenticated",
        status::FORBIDDEN => "forbidden",
        status::BAD_REQUEST => "bad_request",
        status::UNKNOWN_OPCODE => "unknown_opcode",
        status::SHUTTING_DOWN => "shutting_down",
        status::MOVED => "moved",
        status::FRAME_ERROR => "frame_error",
        _ => "internal",
    }
}
