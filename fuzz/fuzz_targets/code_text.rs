//! Payment-code and coupon text (`REDEEM_CODE`'s `code` and `coupon`). Random text never
//! carries a valid tag, so half the inputs are payloads the harness tags itself, with the key
//! and algorithm `docs/PROTOCOL.md` gives (HMAC-SHA256 of the label under the vault key, then
//! the first 12 bytes of HMAC-SHA256 of the 27-byte body), to reach the fields behind the tag.
//! Properties: no panic; a tagged payload is never `ForgedCode`; whatever opens seals to the
//! same text, and is a payload a server makes (a payment code's flags 0, a coupon's effect).
//!
//! Input: one byte, its low bit choosing the mode (0: the rest is the text; 1: the rest is the
//! payload's body, zero-padded to 27 bytes).
#![no_main]

use std::sync::OnceLock;

use data_encoding::BASE32_NOPAD;
use hmac::{Hmac, Mac};
use libfuzzer_sys::fuzz_target;
use settlegate_engine::codes::{CodeKey, CodeKind, CodePayload};
use settlegate_engine::ReasonCode;
use sha2::Sha256;

const VAULT_KEY: [u8; 32] = [0x5a; 32];

/// The code key, as the spec derives it: HMAC-SHA256 of the label under the vault key.
fn code_key() -> &'static Hmac<Sha256> {
    static KEY: OnceLock<Hmac<Sha256>> = OnceLock::new();
    KEY.get_or_init(|| {
        let mut label = Hmac::<Sha256>::new_from_slice(&VAULT_KEY).unwrap();
        label.update(b"settlegate payment code key v1");
        Hmac::<Sha256>::new_from_slice(&label.finalize().into_bytes()).unwrap()
    })
}

fn tag(body: &[u8; 27]) -> [u8; 12] {
    let mut mac = code_key().clone();
    mac.update(body);
    mac.finalize().into_bytes()[..12].try_into().unwrap()
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else { return };
    static KEY: OnceLock<CodeKey> = OnceLock::new();
    let key = KEY.get_or_init(|| CodeKey::derive(&VAULT_KEY));
    let text = if mode & 1 == 0 {
        let Ok(text) = std::str::from_utf8(rest) else { return };
        text.to_owned()
    } else {
        let mut body = [0u8; 27];
        let n = rest.len().min(27);
        body[..n].copy_from_slice(&rest[..n]);
        let payload = [body.as_slice(), &tag(&body)].concat();
        format!("SG{}", BASE32_NOPAD.encode(&payload))
    };
    match CodePayload::open(&text, key) {
        Ok(payload) => {
            assert_eq!(payload.seal(key), text);
            match payload.kind {
                CodeKind::Payment => assert_eq!(payload.flags, 0),
                CodeKind::Coupon => assert!(payload.coupon_effect().is_some()),
            }
        }
        Err(reason) => {
            assert!(matches!(reason, ReasonCode::InvalidCode | ReasonCode::ForgedCode));
            assert!(mode & 1 == 0 || reason == ReasonCode::InvalidCode, "a tagged payload");
        }
    }
});
