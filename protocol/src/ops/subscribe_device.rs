//! `SUBSCRIBE_DEVICE` (0x0065): subscribe to one device's messages
//! ([`DeviceMessage`](crate::ops::device_message::DeviceMessage) pushes follow).

use settlegate_types::{Idm, UserKey};

use crate::ops::Operation;
use crate::wire::{BodyError, Reader, Writer};

/// Subscribe to a device's messages; an empty reply, then the pushes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubscribeDevice {
    /// The user.
    pub user: UserKey,
    /// The user's password.
    pub password: String,
    /// The device's card IDm.
    pub card_idm: Idm,
}

impl Operation for SubscribeDevice {
    const OPCODE: u16 = 0x0065;
    const NAME: &'static str = "subscribe_device";
    type Reply = ();

    fn encode(&self, w: &mut Writer<'_>) {
        w.user(&self.user).str8(&self.password).raw(&self.card_idm);
    }

    fn decode(_: u16, r: &mut Reader<'_>) -> Result<SubscribeDevice, BodyError> {
        Ok(SubscribeDevice {
            user: r.user()?,
            password: r.str8("password")?.to_owned(),
            card_idm: r.array("card_idm")?,
        })
    }
}
