//! `STORE_BY_SIGNAL` (0x0053): the store a beacon, Wi-Fi ID or QR poster names (W2).

use crate::ops::Operation;
use crate::values::EnteredStore;
use crate::wire::{BodyError, Reader, Writer};

/// What a store is recognised by.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Signal {
    /// A beacon ID (1).
    Beacon = 1,
    /// A Wi-Fi ID (2).
    Wifi = 2,
    /// A QR poster's payload (3).
    QrPoster = 3,
}

impl Signal {
    /// Decodes the wire byte.
    pub fn from_u8(byte: u8) -> Option<Signal> {
        match byte {
            1 => Some(Signal::Beacon),
            2 => Some(Signal::Wifi),
            3 => Some(Signal::QrPoster),
            _ => None,
        }
    }
}

/// The store a signal names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreBySignal {
    /// The kind of signal.
    pub signal: Signal,
    /// Its ID or payload.
    pub id: String,
}

impl Operation for StoreBySignal {
    const OPCODE: u16 = 0x0053;
    const NAME: &'static str = "store_by_signal";
    type Reply = Box<EnteredStore>;

    fn encode(&self, w: &mut Writer<'_>) {
        w.u8(self.signal as u8).bytes16(self.id.as_bytes());
    }

    fn decode(_: u16, r: &mut Reader<'_>) -> Result<StoreBySignal, BodyError> {
        Ok(StoreBySignal {
            signal: Signal::from_u8(r.u8("signal")?).ok_or(BodyError::Invalid("signal"))?,
            id: std::str::from_utf8(r.bytes16("id")?)
                .map_err(|_| BodyError::Invalid("id is not UTF-8"))?
                .to_owned(),
        })
    }
}
