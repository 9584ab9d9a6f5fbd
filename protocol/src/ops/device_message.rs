//! `DEVICE_MESSAGE` (0x0066): a pushed device message (under `SUBSCRIBE_DEVICE`).

use crate::ops::Push;
use crate::values::{Codec, DeliveryNotice, IssuedCode, IssuedCoupon};
use crate::wire::{BodyError, Reader, Writer};

/// What a device is told: `kind` 1 a code, 2 a coupon, 3 a delivery.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeviceMessage {
    /// A payment code issued for it.
    Code(IssuedCode),
    /// A coupon issued to its user.
    Coupon(IssuedCoupon),
    /// A parcel coming.
    Delivery(DeliveryNotice),
}

impl Codec for DeviceMessage {
    fn encode(&self, w: &mut Writer<'_>) {
        match self {
            DeviceMessage::Code(code) => {
                w.u8(1);
                code.encode(w);
            }
            DeviceMessage::Coupon(coupon) => {
                w.u8(2);
                coupon.encode(w);
            }
            DeviceMessage::Delivery(notice) => {
                w.u8(3);
                notice.encode(w);
            }
        }
    }
    fn decode(r: &mut Reader<'_>) -> Result<DeviceMessage, BodyError> {
        Ok(match r.u8("kind")? {
            1 => DeviceMessage::Code(IssuedCode::decode(r)?),
            2 => DeviceMessage::Coupon(IssuedCoupon::decode(r)?),
            3 => DeviceMessage::Delivery(DeliveryNotice::decode(r)?),
            _ => return Err(BodyError::Invalid("kind")),
        })
    }
}

impl Push for DeviceMessage {
    const OPCODE: u16 = 0x0066;
    const NAME: &'static str = "device_message";
}
