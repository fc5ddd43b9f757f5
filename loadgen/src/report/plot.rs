//! SVG percentile-distribution plot, drawn like the HdrHistogram plotter.
//!
//! The x axis is `1/(1-percentile)` on a log scale, so each decade is one more "nine":
//! 0%, 90%, 99%, 99.9%, 99.99%… The y axis is latency in milliseconds, linear. Each named
//! histogram is one line, with a legend. Only the SVG backend is used; plotters' built-in naive
//! font metrics lay out the text, so no font feature or system font is needed, and the SVG
//! viewer renders the `<text>` elements.

use std::path::Path;

use hdrhistogram::Histogram;
use plotters::prelude::*;

use super::ReportError;
use super::hgrm::TICKS_PER_HALF_DISTANCE;
use super::recorder::NANOS_PER_MILLI;

/// Title used by [`write_latency_plot`].
pub const DEFAULT_PLOT_TITLE: &str = "Latency by percentile distribution";

const SIZE: (u32, u32) = (1024, 640);

/// Line colours (the "tab10" palette): distinct, and readable on white, unlike pure yellow.
const COLORS: [RGBColor; 8] = [
    RGBColor(0x1f, 0x77, 0xb4),
    RGBColor(0xd6, 0x27, 0x28),
    RGBColor(0x2c, 0xa0, 0x2c),
    RGBColor(0xff, 0x7f, 0x0e),
    RGBColor(0x94, 0x67, 0xbd),
    RGBColor(0x8c, 0x56, 0x4b),
    RGBColor(0xe3, 0x77, 0xc2),
    RGBColor(0x7f, 0x7f, 0x7f),
];

/// Writes an SVG plot of the percentile distribution of each `(name, histogram)`; histograms
/// hold nanoseconds and are plotted in milliseconds. Empty histograms appear in the legend only.
pub fn write_latency_plot(
    path: impl AsRef<Path>,
    series: &[(&str, &Histogram<u64>)],
) -> Result<(), ReportError> {
    let path = path.as_ref();
    let svg = render_latency_plot(DEFAULT_PLOT_TITLE, series)?;
    std::fs::write(path, svg).map_err(|source| ReportError::Write {
        path: path.to_path_buf(),
        source,
    })
}

/// Renders the plot to an SVG document in memory.
pub fn render_latency_plot(
    title: &str,
    series: &[(&str, &Histogram<u64>)],
) -> Result<String, ReportError> {
    let curves: Vec<(&str, Vec<(f64, f64)>)> = series
        .iter()
        .map(|(name, h)| (*name, percentile_curve(h, NANOS_PER_MILLI)))
        .collect();
    let points = || curves.iter().flat_map(|(_, c)| c.iter());
    let widest = points().map(|p| p.0).fold(1.0, f64::max);
    // Whole decades, and at least out to 99% so the shape of the tail is visible.
    let x_max = 10_f64.powf(widest.log10().ceil()).max(100.0);
    let highest = points().map(|p| p.1).fold(0.0, f64::max);
    let y_max = if highest > 0.0 { highest * 1.05 } else { 1.0 };

    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, SIZE).into_drawing_area();
        root.fill(&WHITE).map_err(plot_error)?;
        let mut chart = ChartBuilder::on(&root)
            .caption(title, ("sans-serif", 24))
            .margin(20)
            // Room for the last percentile label, centred on the right edge.
            .margin_right(48)
            .x_label_area_size(50)
            .y_label_area_size(70)
            .build_cartesian_2d((1.0..x_max).log_scale(), 0.0..y_max)
            .map_err(plot_error)?;
        chart
            .configure_mesh()
            .x_desc("percentile")
            .y_desc("latency (ms)")
            .x_label_formatter(&|x| percentile_label(*x))
            .draw()
            .map_err(plot_error)?;
        for (i, (name, curve)) in curves.iter().enumerate() {
            let style = COLORS[i % COLORS.len()].stroke_width(2);
            chart
                .draw_series(LineSeries::new(curve.iter().copied(), style))
                .map_err(plot_error)?
                .label(*name)
                .legend(move |(x, y)| PathElement::new([(x, y), (x + 24, y)], style));
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperLeft)
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .draw()
            .map_err(plot_error)?;
        root.present().map_err(plot_error)?;
    }
    Ok(svg)
}

/// The plotted points of one histogram: `(1/(1-p), value / scale)` at HdrHistogram's percentile
/// steps, leaving out the final 100% step (its x is infinite), as the HdrHistogram plotter does.
pub fn percentile_curve(hist: &Histogram<u64>, scale: f64) -> Vec<(f64, f64)> {
    hist.iter_quantiles(TICKS_PER_HALF_DISTANCE)
        .filter(|step| step.quantile_iterated_to() < 1.0)
        .map(|step| {
            let x = 1.0 / (1.0 - step.quantile_iterated_to());
            (x, step.value_iterated_to() as f64 / scale)
        })
        .collect()
}

/// The percentile at `x = 1/(1-p)`: 1 → "0%", 10 → "90%", 1000 → "99.9%".
fn percentile_label(x: f64) -> String {
    let p = 100.0 * (1.0 - 1.0 / x);
    let decimals = (x.log10().round() as i64 - 2).max(0) as usize;
    format!("{p:.decimals$}%")
}

fn plot_error(e: impl std::fmt::Display) -> ReportError {
    ReportError::Plot(e.to_string())
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::report::recorder::LatencyRecorder;

    fn recorder(scale_us: u64) -> LatencyRecorder {
        let mut r = LatencyRecorder::new();
        for i in 1..=20_000u64 {
            r.record(Duration::from_micros(scale_us * (1 + i % 100) + i / 50));
        }
        r
    }

    #[test]
    fn labels_read_as_nines() {
        assert_eq!(percentile_label(1.0), "0%");
        assert_eq!(percentile_label(10.0), "90%");
        assert_eq!(percentile_label(100.0), "99%");
        assert_eq!(percentile_label(1_000.0), "99.9%");
        assert_eq!(percentile_label(10_000.0), "99.99%");
        assert_eq!(percentile_label(100_000.0), "99.999%");
    }

    #[test]
    fn curve_is_monotonic_and_skips_the_infinite_point() {
        let r = recorder(10);
        let curve = percentile_curve(r.histogram(), NANOS_PER_MILLI);
        assert_eq!(curve[0].0, 1.0, "starts at the 0th percentile");
        assert!(curve.iter().all(|p| p.0.is_finite()));
        for pair in curve.windows(2) {
            assert!(pair[1].0 >= pair[0].0 && pair[1].1 >= pair[0].1);
        }
        let max_ms = r.max().as_secs_f64() * 1e3;
        assert!(curve.last().unwrap().1 <= max_ms + 1e-9);
        assert!(percentile_curve(LatencyRecorder::new().histogram(), 1.0).is_empty());
    }

    #[test]
    fn svg_file_has_every_series_name_and_a_line_each() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("latency.svg");
        let (a, b, empty) = (recorder(10), recorder(3), LatencyRecorder::new());
        let series = [
            ("send→accept (corrected)", a.histogram()),
            ("send→accept (service time)", b.histogram()),
            ("end-to-end <device>", empty.histogram()),
        ];
        write_latency_plot(&path, &series).unwrap();
        let svg = std::fs::read_to_string(&path).unwrap();
        assert!(svg.starts_with("<svg"), "{}", &svg[..80.min(svg.len())]);
        assert!(svg.trim_end().ends_with("</svg>"));
        assert!(svg.contains("send→accept (corrected)"));
        assert!(svg.contains("send→accept (service time)"));
        assert!(
            svg.contains("end-to-end &lt;device&gt;"),
            "names are XML-escaped"
        );
        assert!(svg.contains(DEFAULT_PLOT_TITLE));
        for label in ["90%", "99%", "99.9%", "latency (ms)", "percentile"] {
            assert!(
                svg.contains(&format!(">\n{label}\n<")),
                "axis text {label:?}"
            );
        }
        // Two data lines plus the legend samples.
        assert!(svg.matches("<polyline").count() >= 2);
    }

    #[test]
    fn all_empty_still_renders_axes() {
        let empty = LatencyRecorder::new();
        let svg = render_latency_plot("t", &[("nothing", empty.histogram())]).unwrap();
        assert!(svg.contains("nothing") && svg.contains("0%"));
    }
}
