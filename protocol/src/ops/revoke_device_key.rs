//! `REVOKE_DEVICE_KEY` (0x0019): revoke every key of a device at once.

use crate::values::device_request;

device_request! {
    /// Revoke every key of a device at once (a lost or stolen phone); an empty reply.
    RevokeDeviceKey = 0x0019, "revoke_device_key", ()
}
