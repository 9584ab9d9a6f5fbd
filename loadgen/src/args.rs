//! The command line, and its checks against the limits.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::bail;
use clap::Parser;
use settlegate_engine::limits::{
    MEANS_PER_USER_MAX, PROVIDERS_MAX, TERMINALS_PER_PROVIDER_MAX, TERMINAL_ID_LEN_MAX,
};

use crate::dataset::Sizes;
use crate::driver::{ClosedLoop, Pacing, Plan};
use crate::mix::Mix;
use crate::redis::RedisOp;
use crate::slo::{Slo, Slos};
use crate::units::parse_duration;

/// Most connections (or embedded submitters).
pub const CONNECTIONS_MAX: usize = 1024;
/// Most requests in flight per connection.
pub const PIPELINE_MAX: usize = 1024;
/// Most users in the dataset.
pub const USERS_MAX: usize = 10_000_000;
/// Most stores in the dataset (each is listed with every provider).
pub const STORES_MAX: usize = 1_000_000;
/// Highest open-loop rate, requests per second.
pub const RATE_MAX: f64 = 10_000_000.0;

const _: () = assert!(STORES_MAX <= TERMINALS_PER_PROVIDER_MAX);

/// `loadgen`'s flags.
#[derive(Parser, Debug, Clone)]
#[command(name = "loadgen", about = "settlegate load generator", version)]
pub struct Args {
    /// `redis` for the Redis baseline (see `--redis-op`); none for settlegate. (`loadgen
    /// compare A.json B.json` compares two `--json` reports instead: see `loadgen compare
    /// --help`.)
    #[arg(value_parser = ["redis"])]
    pub mode: Option<String>,
    /// A running server's protocol address (or Redis's, in `redis` mode).
    #[arg(long, conflicts_with = "embedded")]
    pub target: Option<String>,
    /// The Redis baseline's operation: `set` (SET of a new 100-byte value) or `auth` (an
    /// authorization's bookkeeping without the cryptography: a Lua script run by EVALSHA that
    /// keeps an idempotency record, checks and stores the user's nonce, checks and debits the
    /// balance and records the last payment, over `--users` users).
    #[arg(long, value_enum, default_value_t = RedisOp::Set)]
    pub redis_op: RedisOp,
    /// Run an engine in this process instead (zero-latency simulated providers).
    #[arg(long)]
    pub embedded: bool,
    /// API key for `--target`.
    #[arg(long, default_value = "sg-demo-key")]
    pub api_key: String,
    /// Operations and their weights, e.g. `authorize=70,list_means=20,ping=10` (a name alone
    /// weighs 1). The operations: `authorize` (a payment signed with a user's device key),
    /// `usable` (what a user can pay with at a store), `age` (an age-checked payment),
    /// `list_means` (a user's means), `confirm_terminal` (a store terminal with a provider),
    /// `ping` (the protocol round trip alone), `code` (a payment code issued, then redeemed:
    /// two requests timed together), `void` (a code issued, then voided), `refund` (`code`,
    /// then a partial refund: three requests), `refund_sale` (a payment, then a partial
    /// refund of it: two requests).
    #[arg(long, default_value = "authorize")]
    pub mix: Mix,
    /// Seed of the operation, user and store choices (same seed, same sequence).
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Users in the dataset (each gets a device key and `--means-per-user` means).
    #[arg(long, default_value_t = 1_000)]
    pub users: usize,
    /// Means per user: a card (the default, which authorizations use), then e-money purses.
    #[arg(long, default_value_t = 1)]
    pub means_per_user: usize,
    /// Store terminals (`TERMINAL-1` ...), listed with every provider.
    #[arg(long, default_value_t = 16)]
    pub stores: usize,
    /// Providers payments spread over: codes `--provider`, `--provider`+1, ... (embedded: the
    /// engine gets exactly these; a server must have them configured).
    #[arg(long, default_value_t = 1)]
    pub providers: usize,
    /// First provider designation code.
    #[arg(long, default_value_t = 1)]
    pub provider: u32,
    /// Prefix of the stores' terminal IDs.
    #[arg(long, default_value = "LOADGEN")]
    pub terminal: String,
    /// Connections (embedded: concurrent submitters); each is one task of the load generator.
    #[arg(long, default_value_t = 4)]
    pub connections: usize,
    /// Requests in flight per connection.
    #[arg(long, default_value_t = 16)]
    pub pipeline: usize,
    /// Measured time (`10`, `10s`, `500ms`, `1m`).
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub duration: Duration,
    /// Time run before measuring; its samples are discarded.
    #[arg(long, default_value = "2s", value_parser = parse_duration)]
    pub warmup: Duration,
    /// Open loop: send this many requests per second overall, on a fixed schedule, and
    /// measure latency from when each was due (coordinated-omission corrected). Closed loop
    /// (as fast as answers come) without it.
    #[arg(long)]
    pub rate: Option<f64>,
    /// How the open loop waits for each request's due time: `timer` (tokio's millisecond
    /// ticks, so the rate arrives in one burst per millisecond) or `spin` (yield until due:
    /// evenly spaced sends, but loadgen keeps its core busy; pin it apart from the server).
    #[arg(long, value_enum, default_value_t = Pacing::Timer, requires = "rate")]
    pub pacing: Pacing,
    /// The closed loop: `batch` (each connection writes `--pipeline` requests at once and
    /// waits for all their answers, as `redis-benchmark -P` does) or `window` (each keeps
    /// `--pipeline` in flight, sending one as each answer arrives, through the protocol
    /// client). Default: `batch` against a server (or Redis) when every operation of the mix
    /// is one request, else `window`.
    #[arg(long, value_enum, conflicts_with = "rate")]
    pub closed_loop: Option<ClosedLoop>,
    /// A request unanswered after this counts as a `timeout` error.
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    pub timeout: Duration,
    /// Latency objectives, `[OPERATION:]METRIC=LIMIT` separated by commas (repeatable); exit
    /// status 1 when one is missed. Metrics: p50, p90, p99, p999, p9999, max; limits with a
    /// unit (us, ms, s). Without an operation an objective bounds all operations together;
    /// after `OPERATION:`, the objectives that follow in the same value without one apply to
    /// that operation too (`all:` goes back to all together): `authorize:p99=1ms,max=50ms`
    /// bounds authorize's p99 and authorize's max; `p99=2ms,authorize:max=50ms` the overall
    /// p99 and authorize's max.
    #[arg(long)]
    pub slo: Vec<Slos>,
    /// Write a JSON report here.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Write the latency-percentile plot here: SVG if the name ends in `.svg`, else an HTML
    /// page with the summary.
    #[arg(long)]
    pub html: Option<PathBuf>,
    /// Write the latency histograms here, in HdrHistogram's percentile-distribution text
    /// (`.hgrm`, values in ms), to compare runs with HdrHistogram's plotter or tools: one file
    /// per operation (and `all` when the mix has several), `run.hgrm` giving
    /// `run.authorize.hgrm`, and with `--rate` also `run.authorize.uncorrected.hgrm`.
    #[arg(long, value_name = "FILE")]
    pub hgrm: Option<PathBuf>,
    /// No live progress line (it is hidden anyway when stderr is not a terminal).
    #[arg(long)]
    pub no_progress: bool,
}

impl Args {
    /// Whether this is the Redis baseline.
    pub fn redis(&self) -> bool {
        self.mode.as_deref() == Some("redis")
    }

    /// Checks the flags against each other and the limits.
    pub fn check(&self) -> anyhow::Result<()> {
        if self.redis() {
            if self.target.is_none() {
                bail!("redis mode needs --target ADDR");
            }
            if self.mix != Mix::parse("authorize").expect("valid") {
                bail!("--mix does not apply to redis mode (it runs --redis-op only)");
            }
            if self.redis_op == RedisOp::Auth && !(1..=USERS_MAX).contains(&self.users) {
                bail!("--users must be 1..={USERS_MAX}");
            }
        } else {
            if self.redis_op != RedisOp::Set {
                bail!("--redis-op applies to redis mode only");
            }
            if self.target.is_none() && !self.embedded {
                bail!("give --target ADDR or --embedded");
            }
            self.check_dataset()?;
        }
        if !(1..=CONNECTIONS_MAX).contains(&self.connections) {
            bail!("--connections must be 1..={CONNECTIONS_MAX}");
        }
        if !(1..=PIPELINE_MAX).contains(&self.pipeline) {
            bail!("--pipeline must be 1..={PIPELINE_MAX}");
        }
        if self.duration.is_zero() || self.timeout.is_zero() {
            bail!("--duration and --timeout must be positive");
        }
        if let Some(rate) = self.rate {
            if !(rate > 0.0 && rate <= RATE_MAX) {
                bail!("--rate must be above 0 and at most {RATE_MAX} requests/s");
            }
        }
        if self.closed_loop == Some(ClosedLoop::Batch) && !self.lanes_fit() {
            bail!("--closed-loop batch needs --target (or redis mode) and a mix of one-request operations (not code)");
        }
        let names = self.operation_names();
        for slo in &self.slos() {
            if let Some(operation) = &slo.operation {
                if !names.contains(&operation.as_str()) {
                    bail!("--slo {slo}: `{operation}` is not in this run (it runs {names:?})");
                }
            }
        }
        Ok(())
    }

    fn check_dataset(&self) -> anyhow::Result<()> {
        if self.users < self.connections || self.users > USERS_MAX {
            bail!("--users must be at least --connections and at most {USERS_MAX}");
        }
        if !(1..=MEANS_PER_USER_MAX).contains(&self.means_per_user) {
            bail!("--means-per-user must be 1..={MEANS_PER_USER_MAX}");
        }
        if !(1..=STORES_MAX).contains(&self.stores) {
            bail!("--stores must be 1..={STORES_MAX}");
        }
        let longest = format!("{}-{}", self.terminal, self.stores);
        if longest.len() > TERMINAL_ID_LEN_MAX || !longest.bytes().all(|b| b.is_ascii_graphic()) {
            bail!(
                "terminal IDs like `{longest}` must be printable ASCII of at most \
                 {TERMINAL_ID_LEN_MAX} bytes: shorten --terminal or use fewer --stores"
            );
        }
        let last = u64::from(self.provider) + self.providers as u64 - 1;
        if !(1..=PROVIDERS_MAX).contains(&self.providers) || last > u64::from(u32::MAX) {
            bail!("--providers must be 1..={PROVIDERS_MAX}, with codes that fit in 32 bits");
        }
        Ok(())
    }

    /// Every `--slo` objective, in the order given.
    pub fn slos(&self) -> Vec<Slo> {
        self.slo.iter().flat_map(|slos| slos.0.iter().cloned()).collect()
    }

    /// The operations' names, in the mix's order.
    pub fn operation_names(&self) -> Vec<&'static str> {
        if self.redis() {
            vec![self.redis_op.name()]
        } else {
            self.mix.operations().iter().map(|op| op.name()).collect()
        }
    }

    /// Whether the run can go through lanes ([`crate::lanes`]: the open loop and the batch
    /// closed loop): against a server, every operation one request.
    pub fn lanes_fit(&self) -> bool {
        self.redis()
            || (self.target.is_some() && self.mix.operations().iter().all(|op| op.is_single()))
    }

    /// The closed loop this run uses, `None` for an open loop.
    pub fn closed_loop(&self) -> Option<ClosedLoop> {
        if self.rate.is_some() {
            return None;
        }
        Some(self.closed_loop.unwrap_or(if self.lanes_fit() {
            ClosedLoop::Batch
        } else {
            ClosedLoop::Window
        }))
    }

    /// The run's shape.
    pub fn plan(&self) -> Plan {
        Plan {
            connections: self.connections,
            pipeline: self.pipeline,
            warmup: self.warmup,
            duration: self.duration,
            rate_per_s: self.rate,
            pacing: self.pacing,
            closed_loop: self.closed_loop(),
            timeout: self.timeout,
            seed: self.seed,
            weights: if self.redis() { vec![1] } else { self.mix.weights() },
        }
    }

    /// The dataset's sizes.
    pub fn sizes(&self) -> Sizes {
        Sizes {
            users: self.users,
            means_per_user: self.means_per_user,
            stores: self.stores,
            terminal_prefix: self.terminal.clone(),
            providers: (0..self.providers as u32).map(|p| self.provider + p).collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(line: &str) -> Args {
        Args::try_parse_from(line.split_whitespace()).unwrap()
    }

    #[test]
    fn flags_are_checked() {
        assert!(parse("loadgen --embedded").check().is_ok());
        assert!(parse("loadgen").check().is_err(), "a target is required");
        assert!(parse("loadgen --embedded --connections 0").check().is_err());
        assert!(parse("loadgen --embedded --pipeline 5000").check().is_err());
        assert!(parse("loadgen --embedded --users 2 --connections 4").check().is_err());
        assert!(parse("loadgen --embedded --means-per-user 17").check().is_err());
        assert!(parse("loadgen --embedded --stores 0").check().is_err());
        assert!(parse("loadgen --embedded --terminal VERY-LONG-PREFIX").check().is_err());
        assert!(parse("loadgen --embedded --rate 0").check().is_err());
        assert!(parse("loadgen --embedded --duration 0s").check().is_err());
        assert!(parse("loadgen redis --target 127.0.0.1:6379").check().is_ok());
        assert!(parse("loadgen redis").check().is_err());
        assert!(parse("loadgen redis --target x:1 --mix ping").check().is_err());
        assert!(parse("loadgen redis --target x:1 --slo redis_set:p99=1ms").check().is_ok());
        assert!(parse("loadgen --embedded --closed-loop batch").check().is_err());
        assert!(parse("loadgen --embedded --redis-op auth").check().is_err(), "redis mode only");
        assert!(parse("loadgen redis --target x:1 --redis-op auth --users 0").check().is_err());
        assert!(parse("loadgen --target x:1 --mix code --closed-loop batch").check().is_err());
        assert!(Args::try_parse_from(
            "loadgen --target x:1 --rate 5 --closed-loop batch".split(' ')
        )
        .is_err());
    }

    #[test]
    fn the_redis_operation_is_chosen_and_named() {
        let set = parse("loadgen redis --target x:1");
        assert_eq!((set.redis_op, set.operation_names()), (RedisOp::Set, vec!["redis_set"]));
        let auth = parse("loadgen redis --target x:1 --redis-op auth --users 50 --rate 100");
        auth.check().unwrap();
        assert_eq!(auth.redis_op, RedisOp::Auth);
        assert_eq!(auth.operation_names(), ["redis_auth_lua"]);
        assert_eq!(auth.closed_loop(), None);
        assert!(parse("loadgen redis --target x:1 --redis-op auth --slo redis_auth_lua:p99=1ms")
            .check()
            .is_ok());
        assert!(parse("loadgen redis --target x:1 --redis-op auth --slo redis_set:p99=1ms")
            .check()
            .is_err());
        assert!(Args::try_parse_from(["loadgen", "redis", "--redis-op", "get"]).is_err());
    }

    #[test]
    fn help_names_every_operation_and_no_internal_docs() {
        use clap::CommandFactory as _;
        let help = Args::command().render_long_help().to_string();
        for internal in ["[`", "crate::", "module", ".rs"] {
            assert!(!help.contains(internal), "`{internal}` in --help:\n{help}");
        }
        let mix = Args::command()
            .get_arguments()
            .find(|arg| arg.get_id() == "mix")
            .and_then(|arg| arg.get_long_help().or(arg.get_help()))
            .map(|help| help.to_string())
            .unwrap();
        for operation in crate::ops::Operation::ALL {
            assert!(mix.contains(&format!("`{}`", operation.name())), "{operation:?} in {mix}");
        }
    }

    #[test]
    fn a_bare_slo_after_an_operation_bounds_that_operation() {
        let args = parse("loadgen --embedded --slo authorize:p99=1ms,max=50ms --slo p50=1ms");
        let slos: Vec<String> = args.slos().iter().map(|slo| slo.to_string()).collect();
        assert_eq!(slos, ["authorize:p99<=1000us", "authorize:max<=50000us", "p50<=1000us"]);
    }

    #[test]
    fn the_closed_loop_is_batch_where_it_can_be() {
        let closed = |line| parse(line).closed_loop();
        assert_eq!(closed("loadgen --target x:1"), Some(ClosedLoop::Batch));
        assert_eq!(closed("loadgen redis --target x:1"), Some(ClosedLoop::Batch));
        assert_eq!(closed("loadgen --target x:1 --mix authorize,code"), Some(ClosedLoop::Window));
        assert_eq!(closed("loadgen --embedded"), Some(ClosedLoop::Window));
        assert_eq!(closed("loadgen --target x:1 --closed-loop window"), Some(ClosedLoop::Window));
        assert_eq!(closed("loadgen --target x:1 --rate 100"), None);
    }

    #[test]
    fn flags_parse_units_mixes_and_slos() {
        let args = parse(
            "loadgen --embedded --duration 3s --warmup 500ms --rate 2000 --mix authorize=3,ping=1 \
             --slo p99=1ms,max=20ms --slo authorize:p999=5ms",
        );
        args.check().unwrap();
        assert_eq!(
            (args.duration, args.warmup),
            (Duration::from_secs(3), Duration::from_millis(500))
        );
        assert_eq!(args.slos().len(), 3);
        assert_eq!(args.plan().weights, [3, 1]);
        assert_eq!(args.operation_names(), ["authorize", "ping"]);
        assert_eq!(parse("loadgen --embedded --duration 10").duration, Duration::from_secs(10));
        let error =
            Args::try_parse_from(["loadgen", "--embedded", "--mix", "authorize=70,coupon=20"])
                .unwrap_err()
                .to_string();
        assert!(error.contains("unknown operation `coupon`"), "{error}");
        let error = Args::try_parse_from(["loadgen", "--embedded", "--slo", "p99=fast"])
            .unwrap_err()
            .to_string();
        assert!(error.contains("bad SLO"), "{error}");
        let stray = parse("loadgen --embedded --mix ping --slo authorize:p99=1ms");
        assert!(stray.check().unwrap_err().to_string().contains("not in this run"));
        let sizes = parse("loadgen --embedded --provider 3 --providers 2").sizes();
        assert_eq!(sizes.providers, [3, 4]);
    }
}
