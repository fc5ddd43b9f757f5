//! Latency recording and reporting for a load-generator run.
//!
//! This module owns everything loadgen measures and shows about a run: the latency histograms,
//! the shared send counters, the live progress line, the final summary (text and JSON), the
//! per-second timeline of offered, accepted and committed readings, the `.hgrm` percentile
//! files and the SVG percentile plot. It does not send anything; the sender
//! tasks feed it.
//!
//! # Coordinated omission
//!
//! loadgen is open-loop: every send has an *intended* time on a fixed schedule (rate R), and the
//! reading's device timestamp is set to that intended time. When the system under test stalls,
//! the sends scheduled during the stall go out late. Measuring from the actual send time
//! ("service time") hides that wait, because the requests that would have seen the stall were
//! never sent on time: the classic *coordinated omission* error. Measuring from the intended
//! time ("corrected", as wrk2 does) charges the wait to the requests that suffered it.
//! [`OpenLoopLatency`] records both from the same three instants so the report can show them side
//! by side; the gap between the two lines is the queueing the load generator itself absorbed.
//!
//! # Units
//!
//! Every histogram holds **nanoseconds**, tracks 1 ns to 1 h with 3 significant digits (see
//! [`LatencyRecorder`]), and is shown in milliseconds ([`NANOS_PER_MILLI`] is the scale for
//! [`write_hgrm`]). Histograms from other processes arrive as HdrHistogram V2 (deflate) bytes
//! and are re-binned into the same layout, so everything can be merged.
//!
//! # Layout
//!
//! - `recorder`: [`LatencyRecorder`], [`OpenLoopLatency`] and the histogram constants.
//! - `table`: [`LatencyStats`], [`LatencySeries`], [`LatencyReport`] (the percentile table).
//! - `summary`: [`Summary`], the final block printed and written as JSON.
//! - `timeline`: [`Timeline`], readings per second (written as `timeline.csv`).
//! - `hgrm`: the HdrHistogram percentile-distribution text format.
//! - `plot`: the SVG percentile plot.
//! - `progress`: [`Counters`] shared with sender tasks and the live [`Progress`] line.

mod hgrm;
mod plot;
mod progress;
mod recorder;
mod summary;
mod table;
mod timeline;

use std::io;
use std::path::PathBuf;

pub use hgrm::{
    TICKS_PER_HALF_DISTANCE, percentile_distribution, write_hgrm, write_percentile_distribution,
};
pub use plot::{DEFAULT_PLOT_TITLE, percentile_curve, render_latency_plot, write_latency_plot};
pub use progress::{Counters, CountersSnapshot, Progress};
pub use recorder::{
    HIGHEST_TRACKABLE_NS, LOWEST_DISCERNIBLE_NS, LatencyRecorder, NANOS_PER_MILLI, OpenLoopLatency,
    SIGNIFICANT_DIGITS,
};
pub use summary::{NotifySummary, Summary};
pub use table::{
    LatencyReport, LatencySeries, LatencyStats, SERIES_CORRECTED, SERIES_END_TO_END,
    SERIES_NOTIFIED, SERIES_SERVICE_TIME,
};
pub use timeline::{Timeline, TimelineSecond};

/// Errors from encoding, decoding and writing reports.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ReportError {
    /// A report file could not be created or written.
    #[error("cannot write {}", path.display())]
    Write {
        /// The file being written.
        path: PathBuf,
        /// The underlying I/O error.
        #[source]
        source: io::Error,
    },
    /// A histogram could not be serialized to V2 deflate bytes.
    #[error("cannot encode histogram as V2 deflate")]
    Encode(#[from] hdrhistogram::serialization::V2DeflateSerializeError),
    /// Bytes received from another process are not a valid V2 histogram.
    #[error("cannot decode V2 histogram")]
    Decode(#[from] hdrhistogram::serialization::DeserializeError),
    /// A histogram's hex text (in summary JSON) is malformed.
    #[error("invalid histogram hex: {0}")]
    Hex(&'static str),
    /// plotters failed to lay out or render the chart.
    #[error("cannot render plot: {0}")]
    Plot(String),
    /// The summary could not be encoded or parsed as JSON.
    #[error("summary JSON")]
    Json(#[from] serde_json::Error),
}
