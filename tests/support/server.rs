//! A server on 127.0.0.1:0 with test identities, for black-box tests over real sockets.
#![allow(dead_code)]

use settlegate_protocol::ops::{AddMeans, Enroll};
use std::time::Duration;

use settlegate::config::{Config, IdentityConfig};
use settlegate::server::RunningServer;
use settlegate_protocol::Client;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// All permissions, every terminal, providers 100, 200, 300.
pub const ADMIN_KEY: &str = "test-admin-key";
/// `authorize` only, for terminals `SHOP-A-*`.
pub const TERMINAL_KEY: &str = "test-terminal-key";

pub fn identity(
    name: &str,
    key: &str,
    permissions: &[&str],
    terminals: &[&str],
    providers: &[u32],
) -> IdentityConfig {
    IdentityConfig {
        name: name.into(),
        api_key_sha256: Some(hex::encode(Sha256::digest(key.as_bytes()))),
        cert_sha256: None,
        permissions: permissions.iter().map(|p| p.to_string()).collect(),
        terminals: terminals.iter().map(|t| t.to_string()).collect(),
        providers: providers.to_vec(),
    }
}

/// The test server config: the engine of `support::config()`, ephemeral ports, short
/// timeouts so timeout behaviour is quick to observe.
pub fn server_config() -> Config {
    let mut config = Config::embedded();
    config.engine = super::config();
    config.engine.mailbox_capacity = 64;
    config.demo.users = 0;
    config.demo.stores = false;
    config.server.listen = "127.0.0.1:0".parse().unwrap();
    config.server.http_listen = "127.0.0.1:0".parse().unwrap();
    config.server.frame_read_timeout_ms = 300;
    config.server.auth_timeout_ms = 2_000;
    config.server.idle_timeout_ms = 5_000;
    config.server.identities = vec![
        identity(
            "admin",
            ADMIN_KEY,
            &["authorize", "accounts", "providers", "stores"],
            &["*"],
            &[100, 200, 300],
        ),
        identity("shop-a", TERMINAL_KEY, &["authorize"], &["SHOP-A-*"], &[]),
    ];
    config
}

pub async fn start() -> RunningServer {
    start_with(server_config()).await
}

pub async fn start_with(config: Config) -> RunningServer {
    settlegate::server::start(config).await.expect("server starts")
}

/// A client authenticated with `key`.
pub async fn client(server: &RunningServer, key: &str) -> Client {
    let client = Client::connect(server.addr).await.expect("connect");
    client.authenticate(key).await.expect("auth");
    client
}

/// Reads until EOF or `limit`, returning what came.
pub async fn read_until_close(stream: &mut TcpStream, limit: Duration) -> (Vec<u8>, bool) {
    let mut out = Vec::new();
    let result = tokio::time::timeout(limit, async {
        let mut chunk = [0u8; 4096];
        loop {
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => return true,
                Ok(n) => out.extend_from_slice(&chunk[..n]),
            }
        }
    })
    .await;
    (out, result.unwrap_or(false))
}

/// A raw connection that sent `bytes`.
pub async fn raw(server: &RunningServer, bytes: &[u8]) -> TcpStream {
    raw_at(server.addr, bytes).await
}

/// A raw connection to `addr` that sent `bytes`.
pub async fn raw_at(addr: std::net::SocketAddr, bytes: &[u8]) -> TcpStream {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream.write_all(bytes).await.unwrap();
    stream
}

/// A plain HTTP/1.1 GET against the server's HTTP port: (status line, body).
pub async fn http_get(server: &RunningServer, path: &str) -> (String, String) {
    http_get_at(server.http_addr, path).await
}

/// A plain GET of `path` on the HTTP port at `addr`: (status line, body).
pub async fn http_get_at(addr: std::net::SocketAddr, path: &str) -> (String, String) {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    let request = format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let (bytes, _) = read_until_close(&mut stream, Duration::from_secs(5)).await;
    let text = String::from_utf8_lossy(&bytes).into_owned();
    let status = text.lines().next().unwrap_or("").to_owned();
    let body = text.split("\r\n\r\n").nth(1).unwrap_or("").to_owned();
    (status, body)
}

/// A config file for the real binary: ephemeral ports, the admin identity (provider 1), cheap
/// Argon2 (tests only), a fixed vault key, `engine_extra` lines in `[engine]`, and provider 1
/// with the inline `adapter` table.
pub fn binary_config(
    dir: &std::path::Path,
    adapter: &str,
    engine_extra: &str,
) -> std::path::PathBuf {
    let admin = hex::encode(Sha256::digest(ADMIN_KEY.as_bytes()));
    let text = format!(
        r#"
[server]
listen = "127.0.0.1:0"
http_listen = "127.0.0.1:0"

[[server.identities]]
name = "admin"
api_key_sha256 = "{admin}"
permissions = ["authorize", "accounts", "providers"]
terminals = ["*"]
providers = [1]

[engine]
password = {{ memory_kib = 64, iterations = 1, parallelism = 1 }}
vault = {{ key_hex = "{vault}" }}
{engine_extra}

[[engine.providers]]
code = 1
name = "sim"
adapter = {adapter}
"#,
        vault = "55".repeat(32),
    );
    let path = dir.join("settlegate.toml");
    std::fs::write(&path, text).unwrap();
    path
}

/// Starts the `settlegate` binary on `config` and returns it with the protocol address it
/// printed.
pub fn spawn_binary(config: &std::path::Path) -> (std::process::Child, std::net::SocketAddr) {
    spawn_binary_logging(config, "error", std::process::Stdio::inherit())
}

/// Like [`spawn_binary`], with the log filter `rust_log` and the log going to `stderr`.
pub fn spawn_binary_logging(
    config: &std::path::Path,
    rust_log: &str,
    stderr: std::process::Stdio,
) -> (std::process::Child, std::net::SocketAddr) {
    let (child, addr, _) = spawn_binary_serving(config, rust_log, stderr);
    (child, addr)
}

/// Like [`spawn_binary_logging`], also returning the HTTP address the binary printed.
pub fn spawn_binary_serving(
    config: &std::path::Path,
    rust_log: &str,
    stderr: std::process::Stdio,
) -> (std::process::Child, std::net::SocketAddr, std::net::SocketAddr) {
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_settlegate"))
        .args(["serve", "--config"])
        .arg(config)
        .env("RUST_LOG", rust_log)
        .stdout(std::process::Stdio::piped())
        .stderr(stderr)
        .spawn()
        .expect("spawn settlegate");
    let (addr, http) = printed_addresses(&mut child);
    (child, addr, http)
}

/// The protocol and HTTP addresses a `settlegate serve` started with piped stdout printed;
/// its stdout is drained from then on, so the child never blocks on a full pipe.
pub fn printed_addresses(
    child: &mut std::process::Child,
) -> (std::net::SocketAddr, std::net::SocketAddr) {
    use std::io::{BufRead, BufReader};
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let (mut addr, mut http) = (None, None);
    while addr.is_none() || http.is_none() {
        let line = lines.next().expect("settlegate printed its addresses").unwrap();
        let line = line.trim();
        if let Some(rest) = line.strip_prefix("protocol") {
            addr = Some(rest.trim().split("://").nth(1).unwrap().parse().unwrap());
        }
        if let Some(rest) = line.strip_prefix("http") {
            let url = rest.split_whitespace().next().unwrap();
            let host = url.trim_start_matches("http://").split('/').next().unwrap();
            http = Some(host.parse().unwrap());
        }
    }
    // Keep draining stdout so the child never blocks on a full pipe.
    std::thread::spawn(move || for _ in lines {});
    (addr.unwrap(), http.unwrap())
}

/// Decodes every complete frame in `bytes`.
pub fn frames(mut bytes: &[u8]) -> Vec<settlegate_protocol::Frame> {
    let mut out = Vec::new();
    while let Ok(Some((frame, used))) = settlegate_protocol::frame::decode(bytes) {
        out.push(frame);
        bytes = &bytes[used..];
    }
    out
}

/// Now, in milliseconds since the UNIX epoch.
pub fn now_ms() -> i64 {
    use std::time::{SystemTime, UNIX_EPOCH};
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_millis() as i64
}

/// A user with a device that signs inherent IDs, as a phone would, for the server tests.
pub struct Payer {
    /// The user.
    pub user: settlegate_engine::UserKey,
    /// The device's credential.
    pub credential: settlegate_protocol::values::DeviceCredential,
    /// The last counter signed.
    pub counter: u64,
}

impl Payer {
    /// An inherent ID for `amount` JPY by credit card with `provider` at store terminal
    /// `terminal`, signed now with the next counter.
    pub fn sign(&mut self, amount: u64, provider: u32, terminal: &str) -> Vec<u8> {
        self.counter += 1;
        settlegate_engine::InherentId {
            key_version: self.credential.key_version,
            amount_minor: amount,
            currency: super::jpy(),
            means: settlegate_engine::MeansKind::CreditCard,
            means_id: 0,
            provider_code: provider,
            card_idm: self.credential.card_idm,
            user: self.user.clone(),
            terminal_id: terminal.into(),
            counter: self.counter,
            timestamp_ms: now_ms(),
        }
        .sign(self.credential.device_key.expose())
    }
}

/// A new user `name@example.com` with a device and a default card, enrolled over the wire.
pub async fn enroll(client: &Client, name: &str) -> Payer {
    let user = settlegate_engine::UserKey::new(
        settlegate_engine::UserIdType::Mail,
        format!("{name}@example.com"),
    )
    .unwrap();
    let request = settlegate_protocol::messages::Request::Enroll(Enroll {
        client_request_id: super::request_id().get(),
        user: user.clone(),
        password: super::PASSWORD.into(),
        card_idm: super::fresh_idm(),
    });
    let settlegate_protocol::messages::Reply::Enroll(credential) =
        client.call_ok(&request).await.unwrap()
    else {
        panic!()
    };
    let card = settlegate_protocol::messages::Request::AddMeans(AddMeans {
        client_request_id: super::request_id().get(),
        user: user.clone(),
        make_default: true,
        means: settlegate_protocol::messages::MeansInput::CreditCard {
            pan: "5555555555554444".into(),
        },
    });
    let settlegate_protocol::messages::Reply::AddMeans(added) =
        client.call_ok(&card).await.unwrap()
    else {
        panic!()
    };
    assert_eq!(added.last4.as_deref(), Some("4444"));
    Payer { user, credential, counter: 0 }
}

/// A `REDEEM_CODE` of `code` (issuer 1) for `amount_minor` JPY with no sale lines, at
/// `sale_at_ms`, from store terminal `terminal`, with client request ID `id`.
pub fn redeem_request(
    code: &settlegate_protocol::values::IssuedCode,
    id: u128,
    amount_minor: u64,
    sale_at_ms: i64,
    terminal: &str,
) -> settlegate_protocol::messages::Request {
    use settlegate_protocol::messages::{Request, SaleLines};
    Request::RedeemCode(settlegate_protocol::ops::RedeemCode {
        client_request_id: id,
        code: code.text.clone(),
        issuer: 1,
        number: code.number,
        amount_minor,
        currency: super::jpy(),
        sale_at_ms,
        terminal_id: terminal.into(),
        lines: SaleLines::Items(Vec::new()),
        coupon: None,
        order_ref: String::new(),
    })
}

/// A payment code of `amount_minor` JPY for `payer`, authorized by `provider`, requested for
/// store terminal `terminal` (`*`: not known yet), valid `validity_ms`.
pub async fn issue_code(
    client: &Client,
    payer: &mut Payer,
    amount_minor: u64,
    provider: u32,
    terminal: &str,
    validity_ms: i64,
) -> settlegate_protocol::values::IssuedCode {
    use settlegate_protocol::messages::{CodeOutcome, Reply, Request};
    let issue = Request::IssueCode(settlegate_protocol::ops::IssueCode {
        client_request_id: super::request_id().get(),
        inherent_id: payer.sign(amount_minor, provider, terminal),
        validity_ms,
        deliver_to: None,
        order_ref: String::new(),
    });
    match client.call_ok(&issue).await.unwrap() {
        Reply::IssueCode(CodeOutcome::Issued(code)) => *code,
        other => panic!("no code: {other:?}"),
    }
}
