//! Telemetry of the router: each event is a struct whose `emit` logs and counts in one
//! place, so a metric and its log line never drift apart (as in ingest and processors).
//!
//! Labels are bounded:
//! - `tenant`: a tenant of the tenants file (the operator's list, validated ids);
//! - `kind`: an [`EventKind`](sluice_binding::event::EventKind) (`reading`, `fault`,
//!   `threshold`);
//! - `target`: a target kind (`webhook`, `amqp`, `redis_stream`, `live`);
//! - `outcome`, `reason`, `error`: fixed sets, listed on each event.
//!
//! Device ids, metric names, subscription ids and URLs never become labels (logs name a
//! webhook's host, never its URL, which may hold a secret). Nothing here runs per reading:
//! the match stage counts once per delivery, the delivery stage once per notification.
//!
//! One histogram has a `tenant` label, [`NOTIFY_LATENCY_SECONDS`]: the README documents
//! notification latency per tenant. Its series are bounded by the tenants file: one
//! histogram (18 buckets, `+Inf`, sum and count: 21 series) per tenant that has a
//! subscription. Dashboards aggregate it `by (le)`.

use std::time::Duration;

use metrics::{counter, gauge, histogram};

use crate::notify::webhook::{Transition, WebhookError};

/// Events received by the match stage, by `kind` (readings counted per reading, derived
/// events one each).
pub const EVENTS_TOTAL: &str = "sluice_router_events_total";
/// Jobs the match stage published to the outbox and the broker confirmed.
pub const JOBS_TOTAL: &str = "sluice_router_jobs_total";
/// Events carried by those jobs.
pub const MATCHED_EVENTS_TOTAL: &str = "sluice_router_matched_events_total";
/// Time from receiving a delivery to the confirm of its last job, seconds.
pub const MATCH_SECONDS: &str = "sluice_router_match_seconds";
/// Rounds of publishing a delivery's unconfirmed jobs again.
pub const PUBLISH_RETRIES_TOTAL: &str = "sluice_router_publish_retries_total";
/// Deliveries requeued at shutdown with jobs still unconfirmed.
pub const REQUEUED_TOTAL: &str = "sluice_router_requeued_total";
/// Deliveries refused to the dead-letter queue, by `error`.
pub const REFUSED_TOTAL: &str = "sluice_router_refused_total";
/// Subscriptions in this instance's index.
pub const SUBSCRIPTIONS: &str = "sluice_router_subscriptions";
/// Notifications, by `tenant`, `target` and `outcome`.
pub const NOTIFICATIONS_TOTAL: &str = "sluice_notifications_total";
/// Events carried by notifications, by `tenant`, `target` and `outcome`.
pub const NOTIFIED_EVENTS_TOTAL: &str = "sluice_notified_events_total";
/// Notifications dropped by policy, by `tenant` and `reason`.
pub const NOTIFICATIONS_DROPPED_TOTAL: &str = "sluice_notifications_dropped_total";
/// Device timestamp of the oldest event of a notification → delivered, seconds, by
/// `tenant`.
pub const NOTIFY_LATENCY_SECONDS: &str = "sluice_notify_latency_seconds";
/// Live-feed listeners connected to this instance.
pub const LIVE_LISTENERS: &str = "sluice_live_listeners";
/// Webhook delivery attempts, by `outcome` (`ok`, `retryable`, `permanent`,
/// `circuit_open`).
pub const WEBHOOK_REQUESTS_TOTAL: &str = "sluice_webhook_requests_total";
/// Duration of the HTTP exchange of a webhook attempt that was sent, seconds.
pub const WEBHOOK_REQUEST_SECONDS: &str = "sluice_webhook_request_seconds";

// --- The match stage.

/// Events arrived at the match stage (a telemetry batch's readings, or one derived event).
/// Labels: `kind`.
#[derive(Debug)]
pub(crate) struct EventsReceived {
    pub(crate) kind: &'static str,
    pub(crate) count: usize,
}

impl EventsReceived {
    pub(crate) fn emit(self) {
        tracing::trace!(kind = self.kind, count = self.count, "events received");
        counter!(EVENTS_TOTAL, "kind" => self.kind).increment(self.count as u64);
    }
}

/// Every job of a delivery was confirmed by the broker; the delivery is acked. No labels.
#[derive(Debug)]
pub(crate) struct DeliveryMatched {
    pub(crate) jobs: usize,
    pub(crate) events: usize,
    pub(crate) elapsed: Duration,
}

impl DeliveryMatched {
    pub(crate) fn emit(self) {
        tracing::trace!(jobs = self.jobs, events = self.events, elapsed = ?self.elapsed, "delivery matched");
        counter!(JOBS_TOTAL).increment(self.jobs as u64);
        counter!(MATCHED_EVENTS_TOTAL).increment(self.events as u64);
        histogram!(MATCH_SECONDS).record(self.elapsed.as_secs_f64());
    }
}

/// Some jobs of a delivery were not confirmed; the delivery is held and they are published
/// again after `retry_in`. No labels.
#[derive(Debug)]
pub(crate) struct JobsPublishFailed<'a> {
    pub(crate) error: &'a dyn std::error::Error,
    pub(crate) queue: &'a str,
    pub(crate) jobs: usize,
    pub(crate) retry_in: Duration,
}

impl JobsPublishFailed<'_> {
    pub(crate) fn emit(self) {
        tracing::warn!(error = %self.error, queue = %self.queue, jobs = self.jobs, retry_in = ?self.retry_in, "cannot publish notification jobs; holding the delivery and trying again");
        counter!(PUBLISH_RETRIES_TOTAL).increment(1);
    }
}

/// Shutdown came while a delivery's jobs were unconfirmed: the delivery is requeued. No
/// labels.
#[derive(Debug)]
pub(crate) struct DeliveryRequeued;

impl DeliveryRequeued {
    pub(crate) fn emit(self) {
        tracing::debug!("requeueing a delivery with unconfirmed jobs at shutdown");
        counter!(REQUEUED_TOTAL).increment(1);
    }
}

/// A delivery the match stage cannot use goes to the dead-letter queue. Labels: `error`
/// (a codec error kind, `decode`, `unsupported-version` or `invalid`).
#[derive(Debug)]
pub(crate) struct DeliveryRefused<'a> {
    pub(crate) queue: &'a str,
    pub(crate) error: &'static str,
    pub(crate) reason: &'a str,
}

impl DeliveryRefused<'_> {
    pub(crate) fn emit(self) {
        tracing::warn!(queue = %self.queue, error = self.error, reason = self.reason, "refusing a delivery to the dead-letter queue");
        counter!(REFUSED_TOTAL, "error" => self.error).increment(1);
    }
}

// --- Subscriptions.

/// This instance's index changed (loaded, a tenant reloaded, a full reload). No labels.
#[derive(Debug)]
pub(crate) struct IndexChanged {
    pub(crate) subscriptions: usize,
}

impl IndexChanged {
    pub(crate) fn emit(self) {
        tracing::trace!(
            subscriptions = self.subscriptions,
            "subscription index changed"
        );
        gauge!(SUBSCRIPTIONS).set(self.subscriptions as f64);
    }
}

/// A live-feed listener connected. No labels.
#[derive(Debug)]
pub(crate) struct LiveListenerOpened;

impl LiveListenerOpened {
    pub(crate) fn emit(self) {
        gauge!(LIVE_LISTENERS).increment(1.0);
    }
}

/// A live-feed listener went away (or the feed ended at shutdown). No labels.
#[derive(Debug)]
pub(crate) struct LiveListenerClosed;

impl LiveListenerClosed {
    pub(crate) fn emit(self) {
        gauge!(LIVE_LISTENERS).decrement(1.0);
    }
}

// --- The delivery stage.

/// A notification reached a settled state other than delivered. Labels: `tenant`,
/// `target`, `outcome` (`batched`, `retry`, `pending`, `deferred`, `dead`).
#[derive(Debug)]
pub(crate) struct NotificationSettled<'a> {
    pub(crate) tenant: &'a str,
    pub(crate) target: &'static str,
    pub(crate) outcome: &'static str,
    pub(crate) events: usize,
}

impl NotificationSettled<'_> {
    pub(crate) fn emit(self) {
        tracing::trace!(
            tenant = self.tenant,
            target = self.target,
            outcome = self.outcome,
            events = self.events,
            "notification settled"
        );
        count(self.tenant, self.target, self.outcome, self.events);
    }
}

/// A notification was delivered. Labels: `tenant`, `target`, `outcome` = `sent` on the
/// counters; `tenant` on the latency histogram.
#[derive(Debug)]
pub(crate) struct NotificationDelivered<'a> {
    pub(crate) tenant: &'a str,
    pub(crate) target: &'static str,
    pub(crate) events: usize,
    /// Now minus the device timestamp of the oldest event, ns.
    pub(crate) latency_ns: i64,
}

impl NotificationDelivered<'_> {
    pub(crate) fn emit(self) {
        tracing::trace!(
            tenant = self.tenant,
            target = self.target,
            events = self.events,
            "notification delivered"
        );
        count(self.tenant, self.target, "sent", self.events);
        histogram!(NOTIFY_LATENCY_SECONDS, "tenant" => self.tenant.to_owned())
            .record(self.latency_ns.max(0) as f64 / 1e9);
    }
}

fn count(tenant: &str, target: &'static str, outcome: &'static str, events: usize) {
    counter!(NOTIFICATIONS_TOTAL, "tenant" => tenant.to_owned(), "target" => target, "outcome" => outcome)
        .increment(1);
    counter!(NOTIFIED_EVENTS_TOTAL, "tenant" => tenant.to_owned(), "target" => target, "outcome" => outcome)
        .increment(events as u64);
}

/// A notification was dropped by policy. Labels: `tenant`, `reason` (`superseded`,
/// `expired`, `subscription_gone`, `no_listener`).
#[derive(Debug)]
pub(crate) struct NotificationDropped<'a> {
    pub(crate) tenant: &'a str,
    pub(crate) reason: &'static str,
    pub(crate) events: usize,
}

impl NotificationDropped<'_> {
    pub(crate) fn emit(self) {
        tracing::debug!(tenant = %self.tenant, reason = self.reason, events = self.events, "notification dropped by policy");
        counter!(NOTIFICATIONS_DROPPED_TOTAL, "tenant" => self.tenant.to_owned(), "reason" => self.reason)
            .increment(1);
    }
}

// --- The webhook notifier.

/// One webhook delivery attempt ended. Labels: `outcome` on the counter (`ok`,
/// `retryable`, `permanent`, `circuit_open`); none on the histogram, recorded only when
/// the HTTP exchange took place.
#[derive(Debug)]
pub(crate) struct WebhookAttempted<'a> {
    pub(crate) host: &'a str,
    pub(crate) subscription: &'a str,
    pub(crate) result: &'a Result<(), WebhookError>,
    pub(crate) elapsed: Option<Duration>,
}

impl WebhookAttempted<'_> {
    pub(crate) fn emit(self) {
        let (host, subscription) = (self.host, self.subscription);
        let ms = self.elapsed.map(|d| d.as_millis());
        if let Some(elapsed) = self.elapsed {
            histogram!(WEBHOOK_REQUEST_SECONDS).record(elapsed.as_secs_f64());
        }
        let outcome = match self.result {
            Ok(()) => {
                tracing::debug!(host, subscription, ms, "webhook delivered");
                "ok"
            }
            // Expected while a circuit is open; its opening was logged.
            Err(e @ WebhookError::CircuitOpen { .. }) => {
                tracing::debug!(host, subscription, reason = %e.reason(), "webhook not attempted");
                e.outcome()
            }
            Err(e) => {
                tracing::warn!(host, subscription, ms, reason = %e.reason(), outcome = e.outcome(), "webhook failed");
                e.outcome()
            }
        };
        counter!(WEBHOOK_REQUESTS_TOTAL, "outcome" => outcome).increment(1);
    }
}

/// A webhook target's circuit opened or closed. Logged only.
#[derive(Debug)]
pub(crate) struct WebhookCircuitChanged<'a> {
    pub(crate) host: &'a str,
    pub(crate) transition: Transition,
    pub(crate) open_for: Duration,
}

impl WebhookCircuitChanged<'_> {
    pub(crate) fn emit(self) {
        let host = self.host;
        match self.transition {
            Transition::Opened => tracing::warn!(
                host,
                open_for = %humantime::format_duration(self.open_for),
                "webhook circuit opened"
            ),
            Transition::Closed => tracing::info!(host, "webhook circuit closed"),
        }
    }
}
