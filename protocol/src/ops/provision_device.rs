//! `PROVISION_DEVICE` (0x0015): provision another device.

use crate::values::{device_request, DeviceCredential};

device_request! {
    /// Provision another device of an enrolled user; the reply is its credential.
    ProvisionDevice = 0x0015, "provision_device", DeviceCredential
}
