//! Acking a job's delivery once every notification carrying its events is settled.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use sluice_binding::transport::Acker;
use tokio_util::task::TaskTracker;

/// Settles one delivery when the last notification holding it is done: acked, or requeued
/// if any of them failed to reach a durable path.
pub(super) struct Settle {
    pub(super) acker: Mutex<Option<Acker>>,
    pub(super) failed: AtomicBool,
    pub(super) tracker: TaskTracker,
    /// The count of unsettled jobs of its tenant on its queue, which this one is part of
    /// until it settles.
    pub(super) share: OnceLock<Arc<AtomicUsize>>,
}

pub(super) type Hold = Arc<Settle>;

impl Settle {
    pub(super) fn fail(&self) {
        self.failed.store(true, Ordering::Relaxed);
    }
}

impl Drop for Settle {
    fn drop(&mut self) {
        if let Some(share) = self.share.get() {
            share.fetch_sub(1, Ordering::AcqRel);
        }
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
