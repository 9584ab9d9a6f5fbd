//! Property tests: arbitrary bytes never panic a decoder, and what decodes re-encodes.

use proptest::prelude::*;
use settlegate_engine::inherent::{peek_terminal_id, InherentId};
use settlegate_engine::AgeRecord;
use settlegate_protocol::frame::{self, Frame};
use settlegate_protocol::messages::{Request, Response};

proptest! {
    #![proptest_config(ProptestConfig { cases: 4096, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn random_bytes_never_panic_the_frame_decoder(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        if let Ok(Some((frame, used))) = frame::decode(&bytes) {
            prop_assert_eq!(frame.to_bytes(), bytes[..used].to_vec());
        }
    }

    #[test]
    fn random_bodies_never_panic_the_message_decoders(
        opcode in prop_oneof![0u16..0x68, any::<u16>()],
        status in prop_oneof![0u16..20, any::<u16>()],
        body in prop::collection::vec(any::<u8>(), 0..300),
    ) {
        if let Ok(request) = Request::decode(opcode, &body) {
            prop_assert_eq!(request.to_frame(1).body, body.clone());
        }
        let _ = Response::decode(opcode, status, &body);
    }

    #[test]
    fn valid_frames_with_random_bodies_decode_as_framed(
        opcode in 0u16..0x68,
        request_id in any::<u64>(),
        body in prop::collection::vec(any::<u8>(), 0..300),
    ) {
        let bytes = Frame::request(opcode, request_id, body.clone()).to_bytes();
        let (frame, used) = frame::decode(&bytes).unwrap().unwrap();
        prop_assert_eq!(used, bytes.len());
        prop_assert_eq!(frame.body, body.clone());
        let _ = Request::decode(opcode, &body);
    }

    #[test]
    fn random_bytes_never_panic_the_inherent_id_decoder(bytes in prop::collection::vec(any::<u8>(), 0..200)) {
        let peeked = peek_terminal_id(&bytes);
        if let Ok((record, _, _)) = InherentId::decode(&bytes) {
            prop_assert_eq!(peeked, Some(record.terminal_id.as_str()));
        }
    }

    #[test]
    fn random_bytes_never_panic_the_age_record_decoder(bytes in prop::collection::vec(any::<u8>(), 0..200)) {
        if let Ok((record, body, tag)) = AgeRecord::decode(&bytes) {
            let mut again = Vec::new();
            record.encode_body(&mut again);
            prop_assert_eq!(again.as_slice(), body);
            prop_assert_eq!(body.len() + tag.len(), bytes.len());
        }
    }
}

#[test]
fn basket_item_counts_are_bounded_before_allocation() {
    use settlegate_protocol::messages::opcode::AUTHORIZE_BASKET;
    let body = |count: u16| {
        let mut body = vec![0u8; 16]; // client request ID
        body.extend_from_slice(&[0, 0]); // empty inherent ID (bytes16)
        body.push(1); // flags: age confirmation
        body.extend_from_slice(&count.to_be_bytes());
        body
    };
    for count in [0u16, 257, u16::MAX] {
        let error = Request::decode(AUTHORIZE_BASKET, &body(count)).unwrap_err();
        assert!(error.to_string().contains("item_count"), "{error}");
    }
    let mut flags = body(1);
    flags[18] = 2;
    assert!(Request::decode(AUTHORIZE_BASKET, &flags).unwrap_err().to_string().contains("flags"));
}
