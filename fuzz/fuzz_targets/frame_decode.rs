//! Frames and message bodies from arbitrary bytes: must never panic, and whatever decodes
//! must re-encode to the same bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use settlegate_protocol::frame;
use settlegate_protocol::messages::{Request, Response};

fuzz_target!(|data: &[u8]| {
    let mut rest = data;
    while let Ok(Some((frame, used))) = frame::decode(rest) {
        assert_eq!(frame.to_bytes(), &rest[..used]);
        if let Ok(request) = Request::decode(frame.opcode, &frame.body) {
            assert_eq!(request.to_frame(frame.request_id).body, frame.body);
        }
        let _ = Response::decode(frame.opcode, frame.status, &frame.body);
        rest = &rest[used..];
    }
});
