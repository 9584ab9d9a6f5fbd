//! The summary of a run: per operation and overall, throughput, corrected and uncorrected
//! latency percentiles, declines and errors by reason; printed as a table and written as JSON.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use hdrhistogram::Histogram;
use serde_json::{json, Value};
use settlegate_engine::ReasonCode;

use crate::host::{HostLoad, STEAL_NOTICE_PERCENT};
use crate::slo::{Metric, Verdict};
use crate::tally::{OpTally, Tally};

/// Latency percentiles, in µs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[allow(missing_docs)]
pub struct Percentiles {
    pub p50: u64,
    pub p90: u64,
    pub p99: u64,
    pub p999: u64,
    pub p9999: u64,
    pub max: u64,
}

impl Percentiles {
    fn of(h: &Histogram<u64>) -> Percentiles {
        Percentiles {
            p50: h.value_at_quantile(0.50),
            p90: h.value_at_quantile(0.90),
            p99: h.value_at_quantile(0.99),
            p999: h.value_at_quantile(0.999),
            p9999: h.value_at_quantile(0.9999),
            max: h.max(),
        }
    }

    /// The value of `metric`.
    pub fn get(&self, metric: Metric) -> u64 {
        match metric {
            Metric::P50 => self.p50,
            Metric::P90 => self.p90,
            Metric::P99 => self.p99,
            Metric::P999 => self.p999,
            Metric::P9999 => self.p9999,
            Metric::Max => self.max,
        }
    }

    fn json(&self) -> Value {
        json!({
            "p50": self.p50,
            "p90": self.p90,
            "p99": self.p99,
            "p999": self.p999,
            "p9999": self.p9999,
            "max": self.max,
        })
    }
}

/// What one operation (or all together) came to.
#[derive(Debug, Clone, Default)]
pub struct Stats {
    /// Answered requests in the measured window (declines included, errors not).
    pub requests: u64,
    /// `requests` per second of the measured window.
    pub throughput_per_s: f64,
    /// From when each request was due: the headline.
    pub latency: Percentiles,
    /// From when each request was sent.
    pub latency_uncorrected: Percentiles,
    /// Declines by reason.
    pub declines: BTreeMap<String, u64>,
    /// Errors by kind.
    pub errors: BTreeMap<String, u64>,
    /// The corrected percentile curve: (quantile, µs) points, for the plot.
    pub curve: Vec<(f64, u64)>,
}

impl Stats {
    fn of(tally: &OpTally, duration_s: f64) -> Stats {
        let requests = tally.corrected_us.len();
        let declines = tally
            .declines
            .iter()
            .map(|(code, n)| {
                let name = ReasonCode::from_code(*code)
                    .map_or_else(|| format!("reason {code}"), |r| r.to_string());
                (name, *n)
            })
            .collect();
        Stats {
            requests,
            throughput_per_s: requests as f64 / duration_s,
            latency: Percentiles::of(&tally.corrected_us),
            latency_uncorrected: Percentiles::of(&tally.uncorrected_us),
            declines,
            errors: tally.errors.clone(),
            curve: curve(&tally.corrected_us),
        }
    }

    /// Errors of every kind.
    pub fn error_count(&self) -> u64 {
        self.errors.values().sum()
    }

    /// Declines of every reason.
    pub fn decline_count(&self) -> u64 {
        self.declines.values().sum()
    }

    fn json(&self) -> Value {
        json!({
            "throughput_per_s": self.throughput_per_s,
            "requests": self.requests,
            "latency_us": self.latency.json(),
            "latency_us_uncorrected": self.latency_uncorrected.json(),
            "errors": self.error_count(),
            "errors_by_reason": self.errors,
            "declines": self.decline_count(),
            "declines_by_reason": self.declines,
        })
    }
}

/// The points of a percentile plot, as HdrHistogram's `outputPercentileDistribution` gives
/// them: denser towards the tail.
fn curve(h: &Histogram<u64>) -> Vec<(f64, u64)> {
    if h.is_empty() {
        return Vec::new();
    }
    let mut points: Vec<(f64, u64)> =
        h.iter_quantiles(5).map(|v| (v.quantile_iterated_to(), v.value_iterated_to())).collect();
    points.insert(0, (0.0, h.min()));
    points
}

/// How the run was set up, as reports state it.
#[derive(Debug, Clone, Default)]
pub struct Settings {
    /// What was loaded: `embedded`, a server address, or `redis ADDR`.
    pub target: String,
    /// The mix, as given.
    pub mix: String,
    /// Open loop at this rate; closed loop when `None`.
    pub rate_per_s: Option<f64>,
    /// How the open loop waited for due times.
    pub pacing: crate::driver::Pacing,
    /// The closed loop's kind; `None` for an open loop.
    pub closed_loop: Option<crate::driver::ClosedLoop>,
    #[allow(missing_docs)]
    pub connections: usize,
    #[allow(missing_docs)]
    pub pipeline: usize,
    #[allow(missing_docs)]
    pub warmup_s: f64,
    #[allow(missing_docs)]
    pub duration_s: f64,
    /// Users in the dataset (0 for Redis).
    pub users: usize,
    #[allow(missing_docs)]
    pub seed: u64,
}

/// Everything a run measured.
#[derive(Debug, Clone, Default)]
pub struct Summary {
    /// All operations together.
    pub overall: Stats,
    /// By operation name, in the mix's order.
    pub operations: Vec<(String, Stats)>,
    /// Open loop: requests due in the window that were never sent.
    pub unsent: u64,
    /// How the run was set up.
    pub settings: Settings,
    /// The machine's load over the measured window, where it could be read.
    pub host: Option<HostLoad>,
}

impl Summary {
    /// Summarizes `tally`, whose operations are called `names`.
    pub fn new(names: &[&str], tally: &Tally, settings: Settings) -> Summary {
        let duration_s = settings.duration_s;
        Summary {
            overall: Stats::of(&tally.overall(), duration_s),
            operations: names
                .iter()
                .zip(&tally.ops)
                .map(|(name, op)| (name.to_string(), Stats::of(op, duration_s)))
                .collect(),
            unsent: tally.unsent,
            settings,
            host: None,
        }
    }

    /// One operation's stats.
    pub fn operation(&self, name: &str) -> Option<&Stats> {
        self.operations.iter().find(|(n, _)| n == name).map(|(_, s)| s)
    }

    /// The run's label: the operation when there is one, else `mix`.
    pub fn label(&self) -> &str {
        match self.operations.as_slice() {
            [(name, _)] => name,
            _ => "mix",
        }
    }

    /// The report as JSON: the overall figures at the top level (as `scripts/bench.sh`
    /// reads them), each operation's under `operations`, the SLO verdicts under `slo`.
    pub fn json(&self, verdicts: &[Verdict]) -> Value {
        let s = &self.settings;
        let mut report = self.overall.json();
        let operations: serde_json::Map<String, Value> =
            self.operations.iter().map(|(name, stats)| (name.clone(), stats.json())).collect();
        let slo: Vec<Value> = verdicts
            .iter()
            .map(|v| {
                json!({
                    "slo": v.slo.to_string(),
                    "operation": v.slo.operation,
                    "metric": v.slo.metric.name(),
                    "limit_us": v.slo.limit_us,
                    "actual_us": v.actual_us,
                    "met": v.met(),
                })
            })
            .collect();
        let extra = json!({
            "operation": self.label(),
            "mode": if s.rate_per_s.is_some() { "open_loop" } else { "closed_loop" },
            "rate_per_s": s.rate_per_s,
            "unsent": self.unsent,
            "host": self.host.map(|h| json!({
                "cpus": h.cpus,
                "busy_percent": h.busy_percent,
                "steal_percent": h.steal_percent,
            })),
            "operations": operations,
            "slo": slo,
            "settings": {
                "target": s.target,
                "mix": s.mix,
                "pacing": if s.rate_per_s.is_some() { Some(s.pacing.label()) } else { None },
                "closed_loop": s.closed_loop.map(|c| c.label()),
                "connections": s.connections,
                "pipeline": s.pipeline,
                "duration_s": s.duration_s,
                "warmup_s": s.warmup_s,
                "users": s.users,
                "seed": s.seed,
            },
        });
        let object = report.as_object_mut().expect("stats are an object");
        for (key, value) in extra.as_object().expect("an object") {
            object.insert(key.clone(), value.clone());
        }
        report
    }

    /// The report as the text `loadgen` prints.
    pub fn text(&self) -> String {
        let s = &self.settings;
        let mut out = String::new();
        let mode = match s.rate_per_s {
            Some(rate) => format!(
                "open loop at {}/s ({} pacing)",
                thousands(rate.round() as u64),
                s.pacing.label()
            ),
            None => match s.closed_loop {
                Some(kind) => format!("closed loop ({})", kind.label()),
                None => "closed loop".to_owned(),
            },
        };
        let _ = writeln!(
            out,
            "{} on {}: {mode}, {} connections x {} in flight, {:.1} s warm-up, {:.1} s measured",
            self.label(),
            s.target,
            s.connections,
            s.pipeline,
            s.warmup_s,
            s.duration_s
        );
        let basis = if s.rate_per_s.is_some() {
            "from when each request was due (corrected for coordinated omission)"
        } else {
            "from each request's send (closed loop)"
        };
        let _ = writeln!(out, "latency in us {basis}:");
        self.table(&mut out);
        if s.rate_per_s.is_some() {
            let l = &self.overall.latency_uncorrected;
            let _ = writeln!(
                out,
                "uncorrected (from actual send), all: p50 {} p90 {} p99 {} p99.9 {} p99.99 {} max {}",
                l.p50, l.p90, l.p99, l.p999, l.p9999, l.max
            );
            if self.unsent > 0 {
                let _ = writeln!(
                    out,
                    "behind schedule: {} requests due in the window were never sent",
                    thousands(self.unsent)
                );
            }
        }
        if let Some(host) = &self.host {
            let _ = writeln!(
                out,
                "machine over the measured window: {} CPUs, {:.0}% busy, {:.0}% taken by the \
                 hypervisor (steal)",
                host.cpus, host.busy_percent, host.steal_percent
            );
            if host.noisy() {
                let _ = writeln!(
                    out,
                    "warning: with steal at {:.0}% (at least {:.0}%), these figures measure the \
                     host as much as the target",
                    host.steal_percent, STEAL_NOTICE_PERCENT
                );
            }
        }
        for (name, stats) in &self.operations {
            for (reason, n) in &stats.declines {
                let _ = writeln!(out, "declined {name}: {reason} x {n}");
            }
            for (kind, n) in &stats.errors {
                let _ = writeln!(out, "error {name}: {kind} x {n}");
            }
        }
        out
    }

    /// The table: a row per operation, and one for all of them when there are several.
    fn table(&self, out: &mut String) {
        let _ = writeln!(
            out,
            "{:<18} {:>11} {:>10} {:>8} {:>8} {:>8} {:>8} {:>8} {:>9} {:>9} {:>8}",
            "operation",
            "requests",
            "per s",
            "p50",
            "p90",
            "p99",
            "p99.9",
            "p99.99",
            "max",
            "declines",
            "errors"
        );
        let rows = self.operations.iter().map(|(n, st)| (n.as_str(), st));
        let overall = (self.operations.len() > 1).then_some(("all", &self.overall));
        for (name, stats) in rows.chain(overall) {
            let l = &stats.latency;
            let _ = writeln!(
                out,
                "{name:<18} {:>11} {:>10} {:>8} {:>8} {:>8} {:>8} {:>8} {:>9} {:>9} {:>8}",
                thousands(stats.requests),
                thousands(stats.throughput_per_s.round() as u64),
                l.p50,
                l.p90,
                l.p99,
                l.p999,
                l.p9999,
                l.max,
                stats.decline_count(),
                stats.error_count()
            );
        }
    }
}

/// `1234567` as `1,234,567`.
pub fn thousands(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tally::Outcome;

    fn summary() -> Summary {
        let mut tally = Tally::new(2);
        for micros in 1..=1_000 {
            tally.record(0, micros * 2, micros, &Outcome::Ok);
        }
        tally.record(0, 50, 50, &Outcome::Declined(8));
        tally.record(1, 10, 10, &Outcome::Ok);
        tally.record(1, 10, 10, &Outcome::Error("busy".into()));
        let settings = Settings {
            target: "embedded".into(),
            rate_per_s: Some(1_000.0),
            duration_s: 2.0,
            ..Settings::default()
        };
        Summary::new(&["authorize", "ping"], &tally, settings)
    }

    #[test]
    fn json_report_has_the_documented_shape() {
        let slo: crate::slo::Slo = "authorize:p99=1ms".parse().unwrap();
        let summary = summary();
        let verdicts = crate::slo::check(&[slo], &summary);
        let report = summary.json(&verdicts);
        // The fields scripts/bench.sh reads, at the top level.
        assert_eq!(report["throughput_per_s"], 1_002.0 / 2.0);
        assert_eq!(report["requests"], 1_002);
        for key in ["p50", "p90", "p99", "p999", "p9999", "max"] {
            assert!(report["latency_us"][key].is_u64(), "latency_us.{key}");
            assert!(report["latency_us_uncorrected"][key].is_u64(), "uncorrected {key}");
        }
        assert_eq!(report["errors"], 1);
        assert_eq!(report["errors_by_reason"], json!({"busy": 1}));
        assert_eq!(report["declines_by_reason"], json!({"ReplayedNonce(8)": 1}));
        assert_eq!(
            (report["mode"].as_str(), report["operation"].as_str()),
            (Some("open_loop"), Some("mix"))
        );
        // The same per operation.
        let authorize = &report["operations"]["authorize"];
        assert_eq!(authorize["requests"], 1_001);
        assert_eq!(authorize["errors"], 0);
        assert!(authorize["latency_us"]["p99"].as_u64().unwrap() >= 1_970);
        assert!(authorize["latency_us_uncorrected"]["p99"].as_u64().unwrap() <= 1_000);
        assert_eq!(report["operations"]["ping"]["errors"], 1);
        assert_eq!(report["slo"][0]["met"], false);
        assert_eq!(report["slo"][0]["metric"], "p99");
        assert_eq!(report["settings"]["target"], "embedded");
    }

    #[test]
    fn text_report_has_a_row_per_operation_and_overall() {
        let text = summary().text();
        assert!(text.contains("open loop at 1,000/s"), "{text}");
        for row in ["authorize ", "ping ", "all ", "uncorrected", "error ping: busy x 1"] {
            assert!(text.contains(row), "{row} in {text}");
        }
        assert_eq!(thousands(1_234_567), "1,234,567");
        assert_eq!(thousands(12), "12");
    }

    #[test]
    fn the_machines_load_is_reported_and_heavy_steal_is_called_out() {
        let mut summary = summary();
        assert_eq!(summary.json(&[])["host"], Value::Null, "not read: null");
        assert!(!summary.text().contains("machine over"));
        summary.host = Some(HostLoad { cpus: 2, busy_percent: 61.0, steal_percent: 2.0 });
        let text = summary.text();
        assert!(text.contains("2 CPUs, 61% busy, 2% taken by the hypervisor"), "{text}");
        assert!(!text.contains("warning"), "{text}");
        summary.host = Some(HostLoad { cpus: 2, busy_percent: 55.0, steal_percent: 38.0 });
        assert!(summary.text().contains("warning: with steal at 38%"));
        let report = summary.json(&[]);
        assert_eq!(report["host"]["steal_percent"], 38.0);
        assert_eq!(report["host"]["busy_percent"], 55.0);
        assert_eq!(report["host"]["cpus"], 2);
    }
}
