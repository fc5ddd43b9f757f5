//! The policy checks of one notification that need the shared counters in Redis: the
//! rate limit (`rate_limit`, with `latest_notify`) and the expiration counter. A retry
//! passed them on its first attempt and skips them.
//!
//! A rate-limited notification waits on the delay queue, never as an unacked delivery.
//! Under `latest_notify` the store records the key of the subscription's newest
//! notification; a pending one that comes back with another key was superseded and is
//! dropped.

use std::time::Duration;

use super::send::{outbox_step, park_failed};
use super::{Ctx, Ready};
use crate::internal_events::{NotificationDropped, NotificationSettled};
use crate::job::Stage;
use crate::store::Expiration;

/// What the checks decided.
pub(super) enum Admission {
    /// Send it; `last` when the expiration counter is reached by this one.
    Send { last: bool, ready: Ready },
    /// Settled by the checks (pending, held as latest, expired, or deferred).
    Settled,
}

/// Applies the rate limit and the expiration counter to `ready`.
pub(super) async fn admit(ctx: &Ctx, ready: Ready) -> Admission {
    if matches!(ready.stage, Stage::Retry { .. }) {
        return Admission::Send { last: false, ready };
    }
    let (tenant, id) = (ready.sub.tenant.as_str(), ready.sub.id);
    let policy = &ready.sub.policy;
    if let Some(rl) = &policy.rate_limit {
        // Long enough for any pending notification of the window to come back.
        let keep = rl.window * 2 + Duration::from_secs(60);
        if rl.latest_notify && ready.stage == Stage::Pending {
            match ctx.store.latest(tenant, id).await {
                Ok(Some(newest)) if newest != ready.key => {
                    NotificationDropped {
                        tenant,
                        reason: "superseded",
                        events: ready.events.len(),
                    }
                    .emit();
                    return Admission::Settled;
                }
                Ok(_) => {}
                Err(e) => {
                    defer(
                        ctx,
                        &ready,
                        &format!("Redis failed the latest_notify check: {e}"),
                    )
                    .await;
                    return Admission::Settled;
                }
            }
        }
        let slot = ctx.store.take_rate_slot(tenant, id, rl, &ready.key).await;
        if rl.latest_notify && slot.is_ok() {
            // This one is now the newest: older pending ones are superseded, whether this
            // one goes now or waits.
            if let Err(e) = ctx.store.set_latest(tenant, id, &ready.key, keep).await {
                defer(
                    ctx,
                    &ready,
                    &format!("Redis failed the latest_notify record: {e}"),
                )
                .await;
                return Admission::Settled;
            }
        }
        match slot {
            Ok(None) => {}
            Ok(Some(wait)) => {
                // Pending: parked on the broker until the window has room.
                let job = ready.job(Stage::Pending);
                match outbox_step(ctx, || ctx.outbox.delay(&job, &ready.key, wait)).await {
                    Ok(()) => NotificationSettled {
                        tenant,
                        target: ready.sub.target.kind(),
                        outcome: "pending",
                        events: ready.events.len(),
                    }
                    .emit(),
                    Err(e) => park_failed(&ready, &e),
                }
                return Admission::Settled;
            }
            Err(e) => {
                defer(
                    ctx,
                    &ready,
                    &format!("Redis failed the rate limit check: {e}"),
                )
                .await;
                return Admission::Settled;
            }
        }
    }
    let mut last = false;
    if let Some(max) = policy.expiration_counter {
        match ctx.store.count_notification(tenant, id, max).await {
            Ok(Expiration::Send) => {}
            Ok(Expiration::SendLast) => last = true,
            Ok(Expiration::Expired) => {
                NotificationDropped {
                    tenant,
                    reason: "expired",
                    events: ready.events.len(),
                }
                .emit();
                return Admission::Settled;
            }
            Err(e) => {
                defer(
                    ctx,
                    &ready,
                    &format!("Redis failed the expiration counter: {e}"),
                )
                .await;
                return Admission::Settled;
            }
        }
    }
    Admission::Send { last, ready }
}

/// A step needing Redis failed (`why`): the notification waits `retry_initial` on the
/// delay queue and comes back unchanged (no attempt counted). A requeue would come back at
/// once, spin for as long as Redis is out, and count broker redeliveries, which RabbitMQ
/// 4's quorum queues turn into drops past their delivery limit.
pub(super) async fn defer(ctx: &Ctx, ready: &Ready, why: &str) {
    let wait = ctx.cfg.retry_initial;
    tracing::warn!(
        reason = why,
        ?wait,
        "the notification waits on the delay queue"
    );
    let job = ready.job(ready.stage);
    match outbox_step(ctx, || ctx.outbox.delay(&job, &ready.key, wait)).await {
        Ok(()) => NotificationSettled {
            tenant: ready.sub.tenant.as_str(),
            target: ready.sub.target.kind(),
            outcome: "deferred",
            events: ready.events.len(),
        }
        .emit(),
        Err(pe) => park_failed(ready, &pe),
    }
}

/// The expiration counter was reached by the notification just settled: the
/// subscription ends.
pub(super) async fn expire(ctx: &Ctx, ready: &Ready) {
    let (tenant, id) = (&ready.sub.tenant, ready.sub.id);
    match ctx.store.delete(tenant, id).await {
        Ok(_) => {
            tracing::info!(%tenant, subscription = %id, "expiration counter reached; subscription deleted")
        }
        Err(e) => tracing::warn!(error = %e, "cannot delete an expired subscription"),
    }
}
