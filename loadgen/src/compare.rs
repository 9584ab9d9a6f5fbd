//! `loadgen compare A.json B.json`: two `--json` reports side by side, per operation (and
//! all together), throughput and latency percentiles with the ratio B / A.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context as _};
use serde_json::Value;

/// `loadgen compare`'s arguments.
#[derive(clap::Parser, Debug)]
#[command(
    name = "loadgen compare",
    about = "Compare two loadgen JSON reports (--json): per operation, throughput and latency \
             percentiles side by side, with the ratio B/A"
)]
pub struct CompareArgs {
    /// The first report (the baseline).
    pub a: PathBuf,
    /// The second report.
    pub b: PathBuf,
}

/// The rows compared: label, and where the figure is in an operation's stats.
const FIGURES: [(&str, &[&str]); 9] = [
    ("requests", &["requests"]),
    ("per s", &["throughput_per_s"]),
    ("p50 us", &["latency_us", "p50"]),
    ("p90 us", &["latency_us", "p90"]),
    ("p99 us", &["latency_us", "p99"]),
    ("p99.9 us", &["latency_us", "p999"]),
    ("p99.99 us", &["latency_us", "p9999"]),
    ("max us", &["latency_us", "max"]),
    ("errors", &["errors"]),
];

/// Reads both reports and returns the comparison as text.
pub fn run(args: &CompareArgs) -> anyhow::Result<String> {
    Ok(compare(&read(&args.a)?, &read(&args.b)?))
}

fn read(path: &Path) -> anyhow::Result<Value> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let report: Value =
        serde_json::from_str(&text).with_context(|| format!("{} is not JSON", path.display()))?;
    if !report["operations"].is_object() || !report["latency_us"].is_object() {
        bail!("{} is not a loadgen JSON report (no operations, no latency_us)", path.display());
    }
    Ok(report)
}

/// The two reports side by side.
pub fn compare(a: &Value, b: &Value) -> String {
    let mut names: Vec<&String> = Vec::new();
    for report in [a, b] {
        for name in report["operations"].as_object().into_iter().flat_map(|ops| ops.keys()) {
            if !names.contains(&name) {
                names.push(name);
            }
        }
    }
    let mut out = String::new();
    for (report, label) in [(a, "A"), (b, "B")] {
        let s = &report["settings"];
        let _ = writeln!(
            out,
            "{label}: {} on {}, {}, {} connections x {} in flight, {} s",
            report["operation"].as_str().unwrap_or("?"),
            s["target"].as_str().unwrap_or("?"),
            match report["rate_per_s"].as_f64() {
                Some(rate) => format!("open loop at {rate}/s"),
                None => "closed loop".to_owned(),
            },
            s["connections"],
            s["pipeline"],
            s["duration_s"],
        );
    }
    let _ = writeln!(out, "{:<18} {:<10} {:>14} {:>14} {:>8}", "operation", "", "A", "B", "B/A");
    let rows = names.iter().map(|name| {
        (name.as_str(), &a["operations"][name.as_str()], &b["operations"][name.as_str()])
    });
    let overall = (names.len() > 1).then_some(("all", a, b));
    for (name, a, b) in rows.chain(overall) {
        for (label, path) in FIGURES {
            let (x, y) = (figure(a, path), figure(b, path));
            let ratio = match (x, y) {
                (Some(x), Some(y)) if x > 0.0 => format!("{:.2}", y / x),
                _ => "-".to_owned(),
            };
            let _ =
                writeln!(out, "{name:<18} {label:<10} {:>14} {:>14} {ratio:>8}", show(x), show(y));
        }
    }
    out
}

fn figure(stats: &Value, path: &[&str]) -> Option<f64> {
    path.iter().fold(stats, |value, key| &value[key]).as_f64()
}

fn show(value: Option<f64>) -> String {
    match value {
        Some(value) if value.fract() == 0.0 => crate::report::thousands(value as u64),
        Some(value) => format!("{value:.1}"),
        None => "-".to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn report(per_s: f64, p99: u64, ops: &[&str]) -> Value {
        let stats = json!({
            "requests": 1000,
            "throughput_per_s": per_s,
            "errors": 0,
            "latency_us": {"p50": 100, "p90": 200, "p99": p99, "p999": 900, "p9999": 950, "max": 1000},
        });
        let mut report = stats.clone();
        report["operation"] = json!(if ops.len() == 1 { ops[0] } else { "mix" });
        report["rate_per_s"] = Value::Null;
        report["settings"] =
            json!({"target": "embedded", "connections": 4, "pipeline": 16, "duration_s": 10.0});
        report["operations"] = ops.iter().map(|op| (op.to_string(), stats.clone())).collect();
        report
    }

    #[test]
    fn operations_side_by_side_with_ratios() {
        let text = compare(
            &report(1000.0, 400, &["authorize", "ping"]),
            &report(1500.0, 200, &["authorize"]),
        );
        let row = |name: &str, label: &str| -> Vec<String> {
            let line = text
                .lines()
                .find(|l| l.starts_with(&format!("{name:<18} {label:<10} ")))
                .unwrap_or_else(|| panic!("{name} {label} in {text}"));
            line[29..].split_whitespace().map(str::to_owned).collect()
        };
        assert_eq!(row("authorize", "per s"), ["1,000", "1,500", "1.50"]);
        assert_eq!(row("authorize", "p99 us"), ["400", "200", "0.50"]);
        assert_eq!(row("authorize", "p99.99 us"), ["950", "950", "1.00"]);
        assert_eq!(row("ping", "p50 us"), ["100", "-", "-"], "only in A");
        assert_eq!(row("all", "per s"), ["1,000", "1,500", "1.50"]);
        assert!(text.starts_with("A: mix on embedded, closed loop, 4 connections x 16"), "{text}");
    }

    #[test]
    fn unreadable_reports_are_errors() {
        let dir = std::env::temp_dir().join(format!("loadgen-compare-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (good, bad, other) = (dir.join("a.json"), dir.join("b.json"), dir.join("c.json"));
        std::fs::write(&good, report(1.0, 1, &["ping"]).to_string()).unwrap();
        std::fs::write(&bad, "{ not json").unwrap();
        std::fs::write(&other, "{\"a\": 1}").unwrap();
        let args = |a: &Path, b: &Path| CompareArgs { a: a.to_owned(), b: b.to_owned() };
        assert!(run(&args(&good, &good)).is_ok());
        let error = format!("{:#}", run(&args(&good, &bad)).unwrap_err());
        assert!(error.contains("is not JSON"), "{error}");
        let error = format!("{:#}", run(&args(&dir.join("missing.json"), &good)).unwrap_err());
        assert!(error.contains("reading"), "{error}");
        let error = format!("{:#}", run(&args(&good, &other)).unwrap_err());
        assert!(error.contains("not a loadgen JSON report"), "{error}");
        std::fs::remove_dir_all(&dir).ok();
    }
}
