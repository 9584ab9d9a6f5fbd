//! The latency-percentile plot, drawn as HdrHistogram's plotter draws it: percentile on a
//! logarithmic x axis (0%, 90%, 99%, 99.9%, 99.99%, 99.999%: the axis is `1 / (1 - q)`),
//! latency on a linear y axis, one line per operation. Written as SVG, or as an HTML page
//! holding the SVG and the summary table.

use anyhow::anyhow;
use plotters::prelude::*;

use crate::report::Summary;

/// Furthest percentile shown: 99.999% (`1 / (1 - q)` = 10⁵).
const X_MAX: f64 = 1e5;
const SIZE: (u32, u32) = (960, 540);

/// The plot as an SVG document.
pub fn svg(summary: &Summary) -> anyhow::Result<String> {
    let mut out = String::new();
    {
        let root = SVGBackend::with_string(&mut out, SIZE).into_drawing_area();
        root.fill(&WHITE).map_err(plot_error)?;
        let y_max_ms = summary
            .operations
            .iter()
            .flat_map(|(_, stats)| stats.curve.iter().map(|&(_, us)| us as f64 / 1e3))
            .fold(0.0f64, f64::max)
            .max(0.001)
            * 1.05;
        let title = format!("{} latency by percentile ({})", summary.label(), basis(summary));
        let mut chart = ChartBuilder::on(&root)
            .caption(title, ("sans-serif", 20))
            .margin(16)
            .margin_right(40) // room for the last x label, 99.999%
            .x_label_area_size(40)
            .y_label_area_size(64)
            .build_cartesian_2d(
                (1.0..X_MAX).log_scale().with_key_points(vec![1.0, 10.0, 100.0, 1e3, 1e4, 1e5]),
                0.0..y_max_ms,
            )
            .map_err(plot_error)?;
        chart
            .configure_mesh()
            .x_desc("percentile")
            .y_desc("latency (ms)")
            .x_label_formatter(&|x| percentile_label(*x))
            .draw()
            .map_err(plot_error)?;
        for (i, (name, stats)) in summary.operations.iter().enumerate() {
            let color = Palette99::pick(i).to_rgba();
            let points = stats.curve.iter().map(|&(q, us)| (x_of(q), us as f64 / 1e3));
            chart
                .draw_series(LineSeries::new(points, color.stroke_width(2)))
                .map_err(plot_error)?
                .label(name.as_str())
                .legend(move |(x, y)| {
                    PathElement::new([(x, y), (x + 20, y)], color.stroke_width(2))
                });
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperLeft)
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()
            .map_err(plot_error)?;
        root.present().map_err(plot_error)?;
    }
    Ok(out)
}

/// An HTML page: the settings, the summary table and the plot.
pub fn html(summary: &Summary) -> anyhow::Result<String> {
    let svg = svg(summary)?;
    let table = escape(&summary.text());
    Ok(format!(
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head><meta charset=\"utf-8\">\
         <title>loadgen: {label}</title></head>\n<body>\n<h1>loadgen: {label}</h1>\n\
         <pre>{table}</pre>\n{svg}\n</body>\n</html>\n",
        label = escape(summary.label()),
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
        let svg = svg(&summary).unwrap();
        assert!(svg.starts_with("<svg"), "{}", &svg[..40]);
        // Each operation: its line, and its key in the legend.
        let lines = svg.matches("<polyline").count();
        let wide = svg.matches("stroke-width=\"2\"").count();
        assert!(lines > 4 && wide == 4, "one line per operation: {wide} of {lines}");
        assert!(svg.contains("authorize") && svg.contains("99.99%"));
        let page = html(&summary).unwrap();
        assert!(page.contains("<h1>loadgen: mix</h1>") && page.contains("<svg"));
    }
}
