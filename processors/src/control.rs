//! Live control of a running pool: how many workers, and whether the autoscaler decides.
//!
//! A [`PoolControl`] is a cheap handle shared by the pool and whoever steers it (the admin
//! HTTP endpoint, tests). Setting a count by hand *pins* it: the autoscaler stops deciding
//! until it is resumed, so an operator's choice is never undone behind their back (as
//! KEDA's "paused replicas" does). The pool applies requests and reports back what runs.

use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::autoscale::{AutoscaleConfig, Decision};
use crate::health::SinkHealth;
use crate::workers::MAX_WORKERS;

/// Who decides the worker count.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// The count was set (at start or by hand) and stays.
    Manual,
    /// The autoscaler decides within its bounds.
    Auto,
}

/// What the pool asks its supervisor to run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Desired {
    pub(crate) workers: usize,
    pub(crate) mode: Mode,
}

/// The autoscaler's settings as shown to operators.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct AutoscaleView {
    /// Fewest workers.
    pub min: usize,
    /// Most workers.
    pub max: usize,
    /// Workers added or released per decision.
    pub step: usize,
    /// Cooldown, humanised (`1m`).
    pub cooldown: String,
    /// Target, e.g. `backlog:1000` or `drain:30s`.
    pub target: String,
}

/// The last autoscaling decision, as shown to operators.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct DecisionView {
    /// Workers before.
    pub from: usize,
    /// Workers after.
    pub to: usize,
    /// Why (stable label).
    pub reason: String,
    /// Workers the target asked for.
    pub wanted: usize,
    /// Ready messages over the partitions.
    pub backlog: u64,
    /// Deliveries per second.
    pub rate: f64,
    /// Fraction of the interval the workers were busy.
    pub busy: f64,
}

impl From<&Decision> for DecisionView {
    fn from(d: &Decision) -> Self {
        Self {
            from: d.from,
            to: d.to,
            reason: d.reason.as_str().to_owned(),
            wanted: d.wanted,
            backlog: d.backlog,
            rate: d.rate,
            busy: d.busy,
        }
    }
}

/// The pool's worker state, as `GET /v1/workers` returns it.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct WorkersStatus {
    /// Consumer group of the pool.
    pub group: String,
    /// Workers running now.
    pub workers: usize,
    /// Workers asked for (equal to `workers` once applied).
    pub desired: usize,
    /// Who decides.
    pub mode: Mode,
    /// The autoscaler's settings, when it is configured.
    pub autoscale: Option<AutoscaleView>,
    /// Its last decision that changed the count or was taken while in `auto`.
    pub last_decision: Option<DecisionView>,
}

/// A request the pool refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ControlError {
    /// The count is outside `1..=MAX_WORKERS`.
    #[error("workers must be between 1 and {MAX_WORKERS}, got {0}")]
    OutOfRange(usize),
    /// `auto` asked of a pool started without an autoscaler.
    #[error("this pool has no autoscaler (start it with --autoscale)")]
    NoAutoscaler,
    /// The pool has stopped.
    #[error("the pool is not running")]
    Stopped,
}

/// Handle on a pool's worker count. Clone it freely.
#[derive(Clone, Debug)]
pub struct PoolControl {
    desired: watch::Sender<Desired>,
    status: Arc<Mutex<WorkersStatus>>,
    autoscale: Option<AutoscaleConfig>,
    sinks: SinkHealth,
}

impl PoolControl {
    /// Control of a pool of `group` starting with `workers` workers, in `auto` mode when an
    /// autoscaler is configured (then the count starts at its minimum if below it).
    pub fn new(group: &str, workers: usize, autoscale: Option<AutoscaleConfig>) -> Self {
        let autoscale = autoscale.map(AutoscaleConfig::normalized);
        let workers = match &autoscale {
            Some(a) => workers.clamp(a.min, a.max),
            None => workers.clamp(1, MAX_WORKERS),
        };
        let mode = if autoscale.is_some() {
            Mode::Auto
        } else {
            Mode::Manual
        };
        let status = WorkersStatus {
            group: group.to_owned(),
            workers: 0,
            desired: workers,
            mode,
            autoscale: autoscale.as_ref().map(|a| AutoscaleView {
                min: a.min,
                max: a.max,
                step: a.step,
                cooldown: humantime::format_duration(a.cooldown).to_string(),
                target: a.target.to_string(),
            }),
            last_decision: None,
        };
        Self {
            desired: watch::Sender::new(Desired { workers, mode }),
            status: Arc::new(Mutex::new(status)),
            autoscale,
            sinks: SinkHealth::default(),
        }
    }

    /// Control of the pool `cfg` describes: its group, start count and autoscaler.
    pub fn for_pool(cfg: &crate::PoolConfig) -> Self {
        Self::new(&cfg.group, cfg.workers, cfg.autoscale.clone())
    }

    /// Whether the pool's sinks take its commits (the pool records it, `/readyz` reads it).
    pub fn sinks(&self) -> &SinkHealth {
        &self.sinks
    }

    /// The autoscaler's settings, if any.
    pub fn autoscale(&self) -> Option<&AutoscaleConfig> {
        self.autoscale.as_ref()
    }

    /// What runs now.
    pub fn status(&self) -> WorkersStatus {
        self.lock().clone()
    }

    /// Runs `n` workers and pins the count (the autoscaler, if any, stops deciding).
    pub fn set_workers(&self, n: usize) -> Result<WorkersStatus, ControlError> {
        if !(1..=MAX_WORKERS).contains(&n) {
            return Err(ControlError::OutOfRange(n));
        }
        self.request(Desired {
            workers: n,
            mode: Mode::Manual,
        })
    }

    /// Hands the count back to the autoscaler.
    pub fn resume_autoscale(&self) -> Result<WorkersStatus, ControlError> {
        if self.autoscale.is_none() {
            return Err(ControlError::NoAutoscaler);
        }
        let workers = self.desired.borrow().workers;
        self.request(Desired {
            workers,
            mode: Mode::Auto,
        })
    }

    fn request(&self, d: Desired) -> Result<WorkersStatus, ControlError> {
        if self.desired.is_closed() {
            return Err(ControlError::Stopped);
        }
        self.desired.send_replace(d);
        let mut s = self.lock();
        s.desired = d.workers;
        s.mode = d.mode;
        Ok(s.clone())
    }

    /// For the pool: the autoscaler's choice, applied only while in `auto` (a manual pin
    /// that raced with the decision wins).
    pub(crate) fn autoscaled(&self, d: &Decision) {
        let mut applied = false;
        self.desired.send_if_modified(|cur| {
            if cur.mode == Mode::Auto && cur.workers != d.to {
                cur.workers = d.to;
                applied = true;
                true
            } else {
                false
            }
        });
        let mut s = self.lock();
        if applied {
            s.desired = d.to;
        }
        s.last_decision = Some(DecisionView::from(d));
    }

    pub(crate) fn subscribe(&self) -> watch::Receiver<Desired> {
        self.desired.subscribe()
    }

    pub(crate) fn desired(&self) -> Desired {
        *self.desired.borrow()
    }

    pub(crate) fn running(&self, n: usize) {
        self.lock().workers = n;
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, WorkersStatus> {
        self.status.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::autoscale::Reason;

    fn decision(to: usize) -> Decision {
        Decision {
            from: 1,
            to,
            reason: Reason::BacklogAboveTarget,
            wanted: to,
            backlog: 10,
            rate: 1.0,
            busy: 1.0,
        }
    }

    #[test]
    fn manual_counts_are_checked_and_pin_the_autoscaler() {
        let c = PoolControl::new("storage", 2, Some(AutoscaleConfig::default()));
        let _rx = c.subscribe();
        assert_eq!(c.status().mode, Mode::Auto);
        assert_eq!(c.set_workers(0), Err(ControlError::OutOfRange(0)));
        assert_eq!(
            c.set_workers(MAX_WORKERS + 1),
            Err(ControlError::OutOfRange(MAX_WORKERS + 1))
        );
        let s = c.set_workers(5).unwrap();
        assert_eq!((s.desired, s.mode), (5, Mode::Manual));
        // The autoscaler's later decision is recorded but not applied.
        c.autoscaled(&decision(2));
        assert_eq!(c.desired().workers, 5);
        let s = c.resume_autoscale().unwrap();
        assert_eq!(s.mode, Mode::Auto);
        c.autoscaled(&decision(3));
        assert_eq!(c.desired().workers, 3);
        assert_eq!(c.status().last_decision.unwrap().to, 3);
    }

    #[test]
    fn auto_needs_an_autoscaler_and_a_running_pool() {
        let c = PoolControl::new("storage", 2, None);
        assert_eq!(c.resume_autoscale(), Err(ControlError::NoAutoscaler));
        // No receiver: the pool is not running.
        assert_eq!(c.set_workers(3), Err(ControlError::Stopped));
    }

    #[test]
    fn the_start_count_respects_the_autoscaler_bounds() {
        let a = AutoscaleConfig {
            min: 2,
            max: 4,
            ..AutoscaleConfig::default()
        };
        assert_eq!(
            PoolControl::new("g", 1, Some(a.clone())).desired().workers,
            2
        );
        assert_eq!(PoolControl::new("g", 9, Some(a)).desired().workers, 4);
    }
}
