//! `NOTIFY_DELIVERY` (0x0064): tell a user a cash-on-delivery parcel is coming (C4).

use settlegate_types::ClientRequestId;

use crate::ops::Operation;
use crate::values::{Codec, DeliveryNotice};
use crate::wire::{BodyError, Reader, Writer};

/// Tell a user's devices of a parcel; the reply counts the devices told.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NotifyDelivery {
    /// Makes the request idempotent.
    pub client_request_id: ClientRequestId,
    /// The notice.
    pub notice: DeliveryNotice,
}

/// How many devices were told.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Delivered {
    /// Devices.
    pub devices: u32,
}

impl Codec for Delivered {
    fn encode(&self, w: &mut Writer<'_>) {
        w.u32(self.devices);
    }
    fn decode(r: &mut Reader<'_>) -> Result<Delivered, BodyError> {
        Ok(Delivered { devices: r.u32("devices")? })
    }
}

impl Operation for NotifyDelivery {
    const OPCODE: u16 = 0x0064;
    const NAME: &'static str = "notify_delivery";
    type Reply = Delivered;

    fn encode(&self, w: &mut Writer<'_>) {
        w.u128(self.client_request_id);
        self.notice.encode(w);
    }

    fn decode(_: u16, r: &mut Reader<'_>) -> Result<NotifyDelivery, BodyError> {
        Ok(NotifyDelivery {
            client_request_id: r.u128("client_request_id")?,
            notice: DeliveryNotice::decode(r)?,
        })
    }
}
