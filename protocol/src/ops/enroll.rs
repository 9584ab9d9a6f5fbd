//! `ENROLL` (0x0010): enroll a user and their first device.

use crate::values::{device_request, DeviceCredential};

device_request! {
    /// Enroll a user with a password and their first device; the reply is the device's
    /// credential.
    Enroll = 0x0010, "enroll", DeviceCredential
}
