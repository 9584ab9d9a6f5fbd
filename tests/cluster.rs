//! The cluster on NATS JetStream, end to end: real `nats-server` processes (3, clustered, on
//! loopback, `sync_interval: always`) and real `settlegate` nodes, killed with SIGKILL or
//! paused with SIGSTOP under load. An acknowledged-operation ledger (as `server_crash.rs`
//! keeps) is checked against the survivors: nothing acknowledged is lost, no code is redeemed
//! twice, and no node acknowledges anything after another node fenced it.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};
use settlegate_engine::{AuthOutcome, InherentId, MeansKind, ReasonCode, UserIdType, UserKey};
use settlegate_protocol::messages::{CodeOutcome, CodeState, MeansInput};
use settlegate_protocol::messages::{Reply, Request, Response};
use settlegate_protocol::ops::code_state::GetCodeState;
use settlegate_protocol::ops::{AddMeans, Authorize, Enroll, IssueCode};
use settlegate_protocol::values::{DeviceCredential, IssuedCode, Redemption};
use settlegate_protocol::{Client, ClusterClient, Patience};
use sha2::{Digest, Sha256};
use tokio::sync::Mutex;

use crate::support::nats::NatsCluster;
use crate::support::server::{now_ms, redeem_request, spawn_binary_serving, ADMIN_KEY};
use crate::support::{jpy, PASSWORD};

/// A free TCP port on loopback below the ephemeral range (so a restarted node gets its own
/// port back, and no outgoing connection takes it meanwhile).
fn free_port() -> u16 {
    let mut rng = rand::thread_rng();
    loop {
        let port = rng.gen_range(20_000..32_000);
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

/// One settlegate node of the cluster: its config, and its process while it runs.
struct Node {
    name: String,
    config: PathBuf,
    addr: SocketAddr,
    http: SocketAddr,
    child: Option<std::process::Child>,
}

impl Node {
    fn new(
        dir: &Path,
        name: &str,
        nats: &[String],
        partitions: usize,
        purge_ms: u64,
        snapshot_every: u64,
        extra: &str,
    ) -> Node {
        let (port, http_port) = (free_port(), free_port());
        let admin = hex::encode(Sha256::digest(ADMIN_KEY.as_bytes()));
        let nats: Vec<String> = nats.iter().map(|url| format!("\"{url}\"")).collect();
        let text = format!(
            r#"
[server]
listen = "127.0.0.1:{port}"
http_listen = "127.0.0.1:{http_port}"

[[server.identities]]
name = "admin"
api_key_sha256 = "{admin}"
permissions = ["authorize", "accounts", "providers"]
terminals = ["*"]
providers = [1]

[engine]
shards = {partitions}
password = {{ memory_kib = 64, iterations = 1, parallelism = 1 }}
vault = {{ key_hex = "{vault}" }}

[[engine.providers]]
code = 1
name = "sim"
adapter = {{ kind = "simulated", latency_us_min = 0, latency_us_max = 2000, decline_rate = 0.0, failure_rate = 0.0 }}

[cluster]
node = "{name}"
nats = [{nats}]
name = "sgtest"
advertise = "127.0.0.1:{port}"
heartbeat_ms = 200
owner_timeout_ms = 1200
settle_ms = 600
snapshot_every_records = {snapshot_every}
purge_after_ms = {purge_ms}
cache_dir = "{cache}"
{extra}
"#,
            vault = "55".repeat(32),
            cache = dir.join(format!("{name}-cache")).display(),
            nats = nats.join(", "),
        );
        let config = dir.join(format!("{name}.toml"));
        std::fs::write(&config, text).unwrap();
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let http = SocketAddr::from(([127, 0, 0, 1], http_port));
        Node { name: name.to_owned(), config, addr, http, child: None }
    }

    fn start(&mut self) {
        assert!(self.child.is_none(), "{} runs already", self.name);
        let log_path = self.config.with_extension("log");
        let log = std::fs::File::create(&log_path).unwrap();
        // At `info`, the log says when each partition was handed over and taken, and how long
        // each took (shown by the planned-move test, and by any failing test's dump).
        let spawned = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            spawn_binary_serving(&self.config, "info", log.into())
        }));
        // A node that did not come up says why in its log, which goes with the test's
        // temporary directory: shown here.
        let (child, addr, http) = spawned.unwrap_or_else(|_| {
            let log = std::fs::read_to_string(&log_path).unwrap_or_default();
            panic!("node {} did not start ({}); its log:\n{log}", self.name, self.addr)
        });
        assert_eq!((addr, http), (self.addr, self.http));
        self.child = Some(child);
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    fn signal(&self, signal: &str) {
        let pid = self.child.as_ref().expect("running").id().to_string();
        let status = std::process::Command::new("kill").args([signal, &pid]).status().unwrap();
        assert!(status.success());
    }

    /// Each partition's standing on this node: (role, owner, epoch, applied).
    async fn partitions(&self) -> Option<Vec<(String, String, u64, u64)>> {
        let body = http_get(self.http, "/cluster").await?;
        let json: serde_json::Value = serde_json::from_str(&body).ok()?;
        let list = json["partitions"].as_array()?;
        Some(
            list.iter()
                .map(|p| {
                    (
                        p["role"].as_str().unwrap_or("").to_owned(),
                        p["owner"].as_str().unwrap_or("").to_owned(),
                        p["epoch"].as_u64().unwrap_or(0),
                        p["applied"].as_u64().unwrap_or(0),
                    )
                })
                .collect(),
        )
    }

    /// Each partition's state digest on this node.
    async fn digests(&self) -> Option<Vec<String>> {
        let body = http_get(self.http, "/digests").await?;
        let json: serde_json::Value = serde_json::from_str(&body).ok()?;
        let list = json["digests"].as_array()?;
        Some(list.iter().map(|d| d["digest"].as_str().unwrap_or("").to_owned()).collect())
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        if let Some(child) = &self.child {
            // A paused node cannot die until it runs again.
            let _ = std::process::Command::new("kill")
                .args(["-CONT", &child.id().to_string()])
                .status();
        }
        self.kill();
    }
}

/// A router (`settlegate route`) in front of the cluster, killed when dropped.
struct Router {
    addr: SocketAddr,
    child: std::process::Child,
}

impl Router {
    fn start(dir: &Path, name: &str, nats: &[String], partitions: usize) -> Router {
        use std::io::{BufRead, BufReader};
        let nats: Vec<String> = nats.iter().map(|url| format!("\"{url}\"")).collect();
        let text = format!(
            "[server]\nlisten = \"127.0.0.1:0\"\nhttp_listen = \"127.0.0.1:0\"\n\n[engine]\nshards = {partitions}\n\n[cluster]\n\
             node = \"{name}\"\nnats = [{}]\nname = \"sgtest\"\nadvertise = \"127.0.0.1:1\"\n",
            nats.join(", ")
        );
        let config = dir.join(format!("{name}.toml"));
        std::fs::write(&config, text).unwrap();
        let log = std::fs::File::create(config.with_extension("log")).unwrap();
        let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_settlegate"))
            .args(["route", "--config"])
            .arg(&config)
            .env("RUST_LOG", "warn")
            .stdout(std::process::Stdio::piped())
            .stderr(log)
            .spawn()
            .expect("spawn the router");
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let addr = loop {
            let line = lines.next().expect("the router printed its address").unwrap();
            if let Some(rest) = line.trim().strip_prefix("protocol") {
                break rest.trim().split("://").nth(1).unwrap().parse().unwrap();
            }
        };
        std::thread::spawn(move || for _ in lines {});
        Router { addr, child }
    }
}

impl Drop for Router {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The body of `GET path` on `addr`, if it answers 200.
async fn http_get(addr: SocketAddr, path: &str) -> Option<String> {
    http(addr, "GET", path).await
}

/// The body of `method path` on `addr`, if it answers 200.
async fn http(addr: SocketAddr, method: &str, path: &str) -> Option<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let fetch = async {
        let mut stream = tokio::net::TcpStream::connect(addr).await.ok()?;
        let request = format!(
            "{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
        );
        stream.write_all(request.as_bytes()).await.ok()?;
        let mut response = String::new();
        stream.read_to_string(&mut response).await.ok()?;
        let (head, body) = response.split_once("\r\n\r\n")?;
        head.starts_with("HTTP/1.1 200").then(|| body.to_owned())
    };
    tokio::time::timeout(Duration::from_secs(5), fetch).await.ok().flatten()
}

/// Prints the last lines of each node's log (for a failing test).
fn dump_logs(nodes: &[Node]) {
    for node in nodes {
        let log = std::fs::read_to_string(node.config.with_extension("log")).unwrap_or_default();
        let tail: Vec<&str> = log.lines().rev().take(40).collect();
        eprintln!("--- {} (last lines, newest first):\n{}", node.name, tail.join("\n"));
    }
}

/// Waits until every partition has exactly one owner among the running `nodes`, all of them
/// agreeing on who; returns the owner of each partition (an index into `nodes`).
async fn settled(nodes: &[Node], partitions: usize, limit: Duration) -> Vec<usize> {
    let started = Instant::now();
    loop {
        let mut views = Vec::new();
        for (i, node) in nodes.iter().enumerate() {
            if node.child.is_some() {
                if let Some(view) = node.partitions().await {
                    views.push((i, view));
                }
            }
        }
        let owners: Vec<Option<usize>> = (0..partitions)
            .map(|p| {
                let owning: Vec<usize> =
                    views.iter().filter(|(_, v)| v[p].0 == "owner").map(|(i, _)| *i).collect();
                let name = match owning.as_slice() {
                    [one] => &nodes[*one].name,
                    _ => return None,
                };
                views.iter().all(|(_, v)| &v[p].1 == name).then_some(owning[0])
            })
            .collect();
        if owners.iter().all(Option::is_some) && !views.is_empty() {
            return owners.into_iter().map(Option::unwrap).collect();
        }
        if started.elapsed() >= limit {
            dump_logs(nodes);
            panic!("partitions did not settle within {limit:?}: {views:?}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

struct Payer {
    user: UserKey,
    credential: DeviceCredential,
}

/// An authorization a client saw acknowledged.
#[derive(Clone)]
struct Acknowledged {
    client_request_id: u128,
    payer: usize,
    record: InherentId,
    bytes: Vec<u8>,
    outcome: AuthOutcome,
}

/// What clients saw acknowledged.
#[derive(Default)]
struct Ledger {
    payments: Vec<Acknowledged>,
    issued: Vec<IssuedCode>,
    /// Issue number → acknowledged redemptions (client request ID, redemption).
    redeemed: std::collections::HashMap<u64, Vec<(u128, Redemption)>>,
}

type Shared = Arc<Mutex<Ledger>>;

fn patient(nodes: &[SocketAddr]) -> ClusterClient {
    let patience = Patience { total: Duration::from_secs(40), backoff: Duration::from_millis(20) };
    ClusterClient::new(nodes.to_vec(), ADMIN_KEY, patience)
}

async fn enroll(client: &ClusterClient, count: usize, tag: &str) -> Vec<Payer> {
    let mut payers = Vec::new();
    for i in 0..count {
        let user = UserKey::new(UserIdType::Mail, format!("{tag}{i}@example.com")).unwrap();
        let enroll = Request::Enroll(Enroll {
            client_request_id: rand::random(),
            user: user.clone(),
            password: PASSWORD.into(),
            card_idm: [8, 8, tag.len() as u8, tag.as_bytes()[0], 0, 0, 0, i as u8],
        });
        let Response::Ok(Reply::Enroll(credential)) = client.call(&enroll).await.unwrap() else {
            panic!("enrollment of {user:?} failed")
        };
        let card = Request::AddMeans(AddMeans {
            client_request_id: rand::random(),
            user: user.clone(),
            make_default: true,
            means: MeansInput::CreditCard { pan: "4111111111111111".into() },
        });
        let answer = client.call(&card).await.unwrap();
        assert!(matches!(answer, Response::Ok(Reply::AddMeans(_))), "{answer:?}");
        payers.push(Payer { user, credential });
    }
    payers
}

fn payment(payer: &Payer, counter: u64, amount: u64) -> InherentId {
    InherentId {
        key_version: payer.credential.key_version,
        amount_minor: amount,
        currency: jpy(),
        means: MeansKind::CreditCard,
        means_id: 0,
        provider_code: 1,
        card_idm: payer.credential.card_idm,
        user: payer.user.clone(),
        terminal_id: "CLUSTER-1".into(),
        counter,
        timestamp_ms: now_ms(),
    }
}

/// A payment signed by `payers[index]`'s device, as an AUTHORIZE with a fresh client
/// request ID.
struct Signed {
    payer: usize,
    record: InherentId,
    bytes: Vec<u8>,
    id: u128,
}

impl Signed {
    fn new(payers: &[Payer], index: usize, counter: u64, amount: u64) -> Signed {
        let record = payment(&payers[index], counter, amount);
        let bytes = record.sign(payers[index].credential.device_key.expose());
        Signed { payer: index, record, bytes, id: rand::random() }
    }

    fn request(&self) -> Request {
        Request::Authorize(Authorize {
            client_request_id: self.id,
            inherent_id: self.bytes.clone(),
        })
    }

    fn acknowledged(self, outcome: AuthOutcome) -> Acknowledged {
        let Signed { payer, record, bytes, id } = self;
        Acknowledged { client_request_id: id, payer, record, bytes, outcome }
    }
}

/// Each payer's last counter: every payment of a payer takes the next, across rounds.
type Counters = Arc<Mutex<Vec<u64>>>;

async fn next(counters: &Counters, index: usize) -> u64 {
    let mut counters = counters.lock().await;
    counters[index] += 1;
    counters[index]
}

/// Payments from the payers `mine` (each worker its own, so counters never race), until
/// `stop`, through `client`; every acknowledged one goes in the ledger.
async fn pay(
    client: Arc<ClusterClient>,
    payers: Arc<Vec<Payer>>,
    counters: Counters,
    mine: Vec<usize>,
    ledger: Shared,
    stop: Arc<std::sync::atomic::AtomicBool>,
    seed: u64,
) {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
        let index = mine[rng.gen_range(0..mine.len())];
        let counter = next(&counters, index).await;
        let signed = Signed::new(&payers, index, counter, rng.gen_range(1..10_000));
        if let Ok(Response::Ok(Reply::Authorize(outcome))) = client.call(&signed.request()).await {
            ledger.lock().await.payments.push(signed.acknowledged(outcome));
        }
    }
}

/// Issues payment codes for the payers `mine` and redeems each through two clients at once
/// (two routers, as partners would), until `stop`.
async fn redeem(
    clients: [Arc<ClusterClient>; 2],
    payers: Arc<Vec<Payer>>,
    counters: Counters,
    mine: Vec<usize>,
    ledger: Shared,
    stop: Arc<std::sync::atomic::AtomicBool>,
    seed: u64,
) {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
        let index = mine[rng.gen_range(0..mine.len())];
        let counter = next(&counters, index).await;
        let payer = &payers[index];
        let amount = rng.gen_range(100..10_000);
        let inherent_id = InherentId { terminal_id: "*".into(), ..payment(payer, counter, amount) }
            .sign(payer.credential.device_key.expose());
        let issue = Request::IssueCode(IssueCode {
            client_request_id: rng.gen(),
            inherent_id,
            validity_ms: 3_600_000,
            deliver_to: None,
            order_ref: String::new(),
        });
        let code = match clients[0].call(&issue).await {
            Ok(Response::Ok(Reply::IssueCode(CodeOutcome::Issued(code)))) => *code,
            _ => continue,
        };
        ledger.lock().await.issued.push(code.clone());
        let request = |id: u128| redeem_request(&code, id, amount, now_ms(), "CLUSTER-1");
        let (a, b): (u128, u128) = (rng.gen(), rng.gen());
        let (ra, rb) = (request(a), request(b));
        let (first, second) = tokio::join!(clients[0].call(&ra), clients[1].call(&rb));
        for (id, response) in [(a, first), (b, second)] {
            if let Ok(Response::Ok(Reply::RedeemCode(redemption))) = response {
                ledger
                    .lock()
                    .await
                    .redeemed
                    .entry(code.number)
                    .or_default()
                    .push((id, *redemption));
            }
        }
    }
}

/// Every acknowledged payment answers the same again (same client request ID) and its record
/// is refused as a replay; every acknowledged redemption is the code's one redemption.
async fn verify(client: &ClusterClient, payers: &[Payer], ledger: &Ledger) {
    for ack in &ledger.payments {
        let id = ack.client_request_id;
        // The provider never declines; a payment in flight at a killed owner is declined as a
        // provider timeout by the node taking over (and a client's retry gets that answer).
        let timed_out = ack.outcome == AuthOutcome::Declined(ReasonCode::ProviderTimeout);
        assert!(
            matches!(ack.outcome, AuthOutcome::Approved(_)) || timed_out,
            "request {id}: {:?}",
            ack.outcome
        );
        let again =
            Request::Authorize(Authorize { client_request_id: id, inherent_id: ack.bytes.clone() });
        assert_eq!(
            client.call(&again).await.unwrap(),
            Response::Ok(Reply::Authorize(ack.outcome)),
            "the acknowledged outcome of request {id} changed"
        );
        if timed_out {
            continue;
        }
        let fresh = InherentId { timestamp_ms: now_ms(), ..ack.record.clone() };
        let key = &payers[ack.payer].credential.device_key;
        let replay = Request::Authorize(Authorize {
            client_request_id: rand::random(),
            inherent_id: fresh.sign(key.expose()),
        });
        assert_eq!(
            client.call(&replay).await.unwrap(),
            Response::Ok(Reply::Authorize(AuthOutcome::Declined(ReasonCode::ReplayedNonce))),
            "an acknowledged payment (request {id}) is missing: its record settled again"
        );
    }
    for (number, redemptions) in &ledger.redeemed {
        assert_eq!(redemptions.len(), 1, "code {number} redeemed {} times", redemptions.len());
        let state =
            client.call(&Request::CodeState(GetCodeState { number: *number })).await.unwrap();
        assert_eq!(
            state,
            Response::Ok(Reply::CodeState(CodeState::Redeemed(Box::new(redemptions[0].1.clone())))),
            "the acknowledged redemption of code {number} is missing"
        );
    }
}

/// The cluster of a test: NATS, nodes, and a temporary directory for their files.
struct Cluster {
    nats: NatsCluster,
    nodes: Vec<Node>,
    partitions: usize,
    _dir: tempfile::TempDir,
}

impl Cluster {
    /// `nodes` nodes of `partitions` partitions; streams purged behind snapshots 15 s old (a
    /// node of the tests may lag by seconds on a loaded 2-core machine).
    fn start(nodes: usize, partitions: usize) -> Cluster {
        Cluster::start_purging_after(nodes, partitions, 15_000)
    }

    fn start_purging_after(nodes: usize, partitions: usize, purge_ms: u64) -> Cluster {
        Cluster::start_with(nodes, partitions, purge_ms, 100, "")
    }

    /// As [`Cluster::start_purging_after`], with a snapshot every `snapshot_every` records (0:
    /// none), and `extra` tables at the end of each node's config.
    fn start_with(
        nodes: usize,
        partitions: usize,
        purge_ms: u64,
        snapshot_every: u64,
        extra: &str,
    ) -> Cluster {
        let nats = NatsCluster::start(3);
        let dir = tempfile::tempdir().unwrap();
        let urls = nats.client_urls();
        let mut nodes: Vec<Node> = (1..=nodes)
            .map(|i| {
                let name = format!("n{i}");
                Node::new(dir.path(), &name, &urls, partitions, purge_ms, snapshot_every, extra)
            })
            .collect();
        nodes.iter_mut().for_each(Node::start);
        Cluster { nats, nodes, partitions, _dir: dir }
    }

    fn addrs(&self) -> Vec<SocketAddr> {
        self.nodes.iter().map(|n| n.addr).collect()
    }

    async fn settled(&self) -> Vec<usize> {
        settled(&self.nodes, self.partitions, Duration::from_secs(30)).await
    }

    /// Waits until every running node has applied every partition up to its owner's last
    /// appended sequence, then returns each partition's digest on each running node.
    async fn digests_when_caught_up(&self) -> Vec<Vec<String>> {
        let started = Instant::now();
        loop {
            let mut views = Vec::new();
            for node in self.nodes.iter().filter(|n| n.child.is_some()) {
                views.push(node.partitions().await.expect("status"));
            }
            let caught_up =
                (0..self.partitions).all(|p| views.iter().all(|v| v[p].3 == views[0][p].3));
            if caught_up {
                let mut digests = Vec::new();
                for node in self.nodes.iter().filter(|n| n.child.is_some()) {
                    digests.push(node.digests().await.expect("digests"));
                }
                return digests;
            }
            if started.elapsed() >= Duration::from_secs(30) {
                dump_logs(&self.nodes);
                panic!("standbys did not catch up: {views:?}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// Kills the owner of a partition with SIGKILL under load, 5 times (the stream's leader with it
/// on some rounds, the stream's leader alone on others), with redemptions of the same codes
/// through two routers at once (each partner's one address); then restarts everything. Nothing acknowledged is lost, no code
/// is redeemed twice, and every partition's digest is the same on every node.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn owner_and_stream_leader_kills_lose_nothing_acknowledged() {
    let rounds: usize =
        std::env::var("SETTLEGATE_CLUSTER_ROUNDS").ok().and_then(|v| v.parse().ok()).unwrap_or(5);
    let seed: u64 = rand::random();
    eprintln!("cluster crash test: {rounds} rounds, seed {seed}");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut cluster = Cluster::start(3, 4);
    cluster.settled().await;
    let routers: Vec<Router> = (1..=2)
        .map(|i| {
            Router::start(cluster._dir.path(), &format!("r{i}"), &cluster.nats.client_urls(), 4)
        })
        .collect();
    let setup = patient(&cluster.addrs());
    let payers = Arc::new(enroll(&setup, 8, "kill").await);
    // One probe payer in each partition, to time the first acknowledgement after a kill.
    let mut probes: Vec<Option<(Payer, u64)>> = (0..4).map(|_| None).collect();
    for payer in enroll(&setup, 32, "probe").await {
        let slot = &mut probes[settlegate_engine::shard_of_user(&payer.user, 4)];
        if slot.is_none() {
            *slot = Some((payer, 0));
        }
    }
    let mut probes: Vec<(Payer, u64)> =
        probes.into_iter().map(|p| p.expect("a probe payer in every partition")).collect();
    let ledger: Shared = Arc::default();
    let counters: Counters = Arc::new(Mutex::new(vec![0; payers.len()]));
    let mut failovers = Vec::new();
    for round in 0..rounds {
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        // Partners talk to the routers only.
        let clients: Vec<Arc<ClusterClient>> =
            routers.iter().map(|router| Arc::new(patient(&[router.addr]))).collect();
        let mut workers = Vec::new();
        for w in 0..3u64 {
            let mine = (0..8).filter(|i| i % 4 == w as usize).collect();
            let client = Arc::clone(&clients[w as usize % 2]);
            workers.push(tokio::spawn(pay(
                client,
                payers.clone(),
                counters.clone(),
                mine,
                ledger.clone(),
                stop.clone(),
                seed ^ (round as u64 * 16 + w),
            )));
        }
        let mine = (0..8).filter(|i| i % 4 == 3).collect();
        let pair = [Arc::clone(&clients[0]), Arc::clone(&clients[1])];
        workers.push(tokio::spawn(redeem(
            pair,
            payers.clone(),
            counters.clone(),
            mine,
            ledger.clone(),
            stop.clone(),
            seed ^ (round as u64 * 16 + 9),
        )));
        tokio::time::sleep(Duration::from_millis(rng.gen_range(300..800))).await;
        let owners = cluster.settled().await;
        let partition = rng.gen_range(0..cluster.partitions);
        let victim = owners[partition];
        let stream = format!("sgtest-p{partition}");
        let killed_at = Instant::now();
        // Rounds 0, 3: the owner; 1, 4: the owner and its stream's leader; 2: the leader alone.
        match round % 3 {
            0 => cluster.nodes[victim].kill(),
            1 => {
                let leader = cluster.nats.stream_leader(&stream);
                cluster.nodes[victim].kill();
                if let Some(leader) = leader {
                    cluster.nats.kill(leader);
                    cluster.nats.restart(leader);
                }
            }
            _ => {
                if let Some(leader) = cluster.nats.stream_leader(&stream) {
                    cluster.nats.kill(leader);
                    cluster.nats.restart(leader);
                }
            }
        }
        // The first payment of the partition acknowledged after the kill, through a router.
        let (probe, counter) = &mut probes[partition];
        *counter += 1;
        let signed = Signed::new(std::slice::from_ref(probe), 0, *counter, 100);
        let answer = patient(&[routers[round % 2].addr]).call(&signed.request()).await;
        assert!(matches!(answer, Ok(Response::Ok(Reply::Authorize(_)))), "probe: {answer:?}");
        let took = killed_at.elapsed();
        let owners_after = cluster.settled().await;
        failovers.push((round % 3, took));
        eprintln!(
            "round {round}: partition {partition} owner {} -> {}, first acknowledgement after {took:?}",
            cluster.nodes[victim].name, cluster.nodes[owners_after[partition]].name
        );
        tokio::time::sleep(Duration::from_millis(rng.gen_range(200..600))).await;
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        for worker in workers {
            worker.await.unwrap();
        }
        if cluster.nodes[victim].child.is_none() {
            cluster.nodes[victim].start();
        }
    }
    let ledger = ledger.lock().await;
    assert!(!ledger.payments.is_empty(), "the load produced acknowledged payments");
    assert!(!ledger.redeemed.is_empty(), "the load redeemed codes");
    verify(&patient(&cluster.addrs()), &payers, &ledger).await;
    // A full restart of every node: each partition's state, rebuilt from its stream, is the
    // same on its owner and its standbys.
    for node in &mut cluster.nodes {
        node.kill();
    }
    for node in &mut cluster.nodes {
        node.start();
    }
    cluster.settled().await;
    verify(&patient(&cluster.addrs()), &payers, &ledger).await;
    // Snapshots were stored, and streams purged below them: the restart restored from them.
    let client = async_nats::connect(cluster.nats.url(0)).await.unwrap();
    let js = async_nats::jetstream::new(client);
    let store = js.get_object_store("sgtest-snapshots").await.unwrap();
    let objects = futures::StreamExt::count(store.list().await.unwrap()).await;
    let mut firsts = Vec::new();
    for p in 0..cluster.partitions {
        let mut stream = js.get_stream(format!("sgtest-p{p}")).await.unwrap();
        firsts.push(stream.info().await.unwrap().state.first_sequence);
    }
    assert!(objects > 0, "no snapshot was stored");
    assert!(firsts.iter().any(|first| *first > 1), "no stream was purged: {firsts:?}");
    eprintln!("snapshots: {objects} objects; the streams start at {firsts:?}");
    let digests = cluster.digests_when_caught_up().await;
    for p in 0..cluster.partitions {
        let first = &digests[0][p];
        assert!(
            digests.iter().all(|d| &d[p] == first),
            "partition {p} digests differ: {digests:?}"
        );
    }
    eprintln!(
        "cluster crash test: {} acknowledged payments, {} codes issued, {} redeemed; (round kind, first acknowledgement after the kill): {failovers:?}",
        ledger.payments.len(),
        ledger.issued.len(),
        ledger.redeemed.len()
    );
}

/// Split brain: an owner paused past the heartbeat limit is taken over; when it runs again, its
/// first append is refused, it answers `MOVED`, and nothing it acknowledged is missing from the
/// partition (no acknowledgement was sequenced after the fence).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_owner_is_fenced_and_never_acknowledges_after_the_takeover() {
    let cluster = Cluster::start(2, 2);
    let owners = cluster.settled().await;
    let setup = patient(&cluster.addrs());
    let payers = Arc::new(enroll(&setup, 4, "pause").await);
    // The zombie-to-be: the owner of partition 0. Each payer pays through it directly, one
    // payment after another, so that payments are in flight when it is paused.
    let zombie = owners[0];
    let direct = Arc::new(Client::connect(cluster.nodes[zombie].addr).await.unwrap());
    direct.authenticate(ADMIN_KEY).await.unwrap();
    let ledger: Shared = Arc::default();
    let moved = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let workers: Vec<_> = (0..4)
        .map(|index| {
            let (direct, payers, ledger, moved) =
                (direct.clone(), payers.clone(), ledger.clone(), moved.clone());
            tokio::spawn(async move {
                for counter in 1.. {
                    let signed = Signed::new(&payers, index, counter, 100);
                    match direct.call(&signed.request()).await {
                        Ok(Response::Ok(Reply::Authorize(outcome))) => {
                            ledger.lock().await.payments.push(signed.acknowledged(outcome))
                        }
                        Ok(Response::Moved { .. }) => {
                            moved.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                            return;
                        }
                        other => panic!("unexpected answer from the owner: {other:?}"),
                    }
                }
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(300)).await;
    cluster.nodes[zombie].signal("-STOP");
    let mut counters = [1_000_000u64; 4];
    // The standby takes over while the owner is paused.
    let paused_at = Instant::now();
    let other = 1 - zombie;
    loop {
        let view = cluster.nodes[other].partitions().await.unwrap();
        if view.iter().all(|p| p.0 == "owner") {
            break;
        }
        assert!(paused_at.elapsed() < Duration::from_secs(20), "no takeover: {view:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Payments through the new owner while the old one sleeps.
    let client = patient(&[cluster.nodes[other].addr]);
    for (index, counter) in counters.iter_mut().enumerate() {
        *counter += 1;
        let signed = Signed::new(&payers, index, *counter, 100);
        let answer = client.call(&signed.request()).await.unwrap();
        let Response::Ok(Reply::Authorize(outcome)) = answer else { panic!("{answer:?}") };
        ledger.lock().await.payments.push(signed.acknowledged(outcome));
    }
    cluster.nodes[zombie].signal("-CONT");
    // Every worker ends on a MOVED: the zombie acknowledged nothing its fence refused.
    for worker in workers {
        tokio::time::timeout(Duration::from_secs(20), worker).await.expect("worker ends").unwrap();
    }
    let moved = moved.load(std::sync::atomic::Ordering::Relaxed);
    // The old owner now answers MOVED for what it owned: at first with no address (it knows
    // only that it lost the partition), then, once it has read the table, naming the new owner.
    let other_addr = cluster.nodes[other].addr.to_string();
    let resumed = Instant::now();
    loop {
        counters[0] += 1;
        let late =
            payment(&payers[0], counters[0], 100).sign(payers[0].credential.device_key.expose());
        let request =
            Request::Authorize(Authorize { client_request_id: rand::random(), inherent_id: late });
        match direct.call(&request).await {
            Ok(Response::Moved { address, .. }) if address == other_addr => break,
            Ok(Response::Moved { address, .. }) if address.is_empty() => {}
            other => panic!("the fenced owner must answer MOVED: {other:?}"),
        }
        assert!(
            resumed.elapsed() < Duration::from_secs(5),
            "the fenced owner never named the new one"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let log = std::fs::read_to_string(cluster.nodes[zombie].config.with_extension("log")).unwrap();
    eprintln!(
        "split brain: {} acknowledged, {moved} answered MOVED by the fenced owner; its appends refused after resuming: {}",
        ledger.lock().await.payments.len(),
        log.matches("append refused").count()
    );
    verify(&patient(&[cluster.nodes[other].addr]), &payers, &*ledger.lock().await).await;
}

/// Planned moves of 4 partitions under load: each owner stops admitting (`BUSY`), drains,
/// appends a hand-over, and the target fences and takes it. Clients see only `BUSY` and
/// `MOVED` (which the cluster client follows): every call gets an answer, nothing
/// acknowledged is lost, and each partition is unavailable only briefly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn planned_moves_under_load_cost_only_busy_retries() {
    let cluster = Cluster::start(3, 4);
    let owners = cluster.settled().await;
    let setup = patient(&cluster.addrs());
    let payers = Arc::new(enroll(&setup, 8, "move").await);
    let ledger: Shared = Arc::default();
    let counters: Counters = Arc::new(Mutex::new(vec![0; payers.len()]));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let failures = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let workers: Vec<_> = (0..4usize)
        .map(|w| {
            let client = Arc::new(patient(&cluster.addrs()));
            let (payers, counters, ledger, stop, failures) =
                (payers.clone(), counters.clone(), ledger.clone(), stop.clone(), failures.clone());
            tokio::spawn(async move {
                let mine: Vec<usize> = (0..8).filter(|i| i % 4 == w).collect();
                let mut n = 0;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    n += 1;
                    let index = mine[n % mine.len()];
                    let counter = next(&counters, index).await;
                    let signed = Signed::new(&payers, index, counter, 100);
                    match client.call(&signed.request()).await {
                        Ok(Response::Ok(Reply::Authorize(outcome))) => {
                            ledger.lock().await.payments.push(signed.acknowledged(outcome))
                        }
                        other => {
                            eprintln!("a call failed during a planned move: {other:?}");
                            failures.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        }
                    }
                }
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut unavailable = Vec::new();
    for (partition, &owner) in owners.iter().enumerate() {
        let target = (owner + 1) % cluster.nodes.len();
        let to = &cluster.nodes[target].name;
        let epoch = cluster.nodes[owner].partitions().await.unwrap()[partition].2;
        let started = Instant::now();
        let path = format!("/cluster/move?partition={partition}&to={to}");
        let answer = http(cluster.nodes[owner].http, "POST", &path).await;
        assert!(answer.is_some(), "the move of partition {partition} to {to} failed");
        loop {
            let view = cluster.nodes[target].partitions().await.unwrap();
            if view[partition].0 == "owner" {
                // The table named the target at the next epoch, and it took the partition
                // there without a claim of its own (which would have raised it again).
                assert_eq!(view[partition].2, epoch + 1, "partition {partition}'s epoch");
                break;
            }
            assert!(started.elapsed() < Duration::from_secs(10), "{to} did not take {partition}");
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        unavailable.push(started.elapsed());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for worker in workers {
        worker.await.unwrap();
    }
    assert_eq!(
        failures.load(std::sync::atomic::Ordering::Relaxed),
        0,
        "calls failed during the moves"
    );
    let ledger = ledger.lock().await;
    assert!(!ledger.payments.is_empty());
    verify(&patient(&cluster.addrs()), &payers, &ledger).await;
    let moved = cluster.settled().await;
    for (partition, &owner) in owners.iter().enumerate() {
        assert_eq!(moved[partition], (owner + 1) % cluster.nodes.len(), "partition {partition}");
    }
    // Each node's metrics say which partitions it owns, and how far its standbys lag.
    for (n, node) in cluster.nodes.iter().enumerate() {
        let metrics = http_get(node.http, "/metrics").await.expect("metrics");
        for (partition, &owner) in moved.iter().enumerate() {
            let owned = format!(
                "settlegate_cluster_partition_owned{{partition=\"{partition}\"}} {}",
                u8::from(owner == n)
            );
            assert!(metrics.contains(&owned), "{} lacks {owned}", node.name);
            let lag = format!("settlegate_cluster_standby_lag{{partition=\"{partition}\"}} ");
            assert!(metrics.contains(&lag), "{} lacks {lag}", node.name);
        }
    }
    eprintln!(
        "planned moves: {} payments acknowledged; per partition, from the move's start to the new owner's first turn: {unavailable:?}",
        ledger.payments.len()
    );
    for node in &cluster.nodes {
        let log = std::fs::read_to_string(node.config.with_extension("log")).unwrap_or_default();
        for line in
            log.lines().filter(|l| l.contains("handed over") || l.contains("partition taken"))
        {
            eprintln!("{}: {line}", node.name);
        }
    }
}

/// A standby paused longer than the purge delay finds the messages it needs next purged from
/// the stream: it reloads the partition's newest snapshot and catches up from there, to the
/// owner's digest.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standby_behind_the_purge_reloads_the_newest_snapshot() {
    let cluster = Cluster::start_purging_after(2, 2, 5_000);
    let owners = cluster.settled().await;
    // n1 owns both partitions; n2 is only a standby.
    for (partition, &owner) in owners.iter().enumerate() {
        if owner == 1 {
            let path = format!("/cluster/move?partition={partition}&to=n1");
            assert!(http(cluster.nodes[1].http, "POST", &path).await.is_some());
        }
    }
    let client = patient(&[cluster.nodes[0].addr]);
    let payers = enroll(&client, 4, "lag").await;
    let behind: Vec<u64> =
        cluster.nodes[1].partitions().await.unwrap().iter().map(|p| p.3).collect();
    cluster.nodes[1].signal("-STOP");
    // Load until a stream is purged well past where the paused standby stopped (snapshots every
    // 100 records, purged behind snapshots 5 s old in the tests).
    let nats = async_nats::jetstream::new(async_nats::connect(cluster.nats.url(0)).await.unwrap());
    let started = Instant::now();
    let mut counter = 0;
    loop {
        counter += 1;
        for index in 0..payers.len() {
            let signed = Signed::new(&payers, index, counter, 100);
            let answer = client.call(&signed.request()).await;
            assert!(matches!(answer, Ok(Response::Ok(Reply::Authorize(_)))), "{answer:?}");
        }
        let mut purged = false;
        for (partition, applied) in behind.iter().enumerate() {
            let mut stream = nats.get_stream(format!("sgtest-p{partition}")).await.unwrap();
            // Past what the paused standby may hold already delivered (a pull's batch is 500
            // messages).
            purged |= stream.info().await.unwrap().state.first_sequence > applied + 1_000;
        }
        if purged {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(90), "no stream was purged in 90 s");
    }
    cluster.nodes[1].signal("-CONT");
    let digests = cluster.digests_when_caught_up().await;
    assert_eq!(digests[0], digests[1], "the standby's partitions differ from the owner's");
    let log = std::fs::read_to_string(cluster.nodes[1].config.with_extension("log")).unwrap();
    assert!(
        log.contains("reloading the newest snapshot"),
        "the standby was never behind the purge: the test did not test it"
    );
    let view = cluster.nodes[1].partitions().await.unwrap();
    assert!(view.iter().all(|p| p.0 == "standby"), "{view:?}");
}

/// Every message an owner appends names its records' format (`Sg-Format`: this build's log
/// format), and a standby does not apply a message of a newer format, though its records are
/// ones it could decode: it stops following the partition (its role there `lost`, its log
/// saying why) rather than read another build's records as its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn appended_records_name_their_format_and_a_standby_refuses_a_newer_one() {
    use settlegate_engine::wal::FORMAT_VERSION;
    let cluster = Cluster::start(2, 1);
    let owners = cluster.settled().await;
    let standby = &cluster.nodes[1 - owners[0]];
    let client = patient(&cluster.addrs());
    let payers = enroll(&client, 2, "format").await;
    for index in 0..payers.len() {
        let signed = Signed::new(&payers, index, 1, 100);
        let answer = client.call(&signed.request()).await;
        assert!(matches!(answer, Ok(Response::Ok(Reply::Authorize(_)))), "{answer:?}");
    }
    let js = async_nats::jetstream::new(async_nats::connect(cluster.nats.url(0)).await.unwrap());
    let stream = js.get_stream("sgtest-p0").await.unwrap();
    let last = stream.get_info().await.unwrap().state.last_sequence;
    let first = stream.get_info().await.unwrap().state.first_sequence;
    let (mut named, mut newest) = (0, None);
    for sequence in first..=last {
        let message = stream.get_raw_message(sequence).await.unwrap();
        if message.headers.get("Sg-Fence").is_some() {
            continue;
        }
        let format = message.headers.get("Sg-Format").map(|v| v.as_str().to_owned());
        assert_eq!(format, Some(FORMAT_VERSION.to_string()), "message {sequence}'s format");
        named += 1;
        newest = Some(message);
    }
    assert!(named >= 2, "the enrolments and payments were appended: {named} messages");
    let applied = || async { standby.partitions().await.map(|view| view[0].clone()) };
    let started = Instant::now();
    while applied().await.map(|p| p.3) != Some(last) {
        assert!(started.elapsed() < Duration::from_secs(20), "the standby did not catch up");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The newest message again, the same records, as if a newer build had appended them.
    let newest = newest.unwrap();
    let mut headers = async_nats::HeaderMap::new();
    if let Some(encoding) = newest.headers.get("Sg-Encoding") {
        headers.insert("Sg-Encoding", encoding.as_str());
    }
    headers.insert("Sg-Format", (FORMAT_VERSION + 1).to_string().as_str());
    headers.insert(async_nats::header::NATS_EXPECTED_LAST_SEQUENCE, last.to_string().as_str());
    let publish = js.publish_with_headers("sgtest.p.0", headers, newest.payload.clone());
    assert_eq!(publish.await.unwrap().await.unwrap().sequence, last + 1);
    let started = Instant::now();
    let view = loop {
        let view = applied().await.unwrap();
        if view.0 == "lost" {
            break view;
        }
        assert!(started.elapsed() < Duration::from_secs(20), "the standby still follows: {view:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(view.3, last, "the standby applied the message of a newer format");
    let log = std::fs::read_to_string(standby.config.with_extension("log")).unwrap();
    let why = format!("records of format {}, newer than this build's", FORMAT_VERSION + 1);
    assert!(log.contains(&why), "the standby's log does not say why");
}

/// The value of `field` in a node's log line (tracing's `field=value`, colours stripped).
fn log_field(line: &str, field: &str) -> Option<String> {
    let plain: String = {
        let mut out = String::new();
        let mut chars = line.chars();
        while let Some(c) = chars.next() {
            if c == '\u{1b}' {
                chars.by_ref().find(|c| c.is_ascii_alphabetic());
            } else {
                out.push(c);
            }
        }
        out
    };
    let key = format!(" {field}=");
    let at = plain.find(&key)? + key.len();
    Some(plain[at..].split(' ').next()?.trim_matches('"').to_owned())
}

/// The restart cache: a node killed and started again replays from its own disk every message
/// it had applied (snapshots are off, so without the cache it would read the whole stream), and
/// reads from the stream only what came after; its state then equals the owners'.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_node_replays_its_restart_cache_and_reads_only_the_rest_from_the_stream() {
    let mut cluster = Cluster::start_with(3, 2, 15_000, 0, "");
    cluster.settled().await;
    let client = patient(&cluster.addrs());
    let payers = enroll(&client, 4, "cache").await;
    let mut counters = vec![0u64; payers.len()];
    let mut pay_some = async |count: usize| {
        for n in 0..count {
            let index = n % payers.len();
            counters[index] += 1;
            let signed = Signed::new(&payers, index, counters[index], 100);
            let answer = client.call(&signed.request()).await;
            assert!(matches!(answer, Ok(Response::Ok(Reply::Authorize(_)))), "{answer:?}");
        }
    };
    pay_some(40).await;
    // Every node has applied everything: what the victim had is the stream's end.
    cluster.digests_when_caught_up().await;
    let victim = 2;
    let had: Vec<u64> =
        cluster.nodes[victim].partitions().await.unwrap().iter().map(|p| p.3).collect();
    assert!(had.iter().all(|&sequence| sequence > 1), "every partition has messages: {had:?}");
    cluster.nodes[victim].kill();
    pay_some(20).await;
    cluster.nodes[victim].start();
    cluster.settled().await;
    let digests = cluster.digests_when_caught_up().await;
    for p in 0..cluster.partitions {
        assert!(digests.iter().all(|d| d[p] == digests[0][p]), "partition {p}: {digests:?}");
    }
    let log = std::fs::read_to_string(cluster.nodes[victim].config.with_extension("log")).unwrap();
    let replays: Vec<&str> =
        log.lines().filter(|l| l.contains("partition replayed from its restart cache")).collect();
    // The log is the second start's: from the first message to where the node was when it died.
    assert_eq!(replays.len(), cluster.partitions, "one line a partition: {replays:?}");
    for line in &replays {
        let p: usize = log_field(line, "partition").unwrap().parse().unwrap();
        let from: u64 = log_field(line, "from").unwrap().parse().unwrap();
        let to: u64 = log_field(line, "to").unwrap().parse().unwrap();
        assert_eq!((from, to), (1, had[p]), "partition {p}: {line}");
        assert_eq!(log_field(line, "stopped").as_deref(), Some(""), "{line}");
    }
    eprintln!("restart cache: the victim had {had:?}; {}", replays.join(" | "));
}

/// A dead owner's payments in flight at their provider end as a crash's do (#21): the standby
/// that takes the partition declines them, and its forwarder sends the ISO 8583 host their
/// reversals, with the identifiers rebuilt from the partition's stream. A payment the dead
/// owner settled stands.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_owners_authorizations_in_flight_are_reversed_at_the_host_by_the_new_owner() {
    use crate::server_money::{tally, wait_for};
    let host_dir = tempfile::tempdir().unwrap();
    let ledger = host_dir.path().join("ledger.jsonl");
    let tally_path = host_dir.path().join("tally.json");
    let (_host, port) = crate::engine_iso::spawn_host_tallying(&ledger, Some(&tally_path));
    // Nothing times out before the kill: the adapter would reverse on its own.
    let extra = format!(
        r#"
[[engine.providers]]
code = 2
name = "iso"
adapter = {{ kind = "iso8583", host_addr = "127.0.0.1:{port}", merchant_id = "SGTEST01", response_timeout_ms = 600000 }}
limits = {{ concurrency_max = 64, timeout_ms = 600000 }}

[engine.forwarding]
interval_ms = 50
retry_initial_ms = 50
retry_max_ms = 500
"#
    );
    let mut cluster = Cluster::start_with(2, 2, 15_000, 100, &extra);
    let owners = cluster.settled().await;
    let client = Arc::new(patient(&cluster.addrs()));
    let payer = enroll(&client, 1, "rev").await.remove(0);
    let victim = owners[settlegate_engine::shard_of_user(&payer.user, cluster.partitions)];
    let mut counter = 0;
    let mut signed = |amount: u64| {
        counter += 1;
        let record = InherentId {
            provider_code: 2,
            terminal_id: "ISO-T1".into(),
            ..payment(&payer, counter, amount)
        };
        let bytes = record.sign(payer.credential.device_key.expose());
        Request::Authorize(Authorize { client_request_id: rand::random(), inherent_id: bytes })
    };
    // Once both nodes' adapters are signed on, the host approves 1,234: settled, never reversed.
    let started = Instant::now();
    loop {
        match client.call(&signed(1_234)).await {
            Ok(Response::Ok(Reply::Authorize(AuthOutcome::Approved(_)))) => break,
            Ok(Response::Ok(Reply::Authorize(AuthOutcome::Declined(
                ReasonCode::ProviderUnavailable,
            )))) if started.elapsed() < Duration::from_secs(30) => {
                tokio::time::sleep(Duration::from_millis(100)).await
            }
            other => panic!("expected an approval, got {other:?}"),
        }
    }
    // Three the host holds and never answers (8,000..=8,099): in flight at the kill.
    let amounts = [8_011u64, 8_022, 8_033];
    for amount in amounts {
        let (client, request) = (Arc::clone(&client), signed(amount));
        tokio::spawn(async move { client.call(&request).await });
    }
    let held = |state: &str| {
        let tally = tally(&tally_path);
        amounts.iter().all(|a| tally.iter().any(|(s, held, _)| s == state && held == a))
    };
    wait_for("the host holding the three authorizations", || held("authorized")).await;
    cluster.nodes[victim].kill();
    assert!(held("authorized"), "nothing reversed before the kill: {:?}", tally(&tally_path));
    wait_for("the reversals at the host, sent by the new owner", || held("reversed")).await;
    let moved = cluster.settled().await;
    let partition = settlegate_engine::shard_of_user(&payer.user, cluster.partitions);
    assert_ne!(moved[partition], victim, "the partition moved");
    crate::server_money::assert_reversed_once(&tally_path, &ledger, &amounts);
}
