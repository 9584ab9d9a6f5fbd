//! Reconciliation (`docs/RECONCILIATION.md`): a mixed day driven through the ISO 8583 host
//! simulator (codes captured below their hold, voided, refunded in part, expired; an
//! authorization timed out and reversed), the forwarder drained, then `settlegate report` run
//! as the real binary on the data directory the engine wrote, and its CSV compared with the
//! host's own tally, per authorization and in total.

use std::collections::BTreeMap;
use std::time::Duration;

use settlegate_engine::{
    AgePolicy, AuthOutcome, IssueCodeRequest, IssuedCode, OnAgeFailure, ProviderCode, ReasonCode,
    TerminalEntry,
};

use crate::engine_codes::redeem;
use crate::support::*;

const ISO: u32 = 900;
const HOUR_MS: i64 = 3_600_000;

/// A CSV row by column name.
type Row = BTreeMap<String, String>;

/// A CSV file as rows of named fields (the report quotes no field of this test's data).
fn read_csv(path: &std::path::Path) -> Vec<Row> {
    let text = std::fs::read_to_string(path).unwrap();
    let mut lines = text.lines();
    let header: Vec<String> = lines.next().unwrap().split(',').map(str::to_owned).collect();
    lines
        .map(|line| {
            let fields: Vec<&str> = line.split(',').collect();
            assert_eq!(fields.len(), header.len(), "{line}");
            header.iter().cloned().zip(fields.iter().map(|f| (*f).to_owned())).collect()
        })
        .collect()
}

fn number(row: &Row, key: &str) -> u64 {
    row[key].parse().unwrap_or_else(|_| panic!("{key} in {row:?}"))
}

/// Runs `settlegate report` on `config`, with `extra` arguments; the summary and the items.
fn run_report(
    config: &std::path::Path,
    out_dir: &std::path::Path,
    extra: &[&str],
) -> (Vec<Row>, Vec<Row>) {
    let (summary, items) = report_files(config, out_dir, extra);
    (read_csv(&summary), read_csv(&items))
}

/// Runs `settlegate report` (the real binary) on `config`, with `extra` arguments, writing
/// into `out_dir`; the summary's file and the item list's.
pub(crate) fn report_files(
    config: &std::path::Path,
    out_dir: &std::path::Path,
    extra: &[&str],
) -> (std::path::PathBuf, std::path::PathBuf) {
    let out = out_dir.join(format!("report{}.csv", extra.join("")));
    let status = std::process::Command::new(env!("CARGO_BIN_EXE_settlegate"))
        .arg("report")
        .arg("--config")
        .arg(config)
        .arg("--out")
        .arg(&out)
        .args(extra)
        .status()
        .unwrap();
    assert!(status.success(), "settlegate report: {status}");
    let items = std::path::PathBuf::from(out.display().to_string().replace(".csv", ".items.csv"));
    (out, items)
}

/// The files of a data directory with their contents, to show the report wrote nothing.
fn files_of(dir: &std::path::Path) -> BTreeMap<std::path::PathBuf, Vec<u8>> {
    let mut files = BTreeMap::new();
    for entry in walk(dir) {
        files.insert(entry.clone(), std::fs::read(&entry).unwrap());
    }
    files
}

fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            found.extend(walk(&path));
        } else {
            found.push(path);
        }
    }
    found
}

async fn issue_at(h: &Harness, user: &TestUser, amount: u64, terminal: &str) -> IssuedCode {
    let request = || IssueCodeRequest {
        client_request_id: request_id(),
        inherent_id: user.signed(h.engine.now_ms(), amount, ISO, terminal),
        validity_ms: 10 * 60_000,
        deliver_to: None,
        order_ref: String::new(),
    };
    crate::engine_money::issue_signed_on(h, request).await
}

/// An engine with a data directory (a snapshot every `snapshot_every` records; 0: none) on
/// the host simulator, its stores registered: one in Tokyo (the engine's default policy), one
/// in New York (its own).
struct Day {
    host: crate::engine_money::IsoHost,
    dir: tempfile::TempDir,
    data: std::path::PathBuf,
    h: Harness,
    user: TestUser,
}

async fn start_day(snapshot_every: u64) -> Day {
    let host = crate::engine_money::iso_host();
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let mut config = durable_config(&data, snapshot_every);
    // The host never answers 8,000..=8,099: a provider timeout of a second declines it.
    config.providers.push(crate::engine_money::iso_provider(host.port, 1_000));
    config.forwarding.retry_initial_ms = 50;
    config.forwarding.retry_max_ms = 200;
    let h = Harness::with_config(config);
    let terminals = ["STORE-01", "STORE-NY", "ISO-T1"];
    let entries =
        terminals.iter().map(|id| TerminalEntry { terminal_id: (*id).into(), service: None });
    h.engine.register_terminals(request_id(), ProviderCode(ISO), entries.collect()).await.unwrap();
    let new_york = AgePolicy {
        jurisdiction: "JP".into(),
        time_zone: "America/New_York".into(),
        on_failure: OnAgeFailure::Refuse,
        strict: false,
    };
    h.engine
        .set_age_policy(request_id(), ProviderCode(ISO), "STORE-NY", Some(new_york))
        .await
        .unwrap();
    let user = h.user("reconcile").await;
    Day { host, dir, data, h, user }
}

/// The codes of the day: one captured below its hold, one voided, one refunded in part twice
/// (a third refund past the capture refused), one left to expire.
async fn codes_of_the_day(day: &Day) {
    let (h, user) = (&day.h, &day.user);
    // T0 is 2026-11-22 09:00 in Tokyo, 2026-11-21 19:00 in New York.
    let captured = issue_at(h, user, 21_000, "STORE-01").await;
    let voided = issue_at(h, user, 22_000, "STORE-01").await;
    let refunded = issue_at(h, user, 23_000, "STORE-NY").await;
    issue_at(h, user, 24_000, "STORE-01").await;
    h.engine.redeem_code(redeem(&captured, 17_500, "STORE-01")).await.unwrap();
    h.engine.void_code(request_id(), voided.number, "STORE-01".into()).await.unwrap();
    h.engine.redeem_code(redeem(&refunded, 23_000, "STORE-NY")).await.unwrap();
    h.engine.refund_code(request_id(), refunded.number, 5_000, "STORE-NY".into()).await.unwrap();
    h.engine.refund_code(request_id(), refunded.number, 2_000, "STORE-NY".into()).await.unwrap();
    let over = h.engine.refund_code(request_id(), refunded.number, 16_001, "STORE-NY".into()).await;
    assert!(over.is_err(), "past the capture: {over:?}");
}

/// The host's account of each code of the day once it is all forwarded: (amount, state,
/// captured, refunded, voided, reversed).
const CODES_AT_THE_HOST: [(u64, &str, u64, u64, u64, u64); 4] = [
    (21_000, "captured", 17_500, 0, 0, 0),
    (22_000, "voided", 0, 0, 22_000, 0),
    (23_000, "captured", 23_000, 7_000, 0, 0),
    (24_000, "voided", 0, 0, 24_000, 0),
];

/// Expires what is left (past midnight in Tokyo: 2026-11-23 00:10, still the 22nd in UTC),
/// forwards until the host's tally is `expected` and nothing is owed, and stops the engine.
async fn end_day(day: &Day, expected: &[(u64, &str, u64, u64, u64, u64)]) {
    let (h, host) = (&day.h, &day.host);
    h.clock.advance(15 * HOUR_MS + 10 * 60_000);
    assert_eq!(h.engine.sweep_codes().await.unwrap(), 1);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let _ = h.engine.forward_owed().await;
        let done = expected.iter().all(|&(amount, state, c, r, v, x)| {
            host.account(amount) == Some((state.into(), c, r, v, x))
        });
        let drained = h.engine.owed_by_provider().iter().all(|q| q.depth == 0);
        if done && drained {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "the host's tally: {:?}", host.tally());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    h.engine.shutdown().await;
}

/// The config `settlegate report` runs on: the engine's (its providers too: a terminal's own
/// time zone is kept by its provider).
fn report_config(day: &Day) -> std::path::PathBuf {
    let toml = day.dir.path().join("report.toml");
    std::fs::write(
        &toml,
        format!(
            "[engine]\nshards = 2\nvault = {{ key_hex = \"{}\" }}\n\
             durability = {{ data_dir = \"{}\" }}\n\n[[engine.providers]]\ncode = {ISO}\n\
             name = \"iso-host\"\nadapter = {{ kind = \"iso8583\", host_addr = \"127.0.0.1:{}\", \
             merchant_id = \"SGTEST01\" }}\n",
            "11".repeat(32),
            day.data.display(),
            day.host.port,
        ),
    )
    .unwrap();
    toml
}

/// Each authorization the host holds against its row and its operations' rows in the item
/// list: every one ended, as the host says, with the same amounts; each operation's state one
/// of `op_states`, the provider's acknowledgment not denied.
fn agree_per_authorization(items: &[Row], tally: &serde_json::Value, op_states: &[&str]) {
    let held = tally["authorizations"].as_array().unwrap();
    let authorizations: Vec<_> = items.iter().filter(|i| i["kind"] == "authorization").collect();
    assert_eq!(authorizations.len(), held.len(), "one row per authorization the host holds");
    for account in held {
        let amount = account["authorized"].as_u64().unwrap();
        let row = authorizations
            .iter()
            .find(|row| number(row, "amount_minor") == amount)
            .unwrap_or_else(|| panic!("no row for the host's {account}"));
        // The invariant: every authorization ended, and the host agrees on how.
        let host_state = account["state"].as_str().unwrap();
        let ours = row["state"].as_str();
        let agree = match ours {
            "captured" | "voided" | "reversed" => host_state == ours,
            "expired" => host_state == "voided",
            other => panic!("an authorization still {other}: {row:?}"),
        };
        assert!(agree, "report {ours} against the host's {host_state}: {row:?}");
        if !row["auth_code"].is_empty() {
            assert_eq!(row["auth_code"], account["auth_code"].as_str().unwrap(), "{row:?}");
        }
        let ops = |kinds: &[&str]| -> u64 {
            items
                .iter()
                .filter(|i| {
                    i["dispatch_id"] == row["dispatch_id"] && kinds.contains(&i["kind"].as_str())
                })
                .map(|i| number(i, "amount_minor"))
                .sum()
        };
        let figure = |key: &str| account[key].as_u64().unwrap();
        assert_eq!(ops(&["capture"]), figure("captured"), "captured: {account}");
        assert_eq!(ops(&["refund"]), figure("refunded"), "refunded: {account}");
        assert_eq!(ops(&["void", "expiry"]), figure("voided"), "voided: {account}");
        assert_eq!(ops(&["reversal"]), figure("reversed"), "reversed: {account}");
    }
    for item in items.iter().filter(|i| i["kind"] != "authorization") {
        assert!(op_states.contains(&item["state"].as_str()), "{item:?}");
        assert_eq!(item["detail"], "", "nothing refused: {item:?}");
    }
}

#[tokio::test]
async fn the_report_of_a_mixed_day_agrees_with_the_hosts_tally_line_by_line() {
    let day = start_day(0).await;
    codes_of_the_day(&day).await;
    let (h, user, host) = (&day.h, &day.user, &day.host);
    let timeout = h.authorize(user.signed(h.engine.now_ms(), 8_042, ISO, "ISO-T1")).await;
    assert_eq!(timeout, AuthOutcome::Declined(ReasonCode::ProviderTimeout));
    let mut expected = CODES_AT_THE_HOST.to_vec();
    expected.push((8_042, "reversed", 0, 0, 0, 8_042));
    end_day(&day, &expected).await;

    // The report, by the real binary, on the data directory the engine wrote.
    let toml = report_config(&day);
    let before = files_of(&day.data);
    let host_before = std::fs::read_to_string(&host.ledger).unwrap();
    let (summary, items) = run_report(&toml, day.dir.path(), &[]);
    assert_eq!(files_of(&day.data), before, "the report wrote nothing to the data directory");
    let host_after = std::fs::read_to_string(&host.ledger).unwrap();
    let sent = host_after.strip_prefix(&host_before).unwrap_or(&host_after);
    assert_eq!(sent, "", "the report sent the host nothing");

    // Per authorization, and every operation acknowledged by the host.
    let tally = host.tally();
    agree_per_authorization(&items, &tally, &["acknowledged"]);
    for item in items.iter().filter(|i| i["kind"] != "authorization") {
        assert_eq!(item["provider_ack"], "yes", "{item:?}");
        assert!(item["answered_utc"] >= item["at_utc"], "answered after it was owed: {item:?}");
    }
    let kinds = |kind: &str| items.iter().filter(|i| i["kind"] == kind).count();
    assert_eq!(
        [kinds("capture"), kinds("void"), kinds("expiry"), kinds("refund"), kinds("reversal")],
        [2, 1, 1, 2, 1]
    );

    // The summary's totals against the host's.
    let totals = &tally["totals"];
    let total = |key: &str| summary.iter().map(|row| number(row, key)).sum::<u64>();
    assert_eq!(total("authorized_count"), totals["count"].as_u64().unwrap());
    for key in ["authorized", "captured", "refunded", "reversed"] {
        assert_eq!(total(&format!("{key}_minor")), totals[key].as_u64().unwrap(), "{key}");
    }
    assert_eq!(
        total("voided_minor") + total("expired_minor"),
        totals["voided"].as_u64().unwrap(),
        "the host voids what expired"
    );
    assert_eq!(total("owed_count"), 0);

    // Business days in each merchant's time zone.
    let line = |merchant: &str, day: &str| {
        summary
            .iter()
            .find(|r| r["merchant"] == merchant && r["business_day"] == day)
            .unwrap_or_else(|| panic!("no line for {merchant} on {day}: {summary:?}"))
    };
    let tokyo = line("STORE-01", "2026-11-22");
    assert_eq!(tokyo["time_zone"], "Asia/Tokyo");
    assert_eq!((number(tokyo, "authorized_count"), number(tokyo, "authorized_minor")), (3, 67_000));
    assert_eq!((number(tokyo, "captured_count"), number(tokyo, "captured_minor")), (1, 17_500));
    assert_eq!((number(tokyo, "voided_count"), number(tokyo, "voided_minor")), (1, 22_000));
    assert_eq!(number(tokyo, "expired_count"), 0, "expired the next day");
    let next_day = line("STORE-01", "2026-11-23");
    assert_eq!((number(next_day, "expired_count"), number(next_day, "expired_minor")), (1, 24_000));
    assert_eq!(number(next_day, "authorized_count"), 0);
    let new_york = line("STORE-NY", "2026-11-21");
    assert_eq!(new_york["time_zone"], "America/New_York");
    assert_eq!(
        [
            number(new_york, "authorized_minor"),
            number(new_york, "captured_minor"),
            number(new_york, "refunded_count"),
            number(new_york, "refunded_minor")
        ],
        [23_000, 23_000, 2, 7_000]
    );
    let reversal = line("ISO-T1", "2026-11-22");
    assert_eq!(
        (number(reversal, "reversed_count"), number(reversal, "reversed_minor")),
        (1, 8_042)
    );

    // One business day: the 23rd holds only the expiry.
    let (summary, items) = run_report(&toml, day.dir.path(), &["--date", "2026-11-23"]);
    assert_eq!(summary.len(), 1, "{summary:?}");
    assert_eq!(items.len(), 1, "{items:?}");
    assert_eq!((items[0]["kind"].as_str(), number(&items[0], "amount_minor")), ("expiry", 24_000));
    // Another provider's report holds none of it.
    let (summary, items) = run_report(&toml, day.dir.path(), &["--provider", "1"]);
    assert!(summary.is_empty() && items.is_empty(), "{summary:?} {items:?}");
    // A date that is not one is refused.
    let status = std::process::Command::new(env!("CARGO_BIN_EXE_settlegate"))
        .args(["report", "--date", "2026-13-01", "--config"])
        .arg(&toml)
        .stderr(std::process::Stdio::null())
        .status()
        .unwrap();
    assert!(!status.success(), "--date 2026-13-01 refused");
}

/// With snapshots every few records, what a snapshot took out of the log is made again from
/// the state it kept: the report still agrees with the host, those operations `answered`.
#[tokio::test]
async fn the_report_agrees_with_the_host_across_snapshots() {
    let day = start_day(3).await;
    codes_of_the_day(&day).await;
    end_day(&day, &CODES_AT_THE_HOST).await;
    let toml = report_config(&day);
    let (_, items) = run_report(&toml, day.dir.path(), &[]);
    agree_per_authorization(&items, &day.host.tally(), &["acknowledged", "answered"]);
    let kinds = |kind: &str| items.iter().filter(|i| i["kind"] == kind).count();
    assert_eq!([kinds("capture"), kinds("void"), kinds("expiry"), kinds("refund")], [2, 1, 1, 2]);
    let answered = items.iter().filter(|i| i["state"] == "answered").count();
    assert!(answered > 0, "some operations are older than the log: {items:?}");
}

/// A settled payment's refunds are in the report (each with its provider and its merchant, the
/// terminal the payment was made at), the payment itself not (a sale, settled with its
/// approval): from the log, and made again from the state once a snapshot took them out of it.
#[tokio::test]
async fn a_settled_payments_refunds_are_in_the_report_with_their_provider_and_merchant() {
    use settlegate_engine::{AuthorizeRequest, Clock as _};
    for snapshot_every in [0, 2] {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        let h = Harness::with_config(durable_config(&data, snapshot_every));
        let user = h.user("report-sale").await;
        let id = request_id();
        let inherent_id = user.signed(h.clock.now_ms(), 31_000, PROVIDER_OK, "SHOP-R1");
        let request = AuthorizeRequest { client_request_id: id, inherent_id };
        let outcome = h.engine.authorize(request).await.unwrap();
        assert!(matches!(outcome, AuthOutcome::Approved(_)), "{outcome:?}");
        for amount in [1_000, 2_500] {
            let refund = h.engine.refund_payment(
                request_id(),
                &user.user,
                id.get(),
                amount,
                "SHOP-R1".into(),
            );
            refund.await.unwrap();
        }
        while h.engine.forward_owed().await.unwrap().owed > 0 {}
        h.engine.forward_owed().await.unwrap();
        h.engine.shutdown().await;
        drop(h);

        let toml = dir.path().join("report.toml");
        std::fs::write(
            &toml,
            format!(
                "[engine]\nshards = 2\nvault = {{ key_hex = \"{}\" }}\n\
                 durability = {{ data_dir = \"{}\" }}\n\n[[engine.providers]]\n\
                 code = {PROVIDER_OK}\nname = \"ok\"\nadapter = {{ kind = \"simulated\" }}\n",
                "11".repeat(32),
                data.display(),
            ),
        )
        .unwrap();
        let (summary, items) = run_report(&toml, dir.path(), &[]);
        let refunds: Vec<_> = items
            .iter()
            .map(|i| (i["kind"].as_str(), number(i, "provider"), i["merchant"].as_str()))
            .collect();
        let refund = ("refund", u64::from(PROVIDER_OK), "SHOP-R1");
        assert_eq!(refunds, [refund, refund], "the refunds alone: {items:?}");
        let amounts: Vec<u64> = items.iter().map(|i| number(i, "amount_minor")).collect();
        assert_eq!(amounts, [1_000, 2_500]);
        let states =
            ["acknowledged", if snapshot_every == 0 { "acknowledged" } else { "answered" }];
        for item in &items {
            assert!(states.contains(&item["state"].as_str()), "{item:?}");
            assert!(item["code_number"].is_empty() && !item["auth_code"].is_empty(), "{item:?}");
        }
        let answered = items.iter().any(|i| i["state"] == "answered");
        assert_eq!(answered, snapshot_every > 0, "made again from the state: {items:?}");
        assert_eq!(summary.len(), 1, "{summary:?}");
        let line = &summary[0];
        assert_eq!((line["merchant"].as_str(), number(line, "provider")), ("SHOP-R1", 100));
        assert_eq!((number(line, "refunded_count"), number(line, "refunded_minor")), (2, 3_500));
        assert_eq!((number(line, "authorized_count"), number(line, "captured_count")), (0, 0));
    }
}
