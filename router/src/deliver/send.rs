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
        let dead = outbox_step(ctx, || {
            ctx.outbox
                .dead_letter(&job, &ready.key, e.kind(), &why, attempt)
        })
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
        (
            outbox_step(ctx, || ctx.outbox.delay(&job, &ready.key, wait)).await,
            "retry",
        )
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

/// Runs an outbox step (a publish to the delay or dead-letter queue) until the broker
/// confirms it, backing off from 100 ms to 5 s between attempts while the broker refuses
/// (an alarm, a reconnect). Requeueing the jobs instead would bring them back at once, spin
/// for as long as the outage lasts, and count broker redeliveries, which RabbitMQ 4's
/// quorum queues turn into drops past their delivery limit. The jobs' deliveries stay
/// unacked meanwhile: nothing else could be settled through the outbox either. Gives up
/// only when the stage is stopping, with the last error.
pub(super) async fn outbox_step<F, Fut>(ctx: &Ctx, mut step: F) -> Result<(), PublishError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<(), PublishError>>,
{
    let mut wait = OUTBOX_RETRY_FIRST;
    let mut attempt = 1u32;
    loop {
        let e = match step().await {
            Ok(()) => return Ok(()),
            Err(e) => e,
        };
        if ctx.stopping.is_cancelled() {
            return Err(e);
        }
        if attempt == 1 || attempt.is_power_of_two() {
            tracing::warn!(error = %e, attempt, ?wait, "cannot publish to the outbox; retrying");
        }
        tokio::select! {
            () = tokio::time::sleep(wait) => {}
            () = ctx.stopping.cancelled() => return Err(e),
        }
        wait = (wait * 2).min(OUTBOX_RETRY_MAX);
        attempt = attempt.saturating_add(1);
    }
}

const OUTBOX_RETRY_FIRST: std::time::Duration = std::time::Duration::from_millis(100);
const OUTBOX_RETRY_MAX: std::time::Duration = std::time::Duration::from_secs(5);

/// An outbox step failed while the stage stops: the jobs' deliveries are requeued (once;
/// another instance, or this one after its restart, takes them).
pub(super) fn park_failed(ready: &Ready, e: &PublishError) {
    tracing::warn!(error = %e, "cannot publish to the outbox while stopping; requeueing the job");
    fail_all(&ready.holds);
}
