//! The policy loop: one task holding the batches (`batch_notify`) and the pending latest
//! notifications (`latest_notify`), so that state needs no lock; every ready
//! notification is sent by a task of its own.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::settle::{Hold, fail_all};
use super::{Ctx, Incoming, Ready, send};
use sluice_binding::event::Event;

use crate::internal_events::NotificationDropped;
use crate::job::Stage;
use crate::matching::SubRef;
use crate::sync::SharedIndex;

pub(super) struct Batch {
    sub: SubRef,
    events: Vec<Event>,
    holds: Vec<Hold>,
    deadline: Instant,
}

pub(super) struct Pending {
    ready: Ready,
    due: Instant,
}

/// What send tasks hand back to the policy loop.
pub(super) enum Back {
    /// Rate-limited under `latest_notify`: hold it as the newest pending one.
    HoldLatest(Ready, Duration),
}

pub(super) struct PolicyLoop {
    pub(super) ctx: Arc<Ctx>,
    pub(super) index: SharedIndex,
    pub(super) batches: HashMap<Uuid, Batch>,
    pub(super) latest: HashMap<Uuid, Pending>,
}

impl PolicyLoop {
    pub(super) async fn run(
        &mut self,
        mut rx: mpsc::Receiver<Incoming>,
        shutdown: CancellationToken,
        stop_reading: CancellationToken,
    ) {
        let (back_tx, mut back_rx) = mpsc::unbounded_channel();
        let mut tick = tokio::time::interval(self.ctx.cfg.tick);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = shutdown.cancelled() => break,
                incoming = rx.recv() => match incoming {
                    Some(i) => self.incoming(i, &back_tx),
                    None => break,
                },
                Some(Back::HoldLatest(ready, wait)) = back_rx.recv() => self.hold_latest(ready, wait),
                _ = tick.tick() => self.due(&back_tx),
            }
        }
        // Stop taking jobs; what is held goes back to the queue for another instance (or
        // this one after a restart): requeued, not acked.
        stop_reading.cancel();
        rx.close();
        while let Some(i) = rx.recv().await {
            i.hold.fail();
        }
        for (_, b) in self.batches.drain() {
            fail_all(&b.holds);
        }
        for (_, p) in self.latest.drain() {
            fail_all(&p.ready.holds);
        }
    }

    fn incoming(&mut self, Incoming { job, hold }: Incoming, back: &mpsc::UnboundedSender<Back>) {
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
        match job.stage {
            Stage::Fresh => match sub.policy.batch_notify {
                Some(bn) => {
                    let count = bn.count() as usize;
                    let now = Instant::now();
                    let b = self.batches.entry(sub.id).or_insert_with(|| Batch {
                        sub: sub.clone(),
                        events: Vec::new(),
                        holds: Vec::new(),
                        deadline: now + bn.duration(),
                    });
                    // The subscription may have been replaced (same id, new policy).
                    b.sub = sub.clone();
                    b.events.extend(job.events);
                    b.holds.push(hold);
                    let mut full = Vec::new();
                    while b.events.len() >= count {
                        let rest = b.events.split_off(count);
                        let events = std::mem::replace(&mut b.events, rest);
                        // A job whose events straddle two notifications is held by both.
                        let holds = if b.events.is_empty() {
                            std::mem::take(&mut b.holds)
                        } else {
                            b.holds.clone()
                        };
                        full.push(Ready::new(sub.clone(), events, Stage::Fresh, holds));
                        b.deadline = now + bn.duration();
                    }
                    if b.events.is_empty() {
                        self.batches.remove(&sub.id);
                    }
                    for ready in full {
                        self.spawn_send(ready, back);
                    }
                }
                None => {
                    for e in job.events {
                        let ready =
                            Ready::new(sub.clone(), vec![e], Stage::Fresh, vec![hold.clone()]);
                        self.spawn_send(ready, back);
                    }
                }
            },
            stage @ (Stage::Pending | Stage::Retry { .. }) => {
                let ready = Ready::new(sub, job.events, stage, vec![hold]);
                self.spawn_send(ready, back);
            }
        }
    }

    fn hold_latest(&mut self, ready: Ready, wait: Duration) {
        let due = Instant::now() + wait;
        if let Some(old) = self.latest.insert(ready.sub.id, Pending { ready, due }) {
            // Superseded: latestNotify keeps only the newest; the older one is done.
            NotificationDropped {
                tenant: old.ready.sub.tenant.as_str(),
                reason: "superseded",
                events: old.ready.events.len(),
            }
            .emit();
        }
    }

    fn due(&mut self, back: &mpsc::UnboundedSender<Back>) {
        let now = Instant::now();
        let expired: Vec<Uuid> = self
            .batches
            .iter()
            .filter(|(_, b)| b.deadline <= now)
            .map(|(id, _)| *id)
            .collect();
        for id in expired {
            if let Some(b) = self.batches.remove(&id) {
                self.spawn_send(Ready::new(b.sub, b.events, Stage::Fresh, b.holds), back);
            }
        }
        let due: Vec<Uuid> = self
            .latest
            .iter()
            .filter(|(_, p)| p.due <= now)
            .map(|(id, _)| *id)
            .collect();
        for id in due {
            if let Some(p) = self.latest.remove(&id) {
                let mut ready = p.ready;
                ready.stage = Stage::Pending;
                self.spawn_send(ready, back);
            }
        }
    }

    fn spawn_send(&self, ready: Ready, back: &mpsc::UnboundedSender<Back>) {
        let (ctx, back) = (self.ctx.clone(), back.clone());
        self.ctx.tracker.spawn(async move {
            let Ok(_permit) = ctx.sends.clone().acquire_owned().await else {
                return;
            };
            send::send(&ctx, ready, &back).await;
        });
    }
}
