//! `loadgen`: drives settlegate's authorize path and reports what it measured.
//!
//! Closed loop: `--connections` workers, each keeping `--pipeline` requests in flight, for
//! `--duration` seconds after `--warmup` seconds whose samples are discarded. The dataset
//! (users with device keys and a card) is prepared first and never measured.
//!
//! ```text
//! loadgen --embedded --users 1000 --connections 4 --pipeline 64 --duration 10
//! loadgen --target 127.0.0.1:7878 --api-key sg-demo-key --provider 2 --json report.json
//! loadgen redis --target 127.0.0.1:6379 --connections 50 --pipeline 16   # the baseline
//! ```
//!
//! `redis` mode drives Redis `SET` (100-byte values) over RESP with the same connections,
//! depth and durations, writing `--pipeline` commands then reading their replies (as
//! `redis-benchmark -P` does), so a run can be set beside a reference server's.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context as _};
use clap::Parser;
use hdrhistogram::Histogram;
use settlegate_engine::adapters::simulated::SimulatedConfig;
use settlegate_engine::adapters::{AdapterConfig, GuardConfig};
use settlegate_engine::password::PasswordConfig;
use settlegate_engine::{
    AuthOutcome, AuthorizeRequest, Currency, DeviceCredential, Engine, EngineConfig, EnrollRequest,
    InherentId, MeansInput, MeansKind, ProviderConfig, UserIdType, UserKey,
};
use settlegate_protocol::messages::{Reply, Request};
use settlegate_protocol::Client;

/// Most connections (or embedded submitters).
const CONNECTIONS_MAX: usize = 1024;
/// Most requests in flight per connection.
const PIPELINE_MAX: usize = 1024;
/// Most users in the dataset.
const USERS_MAX: usize = 10_000_000;

#[derive(Parser, Debug, Clone)]
#[command(name = "loadgen", about = "settlegate load generator (authorize workload)")]
struct Args {
    /// `redis` for the Redis SET baseline; none for settlegate.
    #[arg(value_parser = ["redis"])]
    mode: Option<String>,
    /// A running server's protocol address (or Redis's, in `redis` mode).
    #[arg(long, conflicts_with = "embedded")]
    target: Option<String>,
    /// Run an engine in this process instead (zero-latency simulated provider).
    #[arg(long)]
    embedded: bool,
    /// API key for `--target`.
    #[arg(long, default_value = "sg-demo-key")]
    api_key: String,
    /// Users in the dataset (each gets a device key and a card).
    #[arg(long, default_value_t = 1_000)]
    users: usize,
    /// Connections (embedded: concurrent submitters).
    #[arg(long, default_value_t = 4)]
    connections: usize,
    /// Requests in flight per connection.
    #[arg(long, default_value_t = 16)]
    pipeline: usize,
    /// Seconds measured.
    #[arg(long, default_value_t = 10.0)]
    duration: f64,
    /// Seconds run before measuring.
    #[arg(long, default_value_t = 2.0)]
    warmup: f64,
    /// Provider designation code to pay through (the embedded engine has provider 1).
    #[arg(long, default_value_t = 1)]
    provider: u32,
    /// Store-terminal ID.
    #[arg(long, default_value = "LOADGEN-1")]
    terminal: String,
    /// Write a JSON report here.
    #[arg(long)]
    json: Option<std::path::PathBuf>,
}

impl Args {
    fn check(&self) -> anyhow::Result<()> {
        if self.target.is_none() && !self.embedded {
            bail!("give --target ADDR or --embedded");
        }
        if !(1..=CONNECTIONS_MAX).contains(&self.connections) {
            bail!("--connections must be 1..={CONNECTIONS_MAX}");
        }
        if !(1..=PIPELINE_MAX).contains(&self.pipeline) {
            bail!("--pipeline must be 1..={PIPELINE_MAX}");
        }
        if self.mode.is_none() && (self.users < self.connections || self.users > USERS_MAX) {
            bail!("--users must be at least --connections and at most {USERS_MAX}");
        }
        if !(self.duration > 0.0 && self.warmup >= 0.0) {
            bail!("--duration must be positive and --warmup not negative");
        }
        Ok(())
    }
}

/// Where requests go.
#[derive(Clone)]
enum Target {
    Embedded(Engine),
    Remote(Arc<Vec<Client>>),
}

struct Payer {
    user: UserKey,
    credential: DeviceCredential,
    counter: AtomicU64,
}

/// What one in-flight lane measured.
struct Tally {
    latency_us: Histogram<u64>,
    errors: u64,
    declines: std::collections::BTreeMap<u16, u64>,
}

fn now_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    args.check()?;
    if args.mode.as_deref() == Some("redis") {
        return redis_baseline(&args).await;
    }
    let target = connect(&args).await?;
    let prepared = Instant::now();
    let payers = Arc::new(prepare(&target, args.users).await?);
    eprintln!("dataset: {} users in {:.1?} (not measured)", payers.len(), prepared.elapsed());
    let started = Instant::now();
    let measure_from = started + Duration::from_secs_f64(args.warmup);
    let stop_at = measure_from + Duration::from_secs_f64(args.duration);
    let mut lanes = Vec::new();
    for connection in 0..args.connections {
        for lane in 0..args.pipeline {
            let ctx = Lane {
                target: target.clone(),
                payers: payers.clone(),
                connection,
                lane,
                args: args.clone(),
            };
            lanes.push(tokio::spawn(ctx.run(measure_from, stop_at)));
        }
    }
    report(&args, "authorize", &merge(lanes).await?)
}

/// Adds up the lanes' tallies.
async fn merge(lanes: Vec<tokio::task::JoinHandle<Tally>>) -> anyhow::Result<Tally> {
    let mut total =
        Tally { latency_us: Histogram::new(3)?, errors: 0, declines: Default::default() };
    for lane in lanes {
        let tally = lane.await?;
        total.latency_us.add(&tally.latency_us)?;
        total.errors += tally.errors;
        for (reason, n) in tally.declines {
            *total.declines.entry(reason).or_default() += n;
        }
    }
    Ok(total)
}

/// The baseline: Redis SET with the same connections, depth and durations.
async fn redis_baseline(args: &Args) -> anyhow::Result<()> {
    let addr = args.target.clone().context("redis mode needs --target")?;
    let measure_from = Instant::now() + Duration::from_secs_f64(args.warmup);
    let stop_at = measure_from + Duration::from_secs_f64(args.duration);
    let mut lanes = Vec::new();
    for connection in 0..args.connections {
        let stream = tokio::net::TcpStream::connect(&addr)
            .await
            .with_context(|| format!("connecting to {addr}"))?;
        stream.set_nodelay(true)?;
        lanes.push(tokio::spawn(redis_lane(
            stream,
            connection,
            args.pipeline,
            measure_from,
            stop_at,
        )));
    }
    report(args, "redis_set", &merge(lanes).await?)
}

async fn redis_lane(
    mut stream: tokio::net::TcpStream,
    connection: usize,
    depth: usize,
    measure_from: Instant,
    stop_at: Instant,
) -> Tally {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut tally = Tally {
        latency_us: Histogram::new(3).expect("sigfig 3"),
        errors: 0,
        declines: Default::default(),
    };
    let value = "v".repeat(100);
    let mut batch = Vec::with_capacity(depth * 160);
    let mut replies = vec![0u8; depth * 5];
    let mut key = 0u64;
    while Instant::now() < stop_at {
        batch.clear();
        for _ in 0..depth {
            key += 1;
            batch.extend_from_slice(&resp_set(&format!("lg:{connection}:{key}"), &value));
        }
        let sent = Instant::now();
        let exchanged = async {
            stream.write_all(&batch).await?;
            stream.read_exact(&mut replies).await
        };
        if exchanged.await.is_err() {
            tally.errors += depth as u64;
            return tally;
        }
        if sent < measure_from {
            continue;
        }
        let micros = sent.elapsed().as_micros() as u64;
        let ok = replies.chunks(5).filter(|reply| *reply == b"+OK\r\n").count();
        tally.errors += (depth - ok) as u64;
        let _ = tally.latency_us.record_n(micros.max(1), depth as u64);
    }
    tally
}

/// A RESP `SET key value` command.
fn resp_set(key: &str, value: &str) -> Vec<u8> {
    format!("*3\r\n$3\r\nSET\r\n${}\r\n{key}\r\n${}\r\n{value}\r\n", key.len(), value.len())
        .into_bytes()
}

async fn connect(args: &Args) -> anyhow::Result<Target> {
    if args.embedded {
        return Ok(Target::Embedded(Engine::start(embedded_config())?));
    }
    let addr = args.target.as_deref().expect("checked");
    let mut clients = Vec::with_capacity(args.connections);
    for _ in 0..args.connections {
        let client =
            Client::connect(addr).await.with_context(|| format!("connecting to {addr}"))?;
        client.authenticate(&args.api_key).await.context("authenticating")?;
        clients.push(client);
    }
    Ok(Target::Remote(Arc::new(clients)))
}

/// The embedded engine: one zero-latency provider, and Argon2 costs lowered because the
/// dataset's enrollments are setup, not what is measured.
fn embedded_config() -> EngineConfig {
    EngineConfig {
        password: PasswordConfig { memory_kib: 64, iterations: 1, parallelism: 1 },
        vault: settlegate_engine::config::VaultConfig { key_hex: Some("66".repeat(32)) },
        providers: vec![ProviderConfig {
            code: 1,
            name: "loadgen".into(),
            adapter: AdapterConfig::Simulated(SimulatedConfig::default()),
            limits: GuardConfig { concurrency_max: 1 << 20, timeout_ms: 5_000 },
            terminals: Vec::new(),
        }],
        ..EngineConfig::default()
    }
}

/// Enrolls `users` users (concurrently, 64 at a time) with a card each.
async fn prepare(target: &Target, users: usize) -> anyhow::Result<Vec<Payer>> {
    let run = now_ms() as u64;
    let mut payers = Vec::with_capacity(users);
    for chunk in (0..users).collect::<Vec<_>>().chunks(64) {
        let enrolled =
            futures::future::join_all(chunk.iter().map(|&i| enroll(target, run, i))).await;
        for payer in enrolled {
            payers.push(payer?);
        }
    }
    Ok(payers)
}

async fn enroll(target: &Target, run: u64, i: usize) -> anyhow::Result<Payer> {
    let user = UserKey::new(UserIdType::Mail, format!("lg{run}-{i}@example.com"))
        .map_err(anyhow::Error::new)?;
    let idm = ((run << 24) ^ i as u64).to_be_bytes();
    let base = (u128::from(run) << 64) | (i as u128) << 1;
    let password = "loadgen password".to_owned();
    let card = MeansInput::CreditCard { pan: "4111111111111111".into() };
    let credential = match target {
        Target::Embedded(engine) => {
            let request = EnrollRequest {
                client_request_id: base,
                user: user.clone(),
                password,
                card_idm: idm,
            };
            let credential = engine.enroll(request).await?;
            engine.add_means(base | 1, &user, &card, true).await?;
            credential
        }
        Target::Remote(clients) => {
            let client = &clients[i % clients.len()];
            let request = Request::Enroll {
                client_request_id: base,
                user: user.clone(),
                password,
                card_idm: idm,
            };
            let Reply::Credential(credential) = client.call_ok(&request).await? else {
                bail!("unexpected enroll reply")
            };
            let add = Request::AddMeans {
                client_request_id: base | 1,
                user: user.clone(),
                make_default: true,
                means: card,
            };
            client.call_ok(&add).await?;
            credential
        }
    };
    Ok(Payer { user, credential, counter: AtomicU64::new(0) })
}

/// One in-flight slot of one connection: sends, waits, records, repeats.
struct Lane {
    target: Target,
    payers: Arc<Vec<Payer>>,
    connection: usize,
    lane: usize,
    args: Args,
}

impl Lane {
    async fn run(self, measure_from: Instant, stop_at: Instant) -> Tally {
        let mut tally = Tally {
            latency_us: Histogram::new(3).expect("sigfig 3"),
            errors: 0,
            declines: Default::default(),
        };
        // Each connection owns every `connections`-th user, each lane a slice of those, so a
        // device never has more than one request in flight (the replay window stays happy).
        let stride = self.args.connections * self.args.pipeline;
        let first = self.connection * self.args.pipeline + self.lane;
        let mut index = first;
        let mut sequence: u128 = 0;
        while Instant::now() < stop_at {
            if index >= self.payers.len() {
                index = first % self.payers.len().max(1);
            }
            let payer = &self.payers[index];
            index += stride;
            sequence += 1;
            let id = (u128::from(now_ms() as u64) << 64) | ((first as u128) << 32) | sequence;
            let bytes = self.sign(payer);
            let sent = Instant::now();
            let result = match &self.target {
                Target::Embedded(engine) => engine
                    .authorize(AuthorizeRequest { client_request_id: id, inherent_id: bytes })
                    .await
                    .map_err(|e| e.to_string()),
                Target::Remote(clients) => {
                    clients[self.connection].authorize(id, bytes).await.map_err(|e| e.to_string())
                }
            };
            if sent < measure_from {
                continue;
            }
            let micros = sent.elapsed().as_micros() as u64;
            let _ = tally.latency_us.record(micros.max(1));
            match result {
                Ok(AuthOutcome::Approved(_)) => {}
                Ok(AuthOutcome::Declined(reason)) => {
                    *tally.declines.entry(reason.code()).or_default() += 1
                }
                Err(_) => tally.errors += 1,
            }
        }
        tally
    }

    fn sign(&self, payer: &Payer) -> Vec<u8> {
        InherentId {
            key_version: payer.credential.key_version,
            amount_minor: 1_000,
            currency: Currency::try_from("JPY").expect("JPY"),
            means: MeansKind::CreditCard,
            means_id: 0,
            provider_code: self.args.provider,
            card_idm: payer.credential.card_idm,
            user: payer.user.clone(),
            terminal_id: self.args.terminal.clone(),
            counter: payer.counter.fetch_add(1, Ordering::Relaxed) + 1,
            timestamp_ms: now_ms(),
        }
        .sign(payer.credential.device_key.expose())
    }
}

fn report(args: &Args, operation: &str, total: &Tally) -> anyhow::Result<()> {
    let h = &total.latency_us;
    let count = h.len();
    let throughput = count as f64 / args.duration;
    let declines: u64 = total.declines.values().sum();
    println!("{operation}: {count} requests in {:.1} s = {throughput:.0}/s", args.duration);
    println!(
        "latency us: p50 {} p90 {} p99 {} p99.9 {} max {}",
        h.value_at_quantile(0.50),
        h.value_at_quantile(0.90),
        h.value_at_quantile(0.99),
        h.value_at_quantile(0.999),
        h.max()
    );
    println!("declines {declines} {:?}, errors {}", total.declines, total.errors);
    if let Some(path) = &args.json {
        let json = serde_json::json!({
            "throughput_per_s": throughput,
            "requests": count,
            "latency_us": {
                "p50": h.value_at_quantile(0.50),
                "p90": h.value_at_quantile(0.90),
                "p99": h.value_at_quantile(0.99),
                "p999": h.value_at_quantile(0.999),
                "max": h.max(),
            },
            "errors": total.errors,
            "declines_by_reason": total.declines,
            "operation": operation,
            "settings": {
                "connections": args.connections,
                "pipeline": args.pipeline,
                "duration_s": args.duration,
                "warmup_s": args.warmup,
                "users": args.users,
            },
        });
        std::fs::write(path, serde_json::to_string_pretty(&json)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resp_set_is_well_formed() {
        assert_eq!(resp_set("k1", "vv"), b"*3\r\n$3\r\nSET\r\n$2\r\nk1\r\n$2\r\nvv\r\n".to_vec());
    }

    #[test]
    fn flags_are_checked() {
        let parse = |line: &str| Args::try_parse_from(line.split_whitespace()).unwrap();
        assert!(parse("loadgen --embedded").check().is_ok());
        assert!(parse("loadgen").check().is_err(), "a target is required");
        assert!(parse("loadgen --embedded --connections 0").check().is_err());
        assert!(parse("loadgen --embedded --pipeline 5000").check().is_err());
        assert!(parse("loadgen --embedded --users 2 --connections 4").check().is_err());
        assert!(parse("loadgen redis --target 127.0.0.1:6379").check().is_ok());
    }

    #[tokio::test]
    async fn embedded_run_produces_a_report() {
        let dir = std::env::temp_dir().join(format!("loadgen-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let json = dir.join("report.json");
        let line =
            ["loadgen", "--embedded", "--users", "8", "--connections", "2", "--pipeline", "2"];
        let mut args = Args::try_parse_from(line).unwrap();
        args.duration = 0.5;
        args.warmup = 0.1;
        args.json = Some(json.clone());
        let target = connect(&args).await.unwrap();
        let payers = Arc::new(prepare(&target, args.users).await.unwrap());
        let measure_from = Instant::now() + Duration::from_secs_f64(args.warmup);
        let stop_at = measure_from + Duration::from_secs_f64(args.duration);
        let lanes = (0..args.connections * args.pipeline)
            .map(|i| {
                let (target, payers, args) = (target.clone(), payers.clone(), args.clone());
                let lane = Lane { target, payers, connection: i / 2, lane: i % 2, args };
                tokio::spawn(lane.run(measure_from, stop_at))
            })
            .collect();
        let total = merge(lanes).await.unwrap();
        report(&args, "authorize", &total).unwrap();
        let text = std::fs::read_to_string(&json).unwrap();
        let report: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert!(report["throughput_per_s"].as_f64().unwrap() > 0.0);
        assert!(report["latency_us"]["p99"].as_u64().unwrap() > 0);
        assert_eq!(report["errors"], 0);
        assert_eq!(report["declines_by_reason"], serde_json::json!({}));
        std::fs::remove_dir_all(&dir).ok();
    }
}
