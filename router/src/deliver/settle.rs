//! Acking a job's delivery once every notification carrying its events is settled.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use sluice_binding::transport::Acker;
use tokio_util::task::TaskTracker;

/// Settles one delivery when the last notification holding it is done: acked, or requeued
/// if any of them failed to reach a durable path.
pub(super) struct Settle {
    pub(super) acker: Mutex<Option<Acker>>,
    pub(super) failed: AtomicBool,
    pub(super) tracker: TaskTracker,
}

pub(super) type Hold = Arc<Settle>;

impl Settle {
    pub(super) fn fail(&self) {
        self.failed.store(true, Ordering::Relaxed);
    }
}

impl Drop for Settle {
    fn drop(&mut self) {
        let acker = self.acker.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(a) = acker {
            let failed = self.failed.load(Ordering::Relaxed);
            self.tracker.spawn(async move {
                let settled = if failed { a.requeue().await } else { a.ack().await };
                if let Err(e) = settled {
                    tracing::warn!(error = %e, "cannot settle a notify delivery; it will come again");
                }
            });
        }
    }
}

pub(super) fn fail_all(holds: &[Hold]) {
    for h in holds {
        h.fail();
    }
}
