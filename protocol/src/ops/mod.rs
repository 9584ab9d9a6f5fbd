//! One file per operation: each opcode's request and reply types and their encodings
//! (`docs/PROTOCOL.md` section 5), behind [`Operation`].
//!
//! The dispatch tables — the [`opcode`] constants and lists, [`Request`], [`Reply`] and
//! their encode and decode — are generated from the one list at the end of this file. Adding
//! an operation is a file here and a line in that list.

use crate::wire::{BodyError, Reader, Writer};

/// An operation: a request type, sent under its opcode, and the reply it gets.
pub trait Operation: Sized {
    /// The request's opcode.
    const OPCODE: u16;
    /// Its name, as metrics and logs show it.
    const NAME: &'static str;
    /// Other opcodes the same request type is sent under, with their names: the body's form
    /// decides which (`REDEEM_CODE_BASKET` is a `REDEEM_CODE` whose lines are a basket). The
    /// list of operations names them too (`also`); `opcode::REQUESTS` is built from these, and
    /// a test checks it against what `Request::decode` knows.
    const ALSO: &'static [(u16, &'static str)] = &[];
    /// Whether it may be sent before the connection authenticates (`docs/PROTOCOL.md`
    /// section 3).
    const UNAUTHENTICATED: bool = false;
    /// The body of its `OK` response.
    type Reply: crate::values::Codec;

    /// The opcode this request is sent under.
    fn opcode(&self) -> u16 {
        Self::OPCODE
    }
    /// Appends the request's body.
    fn encode(&self, w: &mut Writer<'_>);
    /// Reads a body sent under `opcode` ([`Operation::OPCODE`] or one of [`Operation::ALSO`]).
    fn decode(opcode: u16, r: &mut Reader<'_>) -> Result<Self, BodyError>;
    /// What decides the partition (the shard) a cluster serves it in: a router sends it to that
    /// partition's owner (`docs/CLUSTER.md`). By default, any node (which answers `MOVED` if
    /// need be).
    fn route(&self) -> Route<'_> {
        Route::Any
    }
}

/// What decides the partition a request is served in (see [`Operation::route`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route<'a> {
    /// The user's.
    User(&'a settlegate_types::UserKey),
    /// The user of a signed record (an inherent ID), as it names them.
    Signed(&'a [u8]),
    /// A payment code's, from its issue number.
    Code(u64),
    /// No one partition: any node.
    Any,
}

/// A message the server pushes under a subscription, with no request of its own.
pub trait Push: crate::values::Codec {
    /// Its opcode.
    const OPCODE: u16;
    /// Its name.
    const NAME: &'static str;
}

/// Declares the operations: their modules, the [`opcode`] constants, [`Request`] and
/// [`Reply`] with their encode and decode.
macro_rules! operations {
    (
        requests {
            $(
                $(#[doc = $doc:literal])*
                $variant:ident($module:ident::$ty:ident) = $opcode:ident $(, also $also:ident)*;
            )+
        }
        pushes {
            $($(#[doc = $pdoc:literal])* $pvariant:ident($pmodule:ident::$pty:ident) = $popcode:ident;)+
        }
    ) => {
        $(pub mod $module;)+
        $(pub mod $pmodule;)+
        $(pub use $module::$ty;)+
        $(pub use $pmodule::$pty;)+

        /// Operation codes.
        pub mod opcode {
            use super::{Operation, Push};

            $($(#[doc = $doc])* pub const $opcode: u16 = <super::$module::$ty as Operation>::OPCODE;)+
            $($(#[doc = $pdoc])* pub const $popcode: u16 = <super::$pmodule::$pty as Push>::OPCODE;)+
            $($(pub use super::$module::$also;)*)+

            const REQUEST_COUNT: usize = 0 $(+ 1 + <super::$module::$ty as Operation>::ALSO.len())+;
            const REQUEST_ARRAY: [u16; REQUEST_COUNT] = {
                let mut out = [0; REQUEST_COUNT];
                let mut i = 0;
                $(
                    out[i] = <super::$module::$ty as Operation>::OPCODE;
                    i += 1;
                    let also = <super::$module::$ty as Operation>::ALSO;
                    let mut j = 0;
                    while j < also.len() {
                        out[i] = also[j].0;
                        i += 1;
                        j += 1;
                    }
                )+
                out
            };

            /// Every request opcode (pushes such as [`NOTICE`] and [`DEVICE_MESSAGE`] are not
            /// requests). A test checks it against [`Request::decode`](super::Request::decode).
            pub const REQUESTS: &[u16] = &REQUEST_ARRAY;

            /// Whether `op` names a request.
            pub fn is_request(op: u16) -> bool {
                matches!(op, $($opcode $(| $also)*)|+)
            }

            /// Whether a request of `op` may be sent before the connection authenticates
            /// (`docs/PROTOCOL.md` section 3): its body is not even parsed otherwise.
            pub fn allowed_unauthenticated(op: u16) -> bool {
                match op {
                    $($opcode $(| $also)* => <super::$module::$ty as Operation>::UNAUTHENTICATED,)+
                    _ => false,
                }
            }

            /// The name of the request or push `op`, if it is one.
            pub fn name(op: u16) -> Option<&'static str> {
                match op {
                    $($opcode => Some(<super::$module::$ty as Operation>::NAME),)+
                    $($($also => <super::$module::$ty as Operation>::ALSO
                        .iter()
                        .find(|&&(also, _)| also == op)
                        .map(|&(_, name)| name),)*)+
                    $($popcode => Some(<super::$pmodule::$pty as Push>::NAME),)+
                    _ => None,
                }
            }
        }

        /// A request.
        #[derive(Debug, Clone, PartialEq)]
        pub enum Request {
            $($(#[doc = $doc])* $variant($module::$ty),)+
            /// A request whose body parsed, but one of whose `user` IDs does not fit its type
            /// (or is not 1–64 bytes): it is authenticated and permission-checked as
            /// `request`, then refused with reason 51 (`InvalidUserId`). `request` holds a
            /// placeholder user in place of each such ID; `body` is the body as it came, which
            /// is what this request encodes to.
            MisfitUserId {
                /// The request as parsed, with placeholder users.
                request: Box<Request>,
                /// The body as it came.
                body: Vec<u8>,
            },
        }

        $(impl From<$module::$ty> for Request {
            fn from(op: $module::$ty) -> Request {
                Request::$variant(op)
            }
        })+

        impl Request {
            /// What decides the partition a cluster serves it in ([`Operation::route`]).
            pub fn route(&self) -> Route<'_> {
                match self {
                    $(Request::$variant(op) => op.route(),)+
                    Request::MisfitUserId { .. } => Route::Any,
                }
            }

            /// The request's opcode.
            pub fn opcode(&self) -> u16 {
                match self {
                    $(Request::$variant(op) => op.opcode(),)+
                    Request::MisfitUserId { request, .. } => request.opcode(),
                }
            }

            /// Appends the body.
            pub fn encode_body(&self, out: &mut Vec<u8>) {
                let mut w = Writer(out);
                match self {
                    $(Request::$variant(op) => op.encode(&mut w),)+
                    Request::MisfitUserId { body, .. } => {
                        w.raw(body);
                    }
                }
            }

            /// Parses the body of a request of `opcode` (any operation's).
            pub(crate) fn decode_body(
                opcode: u16,
                r: &mut Reader<'_>,
            ) -> Option<Result<Request, BodyError>> {
                match opcode {
                    $(opcode::$opcode $(| opcode::$also)* => {
                        Some(<$module::$ty as Operation>::decode(opcode, r).map(Request::$variant))
                    })+
                    _ => None,
                }
            }
        }

        /// The body of an `OK` response, by the request that asked (or the push).
        #[derive(Debug, Clone, PartialEq)]
        pub enum Reply {
            $($(#[doc = $doc])* $variant(<$module::$ty as Operation>::Reply),)+
            $($(#[doc = $pdoc])* $pvariant($pmodule::$pty),)+
        }

        impl Reply {
            /// Appends the body.
            pub(crate) fn encode(&self, w: &mut Writer<'_>) {
                use crate::values::Codec as _;
                match self {
                    $(Reply::$variant(reply) => reply.encode(w),)+
                    $(Reply::$pvariant(push) => push.encode(w),)+
                }
            }

            /// Parses the reply to a request of `opcode`, or the push of that opcode.
            pub(crate) fn decode(opcode: u16, r: &mut Reader<'_>) -> Result<Reply, BodyError> {
                use crate::values::Codec;
                match opcode {
                    $(opcode::$opcode $(| opcode::$also)* => Codec::decode(r).map(Reply::$variant),)+
                    $(opcode::$popcode => Codec::decode(r).map(Reply::$pvariant),)+
                    _ => Err(BodyError::Invalid("opcode")),
                }
            }

            /// Whether it is pushed under a subscription rather than answering a request.
            pub fn is_push(&self) -> bool {
                matches!(self, $(Reply::$pvariant(_))|+)
            }
        }
    };
}

/// Hands the list of operations to `$callback`, a `macro_rules!` macro of the caller's: the
/// one list the protocol's tables ([`Request`], [`Reply`], [`opcode`]) and the server's
/// dispatch are generated from. It is called with
///
/// ```text
/// requests { $( /// doc  Variant(module::RequestType) = OPCODE $(, also OTHER_OPCODE)*; )+ }
/// pushes { $( /// doc  Variant(module::PushType) = OPCODE; )+ }
/// ```
///
/// where `module` is a module of [`ops`](crate::ops) (`settlegate_protocol::ops::module`), and
/// each `also` names another opcode the same request type is sent under (a constant of that
/// module, listed in [`Operation::ALSO`]).
#[macro_export]
macro_rules! with_operations {
    ($callback:ident) => {
        $callback! {
            requests {
                /// Authenticate with an API key.
                Auth(auth::Auth) = AUTH;
                /// Echo.
                Ping(ping::Ping) = PING;
                /// Server facts.
                ServerInfo(server_info::GetServerInfo) = SERVER_INFO;
                /// Enroll a user and their first device.
                Enroll(enroll::Enroll) = ENROLL;
                /// Check a password.
                Login(login::Login) = LOGIN;
                /// Register a settlement means.
                AddMeans(add_means::AddMeans) = ADD_MEANS;
                /// Choose the default means.
                SetDefaultMeans(set_default_means::SetDefaultMeans) = SET_DEFAULT_MEANS;
                /// List a user's means.
                ListMeans(list_means::ListMeans) = LIST_MEANS;
                /// Provision another device.
                ProvisionDevice(provision_device::ProvisionDevice) = PROVISION_DEVICE;
                /// Rotate a device key.
                RotateDeviceKey(rotate_device_key::RotateDeviceKey) = ROTATE_DEVICE_KEY;
                /// Revoke every key of a device at once (a lost or stolen phone).
                RevokeDeviceKey(revoke_device_key::RevokeDeviceKey) = REVOKE_DEVICE_KEY;
                /// Subscribe to a user's completion notices.
                SubscribeNotices(subscribe_notices::SubscribeNotices) = SUBSCRIBE_NOTICES;
                /// List terminals for a provider.
                RegisterTerminals(register_terminals::RegisterTerminals) = REGISTER_TERMINALS;
                /// Remove terminals from a provider.
                RemoveTerminals(remove_terminals::RemoveTerminals) = REMOVE_TERMINALS;
                /// Terminal confirmation (S38–S39).
                ConfirmTerminal(confirm_terminal::ConfirmTerminal) = CONFIRM_TERMINAL;
                /// Authorize a settlement.
                Authorize(authorize::Authorize) = AUTHORIZE;
                /// Authorize a settlement with its basket of items (age check, A2–A3).
                AuthorizeBasket(authorize_basket::AuthorizeBasket) = AUTHORIZE_BASKET;
                /// Register a user terminal's age information (A1).
                RegisterAge(register_age::RegisterAge) = REGISTER_AGE;
                /// Set or clear a store terminal's age policy.
                SetAgePolicy(set_age_policy::SetAgePolicy) = SET_AGE_POLICY;
                /// Add or replace a store (W1).
                UpsertStore(upsert_store::UpsertStore) = UPSERT_STORE;
                /// Remove a store (W1).
                RemoveStore(remove_store::RemoveStore) = REMOVE_STORE;
                /// The store at a GPS position (W2).
                StoreAt(store_at::StoreAt) = STORE_AT;
                /// The store a beacon, Wi-Fi ID or QR poster names (W2).
                StoreBySignal(store_by_signal::StoreBySignal) = STORE_BY_SIGNAL;
                /// Load a stored-value means.
                TopUp(top_up::TopUp) = TOP_UP;
                /// What the user can pay with at a store (W3).
                UsableMethods(usable_methods::UsableMethods) = USABLE_METHODS;
                /// The user's methods with balances and use.
                Wallet(wallet::Wallet) = WALLET;
                /// Request a payment code (C1–C2, C4).
                IssueCode(issue_code::IssueCode) = ISSUE_CODE;
                /// Redeem a payment code at a POS (C3), with the sale's items or, for the age check,
                /// its basket (`REDEEM_CODE_BASKET`, C3 with A2).
                RedeemCode(redeem_code::RedeemCode) = REDEEM_CODE, also REDEEM_CODE_BASKET;
                /// A payment code's state and remittance record.
                CodeState(code_state::GetCodeState) = CODE_STATE;
                /// Void a payment code before its redemption: hold released, provider told.
                Void(void::Void) = VOID;
                /// Refund part or all of a redeemed code's capture.
                Refund(refund::Refund) = REFUND;
                /// Issue coupons or service codes to users (C5).
                IssueCoupons(issue_coupons::IssueCoupons) = ISSUE_COUPONS;
                /// Tell a user a cash-on-delivery parcel is coming (C4).
                NotifyDelivery(notify_delivery::NotifyDelivery) = NOTIFY_DELIVERY;
                /// Subscribe to one device's messages.
                SubscribeDevice(subscribe_device::SubscribeDevice) = SUBSCRIBE_DEVICE;
                /// A page of a provider's reconciliation report of a business day.
                Report(report::GetReport) = REPORT;
            }
            pushes {
                /// A pushed completion notice.
                Notice(notice::Notice) = NOTICE;
                /// A pushed device message.
                DeviceMessage(device_message::DeviceMessage) = DEVICE_MESSAGE;
            }
        }
    };
}

with_operations!(operations);
