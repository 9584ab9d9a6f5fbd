//! The data directory as an operator meets it, over the real binary and real sockets: a shard
//! that panics ends the process, a shard that is down makes the server not ready, files are
//! private whatever the umask, a stale snapshot temporary file goes, a damaged log is refused
//! (not cut), and what recovery does cut is kept beside the log.

use settlegate_protocol::ops::{ConfirmTerminal, RegisterTerminals};
use std::io::{BufRead, BufReader, Read};
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use settlegate_engine::wal::{shard_log_path, shard_snapshot_path};
use settlegate_protocol::messages::TerminalEntry;
use settlegate_protocol::messages::{Request, Response};
use settlegate_protocol::Client;

use crate::support::server::{binary_config, http_get, server_config, ADMIN_KEY};

/// A config file for the binary keeping its state in `dir/data`, one shard, a snapshot every
/// `snapshot_every` records (0: never).
fn config_file(dir: &Path, snapshot_every: u64) -> PathBuf {
    let engine = format!(
        "shards = 1\ndurability = {{ data_dir = \"{}\", fsync = \"always\", snapshot_every_records = {snapshot_every} }}",
        data(dir).display()
    );
    binary_config(dir, "{ kind = \"simulated\", latency_us_min = 0, latency_us_max = 0 }", &engine)
}

fn data(dir: &Path) -> PathBuf {
    dir.join("data")
}

/// The binary, started under `umask 022` (the common default, which would leave new files
/// world-readable), with `env`; its stderr collected by a thread.
struct Server {
    child: Child,
    stderr: Option<std::thread::JoinHandle<String>>,
}

/// What a started binary printed: its protocol and HTTP addresses, or nothing if it exited.
fn spawn(config: &Path, env: &[(&str, &str)]) -> (Server, Option<(SocketAddr, SocketAddr)>) {
    let mut command = Command::new("sh");
    command
        .arg("-c")
        .arg("umask 022; exec \"$0\" serve --config \"$1\"")
        .arg(env!("CARGO_BIN_EXE_settlegate"))
        .arg(config)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (key, value) in env {
        command.env(key, value);
    }
    let mut child = command.spawn().expect("spawn settlegate");
    let mut stderr = child.stderr.take().unwrap();
    let stderr = std::thread::spawn(move || {
        let mut text = String::new();
        let _ = stderr.read_to_string(&mut text);
        without_colours(&text)
    });
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut addr = None;
    let mut http = None;
    for line in lines.by_ref() {
        let line = line.unwrap();
        let line = line.trim();
        if let Some(rest) = line.strip_prefix("protocol") {
            addr = rest.trim().split("://").nth(1).map(|a| a.parse().unwrap());
        }
        if let Some(rest) = line.strip_prefix("http") {
            let url = rest.split_whitespace().next().unwrap();
            let host = url.trim_start_matches("http://").split('/').next().unwrap();
            http = Some(host.parse().unwrap());
        }
        if addr.is_some() && http.is_some() {
            break;
        }
    }
    std::thread::spawn(move || for _ in lines {});
    let server = Server { child, stderr: Some(stderr) };
    (server, addr.zip(http))
}

/// `text` without its ANSI colour sequences (the log's fields are coloured on a terminal).
fn without_colours(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c == '\x1b' {
            for c in chars.by_ref() {
                if c == 'm' {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

impl Server {
    /// Waits (at most 30 s) for the process to exit: its status and its stderr.
    fn wait(mut self) -> (ExitStatus, String) {
        let deadline = Instant::now() + Duration::from_secs(30);
        let status = loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                break status;
            }
            assert!(Instant::now() < deadline, "settlegate did not exit");
            std::thread::sleep(Duration::from_millis(20));
        };
        (status, self.stderr.take().unwrap().join().unwrap())
    }

    /// SIGKILL, then what it logged.
    fn kill(mut self) -> String {
        self.child.kill().unwrap();
        self.wait().1
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn admin(addr: SocketAddr) -> Client {
    let client = Client::connect(addr).await.unwrap();
    client.authenticate(ADMIN_KEY).await.unwrap();
    client
}

fn register(id: u128, terminal: &str) -> Request {
    Request::RegisterTerminals(RegisterTerminals {
        client_request_id: id,
        provider_code: 1,
        terminals: vec![TerminalEntry { terminal_id: terminal.into(), service: None }],
    })
}

async fn listed(client: &Client, terminal: &str) -> bool {
    let query = Request::ConfirmTerminal(ConfirmTerminal {
        provider_code: 1,
        terminal_id: terminal.into(),
    });
    let reply = format!("{:?}", client.call_ok(&query).await.unwrap());
    reply.contains("Listed") && !reply.contains("NotListed")
}

/// A plain GET of `/readyz` on `http`: (status line, body).
async fn readyz(http: SocketAddr) -> (String, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(http).await.unwrap();
    let request = "GET /readyz HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n";
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut bytes = Vec::new();
    stream.read_to_end(&mut bytes).await.unwrap();
    let text = String::from_utf8_lossy(&bytes).into_owned();
    let body = text.split("\r\n\r\n").nth(1).unwrap_or("").to_owned();
    (text.lines().next().unwrap_or("").to_owned(), body)
}

/// Where each record of a log starts, and the file's length.
fn record_offsets(bytes: &[u8]) -> Vec<usize> {
    let mut offsets = Vec::new();
    // File header 32 bytes; record header 12 (length, header check, payload CRC).
    let mut at = 32;
    while at + 12 <= bytes.len() {
        offsets.push(at);
        at += 12 + u32::from_be_bytes(bytes[at..at + 4].try_into().unwrap()) as usize;
    }
    assert_eq!(at, bytes.len(), "a whole log");
    offsets
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

/// Issue #19, item 5: a shard that panics ends the process (non-zero, the panic logged); the
/// restart recovers everything acknowledged from the log, and is ready.
#[tokio::test]
async fn a_shard_panic_ends_the_process_and_a_restart_recovers_from_the_log() {
    let dir = tempfile::tempdir().unwrap();
    let config = config_file(dir.path(), 0);
    let fatal: u128 = 0xdead_beef;
    let (server, addrs) =
        spawn(&config, &[("SETTLEGATE_TEST_PANIC_ON_REQUEST", &format!("{fatal:x}"))]);
    let (addr, http) = addrs.expect("started");
    let client = admin(addr).await;
    client.call_ok(&register(1, "BEFORE-1")).await.unwrap();
    assert!(readyz(http).await.0.contains("200"));
    // The shard panics on this one (a test hook of the test build only).
    let fatal_reply = client.call(&register(fatal, "FATAL-1")).await;
    assert!(!matches!(fatal_reply, Ok(Response::Ok(_))), "{fatal_reply:?}");
    let (status, stderr) = server.wait();
    assert!(!status.success(), "the process must exit non-zero, got {status:?}");
    assert_eq!(status.signal(), Some(6), "aborted: {status:?}");
    assert!(stderr.contains("test hook: shard panics"), "the panic is logged: {stderr}");
    assert!(stderr.contains("ERROR"), "logged at ERROR: {stderr}");

    let (_server, addrs) = spawn(&config, &[]);
    let (addr, http) = addrs.expect("restarted");
    let client = admin(addr).await;
    assert!(listed(&client, "BEFORE-1").await, "what was acknowledged is there");
    assert!(!listed(&client, "FATAL-1").await, "the batch that panicked was never logged");
    assert!(readyz(http).await.0.contains("200"));
}

/// Issue #19, item 5: readiness never says ready with a shard down. Here the shard's log
/// writer fails (its snapshot's temporary file cannot be created), so the shard takes no more
/// work: `/readyz` must say so.
#[tokio::test]
async fn readyz_is_not_ready_while_a_shard_is_down() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = server_config();
    config.engine.shards = 1;
    config.engine.durability.data_dir = Some(data(dir.path()));
    config.engine.durability.snapshot_every_records = 2;
    let server = crate::support::server::start_with(config).await;
    let (status, _) = http_get(&server, "/readyz").await;
    assert!(status.contains("200"), "{status}");
    // Where the next snapshot is written first: a directory, so the write fails.
    std::fs::create_dir(data(dir.path()).join("shard-000.tmp")).unwrap();
    let client = crate::support::server::client(&server, ADMIN_KEY).await;
    let mut refused = false;
    for id in 1..=10u128 {
        let request = Request::RegisterTerminals(RegisterTerminals {
            client_request_id: id,
            provider_code: 100,
            terminals: vec![TerminalEntry { terminal_id: format!("T-{id}"), service: None }],
        });
        if !matches!(client.call(&request).await, Ok(Response::Ok(_))) {
            refused = true;
            break;
        }
    }
    assert!(refused, "the shard stopped acknowledging once its log failed");
    let (status, body) = http_get(&server, "/readyz").await;
    assert!(status.contains("503"), "{status} {body}");
    assert!(body.contains("shards down [0]"), "{body}");
    server.shutdown().await;
}

/// Issue #19, item 8: under umask 022 the data directory is still 0700 and its files 0600;
/// a directory open to every user is warned about, and the files in it made private.
#[tokio::test]
async fn the_data_directory_is_private_whatever_the_umask() {
    let dir = tempfile::tempdir().unwrap();
    let config = config_file(dir.path(), 2);
    let (server, addrs) = spawn(&config, &[]);
    let (addr, _) = addrs.expect("started");
    let client = admin(addr).await;
    for id in 1..=5u128 {
        client.call_ok(&register(id, &format!("P-{id}"))).await.unwrap();
    }
    let data = data(dir.path());
    let snapshot = shard_snapshot_path(&data, 0);
    let prev = settlegate_engine::wal::shard_prev_log_path(&data, 0);
    let deadline = Instant::now() + Duration::from_secs(10);
    // Written, and the log it covers removed (snapshots are written beside the log).
    while !snapshot.exists() || prev.exists() {
        assert!(Instant::now() < deadline, "a snapshot is written");
        std::thread::sleep(Duration::from_millis(20));
    }
    server.kill();
    assert_eq!(mode(&data), 0o700, "the data directory");
    // Every file in it, at whatever step the kill found the writer: the next snapshot (the
    // fourth record's) may have its log renamed to the previous log and no new one yet.
    let files: Vec<_> =
        std::fs::read_dir(&data).unwrap().map(|entry| entry.unwrap().path()).collect();
    assert!(files.contains(&snapshot), "the snapshot: {files:?}");
    let log = shard_log_path(&data, 0);
    assert!(files.contains(&log) || files.contains(&prev), "a log: {files:?}");
    for file in &files {
        assert_eq!(mode(file), 0o600, "{}", file.display());
    }

    // A directory open to every user is warned about, and the files in it (an older build's,
    // world-readable) are made private at start.
    std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::set_permissions(&snapshot, std::fs::Permissions::from_mode(0o644)).unwrap();
    let (server, addrs) = spawn(&config, &[]);
    addrs.expect("started");
    let stderr = server.kill();
    assert!(
        stderr.lines().any(|l| l.contains("WARN") && l.contains("open to every user")),
        "warned: {stderr}"
    );
    assert_eq!(mode(&snapshot), 0o600, "the snapshot, made private at start");
    assert_eq!(mode(&log), 0o600);
}

fn inode(path: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).unwrap().ino()
}

/// The side files recovery has kept shard 0's cut log tails in.
fn side_files(data: &Path) -> Vec<PathBuf> {
    let cut = |path: &PathBuf| {
        path.file_name().unwrap().to_string_lossy().starts_with("shard-000.wal.cut-")
    };
    std::fs::read_dir(data).unwrap().map(|e| e.unwrap().path()).filter(cut).collect()
}

/// The generation in shard 0's log header (big-endian, bytes 16..24); none while the file is
/// shorter (being made) or absent (being renamed).
fn log_generation(data: &Path) -> Option<u64> {
    let bytes = std::fs::read(shard_log_path(data, 0)).ok()?;
    Some(u64::from_be_bytes(bytes.get(16..24)?.try_into().unwrap()))
}

/// Shard 0's log generation once no rotation is under way: the log there, no previous log
/// left (its snapshot is in place), and both so across 50 ms.
async fn settled_generation(data: &Path) -> u64 {
    let prev = settlegate_engine::wal::shard_prev_log_path(data, 0);
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut seen = None;
    loop {
        let now = log_generation(data).filter(|_| !prev.exists());
        if let Some(generation) = now.filter(|_| now == seen) {
            return generation;
        }
        assert!(Instant::now() < deadline, "the log settles");
        seen = now;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Registers terminals `ids` (one record each; an even count, from a snapshot's boundary, with
/// a snapshot every 2 records) and waits until the log has been started afresh at least once
/// for each pair and the last snapshot is in place. The reply to a snapshot's last record may
/// come before the writer starts the next log: waiting for the previous log to be gone alone
/// found the one before it already gone, and read files mid-rotation.
async fn register_and_settle(client: &Client, data: &Path, ids: std::ops::RangeInclusive<u128>) {
    let before = settled_generation(data).await;
    let rotations = (ids.end() - ids.start() + 1) as u64 / 2;
    for id in ids {
        client.call_ok(&register(id, &format!("T-{id}"))).await.unwrap();
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while settled_generation(data).await < before + rotations {
        assert!(Instant::now() < deadline, "the snapshot is written");
    }
}

/// Issue #24: a log is written over the file of the log before the last (`wal::start_log`,
/// which makes its syncs cheaper). Killed with that older log's records after its own, the
/// restart recovers everything acknowledged and cuts those bytes (not this log's records)
/// into a side file; stopped cleanly, the log is cut at its last record, so the restart cuts
/// nothing.
#[tokio::test]
async fn a_log_written_over_an_older_ones_file_recovers_its_own_records_alone() {
    let dir = tempfile::tempdir().unwrap();
    let config = config_file(dir.path(), 2);
    let data = data(dir.path());
    let (log, free) = (shard_log_path(&data, 0), data.join("shard-000.free"));
    let (server, addrs) = spawn(&config, &[]);
    let client = admin(addrs.expect("started").0).await;
    // A snapshot every 2 records: after the second, the log before the last is kept.
    register_and_settle(&client, &data, 1..=4).await;
    assert!(free.exists(), "the log before the last is kept for the next");
    let (older, older_bytes) = (inode(&free), std::fs::read(&free).unwrap());
    // The next snapshot starts the log over that file: its header, its own records, then the
    // older log's.
    register_and_settle(&client, &data, 5..=6).await;
    assert_eq!(inode(&log), older, "the log is written over the older log's file");
    server.kill();
    let killed = std::fs::read(&log).unwrap();
    assert_eq!(killed.len(), older_bytes.len(), "the older log's bytes follow");
    assert_eq!(side_files(&data).len(), 0);

    let (server, addrs) = spawn(&config, &[]);
    let client = admin(addrs.expect("restarted").0).await;
    // Cut where the log's own records end (none: its snapshot's records were the last), and
    // only the older log's bytes, kept in a side file.
    let side = side_files(&data);
    assert_eq!(side.len(), 1, "kept in a side file");
    let cut = std::fs::read(&side[0]).unwrap();
    let own = killed.len() - cut.len();
    assert_eq!(own, 32, "the log's header (32 bytes) alone stays");
    assert_eq!(cut, &killed[own..]);
    assert_eq!(killed[own..], older_bytes[own..], "and nothing else");
    assert_eq!(std::fs::read(&log).unwrap()[..own], killed[..own]);
    for id in 1..=6 {
        assert!(listed(&client, &format!("T-{id}")).await, "T-{id}");
    }

    // Over another older log's file, with that log's bytes after its own records, a clean
    // stop (SIGTERM).
    register_and_settle(&client, &data, 7..=10).await;
    let before = std::fs::metadata(&log).unwrap().len();
    assert!(before > 32, "an older log's bytes follow the header");
    client.call_ok(&register(11, "T-11")).await.unwrap();
    let (log_inode, written) = (inode(&log), std::fs::read(&log).unwrap());
    let pid = server.child.id().to_string();
    assert!(Command::new("kill").args(["-TERM", &pid]).status().unwrap().success());
    let (status, stderr) = server.wait();
    assert!(status.success(), "{status:?}");
    assert!(
        stderr.lines().any(|l| l.contains("WARN") && l.contains("an older log's bytes")),
        "the cut at the restart told for what it was: {stderr}"
    );
    let after = std::fs::read(&log).unwrap();
    assert_eq!(inode(&log), log_inode);
    assert!(after.len() < written.len() && written.starts_with(&after), "cut at its last record");
    let (server, addrs) = spawn(&config, &[]);
    let client = admin(addrs.expect("restarted").0).await;
    for id in 1..=11 {
        assert!(listed(&client, &format!("T-{id}")).await, "T-{id}");
    }
    let stderr = server.kill();
    assert_eq!(side_files(&data).len(), 1, "nothing cut after a clean stop: {stderr}");
}

/// Issue #19, item 11: a snapshot's temporary file left by a SIGKILL is removed at start.
#[tokio::test]
async fn a_stale_snapshot_temporary_file_is_removed_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let config = config_file(dir.path(), 0);
    let (server, addrs) = spawn(&config, &[]);
    let (addr, _) = addrs.expect("started");
    admin(addr).await.call_ok(&register(1, "TMP-1")).await.unwrap();
    server.kill();
    let tmp = data(dir.path()).join("shard-000.tmp");
    std::fs::write(&tmp, b"SGSNAP\0\0 half a snapshot").unwrap();
    let (_server, addrs) = spawn(&config, &[]);
    let (addr, _) = addrs.expect("restarted");
    assert!(!tmp.exists(), "the stale temporary file is gone");
    assert!(listed(&admin(addr).await, "TMP-1").await);
}

/// Writes `count` records (one terminal each), kills the server, and returns the log's bytes.
async fn written_then_killed(config: &Path, count: u128) -> (PathBuf, Vec<u8>) {
    let (server, addrs) = spawn(config, &[]);
    let (addr, _) = addrs.expect("started");
    let client = admin(addr).await;
    for id in 1..=count {
        client.call_ok(&register(id, &format!("T-{id}"))).await.unwrap();
    }
    server.kill();
    let log = shard_log_path(&data(config.parent().unwrap()), 0);
    let bytes = std::fs::read(&log).unwrap();
    (log, bytes)
}

/// Issue #19, item 10 (the reviewer's repro): bit 30 set in the length of a record in the middle
/// of the log. The start is refused naming the file and the record's offset; the log is left as
/// it was (the acknowledged records after the damage are evidence, not a torn tail).
#[tokio::test]
async fn a_corrupt_length_mid_log_refuses_the_start_and_keeps_the_log() {
    let dir = tempfile::tempdir().unwrap();
    let config = config_file(dir.path(), 0);
    let (log, mut bytes) = written_then_killed(&config, 40).await;
    let offsets = record_offsets(&bytes);
    let middle = offsets[offsets.len() / 2];
    bytes[middle] |= 0x40; // Bit 30 of the big-endian length.
    std::fs::write(&log, &bytes).unwrap();

    let (server, addrs) = spawn(&config, &[]);
    assert!(addrs.is_none(), "the server must not start on a corrupt log");
    let (status, stderr) = server.wait();
    assert!(!status.success());
    assert!(stderr.contains(&log.display().to_string()), "names the file: {stderr}");
    assert!(stderr.contains(&format!("offset {middle}")), "names the offset {middle}: {stderr}");
    assert_eq!(std::fs::read(&log).unwrap(), bytes, "the log is untouched");
}

/// Issue #19, item 10: a torn tail is still cut (a partial write is never acknowledged), but
/// its bytes are kept in a side file beside the log, and the cut is logged at ERROR with its
/// size.
#[tokio::test]
async fn a_torn_tail_is_cut_into_a_side_file() {
    let dir = tempfile::tempdir().unwrap();
    let config = config_file(dir.path(), 0);
    let (log, bytes) = written_then_killed(&config, 5).await;
    let last = *record_offsets(&bytes).last().unwrap();
    let torn = &bytes[..bytes.len() - 3];
    std::fs::write(&log, torn).unwrap();

    let (server, addrs) = spawn(&config, &[]);
    let (addr, _) = addrs.expect("a torn tail does not stop the start");
    assert!(listed(&admin(addr).await, "T-4").await);
    let stderr = server.kill();
    let side = side_files(&data(dir.path()));
    assert_eq!(side.len(), 1, "one side file: {side:?}");
    assert_eq!(std::fs::read(&side[0]).unwrap(), &torn[last..], "it holds the cut bytes");
    assert_eq!(mode(&side[0]), 0o600);
    let now = std::fs::read(&log).unwrap();
    assert!(now.starts_with(&bytes[..last]), "the whole records stay");
    assert_ne!(now.get(last..bytes.len() - 3), Some(&torn[last..]), "the torn bytes were cut");
    let size = format!("bytes={}", torn.len() - last);
    assert!(
        stderr.lines().any(|l| l.contains("ERROR") && l.contains(&size)),
        "logged at ERROR with its size ({size}): {stderr}"
    );
}
