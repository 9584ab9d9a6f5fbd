//! Codec tests: known bytes, every bound, and property round trips.

use proptest::prelude::*;

use super::*;

fn approval() -> Message {
    let mut message = Message::new(*b"0110").unwrap();
    message.set(11, *b"000042").unwrap();
    message.set(37, *b"123456789012").unwrap();
    message.set(38, *b"AB12CD").unwrap();
    message.set(39, *b"00").unwrap();
    message
}

fn frame_of(message: &Message) -> Vec<u8> {
    let mut out = Vec::new();
    encode(message, &mut out).unwrap();
    out
}

#[test]
fn known_bytes_primary_bitmap_only() {
    // Fields 11, 37, 38, 39: bits 11 (byte 1, 0x20), 37-39 (byte 4, 0x0e).
    let mut expected = b"0110".to_vec();
    expected.extend_from_slice(&[0x00, 0x20, 0x00, 0x00, 0x0e, 0x00, 0x00, 0x00]);
    expected.extend_from_slice(b"000042123456789012AB12CD00");
    let frame = frame_of(&approval());
    assert_eq!(&frame[..2], &(expected.len() as u16).to_be_bytes());
    assert_eq!(&frame[2..], &expected[..]);
    assert_eq!(decode(&frame[2..]).unwrap(), approval());
}

#[test]
fn secondary_bitmap_set_for_fields_over_64_and_llvar_prefixed() {
    let mut message = Message::new(*b"0800").unwrap();
    message.set(2, *b"4111111111111111").unwrap();
    message.set(70, *b"301").unwrap();
    let frame = frame_of(&message);
    let body = &frame[2..];
    assert_eq!(body[4], 0x80 | 0x40, "bit 1 (secondary) and bit 2 (PAN)");
    // Field 70: bit 6 of the secondary bitmap's first byte.
    assert_eq!(body[12], 0x04);
    assert_eq!(&body[20..38], b"164111111111111111");
    assert_eq!(&body[38..], b"301");
    assert_eq!(decode(body).unwrap(), message);
}

#[test]
fn length_header_bounds_refused_before_allocation() {
    assert_eq!(body_len([0, 11]), Err(CodecError::FrameLength { len: 11 }));
    assert_eq!(body_len([0, 12]), Ok(12));
    assert_eq!(body_len([0x20, 0x00]), Ok(MESSAGE_LEN_MAX));
    assert_eq!(body_len([0x20, 0x01]), Err(CodecError::FrameLength { len: MESSAGE_LEN_MAX + 1 }));
    assert_eq!(split_frame(&[0xff, 0xff, 0, 0]), Err(CodecError::FrameLength { len: 65_535 }));
    let frame = frame_of(&approval());
    assert_eq!(split_frame(&frame[..frame.len() - 1]), Ok(None), "partial frame waits");
    assert_eq!(split_frame(&frame[..1]), Ok(None));
    let (used, body) = split_frame(&frame).unwrap().unwrap();
    assert_eq!((used, body), (frame.len(), &frame[2..]));
}

#[test]
fn variable_lengths_are_bounded_by_the_field_and_the_frame() {
    let mut body = b"0100".to_vec();
    body.extend_from_slice(&[0x40, 0, 0, 0, 0, 0, 0, 0]);
    // Field 2 (max 19) announcing 20 digits.
    let mut over = body.clone();
    over.extend_from_slice(b"2041111111111111111111");
    assert_eq!(decode(&over), Err(CodecError::FieldLength { field: 2, len: 20, max: 19 }));
    // Announcing 16 with 4 present.
    let mut short = body.clone();
    short.extend_from_slice(b"164111");
    assert_eq!(decode(&short), Err(CodecError::Truncated { field: 2 }));
    let mut letters = body.clone();
    letters.extend_from_slice(b"1x4111");
    assert_eq!(decode(&letters), Err(CodecError::LengthDigits { field: 2 }));
}

#[test]
fn malformed_bodies_are_typed_errors() {
    let mut frame = frame_of(&approval());
    frame.push(b'9');
    assert_eq!(decode(&frame[2..]), Err(CodecError::TrailingBytes { count: 1 }));
    let mut bad_mti = frame_of(&approval());
    bad_mti[2] = b'X';
    assert_eq!(decode(&bad_mti[2..]), Err(CodecError::Mti));
    let mut control = frame_of(&approval());
    let last = control.len() - 1;
    control[last] = 0x07;
    assert_eq!(decode(&control[2..]), Err(CodecError::NotAscii { field: 39 }));
}

#[test]
fn set_checks_the_field_format() {
    let mut message = Message::new(*b"0100").unwrap();
    assert_eq!(message.set(1, *b"x"), Err(CodecError::FieldNumber { field: 1 }));
    assert_eq!(message.set(129, *b"x"), Err(CodecError::FieldNumber { field: 129 }));
    assert_eq!(message.set(39, *b"0"), Err(CodecError::FieldLength { field: 39, len: 1, max: 2 }));
    assert_eq!(message.set(39, *b"0\n"), Err(CodecError::NotAscii { field: 39 }));
    assert!(Message::new(*b"01A0").is_err());
}

#[test]
fn too_long_message_is_refused_and_output_left_untouched() {
    let mut message = Message::new(*b"0100").unwrap();
    for field in 105..=119 {
        message.set(field, vec![b'A'; 999]).unwrap();
    }
    let mut out = b"keep".to_vec();
    assert!(matches!(encode(&message, &mut out), Err(CodecError::TooLong { .. })));
    assert_eq!(out, b"keep");
}

#[test]
fn debug_masks_the_pan() {
    let mut message = approval();
    message.set(2, *b"4111111111111111").unwrap();
    let shown = format!("{message:?}");
    assert!(!shown.contains("4111111111111111"), "{shown}");
    assert!(shown.contains("redacted 16 bytes") && shown.contains("AB12CD"), "{shown}");
}

#[test]
fn field_table_matches_the_standard_where_the_adapter_relies_on_it() {
    let spec = |n| *field_spec(n).unwrap();
    assert_eq!((spec(2).kind, spec(2).len_max), (LenKind::LlVar, 19));
    for (field, len) in [(3, 6), (4, 12), (7, 10), (11, 6), (37, 12), (38, 6), (39, 2)] {
        assert_eq!((spec(field).kind, spec(field).len_max), (LenKind::Fixed, len), "{field}");
    }
    for (field, len) in [(41, 8), (42, 15), (49, 3), (70, 3), (90, 42)] {
        assert_eq!((spec(field).kind, spec(field).len_max), (LenKind::Fixed, len), "{field}");
    }
    assert!(field_spec(0).is_none() && field_spec(1).is_none() && field_spec(129).is_none());
}

fn value_for(number: u8) -> impl Strategy<Value = Vec<u8>> {
    let spec = *field_spec(number).unwrap();
    let len = match spec.kind {
        LenKind::Fixed => (spec.len_max as usize)..=(spec.len_max as usize),
        _ => 0..=(spec.len_max as usize).min(60),
    };
    match spec.encoding {
        Encoding::Ascii => proptest::collection::vec(0x20u8..=0x7e, len).boxed(),
        Encoding::Binary => proptest::collection::vec(any::<u8>(), len).boxed(),
    }
}

fn message_strategy() -> impl Strategy<Value = Message> {
    let mti = proptest::array::uniform4(b'0'..=b'9');
    let fields = proptest::collection::btree_set(2u8..=128, 0..12).prop_flat_map(|numbers| {
        numbers.into_iter().map(|n| value_for(n).prop_map(move |v| (n, v))).collect::<Vec<_>>()
    });
    (mti, fields).prop_map(|(mti, fields)| {
        let mut message = Message::new(mti).unwrap();
        for (number, value) in fields {
            message.set(number, value).unwrap();
        }
        message
    })
}

/// A secondary bitmap (bit 1) that announces no field decoded, and re-encoded without it: a
/// second encoding of the same message, refused since (issue #25's audit of the decoders).
#[test]
fn an_empty_secondary_bitmap_is_refused() {
    let mut body = b"0800".to_vec();
    body.extend_from_slice(&[0x80, 0, 0, 0, 0, 0, 0, 0]);
    body.extend_from_slice(&[0; 8]);
    assert_eq!(decode(&body), Err(CodecError::EmptySecondaryBitmap));
    // With a field behind it (70, network management), the same bitmap is the encoding.
    let mut message = Message::new(*b"0800").unwrap();
    message.set(70, *b"301").unwrap();
    let frame = frame_of(&message);
    assert_eq!(&frame[6..22], &[0x80, 0, 0, 0, 0, 0, 0, 0, 0x04, 0, 0, 0, 0, 0, 0, 0]);
    assert_eq!(decode(&frame[2..]).unwrap(), message);
}

proptest! {
    #[test]
    fn round_trip(message in message_strategy()) {
        let frame = frame_of(&message);
        let (used, body) = split_frame(&frame).unwrap().unwrap();
        prop_assert_eq!(used, frame.len());
        prop_assert_eq!(decode(body).unwrap(), message);
    }

    #[test]
    fn decode_never_panics(body in proptest::collection::vec(any::<u8>(), 0..300)) {
        let _ = decode(&body);
        let _ = split_frame(&body);
    }

    #[test]
    fn every_truncation_of_a_valid_body_is_an_error(message in message_strategy(), cut in 1usize..400) {
        let frame = frame_of(&message);
        let body = &frame[2..];
        let cut = cut.min(body.len());
        prop_assume!(cut < body.len() || cut == 0);
        prop_assert!(decode(&body[..body.len() - cut]).is_err());
    }
}
