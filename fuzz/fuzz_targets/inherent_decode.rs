//! Inherent IDs from arbitrary bytes: decoding and the terminal peek must never panic, and
//! agree with each other.
#![no_main]

use libfuzzer_sys::fuzz_target;
use settlegate_engine::inherent::{peek_terminal_id, InherentId};

fuzz_target!(|data: &[u8]| {
    let peeked = peek_terminal_id(data);
    if let Ok((record, body, _tag)) = InherentId::decode(data) {
        assert_eq!(peeked, Some(record.terminal_id.as_str()));
        let mut again = Vec::new();
        record.encode_body(&mut again);
        assert_eq!(again, body);
    }
});
