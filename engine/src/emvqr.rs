//! EMVCo merchant-presented QR payloads (MPM), as printed on a store's QR poster (W2).
//!
//! A payload is a string of data objects `ID LEN VALUE`: a two-digit ID, a two-digit length
//! and that many characters. It starts with the payload format indicator `000201` and ends
//! with the CRC object `6304XXXX`: CRC-16/CCITT-FALSE (poly 0x1021, init 0xFFFF) over every
//! character up to and including `6304`, as four upper-case hex digits. Objects 26–51 are
//! merchant account information templates, one per payment network the merchant accepts;
//! inside each, sub-object `00` is the network's globally unique identifier (a reverse domain
//! name or an application identifier).
//!
//! No well-kept Rust crate parses MPM payloads (the ones on crates.io are early and
//! unmaintained), so this is a small parser of our own; the CRC comes from the `crc` crate.
//! Only ASCII payloads are accepted (the alternate-language template, object 64, may carry
//! UTF-8 in the specification; a poster that uses it is refused rather than mis-measured).

use crc::{Crc, CRC_16_IBM_3740};

/// Longest payload the specification allows.
pub const PAYLOAD_LEN_MAX: usize = 512;

/// CRC-16/CCITT-FALSE (catalogued as CRC-16/IBM-3740).
const CRC16: Crc<u16> = Crc::<u16>::new(&CRC_16_IBM_3740);

/// Why a payload is not a valid MPM payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum MpmError {
    /// Not ASCII, empty, or longer than 512 characters.
    #[error("payload is not 1..=512 ASCII characters")]
    Length,
    /// A data object's ID or length is not two digits, or runs past the end.
    #[error("data object at offset {0} is malformed")]
    Object(usize),
    /// A data object's ID appears a second time in the same template (or at the top level):
    /// the payload would name two values, or two networks, for one field.
    #[error("data object at offset {0} repeats an ID")]
    Duplicate(usize),
    /// The first object is not the payload format indicator `000201`.
    #[error("payload does not start with the format indicator 000201")]
    FormatIndicator,
    /// The last object is not a four-character CRC (`6304XXXX`).
    #[error("payload does not end with the CRC object 6304")]
    MissingCrc,
    /// The CRC does not match the payload.
    #[error("CRC mismatch")]
    Crc,
}

/// A parsed merchant-presented payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MerchantQr {
    /// The networks the merchant accepts: the GUID (sub-object 00) of each template 26–51.
    pub networks: Vec<String>,
    /// Merchant category code (object 52), if present.
    pub merchant_category: Option<String>,
    /// Transaction currency, ISO 4217 numeric (object 53), if present.
    pub currency_numeric: Option<String>,
    /// Country code (object 58), if present.
    pub country: Option<String>,
    /// Merchant name (object 59), if present.
    pub merchant_name: Option<String>,
    /// Merchant city (object 60), if present.
    pub merchant_city: Option<String>,
}

/// Whether `payload` looks like an MPM payload (starts with the format indicator).
pub fn is_mpm(payload: &str) -> bool {
    payload.starts_with("000201")
}

/// Splits `data` into `(id, value)` objects, each ID at most once; `base` is `data`'s offset
/// in the payload, for error positions.
fn objects(data: &str, base: usize) -> Result<Vec<(u8, &str)>, MpmError> {
    let bytes = data.as_bytes();
    let mut out = Vec::new();
    let mut at = 0;
    let mut seen = [false; 100];
    let two_digits = |at: usize| -> Option<u8> {
        let pair = bytes.get(at..at + 2)?;
        pair.iter().all(u8::is_ascii_digit).then(|| (pair[0] - b'0') * 10 + (pair[1] - b'0'))
    };
    while at < bytes.len() {
        let id = two_digits(at).ok_or(MpmError::Object(base + at))?;
        let len = two_digits(at + 2).ok_or(MpmError::Object(base + at))? as usize;
        let value = data.get(at + 4..at + 4 + len).ok_or(MpmError::Object(base + at))?;
        if std::mem::replace(&mut seen[usize::from(id)], true) {
            return Err(MpmError::Duplicate(base + at));
        }
        out.push((id, value));
        at += 4 + len;
    }
    Ok(out)
}

/// The CRC object's value for `payload_before_crc` (which must end with `6304`).
pub fn crc_hex(payload_before_crc: &str) -> String {
    format!("{:04X}", CRC16.checksum(payload_before_crc.as_bytes()))
}

/// Parses and checks a payload: structure, format indicator, CRC.
pub fn parse(payload: &str) -> Result<MerchantQr, MpmError> {
    if payload.is_empty() || payload.len() > PAYLOAD_LEN_MAX || !payload.is_ascii() {
        return Err(MpmError::Length);
    }
    let objects = objects(payload, 0)?;
    if objects.first() != Some(&(0, "01")) {
        return Err(MpmError::FormatIndicator);
    }
    match objects.last() {
        Some((63, crc)) if crc.len() == 4 => {
            let covered = &payload[..payload.len() - 4];
            if *crc != crc_hex(covered) {
                return Err(MpmError::Crc);
            }
        }
        _ => return Err(MpmError::MissingCrc),
    }
    let mut qr = MerchantQr {
        networks: Vec::new(),
        merchant_category: None,
        currency_numeric: None,
        country: None,
        merchant_name: None,
        merchant_city: None,
    };
    let mut offset = 0;
    for (id, value) in objects {
        let value_at = offset + 4;
        offset += 4 + value.len();
        match id {
            26..=51 => {
                let inner = self::objects(value, value_at)?;
                if let Some((_, guid)) = inner.iter().find(|(sub, _)| *sub == 0) {
                    qr.networks.push((*guid).to_owned());
                }
            }
            52 => qr.merchant_category = Some(value.to_owned()),
            53 => qr.currency_numeric = Some(value.to_owned()),
            58 => qr.country = Some(value.to_owned()),
            59 => qr.merchant_name = Some(value.to_owned()),
            60 => qr.merchant_city = Some(value.to_owned()),
            _ => {}
        }
    }
    Ok(qr)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A PromptPay payload published with the promptparse library (its CRC 42BE computed by
    /// someone else's implementation).
    const PROMPTPAY: &str =
        "00020101021229370016A0000006770101110113006680111111153037645802TH540520.15630442BE";

    #[test]
    fn parses_an_independent_payload_and_checks_its_crc() {
        let qr = parse(PROMPTPAY).unwrap();
        assert_eq!(qr.networks, vec!["A000000677010111".to_owned()]);
        assert_eq!(qr.currency_numeric.as_deref(), Some("764"));
        assert_eq!(qr.country.as_deref(), Some("TH"));
        let mut altered = PROMPTPAY.to_owned();
        altered.replace_range(70..71, "9"); // one digit of the amount
        assert_eq!(parse(&altered), Err(MpmError::Crc));
        // The CRC is four upper-case hex digits: lower case is refused.
        let lower = PROMPTPAY.replace("42BE", "42be");
        assert_eq!(parse(&lower), Err(MpmError::Crc));
    }

    #[test]
    fn several_networks_and_structural_errors() {
        let body = "000201010211\
                    26190015jp.example.pay1\
                    27220018com.example.wallet\
                    52045411530339258\
                    02JP5910Demo Store6005Tokyo6304";
        let payload = format!("{body}{}", crc_hex(body));
        let qr = parse(&payload).unwrap();
        assert_eq!(qr.networks, vec!["jp.example.pay1", "com.example.wallet"]);
        assert_eq!(qr.merchant_name.as_deref(), Some("Demo Store"));
        assert_eq!(parse("0002010102"), Err(MpmError::Object(6)));
        assert_eq!(parse("000202"), Err(MpmError::FormatIndicator));
        assert_eq!(parse("0002016304"), Err(MpmError::Object(6)));
        assert_eq!(parse("000201"), Err(MpmError::MissingCrc));
        assert_eq!(parse(&"0".repeat(513)), Err(MpmError::Length));
        // An ID twice, at the top level or inside a template, CRC correct.
        let twice = |body: &str| parse(&format!("{body}{}", crc_hex(body)));
        assert_eq!(twice("0002010002016304"), Err(MpmError::Duplicate(6)));
        assert_eq!(
            twice("00020126120002ab0002cd6304"),
            Err(MpmError::Duplicate(16)),
            "two network IDs in one template"
        );
        assert!(twice("00020126060002ab27060002cd6304").is_ok(), "two templates, one each");
        assert_eq!(parse("000201ü"), Err(MpmError::Length));
    }

    /// Found by the `emv_mpm` fuzz target (minimized; the harness appends `6304` and the
    /// CRC): 27 objects with ID 40, each a template holding `00`, parsed as 27 networks.
    #[test]
    fn a_repeated_template_is_refused() {
        let found = "000201400600020140060002004006000201400600020940060002014006\
                     000201400600020040060002014006000200400600020140060002014006\
                     000201400600020140060002004006000201400600020140060002014006\
                     000200400600020140060002014006000201400600020140060002014006\
                     000201400600020040060002014006000200";
        let payload = format!("{found}6304{}", crc_hex(&format!("{found}6304")));
        assert_eq!(parse(&payload), Err(MpmError::Duplicate(16)));
    }
}
