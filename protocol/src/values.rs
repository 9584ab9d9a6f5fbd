//! Wire values that more than one operation carries, with their encodings (`docs/PROTOCOL.md`
//! section 5). A value only one operation uses lives in that operation's file (`ops/`).
//!
//! These are the wire's own types, built on `settlegate-types` alone: the server maps them to
//! and from the engine's.

use std::fmt;

use settlegate_types::limits::{
    ACCEPTED_METHODS_MAX, BASKET_ITEMS_MAX, SALE_ITEMS_MAX, STORE_IDS_PER_KIND_MAX,
};
use settlegate_types::{
    Approval, AuthCode, AuthOutcome, CardToken, Currency, Idm, MeansKind, ReasonCode, UserKey,
};

use crate::wire::{present_or_zero, BodyError, Reader, Writer};

/// A value with one encoding wherever it appears.
pub trait Codec: Sized {
    /// Appends the value.
    fn encode(&self, w: &mut Writer<'_>);
    /// Reads the value.
    fn decode(r: &mut Reader<'_>) -> Result<Self, BodyError>;
}

/// The empty body.
impl Codec for () {
    fn encode(&self, _: &mut Writer<'_>) {}
    fn decode(_: &mut Reader<'_>) -> Result<(), BodyError> {
        Ok(())
    }
}

impl<T: Codec> Codec for Box<T> {
    fn encode(&self, w: &mut Writer<'_>) {
        T::encode(self, w)
    }
    fn decode(r: &mut Reader<'_>) -> Result<Box<T>, BodyError> {
        T::decode(r).map(Box::new)
    }
}

/// A reason code.
impl Codec for ReasonCode {
    fn encode(&self, w: &mut Writer<'_>) {
        w.u16(self.code());
    }
    fn decode(r: &mut Reader<'_>) -> Result<ReasonCode, BodyError> {
        ReasonCode::from_code(r.u16("reason")?).ok_or(BodyError::Invalid("reason"))
    }
}

/// An authorization's outcome: `result` 0 and the approval, or 1 and the reason.
impl Codec for AuthOutcome {
    fn encode(&self, w: &mut Writer<'_>) {
        match self {
            AuthOutcome::Approved(a) => {
                w.u8(0)
                    .raw(&a.auth_code.0)
                    .u32(a.provider_code)
                    .u64(a.amount_requested_minor)
                    .u64(a.discount_minor)
                    .u64(a.amount_final_minor)
                    .currency(a.currency);
            }
            AuthOutcome::Declined(reason) => {
                w.u8(1);
                reason.encode(w);
            }
        }
    }
    fn decode(r: &mut Reader<'_>) -> Result<AuthOutcome, BodyError> {
        match r.u8("result")? {
            0 => Ok(AuthOutcome::Approved(Approval {
                auth_code: AuthCode(r.array("auth_code")?),
                provider_code: r.u32("provider_code")?,
                amount_requested_minor: r.u64("amount_requested_minor")?,
                discount_minor: r.u64("discount_minor")?,
                amount_final_minor: r.u64("amount_final_minor")?,
                currency: r.currency()?,
            })),
            1 => Ok(AuthOutcome::Declined(ReasonCode::decode(r)?)),
            _ => Err(BodyError::Invalid("result")),
        }
    }
}

/// A list of results, each an item or the reason it was refused (`ISSUE_COUPONS`): `u8`
/// result 0 and the item, or 1 and the reason.
pub(crate) fn encode_result<T: Codec>(w: &mut Writer<'_>, result: &Result<T, ReasonCode>) {
    match result {
        Ok(item) => {
            w.u8(0);
            item.encode(w);
        }
        Err(reason) => {
            w.u8(1);
            reason.encode(w);
        }
    }
}

/// Reads what [`encode_result`] wrote.
pub(crate) fn decode_result<T: Codec>(
    r: &mut Reader<'_>,
) -> Result<Result<T, ReasonCode>, BodyError> {
    match r.u8("result")? {
        0 => Ok(Ok(T::decode(r)?)),
        1 => Ok(Err(ReasonCode::decode(r)?)),
        _ => Err(BodyError::Invalid("result")),
    }
}

/// A device's 32-byte key, as the server hands it out once (wiped from memory on drop).
#[derive(Clone, PartialEq, Eq)]
pub struct DeviceKey(zeroize::Zeroizing<[u8; 32]>);

impl DeviceKey {
    /// Wraps key bytes.
    pub fn from_bytes(bytes: [u8; 32]) -> DeviceKey {
        DeviceKey(zeroize::Zeroizing::new(bytes))
    }
    /// The key bytes.
    pub fn expose(&self) -> &[u8; 32] {
        &self.0
    }
}

impl fmt::Debug for DeviceKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("DeviceKey(..)")
    }
}

/// A provisioned device's credential (`ENROLL`, `PROVISION_DEVICE`, `ROTATE_DEVICE_KEY`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceCredential {
    /// The device's card IDm.
    pub card_idm: Idm,
    /// The key's version.
    pub key_version: u16,
    /// The key.
    pub device_key: DeviceKey,
}

impl Codec for DeviceCredential {
    fn encode(&self, w: &mut Writer<'_>) {
        w.raw(&self.card_idm).u16(self.key_version).raw(self.device_key.expose());
    }
    fn decode(r: &mut Reader<'_>) -> Result<DeviceCredential, BodyError> {
        Ok(DeviceCredential {
            card_idm: r.array("card_idm")?,
            key_version: r.u16("key_version")?,
            device_key: DeviceKey::from_bytes(r.array("device_key")?),
        })
    }
}

/// Declares a request of a user's password and device (`ENROLL`, `PROVISION_DEVICE`,
/// `ROTATE_DEVICE_KEY`, `REVOKE_DEVICE_KEY`): `client_request_id`, `user`, `password`,
/// `card_idm`, and its [`Operation`](crate::ops::Operation) with the reply given.
macro_rules! device_request {
    ($(#[doc = $doc:literal])* $name:ident = $opcode:literal, $op_name:literal, $reply:ty) => {
        $(#[doc = $doc])*
        #[derive(Debug, Clone, PartialEq)]
        pub struct $name {
            /// Makes the request idempotent.
            pub client_request_id: settlegate_types::ClientRequestId,
            /// The user.
            pub user: settlegate_types::UserKey,
            /// The user's password.
            pub password: String,
            /// The device's card IDm.
            pub card_idm: settlegate_types::Idm,
        }

        impl $crate::ops::Operation for $name {
            const OPCODE: u16 = $opcode;
            const NAME: &'static str = $op_name;
            type Reply = $reply;

            fn encode(&self, w: &mut $crate::wire::Writer<'_>) {
                w.u128(self.client_request_id)
                    .user(&self.user)
                    .str8(&self.password)
                    .raw(&self.card_idm);
            }

            fn decode(
                _: u16,
                r: &mut $crate::wire::Reader<'_>,
            ) -> Result<$name, $crate::wire::BodyError> {
                Ok($name {
                    client_request_id: r.u128("client_request_id")?,
                    user: r.user()?,
                    password: r.str8("password")?.to_owned(),
                    card_idm: r.array("card_idm")?,
                })
            }

            fn route(&self) -> $crate::ops::Route<'_> {
                $crate::ops::Route::User(&self.user)
            }
        }
    };
}
pub(crate) use device_request;

/// Declares a request of a user and their password (`LOGIN`, `SUBSCRIBE_NOTICES`), with an
/// empty reply.
macro_rules! password_request {
    ($(#[doc = $doc:literal])* $name:ident = $opcode:literal, $op_name:literal) => {
        $(#[doc = $doc])*
        #[derive(Debug, Clone, PartialEq)]
        pub struct $name {
            /// The user.
            pub user: settlegate_types::UserKey,
            /// The user's password.
            pub password: String,
        }

        impl $crate::ops::Operation for $name {
            const OPCODE: u16 = $opcode;
            const NAME: &'static str = $op_name;
            type Reply = ();

            fn encode(&self, w: &mut $crate::wire::Writer<'_>) {
                w.user(&self.user).str8(&self.password);
            }

            fn decode(
                _: u16,
                r: &mut $crate::wire::Reader<'_>,
            ) -> Result<$name, $crate::wire::BodyError> {
                Ok($name { user: r.user()?, password: r.str8("password")?.to_owned() })
            }

            fn route(&self) -> $crate::ops::Route<'_> {
                $crate::ops::Route::User(&self.user)
            }
        }
    };
}
pub(crate) use password_request;

/// A stored-value balance.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Balance {
    /// The balance, minor units.
    pub balance_minor: u64,
    /// What can be spent now: the balance less the holds on it.
    pub available_minor: u64,
    /// The purse's currency, once it has one.
    pub currency: Option<Currency>,
}

/// A settlement means as the user sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct MeansView {
    /// The means ID.
    pub means_id: u32,
    /// Its kind.
    pub kind: MeansKind,
    /// Its label (e-money type, scheme, bank).
    pub label: String,
    /// The card's last four digits.
    pub last4: Option<String>,
    /// The card's vault token.
    pub token: Option<CardToken>,
    /// Whether it is the default means.
    pub is_default: bool,
    /// Payments made with it.
    pub uses: u64,
    /// When it was last used, ms.
    pub last_used_ms: Option<i64>,
    /// When it was registered, ms.
    pub registered_ms: i64,
    /// Its balance, for a stored-value means (`WALLET`, `USABLE_METHODS`; never in
    /// `LIST_MEANS`).
    pub balance: Option<Balance>,
}

impl MeansView {
    /// Appends the view without its balance (`LIST_MEANS`).
    pub(crate) fn encode_view(&self, w: &mut Writer<'_>) {
        w.u32(self.means_id)
            .u8(self.kind as u8)
            .flag(self.is_default)
            .str8(&self.label)
            .str8(self.last4.as_deref().unwrap_or(""))
            .raw(&self.token.map_or([0; 16], |t| t.0))
            .u64(self.uses)
            .flag(self.last_used_ms.is_some())
            .i64(self.last_used_ms.unwrap_or(0))
            .i64(self.registered_ms);
    }

    /// Reads a view without its balance.
    pub(crate) fn decode_view(r: &mut Reader<'_>) -> Result<MeansView, BodyError> {
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

    /// Appends the view followed by its balance (`WALLET`, `USABLE_METHODS`).
    pub(crate) fn encode_with_balance(&self, w: &mut Writer<'_>) {
        self.encode_view(w);
        match &self.balance {
            None => w.u8(0).u64(0).u64(0).raw(&[0; 3]),
            Some(b) => w
                .u8(1)
                .u64(b.balance_minor)
                .u64(b.available_minor)
                .raw(&b.currency.map_or([0; 3], |c| c.bytes())),
        };
    }

    /// Reads a view followed by its balance.
    pub(crate) fn decode_with_balance(r: &mut Reader<'_>) -> Result<MeansView, BodyError> {
        let mut view = MeansView::decode_view(r)?;
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
}

/// A terminal-unique discount.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Discount {
    /// Basis points off.
    Percent {
        /// Basis points.
        bps: u16,
    },
    /// A fixed amount off, in its currency.
    Fixed {
        /// Minor units off.
        amount_minor: u64,
        /// The currency the amount is in.
        currency: Currency,
    },
}

/// A terminal-unique service with its validity window.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TerminalService {
    /// The discount.
    pub discount: Discount,
    /// First instant it applies, ms.
    pub valid_from_ms: i64,
    /// First instant it no longer applies, ms.
    pub valid_until_ms: i64,
    /// Text shown to the store terminal.
    pub description: String,
}

/// An optional service: `has_service`, then the service when set.
impl Codec for Option<TerminalService> {
    fn encode(&self, w: &mut Writer<'_>) {
        let Some(service) = self else {
            w.u8(0);
            return;
        };
        w.u8(1);
        match service.discount {
            Discount::Percent { bps } => w.u8(1).u16(bps),
            Discount::Fixed { amount_minor, currency } => {
                w.u8(2).u64(amount_minor).currency(currency)
            }
        };
        w.i64(service.valid_from_ms).i64(service.valid_until_ms).str8(&service.description);
    }
    fn decode(r: &mut Reader<'_>) -> Result<Option<TerminalService>, BodyError> {
        if !r.flag("has_service")? {
            return Ok(None);
        }
        let discount = match r.u8("discount_kind")? {
            1 => Discount::Percent { bps: r.u16("bps")? },
            2 => Discount::Fixed { amount_minor: r.u64("amount_minor")?, currency: r.currency()? },
            _ => return Err(BodyError::Invalid("discount_kind")),
        };
        Ok(Some(TerminalService {
            discount,
            valid_from_ms: r.i64("valid_from_ms")?,
            valid_until_ms: r.i64("valid_until_ms")?,
            description: r.str8("description")?.to_owned(),
        }))
    }
}

/// One line of a basket (A2).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BasketItem {
    /// The item's ID.
    pub item_id: String,
    /// Its category (`alcohol`, `tobacco`, or empty).
    pub category: String,
    /// How many.
    pub quantity: u32,
    /// Price of one, minor units.
    pub unit_amount_minor: u64,
}

/// A sale's basket, for the age check (A2).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Basket {
    /// The store confirmed the buyer's age (flag bit 0).
    pub age_confirmation: bool,
    /// The lines, 1 to 256.
    pub items: Vec<BasketItem>,
}

impl Codec for Basket {
    fn encode(&self, w: &mut Writer<'_>) {
        w.flag(self.age_confirmation).u16(self.items.len() as u16);
        for item in &self.items {
            w.str8(&item.item_id)
                .str8(&item.category)
                .u32(item.quantity)
                .u64(item.unit_amount_minor);
        }
    }
    /// The item count is checked against the limit before anything is allocated.
    fn decode(r: &mut Reader<'_>) -> Result<Basket, BodyError> {
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
}

/// A sale line: item ID, quantity and unit price in minor units.
pub type SaleLine = (String, u32, u64);

/// A sale's lines: `u16` count (at most 256), then each line.
impl Codec for Vec<SaleLine> {
    fn encode(&self, w: &mut Writer<'_>) {
        w.u16(self.len() as u16);
        for (item_id, quantity, unit) in self {
            w.str8(item_id).u32(*quantity).u64(*unit);
        }
    }
    fn decode(r: &mut Reader<'_>) -> Result<Vec<SaleLine>, BodyError> {
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
}

/// A settlement method a store accepts: a kind, and a brand (empty: any of the kind).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AcceptedMethod {
    /// The means kind.
    pub kind: MeansKind,
    /// The brand, or empty.
    pub brand: String,
}

/// Accepted methods: `u8` count (at most 16), then each kind and brand.
impl Codec for Vec<AcceptedMethod> {
    fn encode(&self, w: &mut Writer<'_>) {
        w.u8(self.len() as u8);
        for accepted in self {
            w.u8(accepted.kind as u8).str8(&accepted.brand);
        }
    }
    fn decode(r: &mut Reader<'_>) -> Result<Vec<AcceptedMethod>, BodyError> {
        let count = r.count8("accepted_count", ACCEPTED_METHODS_MAX)?;
        let mut accepted = Vec::with_capacity(count);
        for _ in 0..count {
            let kind = MeansKind::from_u8(r.u8("kind")?).ok_or(BodyError::Invalid("kind"))?;
            accepted.push(AcceptedMethod { kind, brand: r.str8("brand")?.to_owned() });
        }
        Ok(accepted)
    }
}

/// A store (W1).
#[derive(Debug, Clone, PartialEq)]
pub struct Store {
    /// The store's ID.
    pub store_id: String,
    /// Its name.
    pub name: String,
    /// Its industry (merchant category).
    pub industry: String,
    /// Its address.
    pub address: String,
    /// Latitude, degrees (sent as 10^-7 degrees).
    pub latitude: f64,
    /// Longitude, degrees (sent as 10^-7 degrees).
    pub longitude: f64,
    /// Its beacon IDs.
    pub beacons: Vec<String>,
    /// Its Wi-Fi IDs.
    pub wifi: Vec<String>,
    /// Its QR poster's payload.
    pub qr_code: Option<String>,
    /// The methods it accepts.
    pub accepts: Vec<AcceptedMethod>,
}

/// Degrees as the wire's signed 10^-7 degrees (about 1 cm).
pub fn degrees_to_e7(degrees: f64) -> i32 {
    (degrees * 1e7).round() as i32
}

impl Codec for Store {
    fn encode(&self, w: &mut Writer<'_>) {
        w.str8(&self.store_id)
            .str8(&self.name)
            .str8(&self.industry)
            .str8(&self.address)
            .u32(degrees_to_e7(self.latitude) as u32)
            .u32(degrees_to_e7(self.longitude) as u32);
        for ids in [&self.beacons, &self.wifi] {
            w.u8(ids.len() as u8);
            for id in ids {
                w.str8(id);
            }
        }
        w.bytes16(self.qr_code.as_deref().unwrap_or("").as_bytes());
        self.accepts.encode(w);
    }
    fn decode(r: &mut Reader<'_>) -> Result<Store, BodyError> {
        let store_id = r.str8("store_id")?.to_owned();
        let name = r.str8("name")?.to_owned();
        let industry = r.str8("industry")?.to_owned();
        let address = r.str8("address")?.to_owned();
        let latitude = f64::from(r.u32("latitude_e7")? as i32) / 1e7;
        let longitude = f64::from(r.u32("longitude_e7")? as i32) / 1e7;
        let mut ids = |what| -> Result<Vec<String>, BodyError> {
            let count = r.count8(what, STORE_IDS_PER_KIND_MAX)?;
            (0..count).map(|_| r.str8(what).map(str::to_owned)).collect()
        };
        let beacons = ids("beacon_count")?;
        let wifi = ids("wifi_count")?;
        let qr = std::str::from_utf8(r.bytes16("qr_code")?)
            .map_err(|_| BodyError::Invalid("qr_code is not UTF-8"))?;
        let qr_code = (!qr.is_empty()).then(|| qr.to_owned());
        let accepts = Vec::<AcceptedMethod>::decode(r)?;
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
}

/// Largest `distance_mm` in an `entered` reply: half the circumference of the sphere
/// distances are measured on (radius 6,371,008.8 m), rounded up. A larger one is refused: no
/// two points are farther apart, and past 2^53 the distance would not survive its round trip
/// through metres as `f64`.
pub const DISTANCE_MM_MAX: u64 = 20_015_116_000;

/// The store a user entered (`STORE_AT`, `STORE_BY_SIGNAL`: W2).
#[derive(Debug, Clone, PartialEq)]
pub struct EnteredStore {
    /// The store.
    pub store: Store,
    /// How far it is, metres (by position only).
    pub distance_m: Option<f64>,
    /// Other stores as near (IDs).
    pub tied: Vec<String>,
    /// The QR networks its poster names.
    pub qr_networks: Vec<String>,
}

impl Codec for EnteredStore {
    fn encode(&self, w: &mut Writer<'_>) {
        self.store.encode(w);
        match self.distance_m {
            None => w.u8(0).u64(0),
            Some(metres) => w.u8(1).u64((metres * 1000.0).round() as u64),
        };
        for list in [&self.tied, &self.qr_networks] {
            w.u8(list.len().min(255) as u8);
            for item in list.iter().take(255) {
                w.str8(item);
            }
        }
    }
    fn decode(r: &mut Reader<'_>) -> Result<EnteredStore, BodyError> {
        let store = Store::decode(r)?;
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
}

/// What a coupon does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CouponEffect {
    /// Basis points off the sale.
    Percent {
        /// Basis points.
        bps: u16,
    },
    /// A fixed amount off, in its currency.
    Fixed {
        /// Minor units off.
        amount_minor: u64,
        /// The currency.
        currency: Currency,
    },
    /// A service code naming an order (no value).
    OrderCode,
}

impl Codec for CouponEffect {
    fn encode(&self, w: &mut Writer<'_>) {
        match *self {
            CouponEffect::Percent { bps } => w.u8(1).u64(u64::from(bps)).raw(b"XXX"),
            CouponEffect::Fixed { amount_minor, currency } => {
                w.u8(2).u64(amount_minor).currency(currency)
            }
            CouponEffect::OrderCode => w.u8(3).u64(0).raw(b"XXX"),
        };
    }
    /// Reads a coupon's kind, value and currency. A percent coupon and an order code carry the
    /// currency `XXX` (an order code also the value 0): anything else there is refused, so
    /// that every effect has one encoding.
    fn decode(r: &mut Reader<'_>) -> Result<CouponEffect, BodyError> {
        let kind = r.u8("coupon_kind")?;
        let value = r.u64("value")?;
        let currency = r.currency()?;
        let no_currency = currency.bytes() == *b"XXX";
        Ok(match kind {
            1 if !no_currency => {
                return Err(BodyError::Invalid("currency (XXX for a percent coupon)"))
            }
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
}

/// A cash-on-delivery parcel a user is told of (C4).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeliveryNotice {
    /// The user.
    pub user: UserKey,
    /// The order's reference.
    pub order_ref: String,
    /// The amount due.
    pub amount_minor: u64,
    /// Its currency.
    pub currency: Currency,
    /// Who sends it.
    pub merchant: String,
}

impl Codec for DeliveryNotice {
    fn encode(&self, w: &mut Writer<'_>) {
        w.user(&self.user)
            .str8(&self.order_ref)
            .u64(self.amount_minor)
            .currency(self.currency)
            .str8(&self.merchant);
    }
    fn decode(r: &mut Reader<'_>) -> Result<DeliveryNotice, BodyError> {
        Ok(DeliveryNotice {
            user: r.user()?,
            order_ref: r.str8("order_ref")?.to_owned(),
            amount_minor: r.u64("amount_minor")?,
            currency: r.currency()?,
            merchant: r.str8("merchant")?.to_owned(),
        })
    }
}

/// A payment code as issued (C1–C2, C4).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IssuedCode {
    /// The code's text.
    pub text: String,
    /// Its issue number.
    pub number: u64,
    /// The amount held.
    pub amount_minor: u64,
    /// Its currency.
    pub currency: Currency,
    /// When it expires, ms.
    pub expires_ms: i64,
    /// The device it is delivered to (zeros: the requesting one).
    pub deliver_to: Idm,
    /// The user.
    pub user: UserKey,
    /// A cash-on-delivery order's reference.
    pub order_ref: String,
}

impl Codec for IssuedCode {
    fn encode(&self, w: &mut Writer<'_>) {
        w.str8(&self.text)
            .u64(self.number)
            .u64(self.amount_minor)
            .currency(self.currency)
            .i64(self.expires_ms)
            .raw(&self.deliver_to)
            .user(&self.user)
            .str8(&self.order_ref);
    }
    fn decode(r: &mut Reader<'_>) -> Result<IssuedCode, BodyError> {
        Ok(IssuedCode {
            text: r.str8("text")?.to_owned(),
            number: r.u64("number")?,
            amount_minor: r.u64("amount_minor")?,
            currency: r.currency()?,
            expires_ms: r.i64("expires_ms")?,
            deliver_to: r.array("deliver_to")?,
            user: r.user()?,
            order_ref: r.str8("order_ref")?.to_owned(),
        })
    }
}

/// A coupon or service code as issued (C5).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IssuedCoupon {
    /// The coupon's text.
    pub text: String,
    /// Its issue number.
    pub number: u64,
    /// The user it is for.
    pub user: UserKey,
    /// What it does.
    pub effect: CouponEffect,
    /// Uses left.
    pub uses: u32,
    /// When it expires, ms.
    pub expires_ms: i64,
}

impl Codec for IssuedCoupon {
    fn encode(&self, w: &mut Writer<'_>) {
        w.str8(&self.text).u64(self.number).user(&self.user);
        self.effect.encode(w);
        w.u32(self.uses).i64(self.expires_ms);
    }
    fn decode(r: &mut Reader<'_>) -> Result<IssuedCoupon, BodyError> {
        Ok(IssuedCoupon {
            text: r.str8("text")?.to_owned(),
            number: r.u64("number")?,
            user: r.user()?,
            effect: CouponEffect::decode(r)?,
            uses: r.u32("uses")?,
            expires_ms: r.i64("expires_ms")?,
        })
    }
}

/// A payment code's redemption: what was captured and released (C3).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Redemption {
    /// The code's issue number.
    pub number: u64,
    /// Captured: the sale less the coupon.
    pub captured_minor: u64,
    /// Released from the hold.
    pub released_minor: u64,
    /// The coupon's discount.
    pub coupon_discount_minor: u64,
    /// The currency of the amounts.
    pub currency: Currency,
    /// The terminal that redeemed it.
    pub terminal_id: String,
    /// The provider that authorized.
    pub provider_code: u32,
    /// The authorization code.
    pub auth_code: AuthCode,
    /// When the sale was made, ms.
    pub sale_at_ms: i64,
    /// When it was redeemed, ms.
    pub redeemed_at_ms: i64,
    /// The sale's lines.
    pub items: Vec<SaleLine>,
}

impl Codec for Redemption {
    fn encode(&self, w: &mut Writer<'_>) {
        w.u64(self.number)
            .u64(self.captured_minor)
            .u64(self.released_minor)
            .u64(self.coupon_discount_minor)
            .currency(self.currency)
            .str8(&self.terminal_id)
            .u32(self.provider_code)
            .raw(&self.auth_code.0)
            .i64(self.sale_at_ms)
            .i64(self.redeemed_at_ms);
        self.items.encode(w);
    }
    fn decode(r: &mut Reader<'_>) -> Result<Redemption, BodyError> {
        Ok(Redemption {
            number: r.u64("number")?,
            captured_minor: r.u64("captured_minor")?,
            released_minor: r.u64("released_minor")?,
            coupon_discount_minor: r.u64("coupon_discount_minor")?,
            currency: r.currency()?,
            terminal_id: r.str8("terminal_id")?.to_owned(),
            provider_code: r.u32("provider_code")?,
            auth_code: AuthCode(r.array("auth_code")?),
            sale_at_ms: r.i64("sale_at_ms")?,
            redeemed_at_ms: r.i64("redeemed_at_ms")?,
            items: Vec::<SaleLine>::decode(r)?,
        })
    }
}
