//! The policy loop: takes each job off the readers' channel and starts its work — events
//! of a `batch_notify` subscription go to the held batch ([`super::batch`]), everything
//! else is sent (one notification per event of a fresh job, the fixed notification of a
//! batched, pending or retried one). Nothing waits here, so nothing waits unacked on the
//! broker, and no tenant holds more than its share of a queue's unsettled jobs
//! (`max_jobs_per_tenant`): a job beyond it waits on the delay queue, so a tenant whose
//! notifications are slow leaves the prefetch window to the others.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::policy::defer;
use super::{Ctx, Incoming, Ready, batch, send};

use crate::internal_events::NotificationDropped;
use crate::job::Stage;
use crate::sync::SharedIndex;

pub(super) struct PolicyLoop {
    pub(super) ctx: Arc<Ctx>,
    pub(super) index: SharedIndex,
    /// Unsettled jobs of each (tenant, queue).
    pub(super) shares: HashMap<(String, usize), Arc<AtomicUsize>>,
}

impl PolicyLoop {
    pub(super) async fn run(
        &mut self,
        mut rx: mpsc::Receiver<Incoming>,
        shutdown: CancellationToken,
        stop_reading: CancellationToken,
    ) {
        loop {
            tokio::select! {
                () = shutdown.cancelled() => break,
                incoming = rx.recv() => match incoming {
                    Some(i) => self.incoming(i),
                    None => break,
                },
            }
        }
        // Stop taking jobs; what was taken but not started goes back to the queue for
        // another instance (or this one after a restart): requeued, not acked.
        stop_reading.cancel();
        rx.close();
        while let Some(i) = rx.recv().await {
            i.hold.fail();
        }
    }

    fn incoming(&mut self, Incoming { job, hold, queue }: Incoming) {
        let sub = {
            let index = self.index.load();
            index.get(&job.tenant, job.subscription).cloned()
        };
        let Some(sub) = sub else {
            // Deleted or expired since the match: nothing to deliver; the hold acks.
            NotificationDropped {
                tenant: &job.tenant,
                reason: "subscription_gone",
                events: job.events.len(),
            }
            .emit();
            return;
        };
        let share = self
            .shares
            .entry((job.tenant.clone(), queue))
            .or_default()
            .clone();
        if share.load(Ordering::Acquire) >= self.ctx.cfg.max_jobs_per_tenant {
            // Over its share of this queue: the job waits on the delay queue, unchanged.
            let ctx = self.ctx.clone();
            self.ctx.tracker.spawn(async move {
                let ready = Ready::new(sub, job.events, job.stage, vec![hold]);
                defer(&ctx, &ready, "its tenant holds its share of the queue").await;
            });
            return;
        }
        share.fetch_add(1, Ordering::AcqRel);
        let _ = hold.share.set(share);
        match job.stage {
            Stage::Fresh if sub.policy.batch_notify.is_some() => {
                let (ctx, index) = (self.ctx.clone(), self.index.clone());
                self.ctx.tracker.spawn(async move {
                    let Some(_permits) = ctx.send_permits(sub.tenant.as_str()).await else {
                        return;
                    };
                    batch::hold(&ctx, &index, sub, job.events, hold).await;
                });
            }
            Stage::Fresh => {
                for e in job.events {
                    self.spawn_send(Ready::new(
                        sub.clone(),
                        vec![e],
                        Stage::Fresh,
                        vec![hold.clone()],
                    ));
                }
            }
            stage @ (Stage::Batched | Stage::Pending | Stage::Retry { .. }) => {
                self.spawn_send(Ready::new(sub, job.events, stage, vec![hold]));
            }
        }
    }

    fn spawn_send(&self, ready: Ready) {
        let ctx = self.ctx.clone();
        self.ctx.tracker.spawn(async move {
            let Some(_permits) = ctx.send_permits(ready.sub.tenant.as_str()).await else {
                return;
            };
            send::send(&ctx, ready).await;
        });
    }
}
