//! The inherent ID: the signed binary record a user terminal builds for a settlement (G3).
//!
//! Layout (all integers big-endian; the same layout is specified in `docs/PROTOCOL.md`):
//!
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 1 | format version, `1` |
//! | 1 | 2 | device key version |
//! | 3 | 8 | amount, minor units |
//! | 11 | 3 | currency, ISO 4217 alphabetic (ASCII) |
//! | 14 | 1 | settlement means kind (1 card, 2 e-money, 3 QR, 4 bank account) |
//! | 15 | 4 | means ID (`0` = the user's default means) |
//! | 19 | 4 | provider designation code |
//! | 23 | 8 | card IDm (names the device and its key) |
//! | 31 | 1 | user-ID type (1 mail, 2 inherent number) |
//! | 32 | 1 | user-ID length `L`, 1..=64 |
//! | 33 | L | user ID, UTF-8 |
//! | 33+L | 1 | store-terminal ID length `T`, 1..=16 |
//! | 34+L | T | store-terminal ID, printable ASCII |
//! | 34+L+T | 8 | device counter (strictly new per record; a nonce) |
//! | 42+L+T | 8 | timestamp, milliseconds since the UNIX epoch (signed) |
//! | 50+L+T | 32 | HMAC-SHA256 by the device key over every byte before it |
//!
//! There is no password in the record: the keyed hash of the enrolled device authenticates
//! the user, and the password is checked only at enrollment and login.

use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::limits::{AMOUNT_MINOR_MAX, TERMINAL_ID_LEN_MAX, USER_ID_LEN_MAX};
use crate::types::{terminal_id_valid, Currency, Idm, MeansKind, UserIdType, UserKey};

/// The record format version this engine writes and accepts.
pub const FORMAT_VERSION: u8 = 1;
/// Length of the HMAC-SHA256 tag.
pub const TAG_LEN: usize = 32;
/// Fixed bytes of a record besides the user ID and terminal ID.
const FIXED_LEN: usize = 50 + TAG_LEN;
/// Shortest possible record.
pub const RECORD_LEN_MIN: usize = FIXED_LEN + 2;
/// Longest possible record.
pub const RECORD_LEN_MAX: usize = FIXED_LEN + USER_ID_LEN_MAX + TERMINAL_ID_LEN_MAX;

/// The fields of an inherent ID.
#[derive(Debug, Clone, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct InherentId {
    /// Version of the device key that signs it.
    pub key_version: u16,
    /// Amount in minor units, 1..=10^15.
    pub amount_minor: u64,
    /// Currency.
    #[rkyv(with = crate::shard::archive::Via<[u8; 3]>)]
    pub currency: Currency,
    /// Settlement means kind.
    #[rkyv(with = crate::shard::archive::Via<u8>)]
    pub means: MeansKind,
    /// Which of the user's means (`0` = default).
    pub means_id: u32,
    /// Provider designation code.
    pub provider_code: u32,
    /// Card IDm of the signing device.
    pub card_idm: Idm,
    /// The paying user.
    #[rkyv(with = crate::shard::archive::UserKeyVia)]
    pub user: UserKey,
    /// The store terminal.
    pub terminal_id: String,
    /// Device counter.
    pub counter: u64,
    /// Creation time, ms since the UNIX epoch.
    pub timestamp_ms: i64,
}

/// A device key prepared for signing: its HMAC state after the key's two blocks, so a
/// signature costs only the record's own blocks (the server keeps its verifying keys the same
/// way).
#[derive(Clone)]
pub struct SigningKey(Hmac<Sha256>);

impl SigningKey {
    /// Prepares `device_key`.
    pub fn new(device_key: &[u8; 32]) -> SigningKey {
        SigningKey(Hmac::new_from_slice(device_key).expect("HMAC takes any key"))
    }
}

impl std::fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SigningKey(..)")
    }
}

/// Why bytes are not an inherent ID.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum RecordError {
    /// Shorter or longer than any valid record, or lengths disagree.
    #[error("record length invalid")]
    Length,
    /// Format version not supported.
    #[error("unsupported record version")]
    Version,
    /// A field value is out of its domain.
    #[error("invalid field: {0}")]
    Field(&'static str),
}

impl InherentId {
    /// Appends the unsigned body (everything before the tag).
    pub fn encode_body(&self, out: &mut Vec<u8>) {
        out.push(FORMAT_VERSION);
        out.extend_from_slice(&self.key_version.to_be_bytes());
        out.extend_from_slice(&self.amount_minor.to_be_bytes());
        out.extend_from_slice(&self.currency.bytes());
        out.push(self.means as u8);
        out.extend_from_slice(&self.means_id.to_be_bytes());
        out.extend_from_slice(&self.provider_code.to_be_bytes());
        out.extend_from_slice(&self.card_idm);
        out.push(self.user.id_type() as u8);
        out.push(self.user.id().len() as u8);
        out.extend_from_slice(self.user.id().as_bytes());
        out.push(self.terminal_id.len() as u8);
        out.extend_from_slice(self.terminal_id.as_bytes());
        out.extend_from_slice(&self.counter.to_be_bytes());
        out.extend_from_slice(&self.timestamp_ms.to_be_bytes());
    }

    /// Encodes and signs with `device_key`: what a user terminal sends.
    pub fn sign(&self, device_key: &[u8; 32]) -> Vec<u8> {
        self.sign_with(&SigningKey::new(device_key))
    }

    /// Encodes and signs with a device key prepared once ([`SigningKey`]): what a terminal
    /// that signs many records does.
    pub fn sign_with(&self, key: &SigningKey) -> Vec<u8> {
        let mut out = Vec::with_capacity(RECORD_LEN_MAX);
        self.encode_body(&mut out);
        let mut mac = key.0.clone();
        mac.update(&out);
        out.extend_from_slice(&mac.finalize().into_bytes());
        out
    }

    /// Decodes a signed record, returning the fields and the split of body and tag.
    /// Validates every length before reading; never allocates more than the record holds.
    pub fn decode(bytes: &[u8]) -> Result<(InherentId, &[u8], &[u8; TAG_LEN]), RecordError> {
        if bytes.len() < RECORD_LEN_MIN || bytes.len() > RECORD_LEN_MAX {
            return Err(RecordError::Length);
        }
        let (body, tag) = bytes.split_at(bytes.len() - TAG_LEN);
        let tag: &[u8; TAG_LEN] = tag.try_into().expect("split at TAG_LEN");
        if body[0] != FORMAT_VERSION {
            return Err(RecordError::Version);
        }
        let be_u64 = |at: usize| u64::from_be_bytes(body[at..at + 8].try_into().expect("8"));
        let be_u32 = |at: usize| u32::from_be_bytes(body[at..at + 4].try_into().expect("4"));
        let key_version = u16::from_be_bytes([body[1], body[2]]);
        let amount_minor = be_u64(3);
        if amount_minor == 0 || amount_minor > AMOUNT_MINOR_MAX {
            return Err(RecordError::Field("amount"));
        }
        let currency = Currency::from_bytes([body[11], body[12], body[13]])
            .map_err(|_| RecordError::Field("currency"))?;
        let means = MeansKind::from_u8(body[14]).ok_or(RecordError::Field("means"))?;
        let means_id = be_u32(15);
        let provider_code = be_u32(19);
        let card_idm: Idm = body[23..31].try_into().expect("8");
        let id_type = UserIdType::from_u8(body[31]).ok_or(RecordError::Field("user_id_type"))?;
        let user_len = body[32] as usize;
        // body = 33 + L + 1 + T + 16 bytes.
        if user_len == 0 || user_len > USER_ID_LEN_MAX || body.len() < 33 + user_len + 1 + 16 {
            return Err(RecordError::Length);
        }
        let user_id = std::str::from_utf8(&body[33..33 + user_len])
            .map_err(|_| RecordError::Field("user_id"))?;
        let user = UserKey::new(id_type, user_id).map_err(|_| RecordError::Field("user_id"))?;
        let term_at = 33 + user_len;
        let term_len = body[term_at] as usize;
        if body.len() != term_at + 1 + term_len + 16 {
            return Err(RecordError::Length);
        }
        let terminal_id = std::str::from_utf8(&body[term_at + 1..term_at + 1 + term_len])
            .map_err(|_| RecordError::Field("terminal_id"))?;
        if !terminal_id_valid(terminal_id) {
            return Err(RecordError::Field("terminal_id"));
        }
        let tail = term_at + 1 + term_len;
        let record = InherentId {
            key_version,
            amount_minor,
            currency,
            means,
            means_id,
            provider_code,
            card_idm,
            user,
            terminal_id: terminal_id.to_owned(),
            counter: be_u64(tail),
            timestamp_ms: be_u64(tail + 8) as i64,
        };
        Ok((record, body, tag))
    }
}

/// The store-terminal ID of a record, read without decoding or allocating the rest; `None`
/// when the bytes are too short or the ID is not valid. Lets a server check which terminal a
/// request acts for before the engine verifies it.
pub fn peek_terminal_id(bytes: &[u8]) -> Option<&str> {
    let user_len = *bytes.get(32)? as usize;
    let term_len = *bytes.get(33 + user_len)? as usize;
    let start = 34 + user_len;
    let terminal = std::str::from_utf8(bytes.get(start..start + term_len)?).ok()?;
    terminal_id_valid(terminal).then_some(terminal)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> InherentId {
        InherentId {
            key_version: 1,
            amount_minor: 1_000,
            currency: Currency::try_from("JPY").unwrap(),
            means: MeansKind::CreditCard,
            means_id: 0,
            provider_code: 42,
            card_idm: [1, 2, 3, 4, 5, 6, 7, 8],
            user: UserKey::new(UserIdType::Mail, "a@example.com").unwrap(),
            terminal_id: "TERM-0001".into(),
            counter: 7,
            timestamp_ms: 1_700_000_000_000,
        }
    }

    #[test]
    fn round_trip() {
        let record = sample();
        let bytes = record.sign(&[9; 32]);
        let (decoded, body, tag) = InherentId::decode(&bytes).unwrap();
        assert_eq!(decoded, record);
        assert_eq!(body.len() + TAG_LEN, bytes.len());
        assert_eq!(&bytes[bytes.len() - TAG_LEN..], tag);
    }

    #[test]
    fn every_truncation_is_rejected() {
        let bytes = sample().sign(&[9; 32]);
        for len in 0..bytes.len() {
            assert!(InherentId::decode(&bytes[..len]).is_err(), "len {len}");
        }
    }

    #[test]
    fn peek_finds_the_terminal() {
        let bytes = sample().sign(&[9; 32]);
        assert_eq!(peek_terminal_id(&bytes), Some("TERM-0001"));
        assert_eq!(peek_terminal_id(&bytes[..40]), None);
    }

    #[test]
    fn zero_amount_rejected() {
        let mut record = sample();
        record.amount_minor = 0;
        let bytes = record.sign(&[9; 32]);
        assert_eq!(InherentId::decode(&bytes).unwrap_err(), RecordError::Field("amount"));
    }

    /// A prepared key signs as the raw key does, every time it is used, and its tag is the
    /// HMAC-SHA256 of the body.
    #[test]
    fn a_prepared_key_signs_as_the_raw_key_does() {
        let key = SigningKey::new(&[9; 32]);
        for counter in 1..4 {
            let record = InherentId { counter, ..sample() };
            let bytes = record.sign_with(&key);
            assert_eq!(bytes, record.sign(&[9; 32]));
            let (_, body, tag) = InherentId::decode(&bytes).unwrap();
            let mut mac = Hmac::<Sha256>::new_from_slice(&[9; 32]).unwrap();
            mac.update(body);
            mac.verify_slice(tag).unwrap();
        }
    }
}
