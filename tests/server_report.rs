//! The reconciliation report over the protocol (`REPORT`, `docs/PROTOCOL.md`;
//! `docs/RECONCILIATION.md`, "Over the protocol"): the real binary on a data directory, a day
//! of codes at two simulated providers driven over TCP, then each provider's identity pages
//! through its own report and gets, line by line, what `settlegate report` writes for the same
//! directory, day and provider; another provider's identity, or one without the permission,
//! is refused and sees nothing of it; bad requests are refused as documented.

use std::collections::{BTreeSet, HashSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

use settlegate_engine::ReasonCode;
use settlegate_protocol::messages::opcode;
use settlegate_protocol::messages::{Reply, Request, Response};
use settlegate_protocol::ops::report::{GetReport, ReportPart};
use settlegate_protocol::ops::void::Target;
use settlegate_protocol::values::IssuedCode;
use settlegate_protocol::{Client, Frame};
use sha2::{Digest, Sha256};
use tokio::io::AsyncReadExt;

use crate::support::request_id;
use crate::support::server::{
    enroll, issue_code, now_ms, redeem_request, spawn_binary, Payer, ADMIN_KEY,
};

/// Reads provider 1's report.
const P1_KEY: &str = "report-key-provider-1";
/// Reads provider 2's report.
const P2_KEY: &str = "report-key-provider-2";
/// Manages provider 1's terminals, without the report permission.
const P1_MANAGER_KEY: &str = "manager-key-provider-1";

/// The server process, killed when the test ends, also when a check fails.
struct Server(std::process::Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn identity(name: &str, key: &str, permissions: &str, providers: &str) -> String {
    format!(
        "[[server.identities]]\nname = \"{name}\"\napi_key_sha256 = \"{}\"\n\
         permissions = {permissions}\nterminals = [\"*\"]\nproviders = {providers}\n\n",
        hex::encode(Sha256::digest(key.as_bytes()))
    )
}

/// The config of the server and of `settlegate report`: a data directory, providers 1 and 2
/// (simulated, approving at once), the admin and the report identities.
fn config(dir: &Path) -> PathBuf {
    let mut text =
        String::from("[server]\nlisten = \"127.0.0.1:0\"\nhttp_listen = \"127.0.0.1:0\"\n\n");
    text += &identity("admin", ADMIN_KEY, r#"["authorize", "accounts"]"#, "[]");
    text += &identity("p1-report", P1_KEY, r#"["report"]"#, "[1]");
    text += &identity("p2-report", P2_KEY, r#"["report"]"#, "[2]");
    text += &identity("p1-manager", P1_MANAGER_KEY, r#"["providers"]"#, "[1]");
    text += &format!(
        "[engine]\nshards = 2\npassword = {{ memory_kib = 64, iterations = 1, parallelism = 1 }}\n\
         vault = {{ key_hex = \"{}\" }}\n\
         durability = {{ data_dir = \"{}\", fsync = \"always\" }}\n\
         forwarding = {{ interval_ms = 50, retry_initial_ms = 50, retry_max_ms = 200 }}\n\n",
        "55".repeat(32),
        dir.join("data").display(),
    );
    for code in [1, 2] {
        text += &format!(
            "[[engine.providers]]\ncode = {code}\nname = \"sim-{code}\"\n\
             adapter = {{ kind = \"simulated\", seed = {code} }}\n\n"
        );
    }
    let path = dir.join("settlegate.toml");
    std::fs::write(&path, text).unwrap();
    path
}

/// The binary on [`config`] in a new directory: the directory, the config, the server and
/// its protocol address.
fn start() -> (tempfile::TempDir, PathBuf, Server, std::net::SocketAddr) {
    let dir = tempfile::tempdir().unwrap();
    let config = config(dir.path());
    let (child, addr) = spawn_binary(&config);
    (dir, config, Server(child), addr)
}

async fn connect(addr: std::net::SocketAddr, key: &str) -> Client {
    let client = Client::connect(addr).await.expect("connect");
    client.authenticate(key).await.expect("authenticate");
    client
}

async fn issue(client: &Client, payer: &mut Payer, amount: u64, provider: u32) -> IssuedCode {
    issue_code(client, payer, amount, provider, "*", 3_600_000).await
}

async fn redeem(client: &Client, code: &IssuedCode, amount: u64) {
    let redeem = redeem_request(code, request_id().get(), amount, now_ms(), "POS-1");
    client.call_ok(&redeem).await.unwrap();
}

async fn refund(client: &Client, code: &IssuedCode, amount: u64) {
    let refund = Request::Refund(settlegate_protocol::ops::refund::Refund {
        client_request_id: request_id().get(),
        target: Target::Code(code.number),
        amount_minor: amount,
        terminal_id: "POS-1".into(),
    });
    client.call_ok(&refund).await.unwrap();
}

/// The day: at provider 1, five codes (one captured below its hold, one voided, one captured
/// and refunded twice, two left standing); at provider 2, one captured.
async fn drive_the_day(client: &Client) {
    let mut payer = enroll(client, "reported").await;
    let captured = issue(client, &mut payer, 5_000, 1).await;
    let voided = issue(client, &mut payer, 6_000, 1).await;
    let refunded = issue(client, &mut payer, 7_000, 1).await;
    issue(client, &mut payer, 8_000, 1).await;
    issue(client, &mut payer, 8_500, 1).await;
    let other = issue(client, &mut payer, 9_000, 2).await;
    redeem(client, &captured, 4_000).await;
    let void = Request::Void(settlegate_protocol::ops::void::Void {
        client_request_id: request_id().get(),
        target: Target::Code(voided.number),
        terminal_id: "*".into(),
    });
    client.call_ok(&void).await.unwrap();
    redeem(client, &refunded, 7_000).await;
    refund(client, &refunded, 1_000).await;
    refund(client, &refunded, 2_000).await;
    redeem(client, &other, 9_000).await;
}

/// What `settlegate report` writes for `extra` (`--date`, `--provider`): the summary file's
/// lines and the item list's, headers first.
fn cli_report(config: &Path, out_dir: &Path, extra: &[&str]) -> (Vec<String>, Vec<String>) {
    let (summary, items) = crate::engine_reconcile::report_files(config, out_dir, extra);
    let lines = |path: &Path| {
        std::fs::read_to_string(path).unwrap().lines().map(str::to_owned).collect::<Vec<_>>()
    };
    (lines(&summary), lines(&items))
}

/// Waits until `settlegate report` shows nothing owed to either provider: every operation
/// acknowledged, so that the report no longer changes.
async fn wait_until_acknowledged(config: &Path, out_dir: &Path, items_expected: usize) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let (_, items) = cli_report(config, out_dir, &[]);
        let settled = items.len() == 1 + items_expected
            && items.iter().skip(1).all(|line| !line.contains(",owed,"));
        if settled {
            return;
        }
        assert!(tokio::time::Instant::now() < deadline, "still owed: {items:#?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn request(day: &str, provider: u32, part: ReportPart, offset: u32, rows_max: u16) -> Request {
    Request::Report(GetReport {
        business_day: day.into(),
        provider_code: provider,
        part,
        offset,
        rows_max,
    })
}

/// A whole part by pages of `rows_max`, `BUSY` waited out: its header and lines, and how many
/// pages it took. Every page comes from one build of the report.
async fn fetch(
    client: &Client,
    day: &str,
    provider: u32,
    part: ReportPart,
    rows_max: u16,
) -> (Vec<String>, usize) {
    let (mut lines, mut pages, mut generated, mut header) = (Vec::new(), 0, None, None);
    loop {
        let offset = lines.len() as u32;
        let page = match client.call(&request(day, provider, part, offset, rows_max)).await {
            Ok(Response::Ok(Reply::Report(page))) => page,
            Ok(Response::Busy { retry_after_ms }) => {
                tokio::time::sleep(Duration::from_millis(retry_after_ms.into())).await;
                continue;
            }
            other => panic!("a page of the report: {other:?}"),
        };
        pages += 1;
        assert!(page.lines.len() <= usize::from(rows_max));
        assert_eq!(*generated.get_or_insert(page.generated_ms), page.generated_ms, "one build");
        assert_eq!(header.get_or_insert_with(|| page.header.clone()), &page.header);
        lines.extend(page.lines.iter().cloned());
        assert!(lines.len() <= page.total as usize, "never past the total");
        if lines.len() == page.total as usize {
            // Past the end: an empty page.
            let end = client.call_ok(&request(day, provider, part, page.total, rows_max)).await;
            let Ok(Reply::Report(end)) = end else { panic!("{end:?}") };
            assert!(end.lines.is_empty() && end.total == page.total, "{end:?}");
            let mut all = vec![header.unwrap()];
            all.extend(lines);
            return (all, pages);
        }
        assert!(!page.lines.is_empty(), "a page short of the total holds rows");
    }
}

/// The business days of `items` (the CLI's item list, header first).
fn days_of(items: &[String]) -> BTreeSet<String> {
    items.iter().skip(1).map(|line| line.split(',').nth(3).unwrap().to_owned()).collect()
}

#[tokio::test]
async fn a_provider_pages_through_its_own_report_as_the_cli_writes_it_and_no_other() {
    let (dir, config, _server, addr) = start();
    let admin = connect(addr, ADMIN_KEY).await;
    drive_the_day(&admin).await;
    // Provider 1: five authorizations, two captures, a void, two refunds; provider 2: an
    // authorization and its capture.
    wait_until_acknowledged(&config, dir.path(), 12).await;

    let p1 = connect(addr, P1_KEY).await;
    let p2 = connect(addr, P2_KEY).await;
    let (_, all_items) = cli_report(&config, dir.path(), &["--provider", "1"]);
    let days = days_of(&all_items);
    assert!(!days.is_empty() && days.len() <= 2, "today, in Tokyo: {days:?}");
    let mut item_rows = 0;
    for day in &days {
        let (summary, items) = cli_report(&config, dir.path(), &["--date", day, "--provider", "1"]);
        // The summary in one page, the items in pages of two.
        let (got_summary, pages) = fetch(&p1, day, 1, ReportPart::Summary, 1_000).await;
        assert_eq!(got_summary, summary, "the summary of {day}, line by line");
        assert_eq!(pages, 1);
        let (got_items, pages) = fetch(&p1, day, 1, ReportPart::Items, 2).await;
        assert_eq!(got_items, items, "the items of {day}, line by line, in order");
        assert_eq!(pages, (items.len() - 1).div_ceil(2));
        let distinct: HashSet<&String> = got_items.iter().collect();
        assert_eq!(distinct.len(), got_items.len(), "none twice");
        // The same day in one page: the same lines.
        assert_eq!(fetch(&p1, day, 1, ReportPart::Items, 1_000).await, (items.clone(), 1));
        item_rows += items.len() - 1;
    }
    assert_eq!(item_rows, 10, "provider 1's rows: {all_items:#?}");

    // Provider 2's identity reads its own rows only, and is refused provider 1's exactly as a
    // provider that does not exist: nothing tells them apart.
    for day in &days {
        let (summary, items) = cli_report(&config, dir.path(), &["--date", day, "--provider", "2"]);
        assert_eq!(fetch(&p2, day, 2, ReportPart::Summary, 1_000).await.0, summary);
        let (own, _) = fetch(&p2, day, 2, ReportPart::Items, 1_000).await;
        assert_eq!(own, items);
        assert!(own.iter().skip(1).all(|line| line.split(',').nth(1) == Some("2")), "{own:#?}");
        let refused = Response::Forbidden("identity may not read this provider's report".into());
        for part in [ReportPart::Summary, ReportPart::Items] {
            assert_eq!(p2.call(&request(day, 1, part, 0, 10)).await.unwrap(), refused);
            assert_eq!(p2.call(&request(day, 99, part, 0, 10)).await.unwrap(), refused);
        }
        // Neither may an identity of provider 1 without the report permission, nor one with
        // every other permission and no provider.
        let manager = connect(addr, P1_MANAGER_KEY).await;
        let asked = request(day, 1, ReportPart::Items, 0, 10);
        assert_eq!(manager.call(&asked).await.unwrap(), refused);
        assert_eq!(admin.call(&asked).await.unwrap(), refused);
    }
}

#[tokio::test]
async fn bad_report_requests_are_refused_as_documented() {
    let (_dir, _config, _server, addr) = start();
    let p1 = connect(addr, P1_KEY).await;
    let bad = |detail: &str| Response::BadRequest(detail.into());
    let not_a_date = bad("invalid business_day: not a date (YYYY-MM-DD)");
    for day in ["2026-13-01", "2026-02-30", "2026-1-01", "22/11/2026", "", "2026-11-22T00:00"] {
        let asked = request(day, 1, ReportPart::Items, 0, 10);
        assert_eq!(p1.call(&asked).await.unwrap(), not_a_date, "{day:?}");
    }
    let page_size = bad("invalid rows_max: 1 to 1000");
    for rows_max in [0, 1_001, u16::MAX] {
        let asked = request("2026-11-22", 1, ReportPart::Summary, 0, rows_max);
        assert_eq!(p1.call(&asked).await.unwrap(), page_size, "{rows_max}");
    }
    // A part other than 1 and 2, by hand (the client's types cannot say it).
    let mut body = Vec::new();
    settlegate_protocol::wire::Writer(&mut body).str8("2026-11-22").u32(1).u8(3).u32(0).u16(10);
    let auth = Request::Auth(settlegate_protocol::ops::auth::Auth { key: P1_KEY.into() });
    let mut bytes = auth.to_frame(1).to_bytes();
    bytes.extend(Frame::request(opcode::REPORT, 2, body).to_bytes());
    let mut stream = crate::support::server::raw_at(addr, &bytes).await;
    let mut answers = Vec::new();
    while answers.len() < 2 {
        let mut chunk = [0u8; 4096];
        let n = tokio::time::timeout(Duration::from_secs(10), stream.read(&mut chunk))
            .await
            .expect("answers")
            .unwrap();
        assert!(n > 0, "the connection stays open");
        answers.extend_from_slice(&chunk[..n]);
        let frames = crate::support::server::frames(&answers);
        if frames.len() == 2 {
            let report = &frames[1];
            assert_eq!((report.opcode, report.request_id), (opcode::REPORT, 2));
            let response = Response::decode(report.opcode, report.status, &report.body).unwrap();
            assert_eq!(response, bad("invalid part: 1 (summary) or 2 (items)"));
            break;
        }
    }
    // An empty day, and an offset past the end: empty pages.
    let asked = request("2000-01-01", 1, ReportPart::Items, 5, 10);
    let Reply::Report(page) = p1.call_ok(&asked).await.unwrap() else { panic!() };
    assert_eq!((page.total, page.lines.len()), (0, 0));
    assert_eq!(page.header, settlegate_engine::report::ITEMS_HEADER);
}

/// A server that keeps no data directory (in memory) has no report to give: refused with 120.
#[tokio::test]
async fn a_server_in_memory_refuses_the_report() {
    use crate::support::server::{identity, server_config, start_with};
    let mut config = server_config();
    config.server.identities.push(identity("p1", P1_KEY, &["report"], &[], &[100]));
    let server = start_with(config).await;
    let client = connect(server.addr, P1_KEY).await;
    let asked = request("2026-11-22", 100, ReportPart::Summary, 0, 10);
    assert_eq!(
        client.call(&asked).await.unwrap(),
        Response::Refused(ReasonCode::ReportUnavailable)
    );
    server.shutdown().await;
}
