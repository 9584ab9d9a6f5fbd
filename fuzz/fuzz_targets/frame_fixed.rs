//! A stream of frames whose body length, body checksum and header checksum the harness fixes
//! up, so that the fuzzer explores the header fields and bodies behind them (random bytes
//! never pass two CRC-32s: see `frame_decode`). Properties: no panic; each frame re-encodes to
//! its bytes, every shorter prefix of it is incomplete, and its body decodes as a request (no
//! `RESPONSE` flag) or a response that re-encodes to the same body.
#![no_main]

use libfuzzer_sys::fuzz_target;
use settlegate_protocol::frame::{self, crc32, BODY_LEN_MAX, FLAG_RESPONSE, HEADER_LEN};
use settlegate_protocol::messages::{Request, Response};

fuzz_target!(|data: &[u8]| {
    let mut buf = data.to_vec();
    let mut at = 0;
    while buf.len() - at >= HEADER_LEN {
        // The fuzzer's body length, kept when it is over the maximum (a `TooLarge` frame), else
        // brought within the bytes that follow; then both checksums over what is there.
        let declared = u32::from_be_bytes(buf[at + 16..at + 20].try_into().unwrap()) as usize;
        let available = buf.len() - at - HEADER_LEN;
        let len = if declared > BODY_LEN_MAX { declared } else { declared % (available + 1) };
        buf[at + 16..at + 20].copy_from_slice(&(len as u32).to_be_bytes());
        if len <= available {
            let body_crc = crc32(&buf[at + HEADER_LEN..at + HEADER_LEN + len]);
            buf[at + 20..at + 24].copy_from_slice(&body_crc.to_be_bytes());
        }
        let header_crc = crc32(&buf[at..at + 24]);
        buf[at + 24..at + 28].copy_from_slice(&header_crc.to_be_bytes());

        let rest = &buf[at..];
        let Ok(Some((frame, used))) = frame::decode_ref(rest) else { break };
        assert_eq!(used, HEADER_LEN + frame.body.len());
        assert_eq!(frame.to_owned().to_bytes(), &rest[..used]);
        assert_eq!(frame::decode_ref(&rest[..used - 1]), Ok(None));
        if frame.flags & FLAG_RESPONSE == 0 {
            if let Ok(request) = Request::decode(frame.opcode, frame.body) {
                assert_eq!(request.to_frame(frame.request_id).body, frame.body);
            }
        } else if let Ok(response) = Response::decode(frame.opcode, frame.status, frame.body) {
            assert_eq!(response.encode(), (frame.status, frame.body.to_vec()));
        }
        at += used;
    }
});
