//! The autoscaling policy of a pool (TR 103 527 clauses 5.2 and 5.5: between a minimum and
//! a maximum, add a predefined increment while needed, release it when not).
//!
//! This module owns only the decision: [`Autoscaler::decide`] takes a [`Sample`] of the
//! pool (partition backlog, deliveries processed, worker busy time) and returns a
//! [`Decision`] with its reason. The pool samples, applies and logs (see `pool`), so the
//! policy is a pure function of its inputs and its own memory, tested here without a broker.
//!
//! How it avoids the over-scaling and flapping operators of KEDA/HPA report:
//! - **Up** by `step` while the target is missed, at most once per `interval`, and only
//!   while the workers are actually busy (`min_busy`): a backlog that idle workers do not
//!   drain is a downstream bottleneck (commit, sink), and more workers would not help.
//! - **Down** only after the target has been met *with `step` fewer workers* for a whole
//!   `cooldown` (a stabilisation window), and never within `cooldown` of any change; then
//!   straight to the most workers the target asked for in two consecutive samples of that
//!   window (at least a step down, never below `min`), so an idle pool is back at its
//!   floor one cooldown after the load went, and the last sample of a draining backlog
//!   does not hold workers for another cooldown. The "with fewer workers" margin is the hysteresis; the window is what
//!   stops flapping.

use std::time::{Duration, Instant};

/// What the autoscaler keeps the pool at.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Target {
    /// Ready messages across the pool's partition queues per worker (like KEDA's
    /// `QueueLength`).
    BacklogPerWorker(u64),
    /// Time to drain the backlog at the current processing rate.
    DrainTime(Duration),
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::BacklogPerWorker(n) => write!(f, "backlog:{n}"),
            Self::DrainTime(d) => write!(f, "drain:{}", humantime::format_duration(*d)),
        }
    }
}

/// Parse error of a [`Target`].
#[derive(Debug, thiserror::Error)]
#[error(
    "autoscale target must be `backlog:<messages per worker>` or `drain:<duration>`, got {0:?}"
)]
pub struct TargetParseError(String);

impl std::str::FromStr for Target {
    type Err = TargetParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || TargetParseError(s.to_owned());
        match s.trim().split_once(':') {
            Some(("backlog", n)) => n
                .trim()
                .parse()
                .ok()
                .filter(|n| *n > 0)
                .map(Self::BacklogPerWorker)
                .ok_or_else(err),
            Some(("drain", d)) => humantime::parse_duration(d.trim())
                .ok()
                .filter(|d| !d.is_zero())
                .map(Self::DrainTime)
                .ok_or_else(err),
            _ => Err(err()),
        }
    }
}

/// Settings of the autoscaler.
#[derive(Clone, Debug, PartialEq)]
pub struct AutoscaleConfig {
    /// Fewest workers.
    pub min: usize,
    /// Most workers.
    pub max: usize,
    /// Workers added or released per decision.
    pub step: usize,
    /// No scale-down within this long of any change, and only after the target has been met
    /// with `step` fewer workers for this long.
    pub cooldown: Duration,
    /// How often the pool is sampled; also the least time between two scale-ups, so that a
    /// step shows its effect before the next.
    pub interval: Duration,
    /// What to keep the pool at.
    pub target: Target,
    /// Scale up only while the workers were busy at least this fraction of the last
    /// interval (0 to 1).
    pub min_busy: f64,
}

impl Default for AutoscaleConfig {
    fn default() -> Self {
        Self {
            min: 1,
            max: 8,
            step: 1,
            cooldown: Duration::from_secs(60),
            interval: Duration::from_secs(5),
            target: Target::BacklogPerWorker(1000),
            min_busy: 0.5,
        }
    }
}

impl AutoscaleConfig {
    /// Bounds put in order: `1 <= min <= max`, `step >= 1`, `min_busy` in `0..=1`.
    pub fn normalized(mut self) -> Self {
        self.min = self.min.max(1);
        self.max = self.max.max(self.min);
        self.step = self.step.max(1);
        self.min_busy = self.min_busy.clamp(0.0, 1.0);
        self
    }
}

/// What the pool looked like at one instant. Counters are cumulative; the autoscaler takes
/// differences between consecutive samples.
#[derive(Clone, Copy, Debug)]
pub struct Sample {
    /// When it was taken.
    pub at: Instant,
    /// Ready (not yet delivered) messages over the pool's partition queues.
    pub backlog: u64,
    /// Deliveries staged by the workers so far.
    pub processed: u64,
    /// Time the workers spent staging so far, summed over workers.
    pub busy: Duration,
    /// Workers running.
    pub workers: usize,
}

/// Why the autoscaler did what it did; the label of its metric.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reason {
    /// Backlog over target and the workers busy: scaled up.
    BacklogAboveTarget,
    /// Target met with fewer workers for a whole cooldown: scaled down.
    BacklogBelowTarget,
    /// Outside `min..=max` (e.g. after a manual change of the bounds): brought back.
    OutOfBounds,
    /// Target met; nothing to do.
    Steady,
    /// More workers wanted, but the maximum is reached.
    AtMax,
    /// Fewer workers would do, but the minimum is reached.
    AtMin,
    /// More workers wanted, but the workers are mostly idle: the bottleneck is downstream.
    WorkersIdle,
    /// A change is due but the last one was too recent.
    Cooldown,
    /// Fewer workers would do, but not yet for a whole cooldown.
    Stabilizing,
    /// First sample: nothing to compare with yet.
    Warmup,
}

impl Reason {
    /// Stable label for logs and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::BacklogAboveTarget => "backlog_above_target",
            Self::BacklogBelowTarget => "backlog_below_target",
            Self::OutOfBounds => "out_of_bounds",
            Self::Steady => "steady",
            Self::AtMax => "at_max",
            Self::AtMin => "at_min",
            Self::WorkersIdle => "workers_idle",
            Self::Cooldown => "cooldown",
            Self::Stabilizing => "stabilizing",
            Self::Warmup => "warmup",
        }
    }
}

/// One decision: the worker count to run and why, with the figures it was based on.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Decision {
    /// Workers before.
    pub from: usize,
    /// Workers to run.
    pub to: usize,
    /// Why.
    pub reason: Reason,
    /// Workers the target asks for (clamped to `min..=max`).
    pub wanted: usize,
    /// Backlog of the sample.
    pub backlog: u64,
    /// Deliveries per second over the last interval.
    pub rate: f64,
    /// Fraction of the last interval the workers were busy.
    pub busy: f64,
}

impl Decision {
    /// Whether the worker count changes.
    pub fn is_change(&self) -> bool {
        self.from != self.to
    }
}

/// The policy and its memory.
#[derive(Debug)]
pub struct Autoscaler {
    cfg: AutoscaleConfig,
    last: Option<Sample>,
    last_change: Option<Instant>,
    last_up: Option<Instant>,
    /// Since when fewer workers would have met the target.
    low_since: Option<Instant>,
    /// The most workers the target asked for in two consecutive samples since
    /// `low_since`.
    low_peak: usize,
    /// What the previous sample of the window asked for.
    low_prev: Option<usize>,
}

impl Autoscaler {
    /// A policy with no history.
    pub fn new(cfg: AutoscaleConfig) -> Self {
        Self {
            cfg: cfg.normalized(),
            last: None,
            last_change: None,
            last_up: None,
            low_since: None,
            low_peak: 0,
            low_prev: None,
        }
    }

    /// Its settings.
    pub fn config(&self) -> &AutoscaleConfig {
        &self.cfg
    }

    /// Forgets the history, e.g. after the workers were set by hand.
    pub fn reset(&mut self) {
        self.last = None;
        self.low_since = None;
        self.low_peak = 0;
        self.low_prev = None;
    }

    /// Decides the worker count for `now`. The caller applies `to`.
    pub fn decide(&mut self, now: Sample) -> Decision {
        let cfg = &self.cfg;
        let n = now.workers;
        let prev = self.last.replace(now);
        let (rate, busy) = match prev {
            Some(p) if now.at > p.at => {
                let dt = (now.at - p.at).as_secs_f64();
                let rate = now.processed.saturating_sub(p.processed) as f64 / dt;
                let busy = now.busy.saturating_sub(p.busy).as_secs_f64() / (dt * n.max(1) as f64);
                (rate, busy.clamp(0.0, 1.0))
            }
            _ => (0.0, 0.0),
        };
        // Unclamped, so that "fewer would do" is seen at the minimum too (and reported).
        let raw = self.wanted_raw(now.backlog, rate, n);
        let wanted = raw.clamp(cfg.min, cfg.max);
        let mut d = Decision {
            from: n,
            to: n,
            reason: Reason::Steady,
            wanted,
            backlog: now.backlog,
            rate,
            busy,
        };
        let since =
            |t: Option<Instant>| t.map_or(Duration::MAX, |t| now.at.saturating_duration_since(t));

        if n < cfg.min || n > cfg.max {
            d.to = n.clamp(cfg.min, cfg.max);
            d.reason = Reason::OutOfBounds;
        } else if prev.is_none() {
            d.reason = Reason::Warmup;
        } else if raw > n {
            self.low_since = None;
            self.low_peak = 0;
            self.low_prev = None;
            if n >= cfg.max {
                d.reason = Reason::AtMax;
            } else if busy < cfg.min_busy {
                d.reason = Reason::WorkersIdle;
            } else if since(self.last_up) < cfg.interval {
                d.reason = Reason::Cooldown;
            } else {
                d.to = (n + cfg.step).min(cfg.max);
                d.reason = Reason::BacklogAboveTarget;
            }
        } else if raw + cfg.step <= n {
            // The target would still be met with a step fewer: the hysteresis margin.
            let low_since = *self.low_since.get_or_insert(now.at);
            // A backlog gone by the next sample did not need workers (the tail of a drain):
            // the peak counts what two consecutive samples both asked for.
            if let Some(prev) = self.low_prev.replace(raw) {
                self.low_peak = self.low_peak.max(prev.min(raw));
            }
            if n <= cfg.min {
                d.reason = Reason::AtMin;
            } else if now.at.saturating_duration_since(low_since) < cfg.cooldown {
                d.reason = Reason::Stabilizing;
            } else if since(self.last_change) < cfg.cooldown {
                d.reason = Reason::Cooldown;
            } else {
                // Release at once what the whole window did without (HPA's stabilisation
                // rule), so the pool is back at its floor one cooldown after the load went.
                d.to = self.low_peak.min(n.saturating_sub(cfg.step)).max(cfg.min);
                d.reason = Reason::BacklogBelowTarget;
            }
        } else {
            self.low_since = None;
            self.low_peak = 0;
            self.low_prev = None;
        }

        if d.is_change() {
            self.last_change = Some(now.at);
            if d.to > n {
                self.last_up = Some(now.at);
            } else {
                // A new stabilisation window for the next step down.
                self.low_since = None;
                self.low_peak = 0;
                self.low_prev = None;
            }
        }
        d
    }

    /// Workers the target asks for, before the bounds.
    fn wanted_raw(&self, backlog: u64, rate: f64, workers: usize) -> usize {
        let cfg = &self.cfg;
        match cfg.target {
            Target::BacklogPerWorker(per) => backlog.div_ceil(per.max(1)) as usize,
            Target::DrainTime(target) => {
                if backlog == 0 {
                    0
                } else if rate <= 0.0 {
                    // A backlog and nothing processed: no rate to size by; ask for one step.
                    workers + cfg.step
                } else {
                    // Processing rate is taken to grow with workers.
                    let drain = backlog as f64 / rate;
                    (workers as f64 * drain / target.as_secs_f64()).ceil() as usize
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> AutoscaleConfig {
        AutoscaleConfig {
            min: 1,
            max: 4,
            step: 1,
            cooldown: Duration::from_secs(30),
            interval: Duration::from_secs(5),
            target: Target::BacklogPerWorker(100),
            min_busy: 0.5,
        }
    }

    /// Drives an autoscaler with a sample every 5 s; `backlog(t_secs)` and busy fraction.
    struct Sim {
        a: Autoscaler,
        t0: Instant,
        t: Duration,
        workers: usize,
        processed: u64,
        busy: Duration,
        decisions: Vec<Decision>,
    }

    impl Sim {
        fn new(cfg: AutoscaleConfig, workers: usize) -> Self {
            Self {
                a: Autoscaler::new(cfg),
                t0: Instant::now(),
                t: Duration::ZERO,
                workers,
                processed: 0,
                busy: Duration::ZERO,
                decisions: Vec::new(),
            }
        }

        fn tick(&mut self, backlog: u64, busy_fraction: f64) -> Decision {
            let dt = Duration::from_secs(5);
            self.t += dt;
            self.processed += 500;
            self.busy += dt.mul_f64(busy_fraction * self.workers as f64);
            let d = self.a.decide(Sample {
                at: self.t0 + self.t,
                backlog,
                processed: self.processed,
                busy: self.busy,
                workers: self.workers,
            });
            self.workers = d.to;
            self.decisions.push(d);
            d
        }
    }

    #[test]
    fn targets_parse_and_print() {
        assert_eq!(
            "backlog:500".parse::<Target>().unwrap(),
            Target::BacklogPerWorker(500)
        );
        assert_eq!(
            "drain:30s".parse::<Target>().unwrap(),
            Target::DrainTime(Duration::from_secs(30))
        );
        for bad in ["", "backlog:0", "backlog:x", "drain:0s", "lag:3", "500"] {
            assert!(bad.parse::<Target>().is_err(), "{bad:?}");
        }
        assert_eq!(Target::BacklogPerWorker(7).to_string(), "backlog:7");
        assert_eq!(
            Target::DrainTime(Duration::from_secs(90)).to_string(),
            "drain:1m 30s"
        );
    }

    #[test]
    fn scales_up_a_step_per_interval_while_busy_and_never_past_max() {
        let mut s = Sim::new(cfg(), 1);
        assert_eq!(s.tick(10_000, 1.0).reason, Reason::Warmup);
        let mut seen = vec![];
        for _ in 0..6 {
            let d = s.tick(10_000, 1.0);
            seen.push(d.to);
        }
        assert_eq!(seen, vec![2, 3, 4, 4, 4, 4]);
        assert_eq!(s.decisions.last().unwrap().reason, Reason::AtMax);
        assert!(s.decisions.iter().all(|d| d.to <= 4 && d.to >= 1));
    }

    #[test]
    fn idle_workers_with_a_backlog_do_not_scale_up() {
        let mut s = Sim::new(cfg(), 1);
        s.tick(10_000, 0.1);
        let d = s.tick(10_000, 0.1);
        assert_eq!((d.to, d.reason), (1, Reason::WorkersIdle));
    }

    #[test]
    fn scales_down_only_after_a_whole_cooldown_of_low_backlog_and_never_below_min() {
        let mut s = Sim::new(cfg(), 4);
        s.tick(0, 0.0); // warmup
        // 30 s cooldown at 5 s samples: stabilising for 6 samples, then straight to min.
        let tos: Vec<usize> = (0..30).map(|_| s.tick(0, 0.0).to).collect();
        let first_down = tos.iter().position(|&n| n < 4).unwrap();
        assert_eq!(first_down, 6, "{tos:?}");
        assert_eq!(tos[first_down], 1, "{tos:?}");
        assert_eq!(s.decisions.iter().filter(|d| d.is_change()).count(), 1);
        assert!(tos.iter().all(|&n| n >= 1));
        assert_eq!(s.decisions.last().unwrap().reason, Reason::AtMin);
    }

    #[test]
    fn scaling_down_keeps_what_the_window_needed_at_its_peak() {
        // A backlog of 150 (2 workers at 100 each) held for two samples, then nothing:
        // after the window, down to 2, not to 1.
        let mut s = Sim::new(cfg(), 4);
        s.tick(0, 0.0); // warmup
        let tos: Vec<usize> = [150, 150, 0, 0, 0, 0, 0]
            .into_iter()
            .map(|b| s.tick(b, 0.0).to)
            .collect();
        assert_eq!(*tos.last().unwrap(), 2, "{tos:?}");
    }

    #[test]
    fn the_tail_of_a_drain_does_not_hold_workers() {
        // One sample of 250 as the backlog drains, then nothing: straight to min.
        let mut s = Sim::new(cfg(), 4);
        s.tick(0, 0.0); // warmup
        let tos: Vec<usize> = [250, 0, 0, 0, 0, 0, 0]
            .into_iter()
            .map(|b| s.tick(b, 0.0).to)
            .collect();
        assert_eq!(*tos.last().unwrap(), 1, "{tos:?}");
    }

    #[test]
    fn a_steady_load_near_the_threshold_does_not_flap() {
        // 2 workers, target 100/worker: a backlog wobbling between 110 and 190 wants 2
        // workers; 1 worker would not meet it, so there is no reason to move either way.
        let mut s = Sim::new(cfg(), 2);
        for i in 0..200 {
            s.tick(110 + (i * 37) % 80, 0.9);
        }
        assert!(
            s.decisions.iter().all(|d| !d.is_change()),
            "{:?}",
            s.decisions
        );
    }

    #[test]
    fn an_oscillating_load_changes_direction_at_most_once_per_cooldown() {
        // Backlog alternating every 60 s between high and nothing.
        let mut s = Sim::new(cfg(), 1);
        for i in 0..240 {
            let high = (i / 12) % 2 == 0;
            s.tick(if high { 1000 } else { 0 }, 1.0);
        }
        let dirs: Vec<(usize, bool)> = s
            .decisions
            .iter()
            .enumerate()
            .filter(|(_, d)| d.is_change())
            .map(|(i, d)| (i, d.to > d.from))
            .collect();
        let reversals: Vec<usize> = dirs
            .windows(2)
            .filter(|w| w[0].1 != w[1].1)
            .map(|w| w[1].0)
            .collect();
        // Samples are 5 s apart and the cooldown 30 s: reversals at least 6 samples apart.
        assert!(reversals.len() >= 10, "{dirs:?}");
        assert!(
            reversals.windows(2).all(|w| w[1] - w[0] >= 6),
            "{reversals:?}"
        );
    }

    #[test]
    fn drain_time_target_sizes_by_the_processing_rate() {
        let a = Autoscaler::new(AutoscaleConfig {
            target: Target::DrainTime(Duration::from_secs(10)),
            max: 16,
            ..cfg()
        });
        // 2 workers processing 100/s; backlog 4000 drains in 40 s, 4× the target → 8.
        assert_eq!(a.wanted_raw(4000, 100.0, 2), 8);
        assert_eq!(a.wanted_raw(0, 100.0, 2), 0);
        assert_eq!(a.wanted_raw(100, 0.0, 2), 3);
    }

    #[test]
    fn out_of_bounds_counts_are_brought_back_at_once() {
        let mut s = Sim::new(cfg(), 9);
        let d = s.tick(0, 0.0);
        assert_eq!((d.to, d.reason), (4, Reason::OutOfBounds));
    }
}
