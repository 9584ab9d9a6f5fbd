//! `ROTATE_DEVICE_KEY` (0x0016): rotate a device key.

use crate::values::{device_request, DeviceCredential};

device_request! {
    /// Rotate a device's key; the reply is the new credential.
    RotateDeviceKey = 0x0016, "rotate_device_key", DeviceCredential
}
