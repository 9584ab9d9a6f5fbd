//! ISO 8583 message bodies (what the host sends after the length header) handed straight to
//! the adapter's decoder. Properties: no panic (the redacting `Debug` included); whatever
//! decodes encodes to the same bytes behind a length header that announces them.
#![no_main]

use libfuzzer_sys::fuzz_target;
use settlegate_engine::adapters::iso8583::codec;

fuzz_target!(|data: &[u8]| {
    if let Ok(message) = codec::decode(data) {
        let _ = format!("{message:?}");
        let mut again = Vec::new();
        codec::encode(&message, &mut again).unwrap();
        assert_eq!(&again[codec::LENGTH_HEADER_LEN..], data, "{message:?}");
        assert_eq!(codec::split_frame(&again).unwrap(), Some((again.len(), data)));
    }
});
