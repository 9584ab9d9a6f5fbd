//! Histograms as text in the `.hgrm` format: the percentile distribution that HdrHistogram's
//! `outputPercentileDistribution` prints (and wrk2 and the HdrHistogram plotter read), so that
//! runs can be compared with the usual tools.
//!
//! ```text
//!        Value     Percentile TotalCount 1/(1-Percentile)
//!
//!        0.071 0.000000000000          1           1.00
//!        ...
//!        1.409 1.000000000000       3000
//! #[Mean    =        0.200, StdDeviation   =        0.052]
//! #[Max     =        1.409, Total count    =         3000]
//! #[Buckets =           20, SubBuckets     =         2048]
//! ```

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use hdrhistogram::Histogram;

use crate::report::Summary;

/// The files `--hgrm PATH` writes, with their text: per operation (and all together when the
/// mix has several) `STEM.OPERATION.hgrm`, corrected, and in the open loop also
/// `STEM.OPERATION.uncorrected.hgrm`, where `STEM` is `PATH` without its `.hgrm`.
pub fn files(path: &Path, summary: &Summary) -> Vec<(PathBuf, String)> {
    let stem = match path.extension() {
        Some(ext) if ext.eq_ignore_ascii_case("hgrm") => path.with_extension(""),
        _ => path.to_owned(),
    };
    let named = |suffix: String| {
        let mut name = stem.clone().into_os_string();
        name.push(suffix);
        PathBuf::from(name)
    };
    let overall = (summary.operations.len() > 1).then_some(("all", &summary.overall));
    let rows = summary.operations.iter().map(|(name, stats)| (name.as_str(), stats));
    let mut out = Vec::new();
    for (name, stats) in rows.chain(overall) {
        let Some([corrected, uncorrected]) = stats.histograms.as_deref() else { continue };
        out.push((named(format!(".{name}.hgrm")), percentile_distribution(corrected)));
        if summary.settings.rate_per_s.is_some() {
            let text = percentile_distribution(uncorrected);
            out.push((named(format!(".{name}.uncorrected.hgrm")), text));
        }
    }
    out
}

/// Percentile steps per half-distance to 100%, as HdrHistogram's tools use by default.
pub const TICKS_PER_HALF_DISTANCE: u32 = 5;
/// Values are written in milliseconds: the histograms hold microseconds.
pub const US_PER_UNIT: f64 = 1_000.0;

/// `h` (in µs) as an `.hgrm` percentile distribution, values in milliseconds.
pub fn percentile_distribution(h: &Histogram<u64>) -> String {
    let digits = usize::from(h.sigfig());
    let mut out = String::new();
    let _ = write!(
        out,
        "{:>12} {:>14} {:>10} {:>14}\n\n",
        "Value", "Percentile", "TotalCount", "1/(1-Percentile)"
    );
    let mut total = 0u64;
    if !h.is_empty() {
        for v in h.iter_quantiles(TICKS_PER_HALF_DISTANCE) {
            total += v.count_since_last_iteration();
            let value = v.value_iterated_to() as f64 / US_PER_UNIT;
            let q = v.quantile_iterated_to();
            if q < 1.0 {
                let _ = writeln!(
                    out,
                    "{value:12.digits$} {q:2.12} {total:10} {:14.2}",
                    1.0 / (1.0 - q)
                );
            } else {
                let _ = writeln!(out, "{value:12.digits$} {q:2.12} {total:10}");
            }
        }
    }
    let sub_buckets = (2.0 * 10f64.powi(i32::from(h.sigfig()))).log2().ceil().exp2() as u64;
    let (mean, stdev) = if h.is_empty() { (0.0, 0.0) } else { (h.mean(), h.stdev()) };
    let _ = writeln!(
        out,
        "#[Mean    = {:12.digits$}, StdDeviation   = {:12.digits$}]",
        mean / US_PER_UNIT,
        stdev / US_PER_UNIT
    );
    let _ = writeln!(
        out,
        "#[Max     = {:12.digits$}, Total count    = {:12}]",
        h.max() as f64 / US_PER_UNIT,
        h.len()
    );
    let _ = writeln!(out, "#[Buckets = {:12}, SubBuckets     = {:12}]", h.buckets(), sub_buckets);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_distribution_is_written_as_hdrhistogram_writes_it() {
        let mut h = Histogram::<u64>::new(3).unwrap();
        for micros in 1..=1_000 {
            h.record(micros).unwrap();
        }
        let text = percentile_distribution(&h);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[0], "       Value     Percentile TotalCount 1/(1-Percentile)");
        assert_eq!(lines[1], "");
        assert_eq!(lines[2], "       0.001 0.000000000000          1           1.00");
        // The median, then finer steps towards the tail.
        assert!(lines.contains(&"       0.500 0.500000000000        500           2.00"), "{text}");
        assert!(lines.contains(&"       0.901 0.900000000000        901          10.00"), "{text}");
        // The last row: 100%, no 1/(1-Percentile).
        let last = lines.iter().rposition(|l| !l.starts_with('#')).unwrap();
        assert_eq!(lines[last], "       1.000 1.000000000000       1000");
        assert_eq!(lines[last + 1], "#[Mean    =        0.500, StdDeviation   =        0.289]");
        assert_eq!(lines[last + 2], "#[Max     =        1.000, Total count    =         1000]");
        assert!(lines[last + 3].starts_with("#[Buckets = "), "{text}");
        assert!(lines[last + 3].ends_with("SubBuckets     =         2048]"), "{text}");
        assert_eq!(lines.len(), last + 4);
        // Every data row: value, percentile, cumulative count (and 1/(1-q)), rising.
        let mut previous = (0.0, 0.0, 0u64);
        for line in &lines[2..=last] {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let row = (
                fields[0].parse().unwrap(),
                fields[1].parse().unwrap(),
                fields[2].parse().unwrap(),
            );
            assert!(row.0 >= previous.0 && row.1 >= previous.1 && row.2 >= previous.2, "{line}");
            previous = row;
        }
    }

    #[test]
    fn a_file_per_operation_and_loop() {
        use crate::report::Settings;
        use crate::tally::{Outcome, Tally};
        let mut tally = Tally::new(2);
        tally.record(0, 0, 2_000, 1_000, &Outcome::Ok);
        tally.record(1, 0, 30, 30, &Outcome::Ok);
        let settings = Settings { rate_per_s: Some(10.0), duration_s: 1.0, ..Settings::default() };
        let summary = Summary::new(&["authorize", "ping"], &tally, settings);
        let written = files(Path::new("out/run.hgrm"), &summary);
        let names: Vec<String> = written.iter().map(|(p, _)| p.display().to_string()).collect();
        assert_eq!(
            names,
            [
                "out/run.authorize.hgrm",
                "out/run.authorize.uncorrected.hgrm",
                "out/run.ping.hgrm",
                "out/run.ping.uncorrected.hgrm",
                "out/run.all.hgrm",
                "out/run.all.uncorrected.hgrm"
            ]
        );
        assert!(written[0].1.contains("#[Max     =        2.000"), "{}", written[0].1);
        assert!(written[1].1.contains("#[Max     =        1.000"), "{}", written[1].1);
        // A closed loop has one latency: the corrected files only; any name takes the suffixes.
        let mut closed = summary;
        closed.settings.rate_per_s = None;
        closed.operations.truncate(1);
        let names: Vec<PathBuf> =
            files(Path::new("run"), &closed).into_iter().map(|(p, _)| p).collect();
        assert_eq!(names, [PathBuf::from("run.authorize.hgrm")]);
    }

    #[test]
    fn an_empty_histogram_is_a_header_and_a_footer() {
        let text = percentile_distribution(&Histogram::<u64>::new(3).unwrap());
        assert_eq!(text.lines().count(), 5, "{text}");
        assert!(text.contains("Total count    =            0]"), "{text}");
    }
}
