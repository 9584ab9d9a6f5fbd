//! Helpers shared by the fuzz targets: how a target's input chooses an opcode and a status.

use settlegate_protocol::messages::{opcode::*, status};

/// Every request opcode: the protocol's own list, which a test there keeps equal to what
/// `Request::decode` knows.
pub const REQUEST_OPCODES: &[u16] = REQUESTS;

/// The request opcodes and the two the server pushes.
pub fn response_opcodes() -> &'static [u16] {
    static OPCODES: std::sync::LazyLock<Vec<u16>> = std::sync::LazyLock::new(|| {
        REQUESTS.iter().copied().chain([NOTICE, DEVICE_MESSAGE]).collect()
    });
    &OPCODES
}

/// Every status of `docs/PROTOCOL.md` section 4.
pub const STATUSES: &[u16] = status::ALL;

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
