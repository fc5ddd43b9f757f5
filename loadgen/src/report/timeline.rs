//! Readings per second of a run: offered, accepted and committed, for plotting the load shape
//! against what the system absorbed.

use std::fmt::Write as _;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Readings counted in one second of the run.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TimelineSecond {
    /// Readings whose batch was scheduled in this second (the offered load).
    pub offered: u64,
    /// Readings whose batch was answered with an accept in this second.
    pub accepted: u64,
    /// Readings whose commit receipt arrived in this second.
    pub committed: u64,
    /// Readings first notified by the router in this second.
    #[serde(default)]
    pub notified: u64,
}

/// Per-second counts from the start of the run (second 0 is [0 s, 1 s)).
///
/// Offered readings are counted at their batch's *intended* time, so the offered column is the
/// profile's shape even when sends fall behind; accepted and committed readings are counted when
/// the answer or receipt arrived, so lag and backlog show as a shift between the columns.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Timeline {
    seconds: Vec<TimelineSecond>,
    commits_known: bool,
    #[serde(default)]
    notifications_known: bool,
}

impl Timeline {
    /// An empty timeline. `commits_known` says whether the run observes commits; without it the
    /// committed column is left empty rather than shown as zeros.
    pub fn new(commits_known: bool) -> Self {
        Self {
            seconds: Vec::new(),
            commits_known,
            notifications_known: false,
        }
    }

    /// Counts `readings` offered at offset `at`.
    pub fn offer(&mut self, at: Duration, readings: u64) {
        self.second(at).offered += readings;
    }

    /// Counts `readings` accepted at offset `at`.
    pub fn accept(&mut self, at: Duration, readings: u64) {
        self.second(at).accepted += readings;
    }

    /// Counts `readings` committed at offset `at` (and marks commits as known).
    pub fn commit(&mut self, at: Duration, readings: u64) {
        self.commits_known = true;
        self.second(at).committed += readings;
    }

    /// Counts `readings` first notified at offset `at` (and marks notifications as known).
    pub fn notify(&mut self, at: Duration, readings: u64) {
        self.notifications_known = true;
        self.second(at).notified += readings;
    }

    /// Whether the committed column holds data.
    pub fn commits_known(&self) -> bool {
        self.commits_known
    }

    /// The seconds from 0 to the last one anything was counted in.
    pub fn seconds(&self) -> &[TimelineSecond] {
        &self.seconds
    }

    /// CSV with a header, one row per second: `second,offered,accepted,committed` and, when
    /// the run subscribed to notifications, `notified`; the committed field is empty when
    /// commits are unknown.
    pub fn to_csv(&self) -> String {
        let mut csv = String::from("second,offered,accepted,committed");
        if self.notifications_known {
            csv.push_str(",notified");
        }
        csv.push('\n');
        for (i, s) in self.seconds.iter().enumerate() {
            // Writing to a String cannot fail.
            let _ = write!(csv, "{i},{},{},", s.offered, s.accepted);
            if self.commits_known {
                let _ = write!(csv, "{}", s.committed);
            }
            if self.notifications_known {
                let _ = write!(csv, ",{}", s.notified);
            }
            csv.push('\n');
        }
        csv
    }

    fn second(&mut self, at: Duration) -> &mut TimelineSecond {
        let i = usize::try_from(at.as_secs()).unwrap_or(usize::MAX);
        if i >= self.seconds.len() {
            self.seconds
                .resize(i.saturating_add(1), TimelineSecond::default());
        }
        &mut self.seconds[i]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_land_in_their_second() {
        let mut t = Timeline::new(true);
        t.offer(Duration::from_millis(0), 100);
        t.offer(Duration::from_millis(999), 100);
        t.offer(Duration::from_millis(1_000), 50);
        t.accept(Duration::from_millis(1_500), 200);
        t.commit(Duration::from_millis(3_200), 150);
        assert_eq!(t.seconds().len(), 4);
        assert_eq!(t.seconds()[0].offered, 200);
        assert_eq!(t.seconds()[1].offered, 50);
        assert_eq!(t.seconds()[1].accepted, 200);
        assert_eq!(t.seconds()[2], TimelineSecond::default());
        assert_eq!(t.seconds()[3].committed, 150);
        assert_eq!(
            t.to_csv(),
            "second,offered,accepted,committed\n0,200,0,0\n1,50,200,0\n2,0,0,0\n3,0,0,150\n"
        );
    }

    #[test]
    fn notifications_add_their_column() {
        let mut t = Timeline::new(false);
        t.offer(Duration::from_millis(0), 7);
        t.notify(Duration::from_millis(1_500), 5);
        assert_eq!(
            t.to_csv(),
            "second,offered,accepted,committed,notified\n0,7,0,,0\n1,0,0,,5\n"
        );
    }

    #[test]
    fn unknown_commits_leave_the_column_empty() {
        let mut t = Timeline::new(false);
        t.offer(Duration::from_millis(10), 7);
        t.accept(Duration::from_millis(20), 7);
        assert!(!t.commits_known());
        assert_eq!(t.to_csv(), "second,offered,accepted,committed\n0,7,7,\n");
        assert_eq!(
            Timeline::default().to_csv(),
            "second,offered,accepted,committed\n"
        );
    }
}
