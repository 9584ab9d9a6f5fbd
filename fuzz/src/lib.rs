//! Helpers shared by the fuzz targets: how a target's input chooses an opcode and a status.

use settlegate_protocol::messages::{opcode::*, status};

/// Every request opcode of `docs/PROTOCOL.md` section 5.
pub const REQUEST_OPCODES: &[u16] = &[
    AUTH,
    PING,
    SERVER_INFO,
    ENROLL,
    LOGIN,
    ADD_MEANS,
    SET_DEFAULT_MEANS,
    LIST_MEANS,
    PROVISION_DEVICE,
    ROTATE_DEVICE_KEY,
    SUBSCRIBE_NOTICES,
    REGISTER_TERMINALS,
    REMOVE_TERMINALS,
    CONFIRM_TERMINAL,
    AUTHORIZE,
    AUTHORIZE_BASKET,
    REGISTER_AGE,
    SET_AGE_POLICY,
    UPSERT_STORE,
    REMOVE_STORE,
    STORE_AT,
    STORE_BY_SIGNAL,
    TOP_UP,
    USABLE_METHODS,
    WALLET,
    ISSUE_CODE,
    REDEEM_CODE,
    CODE_STATE,
    ISSUE_COUPONS,
    NOTIFY_DELIVERY,
    SUBSCRIBE_DEVICE,
    REDEEM_CODE_BASKET,
];

/// The request opcodes and the two the server pushes.
pub const RESPONSE_OPCODES: &[u16] = &[
    AUTH,
    PING,
    SERVER_INFO,
    ENROLL,
    LOGIN,
    ADD_MEANS,
    SET_DEFAULT_MEANS,
    LIST_MEANS,
    PROVISION_DEVICE,
    ROTATE_DEVICE_KEY,
    SUBSCRIBE_NOTICES,
    REGISTER_TERMINALS,
    REMOVE_TERMINALS,
    CONFIRM_TERMINAL,
    AUTHORIZE,
    AUTHORIZE_BASKET,
    REGISTER_AGE,
    SET_AGE_POLICY,
    UPSERT_STORE,
    REMOVE_STORE,
    STORE_AT,
    STORE_BY_SIGNAL,
    TOP_UP,
    USABLE_METHODS,
    WALLET,
    ISSUE_CODE,
    REDEEM_CODE,
    CODE_STATE,
    ISSUE_COUPONS,
    NOTIFY_DELIVERY,
    SUBSCRIBE_DEVICE,
    REDEEM_CODE_BASKET,
    NOTICE,
    DEVICE_MESSAGE,
];

/// Every status of `docs/PROTOCOL.md` section 4.
pub const STATUSES: &[u16] = &[
    status::OK,
    status::REFUSED,
    status::BUSY,
    status::IN_FLIGHT,
    status::UNAUTHENTICATED,
    status::FORBIDDEN,
    status::BAD_REQUEST,
    status::UNKNOWN_OPCODE,
    status::SHUTTING_DOWN,
    status::INTERNAL,
    status::FRAME_ERROR,
];

/// Splits `data` into a value and the rest: the first byte indexes `table` (modulo its
/// length), except 0xFF, which takes the next two bytes as the value itself (so that values
/// outside the table are reached too).
fn pick<'a>(data: &'a [u8], table: &[u16]) -> Option<(u16, &'a [u8])> {
    match data {
        [0xFF, high, low, rest @ ..] => Some((u16::from_be_bytes([*high, *low]), rest)),
        [0xFF, ..] | [] => None,
        [index, rest @ ..] => Some((table[usize::from(*index) % table.len()], rest)),
    }
}

/// An opcode from `table` (or any, see [`pick`]) and the rest of `data`.
pub fn pick_opcode<'a>(data: &'a [u8], table: &[u16]) -> Option<(u16, &'a [u8])> {
    pick(data, table)
}

/// A status (any, see [`pick`]) and the rest of `data`.
pub fn pick_status(data: &[u8]) -> Option<(u16, &[u8])> {
    pick(data, STATUSES)
}
