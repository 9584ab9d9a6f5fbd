//! Request bodies handed straight to `Request::decode`, per opcode, past the frame checksums
//! that random bytes never pass. Properties: no panic; an unknown opcode is the only
//! `UnknownOpcode`; whatever decodes re-encodes to the same bytes (every body has one
//! encoding, so a decoder that accepts a reserved or padding byte it then rewrites fails).
//!
//! Input: one byte choosing the opcode (an index into the known opcodes; 0xFF: the next two
//! bytes are the opcode, known or not), then the body.
#![no_main]

use libfuzzer_sys::fuzz_target;
use settlegate_fuzz::{pick_opcode, REQUEST_OPCODES};
use settlegate_protocol::frame;
use settlegate_protocol::messages::Request;
use settlegate_protocol::DecodeError;

fuzz_target!(|data: &[u8]| {
    let Some((opcode, body)) = pick_opcode(data, REQUEST_OPCODES) else { return };
    match Request::decode(opcode, body) {
        Ok(request) => {
            assert_eq!(request.opcode(), opcode);
            let mut again = Vec::new();
            request.encode_body(&mut again);
            assert_eq!(again, body, "opcode {opcode:#06x}: decoded {request:?}");
            // The frame the client sends decodes to the same request.
            let mut bytes = Vec::new();
            request
                .encode_frame(7, &mut bytes)
                .expect("a decoded body re-encodes within the limit");
            let (frame, used) = frame::decode(&bytes).unwrap().unwrap();
            assert_eq!((used, frame.opcode, frame.body.as_slice()), (bytes.len(), opcode, body));
        }
        Err(DecodeError::UnknownOpcode(unknown)) => {
            assert_eq!(unknown, opcode);
            assert!(!REQUEST_OPCODES.contains(&opcode), "{opcode:#06x} is known");
        }
        Err(DecodeError::Body(_)) => assert!(REQUEST_OPCODES.contains(&opcode)),
    }
});
