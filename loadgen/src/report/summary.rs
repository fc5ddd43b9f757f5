//! The final summary of a run: counts, throughput and the latency table.

use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::ReportError;
use super::progress::CountersSnapshot;
use super::table::LatencyReport;
use super::timeline::Timeline;

/// Everything a run reports at the end. `Display` prints the block for humans; [`to_json`]
/// writes the same data (histograms included, as V2 deflate hex) for tests and benches.
///
/// Reading counts are in readings; `batches` counts requests. Rates are over `duration`.
///
/// [`to_json`]: Summary::to_json
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Summary {
    /// Readings sent (offered load).
    pub sent: u64,
    /// Readings the ingest front end accepted.
    pub accepted: u64,
    /// Readings the front end answered with a rejection (validation, back-pressure).
    pub rejected: u64,
    /// Readings whose request failed without an answer (connection error, timeout).
    pub failed: u64,
    /// Batches (requests) sent.
    pub batches: u64,
    /// Readings confirmed committed to storage, when the run could observe it.
    pub committed: Option<u64>,
    /// Batches still awaiting an answer when the run ended (abandoned).
    pub in_flight_at_end: u64,
    /// Wall-clock length of the measured run.
    pub duration: Duration,
    /// `sent / duration`: the load actually offered.
    pub offered_readings_per_sec: f64,
    /// `accepted / duration`: the throughput the system sustained.
    pub readings_per_sec: f64,
    /// `batches / duration`.
    pub batches_per_sec: f64,
    /// The named latency histograms.
    pub latency: LatencyReport,
    /// Readings offered, accepted and committed per second. Absent from summaries written
    /// before it existed, which read back with an empty one.
    #[serde(default)]
    pub timeline: Timeline,
    /// What the router notified, when the run subscribed (`--notify-listen`); the latency
    /// is the series [`SERIES_NOTIFIED`](super::SERIES_NOTIFIED). Absent otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub notify: Option<NotifySummary>,
}

/// Counts of the readings the router notified to the run's webhook.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NotifySummary {
    /// Distinct readings notified (each recorded once in the latency series).
    pub notified: u64,
    /// Receipts of readings already notified (at-least-once delivery), not recorded again.
    pub repeats: u64,
    /// Accepted readings not notified when the run ended (drain timeout or Ctrl-C).
    pub missing: u64,
    /// Events received that were not this run's (another subscription, or device timestamps
    /// before the run).
    pub ignored: u64,
}

impl Summary {
    /// Builds the summary from the final counter snapshot, the run's duration and the latency
    /// histograms. Rates are 0 for a zero duration.
    pub fn new(counts: &CountersSnapshot, duration: Duration, latency: LatencyReport) -> Self {
        let per_sec = |n: u64| {
            let secs = duration.as_secs_f64();
            if secs > 0.0 { n as f64 / secs } else { 0.0 }
        };
        Self {
            sent: counts.sent,
            accepted: counts.accepted,
            rejected: counts.rejected,
            failed: counts.failed,
            batches: counts.batches,
            committed: counts.committed,
            in_flight_at_end: counts.in_flight,
            duration,
            offered_readings_per_sec: per_sec(counts.sent),
            readings_per_sec: per_sec(counts.accepted),
            batches_per_sec: per_sec(counts.batches),
            latency,
            timeline: Timeline::default(),
            notify: None,
        }
    }

    /// The same summary with its per-second timeline.
    pub fn with_timeline(mut self, timeline: Timeline) -> Self {
        self.timeline = timeline;
        self
    }

    /// The same summary with the notification counts.
    pub fn with_notify(mut self, notify: NotifySummary) -> Self {
        self.notify = Some(notify);
        self
    }

    /// Pretty-printed JSON of the whole summary.
    pub fn to_json(&self) -> Result<String, ReportError> {
        Ok(serde_json::to_string_pretty(self)?)
    }

    /// Parses what [`to_json`](Self::to_json) wrote.
    pub fn from_json(json: &str) -> Result<Self, ReportError> {
        Ok(serde_json::from_str(json)?)
    }
}

impl fmt::Display for Summary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let share = |n: u64| {
            if self.sent > 0 {
                format!(" ({:.3}%)", 100.0 * n as f64 / self.sent as f64)
            } else {
                String::new()
            }
        };
        writeln!(f, "== loadgen summary ==")?;
        writeln!(f, "duration    {:>12.3} s", self.duration.as_secs_f64())?;
        writeln!(
            f,
            "sent        {:>12} readings in {} batches",
            self.sent, self.batches
        )?;
        writeln!(
            f,
            "accepted    {:>12} readings{}",
            self.accepted,
            share(self.accepted)
        )?;
        writeln!(
            f,
            "rejected    {:>12} readings{}",
            self.rejected,
            share(self.rejected)
        )?;
        writeln!(
            f,
            "failed      {:>12} readings{}",
            self.failed,
            share(self.failed)
        )?;
        match self.committed {
            Some(c) => writeln!(f, "committed   {c:>12} readings{}", share(c))?,
            None => writeln!(f, "committed   {:>12}", "unknown")?,
        }
        if let Some(n) = &self.notify {
            writeln!(
                f,
                "notified    {:>12} readings{}",
                n.notified,
                share(n.notified)
            )?;
            writeln!(
                f,
                "  repeats   {:>12} readings notified again (at-least-once delivery)",
                n.repeats
            )?;
            writeln!(
                f,
                "  missing   {:>12} accepted readings not notified at the end",
                n.missing
            )?;
            if n.ignored > 0 {
                writeln!(
                    f,
                    "  ignored   {:>12} events not from this run (other subscription, older readings)",
                    n.ignored
                )?;
            }
        }
        if self.in_flight_at_end > 0 {
            writeln!(
                f,
                "in flight   {:>12} batches abandoned at the end",
                self.in_flight_at_end
            )?;
        }
        writeln!(
            f,
            "throughput  {:>12.1} readings/s accepted, {:.1} batches/s (offered {:.1} readings/s)",
            self.readings_per_sec, self.batches_per_sec, self.offered_readings_per_sec
        )?;
        writeln!(f)?;
        write!(f, "{}", self.latency)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::recorder::LatencyRecorder;
    use crate::report::table::{
        SERIES_CORRECTED, SERIES_END_TO_END, SERIES_NOTIFIED, SERIES_SERVICE_TIME,
    };

    fn sample() -> Summary {
        let mut corrected = LatencyRecorder::new();
        let mut service = LatencyRecorder::new();
        for i in 1..=1_000u64 {
            corrected.record(Duration::from_micros(i * 37));
            service.record(Duration::from_micros(i * 11));
        }
        let counts = CountersSnapshot {
            sent: 100_000,
            accepted: 99_990,
            rejected: 10,
            failed: 0,
            batches: 1_000,
            committed: Some(99_000),
            in_flight: 0,
            notified: None,
        };
        let latency = LatencyReport::new()
            .with(SERIES_CORRECTED, corrected)
            .with(SERIES_SERVICE_TIME, service)
            .with(SERIES_END_TO_END, LatencyRecorder::new());
        let mut timeline = Timeline::new(true);
        timeline.offer(Duration::from_millis(500), 100_000);
        timeline.accept(Duration::from_millis(1_500), 99_990);
        timeline.commit(Duration::from_millis(2_500), 99_000);
        Summary::new(&counts, Duration::from_secs(10), latency).with_timeline(timeline)
    }

    #[test]
    fn throughput_is_computed_over_the_duration() {
        let s = sample();
        assert_eq!(s.offered_readings_per_sec, 10_000.0);
        assert_eq!(s.readings_per_sec, 9_999.0);
        assert_eq!(s.batches_per_sec, 100.0);
        let zero = Summary::new(
            &CountersSnapshot::default(),
            Duration::ZERO,
            LatencyReport::new(),
        );
        assert_eq!(zero.readings_per_sec, 0.0);
    }

    #[test]
    fn json_round_trip_preserves_everything() {
        let s = sample();
        let json = s.to_json().unwrap();
        let back = Summary::from_json(&json).unwrap();
        assert_eq!(back.sent, s.sent);
        assert_eq!(back.committed, Some(99_000));
        assert_eq!(back.duration, s.duration);
        // Histograms survive exactly, so a bench can re-plot or merge runs from the JSON.
        for (a, b) in back.latency.series().iter().zip(s.latency.series()) {
            assert_eq!(a.name(), b.name());
            assert_eq!(a.histogram(), b.histogram());
            assert_eq!(a.stats().count, b.stats().count);
            assert!((a.stats().p99_ms - b.stats().p99_ms).abs() < 1e-9);
        }
        // Stable field names for consumers that parse the JSON without this crate.
        let v: serde_json::Value = serde_json::from_str(&json).unwrap();
        assert_eq!(v["readings_per_sec"], 9_999.0);
        assert_eq!(v["latency"][0]["name"], SERIES_CORRECTED);
        assert!(v["latency"][0]["stats"]["p99_ms"].as_f64().unwrap() > 36.0);
        assert!(v["latency"][0]["histogram"]["v2_deflate_hex"].is_string());
        assert_eq!(back.timeline, s.timeline);
        // A summary from before the timeline existed still parses.
        let mut old = v.clone();
        old.as_object_mut().unwrap().remove("timeline");
        let back = Summary::from_json(&old.to_string()).unwrap();
        assert_eq!(back.timeline, Timeline::default());
    }

    #[test]
    fn display_prints_counts_rates_and_table() {
        let text = sample().to_string();
        for want in [
            "sent              100000 readings in 1000 batches",
            "accepted           99990 readings (99.990%)",
            "rejected              10 readings (0.010%)",
            "committed          99000 readings (99.000%)",
            "9999.0 readings/s accepted, 100.0 batches/s (offered 10000.0 readings/s)",
            SERIES_CORRECTED,
            SERIES_END_TO_END,
            "p99.9",
        ] {
            assert!(text.contains(want), "missing {want:?} in\n{text}");
        }
        assert!(!text.contains("in flight"), "no abandoned batches, no line");
        assert!(
            !text.contains("notified"),
            "no subscription, no notify lines"
        );
    }

    #[test]
    fn notify_counts_are_printed_and_written_only_when_the_run_subscribed() {
        let plain = sample();
        let v: serde_json::Value = serde_json::from_str(&plain.to_json().unwrap()).unwrap();
        assert!(
            v.get("notify").is_none(),
            "unchanged JSON without the feature"
        );

        let mut notified = LatencyRecorder::new();
        notified.record_n(Duration::from_millis(120), 98_000);
        let mut s = sample().with_notify(NotifySummary {
            notified: 98_000,
            repeats: 12,
            missing: 1_990,
            ignored: 0,
        });
        s.latency.push(SERIES_NOTIFIED, notified);
        let text = s.to_string();
        for want in [
            "notified           98000 readings (98.000%)",
            "  repeats             12 readings notified again",
            "  missing           1990 accepted readings not notified",
            SERIES_NOTIFIED,
        ] {
            assert!(text.contains(want), "missing {want:?} in\n{text}");
        }
        assert!(!text.contains("ignored"), "{text}");

        let json = s.to_json().unwrap();
        let v: serde_json::Value = serde_json::from_str(&json).unwrap();
        assert_eq!(
            v["notify"],
            serde_json::json!({"notified": 98_000, "repeats": 12, "missing": 1_990, "ignored": 0})
        );
        assert_eq!(v["latency"][3]["name"], SERIES_NOTIFIED);
        assert!(v["latency"][3]["stats"]["p999_ms"].as_f64().unwrap() > 119.0);
        assert_eq!(Summary::from_json(&json).unwrap().notify, s.notify);
    }
}
