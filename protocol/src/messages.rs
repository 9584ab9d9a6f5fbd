//! Typed requests and responses, and their body layouts (`docs/PROTOCOL.md` section 5).

use settlegate_engine::codes::CouponEffect;
use settlegate_engine::engine::DeviceCredential;
use settlegate_engine::limits::{
    ACCEPTED_METHODS_MAX, BASKET_ITEMS_MAX, COUPON_USERS_MAX, SALE_ITEMS_MAX,
    STORE_IDS_PER_KIND_MAX,
};
use settlegate_engine::{
    AcceptedMethod, Balance, BestBy, EnteredStore, MethodAtStore, Signal, Store, UsableMethods,
};
use settlegate_engine::{
    AgeCheck, AgePolicy, AgeVerdict, Approval, AuthCode, AuthOutcome, Basket, BasketItem,
    CardToken, Currency, DeviceKey, Discount, MeansAdded, MeansInput, MeansKind, MeansOrder,
    MeansView, Notice, OnAgeFailure, ReasonCode, TerminalConfirmation, TerminalEntry,
    TerminalService, UserKey,
};
use settlegate_engine::{
    CodeOutcome, CodeState, DeliveryNotice, DeviceMessage, IssueCodeRequest, IssuedCode,
    IssuedCoupon, RedeemRequest, Redemption,
};

use crate::wire::{BodyError, Reader, Writer};

/// Operation codes.
pub mod opcode {
    /// Authenticate with an API key.
    pub const AUTH: u16 = 0x0001;
    /// Echo.
    pub const PING: u16 = 0x0002;
    /// Server facts.
    pub const SERVER_INFO: u16 = 0x0003;
    /// Enroll a user and their first device.
    pub const ENROLL: u16 = 0x0010;
    /// Check a password.
    pub const LOGIN: u16 = 0x0011;
    /// Register a settlement means.
    pub const ADD_MEANS: u16 = 0x0012;
    /// Choose the default means.
    pub const SET_DEFAULT_MEANS: u16 = 0x0013;
    /// List a user's means.
    pub const LIST_MEANS: u16 = 0x0014;
    /// Provision another device.
    pub const PROVISION_DEVICE: u16 = 0x0015;
    /// Rotate a device key.
    pub const ROTATE_DEVICE_KEY: u16 = 0x0016;
    /// Subscribe to a user's completion notices.
    pub const SUBSCRIBE_NOTICES: u16 = 0x0017;
    /// Revoke every key of a device at once (a lost or stolen phone).
    pub const REVOKE_DEVICE_KEY: u16 = 0x0019;
    /// A pushed completion notice.
    pub const NOTICE: u16 = 0x0018;
    /// List terminals for a provider.
    pub const REGISTER_TERMINALS: u16 = 0x0020;
    /// Remove terminals from a provider.
    pub const REMOVE_TERMINALS: u16 = 0x0021;
    /// Terminal confirmation (S38–S39).
    pub const CONFIRM_TERMINAL: u16 = 0x0022;
    /// Authorize a settlement.
    pub const AUTHORIZE: u16 = 0x0030;
    /// Authorize a settlement with its basket of items (age check, A2–A3).
    pub const AUTHORIZE_BASKET: u16 = 0x0031;
    /// Register a user terminal's age information (A1).
    pub const REGISTER_AGE: u16 = 0x0040;
    /// Set or clear a store terminal's age policy.
    pub const SET_AGE_POLICY: u16 = 0x0041;
    /// Add or replace a store (W1).
    pub const UPSERT_STORE: u16 = 0x0050;
    /// Remove a store (W1).
    pub const REMOVE_STORE: u16 = 0x0051;
    /// The store at a GPS position (W2).
    pub const STORE_AT: u16 = 0x0052;
    /// The store a beacon, Wi-Fi ID or QR poster names (W2).
    pub const STORE_BY_SIGNAL: u16 = 0x0053;
    /// Load a stored-value means.
    pub const TOP_UP: u16 = 0x0054;
    /// What the user can pay with at a store (W3).
    pub const USABLE_METHODS: u16 = 0x0055;
    /// The user's methods with balances and use.
    pub const WALLET: u16 = 0x0056;
    /// Request a payment code (C1–C2, C4).
    pub const ISSUE_CODE: u16 = 0x0060;
    /// Redeem a payment code at a POS (C3).
    pub const REDEEM_CODE: u16 = 0x0061;
    /// A payment code's state and remittance record.
    pub const CODE_STATE: u16 = 0x0062;
    /// Issue coupons or service codes to users (C5).
    pub const ISSUE_COUPONS: u16 = 0x0063;
    /// Tell a user a cash-on-delivery parcel is coming (C4).
    pub const NOTIFY_DELIVERY: u16 = 0x0064;
    /// Subscribe to one device's messages.
    pub const SUBSCRIBE_DEVICE: u16 = 0x0065;
    /// A pushed device message.
    pub const DEVICE_MESSAGE: u16 = 0x0066;
    /// Redeem a payment code with the sale's basket, for the age check (C3 with A2).
    pub const REDEEM_CODE_BASKET: u16 = 0x0067;

    /// Every request opcode (pushes such as [`NOTICE`] and [`DEVICE_MESSAGE`] are not
    /// requests). A test checks it against [`Request::decode`](super::Request::decode).
    pub const REQUESTS: &[u16] = &[
        AUTH,
        PING,
        SERVER_INFO,
        ENROLL,
        LOGIN,
        ADD_MEANS,
        SET_DEFAULT_MEANS,
        LIST_MEANS,
        PROVISION_DEVICE,
        ROTATE_DEVICE_KEY,
        REVOKE_DEVICE_KEY,
        SUBSCRIBE_NOTICES,
        REGISTER_TERMINALS,
        REMOVE_TERMINALS,
        CONFIRM_TERMINAL,
        AUTHORIZE,
        AUTHORIZE_BASKET,
        REGISTER_AGE,
        SET_AGE_POLICY,
        UPSERT_STORE,
        REMOVE_STORE,
        STORE_AT,
        STORE_BY_SIGNAL,
        TOP_UP,
        USABLE_METHODS,
        WALLET,
        ISSUE_CODE,
        REDEEM_CODE,
        CODE_STATE,
        ISSUE_COUPONS,
        NOTIFY_DELIVERY,
        SUBSCRIBE_DEVICE,
        REDEEM_CODE_BASKET,
    ];

    /// Whether `op` names a request.
    pub fn is_request(op: u16) -> bool {
        REQUESTS.contains(&op)
    }

    /// Whether a request of `op` may be sent before the connection authenticates
    /// (`docs/PROTOCOL.md` section 3): its body is not even parsed otherwise.
    pub fn allowed_unauthenticated(op: u16) -> bool {
        matches!(op, AUTH | PING | SERVER_INFO)
    }
}

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
        FRAME_ERROR,
    ];
}

/// A request.
#[derive(Debug, Clone, PartialEq)]
#[allow(missing_docs)] // Fields mirror docs/PROTOCOL.md section 5 one to one.
pub enum Request {
    Auth {
        key: String,
    },
    Ping {
        payload: Vec<u8>,
    },
    ServerInfo,
    Enroll {
        client_request_id: u128,
        user: UserKey,
        password: String,
        card_idm: [u8; 8],
    },
    Login {
        user: UserKey,
        password: String,
    },
    AddMeans {
        client_request_id: u128,
        user: UserKey,
        make_default: bool,
        means: MeansInput,
    },
    SetDefaultMeans {
        client_request_id: u128,
        user: UserKey,
        means_id: u32,
    },
    ListMeans {
        user: UserKey,
        order: MeansOrder,
    },
    ProvisionDevice {
        client_request_id: u128,
        user: UserKey,
        password: String,
        card_idm: [u8; 8],
    },
    RotateDeviceKey {
        client_request_id: u128,
        user: UserKey,
        password: String,
        card_idm: [u8; 8],
    },
    RevokeDeviceKey {
        client_request_id: u128,
        user: UserKey,
        password: String,
        card_idm: [u8; 8],
    },
    SubscribeNotices {
        user: UserKey,
        password: String,
    },
    RegisterTerminals {
        client_request_id: u128,
        provider_code: u32,
        terminals: Vec<TerminalEntry>,
    },
    RemoveTerminals {
        client_request_id: u128,
        provider_code: u32,
        terminal_ids: Vec<String>,
    },
    ConfirmTerminal {
        provider_code: u32,
        terminal_id: String,
    },
    Authorize {
        client_request_id: u128,
        inherent_id: Vec<u8>,
    },
    AuthorizeBasket {
        client_request_id: u128,
        inherent_id: Vec<u8>,
        basket: Basket,
    },
    RegisterAge {
        client_request_id: u128,
        record: Vec<u8>,
    },
    SetAgePolicy {
        client_request_id: u128,
        provider_code: u32,
        terminal_id: String,
        policy: Option<AgePolicy>,
    },
    UpsertStore {
        client_request_id: u128,
        store: Store,
    },
    RemoveStore {
        client_request_id: u128,
        store_id: String,
    },
    StoreAt {
        latitude_e7: i32,
        longitude_e7: i32,
        radius_m: u32,
    },
    StoreBySignal {
        signal: Signal,
        id: String,
    },
    TopUp {
        client_request_id: u128,
        user: UserKey,
        means_id: u32,
        amount_minor: u64,
        currency: Currency,
    },
    UsableMethods {
        user: UserKey,
        store_id: String,
        best_by: BestBy,
    },
    Wallet {
        user: UserKey,
    },
    IssueCode {
        request: IssueCodeRequest,
    },
    RedeemCode {
        request: RedeemRequest,
    },
    CodeState {
        number: u64,
    },
    IssueCoupons {
        client_request_id: u128,
        provider_code: u32,
        effect: CouponEffect,
        uses: u32,
        expires_ms: i64,
        users: Vec<UserKey>,
    },
    NotifyDelivery {
        client_request_id: u128,
        notice: DeliveryNotice,
    },
    SubscribeDevice {
        user: UserKey,
        password: String,
        card_idm: [u8; 8],
    },
    /// A request whose body parsed, but one of whose `user` IDs does not fit its type (or is
    /// not 1–64 bytes): it is authenticated and permission-checked as `request`, then refused
    /// with reason 51 (`InvalidUserId`). `request` holds a placeholder user in place of each
    /// such ID; `body` is the body as it came, which is what this request encodes to.
    MisfitUserId {
        request: Box<Request>,
        body: Vec<u8>,
    },
}

/// Largest `PING` payload.
pub const PING_PAYLOAD_MAX: usize = 64;
/// Most terminals in one register or remove request.
pub const TERMINALS_PER_REQUEST_MAX: usize = settlegate_engine::limits::TERMINALS_PER_REQUEST_MAX;

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
    /// The request's opcode.
    pub fn opcode(&self) -> u16 {
        use opcode::*;
        match self {
            Request::Auth { .. } => AUTH,
            Request::Ping { .. } => PING,
            Request::ServerInfo => SERVER_INFO,
            Request::Enroll { .. } => ENROLL,
            Request::Login { .. } => LOGIN,
            Request::AddMeans { .. } => ADD_MEANS,
            Request::SetDefaultMeans { .. } => SET_DEFAULT_MEANS,
            Request::ListMeans { .. } => LIST_MEANS,
            Request::ProvisionDevice { .. } => PROVISION_DEVICE,
            Request::RotateDeviceKey { .. } => ROTATE_DEVICE_KEY,
            Request::RevokeDeviceKey { .. } => REVOKE_DEVICE_KEY,
            Request::SubscribeNotices { .. } => SUBSCRIBE_NOTICES,
            Request::RegisterTerminals { .. } => REGISTER_TERMINALS,
            Request::RemoveTerminals { .. } => REMOVE_TERMINALS,
            Request::ConfirmTerminal { .. } => CONFIRM_TERMINAL,
            Request::Authorize { .. } => AUTHORIZE,
            Request::AuthorizeBasket { .. } => AUTHORIZE_BASKET,
            Request::RegisterAge { .. } => REGISTER_AGE,
            Request::SetAgePolicy { .. } => SET_AGE_POLICY,
            Request::UpsertStore { .. } => UPSERT_STORE,
            Request::RemoveStore { .. } => REMOVE_STORE,
            Request::StoreAt { .. } => STORE_AT,
            Request::StoreBySignal { .. } => STORE_BY_SIGNAL,
            Request::TopUp { .. } => TOP_UP,
            Request::UsableMethods { .. } => USABLE_METHODS,
            Request::Wallet { .. } => WALLET,
            Request::IssueCode { .. } => ISSUE_CODE,
            Request::RedeemCode { request } if request.basket.is_some() => REDEEM_CODE_BASKET,
            Request::RedeemCode { .. } => REDEEM_CODE,
            Request::CodeState { .. } => CODE_STATE,
            Request::IssueCoupons { .. } => ISSUE_COUPONS,
            Request::NotifyDelivery { .. } => NOTIFY_DELIVERY,
            Request::SubscribeDevice { .. } => SUBSCRIBE_DEVICE,
            Request::MisfitUserId { request, .. } => request.opcode(),
        }
    }

    /// Appends the body.
    pub fn encode_body(&self, out: &mut Vec<u8>) {
        let mut w = Writer(out);
        match self {
            Request::Auth { key } => {
                w.u8(1).str8(key);
            }
            Request::Ping { payload } => {
                w.raw(payload);
            }
            Request::ServerInfo => {}
            Request::Enroll { client_request_id, user, password, card_idm }
            | Request::ProvisionDevice { client_request_id, user, password, card_idm }
            | Request::RotateDeviceKey { client_request_id, user, password, card_idm }
            | Request::RevokeDeviceKey { client_request_id, user, password, card_idm } => {
                w.u128(*client_request_id).user(user).str8(password).raw(card_idm);
            }
            Request::Login { user, password } | Request::SubscribeNotices { user, password } => {
                w.user(user).str8(password);
            }
            Request::AddMeans { client_request_id, user, make_default, means } => {
                w.u128(*client_request_id).user(user).u8(u8::from(*make_default));
                encode_means(&mut w, means);
            }
            Request::SetDefaultMeans { client_request_id, user, means_id } => {
                w.u128(*client_request_id).user(user).u32(*means_id);
            }
            Request::ListMeans { user, order } => {
                let order = match order {
                    MeansOrder::Registration => 0,
                    MeansOrder::Frequency => 1,
                    MeansOrder::Recency => 2,
                };
                w.user(user).u8(order);
            }
            Request::RegisterTerminals { client_request_id, provider_code, terminals } => {
                w.u128(*client_request_id).u32(*provider_code).u16(terminals.len() as u16);
                for entry in terminals {
                    w.str8(&entry.terminal_id);
                    encode_optional_service(&mut w, entry.service.as_ref());
                }
            }
            Request::RemoveTerminals { client_request_id, provider_code, terminal_ids } => {
                w.u128(*client_request_id).u32(*provider_code).u16(terminal_ids.len() as u16);
                for id in terminal_ids {
                    w.str8(id);
                }
            }
            Request::ConfirmTerminal { provider_code, terminal_id } => {
                w.u32(*provider_code).str8(terminal_id);
            }
            Request::Authorize { client_request_id, inherent_id } => {
                w.u128(*client_request_id).bytes16(inherent_id);
            }
            Request::AuthorizeBasket { client_request_id, inherent_id, basket } => {
                w.u128(*client_request_id).bytes16(inherent_id);
                encode_basket(&mut w, basket);
            }
            Request::RegisterAge { client_request_id, record } => {
                w.u128(*client_request_id).bytes16(record);
            }
            Request::SetAgePolicy { client_request_id, provider_code, terminal_id, policy } => {
                w.u128(*client_request_id).u32(*provider_code).str8(terminal_id);
                match policy {
                    None => w.u8(0),
                    Some(p) => w
                        .u8(1)
                        .str8(&p.jurisdiction)
                        .str8(&p.time_zone)
                        .u8(p.on_failure as u8)
                        .u8(u8::from(p.strict)),
                };
            }
            Request::UpsertStore { client_request_id, store } => {
                w.u128(*client_request_id);
                encode_store(&mut w, store);
            }
            Request::RemoveStore { client_request_id, store_id } => {
                w.u128(*client_request_id).str8(store_id);
            }
            Request::StoreAt { latitude_e7, longitude_e7, radius_m } => {
                w.u32(*latitude_e7 as u32).u32(*longitude_e7 as u32).u32(*radius_m);
            }
            Request::StoreBySignal { signal, id } => {
                w.u8(*signal as u8).bytes16(id.as_bytes());
            }
            Request::TopUp { client_request_id, user, means_id, amount_minor, currency } => {
                w.u128(*client_request_id)
                    .user(user)
                    .u32(*means_id)
                    .u64(*amount_minor)
                    .raw(&currency.bytes());
            }
            Request::UsableMethods { user, store_id, best_by } => {
                let best_by = match best_by {
                    BestBy::MostUsed => 0,
                    BestBy::LargestBalance => 1,
                };
                w.user(user).str8(store_id).u8(best_by);
            }
            Request::Wallet { user } => {
                w.user(user);
            }
            Request::IssueCode { request: r } => {
                w.u128(r.client_request_id)
                    .bytes16(&r.inherent_id)
                    .u32((r.validity_ms / 1000) as u32)
                    .u8(u8::from(r.deliver_to.is_some()))
                    .raw(&r.deliver_to.unwrap_or([0; 8]))
                    .str8(&r.order_ref);
            }
            Request::RedeemCode { request: r } => {
                w.u128(r.client_request_id)
                    .str8(&r.code)
                    .u16(r.issuer)
                    .u64(r.number)
                    .u64(r.amount_minor)
                    .raw(&r.currency.bytes())
                    .i64(r.sale_at_ms)
                    .str8(&r.terminal_id);
                match &r.basket {
                    Some(basket) => encode_basket(&mut w, basket),
                    None => encode_items(&mut w, &r.items),
                }
                w.str8(r.coupon.as_deref().unwrap_or("")).str8(&r.order_ref);
            }
            Request::CodeState { number } => {
                w.u64(*number);
            }
            Request::IssueCoupons {
                client_request_id,
                provider_code,
                effect,
                uses,
                expires_ms,
                users,
            } => {
                w.u128(*client_request_id).u32(*provider_code);
                encode_effect(&mut w, effect);
                w.u32(*uses).i64(*expires_ms).u16(users.len() as u16);
                for user in users {
                    w.user(user);
                }
            }
            Request::NotifyDelivery { client_request_id, notice } => {
                w.u128(*client_request_id);
                encode_delivery(&mut w, notice);
            }
            Request::SubscribeDevice { user, password, card_idm } => {
                w.user(user).str8(password).raw(card_idm);
            }
            Request::MisfitUserId { body, .. } => {
                w.raw(body);
            }
        }
    }

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
        let request = match opcode {
            opcode::AUTH => {
                if r.u8("auth_method")? != 1 {
                    return Err(BodyError::Invalid("auth_method").into());
                }
                Request::Auth { key: r.str8("key")?.to_owned() }
            }
            opcode::PING => {
                let payload = r.rest();
                if payload.len() > PING_PAYLOAD_MAX {
                    return Err(BodyError::Invalid("ping payload over 64 bytes").into());
                }
                Request::Ping { payload: payload.to_vec() }
            }
            opcode::SERVER_INFO => Request::ServerInfo,
            opcode::ENROLL
            | opcode::PROVISION_DEVICE
            | opcode::ROTATE_DEVICE_KEY
            | opcode::REVOKE_DEVICE_KEY => {
                let client_request_id = r.u128("client_request_id")?;
                let user = r.user()?;
                let password = r.str8("password")?.to_owned();
                let card_idm = r.array("card_idm")?;
                match opcode {
                    opcode::ENROLL => {
                        Request::Enroll { client_request_id, user, password, card_idm }
                    }
                    opcode::PROVISION_DEVICE => {
                        Request::ProvisionDevice { client_request_id, user, password, card_idm }
                    }
                    opcode::ROTATE_DEVICE_KEY => {
                        Request::RotateDeviceKey { client_request_id, user, password, card_idm }
                    }
                    _ => Request::RevokeDeviceKey { client_request_id, user, password, card_idm },
                }
            }
            opcode::LOGIN | opcode::SUBSCRIBE_NOTICES => {
                let user = r.user()?;
                let password = r.str8("password")?.to_owned();
                if opcode == opcode::LOGIN {
                    Request::Login { user, password }
                } else {
                    Request::SubscribeNotices { user, password }
                }
            }
            opcode::ADD_MEANS => Request::AddMeans {
                client_request_id: r.u128("client_request_id")?,
                user: r.user()?,
                make_default: r.flag("make_default")?,
                means: decode_means(&mut r)?,
            },
            opcode::SET_DEFAULT_MEANS => Request::SetDefaultMeans {
                client_request_id: r.u128("client_request_id")?,
                user: r.user()?,
                means_id: r.u32("means_id")?,
            },
            opcode::LIST_MEANS => Request::ListMeans {
                user: r.user()?,
                order: match r.u8("order")? {
                    0 => MeansOrder::Registration,
                    1 => MeansOrder::Frequency,
                    2 => MeansOrder::Recency,
                    _ => return Err(BodyError::Invalid("order").into()),
                },
            },
            opcode::REGISTER_TERMINALS => {
                let client_request_id = r.u128("client_request_id")?;
                let provider_code = r.u32("provider_code")?;
                let count = terminal_count(&mut r)?;
                let mut terminals = Vec::with_capacity(count);
                for _ in 0..count {
                    let terminal_id = r.str8("terminal_id")?.to_owned();
                    let service = decode_optional_service(&mut r)?;
                    terminals.push(TerminalEntry { terminal_id, service });
                }
                Request::RegisterTerminals { client_request_id, provider_code, terminals }
            }
            opcode::REMOVE_TERMINALS => {
                let client_request_id = r.u128("client_request_id")?;
                let provider_code = r.u32("provider_code")?;
                let count = terminal_count(&mut r)?;
                let mut terminal_ids = Vec::with_capacity(count);
                for _ in 0..count {
                    terminal_ids.push(r.str8("terminal_id")?.to_owned());
                }
                Request::RemoveTerminals { client_request_id, provider_code, terminal_ids }
            }
            opcode::CONFIRM_TERMINAL => Request::ConfirmTerminal {
                provider_code: r.u32("provider_code")?,
                terminal_id: r.str8("terminal_id")?.to_owned(),
            },
            opcode::AUTHORIZE => Request::Authorize {
                client_request_id: r.u128("client_request_id")?,
                inherent_id: r.bytes16("inherent_id")?.to_vec(),
            },
            opcode::AUTHORIZE_BASKET => Request::AuthorizeBasket {
                client_request_id: r.u128("client_request_id")?,
                inherent_id: r.bytes16("inherent_id")?.to_vec(),
                basket: decode_basket(&mut r)?,
            },
            opcode::REGISTER_AGE => Request::RegisterAge {
                client_request_id: r.u128("client_request_id")?,
                record: r.bytes16("age_record")?.to_vec(),
            },
            opcode::UPSERT_STORE => Request::UpsertStore {
                client_request_id: r.u128("client_request_id")?,
                store: decode_store(&mut r)?,
            },
            opcode::REMOVE_STORE => Request::RemoveStore {
                client_request_id: r.u128("client_request_id")?,
                store_id: r.str8("store_id")?.to_owned(),
            },
            opcode::STORE_AT => Request::StoreAt {
                latitude_e7: r.u32("latitude_e7")? as i32,
                longitude_e7: r.u32("longitude_e7")? as i32,
                radius_m: r.u32("radius_m")?,
            },
            opcode::STORE_BY_SIGNAL => Request::StoreBySignal {
                signal: Signal::from_u8(r.u8("signal")?).ok_or(BodyError::Invalid("signal"))?,
                id: std::str::from_utf8(r.bytes16("id")?)
                    .map_err(|_| BodyError::Invalid("id is not UTF-8"))?
                    .to_owned(),
            },
            opcode::TOP_UP => Request::TopUp {
                client_request_id: r.u128("client_request_id")?,
                user: r.user()?,
                means_id: r.u32("means_id")?,
                amount_minor: r.u64("amount_minor")?,
                currency: currency(&mut r)?,
            },
            opcode::USABLE_METHODS => Request::UsableMethods {
                user: r.user()?,
                store_id: r.str8("store_id")?.to_owned(),
                best_by: match r.u8("best_by")? {
                    0 => BestBy::MostUsed,
                    1 => BestBy::LargestBalance,
                    _ => return Err(BodyError::Invalid("best_by").into()),
                },
            },
            opcode::WALLET => Request::Wallet { user: r.user()? },
            opcode::ISSUE_CODE => Request::IssueCode {
                request: IssueCodeRequest {
                    client_request_id: r.u128("client_request_id")?,
                    inherent_id: r.bytes16("inherent_id")?.to_vec(),
                    validity_ms: i64::from(r.u32("validity_s")?) * 1000,
                    deliver_to: {
                        let has = r.flag("has_deliver_to")?;
                        let idm: [u8; 8] = r.array("deliver_to")?;
                        present_or_zero(has, idm, "deliver_to (zeros when has_deliver_to is 0)")?
                    },
                    order_ref: r.str8("order_ref")?.to_owned(),
                },
            },
            opcode::REDEEM_CODE | opcode::REDEEM_CODE_BASKET => Request::RedeemCode {
                request: RedeemRequest {
                    client_request_id: r.u128("client_request_id")?,
                    code: r.str8("code")?.to_owned(),
                    issuer: r.u16("issuer")?,
                    number: r.u64("number")?,
                    amount_minor: r.u64("amount_minor")?,
                    currency: currency(&mut r)?,
                    sale_at_ms: r.i64("sale_at_ms")?,
                    terminal_id: r.str8("terminal_id")?.to_owned(),
                    // Fields are read in the order written: the lines, then the coupon.
                    items: match opcode {
                        opcode::REDEEM_CODE => decode_items(&mut r)?,
                        _ => Vec::new(),
                    },
                    basket: match opcode {
                        opcode::REDEEM_CODE_BASKET => Some(decode_basket(&mut r)?),
                        _ => None,
                    },
                    coupon: {
                        let coupon = r.str8("coupon")?;
                        (!coupon.is_empty()).then(|| coupon.to_owned())
                    },
                    order_ref: r.str8("order_ref")?.to_owned(),
                },
            },
            opcode::CODE_STATE => Request::CodeState { number: r.u64("number")? },
            opcode::ISSUE_COUPONS => {
                let client_request_id = r.u128("client_request_id")?;
                let provider_code = r.u32("provider_code")?;
                let effect = decode_effect(&mut r)?;
                let uses = r.u32("uses")?;
                let expires_ms = r.i64("expires_ms")?;
                let count = r.u16("user_count")? as usize;
                if count == 0 || count > COUPON_USERS_MAX {
                    return Err(BodyError::Invalid("user_count (1..=256)").into());
                }
                let mut users = Vec::with_capacity(count);
                for _ in 0..count {
                    users.push(r.user()?);
                }
                Request::IssueCoupons {
                    client_request_id,
                    provider_code,
                    effect,
                    uses,
                    expires_ms,
                    users,
                }
            }
            opcode::NOTIFY_DELIVERY => Request::NotifyDelivery {
                client_request_id: r.u128("client_request_id")?,
                notice: decode_delivery(&mut r)?,
            },
            opcode::SUBSCRIBE_DEVICE => Request::SubscribeDevice {
                user: r.user()?,
                password: r.str8("password")?.to_owned(),
                card_idm: r.array("card_idm")?,
            },
            opcode::SET_AGE_POLICY => Request::SetAgePolicy {
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
            },
            other => return Err(DecodeError::UnknownOpcode(other)),
        };
        let misfit_user = r.misfit_user();
        r.finish()?;
        if misfit_user {
            return Ok(Request::MisfitUserId { request: Box::new(request), body: body.to_vec() });
        }
        Ok(request)
    }
}

fn encode_items(w: &mut Writer<'_>, items: &[(String, u32, u64)]) {
    w.u16(items.len() as u16);
    for (item_id, quantity, unit) in items {
        w.str8(item_id).u32(*quantity).u64(*unit);
    }
}

fn decode_items(r: &mut Reader<'_>) -> Result<Vec<(String, u32, u64)>, BodyError> {
    let count = r.u16("item_count")? as usize;
    if count > SALE_ITEMS_MAX {
        return Err(BodyError::Invalid("item_count (0..=256)"));
    }
    let mut items = Vec::with_capacity(count);
    for _ in 0..count {
        items.push((
            r.str8("item_id")?.to_owned(),
            r.u32("quantity")?,
            r.u64("unit_amount_minor")?,
        ));
    }
    Ok(items)
}

fn encode_effect(w: &mut Writer<'_>, effect: &CouponEffect) {
    match *effect {
        CouponEffect::Percent { bps } => w.u8(1).u64(u64::from(bps)).raw(b"XXX"),
        CouponEffect::Fixed { amount_minor, currency } => {
            w.u8(2).u64(amount_minor).raw(&currency.bytes())
        }
        CouponEffect::OrderCode => w.u8(3).u64(0).raw(b"XXX"),
    };
}

/// Reads a coupon's kind, value and currency. A percent coupon and an order code carry the
/// currency `XXX` (an order code also the value 0): anything else there is refused, so that
/// every effect has one encoding.
fn decode_effect(r: &mut Reader<'_>) -> Result<CouponEffect, BodyError> {
    let kind = r.u8("coupon_kind")?;
    let value = r.u64("value")?;
    let currency = currency(r)?;
    let no_currency = currency.bytes() == *b"XXX";
    Ok(match kind {
        1 if !no_currency => return Err(BodyError::Invalid("currency (XXX for a percent coupon)")),
        1 => CouponEffect::Percent {
            bps: u16::try_from(value).map_err(|_| BodyError::Invalid("bps"))?,
        },
        2 => CouponEffect::Fixed { amount_minor: value, currency },
        3 if value != 0 || !no_currency => {
            return Err(BodyError::Invalid("value and currency (0 and XXX for an order code)"));
        }
        3 => CouponEffect::OrderCode,
        _ => return Err(BodyError::Invalid("coupon_kind")),
    })
}

fn encode_delivery(w: &mut Writer<'_>, notice: &DeliveryNotice) {
    w.user(&notice.user)
        .str8(&notice.order_ref)
        .u64(notice.amount_minor)
        .raw(&notice.currency.bytes())
        .str8(&notice.merchant);
}

fn decode_delivery(r: &mut Reader<'_>) -> Result<DeliveryNotice, BodyError> {
    Ok(DeliveryNotice {
        user: r.user()?,
        order_ref: r.str8("order_ref")?.to_owned(),
        amount_minor: r.u64("amount_minor")?,
        currency: currency(r)?,
        merchant: r.str8("merchant")?.to_owned(),
    })
}

fn encode_issued_code(w: &mut Writer<'_>, code: &IssuedCode) {
    w.str8(&code.text)
        .u64(code.number)
        .u64(code.amount_minor)
        .raw(&code.currency.bytes())
        .i64(code.expires_ms)
        .raw(&code.deliver_to)
        .user(&code.user)
        .str8(&code.order_ref);
}

fn decode_issued_code(r: &mut Reader<'_>) -> Result<IssuedCode, BodyError> {
    Ok(IssuedCode {
        text: r.str8("text")?.to_owned(),
        number: r.u64("number")?,
        amount_minor: r.u64("amount_minor")?,
        currency: currency(r)?,
        expires_ms: r.i64("expires_ms")?,
        deliver_to: r.array("deliver_to")?,
        user: r.user()?,
        order_ref: r.str8("order_ref")?.to_owned(),
    })
}

fn encode_issued_coupon(w: &mut Writer<'_>, coupon: &IssuedCoupon) {
    w.str8(&coupon.text).u64(coupon.number).user(&coupon.user);
    encode_effect(w, &coupon.effect);
    w.u32(coupon.uses).i64(coupon.expires_ms);
}

fn decode_issued_coupon(r: &mut Reader<'_>) -> Result<IssuedCoupon, BodyError> {
    Ok(IssuedCoupon {
        text: r.str8("text")?.to_owned(),
        number: r.u64("number")?,
        user: r.user()?,
        effect: decode_effect(r)?,
        uses: r.u32("uses")?,
        expires_ms: r.i64("expires_ms")?,
    })
}

fn encode_redemption(w: &mut Writer<'_>, x: &Redemption) {
    w.u64(x.number)
        .u64(x.captured_minor)
        .u64(x.released_minor)
        .u64(x.coupon_discount_minor)
        .raw(&x.currency.bytes())
        .str8(&x.terminal_id)
        .u32(x.provider_code)
        .raw(&x.auth_code.0)
        .i64(x.sale_at_ms)
        .i64(x.redeemed_at_ms);
    encode_items(w, &x.items);
}

fn decode_redemption(r: &mut Reader<'_>) -> Result<Redemption, BodyError> {
    Ok(Redemption {
        number: r.u64("number")?,
        captured_minor: r.u64("captured_minor")?,
        released_minor: r.u64("released_minor")?,
        coupon_discount_minor: r.u64("coupon_discount_minor")?,
        currency: currency(r)?,
        terminal_id: r.str8("terminal_id")?.to_owned(),
        provider_code: r.u32("provider_code")?,
        auth_code: AuthCode(r.array("auth_code")?),
        sale_at_ms: r.i64("sale_at_ms")?,
        redeemed_at_ms: r.i64("redeemed_at_ms")?,
        items: decode_items(r)?,
    })
}

/// Largest `distance_mm` in an `entered` reply: half the circumference of the sphere
/// distances are measured on (radius 6,371,008.8 m), rounded up. A larger one is refused: no
/// two points are farther apart, and past 2^53 the distance would not survive its round trip
/// through metres as `f64`.
pub const DISTANCE_MM_MAX: u64 = 20_015_116_000;

/// Degrees as the wire's signed 10^-7 degrees (about 1 cm).
pub fn degrees_to_e7(degrees: f64) -> i32 {
    (degrees * 1e7).round() as i32
}

fn encode_store(w: &mut Writer<'_>, store: &Store) {
    w.str8(&store.store_id)
        .str8(&store.name)
        .str8(&store.industry)
        .str8(&store.address)
        .u32(degrees_to_e7(store.latitude) as u32)
        .u32(degrees_to_e7(store.longitude) as u32);
    for ids in [&store.beacons, &store.wifi] {
        w.u8(ids.len() as u8);
        for id in ids {
            w.str8(id);
        }
    }
    w.bytes16(store.qr_code.as_deref().unwrap_or("").as_bytes()).u8(store.accepts.len() as u8);
    for accepted in &store.accepts {
        w.u8(accepted.kind as u8).str8(&accepted.brand);
    }
}

/// A field that is present only when its flag says so: `Some(value)` when `has`, else `None`,
/// provided the value is then the zero the protocol puts in its place. A non-zero value under
/// a cleared flag is refused: the body would not re-encode to the same bytes.
fn present_or_zero<T: PartialEq + Default>(
    has: bool,
    value: T,
    what: &'static str,
) -> Result<Option<T>, BodyError> {
    if has {
        Ok(Some(value))
    } else if value == T::default() {
        Ok(None)
    } else {
        Err(BodyError::Invalid(what))
    }
}

/// Reads a count and checks it against `max` before anything is allocated.
fn count8(r: &mut Reader<'_>, what: &'static str, max: usize) -> Result<usize, BodyError> {
    let count = r.u8(what)? as usize;
    if count > max {
        return Err(BodyError::Invalid(what));
    }
    Ok(count)
}

fn decode_store(r: &mut Reader<'_>) -> Result<Store, BodyError> {
    let store_id = r.str8("store_id")?.to_owned();
    let name = r.str8("name")?.to_owned();
    let industry = r.str8("industry")?.to_owned();
    let address = r.str8("address")?.to_owned();
    let latitude = f64::from(r.u32("latitude_e7")? as i32) / 1e7;
    let longitude = f64::from(r.u32("longitude_e7")? as i32) / 1e7;
    let mut ids = |what| -> Result<Vec<String>, BodyError> {
        let count = count8(r, what, STORE_IDS_PER_KIND_MAX)?;
        (0..count).map(|_| r.str8(what).map(str::to_owned)).collect()
    };
    let beacons = ids("beacon_count")?;
    let wifi = ids("wifi_count")?;
    let qr = std::str::from_utf8(r.bytes16("qr_code")?)
        .map_err(|_| BodyError::Invalid("qr_code is not UTF-8"))?;
    let qr_code = (!qr.is_empty()).then(|| qr.to_owned());
    let count = count8(r, "accepted_count", ACCEPTED_METHODS_MAX)?;
    let mut accepts = Vec::with_capacity(count);
    for _ in 0..count {
        let kind = MeansKind::from_u8(r.u8("kind")?).ok_or(BodyError::Invalid("kind"))?;
        accepts.push(AcceptedMethod { kind, brand: r.str8("brand")?.to_owned() });
    }
    Ok(Store {
        store_id,
        name,
        industry,
        address,
        latitude,
        longitude,
        beacons,
        wifi,
        qr_code,
        accepts,
    })
}

fn encode_means_view(w: &mut Writer<'_>, m: &MeansView) {
    w.u32(m.means_id)
        .u8(m.kind as u8)
        .u8(u8::from(m.is_default))
        .str8(&m.label)
        .str8(m.last4.as_deref().unwrap_or(""))
        .raw(&m.token.map_or([0; 16], |t| t.0))
        .u64(m.uses)
        .u8(u8::from(m.last_used_ms.is_some()))
        .i64(m.last_used_ms.unwrap_or(0))
        .i64(m.registered_ms);
}

/// A means view followed by its balance (`WALLET`, `USABLE_METHODS`).
fn encode_wallet_entry(w: &mut Writer<'_>, m: &MeansView) {
    encode_means_view(w, m);
    match &m.balance {
        None => w.u8(0).u64(0).u64(0).raw(&[0; 3]),
        Some(b) => w
            .u8(1)
            .u64(b.balance_minor)
            .u64(b.available_minor)
            .raw(&b.currency.map_or([0; 3], |c| c.bytes())),
    };
}

fn decode_wallet_entry(r: &mut Reader<'_>) -> Result<MeansView, BodyError> {
    let mut view = decode_means_view(r)?;
    let has_balance = r.flag("has_balance")?;
    let balance_minor = r.u64("balance_minor")?;
    let available_minor = r.u64("available_minor")?;
    let currency_bytes: [u8; 3] = r.array("currency")?;
    if !has_balance && (balance_minor, available_minor, currency_bytes) != (0, 0, [0; 3]) {
        return Err(BodyError::Invalid("balance (zeros when has_balance is 0)"));
    }
    let currency = if currency_bytes == [0; 3] {
        None
    } else {
        Some(Currency::from_bytes(currency_bytes).map_err(|_| BodyError::Invalid("currency"))?)
    };
    view.balance = has_balance.then_some(Balance { balance_minor, available_minor, currency });
    Ok(view)
}

fn encode_entered(w: &mut Writer<'_>, entered: &EnteredStore) {
    encode_store(w, &entered.store);
    match entered.distance_m {
        None => w.u8(0).u64(0),
        Some(metres) => w.u8(1).u64((metres * 1000.0).round() as u64),
    };
    for list in [&entered.tied, &entered.qr_networks] {
        w.u8(list.len().min(255) as u8);
        for item in list.iter().take(255) {
            w.str8(item);
        }
    }
}

fn decode_entered(r: &mut Reader<'_>) -> Result<EnteredStore, BodyError> {
    let store = decode_store(r)?;
    let has_distance = r.flag("has_distance")?;
    let distance_mm = present_or_zero(
        has_distance,
        r.u64("distance_mm")?,
        "distance_mm (0 when has_distance is 0)",
    )?;
    if distance_mm.is_some_and(|mm| mm > DISTANCE_MM_MAX) {
        return Err(BodyError::Invalid("distance_mm (at most 20,015,116,000)"));
    }
    let mut list = |what| -> Result<Vec<String>, BodyError> {
        let count = r.u8(what)?;
        (0..count).map(|_| r.str8(what).map(str::to_owned)).collect()
    };
    let tied = list("tied_count")?;
    let qr_networks = list("network_count")?;
    Ok(EnteredStore {
        store,
        distance_m: distance_mm.map(|mm| mm as f64 / 1000.0),
        tied,
        qr_networks,
    })
}

fn encode_basket(w: &mut Writer<'_>, basket: &Basket) {
    w.u8(u8::from(basket.age_confirmation)).u16(basket.items.len() as u16);
    for item in &basket.items {
        w.str8(&item.item_id).str8(&item.category).u32(item.quantity).u64(item.unit_amount_minor);
    }
}

/// Reads a basket; the item count is checked against the limit before anything is allocated.
fn decode_basket(r: &mut Reader<'_>) -> Result<Basket, BodyError> {
    let age_confirmation = match r.u8("flags")? {
        0 => false,
        1 => true,
        _ => return Err(BodyError::Invalid("flags (only bit 0 is defined)")),
    };
    let count = r.u16("item_count")? as usize;
    if count == 0 || count > BASKET_ITEMS_MAX {
        return Err(BodyError::Invalid("item_count (1..=256)"));
    }
    let mut items = Vec::with_capacity(count);
    for _ in 0..count {
        items.push(BasketItem {
            item_id: r.str8("item_id")?.to_owned(),
            category: r.str8("category")?.to_owned(),
            quantity: r.u32("quantity")?,
            unit_amount_minor: r.u64("unit_amount_minor")?,
        });
    }
    Ok(Basket { age_confirmation, items })
}

/// Reads a terminal count and checks it against the limit before anything is allocated.
fn terminal_count(r: &mut Reader<'_>) -> Result<usize, BodyError> {
    let count = r.u16("count")? as usize;
    if count == 0 || count > TERMINALS_PER_REQUEST_MAX {
        return Err(BodyError::Invalid("count (1..=1024)"));
    }
    Ok(count)
}

fn encode_means(w: &mut Writer<'_>, means: &MeansInput) {
    w.u8(means.kind() as u8);
    match means {
        MeansInput::CreditCard { pan } => w.str8(pan),
        MeansInput::EMoney { emoney_type } => w.str8(emoney_type),
        MeansInput::QrCode { scheme, settlement_number } => w.str8(scheme).str8(settlement_number),
        MeansInput::BankAccount { bank_code, account_number } => {
            w.str8(bank_code).str8(account_number)
        }
    };
}

fn decode_means(r: &mut Reader<'_>) -> Result<MeansInput, BodyError> {
    let kind = MeansKind::from_u8(r.u8("means_kind")?).ok_or(BodyError::Invalid("means_kind"))?;
    let mut text = |what| r.str8(what).map(str::to_owned);
    Ok(match kind {
        MeansKind::CreditCard => MeansInput::CreditCard { pan: text("pan")? },
        MeansKind::EMoney => MeansInput::EMoney { emoney_type: text("emoney_type")? },
        MeansKind::QrCode => MeansInput::QrCode {
            scheme: text("scheme")?,
            settlement_number: text("settlement_number")?,
        },
        MeansKind::BankAccount => MeansInput::BankAccount {
            bank_code: text("bank_code")?,
            account_number: text("account_number")?,
        },
    })
}

fn encode_optional_service(w: &mut Writer<'_>, service: Option<&TerminalService>) {
    let Some(service) = service else {
        w.u8(0);
        return;
    };
    w.u8(1);
    match service.discount {
        Discount::Percent { bps } => w.u8(1).u16(bps),
        Discount::Fixed { amount_minor, currency } => {
            w.u8(2).u64(amount_minor).raw(&currency.bytes())
        }
    };
    w.i64(service.valid_from_ms).i64(service.valid_until_ms).str8(&service.description);
}

fn decode_optional_service(r: &mut Reader<'_>) -> Result<Option<TerminalService>, BodyError> {
    if !r.flag("has_service")? {
        return Ok(None);
    }
    let discount = match r.u8("discount_kind")? {
        1 => Discount::Percent { bps: r.u16("bps")? },
        2 => Discount::Fixed { amount_minor: r.u64("amount_minor")?, currency: currency(r)? },
        _ => return Err(BodyError::Invalid("discount_kind")),
    };
    Ok(Some(TerminalService {
        discount,
        valid_from_ms: r.i64("valid_from_ms")?,
        valid_until_ms: r.i64("valid_until_ms")?,
        description: r.str8("description")?.to_owned(),
    }))
}

fn currency(r: &mut Reader<'_>) -> Result<Currency, BodyError> {
    Currency::from_bytes(r.array("currency")?).map_err(|_| BodyError::Invalid("currency"))
}

/// Facts about the server (`SERVER_INFO`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerInfo {
    /// settlegate version.
    pub server_version: String,
    /// Protocol version (1).
    pub protocol_version: u16,
    /// Engine shards.
    pub shards: u16,
    /// Largest body.
    pub body_length_max: u32,
    /// Requests in flight per connection.
    pub in_flight_max: u16,
    /// Providers: code and name.
    pub providers: Vec<(u32, String)>,
}

/// The body of an `OK` response, by the request that asked.
#[derive(Debug, Clone, PartialEq)]
#[allow(missing_docs)]
pub enum Reply {
    Authenticated { identity: String, permissions: u32 },
    Pong(Vec<u8>),
    ServerInfo(ServerInfo),
    Credential(DeviceCredential),
    Empty,
    MeansAdded(MeansAdded),
    Means(Vec<MeansView>),
    Confirmation(TerminalConfirmation),
    Outcome(AuthOutcome),
    BasketOutcome(AuthOutcome, Option<AgeVerdict>),
    Notice(Notice),
    Wallet(Vec<MeansView>),
    Entered(Box<EnteredStore>),
    Balance(Balance),
    Usable(Box<UsableMethods>),
    Code(CodeOutcome),
    Redeemed(Box<Redemption>),
    CodeState(Box<CodeState>),
    Coupons(Vec<Result<IssuedCoupon, ReasonCode>>),
    Delivered(u32),
    DeviceMessage(Box<DeviceMessage>),
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
        let push = matches!(self, Response::Ok(Reply::Notice(_) | Reply::DeviceMessage(_)));
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
            Response::FrameError { .. } => status::FRAME_ERROR,
        }
    }

    /// Appends the body to `out` (its status is [`Response::status`]).
    fn encode_body(&self, out: &mut Vec<u8>) {
        let mut w = Writer(out);
        match self {
            Response::Ok(reply) => encode_reply(&mut w, reply),
            Response::Refused(reason) => {
                w.u16(reason.code());
            }
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
            status::OK => Response::Ok(decode_reply(opcode, &mut r)?),
            status::REFUSED => Response::Refused(
                ReasonCode::from_code(r.u16("reason")?).ok_or(BodyError::Invalid("reason"))?,
            ),
            status::BUSY => Response::Busy { retry_after_ms: r.u32("retry_after_ms")? },
            status::IN_FLIGHT => Response::InFlight,
            status::UNAUTHENTICATED => Response::Unauthenticated(r.str8("detail")?.to_owned()),
            status::FORBIDDEN => Response::Forbidden(r.str8("detail")?.to_owned()),
            status::BAD_REQUEST => Response::BadRequest(r.str8("detail")?.to_owned()),
            status::UNKNOWN_OPCODE => Response::UnknownOpcode,
            status::SHUTTING_DOWN => Response::ShuttingDown,
            status::INTERNAL => Response::Internal(r.str8("detail")?.to_owned()),
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

fn encode_reply(w: &mut Writer<'_>, reply: &Reply) {
    match reply {
        Reply::Authenticated { identity, permissions } => {
            w.str8(identity).u32(*permissions);
        }
        Reply::Pong(payload) => {
            w.raw(payload);
        }
        Reply::ServerInfo(info) => {
            w.str8(&info.server_version)
                .u16(info.protocol_version)
                .u16(info.shards)
                .u32(info.body_length_max)
                .u16(info.in_flight_max)
                .u16(info.providers.len() as u16);
            for (code, name) in &info.providers {
                w.u32(*code).str8(name);
            }
        }
        Reply::Credential(c) => {
            w.raw(&c.card_idm).u16(c.key_version).raw(c.device_key.expose());
        }
        Reply::Empty => {}
        Reply::MeansAdded(added) => {
            w.u32(added.means_id).str8(added.last4.as_deref().unwrap_or(""));
        }
        Reply::Means(means) => {
            w.u8(means.len() as u8);
            for m in means {
                encode_means_view(w, m);
            }
        }
        Reply::Wallet(means) => {
            w.u8(means.len() as u8);
            for m in means {
                encode_wallet_entry(w, m);
            }
        }
        Reply::Entered(entered) => encode_entered(w, entered),
        Reply::Code(outcome) => match outcome {
            CodeOutcome::Issued(code) => {
                w.u8(0);
                encode_issued_code(w, code);
            }
            CodeOutcome::Declined(reason) => {
                w.u8(1).u16(reason.code());
            }
        },
        Reply::Redeemed(x) => encode_redemption(w, x),
        Reply::CodeState(state) => match state.as_ref() {
            CodeState::Issued => {
                w.u8(0);
            }
            CodeState::Redeemed(x) => {
                w.u8(1);
                encode_redemption(w, x);
            }
            CodeState::Expired => {
                w.u8(2);
            }
        },
        Reply::Coupons(results) => {
            w.u16(results.len() as u16);
            for result in results {
                match result {
                    Ok(coupon) => {
                        w.u8(0);
                        encode_issued_coupon(w, coupon);
                    }
                    Err(reason) => {
                        w.u8(1).u16(reason.code());
                    }
                }
            }
        }
        Reply::Delivered(devices) => {
            w.u32(*devices);
        }
        Reply::DeviceMessage(message) => match message.as_ref() {
            DeviceMessage::Code(code) => {
                w.u8(1);
                encode_issued_code(w, code);
            }
            DeviceMessage::Coupon(coupon) => {
                w.u8(2);
                encode_issued_coupon(w, coupon);
            }
            DeviceMessage::Delivery(notice) => {
                w.u8(3);
                encode_delivery(w, notice);
            }
        },
        Reply::Balance(b) => {
            w.u64(b.balance_minor)
                .u64(b.available_minor)
                .raw(&b.currency.map_or([0; 3], |c| c.bytes()));
        }
        Reply::Usable(usable) => {
            w.str8(&usable.store_id).u8(usable.methods.len() as u8);
            for m in &usable.methods {
                encode_wallet_entry(w, &m.means);
                w.u8(u8::from(m.usable));
            }
            w.u8(u8::from(usable.best.is_some())).u32(usable.best.unwrap_or(0));
            w.u8(usable.accepted.len() as u8);
            for accepted in &usable.accepted {
                w.u8(accepted.kind as u8).str8(&accepted.brand);
            }
        }
        Reply::Confirmation(confirmation) => match confirmation {
            TerminalConfirmation::NotListed => {
                w.u8(0).u8(0);
            }
            TerminalConfirmation::Listed { service } => {
                w.u8(1);
                encode_optional_service(w, service.as_ref());
            }
        },
        Reply::Outcome(outcome) => encode_outcome(w, outcome),
        Reply::BasketOutcome(outcome, verdict) => {
            encode_outcome(w, outcome);
            match verdict {
                None => {
                    w.u8(0);
                }
                Some(v) => {
                    w.u8(1).u8(v.check as u8).u64(v.amount_minor).u16(v.items.len() as u16);
                    for item in &v.items {
                        w.str8(item);
                    }
                }
            }
        }
        Reply::Notice(notice) => {
            w.user(&notice.user)
                .u128(notice.client_request_id)
                .str8(&notice.terminal_id)
                .i64(notice.at_ms);
            encode_outcome(w, &notice.outcome);
        }
    }
}

fn encode_outcome(w: &mut Writer<'_>, outcome: &AuthOutcome) {
    match outcome {
        AuthOutcome::Approved(a) => {
            w.u8(0)
                .raw(&a.auth_code.0)
                .u32(a.provider_code)
                .u64(a.amount_requested_minor)
                .u64(a.discount_minor)
                .u64(a.amount_final_minor)
                .raw(&a.currency.bytes());
        }
        AuthOutcome::Declined(reason) => {
            w.u8(1).u16(reason.code());
        }
    }
}

fn decode_outcome(r: &mut Reader<'_>) -> Result<AuthOutcome, BodyError> {
    match r.u8("result")? {
        0 => Ok(AuthOutcome::Approved(Approval {
            auth_code: AuthCode(r.array("auth_code")?),
            provider_code: r.u32("provider_code")?,
            amount_requested_minor: r.u64("amount_requested_minor")?,
            discount_minor: r.u64("discount_minor")?,
            amount_final_minor: r.u64("amount_final_minor")?,
            currency: currency(r)?,
        })),
        1 => Ok(AuthOutcome::Declined(
            ReasonCode::from_code(r.u16("reason")?).ok_or(BodyError::Invalid("reason"))?,
        )),
        _ => Err(BodyError::Invalid("result")),
    }
}

fn decode_credential(r: &mut Reader<'_>) -> Result<DeviceCredential, BodyError> {
    Ok(DeviceCredential {
        card_idm: r.array("card_idm")?,
        key_version: r.u16("key_version")?,
        device_key: DeviceKey::from_bytes(r.array("device_key")?),
    })
}

fn decode_reply(opcode: u16, r: &mut Reader<'_>) -> Result<Reply, BodyError> {
    use opcode::*;
    Ok(match opcode {
        AUTH => Reply::Authenticated {
            identity: r.str8("identity")?.to_owned(),
            permissions: r.u32("permissions")?,
        },
        PING => Reply::Pong(r.rest().to_vec()),
        SERVER_INFO => {
            let server_version = r.str8("server_version")?.to_owned();
            let protocol_version = r.u16("protocol_version")?;
            let shards = r.u16("shards")?;
            let body_length_max = r.u32("body_length_max")?;
            let in_flight_max = r.u16("in_flight_max")?;
            let count = r.u16("provider_count")?;
            let mut providers = Vec::new();
            for _ in 0..count {
                providers.push((r.u32("code")?, r.str8("name")?.to_owned()));
            }
            Reply::ServerInfo(ServerInfo {
                server_version,
                protocol_version,
                shards,
                body_length_max,
                in_flight_max,
                providers,
            })
        }
        ENROLL | PROVISION_DEVICE | ROTATE_DEVICE_KEY => Reply::Credential(decode_credential(r)?),
        LOGIN | SET_DEFAULT_MEANS | SUBSCRIBE_NOTICES | REGISTER_TERMINALS | REMOVE_TERMINALS
        | REGISTER_AGE | SET_AGE_POLICY | UPSERT_STORE | REMOVE_STORE | REVOKE_DEVICE_KEY => {
            Reply::Empty
        }
        STORE_AT | STORE_BY_SIGNAL => Reply::Entered(Box::new(decode_entered(r)?)),
        SUBSCRIBE_DEVICE => Reply::Empty,
        ISSUE_CODE => Reply::Code(match r.u8("result")? {
            0 => CodeOutcome::Issued(Box::new(decode_issued_code(r)?)),
            1 => CodeOutcome::Declined(
                ReasonCode::from_code(r.u16("reason")?).ok_or(BodyError::Invalid("reason"))?,
            ),
            _ => return Err(BodyError::Invalid("result")),
        }),
        REDEEM_CODE | REDEEM_CODE_BASKET => Reply::Redeemed(Box::new(decode_redemption(r)?)),
        CODE_STATE => Reply::CodeState(Box::new(match r.u8("state")? {
            0 => CodeState::Issued,
            1 => CodeState::Redeemed(Box::new(decode_redemption(r)?)),
            2 => CodeState::Expired,
            _ => return Err(BodyError::Invalid("state")),
        })),
        ISSUE_COUPONS => {
            let count = r.u16("count")? as usize;
            if count > COUPON_USERS_MAX {
                return Err(BodyError::Invalid("count"));
            }
            let mut results = Vec::with_capacity(count);
            for _ in 0..count {
                results.push(match r.u8("result")? {
                    0 => Ok(decode_issued_coupon(r)?),
                    1 => Err(ReasonCode::from_code(r.u16("reason")?)
                        .ok_or(BodyError::Invalid("reason"))?),
                    _ => return Err(BodyError::Invalid("result")),
                });
            }
            Reply::Coupons(results)
        }
        NOTIFY_DELIVERY => Reply::Delivered(r.u32("devices")?),
        DEVICE_MESSAGE => Reply::DeviceMessage(Box::new(match r.u8("kind")? {
            1 => DeviceMessage::Code(decode_issued_code(r)?),
            2 => DeviceMessage::Coupon(decode_issued_coupon(r)?),
            3 => DeviceMessage::Delivery(decode_delivery(r)?),
            _ => return Err(BodyError::Invalid("kind")),
        })),
        TOP_UP => {
            let balance_minor = r.u64("balance_minor")?;
            let available_minor = r.u64("available_minor")?;
            let currency = currency(r)?;
            Reply::Balance(Balance { balance_minor, available_minor, currency: Some(currency) })
        }
        WALLET => {
            let count = r.u8("count")?;
            let mut means = Vec::new();
            for _ in 0..count {
                means.push(decode_wallet_entry(r)?);
            }
            Reply::Wallet(means)
        }
        USABLE_METHODS => {
            let store_id = r.str8("store_id")?.to_owned();
            let count = r.u8("count")?;
            let mut methods = Vec::new();
            for _ in 0..count {
                let means = decode_wallet_entry(r)?;
                methods.push(MethodAtStore { means, usable: r.flag("usable")? });
            }
            let has_best = r.flag("has_best")?;
            let best =
                present_or_zero(has_best, r.u32("best")?, "best_means_id (0 when has_best is 0)")?;
            let count = count8(r, "accepted_count", ACCEPTED_METHODS_MAX)?;
            let mut accepted = Vec::with_capacity(count);
            for _ in 0..count {
                let kind = MeansKind::from_u8(r.u8("kind")?).ok_or(BodyError::Invalid("kind"))?;
                accepted.push(AcceptedMethod { kind, brand: r.str8("brand")?.to_owned() });
            }
            Reply::Usable(Box::new(UsableMethods { store_id, methods, best, accepted }))
        }
        ADD_MEANS => {
            let means_id = r.u32("means_id")?;
            let last4 = r.str8("last4")?;
            Reply::MeansAdded(MeansAdded {
                means_id,
                last4: (!last4.is_empty()).then(|| last4.to_owned()),
            })
        }
        LIST_MEANS => {
            let count = r.u8("count")?;
            let mut means = Vec::new();
            for _ in 0..count {
                means.push(decode_means_view(r)?);
            }
            Reply::Means(means)
        }
        CONFIRM_TERMINAL => {
            let listed = r.flag("listed")?;
            let service = decode_optional_service(r)?;
            match (listed, service) {
                (true, service) => Reply::Confirmation(TerminalConfirmation::Listed { service }),
                (false, None) => Reply::Confirmation(TerminalConfirmation::NotListed),
                (false, Some(_)) => {
                    return Err(BodyError::Invalid("has_service (0 when listed is 0)"));
                }
            }
        }
        AUTHORIZE => Reply::Outcome(decode_outcome(r)?),
        AUTHORIZE_BASKET => {
            let outcome = decode_outcome(r)?;
            let verdict = if r.flag("has_verdict")? {
                let check =
                    AgeCheck::from_u8(r.u8("age_check")?).ok_or(BodyError::Invalid("age_check"))?;
                let amount_minor = r.u64("amount_minor")?;
                let count = r.u16("item_count")? as usize;
                if count > BASKET_ITEMS_MAX {
                    return Err(BodyError::Invalid("item_count"));
                }
                let mut items = Vec::with_capacity(count);
                for _ in 0..count {
                    items.push(r.str8("item_id")?.to_owned());
                }
                Some(AgeVerdict { check, items, amount_minor })
            } else {
                None
            };
            Reply::BasketOutcome(outcome, verdict)
        }
        NOTICE => {
            let user = r.user()?;
            let client_request_id = r.u128("client_request_id")?;
            let terminal_id = r.str8("terminal_id")?.to_owned();
            let at_ms = r.i64("at_ms")?;
            let outcome = decode_outcome(r)?;
            Reply::Notice(Notice { user, client_request_id, terminal_id, outcome, at_ms })
        }
        _ => return Err(BodyError::Invalid("opcode")),
    })
}

fn decode_means_view(r: &mut Reader<'_>) -> Result<MeansView, BodyError> {
    let means_id = r.u32("means_id")?;
    let kind = MeansKind::from_u8(r.u8("kind")?).ok_or(BodyError::Invalid("kind"))?;
    let is_default = r.flag("is_default")?;
    let label = r.str8("label")?.to_owned();
    let last4 = r.str8("last4")?;
    let token: [u8; 16] = r.array("token")?;
    let uses = r.u64("uses")?;
    let has_last_used = r.flag("has_last_used")?;
    let last_used_ms = present_or_zero(
        has_last_used,
        r.i64("last_used_ms")?,
        "last_used_ms (0 when has_last_used is 0)",
    )?;
    Ok(MeansView {
        means_id,
        kind,
        label,
        last4: (!last4.is_empty()).then(|| last4.to_owned()),
        token: (token != [0; 16]).then_some(CardToken(token)),
        is_default,
        uses,
        last_used_ms,
        registered_ms: r.i64("registered_ms")?,
        balance: None,
    })
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
}
