//! Named latency histograms and the percentile table printed at the end of a run.

use std::fmt;
use std::path::Path;

use serde::{Deserialize, Serialize};

use super::recorder::{LatencyRecorder, NANOS_PER_MILLI};
use super::{ReportError, plot};

/// Series name for intended send time → ingest accepted (corrected for coordinated omission).
pub const SERIES_CORRECTED: &str = "send→accept (corrected)";
/// Series name for actual send time → ingest accepted (service time).
pub const SERIES_SERVICE_TIME: &str = "send→accept (service time)";
/// Series name for device timestamp → committed to storage.
pub const SERIES_END_TO_END: &str = "end-to-end device→committed";
/// Series name for device timestamp → notification received from the router (first receipt
/// of each reading).
pub const SERIES_NOTIFIED: &str = "end-to-end device→notified";

/// The numbers one table row shows, in milliseconds. Zero when the histogram is empty.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct LatencyStats {
    /// Number of recorded values.
    pub count: u64,
    /// Median.
    pub p50_ms: f64,
    /// 90th percentile.
    pub p90_ms: f64,
    /// 99th percentile.
    pub p99_ms: f64,
    /// 99.9th percentile.
    pub p999_ms: f64,
    /// Highest recorded value.
    pub max_ms: f64,
    /// Mean (a poor summary of latency, shown for contrast with the percentiles).
    pub mean_ms: f64,
    /// Values above 1 h, recorded as 1 h.
    pub saturated: u64,
}

impl LatencyStats {
    /// Computes the row for one recorder.
    pub fn of(recorder: &LatencyRecorder) -> Self {
        let h = recorder.histogram();
        let ms = |ns: u64| ns as f64 / NANOS_PER_MILLI;
        if h.is_empty() {
            return Self::default();
        }
        Self {
            count: h.len(),
            p50_ms: ms(h.value_at_quantile(0.50)),
            p90_ms: ms(h.value_at_quantile(0.90)),
            p99_ms: ms(h.value_at_quantile(0.99)),
            p999_ms: ms(h.value_at_quantile(0.999)),
            max_ms: ms(h.max()),
            mean_ms: h.mean() / NANOS_PER_MILLI,
            saturated: recorder.saturated(),
        }
    }
}

/// One named histogram with its row of statistics, computed once at construction.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LatencySeries {
    name: String,
    stats: LatencyStats,
    histogram: LatencyRecorder,
}

impl LatencySeries {
    /// Names a recorder and computes its statistics.
    pub fn new(name: impl Into<String>, histogram: LatencyRecorder) -> Self {
        Self {
            name: name.into(),
            stats: LatencyStats::of(&histogram),
            histogram,
        }
    }

    /// The series name, e.g. [`SERIES_CORRECTED`].
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The table row.
    pub fn stats(&self) -> &LatencyStats {
        &self.stats
    }

    /// The full histogram, for `.hgrm` files and plots.
    pub fn histogram(&self) -> &LatencyRecorder {
        &self.histogram
    }
}

/// An ordered set of named latency histograms; `Display` prints the percentile table.
///
/// ```text
/// latency (ms)                     count       p50       p90       p99     p99.9       max      mean
/// send→accept (corrected)          60000     1.234     2.047     9.871    25.103    31.457     1.502
/// ```
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct LatencyReport {
    series: Vec<LatencySeries>,
}

impl LatencyReport {
    /// An empty report.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a series at the end (builder form of [`push`](Self::push)).
    pub fn with(mut self, name: impl Into<String>, histogram: LatencyRecorder) -> Self {
        self.push(name, histogram);
        self
    }

    /// Adds a series at the end; the table keeps insertion order.
    pub fn push(&mut self, name: impl Into<String>, histogram: LatencyRecorder) {
        self.series.push(LatencySeries::new(name, histogram));
    }

    /// All series in insertion order.
    pub fn series(&self) -> &[LatencySeries] {
        &self.series
    }

    /// The first series with this name.
    pub fn get(&self, name: &str) -> Option<&LatencySeries> {
        self.series.iter().find(|s| s.name == name)
    }

    /// Writes the SVG percentile plot of every non-empty series (see [`plot::write_latency_plot`]).
    pub fn write_plot(&self, path: impl AsRef<Path>) -> Result<(), ReportError> {
        let series: Vec<_> = self
            .series
            .iter()
            .map(|s| (s.name.as_str(), s.histogram.histogram()))
            .collect();
        plot::write_latency_plot(path, &series)
    }
}

const HEADING: &str = "latency (ms)";
const COLUMNS: [&str; 6] = ["p50", "p90", "p99", "p99.9", "max", "mean"];

impl fmt::Display for LatencyReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name_w = self
            .series
            .iter()
            .map(|s| s.name.chars().count())
            .chain([HEADING.len()])
            .max()
            .unwrap_or(HEADING.len());
        write!(f, "{HEADING:<name_w$} {:>10}", "count")?;
        for c in COLUMNS {
            write!(f, " {c:>9}")?;
        }
        writeln!(f)?;
        for s in &self.series {
            let st = &s.stats;
            write!(f, "{:<name_w$} {:>10}", s.name, st.count)?;
            let values = [
                st.p50_ms, st.p90_ms, st.p99_ms, st.p999_ms, st.max_ms, st.mean_ms,
            ];
            for v in values {
                if st.count == 0 {
                    write!(f, " {:>9}", "-")?;
                } else {
                    write!(f, " {v:>9.3}")?;
                }
            }
            writeln!(f)?;
        }
        for s in self.series.iter().filter(|s| s.stats.saturated > 0) {
            writeln!(
                f,
                "note: {} value(s) of \"{}\" exceeded 1 h and were recorded as 1 h",
                s.stats.saturated, s.name
            )?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn recorder(ms: &[u64]) -> LatencyRecorder {
        let mut r = LatencyRecorder::new();
        for &m in ms {
            r.record(Duration::from_millis(m));
        }
        r
    }

    #[test]
    fn table_has_header_one_row_per_series_and_millisecond_values() {
        let report = LatencyReport::new()
            .with(SERIES_CORRECTED, recorder(&[1, 2, 3, 4, 100]))
            .with(SERIES_SERVICE_TIME, recorder(&[1, 1, 1, 1, 2]))
            .with(SERIES_END_TO_END, LatencyRecorder::new());
        let text = report.to_string();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 4, "{text}");
        for col in ["count", "p50", "p90", "p99", "p99.9", "max", "mean"] {
            assert!(lines[0].contains(col), "{}", lines[0]);
        }
        let row: Vec<&str> = lines[1]
            .trim_start_matches(SERIES_CORRECTED)
            .split_whitespace()
            .collect();
        assert_eq!(row[0], "5");
        assert_eq!(
            row[1], "3.000",
            "p50 is the highest value equivalent to 3 ms"
        );
        assert_eq!(row[5], "100.008");
        // Columns line up even with the multi-byte arrow in the names.
        let width = |l: &str| l.chars().count();
        assert_eq!(width(lines[0]), width(lines[1]));
        assert_eq!(width(lines[1]), width(lines[2]));
        // An empty series prints dashes, not zeros.
        assert!(lines[3].ends_with(" -"), "{}", lines[3]);
    }

    #[test]
    fn saturation_is_noted_under_the_table() {
        let mut r = LatencyRecorder::new();
        r.record(Duration::from_secs(5_000));
        let text = LatencyReport::new().with("slow", r).to_string();
        assert!(
            text.contains("note: 1 value(s) of \"slow\" exceeded 1 h"),
            "{text}"
        );
    }

    #[test]
    fn get_finds_series_by_name() {
        let report = LatencyReport::new().with(SERIES_CORRECTED, recorder(&[5]));
        assert_eq!(report.get(SERIES_CORRECTED).unwrap().stats().count, 1);
        assert!(report.get("nope").is_none());
    }
}
