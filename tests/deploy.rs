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

// The files under deploy/, checked with the tools that check them here. A missing tool fails
// its test with the command that installs it; nothing is skipped.

const INSTALL_HINT: &str = "install the checkers with `python3 -m pip install -r \
    deploy/requirements.txt` (scripts/test.sh does), and systemd-analyze with `apt-get install \
    systemd`";

fn repo_file(path: &str) -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

fn read(path: &str) -> String {
    std::fs::read_to_string(repo_file(path)).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// `tool` on `PATH`, else in the directory where pip puts `python3`'s scripts (which need not
/// be on `PATH`); panics with [`INSTALL_HINT`] when it is in neither.
fn tool(name: &str) -> std::path::PathBuf {
    let runs = |path: &Path| {
        Command::new(path).arg("--version").stdout(Stdio::null()).stderr(Stdio::null()).status()
    };
    if runs(Path::new(name)).is_ok_and(|status| status.success()) {
        return name.into();
    }
    let scripts = Command::new("python3")
        .args(["-c", "import sysconfig; print(sysconfig.get_path('scripts'))"])
        .output()
        .ok()
        .filter(|output| output.status.success())
        .map(|output| String::from_utf8_lossy(&output.stdout).trim().to_owned());
    if let Some(path) = scripts.map(|dir| Path::new(&dir).join(name)) {
        if runs(&path).is_ok_and(|status| status.success()) {
            return path;
        }
    }
    panic!("{name} not found on PATH nor among python3's scripts; {INSTALL_HINT}");
}

/// Runs `command`; panics with its output unless it exits 0 having printed nothing on stderr
/// (`systemd-analyze verify` exits 0 on a misspelt key, only saying so).
fn run_clean(mut command: Command) -> String {
    let output = command.output().unwrap_or_else(|e| panic!("{command:?}: {e}"));
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success() && stderr.trim().is_empty(),
        "{command:?}: {}\nstdout:\n{stdout}\nstderr:\n{stderr}",
        output.status
    );
    stdout
}

/// The config at `path`, parsed and checked as `settlegate serve` does.
fn deploy_config(path: &str) -> settlegate::config::Config {
    settlegate::config::Config::from_toml(&read(path)).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// `systemd-analyze verify` on the unit, its `ExecStart` pointed at the binary just built (it
/// checks that the command exists); and the unit and its config agree: readiness, state
/// directory, credential.
#[test]
fn the_systemd_unit_verifies_and_matches_its_config() {
    let unit = read("deploy/systemd/settlegate.service");
    for line in [
        "Type=notify",
        "ExecStart=/usr/local/bin/settlegate serve --config /etc/settlegate/settlegate.toml",
        "StateDirectory=settlegate",
        "StateDirectoryMode=0700",
        "LoadCredential=vault-key:/etc/settlegate/vault-key",
        "ProtectSystem=strict",
    ] {
        assert!(unit.lines().any(|l| l == line), "the unit lacks {line}");
    }
    let config = deploy_config("deploy/systemd/settlegate.toml");
    let durability = &config.engine.durability;
    assert_eq!(durability.data_dir.as_deref(), Some(Path::new("/var/lib/settlegate")));
    assert_eq!(
        config.engine.vault_key_file.as_deref(),
        Some(Path::new("${CREDENTIALS_DIRECTORY}/vault-key"))
    );

    let dir = tempfile::tempdir().unwrap();
    let copy = dir.path().join("settlegate.service");
    let binary = env!("CARGO_BIN_EXE_settlegate");
    std::fs::write(&copy, unit.replace("/usr/local/bin/settlegate", binary)).unwrap();
    let mut verify = Command::new(tool("systemd-analyze"));
    verify.args(["verify", "--man=no"]).arg(&copy);
    run_clean(verify);
}

/// hadolint on the Dockerfile (every rule, at every level); the image runs as the fixed
/// non-root user on the container config.
#[test]
fn the_dockerfile_passes_hadolint() {
    let dockerfile = read("deploy/Dockerfile");
    assert!(dockerfile.lines().any(|l| l == "USER 10001:10001"), "the image runs as 10001");
    assert!(dockerfile.contains("COPY deploy/container/settlegate.toml /etc/settlegate/"));
    assert_eq!(dockerfile.matches("\nFROM ").count(), 2, "a builder stage and a runtime stage");
    let mut hadolint = Command::new(tool("hadolint"));
    hadolint
        .args(["--failure-threshold", "info", "--no-color"])
        .arg(repo_file("deploy/Dockerfile"));
    run_clean(hadolint);
}

/// The manifests against the Kubernetes schemas (strict: an unknown field fails), for the
/// oldest release with native sidecars on by default (1.29) and for kubernetes-validate's
/// newest; yamllint; and the manifests agree with the config they mount.
#[test]
fn the_kubernetes_manifests_validate_and_match_the_config() {
    let path = repo_file("deploy/kubernetes/settlegate.yaml");
    for version in ["1.29.0", "1.37.0"] {
        let mut validate = Command::new(tool("kubernetes-validate"));
        validate.args(["--strict", "--quiet", "-k", version]).arg(&path);
        run_clean(validate);
    }
    let mut yamllint = Command::new(tool("yamllint"));
    yamllint
        .args(["--strict", "-d"])
        .arg("{extends: default, rules: {line-length: {max: 100}, braces: {min-spaces-inside: 0}}}")
        .arg(&path);
    run_clean(yamllint);

    let manifest = read("deploy/kubernetes/settlegate.yaml");
    // The ConfigMap carries deploy/container/settlegate.toml (also the image's) word for word.
    let marker = "  settlegate.toml: |\n";
    let start = manifest.find(marker).expect("the ConfigMap's settlegate.toml") + marker.len();
    let embedded: String = manifest[start..]
        .lines()
        .take_while(|line| line.is_empty() || line.starts_with("    "))
        .map(|line| format!("{}\n", line.strip_prefix("    ").unwrap_or(line)))
        .collect();
    let container = read("deploy/container/settlegate.toml");
    assert_eq!(embedded, container, "the ConfigMap and deploy/container/settlegate.toml differ");

    let config = deploy_config("deploy/container/settlegate.toml");
    // The probes reach the HTTP port through the pod's IP.
    assert!(config.server.http_listen.ip().is_unspecified(), "http_listen must be 0.0.0.0");
    let port = config.server.http_listen.port();
    assert!(manifest.contains(&format!("- {{name: metrics, containerPort: {port}}}")));
    for probe in ["startupProbe", "readinessProbe", "livenessProbe"] {
        assert!(manifest.contains(&format!("{probe}:\n            httpGet: {{path: /")), "{probe}");
    }
    // A native sidecar.
    let sidecar = &manifest[manifest.find("initContainers:").expect("an init container")..];
    assert!(sidecar.contains("          restartPolicy: Always\n"));
    // CPU limit = io_threads.
    let cpu = format!("limits: {{cpu: \"{}\"", config.server.io_threads);
    assert!(config.server.io_threads > 0 && manifest.contains(&cpu), "io_threads and {cpu}");
    // The data directory on the claim's mount, the key file on the Secret's.
    let data_dir = config.engine.durability.data_dir.as_deref().expect("a data_dir");
    assert!(data_dir.starts_with("/var/lib/settlegate"));
    assert!(manifest.contains("- {name: settlegate-data, mountPath: /var/lib/settlegate}"));
    assert!(
        manifest.contains("volumeClaimTemplates:\n    - metadata:\n        name: settlegate-data")
    );
    let key_file = config.engine.vault_key_file.as_deref().expect("a vault_key_file");
    assert_eq!(key_file, Path::new("/run/secrets/settlegate/vault-key"));
    assert!(manifest.contains("- {name: settlegate-vault, mountPath: /run/secrets/settlegate,"));
    assert!(manifest.contains("- {key: vault-key, path: vault-key}"));
    for hardening in [
        "readOnlyRootFilesystem: true",
        "runAsNonRoot: true",
        "capabilities: {drop: [\"ALL\"]}",
        "seccompProfile: {type: RuntimeDefault}",
        "allowPrivilegeEscalation: false",
    ] {
        assert!(sidecar.contains(hardening), "the sidecar lacks {hardening}");
    }
}

/// The license the workspace declares is the one in LICENSE.
#[test]
fn the_declared_license_is_in_the_tree() {
    assert!(read("Cargo.toml").contains("license = \"Apache-2.0\""));
    let license = read("LICENSE");
    assert!(
        license.contains("Apache License\n                           Version 2.0, January 2004")
    );
    assert!(license.contains("END OF TERMS AND CONDITIONS"));
}
