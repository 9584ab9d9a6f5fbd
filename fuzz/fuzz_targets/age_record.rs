//! Age records (`REGISTER_AGE`) from arbitrary bytes. Properties: no panic; whatever decodes
//! re-encodes to the same body, and body and tag are the whole record.
#![no_main]

use libfuzzer_sys::fuzz_target;
use settlegate_engine::AgeRecord;

fuzz_target!(|data: &[u8]| {
    if let Ok((record, body, tag)) = AgeRecord::decode(data) {
        let mut again = Vec::new();
        record.encode_body(&mut again);
        assert_eq!(again, body);
        assert_eq!([body, tag.as_slice()].concat(), data);
    }
});
