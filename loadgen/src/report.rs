//! The summary of a run: per operation and overall, throughput, corrected and uncorrected
//! latency percentiles, declines and errors by reason; printed as a table and written as JSON.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use hdrhistogram::Histogram;
use serde_json::{json, Value};
use settlegate_engine::ReasonCode;

use crate::host::{HostLoad, STEAL_NOTICE_PERCENT};
use crate::slo::{Metric, Verdict};
use crate::tally::{OpTally, Second, Tally};

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
    /// The same from each request's send.
    pub curve_uncorrected: Vec<(f64, u64)>,
    /// Mean latency from each request's send, in µs.
    pub mean_us_uncorrected: f64,
    /// Second by second over the measured window.
    pub series: Vec<SecondStats>,
    /// The histograms, corrected and uncorrected, for `--hgrm` (none in summaries made up
    /// by tests).
    pub histograms: Option<Box<[Histogram<u64>; 2]>>,
}

/// One second of a run, of one operation or all.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct SecondStats {
    /// When the second starts, from the start of the measured window.
    pub t_s: f64,
    /// Answered requests (declines included, errors not).
    pub requests: u64,
    /// `requests` per second of it (the last second may be cut short by `--duration`).
    pub throughput_per_s: f64,
    /// Errors.
    pub errors: u64,
    /// Corrected latency percentiles of the requests answered in it, in µs (0 without any).
    pub p50_us: u64,
    #[allow(missing_docs)]
    pub p99_us: u64,
}

impl SecondStats {
    fn json(&self) -> Value {
        json!({
            "t_s": self.t_s,
            "requests": self.requests,
            "throughput_per_s": self.throughput_per_s,
            "errors": self.errors,
            "p50_us": self.p50_us,
            "p99_us": self.p99_us,
        })
    }
}

/// The seconds of `seconds` in a window of `duration_s`: answers that came after its end (the
/// last requests of a run) count in its last second.
fn series(seconds: &[Second], duration_s: f64) -> Vec<SecondStats> {
    let count = (duration_s.ceil() as usize).max(1);
    let mut merged: Vec<Second> = seconds.iter().take(count).cloned().collect();
    for late in seconds.iter().skip(count) {
        merged.last_mut().expect("late seconds follow others").add(late);
    }
    merged
        .iter()
        .enumerate()
        .map(|(i, second)| {
            let h = &second.latency_us;
            let length_s = (duration_s - i as f64).clamp(1e-3, 1.0);
            let quantile = |q| if h.is_empty() { 0 } else { h.value_at_quantile(q) };
            SecondStats {
                t_s: i as f64,
                requests: h.len(),
                throughput_per_s: h.len() as f64 / length_s,
                errors: second.errors,
                p50_us: quantile(0.5),
                p99_us: quantile(0.99),
            }
        })
        .collect()
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
            curve_uncorrected: curve(&tally.uncorrected_us),
            mean_us_uncorrected: tally.uncorrected_us.mean(),
            series: series(&tally.seconds, duration_s),
            histograms: Some(Box::new([tally.corrected_us.clone(), tally.uncorrected_us.clone()])),
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
            "series": self.series.iter().map(SecondStats::json).collect::<Vec<_>>(),
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

/// The share of the in-flight slots from which [`Summary::rate_warning`] warns.
const RATE_SLOTS_SHARE: f64 = 0.9;

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

    /// Open loop: a warning when the in-flight slots (`--connections` × `--pipeline`) could not
    /// carry `--rate` at the latency the run saw. By Little's law the rate needs
    /// `rate × mean latency` requests in flight; from 90% of the slots on, requests wait for
    /// a slot (and the corrected latency counts that wait), and beyond them the rate is
    /// out of reach.
    pub fn rate_warning(&self) -> Option<String> {
        let s = &self.settings;
        let rate = s.rate_per_s?;
        let latency_s = self.overall.mean_us_uncorrected / 1e6;
        if self.overall.requests == 0 || latency_s <= 0.0 {
            return None;
        }
        let slots = (s.connections * s.pipeline) as f64;
        let needed = rate * latency_s;
        if needed <= slots * RATE_SLOTS_SHARE {
            return None;
        }
        let capacity = slots / latency_s;
        let wanted = (needed / RATE_SLOTS_SHARE).ceil() as u64;
        Some(format!(
            "--rate {}/s needs about {:.0} requests in flight at the mean latency seen ({:.0}us), \
             near or beyond the {} slots of --connections {} x --pipeline {} (at most about {}/s \
             at that latency): raise --pipeline or --connections to at least {} slots in all, \
             or lower --rate",
            thousands(rate.round() as u64),
            needed,
            latency_s * 1e6,
            slots,
            s.connections,
            s.pipeline,
            thousands(capacity.round() as u64),
            thousands(wanted),
        ))
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
            "warnings": self.rate_warning().into_iter().collect::<Vec<_>>(),
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
        if let Some(warning) = self.rate_warning() {
            let _ = writeln!(out, "warning: {warning}");
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
            tally.record(0, 0, micros * 2, micros, &Outcome::Ok);
        }
        tally.record(0, 1, 50, 50, &Outcome::Declined(8));
        tally.record(1, 0, 10, 10, &Outcome::Ok);
        tally.record(1, 2, 10, 10, &Outcome::Error("busy".into()));
        let settings = Settings {
            target: "embedded".into(),
            rate_per_s: Some(1_000.0),
            duration_s: 1.5,
            connections: 2,
            pipeline: 1,
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
        assert_eq!(report["throughput_per_s"], 1_002.0 / 1.5);
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
        assert_eq!(report["latency_us"]["p9999"], report["latency_us"]["max"]);
    }

    #[test]
    fn series_go_second_by_second_the_late_answers_in_the_last() {
        let summary = summary();
        let report = summary.json(&[]);
        // 1.5 s measured: two seconds, the second half a second long; the error of second 2
        // (an answer after the window) is counted in the last.
        let series = report["series"].as_array().unwrap();
        assert_eq!(series.len(), 2, "{series:?}");
        assert_eq!(series[0]["t_s"], 0.0);
        assert_eq!(series[0]["requests"], 1_001);
        assert_eq!(series[0]["throughput_per_s"], 1_001.0);
        assert_eq!(
            (series[1]["requests"].as_u64(), series[1]["errors"].as_u64()),
            (Some(1), Some(1))
        );
        assert_eq!(series[1]["throughput_per_s"], 2.0, "1 answer in half a second");
        let p50 = series[0]["p50_us"].as_u64().unwrap();
        assert!((990..=1_010).contains(&p50), "the corrected median, 1% resolution: {p50}");
        assert!(series[0]["p99_us"].as_u64().unwrap() >= 1_960);
        let ping = report["operations"]["ping"]["series"].as_array().unwrap();
        assert_eq!((ping[0]["requests"].as_u64(), ping[1]["errors"].as_u64()), (Some(1), Some(1)));
        assert_eq!(report["operations"]["authorize"]["series"][1]["p50_us"], 50);
    }

    #[test]
    fn a_rate_the_slots_cannot_carry_is_warned_of() {
        // 2 slots, a mean latency (from the send) of about 0.5 ms: 2 slots carry about 4,000/s.
        let mut summary = summary();
        assert_eq!(summary.rate_warning(), None, "1,000/s needs 0.5 in flight");
        assert_eq!(summary.json(&[])["warnings"], json!([]));
        summary.settings.rate_per_s = Some(10_000.0);
        let warning = summary.rate_warning().expect("10,000/s needs 5 in flight");
        for says in [
            "--rate 10,000/s",
            "about 5 requests in flight",
            "2 slots",
            "--connections 2 x --pipeline 1",
            "at least 6 slots",
        ] {
            assert!(warning.contains(says), "{says}: {warning}");
        }
        assert!(!warning.contains("  "), "one line: {warning}");
        assert!(summary.text().contains(&format!("warning: {warning}")));
        assert_eq!(summary.json(&[])["warnings"][0], warning.as_str());
        summary.settings.rate_per_s = None;
        assert_eq!(summary.rate_warning(), None, "a closed loop has no rate to reach");
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
