//! Payment codes and coupons (C1–C5) and their two-tier routing (T1).
//!
//! A code is a compact text the user's device shows as a QR code or a Code 128 barcode:
//! `SG` followed by the RFC 4648 base32 (no padding) of a 39-byte payload, 65 characters, all
//! in the QR alphanumeric set and in Code 128's set B:
//!
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 1 | kind: `0xC1` payment code, `0xC5` coupon |
//! | 1 | 2 | issuer (the engine's issuer number, config `codes.issuer`) |
//! | 3 | 8 | issue number: the second-tier shard in the top 8 bits, a sequence below |
//! | 11 | 8 | value: a payment code's authorized amount (minor units); a coupon's basis points or amount |
//! | 19 | 3 | currency, ISO 4217 alphabetic (a percent coupon: `XXX`) |
//! | 22 | 4 | expiry, seconds since the UNIX epoch |
//! | 26 | 1 | flags: 0 for a payment code; a coupon's kind (1 percent, 2 fixed amount, 3 order code) |
//! | 27 | 12 | tag: HMAC-SHA256 of bytes 0..27 by the engine's code key, first 12 bytes |
//!
//! The tag makes a forged or altered code fail (compared in constant time); the issue number
//! routes the code to the shard that issued it and holds its state (the second tier, T1), so a
//! code is redeemed at most once: one actor decides.

use data_encoding::BASE32_NOPAD;
use hmac::{Hmac, Mac};
use sha2::Sha256;
use subtle::ConstantTimeEq;
use zeroize::Zeroizing;

use crate::types::{Currency, ReasonCode};

/// The text prefix of every code.
pub const CODE_PREFIX: &str = "SG";
/// Payload bytes before the tag.
const BODY_LEN: usize = 27;
/// Tag bytes kept (96 bits).
const TAG_LEN: usize = 12;
/// Payload bytes.
pub const PAYLOAD_LEN: usize = BODY_LEN + TAG_LEN;
/// Characters of a code's text.
pub const CODE_TEXT_LEN: usize = 2 + 63;

/// What a code is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum CodeKind {
    /// A single-use payment code backed by a held authorization (C2).
    Payment = 0xC1,
    /// A coupon or service code (C5).
    Coupon = 0xC5,
}

/// A coupon's effect at redemption (C5).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CouponEffect {
    /// A percentage off, in basis points (1..=10000), rounded down.
    Percent {
        /// Basis points.
        bps: u16,
    },
    /// A fixed amount off, in the coupon's currency; never below zero.
    Fixed {
        /// Minor units off.
        amount_minor: u64,
        /// Its currency.
        currency: Currency,
    },
    /// An order code: names a pre-arranged order; no discount.
    OrderCode,
}

impl CouponEffect {
    /// The discount on `amount_minor` in `currency`.
    pub fn discount_minor(&self, amount_minor: u64, currency: Currency) -> u64 {
        match *self {
            CouponEffect::Percent { bps } => {
                (u128::from(amount_minor) * u128::from(bps) / 10_000) as u64
            }
            CouponEffect::Fixed { amount_minor: off, currency: c } if c == currency => {
                off.min(amount_minor)
            }
            CouponEffect::Fixed { .. } | CouponEffect::OrderCode => 0,
        }
    }

    /// Whether its values are in range.
    pub fn valid(&self) -> bool {
        match *self {
            CouponEffect::Percent { bps } => (1..=10_000).contains(&bps),
            CouponEffect::Fixed { amount_minor, .. } => amount_minor > 0,
            CouponEffect::OrderCode => true,
        }
    }

    fn encode(&self) -> (u8, u64, [u8; 3]) {
        match *self {
            CouponEffect::Percent { bps } => (1, u64::from(bps), *b"XXX"),
            CouponEffect::Fixed { amount_minor, currency } => (2, amount_minor, currency.bytes()),
            CouponEffect::OrderCode => (3, 0, *b"XXX"),
        }
    }

    fn decode(flags: u8, value: u64, currency: Currency) -> Option<CouponEffect> {
        match flags {
            1 => Some(CouponEffect::Percent { bps: u16::try_from(value).ok()? }),
            2 => Some(CouponEffect::Fixed { amount_minor: value, currency }),
            3 => Some(CouponEffect::OrderCode),
            _ => None,
        }
    }
}

/// The fields a code carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CodePayload {
    /// Payment code or coupon.
    pub kind: CodeKind,
    /// Issuer number.
    pub issuer: u16,
    /// Issue number (its top 8 bits name the shard holding it).
    pub number: u64,
    /// A payment code's authorized amount; for a coupon, see [`CouponEffect`].
    pub value: u64,
    /// The currency.
    pub currency: Currency,
    /// Expiry, seconds since the epoch.
    pub expires_s: u32,
    /// 0 for a payment code; a coupon's effect kind.
    pub flags: u8,
}

/// The key that tags codes. Derived from the vault key, so it lasts as long as the data does.
pub struct CodeKey {
    mac: Hmac<Sha256>,
}

impl CodeKey {
    /// Derives the code key from the vault key (HMAC-SHA256 of a fixed label).
    pub fn derive(vault_key: &[u8; 32]) -> CodeKey {
        let mut mac = Hmac::<Sha256>::new_from_slice(vault_key).expect("HMAC takes any key");
        mac.update(b"settlegate payment code key v1");
        let key: Zeroizing<[u8; 32]> = Zeroizing::new(mac.finalize().into_bytes().into());
        CodeKey { mac: Hmac::<Sha256>::new_from_slice(key.as_ref()).expect("HMAC takes any key") }
    }

    fn tag(&self, body: &[u8]) -> [u8; TAG_LEN] {
        let mut mac = self.mac.clone();
        mac.update(body);
        let full = mac.finalize().into_bytes();
        full[..TAG_LEN].try_into().expect("12 bytes")
    }
}

impl CodePayload {
    /// A coupon's payload.
    pub fn coupon(issuer: u16, number: u64, effect: CouponEffect, expires_s: u32) -> CodePayload {
        let (flags, value, currency) = effect.encode();
        let currency = Currency::from_bytes(currency).expect("XXX and real codes are valid");
        CodePayload { kind: CodeKind::Coupon, issuer, number, value, currency, expires_s, flags }
    }

    /// A coupon's effect (`None` for a payment code).
    pub fn coupon_effect(&self) -> Option<CouponEffect> {
        match self.kind {
            CodeKind::Coupon => CouponEffect::decode(self.flags, self.value, self.currency),
            CodeKind::Payment => None,
        }
    }

    fn body(&self) -> [u8; BODY_LEN] {
        let mut body = [0u8; BODY_LEN];
        body[0] = self.kind as u8;
        body[1..3].copy_from_slice(&self.issuer.to_be_bytes());
        body[3..11].copy_from_slice(&self.number.to_be_bytes());
        body[11..19].copy_from_slice(&self.value.to_be_bytes());
        body[19..22].copy_from_slice(&self.currency.bytes());
        body[22..26].copy_from_slice(&self.expires_s.to_be_bytes());
        body[26] = self.flags;
        body
    }

    /// The code's text, tagged with `key`.
    pub fn seal(&self, key: &CodeKey) -> String {
        let body = self.body();
        let mut payload = [0u8; PAYLOAD_LEN];
        payload[..BODY_LEN].copy_from_slice(&body);
        payload[BODY_LEN..].copy_from_slice(&key.tag(&body));
        format!("{CODE_PREFIX}{}", BASE32_NOPAD.encode(&payload))
    }

    /// Reads a code's text and checks its tag in constant time: `InvalidCode` when the text is
    /// not a code at all (or its payload is not one a server makes: a payment code with flags,
    /// a coupon whose kind, value and currency are no effect), `ForgedCode` when the tag does
    /// not match (forged or altered).
    pub fn open(text: &str, key: &CodeKey) -> Result<CodePayload, ReasonCode> {
        let encoded = text
            .strip_prefix(CODE_PREFIX)
            .filter(|_| text.len() == CODE_TEXT_LEN)
            .ok_or(ReasonCode::InvalidCode)?;
        let payload =
            BASE32_NOPAD.decode(encoded.as_bytes()).map_err(|_| ReasonCode::InvalidCode)?;
        let payload: [u8; PAYLOAD_LEN] = payload.try_into().map_err(|_| ReasonCode::InvalidCode)?;
        let (body, tag) = payload.split_at(BODY_LEN);
        if !bool::from(key.tag(body).ct_eq(tag)) {
            return Err(ReasonCode::ForgedCode);
        }
        let kind = match body[0] {
            0xC1 => CodeKind::Payment,
            0xC5 => CodeKind::Coupon,
            _ => return Err(ReasonCode::InvalidCode),
        };
        let be_u64 = |at: usize| u64::from_be_bytes(body[at..at + 8].try_into().expect("8"));
        let currency = Currency::from_bytes([body[19], body[20], body[21]])
            .map_err(|_| ReasonCode::InvalidCode)?;
        let payload = CodePayload {
            kind,
            issuer: u16::from_be_bytes([body[1], body[2]]),
            number: be_u64(3),
            value: be_u64(11),
            currency,
            expires_s: u32::from_be_bytes(body[22..26].try_into().expect("4")),
            flags: body[26],
        };
        // Strict, as every decoder: a payment code's flags are 0, and a coupon's kind, value
        // and currency are one of the effects (a percent coupon and an order code in `XXX`,
        // an order code of value 0), so that each code has one payload.
        let canonical = match kind {
            CodeKind::Payment => payload.flags == 0,
            CodeKind::Coupon => payload.coupon_effect().is_some_and(|effect| {
                effect.encode() == (payload.flags, payload.value, payload.currency.bytes())
            }),
        };
        if !canonical {
            return Err(ReasonCode::InvalidCode);
        }
        Ok(payload)
    }
}

/// The shard an issue number belongs to (its top 8 bits).
pub fn shard_of_number(number: u64) -> usize {
    (number >> 56) as usize
}

/// The issue number of a shard's `seq`-th code.
pub fn issue_number(shard: u8, seq: u64) -> u64 {
    (u64::from(shard) << 56) | (seq & ((1 << 56) - 1))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> CodeKey {
        CodeKey::derive(&[3; 32])
    }

    fn payload() -> CodePayload {
        CodePayload {
            kind: CodeKind::Payment,
            issuer: 1,
            number: issue_number(1, 42),
            value: 12_345,
            currency: Currency::try_from("JPY").unwrap(),
            expires_s: 1_795_306_000,
            flags: 0,
        }
    }

    #[test]
    fn seals_and_opens_and_fits_a_barcode() {
        let text = payload().seal(&key());
        assert_eq!(text.len(), CODE_TEXT_LEN);
        assert!(text.bytes().all(|b| b.is_ascii_uppercase() || b.is_ascii_digit()));
        assert_eq!(CodePayload::open(&text, &key()).unwrap(), payload());
        assert_eq!(shard_of_number(payload().number), 1);
    }

    #[test]
    fn forged_altered_and_foreign_codes_fail() {
        let text = payload().seal(&key());
        // Another key (another engine) did not issue it.
        assert_eq!(
            CodePayload::open(&text, &CodeKey::derive(&[4; 32])),
            Err(ReasonCode::ForgedCode)
        );
        // The amount altered: re-encode the payload with a bigger value and the old tag.
        let mut raw = BASE32_NOPAD.decode(&text.as_bytes()[2..]).unwrap();
        raw[18] ^= 0x01;
        let altered = format!("SG{}", BASE32_NOPAD.encode(&raw));
        assert_eq!(CodePayload::open(&altered, &key()), Err(ReasonCode::ForgedCode));
        assert_eq!(CodePayload::open("SG1234", &key()), Err(ReasonCode::InvalidCode));
        assert_eq!(
            CodePayload::open(&text.replace("SG", "XX"), &key()),
            Err(ReasonCode::InvalidCode)
        );
    }

    /// Payloads a server never makes, properly tagged: each is refused as `InvalidCode`, so
    /// every code that opens has one payload (issue #25's audit of the decoders).
    #[test]
    fn non_canonical_payloads_are_invalid() {
        let xxx = Currency::try_from("XXX").unwrap();
        let jpy = Currency::try_from("JPY").unwrap();
        let coupon = |flags, value, currency| CodePayload {
            kind: CodeKind::Coupon,
            flags,
            value,
            currency,
            ..payload()
        };
        let refused = [
            CodePayload { flags: 1, ..payload() }, // a payment code with flags
            coupon(0, 500, xxx),                   // a coupon of no kind
            coupon(4, 500, xxx),
            coupon(1, 500, jpy),    // a percent coupon in a currency
            coupon(1, 70_000, xxx), // basis points past u16
            coupon(3, 1, xxx),      // an order code with a value
            coupon(3, 0, jpy),      // an order code in a currency
        ];
        for payload in refused {
            let text = payload.seal(&key());
            assert_eq!(
                CodePayload::open(&text, &key()),
                Err(ReasonCode::InvalidCode),
                "{payload:?}"
            );
        }
        for effect in [
            CouponEffect::Percent { bps: 500 },
            CouponEffect::Fixed { amount_minor: 300, currency: jpy },
            CouponEffect::OrderCode,
        ] {
            let payload = CodePayload::coupon(1, 7, effect, 1_800_000_000);
            assert_eq!(CodePayload::open(&payload.seal(&key()), &key()), Ok(payload));
        }
    }

    #[test]
    fn coupon_effects() {
        let jpy = Currency::try_from("JPY").unwrap();
        let fixed = CouponEffect::Fixed { amount_minor: 300, currency: jpy };
        let coupon = CodePayload::coupon(1, issue_number(0, 7), fixed, 1_800_000_000);
        let text = coupon.seal(&key());
        let opened = CodePayload::open(&text, &key()).unwrap();
        assert_eq!(opened.coupon_effect(), Some(fixed));
        assert_eq!(fixed.discount_minor(1_000, jpy), 300);
        assert_eq!(fixed.discount_minor(200, jpy), 200);
        assert_eq!(CouponEffect::Percent { bps: 1_000 }.discount_minor(999, jpy), 99);
        assert_eq!(CouponEffect::OrderCode.discount_minor(999, jpy), 0);
    }
}
