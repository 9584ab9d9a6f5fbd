//! One request in, one response out: permission checks, then the engine.
//!
//! `AUTHORIZE` requests are handled a batch at a time by [`authorize_batch`] so the engine can
//! verify their tags together; every other request goes through [`handle`].

use settlegate_engine::engine::BasketOutcome;
use settlegate_engine::inherent::peek_terminal_id;
use settlegate_engine::{
    AuthOutcome, AuthorizeRequest, Basket, Engine, EngineError, EnrollRequest, ReasonCode,
};
use settlegate_protocol::messages::{opcode, status, Reply, Request, Response, ServerInfo};

use crate::identity::{permission, Identity};
use crate::metrics::{BatchCounts, Metrics, OutcomeLabels, RequestLabels};

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

/// Handles a request other than `AUTH`, `AUTHORIZE`, `AUTHORIZE_BASKET`, `SUBSCRIBE_NOTICES`
/// and `SUBSCRIBE_DEVICE` (which need the connection's state and are handled there). A request
/// with a user ID that does not fit its type (`Request::MisfitUserId`, any opcode) comes here:
/// checked against the identity's permissions as the request it is, then refused with 51.
pub async fn handle(ctx: &Context, identity: &Identity, request: Request) -> Response {
    if let Some(refusal) = forbidden(identity, &request) {
        return refusal;
    }
    let engine = &ctx.engine;
    let result = match request {
        Request::Ping { payload } => Ok(Reply::Pong(payload)),
        Request::ServerInfo => Ok(Reply::ServerInfo(ctx.info.clone())),
        Request::Enroll { client_request_id, user, password, card_idm } => engine
            .enroll(EnrollRequest { client_request_id, user, password, card_idm })
            .await
            .map(Reply::Credential),
        Request::Login { user, password } => {
            engine.login(&user, &password).await.map(|()| Reply::Empty)
        }
        Request::AddMeans { client_request_id, user, make_default, means } => engine
            .add_means(client_request_id, &user, &means, make_default)
            .await
            .map(Reply::MeansAdded),
        Request::SetDefaultMeans { client_request_id, user, means_id } => engine
            .set_default_means(client_request_id, &user, means_id)
            .await
            .map(|()| Reply::Empty),
        Request::ListMeans { user, order } => {
            engine.list_means(&user, order).await.map(Reply::Means)
        }
        Request::ProvisionDevice { client_request_id, user, password, card_idm } => engine
            .provision_device(client_request_id, &user, &password, card_idm)
            .await
            .map(Reply::Credential),
        Request::RotateDeviceKey { client_request_id, user, password, card_idm } => engine
            .rotate_device_key(client_request_id, &user, &password, card_idm)
            .await
            .map(Reply::Credential),
        Request::RevokeDeviceKey { client_request_id, user, password, card_idm } => engine
            .revoke_device_key(client_request_id, &user, &password, card_idm)
            .await
            .map(|()| Reply::Empty),
        Request::RegisterTerminals { client_request_id, provider_code, terminals } => engine
            .register_terminals(client_request_id, provider_code, terminals)
            .await
            .map(|()| Reply::Empty),
        Request::RemoveTerminals { client_request_id, provider_code, terminal_ids } => engine
            .remove_terminals(client_request_id, provider_code, terminal_ids)
            .await
            .map(|()| Reply::Empty),
        Request::ConfirmTerminal { provider_code, terminal_id } => {
            engine.confirm_terminal(provider_code, &terminal_id).map(Reply::Confirmation)
        }
        Request::RegisterAge { client_request_id, record } => {
            engine.register_age(client_request_id, &record).await.map(|()| Reply::Empty)
        }
        Request::SetAgePolicy { client_request_id, provider_code, terminal_id, policy } => engine
            .set_age_policy(client_request_id, provider_code, &terminal_id, policy)
            .await
            .map(|()| Reply::Empty),
        Request::UpsertStore { client_request_id, store } => {
            engine.upsert_store(client_request_id, store).await.map(|()| Reply::Empty)
        }
        Request::RemoveStore { client_request_id, store_id } => {
            engine.remove_store(client_request_id, &store_id).await.map(|()| Reply::Empty)
        }
        Request::StoreAt { latitude_e7, longitude_e7, radius_m } => {
            let (latitude, longitude) =
                (f64::from(latitude_e7) / 1e7, f64::from(longitude_e7) / 1e7);
            engine
                .store_at(latitude, longitude, radius_m)
                .await
                .map(|e| Reply::Entered(Box::new(e)))
        }
        Request::StoreBySignal { signal, id } => {
            engine.store_by_signal(signal, &id).await.map(|e| Reply::Entered(Box::new(e)))
        }
        Request::TopUp { client_request_id, user, means_id, amount_minor, currency } => engine
            .top_up(client_request_id, &user, means_id, amount_minor, currency)
            .await
            .map(Reply::Balance),
        Request::UsableMethods { user, store_id, best_by } => engine
            .usable_methods(&user, &store_id, best_by)
            .await
            .map(|u| Reply::Usable(Box::new(u))),
        Request::Wallet { user } => engine
            .list_means(&user, settlegate_engine::MeansOrder::Registration)
            .await
            .map(Reply::Wallet),
        Request::IssueCode { request } => engine.issue_code(request).await.map(Reply::Code),
        Request::RedeemCode { request } => {
            engine.redeem_code(request).await.map(|r| Reply::Redeemed(Box::new(r)))
        }
        // Only the codes of the identity's own terminals: any other is "no such code".
        Request::CodeState { number } => engine
            .code_state_for(number, |terminal| identity.may_act_for_terminal(terminal))
            .await
            .map(|s| Reply::CodeState(Box::new(s))),
        Request::IssueCoupons {
            client_request_id,
            provider_code,
            effect,
            uses,
            expires_ms,
            users,
        } => {
            let results = engine
                .issue_coupons(client_request_id, provider_code, users, effect, uses, expires_ms)
                .await;
            let mut answers = Vec::with_capacity(results.len());
            for result in results {
                answers.push(match result {
                    Ok(coupon) => Ok(coupon),
                    Err(EngineError::Refused(reason)) => Err(reason),
                    Err(other) => return error_response(other),
                });
            }
            Ok(Reply::Coupons(answers))
        }
        Request::NotifyDelivery { client_request_id, notice } => engine
            .notify_delivery(client_request_id, notice)
            .await
            .map(|n| Reply::Delivered(n as u32)),
        // Permitted as the request it is: refused for its user ID.
        Request::MisfitUserId { .. } => Err(EngineError::Refused(ReasonCode::InvalidUserId)),
        Request::Auth { .. }
        | Request::Authorize { .. }
        | Request::AuthorizeBasket { .. }
        | Request::SubscribeDevice { .. }
        | Request::SubscribeNotices { .. } => {
            return Response::Internal("request routed to the wrong handler".into());
        }
    };
    match result {
        Ok(reply) => Response::Ok(reply),
        Err(error) => error_response(error),
    }
}

/// The permission check of every request but `AUTHORIZE` (checked per record).
pub fn forbidden(identity: &Identity, request: &Request) -> Option<Response> {
    let deny = |what: &str| Some(Response::Forbidden(format!("identity may not {what}")));
    match request {
        Request::Auth { .. } | Request::Ping { .. } | Request::ServerInfo => None,
        Request::Enroll { .. }
        | Request::Login { .. }
        | Request::AddMeans { .. }
        | Request::SetDefaultMeans { .. }
        | Request::ListMeans { .. }
        | Request::ProvisionDevice { .. }
        | Request::RotateDeviceKey { .. }
        | Request::RevokeDeviceKey { .. }
        | Request::RegisterAge { .. }
        | Request::StoreAt { .. }
        | Request::StoreBySignal { .. }
        | Request::TopUp { .. }
        | Request::UsableMethods { .. }
        | Request::Wallet { .. }
        | Request::IssueCode { .. }
        | Request::SubscribeDevice { .. }
        | Request::SubscribeNotices { .. } => {
            (!identity.may(permission::ACCOUNTS)).then(|| deny("use account operations")).flatten()
        }
        Request::RegisterTerminals { provider_code, .. }
        | Request::RemoveTerminals { provider_code, .. }
        | Request::SetAgePolicy { provider_code, .. } => {
            let allowed =
                identity.may(permission::PROVIDERS) && identity.may_manage_provider(*provider_code);
            (!allowed).then(|| deny("manage this provider's terminals")).flatten()
        }
        Request::ConfirmTerminal { terminal_id, .. } => {
            let allowed =
                identity.may(permission::AUTHORIZE) && identity.may_act_for_terminal(terminal_id);
            (!allowed).then(|| deny("act for this terminal")).flatten()
        }
        Request::RedeemCode { request } => {
            let allowed = identity.may(permission::AUTHORIZE)
                && identity.may_act_for_terminal(&request.terminal_id);
            (!allowed).then(|| deny("act for this terminal")).flatten()
        }
        Request::CodeState { .. } => {
            (!identity.may(permission::AUTHORIZE)).then(|| deny("read codes")).flatten()
        }
        Request::IssueCoupons { provider_code, .. } => {
            let allowed =
                identity.may(permission::PROVIDERS) && identity.may_manage_provider(*provider_code);
            (!allowed).then(|| deny("issue this provider's coupons")).flatten()
        }
        Request::UpsertStore { .. }
        | Request::RemoveStore { .. }
        | Request::NotifyDelivery { .. } => {
            (!identity.may(permission::STORES)).then(|| deny("manage stores")).flatten()
        }
        Request::Authorize { .. } | Request::AuthorizeBasket { .. } => None,
        Request::MisfitUserId { request, .. } => forbidden(identity, request),
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
        Response::Ok(Reply::BasketOutcome(outcome.outcome, outcome.verdict))
    } else {
        Response::Ok(Reply::Outcome(outcome.outcome))
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

fn op_name(opcode: u16) -> &'static str {
    use settlegate_protocol::opcode::*;
    match opcode {
        AUTH => "auth",
        PING => "ping",
        SERVER_INFO => "server_info",
        ENROLL => "enroll",
        LOGIN => "login",
        ADD_MEANS => "add_means",
        SET_DEFAULT_MEANS => "set_default_means",
        LIST_MEANS => "list_means",
        PROVISION_DEVICE => "provision_device",
        ROTATE_DEVICE_KEY => "rotate_device_key",
        REVOKE_DEVICE_KEY => "revoke_device_key",
        SUBSCRIBE_NOTICES => "subscribe_notices",
        REGISTER_TERMINALS => "register_terminals",
        REMOVE_TERMINALS => "remove_terminals",
        CONFIRM_TERMINAL => "confirm_terminal",
        AUTHORIZE => "authorize",
        AUTHORIZE_BASKET => "authorize_basket",
        REGISTER_AGE => "register_age",
        SET_AGE_POLICY => "set_age_policy",
        UPSERT_STORE => "upsert_store",
        REMOVE_STORE => "remove_store",
        STORE_AT => "store_at",
        STORE_BY_SIGNAL => "store_by_signal",
        TOP_UP => "top_up",
        USABLE_METHODS => "usable_methods",
        WALLET => "wallet",
        ISSUE_CODE => "issue_code",
        REDEEM_CODE => "redeem_code",
        REDEEM_CODE_BASKET => "redeem_code_basket",
        CODE_STATE => "code_state",
        ISSUE_COUPONS => "issue_coupons",
        NOTIFY_DELIVERY => "notify_delivery",
        SUBSCRIBE_DEVICE => "subscribe_device",
        _ => "unknown",
    }
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
        status::FRAME_ERROR => "frame_error",
        _ => "internal",
    }
}
