//! Sends one notification: the policy checks, then the shaped events serialised once and
//! handed to the target's notifier ([`Notifiers`](crate::notify::Notifiers)), then the outcome settled: delivered, retried on the
//! delay queue after a backoff, or dead-lettered (a permanent failure, or `max_attempts`
//! spent).

use super::policy::{Admission, admit, expire};
use super::settle::fail_all;
use super::{Ctx, Ready};
use sluice_binding::event::Notification;
use sluice_binding::model::now_ns;
use sluice_binding::transport::PublishError;

use crate::internal_events::{NotificationDelivered, NotificationSettled};
use crate::job::{Shape, Stage};
use crate::notify::{NotifyError, backoff};

pub(super) async fn send(ctx: &Ctx, ready: Ready) {
    let Admission::Send { last, mut ready } = admit(ctx, ready).await else {
        return;
    };
    let json = serialise(&mut ready);
    match ctx.notifiers.send(&ready.sub, &ready.key, json).await {
        Ok(()) => {
            let oldest = ready.events.iter().map(|e| e.t).min().unwrap_or(0);
            NotificationDelivered {
                tenant: ready.sub.tenant.as_str(),
                target: ready.sub.target.kind(),
                events: ready.events.len(),
                latency_ns: now_ns() - oldest,
            }
            .emit();
        }
        Err(e) => failed(ctx, &ready, &e).await,
    }
    if last {
        expire(ctx, &ready).await;
    }
}

/// The notification's JSON, with the events shaped by the subscription's `content`.
/// `ready` keeps the shaped events: a retry carries them (its key depends on the event
/// ids only).
fn serialise(ready: &mut Ready) -> String {
    let notification = Notification {
        id: ready.key.clone(),
        subscription: ready.sub.id,
        tenant: ready.sub.tenant.to_string(),
        events: std::mem::take(&mut ready.events)
            .into_iter()
            .map(|e| e.shaped(ready.sub.policy.content))
            .collect(),
        sent: now_ns(),
    };
    let json = serde_json::to_string(&notification).expect("a notification always serialises");
    ready.events = notification.events;
    json
}

/// A delivery attempt failed: the next attempt goes to the delay queue, or, when retrying
/// cannot help or the attempts are spent, the notification goes to the dead-letter queue.
async fn failed(ctx: &Ctx, ready: &Ready, e: &NotifyError) {
    let (tenant, id, target) = (&ready.sub.tenant, ready.sub.id, ready.sub.target.kind());
    let attempt = match ready.stage {
        Stage::Retry { attempt } => attempt,
        _ => 0,
    } + 1;
    let reason = e.reason();
    let job = ready.job(Stage::Retry { attempt });
    let (published, outcome) = if e.is_permanent() || attempt >= ctx.cfg.max_attempts {
        let why = if e.is_permanent() {
            format!("permanent failure: {reason}")
        } else {
            format!("gave up after {attempt} attempts: {reason}")
        };
        tracing::warn!(%tenant, subscription = %id, target, reason = %why, "notification dead-lettered");
        let dead = ctx
            .outbox
            .dead_letter(&job, &ready.key, e.kind(), &why, attempt)
            .await;
        (dead, "dead")
    } else {
        let wait = e.retry_wait(backoff::backoff(
            attempt,
            ctx.cfg.retry_initial,
            ctx.cfg.retry_max,
            &mut rand::rng(),
        ));
        tracing::debug!(%tenant, subscription = %id, target, attempt, ?wait, %reason, "delivery failed; retrying");
        (ctx.outbox.delay(&job, &ready.key, wait).await, "retry")
    };
    match published {
        Ok(()) => NotificationSettled {
            tenant: tenant.as_str(),
            target,
            outcome,
            events: ready.events.len(),
        }
        .emit(),
        Err(pe) => park_failed(ready, &pe),
    }
}

/// The outbox refused a notification's next step: its jobs' deliveries are requeued.
pub(super) fn park_failed(ready: &Ready, e: &PublishError) {
    tracing::warn!(error = %e, "cannot publish to the outbox; requeueing the job");
    fail_all(&ready.holds);
}
