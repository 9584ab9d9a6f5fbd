//! EMVCo merchant-presented QR payloads (a store's poster). Random text never ends with a
//! matching CRC, so half the inputs get the CRC object appended by the harness (CRC-16/
//! CCITT-FALSE computed here from its definition, not with the engine's code). Properties: no
//! panic; a payload with the CRC fixed up is never refused for its CRC; what parses starts with
//! the format indicator, ends with its CRC, and its networks are at most the 26 templates.
//!
//! Input: one byte, its low bit choosing the mode (0: the rest is the payload; 1: the rest is
//! the payload before `6304` and the CRC).
#![no_main]

use libfuzzer_sys::fuzz_target;
use settlegate_engine::emvqr::{self, MpmError};

/// CRC-16/CCITT-FALSE: polynomial 0x1021, initial value 0xFFFF, no reflection, no final XOR.
fn crc16(bytes: &[u8]) -> u16 {
    let mut crc: u16 = 0xFFFF;
    for &byte in bytes {
        crc ^= u16::from(byte) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 { (crc << 1) ^ 0x1021 } else { crc << 1 };
        }
    }
    crc
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else { return };
    let Ok(text) = std::str::from_utf8(rest) else { return };
    let fixed = mode & 1 == 1;
    let payload = if fixed {
        let covered = format!("{text}6304");
        format!("{covered}{:04X}", crc16(covered.as_bytes()))
    } else {
        text.to_owned()
    };
    match emvqr::parse(&payload) {
        Ok(qr) => {
            assert!(emvqr::is_mpm(&payload));
            let (covered, crc) = payload.split_at(payload.len() - 4);
            assert!(covered.ends_with("6304"));
            assert_eq!(crc, format!("{:04X}", crc16(covered.as_bytes())));
            assert!(qr.networks.len() <= 26);
            for network in &qr.networks {
                assert!(payload.contains(network.as_str()));
            }
        }
        Err(error) => assert!(!fixed || error != MpmError::Crc, "CRC fixed up: {payload:?}"),
    }
});
