//! The HdrHistogram percentile-distribution text format (`.hgrm`).
//!
//! This is the output of Java HdrHistogram's `outputPercentileDistribution`, which the
//! HdrHistogram plotter (hdrhistogram.github.io/HdrHistogram/plotFiles.html) and most tooling
//! read. It is reproduced column for column:
//!
//! ```text
//!        Value     Percentile TotalCount 1/(1-Percentile)
//!
//!        1.000 0.000000000000          1           1.00
//!        ...
//!      100.008 1.000000000000      10000
//! #[Mean    =        1.010, StdDeviation   =        0.990]
//! #[Max     =      100.008, Total count    =        10000]
//! #[Buckets =           32, SubBuckets     =         2048]
//! ```
//!
//! Values are divided by the scale and printed with as many decimals as the histogram has
//! significant digits (`%12.3f`); the percentile is `%2.12f`, the total count `%10d`, and
//! `1/(1-Percentile)` is `%14.2f`, left out on the final 100% line. Percentile steps follow
//! HdrHistogram's percentile iterator with [`TICKS_PER_HALF_DISTANCE`] ticks per half distance to
//! 100%.

use std::fs::File;
use std::io::{self, BufWriter, Write};
use std::path::Path;

use hdrhistogram::Histogram;

use super::ReportError;

/// Percentile ticks per half distance to 100%, as in the Java default and the plotter's inputs.
pub const TICKS_PER_HALF_DISTANCE: u32 = 5;

/// Writes `hist` as an `.hgrm` file, values divided by `scale` (use
/// [`NANOS_PER_MILLI`](super::NANOS_PER_MILLI) to show nanosecond histograms in milliseconds).
pub fn write_hgrm(
    path: impl AsRef<Path>,
    hist: &Histogram<u64>,
    scale: f64,
) -> Result<(), ReportError> {
    let path = path.as_ref();
    let write = || -> io::Result<()> {
        let mut out = BufWriter::new(File::create(path)?);
        write_percentile_distribution(&mut out, hist, scale, TICKS_PER_HALF_DISTANCE)?;
        out.into_inner()
            .map_err(io::IntoInnerError::into_error)?
            .sync_all()
    };
    write().map_err(|source| ReportError::Write {
        path: path.to_path_buf(),
        source,
    })
}

/// The `.hgrm` text of `hist` (values divided by `scale`) as a string.
pub fn percentile_distribution(hist: &Histogram<u64>, scale: f64) -> String {
    let mut out = Vec::new();
    // Writing into a Vec cannot fail.
    let _ = write_percentile_distribution(&mut out, hist, scale, TICKS_PER_HALF_DISTANCE);
    String::from_utf8_lossy(&out).into_owned()
}

/// Writes the percentile distribution of `hist` to `out`, `ticks_per_half_distance` percentile
/// steps per half distance to 100% (at least 1). An empty histogram gets the header and the
/// footer only, as in Java.
pub fn write_percentile_distribution<W: Write>(
    out: &mut W,
    hist: &Histogram<u64>,
    scale: f64,
    ticks_per_half_distance: u32,
) -> io::Result<()> {
    let digits = usize::from(hist.sigfig());
    write!(
        out,
        "{:>12} {:>14} {:>10} {:>14}\n\n",
        "Value", "Percentile", "TotalCount", "1/(1-Percentile)"
    )?;
    let mut total: u64 = 0;
    for step in hist.iter_quantiles(ticks_per_half_distance.max(1)) {
        total = total.saturating_add(step.count_since_last_iteration());
        let value = step.value_iterated_to() as f64 / scale;
        let p = step.quantile_iterated_to();
        if p < 1.0 {
            let inverse = 1.0 / (1.0 - p);
            writeln!(out, "{value:12.digits$} {p:2.12} {total:10} {inverse:14.2}")?;
        } else {
            writeln!(out, "{value:12.digits$} {p:2.12} {total:10}")?;
        }
    }
    let mean = hist.mean() / scale;
    let stdev = hist.stdev() / scale;
    let max = hist.max() as f64 / scale;
    writeln!(
        out,
        "#[Mean    = {mean:12.digits$}, StdDeviation   = {stdev:12.digits$}]"
    )?;
    writeln!(
        out,
        "#[Max     = {max:12.digits$}, Total count    = {:12}]",
        hist.len()
    )?;
    writeln!(
        out,
        "#[Buckets = {:12}, SubBuckets     = {:12}]",
        hist.buckets(),
        sub_bucket_count(hist.sigfig())
    )
}

/// HdrHistogram's sub-bucket count: the power of two at or above 2 × 10^sigfig (the histogram
/// does not expose it).
fn sub_bucket_count(sigfig: u8) -> u64 {
    (2 * 10_u64.pow(u32::from(sigfig))).next_power_of_two()
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::report::recorder::{LatencyRecorder, NANOS_PER_MILLI};

    const HEADER: &str = "       Value     Percentile TotalCount 1/(1-Percentile)";

    /// One data line: value, percentile, total count and (except on the last line) 1/(1-p).
    struct Line {
        value: f64,
        percentile: f64,
        total: u64,
        inverse: Option<f64>,
    }

    fn parse(text: &str) -> (Vec<Line>, Vec<&str>) {
        let mut lines = text.lines();
        assert_eq!(lines.next(), Some(HEADER));
        assert_eq!(lines.next(), Some(""));
        let (mut data, mut footer) = (Vec::new(), Vec::new());
        for l in lines {
            if l.starts_with("#[") {
                footer.push(l);
                continue;
            }
            assert!(footer.is_empty(), "data after footer: {l}");
            let cols: Vec<&str> = l.split_whitespace().collect();
            assert!(cols.len() == 3 || cols.len() == 4, "{l}");
            data.push(Line {
                value: cols[0].parse().unwrap(),
                percentile: cols[1].parse().unwrap(),
                total: cols[2].parse().unwrap(),
                inverse: cols.get(3).map(|c| c.parse().unwrap()),
            });
        }
        (data, footer)
    }

    fn footer_value(line: &str, key: &str) -> f64 {
        let rest = &line[line.find(key).unwrap() + key.len()..];
        let rest = rest.trim_start().trim_start_matches('=').trim_start();
        let end = rest.find([',', ']']).unwrap();
        rest[..end].trim().parse().unwrap()
    }

    #[test]
    fn single_value_matches_java_output_exactly() {
        let mut r = LatencyRecorder::new();
        r.record(Duration::from_millis(1));
        let text = percentile_distribution(r.histogram(), NANOS_PER_MILLI);
        let want = [
            "       Value     Percentile TotalCount 1/(1-Percentile)",
            "",
            "       1.000 0.000000000000          1           1.00",
            "       1.000 1.000000000000          1",
            "#[Mean    =        1.000, StdDeviation   =        0.000]",
            "#[Max     =        1.000, Total count    =            1]",
            "#[Buckets =           32, SubBuckets     =         2048]",
            "",
        ]
        .join("\n");
        assert_eq!(text, want);
    }

    #[test]
    fn distribution_parses_back_consistently() {
        let mut r = LatencyRecorder::new();
        for i in 1..=10_000u64 {
            r.record(Duration::from_micros(i * 3 + (i % 17) * 250));
        }
        r.record(Duration::from_millis(250));
        let h = r.histogram();
        let text = percentile_distribution(h, NANOS_PER_MILLI);
        let (data, footer) = parse(&text);

        assert!(
            data.len() > 50,
            "5 ticks per half distance gives many lines"
        );
        assert_eq!(data[0].percentile, 0.0);
        for pair in data.windows(2) {
            assert!(pair[1].percentile >= pair[0].percentile);
            assert!(pair[1].value >= pair[0].value);
            assert!(pair[1].total >= pair[0].total);
        }
        for l in &data[..data.len() - 1] {
            let inv = l.inverse.expect("1/(1-p) on every line but the last");
            assert!((inv - 1.0 / (1.0 - l.percentile)).abs() <= 0.01 * inv.max(1.0));
        }
        let last = data.last().unwrap();
        assert_eq!(last.percentile, 1.0);
        assert!(last.inverse.is_none());
        assert_eq!(last.total, h.len());
        assert!((last.value - h.max() as f64 / NANOS_PER_MILLI).abs() < 1e-3);

        assert_eq!(footer.len(), 3);
        let mean = footer_value(footer[0], "Mean");
        let stdev = footer_value(footer[0], "StdDeviation");
        assert!((mean - h.mean() / NANOS_PER_MILLI).abs() < 1e-3);
        assert!((stdev - h.stdev() / NANOS_PER_MILLI).abs() < 1e-3);
        assert!((footer_value(footer[1], "Max") - last.value).abs() < 1e-9);
        assert_eq!(footer_value(footer[1], "Total count") as u64, 10_001);
        assert_eq!(footer_value(footer[2], "Buckets") as u64, 32);
        assert_eq!(footer_value(footer[2], "SubBuckets") as u64, 2048);
    }

    #[test]
    fn empty_histogram_has_header_and_footer_only() {
        let r = LatencyRecorder::new();
        let text = percentile_distribution(r.histogram(), NANOS_PER_MILLI);
        let (data, footer) = parse(&text);
        assert!(data.is_empty());
        assert_eq!(footer_value(footer[1], "Total count"), 0.0);
    }

    #[test]
    fn sub_bucket_count_matches_hdrhistogram() {
        assert_eq!(sub_bucket_count(0), 2);
        assert_eq!(sub_bucket_count(1), 32);
        assert_eq!(sub_bucket_count(2), 256);
        assert_eq!(sub_bucket_count(3), 2048);
        assert_eq!(sub_bucket_count(5), 262_144);
    }

    #[test]
    fn write_hgrm_creates_the_file_and_reports_bad_paths() {
        let dir = tempfile::tempdir().unwrap();
        let mut r = LatencyRecorder::new();
        r.record(Duration::from_micros(1_500));
        let path = dir.path().join("corrected.hgrm");
        write_hgrm(&path, r.histogram(), NANOS_PER_MILLI).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.starts_with(HEADER));

        let bad = dir.path().join("missing-dir").join("x.hgrm");
        let err = write_hgrm(&bad, r.histogram(), NANOS_PER_MILLI).unwrap_err();
        assert!(
            matches!(&err, ReportError::Write { path, .. } if *path == bad),
            "{err:?}"
        );
    }
}
