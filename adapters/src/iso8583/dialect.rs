//! The dialect: what an acquirer's host expects beyond the 1987 defaults, as configured
//! (`docs/ADAPTERS.md`, "Dialect"). The config types here are parts of [`Iso8583Config`];
//! [`Dialect`] is their checked, compiled form, which `mapping` builds messages with.
//!
//! With none of these keys set, the dialect is the adapter's original one and every message is
//! byte for byte what it was (the `golden` tests pin it).
//!
//! [`Iso8583Config`]: super::Iso8583Config

use std::collections::{BTreeMap, HashMap};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use super::codec::{field_spec, Encoding, FieldSpec, LenKind, SENSITIVE_FIELDS};
use super::config::{Iso8583Config, MessageClass};
use super::mapping::{self, ReplyMapping, RESPONSE_CODES, TERMINAL_ID_LEN};
use crate::DeclineReason;

/// Longest settlegate terminal ID (the engine's `TERMINAL_ID_LEN_MAX`).
pub const TERMINAL_ID_FULL_LEN_MAX: usize = 16;
const MERCHANT_ID_LEN: usize = 15;

/// Fields the adapter itself fills (card data, amounts, identifiers it allocates, response
/// fields and the network and reversal data): a `fields` entry may not name them.
pub const ADAPTER_OWNED_FIELDS: [u8; 10] = [2, 4, 7, 11, 37, 38, 39, 49, 70, 90];

/// Where a configured field's value comes from.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum FieldSource {
    /// The entry's `value`, as written.
    Constant,
    /// The config's `merchant_id` (what field 42 carries by default).
    MerchantId,
    /// The terminal ID as field 41 carries it: 8 characters, mapped (`terminal_ids`,
    /// `long_terminal_ids`).
    TerminalId,
    /// The settlegate terminal ID as the engine sent it, unmapped (up to 16 characters).
    TerminalIdFull,
    /// The transaction's local time `hhmmss` (field 12), at `local_time_offset_minutes`.
    LocalTime,
    /// The transaction's local date `MMDD` (field 13), at `local_time_offset_minutes`.
    LocalDate,
    /// Not sent: removes one of the default fields (3, 41 or 42).
    Omit,
}

/// How a value is fitted to a fixed-length field.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Padding {
    /// Left-aligned, spaces on the right (the default for fixed fields; fields 41 and 42).
    SpacesRight,
    /// Right-aligned, spaces on the left.
    SpacesLeft,
    /// Right-aligned, zeros on the left (numeric fields).
    ZerosLeft,
    /// None: the value must have the field's length (always so for variable-length fields).
    None,
}

/// One entry of the `fields` table.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct FieldConfig {
    /// The data element, 2..=128; not one of [`ADAPTER_OWNED_FIELDS`].
    pub field: u8,
    /// Where its value comes from.
    pub source: FieldSource,
    /// The value of a `constant`; must be absent for other sources.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<String>,
    /// Padding of a fixed-length field (default `spaces_right`); variable-length fields are
    /// never padded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pad: Option<Padding>,
}

/// What field 41 carries for a terminal ID longer than its 8 characters that
/// `terminal_ids` does not map.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum LongTerminalIds {
    /// Refused: [`AdapterError::Config`](crate::AdapterError::Config), which the engine answers with reason 31 (the
    /// original behaviour).
    #[default]
    Decline,
    /// An 8-character ID derived from the full one ([`derived_terminal_id`]).
    Derive,
}

/// How the retrieval reference number (field 37, 12 characters) is made.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum RrnFormat {
    /// A 12-digit counter started from the wall clock in milliseconds (the original).
    #[default]
    Counter,
    /// `YDDDhh` (last digit of the year, day of the year, hour; at
    /// `local_time_offset_minutes`) followed by the six-digit STAN.
    YdddhhStan,
}

/// The message type of reversals.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
pub enum ReversalMti {
    /// `0400` reversal request, `0401` repeats, answered `0410` (the original).
    #[default]
    #[serde(rename = "0400")]
    Request,
    /// `0420` reversal advice, `0421` repeats, answered `0430`.
    #[serde(rename = "0420")]
    Advice,
}

/// The message type of captures (completions of an authorization).
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
pub enum CaptureMti {
    /// `0220` financial transaction advice, answered `0230` (the default).
    #[default]
    #[serde(rename = "0220")]
    Advice,
    /// `0200` financial transaction request, answered `0210`.
    #[serde(rename = "0200")]
    Request,
}

/// What a response code means, as `response_codes` writes it.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum ResponseOutcome {
    /// Approved (field 38 required).
    Approve,
    /// Declined, insufficient funds (settlegate reason 20).
    InsufficientFunds,
    /// Declined, do not honor (21).
    DoNotHonor,
    /// Declined, over a limit (22).
    LimitExceeded,
    /// Declined, invalid card or account (23).
    InvalidAccount,
    /// A timeout further on (30).
    Timeout,
    /// The host could not process it (31).
    Unavailable,
}

impl ResponseOutcome {
    fn mapping(self) -> ReplyMapping {
        match self {
            ResponseOutcome::Approve => ReplyMapping::Approve,
            ResponseOutcome::InsufficientFunds => {
                ReplyMapping::Decline(DeclineReason::InsufficientFunds)
            }
            ResponseOutcome::DoNotHonor => ReplyMapping::Decline(DeclineReason::DoNotHonor),
            ResponseOutcome::LimitExceeded => ReplyMapping::Decline(DeclineReason::LimitExceeded),
            ResponseOutcome::InvalidAccount => ReplyMapping::Decline(DeclineReason::InvalidAccount),
            ResponseOutcome::Timeout => ReplyMapping::Timeout,
            ResponseOutcome::Unavailable => ReplyMapping::Unavailable,
        }
    }
}

/// The 8-character field 41 ID derived from a longer terminal ID: FNV-1a (64 bits) of its
/// bytes, modulo 36⁸, written as eight base-36 digits `0-9A-Z` (zero-padded). Documented in
/// `docs/ADAPTERS.md` so that an acquirer can be given the same IDs.
pub fn derived_terminal_id(terminal_id: &str) -> [u8; TERMINAL_ID_LEN] {
    const BASE36: &[u8; 36] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ";
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in terminal_id.bytes() {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    let mut value = hash % 36u64.pow(TERMINAL_ID_LEN as u32);
    let mut out = [b'0'; TERMINAL_ID_LEN];
    for slot in out.iter_mut().rev() {
        *slot = BASE36[(value % 36) as usize];
        value /= 36;
    }
    out
}

/// A field's value as the message being built has it.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Value {
    /// Already padded to the field.
    Fixed(Vec<u8>),
    /// Computed per message, then padded.
    Dynamic(FieldSource, Padding),
}

/// The per-transaction values the configured sources read.
pub(crate) struct Sources<'a> {
    pub(crate) terminal: &'a [u8; TERMINAL_ID_LEN],
    pub(crate) terminal_full: &'a str,
    /// `MMDDhhmmss` at the local offset.
    pub(crate) local: &'a [u8; 10],
}

/// The STAN (1..=999999) of engine dispatch `dispatch_id` (its shard in the top 8 bits, its
/// sequence number below): the shard's sequence number, offset by shard and by half the range
/// so that the adapter's own messages (sign-on, echo tests, lifecycle), numbered from 1, meet
/// it rarely. An authorization whose STAN is in flight on the link is refused unsent.
pub(crate) fn dispatch_stan(dispatch_id: u64) -> u32 {
    let (shard, seq) = (dispatch_id >> 56, dispatch_id & ((1 << 56) - 1));
    let offset = 500_000 + shard * 131_071;
    (1 + (seq.wrapping_add(offset) % 999_999)) as u32
}

/// The `counter` RRN of engine dispatch `dispatch_id`: its shard (three digits) then its
/// sequence number (nine digits, modulo 10^9).
pub(crate) fn dispatch_rrn(dispatch_id: u64) -> [u8; 12] {
    let (shard, seq) = (dispatch_id >> 56, dispatch_id & ((1 << 56) - 1));
    mapping::digits(shard % 1_000 * 1_000_000_000 + seq % 1_000_000_000)
}

/// The checked, compiled dialect.
#[derive(Debug, Clone)]
pub(crate) struct Dialect {
    pub(crate) class: MessageClass,
    /// Fields besides the adapter's own, ascending: in requests and reversals alike.
    fields: Vec<(u8, Value)>,
    terminal_ids: HashMap<String, [u8; TERMINAL_ID_LEN]>,
    long_terminal_ids: LongTerminalIds,
    pub(crate) rrn_format: RrnFormat,
    pub(crate) reversal_mti: ReversalMti,
    capture_mti: CaptureMti,
    /// Field 32 as field 90 carries it: eleven digits, zero-padded; zeros without one.
    acquirer: [u8; 11],
    local_offset_secs: i64,
    responses: HashMap<[u8; 2], ReplyMapping>,
}

/// Most a config may move local time from UTC, either way (UTC−12:00 to UTC+14:00).
pub const LOCAL_OFFSET_MINUTES: std::ops::RangeInclusive<i32> = -720..=840;

impl Dialect {
    /// Compiles `config`'s dialect keys, naming the first that is wrong.
    pub(crate) fn new(config: &Iso8583Config) -> Result<Dialect, String> {
        if !LOCAL_OFFSET_MINUTES.contains(&config.local_time_offset_minutes) {
            return Err(format!(
                "local_time_offset_minutes must be within -720..=840, got {}",
                config.local_time_offset_minutes
            ));
        }
        let mut table: BTreeMap<u8, Value> = BTreeMap::new();
        table.insert(3, Value::Fixed(config.processing_code.as_bytes().to_vec()));
        table.insert(41, Value::Dynamic(FieldSource::TerminalId, Padding::SpacesRight));
        let merchant: [u8; MERCHANT_ID_LEN] = mapping::pad(config.merchant_id.as_bytes());
        table.insert(42, Value::Fixed(merchant.to_vec()));
        let mut seen = Vec::new();
        for entry in &config.fields {
            let at = format!("fields: field {}", entry.field);
            if seen.contains(&entry.field) {
                return Err(format!("{at} is listed twice"));
            }
            seen.push(entry.field);
            match compile_field(entry, config) {
                Ok(None) => table.remove(&entry.field),
                Ok(Some(value)) => table.insert(entry.field, value),
                Err(error) => return Err(format!("{at}: {error}")),
            };
        }
        let mut terminal_ids = HashMap::new();
        let mut assigned: HashMap<[u8; TERMINAL_ID_LEN], &str> = HashMap::new();
        for (full, short) in &config.terminal_ids {
            let printable = |s: &str| s.bytes().all(|b| (0x21..=0x7e).contains(&b));
            if full.is_empty() || full.len() > TERMINAL_ID_FULL_LEN_MAX || !printable(full) {
                return Err(format!(
                    "terminal_ids: {full:?} is not a settlegate terminal ID (1 to 16 printable \
                     ASCII characters)"
                ));
            }
            if short.is_empty() || short.len() > TERMINAL_ID_LEN || !printable(short) {
                return Err(format!(
                    "terminal_ids.{full:?} = {short:?}: field 41 holds 1 to 8 printable ASCII \
                     characters"
                ));
            }
            let padded = mapping::pad(short.as_bytes());
            if let Some(other) = assigned.insert(padded, full) {
                return Err(format!(
                    "terminal_ids: {other:?} and {full:?} both map to {short:?}; the host could \
                     not tell them apart"
                ));
            }
            terminal_ids.insert(full.clone(), padded);
        }
        let mut responses: HashMap<[u8; 2], ReplyMapping> = RESPONSE_CODES
            .iter()
            .map(|(code, mapping)| {
                (code_key(code).expect("the built-in codes are valid"), *mapping)
            })
            .collect();
        for (code, outcome) in &config.response_codes {
            let Some(key) = code_key(code) else {
                return Err(format!(
                    "response_codes: {code:?} is not a response code (two letters or digits)"
                ));
            };
            responses.insert(key, outcome.mapping());
        }
        let acquirer = match table.get(&32) {
            Some(Value::Fixed(id)) if id.len() <= 11 && id.iter().all(u8::is_ascii_digit) => {
                let mut padded = [b'0'; 11];
                padded[11 - id.len()..].copy_from_slice(id);
                padded
            }
            _ => [b'0'; 11],
        };
        Ok(Dialect {
            class: config.message_class,
            fields: table.into_iter().collect(),
            terminal_ids,
            long_terminal_ids: config.long_terminal_ids,
            rrn_format: config.rrn_format,
            reversal_mti: config.reversal_mti,
            capture_mti: config.capture_mti,
            acquirer,
            local_offset_secs: i64::from(config.local_time_offset_minutes) * 60,
            responses,
        })
    }

    /// What field 41 carries for `terminal_id`, or why it cannot be sent.
    pub(crate) fn terminal(&self, terminal_id: &str) -> Result<[u8; TERMINAL_ID_LEN], String> {
        if let Some(mapped) = self.terminal_ids.get(terminal_id) {
            return Ok(*mapped);
        }
        if terminal_id.is_empty() || !terminal_id.bytes().all(|b| (0x20..=0x7e).contains(&b)) {
            return Err(format!(
                "iso8583: terminal ID {terminal_id:?} is not printable ASCII for field 41"
            ));
        }
        if terminal_id.len() <= TERMINAL_ID_LEN {
            return Ok(mapping::pad(terminal_id.as_bytes()));
        }
        match self.long_terminal_ids {
            LongTerminalIds::Derive if terminal_id.len() <= TERMINAL_ID_FULL_LEN_MAX => {
                Ok(derived_terminal_id(terminal_id))
            }
            _ => Err(format!(
                "iso8583: terminal ID {terminal_id:?} does not fit field 41 (1 to 8 printable \
                 ASCII); map it in terminal_ids or set long_terminal_ids = \"derive\""
            )),
        }
    }

    /// The mapping of response code `code`; a code not in the table is a do-not-honor.
    pub(crate) fn response(&self, code: &str) -> ReplyMapping {
        code_key(code)
            .and_then(|key| self.responses.get(&key).copied())
            .unwrap_or(ReplyMapping::Decline(DeclineReason::DoNotHonor))
    }

    /// `MMDDhhmmss` at the configured local offset.
    pub(crate) fn local_time(&self, now: SystemTime) -> [u8; 10] {
        mapping::transmission_time(self.shift(now))
    }

    fn shift(&self, now: SystemTime) -> SystemTime {
        let offset = std::time::Duration::from_secs(self.local_offset_secs.unsigned_abs());
        if self.local_offset_secs >= 0 {
            now + offset
        } else {
            now.checked_sub(offset).unwrap_or(UNIX_EPOCH)
        }
    }

    /// The RRN of an authorization sent now under `stan`, in the `ydddhh_stan` format.
    pub(crate) fn rrn_ydddhh_stan(&self, now: SystemTime, stan: u32) -> [u8; 12] {
        let secs = self.shift(now).duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
        let days = (secs / 86_400) as i64;
        let (year, _, _) = mapping::civil_from_days(days);
        let year_start = mapping::days_from_civil(year, 1, 1);
        let day_of_year = (days - year_start + 1) as u64;
        let mut out = [0u8; 12];
        out[..1].copy_from_slice(&mapping::digits::<1>(year.rem_euclid(10) as u64));
        out[1..4].copy_from_slice(&mapping::digits::<3>(day_of_year));
        out[4..6].copy_from_slice(&mapping::digits::<2>(secs % 86_400 / 3_600));
        out[6..].copy_from_slice(&mapping::stan_text(stan));
        out
    }

    /// The reversal MTI: the first attempt, or a repeat.
    pub(crate) fn reversal_request_mti(&self, repeat: bool) -> [u8; 4] {
        match (self.reversal_mti, repeat) {
            (ReversalMti::Request, false) => *b"0400",
            (ReversalMti::Request, true) => *b"0401",
            (ReversalMti::Advice, false) => *b"0420",
            (ReversalMti::Advice, true) => *b"0421",
        }
    }

    /// The MTI that acknowledges a reversal.
    pub(crate) fn reversal_response_mti(&self) -> [u8; 4] {
        match self.reversal_mti {
            ReversalMti::Request => *b"0410",
            ReversalMti::Advice => *b"0430",
        }
    }

    /// The MTI of a capture and of its answer.
    pub(crate) fn capture_mtis(&self) -> ([u8; 4], [u8; 4]) {
        match self.capture_mti {
            CaptureMti::Advice => (*b"0220", *b"0230"),
            CaptureMti::Request => (*b"0200", *b"0210"),
        }
    }

    /// The identifiers of the authorization of engine dispatch `dispatch_id` made at `at_ms`
    /// (ms since the epoch): its MTI, STAN ([`dispatch_stan`]), RRN (`counter`: the dispatch's
    /// shard and sequence number, [`dispatch_rrn`]; `ydddhh_stan`: from `at_ms` and the STAN),
    /// and fields 7 and 12/13 from `at_ms`. A function of the engine's log alone: the engine
    /// rebuilds them to reverse an authorization a crash left unanswered.
    pub(crate) fn assigned(&self, dispatch_id: u64, at_ms: i64) -> crate::NetworkReference {
        let at = UNIX_EPOCH + std::time::Duration::from_millis(at_ms.max(0).unsigned_abs());
        let stan = dispatch_stan(dispatch_id);
        let rrn = match self.rrn_format {
            RrnFormat::Counter => dispatch_rrn(dispatch_id),
            RrnFormat::YdddhhStan => self.rrn_ydddhh_stan(at, stan),
        };
        crate::NetworkReference {
            mti: self.class.request_mti(),
            stan,
            rrn,
            transmitted: mapping::transmission_time(at),
            local: self.local_time(at),
            acquirer: self.acquirer,
        }
    }

    /// The acquiring institution ID that field 90 carries: field 32's constant, when it is one
    /// of 1 to 11 digits, zero-padded on the left to eleven; otherwise eleven zeros.
    pub(crate) fn acquirer(&self) -> [u8; 11] {
        self.acquirer
    }

    /// The configured fields' values for one message, ascending by field number.
    pub(crate) fn field_values<'s>(
        &'s self,
        sources: &'s Sources<'_>,
    ) -> impl Iterator<Item = (u8, Result<Vec<u8>, String>)> + 's {
        self.fields.iter().map(move |(number, value)| {
            let bytes = match value {
                Value::Fixed(bytes) => Ok(bytes.clone()),
                Value::Dynamic(source, padding) => {
                    let raw: &[u8] = match source {
                        FieldSource::TerminalId => sources.terminal,
                        FieldSource::TerminalIdFull => sources.terminal_full.as_bytes(),
                        FieldSource::LocalTime => &sources.local[4..],
                        FieldSource::LocalDate => &sources.local[..4],
                        // Compiled to fixed values, or removed.
                        FieldSource::Constant | FieldSource::MerchantId | FieldSource::Omit => &[],
                    };
                    let spec = field_spec(*number).expect("checked when compiled");
                    fit(raw, spec, *padding)
                }
            };
            (*number, bytes)
        })
    }
}

fn code_key(code: &str) -> Option<[u8; 2]> {
    let bytes: [u8; 2] = code.as_bytes().try_into().ok()?;
    bytes.iter().all(u8::is_ascii_alphanumeric).then_some(bytes)
}

/// The longest value a source can produce.
fn source_len_max(source: FieldSource, config: &Iso8583Config) -> usize {
    match source {
        FieldSource::TerminalId => TERMINAL_ID_LEN,
        FieldSource::TerminalIdFull => TERMINAL_ID_FULL_LEN_MAX,
        FieldSource::LocalTime => 6,
        FieldSource::LocalDate => 4,
        FieldSource::MerchantId => config.merchant_id.len(),
        FieldSource::Constant | FieldSource::Omit => 0,
    }
}

/// One `fields` entry, checked: `None` to remove the field.
fn compile_field(entry: &FieldConfig, config: &Iso8583Config) -> Result<Option<Value>, String> {
    let Some(spec) = field_spec(entry.field) else {
        return Err("not a data element (2..=128)".into());
    };
    if ADAPTER_OWNED_FIELDS.contains(&entry.field) {
        return Err(format!("{} is filled by the adapter and cannot be configured", spec.name));
    }
    if SENSITIVE_FIELDS.contains(&entry.field) {
        return Err(format!("{} is card data and cannot be configured", spec.name));
    }
    if spec.encoding == Encoding::Binary {
        return Err(format!("{} is binary; only text fields can be configured", spec.name));
    }
    let fixed = spec.kind == LenKind::Fixed;
    let padding = match (entry.pad, fixed) {
        (Some(Padding::None) | None, false) => Padding::None,
        (Some(pad), false) => {
            return Err(format!("pad = {pad:?} applies to fixed-length fields only"));
        }
        (Some(pad), true) => pad,
        (None, true) => Padding::SpacesRight,
    };
    match (entry.source, &entry.value) {
        (FieldSource::Constant, None) => return Err("source = \"constant\" needs a value".into()),
        (FieldSource::Constant, Some(_)) => {}
        (source, Some(_)) => {
            return Err(format!("value is only for source = \"constant\", not {source:?}"));
        }
        (_, None) => {}
    }
    if entry.source == FieldSource::Omit {
        return if entry.pad.is_some() {
            Err("pad has no meaning when omitted".into())
        } else {
            Ok(None)
        };
    }
    let constant = match entry.source {
        FieldSource::Constant => entry.value.clone(),
        FieldSource::MerchantId => Some(config.merchant_id.clone()),
        _ => None,
    };
    if let Some(text) = constant {
        return fit(text.as_bytes(), spec, padding).map(|bytes| Some(Value::Fixed(bytes)));
    }
    let longest = source_len_max(entry.source, config);
    let room = usize::from(spec.len_max);
    if longest > room {
        return Err(format!(
            "{:?} values run to {longest} characters; {} holds {room}",
            entry.source, spec.name
        ));
    }
    if padding == Padding::None && fixed && longest != room {
        return Err(format!(
            "{:?} values are not always {room} characters: {} needs a pad",
            entry.source, spec.name
        ));
    }
    Ok(Some(Value::Dynamic(entry.source, padding)))
}

/// `raw` fitted to `spec` with `padding`: printable ASCII, exactly the length of a fixed field.
fn fit(raw: &[u8], spec: &FieldSpec, padding: Padding) -> Result<Vec<u8>, String> {
    if !raw.iter().all(|b| (0x20..=0x7e).contains(b)) {
        return Err("value is not printable ASCII".into());
    }
    let room = usize::from(spec.len_max);
    if raw.len() > room {
        return Err(format!("value of {} characters; {} holds {room}", raw.len(), spec.name));
    }
    if spec.kind != LenKind::Fixed || raw.len() == room {
        return Ok(raw.to_vec());
    }
    let fill = vec![if padding == Padding::ZerosLeft { b'0' } else { b' ' }; room - raw.len()];
    match padding {
        Padding::SpacesRight => Ok([raw, &fill].concat()),
        Padding::SpacesLeft | Padding::ZerosLeft => Ok([&fill, raw].concat()),
        Padding::None => Err(format!(
            "value of {} characters; {} is exactly {room} (or set a pad)",
            raw.len(),
            spec.name
        )),
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    use crate::iso8583::config::valid as base;

    fn with(toml_keys: &str) -> Result<Dialect, String> {
        let text =
            format!("host_addr = \"127.0.0.1:8583\"\nmerchant_id = \"MERCHANT01\"\n{toml_keys}");
        let config: Iso8583Config = toml::from_str(&text).map_err(|e| e.to_string())?;
        config.validate().map_err(|e| e.to_string())?;
        Dialect::new(&config)
    }

    fn entry(
        field: u8,
        source: FieldSource,
        value: Option<&str>,
        pad: Option<Padding>,
    ) -> FieldConfig {
        FieldConfig { field, source, value: value.map(str::to_owned), pad }
    }

    #[test]
    fn each_bad_dialect_key_is_a_clear_error() {
        let cases: [(&str, &[&str]); 17] = [
            ("fields = [{ field = 200, source = \"constant\", value = \"1\" }]", &["field 200", "not a data element"]),
            ("fields = [{ field = 1, source = \"constant\", value = \"1\" }]", &["field 1", "not a data element"]),
            ("fields = [{ field = 11, source = \"constant\", value = \"000001\" }]", &["field 11", "filled by the adapter"]),
            ("fields = [{ field = 64, source = \"constant\", value = \"x\" }]", &["field 64", "binary"]),
            ("fields = [{ field = 35, source = \"constant\", value = \"x\" }]", &["field 35", "card data"]),
            ("fields = [{ field = 18, source = \"constant\", value = \"5411\", pad = \"zeroes\" }]", &["unknown variant `zeroes`", "zeros_left"]),
            ("fields = [{ field = 18, source = \"constant\", value = \"54111\" }]", &["field 18", "holds 4"]),
            ("fields = [{ field = 22, source = \"constant\", value = \"51\", pad = \"none\" }]", &["field 22", "exactly 3"]),
            ("fields = [{ field = 48, source = \"constant\", value = \"x\", pad = \"spaces_left\" }]", &["field 48", "fixed-length fields only"]),
            ("fields = [{ field = 42, source = \"terminal_id_full\" }]", &["field 42", "16 characters", "holds 15"]),
            ("fields = [{ field = 18, source = \"constant\" }]", &["field 18", "needs a value"]),
            ("fields = [{ field = 18, source = \"merchant_id\", value = \"x\" }]", &["field 18", "only for source = \"constant\""]),
            ("fields = [{ field = 18, source = \"constant\", value = \"1\" }, { field = 18, source = \"omit\" }]", &["field 18 is listed twice"]),
            ("rrn_format = \"julian\"", &["unknown variant `julian`", "ydddhh_stan"]),
            ("response_codes = { \"85\" = \"approved\" }", &["unknown variant `approved`", "approve"]),
            ("response_codes = { \"855\" = \"approve\" }", &["response_codes", "\"855\""]),
            ("terminal_ids = { \"STORE-0001-TILL1\" = \"T1\", \"STORE-0001-TILL2\" = \"T1\" }", &["both map to \"T1\""]),
        ];
        for (keys, expected) in cases {
            let error = with(keys).err().unwrap_or_else(|| panic!("{keys}: accepted"));
            for part in expected {
                assert!(error.contains(part), "{keys}: {error:?} lacks {part:?}");
            }
        }
        let error = with("local_time_offset_minutes = 900").expect_err("out of range");
        assert!(error.contains("local_time_offset_minutes"), "{error}");
        let error = with("terminal_ids = { \"T\" = \"TOO-LONG-9\" }").expect_err("too long");
        assert!(error.contains("1 to 8"), "{error}");
        let error = with("reversal_mti = \"0401\"").expect_err("not a choice");
        assert!(error.contains("0420"), "{error}");
    }

    #[test]
    fn constants_are_padded_and_sources_filled_per_message() {
        let config = Iso8583Config {
            fields: vec![
                entry(18, FieldSource::Constant, Some("5411"), None),
                entry(22, FieldSource::Constant, Some("51"), Some(Padding::ZerosLeft)),
                entry(25, FieldSource::Constant, Some("0"), Some(Padding::SpacesLeft)),
                entry(32, FieldSource::Constant, Some("123456"), None),
                entry(43, FieldSource::Constant, Some("SETTLEGATE SHOP"), None),
                entry(12, FieldSource::LocalTime, None, None),
                entry(13, FieldSource::LocalDate, None, None),
                entry(48, FieldSource::TerminalIdFull, None, None),
                entry(3, FieldSource::Omit, None, None),
                entry(42, FieldSource::Constant, Some("MID-OVERRIDE"), None),
            ],
            ..base()
        };
        let dialect = Dialect::new(&config).unwrap();
        let sources = Sources {
            terminal: b"TID00001",
            terminal_full: "STORE-0042-TILL3",
            local: b"0229220509",
        };
        let values: Vec<(u8, String)> = dialect
            .field_values(&sources)
            .map(|(n, v)| (n, String::from_utf8(v.unwrap()).unwrap()))
            .collect();
        let expected = [
            (12, "220509".to_owned()),
            (13, "0229".to_owned()),
            (18, "5411".to_owned()),
            (22, "051".to_owned()),
            (25, " 0".to_owned()),
            (32, "123456".to_owned()),
            (41, "TID00001".to_owned()),
            (42, "MID-OVERRIDE   ".to_owned()),
            (43, format!("{:<40}", "SETTLEGATE SHOP")),
            (48, "STORE-0042-TILL3".to_owned()),
        ];
        assert_eq!(values, expected, "field 3 omitted, the rest ascending");
    }

    #[test]
    fn field_41_is_mapped_then_kept_then_derived_or_refused() {
        let mut config = base();
        config.terminal_ids.insert("STORE-0001-TILL1".into(), "S1T1".into());
        config.terminal_ids.insert("SHORT".into(), "ACQ00007".into());
        let refusing = Dialect::new(&config).unwrap();
        assert_eq!(&refusing.terminal("STORE-0001-TILL1").unwrap(), b"S1T1    ");
        assert_eq!(
            &refusing.terminal("SHORT").unwrap(),
            b"ACQ00007",
            "the map wins for any length"
        );
        assert_eq!(&refusing.terminal("TERM01").unwrap(), b"TERM01  ");
        let error = refusing.terminal("STORE-0042-TILL3").unwrap_err();
        assert!(error.contains("terminal_ids") && error.contains("derive"), "{error}");

        config.long_terminal_ids = LongTerminalIds::Derive;
        let deriving = Dialect::new(&config).unwrap();
        // Computed independently (Python, FNV-1a 64, mod 36^8, base 36).
        assert_eq!(&deriving.terminal("STORE-0042-TILL3").unwrap(), b"CVGX8JBM");
        assert_eq!(&derived_terminal_id("LONGTERMINAL0001"), b"0K4IF79O");
        assert_eq!(&deriving.terminal("STORE-0001-TILL1").unwrap(), b"S1T1    ");
        assert_eq!(&deriving.terminal("TERM01").unwrap(), b"TERM01  ", "short IDs unchanged");
        assert!(deriving.terminal("T\u{7f}").is_err());
    }

    #[test]
    fn rrn_ydddhh_stan_uses_the_local_offset() {
        // 2024-02-29T13:05:09Z: day 60 of 2024; at UTC+9 it is 22:05.
        let now = UNIX_EPOCH + Duration::from_secs(1_709_211_909);
        let utc = Dialect::new(&Iso8583Config { rrn_format: RrnFormat::YdddhhStan, ..base() });
        assert_eq!(&utc.unwrap().rrn_ydddhh_stan(now, 42), b"406013000042");
        let tokyo = Iso8583Config { local_time_offset_minutes: 540, ..base() };
        let tokyo = Dialect::new(&tokyo).unwrap();
        assert_eq!(&tokyo.rrn_ydddhh_stan(now, 999_999), b"406022999999");
        assert_eq!(&tokyo.local_time(now), b"0229220509");
        // 2023-12-31T23:30Z at UTC+1 is day 1 of 2024.
        let new_year = UNIX_EPOCH + Duration::from_secs(1_704_065_400);
        let paris = Dialect::new(&Iso8583Config { local_time_offset_minutes: 60, ..base() });
        assert_eq!(&paris.unwrap().rrn_ydddhh_stan(new_year, 1), b"400100000001");
        let west = Dialect::new(&Iso8583Config { local_time_offset_minutes: -60, ..base() });
        assert_eq!(&west.unwrap().rrn_ydddhh_stan(new_year, 1), b"336522000001");
    }

    #[test]
    fn response_overrides_replace_only_their_codes() {
        let mut config = base();
        config.response_codes.insert("85".into(), ResponseOutcome::Approve);
        config.response_codes.insert("55".into(), ResponseOutcome::InvalidAccount);
        config.response_codes.insert("94".into(), ResponseOutcome::Unavailable);
        config.response_codes.insert("51".into(), ResponseOutcome::DoNotHonor);
        let dialect = Dialect::new(&config).unwrap();
        let default = Dialect::new(&base()).unwrap();
        assert_eq!(dialect.response("85"), ReplyMapping::Approve);
        assert_eq!(dialect.response("55"), ReplyMapping::Decline(DeclineReason::InvalidAccount));
        assert_eq!(dialect.response("94"), ReplyMapping::Unavailable);
        assert_eq!(dialect.response("51"), ReplyMapping::Decline(DeclineReason::DoNotHonor));
        assert_eq!(dialect.response("14"), ReplyMapping::Decline(DeclineReason::InvalidAccount));
        for code in ["10", "85", "55", "94", "12", "30"] {
            let expected = ReplyMapping::Decline(DeclineReason::DoNotHonor);
            assert_eq!(default.response(code), expected, "the default table, {code}");
        }
        for (code, mapping) in RESPONSE_CODES {
            assert_eq!(default.response(code), mapping, "{code}");
        }
    }

    #[test]
    fn reversal_advice_uses_0420_0421_and_0430() {
        let advice = Dialect::new(&Iso8583Config { reversal_mti: ReversalMti::Advice, ..base() });
        let advice = advice.unwrap();
        assert_eq!(
            (advice.reversal_request_mti(false), advice.reversal_request_mti(true)),
            (*b"0420", *b"0421")
        );
        assert_eq!(advice.reversal_response_mti(), *b"0430");
        let default = Dialect::new(&base()).unwrap();
        assert_eq!(default.reversal_request_mti(true), *b"0401");
        assert_eq!(default.reversal_response_mti(), *b"0410");
    }
}
