//! `SET_DEFAULT_MEANS` (0x0013): choose the default means.

use settlegate_types::{ClientRequestId, UserKey};

use crate::ops::Operation;
use crate::wire::{BodyError, Reader, Writer};

/// Make one of a user's means the default; an empty reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SetDefaultMeans {
    /// Makes the request idempotent.
    pub client_request_id: ClientRequestId,
    /// The user.
    pub user: UserKey,
    /// The means.
    pub means_id: u32,
}

impl Operation for SetDefaultMeans {
    const OPCODE: u16 = 0x0013;
    const NAME: &'static str = "set_default_means";
    type Reply = ();

    fn encode(&self, w: &mut Writer<'_>) {
        w.u128(self.client_request_id).user(&self.user).u32(self.means_id);
    }

    fn decode(_: u16, r: &mut Reader<'_>) -> Result<SetDefaultMeans, BodyError> {
        Ok(SetDefaultMeans {
            client_request_id: r.u128("client_request_id")?,
            user: r.user()?,
            means_id: r.u32("means_id")?,
        })
    }

    fn route(&self) -> super::Route<'_> {
        super::Route::User(&self.user)
    }
}
