//! Frames: the fixed 28-byte header and the body. Pure: bytes in, frames out, no I/O.
//!
//! Validation follows the order of `docs/PROTOCOL.md` section 2: header checksum, magic,
//! version, flags and the body length against the maximum are all checked as soon as the
//! header is in, before any body byte is waited for or allocated; the body checksum last.

/// Header length.
pub const HEADER_LEN: usize = 28;
/// `SG`.
pub const MAGIC: [u8; 2] = *b"SG";
/// Protocol version.
pub const VERSION: u8 = 1;
/// Largest body accepted or sent.
pub const BODY_LEN_MAX: usize = 65_536;
/// Flag: the frame comes from the server.
pub const FLAG_RESPONSE: u8 = 0x01;
/// Flag: a server-initiated notice.
pub const FLAG_PUSH: u8 = 0x02;
const FLAGS_KNOWN: u8 = FLAG_RESPONSE | FLAG_PUSH;

const _: () = assert!(BODY_LEN_MAX <= u32::MAX as usize);

/// A frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    /// Flag bits.
    pub flags: u8,
    /// Operation code.
    pub opcode: u16,
    /// Status (0 in requests).
    pub status: u16,
    /// Client-chosen request ID, echoed in responses.
    pub request_id: u64,
    /// The body.
    pub body: Vec<u8>,
}

/// Why bytes are not a frame. The numeric values are the protocol's frame error kinds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[repr(u16)]
pub enum FrameError {
    /// Magic is not `SG`.
    #[error("bad magic")]
    BadMagic = 1,
    /// Version other than 1.
    #[error("unsupported version")]
    Version = 2,
    /// Header checksum mismatch.
    #[error("header checksum mismatch")]
    HeaderChecksum = 3,
    /// Body length over the maximum.
    #[error("body too large")]
    TooLarge = 4,
    /// Body checksum mismatch.
    #[error("body checksum mismatch")]
    BodyChecksum = 5,
    /// A started frame was not completed in time.
    #[error("frame read timeout")]
    ReadTimeout = 6,
    /// Reserved flag bits set.
    #[error("reserved flag bits set")]
    ReservedFlags = 7,
}

impl FrameError {
    /// From the wire value.
    pub fn from_code(code: u16) -> Option<FrameError> {
        Some(match code {
            1 => FrameError::BadMagic,
            2 => FrameError::Version,
            3 => FrameError::HeaderChecksum,
            4 => FrameError::TooLarge,
            5 => FrameError::BodyChecksum,
            6 => FrameError::ReadTimeout,
            7 => FrameError::ReservedFlags,
            _ => return None,
        })
    }
}

/// CRC-32 (zlib's `crc32`).
pub fn crc32(bytes: &[u8]) -> u32 {
    crc32fast::hash(bytes)
}

impl Frame {
    /// A request frame.
    pub fn request(opcode: u16, request_id: u64, body: Vec<u8>) -> Frame {
        Frame { flags: 0, opcode, status: 0, request_id, body }
    }

    /// Appends the encoded frame to `out`.
    ///
    /// # Panics
    /// If the body is longer than [`BODY_LEN_MAX`]. This is for frames built by hand (tests,
    /// tools); the server encodes its replies with `Response::encode_frame`, which answers
    /// `INTERNAL` instead.
    pub fn encode(&self, out: &mut Vec<u8>) {
        let head = Head { flags: self.flags, opcode: self.opcode, status: self.status };
        encode_with(out, head, self.request_id, |out| out.extend_from_slice(&self.body))
            .expect("a hand-built frame's body over the maximum");
    }

    /// The encoded frame.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(HEADER_LEN + self.body.len());
        self.encode(&mut out);
        out
    }
}

/// A frame's header fields other than its request ID and lengths.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Head {
    /// Flag bits.
    pub flags: u8,
    /// Operation code.
    pub opcode: u16,
    /// Status (0 in requests).
    pub status: u16,
}

/// A frame body longer than [`BODY_LEN_MAX`]: nothing was encoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("a frame body of {0} bytes is over the maximum of {BODY_LEN_MAX}")]
pub struct BodyTooLarge(pub usize);

/// Appends a frame to `out` whose body `body` writes straight after the header: no body is
/// built apart and copied. The header's lengths and checksums are filled in after. A body
/// longer than [`BODY_LEN_MAX`] is taken back out of `out`, which is left as it was, and is
/// an error: never a frame the peer would refuse, never a panic.
pub fn encode_with(
    out: &mut Vec<u8>,
    head: Head,
    request_id: u64,
    body: impl FnOnce(&mut Vec<u8>),
) -> Result<(), BodyTooLarge> {
    let start = out.len();
    out.extend_from_slice(&MAGIC);
    out.push(VERSION);
    out.push(head.flags);
    out.extend_from_slice(&head.opcode.to_be_bytes());
    out.extend_from_slice(&head.status.to_be_bytes());
    out.extend_from_slice(&request_id.to_be_bytes());
    out.extend_from_slice(&[0; 12]); // body length, body CRC, header CRC
    body(out);
    let body_len = out.len() - start - HEADER_LEN;
    if body_len > BODY_LEN_MAX {
        out.truncate(start);
        return Err(BodyTooLarge(body_len));
    }
    let body_crc = crc32(&out[start + HEADER_LEN..]);
    let header = &mut out[start..start + HEADER_LEN];
    header[16..20].copy_from_slice(&(body_len as u32).to_be_bytes());
    header[20..24].copy_from_slice(&body_crc.to_be_bytes());
    let header_crc = crc32(&header[..24]);
    header[24..28].copy_from_slice(&header_crc.to_be_bytes());
    Ok(())
}

/// Checks a complete header and returns the body length it announces.
pub fn check_header(header: &[u8; HEADER_LEN]) -> Result<usize, FrameError> {
    let be32 = |at: usize| u32::from_be_bytes(header[at..at + 4].try_into().expect("4"));
    if crc32(&header[..24]) != be32(24) {
        return Err(FrameError::HeaderChecksum);
    }
    if header[0..2] != MAGIC {
        return Err(FrameError::BadMagic);
    }
    if header[2] != VERSION {
        return Err(FrameError::Version);
    }
    if header[3] & !FLAGS_KNOWN != 0 {
        return Err(FrameError::ReservedFlags);
    }
    let body_len = be32(16) as usize;
    if body_len > BODY_LEN_MAX {
        return Err(FrameError::TooLarge);
    }
    Ok(body_len)
}

/// A decoded frame whose body is still in the buffer it was read from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameRef<'a> {
    /// Flag bits.
    pub flags: u8,
    /// Operation code.
    pub opcode: u16,
    /// Status (0 in requests).
    pub status: u16,
    /// Client-chosen request ID, echoed in responses.
    pub request_id: u64,
    /// The body.
    pub body: &'a [u8],
}

impl FrameRef<'_> {
    /// An owned copy.
    pub fn to_owned(&self) -> Frame {
        Frame {
            flags: self.flags,
            opcode: self.opcode,
            status: self.status,
            request_id: self.request_id,
            body: self.body.to_vec(),
        }
    }
}

/// Decodes the frame at the front of `buf`: `Ok(None)` while it is incomplete, else the frame
/// and the bytes it used. The header is validated as soon as it is complete.
pub fn decode(buf: &[u8]) -> Result<Option<(Frame, usize)>, FrameError> {
    Ok(decode_ref(buf)?.map(|(frame, used)| (frame.to_owned(), used)))
}

/// [`decode`] without copying the body out of `buf`.
pub fn decode_ref(buf: &[u8]) -> Result<Option<(FrameRef<'_>, usize)>, FrameError> {
    let Some(header) = buf.get(..HEADER_LEN) else { return Ok(None) };
    let header: &[u8; HEADER_LEN] = header.try_into().expect("header length");
    let body_len = check_header(header)?;
    let Some(body) = buf.get(HEADER_LEN..HEADER_LEN + body_len) else { return Ok(None) };
    let be32 = |at: usize| u32::from_be_bytes(header[at..at + 4].try_into().expect("4"));
    if crc32(body) != be32(20) {
        return Err(FrameError::BodyChecksum);
    }
    let frame = FrameRef {
        flags: header[3],
        opcode: u16::from_be_bytes([header[4], header[5]]),
        status: u16::from_be_bytes([header[6], header[7]]),
        request_id: u64::from_be_bytes(header[8..16].try_into().expect("8")),
        body,
    };
    Ok(Some((frame, HEADER_LEN + body_len)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Frame {
        Frame::request(0x0002, 7, b"hi".to_vec())
    }

    #[test]
    fn crc_check_value() {
        assert_eq!(crc32(b"123456789"), 0xCBF4_3926);
    }

    #[test]
    fn round_trip_and_partial() {
        let bytes = sample().to_bytes();
        for len in 0..bytes.len() {
            assert_eq!(decode(&bytes[..len]), Ok(None), "prefix {len} is incomplete");
        }
        let (frame, used) = decode(&bytes).unwrap().unwrap();
        assert_eq!((frame, used), (sample(), bytes.len()));
    }

    #[test]
    fn corruptions_are_typed() {
        let bytes = sample().to_bytes();
        let mut bad = bytes.clone();
        bad[0] = b'X';
        assert_eq!(decode(&bad), Err(FrameError::HeaderChecksum));
        let mut bad = bytes.clone();
        *bad.last_mut().unwrap() ^= 1;
        assert_eq!(decode(&bad), Err(FrameError::BodyChecksum));
        // A header announcing a huge body is refused before the body arrives.
        let mut huge = Frame::request(2, 1, Vec::new()).to_bytes();
        huge[16..20].copy_from_slice(&(BODY_LEN_MAX as u32 + 1).to_be_bytes());
        let crc = crc32(&huge[..24]);
        huge[24..28].copy_from_slice(&crc.to_be_bytes());
        assert_eq!(decode(&huge), Err(FrameError::TooLarge));
    }
}
