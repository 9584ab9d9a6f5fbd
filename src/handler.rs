//! What every operation's handling shares: the [`Context`], engine errors as responses,
//! metrics labels; and `AUTHORIZE` and `AUTHORIZE_BASKET`, handled a batch at a time by
//! [`authorize_start`] so the engine can verify their tags together, each answered as soon as
//! its payment stands. Every other request goes
//! through [`crate::ops::handle`].

use settlegate_engine::engine::Authorizing;
use settlegate_engine::engine::BasketOutcome;
use settlegate_engine::inherent::peek_terminal_id;
use settlegate_engine::RequestId;
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
    /// The reconciliation reports `REPORT` pages through.
    pub reports: crate::report::Reports,
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

/// A batch of `AUTHORIZE`s and `AUTHORIZE_BASKET`s under way ([`authorize_start`]): each
/// response comes with its request ID and the opcode it answers, a group at a time, as the
/// payments stand.
pub struct AuthorizeAnswers {
    /// Responses that stand and have not been taken.
    ready: Vec<(u64, u16, Response)>,
    /// The request ID and opcode of each payment the engine has, by position.
    ids: Vec<(u64, u16)>,
    /// The engine's batch, when it has any payment.
    authorizing: Option<Authorizing>,
}

impl AuthorizeAnswers {
    /// The responses that stand and have not been taken yet.
    pub fn take_ready(&mut self, ctx: &Context) -> Vec<(u64, u16, Response)> {
        if let Some(authorizing) = &mut self.authorizing {
            let group = authorizing.take_ready();
            self.ready.extend(responses(ctx, &self.ids, group));
        }
        std::mem::take(&mut self.ready)
    }

    /// The next group of responses, as soon as their payments stand (a slow provider holds
    /// back only its own), or `None` when all have been taken.
    pub async fn next(&mut self, ctx: &Context) -> Option<Vec<(u64, u16, Response)>> {
        if !self.ready.is_empty() {
            return Some(std::mem::take(&mut self.ready));
        }
        let group = self.authorizing.as_mut()?.next().await?;
        Some(responses(ctx, &self.ids, group))
    }
}

/// Starts authorizing a batch: records this identity may not act for are refused; records too
/// broken to name a terminal are declined as malformed; the rest go to the engine together.
/// Returns once the engine has reserved them; what stands then is in
/// [`AuthorizeAnswers::take_ready`], the rest follows from [`AuthorizeAnswers::next`].
pub async fn authorize_start(
    ctx: &Context,
    identity: &Identity,
    batch: Vec<PendingAuthorize>,
) -> AuthorizeAnswers {
    let mut ready = Vec::new();
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
                ready.push((pending.request_id, op, outcome_response(op, malformed)))
            }
            Some(terminal)
                if !(identity.may(permission::AUTHORIZE)
                    && identity.may_act_for_terminal(terminal)) =>
            {
                ready.push((
                    pending.request_id,
                    op,
                    Response::Forbidden("identity may not act for this terminal".into()),
                ))
            }
            Some(_) => {
                ids.push((pending.request_id, op));
                let request = AuthorizeRequest {
                    client_request_id: RequestId(pending.client_request_id),
                    inherent_id: pending.inherent_id,
                };
                requests.push((request, pending.basket));
            }
        }
    }
    let mut authorizing = None;
    if !requests.is_empty() {
        ctx.metrics.authorize_batch_size.observe(requests.len() as f64);
        authorizing = Some(ctx.engine.authorize_start(requests).await);
    }
    AuthorizeAnswers { ready, ids, authorizing }
}

/// The responses of a group of the engine's results, counted in the outcome metrics.
fn responses(
    ctx: &Context,
    ids: &[(u64, u16)],
    group: Vec<(usize, Result<BasketOutcome, EngineError>)>,
) -> Vec<(u64, u16, Response)> {
    let mut outcomes = BatchCounts::default();
    let responses = group
        .into_iter()
        .map(|(index, result)| {
            let (request_id, op) = ids[index];
            let response = match result {
                Ok(outcome) => {
                    outcomes.add(outcome_labels(&outcome.outcome));
                    outcome_response(op, outcome)
                }
                Err(error) => error_response(error),
            };
            (request_id, op, response)
        })
        .collect();
    outcomes.flush(&ctx.metrics.outcomes);
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
        AuthOutcome::Approved(_) => OutcomeLabels { result: "approved", reason: "none" },
        AuthOutcome::Declined(reason) => {
            OutcomeLabels { result: "declined", reason: crate::metrics::reason_name(*reason) }
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

/// The labels a request's latency is recorded under.
pub fn op_labels(opcode: u16) -> crate::metrics::OpLabels {
    crate::metrics::OpLabels { op: op_name(opcode) }
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
