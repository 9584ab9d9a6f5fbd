//! Field mapping: settlegate requests to ISO 8583 messages, and response codes back to
//! settlegate outcomes. `docs/ADAPTERS.md` carries the same tables.

use std::time::{SystemTime, UNIX_EPOCH};

use super::codec::{CodecError, Message};
use super::dialect::{Dialect, Sources};
use crate::{AdapterError, AuthCode, CardToken, Currency, DeclineReason, ProviderReply};

/// Largest amount field 4 (twelve digits) can carry, in minor units.
pub const AMOUNT_MINOR_MAX: u64 = 999_999_999_999;
/// Field 41's fixed width; shorter terminal IDs are padded with spaces.
pub const TERMINAL_ID_LEN: usize = 8;

/// ISO 4217 numeric codes (field 49) of the currencies this adapter can send.
pub const CURRENCY_NUMERIC: [(&str, &str); 18] = [
    ("AUD", "036"),
    ("CAD", "124"),
    ("CHF", "756"),
    ("CNY", "156"),
    ("DKK", "208"),
    ("EUR", "978"),
    ("GBP", "826"),
    ("HKD", "344"),
    ("INR", "356"),
    ("JPY", "392"),
    ("KRW", "410"),
    ("NOK", "578"),
    ("NZD", "554"),
    ("SEK", "752"),
    ("SGD", "702"),
    ("THB", "764"),
    ("TWD", "901"),
    ("USD", "840"),
];

/// The ISO 4217 numeric code of `currency`, if it is in [`CURRENCY_NUMERIC`].
pub fn currency_numeric(currency: Currency) -> Option<&'static str> {
    CURRENCY_NUMERIC.iter().find(|(alpha, _)| *alpha == currency.as_str()).map(|(_, n)| *n)
}

/// What a response code (field 39) of an 0110/0210 means to the engine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplyMapping {
    /// Approved; field 38 carries the authorization code.
    Approve,
    /// Declined with this reason.
    Decline(DeclineReason),
    /// The host could not process it: [`AdapterError::Unavailable`].
    Unavailable,
    /// The host reports a timeout further on: [`AdapterError::Timeout`].
    Timeout,
}

/// The default response code table (`response_codes` in the config overrides entries). A code
/// not listed is a decline with [`DeclineReason::DoNotHonor`].
pub const RESPONSE_CODES: [(&str, ReplyMapping); 20] = [
    ("00", ReplyMapping::Approve),
    ("08", ReplyMapping::Approve),
    ("11", ReplyMapping::Approve),
    ("05", ReplyMapping::Decline(DeclineReason::DoNotHonor)),
    ("51", ReplyMapping::Decline(DeclineReason::InsufficientFunds)),
    ("61", ReplyMapping::Decline(DeclineReason::LimitExceeded)),
    ("65", ReplyMapping::Decline(DeclineReason::LimitExceeded)),
    ("14", ReplyMapping::Decline(DeclineReason::InvalidAccount)),
    ("15", ReplyMapping::Decline(DeclineReason::InvalidAccount)),
    ("33", ReplyMapping::Decline(DeclineReason::InvalidAccount)),
    ("41", ReplyMapping::Decline(DeclineReason::InvalidAccount)),
    ("43", ReplyMapping::Decline(DeclineReason::InvalidAccount)),
    ("54", ReplyMapping::Decline(DeclineReason::InvalidAccount)),
    ("56", ReplyMapping::Decline(DeclineReason::InvalidAccount)),
    ("91", ReplyMapping::Unavailable),
    ("92", ReplyMapping::Unavailable),
    ("96", ReplyMapping::Unavailable),
    ("68", ReplyMapping::Timeout),
    ("13", ReplyMapping::Decline(DeclineReason::DoNotHonor)),
    ("57", ReplyMapping::Decline(DeclineReason::DoNotHonor)),
];

/// The mapping of response code `code` in the default table.
pub fn response_mapping(code: &str) -> ReplyMapping {
    RESPONSE_CODES
        .iter()
        .find(|(c, _)| *c == code)
        .map(|(_, m)| *m)
        .unwrap_or(ReplyMapping::Decline(DeclineReason::DoNotHonor))
}

/// A reply that matched its request but cannot be interpreted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub(crate) enum ReplyError {
    /// Field 39 is missing or not two characters.
    #[error("response code (field 39) missing")]
    ResponseCode,
    /// An approval without a six-character alphanumeric field 38.
    #[error("approval without a valid authorization code (field 38)")]
    AuthCode,
}

/// The engine outcome of a matched 0110/0210.
pub(crate) fn reply_outcome(
    dialect: &Dialect,
    message: &Message,
) -> Result<Result<ProviderReply, AdapterError>, ReplyError> {
    let code = message.get_str(39).filter(|c| c.len() == 2).ok_or(ReplyError::ResponseCode)?;
    Ok(match dialect.response(code) {
        ReplyMapping::Approve => {
            let auth = message.get(38).ok_or(ReplyError::AuthCode)?;
            let auth: [u8; 6] = auth.try_into().map_err(|_| ReplyError::AuthCode)?;
            if !auth.iter().all(u8::is_ascii_alphanumeric) {
                return Err(ReplyError::AuthCode);
            }
            Ok(ProviderReply::Approved { auth_code: AuthCode(auth) })
        }
        ReplyMapping::Decline(reason) => Ok(ProviderReply::Declined { reason }),
        ReplyMapping::Unavailable => {
            Err(AdapterError::Unavailable(format!("iso8583 host answered response code {code}")))
        }
        ReplyMapping::Timeout => Err(AdapterError::Timeout),
    })
}

/// What identifies an authorization at the host, kept while it is in flight so that it can
/// be reversed. Holds the card token, never the PAN.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Original {
    pub(crate) mti: [u8; 4],
    pub(crate) stan: u32,
    pub(crate) rrn: [u8; 12],
    pub(crate) transmitted: [u8; 10],
    /// `MMDDhhmmss` at the dialect's local offset (fields 12 and 13, when configured).
    pub(crate) local: [u8; 10],
    pub(crate) amount: [u8; 12],
    pub(crate) currency: [u8; 3],
    /// Field 41, mapped.
    pub(crate) terminal: [u8; TERMINAL_ID_LEN],
    /// The settlegate terminal ID, unmapped.
    pub(crate) terminal_full: String,
    pub(crate) token: Option<CardToken>,
}

/// Left-aligns `text` in a space-padded field of `N` bytes (callers check the length).
pub(crate) fn pad<const N: usize>(text: &[u8]) -> [u8; N] {
    let mut out = [b' '; N];
    let len = text.len().min(N);
    out[..len].copy_from_slice(&text[..len]);
    out
}

/// Six-digit STAN text.
pub(crate) fn stan_text(stan: u32) -> [u8; 6] {
    digits(u64::from(stan))
}

/// `value` as `N` zero-padded decimal digits (the low `N` digits).
pub(crate) fn digits<const N: usize>(mut value: u64) -> [u8; N] {
    let mut out = [b'0'; N];
    for slot in out.iter_mut().rev() {
        *slot = b'0' + (value % 10) as u8;
        value /= 10;
    }
    out
}

/// Parses a six-digit STAN field.
pub(crate) fn parse_stan(field: Option<&[u8]>) -> Option<u32> {
    let field = field?;
    if field.len() != 6 || !field.iter().all(u8::is_ascii_digit) {
        return None;
    }
    Some(field.iter().fold(0u32, |acc, b| acc * 10 + u32::from(b - b'0')))
}

/// Field 7, transmission date and time: `MMDDhhmmss` in UTC.
pub(crate) fn transmission_time(now: SystemTime) -> [u8; 10] {
    let secs = now.duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    let (_, month, day) = civil_from_days((secs / 86_400) as i64);
    let rem = secs % 86_400;
    let mut out = [0u8; 10];
    out[..2].copy_from_slice(&digits::<2>(month));
    out[2..4].copy_from_slice(&digits::<2>(day));
    out[4..6].copy_from_slice(&digits::<2>(rem / 3_600));
    out[6..8].copy_from_slice(&digits::<2>(rem % 3_600 / 60));
    out[8..].copy_from_slice(&digits::<2>(rem % 60));
    out
}

/// Days since 1970-01-01 of a civil date (H. Hinnant's `days_from_civil`).
pub(crate) fn days_from_civil(year: i64, month: u64, day: u64) -> i64 {
    let year = if month <= 2 { year - 1 } else { year };
    let era = year.div_euclid(400);
    let yoe = year.rem_euclid(400);
    let month = month as i64;
    let doy = (153 * (if month > 2 { month - 3 } else { month + 9 }) + 2) / 5 + day as i64 - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// Year, month, day of a day count since 1970-01-01 (H. Hinnant's `civil_from_days`).
pub(crate) fn civil_from_days(days: i64) -> (i64, u64, u64) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u64;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u64;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

/// The 0100/0200 for `original`, carrying `pan` in field 2.
pub(crate) fn request_message(
    dialect: &Dialect,
    original: &Original,
    pan: &str,
) -> Result<Message, AdapterError> {
    let mut message = Message::new(dialect.class.request_mti()).map_err(encoding)?;
    message.set(2, pan.as_bytes()).map_err(encoding)?;
    common_fields(&mut message, dialect, original, original.stan, original.transmitted)?;
    Ok(message)
}

/// The reversal (0400 or 0420, or a repeat: 0401, 0421) of `original`, under its own `stan`.
pub(crate) fn reversal_message(
    dialect: &Dialect,
    original: &Original,
    stan: u32,
    repeat: bool,
    pan: Option<&str>,
    now: SystemTime,
) -> Result<Message, AdapterError> {
    let mut message = Message::new(dialect.reversal_request_mti(repeat)).map_err(encoding)?;
    if let Some(pan) = pan {
        message.set(2, pan.as_bytes()).map_err(encoding)?;
    }
    common_fields(&mut message, dialect, original, stan, transmission_time(now))?;
    // Field 90: original MTI, STAN, transmission date-time, acquiring and forwarding
    // institution IDs (unused here: zeros).
    let mut data = Vec::with_capacity(42);
    data.extend_from_slice(&original.mti);
    data.extend_from_slice(&stan_text(original.stan));
    data.extend_from_slice(&original.transmitted);
    data.extend_from_slice(&[b'0'; 22]);
    message.set(90, data).map_err(encoding)?;
    Ok(message)
}

fn encoding(error: CodecError) -> AdapterError {
    AdapterError::Config(format!("iso8583: cannot encode: {error}"))
}

/// The adapter's own fields, then the dialect's (3, 41 and 42 by default).
fn common_fields(
    message: &mut Message,
    dialect: &Dialect,
    original: &Original,
    stan: u32,
    transmitted: [u8; 10],
) -> Result<(), AdapterError> {
    message.set(4, original.amount).map_err(encoding)?;
    message.set(7, transmitted).map_err(encoding)?;
    message.set(11, stan_text(stan)).map_err(encoding)?;
    message.set(37, original.rrn).map_err(encoding)?;
    message.set(49, original.currency).map_err(encoding)?;
    let sources = Sources {
        terminal: &original.terminal,
        terminal_full: &original.terminal_full,
        local: &original.local,
    };
    for (number, value) in dialect.field_values(&sources) {
        let value = value
            .map_err(|error| AdapterError::Config(format!("iso8583: field {number}: {error}")))?;
        message.set(number, value).map_err(encoding)?;
    }
    Ok(())
}

/// Network management purposes (field 70).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Network {
    /// `001`: sign-on.
    SignOn,
    /// `301`: echo test.
    Echo,
}

impl Network {
    pub(crate) fn code(self) -> &'static [u8; 3] {
        match self {
            Network::SignOn => b"001",
            Network::Echo => b"301",
        }
    }
}

/// An 0800 network management request.
pub(crate) fn network_message(
    purpose: Network,
    stan: u32,
    now: SystemTime,
) -> Result<Message, CodecError> {
    let mut message = Message::new(*b"0800")?;
    message.set(7, transmission_time(now))?;
    message.set(11, stan_text(stan))?;
    message.set(70, *purpose.code())?;
    Ok(message)
}

/// The 0810 answering a host-initiated 0800 (fields 7, 11 and 70 echoed, `00`).
pub(crate) fn network_answer(request: &Message) -> Result<Message, CodecError> {
    let mut answer = Message::new(*b"0810")?;
    for field in [7, 11, 70] {
        if let Some(value) = request.get(field) {
            answer.set(field, value)?;
        }
    }
    answer.set(39, *b"00")?;
    Ok(answer)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn transmission_time_is_utc_mmddhhmmss() {
        // 2024-02-29T13:05:09Z
        let t = UNIX_EPOCH + Duration::from_secs(1_709_211_909);
        assert_eq!(&transmission_time(t), b"0229130509");
        assert_eq!(&transmission_time(UNIX_EPOCH), b"0101000000");
    }

    #[test]
    fn response_codes_map_onto_existing_reasons() {
        assert_eq!(response_mapping("00"), ReplyMapping::Approve);
        assert_eq!(response_mapping("51"), ReplyMapping::Decline(DeclineReason::InsufficientFunds));
        assert_eq!(response_mapping("61"), ReplyMapping::Decline(DeclineReason::LimitExceeded));
        assert_eq!(response_mapping("14"), ReplyMapping::Decline(DeclineReason::InvalidAccount));
        assert_eq!(response_mapping("96"), ReplyMapping::Unavailable);
        assert_eq!(response_mapping("Z9"), ReplyMapping::Decline(DeclineReason::DoNotHonor));
        let mut codes: Vec<_> = RESPONSE_CODES.iter().map(|(c, _)| *c).collect();
        codes.sort_unstable();
        codes.dedup();
        assert_eq!(codes.len(), RESPONSE_CODES.len(), "no code listed twice");
    }

    #[test]
    fn approval_needs_an_alphanumeric_auth_code() {
        let config = super::super::Iso8583Config {
            host_addr: "h:1".into(),
            merchant_id: "M".into(),
            ..Default::default()
        };
        let dialect = config.dialect().unwrap();
        let reply_outcome = |reply: &Message| reply_outcome(&dialect, reply);
        let mut reply = Message::new(*b"0110").unwrap();
        reply.set(39, *b"00").unwrap();
        assert_eq!(reply_outcome(&reply), Err(ReplyError::AuthCode));
        reply.set(38, *b"AB 12C").unwrap();
        assert_eq!(reply_outcome(&reply), Err(ReplyError::AuthCode));
        reply.set(38, *b"AB012C").unwrap();
        assert_eq!(
            reply_outcome(&reply),
            Ok(Ok(ProviderReply::Approved { auth_code: AuthCode(*b"AB012C") }))
        );
    }

    #[test]
    fn currency_table_is_sorted_alpha_to_three_digits() {
        assert!(CURRENCY_NUMERIC.windows(2).all(|w| w[0].0 < w[1].0));
        assert!(CURRENCY_NUMERIC.iter().all(|(_, n)| n.len() == 3));
        assert_eq!(currency_numeric(Currency::try_from("JPY").unwrap()), Some("392"));
        assert_eq!(currency_numeric(Currency::try_from("XXX").unwrap()), None);
    }

    #[test]
    fn digits_and_stan_parse_round_trip() {
        assert_eq!(&digits::<12>(1234), b"000000001234");
        assert_eq!(parse_stan(Some(&stan_text(999_999))), Some(999_999));
        assert_eq!(parse_stan(Some(b"12a456")), None);
        assert_eq!(parse_stan(None), None);
    }
}
