//! Test support: the Python host simulator as a child process, its ledger, and a vault.
#![allow(dead_code)] // shared by several test binaries, each using part of it

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{mpsc, Arc, Mutex, OnceLock};
use std::time::Duration;

use settlegate_adapters::iso8583::{Iso8583Adapter, Iso8583Config, LinkStatus};
use settlegate_adapters::{
    AdapterError, AuthCode, AuthorizationRequest, CardToken, Currency, DeclineReason, Detokenizer,
    MeansKind, ProviderReply,
};
use zeroize::Zeroizing;

/// Generous bound for "eventually" conditions on a noisy shared machine.
pub const EVENTUALLY: Duration = Duration::from_secs(30);
/// The token the test vault knows.
pub const TOKEN: CardToken = CardToken([7; 16]);
/// The card number behind [`TOKEN`].
pub const PAN: &str = "4111111111111111";

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/iso_host/iso_host.py")
}

/// Fails (never skips) when python3 or pyiso8583 is missing.
pub fn require_python() {
    static CHECKED: OnceLock<Result<(), String>> = OnceLock::new();
    let result = CHECKED.get_or_init(|| {
        let output = Command::new("python3")
            .args(["-c", "import iso8583"])
            .output()
            .map_err(|e| format!("cannot run python3: {e}"))?;
        if output.status.success() {
            Ok(())
        } else {
            Err(String::from_utf8_lossy(&output.stderr).into_owned())
        }
    });
    if let Err(error) = result {
        panic!(
            "the ISO 8583 tests need python3 with pyiso8583 (run `python3 -m pip install -r \
             tests/iso_host/requirements.txt`, which scripts/test.sh does): {error}"
        );
    }
}

/// A running simulator; killed when dropped.
pub struct Host {
    child: Child,
    /// Its port on 127.0.0.1.
    pub port: u16,
    /// Its ledger file (JSON lines), if any.
    pub ledger: Option<PathBuf>,
}

impl Host {
    /// Starts the simulator on `port` (0: a free one), writing its ledger to `ledger`.
    pub fn spawn(port: u16, ledger: Option<&Path>) -> Host {
        Host::spawn_with(port, ledger, &[])
    }

    /// [`Host::spawn`] with more command-line arguments (e.g. `--tls-cert`).
    pub fn spawn_with(port: u16, ledger: Option<&Path>, args: &[&std::ffi::OsStr]) -> Host {
        require_python();
        let mut command = Command::new("python3");
        command.arg(script()).args(["--port", &port.to_string()]).args(args);
        if let Some(ledger) = ledger {
            command.arg("--ledger").arg(ledger);
        }
        let mut child = command
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn python3 iso_host.py");
        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let _ = BufReader::new(stdout).read_line(&mut line);
            let _ = tx.send(line);
        });
        let line = rx.recv_timeout(EVENTUALLY).expect("simulator printed no PORT line");
        let port = line
            .strip_prefix("PORT ")
            .and_then(|p| p.trim().parse().ok())
            .unwrap_or_else(|| panic!("simulator did not start: {line:?}"));
        Host { child, port, ledger: ledger.map(Path::to_path_buf) }
    }

    /// Starts the simulator on a free port in `dir`, with its ledger (`ledger.jsonl`) and its
    /// tally (`tally.json`, [`Host::tally`]).
    pub fn spawn_tallying(dir: &Path) -> Host {
        let tally = dir.join("tally.json");
        let args = [std::ffi::OsStr::new("--tally-file"), tally.as_os_str()];
        Host::spawn_with(0, Some(&dir.join("ledger.jsonl")), &args)
    }

    /// The host's tally of authorizations (`--tally-file`, next to the ledger).
    pub fn tally(&self) -> serde_json::Value {
        let ledger = self.ledger.as_ref().expect("host started with a ledger");
        let text = std::fs::read_to_string(ledger.with_file_name("tally.json")).expect("tally");
        serde_json::from_str(&text).expect("tally is JSON")
    }

    /// The tally's entry for the authorization with RRN `rrn`.
    pub fn held(&self, rrn: &str) -> Option<serde_json::Value> {
        let tally = self.tally();
        let holds = tally["authorizations"].as_array().expect("authorizations");
        holds.iter().find(|h| h["rrn"] == rrn).cloned()
    }

    /// Kills the simulator at once (SIGKILL) and reaps it.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Every ledger line so far.
    pub fn ledger_lines(&self) -> Vec<Entry> {
        let path = self.ledger.as_ref().expect("host started with a ledger");
        std::fs::read_to_string(path)
            .unwrap_or_default()
            .lines()
            .map(|line| Entry(line.to_owned()))
            .collect()
    }
}

impl Drop for Host {
    fn drop(&mut self) {
        self.kill();
    }
}

/// One ledger line (a flat JSON object of strings, numbers and booleans).
#[derive(Debug, Clone)]
pub struct Entry(pub String);

impl Entry {
    /// The value of `key` as text (quotes removed), if present.
    pub fn get(&self, key: &str) -> Option<String> {
        let start = self.0.find(&format!("\"{key}\": "))? + key.len() + 4;
        let rest = &self.0[start..];
        if let Some(quoted) = rest.strip_prefix('"') {
            quoted.split('"').next().map(str::to_owned)
        } else {
            rest.split([',', '}']).next().map(|v| v.trim().to_owned())
        }
    }

    /// Whether `key` has `value`.
    pub fn is(&self, key: &str, value: &str) -> bool {
        self.get(key).as_deref() == Some(value)
    }
}

/// A vault that knows [`TOKEN`].
pub struct TestVault(HashMap<CardToken, String>);

impl TestVault {
    /// The vault, shared.
    pub fn shared() -> Arc<TestVault> {
        Arc::new(TestVault(HashMap::from([(TOKEN, PAN.to_owned())])))
    }
}

impl Detokenizer for TestVault {
    fn reveal(&self, token: &CardToken) -> Option<Zeroizing<String>> {
        self.0.get(token).cloned().map(Zeroizing::new)
    }
}

/// A config for a host on `port`, with short test-friendly intervals.
pub fn config(port: u16) -> Iso8583Config {
    Iso8583Config {
        host_addr: format!("127.0.0.1:{port}"),
        merchant_id: "SETTLEGATE01".into(),
        response_timeout_ms: 10_000,
        echo_interval_ms: 60_000,
        backoff_initial_ms: 50,
        backoff_max_ms: 300,
        breaker_probe_interval_ms: 100,
        ..Iso8583Config::default()
    }
}

/// Starts an adapter and waits until it has signed on.
pub async fn ready_adapter(config: Iso8583Config) -> Arc<Iso8583Adapter> {
    let adapter = Arc::new(Iso8583Adapter::start(config, TestVault::shared()).expect("start"));
    eventually("sign-on", || adapter.status() == LinkStatus::Ready).await;
    adapter
}

/// A card authorization of `amount_minor` yen.
pub fn card(dispatch_id: u64, amount_minor: u64) -> AuthorizationRequest {
    AuthorizationRequest {
        dispatch_id,
        provider_code: 9,
        means: MeansKind::CreditCard,
        card_token: Some(TOKEN),
        terminal_id: "TERM0001".into(),
        amount_minor,
        currency: Currency::try_from("JPY").expect("currency"),
        at_ms: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as i64),
        sale: false,
    }
}

/// Polls `condition` until it holds, failing the test after [`EVENTUALLY`].
pub async fn eventually(what: &str, mut condition: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + EVENTUALLY;
    while !condition() {
        assert!(tokio::time::Instant::now() < deadline, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Every log line of this test binary from the first call on, at TRACE level (the adapter
/// logs on its own thread, so the subscriber is global).
pub fn captured_logs() -> Arc<Mutex<Vec<u8>>> {
    static LOGS: OnceLock<Arc<Mutex<Vec<u8>>>> = OnceLock::new();
    Arc::clone(LOGS.get_or_init(|| {
        let logs = Arc::new(Mutex::new(Vec::new()));
        let sink = Arc::clone(&logs);
        tracing_subscriber::fmt()
            .with_max_level(tracing::Level::TRACE)
            .with_ansi(false)
            .with_writer(move || Capture(Arc::clone(&sink)))
            .init();
        logs
    }))
}

struct Capture(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Capture {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0.lock().expect("log buffer").extend_from_slice(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// An expected authorization outcome, compared with an adapter's answer leaving out the
/// approval's reference (its STAN, RRN and times differ per run; tests check them apart).
#[derive(Debug, Clone, PartialEq)]
pub struct Expect(pub Result<Result<AuthCode, DeclineReason>, AdapterError>);

impl PartialEq<Expect> for Result<ProviderReply, AdapterError> {
    fn eq(&self, expected: &Expect) -> bool {
        let actual = match self {
            Ok(ProviderReply::Approved { auth_code, .. }) => Ok(Ok(*auth_code)),
            Ok(ProviderReply::Declined { reason }) => Ok(Err(*reason)),
            Err(error) => Err(error.clone()),
        };
        actual == expected.0
    }
}

/// An approval with authorization code `code`.
pub fn approved(code: &[u8; 6]) -> Expect {
    Expect(Ok(Ok(AuthCode(*code))))
}

/// A decline for `reason`.
pub fn declined(reason: DeclineReason) -> Expect {
    Expect(Ok(Err(reason)))
}
