//! Between the wire's types (`settlegate-protocol`) and the engine's: requests in
//! ([`ToEngine`]), replies and pushes out ([`ToWire`]). Field for field; the values themselves
//! (IDs, money, reason codes, an authorization's outcome) are the same types on both sides
//! (`settlegate-types`).

use settlegate_engine as engine;
use settlegate_engine::codes::CouponEffect;
use settlegate_engine::RequestId;
use settlegate_protocol::messages as wire;
use settlegate_protocol::ops::issue_code::IssueCode;
use settlegate_protocol::ops::redeem_code::RedeemCode;
use settlegate_protocol::values;

/// A wire value as the engine takes it.
pub trait ToEngine {
    /// The engine's type.
    type Engine;
    /// Converts.
    fn to_engine(self) -> Self::Engine;
}

/// An engine value as the wire carries it.
pub trait ToWire {
    /// The wire's type.
    type Wire;
    /// Converts.
    fn to_wire(self) -> Self::Wire;
}

impl<T: ToEngine> ToEngine for Option<T> {
    type Engine = Option<T::Engine>;
    fn to_engine(self) -> Option<T::Engine> {
        self.map(T::to_engine)
    }
}

impl<T: ToEngine> ToEngine for Vec<T> {
    type Engine = Vec<T::Engine>;
    fn to_engine(self) -> Vec<T::Engine> {
        self.into_iter().map(T::to_engine).collect()
    }
}

impl<T: ToWire> ToWire for Option<T> {
    type Wire = Option<T::Wire>;
    fn to_wire(self) -> Option<T::Wire> {
        self.map(T::to_wire)
    }
}

impl<T: ToWire> ToWire for Vec<T> {
    type Wire = Vec<T::Wire>;
    fn to_wire(self) -> Vec<T::Wire> {
        self.into_iter().map(T::to_wire).collect()
    }
}

impl<T: ToWire> ToWire for Box<T> {
    type Wire = Box<T::Wire>;
    fn to_wire(self) -> Box<T::Wire> {
        Box::new((*self).to_wire())
    }
}

/// Converts field for field, both ways, between a wire struct and the engine's: the fields
/// before `;` are the same type on both sides, those after it convert themselves.
macro_rules! field_for_field {
    ($($wire:ident::$wire_ty:ident <=> $engine_ty:ident { $($same:ident),* ; $($mapped:ident),* })+) => {
        $(
            impl ToEngine for $wire::$wire_ty {
                type Engine = engine::$engine_ty;
                fn to_engine(self) -> engine::$engine_ty {
                    engine::$engine_ty { $($same: self.$same,)* $($mapped: self.$mapped.to_engine(),)* }
                }
            }

            impl ToWire for engine::$engine_ty {
                type Wire = $wire::$wire_ty;
                fn to_wire(self) -> $wire::$wire_ty {
                    $wire::$wire_ty { $($same: self.$same,)* $($mapped: self.$mapped.to_wire(),)* }
                }
            }
        )+
    };
}

field_for_field! {
    values::AcceptedMethod <=> AcceptedMethod { kind, brand; }
    values::Store <=> Store {
        store_id, name, industry, address, latitude, longitude, beacons, wifi, qr_code; accepts
    }
    values::EnteredStore <=> EnteredStore { distance_m, tied, qr_networks; store }
    values::TerminalService <=> TerminalService {
        valid_from_ms, valid_until_ms, description; discount
    }
    values::BasketItem <=> BasketItem { item_id, category, quantity, unit_amount_minor; }
    values::DeliveryNotice <=> DeliveryNotice { user, order_ref, amount_minor, currency, merchant; }
    values::Balance <=> Balance { balance_minor, available_minor, currency; }
    values::MeansView <=> MeansView {
        means_id, kind, label, last4, token, is_default, uses, last_used_ms, registered_ms;
        balance
    }
    values::IssuedCode <=> IssuedCode {
        text, number, amount_minor, currency, expires_ms, deliver_to, user, order_ref;
    }
    values::IssuedCoupon <=> IssuedCoupon { text, number, user, uses, expires_ms; effect }
    values::Redemption <=> Redemption {
        number, captured_minor, released_minor, coupon_discount_minor, currency, terminal_id,
        provider_code, auth_code, sale_at_ms, redeemed_at_ms, items;
    }
    wire::MeansAdded <=> MeansAdded { means_id, last4; }
    wire::Notice <=> Notice { user, client_request_id, terminal_id, outcome, at_ms; }
}

/// The code a device is to be issued: the engine's request, field for field.
impl ToEngine for IssueCode {
    type Engine = engine::IssueCodeRequest;
    fn to_engine(self) -> engine::IssueCodeRequest {
        let IssueCode { client_request_id, inherent_id, validity_ms, deliver_to, order_ref } = self;
        engine::IssueCodeRequest {
            client_request_id: RequestId(client_request_id),
            inherent_id,
            validity_ms,
            deliver_to,
            order_ref,
        }
    }
}

// ---- requests in ---------------------------------------------------------------------------

impl ToEngine for wire::MeansInput {
    type Engine = engine::MeansInput;
    fn to_engine(self) -> engine::MeansInput {
        match self {
            wire::MeansInput::CreditCard { pan } => engine::MeansInput::CreditCard { pan },
            wire::MeansInput::EMoney { emoney_type } => engine::MeansInput::EMoney { emoney_type },
            wire::MeansInput::QrCode { scheme, settlement_number } => {
                engine::MeansInput::QrCode { scheme, settlement_number }
            }
            wire::MeansInput::BankAccount { bank_code, account_number } => {
                engine::MeansInput::BankAccount { bank_code, account_number }
            }
        }
    }
}

impl ToEngine for wire::MeansOrder {
    type Engine = engine::MeansOrder;
    fn to_engine(self) -> engine::MeansOrder {
        match self {
            wire::MeansOrder::Registration => engine::MeansOrder::Registration,
            wire::MeansOrder::Frequency => engine::MeansOrder::Frequency,
            wire::MeansOrder::Recency => engine::MeansOrder::Recency,
        }
    }
}

impl ToEngine for values::Discount {
    type Engine = engine::Discount;
    fn to_engine(self) -> engine::Discount {
        match self {
            values::Discount::Percent { bps } => engine::Discount::Percent { bps },
            values::Discount::Fixed { amount_minor, currency } => {
                engine::Discount::Fixed { amount_minor, currency }
            }
        }
    }
}

impl ToEngine for wire::TerminalEntry {
    type Engine = engine::TerminalEntry;
    fn to_engine(self) -> engine::TerminalEntry {
        engine::TerminalEntry { terminal_id: self.terminal_id, service: self.service.to_engine() }
    }
}

impl ToEngine for values::Basket {
    type Engine = engine::Basket;
    fn to_engine(self) -> engine::Basket {
        engine::Basket { age_confirmation: self.age_confirmation, items: self.items.to_engine() }
    }
}

impl ToEngine for wire::AgePolicy {
    type Engine = engine::AgePolicy;
    fn to_engine(self) -> engine::AgePolicy {
        engine::AgePolicy {
            jurisdiction: self.jurisdiction,
            time_zone: self.time_zone,
            on_failure: match self.on_failure {
                wire::OnAgeFailure::Refuse => engine::OnAgeFailure::Refuse,
                wire::OnAgeFailure::RemoveItems => engine::OnAgeFailure::RemoveItems,
            },
            strict: self.strict,
        }
    }
}

impl ToEngine for wire::Signal {
    type Engine = engine::Signal;
    fn to_engine(self) -> engine::Signal {
        match self {
            wire::Signal::Beacon => engine::Signal::Beacon,
            wire::Signal::Wifi => engine::Signal::Wifi,
            wire::Signal::QrPoster => engine::Signal::QrPoster,
        }
    }
}

impl ToEngine for wire::BestBy {
    type Engine = engine::BestBy;
    fn to_engine(self) -> engine::BestBy {
        match self {
            wire::BestBy::MostUsed => engine::BestBy::MostUsed,
            wire::BestBy::LargestBalance => engine::BestBy::LargestBalance,
        }
    }
}

/// A redemption's lines, items or a basket, become the engine's two fields (one of them empty).
impl ToEngine for RedeemCode {
    type Engine = engine::RedeemRequest;
    fn to_engine(self) -> engine::RedeemRequest {
        let lines = match self.lines {
            wire::SaleLines::Items(items) => engine::SaleLines::Items(items),
            wire::SaleLines::Basket(basket) => engine::SaleLines::Basket(basket.to_engine()),
        };
        engine::RedeemRequest {
            client_request_id: RequestId(self.client_request_id),
            code: self.code,
            issuer: self.issuer,
            number: self.number,
            amount_minor: self.amount_minor,
            currency: self.currency,
            sale_at_ms: self.sale_at_ms,
            terminal_id: self.terminal_id,
            lines,
            coupon: self.coupon,
            order_ref: self.order_ref,
        }
    }
}

impl ToEngine for values::CouponEffect {
    type Engine = CouponEffect;
    fn to_engine(self) -> CouponEffect {
        match self {
            values::CouponEffect::Percent { bps } => CouponEffect::Percent { bps },
            values::CouponEffect::Fixed { amount_minor, currency } => {
                CouponEffect::Fixed { amount_minor, currency }
            }
            values::CouponEffect::OrderCode => CouponEffect::OrderCode,
        }
    }
}

// ---- replies out ---------------------------------------------------------------------------

impl ToWire for engine::DeviceCredential {
    type Wire = values::DeviceCredential;
    fn to_wire(self) -> values::DeviceCredential {
        values::DeviceCredential {
            card_idm: self.card_idm,
            key_version: self.key_version,
            device_key: values::DeviceKey::from_bytes(*self.device_key.expose()),
        }
    }
}

impl ToWire for engine::Discount {
    type Wire = values::Discount;
    fn to_wire(self) -> values::Discount {
        match self {
            engine::Discount::Percent { bps } => values::Discount::Percent { bps },
            engine::Discount::Fixed { amount_minor, currency } => {
                values::Discount::Fixed { amount_minor, currency }
            }
        }
    }
}

impl ToWire for engine::BasketOutcome {
    type Wire = wire::BasketOutcome;
    fn to_wire(self) -> wire::BasketOutcome {
        wire::BasketOutcome { outcome: self.outcome, verdict: self.verdict.to_wire() }
    }
}

impl ToWire for engine::TerminalConfirmation {
    type Wire = wire::TerminalConfirmation;
    fn to_wire(self) -> wire::TerminalConfirmation {
        match self {
            engine::TerminalConfirmation::NotListed => wire::TerminalConfirmation::NotListed,
            engine::TerminalConfirmation::Listed { service } => {
                wire::TerminalConfirmation::Listed { service: service.to_wire() }
            }
        }
    }
}

impl ToWire for engine::AgeVerdict {
    type Wire = wire::AgeVerdict;
    fn to_wire(self) -> wire::AgeVerdict {
        let check = match self.check {
            engine::AgeCheck::NotChecked => wire::AgeCheck::NotChecked,
            engine::AgeCheck::NoRestrictedItems => wire::AgeCheck::NoRestrictedItems,
            engine::AgeCheck::Held => wire::AgeCheck::Held,
            engine::AgeCheck::NotHeld => wire::AgeCheck::NotHeld,
        };
        wire::AgeVerdict { check, items: self.items, amount_minor: self.amount_minor }
    }
}

impl ToWire for engine::UsableMethods {
    type Wire = wire::UsableAtStore;
    fn to_wire(self) -> wire::UsableAtStore {
        wire::UsableAtStore {
            store_id: self.store_id,
            methods: self
                .methods
                .into_iter()
                .map(|m| wire::MethodAtStore { means: m.means.to_wire(), usable: m.usable })
                .collect(),
            best: self.best,
            accepted: self.accepted.to_wire(),
        }
    }
}

impl ToWire for engine::CodeOutcome {
    type Wire = wire::CodeOutcome;
    fn to_wire(self) -> wire::CodeOutcome {
        match self {
            engine::CodeOutcome::Issued(code) => wire::CodeOutcome::Issued(code.to_wire()),
            engine::CodeOutcome::Declined(reason) => wire::CodeOutcome::Declined(reason),
        }
    }
}

impl ToWire for engine::CodeState {
    type Wire = wire::CodeState;
    fn to_wire(self) -> wire::CodeState {
        match self {
            engine::CodeState::Issued => wire::CodeState::Issued,
            engine::CodeState::Redeemed(x) => wire::CodeState::Redeemed(x.to_wire()),
            engine::CodeState::Expired => wire::CodeState::Expired,
            engine::CodeState::Voided => wire::CodeState::Voided,
        }
    }
}

impl ToWire for CouponEffect {
    type Wire = values::CouponEffect;
    fn to_wire(self) -> values::CouponEffect {
        match self {
            CouponEffect::Percent { bps } => values::CouponEffect::Percent { bps },
            CouponEffect::Fixed { amount_minor, currency } => {
                values::CouponEffect::Fixed { amount_minor, currency }
            }
            CouponEffect::OrderCode => values::CouponEffect::OrderCode,
        }
    }
}

impl ToWire for engine::DeviceMessage {
    type Wire = wire::DeviceMessage;
    fn to_wire(self) -> wire::DeviceMessage {
        match self {
            engine::DeviceMessage::Code(code) => wire::DeviceMessage::Code(code.to_wire()),
            engine::DeviceMessage::Coupon(coupon) => wire::DeviceMessage::Coupon(coupon.to_wire()),
            engine::DeviceMessage::Delivery(notice) => {
                wire::DeviceMessage::Delivery(notice.to_wire())
            }
        }
    }
}
