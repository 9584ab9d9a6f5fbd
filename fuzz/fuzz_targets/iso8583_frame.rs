//! An ISO 8583 byte stream as the adapter's reader takes it: `split_frame` then `decode`, frame
//! after frame. Properties: no panic; a frame is its 2-byte length header and the body it
//! announces; a partial frame is `None` until complete; a decoded message re-encodes to its
//! frame.
#![no_main]

use libfuzzer_sys::fuzz_target;
use settlegate_engine::adapters::iso8583::codec::{self, LENGTH_HEADER_LEN};

fuzz_target!(|data: &[u8]| {
    let mut rest = data;
    while let Ok(Some((len, body))) = codec::split_frame(rest) {
        assert_eq!(len, LENGTH_HEADER_LEN + body.len());
        assert_eq!(&rest[LENGTH_HEADER_LEN..len], body);
        assert_eq!(codec::split_frame(&rest[..len - 1]), Ok(None));
        if let Ok(message) = codec::decode(body) {
            let mut again = Vec::new();
            codec::encode(&message, &mut again).unwrap();
            assert_eq!(again, &rest[..len], "{message:?}");
        }
        rest = &rest[len..];
    }
});
