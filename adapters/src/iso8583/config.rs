//! The `kind = "iso8583"` adapter config: serde defaults and validation.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::dialect::{
    CaptureMti, Dialect, FieldConfig, LongTerminalIds, ResponseOutcome, ReversalMti, RrnFormat,
};
use super::tls::TlsConfig;
use crate::AdapterError;

/// Most authorizations in flight on the one connection that a config may ask for.
pub const IN_FLIGHT_LIMIT: u32 = 100_000;
/// Most reversals a config may let wait for a connection (store and forward).
pub const REVERSAL_QUEUE_LIMIT: u32 = 100_000;
/// Longest timeout or interval a config may set (ten minutes).
pub const DURATION_MS_LIMIT: u64 = 600_000;
/// Highest System Trace Audit Number; STANs run 1..=999999 and wrap.
pub const STAN_MAX: u32 = 999_999;

// Every in-flight message holds a STAN: authorizations, reversals (queued ones are sent once
// connected), and at most two network messages. They must never use up the STAN space.
const _: () = assert!(IN_FLIGHT_LIMIT + REVERSAL_QUEUE_LIMIT + 2 < STAN_MAX);

/// Which message class carries an authorization.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum MessageClass {
    /// 0100/0110 authorization request (dual-message: clearing goes separately).
    #[default]
    Authorization,
    /// 0200/0210 financial transaction request (single-message: authorize and settle).
    Financial,
}

impl MessageClass {
    /// The request MTI.
    pub fn request_mti(self) -> [u8; 4] {
        match self {
            MessageClass::Authorization => *b"0100",
            MessageClass::Financial => *b"0200",
        }
    }

    /// The response MTI the host answers with.
    pub fn response_mti(self) -> [u8; 4] {
        match self {
            MessageClass::Authorization => *b"0110",
            MessageClass::Financial => *b"0210",
        }
    }
}

/// An ISO 8583 provider host, as written in the engine's TOML config
/// (`adapter = { kind = "iso8583", host_addr = "10.0.0.5:8583", merchant_id = "..." }`).
///
/// Every field has a default except in effect `host_addr` and `merchant_id`, which
/// [`Iso8583Config::validate`] requires. `docs/ADAPTERS.md` describes each setting.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct Iso8583Config {
    /// The host's `address:port` (an IP address or a resolvable name).
    pub host_addr: String,
    /// Card acceptor identification code (field 42), 1 to 15 printable ASCII characters;
    /// padded with spaces to 15.
    pub merchant_id: String,
    /// Authorization (0100) or financial (0200) requests.
    pub message_class: MessageClass,
    /// Processing code (field 3), six digits; `000000` is a purchase.
    pub processing_code: String,
    /// Longest wait for a TCP connection to the host.
    pub connect_timeout_ms: u64,
    /// Longest wait for the host's answer to any request; an authorization unanswered by then
    /// is reversed (0400) and reported as a timeout. Keep it below the provider's
    /// `limits.timeout_ms` so that the adapter, not the engine's guard, times out first.
    pub response_timeout_ms: u64,
    /// Interval between echo tests (0800, code 301) while the breaker is closed.
    pub echo_interval_ms: u64,
    /// First reconnection delay; doubles per failed attempt up to `backoff_max_ms`.
    pub backoff_initial_ms: u64,
    /// Longest reconnection delay.
    pub backoff_max_ms: u64,
    /// Consecutive failures (connection lost or refused, timeouts, failed echoes) that open
    /// the circuit breaker.
    pub breaker_failures_to_open: u32,
    /// Consecutive successful echoes that close an open breaker.
    pub breaker_echoes_to_close: u32,
    /// Interval between echo probes while the breaker is open.
    pub breaker_probe_interval_ms: u64,
    /// Most authorizations in flight on the connection; past it requests fail as unavailable.
    pub in_flight_max: u32,
    /// Reversal attempts (one 0400, then 0401 repeats) before a reversal is given up and
    /// logged as an error.
    pub reversal_attempts_max: u32,
    /// Most reversals held while the host is unreachable; they are sent after the next sign-on.
    pub reversal_queue_max: u32,
    /// Fields sent besides the adapter's own, or replacing the defaults of 3, 41 and 42
    /// (`docs/ADAPTERS.md`, "Dialect"). Empty: the original 1987 layout.
    pub fields: Vec<FieldConfig>,
    /// Local time's offset from UTC in minutes (-720..=840), for the `local_time` and
    /// `local_date` sources (fields 12, 13) and the `ydddhh_stan` RRN.
    pub local_time_offset_minutes: i32,
    /// Explicit field 41 IDs: settlegate terminal ID to the 1 to 8 character ID the acquirer
    /// assigned. Consulted first, whatever the terminal ID's length.
    pub terminal_ids: BTreeMap<String, String>,
    /// Field 41 for a terminal ID over 8 characters that `terminal_ids` does not map:
    /// `decline` (the default) or `derive`.
    pub long_terminal_ids: LongTerminalIds,
    /// Field 37's format: `counter` (the default) or `ydddhh_stan`.
    pub rrn_format: RrnFormat,
    /// Response codes (field 39) whose meaning differs from the default table, e.g.
    /// `{ "85" = "approve", "55" = "invalid_account" }`.
    pub response_codes: BTreeMap<String, ResponseOutcome>,
    /// Reversals (and voids) as `"0400"` requests (the default) or `"0420"` advices.
    pub reversal_mti: ReversalMti,
    /// Captures as `"0220"` advices (the default) or `"0200"` financial requests.
    pub capture_mti: CaptureMti,
    /// TLS to the host; absent: plain TCP.
    pub tls: Option<TlsConfig>,
}

impl Default for Iso8583Config {
    fn default() -> Self {
        Iso8583Config {
            host_addr: String::new(),
            merchant_id: String::new(),
            message_class: MessageClass::Authorization,
            processing_code: "000000".into(),
            connect_timeout_ms: 2_000,
            response_timeout_ms: 1_500,
            echo_interval_ms: 30_000,
            backoff_initial_ms: 100,
            backoff_max_ms: 10_000,
            breaker_failures_to_open: 3,
            breaker_echoes_to_close: 3,
            breaker_probe_interval_ms: 1_000,
            in_flight_max: 4_096,
            reversal_attempts_max: 3,
            reversal_queue_max: 10_000,
            fields: Vec::new(),
            local_time_offset_minutes: 0,
            terminal_ids: BTreeMap::new(),
            long_terminal_ids: LongTerminalIds::Decline,
            rrn_format: RrnFormat::Counter,
            response_codes: BTreeMap::new(),
            reversal_mti: ReversalMti::Request,
            capture_mti: CaptureMti::Advice,
            tls: None,
        }
    }
}

impl Iso8583Config {
    /// Checks every setting, naming the first one that is wrong.
    pub fn validate(&self) -> Result<(), AdapterError> {
        let fail = |message: String| Err(AdapterError::Config(format!("iso8583: {message}")));
        let port_ok = self.host_addr.rsplit_once(':').is_some_and(|(host, port)| {
            !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p > 0)
        });
        if !port_ok {
            return fail(format!("host_addr must be \"host:port\", got {:?}", self.host_addr));
        }
        let merchant_ok = (1..=15).contains(&self.merchant_id.len())
            && self.merchant_id.bytes().all(|b| (0x20..=0x7e).contains(&b));
        if !merchant_ok {
            return fail(format!(
                "merchant_id must be 1 to 15 printable ASCII characters, got {:?}",
                self.merchant_id
            ));
        }
        if self.processing_code.len() != 6
            || !self.processing_code.bytes().all(|b| b.is_ascii_digit())
        {
            return fail(format!(
                "processing_code must be six digits, got {:?}",
                self.processing_code
            ));
        }
        for (name, value) in [
            ("connect_timeout_ms", self.connect_timeout_ms),
            ("response_timeout_ms", self.response_timeout_ms),
            ("echo_interval_ms", self.echo_interval_ms),
            ("backoff_initial_ms", self.backoff_initial_ms),
            ("backoff_max_ms", self.backoff_max_ms),
            ("breaker_probe_interval_ms", self.breaker_probe_interval_ms),
        ] {
            if !(1..=DURATION_MS_LIMIT).contains(&value) {
                return fail(format!("{name} must be within 1..={DURATION_MS_LIMIT}, got {value}"));
            }
        }
        if self.backoff_initial_ms > self.backoff_max_ms {
            return fail("backoff_initial_ms must not exceed backoff_max_ms".into());
        }
        for (name, value, max) in [
            ("breaker_failures_to_open", self.breaker_failures_to_open, 1_000),
            ("breaker_echoes_to_close", self.breaker_echoes_to_close, 1_000),
            ("in_flight_max", self.in_flight_max, IN_FLIGHT_LIMIT),
            ("reversal_attempts_max", self.reversal_attempts_max, 10),
            ("reversal_queue_max", self.reversal_queue_max, REVERSAL_QUEUE_LIMIT),
        ] {
            if !(1..=max).contains(&value) {
                return fail(format!("{name} must be within 1..={max}, got {value}"));
            }
        }
        self.dialect()?;
        if let Some(tls) = &self.tls {
            tls.connector(&self.host_addr)?;
        }
        Ok(())
    }

    /// The compiled dialect (field table, terminal IDs, RRN, response codes, reversal MTI).
    pub(crate) fn dialect(&self) -> Result<Dialect, AdapterError> {
        Dialect::new(self).map_err(|e| AdapterError::Config(format!("iso8583: {e}")))
    }
}

/// A valid config for the unit tests: a host on loopback, the defaults otherwise.
#[cfg(test)]
pub(crate) fn valid() -> Iso8583Config {
    Iso8583Config {
        host_addr: "127.0.0.1:8583".into(),
        merchant_id: "MERCHANT01".into(),
        ..Iso8583Config::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_need_only_host_and_merchant() {
        assert!(valid().validate().is_ok());
        let err = Iso8583Config::default().validate().unwrap_err().to_string();
        assert!(err.contains("host_addr"), "{err}");
    }

    #[test]
    fn each_bad_setting_is_named() {
        let cases: [(&str, Iso8583Config); 6] = [
            ("host_addr", Iso8583Config { host_addr: "localhost".into(), ..valid() }),
            ("merchant_id", Iso8583Config { merchant_id: "M".repeat(16), ..valid() }),
            ("processing_code", Iso8583Config { processing_code: "00000A".into(), ..valid() }),
            ("response_timeout_ms", Iso8583Config { response_timeout_ms: 0, ..valid() }),
            ("backoff_initial_ms", Iso8583Config { backoff_initial_ms: 20_000, ..valid() }),
            ("in_flight_max", Iso8583Config { in_flight_max: IN_FLIGHT_LIMIT + 1, ..valid() }),
        ];
        for (name, config) in cases {
            let err = config.validate().unwrap_err().to_string();
            assert!(err.contains(name), "{name}: {err}");
        }
    }

    #[test]
    fn toml_uses_defaults_and_refuses_unknown_keys() {
        let config: Iso8583Config = toml::from_str(
            "host_addr = \"h:1\"\nmerchant_id = \"M\"\nmessage_class = \"financial\"",
        )
        .unwrap();
        assert_eq!(config.message_class, MessageClass::Financial);
        assert_eq!(config.response_timeout_ms, 1_500);
        assert!(toml::from_str::<Iso8583Config>("host_adr = \"h:1\"").is_err());
    }
}
