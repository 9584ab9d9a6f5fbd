//! The deployment (`deploy/`, `docs/DEPLOY.md`): systemd's readiness protocol as the real
//! binary speaks it, the vault key read from a file as systemd's credentials hand it over.

use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::support::server::{binary_config, printed_addresses};

const VAULT_KEY_HEX: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

/// A `binary_config` keeping its state in `dir/data`, with the vault key taken from
/// `vault_line` instead of the fixed `key_hex`.
fn durable_config(dir: &Path, vault_line: &str) -> std::path::PathBuf {
    let data = dir.join("data");
    let extra = format!("[engine.durability]\ndata_dir = \"{}\"\n", data.display());
    // `binary_config` puts `engine_extra` in `[engine]`; the durability table must close it,
    // so it goes after the provider instead.
    let path = binary_config(dir, "{ kind = \"simulated\", seed = 1 }", "");
    let text = std::fs::read_to_string(&path).unwrap();
    let fixed = format!("vault = {{ key_hex = \"{}\" }}", "55".repeat(32));
    assert!(text.contains(&fixed), "binary_config still writes the vault key as {fixed}");
    std::fs::write(&path, format!("{}\n{extra}", text.replace(&fixed, vault_line))).unwrap();
    path
}

/// Starts the binary on `config` with `env` set (and `SETTLEGATE_VAULT_KEY` removed), its
/// stdout and stderr piped.
fn spawn(config: &Path, env: &[(&str, &std::ffi::OsStr)]) -> Child {
    let mut command = Command::new(env!("CARGO_BIN_EXE_settlegate"));
    command
        .args(["serve", "--config"])
        .arg(config)
        .env("RUST_LOG", "info")
        .env_remove("SETTLEGATE_VAULT_KEY")
        .env_remove("NOTIFY_SOCKET")
        .env_remove("CREDENTIALS_DIRECTORY")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (name, value) in env {
        command.env(name, value);
    }
    command.spawn().expect("spawn settlegate")
}

/// One HTTP/1.1 GET: the status line.
fn http_status(addr: std::net::SocketAddr, path: &str) -> String {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(5)).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    write!(stream, "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n").unwrap();
    let mut text = String::new();
    stream.read_to_string(&mut text).unwrap();
    text.lines().next().unwrap_or("").to_owned()
}

/// The next datagram on `socket` as text, within `limit`.
fn next_notification(socket: &UnixDatagram, limit: Duration) -> String {
    socket.set_read_timeout(Some(limit)).unwrap();
    let mut buffer = [0u8; 4096];
    let n = socket.recv(&mut buffer).expect("a notification from settlegate");
    String::from_utf8(buffer[..n].to_vec()).unwrap()
}

fn terminate(child: &Child) {
    let status = Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap();
    assert!(status.success());
}

fn wait_with_limit(child: &mut Child, limit: Duration) -> std::process::ExitStatus {
    let started = Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        if started.elapsed() > limit {
            child.kill().ok();
            panic!("settlegate did not exit within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `Type=notify`: `READY=1` arrives once the server answers on both of its ports (recovery of
/// its data directory done), and `STOPPING=1` when SIGTERM starts the shutdown; nothing is
/// sent before `READY=1`.
#[test]
fn ready_is_notified_once_the_server_answers_and_stopping_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let socket_path = dir.path().join("notify.sock");
    let socket = UnixDatagram::bind(&socket_path).unwrap();
    let config =
        durable_config(dir.path(), &format!("vault = {{ key_hex = \"{VAULT_KEY_HEX}\" }}"));
    // Twice: the second start recovers the data directory the first one wrote.
    for round in 0..2 {
        let mut child = spawn(&config, &[("NOTIFY_SOCKET", socket_path.as_os_str())]);
        let first = next_notification(&socket, Duration::from_secs(60));
        assert!(first.lines().any(|line| line == "READY=1"), "round {round}: {first:?}");
        assert!(first.lines().any(|line| line.starts_with("STATUS=listening on ")), "{first:?}");
        // The moment READY=1 is read, both ports answer: no retry, no wait.
        let (addr, http) = printed_addresses(&mut child);
        assert_eq!(http_status(http, "/readyz"), "HTTP/1.1 200 OK", "round {round}");
        std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(1))
            .expect("the protocol port accepts once READY=1 is sent");
        terminate(&child);
        let last = next_notification(&socket, Duration::from_secs(30));
        assert_eq!(last, "STOPPING=1\n", "round {round}");
        let status = wait_with_limit(&mut child, Duration::from_secs(30));
        assert!(status.success(), "round {round}: {status:?}");
    }
}

/// Without `NOTIFY_SOCKET` (a container, a shell) nothing is sent and the server runs as ever.
#[test]
fn without_notify_socket_the_server_starts_and_stops_as_before() {
    let dir = tempfile::tempdir().unwrap();
    let config =
        durable_config(dir.path(), &format!("vault = {{ key_hex = \"{VAULT_KEY_HEX}\" }}"));
    let mut child = spawn(&config, &[]);
    let (_, http) = printed_addresses(&mut child);
    assert_eq!(http_status(http, "/readyz"), "HTTP/1.1 200 OK");
    terminate(&child);
    assert!(wait_with_limit(&mut child, Duration::from_secs(30)).success());
}

/// systemd's `LoadCredential=vault-key:...` and `vault_key_file =
/// "${CREDENTIALS_DIRECTORY}/vault-key"`: the binary starts on the key in the file (a data
/// directory refuses to start without a lasting key), and a malformed file stops the start
/// with an error naming the file, not the key.
#[test]
fn the_vault_key_file_is_read_from_the_credentials_directory() {
    let dir = tempfile::tempdir().unwrap();
    let credentials = dir.path().join("credentials");
    std::fs::create_dir(&credentials).unwrap();
    std::fs::write(credentials.join("vault-key"), format!("{VAULT_KEY_HEX}\n")).unwrap();
    let config =
        durable_config(dir.path(), "vault_key_file = \"${CREDENTIALS_DIRECTORY}/vault-key\"");
    let mut child = spawn(&config, &[("CREDENTIALS_DIRECTORY", credentials.as_os_str())]);
    let (_, http) = printed_addresses(&mut child);
    assert_eq!(http_status(http, "/readyz"), "HTTP/1.1 200 OK");
    terminate(&child);
    assert!(wait_with_limit(&mut child, Duration::from_secs(30)).success());

    std::fs::write(credentials.join("vault-key"), &VAULT_KEY_HEX[..40]).unwrap();
    let child = spawn(&config, &[("CREDENTIALS_DIRECTORY", credentials.as_os_str())]);
    let output = child.wait_with_output().unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    let named = format!("engine.vault_key_file {}", credentials.join("vault-key").display());
    assert!(stderr.contains(&named), "{stderr}");
    assert!(stderr.contains("64 hex digits"), "{stderr}");
    assert!(!stderr.contains(&VAULT_KEY_HEX[..40]), "{stderr}");

    // Without CREDENTIALS_DIRECTORY (not started by systemd) the error says so.
    let output = spawn(&config, &[]).wait_with_output().unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("CREDENTIALS_DIRECTORY is not set"), "{stderr}");
}
