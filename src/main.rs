//! `settlegate`: the server binary.
//!
//! `settlegate serve` starts the engine on the embedded default config (`src/default.toml`)
//! with demo data, or on the TOML file given with `--config`.

use std::path::PathBuf;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use serde::Deserialize;
use settlegate_engine::{Engine, EngineConfig};

/// The embedded default config.
const DEFAULT_CONFIG: &str = include_str!("default.toml");

#[derive(Parser)]
#[command(name = "settlegate", version, about = "settlegate payment authorization engine")]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Run the engine (the default when no command is given).
    Serve {
        /// TOML config file; without it the embedded default config and demo data are used.
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Print the embedded default config.
    DefaultConfig,
}

/// The server's config file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    #[serde(default)]
    engine: EngineConfig,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command.unwrap_or(Command::Serve { config: None }) {
        Command::DefaultConfig => {
            print!("{DEFAULT_CONFIG}");
            Ok(())
        }
        Command::Serve { config } => serve(config),
    }
}

fn serve(path: Option<PathBuf>) -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let (text, source) = match &path {
        Some(path) => (
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?,
            path.display().to_string(),
        ),
        None => (DEFAULT_CONFIG.to_owned(), "embedded default config".to_owned()),
    };
    let config: FileConfig = toml::from_str(&text).with_context(|| format!("parsing {source}"))?;
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    runtime.block_on(async move {
        let engine = Engine::start(config.engine).context("starting the engine")?;
        tracing::info!(
            source = %source,
            shards = engine.shard_count(),
            providers = ?engine.registry().codes(),
            "settlegate engine running; Ctrl-C to stop"
        );
        tokio::signal::ctrl_c().await?;
        tracing::info!("stopping");
        engine.shutdown();
        Ok(())
    })
}
