//! Live counters shared with the sender tasks, and the one-line progress display.

use std::fmt::Write as _;
use std::io::IsTerminal;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde::{Deserialize, Serialize};

/// Run counters, shared (`Arc<Counters>`) between the sender tasks and the reporter.
///
/// Each counter is an independent statistic, so `Ordering::Relaxed` is enough for both updates
/// and [`snapshot`](Counters::snapshot); a snapshot is not one atomic cut across counters, which
/// is fine for progress and for the final summary taken after the senders have stopped.
#[derive(Debug, Default)]
pub struct Counters {
    /// Readings sent.
    pub sent: AtomicU64,
    /// Readings the ingest front end accepted.
    pub accepted: AtomicU64,
    /// Readings answered with a rejection.
    pub rejected: AtomicU64,
    /// Readings whose request failed without an answer.
    pub failed: AtomicU64,
    /// Batches (requests) sent.
    pub batches: AtomicU64,
    /// Readings confirmed committed to storage. Update it with
    /// [`set_committed`](Counters::set_committed), which also marks it as known.
    pub committed: AtomicU64,
    /// Whether anything reports commits; the display leaves `committed` out until it does.
    pub committed_known: AtomicBool,
    /// Batches sent and not yet answered: increment before the send, decrement on the answer.
    pub in_flight: AtomicU64,
}

impl Counters {
    /// All counters at zero, commits unknown.
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets the committed total (it only grows: a stale, lower report is ignored) and marks
    /// commits as known.
    pub fn set_committed(&self, total: u64) {
        self.committed.fetch_max(total, Ordering::Relaxed);
        self.committed_known.store(true, Ordering::Relaxed);
    }

    /// Reads every counter.
    pub fn snapshot(&self) -> CountersSnapshot {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        CountersSnapshot {
            sent: get(&self.sent),
            accepted: get(&self.accepted),
            rejected: get(&self.rejected),
            failed: get(&self.failed),
            batches: get(&self.batches),
            committed: self
                .committed_known
                .load(Ordering::Relaxed)
                .then(|| get(&self.committed)),
            in_flight: get(&self.in_flight),
            notified: None,
        }
    }
}

/// Plain values of [`Counters`] at one moment.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CountersSnapshot {
    /// Readings sent.
    pub sent: u64,
    /// Readings accepted.
    pub accepted: u64,
    /// Readings rejected.
    pub rejected: u64,
    /// Readings failed.
    pub failed: u64,
    /// Batches sent.
    pub batches: u64,
    /// Readings committed, `None` while nothing reports commits.
    pub committed: Option<u64>,
    /// Batches awaiting an answer.
    pub in_flight: u64,
    /// Distinct readings notified by the router, `None` unless the run subscribes
    /// (filled from the notification receiver, not from [`Counters`]).
    #[serde(default)]
    pub notified: Option<u64>,
}

/// How often the plain (non-terminal) display prints a line.
const PLAIN_EVERY: Duration = Duration::from_secs(5);
/// The window the current send rate is measured over.
const RATE_WINDOW: Duration = Duration::from_secs(1);
/// Redraw interval of the spinner, independent of how often `update` is called.
const TICK: Duration = Duration::from_millis(120);

/// Bar layouts: against a reading total, against a run duration, or open-ended.
const TEMPLATE_TOTAL: &str =
    "{spinner} [{elapsed_precise}] [{bar:30}] {pos}/{len} (eta {eta}) {msg}";
const TEMPLATE_DURATION: &str = "{spinner} [{elapsed_precise} / {prefix}] [{bar:30}] {msg}";
const TEMPLATE_OPEN: &str = "{spinner} [{elapsed_precise}] {msg}";

/// The live progress line on stderr.
///
/// On a terminal it is an indicatif bar (readings sent against `total`, or time against
/// `duration`, or a spinner when neither is known) followed by the counters. When stderr is not
/// a terminal (CI, `2> log`) it prints a plain line every 5 s instead, so logs stay readable.
/// Call [`update`](Progress::update) with a fresh snapshot a few times a second and
/// [`finish`](Progress::finish) once at the end.
#[derive(Debug)]
pub struct Progress {
    output: Output,
    start: Instant,
    total: Option<u64>,
    rate: RateMeter,
    last: CountersSnapshot,
}

#[derive(Debug)]
enum Output {
    Bar { bar: ProgressBar, by: BarUnit },
    Plain { next_print: Instant },
    Hidden,
}

/// What the bar's position counts.
#[derive(Debug, Clone, Copy)]
enum BarUnit {
    Readings,
    Millis,
    None,
}

impl Progress {
    /// A display for a run that ends after `total` readings or after `duration` (either may be
    /// unknown). Draws on stderr if it is a terminal, else prints plain lines.
    pub fn new(total: Option<u64>, duration: Option<Duration>) -> Self {
        let now = Instant::now();
        let output = if std::io::stderr().is_terminal() {
            bar_output(total, duration)
        } else {
            Output::Plain {
                next_print: now + PLAIN_EVERY,
            }
        };
        Self::with_output(output, total, now)
    }

    /// A display that shows nothing (`--quiet`, tests); it still tracks the rate.
    pub fn hidden() -> Self {
        Self::with_output(Output::Hidden, None, Instant::now())
    }

    fn with_output(output: Output, total: Option<u64>, start: Instant) -> Self {
        Self {
            output,
            start,
            total,
            rate: RateMeter::new(start),
            last: CountersSnapshot::default(),
        }
    }

    /// Shows a new snapshot.
    pub fn update(&mut self, snapshot: &CountersSnapshot) {
        self.update_at(snapshot, Instant::now());
    }

    fn update_at(&mut self, snapshot: &CountersSnapshot, now: Instant) {
        self.last = *snapshot;
        let rate = self.rate.observe(now, snapshot.sent);
        let elapsed = now.saturating_duration_since(self.start);
        match &mut self.output {
            Output::Bar { bar, by } => {
                match by {
                    BarUnit::Readings => bar.set_position(snapshot.sent),
                    BarUnit::Millis => bar.set_position(millis(elapsed)),
                    BarUnit::None => {}
                }
                bar.set_message(status(snapshot, rate));
            }
            Output::Plain { next_print } => {
                if now >= *next_print {
                    *next_print = now + PLAIN_EVERY;
                    eprintln!("{}", plain_line(elapsed, self.total, snapshot, rate));
                }
            }
            Output::Hidden => {}
        }
    }

    /// The current send rate in readings/s (over the last second, or since the start before the
    /// first full second).
    pub fn rate(&self) -> f64 {
        self.rate.rate
    }

    /// Ends the display: the bar stays on screen with its last values; the plain display prints
    /// a final line.
    pub fn finish(&mut self) {
        let now = Instant::now();
        let elapsed = now.saturating_duration_since(self.start);
        match &mut self.output {
            Output::Bar { bar, .. } => bar.finish(),
            Output::Plain { .. } => {
                eprintln!(
                    "{}",
                    plain_line(elapsed, self.total, &self.last, self.rate.rate)
                );
            }
            Output::Hidden => {}
        }
        self.output = Output::Hidden;
    }
}

fn bar_output(total: Option<u64>, duration: Option<Duration>) -> Output {
    let (bar, by, template) = match (total, duration) {
        (Some(n), _) => (
            ProgressBar::with_draw_target(Some(n), ProgressDrawTarget::stderr()),
            BarUnit::Readings,
            TEMPLATE_TOTAL,
        ),
        (None, Some(d)) => (
            ProgressBar::with_draw_target(Some(millis(d)), ProgressDrawTarget::stderr())
                .with_prefix(clock(d)),
            BarUnit::Millis,
            TEMPLATE_DURATION,
        ),
        (None, None) => (
            ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr()),
            BarUnit::None,
            TEMPLATE_OPEN,
        ),
    };
    // The templates are constants; fall back to the default look rather than fail a run.
    let style = ProgressStyle::with_template(template)
        .unwrap_or_else(|_| ProgressStyle::default_spinner())
        .progress_chars("=> ");
    bar.set_style(style);
    bar.enable_steady_tick(TICK);
    Output::Bar { bar, by }
}

/// The counters part of the line: `sent 1200 | accepted 1190 | rejected 0 | ...`.
fn status(s: &CountersSnapshot, rate: f64) -> String {
    let mut line = format!(
        "sent {} | accepted {} | rejected {} | failed {} | {:.0}/s | in-flight {}",
        s.sent, s.accepted, s.rejected, s.failed, rate, s.in_flight
    );
    if let Some(c) = s.committed {
        let _ = write!(line, " | committed {c}");
    }
    if let Some(n) = s.notified {
        let _ = write!(line, " | notified {n}");
    }
    line
}

/// A self-contained line for logs: elapsed time, progress against the total, then the counters.
fn plain_line(elapsed: Duration, total: Option<u64>, s: &CountersSnapshot, rate: f64) -> String {
    let mut line = format!("loadgen [{}]", clock(elapsed));
    if let Some(n) = total.filter(|n| *n > 0) {
        let _ = write!(line, " {:.1}%", 100.0 * s.sent as f64 / n as f64);
    }
    let _ = write!(line, " {}", status(s, rate));
    line
}

/// `HH:MM:SS`, like indicatif's `elapsed_precise`.
fn clock(d: Duration) -> String {
    let s = d.as_secs();
    format!("{:02}:{:02}:{:02}", s / 3_600, s / 60 % 60, s % 60)
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// Send rate over a sliding one-second window.
#[derive(Debug)]
struct RateMeter {
    start: Instant,
    window_start: Instant,
    window_sent: u64,
    full_window_seen: bool,
    rate: f64,
}

impl RateMeter {
    fn new(start: Instant) -> Self {
        Self {
            start,
            window_start: start,
            window_sent: 0,
            full_window_seen: false,
            rate: 0.0,
        }
    }

    fn observe(&mut self, now: Instant, sent: u64) -> f64 {
        let window = now.saturating_duration_since(self.window_start);
        if window >= RATE_WINDOW {
            let delta = sent.saturating_sub(self.window_sent);
            self.rate = delta as f64 / window.as_secs_f64();
            self.window_start = now;
            self.window_sent = sent;
            self.full_window_seen = true;
        } else if !self.full_window_seen {
            let since_start = now.saturating_duration_since(self.start).as_secs_f64();
            if since_start > 0.0 {
                self.rate = sent as f64 / since_start;
            }
        }
        self.rate
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::thread;

    use super::*;

    #[test]
    fn snapshot_reads_concurrent_updates() {
        let counters = Arc::new(Counters::new());
        let workers: Vec<_> = (0..4)
            .map(|_| {
                let c = Arc::clone(&counters);
                thread::spawn(move || {
                    for _ in 0..1_000 {
                        c.in_flight.fetch_add(1, Ordering::Relaxed);
                        c.sent.fetch_add(10, Ordering::Relaxed);
                        c.batches.fetch_add(1, Ordering::Relaxed);
                        c.accepted.fetch_add(9, Ordering::Relaxed);
                        c.rejected.fetch_add(1, Ordering::Relaxed);
                        c.in_flight.fetch_sub(1, Ordering::Relaxed);
                    }
                })
            })
            .collect();
        for w in workers {
            w.join().unwrap();
        }
        let s = counters.snapshot();
        assert_eq!(
            s,
            CountersSnapshot {
                sent: 40_000,
                accepted: 36_000,
                rejected: 4_000,
                failed: 0,
                batches: 4_000,
                committed: None,
                in_flight: 0,
                notified: None,
            }
        );
    }

    #[test]
    fn committed_is_unknown_until_reported_and_never_goes_back() {
        let c = Counters::new();
        assert_eq!(c.snapshot().committed, None);
        c.set_committed(500);
        c.set_committed(300);
        assert_eq!(c.snapshot().committed, Some(500));
    }

    #[test]
    fn rate_uses_the_last_full_second() {
        let t0 = Instant::now();
        let mut p = Progress::with_output(Output::Hidden, None, t0);
        let snap = |sent| CountersSnapshot {
            sent,
            ..Default::default()
        };
        // Before the first full window: average since the start.
        p.update_at(&snap(500), t0 + Duration::from_millis(500));
        assert_eq!(p.rate(), 1_000.0);
        // First full window: 2 000 readings in 1 s.
        p.update_at(&snap(2_000), t0 + Duration::from_secs(1));
        assert_eq!(p.rate(), 2_000.0);
        // Mid-window updates keep the last full-window figure...
        p.update_at(&snap(2_100), t0 + Duration::from_millis(1_500));
        assert_eq!(p.rate(), 2_000.0);
        // ...until the next window closes: 500 readings in 1 s.
        p.update_at(&snap(2_500), t0 + Duration::from_secs(2));
        assert_eq!(p.rate(), 500.0);
    }

    #[test]
    fn lines_show_every_counter_and_committed_and_notified_only_when_known() {
        let mut s = CountersSnapshot {
            sent: 1_200,
            accepted: 1_190,
            rejected: 7,
            failed: 3,
            batches: 12,
            committed: None,
            in_flight: 4,
            notified: None,
        };
        let line = status(&s, 1_234.4);
        assert_eq!(
            line,
            "sent 1200 | accepted 1190 | rejected 7 | failed 3 | 1234/s | in-flight 4"
        );
        s.committed = Some(1_100);
        assert!(status(&s, 0.0).ends_with(" | committed 1100"));
        s.notified = Some(1_050);
        assert!(status(&s, 0.0).ends_with(" | committed 1100 | notified 1050"));
        s.notified = None;

        let plain = plain_line(Duration::from_secs(3_725), Some(2_400), &s, 0.0);
        assert!(
            plain.starts_with("loadgen [01:02:05] 50.0% sent 1200"),
            "{plain}"
        );
        let open_ended = plain_line(Duration::from_secs(5), None, &s, 0.0);
        assert!(
            open_ended.starts_with("loadgen [00:00:05] sent 1200"),
            "{open_ended}"
        );
    }

    #[test]
    fn hidden_progress_accepts_updates_and_finish() {
        let mut p = Progress::hidden();
        p.update(&CountersSnapshot::default());
        p.finish();
        p.finish();
    }

    #[test]
    fn bar_templates_parse() {
        // Templates are parsed at run time; a typo would silently fall back to the default look.
        for t in [TEMPLATE_TOTAL, TEMPLATE_DURATION, TEMPLATE_OPEN] {
            assert!(ProgressStyle::with_template(t).is_ok(), "{t}");
        }
    }
}
