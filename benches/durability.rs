//! Durability costs: the authorize path with the write-ahead log under each fsync policy (and
//! without a log), and the time to recover a data directory of N users with one payment code each.
//!
//! `cargo bench --bench durability`. `SETTLEGATE_RECOVERY_USERS=1000000` sets the large
//! recovery size (default 10,000; the test suite runs 200). `SETTLEGATE_RECOVERY_SNAPSHOT_EVERY=N`
//! sets `durability.snapshot_every_records` while the recovery data set is written (0: snapshots
//! off, so recovery replays the whole log; unset: the engine's default, 1,000,000). Recovery
//! reads whatever the directory holds, so the value matters only when the data set is written:
//! with `SETTLEGATE_RECOVERY_DIR` (a data set kept between runs) use one directory per value.
//! `SETTLEGATE_RECOVERY_SHARDS=N` likewise sets the shard count the data set is written with
//! (unset: one shard per two cores, so one on a 2-core machine); recovery keeps that count.
//! `SETTLEGATE_RECOVERY_SNAPSHOTS_ONLY=1` writes the data set as snapshots alone, so that
//! recovery restores them and replays nothing.

mod common;

/// The server's allocator (`src/main.rs`), so that recovery is measured as the server does it.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

use settlegate_engine::RequestId;
use std::time::{Duration, Instant};

use criterion::{criterion_group, BenchmarkId, Criterion, Throughput};
use futures::future::join_all;
use settlegate_engine::wal::FsyncPolicy;
use settlegate_engine::{AuthOutcome, CodeOutcome, Engine, IssueCodeRequest};

fn durable(dir: &std::path::Path, fsync: FsyncPolicy) -> settlegate_engine::EngineConfig {
    let mut config = common::config();
    config.durability.data_dir = Some(dir.to_owned());
    config.durability.fsync = fsync;
    config
}

fn authorize_by_policy(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
    let mut group = c.benchmark_group("authorize_fsync");
    let (submitters, size) = (4usize, 1024usize);
    group.throughput(Throughput::Elements((submitters * size) as u64));
    let policies =
        [("memory", None), ("off", Some(FsyncPolicy::Off)), ("always", Some(FsyncPolicy::Always))];
    for (name, policy) in policies {
        let dir = tempfile::tempdir().unwrap();
        let config = match policy {
            None => common::config(),
            Some(fsync) => durable(dir.path(), fsync),
        };
        let bench = common::Bench::with_config(&runtime, 1_000, config);
        group.bench_function(BenchmarkId::from_parameter(name), |b| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    let batches: Vec<_> = (0..submitters).map(|_| bench.requests(size)).collect();
                    let started = Instant::now();
                    let results = runtime.block_on(async {
                        join_all(batches.into_iter().map(|batch| {
                            let engine = bench.engine.clone();
                            tokio::spawn(async move { engine.authorize_batch(batch).await })
                        }))
                        .await
                    });
                    total += started.elapsed();
                    let first = &results[0].as_ref().unwrap()[0];
                    assert!(matches!(first, Ok(AuthOutcome::Approved(_))), "{first:?}");
                }
                total
            })
        });
        bench.engine.shutdown_blocking();
    }
    group.finish();
}

fn recovery(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
    let large: usize = std::env::var("SETTLEGATE_RECOVERY_USERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10_000);
    let mut group = c.benchmark_group("recovery");
    group.sample_size(10);
    // `cargo test` runs benches without `--bench`: only the small size there.
    let measuring = std::env::args().any(|arg| arg == "--bench");
    let sizes: &[usize] = if measuring { &[200, large] } else { &[200] };
    for &users in sizes {
        let dir = RecoveryDir::new(users);
        if dir.reused {
            eprintln!("recovery/{users}: reusing {}", dir.path().display());
        } else {
            write_data_set(&runtime, dir.path(), users);
        }
        group.throughput(Throughput::Elements(users as u64));
        group.bench_function(BenchmarkId::new("users_and_codes", users), |b| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    let started = Instant::now();
                    let engine =
                        Engine::start(durable(dir.path(), FsyncPolicy::Off)).expect("recovers");
                    total += started.elapsed();
                    engine.shutdown_blocking();
                }
                total
            })
        });
        // The same in a fresh process each time, as a restart after a crash is: nothing of an
        // earlier engine's memory to reuse or to free. The child times `Engine::start` only.
        group.bench_function(BenchmarkId::new("users_and_codes_fresh_process", users), |b| {
            b.iter_custom(|iters| (0..iters).map(|_| recover_in_child(dir.path())).sum())
        });
    }
    group.finish();
}

/// Where a recovery data set lives: a fresh temporary directory, or the directory named by
/// `SETTLEGATE_RECOVERY_DIR` (suffixed with the size), kept between runs so profiling does not
/// pay for writing a million users every time.
struct RecoveryDir {
    _temp: Option<tempfile::TempDir>,
    path: std::path::PathBuf,
    reused: bool,
}

impl RecoveryDir {
    fn new(users: usize) -> RecoveryDir {
        match std::env::var_os("SETTLEGATE_RECOVERY_DIR") {
            Some(base) => {
                let path = std::path::Path::new(&base).join(format!("users-{users}"));
                let reused = path.join("shard-000.wal").exists();
                if !reused {
                    std::fs::create_dir_all(&path).unwrap();
                }
                RecoveryDir { _temp: None, path, reused }
            }
            None => {
                let temp = tempfile::tempdir().unwrap();
                let path = temp.path().to_owned();
                RecoveryDir { _temp: Some(temp), path, reused: false }
            }
        }
    }

    fn path(&self) -> &std::path::Path {
        &self.path
    }
}

/// Writes `users` users, each enrolled with a card and holding one issued payment code.
fn write_data_set(runtime: &tokio::runtime::Runtime, dir: &std::path::Path, users: usize) {
    // The engine reports each snapshot's capture (the shard's pause) at info level.
    log_engine_info();
    let setup = Instant::now();
    let mut config = durable(dir, FsyncPolicy::Off);
    if let Ok(every) = std::env::var(SNAPSHOT_EVERY) {
        config.durability.snapshot_every_records =
            every.parse().unwrap_or_else(|_| panic!("{SNAPSHOT_EVERY}={every}: not a number"));
    }
    if let Ok(shards) = std::env::var(SHARDS) {
        config.shards =
            shards.parse().unwrap_or_else(|_| panic!("{SHARDS}={shards}: not a number"));
    }
    let snapshot_every = config.durability.snapshot_every_records;
    let bench = common::Bench::with_config(runtime, users, config);
    // One payment code per user (issued, so held): the other half of the data set.
    runtime.block_on(async {
        for chunk in (0..users).collect::<Vec<_>>().chunks(512) {
            let issues = chunk.iter().map(|&i| {
                bench.engine.issue_code(IssueCodeRequest {
                    client_request_id: RequestId((7 << 100) | i as u128),
                    inherent_id: bench.signed(i),
                    validity_ms: 86_400_000,
                    deliver_to: None,
                    order_ref: String::new(),
                })
            });
            for outcome in futures::future::join_all(issues).await {
                assert!(matches!(outcome, Ok(CodeOutcome::Issued(_))), "{outcome:?}");
            }
        }
    });
    bench.engine.shutdown_blocking();
    drop(bench);
    if std::env::var_os(SNAPSHOTS_ONLY).is_some() {
        // A start that snapshots after every record, and a sweep (one record in each shard):
        // every shard's snapshot then holds everything, and its log nothing.
        let mut config = durable(dir, FsyncPolicy::Off);
        config.durability.snapshot_every_records = 1;
        let engine = Engine::start(config).expect("recovers");
        runtime.block_on(engine.sweep_codes()).expect("sweeps");
        engine.shutdown_blocking();
    }
    let elapsed = setup.elapsed();
    let snapshots = format!("snapshot_every_records = {snapshot_every}");
    eprintln!("recovery/{users}: data directory written in {elapsed:?} ({snapshots})");
}

/// Environment variable that sets `durability.snapshot_every_records` while a recovery data set
/// is written (0: no snapshots).
const SNAPSHOT_EVERY: &str = "SETTLEGATE_RECOVERY_SNAPSHOT_EVERY";

/// Environment variable that sets the engine's `shards` while a recovery data set is written
/// (unset: one shard per two cores); recovery keeps the count the data set was written with.
const SHARDS: &str = "SETTLEGATE_RECOVERY_SHARDS";

/// Environment variable that makes the recovery data set snapshots alone (no log after them).
const SNAPSHOTS_ONLY: &str = "SETTLEGATE_RECOVERY_SNAPSHOTS_ONLY";

/// Shows the engine's info lines (snapshot pauses, recovery times) on stderr.
fn log_engine_info() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter("settlegate_engine=info")
        .with_writer(std::io::stderr)
        .try_init();
}

/// Environment variable that makes this binary recover one data directory and report the time.
const RECOVER_ONCE: &str = "SETTLEGATE_BENCH_RECOVER_ONCE";

/// Runs this bench binary again to recover `dir` in a fresh process; returns its start time.
fn recover_in_child(dir: &std::path::Path) -> Duration {
    let exe = std::env::current_exe().expect("the bench binary's path");
    let output = std::process::Command::new(exe)
        .env(RECOVER_ONCE, dir)
        .output()
        .expect("the bench binary runs again");
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let nanos: u64 = String::from_utf8_lossy(&output.stdout)
        .trim()
        .parse()
        .expect("the child prints the nanoseconds Engine::start took");
    Duration::from_nanos(nanos)
}

criterion_group!(benches, authorize_by_policy, recovery);

fn main() {
    if let Some(dir) = std::env::var_os(RECOVER_ONCE) {
        // The engine's `recovered` line (snapshot load and replay times) goes to stderr, which
        // the parent shows only if the child fails; run the child by hand to read it.
        log_engine_info();
        let started = Instant::now();
        let engine =
            Engine::start(durable(std::path::Path::new(&dir), FsyncPolicy::Off)).expect("recovers");
        println!("{}", started.elapsed().as_nanos());
        engine.shutdown_blocking();
        // Leave without freeing the recovered state: the parent timed the start only.
        std::process::exit(0);
    }
    benches();
    Criterion::default().configure_from_args().final_summary();
}
