//! The report's plots and HTML page. The latency-percentile plot is drawn as HdrHistogram's
//! plotter draws it: percentile on a logarithmic x axis (0%, 90%, 99%, 99.9%, 99.99%,
//! 99.999%: the axis is `1 / (1 - q)`), and latency on a logarithmic y axis too (so that
//! sub-millisecond detail shows beside a slow tail), one line per operation: corrected, and in
//! the open loop also uncorrected (dashed); each SLO as a horizontal line at its limit, green
//! when met and red when missed, with a dot at its percentile. The HTML page adds the SLO
//! verdicts, the summary table, throughput and p50/p99 second by second, and the JSON report;
//! its script checks the page (each plot drawn, a row per operation) and marks `<body>` with
//! `data-check="ok"` (or what went wrong), which the browser test reads.

use anyhow::anyhow;
use plotters::coord::Shift;
use plotters::prelude::*;

use crate::report::{SecondStats, Summary};
use crate::slo::{Metric, Verdict};

/// Furthest percentile shown: 99.999% (`1 / (1 - q)` = 10⁵).
const X_MAX: f64 = 1e5;
const SIZE: (u32, u32) = (960, 540);
const SERIES_SIZE: (u32, u32) = (960, 360);

type Area<'a> = DrawingArea<SVGBackend<'a>, Shift>;

/// A line of a series plot: its name, palette index, whether dashed, and its points.
type Line = (String, usize, bool, Vec<(f64, f64)>);

/// Draws with `draw` on a white SVG of `size`; returns the document.
fn svg_of(
    size: (u32, u32),
    draw: impl FnOnce(&Area) -> anyhow::Result<()>,
) -> anyhow::Result<String> {
    let mut out = String::new();
    {
        let root = SVGBackend::with_string(&mut out, size).into_drawing_area();
        root.fill(&WHITE).map_err(plot_error)?;
        draw(&root)?;
        root.present().map_err(plot_error)?;
    }
    Ok(out)
}

/// `lo..hi` widened to whole powers of ten, for a logarithmic axis of latencies in ms.
fn decades(values: impl Iterator<Item = f64>) -> std::ops::Range<f64> {
    let (lo, hi) = values
        .filter(|v| *v > 0.0)
        .fold((f64::MAX, f64::MIN), |(lo, hi), v| (lo.min(v), hi.max(v)));
    if lo > hi {
        return 0.001..1.0;
    }
    let lo = 10f64.powf(lo.log10().floor());
    let hi = 10f64.powf(hi.log10().ceil()).max(lo * 10.0);
    lo..hi
}

/// A latency in ms as an axis label: `0.05`, `1`, `250`.
fn ms_label(ms: f64) -> String {
    if ms >= 1.0 {
        format!("{ms:.0}")
    } else {
        let text = format!("{ms:.3}");
        text.trim_end_matches('0').trim_end_matches('.').to_owned()
    }
}

/// The quantile a metric bounds.
fn quantile_of(metric: Metric) -> f64 {
    match metric {
        Metric::P50 => 0.5,
        Metric::P90 => 0.9,
        Metric::P99 => 0.99,
        Metric::P999 => 0.999,
        Metric::P9999 => 0.9999,
        Metric::Max => 1.0,
    }
}

/// Draws the legend of `chart`, at its upper left.
fn legend<'a, X: Ranged, Y: Ranged>(
    chart: &mut ChartContext<'a, SVGBackend<'a>, Cartesian2d<X, Y>>,
) -> anyhow::Result<()> {
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .map_err(plot_error)
}

/// The latency-percentile plot as an SVG document, with `verdicts`' limits.
pub fn svg(summary: &Summary, verdicts: &[Verdict]) -> anyhow::Result<String> {
    let open_loop = summary.settings.rate_per_s.is_some();
    let curves = summary.operations.iter().flat_map(|(_, stats)| {
        let uncorrected = if open_loop { &stats.curve_uncorrected[..] } else { &[] };
        stats.curve.iter().chain(uncorrected).map(|&(_, us)| us as f64 / 1e3)
    });
    let y_range = decades(curves.chain(verdicts.iter().map(|v| v.slo.limit_us as f64 / 1e3)));
    svg_of(SIZE, |root| {
        let title = format!("{} latency by percentile ({})", summary.label(), basis(summary));
        let mut chart = ChartBuilder::on(root)
            .caption(title, ("sans-serif", 20))
            .margin(16)
            .margin_right(40) // room for the last x label, 99.999%
            .x_label_area_size(40)
            .y_label_area_size(64)
            .build_cartesian_2d(
                (1.0..X_MAX).log_scale().with_key_points(vec![1.0, 10.0, 100.0, 1e3, 1e4, 1e5]),
                y_range.clone().log_scale(),
            )
            .map_err(plot_error)?;
        chart
            .configure_mesh()
            .x_desc("percentile")
            .y_desc("latency (ms, log)")
            .x_label_formatter(&|x| percentile_label(*x))
            .y_label_formatter(&|y| ms_label(*y))
            .draw()
            .map_err(plot_error)?;
        for (i, (name, stats)) in summary.operations.iter().enumerate() {
            let color = Palette99::pick(i).to_rgba();
            let points = |curve: &[(f64, u64)]| -> Vec<(f64, f64)> {
                curve.iter().map(|&(q, us)| (x_of(q), us as f64 / 1e3)).collect()
            };
            chart
                .draw_series(LineSeries::new(points(&stats.curve), color.stroke_width(2)))
                .map_err(plot_error)?
                .label(name.as_str())
                .legend(move |(x, y)| {
                    PathElement::new([(x, y), (x + 20, y)], color.stroke_width(2))
                });
            if open_loop {
                let dashed = DashedLineSeries::new(
                    points(&stats.curve_uncorrected),
                    6,
                    4,
                    color.stroke_width(1),
                );
                chart
                    .draw_series(dashed)
                    .map_err(plot_error)?
                    .label(format!("{name} uncorrected"))
                    .legend(move |(x, y)| {
                        PathElement::new([(x, y), (x + 20, y)], color.stroke_width(1))
                    });
            }
        }
        for verdict in verdicts {
            let color = if verdict.met() { GREEN } else { RED }.to_rgba();
            let limit_ms = verdict.slo.limit_us as f64 / 1e3;
            let word = if verdict.met() { "met" } else { "MISSED" };
            chart
                .draw_series(LineSeries::new(
                    [(1.0, limit_ms), (X_MAX, limit_ms)],
                    color.stroke_width(1),
                ))
                .map_err(plot_error)?
                .label(format!("SLO {} {word}", verdict.slo))
                .legend(move |(x, y)| {
                    PathElement::new([(x, y), (x + 20, y)], color.stroke_width(1))
                });
            let at = (x_of(quantile_of(verdict.slo.metric)), limit_ms);
            chart.draw_series([Circle::new(at, 4, color.filled())]).map_err(plot_error)?;
        }
        legend(&mut chart)
    })
}

/// A plot of one figure of the per-second series over the measured window, a line per
/// (name, series, dashed); `log`: on a logarithmic axis of latencies in µs shown as ms.
fn series_svg(
    summary: &Summary,
    title: &str,
    y_desc: &str,
    lines: &[Line],
    log: bool,
) -> anyhow::Result<String> {
    let x_range = 0.0..summary.settings.duration_s.max(1.0);
    let values = lines.iter().flat_map(|(.., points)| points.iter().map(|&(_, y)| y));
    svg_of(SERIES_SIZE, |root| {
        let mut builder = ChartBuilder::on(root);
        builder
            .caption(title, ("sans-serif", 18))
            .margin(16)
            .x_label_area_size(36)
            .y_label_area_size(72);
        if log {
            let mut chart = builder
                .build_cartesian_2d(x_range.clone(), decades(values).log_scale())
                .map_err(plot_error)?;
            chart
                .configure_mesh()
                .x_desc("second")
                .y_desc(y_desc)
                .y_label_formatter(&|y| ms_label(*y))
                .draw()
                .map_err(plot_error)?;
            draw_lines(&mut chart, lines)?;
            legend(&mut chart)
        } else {
            let top = values.fold(0.0f64, f64::max).max(1.0) * 1.1;
            let mut chart =
                builder.build_cartesian_2d(x_range.clone(), 0.0..top).map_err(plot_error)?;
            chart.configure_mesh().x_desc("second").y_desc(y_desc).draw().map_err(plot_error)?;
            draw_lines(&mut chart, lines)?;
            legend(&mut chart)
        }
    })
}

fn draw_lines<'a, Y: Ranged<ValueType = f64>>(
    chart: &mut ChartContext<
        'a,
        SVGBackend<'a>,
        Cartesian2d<plotters::coord::types::RangedCoordf64, Y>,
    >,
    lines: &[Line],
) -> anyhow::Result<()> {
    for (name, color, dashed, points) in lines {
        let color = Palette99::pick(*color).to_rgba();
        let width = if *dashed { 1 } else { 2 };
        let drawn = if *dashed {
            chart.draw_series(DashedLineSeries::new(points.clone(), 6, 4, color.stroke_width(1)))
        } else {
            chart.draw_series(LineSeries::new(points.clone(), color.stroke_width(2)))
        };
        drawn.map_err(plot_error)?.label(name.as_str()).legend(move |(x, y)| {
            PathElement::new([(x, y), (x + 20, y)], color.stroke_width(width))
        });
    }
    Ok(())
}

/// Each operation (and all together when there are several) with its palette index.
fn rows(summary: &Summary) -> Vec<(&str, usize, &[SecondStats])> {
    let mut rows: Vec<(&str, usize, &[SecondStats])> = summary
        .operations
        .iter()
        .enumerate()
        .map(|(i, (name, stats))| (name.as_str(), i, &stats.series[..]))
        .collect();
    if summary.operations.len() > 1 {
        rows.push(("all", summary.operations.len(), &summary.overall.series[..]));
    }
    rows
}

/// A second's point in time: its middle (of the part inside the window).
fn mid(second: &SecondStats, duration_s: f64) -> f64 {
    (second.t_s + duration_s.min(second.t_s + 1.0)) / 2.0
}

/// Throughput second by second.
fn throughput_svg(summary: &Summary) -> anyhow::Result<String> {
    let d = summary.settings.duration_s;
    let lines: Vec<_> = rows(summary)
        .into_iter()
        .map(|(name, color, series)| {
            let points = series.iter().map(|s| (mid(s, d), s.throughput_per_s)).collect();
            (name.to_owned(), color, false, points)
        })
        .collect();
    series_svg(summary, "throughput by second", "answers per second", &lines, false)
}

/// Corrected p50 (dashed) and p99 second by second, on a logarithmic axis.
fn latency_series_svg(summary: &Summary) -> anyhow::Result<String> {
    let d = summary.settings.duration_s;
    let mut lines = Vec::new();
    for (name, color, series) in rows(summary) {
        for (label, dashed, pick) in [("p99", false, 1), ("p50", true, 0)] {
            let points = series
                .iter()
                .filter(|s| s.requests > 0)
                .map(|s| (mid(s, d), [s.p50_us, s.p99_us][pick] as f64 / 1e3))
                .collect();
            lines.push((format!("{name} {label}"), color, dashed, points));
        }
    }
    let title = format!("latency by second, p50 and p99 ({})", basis(summary));
    series_svg(summary, &title, "latency (ms, log)", &lines, true)
}

/// The SLO verdicts as HTML: a line saying whether all were met, and a row each.
fn verdicts_html(verdicts: &[Verdict]) -> String {
    if verdicts.is_empty() {
        return "<p class=\"verdict none\">No SLO was given (<code>--slo</code>).</p>\n".to_owned();
    }
    let missed = verdicts.iter().filter(|v| !v.met()).count();
    let (class, headline) = match missed {
        0 => ("met", format!("SLO met: all {} objectives held", verdicts.len())),
        n => ("missed", format!("SLO MISSED: {n} of {} objectives", verdicts.len())),
    };
    let mut out = format!(
        "<p class=\"verdict {class}\" id=\"verdict\">{headline}</p>\n<table class=\"slo\">\
         <tr><th>objective</th><th>limit (us)</th><th>measured (us)</th><th>verdict</th></tr>\n"
    );
    for v in verdicts {
        let actual = v.actual_us.map_or("nothing measured".to_owned(), |us| us.to_string());
        let (class, word) = if v.met() { ("met", "met") } else { ("missed", "MISSED") };
        out += &format!(
            "<tr class=\"{class}\"><td>{}</td><td>{}</td><td>{actual}</td><td>{word}</td></tr>\n",
            escape(&v.slo.to_string()),
            v.slo.limit_us
        );
    }
    out + "</table>\n"
}

/// The page's script: checks that each plot was drawn and each operation has a row, then
/// marks `<body>` with `data-check="ok"`, or with what went wrong (a script error included:
/// the handler in `<head>` collects them).
const SCRIPT: &str = r##"(function () {
  var problems = [];
  var report = JSON.parse(document.getElementById("report").textContent);
  ["percentiles", "throughput", "latency-by-second"].forEach(function (id) {
    var svg = document.querySelector("#" + id + " svg");
    if (!svg) { problems.push(id + ": no plot"); return; }
    var box = svg.getBoundingClientRect();
    if (box.width < 100 || box.height < 100) problems.push(id + ": drawn " + box.width + "x" + box.height);
    if (svg.querySelectorAll("polyline, path").length === 0) problems.push(id + ": no line");
  });
  var table = document.getElementById("summary").textContent;
  Object.keys(report.operations).forEach(function (name) {
    if (table.indexOf(name + " ") < 0) problems.push("no row for " + name);
  });
  var rows = document.querySelectorAll("table.slo tr.met, table.slo tr.missed").length;
  if (rows !== report.slo.length) problems.push(rows + " SLO rows for " + report.slo.length + " objectives");
  var errors = window.reportErrors.concat(problems);
  document.body.setAttribute("data-check", errors.length ? "error: " + errors.join("; ") : "ok");
  if (!errors.length) document.title = "OK " + document.title;
})();"##;

const STYLE: &str = "body{font-family:sans-serif;margin:1.5em;max-width:1000px}\
pre{font-size:12px}figure{margin:1em 0}.verdict{font-weight:bold;padding:.4em .6em}\
.verdict.met,tr.met{background:#dfd}.verdict.missed,tr.missed{background:#fdd}\
.warning{background:#ffd;padding:.4em .6em}table.slo{border-collapse:collapse}\
table.slo td,table.slo th{border:1px solid #ccc;padding:.2em .5em}";

/// An HTML page: the SLO verdicts, warnings, the summary table, the percentile plot, the
/// series and the JSON report. Self-contained: no file or network fetched.
pub fn html(summary: &Summary, verdicts: &[Verdict]) -> anyhow::Result<String> {
    let json = serde_json::to_string(&summary.json(verdicts))?.replace("</", "<\\/");
    let warnings: String = summary
        .rate_warning()
        .iter()
        .map(|w| format!("<p class=\"warning\">warning: {}</p>\n", escape(w)))
        .collect();
    Ok(format!(
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head><meta charset=\"utf-8\">\
         <title>loadgen: {label}</title><style>{STYLE}</style>\n<script>window.reportErrors = [];\
         window.addEventListener(\"error\", function (e) {{ window.reportErrors.push(String(e.message)); }});\
         </script></head>\n<body data-check=\"pending\">\n<h1>loadgen: {label}</h1>\n{verdicts}{warnings}\
         <pre id=\"summary\">{table}</pre>\n<figure id=\"percentiles\">{percentiles}</figure>\n\
         <figure id=\"throughput\">{throughput}</figure>\n\
         <figure id=\"latency-by-second\">{latency}</figure>\n\
         <script type=\"application/json\" id=\"report\">{json}</script>\n<script>{SCRIPT}</script>\n\
         </body>\n</html>\n",
        label = escape(summary.label()),
        verdicts = verdicts_html(verdicts),
        table = escape(&summary.text()),
        percentiles = svg(summary, verdicts)?,
        throughput = throughput_svg(summary)?,
        latency = latency_series_svg(summary)?,
    ))
}

fn basis(summary: &Summary) -> &'static str {
    match summary.settings.rate_per_s {
        Some(_) => "open loop, corrected",
        None => "closed loop",
    }
}

/// The x of quantile `q`: `1 / (1 - q)`, capped at the axis' end.
fn x_of(q: f64) -> f64 {
    if q >= 1.0 - 1.0 / X_MAX {
        X_MAX
    } else {
        1.0 / (1.0 - q)
    }
}

/// `10^k` on the x axis as its percentile: 1 → `0%`, 10 → `90%`, 1000 → `99.9%`.
fn percentile_label(x: f64) -> String {
    let nines = x.log10().round() as usize;
    match nines {
        0 => "0%".to_owned(),
        1 => "90%".to_owned(),
        n => format!("99.{}%", "9".repeat(n - 2)).replace("99.%", "99%"),
    }
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}

fn plot_error<E: std::fmt::Debug>(error: E) -> anyhow::Error {
    anyhow!("drawing the plot: {error:?}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::{Settings, Stats};

    #[test]
    fn axis_labels_are_percentiles() {
        let labels: Vec<String> =
            [1.0, 10.0, 100.0, 1e3, 1e4, 1e5].into_iter().map(percentile_label).collect();
        assert_eq!(labels, ["0%", "90%", "99%", "99.9%", "99.99%", "99.999%"]);
        assert_eq!(x_of(0.0), 1.0);
        assert!((x_of(0.99) - 100.0).abs() < 1e-6);
        assert_eq!(x_of(1.0), X_MAX);
    }

    #[test]
    fn plot_has_a_line_per_operation() {
        let stats = |scale: u64| Stats {
            requests: 3,
            curve: vec![(0.0, scale), (0.9, 2 * scale), (0.999, 9 * scale), (1.0, 10 * scale)],
            ..Stats::default()
        };
        let summary = Summary {
            operations: vec![("authorize".into(), stats(100)), ("ping".into(), stats(10))],
            settings: Settings { rate_per_s: Some(10.0), ..Settings::default() },
            ..Summary::default()
        };
        let svg = svg(&summary, &[]).unwrap();
        assert!(svg.starts_with("<svg"), "{}", &svg[..40]);
        // Each operation: its line, and its key in the legend.
        let lines = svg.matches("<polyline").count();
        let wide = svg.matches("stroke-width=\"2\"").count();
        assert!(lines > 4 && wide == 4, "one line per operation: {wide} of {lines}");
        assert!(svg.contains("authorize") && svg.contains("99.99%"));
        let page = html(&summary, &[]).unwrap();
        assert!(page.contains("<h1>loadgen: mix</h1>") && page.contains("<svg"));
        for id in ["percentiles", "throughput", "latency-by-second"] {
            assert!(page.contains(&format!("<figure id=\"{id}\"><svg")), "{id}");
        }
        assert!(page.contains("No SLO was given"));
        assert!(
            !page.contains(" src=") && !page.contains("href="),
            "self-contained: nothing fetched"
        );
    }

    #[test]
    fn latencies_are_on_a_log_axis_with_the_slos_drawn() {
        assert_eq!(decades([0.05, 30.0].into_iter()), 0.01..100.0);
        assert_eq!(decades(std::iter::empty()), 0.001..1.0);
        assert_eq!(
            (ms_label(0.05), ms_label(1.0), ms_label(250.0)),
            ("0.05".into(), "1".into(), "250".into())
        );
        let stats = Stats {
            requests: 3,
            curve: vec![(0.0, 50), (0.9, 200), (0.999, 900), (1.0, 30_000)],
            curve_uncorrected: vec![(0.0, 40), (0.9, 100), (1.0, 400)],
            latency: crate::report::Percentiles { p99: 5_000, max: 30_000, ..Default::default() },
            ..Stats::default()
        };
        let summary = Summary {
            overall: stats.clone(),
            operations: vec![("authorize".into(), stats)],
            settings: Settings { rate_per_s: Some(10.0), duration_s: 1.0, ..Settings::default() },
            ..Summary::default()
        };
        let slos: Vec<crate::slo::Slo> =
            ["authorize:p99=1ms", "max=50ms"].iter().map(|s| s.parse().unwrap()).collect();
        let verdicts = crate::slo::check(&slos, &summary);
        let svg = svg(&summary, &verdicts).unwrap();
        // The y axis runs over decades (0.01 ms to 100 ms), labelled in ms.
        for label in [">\n0.1\n<", ">\n1\n<", ">\n10\n<", "latency (ms, log)"] {
            assert!(svg.contains(label), "{label}");
        }
        assert!(svg.contains("authorize uncorrected"));
        assert!(
            svg.contains("SLO authorize:p99&lt;=1000us MISSED")
                || svg.contains("SLO authorize:p99<=1000us MISSED"),
            "{svg}"
        );
        assert!(svg.contains("SLO max&lt;=50000us met") || svg.contains("SLO max<=50000us met"));
        let page = html(&summary, &verdicts).unwrap();
        assert!(page.contains("SLO MISSED: 1 of 2 objectives"), "the verdict, on the page");
        assert!(page.contains("<tr class=\"missed\"><td>authorize:p99&lt;=1000us</td>"));
    }
}
