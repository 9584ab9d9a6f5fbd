//! Reconciliation (`docs/RECONCILIATION.md`): what each provider authorized for each merchant,
//! and what became of it (captured, voided, refunded, reversed, expired), per business day in
//! the merchant's time zone, read from a data directory.
//!
//! [`report`] rebuilds every shard from its own snapshot and log as [`crate::replay_shard`]
//! does: in this process, writing nothing (no recovery's log conversion, no rotation, no
//! forwarder, sweeper or server), so that it may run on the data directory of a running server
//! or of a stopped one. The replay keeps a journal of the operations the commands owed and of
//! the providers' answers; what the state holds (the codes, their references
//! and refunds, the operations still owed) supplies what a snapshot took out of the log.

use std::collections::BTreeMap;

use jiff::tz::TimeZone;
use jiff::Timestamp;

use settlegate_adapters::AdapterConfig;

use crate::config::EngineConfig;
use crate::error::EngineError;
use crate::shard::state::{
    Acknowledged, CodeRecord, CodeState, Journaled, Obligation, Owed, Reference, ShardState,
};
use crate::types::Currency;

/// What a report item is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum ItemKind {
    /// An authorization the provider holds (or held).
    Authorization,
    /// A capture of an authorization (a code's redemption).
    Capture,
    /// A void: the whole hold released (`VOID`, or a redemption that captured nothing).
    Void,
    /// A void owed because a code expired unused (the sweeper's).
    Expiry,
    /// A refund of part or all of a capture.
    Refund,
    /// A reversal of an authorization whose answer the engine could not record.
    Reversal,
}

impl ItemKind {
    /// Its name in the CSV.
    pub fn name(self) -> &'static str {
        match self {
            ItemKind::Authorization => "authorization",
            ItemKind::Capture => "capture",
            ItemKind::Void => "void",
            ItemKind::Expiry => "expiry",
            ItemKind::Refund => "refund",
            ItemKind::Reversal => "reversal",
        }
    }
}

/// One row of the item list: an authorization, or one operation on it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReportItem {
    /// What it is.
    pub kind: ItemKind,
    /// The provider's designation code.
    pub provider_code: u32,
    /// The merchant: the store terminal it was made at (an authorization, a void, an expiry, a
    /// reversal) or the one that redeemed the code (a capture, a refund).
    pub merchant: String,
    /// The business day, `YYYY-MM-DD` in [`time_zone`](Self::time_zone).
    pub business_day: String,
    /// The merchant's time zone (IANA name).
    pub time_zone: String,
    /// When it was made (milliseconds since the epoch, UTC).
    pub at_ms: i64,
    /// The authorization's dispatch ID.
    pub dispatch_id: u64,
    /// The payment code's issue number, if the authorization is a code's.
    pub code_number: Option<u64>,
    /// The owed operation's ID (none for an authorization).
    pub operation_id: Option<u64>,
    /// The provider's authorization code (empty if it never answered).
    pub auth_code: String,
    /// Currency.
    pub currency: Currency,
    /// Amount in minor units: authorized, captured, released (void, expiry, reversal) or
    /// refunded.
    pub amount_minor: u64,
    /// An authorization's state: `authorized` (its hold stands), `captured`, `voided`,
    /// `expired` or `reversed`; an operation's: `owed`, `acknowledged`, `refused` or
    /// `answered` (answered before the log's first record: accepted or refused, the data
    /// directory no longer says which).
    pub state: &'static str,
    /// Whether the provider acknowledged it: `yes` or `no` (an authorization: whether it
    /// approved with an authorization code the engine recorded).
    pub provider_ack: &'static str,
    /// When the engine recorded the provider's answer to an operation (milliseconds since the
    /// epoch, UTC); none while it is owed, and for an answer older than the log.
    pub answered_ms: Option<i64>,
    /// A refusal's reason (empty otherwise).
    pub detail: String,
}

/// The counts and totals of one provider, merchant, business day and currency.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SummaryRow {
    /// Per [`ItemKind`] in its order: (count, total in minor units).
    pub by_kind: [(u64, u64); 6],
    /// Operations not acknowledged yet.
    pub owed: u64,
}

/// A reconciliation report.
#[derive(Debug, Clone, Default)]
pub struct Report {
    /// Every item, by time.
    pub items: Vec<ReportItem>,
}

/// The summary's key: provider, merchant, business day, time zone, currency.
pub type SummaryKey = (u32, String, String, String, String);

impl Report {
    /// Only the items of business day `day` (`YYYY-MM-DD`).
    pub fn on_day(mut self, day: &str) -> Report {
        self.items.retain(|item| item.business_day == day);
        self
    }

    /// Only the items of provider `code`.
    pub fn of_provider(mut self, code: u32) -> Report {
        self.items.retain(|item| item.provider_code == code);
        self
    }

    /// The counts and totals per provider, merchant, business day and currency.
    pub fn summary(&self) -> BTreeMap<SummaryKey, SummaryRow> {
        let mut rows: BTreeMap<SummaryKey, SummaryRow> = BTreeMap::new();
        for item in &self.items {
            let key = (
                item.provider_code,
                item.merchant.clone(),
                item.business_day.clone(),
                item.time_zone.clone(),
                item.currency.as_str().to_owned(),
            );
            let row = rows.entry(key).or_default();
            let slot = &mut row.by_kind[item.kind as usize];
            slot.0 += 1;
            slot.1 += item.amount_minor;
            if item.state == "owed" {
                row.owed += 1;
            }
        }
        rows
    }

    /// The summary as CSV, with its header (`docs/RECONCILIATION.md`).
    pub fn summary_csv(&self) -> String {
        csv(SUMMARY_HEADER, self.summary_lines())
    }

    /// The item list as CSV, with its header (`docs/RECONCILIATION.md`).
    pub fn items_csv(&self) -> String {
        csv(ITEMS_HEADER, self.items_lines())
    }

    /// The summary's lines, without the header or line ends (a field may hold a quoted line
    /// break).
    pub fn summary_lines(&self) -> Vec<String> {
        let mut lines = Vec::new();
        for ((provider, merchant, day, zone, currency), row) in self.summary() {
            let [authorized, captured, voided, expired, refunded, reversed] = row.by_kind;
            let mut fields =
                vec![provider.to_string(), csv_field(&merchant), day, csv_field(&zone), currency];
            for (count, total) in [authorized, captured, voided, refunded, reversed, expired] {
                fields.push(count.to_string());
                fields.push(total.to_string());
            }
            fields.push(row.owed.to_string());
            lines.push(fields.join(","));
        }
        lines
    }

    /// The item list's lines, without the header or line ends.
    pub fn items_lines(&self) -> Vec<String> {
        let mut lines = Vec::with_capacity(self.items.len());
        for item in &self.items {
            let fields = [
                item.kind.name().to_owned(),
                item.provider_code.to_string(),
                csv_field(&item.merchant),
                item.business_day.clone(),
                csv_field(&item.time_zone),
                utc_text(item.at_ms),
                item.dispatch_id.to_string(),
                item.code_number.map(|n| n.to_string()).unwrap_or_default(),
                item.operation_id.map(|n| n.to_string()).unwrap_or_default(),
                csv_field(&item.auth_code),
                item.currency.as_str().to_owned(),
                item.amount_minor.to_string(),
                item.state.to_owned(),
                item.provider_ack.to_owned(),
                item.answered_ms.map(utc_text).unwrap_or_default(),
                csv_field(&item.detail),
            ];
            lines.push(fields.join(","));
        }
        lines
    }
}

/// A CSV file: `header`, then `lines`, each ended by a line feed.
fn csv(header: &str, lines: Vec<String>) -> String {
    let mut out = String::from(header);
    out.push('\n');
    for line in lines {
        out.push_str(&line);
        out.push('\n');
    }
    out
}

/// The summary section's header.
pub const SUMMARY_HEADER: &str = "provider,merchant,business_day,time_zone,currency,\
authorized_count,authorized_minor,captured_count,captured_minor,voided_count,voided_minor,\
refunded_count,refunded_minor,reversed_count,reversed_minor,expired_count,expired_minor,owed_count";

/// The item list's header.
pub const ITEMS_HEADER: &str = "kind,provider,merchant,business_day,time_zone,at_utc,dispatch_id,\
code_number,operation_id,auth_code,currency,amount_minor,state,provider_ack,answered_utc,detail";

/// Whether `day` is a date as the report writes business days (`YYYY-MM-DD`).
pub fn valid_day(day: &str) -> bool {
    settlegate_types::limits::business_day_valid(day)
}

/// A text field quoted when it must be (RFC 4180).
fn csv_field(text: &str) -> String {
    if text.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", text.replace('"', "\"\""))
    } else {
        text.to_owned()
    }
}

fn utc_text(at_ms: i64) -> String {
    Timestamp::from_millisecond(at_ms).map(|t| t.to_string()).unwrap_or_default()
}

/// Builds the report of the data directory in `config` (`engine.durability.data_dir`), writing
/// nothing.
pub fn report(config: &EngineConfig) -> Result<Report, EngineError> {
    // No provider is reached: each gets an inert adapter in place of its own (an ISO 8583
    // adapter would connect and sign on to its host).
    let mut inert = Vec::with_capacity(config.providers.len());
    for provider in &config.providers {
        let adapter = settlegate_adapters::build(&AdapterConfig::default())
            .map_err(|error| EngineError::Config(error.to_string()))?;
        inert.push((provider.code, adapter));
    }
    let (shared, state_config, _) = crate::engine::prepare(config, inert)?;
    let count =
        config.shard_count_in_force().map_err(|error| EngineError::Storage(error.to_string()))?;
    // Every shard first: a terminal's age policy (its time zone) is filled in by the shard
    // of its provider.
    let mut states = Vec::with_capacity(count);
    for index in 0..count {
        states.push(crate::startup::replay_one(config, &shared, state_config, index, true)?.0);
    }
    let mut items = Vec::new();
    for state in &states {
        shard_items(state, &mut items);
    }
    items.sort_by(|a, b| {
        (a.at_ms, a.dispatch_id, a.kind, a.operation_id).cmp(&(
            b.at_ms,
            b.dispatch_id,
            b.kind,
            b.operation_id,
        ))
    });
    Ok(Report { items })
}

/// The business day (`YYYY-MM-DD`) of `at_ms` at provider `provider_code`'s store terminal
/// `terminal_id`, and the name of its time zone: that of the age policy in force there (the
/// terminal's own, else its provider's, else the engine's default), the zone the engine
/// already takes a sale's local date in; UTC if the name is unknown to this build.
fn business_day(
    state: &ShardState,
    provider_code: u32,
    terminal_id: &str,
    at_ms: i64,
) -> (String, String) {
    let own = state
        .shared
        .registry
        .provider(provider_code)
        .and_then(|provider| provider.age_policy(terminal_id));
    let name = state.shared.age.policy_for(provider_code, own.as_ref()).policy.time_zone.clone();
    let (name, zone) = match TimeZone::get(&name) {
        Ok(zone) => (name, zone),
        Err(_) => ("UTC".to_owned(), TimeZone::UTC),
    };
    let day = Timestamp::from_millisecond(at_ms)
        .map(|t| t.to_zoned(zone).date().to_string())
        .unwrap_or_default();
    (day, name)
}

/// One operation, as the journal and the state tell it.
struct Operation {
    id: Option<u64>,
    obligation: Obligation,
    state: &'static str,
    answered_ms: Option<i64>,
    detail: String,
}

fn shard_items(state: &ShardState, items: &mut Vec<ReportItem>) {
    // The operations of the log, then those still owed from the snapshot.
    let mut operations: BTreeMap<u64, Operation> = BTreeMap::new();
    for entry in state.money.journal.iter().flatten() {
        match entry {
            Journaled::Owed(id, obligation) => {
                let operation = Operation {
                    id: Some(*id),
                    obligation: obligation.clone(),
                    state: "owed",
                    answered_ms: None,
                    detail: String::new(),
                };
                operations.insert(*id, operation);
            }
            Journaled::Answered(id, answer, at_ms) => {
                if let Some(operation) = operations.get_mut(id) {
                    operation.answered_ms = Some(*at_ms);
                    match answer {
                        Acknowledged::Accepted => operation.state = "acknowledged",
                        Acknowledged::Refused(reason) => {
                            operation.state = "refused";
                            operation.detail = reason.clone();
                        }
                    }
                }
            }
        }
    }
    for (id, obligation) in &state.money.owed {
        operations.entry(*id).or_insert_with(|| Operation {
            id: Some(*id),
            obligation: obligation.clone(),
            state: "owed",
            answered_ms: None,
            detail: String::new(),
        });
    }
    let mut by_dispatch: BTreeMap<u64, Vec<Operation>> = BTreeMap::new();
    for (_, operation) in operations {
        by_dispatch.entry(operation.obligation.reference.dispatch_id).or_default().push(operation);
    }
    // Codes: their authorizations, and their operations (those a snapshot took out of the log
    // made again from the code's state).
    for (&number, money) in &state.money.codes {
        let Some(record) = state.codes.get(&number) else { continue };
        let reference = &money.reference;
        let mut ops = by_dispatch.remove(&reference.dispatch_id).unwrap_or_default();
        complete_from_state(record, &money.reference, &money.refunds, &mut ops);
        let final_state = match &record.state {
            CodeState::Issued => "authorized",
            CodeState::Redeemed(redemption) if redemption.captured_minor > 0 => "captured",
            CodeState::Redeemed(_) | CodeState::Voided => "voided",
            CodeState::Expired => "expired",
        };
        items.push(authorization(state, reference, Some(number), final_state));
        for operation in ops {
            items.push(operation_item(state, Some(record), Some(number), operation));
        }
    }
    // Settled payments still kept: their refunds older than the log, made again from their
    // state (a refund in the log is in `by_dispatch`, below).
    for (_, kept) in state.settled.entries() {
        let money = &kept.money;
        let reference = &money.reference;
        let ops = by_dispatch.entry(reference.dispatch_id).or_default();
        earlier_refunds(reference, &money.refunds, reference.at_ms, Owed::RefundSettled, ops);
    }
    // Authorizations no code keeps: reversed ones; and settled payments' refunds, whose
    // payment (a sale, settled with its approval) is not an item of its own.
    for (_, ops) in by_dispatch {
        let Some(first) = ops.first() else { continue };
        let reference = first.obligation.reference.clone();
        let reversed = ops.iter().any(|op| op.obligation.operation == Owed::Reversal);
        let sale = ops.iter().all(|op| matches!(op.obligation.operation, Owed::RefundSettled(_)));
        let final_state = if reversed { "reversed" } else { "authorized" };
        if !sale {
            items.push(authorization(state, &reference, None, final_state));
        }
        for operation in ops {
            items.push(operation_item(state, None, None, operation));
        }
    }
}

/// Adds to `ops` what the code's state shows was owed but the log no longer holds (made before
/// the snapshot the shard was rebuilt from): its capture or void, and its refunds.
fn complete_from_state(
    record: &CodeRecord,
    reference: &Reference,
    refunds: &[(crate::shard::idempotency::IdemKey, u64)],
    ops: &mut Vec<Operation>,
) {
    let answered = |operation: Owed, since_ms: i64| Operation {
        id: None,
        obligation: Obligation { reference: reference.clone(), operation, since_ms },
        state: "answered",
        answered_ms: None,
        detail: String::new(),
    };
    let has = |ops: &Vec<Operation>, pick: fn(&Owed) -> bool| {
        ops.iter().any(|op| pick(&op.obligation.operation))
    };
    match &record.state {
        CodeState::Redeemed(redemption) if redemption.captured_minor > 0 => {
            if !has(ops, |op| matches!(op, Owed::Capture(_))) {
                ops.insert(
                    0,
                    answered(Owed::Capture(redemption.captured_minor), redemption.redeemed_at_ms),
                );
            }
        }
        CodeState::Redeemed(redemption) => {
            if !has(ops, |op| matches!(op, Owed::Void)) {
                ops.insert(0, answered(Owed::Void, redemption.redeemed_at_ms));
            }
        }
        CodeState::Expired => {
            if !has(ops, |op| matches!(op, Owed::Void)) {
                ops.insert(0, answered(Owed::Void, record.expires_ms));
            }
        }
        // When it was voided is not kept: the authorization's time stands for it.
        CodeState::Voided => {
            if !has(ops, |op| matches!(op, Owed::Void)) {
                ops.insert(0, answered(Owed::Void, reference.at_ms));
            }
        }
        CodeState::Issued => {}
    }
    let at_ms = match &record.state {
        CodeState::Redeemed(redemption) => redemption.redeemed_at_ms,
        _ => reference.at_ms,
    };
    earlier_refunds(reference, refunds, at_ms, Owed::Refund, ops);
}

/// Adds to `ops` (after its first, a capture's place) the refunds of `refunds` the log no
/// longer holds, as `owed` operations answered before the log, at `at_ms`: the log holds the
/// last refunds; the first ones are older than it.
fn earlier_refunds(
    reference: &Reference,
    refunds: &[(crate::shard::idempotency::IdemKey, u64)],
    at_ms: i64,
    owed: fn(u64) -> Owed,
    ops: &mut Vec<Operation>,
) {
    let is_refund = |op: &Operation| {
        matches!(op.obligation.operation, Owed::Refund(_) | Owed::RefundSettled(_))
    };
    let logged = ops.iter().filter(|op| is_refund(op)).count();
    let earlier = refunds.len().saturating_sub(logged);
    // A code's capture (or void) comes first; a settled payment has none.
    let first = usize::from(ops.first().is_some_and(|op| !is_refund(op)));
    for (index, &(_, amount)) in refunds[..earlier].iter().enumerate() {
        let operation = Operation {
            id: None,
            obligation: Obligation {
                reference: reference.clone(),
                operation: owed(amount),
                since_ms: at_ms,
            },
            state: "answered",
            answered_ms: None,
            detail: String::new(),
        };
        ops.insert((first + index).min(ops.len()), operation);
    }
}

fn authorization(
    state: &ShardState,
    reference: &Reference,
    code_number: Option<u64>,
    final_state: &'static str,
) -> ReportItem {
    let merchant = reference.terminal_id.clone();
    let (business_day, time_zone) =
        business_day(state, reference.provider_code, &merchant, reference.at_ms);
    ReportItem {
        kind: ItemKind::Authorization,
        provider_code: reference.provider_code,
        merchant,
        business_day,
        time_zone,
        at_ms: reference.at_ms,
        dispatch_id: reference.dispatch_id,
        code_number,
        operation_id: None,
        auth_code: reference.auth_code.map(|code| code.as_str().to_owned()).unwrap_or_default(),
        currency: reference.currency,
        amount_minor: reference.amount_minor,
        state: final_state,
        provider_ack: if reference.auth_code.is_some() { "yes" } else { "no" },
        answered_ms: None,
        detail: String::new(),
    }
}

fn operation_item(
    state: &ShardState,
    record: Option<&CodeRecord>,
    code_number: Option<u64>,
    operation: Operation,
) -> ReportItem {
    let Operation { id, obligation, state: op_state, answered_ms, detail } = operation;
    let reference = &obligation.reference;
    let (kind, amount_minor) = match obligation.operation {
        Owed::Capture(amount) => (ItemKind::Capture, amount),
        Owed::Refund(amount) | Owed::RefundSettled(amount) => (ItemKind::Refund, amount),
        Owed::Reversal => (ItemKind::Reversal, reference.amount_minor),
        Owed::Void if record.is_some_and(|r| r.state == CodeState::Expired) => {
            (ItemKind::Expiry, reference.amount_minor)
        }
        Owed::Void => (ItemKind::Void, reference.amount_minor),
    };
    let merchant = match (kind, record) {
        (ItemKind::Capture | ItemKind::Refund, Some(record)) => {
            record.merchant_terminal().to_owned()
        }
        _ => reference.terminal_id.clone(),
    };
    let (business_day, time_zone) =
        business_day(state, reference.provider_code, &merchant, obligation.since_ms);
    ReportItem {
        kind,
        provider_code: reference.provider_code,
        merchant,
        business_day,
        time_zone,
        at_ms: obligation.since_ms,
        dispatch_id: reference.dispatch_id,
        code_number,
        operation_id: id,
        auth_code: reference.auth_code.map(|code| code.as_str().to_owned()).unwrap_or_default(),
        currency: reference.currency,
        amount_minor,
        state: op_state,
        provider_ack: if op_state == "acknowledged" { "yes" } else { "no" },
        answered_ms,
        detail,
    }
}
