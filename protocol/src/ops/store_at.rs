//! `STORE_AT` (0x0052): the store at a GPS position (W2).

use crate::ops::Operation;
use crate::values::EnteredStore;
use crate::wire::{BodyError, Reader, Writer};

/// The nearest store within a radius of a position.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StoreAt {
    /// Latitude, 10^-7 degrees.
    pub latitude_e7: i32,
    /// Longitude, 10^-7 degrees.
    pub longitude_e7: i32,
    /// Search radius, metres.
    pub radius_m: u32,
}

impl Operation for StoreAt {
    const OPCODE: u16 = 0x0052;
    const NAME: &'static str = "store_at";
    type Reply = Box<EnteredStore>;

    fn encode(&self, w: &mut Writer<'_>) {
        w.u32(self.latitude_e7 as u32).u32(self.longitude_e7 as u32).u32(self.radius_m);
    }

    fn decode(_: u16, r: &mut Reader<'_>) -> Result<StoreAt, BodyError> {
        Ok(StoreAt {
            latitude_e7: r.u32("latitude_e7")? as i32,
            longitude_e7: r.u32("longitude_e7")? as i32,
            radius_m: r.u32("radius_m")?,
        })
    }
}
