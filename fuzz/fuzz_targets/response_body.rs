//! Response bodies handed straight to `Response::decode`, per opcode and status. Properties:
//! no panic; whatever decodes re-encodes to the same status and bytes.
//!
//! Input: one byte choosing the opcode (as in `request_body`, the push opcodes included), one
//! choosing the status (an index into the statuses; 0xFF: the next two bytes), then the body.
#![no_main]

use libfuzzer_sys::fuzz_target;
use settlegate_fuzz::{pick_opcode, pick_status, response_opcodes};
use settlegate_protocol::frame;
use settlegate_protocol::messages::Response;

fuzz_target!(|data: &[u8]| {
    let Some((opcode, rest)) = pick_opcode(data, response_opcodes()) else { return };
    let Some((status, body)) = pick_status(rest) else { return };
    if let Ok(response) = Response::decode(opcode, status, body) {
        let (status_again, body_again) = response.encode();
        assert_eq!(status_again, status);
        assert_eq!(body_again, body, "opcode {opcode:#06x} status {status}: decoded {response:?}");
        let mut bytes = Vec::new();
        response.encode_frame(opcode, 7, &mut bytes);
        let (frame, _) = frame::decode(&bytes).unwrap().unwrap();
        assert_eq!(Response::decode(opcode, frame.status, &frame.body).unwrap(), response);
    }
});
