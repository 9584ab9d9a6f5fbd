//! The server's side of each operation: who may send it (`Serve::permit`) and its engine
//! call, with the mapping between the wire's types and the engine's (`Serve::serve`), one
//! `impl` per operation. The dispatch, [`handle`] and [`forbidden`], is generated from the
//! protocol's list of operations (`settlegate_protocol::with_operations!`): a new operation is
//! its `impl Serve` here, and nothing else in the server.
//!
//! `AUTH`, `AUTHORIZE`, `AUTHORIZE_BASKET`, `SUBSCRIBE_NOTICES` and `SUBSCRIBE_DEVICE` need the
//! connection's state: the connection handles them ([`crate::connection`], with
//! [`crate::handler::authorize_start`] for the authorizations), and they never reach
//! `Serve::serve`.

use settlegate_engine::{AddMeansOptions, ProviderCode, RequestId};
use std::future::Future;

use settlegate_engine::{EngineError, EnrollRequest, MeansOrder, ReasonCode};
use settlegate_protocol::messages::{
    MeansList, Reply, Request, Response, ServerInfo, WalletEntries,
};
use settlegate_protocol::ops::*;
use settlegate_protocol::values::{DeviceCredential, EnteredStore, IssuedCoupon, Redemption};
use settlegate_protocol::Operation;

use crate::handler::{error_response, Context};
use crate::identity::{permission, Identity};
use crate::wire_map::{ToEngine as _, ToWire as _};

/// What an identity needs to send an operation.
pub(crate) enum Permit<'a> {
    /// Anyone (or checked elsewhere: an authorization is checked per record).
    Anyone,
    /// The account permission.
    Accounts,
    /// The provider permission, for this provider; the action named in the refusal.
    Provider(u32, &'static str),
    /// The authorize permission, for this store terminal.
    Terminal(&'a str),
    /// The authorize permission (reading codes).
    ReadCodes,
    /// The store permission.
    Stores,
    /// The report permission, for this provider.
    Report(u32),
}

impl Permit<'_> {
    /// The `FORBIDDEN` answer, if `identity` lacks the permit.
    fn refusal(self, identity: &Identity) -> Option<Response> {
        let (allowed, what) = match self {
            Permit::Anyone => return None,
            Permit::Accounts => (identity.may(permission::ACCOUNTS), "use account operations"),
            Permit::Provider(provider_code, what) => (
                identity.may(permission::PROVIDERS) && identity.may_manage_provider(provider_code),
                what,
            ),
            Permit::Terminal(terminal) => (
                identity.may(permission::AUTHORIZE) && identity.may_act_for_terminal(terminal),
                "act for this terminal",
            ),
            Permit::ReadCodes => (identity.may(permission::AUTHORIZE), "read codes"),
            Permit::Stores => (identity.may(permission::STORES), "manage stores"),
            Permit::Report(provider_code) => (
                identity.may(permission::REPORT) && identity.may_manage_provider(provider_code),
                "read this provider's report",
            ),
        };
        (!allowed).then(|| Response::Forbidden(format!("identity may not {what}")))
    }
}

/// Why an operation has no reply.
pub(crate) enum Failure {
    /// The engine's error.
    Engine(EngineError),
    /// A request the connection handles itself came here.
    Misrouted,
}

impl From<EngineError> for Failure {
    fn from(error: EngineError) -> Failure {
        Failure::Engine(error)
    }
}

/// An operation the connection handles itself, should it come here.
fn routed_elsewhere<T>() -> Result<T, Failure> {
    Err(Failure::Misrouted)
}

/// An operation as the server runs it.
pub(crate) trait Serve: Operation {
    /// What an identity needs to send it.
    fn permit(&self) -> Permit<'_>;
    /// Runs it (permitted) on the engine.
    fn serve(
        self,
        ctx: &Context,
        identity: &Identity,
    ) -> impl Future<Output = Result<Self::Reply, Failure>> + Send;
}

/// Declares [`handle`] and [`forbidden`] from the list of operations.
macro_rules! dispatch {
    (
        requests {
            $(
                $(#[doc = $doc:literal])*
                $variant:ident($module:ident::$ty:ident) = $opcode:ident $(, also $also:ident)*;
            )+
        }
        pushes { $($pushes:tt)* }
    ) => {
        /// Handles a request other than those the connection handles itself (see the module).
        /// A request with a user ID that does not fit its type (`Request::MisfitUserId`, any
        /// opcode) is checked against the identity's permissions as the request it is, then
        /// refused with 51.
        pub async fn handle(ctx: &Context, identity: &Identity, request: Request) -> Response {
            if let Some(refusal) = forbidden(identity, &request) {
                return refusal;
            }
            let result = match request {
                $(Request::$variant(op) => op.serve(ctx, identity).await.map(Reply::$variant),)+
                Request::MisfitUserId { .. } => {
                    Err(Failure::Engine(EngineError::Refused(ReasonCode::InvalidUserId)))
                }
            };
            match result {
                Ok(reply) => Response::Ok(reply),
                Err(Failure::Engine(error)) => error_response(error),
                Err(Failure::Misrouted) => {
                    Response::Internal("request routed to the wrong handler".into())
                }
            }
        }

        /// The permission check of every request (an authorization's is per record, later).
        pub fn forbidden(identity: &Identity, request: &Request) -> Option<Response> {
            match request {
                $(Request::$variant(op) => op.permit().refusal(identity),)+
                Request::MisfitUserId { request, .. } => forbidden(identity, request),
            }
        }
    };
}

settlegate_protocol::with_operations!(dispatch);

/// Declares the operations the connection handles itself: permitted as given, never served
/// here.
macro_rules! handled_by_the_connection {
    ($($ty:ty => $permit:ident;)+) => {
        $(
            impl Serve for $ty {
                fn permit(&self) -> Permit<'_> {
                    Permit::$permit
                }
                async fn serve(self, _: &Context, _: &Identity) -> Result<Self::Reply, Failure> {
                    routed_elsewhere()
                }
            }
        )+
    };
}

handled_by_the_connection! {
    Auth => Anyone;
    // Checked per record, by `handler::authorize_start`.
    Authorize => Anyone;
    AuthorizeBasket => Anyone;
    SubscribeNotices => Accounts;
    SubscribeDevice => Accounts;
}

impl Serve for Ping {
    fn permit(&self) -> Permit<'_> {
        Permit::Anyone
    }
    async fn serve(self, _: &Context, _: &Identity) -> Result<ping::Pong, Failure> {
        Ok(ping::Pong(self.payload))
    }
}

impl Serve for server_info::GetServerInfo {
    fn permit(&self) -> Permit<'_> {
        Permit::Anyone
    }
    async fn serve(self, ctx: &Context, _: &Identity) -> Result<ServerInfo, Failure> {
        Ok(ctx.info.clone())
    }
}

impl Serve for Enroll {
    fn permit(&self) -> Permit<'_> {
        Permit::Accounts
    }
    async fn serve(self, ctx: &Context, _: &Identity) -> Result<DeviceCredential, Failure> {
        let Enroll { client_request_id, user, password, card_idm } = self;
        let request = EnrollRequest {
            client_request_id: RequestId(client_request_id),
            user,
            password,
            card_idm,
        };
        Ok(ctx.engine.enroll(request).await?.to_wire())
    }
}

impl Serve for Login {
    fn permit(&self) -> Permit<'_> {
        Permit::Accounts
    }
    async fn serve(self, ctx: &Context, _: &Identity) -> Result<(), Failure> {
        Ok(ctx.engine.login(&self.user, &self.password).await?)
    }
}

impl Serve for AddMeans {
    fn permit(&self) -> Permit<'_> {
        Permit::Accounts
    }
    async fn serve(self, ctx: &Context, _: &Identity) -> Result<add_means::MeansAdded, Failure> {
        let means = self.means.to_engine();
        let added = ctx
            .engine
            .add_means(
                RequestId(self.client_request_id),
                &self.user,
                &means,
                AddMeansOptions { make_default: self.make_default },
            )
            .await?;
        Ok(added.to_wire())
    }
}

impl Serve for SetDefaultMeans {
    fn permit(&self) -> Permit<'_> {
        Permit::Accounts
    }
    async fn serve(self, ctx: &Context, _: &Identity) -> Result<(), Failure> {
        let engine = &ctx.engine;
        Ok(engine
            .set_default_means(RequestId(self.client_request_id), &self.user, self.means_id)
            .await?)
    }
}

impl Serve for ListMeans {
    fn permit(&self) -> Permit<'_> {
        Permit::Accounts
    }
    async fn serve(self, ctx: &Context, _: &Identity) -> Result<MeansList, Failure> {
        let means = ctx.engine.list_means(&self.user, self.order.to_engine()).await?;
        Ok(MeansList(means.to_wire()))
    }
}

impl Serve for ProvisionDevice {
    fn permit(&self) -> Permit<'_> {
        Permit::Accounts
    }
    async fn serve(self, ctx: &Context, _: &Identity) -> Result<DeviceCredential, Failure> {
        let ProvisionDevice { client_request_id, user, password, card_idm } = self;
        let engine = &ctx.engine;
        Ok(engine
            .provision_device(RequestId(client_request_id), &user, &password, card_idm)
            .await?
            .to_wire())
    }
}

impl Serve for RotateDeviceKey {
    fn permit(&self) -> Permit<'_> {
        Permit::Accounts
    }
    async fn serve(self, ctx: &Context, _: &Identity) -> Result<DeviceCredential, Failure> {
        let RotateDeviceKey { client_request_id, user, password, card_idm } = self;
        let engine = &ctx.engine;
        Ok(engine
            .rotate_device_key(RequestId(client_request_id), &user, &password, card_idm)
            .await?
            .to_wire())
    }
}

impl Serve for RevokeDeviceKey {
    fn permit(&self) -> Permit<'_> {
        Permit::Accounts
    }
    async fn serve(self, ctx: &Context, _: &Identity) -> Result<(), Failure> {
        let RevokeDeviceKey { client_request_id, user, password, card_idm } = self;
        Ok(ctx
            .engine
            .revoke_device_key(RequestId(client_request_id), &user, &password, card_idm)
            .await?)
    }
}

impl Serve for RegisterTerminals {
    fn permit(&self) -> Permit<'_> {
        Permit::Provider(self.provider_code, "manage this provider's terminals")
    }
    async fn serve(self, ctx: &Context, _: &Identity) -> Result<(), Failure> {
        let terminals = self.terminals.to_engine();
        let engine = &ctx.engine;
        Ok(engine
            .register_terminals(
                RequestId(self.client_request_id),
                ProviderCode(self.provider_code),
                terminals,
            )
            .await?)
    }
}

impl Serve for RemoveTerminals {
    fn permit(&self) -> Permit<'_> {
        Permit::Provider(self.provider_code, "manage this provider's terminals")
    }
    async fn serve(self, ctx: &Context, _: &Identity) -> Result<(), Failure> {
        let RemoveTerminals { client_request_id, provider_code, terminal_ids } = self;
        Ok(ctx
            .engine
            .remove_terminals(
                RequestId(client_request_id),
                ProviderCode(provider_code),
                terminal_ids,
            )
            .await?)
    }
}

impl Serve for ConfirmTerminal {
    fn permit(&self) -> Permit<'_> {
        Permit::Terminal(&self.terminal_id)
    }
    async fn serve(
        self,
        ctx: &Context,
        _: &Identity,
    ) -> Result<confirm_terminal::TerminalConfirmation, Failure> {
        Ok(ctx
            .engine
            .confirm_terminal(ProviderCode(self.provider_code), &self.terminal_id)?
            .to_wire())
    }
}

impl Serve for RegisterAge {
    fn permit(&self) -> Permit<'_> {
        Permit::Accounts
    }
    async fn serve(self, ctx: &Context, _: &Identity) -> Result<(), Failure> {
        Ok(ctx.engine.register_age(RequestId(self.client_request_id), &self.record).await?)
    }
}

impl Serve for SetAgePolicy {
    fn permit(&self) -> Permit<'_> {
        Permit::Provider(self.provider_code, "manage this provider's terminals")
    }
    async fn serve(self, ctx: &Context, _: &Identity) -> Result<(), Failure> {
        let SetAgePolicy { client_request_id, provider_code, terminal_id, policy } = self;
        let policy = policy.to_engine();
        let engine = &ctx.engine;
        Ok(engine
            .set_age_policy(
                RequestId(client_request_id),
                ProviderCode(provider_code),
                &terminal_id,
                policy,
            )
            .await?)
    }
}

impl Serve for UpsertStore {
    fn permit(&self) -> Permit<'_> {
        Permit::Stores
    }
    async fn serve(self, ctx: &Context, _: &Identity) -> Result<(), Failure> {
        Ok(ctx
            .engine
            .upsert_store(RequestId(self.client_request_id), self.store.to_engine())
            .await?)
    }
}

impl Serve for RemoveStore {
    fn permit(&self) -> Permit<'_> {
        Permit::Stores
    }
    async fn serve(self, ctx: &Context, _: &Identity) -> Result<(), Failure> {
        Ok(ctx.engine.remove_store(RequestId(self.client_request_id), &self.store_id).await?)
    }
}

impl Serve for StoreAt {
    fn permit(&self) -> Permit<'_> {
        Permit::Accounts
    }
    async fn serve(self, ctx: &Context, _: &Identity) -> Result<Box<EnteredStore>, Failure> {
        let (latitude, longitude) =
            (f64::from(self.latitude_e7) / 1e7, f64::from(self.longitude_e7) / 1e7);
        let entered = ctx.engine.store_at(latitude, longitude, self.radius_m).await?;
        Ok(Box::new(entered.to_wire()))
    }
}

impl Serve for StoreBySignal {
    fn permit(&self) -> Permit<'_> {
        Permit::Accounts
    }
    async fn serve(self, ctx: &Context, _: &Identity) -> Result<Box<EnteredStore>, Failure> {
        let entered = ctx.engine.store_by_signal(self.signal.to_engine(), &self.id).await?;
        Ok(Box::new(entered.to_wire()))
    }
}

impl Serve for TopUp {
    fn permit(&self) -> Permit<'_> {
        Permit::Accounts
    }
    async fn serve(
        self,
        ctx: &Context,
        _: &Identity,
    ) -> Result<settlegate_protocol::values::Balance, Failure> {
        let TopUp { client_request_id, user, means_id, amount_minor, currency } = self;
        let engine = &ctx.engine;
        let balance = engine
            .top_up(RequestId(client_request_id), &user, means_id, amount_minor, currency)
            .await?;
        Ok(balance.to_wire())
    }
}

impl Serve for UsableMethods {
    fn permit(&self) -> Permit<'_> {
        Permit::Accounts
    }
    async fn serve(
        self,
        ctx: &Context,
        _: &Identity,
    ) -> Result<Box<usable_methods::UsableAtStore>, Failure> {
        let best_by = self.best_by.to_engine();
        let usable = ctx.engine.usable_methods(&self.user, &self.store_id, best_by).await?;
        Ok(Box::new(usable.to_wire()))
    }
}

impl Serve for Wallet {
    fn permit(&self) -> Permit<'_> {
        Permit::Accounts
    }
    async fn serve(self, ctx: &Context, _: &Identity) -> Result<WalletEntries, Failure> {
        let means = ctx.engine.list_means(&self.user, MeansOrder::Registration).await?;
        Ok(WalletEntries(means.to_wire()))
    }
}

impl Serve for IssueCode {
    fn permit(&self) -> Permit<'_> {
        Permit::Accounts
    }
    async fn serve(self, ctx: &Context, _: &Identity) -> Result<issue_code::CodeOutcome, Failure> {
        Ok(ctx.engine.issue_code(self.to_engine()).await?.to_wire())
    }
}

impl Serve for RedeemCode {
    fn permit(&self) -> Permit<'_> {
        Permit::Terminal(&self.terminal_id)
    }
    async fn serve(self, ctx: &Context, _: &Identity) -> Result<Box<Redemption>, Failure> {
        Ok(Box::new(ctx.engine.redeem_code(self.to_engine()).await?.to_wire()))
    }
}

impl Serve for void::Void {
    fn permit(&self) -> Permit<'_> {
        Permit::Terminal(&self.terminal_id)
    }
    async fn serve(self, ctx: &Context, _: &Identity) -> Result<void::Voided, Failure> {
        let void::Void { client_request_id, target, terminal_id } = self;
        let void::Target::Code(number) = target else {
            // Not reached: a `VOID` naming anything but a code does not parse.
            return Err(EngineError::Refused(ReasonCode::UnknownCode).into());
        };
        let voided =
            ctx.engine.void_code(RequestId(client_request_id), number, terminal_id).await?;
        Ok(void::Voided { released_minor: voided.released_minor })
    }
}

impl Serve for refund::Refund {
    fn permit(&self) -> Permit<'_> {
        Permit::Terminal(&self.terminal_id)
    }
    async fn serve(self, ctx: &Context, _: &Identity) -> Result<refund::Refunded, Failure> {
        let refund::Refund { client_request_id, target, amount_minor, terminal_id } = self;
        let id = RequestId(client_request_id);
        let engine = &ctx.engine;
        let refunded = match target {
            void::Target::Code(number) => {
                engine.refund_code(id, number, amount_minor, terminal_id).await?
            }
            void::Target::Payment { user, payment_request_id } => {
                engine
                    .refund_payment(id, &user, payment_request_id, amount_minor, terminal_id)
                    .await?
            }
        };
        Ok(refund::Refunded {
            amount_minor: refunded.amount_minor,
            refunded_minor: refunded.refunded_minor,
            captured_minor: refunded.captured_minor,
        })
    }
}

impl Serve for code_state::GetCodeState {
    fn permit(&self) -> Permit<'_> {
        Permit::ReadCodes
    }
    /// Only the codes of the identity's own terminals: any other is "no such code".
    async fn serve(
        self,
        ctx: &Context,
        identity: &Identity,
    ) -> Result<code_state::CodeState, Failure> {
        let engine = &ctx.engine;
        let state = engine
            .code_state_for(self.number, |terminal| identity.may_act_for_terminal(terminal))
            .await?;
        Ok(state.to_wire())
    }
}

impl Serve for IssueCoupons {
    fn permit(&self) -> Permit<'_> {
        Permit::Provider(self.provider_code, "issue this provider's coupons")
    }
    async fn serve(
        self,
        ctx: &Context,
        _: &Identity,
    ) -> Result<Vec<Result<IssuedCoupon, ReasonCode>>, Failure> {
        let IssueCoupons { client_request_id, provider_code, effect, uses, expires_ms, users } =
            self;
        let results = ctx
            .engine
            .issue_coupons(
                RequestId(client_request_id),
                ProviderCode(provider_code),
                users,
                effect.to_engine(),
                uses,
                expires_ms,
            )
            .await;
        let mut answers = Vec::with_capacity(results.len());
        for result in results {
            answers.push(match result {
                Ok(coupon) => Ok(coupon.to_wire()),
                Err(EngineError::Refused(reason)) => Err(reason),
                Err(other) => return Err(other.into()),
            });
        }
        Ok(answers)
    }
}

impl Serve for NotifyDelivery {
    fn permit(&self) -> Permit<'_> {
        Permit::Stores
    }
    async fn serve(
        self,
        ctx: &Context,
        _: &Identity,
    ) -> Result<notify_delivery::Delivered, Failure> {
        let notice = self.notice.to_engine();
        let devices = ctx.engine.notify_delivery(RequestId(self.client_request_id), notice).await?;
        Ok(notify_delivery::Delivered { devices: devices as u32 })
    }
}

impl Serve for report::GetReport {
    fn permit(&self) -> Permit<'_> {
        Permit::Report(self.provider_code)
    }
    /// Only the rows of the provider asked for, which the identity's scope holds.
    async fn serve(self, ctx: &Context, _: &Identity) -> Result<report::ReportPage, Failure> {
        let config = ctx.engine.config();
        crate::report::available(config)?;
        let config = config.clone();
        let build = move || settlegate_engine::report::report(&config);
        Ok(ctx.reports.page(&self, ctx.engine.now_ms(), build).await?)
    }
}
