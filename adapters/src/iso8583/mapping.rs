//! Field mapping: settlegate requests to ISO 8583 messages, and response codes back to
//! settlegate outcomes. `docs/ADAPTERS.md` carries the same tables.

use std::time::{SystemTime, UNIX_EPOCH};

use super::codec::{CodecError, Message};
use super::dialect::{Dialect, Sources};
use crate::{
    AdapterError, AuthCode, AuthReference, CardToken, Currency, DeclineReason, LifecycleReply,
    NetworkReference, Operation, RefusalReason,
};

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

/// What a host answered an authorization: its approval code, or the decline.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum AuthAnswer {
    /// Approved with this authorization code (field 38).
    Approved(AuthCode),
    /// Declined.
    Declined(DeclineReason),
}

/// The engine outcome of a matched 0110/0210.
pub(crate) fn reply_outcome(
    dialect: &Dialect,
    message: &Message,
) -> Result<Result<AuthAnswer, AdapterError>, ReplyError> {
    let code = response_code(message)?;
    Ok(match dialect.response(code) {
        ReplyMapping::Approve => {
            let auth = message.get(38).ok_or(ReplyError::AuthCode)?;
            let auth: [u8; 6] = auth.try_into().map_err(|_| ReplyError::AuthCode)?;
            if !auth.iter().all(u8::is_ascii_alphanumeric) {
                return Err(ReplyError::AuthCode);
            }
            Ok(AuthAnswer::Approved(AuthCode(auth)))
        }
        ReplyMapping::Decline(reason) => Ok(AuthAnswer::Declined(reason)),
        ReplyMapping::Unavailable => Err(unavailable(code)),
        ReplyMapping::Timeout => Err(AdapterError::Timeout),
    })
}

fn response_code(message: &Message) -> Result<&str, ReplyError> {
    message.get_str(39).filter(|c| c.len() == 2).ok_or(ReplyError::ResponseCode)
}

fn unavailable(code: &str) -> AdapterError {
    AdapterError::Unavailable(format!("iso8583 host answered response code {code}"))
}

/// Response codes with a meaning of their own in answers to lifecycle messages (captures,
/// voids, refunds, reversals), before the dialect's table: `docs/ADAPTERS.md`, "Lifecycle".
pub const LIFECYCLE_RESPONSE_CODES: [(&str, RefusalReason); 3] = [
    ("12", RefusalReason::InvalidState),
    ("13", RefusalReason::AmountInvalid),
    ("25", RefusalReason::UnknownAuthorization),
];

/// The engine outcome of a matched answer to a lifecycle message sent as `sent`: the codes
/// of [`LIFECYCLE_RESPONSE_CODES`] first, then the dialect's table (an approval code accepts;
/// field 38 is not required).
pub(crate) fn lifecycle_outcome(
    dialect: &Dialect,
    message: &Message,
    sent: NetworkReference,
) -> Result<Result<LifecycleReply, AdapterError>, ReplyError> {
    let code = response_code(message)?;
    if let Some((_, reason)) = LIFECYCLE_RESPONSE_CODES.iter().find(|(c, _)| *c == code) {
        return Ok(Ok(LifecycleReply::Refused { reason: *reason }));
    }
    Ok(match dialect.response(code) {
        ReplyMapping::Approve => Ok(LifecycleReply::Accepted { network: Some(sent) }),
        ReplyMapping::Decline(reason) => {
            Ok(LifecycleReply::Refused { reason: RefusalReason::Declined(reason) })
        }
        ReplyMapping::Unavailable => Err(unavailable(code)),
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

impl Original {
    /// The authorization `reference` names, rebuilt for a message that refers to it: its
    /// identifiers, amount, currency, terminal and card token.
    pub(crate) fn of_reference(
        dialect: &Dialect,
        reference: &AuthReference,
    ) -> Result<Original, OriginalError> {
        // A reference the engine rebuilt from its log has none: derived again, as sent.
        let network = reference
            .network
            .unwrap_or_else(|| dialect.assigned(reference.dispatch_id, reference.at_ms));
        let currency = currency_numeric(reference.currency).ok_or_else(|| {
            OriginalError::Config(format!(
                "iso8583: currency {} has no ISO 4217 numeric code in the adapter's table",
                reference.currency
            ))
        })?;
        if reference.amount_minor > AMOUNT_MINOR_MAX {
            return Err(OriginalError::NoNetwork);
        }
        Ok(Original {
            mti: network.mti,
            stan: network.stan,
            rrn: network.rrn,
            transmitted: network.transmitted,
            local: network.local,
            amount: digits(reference.amount_minor),
            currency: pad(currency.as_bytes()),
            terminal: dialect.terminal(&reference.terminal_id).map_err(OriginalError::Config)?,
            terminal_full: reference.terminal_id.clone(),
            token: reference.card_token,
        })
    }
}

/// Why a reference cannot be turned back into the message it names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum OriginalError {
    /// An amount no ISO 8583 message could have carried: the host cannot know it.
    NoNetwork,
    /// The currency or terminal cannot be carried (as for an authorization).
    Config(String),
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
    let mti = dialect.reversal_request_mti(repeat);
    referring_message(dialect, mti, original, stan, pan, now, dialect.acquirer())
}

/// A message that refers to `original` (a reversal, or another lifecycle message): under its
/// own `stan` and transmission time, with the original's RRN, amount, currency and dialect
/// fields, and field 90 naming the original.
fn referring_message(
    dialect: &Dialect,
    mti: [u8; 4],
    original: &Original,
    stan: u32,
    pan: Option<&str>,
    now: SystemTime,
    acquirer: [u8; 11],
) -> Result<Message, AdapterError> {
    let mut message = Message::new(mti).map_err(encoding)?;
    if let Some(pan) = pan {
        message.set(2, pan.as_bytes()).map_err(encoding)?;
    }
    common_fields(&mut message, dialect, original, stan, transmission_time(now))?;
    message.set(90, original_data(original, acquirer)).map_err(encoding)?;
    Ok(message)
}

/// Field 90, original data elements (ISO 8583:1987, n 42): the original's MTI, STAN and
/// transmission date-time, its acquiring institution ID (field 32, eleven digits) and the
/// forwarding institution's (not used here: zeros).
fn original_data(original: &Original, acquirer: [u8; 11]) -> Vec<u8> {
    let mut data = Vec::with_capacity(42);
    data.extend_from_slice(&original.mti);
    data.extend_from_slice(&stan_text(original.stan));
    data.extend_from_slice(&original.transmitted);
    data.extend_from_slice(&acquirer);
    data.extend_from_slice(&[b'0'; 11]);
    data
}

/// Processing code (field 3) of a refund: `20` (refund, "returns"), default accounts.
pub const REFUND_PROCESSING_CODE: &[u8; 6] = b"200000";
/// Field 39 of a void's 0400/0420: `17`, customer cancellation (a reversal of a timeout
/// carries none, as before).
pub const VOID_REASON_CODE: &[u8; 2] = b"17";

/// The message carrying lifecycle `operation` on `original` (approved with `auth_code`)
/// under its own `stan`, the MTI its answer must have, and its identifiers as sent:
///
/// - capture: the dialect's `capture_mti` (0220 advice, or 0200), amount captured, field 38;
/// - void: 0400 (or 0420), the amount authorized, field 38, field 39 `17`;
/// - refund: 0200 with processing code `200000`, amount refunded, field 38;
/// - reversal: exactly the reversal of a timeout (0400 or 0420).
///
/// Each carries field 90 naming the original (with `acquirer`) and the original's RRN. A
/// capture or refund carries its own local time (fields 12/13, when configured); a void or
/// reversal the original's.
#[allow(clippy::too_many_arguments)]
pub(crate) fn lifecycle_message(
    dialect: &Dialect,
    operation: Operation,
    original: &Original,
    auth_code: Option<AuthCode>,
    acquirer: [u8; 11],
    stan: u32,
    pan: Option<&str>,
    now: SystemTime,
) -> Result<(Message, [u8; 4], NetworkReference), AdapterError> {
    let mut at_now = original.clone();
    let (mti, expect, amount) = match operation {
        Operation::Capture { amount_minor } => {
            let (mti, expect) = dialect.capture_mtis();
            (mti, expect, Some(amount_minor))
        }
        Operation::Refund { amount_minor } => (*b"0200", *b"0210", Some(amount_minor)),
        Operation::Void | Operation::Reversal => {
            (dialect.reversal_request_mti(false), dialect.reversal_response_mti(), None)
        }
    };
    if let Some(amount_minor) = amount {
        at_now.amount = digits(amount_minor);
        at_now.local = dialect.local_time(now);
    }
    let mut message = referring_message(dialect, mti, &at_now, stan, pan, now, acquirer)?;
    if operation != Operation::Reversal {
        if let Some(AuthCode(code)) = auth_code {
            message.set(38, code).map_err(encoding)?;
        }
    }
    match operation {
        Operation::Refund { .. } => message.set(3, *REFUND_PROCESSING_CODE).map_err(encoding)?,
        Operation::Void => message.set(39, *VOID_REASON_CODE).map_err(encoding)?,
        Operation::Capture { .. } | Operation::Reversal => {}
    }
    let sent = NetworkReference {
        mti,
        stan,
        rrn: original.rrn,
        transmitted: transmission_time(now),
        local: at_now.local,
        acquirer,
    };
    Ok((message, expect, sent))
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
        assert_eq!(reply_outcome(&reply), Ok(Ok(AuthAnswer::Approved(AuthCode(*b"AB012C")))));
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
