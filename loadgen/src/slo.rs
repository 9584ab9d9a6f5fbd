//! Service-level objectives: `--slo p99=1ms`, `--slo authorize:p999=5ms,max=50ms`.
//!
//! Each names a latency percentile (`p50`, `p90`, `p99`, `p999`, `p9999`, `max`), optionally
//! of one operation (overall otherwise), and its limit with a unit (`us`, `ms`, `s`). In one
//! `--slo` value, an objective without an operation after one with `OPERATION:` applies to
//! that operation too (`authorize:p999=5ms,max=50ms`: both authorize's); `all:` names all
//! operations together again ([`Slos`]). They are checked
//! against the headline (coordinated-omission corrected) latencies; a missed one makes
//! `loadgen` exit non-zero.

use std::fmt;

use crate::report::{Stats, Summary};
use crate::units::parse_duration_with;

/// Which latency an objective bounds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Metric {
    /// Median.
    P50,
    /// 90th percentile.
    P90,
    /// 99th percentile.
    P99,
    /// 99.9th percentile.
    P999,
    /// 99.99th percentile.
    P9999,
    /// Largest.
    Max,
}

impl Metric {
    const NAMES: [(&'static str, Metric); 6] = [
        ("p50", Metric::P50),
        ("p90", Metric::P90),
        ("p99", Metric::P99),
        ("p999", Metric::P999),
        ("p9999", Metric::P9999),
        ("max", Metric::Max),
    ];

    /// The name used on the command line and in reports.
    pub fn name(self) -> &'static str {
        Metric::NAMES.iter().find(|(_, m)| *m == self).expect("every metric is named").0
    }
}

/// One objective.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Slo {
    /// The operation it applies to; `None` for all operations together.
    pub operation: Option<String>,
    /// The bounded latency.
    pub metric: Metric,
    /// The limit, inclusive, in microseconds.
    pub limit_us: u64,
}

impl fmt::Display for Slo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(operation) = &self.operation {
            write!(f, "{operation}:")?;
        }
        write!(f, "{}<={}us", self.metric.name(), self.limit_us)
    }
}

impl std::str::FromStr for Slo {
    type Err = String;

    fn from_str(text: &str) -> Result<Slo, String> {
        let usage = "expected [OPERATION:]METRIC=LIMIT, e.g. p99=1ms or authorize:p999=5ms";
        // `all:` is all operations together, as no operation is.
        let (left, limit) =
            text.split_once('=').ok_or_else(|| format!("bad SLO `{text}`: {usage}"))?;
        let (operation, metric) = match left.split_once(':') {
            Some((operation, metric)) if operation.trim() == ALL => (None, metric.trim()),
            Some((operation, metric)) if !operation.trim().is_empty() => {
                (Some(operation.trim().to_owned()), metric.trim())
            }
            Some(_) => return Err(format!("bad SLO `{text}`: empty operation; {usage}")),
            None => (None, left.trim()),
        };
        let metric =
            Metric::NAMES.iter().find(|(name, _)| *name == metric).map(|(_, m)| *m).ok_or_else(
                || {
                    let names: Vec<&str> = Metric::NAMES.iter().map(|(name, _)| *name).collect();
                    format!("bad SLO `{text}`: unknown metric `{metric}` ({})", names.join(", "))
                },
            )?;
        let limit =
            parse_duration_with(limit, None).map_err(|e| format!("bad SLO `{text}`: {e}"))?;
        let limit_us = u64::try_from(limit.as_micros()).unwrap_or(u64::MAX);
        if limit_us == 0 {
            return Err(format!("bad SLO `{text}`: the limit must be at least 1us"));
        }
        Ok(Slo { operation, metric, limit_us })
    }
}

/// The operation prefix naming all operations together: `all:p99=1ms`.
const ALL: &str = "all";

/// The objectives of one `--slo` value, separated by commas. An objective without an
/// operation takes the one named last before it in the same value, so that
/// `authorize:p99=1ms,max=50ms` bounds authorize's max too (not every operation's); `all:`
/// (or a value without any `OPERATION:`) bounds all operations together.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Slos(pub Vec<Slo>);

impl std::str::FromStr for Slos {
    type Err = String;

    fn from_str(text: &str) -> Result<Slos, String> {
        let mut operation: Option<String> = None;
        let mut slos = Vec::new();
        for part in text.split(',') {
            let mut slo: Slo = part.parse()?;
            if part.contains(':') {
                operation.clone_from(&slo.operation);
            } else {
                slo.operation.clone_from(&operation);
            }
            slos.push(slo);
        }
        Ok(Slos(slos))
    }
}

/// An objective with what was measured.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    /// The objective.
    pub slo: Slo,
    /// The measured latency; `None` when nothing was measured for it.
    pub actual_us: Option<u64>,
}

impl Verdict {
    /// Whether the objective held.
    pub fn met(&self) -> bool {
        self.actual_us.is_some_and(|actual| actual <= self.slo.limit_us)
    }
}

/// Checks every objective against the corrected latencies of `summary`.
pub fn check(slos: &[Slo], summary: &Summary) -> Vec<Verdict> {
    slos.iter()
        .map(|slo| {
            let stats: Option<&Stats> = match &slo.operation {
                None => Some(&summary.overall),
                Some(name) => summary.operation(name),
            };
            let actual_us = stats.filter(|s| s.requests > 0).map(|s| s.latency.get(slo.metric));
            Verdict { slo: slo.clone(), actual_us }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::Percentiles;

    fn parse(text: &str) -> Result<Slo, String> {
        text.parse()
    }

    #[test]
    fn slos_parse_with_units_and_operations() {
        let slo = parse("p99=1ms").unwrap();
        assert_eq!(slo, Slo { operation: None, metric: Metric::P99, limit_us: 1_000 });
        let slo = parse("authorize:p999=2.5ms").unwrap();
        assert_eq!(slo.operation.as_deref(), Some("authorize"));
        assert_eq!((slo.metric, slo.limit_us), (Metric::P999, 2_500));
        assert_eq!(parse("max=1s").unwrap().limit_us, 1_000_000);
        assert_eq!(parse("p50=750us").unwrap().limit_us, 750);
        assert_eq!(parse("p90 = 3ms").unwrap().metric, Metric::P90);
        assert_eq!(parse("authorize:p99=1ms").unwrap().to_string(), "authorize:p99<=1000us");
        assert_eq!(parse("p9999=3ms").unwrap().metric, Metric::P9999);
        assert_eq!(parse("all:p99=1ms").unwrap().operation, None);
    }

    #[test]
    fn a_bare_objective_after_an_operation_applies_to_that_operation() {
        let list = |text: &str| -> Vec<String> {
            let slos: Slos = text.parse().unwrap();
            slos.0.iter().map(Slo::to_string).collect()
        };
        assert_eq!(
            list("authorize:p99=1ms,max=50ms"),
            ["authorize:p99<=1000us", "authorize:max<=50000us"]
        );
        assert_eq!(list("p99=1ms,max=20ms"), ["p99<=1000us", "max<=20000us"]);
        assert_eq!(
            list("p50=1ms,ping:p99=2ms,max=3ms,all:max=4ms,p90=5ms"),
            ["p50<=1000us", "ping:p99<=2000us", "ping:max<=3000us", "max<=4000us", "p90<=5000us"]
        );
        let error = "authorize:p99=1ms,p98=2ms".parse::<Slos>().unwrap_err();
        assert!(error.contains("unknown metric `p98`"), "{error}");
    }

    #[test]
    fn malformed_slos_are_clear_errors() {
        for (text, says) in [
            ("p99", "expected [OPERATION:]METRIC=LIMIT"),
            ("p98=1ms", "unknown metric `p98`"),
            ("p99=1", "needs a unit"),
            ("p99=1h", "unknown unit `h`"),
            ("p99=fast", "not a number"),
            (":p99=1ms", "empty operation"),
            ("p99=0ms", "at least 1us"),
        ] {
            let error = parse(text).unwrap_err();
            assert!(error.contains(says), "{text}: {error}");
        }
    }

    #[test]
    fn slos_are_checked_against_the_summary() {
        let stats = |p99| Stats {
            requests: 100,
            latency: Percentiles { p50: 100, p90: 200, p99, p999: 2_000, p9999: 3_000, max: 9_000 },
            ..Stats::default()
        };
        let summary = Summary {
            overall: stats(1_500),
            operations: vec![("authorize".into(), stats(900)), ("ping".into(), Stats::default())],
            ..Summary::default()
        };
        let slos: Vec<Slo> = ["p99=1ms", "authorize:p99=1ms", "max=9ms", "ping:p50=1ms"]
            .iter()
            .map(|text| parse(text).unwrap())
            .collect();
        let verdicts = check(&slos, &summary);
        let met: Vec<bool> = verdicts.iter().map(Verdict::met).collect();
        assert_eq!(met, [false, true, true, false], "{verdicts:?}");
        assert_eq!(verdicts[0].actual_us, Some(1_500));
        assert_eq!(verdicts[3].actual_us, None, "nothing measured is a miss, not a pass");
    }
}
