//! `settlegate`: the server binary.
//!
//! `settlegate serve` (or just `settlegate`) starts on the embedded default config and demo
//! data; `--config FILE` takes a TOML file of the same shape. `default-config` prints the
//! embedded one. Stops gracefully on SIGTERM or SIGINT.

/// jemalloc: threads free what other threads allocated (a request's buffers cross from the
/// connection's task to its shard and back), which glibc's malloc serves through arena locks.
/// Measured against glibc's (`docs/BENCHMARKS-HISTORY.md`): server CPU per authorization about 15%
/// lower, recovery of 1,000,000 users and codes 3.6–4.1 s against 4.5–5.7 s.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

use std::path::PathBuf;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use settlegate::config::{Config, DEFAULT_CONFIG};

#[derive(Parser)]
#[command(name = "settlegate", version, about = "settlegate payment authorization engine")]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Run the server (the default).
    Serve {
        /// TOML config file; without it the embedded default config and demo data are used.
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Print the embedded default config.
    DefaultConfig,
    /// Check a config file without starting anything: prints `ok` (and any warnings) and exits
    /// 0, or prints what is wrong, naming the key and its value, and exits 1.
    CheckConfig {
        /// The TOML config file.
        file: PathBuf,
    },
    /// Run a cluster's router (the first tier): partners connect here, and each request goes
    /// to its partition's owner (`docs/CLUSTER.md`).
    Route {
        /// TOML config file: `[server] listen`, `[cluster]` (`nats`, `name`) and
        /// `[engine] shards` (the partition count).
        #[arg(long)]
        config: PathBuf,
    },
    /// Rebuild one shard of a data directory from its own snapshot and log alone, writing
    /// nothing, and print its state digest as JSON (compare with the server's `/digests`).
    ReplayShard {
        /// TOML config file naming the data directory (`engine.durability.data_dir`).
        #[arg(long)]
        config: PathBuf,
        /// The shard's index.
        #[arg(long)]
        shard: usize,
    },
    /// Write the reconciliation report of a data directory as CSV (`docs/RECONCILIATION.md`):
    /// per provider, merchant, business day and currency, the counts and totals authorized,
    /// captured, voided, refunded, reversed and expired; and the item list. Reads the data
    /// directory as `replay-shard` does, writing nothing to it.
    Report {
        /// TOML config file naming the data directory (`engine.durability.data_dir`).
        #[arg(long)]
        config: PathBuf,
        /// Only this business day (`YYYY-MM-DD`, in each merchant's time zone).
        #[arg(long)]
        date: Option<String>,
        /// Only this provider (its designation code).
        #[arg(long)]
        provider: Option<u32>,
        /// The summary's file; the item list goes beside it, its name ending `.items.csv`
        /// instead of `.csv`. Without it both go to stdout, the summary first, then a blank
        /// line.
        #[arg(long)]
        out: Option<PathBuf>,
    },
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command.unwrap_or(Command::Serve { config: None }) {
        Command::DefaultConfig => {
            print!("{DEFAULT_CONFIG}");
            Ok(())
        }
        Command::Serve { config } => serve(config),
        Command::CheckConfig { file } => {
            let (config, source) = load(&Some(file))?;
            for warning in config.warnings() {
                println!("warning: {warning}");
            }
            println!("ok: {source}");
            Ok(())
        }
        Command::Route { config } => route(config),
        Command::ReplayShard { config, shard } => {
            let (config, _) = load(&Some(config))?;
            let engine = config.engine_config().map_err(anyhow::Error::msg)?;
            let replay = settlegate_engine::replay_shard(&engine, shard)?;
            println!(
                "{{\"shard\":{},\"records\":{},\"digest\":\"{:016x}\"}}",
                replay.shard, replay.records, replay.digest
            );
            Ok(())
        }
        Command::Report { config, date, provider, out } => report(config, date, provider, out),
    }
}

fn report(
    config: PathBuf,
    date: Option<String>,
    provider: Option<u32>,
    out: Option<PathBuf>,
) -> anyhow::Result<()> {
    let (config, _) = load(&Some(config))?;
    let engine = config.engine_config().map_err(anyhow::Error::msg)?;
    if let Some(date) = &date {
        anyhow::ensure!(
            settlegate_engine::report::valid_day(date),
            "--date {date:?} is not a date (YYYY-MM-DD)"
        );
    }
    let mut report = settlegate_engine::report::report(&engine)?;
    if let Some(date) = &date {
        report = report.on_day(date);
    }
    if let Some(provider) = provider {
        report = report.of_provider(provider);
    }
    match out {
        Some(summary_path) => {
            let items_path = items_path(&summary_path);
            std::fs::write(&summary_path, report.summary_csv())
                .with_context(|| format!("writing {}", summary_path.display()))?;
            std::fs::write(&items_path, report.items_csv())
                .with_context(|| format!("writing {}", items_path.display()))?;
        }
        None => print!("{}\n{}", report.summary_csv(), report.items_csv()),
    }
    Ok(())
}

/// `x.csv` → `x.items.csv` (any other name: `.items.csv` added).
fn items_path(summary: &std::path::Path) -> PathBuf {
    let text = summary.display().to_string();
    let stem = text.strip_suffix(".csv").unwrap_or(&text);
    PathBuf::from(format!("{stem}.items.csv"))
}

fn load(path: &Option<PathBuf>) -> anyhow::Result<(Config, String)> {
    match path {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading {}", path.display()))?;
            let config = Config::from_toml(&text)
                .map_err(anyhow::Error::msg)
                .with_context(|| format!("in {}", path.display()))?;
            Ok((config, path.display().to_string()))
        }
        None => Ok((Config::embedded(), "embedded default config".into())),
    }
}

fn init_logs(config: &Config) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(&config.server.log_level));
    // Logs go to stderr; stdout carries only the start banner (addresses, data directory).
    // Colours only for a terminal: a file or a log collector gets plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(ansi);
    if config.server.log_format == "json" {
        builder.json().init();
    } else {
        builder.init();
    }
}

fn serve(path: Option<PathBuf>) -> anyhow::Result<()> {
    let (config, source) = load(&path)?;
    init_logs(&config);
    for warning in config.warnings() {
        tracing::warn!("{warning}");
    }
    // A fatal error goes to the log too (a JSON log's collector sees it), not only to stderr.
    serve_logged(config, source).inspect_err(|error| tracing::error!("fatal: {error:#}"))
}

fn serve_logged(config: Config, source: String) -> anyhow::Result<()> {
    let io_threads = config.server.io_thread_count();
    // The connections have threads of their own (`server`); this runtime accepts them, serves
    // HTTP and sweeps codes.
    let runtime =
        tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build()?;
    runtime.block_on(async move {
        let stop = StopSignals::catch()?;
        let server = settlegate::server::start(config).await?;
        let scheme = if server.tls { "tls" } else { "tcp" };
        println!("settlegate {} ({source})", env!("CARGO_PKG_VERSION"));
        println!("  protocol  {scheme}://{}", server.addr);
        println!("  http      http://{}/metrics /healthz /readyz /digests", server.http_addr);
        println!("  shards    {} (connection threads: {io_threads})", server.engine.shard_count());
        println!("  providers {:?}", server.engine.registry().codes());
        let durability = &server.engine.config().durability;
        match &durability.data_dir {
            Some(dir) => println!("  data      {} (fsync: {:?})", dir.display(), durability.fsync),
            None => {
                println!("  data      in memory only (set [engine.durability] data_dir to keep it)")
            }
        }
        tracing::info!(addr = %server.addr, http = %server.http_addr, "listening");
        // `server::start` has returned: recovery is done and both listeners are bound. Under
        // systemd's `Type=notify` this is when the units ordered after this one may start.
        notify_systemd(settlegate::notify::ready(&format!("listening on {}", server.addr)));
        stop.wait().await;
        notify_systemd(settlegate::notify::stopping());
        tracing::info!("shutting down: no new connections, finishing in-flight requests");
        server.shutdown().await;
        tracing::info!("stopped");
        Ok(())
    })
}

fn route(path: PathBuf) -> anyhow::Result<()> {
    let (config, source) = load(&Some(path))?;
    init_logs(&config);
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    runtime.block_on(async move {
        let stop = StopSignals::catch()?;
        let router = settlegate::route::start(config).await?;
        println!("settlegate {} router ({source})", env!("CARGO_PKG_VERSION"));
        println!("  protocol  tcp://{}", router.addr);
        println!("  http      http://{}/healthz /readyz", router.http_addr);
        tracing::info!(addr = %router.addr, "routing");
        stop.wait().await;
        Ok(())
    })
}

/// A notification that could not be sent is logged, not fatal: systemd then times the start
/// out (`TimeoutStartSec=`) and says so.
fn notify_systemd(sent: std::io::Result<bool>) {
    if let Err(error) = sent {
        tracing::error!(%error, "could not notify systemd (NOTIFY_SOCKET)");
    }
}

/// SIGTERM and SIGINT, caught from the moment this is made: made before the server says it
/// is ready, so that a stop sent right after readiness is a graceful one, never the default
/// action's kill.
struct StopSignals {
    terminate: tokio::signal::unix::Signal,
    interrupt: tokio::signal::unix::Signal,
}

impl StopSignals {
    fn catch() -> anyhow::Result<StopSignals> {
        use tokio::signal::unix::{signal, SignalKind};
        Ok(StopSignals {
            terminate: signal(SignalKind::terminate())?,
            interrupt: signal(SignalKind::interrupt())?,
        })
    }

    async fn wait(mut self) {
        tokio::select! {
            _ = self.terminate.recv() => {}
            _ = self.interrupt.recv() => {}
        }
    }
}
