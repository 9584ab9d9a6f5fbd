//! `NOTICE` (0x0018): a pushed completion notice (under `SUBSCRIBE_NOTICES`).

use settlegate_types::{AuthOutcome, ClientRequestId, UserKey};

use crate::ops::Push;
use crate::values::Codec;
use crate::wire::{BodyError, Reader, Writer};

/// A settlement's completion, told to its user.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Notice {
    /// The user.
    pub user: UserKey,
    /// The authorization's client request ID.
    pub client_request_id: ClientRequestId,
    /// The store terminal.
    pub terminal_id: String,
    /// The outcome.
    pub outcome: AuthOutcome,
    /// When it completed, ms.
    pub at_ms: i64,
}

impl Codec for Notice {
    fn encode(&self, w: &mut Writer<'_>) {
        w.user(&self.user)
            .u128(self.client_request_id)
            .str8(&self.terminal_id)
            .i64(self.at_ms);
        self.outcome.encode(w);
    }
    fn decode(r: &mut Reader<'_>) -> Result<Notice, BodyError> {
        let user = r.user()?;
        let client_request_id = r.u128("client_request_id")?;
        let terminal_id = r.str8("terminal_id")?.to_owned();
        let at_ms = r.i64("at_ms")?;
        let outcome = AuthOutcome::decode(r)?;
        Ok(Notice { user, client_request_id, terminal_id, outcome, at_ms })
    }
}

impl Push for Notice {
    const OPCODE: u16 = 0x0018;
    const NAME: &'static str = "notice";
}
