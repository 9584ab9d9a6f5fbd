//! `loadgen`: drives settlegate (or Redis, as a baseline) and reports what it measured.
//!
//! ```text
//! loadgen --embedded --users 1000 --connections 4 --pipeline 64 --duration 10s
//! loadgen --target 127.0.0.1:7878 --mix authorize=70,list_means=20,ping=10 --json run.json
//! loadgen --target 127.0.0.1:7878 --rate 40000 --slo authorize:p99=1ms --html run.html
//! taskset -c 0 loadgen --target 127.0.0.1:7878 --rate 40000 --pacing spin
//! loadgen redis --target 127.0.0.1:6379 --connections 50 --pipeline 16   # the baseline
//! loadgen redis --target 127.0.0.1:6379 --redis-op auth --users 1000      # the same work
//! loadgen compare before.json after.json                                   # two --json runs
//! ```
//!
//! A run prepares its dataset first (providers, stores, users with device keys and means;
//! never measured), then drives `--connections` connections with up to `--pipeline` requests
//! in flight each: closed loop (as fast as answers come) or open loop at `--rate` requests/s
//! with latency corrected for coordinated omission (see [`driver`]; `--pacing spin` spaces
//! the sends to the microsecond instead of the timer's millisecond bursts, for a loadgen
//! pinned to its own core). Samples of the `--warmup`
//! are discarded; `--duration` is measured. It prints a table per operation, can write JSON
//! (`--json`), an HTML report (`--html`) and the histograms as `.hgrm` text (`--hgrm`), and exits 1 when a `--slo` is missed (2 on
//! an error). On Linux it also reports how busy the machine was over the measured window and
//! how much of it the hypervisor took (steal), with a warning from 5%: a run in such a spell
//! measures the host as much as the target ([`host`]).
//!
//! Layout: [`args`] the flags; [`mix`] the weighted, seeded operation choice; [`ops`] the
//! operations; [`dataset`] the preparation; [`lanes`] the loops over raw sockets (open loop,
//! closed loop in batches) and [`driver`] the per-request loop, with the schedule and the
//! correction; [`tally`] the histograms; [`report`], [`plot`], [`hgrm`], [`slo`] the output; [`host`]
//! the machine's load; [`redis`] the baseline.

mod args;
mod compare;
mod dataset;
mod driver;
mod hgrm;
mod host;
mod lanes;
mod mix;
mod ops;
mod plot;
mod progress;
mod redis;
mod report;
mod slo;
mod tally;
mod target;
mod units;

use std::process::ExitCode;
use std::sync::Arc;
use std::time::Instant;

use anyhow::Context as _;
use clap::Parser as _;

use crate::args::Args;
use crate::driver::{drive, ClosedLoop, Live};
use crate::ops::Workload;
use crate::progress::RunProgress;
use crate::report::{Settings, Summary};
use crate::slo::Verdict;
use crate::target::Target;

fn main() -> ExitCode {
    // `loadgen compare A.json B.json` has flags of its own.
    if std::env::args_os().nth(1).is_some_and(|mode| mode == "compare") {
        let args = compare::CompareArgs::parse_from(std::env::args_os().skip(1));
        return match compare::run(&args) {
            Ok(text) => {
                print!("{text}");
                ExitCode::SUCCESS
            }
            Err(error) => {
                eprintln!("error: {error:#}");
                ExitCode::from(2)
            }
        };
    }
    load(Args::parse())
}

#[tokio::main]
async fn load(args: Args) -> ExitCode {
    match run(args).await {
        Ok(verdicts) if verdicts.iter().all(Verdict::met) => ExitCode::SUCCESS,
        Ok(_) => ExitCode::from(1),
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::from(2)
        }
    }
}

/// Runs what `args` asks; returns the SLO verdicts (printed already).
async fn run(args: Args) -> anyhow::Result<Vec<Verdict>> {
    args.check()?;
    let plan = Arc::new(args.plan());
    let live = Arc::new(Live::default());
    let progress = |live: &Arc<Live>| {
        RunProgress::start(live.clone(), args.warmup, args.duration, !args.no_progress)
    };
    // The machine's load over the measured window, watched beside the run.
    let watch_host = || tokio::spawn(host::watch(args.warmup, args.duration));
    let (tally, target, host) = if args.redis() {
        let addr = args.target.as_deref().expect("checked");
        let line = progress(&live);
        let host = watch_host();
        let tally = redis::baseline(addr, args.redis_op, args.users, plan, live).await?;
        line.finish();
        (tally, format!("redis {addr}"), host)
    } else {
        let (target, label) = match args.target.as_deref() {
            Some(addr) => {
                (Target::remote(addr, &args.api_key, args.connections).await?, addr.to_owned())
            }
            None => (Target::embedded(&args.sizes().providers)?, "embedded".to_owned()),
        };
        let prepared = Instant::now();
        let bar = progress::preparing(args.users, !args.no_progress);
        let dataset = dataset::prepare(&target, &args.sizes(), &bar).await?;
        bar.finish_and_clear();
        eprintln!(
            "dataset: {} users x {} means, {} stores, providers {:?} in {:.1?} (not measured)",
            dataset.payers.len(),
            args.means_per_user,
            dataset.stores.len(),
            dataset.providers,
            prepared.elapsed()
        );
        let operations = args.mix.operations();
        let workload =
            Workload::new(target, dataset, operations, args.connections, args.pipeline, args.seed);
        let workload = Arc::new(workload);
        let line = progress(&live);
        let host = watch_host();
        let tally = match args.target.as_deref() {
            Some(addr) if args.lanes_fit() && plan.closed_loop != Some(ClosedLoop::Window) => {
                let (key, timeout) = (args.api_key.as_str(), args.timeout);
                let wire = Arc::new(lanes::Settlegate { workload });
                lanes::drive(wire, plan, live, || lanes::connect(addr, key, timeout)).await?
            }
            _ => drive(workload, plan, live).await,
        };
        line.finish();
        (tally, label, host)
    };
    let mut summary = Summary::new(&args.operation_names(), &tally, settings(&args, target));
    summary.host = host.await.ok().flatten();
    let verdicts = slo::check(&args.slos(), &summary);
    print!("{}", summary.text());
    for verdict in &verdicts {
        let actual = verdict.actual_us.map_or("nothing measured".into(), |us| format!("{us}us"));
        let word = if verdict.met() { "met" } else { "MISSED" };
        println!("SLO {word}: {} (measured {actual})", verdict.slo);
    }
    write_reports(&args, &summary, &verdicts)?;
    Ok(verdicts)
}

fn settings(args: &Args, target: String) -> Settings {
    Settings {
        target,
        mix: if args.redis() { args.redis_op.name().to_owned() } else { args.mix.to_string() },
        rate_per_s: args.rate,
        pacing: args.pacing,
        closed_loop: args.closed_loop(),
        connections: args.connections,
        pipeline: args.pipeline,
        warmup_s: args.warmup.as_secs_f64(),
        duration_s: args.duration.as_secs_f64(),
        users: if args.redis() && args.redis_op == redis::RedisOp::Set { 0 } else { args.users },
        seed: args.seed,
    }
}

fn write_reports(args: &Args, summary: &Summary, verdicts: &[Verdict]) -> anyhow::Result<()> {
    if let Some(path) = &args.json {
        let json = serde_json::to_string_pretty(&summary.json(verdicts))?;
        std::fs::write(path, json).with_context(|| format!("writing {}", path.display()))?;
    }
    if let Some(path) = &args.html {
        let svg_only = path.extension().is_some_and(|ext| ext.eq_ignore_ascii_case("svg"));
        let page =
            if svg_only { plot::svg(summary, verdicts)? } else { plot::html(summary, verdicts)? };
        std::fs::write(path, page).with_context(|| format!("writing {}", path.display()))?;
    }
    if let Some(path) = &args.hgrm {
        for (path, text) in hgrm::files(path, summary) {
            std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The whole tool, embedded, every operation: the reports exist and have their shape.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn embedded_mixed_run_writes_reports_and_checks_slos() {
        let dir = std::env::temp_dir().join(format!("loadgen-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (json, html) = (dir.join("report.json"), dir.join("report.html"));
        let line = format!(
            "loadgen --embedded --users 8 --stores 3 --providers 2 --means-per-user 2 \
             --connections 2 --pipeline 2 --warmup 100ms --duration 500ms --no-progress \
             --mix authorize=4,list_means=2,confirm_terminal=1,ping=1 \
             --slo authorize:p50=1us,max=10s --json {} --html {}",
            json.display(),
            html.display()
        );
        let args = Args::try_parse_from(line.split_whitespace()).unwrap();
        let verdicts = run(args).await.unwrap();
        let met: Vec<bool> = verdicts.iter().map(Verdict::met).collect();
        assert_eq!(met, [false, true], "no authorization takes 1 us; none takes 10 s");
        let report: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
        assert!(report["throughput_per_s"].as_f64().unwrap() > 0.0);
        assert!(report["latency_us"]["p99"].as_u64().unwrap() > 0);
        assert_eq!(report["errors"], 0, "{report:#}");
        assert_eq!(report["declines_by_reason"], serde_json::json!({}));
        for name in ["authorize", "list_means", "confirm_terminal", "ping"] {
            let op = &report["operations"][name];
            assert!(op["requests"].as_u64().unwrap() > 0, "{name}: {op}");
        }
        let page = std::fs::read_to_string(&html).unwrap();
        let percentiles = page.split("<figure id=\"percentiles\">").nth(1).unwrap();
        let percentiles = percentiles.split("</figure>").next().unwrap();
        let wide = percentiles.matches("stroke-width=\"2\"").count();
        assert_eq!(wide, 8, "a line (and key) per operation");
        assert!(report["series"].as_array().unwrap().len() == 1, "one second: {report:#}");
        std::fs::remove_dir_all(&dir).ok();
    }

    /// Over TCP against a real server: the batch closed loop (the default for one-request
    /// operations), the window one (which a mix with `code` needs) and the open loop (through
    /// lanes, or the per-request driver with `code`) all get an answer to every request they
    /// send, and the report says which loop ran.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn server_runs_in_every_loop() {
        use serde_json::json;
        let mut config = settlegate::config::Config::embedded();
        config.server.listen = "127.0.0.1:0".parse().unwrap();
        config.server.http_listen = "127.0.0.1:0".parse().unwrap();
        config.demo.users = 0;
        config.engine.password = settlegate_engine::password::PasswordConfig {
            memory_kib: 64,
            iterations: 1,
            parallelism: 1,
        };
        let server = settlegate::server::start(config).await.unwrap();
        let dir = std::env::temp_dir().join(format!("loadgen-tcp-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let runs = [
            (json!("batch"), "authorize=4,usable=1,list_means=1,confirm_terminal=1,ping=1", None),
            (json!("window"), "authorize=2,code=1", None),
            (json!("batch"), "authorize", Some("--closed-loop batch")),
            // The open loop: through lanes, and through the per-request driver with `code`.
            (json!(null), "authorize=3,usable=1", Some("--rate 2000 --pacing spin")),
            (json!(null), "authorize=3,code=1", Some("--rate 1000")),
        ];
        // Requests due in the open loop's measured 400 ms, at each rate.
        let due = |flag: Option<&str>| match flag {
            Some(flag) if flag.contains("--rate 2000") => 800,
            Some(flag) if flag.contains("--rate 1000") => 400,
            _ => 0,
        };
        for (i, (closed_loop, mix, flag)) in runs.into_iter().enumerate() {
            let json = dir.join(format!("run-{i}.json"));
            let line = format!(
                "loadgen --target {} --users 8 --stores 3 --providers 3 --connections 2 \
                 --pipeline 4 --warmup 100ms --duration 400ms --no-progress --mix {mix} \
                 --json {} {}",
                server.addr,
                json.display(),
                flag.unwrap_or_default(),
            );
            let args = Args::try_parse_from(line.split_whitespace()).unwrap();
            run(args).await.unwrap();
            let report: serde_json::Value =
                serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
            assert_eq!(report["settings"]["closed_loop"], closed_loop, "{mix}");
            assert_eq!(report["errors"], 0, "{mix}: {report:#}");
            let operations = report["operations"].as_object().unwrap();
            for (name, op) in operations {
                assert!(op["requests"].as_u64().unwrap() > 0, "{mix}: {name}: {op}");
            }
            // Every request the schedule made due in the window is either measured or counted
            // as unsent (a slow spell of the host may leave some unsent; none may go missing).
            if closed_loop.is_null() {
                let sent: u64 =
                    operations.values().map(|op| op["requests"].as_u64().unwrap()).sum();
                let unsent = report["unsent"].as_u64().unwrap();
                assert_eq!(sent + unsent, due(flag), "{mix}: {report:#}");
            } else {
                assert_eq!(report["unsent"], 0, "{mix}: a closed loop has no schedule");
            }
        }
        server.shutdown().await;
        std::fs::remove_dir_all(&dir).ok();
    }
}
