//! `batch_notify` without pinning the broker: a subscription's events are held in the
//! store (Redis, shared by the instances) and the jobs that brought them are acked as soon
//! as they are held. A batch that waits for its count or its duration (up to a day) then
//! occupies nothing of the notify queues' prefetch windows, which every tenant shares.
//!
//! A full or due batch is sent on as one `Batched` job on the outbox, with a broker
//! confirm, before its events leave the store: a crash between the two sends that
//! notification twice, with one idempotency key, never zero times. One flusher at a time
//! per batch, among all instances (a lock with a TTL in the store). Due batches are found
//! by polling the store's due set every `tick`, so a batch held by an instance that died
//! is sent by another.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sluice_binding::TenantId;
use sluice_binding::event::{Event, idempotency_key};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::policy::defer;
use super::settle::Hold;
use super::{Ctx, Ready};
use crate::internal_events::{NotificationDropped, NotificationSettled};
use crate::job::{Job, Stage};
use crate::matching::SubRef;
use crate::store::now_ms;
use crate::subscription::MAX_BATCH_COUNT;
use crate::sync::SharedIndex;

/// A batch holds at most this many times its count: more means its flushes fail (the
/// outbox is refusing), and further events wait on the delay queue instead.
const HELD_CAP_FACTOR: usize = 4;
/// A flusher's lock outlives a flush that hangs by this much; another instance then
/// flushes (sending the batch twice, with one key, rather than never).
const LOCK_TTL: Duration = Duration::from_secs(30);
/// Due batches taken per poll.
const POLL_LIMIT: usize = 64;

/// Holds `events` of a `batch_notify` subscription in the store; `hold` is released
/// (acked) once they are. A batch that reaches its count is sent on at once.
pub(super) async fn hold(
    ctx: &Ctx,
    index: &SharedIndex,
    sub: SubRef,
    events: Vec<Event>,
    hold: Hold,
) {
    let Some(bn) = sub.policy.batch_notify else {
        // Replaced meanwhile by a subscription without batching: it comes back as is.
        let ready = Ready::new(sub.clone(), events, Stage::Fresh, vec![hold]);
        defer(ctx, &ready, "the subscription no longer batches").await;
        return;
    };
    let count = bn.count() as usize;
    let due = now_ms() + bn.duration().as_millis() as u64;
    let cap = count * HELD_CAP_FACTOR;
    let tenant = sub.tenant.as_str();
    match ctx
        .store
        .hold_batch(tenant, sub.id, &events, due, cap)
        .await
    {
        Ok(Some(held)) => {
            drop(hold);
            if held >= count {
                flush(ctx, index, tenant, sub.id).await;
            }
        }
        Ok(None) => {
            let ready = Ready::new(sub.clone(), events, Stage::Fresh, vec![hold]);
            defer(ctx, &ready, "held batch at its cap").await;
        }
        Err(e) => {
            let ready = Ready::new(sub.clone(), events, Stage::Fresh, vec![hold]);
            defer(ctx, &ready, &format!("Redis failed to hold a batch: {e}")).await;
        }
    }
}

/// Finds due batches every `ctx.cfg.tick` and flushes them, each at most once at a time
/// from this instance, until `shutdown`.
pub(super) async fn poll(ctx: Arc<Ctx>, index: SharedIndex, shutdown: CancellationToken) {
    let flushing: Arc<Mutex<HashSet<(String, Uuid)>>> = Arc::default();
    let mut tick = tokio::time::interval(ctx.cfg.tick);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut failing = false;
    loop {
        tokio::select! {
            () = shutdown.cancelled() => break,
            _ = tick.tick() => {}
        }
        let due = match ctx.store.due_batches(now_ms(), POLL_LIMIT).await {
            Ok(due) => {
                failing = false;
                due
            }
            Err(e) => {
                // Once per outage: the tick would repeat it fifty times a second.
                if !failing {
                    tracing::warn!(error = %e, "cannot read the due batches; retrying");
                }
                failing = true;
                continue;
            }
        };
        for key in due {
            let fresh = flushing
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(key.clone());
            if !fresh {
                continue;
            }
            let (ctx2, index, flushing) = (ctx.clone(), index.clone(), flushing.clone());
            ctx.tracker.spawn(async move {
                flush(&ctx2, &index, &key.0, key.1).await;
                flushing
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .remove(&key);
            });
        }
    }
}

/// Sends on what of subscription `id`'s batch is full or due, if no other flusher is at it.
async fn flush(ctx: &Ctx, index: &SharedIndex, tenant: &str, id: Uuid) {
    let token = Uuid::new_v4().to_string();
    match ctx.store.lock_batch(tenant, id, &token, LOCK_TTL).await {
        Ok(true) => {}
        Ok(false) => return,
        Err(e) => {
            tracing::debug!(error = %e, %tenant, subscription = %id, "cannot lock a held batch; the next poll retries");
            return;
        }
    }
    if let Err(e) = flush_locked(ctx, index, tenant, id).await {
        tracing::warn!(error = %e, %tenant, subscription = %id, "cannot send a held batch on; it is retried");
    }
    if let Err(e) = ctx.store.unlock_batch(tenant, id, &token).await {
        tracing::debug!(error = %e, "cannot unlock a held batch; its lock expires");
    }
}

async fn flush_locked(
    ctx: &Ctx,
    index: &SharedIndex,
    tenant: &str,
    id: Uuid,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let sub = index.load().get(tenant, id).cloned();
    let Some(sub) = sub else {
        // Not in this instance's index: deleted, or created moments ago on another
        // instance. The store decides.
        let t = TenantId::new(tenant)?;
        if ctx.store.get(&t, id).await?.is_none() {
            let events = ctx.store.drop_batch(tenant, id).await?;
            NotificationDropped {
                tenant,
                reason: "subscription_gone",
                events,
            }
            .emit();
        }
        return Ok(());
    };
    // A policy without batching now (the subscription was replaced): send what is held.
    let (count, wait) = match sub.policy.batch_notify {
        Some(bn) => (bn.count() as usize, bn.duration()),
        None => (MAX_BATCH_COUNT as usize, Duration::ZERO),
    };
    loop {
        let held = ctx.store.held_batch(tenant, id, count).await?;
        let now = now_ms();
        if held.len == 0 {
            // Leaves the due set.
            ctx.store.release_batch(tenant, id, 0, 0).await?;
            return Ok(());
        }
        let due = held.due_ms <= now || sub.policy.batch_notify.is_none();
        if held.len < count && !due {
            return Ok(());
        }
        let taken = count.min(held.len);
        if !held.events.is_empty() {
            let job = Job::new(tenant, id, Stage::Batched, held.events);
            let key = idempotency_key(id, &job.events);
            if let Err(e) = ctx.outbox.enqueue(&job, &key).await {
                // Back off: the poll takes it again after `retry_initial`.
                let later = now + ctx.cfg.retry_initial.as_millis() as u64;
                ctx.store.release_batch(tenant, id, 0, later).await?;
                return Err(e.into());
            }
            NotificationSettled {
                tenant,
                target: sub.target.kind(),
                outcome: "batched",
                events: job.events.len(),
            }
            .emit();
        }
        let next = now + wait.as_millis() as u64;
        ctx.store.release_batch(tenant, id, taken, next).await?;
    }
}
