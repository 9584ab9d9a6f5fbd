//! The ISO 8583 (1987) codec: pure bytes to messages and back, no I/O.
//!
//! Layout on the wire, as the host simulator's `pyiso8583` `default` spec has it:
//!
//! ```text
//! [len: u16 big-endian] [MTI: 4 ASCII digits] [primary bitmap: 8 bytes binary]
//! [secondary bitmap: 8 bytes binary, when bit 1 is set] [fields 2..=128 in order]
//! ```
//!
//! Each field is fixed length, LLVAR (two ASCII length digits) or LLLVAR (three), with ASCII or
//! binary content, per [`FIELD_SPECS`]. Every length read from the network is checked before
//! anything is allocated for it: the frame length against [`MESSAGE_LEN_MAX`], every variable
//! field length against its field's maximum and against the bytes left in the frame.
//!
//! A [`Message`] zeroizes its field values when dropped (field 2 holds the PAN) and its `Debug`
//! output never shows the value of a card-data field. [`CodecError`]s name fields and lengths,
//! never contents.

use std::collections::BTreeMap;
use std::fmt;

use zeroize::Zeroize;

/// Bytes in the length header that precedes every message.
pub const LENGTH_HEADER_LEN: usize = 2;
/// Largest message body accepted or produced (MTI, bitmaps and fields; the header excluded).
///
/// The 2-byte header could announce up to 65,535 bytes; the messages this adapter exchanges
/// are under 400 bytes, so a larger frame is refused before any buffer is sized for it.
pub const MESSAGE_LEN_MAX: usize = 8192;
/// Smallest well-formed message body: an MTI and a primary bitmap.
pub const MESSAGE_LEN_MIN: usize = MTI_LEN + BITMAP_LEN;
/// Highest field number (1987 edition, primary and secondary bitmaps).
pub const FIELD_MAX: u8 = 128;

const MTI_LEN: usize = 4;
const BITMAP_LEN: usize = 8;

const _: () = assert!(MESSAGE_LEN_MAX <= u16::MAX as usize, "length header is two bytes");
const _: () = assert!(MESSAGE_LEN_MIN < MESSAGE_LEN_MAX);

/// How a field's length is known.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LenKind {
    /// Always exactly the field's `len_max` bytes.
    Fixed,
    /// Two ASCII digits of length, then up to 99 bytes.
    LlVar,
    /// Three ASCII digits of length, then up to 999 bytes.
    LllVar,
}

/// How a field's content is represented.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encoding {
    /// Printable ASCII (0x20..=0x7E).
    Ascii,
    /// Raw bytes.
    Binary,
}

/// One data element's format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FieldSpec {
    /// Fixed or variable length.
    pub kind: LenKind,
    /// The fixed length, or the variable length's maximum, in bytes.
    pub len_max: u16,
    /// Content representation.
    pub encoding: Encoding,
    /// The ISO 8583 name, for logs.
    pub name: &'static str,
}

const fn f(kind: LenKind, len_max: u16, encoding: Encoding, name: &'static str) -> FieldSpec {
    FieldSpec { kind, len_max, encoding, name }
}

use Encoding::{Ascii, Binary};
use LenKind::{Fixed, LlVar, LllVar};

/// Formats of fields 0..=128, indexed by field number. Entries 0 and 1 (the MTI slot and the
/// secondary bitmap) are placeholders: the codec handles them itself. The table is the
/// `pyiso8583` 4.0.1 `iso8583.specs.default` spec field by field, so that the Python host
/// simulator and this codec agree.
pub const FIELD_SPECS: [FieldSpec; 129] = [
    f(Fixed, 4, Ascii, "Message Type Indicator"),        // 0
    f(Fixed, 8, Binary, "Bitmap, Secondary"),            // 1
    f(LlVar, 19, Ascii, "Primary Account Number (PAN)"), // 2
    f(Fixed, 6, Ascii, "Processing Code"),               // 3
    f(Fixed, 12, Ascii, "Amount, Transaction"),          // 4
    f(Fixed, 12, Ascii, "Amount, Settlement"),           // 5
    f(Fixed, 12, Ascii, "Amount, Cardholder Billing"),   // 6
    f(Fixed, 10, Ascii, "Transmission Date and Time"),   // 7
    f(Fixed, 8, Ascii, "Amount, Cardholder Billing Fee"), // 8
    f(Fixed, 8, Ascii, "Conversion Rate, Settlement"),   // 9
    f(Fixed, 8, Ascii, "Conversion Rate, Cardholder Billing"), // 10
    f(Fixed, 6, Ascii, "System Trace Audit Number"),     // 11
    f(Fixed, 6, Ascii, "Time, Local Transaction"),       // 12
    f(Fixed, 4, Ascii, "Date, Local Transaction"),       // 13
    f(Fixed, 4, Ascii, "Date, Expiration"),              // 14
    f(Fixed, 4, Ascii, "Date, Settlement"),              // 15
    f(Fixed, 4, Ascii, "Date, Conversion"),              // 16
    f(Fixed, 4, Ascii, "Date, Capture"),                 // 17
    f(Fixed, 4, Ascii, "Merchant Type"),                 // 18
    f(Fixed, 3, Ascii, "Acquiring Institution Country Code"), // 19
    f(Fixed, 3, Ascii, "PAN Country Code"),              // 20
    f(Fixed, 3, Ascii, "Forwarding Institution Country Code"), // 21
    f(Fixed, 3, Ascii, "Point-of-Service Entry Mode"),   // 22
    f(Fixed, 3, Ascii, "PAN Sequence Number"),           // 23
    f(Fixed, 3, Ascii, "Network International ID (NII)"), // 24
    f(Fixed, 2, Ascii, "Point-of-Service Condition Code"), // 25
    f(Fixed, 2, Ascii, "Point-of-Service Capture Code"), // 26
    f(Fixed, 1, Ascii, "Authorizing ID Response Length"), // 27
    f(Fixed, 9, Ascii, "Amount, Transaction Fee"),       // 28
    f(Fixed, 9, Ascii, "Amount, Settlement Fee"),        // 29
    f(Fixed, 9, Ascii, "Amount, Transaction Processing Fee"), // 30
    f(Fixed, 9, Ascii, "Amount, Settlement Processing Fee"), // 31
    f(LlVar, 11, Ascii, "Acquiring Institution ID Code"), // 32
    f(LlVar, 11, Ascii, "Forwarding Institution ID Code"), // 33
    f(LlVar, 28, Ascii, "Primary Account Number, Extended"), // 34
    f(LlVar, 37, Ascii, "Track 2 Data"),                 // 35
    f(LllVar, 104, Ascii, "Track 3 Data"),               // 36
    f(Fixed, 12, Ascii, "Retrieval Reference Number"),   // 37
    f(Fixed, 6, Ascii, "Authorization ID Response"),     // 38
    f(Fixed, 2, Ascii, "Response Code"),                 // 39
    f(Fixed, 3, Ascii, "Service Restriction Code"),      // 40
    f(Fixed, 8, Ascii, "Card Acceptor Terminal ID"),     // 41
    f(Fixed, 15, Ascii, "Card Acceptor ID Code"),        // 42
    f(Fixed, 40, Ascii, "Card Acceptor Name/Location"),  // 43
    f(LlVar, 25, Ascii, "Additional Response Data"),     // 44
    f(LlVar, 76, Ascii, "Track 1 Data"),                 // 45
    f(LllVar, 999, Ascii, "Additional Data - ISO"),      // 46
    f(LllVar, 999, Ascii, "Additional Data - National"), // 47
    f(LllVar, 999, Ascii, "Additional Data - Private"),  // 48
    f(Fixed, 3, Ascii, "Currency Code, Transaction"),    // 49
    f(Fixed, 3, Ascii, "Currency Code, Settlement"),     // 50
    f(Fixed, 3, Ascii, "Currency Code, Cardholder Billing"), // 51
    f(Fixed, 8, Binary, "PIN"),                          // 52
    f(Fixed, 16, Ascii, "Security-Related Control Information"), // 53
    f(LllVar, 240, Ascii, "Additional Amounts"),         // 54
    f(LllVar, 255, Binary, "ICC data"),                  // 55
    f(LllVar, 999, Ascii, "Reserved ISO"),               // 56
    f(LllVar, 999, Ascii, "Reserved National"),          // 57
    f(LllVar, 999, Ascii, "Reserved National"),          // 58
    f(LllVar, 999, Ascii, "Reserved National"),          // 59
    f(LllVar, 999, Ascii, "Reserved National"),          // 60
    f(LllVar, 999, Ascii, "Reserved Private"),           // 61
    f(LllVar, 999, Ascii, "Reserved Private"),           // 62
    f(LllVar, 999, Ascii, "Reserved Private"),           // 63
    f(Fixed, 8, Binary, "MAC"),                          // 64
    f(Fixed, 8, Binary, "Bitmap, Extended"),             // 65
    f(Fixed, 1, Ascii, "Settlement Code"),               // 66
    f(Fixed, 2, Ascii, "Extended Payment Code"),         // 67
    f(Fixed, 3, Ascii, "Receiving Institution Country Code"), // 68
    f(Fixed, 3, Ascii, "Settlement Institution Country Code"), // 69
    f(Fixed, 3, Ascii, "Network Management Information Code"), // 70
    f(Fixed, 4, Ascii, "Message Number"),                // 71
    f(Fixed, 4, Ascii, "Message Number, Last"),          // 72
    f(Fixed, 6, Ascii, "Date, Action"),                  // 73
    f(Fixed, 10, Ascii, "Credits, Number"),              // 74
    f(Fixed, 10, Ascii, "Credits, Reversal Number"),     // 75
    f(Fixed, 10, Ascii, "Debits, Number"),               // 76
    f(Fixed, 10, Ascii, "Debits, Reversal Number"),      // 77
    f(Fixed, 10, Ascii, "Transfer, Number"),             // 78
    f(Fixed, 10, Ascii, "Transfer, Reversal Number"),    // 79
    f(Fixed, 10, Ascii, "Inquiries, Number"),            // 80
    f(Fixed, 10, Ascii, "Authorizations, Number"),       // 81
    f(Fixed, 12, Ascii, "Credits, Processing Fee Amount"), // 82
    f(Fixed, 12, Ascii, "Credits, Transaction Fee Amount"), // 83
    f(Fixed, 12, Ascii, "Debits, Processing Fee Amount"), // 84
    f(Fixed, 12, Ascii, "Debits, Transaction Fee Amount"), // 85
    f(Fixed, 16, Ascii, "Credits, Amount"),              // 86
    f(Fixed, 16, Ascii, "Credits, Reversal Amount"),     // 87
    f(Fixed, 16, Ascii, "Debits, Amount"),               // 88
    f(Fixed, 16, Ascii, "Debits, Reversal Amount"),      // 89
    f(Fixed, 42, Ascii, "Original Data Elements"),       // 90
    f(Fixed, 1, Ascii, "File Update Code"),              // 91
    f(Fixed, 2, Ascii, "File Security Code"),            // 92
    f(Fixed, 5, Ascii, "Response Indicator"),            // 93
    f(Fixed, 7, Ascii, "Service Indicator"),             // 94
    f(Fixed, 42, Ascii, "Replacement Amounts"),          // 95
    f(Fixed, 8, Binary, "Message Security Code"),        // 96
    f(Fixed, 17, Ascii, "Amount, Net Settlement"),       // 97
    f(Fixed, 25, Ascii, "Payee"),                        // 98
    f(LlVar, 11, Ascii, "Settlement Institution ID Code"), // 99
    f(LlVar, 11, Ascii, "Receiving Institution ID Code"), // 100
    f(LlVar, 17, Ascii, "File Name"),                    // 101
    f(LlVar, 28, Ascii, "Account ID 1"),                 // 102
    f(LlVar, 28, Ascii, "Account ID 2"),                 // 103
    f(LllVar, 100, Ascii, "Transaction Description"),    // 104
    f(LllVar, 999, Ascii, "Reserved for ISO Use"),       // 105
    f(LllVar, 999, Ascii, "Reserved for ISO Use"),       // 106
    f(LllVar, 999, Ascii, "Reserved for ISO Use"),       // 107
    f(LllVar, 999, Ascii, "Reserved for ISO Use"),       // 108
    f(LllVar, 999, Ascii, "Reserved for ISO Use"),       // 109
    f(LllVar, 999, Ascii, "Reserved for ISO Use"),       // 110
    f(LllVar, 999, Ascii, "Reserved for ISO Use"),       // 111
    f(LllVar, 999, Ascii, "Reserved for National Use"),  // 112
    f(LllVar, 999, Ascii, "Reserved for National Use"),  // 113
    f(LllVar, 999, Ascii, "Reserved for National Use"),  // 114
    f(LllVar, 999, Ascii, "Reserved for National Use"),  // 115
    f(LllVar, 999, Ascii, "Reserved for National Use"),  // 116
    f(LllVar, 999, Ascii, "Reserved for National Use"),  // 117
    f(LllVar, 999, Ascii, "Reserved for National Use"),  // 118
    f(LllVar, 999, Ascii, "Reserved for National Use"),  // 119
    f(LllVar, 999, Ascii, "Reserved for Private Use"),   // 120
    f(LllVar, 999, Ascii, "Reserved for Private Use"),   // 121
    f(LllVar, 999, Ascii, "Reserved for Private Use"),   // 122
    f(LllVar, 999, Ascii, "Reserved for Private Use"),   // 123
    f(LllVar, 999, Ascii, "Reserved for Private Use"),   // 124
    f(LllVar, 999, Ascii, "Reserved for Private Use"),   // 125
    f(LllVar, 999, Ascii, "Reserved for Private Use"),   // 126
    f(LllVar, 999, Ascii, "Reserved for Private Use"),   // 127
    f(Fixed, 8, Binary, "MAC"),                          // 128
];

const _: () = {
    let mut n = 2;
    while n < FIELD_SPECS.len() {
        let spec = FIELD_SPECS[n];
        let cap = match spec.kind {
            LenKind::Fixed => 999,
            LenKind::LlVar => 99,
            LenKind::LllVar => 999,
        };
        assert!(spec.len_max > 0 && spec.len_max <= cap, "field length out of its kind's range");
        n += 1;
    }
};

/// Fields whose values are card data: masked in `Debug` output.
pub(crate) const SENSITIVE_FIELDS: [u8; 8] = [2, 14, 34, 35, 36, 45, 52, 55];

/// The format of field `number` (2..=128).
pub fn field_spec(number: u8) -> Option<&'static FieldSpec> {
    (2..=FIELD_MAX).contains(&number).then(|| &FIELD_SPECS[number as usize])
}

/// Why bytes are not a valid message, or a value does not fit its field. Names fields and
/// lengths only, never field contents.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum CodecError {
    /// The length header announces a body outside `MESSAGE_LEN_MIN..=MESSAGE_LEN_MAX`.
    #[error("message length {len} outside {MESSAGE_LEN_MIN}..={MESSAGE_LEN_MAX}")]
    FrameLength {
        /// The announced length.
        len: usize,
    },
    /// The MTI is not four ASCII digits.
    #[error("message type indicator is not four digits")]
    Mti,
    /// The message ends inside a bitmap or field.
    #[error("message truncated in field {field}")]
    Truncated {
        /// The field being read (1: secondary bitmap).
        field: u8,
    },
    /// A variable length prefix is not ASCII digits.
    #[error("field {field}: length prefix is not digits")]
    LengthDigits {
        /// The field.
        field: u8,
    },
    /// A field value is longer than its maximum (or not its fixed length).
    #[error("field {field}: length {len} does not fit (max {max})")]
    FieldLength {
        /// The field.
        field: u8,
        /// The length found.
        len: usize,
        /// The field's maximum or fixed length.
        max: u16,
    },
    /// An ASCII field holds a byte outside printable ASCII.
    #[error("field {field}: not printable ASCII")]
    NotAscii {
        /// The field.
        field: u8,
    },
    /// A field number outside 2..=128 (or a bitmap's bit 65 reached without bitmap 1).
    #[error("field {field} is not a data element")]
    FieldNumber {
        /// The field number.
        field: u8,
    },
    /// Bit 1 announces a secondary bitmap that announces no field: the encoder writes a
    /// secondary bitmap only for fields 65..=128, so such a message has another encoding.
    #[error("secondary bitmap announces no field")]
    EmptySecondaryBitmap,
    /// Bytes remain after the last field the bitmaps announce.
    #[error("{count} bytes after the last field")]
    TrailingBytes {
        /// How many.
        count: usize,
    },
    /// The encoded message would exceed [`MESSAGE_LEN_MAX`].
    #[error("encoded message of {len} bytes exceeds {MESSAGE_LEN_MAX}")]
    TooLong {
        /// The would-be length.
        len: usize,
    },
}

/// One ISO 8583 message: an MTI and data elements 2..=128.
#[derive(Clone, PartialEq, Eq)]
pub struct Message {
    mti: [u8; 4],
    fields: BTreeMap<u8, Vec<u8>>,
}

impl Message {
    /// An empty message of type `mti` (four ASCII digits, e.g. `b"0100"`).
    pub fn new(mti: [u8; 4]) -> Result<Message, CodecError> {
        if !mti.iter().all(u8::is_ascii_digit) {
            return Err(CodecError::Mti);
        }
        Ok(Message { mti, fields: BTreeMap::new() })
    }

    /// The message type indicator.
    pub fn mti(&self) -> [u8; 4] {
        self.mti
    }

    /// The MTI as text.
    pub fn mti_str(&self) -> &str {
        // Invariant: four ASCII digits (checked in `new` and `decode`).
        std::str::from_utf8(&self.mti).unwrap_or("????")
    }

    /// Sets field `number`, checking the value against the field's format.
    pub fn set(&mut self, number: u8, value: impl Into<Vec<u8>>) -> Result<(), CodecError> {
        let value = value.into();
        let spec = field_spec(number).ok_or(CodecError::FieldNumber { field: number })?;
        check_value(number, spec, &value)?;
        if let Some(mut old) = self.fields.insert(number, value) {
            old.zeroize();
        }
        Ok(())
    }

    /// Field `number`'s value, if present.
    pub fn get(&self, number: u8) -> Option<&[u8]> {
        self.fields.get(&number).map(Vec::as_slice)
    }

    /// Field `number` as text, if present and ASCII.
    pub fn get_str(&self, number: u8) -> Option<&str> {
        self.get(number).and_then(|v| std::str::from_utf8(v).ok())
    }

    /// The numbers of the fields present, ascending.
    pub fn field_numbers(&self) -> impl Iterator<Item = u8> + '_ {
        self.fields.keys().copied()
    }

    /// Whether any field of the secondary bitmap (65..=128) is present.
    fn has_secondary(&self) -> bool {
        self.fields.keys().next_back().is_some_and(|&n| n > 64)
    }
}

impl Drop for Message {
    fn drop(&mut self) {
        for value in self.fields.values_mut() {
            value.zeroize();
        }
    }
}

impl fmt::Debug for Message {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut map = f.debug_map();
        map.entry(&"mti", &self.mti_str());
        for (&number, value) in &self.fields {
            let ascii = field_spec(number).is_some_and(|s| s.encoding == Encoding::Ascii);
            if SENSITIVE_FIELDS.contains(&number) {
                map.entry(&number, &format_args!("<redacted {} bytes>", value.len()));
            } else if ascii {
                map.entry(&number, &String::from_utf8_lossy(value));
            } else {
                map.entry(&number, &format_args!("<{} bytes>", value.len()));
            }
        }
        map.finish()
    }
}

fn check_value(number: u8, spec: &FieldSpec, value: &[u8]) -> Result<(), CodecError> {
    let len_ok = match spec.kind {
        LenKind::Fixed => value.len() == spec.len_max as usize,
        LenKind::LlVar | LenKind::LllVar => value.len() <= spec.len_max as usize,
    };
    if !len_ok {
        return Err(CodecError::FieldLength { field: number, len: value.len(), max: spec.len_max });
    }
    if spec.encoding == Encoding::Ascii && !value.iter().all(|b| (0x20..=0x7e).contains(b)) {
        return Err(CodecError::NotAscii { field: number });
    }
    Ok(())
}

/// Appends `message` to `out` as one frame: the 2-byte length header, then the body.
///
/// On error `out` is left as it was.
pub fn encode(message: &Message, out: &mut Vec<u8>) -> Result<(), CodecError> {
    let start = out.len();
    out.extend_from_slice(&[0, 0]);
    out.extend_from_slice(&message.mti);
    let mut bitmap = [0u8; 16];
    if message.has_secondary() {
        bitmap[0] |= 0x80;
    }
    for &number in message.fields.keys() {
        let bit = usize::from(number) - 1;
        bitmap[bit / 8] |= 0x80 >> (bit % 8);
    }
    let bitmap_len = if message.has_secondary() { 16 } else { 8 };
    out.extend_from_slice(&bitmap[..bitmap_len]);
    for (&number, value) in &message.fields {
        let spec = &FIELD_SPECS[usize::from(number)];
        match spec.kind {
            LenKind::Fixed => {}
            LenKind::LlVar => out.extend_from_slice(format!("{:02}", value.len()).as_bytes()),
            LenKind::LllVar => out.extend_from_slice(format!("{:03}", value.len()).as_bytes()),
        }
        out.extend_from_slice(value);
    }
    let len = out.len() - start - LENGTH_HEADER_LEN;
    if len > MESSAGE_LEN_MAX {
        out[start..].zeroize();
        out.truncate(start);
        return Err(CodecError::TooLong { len });
    }
    // Invariant: len <= MESSAGE_LEN_MAX <= u16::MAX (asserted at compile time).
    out[start..start + LENGTH_HEADER_LEN].copy_from_slice(&(len as u16).to_be_bytes());
    Ok(())
}

/// Reads a frame's body length from its header, refusing one outside the accepted bounds
/// before anything is allocated for it.
pub fn body_len(header: [u8; LENGTH_HEADER_LEN]) -> Result<usize, CodecError> {
    let len = usize::from(u16::from_be_bytes(header));
    if !(MESSAGE_LEN_MIN..=MESSAGE_LEN_MAX).contains(&len) {
        return Err(CodecError::FrameLength { len });
    }
    Ok(len)
}

/// Finds the first complete frame in `buf`: `Ok(None)` while it is partial, otherwise the
/// bytes it occupies (header included) and its body. A bad length header is an error: the
/// stream cannot be re-synchronized after it.
pub fn split_frame(buf: &[u8]) -> Result<Option<(usize, &[u8])>, CodecError> {
    let Some(header) = buf.get(..LENGTH_HEADER_LEN) else {
        return Ok(None);
    };
    let len = body_len([header[0], header[1]])?;
    let end = LENGTH_HEADER_LEN + len;
    Ok(buf.get(LENGTH_HEADER_LEN..end).map(|body| (end, body)))
}

/// Decodes one message body (the bytes after the length header).
pub fn decode(body: &[u8]) -> Result<Message, CodecError> {
    if !(MESSAGE_LEN_MIN..=MESSAGE_LEN_MAX).contains(&body.len()) {
        return Err(CodecError::FrameLength { len: body.len() });
    }
    let mut reader = Reader { body, at: 0 };
    let mti: [u8; 4] = reader.take(0, MTI_LEN)?.try_into().map_err(|_| CodecError::Mti)?;
    let mut message = Message::new(mti)?;
    let mut bitmap = [0u8; 16];
    bitmap[..8].copy_from_slice(reader.take(0, BITMAP_LEN)?);
    let bits = if bitmap[0] & 0x80 != 0 {
        bitmap[8..].copy_from_slice(reader.take(1, BITMAP_LEN)?);
        if bitmap[8..] == [0; BITMAP_LEN] {
            return Err(CodecError::EmptySecondaryBitmap);
        }
        128
    } else {
        64
    };
    for bit in 1..bits {
        if bitmap[bit / 8] & (0x80 >> (bit % 8)) == 0 {
            continue;
        }
        // Invariant: bit < 128, so the field number fits a u8.
        let number = (bit + 1) as u8;
        let spec = &FIELD_SPECS[bit + 1];
        let len = match spec.kind {
            LenKind::Fixed => usize::from(spec.len_max),
            LenKind::LlVar => reader.length(number, 2)?,
            LenKind::LllVar => reader.length(number, 3)?,
        };
        if len > usize::from(spec.len_max) {
            return Err(CodecError::FieldLength { field: number, len, max: spec.len_max });
        }
        let value = reader.take(number, len)?;
        check_value(number, spec, value)?;
        message.fields.insert(number, value.to_vec());
    }
    let count = body.len() - reader.at;
    if count != 0 {
        return Err(CodecError::TrailingBytes { count });
    }
    Ok(message)
}

struct Reader<'a> {
    body: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, field: u8, len: usize) -> Result<&'a [u8], CodecError> {
        let end = self.at.checked_add(len).ok_or(CodecError::Truncated { field })?;
        let bytes = self.body.get(self.at..end).ok_or(CodecError::Truncated { field })?;
        self.at = end;
        Ok(bytes)
    }

    fn length(&mut self, field: u8, digits: usize) -> Result<usize, CodecError> {
        let bytes = self.take(field, digits)?;
        if !bytes.iter().all(u8::is_ascii_digit) {
            return Err(CodecError::LengthDigits { field });
        }
        Ok(bytes.iter().fold(0usize, |acc, b| acc * 10 + usize::from(b - b'0')))
    }
}

#[cfg(test)]
mod tests;
